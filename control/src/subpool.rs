//! The sub-pool coinbase API of SPEC §6, as the Go switcherAPIServer served it: a pool backend
//! asks the job maker of a coin for a sub-pool's coinbase settings (`/subpool/get-coinbase`,
//! `/subpool-get-coinbase`) or changes them (`/subpool/update-coinbase`,
//! `/subpool-update-coinbase`), through ZooKeeper. The routes sit behind the switch API's basic
//! auth (see [`crate::http`]); every answer is HTTP 200 with a JSON body.
//!
//! # The exchange with the job maker
//!
//! The job maker owns the node `ZKSubPoolUpdateBaseDir<coin>/<subpool>` (the request) and its
//! child `.../ack` (its answer), and watches the request node. For one API request:
//!
//! 1. The request node must exist (404 `subpool '<name>' does not exist` otherwise) and so must
//!    the ack node (503 `jobmaker cannot ACK the request`); a watch is set on the ack node.
//! 2. Update: the request node gets `{"coin","subpool_name","coinbase_info","payout_addr"}` as
//!    JSON (whatever its version). Get: the request node gets its own current value back,
//!    written only if no one changed it since it was read (500 `data has been updated at query
//!    time` otherwise): a write the job maker sees, with nothing new to apply.
//! 3. The answer is the ack node's next value, awaited for `ZKSubPoolUpdateAckTimeout` seconds
//!    (504 `timeout when waiting ACK`): JSON
//!    `{"success","err_no","err_msg","subpool_name","old":{"coinbase_info","payout_addr"},"new":{...},"host":{"hostname"}}`.
//!    Get answers `{"success","err_no","err_msg","subpool_name","old"}`, and a job maker's
//!    `empty request` refusal becomes `success: true, err_msg: "success"` (a get sends no new
//!    settings); update answers the same plus `"new"`, with `err_no` 500 when the job maker
//!    failed without a number. `host` is logged, not answered.
//!
//! # Errors
//!
//! `{"err_no":N,"err_msg":"...","success":false}`, HTTP 200, with the Go server's numbers:
//! 400 for a body that is not a JSON object of the right types (`wrong JSON, ...`), an empty
//! `coin`, `subpool_name` or (update) `payout_addr`; 403 `API disabled` when
//! `ZKSubPoolUpdateBaseDir` is not set, or when the control runs on the embedded store (the job
//! makers are reached through ZooKeeper only); 404, 503, 504 as above; 500 when a ZooKeeper
//! request or the ack cannot be read (`cannot get ACK from zookeeper`,
//! `cannot parse ACK in zookeeper`). New: 400 `coin invalid` / `subpool_name invalid` for a
//! name that is not a single path segment ([`validate_user`]'s rules: no `/`, `.` or `..`, no
//! control character, at most 128 bytes), so that no request reaches a node outside
//! `<base>/<coin>/<subpool>`; 413 for a body over [`SUB_POOL_BODY_LIMIT`].
//!
//! # Beyond the Go server
//!
//! - Requests for the same sub-pool are answered one at a time in this process, so that two
//!   callers never take each other's ack (the Go server let them race). A request waits for the
//!   one before it at most the ack timeout (then 504).
//! - The ack is the ack node's next *change* (its modification zxid moves), looked for when the
//!   watch fires and every [`ACK_POLL_INTERVAL`] besides, so an ack is not missed when the
//!   ZooKeeper connection drops and the watch with it.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, Weak},
    time::Duration,
};

use serde::{Deserialize, Serialize};
use thiserror::Error;
use tokio::sync::oneshot;
use tracing::{info, warn};
use zookeeper_async::{ZkError, ZooKeeper};

use crate::{store::zookeeper::timed, validate::validate_user};

/// The largest request body the sub-pool routes accept, in bytes.
pub const SUB_POOL_BODY_LIMIT: usize = 64 * 1024;

/// How often the ack node is read while waiting, besides when its watch fires.
pub const ACK_POLL_INTERVAL: Duration = Duration::from_millis(500);

/// The sub-pool API's settings (`ZKSubPoolUpdateBaseDir`, `ZKSubPoolUpdateAckTimeout`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubPoolSettings {
    /// `ZKSubPoolUpdateBaseDir`, with a trailing `/`.
    pub base_dir: String,
    /// How long the job maker has to answer.
    pub ack_timeout: Duration,
}

