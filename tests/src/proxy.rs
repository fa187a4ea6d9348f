//! The Stratum proxy for tests: the real `switchyard-proxy` binary on a config file written
//! from a JSON value ([`ProxyProcess`]), or the library's [`Proxy`] in-process
//! ([`InProcessProxy`]), both on free loopback ports with their metrics endpoint on.

use std::{
    net::SocketAddr,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::Duration,
};

use serde_json::{Value, json};
use switchyard_proxy::{config::ProxyConfig, server::Proxy};
use tempfile::TempDir;
use tokio::time::Instant;

use crate::{
    control::{ControlFixtureError, free_port, workspace_binary},
    sserver::Sserver,
};

/// A proxy config for tests: listening on a free port, metrics on, the given control replicas
/// and sservers (coin → sserver), server ID 1 unless `adjust` says otherwise.
pub fn proxy_config(
    control: &[SocketAddr],
    sservers: &[&Sserver],
) -> Result<Value, ControlFixtureError> {
    let mut map = serde_json::Map::new();
    for s in sservers {
        map.insert(
            s.coin().to_string(),
            json!({"URL": s.addr().to_string(), "UserSuffix": s.config().suffix()}),
        );
    }
    config_with_map(control, map)
}

/// [`proxy_config`] for sservers given as (coin, address) pairs (scripted sservers, say), each
/// with the default `UserSuffix` (the coin).
pub fn proxy_config_for(
    control: &[SocketAddr],
    sservers: &[(&str, SocketAddr)],
) -> Result<Value, ControlFixtureError> {
    let mut map = serde_json::Map::new();
    for (coin, addr) in sservers {
        map.insert(
            (*coin).to_string(),
            json!({"URL": addr.to_string(), "UserSuffix": coin}),
        );
    }
    config_with_map(control, map)
}

fn config_with_map(
    control: &[SocketAddr],
    map: serde_json::Map<String, Value>,
) -> Result<Value, ControlFixtureError> {
    Ok(json!({
        "ServerID": 1,
        "ChainType": "bitcoin",
        "ListenAddr": format!("127.0.0.1:{}", free_port()?),
        "MetricsListenAddr": format!("127.0.0.1:{}", free_port()?),
        "StratumServerMap": map,
        "ControlEndpoints": control.iter().map(|a| format!("http://{a}")).collect::<Vec<_>>(),
        "HandshakeTimeoutSeconds": 20,
    }))
}

/// Starts a proxy with `start`; when its port was taken meanwhile (the ports of
/// [`proxy_config`] are free when picked, but a test running in parallel may bind one first),
/// tries again on fresh ports.
async fn on_fresh_ports<T, F, Fut>(config: &Value, start: F) -> Result<T, ControlFixtureError>
where
    F: Fn(Value) -> Fut,
    Fut: std::future::Future<Output = Result<T, ControlFixtureError>>,
{
    let mut config = config.clone();
    let mut attempt = 0;
    loop {
        attempt += 1;
        match start(config.clone()).await {
            Err(ControlFixtureError::Timeout(log))
                if attempt < 5 && log.contains("Address already in use") =>
            {
                config["ListenAddr"] = json!(format!("127.0.0.1:{}", free_port()?));
                config["MetricsListenAddr"] = json!(format!("127.0.0.1:{}", free_port()?));
            }
            other => return other,
        }
    }
}

/// The proxy library in this process.
pub struct InProcessProxy {
    /// The running proxy.
    pub proxy: Proxy,
}

impl InProcessProxy {
    /// Starts a proxy on `config` (see [`proxy_config`]) and waits until its cache is synced.
    pub async fn start(config: &Value) -> Result<Self, ControlFixtureError> {
        on_fresh_ports(config, |c| async move { Self::start_once(&c).await }).await
    }

