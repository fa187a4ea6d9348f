//! `switchyard-cli`: the command line the Switchyard binaries (`switchyard-control`,
//! `switchyard-proxy`, `switchyard-init`) share, so that the Go programs' supervisor entries run
//! unchanged with only the binary path replaced, e.g.
//!
//! ```text
//! switchyard-proxy -config=/work/golang/stratumSwitcher/config.json -log_dir=/work/golang/stratumSwitcher/log -v 2
//! ```
//!
//! Two parts, one implementation for all three binaries:
//!
//! - [`go_style_args`] rewrites the Go `flag` package's single-dash long flags (`-config=FILE`,
//!   `-config FILE`, `-log_dir=DIR`, `-v N`, `-v=N`, `-logtostderr`, `-alsologtostderr`, `-h`,
//!   `-help`) into the forms clap parses; every other argument is left as it is.
//! - [`LogArgs`] holds glog's flags (flattened into each binary's clap arguments) and
//!   [`LogArgs::init`] sets up the logging they select: stderr, or daily-rotated files in
//!   `-log_dir` (the last [`KEPT_LOG_FILES`] kept) with errors also on stderr, as glog did; text
//!   or JSON lines as the binary's `LogFormat` setting says; ANSI colours only on a terminal;
//!   the level from `-v` (see [`level_for_verbosity`]) refined by `RUST_LOG`.
//!
//! It also holds [`Secret`] ([`secret`]), the one type every configuration keeps its tokens and
//! passwords in, so that none of them is ever printed.

use std::{
    ffi::OsString,
    fmt,
    io::IsTerminal,
    path::{Path, PathBuf},
};

use clap::ArgAction;

pub mod build;
pub mod metrics;
pub mod secret;

pub use secret::{Secret, SecretError, read_secret_file, resolve_secret};
use tracing::{Subscriber, level_filters::LevelFilter};
use tracing_appender::rolling::{InitError, RollingFileAppender, Rotation};
use tracing_subscriber::{
    EnvFilter, Layer, Registry,
    fmt::MakeWriter,
    layer::{Layered, SubscriberExt},
    util::{SubscriberInitExt, TryInitError},
};

/// How many daily log files a `-log_dir` keeps (the current one included): a week.
pub const KEPT_LOG_FILES: usize = 7;

/// The Go programs' long flags that this crate rewrites from their single-dash form, by their
/// Go names. Each is parsed by the binaries and does something.
const GO_FLAGS: [&str; 6] = [
    "config",
    "log_dir",
    "v",
    "logtostderr",
    "alsologtostderr",
    "help",
];

/// Rewrites the Go `flag` package's forms into clap's, and returns the arguments to parse
/// (the program name first, as given):
///
/// - `-NAME`, `-NAME=VALUE` for a Go flag name (`config`, `log_dir`, `v`, `logtostderr`,
///   `alsologtostderr`, `help`) become `--NAME`, `--NAME=VALUE`, with `_` written `-`
///   (`-log_dir=DIR` is `--log-dir=DIR`); `-config FILE` and `-v 2` keep their value as the next
///   argument;
/// - `-h` becomes `--help`, so that it prints the same as `--help` (clap's `-h` would leave out
///   the long help, the settings list);
/// - everything else, and everything after a bare `--`, is left as it is.
pub fn go_style_args<I, T>(args: I) -> Vec<OsString>
where
    I: IntoIterator<Item = T>,
    T: Into<OsString>,
{
    let mut out = Vec::new();
    let mut rest_verbatim = false;
    for (i, arg) in args.into_iter().enumerate() {
        let arg: OsString = arg.into();
        if i == 0 || rest_verbatim {
            out.push(arg);
            continue;
        }
        let rewritten = arg.to_str().and_then(|text| {
            if text == "--" {
                rest_verbatim = true;
                return None;
            }
            rewrite_go_flag(text)
        });
        out.push(rewritten.map_or(arg, OsString::from));
    }
    out
}

