//! One miner session, one task (SPEC §1, §2, §4): the handshake, the coin lookup (with
//! auto-registration), the first upstream, then the relay loop, which also carries out switches
//! and reconnects. The task owns the miner's socket, its upstream's socket, the upstream being
//! opened during a switch and the old one being drained after it, and the user's entry in the
//! cache's per-user index, all in one `select!` loop: no locks between halves, no races.
//!
//! Guarantees:
//! - the miner only ever receives whole lines, each written in one piece;
//! - the miner's partial line stays in its reader and goes to whichever upstream comes next;
//! - while a switch is being opened, the miner's lines still go to the old upstream, whose jobs
//!   they name; during a reconnect (no upstream) they are queued (a bounded number; then the
//!   miner is simply not read) and delivered to the new upstream;
//! - requests sent to the old upstream before the switch completes are still answered: it is
//!   drained (its answers relayed, its notifications dropped) until it has answered them all or
//!   [`DRAIN_TIMEOUT`] passed;
//! - the answers to the requests the proxy replays on a switch (subscribe, every authorized
//!   worker) never reach the miner; the new upstream's difficulty and jobs do;
//! - every write to either peer has a deadline, so a peer that stops reading is dropped instead
//!   of buffered without end.

use std::{
    collections::{HashMap, VecDeque},
    future::Future,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    pin::Pin,
    sync::{Arc, Mutex},
    time::Duration,
};

use bytes::Bytes;
use serde_json::{Value, json};
use tokio::{
    io::AsyncWriteExt,
    net::{
        TcpStream,
        tcp::{OwnedReadHalf, OwnedWriteHalf},
    },
    sync::Semaphore,
    time::{Instant, sleep, sleep_until, timeout, timeout_at},
};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::{
    cache::{UserCoinCache, UserWatch},
    config::ProxySettings,
    control::{self, ControlEndpoints},
    framing::{FrameError, LineReader},
    handshake::{
        Dialect, Handshake, Login, NameRules, Request, Step, StratumError, normalize_worker,
        result_line,
    },
    metrics::{Direction, Metrics, SessionState},
    session_id::{BadServerId, ChainType, SessionId, SessionIdAllocator},
    upstream::{
        self, EchoCheck, SubscribeParams, Upstream, UpstreamError, UpstreamLogin, UpstreamTarget,
    },
};

/// How long the old upstream may take to answer what it was sent before a switch.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// The most miner lines queued while a switch or reconnect is under way; beyond it the miner
/// is not read until the new upstream is up (TCP holds the rest).
const MAX_QUEUED_LINES: usize = 64;

/// The most authorized workers a session replays on a switch (mining proxies multiplex their
/// workers over one connection).
const MAX_WORKERS: usize = 256;

/// The most relayed authorize requests awaiting their answer.
const MAX_PENDING_AUTHS: usize = 64;

/// The id prefix of authorize requests the proxy relays with its own id, to learn whether they
/// succeeded (miner ids are not unique).
const AUTH_ID_PREFIX: &str = "sy-auth-";

/// The agent sent upstream when the miner gave none.
const DEFAULT_AGENT: &str = "stratumSwitcher";

/// Where session IDs come from: one allocator per server ID (a lease can change the server ID
/// while older sessions keep theirs).
#[derive(Debug)]
pub struct SessionIds {
    chain: ChainType,
    current: Mutex<Arc<Mutex<SessionIdAllocator>>>,
}

/// A session ID that goes back to its allocator when dropped.
#[derive(Debug)]
pub struct SessionIdGuard {
    sid: SessionId,
    allocator: Arc<Mutex<SessionIdAllocator>>,
}

impl SessionIdGuard {
    /// The session ID.
    pub fn sid(&self) -> SessionId {
        self.sid
    }
}

