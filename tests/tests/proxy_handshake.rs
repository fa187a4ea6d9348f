//! The miner side of the proxy's handshake (SPEC §1, §2, §3; issue 5), end to end: a control
//! service (embedded store), the proxy (the real `switchyard-proxy` binary for the bitcoin
//! tests, the library in-process for decred and ethereum), simulated sservers and miners over
//! real TCP.
//!
//! - bitcoin: the subscribe answer and its session ID, `mining.configure` with and without a
//!   mask, `mining.set_version_mask` after the authorize answer, what the sserver receives
//!   (subscribe params, the normalized worker), the suffix retry, an sserver echoing another
//!   session ID, an sserver refusing version rolling, and every error code of SPEC §1 in its
//!   JSON-RPC 1.0 form;
//! - decred-normal and decred-gominer: the session ID texts, with sservers of the same dialect;
//! - ethereum: ETHProxy (wallet address, `worker` field, JSON-RPC 2.0 answers and errors),
//!   plain Ethereum Stratum, EthereumStratum/1.0.0 (also for a BTCAgent) and NiceHash's short
//!   extranonce.

use std::time::Duration;

use serde_json::{Value, json};
use switchyard_proto::v1::SwitchCoinRequest;
use switchyard_tests::{
    control::InProcessControl,
    miner::Miner,
    proxy::{InProcessProxy, ProxyProcess, proxy_config},
    sserver::{Dialect, Records, Sserver, SserverConfig, Subscribe},
};
use tokio::net::TcpSocket;

/// How long any one condition may take.
const T: Duration = Duration::from_secs(15);

/// 127.0.0.1 as an unsigned 32-bit integer: the CLIENT_IP the sserver must receive.
const LOCALHOST_IP: u32 = 2_130_706_433;

/// A 42-character Ethereum wallet address.
const WALLET: &str = "0x52bc44d5378309EE2abF1539BF71dE1b7d7bE3b5";

/// Puts each user on its coin through SwitcherAdmin SwitchCoin (creating the user).
async fn set_coins(control: &InProcessControl, users: &[(&str, &str)]) {
    for (user, coin) in users {
        control
            .admin()
            .switch_coin(SwitchCoinRequest {
                user: (*user).into(),
                coin: (*coin).into(),
            })
            .await
            .unwrap_or_else(|e| panic!("switch {user} to {coin}: {e}"));
    }
}

/// A JSON-RPC 1.0 error answer of the proxy.
fn error_v1(id: u64, code: i64, message: &str, server_id: u8) -> Value {
    json!({"id": id, "result": null, "error": [code, message, server_id]})
}

/// A JSON-RPC 1.0 success answer.
fn ok_v1(id: u64, result: Value) -> Value {
    json!({"id": id, "result": result, "error": null})
}

/// The bitcoin-like subscribe result for the SID text `sid`.
fn subscribe_result(sid: &str) -> Value {
    json!([
        [["mining.set_difficulty", sid], ["mining.notify", sid]],
        sid,
        8
    ])
}

fn is_hex(text: &str, digits: usize) -> bool {
    text.len() == digits && text.bytes().all(|b| b.is_ascii_hexdigit())
}

/// The subscribe the sserver received on the connection where `worker` was accepted.
async fn subscribe_of(sserver: &Sserver, worker: &str) -> (Subscribe, Records) {
    let records = sserver
        .wait_for(T, &format!("{worker} accepted"), |r| {
            r.authorizes
                .iter()
                .any(|a| a.worker == worker && a.accepted)
        })
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let conn = records
        .authorizes
        .iter()
        .find(|a| a.worker == worker && a.accepted)
        .map(|a| a.conn)
        .unwrap_or_else(|| panic!("{worker} accepted: {}", records.summary()));
    let subscribe = records
        .subscribes
        .iter()
        .find(|s| s.conn == conn)
        .cloned()
        .unwrap_or_else(|| panic!("a subscribe on conn {conn}: {}", records.summary()));
    (subscribe, records)
}

