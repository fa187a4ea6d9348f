//! The proxy end to end (issue 5's acceptance): a real ZooKeeper, the control and proxy
//! binaries, simulated sservers and miners over TCP.
//!
//! - 200 miners of 20 users submit continuously while 5 users switch: exactly their sessions
//!   move, no miner is dropped, every line parses, every submit is answered exactly once.
//! - An sserver restarted: its sessions reconnect and the miners stay; gone for good: its
//!   miners are closed after the retries.
//! - The control plane away: the proxy keeps serving old and new sessions; a switch written to
//!   ZooKeeper meanwhile applies once the control plane is back.
//! - Unknown users: 201 without auto-registration, authorized once it lands with it.
//! - Bad input: a 1 MiB line, binary garbage, a miner that never sends, one that never reads:
//!   each closed within its bound, other sessions unaffected, memory flat.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::{Json, Router, routing::post};
use serde_json::{Value, json};
use switchyard_control::config::AutoRegApiConfig;
use switchyard_proto::v1::{SwitchCoinRequest, SwitchCoinsRequest};
use switchyard_tests::{
    control::{ControlProcess, InProcessControl},
    miner::Miner,
    proxy::{ProxyProcess, proxy_config},
    sserver::{Sserver, SserverConfig},
    wait::wait_until,
    zookeeper::{ZooKeeperServer, unique_root},
};
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt},
    net::TcpStream,
    sync::watch,
};

const T: Duration = Duration::from_secs(20);

fn switch(user: &str, coin: &str) -> SwitchCoinRequest {
    SwitchCoinRequest {
        user: user.into(),
        coin: coin.into(),
    }
}

/// The control binary on the shared ZooKeeper under a fresh root.
async fn zk_control(root: &str) -> ControlProcess {
    ControlProcess::on_zookeeper(root, |_| {})
        .await
        .expect("control on ZooKeeper")
}

async fn sserver(coin: &str) -> Sserver {
    Sserver::start(SserverConfig::new(coin).job_interval(Some(Duration::from_millis(500))))
        .await
        .expect("sserver")
}

/// What one miner of the load test saw.
#[derive(Debug, Default)]
struct MinerStats {
    sent: u64,
    answers: HashMap<u64, u32>,
    malformed: Vec<String>,
    last_job_coin: String,
    jobs_by_coin: HashMap<String, u64>,
    closed: bool,
}

/// A logged-in miner submitting every `period` until `stop`, then waiting for its answers.
async fn busy_miner(
    addr: std::net::SocketAddr,
    worker: String,
    period: Duration,
    mut stop: watch::Receiver<bool>,
    stats: Arc<Mutex<MinerStats>>,
) {
    let mut miner = Miner::connect(addr).await.expect("connect");
    let (_, auth) = miner.bitcoin_login(&worker, T).await.expect("login");
    assert_eq!(auth["result"], json!(true), "{worker}: {auth}");
    for v in &miner.received {
        note_line(&stats, v);
    }
    let (mut reader, mut writer) = miner.into_parts();
    let reader_stats = stats.clone();
    let reading = tokio::spawn(async move {
        let mut line = String::new();
        loop {
            line.clear();
            match reader.read_line(&mut line).await {
                Ok(0) | Err(_) => {
                    reader_stats.lock().expect("stats").closed = true;
                    return;
                }
                Ok(_) => match serde_json::from_str::<Value>(line.trim_end()) {
                    Ok(v @ Value::Object(_)) if line.ends_with('\n') => {
                        note_line(&reader_stats, &v)
                    }
                    _ => reader_stats
                        .lock()
                        .expect("stats")
                        .malformed
                        .push(line.clone()),
                },
            }
        }
    });
    let mut tick = tokio::time::interval(period);
    let mut id = 1000u64;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => break,
        }
        id += 1;
        let line = format!(
            "{{\"id\":{id},\"method\":\"mining.submit\",\"params\":[\"{worker}\",\"j\",\"00\",\"00\",\"00\"]}}\n"
        );
        if writer.write_all(line.as_bytes()).await.is_err() {
            break;
        }
        stats.lock().expect("stats").sent = id - 1000;
    }
    // Every submit answered (or the deadline), then hang up.
    let _ = wait_until(T, "every submit answered", || {
        let stats = stats.clone();
        async move {
            let s = stats.lock().expect("stats");
            let answered = (1001..=1000 + s.sent)
                .filter(|i| s.answers.contains_key(i))
                .count() as u64;
            if answered == s.sent || s.closed {
                Ok(())
            } else {
                Err(format!("{answered} of {}", s.sent))
            }
        }
    })
    .await;
    reading.abort();
}

