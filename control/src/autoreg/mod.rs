//! Auto-registration of unknown users (SPEC §7, `EnableUserAutoReg`).
//!
//! A proxy that meets a sub-account without a coin calls `RequestUserRegistration`. The control
//! service records one pending request per name, shared by every replica, and processes each
//! exactly once: it POSTs the name to the pool backend (`UserAutoRegAPI.URL`), and when the
//! backend answers a puid, waits `UserAutoRegAPI.IntervalSeconds` (the sservers refresh their
//! user lists meanwhile), creates the user with `DefaultCoin` if it still has no coin (through
//! the [`SwitchCore`], so the new user reaches the proxies through WatchSwitches like any other
//! change), and removes the pending request, whatever happened.
//!
//! [`UserRegistrations`] is the registry the gRPC service calls; [`LocalRegistrations`] keeps
//! pending requests in the control process (the embedded store, a single node),
//! [`zookeeper::ZkRegistrations`] in ZooKeeper's `ZKAutoRegWatchDir`, in the layout the Go
//! proxies and initUserCoin use, shared by every replica. Both hand the work to a
//! [`Registrar`], which talks to the backend and the core, and which both registries start
//! ([`Registrar::start`]).
//!
//! # At pool speed
//!
//! A registration spends most of its life in the `IntervalSeconds` wait (10 s in the example
//! config) and a few milliseconds with the backend. So the two are bounded apart:
//!
//! - **Exchanges with the backend**: at most `AutoRegMaxConcurrent` POSTs in flight per replica
//!   (default [`DEFAULT_MAX_CONCURRENT`]); a registration holds its permit from the POST to the
//!   backend's answer, no longer. 16 connections are a modest load for a pool's web backend and
//!   give 16 / (answer time) registrations per second per replica: 320/s at 50 ms, 32/s at
//!   500 ms, far above the few per second a pool onboards. Raise it for a slow backend; lower
//!   it to protect a weak one.
//! - **The wait**: after the backend answered a puid, the user's creation is queued at now +
//!   `IntervalSeconds` in one delay queue per replica (`waits`: at most `AutoRegMaxPending`
//!   entries), and one task creates every user due at once in one write of the core (one
//!   ZooKeeper `multi`, one redb transaction). A waiting registration holds no permit, so the
//!   rate is bounded by the exchanges, not by `IntervalSeconds`: N registrations asked at once
//!   take about one interval plus N / `AutoRegMaxConcurrent` answer times. (Before: a permit
//!   of 16 was held through the wait, about 1.6 registrations/s with a 10 s interval.)
//!
//! # Choices where SPEC §7 is silent
//!
//! - A request for a user that already has a coin answers `created = false` at once and records
//!   nothing. A pending request whose user has a coin by the time it is processed (switched
//!   meanwhile, or a stale node) is removed without calling the backend.
//! - The worker name is only logged and stored in the pending node: any text up to
//!   [`MAX_WORKER_BYTES`] bytes without control characters, empty included.
//! - At most `AutoRegMaxPending` requests may be pending at once; beyond it a request is refused
//!   (RESOURCE_EXHAUSTED) unless one is already pending for the name. On ZooKeeper the bound is
//!   checked against the directory's child count before creating, so concurrent requests on
//!   several replicas may pass it by at most their number.
//! - **Bounds per source**, so that one source cannot fill the whole registry (checked the same
//!   way, RESOURCE_EXHAUSTED beyond them, unless the name is already pending):
//!   - *Per proxy*, `AutoRegMaxPendingPerProxy` (default [`DEFAULT_MAX_PENDING_PER_PROXY`]).
//!     The request carries no proxy identity (RequestUserRegistration has the user, the worker
//!     and the session ID only), but the session ID does: it is `server_id << 24 | index`
//!     (`server_id << 16 | index` on ethereum, SPEC §3), and a server ID is unique among the
//!     live proxies of a chain type. So the source is the server ID read from the session ID
//!     ([`admission::source_of`]); 0 for a request without one (a node written by hand). The
//!     same session ID is in the pending node the Go proxies write, so every replica counts the
//!     requests of the whole directory, whoever recorded them. The peer address is not used:
//!     behind a load balancer or NAT every proxy has the same one, and it is not in the node.
//!     Proxies of two chain types may hold the same server ID; they then share a bound.
//!     250 of 1,000: a proxy that onboards 25 users/s with a 10 s interval still fits, and
//!     four proxies' floods are needed to fill the registry; real users' requests are refused
//!     only on the proxies that carry the flood.
//!   - *Per name pattern*, `AutoRegMaxPendingPerPattern` (default
//!     [`DEFAULT_MAX_PENDING_PER_PATTERN`]): the pattern is the name without its trailing
//!     digits, lowercased, cut to its first [`admission::PATTERN_CHARS`] characters
//!     ([`admission::name_pattern`]): `test1` … `test999` share `test`. A name of digits only
//!     has no pattern (pools with numeric account names), and random names share none: the
//!     bound per proxy holds those. 100 of 1,000: real users sharing the first five letters
//!     of their names at 10 registrations/s with a 10 s interval still fit.
//!
//!   On ZooKeeper each replica counts sources and patterns from its last reading of the
//!   directory (every [`zookeeper::POLL_INTERVAL`], the session ID of each new node read once)
//!   plus the requests it recorded since; like the global bound, concurrent requests on several
//!   replicas may pass it by a little.
//! - **Refused names are remembered**: a name the backend refused (puid ≤ 0, or no puid) is
//!   remembered for `AutoRegRefusedSeconds` (default 300; 0: not remembered), at most
//!   [`MAX_REFUSED_NAMES`] names per replica, the oldest forgotten first. A request for it
//!   within that time answers NOT_FOUND at once (the proxy answers its miner 201) without a
//!   pending request or a POST, and a pending request for it (a Go proxy's node, another
//!   replica's request) is removed without a POST. So a junk name costs one POST per replica
//!   per `AutoRegRefusedSeconds`, however often its miners reconnect, and a flood of junk names
//!   costs one POST each and holds a place in the registry only for the backend's answer time.
//!   Failures (transport, HTTP status, timeout, an answer that is not JSON) are not remembered:
//!   they say nothing about the name. The memory is per replica, in memory: a restart forgets.
//!   300 s: a miner with a mistyped name that reconnects every few seconds costs the backend
//!   one POST per five minutes, and a user whose account is fixed on the pool's side waits at
//!   most five minutes.
//! - Refusals by a bound and answers from the memory are logged at most once per 10 s as a
//!   warning (with how many were held back), each at debug level.
//! - The POST carries `PostData` as a JSON object (`Content-Type: application/json`), every
//!   `{sub_name}` in the values replaced by the name, with basic auth when `User` is set.
//!   The exchange, body included, must end within `AutoRegTimeoutSeconds` (default 10); the
//!   answer may be at most [`MAX_ANSWER_BYTES`] bytes.
//! - Success is an HTTP 2xx answer whose `data.puid` is a positive integer (a JSON number, or a
//!   string of digits as some PHP backends send). A puid of 0 or less, a missing `data` or
//!   `puid` (PHP's `"data":[]`) is a refusal; any other status, a transport error, a timeout,
//!   a body that is not a JSON object or a `puid` of another type is a failure. Neither is
//!   retried: the pending request is removed, and a proxy that asks again starts over (after a
//!   refusal, only once `AutoRegRefusedSeconds` have passed).
//! - `UserAutoRegAPI.IntervalSeconds` 0 means no wait (the creation still goes through the
//!   queue, and is batched with the others due).
//! - Shutdown stops new work and interrupts a registration in progress, in the exchange or in
//!   the wait; an interrupted request is left pending (on ZooKeeper another replica, or this one
//!   after its restart, processes it again, POSTing again if the first POST had been answered).
//! - Every outcome is logged with the user, the session ID, the worker and the puid.

