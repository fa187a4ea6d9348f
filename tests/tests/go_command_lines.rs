//! The Go programs' command lines on the real binaries (issue 12, item 3): the supervisor
//! entries of the Go switcher's README, with only the binary path replaced, start
//! `switchyard-control`, `switchyard-proxy` and `switchyard-init`, and their logs land in
//! `-log_dir` (errors only on stderr), or on stderr with `-logtostderr`, at the level `-v` asks;
//! `-h` prints exactly what `--help` prints. The proxy's `ControlEndpoints` here are written
//! `host:port`, without `http://`.
//!
//! `RUST_LOG` is removed from each binary's environment so that `-v` alone sets the level.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    time::Duration,
};

use serde_json::json;
use switchyard_tests::{
    control::{InProcessControl, free_port, wait_serving, workspace_binary},
    proxy::proxy_config,
    sserver::{Sserver, SserverConfig},
    userlist::{Answer, UserListBackend},
    wait::wait_until,
};
use tempfile::TempDir;

/// The bound on every wait.
const T: Duration = Duration::from_secs(60);

/// A binary run with stdout and stderr in files of its temp directory. Killed on drop.
struct Run {
    child: Option<Child>,
    dir: TempDir,
}

impl Run {
    /// Runs `binary` with `args`, each `{dir}` in them replaced by the temp directory.
    fn spawn(binary: &str, args: &[String], dir: TempDir) -> Self {
        let path = workspace_binary(binary).expect("the binary is built");
        let root = dir.path().to_str().expect("a UTF-8 temp dir").to_owned();
        let stdout = std::fs::File::create(dir.path().join("stdout.txt")).expect("stdout file");
        let stderr = std::fs::File::create(dir.path().join("stderr.txt")).expect("stderr file");
        let child = Command::new(path)
            .current_dir(dir.path())
            .args(args.iter().map(|a| a.replace("{dir}", &root)))
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .expect("spawning the binary");
        Self {
            child: Some(child),
            dir,
        }
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("stderr.txt")).unwrap_or_default()
    }

    fn exited(&mut self) -> Option<ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// Waits until a file `PROGRAM.*.log` in `log_dir` contains `text`; returns the file's
    /// text. Fails at once if the process exits.
    async fn wait_log_file(&mut self, log_dir: &Path, program: &str, text: &str) -> String {
        let waited = wait_until(T, &format!("{text:?} in {program}'s log file"), || {
            let seen = match self.exited() {
                Some(status) => Err(format!("exited: {status}")),
                None => {
                    let files = log_files(log_dir, program);
                    match files.as_slice() {
                        [file] => {
                            let log = std::fs::read_to_string(file).unwrap_or_default();
                            if log.contains(text) {
                                Ok(log)
                            } else {
                                Err(log)
                            }
                        }
                        files => Err(format!("log files: {files:?}")),
                    }
                }
            };
            async move { seen }
        })
        .await;
        waited.unwrap_or_else(|e| panic!("{e}\n--- stderr ---\n{}", self.stderr()))
    }

    /// Waits until stderr contains `text`; returns it.
    async fn wait_stderr(&mut self, text: &str) -> String {
        let waited = wait_until(T, &format!("{text:?} on stderr"), || {
            let seen = match self.exited() {
                Some(status) => Err(format!("exited: {status}\n{}", self.stderr())),
                None => {
                    let log = self.stderr();
                    if log.contains(text) {
                        Ok(log)
                    } else {
                        Err(log)
                    }
                }
            };
            async move { seen }
        })
        .await;
        waited.unwrap_or_else(|e| panic!("{e}"))
    }

    /// SIGTERM, then the exit status.
    async fn terminate(&mut self) -> ExitStatus {
        let pid = self.child.as_ref().expect("running").id();
        let kill = Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .expect("running kill");
        assert!(kill.success(), "kill -TERM {pid}: {kill}");
        let waited = wait_until(T, "the exit after SIGTERM", || {
            let seen = self.exited().ok_or_else(|| "still running".to_string());
            async move { seen }
        })
        .await;
        let status = waited.unwrap_or_else(|e| panic!("{e}\n--- stderr ---\n{}", self.stderr()));
        self.child = None;
        status
    }
}