fn note_line(stats: &Arc<Mutex<MinerStats>>, v: &Value) {
    let mut s = stats.lock().expect("stats");
    if v["method"] == "mining.notify" {
        if let Some(coin) = v["params"][0].as_str().and_then(|j| j.split('-').next()) {
            s.last_job_coin = coin.to_string();
            *s.jobs_by_coin.entry(coin.to_string()).or_default() += 1;
        }
    } else if v.get("method").is_none()
        && let Some(id) = v["id"].as_u64()
    {
        *s.answers.entry(id).or_default() += 1;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_miners_keep_mining_while_five_users_switch() {
    let root = unique_root("proxy-load");
    let control = zk_control(&root).await;
    let users: Vec<String> = (0..20).map(|i| format!("user{i:02}")).collect();
    control
        .admin()
        .switch_coins(SwitchCoinsRequest {
            switches: users.iter().map(|u| switch(u, "btc")).collect(),
        })
        .await
        .expect("users on btc");
    let btc = sserver("btc").await;
    let bch = sserver("bch").await;
    let mut config = proxy_config(&[control.addr], &[&btc, &bch]).expect("config");
    config["ServerID"] = json!(0); // leased from the control plane
    let proxy = ProxyProcess::start(&config).await.expect("proxy");

    let (stop_tx, stop_rx) = watch::channel(false);
    let mut miners = Vec::new();
    for i in 0..200 {
        let user = &users[i % 20];
        let stats = Arc::new(Mutex::new(MinerStats::default()));
        let task = tokio::spawn(busy_miner(
            proxy.addr,
            format!("{user}.rig{i}"),
            Duration::from_millis(100),
            stop_rx.clone(),
            stats.clone(),
        ));
        miners.push((user.clone(), stats, task));
    }
    let all_answered_some = || async {
        let behind = miners
            .iter()
            .filter(|(_, s, _)| s.lock().expect("stats").answers.len() < 3)
            .count();
        if behind == 0 {
            Ok(())
        } else {
            Err(format!("{behind} miners with < 3 answers"))
        }
    };
    wait_until(T, "every miner submitting", all_answered_some)
        .await
        .unwrap_or_else(|e| panic!("{e}"));

    let switched: Vec<String> = users[..5].to_vec();
    control
        .admin()
        .switch_coins(SwitchCoinsRequest {
            switches: switched.iter().map(|u| switch(u, "bch")).collect(),
        })
        .await
        .expect("switch five users");
    wait_until(T, "the switched users' miners on bch jobs", || async {
        let waiting = miners
            .iter()
            .filter(|(u, s, _)| {
                switched.contains(u) && s.lock().expect("stats").last_job_coin != "bch"
            })
            .count();
        if waiting == 0 {
            Ok(())
        } else {
            Err(format!("{waiting} miners still without a bch job"))
        }
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    // Keep submitting a little on the new coin, then stop and collect.
    let marks: Vec<u64> = miners
        .iter()
        .map(|(_, s, _)| s.lock().expect("stats").sent)
        .collect();
    wait_until(T, "more submits after the switch", || async {
        let slow = miners
            .iter()
            .zip(&marks)
            .filter(|((_, s, _), mark)| s.lock().expect("stats").answers.len() as u64 <= **mark + 2)
            .count();
        if slow == 0 {
            Ok(())
        } else {
            Err(format!("{slow} miners not answered since"))
        }
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    stop_tx.send(true).expect("stop");
    for (_, _, task) in &mut miners {
        task.await.expect("miner task");
    }

    let mut problems = Vec::new();
    for (user, stats, _) in &miners {
        let s = stats.lock().expect("stats");
        if s.closed {
            problems.push(format!("{user}: connection closed"));
        }
        if !s.malformed.is_empty() {
            problems.push(format!("{user}: malformed lines {:?}", s.malformed));
        }
        let unanswered = (1001..=1000 + s.sent)
            .filter(|i| !s.answers.contains_key(i))
            .count();
        if unanswered > 0 {
            problems.push(format!(
                "{user}: {unanswered} of {} submits unanswered",
                s.sent
            ));
        }
        let duplicates = s.answers.values().filter(|n| **n > 1).count();
        if duplicates > 0 {
            problems.push(format!("{user}: {duplicates} duplicate answers"));
        }
        let on_bch = s.jobs_by_coin.contains_key("bch");
        if on_bch != switched.contains(user) {
            problems.push(format!(
                "{user}: bch jobs {on_bch}, switched {}",
                switched.contains(user)
            ));
        }
    }
    assert!(
        problems.is_empty(),
        "{} problems: {:#?}",
        problems.len(),
        &problems[..problems.len().min(20)]
    );
    let records = bch.records();
    assert_eq!(
        records.subscribes.len(),
        50,
        "exactly the 50 switched sessions reached bch: {}",
        records.summary()
    );
    assert!(
        records.authorizes.iter().all(|a| switched
            .iter()
            .any(|u| a.worker.starts_with(&format!("{u}.")))),
        "only the switched users' workers reached bch"
    );
    let metrics = proxy.metrics().await.expect("metrics");
    assert!(
        metrics.contains("switchyard_proxy_switches_total{coin=\"bch\",outcome=\"ok\"} 50"),
        "{metrics}"
    );
}

#[tokio::test]
async fn an_sserver_restart_keeps_the_miners_and_one_gone_for_good_closes_them() {
    let control = InProcessControl::start().await.expect("control");
    control
        .admin()
        .switch_coin(switch("alice", "btc"))
        .await
        .expect("alice");
    let mut btc = sserver("btc").await;
    let mut config = proxy_config(&[control.addr], &[&btc]).expect("config");
    config["ReconnectTries"] = json!(3);
    let proxy = ProxyProcess::start(&config).await.expect("proxy");
    let mut miner = Miner::connect(proxy.addr).await.expect("connect");
    miner.bitcoin_login("alice.rig1", T).await.expect("login");
    miner.wait_job_of("btc", T).await.expect("job");

    btc.restart().await.expect("restart");
    btc.wait_for(T, "the session back", |r| r.subscribes.len() == 2)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let new_job = btc.new_job();
    miner
        .wait_for("the job after the restart", T, |v| {
            v["params"][0] == json!(new_job.clone())
        })
        .await
        .unwrap_or_else(|e| panic!("the session reconnected: {e}"));
    let id = miner
        .request("mining.submit", json!(["alice.rig1", "j", "0", "0", "0"]))
        .await
        .expect("submit");
    assert_eq!(
        miner.answer(id, T).await.expect("answer")["result"],
        json!(true)
    );
    assert_eq!(
        proxy
            .metric("switchyard_proxy_reconnects_total{outcome=\"ok\"}")
            .await
            .expect("metric"),
        1.0
    );

    btc.stop().await;
    assert!(
        miner.closed_within(T).await,
        "the miner is closed once the retries fail"
    );
    assert!(miner.malformed.is_empty(), "{:?}", miner.malformed);
    assert_eq!(
        proxy
            .metric("switchyard_proxy_reconnects_total{outcome=\"failed\"}")
            .await
            .expect("metric"),
        1.0
    );
}

#[tokio::test]
async fn an_sserver_down_for_several_seconds_keeps_its_miners_connected() {
    let control = InProcessControl::start().await.expect("control");
    control
        .admin()
        .switch_coin(switch("alice", "btc"))
        .await
        .expect("alice");
    let mut btc = sserver("btc").await;
    // The default reconnect window (60 s), no ReconnectTries.
    let config = proxy_config(&[control.addr], &[&btc]).expect("config");
    let proxy = ProxyProcess::start(&config).await.expect("proxy");
    let mut miner = Miner::connect(proxy.addr).await.expect("connect");
    miner.bitcoin_login("alice.rig1", T).await.expect("login");
    miner.wait_job_of("btc", T).await.expect("job");

    // The sserver goes; its port answers every connection by closing it (a restarting
    // process), until the proxy has tried 6 times: with the backoff that is over 4 s, twice
    // what the old three tries a second apart allowed.
    btc.stop().await;
    let down = tokio::net::TcpListener::bind(btc.addr())
        .await
        .expect("bind the sserver's port");
    let mut tries = 0;
    let started = tokio::time::Instant::now();
    while tries < 6 {
        let (socket, _) = tokio::time::timeout(T, down.accept())
            .await
            .expect("the proxy keeps trying")
            .expect("accept");
        drop(socket);
        tries += 1;
    }
    let down_for = started.elapsed();
    assert!(down_for > Duration::from_secs(2), "{down_for:?}");
    drop(down);
    btc.restart().await.expect("the sserver back");
    btc.wait_for(T, "the session back", |r| r.subscribes.len() == 2)
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", proxy.log()));
    let new_job = btc.new_job();
    miner
        .wait_for("the job after the sserver came back", T, |v| {
            v["params"][0] == json!(new_job.clone())
        })
        .await
        .unwrap_or_else(|e| panic!("the miner stayed and was reconnected: {e}\n{}", proxy.log()));
    let id = miner
        .request("mining.submit", json!(["alice.rig1", "j", "0", "0", "0"]))
        .await
        .expect("submit");
    assert_eq!(
        miner.answer(id, T).await.expect("answer")["result"],
        json!(true)
    );
    assert!(miner.malformed.is_empty(), "{:?}", miner.malformed);
}

#[tokio::test]
async fn the_proxy_serves_from_its_cache_while_the_control_plane_is_away() {
    let root = unique_root("proxy-away");
    let mut control = zk_control(&root).await;
    control
        .admin()
        .switch_coins(SwitchCoinsRequest {
            switches: vec![switch("alice", "btc"), switch("bob", "btc")],
        })
        .await
        .expect("users");
    let btc = sserver("btc").await;
    let bch = sserver("bch").await;
    let config = proxy_config(&[control.addr], &[&btc, &bch]).expect("config");
    let proxy = ProxyProcess::start(&config).await.expect("proxy");
    let mut alice = Miner::connect(proxy.addr).await.expect("connect");
    alice.bitcoin_login("alice.rig1", T).await.expect("login");

    control.terminate().await.expect("control stopped");
    wait_until(T, "the proxy to see the control plane gone", || async {
        match proxy.metric("switchyard_proxy_control_connected").await {
            Ok(0.0) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    // Old and new sessions of known users keep working.
    let id = alice
        .request("mining.submit", json!(["alice.rig1", "j", "0", "0", "0"]))
        .await
        .expect("submit");
    assert_eq!(
        alice.answer(id, T).await.expect("answer")["result"],
        json!(true)
    );
    let mut bob = Miner::connect(proxy.addr).await.expect("connect");
    let (_, auth) = bob
        .bitcoin_login("bob.rig1", T)
        .await
        .expect("login while away");
    assert_eq!(auth["result"], json!(true));
    bob.wait_job_of("btc", T).await.expect("bob's job");

    // A switch written while the control plane is away (by a plain ZooKeeper client, a
    // legitimate writer) reaches the miners once it is back.
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
        .expect("alice moved to bch");
    // Bob's session, opened while the control plane was away, is still served.
    let id = bob
        .request("mining.submit", json!(["bob.rig1", "j", "0", "0", "0"]))
        .await
        .expect("submit");
    assert_eq!(
        bob.answer(id, T).await.expect("bob still served")["result"],
        json!(true)
    );
    assert!(alice.malformed.is_empty() && bob.malformed.is_empty());
}

/// A pool backend's auto-registration endpoint that accepts everyone, each answer held until
/// `gate` is open.
async fn registration_backend(gate: watch::Receiver<bool>) -> String {
    let next = Arc::new(Mutex::new(100i64));
    let app = Router::new().route(
        "/register",
        post(move || {
            let next = next.clone();
            let mut gate = gate.clone();
            async move {
                let _ = gate.wait_for(|open| *open).await;
                let puid = {
                    let mut n = next.lock().expect("puid");
                    *n += 1;
                    *n
                };
                Json(json!({"data": {"puid": puid}, "status": "success", "message": ""}))
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    format!("http://{addr}/register")
}

/// A control plane (embedded store) with auto-registration through `url`.
async fn registering_control(url: &str) -> InProcessControl {
    InProcessControl::start_with(|c| {
        c.enable_user_auto_reg = true;
        c.auto_reg_timeout_seconds = 30;
        c.user_auto_reg_api = AutoRegApiConfig {
            interval_seconds: 1,
            url: url.to_string(),
            user: String::new(),
            password: Default::default(),
            default_coin: "btc".into(),
            post_data: [("sub_name".to_string(), "{sub_name}".to_string())]
                .into_iter()
                .collect(),
        };
    })
    .await
    .expect("control")
}

#[tokio::test]
async fn unknown_users_are_refused_or_registered() {
    let (_open, gate) = watch::channel(true);
    let url = registration_backend(gate).await;
    let control = registering_control(&url).await;
    let btc = sserver("btc").await;

    let config = proxy_config(&[control.addr], &[&btc]).expect("config");
    let plain = ProxyProcess::start(&config)
        .await
        .expect("proxy without auto-registration");
    let mut miner = Miner::connect(plain.addr).await.expect("connect");
    let (_, auth) = miner
        .bitcoin_login("stranger.rig1", T)
        .await
        .expect("answered");
    assert_eq!(auth["error"][0], json!(201), "{auth}");
    assert!(miner.closed_within(T).await, "closed after 201");

    let mut config = proxy_config(&[control.addr], &[&btc]).expect("config");
    config["EnableUserAutoReg"] = json!(true);
    config["AutoRegMaxWaitUsers"] = json!(10);
    let registering = ProxyProcess::start(&config)
        .await
        .expect("proxy with auto-registration");
    let mut miner = Miner::connect(registering.addr).await.expect("connect");
    let (_, auth) = miner
        .bitcoin_login("newcomer.rig1", T)
        .await
        .expect("answered");
    assert_eq!(
        auth["result"],
        json!(true),
        "authorized once registered: {auth}"
    );
    miner.wait_job_of("btc", T).await.expect("a job");
    let user = control.core.user_coin("newcomer").expect("valid");
    assert!(user.is_some(), "the user was created");
}

#[tokio::test]
async fn bad_input_is_closed_within_its_bound_and_others_keep_mining() {
    let control = InProcessControl::start().await.expect("control");
    control
        .admin()
        .switch_coin(switch("alice", "btc"))
        .await
        .expect("alice");
    let btc = Sserver::start(SserverConfig::new("btc").job_interval(None))
        .await
        .expect("btc");
    let mut config = proxy_config(&[control.addr], &[&btc]).expect("config");
    config["FirstByteTimeoutSeconds"] = json!(1);
    config["HandshakeTimeoutSeconds"] = json!(2);
    config["WriteTimeoutSeconds"] = json!(2);
    let proxy = ProxyProcess::start(&config).await.expect("proxy");
    let mut good = Miner::connect(proxy.addr).await.expect("connect");
    good.bitcoin_login("alice.good", T).await.expect("login");
    let rss_before = proxy.rss_kib().expect("rss");

    for round in 0..10 {
        // A 1 MiB line.
        let mut long = TcpStream::connect(proxy.addr).await.expect("connect");
        let mut big = vec![b'{'];
        big.extend(std::iter::repeat_n(b'x', 1 << 20));
        let _ = long.write_all(&big).await;
        assert!(
            closed(&mut long).await,
            "round {round}: the 1 MiB line closes the session"
        );
        // Binary garbage.
        let mut garbage = TcpStream::connect(proxy.addr).await.expect("connect");
        let _ = garbage.write_all(&[0u8, 0xff, 0x13, 0x37, b'\n']).await;
        assert!(
            closed(&mut garbage).await,
            "round {round}: garbage closes the session"
        );
    }
    // A miner that never sends: closed after FirstByteTimeoutSeconds.
    let mut silent = TcpStream::connect(proxy.addr).await.expect("connect");
    assert!(closed(&mut silent).await, "the silent miner is closed");
    // A miner that sends `{` and nothing more: closed after HandshakeTimeoutSeconds.
    let mut stuck = TcpStream::connect(proxy.addr).await.expect("connect");
    stuck.write_all(b"{").await.expect("write");
    assert!(
        closed(&mut stuck).await,
        "the half-handshake miner is closed"
    );

    // A miner that never reads: it submits as fast as it can with a tiny receive buffer,
    // and the proxy, whose writes to it stall, closes it after WriteTimeoutSeconds.
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(4096).expect("rcvbuf");
    let deaf = socket.connect(proxy.addr).await.expect("connect");
    let mut deaf = Miner::from_stream(deaf).expect("miner");
    deaf.bitcoin_login("alice.deaf", T).await.expect("login");
    let (_reader, mut writer) = deaf.into_parts();
    let flood = tokio::spawn(async move {
        let line = b"{\"id\":7,\"method\":\"mining.submit\",\"params\":[\"alice.deaf\",\"j\",\"00\",\"00\",\"00\"]}\n".repeat(100);
        for _ in 0..10_000 {
            if writer.write_all(&line).await.is_err() {
                return true;
            }
        }
        false
    });
    let closed_deaf = tokio::time::timeout(Duration::from_secs(25), flood).await;
    assert!(
        matches!(closed_deaf, Ok(Ok(true))),
        "the miner that never reads is dropped: {closed_deaf:?}"
    );

    // The good miner was never disturbed.
    let id = good
        .request("mining.submit", json!(["alice.good", "j", "0", "0", "0"]))
        .await
        .expect("submit");
    assert_eq!(
        good.answer(id, T).await.expect("answer")["result"],
        json!(true)
    );
    assert!(good.malformed.is_empty());
    let rss_after = proxy.rss_kib().expect("rss");
    assert!(
        rss_after < rss_before + 16 * 1024,
        "proxy memory flat: {rss_before} KiB before, {rss_after} KiB after"
    );
    let metrics = proxy.metrics().await.expect("metrics");
    assert!(
        metrics.contains(
            "switchyard_proxy_handshakes_total{outcome=\"failed\",reason=\"not_json\"} 10"
        ),
        "{metrics}"
    );
}

/// Reads until the peer closes (true) or 15 s pass (false).
async fn closed(stream: &mut TcpStream) -> bool {
    use tokio::io::AsyncReadExt;
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => {}
            Err(_) => return false,
        }
    }
}

/// A proxy whose control replica becomes unreachable renews through another replica and keeps
/// its server ID: the second replica takes the lease node over (it names the same proxy
/// instance), so the ID is never handed to another proxy while this one's sessions use it.
#[tokio::test]
async fn a_leased_server_id_survives_a_failover_between_replicas() {
    use switchyard_proto::v1::ListProxiesRequest;
    use switchyard_tests::relay::TcpRelay;
    let zk = ZooKeeperServer::shared().expect("ZooKeeper");
    let root = unique_root("proxy-lease-failover");
    let start = || {
        let root = root.clone();
        InProcessControl::start_with(move |c| {
            c.zk_broker = vec![zk.connect_string()];
            c.zk_switcher_watch_dir = format!("{root}/switcher/");
            c.zk_switchyard_dir = format!("{root}/switchyard/");
            c.zk_server_id_assign_dir = format!("{root}/swid/");
            c.lease_ttl_seconds = 3;
        })
    };
    let a = start().await.expect("replica A");
    let b = start().await.expect("replica B");
    let btc = sserver("btc").await;
    let to_a = TcpRelay::start(a.addr).await.expect("relay to A");
    let mut config = proxy_config(&[to_a.addr, b.addr], &[&btc]).expect("config");
    config["ServerID"] = json!(0);
    let proxy = ProxyProcess::start(&config).await.expect("proxy");
    let leased = proxy
        .metric("switchyard_proxy_server_id")
        .await
        .expect("metric");
    assert!(leased >= 1.0, "a server ID was leased: {leased}");

    to_a.block();
    // The lease is renewed through B (the TTL is 3 s, renewals every second), and B lists it.
    wait_until(T, "B to hold the proxy's lease", || async {
        let proxies = b
            .admin()
            .list_proxies(ListProxiesRequest::default())
            .await
            .map_err(|e| e.to_string())?
            .into_inner()
            .proxies;
        let held: Vec<u32> = proxies.iter().map(|p| p.server_id).collect();
        let log = proxy.log();
        if log.contains("SERVER ID CHANGED") {
            return Ok(Err(format!("the ID changed: {held:?}")));
        }
        if held == vec![leased as u32] && log.contains("re-acquiring") {
            Ok(Ok(()))
        } else {
            Err(format!("B lists {held:?}"))
        }
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", proxy.log()))
    .unwrap_or_else(|e: String| panic!("{e}\n{}", proxy.log()));
    assert_eq!(
        proxy
            .metric("switchyard_proxy_server_id")
            .await
            .expect("metric"),
        leased,
        "the proxy kept its server ID"
    );
}

/// At most `AutoRegMaxWaitUsers` sessions wait for a registration; the next is closed at once,
/// and the waiting ones are authorized when their registrations land.
#[tokio::test]
async fn waiting_for_registrations_is_bounded() {
    let (gate_tx, gate) = watch::channel(false);
    let url = registration_backend(gate).await;
    let control = registering_control(&url).await;
    let btc = sserver("btc").await;
    let mut config = proxy_config(&[control.addr], &[&btc]).expect("config");
    config["EnableUserAutoReg"] = json!(true);
    config["AutoRegMaxWaitUsers"] = json!(2);
    let proxy = ProxyProcess::start(&config).await.expect("proxy");

    let mut waiting = Vec::new();
    for name in ["wait-a", "wait-b"] {
        let mut miner = Miner::connect(proxy.addr).await.expect("connect");
        let sub = miner
            .request("mining.subscribe", json!([]))
            .await
            .expect("subscribe");
        miner.answer(sub, T).await.expect("subscribed");
        let auth = miner
            .request("mining.authorize", json!([format!("{name}.rig"), "x"]))
            .await
            .expect("authorize");
        waiting.push((miner, auth));
    }
    wait_until(T, "two sessions waiting for their registration", || async {
        let m = proxy.metrics().await?;
        let n = switchyard_tests::proxy::metric_value(
            &m,
            "switchyard_proxy_sessions{coin=\"\",state=\"registering\"}",
        );
        if n == 2.0 {
            Ok(())
        } else {
            Err(format!("{n} registering"))
        }
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let mut third = Miner::connect(proxy.addr).await.expect("connect");
    let sub = third
        .request("mining.subscribe", json!([]))
        .await
        .expect("subscribe");
    third.answer(sub, T).await.expect("subscribed");
    third
        .request("mining.authorize", json!(["wait-c.rig", "x"]))
        .await
        .expect("authorize");
    assert!(third.closed_within(T).await, "the third waiter is closed");

    gate_tx.send(true).expect("open the gate");
    for (miner, auth) in &mut waiting {
        let answer = miner.answer(*auth, T).await.expect("answered");
        assert_eq!(answer["result"], json!(true), "{answer}");
    }
    let m = proxy.metrics().await.expect("metrics");
    assert!(
        m.contains(
            "switchyard_proxy_handshakes_total{outcome=\"failed\",reason=\"too_many_waiting\"} 1"
        ),
        "{m}"
    );
}
