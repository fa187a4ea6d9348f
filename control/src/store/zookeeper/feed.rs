//! The feed: follows the store's directories on the batch session and feeds every change,
//! whoever made it (this replica, other replicas, zkCli, the Go tools), onto the store's change
//! stream, in zxid order; the stream's consumer alone applies it to the index.
//!
//! - One persistent recursive watch per directory (`addWatch`, ZooKeeper ≥ 3.6) reports every
//!   node created, changed or deleted below it, without a watch per node and without listing the
//!   directory again. Events name the node but not its data (nor, before ZooKeeper 3.9, their
//!   zxid), so the feed reads what changed, up to 1,000 nodes per `multiRead` request; every
//!   such request also reads each watched directory's own node, whose stat dates deletions
//!   (below) and bounds the order at no extra round trip.
//! - Order, without a write of its own. Reads answer with data newer than the event that asked
//!   for them, so results arrive out of zxid order: the feed stages them and publishes, sorted,
//!   only what it knows to be complete. It learns that from the reads' answers alone:
//!   - ZooKeeper applies transactions in zxid order, and fires a watch when it applies the
//!     transaction to its tree, before it serves any later read; it sends a session's
//!     notifications and responses in the order it produced them, and zookeeper-client hands
//!     an event to its watcher's queue before it completes the response that follows it.
//!   - So once a read's answer carrying zxid `M` is in (a node's `mzxid`, a directory's `pzxid`
//!     or `mzxid`), transaction `M` and every one below it were applied before the read was
//!     served: the event of every change at or below `M` is in the watchers' queues. `M` is
//!     the highest such zxid of all the answers in so far.
//!   - A round takes every queued event and reads what they name. What an event names is read
//!     in the round after the event is taken, by a request served after the change. So after
//!     a round, every change at or below the `M` known before that round has been read (its
//!     event was queued by then, and taken then or earlier): everything staged at or below
//!     that `M` is final and is published through it. And when taking finds no event at all,
//!     every change at or below the latest `M` was read already: everything staged is
//!     published through it (every staged revision came from an answer, so none is above).
//!   - Under continuous writes each round publishes at least through the previous round's
//!     `M`, so the feed never starves; when changes are rare a change costs one read round
//!     trip after its event, and no ZooKeeper write (no quorum, no fsync) stands between a
//!     change and the stream. A re-read (below) is a round like any other: its `M` is the
//!     highest zxid it saw.
//!   - The published revision is therefore a true resume point: every change at or below it is
//!     in, unless a later change of the same node replaced it before the feed read the node
//!     (that value is published in its turn, with its own revision). Published revisions only
//!     grow.
//! - A node read as gone is removed, dated by its directory's `pzxid` read in the same
//!   `multiRead`: the last child created or deleted, so at or after the deletion and at or
//!   below that request's `M`. Removals read in one request share that revision, and may
//!   share it with the node whose creation set it.
//! - Watches do not survive everything: events are lost while the session is disconnected,
//!   zookeeper-client 0.11 does not set persistent watches again after a reconnect, and an
//!   expired session is gone. So on any session event the feed drops its watches, sets them
//!   again (on a new session if the old one ended) and re-reads everything; it also re-reads
//!   after an error and every `ZKReconcileSeconds` as a backstop. A re-read only stages what
//!   changed. The store counts as unavailable from such trouble until the feed has caught up.
//! - zookeeper-client's event queues are unbounded; the feed empties them every round, so they
//!   hold about one round's events.

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
};

use futures::{FutureExt, StreamExt, stream};
use prometheus_client::metrics::counter::Counter;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};
use zookeeper_client as zk;

use super::{
    ZkSettings, node_path, parse_value,
    session::{BatchSession, timed, zk_error},
};
use crate::{
    store::{Record, RecordKey, Revision, StoreChange, StoreError},
    validate::validate_user,
};

/// Nodes read in one `multiRead` request (besides the directories' own nodes).
const READ_BATCH: usize = 1_000;
/// `multiRead` requests in flight at once.
const READS_IN_FLIGHT: usize = 4;

/// Which directory a node belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Dir {
    Users,
    CaseIndex,
}

/// The watches of one session: a persistent recursive watch on each directory.
struct Watches {
    client: zk::Client,
    dirs: Vec<(Dir, zk::PersistentWatcher)>,
}

