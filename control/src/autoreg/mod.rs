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
//! [`Registrar`], which talks to the backend and the core.
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
//! - At most [`DEFAULT_CONCURRENCY`] requests are processed at once per replica; the others
//!   wait for their turn.
//! - The POST carries `PostData` as a JSON object (`Content-Type: application/json`), every
//!   `{sub_name}` in the values replaced by the name, with basic auth when `User` is set.
//!   The exchange, body included, must end within `AutoRegTimeoutSeconds` (default 10); the
//!   answer may be at most [`MAX_ANSWER_BYTES`] bytes.
//! - Success is an HTTP 2xx answer whose `data.puid` is a positive integer (a JSON number, or a
//!   string of digits as some PHP backends send). A puid of 0 or less, a missing `data` or
//!   `puid` (PHP's `"data":[]`) is a refusal; any other status, a transport error, a timeout,
//!   a body that is not a JSON object or a `puid` of another type is a failure. Neither is
//!   retried: the pending request is removed, and a proxy that asks again starts over.
//! - `UserAutoRegAPI.IntervalSeconds` 0 means no wait.
//! - Shutdown stops new work and interrupts a registration in progress; an interrupted request
//!   is left pending (on ZooKeeper another replica, or this one after its restart, processes it
//!   again, POSTing again if the first POST had been answered).
//! - Every outcome is logged with the user, the session ID, the worker and the puid.

pub mod zookeeper;

use std::{
    collections::{BTreeMap, btree_map::Entry},
    sync::{Arc, Mutex},
    time::Duration,
};

use async_trait::async_trait;
use reqwest::Url;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use switchyard_cli::Secret;
use thiserror::Error;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::{
    core::{Listed, SwitchCore},
    validate::excerpt,
};

/// The default bound on pending requests (`AutoRegMaxPending`).
pub const DEFAULT_MAX_PENDING: usize = 1000;
/// The default bound on one exchange with the backend (`AutoRegTimeoutSeconds`).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
/// Requests one replica processes at once.
pub const DEFAULT_CONCURRENCY: usize = 16;
/// The largest answer accepted from the backend, in bytes.
pub const MAX_ANSWER_BYTES: usize = 64 * 1024;
/// The longest worker name accepted, in bytes.
pub const MAX_WORKER_BYTES: usize = 256;
/// The longest excerpt of outside text put in a log line.
const MAX_EXCERPT_BYTES: usize = 200;

/// Auto-registration's settings, from `UserAutoRegAPI`, `ZKAutoRegWatchDir`,
/// `AutoRegMaxPending` and `AutoRegTimeoutSeconds`.
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
    /// Requests processed at once by one replica.
    pub concurrency: usize,
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
            concurrency: DEFAULT_CONCURRENCY,
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
        if self.max_pending == 0 || self.concurrency == 0 || self.max_answer_bytes == 0 {
            return Err(settings(
                "the pending, concurrency and answer bounds must not be zero".into(),
            ));
        }
        Ok(url)
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
    /// Where pending requests are kept cannot be reached.
    #[error("auto-registration unavailable: {0}")]
    Unavailable(String),
    /// The settings cannot work.
    #[error("auto-registration settings: {0}")]
    Settings(String),
}