/// `-NAME[=VALUE]` of a Go flag as clap's `--NAME[=VALUE]`; `None` for anything else.
fn rewrite_go_flag(arg: &str) -> Option<String> {
    if arg == "-h" {
        return Some("--help".into());
    }
    let body = arg.strip_prefix('-')?;
    if body.starts_with('-') {
        return None;
    }
    let (name, value) = match body.split_once('=') {
        Some((name, value)) => (name, Some(value)),
        None => (body, None),
    };
    if !GO_FLAGS.contains(&name) {
        return None;
    }
    let name = name.replace('_', "-");
    Some(match value {
        Some(value) => format!("--{name}={value}"),
        None => format!("--{name}"),
    })
}

/// glog's flags, as each binary takes them (flatten with `#[command(flatten)]`), and the help
/// flag. Every one of glog's changes where or what the binary logs; see [`LogArgs::init`].
///
/// The binary's command must set `disable_help_flag = true`: `-h` and `--help` are defined
/// here, both printing the long help (clap's own `-h` prints a summary without the settings).
#[derive(Debug, Clone, Default, PartialEq, Eq, clap::Args)]
pub struct LogArgs {
    /// Print help (-h, -help and --help print the same).
    #[arg(short = 'h', long = "help", action = ArgAction::HelpLong)]
    pub help: Option<bool>,

    /// Write the log to files in DIR instead of stderr (the Go programs' -log_dir=DIR): one
    /// file a day, PROGRAM.YYYY-MM-DD.log, the last 7 kept; errors also go to stderr.
    #[arg(long = "log-dir", alias = "log_dir", value_name = "DIR")]
    pub log_dir: Option<PathBuf>,

    /// glog verbosity (-v N, -v=N): 0 to 2 log at info (2 is what the Go switcher's supervisor
    /// entries set), 3 and 4 at debug, 5 and more at trace. RUST_LOG refines it.
    #[arg(short = 'v', long = "v", value_name = "N")]
    pub v: Option<u8>,

    /// Log to stderr only, even with --log-dir (glog's -logtostderr).
    #[arg(long, action = ArgAction::Set, num_args = 0..=1, require_equals = true,
          default_value_t = false, default_missing_value = "true", value_name = "BOOL")]
    pub logtostderr: bool,

    /// With --log-dir, write every line to stderr as well as to the files
    /// (glog's -alsologtostderr).
    #[arg(long, action = ArgAction::Set, num_args = 0..=1, require_equals = true,
          default_value_t = false, default_missing_value = "true", value_name = "BOOL")]
    pub alsologtostderr: bool,
}

/// The format of log lines (each binary's `LogFormat` setting).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// Where the log goes, as [`LogArgs`] select it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Destination {
    /// Every line to stderr.
    Stderr,
    /// Every line to daily files in `dir`; errors (or, with `also_stderr`, every line) to
    /// stderr too.
    Dir {
        /// The directory.
        dir: PathBuf,
        /// Every line to stderr too (`-alsologtostderr`).
        also_stderr: bool,
    },
}

impl fmt::Display for Destination {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Stderr => f.write_str("stderr"),
            Self::Dir {
                dir,
                also_stderr: true,
            } => write!(f, "files in {} and stderr", dir.display()),
            Self::Dir {
                dir,
                also_stderr: false,
            } => write!(f, "files in {} (errors on stderr too)", dir.display()),
        }
    }
}

/// Why logging could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// The log directory cannot be created or written.
    #[error("cannot write log files in {dir}: {source}")]
    LogDir {
        /// The directory.
        dir: PathBuf,
        /// Why.
        #[source]
        source: InitError,
    },
    /// A global subscriber was installed already.
    #[error("logging was set up already: {0}")]
    AlreadySet(#[from] TryInitError),
}

/// The tracing level of glog verbosity `v`. glog's `-v` only adds verbose lines on top of
/// INFO, WARNING and ERROR, which it always logs, so no value logs less than info. The Go
/// switcher's documented supervisor entries (stratumSwitcher and initUserCoin alike) run with
/// `-v 2`: that is their production setting, so it must stay Switchyard's production level,
/// info, rather than turn on per-line debug output. 3 and 4 (the Go programs' detailed
/// tracing of connections and messages) are debug; 5 and more, everything (trace).
pub fn level_for_verbosity(v: u8) -> LevelFilter {
    match v {
        0..=2 => LevelFilter::INFO,
        3 | 4 => LevelFilter::DEBUG,
        _ => LevelFilter::TRACE,
    }
}