/// What the events taken so far ask for.
#[derive(Debug, Default)]
struct Round {
    /// Nodes created or changed: to read.
    reads: HashSet<RecordKey>,
    /// Nodes deleted: to read too (a read that finds one again wins).
    deleted: HashSet<RecordKey>,
    /// A session event came: the watches must be set again and everything re-read.
    session: bool,
}

impl Round {
    fn is_empty(&self) -> bool {
        self.reads.is_empty() && self.deleted.is_empty() && !self.session
    }
}

/// What reading some nodes found.
#[derive(Debug, Default)]
struct ReadOutcome {
    /// The nodes gone, each dated by its directory's `pzxid` read in the same request.
    gone: Vec<(RecordKey, Revision)>,
    /// The highest zxid the answers carried: every change at or below it has its event
    /// queued (see the module doc).
    seen: Revision,
}

/// Follows the directories and emits their changes; see the module doc.
pub(super) struct Feed {
    session: Arc<BatchSession>,
    settings: Arc<ZkSettings>,
    /// The store's change stream.
    sink: tokio::sync::mpsc::Sender<StoreChange>,
    /// Every node the feed has seen, with the revision it staged for it.
    known: HashMap<RecordKey, Revision>,
    /// Changes read but not yet published.
    staged: HashMap<RecordKey, Record>,
    /// The revision published through so far; `None` before the first publication.
    published: Option<Revision>,
    /// Whether the feed is watching: down from a session event or an error until it has
    /// watched and caught up again.
    up: watch::Sender<bool>,
    /// Whole re-reads done so far (the first loads the state).
    resyncs: u64,
    /// Counts the re-reads after the first.
    reconciles: Counter,
}

impl Feed {
    pub(super) fn new(
        session: Arc<BatchSession>,
        settings: Arc<ZkSettings>,
        sink: tokio::sync::mpsc::Sender<StoreChange>,
        up: watch::Sender<bool>,
    ) -> Self {
        Self {
            session,
            settings,
            sink,
            known: HashMap::new(),
            staged: HashMap::new(),
            published: None,
            up,
            resyncs: 0,
            reconciles: Counter::default(),
        }
    }

    /// Counts the re-reads after the first on `reconciles`.
    pub(super) fn counting_reconciles(mut self, reconciles: Counter) -> Self {
        self.reconciles = reconciles;
        self
    }

    fn dir(&self, dir: Dir) -> Option<&str> {
        match dir {
            Dir::Users => Some(&self.settings.switcher_dir),
            Dir::CaseIndex => self.settings.case_index_dir.as_deref(),
        }
    }

    fn dirs(&self) -> Vec<Dir> {
        [Dir::Users, Dir::CaseIndex]
            .into_iter()
            .filter(|d| self.dir(*d).is_some())
            .collect()
    }

    fn key(dir: Dir, name: String) -> RecordKey {
        match dir {
            Dir::Users => RecordKey::User(name),
            Dir::CaseIndex => RecordKey::CaseIndex(name),
        }
    }

    fn dir_of(key: &RecordKey) -> Dir {
        match key {
            RecordKey::User(_) => Dir::Users,
            RecordKey::CaseIndex(_) => Dir::CaseIndex,
        }
    }

    fn path_of(&self, key: &RecordKey) -> Option<String> {
        let (dir, name) = match key {
            RecordKey::User(n) => (Dir::Users, n),
            RecordKey::CaseIndex(n) => (Dir::CaseIndex, n),
        };
        self.dir(dir).map(|d| format!("{d}{name}"))
    }

    /// The record a node path stands for, if it is a node directly in a directory.
    fn classify(&self, dir: Dir, path: &str) -> Option<RecordKey> {
        let name = path.strip_prefix(self.dir(dir)?)?;
        (!name.is_empty() && !name.contains('/')).then(|| Self::key(dir, name.to_owned()))
    }

    /// Adds one watch event to the round.
    fn note(&self, dir: Dir, event: zk::WatchedEvent, round: &mut Round) {
        if event.event_type == zk::EventType::Session {
            debug!(state = ?event.session_state, "batch session event");
            round.session = true;
            return;
        }
        match (self.classify(dir, &event.path), event.event_type) {
            (Some(key), zk::EventType::NodeCreated | zk::EventType::NodeDataChanged) => {
                round.reads.insert(key);
            }
            (Some(key), zk::EventType::NodeDeleted) => {
                round.deleted.insert(key);
            }
            _ => debug!(path = event.path, event = ?event.event_type, "ignored ZooKeeper event"),
        }
    }

