//! The switching core: what every API (gRPC today, HTTP for pool backends) calls to read and
//! change the user→coin state. It validates input, writes through the [`UserCoinStore`] and
//! applies the result to the [`UserCoinIndex`] that feeds the proxies. Adapters only translate.

use std::{sync::Arc, time::Duration};

use thiserror::Error;
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::{
    index::UserCoinIndex,
    store::{Record, RecordKey, Revision, StoreError, StoreWrite, UserCoinStore},
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
}

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
        let mut outcomes = self.write_switches(vec![(user, coin.to_owned())]).await;
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
        let mut written = self.write_switches(valid).await.into_iter();
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
