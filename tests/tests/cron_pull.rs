//! The scheduled user→coin pull of SPEC §6 (`EnableCronJob`) against a real HTTP server on
//! loopback that records the query strings it is called with and serves scripted answers: the
//! `last_date` protocol, pairs applied through the core, `"user_coin":[]`, every kind of failed
//! round (which must neither advance `last_date` nor apply anything), invalid entries, chunking
//! by `max_batch`, and the loop with its shutdown.

use std::{
    collections::VecDeque,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::{
    Router,
    body::Body,
    extract::{RawQuery, State},
    http::{StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};
use serde_json::{Value, json};
use switchyard_control::{
    ControlPlane,
    core::{CoreSettings, SwitchCore},
    cron::{self, PullError, PullSummary, SettingsError, UserCoinMapPull, UserCoinMapPuller},
    store::{UserCoinStore, embedded::EmbeddedStore},
    validate::CoinSet,
};
use switchyard_tests::{
    control::{InProcessControl, TEST_COINS, test_config},
    wait::wait_until,
};
use tempfile::TempDir;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// The interval of single-round tests: only its use in `last_date` matters there.
const INTERVAL: Duration = Duration::from_secs(60);

/// One scripted answer of the fixture server.
#[derive(Clone)]
enum Answer {
    /// This status and body, with a `Content-Length`.
    Json(StatusCode, String),
    /// The body after a delay.
    Slow(Duration, String),
    /// The body in these chunks, without a `Content-Length`.
    Streamed(Vec<String>),
}

impl IntoResponse for Answer {
    fn into_response(self) -> Response {
        let json = [(header::CONTENT_TYPE, "application/json")];
        match self {
            Answer::Json(status, body) => (status, json, body).into_response(),
            Answer::Slow(_, body) => (json, body).into_response(),
            Answer::Streamed(chunks) => {
                let stream = futures::stream::iter(chunks.into_iter().map(Ok::<_, std::io::Error>));
                (json, Body::from_stream(stream)).into_response()
            }
        }
    }
}

/// A 200 answer with this body.
fn ok(body: impl Into<String>) -> Answer {
    Answer::Json(StatusCode::OK, body.into())
}

/// A successful page.
fn page(user_coin: Value, now_date: u64) -> String {
    json!({"err_no": 0, "err_msg": "", "data": {"user_coin": user_coin, "now_date": now_date}})
        .to_string()
}

type Fallback = Box<dyn Fn(usize) -> Answer + Send + Sync>;

struct FixtureState {
    /// The raw query of every call, in order (`None`: no query at all).
    queries: Mutex<Vec<Option<String>>>,
    script: Mutex<VecDeque<Answer>>,
    /// What to answer once the script is used up, given the call's index.
    fallback: Fallback,
}

/// The pool backend's `UserCoinMapURL` on loopback.
struct Backend {
    addr: SocketAddr,
    state: Arc<FixtureState>,
    stop: CancellationToken,
}

impl Backend {
    async fn start(script: Vec<Answer>) -> Self {
        Self::start_with(
            script,
            Box::new(|_| {
                Answer::Json(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "the fixture's script is used up".into(),
                )
            }),
        )
        .await
    }

    async fn start_with(script: Vec<Answer>, fallback: Fallback) -> Self {
        let state = Arc::new(FixtureState {
            queries: Mutex::new(Vec::new()),
            script: Mutex::new(script.into()),
            fallback,
        });
        let app = Router::new()
            .route("/usercoin", get(answer))
            .with_state(Arc::clone(&state));
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local_addr");
        let stop = CancellationToken::new();
        let stopped = stop.clone();
        tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async move { stopped.cancelled().await })
                .await
        });
        Self { addr, state, stop }
    }

    fn url(&self, path_and_query: &str) -> String {
        format!("http://{}{path_and_query}", self.addr)
    }

    fn queries(&self) -> Vec<Option<String>> {
        self.state.queries.lock().expect("queries").clone()
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn answer(State(state): State<Arc<FixtureState>>, RawQuery(query): RawQuery) -> Response {
    let index = {
        let mut queries = state.queries.lock().expect("queries");
        queries.push(query);
        queries.len() - 1
    };
    let next = state.script.lock().expect("script").pop_front();
    let answer = next.unwrap_or_else(|| (state.fallback)(index));
    if let Answer::Slow(delay, _) = &answer {
        tokio::time::sleep(*delay).await;
    }
    answer.into_response()
}

/// A core on an embedded store in a temporary directory.
struct Core {
    core: Arc<SwitchCore>,
    _shutdown: CancellationGuard,
    _dir: TempDir,
}

/// Cancels the core's background work when the test ends.
struct CancellationGuard(CancellationToken);

impl Drop for CancellationGuard {
    fn drop(&mut self) {
        self.0.cancel();
    }
}

impl Core {
    /// The core of a real [`ControlPlane`] on the tests' config (coins btc, bch, ltc).
    async fn control_plane() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let shutdown = CancellationToken::new();
        let plane = ControlPlane::open(&test_config(dir.path()), shutdown.clone())
            .await
            .expect("open the control plane");
        Self {
            core: Arc::clone(plane.core()),
            _shutdown: CancellationGuard(shutdown),
            _dir: dir,
        }
    }

    /// A core of its own with this batch limit.
    async fn with_max_batch(max_batch: usize) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let store: Arc<dyn UserCoinStore> =
            Arc::new(EmbeddedStore::open(dir.path()).expect("open the embedded store"));
        let settings = CoreSettings {
            coins: CoinSet::new(TEST_COINS).expect("test coins are valid"),
            case_insensitive: false,
            max_batch,
            safety: None,
            case_index: false,
            pending_reconcile: std::time::Duration::from_secs(300),
        };
        let shutdown = CancellationToken::new();
        let core = SwitchCore::open(store, settings, shutdown.clone())
            .await
            .expect("open the core");
        Self {
            core: Arc::new(core),
            _shutdown: CancellationGuard(shutdown),
            _dir: dir,
        }
    }

    fn coin_of(&self, user: &str) -> Option<String> {
        self.core
            .user_coin(user)
            .expect("a valid name")
            .map(|r| r.coin)
    }

    fn user_count(&self) -> usize {
        self.core.list_user_coins(None, 1_000_000).0.len()
    }
}

