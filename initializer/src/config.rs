//! The `switchyard-init` configuration: the Go initUserCoin's JSON file with its original keys
//! (SPEC §8), plus the control endpoints it sends the users to.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::Deserialize;
use switchyard_cli::{Secret, SecretError, resolve_secret};
use thiserror::Error;

use crate::puller::PullerSettings;

/// Every setting, as printed by `--help`.
pub const SETTINGS_HELP: &str = "\
CONFIG FILE KEYS (JSON; the Go initUserCoin file is accepted as it is)

  ControlEndpoints    gRPC addresses of the control replicas, tried in order,
                      e.g. [\"http://10.0.0.5:50051\",\"http://10.0.0.6:50051\"]. Required.
  AdminToken          Bearer token of the control's SwitcherAdmin service, when it has one.
                      SWITCHYARD_ADMIN_TOKEN (or --admin-token) takes precedence.
  AdminTokenFile      A file holding AdminToken (one trailing line end trimmed), read at
                      start. Not with AdminToken. SWITCHYARD_ADMIN_TOKEN_FILE (or
                      --admin-token-file) takes precedence.
  ControlTlsCaFile    For https:// ControlEndpoints: the CA of the control service's
                      certificate (PEM). Required for https.
  ControlTlsCertFile, ControlTlsKeyFile
                      A client certificate and key, when the control service asks for
                      one (its TlsClientCaFile). Default: none.
  ControlTlsServerName
                      The name expected in the control service's certificate, when the
                      endpoints name it by IP. Default: the endpoint's host.
  UserListAPI         {coin: url}: the user lists to ingest. Required.
  IntervalSeconds     Between two pulls of a list. Default 10.
  UserListTimeoutSeconds
                      How long one user-list request may take. Default 60.
  EnableAPIServer, ListenAddr
                      Serve the user-list API for sservers, GET /?coin=&last_id=, on
                      ListenAddr (no auth, like the original).
  LogFormat           \"text\" or \"json\". Default \"text\".

The original file's ZooKeeper and auto-registration keys (ZKBroker, ZKSwitcherWatchDir,
EnableUserAutoReg, ...) belong to the control service now: they are logged and ignored here.
";

/// The configuration file; see [`SETTINGS_HELP`].
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
#[allow(missing_docs)]
pub struct InitConfig {
    #[serde(rename = "ControlEndpoints")]
    pub control_endpoints: Vec<String>,
    #[serde(rename = "AdminToken")]
    pub admin_token: Option<Secret>,
    #[serde(rename = "AdminTokenFile")]
    pub admin_token_file: Option<PathBuf>,
    #[serde(rename = "ControlTlsCaFile")]
    pub control_tls_ca_file: Option<PathBuf>,
    #[serde(rename = "ControlTlsCertFile")]
    pub control_tls_cert_file: Option<PathBuf>,
    #[serde(rename = "ControlTlsKeyFile")]
    pub control_tls_key_file: Option<PathBuf>,
    #[serde(rename = "ControlTlsServerName")]
    pub control_tls_server_name: Option<String>,
    #[serde(rename = "UserListAPI")]
    pub user_list_api: BTreeMap<String, String>,
    #[serde(rename = "IntervalSeconds")]
    pub interval_seconds: u64,
    #[serde(rename = "UserListTimeoutSeconds")]
    pub user_list_timeout_seconds: u64,
    #[serde(rename = "EnableAPIServer")]
    pub enable_api_server: bool,
    #[serde(rename = "ListenAddr")]
    pub listen_addr: String,
    #[serde(rename = "LogFormat")]
    pub log_format: String,
}

impl Default for InitConfig {
    fn default() -> Self {
        Self {
            control_endpoints: Vec::new(),
            admin_token: None,
            admin_token_file: None,
            control_tls_ca_file: None,
            control_tls_cert_file: None,
            control_tls_key_file: None,
            control_tls_server_name: None,
            user_list_api: BTreeMap::new(),
            interval_seconds: 10,
            user_list_timeout_seconds: 60,
            enable_api_server: false,
            listen_addr: String::new(),
            log_format: "text".into(),
        }
    }
}

const KNOWN_KEYS: &[&str] = &[
    "ControlEndpoints",
    "AdminToken",
    "AdminTokenFile",
    "ControlTlsCaFile",
    "ControlTlsCertFile",
    "ControlTlsKeyFile",
    "ControlTlsServerName",
    "UserListAPI",
    "IntervalSeconds",
    "UserListTimeoutSeconds",
    "EnableAPIServer",
    "ListenAddr",
    "LogFormat",
];

