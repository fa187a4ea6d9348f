//! `switchyard-tls`: TLS with rustls (no OpenSSL) for Switchyard's listeners and clients, one
//! implementation for every binary.
//!
//! - [`ServerTls`]: a server's certificate chain and key (and, for mutual TLS, the CA its
//!   clients' certificates must chain to) read from PEM files. It is reloaded without a restart
//!   ([`ServerTls::reload_if_changed`], driven by [`keep_reloaded`]: when the files change, and
//!   on SIGHUP), so a certificate rotation drops nobody: connections already open keep the
//!   certificate they were made with, new ones get the new one. A reload that fails (a half
//!   written file, a key that does not match) keeps the previous certificate and is logged.
//! - [`accept_tls`]: the TLS connections of a TCP listener, each handshake in its own task with
//!   a time limit, so a client that stalls its handshake holds nobody else up. The stream feeds
//!   tonic's `serve_with_incoming` or any accept loop.
//! - [`StratumTlsClient`]: TLS to a Stratum server (an sserver with TLS on), and [`bridge`],
//!   which joins a TLS stream to a loopback TCP pair so that code written for plain sockets (the
//!   proxy's session engine) serves it unchanged.
//! - [`ClientTlsFiles`]: what a gRPC client (the proxy, `switchyard-init`) needs to reach a TLS
//!   control service: the CA to trust and, for mutual TLS, its own certificate and key, as a
//!   tonic `ClientTlsConfig`.

use std::{
    io,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, PoisonError, RwLock},
    time::{Duration, SystemTime},
};

use futures::Stream;
use rustls::{
    RootCertStore, ServerConfig,
    crypto::CryptoProvider,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
    server::WebPkiClientVerifier,
};
use thiserror::Error;
use tokio::{
    net::{TcpListener, TcpStream},
    sync::mpsc,
};
use tokio_rustls::TlsAcceptor;
pub use tokio_rustls::server::TlsStream;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// How often [`keep_reloaded`] looks at the files.
pub const RELOAD_CHECK: Duration = Duration::from_secs(5);

/// How long a client may take over its TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Handshakes in progress at once per listener; beyond it new connections wait in the
/// listener's backlog.
pub const MAX_HANDSHAKES: usize = 256;

/// Why TLS could not be set up.
#[derive(Debug, Error)]
pub enum TlsError {
    /// A PEM file could not be read.
    #[error("{path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// What failed.
        source: io::Error,
    },
    /// A PEM file holds nothing usable.
    #[error("{path}: {what}")]
    Pem {
        /// The file.
        path: PathBuf,
        /// What is missing or wrong.
        what: String,
    },
    /// rustls refused the certificate, key or CA.
    #[error("TLS configuration: {0}")]
    Config(String),
}

/// The PEM files of a server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerTlsFiles {
    /// The certificate chain, leaf first.
    pub cert: PathBuf,
    /// The private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// The CA a client's certificate must chain to (mutual TLS); `None`: no client
    /// certificate is asked for.
    pub client_ca: Option<PathBuf>,
}

impl ServerTlsFiles {
    fn paths(&self) -> Vec<&Path> {
        let mut paths = vec![self.cert.as_path(), self.key.as_path()];
        paths.extend(self.client_ca.as_deref());
        paths
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_owned(),
        source,
    })
}

fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem {
            path: path.to_owned(),
            what: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Pem {
            path: path.to_owned(),
            what: "no certificate in the file".into(),
        });
    }
    Ok(certs)
}

fn private_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = read(path)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| TlsError::Pem {
        path: path.to_owned(),
        what: format!("no private key: {e}"),
    })
}

fn roots(path: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in certificates(path)? {
        roots.add(cert).map_err(|e| TlsError::Pem {
            path: path.to_owned(),
            what: format!("not a usable CA certificate: {e}"),
        })?;
    }
    Ok(roots)
}

