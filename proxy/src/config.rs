//! The proxy's configuration: the Go stratumSwitcher's JSON file with its original keys
//! (SPEC §8), plus Switchyard's own settings beside them (the control endpoints, limits,
//! metrics). [`SETTINGS_HELP`] documents every key; `switchyard-proxy --help` prints it.
//! [`ProxyConfig::settings`] validates the file into [`ProxySettings`], the values the proxy
//! runs on.

#![forbid(unsafe_code)]

use std::{collections::BTreeMap, net::SocketAddr, path::PathBuf, time::Duration};

use serde::Deserialize;
use switchyard_cli::{Secret, SecretError, resolve_secret};
use thiserror::Error;

use crate::{
    session_id::ChainType,
    upstream::{UpstreamLimits, UpstreamTarget},
};

/// Every setting, as printed by `--help` and mirrored in docs/operations.md.
pub const SETTINGS_HELP: &str = "\
CONFIG FILE KEYS (JSON; the Go stratumSwitcher's file is accepted as it is)

Switchyard's own settings:
  ControlEndpoints    The control replicas, e.g. [\"http://10.0.0.5:50051\"]. Required.
                      The proxy follows the first that answers and fails over to the next.
                      host:port alone means http://host:port.
  ProxyToken          Sent as \"authorization: Bearer <ProxyToken>\" to the control plane
                      (its ProxyToken). Default: none. SWITCHYARD_PROXY_TOKEN (or
                      --proxy-token) takes precedence.
  ProxyTokenFile      A file holding ProxyToken (one trailing line end trimmed), read at
                      start. Not with ProxyToken. SWITCHYARD_PROXY_TOKEN_FILE (or
                      --proxy-token-file) takes precedence.
  TlsListenAddr       A second miner listener speaking TLS (stratum+ssl://), beside
                      ListenAddr. Default: none.
  TlsCertFile, TlsKeyFile
                      Its PEM certificate chain and key; reloaded when the files change
                      or on SIGHUP. Required with TlsListenAddr.
  ControlTlsCaFile    For https:// ControlEndpoints: the CA of the control service's
                      certificate (PEM). Required for https.
  ControlTlsCertFile, ControlTlsKeyFile
                      This proxy's client certificate and key, when the control service
                      asks for one (its TlsClientCaFile). Default: none.
  ControlTlsServerName
                      The name expected in the control service's certificate, when the
                      endpoints name it by IP. Default: the endpoint's host.
  MetricsListenAddr   Prometheus endpoint (GET /metrics). Default: HTTPDebugListenAddr
                      when EnableHTTPDebug is true, else off.
  MaxSessions         The most miner connections at once; beyond it new ones are closed at
                      once. Default 50000 (each session holds two file descriptors).
  MaxLineBytes        The longest line a miner or sserver may send. Default 16384.
  FirstByteTimeoutSeconds
                      A miner must send its first byte (\"{\") within this. Default 15.
  HandshakeTimeoutSeconds
                      A miner must be logged in within this. Default 60.
  UpstreamTimeoutSeconds
                      The sserver's answers to subscribe and authorize within this.
                      Default 10.
  ReconnectWindowSeconds
                      A lost sserver is tried again, with backoff (0.25 s doubling to 5 s,
                      jittered), for this long while the miner stays connected and its new
                      lines wait (bounded); then the miner is closed. Default 60: an sserver
                      restart takes well under a minute, and miners hash on their last job
                      meanwhile. 0: one try.
  ReconnectTries      Also stop after this many tries. Default: no limit (the window ends it).
  ReadThroughMaxInFlight
                      A user the cache does not know is read from the control plane (which
                      reads its store) before the miner is told 201: at most this many such
                      reads at once; a login that finds none free within 1 s is told 201.
                      Default 32; 0 turns read-through off.
  ReadThroughNegativeSeconds
                      A name the control plane found unknown is not asked again for this
                      long (the cache is still asked first). Default 5; 0: not remembered.
  WriteTimeoutSeconds A miner or sserver that does not take a line within this is closed
                      (nothing is buffered without end). Default 30.
  DrainWindowSeconds  After a switch the old sserver connection is kept this long for the
                      shares of its jobs (each share goes to the sserver that issued its
                      job), or until it announces a clean job. 0 closes it once it has
                      answered what it was sent. Default 60.
  TcpKeepaliveSeconds TCP keepalive on miner and sserver sockets: probes start after this
                      many idle seconds, every 10 s, 6 of them, so a peer gone without a
                      FIN frees its session within about this plus a minute. 0 turns it
                      off. Default 60.
  CacheFile           Where the proxy keeps its cache between runs (with the stream's
                      revision and the server-ID lease): a restarted proxy serves from it
                      at once, resumes the stream from its revision, and keeps its leased
                      server ID when no control replica answers. Relative paths are from
                      the working directory. Default \"switchyard-proxy.cache\"; \"\" turns
                      it off.
  LogFormat           \"text\" or \"json\". Default \"text\".

Original keys (stratumSwitcher):
  ServerID            The proxy's server ID, 1..255; 0 (the default) leases one from the
                      control plane.
  ChainType           \"bitcoin\", \"decred-normal\", \"decred-gominer\" or \"ethereum\".
                      Default \"bitcoin\".
  ListenAddr          Where miners connect. Default \"0.0.0.0:1800\".
  StratumServerMap    The sservers by coin: {\"btc\": {\"URL\": \"10.0.0.2:1800\",
                      \"UserSuffix\": \"btc\"}}. UserSuffix defaults to the coin. Required.
                      \"TLS\": true connects over TLS, trusting \"TlsCaFile\" (required) and
                      expecting \"TlsServerName\" (default: the URL's host).
  EnableUserAutoReg   Unknown users are registered through the control plane; their
                      sessions wait (at most AutoRegMaxWaitUsers at once). Default false.
  AutoRegMaxWaitUsers Default 500.
  StratumServerCaseInsensitive
                      Sub-account names are lowercased. Default false.
  ZKUserCaseInsensitiveIndex
                      When set, a sub-account is replaced by its case-index entry (which the
                      control plane streams). Only whether it is set matters here.
  EnableHTTPDebug, HTTPDebugListenAddr
                      Serve the metrics on HTTPDebugListenAddr (see MetricsListenAddr).
  ZKBroker, ZKServerIDAssignDir, ZKSwitcherWatchDir, ZKAutoRegWatchDir
                      Accepted and ignored: the proxy never talks to ZooKeeper, the control
                      plane does (set them there).
";

/// One sserver of `StratumServerMap`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct StratumServer {
    /// `host:port` of the coin's sserver.
    #[serde(rename = "URL")]
    pub url: String,
    /// The suffix of the authorize retry `sub_SUFFIX.miner`; the coin when empty.
    #[serde(rename = "UserSuffix")]
    pub user_suffix: String,
    /// Connect to the sserver over TLS.
    #[serde(rename = "TLS")]
    pub tls: bool,
    /// With `TLS`: the CA of the sserver's certificate.
    #[serde(rename = "TlsCaFile")]
    pub tls_ca_file: Option<PathBuf>,
    /// With `TLS`: the name its certificate carries; the URL's host by default.
    #[serde(rename = "TlsServerName")]
    pub tls_server_name: Option<String>,
}

/// The configuration file, key for key; see [`SETTINGS_HELP`].
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
#[allow(missing_docs)]
pub struct ProxyConfig {
    #[serde(rename = "ControlEndpoints")]
    pub control_endpoints: Vec<String>,
    #[serde(rename = "ProxyToken")]
    pub proxy_token: Option<Secret>,
    #[serde(rename = "ProxyTokenFile")]
    pub proxy_token_file: Option<PathBuf>,
    #[serde(rename = "TlsListenAddr")]
    pub tls_listen_addr: Option<String>,
    #[serde(rename = "TlsCertFile")]
    pub tls_cert_file: Option<PathBuf>,
    #[serde(rename = "TlsKeyFile")]
    pub tls_key_file: Option<PathBuf>,
    #[serde(rename = "ControlTlsCaFile")]
    pub control_tls_ca_file: Option<PathBuf>,
    #[serde(rename = "ControlTlsCertFile")]
    pub control_tls_cert_file: Option<PathBuf>,
    #[serde(rename = "ControlTlsKeyFile")]
    pub control_tls_key_file: Option<PathBuf>,
    #[serde(rename = "ControlTlsServerName")]
    pub control_tls_server_name: Option<String>,
    #[serde(rename = "MetricsListenAddr")]
    pub metrics_listen_addr: Option<String>,
    #[serde(rename = "MaxSessions")]
    pub max_sessions: Option<usize>,
    #[serde(rename = "MaxLineBytes")]
    pub max_line_bytes: Option<usize>,
    #[serde(rename = "FirstByteTimeoutSeconds")]
    pub first_byte_timeout_seconds: Option<u64>,
    #[serde(rename = "HandshakeTimeoutSeconds")]
    pub handshake_timeout_seconds: Option<u64>,
    #[serde(rename = "UpstreamTimeoutSeconds")]
    pub upstream_timeout_seconds: Option<u64>,
    #[serde(rename = "ReconnectTries")]
    pub reconnect_tries: Option<u32>,
    #[serde(rename = "ReconnectWindowSeconds")]
    pub reconnect_window_seconds: Option<u64>,
    #[serde(rename = "ReadThroughMaxInFlight")]
    pub read_through_max_in_flight: Option<usize>,
    #[serde(rename = "ReadThroughNegativeSeconds")]
    pub read_through_negative_seconds: Option<u64>,
    #[serde(rename = "WriteTimeoutSeconds")]
    pub write_timeout_seconds: Option<u64>,
    #[serde(rename = "DrainWindowSeconds")]
    pub drain_window_seconds: Option<u64>,
    #[serde(rename = "TcpKeepaliveSeconds")]
    pub tcp_keepalive_seconds: Option<u64>,
    #[serde(rename = "LogFormat")]
    pub log_format: Option<String>,
    #[serde(rename = "CacheFile")]
    pub cache_file: Option<String>,

    #[serde(rename = "ServerID")]
    pub server_id: u32,
    #[serde(rename = "ChainType")]
    pub chain_type: Option<String>,
    #[serde(rename = "ListenAddr")]
    pub listen_addr: Option<String>,
    #[serde(rename = "StratumServerMap")]
    pub stratum_server_map: BTreeMap<String, StratumServer>,
    #[serde(rename = "EnableUserAutoReg")]
    pub enable_user_auto_reg: bool,
    #[serde(rename = "AutoRegMaxWaitUsers")]
    pub auto_reg_max_wait_users: Option<usize>,
    #[serde(rename = "StratumServerCaseInsensitive")]
    pub case_insensitive: bool,
    #[serde(rename = "ZKUserCaseInsensitiveIndex")]
    pub zk_case_index_dir: String,
    #[serde(rename = "EnableHTTPDebug")]
    pub enable_http_debug: bool,
    #[serde(rename = "HTTPDebugListenAddr")]
    pub http_debug_listen_addr: String,
    #[serde(rename = "ZKBroker")]
    pub zk_broker: Vec<String>,
    #[serde(rename = "ZKServerIDAssignDir")]
    pub zk_server_id_assign_dir: String,
    #[serde(rename = "ZKSwitcherWatchDir")]
    pub zk_switcher_watch_dir: String,
    #[serde(rename = "ZKAutoRegWatchDir")]
    pub zk_auto_reg_watch_dir: String,
}

/// The default of `DrainWindowSeconds`. After a switch the new coin's first job reaches the
/// miner with `clean_jobs`, and miners drop the old work at once: the shares of old jobs that
/// still come are those already found, within a second or two even behind a mining proxy.
/// sservers accept a job's shares for minutes (btcpool: until the job is 300 s old or a new
/// block), so 60 s is well inside what the old sserver still takes, covers slow firmware and
/// multiplexing proxies many times over, and holds the extra descriptor of a mass switch for a
/// minute, not five.
pub const DEFAULT_DRAIN_WINDOW_SECONDS: u64 = 60;

/// The default of `ReconnectWindowSeconds`: a restarting sserver (btcpool's reconnects to
/// Kafka and ZooKeeper and reads its job stream again) is back well within a minute, and a
/// miner keeps hashing on its last job meanwhile, so a minute keeps miners through a restart
/// and still closes them soon enough to fail over to a backup pool when the sserver is really
/// gone.
pub const DEFAULT_RECONNECT_WINDOW_SECONDS: u64 = 60;

/// The default of `CacheFile`: in the working directory, as the Go switcher kept its
/// `runtime.json` there.
pub const DEFAULT_CACHE_FILE: &str = "switchyard-proxy.cache";

/// The default of `TcpKeepaliveSeconds`.
pub const DEFAULT_TCP_KEEPALIVE_SECONDS: u64 = 60;

const KNOWN_KEYS: &[&str] = &[
    "ControlEndpoints",
    "ProxyToken",
    "ProxyTokenFile",
    "TlsListenAddr",
    "TlsCertFile",
    "TlsKeyFile",
    "ControlTlsCaFile",
    "ControlTlsCertFile",
    "ControlTlsKeyFile",
    "ControlTlsServerName",
    "MetricsListenAddr",
    "MaxSessions",
    "MaxLineBytes",
    "FirstByteTimeoutSeconds",
    "HandshakeTimeoutSeconds",
    "UpstreamTimeoutSeconds",
    "ReconnectTries",
    "ReconnectWindowSeconds",
    "ReadThroughMaxInFlight",
    "ReadThroughNegativeSeconds",
    "WriteTimeoutSeconds",
    "DrainWindowSeconds",
    "TcpKeepaliveSeconds",
    "LogFormat",
    "CacheFile",
    "ServerID",
    "ChainType",
    "ListenAddr",
    "StratumServerMap",
    "EnableUserAutoReg",
    "AutoRegMaxWaitUsers",
    "StratumServerCaseInsensitive",
    "ZKUserCaseInsensitiveIndex",
    "EnableHTTPDebug",
    "HTTPDebugListenAddr",
    "ZKBroker",
    "ZKServerIDAssignDir",
    "ZKSwitcherWatchDir",
    "ZKAutoRegWatchDir",
];

/// A configuration that cannot work.
#[derive(Debug, Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not the expected JSON.
    #[error("cannot parse {path}: {source}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// Why.
        source: serde_json::Error,
    },
    /// The proxy token's file cannot be read, or the token is set twice.
    #[error("config key {0}")]
    Secret(#[from] SecretError),
    /// A setting is invalid.
    #[error("config key {key}: {message}")]
    Invalid {
        /// The key.
        key: &'static str,
        /// What is wrong.
        message: String,
    },
}

fn invalid(key: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key,
        message: message.into(),
    }
}

/// Text or JSON logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// The validated settings the proxy runs on.
#[derive(Debug, Clone)]
pub struct ProxySettings {
    /// The chain type.
    pub chain: ChainType,
    /// The fixed server ID, or `None` to lease one.
    pub server_id: Option<u8>,
    /// Where miners connect.
    pub listen_addr: SocketAddr,
    /// The sservers by coin.
    pub upstreams: BTreeMap<String, UpstreamTarget>,
    /// The control replicas.
    pub control_endpoints: Vec<String>,
    /// The control plane's ProxyToken.
    pub proxy_token: Option<Secret>,
    /// TLS to `https://` control endpoints, when configured.
    pub control_tls: Option<switchyard_tls::ClientTlsFiles>,
    /// The TLS miner listener and its certificate, when configured.
    pub miner_tls: Option<(SocketAddr, switchyard_tls::ServerTlsFiles)>,
    /// The Prometheus endpoint.
    pub metrics_addr: Option<SocketAddr>,
    /// Auto-registration of unknown users.
    pub auto_reg: bool,
    /// The most sessions waiting for an auto-registration.
    pub auto_reg_max_wait: usize,
    /// Lowercase sub-accounts.
    pub case_insensitive: bool,
    /// Apply the case index to sub-accounts.
    pub case_index: bool,
    /// The most sessions.
    pub max_sessions: usize,
    /// The longest line.
    pub max_line: usize,
    /// The first byte's deadline.
    pub first_byte_timeout: Duration,
    /// The login's deadline.
    pub handshake_timeout: Duration,
    /// The sserver contract's limits.
    pub upstream_limits: UpstreamLimits,
    /// How long a lost upstream is tried again (with backoff) before the miner is closed.
    pub reconnect_window: Duration,
    /// The most tries after a lost upstream (`u32::MAX`: the window alone ends them).
    pub reconnect_tries: u32,
    /// Read-through lookups at once (0: off).
    pub read_through_max_in_flight: usize,
    /// How long a name found unknown is not asked again.
    pub read_through_negative: Duration,
    /// The deadline of one write to a peer.
    pub write_timeout: Duration,
    /// How long an old upstream takes the shares of its jobs after a switch.
    pub drain_window: Duration,
    /// Idle time before TCP keepalive probes on miner and upstream sockets; `None`: off.
    pub tcp_keepalive: Option<Duration>,
    /// The log format.
    pub log_format: LogFormat,
    /// Where the cache is kept between runs (`None`: not kept).
    pub cache_file: Option<PathBuf>,
}

impl ProxyConfig {
    /// Parses a config file's text. Returns the config and the top-level keys it does not know.
    pub fn from_json(text: &str) -> Result<(Self, Vec<String>), serde_json::Error> {
        let value: serde_json::Value = serde_json::from_str(text)?;
        let unknown = value
            .as_object()
            .map(|map| {
                map.keys()
                    .filter(|k| !KNOWN_KEYS.contains(&k.as_str()))
                    .cloned()
                    .collect()
            })
            .unwrap_or_default();
        Ok((serde_json::from_value(value)?, unknown))
    }

    /// Reads and parses a config file.
    pub fn from_file(path: &std::path::Path) -> Result<(Self, Vec<String>), ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::from_json(&text).map_err(|source| ConfigError::Parse {
            path: path.to_owned(),
            source,
        })
    }

    /// The keys that a Go config carries and the proxy ignores (they belong to the control
    /// plane now), for a log line.
    pub fn ignored_keys(&self) -> Vec<&'static str> {
        let mut keys = Vec::new();
        if !self.zk_broker.is_empty() {
            keys.push("ZKBroker");
        }
        if !self.zk_server_id_assign_dir.is_empty() {
            keys.push("ZKServerIDAssignDir");
        }
        if !self.zk_switcher_watch_dir.is_empty() {
            keys.push("ZKSwitcherWatchDir");
        }
        if !self.zk_auto_reg_watch_dir.is_empty() {
            keys.push("ZKAutoRegWatchDir");
        }
        keys
    }

    /// Validates the file into the settings the proxy runs on.
    pub fn settings(&self) -> Result<ProxySettings, ConfigError> {
        let chain = self
            .chain_type
            .as_deref()
            .unwrap_or("bitcoin")
            .parse::<ChainType>()
            .map_err(|e| invalid("ChainType", e.to_string()))?;
        let server_id = match self.server_id {
            0 => None,
            id @ 1..=255 => Some(id as u8),
            other => return Err(invalid("ServerID", format!("{other} is outside 0..255"))),
        };
        let addr = |key: &'static str, value: &str| {
            value
                .parse::<SocketAddr>()
                .map_err(|e| invalid(key, format!("{value:?} is not an address: {e}")))
        };
        let listen_addr = addr(
            "ListenAddr",
            self.listen_addr.as_deref().unwrap_or("0.0.0.0:1800"),
        )?;
        if self.stratum_server_map.is_empty() {
            return Err(invalid("StratumServerMap", "at least one coin is required"));
        }
        let mut upstreams = BTreeMap::new();
        for (coin, server) in &self.stratum_server_map {
            if coin.is_empty() || coin.contains('/') {
                return Err(invalid("StratumServerMap", format!("bad coin {coin:?}")));
            }
            let url = server.url.trim();
            let url = url.strip_prefix("tcp://").unwrap_or(url);
            if url.rsplit_once(':').is_none_or(|(host, port)| {
                host.is_empty() || port.parse::<u16>().map_or(true, |p| p == 0)
            }) {
                return Err(invalid(
                    "StratumServerMap",
                    format!("{coin}: URL {:?} is not host:port", server.url),
                ));
            }
            let suffix = if server.user_suffix.is_empty() {
                coin.clone()
            } else {
                server.user_suffix.clone()
            };
            upstreams.insert(
                coin.clone(),
                UpstreamTarget {
                    coin: coin.clone(),
                    addr: url.to_string(),
                    user_suffix: suffix,
                    tls: stratum_tls(coin, server, url)?,
                },
            );
        }
        if self.control_endpoints.is_empty() {
            return Err(invalid(
                "ControlEndpoints",
                "at least one control endpoint is required (e.g. \"http://127.0.0.1:50051\")",
            ));
        }
        let control_endpoints = self
            .control_endpoints
            .iter()
            .map(|endpoint| control_endpoint(endpoint))
            .collect::<Result<Vec<_>, _>>()?;
        let metrics_addr = match (&self.metrics_listen_addr, self.enable_http_debug) {
            (Some(a), _) if !a.is_empty() => Some(addr("MetricsListenAddr", a)?),
            (_, true) => Some(addr("HTTPDebugListenAddr", &self.http_debug_listen_addr)?),
            _ => None,
        };
        let seconds = |key: &'static str, value: Option<u64>, default: u64| match value {
            Some(0) => Err(invalid(key, "must be at least 1")),
            Some(v) if v > 86_400 => Err(invalid(key, "must be at most 86400")),
            v => Ok(Duration::from_secs(v.unwrap_or(default))),
        };
        let max_line = self
            .max_line_bytes
            .unwrap_or(crate::framing::DEFAULT_MAX_LINE);
        if !(256..=1 << 20).contains(&max_line) {
            return Err(invalid("MaxLineBytes", "must be within 256..1048576"));
        }
        let max_sessions = self.max_sessions.unwrap_or(50_000);
        if max_sessions == 0 {
            return Err(invalid("MaxSessions", "must be at least 1"));
        }
        let log_format = match self.log_format.as_deref().unwrap_or("text") {
            "text" => LogFormat::Text,
            "json" => LogFormat::Json,
            other => return Err(invalid("LogFormat", format!("{other:?}: text or json"))),
        };
        let upstream_timeout =
            seconds("UpstreamTimeoutSeconds", self.upstream_timeout_seconds, 10)?;
        let tcp_keepalive = match self.tcp_keepalive_seconds {
            Some(0) => None,
            Some(v) if v > 7_200 => {
                return Err(invalid("TcpKeepaliveSeconds", "must be at most 7200"));
            }
            v => Some(Duration::from_secs(
                v.unwrap_or(DEFAULT_TCP_KEEPALIVE_SECONDS),
            )),
        };
        Ok(ProxySettings {
            chain,
            server_id,
            listen_addr,
            upstreams,
            control_endpoints,
            proxy_token: resolve_secret(
                self.proxy_token.clone(),
                self.proxy_token_file.as_deref(),
                "ProxyToken",
                "ProxyTokenFile",
            )?,
            control_tls: self.control_tls()?,
            miner_tls: self.miner_tls()?,
            metrics_addr,
            auto_reg: self.enable_user_auto_reg,
            auto_reg_max_wait: self.auto_reg_max_wait_users.unwrap_or(500),
            case_insensitive: self.case_insensitive,
            case_index: !self.zk_case_index_dir.is_empty(),
            max_sessions,
            max_line,
            first_byte_timeout: seconds(
                "FirstByteTimeoutSeconds",
                self.first_byte_timeout_seconds,
                15,
            )?,
            handshake_timeout: seconds(
                "HandshakeTimeoutSeconds",
                self.handshake_timeout_seconds,
                60,
            )?,
            upstream_limits: UpstreamLimits {
                connect_timeout: upstream_timeout.min(Duration::from_secs(5)),
                handshake_timeout: upstream_timeout,
                max_line,
                tcp_keepalive,
            },
            reconnect_window: match self.reconnect_window_seconds {
                Some(v) if v > 3_600 => {
                    return Err(invalid("ReconnectWindowSeconds", "must be at most 3600"));
                }
                v => Duration::from_secs(v.unwrap_or(DEFAULT_RECONNECT_WINDOW_SECONDS)),
            },
            reconnect_tries: match self.reconnect_tries {
                Some(0) => return Err(invalid("ReconnectTries", "must be at least 1")),
                Some(n) => n,
                None => u32::MAX,
            },
            read_through_max_in_flight: match self.read_through_max_in_flight {
                Some(v) if v > 4_096 => {
                    return Err(invalid("ReadThroughMaxInFlight", "must be at most 4096"));
                }
                v => v.unwrap_or(32),
            },
            read_through_negative: match self.read_through_negative_seconds {
                Some(v) if v > 3_600 => {
                    return Err(invalid(
                        "ReadThroughNegativeSeconds",
                        "must be at most 3600",
                    ));
                }
                v => Duration::from_secs(v.unwrap_or(5)),
            },
            write_timeout: seconds("WriteTimeoutSeconds", self.write_timeout_seconds, 30)?,
            drain_window: match self.drain_window_seconds {
                Some(v) if v > 3_600 => {
                    return Err(invalid("DrainWindowSeconds", "must be at most 3600"));
                }
                v => Duration::from_secs(v.unwrap_or(DEFAULT_DRAIN_WINDOW_SECONDS)),
            },
            tcp_keepalive,
            log_format,
            cache_file: match self.cache_file.as_deref() {
                None => Some(PathBuf::from(DEFAULT_CACHE_FILE)),
                Some("") => None,
                Some(path) => Some(PathBuf::from(path)),
            },
        })
    }
}

