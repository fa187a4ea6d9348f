//! The README's quick start, as a user runs it: the real `switchyard-quickstart` binary on free
//! ports and a temp data directory. It prints its instructions; a miner logs in as
//! `alice.rig1` and gets btc jobs; a switch over gRPC brings it bch jobs on the same
//! connection, one over the HTTP switch API (the printed curl command) brings it back to btc;
//! SIGTERM stops the whole node cleanly.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    time::Duration,
};

use serde_json::json;
use switchyard_proto::v1::{SwitchCoinRequest, switcher_admin_client::SwitcherAdminClient};
use switchyard_tests::{
    control::{channel, free_port, workspace_binary},
    miner::Miner,
    wait::wait_until,
};
use tempfile::TempDir;

/// The bound on each wait for the miner.
const T: Duration = Duration::from_secs(30);

/// The last line of the printed instructions.
const READY: &str = "Switchyard quick start is running.";

/// The quick-start binary, run with stdout and stderr in files of a temp directory. Killed on
/// drop.
struct Quickstart {
    child: Option<Child>,
    listen: String,
    grpc: String,
    http: String,
    metrics: String,
    out_path: PathBuf,
    log_path: PathBuf,
    _dir: TempDir,
}

impl Quickstart {
    fn spawn() -> Self {
        let binary = workspace_binary("switchyard-quickstart").expect("the binary");
        let dir = tempfile::tempdir().expect("tempdir");
        let port = || format!("127.0.0.1:{}", free_port().expect("a free port"));
        let (listen, grpc, http, metrics) = (port(), port(), port(), port());
        let out_path = dir.path().join("stdout.txt");
        let log_path = dir.path().join("stderr.txt");
        let out = std::fs::File::create(&out_path).expect("stdout file");
        let log = std::fs::File::create(&log_path).expect("stderr file");
        let child = Command::new(binary)
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .args(["--grpc", &grpc, "--http", &http])
            .args(["--listen", &listen, "--metrics", &metrics])
            .args(["--job-interval", "1"])
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(log)
            .spawn()
            .expect("spawning switchyard-quickstart");
        Self {
            child: Some(child),
            listen,
            grpc,
            http,
            metrics,
            out_path,
            log_path,
            _dir: dir,
        }
    }

    fn read(path: &Path) -> String {
        std::fs::read_to_string(path).unwrap_or_default()
    }

    /// What it printed so far.
    fn stdout(&self) -> String {
        Self::read(&self.out_path)
    }

    /// Its log so far.
    fn log(&self) -> String {
        Self::read(&self.log_path)
    }

    /// `Some(status)` once it has exited.
    fn exited(&mut self) -> Option<ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// Waits until the instructions are printed (failing at once if it exits).
    async fn wait_ready(&mut self) -> String {
        let waited = wait_until(Duration::from_secs(120), "the printed instructions", || {
            let seen = match self.exited() {
                Some(status) => Err(format!("exited early: {status}")),
                None => {
                    let out = self.stdout();
                    if out.contains(READY) {
                        Ok(out)
                    } else {
                        Err(format!("{} bytes printed", out.len()))
                    }
                }
            };
            async move { seen }
        })
        .await;
        waited.unwrap_or_else(|e| {
            panic!(
                "{e}\n--- stdout ---\n{}\n--- log ---\n{}",
                self.stdout(),
                self.log()
            )
        })
    }

    /// Sends SIGTERM and waits for the exit status.
    async fn terminate(&mut self) -> ExitStatus {
        let pid = self.child.as_ref().expect("running").id();
        let kill = Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .expect("running kill");
        assert!(kill.success(), "kill -TERM {pid}: {kill}");
        let waited = wait_until(Duration::from_secs(60), "the exit after SIGTERM", || {
            let seen = self.exited().ok_or_else(|| "still running".to_string());
            async move { seen }
        })
        .await;
        let status = waited.unwrap_or_else(|e| panic!("{e}\n--- log ---\n{}", self.log()));
        self.child = None;
        status
    }
}

impl Drop for Quickstart {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

#[tokio::test]
async fn the_quick_start_serves_a_miner_and_switches_it() {
    let mut qs = Quickstart::spawn();
    let printed = qs.wait_ready().await;
    for expected in [
        format!("stratum+tcp://{}", qs.listen),
        "alice.rig1".to_string(),
        format!(
            "grpcurl -plaintext -d '{{\"user\":\"alice\",\"coin\":\"bch\"}}' {} switchyard.v1.SwitcherAdmin/SwitchCoin",
            qs.grpc
        ),
        format!("{} switchyard.v1.SwitcherAdmin/ListUserCoins", qs.grpc),
        format!(
            "curl -u admin:admin 'http://{}/switch?puname=alice&coin=bch'",
            qs.http
        ),
        format!("http://{}/metrics", qs.metrics),
    ] {
        assert!(printed.contains(&expected), "{expected:?} in:\n{printed}");
    }

    let mut miner = Miner::connect(qs.listen.parse().expect("the listen address"))
        .await
        .expect("connect to the proxy");
    let (_, auth) = miner
        .bitcoin_login("alice.rig1", T)
        .await
        .expect("login as alice.rig1");
    assert_eq!(auth["result"], json!(true), "{auth}");
    miner.wait_job_of("btc", T).await.expect("a btc job");

    // The printed grpcurl switch, over gRPC.
    SwitcherAdminClient::new(channel(qs.grpc.parse().expect("the gRPC address")))
        .switch_coin(SwitchCoinRequest {
            user: "alice".into(),
            coin: "bch".into(),
        })
        .await
        .expect("switch alice to bch");
    miner
        .wait_job_of("bch", T)
        .await
        .expect("a bch job after the switch");

    // The printed curl switch (back to btc), over the HTTP switch API.
    let answer: serde_json::Value = reqwest::Client::new()
        .get(format!("http://{}/switch?puname=alice&coin=btc", qs.http))
        .basic_auth("admin", Some("admin"))
        .send()
        .await
        .expect("the HTTP switch API")
        .json()
        .await
        .expect("a JSON answer");
    assert_eq!(answer["err_no"], json!(0), "{answer}");
    miner
        .wait_job_of("btc", T)
        .await
        .expect("a btc job after switching back");
    assert!(miner.malformed.is_empty(), "{:?}", miner.malformed);

    let metrics = reqwest::get(format!("http://{}/metrics", qs.metrics))
        .await
        .expect("the metrics endpoint")
        .text()
        .await
        .expect("the metrics text");
    assert!(
        metrics.contains("switchyard_proxy_switches_total{coin=\"bch\",outcome=\"ok\"} 1"),
        "{metrics}"
    );

    let status = qs.terminate().await;
    assert!(status.success(), "exit {status}\n--- log ---\n{}", qs.log());
    assert!(qs.log().contains("stopped"), "{}", qs.log());
}
