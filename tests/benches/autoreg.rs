//! Benchmark (issue 14): auto-registration at pool speed.
//!
//! 2,000 new users log in within 10 s (one every 5 ms, alternating between the proxies), each a
//! miner that subscribes and authorizes with a name nobody knows, through two `switchyard-proxy`
//! binaries (server IDs 1 and 2, `EnableUserAutoReg`, `HandshakeTimeoutSeconds` 60, each
//! following both control replicas, in opposite orders) and two `switchyard-control` binaries
//! on one real ZooKeeper (production JVM) with `EnableUserAutoReg` and the default `AutoReg*`
//! bounds. The pool backend (in this process) answers each registration with a fresh puid after
//! 50 ms; `UserAutoRegAPI.IntervalSeconds` is 1. The simulated sserver (in this process) accepts
//! every worker.
//!
//! Reported: registrations per second (users authorized over the time from the first login to
//! the last authorization), the time from a miner's connect to its authorize answer (p50, p99,
//! max), how many miners got error 201 (target: none) or another failure, the backend's POSTs
//! (and any name POSTed twice), the users in ZooKeeper at the end, and the CPU time of the
//! control replicas, the proxies and ZooKeeper over the run.
//!
//! Run with `cargo build --release -p switchyard-proxy -p switchyard-control` first (the
//! benchmark starts the binaries next to it in `target/release`), then
//! `cargo bench -p switchyard-tests --bench autoreg`. `SWITCHYARD_BENCH_QUICK=1`: 200 users in
//! 1 s. Without `--bench` on the command line (as under `cargo test --benches`) it does
//! nothing. Figures go to stdout.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    process::ExitCode,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use axum::{
    Json, Router,
    extract::State,
    http::StatusCode,
    response::{IntoResponse, Response},
    routing::post,
};
use serde_json::{Value, json};
use switchyard_tests::{
    bench::{delta, jvm_pid, nproc, per_second, pid_with_arg, process_cpu, quantile},
    control::ControlProcess,
    miner::Miner,
    proxy::{ProxyProcess, proxy_config},
    sserver::{Sserver, SserverConfig},
    zookeeper::{ServerOptions, ZooKeeperServer},
};
use tokio::{net::TcpListener, time::Instant};

/// How long the backend takes to answer a registration.
const BACKEND_DELAY: Duration = Duration::from_millis(50);
/// `UserAutoRegAPI.IntervalSeconds`.
const INTERVAL_SECONDS: u64 = 1;
/// The proxies' `HandshakeTimeoutSeconds`: a miner not authorized by then gets 201.
const HANDSHAKE_SECONDS: u64 = 60;
/// How long a miner waits for its answers (beyond the handshake limit).
const MINER_TIMEOUT: Duration = Duration::from_secs(HANDSHAKE_SECONDS + 10);
/// The ZooKeeper root of the benchmark's nodes.
const ROOT: &str = "/bench-autoreg";
/// The coin registered users get.
const COIN: &str = "btc";

/// The pool backend: counts POSTs per name and in flight, answers a fresh puid after
/// [`BACKEND_DELAY`].
#[derive(Default)]
struct Backend {
    posts: Mutex<BTreeMap<String, usize>>,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
    next_puid: AtomicUsize,
    bad: AtomicUsize,
}

async fn register(State(backend): State<Arc<Backend>>, Json(body): Json<Value>) -> Response {
    let Some(name) = body["sub_name"].as_str().map(str::to_owned) else {
        backend.bad.fetch_add(1, Ordering::Relaxed);
        return StatusCode::BAD_REQUEST.into_response();
    };
    let now = backend.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
    backend.max_in_flight.fetch_max(now, Ordering::SeqCst);
    *backend
        .posts
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .entry(name)
        .or_default() += 1;
    tokio::time::sleep(BACKEND_DELAY).await;
    backend.in_flight.fetch_sub(1, Ordering::SeqCst);
    let puid = backend.next_puid.fetch_add(1, Ordering::SeqCst) + 1;
    Json(json!({"data": {"puid": puid}, "status": "success", "message": "created"})).into_response()
}

async fn start_backend() -> Result<(String, Arc<Backend>), String> {
    let backend = Arc::new(Backend::default());
    let app = Router::new()
        .route("/register", post(register))
        .with_state(Arc::clone(&backend));
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| format!("backend bind: {e}"))?;
    let addr = listener
        .local_addr()
        .map_err(|e| format!("backend address: {e}"))?;
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok((format!("http://{addr}/register"), backend))
}

