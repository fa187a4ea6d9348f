//! The `UserAutoRegAPI.IntervalSeconds` waits: one delay queue per [`super::Registrar`], holding
//! each registration the backend answered until its user is due to be created. One task serves
//! it ([`super::Registrar::run_creations`]): it sleeps until the earliest due time and creates
//! every user due by then in one write of the core (one ZooKeeper `multi`, one redb
//! transaction), then tells each waiting registration how its creation ended. A wait holds no
//! exchange permit, no task of its own beyond the parked registration, and no timer of its own.

use std::{collections::BTreeMap, sync::Mutex};

use tokio::{
    sync::{Notify, oneshot},
    time::Instant,
};

use super::Outcome;

/// A registration waiting for its user's creation.
#[derive(Debug)]
pub(crate) struct Waiting {
    /// The user, as stored.
    pub user: String,
    /// The backend's puid.
    pub puid: i64,
    /// Where the creation's outcome goes.
    pub done: oneshot::Sender<Outcome>,
}

/// The queue is full: as many registrations wait as it may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Full {
    /// Its capacity.
    pub capacity: usize,
}

#[derive(Debug, Default)]
struct Queue {
    /// By due time, then arrival.
    entries: BTreeMap<(Instant, u64), Waiting>,
    next_seq: u64,
}

/// The delay queue; see the module doc.
#[derive(Debug)]
pub(crate) struct Waits {
    queue: Mutex<Queue>,
    /// Something was added: the serving task looks at the earliest due time again.
    added: Notify,
    capacity: usize,
}

impl Waits {
    /// An empty queue of at most `capacity` registrations.
    pub fn new(capacity: usize) -> Self {
        Self {
            queue: Mutex::new(Queue::default()),
            added: Notify::new(),
            capacity,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Queue> {
        // Single inserts and removes: the queue is valid after any panic.
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues `user`'s creation at `due`; the receiver gets its outcome (or is closed when the
    /// queue stops first, at shutdown).
    pub fn schedule(
        &self,
        due: Instant,
        user: String,
        puid: i64,
    ) -> Result<oneshot::Receiver<Outcome>, Full> {
        let (done, outcome) = oneshot::channel();
        {
            let mut queue = self.lock();
            if queue.entries.len() >= self.capacity {
                return Err(Full {
                    capacity: self.capacity,
                });
            }
            let seq = queue.next_seq;
            queue.next_seq = seq.wrapping_add(1);
            queue
                .entries
                .insert((due, seq), Waiting { user, puid, done });
        }
        self.added.notify_one();
        Ok(outcome)
    }

    /// The earliest due time, if anything waits.
    pub fn next_due(&self) -> Option<Instant> {
        self.lock().entries.keys().next().map(|(due, _)| *due)
    }

    /// Takes up to `max` registrations due at `now`, earliest first.
    pub fn take_due(&self, now: Instant, max: usize) -> Vec<Waiting> {
        let mut queue = self.lock();
        let mut due = Vec::new();
        while due.len() < max {
            match queue.entries.first_key_value() {
                Some(((at, _), _)) if *at <= now => {}
                _ => break,
            }
            if let Some((_, waiting)) = queue.entries.pop_first() {
                due.push(waiting);
            }
        }
        due
    }

    /// Resolves when something was added since the last call.
    pub async fn added(&self) {
        self.added.notified().await;
    }

    /// How many registrations wait.
    pub fn len(&self) -> usize {
        self.lock().entries.len()
    }

    /// Drops every waiting registration (their receivers see the queue closed).
    pub fn clear(&self) {
        self.lock().entries.clear();
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn due_registrations_come_out_in_order_and_the_queue_is_bounded() {
        let waits = Waits::new(3);
        let now = Instant::now();
        let later = now + Duration::from_secs(1);
        let _b = waits.schedule(later, "b".into(), 2).expect("room");
        let _a = waits.schedule(now, "a".into(), 1).expect("room");
        let _c = waits.schedule(later, "c".into(), 3).expect("room");
        assert_eq!(
            waits.schedule(now, "d".into(), 4).expect_err("full"),
            Full { capacity: 3 }
        );
        assert_eq!(waits.next_due(), Some(now));
        let first: Vec<String> = waits
            .take_due(now, 10)
            .into_iter()
            .map(|w| w.user)
            .collect();
        assert_eq!(first, ["a"]);
        let rest: Vec<String> = waits
            .take_due(later, 1)
            .into_iter()
            .map(|w| w.user)
            .collect();
        assert_eq!(rest, ["b"], "at most max, in arrival order");
        assert_eq!(waits.len(), 1);
        waits.clear();
        assert_eq!(waits.next_due(), None);
    }
}
