//! Which user changes on the store's change stream this replica wrote itself, so that the
//! others (another replica's, the Go API server's, zkCli's) can be counted as switches from
//! `zookeeper` ([`crate::metrics::SwitchSource::ZooKeeper`]).
//!
//! A write's revision is known only once the store answers, and the stream may bring the
//! change before that answer (the embedded store emits as it commits; the ZooKeeper feed may
//! read the node before the write's response arrives). So:
//!
//! - before writing, the core marks the users it writes as in flight ([`OwnWrites::begin`]);
//! - a change on the stream whose (user, revision) this replica wrote and recorded is its own;
//!   one for a user with a write in flight waits, undecided, for that write's answer; any
//!   other is from outside;
//! - when a write is answered ([`OwnWriting::finish`]) its records are matched against the
//!   undecided changes; those left once the user has no write in flight are from outside. The
//!   records the stream has not brought yet are kept until it brings that revision or a later
//!   one for the user (the feed may skip a value a later change replaced).
//!
//! Memory is bounded by the writes in flight and the few not yet seen on the stream; should
//! the stream stall for good, at most [`MAX_UNSEEN`] are kept (then forgotten, with a warning).

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use prometheus_client::metrics::counter::Counter;
use tracing::warn;

use crate::store::Revision;

/// Own writes not yet seen on the stream kept at most; beyond, they are forgotten (their
/// changes would then count as outside ones).
pub const MAX_UNSEEN: usize = 1_000_000;

#[derive(Debug, Default)]
struct State {
    /// User → this replica's writes of it in flight.
    in_flight: HashMap<String, u32>,
    /// User → revisions seen on the stream while a write of it was in flight.
    undecided: HashMap<String, Vec<Revision>>,
    /// User → revisions this replica wrote that the stream has not brought yet.
    unseen: HashMap<String, Vec<Revision>>,
    unseen_len: usize,
}

impl State {
    /// Forgets the user's own unseen revisions at or below `revision`; answers whether
    /// `revision` itself was one.
    fn take_unseen_through(&mut self, user: &str, revision: Revision) -> bool {
        let Some(unseen) = self.unseen.get_mut(user) else {
            return false;
        };
        let own = unseen.contains(&revision);
        let before = unseen.len();
        unseen.retain(|r| *r > revision);
        self.unseen_len -= before - unseen.len();
        if unseen.is_empty() {
            self.unseen.remove(user);
        }
        own
    }
}

/// The tracker; see the module doc.
#[derive(Debug, Default)]
pub struct OwnWrites {
    state: Mutex<State>,
    /// Counts the changes from outside.
    outside: Counter,
}

