//! Proxy server-ID leases (SPEC §3): each live proxy holds a server ID (1..255) that no other
//! live proxy of its chain type holds, and renews it with a heartbeat that also reports its
//! session counts (what ListProxies shows).
//!
//! A lease that is not renewed within its time to live is released. A proxy that restarts and
//! asks for its previous ID gets it back when it is free.
//!
//! [`ServerIdLeases`] is the registry; [`LocalLeases`] keeps leases in the control process (the
//! embedded store, a single node), [`zookeeper::ZkLeases`] in ZooKeeper's `ZKServerIDAssignDir`
//! as ephemeral nodes, shared by every replica and by the Go proxies.

pub mod zookeeper;

use std::{
    collections::{BTreeMap, HashMap},
    sync::Mutex,
    time::{Duration, Instant, SystemTime},
};

use async_trait::async_trait;
use prometheus_client::metrics::counter::Counter;
use thiserror::Error;

/// The chain types a proxy may run (SPEC §1).
pub const CHAIN_TYPES: [&str; 4] = ["bitcoin", "decred-normal", "decred-gominer", "ethereum"];

/// Bounds on what a proxy may report, so that a faulty one cannot grow the registry without end.
const MAX_LIST_ITEMS: usize = 64;
const MAX_TEXT_BYTES: usize = 256;

/// What a proxy tells about itself when it takes a lease.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProxyDescription {
    /// The chain type: one of [`CHAIN_TYPES`].
    pub chain_type: String,
    /// The proxy's random identity for this process run.
    pub instance_id: String,
    /// The coins it has an upstream for.
    pub coins: Vec<String>,
    /// Its IP addresses.
    pub ips: Vec<String>,
    /// Its host name.
    pub host_name: String,
    /// The address miners connect to.
    pub listen_addr: String,
}

/// A live proxy as the registry knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyLease {
    /// The leased server ID.
    pub server_id: u8,
    /// What the proxy told about itself.
    pub proxy: ProxyDescription,
    /// Sessions by coin at its last heartbeat.
    pub sessions_by_coin: BTreeMap<String, u64>,
    /// When it last renewed.
    pub last_heartbeat: SystemTime,
    /// When the lease ends unless renewed.
    pub expires: SystemTime,
}

/// Why a lease call failed.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum LeaseError {
    /// The request is malformed.
    #[error("{0}")]
    Invalid(String),
    /// Every server ID of the chain type is held by a live proxy.
    #[error("all 255 server IDs of chain type {0:?} are leased")]
    Exhausted(String),
    /// The registry cannot be reached right now.
    #[error("lease registry unavailable: {0}")]
    Unavailable(String),
    /// The lease does not exist (expired, released, or never taken) or belongs to another
    /// instance.
    #[error(
        "no lease of server ID {server_id} for chain type {chain_type:?} held by this instance"
    )]
    NotFound {
        /// The chain type asked about.
        chain_type: String,
        /// The server ID asked about.
        server_id: u32,
    },
}

/// The server-ID lease registry; see the module doc.
#[async_trait]
pub trait ServerIdLeases: Send + Sync + std::fmt::Debug + 'static {
    /// Takes a lease: the preferred ID when it is free (or already this instance's), otherwise
    /// the ID this instance already holds, otherwise the lowest free one.
    async fn acquire(
        &self,
        proxy: ProxyDescription,
        preferred: u32,
    ) -> Result<ProxyLease, LeaseError>;

    /// Renews a lease and records the proxy's session counts.
    async fn renew(
        &self,
        chain_type: &str,
        server_id: u32,
        instance_id: &str,
        sessions_by_coin: BTreeMap<String, u64>,
    ) -> Result<(), LeaseError>;

    /// Gives a lease back; a lease that is gone, or held by another instance, is left alone.
    async fn release(&self, chain_type: &str, server_id: u32, instance_id: &str);

    /// The live leases, by chain type then server ID.
    async fn live(&self) -> Result<Vec<ProxyLease>, LeaseError>;

    /// The time to live of a lease.
    fn ttl(&self) -> Duration;
}

