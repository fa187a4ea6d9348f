//! The sub-pool coinbase API of SPEC §6 (issue 12) through a real HTTP client, a real control
//! service and a real ZooKeeper: a fixture job maker that watches its request node and answers
//! in `.../ack`, one that never answers (504), sub-pools without nodes (404) or without an ack
//! node (503), bad requests, names that try to leave their directory, auth, and a control on
//! the embedded store.

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use reqwest::StatusCode;
use serde_json::{Value, json};
use switchyard_control::config::ControlConfig;
use switchyard_tests::{
    control::{InProcessControl, free_port, test_config},
    zookeeper::{ZooKeeperServer, unique_root},
};
use tokio::{sync::oneshot, task::JoinHandle};
use tokio_util::sync::CancellationToken;
use zookeeper_async::{Acl, CreateMode, ZkError, ZooKeeper};

const USER: &str = "api";
const PASSWORD: &str = "secret";
/// `ZKSubPoolUpdateAckTimeout` of the tests' control.
const ACK_TIMEOUT_S: u64 = 2;

/// The settings a job maker reports and changes.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Coinbase {
    info: String,
    addr: String,
}

impl Coinbase {
    fn json(&self) -> Value {
        json!({"coinbase_info": self.info, "payout_addr": self.addr})
    }
}

/// A job maker for one sub-pool, as btcpool's: it watches the request node and answers each
/// change in the ack node. An update (a request with a payout address) is applied, unless the
/// address is `refused`; anything else is answered `empty request` with the current settings.
struct JobMaker {
    /// Every request value it read, in order.
    seen: Arc<Mutex<Vec<String>>>,
    stop: CancellationToken,
    task: JoinHandle<()>,
}

impl JobMaker {
    async fn start(zk: Arc<ZooKeeper>, node: String, subpool: &str, initial: Coinbase) -> Self {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let stop = CancellationToken::new();
        let (_, stat) = zk.get_data(&node, false).await.expect("request node");
        let task = tokio::spawn(Self::run(
            zk,
            node,
            subpool.to_owned(),
            initial,
            stat.version,
            Arc::clone(&seen),
            stop.clone(),
        ));
        Self { seen, stop, task }
    }

    async fn run(
        zk: Arc<ZooKeeper>,
        node: String,
        subpool: String,
        mut current: Coinbase,
        mut answered: i32,
        seen: Arc<Mutex<Vec<String>>>,
        stop: CancellationToken,
    ) {
        let ack_node = format!("{node}/ack");
        loop {
            let (tx, rx) = oneshot::channel();
            let (data, stat) = match zk
                .get_data_w(&node, move |event| {
                    let _ = tx.send(event);
                })
                .await
            {
                Ok(read) => read,
                Err(e) => panic!("job maker: read {node}: {e:?}"),
            };
            if stat.version == answered {
                tokio::select! {
                    _ = rx => continue,
                    () = stop.cancelled() => return,
                }
            }
            answered = stat.version;
            let text = String::from_utf8_lossy(&data).into_owned();
            seen.lock().expect("seen").push(text.clone());
            let request: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
            let addr = request["payout_addr"].as_str().unwrap_or_default();
            let ack = if addr.is_empty() {
                json!({"success": false, "err_no": 0, "err_msg": "empty request",
                       "subpool_name": subpool, "old": current.json(),
                       "host": {"hostname": "jobmaker-1"}})
            } else if addr == "refused" {
                json!({"success": false, "err_msg": "invalid payout address",
                       "subpool_name": subpool, "old": current.json(), "new": current.json(),
                       "host": {"hostname": "jobmaker-1"}})
            } else {
                let new = Coinbase {
                    info: request["coinbase_info"].as_str().unwrap_or_default().into(),
                    addr: addr.into(),
                };
                let ack = json!({"success": true, "err_no": 0, "err_msg": "success",
                                 "subpool_name": subpool, "old": current.json(),
                                 "new": new.json(), "host": {"hostname": "jobmaker-1"}});
                current = new;
                ack
            };
            zk.set_data(&ack_node, ack.to_string().into_bytes(), None)
                .await
                .expect("job maker: write the ack");
        }
    }

    fn seen(&self) -> Vec<String> {
        self.seen.lock().expect("seen").clone()
    }

    async fn stop(self) {
        self.stop.cancel();
        self.task.await.expect("the job maker did not panic");
    }
}

