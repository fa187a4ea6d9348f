//! Benchmark (issue 4): ingesting a 100,000-user list into ZooKeeper, users per second, through
//! Switchyard against the old way (the Go initUserCoin's `setMiningCoin`), side by side in one
//! run, on a ZooKeeper whose JVM runs first with the test fixture's settings and then as in
//! production.
//!
//! - **Switchyard**: a control service runs in-process on the ZooKeeper with `UserListAPI` =
//!   `{"btc": <fixture URL>}`: the real puller path end to end (HTTP GET, JSON parse, the core's
//!   create-if-absent in ZooKeeper `multi` transactions of up to 1,000 nodes, the store's feed
//!   bringing every new node into the index through its persistent recursive watch and
//!   `multiRead`). The fixture first answers an empty page, so the control service is up and its
//!   puller is waiting out `IntervalSeconds`; then ONE page of 100,000 users (`name{i}: i + 1`)
//!   is queued. The clock starts when the fixture hands that page out (seen by polling the
//!   fixture every millisecond, so at most a couple of milliseconds late; the probes' reading
//!   that follows, a few milliseconds, is inside the window) and stops when the
//!   control's index holds all 100,000 users (`core.index().user_count()`, polled every
//!   millisecond). The window therefore includes the page's transfer and parsing, which the
//!   baseline does not pay. With `ZKUserCaseInsensitiveIndex` configured (a separate method),
//!   the clock also waits until the case-index directory holds 100,000 entries and the index's
//!   revision has passed the last of them (its `pzxid`), so the case-index entries count too.
//! - **Baseline**: a plain zookeeper-async client, one user at a time, every request awaited
//!   before the next: `exists`, then `create` if absent, as `setMiningCoin` did. (With
//!   `ZKUserCaseInsensitiveIndex` set, `setMiningCoin` did the same for the case-index entry
//!   first: four round trips per user. That variant is not measured, as it would take twice the
//!   baseline's 30 s per run; the report compares Switchyard + case index with the plain
//!   baseline, and estimates the other ratio as twice that.)
//!
//! Every method works under its own `unique_root` on the same server, and each run is checked
//! afterwards (untimed) with a plain client: the directory's children are exactly the 100,000
//! users, each holding `btc`, and the case-index directory's are exactly their 100,000 entries,
//! each naming its user. Reading back 100,000 values takes ZooKeeper about 6 s, so only the user
//! nodes of Switchyard's first repetition on each server are all read back; elsewhere every 10th
//! node is. Then the run's nodes are deleted (untimed), so every run starts on the same, nearly
//! empty tree and the fixture's small default heap is not filled up. Repetitions alternate the
//! order (S Sc B, then B Sc S, ...) so machine noise hits every method; an untimed warm-up of
//! Switchyard and the baseline on 10,000 users comes first, so the first measurement does not
//! pay for the JVM's JIT alone.
//!
//! All of that happens twice: on a ZooKeeper with the fixture's default JVM (C1 only, serial GC,
//! small heap: quick to start, slow per request) and on one with the production JVM (full JIT,
//! G1, 1 GiB heap). Both use the fixture's `zoo.cfg`, whose `forceSync=no` spares every write an
//! fsync: production ZooKeeper's fsync would slow the one-at-a-time baseline most.
//!
//! Next to the wall times the report shows where the time went: requests the server received per
//! user, the CPU time of the ZooKeeper JVM, of this process, of the kernel's interrupt handling
//! and of everything else, and the baseline's round trip per awaited request.
//!
//! Every wait is bounded (a run, each server's whole series; about 10 minutes in all on 2 CPUs).
//! Run with `cargo bench -p switchyard-tests --bench ingest`. Without `--bench` on the command line (as
//! under `cargo test --benches`) it does nothing.
//!
//! Measured once on the 2-core development machine (ZooKeeper 3.8.0 from Debian), medians of 3:
//!
//! | ZooKeeper JVM   | Switchyard     | + case index   | baseline      | ratio  | + case index |
//! |-----------------|----------------|----------------|---------------|--------|--------------|
//! | fixture default | 53,859 users/s | 25,698 users/s | 3,436 users/s | 15.67x | 7.48x        |
//! | production      | 76,268 users/s | 40,825 users/s | 3,112 users/s | 24.51x | 13.12x       |
//!
//! ZooKeeper's CPU is the limit (busy 0.93 to 0.96 of a core): about 12 µs per user on the
//! production JVM (18 µs on the fixture's), against about 250 µs for the baseline's two
//! requests.

