//! The sserver contract (SPEC §2): opening an upstream connection for one miner session.
//!
//! [`open`] connects to a coin's sserver and runs the switcher handshake on it:
//!
//! 1. it sends, in one write and without waiting in between, the version-rolling
//!    `mining.configure` (when the miner set a mask), the `mining.subscribe` that hands the
//!    sserver the session ID and the miner's IP, and the miner's own login request with the
//!    normalized `sub.miner` name;
//! 2. it reads the answers, within one deadline for the whole handshake: the subscribe answer
//!    must echo the session ID the miner was given ([`EchoCheck`]), or the miner's shares would
//!    be invalid; `mining.set_version_mask` gives the allowed mask; a refused login is tried
//!    once more as `sub_SUFFIX.miner` (the coin's `UserSuffix`);
//! 3. after a successful login it authorizes the connection's further workers again
//!    ([`UpstreamLogin::extra_auths`], SPEC §4) and consumes their answers, which never reach
//!    the miner.
//!
//! Every other line the sserver sends meanwhile (difficulty, jobs, ...) is kept, in order, in
//! [`Upstream::held`]: the session writes those to the miner after the login answer, so none is
//! lost. Lines that arrive after the last awaited answer stay unread in [`Upstream::socket`].
//!
//! Answers are told apart from the rest by their ids, which are the proxy's own: `configure`,
//! `subscribe`, `auth`, `auth-retry`, `auth-2`, `auth-3`, ... A line that carries one of these
//! ids and no `method` is an answer; an answer that was not awaited (a duplicate, or to a
//! request not sent) is dropped with a warning rather than passed to the miner.
//!
//! Memory stays bounded: lines are bounded by [`UpstreamLimits::max_line`], and at most
//! [`MAX_HELD_LINES`] lines and [`MAX_HELD_BYTES`] bytes (or one line, when lines may be
//! longer) are held; an sserver that sends more during the handshake fails it with
//! [`UpstreamError::BadAnswer`] (dropping lines instead would lose a difficulty or a job, and a
//! real sserver sends a handful).

#![forbid(unsafe_code)]

use std::{io, net::Ipv4Addr, time::Duration};

use bytes::Bytes;
use serde_json::{Value, json};
use thiserror::Error;
use tokio::{io::AsyncWriteExt, net::TcpStream, time::Instant};
use tracing::{debug, warn};

use crate::{
    framing::{self, FrameError, LineReader},
    session_id::{ChainType, SessionId},
};

/// The most lines held during one handshake.
pub const MAX_HELD_LINES: usize = 256;

/// The most bytes held during one handshake (at least one line of
/// [`UpstreamLimits::max_line`] is always allowed).
pub const MAX_HELD_BYTES: usize = 1 << 20;

/// Where to connect for a coin (one entry of `StratumServerMap`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamTarget {
    /// The coin, e.g. `btc`.
    pub coin: String,
    /// `host:port` (the `StratumServerMap` URL).
    pub addr: String,
    /// The coin's `UserSuffix` (default: the coin name).
    pub user_suffix: String,
    /// TLS to the sserver (`"TLS": true` in its `StratumServerMap` entry), when on.
    pub tls: Option<switchyard_tls::StratumTlsClient>,
}

/// The `mining.subscribe` sent to the sserver, by chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SubscribeParams {
    /// Bitcoin-like chains (bitcoin, both decred forms): params `[agent, SIDHEX, CLIENT_IP]`,
    /// SIDHEX being [`SessionId::hex`].
    Bitcoin {
        /// The miner's agent (default `stratumSwitcher`).
        agent: String,
    },
    /// Ethereum: params `[agent, protocol, SID, CLIENT_IP]`, SID being the session ID text the
    /// miner sees (`SessionId::text(ChainType::Ethereum)`, six hex digits): the sserver echoes
    /// it as sent and takes it as the extranonce.
    Ethereum {
        /// The miner's agent (`ETHProxy` for ETHProxy sessions).
        agent: String,
        /// The protocol (default `Stratum`; `ETHProxy/1.0.0` for ETHProxy sessions).
        protocol: String,
    },
}

/// How the subscribe answer must echo the session ID (SPEC §2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EchoCheck {
    /// Bitcoin-like: `result[1]` equals this text (`SessionId::text(chain)`: SIDHEX for
    /// bitcoin, the padded or little-endian forms for decred).
    SidText(String),
    /// EthereumStratum/1.0.0: `result[0][1] == sid` and `result[1] == extranonce` (the
    /// extranonce given to the miner).
    EthereumStratum {
        /// The session ID text.
        sid: String,
        /// The extranonce given to the miner (the SID, or its first 4 hex digits for NiceHash).
        extranonce: String,
    },
    /// Other Ethereum dialects: `result == true`.
    True,
}

/// What a session knows of its miner's login, to replay it on an upstream.
#[derive(Debug, Clone, PartialEq)]
pub struct UpstreamLogin {
    /// The session ID.
    pub sid: SessionId,
    /// The miner's IPv4 address.
    pub client_ip: Ipv4Addr,
    /// The subscribe to send.
    pub subscribe: SubscribeParams,
    /// How the subscribe answer must echo the session ID.
    pub echo: EchoCheck,
    /// The miner's version-rolling mask, if it sent `mining.configure` with one.
    pub version_mask: Option<u32>,
    /// The miner's login method (`mining.authorize` or `eth_submitLogin`).
    pub auth_method: String,
    /// The miner's login params, with `params[0]` already the normalized `sub.miner`.
    pub auth_params: Vec<Value>,
    /// The sub-account, for the suffix retry.
    pub sub_account: String,
    /// The miner name: the part of the worker after the first `.`, including the dot (`""`
    /// when none).
    pub miner_name: String,
    /// Further workers this connection authorized successfully (method, params normalized and
    /// without the suffix), replayed after the first login on a switch. Their answers are
    /// consumed by [`open`] and never reach the miner; a refused one is logged and does not fail
    /// the open. When the login needed the suffix, they are sent with it too
    /// ([`suffixed_worker`]).
    pub extra_auths: Vec<(String, Vec<Value>)>,
}

