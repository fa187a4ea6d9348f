//! The Switchyard Stratum proxy (SPEC §1 to §4): holds miners' TCP connections, answers
//! lookups from a local cache fed by the control plane's WatchSwitches stream, and moves each
//! miner to its user's coin's sserver without dropping it.
//!
//! Nothing is implemented here yet: the data plane is the subject of its own issue, and until
//! it lands the crate exports nothing.
