//! Read-through at login: a user the cache does not know yet is asked of the control plane
//! (LookupUser: the control reads its store itself, on ZooKeeper a `sync` then a read) before
//! the miner is told 201. A user written a few milliseconds before its miner logs in is then
//! found, as the Go proxy, which read ZooKeeper at every login, found it; the stream brings the
//! user to the cache a moment later.
//!
//! Bounded, so that a flood of junk names costs the control plane little:
//! - at most `max_in_flight` lookups at once per proxy; a login that cannot get a turn within
//!   [`PERMIT_WAIT`] is answered as for an unknown user ([`Lookup::Busy`]);
//! - a name the control plane said does not exist is remembered for `negative_ttl`
//!   ([`Lookup::KnownUnknown`]), at most [`NEGATIVE_ENTRIES`] names (the table is cleared when
//!   full: a flood of distinct names ages it out faster, never grows it);
//! - each lookup has [`LOOKUP_TIMEOUT`] at most.
//!
//! The cache is always asked first, so a remembered miss never hides a user the stream has
//! delivered since.

#![forbid(unsafe_code)]

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use tokio::{sync::Semaphore, time::Instant};
use tracing::debug;

use crate::control::{self, ControlEndpoints};

/// How long a login waits for a lookup turn before it is answered as for an unknown user.
pub const PERMIT_WAIT: Duration = Duration::from_secs(1);

/// How long one lookup may take.
pub const LOOKUP_TIMEOUT: Duration = Duration::from_secs(3);

/// The most names remembered as unknown.
pub const NEGATIVE_ENTRIES: usize = 65_536;

/// What a lookup found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    /// The user exists: its name as stored and its coin.
    Found {
        /// The name as stored.
        user: String,
        /// The user's coin.
        coin: String,
    },
    /// The control plane read the store and found no such user.
    Unknown,
    /// The name was found unknown a moment ago; the control plane was not asked again.
    KnownUnknown,
    /// No lookup turn was free in time.
    Busy,
    /// The control plane could not be asked or could not answer.
    Failed,
    /// Read-through is off.
    Off,
}

impl Lookup {
    /// The metrics label.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Found { .. } => "found",
            Self::Unknown => "unknown",
            Self::KnownUnknown => "known_unknown",
            Self::Busy => "busy",
            Self::Failed => "failed",
            Self::Off => "off",
        }
    }
}

/// Counts of lookups by outcome, for metrics and tests.
#[derive(Debug, Default)]
pub struct LookupCounts {
    /// Lookups that reached the control plane (whatever it answered).
    pub asked: AtomicU64,
    /// The most lookups in flight at once since start.
    pub peak_in_flight: AtomicU64,
    in_flight: AtomicU64,
    by_outcome: Mutex<HashMap<&'static str, u64>>,
}

impl LookupCounts {
    /// Lookups by outcome label (see [`Lookup::label`]).
    pub fn by_outcome(&self) -> Vec<(&'static str, u64)> {
        let mut all: Vec<_> = lock(&self.by_outcome)
            .iter()
            .map(|(k, v)| (*k, *v))
            .collect();
        all.sort_unstable();
        all
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Reads users through the control plane, bounded; see the module doc.
#[derive(Debug)]
pub struct UserLookups {
    control: ControlEndpoints,
    permits: Arc<Semaphore>,
    max_in_flight: usize,
    negative_ttl: Duration,
    /// Names found unknown, and until when that holds.
    negative: Mutex<HashMap<Box<str>, Instant>>,
    counts: LookupCounts,
}

impl UserLookups {
    /// Lookups through `control`, at most `max_in_flight` at once (0: read-through off),
    /// remembering misses for `negative_ttl` (zero: not remembered).
    pub fn new(control: ControlEndpoints, max_in_flight: usize, negative_ttl: Duration) -> Self {
        Self {
            control,
            permits: Arc::new(Semaphore::new(max_in_flight)),
            max_in_flight,
            negative_ttl,
            negative: Mutex::new(HashMap::new()),
            counts: LookupCounts::default(),
        }
    }

    /// The counts so far.
    pub fn counts(&self) -> &LookupCounts {
        &self.counts
    }

    /// Asks the control plane for `user`, within the bounds of the module doc, by `deadline`
    /// at the latest.
    pub async fn lookup(&self, user: &str, deadline: Instant) -> Lookup {
        let outcome = self.lookup_uncounted(user, deadline).await;
        *lock(&self.counts.by_outcome)
            .entry(outcome.label())
            .or_default() += 1;
        outcome
    }

    async fn lookup_uncounted(&self, user: &str, deadline: Instant) -> Lookup {
        if self.max_in_flight == 0 {
            return Lookup::Off;
        }
        if self.known_unknown(user) {
            return Lookup::KnownUnknown;
        }
        let wait_until = deadline.min(Instant::now() + PERMIT_WAIT);
        let Ok(Ok(_permit)) = tokio::time::timeout_at(wait_until, self.permits.acquire()).await
        else {
            return Lookup::Busy;
        };
        // Another login may have asked for the same name while this one waited.
        if self.known_unknown(user) {
            return Lookup::KnownUnknown;
        }
        let now = self.counts.in_flight.fetch_add(1, Ordering::Relaxed) + 1;
        self.counts.peak_in_flight.fetch_max(now, Ordering::Relaxed);
        self.counts.asked.fetch_add(1, Ordering::Relaxed);
        let until = deadline.min(Instant::now() + LOOKUP_TIMEOUT);
        let answer =
            tokio::time::timeout_at(until, control::lookup_user(&self.control, user)).await;
        self.counts.in_flight.fetch_sub(1, Ordering::Relaxed);
        match answer {
            Ok(Ok(Some((user, coin)))) => Lookup::Found { user, coin },
            Ok(Ok(None)) => {
                self.remember_unknown(user);
                Lookup::Unknown
            }
            Ok(Err(e)) => {
                debug!(error = %e, "user lookup failed");
                Lookup::Failed
            }
            Err(_) => {
                debug!("user lookup timed out");
                Lookup::Failed
            }
        }
    }

    fn known_unknown(&self, user: &str) -> bool {
        let mut negative = lock(&self.negative);
        match negative.get(user) {
            Some(until) if *until > Instant::now() => true,
            Some(_) => {
                negative.remove(user);
                false
            }
            None => false,
        }
    }

    fn remember_unknown(&self, user: &str) {
        if self.negative_ttl.is_zero() {
            return;
        }
        let mut negative = lock(&self.negative);
        if negative.len() >= NEGATIVE_ENTRIES {
            let now = Instant::now();
            negative.retain(|_, until| *until > now);
            if negative.len() >= NEGATIVE_ENTRIES {
                negative.clear();
            }
        }
        negative.insert(user.into(), Instant::now() + self.negative_ttl);
    }
}