/// The subscriber below the output layers.
type Filtered = Layered<EnvFilter, Registry>;
/// One output.
type Output = Box<dyn Layer<Filtered> + Send + Sync>;

impl LogArgs {
    /// Where these flags send the log. `-logtostderr` wins over `-log_dir`, as in glog.
    pub fn destination(&self) -> Destination {
        match &self.log_dir {
            Some(dir) if !self.logtostderr => Destination::Dir {
                dir: dir.clone(),
                also_stderr: self.alsologtostderr,
            },
            _ => Destination::Stderr,
        }
    }

    /// The default level: from `-v`, info without it.
    pub fn level(&self) -> LevelFilter {
        self.v.map_or(LevelFilter::INFO, level_for_verbosity)
    }

    /// The filter: the `-v` level, then `RUST_LOG`'s directives (`rust_log`). A directive for
    /// a target refines the level (`switchyard_proxy=debug`); a bare level in `RUST_LOG`
    /// replaces it.
    pub fn filter(&self, rust_log: Option<&str>) -> EnvFilter {
        let rust_log = rust_log.unwrap_or("");
        let has_bare_level = rust_log
            .split(',')
            .map(str::trim)
            .any(|d| !d.is_empty() && !d.contains('=') && d.parse::<LevelFilter>().is_ok());
        let directives = if has_bare_level {
            rust_log.to_owned()
        } else {
            format!("{},{rust_log}", self.level())
        };
        EnvFilter::builder().parse_lossy(directives)
    }

    /// The subscriber these flags select for `program` (the file name prefix) in `format`,
    /// reading `RUST_LOG` from `rust_log`; not installed.
    pub fn subscriber(
        &self,
        program: &str,
        format: LogFormat,
        rust_log: Option<&str>,
    ) -> Result<impl Subscriber + Send + Sync + 'static, CliError> {
        let stderr_ansi = std::io::stderr().is_terminal();
        let outputs: Vec<Output> = match self.destination() {
            Destination::Stderr => vec![output(format, std::io::stderr, stderr_ansi)],
            Destination::Dir { dir, also_stderr } => {
                let files = log_files(&dir, program)?;
                let stderr = output(format, std::io::stderr, stderr_ansi);
                let stderr = if also_stderr {
                    stderr
                } else {
                    // glog's -stderrthreshold=ERROR: errors reach stderr (a supervisor's
                    // stdout.log) as well as the files.
                    Box::new(stderr.with_filter(LevelFilter::ERROR))
                };
                vec![output(format, files, false), stderr]
            }
        };
        Ok(Registry::default()
            .with(self.filter(rust_log))
            .with(outputs))
    }

    /// Installs the logging these flags select for `program` in `format` (`RUST_LOG` read from
    /// the environment), and logs where it goes. Returns that.
    pub fn init(&self, program: &str, format: LogFormat) -> Result<Destination, CliError> {
        let rust_log = std::env::var("RUST_LOG").ok();
        self.subscriber(program, format, rust_log.as_deref())?
            .try_init()?;
        let destination = self.destination();
        tracing::info!(to = %destination, level = %self.level(), "logging");
        Ok(destination)
    }
}

/// Daily files `PROGRAM.YYYY-MM-DD.log` in `dir` (created when missing), the last
/// [`KEPT_LOG_FILES`] kept. Written synchronously, like stderr: nothing is buffered that an
/// exit or a hot upgrade's exec could lose.
fn log_files(dir: &Path, program: &str) -> Result<RollingFileAppender, CliError> {
    RollingFileAppender::builder()
        .rotation(Rotation::DAILY)
        .filename_prefix(program)
        .filename_suffix("log")
        .max_log_files(KEPT_LOG_FILES)
        .build(dir)
        .map_err(|source| CliError::LogDir {
            dir: dir.to_owned(),
            source,
        })
}

/// A formatting layer writing to `writer`.
fn output<W>(format: LogFormat, writer: W, ansi: bool) -> Output
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    let layer = tracing_subscriber::fmt::layer()
        .with_writer(writer)
        .with_ansi(ansi);
    match format {
        LogFormat::Text => Box::new(layer),
        LogFormat::Json => Box::new(layer.json()),
    }
}