/// `count` distinct names of 10 random lowercase letters (a fixed seed), like real users'
/// names: no two share a pattern by construction of the test, only by chance.
fn names(count: usize) -> Vec<String> {
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let mut seen = std::collections::BTreeSet::new();
    let mut out = Vec::with_capacity(count);
    while out.len() < count {
        let name: String = (0..10)
            .map(|_| char::from(b'a' + (next() % 26) as u8))
            .collect();
        if seen.insert(name.clone()) {
            out.push(name);
        }
    }
    out
}

/// How one miner's login ended.
#[derive(Debug)]
enum Login {
    Authorized(Duration),
    Unknown(Duration),
    Failed(String),
}

async fn login(addr: SocketAddr, worker: String) -> (Login, Option<Miner>) {
    let started = Instant::now();
    let mut miner = match Miner::connect(addr).await {
        Ok(miner) => miner,
        Err(e) => return (Login::Failed(format!("connect: {e}")), None),
    };
    match miner.bitcoin_login(&worker, MINER_TIMEOUT).await {
        Ok((_, auth)) if auth["result"] == json!(true) => {
            (Login::Authorized(started.elapsed()), Some(miner))
        }
        Ok((_, auth)) if auth["error"][0] == json!(201) => {
            (Login::Unknown(started.elapsed()), None)
        }
        Ok((_, auth)) => (Login::Failed(format!("answer {auth}")), None),
        Err(e) => (Login::Failed(e.to_string()), None),
    }
}

fn control_config(c: &mut Value, zk: &str, url: &str) {
    c["ZKBroker"] = json!([zk]);
    c["ZKSwitcherWatchDir"] = json!(format!("{ROOT}/switcher/"));
    c["ZKSwitchyardDir"] = json!(format!("{ROOT}/switchyard/"));
    c["ZKServerIDAssignDir"] = json!(format!("{ROOT}/swid/"));
    c["EnableUserAutoReg"] = json!(true);
    c["ZKAutoRegWatchDir"] = json!(format!("{ROOT}/autoreg/"));
    c["UserAutoRegAPI"] = json!({
        "IntervalSeconds": INTERVAL_SECONDS,
        "URL": url,
        "DefaultCoin": COIN,
        "PostData": {"sub_name": "{sub_name}", "source": "switchyard-bench"},
    });
}

/// CPU time of the process whose command line holds `arg`.
fn cpu_of(arg: &std::path::Path) -> Option<Duration> {
    let pid = pid_with_arg(&arg.to_string_lossy())?;
    process_cpu(&format!("/proc/{pid}/stat"))
}

fn seconds(d: Option<Duration>) -> String {
    d.map_or_else(|| "?".into(), |d| format!("{:.1} s", d.as_secs_f64()))
}

