//! Server-ID leases in ZooKeeper (SPEC §3 and §5), shared by every control replica and by the
//! Go proxies: a lease is an ephemeral node `ZKServerIDAssignDir` + ID, created by the replica
//! the proxy talks to, holding the proxy's metadata as JSON
//! (`{"ChainType","Coins","IPs","HostName","ListenAddr"}`, plus Switchyard's own fields:
//! `InstanceID`, `ReplicaID`, `SessionsByCoin`, `LastHeartbeat`). Creating the node is what
//! makes an ID unique: ZooKeeper lets one creator win.
//!
//! - A lease lives while its proxy renews it within the time to live (the grace period that
//!   covers a short control-plane hiccup) and while the replica's session lives; the replica
//!   deletes the nodes of leases that were not renewed.
//! - Nodes of old Go proxies, and of proxies leased through other replicas, are respected:
//!   their IDs are never handed out, and ListProxies shows them.
//! - After a session expiry the ephemeral nodes are gone: on every new connection the replica
//!   re-creates the nodes of its live leases. A node that someone else took meanwhile is a
//!   conflict: it is logged as an error and the lease dropped, so that the proxy's next renewal
//!   fails and it takes a new ID. An ID is never silently shared.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    sync::Arc,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use async_trait::async_trait;
use futures::{StreamExt, stream};
use prometheus_client::metrics::counter::Counter;
use serde::{Deserialize, Serialize};
use tokio::sync::{Mutex, Notify};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};
use zookeeper_async::{Acl, CreateMode, ZkError, ZkState, ZooKeeper};

use crate::store::zookeeper::{create_path, timed};

use super::{
    CHAIN_TYPES, LeaseError, ProxyDescription, ProxyLease, ServerIdLeases, check_request,
    check_sessions,
};

/// How often expired leases are looked for.
const SWEEP_INTERVAL: Duration = Duration::from_secs(1);
/// Lease nodes read at once for ListProxies.
const MAX_IN_FLIGHT: usize = 256;

/// A lease node's content. The first five fields are the Go proxies' format.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
struct LeaseNode {
    #[serde(rename = "ChainType")]
    chain_type: String,
    #[serde(rename = "Coins")]
    coins: Vec<String>,
    #[serde(rename = "IPs")]
    ips: Vec<String>,
    #[serde(rename = "HostName")]
    host_name: String,
    #[serde(rename = "ListenAddr")]
    listen_addr: String,
    #[serde(rename = "InstanceID", skip_serializing_if = "String::is_empty")]
    instance_id: String,
    #[serde(rename = "ReplicaID", skip_serializing_if = "String::is_empty")]
    replica_id: String,
    #[serde(rename = "SessionsByCoin")]
    sessions_by_coin: BTreeMap<String, u64>,
    #[serde(rename = "LastHeartbeat")]
    last_heartbeat: u64,
}

fn from_unix(seconds: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(seconds)
}

#[derive(Debug)]
struct Held {
    lease: ProxyLease,
    deadline: Instant,
}

/// Server-ID leases in ZooKeeper; see the module doc.
#[derive(Debug)]
pub struct ZkLeases {
    inner: Arc<Inner>,
}

struct Inner {
    zk: Arc<ZooKeeper>,
    /// Chain type → lease directory, with a trailing `/`.
    dirs: HashMap<String, String>,
    ttl: Duration,
    request_timeout: Duration,
    /// Identifies this replica in the nodes it creates.
    replica_id: String,
    /// The leases this replica created, by (chain type, server ID).
    held: Mutex<BTreeMap<(String, u8), Held>>,
    /// Counts requests and renewals refused because another proxy holds the ID.
    conflicts: Counter,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ZkLeases")
            .field("dirs", &self.dirs)
            .field("ttl", &self.ttl)
            .field("replica_id", &self.replica_id)
            .finish_non_exhaustive()
    }
}

fn unavailable(op: &str, path: &str, e: ZkError) -> LeaseError {
    LeaseError::Unavailable(format!("ZooKeeper {op} {path}: {e:?}"))
}