/// Time and size limits of [`open`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamLimits {
    /// For the TCP connect (name resolution included).
    pub connect_timeout: Duration,
    /// For all the answers together, from the end of the connect.
    pub handshake_timeout: Duration,
    /// The longest line accepted from the sserver, in bytes.
    pub max_line: usize,
    /// TCP keepalive idle time on the sserver socket (`None`: off).
    pub tcp_keepalive: Option<Duration>,
}

impl Default for UpstreamLimits {
    /// 5 s to connect, 10 s for the answers, [`framing::DEFAULT_MAX_LINE`].
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(5),
            handshake_timeout: Duration::from_secs(10),
            max_line: framing::DEFAULT_MAX_LINE,
            tcp_keepalive: None,
        }
    }
}

/// An sserver connection after a successful handshake.
#[derive(Debug)]
pub struct Upstream {
    /// The sserver connection, read by lines (lines after the last awaited answer are still
    /// buffered in it) and written through [`LineReader::get_mut`]: one socket, not two
    /// halves sharing it through an `Arc` (the relay reaches it on every line).
    pub socket: LineReader<TcpStream>,
    /// The mask from the sserver's `mining.set_version_mask` (`None` if none came; when none
    /// came but the `mining.configure` answer granted version rolling with a mask, that mask).
    pub allowed_mask: Option<u32>,
    /// The `result` of the sserver's answer to the successful login.
    pub auth_result: Value,
    /// The `error` of the sserver's answer to the successful login (`null` when absent).
    pub auth_error: Value,
    /// The first login was refused and the `sub_SUFFIX.miner` retry succeeded: the session
    /// applies the suffix to later workers.
    pub suffixed: bool,
    /// Lines that arrived during the handshake and are not answers to the proxy's requests
    /// (difficulty, jobs, ...), raw without `\n`, in arrival order: the session writes them to
    /// the miner after the login answer.
    pub held: Vec<Bytes>,
}

/// Why an upstream could not be opened.
#[derive(Debug, Error)]
pub enum UpstreamError {
    /// The TCP connect failed or timed out.
    #[error("connect failed: {0}")]
    Connect(#[source] io::Error),
    /// The TLS handshake with the sserver failed or timed out.
    #[error("TLS with the sserver failed: {0}")]
    Tls(#[source] io::Error),
    /// The answers did not all come within the handshake timeout.
    #[error("sserver handshake timed out")]
    Timeout,
    /// The sserver closed the connection during the handshake.
    #[error("sserver closed the connection during the handshake")]
    Closed,
    /// Reading or writing failed, or a line was over the bound.
    #[error("sserver connection: {0}")]
    Frame(#[from] FrameError),
    /// The subscribe answer does not echo the session ID the miner was given.
    #[error("sserver echoed session ID {got:?}, expected {expected:?}")]
    SidMismatch {
        /// What the answer had to carry.
        expected: String,
        /// What it carried (JSON text when not a string, cut to 64 characters).
        got: String,
    },
    /// Both logins (plain and suffixed) were refused; the last answer, for the miner.
    #[error("sserver refused the login: {error}")]
    AuthRejected {
        /// The answer's `result`.
        result: Value,
        /// The answer's `error`.
        error: Value,
    },
    /// The sserver answered something unusable (a refused subscribe, too many lines held).
    #[error("bad sserver answer: {0}")]
    BadAnswer(String),
}

impl UpstreamError {
    /// A short stable label for metrics: `connect`, `tls`, `timeout`, `closed`, `io`,
    /// `sid_mismatch`, `auth_rejected` or `bad_answer`.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Connect(_) => "connect",
            Self::Tls(_) => "tls",
            Self::Timeout => "timeout",
            Self::Closed => "closed",
            Self::Frame(_) => "io",
            Self::SidMismatch { .. } => "sid_mismatch",
            Self::AuthRejected { .. } => "auth_rejected",
            Self::BadAnswer(_) => "bad_answer",
        }
    }
}

/// Interval between TCP keepalive probes.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);

/// Unanswered keepalive probes before the connection is dropped.
const KEEPALIVE_PROBES: u32 = 6;

/// Turns TCP keepalive on (`Some(idle)`: probes after `idle` without traffic, every
/// `KEEPALIVE_INTERVAL`, `KEEPALIVE_PROBES` of them) or leaves it off, so that a peer that
/// vanished without a FIN is noticed in bounded time.
pub fn set_keepalive(stream: &TcpStream, idle: Option<Duration>) -> io::Result<()> {
    let Some(idle) = idle else {
        return Ok(());
    };
    let params = socket2::TcpKeepalive::new()
        .with_time(idle)
        .with_interval(KEEPALIVE_INTERVAL)
        .with_retries(KEEPALIVE_PROBES);
    socket2::SockRef::from(stream).set_tcp_keepalive(&params)
}

/// `worker` with `_SUFFIX` appended to its sub-account (the part before the first `.`):
/// `alice.rig1` → `alice_btc.rig1`, `alice` → `alice_btc`.
pub fn suffixed_worker(worker: &str, suffix: &str) -> String {
    match worker.split_once('.') {
        Some((sub, miner)) => format!("{sub}_{suffix}.{miner}"),
        None => format!("{worker}_{suffix}"),
    }
}

/// Connects to `target` and runs the handshake of SPEC §2 for `login`; see the module doc.
pub async fn open(
    target: &UpstreamTarget,
    login: &UpstreamLogin,
    limits: &UpstreamLimits,
) -> Result<Upstream, UpstreamError> {
    let stream = match tokio::time::timeout(
        limits.connect_timeout,
        TcpStream::connect(target.addr.as_str()),
    )
    .await
    {
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) => return Err(UpstreamError::Connect(e)),
        Err(_) => {
            return Err(UpstreamError::Connect(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("no connection within {:?}", limits.connect_timeout),
            )));
        }
    };
    if let Err(e) = stream.set_nodelay(true) {
        debug!(coin = %target.coin, error = %e, "TCP_NODELAY not set");
    }
    if let Err(e) = set_keepalive(&stream, limits.tcp_keepalive) {
        debug!(coin = %target.coin, error = %e, "TCP keepalive not set");
    }
    let deadline = Instant::now() + limits.handshake_timeout;
    // TLS to the sserver: the session's socket is the plain end of a bridge to it.
    let stream = match &target.tls {
        None => stream,
        Some(tls) => {
            let secured = tokio::time::timeout_at(deadline, tls.connect(stream))
                .await
                .unwrap_or_else(|_| {
                    Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "no TLS handshake with the sserver in time",
                    ))
                })
                .map_err(UpstreamError::Tls)?;
            // The bridge is a local socket pair: its failure is this process's (out of
            // descriptors), counted as the connect's.
            switchyard_tls::bridge(secured)
                .await
                .map_err(UpstreamError::Connect)?
        }
    };
    let handshake = Handshake {
        target,
        login,
        socket: LineReader::new(stream, limits.max_line),
        deadline,
        configure_pending: login.version_mask.is_some(),
        subscribed: false,
        auth: AuthState::First,
        extras_pending: Vec::new(),
        set_mask: None,
        configure_mask: None,
        held: Vec::new(),
        held_bytes: 0,
        max_held_bytes: MAX_HELD_BYTES.max(limits.max_line),
    };
    let result = handshake.run().await;
    if let Err(e) = &result {
        debug!(coin = %target.coin, sid = %login.sid, error = %e, "upstream handshake failed");
    }
    result
}

