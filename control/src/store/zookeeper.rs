//! The ZooKeeper store: the user→coin state in the znode layout of SPEC §5, shared with the Go
//! switcher's programs and btcpool's sservers, for fleets with several control replicas.
//!
//! - `ZKSwitcherWatchDir` + name holds a user's coin; `ZKUserCaseInsensitiveIndex` + lowercase
//!   name holds the canonical name. A record's revision is its znode's modification zxid, one
//!   order shared by every replica.
//! - Writes are pipelined: a batch puts every request on the session at once.
//! - Every writer counts (other replicas, zkCli, the Go API server): the store follows the
//!   directories with watches and feeds each change into the index.
//!
//! zookeeper-async neither re-arms watches after a reconnect nor offers persistent watches, so
//! the feed re-reads everything (and so re-arms every watch) whenever the session connects,
//! after a disconnect, after a session expiry, when its event queue overflowed, and every
//! `ZKReconcileSeconds` as a backstop. A re-read only stages what changed.
//!
//! Order. Reads answer with data newer than the event that asked for them, so results arrive
//! out of zxid order. The feed stages them and publishes only at a *barrier*: it writes its own
//! node under `ZKSwitchyardDir/barriers/` with a watch on it; ZooKeeper delivers watch events in
//! zxid order, so when the barrier's event arrives every change below the barrier's zxid has
//! had its event delivered, and once those are read, everything staged at or below the barrier
//! is published, sorted. The index revision is therefore a true resume point: every change at or
//! below it is in.

use std::{
    collections::{HashMap, HashSet},
    future::Future,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use async_trait::async_trait;
use futures::{StreamExt, stream};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};
use zookeeper_async::{
    Acl, CreateMode, Stat, WatchedEvent, WatchedEventType, ZkError, ZkState, ZooKeeper,
};

use super::{
    PendingSwitch, Record, RecordKey, Revision, StoreContents, StoreError, StoreWrite,
    UserCoinStore,
};
use crate::{index::UserCoinIndex, validate::validate_user};

/// Watch events buffered between ZooKeeper's client and the feed. Past this, events are dropped
/// and the feed re-reads everything instead: bounded memory, nothing lost.
const EVENT_QUEUE: usize = 65_536;
/// Requests one batch puts on the session at once.
const MAX_IN_FLIGHT: usize = 2_000;
/// Events the feed handles in one round.
const MAX_EVENTS_PER_ROUND: usize = 10_000;
/// The longest node value accepted (a coin, or a user name in the case index).
const MAX_VALUE_BYTES: usize = 128;
/// Wait between attempts when ZooKeeper cannot be read.
const RETRY_DELAY: Duration = Duration::from_millis(500);

/// Where and how to reach ZooKeeper.
#[derive(Debug, Clone)]
pub struct ZkSettings {
    /// The ensemble, `host:port` each.
    pub brokers: Vec<String>,
    /// `ZKSwitcherWatchDir`, with a trailing `/`.
    pub switcher_dir: String,
    /// `ZKUserCaseInsensitiveIndex`, with a trailing `/`, when configured.
    pub case_index_dir: Option<String>,
    /// `ZKSwitchyardDir`: Switchyard's own nodes (barriers), with a trailing `/`.
    pub switchyard_dir: String,
    /// The ZooKeeper session timeout.
    pub session_timeout: Duration,
    /// How long one request may take.
    pub request_timeout: Duration,
    /// How often the feed re-reads everything as a backstop.
    pub reconcile_interval: Duration,
}

/// Checks a directory setting and returns it with a trailing `/` (SPEC §5).
pub fn normalize_dir(value: &str) -> Result<String, String> {
    let trimmed = value.trim_end_matches('/');
    if trimmed.is_empty() {
        return Err(format!("{value:?} is not a directory path below the root"));
    }
    let Some(rest) = trimmed.strip_prefix('/') else {
        return Err(format!("{value:?} must start with '/'"));
    };
    for segment in rest.split('/') {
        validate_user(segment)
            .map_err(|e| format!("{value:?} has an invalid segment {segment:?}: {e}"))?;
    }
    Ok(format!("{trimmed}/"))
}

/// A directory path without its trailing `/`, as ZooKeeper names the node.
fn node_path(dir: &str) -> &str {
    dir.trim_end_matches('/')
}