pub mod admission;
mod waits;
pub mod zookeeper;

use std::{
    collections::{BTreeMap, btree_map::Entry},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use async_trait::async_trait;
use reqwest::Url;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use switchyard_cli::Secret;
use thiserror::Error;
use tokio::{
    sync::{OwnedSemaphorePermit, Semaphore},
    time::Instant,
};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use self::{
    admission::{RefusedNames, SourceLimits, Tally, Throttle, later, name_pattern, source_of},
    waits::{Waiting, Waits},
};
use crate::{
    core::{Creator, Listed, SwitchCore},
    metrics::AutoRegCount,
    validate::excerpt,
};

/// The default bound on pending requests (`AutoRegMaxPending`).
pub const DEFAULT_MAX_PENDING: usize = 1000;
/// The default bound on pending requests from one proxy (`AutoRegMaxPendingPerProxy`).
pub const DEFAULT_MAX_PENDING_PER_PROXY: usize = 250;
/// The default bound on pending requests for names of one pattern
/// (`AutoRegMaxPendingPerPattern`).
pub const DEFAULT_MAX_PENDING_PER_PATTERN: usize = 100;
/// The default bound on one exchange with the backend (`AutoRegTimeoutSeconds`).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
/// The default bound on exchanges with the backend in flight per replica
/// (`AutoRegMaxConcurrent`).
pub const DEFAULT_MAX_CONCURRENT: usize = 16;
/// How long a refused name is remembered by default (`AutoRegRefusedSeconds`).
pub const DEFAULT_REFUSED_TTL: Duration = Duration::from_secs(300);
/// The most refused names one replica remembers (about 25 MB with names of the longest kind).
pub const MAX_REFUSED_NAMES: usize = 50_000;
/// The largest answer accepted from the backend, in bytes.
pub const MAX_ANSWER_BYTES: usize = 64 * 1024;
/// The longest worker name accepted, in bytes.
pub const MAX_WORKER_BYTES: usize = 256;
/// The longest excerpt of outside text put in a log line.
const MAX_EXCERPT_BYTES: usize = 200;
/// The most users created in one write of the core.
const MAX_CREATE_BATCH: usize = 1000;
/// How often a refusal by a bound, or from the memory of refused names, is logged as a warning.
const REFUSAL_WARNING_EVERY: Duration = Duration::from_secs(10);

/// Auto-registration's settings, from `UserAutoRegAPI`, `ZKAutoRegWatchDir` and the
/// `AutoReg*` settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AutoRegSettings {
    /// `UserAutoRegAPI.URL`: where to POST, `http` or `https`.
    pub url: String,
    /// `UserAutoRegAPI.User`: basic auth when not empty.
    pub user: String,
    /// `UserAutoRegAPI.Password`.
    pub password: Secret,
    /// `UserAutoRegAPI.DefaultCoin`: the coin a registered user gets; one of `AvailableCoins`.
    pub default_coin: String,
    /// `UserAutoRegAPI.PostData`: the JSON object POSTed, `{sub_name}` replaced in the values.
    pub post_data: BTreeMap<String, String>,
    /// `UserAutoRegAPI.IntervalSeconds`: the wait between the backend's success and the user's
    /// creation.
    pub interval: Duration,
    /// `AutoRegTimeoutSeconds`: the bound on one exchange with the backend, body included.
    pub timeout: Duration,
    /// `AutoRegMaxPending`: the most requests pending at once.
    pub max_pending: usize,
    /// `AutoRegMaxPendingPerProxy`: the most requests pending at once from one proxy.
    pub max_pending_per_proxy: usize,
    /// `AutoRegMaxPendingPerPattern`: the most requests pending at once for names of one
    /// pattern.
    pub max_pending_per_pattern: usize,
    /// `AutoRegMaxConcurrent`: exchanges with the backend in flight at once per replica.
    pub max_concurrent: usize,
    /// `AutoRegRefusedSeconds`: how long a name the backend refused is remembered (zero: not
    /// remembered).
    pub refused_ttl: Duration,
    /// The most refused names remembered.
    pub max_refused: usize,
    /// The largest answer accepted, in bytes.
    pub max_answer_bytes: usize,
    /// `ZKAutoRegWatchDir`, with a trailing `/`: the pending requests on ZooKeeper (required
    /// there; unused on the embedded store).
    pub watch_dir: Option<String>,
}