/// Where the login stands.
#[derive(Debug)]
enum AuthState {
    /// The first login is awaited.
    First,
    /// The first login was refused (its answer); the suffixed retry is awaited.
    Retry { result: Value, error: Value },
    /// A login succeeded.
    Done {
        result: Value,
        error: Value,
        suffixed: bool,
    },
}

/// An answer to one of the proxy's own requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AnswerId {
    Configure,
    Subscribe,
    Auth,
    AuthRetry,
    /// `auth-N`, N >= 2.
    Extra(usize),
}

impl AnswerId {
    /// The proxy's id `id`, if it is one.
    fn parse(id: &str) -> Option<Self> {
        match id {
            "configure" => Some(Self::Configure),
            "subscribe" => Some(Self::Subscribe),
            "auth" => Some(Self::Auth),
            "auth-retry" => Some(Self::AuthRetry),
            _ => id
                .strip_prefix("auth-")
                .filter(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|n| n.parse().ok())
                .filter(|&n| n >= 2)
                .map(Self::Extra),
        }
    }
}

/// The state of one handshake.
struct Handshake<'a> {
    target: &'a UpstreamTarget,
    login: &'a UpstreamLogin,
    socket: LineReader<TcpStream>,
    deadline: Instant,
    configure_pending: bool,
    subscribed: bool,
    auth: AuthState,
    /// Whether the answer to `auth-(i+2)` is still awaited.
    extras_pending: Vec<bool>,
    set_mask: Option<u32>,
    configure_mask: Option<u32>,
    held: Vec<Bytes>,
    held_bytes: usize,
    max_held_bytes: usize,
}

/// `request` as one line.
fn line(request: &Value) -> String {
    let mut text = request.to_string();
    text.push('\n');
    text
}