    /// Takes every event already queued, without waiting. Stops at a session event: after a
    /// terminal one a watcher must not be polled again.
    fn drain(&self, watches: &mut Watches, round: &mut Round) {
        for (dir, watcher) in &mut watches.dirs {
            while !round.session {
                match watcher.changed().now_or_never() {
                    Some(event) => self.note(*dir, event, round),
                    None => break,
                }
            }
        }
    }

    pub(super) async fn run(mut self, shutdown: CancellationToken) {
        let mut reconcile = tokio::time::interval(self.settings.reconcile_interval);
        reconcile.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        reconcile.tick().await;
        let mut watches: Option<Watches> = None;
        let mut resync = true;
        let mut round = Round::default();
        loop {
            match self
                .catch_up(&mut watches, &mut resync, &mut round, &shutdown)
                .await
            {
                Ok(()) => {
                    self.set_up(watches.is_some() && !round.session);
                }
                Err(e) => {
                    self.set_up(false);
                    warn!(error = %e, "ZooKeeper feed: will watch and re-read again");
                    watches = None;
                    resync = true;
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(super::RETRY_DELAY) => continue,
                    }
                }
            }
            if shutdown.is_cancelled() {
                return;
            }
            let Some(current) = watches.as_mut() else {
                continue;
            };
            if round.session {
                continue;
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = reconcile.tick() => {
                    debug!("periodic reconcile");
                    resync = true;
                }
                (dir, event) = next_event(current) => self.note(dir, event, &mut round),
            }
        }
    }

    fn set_up(&self, up: bool) {
        self.up.send_if_modified(|v| std::mem::replace(v, up) != up);
    }

    /// Sets the watches if needed, re-reads if needed, then takes events and reads what they
    /// name, round after round, publishing as far as the answers show everything is in (see
    /// the module doc), until a round finds no event.
    async fn catch_up(
        &mut self,
        watches: &mut Option<Watches>,
        resync: &mut bool,
        round: &mut Round,
        shutdown: &CancellationToken,
    ) -> Result<(), StoreError> {
        // The highest zxid the answers on these watches carried so far: every change at or
        // below it has its event queued.
        let mut seen: Option<Revision> = None;
        loop {
            if round.session || watches.is_none() {
                // Drop the old watchers first: their removal reaches the session before the
                // new watches.
                *watches = None;
                *round = Round::default();
                seen = None;
                *watches = Some(self.watch().await?);
                *resync = true;
            }
            let Some(current) = watches.as_mut() else {
                return Ok(());
            };
            if *resync {
                let read = self.resync(&current.client).await?;
                *resync = false;
                seen = Some(seen.map_or(read, |s| s.max(read)));
            }
            if shutdown.is_cancelled() {
                return Ok(());
            }
            // Every event of a change at or below `seen` is queued now.
            self.drain(current, round);
            if round.session {
                continue;
            }
            if round.is_empty() {
                // Every change at or below `seen` was read already.
                if let Some(through) = seen {
                    self.publish(through).await;
                }
                return Ok(());
            }
            let taken = std::mem::take(round);
            let read = self.apply(&current.client, taken).await?;
            // Every change at or below the earlier `seen` has been read now.
            if let Some(through) = seen {
                self.publish(through).await;
            }
            seen = Some(seen.map_or(read, |s| s.max(read)));
        }
    }

    /// Sets a persistent recursive watch on every directory, on the live session.
    async fn watch(&self) -> Result<Watches, StoreError> {
        let client = self.session.client().await?;
        let mut dirs = Vec::new();
        for dir in self.dirs() {
            let Some(prefix) = self.dir(dir) else {
                continue;
            };
            let path = node_path(prefix);
            let watcher = timed(
                self.settings.request_timeout,
                client.watch(path, zk::AddWatchMode::PersistentRecursive),
            )
            .await
            .map_err(|e| zk_error("watch", path, e))?;
            dirs.push((dir, watcher));
        }
        debug!(session = %client.session_id(), "watching the ZooKeeper directories");
        Ok(Watches { client, dirs })
    }

    /// Reads what a round names and stages it; answers the highest zxid the answers carried.
    async fn apply(&mut self, client: &zk::Client, round: Round) -> Result<Revision, StoreError> {
        let Round {
            mut reads, deleted, ..
        } = round;
        reads.extend(deleted);
        let read = self.read_nodes(client, reads.into_iter().collect()).await?;
        let seen = read.seen;
        self.stage_removals(read.gone);
        Ok(seen)
    }

    /// Lists a directory: the keys present, the known keys that are gone, and the highest
    /// zxid of the directory's stat.
    async fn read_children(
        &self,
        client: &zk::Client,
        dir: Dir,
    ) -> Result<(Vec<RecordKey>, Vec<RecordKey>, Revision), StoreError> {
        let Some(prefix) = self.dir(dir) else {
            return Ok((Vec::new(), Vec::new(), 0));
        };
        let path = node_path(prefix);
        let (names, stat) = timed(self.settings.request_timeout, client.get_children(path))
            .await
            .map_err(|e| zk_error("list", path, e))?;
        let mut present = Vec::with_capacity(names.len());
        for name in names {
            match validate_user(&name) {
                Ok(()) => present.push(Self::key(dir, name)),
                Err(e) => warn!(path, name, error = %e, "ignoring a node with an invalid name"),
            }
        }
        let set: HashSet<&RecordKey> = present.iter().collect();
        let missing = self
            .known
            .keys()
            .filter(|k| Self::dir_of(k) == dir && !set.contains(k))
            .cloned()
            .collect();
        Ok((present, missing, stat_zxid(&stat)))
    }

    /// Reads nodes in `multiRead` batches, each with the directories' own nodes, and stages
    /// what changed; returns the nodes found gone and the highest zxid the answers carried.
    async fn read_nodes(
        &mut self,
        client: &zk::Client,
        keys: Vec<RecordKey>,
    ) -> Result<ReadOutcome, StoreError> {
        let timeout = self.settings.request_timeout;
        let dirs: Vec<(Dir, String)> = self
            .dirs()
            .into_iter()
            .filter_map(|d| self.dir(d).map(|p| (d, node_path(p).to_owned())))
            .collect();
        let keyed: Vec<(RecordKey, String)> = keys
            .into_iter()
            .filter_map(|k| self.path_of(&k).map(|p| (k, p)))
            .collect();
        let chunks: Vec<Vec<String>> = keyed
            .chunks(READ_BATCH)
            .map(|chunk| {
                dirs.iter()
                    .map(|(_, path)| path.clone())
                    .chain(chunk.iter().map(|(_, path)| path.clone()))
                    .collect()
            })
            .collect();
        let batches: Vec<Result<Vec<zk::MultiReadResult>, StoreError>> = stream::iter(chunks)
            .map(|paths| read_batch(client.clone(), paths, timeout))
            .buffered(READS_IN_FLIGHT)
            .collect()
            .await;
        let mut outcome = ReadOutcome::default();
        let mut keys = keyed.into_iter().map(|(k, _)| k);
        for batch in batches {
            let mut results = batch?.into_iter();
            // The directories first: their pzxid dates this batch's removals.
            let mut pzxid: HashMap<Dir, Revision> = HashMap::new();
            for ((dir, path), result) in dirs.iter().zip(results.by_ref()) {
                match result {
                    zk::MultiReadResult::Data { stat, .. } => {
                        outcome.seen = outcome.seen.max(stat_zxid(&stat));
                        pzxid.insert(*dir, revision_of(stat.pzxid));
                    }
                    zk::MultiReadResult::Error { err } => return Err(zk_error("get", path, err)),
                    other => {
                        return Err(StoreError::Unavailable(format!(
                            "ZooKeeper get {path}: unexpected answer {other:?}"
                        )));
                    }
                }
            }
            for result in results {
                let Some(key) = keys.next() else { break };
                match result {
                    zk::MultiReadResult::Data { data, stat } => {
                        let revision = revision_of(stat.mzxid);
                        outcome.seen = outcome.seen.max(revision);
                        match parse_value(&data).filter(|v| {
                            !matches!(key, RecordKey::CaseIndex(_)) || validate_user(v).is_ok()
                        }) {
                            Some(value) => self.stage(Record {
                                key,
                                value: Some(value),
                                revision,
                            }),
                            None => warn!(
                                ?key,
                                bytes = data.len(),
                                "ignoring a node whose value is not a valid coin or name"
                            ),
                        }
                    }
                    zk::MultiReadResult::Error {
                        err: zk::Error::NoNode,
                    } => {
                        let revision = pzxid.get(&Self::dir_of(&key)).copied().unwrap_or(0);
                        outcome.gone.push((key, revision));
                    }
                    zk::MultiReadResult::Error { err } => {
                        return Err(zk_error("get", &format!("{key:?}"), err));
                    }
                    other => {
                        return Err(StoreError::Unavailable(format!(
                            "ZooKeeper get {key:?}: unexpected answer {other:?}"
                        )));
                    }
                }
            }
        }
        Ok(outcome)
    }

    /// Stages the removal of known keys found gone, each dated by its directory's `pzxid`.
    fn stage_removals(&mut self, gone: Vec<(RecordKey, Revision)>) {
        for (key, revision) in gone {
            self.stage(Record {
                key,
                value: None,
                revision,
            });
        }
    }

    fn stage(&mut self, record: Record) {
        let newer = match self.known.get(&record.key) {
            Some(known) => record.revision > *known,
            None => record.value.is_some(),
        };
        if !newer {
            return;
        }
        match record.value {
            Some(_) => {
                self.known.insert(record.key.clone(), record.revision);
            }
            None => {
                self.known.remove(&record.key);
            }
        }
        self.staged.insert(record.key.clone(), record);
    }

    /// Publishes every staged record at or below `through` (never below what was published
    /// before: published revisions only grow).
    async fn publish(&mut self, through: Revision) {
        let through = self.published.map_or(through, |p| p.max(through));
        let ready: Vec<RecordKey> = self
            .staged
            .iter()
            .filter(|(_, r)| r.revision <= through)
            .map(|(k, _)| k.clone())
            .collect();
        if ready.is_empty() && self.published == Some(through) {
            return;
        }
        let records: Vec<Record> = ready.iter().filter_map(|k| self.staged.remove(k)).collect();
        debug!(through, records = records.len(), "publishing");
        // A closed stream means shutdown: nobody applies changes any more.
        let _ = self.sink.send(StoreChange { records, through }).await;
        self.published = Some(through);
    }

    /// Re-reads every directory and node and stages what changed; answers the highest zxid the
    /// answers carried.
    async fn resync(&mut self, client: &zk::Client) -> Result<Revision, StoreError> {
        if self.resyncs > 0 {
            self.reconciles.inc();
        }
        self.resyncs += 1;
        let mut seen = 0;
        for dir in self.dirs() {
            let (present, missing, listed) = self.read_children(client, dir).await?;
            let count = present.len();
            let read = self
                .read_nodes(client, present.into_iter().chain(missing).collect())
                .await?;
            seen = seen.max(listed).max(read.seen);
            self.stage_removals(read.gone);
            info!(?dir, nodes = count, "re-read a ZooKeeper directory");
        }
        Ok(seen)
    }
}

