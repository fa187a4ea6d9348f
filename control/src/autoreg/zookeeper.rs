//! Pending auto-registrations in ZooKeeper (SPEC §5 and §7), shared by every control replica
//! and by the Go proxies: a pending request is the persistent node `ZKAutoRegWatchDir` + name
//! holding `{"SessionID":n,"Worker":"full name"}`. Creating it is what makes a request the only
//! one for its name (`NodeExists`: one is already pending). Deleting it when done wakes the
//! proxies that wait on it.
//!
//! - Every replica polls the directory (every [`POLL_INTERVAL`], and at once after it created a
//!   node itself), so that nodes created by any replica or directly by an old Go proxy are
//!   processed. Polling rather than watches: zookeeper-async re-arms no watch after a
//!   reconnect, and a missed watch would leave a request waiting for ever. A round takes the
//!   names nobody claimed, in random order (so that replicas reading the same listing do not
//!   all race for the same names), one by one as exchange permits (`AutoRegMaxConcurrent`)
//!   free up: a replica holds a permit only through the exchange with the backend, and holds
//!   its claim through the `IntervalSeconds` wait (at most `AutoRegMaxPending` claims per
//!   replica).
//! - Each round also updates the replica's view of the directory for the bounds per source:
//!   each name's pattern, and its proxy, from the session ID in the node (each new node is
//!   read once per replica; at most [`VIEW_FACTOR`] × `AutoRegMaxPending` nodes are viewed).
//! - Before processing a name, a replica claims it with the ephemeral node
//!   `autoreg-claims/<name>` in the deployment's directory (`ZKSwitchyardDir` +
//!   `ZKSwitcherWatchDir`, passed to [`ZkRegistrations::start`]) holding its replica ID;
//!   `NodeExists` means another replica has it. After claiming, the replica reads the pending node again: a request that
//!   another replica finished meanwhile is gone and is skipped. When done, the replica deletes
//!   the pending node (whatever its version), then its claim. So each request is processed
//!   once, across replicas, unless a replica's session expires in the middle of processing
//!   (its claim goes with the session).
//! - Cleaning up is retried for a while when ZooKeeper cannot be reached; a claim that could
//!   not be deleted is deleted later (or goes with the session).

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, Mutex},
    time::Duration,
};

use async_trait::async_trait;
use futures::{StreamExt, stream};
use rand::seq::SliceRandom;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};
use zookeeper_async::{Acl, CreateMode, ZkError, ZooKeeper};

use super::{
    AutoRegError, Outcome, PendingRequest, Registrar, UserRegistrations,
    admission::{Tally, name_pattern, source_of},
};
use crate::store::zookeeper::{create_path, timed};

/// How often the directory of pending requests is read.
pub const POLL_INTERVAL: Duration = Duration::from_millis(500);
/// The view of the directory holds at most this many times `AutoRegMaxPending` nodes (the
/// directory may hold more: Go proxies write it directly).
pub const VIEW_FACTOR: usize = 4;
/// Nodes read at once when the view takes in new ones.
const VIEW_READS_AT_ONCE: usize = 32;
/// Attempts to delete a finished request's node, or a claim, while ZooKeeper cannot be reached.
const CLEANUP_ATTEMPTS: usize = 10;
/// Wait between those attempts.
const CLEANUP_RETRY: Duration = Duration::from_millis(500);

/// Pending auto-registrations in ZooKeeper; see the module doc.
#[derive(Debug)]
pub struct ZkRegistrations {
    inner: Arc<Inner>,
}

