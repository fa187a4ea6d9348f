//! The proxy's local user→coin cache, fed by the control plane's WatchSwitches stream
//! ([`crate::control::follow_switches`]), and its per-user index of live sessions.
//!
//! Every lookup is answered from memory ([`UserCoinCache::coin_of`],
//! [`UserCoinCache::canonical_name`]); when the control plane is away the cache keeps serving
//! what it knows and catches up on return (ARCHITECTURE: "local cache, remote truth").
//!
//! **Applying the stream.** [`UserCoinCache::apply`] takes the stream's messages in order. A
//! full snapshot, which may span several messages (the first carries `reset`, the last
//! `snapshot_complete`), is staged aside and swapped in at once when it is complete, so a
//! lookup never sees half a snapshot. Every other message is a change (the missed changes of a
//! resume, or a live change) and is applied at once, in order. A stream that breaks in the
//! middle of a snapshot leaves the cache as it was: the staged part is dropped.
//!
//! **Saving without stalling.** A save of the cache file ([`file`](mod@file)) reads the tables under
//! their read lock for as long as it encodes them (about 0.15 s per million users). A change
//! that waited on that lock for its write would hold up every lookup behind it (a waiting
//! writer blocks new readers) and the thread it runs on. So the stream's changes are applied in
//! turn with the saves ([`UserCoinCache::apply_in_turn`], [`UserCoinCache::save_turn`]): a change
//! that arrives during a save waits for its end on an async lock, and lookups go on meanwhile.
//!
//! **Watching users.** A session holds a [`UserWatch`] of its user while it lives
//! ([`UserCoinCache::watch_user`]). The cache keeps one `tokio::sync::watch` channel per
//! watched user, so a switch of user U wakes only U's sessions, and a write of the coin a user
//! already has wakes nobody. When the last watch of a user is dropped, the user's entry leaves
//! the index. A user the cache does not know yet can be watched too (a session waiting for an
//! auto-registration): its watch wakes when the user arrives.

#![forbid(unsafe_code)]

pub mod file;

