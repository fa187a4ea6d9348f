//! Overlapping events in a proxied session (SPEC §1, §2, §4), end to end: control in-process
//! on the embedded store, the real `switchyard-proxy` binary, scripted sservers
//! ([`switchyard_tests::scripted`]) whose answers the test holds and releases to order the
//! events explicitly, and simulated miners. One test per defect of the session engine:
//!
//! - a worker authorized while a switch opens is authorized on the new sserver too;
//! - a second switch within the drain window keeps the first old sserver's answers;
//! - switching back while the new sserver opens cancels the open (no second connection);
//! - authorizes in flight when the sserver is lost are replayed, however many;
//! - old-coin ETHProxy work never reaches the miner after the switch;
//! - shares go to the sserver of their job;
//! - modern SV1: `mining.suggest_difficulty` on every upstream, `mining.extranonce.subscribe`
//!   answered at once, BIP 310 answers for every extension, other requests of the handshake
//!   held and relayed.
//!
//! Every test checks that the miner gets exactly one answer per request and no malformed line.

use std::{collections::BTreeSet, time::Duration};

use serde_json::{Value, json};
use switchyard_tests::{
    miner::Miner,
    proxy::{ProxyProcess, proxy_config},
    scripted::{ScriptedConn, ScriptedSserver},
    session_harness::*,
    sserver::{Dialect, Sserver, SserverConfig},
};

/// SPEC §4: every worker the connection authorized successfully is authorized again on the
/// new upstream, including one whose authorize went to the old upstream while the switch was
/// opening.
#[tokio::test]
async fn a_worker_authorized_while_a_switch_opens_is_authorized_on_the_new_sserver() {
    let btc = ScriptedSserver::start("btc").await;
    let bch = ScriptedSserver::start("bch").await;
    let n = node(&[&btc, &bch]).await;
    let mut miner = Miner::connect(n.proxy.addr).await.expect("connect");
    let mut btc1 = login(&mut miner, "alice.rig1", &btc).await;

    switch(&n.control, "alice", "bch").await;
    let mut bch1 = ok("the bch upstream", bch.next_conn(T).await);
    let bch_login = ok("the bch login (held)", bch1.read_login(T).await);

    // While bch's answers are held, rig2 authorizes: the old upstream still serves.
    let rig2 = miner
        .request("mining.authorize", json!(["alice.rig2", "x"]))
        .await
        .expect("rig2's authorize is sent");
    let at_btc = ok(
        "rig2's authorize at btc",
        btc1.recv_method("mining.authorize", T).await,
    );
    assert_eq!(at_btc["params"][0], "alice.rig2", "{at_btc}");
    ok("btc answers rig2", btc1.reply(&at_btc, json!(true)).await);
    let answer = miner.answer(rig2, T).await.expect("rig2 answered");
    assert_eq!(answer["result"], json!(true), "{answer}");

    // Now bch completes its login: rig2 must be authorized there too.
    ok("bch answers its login", bch1.finish_login(&bch_login).await);
    let wanted = BTreeSet::from(["alice.rig2".to_string()]);
    let missing = authorizes_for(&mut bch1, &wanted, T).await;
    assert!(
        missing.is_empty(),
        "bch never received an authorize for {missing:?}; bch saw: {}",
        bch1.history()
    );
    // A bch job reaches the miner after anything the proxy relayed before it.
    ok("bch sends a job", bch1.notify("bch-1", true).await);
    wait_job(&mut miner, "bch-1").await;
    let answer = assert_one_answer(&miner, json!(rig2));
    assert_eq!(answer["result"], json!(true), "{answer}");
    assert_no_malformed(&miner);
}