/// Builds a rustls server config from the files.
fn server_config(files: &ServerTlsFiles, alpn: &[&[u8]]) -> Result<ServerConfig, TlsError> {
    let provider = provider();
    let builder = ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let builder = match &files.client_ca {
        Some(ca) => {
            let verifier =
                WebPkiClientVerifier::builder_with_provider(Arc::new(roots(ca)?), provider)
                    .build()
                    .map_err(|e| TlsError::Config(format!("client CA {}: {e}", ca.display())))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder
        .with_single_cert(certificates(&files.cert)?, private_key(&files.key)?)
        .map_err(|e| {
            TlsError::Config(format!(
                "certificate {} with key {}: {e}",
                files.cert.display(),
                files.key.display()
            ))
        })?;
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(config)
}

/// When and how large each file was, to notice a change.
type Stamps = Vec<Option<(SystemTime, u64)>>;

fn stamps(files: &ServerTlsFiles) -> Stamps {
    stamps_of(&files.paths())
}

fn stamps_of(paths: &[&Path]) -> Stamps {
    paths
        .iter()
        .map(|p| {
            std::fs::metadata(p)
                .ok()
                .and_then(|m| Some((m.modified().ok()?, m.len())))
        })
        .collect()
}

/// A server's TLS configuration, reloadable; see the module doc.
#[derive(Debug)]
pub struct ServerTls {
    what: &'static str,
    files: ServerTlsFiles,
    alpn: Vec<Vec<u8>>,
    current: RwLock<Arc<ServerConfig>>,
    stamps: Mutex<Stamps>,
}

impl ServerTls {
    /// Reads the files for the listener named `what` (for logs), offering the ALPN protocols
    /// `alpn` (gRPC needs `h2`).
    pub fn load(
        what: &'static str,
        files: ServerTlsFiles,
        alpn: &[&[u8]],
    ) -> Result<Arc<Self>, TlsError> {
        let stamped = stamps(&files);
        let config = server_config(&files, alpn)?;
        Ok(Arc::new(Self {
            what,
            alpn: alpn.iter().map(|p| p.to_vec()).collect(),
            files,
            current: RwLock::new(Arc::new(config)),
            stamps: Mutex::new(stamped),
        }))
    }

    /// The files.
    pub fn files(&self) -> &ServerTlsFiles {
        &self.files
    }

    /// Whether clients must present a certificate.
    pub fn mutual(&self) -> bool {
        self.files.client_ca.is_some()
    }

    /// An acceptor with the current certificate.
    pub fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(Arc::clone(
            &self.current.read().unwrap_or_else(PoisonError::into_inner),
        ))
    }

    /// Reads the files again when they changed since the last (re)load, or always with
    /// `force`. `Ok(true)` when a new certificate is in use; on an error the previous one
    /// stays.
    pub fn reload_if_changed(&self, force: bool) -> Result<bool, TlsError> {
        let now = stamps(&self.files);
        {
            let seen = self.stamps.lock().unwrap_or_else(PoisonError::into_inner);
            if !force && *seen == now {
                return Ok(false);
            }
        }
        let alpn: Vec<&[u8]> = self.alpn.iter().map(Vec::as_slice).collect();
        let config = server_config(&self.files, &alpn);
        // The files are looked at again only when they change again: a broken file is
        // reported once, not every few seconds.
        *self.stamps.lock().unwrap_or_else(PoisonError::into_inner) = now;
        let config = config?;
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(config);
        Ok(true)
    }
}

/// Reloads `tls` when its files change (checked every [`RELOAD_CHECK`]) and on SIGHUP, until
/// `shutdown`.
pub async fn keep_reloaded(tls: Arc<ServerTls>, shutdown: CancellationToken) {
    let mut hangups = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
    loop {
        let hangup = async {
            match hangups.as_mut() {
                Some(signal) => signal.recv().await.is_some(),
                None => std::future::pending().await,
            }
        };
        let force = tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(RELOAD_CHECK) => false,
            got = hangup => got,
        };
        match tls.reload_if_changed(force) {
            Ok(true) => info!(
                listener = tls.what,
                cert = %tls.files.cert.display(),
                "TLS certificate reloaded: new connections use it"
            ),
            Ok(false) => {}
            Err(e) => warn!(
                listener = tls.what,
                error = %e,
                "TLS certificate not reloaded: the previous one stays in use"
            ),
        }
    }
}

