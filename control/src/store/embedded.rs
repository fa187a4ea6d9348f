//! The embedded store: the user→coin state in a redb database in a data directory, for a single
//! node with no ZooKeeper. Durable: every write is committed to disk before it is acknowledged,
//! and the revision counter is stored with the data, so that revisions keep increasing across
//! restarts.

use std::{path::Path, sync::Arc};

use async_trait::async_trait;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::info;

use super::{
    PendingSwitch, Record, RecordKey, Revision, StoreContents, StoreError, StoreWrite,
    UserCoinStore,
};
use crate::index::UserCoinIndex;

/// user name → (revision, coin)
const USERS: TableDefinition<&str, (u64, &str)> = TableDefinition::new("users");
/// lowercase name → (revision, canonical name)
const CASE_INDEX: TableDefinition<&str, (u64, &str)> = TableDefinition::new("case_index");
/// user name → (apply at, coin): switches waiting for their safety period.
const PENDING: TableDefinition<&str, (u64, &str)> = TableDefinition::new("pending");
/// "revision" → the highest revision handed out.
const COUNTERS: TableDefinition<&str, u64> = TableDefinition::new("counters");
/// "store_id" → the random identity made when the database was created.
const IDENTITY: TableDefinition<&str, &str> = TableDefinition::new("identity");

const REVISION_KEY: &str = "revision";
const STORE_ID_KEY: &str = "store_id";

/// The file name of the database inside the data directory.
pub const DATABASE_FILE: &str = "switchyard.redb";

/// The user→coin state in a redb file.
#[derive(Clone)]
pub struct EmbeddedStore {
    db: Arc<Database>,
    /// Always `true`: a local file is always there.
    available: watch::Sender<bool>,
}

impl std::fmt::Debug for EmbeddedStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedStore").finish_non_exhaustive()
    }
}

fn unavailable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

impl EmbeddedStore {
    /// Opens (or creates) the database in `data_dir`, creating the directory when missing.
    pub fn open(data_dir: &Path) -> Result<Self, StoreError> {
        std::fs::create_dir_all(data_dir).map_err(|e| {
            StoreError::Unavailable(format!(
                "cannot create data directory {}: {e}",
                data_dir.display()
            ))
        })?;
        let path = data_dir.join(DATABASE_FILE);
        let db = Database::create(&path)
            .map_err(|e| StoreError::Unavailable(format!("cannot open {}: {e}", path.display())))?;
        let txn = db.begin_write().map_err(unavailable)?;
        {
            txn.open_table(USERS).map_err(unavailable)?;
            txn.open_table(CASE_INDEX).map_err(unavailable)?;
            txn.open_table(PENDING).map_err(unavailable)?;
            txn.open_table(COUNTERS).map_err(unavailable)?;
            let mut identity = txn.open_table(IDENTITY).map_err(unavailable)?;
            if identity.get(STORE_ID_KEY).map_err(unavailable)?.is_none() {
                let id = format!("embedded-{:032x}", rand::random::<u128>());
                identity
                    .insert(STORE_ID_KEY, id.as_str())
                    .map_err(unavailable)?;
                info!(path = %path.display(), store_id = %id, "created a new embedded store");
            }
        }
        txn.commit().map_err(unavailable)?;
        Ok(Self {
            db: Arc::new(db),
            available: watch::Sender::new(true),
        })
    }

    fn load_blocking(&self) -> Result<StoreContents, StoreError> {
        let txn = self.db.begin_read().map_err(unavailable)?;
        let store_id = txn
            .open_table(IDENTITY)
            .map_err(unavailable)?
            .get(STORE_ID_KEY)
            .map_err(unavailable)?
            .map(|v| v.value().to_owned())
            .ok_or_else(|| StoreError::Corrupt("the store has no identity".into()))?;
        let revision = txn
            .open_table(COUNTERS)
            .map_err(unavailable)?
            .get(REVISION_KEY)
            .map_err(unavailable)?
            .map(|v| v.value())
            .unwrap_or(0);
        let mut records = Vec::new();
        for (table, make_key) in [
            (USERS, RecordKey::User as fn(String) -> RecordKey),
            (CASE_INDEX, RecordKey::CaseIndex),
        ] {
            let table = txn.open_table(table).map_err(unavailable)?;
            for row in table.iter().map_err(unavailable)? {
                let (key, value) = row.map_err(unavailable)?;
                let (rev, value) = value.value();
                if rev > revision {
                    return Err(StoreError::Corrupt(format!(
                        "record {:?} has revision {rev} above the store's {revision}",
                        key.value()
                    )));
                }
                records.push(Record {
                    key: make_key(key.value().to_owned()),
                    value: Some(value.to_owned()),
                    revision: rev,
                });
            }
        }
        Ok(StoreContents {
            records,
            revision,
            store_id,
        })
    }