/// SPEC §4: whatever upstream answers, the miner gets exactly one answer per request. A second
/// switch while the first old sserver still owes an answer must keep it (and the second old
/// one, which owes one too).
#[tokio::test]
async fn a_second_switch_within_the_drain_window_keeps_the_first_old_sserver() {
    let btc = ScriptedSserver::start("btc").await;
    let bch = ScriptedSserver::start("bch").await;
    let ltc = ScriptedSserver::start("ltc").await;
    let n = node(&[&btc, &bch, &ltc]).await;
    let mut miner = Miner::connect(n.proxy.addr).await.expect("connect");
    let mut btc1 = login(&mut miner, "alice.rig1", &btc).await;
    ok("btc sends a job", btc1.notify("btc-1", true).await);
    wait_job(&mut miner, "btc-1").await;
    miner
        .send(&submit(50, "alice.rig1", "btc-1"))
        .await
        .expect("submit 50 is sent");
    let submit50 = ok(
        "submit 50 at btc (held)",
        btc1.recv_method("mining.submit", T).await,
    );

    switch(&n.control, "alice", "bch").await;
    let mut bch1 = ok("the bch upstream", bch.next_conn(T).await);
    ok("the bch login", bch1.answer_login(T).await);
    ok("bch sends a job", bch1.notify("bch-1", true).await);
    wait_job(&mut miner, "bch-1").await;
    // bch owes an answer too when the second switch comes: then both old sservers must be
    // kept (the engine at 292e18b keeps one draining upstream, replaced by the second).
    miner
        .send(&submit(51, "alice.rig1", "bch-1"))
        .await
        .expect("submit 51 is sent");
    let submit51 = ok(
        "submit 51 at bch (held)",
        bch1.recv_method("mining.submit", T).await,
    );

    switch(&n.control, "alice", "ltc").await;
    let mut ltc1 = ok("the ltc upstream", ltc.next_conn(T).await);
    ok("the ltc login", ltc1.answer_login(T).await);
    ok("ltc sends a job", ltc1.notify("ltc-1", true).await);
    wait_job(&mut miner, "ltc-1").await;

    // Both old sservers answer now.
    let btc_sent = btc1
        .send(&json!({"id": submit50["id"], "result": true, "error": null}))
        .await;
    let bch_sent = bch1
        .send(&json!({"id": submit51["id"], "result": true, "error": null}))
        .await;
    let waited = wait_answers(&mut miner, &[json!(50), json!(51)], T).await;
    // A job after them: anything relayed for 50 or 51 came before it.
    ok("ltc sends a job", ltc1.notify("ltc-2", false).await);
    wait_job(&mut miner, "ltc-2").await;
    assert!(
        waited.is_ok(),
        "{}; btc's answer write: {btc_sent:?}, bch's: {bch_sent:?}; received: {:?}",
        waited.err().unwrap_or_default(),
        miner.received
    );
    for id in [50, 51] {
        let answer = assert_one_answer(&miner, json!(id));
        assert_eq!(answer["result"], json!(true), "{answer}");
    }
    assert_no_malformed(&miner);
}

/// SPEC §4: a switch back to the session's own coin while the new sserver is still opening
/// cancels the open: the half-open connection is closed, and no second connection to the
/// current sserver is opened (it would carry the same session ID twice).
#[tokio::test]
async fn switching_back_while_the_new_sserver_opens_cancels_the_open() {
    let btc = ScriptedSserver::start("btc").await;
    let bch = ScriptedSserver::start("bch").await;
    let n = node(&[&btc, &bch]).await;
    let mut miner = Miner::connect(n.proxy.addr).await.expect("connect");
    let mut btc1 = login(&mut miner, "alice.rig1", &btc).await;
    ok("btc sends a job", btc1.notify("btc-1", true).await);
    wait_job(&mut miner, "btc-1").await;

    switch(&n.control, "alice", "bch").await;
    let mut bch1 = ok("the bch upstream", bch.next_conn(T).await);
    ok("the bch login (held)", bch1.read_login(T).await);
    switch(&n.control, "alice", "btc").await;
    assert!(
        bch1.closed_within(T).await,
        "the proxy kept the cancelled bch connection open; bch saw: {}",
        bch1.history()
    );

    // The session still works on the first btc connection.
    miner
        .send(&submit(60, "alice.rig1", "btc-1"))
        .await
        .expect("submit 60 is sent");
    let at_btc = ok(
        "submit 60 at btc connection 1",
        btc1.recv_method("mining.submit", T).await,
    );
    ok("btc answers 60", btc1.reply(&at_btc, json!(true)).await);
    miner.answer(60, T).await.expect("60 answered");
    // The one fixed wait of this file: a negative condition ("no second btc connection")
    // cannot be awaited; 1 s is far longer than the proxy takes to connect on loopback.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        btc.accepted(),
        1,
        "a second btc connection was opened (the first stays in use)"
    );
    let answer = assert_one_answer(&miner, json!(60));
    assert_eq!(answer["result"], json!(true), "{answer}");
    assert_no_malformed(&miner);
}

