//! `GET /metrics` on `MetricsListenAddr`: every control series as OpenMetrics text, served by
//! the same bounded HTTP/1.1 server as `ListenAddr` ([`switchyard_initializer::http_server`]:
//! header and body read timeouts, `HTTPMaxConnections`) until shutdown.
//!
//! No credentials: metrics move no hashrate and name no user, so a non-loopback address is
//! fine (firewall it as any monitoring port).

use std::sync::Arc;

use axum::{
    Router,
    extract::State,
    http::{StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};
use switchyard_initializer::http_server::HttpLimits;
use tokio::{net::TcpListener, sync::watch};
use tokio_util::sync::CancellationToken;
use tracing::{error, info};

use super::{ControlMetrics, ScrapeState};
use crate::core::SwitchCore;

/// The content type of OpenMetrics text.
pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// What a scrape reads besides the counters: the core (index, held-back schedule) and the
/// store's health.
#[derive(Debug, Clone)]
pub struct ScrapeSources {
    core: Arc<SwitchCore>,
    available: watch::Receiver<bool>,
    parts: Vec<(&'static str, watch::Receiver<bool>)>,
}

impl ScrapeSources {
    /// Reads `core`, and the store's health from `available` (the whole store) and `parts`
    /// (each part that can fail on its own, by name; [`crate::store::UserCoinStore::parts`]).
    pub fn new(
        core: Arc<SwitchCore>,
        available: watch::Receiver<bool>,
        parts: Vec<(&'static str, watch::Receiver<bool>)>,
    ) -> Self {
        Self {
            core,
            available,
            parts,
        }
    }

    /// The state now.
    pub fn state(&self) -> ScrapeState {
        let index = self.core.index();
        ScrapeState {
            held_back: self.core.held_back_count(),
            index_revision: index.revision(),
            latest_change: index.latest_change(),
            users: index.user_count(),
            store_up: *self.available.borrow(),
            parts: self
                .parts
                .iter()
                .map(|(name, up)| (*name, *up.borrow()))
                .collect(),
        }
    }
}

#[derive(Debug, Clone)]
struct Scrape {
    metrics: ControlMetrics,
    sources: ScrapeSources,
}

/// The router serving `GET /metrics`.
pub fn router(metrics: ControlMetrics, sources: ScrapeSources) -> Router {
    Router::new()
        .route("/metrics", get(scrape))
        .with_state(Scrape { metrics, sources })
}

async fn scrape(State(scrape): State<Scrape>) -> Response {
    match scrape.metrics.render(&scrape.sources.state()) {
        Ok(text) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, OPENMETRICS_CONTENT_TYPE)],
            text,
        )
            .into_response(),
        Err(e) => {
            error!(error = %e, "cannot encode the metrics");
            StatusCode::INTERNAL_SERVER_ERROR.into_response()
        }
    }
}

/// Serves `router` on `listener` within `limits` until `shutdown`, then returns once the
/// scrapes in flight are answered.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: HttpLimits,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let local = listener.local_addr().ok();
    info!(addr = ?local, "metrics listening (GET /metrics)");
    switchyard_initializer::http_server::serve(listener, router, limits, shutdown).await?;
    info!(addr = ?local, "metrics endpoint stopped");
    Ok(())
}