/// Checks what a proxy says about itself.
pub fn check_request(proxy: &ProxyDescription, preferred: u32) -> Result<(), LeaseError> {
    check_chain(&proxy.chain_type)?;
    check_text("instance_id", &proxy.instance_id, true)?;
    check_text("host_name", &proxy.host_name, false)?;
    check_text("listen_addr", &proxy.listen_addr, false)?;
    check_list("coins", &proxy.coins)?;
    check_list("ips", &proxy.ips)?;
    if preferred > 255 {
        return Err(LeaseError::Invalid(format!(
            "preferred_server_id {preferred} is outside 1..255"
        )));
    }
    Ok(())
}

/// Checks a heartbeat's session counts.
pub fn check_sessions(
    chain_type: &str,
    sessions_by_coin: &BTreeMap<String, u64>,
) -> Result<(), LeaseError> {
    check_chain(chain_type)?;
    if sessions_by_coin.len() > MAX_LIST_ITEMS {
        return Err(LeaseError::Invalid(format!(
            "sessions_by_coin has {} entries; at most {MAX_LIST_ITEMS} are allowed",
            sessions_by_coin.len()
        )));
    }
    for coin in sessions_by_coin.keys() {
        check_text("sessions_by_coin key", coin, true)?;
    }
    Ok(())
}

#[derive(Debug)]
struct Held {
    lease: ProxyLease,
    deadline: Instant,
}

/// Server-ID leases in the control process; see the module doc.
#[derive(Debug)]
pub struct LocalLeases {
    ttl: Duration,
    by_chain: Mutex<HashMap<String, BTreeMap<u8, Held>>>,
    /// Counts requests and renewals refused because another proxy holds the ID.
    conflicts: Counter,
}

fn check_text(what: &str, value: &str, required: bool) -> Result<(), LeaseError> {
    if required && value.is_empty() {
        return Err(LeaseError::Invalid(format!("{what} is empty")));
    }
    if value.len() > MAX_TEXT_BYTES {
        return Err(LeaseError::Invalid(format!(
            "{what} is longer than {MAX_TEXT_BYTES} bytes"
        )));
    }
    if value.chars().any(char::is_control) {
        return Err(LeaseError::Invalid(format!(
            "{what} contains a control character"
        )));
    }
    Ok(())
}

fn check_chain(chain_type: &str) -> Result<(), LeaseError> {
    if CHAIN_TYPES.contains(&chain_type) {
        Ok(())
    } else {
        Err(LeaseError::Invalid(format!(
            "chain type {:?} is not one of {CHAIN_TYPES:?}",
            chain_type.chars().take(32).collect::<String>()
        )))
    }
}

fn check_list(what: &str, values: &[String]) -> Result<(), LeaseError> {
    if values.len() > MAX_LIST_ITEMS {
        return Err(LeaseError::Invalid(format!(
            "{what} has {} entries; at most {MAX_LIST_ITEMS} are allowed",
            values.len()
        )));
    }
    values.iter().try_for_each(|v| check_text(what, v, true))
}

impl LocalLeases {
    /// A registry whose leases live `ttl` without a renewal.
    pub fn new(ttl: Duration) -> Self {
        Self {
            ttl,
            by_chain: Mutex::new(HashMap::new()),
            conflicts: Counter::default(),
        }
    }

    /// Counts lease conflicts (a preferred ID or a renewed one held by another proxy) on
    /// `conflicts`.
    pub fn with_conflict_counter(mut self, conflicts: Counter) -> Self {
        self.conflicts = conflicts;
        self
    }

