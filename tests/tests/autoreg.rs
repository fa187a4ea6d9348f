//! Auto-registration of unknown users (SPEC §7) through `RequestUserRegistration`, against a
//! real HTTP backend on loopback that counts the POSTs per `sub_name` and checks their body and
//! basic auth, on the embedded store and on a real ZooKeeper (one replica or two, and pending
//! nodes written by a plain ZooKeeper client as a Go proxy would).

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::{
    Router,
    body::Bytes,
    extract::State,
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
    routing::post,
};
use futures::{StreamExt, future::join_all};
use serde_json::{Value, json};
use switchyard_control::config::{AutoRegApiConfig, ConfigError, ControlConfig};
use switchyard_proto::v1::{
    RequestUserRegistrationRequest, SwitchCoinRequest, WatchSwitchesRequest, WatchSwitchesResponse,
};
use switchyard_tests::{
    control::InProcessControl,
    wait::wait_until,
    zookeeper::{ZooKeeperServer, unique_root},
};
use tokio::{net::TcpListener, task::JoinHandle};
use tonic::{Code, Status, Streaming};
use zookeeper_async::{Acl, CreateMode, ZooKeeper};

const SESSION: Duration = Duration::from_secs(4);
/// How long a condition may take before a test fails.
const DEADLINE: Duration = Duration::from_secs(15);
/// The coin registered users get (not the first of the test coins, to tell it apart).
const DEFAULT_COIN: &str = "bch";
/// `reguser:regpass` in base64: the basic auth the backend expects.
const EXPECTED_AUTH: &str = "Basic cmVndXNlcjpyZWdwYXNz";

/// The pool backend's auto-registration endpoint. The name decides the answer: `zero-*` gets
/// puid 0, `fail-*` HTTP 500 (with a puid in the body, which must not count), `hang-*` no answer,
/// `garbage-*` a body that is not JSON; every other name a fresh puid.
struct Backend {
    url: String,
    state: Arc<BackendState>,
    task: JoinHandle<()>,
}

#[derive(Default)]
struct BackendState {
    posts: Mutex<BTreeMap<String, usize>>,
    problems: Mutex<Vec<String>>,
    next_puid: Mutex<i64>,
}

async fn register(
    State(state): State<Arc<BackendState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let problem = |p: String| {
        state.problems.lock().expect("problems").push(p.clone());
        (StatusCode::BAD_REQUEST, p).into_response()
    };
    if headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        != Some(EXPECTED_AUTH)
    {
        return problem(format!(
            "bad basic auth: {:?}",
            headers.get(header::AUTHORIZATION)
        ));
    }
    let is_json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if !is_json {
        return problem(format!(
            "bad content type: {:?}",
            headers.get(header::CONTENT_TYPE)
        ));
    }
    let body: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => return problem(format!("body is not JSON: {e}")),
    };
    let Some(name) = body["sub_name"].as_str().map(str::to_owned) else {
        return problem(format!("no sub_name in {body}"));
    };
    let expected = json!({
        "sub_name": name,
        "note": format!("{name} via {name}"),
        "source": "switchyard",
    });
    if body != expected {
        return problem(format!("body {body} is not {expected}"));
    }
    *state
        .posts
        .lock()
        .expect("posts")
        .entry(name.clone())
        .or_default() += 1;
    let json = [(header::CONTENT_TYPE, "application/json")];
    if name.starts_with("zero-") {
        (
            json,
            r#"{"data":{"puid":0},"status":"failed","message":"name taken"}"#,
        )
            .into_response()
    } else if name.starts_with("fail-") {
        (
            StatusCode::INTERNAL_SERVER_ERROR,
            json,
            r#"{"data":{"puid":99},"status":"error"}"#,
        )
            .into_response()
    } else if name.starts_with("hang-") {
        tokio::time::sleep(Duration::from_secs(120)).await;
        StatusCode::GATEWAY_TIMEOUT.into_response()
    } else if name.starts_with("garbage-") {
        (json, "<html>oops</html>").into_response()
    } else {
        let puid = {
            let mut next = state.next_puid.lock().expect("puid");
            *next += 1;
            *next
        };
        (
            json,
            json!({"data": {"puid": puid}, "status": "success", "message": "created"}).to_string(),
        )
            .into_response()
    }
}

impl Backend {
    async fn start() -> Self {
        let state = Arc::new(BackendState::default());
        let app = Router::new()
            .route("/register", post(register))
            .with_state(Arc::clone(&state));
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local_addr");
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self {
            url: format!("http://{addr}/register"),
            state,
            task,
        }
    }

