//! The switching core: what every API (gRPC, HTTP for pool backends, the scheduled pull,
//! auto-registration) calls to read and change the user→coin state. It validates input, writes
//! through the [`UserCoinStore`], and alone applies the store's change stream to the
//! [`UserCoinIndex`] that feeds the proxies; a write returns once the stream has brought it
//! back. Adapters only translate.
//!
//! # Held-back switches (SPEC §6's safety period)
//!
//! A switch of an existing user to a coin whose user list is ingested, other than the coin the
//! user mines now, is held back until the user has been in that list for the safety period.
//! Held-back switches of one call are recorded in one store batch, dated by the user's record
//! ([`PendingSwitch::after`]), and put on this replica's [`HeldBackSchedule`]; a timer applies
//! each at its due time through [`UserCoinStore::apply_pending`], which writes it only if the
//! user has not changed since (an immediate switch, another replica's, an outside writer's):
//! an older held-back coin never overwrites a newer switch. Every `ZKReconcileSeconds` the
//! replica reads the store's pending switches to learn those held back elsewhere (or before a
//! restart). First-seen times are in the store, so a restart does not hold back every switch
//! again.
//!
//! # Metrics
//!
//! Every entry point that switches takes the [`SwitchSource`] it serves and counts each asked
//! switch once by outcome (`switchyard_control_switches_total`); store writes are timed by
//! operation; the change stream's user changes this replica did not write are counted as
//! `zookeeper` switches ([`crate::own_writes`]).

use std::{
    collections::{BTreeSet, HashMap},
    sync::{Arc, RwLock},
    time::{Duration, Instant},
};

use thiserror::Error;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

pub use crate::metrics::SwitchSource;
use crate::{
    held_back::HeldBackSchedule,
    index::UserCoinIndex,
    metrics::{ControlMetrics, StoreOp, SwitchCount},
    own_writes::OwnWrites,
    store::{
        ChangeReceiver, HoldSwitch, PendingOutcome, PendingSwitch, Record, RecordKey, Revision,
        StoreContents, StoreError, StoreWrite, UserCoinStore,
    },
    validate::{CoinSet, InvalidInput, validate_user},
};

/// A user's coin as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserCoinRecord {
    /// The user name as stored.
    pub user: String,
    /// The coin.
    pub coin: String,
    /// The revision of the change that wrote it.
    pub revision: Revision,
}

/// The result of an applied switch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SwitchOutcome {
    /// The record after the switch.
    pub record: UserCoinRecord,
    /// The coin before the switch; `None` when the switch created the user.
    pub previous_coin: Option<String>,
    /// When the switch is held back by the safety period (SPEC §6): when it will be written,
    /// in Unix seconds. `record` is then the user's current record, unchanged.
    pub pending_until: Option<u64>,
}

/// Why a switch was not applied.
#[derive(Debug, Error)]
pub enum SwitchError {
    /// The request names an invalid user or coin.
    #[error(transparent)]
    Invalid(#[from] InvalidInput),
    /// The store could not be written.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Why a whole batch was refused.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum BatchError {
    /// The batch has no entry.
    #[error("the batch is empty")]
    Empty,
    /// The batch has more entries than allowed.
    #[error("the batch has {len} entries; at most {max} are allowed")]
    TooLarge {
        /// Entries in the batch.
        len: usize,
        /// The limit.
        max: usize,
    },
}

/// How long the store may take to deliver its whole state at start-up.
const STATE_LOAD_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a write may take to come back through the store's change stream before the call
/// returns anyway (the write is durable; the index catches up).
const WRITE_VISIBLE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a held-back switch whose apply failed (store unavailable) waits before another try.
const PENDING_RETRY_SECONDS: u64 = 2;
/// Due held-back switches applied in one store batch, at most.
const APPLY_CHUNK: usize = 1_000;
/// Held-back switches of one call logged one by one; beyond, one line says how many.
const LOGGED_HELD_BACK: usize = 10;

/// How the core treats names and batches.
#[derive(Debug, Clone)]
pub struct CoreSettings {
    /// The coins a switch may name (`AvailableCoins`).
    pub coins: CoinSet,
    /// Lowercase every user name (`StratumServerCaseInsensitive`).
    pub case_insensitive: bool,
    /// The most entries one batch may carry.
    pub max_batch: usize,
    /// The safety period of SPEC §6, when user lists are ingested.
    pub safety: Option<SafetyPeriod>,
    /// Keep a case index (lowercase name → name) of ingested users
    /// (`ZKUserCaseInsensitiveIndex` set, outside case-insensitive mode).
    pub case_index: bool,
    /// How often the store's pending switches are read again, to learn those held back by
    /// other replicas or before a restart (`ZKReconcileSeconds`).
    pub pending_reconcile: Duration,
}

/// Who creates users through [`SwitchCore::create_users_if_absent`]: what is counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Creator {
    /// User-list ingestion (in-process pullers, `IngestUserList`): counted as ingested users
    /// by coin and result.
    Ingestion,
    /// Auto-registration: a created user counts as a switch from `autoreg`.
    AutoReg,
}

