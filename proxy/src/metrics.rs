//! The proxy's metrics, exposed on `GET /metrics` in the OpenMetrics text format through the
//! `prometheus-client` crate: typed families in a registry of the proxy's own (no global one),
//! label values escaped ([`Escaped`]: the crate writes them as they are).
//!
//! **Names.** Counters are registered without `_total`, which the encoder appends, so the
//! exposed names are the ones operators and the alert rules know
//! (`switchyard_proxy_switches_total`, ...). docs/operations.md ("4. Metrics") lists every
//! series with its meaning.
//!
//! **The hot path.** A relayed line costs two relaxed atomic adds on a counter of the calling
//! thread ([`Metrics::relayed`], summed at scrape). A submit and its answer cost no label
//! formatting and no map lookup: each upstream of a session holds its coin's
//! [`CoinMetrics`], whose series are resolved once at start for every configured coin (one
//! atomic add per share outcome, one histogram observation per answer, both on the calling
//! thread's shard: [`ShardedCounter`], [`ShardedHistogram`]). Figures that other
//! parts already keep (sessions by state, the cache, the read-through) are read at scrape by a
//! collector.
//!
//! **Histogram buckets**, chosen for what each one times:
//!
//! - `handshake_duration_seconds` (TCP accept → the miner's authorize answered): a login is a
//!   cache lookup plus an sserver connect and login on the pool's network (a few round trips:
//!   milliseconds), but may wait for a read-through or an auto-registration (seconds, up to
//!   `HandshakeTimeoutSeconds`). 1 ms to 30 s.
//! - `upstream_connect_duration_seconds` (connect + subscribe + authorize answered): two or
//!   three round trips to an sserver nearby, 0.5 ms and up; the connect and handshake
//!   timeouts bound it at seconds. 0.5 ms to 10 s.
//! - `switch_duration_seconds` (the cache learning the new coin → its first job at the miner):
//!   one upstream open plus the first job, milliseconds for one user; a mass switch opens
//!   thousands at once and its tail is seconds (docs/benchmarks.md, part 4). 1 ms to 30 s.
//! - `submit_duration_seconds` (a submit's round trip through the proxy): an sserver on the
//!   same network answers in well under a millisecond to a few, a loaded one in tens or
//!   hundreds; beyond 2 s the miner has long moved on. 0.5 ms to 2 s, finer at the low end.

#![forbid(unsafe_code)]

use std::{
    collections::{BTreeMap, HashMap},
    fmt,
    net::SocketAddr,
    sync::{
        Arc, Mutex, OnceLock,
        atomic::{AtomicU64, Ordering},
    },
};

use axum::{Router, extract::State, http::header, response::IntoResponse, routing::get};
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric, MetricEncoder, NoLabelSet},
    metrics::{
        MetricType, TypedMetric, counter::ConstCounter, counter::Counter, family::Family,
        gauge::ConstGauge, gauge::Gauge, histogram::Histogram,
    },
    registry::Registry,
};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::{cache::UserCoinCache, lookup::UserLookups};

/// The content type of `GET /metrics`.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Buckets of `switchyard_proxy_handshake_duration_seconds` (see the module doc).
const HANDSHAKE_BUCKETS: [f64; 14] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// Buckets of `switchyard_proxy_upstream_connect_duration_seconds` (see the module doc).
const CONNECT_BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Buckets of `switchyard_proxy_switch_duration_seconds` (see the module doc).
const SWITCH_BUCKETS: [f64; 14] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// Buckets of `switchyard_proxy_submit_duration_seconds` (see the module doc).
const SUBMIT_BUCKETS: [f64; 13] = [
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 1.5, 2.0,
];

/// The sserver error codes counted under their own number in
/// `switchyard_proxy_share_rejects_total` (btcpool's 20 to 35: other, job not found (stale),
/// duplicate, low difficulty, unauthorized, not subscribed, illegal method, illegal params, IP
/// banned, invalid username, internal error, time too old, time too new, illegal version mask,
/// invalid solution, wrong nonce prefix); any other code, or none, is `other`.
const KNOWN_REJECT_CODES: std::ops::RangeInclusive<i64> = 20..=35;

/// The code label of each known reject code, then `other`.
const REJECT_CODE_LABELS: [&str; 17] = [
    "20", "21", "22", "23", "24", "25", "26", "27", "28", "29", "30", "31", "32", "33", "34", "35",
    "other",
];