    fn posts(&self) -> BTreeMap<String, usize> {
        self.state.posts.lock().expect("posts").clone()
    }

    fn posts_for(&self, name: &str) -> usize {
        self.posts().get(name).copied().unwrap_or(0)
    }

    fn assert_no_problems(&self) {
        let problems = self.state.problems.lock().expect("problems").clone();
        assert!(
            problems.is_empty(),
            "the backend saw bad requests: {problems:?}"
        );
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn autoreg_config(c: &mut ControlConfig, backend: &Backend) {
    c.enable_user_auto_reg = true;
    c.user_auto_reg_api = AutoRegApiConfig {
        interval_seconds: 1,
        url: backend.url.clone(),
        user: "reguser".into(),
        password: "regpass".into(),
        default_coin: DEFAULT_COIN.into(),
        post_data: [
            ("sub_name", "{sub_name}"),
            ("note", "{sub_name} via {sub_name}"),
            ("source", "switchyard"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect(),
    };
    c.auto_reg_timeout_seconds = 2;
}

fn zk_config(c: &mut ControlConfig, zk: &ZooKeeperServer, root: &str) {
    c.zk_broker = vec![zk.connect_string()];
    c.zk_switcher_watch_dir = format!("{root}/switcher/");
    c.zk_switchyard_dir = format!("{root}/switchyard/");
    c.zk_server_id_assign_dir = format!("{root}/swid/");
    c.zk_auto_reg_watch_dir = format!("{root}/autoreg/");
    c.zk_session_timeout_seconds = SESSION.as_secs();
    c.zk_request_timeout_seconds = 5;
}

async fn ask(control: &InProcessControl, user: &str, session_id: u32) -> Result<bool, Status> {
    control
        .proxy_control()
        .request_user_registration(RequestUserRegistrationRequest {
            user: user.into(),
            worker: format!("{user}.rig{session_id}"),
            session_id,
        })
        .await
        .map(|r| r.into_inner().created)
}

/// A WatchSwitches subscriber that keeps the users it has been told about.
struct Subscriber {
    stream: Streaming<WatchSwitchesResponse>,
    users: BTreeMap<String, String>,
}

impl Subscriber {
    async fn connect(control: &InProcessControl) -> Self {
        let stream = control
            .proxy_control()
            .watch_switches(WatchSwitchesRequest::default())
            .await
            .expect("watch")
            .into_inner();
        let mut this = Self {
            stream,
            users: BTreeMap::new(),
        };
        loop {
            let msg = this.next().await;
            if msg.snapshot_complete {
                return this;
            }
        }
    }

    async fn next(&mut self) -> WatchSwitchesResponse {
        let msg = match tokio::time::timeout(DEADLINE, self.stream.next()).await {
            Ok(Some(Ok(msg))) => msg,
            other => panic!("a stream message was expected, got {other:?}"),
        };
        self.apply(&msg);
        msg
    }

    fn apply(&mut self, msg: &WatchSwitchesResponse) {
        if msg.reset {
            self.users.clear();
        }
        for u in &msg.users {
            if u.removed {
                self.users.remove(&u.user);
            } else {
                self.users.insert(u.user.clone(), u.coin.clone());
            }
        }
    }

    /// Reads until every one of `users` has `coin`; panics after [`DEADLINE`] naming the
    /// users still missing.
    async fn until_all(&mut self, users: &[String], coin: &str) {
        let deadline = tokio::time::Instant::now() + DEADLINE;
        loop {
            let missing: Vec<&String> = users
                .iter()
                .filter(|u| self.users.get(*u).map(String::as_str) != Some(coin))
                .collect();
            if missing.is_empty() {
                return;
            }
            match tokio::time::timeout_at(deadline, self.stream.next()).await {
                Ok(Some(Ok(msg))) => self.apply(&msg),
                Ok(other) => panic!("the stream ended: {other:?}"),
                Err(_) => panic!("after {DEADLINE:?}, still no {coin:?} for {missing:?}"),
            }
        }
    }
}

async fn children(client: &ZooKeeper, path: &str) -> Vec<String> {
    client
        .get_children(path, false)
        .await
        .unwrap_or_else(|e| panic!("list {path}: {e:?}"))
}

/// Waits until the pending and claim directories of `root` are empty.
async fn until_nothing_pending(client: &ZooKeeper, root: &str) {
    wait_until(
        DEADLINE,
        "no pending auto-registration and no claim",
        || async {
            let pending = children(client, &format!("{root}/autoreg")).await;
            let claims = children(client, &format!("{root}/switchyard/autoreg-claims")).await;
            if pending.is_empty() && claims.is_empty() {
                Ok(())
            } else {
                Err(format!("pending {pending:?}, claims {claims:?}"))
            }
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
}

/// 50 concurrent requests for 10 names, spread over `controls`: each name is created once,
/// POSTed once, and its user appears with the default coin in a subscriber's stream. Then,
/// with `AutoRegMaxPending` = 10, 10 more names are all accepted: the first 10 are no longer
/// pending.
async fn fifty_requests_for_ten_names(controls: &[&InProcessControl], backend: &Backend) {
    let subscriber_on = controls[controls.len() - 1];
    let mut sub = Subscriber::connect(subscriber_on).await;
    let names: Vec<String> = (0..10).map(|i| format!("new{i}")).collect();
    let calls = (0..50).map(|i| {
        let control = controls[i % controls.len()];
        let name = names[i % names.len()].clone();
        async move { (name.clone(), ask(control, &name, i as u32).await) }
    });
    let mut created: BTreeMap<String, usize> = BTreeMap::new();
    for (name, result) in join_all(calls).await {
        let was_created = result.unwrap_or_else(|e| panic!("request for {name}: {e:?}"));
        *created.entry(name).or_default() += usize::from(was_created);
    }
    assert_eq!(
        created,
        names.iter().map(|n| (n.clone(), 1)).collect(),
        "exactly one request per name records a pending registration"
    );
    // Every registered user reaches the subscriber with the default coin.
    sub.until_all(&names, DEFAULT_COIN).await;
    // Every replica's index follows (the other replica's feed may lag a little).
    for control in controls {
        wait_until(DEADLINE, "every replica to know the new users", || async {
            let missing: Vec<&String> = names
                .iter()
                .filter(|name| {
                    let record = control.core.user_coin(name).expect("valid");
                    record.map(|r| r.coin).as_deref() != Some(DEFAULT_COIN)
                })
                .collect();
            if missing.is_empty() {
                Ok(())
            } else {
                Err(format!("missing {missing:?}"))
            }
        })
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    }

    // The pending requests are gone: 10 more fit under AutoRegMaxPending = 10.
    let more: Vec<String> = (0..10).map(|i| format!("more{i}")).collect();
    for (i, name) in more.iter().enumerate() {
        let control = controls[i % controls.len()];
        wait_until(
            DEADLINE,
            &format!("a request for {name} to be accepted"),
            || async move {
                match ask(control, name, 1000).await {
                    Ok(true) => Ok(()),
                    other => Err(format!("{other:?}")),
                }
            },
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    }
    sub.until_all(&more, DEFAULT_COIN).await;
    let expected: BTreeMap<String, usize> =
        names.iter().chain(&more).map(|n| (n.clone(), 1)).collect();
    assert_eq!(backend.posts(), expected, "exactly one POST per name");
    backend.assert_no_problems();
}

#[tokio::test]
async fn embedded_fifty_requests_for_ten_names_make_ten_posts() {
    let backend = Backend::start().await;
    let control = InProcessControl::start_with(|c| {
        autoreg_config(c, &backend);
        c.auto_reg_max_pending = 10;
    })
    .await
    .expect("control");
    fifty_requests_for_ten_names(&[&control], &backend).await;
}

#[tokio::test]
async fn zookeeper_fifty_requests_for_ten_names_make_ten_posts() {
    let zk = ZooKeeperServer::shared().expect("ZooKeeper");
    let root = unique_root("autoreg-one");
    let backend = Backend::start().await;
    let control = InProcessControl::start_with(|c| {
        zk_config(c, zk, &root);
        autoreg_config(c, &backend);
        c.auto_reg_max_pending = 10;
    })
    .await
    .expect("control on ZooKeeper");
    fifty_requests_for_ten_names(&[&control], &backend).await;
    let client = zk.connect(SESSION).await.expect("client");
    until_nothing_pending(&client, &root).await;
}

#[tokio::test]
async fn two_replicas_post_once_per_name() {
    let zk = ZooKeeperServer::shared().expect("ZooKeeper");
    let root = unique_root("autoreg-two");
    let backend = Backend::start().await;
    let start = || {
        InProcessControl::start_with(|c| {
            zk_config(c, zk, &root);
            autoreg_config(c, &backend);
            c.auto_reg_max_pending = 10;
        })
    };
    let a = start().await.expect("replica A");
    let b = start().await.expect("replica B");
    fifty_requests_for_ten_names(&[&a, &b], &backend).await;
    let client = zk.connect(SESSION).await.expect("client");
    until_nothing_pending(&client, &root).await;
}

/// Refused, failed and unanswered registrations leave no pending request behind (a new
/// request for the name is recorded again) and create no user.
async fn failures_leave_nothing_behind(control: &InProcessControl, backend: &Backend) {
    let names = ["zero-a", "fail-b", "hang-c", "garbage-d"];
    for name in names {
        assert!(ask(control, name, 1).await.expect("request"), "{name}");
    }
    for name in names {
        wait_until(
            DEADLINE,
            &format!("{name}'s request to be removed"),
            || async move {
                match ask(control, name, 2).await {
                    Ok(true) => Ok(()),
                    other => Err(format!("{other:?}; posts {}", backend.posts_for(name))),
                }
            },
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
        assert!(backend.posts_for(name) >= 1, "{name} was POSTed");
        assert_eq!(
            control.core.user_coin(name).expect("valid"),
            None,
            "{name} not created"
        );
    }
    backend.assert_no_problems();
}

#[tokio::test]
async fn embedded_failures_leave_nothing_pending_and_create_no_user() {
    let backend = Backend::start().await;
    let control = InProcessControl::start_with(|c| autoreg_config(c, &backend))
        .await
        .expect("control");
    failures_leave_nothing_behind(&control, &backend).await;
}

#[tokio::test]
async fn zookeeper_failures_leave_nothing_pending_and_create_no_user() {
    let zk = ZooKeeperServer::shared().expect("ZooKeeper");
    let root = unique_root("autoreg-fail");
    let backend = Backend::start().await;
    let control = InProcessControl::start_with(|c| {
        zk_config(c, zk, &root);
        autoreg_config(c, &backend);
    })
    .await
    .expect("control on ZooKeeper");
    failures_leave_nothing_behind(&control, &backend).await;
    // The second round of requests is processed the same way, and then nothing is left.
    let client = zk.connect(SESSION).await.expect("client");
    until_nothing_pending(&client, &root).await;
    for name in ["zero-a", "fail-b", "hang-c", "garbage-d"] {
        assert_eq!(control.core.user_coin(name).expect("valid"), None, "{name}");
    }
}

#[tokio::test]
async fn nodes_written_by_a_go_proxy_are_processed() {
    let zk = ZooKeeperServer::shared().expect("ZooKeeper");
    let root = unique_root("autoreg-go");
    let backend = Backend::start().await;
    let control = InProcessControl::start_with(|c| {
        zk_config(c, zk, &root);
        autoreg_config(c, &backend);
    })
    .await
    .expect("control on ZooKeeper");
    let mut sub = Subscriber::connect(&control).await;
    // A user who already has a coin: its stale request is removed without asking the backend.
    control
        .admin()
        .switch_coin(SwitchCoinRequest {
            user: "gohas".into(),
            coin: "ltc".into(),
        })
        .await
        .expect("switch");
    let client = zk.connect(SESSION).await.expect("client");
    for (name, data) in [
        (
            "gouser",
            &br#"{"SessionID":4242,"Worker":"gouser.rig1"}"#[..],
        ),
        ("gojunk", b"not json"),
        ("gohas", br#"{"SessionID":1,"Worker":"gohas.x"}"#),
    ] {
        client
            .create(
                &format!("{root}/autoreg/{name}"),
                data.to_vec(),
                Acl::open_unsafe().clone(),
                CreateMode::Persistent,
            )
            .await
            .unwrap_or_else(|e| panic!("create {name}: {e:?}"));
    }
    let registered = ["gouser".to_owned(), "gojunk".to_owned()];
    // The Go proxy's requests are registered.
    sub.until_all(&registered, DEFAULT_COIN).await;
    until_nothing_pending(&client, &root).await;
    assert_eq!(
        backend.posts(),
        registered.iter().map(|n| (n.clone(), 1)).collect(),
        "one POST each, none for the user who has a coin"
    );
    assert_eq!(sub.users.get("gohas").map(String::as_str), Some("ltc"));
    backend.assert_no_problems();
}

#[tokio::test]
async fn requests_are_checked_and_bounded() {
    // Disabled: FAILED_PRECONDITION.
    let plain = InProcessControl::start().await.expect("control");
    let err = ask(&plain, "alice", 1).await.expect_err("disabled");
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");

    let backend = Backend::start().await;
    let control = InProcessControl::start_with(|c| {
        autoreg_config(c, &backend);
        c.auto_reg_max_pending = 2;
    })
    .await
    .expect("control");
    for bad in ["", "a/b", "..", &"x".repeat(200)] {
        let err = ask(&control, bad, 1).await.expect_err("invalid user");
        assert_eq!(err.code(), Code::InvalidArgument, "{bad:?}: {err:?}");
    }
    let mut proxy = control.proxy_control();
    for worker in ["alice.\u{7}".to_owned(), "w".repeat(1000)] {
        let err = proxy
            .request_user_registration(RequestUserRegistrationRequest {
                user: "alice".into(),
                worker,
                session_id: 1,
            })
            .await
            .expect_err("invalid worker");
        assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    }
    // A user with a coin: nothing to do.
    control
        .admin()
        .switch_coin(SwitchCoinRequest {
            user: "known".into(),
            coin: "btc".into(),
        })
        .await
        .expect("switch");
    assert!(!ask(&control, "known", 1).await.expect("known user"));

    // Two requests the backend does not answer fill the bound; a third name is refused, a
    // request for a pending name is still answered.
    assert!(ask(&control, "hang-1", 1).await.expect("first"));
    assert!(ask(&control, "hang-2", 2).await.expect("second"));
    let err = ask(&control, "hang-3", 3)
        .await
        .expect_err("over the bound");
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(!ask(&control, "hang-1", 4).await.expect("already pending"));
    wait_until(DEADLINE, "both hanging requests POSTed", || async {
        let posts = backend.posts();
        let seen: BTreeSet<&str> = posts.keys().map(String::as_str).collect();
        if seen == BTreeSet::from(["hang-1", "hang-2"]) {
            Ok(())
        } else {
            Err(format!("{posts:?}"))
        }
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    backend.assert_no_problems();
}

fn config_error_key(json: Value) -> Option<&'static str> {
    let (config, unknown) = ControlConfig::from_json(&json.to_string()).expect("parses");
    assert!(unknown.is_empty(), "unknown keys {unknown:?}");
    match config.validate() {
        Ok(()) => None,
        Err(ConfigError::Invalid { key, .. }) => Some(key),
        Err(other) => panic!("unexpected error {other}"),
    }
}

#[test]
fn settings_are_validated() {
    let base = || {
        json!({
            "AvailableCoins": ["btc", "bch"],
            "EnableUserAutoReg": true,
            "AutoRegMaxPending": 5,
            "AutoRegTimeoutSeconds": 3,
            "UserAutoRegAPI": {
                "IntervalSeconds": 10,
                "URL": "https://pool.example/reg",
                "DefaultCoin": "btc",
                "PostData": {"name": "{sub_name}"}
            }
        })
    };
    assert_eq!(config_error_key(base()), None);
    let (config, _) = ControlConfig::from_json(&base().to_string()).expect("parses");
    let settings = config.auto_reg().expect("valid").expect("enabled");
    assert_eq!(settings.max_pending, 5);
    assert_eq!(settings.timeout, Duration::from_secs(3));
    assert_eq!(settings.interval, Duration::from_secs(10));
    assert_eq!(settings.watch_dir, None);

    let mut c = base();
    c["UserAutoRegAPI"]["DefaultCoin"] = json!("doge");
    assert_eq!(config_error_key(c), Some("UserAutoRegAPI.DefaultCoin"));
    let mut c = base();
    c["UserAutoRegAPI"]["URL"] = json!("ftp://pool.example/reg");
    assert_eq!(config_error_key(c), Some("UserAutoRegAPI.URL"));
    let mut c = base();
    c["AutoRegMaxPending"] = json!(0);
    assert_eq!(config_error_key(c), Some("AutoRegMaxPending"));
    let mut c = base();
    c["AutoRegTimeoutSeconds"] = json!(0);
    assert_eq!(config_error_key(c), Some("AutoRegTimeoutSeconds"));
    // On ZooKeeper the directory is required, and normalized.
    let mut c = base();
    c["ZKBroker"] = json!(["127.0.0.1:2181"]);
    assert_eq!(config_error_key(c.clone()), Some("ZKAutoRegWatchDir"));
    c["ZKAutoRegWatchDir"] = json!("/stratumSwitcher/bitcoin_autoreg");
    assert_eq!(config_error_key(c.clone()), None);
    let (config, _) = ControlConfig::from_json(&c.to_string()).expect("parses");
    assert_eq!(
        config
            .auto_reg()
            .expect("valid")
            .expect("enabled")
            .watch_dir
            .as_deref(),
        Some("/stratumSwitcher/bitcoin_autoreg/")
    );
    // Disabled: nothing is checked.
    let mut c = base();
    c["EnableUserAutoReg"] = json!(false);
    c["UserAutoRegAPI"]["DefaultCoin"] = json!("doge");
    assert_eq!(config_error_key(c), None);
}