/// What ingestion did with one listed user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listed {
    /// The user did not exist and was created with the list's coin.
    Created(UserCoinRecord),
    /// The user existed; its record was kept as it is.
    Existed,
}

/// The safety period (SPEC §6): a switch of an existing user to a coin whose user list is
/// ingested is written at once only if the user was first seen in that list at least `period`
/// ago; otherwise it waits, durably, until then (a user never seen waits the whole period).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SafetyPeriod {
    /// 1.5 × `IntervalSeconds`.
    pub period: Duration,
    /// The coins whose user lists are ingested (`UserListAPI`).
    pub coins: BTreeSet<String>,
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The switching core; see the module doc.
pub struct SwitchCore {
    store: Arc<dyn UserCoinStore>,
    index: Arc<UserCoinIndex>,
    settings: CoreSettings,
    /// When users were first seen in coins' user lists (coin → user → Unix seconds), as read
    /// from the store: a cache of what [`UserCoinStore::first_seen`] answers (a recorded time
    /// never changes). Users never seen are not cached: ingestion may see them any moment.
    first_seen: RwLock<HashMap<String, HashMap<String, u64>>>,
    /// The held-back switches this replica knows of, by due time.
    held_back: HeldBackSchedule,
    metrics: ControlMetrics,
    /// Which user changes on the store's stream this replica wrote.
    own: Arc<OwnWrites>,
}

impl std::fmt::Debug for SwitchCore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SwitchCore")
            .field("store", &self.store.kind())
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

/// Applies the store's change stream to the index until the stream ends (shutdown), counting
/// the user changes this replica did not write.
async fn apply_changes(
    index: Arc<UserCoinIndex>,
    own: Arc<OwnWrites>,
    mut changes: ChangeReceiver,
) {
    while let Some(change) = changes.recv().await {
        for record in &change.records {
            if let RecordKey::User(user) = &record.key {
                own.seen(user, record.revision, record.value.is_none());
            }
        }
        index.apply(change.records, change.through);
    }
}

/// What became of a due held-back switch on this replica.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DueOutcome {
    /// Written.
    Written = 0,
    /// Dropped: the user switched again since.
    Superseded = 1,
    /// Applied or replaced elsewhere; nothing to do.
    Gone = 2,
    /// The store failed; retried soon.
    Failed = 3,
    /// It names a user or coin this service does not accept: left in the store.
    LeftAlone = 4,
}

/// The outcome counted for one switch's result.
fn counted<T>(result: &Result<T, SwitchError>, held_back: impl Fn(&T) -> bool) -> SwitchCount {
    match result {
        Ok(done) if held_back(done) => SwitchCount::HeldBack,
        Ok(_) => SwitchCount::Written,
        Err(SwitchError::Invalid(_)) => SwitchCount::Invalid,
        Err(SwitchError::Store(_)) => SwitchCount::Failed,
    }
}

fn user_revisions(records: &[Record]) -> Vec<(String, Revision)> {
    records
        .iter()
        .filter_map(|r| match &r.key {
            RecordKey::User(user) => Some((user.clone(), r.revision)),
            RecordKey::CaseIndex(_) => None,
        })
        .collect()
}

fn unix_time_of(seconds: u64) -> std::time::SystemTime {
    std::time::UNIX_EPOCH + Duration::from_secs(seconds)
}

/// A Unix time as UTC text, for logs ("2026-12-03T01:02:03Z").
pub fn utc_text(seconds: u64) -> String {
    let days = seconds / 86_400;
    let rem = seconds % 86_400;
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3_600,
        rem % 3_600 / 60,
        rem % 60
    )
}

impl SwitchCore {
    /// Builds the core over `store`: starts its change stream, waits for the whole state, and
    /// keeps applying the stream to a fresh index until `shutdown`. It counts on metrics of
    /// its own; see [`SwitchCore::open_with_metrics`].
    pub async fn open(
        store: Arc<dyn UserCoinStore>,
        settings: CoreSettings,
        shutdown: CancellationToken,
    ) -> Result<Self, StoreError> {
        Self::open_with_metrics(store, settings, ControlMetrics::new(), shutdown).await
    }

