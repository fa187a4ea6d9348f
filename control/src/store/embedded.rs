//! The embedded store: the user→coin state in a redb database in a data directory, for a single
//! node with no ZooKeeper. Durable: every write is committed to disk before it is acknowledged,
//! and the revision counter is stored with the data, so that revisions keep increasing across
//! restarts.
//!
//! The store emits its own writes on its change stream ([`UserCoinStore::changes`]): each
//! write transaction and the sending of its records happen under one lock, so batches leave in
//! revision order; the stream's buffer is bounded ([`CHANGE_BUFFER`]), so a consumer that
//! stalls holds writers back rather than growing memory.

use std::{
    path::Path,
    sync::{Arc, Mutex},
};

use async_trait::async_trait;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition, WriteTransaction};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::info;

use super::{
    CHANGE_BUFFER, ChangeReceiver, HoldSwitch, KeyPresence, PendingOutcome, PendingSwitch, Record,
    RecordKey, Revision, StoreChange, StoreContents, StoreError, StoreWrite, UserCoinStore,
};

/// user name → (revision, coin)
const USERS: TableDefinition<&str, (u64, &str)> = TableDefinition::new("users");
/// lowercase name → (revision, canonical name)
const CASE_INDEX: TableDefinition<&str, (u64, &str)> = TableDefinition::new("case_index");
/// user name → (apply at, coin): switches waiting for their safety period (written by earlier
/// versions, which did not date them; read as dated by the user's record when opened).
const PENDING: TableDefinition<&str, (u64, &str)> = TableDefinition::new("pending");
/// user name → (apply at, coin, the user's revision when held back).
const HELD: TableDefinition<&str, (u64, &str, u64)> = TableDefinition::new("held");
/// (coin, user name) → when the user was first seen in the coin's user list (Unix seconds).
const FIRST_SEEN: TableDefinition<(&str, &str), u64> = TableDefinition::new("first_seen");
/// name → value: small pieces of the service's own state (the scheduled pull's position).
const MARKERS: TableDefinition<&str, &str> = TableDefinition::new("markers");
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
    store_id: String,
    /// The change stream, once started; held while a write commits and sends its records,
    /// so that batches leave in revision order.
    changes: Arc<Mutex<ChangeSink>>,
}

/// Where the store's own writes go.
#[derive(Debug, Default)]
enum ChangeSink {
    /// [`UserCoinStore::changes`] was not called yet.
    #[default]
    NotStarted,
    /// Writes are sent here.
    Started(mpsc::Sender<StoreChange>),
    /// The consumer is gone (shutdown): writes are no longer announced.
    Closed,
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
            txn.open_table(HELD).map_err(unavailable)?;
            txn.open_table(FIRST_SEEN).map_err(unavailable)?;
            txn.open_table(MARKERS).map_err(unavailable)?;
            txn.open_table(COUNTERS).map_err(unavailable)?;
            let mut identity = txn.open_table(IDENTITY).map_err(unavailable)?;
            if identity.get(STORE_ID_KEY).map_err(unavailable)?.is_none() {
                let id = format!("embedded-{:032x}", rand::random::<u128>());
                identity
                    .insert(STORE_ID_KEY, id.as_str())
                    .map_err(unavailable)?;
                info!(path = %path.display(), store_id = %id, "created a new embedded store");
            }
            // Switches held back by an earlier version were not dated: date them by the
            // user's record now (any switch after this point is newer than them).
            let mut old_pending = txn.open_table(PENDING).map_err(unavailable)?;
            let mut undated = Vec::new();
            for row in old_pending.iter().map_err(unavailable)? {
                let (user, value) = row.map_err(unavailable)?;
                let (apply_at, coin) = value.value();
                undated.push((user.value().to_owned(), apply_at, coin.to_owned()));
            }
            let users = txn.open_table(USERS).map_err(unavailable)?;
            let mut held = txn.open_table(HELD).map_err(unavailable)?;
            for (user, apply_at, coin) in undated {
                let after = user_revision(&users, &user)?;
                held.insert(user.as_str(), (apply_at, coin.as_str(), after))
                    .map_err(unavailable)?;
                old_pending.remove(user.as_str()).map_err(unavailable)?;
            }
        }
        txn.commit().map_err(unavailable)?;
        let store_id = {
            let txn = db.begin_read().map_err(unavailable)?;
            txn.open_table(IDENTITY)
                .map_err(unavailable)?
                .get(STORE_ID_KEY)
                .map_err(unavailable)?
                .map(|v| v.value().to_owned())
                .ok_or_else(|| StoreError::Corrupt("the store has no identity".into()))?
        };
        Ok(Self {
            db: Arc::new(db),
            available: watch::Sender::new(true),
            store_id,
            changes: Arc::new(Mutex::new(ChangeSink::NotStarted)),
        })
    }

    fn sink(&self) -> std::sync::MutexGuard<'_, ChangeSink> {
        self.changes.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Commits a write transaction and announces its records, under the change lock, so that
    /// batches leave in revision order. Runs on a blocking thread: a full stream waits.
    fn commit_and_announce(
        &self,
        sink: &mut ChangeSink,
        txn: WriteTransaction,
        records: Vec<Record>,
    ) -> Result<(), StoreError> {
        txn.commit().map_err(unavailable)?;
        if records.is_empty() {
            return Ok(());
        }
        if let ChangeSink::Started(tx) = sink {
            let through = records.iter().map(|r| r.revision).max().unwrap_or(0);
            if tx.blocking_send(StoreChange { records, through }).is_err() {
                *sink = ChangeSink::Closed;
            }
        }
        Ok(())
    }

    /// The whole state, as read now; for tests and tools (the service reads it from the change
    /// stream's first batch).
    pub async fn load(&self) -> Result<StoreContents, StoreError> {
        let this = self.clone();
        tokio::task::spawn_blocking(move || this.load_blocking())
            .await
            .map_err(unavailable)?
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
        let mut sink = self.sink();
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
        let records = out.iter().flatten().cloned().collect();
        self.commit_and_announce(&mut sink, txn, records)?;
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

/// The user's record revision in a transaction (0: no record).
fn user_revision(
    users: &impl ReadableTable<&'static str, (u64, &'static str)>,
    user: &str,
) -> Result<Revision, StoreError> {
    Ok(users
        .get(user)
        .map_err(unavailable)?
        .map_or(0, |v| v.value().0))
}

