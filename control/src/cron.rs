//! The scheduled user→coin pull of SPEC §6 (`EnableCronJob`): every `CronIntervalSeconds`, GET
//! `UserCoinMapURL` and apply each `user: coin` pair of the answer as a switch through
//! [`SwitchCore::switch_coins`], like the pool backend had called the switch API.
//!
//! [`run`] is the loop the service spawns; [`UserCoinMapPuller::pull_once`] is one round, for
//! callers (and tests) that drive rounds themselves.
//!
//! # Protocol
//!
//! The first request goes to `UserCoinMapURL` as configured. After a round that succeeded, the
//! next one asks for `last_date` = that round's `now_date` minus the interval (in whole seconds,
//! rounded up), appended as `?last_date=N`, or `&last_date=N` when the URL already has a query.
//! The subtraction is the Go server's: it covers switches made in the same second as the
//! previous answer. The answer is
//! `{"err_no":0,"data":{"user_coin":{"alice":"btc",...},"now_date":UNIX}}`.
//!
//! # Choices where SPEC §6 is silent
//!
//! - The first pull happens at once when [`run`] starts, then one every interval (missed ticks
//!   are not caught up: a round that overran delays the next by a whole interval).
//! - A round that fails does not advance `last_date`: the next round asks for the same
//!   `last_date` again (or goes bare again when no round has succeeded yet). A round fails on:
//!   a transport error; no answer within the timeout (30 s by default, for the whole exchange,
//!   body included); an HTTP status other than 2xx; a body larger than the bound (64 MiB by
//!   default; checked against `Content-Length` and while reading); a body that is not JSON, or
//!   JSON of the wrong shape (no `data` object, `user_coin` neither an object nor empty); an
//!   `err_no` other than 0 (whatever `data` holds then); a `now_date` that is missing or not a
//!   positive integer (a number with a fraction, a string, 0 or less); and a store write that
//!   failed (see below). Failures are logged at `warn` and retried at the next interval; they
//!   never stop the loop.
//! - `err_no` missing counts as 0, as in the Go server; `err_msg` is only logged, and other
//!   keys are ignored.
//! - `"user_coin":[]` (PHP's empty array), `null` or a missing `user_coin` are an empty page:
//!   the round succeeds and `last_date` advances. A non-empty array is a shape error.
//! - Pairs are applied in the order of the document, in chunks of the core's `max_batch`, one
//!   [`SwitchCore::switch_coins`] call per chunk. A name that appears twice (or twice once
//!   lowercased, in case-insensitive mode) ends with the coin of its last appearance.
//! - An invalid entry is skipped and counted; the others are still applied and the round
//!   succeeds. Invalid: a name the core refuses ([`SwitchCore::normalize_user`]: empty, `/`,
//!   `..`, control characters, too long), a coin not in `AvailableCoins` (compared exactly, so
//!   `BTC` is not `btc`), or a coin that is not a JSON string. The first
//!   [`LOGGED_INVALID_ENTRIES`] of a round are logged one by one at `warn`, then the count.
//! - A store write that fails ends the round as failed after the chunks before it were
//!   written: `last_date` does not advance, so the next round asks for the same changes again
//!   and writes them again (a switch is idempotent). A store that stays down therefore keeps
//!   the pull where it is rather than losing changes.
//! - Parsing and checking the body (up to the bound, perhaps millions of names) runs on the
//!   blocking pool, never on the async workers.
//! - Shutdown interrupts a round that is waiting for its answer; a round that is writing
//!   finishes its current chunk first (a write is never cut between the store and the index).
//!   Stop [`run`] with its token rather than by aborting its task.
//! - The HTTP client follows redirects (up to 10) and uses the proxies of the environment
//!   (`HTTP_PROXY`, `NO_PROXY`, ...), as Go's `http.Get` did. Logs show the URL without any
//!   user or password it carries.
//!
//! - Pulled switches go through the core like any other: the safety period of SPEC §6 applies
//!   (a switch to a coin whose user list is ingested may be held back).
//! - The position (`now_date` of the last successful round) is stored durably, one per URL
//!   ([`UserCoinMapPuller::resume`]): after a restart the first pull asks for `last_date` like
//!   the others, where the Go server pulled the whole map again (every pair of which would
//!   become a switch).