    /// The time to live of a lease.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, BTreeMap<u8, Held>>> {
        // The map is valid after any panic (single inserts and removes): keep serving.
        self.by_chain.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes a lease: the preferred ID when it is free (or already this instance's), otherwise
    /// the ID this instance already holds, otherwise the lowest free one.
    pub fn acquire(
        &self,
        proxy: ProxyDescription,
        preferred: u32,
    ) -> Result<ProxyLease, LeaseError> {
        check_request(&proxy, preferred)?;
        let now = Instant::now();
        let mut by_chain = self.lock();
        let held = by_chain.entry(proxy.chain_type.clone()).or_default();
        held.retain(|_, h| h.deadline > now);
        let own = |h: &Held| h.lease.proxy.instance_id == proxy.instance_id;
        let preferred = u8::try_from(preferred).ok().filter(|&id| id != 0);
        if preferred.is_some_and(|id| held.get(&id).is_some_and(|h| !own(h))) {
            // The proxy asked for an ID another proxy holds: it gets another one.
            self.conflicts.inc();
        }
        let server_id = preferred
            .filter(|id| held.get(id).is_none_or(own))
            .or_else(|| held.iter().find(|(_, h)| own(h)).map(|(id, _)| *id))
            .or_else(|| (1..=255u8).find(|id| !held.contains_key(id)))
            .ok_or_else(|| LeaseError::Exhausted(proxy.chain_type.clone()))?;
        // One lease per instance and chain: drop any other ID this instance held.
        held.retain(|id, h| *id == server_id || !own(h));
        let wall = SystemTime::now();
        let lease = ProxyLease {
            server_id,
            proxy,
            sessions_by_coin: BTreeMap::new(),
            last_heartbeat: wall,
            expires: wall + self.ttl,
        };
        held.insert(
            server_id,
            Held {
                lease: lease.clone(),
                deadline: now + self.ttl,
            },
        );
        Ok(lease)
    }

    /// Renews a lease and records the proxy's session counts.
    pub fn renew(
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
        let now = Instant::now();
        let mut by_chain = self.lock();
        let id = u8::try_from(server_id).map_err(|_| not_found())?;
        let held = by_chain
            .get_mut(chain_type)
            .and_then(|held| held.get_mut(&id))
            .filter(|h| h.deadline > now);
        if held
            .as_ref()
            .is_some_and(|h| h.lease.proxy.instance_id != instance_id)
        {
            // Held by another proxy since this one's lease ended.
            self.conflicts.inc();
        }
        let held = held
            .filter(|h| h.lease.proxy.instance_id == instance_id)
            .ok_or_else(not_found)?;
        let wall = SystemTime::now();
        held.deadline = now + self.ttl;
        held.lease.last_heartbeat = wall;
        held.lease.expires = wall + self.ttl;
        held.lease.sessions_by_coin = sessions_by_coin;
        Ok(())
    }

    /// Gives a lease back; a lease that is gone, or held by another instance, is left alone.
    pub fn release(&self, chain_type: &str, server_id: u32, instance_id: &str) {
        let Ok(id) = u8::try_from(server_id) else {
            return;
        };
        let mut by_chain = self.lock();
        if let Some(held) = by_chain.get_mut(chain_type)
            && held
                .get(&id)
                .is_some_and(|h| h.lease.proxy.instance_id == instance_id)
        {
            held.remove(&id);
        }
    }

    /// The live leases, by chain type then server ID.
    pub fn live(&self) -> Vec<ProxyLease> {
        let now = Instant::now();
        let by_chain = self.lock();
        let mut chains: Vec<_> = by_chain.iter().collect();
        chains.sort_by(|a, b| a.0.cmp(b.0));
        chains
            .into_iter()
            .flat_map(|(_, held)| held.values())
            .filter(|h| h.deadline > now)
            .map(|h| h.lease.clone())
            .collect()
    }
}

#[async_trait]
impl ServerIdLeases for LocalLeases {
    async fn acquire(
        &self,
        proxy: ProxyDescription,
        preferred: u32,
    ) -> Result<ProxyLease, LeaseError> {
        LocalLeases::acquire(self, proxy, preferred)
    }

