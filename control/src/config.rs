//! The control service's configuration: the JSON file of the Go switcher's API server and
//! initUserCoin, with their original keys (SPEC §8), plus Switchyard's own settings beside them.
//! [`SETTINGS_HELP`] documents every key; `switchyard-control --help` prints it.

use std::{
    collections::{BTreeMap, HashMap},
    net::SocketAddr,
    path::PathBuf,
    time::Duration,
};

use serde::Deserialize;
use switchyard_cli::{Secret, SecretError, resolve_secret};
use switchyard_initializer::{http_server::HttpLimits, puller::PullerSettings};
use thiserror::Error;

use crate::{
    core::{CoreSettings, SafetyPeriod},
    cron::UserCoinMapPull,
    leases::CHAIN_TYPES,
    limits::ServerLimits,
    store::zookeeper::{ZkSettings, normalize_dir},
    subpool::SubPoolSettings,
    validate::{CoinSet, InvalidInput},
};

/// The default `GrpcListenAddr`: loopback only, so that a service started without tokens is
/// not open to the network.
pub const DEFAULT_GRPC_LISTEN_ADDR: &str = "127.0.0.1:50051";

/// Every setting, as printed by `--help` and mirrored in docs/.
pub const SETTINGS_HELP: &str = "\
CONFIG FILE KEYS (JSON; the Go switcher's files are accepted as they are)