/// Sends a request and returns the next line, which must be its answer (the proxy answers
/// handshake requests itself, in order, with nothing in between).
async fn ask(miner: &mut Miner, method: &str, params: Value) -> (u64, Value) {
    let id = miner
        .request(method, params.clone())
        .await
        .unwrap_or_else(|e| panic!("send {method} {params}: {e}"));
    let answer = miner
        .recv(T)
        .await
        .unwrap_or_else(|e| panic!("the answer to {method} {params}: {e}"));
    assert_eq!(
        answer["id"],
        json!(id),
        "answer to {method} {params}: {answer}"
    );
    (id, answer)
}

/// A loopback port that refuses connections: bound, never listening (held while the guard
/// lives, so nobody else takes it).
fn refusing_port() -> (TcpSocket, String) {
    let socket = TcpSocket::new_v4().expect("socket");
    socket
        .bind("127.0.0.1:0".parse().expect("addr"))
        .expect("bind");
    let addr = socket.local_addr().expect("local addr").to_string();
    (socket, addr)
}

#[tokio::test]
async fn bitcoin_subscribe_configure_and_login_through_the_proxy_binary() {
    const SERVER_ID: u8 = 0x2a;
    let control = InProcessControl::start().await.expect("control");
    set_coins(
        &control,
        &[("alice", "btc"), ("bob", "btc"), ("dave", "bch")],
    )
    .await;
    let btc = Sserver::start(
        SserverConfig::new("btc")
            .known_users(["alice"])
            .suffixed_users(["bob"])
            .version_mask(Some(0x1fff_e000))
            .job_interval(None),
    )
    .await
    .expect("btc sserver");
    let bch = Sserver::start(SserverConfig::new("bch").wrong_sid(true).job_interval(None))
        .await
        .expect("bch sserver");
    let mut config = proxy_config(&[control.addr], &[&btc, &bch]).expect("config");
    config["ServerID"] = json!(SERVER_ID);
    let proxy = ProxyProcess::start(&config).await.expect("proxy binary");

    // alice: configure with a mask (before subscribe), subscribe, authorize "alice.rig#1".
    let mut alice = Miner::connect(proxy.addr).await.expect("connect");
    let (_, configured) = ask(
        &mut alice,
        "mining.configure",
        json!([["version-rolling"], {"version-rolling.mask": "00fff000",
                                     "version-rolling.min-bit-count": 2}]),
    )
    .await;
    assert_eq!(
        configured,
        ok_v1(
            1,
            json!({"version-rolling": true, "version-rolling.mask": "00fff000"})
        ),
        "the provisional configure answer"
    );
    let (sub_id, subscribed) = ask(&mut alice, "mining.subscribe", json!(["cgminer/4.10.0"])).await;
    let sid = subscribed["result"][1]
        .as_str()
        .unwrap_or_else(|| panic!("a SID in {subscribed}"))
        .to_string();
    assert!(is_hex(&sid, 8), "SID {sid:?} is 8 hex digits");
    assert_eq!(
        &sid[..2],
        "2a",
        "the SID's top byte is the server ID: {sid}"
    );
    assert_eq!(
        sid, "2a000080",
        "the first session gets index 128 under server ID 42"
    );
    assert_eq!(subscribed, ok_v1(sub_id, subscribe_result(&sid)));

    let start = alice.received.len();
    let auth_id = alice
        .request("mining.authorize", json!(["alice.rig#1", "x"]))
        .await
        .expect("authorize");
    alice
        .wait_job_of("btc", T)
        .await
        .unwrap_or_else(|e| panic!("alice's first job: {e}\n{}", proxy.log()));
    let after: Vec<Value> = alice.received[start..].to_vec();
    assert_eq!(
        after[0],
        ok_v1(auth_id, json!(true)),
        "the authorize answer comes first: {after:?}"
    );
    let mask_at = after
        .iter()
        .position(|v| v["method"] == "mining.set_version_mask")
        .unwrap_or_else(|| panic!("a mining.set_version_mask after the authorize: {after:?}"));
    assert_eq!(
        after[mask_at],
        json!({"id": null, "method": "mining.set_version_mask", "params": ["00ffe000"]}),
        "sserver's allowed 1fffe000 & the miner's 00fff000"
    );
    assert_eq!(
        after
            .iter()
            .filter(|v| v["method"] == "mining.set_version_mask")
            .count(),
        1,
        "{after:?}"
    );
    assert!(
        after.iter().any(|v| v["method"] == "mining.set_difficulty"),
        "the difficulty the sserver sent during the handshake reaches the miner: {after:?}"
    );

    let (subscribe, records) = subscribe_of(&btc, "alice.rig1").await;
    assert_eq!(
        subscribe.params,
        json!(["cgminer/4.10.0", sid, LOCALHOST_IP]),
        "sserver subscribe params [agent, SIDHEX, CLIENT_IP]"
    );
    assert_eq!(subscribe.answered_sid, sid);
    let configure = records
        .configures
        .iter()
        .find(|c| c.conn == subscribe.conn)
        .unwrap_or_else(|| panic!("a configure on alice's upstream: {}", records.summary()));
    assert_eq!(configure.mask.as_deref(), Some("00fff000"));
    assert!(
        !records.authorizes.iter().any(|a| a.worker.contains('#')),
        "the sserver never sees the raw worker name: {}",
        records.summary()
    );

    // bob: configure without a mask, subscribe without an agent, the suffix retry.
    let mut bob = Miner::connect(proxy.addr).await.expect("connect");
    let (configure_id, configured) = ask(
        &mut bob,
        "mining.configure",
        json!([["minimum-difficulty"], {"minimum-difficulty.value": 2048}]),
    )
    .await;
    assert_eq!(
        configured,
        ok_v1(configure_id, json!({"minimum-difficulty": false})),
        "configure without a mask: BIP 310 answers every extension asked for"
    );
    let (sub_id, subscribed) = ask(&mut bob, "mining.subscribe", json!([])).await;
    let bob_sid = subscribed["result"][1].as_str().unwrap_or("").to_string();
    assert!(
        is_hex(&bob_sid, 8) && bob_sid.starts_with("2a"),
        "{subscribed}"
    );
    assert_ne!(bob_sid, sid, "two live sessions never share a SID");
    assert_eq!(subscribed, ok_v1(sub_id, subscribe_result(&bob_sid)));
    let start = bob.received.len();
    let auth_id = bob
        .request("mining.authorize", json!(["bob.rig", "x"]))
        .await
        .expect("authorize");
    bob.wait_job_of("btc", T)
        .await
        .unwrap_or_else(|e| panic!("bob's first job: {e}\n{}", proxy.log()));
    let after: Vec<Value> = bob.received[start..].to_vec();
    assert_eq!(
        after[0],
        ok_v1(auth_id, json!(true)),
        "the suffixed retry's success is bob's answer: {after:?}"
    );
    assert!(
        !after
            .iter()
            .any(|v| v["method"] == "mining.set_version_mask"),
        "no version mask without a configure mask: {after:?}"
    );
    let (subscribe, records) = subscribe_of(&btc, "bob_btc.rig").await;
    assert_eq!(
        subscribe.params,
        json!(["stratumSwitcher", bob_sid, LOCALHOST_IP]),
        "the default agent"
    );
    let on_conn: Vec<(&str, bool)> = records
        .authorizes
        .iter()
        .filter(|a| a.conn == subscribe.conn)
        .map(|a| (a.worker.as_str(), a.accepted))
        .collect();
    assert_eq!(on_conn, [("bob.rig", false), ("bob_btc.rig", true)]);
    assert!(
        !records.configures.iter().any(|c| c.conn == subscribe.conn),
        "no configure upstream for a miner without a mask: {}",
        records.summary()
    );

    // dave: his coin's sserver echoes another SID: the session is closed, unanswered.
    let mut dave = Miner::connect(proxy.addr).await.expect("connect");
    let (_, subscribed) = ask(&mut dave, "mining.subscribe", json!(["cgminer/4.10.0"])).await;
    let dave_sid = subscribed["result"][1].as_str().unwrap_or("").to_string();
    let auth_id = dave
        .request("mining.authorize", json!(["dave.rig1", "x"]))
        .await
        .expect("authorize");
    assert!(
        dave.closed_within(T).await,
        "a session whose sserver echoes another SID is closed; got {:?}\n{}",
        dave.received,
        proxy.log()
    );
    assert!(
        !dave
            .received
            .iter()
            .any(|v| v["id"] == json!(auth_id) && v["result"] == json!(true)),
        "no success answer: {:?}",
        dave.received
    );
    let records = bch.records();
    let seen = records
        .subscribes
        .iter()
        .find(|s| s.sid.as_deref() == Some(dave_sid.as_str()))
        .unwrap_or_else(|| panic!("bch saw dave's SID {dave_sid}: {}", records.summary()));
    assert_ne!(seen.answered_sid, dave_sid);
    let mismatches = proxy
        .metric("switchyard_proxy_handshakes_total{outcome=\"failed\",reason=\"sid_mismatch\"}")
        .await
        .expect("metrics");
    assert_eq!(
        mismatches,
        1.0,
        "{}",
        proxy.metrics().await.unwrap_or_default()
    );

    // The good sessions are still up.
    for (miner, worker) in [(&mut alice, "alice.rig1"), (&mut bob, "bob.rig")] {
        let id = miner
            .request("mining.submit", json!([worker, "btc-1", "00", "00", "00"]))
            .await
            .expect("submit");
        let answer = miner.answer(id, T).await.expect("submit answer");
        assert_eq!(answer["result"], json!(true), "{worker}: {answer}");
        assert!(miner.malformed.is_empty(), "{:?}", miner.malformed);
    }
}

