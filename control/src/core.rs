//! The switching core: what every API (gRPC today, HTTP for pool backends) calls to read and
//! change the user→coin state. It validates input, writes through the [`UserCoinStore`] and
//! applies the result to the [`UserCoinIndex`] that feeds the proxies. Adapters only translate.

use std::{
    collections::{BTreeSet, HashMap, HashSet},
    sync::{Arc, RwLock},
    time::Duration,
};

use thiserror::Error;
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::{
    index::UserCoinIndex,
    store::{PendingSwitch, Record, RecordKey, Revision, StoreError, StoreWrite, UserCoinStore},
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

/// How long a store that feeds the index itself may take to deliver its state at start-up.
const STATE_LOAD_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a write may take to come back through such a store's feed before the call returns
/// anyway (the write is durable; the index catches up).
const WRITE_VISIBLE_TIMEOUT: Duration = Duration::from_secs(10);

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

/// How often held-back switches are looked for.
const PENDING_POLL: Duration = Duration::from_secs(1);

/// The switching core; see the module doc.
pub struct SwitchCore {
    store: Arc<dyn UserCoinStore>,
    index: Arc<UserCoinIndex>,
    settings: CoreSettings,
    /// For a store the core applies its own writes to (see [`UserCoinStore::follow`]):
    /// serializes store writes with their application to the index, so that the index (and
    /// every watcher) sees changes in revision order. A batch is one store write, so holding
    /// this costs one store write per batch, not per user.
    write_order: Mutex<()>,
    /// The store feeds the index itself; writes wait until their records are in.
    followed: bool,
    /// When each user was first seen in each coin's user list (coin → user → Unix seconds),
    /// as reported by ingestion; read by the safety period. Kept in memory: after a restart a
    /// user counts as never seen, which only delays a switch, never hurries one.
    first_seen: RwLock<HashMap<String, HashMap<String, u64>>>,
    /// Users with a held-back switch, as last read from the store, so that an immediate switch
    /// knows which pending ones to cancel without asking the store for every user.
    pending_users: std::sync::Mutex<HashSet<String>>,
}

impl std::fmt::Debug for SwitchCore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SwitchCore")
            .field("store", &self.store.kind())
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl SwitchCore {
    /// Loads the store into a fresh index and builds the core over both. A store that feeds
    /// the index itself keeps doing so until `shutdown`.
    pub async fn open(
        store: Arc<dyn UserCoinStore>,
        settings: CoreSettings,
        shutdown: CancellationToken,
    ) -> Result<Self, StoreError> {
        let contents = store.load().await?;
        let index = Arc::new(UserCoinIndex::new(contents));
        let followed = store.follow(Arc::clone(&index), shutdown);
        if followed && !index.wait_for(1, STATE_LOAD_TIMEOUT).await {
            return Err(StoreError::Unavailable(format!(
                "the {} store did not deliver its state within {STATE_LOAD_TIMEOUT:?}",
                store.kind()
            )));
        }
        Ok(Self {
            store,
            index,
            settings,
            write_order: Mutex::new(()),
            followed,
            first_seen: RwLock::new(HashMap::new()),
            pending_users: std::sync::Mutex::new(HashSet::new()),
        })
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

    /// Switches one user; see [`SwitchCore::switch_coins`].
    pub async fn switch_coin(&self, user: &str, coin: &str) -> Result<SwitchOutcome, SwitchError> {
        let user = self.normalize_user(user)?;
        self.settings.coins.check(coin)?;
        let mut outcomes = self.apply_valid(vec![(user, coin.to_owned())]).await;
        outcomes
            .pop()
            .unwrap_or_else(|| {
                Err(StoreError::Unavailable(
                    "the store acknowledged no write".into(),
                ))
            })
            .map_err(Into::into)
    }

    /// Switches many users. Every entry is validated on its own; the valid ones are written in
    /// one store write, in request order. The answer has one result per entry, in order.
    pub async fn switch_coins(
        &self,
        switches: Vec<(String, String)>,
    ) -> Result<Vec<Result<SwitchOutcome, SwitchError>>, BatchError> {
        if switches.is_empty() {
            return Err(BatchError::Empty);
        }
        if switches.len() > self.settings.max_batch {
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
        let mut written = self.apply_valid(valid).await.into_iter();
        Ok(checked
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
            .collect())
    }

    /// Records when `users` were first seen in `coin`'s user list (the earliest time wins).
    pub fn record_first_seen<'a>(
        &self,
        coin: &str,
        users: impl IntoIterator<Item = &'a str>,
        at: u64,
    ) {
        let mut first_seen = self.first_seen.write().unwrap_or_else(|e| e.into_inner());
        let coin = first_seen.entry(coin.to_owned()).or_default();
        for user in users {
            coin.entry(user.to_owned()).or_insert(at);
        }
    }

    /// When a switch of `user` to `coin` may be written, if not now.
    fn held_back_until(&self, user: &str, coin: &str, now: u64) -> Option<u64> {
        let safety = self.settings.safety.as_ref()?;
        if !safety.coins.contains(coin) || self.index.user_coin(user).is_none() {
            return None;
        }
        let period = safety.period.as_secs();
        let seen = self
            .first_seen
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(coin)
            .and_then(|users| users.get(user).copied());
        let due = match seen {
            Some(at) => at.saturating_add(period),
            None => now.saturating_add(period),
        };
        (due > now).then_some(due)
    }

    fn pending_view(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        self.pending_users.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Applies validated switches: held back by the safety period (recorded as pending) or
    /// written at once (cancelling the user's pending switch). One result per switch.
    async fn apply_valid(
        &self,
        switches: Vec<(String, String)>,
    ) -> Vec<Result<SwitchOutcome, StoreError>> {
        let now = unix_now();
        let mut results: Vec<Option<Result<SwitchOutcome, StoreError>>> =
            (0..switches.len()).map(|_| None).collect();
        let mut immediate = Vec::new();
        let mut immediate_at = Vec::new();
        for (i, (user, coin)) in switches.into_iter().enumerate() {
            match self.held_back_until(&user, &coin, now) {
                Some(apply_at) => {
                    let pending = PendingSwitch {
                        user: user.clone(),
                        coin: coin.clone(),
                        apply_at,
                    };
                    let outcome = match self.store.put_pending(&pending).await {
                        Ok(()) => {
                            self.pending_view().insert(user.clone());
                            info!(
                                user,
                                coin, apply_at, "switch held back by the safety period"
                            );
                            let (current, revision) =
                                self.index.user_coin(&user).unwrap_or_default();
                            Ok(SwitchOutcome {
                                record: UserCoinRecord {
                                    user,
                                    coin: current.clone(),
                                    revision,
                                },
                                previous_coin: Some(current),
                                pending_until: Some(apply_at),
                            })
                        }
                        Err(e) => Err(e),
                    };
                    results[i] = Some(outcome);
                }
                None => {
                    immediate_at.push(i);
                    immediate.push((user, coin));
                }
            }
        }
        // An immediate switch replaces a switch still waiting for its safety period.
        let cancel: Vec<String> = {
            let view = self.pending_view();
            immediate
                .iter()
                .filter(|(user, _)| view.contains(user))
                .map(|(user, _)| user.clone())
                .collect()
        };
        for user in cancel {
            match self.store.take_pending(&user, None).await {
                Ok(_) => {
                    self.pending_view().remove(&user);
                }
                Err(e) => warn!(user, error = %e, "could not cancel a pending switch"),
            }
        }
        for (i, outcome) in immediate_at
            .into_iter()
            .zip(self.write_switches(immediate).await)
        {
            results[i] = Some(outcome);
        }
        results
            .into_iter()
            .map(|r| {
                r.unwrap_or_else(|| Err(StoreError::Unavailable("switch not processed".into())))
            })
            .collect()
    }

    /// The user's switch held back by the safety period, if any.
    pub async fn pending_switch(&self, user: &str) -> Result<Option<PendingSwitch>, SwitchError> {
        let user = self.normalize_user(user)?;
        Ok(self.store.pending(&user).await?)
    }

    /// Writes held-back switches when they are due, until `shutdown`. Any replica may write a
    /// due switch; taking it from the store first makes sure only one does.
    pub async fn run_pending(self: Arc<Self>, shutdown: CancellationToken) {
        let mut poll = tokio::time::interval(PENDING_POLL);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = poll.tick() => {}
            }
            let all = match self.store.all_pending().await {
                Ok(all) => all,
                Err(e) => {
                    warn!(error = %e, "cannot read pending switches; will retry");
                    continue;
                }
            };
            *self.pending_view() = all.iter().map(|p| p.user.clone()).collect();
            let now = unix_now();
            for pending in all.into_iter().filter(|p| p.apply_at <= now) {
                self.apply_pending(pending).await;
            }
        }
    }

    async fn apply_pending(&self, pending: PendingSwitch) {
        let valid = validate_user(&pending.user).is_ok()
            && self.settings.coins.check(&pending.coin).is_ok();
        match self.store.take_pending(&pending.user, Some(&pending)).await {
            Ok(true) => {}
            Ok(false) => return, // replaced, cancelled, or applied by another replica
            Err(e) => {
                warn!(user = %pending.user, error = %e, "cannot take a due pending switch; will retry");
                return;
            }
        }
        self.pending_view().remove(&pending.user);
        if !valid {
            warn!(user = %pending.user, coin = %pending.coin, "dropped a pending switch with an invalid user or coin");
            return;
        }
        let written = self
            .write_switches(vec![(pending.user.clone(), pending.coin.clone())])
            .await;
        match written.into_iter().next() {
            Some(Ok(outcome)) => info!(
                user = %outcome.record.user,
                coin = %outcome.record.coin,
                revision = outcome.record.revision,
                "wrote a switch after its safety period"
            ),
            other => {
                warn!(user = %pending.user, result = ?other, "writing a due switch failed; it stays pending");
                if let Err(e) = self.store.put_pending(&pending).await {
                    warn!(user = %pending.user, error = %e, "could not put the switch back; it is lost");
                }
            }
        }
    }

    /// Gets written records into the index: applies them (a store the core applies its own
    /// writes to; the caller holds `write_order`), or waits until the store's feed has.
    async fn publish(&self, written: Vec<Record>) {
        let highest = written.iter().map(|r| r.revision).max().unwrap_or(0);
        if self.followed {
            if !self.index.wait_for(highest, WRITE_VISIBLE_TIMEOUT).await {
                warn!(
                    revision = highest,
                    "a write did not come back through the store's feed in time"
                );
            }
        } else if !written.is_empty() {
            self.index.apply(written, highest);
        }
    }

    /// Ingests users listed in `coin`'s user list (SPEC §7): creates each absent user with
    /// `coin` (an existing user keeps its coin: its later switches survive re-reads), writes
    /// its case-index entry when one is kept, and records when it was first seen in the list
    /// (`seen_at`, Unix seconds) for the safety period. One result per user, in order; a coin
    /// that is not available fails the whole call.
    pub async fn create_users_if_absent(
        &self,
        coin: &str,
        users: Vec<String>,
        seen_at: u64,
    ) -> Result<Vec<Result<Listed, SwitchError>>, InvalidInput> {
        self.settings.coins.check(coin)?;
        let checked: Vec<Result<String, InvalidInput>> =
            users.iter().map(|u| self.normalize_user(u)).collect();
        let valid: Vec<&String> = checked.iter().filter_map(|c| c.as_ref().ok()).collect();
        self.record_first_seen(coin, valid.iter().map(|u| u.as_str()), seen_at);
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
            let _order = if self.followed {
                None
            } else {
                Some(self.write_order.lock().await)
            };
            let mut results = self.store.create_if_absent(writes).await;
            let created: Vec<Record> = results
                .iter()
                .filter_map(|r| r.as_ref().ok().and_then(|r| r.clone()))
                .collect();
            self.publish(created).await;
            results.truncate(users_written);
            results
        };
        let mut results = results.into_iter();
        Ok(checked
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
            .collect())
    }

    /// Writes validated switches and gets them into the index; one result per switch.
    async fn write_switches(
        &self,
        switches: Vec<(String, String)>,
    ) -> Vec<Result<SwitchOutcome, StoreError>> {
        if switches.is_empty() {
            return Vec::new();
        }
        let _order = if self.followed {
            None
        } else {
            Some(self.write_order.lock().await)
        };
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
        let mut results = self.store.write(writes).await;
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
        self.publish(written).await;
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