/// SPEC §4: lines the miner sends while its upstream is lost reach the new one, not lost;
/// authorizes already sent to the lost upstream and never answered are sent again (however
/// many), each answered to the miner exactly once, and every worker that ends up authorized is
/// authorized again on a switch.
#[tokio::test]
async fn authorizes_in_flight_when_the_sserver_is_lost_are_not_lost() {
    const FIRST_ID: u64 = 100;
    const COUNT: u64 = 70;
    let btc = ScriptedSserver::start("btc").await;
    let bch = ScriptedSserver::start("bch").await;
    let n = node(&[&btc, &bch]).await;
    let mut miner = Miner::connect(n.proxy.addr).await.expect("connect");
    let mut btc1 = login(&mut miner, "alice.rig1", &btc).await;

    let workers: BTreeSet<String> = (2..2 + COUNT).map(|i| format!("alice.rig{i}")).collect();
    let mut burst = String::new();
    for i in 0..COUNT {
        let request = json!({"id": FIRST_ID + i, "method": "mining.authorize",
                             "params": [format!("alice.rig{}", i + 2), "x"]});
        burst.push_str(&format!("{request}\n"));
    }
    miner
        .send_raw(burst.as_bytes())
        .await
        .expect("the authorizes are sent");
    let mut at_btc1 = BTreeSet::new();
    while at_btc1.len() < workers.len() {
        let request = ok(
            "the authorizes at btc connection 1",
            btc1.recv_method("mining.authorize", T).await,
        );
        at_btc1.insert(
            request["params"][0]
                .as_str()
                .unwrap_or_default()
                .to_string(),
        );
    }
    assert_eq!(at_btc1, workers, "btc connection 1 got every authorize");
    // btc connection 1 never answers them: it is lost.
    drop(btc1);

    let mut btc2 = ok("btc connection 2 (the reconnect)", btc.next_conn(T).await);
    let seen = ok("the login on btc connection 2", btc2.answer_login(T).await);
    assert_eq!(seen.worker, "alice.rig1");
    let missing = authorizes_for(&mut btc2, &workers, T).await;
    assert!(
        missing.is_empty(),
        "btc connection 2 never received authorizes for {} of the {} workers in flight: \
         {missing:?}",
        missing.len(),
        workers.len()
    );
    let ids: Vec<Value> = (FIRST_ID..FIRST_ID + COUNT).map(|id| json!(id)).collect();
    if let Err(e) = wait_answers(&mut miner, &ids, T).await {
        panic!("{e}");
    }

    // One more worker, then a switch: bch must authorize all of them.
    miner
        .send(&json!({"id": 170, "method": "mining.authorize", "params": ["alice.rig72", "x"]}))
        .await
        .expect("rig72's authorize is sent");
    let rig72 = ok(
        "rig72's authorize at btc connection 2",
        btc2.recv_method("mining.authorize", T).await,
    );
    assert_eq!(rig72["params"][0], "alice.rig72", "{rig72}");
    ok("btc answers rig72", btc2.reply(&rig72, json!(true)).await);
    let answer = miner.answer(170, T).await.expect("rig72 answered");
    assert_eq!(answer["result"], json!(true), "{answer}");

    switch(&n.control, "alice", "bch").await;
    let mut bch1 = ok("the bch upstream", bch.next_conn(T).await);
    let seen = ok("the bch login", bch1.answer_login(T).await);
    let mut all: BTreeSet<String> = (1..=72).map(|i| format!("alice.rig{i}")).collect();
    all.remove(&seen.worker);
    let missing = authorizes_for(&mut bch1, &all, T).await;
    assert!(
        missing.is_empty(),
        "bch never received authorizes for {} workers: {missing:?}",
        missing.len()
    );
    ok("bch sends a job", bch1.notify("bch-1", true).await);
    wait_job(&mut miner, "bch-1").await;
    for id in (FIRST_ID..FIRST_ID + COUNT).chain([170]) {
        let answer = assert_one_answer(&miner, json!(id));
        assert_eq!(answer["result"], json!(true), "{answer}");
    }
    assert_no_malformed(&miner);
}

