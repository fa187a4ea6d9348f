//! User-list ingestion in the control process: the initializer's pullers (SPEC §7) writing
//! through a [`ListedUserSink`] over the switching core, so ingested users reach the proxies
//! like any other change and the safety period sees when each user was first listed.
//!
//! Counted: each user by coin and result (the core, [`Creator::Ingestion`]), and each page
//! (one round of a puller) by coin and outcome ([`run_puller`]).

use std::{sync::Arc, time::SystemTime};

use async_trait::async_trait;
use switchyard_initializer::{
    puller::UserListPuller,
    sink::{IngestStatus, ListedUserSink, SinkError},
};
use tokio_util::sync::CancellationToken;

use crate::{
    core::{Creator, Listed, SwitchCore, SwitchError},
    metrics::ControlMetrics,
};

/// Ingests into the core of this process.
#[derive(Debug, Clone)]
pub struct CoreSink {
    core: Arc<SwitchCore>,
}

impl CoreSink {
    /// A sink over `core`.
    pub fn new(core: Arc<SwitchCore>) -> Self {
        Self { core }
    }
}

#[async_trait]
impl ListedUserSink for CoreSink {
    async fn ingest(&self, coin: &str, users: Vec<String>) -> Result<Vec<IngestStatus>, SinkError> {
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let mut out = Vec::with_capacity(users.len());
        let chunk = self.core.settings().max_batch.max(1);
        for users in users.chunks(chunk) {
            let outcomes = self
                .core
                .create_users_if_absent(coin, users.to_vec(), now, Creator::Ingestion)
                .await
                .map_err(|e| SinkError::Refused(e.to_string()))?;
            out.extend(outcomes.into_iter().map(|o| match o {
                Ok(Listed::Created(_)) => IngestStatus::Created,
                Ok(Listed::Existed) => IngestStatus::Existed,
                Err(SwitchError::Invalid(e)) => IngestStatus::Invalid(e.to_string()),
                Err(SwitchError::Store(e)) => IngestStatus::Failed(e.to_string()),
            }));
        }
        Ok(out)
    }
}

/// Runs `puller` for `coin` until `shutdown`, counting each page: `ok` when the round read the
/// list and every user in it is settled, `error` when the round failed or some users could not
/// be written (they are read again next time).
pub async fn run_puller(
    puller: UserListPuller,
    coin: String,
    metrics: ControlMetrics,
    shutdown: CancellationToken,
) {
    puller
        .run_observed(shutdown, move |round| {
            let ok = round.as_ref().is_ok_and(|summary| summary.failed == 0);
            metrics.count_ingest_page(&coin, ok);
        })
        .await;
}
