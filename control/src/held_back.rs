//! The schedule of held-back switches (SPEC §6's safety period) on one replica: which pending
//! switches this replica knows of and when each is due, so that a timer applies each at its
//! due time instead of re-reading every pending switch every second.
//!
//! The store holds the truth ([`crate::store::UserCoinStore::put_pending`]); the schedule only
//! says when to look. An entry is added when this replica holds a switch back and by the
//! periodic reconcile (`ZKReconcileSeconds`: switches held back by other replicas, or before a
//! restart); it leaves when it is applied, found superseded or gone. A stale entry costs one
//! store read at its due time: the apply itself is conditional in the store, so the schedule
//! can never make an older switch overwrite a newer one.

use std::{
    collections::{BTreeSet, HashMap},
    sync::Mutex,
};

use tokio::sync::Notify;

use crate::store::PendingSwitch;

/// The held-back switches this replica knows of, by due time; see the module doc.
#[derive(Debug, Default)]
pub struct HeldBackSchedule {
    inner: Mutex<Schedule>,
    /// Woken when an entry is added, so that the timer can wait for an earlier one.
    added: Notify,
}

#[derive(Debug, Default)]
struct Schedule {
    /// (when to look, user), in order.
    due: BTreeSet<(u64, String)>,
    /// user → (when to look, the pending switch).
    by_user: HashMap<String, (u64, PendingSwitch)>,
}

impl HeldBackSchedule {
    fn lock(&self) -> std::sync::MutexGuard<'_, Schedule> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Schedules `pending` at its due time, replacing the user's entry.
    pub fn insert(&self, pending: PendingSwitch) {
        let at = pending.apply_at;
        self.insert_at(pending, at);
    }

    /// Schedules `pending` to be looked at `at` (Unix seconds), replacing the user's entry.
    pub fn insert_at(&self, pending: PendingSwitch, at: u64) {
        let mut s = self.lock();
        let user = pending.user.clone();
        if let Some((old_at, _)) = s.by_user.insert(user.clone(), (at, pending)) {
            s.due.remove(&(old_at, user.clone()));
        }
        s.due.insert((at, user));
        drop(s);
        self.added.notify_one();
    }

    /// Adds `pending` unless the schedule has this very switch already (the reconcile).
    pub fn learn(&self, pending: PendingSwitch) {
        let known = self
            .lock()
            .by_user
            .get(&pending.user)
            .is_some_and(|(_, p)| *p == pending);
        if !known {
            self.insert(pending);
        }
    }

    /// Removes the user's entry.
    pub fn remove(&self, user: &str) {
        let mut s = self.lock();
        if let Some((at, _)) = s.by_user.remove(user) {
            s.due.remove(&(at, user.to_owned()));
        }
    }

    /// Whether the user has an entry.
    pub fn contains(&self, user: &str) -> bool {
        self.lock().by_user.contains_key(user)
    }

    /// Takes every entry due at `now` or earlier.
    pub fn take_due(&self, now: u64) -> Vec<PendingSwitch> {
        let mut s = self.lock();
        let mut out = Vec::new();
        while let Some((at, user)) = s.due.first().cloned() {
            if at > now {
                break;
            }
            s.due.pop_first();
            if let Some((_, p)) = s.by_user.remove(&user) {
                out.push(p);
            }
        }
        out
    }

    /// When the earliest entry is due.
    pub fn next_due(&self) -> Option<u64> {
        self.lock().due.first().map(|(at, _)| *at)
    }

    /// How many entries there are.
    pub fn len(&self) -> usize {
        self.lock().by_user.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Waits until an entry is added.
    pub async fn added(&self) {
        self.added.notified().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(user: &str, at: u64) -> PendingSwitch {
        PendingSwitch {
            user: user.into(),
            coin: "bch".into(),
            apply_at: at,
            after: 1,
        }
    }

    #[test]
    fn entries_come_out_in_due_order_and_a_user_has_one() {
        let s = HeldBackSchedule::default();
        s.insert(p("a", 30));
        s.insert(p("b", 10));
        s.insert(p("a", 20));
        assert_eq!(s.len(), 2);
        assert_eq!(s.next_due(), Some(10));
        assert!(s.take_due(5).is_empty());
        let due: Vec<String> = s.take_due(25).into_iter().map(|p| p.user).collect();
        assert_eq!(due, vec!["b", "a"]);
        assert!(s.is_empty());
    }

    #[test]
    fn learning_a_known_switch_keeps_its_retry_time() {
        let s = HeldBackSchedule::default();
        s.insert_at(p("a", 10), 50);
        s.learn(p("a", 10));
        assert_eq!(s.next_due(), Some(50));
        s.learn(p("a", 12));
        assert_eq!(s.next_due(), Some(12));
    }
}