use std::{sync::Arc, time::Duration};

use reqwest::Url;
use serde::{
    Deserialize, Deserializer,
    de::{MapAccess, SeqAccess, Visitor},
};
use serde_json::Value;
use thiserror::Error;
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::{
    core::{SwitchCore, SwitchError, SwitchSource},
    metrics::SwitchCount,
};

/// The default bound on one exchange with `UserCoinMapURL`, body included.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// The default bound on the size of an answer's body, in bytes.
pub const DEFAULT_MAX_BODY: usize = 64 * 1024 * 1024;

/// How many invalid entries of one round are logged one by one; the rest are only counted.
pub const LOGGED_INVALID_ENTRIES: usize = 10;

/// The longest excerpt of outside text (names, `err_msg`, parser messages) put in a log line or
/// an error, in bytes.
const MAX_EXCERPT_BYTES: usize = 200;

/// The settings of the scheduled pull (`EnableCronJob`, `CronIntervalSeconds`,
/// `UserCoinMapURL`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserCoinMapPull {
    /// `UserCoinMapURL`: an `http` or `https` URL, which may have a query of its own.
    pub url: String,
    /// `CronIntervalSeconds`: the time between two pulls; also subtracted from `now_date`.
    pub interval: Duration,
    /// The bound on one exchange, from connecting to the end of the body.
    pub timeout: Duration,
    /// The largest body accepted, in bytes.
    pub max_body: usize,
}

impl UserCoinMapPull {
    /// Settings for `url` every `interval`, with [`DEFAULT_TIMEOUT`] and [`DEFAULT_MAX_BODY`].
    pub fn new(url: impl Into<String>, interval: Duration) -> Self {
        Self {
            url: url.into(),
            interval,
            timeout: DEFAULT_TIMEOUT,
            max_body: DEFAULT_MAX_BODY,
        }
    }

    /// Checks the settings: a parseable `http`/`https` URL, and an interval, a timeout and a
    /// body bound that are not zero. Returns the parsed URL.
    pub fn validate(&self) -> Result<Url, SettingsError> {
        let url = Url::parse(self.url.trim())
            .map_err(|e| SettingsError::Url(format!("{:?} is not a URL: {e}", self.url)))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(SettingsError::Url(format!(
                "{:?} is not an http or https URL",
                self.url
            )));
        }
        if self.interval.is_zero() {
            return Err(SettingsError::ZeroInterval);
        }
        if self.timeout.is_zero() {
            return Err(SettingsError::ZeroTimeout);
        }
        if self.max_body == 0 {
            return Err(SettingsError::ZeroMaxBody);
        }
        Ok(url)
    }
}

/// Why the pull cannot run with the settings it was given.
#[derive(Debug, Error)]
pub enum SettingsError {
    /// `UserCoinMapURL` is not an `http`/`https` URL.
    #[error("UserCoinMapURL: {0}")]
    Url(String),
    /// The interval is zero.
    #[error("CronIntervalSeconds must be at least 1")]
    ZeroInterval,
    /// The timeout is zero.
    #[error("the user->coin map pull timeout must not be zero")]
    ZeroTimeout,
    /// The body bound is zero.
    #[error("the user->coin map body limit must not be zero")]
    ZeroMaxBody,
    /// The HTTP client could not be built.
    #[error("cannot build the HTTP client: {0}")]
    Client(#[source] reqwest::Error),
}

/// What a successful round did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PullSummary {
    /// The `user_coin` entries in the answer, valid or not.
    pub entries: usize,
    /// The switches applied: written, or held back by the safety period.
    pub applied: usize,
    /// The entries skipped as invalid.
    pub invalid: usize,
    /// The answer's `now_date`; the next round asks for `last_date` = this minus the interval.
    pub now_date: u64,
}

