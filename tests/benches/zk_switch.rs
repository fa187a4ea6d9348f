//! Benchmark: switching 10,000 users into ZooKeeper through Switchyard, against the Go
//! switcher's way of writing the same nodes.
//!
//! - **Switchyard**: a control service runs in-process on a private ZooKeeper (the same settings
//!   as `zk_config` in `tests/tests/zookeeper_store.rs`); one gRPC `SwitchCoins` call carries all
//!   users. The clock runs from the call to its answer, which only comes once the index (and so
//!   every WatchSwitches subscriber) has the writes; that is checked after each call.
//! - **Baseline**: a plain zookeeper-async client, one user at a time, every request awaited
//!   before the next: `exists`, then `create` (new user) or `set_data` (existing user).
//!
//! Each method does two rounds per repetition: the users are new (round 1, nodes created), then
//! switched to another coin (round 2, nodes exist). Every repetition works under its own
//! `unique_root`. Repetitions alternate the order (Switchyard, baseline, baseline, Switchyard,
//! ...) so machine noise hits both; an untimed warm-up of both methods comes first, so the
//! first measurement does not pay for the ZooKeeper JVM's JIT alone.
//!
//! Run with `cargo bench -p switchyard-tests --bench zk_switch`. Without `--bench` on the command
//! line (as under `cargo test --benches`) it does nothing.

use std::{
    process::ExitCode,
    time::{Duration, Instant},
};

use futures::{StreamExt, stream};
use switchyard_control::config::ControlConfig;
use switchyard_proto::v1::{
    ListUserCoinsRequest, SwitchCoinRequest, SwitchCoinsRequest,
    switcher_admin_client::SwitcherAdminClient,
};
use switchyard_tests::{
    bench::{
        delta, jvm_pid, machine_busy_cpu, nproc, per_second, process_cpu, stats,
        zk_packets_received,
    },
    control::InProcessControl,
    zookeeper::{ZooKeeperServer, unique_root},
};
use tonic::transport::Channel;
use zookeeper_async::{Acl, CreateMode, ZkError, ZooKeeper};

/// Users switched per round.
const USERS: usize = 10_000;
/// Users per round of the untimed warm-up.
const WARMUP_USERS: usize = 1_000;
/// Measurements of each method.
const REPETITIONS: usize = 3;
/// The coin of round 1 (new users) and of round 2 (existing users).
const COINS: [&str; 2] = ["btc", "bch"];
/// ZooKeeper session timeout, as in `zk_config`.
const SESSION: Duration = Duration::from_secs(4);
/// The most one repetition of one method (both rounds, setup and checks) may take.
const RUN_TIMEOUT: Duration = Duration::from_secs(90);
/// The most the whole benchmark may take once ZooKeeper is up.
const TOTAL_TIMEOUT: Duration = Duration::from_secs(270);
/// Reads in flight while checking what ZooKeeper holds (untimed).
const CHECK_IN_FLIGHT: usize = 500;

/// The control service's ZooKeeper settings, as `zk_config` in `tests/tests/zookeeper_store.rs`.
fn zk_config(c: &mut ControlConfig, connect: &str, root: &str) {
    c.zk_broker = vec![connect.to_owned()];
    c.zk_switcher_watch_dir = format!("{root}/switcher/");
    c.zk_switchyard_dir = format!("{root}/switchyard/");
    c.zk_session_timeout_seconds = SESSION.as_secs();
    c.zk_request_timeout_seconds = 5;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Method {
    Switchyard,
    Baseline,
}

impl Method {
    fn name(self) -> &'static str {
        match self {
            Method::Switchyard => "Switchyard (1 SwitchCoins call)",
            Method::Baseline => "baseline (exists + create/set)",
        }
    }
}

/// One measured round: its wall time, and what it cost around it (untimed probes).
#[derive(Debug, Clone, Copy, Default)]
struct Sample {
    /// From the first request to the last answer.
    wall: Duration,
    /// CPU time the ZooKeeper JVM spent meanwhile, if it could be read.
    zk_cpu: Option<Duration>,
    /// CPU time this process (control service, gRPC and ZooKeeper clients) spent meanwhile.
    bench_cpu: Option<Duration>,
    /// CPU time every other process on the machine spent meanwhile (noise), in milliseconds:
    /// the machine's busy time less the JVM's and this process's. The two sources account a
    /// little differently, so it may come out slightly negative.
    other_cpu_ms: Option<i64>,
    /// Requests the ZooKeeper server received meanwhile (`mntr` `zk_packets_received`, from
    /// every client: the writer, the control service's feed, pings).
    zk_requests: Option<u64>,
}

