//! A simulated switcher-aware sserver (SPEC §0, §2): one coin's pool Stratum server as the
//! proxy sees it, for the proxy's tests, benchmarks and quick start. A real TCP server (one
//! tokio task per connection, one JSON object per line, lines bounded in length) that
//!
//! - answers `mining.configure` with the version-rolling result, then sends
//!   `mining.set_version_mask` with its allowed mask;
//! - answers `mining.subscribe` with the session ID the proxy sent (bitcoin-like
//!   `[agent, SIDHEX, CLIENT_IP]`, ethereum `[agent, protocol, SID, CLIENT_IP]`), or with a wrong
//!   one when so configured;
//! - answers `mining.authorize` / `eth_submitLogin` with `true` for known sub-accounts and
//!   error 29 otherwise, several workers per connection; after the first successful one it
//!   sends `mining.set_difficulty` and the current job at once;
//! - sends every authorized connection a `mining.notify` per job (a new job every job
//!   interval), with a job ID naming the coin (`btc-42`);
//! - answers `mining.submit` under the miner's id, `true` for a worker authorized on that
//!   connection and `false` otherwise (error 24), or, when so configured
//!   ([`SserverConfig::reject_stale`]), error 21 for a job it did not announce lately;
//! - records what it saw ([`Records`]) so tests can wait for conditions, and can be stopped,
//!   restarted on the same port, or made to drop every connection.
//!
//! It depends on tokio and serde_json only, so that a small binary can run it as well.
//!
//! Ethereum is minimal: `true` for plain Stratum and ETHProxy subscribes, the
//! EthereumStratum/1.0.0 answer (with NiceHash's 4-digit extranonce) for that protocol, one
//! `mining.notify` form `[job_id, seedhash, headerhash, clean]` for the Stratum dialects, and
//! `eth_getWork`, `eth_submitWork`, `eth_submitHashrate` answered. A connection whose subscribe
//! protocol is ETHProxy (`ETHProxy/1.0.0`, what the proxy sends for ETHProxy miners) gets its
//! work the ETHProxy way instead: `{"id":0,"jsonrpc":"2.0","result":[header, seed, target]}`,
//! and no `mining.set_difficulty`. The header hash identifies the job: the job ID recorded for
//! an `eth_submitWork` is the job whose header it names (`eth-7`), or the header itself when it
//! names none of this server's recent jobs.

use std::{
    collections::HashSet,
    fmt::Write as _,
    io,
    net::{Ipv4Addr, SocketAddr},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU32, AtomicU64, Ordering},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use serde_json::{Value, json};
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::{TcpSocket, TcpStream, tcp::OwnedReadHalf},
    sync::watch,
    task::{JoinHandle, JoinSet},
    time::{Instant, MissedTickBehavior},
};

/// The default longest line, in bytes (without the `\n`): longer closes the connection.
pub const DEFAULT_MAX_LINE: usize = 16 * 1024;

/// The default allowed version-rolling mask.
pub const DEFAULT_VERSION_MASK: u32 = 0x1fff_e000;

/// Error 29 of btcpool's sservers, answered to an unknown sub-account.
pub const ERR_INVALID_USERNAME: (i64, &str) = (29, "Invalid username");

/// Error 24, answered to a submit of a worker not authorized on the connection.
pub const ERR_UNAUTHORIZED_WORKER: (i64, &str) = (24, "Unauthorized worker");

/// Error 25, answered to an authorize before subscribe on bitcoin-like chains.
pub const ERR_NOT_SUBSCRIBED: (i64, &str) = (25, "Not subscribed");

/// Error 21 of btcpool's sservers, answered to a share of a job it no longer has (stale).
pub const ERR_JOB_NOT_FOUND: (i64, &str) = (21, "Job not found (=stale)");

/// How many of its latest jobs a bitcoin-like sserver with [`SserverConfig::reject_stale`]
/// takes shares of.
pub const JOBS_REMEMBERED: u64 = 4;

/// Error 20, answered to a request the simulation does not know or cannot read.
pub const ERR_OTHER: (i64, &str) = (20, "Other/Unknown");

/// How many of its latest jobs an Ethereum sserver recognises by header hash in
/// `eth_submitWork`.
pub const ETH_JOBS_REMEMBERED: u64 = 1024;

/// The target of Ethereum work (`eth_getWork` and ETHProxy pushes).
fn eth_target() -> String {
    format!("0x{:064x}", u128::MAX >> 32)
}

/// The chain dialect of the sserver.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    /// Bitcoin-like: echoes SIDHEX, extranonce2 of 8 bytes.
    Bitcoin,
    /// Decred (normal miners): echoes `0000000000000000` + the SID as 8 hex little-endian.
    DecredNormal,
    /// Decred (gominer): echoes the SID as 8 hex little-endian.
    DecredGominer,
    /// Ethereum: subscribe `[agent, protocol, SID, CLIENT_IP]`.
    Ethereum,
}