impl ZkLeases {
    /// Leases in `dirs` (chain type → directory with a trailing `/`, one for each of
    /// [`CHAIN_TYPES`]) on the session of `zk`, which must be connected. Creates the directories,
    /// and keeps sweeping expired leases and re-creating nodes after reconnects until
    /// `shutdown`. Counts lease conflicts (a preferred ID, a renewed one or one re-created
    /// after a session loss found held by another proxy) on `conflicts`.
    pub async fn start(
        zk: Arc<ZooKeeper>,
        dirs: HashMap<String, String>,
        ttl: Duration,
        request_timeout: Duration,
        conflicts: Counter,
        shutdown: CancellationToken,
    ) -> Result<Self, LeaseError> {
        for chain in CHAIN_TYPES {
            let dir = dirs.get(chain).ok_or_else(|| {
                LeaseError::Invalid(format!("no lease directory for chain type {chain}"))
            })?;
            create_path(&zk, dir, request_timeout)
                .await
                .map_err(|e| LeaseError::Unavailable(e.to_string()))?;
        }
        let inner = Arc::new(Inner {
            zk,
            dirs,
            ttl,
            request_timeout,
            replica_id: format!("{:016x}", rand::random::<u64>()),
            held: Mutex::new(BTreeMap::new()),
            conflicts,
        });
        let reconnected = Arc::new(Notify::new());
        {
            let reconnected = Arc::clone(&reconnected);
            inner.zk.add_listener(move |state| {
                if matches!(state, ZkState::Connected | ZkState::ConnectedReadOnly) {
                    reconnected.notify_one();
                }
            });
        }
        tokio::spawn(Arc::clone(&inner).maintain(reconnected, shutdown));
        Ok(Self { inner })
    }
}

impl Inner {
    fn dir(&self, chain_type: &str) -> Result<&str, LeaseError> {
        self.dirs
            .get(chain_type)
            .map(String::as_str)
            .ok_or_else(|| LeaseError::Invalid(format!("unknown chain type {chain_type:?}")))
    }

    fn node(&self, lease: &ProxyLease) -> Vec<u8> {
        let node = LeaseNode {
            chain_type: lease.proxy.chain_type.clone(),
            coins: lease.proxy.coins.clone(),
            ips: lease.proxy.ips.clone(),
            host_name: lease.proxy.host_name.clone(),
            listen_addr: lease.proxy.listen_addr.clone(),
            instance_id: lease.proxy.instance_id.clone(),
            replica_id: self.replica_id.clone(),
            sessions_by_coin: lease.sessions_by_coin.clone(),
            last_heartbeat: lease
                .last_heartbeat
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
        };
        serde_json::to_vec(&node).unwrap_or_default()
    }

    /// Creates a lease node; `Ok(false)` when someone else holds the ID.
    async fn create_node(&self, path: &str, data: Vec<u8>) -> Result<bool, LeaseError> {
        let created = self.zk.create(
            path,
            data,
            Acl::open_unsafe().clone(),
            CreateMode::Ephemeral,
        );
        match timed(self.request_timeout, created).await {
            Ok(_) => Ok(true),
            Err(ZkError::NodeExists) => Ok(false),
            Err(e) => Err(unavailable("create", path, e)),
        }
    }

    /// The proxy instance named in an existing lease node, if it can be read.
    async fn node_instance(&self, path: &str) -> Result<Option<String>, LeaseError> {
        match timed(self.request_timeout, self.zk.get_data(path, false)).await {
            Ok((data, _)) => Ok(serde_json::from_slice::<LeaseNode>(&data)
                .ok()
                .map(|n| n.instance_id)
                .filter(|i| !i.is_empty())),
            Err(ZkError::NoNode) => Ok(None),
            Err(e) => Err(unavailable("get", path, e)),
        }
    }

    /// Whether an existing node is this replica's own lease for `instance_id` (created in this
    /// same session before a reconnect).
    async fn is_ours(&self, path: &str, instance_id: &str) -> Result<bool, LeaseError> {
        match timed(self.request_timeout, self.zk.get_data(path, false)).await {
            Ok((data, _)) => Ok(serde_json::from_slice::<LeaseNode>(&data)
                .is_ok_and(|n| n.replica_id == self.replica_id && n.instance_id == instance_id)),
            Err(ZkError::NoNode) => Ok(false),
            Err(e) => Err(unavailable("get", path, e)),
        }
    }