/// `value` as short text for errors and logs: a string as is, anything else as JSON, cut to
/// 64 characters.
fn short(value: &Value) -> String {
    let text = match value {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    text.chars().take(64).collect()
}

/// Whether `a` and `b` are the same hex text (sservers may differ in case).
fn same_hex(a: &Value, b: &str) -> bool {
    a.as_str().is_some_and(|a| a.eq_ignore_ascii_case(b))
}

impl Handshake<'_> {
    async fn run(mut self) -> Result<Upstream, UpstreamError> {
        let first = self.first_requests();
        self.send(&first).await?;
        while !self.done() {
            let line = match tokio::time::timeout_at(self.deadline, self.socket.read_line()).await {
                Err(_) => return Err(UpstreamError::Timeout),
                Ok(Err(e)) => return Err(self.lost(UpstreamError::Frame(e))),
                Ok(Ok(None)) => return Err(self.lost(UpstreamError::Closed)),
                Ok(Ok(Some(line))) => line,
            };
            self.handle(line).await?;
        }
        let AuthState::Done {
            result,
            error,
            suffixed,
        } = self.auth
        else {
            return Err(UpstreamError::BadAnswer("login not settled".into()));
        };
        Ok(Upstream {
            socket: self.socket,
            allowed_mask: self.set_mask.or(self.configure_mask),
            auth_result: result,
            auth_error: error,
            suffixed,
            held: self.held,
        })
    }

    /// Whether every awaited answer came. A `mining.configure` answer is not awaited once the
    /// subscribe answer came: sservers answer in order, so one that skipped it never answers.
    fn done(&self) -> bool {
        self.subscribed
            && matches!(self.auth, AuthState::Done { .. })
            && !self.extras_pending.iter().any(|&p| p)
    }

    /// When the connection is lost while the suffixed retry is awaited, the sserver most
    /// likely closed it for the refused login: the miner gets that refusal.
    fn lost(&self, e: UpstreamError) -> UpstreamError {
        match &self.auth {
            AuthState::Retry { result, error } => {
                debug!(coin = %self.target.coin, sid = %self.login.sid, error = %e,
                       "sserver gone after refusing the login");
                UpstreamError::AuthRejected {
                    result: result.clone(),
                    error: error.clone(),
                }
            }
            _ => e,
        }
    }

    /// Configure (if any), subscribe and login, as whole lines.
    fn first_requests(&self) -> String {
        let login = self.login;
        let mut out = String::new();
        if let Some(mask) = login.version_mask {
            out.push_str(&line(&json!({
                "id": "configure",
                "method": "mining.configure",
                "params": [["version-rolling"], {"version-rolling.mask": format!("{mask:08x}")}],
            })));
        }
        let ip = u32::from(login.client_ip);
        let params = match &login.subscribe {
            SubscribeParams::Bitcoin { agent } => json!([agent, login.sid.hex(), ip]),
            SubscribeParams::Ethereum { agent, protocol } => {
                json!([agent, protocol, login.sid.text(ChainType::Ethereum), ip])
            }
        };
        out.push_str(&line(&json!({
            "id": "subscribe",
            "method": "mining.subscribe",
            "params": params,
        })));
        out.push_str(&line(&json!({
            "id": "auth",
            "method": login.auth_method,
            "params": login.auth_params,
        })));
        out
    }

    /// Writes whole lines within the deadline.
    async fn send(&mut self, lines: &str) -> Result<(), UpstreamError> {
        match tokio::time::timeout_at(
            self.deadline,
            self.socket.get_mut().write_all(lines.as_bytes()),
        )
        .await
        {
            Err(_) => Err(UpstreamError::Timeout),
            Ok(Err(e)) => Err(self.lost(UpstreamError::Frame(FrameError::Io(e)))),
            Ok(Ok(())) => Ok(()),
        }
    }

    /// Takes one line from the sserver.
    async fn handle(&mut self, raw: Bytes) -> Result<(), UpstreamError> {
        if raw.iter().all(u8::is_ascii_whitespace) {
            return Ok(());
        }
        let Ok(Value::Object(message)) = serde_json::from_slice::<Value>(&raw) else {
            return self.hold(raw);
        };
        if let Some(method) = message.get("method").filter(|m| !m.is_null()) {
            if method == "mining.set_version_mask" {
                self.set_version_mask(message.get("params"));
                return Ok(());
            }
            return self.hold(raw);
        }
        let Some(id) = message
            .get("id")
            .and_then(Value::as_str)
            .and_then(AnswerId::parse)
        else {
            return self.hold(raw);
        };
        let result = message.get("result").cloned().unwrap_or(Value::Null);
        let error = message.get("error").cloned().unwrap_or(Value::Null);
        match id {
            AnswerId::Configure if self.configure_pending => {
                self.configure_pending = false;
                self.configure_answer(&result);
            }
            AnswerId::Subscribe if !self.subscribed => {
                self.check_echo(&result, &error)?;
                self.subscribed = true;
            }
            AnswerId::Auth if matches!(self.auth, AuthState::First) => {
                if result == Value::Bool(true) {
                    self.logged_in(result, error, false).await?;
                } else {
                    debug!(coin = %self.target.coin, sid = %self.login.sid,
                           error = %short(&error), "login refused; retrying with the suffix");
                    self.auth = AuthState::Retry { result, error };
                    let retry = self.retry_request();
                    self.send(&retry).await?;
                }
            }
            AnswerId::AuthRetry if matches!(self.auth, AuthState::Retry { .. }) => {
                if result == Value::Bool(true) {
                    self.logged_in(result, error, true).await?;
                } else {
                    return Err(UpstreamError::AuthRejected { result, error });
                }
            }
            AnswerId::Extra(n) if self.extras_pending.get(n - 2) == Some(&true) => {
                self.extras_pending[n - 2] = false;
                if result != Value::Bool(true) {
                    let worker = self
                        .login
                        .extra_auths
                        .get(n - 2)
                        .and_then(|(_, params)| params.first())
                        .map(short)
                        .unwrap_or_default();
                    warn!(coin = %self.target.coin, sid = %self.login.sid, %worker,
                          result = %short(&result), error = %short(&error),
                          "sserver refused a replayed worker login");
                }
            }
            other => {
                warn!(coin = %self.target.coin, sid = %self.login.sid, answer = ?other,
                      "unexpected answer from the sserver dropped");
            }
        }
        Ok(())
    }

    /// Keeps a line for the miner, within the bounds of the module doc.
    fn hold(&mut self, raw: Bytes) -> Result<(), UpstreamError> {
        if self.held.len() >= MAX_HELD_LINES || self.held_bytes + raw.len() > self.max_held_bytes {
            return Err(UpstreamError::BadAnswer(format!(
                "more than {MAX_HELD_LINES} lines or {} bytes of notifications during the \
                 handshake",
                self.max_held_bytes
            )));
        }
        self.held_bytes += raw.len();
        self.held.push(raw);
        Ok(())
    }

    /// `mining.set_version_mask` `["hex"]`.
    fn set_version_mask(&mut self, params: Option<&Value>) {
        let mask = params
            .and_then(|p| p.get(0))
            .and_then(Value::as_str)
            .and_then(|m| u32::from_str_radix(m, 16).ok());
        match mask {
            Some(mask) => self.set_mask = Some(mask),
            None => warn!(coin = %self.target.coin, sid = %self.login.sid,
                          params = %params.map(short).unwrap_or_default(),
                          "unreadable mining.set_version_mask ignored"),
        }
    }

    /// The `mining.configure` answer: the granted mask, if any.
    fn configure_answer(&mut self, result: &Value) {
        if result.get("version-rolling") == Some(&Value::Bool(true)) {
            self.configure_mask = result
                .get("version-rolling.mask")
                .and_then(Value::as_str)
                .and_then(|m| u32::from_str_radix(m, 16).ok());
        } else {
            // Refused: the miner must not roll any bit.
            self.configure_mask = Some(0);
            debug!(coin = %self.target.coin, sid = %self.login.sid, result = %short(result),
                   "sserver did not grant version rolling");
        }
    }

    /// Checks that the subscribe answer echoes the session ID (SPEC §2).
    fn check_echo(&self, result: &Value, error: &Value) -> Result<(), UpstreamError> {
        let ok = match &self.login.echo {
            EchoCheck::SidText(sid) => same_hex(&result[1], sid),
            EchoCheck::EthereumStratum { sid, extranonce } => {
                same_hex(&result[0][1], sid) && same_hex(&result[1], extranonce)
            }
            EchoCheck::True => *result == Value::Bool(true),
        };
        if ok {
            return Ok(());
        }
        if !error.is_null() {
            return Err(UpstreamError::BadAnswer(format!(
                "subscribe refused: {}",
                short(error)
            )));
        }
        let (expected, got) = match &self.login.echo {
            EchoCheck::SidText(sid) => (sid.clone(), short(&result[1])),
            EchoCheck::EthereumStratum { sid, extranonce } => {
                if same_hex(&result[0][1], sid) {
                    (extranonce.clone(), short(&result[1]))
                } else {
                    (sid.clone(), short(&result[0][1]))
                }
            }
            EchoCheck::True => ("true".to_owned(), short(result)),
        };
        warn!(coin = %self.target.coin, sid = %self.login.sid, %expected, %got,
              "sserver did not echo the session ID");
        Err(UpstreamError::SidMismatch { expected, got })
    }

    /// The login again as `sub_SUFFIX.miner`.
    fn retry_request(&self) -> String {
        let login = self.login;
        let mut params = login.auth_params.clone();
        let worker = Value::String(format!(
            "{}_{}{}",
            login.sub_account, self.target.user_suffix, login.miner_name
        ));
        match params.first_mut() {
            Some(first) => *first = worker,
            None => params.push(worker),
        }
        line(&json!({"id": "auth-retry", "method": login.auth_method, "params": params}))
    }

    /// A login succeeded: remember its answer and replay the further workers.
    async fn logged_in(
        &mut self,
        result: Value,
        error: Value,
        suffixed: bool,
    ) -> Result<(), UpstreamError> {
        self.auth = AuthState::Done {
            result,
            error,
            suffixed,
        };
        let extras = &self.login.extra_auths;
        if extras.is_empty() {
            return Ok(());
        }
        let mut out = String::new();
        for (i, (method, params)) in extras.iter().enumerate() {
            let mut params = params.clone();
            if suffixed && let Some(Value::String(worker)) = params.first_mut() {
                *worker = suffixed_worker(worker, &self.target.user_suffix);
            }
            out.push_str(&line(&json!({
                "id": format!("auth-{}", i + 2),
                "method": method,
                "params": params,
            })));
        }
        self.extras_pending = vec![true; extras.len()];
        self.send(&out).await
    }
}

