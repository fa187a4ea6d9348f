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

#![warn(clippy::unwrap_used)]

pub mod cache;
pub mod control;
pub mod framing;
pub mod session_id;
pub mod upstream;
