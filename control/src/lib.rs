//! The Switchyard control plane: it owns the user→coin state and streams every change to the
//! Stratum proxies.
//!
//! - [`store`]: the durable state behind the [`store::UserCoinStore`] trait (embedded redb; the
//!   ZooKeeper layout of SPEC §5 for fleets).
//! - [`index`]: the in-memory index with revisions, fanned out to watchers.
//! - [`core`]: the switching core every API adapter calls; [`validate`] checks outside input;
//!   [`held_back`]: when each switch held back by the safety period is due.
//! - [`leases`]: proxy server-ID leases.
//! - [`ingest`]: user-list ingestion (the initializer's pullers) into the core.
//! - [`grpc`]: the `switchyard.v1` services as thin adapters over the core.
//! - [`http`]: the HTTP switch API of SPEC §6 for pool backends, a thin adapter over the core.
//! - [`autoreg`]: auto-registration of unknown users (SPEC §7, `EnableUserAutoReg`): one
//!   pending request per name across replicas, POSTed to the pool backend once, the user then
//!   created with `DefaultCoin` through the core.
//! - [`cron`]: the scheduled user→coin pull of SPEC §6 (`EnableCronJob`), applied through the
//!   core.
//! - [`subpool`]: the sub-pool coinbase API of SPEC §6, a request to a coin's job maker and its
//!   answer through ZooKeeper (`ZKSubPoolUpdateBaseDir`), served by [`http`]'s router.
//! - [`zk_session`]: the main ZooKeeper session, shared by the leases, auto-registration and
//!   the store, and why a second one (the store's batch session) exists beside it.
//! - [`config`] and [`server`]: the configuration file and the assembly of the service;
//!   [`limits`]: the bounds of its servers.
//! - [`metrics`]: the service's Prometheus metrics and their endpoint (`MetricsListenAddr`);
//!   [`own_writes`] tells this replica's changes on the store's stream from everyone else's.

#![warn(clippy::unwrap_used)]

pub mod autoreg;
pub mod config;
pub mod core;
pub mod cron;
pub mod grpc;
pub mod held_back;
pub mod http;
pub mod index;
pub mod ingest;
pub mod leases;
pub mod limits;
pub mod metrics;
pub mod own_writes;
pub mod server;
pub mod store;
pub mod subpool;
pub mod validate;
pub mod zk_session;

pub use server::{ControlError, ControlPlane};