fn settings(url: String, timeout: Duration, max_body: usize) -> UserCoinMapPull {
    UserCoinMapPull {
        timeout,
        max_body,
        ..UserCoinMapPull::new(url, INTERVAL)
    }
}

fn puller(core: &Core, settings: UserCoinMapPull) -> UserCoinMapPuller {
    UserCoinMapPuller::new(Arc::clone(&core.core), settings).expect("valid settings")
}

fn q(s: &str) -> Option<String> {
    Some(s.to_owned())
}

#[tokio::test]
async fn the_first_pull_is_bare_and_later_ones_ask_since_now_date_minus_the_interval() {
    let backend = Backend::start(vec![
        ok(page(json!({"alice": "btc", "bob": "bch"}), 1_000)),
        ok(page(json!({"alice": "ltc"}), 1_100)),
        ok(page(json!({}), 1_200)),
    ])
    .await;
    let core = Core::control_plane().await;
    let mut puller = puller(
        &core,
        settings(backend.url("/usercoin"), Duration::from_secs(5), 4096),
    );
    assert_eq!(puller.last_date(), None);

    let first = puller.pull_once().await.expect("first round");
    assert_eq!(
        first,
        PullSummary {
            entries: 2,
            applied: 2,
            invalid: 0,
            now_date: 1_000
        }
    );
    assert_eq!(core.coin_of("alice").as_deref(), Some("btc"));
    assert_eq!(core.coin_of("bob").as_deref(), Some("bch"));
    assert_eq!(puller.last_date(), Some(940));

    let second = puller.pull_once().await.expect("second round");
    assert_eq!((second.applied, second.now_date), (1, 1_100));
    assert_eq!(core.coin_of("alice").as_deref(), Some("ltc"));
    assert_eq!(core.coin_of("bob").as_deref(), Some("bch"));

    let third = puller.pull_once().await.expect("third round");
    assert_eq!((third.entries, third.applied), (0, 0));
    assert_eq!(
        backend.queries(),
        vec![None, q("last_date=940"), q("last_date=1040")]
    );
    assert_eq!(core.user_count(), 2);
}

