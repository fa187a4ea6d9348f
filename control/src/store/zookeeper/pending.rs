//! The ZooKeeper store's own records of a deployment: held-back switches (`pending/<user>`),
//! first-seen times (`seen/<coin>/<user>`), under [`ZkSettings::deployment_dir`].
//!
//! - A held-back switch is a JSON node `{"Coin","ApplyAt","After","WatchDir"}`. `After` is the
//!   user node's modification zxid when the switch was held back (0: no node), read fresh
//!   (`sync`, then a `multiRead` of the user nodes) in the same batch. `WatchDir` is the watch
//!   directory the record was written for: a record naming another one (or none: written by an
//!   earlier version, or by another deployment sharing the directory) is never read as this
//!   deployment's, so never applied nor removed.
//! - Held-back switches are created in `multi` transactions of up to 1,000 nodes; a user who
//!   already has one gets a `setData` instead.
//! - Applying a due switch is one `multi`: delete the pending node at the version read, set the
//!   user node at the version whose zxid is `After` (or create it when `After` is 0), and set
//!   this replica's barrier node (whose new zxid dates the change). Any change in between fails
//!   the transaction; the switch is then read again: a user changed since `After` drops it
//!   (`Superseded`), a pending node changed or gone means someone else handled it (`Gone`).
//! - First-seen times are nodes whose value is the Unix second; recording one creates it only
//!   when absent (the earlier time stays), in `multi` transactions.
//!
//! [`ZkSettings::deployment_dir`]: super::ZkSettings::deployment_dir

use futures::{StreamExt, stream};
use tracing::warn;
use zookeeper_async::ZkError;
use zookeeper_client as zk;

use super::{
    MAX_IN_FLIGHT, MULTI_ATTEMPTS, MULTI_OPS, MULTIS_IN_FLIGHT, ZooKeeperStore, create_path,
    node_path, parse_value,
    session::{self, persistent},
    timed, zk_error,
};
use crate::store::{
    HoldSwitch, PendingOutcome, PendingSwitch, Record, RecordKey, Revision, StoreError,
};

/// A held-back switch's node.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct PendingNode {
    #[serde(rename = "Coin")]
    coin: String,
    #[serde(rename = "ApplyAt")]
    apply_at: u64,
    /// Absent in records of earlier versions, which are therefore never taken.
    #[serde(rename = "After", default)]
    after: Option<Revision>,
    #[serde(rename = "WatchDir", default)]
    watch_dir: Option<String>,
}

/// Attempts of one apply before it reports the store unavailable (each failed attempt means
/// a concurrent change, which the next attempt sees).
const APPLY_ATTEMPTS: usize = 4;

impl ZooKeeperStore {
    fn pending_node(&self, p: &PendingSwitch) -> Result<Vec<u8>, StoreError> {
        serde_json::to_vec(&PendingNode {
            coin: p.coin.clone(),
            apply_at: p.apply_at,
            after: Some(p.after),
            watch_dir: Some(self.settings.switcher_dir.clone()),
        })
        .map_err(|e| StoreError::Corrupt(e.to_string()))
    }

    /// A pending switch of this deployment and its node's version; `None` when absent, not
    /// this deployment's, or unreadable (logged).
    pub(super) async fn read_pending(
        &self,
        user: &str,
    ) -> Result<Option<(PendingSwitch, i32)>, StoreError> {
        let path = self.pending_path(user);
        match timed(
            self.settings.request_timeout,
            self.zk.get_data(&path, false),
        )
        .await
        {
            Ok((data, stat)) => Ok(self
                .parse_pending(&path, user, &data)
                .map(|p| (p, stat.version))),
            Err(ZkError::NoNode) => Ok(None),
            Err(e) => Err(zk_error("get", &path, e)),
        }
    }

    fn parse_pending(&self, path: &str, user: &str, data: &[u8]) -> Option<PendingSwitch> {
        match serde_json::from_slice::<PendingNode>(data) {
            Ok(PendingNode {
                coin,
                apply_at,
                after: Some(after),
                watch_dir: Some(watch_dir),
            }) if parse_value(coin.as_bytes()).is_some()
                && watch_dir == self.settings.switcher_dir =>
            {
                Some(PendingSwitch {
                    user: user.to_owned(),
                    coin,
                    apply_at,
                    after,
                })
            }
            Ok(node) => {
                warn!(
                    path,
                    watch_dir = ?node.watch_dir,
                    own_watch_dir = %self.settings.switcher_dir,
                    "ignoring a pending switch that was not written for this deployment's watch directory"
                );
                None
            }
            Err(_) => {
                warn!(
                    path,
                    "ignoring a pending switch node that is not the expected JSON"
                );
                None
            }
        }
    }