/// What the feed is told.
#[derive(Debug)]
enum FeedEvent {
    /// A watch fired.
    Node(WatchedEvent),
    /// The session (re)connected: every watch is gone.
    Connected,
}

/// The receiving half of the feed, taken once by [`UserCoinStore::follow`].
struct FeedInputs {
    events: mpsc::Receiver<FeedEvent>,
    overflow: Arc<AtomicBool>,
}

/// The user→coin state in ZooKeeper; see the module doc.
pub struct ZooKeeperStore {
    zk: Arc<ZooKeeper>,
    settings: Arc<ZkSettings>,
    store_id: String,
    barrier_path: String,
    available: watch::Receiver<bool>,
    feed: Mutex<Option<FeedInputs>>,
    /// The index the store feeds, once followed: tells whether a node is likely to exist, so
    /// that a write to a new user creates at once instead of failing a set first.
    index: std::sync::OnceLock<Arc<UserCoinIndex>>,
}

impl std::fmt::Debug for ZooKeeperStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ZooKeeperStore")
            .field("settings", &self.settings)
            .field("store_id", &self.store_id)
            .finish_non_exhaustive()
    }
}

fn zk_error(op: &str, path: &str, e: ZkError) -> StoreError {
    StoreError::Unavailable(format!("ZooKeeper {op} {path}: {e:?}"))
}

/// Runs one request with a timeout, which counts as ZooKeeper's own `OperationTimeout`.
pub(crate) async fn timed<T>(
    timeout: Duration,
    request: impl Future<Output = Result<T, ZkError>>,
) -> Result<T, ZkError> {
    tokio::time::timeout(timeout, request)
        .await
        .unwrap_or(Err(ZkError::OperationTimeout))
}

/// Creates a node, treating "it already exists" as success.
pub(crate) async fn create_if_absent(
    zk: &ZooKeeper,
    path: &str,
    mode: CreateMode,
    timeout: Duration,
) -> Result<(), StoreError> {
    match timed(
        timeout,
        zk.create(path, Vec::new(), Acl::open_unsafe().clone(), mode),
    )
    .await
    {
        Ok(_) | Err(ZkError::NodeExists) => Ok(()),
        Err(e) => Err(zk_error("create", path, e)),
    }
}

/// Creates `path` and its parents as persistent nodes, tolerating concurrent creators.
pub(crate) async fn create_path(
    zk: &ZooKeeper,
    path: &str,
    timeout: Duration,
) -> Result<(), StoreError> {
    let mut prefix = String::new();
    for segment in path.trim_matches('/').split('/') {
        prefix.push('/');
        prefix.push_str(segment);
        create_if_absent(zk, &prefix, CreateMode::Persistent, timeout).await?;
    }
    Ok(())
}

/// A node value as text, if it is one the layout allows.
fn parse_value(bytes: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(bytes).ok()?.trim();
    (!text.is_empty() && text.len() <= MAX_VALUE_BYTES && !text.chars().any(char::is_control))
        .then(|| text.to_owned())
}

