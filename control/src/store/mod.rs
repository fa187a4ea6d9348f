//! The durable user→coin state behind one trait, [`UserCoinStore`], with one implementation
//! per deployment: [`embedded::EmbeddedStore`] (redb, a single node) and, for fleets, the
//! ZooKeeper store of SPEC §5.
//!
//! A store holds two kinds of record, user coins and case-index entries, and gives every write
//! a [`Revision`] that only grows, so that the proxies can resume a stream from the last one they
//! applied.

pub mod embedded;
pub mod zookeeper;

use std::sync::Arc;

use async_trait::async_trait;
use thiserror::Error;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// A position in the store's history: every change gets a higher one than all before it.
pub type Revision = u64;

/// What a record is about.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum RecordKey {
    /// The coin of one user; the name as stored.
    User(String),
    /// A case-index entry; the lowercase form of a user name.
    CaseIndex(String),
}

/// One record as the store holds it (or held it, for a removal).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// What the record is about.
    pub key: RecordKey,
    /// The coin (for a user) or the canonical name (for a case-index entry); `None` when the
    /// record was removed.
    pub value: Option<String>,
    /// The revision of the change that wrote or removed it.
    pub revision: Revision,
}

/// A write to make. Inputs are validated by the caller before they reach a store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreWrite {
    /// Set a user's coin, creating the user when absent. Writing the coin a user already has
    /// still makes a change (with a new revision): it re-announces the user.
    SetUserCoin {
        /// The user name.
        user: String,
        /// The coin.
        coin: String,
    },
    /// Set a case-index entry.
    SetCaseIndex {
        /// The lowercase form of the name.
        lowercase_name: String,
        /// The canonical name.
        name: String,
    },
}

/// Everything a store holds, as read at one revision.
#[derive(Debug, Clone, Default)]
pub struct StoreContents {
    /// Every live record, in no particular order.
    pub records: Vec<Record>,
    /// The store's revision: every record's revision is at most this.
    pub revision: Revision,
    /// The identity of the store, so that revisions from another store are never mistaken for
    /// this one's.
    pub store_id: String,
}

/// A switch accepted but held back until the target coin's safety period has passed (SPEC §6).
/// Kept in the store so that a restart does not lose it, and applied only if the user has had
/// no newer switch since (see [`UserCoinStore::apply_pending`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingSwitch {
    /// The user, as stored.
    pub user: String,
    /// The coin the switch will write.
    pub coin: String,
    /// When it is due, in Unix seconds.
    pub apply_at: u64,
    /// The revision of the user's record when the switch was held back (0: no record). Any
    /// later change of the user is a newer switch, which the held-back one must never
    /// overwrite.
    pub after: Revision,
}

/// A switch to hold back: what [`UserCoinStore::put_pending`] records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HoldSwitch {
    /// The user, as stored.
    pub user: String,
    /// The coin the switch will write.
    pub coin: String,
    /// When it is due, in Unix seconds.
    pub apply_at: u64,
}

/// What became of a due pending switch ([`UserCoinStore::apply_pending`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PendingOutcome {
    /// Written: the user's new record. The pending record is gone.
    Applied(Record),
    /// The user changed after the switch was held back (a newer switch, by anyone): the
    /// held-back switch was dropped, not written.
    Superseded,
    /// The pending record is no longer the one asked about (replaced, cancelled, or applied by
    /// another replica); nothing was done.
    Gone,
}

/// A batch of changes, in revision order, and the revision through which the store's state is
/// complete once they are applied (at least the highest of their revisions).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StoreChange {
    /// The records changed (a removal has no value).
    pub records: Vec<Record>,
    /// Every change at or below this revision is in this batch or an earlier one.
    pub through: Revision,
}

/// The changes a store emits; see [`UserCoinStore::changes`].
pub type ChangeReceiver = tokio::sync::mpsc::Receiver<StoreChange>;

/// Batches of changes a store may have emitted and not yet seen taken, at most: a consumer
/// that stalls holds the store's writers back instead of growing a buffer.
pub const CHANGE_BUFFER: usize = 64;

/// Whether a record is known to exist, as the consumer of a store's changes knows it; lets a
/// store choose the cheaper way to write a record that most likely exists.
pub trait KeyPresence: Send + Sync {
    /// Whether `key` has a live record.
    fn contains(&self, key: &RecordKey) -> bool;
}

/// Why a store operation failed.
#[derive(Debug, Clone, Error)]
pub enum StoreError {
    /// The store cannot be reached or written right now; the operation may succeed later.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// The store holds data this version cannot read.
    #[error("store data is corrupt: {0}")]
    Corrupt(String),
}

