//! The simulated sserver (SPEC §2, the sserver contract), driven by a plain TCP client playing
//! the proxy's role: configure, subscribe and authorize sent at once, the answers and their
//! order, the session ID echoed (or not, when told), the user suffix rule, unknown users,
//! submits recorded per coin, jobs, stop and restart on the same port, and the line bound.

use std::{net::SocketAddr, time::Duration};

use serde_json::{Value, json};
use switchyard_tests::{
    sserver::{Dialect, Sserver, SserverConfig},
    wait::wait_until,
};
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines},
    net::{
        TcpStream,
        tcp::{OwnedReadHalf, OwnedWriteHalf},
    },
};

/// How long a condition may take before a test fails.
const DEADLINE: Duration = Duration::from_secs(10);

/// 127.0.0.1 as the proxy sends it: an unsigned 32-bit integer.
const LOCALHOST_IP: u32 = 0x7f00_0001;

/// A client in the proxy's place.
struct Client {
    lines: Lines<BufReader<OwnedReadHalf>>,
    write: OwnedWriteHalf,
}

impl Client {
    async fn connect(addr: SocketAddr) -> Self {
        let stream = tokio::time::timeout(DEADLINE, TcpStream::connect(addr))
            .await
            .expect("connect in time")
            .expect("connect to the sserver");
        let (read, write) = stream.into_split();
        Self {
            lines: BufReader::new(read).lines(),
            write,
        }
    }

    /// Sends `messages` in one write, as the proxy does.
    async fn send(&mut self, messages: &[Value]) {
        let mut text = String::new();
        for message in messages {
            text.push_str(&message.to_string());
            text.push('\n');
        }
        self.write
            .write_all(text.as_bytes())
            .await
            .expect("write to the sserver");
    }

    /// The next message; fails the test on end of stream or after [`DEADLINE`].
    async fn recv(&mut self) -> Value {
        let line = tokio::time::timeout(DEADLINE, self.lines.next_line())
            .await
            .unwrap_or_else(|_| panic!("no message within {DEADLINE:?}"))
            .expect("read from the sserver")
            .expect("a message, not the end of the stream");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"))
    }

    /// The next answer to request `id`, skipping notifications.
    async fn answer(&mut self, id: Value) -> Value {
        loop {
            let message = self.recv().await;
            if message.get("method").is_none() {
                assert_eq!(message["id"], id, "answer to {id}: {message}");
                return message;
            }
        }
    }

    /// The next `mining.notify`, skipping other messages.
    async fn next_notify(&mut self) -> Value {
        loop {
            let message = self.recv().await;
            if message["method"] == "mining.notify" {
                return message;
            }
        }
    }

    /// Waits until the sserver closes the connection (end of stream or reset).
    async fn closed(&mut self) {
        let result = tokio::time::timeout(DEADLINE, async {
            loop {
                match self.lines.next_line().await {
                    Ok(Some(_)) => continue,
                    Ok(None) | Err(_) => return,
                }
            }
        })
        .await;
        assert!(
            result.is_ok(),
            "the sserver did not close the connection within {DEADLINE:?}"
        );
    }

    /// Subscribes with `sid` and authorizes `worker`; returns the authorize answer.
    async fn login(&mut self, sid: &str, worker: &str) -> Value {
        self.send(&[subscribe(sid), authorize(worker)]).await;
        self.answer(json!("subscribe")).await;
        self.answer(json!("auth")).await
    }
}

fn configure(mask: &str) -> Value {
    json!({"id": "configure", "method": "mining.configure",
           "params": [["version-rolling"], {"version-rolling.mask": mask}]})
}

fn subscribe(sid: &str) -> Value {
    json!({"id": "subscribe", "method": "mining.subscribe",
           "params": ["cgminer/4.10.0", sid, LOCALHOST_IP]})
}

fn authorize(worker: &str) -> Value {
    json!({"id": "auth", "method": "mining.authorize", "params": [worker, "x"]})
}