/// What the sserver does; see the builder methods. Every field has a default from
/// [`SserverConfig::new`].
#[derive(Debug, Clone)]
pub struct SserverConfig {
    /// The coin, e.g. `btc`: part of every job ID.
    pub coin: String,
    /// The chain dialect.
    pub dialect: Dialect,
    /// Where to listen; `127.0.0.1:0` by default.
    pub listen: SocketAddr,
    /// The known sub-accounts; `None` accepts every worker.
    pub known_users: Option<HashSet<String>>,
    /// Sub-accounts known only with the suffix: `NAME` here makes `NAME_SUFFIX` known (and not
    /// `NAME`), SUFFIX being [`SserverConfig::user_suffix`]. Only used with `known_users`.
    pub suffixed_users: HashSet<String>,
    /// The suffix of [`SserverConfig::suffixed_users`]; `None` means the coin (the proxy's
    /// `UserSuffix` default).
    pub user_suffix: Option<String>,
    /// Answer subscribes with a session ID other than the one sent.
    pub wrong_sid: bool,
    /// The allowed version-rolling mask; `None` refuses version rolling.
    pub version_mask: Option<u32>,
    /// How often a new job is made; `None` makes one only on [`Sserver::new_job`].
    pub job_interval: Option<Duration>,
    /// The difficulty sent after authorize (`mining.set_difficulty`, before the first job):
    /// a whole number is sent as an integer, anything else as a float (real CPU miners need
    /// one well below 1 to find shares, e.g. the quick start's 0.01).
    pub difficulty: f64,
    /// The longest line accepted, in bytes.
    pub max_line: usize,
    /// Reject a bitcoin-like share whose job is not one of the last [`JOBS_REMEMBERED`] it
    /// announced, with error 21 (off by default: every job is taken).
    pub reject_stale: bool,
}

impl SserverConfig {
    /// A bitcoin-like sserver of `coin` on a free loopback port that accepts every worker,
    /// allows mask `1fffe000`, and makes a job every 5 s.
    pub fn new(coin: impl Into<String>) -> Self {
        Self {
            coin: coin.into(),
            dialect: Dialect::Bitcoin,
            listen: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
            known_users: None,
            suffixed_users: HashSet::new(),
            user_suffix: None,
            wrong_sid: false,
            version_mask: Some(DEFAULT_VERSION_MASK),
            job_interval: Some(Duration::from_secs(5)),
            difficulty: 1024.0,
            max_line: DEFAULT_MAX_LINE,
            reject_stale: false,
        }
    }

    /// Rejects shares of jobs it did not announce lately (error 21).
    pub fn reject_stale(mut self, reject: bool) -> Self {
        self.reject_stale = reject;
        self
    }

    /// Sets the dialect.
    pub fn dialect(mut self, dialect: Dialect) -> Self {
        self.dialect = dialect;
        self
    }

    /// Accepts only these sub-accounts (plus the suffixed users).
    pub fn known_users<S: Into<String>>(mut self, users: impl IntoIterator<Item = S>) -> Self {
        self.known_users
            .get_or_insert_with(HashSet::new)
            .extend(users.into_iter().map(Into::into));
        self
    }

    /// Makes these sub-accounts known only as `NAME_SUFFIX` (and turns the user check on).
    pub fn suffixed_users<S: Into<String>>(mut self, users: impl IntoIterator<Item = S>) -> Self {
        self.known_users.get_or_insert_with(HashSet::new);
        self.suffixed_users
            .extend(users.into_iter().map(Into::into));
        self
    }

    /// Sets the user suffix (the coin by default).
    pub fn user_suffix(mut self, suffix: impl Into<String>) -> Self {
        self.user_suffix = Some(suffix.into());
        self
    }

    /// Answers subscribes with a wrong session ID.
    pub fn wrong_sid(mut self, wrong: bool) -> Self {
        self.wrong_sid = wrong;
        self
    }

    /// Sets the allowed version-rolling mask (`None`: no version rolling).
    pub fn version_mask(mut self, mask: Option<u32>) -> Self {
        self.version_mask = mask;
        self
    }

    /// Sets the job interval (`None`: jobs only on [`Sserver::new_job`]).
    pub fn job_interval(mut self, interval: Option<Duration>) -> Self {
        self.job_interval = interval;
        self
    }

    /// Sets the difficulty sent after authorize.
    pub fn difficulty(mut self, difficulty: f64) -> Self {
        self.difficulty = difficulty;
        self
    }

    /// Sets the longest line accepted.
    pub fn max_line(mut self, max_line: usize) -> Self {
        self.max_line = max_line;
        self
    }

    /// Sets where to listen.
    pub fn listen(mut self, addr: SocketAddr) -> Self {
        self.listen = addr;
        self
    }

    /// The user suffix in effect.
    pub fn suffix(&self) -> &str {
        self.user_suffix.as_deref().unwrap_or(&self.coin)
    }