/// A control endpoint that is neither `host:port` nor an `http://` or `https://` URL.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{endpoint:?}: write host:port, http://host:port or https://host:port")]
pub struct BadEndpoint {
    /// The entry as written.
    pub endpoint: String,
}

/// A `ControlEndpoints` entry (proxy, `switchyard-init`) as a URL: `http://` or `https://` as
/// written, `host:port` as `http://host:port` (the way addresses are written everywhere else in
/// the Go configs).
pub fn control_endpoint_url(endpoint: &str) -> Result<String, BadEndpoint> {
    if endpoint.starts_with("http://") || endpoint.starts_with("https://") {
        return Ok(endpoint.to_owned());
    }
    let has_port = endpoint
        .rsplit_once(':')
        .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
    if endpoint.contains("://") || !has_port {
        return Err(BadEndpoint {
            endpoint: endpoint.to_owned(),
        });
    }
    Ok(format!("http://{endpoint}"))
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[test]
    fn control_endpoints_take_a_bare_host_and_port() {
        assert_eq!(
            control_endpoint_url("10.0.0.5:50051").as_deref(),
            Ok("http://10.0.0.5:50051")
        );
        for kept in ["http://control:50051", "https://control:50051"] {
            assert_eq!(control_endpoint_url(kept).as_deref(), Ok(kept));
        }
        for bad in ["10.0.0.5", ":50051", "grpc://control:50051", "control:port"] {
            let err = control_endpoint_url(bad).expect_err(bad);
            assert!(err.to_string().contains(bad), "{err}");
        }
    }

    #[derive(Debug, Parser)]
    #[command(
        name = "prog",
        after_long_help = "LONG HELP ONLY",
        disable_help_flag = true
    )]
    struct Args {
        /// The config.
        #[arg(short, long)]
        config: Option<PathBuf>,
        #[command(flatten)]
        log: LogArgs,
    }

    fn parse(args: &[&str]) -> Args {
        let mut all = vec!["prog"];
        all.extend_from_slice(args);
        Args::try_parse_from(go_style_args(all)).expect("parses")
    }

    #[test]
    fn the_go_supervisor_entry_parses() {
        let args = parse(&["-config=/etc/c.json", "-log_dir=/var/log/x", "-v", "2"]);
        assert_eq!(args.config, Some(PathBuf::from("/etc/c.json")));
        assert_eq!(args.log.log_dir, Some(PathBuf::from("/var/log/x")));
        assert_eq!(args.log.v, Some(2));
        assert_eq!(
            args.log.destination(),
            Destination::Dir {
                dir: "/var/log/x".into(),
                also_stderr: false
            }
        );
    }

    #[test]
    fn every_go_and_clap_form_parses() {
        for form in [
            &["-config", "c.json"][..],
            &["-config=c.json"],
            &["--config=c.json"],
            &["--config", "c.json"],
            &["-c", "c.json"],
        ] {
            assert_eq!(parse(form).config, Some("c.json".into()), "{form:?}");
        }
        for form in [
            &["-v", "3"][..],
            &["-v=3"],
            &["--v=3"],
            &["--v", "3"],
            &["-v3"],
        ] {
            assert_eq!(parse(form).log.v, Some(3), "{form:?}");
        }
        for form in [
            &["-log_dir", "d"][..],
            &["--log_dir=d"],
            &["--log-dir", "d"],
        ] {
            assert_eq!(parse(form).log.log_dir, Some("d".into()), "{form:?}");
        }
        assert!(parse(&["-logtostderr"]).log.logtostderr);
        assert!(parse(&["-logtostderr=true"]).log.logtostderr);
        assert!(!parse(&["-logtostderr=false"]).log.logtostderr);
        assert!(!parse(&[]).log.logtostderr);
        assert!(parse(&["-alsologtostderr"]).log.alsologtostderr);
    }

    #[test]
    fn only_go_flags_are_rewritten() {
        let args = go_style_args([
            "prog",
            "-check-config",
            "-x",
            "-vmodule=a=1",
            "--",
            "-config=x",
        ]);
        let expected: Vec<OsString> = ["prog", "-check-config", "-x", "-vmodule=a=1", "--"]
            .into_iter()
            .chain(["-config=x"])
            .map(OsString::from)
            .collect();
        assert_eq!(args, expected);
        assert_eq!(
            go_style_args(["prog", "-h", "-help"]),
            ["prog", "--help", "--help"].map(OsString::from)
        );
    }

    #[test]
    fn dash_h_prints_the_long_help() {
        let help = |flag: &str| {
            let err = Args::try_parse_from(go_style_args(["prog", flag])).expect_err("help");
            err.render().to_string()
        };
        let long = help("--help");
        assert!(long.contains("LONG HELP ONLY"), "{long}");
        assert_eq!(help("-h"), long);
        assert_eq!(help("-help"), long);
        // Without the rewriting too.
        let err = Args::try_parse_from(["prog", "-h"]).expect_err("help");
        assert_eq!(err.render().to_string(), long);
    }

    #[test]
    fn logtostderr_wins_over_log_dir() {
        let args = parse(&["-log_dir=d", "-logtostderr"]);
        assert_eq!(args.log.destination(), Destination::Stderr);
        let args = parse(&["-log_dir=d", "-alsologtostderr"]);
        assert_eq!(
            args.log.destination(),
            Destination::Dir {
                dir: "d".into(),
                also_stderr: true
            }
        );
    }

    #[test]
    fn verbosity_maps_to_levels() {
        assert_eq!(parse(&[]).log.level(), LevelFilter::INFO);
        assert_eq!(level_for_verbosity(0), LevelFilter::INFO);
        assert_eq!(level_for_verbosity(2), LevelFilter::INFO);
        assert_eq!(level_for_verbosity(3), LevelFilter::DEBUG);
        assert_eq!(level_for_verbosity(4), LevelFilter::DEBUG);
        assert_eq!(level_for_verbosity(5), LevelFilter::TRACE);
        assert_eq!(level_for_verbosity(9), LevelFilter::TRACE);
    }

    #[test]
    fn rust_log_refines_or_replaces_the_verbosity() {
        let args = parse(&["-v", "3"]);
        assert_eq!(
            args.log.filter(None).max_level_hint(),
            Some(LevelFilter::DEBUG)
        );
        let refined = args.log.filter(Some("my_crate=trace"));
        assert_eq!(refined.max_level_hint(), Some(LevelFilter::TRACE));
        assert!(refined.to_string().contains("debug"), "{refined}");
        let replaced = args.log.filter(Some("warn"));
        assert_eq!(replaced.max_level_hint(), Some(LevelFilter::WARN));
    }

    #[test]
    fn log_dir_gets_daily_files_in_the_format_asked() {
        let tmp = tempfile::tempdir().expect("tempdir");
        // Not there yet: the files' directory is created.
        let dir = tmp.path().join("log");
        let args = parse(&["-log_dir", dir.to_str().expect("utf-8 temp dir")]);
        for (program, format) in [
            ("text-prog", LogFormat::Text),
            ("json-prog", LogFormat::Json),
        ] {
            let subscriber = args
                .log
                .subscriber(program, format, None)
                .expect("the subscriber");
            tracing::subscriber::with_default(subscriber, || {
                tracing::info!(answer = 42, "hello file");
                tracing::debug!("not at -v 0");
            });
            let files: Vec<PathBuf> = std::fs::read_dir(&dir)
                .expect("the log dir exists")
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| {
                    p.file_name().and_then(|n| n.to_str()).is_some_and(|n| {
                        n.starts_with(&format!("{program}.")) && n.ends_with(".log")
                    })
                })
                .collect();
            assert_eq!(files.len(), 1, "{files:?}");
            let text = std::fs::read_to_string(&files[0]).expect("the log file");
            assert!(text.contains("hello file"), "{text}");
            assert!(!text.contains("not at -v 0"), "{text}");
            assert!(!text.contains('\u{1b}'), "no ANSI in files: {text:?}");
            match format {
                LogFormat::Json => {
                    assert!(text.trim_start().starts_with('{'), "{text}");
                    assert!(text.contains("\"answer\":42"), "{text}");
                }
                LogFormat::Text => assert!(text.contains("answer=42"), "{text}"),
            }
        }
    }
}