fn submit(id: u64, worker: &str, job_id: &str) -> Value {
    json!({"id": id, "method": "mining.submit",
           "params": [worker, job_id, "0000000000000000", "65a1b2c3", "1a2b3c4d"]})
}

fn ok(id: Value) -> Value {
    json!({"id": id, "result": true, "error": null})
}

fn invalid_username(id: Value) -> Value {
    json!({"id": id, "result": null, "error": [29, "Invalid username", null]})
}

fn is_hex(value: &Value, digits: usize) -> bool {
    value
        .as_str()
        .is_some_and(|s| s.len() == digits && s.bytes().all(|b| b.is_ascii_hexdigit()))
}

async fn start(config: SserverConfig) -> Sserver {
    Sserver::start(config).await.expect("start the sserver")
}

async fn refuses(addr: SocketAddr) -> Result<(), String> {
    match TcpStream::connect(addr).await {
        Ok(_) => Err("a connection was accepted".to_owned()),
        Err(_) => Ok(()),
    }
}

#[tokio::test]
async fn handshake_answers_in_order_with_the_sid_echoed() {
    let server = start(
        SserverConfig::new("btc")
            .known_users(["alice"])
            .job_interval(None),
    )
    .await;
    let mut client = Client::connect(server.addr()).await;
    client
        .send(&[
            configure("1fffffff"),
            subscribe("ab000080"),
            authorize("alice.m1"),
        ])
        .await;

    assert_eq!(
        client.recv().await,
        json!({"id": "configure", "error": null,
               "result": {"version-rolling": true, "version-rolling.mask": "1fffe000"}}),
        "configure answer: the allowed mask and the asked one"
    );
    assert_eq!(
        client.recv().await,
        json!({"id": null, "method": "mining.set_version_mask", "params": ["1fffe000"]})
    );
    assert_eq!(
        client.recv().await,
        json!({"id": "subscribe", "error": null, "result":
               [[["mining.set_difficulty", "ab000080"], ["mining.notify", "ab000080"]],
                "ab000080", 8]}),
        "subscribe answer echoes SIDHEX"
    );
    assert_eq!(client.recv().await, ok(json!("auth")));
    assert_eq!(
        client.recv().await,
        json!({"id": null, "method": "mining.set_difficulty", "params": [1024]})
    );
    let notify = client.recv().await;
    assert_eq!(notify["method"], "mining.notify", "{notify}");
    assert_eq!(notify["id"], Value::Null);
    let params = notify["params"].as_array().expect("notify params");
    assert_eq!(params.len(), 9, "{notify}");
    assert_eq!(params[0], "btc-1", "the current job, named after the coin");
    assert_eq!(server.current_job_id(), "btc-1");
    assert!(is_hex(&params[1], 64), "prevhash: {notify}");
    assert!(params[2].as_str().is_some_and(|s| s.len() > 80), "coinb1");
    assert!(params[3].as_str().is_some_and(|s| s.len() > 40), "coinb2");
    assert_eq!(params[4], json!([]));
    assert!(is_hex(&params[5], 8) && is_hex(&params[6], 8) && is_hex(&params[7], 8));
    assert_eq!(params[8], true, "the first job of a connection is clean");

    let records = server.records();
    assert_eq!(records.connections_open, 1);
    assert_eq!(records.configures.len(), 1);
    assert_eq!(records.configures[0].mask.as_deref(), Some("1fffffff"));
    assert_eq!(records.subscribes.len(), 1);
    let sub = &records.subscribes[0];
    assert_eq!(sub.sid.as_deref(), Some("ab000080"));
    assert_eq!(sub.client_ip, Some(LOCALHOST_IP));
    assert_eq!(sub.agent.as_deref(), Some("cgminer/4.10.0"));
    assert_eq!(records.accepted_workers(), ["alice.m1"]);
}

