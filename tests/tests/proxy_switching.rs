//! Switching details of SPEC §4, end to end (control in-process on the embedded store, the
//! proxy binary, simulated sservers and miners):
//!
//! - the miner's partial line waits in the proxy and goes to the new upstream whole;
//! - every worker the connection authorized is authorized again on the new upstream, and the
//!   miner never sees the replayed answers;
//! - BTCAgent sessions are closed on a switch instead;
//! - a switch to a coin without an sserver, or to the same coin again, changes nothing.

use std::time::Duration;

use serde_json::json;
use switchyard_proto::v1::SwitchCoinRequest;
use switchyard_tests::{
    control::InProcessControl,
    miner::Miner,
    proxy::{ProxyProcess, proxy_config},
    sserver::{Sserver, SserverConfig},
};

const T: Duration = Duration::from_secs(20);

fn switch(user: &str, coin: &str) -> SwitchCoinRequest {
    SwitchCoinRequest {
        user: user.into(),
        coin: coin.into(),
    }
}

struct Node {
    control: InProcessControl,
    btc: Sserver,
    bch: Sserver,
    proxy: ProxyProcess,
}

async fn node(users: &[&str]) -> Node {
    let control = InProcessControl::start().await.expect("control");
    for user in users {
        control
            .admin()
            .switch_coin(switch(user, "btc"))
            .await
            .expect("user on btc");
    }
    let btc = Sserver::start(SserverConfig::new("btc").job_interval(None))
        .await
        .expect("btc");
    let bch = Sserver::start(SserverConfig::new("bch").job_interval(None))
        .await
        .expect("bch");
    let config = proxy_config(&[control.addr], &[&btc, &bch]).expect("config");
    let proxy = ProxyProcess::start(&config).await.expect("proxy");
    Node {
        control,
        btc,
        bch,
        proxy,
    }
}

#[tokio::test]
async fn a_partial_line_and_every_worker_move_to_the_new_upstream() {
    let n = node(&["alice"]).await;
    let mut miner = Miner::connect(n.proxy.addr).await.expect("connect");
    miner.bitcoin_login("alice.rig1", T).await.expect("login");
    let id = miner
        .request("mining.authorize", json!(["alice.rig2", "x"]))
        .await
        .expect("second worker");
    assert_eq!(
        miner.answer(id, T).await.expect("answer")["result"],
        json!(true)
    );

    // Half a submit, then the switch, then the rest.
    miner
        .send_raw(br#"{"id":77,"method":"mining.submit","params":["alice.rig2","#)
        .await
        .expect("half a line");
    n.control
        .admin()
        .switch_coin(switch("alice", "bch"))
        .await
        .expect("switch");
    miner.wait_job_of("bch", T).await.expect("bch job");
    miner
        .send_raw(b"\"bch-1\",\"00\",\"00\",\"00\"]}\n")
        .await
        .expect("the rest");
    let answer = miner.answer(77, T).await.expect("the submit answered");
    assert_eq!(
        answer["result"],
        json!(true),
        "rig2 is authorized on bch: {answer}"
    );

    let records = n.bch.records();
    let workers = records.accepted_workers();
    assert!(
        workers.contains(&"alice.rig1") && workers.contains(&"alice.rig2"),
        "both workers authorized again on bch: {workers:?}"
    );
    assert!(
        records
            .submits
            .iter()
            .any(|s| s.worker == "alice.rig2" && s.job_id == "bch-1"),
        "the whole submit reached bch: {}",
        records.summary()
    );
    // Exactly one answer per authorize the miner sent: none of the replayed ones.
    let authorize_answers = miner
        .received
        .iter()
        .filter(|v| v.get("method").is_none() && (v["id"] == json!(2) || v["id"] == json!(id)))
        .count();
    assert_eq!(authorize_answers, 2, "{:?}", miner.received);
    assert!(miner.malformed.is_empty(), "{:?}", miner.malformed);
}

#[tokio::test]
async fn btcagent_sessions_are_closed_on_a_switch() {
    let n = node(&["alice"]).await;
    let mut agent = Miner::connect(n.proxy.addr).await.expect("connect");
    let sub = agent
        .request("mining.subscribe", json!(["btccom-agent/0.1.3"]))
        .await
        .expect("subscribe");
    agent.answer(sub, T).await.expect("subscribed");
    let auth = agent
        .request("mining.authorize", json!(["alice.agent", "x"]))
        .await
        .expect("authorize");
    assert_eq!(
        agent.answer(auth, T).await.expect("answer")["result"],
        json!(true)
    );
    n.control
        .admin()
        .switch_coin(switch("alice", "bch"))
        .await
        .expect("switch");
    assert!(
        agent.closed_within(T).await,
        "the BTCAgent session is closed"
    );
    assert_eq!(n.bch.records().subscribes.len(), 0, "it never reached bch");
}

#[tokio::test]
async fn a_coin_without_sserver_or_the_same_coin_changes_nothing() {
    let n = node(&["alice"]).await;
    let mut miner = Miner::connect(n.proxy.addr).await.expect("connect");
    miner.bitcoin_login("alice.rig1", T).await.expect("login");
    miner.wait_job_of("btc", T).await.expect("btc job");
    // ltc is an available coin with no sserver in this proxy's map.
    n.control
        .admin()
        .switch_coin(switch("alice", "ltc"))
        .await
        .expect("switch to ltc");
    // Then back to btc (the same coin as the session's): nothing to do either.
    n.control
        .admin()
        .switch_coin(switch("alice", "btc"))
        .await
        .expect("switch back");
    // The proxy has seen both (its cache is at the control's revision) ...
    let wanted = n.control.core.index().revision();
    switchyard_tests::wait::wait_until(T, "the proxy's cache to catch up", || async {
        let m = n.proxy.metrics().await?;
        let seen = switchyard_tests::proxy::metric_value(&m, "switchyard_proxy_cache_revision");
        if seen as u64 >= wanted {
            Ok(())
        } else {
            Err(format!("cache at {seen}, control at {wanted}"))
        }
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    // ... and the session is where it was, on its first upstream.
    let job = n.btc.new_job();
    miner
        .wait_for("the next btc job", T, |v| {
            v["params"][0] == json!(job.clone())
        })
        .await
        .expect("still on btc");
    assert_eq!(n.btc.records().subscribes.len(), 1, "no new btc upstream");
    assert_eq!(n.bch.records().subscribes.len(), 0);
    let m = n.proxy.metrics().await.expect("metrics");
    assert!(
        m.contains("switchyard_proxy_switches_total{coin=\"ltc\",outcome=\"no_sserver\"} 1"),
        "{m}"
    );
}
