//! The control service's ZooKeeper sessions: which client does what, and why there are two.
//!
//! - **The main session** ([`ZkSession`], the design card's `zookeeper-async` client): single
//!   requests. Server-ID leases (their ephemeral nodes live and die with it), auto-registration
//!   (the pending-request directory shared with the Go proxies, and its claims), the sub-pool
//!   coinbase API, and the store's single writes (switches, markers, cancelled held-back
//!   switches). It is opened first and handed to each of them as this handle, not through the
//!   store.
//! - **The batch session** (`zookeeper-client`, in `store/zookeeper/session.rs`, owned by the
//!   ZooKeeper store): what zookeeper-async cannot do: `multi` transactions (batched creates,
//!   held-back switches, their conditional apply), `multiRead` (batched reads) and persistent
//!   recursive watches (the store's feed), which need ZooKeeper 3.6 or later.
//!
//! One client could carry everything; two remain because the design card chose zookeeper-async,
//! on which the leases, auto-registration and the sub-pool API are written, and zookeeper-client
//! is taken only for what zookeeper-async lacks. They also fail apart: zookeeper-client ends an
//! expired session for good and the store opens a new one (its feed then re-reads everything),
//! while the leases' ephemeral nodes stay on the main session. The health service reports each
//! session on its own (`switchyard.zookeeper.main`, `switchyard.zookeeper.batch`), beside the
//! whole store.

use std::{sync::Arc, time::Duration};

use tokio::sync::watch;
use tracing::info;
use zookeeper_async::{WatchedEvent, ZkState, ZooKeeper};

use crate::store::{StoreError, zookeeper::timed};

/// Wait between connection attempts.
const RETRY_DELAY: Duration = Duration::from_millis(500);

/// The main ZooKeeper session; see the module doc. Cheap to clone.
#[derive(Clone)]
pub struct ZkSession {
    zk: Arc<ZooKeeper>,
    up: watch::Receiver<bool>,
    brokers: String,
}

impl std::fmt::Debug for ZkSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ZkSession")
            .field("brokers", &self.brokers)
            .field("up", &*self.up.borrow())
            .finish_non_exhaustive()
    }
}

impl ZkSession {
    /// Connects to the ensemble (`host:port` each) and waits until the session answers.
    pub async fn connect(
        brokers: &[String],
        session_timeout: Duration,
    ) -> Result<Self, StoreError> {
        // The main session sets no watches: the store's feed watches on the batch session.
        let watcher = |_: WatchedEvent| {};
        let connect_string = brokers.join(",");
        let zk = ZooKeeper::connect_with_retry_time(
            &connect_string,
            session_timeout,
            watcher,
            RETRY_DELAY,
        )
        .await
        .map_err(|e| {
            StoreError::Unavailable(format!("ZooKeeper connect {connect_string}: {e:?}"))
        })?;
        let (tx, up) = watch::channel(false);
        let tx = Arc::new(tx);
        {
            let tx = Arc::clone(&tx);
            zk.add_listener(move |state| {
                let up = matches!(state, ZkState::Connected | ZkState::ConnectedReadOnly);
                info!(?state, "main ZooKeeper session state");
                tx.send_replace(up);
            });
        }
        // The first connection may have completed before the listener was in place: probe.
        let deadline = tokio::time::Instant::now() + session_timeout.max(Duration::from_secs(10));
        loop {
            match timed(Duration::from_secs(2), zk.exists("/", false)).await {
                Ok(_) => break,
                Err(e) if tokio::time::Instant::now() >= deadline => {
                    return Err(StoreError::Unavailable(format!(
                        "cannot reach ZooKeeper at {connect_string}: {e}"
                    )));
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
        tx.send_replace(true);
        Ok(Self {
            zk: Arc::new(zk),
            up,
            brokers: connect_string,
        })
    }

    /// The client, for single requests.
    pub fn client(&self) -> Arc<ZooKeeper> {
        Arc::clone(&self.zk)
    }

    /// Whether the session is connected now.
    pub fn up(&self) -> watch::Receiver<bool> {
        self.up.clone()
    }

    /// The ensemble, as a connect string.
    pub fn brokers(&self) -> &str {
        &self.brokers
    }
}