#[tokio::test]
async fn bitcoin_error_codes_through_the_proxy_binary() {
    const SERVER_ID: u8 = 0xc3;
    let control = InProcessControl::start().await.expect("control");
    set_coins(
        &control,
        &[("alice", "btc"), ("erin", "ltc"), ("frank", "bch")],
    )
    .await;
    let btc = Sserver::start(SserverConfig::new("btc").job_interval(None))
        .await
        .expect("btc sserver");
    let (_reserved, dead_addr) = refusing_port();
    let mut config = proxy_config(&[control.addr], &[&btc]).expect("config");
    config["ServerID"] = json!(SERVER_ID);
    // bch's sserver cannot be reached; ltc (an available coin) has none at all.
    config["StratumServerMap"]["bch"] = json!({"URL": dead_addr, "UserSuffix": "bch"});
    let proxy = ProxyProcess::start(&config).await.expect("proxy binary");

    // 101, 103, 102, 103, 104, 105 on one connection, which stays usable; a line that is
    // not JSON is ignored (`ask` checks that the next line answers the next request).
    let mut miner = Miner::connect(proxy.addr).await.expect("connect");
    miner.send_raw(b"{not json\n").await.expect("send");
    let (id, answer) = ask(&mut miner, "mining.authorize", json!(["alice.rig1", "x"])).await;
    assert_eq!(answer, error_v1(id, 101, "Need Subscribed", SERVER_ID));
    let (id, answer) = ask(&mut miner, "mining.configure", json!([["version-rolling"]])).await;
    assert_eq!(answer, error_v1(id, 103, "Too Few Params", SERVER_ID));
    let (id, answer) = ask(&mut miner, "mining.subscribe", json!(["cgminer/4.10.0"])).await;
    let sid = answer["result"][1].as_str().unwrap_or("").to_string();
    assert!(is_hex(&sid, 8) && sid.starts_with("c3"), "{answer}");
    assert_eq!(answer, ok_v1(id, subscribe_result(&sid)));
    let (id, answer) = ask(&mut miner, "mining.subscribe", json!(["cgminer/4.10.0"])).await;
    assert_eq!(answer, error_v1(id, 102, "Duplicate Subscribed", SERVER_ID));
    let (id, answer) = ask(&mut miner, "mining.authorize", json!([])).await;
    assert_eq!(answer, error_v1(id, 103, "Too Few Params", SERVER_ID));
    let (id, answer) = ask(&mut miner, "mining.authorize", json!([5, "x"])).await;
    assert_eq!(
        answer,
        error_v1(id, 104, "Worker Name Must be a String", SERVER_ID)
    );
    let (id, answer) = ask(&mut miner, "mining.authorize", json!([".rig", "x"])).await;
    assert_eq!(
        answer,
        error_v1(id, 105, "Sub-account Name Cannot be Empty", SERVER_ID)
    );
    let id = miner
        .request("mining.authorize", json!(["alice.rig1", "x"]))
        .await
        .expect("authorize");
    let answer = miner
        .answer(id, T)
        .await
        .unwrap_or_else(|e| panic!("alice's login after the refusals: {e}\n{}", proxy.log()));
    assert_eq!(answer, ok_v1(id, json!(true)));
    subscribe_of(&btc, "alice.rig1").await;

    // 201: unknown user, auto-registration off: answered on the authorize id, then closed.
    let mut mallory = Miner::connect(proxy.addr).await.expect("connect");
    ask(&mut mallory, "mining.subscribe", json!(["cgminer/4.10.0"])).await;
    let (id, answer) = ask(
        &mut mallory,
        "mining.authorize",
        json!(["mallory.rig", "x"]),
    )
    .await;
    assert_eq!(
        answer,
        error_v1(id, 201, "Invalid Sub-account Name", SERVER_ID)
    );
    assert!(
        mallory.closed_within(T).await,
        "closed after 201; got {:?}",
        mallory.received
    );

    // 301: the user's coin has no sserver in StratumServerMap.
    let mut erin = Miner::connect(proxy.addr).await.expect("connect");
    ask(&mut erin, "mining.subscribe", json!(["cgminer/4.10.0"])).await;
    let (id, answer) = ask(&mut erin, "mining.authorize", json!(["erin.rig", "x"])).await;
    assert_eq!(
        answer,
        error_v1(id, 301, "Stratum Server Not Found", SERVER_ID)
    );

    // 302: the coin's sserver refuses connections.
    let mut frank = Miner::connect(proxy.addr).await.expect("connect");
    ask(&mut frank, "mining.subscribe", json!(["cgminer/4.10.0"])).await;
    let (id, answer) = ask(&mut frank, "mining.authorize", json!(["frank.rig", "x"])).await;
    assert_eq!(
        answer,
        error_v1(id, 302, "Connect Stratum Server Failed", SERVER_ID),
        "{}",
        proxy.log()
    );

    let records = btc.records();
    assert!(
        records.authorizes.iter().all(|a| a.worker == "alice.rig1"),
        "no refused login reached an sserver: {}",
        records.summary()
    );
    for miner in [&miner, &mallory, &erin, &frank] {
        assert!(miner.malformed.is_empty(), "{:?}", miner.malformed);
    }
}