#[async_trait]
impl UserCoinStore for EmbeddedStore {
    fn store_id(&self) -> &str {
        &self.store_id
    }

    fn changes(
        &self,
        _presence: Arc<dyn KeyPresence>,
        _shutdown: CancellationToken,
    ) -> Result<ChangeReceiver, StoreError> {
        if !matches!(*self.sink(), ChangeSink::NotStarted) {
            return Err(StoreError::Unavailable(
                "the embedded store's changes were already started".into(),
            ));
        }
        let (tx, rx) = mpsc::channel(CHANGE_BUFFER);
        let this = self.clone();
        // The snapshot and the switch to announcing happen under the change lock: a write
        // before it is in the snapshot, a write after it is announced.
        tokio::task::spawn_blocking(move || {
            let mut sink = this.sink();
            match this.load_blocking() {
                Ok(contents) => {
                    let first = StoreChange {
                        records: contents.records,
                        through: contents.revision,
                    };
                    *sink = if tx.blocking_send(first).is_ok() {
                        ChangeSink::Started(tx)
                    } else {
                        ChangeSink::Closed
                    };
                }
                Err(e) => {
                    tracing::error!(error = %e, "cannot read the embedded store");
                    *sink = ChangeSink::Closed;
                }
            }
        });
        Ok(rx)
    }

    async fn put_pending(
        &self,
        switches: Vec<HoldSwitch>,
    ) -> Vec<Result<PendingSwitch, StoreError>> {
        let count = switches.len();
        let result = self
            .blocking(move |db| {
                let txn = db.begin_write().map_err(unavailable)?;
                let mut out = Vec::with_capacity(switches.len());
                {
                    let users = txn.open_table(USERS).map_err(unavailable)?;
                    let mut held = txn.open_table(HELD).map_err(unavailable)?;
                    for s in switches {
                        let after = user_revision(&users, &s.user)?;
                        held.insert(s.user.as_str(), (s.apply_at, s.coin.as_str(), after))
                            .map_err(unavailable)?;
                        out.push(PendingSwitch {
                            user: s.user,
                            coin: s.coin,
                            apply_at: s.apply_at,
                            after,
                        });
                    }
                }
                txn.commit().map_err(unavailable)?;
                Ok(out)
            })
            .await;
        match result {
            Ok(out) => out.into_iter().map(Ok).collect(),
            Err(e) => vec![Err(e); count],
        }
    }

    async fn cancel_pending(&self, users: Vec<String>) -> Result<(), StoreError> {
        if users.is_empty() {
            return Ok(());
        }
        self.blocking(move |db| {
            let txn = db.begin_write().map_err(unavailable)?;
            {
                let mut held = txn.open_table(HELD).map_err(unavailable)?;
                for user in &users {
                    held.remove(user.as_str()).map_err(unavailable)?;
                }
            }
            txn.commit().map_err(unavailable)
        })
        .await
    }