/// Why a sub-pool request failed; each is answered with its `err_no` and message.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum SubPoolError {
    /// `ZKSubPoolUpdateBaseDir` is not configured.
    #[error("API disabled")]
    Disabled,
    /// The control runs on the embedded store: there is no ZooKeeper to reach job makers by.
    #[error(
        "API disabled: the sub-pool coinbase API reaches job makers through ZooKeeper (ZKBroker); this control runs on the embedded store"
    )]
    NoZooKeeper,
    /// The body could not be read.
    #[error("{0}")]
    Unreadable(String),
    /// The body is over [`SUB_POOL_BODY_LIMIT`].
    #[error("request body is larger than {SUB_POOL_BODY_LIMIT} bytes")]
    TooLarge,
    /// The body is not a JSON object with string fields.
    #[error("wrong JSON, {0}")]
    WrongJson(String),
    /// No coin.
    #[error("coin cannot be empty")]
    CoinEmpty,
    /// No sub-pool name.
    #[error("subpool_name cannot be empty")]
    SubPoolEmpty,
    /// No payout address (update).
    #[error("payout_addr cannot be empty")]
    PayoutAddrEmpty,
    /// The coin is not a single path segment.
    #[error("coin invalid")]
    CoinInvalid,
    /// The sub-pool name is not a single path segment.
    #[error("subpool_name invalid")]
    SubPoolInvalid,
    /// The request node does not exist.
    #[error("subpool '{0}' does not exist")]
    UnknownSubPool(String),
    /// The ack node does not exist: no job maker answers for this sub-pool.
    #[error("jobmaker cannot ACK the request")]
    NoAckNode,
    /// Get: the request node changed between its read and its write.
    #[error("data has been updated at query time")]
    ChangedMeanwhile,
    /// The request node could not be written.
    #[error("write data node failed")]
    WriteFailed,
    /// A ZooKeeper request failed before the request was written.
    #[error("zookeeper request failed: {0}")]
    ZooKeeper(String),
    /// The ack node could not be read after it changed.
    #[error("cannot get ACK from zookeeper")]
    AckUnreadable,
    /// The ack is not the JSON the job maker writes.
    #[error("cannot parse ACK in zookeeper")]
    AckUnparsable,
    /// No ack within `ZKSubPoolUpdateAckTimeout`.
    #[error("timeout when waiting ACK")]
    Timeout,
}

impl SubPoolError {
    /// The `err_no` of the answer (the Go server's numbers, HTTP-like).
    pub fn err_no(&self) -> u32 {
        match self {
            Self::WrongJson(_)
            | Self::CoinEmpty
            | Self::SubPoolEmpty
            | Self::PayoutAddrEmpty
            | Self::CoinInvalid
            | Self::SubPoolInvalid => 400,
            Self::Disabled | Self::NoZooKeeper => 403,
            Self::UnknownSubPool(_) => 404,
            Self::TooLarge => 413,
            Self::Unreadable(_)
            | Self::ChangedMeanwhile
            | Self::WriteFailed
            | Self::ZooKeeper(_)
            | Self::AckUnreadable
            | Self::AckUnparsable => 500,
            Self::NoAckNode => 503,
            Self::Timeout => 504,
        }
    }
}

/// A request body: the Go server's `SubPoolUpdate`. Missing and `null` fields count as empty;
/// unknown ones are ignored.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct RequestBody {
    coin: Option<String>,
    subpool_name: Option<String>,
    coinbase_info: Option<String>,
    payout_addr: Option<String>,
}

/// What an update writes to the request node, in the Go server's field order.
#[derive(Debug, Serialize)]
struct UpdateNode<'a> {
    coin: &'a str,
    subpool_name: &'a str,
    coinbase_info: &'a str,
    payout_addr: &'a str,
}

/// A sub-pool's coinbase settings, as the job maker reports them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Coinbase {
    /// Text the job maker puts in the coinbase.
    pub coinbase_info: String,
    /// The address the sub-pool's blocks pay.
    pub payout_addr: String,
}