#[tokio::test]
async fn last_date_is_appended_to_a_url_that_has_a_query() {
    let backend = Backend::start(vec![
        ok(page(json!({"alice": "btc"}), 5_000)),
        ok(page(json!({}), 5_060)),
    ])
    .await;
    let core = Core::control_plane().await;
    let mut puller = puller(
        &core,
        settings(
            backend.url("/usercoin?token=abc"),
            Duration::from_secs(5),
            4096,
        ),
    );
    puller.pull_once().await.expect("first round");
    puller.pull_once().await.expect("second round");
    assert_eq!(
        backend.queries(),
        vec![q("token=abc"), q("token=abc&last_date=4940")]
    );
}

#[tokio::test]
async fn an_empty_array_is_an_empty_page_and_advances_last_date() {
    let backend = Backend::start(vec![
        ok(page(json!({"alice": "btc"}), 1_000)),
        ok(r#"{"err_no":0,"err_msg":"","data":{"user_coin":[],"now_date":2000}}"#),
        ok(r#"{"err_no":0,"data":{"user_coin":null,"now_date":3000}}"#),
        ok(r#"{"err_no":0,"data":{"now_date":4000}}"#),
        ok(page(json!({}), 5_000)),
    ])
    .await;
    let core = Core::control_plane().await;
    let mut puller = puller(
        &core,
        settings(backend.url("/usercoin"), Duration::from_secs(5), 4096),
    );
    puller.pull_once().await.expect("first round");
    for now_date in [2_000, 3_000, 4_000] {
        let empty = puller.pull_once().await.expect("an empty page");
        assert_eq!(
            empty,
            PullSummary {
                entries: 0,
                applied: 0,
                invalid: 0,
                now_date
            }
        );
    }
    puller.pull_once().await.expect("last round");
    assert_eq!(
        backend.queries(),
        vec![
            None,
            q("last_date=940"),
            q("last_date=1940"),
            q("last_date=2940"),
            q("last_date=3940"),
        ]
    );
    assert_eq!(core.coin_of("alice").as_deref(), Some("btc"));
    assert_eq!(core.user_count(), 1);
}

/// Serves a good page, then `bad`, then a good page again: the bad round must fail as `expect`
/// says, apply nothing, and leave `last_date` where the first round put it.
async fn assert_round_fails_without_advancing(
    what: &str,
    bad: Answer,
    timeout: Duration,
    expect: fn(&PullError) -> bool,
) {
    let backend = Backend::start(vec![
        ok(page(json!({"alice": "btc"}), 1_000)),
        bad,
        ok(page(json!({"carol": "ltc"}), 2_000)),
    ])
    .await;
    let core = Core::control_plane().await;
    let mut puller = puller(&core, settings(backend.url("/usercoin"), timeout, 4096));
    puller.pull_once().await.expect("first round");

    let error = puller
        .pull_once()
        .await
        .expect_err(&format!("{what}: the round must fail"));
    assert!(expect(&error), "{what}: unexpected error {error:?}");
    assert_eq!(puller.last_date(), Some(940), "{what}: last_date moved");
    assert_eq!(
        core.coin_of("bob"),
        None,
        "{what}: a failed round applied bob"
    );
    assert_eq!(core.coin_of("alice").as_deref(), Some("btc"), "{what}");

    let after = puller
        .pull_once()
        .await
        .unwrap_or_else(|e| panic!("{what}: the round after the failure: {e}"));
    assert_eq!(after.now_date, 2_000, "{what}");
    assert_eq!(core.coin_of("carol").as_deref(), Some("ltc"), "{what}");
    assert_eq!(
        backend.queries(),
        vec![None, q("last_date=940"), q("last_date=940")],
        "{what}: the round after a failure asks for the same last_date"
    );
    assert_eq!(core.user_count(), 2, "{what}");
}

const FAST: Duration = Duration::from_secs(5);

#[tokio::test]
async fn an_error_answer_is_not_applied_and_does_not_advance() {
    assert_round_fails_without_advancing(
        "err_no with a valid data",
        ok(r#"{"err_no":1,"err_msg":"busy","data":{"user_coin":{"bob":"bch"},"now_date":1500}}"#),
        FAST,
        |e| matches!(e, PullError::ErrNo { err_no: 1, err_msg } if err_msg.contains("busy")),
    )
    .await;
    assert_round_fails_without_advancing(
        "err_no with data []",
        ok(r#"{"err_no":500,"err_msg":"db down","data":[]}"#),
        FAST,
        |e| matches!(e, PullError::ErrNo { err_no: 500, .. }),
    )
    .await;
}

#[tokio::test]
async fn an_http_error_is_not_applied_and_does_not_advance() {
    assert_round_fails_without_advancing(
        "HTTP 500",
        Answer::Json(
            StatusCode::INTERNAL_SERVER_ERROR,
            page(json!({"bob": "bch"}), 1_500),
        ),
        FAST,
        |e| matches!(e, PullError::Status(500)),
    )
    .await;
}

#[tokio::test]
async fn garbage_is_not_applied_and_does_not_advance() {
    assert_round_fails_without_advancing(
        "not JSON",
        ok("<html>502 Bad Gateway</html>"),
        FAST,
        |e| matches!(e, PullError::NotJson(_)),
    )
    .await;
    assert_round_fails_without_advancing(
        "truncated JSON",
        ok(r#"{"err_no":0,"data":{"user_coin":{"bob":"bch"},"now_da"#),
        FAST,
        |e| matches!(e, PullError::NotJson(_)),
    )
    .await;
}

#[tokio::test]
async fn a_body_of_the_wrong_shape_is_not_applied_and_does_not_advance() {
    let bodies = [
        r#"["bob","bch"]"#,
        r#"{"err_no":0}"#,
        r#"{"err_no":0,"data":"bob=bch"}"#,
        r#"{"err_no":0,"data":{"user_coin":[{"bob":"bch"}],"now_date":1500}}"#,
        r#"{"err_no":0,"data":{"user_coin":"bob","now_date":1500}}"#,
        r#"{"err_no":"0","data":{"user_coin":{"bob":"bch"},"now_date":1500}}"#,
    ];
    for body in bodies {
        assert_round_fails_without_advancing(body, ok(body), FAST, |e| {
            matches!(e, PullError::BadShape(_))
        })
        .await;
    }
}

#[tokio::test]
async fn a_missing_or_bad_now_date_is_not_applied_and_does_not_advance() {
    let bodies = [
        r#"{"err_no":0,"data":{"user_coin":{"bob":"bch"}}}"#,
        r#"{"err_no":0,"data":{"user_coin":{"bob":"bch"},"now_date":null}}"#,
        r#"{"err_no":0,"data":{"user_coin":{"bob":"bch"},"now_date":"1500"}}"#,
        r#"{"err_no":0,"data":{"user_coin":{"bob":"bch"},"now_date":1500.5}}"#,
        r#"{"err_no":0,"data":{"user_coin":{"bob":"bch"},"now_date":0}}"#,
        r#"{"err_no":0,"data":{"user_coin":{"bob":"bch"},"now_date":-1500}}"#,
    ];
    for body in bodies {
        assert_round_fails_without_advancing(body, ok(body), FAST, |e| {
            matches!(e, PullError::BadNowDate(_))
        })
        .await;
    }
}

#[tokio::test]
async fn an_answer_past_the_timeout_is_not_applied_and_does_not_advance() {
    let started = tokio::time::Instant::now();
    assert_round_fails_without_advancing(
        "slow answer",
        Answer::Slow(Duration::from_secs(60), page(json!({"bob": "bch"}), 1_500)),
        Duration::from_millis(500),
        |e| matches!(e, PullError::Timeout(t) if *t == Duration::from_millis(500)),
    )
    .await;
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "the timeout cut the round short"
    );
}

/// A valid page naming bob that is larger than 4096 bytes.
fn oversized_page() -> String {
    let mut users = serde_json::Map::new();
    users.insert("bob".into(), json!("bch"));
    for i in 0..400 {
        users.insert(format!("padding-user-{i:04}"), json!("btc"));
    }
    let body = page(Value::Object(users), 1_500);
    assert!(body.len() > 4096);
    body
}

#[tokio::test]
async fn an_oversized_body_is_not_applied_and_does_not_advance() {
    assert_round_fails_without_advancing(
        "oversized, with Content-Length",
        ok(oversized_page()),
        FAST,
        |e| matches!(e, PullError::TooLarge { limit: 4096 }),
    )
    .await;
    let body = oversized_page();
    let chunks = body
        .as_bytes()
        .chunks(1000)
        .map(|c| String::from_utf8(c.to_vec()).expect("ASCII"))
        .collect();
    assert_round_fails_without_advancing(
        "oversized, streamed without Content-Length",
        Answer::Streamed(chunks),
        FAST,
        |e| matches!(e, PullError::TooLarge { limit: 4096 }),
    )
    .await;
}

#[tokio::test]
async fn a_streamed_body_within_the_bound_is_read_whole() {
    let body = page(json!({"alice": "btc", "bob": "bch"}), 1_000);
    let chunks = body
        .as_bytes()
        .chunks(7)
        .map(|c| String::from_utf8(c.to_vec()).expect("ASCII"))
        .collect();
    let backend = Backend::start(vec![Answer::Streamed(chunks)]).await;
    let core = Core::control_plane().await;
    let mut puller = puller(&core, settings(backend.url("/usercoin"), FAST, body.len()));
    let summary = puller
        .pull_once()
        .await
        .expect("a body exactly at the bound");
    assert_eq!(summary.applied, 2);
    assert_eq!(core.coin_of("bob").as_deref(), Some("bch"));
}

#[tokio::test]
async fn an_unreachable_backend_fails_the_round_and_the_next_one_is_bare_again() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("local_addr");
    drop(listener);
    let core = Core::control_plane().await;
    let mut puller = puller(
        &core,
        settings(format!("http://{addr}/usercoin"), FAST, 4096),
    );
    let error = puller.pull_once().await.expect_err("nothing listens");
    assert!(matches!(error, PullError::Request(_)), "{error:?}");
    assert_eq!(puller.last_date(), None);
    assert_eq!(puller.next_url().query(), None);
}

#[tokio::test]
async fn invalid_entries_are_skipped_and_the_others_applied() {
    let body = r#"{"err_no":0,"data":{"now_date":1000,"user_coin":{
        "alice":"btc",
        "bad/name":"btc",
        "":"bch",
        "..":"bch",
        "carol":"doge",
        "dave":"BTC",
        "erin":5,
        "frank":null,
        "grace":{"coin":"btc"},
        "heidi":"ltc"
    }}}"#;
    let backend = Backend::start(vec![ok(body), ok(page(json!({}), 2_000))]).await;
    let core = Core::control_plane().await;
    let mut puller = puller(&core, settings(backend.url("/usercoin"), FAST, 4096));
    let summary = puller
        .pull_once()
        .await
        .expect("invalid entries do not fail the round");
    assert_eq!(
        summary,
        PullSummary {
            entries: 10,
            applied: 2,
            invalid: 8,
            now_date: 1_000
        }
    );
    assert_eq!(core.coin_of("alice").as_deref(), Some("btc"));
    assert_eq!(core.coin_of("heidi").as_deref(), Some("ltc"));
    for user in ["carol", "dave", "erin", "frank", "grace"] {
        assert_eq!(core.coin_of(user), None, "{user} was applied");
    }
    assert_eq!(core.user_count(), 2);
    puller.pull_once().await.expect("second round");
    assert_eq!(backend.queries(), vec![None, q("last_date=940")]);
}

#[tokio::test]
async fn pairs_are_written_in_chunks_of_max_batch_in_document_order() {
    // Seven entries, one invalid, on a core that takes at most two per batch; "zed" appears
    // twice and the later entry wins.
    let body = r#"{"err_no":0,"data":{"now_date":1000,"user_coin":{
        "zed":"btc","u1":"bch","u2":"ltc","bad/one":"btc","u3":"btc","u4":"bch","zed":"ltc"
    }}}"#;
    let backend = Backend::start(vec![ok(body)]).await;
    let core = Core::with_max_batch(2).await;
    let mut puller = puller(&core, settings(backend.url("/usercoin"), FAST, 4096));
    let summary = puller.pull_once().await.expect("round");
    assert_eq!(
        summary,
        PullSummary {
            entries: 7,
            applied: 6,
            invalid: 1,
            now_date: 1_000
        }
    );
    for (user, coin) in [
        ("u1", "bch"),
        ("u2", "ltc"),
        ("u3", "btc"),
        ("u4", "bch"),
        ("zed", "ltc"),
    ] {
        assert_eq!(core.coin_of(user).as_deref(), Some(coin), "{user}");
    }
    assert_eq!(core.user_count(), 5);
}

