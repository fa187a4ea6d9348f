//! The proxy as a whole: the miners' listener with its session limit, the cache fed by the
//! control plane, the server-ID lease, the metrics endpoint, and a clean shutdown.
//! [`Proxy::start`] is what the binary runs and what tests start in-process.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use thiserror::Error;
use tokio::{net::TcpListener, sync::Semaphore, task::JoinSet};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::{
    cache::UserCoinCache,
    config::ProxySettings,
    control::{self, ControlEndpoints, ControlError, LeaseRequest},
    metrics::{self, Metrics},
    session::{self, ProxyContext, SessionIds},
    session_id::BadServerId,
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
}

/// A running proxy.
pub struct Proxy {
    /// Where miners connect.
    pub listen_addr: SocketAddr,
    /// Where the metrics are served, if anywhere.
    pub metrics_addr: Option<SocketAddr>,
    /// The shared state of the sessions (cache, metrics, settings).
    pub context: Arc<ProxyContext>,
    shutdown: CancellationToken,
    tasks: JoinSet<()>,
}

impl Proxy {
    /// Binds the listeners, starts following the control plane, takes a server-ID lease when
    /// none is configured (this waits for a control replica to answer), and starts accepting
    /// miners.
    pub async fn start(settings: ProxySettings) -> Result<Self, StartError> {
        let listener = bind_miners(settings.listen_addr).map_err(|source| StartError::Bind {
            addr: settings.listen_addr,
            source,
        })?;
        let listen_addr = listener.local_addr().map_err(|source| StartError::Bind {
            addr: settings.listen_addr,
            source,
        })?;
        let shutdown = CancellationToken::new();
        let mut tasks = JoinSet::new();
        let endpoints =
            ControlEndpoints::new(&settings.control_endpoints, settings.proxy_token.clone())?;
        let cache = UserCoinCache::new();
        let metrics = Metrics::new();
        metrics.watch_cache(cache.clone());
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
        let (server_id, lease) = match settings.server_id {
            Some(id) => (id, None),
            None => {
                let lease = control::acquire_server_id(&endpoints, &lease_request).await?;
                info!(server_id = lease.server_id, "server ID leased");
                (lease.server_id, Some(lease))
            }
        };
        let context = Self::context(&settings, &cache, &endpoints, &metrics, server_id)?;
        if let Some(lease) = lease {
            let (current, mut changes) = tokio::sync::watch::channel(server_id);
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
        Self::finish(settings, listener, listen_addr, context, shutdown, tasks).await
    }

    fn context(
        settings: &ProxySettings,
        cache: &Arc<UserCoinCache>,
        endpoints: &ControlEndpoints,
        metrics: &Arc<Metrics>,
        server_id: u8,
    ) -> Result<Arc<ProxyContext>, StartError> {
        metrics.set_server_id(server_id);
        Ok(Arc::new(ProxyContext {
            session_ids: SessionIds::new(server_id, settings.chain)?,
            settings: settings.clone(),
            cache: cache.clone(),
            control: endpoints.clone(),
            metrics: metrics.clone(),
            registration_waiters: Arc::new(Semaphore::new(settings.auto_reg_max_wait)),
            drains: session::DrainBudget::new(
                session::open_file_limit().unwrap_or(FALLBACK_OPEN_FILES),
            ),
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
        tasks.spawn(accept_loop(
            listener,
            context.clone(),
            shutdown.child_token(),
        ));
        info!(%listen_addr, ?metrics_addr, server_id = context.session_ids.server_id(),
            chain = settings.chain.as_str(), "proxy listening");
        Ok(Self {
            listen_addr,
            metrics_addr,
            context,
            shutdown,
            tasks,
        })
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

async fn accept_loop(listener: TcpListener, ctx: Arc<ProxyContext>, shutdown: CancellationToken) {
    let limit = Arc::new(Semaphore::new(ctx.settings.max_sessions));
    let mut sessions = JoinSet::new();
    loop {
        let accepted = tokio::select! {
            () = shutdown.cancelled() => break,
            Some(_) = sessions.join_next(), if !sessions.is_empty() => continue,
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
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            ctx.metrics.refused();
            drop(socket);
            continue;
        };
        let ctx = ctx.clone();
        // No cancellation token per session: at shutdown the set below aborts them all (a
        // token polled on every turn of every session would cost each line a lock).
        sessions.spawn(async move {
            session::run(ctx, socket, peer).await;
            drop(permit);
        });
    }
    sessions.shutdown().await;
}

/// The host name, for the lease.
fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}
