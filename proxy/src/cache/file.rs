//! The cache on disk (`CacheFile`): the last state of the cache, with the revision and store ID
//! it matches, and the proxy's server-ID lease. A proxy restarted while the control plane is
//! away serves from it at once, and a proxy restarted while the control plane is there resumes
//! the stream from its revision instead of taking a full snapshot (a fleet of 100 proxies with
//! 1,000,000 users restarting does not ask for 100 snapshots). A leased server ID is taken again
//! from it when no control replica answers at start.
//!
//! Written every [`SAVE_PERIOD`] when something changed and at shutdown, to a temporary file
//! that is synced and renamed over the old one, so a crash mid-write leaves the old file. A
//! save holds the cache's turn ([`UserCoinCache::save_turn`]): changes from the stream wait for
//! it, lookups do not. Read once at start; a file that is damaged, truncated or of another
//! version is ignored with a warning (the proxy then starts as without one).
//!
//! Format, little-endian: the magic `SWYD-PROXY-CACHE-1\n`, the revision (u64), the store ID,
//! the lease (a flag byte, then the chain type, the server ID as u8 and the instance ID), the
//! coin names (u32 count, then each), the users (u32 count, then the name and the coin's
//! position among the coin names as u32), the case index (u32 count, then the lowercase name and
//! the name), and last an FNV-1a 64 checksum of everything before it. A text is a u16 length
//! and its UTF-8 bytes.

#![forbid(unsafe_code)]

use std::{
    collections::HashMap,
    io::Write as _,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use thiserror::Error;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::{Tables, UserCoinCache, read, write};

/// How often the file is rewritten when the cache or the lease changed.
pub const SAVE_PERIOD: Duration = Duration::from_secs(10);

const MAGIC: &[u8] = b"SWYD-PROXY-CACHE-1\n";

/// The longest text the file may hold (user names, coins, IDs are far shorter).
const MAX_TEXT: usize = 1024;

/// A server-ID lease as saved: enough to renew it after a restart.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SavedLease {
    /// The chain type it was taken for.
    pub chain_type: String,
    /// The leased ID.
    pub server_id: u8,
    /// The instance identity it was taken with (renewals must use it).
    pub instance_id: String,
}

/// Why the file could not be read or written.
#[derive(Debug, Error)]
pub enum CacheFileError {
    /// Reading or writing the file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What failed.
        source: std::io::Error,
    },
    /// The file is not a cache file of this version, or is damaged.
    #[error("{path}: not a usable cache file ({reason})")]
    Format {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: &'static str,
    },
}

/// What a file held, once loaded into the cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Loaded {
    /// The revision the cache is at now.
    pub revision: u64,
    /// Users loaded.
    pub users: usize,
    /// The lease saved with it.
    pub lease: Option<SavedLease>,
}

/// The cache file at one path.
#[derive(Debug, Clone)]
pub struct CacheFile {
    path: PathBuf,
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

fn put_text(out: &mut Vec<u8>, text: &str) {
    // Texts come from the control plane's validated records; cut (on a char boundary) rather
    // than write a length that does not fit.
    let mut end = text.len().min(MAX_TEXT);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    out.extend_from_slice(&(end as u16).to_le_bytes());
    out.extend_from_slice(&text.as_bytes()[..end]);
}

/// Reads the file's fields in order, each checked against what is left.
struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], &'static str> {
        if self.rest.len() < n {
            return Err("truncated");
        }
        let (head, tail) = self.rest.split_at(n);
        self.rest = tail;
        Ok(head)
    }

    fn u8(&mut self) -> Result<u8, &'static str> {
        Ok(self.take(1)?[0])
    }

    fn u32(&mut self) -> Result<u32, &'static str> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64(&mut self) -> Result<u64, &'static str> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }

    fn text(&mut self) -> Result<&'a str, &'static str> {
        let b = self.take(2)?;
        let len = usize::from(u16::from_le_bytes([b[0], b[1]]));
        if len > MAX_TEXT {
            return Err("a text is too long");
        }
        std::str::from_utf8(self.take(len)?).map_err(|_| "a text is not UTF-8")
    }

    /// A count of items of at least `min_item` bytes each: never more than the bytes left
    /// could hold, so a damaged count cannot make the reader reserve without end.
    fn count(&mut self, min_item: usize) -> Result<usize, &'static str> {
        let n = self.u32()? as usize;
        if n.saturating_mul(min_item) > self.rest.len() {
            return Err("a count is larger than the file");
        }
        Ok(n)
    }
}

