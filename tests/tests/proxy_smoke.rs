//! The proxy end to end in one process: control (embedded store), the proxy library, two
//! simulated sservers and a miner over real TCP. A login reaches the user's coin, and a switch
//! moves the miner to the other coin's sserver without closing its connection.

use std::time::Duration;

use serde_json::json;
use switchyard_proto::v1::SwitchCoinRequest;
use switchyard_tests::{
    control::InProcessControl,
    miner::Miner,
    proxy::{InProcessProxy, proxy_config},
    sserver::{Sserver, SserverConfig},
};

const T: Duration = Duration::from_secs(15);

fn switch(user: &str, coin: &str) -> SwitchCoinRequest {
    SwitchCoinRequest {
        user: user.into(),
        coin: coin.into(),
    }
}

#[tokio::test]
async fn a_miner_follows_its_users_coin_without_reconnecting() {
    let control = InProcessControl::start().await.expect("control");
    control
        .admin()
        .switch_coin(switch("alice", "btc"))
        .await
        .expect("switch to btc");
    let btc = Sserver::start(SserverConfig::new("btc"))
        .await
        .expect("btc");
    let bch = Sserver::start(SserverConfig::new("bch"))
        .await
        .expect("bch");
    let config = proxy_config(&[control.addr], &[&btc, &bch]).expect("config");
    let proxy = InProcessProxy::start(&config).await.expect("proxy");

    let mut miner = Miner::connect(proxy.addr()).await.expect("connect");
    let (sub, auth) = miner.bitcoin_login("alice.rig1", T).await.expect("login");
    let sid = sub["result"][1].as_str().expect("SID").to_string();
    assert_eq!(auth["result"], json!(true), "{auth}");
    miner.wait_job_of("btc", T).await.expect("a btc job");
    let id = miner
        .request(
            "mining.submit",
            json!(["alice.rig1", "btc-1", "00", "00", "00"]),
        )
        .await
        .expect("submit");
    assert_eq!(
        miner.answer(id, T).await.expect("answer")["result"],
        json!(true)
    );

    control
        .admin()
        .switch_coin(switch("alice", "bch"))
        .await
        .expect("switch to bch");
    miner
        .wait_job_of("bch", T)
        .await
        .expect("a bch job after the switch");
    let id = miner
        .request(
            "mining.submit",
            json!(["alice.rig1", "bch-1", "00", "00", "00"]),
        )
        .await
        .expect("submit");
    assert_eq!(
        miner.answer(id, T).await.expect("answer")["result"],
        json!(true)
    );
    let records = bch.records();
    assert!(
        records
            .subscribes
            .iter()
            .any(|s| s.sid.as_deref() == Some(sid.as_str())),
        "bch saw the same SID {sid}: {}",
        records.summary()
    );
    assert!(miner.malformed.is_empty(), "{:?}", miner.malformed);
    let auth_answers = miner
        .received
        .iter()
        .filter(|v| v["id"] == json!(2) && v.get("method").is_none())
        .count();
    assert_eq!(
        auth_answers, 1,
        "the replayed authorize is not answered to the miner"
    );
    assert!(
        proxy
            .metrics()
            .contains("switchyard_proxy_switches_total{coin=\"bch\",outcome=\"ok\"} 1"),
        "{}",
        proxy.metrics()
    );
}

/// The proxy fixture survives a port taken between picking it and the proxy binding it (tests
/// run in parallel): it starts again on fresh ports.
#[tokio::test]
async fn the_proxy_fixture_moves_off_a_taken_port() {
    let control = InProcessControl::start().await.expect("control");
    let btc = Sserver::start(SserverConfig::new("btc"))
        .await
        .expect("btc");
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let mut config = proxy_config(&[control.addr], &[&btc]).expect("config");
    config["ListenAddr"] = json!(taken.local_addr().expect("addr").to_string());
    let proxy = switchyard_tests::proxy::ProxyProcess::start(&config)
        .await
        .expect("started on another port");
    assert_ne!(proxy.addr, taken.local_addr().expect("addr"));
}