    async fn acquire(
        &self,
        proxy: ProxyDescription,
        preferred: u32,
    ) -> Result<ProxyLease, LeaseError> {
        check_request(&proxy, preferred)?;
        let dir = self.dir(&proxy.chain_type)?.to_owned();
        let mut held = self.held.lock().await;
        let chain = proxy.chain_type.clone();
        let own: Vec<u8> = held
            .iter()
            .filter(|((c, _), h)| *c == chain && h.lease.proxy.instance_id == proxy.instance_id)
            .map(|((_, id), _)| *id)
            .collect();
        let preferred = u8::try_from(preferred).ok().filter(|&id| id != 0);
        // Already this instance's: keep it (acquiring is idempotent).
        if let Some(&id) = own.iter().find(|&&id| preferred.is_none_or(|p| p == id)) {
            let lease = self.refresh(&mut held, &chain, id, Some(proxy));
            return lease.ok_or_else(|| LeaseError::NotFound {
                chain_type: chain,
                server_id: u32::from(id),
            });
        }
        let path_dir = dir.trim_end_matches('/');
        let children = timed(self.request_timeout, self.zk.get_children(path_dir, false))
            .await
            .map_err(|e| unavailable("list", path_dir, e))?;
        let mut taken: BTreeSet<u8> = children.iter().filter_map(|c| c.parse().ok()).collect();
        // The preferred ID held by this same proxy instance through another replica (the proxy
        // failed over to this one): take the lease over, so the proxy keeps its ID.
        if let Some(id) = preferred.filter(|id| taken.contains(id)) {
            let path = format!("{dir}{id}");
            if self.node_instance(&path).await?.as_deref() == Some(proxy.instance_id.as_str()) {
                info!(chain_type = %chain, server_id = id, instance_id = %proxy.instance_id,
                    "taking over a proxy's lease from another replica");
                self.delete(&path).await;
                taken.remove(&id);
            }
        }
        // The preferred ID if free; else the one this instance holds; else the lowest free.
        let preferred_free = preferred.filter(|id| !taken.contains(id));
        if preferred.is_some() && preferred_free.is_none() {
            // Another proxy holds the ID this one asked for: it gets another one.
            self.conflicts.inc();
        }
        if preferred_free.is_none()
            && let Some(&id) = own.first()
        {
            let lease = self.refresh(&mut held, &chain, id, Some(proxy));
            return lease.ok_or_else(|| LeaseError::NotFound {
                chain_type: chain,
                server_id: u32::from(id),
            });
        }
        let candidates = preferred_free
            .into_iter()
            .chain((1..=255u8).filter(|id| !taken.contains(id)));
        let wall = SystemTime::now();
        for id in candidates {
            let lease = ProxyLease {
                server_id: id,
                proxy: proxy.clone(),
                sessions_by_coin: BTreeMap::new(),
                last_heartbeat: wall,
                expires: wall + self.ttl,
            };
            let path = format!("{dir}{id}");
            if self.create_node(&path, self.node(&lease)).await? {
                // One lease per instance and chain: give back any other this instance held.
                for old in own {
                    held.remove(&(chain.clone(), old));
                    self.delete(&format!("{dir}{old}")).await;
                }
                held.insert(
                    (chain.clone(), id),
                    Held {
                        lease: lease.clone(),
                        deadline: Instant::now() + self.ttl,
                    },
                );
                return Ok(lease);
            }
        }
        Err(LeaseError::Exhausted(chain))
    }

    /// Extends a held lease (updating its description when given) and returns it.
    fn refresh(
        &self,
        held: &mut BTreeMap<(String, u8), Held>,
        chain: &str,
        id: u8,
        proxy: Option<ProxyDescription>,
    ) -> Option<ProxyLease> {
        let h = held.get_mut(&(chain.to_owned(), id))?;
        let wall = SystemTime::now();
        h.deadline = Instant::now() + self.ttl;
        h.lease.last_heartbeat = wall;
        h.lease.expires = wall + self.ttl;
        if let Some(proxy) = proxy {
            h.lease.proxy = proxy;
        }
        Some(h.lease.clone())
    }

