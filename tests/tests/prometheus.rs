//! What deploy/ ships, checked with the real thing (issue 15): Debian's `prometheus` package
//! (`prometheus` and `promtool`), the control and proxy binaries, a real ZooKeeper, simulated
//! sservers and miners.
//!
//! - `promtool` accepts the rules, their unit tests (deploy/prometheus/tests.yml) pass, and it
//!   accepts the example scrape config.
//! - Every alert has a severity and a runbook link to its own heading of docs/operations.md.
//! - The Grafana dashboard is well formed: the data source variable on every panel, the job and
//!   instance variables, the rows, every query readable.
//! - A real Prometheus (1 s scrapes, the rules loaded) scraping a control service on ZooKeeper
//!   and a proxy under a little load (logins, shares, a rejected share, a switch over gRPC and
//!   one over HTTP, a held-back switch to a coin whose sserver is down, an auto-registration,
//!   ingestion, a lost sserver reconnected and one not) has data for every series the
//!   dashboard and the rules query; every label their selectors and groupings name exists on
//!   those series, every label value they match was seen; every dashboard query is valid and
//!   answers samples; every rule evaluates with health `ok`.
//!
//! Nothing is skipped: without the `prometheus` package the tests fail and name it.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use axum::{Json, Router, routing::post};
use serde_json::{Value, json};
use switchyard_proto::v1::{GetUserCoinRequest, SwitchCoinRequest, SwitchCoinsRequest};
use switchyard_tests::{
    control::{ControlProcess, free_port},
    miner::Miner,
    prometheus::{
        ExprParts, PrometheusServer, markdown_anchors, parse_expr, parse_label_values, promtool,
    },
    proxy::{ProxyProcess, proxy_config},
    sserver::{Sserver, SserverConfig},
    userlist::{Answer, UserListBackend},
    wait::wait_until,
    zookeeper::unique_root,
};
use tokio::net::TcpStream;

const T: Duration = Duration::from_secs(20);

/// How long the live checks wait for Prometheus to have scraped and evaluated everything.
const DATA_TIMEOUT: Duration = Duration::from_secs(90);

/// The severities an alert may have.
const SEVERITIES: [&str; 2] = ["critical", "warning"];

/// The dashboard's rows, in order.
const ROWS: [&str; 5] = [
    "Fleet overview",
    "Per proxy",
    "Shares per coin",
    "Switches",
    "Control plane",
];

/// Label values the rules or the dashboard match that this test's load does not produce,
/// each with the reason. Every other matched value must be seen in the scraped series.
const NOT_PRODUCED: [(&str, &str, &str, &str); 1] = [(
    "switchyard_proxy_handshakes_total",
    "reason",
    "too_many_waiting",
    "needs AutoRegMaxWaitUsers sessions waiting for registrations at once",
)];

