//! The HTTP switch API of SPEC §6 through a real HTTP client on a real socket: auth, `/switch`
//! by query and by form, the multi-user routes, every error number the API can produce, bad
//! bodies, case-insensitive names and shutdown.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use async_trait::async_trait;
use reqwest::{StatusCode, header};
use serde_json::{Value, json};
use switchyard_control::{
    ControlPlane,
    core::{CoreSettings, SwitchCore},
    http::{MULTI_USER_BODY_LIMIT, SWITCH_BODY_LIMIT, SwitchApiAuth, router, serve},
    store::{
        ChangeReceiver, HoldSwitch, KeyPresence, PendingOutcome, PendingSwitch, Record, RecordKey,
        StoreError, StoreWrite, UserCoinStore, embedded::EmbeddedStore,
    },
    validate::CoinSet,
};
use switchyard_initializer::http_server::HttpLimits;
use switchyard_tests::control::{TEST_COINS, test_config};
use tempfile::TempDir;
use tokio::{net::TcpListener, sync::watch, task::JoinHandle};
use tokio_util::sync::CancellationToken;

const USER: &str = "switcher-admin";
const PASSWORD: &str = "s3cret:with:colons";

/// The embedded store, with writes that fail while `fail_writes` is set: a real store that
/// refuses for real, so that the API's 107 path runs end to end.
struct FailingStore {
    inner: EmbeddedStore,
    fail_writes: AtomicBool,
}

#[async_trait]
impl UserCoinStore for FailingStore {
    fn store_id(&self) -> &str {
        self.inner.store_id()
    }

    fn changes(
        &self,
        presence: Arc<dyn KeyPresence>,
        shutdown: CancellationToken,
    ) -> Result<ChangeReceiver, StoreError> {
        self.inner.changes(presence, shutdown)
    }

    async fn write(&self, writes: Vec<StoreWrite>) -> Vec<Result<Record, StoreError>> {
        if self.fail_writes.load(Ordering::SeqCst) {
            let e = StoreError::Unavailable("writes are switched off".into());
            return writes.iter().map(|_| Err(e.clone())).collect();
        }
        self.inner.write(writes).await
    }

    async fn read_fresh(&self, key: &RecordKey) -> Result<Option<Record>, StoreError> {
        self.inner.read_fresh(key).await
    }

    fn available(&self) -> watch::Receiver<bool> {
        self.inner.available()
    }

    fn parts(&self) -> Vec<(&'static str, watch::Receiver<bool>)> {
        self.inner.parts()
    }

    fn kind(&self) -> &'static str {
        "failing-embedded"
    }

    async fn create_if_absent(
        &self,
        writes: Vec<StoreWrite>,
    ) -> Vec<Result<Option<Record>, StoreError>> {
        self.inner.create_if_absent(writes).await
    }

    async fn put_pending(
        &self,
        switches: Vec<HoldSwitch>,
    ) -> Vec<Result<PendingSwitch, StoreError>> {
        self.inner.put_pending(switches).await
    }

    async fn cancel_pending(&self, users: Vec<String>) -> Result<(), StoreError> {
        self.inner.cancel_pending(users).await
    }

    async fn apply_pending(
        &self,
        pending: Vec<PendingSwitch>,
    ) -> Vec<Result<PendingOutcome, StoreError>> {
        self.inner.apply_pending(pending).await
    }

    async fn pending(&self, user: &str) -> Result<Option<PendingSwitch>, StoreError> {
        self.inner.pending(user).await
    }

    async fn all_pending(&self) -> Result<Vec<PendingSwitch>, StoreError> {
        self.inner.all_pending().await
    }

    async fn first_seen(
        &self,
        coin: &str,
        users: Vec<String>,
    ) -> Result<Vec<Option<u64>>, StoreError> {
        self.inner.first_seen(coin, users).await
    }

    async fn record_first_seen(
        &self,
        coin: &str,
        users: Vec<String>,
        seen_at: u64,
    ) -> Result<(), StoreError> {
        self.inner.record_first_seen(coin, users, seen_at).await
    }

    async fn get_marker(&self, name: &str) -> Result<Option<String>, StoreError> {
        self.inner.get_marker(name).await
    }

    async fn set_marker(&self, name: &str, value: &str) -> Result<(), StoreError> {
        self.inner.set_marker(name, value).await
    }
}