#[tokio::test]
async fn without_version_rolling_the_configure_answer_says_so() {
    let server = start(SserverConfig::new("btc").version_mask(None)).await;
    let mut client = Client::connect(server.addr()).await;
    client
        .send(&[configure("1fffe000"), subscribe("01000080")])
        .await;
    assert_eq!(
        client.recv().await,
        json!({"id": "configure", "result": {"version-rolling": false}, "error": null})
    );
    let next = client.recv().await;
    assert_eq!(next["id"], "subscribe", "no set_version_mask: {next}");
}

#[tokio::test]
async fn suffix_rule_accepts_sub_suffix_when_sub_is_unknown() {
    let server = start(
        SserverConfig::new("bch")
            .known_users(["alice"])
            .suffixed_users(["bob"])
            .job_interval(None),
    )
    .await;
    let mut client = Client::connect(server.addr()).await;
    client
        .send(&[subscribe("02000080"), authorize("bob.m1")])
        .await;
    client.answer(json!("subscribe")).await;
    assert_eq!(client.recv().await, invalid_username(json!("auth")));
    // The proxy's second try, with the coin's suffix.
    client.send(&[authorize("bob_bch.m1")]).await;
    assert_eq!(client.recv().await, ok(json!("auth")));
    assert_eq!(client.recv().await["method"], "mining.set_difficulty");
    assert_eq!(client.recv().await["params"][0], "bch-1");
    // The miner submits under its own name; the suffixed authorization covers it.
    client.send(&[submit(3, "bob.m1", "bch-1")]).await;
    assert_eq!(client.answer(json!(3)).await, ok(json!(3)));
    // `alice` is known only without the suffix.
    client.send(&[authorize("alice_bch.m2")]).await;
    assert_eq!(
        client.answer(json!("auth")).await,
        invalid_username(json!("auth"))
    );

    let records = server.records();
    let tried: Vec<_> = records
        .authorizes
        .iter()
        .map(|a| (a.worker.as_str(), a.accepted))
        .collect();
    assert_eq!(
        tried,
        [
            ("bob.m1", false),
            ("bob_bch.m1", true),
            ("alice_bch.m2", false)
        ]
    );

    // Another suffix than the coin.
    let config = SserverConfig::new("bcc")
        .user_suffix("bch")
        .suffixed_users(["dave"]);
    assert!(config.knows("dave_bch"));
    assert!(!config.knows("dave"));
    assert!(!config.knows("dave_bcc"));
    assert!(
        SserverConfig::new("btc").knows("anyone"),
        "accepts all by default"
    );
}

#[tokio::test]
async fn unknown_user_is_refused_and_gets_no_job() {
    let server = start(
        SserverConfig::new("btc")
            .known_users(["alice"])
            .job_interval(None),
    )
    .await;
    let mut client = Client::connect(server.addr()).await;
    client
        .send(&[subscribe("03000080"), authorize("carol.m1")])
        .await;
    client.answer(json!("subscribe")).await;
    assert_eq!(client.recv().await, invalid_username(json!("auth")));
    // No difficulty or job follows the refusal: the next message answers the next request.
    client.send(&[submit(9, "carol.m1", "btc-1")]).await;
    assert_eq!(
        client.recv().await,
        json!({"id": 9, "result": false, "error": [24, "Unauthorized worker", null]})
    );
    // A new job goes to authorized connections only.
    server.new_job();
    client
        .send(&[json!({"id": 10, "method": "mining.extranonce.subscribe", "params": []})])
        .await;
    assert_eq!(client.recv().await, ok(json!(10)));

    // Authorize before subscribe is refused on bitcoin-like chains.
    let mut early = Client::connect(server.addr()).await;
    early.send(&[authorize("alice.m1")]).await;
    assert_eq!(
        early.recv().await,
        json!({"id": "auth", "result": null, "error": [25, "Not subscribed", null]})
    );
    assert!(server.records().accepted_workers().is_empty());
}