impl From<AutoRegError> for tonic::Status {
    fn from(e: AutoRegError) -> Self {
        match e {
            AutoRegError::Invalid(_) => tonic::Status::invalid_argument(e.to_string()),
            AutoRegError::TooManyPending { .. } => tonic::Status::resource_exhausted(e.to_string()),
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
}

impl Registrar {
    /// A registrar over `core` with `settings` (checked here).
    pub fn new(core: Arc<SwitchCore>, settings: AutoRegSettings) -> Result<Self, AutoRegError> {
        let url = settings.validate()?;
        let client = reqwest::Client::builder()
            .timeout(settings.timeout)
            .user_agent(concat!("switchyard-control/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| AutoRegError::Settings(format!("cannot build the HTTP client: {e}")))?;
        Ok(Self {
            core,
            settings,
            url,
            client,
        })
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

    /// Checks a request: `Ok(Some(name))` with the name as stored when a registration should be
    /// recorded, `Ok(None)` when the user already has a coin.
    pub fn admit(&self, user: &str, worker: &str) -> Result<Option<String>, AutoRegError> {
        let user = self
            .core
            .normalize_user(user)
            .map_err(|e| AutoRegError::Invalid(e.to_string()))?;
        check_worker(worker)?;
        Ok(self.core.index().user_coin(&user).is_none().then_some(user))
    }

    /// Processes one pending request up to (not including) its removal; logs the outcome.
    /// Never panics, whatever the backend does.
    pub async fn process(
        &self,
        name: &str,
        request: &PendingRequest,
        shutdown: &CancellationToken,
    ) -> Outcome {
        let outcome = self.run(name, request, shutdown).await;
        log_outcome(name, request, &outcome, &self.settings.default_coin);
        outcome
    }

    async fn run(
        &self,
        name: &str,
        request: &PendingRequest,
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
        if shutdown.is_cancelled() {
            return Outcome::Interrupted { puid: None };
        }
        let answer = tokio::select! {
            biased;
            _ = shutdown.cancelled() => return Outcome::Interrupted { puid: None },
            answer = self.post(&user, request) => answer,
        };
        let answer = match answer {
            Ok(answer) => answer,
            Err(error) => return Outcome::Failed { puid: None, error },
        };
        if answer.puid <= 0 {
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
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => return Outcome::Interrupted { puid: Some(puid) },
            _ = tokio::time::sleep(self.settings.interval) => {}
        }
        self.create_if_absent(&user, puid).await
    }

    /// Creates `user` with the default coin unless it has a coin by now (the core's
    /// create-if-absent write: a coin set meanwhile by anyone is never overwritten). The user
    /// counts as seen in the default coin's list from now on, and gets its case-index entry.
    async fn create_if_absent(&self, user: &str, puid: i64) -> Outcome {
        let failed = |error: String| Outcome::Failed {
            puid: Some(puid),
            error,
        };
        let coin = self.settings.default_coin.clone();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        match self
            .core
            .create_users_if_absent(&coin, vec![user.to_owned()], now)
            .await
        {
            Ok(results) => match results.into_iter().next() {
                Some(Ok(Listed::Created(record))) => Outcome::Registered {
                    puid,
                    coin: record.coin,
                    created: true,
                },
                Some(Ok(Listed::Existed)) => Outcome::Registered {
                    puid,
                    coin: self
                        .core
                        .user_coin(user)
                        .ok()
                        .flatten()
                        .map_or(coin, |r| r.coin),
                    created: false,
                },
                Some(Err(e)) => failed(format!("cannot create the user: {e}")),
                None => failed("the core answered no result".into()),
            },
            Err(e) => failed(format!("the core refused the write: {e}")),
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
    pending: Mutex<BTreeMap<String, PendingRequest>>,
    permits: Arc<Semaphore>,
    shutdown: CancellationToken,
}

impl LocalRegistrations {
    /// A registry over `registrar`; processing stops at `shutdown`.
    pub fn new(registrar: Arc<Registrar>, shutdown: CancellationToken) -> Self {
        let permits = Arc::new(Semaphore::new(registrar.settings().concurrency));
        info!(url = %registrar.url_for_logs(), "auto-registration started in the control process");
        Self {
            inner: Arc::new(LocalInner {
                registrar,
                pending: Mutex::new(BTreeMap::new()),
                permits,
                shutdown,
            }),
        }
    }
}

impl LocalInner {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, PendingRequest>> {
        // Single inserts and removes: the map is valid after any panic.
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    async fn process(self: Arc<Self>, user: String, request: PendingRequest) {
        let permit = tokio::select! {
            _ = self.shutdown.cancelled() => return,
            permit = Arc::clone(&self.permits).acquire_owned() => permit,
        };
        let Ok(_permit) = permit else { return };
        self.registrar
            .process(&user, &request, &self.shutdown)
            .await;
        self.lock().remove(&user);
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
        let Some(user) = self.inner.registrar.admit(user, worker)? else {
            return Ok(false);
        };
        let request = PendingRequest {
            session_id,
            worker: worker.to_owned(),
        };
        {
            let max = self.inner.registrar.settings().max_pending;
            let mut pending = self.inner.lock();
            let len = pending.len();
            match pending.entry(user.clone()) {
                Entry::Occupied(_) => return Ok(false),
                Entry::Vacant(_) if len >= max => {
                    return Err(AutoRegError::TooManyPending { max });
                }
                Entry::Vacant(slot) => {
                    slot.insert(request.clone());
                }
            }
        }
        info!(user, session_id, worker, "auto-registration requested");
        tokio::spawn(Arc::clone(&self.inner).process(user, request));
        Ok(true)
    }

    async fn pending(&self) -> Result<Vec<String>, AutoRegError> {
        Ok(self.inner.lock().keys().cloned().collect())
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
