//! The TLS miner listener (`TlsListenAddr`): pools publish `stratum+ssl://` endpoints beside
//! the plain ones, and this serves them.
//!
//! Each connection's TLS handshake runs in its own task ([`switchyard_tls::accept_tls`]); the
//! decrypted stream is then joined to an ordinary session through a loopback TCP pair made for
//! it ([`switchyard_tls::bridge`]), so the session engine (and its relay loop, tuned for plain sockets) is the same for both
//! listeners and sees the miner's own address. The certificate is reloaded when its files change
//! or on SIGHUP.
//!
//! A hot upgrade cannot hand a TLS connection over (its keys live in this process): TLS miners
//! reconnect after an upgrade, as they do after a restart.

#![forbid(unsafe_code)]

use std::sync::Arc;

use futures::StreamExt;
use switchyard_tls::ServerTls;
use tokio::{net::TcpListener, task::JoinSet};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::session::{self, ProxyContext};

/// Serves the TLS miners of `listener` until `shutdown`, at most `max_sessions` sessions of
/// the whole proxy at once.
pub async fn serve(
    listener: TcpListener,
    tls: Arc<ServerTls>,
    ctx: Arc<ProxyContext>,
    max_sessions: usize,
    shutdown: CancellationToken,
) {
    tokio::spawn(switchyard_tls::keep_reloaded(
        Arc::clone(&tls),
        shutdown.child_token(),
    ));
    if let Ok(addr) = listener.local_addr() {
        info!(tls_listen_addr = %addr, "TLS miner listener");
    }
    let mut incoming = Box::pin(switchyard_tls::accept_tls(
        listener,
        tls,
        shutdown.child_token(),
    ));
    let mut sessions = JoinSet::new();
    loop {
        let next = tokio::select! {
            () = shutdown.cancelled() => break,
            next = incoming.next() => next,
            Some(_) = sessions.join_next(), if !sessions.is_empty() => continue,
        };
        let Some(Ok(miner)) = next else {
            break;
        };
        let Ok(peer) = miner.get_ref().0.peer_addr() else {
            continue;
        };
        if usize::try_from(ctx.metrics.session_count()).unwrap_or(0) >= max_sessions {
            ctx.metrics.refused();
            continue;
        }
        let ctx = Arc::clone(&ctx);
        sessions.spawn(async move {
            match switchyard_tls::bridge(miner).await {
                Ok(inner) => session::run(ctx, inner, peer).await,
                Err(e) => {
                    warn!(%peer, error = %e, "a TLS miner could not be joined to a session: closed");
                }
            }
        });
    }
    sessions.shutdown().await;
}