#[tokio::test]
async fn wrong_sid_option_answers_another_sid() {
    let server = start(SserverConfig::new("btc").wrong_sid(true)).await;
    let mut client = Client::connect(server.addr()).await;
    client.send(&[subscribe("04000080")]).await;
    let answer = client.answer(json!("subscribe")).await;
    let sid = answer["result"][1].as_str().expect("a SID in the answer");
    assert_ne!(sid, "04000080", "{answer}");
    assert!(is_hex(&answer["result"][1], 8), "{answer}");
    assert_eq!(answer["result"][0][1][1], sid, "{answer}");
    let records = server.records();
    assert_eq!(records.subscribes[0].sid.as_deref(), Some("04000080"));
    assert_eq!(records.subscribes[0].answered_sid, sid);
}

#[tokio::test]
async fn decred_sservers_echo_their_own_sid_forms() {
    for (dialect, expected, extranonce2) in [
        (Dialect::DecredNormal, "000000000000000080000005", 4),
        (Dialect::DecredGominer, "80000005", 12),
    ] {
        let server = start(SserverConfig::new("dcr").dialect(dialect)).await;
        let mut client = Client::connect(server.addr()).await;
        client.send(&[subscribe("05000080")]).await;
        let answer = client.answer(json!("subscribe")).await;
        assert_eq!(
            answer["result"],
            json!([
                [
                    ["mining.set_difficulty", expected],
                    ["mining.notify", expected]
                ],
                expected,
                extranonce2
            ]),
            "{dialect:?}"
        );
    }
}

#[tokio::test]
async fn submits_are_recorded_per_coin_and_answered_with_the_miners_id() {
    let btc = start(SserverConfig::new("btc").job_interval(None)).await;
    let bch = start(SserverConfig::new("bch").job_interval(None)).await;
    let mut to_btc = Client::connect(btc.addr()).await;
    let mut to_bch = Client::connect(bch.addr()).await;
    assert_eq!(
        to_btc.login("06000080", "alice.m1").await,
        ok(json!("auth"))
    );
    assert_eq!(
        to_bch.login("06000080", "alice.m1").await,
        ok(json!("auth"))
    );
    let btc_job = to_btc.next_notify().await["params"][0].clone();
    let bch_job = to_bch.next_notify().await["params"][0].clone();
    assert_eq!(
        (btc_job.as_str(), bch_job.as_str()),
        (Some("btc-1"), Some("bch-1"))
    );

    // Miners reuse ids: the same id on every submit.
    to_btc.send(&[submit(4, "alice.m1", "btc-1")]).await;
    assert_eq!(to_btc.answer(json!(4)).await, ok(json!(4)));
    to_btc.send(&[submit(4, "alice.m1", "btc-1")]).await;
    assert_eq!(to_btc.answer(json!(4)).await, ok(json!(4)));
    to_bch.send(&[submit(4, "alice.m1", "bch-1")]).await;
    assert_eq!(to_bch.answer(json!(4)).await, ok(json!(4)));
    // A worker not authorized on the connection.
    to_btc.send(&[submit(5, "mallory.x", "btc-1")]).await;
    assert_eq!(
        to_btc.answer(json!(5)).await,
        json!({"id": 5, "result": false, "error": [24, "Unauthorized worker", null]})
    );

    let seen: Vec<_> = btc
        .records()
        .submits
        .iter()
        .map(|s| {
            (
                s.coin.clone(),
                s.worker.clone(),
                s.job_id.clone(),
                s.accepted,
            )
        })
        .collect();
    let own = |w: &str, ok| ("btc".to_owned(), w.to_owned(), "btc-1".to_owned(), ok);
    assert_eq!(
        seen,
        [
            own("alice.m1", true),
            own("alice.m1", true),
            own("mallory.x", false)
        ]
    );
    let bch_submits = bch.records().submits;
    assert_eq!(bch_submits.len(), 1);
    assert_eq!(
        (bch_submits[0].coin.as_str(), bch_submits[0].job_id.as_str()),
        ("bch", "bch-1")
    );
}