/// The switch API served on loopback over a core of its own.
struct Api {
    base: String,
    core: Arc<SwitchCore>,
    store: Option<Arc<FailingStore>>,
    client: reqwest::Client,
    shutdown: CancellationToken,
    task: Option<JoinHandle<std::io::Result<()>>>,
    _dir: TempDir,
}

impl Api {
    /// Over a core on a [`FailingStore`] with the test coins.
    async fn start(case_insensitive: bool, max_batch: usize) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Arc::new(FailingStore {
            inner: EmbeddedStore::open(dir.path()).expect("open the embedded store"),
            fail_writes: AtomicBool::new(false),
        });
        let settings = CoreSettings {
            coins: CoinSet::new(TEST_COINS).expect("test coins are valid"),
            case_insensitive,
            max_batch,
            safety: None,
            case_index: false,
            pending_reconcile: std::time::Duration::from_secs(300),
        };
        let dyn_store: Arc<dyn UserCoinStore> = store.clone();
        let shutdown = CancellationToken::new();
        let core = Arc::new(
            SwitchCore::open(dyn_store, settings, shutdown.clone())
                .await
                .expect("open the core"),
        );
        Self::serve_core(core, Some(store), dir, shutdown).await
    }

    /// Over the core of a real [`ControlPlane`] opened on the tests' control config.
    async fn start_control_plane() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let shutdown = CancellationToken::new();
        let plane = ControlPlane::open(&test_config(dir.path()), shutdown.clone())
            .await
            .expect("open the control plane");
        Self::serve_core(Arc::clone(plane.core()), None, dir, shutdown).await
    }

    async fn serve_core(
        core: Arc<SwitchCore>,
        store: Option<Arc<FailingStore>>,
        dir: TempDir,
        shutdown: CancellationToken,
    ) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr: SocketAddr = listener.local_addr().expect("local_addr");
        let app = router(Arc::clone(&core), SwitchApiAuth::new(USER, PASSWORD));
        let task = tokio::spawn(serve(
            listener,
            app,
            HttpLimits::default(),
            shutdown.clone(),
        ));
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()
            .expect("client");
        Self {
            base: format!("http://{addr}"),
            core,
            store,
            client,
            shutdown,
            task: Some(task),
            _dir: dir,
        }
    }

    fn url(&self, path_and_query: &str) -> String {
        format!("{}{path_and_query}", self.base)
    }

    fn fail_writes(&self, fail: bool) {
        self.store
            .as_ref()
            .expect("a fixture over a FailingStore")
            .fail_writes
            .store(fail, Ordering::SeqCst);
    }

    /// An authenticated GET of `/switch` with these query parameters.
    async fn switch_get(&self, params: &[(&str, &str)]) -> (StatusCode, Value) {
        let response = self
            .client
            .get(self.url("/switch"))
            .query(params)
            .basic_auth(USER, Some(PASSWORD))
            .send()
            .await
            .expect("GET /switch");
        read(response).await
    }

    /// An authenticated POST of `/switch` with this form body.
    async fn switch_post_form(&self, params: &[(&str, &str)]) -> (StatusCode, Value) {
        let response = self
            .client
            .post(self.url("/switch"))
            .form(params)
            .basic_auth(USER, Some(PASSWORD))
            .send()
            .await
            .expect("POST /switch");
        read(response).await
    }

    /// An authenticated POST of `path` with this JSON body.
    async fn post_json(&self, path: &str, body: &Value) -> (StatusCode, Value) {
        self.post_raw(path, body.to_string(), "application/json")
            .await
    }

    async fn post_raw(
        &self,
        path: &str,
        body: impl Into<reqwest::Body>,
        content_type: &str,
    ) -> (StatusCode, Value) {
        let response = self
            .client
            .post(self.url(path))
            .header(header::CONTENT_TYPE, content_type)
            .body(body)
            .basic_auth(USER, Some(PASSWORD))
            .send()
            .await
            .expect("POST");
        read(response).await
    }

    fn coin_of(&self, user: &str) -> Option<String> {
        self.core
            .user_coin(user)
            .expect("a valid name")
            .map(|r| r.coin)
    }

    async fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(task) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(10), task)
                .await
                .expect("serve stops within 10 s of shutdown")
                .expect("serve task did not panic")
                .expect("serve ends without an error");
        }
    }
}

