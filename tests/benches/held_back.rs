//! Benchmark: 10,000 switches held back by the safety period (SPEC §6) against 10,000
//! immediate ones, in the same run, on both stores.
//!
//! A control service runs in-process (embedded store, then a private ZooKeeper), with bch's
//! user list ingested (`IntervalSeconds` 3600, so held-back switches stay pending for the whole
//! run). Each repetition creates 10,000 fresh users on btc, then times one SwitchCoins call
//! moving them all to ltc (no user list: written at once) or to bch (never seen in bch's list:
//! held back, recorded as pending switches). Repetitions alternate the order (immediate, held,
//! held, immediate, ...) so machine noise hits both. Every held-back answer is checked to carry
//! its due time, every immediate one to carry the new coin.
//!
//! Run with `cargo bench -p switchyard-tests --bench held_back`. Without `--bench` on the
//! command line (as under `cargo test --benches`) it does nothing.

use std::{
    process::ExitCode,
    time::{Duration, Instant},
};

use switchyard_control::config::ControlConfig;
use switchyard_proto::v1::{SwitchCoinRequest, SwitchCoinsRequest};
use switchyard_tests::{
    control::{InProcessControl, test_config},
    zookeeper::{ZooKeeperServer, unique_root},
};

/// Switches per timed call.
const USERS: usize = 10_000;
/// Measurements of each kind, per store.
const REPETITIONS: usize = 4;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Immediate,
    HeldBack,
}

fn config(dir: &std::path::Path, zk: Option<(&ZooKeeperServer, &str)>) -> ControlConfig {
    let mut c = test_config(dir);
    c.user_list_api = [("bch".to_owned(), "http://127.0.0.1:9/unused".to_owned())].into();
    c.interval_seconds = 3_600;
    c.max_switch_batch = USERS;
    if let Some((zk, root)) = zk {
        c.zk_broker = vec![zk.connect_string()];
        c.zk_switcher_watch_dir = format!("{root}/switcher/");
        c.zk_switchyard_dir = format!("{root}/switchyard/");
        c.zk_server_id_assign_dir = format!("{root}/swid/");
        c.zk_session_timeout_seconds = 10;
    }
    c
}

fn batch(prefix: &str, coin: &str) -> SwitchCoinsRequest {
    SwitchCoinsRequest {
        switches: (0..USERS)
            .map(|i| SwitchCoinRequest {
                user: format!("{prefix}{i}"),
                coin: coin.into(),
            })
            .collect(),
    }
}

/// One timed call of `kind` on fresh users; checks every answer.
async fn measure(control: &InProcessControl, rep: usize, kind: Kind) -> Result<Duration, String> {
    let prefix = format!("r{rep}{kind:?}u");
    let mut admin = control.admin();
    admin
        .switch_coins(batch(&prefix, "btc"))
        .await
        .map_err(|e| format!("create: {e}"))?;
    let coin = match kind {
        Kind::Immediate => "ltc",
        Kind::HeldBack => "bch",
    };
    let started = Instant::now();
    let answer = admin
        .switch_coins(batch(&prefix, coin))
        .await
        .map_err(|e| format!("switch: {e}"))?
        .into_inner();
    let took = started.elapsed();
    let ok = answer.results.iter().all(|r| {
        r.error.is_none()
            && match kind {
                Kind::Immediate => {
                    r.pending_applies_at_unix == 0
                        && r.applied.as_ref().is_some_and(|u| u.coin == "ltc")
                }
                Kind::HeldBack => r.pending_applies_at_unix > 0,
            }
    });
    if answer.results.len() != USERS || !ok {
        return Err(format!("{kind:?}: unexpected answers"));
    }
    Ok(took)
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

async fn run_store(name: &str, config: &ControlConfig) -> Result<String, String> {
    let control = InProcessControl::start_config(config)
        .await
        .map_err(|e| format!("{name}: control: {e}"))?;
    // Untimed warm-up of both paths.
    measure(&control, 100, Kind::Immediate).await?;
    measure(&control, 101, Kind::HeldBack).await?;
    let (mut immediate, mut held) = (Vec::new(), Vec::new());
    for rep in 0..REPETITIONS {
        let order = if rep % 2 == 0 {
            [Kind::Immediate, Kind::HeldBack]
        } else {
            [Kind::HeldBack, Kind::Immediate]
        };
        for kind in order {
            let took = measure(&control, rep, kind).await?;
            match kind {
                Kind::Immediate => immediate.push(took),
                Kind::HeldBack => held.push(took),
            }
        }
    }
    control
        .shutdown()
        .await
        .map_err(|e| format!("{name}: shutdown: {e}"))?;
    let (i, h) = (median(immediate.clone()), median(held.clone()));
    Ok(format!(
        "| {name} | {:.1} | {:.1} | {:.2} | {:?} | {:?} |",
        i.as_secs_f64() * 1e3,
        h.as_secs_f64() * 1e3,
        h.as_secs_f64() / i.as_secs_f64(),
        immediate.iter().map(|d| d.as_millis()).collect::<Vec<_>>(),
        held.iter().map(|d| d.as_millis()).collect::<Vec<_>>(),
    ))
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> ExitCode {
    if !std::env::args().any(|a| a == "--bench") {
        return ExitCode::SUCCESS;
    }
    let dir = match tempfile::tempdir() {
        Ok(d) => d,
        Err(e) => {
            eprintln!("tempdir: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut rows = Vec::new();
    let embedded = config(&dir.path().join("embedded"), None);
    match run_store("embedded", &embedded).await {
        Ok(row) => rows.push(row),
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    }
    let zk = match ZooKeeperServer::start() {
        Ok(zk) => zk,
        Err(e) => {
            eprintln!("ZooKeeper: {e}");
            return ExitCode::FAILURE;
        }
    };
    let root = unique_root("held");
    let on_zk = config(&dir.path().join("zk"), Some((&zk, &root)));
    match run_store("ZooKeeper", &on_zk).await {
        Ok(row) => rows.push(row),
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    }
    println!("held_back: SwitchCoins of {USERS} users, median of {REPETITIONS} (ms)\n");
    println!(
        "| store | immediate | held back | held / immediate | immediate runs | held-back runs |"
    );
    println!("|---|---|---|---|---|---|");
    for row in rows {
        println!("{row}");
    }
    ExitCode::SUCCESS
}