async fn run(zk: &ZooKeeperServer, users: usize, spread: Duration) -> Result<(), String> {
    let (url, backend) = start_backend().await?;
    let connect = zk.connect_string();
    let start_control =
        || ControlProcess::start_with(|c| control_config(c, &connect, &url), Vec::new());
    let control_a = start_control()
        .await
        .map_err(|e| format!("control A: {e}"))?;
    let control_b = start_control()
        .await
        .map_err(|e| format!("control B: {e}"))?;
    let btc = Sserver::start(SserverConfig::new(COIN).job_interval(None))
        .await
        .map_err(|e| format!("sserver: {e}"))?;
    let mut proxies = Vec::new();
    for (server_id, endpoints) in [
        (1, [control_a.addr, control_b.addr]),
        (2, [control_b.addr, control_a.addr]),
    ] {
        let mut config = proxy_config(&endpoints, &[&btc]).map_err(|e| e.to_string())?;
        config["ServerID"] = json!(server_id);
        config["EnableUserAutoReg"] = json!(true);
        config["AutoRegMaxWaitUsers"] = json!(users);
        config["HandshakeTimeoutSeconds"] = json!(HANDSHAKE_SECONDS);
        proxies.push(
            ProxyProcess::start(&config)
                .await
                .map_err(|e| format!("proxy {server_id}: {e}"))?,
        );
    }
    let control_configs = [
        control_a.dir().join("control.json"),
        control_b.dir().join("control.json"),
    ];
    let proxy_pids: Vec<u32> = proxies.iter().filter_map(ProxyProcess::pid).collect();
    let zk_pid = jvm_pid(zk);
    let zk_cpu = || zk_pid.and_then(|pid| process_cpu(&format!("/proc/{pid}/stat")));
    let controls_cpu = || -> Option<Duration> {
        control_configs
            .iter()
            .map(|p| cpu_of(p))
            .sum::<Option<Duration>>()
    };
    let proxies_cpu = || -> Option<Duration> {
        proxy_pids
            .iter()
            .map(|pid| process_cpu(&format!("/proc/{pid}/stat")))
            .sum::<Option<Duration>>()
    };
    let cpu_before = (controls_cpu(), proxies_cpu(), zk_cpu());

    let names = names(users);
    let addrs: Vec<SocketAddr> = proxies.iter().map(|p| p.addr).collect();
    let step = spread / u32::try_from(users).map_err(|e| e.to_string())?;
    let started = Instant::now();
    let tasks: Vec<_> = names
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let addr = addrs[i % addrs.len()];
            let worker = format!("{name}.rig1");
            let at = started + step * u32::try_from(i).unwrap_or(u32::MAX);
            tokio::spawn(async move {
                tokio::time::sleep_until(at).await;
                let (outcome, miner) = login(addr, worker).await;
                (outcome, miner, Instant::now())
            })
        })
        .collect();
    let mut latencies = Vec::new();
    let mut unknown = Vec::new();
    let mut failed = Vec::new();
    let mut last_authorized = started;
    let mut miners = Vec::new();
    for task in tasks {
        let (outcome, miner, at) = task.await.map_err(|e| format!("a miner task: {e}"))?;
        match outcome {
            Login::Authorized(took) => {
                latencies.push(took);
                last_authorized = last_authorized.max(at);
            }
            Login::Unknown(took) => unknown.push(took),
            Login::Failed(e) => failed.push(e),
        }
        miners.extend(miner);
    }
    let span = last_authorized - started;
    let cpu_after = (controls_cpu(), proxies_cpu(), zk_cpu());
    drop(miners);

    let client = zk
        .connect(Duration::from_secs(10))
        .await
        .map_err(|e| format!("ZooKeeper client: {e}"))?;
    let in_store = client
        .get_children(&format!("{ROOT}/switcher"), false)
        .await
        .map_err(|e| format!("listing the users: {e:?}"))?
        .len();
    let posts = backend
        .posts
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    let twice = posts.values().filter(|n| **n > 1).count();
    latencies.sort();
    let q = |p| quantile(&latencies, p).unwrap_or_default();
    println!(
        "autoreg: {users} new users over {spread:?} through 2 proxies and 2 control replicas on ZooKeeper; backend {BACKEND_DELAY:?}, IntervalSeconds {INTERVAL_SECONDS}, {} cores",
        nproc()
    );
    println!(
        "| users | authorized | 201 | other failures | registrations/s | connect to authorized p50 / p99 / max | backend POSTs (names POSTed twice, most in flight) | users in ZooKeeper | CPU controls / proxies / ZooKeeper |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    println!(
        "| {users} | {} | {} | {} | {:.0} | {:.2?} / {:.2?} / {:.2?} | {} ({twice}, {}) | {in_store} | {} / {} / {} |",
        latencies.len(),
        unknown.len(),
        failed.len(),
        per_second(latencies.len(), span),
        q(0.5),
        q(0.99),
        latencies.last().copied().unwrap_or_default(),
        posts.values().sum::<usize>(),
        backend.max_in_flight.load(Ordering::SeqCst),
        seconds(delta(cpu_after.0, cpu_before.0)),
        seconds(delta(cpu_after.1, cpu_before.1)),
        seconds(delta(cpu_after.2, cpu_before.2)),
    );
    if let Some(first) = unknown.iter().min() {
        println!(
            "{} got 201, the first {first:.2?} after connecting",
            unknown.len()
        );
    }
    if !failed.is_empty() {
        println!("first failures: {:?}", &failed[..failed.len().min(5)]);
    }
    if backend.bad.load(Ordering::SeqCst) > 0 {
        println!(
            "the backend got {} requests without sub_name",
            backend.bad.load(Ordering::SeqCst)
        );
    }
    Ok(())
}

fn main() -> ExitCode {
    if !std::env::args().any(|a| a == "--bench") {
        return ExitCode::SUCCESS;
    }
    let quick = std::env::var("SWITCHYARD_BENCH_QUICK").is_ok_and(|v| v == "1");
    let (users, spread) = if quick {
        (200, Duration::from_secs(1))
    } else {
        (2_000, Duration::from_secs(10))
    };
    let zk = match ZooKeeperServer::start_with(ServerOptions {
        production_jvm: true,
    }) {
        Ok(zk) => zk,
        Err(e) => {
            eprintln!("autoreg: cannot start ZooKeeper: {e}");
            return ExitCode::FAILURE;
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("autoreg: no Tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(&zk, users, spread)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("autoreg: {e}");
            ExitCode::FAILURE
        }
    }
}