/// What the live test's load does, as the metric contract counts it: (series, at least,
/// the event).
const EVENTS: [(&str, f64, &str); 30] = [
    (
        r#"switchyard_build_info{component="proxy"}"#,
        1.0,
        "the proxy's build",
    ),
    (
        r#"switchyard_build_info{component="control"}"#,
        1.0,
        "the control's build",
    ),
    (
        "switchyard_proxy_server_id_info",
        1.0,
        "the leased server ID",
    ),
    (
        r#"switchyard_proxy_handshakes_total{outcome="ok"}"#,
        5.0,
        "five logins",
    ),
    (
        r#"switchyard_proxy_handshakes_total{outcome="failed"}"#,
        1.0,
        "a connection closed at once",
    ),
    (
        "switchyard_proxy_handshake_duration_seconds_count",
        5.0,
        "five logins timed",
    ),
    (
        r#"switchyard_proxy_shares_total{coin="btc",outcome="accepted"}"#,
        6.0,
        "alice's and frank's btc shares",
    ),
    (
        r#"switchyard_proxy_shares_total{coin="bch",outcome="accepted"}"#,
        1.0,
        "alice's bch share",
    ),
    (
        r#"switchyard_proxy_shares_total{outcome="rejected"}"#,
        1.0,
        "alice.ghost's share",
    ),
    (
        r#"switchyard_proxy_share_rejects_total{code="24"}"#,
        1.0,
        "rejected with error 24",
    ),
    (
        "switchyard_proxy_submit_duration_seconds_count",
        7.0,
        "the submits timed",
    ),
    (
        r#"switchyard_proxy_switches_total{coin="bch",outcome="ok"}"#,
        2.0,
        "alice and bob moved to bch",
    ),
    (
        r#"switchyard_proxy_switch_duration_seconds_count{coin="bch"}"#,
        2.0,
        "their switches timed",
    ),
    (
        r#"switchyard_proxy_switches_total{coin="ltc",outcome="failed"}"#,
        1.0,
        "carol's switch to the dead ltc sserver",
    ),
    (
        r#"switchyard_proxy_switches_total{coin="doge",outcome="no_sserver"}"#,
        1.0,
        "newbie's switch to doge",
    ),
    (
        r#"switchyard_proxy_upstream_failures_total{coin="ltc",reason="connect"}"#,
        1.0,
        "ltc refused the connection",
    ),
    (
        r#"switchyard_proxy_reconnects_total{outcome="ok"}"#,
        1.0,
        "btc dropped frank's connection",
    ),
    (
        r#"switchyard_proxy_reconnects_total{outcome="failed"}"#,
        1.0,
        "bch went away",
    ),
    (
        r#"switchyard_proxy_sessions_closed_total{reason="upstream_lost"}"#,
        2.0,
        "alice and bob closed",
    ),
    (
        r#"switchyard_proxy_sessions_closed_total{reason="miner_closed"}"#,
        1.0,
        "frank hung up",
    ),
    (
        r#"switchyard_control_switches_total{source="grpc",outcome="held_back"}"#,
        1.0,
        "carol's switch held back",
    ),
    (
        r#"switchyard_control_switches_total{source="held_back",outcome="written"}"#,
        1.0,
        "and applied",
    ),
    (
        r#"switchyard_control_switches_total{source="http",outcome="written"}"#,
        1.0,
        "bob's switch over HTTP",
    ),
    (
        r#"switchyard_control_ingest_pages_total{coin="ltc",outcome="error"}"#,
        1.0,
        "the failed ltc pull",
    ),
    (
        r#"switchyard_control_ingest_users_total{coin="ltc",result="created"}"#,
        1.0,
        "dave ingested",
    ),
    (
        r#"switchyard_control_autoreg_total{outcome="created"}"#,
        1.0,
        "newbie registered",
    ),
    (
        "switchyard_control_watch_subscribers",
        1.0,
        "the proxy's stream",
    ),
    (
        r#"switchyard_control_autoreg_total{outcome="refused"}"#,
        1.0,
        "nobody refused",
    ),
    (
        r#"switchyard_proxy_handshakes_total{reason="unknown_user"}"#,
        1.0,
        "nobody got 201",
    ),
    (
        r#"switchyard_control_grpc_requests_total{method="GetUserCoin",code="NotFound"}"#,
        1.0,
        "nobody looked up",
    ),
];

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ lies in the workspace")
        .to_owned()
}

fn deploy_prometheus() -> PathBuf {
    repo().join("deploy/prometheus")
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

fn rules_text() -> String {
    read(&deploy_prometheus().join("switchyard-rules.yml"))
}

fn dashboard() -> Value {
    let path = repo().join("deploy/grafana/switchyard.json");
    serde_json::from_str(&read(&path))
        .unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()))
}

