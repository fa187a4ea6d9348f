//! What decides whether a registration request is admitted: the bounds per source (the proxy
//! that asked) and per name pattern ([`Tally`]), and the names the backend refused a moment ago
//! ([`RefusedNames`]). See the module doc of [`super`] for the choices.

use std::{
    collections::{HashMap, VecDeque, hash_map::Entry},
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::time::Instant;

use super::AutoRegError;

/// `now + wait`, or about 30 years from now for a wait too long for the clock.
pub fn later(now: Instant, wait: Duration) -> Instant {
    now.checked_add(wait)
        .or_else(|| now.checked_add(Duration::from_secs(30 * 365 * 86_400)))
        .unwrap_or(now)
}

/// How many leading characters of a name's stem make its pattern.
pub const PATTERN_CHARS: usize = 5;

/// The proxy a request came from: its server ID, read from the session ID it sent (SPEC §3:
/// `server_id << 24 | index` on bitcoin-like chains, `server_id << 16 | index` on ethereum,
/// whose top byte is 0). 0 for a request without a session ID (a node written by hand).
pub fn source_of(session_id: u32) -> u8 {
    let [top, ethereum, _, _] = session_id.to_be_bytes();
    if top != 0 { top } else { ethereum }
}

/// A name's pattern: its stem (the name without its trailing ASCII digits), lowercased, cut to
/// its first [`PATTERN_CHARS`] characters; `None` for a name of digits only, which has no
/// pattern (pools with numeric account names must not share one bucket).
///
/// `test1` … `test999`, `Test_0042` and `testabc7` share `test` / `test_` / `testa`; `alice`
/// and `bob` do not share anything.
pub fn name_pattern(name: &str) -> Option<String> {
    let stem = name.trim_end_matches(|c: char| c.is_ascii_digit());
    if stem.is_empty() {
        return None;
    }
    Some(
        stem.chars()
            .take(PATTERN_CHARS)
            .flat_map(char::to_lowercase)
            .collect(),
    )
}

/// The bounds a request is checked against besides `AutoRegMaxPending`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SourceLimits {
    /// `AutoRegMaxPendingPerProxy`.
    pub per_proxy: usize,
    /// `AutoRegMaxPendingPerPattern`.
    pub per_pattern: usize,
}

/// Pending requests counted per source and per pattern. Its keys are bounded by what it counts:
/// at most 256 sources, and at most one pattern per pending request (a count that falls to 0 is
/// removed).
#[derive(Debug, Default)]
pub struct Tally {
    by_source: HashMap<u8, usize>,
    by_pattern: HashMap<String, usize>,
}

impl Tally {
    /// Whether one more request from `source` for a name of `pattern` fits in `limits`.
    pub fn check(
        &self,
        source: u8,
        pattern: Option<&str>,
        limits: SourceLimits,
    ) -> Result<(), AutoRegError> {
        if self.by_source.get(&source).copied().unwrap_or(0) >= limits.per_proxy {
            return Err(AutoRegError::TooManyFromProxy {
                server_id: source,
                max: limits.per_proxy,
            });
        }
        if let Some(pattern) = pattern
            && self.by_pattern.get(pattern).copied().unwrap_or(0) >= limits.per_pattern
        {
            return Err(AutoRegError::TooManyLikeName {
                pattern: pattern.to_owned(),
                max: limits.per_pattern,
            });
        }
        Ok(())
    }

    /// Counts one pending request.
    pub fn add(&mut self, source: u8, pattern: Option<&str>) {
        *self.by_source.entry(source).or_default() += 1;
        if let Some(pattern) = pattern {
            *self.by_pattern.entry(pattern.to_owned()).or_default() += 1;
        }
    }

    /// Stops counting one pending request.
    pub fn remove(&mut self, source: u8, pattern: Option<&str>) {
        if let Entry::Occupied(mut count) = self.by_source.entry(source) {
            *count.get_mut() -= 1;
            if *count.get() == 0 {
                count.remove();
            }
        }
        if let Some(pattern) = pattern
            && let Some(count) = self.by_pattern.get_mut(pattern)
        {
            *count -= 1;
            if *count == 0 {
                self.by_pattern.remove(pattern);
            }
        }
    }

