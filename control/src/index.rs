//! The in-memory index of the user→coin state: every record with its revision, answered from
//! memory, and fanned out to watchers (the proxies' WatchSwitches streams).
//!
//! Changes are applied in batches ([`UserCoinIndex::apply`]), each with the revision through
//! which the index is then complete (every change at or below it is in), and announced on a
//! broadcast channel while the index is locked for writing, so that a watcher that subscribes under the
//! read lock gets a consistent starting point and then every later change, with no gap and no
//! overlap. A watcher that falls behind the channel re-reads what it missed from the index
//! ([`UserCoinIndex::changes_since`]); nothing is ever lost.

use std::{
    collections::{BTreeMap, BTreeSet},
    ops::Bound,
    sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard},
};

use tokio::sync::{broadcast, watch};

use crate::store::{Record, RecordKey, Revision, StoreContents};

/// How many change batches a slow watcher may fall behind before it has to re-read from the
/// index. Re-reading is correct, only slower, so this bounds memory, not correctness.
const BROADCAST_CAPACITY: usize = 1024;

/// A group of changes applied together, in increasing revision order.
#[derive(Debug, Clone)]
pub struct ChangeBatch {
    /// The records, in increasing revision order.
    pub records: Arc<[Record]>,
    /// The index revision once the batch is applied: every change at or below it is in the
    /// index, so a watcher that applied this batch may resume from it.
    pub revision: Revision,
    /// The batch's place in the order batches were applied: one more than the batch before.
    pub seq: u64,
}

/// A record's current value and revision.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry {
    value: Option<String>,
    revision: Revision,
}

#[derive(Debug, Default)]
struct IndexState {
    records: BTreeMap<RecordKey, Entry>,
    /// Each key once, at its latest revision: the order changes are replayed in. Keyed by the
    /// pair because two records may share a revision (a removal is dated by its directory's
    /// last child change, which may also be another node's creation).
    by_revision: BTreeSet<(Revision, RecordKey)>,
    revision: Revision,
    /// The `seq` of the last batch applied.
    seq: u64,
    live_users: usize,
}

/// Where a new watcher starts.
#[derive(Debug)]
pub enum WatchStart {
    /// A full snapshot: every live record, then changes after `revision`.
    Snapshot {
        /// Every live record, users first in name order, then case-index entries.
        records: Vec<Record>,
        /// The revision the snapshot is at.
        revision: Revision,
    },
    /// Only the changes after the watcher's revision, in revision order.
    Resume {
        /// The records changed since the watcher's revision, in revision order.
        records: Vec<Record>,
        /// The revision the watcher is at after applying them.
        revision: Revision,
    },
}

/// The in-memory user→coin index; see the module doc.
#[derive(Debug)]
pub struct UserCoinIndex {
    state: RwLock<IndexState>,
    changes: broadcast::Sender<ChangeBatch>,
    /// The index revision, for callers waiting until their writes are in.
    published: watch::Sender<Revision>,
    store_id: String,
}

impl UserCoinIndex {
    /// Builds the index from a store's contents.
    pub fn new(contents: StoreContents) -> Self {
        let mut state = IndexState {
            revision: contents.revision,
            ..IndexState::default()
        };
        for record in contents.records {
            state.insert(record);
        }
        let (changes, _) = broadcast::channel(BROADCAST_CAPACITY);
        Self {
            published: watch::Sender::new(state.revision),
            state: RwLock::new(state),
            changes,
            store_id: contents.store_id,
        }
    }

    /// The identity of the store whose revisions this index carries.
    pub fn store_id(&self) -> &str {
        &self.store_id
    }

