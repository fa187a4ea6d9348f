//! A real, standalone ZooKeeper server for tests, run from Debian's `zookeeper` package.
//!
//! [`ZooKeeperServer::start`] picks a free loopback port, creates a private temporary directory
//! holding `zoo.cfg`, the data directory and the server log (`zookeeper.log`), starts
//! `org.apache.zookeeper.server.ZooKeeperServerMain` in a JVM, and returns once the server answers
//! the four-letter word `ruok` with `imok` *and* `conf` shows that the server answering is this
//! one (same port and data directory). If the port was taken by someone else in between, it
//! retries on a fresh port. Startup failures carry the tail of the server log.
//!
//! A server can be stopped and restarted on the same port and data directory
//! ([`ZooKeeperServer::stop`], [`ZooKeeperServer::restart`]), which tests use to check what
//! survives a ZooKeeper outage. Dropping a server kills its JVM and removes its directory.
//!
//! Tests that only need *a* ZooKeeper can share one per test binary through
//! [`ZooKeeperServer::shared`] and keep out of each other's way by working under a
//! [`unique_root`]. Tests that stop, restart or otherwise disturb the server (or expire
//! sessions by pausing it) must start their own with [`ZooKeeperServer::start`].
//!
//! No JVM outlives its test binary: every JVM is watched by a tiny `sh` watchdog whose standard
//! input is a pipe held open by the test process. When the test process exits, however it exits
//! (including `SIGKILL` and the never-dropped shared server), the pipe closes, and the watchdog
//! kills the JVM and removes the server's directory. [`ZooKeeperServer::stop`] and `Drop` kill the
//! watchdog first and then the JVM itself, and reap both.
//!
//! [`ZooKeeperServer::start`] runs the JVM tuned for quick start-up on small CI machines (C1 JIT
//! only, serial GC, a small heap), which makes ZooKeeper itself several times slower than in
//! production. Benchmarks that measure against ZooKeeper start it with
//! [`ZooKeeperServer::start_with`] and [`ServerOptions::production_jvm`] instead: the JVM the way
//! operators run it (full tiered JIT, G1, a fixed 1 GiB heap).
//!
//! The methods that start and stop servers block the calling thread (for up to
//! [`STARTUP_TIMEOUT`]); that is fine in `#[tokio::test]` functions, which own their runtime.
//! [`ZooKeeperServer::connect`] and [`connect_client`] are async and return a connected
//! [`zookeeper_async::ZooKeeper`] client.

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use tempfile::TempDir;
use tracing::{debug, info, warn};
use zookeeper_async::{WatchedEvent, ZkError, ZooKeeper};

/// The ZooKeeper server jar installed by Debian's `zookeeper` package (`libzookeeper-java`).
///
/// Its manifest's `Class-Path` names the libraries the server needs (jute, netty, slf4j-api,
/// commons-*, metrics, jetty, jackson, snappy…), so it is enough on the class path by itself.
pub const ZOOKEEPER_JAR: &str = "/usr/share/java/zookeeper.jar";

/// Class path entries added after [`ZOOKEEPER_JAR`] when they exist: the slf4j-to-log4j binding and
/// log4j 1.2 (without them slf4j falls back to a no-op logger and the server log stays empty), and
/// the Debian configuration directory holding `log4j.properties`.
pub const LOGGING_CLASSPATH: [&str; 3] = [
    "/usr/share/java/slf4j-log4j12.jar",
    "/usr/share/java/log4j-1.2.jar",
    "/etc/zookeeper/conf",
];

/// The class started in the JVM: a single standalone server.
const MAIN_CLASS: &str = "org.apache.zookeeper.server.ZooKeeperServerMain";

/// JVM options: small heap and a quick-starting JIT, as tests run several servers on 2 cores.
const TEST_JVM_OPTIONS: &[&str] = &[
    "-Xms16m",
    "-Xmx256m",
    "-XX:+UseSerialGC",
    "-XX:TieredStopAtLevel=1",
    "-XX:-UsePerfData",
    "-Djava.net.preferIPv4Stack=true",
    "-Dzookeeper.root.logger=INFO,CONSOLE",
    "-Dzookeeper.jmx.log4j.disable=true",
];

