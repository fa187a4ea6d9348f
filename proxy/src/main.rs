//! `switchyard-proxy`: the Stratum proxy binary. Reads the config file (the Go stratumSwitcher's
//! keys plus the control endpoints), sets up logging, serves miners, and shuts down cleanly on
//! SIGINT or SIGTERM.

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use switchyard_proxy::{
    config::{LogFormat, ProxyConfig, SETTINGS_HELP},
    server::Proxy,
};
use tracing::{info, warn};
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

/// Resolves when SIGINT or SIGTERM arrives.
async fn shutdown_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r.context("waiting for SIGINT")?,
        _ = term.recv() => {}
    }
    Ok(())
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
    if args.check_config {
        println!("configuration is valid");
        return Ok(());
    }
    init_logging(settings.log_format);
    for key in unknown {
        warn!(key, "unknown config key ignored");
    }
    for key in config.ignored_keys() {
        info!(
            key,
            "ignored: the proxy never talks to ZooKeeper; set this on the control plane"
        );
    }
    let proxy = Proxy::start(settings).await?;
    shutdown_signal().await?;
    info!("signal received");
    proxy.shutdown().await;
    info!("stopped");
    Ok(())
}