/// SPEC §4: old-coin notifications, ETHProxy work pushed as an `id:0` result included, never
/// reach the miner after the switch completes; the old sserver's answer to a share still does,
/// once.
#[tokio::test]
async fn ethproxy_work_from_the_old_coin_never_reaches_the_miner() {
    let etc = ScriptedSserver::start_with("etc", Dialect::Ethereum).await;
    let eth = ScriptedSserver::start_with("eth", Dialect::Ethereum).await;
    let n = node_with(
        &[("alice", "etc")],
        &["etc", "eth"],
        "ethereum",
        &[&etc, &eth],
    )
    .await;
    let work = |digit: char| format!("0x{}", digit.to_string().repeat(64));
    let (aaaa, bbbb, cccc) = (work('a'), work('b'), work('c'));

    let mut miner = Miner::connect(n.proxy.addr).await.expect("connect");
    miner
        .send(
            &json!({"id": 1, "jsonrpc": "2.0", "method": "eth_submitLogin",
                      "params": ["alice.rig1", "x"]}),
        )
        .await
        .expect("the login is sent");
    let mut etc1 = ok("the etc upstream", etc.next_conn(T).await);
    let seen = ok("the etc login", etc1.answer_login(T).await);
    assert_eq!(seen.protocol.as_deref(), Some("ETHProxy/1.0.0"), "{seen:?}");
    let answer = miner.answer(1, T).await.expect("the login answered");
    assert_eq!(answer["result"], json!(true), "{answer}");
    ok("etc pushes work", etc1.eth_push_work(&aaaa).await);
    let is_work = |header: &str| {
        let header = header.to_string();
        move |v: &Value| v["id"] == json!(0) && v["result"][0] == json!(header)
    };
    miner
        .wait_for("the etc work", T, is_work(&aaaa))
        .await
        .expect("the etc work reaches the miner");
    miner
        .send(
            &json!({"id": 4, "jsonrpc": "2.0", "method": "eth_submitWork",
                      "params": ["0x0000000000000001", aaaa, format!("0x{}", "d".repeat(64))]}),
        )
        .await
        .expect("the share is sent");
    let share = ok(
        "the share at etc (held)",
        etc1.recv_method("eth_submitWork", T).await,
    );

    switch(&n.control, "alice", "eth").await;
    let mut eth1 = ok("the eth upstream", eth.next_conn(T).await);
    ok("the eth login", eth1.answer_login(T).await);
    ok("eth pushes work", eth1.eth_push_work(&bbbb).await);
    miner
        .wait_for("the eth work", T, is_work(&bbbb))
        .await
        .expect("the eth work reaches the miner");

    // The old sserver pushes new work, then answers the share.
    let pushed = etc1.eth_push_work(&cccc).await;
    let answered = etc1
        .send(&json!({"id": share["id"], "jsonrpc": "2.0", "result": true}))
        .await;
    let waited = wait_answers(&mut miner, &[json!(4)], T).await;
    let after_bbbb: Vec<&Value> = miner
        .received
        .iter()
        .skip_while(|v| v["result"][0] != json!(bbbb))
        .collect();
    assert!(
        !after_bbbb.iter().any(|v| v["result"][0] == json!(cccc)),
        "the old coin's work {cccc} reached the miner after the switch: {after_bbbb:?}"
    );
    assert!(
        waited.is_ok(),
        "{}; etc's writes: {pushed:?}, {answered:?}; received: {:?}",
        waited.err().unwrap_or_default(),
        miner.received
    );
    let answer = assert_one_answer(&miner, json!(4));
    assert_eq!(answer["result"], json!(true), "{answer}");
    assert_no_malformed(&miner);
}

