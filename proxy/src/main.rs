//! `switchyard-proxy`: the Stratum proxy binary. Reads the config file (the Go stratumSwitcher's
//! keys plus the control endpoints), sets up logging, serves miners, and shuts down cleanly on
//! SIGINT or SIGTERM.

#![forbid(unsafe_code)]

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use switchyard_proxy::{
    config::{LogFormat, ProxyConfig, SETTINGS_HELP},
    server::Proxy,
    upgrade::{self, Invocation},
};
use tracing::{error, info, warn};
use tracing_subscriber::EnvFilter;

/// The Switchyard Stratum proxy: holds miners' connections and moves each to its user's coin's
/// sserver without dropping it.
#[derive(Debug, Parser)]
#[command(name = "switchyard-proxy", version, after_long_help = SETTINGS_HELP)]
struct Args {
    /// The JSON config file (the Go stratumSwitcher's file is accepted as it is, plus
    /// ControlEndpoints). `-config=FILE`, as the Go binary took it, works too.
    #[arg(short, long, env = "SWITCHYARD_PROXY_CONFIG")]
    config: PathBuf,

    /// Overrides ControlEndpoints, comma-separated, e.g. http://10.0.0.5:50051.
    #[arg(long, value_name = "URLS", value_delimiter = ',')]
    control: Option<Vec<String>>,

    /// Overrides ListenAddr.
    #[arg(long, value_name = "ADDR")]
    listen: Option<String>,

    /// Overrides ProxyToken (prefer the environment variable to keep it out of `ps`).
    #[arg(long, env = "SWITCHYARD_PROXY_TOKEN", hide_env_values = true)]
    proxy_token: Option<String>,

    /// Check the configuration and exit.
    #[arg(long)]
    check_config: bool,
}

/// The Go binary's `-config=FILE` / `-config FILE` become `--config`.
fn go_style_args() -> Vec<String> {
    std::env::args()
        .map(|arg| {
            if let Some(rest) = arg.strip_prefix("-config") {
                format!("--config{rest}")
            } else {
                arg
            }
        })
        .collect()
}

fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// Serves until SIGINT or SIGTERM; on SIGUSR2, upgrades in place (SPEC §9): when that
/// fails, logs why and serves on.
async fn serve_until_signal(
    proxy: &mut Proxy,
    invocation: Option<Invocation>,
) -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut usr2 = signal(SignalKind::user_defined2()).context("installing the SIGUSR2 handler")?;
    loop {
        tokio::select! {
            r = tokio::signal::ctrl_c() => return r.context("waiting for SIGINT"),
            _ = term.recv() => return Ok(()),
            _ = usr2.recv() => {
                let Some(invocation) = &invocation else {
                    error!("SIGUSR2: cannot upgrade, the binary's own path could not be read at start");
                    continue;
                };
                info!(exe = %invocation.exe.display(), "SIGUSR2: hot upgrade");
                if let Err(e) = proxy.upgrade(invocation).await {
                    error!(error = %e, "hot upgrade not done: this process keeps serving");
                }
            }
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse_from(go_style_args());
    let (mut config, unknown) = ProxyConfig::from_file(&args.config)?;
    if let Some(control) = &args.control {
        config.control_endpoints = control.clone();
    }
    if let Some(listen) = &args.listen {
        config.listen_addr = Some(listen.clone());
    }
    if let Some(token) = &args.proxy_token {
        config.proxy_token = Some(token.clone());
    }
    let settings = config.settings()?;
    if args.check_config || std::env::var_os(upgrade::CHECK_ENV).is_some_and(|v| v == "1") {
        println!("configuration is valid");
        return Ok(());
    }
    // Read before anything can replace the binary: the path an upgrade runs again.
    let invocation = Invocation::current();
    init_logging(settings.log_format);
    let handed =
        upgrade::take_handed_over().context("reading what the previous binary handed over")?;
    for key in unknown {
        warn!(key, "unknown config key ignored");
    }
    for key in config.ignored_keys() {
        info!(
            key,
            "ignored: the proxy never talks to ZooKeeper; set this on the control plane"
        );
    }
    if let Some(handed) = &handed {
        info!(
            sessions = handed.sessions,
            paused_ms = upgrade::wall_ms().saturating_sub(handed.handed.frozen_at_ms),
            "hot upgrade: the new binary takes over"
        );
    }
    let mut proxy = Proxy::start_with(settings, handed).await?;
    if let Err(e) = &invocation {
        warn!(error = %e, "the binary's own path cannot be read: SIGUSR2 upgrades are off");
    }
    serve_until_signal(&mut proxy, invocation.ok()).await?;
    info!("signal received");
    proxy.shutdown().await;
    info!("stopped");
    Ok(())
}