    /// [`SwitchCore::open`], counting on `metrics`.
    pub async fn open_with_metrics(
        store: Arc<dyn UserCoinStore>,
        settings: CoreSettings,
        metrics: ControlMetrics,
        shutdown: CancellationToken,
    ) -> Result<Self, StoreError> {
        let index = Arc::new(UserCoinIndex::new(StoreContents {
            records: Vec::new(),
            revision: 0,
            store_id: store.store_id().to_owned(),
        }));
        let mut changes = store.changes(Arc::clone(&index) as _, shutdown)?;
        let first = tokio::time::timeout(STATE_LOAD_TIMEOUT, changes.recv())
            .await
            .map_err(|_| {
                StoreError::Unavailable(format!(
                    "the {} store did not deliver its state within {STATE_LOAD_TIMEOUT:?}",
                    store.kind()
                ))
            })?
            .ok_or_else(|| {
                StoreError::Unavailable(format!(
                    "the {} store ended its changes before its state",
                    store.kind()
                ))
            })?;
        index.apply(first.records, first.through);
        let own = Arc::new(OwnWrites::new(
            metrics.switch_counter(SwitchSource::ZooKeeper, SwitchCount::Written),
        ));
        tokio::spawn(apply_changes(Arc::clone(&index), Arc::clone(&own), changes));
        Ok(Self {
            store,
            index,
            settings,
            first_seen: RwLock::new(HashMap::new()),
            held_back: HeldBackSchedule::default(),
            metrics,
            own,
        })
    }

    /// The metrics the core counts on, for the adapters' own counts.
    pub fn metrics(&self) -> &ControlMetrics {
        &self.metrics
    }

    /// How many held-back switches this replica's schedule knows.
    pub fn held_back_count(&self) -> usize {
        self.held_back.len()
    }

    /// The index that feeds watchers.
    pub fn index(&self) -> &Arc<UserCoinIndex> {
        &self.index
    }

    /// The settings the core runs with.
    pub fn settings(&self) -> &CoreSettings {
        &self.settings
    }

    /// Validates a user name and returns it as stored (lowercased in case-insensitive mode).
    pub fn normalize_user(&self, user: &str) -> Result<String, InvalidInput> {
        validate_user(user)?;
        Ok(if self.settings.case_insensitive {
            user.to_lowercase()
        } else {
            user.to_owned()
        })
    }

    /// Counts one switch from `source` by its result.
    fn count(&self, source: SwitchSource, result: &Result<SwitchOutcome, SwitchError>) {
        let outcome = counted(result, |o: &SwitchOutcome| o.pending_until.is_some());
        self.metrics.count_switches(source, outcome, 1);
    }

    /// Switches one user for `source`; see [`SwitchCore::switch_coins`].
    pub async fn switch_coin(
        &self,
        source: SwitchSource,
        user: &str,
        coin: &str,
    ) -> Result<SwitchOutcome, SwitchError> {
        let result = self.switch_one(source, user, coin).await;
        self.count(source, &result);
        result
    }

    async fn switch_one(
        &self,
        source: SwitchSource,
        user: &str,
        coin: &str,
    ) -> Result<SwitchOutcome, SwitchError> {
        let user = self.normalize_user(user)?;
        self.settings.coins.check(coin)?;
        let mut outcomes = self
            .apply_valid(source, vec![(user, coin.to_owned())])
            .await;
        outcomes
            .pop()
            .unwrap_or_else(|| {
                Err(StoreError::Unavailable(
                    "the store acknowledged no write".into(),
                ))
            })
            .map_err(Into::into)
    }

    /// Switches many users for `source`. Every entry is validated on its own; the valid ones
    /// are written in one store write, in request order. The answer has one result per entry,
    /// in order. Each entry is counted once by its outcome; a batch over `max_batch` counts
    /// every entry as invalid.
    pub async fn switch_coins(
        &self,
        source: SwitchSource,
        switches: Vec<(String, String)>,
    ) -> Result<Vec<Result<SwitchOutcome, SwitchError>>, BatchError> {
        if switches.is_empty() {
            return Err(BatchError::Empty);
        }
        if switches.len() > self.settings.max_batch {
            self.metrics
                .count_switches(source, SwitchCount::Invalid, switches.len() as u64);
            return Err(BatchError::TooLarge {
                len: switches.len(),
                max: self.settings.max_batch,
            });
        }
        let checked: Vec<Result<(String, String), InvalidInput>> = switches
            .into_iter()
            .map(|(user, coin)| {
                let user = self.normalize_user(&user)?;
                self.settings.coins.check(&coin)?;
                Ok((user, coin))
            })
            .collect();
        let valid: Vec<(String, String)> = checked
            .iter()
            .filter_map(|c| c.as_ref().ok().cloned())
            .collect();
        let mut written = self.apply_valid(source, valid).await.into_iter();
        let results: Vec<Result<SwitchOutcome, SwitchError>> = checked
            .into_iter()
            .map(|c| match c {
                Err(invalid) => Err(SwitchError::Invalid(invalid)),
                Ok(_) => written
                    .next()
                    .unwrap_or_else(|| {
                        Err(StoreError::Unavailable(
                            "the store acknowledged fewer writes".into(),
                        ))
                    })
                    .map_err(SwitchError::Store),
            })
            .collect();
        let mut counts = [0u64; 4];
        for result in &results {
            let outcome = counted(result, |o: &SwitchOutcome| o.pending_until.is_some());
            counts[outcome as usize] += 1;
        }
        for (outcome, n) in [
            SwitchCount::Written,
            SwitchCount::HeldBack,
            SwitchCount::Invalid,
            SwitchCount::Failed,
        ]
        .into_iter()
        .zip(counts)
        {
            self.metrics.count_switches(source, outcome, n);
        }
        Ok(results)
    }