impl Drop for SessionIdGuard {
    fn drop(&mut self) {
        lock(&self.allocator).free(self.sid);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl SessionIds {
    /// IDs under `server_id` for `chain`.
    pub fn new(server_id: u8, chain: ChainType) -> Result<Self, BadServerId> {
        let allocator = SessionIdAllocator::new(u32::from(server_id), chain)?;
        Ok(Self {
            chain,
            current: Mutex::new(Arc::new(Mutex::new(allocator))),
        })
    }

    /// New sessions get IDs under `server_id` from now on.
    pub fn set_server_id(&self, server_id: u8) -> Result<(), BadServerId> {
        let mut current = lock(&self.current);
        if lock(&current).server_id() != server_id {
            let allocator = SessionIdAllocator::new(u32::from(server_id), self.chain)?;
            *current = Arc::new(Mutex::new(allocator));
        }
        Ok(())
    }

    /// The server ID of new sessions.
    pub fn server_id(&self) -> u8 {
        lock(&lock(&self.current)).server_id()
    }

    /// A free session ID, if any is left.
    pub fn allocate(&self) -> Option<SessionIdGuard> {
        let allocator = lock(&self.current).clone();
        let sid = lock(&allocator).allocate()?;
        Some(SessionIdGuard { sid, allocator })
    }
}

/// What every session of a proxy shares.
pub struct ProxyContext {
    /// The validated settings.
    pub settings: ProxySettings,
    /// The local user→coin cache.
    pub cache: Arc<UserCoinCache>,
    /// The control plane (auto-registration requests).
    pub control: ControlEndpoints,
    /// The metrics.
    pub metrics: Arc<Metrics>,
    /// Session IDs.
    pub session_ids: SessionIds,
    /// Permits of sessions waiting for an auto-registration (`AutoRegMaxWaitUsers`).
    pub registration_waiters: Arc<Semaphore>,
}

impl NameRules for ProxyContext {
    fn case_insensitive(&self) -> bool {
        self.settings.case_insensitive
    }

    fn canonical_name(&self, lowercase: &str) -> Option<String> {
        if !self.settings.case_index {
            return None;
        }
        self.cache.canonical_name(lowercase).map(|n| n.to_string())
    }
}

/// Why a session ended (for the log, through `Debug`).
#[derive(Debug)]
#[allow(dead_code)]
enum End {
    MinerClosed,
    MinerTimeout(&'static str),
    MinerError(FrameError),
    MinerWriteFailed,
    FirstByteNotJson,
    Refused(StratumError),
    TooManyWaiting,
    Upstream(UpstreamError),
    UpstreamLost,
    BtcAgentSwitched,
    Shutdown,
}

/// Runs one miner session to its end.
pub async fn run(
    ctx: Arc<ProxyContext>,
    socket: TcpStream,
    peer: SocketAddr,
    shutdown: CancellationToken,
) {
    let Some(sid) = ctx.session_ids.allocate() else {
        warn!(%peer, "no free session ID: connection refused");
        ctx.metrics.refused();
        return;
    };
    let span = info_span!("session", sid = %sid.sid(), %peer, worker = tracing::field::Empty);
    async move {
        let _ = socket.set_nodelay(true);
        let peer_ip = match peer.ip() {
            IpAddr::V4(ip) => ip,
            IpAddr::V6(ip) => ip.to_ipv4_mapped().unwrap_or(Ipv4Addr::UNSPECIFIED),
        };
        let mut session = Session::new(ctx, sid, peer_ip);
        let end = tokio::select! {
            end = session.run(socket) => end,
            () = shutdown.cancelled() => End::Shutdown,
        };
        match &end {
            End::MinerClosed | End::Shutdown => debug!(?end, "session ended"),
            _ => info!(?end, "session ended"),
        }
    }
    .instrument(span)
    .await
}

struct Session {
    ctx: Arc<ProxyContext>,
    sid: SessionIdGuard,
    peer_ip: Ipv4Addr,
    state: Option<(String, SessionState)>,
}

impl Drop for Session {
    fn drop(&mut self) {
        self.ctx
            .metrics
            .session_moved(self.state.as_ref().map(|(c, s)| (c.as_str(), *s)), None);
    }
}

/// The miner's half of the session.
struct Miner {
    reader: LineReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
    write_timeout: Duration,
}

impl Miner {
    async fn write(&mut self, line: &[u8]) -> Result<(), End> {
        match timeout(self.write_timeout, self.writer.write_all(line)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) | Err(_) => Err(End::MinerWriteFailed),
        }
    }

    /// Writes a line the proxy made (without its `\n`).
    async fn write_text(&mut self, text: &str) -> Result<(), End> {
        let mut line = Vec::with_capacity(text.len() + 1);
        line.extend_from_slice(text.as_bytes());
        line.push(b'\n');
        self.write(&line).await
    }
}

/// An upstream being opened (a switch or a reconnect).
type Opening = Pin<Box<dyn Future<Output = (Arc<str>, Result<Upstream, UpstreamError>)> + Send>>;

/// An old upstream answering what it was sent before a switch.
struct Draining {
    upstream: Upstream,
    outstanding: u64,
    deadline: Instant,
}

/// Does an upstream line carry a method (a notification or request) rather than an answer?
/// Cheap: no JSON parsing on the relay path.
fn has_method(line: &[u8]) -> bool {
    memchr_find(line, b"\"method\"")
}

fn memchr_find(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

impl Session {
    fn new(ctx: Arc<ProxyContext>, sid: SessionIdGuard, peer_ip: Ipv4Addr) -> Self {
        ctx.metrics
            .session_moved(None, Some(("", SessionState::Handshake)));
        Self {
            ctx,
            sid,
            peer_ip,
            state: Some((String::new(), SessionState::Handshake)),
        }
    }

    fn set_state(&mut self, coin: &str, state: SessionState) {
        let from = self.state.take();
        self.ctx.metrics.session_moved(
            from.as_ref().map(|(c, s)| (c.as_str(), *s)),
            Some((coin, state)),
        );
        self.state = Some((coin.to_string(), state));
    }

    async fn run(&mut self, socket: TcpStream) -> End {
        let ctx = self.ctx.clone();
        let settings = &ctx.settings;
        let mut first = [0u8; 1];
        match timeout(settings.first_byte_timeout, socket.peek(&mut first)).await {
            Err(_) => return self.failed_handshake(End::MinerTimeout("first byte"), "timeout"),
            Ok(Ok(0)) | Ok(Err(_)) => {
                return self.failed_handshake(End::MinerClosed, "closed");
            }
            Ok(Ok(_)) if first[0] != b'{' => {
                return self.failed_handshake(End::FirstByteNotJson, "not_json");
            }
            Ok(Ok(_)) => {}
        }
        let deadline = Instant::now() + settings.handshake_timeout;
        let (reader, writer) = socket.into_split();
        let mut miner = Miner {
            reader: LineReader::new(reader, settings.max_line),
            writer,
            write_timeout: settings.write_timeout,
        };
        let mut hs = Handshake::new(
            settings.chain,
            self.sid.sid(),
            self.ctx.session_ids.server_id(),
        );
        let login = match Box::pin(self.handshake(&mut miner, &mut hs, deadline)).await {
            Ok(login) => login,
            Err(end) => return self.failed_handshake(end, "miner"),
        };
        tracing::Span::current().record("worker", login.worker().as_str());
        let (coin, watch) =
            match Box::pin(self.resolve_coin(&mut miner, &hs, &login, deadline)).await {
                Ok(found) => found,
                Err(end) => return end,
            };
        let Some(target) = settings.upstreams.get(&*coin).cloned() else {
            return self
                .refuse(
                    &mut miner,
                    &hs,
                    &login.id,
                    StratumError::StratumServerNotFound,
                )
                .await;
        };
        self.set_state(&coin, SessionState::Connecting);
        let up_login = upstream_login(&hs, &login, self.peer_ip, Vec::new());
        let upstream = match Box::pin(upstream::open(
            &target,
            &up_login,
            &settings.upstream_limits,
        ))
        .await
        {
            Ok(upstream) => upstream,
            Err(UpstreamError::AuthRejected { result, error }) => {
                self.ctx.metrics.handshake("failed", "auth_rejected");
                let line = result_line(&login.id, result, error, hs.json_rpc2());
                let _ = miner.write_text(&line).await;
                return End::Upstream(UpstreamError::AuthRejected {
                    result: Value::Null,
                    error: Value::Null,
                });
            }
            Err(e @ (UpstreamError::Connect(_) | UpstreamError::Timeout)) => {
                warn!(coin = %coin, error = %e, "cannot reach the sserver");
                let end = self
                    .refuse(
                        &mut miner,
                        &hs,
                        &login.id,
                        StratumError::ConnectStratumServerFailed,
                    )
                    .await;
                drop(end);
                return End::Upstream(e);
            }
            Err(e) => {
                warn!(coin = %coin, error = %e, "upstream handshake failed");
                self.ctx.metrics.handshake("failed", e.reason());
                return End::Upstream(e);
            }
        };
        // The auth answer under the miner's id, the version mask, then what the sserver sent
        // meanwhile, in order.
        let first_line = result_line(
            &login.id,
            upstream.auth_result.clone(),
            upstream.auth_error.clone(),
            hs.json_rpc2(),
        );
        if let Err(end) = announce(&mut miner, &hs, &upstream, Some(&first_line)).await {
            return end;
        }
        self.ctx.metrics.handshake("ok", "ok");
        self.set_state(&coin, SessionState::Relaying);
        info!(coin = %coin, "relaying");
        let relay = Relay {
            hs,
            login,
            coin,
            watch,
            upstream: Some(upstream),
            workers: Vec::new(),
            pending_auths: HashMap::new(),
            next_auth_id: 0,
            outstanding: 0,
            queued: VecDeque::new(),
            opening: None,
            opening_target: None,
            opening_is_reconnect: false,
            draining: None,
        };
        self.relay(miner, relay).await
    }

    fn failed_handshake(&self, end: End, reason: &'static str) -> End {
        self.ctx.metrics.handshake("failed", reason);
        end
    }

    async fn refuse(
        &mut self,
        miner: &mut Miner,
        hs: &Handshake,
        id: &Value,
        error: StratumError,
    ) -> End {
        self.ctx.metrics.handshake("failed", error.reason());
        let _ = miner.write_text(&hs.error_line(id, error)).await;
        End::Refused(error)
    }

    async fn handshake(
        &mut self,
        miner: &mut Miner,
        hs: &mut Handshake,
        deadline: Instant,
    ) -> Result<Login, End> {
        loop {
            let line = match timeout_at(deadline, miner.reader.read_line()).await {
                Err(_) => return Err(End::MinerTimeout("handshake")),
                Ok(Err(e)) => return Err(End::MinerError(e)),
                Ok(Ok(None)) => return Err(End::MinerClosed),
                Ok(Ok(Some(line))) => line,
            };
            match hs.on_line(&line, &*self.ctx) {
                Step::Ignore => {}
                Step::Reply(reply) => miner.write_text(&reply).await?,
                Step::Refuse(reply, error) => {
                    debug!(code = error.code(), "handshake request refused");
                    miner.write_text(&reply).await?;
                }
                Step::Login(login) => return Ok(login),
            }
        }
    }

    /// The user's coin, from the cache; for an unknown user, through an auto-registration.
    async fn resolve_coin(
        &mut self,
        miner: &mut Miner,
        hs: &Handshake,
        login: &Login,
        deadline: Instant,
    ) -> Result<(Arc<str>, UserWatch), End> {
        let cache = self.ctx.cache.clone();
        if !cache.is_synced() {
            // Just started and the control plane not reached yet: wait for the first sync
            // rather than call every user unknown.
            let _ = timeout_at(deadline, cache.wait_synced()).await;
        }
        let mut watch = cache.watch_user(&login.sub_account);
        if let Some(coin) = watch.current() {
            return Ok((coin, watch));
        }
        if !self.ctx.settings.auto_reg {
            return Err(self
                .refuse(miner, hs, &login.id, StratumError::InvalidSubAccount)
                .await);
        }
        let Ok(_permit) = self.ctx.registration_waiters.clone().try_acquire_owned() else {
            warn!("too many sessions waiting for an auto-registration: closed");
            self.ctx.metrics.handshake("failed", "too_many_waiting");
            return Err(End::TooManyWaiting);
        };
        self.set_state("", SessionState::Registering);
        match control::request_registration(
            &self.ctx.control,
            &login.sub_account,
            &login.worker(),
            self.sid.sid().0,
        )
        .await
        {
            Ok(created) => info!(created, "auto-registration requested"),
            Err(e) => {
                warn!(error = %e, "auto-registration request failed");
                return Err(self
                    .refuse(miner, hs, &login.id, StratumError::InvalidSubAccount)
                    .await);
            }
        }
        loop {
            if let Some(coin) = watch.current() {
                return Ok((coin, watch));
            }
            match timeout_at(deadline, watch.changed()).await {
                Ok(Some(coin)) => return Ok((coin, watch)),
                Ok(None) => {}
                Err(_) => {
                    warn!("the auto-registration did not land in time");
                    return Err(self
                        .refuse(miner, hs, &login.id, StratumError::InvalidSubAccount)
                        .await);
                }
            }
        }
    }

    async fn relay(&mut self, mut miner: Miner, mut r: Relay) -> End {
        loop {
            let reading_miner = r.queued.len() < MAX_QUEUED_LINES;
            let drain_deadline = r.draining.as_ref().map(|d| d.deadline);
            tokio::select! {
                line = miner.reader.read_raw_line(), if reading_miner => {
                    match line {
                        Ok(Some(line)) => {
                            if let Err(end) = self.on_miner_line(&mut miner, &mut r, line).await {
                                return end;
                            }
                        }
                        Ok(None) => return End::MinerClosed,
                        Err(e) => return End::MinerError(e),
                    }
                }
                line = read_upstream(&mut r.upstream) => {
                    match line {
                        Some(line) => {
                            if let Err(end) = self.on_upstream_line(&mut miner, &mut r, line, false).await {
                                return end;
                            }
                        }
                        None => {
                            r.upstream = None;
                            if r.opening.is_none() {
                                warn!(coin = %r.coin, "sserver connection lost: reconnecting");
                                let coin = r.watch.current().unwrap_or_else(|| r.coin.clone());
                                if let Err(end) = self.start_opening(&mut r, coin, true) {
                                    return end;
                                }
                            }
                        }
                    }
                }
                line = read_draining(&mut r.draining) => {
                    match line {
                        Some(line) => {
                            if has_method(&line) {
                                continue; // the old coin's jobs and difficulty: not any more
                            }
                            if let Some(d) = r.draining.as_mut() {
                                d.outstanding = d.outstanding.saturating_sub(1);
                                if d.outstanding == 0 {
                                    r.draining = None;
                                }
                            }
                            if let Err(end) = self.on_upstream_line(&mut miner, &mut r, line, true).await {
                                return end;
                            }
                        }
                        None => r.draining = None,
                    }
                }
                () = sleep_until(drain_deadline.unwrap_or_else(Instant::now)), if drain_deadline.is_some() => {
                    if let Some(d) = r.draining.take() {
                        debug!(outstanding = d.outstanding, "old sserver did not answer everything in time");
                    }
                }
                coin = r.watch.changed() => {
                    let Some(coin) = coin else { continue };
                    if let Err(end) = self.on_coin_changed(&mut r, coin) {
                        return end;
                    }
                }
                (coin, result) = poll_opening(&mut r.opening) => {
                    if let Err(end) = Box::pin(self.opened(&mut miner, &mut r, coin, result)).await {
                        return end;
                    }
                }
            }
        }
    }

    /// The user's coin changed in the cache.
    fn on_coin_changed(&mut self, r: &mut Relay, coin: Arc<str>) -> Result<(), End> {
        let target_now = if r.opening.is_some() {
            r.opening_target.clone()
        } else {
            Some(r.coin.clone())
        };
        if target_now.as_deref() == Some(&*coin) {
            return Ok(());
        }
        if !self.ctx.settings.upstreams.contains_key(&*coin) {
            warn!(coin = %coin, "the user's new coin has no sserver here: ignored");
            self.ctx.metrics.switch(&coin, "no_sserver");
            return Ok(());
        }
        if r.hs.is_btc_agent() {
            self.ctx.metrics.switch(&coin, "closed_btcagent");
            return Err(End::BtcAgentSwitched);
        }
        info!(from = %r.coin, to = %coin, "switching");
        self.start_opening(r, coin, false)
    }

    fn start_opening(&mut self, r: &mut Relay, coin: Arc<str>, reconnect: bool) -> Result<(), End> {
        let Some(target) = self.ctx.settings.upstreams.get(&*coin).cloned() else {
            return Err(End::UpstreamLost);
        };
        self.set_state(&coin, SessionState::Switching);
        let login = upstream_login(&r.hs, &r.login, self.peer_ip, r.workers.clone());
        let limits = self.ctx.settings.upstream_limits.clone();
        let tries = self.ctx.settings.reconnect_tries.max(1);
        r.opening_is_reconnect = reconnect && r.opening.is_none();
        r.opening_target = Some(coin.clone());
        r.opening = Some(Box::pin(open_with_retries(
            coin, target, login, limits, tries,
        )));
        Ok(())
    }

    /// An upstream finished opening (or failed to).
    async fn opened(
        &mut self,
        miner: &mut Miner,
        r: &mut Relay,
        coin: Arc<str>,
        result: Result<Upstream, UpstreamError>,
    ) -> Result<(), End> {
        r.opening = None;
        r.opening_target = None;
        let reconnect = std::mem::take(&mut r.opening_is_reconnect);
        let mut upstream = match result {
            Ok(upstream) => upstream,
            Err(e) => {
                warn!(coin = %coin, error = %e, "cannot open the new sserver connection");
                if reconnect || r.upstream.is_none() {
                    self.ctx.metrics.reconnect("failed");
                    return Err(End::Upstream(e));
                }
                // The old upstream still works: a failed switch closes the miner, which
                // reconnects and lands on the user's coin.
                self.ctx.metrics.switch(&coin, "failed");
                return Err(End::Upstream(e));
            }
        };
        if let Some(old) = r.upstream.take()
            && r.outstanding > 0
        {
            r.draining = Some(Draining {
                upstream: old,
                outstanding: r.outstanding,
                deadline: Instant::now() + DRAIN_TIMEOUT,
            });
        }
        r.outstanding = 0;
        if reconnect {
            self.ctx.metrics.reconnect("ok");
        } else {
            self.ctx.metrics.switch(&coin, "ok");
        }
        r.coin = coin.clone();
        announce(miner, &r.hs, &upstream, None).await?;
        upstream.held.clear();
        while let Some(line) = r.queued.pop_front() {
            self.send_upstream(&mut upstream, &mut r.outstanding, &line)
                .await
                .map_err(|_| End::UpstreamLost)?;
        }
        r.upstream = Some(upstream);
        self.set_state(&coin, SessionState::Relaying);
        info!(coin = %coin, "relaying");
        // The coin may have moved on while this one was opening.
        if let Some(latest) = r.watch.current()
            && latest != coin
        {
            self.on_coin_changed(r, latest)?;
        }
        Ok(())
    }

    async fn send_upstream(
        &self,
        upstream: &mut Upstream,
        outstanding: &mut u64,
        line: &[u8],
    ) -> Result<(), ()> {
        match timeout(
            self.ctx.settings.write_timeout,
            upstream.writer.write_all(line),
        )
        .await
        {
            Ok(Ok(())) => {
                *outstanding += 1;
                self.ctx.metrics.relayed(Direction::Upstream, line.len());
                Ok(())
            }
            _ => Err(()),
        }
    }

    /// A line from the miner while relaying.
    async fn on_miner_line(
        &mut self,
        miner: &mut Miner,
        r: &mut Relay,
        line: Bytes,
    ) -> Result<(), End> {
        let line =
            if memchr_find(&line, b"mining.authorize") || memchr_find(&line, b"eth_submitLogin") {
                match self.rewrite_authorize(miner, r, &line).await? {
                    Some(rewritten) => rewritten,
                    None => return Ok(()),
                }
            } else {
                line
            };
        // While a switch is being opened the old upstream still serves: the miner's lines go
        // to it, since they name its jobs (queued for the new one they would reach the wrong
        // coin). Only without an upstream (a reconnect) are they queued.
        let sent = match r.upstream.as_mut() {
            Some(upstream) => self
                .send_upstream(upstream, &mut r.outstanding, &line)
                .await
                .is_ok(),
            None => false,
        };
        if !sent {
            if r.upstream.take().is_some() && r.opening.is_none() {
                // The write failed: treat it as a lost upstream.
                let coin = r.watch.current().unwrap_or_else(|| r.coin.clone());
                self.start_opening(r, coin, true)?;
            }
            r.queued.push_back(line);
        }
        Ok(())
    }

    /// A later authorize (another worker on this connection): sent with the proxy's own id so
    /// that its answer tells whether to replay it on a switch. `None` when answered here.
    async fn rewrite_authorize(
        &mut self,
        miner: &mut Miner,
        r: &mut Relay,
        line: &[u8],
    ) -> Result<Option<Bytes>, End> {
        let Some(request) = Request::parse(line) else {
            return Ok(Some(Bytes::copy_from_slice(line)));
        };
        if request.method != "mining.authorize" && request.method != "eth_submitLogin" {
            return Ok(Some(Bytes::copy_from_slice(line)));
        }
        let name = match request.params.first().map(Value::as_str) {
            None => Err(StratumError::TooFewParams),
            Some(None) => Err(StratumError::WorkerNameMustBeString),
            Some(Some(raw)) => {
                normalize_worker(raw, request.worker.as_deref(), r.hs.chain(), &*self.ctx)
            }
        };
        let (sub, miner_name) = match name {
            Ok(parts) => parts,
            Err(error) => {
                miner
                    .write_text(&r.hs.error_line(&request.id, error))
                    .await?;
                return Ok(None);
            }
        };
        let mut params = request.params;
        params[0] = Value::String(format!("{sub}{miner_name}"));
        if r.pending_auths.len() >= MAX_PENDING_AUTHS {
            let mut object = json!({"id": request.id, "method": request.method, "params": params});
            if r.hs.json_rpc2() {
                object["jsonrpc"] = json!("2.0");
            }
            return Ok(Some(Bytes::from(format!("{object}\n"))));
        }
        r.next_auth_id += 1;
        let id = format!("{AUTH_ID_PREFIX}{}", r.next_auth_id);
        let mut object = json!({"id": id, "method": request.method, "params": params});
        if r.hs.json_rpc2() {
            object["jsonrpc"] = json!("2.0");
        }
        r.pending_auths
            .insert(id, (request.id, request.method, params));
        Ok(Some(Bytes::from(format!("{object}\n"))))
    }

    /// A line from the upstream (or the draining old one) while relaying.
    async fn on_upstream_line(
        &mut self,
        miner: &mut Miner,
        r: &mut Relay,
        line: Bytes,
        draining: bool,
    ) -> Result<(), End> {
        if !draining && !has_method(&line) {
            r.outstanding = r.outstanding.saturating_sub(1);
        }
        if memchr_find(&line, AUTH_ID_PREFIX.as_bytes())
            && let Ok(Value::Object(mut answer)) = serde_json::from_slice::<Value>(&line)
            && let Some(Value::String(id)) = answer.get("id")
            && let Some((miner_id, method, params)) = r.pending_auths.remove(id.as_str())
        {
            let result = answer.remove("result").unwrap_or(Value::Null);
            let error = answer.remove("error").unwrap_or(Value::Null);
            if result == Value::Bool(true) && r.workers.len() < MAX_WORKERS {
                let name = params.first().cloned();
                if !r.workers.iter().any(|(_, p)| p.first() == name.as_ref())
                    && params.first() != r.login.params.first()
                {
                    r.workers.push((method, params));
                }
            }
            let reply = result_line(&miner_id, result, error, r.hs.json_rpc2());
            self.ctx
                .metrics
                .relayed(Direction::Downstream, reply.len() + 1);
            return miner.write_text(&reply).await;
        }
        self.ctx.metrics.relayed(Direction::Downstream, line.len());
        miner.write(&line).await
    }
}

/// The next line of the current upstream; `None` when it is gone (closed, failed, a line too
/// long). Pending forever when there is no upstream.
async fn read_upstream(upstream: &mut Option<Upstream>) -> Option<Bytes> {
    match upstream {
        Some(upstream) => match upstream.reader.read_raw_line().await {
            Ok(Some(line)) => Some(line),
            Ok(None) => None,
            Err(e) => {
                debug!(error = %e, "sserver read failed");
                None
            }
        },
        None => std::future::pending().await,
    }
}

async fn read_draining(draining: &mut Option<Draining>) -> Option<Bytes> {
    match draining {
        Some(d) => d.upstream.reader.read_raw_line().await.ok().flatten(),
        None => std::future::pending().await,
    }
}

async fn poll_opening(
    opening: &mut Option<Opening>,
) -> (Arc<str>, Result<Upstream, UpstreamError>) {
    match opening {
        Some(future) => future.await,
        None => std::future::pending().await,
    }
}

/// After an upstream's auth: the version mask (when the miner asked for version rolling),
/// then the lines the sserver sent during the handshake, in order.
/// `first` (the auth answer of a first login) comes before them; all of it in one write.
async fn announce(
    miner: &mut Miner,
    hs: &Handshake,
    upstream: &Upstream,
    first: Option<&str>,
) -> Result<(), End> {
    let mut out =
        Vec::with_capacity(256 + upstream.held.iter().map(|l| l.len() + 1).sum::<usize>());
    if let Some(first) = first {
        out.extend_from_slice(first.as_bytes());
        out.push(b'\n');
    }
    if let Some(mask) = hs.version_mask() {
        let allowed = upstream.allowed_mask.map_or(mask, |allowed| allowed & mask);
        let line = json!({"id": null, "method": "mining.set_version_mask", "params": [format!("{allowed:08x}")]});
        out.extend_from_slice(line.to_string().as_bytes());
        out.push(b'\n');
    }
    for line in &upstream.held {
        out.extend_from_slice(line);
        out.push(b'\n');
    }
    if out.is_empty() {
        return Ok(());
    }
    miner.write(&out).await
}

/// Opens an upstream, trying again about a second apart (SPEC §4) unless the sserver refused
/// the session outright.
async fn open_with_retries(
    coin: Arc<str>,
    target: UpstreamTarget,
    login: UpstreamLogin,
    limits: upstream::UpstreamLimits,
    tries: u32,
) -> (Arc<str>, Result<Upstream, UpstreamError>) {
    let mut attempt = 0;
    loop {
        attempt += 1;
        match upstream::open(&target, &login, &limits).await {
            Ok(upstream) => return (coin, Ok(upstream)),
            Err(e @ (UpstreamError::SidMismatch { .. } | UpstreamError::AuthRejected { .. })) => {
                return (coin, Err(e));
            }
            Err(e) if attempt >= tries => return (coin, Err(e)),
            Err(e) => {
                debug!(coin = %coin, attempt, error = %e, "sserver not ready, trying again");
                sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

/// What the session sends an sserver to log in (SPEC §2), from its handshake.
fn upstream_login(
    hs: &Handshake,
    login: &Login,
    peer_ip: Ipv4Addr,
    extra_auths: Vec<(String, Vec<Value>)>,
) -> UpstreamLogin {
    let agent = hs.agent().unwrap_or(DEFAULT_AGENT).to_string();
    let (subscribe, echo) = match hs.dialect() {
        Dialect::Bitcoin => (
            SubscribeParams::Bitcoin { agent },
            EchoCheck::SidText(hs.sid_text()),
        ),
        Dialect::EthProxy => (
            SubscribeParams::Ethereum {
                agent: "ETHProxy".into(),
                protocol: "ETHProxy/1.0.0".into(),
            },
            EchoCheck::True,
        ),
        Dialect::EthStratum => (
            SubscribeParams::Ethereum {
                agent,
                protocol: hs.protocol().unwrap_or("Stratum").to_string(),
            },
            EchoCheck::True,
        ),
        Dialect::EthereumStratum1 => (
            SubscribeParams::Ethereum {
                agent,
                protocol: hs.protocol().unwrap_or("Stratum").to_string(),
            },
            EchoCheck::EthereumStratum {
                sid: hs.sid_text(),
                extranonce: hs.extranonce(),
            },
        ),
    };
    UpstreamLogin {
        sid: hs.sid(),
        client_ip: peer_ip,
        subscribe,
        echo,
        version_mask: hs.version_mask(),
        auth_method: login.method.clone(),
        auth_params: login.params.clone(),
        sub_account: login.sub_account.clone(),
        miner_name: login.miner_name.clone(),
        extra_auths,
    }
}

/// The relay state of a logged-in session.
struct Relay {
    hs: Handshake,
    login: Login,
    /// The coin of the current upstream.
    coin: Arc<str>,
    watch: UserWatch,
    upstream: Option<Upstream>,
    /// Further workers authorized successfully, replayed on a switch.
    workers: Vec<(String, Vec<Value>)>,
    /// Relayed authorizes awaiting their answer: proxy id → (miner id, method, params).
    pending_auths: HashMap<String, (Value, String, Vec<Value>)>,
    next_auth_id: u64,
    /// Lines sent to the current upstream not answered yet (approximate: for the drain).
    outstanding: u64,
    /// Miner lines waiting for the upstream being opened.
    queued: VecDeque<Bytes>,
    opening: Option<Opening>,
    opening_target: Option<Arc<str>>,
    opening_is_reconnect: bool,
    draining: Option<Draining>,
}
