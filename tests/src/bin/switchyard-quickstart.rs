//! `switchyard-quickstart`: a complete single Switchyard node in one process, with no outside
//! services. It runs the control plane on the embedded store (gRPC and the HTTP switch API),
//! two simulated sservers (btc and bch: the same simulation the end-to-end tests and the
//! benchmarks use, at a difficulty low enough for a CPU miner to find shares), and one Stratum
//! proxy in front of them; seeds the demo user `alice` on btc unless the data directory already
//! has it; prints how to point a miner at the proxy and how to switch the user, from the user's
//! coin as the store holds it; and stops everything cleanly on Ctrl-C or SIGTERM.
//!
//! ```sh
//! cargo run --release -p switchyard-tests --bin switchyard-quickstart
//! ```

use std::{io::IsTerminal, net::SocketAddr, path::PathBuf, time::Duration};

use anyhow::{Context, bail};
use clap::Parser;
use serde_json::json;
use switchyard_control::{ControlPlane, config::ControlConfig, core::SwitchSource};
use switchyard_proxy::{config::ProxyConfig, server::Proxy};
use switchyard_tests::{
    control::wait_serving,
    sserver::{Sserver, SserverConfig},
};
use tokio::{
    net::TcpListener,
    signal::unix::{Signal, SignalKind, signal},
};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use tracing_subscriber::EnvFilter;

/// The coins of the quick start, one simulated sserver each; the first is the demo user's.
const COINS: [&str; 2] = ["btc", "bch"];

/// Credentials of the HTTP switch API.
const API_USER: &str = "admin";
const API_PASSWORD: &str = "admin";

/// A complete single Switchyard node with no outside services: the control plane on the
/// embedded store, one Stratum proxy, and simulated sservers for btc and bch.
#[derive(Debug, Parser)]
#[command(name = "switchyard-quickstart", version)]
struct Args {
    /// The embedded store's directory (kept between runs).
    #[arg(
        long,
        value_name = "DIR",
        default_value = "./switchyard-quickstart-data"
    )]
    data_dir: PathBuf,

    /// The control plane's gRPC address (SwitcherAdmin, ProxyControl, health, reflection).
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:50051")]
    grpc: SocketAddr,

    /// The HTTP switch API's address (basic auth admin/admin).
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:8080")]
    http: SocketAddr,

    /// Where miners connect to the proxy.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:1800")]
    listen: SocketAddr,

    /// The proxy's Prometheus metrics address (GET /metrics).
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:9100")]
    metrics: SocketAddr,

    /// How often each simulated sserver makes a new job, in seconds.
    #[arg(long, value_name = "SECONDS", default_value_t = 5,
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    job_interval: u64,

    /// The demo user seeded on btc (unless the store already has it). Names are
    /// case-sensitive: Alice is another user.
    #[arg(long, value_name = "NAME", default_value = "alice")]
    user: String,

    /// The share difficulty the simulated sservers set (mining.set_difficulty, before the first
    /// job). A share takes about DIFFICULTY × 2^32 hashes on average: at the default 0.01,
    /// about 43 million, a few seconds for one CPU core running cpuminer. The sservers accept
    /// every share.
    #[arg(long, value_name = "DIFFICULTY", default_value_t = DEFAULT_DIFFICULTY,
          value_parser = difficulty)]
    difficulty: f64,
}

/// The simulated sservers' default share difficulty: low enough for a CPU miner.
const DEFAULT_DIFFICULTY: f64 = 0.01;

/// A `--difficulty`: a positive finite number.
fn difficulty(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(d) if d.is_finite() && d > 0.0 => Ok(d),
        _ => Err(format!("{text:?} is not a positive number")),
    }
}

/// SIGINT and SIGTERM, registered before anything starts so that neither is missed.
struct Signals {
    interrupt: Signal,
    terminate: Signal,
}

impl Signals {
    fn install() -> anyhow::Result<Self> {
        Ok(Self {
            interrupt: signal(SignalKind::interrupt()).context("installing the SIGINT handler")?,
            terminate: signal(SignalKind::terminate()).context("installing the SIGTERM handler")?,
        })
    }

    /// Resolves when SIGINT or SIGTERM arrives.
    async fn recv(&mut self) {
        tokio::select! {
            _ = self.interrupt.recv() => {}
            _ = self.terminate.recv() => {}
        }
    }
}