use std::{
    collections::{HashMap, HashSet},
    mem,
    sync::{
        Arc, Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Instant,
};

use switchyard_proto::v1::WatchSwitchesResponse;
use tokio::sync::watch;

/// A user's coin as a watcher sees it: `None` while the user has no record.
type CoinCell = Option<Arc<str>>;

/// What a user's channel carries: the coin, and when the cache applied the change that set
/// it (`None` for the coin a channel began with), for the switch latency.
#[derive(Debug, Clone, Default)]
struct Published {
    coin: CoinCell,
    at: Option<Instant>,
}

/// The records of one state of the store: users, case index, and the coin names they share.
#[derive(Debug, Default)]
struct Tables {
    /// User name → coin.
    users: HashMap<Arc<str>, Arc<str>>,
    /// Lowercase name → canonical (stored) name.
    case_index: HashMap<Arc<str>, Arc<str>>,
    /// Every coin name seen, so that a million users of one coin share one allocation.
    coins: HashSet<Arc<str>>,
}

impl Tables {
    fn intern(&mut self, coin: &str) -> Arc<str> {
        if let Some(known) = self.coins.get(coin) {
            return Arc::clone(known);
        }
        let coin: Arc<str> = Arc::from(coin);
        self.coins.insert(Arc::clone(&coin));
        coin
    }

    /// Applies the records of `message`, in order.
    fn apply_records(&mut self, message: &WatchSwitchesResponse) {
        for entry in &message.users {
            if entry.removed {
                self.users.remove(entry.user.as_str());
            } else {
                let coin = self.intern(&entry.coin);
                match self.users.get_mut(entry.user.as_str()) {
                    Some(current) => *current = coin,
                    None => {
                        self.users.insert(Arc::from(entry.user.as_str()), coin);
                    }
                }
            }
        }
        for entry in &message.case_index {
            if entry.removed {
                self.case_index.remove(entry.lowercase_name.as_str());
            } else {
                let name: Arc<str> = Arc::from(entry.name.as_str());
                match self.case_index.get_mut(entry.lowercase_name.as_str()) {
                    Some(current) => *current = name,
                    None => {
                        self.case_index
                            .insert(Arc::from(entry.lowercase_name.as_str()), name);
                    }
                }
            }
        }
    }
}

/// What lookups read: the tables and the point of the stream they match.
#[derive(Debug, Default)]
struct Live {
    tables: Tables,
    /// The revision of the last applied message (0 before the first snapshot).
    revision: u64,
    /// The store the revision belongs to (empty before the first snapshot).
    store_id: String,
}

/// The state of the WatchSwitches feed, for metrics and health.
#[derive(Debug, Default)]
struct FeedStatus {
    connected: AtomicBool,
    connects: AtomicU64,
    announced_revision: AtomicU64,
    messages: AtomicU64,
    snapshots: AtomicU64,
}

/// The proxy's local user→coin cache; see the module doc. Shared as `Arc<UserCoinCache>`.
#[derive(Debug)]
pub struct UserCoinCache {
    live: RwLock<Live>,
    /// A snapshot being received: swapped into `live` at its `snapshot_complete`.
    staged: Mutex<Option<Tables>>,
    /// The per-user index of live sessions: one channel per watched user.
    watchers: Mutex<HashMap<Arc<str>, watch::Sender<Published>>>,
    /// Whether a complete snapshot (or resume) has been applied.
    synced: watch::Sender<bool>,
    feed: FeedStatus,
    /// Held by the stream's applier for each change and by the cache file's writer for each
    /// save (see the module doc): an async lock, so that neither waits on a thread.
    turn: Arc<tokio::sync::Mutex<()>>,
}

fn read<T>(lock: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(PoisonError::into_inner)
}

fn write<T>(lock: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(PoisonError::into_inner)
}

fn lock<T>(lock: &Mutex<T>) -> MutexGuard<'_, T> {
    lock.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Sets a watched user's coin, applied at `at`; wakes the user's watchers only when it
/// differs.
fn publish(tx: &watch::Sender<Published>, coin: Option<&Arc<str>>, at: Instant) {
    tx.send_if_modified(|seen| {
        if seen.coin.as_ref() == coin {
            false
        } else {
            seen.coin = coin.cloned();
            seen.at = Some(at);
            true
        }
    });
}

impl UserCoinCache {
    /// An empty cache, not synced, at revision 0.
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            live: RwLock::new(Live::default()),
            staged: Mutex::new(None),
            watchers: Mutex::new(HashMap::new()),
            synced: watch::Sender::new(false),
            feed: FeedStatus::default(),
            turn: Arc::default(),
        })
    }

    /// [`Self::apply`], once no save of the cache file is reading the tables (see the module
    /// doc): what the stream's follower calls.
    pub async fn apply_in_turn(&self, message: &WatchSwitchesResponse) {
        let _turn = self.turn.lock().await;
        self.apply(message);
    }

    /// The turn a save of the cache file holds while it reads the tables: changes from the
    /// stream wait for it to be dropped.
    pub async fn save_turn(&self) -> tokio::sync::OwnedMutexGuard<()> {
        Arc::clone(&self.turn).lock_owned().await
    }

    /// The user's coin, from memory; `None` for a user the cache does not know.
    pub fn coin_of(&self, user: &str) -> Option<Arc<str>> {
        read(&self.live).tables.users.get(user).cloned()
    }

    /// The case index: the canonical (stored) name for a lowercase sub-account name, when the
    /// control plane has a case-index entry for it.
    pub fn canonical_name(&self, lowercase: &str) -> Option<Arc<str>> {
        read(&self.live).tables.case_index.get(lowercase).cloned()
    }

    /// Watches `user`'s coin for as long as the returned [`UserWatch`] lives (a session holds
    /// one). A switch of this user wakes it; switches of other users do not.
    pub fn watch_user(self: &Arc<Self>, user: &str) -> UserWatch {
        // Lock order: `live` then `watchers`, as in `apply`; a change applied after the coin
        // is read here is published to the channel subscribed here.
        let live = read(&self.live);
        let coin = live.tables.users.get(user).cloned();
        let mut watchers = lock(&self.watchers);
        let (user, rx) = match watchers.get_key_value(user) {
            Some((key, tx)) => (Arc::clone(key), tx.subscribe()),
            None => {
                let key: Arc<str> = Arc::from(user);
                let (tx, rx) = watch::channel(Published {
                    coin: coin.clone(),
                    at: None,
                });
                watchers.insert(Arc::clone(&key), tx);
                (key, rx)
            }
        };
        drop(watchers);
        drop(live);
        UserWatch {
            cache: Arc::clone(self),
            user,
            seen: coin,
            seen_at: None,
            rx,
        }
    }

    /// Removes `user`'s index entry when the watch being dropped is its last one.
    fn unwatch(&self, user: &str) {
        let mut watchers = lock(&self.watchers);
        // The dropping watch's receiver still counts here; new receivers are only made under
        // this lock, so the count cannot grow behind our back.
        if watchers
            .get(user)
            .is_some_and(|tx| tx.receiver_count() <= 1)
        {
            watchers.remove(user);
        }
    }

    /// Applies one message of the WatchSwitches stream (see the module doc). Messages must be
    /// applied in stream order; [`crate::control::follow_switches`] does so.
    pub fn apply(&self, message: &WatchSwitchesResponse) {
        self.feed.messages.fetch_add(1, Ordering::Relaxed);
        if message.revision > 0 {
            self.feed
                .announced_revision
                .store(message.revision, Ordering::Relaxed);
        }
        let snapshot = {
            let mut staged = lock(&self.staged);
            if message.reset {
                *staged = Some(Tables::default());
            }
            match staged.as_mut() {
                Some(tables) => {
                    tables.apply_records(message);
                    if !message.snapshot_complete {
                        return;
                    }
                    staged.take()
                }
                None => None,
            }
        };
        match snapshot {
            Some(tables) => self.swap_in(tables, message),
            None => self.apply_changes(message),
        }
        if message.snapshot_complete {
            self.synced.send_replace(true);
        }
    }

    /// Swaps a complete snapshot in and wakes the watchers whose user's coin differs.
    fn swap_in(&self, tables: Tables, message: &WatchSwitchesResponse) {
        self.feed.snapshots.fetch_add(1, Ordering::Relaxed);
        let old = {
            let mut live = write(&self.live);
            let old = mem::replace(&mut live.tables, tables);
            live.revision = message.revision;
            if !message.store_id.is_empty() {
                live.store_id.clone_from(&message.store_id);
            }
            let watchers = lock(&self.watchers);
            let at = Instant::now();
            for (user, tx) in watchers.iter() {
                publish(tx, live.tables.users.get(user), at);
            }
            old
        };
        // A large map is freed outside the lock.
        drop(old);
    }

    /// Applies a message of changes in place and wakes the watchers of the changed users.
    fn apply_changes(&self, message: &WatchSwitchesResponse) {
        let mut live = write(&self.live);
        live.tables.apply_records(message);
        if message.revision > 0 {
            live.revision = message.revision;
        }
        if !message.store_id.is_empty() && live.store_id != message.store_id {
            live.store_id.clone_from(&message.store_id);
        }
        if message.users.is_empty() {
            return;
        }
        let watchers = lock(&self.watchers);
        if watchers.is_empty() {
            return;
        }
        let at = Instant::now();
        for entry in &message.users {
            if let Some(tx) = watchers.get(entry.user.as_str()) {
                publish(tx, live.tables.users.get(entry.user.as_str()), at);
            }
        }
    }

    /// The revision of the last applied message: what a reconnecting feed resumes from (0
    /// before the first snapshot).
    pub fn revision(&self) -> u64 {
        read(&self.live).revision
    }

    /// The store the revision belongs to (empty before the first snapshot); sent back with
    /// the revision when resuming.
    pub fn store_id(&self) -> String {
        read(&self.live).store_id.clone()
    }

    /// True once a complete snapshot (or resume) has been applied at least once. It stays
    /// true while the control plane is away: the cache keeps serving what it knows.
    pub fn is_synced(&self) -> bool {
        *self.synced.borrow()
    }

    /// Resolves once [`is_synced`](Self::is_synced) is true.
    pub async fn wait_synced(&self) {
        let mut rx = self.synced.subscribe();
        // The sender lives in `self`, so the channel cannot close while we wait.
        let _ = rx.wait_for(|synced| *synced).await;
    }

    /// How many users the cache knows.
    pub fn user_count(&self) -> usize {
        read(&self.live).tables.users.len()
    }

    /// How many case-index entries the cache knows.
    pub fn case_index_count(&self) -> usize {
        read(&self.live).tables.case_index.len()
    }

    /// How many distinct users have at least one live [`UserWatch`].
    pub fn watched_user_count(&self) -> usize {
        lock(&self.watchers).len()
    }

    /// Feed status: whether a WatchSwitches stream is established now.
    pub fn is_connected(&self) -> bool {
        self.feed.connected.load(Ordering::Relaxed)
    }

    /// Feed status: how many WatchSwitches streams have been established since start (the
    /// first connect counts, so reconnects are this minus one).
    pub fn connects(&self) -> u64 {
        self.feed.connects.load(Ordering::Relaxed)
    }

    /// Feed status: the last non-zero revision the control plane announced in a message,
    /// whether or not it is applied yet. Compare with [`revision`](Self::revision) (applied):
    /// they differ while a message is being applied.
    pub fn announced_revision(&self) -> u64 {
        self.feed.announced_revision.load(Ordering::Relaxed)
    }

    /// Feed status: how many stream messages have been received and applied (or staged).
    pub fn messages_received(&self) -> u64 {
        self.feed.messages.load(Ordering::Relaxed)
    }

    /// Feed status: how many full snapshots have been swapped in. The first sync is one;
    /// each later one is a full resync (the control plane could not resume the feed: another
    /// store, or a revision it no longer has), where a resume would have sent only the changes.
    pub fn snapshots_applied(&self) -> u64 {
        self.feed.snapshots.load(Ordering::Relaxed)
    }

    /// Whether a snapshot is being received (staged, not yet visible to lookups).
    pub fn is_staging(&self) -> bool {
        lock(&self.staged).is_some()
    }

    /// Records that a stream was established.
    pub(crate) fn stream_connected(&self) {
        self.feed.connects.fetch_add(1, Ordering::Relaxed);
        self.feed.connected.store(true, Ordering::Relaxed);
    }

    /// Records that the stream ended; a snapshot it was sending is dropped unapplied (the next
    /// stream starts over from the last applied revision).
    pub(crate) fn stream_lost(&self) {
        self.feed.connected.store(false, Ordering::Relaxed);
        let staged = lock(&self.staged).take();
        drop(staged);
    }
}