/// The answer to a get: the job maker's ack without `new`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GetCoinbaseReply {
    /// Whether the job maker answered without error.
    pub success: bool,
    /// The job maker's error number (0 on success).
    pub err_no: i64,
    /// The job maker's message.
    pub err_msg: String,
    /// The sub-pool, as the job maker names it.
    pub subpool_name: String,
    /// The current settings.
    pub old: Coinbase,
}

/// The answer to an update: the job maker's ack.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct UpdateCoinbaseReply {
    /// Whether the job maker applied the update.
    pub success: bool,
    /// The job maker's error number (500 when it failed without one).
    pub err_no: i64,
    /// The job maker's message.
    pub err_msg: String,
    /// The sub-pool, as the job maker names it.
    pub subpool_name: String,
    /// The settings before.
    pub old: Coinbase,
    /// The settings after.
    pub new: Coinbase,
}

/// The ack node's JSON, leniently: missing or `null` fields count as empty, as Go read them.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct Ack {
    success: Option<bool>,
    err_no: Option<i64>,
    err_msg: Option<String>,
    subpool_name: Option<String>,
    old: Option<AckCoinbase>,
    new: Option<AckCoinbase>,
    host: Option<AckHost>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct AckCoinbase {
    coinbase_info: Option<String>,
    payout_addr: Option<String>,
}

impl From<Option<AckCoinbase>> for Coinbase {
    fn from(c: Option<AckCoinbase>) -> Self {
        let c = c.unwrap_or_default();
        Self {
            coinbase_info: c.coinbase_info.unwrap_or_default(),
            payout_addr: c.payout_addr.unwrap_or_default(),
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct AckHost {
    hostname: Option<String>,
}

/// How the API reaches job makers.
enum Mode {
    Disabled,
    NoZooKeeper,
    ZooKeeper {
        zk: Arc<ZooKeeper>,
        settings: SubPoolSettings,
        request_timeout: Duration,
    },
}

/// The sub-pool coinbase API; see the module doc.
pub struct SubPoolApi {
    mode: Mode,
    /// One lock per sub-pool with a request in progress.
    locks: Mutex<HashMap<String, Weak<tokio::sync::Mutex<()>>>>,
}

impl std::fmt::Debug for SubPoolApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mode = match &self.mode {
            Mode::Disabled => "disabled".to_owned(),
            Mode::NoZooKeeper => "no ZooKeeper".to_owned(),
            Mode::ZooKeeper { settings, .. } => format!("{settings:?}"),
        };
        f.debug_struct("SubPoolApi").field("mode", &mode).finish()
    }
}

/// Which request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Get,
    Update,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Self::Get => "subpool-get",
            Self::Update => "subpool-update",
        }
    }
}

impl SubPoolApi {
    /// The API without `ZKSubPoolUpdateBaseDir`: every request is answered 403 `API disabled`.
    pub fn disabled() -> Self {
        Self::with_mode(Mode::Disabled)
    }

    /// The API on a control without ZooKeeper: every request is answered 403 with the reason.
    pub fn without_zookeeper() -> Self {
        Self::with_mode(Mode::NoZooKeeper)
    }

    /// The API over a connected ZooKeeper session; each ZooKeeper request may take
    /// `request_timeout`.
    pub fn zookeeper(
        zk: Arc<ZooKeeper>,
        settings: SubPoolSettings,
        request_timeout: Duration,
    ) -> Self {
        Self::with_mode(Mode::ZooKeeper {
            zk,
            settings,
            request_timeout,
        })
    }

    fn with_mode(mode: Mode) -> Self {
        Self {
            mode,
            locks: Mutex::new(HashMap::new()),
        }
    }

    /// `/subpool/get-coinbase` with this request body.
    pub async fn get_coinbase(&self, body: &[u8]) -> Result<GetCoinbaseReply, SubPoolError> {
        let ack = self.exchange(Kind::Get, body).await?;
        let mut success = ack.success.unwrap_or(false);
        let mut err_msg = ack.err_msg.unwrap_or_default();
        // A get sends nothing new: the job maker's "empty request" is the expected answer.
        if !success && err_msg == "empty request" {
            success = true;
            err_msg = "success".to_owned();
        }
        Ok(GetCoinbaseReply {
            success,
            err_no: ack.err_no.unwrap_or(0),
            err_msg,
            subpool_name: ack.subpool_name.unwrap_or_default(),
            old: ack.old.into(),
        })
    }

