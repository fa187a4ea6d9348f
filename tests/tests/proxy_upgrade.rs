//! The hot upgrade (SPEC §9), end to end: the real `switchyard-proxy` binary gets SIGUSR2 and
//! execs itself (the same binary: what matters is the hand-over, not the version), with
//! scripted sservers that show whether an upstream connection was kept (no new connection,
//! the same socket answering) and simulated miners that check every answer comes exactly once
//! and whole.
//!
//! - sessions idle and submitting, with a request in flight and a partial line pending on
//!   each side, survive an upgrade, on the same upstream connections; the PID stays;
//! - a session in the middle of a switch (the new sserver's login held) and a session
//!   draining an old sserver (a submit in flight on it) survive an upgrade;
//! - a new binary that cannot start (a bad config) costs nothing: the old process serves on,
//!   and a later upgrade with the config fixed works (two upgrades in a row);
//! - connections arriving during an upgrade are all accepted and served;
//! - a user switched while the proxy upgraded is switched by the new image;
//! - the server-ID lease carries over (the same lease, no new one) and so do the session IDs.

use std::time::Duration;

use serde_json::json;
use switchyard_tests::{
    miner::Miner,
    proxy::{ProxyProcess, proxy_config},
    scripted::ScriptedSserver,
    session_harness::*,
    sserver::{Sserver, SserverConfig},
    wait::{peer_read_all, wait_until},
};

/// The log line of the new image once it has taken the sessions over.
const TAKEN_OVER: &str = "hot upgrade: sessions taken over";

/// Sends SIGUSR2 and waits until the `n`th upgrade has been taken over and the new image is
/// synced with the control plane again.
async fn upgrade(proxy: &mut ProxyProcess, n: usize) {
    let pid = proxy.pid();
    ok("SIGUSR2", proxy.signal("USR2"));
    ok("the upgrade", proxy.wait_log(TAKEN_OVER, n, T).await);
    assert!(proxy.running(), "the process still runs");
    assert_eq!(proxy.pid(), pid, "the PID stays");
    let synced = wait_until(T, "the new image to sync", || async {
        match proxy.metrics().await {
            Ok(m) if m.contains("switchyard_proxy_control_connected 1") => Ok(()),
            Ok(_) => Err("not synced".to_string()),
            Err(e) => Err(e),
        }
    })
    .await;
    if let Err(e) = synced {
        panic!("{e}\n{}", proxy.log());
    }
}

#[tokio::test]
async fn sessions_with_requests_in_flight_and_partial_lines_survive_an_upgrade() {
    let btc = ScriptedSserver::start("btc").await;
    let mut node = node(&[&btc]).await;
    let mut idle = Miner::connect(node.proxy.addr).await.expect("connect");
    let mut idle_conn = login(&mut idle, "alice.idle", &btc).await;
    let mut busy = Miner::connect(node.proxy.addr).await.expect("connect");
    let mut conn = login(&mut busy, "alice.busy", &btc).await;
    ok("a job", conn.notify("j1", true).await);
    wait_job(&mut busy, "j1").await;

    // A submit the sserver holds the answer to, a line cut short each way.
    busy.send(&submit(10, "alice.busy", "j1"))
        .await
        .expect("send");
    let held = ok("the submit", conn.recv_method("mining.submit", T).await);
    let second = submit(11, "alice.busy", "j1").to_string();
    let (head, tail) = second.split_at(20);
    busy.send_raw(head.as_bytes()).await.expect("send");
    let difficulty =
        json!({"id": null, "method": "mining.set_difficulty", "params": [2048]}).to_string();
    let (d_head, d_tail) = difficulty.split_at(25);
    ok("half a line", conn.send_raw(d_head.as_bytes()).await);
    // Both halves are in the proxy (read off its sockets) before the signal.
    let (ours, proxy_end) = busy.addrs().expect("addrs");
    ok(
        "the miner's half read",
        peer_read_all(ours, proxy_end, T).await,
    );
    let (ours, proxy_end) = conn.addrs().expect("addrs");
    ok(
        "the sserver's half read",
        peer_read_all(ours, proxy_end, T).await,
    );

    upgrade(&mut node.proxy, 1).await;

    busy.send_raw(format!("{tail}\n").as_bytes())
        .await
        .expect("send");
    let second = ok(
        "the rest of the line",
        conn.recv_method("mining.submit", T).await,
    );
    assert_eq!(
        second["id"],
        json!(11),
        "the line cut short came whole: {second}"
    );
    ok(
        "the other half",
        conn.send_raw(format!("{d_tail}\n").as_bytes()).await,
    );
    ok("the held answer", conn.reply(&held, json!(true)).await);
    ok("the second answer", conn.reply(&second, json!(true)).await);
    ok(
        "answers",
        wait_answers(&mut busy, &[json!(10), json!(11)], T).await,
    );
    let is_difficulty =
        |v: &serde_json::Value| v["method"] == "mining.set_difficulty" && v["params"][0] == 2048;
    if !busy.received.iter().any(is_difficulty) {
        busy.wait_for("the difficulty", T, is_difficulty)
            .await
            .expect("the sserver's line cut short reaches the miner whole");
    }
    assert_one_answer(&busy, json!(10));
    assert_one_answer(&busy, json!(11));
    assert_no_malformed(&busy);

    // The idle session relays on its own connection too.
    ok("a job", idle_conn.notify("j2", true).await);
    wait_job(&mut idle, "j2").await;
    idle.send(&submit(5, "alice.idle", "j2"))
        .await
        .expect("send");
    let request = ok(
        "the idle submit",
        idle_conn.recv_method("mining.submit", T).await,
    );
    ok("answer", idle_conn.reply(&request, json!(true)).await);
    ok("answer", wait_answers(&mut idle, &[json!(5)], T).await);
    assert_no_malformed(&idle);
    assert_eq!(
        btc.accepted(),
        2,
        "no new upstream connection: {}",
        node.proxy.log()
    );
}