    /// Records, durably, when `users` were first seen in `coin`'s user list (the earliest time
    /// wins). Only coins under the safety period are recorded.
    pub async fn record_first_seen(
        &self,
        coin: &str,
        users: Vec<String>,
        at: u64,
    ) -> Result<(), StoreError> {
        let watched = self
            .settings
            .safety
            .as_ref()
            .is_some_and(|s| s.coins.contains(coin));
        if !watched || users.is_empty() {
            return Ok(());
        }
        self.store.record_first_seen(coin, users, at).await
    }

    /// When each user was first seen in `coin`'s list: from the cache, else from the store.
    async fn first_seen_times(&self, coin: &str, users: &[&str]) -> Vec<Option<u64>> {
        let mut out: Vec<Option<u64>> = {
            let cache = self.first_seen.read().unwrap_or_else(|e| e.into_inner());
            let known = cache.get(coin);
            users
                .iter()
                .map(|u| known.and_then(|k| k.get(*u).copied()))
                .collect()
        };
        let missing: Vec<usize> = (0..users.len()).filter(|i| out[*i].is_none()).collect();
        if missing.is_empty() {
            return out;
        }
        let names: Vec<String> = missing.iter().map(|i| users[*i].to_owned()).collect();
        match self.store.first_seen(coin, names).await {
            Ok(found) => {
                let mut cache = self.first_seen.write().unwrap_or_else(|e| e.into_inner());
                let known = cache.entry(coin.to_owned()).or_default();
                for (i, seen) in missing.into_iter().zip(found) {
                    if let Some(seen) = seen {
                        known.insert(users[i].to_owned(), seen);
                        out[i] = Some(seen);
                    }
                }
            }
            // Unknown counts as never seen: that only delays a switch, never hurries one.
            Err(e) => warn!(coin, error = %e, "cannot read first-seen times; holding back"),
        }
        out
    }

    /// When each switch may be written, if not now: `None` for a switch written at once.
    async fn hold_times(&self, switches: &[(String, String)], now: u64) -> Vec<Option<u64>> {
        let mut out = vec![None; switches.len()];
        let Some(safety) = self.settings.safety.as_ref() else {
            return out;
        };
        // Coin → the entries that may be held: existing users moving to another coin.
        let mut candidates: HashMap<&str, Vec<usize>> = HashMap::new();
        for (i, (user, coin)) in switches.iter().enumerate() {
            if !safety.coins.contains(coin) {
                continue;
            }
            match self.index.user_coin(user) {
                // A new user is created at once; a same-coin switch re-announces at once.
                None => {}
                Some((current, _)) if current == *coin => {}
                Some(_) => candidates.entry(coin.as_str()).or_default().push(i),
            }
        }
        let period = safety.period.as_secs();
        for (coin, entries) in candidates {
            let users: Vec<&str> = entries.iter().map(|i| switches[*i].0.as_str()).collect();
            let seen = self.first_seen_times(coin, &users).await;
            for (i, seen) in entries.into_iter().zip(seen) {
                let due = seen.unwrap_or(now).saturating_add(period);
                out[i] = (due > now).then_some(due);
            }
        }
        out
    }