    /// `/subpool/update-coinbase` with this request body.
    pub async fn update_coinbase(&self, body: &[u8]) -> Result<UpdateCoinbaseReply, SubPoolError> {
        let ack = self.exchange(Kind::Update, body).await?;
        let success = ack.success.unwrap_or(false);
        let mut err_no = ack.err_no.unwrap_or(0);
        if !success && err_no == 0 {
            err_no = 500;
        }
        Ok(UpdateCoinbaseReply {
            success,
            err_no,
            err_msg: ack.err_msg.unwrap_or_default(),
            subpool_name: ack.subpool_name.unwrap_or_default(),
            old: ack.old.into(),
            new: ack.new.into(),
        })
    }

    /// Checks a request, writes it for the job maker and waits for its ack.
    async fn exchange(&self, kind: Kind, body: &[u8]) -> Result<Ack, SubPoolError> {
        let (zk, settings, request_timeout) = match &self.mode {
            Mode::Disabled => return Err(SubPoolError::Disabled),
            Mode::NoZooKeeper => return Err(SubPoolError::NoZooKeeper),
            Mode::ZooKeeper {
                zk,
                settings,
                request_timeout,
            } => (zk, settings, *request_timeout),
        };
        let request = parse_request(kind, body)?;
        let coin = request.coin.as_deref().unwrap_or_default();
        let subpool = request.subpool_name.as_deref().unwrap_or_default();
        let coinbase_info = request.coinbase_info.as_deref().unwrap_or_default();
        let payout_addr = request.payout_addr.as_deref().unwrap_or_default();
        info!(
            request = kind.name(),
            coin,
            subpool,
            coinbase_info = (kind == Kind::Update).then_some(coinbase_info),
            payout_addr = (kind == Kind::Update).then_some(payout_addr),
            "sub-pool request"
        );
        let req_node = format!("{}{coin}/{subpool}", settings.base_dir);
        let ack_node = format!("{req_node}/ack");

        // One request per sub-pool at a time, waiting at most the ack timeout for the turn.
        let lock = self.lock_for(&req_node);
        let _turn = tokio::time::timeout(settings.ack_timeout, lock.lock())
            .await
            .map_err(|_| {
                warn!(
                    request = kind.name(),
                    coin, subpool, "another request for this sub-pool took the whole ack timeout"
                );
                SubPoolError::Timeout
            })?;

        let zk_failed = |what: &str, e: ZkError| {
            warn!(request = kind.name(), coin, subpool, node = %req_node, error = ?e, "ZooKeeper {what} failed");
            SubPoolError::ZooKeeper(format!("{what}: {e:?}"))
        };
        // The request node, and (get) its current value and version.
        let current = match kind {
            Kind::Get => match timed(request_timeout, zk.get_data(&req_node, false)).await {
                Ok((data, stat)) => Some((data, stat.version)),
                Err(ZkError::NoNode) => None,
                Err(e) => return Err(zk_failed("read of the request node", e)),
            },
            Kind::Update => match timed(request_timeout, zk.exists(&req_node, false)).await {
                Ok(Some(_)) => Some((Vec::new(), -1)),
                Ok(None) => None,
                Err(e) => return Err(zk_failed("read of the request node", e)),
            },
        };
        let Some((current, version)) = current else {
            warn!(request = kind.name(), coin, subpool, node = %req_node, err_no = 404, "sub-pool node does not exist");
            return Err(SubPoolError::UnknownSubPool(subpool.to_owned()));
        };

        // The ack node, watched from now on.
        let (fired_tx, fired_rx) = oneshot::channel();
        let before = match timed(
            request_timeout,
            zk.exists_w(&ack_node, move |event| {
                let _ = fired_tx.send(event);
            }),
        )
        .await
        {
            Ok(Some(stat)) => stat.mzxid,
            Ok(None) => {
                warn!(request = kind.name(), coin, subpool, node = %ack_node, err_no = 503, "sub-pool ack node does not exist");
                return Err(SubPoolError::NoAckNode);
            }
            Err(e) => return Err(zk_failed("read of the ack node", e)),
        };

        // The request.
        let written = match kind {
            Kind::Get => {
                timed(
                    request_timeout,
                    zk.set_data(&req_node, current, Some(version)),
                )
                .await
            }
            Kind::Update => {
                let data = serde_json::to_vec(&UpdateNode {
                    coin,
                    subpool_name: subpool,
                    coinbase_info,
                    payout_addr,
                })
                .map_err(|e| SubPoolError::ZooKeeper(e.to_string()))?;
                timed(request_timeout, zk.set_data(&req_node, data, None)).await
            }
        };
        if let Err(e) = written {
            warn!(request = kind.name(), coin, subpool, node = %req_node, error = ?e, err_no = 500, "sub-pool request not written");
            return Err(if e == ZkError::BadVersion {
                SubPoolError::ChangedMeanwhile
            } else {
                SubPoolError::WriteFailed
            });
        }

        // The ack.
        let ack = tokio::time::timeout(
            settings.ack_timeout,
            wait_for_ack(zk, &ack_node, before, fired_rx, request_timeout),
        )
        .await
        .map_err(|_| {
            warn!(request = kind.name(), coin, subpool, timeout_s = settings.ack_timeout.as_secs_f64(), err_no = 504, "timeout when waiting for the sub-pool ack");
            SubPoolError::Timeout
        })?
        .inspect_err(|e| {
            warn!(request = kind.name(), coin, subpool, node = %ack_node, err_no = e.err_no(), error = %e, "sub-pool ack unusable");
        })?;
        info!(
            request = kind.name(),
            coin,
            subpool,
            success = ?ack.success,
            err_no = ?ack.err_no,
            err_msg = ack.err_msg.as_deref().unwrap_or(""),
            host = ack.host.as_ref().and_then(|h| h.hostname.as_deref()).unwrap_or(""),
            "sub-pool ack"
        );
        Ok(ack)
    }