/// The TLS connections of `listener`: each accepted socket's handshake runs in its own task
/// (at most [`MAX_HANDSHAKES`] at once, each within [`HANDSHAKE_TIMEOUT`]); the stream yields
/// the connections whose handshake succeeded, and ends at `shutdown`.
pub fn accept_tls(
    listener: TcpListener,
    tls: Arc<ServerTls>,
    shutdown: CancellationToken,
) -> impl Stream<Item = io::Result<TlsStream<TcpStream>>> + Send + 'static {
    let (tx, rx) = mpsc::channel(MAX_HANDSHAKES);
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES));
    tokio::spawn(async move {
        loop {
            let Ok(slot) = Arc::clone(&slots).acquire_owned().await else {
                return;
            };
            let accepted = tokio::select! {
                () = shutdown.cancelled() => return,
                accepted = listener.accept() => accepted,
            };
            let (socket, peer) = match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    // Out of descriptors and the like: wait a little rather than spin.
                    debug!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let _ = socket.set_nodelay(true);
            let acceptor = tls.acceptor();
            let tx = tx.clone();
            let what = tls.what;
            tokio::spawn(async move {
                let _slot = slot;
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(socket)).await {
                    Ok(Ok(stream)) => {
                        let _ = tx.send(Ok(stream)).await;
                    }
                    Ok(Err(e)) => {
                        debug!(listener = what, %peer, error = %e, "TLS handshake failed")
                    }
                    Err(_) => debug!(listener = what, %peer, "TLS handshake timed out"),
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// TLS to a Stratum server: the CA to trust and the name its certificate must carry. The CA
/// file is read again for the next connection when it changes (a rotation); a file that
/// cannot be used then keeps the previous CA.
#[derive(Clone)]
pub struct StratumTlsClient {
    ca: PathBuf,
    server_name: rustls::pki_types::ServerName<'static>,
    connector: Arc<Mutex<(Stamps, tokio_rustls::TlsConnector)>>,
}

impl std::fmt::Debug for StratumTlsClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StratumTlsClient")
            .field("ca", &self.ca)
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}

impl PartialEq for StratumTlsClient {
    fn eq(&self, other: &Self) -> bool {
        self.ca == other.ca && self.server_name == other.server_name
    }
}

impl Eq for StratumTlsClient {}

impl StratumTlsClient {
    /// A client trusting `ca` and expecting `server_name` (a host name or an IP address) in
    /// the server's certificate.
    pub fn new(ca: &Path, server_name: &str) -> Result<Self, TlsError> {
        let stamp = stamps_of(&[ca]);
        let connector = Self::connector(ca)?;
        let server_name = rustls::pki_types::ServerName::try_from(server_name.to_owned())
            .map_err(|e| TlsError::Config(format!("server name {server_name:?}: {e}")))?;
        Ok(Self {
            ca: ca.to_owned(),
            server_name,
            connector: Arc::new(Mutex::new((stamp, connector))),
        })
    }

    fn connector(ca: &Path) -> Result<tokio_rustls::TlsConnector, TlsError> {
        let config = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Config(e.to_string()))?
            .with_root_certificates(roots(ca)?)
            .with_no_client_auth();
        Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
    }

    /// Runs the TLS handshake on a connected socket.
    pub async fn connect(
        &self,
        socket: TcpStream,
    ) -> io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
        let connector = {
            let mut current = self
                .connector
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            let now = stamps_of(&[self.ca.as_path()]);
            if current.0 != now {
                current.0 = now;
                match Self::connector(&self.ca) {
                    Ok(connector) => {
                        info!(ca = %self.ca.display(), "sserver CA file changed: new connections trust it");
                        current.1 = connector;
                    }
                    Err(e) => {
                        warn!(error = %e, "sserver CA file changed but cannot be used: the previous CA stays")
                    }
                }
            }
            current.1.clone()
        };
        connector.connect(self.server_name.clone(), socket).await
    }
}

/// Joins `stream` to a new loopback TCP pair and returns the pair's inner end: what is written
/// to it reaches `stream`, and what `stream` delivers can be read from it. A task copies both
/// ways until either side ends, then closes both. Only the pair's own connection is taken: a
/// connection from anyone else to the short-lived loopback listener is dropped.
pub async fn bridge<S>(stream: S) -> io::Result<TcpStream>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
{
    let listener = TcpListener::bind((std::net::Ipv4Addr::LOCALHOST, 0)).await?;
    let outer = TcpStream::connect(listener.local_addr()?).await?;
    let local = outer.local_addr()?;
    let inner = loop {
        let (inner, from) = listener.accept().await?;
        if from == local {
            break inner;
        }
    };
    drop(listener);
    let _ = outer.set_nodelay(true);
    let _ = inner.set_nodelay(true);
    tokio::spawn(async move {
        let (mut stream_read, mut stream_write) = tokio::io::split(stream);
        let (mut outer_read, mut outer_write) = outer.into_split();
        // Whichever way ends first ends both: a closed session must close its peer.
        tokio::select! {
            _ = tokio::io::copy(&mut stream_read, &mut outer_write) => {}
            _ = tokio::io::copy(&mut outer_read, &mut stream_write) => {}
        }
        use tokio::io::AsyncWriteExt;
        let _ = stream_write.shutdown().await;
    });
    Ok(inner)
}

/// What a gRPC client needs to reach a TLS control service.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientTlsFiles {
    /// The CA that signed the control service's certificate; `None`: the system's roots are
    /// not used either, so a TLS endpoint needs it.
    pub ca: Option<PathBuf>,
    /// This client's certificate chain, for mutual TLS.
    pub cert: Option<PathBuf>,
    /// This client's key, for mutual TLS.
    pub key: Option<PathBuf>,
    /// The name to expect in the server's certificate, when it differs from the endpoint's
    /// host (an IP address, say).
    pub server_name: Option<String>,
}

/// Client TLS settings that do not fit together; names the setting (the `ControlTls*` keys
/// of the proxy and `switchyard-init`).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ClientTlsSettingsError {
    /// A certificate without its key, or a key without its certificate.
    #[error("ControlTlsCertFile and ControlTlsKeyFile go together: set both or neither")]
    HalfIdentity,
    /// TLS settings without the CA to trust.
    #[error("ControlTlsCaFile: required for TLS to the control plane (the CA of its certificate)")]
    NoCa,
}