/// A session's watch of its user's coin; see [`UserCoinCache::watch_user`]. Dropping the last
/// watch of a user removes the user from the index.
#[derive(Debug)]
pub struct UserWatch {
    cache: Arc<UserCoinCache>,
    user: Arc<str>,
    /// The coin last reported by [`changed`](Self::changed) (at first: when the watch began).
    seen: CoinCell,
    /// When the cache applied the change [`changed`](Self::changed) last reported.
    seen_at: Option<Instant>,
    rx: watch::Receiver<Published>,
}

impl UserWatch {
    /// The watched user.
    pub fn user(&self) -> &str {
        &self.user
    }

    /// The user's coin now (`None` while the user has no record).
    pub fn current(&self) -> Option<Arc<str>> {
        self.rx.borrow().coin.clone()
    }

    /// When the cache applied the change [`changed`](Self::changed) last reported (`None`
    /// before any): where a switch's latency starts.
    pub fn changed_at(&self) -> Option<Instant> {
        self.seen_at
    }

    /// Takes `coin` as the user's coin this watch last reported: the session learned it
    /// elsewhere (a read-through at login, newer than the cache), so the stream's delivery of
    /// the same coin a moment later is no change. The cache itself is left as it is: the
    /// stream, in order, is its only writer.
    pub fn assume(&mut self, coin: Arc<str>) {
        self.seen = Some(coin);
    }

