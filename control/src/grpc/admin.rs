//! `switchyard.v1.SwitcherAdmin` over the switching core and the lease registry.

use std::sync::Arc;

use switchyard_proto::v1::{
    GetUserCoinRequest, GetUserCoinResponse, IngestOutcome, IngestResult, IngestUserListRequest,
    IngestUserListResponse, ListProxiesRequest, ListProxiesResponse, ListUserCoinsRequest,
    ListUserCoinsResponse, ProxyInfo, SwitchCoinRequest, SwitchCoinResponse, SwitchCoinResult,
    SwitchCoinsRequest, SwitchCoinsResponse, SwitchError as PbSwitchError, UserCoin,
    switcher_admin_server::SwitcherAdmin,
};
use tonic::{Request, Response, Status};
use tracing::info;

use crate::metrics::SwitchCount;

use crate::{
    core::{Creator, Listed, SwitchCore, SwitchError, SwitchSource, UserCoinRecord},
    leases::ServerIdLeases,
    validate::validate_user,
};

/// The most users one IngestUserList call may carry.
const MAX_INGEST_BATCH: usize = 100_000;

/// The default and largest page of ListUserCoins.
const DEFAULT_PAGE_SIZE: usize = 1_000;
const MAX_PAGE_SIZE: usize = 10_000;

/// The `SwitcherAdmin` service.
#[derive(Debug, Clone)]
pub struct AdminService {
    core: Arc<SwitchCore>,
    leases: Arc<dyn ServerIdLeases>,
}

impl AdminService {
    /// The service over `core` and `leases`.
    pub fn new(core: Arc<SwitchCore>, leases: Arc<dyn ServerIdLeases>) -> Self {
        Self { core, leases }
    }
}

fn to_pb(record: UserCoinRecord) -> UserCoin {
    UserCoin {
        user: record.user,
        coin: record.coin,
        revision: record.revision,
    }
}

/// Unix seconds as the proto's `int64`, 0 for none.
fn unix_i64(t: Option<u64>) -> i64 {
    t.map_or(0, |t| i64::try_from(t).unwrap_or(i64::MAX))
}

fn unix_seconds(t: std::time::SystemTime) -> i64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

#[tonic::async_trait]
impl SwitcherAdmin for AdminService {
    async fn switch_coin(
        &self,
        request: Request<SwitchCoinRequest>,
    ) -> Result<Response<SwitchCoinResponse>, Status> {
        let SwitchCoinRequest { user, coin } = request.into_inner();
        let source = SwitchSource::Grpc;
        let outcome = self.core.switch_coin(source, &user, &coin).await?;
        match outcome.pending_until {
            // The record is still the old coin.
            Some(due) => info!(
                source = %source,
                outcome = %SwitchCount::HeldBack,
                user = %outcome.record.user,
                coin = %coin,
                current = %outcome.record.coin,
                apply_at = due,
                held_until = %crate::core::utc_text(due),
                "switch held back by the safety period"
            ),
            None => info!(
                source = %source,
                outcome = %SwitchCount::Written,
                user = %outcome.record.user,
                coin = %outcome.record.coin,
                previous = outcome.previous_coin.as_deref().unwrap_or(""),
                revision = outcome.record.revision,
                "switched user"
            ),
        }
        Ok(Response::new(SwitchCoinResponse {
            pending_applies_at_unix: unix_i64(outcome.pending_until),
            previous_coin: outcome.previous_coin.unwrap_or_default(),
            user_coin: Some(to_pb(outcome.record)),
        }))
    }

    async fn switch_coins(
        &self,
        request: Request<SwitchCoinsRequest>,
    ) -> Result<Response<SwitchCoinsResponse>, Status> {
        let switches = request.into_inner().switches;
        let asked: Vec<(String, String)> = switches.into_iter().map(|s| (s.user, s.coin)).collect();
        let source = SwitchSource::Grpc;
        let outcomes = self.core.switch_coins(source, asked.clone()).await?;
        let (mut written, mut held_back, mut invalid, mut failed) =
            (0usize, 0usize, 0usize, 0usize);
        for outcome in &outcomes {
            match outcome {
                Ok(o) if o.pending_until.is_some() => held_back += 1,
                Ok(_) => written += 1,
                Err(SwitchError::Invalid(_)) => invalid += 1,
                Err(SwitchError::Store(_)) => failed += 1,
            }
        }
        // One line for the whole batch, whatever its size, with a count per outcome.
        info!(
            source = %source,
            requested = asked.len(),
            written,
            held_back,
            invalid,
            failed,
            revision = self.core.index().revision(),
            "switched a batch of users"
        );
        let results = asked
            .into_iter()
            .zip(outcomes)
            .map(|((user, coin), outcome)| match outcome {
                Ok(o) => SwitchCoinResult {
                    user,
                    coin,
                    pending_applies_at_unix: unix_i64(o.pending_until),
                    applied: Some(to_pb(o.record)),
                    error: None,
                },
                Err(e) => {
                    let status = Status::from(e);
                    SwitchCoinResult {
                        user,
                        coin,
                        applied: None,
                        pending_applies_at_unix: 0,
                        error: Some(PbSwitchError {
                            code: status.code() as i32,
                            message: status.message().to_owned(),
                        }),
                    }
                }
            })
            .collect();
        Ok(Response::new(SwitchCoinsResponse { results }))
    }