Switchyard's own settings:
  GrpcListenAddr      gRPC address (SwitcherAdmin, ProxyControl, health, reflection).
                      Default \"127.0.0.1:50051\". On any other than a loopback address
                      the service refuses to start without AdminToken and ProxyToken.
  TlsCertFile, TlsKeyFile
                      PEM certificate chain and key: gRPC is served over TLS (rustls).
                      Reloaded when the files change or on SIGHUP. Default: none (plain).
  HttpTlsCertFile, HttpTlsKeyFile
                      PEM certificate chain and key: the HTTP switch and user-list API
                      (ListenAddr) is served over TLS (https). Reloaded like TlsCertFile.
                      Default: none (plain).
  TlsClientCaFile     With TLS: clients (proxies, switchyard-init, grpcurl) must present a
                      certificate signed by this CA (mutual TLS). Default: none.
  Store               \"embedded\" or \"zookeeper\". Default: \"zookeeper\" when ZKBroker
                      is set, else \"embedded\".
  DataDir             Directory of the embedded store. Default \"./switchyard-data\".
  AdminToken          When set, SwitcherAdmin calls must carry
                      \"authorization: Bearer <AdminToken>\". Default: none (allowed
                      only with a loopback GrpcListenAddr, with a warning).
  AdminTokenFile      A file holding AdminToken (one trailing line end trimmed), read at
                      start. Not with AdminToken.
  ProxyToken          The same for ProxyControl calls. Default: none (loopback only).
  ProxyTokenFile      A file holding ProxyToken. Not with ProxyToken.
  LeaseTTLSeconds     A proxy server-ID lease not renewed for this long is released.
                      Default 30.
  MaxSwitchBatch      The most entries one SwitchCoins call may carry. Default 10000.
  LogFormat           \"text\" or \"json\". Default \"text\".
  MetricsListenAddr   Prometheus endpoint (GET /metrics, OpenMetrics text), e.g.
                      \"0.0.0.0:9101\". No credentials on any address: metrics move no
                      hashrate and name no user. Default: none (not served).
  ZKServerIDAssignDirs
                      Server-ID lease directories by chain type, e.g.
                      {\"bitcoin\": \"/stratumSwitcher/bitcoin_swid/\"}. Default
                      \"/stratumSwitcher/<chain type>_swid/\" for each chain type.
  ZKServerIDAssignDir One directory for every chain type (as in a Go proxy's config):
                      IDs are then unique across chain types. Overridden per chain type by
                      ZKServerIDAssignDirs.
  ZKSwitchyardDir     ZooKeeper directory of Switchyard's own nodes: replica barriers, and below
                      it + the watch directory's path, this deployment's held-back switches,
                      first-seen times and pull position.
                      Default \"/switchyard/\".
  ZKSessionTimeoutSeconds
                      ZooKeeper session timeout. Default 15.
  ZKRequestTimeoutSeconds
                      How long one ZooKeeper request may take. Default 10.
  ZKReconcileSeconds  How often the whole ZooKeeper state is re-read as a backstop to
                      watches (it is also re-read after every reconnect). Default 300.
  AutoRegMaxPending   The most auto-registrations pending at once; beyond it a proxy's
                      request is refused (RESOURCE_EXHAUSTED). Default 1000.
  AutoRegTimeoutSeconds
                      The bound on one exchange with UserAutoRegAPI.URL, answer included.
                      Default 10.
  AutoRegMaxConcurrent
                      Exchanges with UserAutoRegAPI.URL in flight at once per replica (the
                      IntervalSeconds wait holds none). Default 16.
  AutoRegMaxPendingPerProxy
                      The most auto-registrations pending at once from one proxy (its
                      server ID, read from the session ID). Default 250.
  AutoRegMaxPendingPerPattern
                      The most auto-registrations pending at once for names of one
                      pattern (the name without trailing digits, lowercased, its first
                      5 characters: test1, test2, ... share \"test\"). Default 100.
  AutoRegRefusedSeconds
                      A name the backend refused (puid <= 0) is remembered this long: a
                      request for it is answered NOT_FOUND at once, without a POST.
                      0: not remembered. Default 300.

Bounds of the servers (every value at least 1):
  GrpcMaxConcurrentRequests
                      gRPC calls handled at once over all connections; one more is refused
                      at once (RESOURCE_EXHAUSTED). A stream counts only while it starts.
                      Default 256.
  GrpcMaxConcurrentRequestsPerConnection
                      gRPC calls handled at once per connection; more wait. Default 64.
  GrpcRequestTimeoutSeconds
                      How long a unary gRPC call may take, its request's reading included
                      (then CANCELLED); WatchSwitches streams are not cut. Default 60.
  MaxWatchStreams     WatchSwitches streams open at once; one more is refused
                      (RESOURCE_EXHAUSTED). Default 256.
  WatchBufferBytes    Bytes of stream messages buffered for a watcher that does not read;
                      its stream then waits. Default 4194304 (4 MiB).
  HTTPHeaderReadTimeoutSeconds
                      ListenAddr: how long a client may take to send a request's headers
                      (or keep an idle connection); the connection is then closed.
                      Default 10.
  HTTPBodyReadTimeoutSeconds
                      ListenAddr: how long a client may take to send a request body after
                      its headers; the request then fails and the connection is closed.
                      Default 30.
  HTTPMaxConnections  ListenAddr: connections served at once; more wait. Default 512.
  UserListAPIPageSize Users per answer of the user-list API (GET /?coin=&last_id=): the
                      lowest puids above last_id; the next poll continues. Default 100000.

Original keys (switcherAPIServer / initUserCoin):
  AvailableCoins      Coins a user may be switched to, e.g. [\"btc\",\"bch\"]. Required.
  StratumServerCaseInsensitive
                      Lowercase every user name. Default false.
  ZKUserCaseInsensitiveIndex
                      ZooKeeper path of the case index (lowercase name -> name).
  ZKBroker            ZooKeeper ensemble, e.g. [\"10.0.0.1:2181\",\"10.0.0.2:2181\"];
                      the store is ZooKeeper when it is set.
  ZKSwitcherWatchDir  ZooKeeper path of the user->coin nodes.
                      Default \"/stratumSwitcher/btcbcc/\".
  EnableUserAutoReg, ZKAutoRegWatchDir, UserAutoRegAPI {IntervalSeconds, URL, User,
  Password, DefaultCoin, PostData}
                      Auto-registration of unknown users (SPEC section 7): for each name a
                      proxy asks for, POST PostData (every {sub_name} in its values replaced
                      by the name; basic auth when User is set) to URL (http or https); on
                      an answer with data.puid > 0, wait IntervalSeconds (0: no wait), then
                      create the user with DefaultCoin (one of AvailableCoins) unless it has
                      a coin by then. On ZooKeeper, pending requests are the nodes of
                      ZKAutoRegWatchDir (required there), shared with the Go proxies.
  UserListAPI         {coin: url} user lists to ingest (SPEC section 7): each coin's list
                      is pulled every IntervalSeconds (default 10) with ?last_id=, and
                      absent users are created with that coin (existing ones are kept).
  UserListTimeoutSeconds
                      How long one user-list request may take. Default 60.
                      A switch of an existing user to one of these coins waits until the
                      user has been in that coin's list for 1.5 x IntervalSeconds (the
                      safety period of SPEC section 6); the wait survives restarts.
  EnableAPIServer, ListenAddr, APIUser, APIPassword
                      The HTTP switch API for pool backends (SPEC section 6): /switch,
                      /switch/multi-user, /switch-multi-user on ListenAddr, behind basic
                      auth with APIUser/APIPassword (both required); and on the same
                      listener, without auth, the user-list API for sservers:
                      GET /?coin=&last_id= (SPEC section 7).
  APIPasswordFile     A file holding APIPassword. Not with APIPassword.
  EnableCronJob, CronIntervalSeconds, UserCoinMapURL
                      The scheduled user->coin pull (SPEC section 6): every
                      CronIntervalSeconds (default 60), GET UserCoinMapURL (with
                      ?last_date= after the first pull) and apply each user->coin pair.
  ZKSubPoolUpdateBaseDir, ZKSubPoolUpdateAckTimeout
                      The sub-pool coinbase API (SPEC section 6) on ListenAddr, behind the
                      switch API's auth: /subpool/get-coinbase, /subpool/update-coinbase
                      (and /subpool-get-coinbase, /subpool-update-coinbase) write the
                      request to the job maker's node ZKSubPoolUpdateBaseDir<coin>/<subpool>
                      and answer its ack (.../ack) within ZKSubPoolUpdateAckTimeout seconds
                      (default 5). Needs ZooKeeper; unset: the routes answer 403.

Keys this version does not know are logged as warnings and ignored.

ENVIRONMENT
  RUST_LOG            Log filter, e.g. \"info\" or \"switchyard_control=debug\". Default \"info\".
  SWITCHYARD_ADMIN_TOKEN, SWITCHYARD_ADMIN_TOKEN_FILE
  SWITCHYARD_PROXY_TOKEN, SWITCHYARD_PROXY_TOKEN_FILE
  SWITCHYARD_API_PASSWORD, SWITCHYARD_API_PASSWORD_FILE
                      The secret, or a file holding it (the same as the flags
                      --admin-token, --admin-token-file, ...). Set, they take precedence
                      over the config file's AdminToken/AdminTokenFile, ...; the value and
                      the file may not both be set in the same place.
";

/// Auto-registration settings (`UserAutoRegAPI`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
#[allow(missing_docs)]
pub struct AutoRegApiConfig {
    #[serde(rename = "IntervalSeconds")]
    pub interval_seconds: u64,
    #[serde(rename = "URL")]
    pub url: String,
    #[serde(rename = "User")]
    pub user: String,
    #[serde(rename = "Password")]
    pub password: Secret,
    #[serde(rename = "DefaultCoin")]
    pub default_coin: String,
    #[serde(rename = "PostData")]
    pub post_data: BTreeMap<String, String>,
}

/// The configuration file, key for key; see [`SETTINGS_HELP`].
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
#[allow(missing_docs)]
pub struct ControlConfig {
    // Switchyard's own settings.
    #[serde(rename = "GrpcListenAddr")]
    pub grpc_listen_addr: String,
    #[serde(rename = "TlsCertFile")]
    pub tls_cert_file: Option<PathBuf>,
    #[serde(rename = "TlsKeyFile")]
    pub tls_key_file: Option<PathBuf>,
    #[serde(rename = "TlsClientCaFile")]
    pub tls_client_ca_file: Option<PathBuf>,
    #[serde(rename = "HttpTlsCertFile")]
    pub http_tls_cert_file: Option<PathBuf>,
    #[serde(rename = "HttpTlsKeyFile")]
    pub http_tls_key_file: Option<PathBuf>,
    #[serde(rename = "Store")]
    pub store: Option<String>,
    #[serde(rename = "DataDir")]
    pub data_dir: PathBuf,
    #[serde(rename = "AdminToken")]
    pub admin_token: Option<Secret>,
    #[serde(rename = "AdminTokenFile")]
    pub admin_token_file: Option<PathBuf>,
    #[serde(rename = "ProxyToken")]
    pub proxy_token: Option<Secret>,
    #[serde(rename = "ProxyTokenFile")]
    pub proxy_token_file: Option<PathBuf>,
    #[serde(rename = "LeaseTTLSeconds")]
    pub lease_ttl_seconds: u64,
    #[serde(rename = "MaxSwitchBatch")]
    pub max_switch_batch: usize,
    #[serde(rename = "LogFormat")]
    pub log_format: String,
    #[serde(rename = "MetricsListenAddr")]
    pub metrics_listen_addr: String,
    #[serde(rename = "ZKSwitchyardDir")]
    pub zk_switchyard_dir: String,
    #[serde(rename = "UserListTimeoutSeconds")]
    pub user_list_timeout_seconds: u64,
    #[serde(rename = "ZKServerIDAssignDir")]
    pub zk_server_id_assign_dir: String,
    #[serde(rename = "ZKServerIDAssignDirs")]
    pub zk_server_id_assign_dirs: BTreeMap<String, String>,
    #[serde(rename = "ZKSessionTimeoutSeconds")]
    pub zk_session_timeout_seconds: u64,
    #[serde(rename = "ZKRequestTimeoutSeconds")]
    pub zk_request_timeout_seconds: u64,
    #[serde(rename = "ZKReconcileSeconds")]
    pub zk_reconcile_seconds: u64,
    #[serde(rename = "AutoRegMaxPending")]
    pub auto_reg_max_pending: usize,
    #[serde(rename = "AutoRegTimeoutSeconds")]
    pub auto_reg_timeout_seconds: u64,
    #[serde(rename = "AutoRegMaxConcurrent")]
    pub auto_reg_max_concurrent: usize,
    #[serde(rename = "AutoRegMaxPendingPerProxy")]
    pub auto_reg_max_pending_per_proxy: usize,
    #[serde(rename = "AutoRegMaxPendingPerPattern")]
    pub auto_reg_max_pending_per_pattern: usize,
    #[serde(rename = "AutoRegRefusedSeconds")]
    pub auto_reg_refused_seconds: u64,
    #[serde(rename = "GrpcMaxConcurrentRequests")]
    pub grpc_max_concurrent_requests: usize,
    #[serde(rename = "GrpcMaxConcurrentRequestsPerConnection")]
    pub grpc_max_concurrent_requests_per_connection: usize,
    #[serde(rename = "GrpcRequestTimeoutSeconds")]
    pub grpc_request_timeout_seconds: u64,
    #[serde(rename = "MaxWatchStreams")]
    pub max_watch_streams: usize,
    #[serde(rename = "WatchBufferBytes")]
    pub watch_buffer_bytes: usize,
    #[serde(rename = "HTTPHeaderReadTimeoutSeconds")]
    pub http_header_read_timeout_seconds: u64,
    #[serde(rename = "HTTPBodyReadTimeoutSeconds")]
    pub http_body_read_timeout_seconds: u64,
    #[serde(rename = "HTTPMaxConnections")]
    pub http_max_connections: usize,
    #[serde(rename = "UserListAPIPageSize")]
    pub user_list_api_page_size: usize,

    // The Go programs' keys.
    #[serde(rename = "AvailableCoins")]
    pub available_coins: Vec<String>,
    #[serde(rename = "StratumServerCaseInsensitive")]
    pub case_insensitive: bool,
    #[serde(rename = "ZKUserCaseInsensitiveIndex")]
    pub zk_case_index_dir: String,
    #[serde(rename = "ZKBroker")]
    pub zk_broker: Vec<String>,
    #[serde(rename = "ZKSwitcherWatchDir")]
    pub zk_switcher_watch_dir: String,
    #[serde(rename = "EnableUserAutoReg")]
    pub enable_user_auto_reg: bool,
    #[serde(rename = "ZKAutoRegWatchDir")]
    pub zk_auto_reg_watch_dir: String,
    #[serde(rename = "UserAutoRegAPI")]
    pub user_auto_reg_api: AutoRegApiConfig,
    #[serde(rename = "UserListAPI")]
    pub user_list_api: BTreeMap<String, String>,
    #[serde(rename = "IntervalSeconds")]
    pub interval_seconds: u64,
    #[serde(rename = "EnableAPIServer")]
    pub enable_api_server: bool,
    #[serde(rename = "ListenAddr")]
    pub listen_addr: String,
    #[serde(rename = "APIUser")]
    pub api_user: String,
    #[serde(rename = "APIPassword")]
    pub api_password: Secret,
    #[serde(rename = "APIPasswordFile")]
    pub api_password_file: Option<PathBuf>,
    #[serde(rename = "EnableCronJob")]
    pub enable_cron_job: bool,
    #[serde(rename = "CronIntervalSeconds")]
    pub cron_interval_seconds: u64,
    #[serde(rename = "UserCoinMapURL")]
    pub user_coin_map_url: String,
    #[serde(rename = "ZKSubPoolUpdateBaseDir")]
    pub zk_sub_pool_update_base_dir: String,
    #[serde(rename = "ZKSubPoolUpdateAckTimeout")]
    pub zk_sub_pool_update_ack_timeout: u64,
}

impl Default for ControlConfig {
    fn default() -> Self {
        Self {
            grpc_listen_addr: DEFAULT_GRPC_LISTEN_ADDR.into(),
            tls_cert_file: None,
            tls_key_file: None,
            tls_client_ca_file: None,
            http_tls_cert_file: None,
            http_tls_key_file: None,
            store: None,
            data_dir: PathBuf::from("./switchyard-data"),
            admin_token: None,
            admin_token_file: None,
            proxy_token: None,
            proxy_token_file: None,
            lease_ttl_seconds: 30,
            max_switch_batch: 10_000,
            log_format: "text".into(),
            metrics_listen_addr: String::new(),
            zk_switchyard_dir: "/switchyard/".into(),
            user_list_timeout_seconds: 60,
            zk_server_id_assign_dir: String::new(),
            zk_server_id_assign_dirs: BTreeMap::new(),
            zk_session_timeout_seconds: 15,
            zk_request_timeout_seconds: 10,
            zk_reconcile_seconds: 300,
            auto_reg_max_pending: crate::autoreg::DEFAULT_MAX_PENDING,
            auto_reg_timeout_seconds: crate::autoreg::DEFAULT_TIMEOUT.as_secs(),
            auto_reg_max_concurrent: crate::autoreg::DEFAULT_MAX_CONCURRENT,
            auto_reg_max_pending_per_proxy: crate::autoreg::DEFAULT_MAX_PENDING_PER_PROXY,
            auto_reg_max_pending_per_pattern: crate::autoreg::DEFAULT_MAX_PENDING_PER_PATTERN,
            auto_reg_refused_seconds: crate::autoreg::DEFAULT_REFUSED_TTL.as_secs(),
            grpc_max_concurrent_requests: ServerLimits::DEFAULT_GRPC_MAX_CONCURRENT_REQUESTS,
            grpc_max_concurrent_requests_per_connection:
                ServerLimits::DEFAULT_GRPC_MAX_CONCURRENT_REQUESTS_PER_CONNECTION,
            grpc_request_timeout_seconds: ServerLimits::DEFAULT_GRPC_REQUEST_TIMEOUT.as_secs(),
            max_watch_streams: crate::grpc::proxy_control::DEFAULT_MAX_WATCH_STREAMS,
            watch_buffer_bytes: crate::grpc::proxy_control::DEFAULT_WATCH_BUFFER_BYTES,
            http_header_read_timeout_seconds: HttpLimits::DEFAULT_HEADER_READ_TIMEOUT.as_secs(),
            http_body_read_timeout_seconds: HttpLimits::DEFAULT_BODY_READ_TIMEOUT.as_secs(),
            http_max_connections: HttpLimits::DEFAULT_MAX_CONNECTIONS,
            user_list_api_page_size: ServerLimits::DEFAULT_USER_LIST_PAGE_SIZE,
            available_coins: Vec::new(),
            case_insensitive: false,
            zk_case_index_dir: String::new(),
            zk_broker: Vec::new(),
            zk_switcher_watch_dir: "/stratumSwitcher/btcbcc/".into(),
            enable_user_auto_reg: false,
            zk_auto_reg_watch_dir: String::new(),
            user_auto_reg_api: AutoRegApiConfig::default(),
            user_list_api: BTreeMap::new(),
            interval_seconds: 10,
            enable_api_server: false,
            listen_addr: String::new(),
            api_user: String::new(),
            api_password: Secret::default(),
            api_password_file: None,
            enable_cron_job: false,
            cron_interval_seconds: 60,
            user_coin_map_url: String::new(),
            zk_sub_pool_update_base_dir: String::new(),
            zk_sub_pool_update_ack_timeout: 5,
        }
    }
}

/// Which store the control service runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreChoice {
    /// The embedded redb store in `DataDir`.
    Embedded,
    /// ZooKeeper at `ZKBroker`.
    ZooKeeper,
}

/// The log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Why a configuration was refused.
#[derive(Debug, Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid JSON of the expected shape.
    #[error("config file {path} is not valid: {source}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// Why.
        source: serde_json::Error,
    },
    /// A secret's file cannot be read, or a secret is set twice.
    #[error("config setting {0}")]
    Secret(#[from] SecretError),
    /// A setting has a value that cannot work.
    #[error("config setting {key}: {message}")]
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

/// True for an address only this host can reach: 127.0.0.0/8, `::1`, and `::ffff:127.x.y.z`.
/// `0.0.0.0` and `::` (every interface) are not.
pub fn is_loopback(addr: SocketAddr) -> bool {
    addr.ip().to_canonical().is_loopback()
}

const KNOWN_KEYS: &[&str] = &[
    "GrpcListenAddr",
    "TlsCertFile",
    "TlsKeyFile",
    "TlsClientCaFile",
    "HttpTlsCertFile",
    "HttpTlsKeyFile",
    "Store",
    "DataDir",
    "AdminToken",
    "AdminTokenFile",
    "ProxyToken",
    "ProxyTokenFile",
    "LeaseTTLSeconds",
    "MaxSwitchBatch",
    "LogFormat",
    "MetricsListenAddr",
    "ZKSwitchyardDir",
    "UserListTimeoutSeconds",
    "ZKServerIDAssignDir",
    "ZKServerIDAssignDirs",
    "ZKSessionTimeoutSeconds",
    "ZKRequestTimeoutSeconds",
    "ZKReconcileSeconds",
    "AutoRegMaxPending",
    "AutoRegTimeoutSeconds",
    "AutoRegMaxConcurrent",
    "AutoRegMaxPendingPerProxy",
    "AutoRegMaxPendingPerPattern",
    "AutoRegRefusedSeconds",
    "GrpcMaxConcurrentRequests",
    "GrpcMaxConcurrentRequestsPerConnection",
    "GrpcRequestTimeoutSeconds",
    "MaxWatchStreams",
    "WatchBufferBytes",
    "HTTPHeaderReadTimeoutSeconds",
    "HTTPBodyReadTimeoutSeconds",
    "HTTPMaxConnections",
    "UserListAPIPageSize",
    "AvailableCoins",
    "StratumServerCaseInsensitive",
    "ZKUserCaseInsensitiveIndex",
    "ZKBroker",
    "ZKSwitcherWatchDir",
    "EnableUserAutoReg",
    "ZKAutoRegWatchDir",
    "UserAutoRegAPI",
    "UserListAPI",
    "IntervalSeconds",
    "EnableAPIServer",
    "ListenAddr",
    "APIUser",
    "APIPassword",
    "APIPasswordFile",
    "EnableCronJob",
    "CronIntervalSeconds",
    "UserCoinMapURL",
    "ZKSubPoolUpdateBaseDir",
    "ZKSubPoolUpdateAckTimeout",
];

impl ControlConfig {
    /// Parses a config file's text. Returns the config and the top-level keys it does not know
    /// (for the caller to warn about).
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

    /// The gRPC address to listen on.
    pub fn grpc_addr(&self) -> Result<SocketAddr, ConfigError> {
        self.grpc_listen_addr.parse().map_err(|e| {
            invalid(
                "GrpcListenAddr",
                format!("{:?} is not an IP:port address: {e}", self.grpc_listen_addr),
            )
        })
    }

    /// The store to run on.
    pub fn store_choice(&self) -> Result<StoreChoice, ConfigError> {
        match self.store.as_deref() {
            None if self.zk_broker.is_empty() => Ok(StoreChoice::Embedded),
            None => Ok(StoreChoice::ZooKeeper),
            Some("embedded") => Ok(StoreChoice::Embedded),
            Some("zookeeper") if self.zk_broker.is_empty() => Err(invalid(
                "ZKBroker",
                "Store is \"zookeeper\" but no ZooKeeper address is configured",
            )),
            Some("zookeeper") => Ok(StoreChoice::ZooKeeper),
            Some(other) => Err(invalid(
                "Store",
                format!("{other:?} is neither \"embedded\" nor \"zookeeper\""),
            )),
        }
    }

    /// The log format.
    pub fn log_format(&self) -> Result<LogFormat, ConfigError> {
        match self.log_format.as_str() {
            "text" | "" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            other => Err(invalid(
                "LogFormat",
                format!("{other:?} is neither \"text\" nor \"json\""),
            )),
        }
    }

    /// The switching core's settings.
    pub fn core_settings(&self) -> Result<CoreSettings, ConfigError> {
        if self.available_coins.is_empty() {
            return Err(invalid(
                "AvailableCoins",
                "no coin is configured; list the coins users may switch to, e.g. [\"btc\",\"bch\"]",
            ));
        }
        let coins = CoinSet::new(self.available_coins.iter().cloned()).map_err(|e| {
            invalid(
                "AvailableCoins",
                match e {
                    InvalidInput::EmptyCoin => "an entry is empty".to_owned(),
                    other => other.to_string(),
                },
            )
        })?;
        if self.max_switch_batch == 0 {
            return Err(invalid("MaxSwitchBatch", "must be at least 1"));
        }
        let safety = if self.user_list_api.is_empty() {
            None
        } else {
            if self.interval_seconds == 0 {
                return Err(invalid("IntervalSeconds", "must be at least 1"));
            }
            Some(SafetyPeriod {
                period: Duration::from_millis(self.interval_seconds.saturating_mul(1_500)),
                coins: self.user_list_api.keys().cloned().collect(),
            })
        };
        Ok(CoreSettings {
            case_index: !self.case_insensitive && !self.zk_case_index_dir.is_empty(),
            safety,
            coins,
            case_insensitive: self.case_insensitive,
            max_batch: self.max_switch_batch,
            pending_reconcile: Duration::from_secs(self.zk_reconcile_seconds.max(1)),
        })
    }

    /// The ZooKeeper store's settings (meaningful when the store is ZooKeeper).
    pub fn zk_settings(&self) -> Result<ZkSettings, ConfigError> {
        if self.zk_broker.is_empty() {
            return Err(invalid("ZKBroker", "no ZooKeeper address is configured"));
        }
        for broker in &self.zk_broker {
            let valid = broker
                .rsplit_once(':')
                .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
            if !valid {
                return Err(invalid(
                    "ZKBroker",
                    format!("{broker:?} is not a host:port address"),
                ));
            }
        }
        let dir = |key: &'static str, value: &str| {
            normalize_dir(value).map_err(|message| invalid(key, message))
        };
        let seconds = |key: &'static str, value: u64| {
            if value == 0 {
                Err(invalid(key, "must be at least 1"))
            } else {
                Ok(Duration::from_secs(value))
            }
        };
        let case_index_dir = if self.case_insensitive || self.zk_case_index_dir.is_empty() {
            None
        } else {
            Some(dir("ZKUserCaseInsensitiveIndex", &self.zk_case_index_dir)?)
        };
        Ok(ZkSettings {
            brokers: self.zk_broker.clone(),
            switcher_dir: dir("ZKSwitcherWatchDir", &self.zk_switcher_watch_dir)?,
            case_index_dir,
            deployment_dir: format!(
                "{}{}",
                dir("ZKSwitchyardDir", &self.zk_switchyard_dir)?,
                dir("ZKSwitcherWatchDir", &self.zk_switcher_watch_dir)?.trim_start_matches('/')
            ),
            switchyard_dir: dir("ZKSwitchyardDir", &self.zk_switchyard_dir)?,
            session_timeout: seconds("ZKSessionTimeoutSeconds", self.zk_session_timeout_seconds)?,
            request_timeout: seconds("ZKRequestTimeoutSeconds", self.zk_request_timeout_seconds)?,
            reconcile_interval: seconds("ZKReconcileSeconds", self.zk_reconcile_seconds)?,
        })
    }

    /// The server-ID lease directory of each chain type, with trailing `/` (ZooKeeper mode).
    pub fn lease_dirs(&self) -> Result<HashMap<String, String>, ConfigError> {
        let mut dirs = HashMap::new();
        for key in self.zk_server_id_assign_dirs.keys() {
            if !CHAIN_TYPES.contains(&key.as_str()) {
                return Err(invalid(
                    "ZKServerIDAssignDirs",
                    format!("{key:?} is not one of the chain types {CHAIN_TYPES:?}"),
                ));
            }
        }
        for chain in CHAIN_TYPES {
            let dir = match self.zk_server_id_assign_dirs.get(chain) {
                Some(dir) => normalize_dir(dir).map_err(|m| invalid("ZKServerIDAssignDirs", m))?,
                None if !self.zk_server_id_assign_dir.is_empty() => {
                    normalize_dir(&self.zk_server_id_assign_dir)
                        .map_err(|m| invalid("ZKServerIDAssignDir", m))?
                }
                None => format!("/stratumSwitcher/{chain}_swid/"),
            };
            dirs.insert(chain.to_owned(), dir);
        }
        Ok(dirs)
    }

    /// The user-list pullers' settings, one per coin of `UserListAPI`.
    pub fn user_list_pullers(&self) -> Result<Vec<PullerSettings>, ConfigError> {
        let interval = Duration::from_secs(self.interval_seconds);
        self.user_list_api
            .iter()
            .map(|(coin, url)| {
                if !self.available_coins.contains(coin) {
                    return Err(invalid(
                        "UserListAPI",
                        format!("{coin:?} is not one of AvailableCoins"),
                    ));
                }
                let valid = url.starts_with("http://") || url.starts_with("https://");
                if !valid {
                    return Err(invalid(
                        "UserListAPI",
                        format!("{coin}: {url:?} is not an http(s) URL"),
                    ));
                }
                if interval.is_zero() {
                    return Err(invalid("IntervalSeconds", "must be at least 1"));
                }
                if self.user_list_timeout_seconds == 0 {
                    return Err(invalid("UserListTimeoutSeconds", "must be at least 1"));
                }
                let mut settings = PullerSettings::new(coin.clone(), url.clone(), interval);
                settings.timeout = Duration::from_secs(self.user_list_timeout_seconds);
                Ok(settings)
            })
            .collect()
    }

    /// Auto-registration's settings (`EnableUserAutoReg`, `ZKAutoRegWatchDir`,
    /// `UserAutoRegAPI`, `AutoRegMaxPending`, `AutoRegTimeoutSeconds`, `AutoRegMaxConcurrent`,
    /// `AutoRegMaxPendingPerProxy`, `AutoRegMaxPendingPerPattern`, `AutoRegRefusedSeconds`);
    /// `None` when disabled.
    pub fn auto_reg(&self) -> Result<Option<crate::autoreg::AutoRegSettings>, ConfigError> {
        if !self.enable_user_auto_reg {
            return Ok(None);
        }
        let api = &self.user_auto_reg_api;
        if !self.available_coins.contains(&api.default_coin) {
            return Err(invalid(
                "UserAutoRegAPI.DefaultCoin",
                format!(
                    "{:?} is not one of AvailableCoins {:?}",
                    api.default_coin, self.available_coins
                ),
            ));
        }
        if self.auto_reg_max_pending == 0 {
            return Err(invalid("AutoRegMaxPending", "must be at least 1"));
        }
        if self.auto_reg_timeout_seconds == 0 {
            return Err(invalid("AutoRegTimeoutSeconds", "must be at least 1"));
        }
        for (key, value) in [
            ("AutoRegMaxConcurrent", self.auto_reg_max_concurrent),
            (
                "AutoRegMaxPendingPerProxy",
                self.auto_reg_max_pending_per_proxy,
            ),
            (
                "AutoRegMaxPendingPerPattern",
                self.auto_reg_max_pending_per_pattern,
            ),
        ] {
            if value == 0 {
                return Err(invalid(key, "must be at least 1"));
            }
        }
        let watch_dir = if self.store_choice()? == StoreChoice::ZooKeeper
            || !self.zk_auto_reg_watch_dir.is_empty()
        {
            Some(
                normalize_dir(&self.zk_auto_reg_watch_dir)
                    .map_err(|m| invalid("ZKAutoRegWatchDir", m))?,
            )
        } else {
            None
        };
        let settings = crate::autoreg::AutoRegSettings {
            user: api.user.clone(),
            password: api.password.clone(),
            post_data: api.post_data.clone(),
            interval: Duration::from_secs(api.interval_seconds),
            timeout: Duration::from_secs(self.auto_reg_timeout_seconds),
            max_pending: self.auto_reg_max_pending,
            max_pending_per_proxy: self.auto_reg_max_pending_per_proxy,
            max_pending_per_pattern: self.auto_reg_max_pending_per_pattern,
            max_concurrent: self.auto_reg_max_concurrent,
            refused_ttl: Duration::from_secs(self.auto_reg_refused_seconds),
            watch_dir,
            ..crate::autoreg::AutoRegSettings::new(api.url.clone(), api.default_coin.clone())
        };
        settings
            .validate()
            .map_err(|e| invalid("UserAutoRegAPI.URL", e.to_string()))?;
        Ok(Some(settings))
    }

    /// The scheduled user->coin pull's settings (`EnableCronJob`).
    pub fn user_coin_map_pull(&self) -> Result<UserCoinMapPull, ConfigError> {
        let pull = UserCoinMapPull::new(
            self.user_coin_map_url.clone(),
            Duration::from_secs(self.cron_interval_seconds),
        );
        pull.validate().map_err(|e| {
            invalid(
                if self.cron_interval_seconds == 0 {
                    "CronIntervalSeconds"
                } else {
                    "UserCoinMapURL"
                },
                e.to_string(),
            )
        })?;
        Ok(pull)
    }

    /// Where the metrics are served (`MetricsListenAddr`); `None` when not set.
    pub fn metrics_addr(&self) -> Result<Option<SocketAddr>, ConfigError> {
        if self.metrics_listen_addr.is_empty() {
            return Ok(None);
        }
        self.metrics_listen_addr.parse().map(Some).map_err(|e| {
            invalid(
                "MetricsListenAddr",
                format!(
                    "{:?} is not an IP:port address: {e}",
                    self.metrics_listen_addr
                ),
            )
        })
    }

    /// The HTTP switch API's address and credentials, when `EnableAPIServer` is set. The
    /// switch API moves hashrate: it is never served without both `APIUser` and
    /// `APIPassword`, whatever the address (the user-list API beside it is read-only and has
    /// no auth, by SPEC section 7).
    pub fn http_api(&self) -> Result<Option<(SocketAddr, String, Secret)>, ConfigError> {
        if !self.enable_api_server {
            return Ok(None);
        }
        let addr = self.listen_addr.parse().map_err(|e| {
            invalid(
                "ListenAddr",
                format!("{:?} is not an IP:port address: {e}", self.listen_addr),
            )
        })?;
        let has_password = !self.api_password.is_empty() || self.api_password_file.is_some();
        if self.api_user.is_empty() || !has_password {
            return Err(invalid(
                if self.api_user.is_empty() {
                    "APIUser"
                } else {
                    "APIPassword"
                },
                format!(
                    "EnableAPIServer on ListenAddr {addr} needs both APIUser and APIPassword (or APIPasswordFile, SWITCHYARD_API_PASSWORD, SWITCHYARD_API_PASSWORD_FILE): the switch API moves hashrate and is never served without credentials"
                ),
            ));
        }
        Ok(Some((
            addr,
            self.api_user.clone(),
            self.api_password.clone(),
        )))
    }

    /// The sub-pool coinbase API's settings, when `ZKSubPoolUpdateBaseDir` is set.
    pub fn sub_pool(&self) -> Result<Option<SubPoolSettings>, ConfigError> {
        if self.zk_sub_pool_update_base_dir.is_empty() {
            return Ok(None);
        }
        let base_dir = normalize_dir(&self.zk_sub_pool_update_base_dir)
            .map_err(|m| invalid("ZKSubPoolUpdateBaseDir", m))?;
        if self.zk_sub_pool_update_ack_timeout == 0 {
            return Err(invalid("ZKSubPoolUpdateAckTimeout", "must be at least 1"));
        }
        Ok(Some(SubPoolSettings {
            base_dir,
            ack_timeout: Duration::from_secs(self.zk_sub_pool_update_ack_timeout),
        }))
    }

    /// The gRPC listener's TLS files (`TlsCertFile`, `TlsKeyFile`, `TlsClientCaFile`), when TLS
    /// is on.
    pub fn grpc_tls(&self) -> Result<Option<switchyard_tls::ServerTlsFiles>, ConfigError> {
        match (&self.tls_cert_file, &self.tls_key_file) {
            (None, None) if self.tls_client_ca_file.is_some() => Err(invalid(
                "TlsClientCaFile",
                "client certificates need TLS: set TlsCertFile and TlsKeyFile too",
            )),
            (None, None) => Ok(None),
            (Some(cert), Some(key)) => Ok(Some(switchyard_tls::ServerTlsFiles {
                cert: cert.clone(),
                key: key.clone(),
                client_ca: self.tls_client_ca_file.clone(),
            })),
            (Some(_), None) => Err(invalid("TlsKeyFile", "TlsCertFile is set without it")),
            (None, Some(_)) => Err(invalid("TlsCertFile", "TlsKeyFile is set without it")),
        }
    }

    /// The bounds of the servers (`GrpcMaxConcurrentRequests` ... `UserListAPIPageSize`);
    /// each must be at least 1.
    pub fn server_limits(&self) -> Result<ServerLimits, ConfigError> {
        fn at_least_one<T: PartialOrd + From<u8>>(
            key: &'static str,
            value: T,
        ) -> Result<T, ConfigError> {
            if value < T::from(1) {
                Err(invalid(key, "must be at least 1"))
            } else {
                Ok(value)
            }
        }
        let seconds = |key, value| at_least_one(key, value).map(Duration::from_secs);
        Ok(ServerLimits {
            grpc_max_concurrent_requests: at_least_one(
                "GrpcMaxConcurrentRequests",
                self.grpc_max_concurrent_requests,
            )?,
            grpc_max_concurrent_requests_per_connection: at_least_one(
                "GrpcMaxConcurrentRequestsPerConnection",
                self.grpc_max_concurrent_requests_per_connection,
            )?,
            grpc_request_timeout: seconds(
                "GrpcRequestTimeoutSeconds",
                self.grpc_request_timeout_seconds,
            )?,
            max_watch_streams: at_least_one("MaxWatchStreams", self.max_watch_streams)?,
            watch_buffer_bytes: at_least_one("WatchBufferBytes", self.watch_buffer_bytes)?,
            http: HttpLimits {
                header_read_timeout: seconds(
                    "HTTPHeaderReadTimeoutSeconds",
                    self.http_header_read_timeout_seconds,
                )?,
                body_read_timeout: seconds(
                    "HTTPBodyReadTimeoutSeconds",
                    self.http_body_read_timeout_seconds,
                )?,
                max_connections: at_least_one("HTTPMaxConnections", self.http_max_connections)?,
            },
            user_list_page_size: at_least_one("UserListAPIPageSize", self.user_list_api_page_size)?,
        })
    }

    /// The HTTP listener's TLS files (`HttpTlsCertFile`, `HttpTlsKeyFile`), when TLS is on.
    pub fn http_tls(&self) -> Result<Option<switchyard_tls::ServerTlsFiles>, ConfigError> {
        match (&self.http_tls_cert_file, &self.http_tls_key_file) {
            (None, None) => Ok(None),
            (Some(cert), Some(key)) => Ok(Some(switchyard_tls::ServerTlsFiles {
                cert: cert.clone(),
                key: key.clone(),
                client_ca: None,
            })),
            (Some(_), None) => Err(invalid(
                "HttpTlsKeyFile",
                "HttpTlsCertFile is set without it",
            )),
            (None, Some(_)) => Err(invalid(
                "HttpTlsCertFile",
                "HttpTlsKeyFile is set without it",
            )),
        }
    }

    /// The time to live of proxy server-ID leases.
    pub fn lease_ttl(&self) -> Result<Duration, ConfigError> {
        if self.lease_ttl_seconds == 0 {
            return Err(invalid("LeaseTTLSeconds", "must be at least 1"));
        }
        Ok(Duration::from_secs(self.lease_ttl_seconds))
    }

    /// A token setting, with an empty string meaning none.
    fn token(value: &Option<Secret>) -> Option<Secret> {
        value.as_ref().filter(|t| !t.is_empty()).cloned()
    }

    /// The admin token, if any (after [`ControlConfig::load_secret_files`]).
    pub fn admin_token(&self) -> Option<Secret> {
        Self::token(&self.admin_token)
    }

    /// The proxy token, if any (after [`ControlConfig::load_secret_files`]).
    pub fn proxy_token(&self) -> Option<Secret> {
        Self::token(&self.proxy_token)
    }

    /// Reads the secrets the config file names by file (`AdminTokenFile`, `ProxyTokenFile`,
    /// `APIPasswordFile`) into their settings, once; the file settings are then cleared. A
    /// secret set both in place and by file is refused, as is an unreadable or empty file.
    /// The command line and environment, which take precedence, are applied by the binary
    /// before this (clearing the file setting they replace).
    pub fn load_secret_files(&mut self) -> Result<(), ConfigError> {
        self.admin_token = resolve_secret(
            self.admin_token.take(),
            self.admin_token_file.take().as_deref(),
            "AdminToken",
            "AdminTokenFile",
        )?;
        self.proxy_token = resolve_secret(
            self.proxy_token.take(),
            self.proxy_token_file.take().as_deref(),
            "ProxyToken",
            "ProxyTokenFile",
        )?;
        self.api_password = resolve_secret(
            Some(std::mem::take(&mut self.api_password)),
            self.api_password_file.take().as_deref(),
            "APIPassword",
            "APIPasswordFile",
        )?
        .unwrap_or_default();
        Ok(())
    }

    /// This config with its secret files read ([`ControlConfig::load_secret_files`]); a clone
    /// of it when there is none left to read.
    pub fn with_secret_files(&self) -> Result<Self, ConfigError> {
        let mut config = self.clone();
        config.load_secret_files()?;
        Ok(config)
    }

    /// The start-up check that nothing is served open by accident: a gRPC listener on any
    /// other than a loopback address needs `AdminToken` (SwitcherAdmin moves hashrate) and
    /// `ProxyToken` (ProxyControl streams every user and hands out server IDs); the error names
    /// the missing setting. On a loopback address they may be missing: the answer is then the
    /// one warning line to log. (The HTTP switch API's credentials are checked by
    /// [`ControlConfig::http_api`], on every address.)
    pub fn listener_security(&self) -> Result<Option<String>, ConfigError> {
        let addr = self.grpc_addr()?;
        let mut missing = Vec::new();
        if self.admin_token().is_none() && self.admin_token_file.is_none() {
            missing.push("AdminToken");
        }
        if self.proxy_token().is_none() && self.proxy_token_file.is_none() {
            missing.push("ProxyToken");
        }
        let Some(&first) = missing.first() else {
            return Ok(None);
        };
        if is_loopback(addr) {
            return Ok(Some(format!(
                "gRPC on loopback {addr} without {}: any local process may call {}; set {} before listening on another address",
                missing.join(" and "),
                if missing.len() == 2 {
                    "SwitcherAdmin and ProxyControl"
                } else if first == "AdminToken" {
                    "SwitcherAdmin"
                } else {
                    "ProxyControl"
                },
                if missing.len() == 2 { "them" } else { "it" },
            )));
        }
        let (what, env) = if first == "AdminToken" {
            (
                "anyone who reaches it could switch any user's coin (SwitcherAdmin)",
                "SWITCHYARD_ADMIN_TOKEN",
            )
        } else {
            (
                "anyone who reaches it could read every user (WatchSwitches) and take proxy server IDs (ProxyControl)",
                "SWITCHYARD_PROXY_TOKEN",
            )
        };
        let also = if missing.len() == 2 {
            " (ProxyToken is missing too)"
        } else {
            ""
        };
        Err(invalid(
            first,
            format!(
                "missing{also}, and GrpcListenAddr {addr} is not a loopback address: {what}. Set {first} (or {first}File, {env}, {env}_FILE), or listen on {DEFAULT_GRPC_LISTEN_ADDR}"
            ),
        ))
    }

    /// Checks every setting this version acts on, so that a bad file fails at start-up.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.grpc_addr()?;
        self.listener_security()?;
        if self.store_choice()? == StoreChoice::ZooKeeper {
            self.zk_settings()?;
            self.lease_dirs()?;
        }
        self.log_format()?;
        self.metrics_addr()?;
        self.http_api()?;
        self.sub_pool()?;
        if self.enable_user_auto_reg {
            self.auto_reg()?;
        }
        if self.enable_cron_job {
            self.user_coin_map_pull()?;
        }
        self.user_list_pullers()?;
        self.core_settings()?;
        self.lease_ttl()?;
        self.server_limits()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_are_off_unless_an_address_is_set() {
        let mut config = ControlConfig::default();
        assert_eq!(config.metrics_addr().expect("unset is fine"), None);
        let (parsed, unknown) = ControlConfig::from_json(
            r#"{"MetricsListenAddr":"0.0.0.0:9101","AvailableCoins":["btc"]}"#,
        )
        .expect("json");
        assert!(unknown.is_empty(), "{unknown:?}");
        assert_eq!(
            parsed.metrics_addr().expect("valid"),
            "0.0.0.0:9101".parse().ok()
        );
        assert!(parsed.validate().is_ok(), "no credentials needed");
        config.available_coins = vec!["btc".into()];
        config.metrics_listen_addr = "nine".into();
        let err = config.validate().expect_err("not an address");
        assert!(err.to_string().contains("MetricsListenAddr"), "{err}");
        assert!(SETTINGS_HELP.contains("MetricsListenAddr"));
    }

    #[test]
    fn sub_pool_settings_are_checked() {
        let mut config = ControlConfig::default();
        assert_eq!(config.sub_pool().expect("unset is fine"), None);
        config.zk_sub_pool_update_base_dir = "/subpool".into();
        assert_eq!(
            config.sub_pool().expect("valid"),
            Some(SubPoolSettings {
                base_dir: "/subpool/".into(),
                ack_timeout: Duration::from_secs(5),
            })
        );
        config.zk_sub_pool_update_ack_timeout = 0;
        assert!(config.sub_pool().is_err());
        config.zk_sub_pool_update_ack_timeout = 5;
        for bad in ["subpool/", "/", "/a/../b"] {
            config.zk_sub_pool_update_base_dir = bad.into();
            assert!(config.sub_pool().is_err(), "{bad}");
        }
    }

    #[test]
    fn reads_the_go_api_server_file_and_reports_unknown_keys() {
        let text = r#"{
            "ListenAddr": "0.0.0.0:8082",
            "APIUser": "admin", "APIPassword": "secret",
            "AvailableCoins": ["btc", "bcc"],
            "ZKBroker": ["127.0.0.1:2181"],
            "ZKSwitcherWatchDir": "/stratumSwitcher/btcbcc/",
            "EnableCronJob": false,
            "SomethingElse": 1
        }"#;
        let (config, unknown) = ControlConfig::from_json(text).expect("parses");
        assert_eq!(unknown, vec!["SomethingElse".to_owned()]);
        assert_eq!(config.available_coins, vec!["btc", "bcc"]);
        assert_eq!(
            config.store_choice().expect("store"),
            StoreChoice::ZooKeeper
        );
        assert_eq!(config.grpc_listen_addr, "127.0.0.1:50051");
    }

    fn with_grpc(addr: &str, admin: Option<&str>, proxy: Option<&str>) -> ControlConfig {
        ControlConfig {
            grpc_listen_addr: addr.into(),
            admin_token: admin.map(Secret::from),
            proxy_token: proxy.map(Secret::from),
            available_coins: vec!["btc".into()],
            ..ControlConfig::default()
        }
    }

    fn refused_key(config: &ControlConfig) -> &'static str {
        match config.listener_security() {
            Err(ConfigError::Invalid { key, message }) => {
                assert!(message.contains("GrpcListenAddr"), "{message}");
                assert!(message.contains(key), "{message}");
                key
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn grpc_beyond_loopback_needs_both_tokens() {
        for addr in [
            "0.0.0.0:50051",
            "10.0.0.5:50051",
            "[::]:50051",
            "[2001:db8::1]:1",
        ] {
            assert_eq!(refused_key(&with_grpc(addr, None, Some("p"))), "AdminToken");
            assert_eq!(refused_key(&with_grpc(addr, Some("a"), None)), "ProxyToken");
            assert_eq!(refused_key(&with_grpc(addr, None, None)), "AdminToken");
            // An empty token is no token.
            assert_eq!(
                refused_key(&with_grpc(addr, Some(""), Some("p"))),
                "AdminToken"
            );
            let safe = with_grpc(addr, Some("a"), Some("p"));
            assert_eq!(safe.listener_security().expect("both tokens"), None);
            assert!(safe.validate().is_ok());
            // validate() runs the check, so --check-config and ControlPlane::open refuse too.
            assert!(matches!(
                with_grpc(addr, None, Some("p")).validate(),
                Err(ConfigError::Invalid {
                    key: "AdminToken",
                    ..
                })
            ));
        }
        // A token file counts as a token (it is read before the service starts).
        let mut from_file = with_grpc("0.0.0.0:50051", None, Some("p"));
        from_file.admin_token_file = Some("/run/secrets/admin".into());
        assert_eq!(from_file.listener_security().expect("a file"), None);
    }

    #[test]
    fn loopback_without_tokens_starts_with_one_warning() {
        for addr in [
            "127.0.0.1:50051",
            "127.0.0.2:1",
            "[::1]:50051",
            "[::ffff:127.0.0.1]:1",
        ] {
            for (admin, proxy, names) in [
                (None, None, "AdminToken and ProxyToken"),
                (None, Some("p"), "AdminToken"),
                (Some("a"), None, "ProxyToken"),
            ] {
                let warning = with_grpc(addr, admin, proxy)
                    .listener_security()
                    .expect("loopback is allowed")
                    .expect("with a warning");
                assert!(warning.contains(names), "{warning}");
                assert!(!warning.contains('\n'), "one line: {warning}");
            }
            assert_eq!(
                with_grpc(addr, Some("a"), Some("p"))
                    .listener_security()
                    .expect("safe"),
                None
            );
        }
        // The default address is loopback.
        let default = ControlConfig::default();
        assert!(is_loopback(default.grpc_addr().expect("valid default")));
        assert!(default.listener_security().expect("allowed").is_some());
    }

    #[test]
    fn the_switch_api_needs_credentials_on_every_address() {
        for addr in ["0.0.0.0:8082", "127.0.0.1:8082"] {
            let mut config = with_grpc("127.0.0.1:50051", Some("a"), Some("p"));
            config.enable_api_server = true;
            config.listen_addr = addr.into();
            assert!(matches!(
                config.http_api(),
                Err(ConfigError::Invalid { key: "APIUser", .. })
            ));
            config.api_user = "backend".into();
            assert!(matches!(
                config.http_api(),
                Err(ConfigError::Invalid {
                    key: "APIPassword",
                    ..
                })
            ));
            config.api_password = "pw".into();
            let (_, user, password) = config.http_api().expect("ok").expect("enabled");
            assert_eq!((user.as_str(), password.expose()), ("backend", "pw"));
        }
    }

    #[test]
    fn secrets_come_from_files_and_never_show_in_debug() {
        let dir = tempfile::tempdir().expect("tempdir");
        let write = |name: &str, text: &str| {
            let path = dir.path().join(name);
            std::fs::write(&path, text).expect("write");
            path
        };
        let mut config = with_grpc("0.0.0.0:50051", None, None);
        config.admin_token_file = Some(write("admin", "admin-secret\n"));
        config.proxy_token_file = Some(write("proxy", "proxy-secret"));
        config.api_password_file = Some(write("api", "api-secret\r\n"));
        config.user_auto_reg_api.password = "autoreg-secret".into();
        config.load_secret_files().expect("readable");
        assert_eq!(config.admin_token().expect("set").expose(), "admin-secret");
        assert_eq!(config.proxy_token().expect("set").expose(), "proxy-secret");
        assert_eq!(config.api_password.expose(), "api-secret");
        assert_eq!(config.admin_token_file, None, "read once, then cleared");
        assert_eq!(config.listener_security().expect("tokens"), None);
        let printed = format!("{config:?}");
        for secret in [
            "admin-secret",
            "proxy-secret",
            "api-secret",
            "autoreg-secret",
        ] {
            assert!(!printed.contains(secret), "{secret} in {printed}");
        }

        // In place and by file in the same config file: refused, naming both.
        let mut both = with_grpc("127.0.0.1:1", Some("x"), None);
        both.admin_token_file = Some(write("admin2", "y"));
        let err = both.load_secret_files().expect_err("both");
        assert!(err.to_string().contains("AdminTokenFile"), "{err}");
        // An empty or missing file: refused, naming the setting.
        let mut empty = with_grpc("127.0.0.1:1", None, None);
        empty.proxy_token_file = Some(write("empty", "\n"));
        let err = empty.load_secret_files().expect_err("empty");
        assert!(err.to_string().contains("ProxyTokenFile"), "{err}");
        let mut missing = with_grpc("127.0.0.1:1", None, None);
        missing.api_password_file = Some(dir.path().join("nope"));
        let err = missing.load_secret_files().expect_err("missing");
        assert!(err.to_string().contains("APIPasswordFile"), "{err}");
        // A JSON config names them by the documented keys.
        let (parsed, unknown) = ControlConfig::from_json(
            r#"{"AdminTokenFile":"/a","ProxyTokenFile":"/p","APIPasswordFile":"/h"}"#,
        )
        .expect("parses");
        assert!(unknown.is_empty(), "{unknown:?}");
        assert_eq!(parsed.admin_token_file, Some(PathBuf::from("/a")));
        assert_eq!(parsed.api_password_file, Some(PathBuf::from("/h")));
    }

    #[test]
    fn refuses_settings_that_cannot_work() {
        let (config, _) = ControlConfig::from_json("{}").expect("parses");
        assert!(matches!(
            config.validate(),
            Err(ConfigError::Invalid {
                key: "AvailableCoins",
                ..
            })
        ));
        let (config, _) = ControlConfig::from_json(r#"{"AvailableCoins":["btc"],"Store":"mongo"}"#)
            .expect("parses");
        assert!(matches!(
            config.validate(),
            Err(ConfigError::Invalid { key: "Store", .. })
        ));
        let (config, _) =
            ControlConfig::from_json(r#"{"AvailableCoins":["btc",""]}"#).expect("parses");
        assert!(config.validate().is_err());
        assert!(ControlConfig::from_json(r#"{"AvailableCoins":"btc"}"#).is_err());
        for (json, key) in [
            (
                r#"{"AvailableCoins":["btc"],"ZKBroker":["nohost"]}"#,
                "ZKBroker",
            ),
            (
                r#"{"AvailableCoins":["btc"],"ZKBroker":["h:1"],"ZKSwitcherWatchDir":""}"#,
                "ZKSwitcherWatchDir",
            ),
            (
                r#"{"AvailableCoins":["btc"],"ZKBroker":["h:1"],"ZKSwitcherWatchDir":"/a/../b"}"#,
                "ZKSwitcherWatchDir",
            ),
        ] {
            let (config, _) = ControlConfig::from_json(json).expect("parses");
            match config.validate() {
                Err(ConfigError::Invalid { key: k, .. }) => assert_eq!(k, key, "{json}"),
                other => panic!("{json}: expected an error about {key}, got {other:?}"),
            }
        }
    }
}
