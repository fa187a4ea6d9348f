//! The Switchyard Stratum proxy (SPEC §1 to §4): holds miners' TCP connections, answers
//! lookups from a local cache fed by the control plane's WatchSwitches stream, and moves each
//! miner to its user's coin's sserver without dropping it.
//!
//! - [`framing`]: whole lines with a bounded length.
//! - [`session_id`]: session IDs (extranonce1) under a server ID.
//! - [`upstream`]: the sserver contract (SPEC §2): opening an upstream for a session.
//! - [`cache`]: the local user→coin cache and its per-user index of live sessions.
//! - [`control`]: the proxy's gRPC client of the control plane: the WatchSwitches feed of the
//!   cache, server-ID leases, auto-registration requests.
//! - [`handshake`]: the miner side before the upstream (SPEC §1): dialects, answers, errors,
//!   worker names.
//! - [`message`]: what the relay reads of a Stratum line (id, method, job), cheaply.
//! - [`relay`]: the relay of a logged-in session as a state machine over plain data: switches,
//!   reconnects, drains, job routing, who owes the miner which answer.
//! - [`session`]: one task per miner session: handshake, lookup, then the relay's sockets.
//! - [`server`]: the listener, limits, lease and shutdown: the proxy as a whole.
//! - [`metrics`]: Prometheus metrics (OpenMetrics text).
//! - [`switch_log`]: the log of completed switches, summed up when they are many.
//! - [`config`]: the Go stratumSwitcher's JSON config plus Switchyard's settings.
//! - [`upgrade`]: the hot upgrade (SIGUSR2, SPEC §9): what a process hands its successor.
//! - [`inherit`]: the descriptors a hot upgrade hands over, turned back into sockets: the one
//!   module with `unsafe` (every other module forbids it).

#![warn(clippy::unwrap_used)]

pub mod cache;
pub mod config;
pub mod control;
pub mod framing;
pub mod handshake;
pub mod inherit;
pub mod lookup;
pub mod message;
pub mod metrics;
pub mod relay;
pub mod server;
pub mod session;
pub mod session_id;
pub mod switch_log;
pub mod tls_miners;
pub mod upgrade;
pub mod upstream;