    async fn get_user_coin(
        &self,
        request: Request<GetUserCoinRequest>,
    ) -> Result<Response<GetUserCoinResponse>, Status> {
        let user = request.into_inner().user;
        match self.core.user_coin(&user)? {
            Some(record) => {
                let pending = self.core.pending_switch(&user).await?;
                Ok(Response::new(GetUserCoinResponse {
                    user_coin: Some(to_pb(record)),
                    pending_applies_at_unix: unix_i64(pending.as_ref().map(|p| p.apply_at)),
                    pending_coin: pending.map(|p| p.coin).unwrap_or_default(),
                }))
            }
            None => Err(Status::not_found(format!(
                "user {user:?} has no coin record"
            ))),
        }
    }

    async fn list_user_coins(
        &self,
        request: Request<ListUserCoinsRequest>,
    ) -> Result<Response<ListUserCoinsResponse>, Status> {
        let ListUserCoinsRequest {
            page_size,
            page_token,
        } = request.into_inner();
        let limit = match page_size as usize {
            0 => DEFAULT_PAGE_SIZE,
            n => n.min(MAX_PAGE_SIZE),
        };
        let after = if page_token.is_empty() {
            None
        } else {
            validate_user(&page_token)
                .map_err(|e| Status::invalid_argument(format!("page_token is not valid: {e}")))?;
            Some(page_token.as_str())
        };
        let (users, revision) = self.core.list_user_coins(after, limit);
        let next_page_token = if users.len() == limit {
            users.last().map(|u| u.user.clone()).unwrap_or_default()
        } else {
            String::new()
        };
        Ok(Response::new(ListUserCoinsResponse {
            users: users.into_iter().map(to_pb).collect(),
            next_page_token,
            revision,
        }))
    }

    async fn ingest_user_list(
        &self,
        request: Request<IngestUserListRequest>,
    ) -> Result<Response<IngestUserListResponse>, Status> {
        let IngestUserListRequest { coin, users } = request.into_inner();
        if users.is_empty() {
            return Err(Status::invalid_argument("the batch is empty"));
        }
        if users.len() > MAX_INGEST_BATCH {
            return Err(Status::invalid_argument(format!(
                "the batch has {} users; at most {MAX_INGEST_BATCH} are allowed",
                users.len()
            )));
        }
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let outcomes = self
            .core
            .create_users_if_absent(&coin, users.clone(), now, Creator::Ingestion)
            .await?;
        // A call is one page of a remote initializer's list (the coin is known by now).
        let ok = outcomes
            .iter()
            .all(|o| !matches!(o, Err(SwitchError::Store(_))));
        self.core.metrics().count_ingest_page(&coin, ok);
        let results = users
            .into_iter()
            .zip(outcomes)
            .map(|(user, outcome)| {
                let (outcome, revision, error) = match outcome {
                    Ok(Listed::Created(record)) => {
                        (IngestOutcome::Created, record.revision, String::new())
                    }
                    Ok(Listed::Existed) => (IngestOutcome::Existed, 0, String::new()),
                    Err(SwitchError::Invalid(e)) => (IngestOutcome::Invalid, 0, e.to_string()),
                    Err(SwitchError::Store(e)) => (IngestOutcome::Failed, 0, e.to_string()),
                };
                IngestResult {
                    user,
                    outcome: outcome as i32,
                    revision,
                    error,
                }
            })
            .collect();
        Ok(Response::new(IngestUserListResponse { results }))
    }

    async fn list_proxies(
        &self,
        _request: Request<ListProxiesRequest>,
    ) -> Result<Response<ListProxiesResponse>, Status> {
        let proxies = self
            .leases
            .live()
            .await?
            .into_iter()
            .map(|lease| ProxyInfo {
                server_id: u32::from(lease.server_id),
                chain_type: lease.proxy.chain_type,
                coins: lease.proxy.coins,
                ips: lease.proxy.ips,
                host_name: lease.proxy.host_name,
                listen_addr: lease.proxy.listen_addr,
                instance_id: lease.proxy.instance_id,
                sessions: lease.sessions_by_coin.values().sum(),
                sessions_by_coin: lease.sessions_by_coin.into_iter().collect(),
                last_heartbeat_unix: unix_seconds(lease.last_heartbeat),
                lease_expires_unix: unix_seconds(lease.expires),
            })
            .collect();
        Ok(Response::new(ListProxiesResponse { proxies }))
    }
}