/// A decred proxy of `chain` and a `dialect` sserver: the miner gets the SID text of
/// `text(sid)`, the sserver the big-endian SIDHEX, and the login succeeds.
async fn decred_login(chain: &str, dialect: Dialect, server_id: u8, text: fn(u32) -> String) {
    let control = InProcessControl::start().await.expect("control");
    set_coins(&control, &[("alice", "btc")]).await;
    let btc = Sserver::start(
        SserverConfig::new("btc")
            .dialect(dialect)
            .job_interval(None),
    )
    .await
    .expect("sserver");
    let mut config = proxy_config(&[control.addr], &[&btc]).expect("config");
    config["ServerID"] = json!(server_id);
    config["ChainType"] = json!(chain);
    let proxy = InProcessProxy::start(&config).await.expect("proxy");

    let mut miner = Miner::connect(proxy.addr()).await.expect("connect");
    let (sub, auth) = miner
        .bitcoin_login("alice.rig1", T)
        .await
        .unwrap_or_else(|e| panic!("{chain} login: {e}"));
    assert_eq!(auth, ok_v1(2, json!(true)), "{chain}: the login succeeds");
    let miner_sid = sub["result"][1].as_str().unwrap_or("").to_string();
    assert_eq!(sub, ok_v1(1, subscribe_result(&miner_sid)), "{chain}");

    let (subscribe, _) = subscribe_of(&btc, "alice.rig1").await;
    let sidhex = subscribe.sid.clone().unwrap_or_default();
    assert!(is_hex(&sidhex, 8), "{chain}: SIDHEX {sidhex:?}");
    let value = u32::from_str_radix(&sidhex, 16).expect("hex");
    assert_eq!(
        value >> 24,
        u32::from(server_id),
        "{chain}: top byte {sidhex}"
    );
    assert_eq!(value & 0x00ff_ffff, 128, "{chain}: the first index is 128");
    assert_eq!(miner_sid, text(value), "{chain}: the miner's SID text");
    assert_eq!(
        subscribe.answered_sid, miner_sid,
        "{chain}: the sserver's echo"
    );
    assert_eq!(
        subscribe.params,
        json!(["cgminer/4.10", sidhex, LOCALHOST_IP]),
        "{chain}"
    );
    miner.wait_job_of("btc", T).await.expect("a job");
    assert!(miner.malformed.is_empty(), "{:?}", miner.malformed);
}

