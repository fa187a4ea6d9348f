//! Where ingested users go: [`ListedUserSink`]. The control service implements it over its
//! switching core; [`GrpcSink`] sends the users to a remote control service.

use std::sync::atomic::{AtomicUsize, Ordering};

use async_trait::async_trait;
use switchyard_proto::v1::{
    IngestOutcome, IngestUserListRequest, switcher_admin_client::SwitcherAdminClient,
};
use thiserror::Error;
use tonic::{
    Request,
    metadata::MetadataValue,
    transport::{Channel, Endpoint},
};
use tracing::warn;

/// What became of one ingested user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IngestStatus {
    /// Created with the list's coin.
    Created,
    /// It existed and keeps its coin.
    Existed,
    /// Not a valid user name: it never will be ingested.
    Invalid(String),
    /// The store could not be written: try again later.
    Failed(String),
}

impl IngestStatus {
    /// Whether the cursor may move past the user: it is in the store, or never will be.
    pub fn is_settled(&self) -> bool {
        !matches!(self, IngestStatus::Failed(_))
    }
}

/// Why a whole ingestion call failed.
#[derive(Debug, Error)]
pub enum SinkError {
    /// The control service refused the call (a coin it does not know, bad credentials).
    #[error("refused: {0}")]
    Refused(String),
    /// The control service cannot be reached or answered out of turn; try again later.
    #[error("unavailable: {0}")]
    Unavailable(String),
}

/// Where the pullers put the users they read.
#[async_trait]
pub trait ListedUserSink: Send + Sync + 'static {
    /// Creates each absent user with `coin`, keeps existing ones, and remembers them as seen
    /// in `coin`'s list now. One status per user, in order.
    async fn ingest(&self, coin: &str, users: Vec<String>) -> Result<Vec<IngestStatus>, SinkError>;
}

/// Users per IngestUserList call.
pub const GRPC_BATCH: usize = 10_000;

/// Ingests through `SwitcherAdmin.IngestUserList` on one of several control endpoints, moving
/// to the next endpoint when one fails.
#[derive(Debug)]
pub struct GrpcSink {
    clients: Vec<(String, SwitcherAdminClient<Channel>)>,
    current: AtomicUsize,
    token: Option<MetadataValue<tonic::metadata::Ascii>>,
}

impl GrpcSink {
    /// A sink over `endpoints` (`host:port`, `http://host:port` or `https://host:port`, as the
    /// proxy's `ControlEndpoints`), sending `token` as a bearer token when set. Connections are
    /// made lazily.
    pub fn new(endpoints: &[String], token: Option<&str>) -> Result<Self, SinkError> {
        Self::with_tls(endpoints, token, None)
    }

    /// [`Self::new`], with `https://` endpoints reached over TLS as `tls` says (the CA to trust,
    /// and a client certificate for mutual TLS). An `https://` endpoint without `tls` is
    /// refused: there are no system roots to trust.
    pub fn with_tls(
        endpoints: &[String],
        token: Option<&str>,
        tls: Option<&switchyard_tls::ClientTlsFiles>,
    ) -> Result<Self, SinkError> {
        let tls = tls
            .map(|files| files.tonic_config())
            .transpose()
            .map_err(|e| SinkError::Refused(format!("control TLS: {e}")))?;
        if endpoints.is_empty() {
            return Err(SinkError::Refused(
                "no control endpoint is configured".into(),
            ));
        }
        let clients = endpoints
            .iter()
            .map(|e| {
                let e = &switchyard_cli::control_endpoint_url(e)
                    .map_err(|err| SinkError::Refused(err.to_string()))?;
                let endpoint = Endpoint::from_shared(e.clone())
                    .map_err(|err| SinkError::Refused(format!("{e:?} is not an endpoint: {err}")))?
                    .connect_timeout(std::time::Duration::from_secs(5))
                    .timeout(std::time::Duration::from_secs(120));
                let endpoint = match (endpoint.uri().scheme_str(), &tls) {
                    (Some("https"), Some(tls)) => endpoint
                        .tls_config(tls.clone())
                        .map_err(|err| SinkError::Refused(format!("{e:?}: TLS: {err}")))?,
                    (Some("https"), None) => {
                        return Err(SinkError::Refused(format!(
                            "{e:?}: https needs ControlTlsCaFile (the CA of the control \
                             service's certificate)"
                        )));
                    }
                    _ => endpoint,
                };
                Ok((
                    e.clone(),
                    SwitcherAdminClient::new(endpoint.connect_lazy())
                        .max_decoding_message_size(32 * 1024 * 1024),
                ))
            })
            .collect::<Result<Vec<_>, SinkError>>()?;
        let token = token
            .map(|t| {
                format!("Bearer {t}")
                    .parse::<MetadataValue<tonic::metadata::Ascii>>()
                    .map(|mut value| {
                        // Its Debug then prints "Sensitive" (and HTTP/2 never indexes it).
                        value.set_sensitive(true);
                        value
                    })
                    .map_err(|_| SinkError::Refused("the token is not valid header text".into()))
            })
            .transpose()?;
        Ok(Self {
            clients,
            current: AtomicUsize::new(0),
            token,
        })
    }

    async fn call(&self, coin: &str, users: &[String]) -> Result<Vec<IngestStatus>, SinkError> {
        let start = self.current.load(Ordering::Relaxed);
        let mut last = SinkError::Unavailable("no endpoint tried".into());
        for attempt in 0..self.clients.len() {
            let i = (start + attempt) % self.clients.len();
            let (name, client) = &self.clients[i];
            let mut request = Request::new(IngestUserListRequest {
                coin: coin.to_owned(),
                users: users.to_vec(),
            });
            if let Some(token) = &self.token {
                request
                    .metadata_mut()
                    .insert("authorization", token.clone());
            }
            match client.clone().ingest_user_list(request).await {
                Ok(response) => {
                    self.current.store(i, Ordering::Relaxed);
                    let results = response.into_inner().results;
                    if results.len() != users.len() {
                        return Err(SinkError::Unavailable(format!(
                            "{name} answered {} results for {} users",
                            results.len(),
                            users.len()
                        )));
                    }
                    return Ok(results
                        .into_iter()
                        .map(|r| match IngestOutcome::try_from(r.outcome) {
                            Ok(IngestOutcome::Created) => IngestStatus::Created,
                            Ok(IngestOutcome::Existed) => IngestStatus::Existed,
                            Ok(IngestOutcome::Invalid) => IngestStatus::Invalid(r.error),
                            _ => IngestStatus::Failed(r.error),
                        })
                        .collect());
                }
                Err(status)
                    if matches!(
                        status.code(),
                        tonic::Code::InvalidArgument
                            | tonic::Code::Unauthenticated
                            | tonic::Code::PermissionDenied
                    ) =>
                {
                    return Err(SinkError::Refused(format!("{name}: {}", status.message())));
                }
                Err(status) => {
                    warn!(endpoint = %name, error = %status, "control endpoint failed; trying the next");
                    last = SinkError::Unavailable(format!("{name}: {status}"));
                }
            }
        }
        Err(last)
    }
}

#[async_trait]
impl ListedUserSink for GrpcSink {
    async fn ingest(&self, coin: &str, users: Vec<String>) -> Result<Vec<IngestStatus>, SinkError> {
        let mut out = Vec::with_capacity(users.len());
        for chunk in users.chunks(GRPC_BATCH) {
            out.extend(self.call(coin, chunk).await?);
        }
        Ok(out)
    }
}