/// One repetition of one method: both rounds.
#[derive(Debug, Clone, Copy)]
struct Rounds {
    new: Sample,
    existing: Sample,
}

/// What the probes read at one instant.
#[derive(Debug, Clone, Copy)]
struct Snapshot {
    zk_cpu: Option<Duration>,
    bench_cpu: Option<Duration>,
    machine_cpu: Option<Duration>,
    zk_packets: Option<u64>,
}

/// Reads the costs the report shows next to wall times: the JVM's and this process's CPU time
/// (from `/proc`) and the server's request counter (from `mntr`).
#[derive(Debug, Clone, Copy)]
struct Probe<'a> {
    zk: &'a ZooKeeperServer,
    jvm_pid: Option<u32>,
}

impl<'a> Probe<'a> {
    fn new(zk: &'a ZooKeeperServer) -> Self {
        Self {
            zk,
            jvm_pid: jvm_pid(zk),
        }
    }

    /// Blocks the thread for one `mntr` exchange on loopback; call it outside timed sections.
    fn snapshot(&self) -> Snapshot {
        let zk_packets = zk_packets_received(self.zk);
        Snapshot {
            zk_cpu: self
                .jvm_pid
                .and_then(|pid| process_cpu(&format!("/proc/{pid}/stat"))),
            bench_cpu: process_cpu("/proc/self/stat"),
            machine_cpu: machine_busy_cpu(),
            zk_packets,
        }
    }

    /// A sample of `wall` between `before` and now.
    fn sample(&self, wall: Duration, before: Snapshot) -> Sample {
        let after = self.snapshot();
        Sample {
            wall,
            zk_cpu: after
                .zk_cpu
                .zip(before.zk_cpu)
                .map(|(a, b)| a.saturating_sub(b)),
            bench_cpu: after
                .bench_cpu
                .zip(before.bench_cpu)
                .map(|(a, b)| a.saturating_sub(b)),
            other_cpu_ms: delta(after.machine_cpu, before.machine_cpu).and_then(|machine| {
                let ours =
                    delta(after.zk_cpu, before.zk_cpu)? + delta(after.bench_cpu, before.bench_cpu)?;
                let ms = |d: Duration| i64::try_from(d.as_millis()).ok();
                Some(ms(machine)? - ms(ours)?)
            }),
            zk_requests: after
                .zk_packets
                .zip(before.zk_packets)
                .map(|(a, b)| a.saturating_sub(b)),
        }
    }
}

fn main() -> ExitCode {
    if !std::env::args().any(|a| a == "--bench") {
        eprintln!(
            "zk_switch: skipped (run it with `cargo bench -p switchyard-tests --bench zk_switch`)"
        );
        return ExitCode::SUCCESS;
    }
    let zk = match ZooKeeperServer::start() {
        Ok(zk) => zk,
        Err(e) => {
            eprintln!("zk_switch: cannot start ZooKeeper: {e}");
            return ExitCode::FAILURE;
        }
    };
    let version = zk
        .four_letter_word("srvr")
        .ok()
        .and_then(|srvr| {
            srvr.lines()
                .find(|l| l.starts_with("Zookeeper version"))
                .map(str::to_owned)
        })
        .unwrap_or_else(|| "Zookeeper version: unknown (`srvr` gave no version line)".into());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("a Tokio runtime");
    let outcome = runtime.block_on(async {
        tokio::time::timeout(TOTAL_TIMEOUT, run(&zk, &version))
            .await
            .unwrap_or_else(|_| Err(format!("the benchmark took longer than {TOTAL_TIMEOUT:?}")))
    });
    runtime.shutdown_timeout(Duration::from_secs(10));
    let code = match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("zk_switch: FAILED: {e}");
            eprintln!("--- ZooKeeper log tail ---\n{}", zk.log_tail());
            ExitCode::FAILURE
        }
    };
    drop(zk); // kills the JVM, removes its directory
    code
}

/// What every measurement uses: the server, a plain client that checks the results, and the
/// probes.
struct Bench<'a> {
    zk: &'a ZooKeeperServer,
    checker: ZooKeeper,
    probe: Probe<'a>,
}