    /// Whether the sub-account `sub` may log in.
    pub fn knows(&self, sub: &str) -> bool {
        let Some(known) = &self.known_users else {
            return true;
        };
        if known.contains(sub) {
            return true;
        }
        sub.strip_suffix(self.suffix())
            .and_then(|base| base.strip_suffix('_'))
            .is_some_and(|base| self.suffixed_users.contains(base))
    }
}

/// A `mining.configure` seen.
#[derive(Debug, Clone, PartialEq)]
pub struct Configure {
    /// The connection's number (from 1, over the server's whole life).
    pub conn: u64,
    /// The mask asked for, if any.
    pub mask: Option<String>,
    /// The mask answered, if version rolling was granted.
    pub answered_mask: Option<String>,
}

/// A `mining.subscribe` seen.
#[derive(Debug, Clone, PartialEq)]
pub struct Subscribe {
    /// The connection's number.
    pub conn: u64,
    /// `params[0]`.
    pub agent: Option<String>,
    /// Ethereum's `params[1]`.
    pub protocol: Option<String>,
    /// The session ID text the proxy sent (SIDHEX, or Ethereum's SID), if any.
    pub sid: Option<String>,
    /// The client IP parameter, as an unsigned 32-bit integer (a number or a decimal string).
    pub client_ip: Option<u32>,
    /// The session ID the answer carried.
    pub answered_sid: String,
    /// All the params, as sent.
    pub params: Value,
}

/// A `mining.authorize` or `eth_submitLogin` seen.
#[derive(Debug, Clone, PartialEq)]
pub struct Authorize {
    /// The connection's number.
    pub conn: u64,
    /// The method.
    pub method: String,
    /// `params[0]`: `sub.miner` from the proxy.
    pub worker: String,
    /// Whether it was accepted.
    pub accepted: bool,
}

/// A share submitted.
#[derive(Debug, Clone, PartialEq)]
pub struct Submit {
    /// The connection's number.
    pub conn: u64,
    /// The coin of the sserver that received it.
    pub coin: String,
    /// The worker name of the submit.
    pub worker: String,
    /// The job ID of the submit (for `eth_submitWork`, the job whose header hash
    /// `params[1]` names, or that hash when it names none of this server's last
    /// [`ETH_JOBS_REMEMBERED`] jobs).
    pub job_id: String,
    /// Whether it was accepted (the worker is authorized on the connection).
    pub accepted: bool,
}

/// Everything the sserver saw, over its whole life (restarts included).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Records {
    /// Connections open now.
    pub connections_open: usize,
    /// Connections accepted in all.
    pub connections_total: u64,
    /// Connections closed for a line over the bound.
    pub lines_too_long: u64,
    /// Configures, in order.
    pub configures: Vec<Configure>,
    /// Subscribes, in order.
    pub subscribes: Vec<Subscribe>,
    /// Authorizes, in order.
    pub authorizes: Vec<Authorize>,
    /// Submits, in order.
    pub submits: Vec<Submit>,
}

impl Records {
    /// The workers accepted, in order.
    pub fn accepted_workers(&self) -> Vec<&str> {
        self.authorizes
            .iter()
            .filter(|a| a.accepted)
            .map(|a| a.worker.as_str())
            .collect()
    }

    /// A one-line summary, for failure messages.
    pub fn summary(&self) -> String {
        format!(
            "open {}, total {}, too long {}, configures {}, subscribes {:?}, authorizes {:?}, \
             submits {:?}",
            self.connections_open,
            self.connections_total,
            self.lines_too_long,
            self.configures.len(),
            self.subscribes
                .iter()
                .map(|s| (s.conn, &s.sid))
                .collect::<Vec<_>>(),
            self.authorizes
                .iter()
                .map(|a| (a.conn, &a.worker, a.accepted))
                .collect::<Vec<_>>(),
            self.submits
                .iter()
                .map(|s| (s.conn, &s.worker, &s.job_id, s.accepted))
                .collect::<Vec<_>>(),
        )
    }
}

/// The current job.
#[derive(Debug, Clone, Copy)]
struct Job {
    seq: u64,
    ntime: u32,
}

impl Job {
    fn new(seq: u64) -> Self {
        let ntime = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as u32);
        Self { seq, ntime }
    }
}

/// State shared by the handle, the server task and the connections.
#[derive(Debug)]
struct Shared {
    config: SserverConfig,
    records: Mutex<Records>,
    /// Bumped on every change of `records`.
    changed: watch::Sender<u64>,
    jobs: watch::Sender<Job>,
    /// Bumped to drop every connection.
    kick: watch::Sender<u64>,
    next_conn: AtomicU64,
    /// Session IDs for subscribes that carry none.
    next_own_sid: AtomicU32,
}