impl AutoRegSettings {
    /// Settings for `url` and `default_coin` with the defaults for everything else.
    pub fn new(url: impl Into<String>, default_coin: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            user: String::new(),
            password: Secret::default(),
            default_coin: default_coin.into(),
            post_data: BTreeMap::new(),
            interval: Duration::ZERO,
            timeout: DEFAULT_TIMEOUT,
            max_pending: DEFAULT_MAX_PENDING,
            max_pending_per_proxy: DEFAULT_MAX_PENDING_PER_PROXY,
            max_pending_per_pattern: DEFAULT_MAX_PENDING_PER_PATTERN,
            max_concurrent: DEFAULT_MAX_CONCURRENT,
            refused_ttl: DEFAULT_REFUSED_TTL,
            max_refused: MAX_REFUSED_NAMES,
            max_answer_bytes: MAX_ANSWER_BYTES,
            watch_dir: None,
        }
    }

    /// Checks what the settings can check on their own (the URL, the bounds); returns the URL.
    /// That `default_coin` is an available coin is checked by the configuration.
    pub fn validate(&self) -> Result<Url, AutoRegError> {
        let settings = |m: String| AutoRegError::Settings(m);
        let url = Url::parse(self.url.trim())
            .map_err(|e| settings(format!("URL {:?} is not a URL: {e}", self.url)))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(settings(format!(
                "URL {:?} is not an http or https URL",
                self.url
            )));
        }
        if self.timeout.is_zero() {
            return Err(settings("the timeout must not be zero".into()));
        }
        if [
            self.max_pending,
            self.max_pending_per_proxy,
            self.max_pending_per_pattern,
            self.max_concurrent,
            self.max_answer_bytes,
        ]
        .contains(&0)
        {
            return Err(settings(
                "the pending, per-proxy, per-pattern, concurrency and answer bounds must not be zero"
                    .into(),
            ));
        }
        Ok(url)
    }

    /// The bounds per source.
    pub fn source_limits(&self) -> SourceLimits {
        SourceLimits {
            per_proxy: self.max_pending_per_proxy,
            per_pattern: self.max_pending_per_pattern,
        }
    }
}

/// Why a registration request was refused, or the registry could not start.
#[derive(Debug, Error)]
pub enum AutoRegError {
    /// The user or worker name is invalid.
    #[error("{0}")]
    Invalid(String),
    /// Too many requests are pending.
    #[error("{max} auto-registrations are already pending; try again later")]
    TooManyPending {
        /// `AutoRegMaxPending`.
        max: usize,
    },
    /// Too many requests from the asking proxy are pending.
    #[error(
        "{max} auto-registrations from the proxy with server ID {server_id} are already pending; try again later"
    )]
    TooManyFromProxy {
        /// The proxy's server ID, from the session ID (0: none).
        server_id: u8,
        /// `AutoRegMaxPendingPerProxy`.
        max: usize,
    },
    /// Too many requests for names of the same pattern are pending.
    #[error(
        "{max} auto-registrations of names like {pattern:?}… are already pending; try again later"
    )]
    TooManyLikeName {
        /// The pattern.
        pattern: String,
        /// `AutoRegMaxPendingPerPattern`.
        max: usize,
    },
    /// The backend refused the name a moment ago.
    #[error(
        "the pool backend refused to register {user:?} a moment ago; it is not asked again for {left_seconds} s"
    )]
    RecentlyRefused {
        /// The name.
        user: String,
        /// How long the refusal is still remembered, rounded up.
        left_seconds: u64,
    },
    /// Where pending requests are kept cannot be reached.
    #[error("auto-registration unavailable: {0}")]
    Unavailable(String),
    /// The settings cannot work.
    #[error("auto-registration settings: {0}")]
    Settings(String),
}

impl AutoRegError {
    /// How a request refused with this error is counted.
    pub fn counted(&self) -> AutoRegCount {
        match self {
            Self::Invalid(_) | Self::RecentlyRefused { .. } => AutoRegCount::Refused,
            Self::TooManyPending { .. }
            | Self::TooManyFromProxy { .. }
            | Self::TooManyLikeName { .. } => AutoRegCount::Limited,
            Self::Unavailable(_) | Self::Settings(_) => AutoRegCount::Failed,
        }
    }

