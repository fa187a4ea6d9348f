//! The proxy's metrics and switch log, end to end (issue 15): the real proxy binary between
//! simulated miners and sservers, its `/metrics` scraped over HTTP and read as OpenMetrics
//! text by a small parser (label values unescaped), its log read from its file.
//!
//! - `switchyard_build_info` carries the version; the server ID is an info series;
//! - shares the sserver accepts, rejects (error 24) and rejects as stale (error 21) count
//!   exactly by coin and outcome, and rejects by code; every answered submit is timed;
//! - after a switch, the switch is timed once for the new coin, and a share of the old coin's
//!   job (sent to its drained upstream) counts `draining`;
//! - a coin name with a quote and a backslash (the config accepts it) is escaped in its labels;
//! - sessions closed count by reason;
//! - 100 users switched at once log at most 20 per-session lines a second at info, and a
//!   summary line instead of the rest;
//! - in JSON logs, the switch line carries `user`, `worker`, `coin`, `sid` and the latency as
//!   fields, and the login's lines carry them in their span.

use std::{collections::BTreeMap, time::Duration};

use serde_json::{Value, json};
use switchyard_proto::v1::{SwitchCoinRequest, SwitchCoinsRequest};
use switchyard_proxy::switch_log::INFO_LINES_PER_SECOND;
use switchyard_tests::{
    control::InProcessControl,
    miner::Miner,
    proxy::{ProxyProcess, proxy_config},
    sserver::{Sserver, SserverConfig},
    wait::wait_until,
};
use tokio::time::Instant;

const T: Duration = Duration::from_secs(20);

/// One sample of an OpenMetrics text: its name, labels (unescaped) and value.
#[derive(Debug, Clone, PartialEq)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// Reads an OpenMetrics text exposition: every sample, in order. Comment lines (`# HELP`,
/// `# TYPE`, `# UNIT`) are skipped; the text must end with `# EOF`.
fn parse(text: &str) -> Result<Vec<Sample>, String> {
    if text.lines().last() != Some("# EOF") {
        return Err("no `# EOF` at the end".into());
    }
    let mut samples = Vec::new();
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let bad = |why: &str| format!("{why}: {line:?}");
        let name_end = line.find(['{', ' ']).ok_or_else(|| bad("no value"))?;
        let name = &line[..name_end];
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
        {
            return Err(bad("bad name"));
        }
        let mut rest = &line[name_end..];
        let mut labels = BTreeMap::new();
        if let Some(after) = rest.strip_prefix('{') {
            let mut chars = after.char_indices().peekable();
            loop {
                match chars.peek() {
                    Some((_, '}')) => {
                        chars.next();
                        break;
                    }
                    Some((_, ',')) => {
                        chars.next();
                        continue;
                    }
                    None => return Err(bad("labels not closed")),
                    _ => {}
                }
                let mut key = String::new();
                for (_, c) in chars.by_ref() {
                    if c == '=' {
                        break;
                    }
                    key.push(c);
                }
                if chars.next().map(|(_, c)| c) != Some('"') {
                    return Err(bad("label value not quoted"));
                }
                let mut value = String::new();
                loop {
                    match chars.next().map(|(_, c)| c) {
                        Some('"') => break,
                        Some('\\') => match chars.next().map(|(_, c)| c) {
                            Some('\\') => value.push('\\'),
                            Some('"') => value.push('"'),
                            Some('n') => value.push('\n'),
                            _ => return Err(bad("bad escape")),
                        },
                        Some(c) => value.push(c),
                        None => return Err(bad("label value not closed")),
                    }
                }
                labels.insert(key, value);
            }
            let consumed = chars.peek().map_or(after.len(), |(i, _)| *i);
            rest = &after[consumed..];
        }
        let value_text = rest
            .strip_prefix(' ')
            .ok_or_else(|| bad("no space before the value"))?;
        let value = match value_text.split(' ').next().unwrap_or_default() {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v.parse().map_err(|_| bad("bad value"))?,
        };
        samples.push(Sample {
            name: name.to_string(),
            labels,
            value,
        });
    }
    Ok(samples)
}

/// A scrape, read.
struct Scrape {
    text: String,
    samples: Vec<Sample>,
}

impl Scrape {
    async fn of(proxy: &ProxyProcess) -> Result<Self, String> {
        let text = proxy.metrics().await?;
        let samples = parse(&text)?;
        Ok(Self { text, samples })
    }

    /// The value of the sample `name` with exactly these labels, if present.
    fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let want: BTreeMap<String, String> = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        self.samples
            .iter()
            .find(|s| s.name == name && s.labels == want)
            .map(|s| s.value)
    }

    /// [`Self::get`], 0 when absent.
    fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.get(name, labels).unwrap_or(0.0)
    }
}