/// JVM options with [`ServerOptions::production_jvm`]: as operators run ZooKeeper (its
/// `zkServer.sh` sets a heap of about 1 GiB and leaves the JIT and the JVM's default collector,
/// G1, alone), with the heap fixed so that it does not grow during a measurement.
const PRODUCTION_JVM_OPTIONS: &[&str] = &[
    "-Xms1g",
    "-Xmx1g",
    "-XX:+UseG1GC",
    "-Djava.net.preferIPv4Stack=true",
    "-Dzookeeper.root.logger=INFO,CONSOLE",
    "-Dzookeeper.jmx.log4j.disable=true",
];

/// How a server started by [`ZooKeeperServer::start_with`] runs. The default is what
/// [`ZooKeeperServer::start`] (and so every test) uses.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ServerOptions {
    /// Run the JVM as in production (full tiered JIT, G1, `-Xms1g -Xmx1g`) rather than tuned
    /// for quick start-up (`-XX:TieredStopAtLevel=1`, serial GC, at most 256 MiB of heap).
    /// For benchmarks: the test JVM makes ZooKeeper several times slower per request. It
    /// reserves 1 GiB per server and starts a little slower, so tests should leave it off.
    /// The server's `zoo.cfg` is the same either way (notably `forceSync=no`).
    pub production_jvm: bool,
}

impl ServerOptions {
    /// The JVM options these settings stand for.
    pub fn jvm_options(&self) -> &'static [&'static str] {
        if self.production_jvm {
            PRODUCTION_JVM_OPTIONS
        } else {
            TEST_JVM_OPTIONS
        }
    }
}

/// How long a start or restart may take until the server answers `ruok` with `imok`.
pub const STARTUP_TIMEOUT: Duration = Duration::from_secs(30);

/// How long [`ZooKeeperServer::stop`] waits for the port to stop answering once the JVM is reaped.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// How many fresh ports [`ZooKeeperServer::start`] tries when the chosen port was taken.
const START_ATTEMPTS: u32 = 5;

/// Pause between two readiness or shutdown probes.
const POLL_INTERVAL: Duration = Duration::from_millis(50);

/// Timeout of one four-letter-word exchange.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// How many lines of the server log an error message shows.
const LOG_TAIL_LINES: usize = 40;

/// The server's `tickTime` in milliseconds: short, so that session expiry is quick in tests.
const TICK_TIME_MS: u64 = 500;

/// The smallest session timeout the server grants, in milliseconds.
pub const SERVER_MIN_SESSION_TIMEOUT_MS: u64 = 1_000;

/// The largest session timeout the server grants, in milliseconds.
pub const SERVER_MAX_SESSION_TIMEOUT_MS: u64 = 60_000;

/// The smallest session timeout [`connect_client`] accepts.
///
/// zookeeper-async 5 derives the read timeout of its connection from whole seconds of two thirds
/// of the session timeout; below 1.5 s that rounds down to zero and the client reconnects in a
/// loop instead of working.
pub const MIN_CLIENT_SESSION_TIMEOUT: Duration = Duration::from_millis(1_500);

/// How long [`connect_client`] waits for the client's session to be established.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a zookeeper-async client waits between two attempts to reach an unreachable server.
/// (zookeeper-async's default, zero, makes a client spin on a CPU while its server is stopped.)
const CLIENT_RETRY_DELAY: Duration = Duration::from_millis(100);

/// The watchdog run by `sh -c` next to every JVM, with `$1` = the JVM's pid and `$2` = the
/// server's directory. Its standard input is a pipe whose write end only the test process holds:
/// `read` returns at end of file, that is when the test process has exited (or dropped the
/// watchdog without killing it). It then kills the JVM, gives it a moment to disappear, and
/// removes the server's directory, which a never-dropped (shared) server would otherwise leave
/// behind. The fixture kills the watchdog before it kills and reaps the JVM, so the watchdog never
/// signals a reaped (and possibly reused) pid.
const WATCHDOG_SCRIPT: &str = r#"read -r _ignored
kill -9 "$1" 2>/dev/null
i=0
while kill -0 "$1" 2>/dev/null && [ "$i" -lt 40 ]; do sleep 0.05; i=$((i + 1)); done
[ -n "$2" ] && rm -rf -- "$2"
"#;