impl Drop for Api {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

async fn read(response: reqwest::Response) -> (StatusCode, Value) {
    let status = response.status();
    let text = response.text().await.expect("read the body");
    let body = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("body is not JSON ({e}): {text:?} (status {status})"));
    (status, body)
}

fn ok_reply() -> Value {
    json!({"err_no": 0, "err_msg": "", "success": true})
}

fn api_error(err_no: u32, err_msg: &str) -> Value {
    json!({"err_no": err_no, "err_msg": err_msg, "success": false})
}

/// Asserts an HTTP 200 answer with the exact body `expected`.
#[track_caller]
fn assert_reply(got: (StatusCode, Value), expected: Value) {
    assert_eq!(got.0, StatusCode::OK, "status; body {}", got.1);
    assert_eq!(got.1, expected);
}

/// Asserts a refusal before the switch logic: HTTP 200 (SPEC §6: "Replies are HTTP 200", as
/// the Go API server answered), `err_no` the HTTP-like number, in the API's JSON shape.
#[track_caller]
fn assert_refused(got: (StatusCode, Value), err_no: u16) {
    assert_eq!(got.0, StatusCode::OK, "status; body {}", got.1);
    assert_eq!(got.1["success"], json!(false), "{}", got.1);
    assert_eq!(got.1["err_no"], json!(err_no), "{}", got.1);
    assert!(
        got.1["err_msg"].as_str().is_some_and(|m| !m.is_empty()),
        "{}",
        got.1
    );
    assert_eq!(
        got.1.as_object().map(|o| o.len()),
        Some(3),
        "err_no, err_msg, success and nothing else: {}",
        got.1
    );
}

fn multi(entries: &[(&str, Vec<String>)]) -> Value {
    json!({
        "usercoins": entries
            .iter()
            .map(|(coin, punames)| json!({"coin": coin, "punames": punames}))
            .collect::<Vec<_>>()
    })
}

const MULTI_PATHS: [&str; 2] = ["/switch/multi-user", "/switch-multi-user"];

