//! Support code for Switchyard's integration and end-to-end tests: real servers on loopback,
//! started on free ports and private data directories, and killed on drop.
//!
//! - [`zookeeper`]: a real ZooKeeper server from Debian's `zookeeper` package.
//! - [`bench`](mod@bench): measurement helpers shared by the benchmarks.
//! - [`control`]: the control service, in-process or as its real binary.
//! - [`wait`]: waiting for conditions with a deadline.
//! - [`relay`]: a TCP relay a test can cut, to cut a client off a real server.
//! - [`userlist`]: a pool backend's user-list API with scripted answers.
//! - [`sserver`]: a simulated switcher-aware sserver (one coin's pool Stratum server).
//! - [`scripted`]: an sserver whose every answer the test scripts, to drive interleavings.
//! - [`proxy`]: the Stratum proxy, in-process or as its real binary.
//! - [`miner`]: a simulated miner that checks every line it receives.
//! - [`prometheus`]: a real Prometheus from Debian's `prometheus` package, its HTTP API, and a
//!   small PromQL reader for checking what dashboards and rules query.

pub mod bench;
pub mod control;
pub mod miner;
pub mod pki;
pub mod prometheus;
pub mod proxy;
pub mod relay;
pub mod scripted;
pub mod session_harness;
pub mod sserver;
pub mod userlist;
pub mod wait;
pub mod zookeeper;
