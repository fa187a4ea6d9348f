//! One puller per coin of `UserListAPI` (SPEC §7): every `IntervalSeconds` it GETs
//! `url?last_id=N`, maps alias names (`name_coin` → `name`), ingests the users through a
//! [`ListedUserSink`] (created only when absent) and moves the cursor N.
//!
//! Choices where SPEC §7 is silent:
//! - `"data": []` and `"data": {}` are empty pages. A missing `err_no` counts as 0; any other
//!   `err_no` fails the round (logged, retried).
//! - A puid must be a non-negative integer; entries with another value are skipped (logged).
//! - The users taken are recorded for the user-list API ([`ListedUsers`]) under the user an
//!   alias stands for (`mmm_btc` as `mmm`), with the alias's puid, as the Go initUserCoin listed
//!   them: that is the name miners log in with.
//! - The cursor moves over users created or already present, and over names that can never be
//!   ingested (empty, containing `/`, refused by the control service's validator); it stops
//!   before the first user whose write failed, so that user is read again next time. It never
//!   moves backwards.
//! - A failed round (HTTP error, timeout, a body that is not the expected JSON or larger than
//!   the bound, the control service unavailable) is retried with a backoff that starts at one
//!   second and doubles up to `IntervalSeconds`.

use std::{sync::Arc, time::Duration};

use serde_json::Value;
use thiserror::Error;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::{
    listed::ListedUsers,
    sink::{IngestStatus, ListedUserSink, SinkError},
};

/// The default bound on a user-list answer.
pub const DEFAULT_MAX_BODY: usize = 256 * 1024 * 1024;
/// The default timeout of one request.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

/// What one puller pulls.
#[derive(Debug, Clone)]
pub struct PullerSettings {
    /// The coin the list belongs to.
    pub coin: String,
    /// The list's URL, without `last_id`.
    pub url: String,
    /// `IntervalSeconds`: between two successful pulls.
    pub interval: Duration,
    /// How long one request may take.
    pub timeout: Duration,
    /// The largest answer read.
    pub max_body: usize,
}

impl PullerSettings {
    /// Settings with the default timeout and bound.
    pub fn new(coin: impl Into<String>, url: impl Into<String>, interval: Duration) -> Self {
        Self {
            coin: coin.into(),
            url: url.into(),
            interval,
            timeout: DEFAULT_TIMEOUT,
            max_body: DEFAULT_MAX_BODY,
        }
    }
}

/// Why a round failed. Nothing moved; the round is retried.
#[derive(Debug, Error)]
pub enum PullError {
    /// The settings cannot work.
    #[error("bad settings: {0}")]
    Settings(String),
    /// The request failed or timed out.
    #[error("request failed: {0}")]
    Request(String),
    /// The backend answered with an HTTP error.
    #[error("HTTP status {0}")]
    Status(u16),
    /// The answer was larger than the bound.
    #[error("the answer is larger than {0} bytes")]
    TooLarge(usize),
    /// The answer is not the expected JSON.
    #[error("the answer is not a user list: {0}")]
    BadBody(String),
    /// The backend reported an error.
    #[error("the backend answered err_no {err_no}: {err_msg}")]
    ErrNo {
        /// Its number.
        err_no: i64,
        /// Its message.
        err_msg: String,
    },
    /// The users could not be ingested.
    #[error(transparent)]
    Sink(#[from] SinkError),
}

/// What one round did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PullSummary {
    /// Entries in the answer.
    pub entries: usize,
    /// Users created.
    pub created: usize,
    /// Users that existed.
    pub existed: usize,
    /// Entries skipped: invalid names or puids.
    pub skipped: usize,
    /// Users whose write failed (read again next round).
    pub failed: usize,
    /// The cursor after the round.
    pub last_id: u64,
}