#[tokio::test]
async fn several_workers_authorize_on_one_connection() {
    let server = start(
        SserverConfig::new("btc")
            .known_users(["alice", "bob"])
            .job_interval(None),
    )
    .await;
    let mut client = Client::connect(server.addr()).await;
    assert_eq!(
        client.login("07000080", "alice.m1").await,
        ok(json!("auth"))
    );
    client
        .send(&[json!({"id": 2, "method": "mining.authorize", "params": ["bob.rig", ""]})])
        .await;
    assert_eq!(client.answer(json!(2)).await, ok(json!(2)));
    client
        .send(&[
            submit(6, "bob.rig", "btc-1"),
            submit(7, "alice.m1", "btc-1"),
        ])
        .await;
    assert_eq!(client.answer(json!(6)).await, ok(json!(6)));
    assert_eq!(client.answer(json!(7)).await, ok(json!(7)));
    assert_eq!(server.records().accepted_workers(), ["alice.m1", "bob.rig"]);
}

#[tokio::test]
async fn jobs_come_every_interval_and_on_demand() {
    let server =
        start(SserverConfig::new("ltc").job_interval(Some(Duration::from_millis(50)))).await;
    let mut client = Client::connect(server.addr()).await;
    assert_eq!(
        client.login("08000080", "alice.m1").await,
        ok(json!("auth"))
    );
    let mut seqs = Vec::new();
    while seqs.len() < 4 {
        let notify = client.next_notify().await;
        let id = notify["params"][0].as_str().expect("a job id").to_owned();
        let seq: u64 = id
            .strip_prefix("ltc-")
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("job id names the coin: {id}"));
        seqs.push(seq);
    }
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "new jobs: {seqs:?}");

    let manual = start(SserverConfig::new("btc").job_interval(None)).await;
    let mut client = Client::connect(manual.addr()).await;
    client.login("09000080", "alice.m1").await;
    assert_eq!(client.next_notify().await["params"][0], "btc-1");
    let id = manual.new_job();
    assert_eq!(id, "btc-2");
    let notify = client.next_notify().await;
    assert_eq!(notify["params"][0], "btc-2");
    assert_eq!(notify["params"][8], false, "a job on the same block");
}

#[tokio::test]
async fn ethereum_is_minimal_but_correct() {
    let server = start(
        SserverConfig::new("eth")
            .dialect(Dialect::Ethereum)
            .known_users(["alice"])
            .job_interval(None),
    )
    .await;
    // Plain Ethereum Stratum / ETHProxy: `true`, then a JSON-RPC 2.0 login. (ETHProxy work
    // is pushed its own way: see the next test.)
    let mut client = Client::connect(server.addr()).await;
    client
        .send(&[
            json!({"id": "subscribe", "method": "mining.subscribe",
                   "params": ["ETHProxy", "ETHProxy/1.0.0", "000080", LOCALHOST_IP]}),
            json!({"id": "auth", "jsonrpc": "2.0", "method": "eth_submitLogin",
                   "params": ["alice.rig1", "x"]}),
        ])
        .await;
    assert_eq!(
        client.recv().await,
        json!({"id": "subscribe", "result": true, "error": null})
    );
    assert_eq!(
        client.recv().await,
        json!({"id": "auth", "jsonrpc": "2.0", "result": true})
    );
    let mut client = Client::connect(server.addr()).await;
    client
        .send(&[
            json!({"id": "subscribe", "method": "mining.subscribe",
                   "params": ["ethminer/0.19", "Stratum", "000180", LOCALHOST_IP]}),
            json!({"id": "auth", "method": "mining.authorize", "params": ["alice.rig1", "x"]}),
        ])
        .await;
    assert_eq!(
        client.recv().await,
        json!({"id": "subscribe", "result": true, "error": null})
    );
    assert_eq!(client.recv().await, ok(json!("auth")));
    assert_eq!(client.recv().await["method"], "mining.set_difficulty");
    let notify = client.recv().await;
    assert_eq!(notify["params"][0], "eth-1", "{notify}");
    assert!(
        notify["params"][2]
            .as_str()
            .is_some_and(|h| h.starts_with("0x") && is_hex(&json!(h[2..]), 64)),
        "header hash: {notify}"
    );

    // EthereumStratum/1.0.0 and a NiceHash client.
    for (agent, extranonce) in [("ethminer/0.19", "0a0080"), ("NiceHash/1.0.0", "0a00")] {
        let mut client = Client::connect(server.addr()).await;
        client
            .send(&[json!({"id": 1, "method": "mining.subscribe",
                           "params": [agent, "EthereumStratum/1.0.0", "0a0080", LOCALHOST_IP]})])
            .await;
        assert_eq!(
            client.recv().await,
            json!({"id": 1, "error": null,
                   "result": [["mining.notify", "0a0080", "EthereumStratum/1.0.0"], extranonce]}),
            "{agent}"
        );
    }
    let records = server.records();
    assert_eq!(
        records.subscribes[0].protocol.as_deref(),
        Some("ETHProxy/1.0.0")
    );
    assert_eq!(records.subscribes[0].sid.as_deref(), Some("000080"));
    assert_eq!(records.subscribes[0].client_ip, Some(LOCALHOST_IP));
}