/// Why a configuration was refused.
#[derive(Debug, Error)]
pub enum InitConfigError {
    /// The file could not be read.
    #[error("cannot read config file {0}: {1}")]
    Read(String, std::io::Error),
    /// The file is not JSON of the expected shape.
    #[error("config file {0} is not valid: {1}")]
    Parse(String, serde_json::Error),
    /// A setting cannot work.
    #[error("config setting {0}: {1}")]
    Invalid(&'static str, String),
    /// The admin token's file cannot be read, or the token is set twice.
    #[error("config setting {0}")]
    Secret(#[from] SecretError),
}

impl InitConfig {
    /// Reads a config file; returns it and the top-level keys this program ignores.
    pub fn from_file(path: &Path) -> Result<(Self, Vec<String>), InitConfigError> {
        let name = path.display().to_string();
        let text =
            std::fs::read_to_string(path).map_err(|e| InitConfigError::Read(name.clone(), e))?;
        let value: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| InitConfigError::Parse(name.clone(), e))?;
        let ignored = value
            .as_object()
            .map(|m| {
                m.keys()
                    .filter(|k| !KNOWN_KEYS.contains(&k.as_str()))
                    .cloned()
                    .collect()
            })
            .unwrap_or_default();
        let config = serde_json::from_value(value).map_err(|e| InitConfigError::Parse(name, e))?;
        Ok((config, ignored))
    }

    /// Reads `AdminTokenFile` into `AdminToken`, once (the file setting is then cleared).
    /// Both set, or an unreadable or empty file, is refused. The command line and environment,
    /// which take precedence, are applied by the binary before this.
    pub fn load_secret_files(&mut self) -> Result<(), InitConfigError> {
        self.admin_token = resolve_secret(
            self.admin_token.take(),
            self.admin_token_file.take().as_deref(),
            "AdminToken",
            "AdminTokenFile",
        )?;
        Ok(())
    }

    /// One puller's settings per coin of `UserListAPI`.
    pub fn pullers(&self) -> Result<Vec<PullerSettings>, InitConfigError> {
        if self.user_list_api.is_empty() {
            return Err(InitConfigError::Invalid(
                "UserListAPI",
                "no user list is configured".into(),
            ));
        }
        if self.interval_seconds == 0 {
            return Err(InitConfigError::Invalid(
                "IntervalSeconds",
                "must be at least 1".into(),
            ));
        }
        if self.user_list_timeout_seconds == 0 {
            return Err(InitConfigError::Invalid(
                "UserListTimeoutSeconds",
                "must be at least 1".into(),
            ));
        }
        Ok(self
            .user_list_api
            .iter()
            .map(|(coin, url)| {
                let mut s = PullerSettings::new(
                    coin.clone(),
                    url.clone(),
                    Duration::from_secs(self.interval_seconds),
                );
                s.timeout = Duration::from_secs(self.user_list_timeout_seconds);
                s
            })
            .collect())
    }

    /// The user-list API's address, when enabled.
    pub fn api_addr(&self) -> Result<Option<SocketAddr>, InitConfigError> {
        if !self.enable_api_server {
            return Ok(None);
        }
        self.listen_addr.parse().map(Some).map_err(|e| {
            InitConfigError::Invalid(
                "ListenAddr",
                format!("{:?} is not an IP:port address: {e}", self.listen_addr),
            )
        })
    }

    /// TLS to `https://` control endpoints (`ControlTls*`), when configured.
    pub fn control_tls(&self) -> Result<Option<switchyard_tls::ClientTlsFiles>, InitConfigError> {
        switchyard_tls::ClientTlsFiles::from_settings(
            self.control_tls_ca_file.clone(),
            self.control_tls_cert_file.clone(),
            self.control_tls_key_file.clone(),
            self.control_tls_server_name.clone(),
        )
        .map_err(|e| InitConfigError::Invalid("ControlTls*", e.to_string()))
    }

    /// Checks every setting.
    pub fn validate(&self) -> Result<(), InitConfigError> {
        if self.control_endpoints.is_empty() {
            return Err(InitConfigError::Invalid(
                "ControlEndpoints",
                "no control endpoint is configured".into(),
            ));
        }
        if !matches!(self.log_format.as_str(), "text" | "json" | "") {
            return Err(InitConfigError::Invalid(
                "LogFormat",
                format!("{:?} is neither \"text\" nor \"json\"", self.log_format),
            ));
        }
        self.pullers()?;
        self.api_addr()?;
        self.control_tls()?;
        Ok(())
    }
}