/// When and how large a client's TLS files were: compare two to notice a rotation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FilesStamp(Stamps);

impl ClientTlsFiles {
    /// The files' stamp now; a client whose stamp changed reads them again for its next
    /// connections ([`Self::tonic_config`]).
    pub fn stamp(&self) -> FilesStamp {
        let paths: Vec<&Path> = [&self.ca, &self.cert, &self.key]
            .into_iter()
            .flatten()
            .map(PathBuf::as_path)
            .collect();
        FilesStamp(stamps_of(&paths))
    }

    /// The files from the `ControlTls*` settings: `None` when none is set (plain endpoints).
    pub fn from_settings(
        ca: Option<PathBuf>,
        cert: Option<PathBuf>,
        key: Option<PathBuf>,
        server_name: Option<String>,
    ) -> Result<Option<Self>, ClientTlsSettingsError> {
        let files = Self {
            ca,
            cert,
            key,
            server_name: server_name.filter(|n| !n.is_empty()),
        };
        if files == Self::default() {
            return Ok(None);
        }
        if files.cert.is_some() != files.key.is_some() {
            return Err(ClientTlsSettingsError::HalfIdentity);
        }
        if files.ca.is_none() {
            return Err(ClientTlsSettingsError::NoCa);
        }
        Ok(Some(files))
    }

    /// The tonic client TLS settings (read now: a rotated client certificate is picked up by
    /// a restart).
    pub fn tonic_config(&self) -> Result<tonic::transport::ClientTlsConfig, TlsError> {
        let mut config = tonic::transport::ClientTlsConfig::new();
        if let Some(ca) = &self.ca {
            // Checked here so that a bad file is a clear error at start, not a failed call.
            roots(ca)?;
            config = config.ca_certificate(tonic::transport::Certificate::from_pem(read(ca)?));
        }
        match (&self.cert, &self.key) {
            (Some(cert), Some(key)) => {
                certificates(cert)?;
                private_key(key)?;
                config = config.identity(tonic::transport::Identity::from_pem(
                    read(cert)?,
                    read(key)?,
                ));
            }
            (None, None) => {}
            _ => {
                return Err(TlsError::Config(
                    "a client certificate needs both its certificate and its key file".into(),
                ));
            }
        }
        if let Some(name) = &self.server_name {
            config = config.domain_name(name.clone());
        }
        Ok(config)
    }
}