#[cfg(test)]
mod tests {
    use std::{future::Future, net::SocketAddr};

    use tokio::{
        io::{AsyncBufReadExt, BufReader, Lines},
        net::{
            TcpListener,
            tcp::{OwnedReadHalf, OwnedWriteHalf},
        },
        task::JoinHandle,
    };

    use super::*;

    /// How long a test waits for anything before it fails.
    const DEADLINE: Duration = Duration::from_secs(10);

    /// The sserver's end of a scripted connection.
    struct Peer {
        lines: Lines<BufReader<OwnedReadHalf>>,
        write: OwnedWriteHalf,
    }

    impl Peer {
        async fn recv(&mut self) -> Value {
            let line = tokio::time::timeout(DEADLINE, self.lines.next_line())
                .await
                .expect("a line in time")
                .expect("read")
                .expect("a line, not the end");
            serde_json::from_str(&line).expect("JSON from the proxy")
        }

        /// Reads until the proxy closes, keeping both halves open meanwhile.
        async fn drain(mut self) {
            while let Ok(Some(_)) = self.lines.next_line().await {}
            drop(self.write);
        }

        /// Sends `lines` in one write, each followed by `\n`.
        async fn send(&mut self, lines: &[&str]) {
            let mut text = String::new();
            for line in lines {
                text.push_str(line);
                text.push('\n');
            }
            self.write.write_all(text.as_bytes()).await.expect("write");
        }
    }