    /// Whether this refuses a request by a bound or from the memory of refused names (a flood
    /// makes many of these).
    fn is_flood_refusal(&self) -> bool {
        matches!(
            self,
            Self::TooManyPending { .. }
                | Self::TooManyFromProxy { .. }
                | Self::TooManyLikeName { .. }
                | Self::RecentlyRefused { .. }
        )
    }
}

impl From<AutoRegError> for tonic::Status {
    fn from(e: AutoRegError) -> Self {
        match e {
            AutoRegError::Invalid(_) => tonic::Status::invalid_argument(e.to_string()),
            AutoRegError::TooManyPending { .. }
            | AutoRegError::TooManyFromProxy { .. }
            | AutoRegError::TooManyLikeName { .. } => {
                tonic::Status::resource_exhausted(e.to_string())
            }
            AutoRegError::RecentlyRefused { .. } => tonic::Status::not_found(e.to_string()),
            AutoRegError::Unavailable(_) => tonic::Status::unavailable(e.to_string()),
            AutoRegError::Settings(_) => tonic::Status::internal(e.to_string()),
        }
    }
}

/// A pending request as the Go proxies write it: `{"SessionID":n,"Worker":"full name"}`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingRequest {
    /// The session ID of the miner that asked.
    #[serde(rename = "SessionID", default)]
    pub session_id: u32,
    /// The miner's full worker name.
    #[serde(rename = "Worker", default)]
    pub worker: String,
}

impl PendingRequest {
    /// The node's JSON.
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Reads a node's JSON; anything else (a node written by hand) gives the default, with a
    /// warning: the name alone is enough to register.
    pub fn from_json(user: &str, data: &[u8]) -> Self {
        if data.is_empty() {
            return Self::default();
        }
        match serde_json::from_slice(data) {
            Ok(request) => request,
            Err(e) => {
                warn!(
                    user,
                    error = %e,
                    "a pending auto-registration is not the expected JSON; registering the name anyway"
                );
                Self::default()
            }
        }
    }

    /// The source of a node's request ([`admission::source_of`] of its session ID), without a
    /// warning for a node that is not the expected JSON (source 0).
    pub fn source_of_json(data: &[u8]) -> u8 {
        serde_json::from_slice::<Self>(data).map_or(0, |r| source_of(r.session_id))
    }
}

/// The auto-registration registry; see the module doc.
#[async_trait]
pub trait UserRegistrations: Send + Sync + std::fmt::Debug + 'static {
    /// Asks for `user`'s registration. `Ok(true)` when this call recorded the pending request;
    /// `Ok(false)` when the user already has a coin or a request is already pending.
    async fn request(
        &self,
        user: &str,
        worker: &str,
        session_id: u32,
    ) -> Result<bool, AutoRegError>;

    /// The names with a pending request, sorted.
    async fn pending(&self) -> Result<Vec<String>, AutoRegError>;
}

/// Checks a worker name: bounded text without control characters.
pub fn check_worker(worker: &str) -> Result<(), AutoRegError> {
    if worker.len() > MAX_WORKER_BYTES {
        return Err(AutoRegError::Invalid(format!(
            "worker name is {} bytes long; at most {MAX_WORKER_BYTES} are allowed",
            worker.len()
        )));
    }
    if let Some(c) = worker.chars().find(|c| c.is_control()) {
        return Err(AutoRegError::Invalid(format!(
            "worker name contains a control character (U+{:04X})",
            c as u32
        )));
    }
    Ok(())
}

/// How processing one pending request ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The backend answered a puid and the user was created with the default coin, or had a
    /// coin by then (`created` false; the coin was kept).
    Registered {
        /// The backend's puid.
        puid: i64,
        /// The user's coin now.
        coin: String,
        /// Whether this registration created the user.
        created: bool,
    },
    /// The user had a coin before the backend was asked; it was not asked.
    AlreadyHasCoin {
        /// The user's coin.
        coin: String,
    },
    /// The backend answered a puid of 0 or less (or none).
    Refused {
        /// The puid answered.
        puid: i64,
        /// The answer's `status`.
        status: String,
        /// The answer's `message`.
        message: String,
    },
    /// The backend refused the name a moment ago; it was not asked again.
    RecentlyRefused {
        /// How long the refusal is still remembered.
        left: Duration,
    },
    /// The exchange failed (transport, status, timeout, size, not the expected JSON), or the
    /// user could not be created after the backend's success (`puid` then set).
    Failed {
        /// The puid, when the backend had answered one.
        puid: Option<i64>,
        /// What went wrong.
        error: String,
    },
    /// Shutdown came first; the request stays pending.
    Interrupted {
        /// The puid, when the backend had answered one.
        puid: Option<i64>,
    },
}

impl Outcome {
    /// How it is counted; `None` for an interrupted request (it stays pending).
    pub fn counted(&self) -> Option<AutoRegCount> {
        match self {
            Self::Registered { created: true, .. } => Some(AutoRegCount::Created),
            Self::Registered { created: false, .. } | Self::AlreadyHasCoin { .. } => {
                Some(AutoRegCount::Existed)
            }
            Self::Refused { .. } | Self::RecentlyRefused { .. } => Some(AutoRegCount::Refused),
            Self::Failed { .. } => Some(AutoRegCount::Failed),
            Self::Interrupted { .. } => None,
        }
    }
}

/// What the backend answered.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Answer {
    puid: i64,
    status: String,
    message: String,
}