impl Shared {
    fn update(&self, f: impl FnOnce(&mut Records)) {
        {
            let mut records = self.records.lock().unwrap_or_else(|e| e.into_inner());
            f(&mut records);
        }
        self.changed.send_modify(|n| *n += 1);
    }

    fn snapshot(&self) -> Records {
        self.records
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn bump_job(&self) -> Job {
        let mut job = Job::new(0);
        self.jobs.send_modify(|j| {
            job = Job::new(j.seq + 1);
            *j = job;
        });
        job
    }

    fn job_id(&self, job: Job) -> String {
        format!("{}-{}", self.config.coin, job.seq)
    }

    /// The ID of the recent job whose Ethereum header hash is `header` (`0x` optional, any
    /// case), if any.
    fn job_of_header(&self, header: &str) -> Option<String> {
        let header = header
            .strip_prefix("0x")
            .or_else(|| header.strip_prefix("0X"))
            .unwrap_or(header)
            .to_ascii_lowercase();
        let latest = self.jobs.borrow().seq;
        (latest.saturating_sub(ETH_JOBS_REMEMBERED)..=latest)
            .rev()
            .find(|&seq| pseudo_hash(&self.config.coin, "header", seq) == header)
            .map(|seq| format!("{}-{seq}", self.config.coin))
    }
}

/// A running server: its task and how to stop it.
#[derive(Debug)]
struct Running {
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

/// The simulated sserver; see the module doc. Dropping it stops it.
#[derive(Debug)]
pub struct Sserver {
    shared: Arc<Shared>,
    addr: SocketAddr,
    running: Option<Running>,
}

impl Sserver {
    /// Starts the server.
    pub async fn start(config: SserverConfig) -> io::Result<Self> {
        let listen = config.listen;
        let shared = Arc::new(Shared {
            config,
            records: Mutex::new(Records::default()),
            changed: watch::channel(0).0,
            jobs: watch::channel(Job::new(1)).0,
            kick: watch::channel(0).0,
            next_conn: AtomicU64::new(1),
            next_own_sid: AtomicU32::new(1),
        });
        let mut server = Self {
            shared,
            addr: listen,
            running: None,
        };
        server.listen(listen)?;
        Ok(server)
    }

    fn listen(&mut self, addr: SocketAddr) -> io::Result<()> {
        let socket = if addr.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        // The restarted server takes its port back despite connections in TIME_WAIT.
        socket.set_reuseaddr(true)?;
        socket.bind(addr)?;
        let listener = socket.listen(1024)?;
        self.addr = listener.local_addr()?;
        let (stop, stop_rx) = watch::channel(false);
        let task = tokio::spawn(serve(listener, Arc::clone(&self.shared), stop_rx));
        self.running = Some(Running { stop, task });
        Ok(())
    }

    /// Where it listens (the same port after a restart).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The coin.
    pub fn coin(&self) -> &str {
        &self.shared.config.coin
    }

    /// The configuration.
    pub fn config(&self) -> &SserverConfig {
        &self.shared.config
    }

    /// Whether it listens.
    pub fn is_running(&self) -> bool {
        self.running.is_some()
    }

    /// What it saw so far.
    pub fn records(&self) -> Records {
        self.shared.snapshot()
    }

    /// Waits until `cond` holds for the records, or `timeout` passes; the error says what was
    /// awaited and what was last seen.
    pub async fn wait_for(
        &self,
        timeout: Duration,
        what: &str,
        mut cond: impl FnMut(&Records) -> bool,
    ) -> Result<Records, String> {
        let deadline = Instant::now() + timeout;
        let mut changed = self.shared.changed.subscribe();
        loop {
            let records = self.shared.snapshot();
            if cond(&records) {
                return Ok(records);
            }
            if tokio::time::timeout_at(deadline, changed.changed())
                .await
                .is_err()
            {
                return Err(format!(
                    "sserver {}: timed out after {timeout:?} waiting for {what}; seen: {}",
                    self.coin(),
                    self.shared.snapshot().summary()
                ));
            }
        }
    }

    /// The ID of the current job, e.g. `btc-3`.
    pub fn current_job_id(&self) -> String {
        self.shared.job_id(*self.shared.jobs.borrow())
    }

    /// Makes a new job now and sends it to every authorized connection; returns its ID.
    pub fn new_job(&self) -> String {
        let job = self.shared.bump_job();
        self.shared.job_id(job)
    }

    /// Closes every connection and keeps listening (an sserver dropping its sessions).
    pub fn disconnect_all(&self) {
        self.shared.kick.send_modify(|n| *n += 1);
    }

    /// Closes the listener and every connection ("sserver killed"); when it returns, the port
    /// refuses connections and every connection is closed. Records are kept.
    pub async fn stop(&mut self) {
        if let Some(running) = self.running.take() {
            let _ = running.stop.send(true);
            let _ = running.task.await;
        }
    }

