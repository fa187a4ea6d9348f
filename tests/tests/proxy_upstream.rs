//! The proxy's side of the sserver contract (SPEC §2), `switchyard_proxy::upstream::open`,
//! against the simulated sserver: the requests it sends (configure, subscribe with the session
//! ID and the miner's IP, the normalized login), the session ID echo of every dialect, the
//! version mask, the suffix retry, the notifications held during the handshake, and the
//! further workers replayed on a switch (SPEC §4) whose answers never reach the miner.

use std::{net::Ipv4Addr, time::Duration};

use serde_json::{Value, json};
use switchyard_proxy::{
    session_id::{ChainType, SessionId},
    upstream::{
        EchoCheck, SubscribeParams, Upstream, UpstreamError, UpstreamLimits, UpstreamLogin,
        UpstreamTarget, open,
    },
};
use switchyard_tests::sserver::{Dialect, Records, Sserver, SserverConfig};
use tokio::io::AsyncWriteExt;

/// How long a condition may take before a test fails.
const DEADLINE: Duration = Duration::from_secs(10);

/// The miner's address in every login.
const MINER_IP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 7);

async fn start(config: SserverConfig) -> Sserver {
    Sserver::start(config.job_interval(None))
        .await
        .expect("start the sserver")
}

fn target(server: &Sserver) -> UpstreamTarget {
    UpstreamTarget {
        coin: server.coin().to_owned(),
        addr: server.addr().to_string(),
        user_suffix: server.config().suffix().to_owned(),
        tls: None,
    }
}

/// A bitcoin-like login of `worker` (`sub.miner`) for `sid` on `chain`.
fn login(sid: SessionId, chain: ChainType, worker: &str) -> UpstreamLogin {
    let (sub, miner) = match worker.split_once('.') {
        Some((sub, miner)) => (sub.to_owned(), format!(".{miner}")),
        None => (worker.to_owned(), String::new()),
    };
    UpstreamLogin {
        sid,
        client_ip: MINER_IP,
        subscribe: SubscribeParams::Bitcoin {
            agent: "cgminer/4.10.0".into(),
        },
        echo: EchoCheck::SidText(sid.text(chain)),
        version_mask: None,
        auth_method: "mining.authorize".into(),
        auth_params: vec![json!(worker), json!("x")],
        sub_account: sub,
        miner_name: miner,
        extra_auths: Vec::new(),
    }
}

/// An Ethereum login: `echo` decides the dialect's check.
fn eth_login(
    sid: SessionId,
    agent: &str,
    protocol: &str,
    method: &str,
    echo: EchoCheck,
) -> UpstreamLogin {
    UpstreamLogin {
        subscribe: SubscribeParams::Ethereum {
            agent: agent.into(),
            protocol: protocol.into(),
        },
        echo,
        auth_method: method.into(),
        ..login(sid, ChainType::Ethereum, "alice.rig1")
    }
}

async fn open_upstream(server: &Sserver, login: &UpstreamLogin) -> Result<Upstream, UpstreamError> {
    tokio::time::timeout(
        2 * DEADLINE,
        open(&target(server), login, &UpstreamLimits::default()),
    )
    .await
    .expect("open returns within its own limits")
}

/// The next line from the upstream, as JSON.
async fn next_message(upstream: &mut Upstream) -> Value {
    let line = tokio::time::timeout(DEADLINE, upstream.socket.read_line())
        .await
        .expect("a line in time")
        .expect("read from the sserver")
        .expect("a line, not the end of the stream");
    serde_json::from_slice(&line).expect("JSON from the sserver")
}

/// The held lines, as JSON.
fn held(upstream: &Upstream) -> Vec<Value> {
    upstream
        .held
        .iter()
        .map(|line| serde_json::from_slice(line).expect("held lines are JSON here"))
        .collect()
}

async fn records(server: &Sserver, what: &str, cond: impl FnMut(&Records) -> bool) -> Records {
    server
        .wait_for(DEADLINE, what, cond)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
}

