//! The control service under test, two ways: in-process ([`InProcessControl`], the library
//! server on a real socket) and as the real `switchyard-control` binary ([`ControlProcess`],
//! killed on drop). Both serve on loopback with a private data directory.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    time::{Duration, Instant},
};

use switchyard_control::{ControlPlane, config::ControlConfig};
use switchyard_proto::v1::{
    proxy_control_client::ProxyControlClient, switcher_admin_client::SwitcherAdminClient,
};
use tempfile::TempDir;
use tokio::{net::TcpListener, task::JoinHandle};
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

use crate::wait::wait_until;

/// The coins every test control service accepts.
pub const TEST_COINS: [&str; 3] = ["btc", "bch", "ltc"];

/// Why a control fixture failed.
#[derive(Debug, thiserror::Error)]
pub enum ControlFixtureError {
    /// A file or process operation failed.
    #[error("{0}: {1}")]
    Io(&'static str, std::io::Error),
    /// The control service failed to start.
    #[error("control service: {0}")]
    Control(#[from] switchyard_control::ControlError),
    /// The binary is not built.
    #[error(
        "{0} does not exist: build the binaries first (`cargo build --workspace`, as README's test command does)"
    )]
    MissingBinary(PathBuf),
    /// A condition was not met in time.
    #[error("{0}")]
    Timeout(String),
}

/// A config for a test control service on `data_dir`.
pub fn test_config(data_dir: &Path) -> ControlConfig {
    ControlConfig {
        grpc_listen_addr: "127.0.0.1:0".into(),
        data_dir: data_dir.to_owned(),
        available_coins: TEST_COINS.iter().map(|c| (*c).to_owned()).collect(),
        ..ControlConfig::default()
    }
}

/// A gRPC channel to `addr` (lazy: it connects on first use and reconnects after).
pub fn channel(addr: SocketAddr) -> Channel {
    Endpoint::from_shared(format!("http://{addr}"))
        .map(|e| e.connect_timeout(Duration::from_secs(5)))
        .map(|e| e.connect_lazy())
        .unwrap_or_else(|e| panic!("a loopback address is a valid endpoint: {e}"))
}

/// A TLS gRPC channel to `addr` (`https://127.0.0.1:port`) trusting and presenting what
/// `tls` names.
pub fn tls_channel(
    addr: SocketAddr,
    tls: &switchyard_tls::ClientTlsFiles,
) -> Result<Channel, ControlFixtureError> {
    let config = tls
        .tonic_config()
        .map_err(|e| ControlFixtureError::Timeout(format!("client TLS: {e}")))?;
    Endpoint::from_shared(format!("https://{addr}"))
        .and_then(|e| e.tls_config(config))
        .map(|e| e.connect_timeout(Duration::from_secs(5)).connect_lazy())
        .map_err(|e| ControlFixtureError::Timeout(format!("TLS endpoint: {e}")))
}

/// Waits until the health service at `addr` reports SERVING.
pub async fn wait_serving(addr: SocketAddr) -> Result<(), ControlFixtureError> {
    wait_serving_on(channel(addr)).await
}

/// Waits until the health service behind `channel` reports SERVING.
pub async fn wait_serving_on(channel: Channel) -> Result<(), ControlFixtureError> {
    let health = HealthClient::new(channel);
    wait_until(Duration::from_secs(30), "control health SERVING", || {
        let mut health = health.clone();
        async move {
            match health
                .check(HealthCheckRequest {
                    service: String::new(),
                })
                .await
            {
                Ok(r) if r.get_ref().status == ServingStatus::Serving as i32 => Ok(()),
                Ok(r) => Err(format!("status {}", r.get_ref().status)),
                Err(e) => Err(e.to_string()),
            }
        }
    })
    .await
    .map_err(ControlFixtureError::Timeout)
}

/// The control service's library server, running in this process on a real socket.
#[derive(Debug)]
pub struct InProcessControl {
    /// Where it serves gRPC.
    pub addr: SocketAddr,
    /// Its switching core, for what the APIs do not reach (e.g. ingestion's first-seen times).
    pub core: std::sync::Arc<switchyard_control::core::SwitchCore>,
    shutdown: CancellationToken,
    task: Option<JoinHandle<Result<(), switchyard_control::ControlError>>>,
    _data_dir: Option<TempDir>,
}

impl InProcessControl {
    /// Starts a control service with the test config and a fresh data directory.
    pub async fn start() -> Result<Self, ControlFixtureError> {
        Self::start_with(|_| {}).await
    }

    /// Starts one with the test config changed by `adjust`.
    pub async fn start_with(
        adjust: impl FnOnce(&mut ControlConfig),
    ) -> Result<Self, ControlFixtureError> {
        let dir = tempfile::tempdir().map_err(|e| ControlFixtureError::Io("tempdir", e))?;
        let mut config = test_config(dir.path());
        adjust(&mut config);
        let mut this = Self::start_config(&config).await?;
        this._data_dir = Some(dir);
        Ok(this)
    }

