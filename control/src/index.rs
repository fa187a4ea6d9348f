//! The in-memory index of the user→coin state: every record with its revision, answered from
//! memory, and fanned out to watchers (the proxies' WatchSwitches streams).
//!
//! Changes are applied in batches ([`UserCoinIndex::apply`]), each with the revision through
//! which the index is then complete (every change at or below it is in), and announced on a
//! broadcast channel while the index is locked for writing. A watcher subscribes under the read
//! lock ([`UserCoinIndex::watch`]) and then reads its starting point in pages, each under its
//! own short read lock, so that writers never wait for a whole snapshot: the live records in
//! key order ([`UserCoinIndex::live_records_after`]), then the changes made while it read them
//! ([`UserCoinIndex::changes_after`], in revision order, until a page reports it has caught up
//! with the index). The batches on the channel up to that page's `seq` are already in what it
//! read; the later ones are new to it, so there is no gap and no change goes out of order. A
//! watcher that falls behind the channel re-reads what it missed the same way; nothing is ever
//! lost.

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

/// Where a new watcher starts. Neither carries records: the watcher reads them from the index
/// a page at a time ([`UserCoinIndex::live_records_after`], [`UserCoinIndex::changes_after`]),
/// each page under a short read lock, so that no writer waits for a whole snapshot and a
/// watcher's memory is bounded by a page, not by the number of users.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WatchStart {
    /// A full snapshot: every live record in key order, then every change after `revision`
    /// (what changed while the records were read), then the changes on the channel.
    Snapshot {
        /// The index revision when the watcher subscribed.
        revision: Revision,
    },
    /// Only the changes after the watcher's `revision`, in revision order.
    Resume {
        /// The revision the watcher resumes from.
        revision: Revision,
    },
}

/// Where a page of [`UserCoinIndex::changes_after`] starts: the first change after a revision,
/// or the change after the last one read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChangeCursor {
    /// Every change with a revision above this one.
    AfterRevision(Revision),
    /// The changes after this one in (revision, key) order.
    After(Revision, RecordKey),
}

/// A page of changes read by [`UserCoinIndex::changes_after`].
#[derive(Debug, Clone)]
pub struct ChangePage {
    /// The records, in revision order, each at its latest revision.
    pub records: Vec<Record>,
    /// The index revision when the page was read.
    pub revision: Revision,
    /// The `seq` of the last batch applied when the page was read.
    pub seq: u64,
    /// `true` when no change follows the page: the reader has caught up with `revision`, and
    /// the batches up to `seq` are in what it read.
    pub done: bool,
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
        // Before the records: inserting them raises the revision too.
        let before = state.revision;
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

    /// The revision of the latest record in the index (0 when empty): what a watcher that has
    /// been sent every change has reached, even when the index revision is above it.
    pub fn latest_change(&self) -> Revision {
        self.read().by_revision.last().map_or(0, |(r, _)| *r)
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
    /// [`WatchStart::Snapshot`]. Nothing is copied here: the watcher reads its start in pages.
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
                WatchStart::Resume { revision }
            }
            _ => WatchStart::Snapshot {
                revision: state.revision,
            },
        };
        (start, receiver)
    }

    /// Up to `limit` live records with keys after `after` (from the first when `None`), in key
    /// order (users by name, then case-index entries), read under one short read lock, and the
    /// key to continue after (`None` at the end). At most `4 * limit` entries are looked at, so
    /// a page may hold fewer than `limit` records (removed ones are skipped) and still not be
    /// the last.
    pub fn live_records_after(
        &self,
        after: Option<&RecordKey>,
        limit: usize,
    ) -> (Vec<Record>, Option<RecordKey>) {
        let limit = limit.max(1);
        let state = self.read();
        let start = match after {
            Some(key) => Bound::Excluded(key.clone()),
            None => Bound::Unbounded,
        };
        let mut records = Vec::with_capacity(limit.min(state.records.len()));
        let mut last = None;
        let mut range = state.records.range((start, Bound::Unbounded));
        for (key, entry) in range.by_ref().take(limit.saturating_mul(4)) {
            last = Some(key);
            if let Some(value) = &entry.value {
                records.push(Record {
                    key: key.clone(),
                    value: Some(value.clone()),
                    revision: entry.revision,
                });
                if records.len() == limit {
                    break;
                }
            }
        }
        let next = match (last, range.next()) {
            (Some(key), Some(_)) => Some(key.clone()),
            _ => None,
        };
        (records, next)
    }

    /// Up to `limit` changes after `cursor`, in revision order, each key once at its latest
    /// revision, read under one short read lock; see [`ChangePage`]. A key changed again after
    /// an earlier page was read comes again in a later page, at its new revision, so reading
    /// page after page visits every change in revision order and ends at the index revision.
    pub fn changes_after(&self, cursor: &ChangeCursor, limit: usize) -> ChangePage {
        let limit = limit.max(1);
        let state = self.read();
        let start = match cursor {
            ChangeCursor::AfterRevision(revision) => {
                Bound::Included((revision.saturating_add(1), RecordKey::User(String::new())))
            }
            ChangeCursor::After(revision, key) => Bound::Excluded((*revision, key.clone())),
        };
        let mut range = state.by_revision.range((start, Bound::Unbounded));
        let records: Vec<Record> = range
            .by_ref()
            .take(limit)
            .filter_map(|(rev, key)| {
                state.records.get(key).map(|entry| Record {
                    key: key.clone(),
                    value: entry.value.clone(),
                    revision: *rev,
                })
            })
            .collect();
        ChangePage {
            records,
            revision: state.revision,
            seq: state.seq,
            done: range.next().is_none(),
        }
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
}