    /// The requests counted for `source`.
    pub fn from_source(&self, source: u8) -> usize {
        self.by_source.get(&source).copied().unwrap_or(0)
    }
}

/// Names the backend refused (puid ≤ 0), each remembered for `ttl` from its refusal, at most
/// `capacity` of them (the oldest refusal is forgotten first). A name is not remembered again
/// while it is remembered: its time runs from the first refusal.
#[derive(Debug)]
pub struct RefusedNames {
    ttl: Duration,
    capacity: usize,
    until: HashMap<Arc<str>, Instant>,
    /// The names in the order they were refused, which is also the order they expire in.
    order: VecDeque<(Instant, Arc<str>)>,
}

impl RefusedNames {
    /// An empty memory; `ttl` zero remembers nothing.
    pub fn new(ttl: Duration, capacity: usize) -> Self {
        Self {
            ttl,
            capacity,
            until: HashMap::new(),
            order: VecDeque::new(),
        }
    }

    fn expire(&mut self, now: Instant) {
        while let Some((until, _)) = self.order.front()
            && *until <= now
        {
            if let Some((_, name)) = self.order.pop_front() {
                self.until.remove(&name);
            }
        }
    }

    /// Remembers that the backend refused `name` at `now`.
    pub fn remember(&mut self, name: &str, now: Instant) {
        if self.ttl.is_zero() || self.capacity == 0 {
            return;
        }
        self.expire(now);
        if self.until.contains_key(name) {
            return;
        }
        while self.order.len() >= self.capacity {
            if let Some((_, oldest)) = self.order.pop_front() {
                self.until.remove(&oldest);
            }
        }
        let until = later(now, self.ttl);
        let name: Arc<str> = Arc::from(name);
        self.until.insert(Arc::clone(&name), until);
        self.order.push_back((until, name));
    }

    /// How long `name` is still remembered as refused, if it is.
    pub fn remembered(&mut self, name: &str, now: Instant) -> Option<Duration> {
        self.expire(now);
        self.until.get(name).map(|until| *until - now)
    }

    /// How many names are remembered.
    pub fn len(&self) -> usize {
        self.order.len()
    }

    /// Whether no name is remembered.
    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }
}

/// Lets one log line through per period and counts the ones held back, for refusals that a
/// flood would otherwise turn into a flood of warnings.
#[derive(Debug)]
pub struct Throttle {
    every: Duration,
    /// When the last line went through, and how many were held back since.
    state: Mutex<(Option<Instant>, u64)>,
}

impl Throttle {
    /// One line per `every`.
    pub fn new(every: Duration) -> Self {
        Self {
            every,
            state: Mutex::new((None, 0)),
        }
    }