    async fn renew(
        &self,
        chain_type: &str,
        server_id: u32,
        instance_id: &str,
        sessions_by_coin: BTreeMap<String, u64>,
    ) -> Result<(), LeaseError> {
        check_sessions(chain_type, &sessions_by_coin)?;
        let not_found = || LeaseError::NotFound {
            chain_type: chain_type.to_owned(),
            server_id,
        };
        let id = u8::try_from(server_id).map_err(|_| not_found())?;
        let dir = self.dir(chain_type)?.to_owned();
        let mut held = self.held.lock().await;
        let key = (chain_type.to_owned(), id);
        let is_holder = held.get(&key).is_some_and(|h| {
            h.deadline > Instant::now() && h.lease.proxy.instance_id == instance_id
        });
        if !is_holder {
            return Err(not_found());
        }
        if let Some(h) = held.get_mut(&key) {
            h.lease.sessions_by_coin = sessions_by_coin;
        }
        let Some(lease) = self.refresh(&mut held, chain_type, id, None) else {
            return Err(not_found());
        };
        let path = format!("{dir}{id}");
        let data = self.node(&lease);
        match timed(
            self.request_timeout,
            self.zk.set_data(&path, data.clone(), None),
        )
        .await
        {
            Ok(_) => Ok(()),
            // The node is gone (the session expired and the re-creation has not run yet): take
            // it again if it is still free.
            Err(ZkError::NoNode) => {
                if self.create_node(&path, data).await? || self.is_ours(&path, instance_id).await? {
                    Ok(())
                } else {
                    self.conflicts.inc();
                    error!(
                        chain_type,
                        server_id,
                        instance_id,
                        "server ID taken by another proxy while its lease node was gone; lease dropped"
                    );
                    held.remove(&key);
                    Err(not_found())
                }
            }
            Err(e) => Err(unavailable("set", &path, e)),
        }
    }

    async fn delete(&self, path: &str) {
        match timed(self.request_timeout, self.zk.delete(path, None)).await {
            Ok(()) | Err(ZkError::NoNode) => {}
            Err(e) => {
                warn!(path, error = ?e, "could not delete a lease node; it goes with the session")
            }
        }
    }

    async fn release(&self, chain_type: &str, server_id: u32, instance_id: &str) {
        let (Ok(id), Ok(dir)) = (u8::try_from(server_id), self.dir(chain_type)) else {
            return;
        };
        let mut held = self.held.lock().await;
        let key = (chain_type.to_owned(), id);
        if held
            .get(&key)
            .is_some_and(|h| h.lease.proxy.instance_id == instance_id)
        {
            held.remove(&key);
            self.delete(&format!("{dir}{id}")).await;
        }
    }

    async fn live(&self) -> Result<Vec<ProxyLease>, LeaseError> {
        let mut dirs: Vec<(&String, &String)> = self.dirs.iter().collect();
        dirs.sort();
        let mut paths: Vec<(String, u8)> = Vec::new();
        let mut seen_dirs = BTreeSet::new();
        for (_, dir) in dirs {
            if !seen_dirs.insert(dir.clone()) {
                continue;
            }
            let path = dir.trim_end_matches('/');
            let children = timed(self.request_timeout, self.zk.get_children(path, false))
                .await
                .map_err(|e| unavailable("list", path, e))?;
            paths.extend(
                children
                    .into_iter()
                    .filter_map(|c| c.parse::<u8>().ok().map(|id| (format!("{dir}{c}"), id))),
            );
        }
        let timeout = self.request_timeout;
        let zk = &self.zk;
        let nodes: Vec<Option<(u8, LeaseNode)>> = stream::iter(paths)
            .map(|(path, id)| async move {
                match timed(timeout, zk.get_data(&path, false)).await {
                    Ok((data, _)) => match serde_json::from_slice::<LeaseNode>(&data) {
                        Ok(node) => Some((id, node)),
                        Err(e) => {
                            warn!(path, error = %e, "a lease node is not the expected JSON");
                            None
                        }
                    },
                    Err(_) => None,
                }
            })
            .buffered(MAX_IN_FLIGHT)
            .collect()
            .await;
        let held = self.held.lock().await;
        let mut leases: Vec<ProxyLease> = nodes
            .into_iter()
            .flatten()
            .map(|(id, node)| {
                if let Some(h) = held.get(&(node.chain_type.clone(), id))
                    && node.replica_id == self.replica_id
                {
                    return h.lease.clone();
                }
                let heartbeat = from_unix(node.last_heartbeat);
                ProxyLease {
                    server_id: id,
                    sessions_by_coin: node.sessions_by_coin,
                    last_heartbeat: heartbeat,
                    expires: if node.last_heartbeat == 0 {
                        UNIX_EPOCH
                    } else {
                        heartbeat + self.ttl
                    },
                    proxy: ProxyDescription {
                        chain_type: node.chain_type,
                        instance_id: node.instance_id,
                        coins: node.coins,
                        ips: node.ips,
                        host_name: node.host_name,
                        listen_addr: node.listen_addr,
                    },
                }
            })
            .collect();
        leases.sort_by(|a, b| {
            (&a.proxy.chain_type, a.server_id).cmp(&(&b.proxy.chain_type, b.server_id))
        });
        Ok(leases)
    }

