//! The feed: follows the store's directories on the batch session and feeds every change,
//! whoever made it (this replica, other replicas, zkCli, the Go tools), onto the store's change
//! stream, in zxid order; the stream's consumer alone applies it to the index.
//!
//! - One persistent recursive watch per directory (`addWatch`, ZooKeeper ≥ 3.6) reports every
//!   node created, changed or deleted below it, without a watch per node and without listing the
//!   directory again. Events name the node but not its data, so the feed reads what changed,
//!   up to 1,000 nodes per `multiRead` request.
//! - Order. Reads answer with data newer than the event that asked for them, so results arrive
//!   out of zxid order. The feed stages them and publishes at a *barrier*: it writes its own
//!   barrier node; ZooKeeper sends a session's watch events and responses in zxid order, and
//!   zookeeper-client hands events to the watchers' queues before it completes the response, so
//!   once the write's answer (with its zxid) is in, every event up to that zxid is queued. The
//!   feed takes them all, reads what they name, and publishes everything staged at or below the
//!   barrier, sorted. The index revision is therefore a true resume point: every change at or
//!   below it is in.
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

/// Nodes read in one `multiRead` request.
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
    /// Nodes deleted (unless a read finds them again).
    deleted: HashSet<RecordKey>,
    /// A session event came: the watches must be set again and everything re-read.
    session: bool,
}