/// The durable user→coin state.
///
/// One contract for every implementation: the store emits every change, whoever made it
/// (this process, another replica, zkCli, the Go API server), on one ordered stream
/// ([`UserCoinStore::changes`]); the caller alone applies that stream to its in-memory index,
/// and a writer waits until the stream has brought its write back. The embedded store emits
/// its own writes on the stream as it commits them; the ZooKeeper store emits what its feed
/// reads.
#[async_trait]
pub trait UserCoinStore: Send + Sync + 'static {
    /// The identity of the store, so that revisions from another store are never mistaken for
    /// this one's.
    fn store_id(&self) -> &str;

    /// Starts the change stream (once; a second call is an error). Its first batch is the
    /// whole state (every live record) through some revision; after it comes every change, in
    /// revision order, until `shutdown`. `presence` is the consumer's view of which records
    /// exist (a hint for writes).
    fn changes(
        &self,
        presence: Arc<dyn KeyPresence>,
        shutdown: CancellationToken,
    ) -> Result<ChangeReceiver, StoreError>;

    /// Makes `writes` durable and returns the record each one produced, in order. Writes may
    /// be in flight together; each has its own result.
    async fn write(&self, writes: Vec<StoreWrite>) -> Vec<Result<Record, StoreError>>;

    /// Creates the records of `writes` that do not exist yet; an existing record is kept as it
    /// is (a user's later switch is never overwritten). One result per write, in order: the
    /// record created, or `None` when one already existed. Writes may be in flight together.
    async fn create_if_absent(
        &self,
        writes: Vec<StoreWrite>,
    ) -> Vec<Result<Option<Record>, StoreError>>;

    /// Reads one record straight from the store, as fresh as the store can give: every write
    /// acknowledged to any client before the call is seen (on ZooKeeper a `sync`, then a read).
    /// For a proxy's read-through at login (a user written a moment ago, whose change has not
    /// reached the streams yet). `Ok(None)` when there is no such record.
    async fn read_fresh(&self, key: &RecordKey) -> Result<Option<Record>, StoreError>;

    /// Whether the store can be reached now (`true` for a local store); the health service
    /// reports NOT_SERVING while it is `false`.
    fn available(&self) -> watch::Receiver<bool>;

    /// The parts of the store that can fail on their own (each ZooKeeper session), by name,
    /// with whether each is up; the health service reports each. Empty for a local store.
    fn parts(&self) -> Vec<(&'static str, watch::Receiver<bool>)>;

    /// A short name of the implementation for logs and metrics, e.g. `"embedded"`.
    fn kind(&self) -> &'static str;

    /// Records held-back switches, in one batch (a transaction where the store has them),
    /// each replacing the user's previous pending switch. Each is dated by the user's record
    /// as fresh as the store can give ([`PendingSwitch::after`]). One result per switch, in
    /// order.
    async fn put_pending(
        &self,
        switches: Vec<HoldSwitch>,
    ) -> Vec<Result<PendingSwitch, StoreError>>;

    /// Removes the pending switches of `users`, where there are any (an immediate switch
    /// replaces them).
    async fn cancel_pending(&self, users: Vec<String>) -> Result<(), StoreError>;

    /// Applies due pending switches, each atomically: when its record is still exactly the
    /// one given and the user's record is still at its [`PendingSwitch::after`], writes the coin
    /// and removes the pending record; when the user changed since, removes the pending record
    /// without writing. Safe to call from every replica at once: at most one writes each. In
    /// one batch where the store has them (one redb transaction); one result per switch, in
    /// order.
    async fn apply_pending(
        &self,
        pending: Vec<PendingSwitch>,
    ) -> Vec<Result<PendingOutcome, StoreError>>;

    /// The user's pending switch, if any.
    async fn pending(&self, user: &str) -> Result<Option<PendingSwitch>, StoreError>;

    /// Every pending switch of this deployment. A record that cannot be read is skipped (and
    /// logged), not fatal.
    async fn all_pending(&self) -> Result<Vec<PendingSwitch>, StoreError>;

    /// When each of `users` was first seen in `coin`'s user list (Unix seconds), as recorded
    /// by [`UserCoinStore::record_first_seen`]; `None` for a user never recorded. One answer
    /// per user, in order.
    async fn first_seen(
        &self,
        coin: &str,
        users: Vec<String>,
    ) -> Result<Vec<Option<u64>>, StoreError>;

    /// Records that `users` were seen in `coin`'s user list at `seen_at` (Unix seconds),
    /// keeping the earlier time for a user already recorded.
    async fn record_first_seen(
        &self,
        coin: &str,
        users: Vec<String>,
        seen_at: u64,
    ) -> Result<(), StoreError>;

    /// A small piece of the control service's own durable state (e.g. the scheduled pull's
    /// position), by name; `None` when never set.
    async fn get_marker(&self, name: &str) -> Result<Option<String>, StoreError>;

    /// Sets such a piece of state.
    async fn set_marker(&self, name: &str, value: &str) -> Result<(), StoreError>;
}