    async fn apply_pending(
        &self,
        pending: Vec<PendingSwitch>,
    ) -> Vec<Result<PendingOutcome, StoreError>> {
        let count = pending.len();
        if count == 0 {
            return Vec::new();
        }
        let this = self.clone();
        // One transaction for the whole batch: each switch checked and applied in order.
        let result = tokio::task::spawn_blocking(move || {
            let mut sink = this.sink();
            let txn = this.db.begin_write().map_err(unavailable)?;
            let mut outcomes = Vec::with_capacity(pending.len());
            let mut records = Vec::new();
            {
                let mut held = txn.open_table(HELD).map_err(unavailable)?;
                let mut users = txn.open_table(USERS).map_err(unavailable)?;
                let mut counters = txn.open_table(COUNTERS).map_err(unavailable)?;
                let mut revision = counters
                    .get(REVISION_KEY)
                    .map_err(unavailable)?
                    .map_or(0, |v| v.value());
                for p in pending {
                    let current = held.get(p.user.as_str()).map_err(unavailable)?.map(|v| {
                        let (at, coin, after) = v.value();
                        (at, coin.to_owned(), after)
                    });
                    if current != Some((p.apply_at, p.coin.clone(), p.after)) {
                        outcomes.push(PendingOutcome::Gone);
                        continue;
                    }
                    held.remove(p.user.as_str()).map_err(unavailable)?;
                    if user_revision(&users, &p.user)? != p.after {
                        outcomes.push(PendingOutcome::Superseded);
                        continue;
                    }
                    revision += 1;
                    users
                        .insert(p.user.as_str(), (revision, p.coin.as_str()))
                        .map_err(unavailable)?;
                    let record = Record {
                        key: RecordKey::User(p.user),
                        value: Some(p.coin),
                        revision,
                    };
                    records.push(record.clone());
                    outcomes.push(PendingOutcome::Applied(record));
                }
                counters
                    .insert(REVISION_KEY, revision)
                    .map_err(unavailable)?;
            }
            this.commit_and_announce(&mut sink, txn, records)?;
            Ok::<_, StoreError>(outcomes)
        })
        .await
        .map_err(unavailable)
        .and_then(|r| r);
        match result {
            Ok(outcomes) => outcomes.into_iter().map(Ok).collect(),
            Err(e) => vec![Err(e); count],
        }
    }

    async fn pending(&self, user: &str) -> Result<Option<PendingSwitch>, StoreError> {
        let user = user.to_owned();
        self.blocking(move |db| {
            let txn = db.begin_read().map_err(unavailable)?;
            let table = txn.open_table(HELD).map_err(unavailable)?;
            Ok(table.get(user.as_str()).map_err(unavailable)?.map(|v| {
                let (apply_at, coin, after) = v.value();
                PendingSwitch {
                    user: user.clone(),
                    coin: coin.to_owned(),
                    apply_at,
                    after,
                }
            }))
        })
        .await
    }

    async fn all_pending(&self) -> Result<Vec<PendingSwitch>, StoreError> {
        self.blocking(|db| {
            let txn = db.begin_read().map_err(unavailable)?;
            let table = txn.open_table(HELD).map_err(unavailable)?;
            let mut out = Vec::new();
            for row in table.iter().map_err(unavailable)? {
                let (user, value) = row.map_err(unavailable)?;
                let (apply_at, coin, after) = value.value();
                out.push(PendingSwitch {
                    user: user.value().to_owned(),
                    coin: coin.to_owned(),
                    apply_at,
                    after,
                });
            }
            Ok(out)
        })
        .await
    }

    async fn first_seen(
        &self,
        coin: &str,
        users: Vec<String>,
    ) -> Result<Vec<Option<u64>>, StoreError> {
        let coin = coin.to_owned();
        self.blocking(move |db| {
            let txn = db.begin_read().map_err(unavailable)?;
            let table = txn.open_table(FIRST_SEEN).map_err(unavailable)?;
            users
                .iter()
                .map(|user| {
                    Ok(table
                        .get((coin.as_str(), user.as_str()))
                        .map_err(unavailable)?
                        .map(|v| v.value()))
                })
                .collect()
        })
        .await
    }

    async fn record_first_seen(
        &self,
        coin: &str,
        users: Vec<String>,
        seen_at: u64,
    ) -> Result<(), StoreError> {
        if users.is_empty() {
            return Ok(());
        }
        let coin = coin.to_owned();
        self.blocking(move |db| {
            let txn = db.begin_write().map_err(unavailable)?;
            {
                let mut table = txn.open_table(FIRST_SEEN).map_err(unavailable)?;
                for user in &users {
                    let key = (coin.as_str(), user.as_str());
                    let earlier = table
                        .get(key)
                        .map_err(unavailable)?
                        .is_some_and(|v| v.value() <= seen_at);
                    if !earlier {
                        table.insert(key, seen_at).map_err(unavailable)?;
                    }
                }
            }
            txn.commit().map_err(unavailable)
        })
        .await
    }

    async fn get_marker(&self, name: &str) -> Result<Option<String>, StoreError> {
        let name = name.to_owned();
        self.blocking(move |db| {
            let txn = db.begin_read().map_err(unavailable)?;
            let table = txn.open_table(MARKERS).map_err(unavailable)?;
            Ok(table
                .get(name.as_str())
                .map_err(unavailable)?
                .map(|v| v.value().to_owned()))
        })
        .await
    }

    async fn set_marker(&self, name: &str, value: &str) -> Result<(), StoreError> {
        let (name, value) = (name.to_owned(), value.to_owned());
        self.blocking(move |db| {
            let txn = db.begin_write().map_err(unavailable)?;
            txn.open_table(MARKERS)
                .map_err(unavailable)?
                .insert(name.as_str(), value.as_str())
                .map_err(unavailable)?;
            txn.commit().map_err(unavailable)
        })
        .await
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

    fn available(&self) -> watch::Receiver<bool> {
        self.available.subscribe()
    }

    fn parts(&self) -> Vec<(&'static str, watch::Receiver<bool>)> {
        Vec::new()
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
