//! The control service's `/metrics` (issue 15) on `MetricsListenAddr`: switches counted exactly
//! by source and outcome (gRPC, HTTP, a held-back switch applied when due, auto-registration,
//! and on ZooKeeper the writes of another replica and of an outside client, never this
//! replica's own), ingestion pages and users, auto-registrations, WatchSwitches subscribers and
//! their lag, the index, store health per part, reconciles, lease conflicts, gRPC requests by
//! method and code, and the latency histograms, read from the real endpoint.

use std::{
    collections::BTreeMap,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use axum::{Json, Router, routing::post};
use serde_json::{Value, json};
use switchyard_control::config::{AutoRegApiConfig, ControlConfig};
use switchyard_proto::v1::{
    AcquireServerIdRequest, GetUserCoinRequest, RenewServerIdRequest,
    RequestUserRegistrationRequest, SwitchCoinRequest, SwitchCoinsRequest, WatchSwitchesRequest,
};
use switchyard_tests::{
    control::{InProcessControl, free_port, test_config},
    userlist::{Answer, UserListBackend},
    wait::wait_until,
    zookeeper::{ZooKeeperServer, unique_root},
};
use tokio::net::TcpListener;
use tokio_stream::StreamExt as _;
use zookeeper_async::{Acl, CreateMode};

const T: Duration = Duration::from_secs(30);

/// One scrape: each sample line as `name{labels}` → value.
#[derive(Debug)]
struct Scrape {
    text: String,
    samples: BTreeMap<String, f64>,
}

impl Scrape {
    /// The value of `series` (as written in the exposition, labels in order); panics with the
    /// whole text when it is missing.
    fn get(&self, series: &str) -> f64 {
        match self.samples.get(series) {
            Some(v) => *v,
            None => panic!("{series} is not exposed:\n{}", self.text),
        }
    }

    fn switches(&self, source: &str, outcome: &str) -> f64 {
        self.get(&format!(
            "switchyard_control_switches_total{{source=\"{source}\",outcome=\"{outcome}\"}}"
        ))
    }
}

fn metrics_config(c: &mut ControlConfig) -> std::net::SocketAddr {
    let port = free_port().expect("a free port");
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    c.metrics_listen_addr = addr.to_string();
    addr
}

async fn scrape(addr: std::net::SocketAddr) -> Result<Scrape, String> {
    let response = reqwest::get(format!("http://{addr}/metrics"))
        .await
        .map_err(|e| e.to_string())?;
    let content_type = response
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    if !content_type.starts_with("application/openmetrics-text") {
        return Err(format!("content type {content_type:?}"));
    }
    let text = response.text().await.map_err(|e| e.to_string())?;
    let samples = text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            Some((series.to_owned(), value.parse().ok()?))
        })
        .collect();
    Ok(Scrape { text, samples })
}