/// SPEC §4: shares go to the coin of their job. After a switch, a share of an old-coin job
/// goes to the old sserver (still open while its jobs can be submitted), a share of a new-coin
/// job to the new one; each is answered once.
#[tokio::test]
async fn shares_go_to_the_sserver_of_their_job() {
    let control = control(&[("alice", "btc")], &[]).await;
    let btc = Sserver::start(SserverConfig::new("btc").job_interval(None))
        .await
        .expect("btc");
    let bch = Sserver::start(SserverConfig::new("bch").job_interval(None))
        .await
        .expect("bch");
    let config = proxy_config(&[control.addr], &[&btc, &bch]).expect("config");
    let proxy = ProxyProcess::start(&config).await.expect("proxy");
    let mut miner = Miner::connect(proxy.addr).await.expect("connect");
    miner.bitcoin_login("alice.rig1", T).await.expect("login");
    let btc_job = miner.wait_job_of("btc", T).await.expect("a btc job")["params"][0]
        .as_str()
        .unwrap_or_default()
        .to_string();
    switch(&control, "alice", "bch").await;
    let bch_job = miner.wait_job_of("bch", T).await.expect("a bch job")["params"][0]
        .as_str()
        .unwrap_or_default()
        .to_string();

    miner
        .send(&submit(61, "alice.rig1", &btc_job))
        .await
        .expect("the btc share is sent");
    let answer = miner.answer(61, T).await.expect("the btc share answered");
    let (at_btc, at_bch) = (btc.records(), bch.records());
    assert!(
        at_btc.submits.iter().any(|s| s.job_id == btc_job),
        "the share of {btc_job} did not reach btc; btc: {}; bch: {}",
        at_btc.summary(),
        at_bch.summary()
    );
    assert!(
        !at_bch.submits.iter().any(|s| s.job_id == btc_job),
        "the share of {btc_job} reached bch: {}",
        at_bch.summary()
    );
    assert_eq!(answer["result"], json!(true), "{answer}");

    miner
        .send(&submit(62, "alice.rig1", &bch_job))
        .await
        .expect("the bch share is sent");
    let answer = miner.answer(62, T).await.expect("the bch share answered");
    assert_eq!(answer["result"], json!(true), "{answer}");
    assert!(
        bch.records().submits.iter().any(|s| s.job_id == bch_job),
        "the share of {bch_job} did not reach bch: {}",
        bch.records().summary()
    );
    // A job after the answers: anything else relayed for 61 or 62 came before it.
    let next = bch.new_job();
    wait_job(&mut miner, &next).await;
    assert_one_answer(&miner, json!(61));
    assert_one_answer(&miner, json!(62));
    assert_no_malformed(&miner);
}

/// Sends `{"id":1}` subscribe and waits for the proxy's answer.
async fn subscribe(miner: &mut Miner) {
    miner
        .send(&json!({"id": 1, "method": "mining.subscribe", "params": ["cgminer/4.10"]}))
        .await
        .expect("the subscribe is sent");
    miner.answer(1, T).await.expect("the subscribe answered");
}

/// Whether `request` came after the login's auth on `conn`.
fn after_auth(conn: &ScriptedConn, request: &Value) -> bool {
    let position = |wanted: &Value| conn.lines.iter().position(|l| l == wanted);
    let auth = conn.lines.iter().position(|l| l["id"] == "auth");
    matches!((auth, position(request)), (Some(a), Some(r)) if a < r)
}

