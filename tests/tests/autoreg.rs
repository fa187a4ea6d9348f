//! Auto-registration of unknown users (SPEC §7) through `RequestUserRegistration`, against a
//! real HTTP backend on loopback that counts the POSTs per `sub_name` and checks their body and
//! basic auth, on the embedded store and on a real ZooKeeper (one replica or two, and pending
//! nodes written by a plain ZooKeeper client as a Go proxy would). Also at pool speed (issue
//! 14): the `IntervalSeconds` wait holds no exchange permit, one proxy's junk flood leaves room
//! for the others, and a name the backend refused is not POSTed again for a while.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
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
use switchyard_control::{
    config::{AutoRegApiConfig, ConfigError, ControlConfig},
    core::SwitchCore,
};
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
    /// The control services whose users it looks at (see `max_waiting`).
    cores: Mutex<Vec<Arc<SwitchCore>>>,
    /// The names it answered a puid for, in order.
    answered: Mutex<Vec<String>>,
    /// The most registrations waiting for their user at once, as seen at each POST: the names
    /// answered a puid before, whose user no control service knows yet, plus the one POSTed.
    max_waiting: AtomicUsize,
}

impl BackendState {
    /// Notes a puid answered for `name` and how many registrations wait their interval now.
    fn answered(&self, name: &str) {
        let cores = self.cores.lock().expect("cores").clone();
        let mut answered = self.answered.lock().expect("answered");
        let waiting = answered
            .iter()
            .filter(|n| {
                !cores
                    .iter()
                    .any(|core| core.user_coin(n).ok().flatten().is_some())
            })
            .count()
            + 1;
        answered.push(name.to_owned());
        self.max_waiting.fetch_max(waiting, Ordering::SeqCst);
    }
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
        state.answered(&name);
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

    fn post_count(&self) -> usize {
        self.posts().values().sum()
    }

    /// Looks at the users of `controls` from now on (see [`BackendState::max_waiting`]).
    fn watch(&self, controls: &[&InProcessControl]) {
        *self.state.cores.lock().expect("cores") =
            controls.iter().map(|c| Arc::clone(&c.core)).collect();
    }

