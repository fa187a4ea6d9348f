//! The proxy as a whole: the miners' listener with its session limit, the cache fed by the
//! control plane, the server-ID lease, the metrics endpoint, and a clean shutdown.
//! [`Proxy::start`] is what the binary runs and what tests start in-process.

#![forbid(unsafe_code)]

use std::{net::SocketAddr, os::fd::OwnedFd, sync::Arc, time::Duration};

use thiserror::Error;
use tokio::{
    net::TcpListener,
    sync::{Semaphore, mpsc, oneshot},
    task::JoinSet,
};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::{
    cache::{
        self, UserCoinCache,
        file::{CacheFile, SavedLease},
    },
    config::ProxySettings,
    control::{self, ControlEndpoints, ControlError, LeaseRequest, ServerIdLease},
    lookup::UserLookups,
    metrics::{self, Metrics},
    session::{self, ProxyContext, SessionIds},
    session_id::BadServerId,
    switch_log::SwitchLog,
    upgrade::{
        self, FREEZE_TIMEOUT, HandOver, HandedSession, Inheritance, Invocation, UpgradeError,
    },
};

/// Why the proxy could not start.
#[derive(Debug, Error)]
pub enum StartError {
    /// A listener could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The control endpoints are unusable, or no lease could be had.
    #[error(transparent)]
    Control(#[from] ControlError),
    /// A server ID out of range.
    #[error(transparent)]
    ServerId(#[from] BadServerId),
    /// A hot upgrade handed over no listener.
    #[error("the hot upgrade handed over no listener")]
    NoHandedListener,
    /// The TLS miner listener's certificate or key cannot be used.
    #[error("TLS miner listener: {0}")]
    Tls(#[from] switchyard_tls::TlsError),
}

/// A running proxy.
pub struct Proxy {
    /// Where miners connect.
    pub listen_addr: SocketAddr,
    /// Where the metrics are served, if anywhere.
    pub metrics_addr: Option<SocketAddr>,
    /// Where TLS miners connect, if anywhere (`TlsListenAddr`).
    pub tls_listen_addr: Option<SocketAddr>,
    /// The shared state of the sessions (cache, metrics, settings).
    pub context: Arc<ProxyContext>,
    shutdown: CancellationToken,
    tasks: JoinSet<()>,
    /// The accept loop's orders (a hot upgrade's freeze).
    accept_control: mpsc::Sender<AcceptControl>,
    /// The server-ID lease, when the ID is leased (a hot upgrade hands it over).
    lease: Option<ServerIdLease>,
}

impl Proxy {
    /// Binds the listeners, starts following the control plane, takes a server-ID lease when
    /// none is configured (this waits for a control replica to answer), and starts accepting
    /// miners.
    pub async fn start(settings: ProxySettings) -> Result<Self, StartError> {
        Self::start_with(settings, None).await
    }

    /// [`Self::start`], or, with what a previous image of this process handed over (hot
    /// upgrade, SPEC §9), its listener, lease and sessions taken over.
    pub async fn start_with(
        settings: ProxySettings,
        mut inheritance: Option<Inheritance>,
    ) -> Result<Self, StartError> {
        let bind_error = |source| StartError::Bind {
            addr: settings.listen_addr,
            source,
        };
        let (listener, old_listener, mut handed) = match inheritance.as_mut().map(|i| &mut i.handed)
        {
            None => (
                bind_miners(settings.listen_addr).map_err(bind_error)?,
                None,
                None,
            ),
            Some(handed) => {
                let inherited = handed
                    .listener
                    .take()
                    .map(std::net::TcpListener::from)
                    .ok_or(StartError::NoHandedListener)?;
                let same = handed.listen_addr == settings.listen_addr
                    || (settings.listen_addr.port() == 0
                        && handed.listen_addr.ip() == settings.listen_addr.ip());
                if same {
                    (
                        TcpListener::from_std(inherited).map_err(bind_error)?,
                        None,
                        Some(handed),
                    )
                } else {
                    // The config moved the listener: the new address from now on; the
                    // connections already queued on the old one are still served.
                    let listener = bind_miners(settings.listen_addr).map_err(bind_error)?;
                    (listener, Some(inherited), Some(handed))
                }
            }
        };
        let listen_addr = listener.local_addr().map_err(bind_error)?;
        let shutdown = CancellationToken::new();
        let mut tasks = JoinSet::new();
        let endpoints = ControlEndpoints::with_tls(
            &settings.control_endpoints,
            settings.proxy_token.as_ref().map(|t| t.expose().to_owned()),
            settings.control_tls.as_ref(),
        )?;
        let cache = UserCoinCache::new();
        let metrics = Metrics::new(settings.upstreams.keys());
        metrics.watch_cache(cache.clone());
        // The cache kept on disk, read before the stream starts: the stream resumes from its
        // revision.
        let cache_file = settings.cache_file.clone().map(CacheFile::new);
        let saved_lease = cache_file
            .as_ref()
            .and_then(|file| match file.load(&cache) {
                Ok(Some(loaded)) => {
                    info!(
                        path = %file.path().display(),
                        users = loaded.users,
                        revision = loaded.revision,
                        "serving from the cache file until the control plane answers"
                    );
                    loaded.lease
                }
                Ok(None) => None,
                Err(e) => {
                    warn!(error = %e, "cache file ignored: starting without it");
                    None
                }
            });
        tasks.spawn(control::follow_switches(
            cache.clone(),
            endpoints.clone(),
            shutdown.child_token(),
        ));

        let coins: Vec<String> = settings.upstreams.keys().cloned().collect();
        let lease_request = LeaseRequest {
            chain_type: settings.chain.as_str().to_string(),
            preferred_server_id: 0,
            coins,
            ips: vec![listen_addr.ip().to_string()],
            host_name: host_name(),
            listen_addr: listen_addr.to_string(),
        };
        let handed_lease = handed.as_mut().and_then(|h| h.lease.take());
        let (server_id, lease) = match (settings.server_id, handed_lease) {
            (Some(id), _) => (id, None),
            (None, Some(lease)) => {
                info!(server_id = lease.server_id, "server-ID lease carried over");
                (lease.server_id, Some(lease))
            }
            (None, None) => {
                let saved_id = saved_lease
                    .as_ref()
                    .filter(|s| s.chain_type == lease_request.chain_type)
                    .map(|s| s.server_id);
                let lease = Self::lease(&endpoints, &lease_request, saved_lease).await?;
                if saved_id.is_some_and(|id| id != lease.server_id) {
                    // The ID this proxy held before its restart was taken meanwhile.
                    metrics.lease_conflict();
                }
                (lease.server_id, Some(lease))
            }
        };
        let context = Self::context(&settings, &cache, &endpoints, &metrics, server_id)?;
        if let Some(handed) = &handed
            && handed.server_id == server_id
        {
            context.session_ids.set_cursor(handed.sid_cursor);
        }
        let kept_lease = lease.clone();
        let chain_type = settings.chain.as_str().to_string();
        let saved = move |id: u8, lease: &ServerIdLease| SavedLease {
            chain_type: chain_type.clone(),
            server_id: id,
            instance_id: lease.instance_id.clone(),
        };
        let (lease_to_save, lease_saved) =
            tokio::sync::watch::channel(lease.as_ref().map(|l| saved(l.server_id, l)));
        if let Some(file) = cache_file {
            tasks.spawn(cache::file::keep_saved(
                file,
                cache.clone(),
                lease_saved,
                shutdown.child_token(),
            ));
        }
        if let Some(lease) = lease {
            let (current, mut changes) = tokio::sync::watch::channel(server_id);
            let instance = lease.clone();
            let by_coin = metrics.clone();
            tasks.spawn(control::keep_server_id(
                endpoints.clone(),
                lease_request,
                lease,
                move || by_coin.sessions_by_coin(),
                current,
                shutdown.child_token(),
            ));
            // A lease lost and taken by another proxy meanwhile: new sessions use the new ID,
            // live ones keep theirs.
            let ctx = context.clone();
            let stop = shutdown.child_token();
            tasks.spawn(async move {
                loop {
                    tokio::select! {
                        () = stop.cancelled() => return,
                        changed = changes.changed() => if changed.is_err() { return },
                    }
                    let id = *changes.borrow_and_update();
                    lease_to_save.send_replace(Some(saved(id, &instance)));
                    // The lease's ID changes only when it was taken by another proxy.
                    ctx.metrics.lease_conflict();
                    match ctx.session_ids.set_server_id(id) {
                        Ok(()) => {
                            ctx.metrics.set_server_id(id);
                            warn!(server_id = id, "new sessions now use another server ID");
                        }
                        Err(e) => error!(error = %e, "bad server ID from the lease"),
                    }
                }
            });
        }
        let mut proxy =
            Self::finish(settings, listener, listen_addr, context, shutdown, tasks).await?;
        proxy.lease = kept_lease;
        if let Some(old) = old_listener {
            proxy.serve_queued(old);
        }
        if let Some(inheritance) = inheritance {
            proxy.take_over_inherited(inheritance).await;
        }
        Ok(proxy)
    }

    /// Takes over the sessions a previous image handed over. They are read at once, before
    /// anything else runs (reading them beside resumed sessions, on two cores, made the last
    /// ones wait longer: see docs/benchmarks.md, part 7).
    async fn take_over_inherited(&mut self, inheritance: Inheritance) {
        let handed_over = inheritance.sessions;
        let closed_in_handshake = inheritance.handed.closed_in_handshake;
        let frozen_at_ms = inheritance.handed.frozen_at_ms;
        let (sessions, unusable) = inheritance.take_sessions();
        for why in unusable {
            warn!(%why, "hot upgrade: a session could not be taken over: closed");
        }
        let taken = sessions.len();
        self.take_over(sessions).await;
        info!(
            sessions = taken,
            handed_over,
            closed_in_handshake,
            paused_ms = upgrade::wall_ms().saturating_sub(frozen_at_ms),
            "hot upgrade: sessions taken over"
        );
    }

    /// Takes the server-ID lease at start. With a lease saved in the cache file (for this
    /// chain type), asks for that one back under its instance ID (one round), and when no
    /// control replica answers starts on it: the renewals then confirm it once the control
    /// plane is back, or replace it (a new ID for new sessions) when it was taken meanwhile.
    async fn lease(
        endpoints: &ControlEndpoints,
        request: &LeaseRequest,
        saved: Option<SavedLease>,
    ) -> Result<ServerIdLease, StartError> {
        let Some(saved) = saved.filter(|s| s.chain_type == request.chain_type) else {
            let lease = control::acquire_server_id(endpoints, request).await?;
            info!(server_id = lease.server_id, "server ID leased");
            return Ok(lease);
        };
        let again = LeaseRequest {
            preferred_server_id: u32::from(saved.server_id),
            ..request.clone()
        };
        match control::acquire_as(endpoints, &again, &saved.instance_id, 1).await {
            Ok(lease) => {
                info!(
                    server_id = lease.server_id,
                    saved_server_id = saved.server_id,
                    "server ID leased"
                );
                Ok(lease)
            }
            Err(e) if !e.is_definitive() => {
                warn!(
                    server_id = saved.server_id,
                    error = %e,
                    "no control replica answers: starting on the server ID leased before the restart"
                );
                Ok(ServerIdLease {
                    server_id: saved.server_id,
                    ttl: SAVED_LEASE_TTL,
                    instance_id: saved.instance_id,
                })
            }
            Err(e) => Err(e.into()),
        }
    }

    fn context(
        settings: &ProxySettings,
        cache: &Arc<UserCoinCache>,
        endpoints: &ControlEndpoints,
        metrics: &Arc<Metrics>,
        server_id: u8,
    ) -> Result<Arc<ProxyContext>, StartError> {
        metrics.set_server_id(server_id);
        let lookups = Arc::new(UserLookups::new(
            endpoints.clone(),
            settings.read_through_max_in_flight,
            settings.read_through_negative,
        ));
        metrics.watch_lookups(Arc::clone(&lookups));
        Ok(Arc::new(ProxyContext {
            session_ids: SessionIds::new(server_id, settings.chain)?,
            settings: settings.clone(),
            cache: cache.clone(),
            control: endpoints.clone(),
            metrics: metrics.clone(),
            registration_waiters: Arc::new(Semaphore::new(settings.auto_reg_max_wait)),
            lookups,
            drains: session::DrainBudget::new(
                session::open_file_limit().unwrap_or(FALLBACK_OPEN_FILES),
            ),
            handover: Arc::default(),
            switch_log: SwitchLog::new(),
        }))
    }

    async fn finish(
        settings: ProxySettings,
        listener: TcpListener,
        listen_addr: SocketAddr,
        context: Arc<ProxyContext>,
        shutdown: CancellationToken,
        mut tasks: JoinSet<()>,
    ) -> Result<Self, StartError> {
        let metrics_addr = match settings.metrics_addr {
            Some(addr) => {
                let listener = metrics::bind(addr)
                    .await
                    .map_err(|source| StartError::Bind { addr, source })?;
                let bound = listener
                    .local_addr()
                    .map_err(|source| StartError::Bind { addr, source })?;
                let metrics = context.metrics.clone();
                let stop = shutdown.child_token();
                tasks.spawn(async move {
                    if let Err(e) = metrics::serve(listener, metrics, stop).await {
                        error!(error = %e, "metrics endpoint failed");
                    }
                });
                Some(bound)
            }
            None => None,
        };
        tasks.spawn(Arc::clone(&context.handover).keep_time());
        tasks.spawn(Arc::clone(&context.switch_log).run(shutdown.child_token()));
        let (accept_control, orders) = mpsc::channel(1);
        tasks.spawn(accept_loop(
            listener,
            context.clone(),
            shutdown.child_token(),
            orders,
            Sessions::new(settings.max_sessions),
        ));
        let tls_listen_addr = match &settings.miner_tls {
            Some((addr, files)) => {
                let tls = switchyard_tls::ServerTls::load("miners", files.clone(), &[])?;
                let listener = bind_miners(*addr).map_err(|source| StartError::Bind {
                    addr: *addr,
                    source,
                })?;
                let bound = listener.local_addr().ok();
                tasks.spawn(crate::tls_miners::serve(
                    listener,
                    tls,
                    context.clone(),
                    settings.max_sessions,
                    shutdown.child_token(),
                ));
                bound
            }
            None => None,
        };
        info!(%listen_addr, ?metrics_addr, ?tls_listen_addr,
            server_id = context.session_ids.server_id(),
            chain = settings.chain.as_str(), "proxy listening");
        Ok(Self {
            listen_addr,
            metrics_addr,
            tls_listen_addr,
            context,
            shutdown,
            tasks,
            accept_control,
            lease: None,
        })
    }

    /// Serves the connections queued on a listener the config moved away from, then closes
    /// it.
    fn serve_queued(&mut self, old: std::net::TcpListener) {
        let ctx = self.context.clone();
        self.tasks.spawn(async move {
            let mut sessions = JoinSet::new();
            if old.set_nonblocking(true).is_ok() {
                while let Ok((socket, peer)) = old.accept() {
                    let Ok(socket) = tokio::net::TcpStream::from_std(socket) else {
                        continue;
                    };
                    sessions.spawn(session::run(ctx.clone(), socket, peer));
                }
            }
            drop(old);
            while sessions.join_next().await.is_some() {}
        });
    }

    /// Runs sessions handed over by a hot upgrade, beside the ones the accept loop starts.
    async fn take_over(&mut self, handed: Vec<HandedSession>) {
        if handed.is_empty() {
            return;
        }
        let (reply, frozen) = oneshot::channel();
        if self
            .accept_control
            .send(AcceptControl::Adopt(handed, reply))
            .await
            .is_ok()
        {
            let _ = frozen.await;
        }
    }

    /// The hot upgrade (SPEC §9, [`crate::upgrade`]): checks that `invocation` can start,
    /// freezes the listener and the relaying sessions, and execs it with everything handed
    /// over. Returns only when the upgrade did not happen; the proxy then keeps serving (the
    /// sessions frozen meanwhile resume where they stopped).
    pub async fn upgrade(&mut self, invocation: &Invocation) -> Result<(), UpgradeError> {
        invocation.check().await?;
        let frozen_at_ms = upgrade::wall_ms();
        let freezing = std::time::Instant::now();
        let (reply, frozen) = oneshot::channel();
        self.accept_control
            .send(AcceptControl::Freeze(reply))
            .await
            .map_err(|_| UpgradeError::ShuttingDown)?;
        let Frozen {
            listener,
            sessions,
            mut handed,
            in_handshake,
        } = frozen.await.map_err(|_| UpgradeError::ShuttingDown)?;
        // The busiest first: the new image resumes them in this order.
        handed.sort_by_key(|s| std::cmp::Reverse(s.active_at));
        let server_id = self.context.session_ids.server_id();
        let listener = match listener.into_std() {
            Ok(listener) => OwnedFd::from(listener),
            Err(e) => {
                error!(error = %e, "cannot hand the listener over; serving on without it");
                return Err(e.into());
            }
        };
        let handover = HandOver {
            listener: Some(listener),
            listen_addr: self.listen_addr,
            lease: self
                .lease
                .clone()
                .map(|lease| ServerIdLease { server_id, ..lease }),
            server_id,
            sid_cursor: self.context.session_ids.cursor(),
            closed_in_handshake: in_handshake,
            frozen_at_ms,
            sessions: handed,
        };
        info!(
            sessions = handover.sessions.len(),
            closed_in_handshake = in_handshake,
            freeze_ms = freezing.elapsed().as_millis() as u64,
            exe = %invocation.exe.display(),
            "hot upgrade: handing over"
        );
        let (mut back, error) = handover.exec(invocation);
        error!(%error, "hot upgrade failed: this process keeps serving every session");
        self.context.handover.clear();
        let listener = back
            .listener
            .take()
            .map(std::net::TcpListener::from)
            .and_then(|l| TcpListener::from_std(l).ok());
        let Some(listener) = listener else {
            error!("the listener could not be taken back: no new miners are accepted");
            return Err(error);
        };
        let (accept_control, orders) = mpsc::channel(1);
        self.accept_control = accept_control;
        self.tasks.spawn(accept_loop(
            listener,
            self.context.clone(),
            self.shutdown.child_token(),
            orders,
            sessions,
        ));
        self.take_over(back.sessions).await;
        Err(error)
    }

    /// Stops accepting, ends every session, releases the lease, and waits for it all (at most
    /// a few seconds).
    pub async fn shutdown(mut self) {
        self.shutdown.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(10), async {
            while self.tasks.join_next().await.is_some() {}
        })
        .await;
    }
}

/// The accept queue of the miners' listener. A pool's miners reconnect in bursts (after a
/// proxy restart, or a load balancer moving them): with the usual 128, a burst of a few
/// thousand overflows the queue and each dropped SYN waits a whole second for TCP's
/// retransmission. The kernel caps it at `net.core.somaxconn`.
const MINER_BACKLOG: u32 = 4096;

/// The time to live assumed for a lease taken back from the cache file while no control
/// replica answers: renewals are tried every third of it.
const SAVED_LEASE_TTL: Duration = Duration::from_secs(30);

/// Binds the miners' listener with [`MINER_BACKLOG`].
fn bind_miners(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(MINER_BACKLOG)
}

/// Accepts miners while there is room (`MaxSessions`); one task per session.
/// The open-file limit assumed when `/proc/self/limits` cannot be read.
const FALLBACK_OPEN_FILES: usize = 1024;

/// The sessions the accept loop runs, and the limit on how many (`MaxSessions`).
struct Sessions {
    tasks: JoinSet<()>,
    limit: Arc<Semaphore>,
}

impl Sessions {
    fn new(max_sessions: usize) -> Self {
        Self {
            tasks: JoinSet::new(),
            limit: Arc::new(Semaphore::new(max_sessions)),
        }
    }
}

/// Orders for the accept loop besides accepting.
enum AcceptControl {
    /// Stop accepting and gather the relaying sessions (hot upgrade).
    Freeze(oneshot::Sender<Frozen>),
    /// Run these sessions handed over by a hot upgrade.
    Adopt(Vec<HandedSession>, oneshot::Sender<()>),
}

/// The accept loop stopped for a hot upgrade: its listener, the sessions it still runs (in
/// their handshake), and the relaying ones handed over.
struct Frozen {
    listener: TcpListener,
    sessions: Sessions,
    handed: Vec<HandedSession>,
    in_handshake: u64,
}

/// Asks every relaying session to hand over and waits until they have (at most
/// [`FREEZE_TIMEOUT`]); the sessions handed over, and how many sessions remain (in their
/// handshake, or stuck in a write).
async fn freeze(ctx: &ProxyContext, sessions: &mut Sessions) -> (Vec<HandedSession>, u64) {
    let relaying = ctx.handover.request();
    let deadline = tokio::time::Instant::now() + FREEZE_TIMEOUT;
    // Woken once, by the last session to hand over (tasks that end are reaped after: a
    // wake-up per ending task would compete with the sessions for the set's lock).
    ctx.handover.all_handed_over(deadline).await;
    // The tasks of the sessions handed over end at once.
    while let Ok(Some(_)) =
        tokio::time::timeout(Duration::from_millis(20), sessions.tasks.join_next()).await
    {}
    let handed = ctx.handover.take_handed();
    let remaining = sessions.tasks.len() as u64;
    info!(
        relaying,
        handed = handed.len(),
        remaining,
        "hot upgrade: sessions frozen"
    );
    (handed, remaining)
}

/// Starts a session handed over by a hot upgrade.
fn adopt(ctx: &Arc<ProxyContext>, sessions: &mut Sessions, mut handed: HandedSession) {
    let sid = match handed.sid_guard.take() {
        Some(held) => held,
        None => ctx.session_ids.claim(handed.sid),
    };
    // Over the limit (a config that lowered it): kept all the same, never dropped.
    let permit = sessions.limit.clone().try_acquire_owned().ok();
    let ctx = ctx.clone();
    sessions.tasks.spawn(async move {
        session::resume(ctx, handed, sid).await;
        drop(permit);
    });
}

async fn accept_loop(
    listener: TcpListener,
    ctx: Arc<ProxyContext>,
    shutdown: CancellationToken,
    mut orders: mpsc::Receiver<AcceptControl>,
    mut sessions: Sessions,
) {
    loop {
        let accepted = tokio::select! {
            () = shutdown.cancelled() => break,
            Some(_) = sessions.tasks.join_next(), if !sessions.tasks.is_empty() => continue,
            Some(order) = orders.recv() => match order {
                AcceptControl::Freeze(reply) => {
                    let (handed, in_handshake) = freeze(&ctx, &mut sessions).await;
                    let _ = reply.send(Frozen { listener, sessions, handed, in_handshake });
                    return;
                }
                AcceptControl::Adopt(handed, reply) => {
                    for session in handed {
                        adopt(&ctx, &mut sessions, session);
                    }
                    let _ = reply.send(());
                    continue;
                }
            },
            accepted = listener.accept() => accepted,
        };

        let (socket, peer) = match accepted {
            Ok(pair) => pair,
            Err(e) => {
                // Out of file descriptors, most likely: drained upstreams go first; back off a
                // little rather than spin.
                ctx.drains.relieve();
                warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        // Two descriptors per session, one per drain: close drains before any miner could be
        // refused for want of a descriptor.
        if ctx.drains.short_for_one_more() {
            ctx.drains.relieve();
        }
        let Ok(permit) = sessions.limit.clone().try_acquire_owned() else {
            ctx.metrics.refused();
            drop(socket);
            continue;
        };
        let ctx = ctx.clone();
        // No cancellation token per session: at shutdown the set below aborts them all (a
        // token polled on every turn of every session would cost each line a lock).
        sessions.tasks.spawn(async move {
            session::run(ctx, socket, peer).await;
            drop(permit);
        });
    }
    sessions.tasks.shutdown().await;
}

/// The host name, for the lease.
fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}
