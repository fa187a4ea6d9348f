//! The TLS miner listener (`TlsListenAddr`): pools publish `stratum+ssl://` endpoints beside
//! the plain ones, and this serves them.
//!
//! Each connection's TLS handshake runs in its own task ([`switchyard_tls::accept_tls`]); the
//! decrypted stream is then joined to an ordinary session through a loopback TCP pair made for
//! it, so the session engine (and its relay loop, tuned for plain sockets) is the same for both
//! listeners and sees the miner's own address. The certificate is reloaded when its files change
//! or on SIGHUP.
//!
//! A hot upgrade cannot hand a TLS connection over (its keys live in this process): TLS miners
//! reconnect after an upgrade, as they do after a restart.

#![forbid(unsafe_code)]

use std::{net::SocketAddr, sync::Arc};

use futures::StreamExt;
use switchyard_tls::ServerTls;
use tokio::{
    net::{TcpListener, TcpStream},
    task::JoinSet,
};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

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
    let bridge = match TcpListener::bind((std::net::Ipv4Addr::LOCALHOST, 0)).await {
        Ok(bridge) => bridge,
        Err(e) => {
            warn!(error = %e, "the TLS miner listener cannot start: no loopback socket");
            return;
        }
    };
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
        let (outer, inner) = match pair(&bridge).await {
            Ok(pair) => pair,
            Err(e) => {
                warn!(error = %e, "a TLS miner could not be joined to a session: closed");
                continue;
            }
        };
        sessions.spawn(run(Arc::clone(&ctx), miner, outer, inner, peer));
    }
    sessions.shutdown().await;
}

/// One TLS miner: its session on `inner`, its decrypted bytes copied to and from `outer`.
async fn run(
    ctx: Arc<ProxyContext>,
    mut miner: switchyard_tls::TlsStream<TcpStream>,
    mut outer: TcpStream,
    inner: TcpStream,
    peer: SocketAddr,
) {
    let session = session::run(ctx, inner, peer);
    tokio::pin!(session);
    let copied = {
        let copy = tokio::io::copy_bidirectional(&mut miner, &mut outer);
        tokio::select! {
            () = &mut session => None,
            copied = copy => Some(copied),
        }
    };
    if let Some(copied) = copied {
        debug!(%peer, ?copied, "TLS miner gone");
        // The session sees its miner's end of stream.
        drop(outer);
        drop(miner);
        session.await;
    }
}

/// A connected loopback pair through `bridge`: the outer end (the copy's) and the inner one
/// (the session's). A connection to the bridge from anyone else is dropped.
async fn pair(bridge: &TcpListener) -> std::io::Result<(TcpStream, TcpStream)> {
    let addr = bridge.local_addr()?;
    let outer = TcpStream::connect(addr).await?;
    let local = outer.local_addr()?;
    loop {
        let (inner, from) = bridge.accept().await?;
        if from == local {
            let _ = outer.set_nodelay(true);
            return Ok((outer, inner));
        }
        debug!(%from, "dropped a stray connection to the TLS bridge");
    }
}