#[tokio::test]
async fn requests_without_the_right_credentials_get_401_with_a_challenge() {
    let api = Api::start(false, 10_000).await;
    let routes = [
        (reqwest::Method::GET, "/switch?puname=alice&coin=btc"),
        (reqwest::Method::POST, "/switch?puname=alice&coin=btc"),
        (reqwest::Method::POST, "/switch/multi-user"),
        (reqwest::Method::POST, "/switch-multi-user"),
        (reqwest::Method::POST, "/subpool/get-coinbase"),
        (reqwest::Method::POST, "/subpool-get-coinbase"),
        (reqwest::Method::POST, "/subpool/update-coinbase"),
        (reqwest::Method::POST, "/subpool-update-coinbase"),
    ];
    let body = multi(&[("btc", vec!["alice".into()])]).to_string();
    for (method, path) in &routes {
        let attempts: [(&str, Option<(&str, &str)>); 5] = [
            ("no credentials", None),
            ("wrong password", Some((USER, "s3cret:with:colon"))),
            ("wrong user", Some(("switcher-admiN", PASSWORD))),
            ("empty credentials", Some(("", ""))),
            ("password as user", Some((PASSWORD, USER))),
        ];
        for (what, credentials) in attempts {
            let mut request = api
                .client
                .request(method.clone(), api.url(path))
                .header(header::CONTENT_TYPE, "application/json")
                .body(body.clone());
            if let Some((user, password)) = credentials {
                request = request.basic_auth(user, Some(password));
            }
            let response = request.send().await.expect("send");
            assert_eq!(
                response.status(),
                StatusCode::UNAUTHORIZED,
                "{method} {path}: {what}"
            );
            let challenge = response
                .headers()
                .get(header::WWW_AUTHENTICATE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_else(|| panic!("{method} {path}: {what}: no WWW-Authenticate"))
                .to_owned();
            assert!(
                challenge.starts_with("Basic realm="),
                "{method} {path}: {what}: {challenge:?}"
            );
            let (_, reply) = read(response).await;
            assert_eq!(reply["success"], json!(false), "{reply}");
        }
        // A header that is not Basic, or not base64, is refused the same way.
        for value in ["Bearer abc", "Basic not-base64!", "Basic"] {
            let response = api
                .client
                .request(method.clone(), api.url(path))
                .header(header::AUTHORIZATION, value)
                .send()
                .await
                .expect("send");
            assert_eq!(response.status(), StatusCode::UNAUTHORIZED, "{value:?}");
        }
    }
    assert_eq!(api.coin_of("alice"), None, "a refused request wrote");
    assert_eq!(api.core.index().user_count(), 0);

    // The right credentials pass.
    assert_reply(
        api.switch_get(&[("puname", "alice"), ("coin", "btc")])
            .await,
        ok_reply(),
    );
    assert_eq!(api.coin_of("alice").as_deref(), Some("btc"));
    // The sub-pool routes of a router without ZKSubPoolUpdateBaseDir: disabled, as in Go.
    for path in &routes[4..] {
        assert_reply(
            api.post_raw(
                path.1,
                r#"{"coin":"btc","subpool_name":"p"}"#,
                "application/json",
            )
            .await,
            api_error(403, "API disabled"),
        );
    }
    api.stop().await;
}

#[tokio::test]
async fn switch_by_get_query_creates_switches_and_re_announces() {
    // Over the real control plane's core, as the service will run it.
    let api = Api::start_control_plane().await;

    assert_reply(
        api.switch_get(&[("puname", "alice"), ("coin", "btc")])
            .await,
        ok_reply(),
    );
    let created = api
        .core
        .user_coin("alice")
        .expect("valid")
        .expect("alice was created");
    assert_eq!(created.coin, "btc");

    // An existing user gets the new coin.
    assert_reply(
        api.switch_get(&[("puname", "alice"), ("coin", "bch")])
            .await,
        ok_reply(),
    );
    let switched = api.core.user_coin("alice").expect("valid").expect("alice");
    assert_eq!(switched.coin, "bch");
    assert!(switched.revision > created.revision);

    // The same coin again is accepted and re-announced with a new revision.
    assert_reply(
        api.switch_get(&[("puname", "alice"), ("coin", "bch")])
            .await,
        ok_reply(),
    );
    let again = api.core.user_coin("alice").expect("valid").expect("alice");
    assert_eq!(again.coin, "bch");
    assert!(again.revision > switched.revision);

    // Names are taken as they are in case-sensitive mode.
    assert_reply(
        api.switch_get(&[("puname", "Bob"), ("coin", "ltc")]).await,
        ok_reply(),
    );
    assert_eq!(api.coin_of("Bob").as_deref(), Some("ltc"));
    assert_eq!(api.coin_of("bob"), None);
    api.stop().await;
}

#[tokio::test]
async fn switch_by_post_form_and_by_post_query() {
    let api = Api::start(false, 10_000).await;

    assert_reply(
        api.switch_post_form(&[("puname", "carol"), ("coin", "ltc")])
            .await,
        ok_reply(),
    );
    assert_eq!(api.coin_of("carol").as_deref(), Some("ltc"));

    // A POST with its parameters in the query string and no body.
    let response = api
        .client
        .post(api.url("/switch?puname=dave&coin=bch"))
        .basic_auth(USER, Some(PASSWORD))
        .send()
        .await
        .expect("POST");
    assert_reply(read(response).await, ok_reply());
    assert_eq!(api.coin_of("dave").as_deref(), Some("bch"));

    // Body parameters win over query parameters; missing ones come from the query.
    let response = api
        .client
        .post(api.url("/switch?puname=erin&coin=btc"))
        .form(&[("coin", "ltc")])
        .basic_auth(USER, Some(PASSWORD))
        .send()
        .await
        .expect("POST");
    assert_reply(read(response).await, ok_reply());
    assert_eq!(api.coin_of("erin").as_deref(), Some("ltc"));

    // Percent-encoded names arrive decoded.
    assert_reply(
        api.switch_post_form(&[("puname", "fr ank+矿工"), ("coin", "btc")])
            .await,
        ok_reply(),
    );
    assert_eq!(api.coin_of("fr ank+矿工").as_deref(), Some("btc"));
    api.stop().await;
}

#[tokio::test]
async fn every_switch_error_number_is_answered_and_writes_nothing() {
    let api = Api::start(false, 10_000).await;
    let long_name = "a".repeat(129);
    /// Request parameters, and the error number and message they must get.
    type Case<'a> = (Vec<(&'a str, &'a str)>, u32, &'a str);
    let cases: Vec<Case> = vec![
        (vec![("coin", "btc")], 101, "puname is empty"),
        (
            vec![("puname", ""), ("coin", "btc")],
            101,
            "puname is empty",
        ),
        (
            vec![("puname", "a/b"), ("coin", "btc")],
            102,
            "puname invalid",
        ),
        (
            vec![("puname", "/"), ("coin", "btc")],
            102,
            "puname invalid",
        ),
        (
            vec![("puname", ".."), ("coin", "btc")],
            102,
            "puname invalid",
        ),
        (
            vec![("puname", "a..b"), ("coin", "btc")],
            102,
            "puname invalid",
        ),
        (
            vec![("puname", "a\nb"), ("coin", "btc")],
            102,
            "puname invalid",
        ),
        (
            vec![("puname", &long_name), ("coin", "btc")],
            102,
            "puname invalid",
        ),
        (vec![("puname", "alice")], 103, "coin is empty"),
        (
            vec![("puname", "alice"), ("coin", "")],
            103,
            "coin is empty",
        ),
        (
            vec![("puname", "alice"), ("coin", "doge")],
            104,
            "coin is inexistent",
        ),
        (
            vec![("puname", "alice"), ("coin", "BTC")],
            104,
            "coin is inexistent",
        ),
        // The puname is checked before the coin.
        (
            vec![("puname", "a/b"), ("coin", "doge")],
            102,
            "puname invalid",
        ),
        (vec![], 101, "puname is empty"),
    ];
    for (params, err_no, err_msg) in &cases {
        assert_reply(api.switch_get(params).await, api_error(*err_no, err_msg));
        assert_reply(
            api.switch_post_form(params).await,
            api_error(*err_no, err_msg),
        );
    }
    assert_eq!(api.core.index().user_count(), 0, "a refused switch wrote");
    assert_eq!(api.core.index().revision(), 0, "a refused switch wrote");
    api.stop().await;
}

