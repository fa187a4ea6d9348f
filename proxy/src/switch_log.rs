//! The log of completed switches: one line per switched session at info (from, to, and the
//! latency from the cache learning the new coin to its first job at the miner) while switches
//! are few, and a summary once a second when they are many, so that a switch of 10,000 users
//! is a handful of info lines rather than 10,000.
//!
//! A session's line is logged at info while fewer than [`INFO_LINES_PER_SECOND`] such lines
//! were logged in the last second, at debug beyond that. Each second in which some lines went
//! to debug ends with one info line per coin pair summing up every switch that completed in it
//! (the ones logged one by one too): `switched 9000 sessions btc→bch in the last second,
//! latency p50 … ms, p99 … ms, max … ms`.

#![forbid(unsafe_code)]

use std::{
    collections::VecDeque,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use tokio_util::sync::CancellationToken;
use tracing::info;

/// The most per-session switch lines logged at info in any one second.
pub const INFO_LINES_PER_SECOND: usize = 20;

/// How often a summary may be written.
const SUMMARY_PERIOD: Duration = Duration::from_secs(1);

/// The most latencies kept per coin pair and period for the percentiles (the count and the
/// maximum take every switch).
const MAX_SAMPLES: usize = 100_000;

/// Switches from one coin to another since the last summary.
#[derive(Debug)]
struct Pair {
    from: String,
    to: String,
    count: u64,
    /// Latencies in µs (at most [`MAX_SAMPLES`]).
    samples: Vec<u64>,
    max_us: u64,
}

#[derive(Debug, Default)]
struct State {
    /// When the last (up to [`INFO_LINES_PER_SECOND`]) lines at info were logged.
    logged: VecDeque<Instant>,
    /// Lines sent to debug since the last summary.
    demoted: u64,
    /// Lines logged at info since the last summary.
    shown: u64,
    pairs: Vec<Pair>,
}

/// One coin pair's summary of a period; see the module doc.
#[derive(Debug, Clone, PartialEq)]
pub struct Summary {
    /// The old coin.
    pub from: String,
    /// The new coin.
    pub to: String,
    /// Sessions switched.
    pub sessions: u64,
    /// Median latency, ms.
    pub p50_ms: f64,
    /// 99th percentile, ms.
    pub p99_ms: f64,
    /// Largest, ms.
    pub max_ms: f64,
}

/// The process's switch log; see the module doc.
#[derive(Debug, Default)]
pub struct SwitchLog {
    state: Mutex<State>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The `q` quantile of sorted µs, in ms.
fn quantile_ms(sorted: &[u64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() - 1) as f64 * q).round() as usize;
    sorted[i.min(sorted.len() - 1)] as f64 / 1e3
}

impl SwitchLog {
    /// A log with nothing recorded.
    pub fn new() -> Arc<Self> {
        Arc::default()
    }

    /// A session switched from `from` to `to` in `latency`, at `now`: whether its line goes to
    /// info (else debug).
    pub fn record(&self, from: &str, to: &str, latency: Duration, now: Instant) -> bool {
        let mut state = lock(&self.state);
        let shown = state.logged.len() < INFO_LINES_PER_SECOND
            || state
                .logged
                .front()
                .is_none_or(|first| now.saturating_duration_since(*first) >= SUMMARY_PERIOD);
        if shown {
            state.logged.push_back(now);
            if state.logged.len() > INFO_LINES_PER_SECOND {
                state.logged.pop_front();
            }
            state.shown += 1;
        } else {
            state.demoted += 1;
        }
        let us = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        let i = match state
            .pairs
            .iter()
            .position(|p| p.from == from && p.to == to)
        {
            Some(i) => i,
            None => {
                state.pairs.push(Pair {
                    from: from.to_string(),
                    to: to.to_string(),
                    count: 0,
                    samples: Vec::new(),
                    max_us: 0,
                });
                state.pairs.len() - 1
            }
        };
        let pair = &mut state.pairs[i];
        pair.count += 1;
        pair.max_us = pair.max_us.max(us);
        if pair.samples.len() < MAX_SAMPLES {
            pair.samples.push(us);
        }
        shown
    }

    /// The switches recorded since the last call, summed up per coin pair when some of their
    /// lines went to debug (none otherwise: each was logged); and how many were logged one by
    /// one. Starts a new period.
    pub fn take_summaries(&self) -> (Vec<Summary>, u64) {
        let mut state = lock(&self.state);
        let demoted = std::mem::take(&mut state.demoted);
        let shown = std::mem::take(&mut state.shown);
        let pairs = std::mem::take(&mut state.pairs);
        drop(state);
        if demoted == 0 {
            return (Vec::new(), shown);
        }
        let summaries = pairs
            .into_iter()
            .map(|mut pair| {
                pair.samples.sort_unstable();
                Summary {
                    p50_ms: quantile_ms(&pair.samples, 0.5),
                    p99_ms: quantile_ms(&pair.samples, 0.99),
                    max_ms: pair.max_us as f64 / 1e3,
                    sessions: pair.count,
                    from: pair.from,
                    to: pair.to,
                }
            })
            .collect();
        (summaries, shown)
    }

    /// Writes the summaries once a second until `shutdown`.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(SUMMARY_PERIOD);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            let (summaries, shown) = self.take_summaries();
            for s in summaries {
                info!(
                    from = %s.from,
                    to = %s.to,
                    sessions = s.sessions,
                    logged_one_by_one = shown,
                    p50_ms = s.p50_ms,
                    p99_ms = s.p99_ms,
                    max_ms = s.max_ms,
                    "switched {} sessions {}→{} in the last second, latency p50 {:.1} ms, \
                     p99 {:.1} ms, max {:.1} ms",
                    s.sessions,
                    s.from,
                    s.to,
                    s.p50_ms,
                    s.p99_ms,
                    s.max_ms
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mass_switch_logs_a_bounded_number_of_lines_and_a_summary() {
        let log = SwitchLog::new();
        let t0 = Instant::now();
        let shown = (0..10_000u64)
            .filter(|i| {
                log.record(
                    "btc",
                    "bch",
                    Duration::from_millis(1 + i % 100),
                    t0 + Duration::from_micros(*i),
                )
            })
            .count();
        assert_eq!(shown, INFO_LINES_PER_SECOND);
        let (summaries, one_by_one) = log.take_summaries();
        assert_eq!(one_by_one, INFO_LINES_PER_SECOND as u64);
        assert_eq!(summaries.len(), 1);
        let s = &summaries[0];
        assert_eq!(
            (s.from.as_str(), s.to.as_str(), s.sessions),
            ("btc", "bch", 10_000)
        );
        assert_eq!(s.max_ms, 100.0);
        assert!((49.0..=52.0).contains(&s.p50_ms), "{s:?}");
        // A second later, lines go to info again; a period without demoted lines has no
        // summary.
        assert!(log.record(
            "bch",
            "btc",
            Duration::from_millis(3),
            t0 + SUMMARY_PERIOD * 2
        ));
        assert_eq!(log.take_summaries(), (Vec::new(), 1));
    }
}