impl Round {
    fn is_empty(&self) -> bool {
        self.reads.is_empty() && self.deleted.is_empty() && !self.session
    }
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
    /// Publish at the next barrier even with nothing staged (after a re-read).
    want_barrier: bool,
    /// Whether the feed is watching: down from a session event or an error until it has
    /// watched and caught up again.
    up: watch::Sender<bool>,
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
            want_barrier: true,
            up,
        }
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

    /// Sets the watches if needed, re-reads if needed, then takes and publishes events through
    /// barriers until none are left.
    async fn catch_up(
        &mut self,
        watches: &mut Option<Watches>,
        resync: &mut bool,
        round: &mut Round,
        shutdown: &CancellationToken,
    ) -> Result<(), StoreError> {
        loop {
            if round.session || watches.is_none() {
                // Drop the old watchers first: their removal reaches the session before the
                // new watches.
                *watches = None;
                *round = Round::default();
                *watches = Some(self.watch().await?);
                *resync = true;
            }
            let Some(current) = watches.as_mut() else {
                return Ok(());
            };
            if *resync {
                self.resync(&current.client).await?;
                *resync = false;
            }
            if round.is_empty() && !self.want_barrier && self.staged.is_empty() {
                return Ok(());
            }
            if shutdown.is_cancelled() {
                return Ok(());
            }
            let barrier = self.session.write_barrier(&current.client).await?;
            // Every event up to the barrier is queued now.
            self.drain(current, round);
            if round.session {
                continue;
            }
            let taken = std::mem::take(round);
            self.apply(&current.client, taken).await?;
            self.publish(barrier).await;
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

    /// Reads what a round names and stages it.
    async fn apply(&mut self, client: &zk::Client, round: Round) -> Result<(), StoreError> {
        let Round {
            reads, mut deleted, ..
        } = round;
        let (present, gone) = self.read_nodes(client, reads.into_iter().collect()).await?;
        deleted.retain(|k| !present.contains(k));
        deleted.extend(gone);
        self.stage_removals(client, deleted).await
    }

    /// Lists a directory: the keys present, and the known keys that are gone.
    async fn read_children(
        &self,
        client: &zk::Client,
        dir: Dir,
    ) -> Result<(Vec<RecordKey>, Vec<RecordKey>), StoreError> {
        let Some(prefix) = self.dir(dir) else {
            return Ok((Vec::new(), Vec::new()));
        };
        let path = node_path(prefix);
        let names = timed(self.settings.request_timeout, client.list_children(path))
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
        Ok((present, missing))
    }

    /// Reads nodes in `multiRead` batches and stages what changed; returns the keys whose node
    /// exists and those whose node is gone.
    async fn read_nodes(
        &mut self,
        client: &zk::Client,
        keys: Vec<RecordKey>,
    ) -> Result<(HashSet<RecordKey>, Vec<RecordKey>), StoreError> {
        let timeout = self.settings.request_timeout;
        let keyed: Vec<(RecordKey, String)> = keys
            .into_iter()
            .filter_map(|k| self.path_of(&k).map(|p| (k, p)))
            .collect();
        let chunks: Vec<Vec<String>> = keyed
            .chunks(READ_BATCH)
            .map(|chunk| chunk.iter().map(|(_, path)| path.clone()).collect())
            .collect();
        let batches: Vec<Result<Vec<zk::MultiReadResult>, StoreError>> = stream::iter(chunks)
            .map(|paths| read_batch(client.clone(), paths, timeout))
            .buffered(READS_IN_FLIGHT)
            .collect()
            .await;
        let mut present = HashSet::new();
        let mut gone = Vec::new();
        let mut keys = keyed.into_iter().map(|(k, _)| k);
        for batch in batches {
            for result in batch? {
                let Some(key) = keys.next() else { break };
                match result {
                    zk::MultiReadResult::Data { data, stat } => {
                        present.insert(key.clone());
                        match parse_value(&data).filter(|v| {
                            !matches!(key, RecordKey::CaseIndex(_)) || validate_user(v).is_ok()
                        }) {
                            Some(value) => self.stage(Record {
                                key,
                                value: Some(value),
                                revision: stat.mzxid as Revision,
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
                    } => gone.push(key),
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
        Ok((present, gone))
    }

    /// Stages the removal of known keys, dated by their directory's last child change.
    async fn stage_removals(
        &mut self,
        client: &zk::Client,
        keys: HashSet<RecordKey>,
    ) -> Result<(), StoreError> {
        let keys: Vec<RecordKey> = keys
            .into_iter()
            .filter(|k| self.known.contains_key(k))
            .collect();
        let mut pzxid: HashMap<Dir, Revision> = HashMap::new();
        for key in keys {
            let dir = Self::dir_of(&key);
            let revision = match pzxid.get(&dir) {
                Some(r) => *r,
                None => {
                    let path = node_path(self.dir(dir).unwrap_or("/"));
                    let stat = timed(self.settings.request_timeout, client.check_stat(path))
                        .await
                        .map_err(|e| zk_error("exists", path, e))?;
                    let r = stat.map_or(0, |s| s.pzxid as Revision);
                    pzxid.insert(dir, r);
                    r
                }
            };
            self.stage(Record {
                key,
                value: None,
                revision,
            });
        }
        Ok(())
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

    /// Publishes every staged record at or below the barrier.
    async fn publish(&mut self, barrier: Revision) {
        let ready: Vec<RecordKey> = self
            .staged
            .iter()
            .filter(|(_, r)| r.revision <= barrier)
            .map(|(k, _)| k.clone())
            .collect();
        let records: Vec<Record> = ready.iter().filter_map(|k| self.staged.remove(k)).collect();
        debug!(barrier, records = records.len(), "publishing");
        // A closed stream means shutdown: nobody applies changes any more.
        let _ = self
            .sink
            .send(StoreChange {
                records,
                through: barrier,
            })
            .await;
        self.want_barrier = false;
    }

    /// Re-reads every directory and node and stages what changed.
    async fn resync(&mut self, client: &zk::Client) -> Result<(), StoreError> {
        self.want_barrier = true;
        for dir in self.dirs() {
            let (present, missing) = self.read_children(client, dir).await?;
            let count = present.len();
            let (_, gone) = self.read_nodes(client, present).await?;
            self.stage_removals(client, missing.into_iter().chain(gone).collect())
                .await?;
            info!(?dir, nodes = count, "re-read a ZooKeeper directory");
        }
        Ok(())
    }
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