    /// Starts one with exactly `config` (its data directory is the caller's).
    pub async fn start_config(config: &ControlConfig) -> Result<Self, ControlFixtureError> {
        Self::start_config_with(config, None).await
    }

    /// Starts one with the test config changed by `adjust`, serving gRPC over TLS; `client` is
    /// what the readiness check trusts and presents.
    pub async fn start_tls(
        adjust: impl FnOnce(&mut ControlConfig),
        client: &switchyard_tls::ClientTlsFiles,
    ) -> Result<Self, ControlFixtureError> {
        let dir = tempfile::tempdir().map_err(|e| ControlFixtureError::Io("tempdir", e))?;
        let mut config = test_config(dir.path());
        adjust(&mut config);
        let mut this = Self::start_config_with(&config, Some(client)).await?;
        this._data_dir = Some(dir);
        Ok(this)
    }

    async fn start_config_with(
        config: &ControlConfig,
        tls: Option<&switchyard_tls::ClientTlsFiles>,
    ) -> Result<Self, ControlFixtureError> {
        let shutdown = CancellationToken::new();
        let plane = ControlPlane::open(config, shutdown.clone()).await?;
        let core = std::sync::Arc::clone(plane.core());
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(|e| ControlFixtureError::Io("bind", e))?;
        let addr = listener
            .local_addr()
            .map_err(|e| ControlFixtureError::Io("local_addr", e))?;
        let task = tokio::spawn(plane.serve(listener, shutdown.clone()));
        match tls {
            Some(tls) => wait_serving_on(tls_channel(addr, tls)?).await?,
            None => wait_serving(addr).await?,
        }
        Ok(Self {
            addr,
            core,
            shutdown,
            task: Some(task),
            _data_dir: None,
        })
    }

    /// A SwitcherAdmin client.
    pub fn admin(&self) -> SwitcherAdminClient<Channel> {
        SwitcherAdminClient::new(channel(self.addr))
    }

    /// A ProxyControl client.
    pub fn proxy_control(&self) -> ProxyControlClient<Channel> {
        ProxyControlClient::new(channel(self.addr))
    }

    /// Shuts the service down and waits until it has stopped; returns how it ended.
    pub async fn shutdown(mut self) -> Result<(), ControlFixtureError> {
        self.shutdown.cancel();
        match self.task.take() {
            Some(task) => match tokio::time::timeout(Duration::from_secs(30), task).await {
                Ok(Ok(result)) => result.map_err(Into::into),
                Ok(Err(join)) => Err(ControlFixtureError::Timeout(format!(
                    "server task failed: {join}"
                ))),
                Err(_) => Err(ControlFixtureError::Timeout(
                    "server did not stop within 30 s of shutdown".into(),
                )),
            },
            None => Ok(()),
        }
    }
}

impl Drop for InProcessControl {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// The path of a workspace binary next to the running test executable
/// (`target/<profile>/deps/<test>` → `target/<profile>/<name>`).
pub fn workspace_binary(name: &str) -> Result<PathBuf, ControlFixtureError> {
    let exe = std::env::current_exe().map_err(|e| ControlFixtureError::Io("current_exe", e))?;
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .ok_or_else(|| ControlFixtureError::MissingBinary(PathBuf::from(name)))?;
    let path = profile_dir.join(name);
    if path.is_file() {
        Ok(path)
    } else {
        Err(ControlFixtureError::MissingBinary(path))
    }
}

/// A free loopback port (bound then released; the caller binds it again soon after).
pub fn free_port() -> Result<u16, ControlFixtureError> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")
        .map_err(|e| ControlFixtureError::Io("bind", e))?;
    listener
        .local_addr()
        .map(|a| a.port())
        .map_err(|e| ControlFixtureError::Io("local_addr", e))
}

/// The real `switchyard-control` binary, run on a config file in its own data directory.
/// Killed on drop.
#[derive(Debug)]
pub struct ControlProcess {
    /// Where it serves gRPC.
    pub addr: SocketAddr,
    child: Option<Child>,
    config_path: PathBuf,
    log_path: PathBuf,
    dir: TempDir,
    extra_env: Vec<(String, String)>,
    /// What the readiness check trusts and presents when gRPC is served over TLS.
    tls: Option<switchyard_tls::ClientTlsFiles>,
}

impl ControlProcess {
    /// [`Self::start_with`] for a config that serves gRPC over TLS: the readiness check
    /// trusts and presents what `client` names.
    pub async fn start_tls_with(
        adjust: impl FnOnce(&mut serde_json::Value),
        client: switchyard_tls::ClientTlsFiles,
    ) -> Result<Self, ControlFixtureError> {
        Self::start_inner(adjust, Vec::new(), Some(client)).await
    }

    /// Starts the binary with a test config (its data directory inside a fresh temp dir),
    /// adjusted by `adjust`, and waits until it is SERVING.
    pub async fn start_with(
        adjust: impl FnOnce(&mut serde_json::Value),
        extra_env: Vec<(String, String)>,
    ) -> Result<Self, ControlFixtureError> {
        Self::start_inner(adjust, extra_env, None).await
    }