impl ProxyConfig {
    /// The TLS miner listener, checked for consistency.
    fn miner_tls(
        &self,
    ) -> Result<Option<(SocketAddr, switchyard_tls::ServerTlsFiles)>, ConfigError> {
        match (
            self.tls_listen_addr.as_deref().filter(|a| !a.is_empty()),
            &self.tls_cert_file,
            &self.tls_key_file,
        ) {
            (None, None, None) => Ok(None),
            (Some(a), Some(cert), Some(key)) => Ok(Some((
                a.parse::<SocketAddr>().map_err(|e| {
                    invalid("TlsListenAddr", format!("{a:?} is not an address: {e}"))
                })?,
                switchyard_tls::ServerTlsFiles {
                    cert: cert.clone(),
                    key: key.clone(),
                    client_ca: None,
                },
            ))),
            (None, _, _) => Err(invalid(
                "TlsListenAddr",
                "TlsCertFile/TlsKeyFile are set but no TLS listener is",
            )),
            (Some(_), None, _) => Err(invalid("TlsCertFile", "required with TlsListenAddr")),
            (Some(_), _, None) => Err(invalid("TlsKeyFile", "required with TlsListenAddr")),
        }
    }

    /// The TLS files for the control endpoints, checked for consistency.
    fn control_tls(&self) -> Result<Option<switchyard_tls::ClientTlsFiles>, ConfigError> {
        switchyard_tls::ClientTlsFiles::from_settings(
            self.control_tls_ca_file.clone(),
            self.control_tls_cert_file.clone(),
            self.control_tls_key_file.clone(),
            self.control_tls_server_name.clone(),
        )
        .map_err(|e| invalid("ControlTls*", e.to_string()))
    }
}

