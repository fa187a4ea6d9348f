//! The README's quick start, as a user runs it: the real `switchyard-quickstart` binary on free
//! ports and a temp data directory. It prints its instructions (curl before grpcurl, the
//! case-sensitivity of names); a miner logs in as `alice.rig1`, gets the low share difficulty
//! before its first job, and btc jobs; a second worker on the same connection is logged with
//! the first; a switch over gRPC brings it bch jobs on the same connection, one over the HTTP
//! switch API (the printed curl command) brings it back to btc; SIGTERM stops the whole node
//! cleanly. Restarted on the same data directory with alice on bch, it prints bch, not btc.

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
    dir: TempDir,
}

impl Quickstart {
    fn spawn() -> Self {
        Self::spawn_in(tempfile::tempdir().expect("tempdir"))
    }

    /// Runs it again on the same data directory (and new ports), once it has exited.
    fn restart(mut self) -> Self {
        assert!(self.child.is_none(), "restarted while running");
        let dir = std::mem::replace(&mut self.dir, tempfile::tempdir().expect("tempdir"));
        Self::spawn_in(dir)
    }

    /// Runs it with its data, stdout and stderr in `dir`.
    fn spawn_in(dir: TempDir) -> Self {
        let binary = workspace_binary("switchyard-quickstart").expect("the binary");
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
            dir,
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
        "alice, on btc (seeded now)".to_string(),
        "IDs like \"btc-3\"".to_string(),
        "share difficulty 0.01".to_string(),
        "minerd -a sha256d".to_string(),
        "Names are case-sensitive: alice and Alice are two users".to_string(),
        "StratumServerCaseInsensitive".to_string(),
    ] {
        assert!(printed.contains(&expected), "{expected:?} in:\n{printed}");
    }
    let curl = printed
        .find("curl -u admin:admin")
        .expect("the curl switch");
    let grpcurl = printed.find("grpcurl").expect("the grpcurl switch");
    assert!(
        curl < grpcurl,
        "curl first (it needs no extra tool):\n{printed}"
    );

    let mut miner = Miner::connect(qs.listen.parse().expect("the listen address"))
        .await
        .expect("connect to the proxy");
    let (_, auth) = miner
        .bitcoin_login("alice.rig1", T)
        .await
        .expect("login as alice.rig1");
    assert_eq!(auth["result"], json!(true), "{auth}");
    miner.wait_job_of("btc", T).await.expect("a btc job");
    // The low difficulty a CPU miner needs, set before the first job.
    let first = |method: &str| miner.received.iter().position(|v| v["method"] == method);
    let (difficulty, job) = (first("mining.set_difficulty"), first("mining.notify"));
    assert!(
        difficulty.is_some_and(|d| job.is_some_and(|j| d < j)),
        "the difficulty comes before the first job: {:?}",
        miner.received
    );
    let difficulty = &miner.received[difficulty.unwrap_or_default()];
    assert_eq!(difficulty["params"], json!([0.01]), "{difficulty}");
    // A second worker on the same connection (a mining proxy's way).
    let rig2 = miner
        .request("mining.authorize", json!(["alice.rig2", "x"]))
        .await
        .expect("authorize rig2");
    let rig2 = miner.answer(rig2, T).await.expect("rig2's answer");
    assert_eq!(rig2["result"], json!(true), "{rig2}");

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
    // The session's log lines name both its workers.
    let both = "worker=alice.rig1,alice.rig2";
    let logged = wait_until(T, "the switch logged under both workers", || {
        let log = qs.log();
        let seen = if log.contains(both) && log.contains("another worker authorized") {
            Ok(())
        } else {
            Err(log)
        };
        async move { seen }
    })
    .await;
    logged.unwrap_or_else(|e| panic!("{e}"));

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

    // Leave alice on bch, stop, and start again on the same data directory.
    let answer: serde_json::Value = reqwest::Client::new()
        .get(format!("http://{}/switch?puname=alice&coin=bch", qs.http))
        .basic_auth("admin", Some("admin"))
        .send()
        .await
        .expect("the HTTP switch API")
        .json()
        .await
        .expect("a JSON answer");
    assert_eq!(answer["err_no"], json!(0), "{answer}");
    miner
        .wait_job_of("bch", T)
        .await
        .expect("a bch job before the restart");
    drop(miner);

    let status = qs.terminate().await;
    assert!(status.success(), "exit {status}\n--- log ---\n{}", qs.log());
    assert!(qs.log().contains("stopped"), "{}", qs.log());

    // The next steps follow the store: alice is on bch, so step 2 switches her to btc.
    let mut qs = qs.restart();
    let printed = qs.wait_ready().await;
    for expected in [
        "alice, on bch (as ".to_string(),
        "IDs like \"bch-3\" (alice is on bch)".to_string(),
        format!(
            "curl -u admin:admin 'http://{}/switch?puname=alice&coin=btc'",
            qs.http
        ),
        format!(
            "grpcurl -plaintext -d '{{\"user\":\"alice\",\"coin\":\"btc\"}}' {} switchyard.v1.SwitcherAdmin/SwitchCoin",
            qs.grpc
        ),
    ] {
        assert!(printed.contains(&expected), "{expected:?} in:\n{printed}");
    }
    assert!(!printed.contains("btc-3"), "{printed}");
    let mut miner = Miner::connect(qs.listen.parse().expect("the listen address"))
        .await
        .expect("connect to the restarted proxy");
    let (_, auth) = miner
        .bitcoin_login("alice.rig1", T)
        .await
        .expect("login as alice.rig1");
    assert_eq!(auth["result"], json!(true), "{auth}");
    miner
        .wait_job_of("bch", T)
        .await
        .expect("a bch job after the restart");
    let status = qs.terminate().await;
    assert!(status.success(), "exit {status}\n--- log ---\n{}", qs.log());
}