/// The running node.
struct Node {
    grpc_addr: SocketAddr,
    /// The demo user's coin in the store when the node started.
    demo_coin: String,
    /// Whether the demo user was seeded by this run (rather than found in the store).
    seeded: bool,
    sservers: Vec<Sserver>,
    control_shutdown: CancellationToken,
    control_task: tokio::task::JoinHandle<Result<(), switchyard_control::ControlError>>,
    proxy: Proxy,
}

impl Node {
    /// Starts every part and seeds the demo user.
    async fn start(args: &Args) -> anyhow::Result<Self> {
        let interval = Duration::from_secs(args.job_interval);
        let mut sservers = Vec::new();
        for coin in COINS {
            let config = SserverConfig::new(coin)
                .job_interval(Some(interval))
                .difficulty(args.difficulty);
            let sserver = Sserver::start(config)
                .await
                .with_context(|| format!("starting the simulated {coin} sserver"))?;
            info!(coin, addr = %sserver.addr(), difficulty = args.difficulty,
                  "simulated sserver listening");
            sservers.push(sserver);
        }

        let config = ControlConfig {
            grpc_listen_addr: args.grpc.to_string(),
            data_dir: args.data_dir.clone(),
            available_coins: COINS.iter().map(|c| (*c).to_owned()).collect(),
            enable_api_server: true,
            listen_addr: args.http.to_string(),
            api_user: API_USER.into(),
            api_password: API_PASSWORD.into(),
            ..ControlConfig::default()
        };
        let control_shutdown = CancellationToken::new();
        let plane = ControlPlane::open(&config, control_shutdown.clone())
            .await
            .context("opening the control plane")?;
        let core = std::sync::Arc::clone(plane.core());
        let (demo_coin, seeded) = match core.index().user_coin(&args.user) {
            Some((coin, _)) => {
                info!(user = %args.user, coin, "demo user already present");
                (coin, false)
            }
            None => {
                // An admin's switch, counted as one from gRPC.
                core.switch_coin(SwitchSource::Grpc, &args.user, COINS[0])
                    .await
                    .with_context(|| format!("seeding the demo user {:?}", args.user))?;
                info!(user = %args.user, coin = COINS[0], "demo user seeded");
                (COINS[0].to_owned(), true)
            }
        };
        let listener = TcpListener::bind(args.grpc)
            .await
            .with_context(|| format!("binding the gRPC address {}", args.grpc))?;
        let grpc_addr = listener.local_addr().context("the gRPC address")?;
        let mut control_task = tokio::spawn(plane.serve(listener, control_shutdown.clone()));
        tokio::select! {
            serving = wait_serving(grpc_addr) => if let Err(e) = serving {
                control_shutdown.cancel();
                bail!("the control plane did not come up: {e}");
            },
            // E.g. the HTTP switch API's address is taken.
            joined = &mut control_task => {
                joined.context("the control task failed")??;
                bail!("the control plane stopped on its own");
            }
        }

        let mut map = serde_json::Map::new();
        for s in &sservers {
            map.insert(
                s.coin().to_owned(),
                json!({"URL": s.addr().to_string(), "UserSuffix": s.config().suffix()}),
            );
        }
        let proxy_json = json!({
            "ServerID": 1,
            "ChainType": "bitcoin",
            "ListenAddr": args.listen.to_string(),
            "MetricsListenAddr": args.metrics.to_string(),
            "StratumServerMap": map,
            "ControlEndpoints": [format!("http://{grpc_addr}")],
            // The proxy's cache kept beside the store, not in the working directory.
            "CacheFile": args.data_dir.join("proxy.cache"),
        });
        let started = async {
            let (proxy_config, _) = ProxyConfig::from_json(&proxy_json.to_string())
                .context("the proxy configuration")?;
            let settings = proxy_config.settings().context("the proxy configuration")?;
            let proxy = Proxy::start(settings).await.context("starting the proxy")?;
            let cache = proxy.context.cache.clone();
            if tokio::time::timeout(Duration::from_secs(30), cache.wait_synced())
                .await
                .is_err()
            {
                proxy.shutdown().await;
                bail!("the proxy did not sync with the control plane within 30 s");
            }
            Ok(proxy)
        }
        .await;
        let proxy = match started {
            Ok(proxy) => proxy,
            Err(e) => {
                control_shutdown.cancel();
                let _ = control_task.await;
                return Err(e);
            }
        };
        Ok(Self {
            grpc_addr,
            demo_coin,
            seeded,
            sservers,
            control_shutdown,
            control_task,
            proxy,
        })
    }