/// SPEC §1: `mining.suggest_difficulty` is held and sent to the upstream right after its
/// login, and again to every new upstream on a switch; only the first upstream's answer
/// reaches the miner.
#[tokio::test]
async fn suggest_difficulty_reaches_every_upstream_after_its_login() {
    let btc = ScriptedSserver::start("btc").await;
    let bch = ScriptedSserver::start("bch").await;
    let n = node(&[&btc, &bch]).await;
    let mut miner = Miner::connect(n.proxy.addr).await.expect("connect");
    subscribe(&mut miner).await;
    miner
        .send(&json!({"id": 3, "method": "mining.suggest_difficulty", "params": [512]}))
        .await
        .expect("the suggestion is sent");
    miner
        .send(&json!({"id": 4, "method": "mining.authorize", "params": ["alice.rig1", "x"]}))
        .await
        .expect("the authorize is sent");
    let mut btc1 = ok("the btc upstream", btc.next_conn(T).await);
    ok("the btc login", btc1.answer_login(T).await);
    let suggestion = ok(
        "the suggestion at btc",
        btc1.recv_method("mining.suggest_difficulty", T).await,
    );
    assert_eq!(suggestion["params"], json!([512]), "{suggestion}");
    assert!(
        after_auth(&btc1, &suggestion),
        "after the auth: {}",
        btc1.history()
    );
    if !suggestion["id"].is_null() {
        ok("btc answers it", btc1.reply(&suggestion, json!(true)).await);
    }
    let answer = miner.answer(4, T).await.expect("the authorize answered");
    assert_eq!(answer["result"], json!(true), "{answer}");

    switch(&n.control, "alice", "bch").await;
    let mut bch1 = ok("the bch upstream", bch.next_conn(T).await);
    ok("the bch login", bch1.answer_login(T).await);
    let again = ok(
        "the suggestion at bch",
        bch1.recv_method("mining.suggest_difficulty", T).await,
    );
    assert_eq!(again["params"], json!([512]), "{again}");
    assert!(
        after_auth(&bch1, &again),
        "after the auth: {}",
        bch1.history()
    );
    if !again["id"].is_null() {
        ok("bch answers it", bch1.reply(&again, json!(true)).await);
    }
    ok("bch sends a job", bch1.notify("bch-1", true).await);
    wait_job(&mut miner, "bch-1").await;
    assert!(
        answers_to(&miner, &json!(3)).len() <= 1,
        "at most one answer to the suggestion: {:?}",
        miner.received
    );
    assert_one_answer(&miner, json!(4));
    assert_no_malformed(&miner);
}

/// SPEC §1: `mining.extranonce.subscribe` is answered `true` by the proxy at once, even before
/// the upstream's login completes.
#[tokio::test]
async fn extranonce_subscribe_is_answered() {
    let btc = ScriptedSserver::start("btc").await;
    let n = node(&[&btc]).await;
    let mut miner = Miner::connect(n.proxy.addr).await.expect("connect");
    subscribe(&mut miner).await;
    miner
        .send(&json!({"id": 3, "method": "mining.extranonce.subscribe", "params": []}))
        .await
        .expect("the extranonce subscribe is sent");
    miner
        .send(&json!({"id": 4, "method": "mining.authorize", "params": ["alice.rig1", "x"]}))
        .await
        .expect("the authorize is sent");
    let mut btc1 = ok("the btc upstream", btc.next_conn(T).await);
    let seen = ok("the btc login (held)", btc1.read_login(T).await);
    let answer = miner.answer(3, T).await.unwrap_or_else(|e| {
        panic!(
            "mining.extranonce.subscribe was not answered while the login was held: {e}; \
             received: {:?}",
            miner.received
        )
    });
    assert_eq!(answer["result"], json!(true), "{answer}");
    ok("btc answers the login", btc1.finish_login(&seen).await);
    let answer = miner.answer(4, T).await.expect("the authorize answered");
    assert_eq!(answer["result"], json!(true), "{answer}");
    ok("btc sends a job", btc1.notify("btc-1", true).await);
    wait_job(&mut miner, "btc-1").await;
    assert_one_answer(&miner, json!(3));
    assert_one_answer(&miner, json!(4));
    assert_no_malformed(&miner);
}