#[tokio::test]
async fn run_pulls_at_once_then_every_interval_retries_failures_and_stops_on_shutdown() {
    // The first round fails; later rounds serve a page naming a new user each time.
    let backend = Backend::start_with(
        vec![Answer::Json(StatusCode::SERVICE_UNAVAILABLE, String::new())],
        Box::new(|index| {
            ok(page(
                json!({ format!("user{index}"): "bch" }),
                1_000 + 10 * index as u64,
            ))
        }),
    )
    .await;
    let core = Core::control_plane().await;
    let shutdown = CancellationToken::new();
    let loop_settings = UserCoinMapPull {
        timeout: FAST,
        max_body: 4096,
        ..UserCoinMapPull::new(backend.url("/usercoin"), Duration::from_secs(1))
    };
    let task = tokio::spawn(cron::run(
        Arc::clone(&core.core),
        loop_settings,
        shutdown.clone(),
    ));

    wait_until(Duration::from_secs(8), "three rounds", || {
        let queries = backend.queries();
        async move {
            if queries.len() >= 3 {
                Ok(())
            } else {
                Err(format!("{queries:?}"))
            }
        }
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    // Round 0 failed (bare), round 1 retried bare and got now_date 1010, round 2 asked since
    // 1010 − 1 s.
    assert_eq!(
        backend.queries()[..3],
        [None, None, q("last_date=1009")],
        "the loop's queries"
    );
    wait_until(Duration::from_secs(5), "user2 applied", || {
        let coin = core.coin_of("user2");
        async move { coin.ok_or_else(|| "not yet".to_owned()) }
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(core.coin_of("user1").as_deref(), Some("bch"));

    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(3), task)
        .await
        .expect("run stops within 3 s of shutdown")
        .expect("run did not panic")
        .expect("run ends without an error");
}

#[tokio::test]
async fn shutdown_interrupts_a_round_waiting_for_its_answer() {
    let backend = Backend::start(vec![Answer::Slow(
        Duration::from_secs(60),
        page(json!({"bob": "bch"}), 1_000),
    )])
    .await;
    let core = Core::control_plane().await;
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(cron::run(
        Arc::clone(&core.core),
        settings(backend.url("/usercoin"), Duration::from_secs(30), 4096),
        shutdown.clone(),
    ));
    wait_until(Duration::from_secs(5), "the first request", || {
        let calls = backend.queries().len();
        async move {
            if calls == 1 {
                Ok(())
            } else {
                Err(format!("{calls} calls"))
            }
        }
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(3), task)
        .await
        .expect("run stops within 3 s of shutdown, mid-request")
        .expect("run did not panic")
        .expect("run ends without an error");
    assert_eq!(core.coin_of("bob"), None);
}

#[tokio::test]
async fn settings_that_cannot_work_are_refused() {
    let good = UserCoinMapPull::new("http://127.0.0.1:1/usercoin", INTERVAL);
    assert!(good.validate().is_ok());
    for url in ["", "not a url", "ftp://example.com/map", "/usercoin"] {
        let bad = UserCoinMapPull::new(url, INTERVAL);
        assert!(
            matches!(bad.validate(), Err(SettingsError::Url(_))),
            "{url:?} accepted"
        );
    }
    assert!(matches!(
        UserCoinMapPull::new("http://127.0.0.1:1/", Duration::ZERO).validate(),
        Err(SettingsError::ZeroInterval)
    ));
    assert!(matches!(
        UserCoinMapPull {
            timeout: Duration::ZERO,
            ..good.clone()
        }
        .validate(),
        Err(SettingsError::ZeroTimeout)
    ));
    assert!(matches!(
        UserCoinMapPull {
            max_body: 0,
            ..good.clone()
        }
        .validate(),
        Err(SettingsError::ZeroMaxBody)
    ));

    // run refuses them at once instead of looping.
    let core = Core::control_plane().await;
    let result = tokio::time::timeout(
        Duration::from_secs(3),
        cron::run(
            Arc::clone(&core.core),
            UserCoinMapPull::new("http://127.0.0.1:1/", Duration::ZERO),
            CancellationToken::new(),
        ),
    )
    .await
    .expect("run returns at once");
    assert!(matches!(result, Err(SettingsError::ZeroInterval)));
}

#[tokio::test]
async fn a_declared_oversized_length_is_refused_before_the_body_is_read() {
    // A raw server that declares 10 MB and then sends nothing more: only the Content-Length
    // check can end the round before the timeout.
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("local_addr");
    tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (mut socket, _) = listener.accept().await.expect("accept");
        let mut request = [0u8; 1024];
        let _ = socket.read(&mut request).await;
        let _ = socket
            .write_all(
                b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 10000000\r\n\r\n{",
            )
            .await;
        // Hold the connection open until the client goes away.
        let _ = socket.read(&mut request).await;
    });
    let core = Core::control_plane().await;
    let mut puller = puller(
        &core,
        settings(
            format!("http://{addr}/usercoin"),
            Duration::from_secs(30),
            4096,
        ),
    );
    let error = tokio::time::timeout(Duration::from_secs(5), puller.pull_once())
        .await
        .expect("refused without waiting for the body")
        .expect_err("oversized");
    assert!(
        matches!(error, PullError::TooLarge { limit: 4096 }),
        "{error:?}"
    );
    assert_eq!(puller.last_date(), None);
}

/// The position is durable: a control service restarted on the same store (same data
/// directory) asks for `last_date` on its first pull instead of the whole map, which would
/// turn every pair into a switch again; another URL starts bare.
#[tokio::test]
async fn the_first_pull_after_a_restart_is_paged_like_the_others() {
    let backend = Backend::start(vec![
        ok(page(json!({"alice": "btc"}), 5_000)),
        ok(page(json!({}), 5_100)),
        ok(page(json!({}), 5_200)),
    ])
    .await;
    let dir = tempfile::tempdir().expect("tempdir");
    let config = test_config(dir.path());
    let url = backend.url("/usercoin");
    let control = InProcessControl::start_config(&config)
        .await
        .expect("control");
    let mut first = UserCoinMapPuller::new(
        Arc::clone(&control.core),
        settings(url.clone(), Duration::from_secs(5), 4096),
    )
    .expect("valid settings");
    first.pull_once().await.expect("first round");
    drop(first);
    control.shutdown().await.expect("stops");
    let control = InProcessControl::start_config(&config)
        .await
        .expect("restarts");
    let mut again = UserCoinMapPuller::new(
        Arc::clone(&control.core),
        settings(url.clone(), Duration::from_secs(5), 4096),
    )
    .expect("valid settings");
    again.resume().await;
    assert_eq!(
        again.last_date(),
        Some(4_940),
        "resumed from the stored position"
    );
    again.pull_once().await.expect("paged round");
    let mut other = UserCoinMapPuller::new(
        Arc::clone(&control.core),
        settings(format!("{url}?pool=2"), Duration::from_secs(5), 4096),
    )
    .expect("valid settings");
    other.resume().await;
    assert_eq!(other.last_date(), None, "another URL has no position");
    assert_eq!(backend.queries(), vec![None, q("last_date=4940")]);
    drop((again, other));
    control.shutdown().await.expect("stops");
}