/// Talks to the pool backend and the core for both registries; see the module doc.
#[derive(Debug)]
pub struct Registrar {
    core: Arc<SwitchCore>,
    settings: AutoRegSettings,
    url: Url,
    client: reqwest::Client,
    /// Exchanges with the backend in flight (`AutoRegMaxConcurrent`).
    exchanges: Arc<Semaphore>,
    /// Registrations waiting `IntervalSeconds` for their user's creation.
    waits: Waits,
    /// Names the backend refused a moment ago.
    refused: Mutex<RefusedNames>,
    /// Throttles the warnings for refused requests.
    refusals: Throttle,
    /// Whether the creations task runs.
    started: AtomicBool,
}

impl Registrar {
    /// A registrar over `core` with `settings` (checked here). It creates no user until a
    /// registry starts it ([`Registrar::start`]).
    pub fn new(core: Arc<SwitchCore>, settings: AutoRegSettings) -> Result<Self, AutoRegError> {
        let url = settings.validate()?;
        let client = reqwest::Client::builder()
            .timeout(settings.timeout)
            .user_agent(concat!("switchyard-control/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| AutoRegError::Settings(format!("cannot build the HTTP client: {e}")))?;
        Ok(Self {
            core,
            exchanges: Arc::new(Semaphore::new(settings.max_concurrent)),
            waits: Waits::new(settings.max_pending),
            refused: Mutex::new(RefusedNames::new(
                settings.refused_ttl,
                settings.max_refused,
            )),
            refusals: Throttle::new(REFUSAL_WARNING_EVERY),
            started: AtomicBool::new(false),
            settings,
            url,
            client,
        })
    }

    /// Starts the task that creates the users whose wait is over, until `shutdown` (once; later
    /// calls do nothing).
    pub fn start(self: &Arc<Self>, shutdown: CancellationToken) {
        if !self.started.swap(true, Ordering::SeqCst) {
            tokio::spawn(Arc::clone(self).run_creations(shutdown));
        }
    }

    /// The settings it runs with.
    pub fn settings(&self) -> &AutoRegSettings {
        &self.settings
    }

    /// The backend's URL without any user or password it carries, for logs.
    pub fn url_for_logs(&self) -> Url {
        let mut url = self.url.clone();
        // Only fails for URLs that cannot have credentials, which then have none.
        let _ = url.set_username("");
        let _ = url.set_password(None);
        url
    }

    /// How many registrations wait for their user's creation.
    pub fn waiting(&self) -> usize {
        self.waits.len()
    }

    /// A permit for one exchange with the backend, when one is free now.
    pub fn try_exchange_permit(&self) -> Option<OwnedSemaphorePermit> {
        Arc::clone(&self.exchanges).try_acquire_owned().ok()
    }

    /// Waits for a permit for one exchange with the backend; `None` at shutdown.
    pub async fn exchange_permit(
        &self,
        shutdown: &CancellationToken,
    ) -> Option<OwnedSemaphorePermit> {
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => None,
            permit = Arc::clone(&self.exchanges).acquire_owned() => permit.ok(),
        }
    }

    fn lock_refused(&self) -> std::sync::MutexGuard<'_, RefusedNames> {
        // Its two collections are updated together without a panic between them.
        self.refused.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// How long the backend's refusal of `user` is still remembered, if it is.
    pub fn refused_for(&self, user: &str) -> Option<Duration> {
        self.lock_refused().remembered(user, Instant::now())
    }

    /// Checks a request: `Ok(Some(name))` with the name as stored when a registration should be
    /// recorded, `Ok(None)` when the user already has a coin; refused when the backend refused
    /// the name a moment ago.
    pub fn admit(&self, user: &str, worker: &str) -> Result<Option<String>, AutoRegError> {
        let user = self
            .core
            .normalize_user(user)
            .map_err(|e| AutoRegError::Invalid(e.to_string()))?;
        check_worker(worker)?;
        if self.core.index().user_coin(&user).is_some() {
            self.count(AutoRegCount::Existed);
            return Ok(None);
        }
        if let Some(left) = self.refused_for(&user) {
            return Err(AutoRegError::RecentlyRefused {
                user,
                left_seconds: left.as_secs() + u64::from(left.subsec_nanos() > 0),
            });
        }
        Ok(Some(user))
    }

    /// Checks a request against the bounds per source, counted in `tally`.
    pub fn check_sources(
        &self,
        tally: &Tally,
        user: &str,
        session_id: u32,
    ) -> Result<(), AutoRegError> {
        tally.check(
            source_of(session_id),
            name_pattern(user).as_deref(),
            self.settings.source_limits(),
        )
    }

    /// Counts one request's outcome.
    pub fn count(&self, outcome: AutoRegCount) {
        self.core.metrics().count_autoreg(outcome);
    }

    /// Counts and logs a refused request: a warning at most every 10 s (a flood makes many),
    /// else debug.
    pub fn log_refusal(&self, user: &str, session_id: u32, error: &AutoRegError) {
        self.count(error.counted());
        let shown = excerpt(user, MAX_EXCERPT_BYTES);
        if !error.is_flood_refusal() {
            debug!(user = %shown, session_id, error = %error, "registration request refused");
            return;
        }
        match self.refusals.pass(Instant::now()) {
            Some(held_back) => warn!(
                user = %shown,
                session_id,
                error = %error,
                similar_since_last_warning = held_back,
                "auto-registration request refused"
            ),
            None => {
                debug!(user = %shown, session_id, error = %error, "auto-registration request refused")
            }
        }
    }

    /// Processes one pending request up to (not including) its removal; logs the outcome.
    /// `exchange` is a permit from [`Registrar::exchange_permit`]; it is released once the
    /// backend answered, before the wait. Never panics, whatever the backend does.
    pub async fn process(
        &self,
        name: &str,
        request: &PendingRequest,
        exchange: OwnedSemaphorePermit,
        shutdown: &CancellationToken,
    ) -> Outcome {
        let outcome = self.run(name, request, exchange, shutdown).await;
        log_outcome(name, request, &outcome, &self.settings.default_coin);
        if let Some(counted) = outcome.counted() {
            self.count(counted);
        }
        outcome
    }

    async fn run(
        &self,
        name: &str,
        request: &PendingRequest,
        exchange: OwnedSemaphorePermit,
        shutdown: &CancellationToken,
    ) -> Outcome {
        let user = match self.core.normalize_user(name) {
            Ok(user) => user,
            Err(e) => {
                return Outcome::Failed {
                    puid: None,
                    error: format!("invalid user name: {e}"),
                };
            }
        };
        if let Some((coin, _)) = self.core.index().user_coin(&user) {
            return Outcome::AlreadyHasCoin { coin };
        }
        if let Some(left) = self.refused_for(&user) {
            return Outcome::RecentlyRefused { left };
        }
        if shutdown.is_cancelled() {
            return Outcome::Interrupted { puid: None };
        }
        let answer = tokio::select! {
            biased;
            _ = shutdown.cancelled() => return Outcome::Interrupted { puid: None },
            answer = self.post(&user, request) => answer,
        };
        drop(exchange);
        let answer = match answer {
            Ok(answer) => answer,
            Err(error) => return Outcome::Failed { puid: None, error },
        };
        if answer.puid <= 0 {
            self.lock_refused().remember(&user, Instant::now());
            return Outcome::Refused {
                puid: answer.puid,
                status: answer.status,
                message: answer.message,
            };
        }
        let puid = answer.puid;
        info!(
            user,
            session_id = request.session_id,
            puid,
            status = %answer.status,
            wait = ?self.settings.interval,
            "the backend registered the user; creating it after the wait"
        );
        let created =
            match self
                .waits
                .schedule(later(Instant::now(), self.settings.interval), user, puid)
            {
                Ok(created) => created,
                Err(full) => {
                    return Outcome::Failed {
                        puid: Some(puid),
                        error: format!(
                            "{} registrations already wait for their user's creation",
                            full.capacity
                        ),
                    };
                }
            };
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => Outcome::Interrupted { puid: Some(puid) },
            outcome = created => outcome.unwrap_or(Outcome::Interrupted { puid: Some(puid) }),
        }
    }

