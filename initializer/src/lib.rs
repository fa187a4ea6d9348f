//! User-list ingestion (SPEC §7): the per-coin pullers of the pool backend's user lists
//! ([`puller`]), the list of users seen that sservers read ([`listed`], served by [`api`]), and
//! the [`sink`] the pullers write to; [`config`] is the `switchyard-init` configuration.
//!
//! The control service runs the pullers in-process, with a sink over its switching core; the
//! `switchyard-init` binary runs the same pullers against a remote control service, with a sink
//! that calls `SwitcherAdmin.IngestUserList` over gRPC.

#![warn(clippy::unwrap_used)]

pub mod api;
pub mod config;
pub mod http_server;
pub mod listed;
pub mod puller;
pub mod sink;