#[tokio::test]
async fn sessions_switching_and_draining_survive_an_upgrade() {
    let btc = ScriptedSserver::start("btc").await;
    let bch = ScriptedSserver::start("bch").await;
    let mut node = node_with(
        &[("alice", "btc"), ("bob", "btc")],
        &[],
        "bitcoin",
        &[&btc, &bch],
    )
    .await;

    // Alice: switched to bch, the btc sserver drained with a submit in flight.
    let mut alice = Miner::connect(node.proxy.addr).await.expect("connect");
    let mut alice_btc = login(&mut alice, "alice.a", &btc).await;
    ok("a job", alice_btc.notify("b1", false).await);
    wait_job(&mut alice, "b1").await;
    alice
        .send(&submit(20, "alice.a", "b1"))
        .await
        .expect("send");
    let in_flight = ok(
        "the submit",
        alice_btc.recv_method("mining.submit", T).await,
    );
    switch(&node.control, "alice", "bch").await;
    let mut alice_bch = ok("the bch upstream", bch.next_conn(T).await);
    ok("the bch login", alice_bch.answer_login(T).await);
    ok("a bch job", alice_bch.notify("c1", true).await);
    wait_job(&mut alice, "c1").await;

    // Bob: a switch to bch under way (the bch sserver holds its login answer).
    let mut bob = Miner::connect(node.proxy.addr).await.expect("connect");
    let _bob_btc = login(&mut bob, "bob.b", &btc).await;
    switch(&node.control, "bob", "bch").await;
    let mut bob_bch = ok("bob's bch upstream", bch.next_conn(T).await);
    let seen = ok("bob's bch login", bob_bch.read_login(T).await);

    upgrade(&mut node.proxy, 1).await;

    // Alice's drained btc answers after the upgrade: the miner gets it, once.
    ok(
        "the drained answer",
        alice_btc.reply(&in_flight, json!(true)).await,
    );
    ok("answer", wait_answers(&mut alice, &[json!(20)], T).await);
    alice
        .send(&submit(21, "alice.a", "c1"))
        .await
        .expect("send");
    let on_bch = ok(
        "the bch submit",
        alice_bch.recv_method("mining.submit", T).await,
    );
    ok("answer", alice_bch.reply(&on_bch, json!(true)).await);
    ok("answer", wait_answers(&mut alice, &[json!(21)], T).await);
    assert_one_answer(&alice, json!(20));
    assert_one_answer(&alice, json!(21));
    assert_no_malformed(&alice);

    // Bob's open was cut by the upgrade and is made again by the new image, with the same SID.
    assert!(
        bob_bch.closed_within(T).await,
        "the open under way is closed"
    );
    let mut again = ok("bob's bch upstream again", bch.next_conn(T).await);
    let seen_again = ok("bob's second bch login", again.answer_login(T).await);
    assert_eq!(seen_again.sid, seen.sid, "the same session ID");
    ok("a bch job", again.notify("c2", true).await);
    wait_job(&mut bob, "c2").await;
    bob.send(&submit(30, "bob.b", "c2")).await.expect("send");
    let request = ok(
        "bob's bch submit",
        again.recv_method("mining.submit", T).await,
    );
    ok("answer", again.reply(&request, json!(true)).await);
    ok("answer", wait_answers(&mut bob, &[json!(30)], T).await);
    assert_no_malformed(&bob);
    assert_eq!(btc.accepted(), 2, "no new btc connection");
}