impl CacheFile {
    /// The cache file at `path`.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self { path: path.into() }
    }

    /// Where the file is.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn format_error(&self, reason: &'static str) -> CacheFileError {
        CacheFileError::Format {
            path: self.path.clone(),
            reason,
        }
    }

    fn io_error(&self, source: std::io::Error) -> CacheFileError {
        CacheFileError::Io {
            path: self.path.clone(),
            source,
        }
    }

    /// The cache's state and `lease` as the file's bytes.
    pub fn encode(cache: &UserCoinCache, lease: Option<&SavedLease>) -> Vec<u8> {
        let live = read(&cache.live);
        let tables = &live.tables;
        let mut out = Vec::with_capacity(64 + tables.users.len() * 24);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&live.revision.to_le_bytes());
        put_text(&mut out, &live.store_id);
        match lease {
            Some(lease) => {
                out.push(1);
                put_text(&mut out, &lease.chain_type);
                out.push(lease.server_id);
                put_text(&mut out, &lease.instance_id);
            }
            None => out.push(0),
        }
        let mut coin_numbers: HashMap<&str, u32> = HashMap::new();
        out.extend_from_slice(&(tables.coins.len() as u32).to_le_bytes());
        for (n, coin) in tables.coins.iter().enumerate() {
            put_text(&mut out, coin);
            coin_numbers.insert(&**coin, n as u32);
        }
        out.extend_from_slice(&(tables.users.len() as u32).to_le_bytes());
        for (user, coin) in &tables.users {
            put_text(&mut out, user);
            let n = coin_numbers.get(&**coin).copied().unwrap_or(u32::MAX);
            out.extend_from_slice(&n.to_le_bytes());
        }
        out.extend_from_slice(&(tables.case_index.len() as u32).to_le_bytes());
        for (lower, name) in &tables.case_index {
            put_text(&mut out, lower);
            put_text(&mut out, name);
        }
        drop(live);
        let sum = fnv1a(&out);
        out.extend_from_slice(&sum.to_le_bytes());
        out
    }

    /// Writes the cache's state and `lease`: a temporary file beside it, synced, renamed over
    /// it.
    pub fn save(
        &self,
        cache: &UserCoinCache,
        lease: Option<&SavedLease>,
    ) -> Result<usize, CacheFileError> {
        let bytes = Self::encode(cache, lease);
        let mut tmp = self.path.clone().into_os_string();
        tmp.push(".tmp");
        let tmp = PathBuf::from(tmp);
        let written = (|| {
            let mut file = std::fs::File::create(&tmp)?;
            file.write_all(&bytes)?;
            file.sync_all()?;
            std::fs::rename(&tmp, &self.path)
        })();
        written.map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            self.io_error(e)
        })?;
        Ok(bytes.len())
    }

    /// Reads the file into `cache`, which must not have synced yet: the cache then serves
    /// the saved state and the stream resumes from its revision. `Ok(None)` when there is no
    /// file.
    pub fn load(&self, cache: &UserCoinCache) -> Result<Option<Loaded>, CacheFileError> {
        let bytes = match std::fs::read(&self.path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(self.io_error(e)),
        };
        let (tables, revision, store_id, lease) =
            decode(&bytes).map_err(|reason| self.format_error(reason))?;
        let users = tables.users.len();
        cache.restore(tables, revision, store_id);
        Ok(Some(Loaded {
            revision,
            users,
            lease,
        }))
    }
}

