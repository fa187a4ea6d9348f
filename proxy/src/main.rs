//! `switchyard-proxy`: the Stratum proxy binary. Reads the config file (the Go stratumSwitcher's
//! keys plus the control endpoints), sets up logging, serves miners, and shuts down cleanly on
//! SIGINT or SIGTERM.

#![forbid(unsafe_code)]

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use switchyard_cli::{LogArgs, Secret, go_style_args, resolve_secret};
use switchyard_proxy::{
    config::{LogFormat, ProxyConfig, SETTINGS_HELP},
    server::Proxy,
    upgrade::{self, Invocation},
};
use tracing::{error, info, warn};

/// The Switchyard Stratum proxy: holds miners' connections and moves each to its user's coin's
/// sserver without dropping it.
#[derive(Debug, Parser)]
#[command(name = "switchyard-proxy", version, after_long_help = SETTINGS_HELP,
          disable_help_flag = true)]
struct Args {
    /// The JSON config file (the Go stratumSwitcher's file is accepted as it is, plus
    /// ControlEndpoints). `-config=FILE` and `-config FILE`, as the Go binary took it, work too.
    #[arg(short, long, env = "SWITCHYARD_PROXY_CONFIG")]
    config: PathBuf,

    /// Overrides ControlEndpoints, comma-separated, e.g. http://10.0.0.5:50051.
    #[arg(long, value_name = "URLS", value_delimiter = ',')]
    control: Option<Vec<String>>,

    /// Overrides ListenAddr.
    #[arg(long, value_name = "ADDR")]
    listen: Option<String>,

    /// Overrides ProxyToken and ProxyTokenFile (prefer the environment variable, or a file,
    /// to keep it out of `ps`).
    #[arg(long, env = "SWITCHYARD_PROXY_TOKEN", hide_env_values = true)]
    proxy_token: Option<Secret>,

    /// A file holding the proxy token (overrides ProxyToken and ProxyTokenFile).
    #[arg(long, env = "SWITCHYARD_PROXY_TOKEN_FILE", value_name = "FILE")]
    proxy_token_file: Option<PathBuf>,

    /// Check the configuration and exit.
    #[arg(long)]
    check_config: bool,

    #[command(flatten)]
    log: LogArgs,
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
    let args = Args::parse_from(go_style_args(std::env::args_os()));
    let (mut config, unknown) = ProxyConfig::from_file(&args.config)?;
    if let Some(control) = &args.control {
        config.control_endpoints = control.clone();
    }
    if let Some(listen) = &args.listen {
        config.listen_addr = Some(listen.clone());
    }
    // The command line and environment over the config file; in each, a value or a file.
    if let Some(token) = resolve_secret(
        args.proxy_token.clone(),
        args.proxy_token_file.as_deref(),
        "--proxy-token (SWITCHYARD_PROXY_TOKEN)",
        "--proxy-token-file (SWITCHYARD_PROXY_TOKEN_FILE)",
    )? {
        config.proxy_token = Some(token);
        config.proxy_token_file = None;
    }
    let settings = config.settings()?;
    if args.check_config || std::env::var_os(upgrade::CHECK_ENV).is_some_and(|v| v == "1") {
        println!("configuration is valid");
        return Ok(());
    }
    // Read before anything can replace the binary: the path an upgrade runs again.
    let invocation = Invocation::current();
    let format = match settings.log_format {
        LogFormat::Text => switchyard_cli::LogFormat::Text,
        LogFormat::Json => switchyard_cli::LogFormat::Json,
    };
    args.log.init("switchyard-proxy", format)?;
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
