//! The proxy's cache file (issue 12, item 2), with a real ZooKeeper, the control and proxy
//! binaries and simulated sservers:
//!
//! - a proxy restarted while the control plane is away serves its users from the file, on the
//!   server ID it had leased, and once the control plane is back resumes the stream from the
//!   file's revision (no full snapshot) and applies a switch written meanwhile;
//! - a saved lease whose ID another proxy took while this one was down is given up once the
//!   control plane says so: new sessions get another ID.

use std::time::Duration;

use serde_json::json;
use switchyard_proto::v1::{SwitchCoinRequest, SwitchCoinsRequest};
use switchyard_tests::{
    control::ControlProcess,
    miner::Miner,
    proxy::{ProxyProcess, proxy_config},
    sserver::{Sserver, SserverConfig},
    wait::wait_until,
    zookeeper::{ZooKeeperServer, unique_root},
};

const T: Duration = Duration::from_secs(30);

fn switch(user: &str, coin: &str) -> SwitchCoinRequest {
    SwitchCoinRequest {
        user: user.into(),
        coin: coin.into(),
    }
}

/// The control binary on the shared ZooKeeper under `root`, leases living `ttl` seconds.
async fn zk_control(root: &str, ttl: u64) -> ControlProcess {
    ControlProcess::on_zookeeper(root, |c| c["LeaseTTLSeconds"] = json!(ttl))
        .await
        .expect("control on ZooKeeper")
}

async fn sserver(coin: &str) -> Sserver {
    Sserver::start(SserverConfig::new(coin).job_interval(Some(Duration::from_millis(300))))
        .await
        .expect("sserver")
}

/// Waits until `proxy` has written its cache file with `users` users known.
async fn until_cache_file(proxy: &ProxyProcess) {
    let path = proxy.dir().join("switchyard-proxy.cache");
    wait_until(T, "the cache file to be written", || {
        let path = path.clone();
        async move {
            match std::fs::metadata(&path) {
                Ok(m) if m.len() > 0 => Ok(()),
                other => Err(format!("{other:?}")),
            }
        }
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", proxy.log()));
}

async fn metric(proxy: &ProxyProcess, sample: &str) -> f64 {
    proxy.metric(sample).await.expect("metrics")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_restarted_while_the_control_plane_is_away_serves_from_its_cache_file() {
    let root = unique_root("cache-file");
    let mut control = zk_control(&root, 30).await;
    control
        .admin()
        .switch_coins(SwitchCoinsRequest {
            switches: vec![switch("alice", "btc"), switch("bob", "bch")],
        })
        .await
        .expect("users");
    let btc = sserver("btc").await;
    let bch = sserver("bch").await;
    let mut config = proxy_config(&[control.addr], &[&btc, &bch]).expect("config");
    config["ServerID"] = json!(0);
    let mut proxy = ProxyProcess::start(&config).await.expect("proxy");
    let leased = metric(&proxy, "switchyard_proxy_server_id").await;
    assert!(leased >= 1.0, "a leased server ID");
    until_cache_file(&proxy).await;

    control.terminate().await.expect("control stopped");
    proxy
        .restart(false)
        .await
        .expect("the proxy starts without the control plane");
    assert_eq!(
        metric(&proxy, "switchyard_proxy_server_id").await,
        leased,
        "the saved lease's ID\n{}",
        proxy.log()
    );
    assert_eq!(
        metric(&proxy, "switchyard_proxy_control_connected").await,
        0.0
    );
    let mut alice = Miner::connect(proxy.addr).await.expect("connect");
    let (_, auth) = alice.bitcoin_login("alice.rig1", T).await.expect("login");
    assert_eq!(auth["result"], json!(true), "{auth}\n{}", proxy.log());
    alice.wait_job_of("btc", T).await.expect("alice on btc");
    let mut bob = Miner::connect(proxy.addr).await.expect("connect");
    let (_, auth) = bob.bitcoin_login("bob.rig1", T).await.expect("login");
    assert_eq!(auth["result"], json!(true), "{auth}");
    bob.wait_job_of("bch", T).await.expect("bob on bch");

    // A switch written while everything is away, by a plain ZooKeeper client.
    let zk = ZooKeeperServer::shared().expect("ZooKeeper");
    let client = zk.connect(Duration::from_secs(10)).await.expect("client");
    client
        .set_data(&format!("{root}/switcher/alice"), b"bch".to_vec(), None)
        .await
        .expect("write alice's coin");
    control.restart().await.expect("control back");
    alice
        .wait_job_of("bch", T)
        .await
        .expect("alice moved once the control plane is back");
    assert_eq!(
        metric(&proxy, "switchyard_proxy_cache_snapshots_total").await,
        0.0,
        "the stream resumed from the file's revision, without a snapshot\n{}",
        proxy.log()
    );
    assert_eq!(
        metric(&proxy, "switchyard_proxy_server_id").await,
        leased,
        "the lease was confirmed, not replaced"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_saved_lease_taken_by_another_proxy_meanwhile_is_given_up() {
    let root = unique_root("cache-file-lease");
    // Leases of 3 s, so that a stopped proxy's lease is free again soon.
    let mut control = zk_control(&root, 3).await;
    control
        .admin()
        .switch_coin(switch("alice", "btc"))
        .await
        .expect("user");
    let btc = sserver("btc").await;
    let mut config = proxy_config(&[control.addr], &[&btc]).expect("config");
    config["ServerID"] = json!(0);
    let mut first = ProxyProcess::start(&config).await.expect("proxy");
    let leased = metric(&first, "switchyard_proxy_server_id").await;
    until_cache_file(&first).await;
    first.signal("KILL").expect("kill");

    // Once the first proxy's lease expired, another proxy asks for the same ID and gets it.
    let mut other_config = proxy_config(&[control.addr], &[&btc]).expect("config");
    other_config["ServerID"] = json!(0);
    let deadline = tokio::time::Instant::now() + T;
    let _other = loop {
        let proxy = ProxyProcess::start(&other_config)
            .await
            .expect("other proxy");
        let id = metric(&proxy, "switchyard_proxy_server_id").await;
        if id == leased {
            break proxy;
        }
        // Kept until its own lease expires would take another ID each time: let it go.
        drop(proxy);
        assert!(
            tokio::time::Instant::now() < deadline,
            "no other proxy got ID {leased} (the last got {id})"
        );
        // The first proxy's lease expires within its 3 s time to live.
        tokio::time::sleep(Duration::from_millis(500)).await;
    };

    control.terminate().await.expect("control stopped");
    first
        .restart(false)
        .await
        .expect("the first proxy starts without the control plane");
    assert_eq!(
        metric(&first, "switchyard_proxy_server_id").await,
        leased,
        "on its saved lease while the control plane is away"
    );
    control.restart().await.expect("control back");
    wait_until(T, "the first proxy to give the taken ID up", || async {
        let id = metric(&first, "switchyard_proxy_server_id").await;
        if id != leased && id >= 1.0 {
            Ok(())
        } else {
            Err(format!("server ID {id}"))
        }
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", first.log()));
    let mut alice = Miner::connect(first.addr).await.expect("connect");
    let (_, auth) = alice.bitcoin_login("alice.rig1", T).await.expect("login");
    assert_eq!(auth["result"], json!(true));
}
