//! The proxy's gRPC client of the control plane (`switchyard.v1.ProxyControl`): the
//! WatchSwitches feed of the local cache ([`follow_switches`]), server-ID leases
//! ([`acquire_server_id`], [`keep_server_id`]) and auto-registration requests
//! ([`request_registration`]).
//!
//! The control plane may run as several replicas: [`ControlEndpoints`] lists them, and every
//! call fails over from one to the next. Calls carry `authorization: Bearer <token>` when a
//! proxy token is configured. Channels connect lazily (and reconnect by themselves), so a
//! proxy starts, and keeps serving from its cache, while the control plane is away.

#![forbid(unsafe_code)]

use std::{
    collections::HashMap,
    fmt,
    future::Future,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use rand::Rng;
use switchyard_proto::v1::{
    AcquireServerIdRequest, LookupUserRequest, ReleaseServerIdRequest, RenewServerIdRequest,
    RequestUserRegistrationRequest, WatchSwitchesRequest, proxy_control_client::ProxyControlClient,
};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tonic::{
    Code, Request, Status,
    metadata::{Ascii, MetadataValue},
    transport::{Channel, Endpoint},
};
use tracing::{debug, error, info, warn};

use crate::cache::UserCoinCache;

/// How long opening a TCP connection to a control replica may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long one unary call (lease, registration) may take, connecting included.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// HTTP/2 pings on idle connections, so that a replica that vanished without closing its
/// connection (a dead host, a cut network) is noticed and the stream fails over.
const KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(10);
/// How long a ping may go unanswered before the connection counts as dead.
const KEEP_ALIVE_TIMEOUT: Duration = Duration::from_secs(5);
/// The largest stream message accepted: a snapshot message holds at most 1,000 records of
/// 128-byte names, far below this.
const MAX_MESSAGE: usize = 16 * 1024 * 1024;
/// The first reconnect delay; it doubles after each failure up to [`BACKOFF_MAX`].
const BACKOFF_START: Duration = Duration::from_millis(100);
/// The longest reconnect delay.
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Rounds over every endpoint [`acquire_server_id`] makes before giving up.
const ACQUIRE_ROUNDS: u32 = 5;
/// The shortest renewal period, whatever TTL the control plane grants.
const MIN_RENEW_PERIOD: Duration = Duration::from_millis(200);
/// How long releasing the lease on shutdown may take, per endpoint.
const RELEASE_TIMEOUT: Duration = Duration::from_secs(2);

/// Why a call to the control plane failed.
#[derive(thiserror::Error, Debug)]
pub enum ControlError {
    /// No control endpoint was configured.
    #[error("no control-plane endpoint is configured")]
    NoEndpoints,
    /// A control endpoint URL is not usable.
    #[error("bad control-plane endpoint {url:?}: {reason}")]
    InvalidEndpoint {
        /// The URL as given.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The proxy token cannot be sent as gRPC metadata (e.g. it holds a non-ASCII character).
    #[error("the control-plane proxy token is not valid header text")]
    InvalidToken,
    /// The control replica could not be reached or answered with an error status (an
    /// unreachable replica is `UNAVAILABLE`).
    #[error("control plane {endpoint}: {status}")]
    Status {
        /// The replica's URL.
        endpoint: String,
        /// The status it answered (or the transport failure as a status).
        status: Box<Status>,
    },
    /// The call did not finish in time.
    #[error("control plane {endpoint}: no answer within {after:?}")]
    Timeout {
        /// The replica's URL.
        endpoint: String,
        /// The time allowed.
        after: Duration,
    },
    /// The control replica answered something this proxy cannot use.
    #[error("control plane {endpoint}: {reason}")]
    BadResponse {
        /// The replica's URL.
        endpoint: String,
        /// What was wrong.
        reason: String,
    },
}

impl ControlError {
    /// The gRPC status code of the failure when the replica answered with an error status
    /// (e.g. `FAILED_PRECONDITION` from RequestUserRegistration when auto-registration is off).
    pub fn code(&self) -> Option<Code> {
        match self {
            Self::Status { status, .. } => Some(status.code()),
            _ => None,
        }
    }

    /// Whether the failure is the control plane's definite answer, the same from every replica
    /// (bad input, refused, not enabled), rather than a replica being unreachable or unwell.
    pub fn is_definitive(&self) -> bool {
        matches!(
            self.code(),
            Some(
                Code::InvalidArgument
                    | Code::NotFound
                    | Code::AlreadyExists
                    | Code::PermissionDenied
                    | Code::ResourceExhausted
                    | Code::FailedPrecondition
                    | Code::OutOfRange
                    | Code::Unimplemented
                    | Code::Unauthenticated
            )
        )
    }
}

/// One control replica: its URL and its channel, created on first use.
struct Replica {
    url: String,
    endpoint: Endpoint,
    /// The TLS files of an `https://` replica: when they change (a certificate rotation), the
    /// next call makes a new channel with them; calls and streams already open keep theirs.
    tls: Option<switchyard_tls::ClientTlsFiles>,
    channel: Mutex<Option<(Channel, Option<switchyard_tls::FilesStamp>)>>,
}

impl Replica {
    fn channel(&self) -> Channel {
        let stamp = self.tls.as_ref().map(switchyard_tls::ClientTlsFiles::stamp);
        let mut current = self
            .channel
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match current.as_mut() {
            Some((channel, seen)) if *seen == stamp => channel.clone(),
            Some((channel, seen)) => {
                // Rotated files: read them again. A broken pair keeps the channel in use and
                // is reported once (until the files change again).
                *seen = stamp;
                match self.reloaded_endpoint() {
                    Ok(endpoint) => {
                        info!(endpoint = %self.url, "control TLS files changed: new connections use them");
                        *channel = endpoint.connect_lazy();
                    }
                    Err(e) => warn!(endpoint = %self.url, error = %e,
                        "control TLS files changed but cannot be used: the previous ones stay"),
                }
                channel.clone()
            }
            None => {
                let channel = self.endpoint.connect_lazy();
                *current = Some((channel.clone(), stamp));
                channel
            }
        }
    }

    fn reloaded_endpoint(&self) -> Result<Endpoint, String> {
        let Some(files) = &self.tls else {
            return Ok(self.endpoint.clone());
        };
        let config = files.tonic_config().map_err(|e| e.to_string())?;
        self.endpoint
            .clone()
            .tls_config(config)
            .map_err(|e| e.to_string())
    }
}

struct Shared {
    replicas: Vec<Replica>,
    /// `Bearer <token>`, when a proxy token is configured.
    authorization: Option<MetadataValue<Ascii>>,
    /// The replica that answered last: calls try it first.
    preferred: AtomicUsize,
}

/// The control plane's replicas, tried in turn with failover. Cheap to clone: clones share
/// the channels.
#[derive(Clone)]
pub struct ControlEndpoints {
    shared: Arc<Shared>,
}

impl fmt::Debug for ControlEndpoints {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the token.
        f.debug_struct("ControlEndpoints")
            .field("urls", &self.urls())
            .field("token", &self.shared.authorization.is_some())
            .finish()
    }
}

impl ControlEndpoints {
    /// The control replicas at `urls` (e.g. `"http://127.0.0.1:7100"`), plain: see
    /// [`Self::with_tls`] for `https://` ones. `token` is the control service's proxy token, sent
    /// as `authorization: Bearer <token>` on every call (`None` or empty: no header). Fails with
    /// a clear error on an empty list, a URL that does not parse, has another scheme or no
    /// host, or a token that is not header text. Nothing connects here: each replica's channel
    /// is created on first use and connects lazily, with a 5 s connect timeout.
    pub fn new(urls: &[String], token: Option<String>) -> Result<Self, ControlError> {
        Self::with_tls(urls, token, None)
    }

    /// [`Self::new`], with `https://` replicas reached over TLS (rustls) as `tls` says: the CA
    /// to trust and, for mutual TLS, this proxy's certificate. An `https://` URL without `tls`
    /// is refused (there are no system roots to trust).
    pub fn with_tls(
        urls: &[String],
        token: Option<String>,
        tls: Option<&switchyard_tls::ClientTlsFiles>,
    ) -> Result<Self, ControlError> {
        if urls.is_empty() {
            return Err(ControlError::NoEndpoints);
        }
        let config = tls
            .map(|files| {
                files
                    .tonic_config()
                    .map_err(|e| ControlError::InvalidEndpoint {
                        url: urls.join(","),
                        reason: e.to_string(),
                    })
            })
            .transpose()?;
        let replicas = urls
            .iter()
            .map(|url| replica(url, config.as_ref(), tls))
            .collect::<Result<Vec<_>, _>>()?;
        let authorization = match token.filter(|t| !t.is_empty()) {
            Some(token) => Some(
                format!("Bearer {token}")
                    .parse::<MetadataValue<Ascii>>()
                    .map_err(|_| ControlError::InvalidToken)?,
            ),
            None => None,
        };
        Ok(Self {
            shared: Arc::new(Shared {
                replicas,
                authorization,
                preferred: AtomicUsize::new(0),
            }),
        })
    }

    /// The replicas' URLs, in configured order.
    pub fn urls(&self) -> Vec<&str> {
        self.shared
            .replicas
            .iter()
            .map(|r| r.url.as_str())
            .collect()
    }

    fn count(&self) -> usize {
        self.shared.replicas.len()
    }

    fn url(&self, index: usize) -> &str {
        &self.shared.replicas[index % self.count()].url
    }

    fn client(&self, index: usize) -> ProxyControlClient<Channel> {
        ProxyControlClient::new(self.shared.replicas[index % self.count()].channel())
            .max_decoding_message_size(MAX_MESSAGE)
    }

    fn preferred(&self) -> usize {
        self.shared.preferred.load(Ordering::Relaxed) % self.count()
    }

    fn prefer(&self, index: usize) {
        self.shared
            .preferred
            .store(index % self.count(), Ordering::Relaxed);
    }

    /// `message` with the bearer token attached.
    fn request<T>(&self, message: T) -> Request<T> {
        let mut request = Request::new(message);
        if let Some(value) = &self.shared.authorization {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        request
    }

    /// One unary call on replica `index`, with [`CALL_TIMEOUT`].
    async fn call_one<T, F, Fut>(&self, index: usize, call: &mut F) -> Result<T, ControlError>
    where
        F: FnMut(ProxyControlClient<Channel>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, Status>>,
    {
        let endpoint = self.url(index).to_owned();
        match tokio::time::timeout(CALL_TIMEOUT, call(self.client(index))).await {
            Ok(Ok(response)) => Ok(response.into_inner()),
            Ok(Err(status)) => Err(ControlError::Status {
                endpoint,
                status: Box::new(status),
            }),
            Err(_) => Err(ControlError::Timeout {
                endpoint,
                after: CALL_TIMEOUT,
            }),
        }
    }

    /// One round of a unary call: each replica once, the preferred one first, until one
    /// answers. A definitive error (see [`ControlError::is_definitive`]) ends the round at
    /// once; otherwise the last replica's error is returned.
    async fn call_each<T, F, Fut>(&self, what: &str, mut call: F) -> Result<T, ControlError>
    where
        F: FnMut(ProxyControlClient<Channel>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, Status>>,
    {
        let start = self.preferred();
        let mut last = ControlError::NoEndpoints;
        for step in 0..self.count() {
            let index = (start + step) % self.count();
            match self.call_one(index, &mut call).await {
                Ok(answer) => {
                    self.prefer(index);
                    return Ok(answer);
                }
                Err(e) if e.is_definitive() => return Err(e),
                Err(e) => {
                    warn!(endpoint = self.url(index), error = %e, "{what} failed; trying the next control replica");
                    last = e;
                }
            }
        }
        Err(last)
    }
}

/// Validates one URL and prepares its endpoint.
fn replica(
    url: &str,
    tls: Option<&tonic::transport::ClientTlsConfig>,
    files: Option<&switchyard_tls::ClientTlsFiles>,
) -> Result<Replica, ControlError> {
    let invalid = |reason: String| ControlError::InvalidEndpoint {
        url: url.to_owned(),
        reason,
    };
    let endpoint = Endpoint::from_shared(url.to_owned()).map_err(|e| invalid(e.to_string()))?;
    let endpoint = match (endpoint.uri().scheme_str(), tls) {
        (Some("http"), _) => endpoint,
        (Some("https"), Some(tls)) => endpoint
            .tls_config(tls.clone())
            .map_err(|e| invalid(format!("TLS: {e}")))?,
        (Some("https"), None) => {
            return Err(invalid(
                "https needs ControlTlsCaFile (the CA of the control service's certificate)".into(),
            ));
        }
        (Some(other), _) => return Err(invalid(format!("scheme {other:?} is not http"))),
        (None, _) => return Err(invalid("no scheme: write it as http://HOST:PORT".into())),
    };
    if endpoint.uri().host().is_none_or(str::is_empty) {
        return Err(invalid("no host: write it as http://HOST:PORT".into()));
    }
    let path = endpoint.uri().path();
    if !(path.is_empty() || path == "/") {
        return Err(invalid(format!(
            "a path ({path:?}) is not supported: write it as http://HOST:PORT"
        )));
    }
    let endpoint = endpoint
        .connect_timeout(CONNECT_TIMEOUT)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(KEEP_ALIVE_INTERVAL)
        .keep_alive_timeout(KEEP_ALIVE_TIMEOUT)
        .keep_alive_while_idle(true);
    Ok(Replica {
        url: url.to_owned(),
        tls: files.filter(|_| url.starts_with("https://")).cloned(),
        endpoint,
        channel: Mutex::new(None),
    })
}

/// Reconnect delays: [`BACKOFF_START`] doubling to [`BACKOFF_MAX`], each with jitter (between
/// half and all of the nominal delay), so that a fleet of proxies does not reconnect in step.
#[derive(Debug)]
struct Backoff {
    next: Duration,
    max: Duration,
}

impl Backoff {
    fn new() -> Self {
        Self {
            next: BACKOFF_START,
            max: BACKOFF_MAX,
        }
    }

    fn reset(&mut self) {
        self.next = BACKOFF_START;
    }

    /// The next delay, capped at `cap` as well.
    fn delay(&mut self, cap: Duration) -> Duration {
        let nominal = self.next.min(self.max).min(cap);
        self.next = (self.next * 2).min(self.max);
        jitter(nominal)
    }
}

/// A delay between half of `nominal` and all of it.
fn jitter(nominal: Duration) -> Duration {
    let half = u64::try_from(nominal.as_millis() / 2).unwrap_or(u64::MAX);
    Duration::from_millis(half + rand::rng().random_range(0..=half))
}

/// Sleeps for `delay`; false when `shutdown` came first.
async fn sleep_unless_shutdown(delay: Duration, shutdown: &CancellationToken) -> bool {
    tokio::select! {
        _ = shutdown.cancelled() => false,
        _ = tokio::time::sleep(delay) => true,
    }
}

/// How one WatchSwitches stream went.
struct StreamEnd {
    /// It completed its initial sync (snapshot or resume), so the replica was healthy.
    synced: bool,
    /// Why it ended: `None` when the control plane ended it (e.g. a replica shutting down).
    error: Option<ControlError>,
}

/// Keeps `cache` fed from the control plane until `shutdown` is cancelled.
///
/// Each stream asks WatchSwitches for what the cache lacks (`resume_revision` =
/// [`UserCoinCache::revision`], `store_id` = [`UserCoinCache::store_id`]: empty and 0 the first
/// time, so it gets a full snapshot) and applies every message in order. When the stream fails
/// or ends, it backs off (100 ms doubling to 5 s, with jitter; back to 100 ms after a stream
/// that completed its initial sync) and tries the next endpoint. Each connect and each loss is
/// logged with the endpoint. While no stream is up, the cache keeps serving what it knows.
pub async fn follow_switches(
    cache: Arc<UserCoinCache>,
    endpoints: ControlEndpoints,
    shutdown: CancellationToken,
) {
    let mut backoff = Backoff::new();
    let mut index = endpoints.preferred();
    loop {
        let outcome = tokio::select! {
            _ = shutdown.cancelled() => None,
            end = follow_one(&cache, &endpoints, index) => Some(end),
        };
        cache.stream_lost();
        let Some(end) = outcome else { break };
        let endpoint = endpoints.url(index);
        match &end.error {
            None => info!(
                endpoint,
                revision = cache.revision(),
                "WatchSwitches stream ended by the control plane; reconnecting"
            ),
            Some(e) if e.is_definitive() => error!(
                endpoint,
                error = %e,
                "WatchSwitches refused by the control plane (check ProxyToken and the endpoint); retrying"
            ),
            Some(e) if end.synced => warn!(
                endpoint,
                error = %e,
                revision = cache.revision(),
                "WatchSwitches stream lost; reconnecting"
            ),
            Some(e) => warn!(
                endpoint,
                error = %e,
                revision = cache.revision(),
                "WatchSwitches: cannot follow this control replica; trying the next"
            ),
        }
        if end.synced {
            backoff.reset();
        }
        let delay = backoff.delay(BACKOFF_MAX);
        debug!(?delay, "WatchSwitches reconnect delay");
        if !sleep_unless_shutdown(delay, &shutdown).await {
            break;
        }
        index = (index + 1) % endpoints.count();
    }
    info!("WatchSwitches feed stopped");
}

/// Follows one WatchSwitches stream on replica `index` until it ends.
async fn follow_one(
    cache: &UserCoinCache,
    endpoints: &ControlEndpoints,
    index: usize,
) -> StreamEnd {
    let endpoint = endpoints.url(index).to_owned();
    let status_error = |status: Status| ControlError::Status {
        endpoint: endpoint.clone(),
        status: Box::new(status),
    };
    let resume_revision = cache.revision();
    let request = WatchSwitchesRequest {
        resume_revision,
        store_id: cache.store_id(),
    };
    let mut client = endpoints.client(index);
    let call = client.watch_switches(endpoints.request(request));
    let mut stream = match tokio::time::timeout(CALL_TIMEOUT, call).await {
        Ok(Ok(response)) => response.into_inner(),
        Ok(Err(status)) => {
            return StreamEnd {
                synced: false,
                error: Some(status_error(status)),
            };
        }
        Err(_) => {
            return StreamEnd {
                synced: false,
                error: Some(ControlError::Timeout {
                    endpoint,
                    after: CALL_TIMEOUT,
                }),
            };
        }
    };
    cache.stream_connected();
    endpoints.prefer(index);
    info!(
        endpoint,
        resume_revision, "WatchSwitches connected to the control plane"
    );
    let mut synced = false;
    loop {
        match stream.message().await {
            Ok(Some(message)) => {
                cache.apply_in_turn(&message).await;
                if message.snapshot_complete && !synced {
                    synced = true;
                    info!(
                        endpoint,
                        revision = message.revision,
                        reset = message.reset,
                        users = cache.user_count(),
                        "WatchSwitches in sync"
                    );
                }
            }
            Ok(None) => {
                return StreamEnd {
                    synced,
                    error: None,
                };
            }
            Err(status) => {
                return StreamEnd {
                    synced,
                    error: Some(status_error(status)),
                };
            }
        }
    }
}

/// What a proxy tells the control plane about itself when it takes a server-ID lease.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LeaseRequest {
    /// The proxy's chain type: "bitcoin", "decred-normal", "decred-gominer" or "ethereum".
    pub chain_type: String,
    /// The server ID the proxy held before, or 0 for any.
    pub preferred_server_id: u32,
    /// The coins the proxy has an upstream sserver for.
    pub coins: Vec<String>,
    /// The proxy's IP addresses.
    pub ips: Vec<String>,
    /// The proxy's host name.
    pub host_name: String,
    /// The address miners connect to.
    pub listen_addr: String,
}

/// A server-ID lease granted by the control plane.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerIdLease {
    /// The leased server ID, 1..=255.
    pub server_id: u8,
    /// Renew at least this often.
    pub ttl: Duration,
    /// The identity the lease was taken with (random, one per [`acquire_server_id`] call);
    /// renewals and the release must use it.
    pub instance_id: String,
}

/// A fresh random instance identity.
fn new_instance_id() -> String {
    format!(
        "{}-{:016x}",
        std::process::id(),
        rand::rng().random::<u64>()
    )
}

/// Takes a server-ID lease: tries every endpoint in turn, for a few rounds with backoff, until
/// one grants it. The lease gets a fresh random instance ID (kept across the retries, so a
/// retried call cannot take two leases). A definitive refusal (e.g. `RESOURCE_EXHAUSTED`: all
/// 255 IDs taken; `INVALID_ARGUMENT`: an unknown chain type) is returned at once.
pub async fn acquire_server_id(
    endpoints: &ControlEndpoints,
    request: &LeaseRequest,
) -> Result<ServerIdLease, ControlError> {
    acquire_as(endpoints, request, &new_instance_id(), ACQUIRE_ROUNDS).await
}

/// [`acquire_server_id`] with a given instance ID and number of rounds: taking back a lease
/// saved before a restart (the same instance ID renews or re-takes it when it is still this
/// proxy's).
pub async fn acquire_as(
    endpoints: &ControlEndpoints,
    request: &LeaseRequest,
    instance_id: &str,
    rounds: u32,
) -> Result<ServerIdLease, ControlError> {
    let message = AcquireServerIdRequest {
        chain_type: request.chain_type.clone(),
        preferred_server_id: request.preferred_server_id,
        instance_id: instance_id.to_owned(),
        coins: request.coins.clone(),
        ips: request.ips.clone(),
        host_name: request.host_name.clone(),
        listen_addr: request.listen_addr.clone(),
    };
    let mut backoff = Backoff::new();
    let mut round = 0;
    loop {
        round += 1;
        let result = endpoints
            .call_each("AcquireServerId", |mut client| {
                let request = endpoints.request(message.clone());
                async move { client.acquire_server_id(request).await }
            })
            .await;
        match result {
            Ok(answer) => {
                let endpoint = endpoints.url(endpoints.preferred()).to_owned();
                let server_id = u8::try_from(answer.server_id)
                    .ok()
                    .filter(|id| *id != 0)
                    .ok_or_else(|| ControlError::BadResponse {
                        endpoint: endpoint.clone(),
                        reason: format!("server ID {} is not in 1..=255", answer.server_id),
                    })?;
                let lease = ServerIdLease {
                    server_id,
                    ttl: Duration::from_secs(u64::from(answer.ttl_seconds.max(1))),
                    instance_id: instance_id.to_owned(),
                };
                info!(
                    endpoint,
                    server_id,
                    ttl = ?lease.ttl,
                    instance_id,
                    chain_type = %request.chain_type,
                    "server ID leased"
                );
                return Ok(lease);
            }
            Err(e) if e.is_definitive() || round >= rounds => return Err(e),
            Err(e) => {
                let delay = backoff.delay(BACKOFF_MAX);
                warn!(error = %e, round, ?delay, "no control replica granted a server ID; retrying");
                tokio::time::sleep(delay).await;
            }
        }
    }
}

/// Keeps `lease` alive until `shutdown` is cancelled, then releases it and returns.
///
/// Renews every `ttl / 3` (failing over across endpoints, retrying sooner with backoff after a
/// failed round), reporting `sessions_by_coin()`. When the control plane no longer knows the
/// lease (`NOT_FOUND`: it expired, or the control plane lost it), re-acquires with the same
/// instance ID and `preferred_server_id` = the same ID; if another ID is granted, that is
/// logged as an error (sessions already running keep IDs under the old one) and the new ID is
/// published through `current`, which new sessions read. `current` is also set to the lease's
/// ID at the start.
pub async fn keep_server_id(
    endpoints: ControlEndpoints,
    request: LeaseRequest,
    mut lease: ServerIdLease,
    sessions_by_coin: impl Fn() -> HashMap<String, u64> + Send + 'static,
    current: watch::Sender<u8>,
    shutdown: CancellationToken,
) {
    current.send_if_modified(|id| std::mem::replace(id, lease.server_id) != lease.server_id);
    let mut backoff = Backoff::new();
    let mut wait = renew_period(lease.ttl);
    loop {
        if !sleep_unless_shutdown(wait, &shutdown).await {
            break;
        }
        let message = RenewServerIdRequest {
            chain_type: request.chain_type.clone(),
            server_id: u32::from(lease.server_id),
            instance_id: lease.instance_id.clone(),
            sessions_by_coin: sessions_by_coin(),
        };
        let renewed = endpoints
            .call_each("RenewServerId", |mut client| {
                let request = endpoints.request(message.clone());
                async move { client.renew_server_id(request).await }
            })
            .await;
        let period = renew_period(lease.ttl);
        wait = match renewed {
            Ok(answer) => {
                backoff.reset();
                lease.ttl = Duration::from_secs(u64::from(answer.ttl_seconds.max(1)));
                debug!(server_id = lease.server_id, "server-ID lease renewed");
                renew_period(lease.ttl)
            }
            Err(e) if e.code() == Some(Code::NotFound) => {
                warn!(
                    server_id = lease.server_id,
                    error = %e,
                    "the control plane no longer holds this proxy's server-ID lease; re-acquiring it"
                );
                let again = LeaseRequest {
                    preferred_server_id: u32::from(lease.server_id),
                    ..request.clone()
                };
                match acquire_as(&endpoints, &again, &lease.instance_id, 1).await {
                    Ok(new) => {
                        backoff.reset();
                        if new.server_id != lease.server_id {
                            error!(
                                old_server_id = lease.server_id,
                                new_server_id = new.server_id,
                                "SERVER ID CHANGED: the previous ID was taken by another proxy; \
                                 new sessions use the new ID, running sessions keep the old one"
                            );
                            current.send_replace(new.server_id);
                        }
                        lease = new;
                        renew_period(lease.ttl)
                    }
                    Err(e) => {
                        error!(
                            server_id = lease.server_id,
                            error = %e,
                            "cannot re-acquire the server-ID lease; still using the old ID and retrying"
                        );
                        backoff.delay(period)
                    }
                }
            }
            Err(e) => {
                let delay = backoff.delay(period);
                warn!(
                    server_id = lease.server_id,
                    error = %e,
                    ?delay,
                    "cannot renew the server-ID lease; retrying"
                );
                delay
            }
        };
    }
    release(&endpoints, &request.chain_type, &lease).await;
}

/// How often a lease of `ttl` is renewed.
fn renew_period(ttl: Duration) -> Duration {
    (ttl / 3).max(MIN_RENEW_PERIOD)
}

/// Gives `lease` back (best effort, each endpoint once, briefly).
async fn release(endpoints: &ControlEndpoints, chain_type: &str, lease: &ServerIdLease) {
    let message = ReleaseServerIdRequest {
        chain_type: chain_type.to_owned(),
        server_id: u32::from(lease.server_id),
        instance_id: lease.instance_id.clone(),
    };
    let released = tokio::time::timeout(
        RELEASE_TIMEOUT * u32::try_from(endpoints.count()).unwrap_or(u32::MAX),
        endpoints.call_each("ReleaseServerId", |mut client| {
            let request = endpoints.request(message.clone());
            async move {
                match tokio::time::timeout(RELEASE_TIMEOUT, client.release_server_id(request)).await
                {
                    Ok(answer) => answer,
                    Err(_) => Err(Status::deadline_exceeded("release timed out")),
                }
            }
        }),
    )
    .await;
    match released {
        Ok(Ok(_)) => info!(server_id = lease.server_id, "server-ID lease released"),
        Ok(Err(e)) => warn!(
            server_id = lease.server_id,
            error = %e,
            "cannot release the server-ID lease; it expires by itself"
        ),
        Err(_) => warn!(
            server_id = lease.server_id,
            "releasing the server-ID lease timed out; it expires by itself"
        ),
    }
}

/// Reads `user` straight from the control plane's store (LookupUser: the read-through at
/// login, see [`crate::lookup`]): `Ok(Some((name as stored, coin)))`, or `Ok(None)` when there
/// is no such user. Fails over across endpoints.
pub async fn lookup_user(
    endpoints: &ControlEndpoints,
    user: &str,
) -> Result<Option<(String, String)>, ControlError> {
    let message = LookupUserRequest {
        user: user.to_owned(),
    };
    let answer = endpoints
        .call_each("LookupUser", |mut client| {
            let request = endpoints.request(message.clone());
            async move { client.lookup_user(request).await }
        })
        .await?;
    Ok(
        (answer.found && !answer.coin.is_empty() && !answer.user.is_empty())
            .then_some((answer.user, answer.coin)),
    )
}

/// Asks the control plane to register the unknown `user` (auto-registration, SPEC §7) for the
/// miner `worker` of session `session_id`. `Ok(true)`: this call recorded the request;
/// `Ok(false)`: one was already pending. Either way the user then arrives through the feed.
/// Fails over across endpoints; `FAILED_PRECONDITION` (see [`ControlError::code`]) means
/// auto-registration is not enabled on the control plane.
pub async fn request_registration(
    endpoints: &ControlEndpoints,
    user: &str,
    worker: &str,
    session_id: u32,
) -> Result<bool, ControlError> {
    let message = RequestUserRegistrationRequest {
        user: user.to_owned(),
        worker: worker.to_owned(),
        session_id,
    };
    endpoints
        .call_each("RequestUserRegistration", |mut client| {
            let request = endpoints.request(message.clone());
            async move { client.request_user_registration(request).await }
        })
        .await
        .map(|answer| answer.created)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn urls(list: &[&str]) -> Vec<String> {
        list.iter().map(|u| (*u).to_owned()).collect()
    }

    #[test]
    fn endpoints_are_validated_with_a_clear_error() {
        assert!(matches!(
            ControlEndpoints::new(&[], None),
            Err(ControlError::NoEndpoints)
        ));
        for bad in [
            "127.0.0.1:7100",
            "https://control:7100",
            "ftp://control:7100",
            "http://",
            "http://control:7100/some/path",
            "not a url",
        ] {
            let err = ControlEndpoints::new(&urls(&["http://ok:1", bad]), None)
                .expect_err("a bad URL is refused");
            match &err {
                ControlError::InvalidEndpoint { url, .. } => assert_eq!(url, bad),
                other => panic!("{bad}: {other:?}"),
            }
            assert!(err.to_string().contains(bad), "{err}");
        }
        assert!(matches!(
            ControlEndpoints::new(&urls(&["http://ok:1"]), Some("bad\ntoken".into())),
            Err(ControlError::InvalidToken)
        ));
        let ok = ControlEndpoints::new(
            &urls(&["http://127.0.0.1:7100", "http://[::1]:7101/"]),
            Some("s3cret".into()),
        )
        .expect("valid");
        assert_eq!(
            ok.urls(),
            vec!["http://127.0.0.1:7100", "http://[::1]:7101/"]
        );
        assert!(
            !format!("{ok:?}").contains("s3cret"),
            "Debug hides the token"
        );
    }

    #[test]
    fn requests_carry_the_bearer_token() {
        let with = ControlEndpoints::new(&urls(&["http://a:1"]), Some("t0k".into())).expect("ok");
        let request = with.request(());
        assert_eq!(
            request
                .metadata()
                .get("authorization")
                .and_then(|v| v.to_str().ok()),
            Some("Bearer t0k")
        );
        let without = ControlEndpoints::new(&urls(&["http://a:1"]), Some(String::new()))
            .expect("an empty token is no token");
        assert!(
            without
                .request(())
                .metadata()
                .get("authorization")
                .is_none()
        );
    }

    #[test]
    fn backoff_doubles_to_its_cap_with_jitter_and_resets() {
        let mut backoff = Backoff::new();
        let mut nominal = BACKOFF_START;
        for _ in 0..10 {
            let d = backoff.delay(BACKOFF_MAX);
            assert!(d >= nominal / 2 && d <= nominal, "{d:?} for {nominal:?}");
            nominal = (nominal * 2).min(BACKOFF_MAX);
        }
        assert!(backoff.delay(Duration::from_millis(400)) <= Duration::from_millis(400));
        backoff.reset();
        assert!(backoff.delay(BACKOFF_MAX) <= BACKOFF_START);
    }

    #[test]
    fn renewal_is_a_third_of_the_ttl() {
        assert_eq!(
            renew_period(Duration::from_secs(30)),
            Duration::from_secs(10)
        );
        assert_eq!(renew_period(Duration::from_millis(90)), MIN_RENEW_PERIOD);
    }

    #[tokio::test]
    async fn a_call_to_unreachable_replicas_fails_over_and_reports_the_last() {
        // Two ports nothing listens on.
        let dead: Vec<String> = (0..2)
            .map(|_| {
                let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
                format!("http://{}", listener.local_addr().expect("addr"))
            })
            .collect();
        let endpoints = ControlEndpoints::new(&dead, None).expect("valid");
        let err = request_registration(&endpoints, "alice", "alice.rig", 1)
            .await
            .expect_err("nobody answers");
        assert_eq!(err.code(), Some(Code::Unavailable), "{err}");
    }
}