#[tokio::test]
async fn decred_normal_sid_text_and_login() {
    decred_login("decred-normal", Dialect::DecredNormal, 0x11, |sid| {
        format!("0000000000000000{:08x}", sid.swap_bytes())
    })
    .await;
}

#[tokio::test]
async fn decred_gominer_sid_text_and_login() {
    decred_login("decred-gominer", Dialect::DecredGominer, 0x22, |sid| {
        format!("{:08x}", sid.swap_bytes())
    })
    .await;
}

/// Asserts an Ethereum SID text: 6 hex digits, the server ID in the first two.
fn assert_eth_sid(sid: &str, server_id: u8) {
    assert!(is_hex(sid, 6), "ethereum SID {sid:?} is 6 hex digits");
    assert_eq!(
        &sid[..2],
        format!("{server_id:02x}"),
        "server ID in bits 16..23: {sid}"
    );
}

#[tokio::test]
async fn ethereum_dialects() {
    const SERVER_ID: u8 = 5;
    let control = InProcessControl::start_with(|c| c.available_coins.push("eth".into()))
        .await
        .expect("control");
    set_coins(&control, &[("alice", "eth")]).await;
    let eth = Sserver::start(
        SserverConfig::new("eth")
            .dialect(Dialect::Ethereum)
            .known_users(["alice"])
            .job_interval(None),
    )
    .await
    .expect("sserver");
    let mut config = proxy_config(&[control.addr], &[&eth]).expect("config");
    config["ServerID"] = json!(SERVER_ID);
    config["ChainType"] = json!("ethereum");
    let proxy = InProcessProxy::start(&config).await.expect("proxy");
    let mut miners = Vec::new();

    // ETHProxy: eth_submitLogin, the wallet address dropped, the `worker` field appended;
    // JSON-RPC 2.0 answers.
    for (n, login, worker, expect) in [
        (1, format!("{WALLET}.alice.rig1"), None, "alice.rig1"),
        (2, "alice".to_string(), Some("rig#2"), "alice.rig2"),
        (3, format!("{WALLET}.alice"), Some("rig3"), "alice.rig3"),
    ] {
        let mut miner = Miner::connect(proxy.addr()).await.expect("connect");
        let mut request = json!({"id": n * 10, "jsonrpc": "2.0", "method": "eth_submitLogin",
                                 "params": [login, "x"]});
        if let Some(worker) = worker {
            request["worker"] = json!(worker);
        }
        miner.send(&request).await.expect("login");
        let answer = miner
            .recv(T)
            .await
            .unwrap_or_else(|e| panic!("answer to {request}: {e}"));
        assert_eq!(
            answer,
            json!({"id": n * 10, "jsonrpc": "2.0", "result": true}),
            "{request}"
        );
        let (subscribe, _) = subscribe_of(&eth, expect).await;
        let sid = subscribe.sid.clone().unwrap_or_default();
        assert_eth_sid(&sid, SERVER_ID);
        assert_eq!(
            subscribe.params,
            json!(["ETHProxy", "ETHProxy/1.0.0", sid, LOCALHOST_IP]),
            "{request}"
        );
        let records = eth.records();
        let method = records
            .authorizes
            .iter()
            .find(|a| a.conn == subscribe.conn)
            .map(|a| a.method.clone());
        assert_eq!(method.as_deref(), Some("eth_submitLogin"));
        miners.push(miner);
    }

    // ETHProxy errors in the JSON-RPC 2.0 form, data = the server ID.
    let mut nobody = Miner::connect(proxy.addr()).await.expect("connect");
    nobody
        .send(
            &json!({"id": 7, "jsonrpc": "2.0", "method": "eth_submitLogin",
                      "params": [format!("{WALLET}.nobody.rig"), "x"]}),
        )
        .await
        .expect("login");
    let answer = nobody.recv(T).await.expect("the error");
    assert_eq!(
        answer,
        json!({"id": 7, "jsonrpc": "2.0",
               "error": {"code": 201, "message": "Invalid Sub-account Name", "data": SERVER_ID}})
    );
    assert!(nobody.closed_within(T).await, "{:?}", nobody.received);
    let mut empty = Miner::connect(proxy.addr()).await.expect("connect");
    empty
        .send(
            &json!({"id": 8, "jsonrpc": "2.0", "method": "eth_submitLogin",
                      "params": [".rig", "x"]}),
        )
        .await
        .expect("login");
    assert_eq!(
        empty.recv(T).await.expect("the error"),
        json!({"id": 8, "jsonrpc": "2.0",
               "error": {"code": 105, "message": "Sub-account Name Cannot be Empty",
                         "data": SERVER_ID}})
    );

    // Plain Ethereum Stratum: subscribe answered `true`, then mining.authorize; the protocol
    // sent upstream defaults to "Stratum".
    let mut plain = Miner::connect(proxy.addr()).await.expect("connect");
    let (id, answer) = ask(&mut plain, "mining.subscribe", json!(["ethminer/0.19.0"])).await;
    assert_eq!(answer, ok_v1(id, json!(true)));
    let (id, answer) = ask(&mut plain, "mining.authorize", json!(["alice.rig4", "x"])).await;
    assert_eq!(answer, ok_v1(id, json!(true)));
    let (subscribe, _) = subscribe_of(&eth, "alice.rig4").await;
    let sid = subscribe.sid.clone().unwrap_or_default();
    assert_eth_sid(&sid, SERVER_ID);
    assert_eq!(
        subscribe.params,
        json!(["ethminer/0.19.0", "Stratum", sid, LOCALHOST_IP])
    );
    miners.push(plain);

    // EthereumStratum/1.0.0 (the protocol in any case), then NiceHash's 4-digit extranonce.
    for (agent, protocol, worker, nicehash) in [
        (
            "ethminer/0.19.0",
            "EthereumStratum/1.0.0",
            "alice.rig5",
            false,
        ),
        (
            "ethminer/0.19.0",
            "ethereumstratum/1.0.0",
            "alice.rig7",
            false,
        ),
        (
            "NiceHash/1.0.0",
            "EthereumStratum/1.0.0",
            "alice.rig6",
            true,
        ),
    ] {
        let mut miner = Miner::connect(proxy.addr()).await.expect("connect");
        let (id, answer) = ask(&mut miner, "mining.subscribe", json!([agent, protocol])).await;
        let sid = answer["result"][0][1].as_str().unwrap_or("").to_string();
        assert_eth_sid(&sid, SERVER_ID);
        let extranonce = if nicehash {
            sid[..4].to_string()
        } else {
            sid.clone()
        };
        assert_eq!(
            answer,
            ok_v1(
                id,
                json!([["mining.notify", sid, "EthereumStratum/1.0.0"], extranonce])
            ),
            "{agent} {protocol}"
        );
        let (id, answer) = ask(&mut miner, "mining.authorize", json!([worker, "x"])).await;
        assert_eq!(answer, ok_v1(id, json!(true)), "{agent} {protocol}");
        let (subscribe, _) = subscribe_of(&eth, worker).await;
        assert_eq!(
            subscribe.params,
            json!([agent, protocol, sid, LOCALHOST_IP]),
            "{agent} {protocol}"
        );
        assert_eq!(subscribe.answered_sid, sid);
        miners.push(miner);
    }

    // Every live session has its own SID.
    let records = eth.records();
    let mut sids: Vec<&str> = records
        .subscribes
        .iter()
        .filter_map(|s| s.sid.as_deref())
        .collect();
    let total = sids.len();
    sids.sort_unstable();
    sids.dedup();
    assert_eq!(sids.len(), total, "{}", records.summary());
    for miner in &miners {
        assert!(miner.malformed.is_empty(), "{:?}", miner.malformed);
    }
}

