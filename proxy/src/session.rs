//! One miner session, one task (SPEC §1, §2, §4): the handshake, the coin lookup (with
//! auto-registration), the first upstream, then the relay loop. The task owns every socket of
//! the session (the miner's, the serving upstream's, the drained ones' and the one being
//! opened) and the user's entry in the cache's per-user index, all polled by one loop
//! (`RelayParts::poll_event`, by hand rather than a `select!`, so that no future is made per
//! line): no locks between halves, no races. What the relay does with each event is decided by the
//! [`Relay`] state machine ([`crate::relay`]), which is plain data; this module carries out its
//! actions.
//!
//! Guarantees:
//! - the miner only ever receives whole lines, each written in one piece;
//! - the miner's partial line stays in its reader and goes to whichever upstream comes next;
//! - every write to either peer has a deadline, so a peer that stops reading is dropped instead
//!   of buffered without end;
//! - drained upstreams hold permits of the process's [`DrainBudget`]: when the budget is spent,
//!   or the listener runs short of descriptors, drains are closed first, never a miner refused
//!   for them.

#![forbid(unsafe_code)]

use std::{
    future::Future,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use serde_json::Value;
use tokio::{
    io::AsyncWriteExt,
    net::TcpStream,
    sync::Semaphore,
    time::{Instant, sleep, sleep_until, timeout, timeout_at},
};
use tracing::{Instrument, debug, info, info_span, warn};

use crate::{
    cache::{UserCoinCache, UserWatch},
    config::ProxySettings,
    control::{self, ControlEndpoints},
    framing::{FrameError, LineReader},
    handshake::{
        Dialect, Handshake, Login, NameRules, Request, Step, StratumError, error_line, result_line,
    },
    lookup::{Lookup, UserLookups},
    metrics::{CloseReason, Direction, Metrics, SessionState, UpstreamFailure},
    relay::{
        Action, Actions, Opened, Phase, Relay, RelayEnd, RelaySettings, SessionSnapshot,
        SwitchOutcome, UpstreamId,
    },
    session_id::{BadServerId, ChainType, SessionId, SessionIdAllocator},
    switch_log::SwitchLog,
    upgrade::{HandedSession, HandedSocket},
    upstream::{
        self, EchoCheck, SubscribeParams, Upstream, UpstreamError, UpstreamLogin, UpstreamTarget,
    },
};

/// The most requests the handshake holds for the upstream (SPEC §1); beyond it they are
/// answered with an error.
const MAX_HELD_REQUESTS: usize = 32;

/// The agent sent upstream when the miner gave none.
const DEFAULT_AGENT: &str = "stratumSwitcher";

/// Where session IDs come from: one allocator per server ID (a lease can change the server ID
/// while older sessions keep theirs).
#[derive(Debug)]
pub struct SessionIds {
    chain: ChainType,
    current: Mutex<Arc<Mutex<SessionIdAllocator>>>,
    /// Allocators of other server IDs holding sessions handed over by a hot upgrade.
    others: Mutex<std::collections::HashMap<u8, Arc<Mutex<SessionIdAllocator>>>>,
}

/// A session ID that goes back to its allocator when dropped.
#[derive(Debug)]
pub struct SessionIdGuard {
    sid: SessionId,
    /// `None` once the ID was handed over with the session ([`Self::hand_over`]).
    allocator: Option<Arc<Mutex<SessionIdAllocator>>>,
}

impl SessionIdGuard {
    /// The guard itself, for a session handed over by a hot upgrade (if the upgrade does not
    /// happen, the session resumes in this process with it, its ID never freed meanwhile);
    /// `self` then frees nothing.
    pub fn hand_over(&mut self) -> SessionIdGuard {
        SessionIdGuard {
            sid: self.sid,
            allocator: self.allocator.take(),
        }
    }

    /// The session ID.
    pub fn sid(&self) -> SessionId {
        self.sid
    }
}

impl Drop for SessionIdGuard {
    fn drop(&mut self) {
        if let Some(allocator) = &self.allocator {
            lock(allocator).free(self.sid);
        }
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
            others: Mutex::default(),
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

    /// Where the search for a free ID stands (handed over by a hot upgrade).
    pub fn cursor(&self) -> u32 {
        lock(&lock(&self.current)).cursor()
    }

    /// Moves the search for a free ID (from [`Self::cursor`] of the previous image).
    pub fn set_cursor(&self, cursor: u32) {
        lock(&lock(&self.current)).set_cursor(cursor);
    }

    /// Takes `sid` itself, for a session handed over by a hot upgrade. An ID under another
    /// server ID than new sessions' (the lease changed) is held by an allocator of its own
    /// server ID, shared by every such session.
    pub fn claim(&self, sid: SessionId) -> SessionIdGuard {
        let current = lock(&self.current).clone();
        let allocator = if lock(&current).claim(sid) {
            current
        } else {
            let server_id = (sid.0 >> self.chain.index_bits()) as u8;
            let mut others = lock(&self.others);
            let allocator = match others.get(&server_id) {
                Some(allocator) => allocator.clone(),
                None => {
                    let allocator = SessionIdAllocator::new(u32::from(server_id), self.chain)
                        .map(|a| Arc::new(Mutex::new(a)))
                        .unwrap_or_else(|_| current.clone());
                    others.insert(server_id, allocator.clone());
                    allocator
                }
            };
            // Taken twice (it cannot be, unless the state was tampered with): the session runs
            // all the same, and the ID is freed once.
            lock(&allocator).claim(sid);
            allocator
        };
        SessionIdGuard {
            sid,
            allocator: Some(allocator),
        }
    }

    /// A free session ID, if any is left.
    pub fn allocate(&self) -> Option<SessionIdGuard> {
        let allocator = lock(&self.current).clone();
        let sid = lock(&allocator).allocate()?;
        Some(SessionIdGuard {
            sid,
            allocator: Some(allocator),
        })
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
    /// The read-through of users the cache does not know yet.
    pub lookups: Arc<UserLookups>,
    /// The process's budget of drained upstream connections.
    pub drains: DrainBudget,
    /// The hot upgrade's call to the relaying sessions.
    pub handover: Arc<HandOverSignal>,
    /// The log of completed switches.
    pub switch_log: Arc<SwitchLog>,
}

/// The hot upgrade's call to relaying sessions (SPEC §9): stop at the next turn and hand over
/// sockets and state. Each relaying session registers its task's waker once; a request sets
/// the flag (read by every session at every turn: a load of a line nobody writes meanwhile)
/// and wakes them all.
#[derive(Default)]
pub struct HandOverSignal {
    requested: std::sync::atomic::AtomicBool,
    wakers: Mutex<std::collections::HashMap<u64, std::task::Waker>>,
    next_key: std::sync::atomic::AtomicU64,
    handed: Mutex<Vec<HandedSession>>,
    progress: tokio::sync::Notify,
    /// A coarse clock (ticks of [`CLOCK_TICK`], moved by [`Self::keep_time`]): read on every
    /// miner line, so a load of a line written four times a second, not a clock call.
    clock: std::sync::atomic::AtomicU32,
}

/// The tick of [`HandOverSignal`]'s coarse clock.
pub const CLOCK_TICK: Duration = Duration::from_millis(250);

impl HandOverSignal {
    /// The coarse clock's time.
    fn now(&self) -> u32 {
        self.clock.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Moves the coarse clock until the process ends.
    pub async fn keep_time(self: Arc<Self>) {
        let mut tick = tokio::time::interval(CLOCK_TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            self.clock
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }

    fn requested(&self) -> bool {
        self.requested.load(std::sync::atomic::Ordering::Acquire)
    }

    fn register(self: &Arc<Self>, waker: &std::task::Waker) -> HandOverRegistration {
        let key = self
            .next_key
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        lock(&self.wakers).insert(key, waker.clone());
        HandOverRegistration {
            key,
            signal: Arc::clone(self),
        }
    }

    /// Asks every relaying session to hand over; how many are relaying.
    pub fn request(&self) -> usize {
        self.requested
            .store(true, std::sync::atomic::Ordering::Release);
        let wakers = lock(&self.wakers);
        for waker in wakers.values() {
            waker.wake_by_ref();
        }
        wakers.len()
    }

    /// Sessions still relaying (registered and not handed over).
    pub fn relaying(&self) -> usize {
        lock(&self.wakers).len()
    }

    /// Waits until no session relays any more (each has handed over or ended), or until
    /// `deadline`; whether none relays.
    pub async fn all_handed_over(&self, deadline: tokio::time::Instant) -> bool {
        loop {
            // Listening before looking: the last session's wake-up cannot fall in between.
            let notified = self.progress.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.relaying() == 0 {
                return true;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return self.relaying() == 0;
            }
        }
    }

    /// The sessions handed over so far.
    pub fn take_handed(&self) -> Vec<HandedSession> {
        std::mem::take(&mut *lock(&self.handed))
    }

    /// Sessions relay on (the upgrade did not happen).
    pub fn clear(&self) {
        self.requested
            .store(false, std::sync::atomic::Ordering::Release);
    }
}

/// A session's place in [`HandOverSignal`], left when dropped.
struct HandOverRegistration {
    key: u64,
    signal: Arc<HandOverSignal>,
}

impl Drop for HandOverRegistration {
    fn drop(&mut self) {
        let mut wakers = lock(&self.signal.wakers);
        wakers.remove(&self.key);
        let last = wakers.is_empty();
        drop(wakers);
        // The upgrade waits for the last one (one wake-up, not one per session).
        if last && self.signal.requested() {
            self.signal.progress.notify_waiters();
        }
    }
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
    Relay(RelayEnd),
    /// Handed over to a new image of the proxy (hot upgrade).
    HandOver,
    /// A hot upgrade could not hand the session over.
    HandOverFailed(std::io::Error),
}

impl End {
    /// The reason `switchyard_proxy_sessions_closed_total` counts; `None` for a session handed
    /// over (it did not end).
    fn close_reason(&self) -> Option<CloseReason> {
        Some(match self {
            End::HandOver => return None,
            End::MinerClosed | End::MinerWriteFailed => CloseReason::MinerClosed,
            End::MinerError(FrameError::Io(_)) => CloseReason::MinerClosed,
            End::MinerTimeout(_) => CloseReason::Idle,
            End::MinerError(FrameError::TooLong(_)) | End::FirstByteNotJson => {
                CloseReason::ProtocolError
            }
            End::Upstream(UpstreamError::AuthRejected { .. }) => CloseReason::Other,
            End::Upstream(_) | End::Relay(RelayEnd::OpenFailed) => CloseReason::UpstreamLost,
            End::Refused(_) | End::TooManyWaiting | End::Relay(_) | End::HandOverFailed(_) => {
                CloseReason::Other
            }
        })
    }
}

/// Runs one miner session to its end.
pub async fn run(ctx: Arc<ProxyContext>, socket: TcpStream, peer: SocketAddr) {
    let Some(sid) = ctx.session_ids.allocate() else {
        warn!(%peer, "no free session ID: connection refused");
        ctx.metrics.refused();
        return;
    };
    let _ = socket.set_nodelay(true);
    if let Err(e) = upstream::set_keepalive(&socket, ctx.settings.tcp_keepalive) {
        debug!(%peer, error = %e, "TCP keepalive not set on the miner socket");
    }
    let peer_ip = ipv4_of(peer);
    let budget = Arc::clone(&ctx);
    let _live = budget.drains.session_started();
    let mut session = Session::new(ctx, sid, peer, peer_ip);
    let end = session.serve(socket).await;
    session.ended(&end);
}

/// Runs a session handed over by a hot upgrade (from the previous image, or from this one when
/// its `exec` failed) to its end: the relay goes on where it stopped.
pub async fn resume(ctx: Arc<ProxyContext>, handed: HandedSession, sid: SessionIdGuard) {
    let peer = handed.peer;
    let budget = Arc::clone(&ctx);
    let _live = budget.drains.session_started();
    let mut session = Session::new(ctx, sid, peer, ipv4_of(peer));
    let end = match session.rebuild(handed) {
        Ok(mut parts) => {
            let end = session.relay(&mut parts).await;
            session.after_relay(parts, end)
        }
        Err(e) => {
            let end = End::HandOverFailed(e);
            info!(sid = %session.sid.sid(), %peer, ?end, "session ended");
            end
        }
    };
    session.ended(&end);
}

/// The miner's IPv4 address (what the sserver is told), or 0.0.0.0.
fn ipv4_of(peer: SocketAddr) -> Ipv4Addr {
    match peer.ip() {
        IpAddr::V4(ip) => ip,
        IpAddr::V6(ip) => ip.to_ipv4_mapped().unwrap_or(Ipv4Addr::UNSPECIFIED),
    }
}

struct Session {
    ctx: Arc<ProxyContext>,

    sid: SessionIdGuard,
    peer: SocketAddr,
    peer_ip: Ipv4Addr,
    state: Option<(String, SessionState)>,
    /// The relay's [`Relay::state_key`] when `state` was last set: the relay loop checks it
    /// after every line, and comparing two numbers there costs less than comparing the coin.
    state_key: Option<(UpstreamId, bool)>,
    /// Its end is counted (or it was handed over): a session dropped before (its task
    /// aborted) was closed by the proxy's shutdown.
    ended: bool,
}

impl Drop for Session {
    fn drop(&mut self) {
        self.ctx
            .metrics
            .session_moved(self.state.as_ref().map(|(c, s)| (c.as_str(), *s)), None);
        if !self.ended {
            self.ctx.metrics.session_closed(CloseReason::Shutdown);
        }
    }
}

/// The miner's half of the session: its socket, read by lines and written through
/// [`LineReader::get_ref`] (one socket, not two halves sharing it through an `Arc`: the relay
/// reaches it on every line).
struct Miner {
    socket: LineReader<TcpStream>,
    write_timeout: Duration,
}

impl Miner {
    async fn write(&mut self, line: &[u8]) -> Result<(), End> {
        write_within(self.socket.get_mut(), line, self.write_timeout)
            .await
            .map_err(|()| End::MinerWriteFailed)
    }

    /// Writes a line the proxy made (without its `\n`).
    async fn write_text(&mut self, text: &str) -> Result<(), End> {
        let mut line = Vec::with_capacity(text.len() + 1);
        line.extend_from_slice(text.as_bytes());
        line.push(b'\n');
        self.write(&line).await
    }
}

impl Session {
    fn new(
        ctx: Arc<ProxyContext>,
        sid: SessionIdGuard,
        peer: SocketAddr,
        peer_ip: Ipv4Addr,
    ) -> Self {
        ctx.metrics
            .session_moved(None, Some(("", SessionState::Handshake)));
        Self {
            ctx,
            sid,
            peer,
            peer_ip,
            state: Some((String::new(), SessionState::Handshake)),
            state_key: None,
            ended: false,
        }
    }

    /// Counts and logs the session's end (the relay's ends are logged by [`Self::after_relay`],
    /// which knows the worker).
    fn ended(&mut self, end: &End) {
        self.ended = true;
        if let Some(reason) = end.close_reason() {
            self.ctx.metrics.session_closed(reason);
        }
    }

    fn set_state(&mut self, coin: &str, state: SessionState) {
        let from = self.state.take();
        self.ctx.metrics.session_moved(
            from.as_ref().map(|(c, s)| (c.as_str(), *s)),
            Some((coin, state)),
        );
        self.state = Some((coin.to_string(), state));
        self.state_key = None;
    }

    /// The session: its login, then the relay until it ends.
    async fn serve(&mut self, socket: TcpStream) -> End {
        // The login's futures live on the heap only while it runs: an idle session keeps just
        // the relay loop's.
        // The login's log lines carry the session in a span; the relay's name it in each line
        // (a span entered on every turn of the relay would cost every line).
        let span = info_span!("session", sid = %self.sid.sid(), peer = %self.peer,
                              user = tracing::field::Empty, worker = tracing::field::Empty,
                              coin = tracing::field::Empty);
        let login = self.login(socket).instrument(span.clone());
        let mut parts = match Box::pin(login).await {
            Ok(parts) => parts,
            Err(end) => {
                span.in_scope(|| match &end {
                    End::MinerClosed => debug!(?end, "session ended"),
                    _ => info!(?end, "session ended"),
                });
                return end;
            }
        };
        // Closed before the relay: an open span keeps its fields in the subscriber's registry
        // for as long as it lives (about half a KiB per idle session in the benchmark).
        drop(span);
        let end = self.relay(&mut parts).await;
        self.after_relay(parts, end)
    }

    /// Gives back the drain permits and, for a hot upgrade, hands the session over.
    fn after_relay(&mut self, mut parts: Box<RelayParts>, end: End) -> End {
        parts.links.release(&self.ctx.drains);
        if !matches!(end, End::HandOver) {
            let relay = &mut parts.relay;
            relay.end();
            let (sid, peer) = (self.sid.sid(), self.peer);
            let (user, worker, coin) =
                (&relay.login.sub_account, relay.worker_names(), relay.coin());
            match &end {
                End::MinerClosed => {
                    debug!(%sid, %peer, %user, %worker, %coin, ?end, "session ended")
                }
                _ => info!(%sid, %peer, %user, %worker, %coin, ?end, "session ended"),
            }
            return end;
        }
        match self.hand_over(parts) {
            Ok(()) => {
                debug!(sid = %self.sid.sid(), peer = %self.peer, "session handed over");
                End::HandOver
            }
            Err(e) => {
                let end = End::HandOverFailed(e);
                info!(sid = %self.sid.sid(), peer = %self.peer, ?end, "session ended");
                end
            }
        }
    }

    /// Hands the session's sockets and state to the hot upgrade (SPEC §9): the sockets leave
    /// tokio as they are (nothing is written to either side), the state as a
    /// [`SessionSnapshot`].
    fn hand_over(&mut self, parts: Box<RelayParts>) -> std::io::Result<()> {
        let RelayParts {
            miner,
            relay,
            links,
            registration,
            active_at: activity,
            ..
        } = *parts;
        let Links {
            current, draining, ..
        } = links;
        let (miner_socket, miner_partial) = miner.socket.into_parts();
        let mut upstreams = Vec::new();
        let mut upstream_partials = Vec::new();
        for link in current.into_iter().chain(draining) {
            let (socket, partial) = link.socket.into_parts();
            upstreams.push((link.id, HandedSocket::Live(socket)));
            upstream_partials.push((link.id, partial));
        }
        let handed = HandedSession {
            sid: self.sid.sid(),
            peer: self.peer,
            miner: HandedSocket::Live(miner_socket),
            upstreams,
            snapshot: SessionSnapshot {
                relay,
                miner_partial,
                upstream_partials,
            },
            active_at: activity,
            sid_guard: Some(self.sid.hand_over()),
        };
        lock(&self.ctx.handover.handed).push(handed);
        // Counted as handed over only now (the registration's drop tells the upgrade).
        drop(registration);
        Ok(())
    }

    /// The relay loop's state rebuilt from a session handed over by a hot upgrade.
    fn rebuild(&mut self, handed: HandedSession) -> std::io::Result<Box<RelayParts>> {
        let HandedSession {
            miner,
            upstreams,
            snapshot,
            ..
        } = handed;
        let SessionSnapshot {
            mut relay,
            miner_partial,
            upstream_partials,
        } = snapshot;
        let settings = &self.ctx.settings;
        let miner = Miner {
            socket: LineReader::with_partial(
                miner.into_tokio()?,
                settings.max_line,
                &miner_partial,
            ),
            write_timeout: settings.write_timeout,
        };
        let mut links = Links::new(None);
        for (id, socket) in upstreams {
            let socket = socket.into_tokio()?;
            let partial = upstream_partials
                .iter()
                .find(|(of, _)| *of == id)
                .map(|(_, bytes)| bytes.as_ref())
                .unwrap_or_default();
            let max_line = settings.upstream_limits.max_line;
            links.draining.push(UpstreamLink {
                id,
                socket: LineReader::with_partial(socket, max_line, partial),
            });
        }
        links.arrange(&relay);
        relay.attach_metrics(&self.ctx.metrics);
        relay.resume();
        let watch = self.ctx.cache.watch_user(&relay.login.sub_account);
        // A user switched while the sessions were handed over: the watch reports only later
        // changes, so the coin it starts from is checked here (a cache not synced yet knows
        // no coin; its first sync is then a change the watch reports).
        let mut switch = None;
        if let Some(coin) = watch.current()
            && *coin != *relay.target_coin()
        {
            let has_sserver = self.ctx.settings.upstreams.contains_key(&*coin);
            if has_sserver {
                switch = Some(PendingSwitch::new(relay.coin(), &coin, None));
            }
            relay.on_coin_changed(&coin, has_sserver);
        }
        let mut parts = RelayParts::new(miner, relay, links, watch, &self.ctx);
        parts.switch = switch;
        Ok(parts)
    }

    /// The handshake, the coin lookup and the first upstream: what the relay starts from.
    async fn login(&mut self, socket: TcpStream) -> Result<Box<RelayParts>, End> {
        let accepted = std::time::Instant::now();
        let ctx = self.ctx.clone();
        let settings = &ctx.settings;
        let mut first = [0u8; 1];
        match timeout(settings.first_byte_timeout, socket.peek(&mut first)).await {
            Err(_) => return Err(self.failed_handshake(End::MinerTimeout("first byte"), "timeout")),
            Ok(Ok(0)) | Ok(Err(_)) => {
                return Err(self.failed_handshake(End::MinerClosed, "closed"));
            }
            Ok(Ok(_)) if first[0] != b'{' => {
                return Err(self.failed_handshake(End::FirstByteNotJson, "not_json"));
            }
            Ok(Ok(_)) => {}
        }
        let deadline = Instant::now() + settings.handshake_timeout;
        let mut miner = Miner {
            socket: LineReader::new(socket, settings.max_line),
            write_timeout: settings.write_timeout,
        };
        let mut hs = Handshake::new(
            settings.chain,
            self.sid.sid(),
            self.ctx.session_ids.server_id(),
        );
        let mut held = Vec::new();
        let mut login =
            match Box::pin(self.handshake(&mut miner, &mut hs, &mut held, deadline)).await {
                Ok(login) => login,
                Err(end) => return Err(self.failed_handshake(end, "miner")),
            };
        let span = tracing::Span::current();
        span.record("worker", login.worker().as_str());
        span.record("user", login.sub_account.as_str());
        let (coin, watch) =
            match Box::pin(self.resolve_coin(&mut miner, &hs, &mut login, deadline)).await {
                Ok(found) => found,
                Err(end) => return Err(end),
            };
        span.record("coin", &*coin);
        let Some(target) = settings.upstreams.get(&*coin).cloned() else {
            return Err(self
                .refuse(
                    &mut miner,
                    &hs,
                    &login.id,
                    StratumError::StratumServerNotFound,
                )
                .await);
        };
        self.set_state(&coin, SessionState::Connecting);
        let up_login = upstream_login(&hs, &login, self.peer_ip);
        let upstream = match Box::pin(open_counted(
            &self.ctx,
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
                return Err(End::Upstream(UpstreamError::AuthRejected {
                    result: Value::Null,
                    error: Value::Null,
                }));
            }
            Err(
                e @ (UpstreamError::Connect(_) | UpstreamError::Tls(_) | UpstreamError::Timeout),
            ) => {
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
                return Err(End::Upstream(e));
            }
            Err(e) => {
                warn!(coin = %coin, error = %e, "upstream handshake failed");
                self.ctx.metrics.handshake("failed", e.reason());
                return Err(End::Upstream(e));
            }
        };
        // The auth answer under the miner's id, the version mask, then what the sserver sent
        // meanwhile, in order; then the requests the handshake held.
        let first_line = result_line(
            &login.id,
            upstream.auth_result.clone(),
            upstream.auth_error.clone(),
            hs.json_rpc2(),
        );
        self.ctx.metrics.handshake("ok", "ok");
        info!(coin = %coin, "relaying");
        let opened = Opened {
            suffixed: upstream.suffixed,
            user_suffix: target.user_suffix.clone(),
            allowed_mask: upstream.allowed_mask,
            held: upstream.held,
        };
        let mut relay = Relay::start(
            hs,
            login,
            coin.to_string(),
            opened,
            first_line,
            held,
            RelaySettings {
                drain_window_ms: settings.drain_window.as_millis() as u64,
            },
        );
        relay.attach_metrics(&self.ctx.metrics);
        self.ctx
            .metrics
            .handshake_took(accepted.elapsed().as_secs_f64());
        let links = Links::new(Some(UpstreamLink {
            id: 0,
            socket: upstream.socket,
        }));
        Ok(RelayParts::new(miner, relay, links, watch, &self.ctx))
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
        held: &mut Vec<Bytes>,
        deadline: Instant,
    ) -> Result<Login, End> {
        loop {
            let line = match timeout_at(deadline, miner.socket.read_line()).await {
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
                Step::Hold if held.len() < MAX_HELD_REQUESTS => held.push(line),
                Step::Hold => {
                    // Never dropped without an answer: refused once the bound is reached.
                    if let Some(request) = Request::parse(&line) {
                        let refusal = error_line(
                            &request.id,
                            20,
                            "Too many requests before the login",
                            hs.server_id(),
                            hs.json_rpc2(),
                        );
                        miner.write_text(&refusal).await?;
                    }
                }
            }
        }
    }

    /// The user's coin, from the cache; for an unknown user, through an auto-registration.
    async fn resolve_coin(
        &mut self,
        miner: &mut Miner,
        hs: &Handshake,
        login: &mut Login,
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
        // Not in the cache: maybe written a moment ago, its change not streamed yet.
        match self.ctx.lookups.lookup(&login.sub_account, deadline).await {
            Lookup::Found { user, coin } => {
                if let Some(coin) = watch.current() {
                    // The stream brought it meanwhile: the stream's word is the newer one.
                    return Ok((coin, watch));
                }
                if user != login.sub_account {
                    // The case index mapped the name: the session is the stored user's.
                    debug!(user = %user, "the control plane knows the user under its stored name");
                    login.sub_account = user;
                    let worker = login.worker();
                    if let Some(first) = login.params.first_mut() {
                        *first = Value::String(worker);
                    }
                    watch = cache.watch_user(&login.sub_account);
                    if let Some(coin) = watch.current() {
                        return Ok((coin, watch));
                    }
                }
                let coin: Arc<str> = Arc::from(coin.as_str());
                watch.assume(Arc::clone(&coin));
                return Ok((coin, watch));
            }
            outcome => debug!(outcome = outcome.label(), "user not found by read-through"),
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

    /// A switch ended: the new coin's first job reached the miner. Its latency goes to the
    /// new coin's histogram and to the log, at info while switches are few
    /// ([`crate::switch_log`]).
    fn switched(&self, relay: &Relay, done: &PendingSwitch) {
        let now = std::time::Instant::now();
        let latency = now.saturating_duration_since(done.since);
        if let Some(coin) = self.ctx.metrics.coin(&done.to) {
            coin.switch_took(latency.as_secs_f64());
        }
        let latency_ms = latency.as_secs_f64() * 1e3;
        let (sid, peer, user, worker) = (
            self.sid.sid(),
            self.peer,
            &relay.login.sub_account,
            relay.worker_names(),
        );
        let (from, to) = (&done.from, &done.to);
        if self.ctx.switch_log.record(from, to, latency, now) {
            info!(%sid, %peer, %user, %worker, coin = %to, %from, %to, latency_ms,
                  "session switched coin");
        } else {
            debug!(%sid, %peer, %user, %worker, coin = %to, %from, %to, latency_ms,
                   "session switched coin");
        }
    }

    /// The relay loop: the miner, the serving upstream, the drained ones and the one being
    /// opened, polled by hand ([`RelayParts::poll_event`]), each event handed to the [`Relay`]
    /// state machine and its actions carried out. The loop's state is on the heap
    /// ([`RelayParts`]), the futures that outlive one turn (the coin watch, the drain deadline,
    /// an open) are kept, and no future is made per line: an idle session stays small and a
    /// busy one cheap.
    async fn relay(&mut self, parts: &mut RelayParts) -> End {
        let ctx = self.ctx.clone();
        loop {
            match self.carry_out_now(parts, Actions::new()) {
                Ok(None) => {}
                Ok(Some(blocked)) => {
                    // A full socket: the wait (and the actions after it) on the heap, so that
                    // the loop's future stays small.
                    if let Err(end) = Box::pin(self.carry_out_blocked(parts, blocked)).await {
                        return end;
                    }
                }
                Err(end) => return end,
            }
            let RelayParts { relay, links, .. } = &mut *parts;
            links.set_deadline(relay.next_deadline());
            links.watch_pressure(&ctx);
            let event = std::future::poll_fn(|cx| parts.poll_event(cx)).await;
            let RelayParts {
                relay,
                links,
                coin_change,
                switch,
                ..
            } = &mut *parts;
            match event {
                Event::Miner(Ok(Some(line))) => {
                    parts.active_at = ctx.handover.now();
                    parts.relay.on_miner_line(line, &*ctx);
                }
                Event::Miner(Ok(None)) => return End::MinerClosed,
                Event::Miner(Err(e)) => return End::MinerError(e),
                Event::Upstream(id, Some(line)) => {
                    let now = if links.draining.is_empty() {
                        0
                    } else {
                        now_ms()
                    };
                    relay.on_upstream_line(id, line, now);
                }
                Event::Upstream(id, None) => {
                    if links.current.as_ref().is_some_and(|c| c.id == id) {
                        warn!(sid = %self.sid.sid(), peer = %self.peer, user = %relay.login.sub_account,
                              worker = %relay.worker_names(), coin = %relay.coin(),
                              "sserver connection lost: reconnecting");
                    }
                    links.close(id);
                    relay.on_upstream_lost(id, now_ms());
                }
                Event::HandOver => return End::HandOver,
                Event::Deadline => relay.on_tick(now_ms()),
                Event::Pressure => {
                    debug!(sid = %self.sid.sid(), "short of file descriptors: old sserver connections closed");
                    relay.drop_drains();
                }
                Event::Coin(watch, coin) => {
                    let changed_at = watch.changed_at();
                    coin_change.inner = Box::pin(next_coin(watch));
                    let Some(coin) = coin else { continue };
                    let has_sserver = ctx.settings.upstreams.contains_key(&*coin);
                    if !has_sserver {
                        warn!(sid = %self.sid.sid(), peer = %self.peer, user = %relay.login.sub_account,
                              worker = %relay.worker_names(), coin = %relay.coin(), to = %coin,
                              "the user's new coin has no sserver here: ignored");
                    } else if coin.as_ref() != relay.target_coin() {
                        // The line a switch logs at info is the one at its end, with its
                        // latency (`switch_log`): a mass switch would log this one per session.
                        debug!(sid = %self.sid.sid(), peer = %self.peer, user = %relay.login.sub_account,
                               worker = %relay.worker_names(), coin = %relay.coin(), to = %coin,
                               "switching");
                        *switch = (coin.as_ref() != relay.coin())
                            .then(|| PendingSwitch::new(relay.coin(), &coin, changed_at));
                    }
                    relay.on_coin_changed(&coin, has_sserver);
                }
                Event::Opened(id, result) => {
                    links.opening = None;
                    match result {
                        Ok(upstream) => {
                            let opened = Opened {
                                suffixed: upstream.suffixed,
                                user_suffix: ctx
                                    .settings
                                    .upstreams
                                    .get(relay.target_coin())
                                    .map(|t| t.user_suffix.clone())
                                    .unwrap_or_default(),
                                allowed_mask: upstream.allowed_mask,
                                held: upstream.held,
                            };
                            links.draining.push(UpstreamLink {
                                id,
                                socket: upstream.socket,
                            });
                            relay.on_opened(id, opened, now_ms());
                        }
                        Err(e) => {
                            warn!(sid = %self.sid.sid(), peer = %self.peer, user = %relay.login.sub_account,
                                  worker = %relay.worker_names(), coin = %relay.target_coin(), error = %e,
                                  "cannot open the sserver connection");
                            relay.on_open_failed(id);
                        }
                    }
                }
            }
        }
    }

    /// Carries out the rest of the relay's actions after a write a socket could not take at
    /// once: waits for that socket (within the write deadline), then goes on.
    async fn carry_out_blocked(
        &mut self,
        parts: &mut RelayParts,
        mut blocked: (BlockedWrite, Actions),
    ) -> Result<(), End> {
        loop {
            let (write, rest) = blocked;
            let to = write.to;
            match (to, write.finish(parts).await) {
                (_, Ok(())) => {}
                (None, Err(())) => return Err(End::MinerWriteFailed),
                (Some(id), Err(())) => {
                    parts.links.close(id);
                    parts.relay.on_upstream_lost(id, now_ms());
                }
            }
            match self.carry_out_now(parts, rest)? {
                None => return Ok(()),
                Some(next) => blocked = next,
            }
        }
    }

    /// Carries out the relay's actions: writes, opens, closes, metrics; then puts the links in
    /// the places the relay's state says and keeps the process's drain budget. Writes the
    /// sockets take at once (nearly all) are done in place; at the first one a socket cannot
    /// take at once, that write and the actions after it are handed back (for
    /// [`Self::carry_out_blocked`]).
    #[allow(clippy::type_complexity)]
    fn carry_out_now(
        &mut self,
        parts: &mut RelayParts,
        mut actions: Actions,
    ) -> Result<Option<(BlockedWrite, Actions)>, End> {
        let RelayParts {
            miner,
            relay,
            links,
            switch,
            ..
        } = parts;
        loop {
            if actions.is_empty() {
                actions = relay.take_actions();
            }
            if actions.is_empty() {
                break;
            }
            // One line for the miner (the common case) is written as it is; several are joined
            // into one write.
            let single_to_miner = actions
                .iter()
                .filter(|a| matches!(a, Action::ToMiner(_)))
                .count()
                == 1;
            let mut to_miner: Vec<u8> = Vec::new();
            let mut lost = Vec::new();
            let mut actions_iter = std::mem::take(&mut actions).into_iter();
            while let Some(action) = actions_iter.next() {
                match action {
                    Action::ToMiner(line) => {
                        self.ctx.metrics.relayed(Direction::Downstream, line.len());
                        if single_to_miner {
                            // Relayed as it came: no copy unless lines are joined.
                            match write_now(miner.socket.get_ref(), &line) {
                                Ok(n) if n == line.len() => {}
                                Ok(n) => {
                                    let blocked = BlockedWrite::new(
                                        None,
                                        line.slice(n..),
                                        miner.write_timeout,
                                    );
                                    return Ok(Some((blocked, actions_iter.collect())));
                                }
                                Err(()) => return Err(End::MinerWriteFailed),
                            }
                        } else {
                            to_miner.extend_from_slice(&line);
                        }
                    }
                    Action::ToUpstream(id, line) => {
                        let Some(link) = links.get_mut(id) else {
                            continue;
                        };
                        match write_now(link.socket.get_ref(), &line) {
                            Ok(n) if n == line.len() => {
                                self.ctx.metrics.relayed(Direction::Upstream, line.len());
                            }
                            Ok(n) => {
                                self.ctx.metrics.relayed(Direction::Upstream, line.len());
                                let write_timeout = self.ctx.settings.write_timeout;
                                let blocked =
                                    BlockedWrite::new(Some(id), line.slice(n..), write_timeout);
                                let mut left: Actions = actions_iter.collect();
                                if !to_miner.is_empty() {
                                    left.push(Action::ToMiner(Bytes::from(std::mem::take(
                                        &mut to_miner,
                                    ))));
                                }
                                for id in lost {
                                    links.close(id);
                                    relay.on_upstream_lost(id, now_ms());
                                }
                                return Ok(Some((blocked, left)));
                            }
                            Err(()) => lost.push(id),
                        }
                    }
                    Action::Open {
                        id,
                        coin,
                        reconnect,
                    } => {
                        let Some(target) = self.ctx.settings.upstreams.get(&coin).cloned() else {
                            relay.on_open_failed(id);
                            continue;
                        };
                        let login = upstream_login(&relay.hs, &relay.login, self.peer_ip);
                        let limits = self.ctx.settings.upstream_limits.clone();
                        let window = self.ctx.settings.reconnect_window;
                        let tries = self.ctx.settings.reconnect_tries.max(1);
                        debug!(sid = %self.sid.sid(), coin = %coin, reconnect, "opening an sserver connection");
                        // The count first: the previous open (if any) is dropped after it.
                        let counted = OpeningCount::new(&self.ctx);
                        links.opening = Some((
                            id,
                            Box::pin(open_with_retries(
                                Arc::clone(&self.ctx),
                                target,
                                login,
                                limits,
                                window,
                                tries,
                            )),
                            counted,
                        ));
                    }
                    Action::CancelOpen(id) => {
                        if links.opening.as_ref().is_some_and(|(o, _, _)| *o == id) {
                            links.opening = None;
                        }
                    }
                    Action::Close(id) => links.close(id),
                    Action::Outcome(done) => {
                        let SwitchOutcome {
                            coin,
                            kind,
                            outcome,
                        } = *done;
                        match kind {
                            "reconnect" => self.ctx.metrics.reconnect(outcome),
                            _ => self.ctx.metrics.switch(&coin, outcome),
                        }
                        if outcome == "ok" && kind == "reconnect" {
                            info!(sid = %self.sid.sid(), peer = %self.peer, user = %relay.login.sub_account,
                                  worker = %relay.worker_names(), coin = %coin, kind, "relaying");
                        } else if outcome == "ok" {
                            debug!(sid = %self.sid.sid(), peer = %self.peer, user = %relay.login.sub_account,
                                   worker = %relay.worker_names(), coin = %coin, kind, "relaying");
                        }
                    }
                    Action::FirstJob => {
                        if let Some(done) = switch.take_if(|s| *s.to == *relay.coin()) {
                            self.switched(relay, &done);
                        }
                    }
                    Action::End(end) => {
                        if !to_miner.is_empty() {
                            let _ = write_now(miner.socket.get_ref(), &to_miner);
                        }
                        return Err(End::Relay(end));
                    }
                }
            }
            if !to_miner.is_empty() {
                match write_now(miner.socket.get_ref(), &to_miner) {
                    Ok(n) if n == to_miner.len() => {}
                    Ok(n) => {
                        to_miner.drain(..n);
                        let blocked =
                            BlockedWrite::new(None, Bytes::from(to_miner), miner.write_timeout);
                        for id in lost {
                            links.close(id);
                            relay.on_upstream_lost(id, now_ms());
                        }
                        return Ok(Some((blocked, Actions::new())));
                    }
                    Err(()) => return Err(End::MinerWriteFailed),
                }
            }
            for id in lost {
                links.close(id);
                relay.on_upstream_lost(id, now_ms());
            }
        }
        links.arrange(relay);
        if !links.keep_drain_budget(&self.ctx.drains) {
            relay.drop_drains();
            return self.carry_out_now(parts, Actions::new());
        }
        let key = relay.state_key();
        if self.state_key != Some(key) {
            let state = match relay.phase {
                Phase::Relaying { .. } => SessionState::Relaying,
                _ => SessionState::Switching,
            };
            if self
                .state
                .as_ref()
                .is_none_or(|(c, s)| c.as_str() != relay.coin() || *s != state)
            {
                let coin = relay.coin().to_string();
                self.set_state(&coin, state);
            }
            self.state_key = Some(key);
        }
        Ok(None)
    }
}

/// A write a socket could not take at once: the rest of it, to the miner (`to: None`) or to an
/// upstream, and how long the socket may take.
struct BlockedWrite {
    to: Option<UpstreamId>,
    rest: Bytes,
    limit: Duration,
}

impl BlockedWrite {
    fn new(to: Option<UpstreamId>, rest: Bytes, limit: Duration) -> Self {
        Self { to, rest, limit }
    }

    /// Writes the rest within the limit (the socket's link may have gone meanwhile: then
    /// there is nothing to write).
    async fn finish(self, parts: &mut RelayParts) -> Result<(), ()> {
        let writer = match self.to {
            None => parts.miner.socket.get_mut(),
            Some(id) => match parts.links.get_mut(id) {
                Some(link) => link.socket.get_mut(),
                None => return Ok(()),
            },
        };
        match timeout(self.limit, writer.write_all(&self.rest)).await {
            Ok(Ok(())) => Ok(()),
            _ => Err(()),
        }
    }
}

/// Writes what the socket takes at once: how many bytes (all of them, nearly always); an error
/// when the socket failed.
fn write_now(writer: &TcpStream, bytes: &[u8]) -> Result<usize, ()> {
    let mut written = 0;
    while written < bytes.len() {
        match writer.try_write(&bytes[written..]) {
            Ok(0) => return Err(()),
            Ok(n) => written += n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return Err(()),
        }
    }
    Ok(written)
}

/// What woke the relay loop.
enum Event {
    /// A line from the miner, its end or its error.
    Miner(Result<Option<Bytes>, FrameError>),
    /// A line from an upstream, or `None` when it is gone.
    Upstream(UpstreamId, Option<Bytes>),
    /// The relay's deadline passed.
    Deadline,
    /// The process is short of descriptors: drains go.
    Pressure,
    /// The user's coin changed (or the watch woke without a coin).
    Coin(UserWatch, Option<Arc<str>>),
    /// The upstream being opened is open, or could not be.
    Opened(UpstreamId, Result<Upstream, UpstreamError>),
    /// A hot upgrade asks for the session.
    HandOver,
}

impl RelayParts {
    /// The relay loop's state, on the heap, watching the user's coin through `watch`.
    fn new(
        miner: Miner,
        relay: Relay,
        links: Links,
        watch: UserWatch,
        ctx: &ProxyContext,
    ) -> Box<Self> {
        Box::new(Self {
            miner,
            relay,
            links,
            coin_change: CoinWatch::new(watch),
            miner_first: false,
            handover: Arc::clone(&ctx.handover),
            registration: None,
            active_at: 0,
            switch: None,
        })
    }

    /// The next event. The rare ones (coin, open, deadline, pressure) first; then the miner
    /// and the upstreams, which of the two first alternating by turn, so that neither side
    /// can starve the other.
    fn poll_event(&mut self, cx: &mut Context<'_>) -> Poll<Event> {
        if self.handover.requested() {
            return Poll::Ready(Event::HandOver);
        }
        if self.registration.is_none() {
            self.registration = Some(self.handover.register(cx.waker()));
            if self.handover.requested() {
                return Poll::Ready(Event::HandOver);
            }
        }
        if let Poll::Ready((watch, coin)) = self.coin_change.poll_change(cx) {
            return Poll::Ready(Event::Coin(watch, coin));
        }
        let links = &mut self.links;
        if let Some((id, open, _)) = links.opening.as_mut()
            && let Poll::Ready(result) = open.as_mut().poll(cx)
        {
            return Poll::Ready(Event::Opened(*id, result));
        }
        if let Some((_, sleep)) = links.deadline.as_mut()
            && sleep.as_mut().poll(cx).is_ready()
        {
            links.deadline = None;
            return Poll::Ready(Event::Deadline);
        }
        if let Some(pressure) = links.pressure.as_mut()
            && pressure.as_mut().poll(cx).is_ready()
        {
            links.pressure = None;
            return Poll::Ready(Event::Pressure);
        }
        self.miner_first = !self.miner_first;
        let reads_miner = self.relay.reads_miner();
        if self.miner_first
            && reads_miner
            && let Poll::Ready(line) = self.miner.socket.poll_raw_line(cx)
        {
            return Poll::Ready(Event::Miner(line));
        }
        let links = &mut self.links;
        for link in links.current.iter_mut().chain(links.draining.iter_mut()) {
            if let Poll::Ready(line) = link.socket.poll_raw_line(cx) {
                let line = line.unwrap_or_else(|e| {
                    debug!(error = %e, "sserver read failed");
                    None
                });
                return Poll::Ready(Event::Upstream(link.id, line));
            }
        }
        if !self.miner_first
            && reads_miner
            && let Poll::Ready(line) = self.miner.socket.poll_raw_line(cx)
        {
            return Poll::Ready(Event::Miner(line));
        }
        Poll::Pending
    }
}

/// One upstream connection's socket, read by lines and written through
/// [`LineReader::get_ref`] (see [`Miner`]).
struct UpstreamLink {
    id: UpstreamId,
    socket: LineReader<TcpStream>,
}

/// An upstream being opened (a switch or a reconnect).
type Opening = Pin<Box<dyn Future<Output = Result<Upstream, UpstreamError>> + Send>>;

/// An upstream being opened: its number and the open.
type OpeningLink = (UpstreamId, Opening, OpeningCount);

/// The sockets and futures of a session's relay, arranged as its [`Relay`] says. Every field
/// is looked at on every turn: together, in declaration order (`repr(C)`).
#[repr(C)]
struct Links {
    /// The serving upstream.
    current: Option<UpstreamLink>,
    /// The drained upstreams (and, for a moment, one just opened).
    draining: Vec<UpstreamLink>,
    /// Drain permits held from the process's budget.
    drain_permits: usize,
    /// The upstream being opened.
    opening: Option<OpeningLink>,
    /// The next drain deadline (ms since the Unix epoch) and its timer, while there is one.
    deadline: Option<(u64, Pin<Box<tokio::time::Sleep>>)>,
    /// The process running short of descriptors, watched while there are drains to close.
    pressure: Option<Pin<Box<dyn Future<Output = ()> + Send>>>,
}

/// A session's relay loop state, kept on the heap in one piece. In declaration order
/// (`repr(C)`), what a turn of the loop reads first, the relay's hot fields right after the
/// sockets' (see [`Relay`]), the rare rest last: a line wakes a session whose state is cold,
/// and the fewer cache lines it touches, the less the turn waits for memory.
#[repr(C)]
struct RelayParts {
    /// The hot upgrade's call.
    handover: Arc<HandOverSignal>,
    /// This session's place in it, taken at the first turn.
    registration: Option<HandOverRegistration>,
    /// The next change of the user's coin (it owns the user's entry in the cache's index).
    coin_change: CoinWatch,
    /// When the miner last sent a line, on the process's coarse clock
    /// ([`HandOverSignal::now`]): a hot upgrade resumes the busy sessions first.
    active_at: u32,
    /// Whether the miner is polled before the upstreams this turn (alternates).
    miner_first: bool,
    miner: Miner,
    links: Links,
    relay: Relay,
    /// A switch under way, until the new coin's first job reaches the miner.
    switch: Option<Box<PendingSwitch>>,
}

/// A switch under way: from which coin to which, and since when (the cache applying the
/// change), for its latency and its log line.
struct PendingSwitch {
    from: String,
    to: Arc<str>,
    since: std::time::Instant,
}

impl PendingSwitch {
    /// A switch from `from` to `to`, the change applied by the cache at `since` (now when
    /// not known).
    fn new(from: &str, to: &Arc<str>, since: Option<std::time::Instant>) -> Box<Self> {
        Box::new(Self {
            from: from.to_string(),
            to: Arc::clone(to),
            since: since.unwrap_or_else(std::time::Instant::now),
        })
    }
}

/// The next change of a user's coin, owning the user's watch until it comes.
type CoinChange = Pin<Box<dyn Future<Output = (UserWatch, Option<Arc<str>>)> + Send>>;

/// The next change of the user's coin, polled only when it woke the session: the relay loop
/// turns once per line, and polling the cache's channel each time (a lock) would cost every
/// line for an event that comes once in hours.
struct CoinWatch {
    inner: CoinChange,
    wake: Arc<CoinWake>,
    /// Polled once since `inner` was made: its wake-up is registered.
    armed: bool,
}

/// Set by the coin channel's wake-up, which it passes on to the session's task.
#[derive(Default)]
struct CoinWake {
    woken: std::sync::atomic::AtomicBool,
    task: futures::task::AtomicWaker,
}

impl std::task::Wake for CoinWake {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, std::sync::atomic::Ordering::Release);
        self.task.wake();
    }
}

impl CoinWatch {
    fn new(watch: UserWatch) -> Self {
        Self {
            inner: Box::pin(next_coin(watch)),
            wake: Arc::default(),
            armed: false,
        }
    }

    fn poll_change(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<(UserWatch, Option<Arc<str>>)> {
        // Armed and not woken: the task waker registered at the last real poll is still in
        // place (only a wake-up takes it), so nothing to do, not even an atomic write.
        if self.armed && !self.wake.woken.load(std::sync::atomic::Ordering::Acquire) {
            return std::task::Poll::Pending;
        }
        // The flag first, then the waker: a wake-up between the two finds the flag set again
        // and wakes the task, which polls again.
        self.wake
            .woken
            .store(false, std::sync::atomic::Ordering::Release);
        self.wake.task.register(cx.waker());
        let waker = std::task::Waker::from(Arc::clone(&self.wake));
        let mut own = std::task::Context::from_waker(&waker);
        match self.inner.as_mut().poll(&mut own) {
            std::task::Poll::Ready(change) => {
                self.armed = false;
                std::task::Poll::Ready(change)
            }
            std::task::Poll::Pending => {
                self.armed = true;
                std::task::Poll::Pending
            }
        }
    }
}

impl Links {
    /// Links with `current` serving and nothing else.
    fn new(current: Option<UpstreamLink>) -> Self {
        Self {
            current,
            draining: Vec::new(),
            opening: None,
            drain_permits: 0,
            deadline: None,
            pressure: None,
        }
    }

    fn get_mut(&mut self, id: UpstreamId) -> Option<&mut UpstreamLink> {
        if let Some(current) = self.current.as_mut().filter(|c| c.id == id) {
            return Some(current);
        }
        self.draining.iter_mut().find(|l| l.id == id)
    }

    fn close(&mut self, id: UpstreamId) {
        if self.current.as_ref().is_some_and(|c| c.id == id) {
            self.current = None;
        }
        self.draining.retain(|l| l.id != id);
    }

    /// Puts the serving upstream's link in `current` and drops links the relay no longer has.
    fn arrange(&mut self, relay: &Relay) {
        let want = relay.current().map(|c| c.id);
        if self.current.as_ref().map(|c| c.id) != want {
            if let Some(old) = self.current.take() {
                self.draining.push(old);
            }
            if let Some(want) = want
                && let Some(i) = self.draining.iter().position(|l| l.id == want)
            {
                self.current = Some(self.draining.swap_remove(i));
            }
        }
        self.draining
            .retain(|l| relay.drained_ids().any(|id| id == l.id));
    }

    /// Arms the timer for the relay's next deadline (or drops it when there is none).
    fn set_deadline(&mut self, deadline: Option<u64>) {
        match (deadline, &mut self.deadline) {
            (None, _) => self.deadline = None,
            (Some(ms), Some((at, _))) if *at == ms => {}
            (Some(ms), Some((at, sleep))) => {
                *at = ms;
                sleep.as_mut().reset(instant_of(ms));
            }
            (Some(ms), None) => {
                self.deadline = Some((ms, Box::pin(sleep_until(instant_of(ms)))));
            }
        }
    }

    /// Watches the process's descriptor pressure while there are drains (and only then: the
    /// watch is a waiter in a shared list).
    fn watch_pressure(&mut self, ctx: &Arc<ProxyContext>) {
        match (self.draining.is_empty(), self.pressure.is_some()) {
            (true, true) => self.pressure = None,
            (false, false) => {
                let ctx = Arc::clone(ctx);
                self.pressure = Some(Box::pin(async move { ctx.drains.pressure().await }));
            }
            _ => {}
        }
    }

    /// Gives the drain permits back (the session ended).
    fn release(&mut self, budget: &DrainBudget) {
        for _ in 0..self.drain_permits {
            budget.give_back();
        }
        self.drain_permits = 0;
    }

    /// Holds a permit for every drained upstream; false when the budget has no room.
    fn keep_drain_budget(&mut self, budget: &DrainBudget) -> bool {
        while self.drain_permits > self.draining.len() {
            budget.give_back();
            self.drain_permits -= 1;
        }
        while self.drain_permits < self.draining.len() {
            if !budget.take() {
                return false;
            }
            self.drain_permits += 1;
        }
        true
    }
}

/// The process's budget of drained upstream connections: each holds a file descriptor, and
/// under pressure they are closed before any miner is refused (SPEC §4). A session takes a
/// permit per drain; when none is left, it closes its drains at once. The budget is what the
/// live sessions leave of the open-file limit: two descriptors each, plus headroom for the
/// upstreams being opened (a mass switch opens one per session), so drains never take the
/// descriptor a switch or a new miner needs.
#[derive(Debug)]
pub struct DrainBudget {
    /// The process's open-file limit.
    open_files: usize,
    /// Drains held now.
    in_use: std::sync::atomic::AtomicUsize,
    /// Sessions alive now.
    live: std::sync::atomic::AtomicUsize,
    /// Upstreams being opened now (each needs a descriptor).
    opening: std::sync::atomic::AtomicUsize,
    /// Woken when descriptors run short: every drain is closed.
    relieve: tokio::sync::Notify,
}

/// Descriptors always left free beside two per session: the listener, the control
/// connection, the metrics endpoint, and upstreams being opened.
const DESCRIPTOR_HEADROOM: usize = 256;

impl DrainBudget {
    /// A budget for a process allowed `open_files` descriptors.
    pub fn new(open_files: usize) -> Self {
        Self {
            open_files,
            in_use: std::sync::atomic::AtomicUsize::new(0),
            live: std::sync::atomic::AtomicUsize::new(0),
            opening: std::sync::atomic::AtomicUsize::new(0),
            relieve: tokio::sync::Notify::new(),
        }
    }

    /// Drains held now.
    pub fn in_use(&self) -> usize {
        self.in_use.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Descriptors the live sessions, the upstreams being opened and `drains` drains hold,
    /// with headroom kept free (an eighth of the sessions, at least [`DESCRIPTOR_HEADROOM`]).
    fn committed(&self, drains: usize) -> usize {
        let live = self.live.load(std::sync::atomic::Ordering::Relaxed);
        let opening = self.opening.load(std::sync::atomic::Ordering::Relaxed);
        2 * live + opening + drains + DESCRIPTOR_HEADROOM.max(live / 8)
    }

    fn take(&self) -> bool {
        use std::sync::atomic::Ordering;
        self.in_use
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (self.committed(n + 1) <= self.open_files).then_some(n + 1)
            })
            .is_ok()
    }

    fn give_back(&self) {
        self.in_use
            .fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }

    /// Asks every session to close its drains (descriptors run short).
    pub fn relieve(&self) {
        self.relieve.notify_waiters();
    }

    /// Whether one more session would leave too few descriptors: drains should go.
    pub fn short_for_one_more(&self) -> bool {
        self.committed(self.in_use()) + 2 > self.open_files
    }

    fn pressure(&self) -> tokio::sync::futures::Notified<'_> {
        self.relieve.notified()
    }

    fn session_started(&self) -> LiveSession<'_> {
        self.live.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        LiveSession(self)
    }
}

/// Counts an upstream being opened while it is (its descriptor is reserved: drains may not
/// take it).
struct OpeningCount(Arc<ProxyContext>);

impl OpeningCount {
    fn new(ctx: &Arc<ProxyContext>) -> Self {
        ctx.drains
            .opening
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Self(Arc::clone(ctx))
    }
}

impl Drop for OpeningCount {
    fn drop(&mut self) {
        self.0
            .drains
            .opening
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Counts a session as live while it exists.
struct LiveSession<'a>(&'a DrainBudget);

impl Drop for LiveSession<'_> {
    fn drop(&mut self) {
        self.0
            .live
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// How often an open that found no free descriptor is tried, 20 ms apart (drains are closed
/// meanwhile, and a mass switch frees the old connections of the sessions it moved).
const EMFILE_TRIES: u32 = 100;

/// Whether an error means the process is out of file descriptors (EMFILE, ENFILE).
fn out_of_descriptors(e: &UpstreamError) -> bool {
    matches!(e, UpstreamError::Connect(io) if matches!(io.raw_os_error(), Some(23 | 24)))
}

/// Writes `bytes` whole within `limit`. A write the socket takes at once (nearly all of them)
/// arms no timer: the deadline only starts when the socket is full.
async fn write_within(writer: &mut TcpStream, bytes: &[u8], limit: Duration) -> Result<(), ()> {
    let mut written = 0;
    while written < bytes.len() {
        match writer.try_write(&bytes[written..]) {
            Ok(0) => return Err(()),
            Ok(n) => written += n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                // The socket is full: wait for it, within the deadline. On the heap, so that
                // the timer is not part of every idle session's future.
                let rest = Box::pin(timeout(limit, writer.write_all(&bytes[written..])));
                return match rest.await {
                    Ok(Ok(())) => Ok(()),
                    _ => Err(()),
                };
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return Err(()),
        }
    }
    Ok(())
}

/// The open-file limit of this process (`/proc/self/limits`), if it can be read.
pub fn open_file_limit() -> Option<usize> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

/// Milliseconds since the Unix epoch: the relay's clock (wall time, so that a hot upgrade
/// carries deadlines over).
fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The tokio instant of a relay deadline.
fn instant_of(ms: u64) -> Instant {
    let now = now_ms();
    Instant::now() + Duration::from_millis(ms.saturating_sub(now))
}

/// The user's next coin, with the watch handed back for the next one.
async fn next_coin(mut watch: UserWatch) -> (UserWatch, Option<Arc<str>>) {
    let coin = watch.changed().await;
    (watch, coin)
}

/// The first wait between tries to open an sserver connection; each next wait doubles, up to
/// [`RETRY_MAX`], each jittered down by up to half so that a fleet's sessions do not all knock
/// on a restarted sserver in the same instant.
const RETRY_FIRST: Duration = Duration::from_millis(250);

/// The longest wait between two tries.
const RETRY_MAX: Duration = Duration::from_secs(5);

/// Opens an upstream, trying again with backoff ([`RETRY_FIRST`] doubling to [`RETRY_MAX`])
/// until `window` has passed since the first try or `tries` tries were made, whichever comes
/// first. A refusal (wrong session ID, authorize refused) is not tried again: the sserver
/// answered.
async fn open_with_retries(
    ctx: Arc<ProxyContext>,
    target: UpstreamTarget,
    login: UpstreamLogin,
    limits: upstream::UpstreamLimits,
    window: Duration,
    tries: u32,
) -> Result<Upstream, UpstreamError> {
    let give_up_at = tokio::time::Instant::now() + window;
    let mut attempt: u32 = 0;
    let mut wait = RETRY_FIRST;
    loop {
        attempt = attempt.saturating_add(1);
        match open_counted(&ctx, &target, &login, &limits).await {
            Ok(upstream) => return Ok(upstream),
            Err(e @ (UpstreamError::SidMismatch { .. } | UpstreamError::AuthRejected { .. })) => {
                return Err(e);
            }
            // Out of descriptors: drained upstreams go first, then the open is tried again.
            Err(e) if out_of_descriptors(&e) && attempt < EMFILE_TRIES => {
                warn!(coin = %target.coin, "out of file descriptors: closing old sserver connections");
                ctx.drains.relieve();
                sleep(Duration::from_millis(20)).await;
            }
            Err(e) => {
                let jittered = wait.mul_f64(rand::random_range(0.5..=1.0));
                let next_try = tokio::time::Instant::now() + jittered;
                if attempt >= tries || next_try > give_up_at {
                    return Err(e);
                }
                debug!(coin = %target.coin, attempt, error = %e, "sserver not ready, trying again");
                tokio::time::sleep_until(next_try).await;
                wait = (wait * 2).min(RETRY_MAX);
            }
        }
    }
}

/// [`upstream::open`], timed and counted on the coin's series: the connect and login time
/// when it opens, the reason when it does not.
async fn open_counted(
    ctx: &ProxyContext,
    target: &UpstreamTarget,
    login: &UpstreamLogin,
    limits: &upstream::UpstreamLimits,
) -> Result<Upstream, UpstreamError> {
    let started = std::time::Instant::now();
    let opened = upstream::open(target, login, limits).await;
    if let Some(coin) = ctx.metrics.coin(&target.coin) {
        match &opened {
            Ok(_) => coin.connect_took(started.elapsed().as_secs_f64()),
            Err(e) => coin.upstream_failure(match e {
                UpstreamError::Connect(_) => UpstreamFailure::Connect,
                UpstreamError::Tls(_) => UpstreamFailure::Tls,
                UpstreamError::Timeout => UpstreamFailure::Timeout,
                UpstreamError::Closed
                | UpstreamError::Frame(_)
                | UpstreamError::SidMismatch { .. }
                | UpstreamError::AuthRejected { .. }
                | UpstreamError::BadAnswer(_) => UpstreamFailure::Handshake,
            }),
        }
    }
    opened
}

/// What the session sends an sserver to log in (SPEC §2), from its handshake.
fn upstream_login(hs: &Handshake, login: &Login, peer_ip: Ipv4Addr) -> UpstreamLogin {
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
        extra_auths: Vec::new(),
    }
}