#[tokio::test]
async fn bitcoin_with_a_version_mask() {
    let server = start(SserverConfig::new("btc")).await;
    let sid = SessionId(0x0300_0080);
    let login = UpstreamLogin {
        version_mask: Some(0x00ff_e000),
        ..login(sid, ChainType::Bitcoin, "alice.rig1")
    };
    let mut upstream = open_upstream(&server, &login).await.expect("handshake");
    assert_eq!(upstream.allowed_mask, Some(0x1fff_e000));
    assert_eq!(upstream.auth_result, json!(true));
    assert_eq!(upstream.auth_error, Value::Null);
    assert!(!upstream.suffixed);
    // The sserver sends difficulty and job right after the auth answer: the handshake is over
    // by then, so they wait in the reader, in order.
    assert!(upstream.held.is_empty(), "{:?}", upstream.held);
    assert_eq!(
        next_message(&mut upstream).await["method"],
        "mining.set_difficulty"
    );
    let notify = next_message(&mut upstream).await;
    assert_eq!(notify["method"], "mining.notify");
    assert_eq!(notify["params"][0], "btc-1");

    let records = records(&server, "configure, subscribe and authorize", |r| {
        !r.configures.is_empty() && !r.subscribes.is_empty() && !r.authorizes.is_empty()
    })
    .await;
    assert_eq!(records.configures[0].mask.as_deref(), Some("00ffe000"));
    assert_eq!(
        records.subscribes[0].params,
        json!(["cgminer/4.10.0", "03000080", u32::from(MINER_IP)])
    );
    assert_eq!(records.subscribes[0].client_ip, Some(u32::from(MINER_IP)));
    assert_eq!(records.accepted_workers(), ["alice.rig1"]);
    assert_eq!(records.authorizes[0].method, "mining.authorize");

    // The connection is ready to relay: a share of the authorized worker is accepted.
    upstream
        .socket
        .get_mut()
        .write_all(
            b"{\"id\":4,\"method\":\"mining.submit\",\"params\":[\"alice.rig1\",\"btc-1\",\
              \"00000000\",\"00000000\",\"00000000\"]}\n",
        )
        .await
        .expect("write a submit");
    let answer = next_message(&mut upstream).await;
    assert_eq!(answer, json!({"id": 4, "result": true, "error": null}));
}

