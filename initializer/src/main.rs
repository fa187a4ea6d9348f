//! `switchyard-init`: user-list ingestion run apart from the control service. It pulls each
//! coin's user list and sends the users to the control service over gRPC
//! (`SwitcherAdmin.IngestUserList`), and serves the user-list API for sservers when enabled.

use std::{path::PathBuf, sync::Arc};

use anyhow::Context;
use clap::Parser;
use switchyard_cli::{LogArgs, LogFormat, Secret, go_style_args, resolve_secret};
use switchyard_initializer::{
    api,
    config::{InitConfig, SETTINGS_HELP},
    listed::ListedUsers,
    puller::UserListPuller,
    sink::{GrpcSink, ListedUserSink},
};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// Switchyard's user-list ingestion, run apart from the control service.
#[derive(Debug, Parser)]
#[command(name = "switchyard-init", version, after_long_help = SETTINGS_HELP,
          disable_help_flag = true)]
struct Args {
    /// The JSON config file (the Go initUserCoin's keys plus ControlEndpoints). `-config=FILE`
    /// and `-config FILE`, as the Go initUserCoin took it, work too.
    #[arg(short, long, env = "SWITCHYARD_INIT_CONFIG")]
    config: PathBuf,

    /// Overrides AdminToken and AdminTokenFile (prefer the environment variable, or a file,
    /// to keep it out of `ps`).
    #[arg(long, env = "SWITCHYARD_ADMIN_TOKEN", hide_env_values = true)]
    admin_token: Option<Secret>,

    /// A file holding the admin token (overrides AdminToken and AdminTokenFile).
    #[arg(long, env = "SWITCHYARD_ADMIN_TOKEN_FILE", value_name = "FILE")]
    admin_token_file: Option<PathBuf>,

    /// Check the configuration and exit.
    #[arg(long)]
    check_config: bool,

    #[command(flatten)]
    log: LogArgs,
}

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
    let (mut config, ignored) = InitConfig::from_file(&args.config)?;
    // The command line and environment over the config file; in each, a value or a file.
    if let Some(token) = resolve_secret(
        args.admin_token.clone(),
        args.admin_token_file.as_deref(),
        "--admin-token (SWITCHYARD_ADMIN_TOKEN)",
        "--admin-token-file (SWITCHYARD_ADMIN_TOKEN_FILE)",
    )? {
        config.admin_token = Some(token);
        config.admin_token_file = None;
    }
    config.load_secret_files()?;
    config.validate()?;
    if args.check_config {
        println!("configuration is valid");
        return Ok(());
    }
    let format = if config.log_format == "json" {
        LogFormat::Json
    } else {
        LogFormat::Text
    };
    args.log.init("switchyard-init", format)?;
    for key in ignored {
        warn!(
            key,
            "config key ignored by switchyard-init (the control service owns it)"
        );
    }

    let shutdown = CancellationToken::new();
    let token = config
        .admin_token
        .as_ref()
        .map(Secret::expose)
        .filter(|t| !t.is_empty());
    let sink: Arc<dyn ListedUserSink> = Arc::new(GrpcSink::with_tls(
        &config.control_endpoints,
        token,
        config.control_tls()?.as_ref(),
    )?);
    let listed = Arc::new(ListedUsers::new());
    let mut tasks = Vec::new();
    for settings in config.pullers()? {
        info!(coin = %settings.coin, url = %settings.url, "pulling user list");
        let puller = UserListPuller::new(settings, Arc::clone(&sink), Arc::clone(&listed))?;
        tasks.push(tokio::spawn(puller.run(shutdown.clone())));
    }
    if let Some(addr) = config.api_addr()? {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding ListenAddr {addr}"))?;
        info!(%addr, "user-list API listening");
        let router = api::router(Arc::clone(&listed));
        let shutdown = shutdown.clone();
        tasks.push(tokio::spawn(async move {
            // Default limits (header and body read timeouts, connections): see http_server.
            let served = switchyard_initializer::http_server::serve(
                listener,
                router,
                switchyard_initializer::http_server::HttpLimits::default(),
                shutdown,
            )
            .await;
            if let Err(e) = served {
                warn!(error = %e, "the user-list API failed");
            }
        }));
    }
    shutdown_signal().await?;
    info!("signal received; stopping");
    shutdown.cancel();
    for task in tasks {
        let _ = task.await;
    }
    Ok(())
}