/// Creates `path` and its missing parents with `data` on the last.
async fn create(zk: &ZooKeeper, path: &str, data: &[u8]) {
    let mut prefix = String::new();
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    for (i, segment) in segments.iter().enumerate() {
        prefix.push('/');
        prefix.push_str(segment);
        let value = if i + 1 == segments.len() {
            data.to_vec()
        } else {
            Vec::new()
        };
        match zk
            .create(
                &prefix,
                value,
                Acl::open_unsafe().clone(),
                CreateMode::Persistent,
            )
            .await
        {
            Ok(_) | Err(ZkError::NodeExists) => {}
            Err(e) => panic!("create {prefix}: {e:?}"),
        }
    }
}

/// A control service on ZooKeeper with the HTTP API and the sub-pool API under `root`.
struct Setup {
    control: InProcessControl,
    zk: Arc<ZooKeeper>,
    root: String,
    base: String,
    http: reqwest::Client,
    _dir: tempfile::TempDir,
}

fn http_config(dir: &std::path::Path, port: u16) -> ControlConfig {
    let mut c = test_config(dir);
    c.enable_api_server = true;
    c.listen_addr = format!("127.0.0.1:{port}");
    c.api_user = USER.into();
    c.api_password = PASSWORD.into();
    c.zk_sub_pool_update_ack_timeout = ACK_TIMEOUT_S;
    c
}

impl Setup {
    async fn start(prefix: &str) -> Self {
        let server = ZooKeeperServer::shared().expect("ZooKeeper");
        let root = unique_root(prefix);
        let dir = tempfile::tempdir().expect("tempdir");
        let port = free_port().expect("port");
        let mut c = http_config(dir.path(), port);
        c.zk_broker = vec![server.connect_string()];
        c.zk_switcher_watch_dir = format!("{root}/switcher/");
        c.zk_switchyard_dir = format!("{root}/switchyard/");
        c.zk_server_id_assign_dir = format!("{root}/swid/");
        c.zk_session_timeout_seconds = 4;
        c.zk_sub_pool_update_base_dir = format!("{root}/subpool");
        let control = InProcessControl::start_config(&c).await.expect("control");
        let zk = Arc::new(server.connect(Duration::from_secs(4)).await.expect("zk"));
        Self {
            control,
            zk,
            base: format!("http://127.0.0.1:{port}"),
            root,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .build()
                .expect("client"),
            _dir: dir,
        }
    }

    /// The request node of a sub-pool.
    fn node(&self, coin: &str, subpool: &str) -> String {
        format!("{}/subpool/{coin}/{subpool}", self.root)
    }

    /// Creates a sub-pool's request node, and its ack node when `with_ack`.
    async fn sub_pool(&self, coin: &str, subpool: &str, with_ack: bool) -> String {
        let node = self.node(coin, subpool);
        create(&self.zk, &node, b"").await;
        if with_ack {
            create(&self.zk, &format!("{node}/ack"), b"").await;
        }
        node
    }

    async fn post(&self, path: &str, body: impl Into<reqwest::Body>) -> (StatusCode, Value) {
        let response = self
            .http
            .post(format!("{}{path}", self.base))
            .basic_auth(USER, Some(PASSWORD))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .expect("POST");
        read(response).await
    }

    async fn post_json(&self, path: &str, body: &Value) -> (StatusCode, Value) {
        self.post(path, body.to_string()).await
    }

    async fn node_value(&self, node: &str) -> (String, i32) {
        let (data, stat) = self.zk.get_data(node, false).await.expect("node");
        (String::from_utf8_lossy(&data).into_owned(), stat.version)
    }
}

async fn read(response: reqwest::Response) -> (StatusCode, Value) {
    let status = response.status();
    let text = response.text().await.expect("body");
    let body = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("body is not JSON ({e}): {text:?} (status {status})"));
    (status, body)
}

/// An error answer: HTTP 200, the Go server's shape.
#[track_caller]
fn assert_error(got: &(StatusCode, Value), err_no: u16, err_msg: &str) {
    assert_eq!(got.0, StatusCode::OK, "{}", got.1);
    assert_eq!(
        got.1,
        json!({"err_no": err_no, "err_msg": err_msg, "success": false})
    );
}

const GET_PATHS: [&str; 2] = ["/subpool/get-coinbase", "/subpool-get-coinbase"];
const UPDATE_PATHS: [&str; 2] = ["/subpool/update-coinbase", "/subpool-update-coinbase"];