    /// Deletes expired leases, and re-creates lease nodes after every reconnect.
    async fn maintain(self: Arc<Self>, reconnected: Arc<Notify>, shutdown: CancellationToken) {
        let mut sweep = tokio::time::interval(SWEEP_INTERVAL);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = sweep.tick() => self.sweep().await,
                _ = reconnected.notified() => self.recreate().await,
            }
        }
    }

    async fn sweep(&self) {
        let now = Instant::now();
        let mut held = self.held.lock().await;
        let expired: Vec<(String, u8)> = held
            .iter()
            .filter(|(_, h)| h.deadline <= now)
            .map(|(k, _)| k.clone())
            .collect();
        for (chain, id) in expired {
            if let Some(h) = held.remove(&(chain.clone(), id)) {
                info!(chain_type = %chain, server_id = id, instance_id = %h.lease.proxy.instance_id, "lease expired without renewal");
            }
            if let Ok(dir) = self.dir(&chain) {
                self.delete(&format!("{dir}{id}")).await;
            }
        }
    }

    /// Makes sure every live lease still has its node (after a session expiry they are gone).
    async fn recreate(&self) {
        let mut held = self.held.lock().await;
        let keys: Vec<(String, u8)> = held.keys().cloned().collect();
        for (chain, id) in keys {
            let Ok(dir) = self.dir(&chain) else { continue };
            let path = format!("{dir}{id}");
            let Some(h) = held.get(&(chain.clone(), id)) else {
                continue;
            };
            let instance = h.lease.proxy.instance_id.clone();
            let data = self.node(&h.lease);
            let outcome = match self.create_node(&path, data).await {
                Ok(true) => Ok(true),
                Ok(false) => self.is_ours(&path, &instance).await,
                Err(e) => Err(e),
            };
            match outcome {
                Ok(true) => {}
                Ok(false) => {
                    self.conflicts.inc();
                    error!(
                        chain_type = %chain,
                        server_id = id,
                        instance_id = %instance,
                        "server ID conflict: another proxy took this ID while the lease node was gone; the lease is dropped and the proxy must take a new one"
                    );
                    held.remove(&(chain, id));
                }
                Err(e) => {
                    warn!(error = %e, "could not re-create lease nodes; will retry on the next reconnect or renewal");
                    return;
                }
            }
        }
    }
}

#[async_trait]
impl ServerIdLeases for ZkLeases {
    async fn acquire(
        &self,
        proxy: ProxyDescription,
        preferred: u32,
    ) -> Result<ProxyLease, LeaseError> {
        self.inner.acquire(proxy, preferred).await
    }

    async fn renew(
        &self,
        chain_type: &str,
        server_id: u32,
        instance_id: &str,
        sessions_by_coin: BTreeMap<String, u64>,
    ) -> Result<(), LeaseError> {
        self.inner
            .renew(chain_type, server_id, instance_id, sessions_by_coin)
            .await
    }

    async fn release(&self, chain_type: &str, server_id: u32, instance_id: &str) {
        self.inner.release(chain_type, server_id, instance_id).await
    }

    async fn live(&self) -> Result<Vec<ProxyLease>, LeaseError> {
        self.inner.live().await
    }

    fn ttl(&self) -> Duration {
        self.inner.ttl
    }
}