/// An ETHProxy connection (subscribe protocol `ETHProxy/1.0.0`, as the proxy sends for ETHProxy
/// miners) gets its work as `{"id":0,"jsonrpc":"2.0","result":[header, seed, target]}` lines,
/// never `mining.notify` or `mining.set_difficulty`, and a share names its job by header hash:
/// the submit is recorded under that job's ID.
#[tokio::test]
async fn ethproxy_connections_get_work_pushed_the_ethproxy_way() {
    let server = start(
        SserverConfig::new("etc")
            .dialect(Dialect::Ethereum)
            .job_interval(None),
    )
    .await;
    let mut client = Client::connect(server.addr()).await;
    client
        .send(&[
            json!({"id": "subscribe", "method": "mining.subscribe",
                   "params": ["ETHProxy", "ETHProxy/1.0.0", "000280", LOCALHOST_IP]}),
            json!({"id": "auth", "jsonrpc": "2.0", "method": "eth_submitLogin",
                   "params": ["alice.rig1", "x"]}),
        ])
        .await;
    assert_eq!(
        client.recv().await,
        json!({"id": "subscribe", "result": true, "error": null})
    );
    assert_eq!(
        client.recv().await,
        json!({"id": "auth", "jsonrpc": "2.0", "result": true})
    );
    let is_work = |work: &Value| {
        work["id"] == json!(0)
            && work["jsonrpc"] == "2.0"
            && work.get("method").is_none()
            && (0..3).all(|i| {
                work["result"][i]
                    .as_str()
                    .is_some_and(|h| h.starts_with("0x") && is_hex(&json!(h[2..]), 64))
            })
    };
    let first = client.recv().await;
    assert!(is_work(&first), "the current job as ETHProxy work: {first}");
    let job = server.new_job();
    assert_eq!(job, "etc-2");
    let second = client.recv().await;
    assert!(is_work(&second), "the next job as ETHProxy work: {second}");
    assert_ne!(first["result"][0], second["result"][0], "a new header hash");

    // Shares name their job by header hash (any case); an unknown header is recorded as is.
    let header1 = first["result"][0].as_str().unwrap_or_default().to_string();
    let header2 = second["result"][0].as_str().unwrap_or_default();
    let header2 = format!("0x{}", header2.get(2..).unwrap_or_default().to_uppercase());
    let unknown = format!("0x{}", "ab".repeat(32));
    for (id, header) in [(4, &header1), (5, &header2), (6, &unknown)] {
        client
            .send(&[json!({"id": id, "jsonrpc": "2.0", "method": "eth_submitWork",
                           "params": ["0x0000000000000001", header, format!("0x{}", "cd".repeat(32))]})])
            .await;
        assert_eq!(
            client.recv().await,
            json!({"id": id, "jsonrpc": "2.0", "result": true})
        );
    }
    let records = server.records();
    let jobs: Vec<&str> = records.submits.iter().map(|s| s.job_id.as_str()).collect();
    assert_eq!(
        jobs,
        ["etc-1", "etc-2", unknown.as_str()],
        "{}",
        records.summary()
    );
    assert!(
        records
            .submits
            .iter()
            .all(|s| s.coin == "etc" && s.worker == "alice.rig1")
    );
}

