//! Read-through at login (issue 12, item 1), with a real ZooKeeper, the control and proxy
//! binaries and a simulated sserver:
//!
//! - a user written to ZooKeeper by a plain client and logged in at once is never refused,
//!   1,000 times over (the proxy's cache learns of the user 5 to 20 ms after the write; the
//!   login asks the control plane, which syncs and reads ZooKeeper);
//! - 10,000 logins with random unknown names are all answered 201, with the lookups bounded
//!   (never more in flight than `ReadThroughMaxInFlight`) and the same names again answered
//!   from the proxy's memory of misses, without asking the control plane.

use std::{sync::Arc, time::Duration};

use serde_json::{Value, json};
use switchyard_tests::{
    control::ControlProcess,
    miner::Miner,
    proxy::{ProxyProcess, metric_value, proxy_config},
    sserver::{Sserver, SserverConfig},
    zookeeper::{ZooKeeperServer, unique_root},
};
use zookeeper_async::{Acl, CreateMode};

const T: Duration = Duration::from_secs(20);

/// The control binary on the shared ZooKeeper under a fresh root.
async fn zk_control(root: &str) -> ControlProcess {
    ControlProcess::on_zookeeper(root, |_| {})
        .await
        .expect("control on ZooKeeper")
}

/// Logs `worker` in on a new connection; the authorize answer.
async fn login(addr: std::net::SocketAddr, worker: &str) -> Value {
    let mut miner = Miner::connect(addr).await.expect("connect");
    let (_, auth) = miner.bitcoin_login(worker, T).await.expect("login answers");
    auth
}

fn refused_201(auth: &Value) -> bool {
    auth["result"] != json!(true) && auth["error"][0] == json!(201)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_written_to_zookeeper_a_moment_before_its_login_is_never_refused() {
    let root = unique_root("read-through");
    let control = zk_control(&root).await;
    let btc = Sserver::start(SserverConfig::new("btc"))
        .await
        .expect("sserver");
    let config = proxy_config(&[control.addr], &[&btc]).expect("config");
    let proxy = ProxyProcess::start(&config).await.expect("proxy");
    let zk = ZooKeeperServer::shared().expect("ZooKeeper");
    let client = Arc::new(zk.connect(Duration::from_secs(10)).await.expect("client"));

    // Four writers-and-miners at once, 250 users each: the writes land while the stream is
    // busy with the others.
    let mut tasks = Vec::new();
    for lane in 0..4 {
        let client = Arc::clone(&client);
        let root = root.clone();
        let addr = proxy.addr;
        tasks.push(tokio::spawn(async move {
            let mut refused = Vec::new();
            for i in 0..250 {
                let user = format!("fresh{lane}x{i}");
                client
                    .create(
                        &format!("{root}/switcher/{user}"),
                        b"btc".to_vec(),
                        Acl::open_unsafe().clone(),
                        CreateMode::Persistent,
                    )
                    .await
                    .expect("write the user");
                let auth = login(addr, &format!("{user}.rig")).await;
                if auth["result"] != json!(true) {
                    refused.push(format!("{user}: {auth}"));
                }
            }
            refused
        }));
    }
    let mut refused = Vec::new();
    for task in tasks {
        refused.extend(task.await.expect("lane"));
    }
    assert!(
        refused.is_empty(),
        "{} of 1,000 fresh users refused, e.g. {:?}",
        refused.len(),
        refused.first()
    );
    let metrics = proxy.metrics().await.expect("metrics");
    assert!(
        metric_value(
            &metrics,
            "switchyard_proxy_user_lookups_total{outcome=\"found\"}"
        ) > 0.0,
        "some logins were answered by the read-through:\n{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_unknown_names_costs_the_control_plane_bounded_reads() {
    const LOGINS: usize = 10_000;
    const AT_ONCE: usize = 100;
    const MAX_IN_FLIGHT: u64 = 4;
    let root = unique_root("read-through-junk");
    let control = zk_control(&root).await;
    let btc = Sserver::start(SserverConfig::new("btc"))
        .await
        .expect("sserver");
    let mut config = proxy_config(&[control.addr], &[&btc]).expect("config");
    config["ReadThroughMaxInFlight"] = json!(MAX_IN_FLIGHT);
    config["ReadThroughNegativeSeconds"] = json!(600);
    let proxy = ProxyProcess::start(&config).await.expect("proxy");
    // Random names (a seeded generator: splitmix64 from the clock), unknown to the store.
    let mut state = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.as_nanos() as u64);
    let mut next = move || {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    };
    let names: Arc<Vec<String>> = Arc::new(
        (0..LOGINS)
            .map(|_| format!("junk{:016x}", next()))
            .collect(),
    );

    let flood = |count: usize| {
        let names = Arc::clone(&names);
        let addr = proxy.addr;
        async move {
            let mut lanes = Vec::new();
            for lane in 0..AT_ONCE {
                let names = Arc::clone(&names);
                lanes.push(tokio::spawn(async move {
                    let mut not_201 = Vec::new();
                    for name in names.iter().take(count).skip(lane).step_by(AT_ONCE) {
                        let auth = login(addr, &format!("{name}.rig")).await;
                        if !refused_201(&auth) {
                            not_201.push(format!("{name}: {auth}"));
                        }
                    }
                    not_201
                }));
            }
            let mut not_201 = Vec::new();
            for lane in lanes {
                not_201.extend(lane.await.expect("lane"));
            }
            not_201
        }
    };

    let not_201 = flood(LOGINS).await;
    assert!(
        not_201.is_empty(),
        "{} unknown names not answered 201, e.g. {:?}",
        not_201.len(),
        not_201.first()
    );
    let metrics = proxy.metrics().await.expect("metrics");
    let sample = |name: &str| metric_value(&metrics, name);
    let peak = sample("switchyard_proxy_user_lookups_peak_in_flight");
    let asked = sample("switchyard_proxy_user_lookups_asked_total");
    assert!(
        peak >= 1.0 && peak <= MAX_IN_FLIGHT as f64,
        "lookups in flight at once: {peak}\n{metrics}"
    );
    assert!(
        asked <= LOGINS as f64,
        "{asked} lookups for {LOGINS} logins"
    );
    assert_eq!(
        sample("switchyard_proxy_user_lookups_total{outcome=\"found\"}"),
        0.0
    );
    let counted: f64 = ["unknown", "known_unknown", "busy", "failed"]
        .iter()
        .map(|o| {
            sample(&format!(
                "switchyard_proxy_user_lookups_total{{outcome=\"{o}\"}}"
            ))
        })
        .sum();
    assert_eq!(
        counted, LOGINS as f64,
        "every login looked up once:\n{metrics}"
    );

    // The same names again: answered from the memory of misses, no new read.
    let again = 2_000;
    let not_201 = flood(again).await;
    assert!(not_201.is_empty(), "{not_201:?}");
    let metrics = proxy.metrics().await.expect("metrics");
    let asked_after = metric_value(&metrics, "switchyard_proxy_user_lookups_asked_total");
    // Names the control plane answered `unknown` the first time are remembered; only those
    // turned away busy or failed the first time may be asked again.
    let not_remembered = sample("switchyard_proxy_user_lookups_total{outcome=\"busy\"}")
        + sample("switchyard_proxy_user_lookups_total{outcome=\"failed\"}");
    assert!(
        asked_after - asked <= not_remembered,
        "asked {asked} then {asked_after} ({not_remembered} not remembered)\n{metrics}"
    );
    assert!(
        metric_value(
            &metrics,
            "switchyard_proxy_user_lookups_total{outcome=\"known_unknown\"}"
        ) >= again as f64 - not_remembered
    );
}