/// The file's bytes back into tables, revision, store ID and lease.
fn decode(bytes: &[u8]) -> Result<(Tables, u64, String, Option<SavedLease>), &'static str> {
    let body_len = bytes.len().checked_sub(8).ok_or("truncated")?;
    let (body, sum) = bytes.split_at(body_len);
    let mut sum_bytes = [0u8; 8];
    sum_bytes.copy_from_slice(sum);
    if !body.starts_with(MAGIC) {
        return Err("not a Switchyard proxy cache file of this version");
    }
    if fnv1a(body) != u64::from_le_bytes(sum_bytes) {
        return Err("checksum mismatch");
    }
    let mut r = Reader {
        rest: &body[MAGIC.len()..],
    };
    let revision = r.u64()?;
    let store_id = r.text()?.to_owned();
    let lease = match r.u8()? {
        0 => None,
        1 => {
            let chain_type = r.text()?.to_owned();
            let server_id = r.u8()?;
            let instance_id = r.text()?.to_owned();
            (server_id != 0).then_some(SavedLease {
                chain_type,
                server_id,
                instance_id,
            })
        }
        _ => return Err("a bad lease flag"),
    };
    let mut tables = Tables::default();
    let coins: Vec<Arc<str>> = (0..r.count(2)?)
        .map(|_| r.text().map(|coin| tables.intern(coin)))
        .collect::<Result<_, _>>()?;
    let users = r.count(6)?;
    tables.users.reserve(users);
    for _ in 0..users {
        let user = r.text()?;
        let coin = coins
            .get(r.u32()? as usize)
            .ok_or("a user's coin is not among the coins")?;
        if user.is_empty() {
            return Err("an empty user name");
        }
        tables.users.insert(Arc::from(user), Arc::clone(coin));
    }
    for _ in 0..r.count(4)? {
        let lower = r.text()?;
        let name = r.text()?;
        tables.case_index.insert(Arc::from(lower), Arc::from(name));
    }
    if !r.rest.is_empty() {
        return Err("bytes after the last record");
    }
    Ok((tables, revision, store_id, lease))
}

/// Keeps the file up to date until `shutdown`, then writes it a last time: every
/// [`SAVE_PERIOD`] when the cache's revision or the lease changed since the last write.
pub async fn keep_saved(
    file: CacheFile,
    cache: Arc<UserCoinCache>,
    mut lease: watch::Receiver<Option<SavedLease>>,
    shutdown: CancellationToken,
) {
    let mut saved: Option<(u64, Option<SavedLease>)> = None;
    let mut warned = false;
    loop {
        let stop = tokio::select! {
            () = shutdown.cancelled() => true,
            () = tokio::time::sleep(SAVE_PERIOD) => false,
        };
        let now = (cache.revision(), lease.borrow_and_update().clone());
        // Nothing worth a file before the first sync (or load).
        if cache.is_synced() && saved.as_ref() != Some(&now) {
            let (file, cache) = (file.clone(), Arc::clone(&cache));
            let lease = now.1.clone();
            // Changes from the stream wait for the save's end (not on the tables' lock, where
            // they would hold up the lookups).
            let turn = cache.save_turn().await;
            let result = tokio::task::spawn_blocking(move || {
                let _turn = turn;
                file.save(&cache, lease.as_ref())
            })
            .await;
            match result {
                Ok(Ok(bytes)) => {
                    debug!(revision = now.0, bytes, "cache file written");
                    saved = Some(now);
                    warned = false;
                }
                Ok(Err(e)) if !warned => {
                    warn!(error = %e, "the cache file cannot be written; the proxy serves on without it");
                    warned = true;
                }
                Ok(Err(_)) => {}
                Err(e) => warn!(error = %e, "the cache file writer failed"),
            }
        }
        if stop {
            info!("cache file writer stopped");
            return;
        }
    }
}

