//! The ZooKeeper store: the user→coin state in the znode layout of SPEC §5, shared with the Go
//! switcher's programs and btcpool's sservers, for fleets with several control replicas.
//!
//! - `ZKSwitcherWatchDir` + name holds a user's coin; `ZKUserCaseInsensitiveIndex` + lowercase
//!   name holds the canonical name. A record's revision is its znode's modification zxid, one
//!   order shared by every replica.
//! - Two ZooKeeper sessions ([`crate::zk_session`] says which does what and why): the main one
//!   (zookeeper-async, handed in) makes single writes (switches, markers); the batch session
//!   (zookeeper-client, `zookeeper/session.rs`) makes `multi` and `multiRead` requests and
//!   holds the persistent recursive watches. The store is available while the main session is
//!   connected and the feed (once started) is watching.
//! - Switchyard's own state is scoped to its deployment: [`ZkSettings::deployment_dir`]
//!   (`ZKSwitchyardDir` + the watch directory's path) holds `pending/<user>` (held-back switches,
//!   each naming the watch directory it was written for: a record naming another is never
//!   taken), `seen/<coin>/<user>` (first-seen times, for the safety period) and
//!   `markers/<name>` (the scheduled pull's position). Two deployments on one ensemble with
//!   different watch directories never touch each other's records.
//! - Writes are pipelined: a batch puts every request on the session at once.
//! - Creating absent nodes ([`UserCoinStore::create_if_absent`], user-list ingestion) batches
//!   up to 1,000 creates into one `multi` transaction, several in flight. A transaction fails
//!   whole when one of its nodes exists; the store then records that node as existing and
//!   tries the rest again, and after a few such failures creates the rest one by one, so every
//!   write still gets its exact outcome (created, or already there). Nodes the index already
//!   knows are created one by one from the start, as they most likely exist.
//! - Every writer counts (other replicas, zkCli, the Go API server): the store's feed
//!   (`zookeeper/feed.rs`) follows the directories with persistent recursive watches and emits
//!   each change on the store's change stream in zxid order (known from the zxids its reads
//!   answer, without a write of its own), re-reading everything after any session trouble and
//!   every `ZKReconcileSeconds`.

mod feed;
mod pending;
mod session;

