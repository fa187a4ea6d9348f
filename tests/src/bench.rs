//! Measurement helpers shared by the benchmarks in `benches/`: CPU time of processes from
//! `/proc`, the ZooKeeper fixture's JVM, and summary statistics.

use std::time::Duration;

use crate::zookeeper::ZooKeeperServer;

/// The pid of the fixture's JVM: the process whose command line names this server's `zoo.cfg`.
pub fn jvm_pid(zk: &ZooKeeperServer) -> Option<u32> {
    let config = zk.data_dir().parent()?.join("zoo.cfg");
    let config = config.to_str()?.as_bytes().to_vec();
    std::fs::read_dir("/proc")
        .ok()?
        .flatten()
        .find_map(|entry| {
            let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
            let cmdline = std::fs::read(entry.path().join("cmdline")).ok()?;
            let mut args = cmdline.split(|b| *b == 0);
            let is_java = args.next().is_some_and(|exe| exe.ends_with(b"java"));
            (is_java && args.any(|arg| arg == config.as_slice())).then_some(pid)
        })
}

/// `after - before`, when both were read.
pub fn delta(after: Option<Duration>, before: Option<Duration>) -> Option<Duration> {
    after.zip(before).map(|(a, b)| a.saturating_sub(b))
}

/// The clock-tick fields of a process's `/proc/PID/stat` from utime on (utime, stime, cutime,
/// cstime, ...), each in ticks of 1/100 s (Linux's USER_HZ).
fn stat_ticks(stat_path: &str, take: usize) -> Option<Vec<u64>> {
    let stat = std::fs::read_to_string(stat_path).ok()?;
    // Fields after the parenthesized command name, which may itself hold spaces.
    let fields: Vec<&str> = stat
        .get(stat.rfind(')')? + 1..)?
        .split_whitespace()
        .collect();
    // utime, stime, cutime and cstime are fields 14 to 17; the slice starts at field 3.
    fields
        .get(11..11 + take)?
        .iter()
        .map(|field| field.parse::<u64>().ok())
        .collect()
}

/// CPU time of a process from its `/proc/PID/stat` (in clock ticks of 1/100 s, Linux's
/// USER_HZ): user plus system time of every thread, and with `children` that of its children
/// that ended and were reaped.
pub fn stat_cpu(stat_path: &str, children: bool) -> Option<Duration> {
    let ticks: u64 = stat_ticks(stat_path, if children { 4 } else { 2 })?
        .iter()
        .sum();
    Some(Duration::from_millis(ticks * 10))
}

/// User plus system CPU time of every thread of a process.
pub fn process_cpu(stat_path: &str) -> Option<Duration> {
    stat_cpu(stat_path, false)
}

/// A process's CPU time split by where it was spent.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CpuTimes {
    /// In the process's own code and its libraries.
    pub user: Duration,
    /// In the kernel on the process's behalf (system calls, and on loopback the receiving
    /// side's TCP work that a send runs).
    pub system: Duration,
}

impl CpuTimes {
    /// User plus system time.
    pub fn total(self) -> Duration {
        self.user + self.system
    }

    /// `self - before`, field by field.
    pub fn since(self, before: Self) -> Self {
        Self {
            user: self.user.saturating_sub(before.user),
            system: self.system.saturating_sub(before.system),
        }
    }
}

/// User and system CPU time of every thread of a process, from its `/proc/PID/stat`.
pub fn process_cpu_times(stat_path: &str) -> Option<CpuTimes> {
    let ticks = stat_ticks(stat_path, 2)?;
    let (user, system) = (*ticks.first()?, *ticks.get(1)?);
    Some(CpuTimes {
        user: Duration::from_millis(user * 10),
        system: Duration::from_millis(system * 10),
    })
}

/// Median, min and max of some durations.
pub fn stats(mut samples: Vec<Duration>) -> (Duration, Duration, Duration) {
    samples.sort_unstable();
    let min = samples.first().copied().unwrap_or_default();
    let max = samples.last().copied().unwrap_or_default();
    let median = samples.get(samples.len() / 2).copied().unwrap_or_default();
    (median, min, max)
}

/// `count` per second over `time`.
pub fn per_second(count: usize, time: Duration) -> f64 {
    let secs = time.as_secs_f64();
    if secs > 0.0 {
        count as f64 / secs
    } else {
        f64::INFINITY
    }
}

/// What `nproc` prints, for the report.
pub fn nproc() -> String {
    std::process::Command::new("nproc")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| format!("{n} (available_parallelism; `nproc` did not run)"))
                .unwrap_or_else(|_| "unknown".into())
        })
}

/// The requests the server has received (`mntr`'s `zk_packets_received`). Blocks the thread for
/// one exchange on loopback: call it outside timed sections.
pub fn zk_packets_received(zk: &ZooKeeperServer) -> Option<u64> {
    tokio::task::block_in_place(|| zk.four_letter_word("mntr"))
        .ok()?
        .lines()
        .find_map(|line| {
            line.strip_prefix("zk_packets_received")?
                .trim()
                .parse()
                .ok()
        })
}

/// The pid of the process whose command line has an argument equal to `arg` (e.g. the config
/// file of a child started by a fixture that does not expose its pid).
pub fn pid_with_arg(arg: &str) -> Option<u32> {
    std::fs::read_dir("/proc")
        .ok()?
        .flatten()
        .find_map(|entry| {
            let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
            let cmdline = std::fs::read(entry.path().join("cmdline")).ok()?;
            cmdline
                .split(|b| *b == 0)
                .any(|a| a == arg.as_bytes())
                .then_some(pid)
        })
}

/// The resident memory of a process, in KiB (`VmRSS` of `/proc/PID/status`).
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// The value at quantile `q` (0..=1) of sorted samples (nearest rank), if any.
pub fn quantile<T: Copy>(sorted: &[T], q: f64) -> Option<T> {
    if sorted.is_empty() {
        return None;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted.get(rank.clamp(1, sorted.len()) - 1).copied()
}

/// CPU time the whole machine spent busy (every CPU, every state but idle and iowait), from the
/// first line of `/proc/stat` (in clock ticks of 1/100 s).
pub fn machine_busy_cpu() -> Option<Duration> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let fields: Vec<u64> = stat
        .lines()
        .next()?
        .strip_prefix("cpu ")?
        .split_whitespace()
        .map(|f| f.parse().ok())
        .collect::<Option<_>>()?;
    let busy: u64 = fields
        .iter()
        .take(8)
        .enumerate()
        .filter(|(i, _)| *i != 3 && *i != 4)
        .map(|(_, v)| v)
        .sum();
    Some(Duration::from_millis(busy * 10))
}