impl crate::store::KeyPresence for UserCoinIndex {
    fn contains(&self, key: &RecordKey) -> bool {
        UserCoinIndex::contains(self, key)
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

    /// Every change after `cursor`, read in pages of `limit`.
    fn all_changes(index: &UserCoinIndex, revision: Revision, limit: usize) -> Vec<Record> {
        let mut cursor = ChangeCursor::AfterRevision(revision);
        let mut all = Vec::new();
        loop {
            let page = index.changes_after(&cursor, limit);
            if let Some(last) = page.records.last() {
                cursor = ChangeCursor::After(last.revision, last.key.clone());
            }
            all.extend(page.records);
            if page.done {
                return all;
            }
        }
    }

    #[test]
    fn resume_returns_only_what_changed_since_in_revision_order() {
        let index = index_with(vec![user("a", "btc", 1), user("b", "btc", 2)]);
        index.apply(vec![user("c", "btc", 4), user("b", "bch", 3)], 4);
        index.apply(vec![user("a", "bch", 5)], 5);
        let (start, _rx) = index.watch(Some(("s1", 2)));
        assert_eq!(start, WatchStart::Resume { revision: 2 });
        for limit in [1, 2, 10] {
            assert_eq!(
                all_changes(&index, 2, limit),
                vec![
                    user("b", "bch", 3),
                    user("c", "btc", 4),
                    user("a", "bch", 5)
                ],
                "pages of {limit}"
            );
        }
        let page = index.changes_after(&ChangeCursor::AfterRevision(5), 10);
        assert!(page.done && page.records.is_empty() && page.revision == 5);
    }

    #[test]
    fn foreign_or_future_revisions_get_a_snapshot() {
        let index = index_with(vec![user("a", "btc", 1)]);
        for resume in [Some(("other", 1)), Some(("s1", 9)), None] {
            let (start, _rx) = index.watch(resume);
            assert_eq!(start, WatchStart::Snapshot { revision: 1 }, "{resume:?}");
        }
        let (records, next) = index.live_records_after(None, 10);
        assert_eq!(records, vec![user("a", "btc", 1)]);
        assert_eq!(next, None);
    }

    /// A snapshot read in pages while writers change the index: the pages, then the changes
    /// after the snapshot's revision, leave the reader with exactly the index's state.
    #[test]
    fn a_paged_snapshot_with_its_changes_matches_the_index() {
        let index = index_with(
            (0..50)
                .map(|i| user(&format!("u{i:02}"), "btc", i + 1))
                .collect(),
        );
        let (start, _rx) = index.watch(None);
        let WatchStart::Snapshot { revision } = start else {
            panic!("expected a snapshot, got {start:?}");
        };
        let mut state = BTreeMap::new();
        let mut after = None;
        let mut next_rev = 51;
        loop {
            let (records, next) = index.live_records_after(after.as_ref(), 7);
            for r in records {
                state.insert(r.key, r.value);
            }
            // Writers between pages: before and after the cursor, new users, removals.
            for name in ["u03", "u40", "new", "u20"] {
                index.apply(vec![user(name, "bch", next_rev)], next_rev);
                next_rev += 1;
            }
            index.apply(
                vec![Record {
                    key: RecordKey::User(format!("u{:02}", next_rev % 50)),
                    value: None,
                    revision: next_rev,
                }],
                next_rev,
            );
            next_rev += 1;
            match next {
                Some(key) => after = Some(key),
                None => break,
            }
        }
        for r in all_changes(&index, revision, 3) {
            match r.value {
                Some(v) => state.insert(r.key, Some(v)),
                None => state.remove(&r.key),
            };
        }
        let (live, _) = index.live_records_after(None, 1_000);
        let expected: BTreeMap<RecordKey, Option<String>> =
            live.into_iter().map(|r| (r.key, r.value)).collect();
        assert_eq!(state, expected);
    }

    #[test]
    fn live_pages_skip_removed_records_and_end() {
        let mut records: Vec<Record> = (0..20)
            .map(|i| Record {
                key: RecordKey::User(format!("r{i:02}")),
                value: None,
                revision: i + 1,
            })
            .collect();
        records.push(user("z", "btc", 30));
        let index = index_with(records);
        let mut after = None;
        let mut seen = Vec::new();
        loop {
            let (page, next) = index.live_records_after(after.as_ref(), 2);
            assert!(page.len() <= 2);
            seen.extend(page);
            match next {
                Some(key) => after = Some(key),
                None => break,
            }
        }
        assert_eq!(seen, vec![user("z", "btc", 30)]);
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

    /// A batch whose `through` is its highest record's revision (a store that publishes
    /// exactly as far as it read) still wakes whoever waits for that revision.
    #[tokio::test]
    async fn waiters_see_a_revision_carried_by_the_records_themselves() {
        let index = index_with(Vec::new());
        index.apply(vec![user("a", "btc", 5), user("b", "bch", 7)], 7);
        assert_eq!(index.revision(), 7);
        assert!(
            index
                .wait_for(7, std::time::Duration::from_millis(100))
                .await,
            "the published revision follows the index's"
        );
        index.apply(vec![user("a", "bch", 9)], 8);
        assert!(
            index
                .wait_for(9, std::time::Duration::from_millis(100))
                .await
        );
    }
}
