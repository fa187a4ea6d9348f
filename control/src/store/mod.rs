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

use crate::index::UserCoinIndex;

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
/// Kept in the store so that a restart does not lose it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingSwitch {
    /// The user, as stored.
    pub user: String,
    /// The coin the switch will write.
    pub coin: String,
    /// When it is due, in Unix seconds.
    pub apply_at: u64,
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
/// Two ways changes reach the in-memory index. A store that only this process writes (the
/// embedded one) leaves it to the caller ([`crate::core::SwitchCore`]), which serializes its
/// writes and applies their records in revision order. A store that others write too
/// (ZooKeeper: other replicas, zkCli, the Go API server) follows its own changes and feeds the
/// index itself, in revision order, from [`UserCoinStore::follow`]; the caller then only waits
/// until the index has caught up with its writes.
#[async_trait]
pub trait UserCoinStore: Send + Sync + 'static {
    /// Reads the whole state. A store that feeds the index itself may return no records: its
    /// feed delivers them.
    async fn load(&self) -> Result<StoreContents, StoreError>;

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

    /// Starts feeding every change of the store, whoever made it, into `index` until
    /// `shutdown`; returns `false` when the store has no outside writers and the caller applies
    /// its own writes.
    fn follow(&self, index: Arc<UserCoinIndex>, shutdown: CancellationToken) -> bool;

    /// Whether the store can be reached now (`true` for a local store); the health service
    /// reports NOT_SERVING while it is `false`.
    fn available(&self) -> watch::Receiver<bool>;

    /// A short name of the implementation for logs and metrics, e.g. `"embedded"`.
    fn kind(&self) -> &'static str;

    /// Records a pending switch, replacing the user's previous one.
    async fn put_pending(&self, pending: &PendingSwitch) -> Result<(), StoreError>;

    /// Removes the user's pending switch; with `only`, only when it is still that one.
    /// Answers whether one was removed.
    async fn take_pending(
        &self,
        user: &str,
        only: Option<&PendingSwitch>,
    ) -> Result<bool, StoreError>;

    /// The user's pending switch, if any.
    async fn pending(&self, user: &str) -> Result<Option<PendingSwitch>, StoreError>;

    /// Every pending switch.
    async fn all_pending(&self) -> Result<Vec<PendingSwitch>, StoreError>;
}