    /// Stops the server if it runs, and starts it again on the same port.
    pub async fn restart(&mut self) -> io::Result<()> {
        self.stop().await;
        self.listen(self.addr)
    }
}

impl Drop for Sserver {
    fn drop(&mut self) {
        if let Some(running) = self.running.take() {
            let _ = running.stop.send(true);
            // Aborting drops the task's connection set, which aborts every connection.
            running.task.abort();
        }
    }
}

/// Accepts connections and makes jobs until told to stop, then closes everything.
async fn serve(
    listener: tokio::net::TcpListener,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
) {
    let mut conns = JoinSet::new();
    let mut ticker = shared.config.job_interval.map(|period| {
        let mut ticker = tokio::time::interval_at(Instant::now() + period, period);
        ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
        ticker
    });
    loop {
        tokio::select! {
            _ = stop.changed() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _peer)) => {
                    let conn = shared.next_conn.fetch_add(1, Ordering::Relaxed);
                    let guard = OpenGuard::new(Arc::clone(&shared));
                    conns.spawn(connection(stream, conn, guard));
                }
                // Out of descriptors or the like: try again a little later.
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            },
            () = async {
                match ticker.as_mut() {
                    Some(ticker) => { ticker.tick().await; }
                    None => std::future::pending().await,
                }
            } => {
                shared.bump_job();
            }
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
    drop(listener);
    conns.shutdown().await;
}

/// Counts an open connection from accept to close.
struct OpenGuard(Arc<Shared>);

impl OpenGuard {
    fn new(shared: Arc<Shared>) -> Self {
        shared.update(|r| {
            r.connections_open += 1;
            r.connections_total += 1;
        });
        Self(shared)
    }
}

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.update(|r| r.connections_open -= 1);
    }
}

/// Reads bounded lines; cancel-safe (a partial line stays in `partial`).
struct LineReader {
    inner: BufReader<OwnedReadHalf>,
    partial: Vec<u8>,
    max_line: usize,
}

enum Input {
    Line(Vec<u8>),
    Eof,
    TooLong,
}

impl LineReader {
    async fn next(&mut self) -> io::Result<Input> {
        loop {
            let available = self.inner.fill_buf().await?;
            if available.is_empty() {
                return Ok(Input::Eof);
            }
            let (take, done) = match available.iter().position(|&b| b == b'\n') {
                Some(i) => (i, true),
                None => (available.len(), false),
            };
            if self.partial.len() + take > self.max_line {
                return Ok(Input::TooLong);
            }
            self.partial.extend_from_slice(&available[..take]);
            self.inner.consume(take + usize::from(done));
            if done {
                let mut line = std::mem::take(&mut self.partial);
                if line.last() == Some(&b'\r') {
                    line.pop();
                }
                return Ok(Input::Line(line));
            }
        }
    }
}

/// What one connection knows.
struct Session {
    conn: u64,
    shared: Arc<Shared>,
    subscribed: bool,
    /// EthereumStratum/1.0.0 was subscribed.
    ethereum_stratum: bool,
    /// ETHProxy was subscribed: work is pushed as `id:0` results.
    eth_proxy: bool,
    authorized: Vec<String>,
}

async fn connection(stream: TcpStream, conn: u64, open: OpenGuard) {
    // `open` lives until the connection ends.
    let shared = Arc::clone(&open.0);
    let _ = stream.set_nodelay(true);
    let (read, mut write) = stream.into_split();
    let mut lines = LineReader {
        inner: BufReader::new(read),
        partial: Vec::new(),
        max_line: shared.config.max_line,
    };
    let mut jobs = shared.jobs.subscribe();
    let mut kick = shared.kick.subscribe();
    let mut session = Session {
        conn,
        shared: Arc::clone(&shared),
        subscribed: false,
        ethereum_stratum: false,
        eth_proxy: false,
        authorized: Vec::new(),
    };
    loop {
        let out = tokio::select! {
            input = lines.next() => match input {
                Ok(Input::Line(line)) => session.handle(&line, &mut jobs),
                Ok(Input::TooLong) => {
                    shared.update(|r| r.lines_too_long += 1);
                    return;
                }
                Ok(Input::Eof) | Err(_) => return,
            },
            changed = jobs.changed(), if !session.authorized.is_empty() => {
                if changed.is_err() {
                    return;
                }
                let job = *jobs.borrow_and_update();
                session.notify(job, job.seq.is_multiple_of(16))
            }
            _ = kick.changed() => return,
        };
        if !out.is_empty() && write.write_all(out.as_bytes()).await.is_err() {
            return;
        }
    }
}

impl Session {
    fn config(&self) -> &SserverConfig {
        &self.shared.config
    }

    fn ethereum(&self) -> bool {
        self.config().dialect == Dialect::Ethereum
    }