/// Why a round failed; `last_date` did not advance.
#[derive(Debug, Error)]
pub enum PullError {
    /// The request could not be sent or the answer not read (connection refused, reset, ...).
    #[error("request failed: {0}")]
    Request(#[source] reqwest::Error),
    /// No complete answer within the timeout.
    #[error("no complete answer within {0:?}")]
    Timeout(Duration),
    /// The answer's HTTP status is not 2xx.
    #[error("HTTP status {0}")]
    Status(u16),
    /// The body is larger than the bound.
    #[error("the body is larger than {limit} bytes")]
    TooLarge {
        /// The bound, in bytes.
        limit: usize,
    },
    /// The body is not JSON.
    #[error("the body is not JSON: {0}")]
    NotJson(String),
    /// The body is JSON of the wrong shape.
    #[error("the body has the wrong shape: {0}")]
    BadShape(String),
    /// The backend answered an error.
    #[error("the backend answered err_no {err_no}: {err_msg}")]
    ErrNo {
        /// The `err_no`.
        err_no: i64,
        /// The `err_msg`, as JSON text, shortened.
        err_msg: String,
    },
    /// `now_date` is missing or not a positive integer.
    #[error("now_date is missing or not a positive integer: {0}")]
    BadNowDate(String),
    /// A store write failed; the chunks before it were written.
    #[error("{failed} switches could not be written ({applied} were): {error}")]
    Store {
        /// Switches written in this round before the failure.
        applied: usize,
        /// Switches of the failed chunk that the store refused.
        failed: usize,
        /// The first store error.
        error: String,
    },
    /// The round could not be processed (a failed worker task).
    #[error("internal error: {0}")]
    Internal(String),
}

/// The scheduled pull's state: the settings, an HTTP client and the `last_date` to ask for.
#[derive(Debug)]
pub struct UserCoinMapPuller {
    core: Arc<SwitchCore>,
    settings: UserCoinMapPull,
    url: Url,
    client: reqwest::Client,
    /// The `now_date` of the last successful round.
    now_date: Option<u64>,
}

impl UserCoinMapPuller {
    /// A puller over `core` that has not pulled yet (its first request is bare).
    pub fn new(core: Arc<SwitchCore>, settings: UserCoinMapPull) -> Result<Self, SettingsError> {
        let url = settings.validate()?;
        let client = reqwest::Client::builder()
            .timeout(settings.timeout)
            .user_agent(concat!("switchyard-control/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(SettingsError::Client)?;
        Ok(Self {
            core,
            settings,
            url,
            client,
            now_date: None,
        })
    }

    /// The name of the stored position: one per URL, so that a new URL starts bare.
    fn marker_name(&self) -> String {
        let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
        for byte in self.url.as_str().bytes() {
            hash = (hash ^ u64::from(byte)).wrapping_mul(0x100_0000_01b3);
        }
        format!("cron-{hash:016x}")
    }

    /// Takes up the position stored by an earlier run with the same URL, if any: the next
    /// round then asks for `last_date` instead of the whole map.
    pub async fn resume(&mut self) {
        match self.core.marker(&self.marker_name()).await {
            Ok(Some(value)) => match value.parse::<u64>() {
                Ok(now_date) if now_date > 0 => {
                    info!(
                        now_date,
                        "resuming the user->coin map pull from its stored position"
                    );
                    self.now_date = Some(now_date);
                }
                _ => warn!(
                    value,
                    "ignoring a stored pull position that is not a positive integer"
                ),
            },
            Ok(None) => {}
            Err(e) => {
                warn!(error = %e, "cannot read the pull's stored position; pulling the whole map")
            }
        }
    }

    /// The settings the puller runs with.
    pub fn settings(&self) -> &UserCoinMapPull {
        &self.settings
    }

    /// The `last_date` the next round asks for; `None` while no round has succeeded (the next
    /// request is bare).
    pub fn last_date(&self) -> Option<u64> {
        self.now_date
            .map(|now| now.saturating_sub(whole_seconds_up(self.settings.interval)))
    }

    /// The URL the next round requests.
    pub fn next_url(&self) -> Url {
        let mut url = self.url.clone();
        if let Some(last_date) = self.last_date() {
            url.query_pairs_mut()
                .append_pair("last_date", &last_date.to_string());
        }
        url
    }

    /// One round: GET the map, apply its pairs, and advance `last_date` when it all worked.
    /// Never panics; failures come back as [`PullError`] and are logged at `warn`.
    pub async fn pull_once(&mut self) -> Result<PullSummary, PullError> {
        let url = self.next_url();
        let result = match self.fetch(&url).await {
            Ok(body) => self.apply(body).await,
            Err(e) => Err(e),
        };
        log_outcome(&url, &result);
        result
    }

    /// Requests `url` and reads the body, within the timeout and the size bound.
    async fn fetch(&self, url: &Url) -> Result<Vec<u8>, PullError> {
        debug!(url = %redacted(url), "pulling the user->coin map");
        let timeout = self.settings.timeout;
        // The client has the same timeout; this one also bounds reading the body chunk by chunk
        // and turns every expiry into the same error.
        match tokio::time::timeout(timeout, self.fetch_unbounded(url)).await {
            Ok(result) => result,
            Err(_) => Err(PullError::Timeout(timeout)),
        }
    }

    async fn fetch_unbounded(&self, url: &Url) -> Result<Vec<u8>, PullError> {
        let limit = self.settings.max_body;
        let mut response = self
            .client
            .get(url.clone())
            .send()
            .await
            .map_err(|e| request_error(e, self.settings.timeout))?;
        let status = response.status();
        if !status.is_success() {
            return Err(PullError::Status(status.as_u16()));
        }
        let declared = response.content_length();
        if declared.is_some_and(|len| len > limit as u64) {
            return Err(PullError::TooLarge { limit });
        }
        let mut body = Vec::with_capacity(
            declared
                .and_then(|len| usize::try_from(len).ok())
                .unwrap_or(0)
                .min(limit),
        );
        while let Some(chunk) = response
            .chunk()
            .await
            .map_err(|e| request_error(e, self.settings.timeout))?
        {
            if chunk.len() > limit - body.len() {
                return Err(PullError::TooLarge { limit });
            }
            body.extend_from_slice(&chunk);
        }
        Ok(body)
    }

    /// Parses and checks `body` off the async workers, writes its valid pairs and advances
    /// `last_date` when every write worked.
    async fn apply(&mut self, body: Vec<u8>) -> Result<PullSummary, PullError> {
        let core = Arc::clone(&self.core);
        let page = tokio::task::spawn_blocking(move || parse_page(&core, &body))
            .await
            .map_err(|e| PullError::Internal(format!("the parsing task failed: {e}")))??;
        let entries = page.entries;
        let mut invalid = page.invalid;
        // Refused before the core: counted here as the core counts the ones it refuses.
        self.core.metrics().count_switches(
            SwitchSource::Cron,
            SwitchCount::Invalid,
            page.invalid as u64,
        );
        let mut applied = 0usize;
        let chunk_size = self.core.settings().max_batch.max(1);
        let mut pairs = page.valid.into_iter();
        loop {
            let chunk: Vec<(String, String)> = pairs.by_ref().take(chunk_size).collect();
            if chunk.is_empty() {
                break;
            }
            let results = self
                .core
                .switch_coins(SwitchSource::Cron, chunk)
                .await
                .map_err(|e| PullError::Internal(format!("the core refused a chunk: {e}")))?;
            let mut failed = 0usize;
            let mut first_error: Option<String> = None;
            for result in results {
                match result {
                    Ok(_) => applied += 1,
                    Err(SwitchError::Invalid(e)) => {
                        // Checked before; counted should the core's rules ever differ.
                        warn!(error = %e, "user->coin map entry refused by the core; skipped");
                        invalid += 1;
                    }
                    Err(SwitchError::Store(e)) => {
                        failed += 1;
                        first_error.get_or_insert_with(|| e.to_string());
                    }
                }
            }
            if let Some(error) = first_error {
                return Err(PullError::Store {
                    applied,
                    failed,
                    error,
                });
            }
        }
        self.now_date = Some(page.now_date);
        // Durable, so that the first pull after a restart is paged like the others.
        if let Err(e) = self
            .core
            .set_marker(&self.marker_name(), &page.now_date.to_string())
            .await
        {
            warn!(error = %e, "cannot store the pull's position; a restart would pull the whole map");
        }
        Ok(PullSummary {
            entries,
            applied,
            invalid,
            now_date: page.now_date,
        })
    }
}

/// Runs the scheduled pull over `core` until `shutdown`: a round at once, then one every
/// `settings.interval`. Only settings that cannot work end it early, with an error (logged as
/// well); a failed round is logged and retried at the next interval.
pub async fn run(
    core: Arc<SwitchCore>,
    settings: UserCoinMapPull,
    shutdown: CancellationToken,
) -> Result<(), SettingsError> {
    let mut puller = match UserCoinMapPuller::new(core, settings) {
        Ok(puller) => puller,
        Err(e) => {
            error!(error = %e, "the user->coin map pull cannot start");
            return Err(e);
        }
    };
    puller.resume().await;
    info!(
        url = %redacted(&puller.url),
        interval = ?puller.settings.interval,
        last_date = ?puller.last_date(),
        "user->coin map pull started"
    );
    let mut ticker = tokio::time::interval(puller.settings.interval);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            _ = ticker.tick() => {}
        }
        let url = puller.next_url();
        // Shutdown may cut the exchange, never the writes that follow it.
        let fetched = tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            fetched = puller.fetch(&url) => fetched,
        };
        let result = match fetched {
            Ok(body) => puller.apply(body).await,
            Err(e) => Err(e),
        };
        log_outcome(&url, &result);
    }
    info!("user->coin map pull stopped");
    Ok(())
}

