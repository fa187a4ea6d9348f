//! Assembly of the control service: opens the store, builds the core, and serves the gRPC
//! services (SwitcherAdmin, ProxyControl, `grpc.health.v1.Health`, reflection v1 and v1alpha)
//! until shutdown, when the health status turns NOT_SERVING and every stream ends. The one
//! [`ControlMetrics`] of the service is created here and handed to whoever counts; it is
//! served on `MetricsListenAddr` when set.

use std::{sync::Arc, time::Duration};

use switchyard_cli::Secret;
use switchyard_initializer::{listed::ListedUsers, puller::UserListPuller, sink::ListedUserSink};
use switchyard_proto::v1::{
    proxy_control_server::ProxyControlServer, switcher_admin_server::SwitcherAdminServer,
};
use switchyard_tls::ServerTls;
use thiserror::Error;
use tokio::{net::TcpListener, sync::watch};
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;
use tonic::service::interceptor::InterceptedService;
use tonic_health::ServingStatus;
use tower::limit::GlobalConcurrencyLimitLayer;
use tracing::{error, info, warn};

use crate::{
    autoreg::{
        AutoRegError, LocalRegistrations, Registrar, UserRegistrations, zookeeper::ZkRegistrations,
    },
    config::{ConfigError, ControlConfig, StoreChoice},
    core::SwitchCore,
    cron,
    grpc::{
        BearerAuth,
        admin::AdminService,
        proxy_control::{ProxyControlService, UserLookups},
    },
    http::{self, SwitchApiAuth},
    ingest::{self, CoreSink},
    leases::{LeaseError, LocalLeases, ServerIdLeases, zookeeper::ZkLeases},
    limits::ServerLimits,
    metrics::{
        ControlMetrics,
        endpoint::{self, ScrapeSources},
    },
    store::{StoreError, UserCoinStore, embedded::EmbeddedStore, zookeeper::ZooKeeperStore},
    subpool::SubPoolApi,
    zk_session::ZkSession,
};

/// The largest SwitcherAdmin request: 100,000 users of 128 bytes with room to spare.
const MAX_ADMIN_MESSAGE: usize = 32 * 1024 * 1024;

/// The names the health service reports, besides the whole server ("").
const SERVICE_NAMES: [&str; 2] = ["switchyard.v1.SwitcherAdmin", "switchyard.v1.ProxyControl"];