    /// Answers one line; returns what to send, whole lines.
    fn handle(&mut self, line: &[u8], jobs: &mut watch::Receiver<Job>) -> String {
        let Ok(Value::Object(request)) = serde_json::from_slice::<Value>(line) else {
            return String::new(); // not a JSON object: ignored
        };
        let id = request.get("id").cloned().unwrap_or(Value::Null);
        let v2 = request.get("jsonrpc").is_some();
        let params = request.get("params").cloned().unwrap_or(Value::Null);
        let param = |i: usize| params.get(i).and_then(Value::as_str).map(str::to_owned);
        let method = request.get("method").and_then(Value::as_str).unwrap_or("");
        let mut out = String::new();
        match method {
            "mining.configure" => self.configure(&id, &params, &mut out),
            "mining.subscribe" => self.subscribe(&id, v2, &params, &mut out),
            "mining.authorize" | "eth_submitLogin" => {
                let Some(worker) = param(0) else {
                    reply_error(&mut out, &id, v2, ERR_OTHER);
                    return out;
                };
                self.authorize(&id, v2, method, worker, jobs, &mut out);
            }
            "mining.submit" => match (param(0), param(1)) {
                (Some(worker), Some(job_id)) => self.submit(&id, v2, worker, job_id, &mut out),
                _ => reply_error(&mut out, &id, v2, ERR_OTHER),
            },
            "eth_submitWork" => {
                let worker = request
                    .get("worker")
                    .and_then(Value::as_str)
                    .map(str::to_owned)
                    .or_else(|| self.authorized.first().cloned())
                    .unwrap_or_default();
                let header = param(1).unwrap_or_default();
                let job_id = self.shared.job_of_header(&header).unwrap_or(header);
                self.submit(&id, v2, worker, job_id, &mut out);
            }
            "eth_getWork" => {
                let job = *jobs.borrow();
                let (seed, header) = self.eth_hashes(job);
                reply(&mut out, &id, v2, json!([header, seed, eth_target()]));
            }
            "eth_submitHashrate" | "mining.extranonce.subscribe" => {
                reply(&mut out, &id, v2, json!(true));
            }
            _ if id.is_null() => {} // an unknown notification: ignored
            _ => reply_error(&mut out, &id, v2, ERR_OTHER),
        }
        out
    }

    fn configure(&mut self, id: &Value, params: &Value, out: &mut String) {
        let wants_rolling = params
            .get(0)
            .and_then(Value::as_array)
            .is_some_and(|exts| exts.iter().any(|e| e == "version-rolling"));
        let mask = params
            .get(1)
            .and_then(|p| p.get("version-rolling.mask"))
            .and_then(Value::as_str)
            .map(str::to_owned);
        let mut answered_mask = None;
        let result = match (wants_rolling, self.config().version_mask) {
            (false, _) => json!({}),
            (true, None) => json!({"version-rolling": false}),
            (true, Some(allowed)) => {
                let asked = mask
                    .as_deref()
                    .and_then(|m| u32::from_str_radix(m, 16).ok())
                    .unwrap_or(u32::MAX);
                let granted = format!("{:08x}", allowed & asked);
                answered_mask = Some(granted.clone());
                json!({"version-rolling": true, "version-rolling.mask": granted})
            }
        };
        reply(out, id, false, result);
        if answered_mask.is_some()
            && let Some(allowed) = self.config().version_mask
        {
            push(
                out,
                &json!({"id": null, "method": "mining.set_version_mask",
                        "params": [format!("{allowed:08x}")]}),
            );
        }
        let conn = self.conn;
        self.shared.update(|r| {
            r.configures.push(Configure {
                conn,
                mask,
                answered_mask,
            });
        });
    }

