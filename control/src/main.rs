//! `switchyard-control`: the control-plane binary. Reads the config file (the Go switcher's
//! keys plus Switchyard's own), sets up logging, serves gRPC, and shuts down cleanly on SIGINT
//! or SIGTERM.

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use switchyard_cli::{LogArgs, Secret, go_style_args, resolve_secret};
use switchyard_control::{
    ControlPlane,
    config::{ControlConfig, LogFormat, SETTINGS_HELP},
};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// The Switchyard control plane: owns the user→coin state, serves the switch APIs over gRPC,
/// and streams every change to the Stratum proxies.
#[derive(Debug, Parser)]
#[command(name = "switchyard-control", version, after_long_help = SETTINGS_HELP,
          disable_help_flag = true)]
struct Args {
    /// The JSON config file (the Go switcher API server's and initUserCoin's keys are accepted
    /// as they are). Without it, every setting takes its default and the flags below.
    /// `-config=FILE` and `-config FILE`, as the Go programs took it, work too.
    #[arg(short, long, env = "SWITCHYARD_CONFIG")]
    config: Option<PathBuf>,

    /// Overrides GrpcListenAddr: the gRPC address, e.g. 10.0.0.5:50051 (default
    /// 127.0.0.1:50051; any other than a loopback address needs AdminToken and ProxyToken).
    #[arg(long, value_name = "ADDR")]
    grpc_listen: Option<String>,

    /// Overrides DataDir: the embedded store's directory.
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,

    /// Overrides AvailableCoins, comma-separated, e.g. btc,bch.
    #[arg(long, value_name = "COINS", value_delimiter = ',')]
    available_coins: Option<Vec<String>>,

    /// Overrides AdminToken and AdminTokenFile (prefer the environment variable, or a file,
    /// to keep it out of `ps`).
    #[arg(long, env = "SWITCHYARD_ADMIN_TOKEN", hide_env_values = true)]
    admin_token: Option<Secret>,

    /// A file holding the admin token (overrides AdminToken and AdminTokenFile).
    #[arg(long, env = "SWITCHYARD_ADMIN_TOKEN_FILE", value_name = "FILE")]
    admin_token_file: Option<PathBuf>,

    /// Overrides ProxyToken and ProxyTokenFile (prefer the environment variable, or a file).
    #[arg(long, env = "SWITCHYARD_PROXY_TOKEN", hide_env_values = true)]
    proxy_token: Option<Secret>,

    /// A file holding the proxy token (overrides ProxyToken and ProxyTokenFile).
    #[arg(long, env = "SWITCHYARD_PROXY_TOKEN_FILE", value_name = "FILE")]
    proxy_token_file: Option<PathBuf>,

    /// Overrides APIPassword and APIPasswordFile (prefer the environment variable, or a file).
    #[arg(long, env = "SWITCHYARD_API_PASSWORD", hide_env_values = true)]
    api_password: Option<Secret>,

    /// A file holding the switch API's password (overrides APIPassword and APIPasswordFile).
    #[arg(long, env = "SWITCHYARD_API_PASSWORD_FILE", value_name = "FILE")]
    api_password_file: Option<PathBuf>,

    /// Overrides LogFormat: text or json.
    #[arg(long, value_name = "FORMAT")]
    log_format: Option<String>,

    /// Check the configuration and exit.
    #[arg(long)]
    check_config: bool,

    #[command(flatten)]
    log: LogArgs,
}

fn load_config(args: &Args) -> anyhow::Result<(ControlConfig, Vec<String>)> {
    let (mut config, unknown) = match &args.config {
        Some(path) => ControlConfig::from_file(path)?,
        None => (ControlConfig::default(), Vec::new()),
    };
    if let Some(addr) = &args.grpc_listen {
        config.grpc_listen_addr = addr.clone();
    }
    if let Some(dir) = &args.data_dir {
        config.data_dir = dir.clone();
    }
    if let Some(coins) = &args.available_coins {
        config.available_coins = coins.clone();
    }
    // Secrets: the command line and environment over the config file; in each, a value or
    // a file, not both.
    if let Some(token) = resolve_secret(
        args.admin_token.clone(),
        args.admin_token_file.as_deref(),
        "--admin-token (SWITCHYARD_ADMIN_TOKEN)",
        "--admin-token-file (SWITCHYARD_ADMIN_TOKEN_FILE)",
    )? {
        config.admin_token = Some(token);
        config.admin_token_file = None;
    }
    if let Some(token) = resolve_secret(
        args.proxy_token.clone(),
        args.proxy_token_file.as_deref(),
        "--proxy-token (SWITCHYARD_PROXY_TOKEN)",
        "--proxy-token-file (SWITCHYARD_PROXY_TOKEN_FILE)",
    )? {
        config.proxy_token = Some(token);
        config.proxy_token_file = None;
    }
    if let Some(password) = resolve_secret(
        args.api_password.clone(),
        args.api_password_file.as_deref(),
        "--api-password (SWITCHYARD_API_PASSWORD)",
        "--api-password-file (SWITCHYARD_API_PASSWORD_FILE)",
    )? {
        config.api_password = password;
        config.api_password_file = None;
    }
    config.load_secret_files()?;
    if let Some(format) = &args.log_format {
        config.log_format = format.clone();
    }
    config.validate()?;
    Ok((config, unknown))
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
    let args = Args::parse_from(go_style_args(std::env::args_os()));
    let (config, unknown) = load_config(&args)?;
    if args.check_config {
        println!("configuration is valid");
        return Ok(());
    }
    let format = match config.log_format()? {
        LogFormat::Text => switchyard_cli::LogFormat::Text,
        LogFormat::Json => switchyard_cli::LogFormat::Json,
    };
    args.log.init("switchyard-control", format)?;
    for key in unknown {
        warn!(key, "unknown config key ignored");
    }
    if let Some(warning) = config.listener_security()? {
        warn!("{warning}");
    }
    let addr = config.grpc_addr()?;
    let shutdown = CancellationToken::new();
    let plane = ControlPlane::open(&config, shutdown.clone()).await?;
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the gRPC address {addr}"))?;

    let mut server = tokio::spawn(plane.serve(listener, shutdown.clone()));
    let signalled = tokio::select! {
        signal = shutdown_signal() => { signal?; true }
        result = &mut server => { result.context("the gRPC server task failed")??; false }
    };
    if !signalled {
        anyhow::bail!("the gRPC server stopped on its own");
    }
    info!("signal received");
    shutdown.cancel();
    server.await.context("the gRPC server task failed")??;
    info!("stopped");
    Ok(())
}