use std::{
    collections::HashSet,
    future::Future,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use async_trait::async_trait;
use futures::{StreamExt, stream};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use zookeeper_async::{Acl, CreateMode, ZkError, ZooKeeper};
use zookeeper_client as zk;

use self::{
    feed::Feed,
    session::{BatchSession, persistent},
};
use super::{
    CHANGE_BUFFER, ChangeReceiver, HoldSwitch, KeyPresence, PendingOutcome, PendingSwitch, Record,
    RecordKey, Revision, StoreError, StoreWrite, UserCoinStore,
};
use crate::{validate::validate_user, zk_session::ZkSession};

/// Requests one batch puts on the session at once.
const MAX_IN_FLIGHT: usize = 2_000;
/// Creates in one `multi` transaction, at most.
const MULTI_OPS: usize = 1_000;
/// Bytes of node paths and values in one `multi` transaction, about, at most: ZooKeeper drops
/// the connection of a request over its `jute.maxbuffer` (1 MiB by default).
const MULTI_BYTES: usize = 256 * 1024;
/// Held-back switches applied at once (each a `multi` of its own).
const APPLY_IN_FLIGHT: usize = 256;
/// `multi` transactions in flight at once.
const MULTIS_IN_FLIGHT: usize = 4;
/// Transactions tried for one batch of creates before the rest is created node by node.
const MULTI_ATTEMPTS: usize = 3;
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
    /// This deployment's own nodes: `switchyard_dir` + the watch directory's path (without its
    /// leading `/`), with a trailing `/`; see the module doc.
    pub deployment_dir: String,
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

/// The user→coin state in ZooKeeper; see the module doc.
pub struct ZooKeeperStore {
    zk: Arc<ZooKeeper>,
    settings: Arc<ZkSettings>,
    store_id: String,
    /// The batch session: `multi` creates and the feed.
    batch: Arc<BatchSession>,
    available: watch::Receiver<bool>,
    /// Whether the main session is connected; part of `available`.
    main_up: watch::Receiver<bool>,
    /// Whether the feed is watching (`true` until it is started); part of `available`.
    feed_up: watch::Sender<bool>,
    /// Whether the feed was started ([`UserCoinStore::changes`] starts it once).
    followed: AtomicBool,
    /// The consumer's view of which records exist, once the changes are followed: a write to
    /// a new user creates at once instead of failing a set first.
    presence: std::sync::OnceLock<Arc<dyn KeyPresence>>,
    /// Coins whose first-seen directory is known to exist.
    seen_dirs: std::sync::Mutex<HashSet<String>>,
    /// Counts the feed's re-reads of the whole state after its first.
    reconciles: prometheus_client::metrics::counter::Counter,
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
    /// Opens the store on the main session `main`: opens the batch session and creates the
    /// directories the store uses.
    pub async fn connect(settings: ZkSettings, main: &ZkSession) -> Result<Self, StoreError> {
        let zk = main.client();
        let main_up = main.up();
        let connect_string = main.brokers().to_owned();
        let timeout = settings.request_timeout;
        let mut dirs = vec![
            settings.switcher_dir.clone(),
            format!("{}barriers/", settings.switchyard_dir),
            format!("{}pending/", settings.deployment_dir),
            format!("{}seen/", settings.deployment_dir),
            format!("{}markers/", settings.deployment_dir),
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
        let (feed_up, feed_rx) = watch::channel(true);
        let available = both_up(main_up.clone(), feed_rx);
        let batch = BatchSession::connect(
            connect_string.clone(),
            settings.session_timeout,
            timeout,
            barrier_path,
        )
        .await?;
        info!(brokers = %connect_string, watch_dir, %store_id, "connected to ZooKeeper");
        Ok(Self {
            zk,
            settings: Arc::new(settings),
            store_id,
            batch: Arc::new(batch),
            available,
            main_up,
            feed_up,
            followed: AtomicBool::new(false),
            presence: std::sync::OnceLock::new(),
            seen_dirs: std::sync::Mutex::new(HashSet::new()),
            reconciles: Default::default(),
        })
    }

    /// Counts the feed's re-reads of the whole state (after a reconnect, an error, or every
    /// `ZKReconcileSeconds`; not its first read) on `reconciles`.
    pub fn with_reconcile_counter(
        mut self,
        reconciles: prometheus_client::metrics::counter::Counter,
    ) -> Self {
        self.reconciles = reconciles;
        self
    }

    fn pending_path(&self, user: &str) -> String {
        format!("{}pending/{user}", self.settings.deployment_dir)
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

    /// Whether the index (once followed) holds the record, so that its node most likely
    /// exists.
    fn likely_exists(&self, key: &RecordKey) -> bool {
        self.presence.get().is_some_and(|p| p.contains(key))
    }

    /// Creates nodes one request each, pipelined, on the batch session.
    async fn create_each(&self, client: &zk::Client, nodes: Vec<NewNode>) -> Vec<Placed> {
        let timeout = self.settings.request_timeout;
        stream::iter(nodes)
            .map(|node| async move {
                let created = session::timed(
                    timeout,
                    client.create(&node.path, node.value.as_bytes(), &persistent()),
                )
                .await;
                let outcome = match created {
                    Ok((stat, _)) => Ok(Some(Record {
                        key: node.key,
                        value: Some(node.value),
                        revision: stat.mzxid as Revision,
                    })),
                    Err(zk::Error::NodeExists) => Ok(None),
                    Err(e) => Err(session::zk_error("create", &node.path, e)),
                };
                (node.at, outcome)
            })
            .buffered(MAX_IN_FLIGHT)
            .collect()
            .await
    }

    /// Creates a batch of nodes in `multi` transactions (see the module doc). Each transaction
    /// also writes this replica's barrier node, whose new stat carries the transaction's zxid:
    /// the revision of every node it created.
    async fn create_batch(&self, client: &zk::Client, mut nodes: Vec<NewNode>) -> Vec<Placed> {
        let mut placed = Vec::with_capacity(nodes.len());
        let barrier = self.batch.barrier_path();
        for _ in 0..MULTI_ATTEMPTS {
            if nodes.len() < 2 {
                break;
            }
            let mut writer = client.new_multi_writer();
            let added = nodes
                .iter()
                .try_for_each(|n| writer.add_create(&n.path, n.value.as_bytes(), &persistent()))
                .and_then(|()| writer.add_set_data(barrier, b"", None));
            if added.is_err() {
                // A path the client refuses: let each node get its own answer.
                break;
            }
            let committed = tokio::time::timeout(self.settings.request_timeout, writer.commit())
                .await
                .unwrap_or(Err(zk::MultiWriteError::RequestFailed {
                    source: zk::Error::ConnectionLoss,
                }));
            match committed {
                Ok(results) => {
                    let revision = match results.last() {
                        Some(zk::MultiWriteResult::SetData { stat })
                            if results.len() == nodes.len() + 1 =>
                        {
                            stat.mzxid as Revision
                        }
                        _ => {
                            let e = StoreError::Unavailable(format!(
                                "ZooKeeper multi answered {} results for {} operations",
                                results.len(),
                                nodes.len() + 1
                            ));
                            placed.extend(nodes.into_iter().map(|n| (n.at, Err(e.clone()))));
                            return placed;
                        }
                    };
                    placed.extend(nodes.into_iter().map(|n| {
                        let record = Record {
                            key: n.key,
                            value: Some(n.value),
                            revision,
                        };
                        (n.at, Ok(Some(record)))
                    }));
                    return placed;
                }
                Err(zk::MultiWriteError::OperationFailed {
                    index,
                    source: zk::Error::NodeExists,
                }) if index < nodes.len() => {
                    // It exists: that is its outcome. The others did not fail: try them again.
                    let existing = nodes.remove(index);
                    placed.push((existing.at, Ok(None)));
                }
                Err(zk::MultiWriteError::OperationFailed {
                    index,
                    source: zk::Error::NoNode,
                }) if index == nodes.len() => {
                    // The barrier node is gone (the session was new, or someone deleted it).
                    if let Err(e) = self.batch.create_barrier(client).await {
                        placed.extend(nodes.into_iter().map(|n| (n.at, Err(e.clone()))));
                        return placed;
                    }
                }
                Err(zk::MultiWriteError::OperationFailed { .. }) => break,
                Err(zk::MultiWriteError::RequestFailed { source }) => {
                    let e = session::zk_error("multi", &nodes[0].path, source);
                    placed.extend(nodes.into_iter().map(|n| (n.at, Err(e.clone()))));
                    return placed;
                }
            }
        }
        placed.extend(self.create_each(client, nodes).await);
        placed
    }

    async fn write_one(&self, write: StoreWrite) -> Result<Record, StoreError> {
        let (key, value, path) = self.target(write)?;
        let likely_new = match (&key, self.presence.get()) {
            (RecordKey::User(_), Some(presence)) => !presence.contains(&key),
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
    fn store_id(&self) -> &str {
        &self.store_id
    }

    async fn read_fresh(&self, key: &RecordKey) -> Result<Option<Record>, StoreError> {
        let Some(path) = self.path_of(key) else {
            return Ok(None);
        };
        // `sync` and the read on one session: the read then sees every write the leader had
        // committed when the sync reached it, whichever client made it.
        let client = self.batch.client().await?;
        let timeout = self.settings.request_timeout;
        session::timed(timeout, client.sync(&path))
            .await
            .map_err(|e| session::zk_error("sync", &path, e))?;
        match session::timed(timeout, client.get_data(&path)).await {
            Ok((data, stat)) => Ok(parse_value(&data).map(|value| Record {
                key: key.clone(),
                value: Some(value),
                revision: stat.mzxid as Revision,
            })),
            Err(zk::Error::NoNode) => Ok(None),
            Err(e) => Err(session::zk_error("get", &path, e)),
        }
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
        let mut outcomes: Vec<Option<Result<Option<Record>, StoreError>>> =
            (0..writes.len()).map(|_| None).collect();
        // New nodes go into transactions; nodes the index knows are created one by one (they
        // most likely exist); a second write to the same node waits until the first is done.
        let mut batched = Vec::new();
        let mut single = Vec::new();
        let mut repeated = Vec::new();
        let mut seen = HashSet::new();
        for (at, write) in writes.into_iter().enumerate() {
            match self.target(write) {
                Err(e) => outcomes[at] = Some(Err(e)),
                Ok((key, value, path)) => {
                    let first = seen.insert(path.clone());
                    let node = NewNode {
                        at,
                        key,
                        value,
                        path,
                    };
                    if !first {
                        repeated.push(node);
                    } else if self.likely_exists(&node.key) {
                        single.push(node);
                    } else {
                        batched.push(node);
                    }
                }
            }
        }
        let placed: Vec<Placed> = match self.batch.client().await {
            Err(e) => batched
                .into_iter()
                .chain(single)
                .chain(repeated)
                .map(|n| (n.at, Err(e.clone())))
                .collect(),
            Ok(client) => {
                let client = &client;
                let (batches, singles) = futures::join!(
                    stream::iter(multi_batches(batched))
                        .map(|batch| self.create_batch(client, batch))
                        .buffered(MULTIS_IN_FLIGHT)
                        .collect::<Vec<_>>(),
                    self.create_each(client, single),
                );
                let mut placed: Vec<Placed> = batches.into_iter().flatten().collect();
                placed.extend(singles);
                placed.extend(self.create_each(client, repeated).await);
                placed
            }
        };
        for (at, outcome) in placed {
            if let Some(slot) = outcomes.get_mut(at) {
                *slot = Some(outcome);
            }
        }
        outcomes
            .into_iter()
            .map(|o| {
                o.unwrap_or_else(|| {
                    Err(StoreError::Unavailable(
                        "a create got no outcome from ZooKeeper".into(),
                    ))
                })
            })
            .collect()
    }

    fn changes(
        &self,
        presence: Arc<dyn KeyPresence>,
        shutdown: CancellationToken,
    ) -> Result<ChangeReceiver, StoreError> {
        if self.followed.swap(true, Ordering::SeqCst) {
            return Err(StoreError::Unavailable(
                "the ZooKeeper store's changes were already started".into(),
            ));
        }
        let _ = self.presence.set(presence);
        let (tx, rx) = tokio::sync::mpsc::channel(CHANGE_BUFFER);
        // The feed's first publication follows its first full read: the whole state.
        let feed = Feed::new(
            Arc::clone(&self.batch),
            Arc::clone(&self.settings),
            tx,
            self.feed_up.clone(),
        )
        .counting_reconciles(self.reconciles.clone());
        tokio::spawn(feed.run(shutdown));
        Ok(rx)
    }

    fn available(&self) -> watch::Receiver<bool> {
        self.available.clone()
    }

    fn parts(&self) -> Vec<(&'static str, watch::Receiver<bool>)> {
        vec![
            ("switchyard.zookeeper.main", self.main_up.clone()),
            ("switchyard.zookeeper.batch", self.feed_up.subscribe()),
        ]
    }

    fn kind(&self) -> &'static str {
        "zookeeper"
    }

    async fn put_pending(
        &self,
        switches: Vec<HoldSwitch>,
    ) -> Vec<Result<PendingSwitch, StoreError>> {
        self.put_pending_batch(switches).await
    }

    async fn cancel_pending(&self, users: Vec<String>) -> Result<(), StoreError> {
        let timeout = self.settings.request_timeout;
        let results: Vec<Result<(), StoreError>> = stream::iter(users)
            .map(|user| async move {
                let path = self.pending_path(&user);
                match self.read_pending(&user).await? {
                    // Only this deployment's records are taken.
                    None => Ok(()),
                    Some((_, version)) => {
                        match timed(timeout, self.zk.delete(&path, Some(version))).await {
                            Ok(()) | Err(ZkError::NoNode | ZkError::BadVersion) => Ok(()),
                            Err(e) => Err(zk_error("delete", &path, e)),
                        }
                    }
                }
            })
            .buffer_unordered(MAX_IN_FLIGHT)
            .collect()
            .await;
        results.into_iter().collect()
    }

    async fn apply_pending(
        &self,
        pending: Vec<PendingSwitch>,
    ) -> Vec<Result<PendingOutcome, StoreError>> {
        // Each is its own `multi` (conditional on its user's node); in flight together.
        stream::iter(pending)
            .map(|p| async move { self.apply_pending_once(&p).await })
            .buffered(APPLY_IN_FLIGHT)
            .collect()
            .await
    }

    async fn pending(&self, user: &str) -> Result<Option<PendingSwitch>, StoreError> {
        Ok(self.read_pending(user).await?.map(|(p, _)| p))
    }

    async fn all_pending(&self) -> Result<Vec<PendingSwitch>, StoreError> {
        let dir = format!("{}pending", self.settings.deployment_dir);
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
            match r {
                Ok(Some((p, _))) => out.push(p),
                Ok(None) => {}
                Err(e) => warn!(error = %e, "skipped a pending switch that could not be read"),
            }
        }
        Ok(out)
    }

    async fn first_seen(
        &self,
        coin: &str,
        users: Vec<String>,
    ) -> Result<Vec<Option<u64>>, StoreError> {
        self.read_first_seen(coin, users).await
    }

    async fn record_first_seen(
        &self,
        coin: &str,
        users: Vec<String>,
        seen_at: u64,
    ) -> Result<(), StoreError> {
        self.write_first_seen(coin, users, seen_at).await
    }

    async fn get_marker(&self, name: &str) -> Result<Option<String>, StoreError> {
        let path = format!("{}markers/{name}", self.settings.deployment_dir);
        match timed(
            self.settings.request_timeout,
            self.zk.get_data(&path, false),
        )
        .await
        {
            Ok((data, _)) => Ok(parse_value(&data)),
            Err(ZkError::NoNode) => Ok(None),
            Err(e) => Err(zk_error("get", &path, e)),
        }
    }

    async fn set_marker(&self, name: &str, value: &str) -> Result<(), StoreError> {
        let path = format!("{}markers/{name}", self.settings.deployment_dir);
        self.put(&path, value.as_bytes(), false).await.map(|_| ())
    }
}

/// A flag that is up while both `a` and `b` are, kept up to date by a task that ends when
/// either sender is gone.
fn both_up(mut a: watch::Receiver<bool>, mut b: watch::Receiver<bool>) -> watch::Receiver<bool> {
    let (tx, rx) = watch::channel(*a.borrow() && *b.borrow());
    tokio::spawn(async move {
        loop {
            let up = *a.borrow_and_update() && *b.borrow_and_update();
            tx.send_if_modified(|v| std::mem::replace(v, up) != up);
            let changed = tokio::select! {
                r = a.changed() => r,
                r = b.changed() => r,
            };
            if changed.is_err() {
                return;
            }
        }
    });
    rx
}

/// A node to create, and where its write stands in the caller's list.
struct NewNode {
    at: usize,
    key: RecordKey,
    value: String,
    path: String,
}

/// A create's outcome, and where its write stands in the caller's list.
type Placed = (usize, Result<Option<Record>, StoreError>);

/// Splits creates into transactions of at most [`MULTI_OPS`] nodes and about [`MULTI_BYTES`].
fn multi_batches(nodes: Vec<NewNode>) -> Vec<Vec<NewNode>> {
    /// What one create adds to a request besides its path and value (headers, ACL).
    const OVERHEAD: usize = 64;
    let mut batches = Vec::new();
    let mut batch = Vec::new();
    let mut bytes = 0;
    for node in nodes {
        let size = node.path.len() + node.value.len() + OVERHEAD;
        if !batch.is_empty() && (batch.len() >= MULTI_OPS || bytes + size > MULTI_BYTES) {
            batches.push(std::mem::take(&mut batch));
            bytes = 0;
        }
        bytes += size;
        batch.push(node);
    }
    if !batch.is_empty() {
        batches.push(batch);
    }
    batches
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