/// One page of a user list: `(puid, name)` in ascending puid, and how many entries were bad.
fn parse_page(body: &[u8]) -> Result<(Vec<(u64, String)>, usize), PullError> {
    let value: Value =
        serde_json::from_slice(body).map_err(|e| PullError::BadBody(e.to_string()))?;
    let object = value
        .as_object()
        .ok_or_else(|| PullError::BadBody("not a JSON object".into()))?;
    let err_no = match object.get("err_no") {
        None | Some(Value::Null) => 0,
        Some(v) => v
            .as_i64()
            .ok_or_else(|| PullError::BadBody("err_no is not an integer".into()))?,
    };
    if err_no != 0 {
        let err_msg = match object.get("err_msg") {
            Some(Value::String(s)) => s.clone(),
            Some(other) => other.to_string(),
            None => String::new(),
        };
        return Err(PullError::ErrNo { err_no, err_msg });
    }
    let mut bad = 0;
    let mut entries: Vec<(u64, String)> = match object.get("data") {
        Some(Value::Object(map)) => map
            .iter()
            .filter_map(|(name, puid)| match puid.as_u64() {
                Some(puid) => Some((puid, name.clone())),
                None => {
                    bad += 1;
                    None
                }
            })
            .collect(),
        Some(Value::Array(a)) if a.is_empty() => Vec::new(),
        None | Some(Value::Null) => Vec::new(),
        Some(_) => return Err(PullError::BadBody("data is not an object".into())),
    };
    entries.sort();
    Ok((entries, bad))
}

/// The user an entry of the list stands for: alias names `name_coin` map to `name`; `None`
/// for names that can never be users (empty, containing `/`).
pub fn user_of(name: &str) -> Option<&str> {
    let user = match name.rfind('_') {
        Some(i) => &name[..i],
        None => name,
    };
    (!user.is_empty() && !user.contains('/')).then_some(user)
}

/// Pulls one coin's user list; see the module doc.
pub struct UserListPuller {
    settings: PullerSettings,
    client: reqwest::Client,
    sink: Arc<dyn ListedUserSink>,
    listed: Arc<ListedUsers>,
    last_id: u64,
}

impl std::fmt::Debug for UserListPuller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UserListPuller")
            .field("settings", &self.settings)
            .field("last_id", &self.last_id)
            .finish_non_exhaustive()
    }
}