    /// The users' node modification zxids (0: no node), after a `sync`: as fresh as
    /// ZooKeeper can give.
    async fn fresh_revisions(
        &self,
        client: &zk::Client,
        users: &[String],
    ) -> Result<Vec<Revision>, StoreError> {
        let timeout = self.settings.request_timeout;
        let dir = node_path(&self.settings.switcher_dir);
        session::timed(timeout, client.sync(dir))
            .await
            .map_err(|e| session::zk_error("sync", dir, e))?;
        let mut out = Vec::with_capacity(users.len());
        for chunk in users.chunks(MULTI_OPS) {
            let mut reader = client.new_multi_reader();
            for user in chunk {
                let path = format!("{}{user}", self.settings.switcher_dir);
                reader
                    .add_get_data(&path)
                    .map_err(|e| session::zk_error("read", &path, e))?;
            }
            let results = session::timed(timeout, reader.commit())
                .await
                .map_err(|e| session::zk_error("multiRead", dir, e))?;
            if results.len() != chunk.len() {
                return Err(StoreError::Unavailable(format!(
                    "ZooKeeper multiRead answered {} reads of {}",
                    results.len(),
                    chunk.len()
                )));
            }
            for result in results {
                out.push(match result {
                    zk::MultiReadResult::Data { stat, .. } => stat.mzxid as Revision,
                    zk::MultiReadResult::Error {
                        err: zk::Error::NoNode,
                    } => 0,
                    other => {
                        return Err(StoreError::Unavailable(format!(
                            "ZooKeeper read of a user node: {other:?}"
                        )));
                    }
                });
            }
        }
        Ok(out)
    }

    /// [`crate::store::UserCoinStore::put_pending`] on ZooKeeper; see the module doc.
    pub(super) async fn put_pending_batch(
        &self,
        switches: Vec<HoldSwitch>,
    ) -> Vec<Result<PendingSwitch, StoreError>> {
        let count = switches.len();
        if count == 0 {
            return Vec::new();
        }
        let client = match self.batch.client().await {
            Ok(c) => c,
            Err(e) => return vec![Err(e); count],
        };
        let users: Vec<String> = switches.iter().map(|s| s.user.clone()).collect();
        let revisions = match self.fresh_revisions(&client, &users).await {
            Ok(r) => r,
            Err(e) => return vec![Err(e); count],
        };
        let pending: Vec<PendingSwitch> = switches
            .into_iter()
            .zip(revisions)
            .map(|(s, after)| PendingSwitch {
                user: s.user,
                coin: s.coin,
                apply_at: s.apply_at,
                after,
            })
            .collect();
        let mut nodes = Vec::with_capacity(count);
        let mut results: Vec<Option<Result<PendingSwitch, StoreError>>> =
            (0..count).map(|_| None).collect();
        for (at, p) in pending.iter().enumerate() {
            match self.pending_node(p) {
                Ok(data) => nodes.push((at, self.pending_path(&p.user), data)),
                Err(e) => results[at] = Some(Err(e)),
            }
        }
        let created = self.create_nodes(&client, nodes).await;
        // Users with a pending switch already: set their node instead.
        let existing: Vec<(usize, String, Vec<u8>)> = created
            .into_iter()
            .filter_map(|(at, path, data, outcome)| match outcome {
                Ok(true) => {
                    results[at] = Some(Ok(pending[at].clone()));
                    None
                }
                Ok(false) => Some((at, path, data)),
                Err(e) => {
                    results[at] = Some(Err(e));
                    None
                }
            })
            .collect();
        let set: Vec<(usize, Result<Revision, StoreError>)> = stream::iter(existing)
            .map(|(at, path, data)| async move { (at, self.put(&path, &data, false).await) })
            .buffer_unordered(MAX_IN_FLIGHT)
            .collect()
            .await;
        for (at, outcome) in set {
            results[at] = Some(outcome.map(|_| pending[at].clone()));
        }
        results
            .into_iter()
            .map(|r| {
                r.unwrap_or_else(|| {
                    Err(StoreError::Unavailable(
                        "a pending switch got no outcome".into(),
                    ))
                })
            })
            .collect()
    }

