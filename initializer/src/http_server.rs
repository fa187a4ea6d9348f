//! A bounded HTTP/1.1 server for the Go programs' HTTP APIs: the user-list API here and, on the
//! same listener in the control service, the switch API. What a hostile or broken client may
//! hold is bounded:
//!
//! - the request head (request line and headers) must arrive within
//!   [`HttpLimits::header_read_timeout`] of the connection's start or of the previous answer
//!   (so a "slowloris" client sending a header a byte at a time, or an idle keep-alive
//!   connection, is closed);
//! - the request body must arrive within [`HttpLimits::body_read_timeout`] of the head (a
//!   body still unread then is an error to the handler, which answers, and the connection is
//!   closed); the routes' own size limits bound its size;
//! - at most [`HttpLimits::max_connections`] connections are served at once; further ones
//!   wait in the listen backlog until one ends.
//!
//! HTTP/1.1 only, as the Go programs' `net/http` servers spoke without TLS.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use axum::{Router, body::Body, extract::ConnectInfo};
use futures::{Stream, StreamExt as _};
use hyper::{body::Incoming, server::conn::http1, service::service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use thiserror::Error;
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpListener,
    sync::Semaphore,
    time::Instant,
};
use tokio_util::sync::CancellationToken;
use tower::ServiceExt as _;
use tracing::{debug, warn};

/// The limits of one HTTP listener; see the module doc.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HttpLimits {
    /// How long a client may take to send a request head (and how long a keep-alive
    /// connection may stay idle).
    pub header_read_timeout: Duration,
    /// How long a client may take to send a request body, counted from its head.
    pub body_read_timeout: Duration,
    /// Connections served at once, at most.
    pub max_connections: usize,
}

impl HttpLimits {
    /// The default header read timeout: a request line and a few headers take milliseconds on
    /// any live network; 10 s leaves room for a slow link and closes idle connections soon.
    pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
    /// The default body read timeout: the largest body (a 16 MiB multi-user switch) at
    /// 1 MB/s.
    pub const DEFAULT_BODY_READ_TIMEOUT: Duration = Duration::from_secs(30);
    /// The default connection limit: far above what pool backends and sservers open, far
    /// below a process's file descriptors.
    pub const DEFAULT_MAX_CONNECTIONS: usize = 512;
}

impl Default for HttpLimits {
    fn default() -> Self {
        Self {
            header_read_timeout: Self::DEFAULT_HEADER_READ_TIMEOUT,
            body_read_timeout: Self::DEFAULT_BODY_READ_TIMEOUT,
            max_connections: Self::DEFAULT_MAX_CONNECTIONS,
        }
    }
}

/// The error a handler reads from a body that did not arrive in time.
#[derive(Debug, Error)]
#[error("the request body did not arrive within {0:?}")]
pub struct BodyReadTimeout(pub Duration);

/// Serves `router` on `listener` within `limits` until `shutdown` is cancelled, then stops
/// taking connections and returns once the connections in flight have answered.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: HttpLimits,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let incoming = futures::stream::unfold(listener, |listener| async move {
        let accepted = listener.accept().await;
        Some((accepted, listener))
    });
    serve_incoming(incoming, router, limits, shutdown).await;
    Ok(())
}

/// Serves `router` on the connections of `incoming` (a TCP listener's, or TLS streams over
/// them) within `limits`; see [`serve`]. A connection is taken from `incoming` only when the
/// connection limit allows it; accept errors are logged and skipped.
pub async fn serve_incoming<S, IO, E>(
    incoming: S,
    router: Router,
    limits: HttpLimits,
    shutdown: CancellationToken,
) where
    S: Stream<Item = Result<(IO, SocketAddr), E>>,
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    E: std::fmt::Display,
{
    let max =
        u32::try_from(limits.max_connections.clamp(1, Semaphore::MAX_PERMITS)).unwrap_or(u32::MAX);
    let permits = Arc::new(Semaphore::new(max as usize));
    let mut incoming = std::pin::pin!(incoming);
    let mut saturated = false;
    loop {
        if permits.available_permits() == 0 && !saturated {
            warn!(
                max_connections = max,
                "HTTP connection limit reached: new connections wait"
            );
        }
        saturated = permits.available_permits() == 0;
        let permit = tokio::select! {
            _ = shutdown.cancelled() => break,
            permit = Arc::clone(&permits).acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break,
            },
        };
        let next = tokio::select! {
            _ = shutdown.cancelled() => break,
            next = incoming.next() => next,
        };
        let (io, peer) = match next {
            None => break,
            Some(Ok(accepted)) => accepted,
            Some(Err(e)) => {
                debug!(error = %e, "HTTP accept failed");
                continue;
            }
        };
        let router = router.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            serve_connection(io, peer, router, limits, shutdown).await;
            drop(permit);
        });
    }
    // Every permit back: every connection has ended.
    let _ = permits.acquire_many(max).await;
}

/// Serves one connection within `limits` until it ends, or answers what is in flight and
/// closes when `shutdown` is cancelled.
pub async fn serve_connection<IO>(
    io: IO,
    peer: SocketAddr,
    router: Router,
    limits: HttpLimits,
    shutdown: CancellationToken,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let body_timeout = limits.body_read_timeout;
    let service = service_fn(move |mut request: hyper::Request<Incoming>| {
        request.extensions_mut().insert(ConnectInfo(peer));
        let request = request.map(|body| deadline_body(body, body_timeout));
        router.clone().oneshot(request)
    });
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .keep_alive(true);
    let conn = builder.serve_connection(TokioIo::new(io), service);
    let mut conn = std::pin::pin!(conn);
    let served = tokio::select! {
        served = conn.as_mut() => served,
        _ = shutdown.cancelled() => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = served {
        // Timeouts, resets and malformed requests: the client's business, not an outage.
        debug!(%peer, error = %e, "HTTP connection ended with an error");
    }
}

/// `body` as the handlers read it: an error once `timeout` has passed since the head.
fn deadline_body(body: Incoming, timeout: Duration) -> Body {
    let deadline = Instant::now() + timeout;
    let data = Body::new(body).into_data_stream();
    let stream = futures::stream::unfold(Some(data), move |data| async move {
        let mut data = data?;
        match tokio::time::timeout_at(deadline, data.next()).await {
            Ok(Some(chunk)) => Some((chunk, Some(data))),
            Ok(None) => None,
            Err(_) => {
                debug!(?timeout, "request body not received in time");
                Some((Err(axum::Error::new(BodyReadTimeout(timeout))), None))
            }
        }
    });
    Body::from_stream(stream)
}