use std::{
    cell::Cell,
    collections::{BTreeMap, HashSet},
    process::ExitCode,
    time::{Duration, Instant},
};

use futures::{StreamExt, stream};
use switchyard_tests::{
    bench::{delta, jvm_pid, nproc, per_second, process_cpu, stat_cpu, stats, zk_packets_received},
    control::{InProcessControl, test_config},
    userlist::{Answer, UserListBackend},
    zookeeper::{ServerOptions, ZooKeeperServer, unique_root},
};
use zookeeper_async::{Acl, CreateMode, ZkError, ZooKeeper};

/// Users in the list.
const USERS: usize = 100_000;
/// Users in the list of the untimed warm-up.
const WARMUP_USERS: usize = 10_000;
/// Measurements of each method on each server.
const REPETITIONS: usize = 3;
/// The coin of the list.
const COIN: &str = "btc";
/// ZooKeeper session timeout of every client: the control service's default
/// (`ZKSessionTimeoutSeconds`).
const SESSION: Duration = Duration::from_secs(15);
/// The control service's `ZKRequestTimeoutSeconds` (its default).
const REQUEST_TIMEOUT_SECONDS: u64 = 10;
/// The most one run of one method (setup, measurement, checks, clean-up) may take.
const RUN_TIMEOUT: Duration = Duration::from_secs(150);
/// The most one server's whole series (warm-up and repetitions) may take once it is up.
const SERIES_TIMEOUT: Duration = Duration::from_secs(400);
/// How long the fixture may wait for the puller to ask for a page.
const PAGE_TIMEOUT: Duration = Duration::from_secs(15);
/// How often the clock's start and end conditions are polled.
const POLL: Duration = Duration::from_millis(1);
/// The checks read back the value of only every this many nodes (after checking that every
/// node is there), except for the user nodes of Switchyard's first repetition on each server,
/// which are all read back: to keep the whole benchmark near 10 minutes.
const SAMPLE_STRIDE: usize = 10;
/// Requests in flight while checking or deleting what ZooKeeper holds (untimed).
const CHECK_IN_FLIGHT: usize = 1_000;

/// The two ways the ZooKeeper JVM runs, in the order measured.
const SERVERS: [(&str, ServerOptions); 2] = [
    (
        "fixture default JVM",
        ServerOptions {
            production_jvm: false,
        },
    ),
    (
        "production JVM",
        ServerOptions {
            production_jvm: true,
        },
    ),
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Method {
    Switchyard,
    SwitchyardCase,
    Baseline,
}

impl Method {
    /// In the order of odd repetitions; even ones run them in reverse.
    const ALL: [Method; 3] = [Method::Switchyard, Method::SwitchyardCase, Method::Baseline];

    fn name(self) -> &'static str {
        match self {
            Method::Switchyard => "Switchyard (puller, 1 page)",
            Method::SwitchyardCase => "Switchyard + case index",
            Method::Baseline => "baseline (exists + create)",
        }
    }

    fn short(self) -> &'static str {
        match self {
            Method::Switchyard => "S",
            Method::SwitchyardCase => "Sc",
            Method::Baseline => "B",
        }
    }

    /// Requests the method awaits one after the other per user (the baseline only).
    fn awaited_per_user(self) -> Option<usize> {
        match self {
            Method::Switchyard | Method::SwitchyardCase => None,
            Method::Baseline => Some(2),
        }
    }
}

/// One measured run: its wall time, and what it cost around it.
#[derive(Debug, Clone, Copy, Default)]
struct Sample {
    /// The timed window (see the module doc).
    wall: Duration,
    /// CPU time the ZooKeeper JVM spent meanwhile, if it could be read.
    zk_cpu: Option<Duration>,
    /// CPU time this process (control service, HTTP fixture, ZooKeeper clients) spent meanwhile.
    bench_cpu: Option<Duration>,
    /// CPU time the kernel spent in interrupts and softirqs meanwhile (on loopback: mostly
    /// moving this benchmark's packets), which no process is charged for.
    irq_cpu: Option<Duration>,
    /// CPU time every other process and kernel thread on the machine spent meanwhile (noise),
    /// in milliseconds, with that of their children that ended. Processes that ended along with
    /// their parent are lost, so it may come out slightly negative.
    other_cpu_ms: Option<i64>,
    /// Requests the ZooKeeper server received meanwhile (`mntr` `zk_packets_received`, from
    /// every client: the writers, the control service's feed, the end-condition probe, pings).
    zk_requests: Option<u64>,
}

