//! The control service's metrics (issue 15): one [`ControlMetrics`] handle, created by the
//! server and passed to whoever counts, holding typed `prometheus-client` families (no global
//! registry), served as OpenMetrics text on `MetricsListenAddr` by [`endpoint`].
//!
//! Every series and its labels is the contract shared with the proxy, the dashboard and the
//! alert rules (docs/operations.md, "Metrics", "Control"). Label values are bounded sets: no
//! user names, no session IDs; coins only once the core has accepted them.
//!
//! Hot paths take pre-resolved handles: the switch counters are resolved once per (source,
//! outcome) at start, the store write histograms once per operation, the gRPC series once per
//! (method, code) on first use ([`grpc`]). Values that are state rather than events (held-back
//! switches, index revision and users, WatchSwitches subscribers and lag, store health) are
//! read when Prometheus scrapes ([`ScrapeState`]), not maintained on every change.

pub mod endpoint;
pub mod grpc;

use std::{
    collections::HashMap,
    fmt,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
};

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};

use switchyard_cli::metrics::Escaped;

use crate::store::Revision;

/// Where a switch came from (the `source` label of `switchyard_control_switches_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SwitchSource {
    /// `SwitcherAdmin.SwitchCoin` / `SwitchCoins`.
    Grpc,
    /// The HTTP switch API (`/switch`, the multi-user routes).
    Http,
    /// The scheduled user→coin pull (`EnableCronJob`).
    Cron,
    /// Auto-registration creating a user with `DefaultCoin`.
    AutoReg,
    /// A switch held back by the safety period, written when due.
    HeldBack,
    /// A change this replica did not write, seen on the store's change stream (another
    /// replica, the Go API server, zkCli).
    ZooKeeper,
}

impl SwitchSource {
    const ALL: [Self; 6] = [
        Self::Grpc,
        Self::Http,
        Self::Cron,
        Self::AutoReg,
        Self::HeldBack,
        Self::ZooKeeper,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Grpc => "grpc",
            Self::Http => "http",
            Self::Cron => "cron",
            Self::AutoReg => "autoreg",
            Self::HeldBack => "held_back",
            Self::ZooKeeper => "zookeeper",
        }
    }

    fn index(self) -> usize {
        self as usize
    }

    /// Whether a switch from this source can end as `outcome`: an auto-registration is never
    /// held back; a held-back switch when due is written or fails; a change seen on the stream
    /// was written.
    pub fn can_end_as(self, outcome: SwitchCount) -> bool {
        match self {
            Self::Grpc | Self::Http | Self::Cron => true,
            Self::AutoReg => outcome != SwitchCount::HeldBack,
            Self::HeldBack => matches!(outcome, SwitchCount::Written | SwitchCount::Failed),
            Self::ZooKeeper => outcome == SwitchCount::Written,
        }
    }
}