    /// Applies validated switches: held back by the safety period (recorded as pending) or
    /// written at once (replacing the user's pending switch). One result per switch.
    async fn apply_valid(
        &self,
        source: SwitchSource,
        switches: Vec<(String, String)>,
    ) -> Vec<Result<SwitchOutcome, StoreError>> {
        let now = unix_now();
        let mut hold = self.hold_times(&switches, now).await;
        // A user's last entry decides: an entry held back before an immediate one of the same
        // user is written in order with it instead.
        let mut last_immediate: HashMap<&str, usize> = HashMap::new();
        for (i, (user, _)) in switches.iter().enumerate() {
            if hold[i].is_none() {
                last_immediate.insert(user.as_str(), i);
            }
        }
        for (i, (user, _)) in switches.iter().enumerate() {
            if last_immediate
                .get(user.as_str())
                .is_some_and(|last| *last > i)
            {
                hold[i] = None;
            }
        }
        let mut results: Vec<Option<Result<SwitchOutcome, StoreError>>> =
            (0..switches.len()).map(|_| None).collect();
        let (mut immediate, mut immediate_at, mut held, mut held_at) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for (i, ((user, coin), hold)) in switches.into_iter().zip(hold).enumerate() {
            match hold {
                Some(apply_at) => {
                    held_at.push(i);
                    held.push(HoldSwitch {
                        user,
                        coin,
                        apply_at,
                    });
                }
                None => {
                    immediate_at.push(i);
                    immediate.push((user, coin));
                }
            }
        }
        // Immediate switches first: a held-back entry is then dated after them.
        let written = self.write_switches(immediate).await;
        // A written switch is newer than the user's held-back one: take it out now (it could
        // not be applied anyway, its user having changed).
        let replaced: Vec<String> = written
            .iter()
            .filter_map(|r| r.as_ref().ok())
            .map(|o| o.record.user.clone())
            .filter(|user| self.held_back.contains(user))
            .collect();
        if !replaced.is_empty() {
            for user in &replaced {
                self.held_back.remove(user);
            }
            if let Err(e) = self.store.cancel_pending(replaced).await {
                warn!(error = %e, "could not remove replaced held-back switches; they are dropped when due");
            }
        }
        for (i, outcome) in immediate_at.into_iter().zip(written) {
            results[i] = Some(outcome);
        }
        if !held.is_empty() {
            let count = held.len();
            let started = Instant::now();
            let put = self.store.put_pending(held).await;
            self.metrics
                .store_write(StoreOp::PutPending)
                .observe(started.elapsed().as_secs_f64());
            for (n, (i, outcome)) in held_at.into_iter().zip(put).enumerate() {
                results[i] = Some(outcome.map(|pending| {
                    if n < LOGGED_HELD_BACK {
                        info!(
                            source = %source,
                            outcome = %SwitchCount::HeldBack,
                            user = %pending.user,
                            coin = %pending.coin,
                            apply_at = pending.apply_at,
                            held_until = %utc_text(pending.apply_at),
                            "switch held back by the safety period"
                        );
                    }
                    let (current, revision) =
                        self.index.user_coin(&pending.user).unwrap_or_default();
                    let outcome = SwitchOutcome {
                        record: UserCoinRecord {
                            user: pending.user.clone(),
                            coin: current.clone(),
                            revision,
                        },
                        previous_coin: Some(current),
                        pending_until: Some(pending.apply_at),
                    };
                    self.held_back.insert(pending);
                    outcome
                }));
            }
            if count > LOGGED_HELD_BACK {
                info!(
                    source = %source,
                    outcome = %SwitchCount::HeldBack,
                    switches = count,
                    logged = LOGGED_HELD_BACK,
                    "switches held back by the safety period (the first ones logged one by one)"
                );
            }
        }
        results
            .into_iter()
            .map(|r| {
                r.unwrap_or_else(|| Err(StoreError::Unavailable("switch not processed".into())))
            })
            .collect()
    }

    /// The user's switch held back by the safety period, if any and still to be applied (one
    /// the user's later switch replaced is not shown).
    pub async fn pending_switch(&self, user: &str) -> Result<Option<PendingSwitch>, SwitchError> {
        let user = self.normalize_user(user)?;
        let current = self.index.user_coin(&user).map_or(0, |(_, r)| r);
        Ok(self
            .store
            .pending(&user)
            .await?
            .filter(|p| p.after >= current))
    }