/// SPEC §2: `mining.set_version_mask` carries (the sserver's allowed mask & the miner's mask).
/// An sserver that refuses version rolling (`{"version-rolling":false}`, no
/// `mining.set_version_mask`) allows no bits, so the miner must be told `00000000`, not left
/// with the provisional mask the proxy granted before any upstream existed (its shares with
/// rolled versions would be rejected).
#[tokio::test]
async fn bitcoin_version_rolling_refused_by_the_sserver_gives_the_miner_an_empty_mask() {
    let control = InProcessControl::start().await.expect("control");
    set_coins(&control, &[("alice", "btc")]).await;
    let btc = Sserver::start(
        SserverConfig::new("btc")
            .version_mask(None)
            .job_interval(None),
    )
    .await
    .expect("sserver");
    let config = proxy_config(&[control.addr], &[&btc]).expect("config");
    let proxy = InProcessProxy::start(&config).await.expect("proxy");

    let mut miner = Miner::connect(proxy.addr()).await.expect("connect");
    let (id, configured) = ask(
        &mut miner,
        "mining.configure",
        json!([["version-rolling"], {"version-rolling.mask": "1fffe000"}]),
    )
    .await;
    assert_eq!(
        configured,
        ok_v1(
            id,
            json!({"version-rolling": true, "version-rolling.mask": "1fffe000"})
        ),
        "the provisional answer"
    );
    ask(&mut miner, "mining.subscribe", json!(["cgminer/4.10.0"])).await;
    let start = miner.received.len();
    let auth_id = miner
        .request("mining.authorize", json!(["alice.rig1", "x"]))
        .await
        .expect("authorize");
    miner.wait_job_of("btc", T).await.expect("a job");
    let after: Vec<Value> = miner.received[start..].to_vec();
    assert_eq!(after[0], ok_v1(auth_id, json!(true)), "{after:?}");
    let (subscribe, records) = subscribe_of(&btc, "alice.rig1").await;
    let configure = records
        .configures
        .iter()
        .find(|c| c.conn == subscribe.conn)
        .unwrap_or_else(|| panic!("the configure upstream: {}", records.summary()));
    assert_eq!(
        (
            configure.mask.as_deref(),
            configure.answered_mask.as_deref()
        ),
        (Some("1fffe000"), None),
        "the sserver was asked and refused"
    );
    let masks: Vec<&Value> = after
        .iter()
        .filter(|v| v["method"] == "mining.set_version_mask")
        .collect();
    assert_eq!(
        masks,
        [&json!({"id": null, "method": "mining.set_version_mask", "params": ["00000000"]})],
        "the sserver allows no version bits: {after:?}"
    );
}