    /// Creates nodes in `multi` transactions of up to [`MULTI_OPS`]; a node that exists is
    /// left as it is. Answers each node with whether it was created.
    async fn create_nodes(
        &self,
        client: &zk::Client,
        nodes: Vec<(usize, String, Vec<u8>)>,
    ) -> Vec<(usize, String, Vec<u8>, Result<bool, StoreError>)> {
        let chunks: Vec<Vec<(usize, String, Vec<u8>)>> = {
            let mut chunks = Vec::new();
            let mut nodes = nodes.into_iter().peekable();
            while nodes.peek().is_some() {
                chunks.push(nodes.by_ref().take(MULTI_OPS).collect());
            }
            chunks
        };
        stream::iter(chunks)
            .map(|chunk| self.create_chunk(client, chunk))
            .buffered(MULTIS_IN_FLIGHT)
            .collect::<Vec<_>>()
            .await
            .into_iter()
            .flatten()
            .collect()
    }

    async fn create_chunk(
        &self,
        client: &zk::Client,
        mut nodes: Vec<(usize, String, Vec<u8>)>,
    ) -> Vec<(usize, String, Vec<u8>, Result<bool, StoreError>)> {
        let timeout = self.settings.request_timeout;
        let mut done = Vec::with_capacity(nodes.len());
        let mut attempts = 0;
        while !nodes.is_empty() {
            attempts += 1;
            if attempts > MULTI_ATTEMPTS {
                // Many exist already: one request each, pipelined, so each gets its answer.
                let single: Vec<_> = stream::iter(nodes)
                    .map(|(a, p, d)| async move {
                        let outcome =
                            match session::timed(timeout, client.create(&p, &d, &persistent()))
                                .await
                            {
                                Ok(_) => Ok(true),
                                Err(zk::Error::NodeExists) => Ok(false),
                                Err(e) => Err(session::zk_error("create", &p, e)),
                            };
                        (a, p, d, outcome)
                    })
                    .buffer_unordered(MAX_IN_FLIGHT)
                    .collect()
                    .await;
                done.extend(single);
                break;
            }
            let mut writer = client.new_multi_writer();
            if nodes
                .iter()
                .try_for_each(|(_, path, data)| writer.add_create(path, data, &persistent()))
                .is_err()
            {
                let e = StoreError::Unavailable("ZooKeeper refused a node path".into());
                done.extend(nodes.into_iter().map(|(a, p, d)| (a, p, d, Err(e.clone()))));
                break;
            }
            let committed = tokio::time::timeout(timeout, writer.commit())
                .await
                .unwrap_or(Err(zk::MultiWriteError::RequestFailed {
                    source: zk::Error::ConnectionLoss,
                }));
            match committed {
                Ok(_) => {
                    done.extend(nodes.into_iter().map(|(a, p, d)| (a, p, d, Ok(true))));
                    break;
                }
                Err(zk::MultiWriteError::OperationFailed {
                    index,
                    source: zk::Error::NodeExists,
                }) if index < nodes.len() => {
                    let (a, p, d) = nodes.remove(index);
                    done.push((a, p, d, Ok(false)));
                }
                Err(zk::MultiWriteError::OperationFailed { index, source }) => {
                    let e = session::zk_error(
                        "multi",
                        nodes.get(index).map_or("", |(_, p, _)| p.as_str()),
                        source,
                    );
                    done.extend(nodes.into_iter().map(|(a, p, d)| (a, p, d, Err(e.clone()))));
                    break;
                }
                Err(zk::MultiWriteError::RequestFailed { source }) => {
                    let e = session::zk_error("multi", &nodes[0].1, source);
                    done.extend(nodes.into_iter().map(|(a, p, d)| (a, p, d, Err(e.clone()))));
                    break;
                }
            }
        }
        done
    }