    /// Writes held-back switches when they are due, until `shutdown`: a timer for the earliest
    /// one this replica knows of, and a reconcile every `pending_reconcile` (and at start) for
    /// those held back elsewhere. Any replica may apply a due switch; the store makes sure one
    /// writes it, and only if the user has not changed since.
    pub async fn run_pending(self: Arc<Self>, shutdown: CancellationToken) {
        let mut reconcile = tokio::time::interval(self.settings.pending_reconcile);
        reconcile.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let now = unix_now();
            let due = self.held_back.take_due(now);
            let count = due.len();
            // Held-back switches due together (a batch held back at once) log like the batch
            // did: the first ones one by one, then one line with the counts.
            let mut tally = [0usize; 5];
            let mut due = due.into_iter();
            let mut logged = 0;
            loop {
                let chunk: Vec<PendingSwitch> = due.by_ref().take(APPLY_CHUNK).collect();
                if chunk.is_empty() {
                    break;
                }
                let len = chunk.len();
                for done in self.apply_due(chunk, logged).await {
                    tally[done as usize] += 1;
                }
                logged += len;
            }
            if count > LOGGED_HELD_BACK {
                info!(
                    source = %SwitchSource::HeldBack,
                    due = count,
                    written = tally[DueOutcome::Written as usize],
                    superseded = tally[DueOutcome::Superseded as usize],
                    failed = tally[DueOutcome::Failed as usize],
                    left_alone = tally[DueOutcome::LeftAlone as usize],
                    logged = LOGGED_HELD_BACK,
                    "held-back switches due (the first ones logged one by one)"
                );
            }
            let wait = match self.held_back.next_due() {
                Some(at) => unix_time_of(at)
                    .duration_since(std::time::SystemTime::now())
                    .unwrap_or(Duration::ZERO),
                None => Duration::from_secs(3_600),
            };
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
                _ = self.held_back.added() => {}
                _ = reconcile.tick() => self.reconcile_pending().await,
            }
        }
    }

    /// Learns every pending switch in the store (a record that cannot be read is skipped).
    async fn reconcile_pending(&self) {
        match self.store.all_pending().await {
            Ok(all) => {
                for pending in all {
                    self.held_back.learn(pending);
                }
            }
            Err(e) => {
                warn!(error = %e, "cannot read pending switches; will retry at the next reconcile")
            }
        }
    }

    /// Applies due held-back switches in one store batch (one transaction on redb, requests in
    /// flight together on ZooKeeper); logs the ones before [`LOGGED_HELD_BACK`] counting from
    /// `logged_before` (the others are only counted). One outcome per switch, in order.
    async fn apply_due(&self, due: Vec<PendingSwitch>, logged_before: usize) -> Vec<DueOutcome> {
        let mut outcomes = Vec::with_capacity(due.len());
        let mut valid = Vec::with_capacity(due.len());
        for (n, pending) in due.into_iter().enumerate() {
            let log = logged_before + n < LOGGED_HELD_BACK;
            if validate_user(&pending.user).is_ok()
                && self.settings.coins.check(&pending.coin).is_ok()
            {
                valid.push((pending, log));
                outcomes.push(None);
            } else {
                // Left in the store: another service of this deployment may know the coin.
                if log {
                    warn!(user = %pending.user, coin = %pending.coin, "a pending switch names an invalid user or a coin not available here; left alone");
                }
                outcomes.push(Some(DueOutcome::LeftAlone));
            }
        }
        let source = SwitchSource::HeldBack;
        let writing = self
            .own
            .begin(valid.iter().map(|(p, _)| p.user.clone()).collect());
        let started = Instant::now();
        let batch: Vec<PendingSwitch> = valid.iter().map(|(p, _)| p.clone()).collect();
        let mut applied = self.store.apply_pending(batch).await;
        self.metrics
            .store_write(StoreOp::ApplyPending)
            .observe(started.elapsed().as_secs_f64());
        if applied.len() != valid.len() {
            let e = StoreError::Unavailable(format!(
                "the store answered {} of {} held-back switches",
                applied.len(),
                valid.len()
            ));
            applied = vec![Err(e); valid.len()];
        }
        let records: Vec<Record> = applied
            .iter()
            .filter_map(|a| match a {
                Ok(PendingOutcome::Applied(record)) => Some(record.clone()),
                _ => None,
            })
            .collect();
        writing.finish(&user_revisions(&records));
        self.publish(&records).await;
        let mut results = valid.into_iter().zip(applied).map(|((pending, log), applied)| {
            match applied {
                Ok(PendingOutcome::Applied(record)) => {
                    self.metrics.count_switches(source, SwitchCount::Written, 1);
                    if log {
                        info!(
                            source = %source,
                            outcome = %SwitchCount::Written,
                            user = %pending.user,
                            coin = %pending.coin,
                            revision = record.revision,
                            "wrote a switch held back by the safety period"
                        );
                    }
                    DueOutcome::Written
                }
                Ok(PendingOutcome::Superseded) => {
                    if log {
                        info!(
                            source = %source,
                            user = %pending.user,
                            coin = %pending.coin,
                            "dropped a held-back switch: the user switched again since"
                        );
                    }
                    DueOutcome::Superseded
                }
                Ok(PendingOutcome::Gone) => DueOutcome::Gone,
                Err(e) => {
                    self.metrics.count_switches(source, SwitchCount::Failed, 1);
                    if log {
                        warn!(source = %source, outcome = %SwitchCount::Failed, user = %pending.user, coin = %pending.coin, error = %e, "cannot apply a due held-back switch; will retry");
                    }
                    self.held_back
                        .insert_at(pending, unix_now() + PENDING_RETRY_SECONDS);
                    DueOutcome::Failed
                }
            }
        });
        outcomes
            .into_iter()
            .map(|o| o.or_else(|| results.next()).unwrap_or(DueOutcome::Failed))
            .collect()
    }

    /// Waits until written records are in the index (the store's change stream brings them).
    async fn publish(&self, written: &[Record]) {
        let Some(highest) = written.iter().map(|r| r.revision).max() else {
            return;
        };
        if !self.index.wait_for(highest, WRITE_VISIBLE_TIMEOUT).await {
            warn!(
                revision = highest,
                "a write did not come back through the store's changes in time"
            );
        }
    }

    /// Ingests users listed in `coin`'s user list (SPEC §7): creates each absent user with
    /// `coin` (an existing user keeps its coin: its later switches survive re-reads), writes
    /// its case-index entry when one is kept, and records when it was first seen in the list
    /// (`seen_at`, Unix seconds) for the safety period. One result per user, in order; a coin
    /// that is not available fails the whole call. `creator` says how the results are counted.
    pub async fn create_users_if_absent(
        &self,
        coin: &str,
        users: Vec<String>,
        seen_at: u64,
        creator: Creator,
    ) -> Result<Vec<Result<Listed, SwitchError>>, InvalidInput> {
        self.settings.coins.check(coin)?;
        let results = self.create_checked(coin, users, seen_at).await;
        match creator {
            Creator::Ingestion => {
                let (mut created, mut existed, mut invalid) = (0, 0, 0);
                for result in &results {
                    match result {
                        Ok(Listed::Created(_)) => created += 1,
                        Ok(Listed::Existed) => existed += 1,
                        Err(SwitchError::Invalid(_)) => invalid += 1,
                        Err(SwitchError::Store(_)) => {}
                    }
                }
                self.metrics
                    .count_ingest_users(coin, created, existed, invalid);
            }
            Creator::AutoReg => {
                let source = SwitchSource::AutoReg;
                for result in &results {
                    match result {
                        // Nothing written: no switch.
                        Ok(Listed::Existed) => {}
                        other => {
                            let outcome = counted(other, |_| false);
                            self.metrics.count_switches(source, outcome, 1);
                        }
                    }
                }
            }
        }
        Ok(results)
    }

    /// [`SwitchCore::create_users_if_absent`] for an available coin.
    async fn create_checked(
        &self,
        coin: &str,
        users: Vec<String>,
        seen_at: u64,
    ) -> Vec<Result<Listed, SwitchError>> {
        let checked: Vec<Result<String, InvalidInput>> =
            users.iter().map(|u| self.normalize_user(u)).collect();
        let valid: Vec<&String> = checked.iter().filter_map(|c| c.as_ref().ok()).collect();
        let seen: Vec<String> = valid.iter().map(|u| (*u).clone()).collect();
        let mut writes: Vec<StoreWrite> = valid
            .iter()
            .map(|user| StoreWrite::SetUserCoin {
                user: (*user).clone(),
                coin: coin.to_owned(),
            })
            .collect();
        let users_written = writes.len();
        if self.settings.case_index {
            writes.extend(valid.iter().map(|user| StoreWrite::SetCaseIndex {
                lowercase_name: user.to_lowercase(),
                name: (*user).clone(),
            }));
        }
        let results = {
            let writing = self.own.begin(seen.clone());
            let create = async {
                let started = Instant::now();
                let results = self.store.create_if_absent(writes).await;
                self.metrics
                    .store_write(StoreOp::CreateIfAbsent)
                    .observe(started.elapsed().as_secs_f64());
                results
            };
            // First-seen times are recorded beside the creates, not before them.
            let (mut results, recorded) =
                tokio::join!(create, self.record_first_seen(coin, seen, seen_at));
            if let Err(e) = recorded {
                // Not recorded counts as never seen: that only delays a switch, never hurries
                // one.
                warn!(coin, error = %e, "cannot record first-seen times");
            }
            let created: Vec<Record> = results
                .iter()
                .filter_map(|r| r.as_ref().ok().and_then(|r| r.clone()))
                .collect();
            writing.finish(&user_revisions(&created));
            self.publish(&created).await;
            results.truncate(users_written);
            results
        };
        let mut results = results.into_iter();
        checked
            .into_iter()
            .map(|c| {
                c?;
                match results.next() {
                    Some(Ok(Some(Record {
                        key: RecordKey::User(user),
                        value: Some(coin),
                        revision,
                    }))) => Ok(Listed::Created(UserCoinRecord {
                        user,
                        coin,
                        revision,
                    })),
                    Some(Ok(None)) => Ok(Listed::Existed),
                    Some(Ok(Some(other))) => Err(SwitchError::Store(StoreError::Corrupt(format!(
                        "a user creation produced {other:?}"
                    )))),
                    Some(Err(e)) => Err(SwitchError::Store(e)),
                    None => Err(SwitchError::Store(StoreError::Unavailable(
                        "the store acknowledged fewer writes".into(),
                    ))),
                }
            })
            .collect()
    }

    /// Writes validated switches and gets them into the index; one result per switch.
    async fn write_switches(
        &self,
        switches: Vec<(String, String)>,
    ) -> Vec<Result<SwitchOutcome, StoreError>> {
        if switches.is_empty() {
            return Vec::new();
        }
        // Previous coins, as the index knows them before the write (a user twice in one batch
        // sees its first entry as previous).
        let mut previous: Vec<Option<String>> = Vec::with_capacity(switches.len());
        let mut in_batch: std::collections::HashMap<&str, &str> = Default::default();
        for (user, coin) in &switches {
            let before = in_batch
                .get(user.as_str())
                .map(|c| (*c).to_owned())
                .or_else(|| self.index.user_coin(user).map(|(c, _)| c));
            previous.push(before);
            in_batch.insert(user, coin);
        }
        let writes = switches
            .iter()
            .map(|(user, coin)| StoreWrite::SetUserCoin {
                user: user.clone(),
                coin: coin.clone(),
            })
            .collect();
        let writing = self
            .own
            .begin(switches.iter().map(|(user, _)| user.clone()).collect());
        let started = Instant::now();
        let mut results = self.store.write(writes).await;
        self.metrics
            .store_write(StoreOp::Write)
            .observe(started.elapsed().as_secs_f64());
        if results.len() != switches.len() {
            let e = StoreError::Unavailable(format!(
                "the store acknowledged {} of {} writes",
                results.len(),
                switches.len()
            ));
            results = vec![Err(e); switches.len()];
        }
        let written: Vec<Record> = results
            .iter()
            .filter_map(|r| r.as_ref().ok().cloned())
            .collect();
        writing.finish(&user_revisions(&written));
        self.publish(&written).await;
        results
            .into_iter()
            .zip(previous)
            .map(|(result, previous_coin)| match result? {
                Record {
                    key: RecordKey::User(user),
                    value: Some(coin),
                    revision,
                } => Ok(SwitchOutcome {
                    record: UserCoinRecord {
                        user,
                        coin,
                        revision,
                    },
                    previous_coin,
                    pending_until: None,
                }),
                other => Err(StoreError::Corrupt(format!(
                    "a user write produced {other:?}"
                ))),
            })
            .collect()
    }

    /// A piece of the service's own durable state (e.g. the scheduled pull's position).
    pub async fn marker(&self, name: &str) -> Result<Option<String>, StoreError> {
        self.store.get_marker(name).await
    }

    /// Sets such a piece of state.
    pub async fn set_marker(&self, name: &str, value: &str) -> Result<(), StoreError> {
        self.store.set_marker(name, value).await
    }

    /// Reads one user's coin; `Ok(None)` when the user has no record.
    pub fn user_coin(&self, user: &str) -> Result<Option<UserCoinRecord>, InvalidInput> {
        let user = self.normalize_user(user)?;
        Ok(self
            .index
            .user_coin(&user)
            .map(|(coin, revision)| UserCoinRecord {
                user,
                coin,
                revision,
            }))
    }

    /// Reads one user straight from the store, for a proxy's read-through at login: a user
    /// written a moment ago, by anyone, is found even before its change reaches the index.
    /// Outside case-insensitive mode, a name with no record is looked up in the case index too
    /// (when the store keeps one). `Ok(None)` when there is no such user.
    pub async fn read_user_fresh(&self, user: &str) -> Result<Option<UserCoinRecord>, SwitchError> {
        let user = self.normalize_user(user)?;
        let found = |record: Option<Record>| {
            record.and_then(|r| match (r.key, r.value) {
                (RecordKey::User(user), Some(coin)) => Some(UserCoinRecord {
                    user,
                    coin,
                    revision: r.revision,
                }),
                _ => None,
            })
        };
        let record = self
            .store
            .read_fresh(&RecordKey::User(user.clone()))
            .await?;
        if let Some(record) = found(record) {
            return Ok(Some(record));
        }
        if self.settings.case_insensitive || !self.settings.case_index {
            return Ok(None);
        }
        let lowercase = user.to_lowercase();
        let Some(Record {
            value: Some(canonical),
            ..
        }) = self
            .store
            .read_fresh(&RecordKey::CaseIndex(lowercase))
            .await?
        else {
            return Ok(None);
        };
        if canonical == user || validate_user(&canonical).is_err() {
            return Ok(None);
        }
        Ok(found(
            self.store.read_fresh(&RecordKey::User(canonical)).await?,
        ))
    }

    /// Up to `limit` users after `after` in name order, and the revision they were read at.
    pub fn list_user_coins(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> (Vec<UserCoinRecord>, Revision) {
        let (users, revision) = self.index.users_after(after, limit);
        (
            users
                .into_iter()
                .map(|(user, coin, revision)| UserCoinRecord {
                    user,
                    coin,
                    revision,
                })
                .collect(),
            revision,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::utc_text;

    #[test]
    fn unix_times_read_as_utc() {
        assert_eq!(utc_text(0), "1970-01-01T00:00:00Z");
        assert_eq!(utc_text(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(utc_text(1_796_259_723), "2026-12-03T01:02:03Z");
    }
}