    /// Creates the users whose wait is over, every user due at once in one write, until
    /// `shutdown`; see the module doc.
    async fn run_creations(self: Arc<Self>, shutdown: CancellationToken) {
        loop {
            let next = self.waits.next_due();
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                _ = self.waits.added() => continue,
                _ = async {
                    match next {
                        Some(due) => tokio::time::sleep_until(due).await,
                        None => std::future::pending().await,
                    }
                } => {}
            }
            loop {
                let due = self.waits.take_due(Instant::now(), MAX_CREATE_BATCH);
                if due.is_empty() {
                    break;
                }
                self.create_all(due).await;
            }
        }
        // The waiting registrations see the queue closed: interrupted, left pending.
        self.waits.clear();
    }

    /// Creates each user unless it has a coin by now (the core's create-if-absent write: a coin
    /// set meanwhile by anyone is never overwritten), in one write. The users count as seen in
    /// the default coin's list from now on, and get their case-index entries.
    async fn create_all(&self, due: Vec<Waiting>) {
        let coin = self.settings.default_coin.clone();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let users: Vec<String> = due.iter().map(|w| w.user.clone()).collect();
        let count = users.len();
        let results = self
            .core
            .create_users_if_absent(&coin, users, now, Creator::AutoReg)
            .await;
        debug!(
            count,
            "created the auto-registered users whose wait is over"
        );
        let mut results = match results {
            Ok(results) => results.into_iter().map(Ok).collect::<Vec<_>>().into_iter(),
            Err(e) => {
                let error = format!("the core refused the write: {e}");
                (0..count)
                    .map(|_| Err(error.clone()))
                    .collect::<Vec<_>>()
                    .into_iter()
            }
        };
        for waiting in due {
            let failed = |error: String| Outcome::Failed {
                puid: Some(waiting.puid),
                error,
            };
            let outcome = match results.next() {
                Some(Ok(Ok(Listed::Created(record)))) => Outcome::Registered {
                    puid: waiting.puid,
                    coin: record.coin,
                    created: true,
                },
                Some(Ok(Ok(Listed::Existed))) => Outcome::Registered {
                    puid: waiting.puid,
                    coin: self
                        .core
                        .user_coin(&waiting.user)
                        .ok()
                        .flatten()
                        .map_or_else(|| coin.clone(), |r| r.coin),
                    created: false,
                },
                Some(Ok(Err(e))) => failed(format!("cannot create the user: {e}")),
                Some(Err(error)) => failed(error),
                None => failed("the core answered no result".into()),
            };
            // The registration may have stopped waiting (shutdown).
            let _ = waiting.done.send(outcome);
        }
    }

    /// POSTs the registration and reads the answer, within the timeout and the size bound.
    async fn post(&self, user: &str, request: &PendingRequest) -> Result<Answer, String> {
        let body: BTreeMap<&str, String> = self
            .settings
            .post_data
            .iter()
            .map(|(k, v)| (k.as_str(), v.replace("{sub_name}", user)))
            .collect();
        let mut post = self.client.post(self.url.clone()).json(&body);
        if !self.settings.user.is_empty() {
            post = post.basic_auth(&self.settings.user, Some(self.settings.password.expose()));
        }
        let timeout = self.settings.timeout;
        tracing::debug!(
            user,
            session_id = request.session_id,
            "asking the backend to register the user"
        );
        let exchange = async {
            let mut response = post.send().await.map_err(|e| request_error(e, timeout))?;
            let status = response.status();
            let limit = self.settings.max_answer_bytes;
            if response
                .content_length()
                .is_some_and(|len| len > limit as u64)
            {
                return Err(format!("the answer is larger than {limit} bytes"));
            }
            let mut bytes = Vec::new();
            while let Some(chunk) = response
                .chunk()
                .await
                .map_err(|e| request_error(e, timeout))?
            {
                if chunk.len() > limit - bytes.len() {
                    return Err(format!("the answer is larger than {limit} bytes"));
                }
                bytes.extend_from_slice(&chunk);
            }
            if !status.is_success() {
                return Err(format!(
                    "HTTP status {}: {}",
                    status.as_u16(),
                    excerpt(&String::from_utf8_lossy(&bytes), MAX_EXCERPT_BYTES)
                ));
            }
            parse_answer(&bytes)
        };
        tokio::time::timeout(timeout, exchange)
            .await
            .unwrap_or_else(|_| Err(format!("no complete answer within {timeout:?}")))
    }
}