async fn run(zk: &ZooKeeperServer, version: &str) -> Result<(), String> {
    let users: Vec<String> = (0..USERS).map(|i| format!("bench-u{i:05}")).collect();
    let checker = zk
        .connect(SESSION)
        .await
        .map_err(|e| format!("checker client: {e}"))?;
    let bench = Bench {
        zk,
        checker,
        probe: Probe::new(zk),
    };

    eprintln!("zk_switch: warm-up ({WARMUP_USERS} users per round, untimed)");
    let warmup = &users[..WARMUP_USERS];
    bench.measure(Method::Switchyard, warmup).await?;
    bench.measure(Method::Baseline, warmup).await?;

    let mut times: Vec<(Method, Rounds)> = Vec::new();
    let mut order = Vec::new();
    for rep in 0..REPETITIONS {
        let pair = if rep % 2 == 0 {
            [Method::Switchyard, Method::Baseline]
        } else {
            [Method::Baseline, Method::Switchyard]
        };
        for method in pair {
            let rounds = bench.measure(method, &users).await?;
            eprintln!(
                "zk_switch: rep {} {:<32} new {:>7.3} s, existing {:>7.3} s",
                rep + 1,
                method.name(),
                rounds.new.wall.as_secs_f64(),
                rounds.existing.wall.as_secs_f64()
            );
            order.push(match method {
                Method::Switchyard => "S",
                Method::Baseline => "B",
            });
            times.push((method, rounds));
        }
    }
    // Best effort: the fixture removes everything with the server anyway.
    if let Err(e) = bench.checker.close().await {
        eprintln!("zk_switch: closing the checker client: {e:?}");
    }

    print_report(version, &order, &times, bench.probe.jvm_pid.is_some());
    Ok(())
}