    async fn start_once(config: &Value) -> Result<Self, ControlFixtureError> {
        let (mut config, _) = ProxyConfig::from_json(&config.to_string())
            .map_err(|e| ControlFixtureError::Timeout(format!("bad proxy config: {e}")))?;
        // No cache file unless the test names one: in-process proxies share this process's
        // working directory.
        config.cache_file.get_or_insert_with(String::new);
        let settings = config
            .settings()
            .map_err(|e| ControlFixtureError::Timeout(format!("bad proxy config: {e}")))?;
        let proxy = Proxy::start(settings)
            .await
            .map_err(|e| ControlFixtureError::Timeout(format!("proxy start: {e}")))?;
        let cache = proxy.context.cache.clone();
        tokio::time::timeout(Duration::from_secs(20), cache.wait_synced())
            .await
            .map_err(|_| ControlFixtureError::Timeout("proxy cache never synced".into()))?;
        Ok(Self { proxy })
    }

    /// Where miners connect.
    pub fn addr(&self) -> SocketAddr {
        self.proxy.listen_addr
    }

    /// The metrics text.
    pub fn metrics(&self) -> String {
        self.proxy.context.metrics.render()
    }
}

/// The real `switchyard-proxy` binary. Killed on drop.
pub struct ProxyProcess {
    /// Where miners connect.
    pub addr: SocketAddr,
    /// Where the metrics are served.
    pub metrics_addr: SocketAddr,
    /// Where TLS miners connect (`TlsListenAddr`), when the config has it.
    pub tls_addr: Option<SocketAddr>,
    child: Option<Child>,
    config_path: PathBuf,
    log_path: PathBuf,
    /// Another binary than the workspace's (a benchmark's baseline).
    binary: Option<PathBuf>,
    _dir: TempDir,
}

impl ProxyProcess {
    /// Starts the binary on `config` (see [`proxy_config`]) and waits until its metrics say
    /// the cache is synced with the control plane (`switchyard_proxy_control_connected 1`).
    pub async fn start(config: &Value) -> Result<Self, ControlFixtureError> {
        on_fresh_ports(config, |c| async move { Self::start_once(&c, None).await }).await
    }

    /// [`Self::start`] with another proxy binary than the workspace's (a benchmark comparing
    /// with an older build).
    pub async fn start_binary(
        config: &Value,
        binary: PathBuf,
    ) -> Result<Self, ControlFixtureError> {
        on_fresh_ports(config, |c| {
            let binary = binary.clone();
            async move { Self::start_once(&c, Some(binary)).await }
        })
        .await
    }

    async fn start_once(
        config: &Value,
        binary: Option<PathBuf>,
    ) -> Result<Self, ControlFixtureError> {
        let dir = tempfile::tempdir().map_err(|e| ControlFixtureError::Io("tempdir", e))?;
        let addr: SocketAddr = config["ListenAddr"]
            .as_str()
            .and_then(|a| a.parse().ok())
            .ok_or_else(|| ControlFixtureError::Timeout("config without ListenAddr".into()))?;
        let metrics_addr: SocketAddr = config["MetricsListenAddr"]
            .as_str()
            .and_then(|a| a.parse().ok())
            .ok_or_else(|| {
                ControlFixtureError::Timeout("config without MetricsListenAddr".into())
            })?;
        let config_path = dir.path().join("proxy.json");
        std::fs::write(&config_path, config.to_string())
            .map_err(|e| ControlFixtureError::Io("writing the config", e))?;
        let mut this = Self {
            addr,
            metrics_addr,
            tls_addr: config["TlsListenAddr"]
                .as_str()
                .and_then(|a| a.parse().ok()),
            child: None,
            log_path: dir.path().join("proxy.log"),
            config_path,
            binary,
            _dir: dir,
        };
        this.spawn(true).await?;
        Ok(this)
    }