    /// Resolves when the user's coin changes to a value other than the one this watch last
    /// reported (or had when it began): `Some(new coin)`, or `None` when the user was removed.
    /// Cancel-safe: dropping the future (e.g. in `tokio::select!`) loses no change.
    pub async fn changed(&mut self) -> Option<Arc<str>> {
        loop {
            if self.rx.changed().await.is_err() {
                // The sender lives in the index entry this watch keeps alive: unreachable, but
                // never report a change that did not happen.
                std::future::pending::<()>().await;
            }
            let now = self.rx.borrow_and_update().clone();
            if now.coin != self.seen {
                self.seen.clone_from(&now.coin);
                self.seen_at = now.at;
                return now.coin;
            }
        }
    }
}

impl Drop for UserWatch {
    fn drop(&mut self) {
        self.cache.unwatch(&self.user);
    }
}

#[cfg(test)]
mod tests {
    use std::{future::Future, time::Duration};

    use futures::FutureExt;
    use switchyard_proto::v1::{CaseIndexEntry, UserCoinEntry};

    use super::*;

    fn user(name: &str, coin: &str, revision: u64) -> UserCoinEntry {
        UserCoinEntry {
            user: name.into(),
            coin: coin.into(),
            revision,
            removed: false,
        }
    }

    fn removed(name: &str, revision: u64) -> UserCoinEntry {
        UserCoinEntry {
            user: name.into(),
            coin: String::new(),
            revision,
            removed: true,
        }
    }

