//! Benchmark (issue 13): 50 concurrent WatchSwitches subscribers take a snapshot of 1,000,000
//! users from an in-process control service (embedded store) while a client keeps switching
//! users one SwitchCoin at a time. Reported: the SwitchCoin latency while the snapshots are
//! being sent (median, p99, max), the time until every subscriber has its snapshot, and the
//! process RSS before and at its peak during the snapshots.
//!
//! Run with `cargo bench -p switchyard-tests --bench watch_snapshot`;
//! `SWITCHYARD_BENCH_QUICK=1` runs 100,000 users and 10 subscribers. Without `--bench` on the
//! command line (as under `cargo test --benches`) it does nothing. Figures go to stdout.

use std::time::{Duration, Instant};

use switchyard_control::config::ControlConfig;
use switchyard_proto::v1::{SwitchCoinRequest, SwitchCoinsRequest, WatchSwitchesRequest};
use switchyard_tests::{
    bench::{quantile, rss_kib},
    control::InProcessControl,
};

#[tokio::main]
async fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let quick = std::env::var("SWITCHYARD_BENCH_QUICK").is_ok_and(|v| v == "1");
    let (users, subscribers) = if quick {
        (100_000, 10)
    } else {
        (1_000_000, 50)
    };
    let control = InProcessControl::start_with(|c: &mut ControlConfig| {
        c.max_switch_batch = 10_000;
    })
    .await
    .expect("control");
    let pid = std::process::id();
    let started = Instant::now();
    let mut admin = control.admin();
    for base in (0..users).step_by(10_000) {
        let switches = (base..(base + 10_000).min(users))
            .map(|i| SwitchCoinRequest {
                user: format!("user{i:07}"),
                coin: "btc".into(),
            })
            .collect();
        admin
            .switch_coins(SwitchCoinsRequest { switches })
            .await
            .expect("populate");
    }
    println!("populated {users} users in {:?}", started.elapsed());
    let rss_before = rss_kib(pid).unwrap_or(0);

    let snap_start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..subscribers {
        let mut client = control.proxy_control();
        tasks.push(tokio::spawn(async move {
            let mut stream = client
                .watch_switches(WatchSwitchesRequest::default())
                .await
                .expect("watch")
                .into_inner();
            let mut records = 0usize;
            while let Some(msg) = stream.message().await.expect("stream") {
                records += msg.users.len();
                if msg.snapshot_complete {
                    return (records, snap_start.elapsed());
                }
            }
            panic!("stream ended before its snapshot");
        }));
    }
    let mut latencies = Vec::new();
    let mut peak_rss = rss_before;
    let mut i = 0usize;
    while tasks.iter().any(|t| !t.is_finished()) {
        let t = Instant::now();
        admin
            .switch_coin(SwitchCoinRequest {
                user: format!("user{:07}", (i * 7_919) % users),
                coin: if i.is_multiple_of(2) { "bch" } else { "btc" }.into(),
            })
            .await
            .expect("switch");
        latencies.push(t.elapsed());
        peak_rss = peak_rss.max(rss_kib(pid).unwrap_or(0));
        i += 1;
    }
    let mut slowest = Duration::ZERO;
    for task in tasks {
        let (records, took) = task.await.expect("subscriber");
        assert!(records >= users, "{records} < {users}");
        slowest = slowest.max(took);
    }
    latencies.sort();
    let q = |p| quantile(&latencies, p).unwrap_or_default();
    println!(
        "| {users} users, {subscribers} subscribers | all snapshots in {slowest:.2?} | {} SwitchCoin during them: median {:.2?}, p99 {:.2?}, max {:.2?} | RSS {} MiB before, peak {} MiB |",
        latencies.len(),
        q(0.5),
        q(0.99),
        latencies.last().copied().unwrap_or_default(),
        rss_before / 1024,
        peak_rss / 1024,
    );
    control.shutdown().await.expect("shutdown");
}