/// SPEC §1 / BIP 310: every `mining.configure` is answered, with a result key for each
/// extension asked for; version rolling is granted with a mask within the miner's.
#[tokio::test]
async fn configure_with_other_extensions_gets_a_bip310_answer() {
    let btc = ScriptedSserver::start("btc").await;
    let n = node(&[&btc]).await;
    let mut miner = Miner::connect(n.proxy.addr).await.expect("connect");
    let extensions = [
        "version-rolling",
        "minimum-difficulty",
        "subscribe-extranonce",
        "info",
    ];
    miner
        .send(&json!({"id": 1, "method": "mining.configure", "params": [
            extensions,
            {"version-rolling.mask": "ffffffff", "version-rolling.min-bit-count": 2,
             "minimum-difficulty.value": 2048, "info.connection-url": "x"}]}))
        .await
        .expect("the configure is sent");
    let answer = miner.answer(1, T).await.expect("the configure answered");
    let result = answer["result"].as_object().cloned().unwrap_or_default();
    let missing: Vec<&str> = extensions
        .iter()
        .copied()
        .filter(|e| !result.contains_key(*e))
        .collect();
    assert!(
        missing.is_empty(),
        "no answer for the extensions {missing:?}: {answer}"
    );
    assert_eq!(result["version-rolling"], json!(true), "{answer}");
    // The mask the miner asked for is ffffffff: any 8-digit mask is within it.
    let mask = result
        .get("version-rolling.mask")
        .and_then(Value::as_str)
        .filter(|m| m.len() == 8)
        .and_then(|m| u64::from_str_radix(m, 16).ok());
    assert!(
        mask.is_some_and(|m| m <= 0xffff_ffff),
        "a mask within ffffffff: {answer}"
    );

    // The session goes on as usual.
    miner
        .send(&json!({"id": 2, "method": "mining.subscribe", "params": ["cgminer/4.10"]}))
        .await
        .expect("the subscribe is sent");
    miner.answer(2, T).await.expect("the subscribe answered");
    miner
        .send(&json!({"id": 3, "method": "mining.authorize", "params": ["alice.rig1", "x"]}))
        .await
        .expect("the authorize is sent");
    let mut btc1 = ok("the btc upstream", btc.next_conn(T).await);
    let seen = ok("the btc login", btc1.answer_login(T).await);
    assert!(
        seen.configure.is_some(),
        "version rolling asked upstream: {seen:?}"
    );
    let answer = miner.answer(3, T).await.expect("the authorize answered");
    assert_eq!(answer["result"], json!(true), "{answer}");
    assert_one_answer(&miner, json!(1));
    assert_no_malformed(&miner);
}

/// SPEC §1: any other request with an id sent during the handshake is held, relayed to the
/// upstream after its login, and its answer reaches the miner under the miner's id.
#[tokio::test]
async fn a_request_with_an_id_in_the_handshake_is_held_and_relayed() {
    let btc = ScriptedSserver::start("btc").await;
    let n = node(&[&btc]).await;
    let mut miner = Miner::connect(n.proxy.addr).await.expect("connect");
    subscribe(&mut miner).await;
    miner
        .send(&json!({"id": 9, "method": "mining.get_transactions", "params": []}))
        .await
        .expect("the request is sent");
    miner
        .send(&json!({"id": 4, "method": "mining.authorize", "params": ["alice.rig1", "x"]}))
        .await
        .expect("the authorize is sent");
    let mut btc1 = ok("the btc upstream", btc.next_conn(T).await);
    ok("the btc login", btc1.answer_login(T).await);
    let request = ok(
        "mining.get_transactions at btc",
        btc1.recv_method("mining.get_transactions", T).await,
    );
    assert!(
        after_auth(&btc1, &request),
        "after the auth: {}",
        btc1.history()
    );
    ok(
        "btc answers it",
        btc1.reply(&request, json!(["deadbeef"])).await,
    );
    let answer = miner.answer(9, T).await.expect("the request answered");
    assert_eq!(answer["result"], json!(["deadbeef"]), "{answer}");
    ok("btc sends a job", btc1.notify("btc-1", true).await);
    wait_job(&mut miner, "btc-1").await;
    assert_one_answer(&miner, json!(9));
    assert_one_answer(&miner, json!(4));
    assert_no_malformed(&miner);
}