    fn case(lower: &str, name: &str, revision: u64) -> CaseIndexEntry {
        CaseIndexEntry {
            lowercase_name: lower.into(),
            name: name.into(),
            revision,
            removed: false,
        }
    }

    /// A one-message snapshot of `users` at `revision`.
    fn snapshot(users: &[(&str, &str)], revision: u64) -> WatchSwitchesResponse {
        WatchSwitchesResponse {
            reset: true,
            users: users.iter().map(|(u, c)| user(u, c, revision)).collect(),
            revision,
            snapshot_complete: true,
            store_id: "store-a".into(),
            ..Default::default()
        }
    }

    /// A live change message.
    fn change(users: Vec<UserCoinEntry>, revision: u64) -> WatchSwitchesResponse {
        WatchSwitchesResponse {
            users,
            revision,
            store_id: "store-a".into(),
            ..Default::default()
        }
    }

    /// The output of `future` if it is ready at its first poll: a watch channel's wake-up is
    /// immediate, so "not ready now" means "not woken".
    async fn ready<F: Future>(future: F) -> Option<F::Output> {
        future.now_or_never()
    }

    fn coin(s: &str) -> Option<Arc<str>> {
        Some(Arc::from(s))
    }

    #[tokio::test]
    async fn a_snapshot_in_several_messages_is_swapped_in_at_its_end() {
        let cache = UserCoinCache::new();
        cache.apply(&snapshot(&[("old", "btc")], 3));
        assert!(cache.is_synced());
        let mut watch_old = cache.watch_user("old");
        let mut watch_a = cache.watch_user("a");

        // A fresh snapshot in three messages: nothing of it is visible until the last.
        cache.apply(&WatchSwitchesResponse {
            reset: true,
            users: vec![user("a", "bch", 7)],
            store_id: "store-b".into(),
            ..Default::default()
        });
        cache.apply(&WatchSwitchesResponse {
            users: vec![user("b", "ltc", 8)],
            store_id: "store-b".into(),
            ..Default::default()
        });
        assert!(cache.is_staging());
        assert_eq!(cache.coin_of("old"), coin("btc"), "still the old state");
        assert_eq!(cache.coin_of("a"), None);
        assert_eq!(
            (cache.revision(), cache.store_id().as_str()),
            (3, "store-a")
        );
        assert!(
            ready(watch_a.changed()).await.is_none(),
            "no wake mid-snapshot"
        );

        cache.apply(&WatchSwitchesResponse {
            users: vec![user("c", "btc", 9)],
            revision: 10,
            snapshot_complete: true,
            store_id: "store-b".into(),
            ..Default::default()
        });
        assert!(!cache.is_staging());
        assert_eq!(cache.coin_of("old"), None, "the reset dropped it");
        assert_eq!(cache.coin_of("a"), coin("bch"));
        assert_eq!(cache.coin_of("b"), coin("ltc"));
        assert_eq!(cache.coin_of("c"), coin("btc"));
        assert_eq!(cache.user_count(), 3);
        assert_eq!(
            (cache.revision(), cache.store_id().as_str()),
            (10, "store-b")
        );
        assert_eq!(ready(watch_a.changed()).await, Some(coin("bch")));
        assert_eq!(ready(watch_old.changed()).await, Some(None), "removed");
        assert_eq!(cache.snapshots_applied(), 2);
    }