fn request_error(e: reqwest::Error, timeout: Duration) -> String {
    if e.is_timeout() {
        return format!("no complete answer within {timeout:?}");
    }
    // Without the URL, which may carry credentials; with the causes, which say what failed.
    let e = e.without_url();
    let mut text = format!("request failed: {e}");
    let mut source = std::error::Error::source(&e);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// Reads `{"data":{"puid":N},"status":"...","message":"..."}`.
fn parse_answer(bytes: &[u8]) -> Result<Answer, String> {
    let shown = || excerpt(&String::from_utf8_lossy(bytes), MAX_EXCERPT_BYTES);
    let value: Value = serde_json::from_slice(bytes)
        .map_err(|e| format!("the answer is not JSON ({e}): {}", shown()))?;
    let Some(object) = value.as_object() else {
        return Err(format!("the answer is not a JSON object: {}", shown()));
    };
    let puid = match object.get("data").and_then(|d| d.get("puid")) {
        None | Some(Value::Null) => 0,
        Some(Value::Number(n)) => n
            .as_i64()
            .ok_or_else(|| format!("puid {n} is not an integer"))?,
        Some(Value::String(s)) => s
            .trim()
            .parse::<i64>()
            .map_err(|_| format!("puid {:?} is not an integer", excerpt(s, 32)))?,
        Some(other) => {
            return Err(format!(
                "puid is not a number: {}",
                excerpt(&other.to_string(), 32)
            ));
        }
    };
    let text = |key: &str| match object.get(key) {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(s)) => excerpt(s, MAX_EXCERPT_BYTES),
        Some(other) => excerpt(&other.to_string(), MAX_EXCERPT_BYTES),
    };
    Ok(Answer {
        puid,
        status: text("status"),
        message: text("message"),
    })
}

fn log_outcome(user: &str, request: &PendingRequest, outcome: &Outcome, default_coin: &str) {
    let session_id = request.session_id;
    let worker = excerpt(&request.worker, MAX_EXCERPT_BYTES);
    match outcome {
        Outcome::Registered {
            puid,
            coin,
            created: true,
        } => info!(
            user,
            session_id, worker, puid, coin, "auto-registered a user"
        ),
        Outcome::Registered {
            puid,
            coin,
            created: false,
        } => info!(
            user,
            session_id,
            worker,
            puid,
            coin,
            default_coin,
            "auto-registered a user who got a coin meanwhile; the coin is kept"
        ),
        Outcome::AlreadyHasCoin { coin } => info!(
            user,
            session_id,
            worker,
            coin,
            "the user of a pending auto-registration already has a coin; the backend was not asked"
        ),
        Outcome::Refused {
            puid,
            status,
            message,
        } => warn!(
            user,
            session_id, worker, puid, status, message, "the backend refused an auto-registration"
        ),
        Outcome::RecentlyRefused { left } => info!(
            user,
            session_id,
            worker,
            remembered_for = ?left,
            "the backend refused this name a moment ago; it was not asked again"
        ),
        Outcome::Failed { puid, error } => warn!(
            user,
            session_id, worker, puid, error, "auto-registration failed"
        ),
        Outcome::Interrupted { puid } => warn!(
            user,
            session_id,
            worker,
            puid,
            "auto-registration interrupted by shutdown; the request stays pending"
        ),
    }
}

/// Pending requests in the control process (the embedded store: a single node); see the
/// module doc.
#[derive(Debug)]
pub struct LocalRegistrations {
    inner: Arc<LocalInner>,
}

#[derive(Debug)]
struct LocalInner {
    registrar: Arc<Registrar>,
    state: Mutex<LocalState>,
    shutdown: CancellationToken,
}

/// The pending requests (at most `AutoRegMaxPending`) and their counts per source.
#[derive(Debug, Default)]
struct LocalState {
    /// Each pending name with its request's session ID.
    pending: BTreeMap<String, u32>,
    tally: Tally,
}