/// Errors of the ZooKeeper test fixture.
#[derive(Debug, thiserror::Error)]
pub enum ZkFixtureError {
    /// The Debian `zookeeper` package (its server jar) is not installed.
    #[error("ZooKeeper is not installed: {path} is missing (install Debian's `zookeeper` package)")]
    NotInstalled {
        /// The missing file.
        path: PathBuf,
    },
    /// A file system or socket operation of the fixture failed.
    #[error("{context}: {source}")]
    Io {
        /// What the fixture was doing.
        context: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The server could not bind its client port because something else holds it.
    #[error(
        "ZooKeeper could not bind 127.0.0.1:{port}: address already in use\n\
         --- tail of {log} ---\n{log_tail}"
    )]
    PortInUse {
        /// The port.
        port: u16,
        /// The server log.
        log: PathBuf,
        /// The last lines of the server log.
        log_tail: String,
    },
    /// The JVM exited before the server was ready.
    #[error(
        "ZooKeeper on 127.0.0.1:{port} exited during startup ({status})\n\
         --- tail of {log} ---\n{log_tail}"
    )]
    ExitedEarly {
        /// The port.
        port: u16,
        /// How the JVM exited.
        status: ExitStatus,
        /// The server log.
        log: PathBuf,
        /// The last lines of the server log.
        log_tail: String,
    },
    /// The server did not answer `ruok` with `imok` (and `conf` with its own settings) in time.
    #[error(
        "ZooKeeper on 127.0.0.1:{port} was not ready {timeout:?} after starting \
         (expected `ruok` -> `imok` and `conf` showing this server; last probe: {last_probe})\n\
         --- tail of {log} ---\n{log_tail}"
    )]
    StartTimeout {
        /// The port.
        port: u16,
        /// How long the fixture waited.
        timeout: Duration,
        /// What the last readiness probe saw.
        last_probe: String,
        /// The server log.
        log: PathBuf,
        /// The last lines of the server log.
        log_tail: String,
    },
    /// The port still accepted connections after the server's JVM had exited.
    #[error(
        "127.0.0.1:{port} still accepts connections {timeout:?} after its ZooKeeper was killed"
    )]
    StopTimeout {
        /// The port.
        port: u16,
        /// How long the fixture waited.
        timeout: Duration,
    },
    /// Every attempt to start a server on a fresh port found the port taken.
    #[error("could not start ZooKeeper in {attempts} attempts on fresh ports; last error: {last}")]
    NoFreePort {
        /// How many ports were tried.
        attempts: u32,
        /// The error of the last attempt.
        last: Box<ZkFixtureError>,
    },
    /// The server is stopped, so it cannot answer.
    #[error("ZooKeeper on 127.0.0.1:{port} is stopped")]
    Stopped {
        /// The port.
        port: u16,
    },
    /// The shared server of this test binary failed to start (when first used).
    #[error("the shared ZooKeeper server of this test binary failed to start: {0}")]
    SharedUnavailable(String),
    /// [`connect_client`] was asked for a session timeout zookeeper-async cannot work with.
    #[error(
        "session timeout {requested:?} is below {minimum:?}, with which zookeeper-async 5 \
         reconnects in a loop; use a longer one"
    )]
    SessionTimeoutTooShort {
        /// The requested session timeout.
        requested: Duration,
        /// [`MIN_CLIENT_SESSION_TIMEOUT`].
        minimum: Duration,
    },
    /// zookeeper-async refused to connect (e.g. a malformed connect string).
    #[error("zookeeper-async could not connect to {connect_string}: {source}")]
    Connect {
        /// The connect string.
        connect_string: String,
        /// The client's error.
        #[source]
        source: ZkError,
    },
    /// The zookeeper-async client did not establish a session in time.
    #[error(
        "zookeeper-async client did not get a session with {connect_string} within {timeout:?} \
         (last error: {last_error})"
    )]
    ConnectTimeout {
        /// The connect string.
        connect_string: String,
        /// How long the fixture waited.
        timeout: Duration,
        /// The last error seen while probing the session, if any.
        last_error: String,
    },
}