#[tokio::test]
async fn a_failing_store_write_answers_107() {
    let api = Api::start(false, 100).await;
    assert_reply(
        api.switch_get(&[("puname", "alice"), ("coin", "btc")])
            .await,
        ok_reply(),
    );

    api.fail_writes(true);
    let failed = api_error(107, "write record failed");
    assert_reply(
        api.switch_get(&[("puname", "alice"), ("coin", "bch")])
            .await,
        failed.clone(),
    );
    assert_reply(
        api.switch_post_form(&[("puname", "bob"), ("coin", "bch")])
            .await,
        failed.clone(),
    );
    let names: Vec<String> = (0..250).map(|i| format!("m{i}")).collect();
    for path in MULTI_PATHS {
        assert_reply(
            api.post_json(path, &multi(&[("ltc", names.clone())])).await,
            failed.clone(),
        );
    }
    assert_eq!(api.coin_of("alice").as_deref(), Some("btc"));
    assert_eq!(api.coin_of("bob"), None);
    assert_eq!(api.core.index().user_count(), 1);

    // Once the store takes writes again, so does the API.
    api.fail_writes(false);
    assert_reply(
        api.switch_get(&[("puname", "alice"), ("coin", "bch")])
            .await,
        ok_reply(),
    );
    assert_eq!(api.coin_of("alice").as_deref(), Some("bch"));
    api.stop().await;
}