    /// The lock of one sub-pool's requests (dropping the locks nobody holds any more).
    fn lock_for(&self, node: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self.locks.lock().unwrap_or_else(|e| e.into_inner());
        locks.retain(|_, lock| lock.strong_count() > 0);
        if let Some(lock) = locks.get(node).and_then(Weak::upgrade) {
            return lock;
        }
        let lock = Arc::new(tokio::sync::Mutex::new(()));
        locks.insert(node.to_owned(), Arc::downgrade(&lock));
        lock
    }
}

/// Parses and checks a request body, in the Go server's order of checks.
fn parse_request(kind: Kind, body: &[u8]) -> Result<RequestBody, SubPoolError> {
    let value: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| SubPoolError::WrongJson(bounded(e)))?;
    // serde would read a struct from an array too; the Go server took objects (and null) only.
    if !(value.is_object() || value.is_null()) {
        return Err(SubPoolError::WrongJson(
            "the body must be a JSON object".into(),
        ));
    }
    let request: RequestBody = if value.is_null() {
        RequestBody::default()
    } else {
        serde_json::from_value(value).map_err(|e| SubPoolError::WrongJson(bounded(e)))?
    };
    let coin = request.coin.as_deref().unwrap_or_default();
    let subpool = request.subpool_name.as_deref().unwrap_or_default();
    if coin.is_empty() {
        return Err(SubPoolError::CoinEmpty);
    }
    if subpool.is_empty() {
        return Err(SubPoolError::SubPoolEmpty);
    }
    if kind == Kind::Update
        && request
            .payout_addr
            .as_deref()
            .unwrap_or_default()
            .is_empty()
    {
        return Err(SubPoolError::PayoutAddrEmpty);
    }
    validate_user(coin).map_err(|reason| {
        warn!(request = kind.name(), reason = %reason, "sub-pool request with an invalid coin");
        SubPoolError::CoinInvalid
    })?;
    validate_user(subpool).map_err(|reason| {
        warn!(request = kind.name(), reason = %reason, "sub-pool request with an invalid sub-pool name");
        SubPoolError::SubPoolInvalid
    })?;
    Ok(request)
}