impl LocalState {
    fn remove(&mut self, user: &str) {
        if let Some(session_id) = self.pending.remove(user) {
            self.tally
                .remove(source_of(session_id), name_pattern(user).as_deref());
        }
    }
}

impl LocalRegistrations {
    /// A registry over `registrar` (started here); processing stops at `shutdown`.
    pub fn new(registrar: Arc<Registrar>, shutdown: CancellationToken) -> Self {
        registrar.start(shutdown.clone());
        info!(url = %registrar.url_for_logs(), "auto-registration started in the control process");
        Self {
            inner: Arc::new(LocalInner {
                registrar,
                state: Mutex::new(LocalState::default()),
                shutdown,
            }),
        }
    }
}

impl LocalInner {
    fn lock(&self) -> std::sync::MutexGuard<'_, LocalState> {
        // The map and the tally change together without a panic between them.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records a request unless it is pending already (`Ok(false)`) or over a bound.
    fn record(&self, user: &str, session_id: u32) -> Result<bool, AutoRegError> {
        let max = self.registrar.settings().max_pending;
        let mut state = self.lock();
        let len = state.pending.len();
        match state.pending.entry(user.to_owned()) {
            Entry::Occupied(_) => return Ok(false),
            Entry::Vacant(_) if len >= max => return Err(AutoRegError::TooManyPending { max }),
            Entry::Vacant(_) => {}
        }
        self.registrar
            .check_sources(&state.tally, user, session_id)?;
        state.pending.insert(user.to_owned(), session_id);
        state
            .tally
            .add(source_of(session_id), name_pattern(user).as_deref());
        Ok(true)
    }

    async fn process(self: Arc<Self>, user: String, request: PendingRequest) {
        let Some(exchange) = self.registrar.exchange_permit(&self.shutdown).await else {
            return;
        };
        let outcome = self
            .registrar
            .process(&user, &request, exchange, &self.shutdown)
            .await;
        if !matches!(outcome, Outcome::Interrupted { .. }) {
            self.lock().remove(&user);
        }
    }
}

#[async_trait]
impl UserRegistrations for LocalRegistrations {
    async fn request(
        &self,
        user: &str,
        worker: &str,
        session_id: u32,
    ) -> Result<bool, AutoRegError> {
        let registrar = &self.inner.registrar;
        let admitted = registrar
            .admit(user, worker)
            .inspect_err(|e| registrar.log_refusal(user, session_id, e))?;
        let Some(user) = admitted else {
            return Ok(false);
        };
        match self.inner.record(&user, session_id) {
            Ok(true) => {}
            Ok(false) => return Ok(false),
            Err(e) => {
                registrar.log_refusal(&user, session_id, &e);
                return Err(e);
            }
        }
        info!(user, session_id, worker, "auto-registration requested");
        let request = PendingRequest {
            session_id,
            worker: worker.to_owned(),
        };
        tokio::spawn(Arc::clone(&self.inner).process(user, request));
        Ok(true)
    }

    async fn pending(&self) -> Result<Vec<String>, AutoRegError> {
        Ok(self.inner.lock().pending.keys().cloned().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_read_leniently_and_bounded() {
        let ok = parse_answer(br#"{"data":{"puid":42},"status":"success","message":"ok"}"#)
            .expect("parses");
        assert_eq!(
            ok,
            Answer {
                puid: 42,
                status: "success".into(),
                message: "ok".into()
            }
        );
        assert_eq!(
            parse_answer(br#"{"data":{"puid":"7"}}"#)
                .expect("string puid")
                .puid,
            7
        );
        assert_eq!(
            parse_answer(br#"{"data":[],"status":"failed"}"#)
                .expect("PHP's empty data")
                .puid,
            0
        );
        assert_eq!(parse_answer(br"{}").expect("no data").puid, 0);
        for bad in [
            &b"<html>"[..],
            b"[1,2]",
            br#"{"data":{"puid":1.5}}"#,
            br#"{"data":{"puid":"x"}}"#,
            br#"{"data":{"puid":true}}"#,
        ] {
            assert!(
                parse_answer(bad).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn worker_names_are_bounded_text() {
        assert!(check_worker("alice.rig-01").is_ok());
        assert!(check_worker("").is_ok());
        assert!(check_worker("a\nb").is_err());
        assert!(check_worker(&"w".repeat(MAX_WORKER_BYTES + 1)).is_err());
    }

    #[test]
    fn pending_nodes_use_the_go_layout() {
        let request = PendingRequest {
            session_id: 7,
            worker: "bob.m1".into(),
        };
        assert_eq!(
            String::from_utf8(request.to_json()).expect("utf-8"),
            r#"{"SessionID":7,"Worker":"bob.m1"}"#
        );
        assert_eq!(
            PendingRequest::from_json("bob", &request.to_json()),
            request
        );
        assert_eq!(
            PendingRequest::from_json("bob", b"garbage"),
            PendingRequest::default()
        );
    }

    #[test]
    fn settings_need_an_http_url_and_bounds() {
        assert!(
            AutoRegSettings::new("http://127.0.0.1:1/reg", "btc")
                .validate()
                .is_ok()
        );
        assert!(AutoRegSettings::new("ftp://x/", "btc").validate().is_err());
        assert!(AutoRegSettings::new("", "btc").validate().is_err());
        let mut s = AutoRegSettings::new("https://x/", "btc");
        s.max_pending = 0;
        assert!(s.validate().is_err());
    }
}