    fn max_waiting(&self) -> usize {
        self.state.max_waiting.load(Ordering::SeqCst)
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

/// A session ID of the proxy with `server_id` (SPEC §3, bitcoin-like).
fn sid(server_id: u32, index: u32) -> u32 {
    server_id << 24 | index
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
            // Claims live in the deployment's directory: ZKSwitchyardDir + ZKSwitcherWatchDir.
            let claims = children(
                client,
                &format!(
                    "{root}/switchyard/{}/switcher/autoreg-claims",
                    root.trim_start_matches('/')
                ),
            )
            .await;
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
/// request for the name is recorded again, or for a refused name answered NOT_FOUND at once)
/// and create no user.
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
                    Ok(true) if name != "zero-a" => Ok(()),
                    Err(e) if name == "zero-a" && e.code() == Code::NotFound => Ok(()),
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
    assert_eq!(
        backend.posts_for("zero-a"),
        1,
        "the refused name was not asked again"
    );
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

/// How long the pace test's registrations wait before their user is created.
const PACE_INTERVAL_SECONDS: u64 = 2;
/// Exchanges with the backend at once in the pace test.
const PACE_CONCURRENT: usize = 2;

/// 20 registrations asked at once, with `AutoRegMaxConcurrent` = 2 and `IntervalSeconds` = 2:
/// the backend sees all 20 POSTs while more than 2 registrations per replica wait their
/// interval at once (the wait holds no exchange permit), and all 20 users exist within a few
/// intervals, not 10 (5 with two replicas).
async fn registrations_wait_together(controls: &[&InProcessControl], backend: &Backend) {
    backend.watch(controls);
    let names: Vec<String> = (0..20).map(|i| format!("pace{i}")).collect();
    let calls = names.iter().enumerate().map(|(i, name)| {
        let control = controls[i % controls.len()];
        async move { (name, ask(control, name, sid(1, 128 + i as u32)).await) }
    });
    for (name, result) in join_all(calls).await {
        assert!(
            result.unwrap_or_else(|e| panic!("request for {name}: {e:?}")),
            "{name} recorded"
        );
    }
    wait_until(DEADLINE, "20 POSTs and 20 users", || async {
        let missing: Vec<&String> = names
            .iter()
            .filter(|n| {
                !controls
                    .iter()
                    .all(|c| c.core.user_coin(n).expect("valid").is_some())
            })
            .collect();
        let posts = backend.post_count();
        if posts == 20 && missing.is_empty() {
            Ok(())
        } else {
            Err(format!(
                "{posts} POSTs, users missing: {missing:?}, most waiting at once {}",
                backend.max_waiting()
            ))
        }
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    // Each replica has its own AutoRegMaxConcurrent exchanges.
    assert!(
        backend.max_waiting() > PACE_CONCURRENT * controls.len(),
        "at most {} registrations waited their interval at once: the wait holds an exchange permit",
        backend.max_waiting()
    );
    assert_eq!(
        backend.posts(),
        names.iter().map(|n| (n.clone(), 1)).collect(),
        "one POST per name"
    );
    backend.assert_no_problems();
}

fn pace_config(c: &mut ControlConfig, backend: &Backend) {
    autoreg_config(c, backend);
    c.user_auto_reg_api.interval_seconds = PACE_INTERVAL_SECONDS;
    c.auto_reg_max_concurrent = PACE_CONCURRENT;
}

#[tokio::test]
async fn embedded_registrations_wait_their_interval_together() {
    let backend = Backend::start().await;
    let control = InProcessControl::start_with(|c| pace_config(c, &backend))
        .await
        .expect("control");
    registrations_wait_together(&[&control], &backend).await;
}

#[tokio::test]
async fn zookeeper_registrations_wait_their_interval_together() {
    let zk = ZooKeeperServer::shared().expect("ZooKeeper");
    let root = unique_root("autoreg-pace");
    let backend = Backend::start().await;
    let start = || {
        InProcessControl::start_with(|c| {
            zk_config(c, zk, &root);
            pace_config(c, &backend);
        })
    };
    let a = start().await.expect("replica A");
    let b = start().await.expect("replica B");
    registrations_wait_together(&[&a, &b], &backend).await;
    let client = zk.connect(SESSION).await.expect("client");
    until_nothing_pending(&client, &root).await;
}

/// Asks for `names` through `control` from the proxies `server_ids` (in turn); returns how
/// many were recorded. Every other answer must be RESOURCE_EXHAUSTED.
async fn flood(control: &InProcessControl, names: &[String], server_ids: &[u32]) -> usize {
    let mut recorded = 0;
    for (i, name) in names.iter().enumerate() {
        let server_id = server_ids[i % server_ids.len()];
        match ask(control, name, sid(server_id, 128 + i as u32)).await {
            Ok(true) => recorded += 1,
            Err(e) if e.code() == Code::ResourceExhausted => {}
            other => panic!("{name}: {other:?}"),
        }
    }
    recorded
}

/// A real user asked through `control` from the proxy `server_id` while the flood is pending:
/// recorded, and registered.
async fn real_user_gets_in(control: &InProcessControl, name: &str, server_id: u32) {
    let recorded = ask(control, name, sid(server_id, 7))
        .await
        .unwrap_or_else(|e| panic!("the real user {name} was refused: {e:?}"));
    assert!(recorded, "{name}'s request recorded");
    wait_until(DEADLINE, &format!("{name} registered"), || async {
        match control.core.user_coin(name).expect("valid") {
            Some(record) if record.coin == DEFAULT_COIN => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"));
}

fn flood_config(c: &mut ControlConfig, backend: &Backend) {
    autoreg_config(c, backend);
    c.auto_reg_max_pending = 10;
    c.auto_reg_max_pending_per_proxy = 4;
    c.auto_reg_max_pending_per_pattern = 4;
}

/// Junk names the backend does not answer (they stay pending for `AutoRegTimeoutSeconds`):
/// 30 random-looking names from one proxy, then 30 names of one pattern from 30 proxies. Each
/// flood gets 4 places of the 10 (the bounds per proxy and per pattern), and a real user asking
/// through `real` meanwhile is recorded and registered.
async fn floods_leave_room(flooded: &InProcessControl, real: &InProcessControl, backend: &Backend) {
    let random: Vec<String> = (0..30)
        .map(|i| {
            format!(
                "hang-{}",
                ["qx", "vb", "zk", "jw", "pf"][i % 5].repeat(1 + i / 5)
            )
        })
        .collect();
    // hang-… names share a pattern: one proxy's flood of them meets both bounds at 4.
    assert_eq!(flood(flooded, &random, &[1]).await, 4, "one proxy's flood");
    real_user_gets_in(real, "alice", 2).await;
    let patterned: Vec<String> = (0..30).map(|i| format!("hang-p{i}")).collect();
    let proxies: Vec<u32> = (10..40).collect();
    // The first flood is still pending (4 of the pattern's 4 places): none of these fits yet.
    let recorded = flood(flooded, &patterned, &proxies).await;
    assert!(recorded <= 4, "{recorded} of one pattern recorded");
    real_user_gets_in(real, "bob", 10).await;
    backend.assert_no_problems();
}

#[tokio::test]
async fn embedded_a_junk_flood_does_not_lock_out_real_users() {
    let backend = Backend::start().await;
    let control = InProcessControl::start_with(|c| flood_config(c, &backend))
        .await
        .expect("control");
    floods_leave_room(&control, &control, &backend).await;
}

#[tokio::test]
async fn zookeeper_a_junk_flood_does_not_lock_out_real_users() {
    let zk = ZooKeeperServer::shared().expect("ZooKeeper");
    let root = unique_root("autoreg-flood");
    let backend = Backend::start().await;
    let start = || {
        InProcessControl::start_with(|c| {
            zk_config(c, zk, &root);
            flood_config(c, &backend);
        })
    };
    let a = start().await.expect("replica A");
    floods_leave_room(&a, &a, &backend).await;
    // The flood through one replica, the real users through another.
    let b = start().await.expect("replica B");
    let client = zk.connect(SESSION).await.expect("client");
    until_nothing_pending(&client, &root).await;
    let random: Vec<String> = (0..30)
        .map(|i| format!("hang-r{}", "x".repeat(i)))
        .collect();
    assert_eq!(flood(&a, &random, &[3]).await, 4, "one proxy's flood on A");
    real_user_gets_in(&b, "carol", 4).await;
}

/// The bound per proxy counts the pending nodes a replica did not record itself (a Go proxy's,
/// another replica's): from the session ID in each node.
#[tokio::test]
async fn zookeeper_the_bound_per_proxy_counts_nodes_written_elsewhere() {
    let zk = ZooKeeperServer::shared().expect("ZooKeeper");
    let root = unique_root("autoreg-view");
    let backend = Backend::start().await;
    let control = InProcessControl::start_with(|c| {
        zk_config(c, zk, &root);
        flood_config(c, &backend);
        // The backend never answers hang-… names: they stay pending this long.
        c.auto_reg_timeout_seconds = 30;
    })
    .await
    .expect("control on ZooKeeper");
    let client = zk.connect(SESSION).await.expect("client");
    // Four requests of the proxy with server ID 5, written as a Go proxy would.
    let names: Vec<String> = (0..4).map(|i| format!("hang-go{i}")).collect();
    for (i, name) in names.iter().enumerate() {
        let data = json!({"SessionID": sid(5, 128 + i as u32), "Worker": format!("{name}.x")});
        client
            .create(
                &format!("{root}/autoreg/{name}"),
                data.to_string().into_bytes(),
                Acl::open_unsafe().clone(),
                CreateMode::Persistent,
            )
            .await
            .unwrap_or_else(|e| panic!("create {name}: {e:?}"));
    }
    // Claimed: the replica has read the directory, and so the nodes' sources.
    let claims = format!(
        "{root}/switchyard/{}/switcher/autoreg-claims",
        root.trim_start_matches('/')
    );
    wait_until(DEADLINE, "the four nodes claimed", || async {
        match children(&client, &claims).await.len() {
            4 => Ok(()),
            n => Err(format!("{n} claims")),
        }
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let err = ask(&control, "zzprobe", sid(5, 7))
        .await
        .expect_err("proxy 5 already has 4 pending");
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(err.message().contains("server ID 5"), "{err:?}");
    // Another proxy still fits.
    assert!(ask(&control, "zzprobe", sid(6, 7)).await.expect("proxy 6"));
}

/// Shutdown during the `IntervalSeconds` wait leaves the request pending (the node stays); the
/// next control service processes it again and creates the user.
#[tokio::test]
async fn zookeeper_shutdown_during_the_wait_leaves_the_request_pending() {
    let zk = ZooKeeperServer::shared().expect("ZooKeeper");
    let root = unique_root("autoreg-stop");
    let backend = Backend::start().await;
    let (root_ref, backend_ref) = (&root, &backend);
    let start = |interval_seconds: u64| {
        InProcessControl::start_with(move |c| {
            zk_config(c, zk, root_ref);
            autoreg_config(c, backend_ref);
            c.user_auto_reg_api.interval_seconds = interval_seconds;
        })
    };
    let first = start(600).await.expect("control on ZooKeeper");
    assert!(ask(&first, "waiter", sid(1, 1)).await.expect("request"));
    wait_until(DEADLINE, "the backend's answer", || async {
        match backend.posts_for("waiter") {
            1 => Ok(()),
            n => Err(format!("{n} POSTs")),
        }
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    first.shutdown().await.expect("shutdown");
    let client = zk.connect(SESSION).await.expect("client");
    assert_eq!(
        children(&client, &format!("{root}/autoreg")).await,
        ["waiter"],
        "the interrupted request stays pending"
    );
    let second = start(1).await.expect("control on ZooKeeper");
    wait_until(DEADLINE, "waiter registered", || async {
        match second.core.user_coin("waiter").expect("valid") {
            Some(record) if record.coin == DEFAULT_COIN => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    until_nothing_pending(&client, &root).await;
    assert_eq!(
        backend.posts_for("waiter"),
        2,
        "POSTed again after the restart"
    );
}

/// A name the backend refused is answered NOT_FOUND at once, without a POST, while it is
/// remembered; so is a pending request for it written straight into ZooKeeper (`client`).
async fn refused_names_are_remembered(
    control: &InProcessControl,
    backend: &Backend,
    zk: Option<(&ZooKeeper, &str)>,
) {
    assert!(
        ask(control, "zero-r", sid(1, 1))
            .await
            .expect("first request")
    );
    wait_until(DEADLINE, "the refusal to be remembered", || async {
        match ask(control, "zero-r", sid(1, 2)).await {
            Err(e) if e.code() == Code::NotFound => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    for i in 0..5 {
        let err = ask(control, "zero-r", sid(2, i))
            .await
            .expect_err("remembered");
        assert_eq!(err.code(), Code::NotFound, "{err:?}");
    }
    if let Some((client, root)) = zk {
        // A Go proxy's node for the name: removed without a POST.
        client
            .create(
                &format!("{root}/autoreg/zero-r"),
                br#"{"SessionID":16777345,"Worker":"zero-r.go"}"#.to_vec(),
                Acl::open_unsafe().clone(),
                CreateMode::Persistent,
            )
            .await
            .expect("create");
        until_nothing_pending(client, root).await;
    }
    assert_eq!(backend.posts_for("zero-r"), 1, "POSTed once");
    assert_eq!(control.core.user_coin("zero-r").expect("valid"), None);
    backend.assert_no_problems();
}

#[tokio::test]
async fn embedded_a_refused_name_is_not_posted_again_within_the_ttl() {
    let backend = Backend::start().await;
    let control = InProcessControl::start_with(|c| autoreg_config(c, &backend))
        .await
        .expect("control");
    refused_names_are_remembered(&control, &backend, None).await;
}

#[tokio::test]
async fn zookeeper_a_refused_name_is_not_posted_again_within_the_ttl() {
    let zk = ZooKeeperServer::shared().expect("ZooKeeper");
    let root = unique_root("autoreg-refused");
    let backend = Backend::start().await;
    let control = InProcessControl::start_with(|c| {
        zk_config(c, zk, &root);
        autoreg_config(c, &backend);
    })
    .await
    .expect("control on ZooKeeper");
    let client = zk.connect(SESSION).await.expect("client");
    refused_names_are_remembered(&control, &backend, Some((&client, &root))).await;
}

/// Once `AutoRegRefusedSeconds` have passed, the name is asked again.
#[tokio::test]
async fn a_refused_name_is_asked_again_after_the_ttl() {
    let backend = Backend::start().await;
    let control = InProcessControl::start_with(|c| {
        autoreg_config(c, &backend);
        c.auto_reg_refused_seconds = 1;
    })
    .await
    .expect("control");
    assert!(ask(&control, "zero-t", 1).await.expect("first request"));
    wait_until(DEADLINE, "the refusal to be remembered", || async {
        match ask(&control, "zero-t", 2).await {
            Err(e) if e.code() == Code::NotFound => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(backend.posts_for("zero-t"), 1);
    wait_until(DEADLINE, "the refusal to be forgotten", || async {
        match ask(&control, "zero-t", 3).await {
            Ok(true) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    wait_until(DEADLINE, "a second POST", || async {
        match backend.posts_for("zero-t") {
            2 => Ok(()),
            n => Err(format!("{n} POSTs")),
        }
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"));
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
    for key in [
        "AutoRegMaxConcurrent",
        "AutoRegMaxPendingPerProxy",
        "AutoRegMaxPendingPerPattern",
    ] {
        let mut c = base();
        c[key] = json!(0);
        assert_eq!(config_error_key(c), Some(key));
    }
    // The defaults, and the settings read.
    assert_eq!(settings.max_concurrent, 16);
    assert_eq!(settings.max_pending_per_proxy, 250);
    assert_eq!(settings.max_pending_per_pattern, 100);
    assert_eq!(settings.refused_ttl, Duration::from_secs(300));
    let mut c = base();
    c["AutoRegMaxConcurrent"] = json!(3);
    c["AutoRegMaxPendingPerProxy"] = json!(4);
    c["AutoRegMaxPendingPerPattern"] = json!(5);
    c["AutoRegRefusedSeconds"] = json!(0);
    let (config, _) = ControlConfig::from_json(&c.to_string()).expect("parses");
    let settings = config.auto_reg().expect("valid").expect("enabled");
    assert_eq!(
        (
            settings.max_concurrent,
            settings.max_pending_per_proxy,
            settings.max_pending_per_pattern,
            settings.refused_ttl
        ),
        (3, 4, 5, Duration::ZERO)
    );
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