    fn subscribe(&mut self, id: &Value, v2: bool, params: &Value, out: &mut String) {
        let text = |i: usize| params.get(i).and_then(Value::as_str).map(str::to_owned);
        let ip = |i: usize| {
            params.get(i).and_then(|v| match v {
                Value::Number(n) => n.as_u64().and_then(|n| u32::try_from(n).ok()),
                Value::String(s) => s.parse().ok(),
                _ => None,
            })
        };
        let dialect = self.config().dialect;
        let (agent, protocol, sid, client_ip) = if dialect == Dialect::Ethereum {
            (text(0), text(1), text(2), ip(3))
        } else {
            (text(0), None, text(1), ip(2))
        };
        let own = || self.shared.next_own_sid.fetch_add(1, Ordering::Relaxed);
        let result;
        let answered_sid;
        if dialect == Dialect::Ethereum {
            let mut sid_text = sid
                .clone()
                .unwrap_or_else(|| format!("{:06x}", own() & 0x00ff_ffff));
            if self.config().wrong_sid {
                sid_text = wrong(&sid_text);
            }
            let es1 = protocol
                .as_deref()
                .is_some_and(|p| p.to_ascii_lowercase().starts_with("ethereumstratum/"))
                || agent
                    .as_deref()
                    .is_some_and(|a| a.to_ascii_lowercase().starts_with("btccom-agent/"));
            if es1 {
                let nicehash = agent
                    .as_deref()
                    .is_some_and(|a| a.to_ascii_lowercase().starts_with("nicehash/"));
                let extranonce = if nicehash {
                    sid_text.chars().take(4).collect()
                } else {
                    sid_text.clone()
                };
                result = json!([
                    ["mining.notify", sid_text, "EthereumStratum/1.0.0"],
                    extranonce
                ]);
            } else {
                // Plain Ethereum Stratum and ETHProxy: `true`, or `false` for "wrong".
                result = json!(!self.config().wrong_sid);
            }
            self.ethereum_stratum = es1;
            self.eth_proxy = !es1
                && protocol
                    .as_deref()
                    .is_some_and(|p| p.to_ascii_lowercase().starts_with("ethproxy"));
            answered_sid = sid_text;
        } else {
            let value = sid
                .as_deref()
                .filter(|s| s.len() == 8)
                .and_then(|s| u32::from_str_radix(s, 16).ok())
                .unwrap_or_else(own);
            let (mut sid_text, extranonce2_size) = match dialect {
                Dialect::DecredNormal => (format!("0000000000000000{:08x}", value.swap_bytes()), 4),
                Dialect::DecredGominer => (format!("{:08x}", value.swap_bytes()), 12),
                _ => (format!("{value:08x}"), 8),
            };
            if self.config().wrong_sid {
                sid_text = wrong(&sid_text);
            }
            result = json!([
                [
                    ["mining.set_difficulty", sid_text],
                    ["mining.notify", sid_text]
                ],
                sid_text,
                extranonce2_size
            ]);
            answered_sid = sid_text;
        }
        self.subscribed = true;
        reply(out, id, v2, result);
        let record = Subscribe {
            conn: self.conn,
            agent,
            protocol,
            sid,
            client_ip,
            answered_sid,
            params: params.clone(),
        };
        self.shared.update(|r| r.subscribes.push(record));
    }

    fn authorize(
        &mut self,
        id: &Value,
        v2: bool,
        method: &str,
        worker: String,
        jobs: &mut watch::Receiver<Job>,
        out: &mut String,
    ) {
        if !self.subscribed && !self.ethereum() {
            reply_error(out, id, v2, ERR_NOT_SUBSCRIBED);
            return;
        }
        let sub = worker.split('.').next().unwrap_or("");
        let accepted = !sub.is_empty() && self.config().knows(sub);
        if accepted {
            reply(out, id, v2, json!(true));
            let first = self.authorized.is_empty();
            if !self.authorized.contains(&worker) {
                self.authorized.push(worker.clone());
            }
            if first {
                if !self.eth_proxy {
                    push(
                        out,
                        &json!({"id": null, "method": "mining.set_difficulty",
                                "params": [difficulty_value(self.config().difficulty)]}),
                    );
                }
                let job = *jobs.borrow_and_update();
                out.push_str(&self.notify(job, true));
            }
        } else {
            reply_error(out, id, v2, ERR_INVALID_USERNAME);
        }
        let record = Authorize {
            conn: self.conn,
            method: method.to_owned(),
            worker,
            accepted,
        };
        self.shared.update(|r| r.authorizes.push(record));
    }

    fn submit(&mut self, id: &Value, v2: bool, worker: String, job_id: String, out: &mut String) {
        let stale = self.config().reject_stale && !self.is_recent_job(&job_id);
        let accepted = !stale && self.is_authorized(&worker);
        if stale {
            let (code, message) = ERR_JOB_NOT_FOUND;
            push(
                out,
                &json!({"id": id, "result": false, "error": [code, message, null]}),
            );
        } else if accepted {
            reply(out, id, v2, json!(true));
        } else {
            let (code, message) = ERR_UNAUTHORIZED_WORKER;
            push(
                out,
                &json!({"id": id, "result": false, "error": [code, message, null]}),
            );
        }
        let record = Submit {
            conn: self.conn,
            coin: self.config().coin.clone(),
            worker,
            job_id,
            accepted,
        };
        self.shared.update(|r| r.submits.push(record));
    }

    /// Whether `job_id` is one of the last [`JOBS_REMEMBERED`] jobs announced.
    fn is_recent_job(&self, job_id: &str) -> bool {
        let latest = self.shared.jobs.borrow().seq;
        job_id
            .strip_prefix(self.config().coin.as_str())
            .and_then(|rest| rest.strip_prefix('-'))
            .and_then(|seq| seq.parse::<u64>().ok())
            .is_some_and(|seq| seq <= latest && latest - seq < JOBS_REMEMBERED)
    }

    /// Whether `worker` (as the miner names it in a submit) was authorized here: exactly, or
    /// with the sub-account in another case, or as `sub_SUFFIX.miner` (the proxy relays submits
    /// as the miner sent them, but authorized the normalized or suffixed name).
    fn is_authorized(&self, worker: &str) -> bool {
        let (sub, miner) = worker.split_once('.').unwrap_or((worker, ""));
        let suffixed = format!("{sub}_{}", self.config().suffix());
        self.authorized.iter().any(|a| {
            let (a_sub, a_miner) = a.split_once('.').unwrap_or((a, ""));
            a_miner == miner
                && (a_sub.eq_ignore_ascii_case(sub) || a_sub.eq_ignore_ascii_case(&suffixed))
        })
    }