#[tokio::test]
async fn a_job_maker_answers_gets_and_updates_through_zookeeper() {
    let setup = Setup::start("subpool-ack").await;
    let node = setup.sub_pool("btc", "pool-a", true).await;
    let initial = Coinbase {
        info: "/initial/".into(),
        addr: "1InitialAddr".into(),
    };
    let job_maker = JobMaker::start(
        Arc::clone(&setup.zk),
        node.clone(),
        "pool-a",
        initial.clone(),
    )
    .await;

    // Get, both spellings: the job maker's "empty request" is a success with the settings.
    for path in GET_PATHS {
        let got = setup
            .post_json(path, &json!({"coin": "btc", "subpool_name": "pool-a"}))
            .await;
        assert_eq!(got.0, StatusCode::OK);
        assert_eq!(
            got.1,
            json!({"success": true, "err_no": 0, "err_msg": "success",
                   "subpool_name": "pool-a", "old": initial.json()}),
            "{path}"
        );
    }
    // A get writes the request node's own value back: the job maker sees a change, no update.
    assert_eq!(job_maker.seen(), ["", ""]);
    assert_eq!(setup.node_value(&node).await.1, 2);

    // Update, both spellings: the request node gets the Go server's JSON; the answer is the ack
    // without its host.
    let mut before = initial.clone();
    for (i, path) in UPDATE_PATHS.iter().enumerate() {
        let new = Coinbase {
            info: format!("/pool-a {i}/"),
            addr: format!("1NewAddr{i}"),
        };
        let got = setup
            .post_json(
                path,
                &json!({"coin": "btc", "subpool_name": "pool-a",
                        "coinbase_info": new.info, "payout_addr": new.addr,
                        "unknown": "ignored"}),
            )
            .await;
        assert_eq!(got.0, StatusCode::OK);
        assert_eq!(
            got.1,
            json!({"success": true, "err_no": 0, "err_msg": "success",
                   "subpool_name": "pool-a", "old": before.json(), "new": new.json()}),
            "{path}"
        );
        assert_eq!(
            setup.node_value(&node).await.0,
            format!(
                r#"{{"coin":"btc","subpool_name":"pool-a","coinbase_info":"{}","payout_addr":"{}"}}"#,
                new.info, new.addr
            )
        );
        before = new;
    }
    // A get now reports the settings of the last update.
    let got = setup
        .post_json(
            "/subpool/get-coinbase",
            &json!({"coin": "btc", "subpool_name": "pool-a"}),
        )
        .await;
    assert_eq!(got.1["success"], json!(true), "{}", got.1);
    assert_eq!(got.1["old"], before.json());

    // A refusal without a number gets 500, as the Go server answered.
    let got = setup
        .post_json(
            "/subpool/update-coinbase",
            &json!({"coin": "btc", "subpool_name": "pool-a", "payout_addr": "refused"}),
        )
        .await;
    assert_eq!(
        got.1,
        json!({"success": false, "err_no": 500, "err_msg": "invalid payout address",
               "subpool_name": "pool-a", "old": before.json(), "new": before.json()})
    );

    // Concurrent updates of one sub-pool: each caller gets the ack of its own request.
    let mut calls = Vec::new();
    for i in 0..4 {
        let http = setup.http.clone();
        let url = format!("{}/subpool/update-coinbase", setup.base);
        calls.push(tokio::spawn(async move {
            let response = http
                .post(url)
                .basic_auth(USER, Some(PASSWORD))
                .body(
                    json!({"coin": "btc", "subpool_name": "pool-a",
                           "coinbase_info": "", "payout_addr": format!("1Concurrent{i}")})
                    .to_string(),
                )
                .send()
                .await
                .expect("POST");
            (i, read(response).await)
        }));
    }
    for call in calls {
        let (i, (status, reply)) = call.await.expect("call");
        assert_eq!(status, StatusCode::OK);
        assert_eq!(reply["success"], json!(true), "{reply}");
        assert_eq!(
            reply["new"]["payout_addr"],
            json!(format!("1Concurrent{i}")),
            "{reply}"
        );
    }
    job_maker.stop().await;
    setup.control.shutdown().await.expect("control stops");
}

#[tokio::test]
async fn a_job_maker_that_never_answers_gets_504() {
    let setup = Setup::start("subpool-silent").await;
    let node = setup.sub_pool("bch", "silent", true).await;
    for (path, body) in [
        (
            "/subpool/update-coinbase",
            json!({"coin": "bch", "subpool_name": "silent", "payout_addr": "qAddr"}),
        ),
        (
            "/subpool-get-coinbase",
            json!({"coin": "bch", "subpool_name": "silent"}),
        ),
    ] {
        let started = Instant::now();
        let got = setup.post_json(path, &body).await;
        let waited = started.elapsed();
        assert_error(&got, 504, "timeout when waiting ACK");
        assert!(
            waited >= Duration::from_secs(ACK_TIMEOUT_S),
            "{path}: answered after {waited:?}, before ZKSubPoolUpdateAckTimeout"
        );
    }
    // The request was written for the job maker: the update, then the get's rewrite.
    let (value, version) = setup.node_value(&node).await;
    assert_eq!(version, 2);
    assert_eq!(
        value,
        r#"{"coin":"bch","subpool_name":"silent","coinbase_info":"","payout_addr":"qAddr"}"#
    );
    setup.control.shutdown().await.expect("control stops");
}