impl ZooKeeperStore {
    /// Connects, waits until the session is up, and creates the directories the store uses.
    pub async fn connect(settings: ZkSettings) -> Result<Self, StoreError> {
        let (tx, events) = mpsc::channel(EVENT_QUEUE);
        let overflow = Arc::new(AtomicBool::new(false));
        let watcher = {
            let tx = tx.clone();
            let overflow = Arc::clone(&overflow);
            move |event: WatchedEvent| {
                if event.event_type != WatchedEventType::None
                    && tx.try_send(FeedEvent::Node(event)).is_err()
                {
                    overflow.store(true, Ordering::SeqCst);
                }
            }
        };
        let connect_string = settings.brokers.join(",");
        let zk = ZooKeeper::connect_with_retry_time(
            &connect_string,
            settings.session_timeout,
            watcher,
            RETRY_DELAY,
        )
        .await
        .map_err(|e| zk_error("connect", &connect_string, e))?;
        let (available_tx, available) = watch::channel(false);
        let available_tx = Arc::new(available_tx);
        {
            let available_tx = Arc::clone(&available_tx);
            let overflow = Arc::clone(&overflow);
            zk.add_listener(move |state| {
                let up = matches!(state, ZkState::Connected | ZkState::ConnectedReadOnly);
                info!(?state, "ZooKeeper session state");
                available_tx.send_replace(up);
                if up && tx.try_send(FeedEvent::Connected).is_err() {
                    overflow.store(true, Ordering::SeqCst);
                }
            });
        }
        // The first connection may have completed before the listener was in place: probe.
        let deadline =
            tokio::time::Instant::now() + settings.session_timeout.max(Duration::from_secs(10));
        loop {
            match timed(Duration::from_secs(2), zk.exists("/", false)).await {
                Ok(_) => break,
                Err(e) if tokio::time::Instant::now() >= deadline => {
                    return Err(StoreError::Unavailable(format!(
                        "cannot reach ZooKeeper at {connect_string}: {e}"
                    )));
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
        available_tx.send_replace(true);

        let timeout = settings.request_timeout;
        let mut dirs = vec![
            settings.switcher_dir.clone(),
            format!("{}barriers/", settings.switchyard_dir),
            format!("{}pending/", settings.switchyard_dir),
        ];
        dirs.extend(settings.case_index_dir.clone());
        for dir in &dirs {
            create_path(&zk, node_path(dir), timeout).await?;
        }
        let watch_dir = node_path(&settings.switcher_dir);
        let store_id = match timed(timeout, zk.exists(watch_dir, false))
            .await
            .map_err(|e| zk_error("exists", watch_dir, e))?
        {
            Some(stat) => format!("zk-{:x}", stat.czxid),
            None => {
                return Err(StoreError::Unavailable(format!(
                    "{watch_dir} vanished right after it was created"
                )));
            }
        };
        let barrier_path = format!(
            "{}barriers/{:016x}",
            settings.switchyard_dir,
            rand::random::<u64>()
        );
        info!(brokers = %connect_string, watch_dir, %store_id, "connected to ZooKeeper");
        Ok(Self {
            zk: Arc::new(zk),
            settings: Arc::new(settings),
            store_id,
            barrier_path,
            available,
            feed: Mutex::new(Some(FeedInputs { events, overflow })),
            index: std::sync::OnceLock::new(),
        })
    }

    fn pending_path(&self, user: &str) -> String {
        format!("{}pending/{user}", self.settings.switchyard_dir)
    }

    /// The ZooKeeper session, for other users of the same ensemble (server-ID leases).
    pub fn client(&self) -> Arc<ZooKeeper> {
        Arc::clone(&self.zk)
    }

    fn path_of(&self, key: &RecordKey) -> Option<String> {
        match key {
            RecordKey::User(user) => Some(format!("{}{user}", self.settings.switcher_dir)),
            RecordKey::CaseIndex(lower) => self
                .settings
                .case_index_dir
                .as_ref()
                .map(|dir| format!("{dir}{lower}")),
        }
    }

    /// Sets a node's value, creating it when absent; answers the node's new modification zxid.
    /// `likely_new` tries the creation first.
    async fn put(
        &self,
        path: &str,
        value: &[u8],
        likely_new: bool,
    ) -> Result<Revision, StoreError> {
        let timeout = self.settings.request_timeout;
        let zk = &self.zk;
        let set = || async {
            match timed(timeout, zk.set_data(path, value.to_vec(), None)).await {
                Ok(stat) => Ok(Some(stat.mzxid as Revision)),
                Err(ZkError::NoNode) => Ok(None),
                Err(e) => Err(zk_error("set", path, e)),
            }
        };
        let create = || async {
            let created = zk.create2(
                path,
                value.to_vec(),
                Acl::open_unsafe().clone(),
                CreateMode::Persistent,
            );
            match timed(timeout, created).await {
                Ok((_, stat)) => Ok(Some(stat.mzxid as Revision)),
                Err(ZkError::NodeExists) => Ok(None),
                Err(e) => Err(zk_error("create", path, e)),
            }
        };
        // Set, else create, else (a concurrent writer won the race) set again; or the other
        // way round for a node that is likely new.
        for attempt in 0..3 {
            let result = if (attempt % 2 == 0) != likely_new {
                set().await?
            } else {
                create().await?
            };
            if let Some(revision) = result {
                return Ok(revision);
            }
        }
        Err(StoreError::Unavailable(format!(
            "ZooKeeper {path}: created and deleted by others while writing"
        )))
    }

    /// The record a write is about, its value, and its node's path.
    fn target(&self, write: StoreWrite) -> Result<(RecordKey, String, String), StoreError> {
        let (key, value) = match write {
            StoreWrite::SetUserCoin { user, coin } => (RecordKey::User(user), coin),
            StoreWrite::SetCaseIndex {
                lowercase_name,
                name,
            } => (RecordKey::CaseIndex(lowercase_name), name),
        };
        let path = self.path_of(&key).ok_or_else(|| {
            StoreError::Unavailable("no ZKUserCaseInsensitiveIndex is configured".into())
        })?;
        Ok((key, value, path))
    }

    async fn create_one(&self, write: StoreWrite) -> Result<Option<Record>, StoreError> {
        let (key, value, path) = self.target(write)?;
        let created = self.zk.create2(
            &path,
            value.as_bytes().to_vec(),
            Acl::open_unsafe().clone(),
            CreateMode::Persistent,
        );
        match timed(self.settings.request_timeout, created).await {
            Ok((_, stat)) => Ok(Some(Record {
                key,
                value: Some(value),
                revision: stat.mzxid as Revision,
            })),
            Err(ZkError::NodeExists) => Ok(None),
            Err(e) => Err(zk_error("create", &path, e)),
        }
    }

    async fn write_one(&self, write: StoreWrite) -> Result<Record, StoreError> {
        let (key, value, path) = self.target(write)?;
        let likely_new = match (&key, self.index.get()) {
            (RecordKey::User(user), Some(index)) => index.user_coin(user).is_none(),
            _ => false,
        };
        let revision = self.put(&path, value.as_bytes(), likely_new).await?;
        Ok(Record {
            key,
            value: Some(value),
            revision,
        })
    }
}

#[async_trait]
impl UserCoinStore for ZooKeeperStore {
    async fn load(&self) -> Result<StoreContents, StoreError> {
        // The feed delivers the records (see `follow`): a snapshot read here could not be
        // ordered with the changes that follow it.
        Ok(StoreContents {
            records: Vec::new(),
            revision: 0,
            store_id: self.store_id.clone(),
        })
    }

    async fn write(&self, writes: Vec<StoreWrite>) -> Vec<Result<Record, StoreError>> {
        stream::iter(writes)
            .map(|w| self.write_one(w))
            .buffered(MAX_IN_FLIGHT)
            .collect()
            .await
    }

    async fn create_if_absent(
        &self,
        writes: Vec<StoreWrite>,
    ) -> Vec<Result<Option<Record>, StoreError>> {
        stream::iter(writes)
            .map(|w| self.create_one(w))
            .buffered(MAX_IN_FLIGHT)
            .collect()
            .await
    }

    fn follow(&self, index: Arc<UserCoinIndex>, shutdown: CancellationToken) -> bool {
        let inputs = self.feed.lock().unwrap_or_else(|e| e.into_inner()).take();
        let _ = self.index.set(Arc::clone(&index));
        let Some(FeedInputs { events, overflow }) = inputs else {
            warn!("the ZooKeeper store is already followed");
            return true;
        };
        let feed = Feed {
            zk: Arc::clone(&self.zk),
            settings: Arc::clone(&self.settings),
            index,
            events,
            overflow,
            barrier_path: self.barrier_path.clone(),
            known: HashMap::new(),
            staged: HashMap::new(),
            barrier: None,
            want_barrier: true,
        };
        tokio::spawn(feed.run(shutdown));
        true
    }

    fn available(&self) -> watch::Receiver<bool> {
        self.available.clone()
    }

    fn kind(&self) -> &'static str {
        "zookeeper"
    }

    async fn put_pending(&self, pending: &PendingSwitch) -> Result<(), StoreError> {
        let data = serde_json::to_vec(&PendingNode {
            coin: pending.coin.clone(),
            apply_at: pending.apply_at,
        })
        .map_err(|e| StoreError::Corrupt(e.to_string()))?;
        self.put(&self.pending_path(&pending.user), &data, false)
            .await
            .map(|_| ())
    }

    async fn take_pending(
        &self,
        user: &str,
        only: Option<&PendingSwitch>,
    ) -> Result<bool, StoreError> {
        let path = self.pending_path(user);
        let timeout = self.settings.request_timeout;
        let version = match only {
            None => None,
            Some(expected) => match self.read_pending(user).await? {
                Some((current, version))
                    if current.coin == expected.coin && current.apply_at == expected.apply_at =>
                {
                    Some(version)
                }
                _ => return Ok(false),
            },
        };
        match timed(timeout, self.zk.delete(&path, version)).await {
            Ok(()) => Ok(true),
            Err(ZkError::NoNode | ZkError::BadVersion) => Ok(false),
            Err(e) => Err(zk_error("delete", &path, e)),
        }
    }

    async fn pending(&self, user: &str) -> Result<Option<PendingSwitch>, StoreError> {
        Ok(self.read_pending(user).await?.map(|(p, _)| p))
    }

    async fn all_pending(&self) -> Result<Vec<PendingSwitch>, StoreError> {
        let dir = format!("{}pending", self.settings.switchyard_dir);
        let names = timed(
            self.settings.request_timeout,
            self.zk.get_children(&dir, false),
        )
        .await
        .map_err(|e| zk_error("list", &dir, e))?;
        let names: Vec<String> = names
            .into_iter()
            .filter(|n| validate_user(n).is_ok())
            .collect();
        let read: Vec<Result<Option<(PendingSwitch, i32)>, StoreError>> = stream::iter(names)
            .map(|name| async move { self.read_pending(&name).await })
            .buffered(MAX_IN_FLIGHT)
            .collect()
            .await;
        let mut out = Vec::with_capacity(read.len());
        for r in read {
            if let Some((p, _)) = r? {
                out.push(p);
            }
        }
        Ok(out)
    }
}

/// A pending switch's node (`ZKSwitchyardDir/pending/<user>`).
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct PendingNode {
    #[serde(rename = "Coin")]
    coin: String,
    #[serde(rename = "ApplyAt")]
    apply_at: u64,
}

impl ZooKeeperStore {
    /// A pending switch and its node's version; `None` when absent or unreadable (logged).
    async fn read_pending(&self, user: &str) -> Result<Option<(PendingSwitch, i32)>, StoreError> {
        let path = self.pending_path(user);
        match timed(
            self.settings.request_timeout,
            self.zk.get_data(&path, false),
        )
        .await
        {
            Ok((data, stat)) => match serde_json::from_slice::<PendingNode>(&data) {
                Ok(node) if parse_value(node.coin.as_bytes()).is_some() => Ok(Some((
                    PendingSwitch {
                        user: user.to_owned(),
                        coin: node.coin,
                        apply_at: node.apply_at,
                    },
                    stat.version,
                ))),
                _ => {
                    warn!(
                        path,
                        "ignoring a pending switch node that is not the expected JSON"
                    );
                    Ok(None)
                }
            },
            Err(ZkError::NoNode) => Ok(None),
            Err(e) => Err(zk_error("get", &path, e)),
        }
    }
}

/// A node's data and stat, or why it could not be read.
type NodeRead = Result<(Vec<u8>, Stat), ZkError>;

/// Which directory a node belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Dir {
    Users,
    CaseIndex,
}

/// Follows the directories and feeds the index; see the module doc.
struct Feed {
    zk: Arc<ZooKeeper>,
    settings: Arc<ZkSettings>,
    index: Arc<UserCoinIndex>,
    events: mpsc::Receiver<FeedEvent>,
    overflow: Arc<AtomicBool>,
    barrier_path: String,
    /// Every node the feed has seen, with the revision it staged for it.
    known: HashMap<RecordKey, Revision>,
    /// Changes read but not yet published.
    staged: HashMap<RecordKey, Record>,
    /// The zxid of the barrier in flight.
    barrier: Option<Revision>,
    /// Publish at the next barrier even with nothing staged (after a re-read).
    want_barrier: bool,
}

impl Feed {
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