    /// The `mining.notify` line of `job` (for an ETHProxy connection, its work line).
    fn notify(&self, job: Job, clean: bool) -> String {
        let job_id = self.shared.job_id(job);
        if self.eth_proxy {
            let (seed, header) = self.eth_hashes(job);
            let mut out = String::new();
            push(
                &mut out,
                &json!({"id": 0, "jsonrpc": "2.0", "result": [header, seed, eth_target()]}),
            );
            return out;
        }
        let params = if self.ethereum() {
            let (seed, header) = self.eth_hashes(job);
            if self.ethereum_stratum {
                json!([job_id, &seed[2..], &header[2..], clean])
            } else {
                json!([job_id, seed, header, clean])
            }
        } else {
            let coin = &self.config().coin;
            let height = 800_000 + job.seq / 16;
            let prevhash = pseudo_hash(coin, "prev", height);
            // A coinbase input script: BIP 34 height, the coin's tag, then the 4 + 8 bytes of
            // extranonce1 and extranonce2 that the miner puts between coinb1 and coinb2.
            let tag: String = coin.bytes().map(|b| format!("{b:02x}")).collect();
            let height_le: String = (height as u32).to_le_bytes()[..3]
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect();
            let script_len = 1 + 3 + 1 + coin.len() + 12;
            let coinb1 = format!(
                "01000000010000000000000000000000000000000000000000000000000000000000000000ffffffff\
                 {script_len:02x}03{height_le}{:02x}{tag}",
                coin.len()
            );
            let payout = &pseudo_hash(coin, "payout", 0)[..40];
            let coinb2 = format!("ffffffff0100f2052a010000001976a914{payout}88ac00000000");
            json!([
                job_id,
                prevhash,
                coinb1,
                coinb2,
                [],
                "20000000",
                "1705ae3a",
                format!("{:08x}", job.ntime),
                clean
            ])
        };
        let mut out = String::new();
        push(
            &mut out,
            &json!({"id": null, "method": "mining.notify", "params": params}),
        );
        out
    }

    /// Ethereum's seed hash and header hash of `job`, `0x`-prefixed.
    fn eth_hashes(&self, job: Job) -> (String, String) {
        let coin = &self.config().coin;
        (
            format!("0x{}", pseudo_hash(coin, "seed", job.seq / 30_000)),
            format!("0x{}", pseudo_hash(coin, "header", job.seq)),
        )
    }
}

/// `difficulty` as JSON: an integer when it is a whole number that fits, else a float.
fn difficulty_value(difficulty: f64) -> Value {
    if difficulty.fract() == 0.0 && (0.0..=u64::MAX as f64).contains(&difficulty) {
        json!(difficulty as u64)
    } else {
        json!(difficulty)
    }
}

/// Appends `message` as one line.
fn push(out: &mut String, message: &Value) {
    let _ = writeln!(out, "{message}");
}

/// Appends a success answer.
fn reply(out: &mut String, id: &Value, v2: bool, result: Value) {
    if v2 {
        push(out, &json!({"id": id, "jsonrpc": "2.0", "result": result}));
    } else {
        push(out, &json!({"id": id, "result": result, "error": null}));
    }
}

/// Appends an error answer, in the JSON-RPC 1.0 form `[code, message, null]` or the 2.0 form.
fn reply_error(out: &mut String, id: &Value, v2: bool, (code, message): (i64, &str)) {
    if v2 {
        push(
            out,
            &json!({"id": id, "jsonrpc": "2.0", "result": null,
                    "error": {"code": code, "message": message, "data": null}}),
        );
    } else {
        push(
            out,
            &json!({"id": id, "result": null, "error": [code, message, null]}),
        );
    }
}

/// A session ID text of the same length that differs from `sid` in its last digit.
fn wrong(sid: &str) -> String {
    let mut text = sid.to_owned();
    let last = text.pop();
    text.push(if last == Some('0') { '1' } else { '0' });
    text
}

/// 64 hex digits derived from `(coin, what, n)`: plausible hashes, the same every time.
fn pseudo_hash(coin: &str, what: &str, n: u64) -> String {
    let mut seed = 0xcbf2_9ce4_8422_2325_u64; // FNV-1a
    for b in coin.bytes().chain([0]).chain(what.bytes()) {
        seed = (seed ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
    }
    seed ^= n.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    let mut out = String::with_capacity(64);
    for _ in 0..4 {
        // splitmix64
        seed = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = seed;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        let _ = write!(out, "{:016x}", z ^ (z >> 31));
    }
    out
}
