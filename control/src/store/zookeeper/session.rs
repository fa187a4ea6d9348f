//! The store's second ZooKeeper session, on the `zookeeper-client` crate, for what
//! zookeeper-async cannot do: `multi` transactions (batched creates), `multiRead` (batched
//! reads) and persistent recursive watches (the feed). ZooKeeper 3.6 or later serves them.
//!
//! zookeeper-client ends a session for good when it expires; [`BatchSession::client`] then opens
//! a new one. Every replica also keeps one ephemeral node of its own on this session, its
//! *barrier* node (`ZKSwitchyardDir/barriers/<random>`): every `multi` transaction of the store
//! (batched creates, held-back switches) writes it too, so that the transaction's response
//! carries its zxid (ZooKeeper 3.8 answers a create inside a `multi` with an empty stat,
//! ZOOKEEPER-4026). The feed writes nothing: it orders changes by the zxids its reads answer
//! (`feed.rs`).

use std::{future::Future, time::Duration};

use tokio::sync::Mutex;
use tracing::info;
use zookeeper_client as zk;

use crate::store::StoreError;

/// Why a request on the batch session failed.
pub(super) fn zk_error(op: &str, path: &str, e: zk::Error) -> StoreError {
    StoreError::Unavailable(format!("ZooKeeper {op} {path}: {e}"))
}

/// Runs one request with a timeout, which counts as a lost connection.
pub(super) async fn timed<T>(
    timeout: Duration,
    request: impl Future<Output = Result<T, zk::Error>>,
) -> Result<T, zk::Error> {
    tokio::time::timeout(timeout, request)
        .await
        .unwrap_or(Err(zk::Error::ConnectionLoss))
}

/// Options of every node the store creates: persistent, open to all (as the Go tools create
/// them).
pub(super) fn persistent() -> zk::CreateOptions<'static> {
    zk::CreateMode::Persistent.with_acls(zk::Acls::anyone_all())
}

/// The batch session: a zookeeper-client session, replaced by a new one when it ends.
pub(super) struct BatchSession {
    connect_string: String,
    session_timeout: Duration,
    request_timeout: Duration,
    barrier_path: String,
    current: Mutex<Option<zk::Client>>,
}

impl std::fmt::Debug for BatchSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BatchSession")
            .field("connect_string", &self.connect_string)
            .field("barrier_path", &self.barrier_path)
            .finish_non_exhaustive()
    }
}

impl BatchSession {
    /// Opens the session and creates the barrier node.
    pub(super) async fn connect(
        connect_string: String,
        session_timeout: Duration,
        request_timeout: Duration,
        barrier_path: String,
    ) -> Result<Self, StoreError> {
        let session = Self {
            connect_string,
            session_timeout,
            request_timeout,
            barrier_path,
            current: Mutex::new(None),
        };
        let client = session.client().await?;
        session.create_barrier(&client).await?;
        Ok(session)
    }

    /// This replica's barrier node.
    pub(super) fn barrier_path(&self) -> &str {
        &self.barrier_path
    }

    /// The client of the live session: the current one, or a new session when it has ended
    /// (expired, closed) or was never opened.
    pub(super) async fn client(&self) -> Result<zk::Client, StoreError> {
        let mut current = self.current.lock().await;
        if let Some(client) = current.as_ref()
            && !client.state().is_terminated()
        {
            return Ok(client.clone());
        }
        let connecting = zk::Client::connector()
            .with_session_timeout(self.session_timeout)
            .connect(&self.connect_string);
        // Connecting retries until about the session timeout; bound it a little above.
        let limit = self.session_timeout + self.request_timeout;
        let client = match tokio::time::timeout(limit, connecting).await {
            Ok(Ok(client)) => client,
            Ok(Err(e)) => return Err(zk_error("connect", &self.connect_string, e)),
            Err(_) => {
                return Err(StoreError::Unavailable(format!(
                    "ZooKeeper connect {}: no session within {limit:?}",
                    self.connect_string
                )));
            }
        };
        info!(
            brokers = %self.connect_string,
            session = %client.session_id(),
            "opened the batch ZooKeeper session"
        );
        *current = Some(client.clone());
        Ok(client)
    }

    /// Creates the barrier node (an ephemeral of this session) unless it exists.
    pub(super) async fn create_barrier(&self, client: &zk::Client) -> Result<(), StoreError> {
        let options = zk::CreateMode::Ephemeral.with_acls(zk::Acls::anyone_all());
        match timed(
            self.request_timeout,
            client.create(&self.barrier_path, b"", &options),
        )
        .await
        {
            Ok(_) | Err(zk::Error::NodeExists) => Ok(()),
            Err(e) => Err(zk_error("create", &self.barrier_path, e)),
        }
    }
}