    /// `Some(held back since the last line)` when a line may go through at `now`.
    pub fn pass(&self, now: Instant) -> Option<u64> {
        // Two plain fields: valid after any panic.
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        match state.0 {
            Some(last) if now.saturating_duration_since(last) < self.every => {
                state.1 += 1;
                None
            }
            _ => {
                let held = state.1;
                *state = (Some(now), 0);
                Some(held)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_source_is_the_server_id_of_either_layout() {
        // Bitcoin-like: the server ID in the top byte.
        assert_eq!(source_of(3 << 24 | 128), 3);
        assert_eq!(source_of(255 << 24 | 0x00ff_ffff), 255);
        // Ethereum: the server ID in bits 16..23, the top byte 0.
        assert_eq!(source_of(7 << 16 | 0x1234), 7);
        // No session ID.
        assert_eq!(source_of(0), 0);
    }

    #[test]
    fn patterns_group_generated_names_only() {
        assert_eq!(name_pattern("test1").as_deref(), Some("test"));
        assert_eq!(name_pattern("test999").as_deref(), Some("test"));
        assert_eq!(name_pattern("Test_0042").as_deref(), Some("test_"));
        assert_eq!(name_pattern("junkxk2j9").as_deref(), Some("junkx"));
        assert_eq!(name_pattern("alice").as_deref(), Some("alice"));
        assert_ne!(name_pattern("alice"), name_pattern("bob"));
        assert_eq!(name_pattern("13812345678"), None);
        assert_eq!(name_pattern("ÄÖÜäöü1").as_deref(), Some("äöüäö"));
    }

    #[test]
    fn the_tally_bounds_each_source_and_pattern() {
        let limits = SourceLimits {
            per_proxy: 2,
            per_pattern: 3,
        };
        let mut tally = Tally::default();
        for (source, name) in [(1, "junk1"), (1, "junk2")] {
            let pattern = name_pattern(name);
            tally
                .check(source, pattern.as_deref(), limits)
                .expect("fits");
            tally.add(source, pattern.as_deref());
        }
        assert!(matches!(
            tally.check(1, Some("other"), limits),
            Err(AutoRegError::TooManyFromProxy {
                server_id: 1,
                max: 2
            })
        ));
        // Another proxy may still ask, but not for a third name of the same pattern… yet.
        tally.check(2, Some("junk"), limits).expect("fits");
        tally.add(2, Some("junk"));
        assert!(matches!(
            tally.check(3, Some("junk"), limits),
            Err(AutoRegError::TooManyLikeName { .. })
        ));
        tally.check(3, None, limits).expect("no pattern");
        tally.remove(1, Some("junk"));
        tally.check(3, Some("junk"), limits).expect("room again");
        tally.remove(1, Some("junk"));
        tally.remove(2, Some("junk"));
        assert!(tally.by_source.is_empty() && tally.by_pattern.is_empty());
    }

    #[test]
    fn refused_names_expire_and_are_bounded() {
        let now = Instant::now();
        let mut refused = RefusedNames::new(Duration::from_secs(10), 2);
        refused.remember("a", now);
        refused.remember("b", now + Duration::from_secs(1));
        assert_eq!(refused.remembered("a", now), Some(Duration::from_secs(10)));
        // Remembering again does not extend.
        refused.remember("a", now + Duration::from_secs(5));
        assert_eq!(
            refused.remembered("a", now + Duration::from_secs(5)),
            Some(Duration::from_secs(5))
        );
        // A third name pushes out the oldest.
        refused.remember("c", now + Duration::from_secs(2));
        assert_eq!(refused.len(), 2);
        assert_eq!(refused.remembered("a", now + Duration::from_secs(2)), None);
        assert!(
            refused
                .remembered("b", now + Duration::from_secs(2))
                .is_some()
        );
        // Expired.
        assert_eq!(refused.remembered("b", now + Duration::from_secs(11)), None);
        assert!(
            refused
                .remembered("c", now + Duration::from_secs(11))
                .is_some()
        );
        assert_eq!(refused.remembered("c", now + Duration::from_secs(12)), None);
        assert!(refused.is_empty());
        // A TTL too long for the clock does not overflow.
        let mut long = RefusedNames::new(Duration::MAX, 10);
        long.remember("a", now);
        assert!(long.remembered("a", now).is_some());
        // A zero TTL remembers nothing.
        let mut off = RefusedNames::new(Duration::ZERO, 10);
        off.remember("a", now);
        assert_eq!(off.remembered("a", now), None);
    }

    #[test]
    fn the_throttle_lets_one_line_through_per_period() {
        let now = Instant::now();
        let throttle = Throttle::new(Duration::from_secs(10));
        assert_eq!(throttle.pass(now), Some(0));
        assert_eq!(throttle.pass(now + Duration::from_secs(1)), None);
        assert_eq!(throttle.pass(now + Duration::from_secs(2)), None);
        assert_eq!(throttle.pass(now + Duration::from_secs(10)), Some(2));
    }
}