/// A zxid from ZooKeeper as a revision (zxids are never negative).
fn revision_of(zxid: i64) -> Revision {
    Revision::try_from(zxid).unwrap_or(0)
}

/// The highest zxid a node's stat carries: its own last change or its children's.
fn stat_zxid(stat: &zk::Stat) -> Revision {
    revision_of(stat.mzxid.max(stat.pzxid))
}

/// Reads a batch of nodes in one `multiRead` request: one result per path, in order.
async fn read_batch(
    client: zk::Client,
    paths: Vec<String>,
    timeout: std::time::Duration,
) -> Result<Vec<zk::MultiReadResult>, StoreError> {
    let first = paths.first().cloned().unwrap_or_default();
    let mut reader = client.new_multi_reader();
    for path in &paths {
        reader
            .add_get_data(path)
            .map_err(|e| zk_error("read", path, e))?;
    }
    let results = timed(timeout, reader.commit())
        .await
        .map_err(|e| zk_error("multiRead", &first, e))?;
    if results.len() == paths.len() {
        Ok(results)
    } else {
        Err(StoreError::Unavailable(format!(
            "ZooKeeper multiRead answered {} reads of {}",
            results.len(),
            paths.len()
        )))
    }
}

/// The next event of any directory's watch.
async fn next_event(watches: &mut Watches) -> (Dir, zk::WatchedEvent) {
    if watches.dirs.is_empty() {
        return std::future::pending().await;
    }
    let waits = watches.dirs.iter_mut().map(|(dir, watcher)| {
        let dir = *dir;
        Box::pin(async move { (dir, watcher.changed().await) })
    });
    futures::future::select_all(waits).await.0
}