#[tokio::test]
async fn a_new_binary_that_cannot_start_costs_no_session_and_a_later_upgrade_works() {
    let btc = ScriptedSserver::start("btc").await;
    let mut node = node(&[&btc]).await;
    let mut miner = Miner::connect(node.proxy.addr).await.expect("connect");
    let mut conn = login(&mut miner, "alice.rig", &btc).await;
    ok("a job", conn.notify("j1", true).await);
    wait_job(&mut miner, "j1").await;

    let good = std::fs::read_to_string(node.proxy.config_path()).expect("the config");
    std::fs::write(node.proxy.config_path(), "{ not json").expect("a bad config");
    let pid = node.proxy.pid();
    ok("SIGUSR2", node.proxy.signal("USR2"));
    ok(
        "the refusal",
        node.proxy.wait_log("hot upgrade not done", 1, T).await,
    );
    assert!(node.proxy.running(), "the old process serves on");
    assert_eq!(node.proxy.pid(), pid);
    miner
        .send(&submit(1, "alice.rig", "j1"))
        .await
        .expect("send");
    let request = ok("the submit", conn.recv_method("mining.submit", T).await);
    ok("answer", conn.reply(&request, json!(true)).await);
    ok("answer", wait_answers(&mut miner, &[json!(1)], T).await);

    std::fs::write(node.proxy.config_path(), good).expect("the config back");
    upgrade(&mut node.proxy, 1).await;
    upgrade(&mut node.proxy, 2).await;
    miner
        .send(&submit(2, "alice.rig", "j1"))
        .await
        .expect("send");
    let request = ok("the submit", conn.recv_method("mining.submit", T).await);
    ok("answer", conn.reply(&request, json!(true)).await);
    ok("answer", wait_answers(&mut miner, &[json!(2)], T).await);
    assert_one_answer(&miner, json!(1));
    assert_one_answer(&miner, json!(2));
    assert_no_malformed(&miner);
    assert_eq!(btc.accepted(), 1, "the same upstream connection throughout");
}