    #[tokio::test]
    async fn a_snapshot_cut_off_by_a_lost_stream_is_dropped() {
        let cache = UserCoinCache::new();
        cache.apply(&snapshot(&[("a", "btc")], 5));
        cache.apply(&WatchSwitchesResponse {
            reset: true,
            users: vec![user("zzz", "bch", 1)],
            ..Default::default()
        });
        cache.stream_lost();
        assert!(!cache.is_staging());
        // The next stream resumes: its changes apply to the old state.
        cache.apply(&WatchSwitchesResponse {
            users: vec![user("b", "ltc", 6)],
            revision: 6,
            snapshot_complete: true,
            store_id: "store-a".into(),
            ..Default::default()
        });
        assert_eq!(cache.coin_of("a"), coin("btc"));
        assert_eq!(cache.coin_of("b"), coin("ltc"));
        assert_eq!(cache.coin_of("zzz"), None);
        assert_eq!(cache.revision(), 6);
        assert_eq!(
            cache.snapshots_applied(),
            1,
            "only the first snapshot was applied"
        );
    }

    #[tokio::test]
    async fn a_switch_wakes_only_the_switched_users_watchers() {
        let cache = UserCoinCache::new();
        cache.apply(&snapshot(&[("alice", "btc"), ("bob", "btc")], 2));
        let mut alice1 = cache.watch_user("alice");
        let mut alice2 = cache.watch_user("alice");
        let mut bob = cache.watch_user("bob");
        assert_eq!(cache.watched_user_count(), 2);
        assert_eq!(alice1.current(), coin("btc"));

        cache.apply(&change(vec![user("alice", "bch", 3)], 3));
        assert_eq!(cache.revision(), 3);
        assert_eq!(ready(alice1.changed()).await, Some(coin("bch")));
        assert_eq!(ready(alice2.changed()).await, Some(coin("bch")));
        assert!(ready(bob.changed()).await.is_none(), "bob was not switched");
        assert!(
            ready(alice1.changed()).await.is_none(),
            "one wake per change"
        );

        // Two changes before the watcher looks: it sees the latest.
        cache.apply(&change(vec![user("bob", "ltc", 4)], 4));
        cache.apply(&change(vec![user("bob", "bch", 5)], 5));
        assert_eq!(ready(bob.changed()).await, Some(coin("bch")));
        // And a change back and forth before it looks is no change at all.
        cache.apply(&change(vec![user("bob", "btc", 6)], 6));
        cache.apply(&change(vec![user("bob", "bch", 7)], 7));
        assert!(ready(bob.changed()).await.is_none());
    }

    #[tokio::test]
    async fn writing_the_same_coin_again_wakes_nobody() {
        let cache = UserCoinCache::new();
        cache.apply(&snapshot(&[("alice", "btc")], 2));
        let mut alice = cache.watch_user("alice");
        cache.apply(&change(vec![user("alice", "btc", 3)], 3));
        assert_eq!(cache.revision(), 3, "the revision still moves on");
        assert!(ready(alice.changed()).await.is_none());
        // A new snapshot with the same coin does not wake it either.
        cache.apply(&snapshot(&[("alice", "btc")], 9));
        assert!(ready(alice.changed()).await.is_none());
    }

    #[tokio::test]
    async fn a_removed_user_is_forgotten_and_its_watchers_told() {
        let cache = UserCoinCache::new();
        cache.apply(&snapshot(&[("alice", "btc"), ("bob", "btc")], 2));
        let mut alice = cache.watch_user("alice");
        cache.apply(&change(vec![removed("alice", 3)], 3));
        assert_eq!(cache.coin_of("alice"), None);
        assert_eq!(cache.user_count(), 1);
        assert_eq!(ready(alice.changed()).await, Some(None));
        assert_eq!(alice.current(), None);
        // Created again: the watch sees it.
        cache.apply(&change(vec![user("alice", "ltc", 4)], 4));
        assert_eq!(ready(alice.changed()).await, Some(coin("ltc")));
    }

    #[tokio::test]
    async fn an_unknown_user_watch_wakes_when_the_user_arrives() {
        let cache = UserCoinCache::new();
        cache.apply(&snapshot(&[], 0));
        let mut newbie = cache.watch_user("newbie");
        assert_eq!(newbie.current(), None);
        let waiter = tokio::spawn(async move { newbie.changed().await });
        cache.apply(&change(vec![user("newbie", "bch", 1)], 1));
        let got = tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("woken")
            .expect("task");
        assert_eq!(got, coin("bch"));
    }