struct Inner {
    zk: Arc<ZooKeeper>,
    registrar: Arc<Registrar>,
    /// `ZKAutoRegWatchDir`, with a trailing `/`.
    watch_dir: String,
    /// The deployment's directory + `autoreg-claims/`.
    claim_dir: String,
    request_timeout: Duration,
    /// Identifies this replica in its claims.
    replica_id: String,
    /// Names this replica is processing (at most `AutoRegMaxPending`: one per slot).
    in_flight: Mutex<HashSet<String>>,
    /// Names whose claim this replica could not delete.
    stale_claims: Mutex<HashSet<String>>,
    /// Claims this replica may hold at once, through exchanges and waits
    /// (`AutoRegMaxPending`).
    slots: Arc<Semaphore>,
    /// The pending requests as this replica last saw them, for the bounds per source.
    view: Mutex<View>,
    /// Poll now: this replica created a request.
    wake: Notify,
    shutdown: CancellationToken,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ZkRegistrations")
            .field("watch_dir", &self.watch_dir)
            .field("claim_dir", &self.claim_dir)
            .field("replica_id", &self.replica_id)
            .finish_non_exhaustive()
    }
}

fn unavailable(op: &str, path: &str, e: ZkError) -> AutoRegError {
    AutoRegError::Unavailable(format!("ZooKeeper {op} {path}: {e:?}"))
}

fn lock(set: &Mutex<HashSet<String>>) -> std::sync::MutexGuard<'_, HashSet<String>> {
    // Single inserts and removes: the set is valid after any panic.
    set.lock().unwrap_or_else(|e| e.into_inner())
}

/// The pending requests a replica knows of, with the proxy each came from, counted per source
/// and per pattern. At most [`VIEW_FACTOR`] × `AutoRegMaxPending` names.
#[derive(Debug, Default)]
struct View {
    sources: HashMap<String, u8>,
    tally: Tally,
}

impl View {
    fn add(&mut self, name: &str, source: u8, capacity: usize) {
        if self.sources.len() >= capacity || self.sources.contains_key(name) {
            return;
        }
        self.sources.insert(name.to_owned(), source);
        self.tally.add(source, name_pattern(name).as_deref());
    }

    fn remove(&mut self, name: &str) {
        if let Some(source) = self.sources.remove(name) {
            self.tally.remove(source, name_pattern(name).as_deref());
        }
    }
}

impl ZkRegistrations {
    /// Pending requests in the registrar's `watch_dir` on the session of `zk` (connected), with
    /// claims under `switchyard_dir` (with a trailing `/`). Creates both directories, and
    /// processes pending requests until `shutdown`.
    pub async fn start(
        zk: Arc<ZooKeeper>,
        registrar: Arc<Registrar>,
        switchyard_dir: &str,
        request_timeout: Duration,
        shutdown: CancellationToken,
    ) -> Result<Self, AutoRegError> {
        let watch_dir = registrar.settings().watch_dir.clone().ok_or_else(|| {
            AutoRegError::Settings("ZKAutoRegWatchDir is required on ZooKeeper".into())
        })?;
        let claim_dir = format!("{switchyard_dir}autoreg-claims/");
        for dir in [&watch_dir, &claim_dir] {
            create_path(&zk, dir, request_timeout)
                .await
                .map_err(|e| AutoRegError::Unavailable(e.to_string()))?;
        }
        registrar.start(shutdown.clone());
        let slots = Arc::new(Semaphore::new(registrar.settings().max_pending));
        let inner = Arc::new(Inner {
            zk,
            registrar,
            watch_dir,
            claim_dir,
            request_timeout,
            replica_id: format!("{:016x}", rand::random::<u64>()),
            in_flight: Mutex::new(HashSet::new()),
            stale_claims: Mutex::new(HashSet::new()),
            slots,
            view: Mutex::new(View::default()),
            wake: Notify::new(),
            shutdown,
        });
        info!(
            watch_dir = %inner.watch_dir,
            claim_dir = %inner.claim_dir,
            url = %inner.registrar.url_for_logs(),
            "auto-registration started on ZooKeeper"
        );
        tokio::spawn(Arc::clone(&inner).run());
        Ok(Self { inner })
    }
}

impl Inner {
    fn pending_path(&self, name: &str) -> String {
        format!("{}{name}", self.watch_dir)
    }

    fn claim_path(&self, name: &str) -> String {
        format!("{}{name}", self.claim_dir)
    }