fn log_outcome(url: &Url, result: &Result<PullSummary, PullError>) {
    match result {
        Ok(summary) => info!(
            source = %SwitchSource::Cron,
            url = %redacted(url),
            entries = summary.entries,
            applied = summary.applied,
            invalid = summary.invalid,
            now_date = summary.now_date,
            "user->coin map pulled"
        ),
        Err(e) => warn!(
            url = %redacted(url),
            error = %e,
            "user->coin map pull failed; last_date kept, retrying at the next interval"
        ),
    }
}

/// The interval in whole seconds, rounded up.
fn whole_seconds_up(interval: Duration) -> u64 {
    interval.as_secs() + u64::from(interval.subsec_nanos() > 0)
}

/// `url` without its user and password, for logs.
fn redacted(url: &Url) -> Url {
    let mut url = url.clone();
    // Only fails for URLs that cannot have credentials, which then have none.
    let _ = url.set_username("");
    let _ = url.set_password(None);
    url
}

fn request_error(e: reqwest::Error, timeout: Duration) -> PullError {
    if e.is_timeout() {
        PullError::Timeout(timeout)
    } else {
        PullError::Request(e)
    }
}

/// At most [`MAX_EXCERPT_BYTES`] of `s`, cut on a character boundary.
fn excerpt(s: &str) -> String {
    crate::validate::excerpt(s, MAX_EXCERPT_BYTES)
}