    #[tokio::test]
    async fn changed_is_cancel_safe_in_select() {
        let cache = UserCoinCache::new();
        cache.apply(&snapshot(&[("alice", "btc")], 1));
        let mut alice = cache.watch_user("alice");
        // A select! that drops the changed() future many times loses nothing.
        for _ in 0..3 {
            tokio::select! {
                _ = alice.changed() => panic!("no change yet"),
                _ = tokio::task::yield_now() => {}
            }
        }
        cache.apply(&change(vec![user("alice", "bch", 2)], 2));
        tokio::select! {
            got = alice.changed() => assert_eq!(got, coin("bch")),
            _ = tokio::time::sleep(Duration::from_secs(5)) => panic!("the change was lost"),
        }
    }

    #[tokio::test]
    async fn the_index_entry_goes_with_the_last_watch() {
        let cache = UserCoinCache::new();
        cache.apply(&snapshot(&[("alice", "btc")], 1));
        let first = cache.watch_user("alice");
        let second = cache.watch_user("alice");
        let other = cache.watch_user("nobody");
        assert_eq!(cache.watched_user_count(), 2);
        drop(first);
        assert_eq!(cache.watched_user_count(), 2, "one watch of alice remains");
        drop(second);
        assert_eq!(cache.watched_user_count(), 1);
        drop(other);
        assert_eq!(cache.watched_user_count(), 0);
        // Watching again after that starts a fresh entry with the current coin.
        let mut again = cache.watch_user("alice");
        assert_eq!(again.current(), coin("btc"));
        cache.apply(&change(vec![user("alice", "ltc", 2)], 2));
        assert_eq!(ready(again.changed()).await, Some(coin("ltc")));
        assert_eq!(again.user(), "alice");
    }

    #[tokio::test]
    async fn the_case_index_maps_lowercase_names_to_canonical_ones() {
        let cache = UserCoinCache::new();
        cache.apply(&WatchSwitchesResponse {
            reset: true,
            users: vec![user("Alice", "btc", 1), user("BoB", "bch", 2)],
            case_index: vec![case("alice", "Alice", 1), case("bob", "BoB", 2)],
            revision: 2,
            snapshot_complete: true,
            store_id: "s".into(),
        });
        assert_eq!(cache.canonical_name("alice"), Some(Arc::from("Alice")));
        assert_eq!(cache.canonical_name("bob"), Some(Arc::from("BoB")));
        assert_eq!(cache.canonical_name("Alice"), None, "keys are lowercase");
        assert_eq!(cache.case_index_count(), 2);
        cache.apply(&WatchSwitchesResponse {
            case_index: vec![
                CaseIndexEntry {
                    lowercase_name: "bob".into(),
                    name: String::new(),
                    revision: 3,
                    removed: true,
                },
                case("carol", "Carol", 4),
            ],
            revision: 4,
            ..Default::default()
        });
        assert_eq!(cache.canonical_name("bob"), None);
        assert_eq!(cache.canonical_name("carol"), Some(Arc::from("Carol")));
        assert_eq!(cache.case_index_count(), 2);
    }

    #[tokio::test]
    async fn wait_synced_resolves_at_the_first_complete_snapshot() {
        let cache = UserCoinCache::new();
        assert!(!cache.is_synced());
        let waiter = {
            let cache = Arc::clone(&cache);
            tokio::spawn(async move { cache.wait_synced().await })
        };
        cache.apply(&WatchSwitchesResponse {
            reset: true,
            users: vec![user("a", "btc", 1)],
            ..Default::default()
        });
        assert!(!cache.is_synced(), "half a snapshot is not a sync");
        cache.apply(&WatchSwitchesResponse {
            revision: 1,
            snapshot_complete: true,
            store_id: "s".into(),
            ..Default::default()
        });
        assert!(cache.is_synced());
        tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("resolved")
            .expect("task");
        assert_eq!(cache.announced_revision(), 1);
        assert_eq!(cache.messages_received(), 2);
    }

    #[test]
    fn users_of_one_coin_share_its_name() {
        let cache = UserCoinCache::new();
        cache.apply(&snapshot(&[("a", "btc"), ("b", "btc")], 1));
        let (a, b) = (cache.coin_of("a"), cache.coin_of("b"));
        assert!(matches!((&a, &b), (Some(a), Some(b)) if Arc::ptr_eq(a, b)));
    }
}