    /// What a watched path is: a directory, or a node in one.
    fn classify(&self, path: &str) -> Option<(Dir, Option<String>)> {
        for dir in self.dirs() {
            let prefix = self.dir(dir)?;
            if path == node_path(prefix) {
                return Some((dir, None));
            }
            if let Some(name) = path.strip_prefix(prefix)
                && !name.contains('/')
            {
                return Some((dir, Some(name.to_owned())));
            }
        }
        None
    }

    async fn run(mut self, shutdown: CancellationToken) {
        let mut reconcile = tokio::time::interval(self.settings.reconcile_interval);
        reconcile.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        reconcile.tick().await;
        let mut resync = true;
        loop {
            if self.overflow.swap(false, Ordering::SeqCst) {
                warn!("ZooKeeper event queue overflowed; re-reading everything");
                resync = true;
            }
            let step = async {
                if resync {
                    self.resync().await?;
                }
                if self.barrier.is_none() && (self.want_barrier || !self.staged.is_empty()) {
                    self.start_barrier().await?;
                }
                Ok::<(), StoreError>(())
            };
            match step.await {
                Ok(()) => {}
                Err(e) => {
                    warn!(error = %e, "ZooKeeper feed: will re-read");
                    resync = true;
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(RETRY_DELAY) => continue,
                    }
                }
            }
            let first = tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = reconcile.tick() => {
                    debug!("periodic reconcile");
                    resync = true;
                    continue;
                }
                event = self.events.recv() => event,
            };
            let Some(first) = first else { return };
            let mut batch = vec![first];
            while batch.len() < MAX_EVENTS_PER_ROUND {
                match self.events.try_recv() {
                    Ok(event) => batch.push(event),
                    Err(_) => break,
                }
            }
            match self.handle(batch).await {
                Ok(needs_resync) => resync = needs_resync,
                Err(e) => {
                    warn!(error = %e, "ZooKeeper feed: will re-read");
                    resync = true;
                }
            }
        }
    }

    /// Handles a round of events; `Ok(true)` when everything must be re-read.
    async fn handle(&mut self, batch: Vec<FeedEvent>) -> Result<bool, StoreError> {
        let mut reads: HashSet<RecordKey> = HashSet::new();
        let mut deleted: HashSet<RecordKey> = HashSet::new();
        let mut dirs: HashSet<Dir> = HashSet::new();
        let mut barrier_reached = false;
        for event in batch {
            let event = match event {
                FeedEvent::Connected => return Ok(true),
                FeedEvent::Node(event) => event,
            };
            let Some(path) = event.path else { continue };
            if path == self.barrier_path {
                if event.event_type == WatchedEventType::NodeDataChanged {
                    barrier_reached = true;
                }
                continue;
            }
            match (self.classify(&path), event.event_type) {
                (Some((dir, None)), WatchedEventType::NodeChildrenChanged) => {
                    dirs.insert(dir);
                }
                (Some((dir, Some(name))), WatchedEventType::NodeDeleted) => {
                    deleted.insert(Self::key(dir, name));
                }
                (Some((dir, Some(name))), _) => {
                    reads.insert(Self::key(dir, name));
                }
                _ => debug!(path, ?event.event_type, "ignored ZooKeeper event"),
            }
        }
        for dir in dirs {
            let (present, missing) = self.read_children(dir).await?;
            reads.extend(present.into_iter().filter(|k| !self.known.contains_key(k)));
            deleted.extend(missing);
        }
        deleted.extend(self.read_nodes(reads.into_iter().collect()).await?);
        self.stage_removals(deleted).await?;
        if barrier_reached && let Some(barrier) = self.barrier.take() {
            self.publish(barrier);
        }
        Ok(false)
    }

    /// Lists a directory (re-arming its child watch): the keys present, and the known keys
    /// that are gone.
    async fn read_children(
        &self,
        dir: Dir,
    ) -> Result<(Vec<RecordKey>, Vec<RecordKey>), StoreError> {
        let Some(prefix) = self.dir(dir) else {
            return Ok((Vec::new(), Vec::new()));
        };
        let path = node_path(prefix);
        let names = timed(
            self.settings.request_timeout,
            self.zk.get_children(path, true),
        )
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

    /// Reads nodes (re-arming their data watches) and stages what changed; returns the keys
    /// whose node is gone.
    async fn read_nodes(&mut self, keys: Vec<RecordKey>) -> Result<Vec<RecordKey>, StoreError> {
        let timeout = self.settings.request_timeout;
        let zk = Arc::clone(&self.zk);
        let reads: Vec<(RecordKey, Option<NodeRead>)> = stream::iter(keys.into_iter().map(|key| {
            let path = self.path_of(&key);
            let zk = Arc::clone(&zk);
            async move {
                let Some(path) = path else { return (key, None) };
                (key, Some(timed(timeout, zk.get_data(&path, true)).await))
            }
        }))
        .buffered(MAX_IN_FLIGHT)
        .collect()
        .await;
        let mut gone = Vec::new();
        for (key, result) in reads {
            match result {
                None => {}
                Some(Ok((data, stat))) => match parse_value(&data)
                    .filter(|v| !matches!(key, RecordKey::CaseIndex(_)) || validate_user(v).is_ok())
                {
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
                },
                Some(Err(ZkError::NoNode)) => gone.push(key),
                Some(Err(e)) => {
                    return Err(zk_error("get", &format!("{key:?}"), e));
                }
            }
        }
        Ok(gone)
    }

    /// Stages the removal of known keys, dated by their directory's last child change.
    async fn stage_removals(&mut self, keys: HashSet<RecordKey>) -> Result<(), StoreError> {
        let keys: Vec<RecordKey> = keys
            .into_iter()
            .filter(|k| self.known.contains_key(k))
            .collect();
        if keys.is_empty() {
            return Ok(());
        }
        let mut pzxid: HashMap<Dir, Revision> = HashMap::new();
        for key in keys {
            let dir = Self::dir_of(&key);
            let revision = match pzxid.get(&dir) {
                Some(r) => *r,
                None => {
                    let path = node_path(self.dir(dir).unwrap_or("/"));
                    let stat = timed(self.settings.request_timeout, self.zk.exists(path, false))
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
    fn publish(&mut self, barrier: Revision) {
        let ready: Vec<RecordKey> = self
            .staged
            .iter()
            .filter(|(_, r)| r.revision <= barrier)
            .map(|(k, _)| k.clone())
            .collect();
        let records: Vec<Record> = ready.iter().filter_map(|k| self.staged.remove(k)).collect();
        debug!(barrier, records = records.len(), "publishing");
        self.index.apply(records, barrier);
    }

    /// Re-reads every directory and node, re-arming every watch, and stages what changed.
    async fn resync(&mut self) -> Result<(), StoreError> {
        self.barrier = None;
        self.want_barrier = true;
        for dir in self.dirs() {
            let (present, missing) = self.read_children(dir).await?;
            let count = present.len();
            let gone = self.read_nodes(present).await?;
            self.stage_removals(missing.into_iter().chain(gone).collect())
                .await?;
            info!(?dir, nodes = count, "re-read a ZooKeeper directory");
        }
        Ok(())
    }

    /// Writes the barrier node with a watch on it; its event will say that every change below
    /// its zxid has been delivered.
    async fn start_barrier(&mut self) -> Result<(), StoreError> {
        let timeout = self.settings.request_timeout;
        let path = self.barrier_path.clone();
        let zk = &self.zk;
        let exists = timed(timeout, zk.exists(&path, true))
            .await
            .map_err(|e| zk_error("exists", &path, e))?;
        if exists.is_none() {
            create_if_absent(zk, &path, CreateMode::Ephemeral, timeout).await?;
            // The creation fired the exists watch; arm it again for the write below.
            timed(timeout, zk.exists(&path, true))
                .await
                .map_err(|e| zk_error("exists", &path, e))?;
        }
        let stat = timed(timeout, zk.set_data(&path, Vec::new(), None))
            .await
            .map_err(|e| zk_error("set", &path, e))?;
        self.barrier = Some(stat.mzxid as Revision);
        self.want_barrier = false;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn directory_settings_get_a_trailing_slash_and_bad_ones_are_refused() {
        assert_eq!(
            normalize_dir("/stratumSwitcher/btcbcc").as_deref(),
            Ok("/stratumSwitcher/btcbcc/")
        );
        assert_eq!(normalize_dir("/a/").as_deref(), Ok("/a/"));
        for bad in ["", "/", "relative/dir", "/a//b", "/a/../b", "/a/\0"] {
            assert!(normalize_dir(bad).is_err(), "{bad:?} must be refused");
        }
    }

    #[test]
    fn node_values_are_bounded_text() {
        assert_eq!(parse_value(b"btc").as_deref(), Some("btc"));
        assert_eq!(parse_value(b" bch\n").as_deref(), Some("bch"));
        assert_eq!(parse_value(b""), None);
        assert_eq!(parse_value(&[0xff, 0xfe]), None);
        assert_eq!(parse_value(b"a\0b"), None);
        assert_eq!(parse_value(&[b'x'; 200]), None);
    }
}