    async fn list(&self, dir: &str) -> Result<Vec<String>, AutoRegError> {
        let path = dir.trim_end_matches('/');
        timed(self.request_timeout, self.zk.get_children(path, false))
            .await
            .map_err(|e| unavailable("list", path, e))
    }

    /// Polls for pending requests until shutdown.
    async fn run(self: Arc<Self>) {
        let mut poll = tokio::time::interval(POLL_INTERVAL);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut failing = false;
        loop {
            tokio::select! {
                biased;
                _ = self.shutdown.cancelled() => break,
                _ = self.wake.notified() => {}
                _ = poll.tick() => {}
            }
            match self.scan().await {
                Ok(()) if failing => {
                    info!("pending auto-registrations can be read again");
                    failing = false;
                }
                Ok(()) => {}
                Err(e) if !failing => {
                    warn!(error = %e, "cannot read pending auto-registrations; will retry");
                    failing = true;
                }
                Err(e) => debug!(error = %e, "still cannot read pending auto-registrations"),
            }
        }
        info!("auto-registration stopped");
    }

    fn lock_view(&self) -> std::sync::MutexGuard<'_, View> {
        // The map and the tally change together without a panic between them.
        self.view.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn view_capacity(&self) -> usize {
        self.registrar
            .settings()
            .max_pending
            .saturating_mul(VIEW_FACTOR)
    }

    /// Brings the view in line with a listing of the directory: forgets the names gone, reads
    /// the source of the new ones (as far as the view's bound allows).
    async fn refresh_view(&self, names: &[String]) {
        let listed: HashSet<&str> = names.iter().map(String::as_str).collect();
        let new: Vec<String> = {
            let mut view = self.lock_view();
            let gone: Vec<String> = view
                .sources
                .keys()
                .filter(|name| !listed.contains(name.as_str()))
                .cloned()
                .collect();
            for name in &gone {
                view.remove(name);
            }
            let room = self.view_capacity().saturating_sub(view.sources.len());
            names
                .iter()
                .filter(|name| !view.sources.contains_key(*name))
                .take(room)
                .cloned()
                .collect()
        };
        let read: Vec<(String, Option<u8>)> = stream::iter(new)
            .map(|name| async move {
                let path = self.pending_path(&name);
                let source = match timed(self.request_timeout, self.zk.get_data(&path, false)).await
                {
                    Ok((data, _)) => Some(PendingRequest::source_of_json(&data)),
                    // Gone meanwhile, or unreadable now: seen again next round.
                    Err(_) => None,
                };
                (name, source)
            })
            .buffer_unordered(VIEW_READS_AT_ONCE)
            .collect()
            .await;
        let capacity = self.view_capacity();
        let mut view = self.lock_view();
        for (name, source) in read {
            if let Some(source) = source {
                view.add(&name, source, capacity);
            }
        }
    }

    /// One round: starts processing every pending request that nobody processes, each as an
    /// exchange permit frees up, as far as this replica's slots allow (the rest waits for a
    /// later round).
    async fn scan(self: &Arc<Self>) -> Result<(), AutoRegError> {
        self.clear_stale_claims().await;
        let mut names = self.list(&self.watch_dir).await?;
        self.refresh_view(&names).await;
        if names.is_empty() {
            return Ok(());
        }
        let claimed: HashSet<String> = self.list(&self.claim_dir).await?.into_iter().collect();
        names.retain(|name| !claimed.contains(name));
        names.shuffle(&mut rand::rng());
        for name in names {
            if lock(&self.in_flight).contains(&name) {
                continue;
            }
            let Ok(slot) = Arc::clone(&self.slots).try_acquire_owned() else {
                break;
            };
            let Some(exchange) = self.registrar.exchange_permit(&self.shutdown).await else {
                break;
            };
            if !lock(&self.in_flight).insert(name.clone()) {
                continue;
            }
            tokio::spawn(Arc::clone(self).handle(name, slot, exchange));
        }
        Ok(())
    }

    async fn handle(
        self: Arc<Self>,
        name: String,
        _slot: OwnedSemaphorePermit,
        exchange: OwnedSemaphorePermit,
    ) {
        self.handle_claimed(&name, exchange).await;
        lock(&self.in_flight).remove(&name);
    }

