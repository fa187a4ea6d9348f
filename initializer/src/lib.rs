//! User-list ingestion (SPEC §7): the per-coin pullers of the pool backend's user lists, the
//! user-list HTTP API for sservers, and auto-registration of unknown users.
//!
//! The control service runs this code in-process; the `switchyard-init` binary runs it against
//! a remote control service over gRPC. Nothing is implemented here yet: ingestion is the
//! subject of its own issue, and until it lands the crate exports nothing.