impl ZkFixtureError {
    fn io(context: impl Into<String>) -> impl FnOnce(io::Error) -> Self {
        let context = context.into();
        move |source| Self::Io { context, source }
    }
}

/// A JVM running a server, and its watchdog.
#[derive(Debug)]
struct Running {
    java: Child,
    /// `None` only if the watchdog could not be started (the JVM then is not protected against
    /// the test process dying, which is logged).
    watchdog: Option<Child>,
}

impl Running {
    /// Kills the watchdog and then the JVM, and reaps both.
    fn kill(mut self) {
        if let Some(mut watchdog) = self.watchdog.take() {
            if let Err(error) = watchdog.kill() {
                debug!(%error, "killing the ZooKeeper watchdog");
            }
            if let Err(error) = watchdog.wait() {
                warn!(%error, "reaping the ZooKeeper watchdog");
            }
        }
        let pid = self.java.id();
        if let Err(error) = self.java.kill() {
            debug!(pid, %error, "killing the ZooKeeper JVM");
        }
        match self.java.wait() {
            Ok(status) => debug!(pid, %status, "ZooKeeper JVM exited"),
            Err(error) => warn!(pid, %error, "reaping the ZooKeeper JVM"),
        }
    }
}

/// A standalone ZooKeeper server on `127.0.0.1`, with a private temporary directory.
///
/// Dropping it kills the server and deletes its directory.
#[derive(Debug)]
pub struct ZooKeeperServer {
    port: u16,
    /// The temporary directory holding `zoo.cfg`, the data directory and the server log; removed
    /// when dropped, after `Drop` has killed the JVM.
    dir: TempDir,
    config_path: PathBuf,
    data_dir: PathBuf,
    log_path: PathBuf,
    options: ServerOptions,
    process: Option<Running>,
}

/// The server shared by the tests of one test binary.
static SHARED: OnceLock<Result<ZooKeeperServer, String>> = OnceLock::new();

/// Tells [`unique_root`] results apart within this process.
static ROOT_COUNTER: AtomicU64 = AtomicU64::new(0);

impl ZooKeeperServer {
    /// Starts a new server on a free loopback port with an empty data directory, and waits (up to
    /// [`STARTUP_TIMEOUT`]) until it serves.
    ///
    /// If the chosen port is taken before the server binds it, retries on a fresh port a few
    /// times. Blocks the calling thread.
    pub fn start() -> Result<Self, ZkFixtureError> {
        Self::start_with(ServerOptions::default())
    }

    /// Starts a new server as [`start`](Self::start) does, with its JVM run as `options` say;
    /// [`restart`](Self::restart)s keep them.
    pub fn start_with(options: ServerOptions) -> Result<Self, ZkFixtureError> {
        check_installed()?;
        let dir = tempfile::Builder::new()
            .prefix("switchyard-zk-")
            .tempdir()
            .map_err(ZkFixtureError::io(
                "creating the ZooKeeper temporary directory",
            ))?;
        let data_dir = dir.path().join("data");
        fs::create_dir(&data_dir).map_err(ZkFixtureError::io(format!(
            "creating the ZooKeeper data directory {}",
            data_dir.display()
        )))?;
        let mut server = Self {
            port: 0,
            config_path: dir.path().join("zoo.cfg"),
            log_path: dir.path().join("zookeeper.log"),
            data_dir,
            dir,
            options,
            process: None,
        };

        let mut last_error = None;
        for attempt in 1..=START_ATTEMPTS {
            server.port = free_port()?;
            server.write_config()?;
            match server.launch(Instant::now() + STARTUP_TIMEOUT) {
                Ok(()) => return Ok(server),
                Err(error @ ZkFixtureError::PortInUse { .. }) => {
                    warn!(
                        attempt,
                        port = server.port,
                        "ZooKeeper port was taken; retrying"
                    );
                    last_error = Some(error);
                }
                Err(error) => return Err(error),
            }
        }
        Err(ZkFixtureError::NoFreePort {
            attempts: START_ATTEMPTS,
            last: Box::new(last_error.unwrap_or(ZkFixtureError::Stopped { port: server.port })),
        })
    }