#[tokio::test]
async fn multi_user_switches_a_thousand_users_on_both_paths() {
    // A max_batch below the request size: the API writes in several core calls.
    let api = Api::start(false, 300).await;
    for (round, path) in MULTI_PATHS.iter().enumerate() {
        let mut expected = Vec::new();
        let entries: Vec<(&str, Vec<String>)> = TEST_COINS
            .iter()
            .enumerate()
            .map(|(c, coin)| {
                let coin_index = (c + round) % TEST_COINS.len();
                let names: Vec<String> = (0..1_000)
                    .filter(|i| i % TEST_COINS.len() == coin_index)
                    .map(|i| format!("user{i:04}"))
                    .collect();
                for name in &names {
                    expected.push((name.clone(), (*coin).to_owned()));
                }
                (*coin, names)
            })
            .collect();
        assert_eq!(expected.len(), 1_000);
        assert_reply(api.post_json(path, &multi(&entries)).await, ok_reply());
        for (name, coin) in &expected {
            assert_eq!(
                api.coin_of(name).as_deref(),
                Some(coin.as_str()),
                "{path}: {name}"
            );
        }
        assert_eq!(api.core.index().user_count(), 1_000, "{path}");
    }
    api.stop().await;
}

#[tokio::test]
async fn an_invalid_entry_in_a_multi_user_batch_writes_nothing() {
    let api = Api::start(false, 300).await;
    let good: Vec<String> = (0..700).map(|i| format!("good{i}")).collect();
    let bad_cases: Vec<(Value, Value)> = vec![
        (
            multi(&[
                ("btc", good.clone()),
                ("bch", vec!["x".into(), "bad/name".into()]),
            ]),
            api_error(102, "puname invalid"),
        ),
        (
            multi(&[("btc", good.clone()), ("ltc", vec!["..".into()])]),
            api_error(102, "puname invalid"),
        ),
        (
            multi(&[("btc", good.clone()), ("ltc", vec![String::new()])]),
            api_error(101, "puname is empty"),
        ),
        (
            multi(&[("btc", good.clone()), ("doge", vec!["y".into()])]),
            api_error(104, "coin is inexistent"),
        ),
        (
            multi(&[("btc", good.clone()), ("", vec!["y".into()])]),
            api_error(103, "coin is empty"),
        ),
        (
            json!({"usercoins": [{"coin": "btc", "punames": good}, {"punames": ["z"]}]}),
            api_error(103, "coin is empty"),
        ),
        // The first invalid entry's error is the answer.
        (
            multi(&[("doge", vec!["y".into()]), ("btc", vec!["a/b".into()])]),
            api_error(104, "coin is inexistent"),
        ),
    ];
    for path in MULTI_PATHS {
        for (body, expected) in &bad_cases {
            assert_reply(api.post_json(path, body).await, expected.clone());
            assert_eq!(api.core.index().user_count(), 0, "{path}: {expected}");
            assert_eq!(api.core.index().revision(), 0, "{path}: {expected}");
        }
    }
    api.stop().await;
}

#[tokio::test]
async fn multi_user_without_users_answers_108() {
    let api = Api::start(false, 10_000).await;
    let empty = api_error(108, "usercoins is empty");
    for path in MULTI_PATHS {
        for body in [
            json!({"usercoins": []}),
            json!({}),
            json!({"usercoins": null}),
            json!({"usercoins": [{"coin": "btc", "punames": []}]}),
            json!({"usercoins": [{"coin": "btc"}, {"coin": "doge", "punames": []}]}),
        ] {
            assert_reply(api.post_json(path, &body).await, empty.clone());
        }
    }
    assert_eq!(api.core.index().revision(), 0);
    api.stop().await;
}