    /// A listener that plays `script` on its first connection.
    async fn scripted<F, Fut>(script: F) -> (UpstreamTarget, JoinHandle<()>)
    where
        F: FnOnce(Peer) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let task = tokio::spawn(async move {
            let (stream, _) = listener.accept().await.expect("accept");
            let (read, write) = stream.into_split();
            script(Peer {
                lines: BufReader::new(read).lines(),
                write,
            })
            .await;
        });
        (target(addr), task)
    }

    fn target(addr: SocketAddr) -> UpstreamTarget {
        UpstreamTarget {
            coin: "btc".into(),
            addr: addr.to_string(),
            user_suffix: "btc".into(),
            tls: None,
        }
    }

    fn bitcoin_login() -> UpstreamLogin {
        let sid = SessionId(0x0300_0080);
        UpstreamLogin {
            sid,
            client_ip: Ipv4Addr::new(10, 0, 0, 7),
            subscribe: SubscribeParams::Bitcoin {
                agent: "cgminer/4.10".into(),
            },
            echo: EchoCheck::SidText(sid.text(ChainType::Bitcoin)),
            version_mask: None,
            auth_method: "mining.authorize".into(),
            auth_params: vec![json!("alice.rig1"), json!("x")],
            sub_account: "alice".into(),
            miner_name: ".rig1".into(),
            extra_auths: Vec::new(),
        }
    }

    #[tokio::test]
    async fn keepalive_is_set_with_its_idle_time_or_left_off() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let on = TcpStream::connect(addr).await.expect("connect");
        let off = TcpStream::connect(addr).await.expect("connect");
        set_keepalive(&on, Some(Duration::from_secs(45))).expect("keepalive");
        set_keepalive(&off, None).expect("nothing to do");
        let on = socket2::SockRef::from(&on);
        assert!(on.keepalive().expect("read"));
        assert_eq!(
            on.tcp_keepalive_time().expect("read"),
            Duration::from_secs(45)
        );
        assert_eq!(
            on.tcp_keepalive_interval().expect("read"),
            KEEPALIVE_INTERVAL
        );
        assert_eq!(on.tcp_keepalive_retries().expect("read"), KEEPALIVE_PROBES);
        assert!(!socket2::SockRef::from(&off).keepalive().expect("read"));
    }

    fn limits() -> UpstreamLimits {
        UpstreamLimits {
            connect_timeout: DEADLINE,
            handshake_timeout: DEADLINE,
            max_line: 4096,
            tcp_keepalive: None,
        }
    }

    async fn open_within(
        target: &UpstreamTarget,
        login: &UpstreamLogin,
        limits: &UpstreamLimits,
    ) -> Result<Upstream, UpstreamError> {
        tokio::time::timeout(2 * DEADLINE, open(target, login, limits))
            .await
            .expect("open returns in time")
    }

    const SUBSCRIBED: &str = r#"{"id":"subscribe","result":[[["mining.set_difficulty","03000080"],["mining.notify","03000080"]],"03000080",8],"error":null}"#;
    const AUTH_OK: &str = r#"{"id":"auth","result":true,"error":null}"#;
    const AUTH_REFUSED: &str =
        r#"{"id":"auth","result":null,"error":[29,"Invalid username",null]}"#;
    const DIFFICULTY: &str = r#"{"id":null,"method":"mining.set_difficulty","params":[1024]}"#;
    const NOTIFY: &str = r#"{"id":null,"method":"mining.notify","params":["btc-1"]}"#;

    #[tokio::test]
    async fn sends_all_requests_at_once_and_holds_notifications_in_order() {
        let (target, server) = scripted(|mut peer| async move {
            // All three requests arrive before anything is answered.
            assert_eq!(
                peer.recv().await,
                json!({"id": "configure", "method": "mining.configure",
                       "params": [["version-rolling"], {"version-rolling.mask": "00ffe000"}]})
            );
            assert_eq!(
                peer.recv().await,
                json!({"id": "subscribe", "method": "mining.subscribe",
                       "params": ["cgminer/4.10", "03000080", 0x0a00_0007_u32]})
            );
            assert_eq!(
                peer.recv().await,
                json!({"id": "auth", "method": "mining.authorize",
                       "params": ["alice.rig1", "x"]})
            );
            peer.send(&[
                r#"{"id":"configure","result":{"version-rolling":true,"version-rolling.mask":"00ffe000"},"error":null}"#,
                r#"{"id":null,"method":"mining.set_version_mask","params":["1fffe000"]}"#,
                DIFFICULTY,
                "",
                "not json at all",
                SUBSCRIBED,
                NOTIFY,
                AUTH_OK,
                r#"{"id":null,"method":"mining.notify","params":["btc-2"]}"#,
            ])
            .await;
            // Keep the connection open until the proxy's side is done.
            peer.drain().await;
        })
        .await;
        let login = UpstreamLogin {
            version_mask: Some(0x00ff_e000),
            ..bitcoin_login()
        };
        let mut upstream = open_within(&target, &login, &limits())
            .await
            .expect("handshake");
        assert_eq!(upstream.allowed_mask, Some(0x1fff_e000));
        assert_eq!(upstream.auth_result, json!(true));
        assert_eq!(upstream.auth_error, Value::Null);
        assert!(!upstream.suffixed);
        let held: Vec<&[u8]> = upstream.held.iter().map(|l| &l[..]).collect();
        assert_eq!(
            held,
            [DIFFICULTY.as_bytes(), b"not json at all", NOTIFY.as_bytes()]
        );
        // What came after the last answer is still in the reader, whole.
        let next = upstream.socket.read_line().await.expect("read");
        assert_eq!(
            next.as_deref(),
            Some(&br#"{"id":null,"method":"mining.notify","params":["btc-2"]}"#[..])
        );
        drop(upstream);
        server.await.expect("script");
    }

    #[tokio::test]
    async fn a_wrong_sid_fails_the_handshake() {
        let (target, server) = scripted(|mut peer| async move {
            peer.recv().await;
            peer.recv().await;
            peer.send(&[
                r#"{"id":"subscribe","result":[[],"03000081",8],"error":null}"#,
                AUTH_OK,
            ])
            .await;
            peer.drain().await;
        })
        .await;
        let err = open_within(&target, &bitcoin_login(), &limits())
            .await
            .expect_err("wrong SID");
        match &err {
            UpstreamError::SidMismatch { expected, got } => {
                assert_eq!((expected.as_str(), got.as_str()), ("03000080", "03000081"));
            }
            other => panic!("expected SidMismatch, got {other:?}"),
        }
        assert_eq!(err.reason(), "sid_mismatch");
        server.await.expect("script");
    }

    #[tokio::test]
    async fn a_refused_login_is_retried_with_the_suffix_and_extras_follow_it() {
        let (target, server) = scripted(|mut peer| async move {
            peer.recv().await;
            peer.recv().await;
            peer.send(&[SUBSCRIBED, AUTH_REFUSED]).await;
            assert_eq!(
                peer.recv().await,
                json!({"id": "auth-retry", "method": "mining.authorize",
                       "params": ["alice_btc.rig1", "x"]})
            );
            peer.send(&[
                r#"{"id":"auth-retry","result":true,"error":null}"#,
                DIFFICULTY,
            ])
            .await;
            assert_eq!(
                peer.recv().await,
                json!({"id": "auth-2", "method": "mining.authorize",
                       "params": ["alice_btc.rig2", "y"]})
            );
            assert_eq!(
                peer.recv().await,
                json!({"id": "auth-3", "method": "mining.authorize",
                       "params": ["bob_btc", ""]})
            );
            // Answered out of order, one refused: neither reaches the miner.
            peer.send(&[
                r#"{"id":"auth-3","result":null,"error":[29,"Invalid username",null]}"#,
                NOTIFY,
                r#"{"id":"auth-2","result":true,"error":null}"#,
            ])
            .await;
            peer.drain().await;
        })
        .await;
        let login = UpstreamLogin {
            extra_auths: vec![
                (
                    "mining.authorize".into(),
                    vec![json!("alice.rig2"), json!("y")],
                ),
                ("mining.authorize".into(), vec![json!("bob"), json!("")]),
            ],
            ..bitcoin_login()
        };
        let upstream = open_within(&target, &login, &limits())
            .await
            .expect("handshake");
        assert!(upstream.suffixed);
        assert_eq!(upstream.auth_result, json!(true));
        let held: Vec<&[u8]> = upstream.held.iter().map(|l| &l[..]).collect();
        assert_eq!(held, [DIFFICULTY.as_bytes(), NOTIFY.as_bytes()]);
        drop(upstream);
        server.await.expect("script");
    }

    #[tokio::test]
    async fn both_logins_refused_carry_the_last_answer() {
        let (target, server) = scripted(|mut peer| async move {
            peer.recv().await;
            peer.recv().await;
            peer.send(&[SUBSCRIBED, AUTH_REFUSED]).await;
            peer.recv().await;
            peer.send(&[r#"{"id":"auth-retry","result":false,"error":[21,"Job not found",null]}"#])
                .await;
            peer.drain().await;
        })
        .await;
        let err = open_within(&target, &bitcoin_login(), &limits())
            .await
            .expect_err("refused");
        match &err {
            UpstreamError::AuthRejected { result, error } => {
                assert_eq!(result, &json!(false));
                assert_eq!(error, &json!([21, "Job not found", null]));
            }
            other => panic!("expected AuthRejected, got {other:?}"),
        }
        assert_eq!(err.reason(), "auth_rejected");
        server.await.expect("script");
    }

    #[tokio::test]
    async fn an_sserver_closing_after_a_refusal_is_a_refusal() {
        let (target, server) = scripted(|mut peer| async move {
            peer.recv().await;
            peer.recv().await;
            peer.send(&[SUBSCRIBED, AUTH_REFUSED]).await;
            // Closes without reading the retry.
        })
        .await;
        let err = open_within(&target, &bitcoin_login(), &limits())
            .await
            .expect_err("refused");
        match err {
            UpstreamError::AuthRejected { result, error } => {
                assert_eq!(result, Value::Null);
                assert_eq!(error, json!([29, "Invalid username", null]));
            }
            other => panic!("expected AuthRejected, got {other:?}"),
        }
        server.await.expect("script");
    }

    #[tokio::test]
    async fn silence_times_out_and_closing_is_closed() {
        let (target, server) = scripted(|peer| async move {
            // Reads and never answers, until the proxy gives up.
            peer.drain().await;
        })
        .await;
        let short_limits = UpstreamLimits {
            handshake_timeout: Duration::from_millis(200),
            ..limits()
        };
        let err = open_within(&target, &bitcoin_login(), &short_limits)
            .await
            .expect_err("silent");
        assert!(matches!(err, UpstreamError::Timeout), "{err:?}");
        assert_eq!(err.reason(), "timeout");
        server.await.expect("script");

        let (target, server) = scripted(|mut peer| async move {
            // Reads everything before closing, so that the close is a clean end of stream.
            peer.recv().await;
            peer.recv().await;
            peer.send(&[SUBSCRIBED]).await;
        })
        .await;
        let err = open_within(&target, &bitcoin_login(), &limits())
            .await
            .expect_err("closed");
        assert!(matches!(err, UpstreamError::Closed), "{err:?}");
        assert_eq!(err.reason(), "closed");
        server.await.expect("script");
    }

    #[tokio::test]
    async fn a_refused_connection_is_a_connect_error() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        drop(listener);
        let err = open_within(&target(addr), &bitcoin_login(), &limits())
            .await
            .expect_err("refused");
        assert!(matches!(err, UpstreamError::Connect(_)), "{err:?}");
        assert_eq!(err.reason(), "connect");
    }

    #[tokio::test]
    async fn an_unanswered_configure_is_not_awaited_and_its_mask_is_the_fallback() {
        // Skipped entirely: no version rolling.
        let (target, server) = scripted(|mut peer| async move {
            for _ in 0..3 {
                peer.recv().await;
            }
            peer.send(&[SUBSCRIBED, AUTH_OK]).await;
            peer.drain().await;
        })
        .await;
        let login = UpstreamLogin {
            version_mask: Some(0xffff_ffff),
            ..bitcoin_login()
        };
        let upstream = open_within(&target, &login, &limits())
            .await
            .expect("handshake");
        assert_eq!(upstream.allowed_mask, None);
        drop(upstream);
        server.await.expect("script");

        // Granted in the answer, with no set_version_mask: the answer's mask.
        let (target, server) = scripted(|mut peer| async move {
            for _ in 0..3 {
                peer.recv().await;
            }
            peer.send(&[
                r#"{"id":"configure","result":{"version-rolling":true,"version-rolling.mask":"1fffe000"},"error":null}"#,
                SUBSCRIBED,
                AUTH_OK,
            ])
            .await;
            peer.drain().await;
        })
        .await;
        let upstream = open_within(&target, &login, &limits())
            .await
            .expect("handshake");
        assert_eq!(upstream.allowed_mask, Some(0x1fff_e000));
        assert!(upstream.held.is_empty());
        drop(upstream);
        server.await.expect("script");
    }

    #[tokio::test]
    async fn a_flood_of_notifications_is_refused_not_buffered() {
        let (target, server) = scripted(|mut peer| async move {
            peer.recv().await;
            peer.recv().await;
            let flood = vec![NOTIFY; MAX_HELD_LINES + 1];
            peer.send(&flood).await;
            peer.drain().await;
        })
        .await;
        let err = open_within(&target, &bitcoin_login(), &limits())
            .await
            .expect_err("flood");
        assert!(matches!(err, UpstreamError::BadAnswer(_)), "{err:?}");
        assert_eq!(err.reason(), "bad_answer");
        server.await.expect("script");
    }

    #[tokio::test]
    async fn a_line_over_the_bound_is_a_frame_error() {
        let (target, server) = scripted(|mut peer| async move {
            peer.recv().await;
            peer.recv().await;
            let long = "x".repeat(5000);
            peer.send(&[&long]).await;
            peer.drain().await;
        })
        .await;
        let err = open_within(&target, &bitcoin_login(), &limits())
            .await
            .expect_err("too long");
        assert!(
            matches!(err, UpstreamError::Frame(FrameError::TooLong(4096))),
            "{err:?}"
        );
        assert_eq!(err.reason(), "io");
        server.await.expect("script");
    }

    #[tokio::test]
    async fn ethereum_sends_the_six_digit_sid_and_checks_the_dialects_answer() {
        let sid = SessionId(0x0005_0180);
        let login = UpstreamLogin {
            sid,
            client_ip: Ipv4Addr::LOCALHOST,
            subscribe: SubscribeParams::Ethereum {
                agent: "ETHProxy".into(),
                protocol: "ETHProxy/1.0.0".into(),
            },
            echo: EchoCheck::True,
            version_mask: None,
            auth_method: "eth_submitLogin".into(),
            auth_params: vec![json!("alice.rig1"), json!("x")],
            sub_account: "alice".into(),
            miner_name: ".rig1".into(),
            extra_auths: Vec::new(),
        };
        for (subscribe_answer, expect) in [
            (r#"{"id":"subscribe","result":true,"error":null}"#, "ok"),
            (
                r#"{"id":"subscribe","result":false,"error":null}"#,
                "sid_mismatch",
            ),
            (
                r#"{"id":"subscribe","result":null,"error":[20,"Other/Unknown",null]}"#,
                "bad_answer",
            ),
        ] {
            let (target, server) = scripted(move |mut peer| async move {
                assert_eq!(
                    peer.recv().await,
                    json!({"id": "subscribe", "method": "mining.subscribe",
                           "params": ["ETHProxy", "ETHProxy/1.0.0", "050180", 0x7f00_0001_u32]})
                );
                assert_eq!(peer.recv().await["method"], "eth_submitLogin");
                peer.send(&[
                    subscribe_answer,
                    r#"{"id":"auth","jsonrpc":"2.0","result":true}"#,
                ])
                .await;
                peer.drain().await;
            })
            .await;
            let got = open_within(&target, &login, &limits()).await;
            assert_eq!(
                got.as_ref().map_or_else(UpstreamError::reason, |_| "ok"),
                expect,
                "{subscribe_answer}: {got:?}"
            );
            drop(got);
            server.await.expect("script");
        }

        // EthereumStratum/1.0.0 for a NiceHash client: SID and extranonce both checked.
        let login = UpstreamLogin {
            echo: EchoCheck::EthereumStratum {
                sid: "050180".into(),
                extranonce: "0501".into(),
            },
            ..login
        };
        for (extranonce, expect) in [("0501", "ok"), ("050180", "sid_mismatch")] {
            let answer = format!(
                r#"{{"id":"subscribe","result":[["mining.notify","050180","EthereumStratum/1.0.0"],"{extranonce}"],"error":null}}"#
            );
            let (target, server) = scripted(move |mut peer| async move {
                peer.recv().await;
                peer.recv().await;
                peer.send(&[&answer, AUTH_OK]).await;
                peer.drain().await;
            })
            .await;
            let got = open_within(&target, &login, &limits()).await;
            assert_eq!(
                got.as_ref().map_or_else(UpstreamError::reason, |_| "ok"),
                expect,
                "{extranonce}: {got:?}"
            );
            drop(got);
            server.await.expect("script");
        }
    }

    #[test]
    fn suffixes_go_after_the_sub_account() {
        assert_eq!(suffixed_worker("alice.rig1.a", "btc"), "alice_btc.rig1.a");
        assert_eq!(suffixed_worker("alice", "bch"), "alice_bch");
        assert_eq!(AnswerId::parse("auth-2"), Some(AnswerId::Extra(2)));
        assert_eq!(AnswerId::parse("auth-1"), None);
        assert_eq!(AnswerId::parse("auth-+3"), None);
        assert_eq!(AnswerId::parse("Auth"), None);
    }
}