    /// The server shared by all tests of this test binary, started on first use.
    ///
    /// Tests using it must not stop, restart or pause it, and should keep their znodes under a
    /// [`unique_root`]; tests that disturb the server must [`start`](Self::start) their own. The
    /// shared server lives until the test binary exits (statics are never dropped); its watchdog
    /// then kills it and removes its directory.
    ///
    /// If the first start failed, every call returns that failure (without retrying).
    pub fn shared() -> Result<&'static ZooKeeperServer, ZkFixtureError> {
        match SHARED.get_or_init(|| Self::start().map_err(|error| error.to_string())) {
            Ok(server) => Ok(server),
            Err(message) => Err(ZkFixtureError::SharedUnavailable(message.clone())),
        }
    }

    /// The client connect string, `127.0.0.1:PORT` (append a path for a chroot).
    pub fn connect_string(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The client port on `127.0.0.1`; it stays the same across [`restart`](Self::restart)s.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The server's data directory (`dataDir`, inside the server's temporary directory).
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The server log: the JVM's standard output and error, across restarts.
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// The last lines of the server log (for failure messages).
    pub fn log_tail(&self) -> String {
        log_tail(&self.log_path)
    }

    /// How the server's JVM runs.
    pub fn options(&self) -> ServerOptions {
        self.options
    }

    /// Whether the server's JVM was started and has not been stopped (it may have crashed).
    pub fn is_running(&self) -> bool {
        self.process.is_some()
    }

    /// Sends a four-letter word (e.g. `ruok`, `srvr`, `mntr`, `cons`) and returns the answer.
    ///
    /// The server whitelists `ruok`, `srvr`, `stat`, `mntr`, `conf`, `cons`, `envi`, `wchs`,
    /// `wchc`, `wchp`, `dump`, `crst`, `srst` and `isro`. Blocks the calling thread (up to a
    /// couple of seconds).
    pub fn four_letter_word(&self, word: &str) -> Result<String, ZkFixtureError> {
        four_letter_word(self.port, word).map_err(ZkFixtureError::io(format!(
            "sending `{word}` to ZooKeeper on 127.0.0.1:{}",
            self.port
        )))
    }

    /// Kills the server (`SIGKILL`, so the data directory is left as by a crash), reaps it, and
    /// waits until its port refuses connections. Does nothing if it is already stopped.
    ///
    /// Blocks the calling thread.
    pub fn stop(&mut self) -> Result<(), ZkFixtureError> {
        let Some(running) = self.process.take() else {
            return Ok(());
        };
        info!(
            port = self.port,
            pid = running.java.id(),
            "stopping ZooKeeper"
        );
        running.kill();
        let deadline = Instant::now() + STOP_TIMEOUT;
        while port_accepts(self.port) {
            if Instant::now() >= deadline {
                return Err(ZkFixtureError::StopTimeout {
                    port: self.port,
                    timeout: STOP_TIMEOUT,
                });
            }
            thread::sleep(POLL_INTERVAL);
        }
        Ok(())
    }

    /// Starts the server again on the same port and data directory (stopping it first if it is
    /// running), and waits (up to [`STARTUP_TIMEOUT`]) until it serves.
    ///
    /// While something else holds the port, keeps trying until the deadline. Blocks the calling
    /// thread.
    pub fn restart(&mut self) -> Result<(), ZkFixtureError> {
        self.stop()?;
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        loop {
            match self.launch(deadline) {
                Err(ZkFixtureError::PortInUse { .. }) if Instant::now() < deadline => {
                    warn!(
                        port = self.port,
                        "ZooKeeper port is held by someone else; retrying"
                    );
                    thread::sleep(Duration::from_millis(200));
                }
                result => return result,
            }
        }
    }

    /// Connects a zookeeper-async client to this server and waits until its session is
    /// established; see [`connect_client`].
    pub async fn connect(&self, session_timeout: Duration) -> Result<ZooKeeper, ZkFixtureError> {
        connect_client(&self.connect_string(), session_timeout).await
    }

    /// Writes `zoo.cfg` for the current port.
    fn write_config(&self) -> Result<(), ZkFixtureError> {
        let config = format!(
            "# Written by switchyard-tests' ZooKeeper fixture.\n\
             dataDir={data_dir}\n\
             clientPort={port}\n\
             clientPortAddress=127.0.0.1\n\
             tickTime={TICK_TIME_MS}\n\
             minSessionTimeout={SERVER_MIN_SESSION_TIMEOUT_MS}\n\
             maxSessionTimeout={SERVER_MAX_SESSION_TIMEOUT_MS}\n\
             # Unlimited: the shared server takes many connections from 127.0.0.1.\n\
             maxClientCnxns=0\n\
             admin.enableServer=false\n\
             4lw.commands.whitelist=ruok,srvr,stat,mntr,conf,cons,envi,wchs,wchc,wchp,dump,crst,srst,isro\n\
             # Tests only survive process kills, not power cuts: skip fsync, keep log files small.\n\
             forceSync=no\n\
             preAllocSize=1024\n",
            data_dir = self.data_dir.display(),
            port = self.port,
        );
        fs::write(&self.config_path, config).map_err(ZkFixtureError::io(format!(
            "writing {}",
            self.config_path.display()
        )))
    }

    /// Starts the JVM and its watchdog, and waits until the server serves or `deadline` passes.
    /// On failure, nothing is left running.
    fn launch(&mut self, deadline: Instant) -> Result<(), ZkFixtureError> {
        let mut log = File::options()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .map_err(ZkFixtureError::io(format!(
                "opening {}",
                self.log_path.display()
            )))?;
        writeln!(
            log,
            "=== switchyard-tests: starting ZooKeeper on 127.0.0.1:{} ===",
            self.port
        )
        .map_err(ZkFixtureError::io(format!(
            "writing {}",
            self.log_path.display()
        )))?;
        let stderr = log.try_clone().map_err(ZkFixtureError::io(format!(
            "duplicating {}",
            self.log_path.display()
        )))?;

        let java = Command::new("java")
            .args(self.options.jvm_options())
            .arg(format!("-Dzookeeper.log.dir={}", self.dir.path().display()))
            .arg("-cp")
            .arg(classpath())
            .arg(MAIN_CLASS)
            .arg(&self.config_path)
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(stderr)
            .spawn()
            .map_err(ZkFixtureError::io(
                "starting `java` for ZooKeeper (is a JRE on PATH?)",
            ))?;
        let pid = java.id();
        let watchdog = match Command::new("/bin/sh")
            .arg("-c")
            .arg(WATCHDOG_SCRIPT)
            .arg("switchyard-zk-watchdog")
            .arg(pid.to_string())
            .arg(self.dir.path())
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
        {
            Ok(watchdog) => Some(watchdog),
            Err(error) => {
                warn!(%error, pid, "could not start the ZooKeeper watchdog; the JVM may outlive a crashed test");
                None
            }
        };
        info!(port = self.port, pid, dir = %self.dir.path().display(), "starting ZooKeeper");
        self.process = Some(Running { java, watchdog });

        let result = self.wait_until_ready(deadline);
        if result.is_err()
            && let Some(running) = self.process.take()
        {
            running.kill();
        }
        result
    }

    /// Polls until the server answers `ruok` with `imok` and `conf` with this server's settings.
    fn wait_until_ready(&mut self, deadline: Instant) -> Result<(), ZkFixtureError> {
        let started = Instant::now();
        loop {
            let exited = match self.process.as_mut() {
                Some(running) => running.java.try_wait().map_err(ZkFixtureError::io(
                    "checking whether the ZooKeeper JVM is alive",
                ))?,
                None => return Err(ZkFixtureError::Stopped { port: self.port }),
            };
            if let Some(status) = exited {
                if let Some(running) = self.process.take() {
                    running.kill();
                }
                let log_tail = self.log_tail();
                let log = self.log_path.clone();
                let port = self.port;
                return Err(
                    if log_tail.contains("Address already in use")
                        || log_tail.contains("BindException")
                    {
                        ZkFixtureError::PortInUse {
                            port,
                            log,
                            log_tail,
                        }
                    } else {
                        ZkFixtureError::ExitedEarly {
                            port,
                            status,
                            log,
                            log_tail,
                        }
                    },
                );
            }
            let last_probe = match self.probe() {
                Ok(()) => {
                    info!(port = self.port, elapsed = ?started.elapsed(), "ZooKeeper is ready");
                    return Ok(());
                }
                Err(probe) => probe,
            };
            if Instant::now() >= deadline {
                return Err(ZkFixtureError::StartTimeout {
                    port: self.port,
                    timeout: STARTUP_TIMEOUT,
                    last_probe,
                    log: self.log_path.clone(),
                    log_tail: self.log_tail(),
                });
            }
            thread::sleep(POLL_INTERVAL);
        }
    }

    /// One readiness probe: `ruok` must yield `imok`, and `conf` must name this server's port and
    /// data directory (so that a foreign server that grabbed the port is not mistaken for ours,
    /// and the server has loaded its data). Returns what was seen otherwise.
    fn probe(&self) -> Result<(), String> {
        let ruok = four_letter_word(self.port, "ruok").map_err(|error| format!("ruok: {error}"))?;
        if ruok != "imok" {
            return Err(format!("ruok answered {ruok:?}"));
        }
        let conf = four_letter_word(self.port, "conf").map_err(|error| format!("conf: {error}"))?;
        let port_line = format!("clientPort={}", self.port);
        let data_dir_prefix = format!("dataDir={}/", self.data_dir.display());
        if conf.lines().any(|line| line == port_line)
            && conf.lines().any(|line| line.starts_with(&data_dir_prefix))
        {
            Ok(())
        } else {
            Err(format!(
                "conf answered {conf:?}, expected {port_line:?} and a line starting with {data_dir_prefix:?}"
            ))
        }
    }
}

