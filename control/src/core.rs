//! The switching core: what every API (gRPC today, HTTP for pool backends) calls to read and
//! change the user→coin state. It validates input, writes through the [`UserCoinStore`] and
//! applies the result to the [`UserCoinIndex`] that feeds the proxies. Adapters only translate.

use std::sync::Arc;

use thiserror::Error;
use tokio::sync::Mutex;

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
    /// Serializes store writes with their application to the index, so that the index (and
    /// every watcher) sees changes in revision order. A batch is one store write, so holding
    /// this costs one round trip per batch, not per user.
    write_order: Mutex<()>,
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
    /// Loads the store into a fresh index and builds the core over both.
    pub async fn open(
        store: Arc<dyn UserCoinStore>,
        settings: CoreSettings,
    ) -> Result<Self, StoreError> {
        let contents = store.load().await?;
        let index = Arc::new(UserCoinIndex::new(contents));
        Ok(Self {
            store,
            index,
            settings,
            write_order: Mutex::new(()),
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
        let mut outcomes = self.write_switches(vec![(user, coin.to_owned())]).await?;
        outcomes
            .pop()
            .ok_or_else(|| StoreError::Unavailable("the store acknowledged no write".into()).into())
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
        let mut written = match self.write_switches(valid).await {
            Ok(outcomes) => Ok(outcomes.into_iter()),
            Err(e) => Err(e),
        };
        Ok(checked
            .into_iter()
            .map(|c| match (c, &mut written) {
                (Err(invalid), _) => Err(SwitchError::Invalid(invalid)),
                (Ok(_), Ok(outcomes)) => outcomes.next().ok_or_else(|| {
                    StoreError::Unavailable("the store acknowledged fewer writes".into()).into()
                }),
                (Ok(_), Err(e)) => Err(SwitchError::Store(StoreError::Unavailable(e.to_string()))),
            })
            .collect())
    }

    /// Writes validated switches and applies them to the index.
    async fn write_switches(
        &self,
        switches: Vec<(String, String)>,
    ) -> Result<Vec<SwitchOutcome>, StoreError> {
        if switches.is_empty() {
            return Ok(Vec::new());
        }
        let _order = self.write_order.lock().await;
        // Previous coins, read under the write lock so that they are the ones each write
        // replaced (a user twice in one batch sees its first entry as previous).
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
        let records = self.store.write(writes).await?;
        if records.len() != switches.len() {
            return Err(StoreError::Unavailable(format!(
                "the store acknowledged {} of {} writes",
                records.len(),
                switches.len()
            )));
        }
        self.index.apply(records.clone());
        Ok(records
            .into_iter()
            .zip(previous)
            .filter_map(|(record, previous_coin)| match record {
                Record {
                    key: RecordKey::User(user),
                    value: Some(coin),
                    revision,
                } => Some(SwitchOutcome {
                    record: UserCoinRecord {
                        user,
                        coin,
                        revision,
                    },
                    previous_coin,
                }),
                _ => None,
            })
            .collect())
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