#[tokio::test]
async fn unreadable_or_oversized_bodies_get_err_no_in_http_200() {
    let api = Api::start(false, 10_000).await;
    for path in MULTI_PATHS {
        for garbage in [
            "not json",
            "{\"usercoins\":",
            "[]",
            "{\"usercoins\": \"btc\"}",
            "{\"usercoins\": [{\"coin\": \"btc\", \"punames\": [1, 2]}]}",
            "{\"usercoins\": [[\"btc\", [\"a\"]]]}",
            "{\"usercoins\": [{\"coin\": 5, \"punames\": [\"a\"]}]}",
            "{\"usercoins\": [{\"coin\": \"btc\", \"punames\": \"a\"}]}",
            "",
        ] {
            let got = api.post_raw(path, garbage, "application/json").await;
            assert_refused(got, 400);
        }
        // The Go server took any method: an empty GET is an empty body.
        let response = api
            .client
            .get(api.url(path))
            .basic_auth(USER, Some(PASSWORD))
            .send()
            .await
            .expect("GET");
        assert_refused(read(response).await, 400);
        // Over the limit.
        let huge = vec![b' '; MULTI_USER_BODY_LIMIT + 1];
        let got = api.post_raw(path, huge, "application/json").await;
        assert_refused(got, 413);
    }
    assert_eq!(api.core.index().user_count(), 0, "a refused request wrote");

    // A /switch body that is not a form.
    let got = api
        .post_raw(
            "/switch",
            r#"{"puname":"alice","coin":"btc"}"#,
            "application/json",
        )
        .await;
    assert_refused(got, 400);
    let huge = format!(
        "puname=alice&coin=btc&pad={}",
        "x".repeat(SWITCH_BODY_LIMIT)
    );
    let got = api
        .post_raw("/switch", huge, "application/x-www-form-urlencoded")
        .await;
    assert_refused(got, 413);
    // Other methods are served as the Go server did: PUT reads a form body like POST.
    let response = api
        .client
        .put(api.url("/switch"))
        .form(&[("puname", "alice"), ("coin", "btc")])
        .basic_auth(USER, Some(PASSWORD))
        .send()
        .await
        .expect("PUT");
    assert_reply(read(response).await, ok_reply());
    assert_eq!(api.coin_of("alice").as_deref(), Some("btc"));

    // The largest multi-user body that fits is still read (100,000 names).
    let names: Vec<String> = (0..100_000).map(|i| format!("bulk-user-{i:06}")).collect();
    let body = multi(&[("btc", names)]).to_string();
    assert!(body.len() <= MULTI_USER_BODY_LIMIT);
    assert_reply(
        api.post_raw("/switch/multi-user", body, "application/json")
            .await,
        ok_reply(),
    );
    assert_eq!(api.core.index().user_count(), 100_001);
    assert_eq!(api.coin_of("bulk-user-099999").as_deref(), Some("btc"));
    api.stop().await;
}

#[tokio::test]
async fn case_insensitive_mode_lowercases_names() {
    let api = Api::start(true, 10_000).await;
    assert_reply(
        api.switch_get(&[("puname", "Alice"), ("coin", "btc")])
            .await,
        ok_reply(),
    );
    assert_reply(
        api.switch_post_form(&[("puname", "BOB"), ("coin", "bch")])
            .await,
        ok_reply(),
    );
    assert_reply(
        api.post_json(
            "/switch/multi-user",
            &multi(&[("ltc", vec!["CaRoL".into(), "DAVE".into()])]),
        )
        .await,
        ok_reply(),
    );
    let (users, _) = api.core.list_user_coins(None, 100);
    let stored: Vec<(String, String)> = users.into_iter().map(|u| (u.user, u.coin)).collect();
    assert_eq!(
        stored,
        [
            ("alice", "btc"),
            ("bob", "bch"),
            ("carol", "ltc"),
            ("dave", "ltc")
        ]
        .map(|(u, c)| (u.to_owned(), c.to_owned()))
    );

    // A later switch of another spelling reaches the same user.
    assert_reply(
        api.switch_get(&[("puname", "ALICE"), ("coin", "ltc")])
            .await,
        ok_reply(),
    );
    assert_eq!(api.coin_of("alice").as_deref(), Some("ltc"));
    assert_eq!(api.core.index().user_count(), 4);
    api.stop().await;
}