impl Drop for ZooKeeperServer {
    fn drop(&mut self) {
        if let Some(running) = self.process.take() {
            debug!(port = self.port, "dropping ZooKeeper server");
            running.kill();
        }
    }
}

/// Returns a fresh znode path prefix such as `/t-election-4242-7`, unique within this machine's
/// running processes, so that tests sharing a server cannot see each other's znodes.
///
/// Characters of `prefix` other than ASCII letters, digits, `-` and `_` are replaced by `_`. The
/// path is not created; use it as the parent of a test's znodes, or as a chroot suffix of a
/// connect string once it exists.
pub fn unique_root(prefix: &str) -> String {
    let prefix: String = prefix
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    let counter = ROOT_COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("/t-{prefix}-{}-{counter}", std::process::id())
}

/// Connects a zookeeper-async client to `connect_string` (which may end in a chroot path) and
/// waits (up to [`CONNECT_TIMEOUT`]) until its session is established, proven by a successful
/// `exists("/")`.
///
/// The client retries an unreachable server every 100 ms (rather than spinning) and logs watch
/// events at debug level. `session_timeout` must be at least [`MIN_CLIENT_SESSION_TIMEOUT`]; the
/// server grants between 1 s and 60 s.
pub async fn connect_client(
    connect_string: &str,
    session_timeout: Duration,
) -> Result<ZooKeeper, ZkFixtureError> {
    if session_timeout < MIN_CLIENT_SESSION_TIMEOUT {
        return Err(ZkFixtureError::SessionTimeoutTooShort {
            requested: session_timeout,
            minimum: MIN_CLIENT_SESSION_TIMEOUT,
        });
    }
    let deadline = tokio::time::Instant::now() + CONNECT_TIMEOUT;
    let timed_out = |last_error: String| ZkFixtureError::ConnectTimeout {
        connect_string: connect_string.to_owned(),
        timeout: CONNECT_TIMEOUT,
        last_error,
    };
    let watcher = |event: WatchedEvent| debug!(?event, "ZooKeeper watch event");
    let client = tokio::time::timeout_at(
        deadline,
        ZooKeeper::connect_with_retry_time(
            connect_string,
            session_timeout,
            watcher,
            CLIENT_RETRY_DELAY,
        ),
    )
    .await
    .map_err(|_| timed_out("the server was unreachable".to_owned()))?
    .map_err(|source| ZkFixtureError::Connect {
        connect_string: connect_string.to_owned(),
        source,
    })?;

    let mut last_error = String::from("none");
    loop {
        match tokio::time::timeout_at(deadline, client.exists("/", false)).await {
            Ok(Ok(_)) => {
                debug!(connect_string, "zookeeper-async client connected");
                return Ok(client);
            }
            Ok(Err(error)) => last_error = error.to_string(),
            Err(_) => return Err(timed_out(last_error)),
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(timed_out(last_error));
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// Fails unless the ZooKeeper server jar is installed.
fn check_installed() -> Result<(), ZkFixtureError> {
    let jar = Path::new(ZOOKEEPER_JAR);
    if jar.is_file() {
        Ok(())
    } else {
        Err(ZkFixtureError::NotInstalled {
            path: jar.to_owned(),
        })
    }
}

/// The JVM class path: [`ZOOKEEPER_JAR`] and those [`LOGGING_CLASSPATH`] entries that exist.
fn classpath() -> String {
    let mut entries = vec![ZOOKEEPER_JAR];
    for entry in LOGGING_CLASSPATH {
        if Path::new(entry).exists() {
            entries.push(entry);
        } else {
            debug!(entry, "not on the ZooKeeper class path: missing");
        }
    }
    entries.join(":")
}

/// A loopback port that was free a moment ago: bind port 0, read the port, release it.
fn free_port() -> Result<u16, ZkFixtureError> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).map_err(ZkFixtureError::io(
        "binding 127.0.0.1:0 to find a free port",
    ))?;
    let port = listener
        .local_addr()
        .map_err(ZkFixtureError::io("reading the port of 127.0.0.1:0"))?
        .port();
    drop(listener);
    Ok(port)
}

/// Whether something accepts TCP connections on the loopback port.
fn port_accepts(port: u16) -> bool {
    TcpStream::connect_timeout(
        &SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
        PROBE_TIMEOUT,
    )
    .is_ok()
}

/// Sends a four-letter word to the server on the loopback port and reads the whole answer.
fn four_letter_word(port: u16, word: &str) -> io::Result<String> {
    let mut stream = TcpStream::connect_timeout(
        &SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
        PROBE_TIMEOUT,
    )?;
    stream.set_read_timeout(Some(PROBE_TIMEOUT))?;
    stream.set_write_timeout(Some(PROBE_TIMEOUT))?;
    stream.write_all(word.as_bytes())?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer)?;
    Ok(answer)
}

/// The last [`LOG_TAIL_LINES`] lines of a log file, or a note saying why there are none.
fn log_tail(path: &Path) -> String {
    const MAX_BYTES: usize = 64 * 1024;
    match fs::read(path) {
        Ok(bytes) => {
            let start = bytes.len().saturating_sub(MAX_BYTES);
            let text = String::from_utf8_lossy(bytes.get(start..).unwrap_or_default());
            let lines: Vec<&str> = text.lines().collect();
            let first = lines.len().saturating_sub(LOG_TAIL_LINES);
            lines.get(first..).unwrap_or_default().join("\n")
        }
        Err(error) => format!("(cannot read {}: {error})", path.display()),
    }
}