/// TLS to one sserver of `StratumServerMap`, when its entry turns it on.
fn stratum_tls(
    coin: &str,
    server: &StratumServer,
    url: &str,
) -> Result<Option<switchyard_tls::StratumTlsClient>, ConfigError> {
    let bad = |message: String| invalid("StratumServerMap", format!("{coin}: {message}"));
    if !server.tls {
        if server.tls_ca_file.is_some() || server.tls_server_name.is_some() {
            return Err(bad("TlsCaFile/TlsServerName without \"TLS\": true".into()));
        }
        return Ok(None);
    }
    let Some(ca) = &server.tls_ca_file else {
        return Err(bad(
            "\"TLS\": true needs TlsCaFile (the CA of the sserver's certificate)".into(),
        ));
    };
    let host = url.rsplit_once(':').map_or(url, |(host, _)| host);
    let name = server
        .tls_server_name
        .as_deref()
        .unwrap_or(host.trim_start_matches('[').trim_end_matches(']'));
    switchyard_tls::StratumTlsClient::new(ca, name)
        .map(Some)
        .map_err(|e| bad(e.to_string()))
}

/// A `ControlEndpoints` entry as a URL (see [`switchyard_cli::control_endpoint_url`]).
fn control_endpoint(endpoint: &str) -> Result<String, ConfigError> {
    switchyard_cli::control_endpoint_url(endpoint)
        .map_err(|e| invalid("ControlEndpoints", e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const GO_CONFIG: &str = r#"{
        "ServerID": 0,
        "ChainType": "bitcoin",
        "ListenAddr": "0.0.0.0:18080",
        "StratumServerMap": {
            "btc": {"URL": "127.0.0.1:1800", "UserSuffix": "btc"},
            "bcc": {"URL": "127.0.0.1:1801", "UserSuffix": ""}
        },
        "ZKBroker": ["127.0.0.1:2181"],
        "ZKServerIDAssignDir": "/stratumSwitcher/btcbcc_id/",
        "ZKSwitcherWatchDir": "/stratumSwitcher/btcbcc/",
        "EnableUserAutoReg": true,
        "ZKAutoRegWatchDir": "/stratumSwitcher/btcbcc_autoreg/",
        "AutoRegMaxWaitUsers": 10,
        "StratumServerCaseInsensitive": false,
        "ZKUserCaseInsensitiveIndex": "/stratumSwitcher/user_case/",
        "EnableHTTPDebug": true,
        "HTTPDebugListenAddr": "127.0.0.1:2222",
        "ControlEndpoints": ["http://127.0.0.1:50051"],
        "SomethingNew": 1
    }"#;

    #[test]
    fn reads_the_go_proxy_file() {
        let (config, unknown) = ProxyConfig::from_json(GO_CONFIG).expect("parse");
        assert_eq!(unknown, vec!["SomethingNew".to_string()]);
        let settings = config.settings().expect("valid");
        assert_eq!(settings.server_id, None);
        assert_eq!(settings.upstreams["bcc"].user_suffix, "bcc");
        assert_eq!(settings.upstreams["btc"].addr, "127.0.0.1:1800");
        assert!(settings.auto_reg && settings.case_index && !settings.case_insensitive);
        assert_eq!(settings.auto_reg_max_wait, 10);
        assert_eq!(settings.metrics_addr, "127.0.0.1:2222".parse().ok());
        assert_eq!(config.ignored_keys().len(), 4);
        assert_eq!(
            settings.drain_window,
            Duration::from_secs(DEFAULT_DRAIN_WINDOW_SECONDS)
        );
        assert_eq!(
            settings.tcp_keepalive,
            Some(Duration::from_secs(DEFAULT_TCP_KEEPALIVE_SECONDS))
        );
        assert_eq!(
            settings.upstream_limits.tcp_keepalive,
            settings.tcp_keepalive
        );
    }

    #[test]
    fn drain_window_and_keepalive_are_set_or_turned_off() {
        let mut value: serde_json::Value = serde_json::from_str(GO_CONFIG).expect("json");
        value["DrainWindowSeconds"] = serde_json::json!(0);
        value["TcpKeepaliveSeconds"] = serde_json::json!(0);
        let (config, _) = ProxyConfig::from_json(&value.to_string()).expect("parse");
        let settings = config.settings().expect("valid");
        assert_eq!(settings.drain_window, Duration::ZERO);
        assert_eq!(settings.tcp_keepalive, None);
        value["DrainWindowSeconds"] = serde_json::json!(120);
        value["TcpKeepaliveSeconds"] = serde_json::json!(30);
        let (config, _) = ProxyConfig::from_json(&value.to_string()).expect("parse");
        let settings = config.settings().expect("valid");
        assert_eq!(settings.drain_window, Duration::from_secs(120));
        assert_eq!(settings.tcp_keepalive, Some(Duration::from_secs(30)));
    }

    #[test]
    fn control_endpoints_without_a_scheme_are_http() {
        let mut value: serde_json::Value = serde_json::from_str(GO_CONFIG).expect("json");
        value["ControlEndpoints"] = serde_json::json!([
            "10.0.0.5:50051",
            "http://10.0.0.6:50051",
            "https://control.example:443",
            "control-3.pool:50051"
        ]);
        let (config, _) = ProxyConfig::from_json(&value.to_string()).expect("parse");
        let settings = config.settings().expect("valid");
        assert_eq!(
            settings.control_endpoints,
            [
                "http://10.0.0.5:50051",
                "http://10.0.0.6:50051",
                "https://control.example:443",
                "http://control-3.pool:50051"
            ]
        );
    }

    #[test]
    fn refuses_settings_that_cannot_work() {
        for (patch, key) in [
            (r#"{"ServerID": 256}"#, "ServerID"),
            (r#"{"ChainType": "dogecoin"}"#, "ChainType"),
            (r#"{"StratumServerMap": {}}"#, "StratumServerMap"),
            (
                r#"{"StratumServerMap": {"btc": {"URL": "nohost"}}}"#,
                "StratumServerMap",
            ),
            (r#"{"ControlEndpoints": []}"#, "ControlEndpoints"),
            (
                r#"{"ControlEndpoints": ["grpc://10.0.0.1:50051"]}"#,
                "ControlEndpoints",
            ),
            (r#"{"ControlEndpoints": ["10.0.0.1"]}"#, "ControlEndpoints"),
            (r#"{"ControlEndpoints": [":50051"]}"#, "ControlEndpoints"),
            (r#"{"ListenAddr": "x"}"#, "ListenAddr"),
            (r#"{"MaxLineBytes": 10}"#, "MaxLineBytes"),
            (
                r#"{"HandshakeTimeoutSeconds": 0}"#,
                "HandshakeTimeoutSeconds",
            ),
            (r#"{"DrainWindowSeconds": 3601}"#, "DrainWindowSeconds"),
            (r#"{"TcpKeepaliveSeconds": 7201}"#, "TcpKeepaliveSeconds"),
        ] {
            let mut value: serde_json::Value = serde_json::from_str(GO_CONFIG).expect("json");
            let patch: serde_json::Value = serde_json::from_str(patch).expect("json");
            for (k, v) in patch.as_object().expect("object") {
                value[k] = v.clone();
            }
            let (config, _) = ProxyConfig::from_json(&value.to_string()).expect("parse");
            match config.settings() {
                Err(ConfigError::Invalid { key: k, .. }) => assert_eq!(k, key),
                other => panic!("{patch}: expected an error on {key}, got {other:?}"),
            }
        }
    }
}