impl Drop for Run {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The files `PROGRAM.*.log` in `dir`.
fn log_files(dir: &Path, program: &str) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&format!("{program}.")) && n.ends_with(".log"))
        })
        .collect()
}

/// A temp directory holding `config` as `config.json`.
fn with_config(config: &serde_json::Value) -> TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("config.json"), config.to_string()).expect("write config");
    dir
}

fn args(args: &[&str]) -> Vec<String> {
    args.iter().map(|a| (*a).to_owned()).collect()
}

/// The Go supervisor entry's form: nothing but errors reaches stderr, the log file has the
/// start at info (`-v 2`) and nothing at debug.
fn assert_files_only(log: &str, stderr: &str) {
    assert!(log.contains("level=info"), "-v 2 logs at info:\n{log}");
    assert!(!log.contains("DEBUG"), "-v 2 logs nothing at debug:\n{log}");
    assert!(
        !stderr.contains(" INFO "),
        "with -log_dir, info lines stay out of stderr:\n{stderr}"
    );
}

#[tokio::test]
async fn control_runs_with_the_go_command_lines() {
    let port = free_port().expect("port");
    let addr = format!("127.0.0.1:{port}");
    // A temp directory with the config, the data directory inside it.
    let control_dir = || {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = json!({
            "GrpcListenAddr": addr,
            "DataDir": dir.path().join("data"),
            "AvailableCoins": ["btc", "bch"],
        });
        std::fs::write(dir.path().join("config.json"), config.to_string()).expect("config");
        dir
    };
    let dir = control_dir();
    let log_dir = dir.path().join("log");
    // The supervisor entry, exactly: -config=FILE -log_dir=DIR -v 2.
    let mut control = Run::spawn(
        "switchyard-control",
        &args(&["-config={dir}/config.json", "-log_dir={dir}/log", "-v", "2"]),
        dir,
    );
    wait_serving(addr.parse().expect("address"))
        .await
        .unwrap_or_else(|e| panic!("{e}\n--- stderr ---\n{}", control.stderr()));
    let log = control
        .wait_log_file(&log_dir, "switchyard-control", "gRPC")
        .await;
    assert_files_only(&log, &control.stderr());
    let status = control.terminate().await;
    assert!(status.success(), "{status}\n{}", control.stderr());
    let log = control
        .wait_log_file(&log_dir, "switchyard-control", "stopped")
        .await;
    assert!(log.contains("signal received"), "{log}");

    // -config FILE -logtostderr -v=3: everything on stderr, at debug.
    let dir = control_dir();
    let mut control = Run::spawn(
        "switchyard-control",
        &args(&[
            "-config",
            "{dir}/config.json",
            "-log_dir={dir}/log",
            "-logtostderr",
            "-v=3",
        ]),
        dir,
    );
    let stderr = control.wait_stderr("level=debug").await;
    assert!(stderr.contains("to=stderr"), "{stderr}");
    assert!(
        !control.dir.path().join("log").exists(),
        "-logtostderr writes no files"
    );
    wait_serving(addr.parse().expect("address"))
        .await
        .unwrap_or_else(|e| panic!("{e}\n--- stderr ---\n{}", control.stderr()));
    let status = control.terminate().await;
    assert!(status.success(), "{status}\n{}", control.stderr());
}