    /// Stops the proxy, then the control plane, then the sservers.
    async fn stop(self) -> anyhow::Result<()> {
        self.proxy.shutdown().await;
        info!("proxy stopped");
        self.control_shutdown.cancel();
        let result = match tokio::time::timeout(Duration::from_secs(30), self.control_task).await {
            Ok(joined) => joined
                .context("the control task failed")?
                .context("the control plane"),
            Err(_) => Err(anyhow::anyhow!(
                "the control plane did not stop within 30 s"
            )),
        };
        for mut sserver in self.sservers {
            sserver.stop().await;
        }
        info!("simulated sservers stopped");
        result
    }
}

/// What to do next, with the addresses actually in use and the demo user's coin as the store
/// holds it (a data directory kept from an earlier run may have it on another coin).
fn instructions(args: &Args, node: &Node) -> String {
    let user = &args.user;
    let listen = node.proxy.listen_addr;
    let grpc = node.grpc_addr;
    let http = args.http;
    let metrics = node
        .proxy
        .metrics_addr
        .map_or_else(|| args.metrics.to_string(), |a| a.to_string());
    let sservers: Vec<String> = node
        .sservers
        .iter()
        .map(|s| format!("{} on {}", s.coin(), s.addr()))
        .collect();
    let coin = &node.demo_coin;
    // Where step 2 switches the user to, and back.
    let other = COINS.iter().find(|c| *c != coin).unwrap_or(&COINS[0]);
    let origin = if node.seeded {
        "seeded now".to_owned()
    } else {
        format!(
            "as {} holds it from an earlier run",
            args.data_dir.display()
        )
    };
    format!(
        r#"
==================== Switchyard quick start ====================
control plane   gRPC {grpc}, HTTP switch API {http} (user {API_USER}, password {API_PASSWORD})
                embedded store in {data_dir}
proxy           stratum+tcp://{listen} (server ID 1, bitcoin), metrics http://{metrics}/metrics
sservers        simulated, share difficulty {difficulty}: {sservers}
demo user       {user}, on {coin} ({origin})

1. Point a miner at stratum+tcp://{listen} with worker {user}.rig1 (any password), e.g. cpuminer:

   minerd -a sha256d -o stratum+tcp://{listen} -u {user}.rig1 -p x

   Names are case-sensitive: {user} and {upper} are two users ({upper} is unknown here:
   error 201), unless the proxy's StratumServerCaseInsensitive is set.
   Or be the miner yourself (the sleep keeps nc's connection open to see the jobs):

   (printf '{{"id":1,"method":"mining.subscribe","params":[]}}\n{{"id":2,"method":"mining.authorize","params":["{user}.rig1","x"]}}\n'; sleep 30) | nc {listen_host} {listen_port}

   Jobs arrive as mining.notify with IDs like "{coin}-3" ({user} is on {coin}).

2. Switch {user} to {other} while the miner stays connected (its next jobs are "{other}-..."),
   over the HTTP switch API, as pool backends do (coin={coin} switches back):

   curl -u {API_USER}:{API_PASSWORD} 'http://{http}/switch?puname={user}&coin={other}'

   or the same over gRPC, with grpcurl:

   grpcurl -plaintext -d '{{"user":"{user}","coin":"{other}"}}' {grpc} switchyard.v1.SwitcherAdmin/SwitchCoin

3. See every user's coin, and the proxy's metrics:

   grpcurl -plaintext -d '{{}}' {grpc} switchyard.v1.SwitcherAdmin/ListUserCoins
   curl -s http://{metrics}/metrics | grep switchyard_proxy

Ctrl-C stops everything; the users and their coins stay in {data_dir} for the next run.
Switchyard quick start is running.
"#,
        data_dir = args.data_dir.display(),
        difficulty = args.difficulty,
        sservers = sservers.join(", "),
        upper = capitalized(user),
        listen_host = listen.ip(),
        listen_port = listen.port(),
    )
}

/// `name` with its first letter in the other case (`alice` → `Alice`): another user.
fn capitalized(name: &str) -> String {
    let mut chars = name.chars();
    match chars.next() {
        Some(first) if first.is_lowercase() => first.to_uppercase().chain(chars).collect(),
        Some(first) => first.to_lowercase().chain(chars).collect(),
        None => String::new(),
    }
}

fn init_logging() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    init_logging();
    let mut signals = Signals::install()?;
    let node = tokio::select! {
        node = Node::start(&args) => node?,
        () = signals.recv() => {
            warn!("signal received while starting: stopping");
            return Ok(());
        }
    };
    println!("{}", instructions(&args, &node));
    signals.recv().await;
    info!("signal received: stopping");
    node.stop().await?;
    info!("stopped");
    Ok(())
}