/// The sserver's "job not found" code: the share was stale.
pub const STALE_CODE: i64 = 21;

pub use switchyard_cli::metrics::Escaped;

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

/// What became of a share (`switchyard_proxy_shares_total{outcome}`): each share the miner
/// submits is counted once, when it ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShareOutcome {
    /// The sserver accepted it.
    Accepted,
    /// The sserver rejected it (any code but job-not-found).
    Rejected,
    /// The sserver rejected it as stale (job not found: a job it no longer has, or one of an
    /// old coin whose upstream is gone).
    Stale,
    /// It named a job of a drained upstream (an old coin after a switch) and went there; its
    /// answer, whatever it said, came from that upstream.
    Draining,
    /// No answer came before its upstream or the session ended (the proxy answered the miner
    /// with an error itself).
    Unanswered,
}

impl ShareOutcome {
    /// Every outcome.
    pub const ALL: [ShareOutcome; 5] = [
        Self::Accepted,
        Self::Rejected,
        Self::Stale,
        Self::Draining,
        Self::Unanswered,
    ];

    fn label(self) -> &'static str {
        match self {
            Self::Accepted => "accepted",
            Self::Rejected => "rejected",
            Self::Stale => "stale",
            Self::Draining => "draining",
            Self::Unanswered => "unanswered",
        }
    }
}

/// Why an upstream connection failed (`switchyard_proxy_upstream_failures_total{reason}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamFailure {
    /// The TCP connect failed or timed out.
    Connect,
    /// The TLS handshake with the sserver failed.
    Tls,
    /// The sserver's login went wrong: closed, refused, a bad or wrong answer.
    Handshake,
    /// A relaying connection was lost.
    Closed,
    /// The sserver's login answers did not all come in time.
    Timeout,
}

impl UpstreamFailure {
    const ALL: [UpstreamFailure; 5] = [
        Self::Connect,
        Self::Tls,
        Self::Handshake,
        Self::Closed,
        Self::Timeout,
    ];

    fn label(self) -> &'static str {
        match self {
            Self::Connect => "connect",
            Self::Tls => "tls",
            Self::Handshake => "handshake",
            Self::Closed => "closed",
            Self::Timeout => "timeout",
        }
    }
}

/// Why a session closed (`switchyard_proxy_sessions_closed_total{reason}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// The miner closed the connection (or stopped reading it).
    MinerClosed,
    /// The sserver could not be reached or kept, at login, on a switch or a reconnect.
    UpstreamLost,
    /// The miner sent nothing in time (first byte, handshake).
    Idle,
    /// The miner broke the protocol: not JSON, a line over the bound.
    ProtocolError,
    /// The proxy stopped.
    Shutdown,
    /// Anything else: refused logins, BTCAgent sessions closed on a switch, ...
    Other,
}

impl CloseReason {
    const ALL: [CloseReason; 6] = [
        Self::MinerClosed,
        Self::UpstreamLost,
        Self::Idle,
        Self::ProtocolError,
        Self::Shutdown,
        Self::Other,
    ];