/// Waits until the sample `name{labels}` has the value `want`.
async fn wait_value(proxy: &ProxyProcess, name: &str, labels: &[(&str, &str)], want: f64) {
    let what = format!("{name}{labels:?} = {want}");
    wait_until(T, &what, || async {
        let scrape = Scrape::of(proxy).await?;
        match scrape.get(name, labels) {
            Some(v) if v == want => Ok(()),
            seen => Err(format!("{seen:?}")),
        }
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n--- proxy log ---\n{}", proxy.log()));
}

fn switch(user: &str, coin: &str) -> SwitchCoinRequest {
    SwitchCoinRequest {
        user: user.into(),
        coin: coin.into(),
    }
}

/// Sends a submit of `worker` on `job`; returns its id.
async fn submit(miner: &mut Miner, worker: &str, job: &str) -> u64 {
    miner
        .request(
            "mining.submit",
            json!([worker, job, "00000000", "5f5e1000", "00000000"]),
        )
        .await
        .expect("submit sent")
}

/// The answer's error code (`[code, message, data]`), if any.
fn error_code(answer: &Value) -> Option<i64> {
    answer["error"][0].as_i64()
}

/// The parser itself, on a text with escapes, and on broken ones.
fn check_the_parser() {
    let text =
        "# TYPE a counter\na_total{coin=\"we\\\"ird\\\\coin\",outcome=\"x\"} 3\nb 1.5\n# EOF\n";
    let samples = parse(text).expect("parses");
    assert_eq!(samples.len(), 2);
    assert_eq!(samples[0].labels["coin"], "we\"ird\\coin");
    assert_eq!(samples[0].value, 3.0);
    assert_eq!(samples[1].value, 1.5);
    assert!(parse("a{coin=\"unclosed} 1\n# EOF").is_err());
    assert!(parse("a 1\n").is_err(), "no # EOF");
}

#[tokio::test]
async fn shares_rejects_and_a_switch_count_exactly() {
    check_the_parser();
    let control = InProcessControl::start().await.expect("control");
    control
        .admin()
        .switch_coin(switch("alice", "btc"))
        .await
        .expect("alice on btc");
    let btc = Sserver::start(
        SserverConfig::new("btc")
            .job_interval(None)
            .reject_stale(true),
    )
    .await
    .expect("btc");
    let bch = Sserver::start(SserverConfig::new("bch").job_interval(None))
        .await
        .expect("bch");
    let mut config = proxy_config(&[control.addr], &[&btc, &bch]).expect("config");
    // A coin whose name needs escaping in a label value (the config takes any name without a
    // slash); no user is on it.
    let weird = "we\"ird\\coin";
    config["StratumServerMap"][weird] = json!({"URL": bch.addr().to_string(), "UserSuffix": "w"});
    let proxy = ProxyProcess::start(&config).await.expect("proxy");

    let scrape = Scrape::of(&proxy).await.expect("scrape");
    let build = scrape
        .samples
        .iter()
        .find(|s| s.name == "switchyard_build_info")
        .unwrap_or_else(|| panic!("no build_info:\n{}", scrape.text));
    assert_eq!(build.labels["component"], "proxy");
    assert_eq!(build.labels["version"], env!("CARGO_PKG_VERSION"));
    assert!(!build.labels["git_commit"].is_empty(), "{build:?}");
    assert_eq!(build.value, 1.0);
    assert_eq!(
        scrape.get("switchyard_proxy_server_id_info", &[("server_id", "1")]),
        Some(1.0),
        "{}",
        scrape.text
    );
    // The odd coin's series exist (at zero), its name escaped in the text and read back whole.
    assert_eq!(
        scrape.get(
            "switchyard_proxy_shares_total",
            &[("coin", weird), ("outcome", "accepted")]
        ),
        Some(0.0),
        "{}",
        scrape.text
    );
    assert!(
        scrape.text.contains(
            r#"switchyard_proxy_shares_total{coin="we\"ird\\coin",outcome="accepted"} 0"#
        ),
        "{}",
        scrape.text
    );

    let mut miner = Miner::connect(proxy.addr).await.expect("connect");
    let (_, auth) = miner.bitcoin_login("alice.rig1", T).await.expect("login");
    assert_eq!(auth["result"], json!(true), "{auth}");
    let job = miner.wait_job_of("btc", T).await.expect("a btc job")["params"][0]
        .as_str()
        .expect("job id")
        .to_string();

    // 3 accepted, 2 rejected (a worker not authorized here: 24), 1 stale (a job the sserver
    // never announced: 21).
    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.push((submit(&mut miner, "alice.rig1", &job).await, None));
    }
    for _ in 0..2 {
        ids.push((submit(&mut miner, "alice.nobody", &job).await, Some(24)));
    }
    ids.push((
        submit(&mut miner, "alice.rig1", "btc-999999").await,
        Some(21),
    ));
    for (id, code) in ids {
        let answer = miner.answer(id, T).await.expect("answered");
        assert_eq!(error_code(&answer), code, "{answer}");
    }
    let shares = |coin: &'static str, outcome: &'static str| {
        move |s: &Scrape| {
            s.value(
                "switchyard_proxy_shares_total",
                &[("coin", coin), ("outcome", outcome)],
            )
        }
    };
    wait_value(
        &proxy,
        "switchyard_proxy_submit_duration_seconds_count",
        &[("coin", "btc")],
        6.0,
    )
    .await;
    let scrape = Scrape::of(&proxy).await.expect("scrape");
    assert_eq!(shares("btc", "accepted")(&scrape), 3.0, "{}", scrape.text);
    assert_eq!(shares("btc", "rejected")(&scrape), 2.0, "{}", scrape.text);
    assert_eq!(shares("btc", "stale")(&scrape), 1.0, "{}", scrape.text);
    assert_eq!(shares("btc", "unanswered")(&scrape), 0.0, "{}", scrape.text);
    let rejects = |code| {
        scrape.value(
            "switchyard_proxy_share_rejects_total",
            &[("coin", "btc"), ("code", code)],
        )
    };
    assert_eq!(
        (rejects("24"), rejects("21")),
        (2.0, 1.0),
        "{}",
        scrape.text
    );
    assert_eq!(
        scrape.value("switchyard_proxy_handshake_duration_seconds_count", &[]),
        1.0
    );
    assert_eq!(
        scrape.value(
            "switchyard_proxy_upstream_connect_duration_seconds_count",
            &[("coin", "btc")]
        ),
        1.0
    );
    assert_eq!(
        scrape.value(
            "switchyard_proxy_switch_duration_seconds_count",
            &[("coin", "bch")]
        ),
        0.0
    );

    // The switch: timed once, for bch; a share of the btc job goes to the drained btc
    // upstream and counts `draining`, one of the bch job `accepted` for bch.
    control
        .admin()
        .switch_coin(switch("alice", "bch"))
        .await
        .expect("switch");
    let bch_job = miner.wait_job_of("bch", T).await.expect("a bch job")["params"][0]
        .as_str()
        .expect("job id")
        .to_string();
    wait_value(
        &proxy,
        "switchyard_proxy_switch_duration_seconds_count",
        &[("coin", "bch")],
        1.0,
    )
    .await;
    let old = submit(&mut miner, "alice.rig1", &job).await;
    let new = submit(&mut miner, "alice.rig1", &bch_job).await;
    for id in [old, new] {
        let answer = miner.answer(id, T).await.expect("answered");
        assert_eq!(answer["result"], json!(true), "{answer}");
    }
    assert!(
        btc.records()
            .submits
            .iter()
            .filter(|s| s.job_id == job && s.accepted)
            .count()
            == 4,
        "the old job's share reached btc: {}",
        btc.records().summary()
    );
    wait_value(
        &proxy,
        "switchyard_proxy_shares_total",
        &[("coin", "bch"), ("outcome", "accepted")],
        1.0,
    )
    .await;
    let scrape = Scrape::of(&proxy).await.expect("scrape");
    assert_eq!(shares("btc", "draining")(&scrape), 1.0, "{}", scrape.text);
    assert_eq!(shares("btc", "accepted")(&scrape), 3.0, "{}", scrape.text);
    assert_eq!(
        scrape.value(
            "switchyard_proxy_switches_total",
            &[("coin", "bch"), ("outcome", "ok")]
        ),
        1.0
    );
    assert_eq!(
        scrape.value(
            "switchyard_proxy_switch_duration_seconds_count",
            &[("coin", "bch")]
        ),
        1.0,
        "one switch"
    );
    assert_eq!(
        scrape.value(
            "switchyard_proxy_submit_duration_seconds_count",
            &[("coin", "btc")]
        ),
        7.0
    );

    // The miner leaves: one session closed by the miner.
    drop(miner);
    wait_value(
        &proxy,
        "switchyard_proxy_sessions_closed_total",
        &[("reason", "miner_closed")],
        1.0,
    )
    .await;
}

#[tokio::test]
async fn a_mass_switch_logs_a_summary_instead_of_a_line_per_session() {
    const USERS: usize = 100;
    let control = InProcessControl::start().await.expect("control");
    let users: Vec<String> = (0..USERS).map(|i| format!("mass{i:03}")).collect();
    control
        .admin()
        .switch_coins(SwitchCoinsRequest {
            switches: users.iter().map(|u| switch(u, "btc")).collect(),
        })
        .await
        .expect("users on btc");
    let btc = Sserver::start(SserverConfig::new("btc").job_interval(None))
        .await
        .expect("btc");
    let bch = Sserver::start(SserverConfig::new("bch").job_interval(None))
        .await
        .expect("bch");
    let config = proxy_config(&[control.addr], &[&btc, &bch]).expect("config");
    let proxy = ProxyProcess::start(&config).await.expect("proxy");
    let mut miners = Vec::new();
    for user in &users {
        let mut miner = Miner::connect(proxy.addr).await.expect("connect");
        miner
            .bitcoin_login(&format!("{user}.rig"), T)
            .await
            .expect("login");
        miner.wait_job_of("btc", T).await.expect("a btc job");
        miners.push(miner);
    }

    let started = Instant::now();
    control
        .admin()
        .switch_coins(SwitchCoinsRequest {
            switches: users.iter().map(|u| switch(u, "bch")).collect(),
        })
        .await
        .expect("all to bch");
    for miner in &mut miners {
        miner.wait_job_of("bch", T).await.expect("a bch job");
    }
    let span = started.elapsed();
    wait_value(
        &proxy,
        "switchyard_proxy_switch_duration_seconds_count",
        &[("coin", "bch")],
        USERS as f64,
    )
    .await;
    // The summary comes at the end of its second.
    proxy
        .wait_log("sessions btc→bch in the last second", 1, T)
        .await
        .unwrap_or_else(|e| panic!("{e}"));

    let log = proxy.log();
    let per_session = log
        .lines()
        .filter(|l| l.contains("INFO") && l.contains("session switched coin"))
        .count();
    let summarized: u64 = log
        .lines()
        .filter(|l| l.contains("INFO") && l.contains("sessions btc→bch in the last second"))
        .filter_map(|l| {
            let (_, after) = l.split_once("switched ")?;
            after.split(' ').next()?.parse::<u64>().ok()
        })
        .sum();
    eprintln!(
        "{per_session} per-session info lines, {summarized} switches summed up, all {USERS} \
         switched within {span:?}"
    );
    // At most 20 per-session lines in any one second; the switches took `span` (under a
    // second but on a busy machine).
    let seconds = span.as_secs() as usize + 1;
    assert!(
        per_session <= INFO_LINES_PER_SECOND * seconds,
        "{per_session} per-session info lines over {span:?}\n{log}"
    );
    assert!(
        per_session >= 1,
        "the first switches are logged one by one\n{log}"
    );
    // Every switch not logged on its own line is in a summary.
    assert!(
        summarized as usize >= USERS - per_session && summarized as usize <= USERS,
        "{summarized} switches summed up, {per_session} logged one by one\n{log}"
    );
}

#[tokio::test]
async fn json_logs_carry_the_sessions_fields() {
    let control = InProcessControl::start().await.expect("control");
    control
        .admin()
        .switch_coin(switch("alice", "btc"))
        .await
        .expect("alice on btc");
    let btc = Sserver::start(SserverConfig::new("btc").job_interval(None))
        .await
        .expect("btc");
    let bch = Sserver::start(SserverConfig::new("bch").job_interval(None))
        .await
        .expect("bch");
    let mut config = proxy_config(&[control.addr], &[&btc, &bch]).expect("config");
    config["LogFormat"] = json!("json");
    let proxy = ProxyProcess::start(&config).await.expect("proxy");
    let mut miner = Miner::connect(proxy.addr).await.expect("connect");
    miner.bitcoin_login("alice.rig1", T).await.expect("login");
    miner.wait_job_of("btc", T).await.expect("a btc job");
    control
        .admin()
        .switch_coin(switch("alice", "bch"))
        .await
        .expect("switch");
    miner.wait_job_of("bch", T).await.expect("a bch job");
    proxy
        .wait_log("session switched coin", 1, T)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let log = proxy.log();
    let line: Value = log
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|v| v["fields"]["message"] == json!("session switched coin"))
        .unwrap_or_else(|| panic!("no JSON switch line:\n{log}"));
    let fields = &line["fields"];
    assert_eq!(line["level"], json!("INFO"), "{line}");
    assert_eq!(fields["user"], json!("alice"), "{line}");
    assert_eq!(fields["worker"], json!("alice.rig1"), "{line}");
    assert_eq!(fields["coin"], json!("bch"), "{line}");
    assert_eq!(
        (&fields["from"], &fields["to"]),
        (&json!("btc"), &json!("bch"))
    );
    assert!(
        fields["sid"].as_str().is_some_and(|s| !s.is_empty()),
        "{line}"
    );
    assert!(fields["latency_ms"].as_f64().is_some(), "{line}");
    // The login's lines carry them in their span.
    let relaying = log
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|v| v["fields"]["message"] == json!("relaying"))
        .unwrap_or_else(|| panic!("no JSON login line:\n{log}"));
    let span = &relaying["span"];
    assert_eq!(
        (&span["user"], &span["worker"], &span["coin"]),
        (&json!("alice"), &json!("alice.rig1"), &json!("btc")),
        "{relaying}"
    );
}