    /// Stops the process (SIGTERM, then waits for it) and starts it again on the same config
    /// and directory. With `wait_control`, waits until it is synced with the control plane
    /// again; without, only until its metrics endpoint answers (the control plane may be away).
    pub async fn restart(&mut self, wait_control: bool) -> Result<(), ControlFixtureError> {
        if let Some(mut child) = self.child.take() {
            let _ = std::process::Command::new("kill")
                .arg("-TERM")
                .arg(child.id().to_string())
                .status();
            let waited = tokio::time::timeout(Duration::from_secs(30), async {
                loop {
                    if matches!(child.try_wait(), Ok(Some(_)) | Err(_)) {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            })
            .await;
            if waited.is_err() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        self.spawn(wait_control).await
    }

    /// The process's directory: its config, log, and working directory (where its cache file
    /// goes by default).
    pub fn dir(&self) -> &std::path::Path {
        self._dir.path()
    }

    async fn spawn(&mut self, wait_control: bool) -> Result<(), ControlFixtureError> {
        let binary = match &self.binary {
            Some(binary) => binary.clone(),
            None => workspace_binary("switchyard-proxy")?,
        };
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .map_err(|e| ControlFixtureError::Io("opening the log", e))?;
        let log_err = log
            .try_clone()
            .map_err(|e| ControlFixtureError::Io("cloning the log", e))?;
        let child = Command::new(binary)
            .current_dir(self._dir.path())
            .arg(format!("-config={}", self.config_path.display()))
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .spawn()
            .map_err(|e| ControlFixtureError::Io("spawning switchyard-proxy", e))?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(text) = self.metrics().await
                && (!wait_control || text.contains("switchyard_proxy_control_connected 1"))
            {
                return Ok(());
            }
            let exited = self
                .child
                .as_mut()
                .is_some_and(|c| matches!(c.try_wait(), Ok(Some(_))));
            if exited || Instant::now() > deadline {
                return Err(ControlFixtureError::Timeout(format!(
                    "the proxy never synced (exited: {exited})\n--- proxy log ---\n{}",
                    self.log()
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The metrics text, fetched over HTTP.
    pub async fn metrics(&self) -> Result<String, String> {
        let url = format!("http://{}/metrics", self.metrics_addr);
        let response = reqwest::get(&url).await.map_err(|e| e.to_string())?;
        response.text().await.map_err(|e| e.to_string())
    }

    /// The value of one metric sample (`name{labels}` exactly as rendered), 0 when absent.
    pub async fn metric(&self, sample: &str) -> Result<f64, String> {
        let text = self.metrics().await?;
        Ok(metric_value(&text, sample))
    }

    /// The process's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Sends the process a signal (`USR2`, `TERM`, ...) with `kill`.
    pub fn signal(&self, name: &str) -> Result<(), String> {
        let pid = self.pid().ok_or("the proxy is not running")?;
        let status = std::process::Command::new("kill")
            .arg(format!("-{name}"))
            .arg(pid.to_string())
            .status()
            .map_err(|e| format!("kill: {e}"))?;
        if status.success() {
            Ok(())
        } else {
            Err(format!("kill -{name} {pid}: {status}"))
        }
    }

    /// The config file the process was started with (a test may rewrite it before an
    /// upgrade).
    pub fn config_path(&self) -> &std::path::Path {
        &self.config_path
    }

    /// Whether the process still runs (the same PID: a hot upgrade keeps it).
    pub fn running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// How many lines of the log contain `text`.
    pub fn log_count(&self, text: &str) -> usize {
        self.log().lines().filter(|l| l.contains(text)).count()
    }

    /// Waits until the log holds `count` lines containing `text`.
    pub async fn wait_log(
        &self,
        text: &str,
        count: usize,
        timeout: Duration,
    ) -> Result<(), String> {
        let what = format!("{count} log lines with {text:?}");
        crate::wait::wait_until(timeout, &what, || async {
            match self.log_count(text) {
                n if n >= count => Ok(()),
                n => Err(format!("{n} such lines")),
            }
        })
        .await
        .map_err(|e| format!("{e}\n--- proxy log ---\n{}", self.log()))
    }

    /// The process's ID, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The process's resident memory, in KiB (from /proc).
    pub fn rss_kib(&self) -> Option<u64> {
        let pid = self.child.as_ref()?.id();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
    }
}

/// The value of one sample in a metrics text, 0 when absent.
pub fn metric_value(text: &str, sample: &str) -> f64 {
    text.lines()
        .find_map(|line| {
            line.strip_prefix(sample)
                .and_then(|rest| rest.strip_prefix(' '))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(0.0)
}

impl Drop for ProxyProcess {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