/// Waits until the ack node's modification zxid moves past `before`, and parses the ack.
async fn wait_for_ack(
    zk: &ZooKeeper,
    ack_node: &str,
    before: i64,
    fired: oneshot::Receiver<zookeeper_async::WatchedEvent>,
    request_timeout: Duration,
) -> Result<Ack, SubPoolError> {
    let mut fired = Some(fired);
    loop {
        let watch_fired = tokio::select! {
            _ = async {
                match fired.as_mut() {
                    Some(rx) => { let _ = rx.await; }
                    None => std::future::pending().await,
                }
            } => {
                fired = None;
                true
            }
            () = tokio::time::sleep(ACK_POLL_INTERVAL) => false,
        };
        match timed(request_timeout, zk.get_data(ack_node, false)).await {
            Ok((data, stat)) if stat.mzxid != before => return parse_ack(&data),
            Ok(_) => {}
            Err(ZkError::NoNode) => return Err(SubPoolError::AckUnreadable),
            // The watch says the ack is there: it must be readable. A poll tries again.
            Err(_) if watch_fired => return Err(SubPoolError::AckUnreadable),
            Err(_) => {}
        }
    }
}

/// The ack node's value as an [`Ack`]: a JSON object (or `null`), fields of the right types.
fn parse_ack(data: &[u8]) -> Result<Ack, SubPoolError> {
    let value: serde_json::Value =
        serde_json::from_slice(data).map_err(|_| SubPoolError::AckUnparsable)?;
    if value.is_null() {
        return Ok(Ack::default());
    }
    if !value.is_object() {
        return Err(SubPoolError::AckUnparsable);
    }
    serde_json::from_value(value).map_err(|_| SubPoolError::AckUnparsable)
}

/// Keeps parser messages short: some quote the input.
fn bounded(message: impl std::fmt::Display) -> String {
    const MAX: usize = 200;
    let mut s = message.to_string();
    if s.len() > MAX {
        let mut end = MAX;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
        s.push('…');
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_checked_in_the_go_order() {
        let check = |kind, body: &str| parse_request(kind, body.as_bytes()).map(|_| ());
        assert!(matches!(
            check(Kind::Get, ""),
            Err(SubPoolError::WrongJson(_))
        ));
        assert!(matches!(
            check(Kind::Get, "[]"),
            Err(SubPoolError::WrongJson(_))
        ));
        assert!(matches!(
            check(Kind::Get, r#"{"coin":1}"#),
            Err(SubPoolError::WrongJson(_))
        ));
        assert_eq!(check(Kind::Get, "null"), Err(SubPoolError::CoinEmpty));
        assert_eq!(
            check(Kind::Get, r#"{"coin":"btc"}"#),
            Err(SubPoolError::SubPoolEmpty)
        );
        assert_eq!(
            check(Kind::Get, r#"{"coin":"btc","subpool_name":"p"}"#),
            Ok(())
        );
        assert_eq!(
            check(Kind::Update, r#"{"coin":"btc","subpool_name":"p"}"#),
            Err(SubPoolError::PayoutAddrEmpty)
        );
        for (body, err) in [
            (
                r#"{"coin":"..","subpool_name":"p"}"#,
                SubPoolError::CoinInvalid,
            ),
            (
                r#"{"coin":"b/c","subpool_name":"p"}"#,
                SubPoolError::CoinInvalid,
            ),
            (
                r#"{"coin":"btc","subpool_name":"../x"}"#,
                SubPoolError::SubPoolInvalid,
            ),
            (
                r#"{"coin":"btc","subpool_name":"a\u0000"}"#,
                SubPoolError::SubPoolInvalid,
            ),
            (
                r#"{"coin":"btc","subpool_name":"."}"#,
                SubPoolError::SubPoolInvalid,
            ),
        ] {
            assert_eq!(check(Kind::Get, body), Err(err), "{body}");
        }
    }

    #[test]
    fn acks_are_read_leniently_but_must_be_objects() {
        let ack = parse_ack(br#"{"success":true,"err_msg":null,"old":{"payout_addr":"x"}}"#)
            .expect("an ack");
        assert_eq!(ack.success, Some(true));
        assert_eq!(Coinbase::from(ack.old).payout_addr, "x");
        assert!(parse_ack(b"null").is_ok());
        assert_eq!(parse_ack(b"[]").err(), Some(SubPoolError::AckUnparsable));
        assert_eq!(
            parse_ack(b"{\"success\":\"yes\"}").err(),
            Some(SubPoolError::AckUnparsable)
        );
        assert_eq!(parse_ack(b"").err(), Some(SubPoolError::AckUnparsable));
    }
}