    /// Claims `name`, processes its request, removes it and releases the claim.
    async fn handle_claimed(&self, name: &str, exchange: OwnedSemaphorePermit) {
        match self.claim(name).await {
            Ok(true) => {}
            Ok(false) => return,
            Err(e) => {
                debug!(user = name, error = %e, "cannot claim a pending auto-registration; will retry");
                return;
            }
        }
        let path = self.pending_path(name);
        let request = match timed(self.request_timeout, self.zk.get_data(&path, false)).await {
            Ok((data, _)) => PendingRequest::from_json(name, &data),
            Err(ZkError::NoNode) => {
                // Finished by another replica between the listing and the claim.
                self.release(name).await;
                return;
            }
            Err(e) => {
                debug!(user = name, error = ?e, "cannot read a pending auto-registration; will retry");
                self.release(name).await;
                return;
            }
        };
        let outcome = self
            .registrar
            .process(name, &request, exchange, &self.shutdown)
            .await;
        if !matches!(outcome, Outcome::Interrupted { .. }) {
            self.delete_retrying(&path, "pending auto-registration")
                .await;
            self.lock_view().remove(name);
        }
        self.release(name).await;
    }

    /// Takes the claim on `name`: `Ok(false)` when another replica holds it.
    async fn claim(&self, name: &str) -> Result<bool, AutoRegError> {
        let path = self.claim_path(name);
        let created = self.zk.create(
            &path,
            self.replica_id.as_bytes().to_vec(),
            Acl::open_unsafe().clone(),
            CreateMode::Ephemeral,
        );
        match timed(self.request_timeout, created).await {
            Ok(_) => Ok(true),
            Err(ZkError::NodeExists) => {
                // This replica's own claim, left over from a release that failed, counts.
                let own = self.is_own_claim(&path).await?;
                if own {
                    lock(&self.stale_claims).remove(name);
                }
                Ok(own)
            }
            Err(e) => Err(unavailable("create", &path, e)),
        }
    }

    async fn is_own_claim(&self, path: &str) -> Result<bool, AutoRegError> {
        match timed(self.request_timeout, self.zk.get_data(path, false)).await {
            Ok((data, _)) => Ok(data == self.replica_id.as_bytes()),
            Err(ZkError::NoNode) => Ok(false),
            Err(e) => Err(unavailable("get", path, e)),
        }
    }

    /// Deletes this replica's claim on `name` (never another replica's); remembered for a
    /// later attempt when ZooKeeper cannot be reached.
    async fn release(&self, name: &str) {
        if !self.try_release(name, CLEANUP_ATTEMPTS).await {
            lock(&self.stale_claims).insert(name.to_owned());
        }
    }

    /// `true` when the claim is gone or not this replica's.
    async fn try_release(&self, name: &str, attempts: usize) -> bool {
        let path = self.claim_path(name);
        for attempt in 1..=attempts {
            let result = match self.is_own_claim(&path).await {
                Ok(false) => return true,
                Ok(true) => timed(self.request_timeout, self.zk.delete(&path, None))
                    .await
                    .or_else(|e| match e {
                        ZkError::NoNode => Ok(()),
                        e => Err(unavailable("delete", &path, e)),
                    }),
                Err(e) => Err(e),
            };
            match result {
                Ok(()) => return true,
                Err(e) if attempt == attempts || self.shutdown.is_cancelled() => {
                    debug!(user = name, error = %e, "cannot release an auto-registration claim yet");
                    return false;
                }
                Err(_) => tokio::time::sleep(CLEANUP_RETRY).await,
            }
        }
        false
    }

    async fn clear_stale_claims(&self) {
        let stale: Vec<String> = lock(&self.stale_claims).iter().cloned().collect();
        for name in stale {
            if self.try_release(&name, 1).await {
                lock(&self.stale_claims).remove(&name);
            }
        }
    }

