//! The proxy's Prometheus metrics (text exposition format 0.0.4) and the HTTP endpoint that
//! serves them. Hot counters (lines and bytes relayed) are plain atomics; the labelled ones
//! change only on session events and sit behind a short lock.

#![forbid(unsafe_code)]

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
};

use axum::{Router, extract::State, http::header, response::IntoResponse, routing::get};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::{cache::UserCoinCache, lookup::UserLookups};

/// Where a session is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum SessionState {
    /// Before the login (no coin yet).
    Handshake,
    /// Waiting for an auto-registration to land.
    Registering,
    /// Opening its first upstream.
    Connecting,
    /// Relaying.
    Relaying,
    /// Moving to another upstream (a switch or a reconnect), still holding the miner.
    Switching,
}

impl SessionState {
    fn label(self) -> &'static str {
        match self {
            Self::Handshake => "handshake",
            Self::Registering => "registering",
            Self::Connecting => "connecting",
            Self::Relaying => "relaying",
            Self::Switching => "switching",
        }
    }
}

/// Which way a line went.
#[derive(Debug, Clone, Copy)]
pub enum Direction {
    /// From the miner to the sserver.
    Upstream,
    /// From the sserver to the miner.
    Downstream,
}

/// The proxy's metrics; see the module doc.
#[derive(Debug, Default)]
pub struct Metrics {
    sessions: Mutex<BTreeMap<(String, SessionState), i64>>,
    handshakes: Mutex<BTreeMap<(&'static str, &'static str), u64>>,
    switches: Mutex<BTreeMap<(String, &'static str), u64>>,
    reconnects: Mutex<BTreeMap<&'static str, u64>>,
    /// Lines and bytes relayed, per thread: counted on every line, so each worker thread
    /// counts on a cache line of its own instead of all of them on one.
    relayed: [RelayedShard; RELAYED_SHARDS],
    refused_connections: AtomicU64,
    cache: Mutex<Option<Arc<UserCoinCache>>>,
    lookups: Mutex<Option<Arc<UserLookups>>>,
    server_id: AtomicU64,
}

/// How many [`RelayedShard`]s there are; threads beyond it share them.
const RELAYED_SHARDS: usize = 16;

/// One thread's counts of relayed lines and bytes, alone on its cache lines.
#[derive(Debug, Default)]
#[repr(align(128))]
struct RelayedShard {
    lines_up: AtomicU64,
    lines_down: AtomicU64,
    bytes_up: AtomicU64,
    bytes_down: AtomicU64,
}

/// The shard of the calling thread.
fn relayed_shard() -> usize {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    thread_local! {
        static SHARD: usize = (NEXT.fetch_add(1, Ordering::Relaxed) as usize) % RELAYED_SHARDS;
    }
    SHARD.with(|s| *s)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Metrics {
    /// Fresh metrics.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Reports the cache's feed figures too.
    pub fn watch_cache(&self, cache: Arc<UserCoinCache>) {
        *lock(&self.cache) = Some(cache);
    }

    /// Reports the read-through's figures too.
    pub fn watch_lookups(&self, lookups: Arc<UserLookups>) {
        *lock(&self.lookups) = Some(lookups);
    }

    /// Records the server ID in use.
    pub fn set_server_id(&self, id: u8) {
        self.server_id.store(u64::from(id), Ordering::Relaxed);
    }

    /// A session moved from `from` to `to` (either may be `None`: born, ended).
    pub fn session_moved(
        &self,
        from: Option<(&str, SessionState)>,
        to: Option<(&str, SessionState)>,
    ) {
        let mut sessions = lock(&self.sessions);
        if let Some((coin, state)) = from
            && let Some(n) = sessions.get_mut(&(coin.to_string(), state))
        {
            *n -= 1;
        }
        if let Some((coin, state)) = to {
            *sessions.entry((coin.to_string(), state)).or_default() += 1;
        }
    }

    /// Sessions by coin (every state but the handshake), for lease renewals.
    pub fn sessions_by_coin(&self) -> std::collections::HashMap<String, u64> {
        let mut by_coin = std::collections::HashMap::new();
        for ((coin, state), n) in lock(&self.sessions).iter() {
            if *state != SessionState::Handshake && !coin.is_empty() && *n > 0 {
                *by_coin.entry(coin.clone()).or_default() += *n as u64;
            }
        }
        by_coin
    }

    /// The number of sessions in every state.
    pub fn session_count(&self) -> i64 {
        lock(&self.sessions).values().sum()
    }

    /// A handshake ended: `outcome` "ok" or "failed", with a reason label.
    pub fn handshake(&self, outcome: &'static str, reason: &'static str) {
        *lock(&self.handshakes).entry((outcome, reason)).or_default() += 1;
    }

    /// A switch to `coin` ended with `outcome` ("ok", "failed", "closed_btcagent",
    /// "no_sserver").
    pub fn switch(&self, coin: &str, outcome: &'static str) {
        *lock(&self.switches)
            .entry((coin.to_string(), outcome))
            .or_default() += 1;
    }

    /// A reconnect after a lost upstream ended with `outcome` ("ok" or "failed").
    pub fn reconnect(&self, outcome: &'static str) {
        *lock(&self.reconnects).entry(outcome).or_default() += 1;
    }

    /// A connection was refused at once (MaxSessions reached, or no free session ID).
    pub fn refused(&self) {
        self.refused_connections.fetch_add(1, Ordering::Relaxed);
    }

    /// A line of `bytes` bytes was relayed.
    pub fn relayed(&self, direction: Direction, bytes: usize) {
        let shard = &self.relayed[relayed_shard()];
        let (lines, total) = match direction {
            Direction::Upstream => (&shard.lines_up, &shard.bytes_up),
            Direction::Downstream => (&shard.lines_down, &shard.bytes_down),
        };
        lines.fetch_add(1, Ordering::Relaxed);
        total.fetch_add(bytes as u64, Ordering::Relaxed);
    }

    /// The text exposition.
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(4096);
        fn family(out: &mut String, name: &str, kind: &str, help: &str) {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        }
        family(
            &mut out,
            "switchyard_proxy_sessions",
            "gauge",
            "Miner sessions by coin (empty before the login) and state.",
        );
        for ((coin, state), n) in lock(&self.sessions).iter() {
            let _ = writeln!(
                out,
                "switchyard_proxy_sessions{{coin=\"{coin}\",state=\"{}\"}} {n}",
                state.label()
            );
        }
        family(
            &mut out,
            "switchyard_proxy_handshakes_total",
            "counter",
            "Handshakes by outcome and reason.",
        );
        for ((outcome, reason), n) in lock(&self.handshakes).iter() {
            let _ = writeln!(
                out,
                "switchyard_proxy_handshakes_total{{outcome=\"{outcome}\",reason=\"{reason}\"}} {n}"
            );
        }
        family(
            &mut out,
            "switchyard_proxy_switches_total",
            "counter",
            "Session switches by target coin and outcome.",
        );
        for ((coin, outcome), n) in lock(&self.switches).iter() {
            let _ = writeln!(
                out,
                "switchyard_proxy_switches_total{{coin=\"{coin}\",outcome=\"{outcome}\"}} {n}"
            );
        }
        family(
            &mut out,
            "switchyard_proxy_reconnects_total",
            "counter",
            "Reconnects after a lost sserver, by outcome.",
        );
        for (outcome, n) in lock(&self.reconnects).iter() {
            let _ = writeln!(
                out,
                "switchyard_proxy_reconnects_total{{outcome=\"{outcome}\"}} {n}"
            );
        }
        if let Some(lookups) = lock(&self.lookups).clone() {
            let counts = lookups.counts();
            family(
                &mut out,
                "switchyard_proxy_user_lookups_total",
                "counter",
                "Read-through lookups of users the cache did not know, by outcome (found, \
                 unknown, known_unknown: remembered as unknown, busy: no turn free, failed, off).",
            );
            for (outcome, n) in counts.by_outcome() {
                let _ = writeln!(
                    out,
                    "switchyard_proxy_user_lookups_total{{outcome=\"{outcome}\"}} {n}"
                );
            }
            family(
                &mut out,
                "switchyard_proxy_user_lookups_asked_total",
                "counter",
                "Read-through lookups that reached the control plane (each one store read there).",
            );
            let _ = writeln!(
                out,
                "switchyard_proxy_user_lookups_asked_total {}",
                counts.asked.load(Ordering::Relaxed)
            );
            family(
                &mut out,
                "switchyard_proxy_user_lookups_peak_in_flight",
                "gauge",
                "The most read-through lookups in flight at once since start (ReadThroughMaxInFlight bounds it).",
            );
            let _ = writeln!(
                out,
                "switchyard_proxy_user_lookups_peak_in_flight {}",
                counts.peak_in_flight.load(Ordering::Relaxed)
            );
        }
        let mut simple = |name: &str, kind: &str, help: &str, samples: &[(&str, u64)]| {
            family(&mut out, name, kind, help);
            for (labels, v) in samples {
                let _ = writeln!(out, "{name}{labels} {v}");
            }
        };
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let relayed = |a: fn(&RelayedShard) -> &AtomicU64| {
            self.relayed
                .iter()
                .map(|shard| a(shard).load(Ordering::Relaxed))
                .fold(0u64, u64::wrapping_add)
        };
        simple(
            "switchyard_proxy_lines_relayed_total",
            "counter",
            "Lines relayed, by direction.",
            &[
                ("{direction=\"upstream\"}", relayed(|s| &s.lines_up)),
                ("{direction=\"downstream\"}", relayed(|s| &s.lines_down)),
            ],
        );
        simple(
            "switchyard_proxy_bytes_relayed_total",
            "counter",
            "Bytes relayed, by direction.",
            &[
                ("{direction=\"upstream\"}", relayed(|s| &s.bytes_up)),
                ("{direction=\"downstream\"}", relayed(|s| &s.bytes_down)),
            ],
        );
        simple(
            "switchyard_proxy_refused_connections_total",
            "counter",
            "Connections closed at once: MaxSessions reached or no free session ID.",
            &[("", load(&self.refused_connections))],
        );
        simple(
            "switchyard_proxy_server_id",
            "gauge",
            "The server ID new sessions are numbered under.",
            &[("", load(&self.server_id))],
        );
        if let Some(cache) = lock(&self.cache).clone() {
            let applied = cache.revision();
            let announced = cache.announced_revision().max(applied);
            simple(
                "switchyard_proxy_cache_revision",
                "gauge",
                "The control-plane revision the local cache has applied.",
                &[("", applied)],
            );
            simple(
                "switchyard_proxy_cache_lag_revisions",
                "gauge",
                "How far the cache is behind the newest revision the control plane announced.",
                &[("", announced - applied)],
            );
            simple(
                "switchyard_proxy_cache_users",
                "gauge",
                "Users in the local cache.",
                &[("", cache.user_count() as u64)],
            );
            simple(
                "switchyard_proxy_cache_watched_users",
                "gauge",
                "Users with live sessions (entries of the per-user index).",
                &[("", cache.watched_user_count() as u64)],
            );
            simple(
                "switchyard_proxy_control_connected",
                "gauge",
                "1 while a WatchSwitches stream is up.",
                &[("", u64::from(cache.is_connected()))],
            );
            simple(
                "switchyard_proxy_control_stream_starts_total",
                "counter",
                "WatchSwitches streams opened (the first, then each reconnect).",
                &[("", cache.connects())],
            );
            simple(
                "switchyard_proxy_cache_snapshots_total",
                "counter",
                "Full snapshots applied (the first sync, then each time a stream could not \
                 resume from the cache's revision). A restart from the cache file resumes.",
                &[("", cache.snapshots_applied())],
            );
        }
        out
    }
}

async fn metrics_page(State(metrics): State<Arc<Metrics>>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        metrics.render(),
    )
}

/// Serves `GET /metrics` on `addr` until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/metrics", get(metrics_page))
        .with_state(metrics);
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
}

/// Binds the metrics endpoint.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}