#[tokio::test]
async fn serve_stops_on_shutdown_and_refuses_connections_after() {
    let api = Api::start(false, 10_000).await;
    assert_reply(
        api.switch_get(&[("puname", "alice"), ("coin", "btc")])
            .await,
        ok_reply(),
    );
    let url = api.url("/switch?puname=alice&coin=bch");
    let client = api.client.clone();
    api.stop().await;
    let after = client
        .get(url)
        .basic_auth(USER, Some(PASSWORD))
        .send()
        .await;
    assert!(after.is_err(), "the API still answered after shutdown");
}

/// A `multipart/form-data` body as PHP's curl sends one when `CURLOPT_POSTFIELDS` is an array
/// (the Go server read it: `FormValue` parses multipart bodies too).
fn multipart_body(boundary: &str, fields: &[(&str, &str)]) -> String {
    let mut body = String::new();
    for (name, value) in fields {
        body.push_str(&format!(
            "--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n"
        ));
    }
    body.push_str(&format!("--{boundary}--\r\n"));
    body
}

#[tokio::test]
async fn switch_by_post_multipart_form_as_php_curl_sends_it() {
    let api = Api::start(false, 10_000).await;
    let boundary = "------------------------a1b2c3d4e5f60718";
    let content_type = format!("multipart/form-data; boundary={boundary}");

    let body = multipart_body(boundary, &[("puname", "mallory"), ("coin", "ltc")]);
    assert_reply(
        api.post_raw("/switch", body, &content_type).await,
        ok_reply(),
    );
    assert_eq!(api.coin_of("mallory").as_deref(), Some("ltc"));

    // Body parameters win over the query's, missing ones come from the query, a file part (any
    // bytes) is not a form value (Go keeps files apart), and names arrive as sent.
    let mut body = format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"puname\"; filename=\"x.bin\"\r\n\
         Content-Type: application/octet-stream\r\n\r\nnot-a-user"
    )
    .into_bytes();
    body.extend_from_slice(&[0xff, 0xfe, b'\r', b'\n']);
    body.extend_from_slice(multipart_body(boundary, &[("coin", "bch")]).as_bytes());
    assert_reply(
        api.post_raw("/switch?puname=矿工+one&coin=btc", body, &content_type)
            .await,
        ok_reply(),
    );
    assert_eq!(api.coin_of("矿工 one").as_deref(), Some("bch"));
    assert_eq!(api.coin_of("not-a-user"), None);

    // The API's own errors come from multipart bodies as from forms.
    let body = multipart_body(boundary, &[("puname", "mallory"), ("coin", "doge")]);
    assert_reply(
        api.post_raw("/switch", body, &content_type).await,
        api_error(104, "coin is inexistent"),
    );

    // Unreadable: no boundary, a body cut short; too large: over the limit.
    let body = multipart_body(boundary, &[("puname", "mallory"), ("coin", "btc")]);
    assert_refused(
        api.post_raw("/switch", body.clone(), "multipart/form-data")
            .await,
        400,
    );
    let cut = body[..body.len() / 2].to_string();
    assert_refused(api.post_raw("/switch", cut, &content_type).await, 400);
    let huge = multipart_body(
        boundary,
        &[
            ("puname", "mallory"),
            ("coin", "btc"),
            ("pad", &"x".repeat(SWITCH_BODY_LIMIT)),
        ],
    );
    assert_refused(api.post_raw("/switch", huge, &content_type).await, 413);
    assert_eq!(
        api.coin_of("mallory").as_deref(),
        Some("ltc"),
        "refused requests wrote nothing"
    );
    api.stop().await;
}