/// What the probes read at one instant.
#[derive(Debug, Clone, Copy)]
struct Snapshot {
    zk_cpu: Option<Duration>,
    bench_cpu: Option<Duration>,
    others_cpu: Option<Duration>,
    irq_cpu: Option<Duration>,
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

    /// Blocks the thread for one `mntr` exchange on loopback and a scan of `/proc` (a few
    /// milliseconds).
    fn snapshot(&self) -> Snapshot {
        let zk_packets = zk_packets_received(self.zk);
        Snapshot {
            zk_cpu: self
                .jvm_pid
                .and_then(|pid| process_cpu(&format!("/proc/{pid}/stat"))),
            bench_cpu: process_cpu("/proc/self/stat"),
            others_cpu: others_cpu(self.jvm_pid),
            irq_cpu: irq_cpu(),
            zk_packets,
        }
    }

    /// A sample of `wall` between `before` and now.
    fn sample(&self, wall: Duration, before: Snapshot) -> Sample {
        let after = self.snapshot();
        Sample {
            wall,
            zk_cpu: delta(after.zk_cpu, before.zk_cpu),
            bench_cpu: delta(after.bench_cpu, before.bench_cpu),
            irq_cpu: delta(after.irq_cpu, before.irq_cpu),
            other_cpu_ms: after.others_cpu.zip(before.others_cpu).and_then(|(a, b)| {
                let ms = |d: Duration| i64::try_from(d.as_millis()).ok();
                Some(ms(a)? - ms(b)?)
            }),
            zk_requests: after
                .zk_packets
                .zip(before.zk_packets)
                .map(|(a, b)| a.saturating_sub(b)),
        }
    }
}

/// CPU time the machine (every CPU) spent serving interrupts and softirqs, from the first line
/// of `/proc/stat` (in clock ticks of 1/100 s).
fn irq_cpu() -> Option<Duration> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let fields: Vec<u64> = stat
        .lines()
        .next()?
        .strip_prefix("cpu ")?
        .split_whitespace()
        .map(|f| f.parse().ok())
        .collect::<Option<_>>()?;
    // user nice system idle iowait irq softirq steal [guest guest_nice]
    let ticks: u64 = fields.get(5..7)?.iter().sum();
    Some(Duration::from_millis(ticks * 10))
}

/// CPU time of every process and kernel thread but this process and the JVM, with their
/// children's that ended.
fn others_cpu(jvm_pid: Option<u32>) -> Option<Duration> {
    let me = std::process::id();
    let total = std::fs::read_dir("/proc")
        .ok()?
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| *pid != me && Some(*pid) != jvm_pid)
        .filter_map(|pid| stat_cpu(&format!("/proc/{pid}/stat"), true))
        .sum();
    Some(total)
}

/// What one server's series measured.
struct Series {
    /// Which JVM, and its options.
    label: &'static str,
    jvm_options: String,
    /// `srvr`'s version line.
    version: String,
    /// The order the runs were made in, one group per repetition.
    order: Vec<String>,
    /// Every measured run.
    runs: Vec<(Method, Sample)>,
    jvm_found: bool,
}