/// A checked page: the valid pairs in document order, and what was skipped.
struct Page {
    entries: usize,
    invalid: usize,
    valid: Vec<(String, String)>,
    now_date: u64,
}

/// The whole answer.
#[derive(Deserialize)]
struct Answer {
    #[serde(default)]
    err_no: i64,
    #[serde(default)]
    err_msg: Value,
    data: Option<Data>,
}

/// The answer without its `data`, read when the whole answer does not parse, to tell an error
/// answer (whose `data` may be anything) from a broken one.
#[derive(Deserialize)]
struct Envelope {
    #[serde(default)]
    err_no: i64,
    #[serde(default)]
    err_msg: Value,
}

#[derive(Deserialize)]
struct Data {
    #[serde(default)]
    user_coin: UserCoin,
    now_date: Option<Value>,
}

/// `user_coin`: the pairs in document order. An object, or an empty array / `null` for none.
#[derive(Default)]
struct UserCoin(Vec<(String, Value)>);

impl<'de> Deserialize<'de> for UserCoin {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct UserCoinVisitor;

        impl<'de> Visitor<'de> for UserCoinVisitor {
            type Value = UserCoin;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("an object of user: coin, or an empty array")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<UserCoin, A::Error> {
                let mut pairs = Vec::with_capacity(map.size_hint().unwrap_or(0).min(4096));
                while let Some(pair) = map.next_entry::<String, Value>()? {
                    pairs.push(pair);
                }
                Ok(UserCoin(pairs))
            }

            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<UserCoin, A::Error> {
                if seq.next_element::<serde::de::IgnoredAny>()?.is_some() {
                    return Err(serde::de::Error::custom(
                        "user_coin is a non-empty array; expected an object of user: coin",
                    ));
                }
                Ok(UserCoin::default())
            }