    // A poisoned lock only means a panic elsewhere; the maps themselves are always left
    // consistent (every mutation is a single insert/remove pair), so keep serving.
    fn read(&self) -> RwLockReadGuard<'_, IndexState> {
        self.state.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, IndexState> {
        self.state.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Applies records and announces them to watchers. `through` is the revision through which
    /// the index is complete once they are in (at least the highest of their revisions).
    /// Records at or below the revision the index already holds for their key are skipped.
    pub fn apply(&self, mut records: Vec<Record>, through: Revision) {
        records.sort_by_key(|r| r.revision);
        let mut state = self.write();
        let applied: Vec<Record> = records
            .into_iter()
            .filter(|r| {
                state
                    .records
                    .get(&r.key)
                    .is_none_or(|e| e.revision < r.revision)
            })
            .collect();
        for record in &applied {
            state.insert(record.clone());
        }
        let before = state.revision;
        state.revision = state.revision.max(through);
        if !applied.is_empty() {
            state.seq += 1;
            // No receiver is not an error: nobody is watching.
            let _ = self.changes.send(ChangeBatch {
                records: applied.into(),
                revision: state.revision,
                seq: state.seq,
            });
        }
        if state.revision != before {
            self.published.send_replace(state.revision);
        }
    }

    /// Waits until the index revision reaches `revision`; `false` when `timeout` passes first.
    pub async fn wait_for(&self, revision: Revision, timeout: std::time::Duration) -> bool {
        let mut published = self.published.subscribe();
        tokio::time::timeout(timeout, published.wait_for(|r| *r >= revision))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// The revision of the latest change applied.
    pub fn revision(&self) -> Revision {
        self.read().revision
    }

    /// How many users exist.
    pub fn user_count(&self) -> usize {
        self.read().live_users
    }

    /// Whether the index holds a live record for `key`.
    pub fn contains(&self, key: &RecordKey) -> bool {
        self.read()
            .records
            .get(key)
            .is_some_and(|entry| entry.value.is_some())
    }

    /// A user's coin and the revision that wrote it.
    pub fn user_coin(&self, user: &str) -> Option<(String, Revision)> {
        let state = self.read();
        match state.records.get(&RecordKey::User(user.to_owned())) {
            Some(Entry {
                value: Some(coin),
                revision,
            }) => Some((coin.clone(), *revision)),
            _ => None,
        }
    }

    /// Up to `limit` users with names after `after` (from the first when `None`), in name
    /// order, and the index revision they were read at.
    pub fn users_after(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> (Vec<(String, String, Revision)>, Revision) {
        let state = self.read();
        let start = match after {
            Some(name) => Bound::Excluded(RecordKey::User(name.to_owned())),
            None => Bound::Included(RecordKey::User(String::new())),
        };
        let users = state
            .records
            .range((start, Bound::Unbounded))
            .map_while(|(key, entry)| match key {
                RecordKey::User(name) => Some((name, entry)),
                RecordKey::CaseIndex(_) => None,
            })
            .filter_map(|(name, entry)| {
                entry
                    .value
                    .as_ref()
                    .map(|coin| (name.clone(), coin.clone(), entry.revision))
            })
            .take(limit)
            .collect();
        (users, state.revision)
    }

    /// Registers a watcher: where it starts, and the channel of the changes after that start.
    ///
    /// `resume` is the watcher's last `(store_id, revision)`; it gets a [`WatchStart::Resume`]
    /// when the revision belongs to this store and is not from its future, otherwise a
    /// [`WatchStart::Snapshot`].
    pub fn watch(
        &self,
        resume: Option<(&str, Revision)>,
    ) -> (WatchStart, broadcast::Receiver<ChangeBatch>) {
        let state = self.read();
        // Subscribing under the read lock: every batch after this point is on the channel.
        let receiver = self.changes.subscribe();
        let start = match resume {
            Some((store_id, revision))
                if store_id == self.store_id && revision <= state.revision =>
            {
                WatchStart::Resume {
                    records: state.changes_since(revision),
                    revision: state.revision,
                }
            }
            _ => WatchStart::Snapshot {
                records: state.live_records(),
                revision: state.revision,
            },
        };
        (start, receiver)
    }

    /// What a watcher that fell behind the broadcast channel re-reads: the records changed
    /// after `revision`, in revision order, the index revision, and the `seq` of the last batch
    /// they include (later batches on the channel are new to the watcher).
    pub fn changes_since(&self, revision: Revision) -> (Vec<Record>, Revision, u64) {
        let state = self.read();
        (state.changes_since(revision), state.revision, state.seq)
    }
}

impl IndexState {
    fn insert(&mut self, record: Record) {
        let entry = Entry {
            value: record.value,
            revision: record.revision,
        };
        let is_user = matches!(record.key, RecordKey::User(_));
        if let Some(old) = self.records.insert(record.key.clone(), entry.clone()) {
            self.by_revision.remove(&(old.revision, record.key.clone()));
            if is_user && old.value.is_some() {
                self.live_users -= 1;
            }
        }
        if is_user && entry.value.is_some() {
            self.live_users += 1;
        }
        self.by_revision.insert((entry.revision, record.key));
        self.revision = self.revision.max(entry.revision);
    }

    fn changes_since(&self, revision: Revision) -> Vec<Record> {
        self.by_revision
            // (revision + 1, the smallest key) is the first entry after `revision`.
            .range((revision.saturating_add(1), RecordKey::User(String::new()))..)
            .filter_map(|(rev, key)| {
                self.records.get(key).map(|entry| Record {
                    key: key.clone(),
                    value: entry.value.clone(),
                    revision: *rev,
                })
            })
            .collect()
    }

    fn live_records(&self) -> Vec<Record> {
        self.records
            .iter()
            .filter(|(_, entry)| entry.value.is_some())
            .map(|(key, entry)| Record {
                key: key.clone(),
                value: entry.value.clone(),
                revision: entry.revision,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(name: &str, coin: &str, revision: Revision) -> Record {
        Record {
            key: RecordKey::User(name.into()),
            value: Some(coin.into()),
            revision,
        }
    }

    fn index_with(records: Vec<Record>) -> UserCoinIndex {
        let revision = records.iter().map(|r| r.revision).max().unwrap_or(0);
        UserCoinIndex::new(StoreContents {
            records,
            revision,
            store_id: "s1".into(),
        })
    }

    #[test]
    fn resume_returns_only_what_changed_since_in_revision_order() {
        let index = index_with(vec![user("a", "btc", 1), user("b", "btc", 2)]);
        index.apply(vec![user("c", "btc", 4), user("b", "bch", 3)], 4);
        index.apply(vec![user("a", "bch", 5)], 5);
        let (start, _rx) = index.watch(Some(("s1", 2)));
        match start {
            WatchStart::Resume { records, revision } => {
                assert_eq!(revision, 5);
                assert_eq!(
                    records,
                    vec![
                        user("b", "bch", 3),
                        user("c", "btc", 4),
                        user("a", "bch", 5)
                    ]
                );
            }
            other => panic!("expected a resume, got {other:?}"),
        }
    }

    #[test]
    fn foreign_or_future_revisions_get_a_snapshot() {
        let index = index_with(vec![user("a", "btc", 1)]);
        for resume in [Some(("other", 1)), Some(("s1", 9)), None] {
            let (start, _rx) = index.watch(resume);
            assert!(
                matches!(start, WatchStart::Snapshot { ref records, revision: 1 } if records.len() == 1),
                "{resume:?} gave {start:?}"
            );
        }
    }

    #[test]
    fn watchers_get_every_later_batch_and_stale_records_are_skipped() {
        let index = index_with(vec![user("a", "btc", 1)]);
        let (_, mut rx) = index.watch(None);
        index.apply(vec![user("a", "bch", 2)], 2);
        index.apply(vec![user("a", "btc", 1)], 2); // stale: skipped, not announced
        index.apply(vec![user("b", "btc", 3)], 3);
        let first = rx.try_recv().expect("first batch");
        assert_eq!(&*first.records, &[user("a", "bch", 2)]);
        let second = rx.try_recv().expect("second batch");
        assert_eq!(second.revision, 3);
        assert!(rx.try_recv().is_err());
        assert_eq!(index.user_coin("a"), Some(("bch".into(), 2)));
        assert_eq!(index.user_count(), 2);
    }

    #[test]
    fn paging_by_name_visits_each_user_once() {
        let index = index_with(
            (0..25)
                .map(|i| user(&format!("u{i:02}"), "btc", i + 1))
                .collect(),
        );
        let mut seen = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let (page, _) = index.users_after(after.as_deref(), 10);
            if page.is_empty() {
                break;
            }
            after = page.last().map(|(n, _, _)| n.clone());
            seen.extend(page.into_iter().map(|(n, _, _)| n));
        }
        assert_eq!(seen.len(), 25);
        seen.dedup();
        assert_eq!(seen.len(), 25);
    }
}