    /// Deletes `path` whatever its version, retrying while ZooKeeper cannot be reached.
    async fn delete_retrying(&self, path: &str, what: &str) {
        for attempt in 1..=CLEANUP_ATTEMPTS {
            match timed(self.request_timeout, self.zk.delete(path, None)).await {
                Ok(()) | Err(ZkError::NoNode) => return,
                Err(e) if attempt == CLEANUP_ATTEMPTS || self.shutdown.is_cancelled() => {
                    error!(path, error = ?e, "cannot delete a {what}; it will be processed again");
                    return;
                }
                Err(e) => {
                    debug!(path, error = ?e, "cannot delete a {what} yet; retrying");
                    tokio::time::sleep(CLEANUP_RETRY).await;
                }
            }
        }
    }
}

#[async_trait]
impl UserRegistrations for ZkRegistrations {
    async fn request(
        &self,
        user: &str,
        worker: &str,
        session_id: u32,
    ) -> Result<bool, AutoRegError> {
        let result = self.record_request(user, worker, session_id).await;
        if let Err(e @ AutoRegError::Unavailable(_)) = &result {
            // Refusals are counted where they are logged; ZooKeeper failures here.
            self.inner.registrar.count(e.counted());
        }
        result
    }

    async fn pending(&self) -> Result<Vec<String>, AutoRegError> {
        let mut names = self.inner.list(&self.inner.watch_dir).await?;
        names.sort();
        Ok(names)
    }
}

impl ZkRegistrations {
    /// Records a request as a pending node; see [`UserRegistrations::request`].
    async fn record_request(
        &self,
        user: &str,
        worker: &str,
        session_id: u32,
    ) -> Result<bool, AutoRegError> {
        let inner = &self.inner;
        let registrar = &inner.registrar;
        let admitted = registrar
            .admit(user, worker)
            .inspect_err(|e| registrar.log_refusal(user, session_id, e))?;
        let Some(user) = admitted else {
            return Ok(false);
        };
        let path = inner.pending_path(&user);
        let dir = inner.watch_dir.trim_end_matches('/');
        let timeout = inner.request_timeout;
        let max = registrar.settings().max_pending;
        let pending = timed(timeout, inner.zk.exists(dir, false))
            .await
            .map_err(|e| unavailable("exists", dir, e))?
            .map_or(0, |stat| usize::try_from(stat.num_children).unwrap_or(0));
        let over = if pending >= max {
            Some(AutoRegError::TooManyPending { max })
        } else {
            registrar
                .check_sources(&inner.lock_view().tally, &user, session_id)
                .err()
        };
        if let Some(over) = over {
            // Over a bound, unless a request is pending for the name already.
            let exists = timed(timeout, inner.zk.exists(&path, false))
                .await
                .map_err(|e| unavailable("exists", &path, e))?;
            if exists.is_some() {
                return Ok(false);
            }
            registrar.log_refusal(&user, session_id, &over);
            return Err(over);
        }
        let data = PendingRequest {
            session_id,
            worker: worker.to_owned(),
        }
        .to_json();
        for attempt in 0..2 {
            let created = inner.zk.create(
                &path,
                data.clone(),
                Acl::open_unsafe().clone(),
                CreateMode::Persistent,
            );
            match timed(timeout, created).await {
                Ok(_) => {
                    info!(user, session_id, worker, "auto-registration requested");
                    let capacity = inner.view_capacity();
                    inner
                        .lock_view()
                        .add(&user, source_of(session_id), capacity);
                    inner.wake.notify_one();
                    return Ok(true);
                }
                Err(ZkError::NodeExists) => return Ok(false),
                // The directory was deleted by someone: create it again, once.
                Err(ZkError::NoNode) if attempt == 0 => create_path(&inner.zk, dir, timeout)
                    .await
                    .map_err(|e| AutoRegError::Unavailable(e.to_string()))?,
                Err(e) => return Err(unavailable("create", &path, e)),
            }
        }
        Err(AutoRegError::Unavailable(format!(
            "{dir} keeps disappearing"
        )))
    }
}