impl UserCoinCache {
    /// Serves `tables` at `revision` of `store_id` (read from the cache file at start) and
    /// counts as synced: lookups answer from it until the stream brings changes.
    fn restore(&self, tables: Tables, revision: u64, store_id: String) {
        {
            let mut live = write(&self.live);
            live.tables = tables;
            live.revision = revision;
            live.store_id = store_id;
        }
        self.synced.send_replace(true);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use switchyard_proto::v1::{CaseIndexEntry, UserCoinEntry, WatchSwitchesResponse};

    /// A fresh directory under the system's temporary one, removed when dropped.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(name: &str) -> Self {
            let dir = std::env::temp_dir().join(format!(
                "switchyard-cache-file-{}-{name}",
                std::process::id()
            ));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).expect("temporary directory");
            Self(dir)
        }

        fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn filled() -> Arc<UserCoinCache> {
        let cache = UserCoinCache::new();
        cache.apply(&WatchSwitchesResponse {
            reset: true,
            users: vec![
                UserCoinEntry {
                    user: "alice".into(),
                    coin: "btc".into(),
                    revision: 3,
                    removed: false,
                },
                UserCoinEntry {
                    user: "bob".into(),
                    coin: "bch".into(),
                    revision: 7,
                    removed: false,
                },
            ],
            case_index: vec![CaseIndexEntry {
                lowercase_name: "carol".into(),
                name: "Carol".into(),
                revision: 8,
                removed: false,
            }],
            revision: 9,
            snapshot_complete: true,
            store_id: "store-1".into(),
        });
        cache
    }

    /// A change that arrives while a save reads the tables waits for the save's end without
    /// holding up lookups. (Before: it waited on the tables' lock, and every lookup waited
    /// behind it until the save ended.)
    #[tokio::test]
    // The read guard stands for the save's encoder (on a blocking thread in the proxy); the
    // test polls the applier by hand and never yields while it holds it.
    #[allow(clippy::await_holding_lock)]
    async fn a_change_during_a_save_waits_for_it_and_lookups_go_on() {
        let cache = filled();
        // A save, stopped while it reads the tables: its turn, then the read lock it encodes
        // under.
        let turn = cache.save_turn().await;
        let encoding = read(&cache.live);
        let change = WatchSwitchesResponse {
            reset: false,
            users: vec![UserCoinEntry {
                user: "alice".into(),
                coin: "ltc".into(),
                revision: 10,
                removed: false,
            }],
            case_index: vec![],
            revision: 10,
            snapshot_complete: false,
            store_id: String::new(),
        };
        let mut applying = Box::pin(cache.apply_in_turn(&change));
        assert!(
            futures::poll!(applying.as_mut()).is_pending(),
            "applied during the save"
        );
        // The change waits for the turn, not on the lock: a lookup from another thread
        // answers now (a writer waiting on the lock would block it until the save ends).
        let (tx, rx) = std::sync::mpsc::channel();
        {
            let cache = Arc::clone(&cache);
            std::thread::spawn(move || {
                let _ = tx.send(cache.coin_of("alice"));
            });
        }
        let seen = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("a lookup during a save answers");
        assert_eq!(
            seen.as_deref(),
            Some("btc"),
            "the change waits for the save"
        );
        drop(encoding);
        drop(turn);
        applying.await;
        assert_eq!(cache.coin_of("alice").as_deref(), Some("ltc"));
        assert_eq!(cache.revision(), 10);
    }

    #[test]
    fn a_saved_cache_comes_back_whole_with_its_revision_and_lease() {
        let dir = TempDir::new("round-trip");
        let file = CacheFile::new(dir.path().join("cache"));
        let lease = SavedLease {
            chain_type: "bitcoin".into(),
            server_id: 42,
            instance_id: "i-1".into(),
        };
        file.save(&filled(), Some(&lease)).expect("save");
        let back = UserCoinCache::new();
        let loaded = file.load(&back).expect("load").expect("a file");
        assert_eq!(loaded.revision, 9);
        assert_eq!(loaded.users, 2);
        assert_eq!(loaded.lease, Some(lease));
        assert!(back.is_synced());
        assert_eq!(back.revision(), 9);
        assert_eq!(back.store_id(), "store-1");
        assert_eq!(back.coin_of("alice").as_deref(), Some("btc"));
        assert_eq!(back.coin_of("bob").as_deref(), Some("bch"));
        assert_eq!(back.canonical_name("carol").as_deref(), Some("Carol"));
    }

    #[test]
    fn a_damaged_file_is_refused_whole_and_never_panics() {
        let dir = TempDir::new("damaged");
        let path = dir.path().join("cache");
        let file = CacheFile::new(&path);
        file.save(&filled(), None).expect("save");
        let good = std::fs::read(&path).expect("read");
        // Every truncation and every single flipped byte: an error, the cache untouched.
        let mut damaged: Vec<Vec<u8>> = (0..good.len()).map(|n| good[..n].to_vec()).collect();
        for i in 0..good.len() {
            let mut bad = good.clone();
            bad[i] ^= 0x41;
            damaged.push(bad);
        }
        for bad in damaged {
            std::fs::write(&path, &bad).expect("write");
            let cache = UserCoinCache::new();
            assert!(file.load(&cache).is_err(), "{bad:?} was accepted");
            assert!(!cache.is_synced());
            assert_eq!(cache.user_count(), 0);
        }
        assert!(
            file.load(&UserCoinCache::new()).is_err(),
            "the last damaged file stays refused"
        );
        std::fs::remove_file(&path).expect("remove");
        assert!(file.load(&UserCoinCache::new()).expect("no file").is_none());
    }
}