impl OwnWrites {
    /// A tracker counting the changes from outside on `outside`.
    pub fn new(outside: Counter) -> Self {
        Self {
            state: Mutex::default(),
            outside,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // Every update leaves the maps consistent: keep going after a panic elsewhere.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Marks `users` as being written by this replica until the returned handle is finished
    /// or dropped.
    pub fn begin(self: &Arc<Self>, users: Vec<String>) -> OwnWriting {
        {
            let mut state = self.lock();
            for user in &users {
                *state.in_flight.entry(user.clone()).or_default() += 1;
            }
        }
        OwnWriting {
            tracker: Arc::clone(self),
            users,
            done: false,
        }
    }

    /// Classifies a user change the stream brought (`removed`: the user's record is gone):
    /// counts it when it is from outside; an own change or a removal is not counted, and one
    /// of a user with a write in flight waits for that write's answer.
    pub fn seen(&self, user: &str, revision: Revision, removed: bool) {
        let mut state = self.lock();
        if state.take_unseen_through(user, revision) || removed {
            return;
        }
        if state.in_flight.get(user).is_some_and(|n| *n > 0) {
            state
                .undecided
                .entry(user.to_owned())
                .or_default()
                .push(revision);
            return;
        }
        drop(state);
        self.outside.inc();
    }

    /// Ends writes of `users`: `written` are the (user, revision) they produced. Counts the
    /// changes seen meanwhile that are now known to be from outside.
    fn end(&self, users: &[String], written: &[(String, Revision)]) {
        let mut state = self.lock();
        for (user, revision) in written {
            let seen_already = state.undecided.get_mut(user).is_some_and(|seen| {
                let before = seen.len();
                seen.retain(|r| r != revision);
                seen.len() != before
            });
            if !seen_already {
                state
                    .unseen
                    .entry(user.clone())
                    .or_default()
                    .push(*revision);
                state.unseen_len += 1;
            }
        }
        let mut outside = 0u64;
        for user in users {
            let last = match state.in_flight.get_mut(user) {
                Some(n) => {
                    *n = n.saturating_sub(1);
                    *n == 0
                }
                None => true,
            };
            if last {
                state.in_flight.remove(user);
                if let Some(seen) = state.undecided.remove(user) {
                    outside += seen.len() as u64;
                }
            }
        }
        if state.unseen_len > MAX_UNSEEN {
            warn!(
                kept = state.unseen_len,
                "the store's change stream has not brought this replica's writes back; forgetting them (their changes would count as outside switches)"
            );
            state.unseen.clear();
            state.unseen_len = 0;
        }
        drop(state);
        self.outside.inc_by(outside);
    }

    /// Own writes not yet seen on the stream (for tests).
    pub fn unseen(&self) -> usize {
        self.lock().unseen_len
    }
}

/// Writes of some users in flight; see [`OwnWrites::begin`].
#[derive(Debug)]
pub struct OwnWriting {
    tracker: Arc<OwnWrites>,
    users: Vec<String>,
    done: bool,
}

impl OwnWriting {
    /// The writes were answered with `written` (user, revision) records.
    pub fn finish(mut self, written: &[(String, Revision)]) {
        self.done = true;
        self.tracker.end(&self.users, written);
    }
}

impl Drop for OwnWriting {
    /// Dropped without an answer (the call was cancelled, the write failed): what the stream
    /// brought meanwhile for these users counts as outside.
    fn drop(&mut self) {
        if !self.done {
            self.tracker.end(&self.users, &[]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn users(names: &[&str]) -> Vec<String> {
        names.iter().map(|n| (*n).to_owned()).collect()
    }

    fn tracker() -> (Arc<OwnWrites>, Counter) {
        let outside = Counter::default();
        (Arc::new(OwnWrites::new(outside.clone())), outside)
    }

    #[test]
    fn own_writes_are_told_apart_in_either_order() {
        let (own, outside) = tracker();
        // Answered first, seen after.
        own.begin(users(&["a"])).finish(&[("a".into(), 5)]);
        own.seen("a", 5, false);
        // Seen first (while in flight), answered after.
        let w = own.begin(users(&["b"]));
        own.seen("b", 7, false);
        w.finish(&[("b".into(), 7)]);
        assert_eq!(outside.get(), 0);
        // Outside, with nothing in flight.
        own.seen("c", 8, false);
        assert_eq!(outside.get(), 1);
        assert_eq!(own.unseen(), 0);
    }

    #[test]
    fn an_outside_change_during_an_own_write_counts_once_the_write_is_answered() {
        let (own, outside) = tracker();
        let w = own.begin(users(&["a"]));
        own.seen("a", 3, false);
        own.seen("a", 4, false);
        assert_eq!(outside.get(), 0, "undecided for now");
        w.finish(&[("a".into(), 4)]);
        assert_eq!(outside.get(), 1, "3 was someone else's");
        // Two own writes of one user in flight: decided when the last is answered.
        let w1 = own.begin(users(&["b"]));
        let w2 = own.begin(users(&["b"]));
        own.seen("b", 10, false);
        own.seen("b", 11, false);
        w1.finish(&[("b".into(), 10)]);
        assert_eq!(outside.get(), 1);
        w2.finish(&[("b".into(), 12)]);
        assert_eq!(outside.get(), 2, "11 was someone else's");
        own.seen("b", 12, false);
        assert_eq!(outside.get(), 2);
        assert_eq!(own.unseen(), 0);
    }

    #[test]
    fn a_skipped_own_value_is_forgotten_at_a_later_change() {
        let (own, outside) = tracker();
        own.begin(users(&["a", "a"]))
            .finish(&[("a".into(), 5), ("a".into(), 6)]);
        assert_eq!(own.unseen(), 2);
        // The feed read the node once, at its last value.
        own.seen("a", 6, false);
        assert_eq!((own.unseen(), outside.get()), (0, 0));
        // An outside change after an own one the stream skipped.
        own.begin(users(&["b"])).finish(&[("b".into(), 8)]);
        own.seen("b", 9, false);
        assert_eq!((own.unseen(), outside.get()), (0, 1));
        // A removal is never a switch, and forgets what it replaced.
        own.begin(users(&["c"])).finish(&[("c".into(), 10)]);
        own.seen("c", 11, true);
        assert_eq!((own.unseen(), outside.get()), (0, 1));
    }

    #[test]
    fn a_dropped_write_releases_its_users() {
        let (own, outside) = tracker();
        let w = own.begin(users(&["a"]));
        own.seen("a", 3, false);
        drop(w);
        assert_eq!(outside.get(), 1, "seen during a write that never answered");
        own.seen("a", 4, false);
        assert_eq!(outside.get(), 2, "no write in flight any more");
    }
}