/// Why the control service could not start or stopped with an error.
#[derive(Debug, Error)]
pub enum ControlError {
    /// The configuration cannot work.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The store could not be opened or read.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// User-list ingestion could not be set up.
    #[error("user-list ingestion: {0}")]
    Ingestion(String),
    /// The server-ID lease registry could not be set up.
    #[error(transparent)]
    Leases(#[from] LeaseError),
    /// Auto-registration could not be set up.
    #[error(transparent)]
    AutoReg(#[from] AutoRegError),
    /// An address could not be listened on.
    #[error("cannot listen on {what} {addr}: {source}")]
    Listen {
        /// Which setting.
        what: &'static str,
        /// The address.
        addr: std::net::SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The TLS certificate, key or client CA could not be used.
    #[error("TLS: {0}")]
    Tls(#[from] switchyard_tls::TlsError),
    /// Reflection could not be set up (a bad descriptor set: a build defect).
    #[error("gRPC reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    /// The gRPC server failed.
    #[error("gRPC server: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// A control service ready to serve: the core over its store and the lease registry.
#[derive(Debug)]
pub struct ControlPlane {
    core: Arc<SwitchCore>,
    /// The users seen in the ingested user lists, served by the user-list API.
    listed: Arc<ListedUsers>,
    /// The HTTP switch API's address and credentials, when enabled.
    http_api: Option<(std::net::SocketAddr, SwitchApiAuth)>,
    /// The sub-pool coinbase API, served with the switch API.
    sub_pool: Arc<SubPoolApi>,
    /// The store's parts that can fail on their own (each ZooKeeper session), each reported
    /// by the health service under its name.
    store_parts: Vec<(&'static str, watch::Receiver<bool>)>,
    /// Whether the store can be reached: the health status follows it.
    available: tokio::sync::watch::Receiver<bool>,
    leases: Arc<dyn ServerIdLeases>,
    /// Auto-registration, when enabled.
    registrations: Option<Arc<dyn UserRegistrations>>,
    /// The bounds of the gRPC and HTTP servers.
    limits: ServerLimits,
    admin_token: Option<Secret>,
    proxy_token: Option<Secret>,
    /// The gRPC listener's TLS, when configured (reloaded as its files change).
    grpc_tls: Option<Arc<ServerTls>>,
    /// The HTTP listener's TLS, when configured.
    http_tls: Option<Arc<ServerTls>>,
    /// The service's metrics.
    metrics: ControlMetrics,
    /// Where they are served (`MetricsListenAddr`), when set.
    metrics_addr: Option<std::net::SocketAddr>,
}

impl ControlPlane {
    /// Validates the configuration, opens the store it names and loads it. Background work
    /// (following the store) runs until `shutdown`.
    pub async fn open(
        config: &ControlConfig,
        shutdown: CancellationToken,
    ) -> Result<Self, ControlError> {
        config.validate()?;
        // Secret files not read yet (an in-process caller's config) are read now.
        let config = &config.with_secret_files()?;
        // TLS files first: a bad certificate is reported before the store is opened.
        let grpc_tls = match config.grpc_tls()? {
            Some(files) => Some(ServerTls::load("gRPC", files, &[b"h2"])?),
            None => None,
        };
        let http_tls = match config.http_tls()? {
            Some(files) => Some(ServerTls::load("HTTP", files, &[b"http/1.1"])?),
            None => None,
        };
        let metrics = ControlMetrics::new();
        let mut zk_client = None;
        let (store, leases): (Arc<dyn UserCoinStore>, Arc<dyn ServerIdLeases>) = match config
            .store_choice()?
        {
            StoreChoice::Embedded => (
                Arc::new(EmbeddedStore::open(&config.data_dir)?),
                Arc::new(
                    LocalLeases::new(config.lease_ttl()?)
                        .with_conflict_counter(metrics.lease_conflicts()),
                ),
            ),
            StoreChoice::ZooKeeper => {
                let zk_settings = config.zk_settings()?;
                let request_timeout = zk_settings.request_timeout;
                // One main session, handed to each of its users (see `zk_session`).
                let main =
                    ZkSession::connect(&zk_settings.brokers, zk_settings.session_timeout).await?;
                let store = ZooKeeperStore::connect(zk_settings, &main)
                    .await?
                    .with_reconcile_counter(metrics.store_reconciles());
                let leases = ZkLeases::start(
                    main.client(),
                    config.lease_dirs()?,
                    config.lease_ttl()?,
                    request_timeout,
                    metrics.lease_conflicts(),
                    shutdown.clone(),
                )
                .await?;
                zk_client = Some(main.client());
                (Arc::new(store), Arc::new(leases))
            }
        };
        let core = Arc::new(
            SwitchCore::open_with_metrics(
                Arc::clone(&store),
                config.core_settings()?,
                metrics.clone(),
                shutdown.clone(),
            )
            .await?,
        );
        tokio::spawn(Arc::clone(&core).run_pending(shutdown.clone()));
        // The sub-pool coinbase API reaches job makers through ZooKeeper only.
        let sub_pool = match (config.sub_pool()?, &zk_client) {
            (None, _) => SubPoolApi::disabled(),
            (Some(settings), None) => {
                warn!(
                    base_dir = %settings.base_dir,
                    "ZKSubPoolUpdateBaseDir is set but the store is embedded: the sub-pool coinbase API needs ZooKeeper and answers 403"
                );
                SubPoolApi::without_zookeeper()
            }
            (Some(settings), Some(zk)) => SubPoolApi::zookeeper(
                Arc::clone(zk),
                settings,
                config.zk_settings()?.request_timeout,
            ),
        };
        // Auto-registration: in the process on the embedded store, in ZKAutoRegWatchDir on
        // ZooKeeper (shared with the other replicas and the Go proxies).
        let registrations: Option<Arc<dyn UserRegistrations>> = match config.auto_reg()? {
            None => None,
            Some(settings) => {
                let registrar = Arc::new(Registrar::new(Arc::clone(&core), settings)?);
                Some(match zk_client {
                    None => Arc::new(LocalRegistrations::new(registrar, shutdown.clone())),
                    Some(zk) => {
                        let zk_settings = config.zk_settings()?;
                        Arc::new(
                            ZkRegistrations::start(
                                zk,
                                registrar,
                                &zk_settings.deployment_dir,
                                zk_settings.request_timeout,
                                shutdown.clone(),
                            )
                            .await?,
                        )
                    }
                })
            }
        };
        // User-list ingestion: one puller per coin, writing through the core.
        let listed = Arc::new(ListedUsers::new());
        let sink: Arc<dyn ListedUserSink> = Arc::new(CoreSink::new(Arc::clone(&core)));
        for settings in config.user_list_pullers()? {
            let coin = settings.coin.clone();
            let puller = UserListPuller::new(settings, Arc::clone(&sink), Arc::clone(&listed))
                .map_err(|e| ControlError::Ingestion(e.to_string()))?;
            tokio::spawn(ingest::run_puller(
                puller,
                coin,
                metrics.clone(),
                shutdown.clone(),
            ));
        }
        if config.enable_cron_job {
            let pull = config.user_coin_map_pull()?;
            let core = Arc::clone(&core);
            let shutdown = shutdown.clone();
            tokio::spawn(async move {
                if let Err(e) = cron::run(core, pull, shutdown).await {
                    error!(error = %e, "the scheduled user->coin pull cannot run");
                }
            });
        }
        info!(
            store = store.kind(),
            users = core.index().user_count(),
            revision = core.index().revision(),
            store_id = core.index().store_id(),
            "state loaded"
        );
        let http_api = config
            .http_api()?
            .map(|(addr, user, password)| (addr, SwitchApiAuth::new(user, password)));
        Ok(Self {
            listed,
            http_api,
            sub_pool: Arc::new(sub_pool),
            available: store.available(),
            store_parts: store.parts(),
            core,
            leases,
            registrations,
            limits: config.server_limits()?,
            admin_token: config.admin_token(),
            proxy_token: config.proxy_token(),
            grpc_tls,
            http_tls,
            metrics,
            metrics_addr: config.metrics_addr()?,
        })
    }

    /// The switching core, for in-process adapters and tests.
    pub fn core(&self) -> &Arc<SwitchCore> {
        &self.core
    }

    /// The service's metrics.
    pub fn metrics(&self) -> &ControlMetrics {
        &self.metrics
    }

    /// Serves gRPC on `listener`, the HTTP switch API on `ListenAddr` when enabled, and the
    /// metrics on `MetricsListenAddr` when set, until `shutdown` is cancelled. On shutdown the
    /// health status turns NOT_SERVING, WatchSwitches streams end, and in-flight calls finish.
    pub async fn serve(
        mut self,
        listener: TcpListener,
        shutdown: CancellationToken,
    ) -> Result<(), ControlError> {
        let metrics_task = match self.metrics_addr {
            Some(addr) => {
                let metrics_listener =
                    TcpListener::bind(addr)
                        .await
                        .map_err(|source| ControlError::Listen {
                            what: "MetricsListenAddr",
                            addr,
                            source,
                        })?;
                let router = endpoint::router(
                    self.metrics.clone(),
                    ScrapeSources::new(
                        Arc::clone(&self.core),
                        self.available.clone(),
                        self.store_parts.clone(),
                    ),
                );
                Some(tokio::spawn(endpoint::serve(
                    metrics_listener,
                    router,
                    self.limits.http,
                    shutdown.clone(),
                )))
            }
            None => None,
        };
        let http_task = match self.http_api.take() {
            Some((addr, auth)) => {
                let http_listener =
                    TcpListener::bind(addr)
                        .await
                        .map_err(|source| ControlError::Listen {
                            what: "ListenAddr",
                            addr,
                            source,
                        })?;
                // The switch API and the user-list API share ListenAddr, as in the Go programs.
                let router = http::router_with_sub_pool(
                    Arc::clone(&self.core),
                    auth,
                    Arc::clone(&self.sub_pool),
                )
                .merge(switchyard_initializer::api::router_with_page_size(
                    Arc::clone(&self.listed),
                    self.limits.user_list_page_size,
                ));
                Some(match &self.http_tls {
                    Some(tls) => tokio::spawn(http::serve_tls(
                        http_listener,
                        Arc::clone(tls),
                        router,
                        self.limits.http,
                        shutdown.clone(),
                    )),
                    None => tokio::spawn(http::serve(
                        http_listener,
                        router,
                        self.limits.http,
                        shutdown.clone(),
                    )),
                })
            }
            None => None,
        };
        let (health, health_service) = tonic_health::server::health_reporter();
        let reflection = || {
            tonic_reflection::server::Builder::configure()
                .register_encoded_file_descriptor_set(switchyard_proto::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        };
        // v1 for current clients, v1alpha for older grpcurl builds.
        let reflection_v1 = reflection().build_v1()?;
        let reflection_v1alpha = reflection().build_v1alpha()?;

        // Large batches (SwitchCoins, IngestUserList) need more than gRPC's default 4 MiB.
        let admin = InterceptedService::new(
            SwitcherAdminServer::new(AdminService::new(
                Arc::clone(&self.core),
                Arc::clone(&self.leases),
            ))
            .max_decoding_message_size(MAX_ADMIN_MESSAGE),
            BearerAuth::new(self.admin_token.clone()),
        );
        let proxy_control = ProxyControlServer::with_interceptor(
            ProxyControlService::new(
                Arc::clone(self.core.index()),
                Arc::clone(&self.leases),
                shutdown.clone(),
            )
            .with_watch_limits(
                self.limits.max_watch_streams,
                self.limits.watch_buffer_bytes,
            )
            .with_registrations(self.registrations.clone())
            .with_lookups(UserLookups::new(Arc::clone(&self.core)))
            .with_metrics(self.metrics.clone()),
            BearerAuth::new(self.proxy_token.clone()),
        );

        // SERVING while the store can be reached, NOT_SERVING while it cannot or after shutdown.
        let mut available = self.available.clone();
        let health_task = {
            let health = health.clone();
            let shutdown = shutdown.clone();
            tokio::spawn(async move {
                loop {
                    let up = *available.borrow_and_update();
                    let status = if up {
                        ServingStatus::Serving
                    } else {
                        warn!("the store cannot be reached: health NOT_SERVING");
                        ServingStatus::NotServing
                    };
                    for name in std::iter::once("").chain(SERVICE_NAMES) {
                        health.set_service_status(name, status).await;
                    }
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        changed = available.changed() => if changed.is_err() { return },
                    }
                }
            })
        };
        // Each ZooKeeper session on its own, for operators (the whole server follows the
        // store as a whole, above).
        let part_tasks: Vec<_> = self
            .store_parts
            .iter()
            .map(|(name, up)| {
                let (name, mut up) = (*name, up.clone());
                let health = health.clone();
                let shutdown = shutdown.clone();
                tokio::spawn(async move {
                    loop {
                        let status = if *up.borrow_and_update() {
                            ServingStatus::Serving
                        } else {
                            ServingStatus::NotServing
                        };
                        health.set_service_status(name, status).await;
                        tokio::select! {
                            _ = shutdown.cancelled() => return,
                            changed = up.changed() => if changed.is_err() { return },
                        }
                    }
                })
            })
            .collect();
        let local = listener.local_addr().ok();
        info!(
            addr = ?local,
            tls = self.grpc_tls.is_some(),
            client_certificates = self.grpc_tls.as_ref().is_some_and(|t| t.mutual()),
            "gRPC listening"
        );

        let on_shutdown = {
            let shutdown = shutdown.clone();
            let health = health.clone();
            async move {
                shutdown.cancelled().await;
                health_task.abort();
                for task in &part_tasks {
                    task.abort();
                }
                info!("shutting down: health NOT_SERVING, ending streams");
                for name in std::iter::once("").chain(SERVICE_NAMES) {
                    health
                        .set_service_status(name, ServingStatus::NotServing)
                        .await;
                }
            }
        };
        // Bounds: calls per connection (more wait), calls in all (more are refused at once:
        // load shedding answers RESOURCE_EXHAUSTED), and a deadline on each call's future,
        // which for a stream ends when its answer starts, so streams live on.
        let limits = self.limits;
        let router = tonic::transport::Server::builder()
            .concurrency_limit_per_connection(limits.grpc_max_concurrent_requests_per_connection)
            .timeout(limits.grpc_request_timeout)
            // Outermost: every call is counted, those the load shedder refuses too.
            .layer(
                tower::ServiceBuilder::new()
                    .layer(self.metrics.grpc_layer())
                    .load_shed()
                    .layer(GlobalConcurrencyLimitLayer::new(
                        limits.grpc_max_concurrent_requests,
                    )),
            )
            .tcp_nodelay(true)
            .http2_keepalive_interval(Some(Duration::from_secs(30)))
            .http2_keepalive_timeout(Some(Duration::from_secs(10)))
            .add_service(health_service)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            .add_service(admin)
            .add_service(proxy_control);
        match &self.grpc_tls {
            Some(tls) => {
                tokio::spawn(switchyard_tls::keep_reloaded(
                    Arc::clone(tls),
                    shutdown.child_token(),
                ));
                let incoming =
                    switchyard_tls::accept_tls(listener, Arc::clone(tls), shutdown.child_token());
                router
                    .serve_with_incoming_shutdown(incoming, on_shutdown)
                    .await?;
            }
            None => {
                router
                    .serve_with_incoming_shutdown(TcpListenerStream::new(listener), on_shutdown)
                    .await?;
            }
        }
        if let Some(task) = http_task {
            match task.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => warn!(error = %e, "the HTTP switch API failed"),
                Err(e) => warn!(error = %e, "the HTTP switch API task failed"),
            }
        }
        if let Some(task) = metrics_task {
            match task.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => warn!(error = %e, "the metrics endpoint failed"),
                Err(e) => warn!(error = %e, "the metrics endpoint task failed"),
            }
        }
        info!("gRPC server stopped");
        Ok(())
    }
}