    /// [`crate::store::UserCoinStore::apply_pending`] on ZooKeeper; see the module doc.
    pub(super) async fn apply_pending_once(
        &self,
        pending: &PendingSwitch,
    ) -> Result<PendingOutcome, StoreError> {
        let client = self.batch.client().await?;
        let timeout = self.settings.request_timeout;
        let pending_path = self.pending_path(&pending.user);
        let user_path = format!("{}{}", self.settings.switcher_dir, pending.user);
        let barrier = self.batch.barrier_path().to_owned();
        for _ in 0..APPLY_ATTEMPTS {
            let (data, pstat) = match session::timed(timeout, client.get_data(&pending_path)).await
            {
                Ok(found) => found,
                Err(zk::Error::NoNode) => return Ok(PendingOutcome::Gone),
                Err(e) => return Err(session::zk_error("get", &pending_path, e)),
            };
            if self
                .parse_pending(&pending_path, &pending.user, &data)
                .as_ref()
                != Some(pending)
            {
                return Ok(PendingOutcome::Gone);
            }
            let user = match session::timed(timeout, client.check_stat(&user_path)).await {
                Ok(stat) => stat,
                Err(e) => return Err(session::zk_error("exists", &user_path, e)),
            };
            let current = user.as_ref().map_or(0, |s| s.mzxid as Revision);
            if current != pending.after {
                return match session::timed(
                    timeout,
                    client.delete(&pending_path, Some(pstat.version)),
                )
                .await
                {
                    Ok(()) => Ok(PendingOutcome::Superseded),
                    Err(zk::Error::NoNode | zk::Error::BadVersion) => Ok(PendingOutcome::Gone),
                    Err(e) => Err(session::zk_error("delete", &pending_path, e)),
                };
            }
            let mut writer = client.new_multi_writer();
            let coin = pending.coin.as_bytes();
            let added = writer
                .add_delete(&pending_path, Some(pstat.version))
                .and_then(|()| match &user {
                    Some(stat) => writer.add_set_data(&user_path, coin, Some(stat.version)),
                    None => writer.add_create(&user_path, coin, &persistent()),
                })
                .and_then(|()| writer.add_set_data(&barrier, b"", None));
            added.map_err(|e| session::zk_error("multi", &user_path, e))?;
            let committed = tokio::time::timeout(timeout, writer.commit())
                .await
                .unwrap_or(Err(zk::MultiWriteError::RequestFailed {
                    source: zk::Error::ConnectionLoss,
                }));
            match committed {
                Ok(results) => {
                    let Some(zk::MultiWriteResult::SetData { stat }) = results.last() else {
                        return Err(StoreError::Unavailable(format!(
                            "ZooKeeper multi answered {} results for 3 operations",
                            results.len()
                        )));
                    };
                    return Ok(PendingOutcome::Applied(Record {
                        key: RecordKey::User(pending.user.clone()),
                        value: Some(pending.coin.clone()),
                        revision: stat.mzxid as Revision,
                    }));
                }
                Err(zk::MultiWriteError::OperationFailed {
                    index: 2,
                    source: zk::Error::NoNode,
                }) => self.batch.create_barrier(&client).await?,
                // The pending node or the user changed meanwhile: look again.
                Err(zk::MultiWriteError::OperationFailed { .. }) => {}
                Err(zk::MultiWriteError::RequestFailed { source }) => {
                    return Err(session::zk_error("multi", &user_path, source));
                }
            }
        }
        Err(StoreError::Unavailable(format!(
            "ZooKeeper {user_path}: kept changing while a held-back switch was applied"
        )))
    }

    fn seen_dir(&self, coin: &str) -> String {
        format!("{}seen/{coin}/", self.settings.deployment_dir)
    }

    /// [`crate::store::UserCoinStore::first_seen`] on ZooKeeper.
    pub(super) async fn read_first_seen(
        &self,
        coin: &str,
        users: Vec<String>,
    ) -> Result<Vec<Option<u64>>, StoreError> {
        let client = self.batch.client().await?;
        let timeout = self.settings.request_timeout;
        let dir = self.seen_dir(coin);
        let mut out = Vec::with_capacity(users.len());
        for chunk in users.chunks(MULTI_OPS) {
            let mut reader = client.new_multi_reader();
            for user in chunk {
                let path = format!("{dir}{user}");
                reader
                    .add_get_data(&path)
                    .map_err(|e| session::zk_error("read", &path, e))?;
            }
            let results = session::timed(timeout, reader.commit())
                .await
                .map_err(|e| session::zk_error("multiRead", &dir, e))?;
            for result in results {
                out.push(match result {
                    zk::MultiReadResult::Data { data, .. } => std::str::from_utf8(&data)
                        .ok()
                        .and_then(|t| t.trim().parse().ok()),
                    _ => None,
                });
            }
        }
        out.resize(users.len(), None);
        Ok(out)
    }

    /// [`crate::store::UserCoinStore::record_first_seen`] on ZooKeeper.
    pub(super) async fn write_first_seen(
        &self,
        coin: &str,
        users: Vec<String>,
        seen_at: u64,
    ) -> Result<(), StoreError> {
        if users.is_empty() {
            return Ok(());
        }
        let dir = self.seen_dir(coin);
        let known = self
            .seen_dirs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(coin);
        if !known {
            create_path(&self.zk, node_path(&dir), self.settings.request_timeout).await?;
            self.seen_dirs
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(coin.to_owned());
        }
        let client = self.batch.client().await?;
        let value = seen_at.to_string().into_bytes();
        let nodes = users
            .iter()
            .enumerate()
            .map(|(at, user)| (at, format!("{dir}{user}"), value.clone()))
            .collect();
        for (_, _, _, outcome) in self.create_nodes(&client, nodes).await {
            outcome?;
        }
        Ok(())
    }
}