/// Scrapes until `check` accepts what it sees.
async fn scrape_until(
    addr: std::net::SocketAddr,
    what: &str,
    check: impl Fn(&Scrape) -> bool,
) -> Scrape {
    wait_until(T, what, || async {
        let s = scrape(addr).await?;
        if check(&s) { Ok(s) } else { Err(s.text) }
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"))
}

fn switch(user: &str, coin: &str) -> SwitchCoinRequest {
    SwitchCoinRequest {
        user: user.into(),
        coin: coin.into(),
    }
}

/// A pool backend's auto-registration endpoint: names starting with `new` get a puid, any
/// other is refused (puid 0).
async fn registration_backend() -> String {
    let puid = Arc::new(AtomicU64::new(100));
    let app = Router::new().route(
        "/register",
        post(move |Json(body): Json<Value>| {
            let puid = Arc::clone(&puid);
            async move {
                let name = body["sub_name"].as_str().unwrap_or_default().to_owned();
                if name.starts_with("new") {
                    let id = puid.fetch_add(1, Ordering::SeqCst);
                    Json(json!({"data": {"puid": id}, "status": "success"}))
                } else {
                    Json(json!({"data": {"puid": 0}, "status": "failed", "message": "no"}))
                }
            }
        }),
    );
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("local_addr");
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    format!("http://{addr}/register")
}

/// Every switch of an embedded control, counted exactly by source and outcome, with the
/// gauges, ingestion, auto-registration, leases, gRPC requests and histograms around them.
#[tokio::test]
async fn the_control_counts_every_switch_by_source_and_outcome() {
    // bch's user list is ingested (safety period 1.5 × 2 s): a page that fails, then one with
    // two users and a name the core refuses.
    let lists = UserListBackend::start().await.expect("user-list backend");
    let too_long = "z".repeat(200);
    lists.script(
        "bch",
        [
            Answer {
                status: 500,
                body: "oops".into(),
                delay: Duration::ZERO,
            },
            Answer::page(&[("frank", 1), ("gina", 2), (too_long.as_str(), 3)]),
        ],
    );
    let registrations = registration_backend().await;
    let http_port = free_port().expect("port");
    let mut metrics_addr = None;
    let control = InProcessControl::start_with(|c| {
        metrics_addr = Some(metrics_config(c));
        c.user_list_api = [("bch".to_owned(), lists.url("bch"))].into();
        c.interval_seconds = 2;
        c.user_list_timeout_seconds = 2;
        c.enable_api_server = true;
        c.listen_addr = format!("127.0.0.1:{http_port}");
        c.api_user = "u".into();
        c.api_password = "p".into();
        c.enable_user_auto_reg = true;
        c.user_auto_reg_api = AutoRegApiConfig {
            url: registrations.clone(),
            default_coin: "btc".into(),
            post_data: [("sub_name".to_owned(), "{sub_name}".to_owned())].into(),
            ..AutoRegApiConfig::default()
        };
    })
    .await
    .expect("control");
    let metrics = metrics_addr.expect("set");

    // A WatchSwitches subscriber reading everything, from the start.
    let mut watch = control
        .proxy_control()
        .watch_switches(WatchSwitchesRequest::default())
        .await
        .expect("watch")
        .into_inner();
    let watched = Arc::new(AtomicU64::new(0));
    let reader = {
        let watched = Arc::clone(&watched);
        tokio::spawn(async move {
            while let Some(Ok(msg)) = watch.next().await {
                watched.fetch_max(msg.revision, Ordering::SeqCst);
            }
        })
    };

    // The ingestion: one failed page, one with users.
    wait_until(T, "bch's list ingested", || async {
        let got = control
            .admin()
            .get_user_coin(GetUserCoinRequest {
                user: "gina".into(),
            })
            .await;
        got.map(|_| ()).map_err(|e| e.to_string())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"));

    // gRPC: one written, a batch of two written and two invalid, one invalid call, one held
    // back (alice exists on btc and bch's list never listed her).
    let mut admin = control.admin();
    admin
        .switch_coin(switch("alice", "btc"))
        .await
        .expect("alice");
    let batch = admin
        .switch_coins(SwitchCoinsRequest {
            switches: vec![
                switch("bob", "btc"),
                switch("carol", "ltc"),
                switch("x/y", "btc"),
                switch("dan", "doge"),
            ],
        })
        .await
        .expect("batch")
        .into_inner();
    assert_eq!(
        batch.results.iter().filter(|r| r.error.is_some()).count(),
        2
    );
    let refused = admin.switch_coin(switch("x/y", "btc")).await;
    assert_eq!(
        refused.expect_err("invalid").code(),
        tonic::Code::InvalidArgument
    );
    let held = admin
        .switch_coin(switch("alice", "bch"))
        .await
        .expect("held")
        .into_inner();
    assert!(held.pending_applies_at_unix > 0, "held back: {held:?}");

    // HTTP: one written, one invalid, a multi-user request of two written.
    let http = reqwest::Client::new();
    let base = format!("http://127.0.0.1:{http_port}");
    for (query, err_no) in [("puname=erin&coin=ltc", 0), ("puname=jo&coin=doge", 104)] {
        let answer: Value = http
            .get(format!("{base}/switch?{query}"))
            .basic_auth("u", Some("p"))
            .send()
            .await
            .expect("switch")
            .json()
            .await
            .expect("json");
        assert_eq!(answer["err_no"], err_no, "{query}: {answer}");
    }
    let answer: Value = http
        .post(format!("{base}/switch/multi-user"))
        .basic_auth("u", Some("p"))
        .json(&json!({"usercoins": [{"coin": "btc", "punames": ["hank", "ivy"]}]}))
        .send()
        .await
        .expect("multi-user")
        .json()
        .await
        .expect("json");
    assert_eq!(answer["err_no"], 0, "{answer}");

    // Auto-registration: one created, one refused by the backend, an invalid name refused, a
    // user who has a coin already.
    let mut proxy_control = control.proxy_control();
    for user in ["newbie", "nope", "x/y", "bob"] {
        let _ = proxy_control
            .request_user_registration(RequestUserRegistrationRequest {
                user: user.into(),
                worker: format!("{user}.rig"),
                session_id: 0x0100_0001,
            })
            .await;
    }

    // Leases: the ID another proxy holds, asked for and renewed.
    let lease = |instance: &str| AcquireServerIdRequest {
        chain_type: "bitcoin".into(),
        instance_id: instance.into(),
        preferred_server_id: 7,
        ..AcquireServerIdRequest::default()
    };
    let first = proxy_control
        .acquire_server_id(lease("p1"))
        .await
        .expect("p1")
        .into_inner();
    assert_eq!(first.server_id, 7);
    let second = proxy_control
        .acquire_server_id(lease("p2"))
        .await
        .expect("p2")
        .into_inner();
    assert_ne!(second.server_id, 7, "p1 holds 7");
    let renewal = proxy_control
        .renew_server_id(RenewServerIdRequest {
            chain_type: "bitcoin".into(),
            server_id: 7,
            instance_id: "p2".into(),
            ..RenewServerIdRequest::default()
        })
        .await;
    assert_eq!(renewal.expect_err("not p2's").code(), tonic::Code::NotFound);

    // Before the held-back switch is due (a second of margin): pending on the schedule.
    let before = scrape(metrics).await.expect("scrape");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    if now + 1 < held.pending_applies_at_unix as u64 {
        assert_eq!(
            before.get("switchyard_control_held_back_switches"),
            1.0,
            "{}",
            before.text
        );
        assert_eq!(before.switches("held_back", "written"), 0.0);
    }

    // Once it is written, and auto-registration is done, every count is final.
    let s = scrape_until(
        metrics,
        "the held-back switch and auto-registrations",
        |s| {
            s.switches("held_back", "written") == 1.0
                && s.get("switchyard_control_autoreg_total{outcome=\"created\"}") == 1.0
                && s.get("switchyard_control_autoreg_total{outcome=\"refused\"}") == 2.0
                && s.get("switchyard_control_watch_lag_revisions") == 0.0
        },
    )
    .await;
    let expected = [
        ("grpc", "written", 3.0),
        ("grpc", "held_back", 1.0),
        ("grpc", "invalid", 3.0),
        ("grpc", "failed", 0.0),
        ("http", "written", 3.0),
        ("http", "held_back", 0.0),
        ("http", "invalid", 1.0),
        ("http", "failed", 0.0),
        ("held_back", "written", 1.0),
        ("held_back", "failed", 0.0),
        ("autoreg", "written", 1.0),
        ("cron", "written", 0.0),
        ("zookeeper", "written", 0.0),
    ];
    for (source, outcome, n) in expected {
        assert_eq!(
            s.switches(source, outcome),
            n,
            "{source}/{outcome}:\n{}",
            s.text
        );
    }
    assert_eq!(s.get("switchyard_control_held_back_switches"), 0.0);
    assert_eq!(
        s.get("switchyard_control_autoreg_total{outcome=\"existed\"}"),
        1.0
    );
    assert_eq!(
        s.get("switchyard_control_autoreg_total{outcome=\"failed\"}"),
        0.0
    );
    assert_eq!(
        s.get("switchyard_control_autoreg_total{outcome=\"limited\"}"),
        0.0
    );
    assert_eq!(
        s.get("switchyard_control_ingest_pages_total{coin=\"bch\",outcome=\"error\"}"),
        1.0
    );
    assert!(s.get("switchyard_control_ingest_pages_total{coin=\"bch\",outcome=\"ok\"}") >= 1.0);
    for (result, n) in [("created", 2.0), ("existed", 0.0), ("invalid", 1.0)] {
        assert_eq!(
            s.get(&format!(
                "switchyard_control_ingest_users_total{{coin=\"bch\",result=\"{result}\"}}"
            )),
            n,
            "{result}"
        );
    }
    // alice bob carol erin frank gina hank ivy newbie
    assert_eq!(s.get("switchyard_control_users"), 9.0);
    let revision = control.core.index().revision();
    assert_eq!(
        s.get("switchyard_control_index_revision"),
        revision as f64,
        "{}",
        s.text
    );
    assert_eq!(s.get("switchyard_control_watch_subscribers"), 1.0);
    assert_eq!(s.get("switchyard_control_watch_lag_revisions"), 0.0);
    assert_eq!(s.get("switchyard_control_store_up{part=\"store\"}"), 1.0);
    assert!(
        !s.text.contains("part=\"zookeeper_main\""),
        "the embedded store has no ZooKeeper parts"
    );
    assert_eq!(s.get("switchyard_control_lease_conflicts_total"), 2.0);
    let grpc = |method: &str, code: &str| {
        s.get(&format!(
            "switchyard_control_grpc_requests_total{{method=\"{method}\",code=\"{code}\"}}"
        ))
    };
    assert_eq!(grpc("SwitchCoins", "OK"), 1.0);
    assert_eq!(grpc("SwitchCoin", "OK"), 2.0);
    assert_eq!(grpc("SwitchCoin", "InvalidArgument"), 1.0);
    assert_eq!(grpc("AcquireServerId", "OK"), 2.0);
    assert_eq!(grpc("RenewServerId", "NotFound"), 1.0);
    assert_eq!(
        s.get("switchyard_control_grpc_request_duration_seconds_count{method=\"SwitchCoin\"}"),
        3.0
    );
    assert_eq!(
        s.get("switchyard_control_grpc_request_duration_seconds_count{method=\"WatchSwitches\"}"),
        1.0,
        "a stream is timed to its first answer"
    );
    // Writes: alice, the gRPC batch, erin, the multi-user request.
    let writes = |op: &str| {
        s.get(&format!(
            "switchyard_control_store_write_duration_seconds_count{{op=\"{op}\"}}"
        ))
    };
    assert_eq!(writes("write"), 4.0);
    assert_eq!(writes("put_pending"), 1.0);
    assert_eq!(writes("apply_pending"), 1.0);
    assert!(
        writes("create_if_absent") >= 2.0,
        "ingestion and the auto-registration"
    );
    let build = s
        .text
        .lines()
        .find(|l| l.starts_with("switchyard_build_info{"))
        .unwrap_or_else(|| panic!("no build_info:\n{}", s.text));
    assert!(build.contains("component=\"control\""), "{build}");
    assert!(build.contains("git_commit=\""), "{build}");
    assert!(build.ends_with(" 1"), "{build}");
    assert!(s.text.ends_with("# EOF\n"));

    // The subscriber's stream ends; the gauge follows.
    reader.abort();
    scrape_until(metrics, "no subscriber", |s| {
        s.get("switchyard_control_watch_subscribers") == 0.0
    })
    .await;
    // The endpoint ends with the service.
    control.shutdown().await.expect("shutdown");
    wait_until(T, "the metrics endpoint closed", || async {
        match scrape(metrics).await {
            Err(_) => Ok(()),
            Ok(_) => Err("still answering".to_owned()),
        }
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"));
}

fn zk_config(zk: &ZooKeeperServer, root: &str, dir: &std::path::Path) -> ControlConfig {
    let mut c = test_config(dir);
    c.zk_broker = vec![zk.connect_string()];
    c.zk_switcher_watch_dir = format!("{root}/switcher/");
    c.zk_switchyard_dir = format!("{root}/switchyard/");
    c.zk_server_id_assign_dir = format!("{root}/swid/");
    c.zk_session_timeout_seconds = 4;
    c
}

async fn coin_of(control: &InProcessControl, user: &str) -> Option<String> {
    control
        .admin()
        .get_user_coin(GetUserCoinRequest { user: user.into() })
        .await
        .ok()
        .and_then(|r| r.into_inner().user_coin.map(|u| u.coin))
}

async fn wait_coin(control: &InProcessControl, user: &str, coin: &str) {
    wait_until(T, &format!("{user} on {coin}"), || async {
        match coin_of(control, user).await {
            Some(c) if c == coin => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"));
}

/// On ZooKeeper, a replica counts the writes of another replica and of an outside client as
/// `zookeeper` switches, and its own never; both ZooKeeper sessions report up, and the feed's
/// re-reads are counted without counting anything twice.
#[tokio::test]
async fn zookeeper_writes_from_elsewhere_count_as_zookeeper_switches() {
    let zk = ZooKeeperServer::shared().expect("ZooKeeper");
    let root = unique_root("metrics");
    let (dir_a, dir_b) = (
        tempfile::tempdir().expect("tempdir"),
        tempfile::tempdir().expect("tempdir"),
    );
    let mut a_config = zk_config(zk, &root, dir_a.path());
    let a_metrics = metrics_config(&mut a_config);
    // Re-read the whole state every second: counts must not change with it.
    a_config.zk_reconcile_seconds = 1;
    let mut b_config = zk_config(zk, &root, dir_b.path());
    let b_metrics = metrics_config(&mut b_config);
    let a = InProcessControl::start_config(&a_config)
        .await
        .expect("replica A");
    let b = InProcessControl::start_config(&b_config)
        .await
        .expect("replica B");

    // A's own write, seen by B; B's own write, seen by A.
    a.admin()
        .switch_coin(switch("alice", "btc"))
        .await
        .expect("A");
    wait_coin(&b, "alice", "btc").await;
    b.admin()
        .switch_coin(switch("bob", "ltc"))
        .await
        .expect("B");
    wait_coin(&a, "bob", "ltc").await;
    // An outside client (zkCli, the Go API server): a switch and a new user.
    let outside = zk.connect(Duration::from_secs(10)).await.expect("client");
    outside
        .set_data(&format!("{root}/switcher/alice"), b"bch".to_vec(), None)
        .await
        .expect("set alice");
    outside
        .create(
            &format!("{root}/switcher/zed"),
            b"ltc".to_vec(),
            Acl::open_unsafe().clone(),
            CreateMode::Persistent,
        )
        .await
        .expect("create zed");
    for replica in [&a, &b] {
        wait_coin(replica, "alice", "bch").await;
        wait_coin(replica, "zed", "ltc").await;
    }

    // A: its own switch from gRPC; B's and the outside client's two from ZooKeeper. A has
    // re-read everything at least once meanwhile, which counts nothing again.
    let before = scrape(a_metrics).await.expect("scrape A");
    let s = scrape_until(a_metrics, "a reconcile after the writes", |s| {
        s.get("switchyard_control_store_reconciles_total")
            > before.get("switchyard_control_store_reconciles_total")
    })
    .await;
    assert_eq!(s.switches("grpc", "written"), 1.0, "{}", s.text);
    assert_eq!(s.switches("zookeeper", "written"), 3.0, "{}", s.text);
    for part in ["store", "zookeeper_main", "zookeeper_batch"] {
        assert_eq!(
            s.get(&format!("switchyard_control_store_up{{part=\"{part}\"}}")),
            1.0,
            "{part}"
        );
    }
    assert_eq!(s.get("switchyard_control_users"), 3.0);
    assert_eq!(
        s.get("switchyard_control_store_write_duration_seconds_count{op=\"write\"}"),
        1.0
    );
    assert_eq!(
        s.get("switchyard_control_grpc_requests_total{method=\"SwitchCoin\",code=\"OK\"}"),
        1.0
    );

    // B: the same from its side.
    let s = scrape(b_metrics).await.expect("scrape B");
    assert_eq!(s.switches("grpc", "written"), 1.0, "{}", s.text);
    assert_eq!(s.switches("zookeeper", "written"), 3.0, "{}", s.text);
    assert_eq!(s.get("switchyard_control_store_reconciles_total"), 0.0);

    a.shutdown().await.expect("A stops");
    b.shutdown().await.expect("B stops");
}