impl Bench<'_> {
    /// One repetition of `method` over `users`, both rounds, under a fresh root, bounded in
    /// time.
    async fn measure(&self, method: Method, users: &[String]) -> Result<Rounds, String> {
        let run = async {
            match method {
                Method::Switchyard => self.switchyard_run(users).await,
                Method::Baseline => self.baseline_run(users).await,
            }
        };
        tokio::time::timeout(RUN_TIMEOUT, run)
            .await
            .unwrap_or_else(|_| {
                Err(format!(
                    "{} over {} users took longer than {RUN_TIMEOUT:?}",
                    method.name(),
                    users.len()
                ))
            })
    }

    async fn switchyard_run(&self, users: &[String]) -> Result<Rounds, String> {
        let root = unique_root("bench-switchyard");
        let connect = self.zk.connect_string();
        let control = InProcessControl::start_with(|c| zk_config(c, &connect, &root))
            .await
            .map_err(|e| format!("starting the control service on ZooKeeper: {e}"))?;
        let mut admin = control.admin();
        // Connect the channel before the clock runs.
        admin
            .list_user_coins(ListUserCoinsRequest {
                page_size: 1,
                page_token: String::new(),
            })
            .await
            .map_err(|e| format!("first ListUserCoins: {e}"))?;
        let dir = format!("{root}/switcher");
        let mut rounds = [Sample::default(); 2];
        for (round, coin) in COINS.iter().enumerate() {
            rounds[round] = self.switchyard_round(&mut admin, users, coin).await?;
            check_nodes(&self.checker, &dir, users, coin).await?;
        }
        control
            .shutdown()
            .await
            .map_err(|e| format!("stopping the control service: {e}"))?;
        Ok(Rounds {
            new: rounds[0],
            existing: rounds[1],
        })
    }

    /// One SwitchCoins call switching every user to `coin`; checks that every entry was applied
    /// and that the index had them all when the call answered. Times the call.
    async fn switchyard_round(
        &self,
        admin: &mut SwitcherAdminClient<Channel>,
        users: &[String],
        coin: &str,
    ) -> Result<Sample, String> {
        let request = SwitchCoinsRequest {
            switches: users
                .iter()
                .map(|user| SwitchCoinRequest {
                    user: user.clone(),
                    coin: coin.to_owned(),
                })
                .collect(),
        };
        let before = self.probe.snapshot();
        let start = Instant::now();
        let answer = admin.switch_coins(request).await;
        let elapsed = start.elapsed();
        let sample = self.probe.sample(elapsed, before);
        let results = answer
            .map_err(|e| format!("SwitchCoins of {} users: {e}", users.len()))?
            .into_inner()
            .results;
        if results.len() != users.len() {
            return Err(format!(
                "SwitchCoins answered {} results for {} switches",
                results.len(),
                users.len()
            ));
        }
        let mut highest = 0;
        for (result, user) in results.iter().zip(users) {
            match &result.applied {
                Some(applied) if applied.user == *user && applied.coin == coin => {
                    highest = highest.max(applied.revision);
                }
                other => {
                    return Err(format!(
                        "SwitchCoins did not apply {user} -> {coin}: applied {other:?}, \
                         error {:?}",
                        result.error
                    ));
                }
            }
        }
        let page_size = u32::try_from(users.len()).map_err(|e| format!("page size: {e}"))?;
        let listed = admin
            .list_user_coins(ListUserCoinsRequest {
                page_size,
                page_token: String::new(),
            })
            .await
            .map_err(|e| format!("ListUserCoins: {e}"))?
            .into_inner();
        if listed.revision < highest {
            return Err(format!(
                "SwitchCoins answered after {elapsed:?} but the index was at revision {} below \
                 its writes' {highest} (the write-visible timeout ran out?)",
                listed.revision
            ));
        }
        let in_index = listed.users.iter().filter(|u| u.coin == coin).count();
        if in_index != users.len() {
            return Err(format!(
                "after SwitchCoins the index lists {in_index} of {} users on {coin}",
                users.len()
            ));
        }
        Ok(sample)
    }

    async fn baseline_run(&self, users: &[String]) -> Result<Rounds, String> {
        let root = unique_root("bench-baseline");
        let dir = format!("{root}/switcher");
        let client = self
            .zk
            .connect(SESSION)
            .await
            .map_err(|e| format!("baseline client: {e}"))?;
        for path in [root.as_str(), dir.as_str()] {
            match client
                .create(
                    path,
                    Vec::new(),
                    Acl::open_unsafe().clone(),
                    CreateMode::Persistent,
                )
                .await
            {
                Ok(_) | Err(ZkError::NodeExists) => {}
                Err(e) => return Err(format!("creating {path}: {e:?}")),
            }
        }
        let paths: Vec<String> = users.iter().map(|u| format!("{dir}/{u}")).collect();
        let mut rounds = [Sample::default(); 2];
        for (round, coin) in COINS.iter().enumerate() {
            rounds[round] = self
                .baseline_round(&client, &paths, coin, round > 0)
                .await?;
            check_nodes(&self.checker, &dir, users, coin).await?;
        }
        if let Err(e) = client.close().await {
            eprintln!("zk_switch: closing the baseline client: {e:?}");
        }
        Ok(Rounds {
            new: rounds[0],
            existing: rounds[1],
        })
    }

    /// The Go switcher's way: for each node, `exists`, then `create` or `set_data`, every
    /// request awaited before the next. Checks that every node was found as `existing` says.
    async fn baseline_round(
        &self,
        client: &ZooKeeper,
        paths: &[String],
        coin: &str,
        existing: bool,
    ) -> Result<Sample, String> {
        let mut unexpected = 0_usize;
        let before = self.probe.snapshot();
        let start = Instant::now();
        for path in paths {
            let data = coin.as_bytes().to_vec();
            let written = match client.exists(path, false).await {
                Ok(None) => {
                    unexpected += usize::from(existing);
                    client
                        .create(
                            path,
                            data,
                            Acl::open_unsafe().clone(),
                            CreateMode::Persistent,
                        )
                        .await
                        .map(drop)
                }
                Ok(Some(_)) => {
                    unexpected += usize::from(!existing);
                    client.set_data(path, data, None).await.map(drop)
                }
                Err(e) => Err(e),
            };
            written.map_err(|e| format!("baseline write of {path}: {e:?}"))?;
        }
        let sample = self.probe.sample(start.elapsed(), before);
        if unexpected > 0 {
            return Err(format!(
                "baseline: {unexpected} nodes were {} when they should not have been",
                if existing { "missing" } else { "present" }
            ));
        }
        Ok(sample)
    }
}

/// Untimed: checks that ZooKeeper holds `dir/user` = `coin` for every user, and nothing else.
async fn check_nodes(
    checker: &ZooKeeper,
    dir: &str,
    users: &[String],
    coin: &str,
) -> Result<(), String> {
    let children = checker
        .get_children(dir, false)
        .await
        .map_err(|e| format!("listing {dir}: {e:?}"))?;
    if children.len() != users.len() {
        return Err(format!(
            "{dir} has {} children, expected {}",
            children.len(),
            users.len()
        ));
    }
    let wrong: Vec<String> = stream::iter(users)
        .map(|user| async move {
            let path = format!("{dir}/{user}");
            match checker.get_data(&path, false).await {
                Ok((data, _)) if data == coin.as_bytes() => None,
                Ok((data, _)) => Some(format!("{path} = {:?}", String::from_utf8_lossy(&data))),
                Err(e) => Some(format!("{path}: {e:?}")),
            }
        })
        .buffer_unordered(CHECK_IN_FLIGHT)
        .filter_map(|wrong| async move { wrong })
        .collect()
        .await;
    match wrong.first() {
        None => Ok(()),
        Some(first) => Err(format!(
            "{} of {} nodes under {dir} do not hold {coin}, e.g. {first}",
            wrong.len(),
            users.len()
        )),
    }
}

