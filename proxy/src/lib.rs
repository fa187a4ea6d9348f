//! The Switchyard Stratum proxy (SPEC §1 to §4): holds miners' TCP connections, answers
//! lookups from a local cache fed by the control plane's WatchSwitches stream, and moves each
//! miner to its user's coin's sserver without dropping it.
//!
//! Built so far (the proxy itself is the subject of its own issue):
//! - [`framing`]: whole lines with a bounded length.
//! - [`session_id`]: session IDs (extranonce1) under a server ID.

#![warn(clippy::unwrap_used)]

pub mod framing;
pub mod session_id;