fn now_unix() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// Runs promtool in deploy/prometheus and expects success.
fn promtool_ok(args: &[&str]) -> String {
    let out = promtool(&deploy_prometheus(), args).unwrap_or_else(|e| panic!("{e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "promtool {args:?} failed:\n{text}");
    text
}

#[test]
fn promtool_accepts_the_rules_their_unit_tests_and_the_example_config() {
    let checked = promtool_ok(&["check", "rules", "switchyard-rules.yml"]);
    assert!(checked.contains("SUCCESS"), "{checked}");
    let tested = promtool_ok(&["test", "rules", "tests.yml"]);
    assert!(tested.contains("SUCCESS"), "{tested}");
    let config = promtool_ok(&["check", "config", "prometheus.example.yml"]);
    assert!(config.contains("SUCCESS"), "{config}");
}

/// One alert of the rules file, read line by line (the file's layout: `- alert:`, then its
/// `labels:` and `annotations:`).
#[derive(Debug, Default)]
struct AlertLines {
    name: String,
    severity: Option<String>,
    runbook_url: Option<String>,
}

fn unquote(value: &str) -> String {
    value.trim().trim_matches('"').trim_matches('\'').to_owned()
}

fn alerts_of(rules: &str) -> Vec<AlertLines> {
    let mut alerts: Vec<AlertLines> = Vec::new();
    let mut in_alert = false;
    for line in rules.lines() {
        let line = line.trim();
        if let Some(name) = line.strip_prefix("- alert:") {
            alerts.push(AlertLines {
                name: unquote(name),
                ..AlertLines::default()
            });
            in_alert = true;
        } else if line.starts_with("- record:") || line.starts_with("- name:") {
            in_alert = false;
        } else if in_alert && let Some(alert) = alerts.last_mut() {
            if let Some(severity) = line.strip_prefix("severity:") {
                alert.severity = Some(unquote(severity));
            } else if let Some(url) = line.strip_prefix("runbook_url:") {
                alert.runbook_url = Some(unquote(url));
            }
        }
    }
    alerts
}

/// Rule names of the rules file (`- alert:` and `- record:` lines).
fn rule_names_of(rules: &str) -> BTreeSet<String> {
    rules
        .lines()
        .filter_map(|l| {
            let l = l.trim();
            l.strip_prefix("- alert:")
                .or_else(|| l.strip_prefix("- record:"))
        })
        .map(unquote)
        .collect()
}

#[test]
fn every_alert_has_a_severity_and_a_runbook_heading_in_operations_md() {
    let alerts = alerts_of(&rules_text());
    assert!(alerts.len() >= 7, "the rules file has alerts: {alerts:?}");
    let operations = read(&repo().join("docs/operations.md"));
    let anchors = markdown_anchors(&operations);
    let mut problems = Vec::new();
    for alert in &alerts {
        match alert.severity.as_deref() {
            Some(s) if SEVERITIES.contains(&s) => {}
            other => problems.push(format!(
                "{}: severity {other:?}, not one of {SEVERITIES:?}",
                alert.name
            )),
        }
        let expected = format!("docs/operations.md#{}", alert.name.to_lowercase());
        match alert.runbook_url.as_deref() {
            Some(url) if url == expected => {
                let anchor = alert.name.to_lowercase();
                if !anchors.contains(&anchor) {
                    problems.push(format!(
                        "{}: docs/operations.md has no heading \"{}\" (anchor #{anchor})",
                        alert.name, alert.name
                    ));
                }
            }
            other => problems.push(format!(
                "{}: runbook_url {other:?}, expected {expected:?}",
                alert.name
            )),
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// Queries and where they are: (`panel "Title" A`, expression).
type Placed = Vec<(String, String)>;

/// Every query of the dashboard: (where, expression) for panel targets, and (where, query)
/// for the variables' `label_values` queries.
fn dashboard_queries(dashboard: &Value) -> (Placed, Placed) {
    fn walk(panels: &Value, out: &mut Placed) {
        for panel in panels.as_array().into_iter().flatten() {
            let title = panel["title"].as_str().unwrap_or("?");
            for target in panel["targets"].as_array().into_iter().flatten() {
                if let Some(expr) = target["expr"].as_str() {
                    let reference = target["refId"].as_str().unwrap_or("?");
                    out.push((format!("panel {title:?} {reference}"), expr.to_owned()));
                }
            }
            walk(&panel["panels"], out);
        }
    }
    let mut targets = Vec::new();
    walk(&dashboard["panels"], &mut targets);
    let variables = dashboard["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|v| v["type"] == "query")
        .map(|v| {
            let query = v["query"]["query"]
                .as_str()
                .or_else(|| v["query"].as_str())
                .unwrap_or_default();
            (
                format!("variable {}", v["name"].as_str().unwrap_or("?")),
                query.to_owned(),
            )
        })
        .collect();
    (targets, variables)
}

/// A dashboard expression as Grafana would send it with every variable on "All".
fn as_grafana_sends(expr: &str) -> String {
    let mut out = expr.replace("$__rate_interval", "1m");
    for var in ["job", "instance", "coin"] {
        out = out
            .replace(&format!("${{{var}}}"), ".*")
            .replace(&format!("${var}"), ".*");
    }
    assert!(
        !out.contains('$'),
        "{expr:?} uses a variable this test does not know"
    );
    out
}

#[test]
fn the_dashboard_is_well_formed() {
    let dashboard = dashboard();
    let schema = dashboard["schemaVersion"].as_u64().unwrap_or(0);
    assert!(
        (36..=41).contains(&schema),
        "schemaVersion {schema}: Grafana 10/11's"
    );
    let variables: BTreeMap<&str, &Value> = dashboard["templating"]["list"]
        .as_array()
        .expect("templating.list")
        .iter()
        .map(|v| (v["name"].as_str().unwrap_or_default(), v))
        .collect();
    let datasource = variables.get("datasource").expect("a datasource variable");
    assert_eq!(datasource["type"], "datasource");
    assert_eq!(datasource["query"], "prometheus");
    for name in ["job", "instance"] {
        let var = variables
            .get(name)
            .unwrap_or_else(|| panic!("a {name} variable"));
        assert_eq!(var["type"], "query", "{name}");
        assert_eq!(var["datasource"]["uid"], "${datasource}", "{name}");
        assert_eq!(var["includeAll"], true, "{name}: an All option");
        assert_eq!(var["allValue"], ".*", "{name}: All matches every value");
    }
    let panels = dashboard["panels"].as_array().expect("panels");
    let rows: Vec<&str> = panels
        .iter()
        .filter(|p| p["type"] == "row")
        .map(|p| p["title"].as_str().unwrap_or_default())
        .collect();
    assert_eq!(rows, ROWS, "the rows");
    let mut ids = BTreeSet::new();
    for panel in panels {
        let title = panel["title"].as_str().unwrap_or("?");
        let id = panel["id"].as_u64().expect("every panel has an id");
        assert!(ids.insert(id), "panel id {id} twice ({title})");
        let (x, w) = (
            panel["gridPos"]["x"].as_u64().unwrap_or(99),
            panel["gridPos"]["w"].as_u64().unwrap_or(99),
        );
        assert!(x + w <= 24, "{title}: gridPos beyond 24 columns");
        if panel["type"] == "row" {
            continue;
        }
        assert_eq!(
            panel["datasource"]["uid"], "${datasource}",
            "{title}: the datasource variable"
        );
        let targets = panel["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "{title}: no query");
        for target in targets {
            assert_eq!(target["datasource"]["uid"], "${datasource}", "{title}");
        }
    }
    let (targets, variables) = dashboard_queries(&dashboard);
    for (place, expr) in &targets {
        let parts = parse_expr(expr).unwrap_or_else(|e| panic!("{place}: {e}"));
        assert!(!parts.selectors.is_empty(), "{place}: queries no series");
        for selector in &parts.selectors {
            let filtered = ["job", "instance"].iter().all(|label| {
                selector
                    .matchers
                    .iter()
                    .any(|m| m.label == *label && m.value == format!("${label}"))
            });
            assert!(
                filtered,
                "{place}: {} is not filtered by the job and instance variables",
                selector.name
            );
        }
        as_grafana_sends(expr);
    }
    for (place, query) in &variables {
        parse_label_values(query).unwrap_or_else(|e| panic!("{place}: {e}"));
    }
}

/// What one source (a dashboard query, a rule) uses, for the live checks.
struct Use {
    place: String,
    parts: ExprParts,
}

/// A registration backend that gives every name a new puid, but refuses names with "nobody".
async fn registration_backend() -> String {
    let next = Arc::new(AtomicU64::new(5000));
    let app = Router::new().route(
        "/register",
        post(move |body: String| {
            let next = next.clone();
            async move {
                // A refusal is a puid of 0.
                let puid = if body.contains("nobody") {
                    0
                } else {
                    next.fetch_add(1, Ordering::Relaxed)
                };
                Json(json!({"data": {"puid": puid}, "status": "success", "message": ""}))
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind the registration backend");
    let addr = listener.local_addr().expect("its address");
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    format!("http://{addr}/register")
}

fn switch(user: &str, coin: &str) -> SwitchCoinRequest {
    SwitchCoinRequest {
        user: user.into(),
        coin: coin.into(),
    }
}

/// A miner logged in as `worker`, with a job of `coin`; answers it and the job's ID.
async fn mining(proxy: &ProxyProcess, worker: &str, coin: &str) -> (Miner, String) {
    let mut miner = Miner::connect(proxy.addr).await.expect("connect");
    let (_, auth) = miner.bitcoin_login(worker, T).await.expect("login");
    assert_eq!(auth["result"], json!(true), "{worker}: {auth}");
    let job = job_of(&mut miner, coin).await;
    (miner, job)
}

async fn job_of(miner: &mut Miner, coin: &str) -> String {
    let notify = miner.wait_job_of(coin, T).await.expect("a job");
    notify["params"][0].as_str().expect("a job ID").to_owned()
}

/// Submits a share of `job` as `worker`; answers the answer.
async fn submit(miner: &mut Miner, worker: &str, job: &str) -> Value {
    let id = miner
        .request(
            "mining.submit",
            json!([worker, job, "00000000", "5f5e1000", "00000001"]),
        )
        .await
        .expect("submit");
    miner.answer(id, T).await.expect("the submit's answer")
}

/// The load of the live test; see the module doc. Answers what it leaves running.
struct Fleet {
    control: ControlProcess,
    control_metrics: String,
    /// The control's HTTP switch API.
    control_http: String,
    proxy: ProxyProcess,
    btc: Sserver,
    bch: Sserver,
    _lists: UserListBackend,
}

async fn start_fleet() -> Fleet {
    let root = unique_root("prometheus");
    // ltc's user list is ingested (its first pull fails, the next creates dave): a switch of
    // an existing user to ltc is held back for the safety period (1.5 s).
    let lists = UserListBackend::start().await.expect("user-list backend");
    lists.script(
        "ltc",
        [
            Answer {
                status: 500,
                body: "backend down".into(),
                delay: Duration::ZERO,
            },
            Answer::page(&[("dave", 7)]),
        ],
    );
    let registration = registration_backend().await;
    let control_metrics = format!("127.0.0.1:{}", free_port().expect("a port"));
    let http = format!("127.0.0.1:{}", free_port().expect("a port"));
    let ltc_list = lists.url("ltc");
    let control = ControlProcess::on_zookeeper(&root, |c| {
        c["MetricsListenAddr"] = json!(control_metrics);
        // doge: a coin users may be switched to that the proxy has no sserver for.
        c["AvailableCoins"] = json!(["btc", "bch", "ltc", "doge"]);
        c["UserListAPI"] = json!({"ltc": ltc_list});
        c["IntervalSeconds"] = json!(1);
        c["EnableUserAutoReg"] = json!(true);
        c["ZKAutoRegWatchDir"] = json!(format!("{root}/autoreg/"));
        c["UserAutoRegAPI"] = json!({
            "IntervalSeconds": 0,
            "URL": registration,
            "DefaultCoin": "btc",
            "PostData": {"sub_name": "{sub_name}"},
        });
        c["EnableAPIServer"] = json!(true);
        c["ListenAddr"] = json!(&http);
        c["APIUser"] = json!("admin");
        c["APIPassword"] = json!("secret");
    })
    .await
    .expect("control on ZooKeeper");
    control
        .admin()
        .switch_coins(SwitchCoinsRequest {
            switches: ["alice", "bob", "carol", "frank"]
                .iter()
                .map(|u| switch(u, "btc"))
                .collect(),
        })
        .await
        .expect("users on btc");

    let sserver = |coin: &str| {
        Sserver::start(SserverConfig::new(coin).job_interval(Some(Duration::from_millis(500))))
    };
    let btc = sserver("btc").await.expect("btc sserver");
    let bch = sserver("bch").await.expect("bch sserver");
    let mut config = proxy_config(&[control.addr], &[&btc, &bch]).expect("proxy config");
    // ltc's sserver is down: nothing listens on its port.
    let dead = free_port().expect("a port");
    config["StratumServerMap"]["ltc"] =
        json!({"URL": format!("127.0.0.1:{dead}"), "UserSuffix": "ltc"});
    config["ServerID"] = json!(0); // leased
    config["EnableUserAutoReg"] = json!(true);
    config["ReconnectWindowSeconds"] = json!(2);
    config["UpstreamTimeoutSeconds"] = json!(2);
    // A refused registration's miner gets its 201 when this runs out.
    config["HandshakeTimeoutSeconds"] = json!(8);
    let proxy = ProxyProcess::start(&config).await.expect("proxy");
    Fleet {
        control,
        control_metrics,
        control_http: http,
        proxy,
        btc,
        bch,
        _lists: lists,
    }
}

/// Miners log in and submit, users switch, an sserver drops its connections and comes back,
/// another goes away for good.
async fn load(fleet: &mut Fleet) {
    let proxy = &fleet.proxy;
    // A connection that closes before its first byte (a health check): a failed handshake.
    drop(TcpStream::connect(proxy.addr).await.expect("connect"));

    // A name the registration backend refuses: the miner waits out its handshake timeout
    // (HandshakeTimeoutSeconds, 8 s) and gets error 201, while the rest goes on.
    let mut nobody = Miner::connect(proxy.addr).await.expect("connect");
    let refused = tokio::spawn(async move {
        let (_, auth) = nobody
            .bitcoin_login("nobody.rig1", 2 * T)
            .await
            .expect("login");
        auth
    });

    let (mut alice, btc_job) = mining(proxy, "alice.rig1", "btc").await;
    for _ in 0..5 {
        let answer = submit(&mut alice, "alice.rig1", &btc_job).await;
        assert_eq!(answer["result"], json!(true), "accepted: {answer}");
    }
    // A worker the sserver never authorized: rejected with its error 24.
    let rejected = submit(&mut alice, "alice.ghost", &btc_job).await;
    assert_ne!(rejected["result"], json!(true), "rejected: {rejected}");

    let (mut bob, _) = mining(proxy, "bob.rig1", "btc").await;
    let (mut carol, _) = mining(proxy, "carol.rig1", "btc").await;
    let (mut frank, _) = mining(proxy, "frank.rig1", "btc").await;

    // A switch over gRPC; a share of the old coin's job goes to the drained connection.
    fleet
        .control
        .admin()
        .switch_coin(switch("alice", "bch"))
        .await
        .expect("switch alice");
    let bch_job = job_of(&mut alice, "bch").await;
    submit(&mut alice, "alice.rig1", &btc_job).await;
    let answer = submit(&mut alice, "alice.rig1", &bch_job).await;
    assert_eq!(answer["result"], json!(true), "accepted on bch: {answer}");

    // A switch over the HTTP API.
    let url = format!("http://{}/switch", fleet.control_http);
    let answer: Value = reqwest::Client::new()
        .get(&url)
        .query(&[("puname", "bob"), ("coin", "bch")])
        .basic_auth("admin", Some("secret"))
        .send()
        .await
        .expect("HTTP switch")
        .json()
        .await
        .expect("a JSON answer");
    assert_eq!(answer["err_no"], json!(0), "{answer}");
    job_of(&mut bob, "bch").await;

    // A held-back switch (ltc's list is ingested) to ltc, whose sserver is down: applied after
    // the safety period, it fails at the proxy and carol's miner is closed.
    let held = fleet
        .control
        .admin()
        .switch_coin(switch("carol", "ltc"))
        .await
        .expect("switch carol")
        .into_inner();
    assert!(
        held.pending_applies_at_unix > 0,
        "carol's switch to ltc is held back: {held:?}"
    );
    assert!(
        carol.closed_within(T).await,
        "carol's miner is closed once her switch to the dead ltc sserver fails"
    );

    // An auto-registration (the one the backend refuses runs since the start).
    let (mut newbie, _) = mining(proxy, "newbie.rig1", "btc").await;
    // A gRPC call that does not end OK: NotFound.
    let unknown = fleet
        .control
        .admin()
        .get_user_coin(GetUserCoinRequest {
            user: "nobody".into(),
        })
        .await;
    assert_eq!(
        unknown.map(|_| ()).map_err(|s| s.code()),
        Err(tonic::Code::NotFound),
        "nobody is unknown"
    );

    // btc drops every connection: frank's session reconnects and keeps mining.
    let franks = |r: &switchyard_tests::sserver::Records| {
        r.authorizes
            .iter()
            .filter(|a| a.accepted && a.worker.starts_with("frank"))
            .count()
    };
    let logins = franks(&fleet.btc.records());
    fleet.btc.disconnect_all();
    fleet
        .btc
        .wait_for(T, "frank logged in again", |r| franks(r) > logins)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let job = job_of(&mut frank, "btc").await;
    let answer = submit(&mut frank, "frank.rig1", &job).await;
    assert_eq!(
        answer["result"],
        json!(true),
        "after the reconnect: {answer}"
    );
    job_of(&mut newbie, "btc").await;
    drop(frank); // the miner hangs up

    // A switch to doge, which the proxy has no sserver for: ignored, newbie keeps mining btc.
    fleet
        .control
        .admin()
        .switch_coin(switch("newbie", "doge"))
        .await
        .expect("switch newbie");
    let job = job_of(&mut newbie, "btc").await;
    let answer = submit(&mut newbie, "newbie.rig1", &job).await;
    assert_eq!(answer["result"], json!(true), "still on btc: {answer}");

    // bch goes away for good: alice's and bob's sessions are closed after the reconnect window.
    fleet.bch.stop().await;
    assert!(alice.closed_within(T).await, "alice closed: bch is gone");
    assert!(bob.closed_within(T).await, "bob closed: bch is gone");
    assert!(
        alice.malformed.is_empty() && bob.malformed.is_empty(),
        "every line parses"
    );
    let auth = refused.await.expect("the refused login");
    assert_eq!(auth["error"][0], json!(201), "refused: {auth}");
}

/// The value alternatives a matcher names (`=`: its value; `=~`: each branch of a top-level
/// alternation, literal or `prefix.*`); `None` for negative matchers and Grafana variables.
fn matched_values(op: &str, value: &str) -> Option<Vec<String>> {
    if value.contains('$') {
        return None;
    }
    match op {
        "=" => Some(vec![value.to_owned()]),
        "=~" => Some(value.split('|').map(str::to_owned).collect()),
        _ => None,
    }
}

fn value_matches(pattern: &str, value: &str) -> bool {
    match pattern.strip_suffix(".*") {
        Some(prefix) => value.starts_with(prefix),
        None => pattern == value,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_prometheus_has_data_for_every_series_the_dashboard_and_the_rules_query() {
    // What the files query, read before anything starts (a parse error fails at once).
    let dashboard = dashboard();
    let (targets, variables) = dashboard_queries(&dashboard);
    let mut uses: Vec<Use> = Vec::new();
    for (place, expr) in &targets {
        let parts = parse_expr(expr).unwrap_or_else(|e| panic!("{place}: {e}"));
        uses.push(Use {
            place: format!("dashboard {place}"),
            parts,
        });
    }
    for (place, query) in &variables {
        let (mut parts, label) =
            parse_label_values(query).unwrap_or_else(|e| panic!("{place}: {e}"));
        parts.grouping_labels.insert(label);
        uses.push(Use {
            place: format!("dashboard {place}"),
            parts,
        });
    }
    let rules_text = rules_text();
    let rule_names = rule_names_of(&rules_text);

    // The scrape jobs of the example config, so the rules' `up{job=~...}` are checked against
    // the names operators copy.
    let example = read(&deploy_prometheus().join("prometheus.example.yml"));
    let jobs: Vec<String> = example
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- job_name:"))
        .map(unquote)
        .collect();
    let job = |part: &str| {
        jobs.iter()
            .find(|j| j.contains(part))
            .unwrap_or_else(|| panic!("prometheus.example.yml has a {part} job: {jobs:?}"))
            .clone()
    };
    let (proxy_job, control_job) = (job("proxy"), job("control"));

    // Without the package, fail now, naming it, rather than after starting the fleet.
    switchyard_tests::prometheus::binary("prometheus").unwrap_or_else(|e| panic!("{e}"));
    let started = now_unix() - 1.0;
    let mut fleet = start_fleet().await;
    let prometheus = PrometheusServer::start(&json!({
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "rule_files": [deploy_prometheus().join("switchyard-rules.yml")],
        "scrape_configs": [
            {"job_name": proxy_job, "static_configs": [{"targets": [fleet.proxy.metrics_addr.to_string()]}]},
            {"job_name": control_job, "static_configs": [{"targets": [fleet.control_metrics]}]},
        ],
    }))
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    prometheus
        .wait_targets_up(2, T)
        .await
        .unwrap_or_else(|e| panic!("{e}"));

    load(&mut fleet).await;

    // The rules Prometheus loaded: the file's, every one evaluated with health ok.
    let rules = wait_until(
        DATA_TIMEOUT,
        "every rule evaluated with health ok",
        || async {
            let groups = prometheus.rule_groups().await.map_err(|e| e.to_string())?;
            let rules: Vec<Value> = groups
                .iter()
                .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
                .collect();
            let not_ok: Vec<String> = rules
                .iter()
                .filter(|r| r["health"] != "ok")
                .map(|r| format!("{} {} {}", r["name"], r["health"], r["lastError"]))
                .collect();
            if not_ok.is_empty() && !rules.is_empty() {
                Ok(rules)
            } else {
                Err(format!("{} rules, not ok: {not_ok:?}", rules.len()))
            }
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\n--- prometheus log ---\n{}", prometheus.log()));
    let loaded: BTreeSet<String> = rules
        .iter()
        .filter_map(|r| r["name"].as_str().map(str::to_owned))
        .collect();
    assert_eq!(loaded, rule_names, "Prometheus loaded the file's rules");
    for rule in &rules {
        let name = rule["name"].as_str().unwrap_or("?");
        let query = rule["query"].as_str().expect("a rule has a query");
        let parts = parse_expr(query).unwrap_or_else(|e| panic!("rule {name}: {e}"));
        if rule["type"] == "alerting" {
            let severity = rule["labels"]["severity"].as_str().unwrap_or_default();
            assert!(
                SEVERITIES.contains(&severity),
                "{name}: severity {severity:?}"
            );
            let url = rule["annotations"]["runbook_url"]
                .as_str()
                .unwrap_or_default();
            assert!(
                url.starts_with("docs/operations.md#"),
                "{name}: runbook_url {url:?}"
            );
        }
        uses.push(Use {
            place: format!("rule {name}"),
            parts,
        });
    }

    // Every series name has data (a histogram's _bucket with its _count and _sum).
    let mut wanted: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for u in &uses {
        for name in u.parts.names() {
            if let Some(base) = name.strip_suffix("_bucket") {
                for suffix in ["_count", "_sum"] {
                    wanted
                        .entry(format!("{base}{suffix}"))
                        .or_default()
                        .insert(u.place.clone());
                }
            }
            wanted.entry(name).or_default().insert(u.place.clone());
        }
    }
    let names_regex = wanted.keys().cloned().collect::<Vec<_>>().join("|");
    let all_names = format!("group by (__name__) ({{__name__=~\"{names_regex}\"}})");
    let missing_report = |have: &BTreeSet<String>| {
        wanted
            .iter()
            .filter(|(name, _)| !have.contains(*name))
            .map(|(name, places)| format!("  {name}, queried by {places:?}"))
            .collect::<Vec<_>>()
            .join("\n")
    };
    let have_data = wait_until(DATA_TIMEOUT, "data for every queried series", || async {
        let samples = prometheus
            .query(&all_names)
            .await
            .map_err(|e| e.to_string())?;
        let have: BTreeSet<String> = samples
            .iter()
            .filter_map(|s| s["metric"]["__name__"].as_str().map(str::to_owned))
            .collect();
        if wanted.keys().all(|n| have.contains(n)) {
            Ok(have)
        } else {
            Err(format!("without data:\n{}", missing_report(&have)))
        }
    })
    .await;
    if let Err(e) = have_data {
        let exported = prometheus
            .api("label/__name__/values", &[])
            .await
            .map(|v| v.to_string())
            .unwrap_or_else(|e| e.to_string());
        panic!("{e}\nseries Prometheus has: {exported}");
    }

    // Every label a selector matches on or an aggregation groups by exists on the series, and
    // every value a selector matches was seen (or is listed in NOT_PRODUCED with its reason).
    // Polled: the load's last events reach Prometheus at its next scrape.
    let names: Vec<String> = wanted.keys().cloned().collect();
    let excused = wait_until(
        DATA_TIMEOUT,
        "every matched label and value seen",
        || async {
            let checked = check_labels(&prometheus, &uses, &names, started).await;
            if checked.is_err() {
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            checked
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    for (name, label, value, why) in excused {
        println!("not produced by this load, allowed: {name}{{{label}=\"{value}\"}}: {why}");
    }

    // The load is what the panels show: each of its events counted where the contract says.
    let missed = wait_until(DATA_TIMEOUT, "every event of the load counted", || async {
        let mut missed = Vec::new();
        for (expr, at_least, event) in EVENTS {
            let total = format!("sum({expr})");
            let value = prometheus
                .query(&total)
                .await
                .map_err(|e| e.to_string())?
                .first()
                .and_then(|s| s["value"][1].as_str().and_then(|v| v.parse::<f64>().ok()));
            if value.is_none_or(|v| v < at_least) {
                missed.push(format!(
                    "  {event}: {total} = {value:?}, expected >= {at_least}"
                ));
            }
        }
        if missed.is_empty() {
            Ok(())
        } else {
            tokio::time::sleep(Duration::from_millis(500)).await;
            Err(missed.join("\n"))
        }
    })
    .await;
    if let Err(e) = missed {
        panic!("{e}");
    }

    // Every dashboard query, as Grafana sends it with every variable on All, is valid PromQL
    // and answers samples.
    let empty = wait_until(DATA_TIMEOUT, "every dashboard query answering", || async {
        let mut empty = Vec::new();
        for (place, expr) in &targets {
            let sent = as_grafana_sends(expr);
            match prometheus.query(&sent).await {
                Ok(samples) if !samples.is_empty() => {}
                Ok(_) => empty.push(format!("  {place}: no samples for {sent}")),
                Err(e) => return Err(format!("  {place}: {e}")),
            }
        }
        if empty.is_empty() {
            Ok(())
        } else {
            Err(empty.join("\n"))
        }
    })
    .await;
    if let Err(e) = empty {
        panic!("{e}");
    }
    // The variables list values.
    for (place, query) in &variables {
        let (parts, label) = parse_label_values(query).expect("parsed above");
        let selector = parts.selectors[0].name.clone();
        let values = prometheus
            .api(&format!("label/{label}/values"), &[("match[]", &selector)])
            .await
            .unwrap_or_else(|e| panic!("{place}: {e}"));
        assert!(
            values.as_array().is_some_and(|v| !v.is_empty()),
            "{place}: no values of {label} on {selector}"
        );
    }
}

/// An entry of [`NOT_PRODUCED`].
type Excuse = (&'static str, &'static str, &'static str, &'static str);

/// The label check of the live test (see its comments): the [`NOT_PRODUCED`] entries that
/// excused a value, or every problem found.
async fn check_labels(
    prometheus: &PrometheusServer,
    uses: &[Use],
    names: &[String],
    started: f64,
) -> Result<BTreeSet<Excuse>, String> {
    let mut labels_of: BTreeMap<&str, Vec<BTreeMap<String, String>>> = BTreeMap::new();
    for name in names {
        let series = prometheus
            .series(name, started)
            .await
            .map_err(|e| e.to_string())?;
        labels_of.insert(name, series);
    }
    let mut problems = Vec::new();
    let mut excused = BTreeSet::new();
    for u in uses {
        let mut keys: BTreeSet<&str> = BTreeSet::new();
        for selector in &u.parts.selectors {
            let series = labels_of
                .get(selector.name.as_str())
                .map(Vec::as_slice)
                .unwrap_or_default();
            let own_keys: BTreeSet<&str> = series
                .iter()
                .flat_map(|s| s.keys().map(String::as_str))
                .collect();
            keys.extend(own_keys.iter().copied());
            for m in &selector.matchers {
                if !own_keys.contains(m.label.as_str()) {
                    problems.push(format!(
                        "{}: {} has no label {:?} (it has {own_keys:?})",
                        u.place, selector.name, m.label
                    ));
                    continue;
                }
                let seen: BTreeSet<&str> = series
                    .iter()
                    .filter_map(|s| s.get(&m.label).map(String::as_str))
                    .collect();
                for alternative in matched_values(&m.op, &m.value).into_iter().flatten() {
                    if seen.iter().any(|v| value_matches(&alternative, v)) {
                        continue;
                    }
                    let excuse = NOT_PRODUCED.iter().find(|(name, label, value, _)| {
                        *name == selector.name && *label == m.label && *value == alternative
                    });
                    match excuse {
                        Some(entry) => {
                            excused.insert(*entry);
                        }
                        None => problems.push(format!(
                            "{}: {}{{{}{}\"{}\"}}: the value {alternative:?} was never seen \
                             (seen: {seen:?})",
                            u.place, selector.name, m.label, m.op, m.value
                        )),
                    }
                }
            }
        }
        for label in &u.parts.grouping_labels {
            if !keys.contains(label.as_str()) {
                problems.push(format!(
                    "{}: groups by {label:?}, which none of {:?} has",
                    u.place,
                    u.parts.names()
                ));
            }
        }
    }
    for entry in NOT_PRODUCED {
        if !excused.contains(&entry) {
            problems.push(format!(
                "NOT_PRODUCED lists {entry:?}, which no query needs excusing: remove it"
            ));
        }
    }
    if problems.is_empty() {
        Ok(excused)
    } else {
        Err(problems.join("\n"))
    }
}