#[tokio::test]
async fn connections_arriving_during_an_upgrade_are_accepted() {
    let control = control(&[("alice", "btc")], &[]).await;
    let btc = Sserver::start(SserverConfig::new("btc"))
        .await
        .expect("btc");
    let config = proxy_config(&[control.addr], &[&btc]).expect("config");
    let mut proxy = ProxyProcess::start(&config)
        .await
        .expect("the proxy starts");
    let addr = proxy.addr;
    // Miners connect and log in one after another while the upgrade runs.
    let started = std::sync::Arc::new(tokio::sync::Notify::new());
    let first_in = started.clone();
    let arrivals = tokio::spawn(async move {
        let mut logged_in = 0;
        for i in 0..60 {
            let mut miner = Miner::connect(addr)
                .await
                .map_err(|e| format!("connect {i}: {e}"))?;
            let (_, auth) = miner
                .bitcoin_login(&format!("alice.new{i}"), T)
                .await
                .map_err(|e| format!("login {i}: {e}"))?;
            if auth["result"] != json!(true) {
                return Err(format!("login {i} refused: {auth}"));
            }
            logged_in += 1;
            if logged_in == 5 {
                first_in.notify_one();
            }
            // The arrivals' pace: spread over the upgrade.
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok::<_, String>(logged_in)
    });
    // The upgrade starts once miners are arriving.
    tokio::time::timeout(T, started.notified())
        .await
        .expect("the first miners log in");
    upgrade(&mut proxy, 1).await;
    let logged_in = arrivals
        .await
        .expect("the arrivals task")
        .unwrap_or_else(|e| panic!("{e}\n--- proxy log ---\n{}", proxy.log()));
    assert_eq!(logged_in, 60);
}

#[tokio::test]
async fn a_user_switched_while_the_proxy_upgraded_is_switched_by_the_new_image() {
    let btc = ScriptedSserver::start("btc").await;
    let bch = ScriptedSserver::start("bch").await;
    // The old image follows a control plane where alice mines btc; the config the new image
    // reads names another, where she mines bch: the switch happens "during" the upgrade,
    // where the old image cannot see it.
    let mut node = node_with(&[("alice", "btc")], &[], "bitcoin", &[&btc, &bch]).await;
    let moved = control(&[("alice", "bch")], &[]).await;
    let mut miner = Miner::connect(node.proxy.addr).await.expect("connect");
    let mut on_btc = login(&mut miner, "alice.rig", &btc).await;
    ok("a btc job", on_btc.notify("b1", true).await);
    wait_job(&mut miner, "b1").await;

    let path = node.proxy.config_path().to_path_buf();
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).expect("the config")).expect("json");
    config["ControlEndpoints"] = json!([format!("http://{}", moved.addr)]);
    std::fs::write(&path, config.to_string()).expect("the new config");
    upgrade(&mut node.proxy, 1).await;

    let mut on_bch = ok("the bch upstream", bch.next_conn(T).await);
    let seen = ok("the bch login", on_bch.answer_login(T).await);
    assert_eq!(seen.worker, "alice.rig");
    ok("a bch job", on_bch.notify("c1", true).await);
    wait_job(&mut miner, "c1").await;
    miner
        .send(&submit(7, "alice.rig", "c1"))
        .await
        .expect("send");
    let request = ok(
        "the bch submit",
        on_bch.recv_method("mining.submit", T).await,
    );
    ok("answer", on_bch.reply(&request, json!(true)).await);
    ok("answer", wait_answers(&mut miner, &[json!(7)], T).await);
    assert_one_answer(&miner, json!(7));
    assert_no_malformed(&miner);
    assert_eq!(bch.accepted(), 1, "one bch connection");
}

#[tokio::test]
async fn the_server_id_lease_and_the_session_ids_carry_over() {
    let control = control(&[("alice", "btc")], &[]).await;
    let btc = Sserver::start(SserverConfig::new("btc"))
        .await
        .expect("btc");
    let mut config = proxy_config(&[control.addr], &[&btc]).expect("config");
    config["ServerID"] = json!(0);
    let mut proxy = ProxyProcess::start(&config)
        .await
        .expect("the proxy starts");
    let proxies = || async {
        control
            .admin()
            .list_proxies(switchyard_proto::v1::ListProxiesRequest {})
            .await
            .expect("ListProxies")
            .into_inner()
            .proxies
    };
    let before = proxies().await;
    assert_eq!(before.len(), 1, "one lease: {before:?}");
    let mut miner = Miner::connect(proxy.addr).await.expect("connect");
    let (subscribed, _) = miner.bitcoin_login("alice.old", T).await.expect("login");
    let sid = subscribed["result"][1].clone();
    let leases_taken = proxy.log_count("server ID leased");

    upgrade(&mut proxy, 1).await;

    let after = proxies().await;
    assert_eq!(after.len(), 1, "still one lease: {after:?}");
    assert_eq!(
        after[0].server_id, before[0].server_id,
        "the same server ID"
    );
    assert_eq!(
        after[0].instance_id, before[0].instance_id,
        "the same lease"
    );
    assert_eq!(
        proxy.log_count("server ID leased"),
        leases_taken,
        "no new lease was taken:\n{}",
        proxy.log()
    );
    let mut newcomer = Miner::connect(proxy.addr).await.expect("connect");
    let (subscribed, _) = newcomer.bitcoin_login("alice.new", T).await.expect("login");
    let new_sid = subscribed["result"][1].clone();
    assert_ne!(
        new_sid, sid,
        "the carried-over session's ID is not handed out again"
    );
    let prefix = |v: &serde_json::Value| v.as_str().unwrap_or_default()[..2].to_string();
    assert_eq!(prefix(&new_sid), prefix(&sid), "under the same server ID");
    miner
        .wait_job_of("btc", T)
        .await
        .expect("the old session still gets jobs");
}