/// SPEC §1/§2: a BTCAgent (`btccom-agent/...`) selects EthereumStratum/1.0.0 towards the miner,
/// and the subscribe sent to the sserver carries the miner's agent and the protocol the miner
/// gave, which defaults to `Stratum` (as the Go switcher sent: the sserver recognises the
/// BTCAgent by its agent).
#[tokio::test]
async fn ethereum_btcagent_subscribe_sends_the_default_protocol_upstream() {
    const SERVER_ID: u8 = 9;
    let control = InProcessControl::start_with(|c| c.available_coins.push("eth".into()))
        .await
        .expect("control");
    set_coins(&control, &[("alice", "eth")]).await;
    let eth = Sserver::start(
        SserverConfig::new("eth")
            .dialect(Dialect::Ethereum)
            .job_interval(None),
    )
    .await
    .expect("sserver");
    let mut config = proxy_config(&[control.addr], &[&eth]).expect("config");
    config["ServerID"] = json!(SERVER_ID);
    config["ChainType"] = json!("ethereum");
    let proxy = InProcessProxy::start(&config).await.expect("proxy");

    let mut miner = Miner::connect(proxy.addr()).await.expect("connect");
    let (id, answer) = ask(
        &mut miner,
        "mining.subscribe",
        json!(["btccom-agent/1.0.0"]),
    )
    .await;
    let sid = answer["result"][0][1].as_str().unwrap_or("").to_string();
    assert_eth_sid(&sid, SERVER_ID);
    assert_eq!(
        answer,
        ok_v1(
            id,
            json!([["mining.notify", sid, "EthereumStratum/1.0.0"], sid])
        ),
        "a BTCAgent gets the EthereumStratum/1.0.0 answer"
    );
    let (id, answer) = ask(&mut miner, "mining.authorize", json!(["alice.agent", "x"])).await;
    assert_eq!(answer, ok_v1(id, json!(true)));
    let (subscribe, _) = subscribe_of(&eth, "alice.agent").await;
    assert_eq!(
        subscribe.params,
        json!(["btccom-agent/1.0.0", "Stratum", sid, LOCALHOST_IP]),
        "the protocol sent upstream defaults to Stratum"
    );
}