    fn label(self) -> &'static str {
        match self {
            Self::MinerClosed => "miner_closed",
            Self::UpstreamLost => "upstream_lost",
            Self::Idle => "idle",
            Self::ProtocolError => "protocol_error",
            Self::Shutdown => "shutdown",
            Self::Other => "other",
        }
    }

    fn index(self) -> usize {
        Self::ALL.iter().position(|r| *r == self).unwrap_or(0)
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    component: &'static str,
    version: &'static str,
    git_commit: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ServerIdLabels {
    server_id: u8,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HandshakeLabels {
    outcome: &'static str,
    reason: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CoinOutcomeLabels {
    coin: Escaped<String>,
    outcome: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CoinLabels {
    coin: Escaped<String>,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CoinCodeLabels {
    coin: Escaped<String>,
    code: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CoinReasonLabels {
    coin: Escaped<String>,
    reason: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DirectionLabels {
    direction: &'static str,
}

/// A histogram family whose histograms all have the same buckets.
type HistogramFamily<S> = Family<S, Histogram, fn() -> Histogram>;

fn connect_histogram() -> Histogram {
    Histogram::new(CONNECT_BUCKETS)
}

fn switch_histogram() -> Histogram {
    Histogram::new(SWITCH_BUCKETS)
}

fn submit_histogram() -> ShardedHistogram {
    ShardedHistogram::new(&SUBMIT_BUCKETS)
}

/// A counter counted on every share: per thread (like the relayed lines), so the worker
/// threads do not pass one cache line back and forth; read as the sum.
#[derive(Debug, Clone, Default)]
pub struct ShardedCounter(Arc<[PaddedU64; SHARDS]>);

/// One thread's count, alone on its cache lines.
#[derive(Debug, Default)]
#[repr(align(128))]
struct PaddedU64(AtomicU64);

impl ShardedCounter {
    fn inc(&self) {
        self.0[thread_shard()].0.fetch_add(1, Ordering::Relaxed);
    }

    fn get(&self) -> u64 {
        self.0.iter().map(|c| c.0.load(Ordering::Relaxed)).sum()
    }
}

impl TypedMetric for ShardedCounter {
    const TYPE: MetricType = MetricType::Counter;
}

impl EncodeMetric for ShardedCounter {
    fn encode(&self, mut encoder: MetricEncoder) -> fmt::Result {
        encoder.encode_counter::<NoLabelSet, _, u64>(&self.get(), None)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

/// A histogram observed on every answered share: per thread, like [`ShardedCounter`] (the
/// library's histogram takes a write lock per observation, shared by all threads). Encoded
/// as one histogram, the shards summed.
#[derive(Debug, Clone)]
pub struct ShardedHistogram {
    /// The buckets' upper bounds (the last, `+Inf`, implied).
    bounds: &'static [f64],
    shards: Arc<[HistogramShard]>,
}

/// One thread's observations: the sum (an `f64`'s bits), the count and a count per bucket
/// (the last for `+Inf`).
#[derive(Debug)]
#[repr(align(128))]
struct HistogramShard {
    sum: AtomicU64,
    count: AtomicU64,
    buckets: Box<[AtomicU64]>,
}

impl ShardedHistogram {
    /// A histogram with these upper bounds (ascending).
    fn new(bounds: &'static [f64]) -> Self {
        let shards = (0..SHARDS)
            .map(|_| HistogramShard {
                sum: AtomicU64::new(0f64.to_bits()),
                count: AtomicU64::new(0),
                buckets: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            })
            .collect();
        Self { bounds, shards }
    }

    /// Counts one observation of `v`.
    pub fn observe(&self, v: f64) {
        let shard = &self.shards[thread_shard()];
        let bucket = self
            .bounds
            .iter()
            .position(|b| v <= *b)
            .unwrap_or(self.bounds.len());
        shard.buckets[bucket].fetch_add(1, Ordering::Relaxed);
        shard.count.fetch_add(1, Ordering::Relaxed);
        // One thread writes its shard nearly always: the update does not loop.
        let _ = shard
            .sum
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |bits| {
                Some((f64::from_bits(bits) + v).to_bits())
            });
    }

    /// The sum, the count, and the count per bucket (upper bound, count; not cumulative).
    fn get(&self) -> (f64, u64, Vec<(f64, u64)>) {
        let mut sum = 0.0;
        let mut count = 0;
        let mut buckets: Vec<(f64, u64)> = self
            .bounds
            .iter()
            .copied()
            .chain(std::iter::once(f64::MAX))
            .map(|b| (b, 0))
            .collect();
        for shard in self.shards.iter() {
            sum += f64::from_bits(shard.sum.load(Ordering::Relaxed));
            count += shard.count.load(Ordering::Relaxed);
            for (slot, n) in buckets.iter_mut().zip(shard.buckets.iter()) {
                slot.1 += n.load(Ordering::Relaxed);
            }
        }
        (sum, count, buckets)
    }
}

impl TypedMetric for ShardedHistogram {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for ShardedHistogram {
    fn encode(&self, mut encoder: MetricEncoder) -> fmt::Result {
        let (sum, count, buckets) = self.get();
        encoder.encode_histogram::<NoLabelSet>(sum, count, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

/// One coin's series, resolved once (see the module doc): what a session's upstream of that
/// coin counts on.
#[derive(Debug)]
pub struct CoinMetrics {
    coin: String,
    shares: [ShardedCounter; 5],
    failures: [Counter; 5],
    rejects_family: Family<CoinCodeLabels, Counter>,
    /// Per known code (then `other`), resolved at the first rejection with it: the family
    /// shows only the codes seen.
    rejects: [OnceLock<Counter>; 17],
    submit: ShardedHistogram,
    switch: Histogram,
    connect: Histogram,
}

impl CoinMetrics {
    /// A share ended with `outcome`.
    pub fn share(&self, outcome: ShareOutcome) {
        let i = ShareOutcome::ALL
            .iter()
            .position(|o| *o == outcome)
            .unwrap_or(0);
        self.shares[i].inc();
    }

    /// Shares counted with `outcome` so far.
    pub fn shares(&self, outcome: ShareOutcome) -> u64 {
        let i = ShareOutcome::ALL
            .iter()
            .position(|o| *o == outcome)
            .unwrap_or(0);
        self.shares[i].get()
    }

    /// The sserver rejected a share with `code` (`None`: the answer carried no code).
    pub fn reject(&self, code: Option<i64>) {
        let slot = code
            .filter(|c| KNOWN_REJECT_CODES.contains(c))
            .map_or(REJECT_CODE_LABELS.len() - 1, |c| {
                (c - KNOWN_REJECT_CODES.start()) as usize
            });
        self.rejects[slot]
            .get_or_init(|| {
                self.rejects_family.get_or_create_owned(&CoinCodeLabels {
                    coin: Escaped(self.coin.clone()),
                    code: REJECT_CODE_LABELS[slot],
                })
            })
            .inc();
    }

    /// An upstream connection of this coin failed.
    pub fn upstream_failure(&self, reason: UpstreamFailure) {
        let i = UpstreamFailure::ALL
            .iter()
            .position(|r| *r == reason)
            .unwrap_or(0);
        self.failures[i].inc();
    }

    /// A submit's round trip through the proxy, in seconds.
    pub fn submit_took(&self, seconds: f64) {
        self.submit.observe(seconds);
    }

    /// A switch to this coin, from the cache learning it to its first job at the miner.
    pub fn switch_took(&self, seconds: f64) {
        self.switch.observe(seconds);
    }

    /// An upstream of this coin connected and logged in, in seconds.
    pub fn connect_took(&self, seconds: f64) {
        self.connect.observe(seconds);
    }
}

/// What the collector reads at scrape: figures kept elsewhere, or kept here outside the typed
/// families because they are read back (sessions) or counted per thread (relayed lines).
#[derive(Default)]
struct Live {
    sessions: Mutex<BTreeMap<(String, SessionState), i64>>,
    /// Lines and bytes relayed, per thread: counted on every line, so each worker thread
    /// counts on a cache line of its own instead of all of them on one.
    relayed: [RelayedShard; SHARDS],
    cache: Mutex<Option<Arc<UserCoinCache>>>,
    lookups: Mutex<Option<Arc<UserLookups>>>,
}

impl fmt::Debug for Live {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Live").finish_non_exhaustive()
    }
}

/// How many shards each per-thread series has ([`RelayedShard`], [`ShardedCounter`],
/// [`ShardedHistogram`]); threads beyond it share them.
const SHARDS: usize = 16;

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
fn thread_shard() -> usize {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    thread_local! {
        static SHARD: usize = (NEXT.fetch_add(1, Ordering::Relaxed) as usize) % SHARDS;
    }
    SHARD.with(|s| *s)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Encodes one unlabelled gauge.
fn gauge(encoder: &mut DescriptorEncoder, name: &str, help: &str, v: i64) -> fmt::Result {
    let metric = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
    ConstGauge::new(v).encode(metric)
}

/// Encodes one unlabelled counter (`name` without `_total`).
fn counter(encoder: &mut DescriptorEncoder, name: &str, help: &str, v: u64) -> fmt::Result {
    let metric = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
    ConstCounter::new(v).encode(metric)
}

fn as_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

impl Collector for Live {
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        {
            let mut family = encoder.encode_descriptor(
                "switchyard_proxy_sessions",
                "Miner sessions by coin (empty before the login) and state.",
                None,
                MetricType::Gauge,
            )?;
            for ((coin, state), n) in lock(&self.sessions).iter() {
                let labels = (
                    [("coin", Escaped(coin.as_str()))],
                    [("state", state.label())],
                );
                ConstGauge::new(*n).encode(family.encode_family(&labels)?)?;
            }
        }
        if let Some(lookups) = lock(&self.lookups).clone() {
            let counts = lookups.counts();
            {
                let mut family = encoder.encode_descriptor(
                    "switchyard_proxy_user_lookups",
                    "Read-through lookups of users the cache did not know, by outcome (found, \
                     unknown, known_unknown: remembered as unknown, busy: no turn free, failed, off).",
                    None,
                    MetricType::Counter,
                )?;
                for (outcome, n) in counts.by_outcome() {
                    ConstCounter::new(n)
                        .encode(family.encode_family(&OutcomeLabels { outcome })?)?;
                }
            }
            counter(
                &mut encoder,
                "switchyard_proxy_user_lookups_asked",
                "Read-through lookups that reached the control plane (each one store read there).",
                counts.asked.load(Ordering::Relaxed),
            )?;
            gauge(
                &mut encoder,
                "switchyard_proxy_user_lookups_peak_in_flight",
                "The most read-through lookups in flight at once since start (ReadThroughMaxInFlight bounds it).",
                as_i64(counts.peak_in_flight.load(Ordering::Relaxed)),
            )?;
        }
        let relayed = |a: fn(&RelayedShard) -> &AtomicU64| {
            self.relayed
                .iter()
                .map(|shard| a(shard).load(Ordering::Relaxed))
                .fold(0u64, u64::wrapping_add)
        };
        for (name, help, up, down) in [
            (
                "switchyard_proxy_lines_relayed",
                "Lines relayed, by direction.",
                relayed(|s| &s.lines_up),
                relayed(|s| &s.lines_down),
            ),
            (
                "switchyard_proxy_bytes_relayed",
                "Bytes relayed, by direction.",
                relayed(|s| &s.bytes_up),
                relayed(|s| &s.bytes_down),
            ),
        ] {
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            for (direction, v) in [("upstream", up), ("downstream", down)] {
                ConstCounter::new(v)
                    .encode(family.encode_family(&DirectionLabels { direction })?)?;
            }
        }
        if let Some(cache) = lock(&self.cache).clone() {
            let applied = cache.revision();
            let announced = cache.announced_revision().max(applied);
            gauge(
                &mut encoder,
                "switchyard_proxy_cache_revision",
                "The control-plane revision the local cache has applied.",
                as_i64(applied),
            )?;
            gauge(
                &mut encoder,
                "switchyard_proxy_cache_lag_revisions",
                "How far the cache is behind the newest revision the control plane announced.",
                as_i64(announced - applied),
            )?;
            gauge(
                &mut encoder,
                "switchyard_proxy_cache_users",
                "Users in the local cache.",
                as_i64(cache.user_count() as u64),
            )?;
            gauge(
                &mut encoder,
                "switchyard_proxy_cache_watched_users",
                "Users with live sessions (entries of the per-user index).",
                as_i64(cache.watched_user_count() as u64),
            )?;
            gauge(
                &mut encoder,
                "switchyard_proxy_control_connected",
                "1 while a WatchSwitches stream is up.",
                i64::from(cache.is_connected()),
            )?;
            counter(
                &mut encoder,
                "switchyard_proxy_control_stream_starts",
                "WatchSwitches streams opened (the first, then each reconnect).",
                cache.connects(),
            )?;
            counter(
                &mut encoder,
                "switchyard_proxy_cache_snapshots",
                "Full snapshots applied (the first sync, then each time a stream could not \
                 resume from the cache's revision). A restart from the cache file resumes.",
                cache.snapshots_applied(),
            )?;
        }
        Ok(())
    }
}

/// The proxy's metrics; see the module doc.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    live: Arc<Live>,
    handshakes: Family<HandshakeLabels, Counter>,
    switches: Family<CoinOutcomeLabels, Counter>,
    reconnects: Family<OutcomeLabels, Counter>,
    refused_connections: Counter,
    server_id: Gauge,
    server_id_info: Family<ServerIdLabels, Gauge>,
    /// The server ID `server_id_info` shows (one series at a time).
    shown_server_id: Mutex<Option<u8>>,
    handshake_duration: Histogram,
    sessions_closed: [Counter; 6],
    lease_conflicts: Counter,
    coins: HashMap<String, Arc<CoinMetrics>>,
}

impl Metrics {
    /// Fresh metrics for a proxy serving `coins` (the coins of `StratumServerMap`): their
    /// series are made at once, at zero.
    pub fn new<S: AsRef<str>>(coins: impl IntoIterator<Item = S>) -> Arc<Self> {
        let mut registry = Registry::default();
        let build_info = Family::<BuildLabels, Gauge>::default();
        build_info
            .get_or_create(&BuildLabels {
                component: "proxy",
                version: switchyard_cli::build::VERSION,
                git_commit: switchyard_cli::build::GIT_COMMIT,
            })
            .set(1);
        registry.register(
            "switchyard_build_info",
            "The build of this binary: its version and git commit (always 1)",
            build_info,
        );
        let server_id = Gauge::default();
        registry.register(
            "switchyard_proxy_server_id",
            "The server ID new sessions are numbered under",
            server_id.clone(),
        );
        let server_id_info = Family::<ServerIdLabels, Gauge>::default();
        registry.register(
            "switchyard_proxy_server_id_info",
            "The server ID new sessions are numbered under, as a label (always 1)",
            server_id_info.clone(),
        );
        let handshakes = Family::<HandshakeLabels, Counter>::default();
        registry.register(
            "switchyard_proxy_handshakes",
            "Handshakes by outcome and reason",
            handshakes.clone(),
        );
        let handshake_duration = Histogram::new(HANDSHAKE_BUCKETS);
        registry.register(
            "switchyard_proxy_handshake_duration_seconds",
            "Successful logins, from the TCP accept to the miner's authorize answered",
            handshake_duration.clone(),
        );
        let switches = Family::<CoinOutcomeLabels, Counter>::default();
        registry.register(
            "switchyard_proxy_switches",
            "Session switches by target coin and outcome",
            switches.clone(),
        );
        let reconnects = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "switchyard_proxy_reconnects",
            "Reconnects after a lost sserver, by outcome",
            reconnects.clone(),
        );
        let refused_connections = Counter::default();
        registry.register(
            "switchyard_proxy_refused_connections",
            "Connections closed at once: MaxSessions reached or no free session ID",
            refused_connections.clone(),
        );
        let closed_family = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "switchyard_proxy_sessions_closed",
            "Sessions that ended, by reason (a session handed to a hot upgrade did not end)",
            closed_family.clone(),
        );
        let sessions_closed = CloseReason::ALL.map(|reason| {
            closed_family.get_or_create_owned(&ReasonLabels {
                reason: reason.label(),
            })
        });
        let lease_conflicts = Counter::default();
        registry.register(
            "switchyard_proxy_lease_conflicts",
            "Times this proxy's leased server ID was found taken by another proxy (it then \
             numbers new sessions under another ID)",
            lease_conflicts.clone(),
        );

        let shares = Family::<CoinOutcomeLabels, ShardedCounter>::default();
        registry.register(
            "switchyard_proxy_shares",
            "Shares by coin and outcome, each counted once when it ends: accepted, rejected, \
             stale (job not found), draining (sent to an old coin's upstream after a switch), \
             unanswered",
            shares.clone(),
        );
        let rejects = Family::<CoinCodeLabels, Counter>::default();
        registry.register(
            "switchyard_proxy_share_rejects",
            "Shares the sserver rejected, by coin and error code (20 to 35, else other)",
            rejects.clone(),
        );
        let failures = Family::<CoinReasonLabels, Counter>::default();
        registry.register(
            "switchyard_proxy_upstream_failures",
            "Failed sserver connections by coin and reason: connect, tls, handshake, timeout \
             (opening), closed (lost while relaying)",
            failures.clone(),
        );
        let connect: HistogramFamily<CoinLabels> = Family::new_with_constructor(connect_histogram);
        registry.register(
            "switchyard_proxy_upstream_connect_duration_seconds",
            "sserver connections opened, from the connect to the authorize answered, by coin",
            connect.clone(),
        );
        let switch: HistogramFamily<CoinLabels> = Family::new_with_constructor(switch_histogram);
        registry.register(
            "switchyard_proxy_switch_duration_seconds",
            "Session switches, from the cache learning the user's new coin to that coin's first \
             job written to the miner, by new coin",
            switch.clone(),
        );
        let submit: Family<CoinLabels, ShardedHistogram, fn() -> ShardedHistogram> =
            Family::new_with_constructor(submit_histogram);
        registry.register(
            "switchyard_proxy_submit_duration_seconds",
            "Answered submits' round trip through the proxy, from the miner's line read to the \
             answer written, by coin",
            submit.clone(),
        );

        let coins = coins
            .into_iter()
            .map(|coin| {
                let coin = coin.as_ref().to_string();
                let label = || CoinLabels {
                    coin: Escaped(coin.clone()),
                };
                let metrics = CoinMetrics {
                    shares: ShareOutcome::ALL.map(|o| {
                        shares.get_or_create_owned(&CoinOutcomeLabels {
                            coin: Escaped(coin.clone()),
                            outcome: o.label(),
                        })
                    }),
                    failures: UpstreamFailure::ALL.map(|r| {
                        failures.get_or_create_owned(&CoinReasonLabels {
                            coin: Escaped(coin.clone()),
                            reason: r.label(),
                        })
                    }),
                    rejects_family: rejects.clone(),
                    rejects: Default::default(),
                    submit: submit.get_or_create_owned(&label()),
                    switch: switch.get_or_create_owned(&label()),
                    connect: connect.get_or_create_owned(&label()),
                    coin: coin.clone(),
                };
                (coin, Arc::new(metrics))
            })
            .collect();

        let live = Arc::new(Live::default());
        registry.register_collector(Box::new(Arc::clone(&live)));
        Arc::new(Self {
            registry,
            live,
            handshakes,
            switches,
            reconnects,
            refused_connections,
            server_id,
            server_id_info,
            shown_server_id: Mutex::new(None),
            handshake_duration,
            sessions_closed,
            lease_conflicts,
            coins,
        })
    }

    /// The series of `coin`, when the proxy serves it.
    pub fn coin(&self, coin: &str) -> Option<Arc<CoinMetrics>> {
        self.coins.get(coin).cloned()
    }

    /// Reports the cache's feed figures too.
    pub fn watch_cache(&self, cache: Arc<UserCoinCache>) {
        *lock(&self.live.cache) = Some(cache);
    }

    /// Reports the read-through's figures too.
    pub fn watch_lookups(&self, lookups: Arc<UserLookups>) {
        *lock(&self.live.lookups) = Some(lookups);
    }

    /// Records the server ID in use.
    pub fn set_server_id(&self, id: u8) {
        self.server_id.set(i64::from(id));
        let mut shown = lock(&self.shown_server_id);
        if *shown != Some(id) {
            if let Some(old) = shown.replace(id) {
                self.server_id_info
                    .remove(&ServerIdLabels { server_id: old });
            }
            self.server_id_info
                .get_or_create(&ServerIdLabels { server_id: id })
                .set(1);
        }
    }

    /// The leased server ID was found taken by another proxy.
    pub fn lease_conflict(&self) {
        self.lease_conflicts.inc();
    }

    /// A session moved from `from` to `to` (either may be `None`: born, ended).
    pub fn session_moved(
        &self,
        from: Option<(&str, SessionState)>,
        to: Option<(&str, SessionState)>,
    ) {
        let mut sessions = lock(&self.live.sessions);
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
    pub fn sessions_by_coin(&self) -> HashMap<String, u64> {
        let mut by_coin = HashMap::new();
        for ((coin, state), n) in lock(&self.live.sessions).iter() {
            if *state != SessionState::Handshake && !coin.is_empty() && *n > 0 {
                *by_coin.entry(coin.clone()).or_default() += *n as u64;
            }
        }
        by_coin
    }

    /// The number of sessions in every state.
    pub fn session_count(&self) -> i64 {
        lock(&self.live.sessions).values().sum()
    }

    /// A handshake ended: `outcome` "ok" or "failed", with a reason label.
    pub fn handshake(&self, outcome: &'static str, reason: &'static str) {
        self.handshakes
            .get_or_create(&HandshakeLabels { outcome, reason })
            .inc();
    }

    /// A login succeeded `seconds` after the TCP accept.
    pub fn handshake_took(&self, seconds: f64) {
        self.handshake_duration.observe(seconds);
    }

    /// A switch to `coin` ended with `outcome` ("ok", "failed", "closed_btcagent",
    /// "no_sserver", "cancelled").
    pub fn switch(&self, coin: &str, outcome: &'static str) {
        self.switches
            .get_or_create(&CoinOutcomeLabels {
                coin: Escaped(coin.to_string()),
                outcome,
            })
            .inc();
    }

    /// A reconnect after a lost upstream ended with `outcome` ("ok" or "failed").
    pub fn reconnect(&self, outcome: &'static str) {
        self.reconnects
            .get_or_create(&OutcomeLabels { outcome })
            .inc();
    }

    /// A connection was refused at once (MaxSessions reached, or no free session ID).
    pub fn refused(&self) {
        self.refused_connections.inc();
    }

    /// A session ended.
    pub fn session_closed(&self, reason: CloseReason) {
        self.sessions_closed[reason.index()].inc();
    }

    /// A line of `bytes` bytes was relayed.
    pub fn relayed(&self, direction: Direction, bytes: usize) {
        let shard = &self.live.relayed[thread_shard()];
        let (lines, total) = match direction {
            Direction::Upstream => (&shard.lines_up, &shard.bytes_up),
            Direction::Downstream => (&shard.lines_down, &shard.bytes_down),
        };
        lines.fetch_add(1, Ordering::Relaxed);
        total.fetch_add(bytes as u64, Ordering::Relaxed);
    }

    /// The OpenMetrics text exposition.
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(8192);
        // Writing to a String does not fail; an encoder error would leave the text cut short,
        // which a scrape reports.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

async fn metrics_page(State(metrics): State<Arc<Metrics>>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, CONTENT_TYPE)], metrics.render())
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sharded_series_read_as_the_library_ones() {
        // Powers of two: their sums are exact in any order, whichever shards they fall in.
        let values = [0.0009765625, 0.001953125, 0.001953125, 0.25, 8.0, 1024.0];
        let mut ours = Registry::default();
        let mut theirs = Registry::default();
        let histogram = ShardedHistogram::new(&SUBMIT_BUCKETS);
        let library = Histogram::new(SUBMIT_BUCKETS);
        let counter = ShardedCounter::default();
        let library_counter: Counter = Counter::default();
        // From several threads, so that several shards hold observations.
        std::thread::scope(|scope| {
            for chunk in values.chunks(2) {
                let (histogram, counter) = (histogram.clone(), counter.clone());
                scope.spawn(move || {
                    for v in chunk {
                        histogram.observe(*v);
                        counter.inc();
                    }
                });
            }
        });
        for v in values {
            library.observe(v);
            library_counter.inc();
        }
        ours.register("h", "a histogram", histogram);
        ours.register("c", "a counter", counter);
        theirs.register("h", "a histogram", library);
        theirs.register("c", "a counter", library_counter);
        let text = |registry: &Registry| {
            let mut out = String::new();
            prometheus_client::encoding::text::encode(&mut out, registry).expect("encodes");
            out
        };
        assert_eq!(text(&ours), text(&theirs));
        assert!(text(&ours).contains("h_count 6"), "{}", text(&ours));
    }

    #[test]
    fn counters_keep_their_names_and_label_values_are_escaped() {
        let metrics = Metrics::new(["btc", "we\"ird\\coin"]);
        metrics.switch("bch", "ok");
        metrics.handshake("ok", "ok");
        metrics.refused();
        metrics.set_server_id(7);
        metrics.set_server_id(9);
        let text = metrics.render();
        for line in [
            "switchyard_proxy_switches_total{coin=\"bch\",outcome=\"ok\"} 1",
            "switchyard_proxy_handshakes_total{outcome=\"ok\",reason=\"ok\"} 1",
            "switchyard_proxy_refused_connections_total 1",
            "switchyard_proxy_server_id 9",
            "switchyard_proxy_server_id_info{server_id=\"9\"} 1",
            "switchyard_proxy_shares_total{coin=\"we\\\"ird\\\\coin\",outcome=\"accepted\"} 0",
            "# EOF",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} in\n{text}");
        }
        assert!(!text.contains("server_id=\"7\""), "{text}");
        assert!(
            text.contains(&format!(
                "switchyard_build_info{{component=\"proxy\",version=\"{}\",git_commit=\"{}\"}} 1",
                switchyard_cli::build::VERSION,
                switchyard_cli::build::GIT_COMMIT
            )),
            "{text}"
        );
    }

    #[test]
    fn rejects_show_the_codes_seen_and_other() {
        let metrics = Metrics::new(["btc"]);
        let btc = metrics.coin("btc").expect("btc");
        btc.reject(Some(21));
        btc.reject(Some(21));
        btc.reject(Some(999));
        btc.reject(None);
        btc.submit_took(0.0007);
        let text = metrics.render();
        assert!(
            text.contains("switchyard_proxy_share_rejects_total{coin=\"btc\",code=\"21\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("switchyard_proxy_share_rejects_total{coin=\"btc\",code=\"other\"} 2"),
            "{text}"
        );
        assert!(!text.contains("code=\"22\""), "{text}");
        assert!(
            text.contains(
                "switchyard_proxy_submit_duration_seconds_bucket{le=\"0.001\",coin=\"btc\"} 1"
            ),
            "{text}"
        );
    }
}