    /// Makes `writes` in one transaction, each with the next revision. With `only_absent`, a
    /// record that exists is kept and its entry is `None`.
    fn write_blocking(
        &self,
        writes: Vec<StoreWrite>,
        only_absent: bool,
    ) -> Result<Vec<Option<Record>>, StoreError> {
        let txn = self.db.begin_write().map_err(unavailable)?;
        let mut out = Vec::with_capacity(writes.len());
        {
            let mut counters = txn.open_table(COUNTERS).map_err(unavailable)?;
            let mut revision: Revision = counters
                .get(REVISION_KEY)
                .map_err(unavailable)?
                .map(|v| v.value())
                .unwrap_or(0);
            let mut users = txn.open_table(USERS).map_err(unavailable)?;
            let mut case_index = txn.open_table(CASE_INDEX).map_err(unavailable)?;
            for write in writes {
                let (table, key, value, make_key) = match write {
                    StoreWrite::SetUserCoin { user, coin } => (
                        &mut users,
                        user,
                        coin,
                        RecordKey::User as fn(String) -> RecordKey,
                    ),
                    StoreWrite::SetCaseIndex {
                        lowercase_name,
                        name,
                    } => (
                        &mut case_index,
                        lowercase_name,
                        name,
                        RecordKey::CaseIndex as _,
                    ),
                };
                if only_absent && table.get(key.as_str()).map_err(unavailable)?.is_some() {
                    out.push(None);
                    continue;
                }
                revision += 1;
                table
                    .insert(key.as_str(), (revision, value.as_str()))
                    .map_err(unavailable)?;
                out.push(Some(Record {
                    key: make_key(key),
                    value: Some(value),
                    revision,
                }));
            }
            counters
                .insert(REVISION_KEY, revision)
                .map_err(unavailable)?;
        }
        txn.commit().map_err(unavailable)?;
        Ok(out)
    }

    /// Runs [`Self::write_blocking`] off the async threads; every write is made, or none (then
    /// every entry carries the error).
    async fn write_all(
        &self,
        writes: Vec<StoreWrite>,
        only_absent: bool,
    ) -> Vec<Result<Option<Record>, StoreError>> {
        if writes.is_empty() {
            return Vec::new();
        }
        let count = writes.len();
        let this = self.clone();
        let result = tokio::task::spawn_blocking(move || this.write_blocking(writes, only_absent))
            .await
            .map_err(unavailable)
            .and_then(|r| r);
        match result {
            Ok(records) => records.into_iter().map(Ok).collect(),
            Err(e) => vec![Err(e); count],
        }
    }
}

impl EmbeddedStore {
    /// Runs `f` on a blocking thread.
    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Database) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let db = Arc::clone(&self.db);
        tokio::task::spawn_blocking(move || f(&db))
            .await
            .map_err(unavailable)?
    }
}

#[async_trait]
impl UserCoinStore for EmbeddedStore {
    async fn put_pending(&self, pending: &PendingSwitch) -> Result<(), StoreError> {
        let p = pending.clone();
        self.blocking(move |db| {
            let txn = db.begin_write().map_err(unavailable)?;
            txn.open_table(PENDING)
                .map_err(unavailable)?
                .insert(p.user.as_str(), (p.apply_at, p.coin.as_str()))
                .map_err(unavailable)?;
            txn.commit().map_err(unavailable)
        })
        .await
    }

    async fn take_pending(
        &self,
        user: &str,
        only: Option<&PendingSwitch>,
    ) -> Result<bool, StoreError> {
        let user = user.to_owned();
        let only = only.cloned();
        self.blocking(move |db| {
            let txn = db.begin_write().map_err(unavailable)?;
            let removed = {
                let mut table = txn.open_table(PENDING).map_err(unavailable)?;
                let current = table.get(user.as_str()).map_err(unavailable)?.map(|v| {
                    let (apply_at, coin) = v.value();
                    (apply_at, coin.to_owned())
                });
                let matches = match (&current, &only) {
                    (None, _) => false,
                    (Some(_), None) => true,
                    (Some((at, coin)), Some(p)) => *at == p.apply_at && *coin == p.coin,
                };
                if matches {
                    table.remove(user.as_str()).map_err(unavailable)?;
                }
                matches
            };
            txn.commit().map_err(unavailable)?;
            Ok(removed)
        })
        .await
    }