impl fmt::Display for SwitchSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What became of one asked switch (the `outcome` label of `switchyard_control_switches_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SwitchCount {
    /// Written to the store.
    Written,
    /// Held back by the safety period (recorded as pending).
    HeldBack,
    /// Refused: an invalid user name or a coin not in `AvailableCoins`.
    Invalid,
    /// The store could not write it.
    Failed,
}

impl SwitchCount {
    const ALL: [Self; 4] = [Self::Written, Self::HeldBack, Self::Invalid, Self::Failed];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Written => "written",
            Self::HeldBack => "held_back",
            Self::Invalid => "invalid",
            Self::Failed => "failed",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for SwitchCount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A timed store write (the `op` label of `switchyard_control_store_write_duration_seconds`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StoreOp {
    /// [`crate::store::UserCoinStore::write`]: switches.
    Write,
    /// [`crate::store::UserCoinStore::create_if_absent`]: ingestion, auto-registration.
    CreateIfAbsent,
    /// [`crate::store::UserCoinStore::put_pending`]: recording held-back switches.
    PutPending,
    /// [`crate::store::UserCoinStore::apply_pending`]: a held-back switch when due.
    ApplyPending,
}

impl StoreOp {
    const ALL: [Self; 4] = [
        Self::Write,
        Self::CreateIfAbsent,
        Self::PutPending,
        Self::ApplyPending,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Write => "write",
            Self::CreateIfAbsent => "create_if_absent",
            Self::PutPending => "put_pending",
            Self::ApplyPending => "apply_pending",
        }
    }
}

/// How an auto-registration request ended (the `outcome` label of
/// `switchyard_control_autoreg_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AutoRegCount {
    /// The user was created with `DefaultCoin`.
    Created,
    /// The user had a coin already (before the backend was asked, or by the time it was
    /// created); nothing was written.
    Existed,
    /// Refused: the backend refused the name (now or a moment ago), or the name is invalid.
    Refused,
    /// The exchange with the backend or the creation failed.
    Failed,
    /// Refused by a bound (`AutoRegMaxPending`, per proxy, per name pattern).
    Limited,
}

impl AutoRegCount {
    const ALL: [Self; 5] = [
        Self::Created,
        Self::Existed,
        Self::Refused,
        Self::Failed,
        Self::Limited,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Created => "created",
            Self::Existed => "existed",
            Self::Refused => "refused",
            Self::Failed => "failed",
            Self::Limited => "limited",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct SwitchLabels {
    source: &'static str,
    outcome: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct CoinOutcomeLabels {
    coin: Escaped<String>,
    outcome: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct CoinResultLabels {
    coin: Escaped<String>,
    result: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct PartLabels {
    part: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct OpLabels {
    op: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct BuildLabels {
    component: &'static str,
    version: &'static str,
    git_commit: &'static str,
}

/// The buckets of the latency histograms, in seconds: 0.5 ms to about 16 s, doubling (a
/// ZooKeeper write is milliseconds, a 10,000-user batch seconds).
fn latency_buckets() -> impl Iterator<Item = f64> {
    exponential_buckets(0.0005, 2.0, 16)
}

fn latency_histogram() -> Histogram {
    Histogram::new(latency_buckets())
}

/// The part label of a store part named `name` (`switchyard.zookeeper.main` →
/// `zookeeper_main`).
pub fn part_label(name: &str) -> String {
    name.strip_prefix("switchyard.")
        .unwrap_or(name)
        .replace(['.', '-'], "_")
}

/// The state read at each scrape.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ScrapeState {
    /// Held-back switches this replica's schedule knows.
    pub held_back: usize,
    /// The index revision.
    pub index_revision: Revision,
    /// The revision of the latest record in the index (what a caught-up subscriber has).
    pub latest_change: Revision,
    /// Users in the index.
    pub users: usize,
    /// Whether the store as a whole can be reached.
    pub store_up: bool,
    /// Each part of the store that can fail on its own, by name, and whether it is up.
    pub parts: Vec<(&'static str, bool)>,
}

/// The control service's metrics; cheap to clone (one shared set of families).
#[derive(Debug, Clone)]
pub struct ControlMetrics {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    registry: Registry,
    /// `[source][outcome]`, resolved at start.
    switches: [[Counter; 4]; 6],
    held_back: Gauge,
    ingest_pages: Family<CoinOutcomeLabels, Counter>,
    ingest_users: Family<CoinResultLabels, Counter>,
    autoreg: [Counter; 5],
    watch_subscribers: Gauge,
    watch_lag: Gauge,
    index_revision: Gauge,
    users: Gauge,
    store_up: Family<PartLabels, Gauge>,
    store_reconciles: Counter,
    /// By [`StoreOp`], resolved at start.
    store_writes: [Histogram; 4],
    grpc: grpc::GrpcFamilies,
    lease_conflicts: Counter,
    watchers: WatchTracker,
}

impl Default for ControlMetrics {
    fn default() -> Self {
        Self::new()
    }
}

/// A gauge value from a count or a revision (saturating at `i64::MAX`).
fn gauge_value(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

impl ControlMetrics {
    /// A fresh set of every control series, registered in a registry of its own.
    pub fn new() -> Self {
        let mut registry = Registry::default();

        let build_info = Family::<BuildLabels, Gauge>::default();
        build_info
            .get_or_create(&BuildLabels {
                component: "control",
                version: switchyard_cli::build::VERSION,
                git_commit: switchyard_cli::build::GIT_COMMIT,
            })
            .set(1);
        registry.register(
            "switchyard_build_info",
            "What the binary was built from (value 1)",
            build_info,
        );

        let switch_family = Family::<SwitchLabels, Counter>::default();
        // Only the pairs that can happen are series (from 0 at start).
        let switches = SwitchSource::ALL.map(|source| {
            SwitchCount::ALL.map(|outcome| {
                if !source.can_end_as(outcome) {
                    return Counter::default();
                }
                switch_family.get_or_create_owned(&SwitchLabels {
                    source: source.as_str(),
                    outcome: outcome.as_str(),
                })
            })
        });
        registry.register(
            "switchyard_control_switches",
            "Switches by source (grpc, http, cron, autoreg, held_back, zookeeper) and outcome (written, held_back, invalid, failed)",
            switch_family,
        );

        let held_back = Gauge::default();
        registry.register(
            "switchyard_control_held_back_switches",
            "Held-back switches this replica's schedule knows",
            held_back.clone(),
        );

        let ingest_pages = Family::<CoinOutcomeLabels, Counter>::default();
        registry.register(
            "switchyard_control_ingest_pages",
            "User-list pages ingested, by coin and outcome (ok, error)",
            ingest_pages.clone(),
        );
        let ingest_users = Family::<CoinResultLabels, Counter>::default();
        registry.register(
            "switchyard_control_ingest_users",
            "Ingested users by coin and result (created, existed, invalid)",
            ingest_users.clone(),
        );

        let autoreg_family = Family::<OutcomeLabels, Counter>::default();
        let autoreg = AutoRegCount::ALL.map(|outcome| {
            autoreg_family.get_or_create_owned(&OutcomeLabels {
                outcome: outcome.as_str(),
            })
        });
        registry.register(
            "switchyard_control_autoreg",
            "Auto-registration requests by outcome (created, existed, refused, failed, limited)",
            autoreg_family,
        );

        let watch_subscribers = Gauge::default();
        registry.register(
            "switchyard_control_watch_subscribers",
            "Open WatchSwitches streams",
            watch_subscribers.clone(),
        );
        let watch_lag = Gauge::default();
        registry.register(
            "switchyard_control_watch_lag_revisions",
            "The largest lag, in revisions, of any WatchSwitches subscriber behind the index (0 when none)",
            watch_lag.clone(),
        );
        let index_revision = Gauge::default();
        registry.register(
            "switchyard_control_index_revision",
            "The revision of the in-memory index",
            index_revision.clone(),
        );
        let users = Gauge::default();
        registry.register(
            "switchyard_control_users",
            "Users in the index",
            users.clone(),
        );
        let store_up = Family::<PartLabels, Gauge>::default();
        registry.register(
            "switchyard_control_store_up",
            "1 while the store part can be reached (store: the whole store; zookeeper_main, zookeeper_batch: each ZooKeeper session)",
            store_up.clone(),
        );
        let store_reconciles = Counter::default();
        registry.register(
            "switchyard_control_store_reconciles",
            "Re-reads of the whole ZooKeeper state by the feed (after a reconnect, an error, or every ZKReconcileSeconds)",
            store_reconciles.clone(),
        );

        let store_write_family =
            Family::<OpLabels, Histogram, fn() -> Histogram>::new_with_constructor(
                latency_histogram,
            );
        let store_writes = StoreOp::ALL
            .map(|op| store_write_family.get_or_create_owned(&OpLabels { op: op.as_str() }));
        registry.register(
            "switchyard_control_store_write_duration_seconds",
            "Store write latency by operation (write, create_if_absent, put_pending, apply_pending)",
            store_write_family,
        );

        let grpc = grpc::GrpcFamilies::register(&mut registry);

        let lease_conflicts = Counter::default();
        registry.register(
            "switchyard_control_lease_conflicts",
            "Server-ID lease requests or renewals refused because another proxy holds the ID",
            lease_conflicts.clone(),
        );

        Self {
            inner: Arc::new(Inner {
                registry,
                switches,
                held_back,
                ingest_pages,
                ingest_users,
                autoreg,
                watch_subscribers,
                watch_lag,
                index_revision,
                users,
                store_up,
                store_reconciles,
                store_writes,
                grpc,
                lease_conflicts,
                watchers: WatchTracker::default(),
            }),
        }
    }

    /// Counts `n` switches from `source` that ended as `outcome` (a pair that cannot happen,
    /// see [`SwitchSource::can_end_as`], is not exposed).
    pub fn count_switches(&self, source: SwitchSource, outcome: SwitchCount, n: u64) {
        debug_assert!(source.can_end_as(outcome), "{source} cannot end {outcome}");
        if n > 0 {
            self.inner.switches[source.index()][outcome.index()].inc_by(n);
        }
    }

    /// The counter of switches from `source` that ended as `outcome`.
    pub fn switch_counter(&self, source: SwitchSource, outcome: SwitchCount) -> Counter {
        self.inner.switches[source.index()][outcome.index()].clone()
    }

    /// How many switches from `source` ended as `outcome` so far.
    pub fn switches(&self, source: SwitchSource, outcome: SwitchCount) -> u64 {
        self.inner.switches[source.index()][outcome.index()].get()
    }

    /// The latency histogram of store writes of kind `op`.
    pub fn store_write(&self, op: StoreOp) -> &Histogram {
        let i = StoreOp::ALL.iter().position(|o| *o == op).unwrap_or(0);
        &self.inner.store_writes[i]
    }

    /// Counts one ingested user-list page of `coin` (a coin the core accepted).
    pub fn count_ingest_page(&self, coin: &str, ok: bool) {
        self.inner
            .ingest_pages
            .get_or_create(&CoinOutcomeLabels {
                coin: Escaped(coin.to_owned()),
                outcome: if ok { "ok" } else { "error" },
            })
            .inc();
    }

    /// Counts ingested users of `coin` (a coin the core accepted) by result.
    pub fn count_ingest_users(&self, coin: &str, created: u64, existed: u64, invalid: u64) {
        for (result, n) in [
            ("created", created),
            ("existed", existed),
            ("invalid", invalid),
        ] {
            let counter = self.inner.ingest_users.get_or_create(&CoinResultLabels {
                coin: Escaped(coin.to_owned()),
                result,
            });
            counter.inc_by(n);
        }
    }

    /// Counts one auto-registration request's outcome.
    pub fn count_autoreg(&self, outcome: AutoRegCount) {
        let i = AutoRegCount::ALL
            .iter()
            .position(|o| *o == outcome)
            .unwrap_or(0);
        self.inner.autoreg[i].inc();
    }

    /// The counter of lease conflicts, for the lease registries.
    pub fn lease_conflicts(&self) -> Counter {
        self.inner.lease_conflicts.clone()
    }

    /// The counter of the ZooKeeper feed's re-reads, for the store.
    pub fn store_reconciles(&self) -> Counter {
        self.inner.store_reconciles.clone()
    }

    /// Registers an open WatchSwitches stream; it counts until the returned handle is dropped.
    pub fn watch_subscriber(&self) -> WatchSubscriber {
        self.inner.watchers.add()
    }

    /// The tower layer that counts and times gRPC requests.
    pub fn grpc_layer(&self) -> grpc::GrpcMetricsLayer {
        grpc::GrpcMetricsLayer::new(self.clone())
    }

    fn grpc(&self) -> &grpc::GrpcFamilies {
        &self.inner.grpc
    }

    /// Sets the gauges read at scrape time from `state`, then encodes every series as
    /// OpenMetrics text.
    pub fn render(&self, state: &ScrapeState) -> Result<String, fmt::Error> {
        let inner = &self.inner;
        inner.held_back.set(gauge_value(state.held_back as u64));
        inner.index_revision.set(gauge_value(state.index_revision));
        inner.users.set(gauge_value(state.users as u64));
        let (subscribers, lag) = inner.watchers.lag_behind(state.latest_change);
        inner.watch_subscribers.set(gauge_value(subscribers as u64));
        inner.watch_lag.set(gauge_value(lag));
        let up = |v: bool| i64::from(v);
        inner
            .store_up
            .get_or_create(&PartLabels {
                part: "store".into(),
            })
            .set(up(state.store_up));
        for (name, is_up) in &state.parts {
            inner
                .store_up
                .get_or_create(&PartLabels {
                    part: part_label(name),
                })
                .set(up(*is_up));
        }
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &inner.registry)?;
        Ok(text)
    }
}

/// The open WatchSwitches streams and how far each has been sent.
#[derive(Debug, Default)]
struct WatchTracker {
    positions: Arc<Mutex<HashMap<u64, Arc<AtomicU64>>>>,
    next_id: AtomicU64,
}

impl WatchTracker {
    fn lock(
        positions: &Mutex<HashMap<u64, Arc<AtomicU64>>>,
    ) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<AtomicU64>>> {
        // Single inserts and removes: the map is valid after any panic.
        positions.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn add(&self) -> WatchSubscriber {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let position = Arc::new(AtomicU64::new(0));
        Self::lock(&self.positions).insert(id, Arc::clone(&position));
        WatchSubscriber {
            id,
            position,
            positions: Arc::clone(&self.positions),
        }
    }

    /// The number of subscribers and the largest lag of any behind `latest` (0 when none).
    fn lag_behind(&self, latest: Revision) -> (usize, u64) {
        let positions = Self::lock(&self.positions);
        let lag = positions
            .values()
            .map(|p| latest.saturating_sub(p.load(Ordering::Relaxed)))
            .max()
            .unwrap_or(0);
        (positions.len(), lag)
    }
}

/// One open WatchSwitches stream, counted until dropped.
#[derive(Debug)]
pub struct WatchSubscriber {
    id: u64,
    position: Arc<AtomicU64>,
    positions: Arc<Mutex<HashMap<u64, Arc<AtomicU64>>>>,
}

impl WatchSubscriber {
    /// Where the subscriber's progress is recorded: the revision of the last message handed to
    /// its transport (a resume point), to be raised with [`SentPosition::reached`].
    pub fn position(&self) -> SentPosition {
        SentPosition(Arc::clone(&self.position))
    }
}

impl Drop for WatchSubscriber {
    fn drop(&mut self) {
        WatchTracker::lock(&self.positions).remove(&self.id);
    }
}

/// A WatchSwitches stream's progress; see [`WatchSubscriber::position`].
#[derive(Debug, Clone)]
pub struct SentPosition(Arc<AtomicU64>);

impl SentPosition {
    /// The subscriber has been sent everything through `revision`.
    pub fn reached(&self, revision: Revision) {
        self.0.fetch_max(revision, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line<'a>(text: &'a str, prefix: &str) -> Option<&'a str> {
        text.lines().find(|l| l.starts_with(prefix))
    }

    #[test]
    fn every_series_is_named_as_the_contract_says() {
        let metrics = ControlMetrics::new();
        metrics.count_switches(SwitchSource::Grpc, SwitchCount::Written, 3);
        metrics.count_switches(SwitchSource::ZooKeeper, SwitchCount::Written, 1);
        metrics.count_ingest_page("btc", true);
        metrics.count_ingest_users("btc", 2, 1, 0);
        metrics.count_autoreg(AutoRegCount::Limited);
        metrics.store_write(StoreOp::PutPending).observe(0.01);
        metrics.lease_conflicts().inc();
        metrics.store_reconciles().inc();
        let text = metrics
            .render(&ScrapeState {
                held_back: 2,
                index_revision: 9,
                latest_change: 9,
                users: 4,
                store_up: true,
                parts: vec![
                    ("switchyard.zookeeper.main", true),
                    ("switchyard.zookeeper.batch", false),
                ],
            })
            .expect("encodes");
        for expected in [
            "switchyard_control_switches_total{source=\"grpc\",outcome=\"written\"} 3",
            "switchyard_control_switches_total{source=\"zookeeper\",outcome=\"written\"} 1",
            "switchyard_control_switches_total{source=\"held_back\",outcome=\"failed\"} 0",
            "switchyard_control_held_back_switches 2",
            "switchyard_control_ingest_pages_total{coin=\"btc\",outcome=\"ok\"} 1",
            "switchyard_control_ingest_users_total{coin=\"btc\",result=\"created\"} 2",
            "switchyard_control_autoreg_total{outcome=\"limited\"} 1",
            "switchyard_control_watch_subscribers 0",
            "switchyard_control_watch_lag_revisions 0",
            "switchyard_control_index_revision 9",
            "switchyard_control_users 4",
            "switchyard_control_store_up{part=\"store\"} 1",
            "switchyard_control_store_up{part=\"zookeeper_main\"} 1",
            "switchyard_control_store_up{part=\"zookeeper_batch\"} 0",
            "switchyard_control_store_reconciles_total 1",
            "switchyard_control_store_write_duration_seconds_count{op=\"put_pending\"} 1",
            "switchyard_control_store_write_duration_seconds_count{op=\"write\"} 0",
            "switchyard_control_lease_conflicts_total 1",
        ] {
            assert!(text.contains(expected), "{expected} missing in:\n{text}");
        }
        let build = line(&text, "switchyard_build_info{").expect("build_info");
        assert!(build.contains("component=\"control\""), "{build}");
        assert!(
            build.contains(&format!("version=\"{}\"", switchyard_cli::build::VERSION)),
            "{build}"
        );
        assert!(build.ends_with(" 1"), "{build}");
        for (source, outcome) in [
            ("zookeeper", "failed"),
            ("held_back", "held_back"),
            ("held_back", "invalid"),
            ("autoreg", "held_back"),
        ] {
            assert!(
                !text.contains(&format!("source=\"{source}\",outcome=\"{outcome}\"")),
                "{source} never ends {outcome}"
            );
        }
        assert!(text.ends_with("# EOF\n"), "OpenMetrics text ends with EOF");
    }

    #[test]
    fn a_coin_label_is_escaped() {
        let metrics = ControlMetrics::new();
        metrics.count_ingest_page("we\"ird\\coin", true);
        let text = metrics
            .render(&ScrapeState {
                held_back: 0,
                index_revision: 0,
                latest_change: 0,
                users: 0,
                store_up: true,
                parts: Vec::new(),
            })
            .expect("encodes");
        assert!(
            text.contains(
                r#"switchyard_control_ingest_pages_total{coin="we\"ird\\coin",outcome="ok"} 1"#
            ),
            "{text}"
        );
    }

    #[test]
    fn the_lag_is_the_furthest_subscriber_behind() {
        let metrics = ControlMetrics::new();
        let state = |latest| ScrapeState {
            latest_change: latest,
            ..ScrapeState::default()
        };
        let has = |text: &str, s: &str| text.lines().any(|l| l == s);
        let a = metrics.watch_subscriber();
        let b = metrics.watch_subscriber();
        a.position().reached(10);
        b.position().reached(4);
        b.position().reached(3);
        let text = metrics.render(&state(10)).expect("encodes");
        assert!(
            has(&text, "switchyard_control_watch_subscribers 2"),
            "{text}"
        );
        assert!(
            has(&text, "switchyard_control_watch_lag_revisions 6"),
            "{text}"
        );
        drop(b);
        let text = metrics.render(&state(12)).expect("encodes");
        assert!(
            has(&text, "switchyard_control_watch_subscribers 1"),
            "{text}"
        );
        assert!(
            has(&text, "switchyard_control_watch_lag_revisions 2"),
            "{text}"
        );
        drop(a);
        let text = metrics.render(&state(12)).expect("encodes");
        assert!(
            has(&text, "switchyard_control_watch_subscribers 0"),
            "{text}"
        );
        assert!(
            has(&text, "switchyard_control_watch_lag_revisions 0"),
            "{text}"
        );
    }

    #[test]
    fn part_names_become_labels() {
        assert_eq!(part_label("switchyard.zookeeper.main"), "zookeeper_main");
        assert_eq!(part_label("switchyard.zookeeper.batch"), "zookeeper_batch");
    }
}