#[tokio::test]
async fn decred_sservers_echo_the_miners_form_of_the_sid() {
    let sid = SessionId(0x0500_0080);
    for (dialect, chain) in [
        (Dialect::DecredNormal, ChainType::DecredNormal),
        (Dialect::DecredGominer, ChainType::DecredGominer),
    ] {
        let server = start(SserverConfig::new("dcr").dialect(dialect)).await;
        let upstream = open_upstream(&server, &login(sid, chain, "alice.rig1"))
            .await
            .unwrap_or_else(|e| panic!("{dialect:?}: {e}"));
        assert_eq!(upstream.auth_result, json!(true), "{dialect:?}");
        let records = records(&server, "a subscribe", |r| !r.subscribes.is_empty()).await;
        // SIDHEX big-endian is sent even to decred sservers ...
        assert_eq!(
            records.subscribes[0].sid.as_deref(),
            Some("05000080"),
            "{dialect:?}"
        );
        // ... and the echo is checked in the miner's form: the big-endian text does not pass.
        let wrong_check = UpstreamLogin {
            echo: EchoCheck::SidText(sid.text(ChainType::Bitcoin)),
            ..login(sid, chain, "alice.rig1")
        };
        match open_upstream(&server, &wrong_check).await {
            Err(UpstreamError::SidMismatch { expected, got }) => {
                assert_eq!(expected, "05000080");
                assert_eq!(got, sid.text(chain), "{dialect:?}");
            }
            other => panic!("{dialect:?}: expected SidMismatch, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn ethereum_dialects() {
    let server = start(SserverConfig::new("eth").dialect(Dialect::Ethereum)).await;
    let sid = SessionId(0x0005_0180);
    let six = sid.text(ChainType::Ethereum);
    assert_eq!(six, "050180");

    // Plain Ethereum Stratum and ETHProxy: `true`.
    for (agent, protocol, method) in [
        ("ethminer/0.19", "Stratum", "mining.authorize"),
        ("ETHProxy", "ETHProxy/1.0.0", "eth_submitLogin"),
    ] {
        let login = eth_login(sid, agent, protocol, method, EchoCheck::True);
        let upstream = open_upstream(&server, &login)
            .await
            .unwrap_or_else(|e| panic!("{protocol}: {e}"));
        assert_eq!(upstream.auth_result, json!(true), "{protocol}");
    }

    // EthereumStratum/1.0.0: the SID and the extranonce the miner was given (NiceHash: the
    // first four digits).
    for (agent, extranonce) in [
        ("ethminer/0.19", six.clone()),
        ("NiceHash/1.0.0", six[..4].into()),
    ] {
        let echo = EchoCheck::EthereumStratum {
            sid: six.clone(),
            extranonce: extranonce.clone(),
        };
        let login = eth_login(
            sid,
            agent,
            "EthereumStratum/1.0.0",
            "mining.authorize",
            echo,
        );
        let upstream = open_upstream(&server, &login)
            .await
            .unwrap_or_else(|e| panic!("{agent}: {e}"));
        assert_eq!(upstream.auth_result, json!(true), "{agent}");

        // An extranonce other than the miner's fails.
        let echo = EchoCheck::EthereumStratum {
            sid: six.clone(),
            extranonce: if extranonce.len() == 4 {
                six.clone()
            } else {
                six[..4].into()
            },
        };
        let login = eth_login(
            sid,
            agent,
            "EthereumStratum/1.0.0",
            "mining.authorize",
            echo,
        );
        let err = open_upstream(&server, &login)
            .await
            .expect_err("extranonce mismatch");
        assert_eq!(err.reason(), "sid_mismatch", "{agent}: {err}");
    }

    // The failed handshakes closed their connections after the subscribe answer: count the
    // subscribes, which the sserver records before answering.
    let records = records(&server, "six subscribes", |r| r.subscribes.len() == 6).await;
    let seen: Vec<_> = records
        .subscribes
        .iter()
        .map(|s| {
            (
                s.protocol.as_deref(),
                s.sid.as_deref(),
                s.client_ip,
                s.params.as_array().map(Vec::len),
            )
        })
        .collect();
    let ip = Some(u32::from(MINER_IP));
    let six = Some(six.as_str());
    assert_eq!(
        seen[..3],
        [
            (Some("Stratum"), six, ip, Some(4)),
            (Some("ETHProxy/1.0.0"), six, ip, Some(4)),
            (Some("EthereumStratum/1.0.0"), six, ip, Some(4)),
        ]
    );
    let logins: Vec<_> = records
        .authorizes
        .iter()
        .filter(|a| a.conn <= 2)
        .map(|a| (a.method.as_str(), a.worker.as_str(), a.accepted))
        .collect();
    assert_eq!(
        logins,
        [
            ("mining.authorize", "alice.rig1", true),
            ("eth_submitLogin", "alice.rig1", true)
        ]
    );
}

#[tokio::test]
async fn a_wrong_sid_fails_the_handshake() {
    let server = start(SserverConfig::new("btc").wrong_sid(true)).await;
    let sid = SessionId(0x0400_0080);
    match open_upstream(&server, &login(sid, ChainType::Bitcoin, "alice.rig1")).await {
        Err(UpstreamError::SidMismatch { expected, got }) => {
            assert_eq!(expected, "04000080");
            assert_ne!(got, expected);
            assert_eq!(got.len(), 8);
        }
        other => panic!("expected SidMismatch, got {other:?}"),
    }

    let eth = start(
        SserverConfig::new("eth")
            .dialect(Dialect::Ethereum)
            .wrong_sid(true),
    )
    .await;
    let login = eth_login(
        SessionId(0x0004_0080),
        "ETHProxy",
        "ETHProxy/1.0.0",
        "eth_submitLogin",
        EchoCheck::True,
    );
    let err = open_upstream(&eth, &login).await.expect_err("`false`");
    assert!(
        matches!(&err, UpstreamError::SidMismatch { expected, .. } if expected == "true"),
        "{err:?}"
    );
}

#[tokio::test]
async fn a_refused_login_is_retried_with_the_coins_suffix() {
    let server = start(
        SserverConfig::new("bch")
            .known_users(["alice"])
            .suffixed_users(["bob"]),
    )
    .await;
    let sid = SessionId(0x0200_0080);
    let mut bob = login(sid, ChainType::Bitcoin, "bob.m1");
    bob.extra_auths = vec![("mining.authorize".into(), vec![json!("bob.m2"), json!("x")])];
    let upstream = open_upstream(&server, &bob).await.expect("handshake");
    assert!(upstream.suffixed);
    assert_eq!(upstream.auth_result, json!(true));

    // Nobody knows carol: both tries refused, the last answer carried for the miner.
    match open_upstream(&server, &login(sid, ChainType::Bitcoin, "carol.m1")).await {
        Err(UpstreamError::AuthRejected { result, error }) => {
            assert_eq!(result, Value::Null);
            assert_eq!(error, json!([29, "Invalid username", null]));
        }
        other => panic!("expected AuthRejected, got {other:?}"),
    }

    let records = records(&server, "five authorizes", |r| r.authorizes.len() == 5).await;
    let tried: Vec<_> = records
        .authorizes
        .iter()
        .map(|a| (a.conn, a.worker.as_str(), a.accepted))
        .collect();
    assert_eq!(
        tried,
        [
            (1, "bob.m1", false),
            (1, "bob_bch.m1", true),
            (1, "bob_bch.m2", true),
            (2, "carol.m1", false),
            (2, "carol_bch.m1", false),
        ]
    );
    drop(upstream);
}

#[tokio::test]
async fn held_notifications_come_in_order_and_replayed_answers_stay_out() {
    let server = start(SserverConfig::new("btc").known_users(["alice", "bob"])).await;
    let sid = SessionId(0x0700_0080);
    let mut alice = login(sid, ChainType::Bitcoin, "alice.rig1");
    alice.extra_auths = vec![
        ("mining.authorize".into(), vec![json!("bob.rig"), json!("")]),
        // Refused: logged, and the upstream opens all the same.
        (
            "mining.authorize".into(),
            vec![json!("mallory.x"), json!("")],
        ),
    ];
    let mut upstream = open_upstream(&server, &alice).await.expect("handshake");
    assert!(!upstream.suffixed);
    assert_eq!(upstream.auth_result, json!(true));

    // Difficulty and job came after the first auth answer and before the replayed ones: held,
    // in order, and nothing else.
    let held = held(&upstream);
    let methods: Vec<_> = held.iter().map(|m| m["method"].clone()).collect();
    assert_eq!(
        methods,
        [json!("mining.set_difficulty"), json!("mining.notify")],
        "{held:?}"
    );
    assert_eq!(held[0]["params"], json!([1024]));
    assert_eq!(held[1]["params"][0], "btc-1");

    let records = records(&server, "three authorizes", |r| r.authorizes.len() == 3).await;
    assert_eq!(records.accepted_workers(), ["alice.rig1", "bob.rig"]);
    assert_eq!(records.authorizes[2].worker, "mallory.x");
    assert!(!records.authorizes[2].accepted);

    // Both workers are authorized on the connection, and the next line is the next job.
    let job = server.new_job();
    let notify = next_message(&mut upstream).await;
    assert_eq!(notify["method"], "mining.notify", "{notify}");
    assert_eq!(notify["params"][0], json!(job));
    upstream
        .socket
        .get_mut()
        .write_all(
            b"{\"id\":9,\"method\":\"mining.submit\",\"params\":[\"bob.rig\",\"btc-2\",\
              \"00000000\",\"00000000\",\"00000000\"]}\n",
        )
        .await
        .expect("write a submit");
    assert_eq!(
        next_message(&mut upstream).await,
        json!({"id": 9, "result": true, "error": null})
    );
}