/// Picks one round's sample out of a repetition.
type RoundPick = fn(&Rounds) -> Sample;

/// The median of some values (the upper one of an even count), if any.
fn median<T: Copy + Ord>(mut values: Vec<T>) -> Option<T> {
    values.sort_unstable();
    values.get(values.len() / 2).copied()
}

fn print_report(version: &str, order: &[&str], times: &[(Method, Rounds)], jvm_found: bool) {
    println!();
    println!("zk_switch: SwitchCoins of {USERS} users into ZooKeeper");
    println!("{version}");
    println!("nproc: {}", nproc());
    println!(
        "repetitions: {REPETITIONS} per method, order {} (after an untimed warm-up of \
         {WARMUP_USERS} users)",
        order.join(" ")
    );
    println!();
    println!(
        "| round             | method                          | median s | min s | max s | switches/s median (min..max) |"
    );
    println!(
        "|-------------------|---------------------------------|----------|-------|-------|------------------------------|"
    );
    let picks: [(&str, RoundPick); 2] = [
        ("1: new users", |r| r.new),
        ("2: existing users", |r| r.existing),
    ];
    let methods = [Method::Switchyard, Method::Baseline];
    let samples_of = |method: Method, pick: RoundPick| -> Vec<Sample> {
        times
            .iter()
            .filter(|(m, _)| *m == method)
            .map(|(_, r)| pick(r))
            .collect()
    };
    let mut ratios = Vec::new();
    for (label, pick) in picks {
        let mut medians = [Duration::ZERO; 2];
        for (i, method) in methods.into_iter().enumerate() {
            let walls = samples_of(method, pick).iter().map(|s| s.wall).collect();
            let (median, min, max) = stats(walls);
            medians[i] = median;
            let rate = format!(
                "{:.0} ({:.0}..{:.0})",
                per_second(USERS, median),
                per_second(USERS, max),
                per_second(USERS, min),
            );
            println!(
                "| {label:<17} | {:<31} | {:>8.3} | {:>5.2} | {:>5.2} | {rate:>28} |",
                method.name(),
                median.as_secs_f64(),
                min.as_secs_f64(),
                max.as_secs_f64(),
            );
        }
        ratios.push((label, medians[1].as_secs_f64() / medians[0].as_secs_f64()));
    }
    println!();
    for (label, ratio) in ratios {
        println!(
            "ratio of medians, round {label}: Switchyard makes {ratio:.2}x the baseline's switches/s"
        );
    }

    println!();
    println!(
        "where the time goes (medians over the repetitions, measured around each timed round):"
    );
    println!(
        "| round             | method                          | ZK requests/switch | ZK JVM CPU s | this process CPU s | other processes CPU s |"
    );
    println!(
        "|-------------------|---------------------------------|--------------------|--------------|--------------------|-----------------------|"
    );
    let show = |v: Option<String>| v.unwrap_or_else(|| "-".to_owned());
    for (label, pick) in picks {
        for method in methods {
            let samples = samples_of(method, pick);
            let requests = median(samples.iter().filter_map(|s| s.zk_requests).collect())
                .map(|n| format!("{:.2}", n as f64 / USERS as f64));
            let zk_cpu = median(samples.iter().filter_map(|s| s.zk_cpu).collect())
                .map(|d| format!("{:.2}", d.as_secs_f64()));
            let bench_cpu = median(samples.iter().filter_map(|s| s.bench_cpu).collect())
                .map(|d| format!("{:.2}", d.as_secs_f64()));
            let other_cpu = median(samples.iter().filter_map(|s| s.other_cpu_ms).collect())
                .map(|ms| format!("{:.2}", ms as f64 / 1000.0));
            println!(
                "| {label:<17} | {:<31} | {:>18} | {:>12} | {:>18} | {:>21} |",
                method.name(),
                show(requests),
                show(zk_cpu),
                show(bench_cpu),
                show(other_cpu),
            );
        }
    }
    println!(
        "(ZK requests: `mntr` zk_packets_received, from all clients incl. Switchyard's feed; \
         CPU from /proc; other processes = the machine's tick-sampled busy time less the two, \
         good to about +-1 s: large positive values mean something else was running{})",
        if jvm_found {
            ""
        } else {
            "; the ZooKeeper JVM was not found"
        }
    );
}