impl UserListPuller {
    /// A puller that starts at `last_id` 0.
    pub fn new(
        settings: PullerSettings,
        sink: Arc<dyn ListedUserSink>,
        listed: Arc<ListedUsers>,
    ) -> Result<Self, PullError> {
        let url = reqwest::Url::parse(&settings.url)
            .map_err(|e| PullError::Settings(format!("{:?} is not a URL: {e}", settings.url)))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(PullError::Settings(format!(
                "{:?} is not an http(s) URL",
                settings.url
            )));
        }
        if settings.interval.is_zero() {
            return Err(PullError::Settings(
                "IntervalSeconds must be at least 1".into(),
            ));
        }
        let client = reqwest::Client::builder()
            .timeout(settings.timeout)
            .build()
            .map_err(|e| PullError::Settings(e.to_string()))?;
        Ok(Self {
            settings,
            client,
            sink,
            listed,
            last_id: 0,
        })
    }

    /// The cursor: the largest puid taken so far.
    pub fn last_id(&self) -> u64 {
        self.last_id
    }

    fn url(&self) -> String {
        let sep = if self.settings.url.contains('?') {
            '&'
        } else {
            '?'
        };
        format!("{}{sep}last_id={}", self.settings.url, self.last_id)
    }

    async fn fetch(&self) -> Result<Vec<u8>, PullError> {
        let mut response = self
            .client
            .get(self.url())
            .send()
            .await
            .map_err(|e| PullError::Request(e.to_string()))?;
        if !response.status().is_success() {
            return Err(PullError::Status(response.status().as_u16()));
        }
        let max = self.settings.max_body;
        if response.content_length().is_some_and(|n| n > max as u64) {
            return Err(PullError::TooLarge(max));
        }
        let mut body = Vec::new();
        while let Some(chunk) = response
            .chunk()
            .await
            .map_err(|e| PullError::Request(e.to_string()))?
        {
            if body.len() + chunk.len() > max {
                return Err(PullError::TooLarge(max));
            }
            body.extend_from_slice(&chunk);
        }
        Ok(body)
    }

    /// One round: fetch, ingest, move the cursor.
    pub async fn pull_once(&mut self) -> Result<PullSummary, PullError> {
        let body = self.fetch().await?;
        let (entries, bad) = tokio::task::spawn_blocking(move || parse_page(&body))
            .await
            .map_err(|e| PullError::BadBody(e.to_string()))??;
        let mut summary = PullSummary {
            entries: entries.len() + bad,
            skipped: bad,
            ..PullSummary::default()
        };
        // The users to ingest, each once, in the order of their first entry.
        let mut users: Vec<String> = Vec::new();
        let mut index_of: std::collections::HashMap<&str, usize> = Default::default();
        for (_, name) in &entries {
            if let Some(user) = user_of(name)
                && !index_of.contains_key(user)
            {
                index_of.insert(user, users.len());
                users.push(user.to_owned());
            }
        }
        let statuses = if users.is_empty() {
            Vec::new()
        } else {
            self.sink.ingest(&self.settings.coin, users.clone()).await?
        };
        if statuses.len() != users.len() {
            return Err(PullError::Sink(SinkError::Unavailable(format!(
                "{} statuses for {} users",
                statuses.len(),
                users.len()
            ))));
        }
        for status in &statuses {
            match status {
                IngestStatus::Created => summary.created += 1,
                IngestStatus::Existed => summary.existed += 1,
                IngestStatus::Invalid(_) => summary.skipped += 1,
                IngestStatus::Failed(_) => summary.failed += 1,
            }
        }
        // Move the cursor over every entry up to the first one whose user failed.
        let mut taken = Vec::new();
        let mut cursor = self.last_id;
        for (puid, name) in &entries {
            let user = user_of(name);
            let status = user.and_then(|u| index_of.get(u)).map(|&i| &statuses[i]);
            match (status, user) {
                (Some(IngestStatus::Failed(_)), _) => break,
                // Listed as the user it stands for (`mmm_btc` as `mmm`), as the Go original.
                (Some(IngestStatus::Created | IngestStatus::Existed), Some(user)) => {
                    taken.push((*puid, user.to_owned()));
                }
                _ => {}
            }
            cursor = cursor.max(*puid);
        }
        self.listed.record(&self.settings.coin, taken);
        self.last_id = cursor;
        summary.last_id = cursor;
        Ok(summary)
    }

    /// Pulls until `shutdown`: at once, then every interval, with a backoff after failures.
    pub async fn run(self, shutdown: CancellationToken) {
        self.run_observed(shutdown, |_| {}).await;
    }

    /// [`UserListPuller::run`], handing each round's result to `observe` (e.g. to count
    /// pages) before it is logged.
    pub async fn run_observed(
        mut self,
        shutdown: CancellationToken,
        mut observe: impl FnMut(&Result<PullSummary, PullError>) + Send,
    ) {
        let coin = self.settings.coin.clone();
        let mut backoff = Duration::from_secs(1);
        loop {
            let round = tokio::select! {
                _ = shutdown.cancelled() => return,
                round = self.pull_once() => round,
            };
            observe(&round);
            let wait = match round {
                Ok(summary) => {
                    backoff = Duration::from_secs(1);
                    if summary.created + summary.failed > 0 {
                        info!(%coin, ?summary, "user list pulled");
                    } else {
                        debug!(%coin, ?summary, "user list pulled");
                    }
                    if summary.failed > 0 {
                        warn!(%coin, failed = summary.failed, "some users could not be written; they are read again next time");
                    }
                    self.settings.interval
                }
                Err(e) => {
                    warn!(%coin, url = %self.settings.url, last_id = self.last_id, error = %e, "user list pull failed; will retry");
                    let wait = backoff.min(self.settings.interval);
                    backoff = (backoff * 2).min(self.settings.interval);
                    wait
                }
            };
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alias_names_map_to_their_user() {
        assert_eq!(user_of("alice"), Some("alice"));
        assert_eq!(user_of("mmm_btc"), Some("mmm"));
        assert_eq!(user_of("a_b_bch"), Some("a_b"));
        assert_eq!(user_of("_btc"), None);
        assert_eq!(user_of(""), None);
        assert_eq!(user_of("x/y"), None);
    }

    #[test]
    fn pages_parse_with_their_quirks() {
        let (entries, bad) =
            parse_page(br#"{"err_no":0,"err_msg":null,"data":{"b":2,"a":1,"x":"7","y":-1}}"#)
                .expect("page");
        assert_eq!(entries, vec![(1, "a".into()), (2, "b".into())]);
        assert_eq!(bad, 2);
        assert!(
            parse_page(br#"{"err_no":0,"data":[]}"#)
                .expect("empty")
                .0
                .is_empty()
        );
        assert!(parse_page(br#"{"data":{}}"#).expect("empty").0.is_empty());
        assert!(matches!(
            parse_page(br#"{"err_no":3,"err_msg":"busy","data":[]}"#),
            Err(PullError::ErrNo { err_no: 3, .. })
        ));
        assert!(matches!(parse_page(b"<html>"), Err(PullError::BadBody(_))));
        assert!(matches!(
            parse_page(br#"{"err_no":0,"data":[1]}"#),
            Err(PullError::BadBody(_))
        ));
    }
}