    /// The binary on the shared ZooKeeper test server, its directories under `root` (see
    /// [`crate::zookeeper::unique_root`]), the config then changed by `adjust`.
    pub async fn on_zookeeper(
        root: &str,
        adjust: impl FnOnce(&mut serde_json::Value),
    ) -> Result<Self, ControlFixtureError> {
        let zk = crate::zookeeper::ZooKeeperServer::shared()
            .map_err(|e| ControlFixtureError::Timeout(format!("ZooKeeper: {e}")))?;
        let broker = zk.connect_string();
        Self::start_with(
            |c| {
                c["ZKBroker"] = serde_json::json!([broker]);
                c["ZKSwitcherWatchDir"] = serde_json::json!(format!("{root}/switcher/"));
                c["ZKSwitchyardDir"] = serde_json::json!(format!("{root}/switchyard/"));
                c["ZKServerIDAssignDir"] = serde_json::json!(format!("{root}/swid/"));
                adjust(c);
            },
            Vec::new(),
        )
        .await
    }

    async fn start_inner(
        adjust: impl FnOnce(&mut serde_json::Value),
        extra_env: Vec<(String, String)>,
        tls: Option<switchyard_tls::ClientTlsFiles>,
    ) -> Result<Self, ControlFixtureError> {
        let dir = tempfile::tempdir().map_err(|e| ControlFixtureError::Io("tempdir", e))?;
        let port = free_port()?;
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let mut config = serde_json::json!({
            "GrpcListenAddr": addr.to_string(),
            "DataDir": dir.path().join("data"),
            "AvailableCoins": TEST_COINS,
        });
        adjust(&mut config);
        let config_path = dir.path().join("control.json");
        std::fs::write(&config_path, config.to_string())
            .map_err(|e| ControlFixtureError::Io("writing the config", e))?;
        let mut this = Self {
            addr,
            child: None,
            log_path: dir.path().join("control.log"),
            config_path,
            dir,
            extra_env,
            tls,
        };
        this.spawn().await?;
        Ok(this)
    }

    async fn spawn(&mut self) -> Result<(), ControlFixtureError> {
        let binary = workspace_binary("switchyard-control")?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .map_err(|e| ControlFixtureError::Io("opening the log", e))?;
        let log_err = log
            .try_clone()
            .map_err(|e| ControlFixtureError::Io("cloning the log", e))?;
        let mut command = Command::new(binary);
        command
            .arg("--config")
            .arg(&self.config_path)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err);
        for (k, v) in &self.extra_env {
            command.env(k, v);
        }
        let child = command
            .spawn()
            .map_err(|e| ControlFixtureError::Io("spawning switchyard-control", e))?;
        self.child = Some(child);
        let ready = match &self.tls {
            Some(tls) => match tls_channel(self.addr, tls) {
                Ok(channel) => wait_serving_on(channel).await,
                Err(e) => Err(e),
            },
            None => wait_serving(self.addr).await,
        };
        if let Err(e) = ready {
            return Err(ControlFixtureError::Timeout(format!(
                "{e}\n--- control log ---\n{}",
                self.log()
            )));
        }
        Ok(())
    }

    /// The process's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// The temp directory holding the config, the log and the data.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Sends SIGTERM and waits for the process to exit; returns its exit status.
    pub async fn terminate(&mut self) -> Result<ExitStatus, ControlFixtureError> {
        let Some(mut child) = self.child.take() else {
            return Err(ControlFixtureError::Timeout("not running".into()));
        };
        let status = Command::new("kill")
            .arg("-TERM")
            .arg(child.id().to_string())
            .status()
            .map_err(|e| ControlFixtureError::Io("running kill", e))?;
        if !status.success() {
            return Err(ControlFixtureError::Timeout(format!(
                "kill -TERM failed: {status}"
            )));
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match child.try_wait() {
                Ok(Some(status)) => return Ok(status),
                Ok(None) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(20)).await
                }
                Ok(None) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(ControlFixtureError::Timeout(format!(
                        "switchyard-control did not exit within 30 s of SIGTERM\n{}",
                        self.log()
                    )));
                }
                Err(e) => return Err(ControlFixtureError::Io("waiting for the child", e)),
            }
        }
    }

    /// Starts the binary again on the same config and data directory.
    pub async fn restart(&mut self) -> Result<(), ControlFixtureError> {
        if self.child.is_some() {
            self.terminate().await?;
        }
        self.spawn().await
    }

    /// A SwitcherAdmin client.
    pub fn admin(&self) -> SwitcherAdminClient<Channel> {
        SwitcherAdminClient::new(channel(self.addr))
    }

    /// A ProxyControl client.
    pub fn proxy_control(&self) -> ProxyControlClient<Channel> {
        ProxyControlClient::new(channel(self.addr))
    }
}

impl Drop for ControlProcess {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