#[tokio::test]
async fn bad_requests_and_missing_nodes_get_the_go_error_numbers() {
    let setup = Setup::start("subpool-bad").await;
    let no_ack = setup.sub_pool("btc", "no-ack", false).await;
    // A node a crafted name would reach if names were not checked: `<base>/btc/../victim`.
    let victim = format!("{}/subpool/victim", setup.root);
    create(&setup.zk, &victim, b"untouched").await;
    create(&setup.zk, &format!("{victim}/ack"), b"").await;

    for path in GET_PATHS.iter().chain(&UPDATE_PATHS) {
        for body in ["", "not json", "{\"coin\":", "[]", "[\"btc\",\"p\"]"] {
            let got = setup.post(path, body).await;
            assert_eq!(got.1["err_no"], json!(400), "{path} {body:?}: {}", got.1);
            assert_eq!(got.1["success"], json!(false));
            assert_eq!(got.0, StatusCode::OK);
        }
        let got = setup
            .post(path, r#"{"coin": 5, "subpool_name": "p"}"#)
            .await;
        assert_eq!(got.1["err_no"], json!(400), "{path}: {}", got.1);
        assert_error(
            &setup.post_json(path, &json!({"subpool_name": "p"})).await,
            400,
            "coin cannot be empty",
        );
        assert_error(
            &setup
                .post_json(path, &json!({"coin": "btc", "subpool_name": ""}))
                .await,
            400,
            "subpool_name cannot be empty",
        );
        let with = |coin: &str, subpool: &str| json!({"coin": coin, "subpool_name": subpool, "payout_addr": "1Addr"});
        for (coin, subpool, message) in [
            ("btc/../..", "victim", "coin invalid"),
            ("..", "victim", "coin invalid"),
            ("btc", "../victim", "subpool_name invalid"),
            ("btc", "a/b", "subpool_name invalid"),
            ("btc", ".", "subpool_name invalid"),
            ("btc", "x\u{0}", "subpool_name invalid"),
            ("btc", &"p".repeat(129), "subpool_name invalid"),
        ] {
            assert_error(
                &setup.post_json(path, &with(coin, subpool)).await,
                400,
                message,
            );
        }
        assert_error(
            &setup.post_json(path, &with("btc", "nope")).await,
            404,
            "subpool 'nope' does not exist",
        );
        assert_error(
            &setup.post_json(path, &with("btc", "no-ack")).await,
            503,
            "jobmaker cannot ACK the request",
        );
    }
    for path in UPDATE_PATHS {
        assert_error(
            &setup
                .post_json(path, &json!({"coin": "btc", "subpool_name": "no-ack"}))
                .await,
            400,
            "payout_addr cannot be empty",
        );
    }
    // Too large a body.
    let got = setup
        .post(
            "/subpool/update-coinbase",
            format!(r#"{{"coin":"btc","pad":"{}"}}"#, "x".repeat(64 * 1024)),
        )
        .await;
    assert_eq!(got.1["err_no"], json!(413), "{}", got.1);

    // Without credentials nothing is written.
    let response = setup
        .http
        .post(format!("{}/subpool/update-coinbase", setup.base))
        .body(json!({"coin": "btc", "subpool_name": "no-ack", "payout_addr": "1"}).to_string())
        .send()
        .await
        .expect("POST");
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);

    assert_eq!(setup.node_value(&no_ack).await, (String::new(), 0));
    assert_eq!(setup.node_value(&victim).await, ("untouched".into(), 0));
    setup.control.shutdown().await.expect("control stops");
}

#[tokio::test]
async fn the_embedded_store_answers_that_the_api_needs_zookeeper() {
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port().expect("port");
    let mut c = http_config(dir.path(), port);
    c.zk_sub_pool_update_base_dir = "/subpool/".into();
    let control = InProcessControl::start_config(&c).await.expect("control");
    let http = reqwest::Client::new();
    for path in GET_PATHS.iter().chain(&UPDATE_PATHS) {
        let response = http
            .post(format!("http://127.0.0.1:{port}{path}"))
            .basic_auth(USER, Some(PASSWORD))
            .body(json!({"coin": "btc", "subpool_name": "p", "payout_addr": "1"}).to_string())
            .send()
            .await
            .expect("POST");
        let (status, reply) = read(response).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(reply["err_no"], json!(403), "{reply}");
        assert_eq!(reply["success"], json!(false));
        let message = reply["err_msg"].as_str().unwrap_or_default();
        assert!(
            message.starts_with("API disabled") && message.contains("ZooKeeper"),
            "{message}"
        );
    }
    control.shutdown().await.expect("control stops");
}