#[tokio::test]
async fn proxy_runs_with_the_go_command_lines_and_a_bare_control_endpoint() {
    let control = InProcessControl::start().await.expect("control");
    let sserver = Sserver::start(SserverConfig::new("btc"))
        .await
        .expect("sserver");
    let mut config = proxy_config(&[control.addr], &[&sserver]).expect("config");
    // host:port, as the Go configs write addresses: http:// is implied.
    config["ControlEndpoints"] = json!([control.addr.to_string()]);
    let metrics_addr = config["MetricsListenAddr"]
        .as_str()
        .expect("metrics address")
        .to_owned();
    let synced = || async {
        let text = reqwest::get(format!("http://{metrics_addr}/metrics"))
            .await
            .map_err(|e| e.to_string())?
            .text()
            .await
            .map_err(|e| e.to_string())?;
        if text.contains("switchyard_proxy_control_connected 1") {
            Ok(())
        } else {
            Err("not synced yet".to_string())
        }
    };

    let dir = with_config(&config);
    let log_dir = dir.path().join("log");
    let mut proxy = Run::spawn(
        "switchyard-proxy",
        &args(&["-config={dir}/config.json", "-log_dir={dir}/log", "-v", "2"]),
        dir,
    );
    wait_until(T, "the proxy synced with the control", synced)
        .await
        .unwrap_or_else(|e| panic!("{e}\n--- stderr ---\n{}", proxy.stderr()));
    let log = proxy
        .wait_log_file(&log_dir, "switchyard-proxy", "to=files in")
        .await;
    assert_files_only(&log, &proxy.stderr());
    let status = proxy.terminate().await;
    assert!(status.success(), "{status}\n{}", proxy.stderr());
    proxy
        .wait_log_file(&log_dir, "switchyard-proxy", "stopped")
        .await;

    // -config FILE -logtostderr -v 2 (the proxy refused both flags before).
    let dir = with_config(&config);
    let mut proxy = Run::spawn(
        "switchyard-proxy",
        &args(&["-config", "{dir}/config.json", "-logtostderr", "-v", "2"]),
        dir,
    );
    wait_until(T, "the proxy synced with the control", synced)
        .await
        .unwrap_or_else(|e| panic!("{e}\n--- stderr ---\n{}", proxy.stderr()));
    proxy.wait_stderr("to=stderr level=info").await;
    let status = proxy.terminate().await;
    assert!(status.success(), "{status}\n{}", proxy.stderr());
}

#[tokio::test]
async fn init_runs_with_the_go_command_line() {
    let control = InProcessControl::start().await.expect("control");
    let backend = UserListBackend::start().await.expect("backend");
    backend.script("btc", [Answer::page(&[("alice", 1)])]);
    let config = json!({
        "ControlEndpoints": [format!("http://{}", control.addr)],
        "UserListAPI": {"btc": backend.url("btc")},
        "IntervalSeconds": 1,
        "ZKBroker": ["127.0.0.1:2181"],
    });
    let dir = with_config(&config);
    let log_dir = dir.path().join("log");
    let mut init = Run::spawn(
        "switchyard-init",
        &args(&["-config={dir}/config.json", "-log_dir={dir}/log", "-v", "2"]),
        dir,
    );
    let log = init
        .wait_log_file(&log_dir, "switchyard-init", "pulling user list")
        .await;
    assert_files_only(&log, &init.stderr());
    let status = init.terminate().await;
    assert!(status.success(), "{status}\n{}", init.stderr());
}

#[test]
fn dash_h_prints_the_same_as_dash_dash_help() {
    for binary in ["switchyard-control", "switchyard-proxy", "switchyard-init"] {
        let path = workspace_binary(binary).expect("the binary is built");
        let help = |flag: &str| {
            let out = Command::new(&path)
                .arg(flag)
                .env_remove("RUST_LOG")
                .output()
                .expect("running the binary");
            assert!(out.status.success(), "{binary} {flag}: {}", out.status);
            String::from_utf8(out.stdout).expect("UTF-8 help")
        };
        let long = help("--help");
        assert!(
            long.contains("CONFIG FILE KEYS"),
            "{binary} --help:\n{long}"
        );
        for flag in ["-log_dir", "-logtostderr", "-v N"] {
            assert!(long.contains(flag), "{binary} --help names {flag}:\n{long}");
        }
        assert_eq!(help("-h"), long, "{binary} -h");
        assert_eq!(help("-help"), long, "{binary} -help");
    }
}