fn main() -> ExitCode {
    if !std::env::args().any(|a| a == "--bench") {
        eprintln!("ingest: skipped (run it with `cargo bench -p switchyard-tests --bench ingest`)");
        return ExitCode::SUCCESS;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("a Tokio runtime");
    let pages = Pages::new();
    let mut done = Vec::new();
    let mut failed = false;
    for (label, options) in SERVERS {
        eprintln!("ingest: starting ZooKeeper with the {label}");
        let zk = match ZooKeeperServer::start_with(options) {
            Ok(zk) => zk,
            Err(e) => {
                eprintln!("ingest: cannot start ZooKeeper ({label}): {e}");
                failed = true;
                break;
            }
        };
        let outcome = runtime.block_on(async {
            tokio::time::timeout(SERIES_TIMEOUT, series(&zk, &pages, label))
                .await
                .unwrap_or_else(|_| {
                    Err(format!(
                        "the series on the {label} took longer than {SERIES_TIMEOUT:?}"
                    ))
                })
        });
        match outcome {
            Ok(series) => {
                print_report(&series);
                done.push(series);
            }
            Err(e) => {
                eprintln!("ingest: FAILED: {e}");
                eprintln!("--- ZooKeeper log tail ---\n{}", zk.log_tail());
                failed = true;
            }
        }
        drop(zk); // kills the JVM, removes its directory
        if failed {
            break;
        }
    }
    runtime.shutdown_timeout(Duration::from_secs(10));
    print_summary(&done);
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

/// The user lists (names, and the fixture's page of them), built once.
struct Pages {
    full: (Vec<String>, Answer),
    warmup: (Vec<String>, Answer),
}

impl Pages {
    fn new() -> Self {
        let build = |n: usize| {
            let names: Vec<String> = (0..n).map(|i| format!("name{i}")).collect();
            let entries: Vec<(&str, u64)> = names
                .iter()
                .zip(1_u64..)
                .map(|(name, puid)| (name.as_str(), puid))
                .collect();
            let page = Answer::page(&entries);
            (names, page)
        };
        Self {
            full: build(USERS),
            warmup: build(WARMUP_USERS),
        }
    }
}

/// What every run on one server uses: the server, a plain client that checks the results (and
/// polls the case-index directory at the end of a Switchyard run), and the probes.
struct Bench<'a> {
    zk: &'a ZooKeeperServer,
    checker: ZooKeeper,
    probe: Probe<'a>,
    /// Time spent checking results and cleaning up so far (for the progress lines).
    untimed: Cell<Untimed>,
    /// Whether the next run's check reads back every user node Switchyard wrote.
    full_check: Cell<bool>,
}

/// Time spent outside the measurements.
#[derive(Debug, Clone, Copy, Default)]
struct Untimed {
    checks: Duration,
    cleanup: Duration,
}

/// One server's warm-up and repetitions.
async fn series(
    zk: &ZooKeeperServer,
    pages: &Pages,
    label: &'static str,
) -> Result<Series, String> {
    let version = zk
        .four_letter_word("srvr")
        .ok()
        .and_then(|srvr| {
            srvr.lines()
                .find(|l| l.starts_with("Zookeeper version"))
                .map(str::to_owned)
        })
        .unwrap_or_else(|| "Zookeeper version: unknown (`srvr` gave no version line)".into());
    let checker = zk
        .connect(SESSION)
        .await
        .map_err(|e| format!("checker client: {e}"))?;
    let bench = Bench {
        zk,
        checker,
        probe: Probe::new(zk),
        untimed: Cell::default(),
        full_check: Cell::new(true),
    };

    let began = Instant::now();
    eprintln!("ingest: {label}: warm-up ({WARMUP_USERS} users per method, untimed)");
    // Switchyard + case index runs the same server code as Switchyard: no warm-up of its own.
    for method in [Method::Switchyard, Method::Baseline] {
        bench.measure(method, &pages.warmup).await?;
    }
    eprintln!(
        "ingest: {label}: warm-up done after {:.0} s",
        began.elapsed().as_secs_f64()
    );

    let mut runs = Vec::new();
    let mut order = Vec::new();
    for rep in 0..REPETITIONS {
        let mut methods = Method::ALL;
        if rep % 2 == 1 {
            methods.reverse();
        }
        for method in methods {
            let run_began = Instant::now();
            bench.untimed.take();
            bench.full_check.set(rep == 0);
            let sample = bench.measure(method, &pages.full).await?;
            let untimed = bench.untimed.get();
            eprintln!(
                "ingest: {label}: rep {} {:<27} {:>7.3} s, {:>6.0} users/s (whole run {:.0} s, \
                 of which checks {:.1} s, clean-up {:.1} s; series so far {:.0} s)",
                rep + 1,
                method.name(),
                sample.wall.as_secs_f64(),
                per_second(USERS, sample.wall),
                run_began.elapsed().as_secs_f64(),
                untimed.checks.as_secs_f64(),
                untimed.cleanup.as_secs_f64(),
                began.elapsed().as_secs_f64(),
            );
            runs.push((method, sample));
        }
        order.push(
            methods
                .iter()
                .map(|m| m.short())
                .collect::<Vec<_>>()
                .join(" "),
        );
    }
    // Best effort: the fixture removes everything with the server anyway.
    if let Err(e) = bench.checker.close().await {
        eprintln!("ingest: closing the checker client: {e:?}");
    }
    Ok(Series {
        label,
        jvm_options: zk.options().jvm_options().join(" "),
        version,
        order,
        runs,
        jvm_found: bench.probe.jvm_pid.is_some(),
    })
}

impl Bench<'_> {
    /// One run of `method` over a list, under a fresh root, bounded in time.
    async fn measure(
        &self,
        method: Method,
        list: &(Vec<String>, Answer),
    ) -> Result<Sample, String> {
        let (users, page) = list;
        let run = async {
            match method {
                Method::Switchyard => self.switchyard_run(users, page, false).await,
                Method::SwitchyardCase => self.switchyard_run(users, page, true).await,
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

    async fn switchyard_run(
        &self,
        users: &[String],
        page: &Answer,
        case_index: bool,
    ) -> Result<Sample, String> {
        let root = unique_root(if case_index {
            "ingest-switchyard-case"
        } else {
            "ingest-switchyard"
        });
        let backend = UserListBackend::start()
            .await
            .map_err(|e| format!("starting the user-list fixture: {e}"))?;
        let data_dir = tempfile::tempdir().map_err(|e| format!("data directory: {e}"))?;
        let mut config = test_config(data_dir.path());
        config.zk_broker = vec![self.zk.connect_string()];
        config.zk_switcher_watch_dir = format!("{root}/switcher/");
        config.zk_switchyard_dir = format!("{root}/switchyard/");
        config.zk_server_id_assign_dir = format!("{root}/swid/");
        if case_index {
            config.zk_case_index_dir = format!("{root}/case/");
        }
        config.zk_session_timeout_seconds = SESSION.as_secs();
        config.zk_request_timeout_seconds = REQUEST_TIMEOUT_SECONDS;
        config.user_list_api = BTreeMap::from([(COIN.to_owned(), backend.url(COIN))]);
        config.interval_seconds = 1;
        let control = InProcessControl::start_config(&config)
            .await
            .map_err(|e| format!("starting the control service on ZooKeeper: {e}"))?;

        // The puller's first request got an empty page: it is waiting out its interval.
        let deadline = Instant::now() + PAGE_TIMEOUT;
        while backend.asked(COIN).is_empty() {
            if Instant::now() >= deadline {
                return Err(format!(
                    "the puller did not ask for a page within {PAGE_TIMEOUT:?}"
                ));
            }
            tokio::time::sleep(POLL).await;
        }
        if control.core.index().user_count() != 0 {
            return Err("the control's index has users before the list was served".into());
        }
        backend.script(COIN, [page.clone()]);
        while backend.remaining(COIN) > 0 {
            if Instant::now() >= deadline {
                return Err(format!(
                    "the puller did not take the page within {PAGE_TIMEOUT:?}"
                ));
            }
            tokio::time::sleep(POLL).await;
        }
        // The page has been handed out.
        let start = Instant::now();
        let before = self.probe.snapshot();
        let index = control.core.index();
        let case_dir = format!("{root}/case");
        while index.user_count() < users.len() {
            tokio::time::sleep(POLL).await;
        }
        if case_index {
            // Done when the case-index directory has every entry and the index is past the
            // last of them.
            loop {
                let stat = self
                    .checker
                    .exists(&case_dir, false)
                    .await
                    .map_err(|e| format!("exists {case_dir}: {e:?}"))?;
                if let Some(stat) = stat
                    && usize::try_from(stat.num_children).is_ok_and(|n| n == users.len())
                    && u64::try_from(stat.pzxid).is_ok_and(|z| index.revision() >= z)
                {
                    break;
                }
                tokio::time::sleep(POLL).await;
            }
        }
        let sample = self.probe.sample(start.elapsed(), before);

        if index.user_count() != users.len() {
            return Err(format!(
                "the index holds {} users, expected {}",
                index.user_count(),
                users.len()
            ));
        }
        let asked = backend.asked(COIN);
        if asked.len() < 2 || asked.get(1) != Some(&0) {
            return Err(format!(
                "the puller asked for last_id {asked:?}, expected 0 then 0"
            ));
        }
        let checks = Instant::now();
        let stride = if self.full_check.get() {
            1
        } else {
            SAMPLE_STRIDE
        };
        check_nodes(
            &self.checker,
            &format!("{root}/switcher"),
            users,
            stride,
            |_| COIN.to_owned(),
        )
        .await?;
        if case_index {
            check_nodes(&self.checker, &case_dir, users, SAMPLE_STRIDE, |user| {
                user.to_owned()
            })
            .await?;
        }
        self.add_untimed(checks.elapsed(), Duration::ZERO);
        control
            .shutdown()
            .await
            .map_err(|e| format!("stopping the control service: {e}"))?;
        drop(backend);
        let cleanup = Instant::now();
        remove_tree(
            &self.checker,
            &root,
            &[format!("{root}/switcher"), case_dir],
        )
        .await?;
        self.add_untimed(Duration::ZERO, cleanup.elapsed());
        Ok(sample)
    }

    async fn baseline_run(&self, users: &[String]) -> Result<Sample, String> {
        let root = unique_root("ingest-baseline");
        let dir = format!("{root}/switcher");
        let client = self
            .zk
            .connect(SESSION)
            .await
            .map_err(|e| format!("baseline client: {e}"))?;
        // initUserCoin found its directory in place.
        for path in [root.as_str(), dir.as_str()] {
            client
                .create(
                    path,
                    Vec::new(),
                    Acl::open_unsafe().clone(),
                    CreateMode::Persistent,
                )
                .await
                .map_err(|e| format!("creating {path}: {e:?}"))?;
        }
        let paths: Vec<String> = users.iter().map(|user| format!("{dir}/{user}")).collect();

        let mut existed = 0_usize;
        let before = self.probe.snapshot();
        let start = Instant::now();
        for path in &paths {
            match client.exists(path, false).await {
                Ok(None) => {
                    client
                        .create(
                            path,
                            COIN.as_bytes().to_vec(),
                            Acl::open_unsafe().clone(),
                            CreateMode::Persistent,
                        )
                        .await
                        .map_err(|e| format!("baseline create {path}: {e:?}"))?;
                }
                Ok(Some(_)) => existed += 1,
                Err(e) => return Err(format!("baseline exists {path}: {e:?}")),
            }
        }
        let sample = self.probe.sample(start.elapsed(), before);

        if existed > 0 {
            return Err(format!(
                "baseline: {existed} nodes existed in a fresh directory"
            ));
        }
        let checks = Instant::now();
        check_nodes(&self.checker, &dir, users, SAMPLE_STRIDE, |_| {
            COIN.to_owned()
        })
        .await?;
        self.add_untimed(checks.elapsed(), Duration::ZERO);
        if let Err(e) = client.close().await {
            eprintln!("ingest: closing the baseline client: {e:?}");
        }
        let cleanup = Instant::now();
        remove_tree(&self.checker, &root, &[dir]).await?;
        self.add_untimed(Duration::ZERO, cleanup.elapsed());
        Ok(sample)
    }

    fn add_untimed(&self, checks: Duration, cleanup: Duration) {
        let mut untimed = self.untimed.get();
        untimed.checks += checks;
        untimed.cleanup += cleanup;
        self.untimed.set(untimed);
    }
}

/// Untimed: checks that `dir`'s children are exactly `users`, and that every `stride`-th of them
/// (all for 1) holds `expected(user)`.
async fn check_nodes(
    checker: &ZooKeeper,
    dir: &str,
    users: &[String],
    stride: usize,
    expected: impl Fn(&str) -> String,
) -> Result<(), String> {
    let children = checker
        .get_children(dir, false)
        .await
        .map_err(|e| format!("listing {dir}: {e:?}"))?;
    let children: HashSet<&str> = children.iter().map(String::as_str).collect();
    let missing = users
        .iter()
        .filter(|u| !children.contains(u.as_str()))
        .count();
    if children.len() != users.len() || missing > 0 {
        return Err(format!(
            "{dir} has {} children, expected {}; {missing} of those are missing",
            children.len(),
            users.len()
        ));
    }
    let expected = &expected;
    let wrong: Vec<String> = stream::iter(users.iter().step_by(stride.max(1)))
        .map(|user| async move {
            let path = format!("{dir}/{user}");
            let want = expected(user);
            match checker.get_data(&path, false).await {
                Ok((data, _)) if data == want.as_bytes() => None,
                Ok((data, _)) => Some(format!(
                    "{path} = {:?}, expected {want:?}",
                    String::from_utf8_lossy(&data)
                )),
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
            "{} of the {} nodes read under {dir} are wrong, e.g. {first}",
            wrong.len(),
            users.len().div_ceil(stride.max(1))
        )),
    }
}

/// Untimed: deletes `root` and everything below it. The children of `leaf_dirs` (the user and
/// case-index directories) are deleted without listing them, as they have no children.
async fn remove_tree(checker: &ZooKeeper, root: &str, leaf_dirs: &[String]) -> Result<(), String> {
    let mut levels: Vec<Vec<String>> = vec![vec![root.to_owned()]];
    loop {
        let mut next = Vec::new();
        for path in levels.last().into_iter().flatten() {
            let is_leaf = path
                .rsplit_once('/')
                .is_some_and(|(parent, _)| leaf_dirs.iter().any(|d| d == parent));
            if is_leaf {
                continue;
            }
            match checker.get_children(path, false).await {
                Ok(names) => next.extend(names.into_iter().map(|n| format!("{path}/{n}"))),
                Err(ZkError::NoNode) => {}
                Err(e) => return Err(format!("clean-up: listing {path}: {e:?}")),
            }
        }
        if next.is_empty() {
            break;
        }
        levels.push(next);
    }
    for level in levels.into_iter().rev() {
        let failed: Vec<String> = stream::iter(level)
            .map(|path| async move {
                match checker.delete(&path, None).await {
                    Ok(()) | Err(ZkError::NoNode) => None,
                    Err(e) => Some(format!("{path}: {e:?}")),
                }
            })
            .buffer_unordered(CHECK_IN_FLIGHT)
            .filter_map(|failed| async move { failed })
            .collect()
            .await;
        if let Some(first) = failed.first() {
            return Err(format!(
                "clean-up of {root}: {} deletes failed, e.g. {first}",
                failed.len()
            ));
        }
    }
    Ok(())
}

/// The median of some values (the upper one of an even count), if any.
fn median<T: Copy + PartialOrd>(mut values: Vec<T>) -> Option<T> {
    values.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    values.get(values.len() / 2).copied()
}

impl Series {
    fn samples(&self, method: Method) -> Vec<Sample> {
        self.runs
            .iter()
            .filter(|(m, _)| *m == method)
            .map(|(_, s)| *s)
            .collect()
    }

    fn median_wall(&self, method: Method) -> Duration {
        stats(self.samples(method).iter().map(|s| s.wall).collect()).0
    }

    /// How many times the baseline's median time `fast`'s median time is.
    fn ratio(&self, fast: Method, slow: Method) -> f64 {
        self.median_wall(slow).as_secs_f64() / self.median_wall(fast).as_secs_f64()
    }
}

/// The 10x target of issue 4, as a sentence.
fn verdict(ratio: f64) -> String {
    if ratio >= 10.0 {
        "target of 10x met".to_owned()
    } else {
        format!(
            "target of 10x MISSED by {:.1}x: it needs {:.2}x more",
            10.0 - ratio,
            10.0 / ratio
        )
    }
}

fn print_report(series: &Series) {
    println!();
    println!(
        "ingest: a {USERS}-user list into ZooKeeper, ZooKeeper on the {}",
        series.label
    );
    println!("JVM options: {}", series.jvm_options);
    println!("{}", series.version);
    println!("nproc: {}", nproc());
    println!(
        "repetitions: {REPETITIONS} per method, order {} (after an untimed warm-up of \
         Switchyard and the baseline on {WARMUP_USERS} users)",
        series.order.join(" | ")
    );
    println!();
    println!(
        "| method                      | median s | min s  | max s  | users/s median (min..max) |"
    );
    println!(
        "|-----------------------------|----------|--------|--------|---------------------------|"
    );
    for method in Method::ALL {
        let (median, min, max) = stats(series.samples(method).iter().map(|s| s.wall).collect());
        let rate = format!(
            "{:.0} ({:.0}..{:.0})",
            per_second(USERS, median),
            per_second(USERS, max),
            per_second(USERS, min),
        );
        println!(
            "| {:<27} | {:>8.3} | {:>6.3} | {:>6.3} | {rate:>25} |",
            method.name(),
            median.as_secs_f64(),
            min.as_secs_f64(),
            max.as_secs_f64(),
        );
    }
    println!();
    let plain = series.ratio(Method::Switchyard, Method::Baseline);
    println!(
        "ratio of medians: Switchyard ingests {plain:.2}x the baseline's users/s ({})",
        verdict(plain)
    );
    let case = series.ratio(Method::SwitchyardCase, Method::Baseline);
    println!(
        "ratio of medians, with ZKUserCaseInsensitiveIndex: Switchyard + case index ingests \
         {case:.2}x the baseline's users/s, writing twice the nodes; Go's setMiningCoin with the \
         index awaited 4 requests per user instead of 2, so about {:.2}x that (estimate: not \
         measured, to keep the run short)",
        2.0 * case
    );

    println!();
    println!("where the time goes (medians over the repetitions, measured around each timed run):");
    println!(
        "| method                      | ZK requests/user | ZK JVM CPU s | ZK JVM CPU us/user | ZK JVM busy, cores | this process CPU s | kernel irq+softirq s | other processes CPU s | awaited round trip us |"
    );
    println!(
        "|-----------------------------|------------------|--------------|--------------------|--------------------|--------------------|----------------------|-----------------------|-----------------------|"
    );
    let show = |v: Option<String>| v.unwrap_or_else(|| "-".to_owned());
    let secs = |d: Option<Duration>| d.map(|d| format!("{:.2}", d.as_secs_f64()));
    for method in Method::ALL {
        let samples = series.samples(method);
        let requests = median(samples.iter().filter_map(|s| s.zk_requests).collect())
            .map(|n| format!("{:.2}", n as f64 / USERS as f64));
        let zk_cpu = median(samples.iter().filter_map(|s| s.zk_cpu).collect());
        let zk_busy = median(
            samples
                .iter()
                .filter_map(|s| Some(s.zk_cpu?.as_secs_f64() / s.wall.as_secs_f64()))
                .collect(),
        );
        let bench_cpu = median(samples.iter().filter_map(|s| s.bench_cpu).collect());
        let irq_cpu = median(samples.iter().filter_map(|s| s.irq_cpu).collect());
        let other_cpu = median(samples.iter().filter_map(|s| s.other_cpu_ms).collect());
        let round_trip = method.awaited_per_user().and_then(|awaited| {
            median(
                samples
                    .iter()
                    .map(|s| s.wall.as_secs_f64() * 1e6 / (USERS * awaited) as f64)
                    .collect(),
            )
        });
        println!(
            "| {:<27} | {:>16} | {:>12} | {:>18} | {:>18} | {:>18} | {:>20} | {:>21} | {:>21} |",
            method.name(),
            show(requests),
            show(secs(zk_cpu)),
            show(zk_cpu.map(|d| format!("{:.1}", d.as_secs_f64() * 1e6 / USERS as f64))),
            show(zk_busy.map(|b| format!("{b:.2}"))),
            show(secs(bench_cpu)),
            show(secs(irq_cpu)),
            show(other_cpu.map(|ms| format!("{:.2}", ms as f64 / 1000.0))),
            show(round_trip.map(|us| format!("{us:.0}"))),
        );
    }
    println!(
        "(ZK requests: `mntr` zk_packets_received, from all clients incl. Switchyard's feed and \
         pings; CPU from /proc; busy = ZK JVM CPU / wall; awaited round trip = wall / (2 \
         requests per user); kernel irq+softirq: /proc/stat, mostly loopback traffic; other \
         processes: every other process and kernel thread, noise when large{})",
        if series.jvm_found {
            ""
        } else {
            "; the ZooKeeper JVM was not found"
        }
    );
}

fn print_summary(done: &[Series]) {
    if done.is_empty() {
        return;
    }
    println!();
    println!("summary (ratio of median users/s against the baseline; issue 4's target: 10x):");
    for series in done {
        let plain = series.ratio(Method::Switchyard, Method::Baseline);
        let case = series.ratio(Method::SwitchyardCase, Method::Baseline);
        println!(
            "- {:<20} Switchyard {plain:>5.2}x ({}); + case index {case:>5.2}x (~{:.2}x Go's \
             case-index path, estimated)",
            series.label,
            verdict(plain),
            2.0 * case,
        );
    }
}