#[tokio::test]
async fn stop_closes_everything_and_restart_takes_the_same_port() {
    let mut server = start(SserverConfig::new("btc")).await;
    let addr = server.addr();
    let mut client = Client::connect(addr).await;
    assert_eq!(
        client.login("0b000080", "alice.m1").await,
        ok(json!("auth"))
    );

    server.stop().await;
    assert!(!server.is_running());
    client.closed().await;
    refuses(addr).await.expect("stopped: the port refuses");
    assert_eq!(server.records().connections_open, 0);

    server.restart().await.expect("restart on the same port");
    assert_eq!(server.addr(), addr);
    let mut client = Client::connect(addr).await;
    assert_eq!(
        client.login("0c000080", "alice.m1").await,
        ok(json!("auth"))
    );

    // Restarting a running server drops its connections too.
    server.restart().await.expect("restart again");
    client.closed().await;
    let mut client = Client::connect(addr).await;
    assert_eq!(
        client.login("0d000080", "alice.m1").await,
        ok(json!("auth"))
    );

    let records = server
        .wait_for(DEADLINE, "one open connection of three", |r| {
            r.connections_open == 1 && r.connections_total == 3
        })
        .await
        .expect("records");
    let sids: Vec<_> = records
        .subscribes
        .iter()
        .filter_map(|s| s.sid.as_deref())
        .collect();
    assert_eq!(
        sids,
        ["0b000080", "0c000080", "0d000080"],
        "records survive restarts"
    );
}

#[tokio::test]
async fn disconnect_all_keeps_listening_and_drop_stops_everything() {
    let server = start(SserverConfig::new("btc")).await;
    let addr = server.addr();
    let mut client = Client::connect(addr).await;
    client.login("0e000080", "alice.m1").await;
    server.disconnect_all();
    client.closed().await;
    let mut client = Client::connect(addr).await;
    assert_eq!(
        client.login("0f000080", "alice.m1").await,
        ok(json!("auth"))
    );

    drop(server);
    client.closed().await;
    wait_until(DEADLINE, "the dropped sserver's port to refuse", || {
        refuses(addr)
    })
    .await
    .expect("dropped: the port refuses");
}

#[tokio::test]
async fn an_over_long_line_closes_the_connection() {
    let server = start(SserverConfig::new("btc").max_line(16 * 1024)).await;
    let mut client = Client::connect(server.addr()).await;
    // Just under the bound: read and ignored.
    let padding = "a".repeat(16 * 1024 - 100);
    let long = json!({"id": null, "method": "client.pad", "params": [padding]});
    assert!(long.to_string().len() <= 16 * 1024);
    client.send(&[long, subscribe("10000080")]).await;
    client.answer(json!("subscribe")).await;

    // Over the bound, without a newline: closed.
    let over = vec![b'{'; 16 * 1024 + 1];
    let _ = client.write.write_all(&over).await; // may fail once the sserver closes
    client.closed().await;
    server
        .wait_for(DEADLINE, "the connection closed for its line", |r| {
            r.lines_too_long == 1 && r.connections_open == 0
        })
        .await
        .expect("records");
}