    async fn renew(
        &self,
        chain_type: &str,
        server_id: u32,
        instance_id: &str,
        sessions_by_coin: BTreeMap<String, u64>,
    ) -> Result<(), LeaseError> {
        LocalLeases::renew(self, chain_type, server_id, instance_id, sessions_by_coin)
    }

    async fn release(&self, chain_type: &str, server_id: u32, instance_id: &str) {
        LocalLeases::release(self, chain_type, server_id, instance_id)
    }

    async fn live(&self) -> Result<Vec<ProxyLease>, LeaseError> {
        Ok(LocalLeases::live(self))
    }

    fn ttl(&self) -> Duration {
        self.ttl
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn proxy(instance: &str) -> ProxyDescription {
        ProxyDescription {
            chain_type: "bitcoin".into(),
            instance_id: instance.into(),
            coins: vec!["btc".into()],
            ..Default::default()
        }
    }

    #[test]
    fn ids_are_unique_and_a_restarted_proxy_gets_its_id_back() {
        let leases = LocalLeases::new(Duration::from_secs(30));
        let a = leases.acquire(proxy("a"), 0).expect("a");
        let b = leases.acquire(proxy("b"), 0).expect("b");
        assert_ne!(a.server_id, b.server_id);
        // b asks for a's ID: a holds it, so b keeps its own.
        let b2 = leases
            .acquire(proxy("b"), u32::from(a.server_id))
            .expect("b2");
        assert_eq!(b2.server_id, b.server_id);
        leases.release("bitcoin", u32::from(a.server_id), "a");
        let a2 = leases
            .acquire(proxy("a-restarted"), u32::from(a.server_id))
            .expect("a2");
        assert_eq!(a2.server_id, a.server_id);
        assert_eq!(leases.live().len(), 2);
    }

    #[test]
    fn expired_leases_are_freed_and_renewal_needs_the_holder() {
        let leases = LocalLeases::new(Duration::from_millis(0));
        let a = leases.acquire(proxy("a"), 7).expect("a");
        assert_eq!(a.server_id, 7);
        assert!(
            leases.live().is_empty(),
            "a zero TTL lease is already expired"
        );
        let b = leases.acquire(proxy("b"), 7).expect("b");
        assert_eq!(b.server_id, 7);
        let leases = LocalLeases::new(Duration::from_secs(30));
        let a = leases.acquire(proxy("a"), 0).expect("a");
        assert!(matches!(
            leases.renew(
                "bitcoin",
                u32::from(a.server_id),
                "intruder",
                BTreeMap::new()
            ),
            Err(LeaseError::NotFound { .. })
        ));
        leases
            .renew(
                "bitcoin",
                u32::from(a.server_id),
                "a",
                BTreeMap::from([("btc".into(), 5)]),
            )
            .expect("renew");
        assert_eq!(leases.live()[0].sessions_by_coin.get("btc"), Some(&5));
    }

    #[test]
    fn bad_requests_are_refused() {
        let leases = LocalLeases::new(Duration::from_secs(30));
        let mut p = proxy("a");
        p.chain_type = "dogecoin".into();
        assert!(matches!(leases.acquire(p, 0), Err(LeaseError::Invalid(_))));
        assert!(matches!(
            leases.acquire(proxy(""), 0),
            Err(LeaseError::Invalid(_))
        ));
        assert!(matches!(
            leases.acquire(proxy("a"), 300),
            Err(LeaseError::Invalid(_))
        ));
        for i in 0..255 {
            leases.acquire(proxy(&format!("p{i}")), 0).expect("free id");
        }
        assert!(matches!(
            leases.acquire(proxy("one-too-many"), 0),
            Err(LeaseError::Exhausted(_))
        ));
    }
}