    async fn pending(&self, user: &str) -> Result<Option<PendingSwitch>, StoreError> {
        let user = user.to_owned();
        self.blocking(move |db| {
            let txn = db.begin_read().map_err(unavailable)?;
            let table = txn.open_table(PENDING).map_err(unavailable)?;
            Ok(table.get(user.as_str()).map_err(unavailable)?.map(|v| {
                let (apply_at, coin) = v.value();
                PendingSwitch {
                    user: user.clone(),
                    coin: coin.to_owned(),
                    apply_at,
                }
            }))
        })
        .await
    }

    async fn all_pending(&self) -> Result<Vec<PendingSwitch>, StoreError> {
        self.blocking(|db| {
            let txn = db.begin_read().map_err(unavailable)?;
            let table = txn.open_table(PENDING).map_err(unavailable)?;
            let mut out = Vec::new();
            for row in table.iter().map_err(unavailable)? {
                let (user, value) = row.map_err(unavailable)?;
                let (apply_at, coin) = value.value();
                out.push(PendingSwitch {
                    user: user.value().to_owned(),
                    coin: coin.to_owned(),
                    apply_at,
                });
            }
            Ok(out)
        })
        .await
    }

    async fn load(&self) -> Result<StoreContents, StoreError> {
        let this = self.clone();
        tokio::task::spawn_blocking(move || this.load_blocking())
            .await
            .map_err(unavailable)?
    }

    async fn read_fresh(&self, key: &RecordKey) -> Result<Option<Record>, StoreError> {
        // Every write is committed before it is acknowledged: a read sees them all.
        let key = key.clone();
        self.blocking(move |db| {
            let txn = db.begin_read().map_err(unavailable)?;
            let (table, name) = match &key {
                RecordKey::User(name) => (USERS, name),
                RecordKey::CaseIndex(name) => (CASE_INDEX, name),
            };
            let table = txn.open_table(table).map_err(unavailable)?;
            let row = table.get(name.as_str()).map_err(unavailable)?;
            Ok(row.map(|row| {
                let (revision, value) = row.value();
                Record {
                    key: key.clone(),
                    value: Some(value.to_owned()),
                    revision,
                }
            }))
        })
        .await
    }

    async fn write(&self, writes: Vec<StoreWrite>) -> Vec<Result<Record, StoreError>> {
        self.write_all(writes, false)
            .await
            .into_iter()
            .map(|r| {
                r.and_then(|record| {
                    record.ok_or_else(|| StoreError::Corrupt("a write made no record".into()))
                })
            })
            .collect()
    }

    async fn create_if_absent(
        &self,
        writes: Vec<StoreWrite>,
    ) -> Vec<Result<Option<Record>, StoreError>> {
        self.write_all(writes, true).await
    }

    fn follow(&self, _index: Arc<UserCoinIndex>, _shutdown: CancellationToken) -> bool {
        false
    }

    fn available(&self) -> watch::Receiver<bool> {
        self.available.subscribe()
    }

    fn kind(&self) -> &'static str {
        "embedded"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(user: &str, coin: &str) -> StoreWrite {
        StoreWrite::SetUserCoin {
            user: user.into(),
            coin: coin.into(),
        }
    }

    #[tokio::test]
    async fn writes_survive_reopening_and_revisions_keep_growing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let first_id;
        {
            let store = EmbeddedStore::open(dir.path()).expect("open");
            let written: Vec<Record> = store
                .write(vec![set("alice", "btc"), set("bob", "bch")])
                .await
                .into_iter()
                .collect::<Result<_, _>>()
                .expect("write");
            assert_eq!(
                written.iter().map(|r| r.revision).collect::<Vec<_>>(),
                vec![1, 2]
            );
            let contents = store.load().await.expect("load");
            first_id = contents.store_id;
        }
        let store = EmbeddedStore::open(dir.path()).expect("reopen");
        let contents = store.load().await.expect("load");
        assert_eq!(contents.store_id, first_id);
        assert_eq!(contents.revision, 2);
        assert_eq!(contents.records.len(), 2);
        let written = store.write(vec![set("alice", "bch")]).await;
        assert_eq!(written[0].as_ref().expect("written").revision, 3);
        let contents = store.load().await.expect("load");
        let alice = contents
            .records
            .iter()
            .find(|r| r.key == RecordKey::User("alice".into()))
            .expect("alice");
        assert_eq!(alice.value.as_deref(), Some("bch"));
        assert_eq!(alice.revision, 3);
    }
}