            fn visit_unit<E: serde::de::Error>(self) -> Result<UserCoin, E> {
                Ok(UserCoin::default())
            }

            fn visit_none<E: serde::de::Error>(self) -> Result<UserCoin, E> {
                Ok(UserCoin::default())
            }
        }

        deserializer.deserialize_any(UserCoinVisitor)
    }
}

fn err_no_error(err_no: i64, err_msg: &Value) -> PullError {
    PullError::ErrNo {
        err_no,
        err_msg: excerpt(&err_msg.to_string()),
    }
}

/// Parses a body and checks its entries against the core's rules.
fn parse_page(core: &SwitchCore, body: &[u8]) -> Result<Page, PullError> {
    let answer: Answer = match serde_json::from_slice(body) {
        Ok(answer) => answer,
        Err(e) if e.is_data() => {
            // The JSON is sound but not of the expected shape: an error answer may carry any
            // `data`, so its `err_no` is what matters.
            return Err(match serde_json::from_slice::<Envelope>(body) {
                Ok(envelope) if envelope.err_no != 0 => {
                    err_no_error(envelope.err_no, &envelope.err_msg)
                }
                _ => PullError::BadShape(excerpt(&e.to_string())),
            });
        }
        Err(e) => return Err(PullError::NotJson(excerpt(&e.to_string()))),
    };
    if answer.err_no != 0 {
        return Err(err_no_error(answer.err_no, &answer.err_msg));
    }
    let Some(data) = answer.data else {
        return Err(PullError::BadShape("no data object".into()));
    };
    let now_date = match &data.now_date {
        Some(value) => value
            .as_u64()
            .filter(|&n| n > 0)
            .ok_or_else(|| PullError::BadNowDate(excerpt(&value.to_string())))?,
        None => return Err(PullError::BadNowDate("missing".into())),
    };
    let entries = data.user_coin.0.len();
    let mut invalid = 0usize;
    let mut valid = Vec::with_capacity(entries);
    for (user, coin) in data.user_coin.0 {
        let refused = match (&coin, core.normalize_user(&user)) {
            (_, Err(e)) => Some(e.to_string()),
            (Value::String(coin), Ok(_)) => core
                .settings()
                .coins
                .check(coin)
                .err()
                .map(|e| e.to_string()),
            (other, Ok(_)) => Some(format!(
                "the coin is not a string: {}",
                excerpt(&other.to_string())
            )),
        };
        match (refused, coin) {
            (None, Value::String(coin)) => valid.push((user, coin)),
            (reason, _) => {
                invalid += 1;
                if invalid <= LOGGED_INVALID_ENTRIES {
                    warn!(
                        user = %excerpt(&user),
                        reason = reason.as_deref().unwrap_or("invalid"),
                        "user->coin map entry skipped"
                    );
                }
            }
        }
    }
    if invalid > 0 {
        warn!(
            invalid,
            entries, "user->coin map entries skipped as invalid"
        );
    }
    Ok(Page {
        entries,
        invalid,
        valid,
        now_date,
    })
}
