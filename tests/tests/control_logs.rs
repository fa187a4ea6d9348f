//! The control binary's logs (issue 15, item 6): JSON lines about a switch carry the fields the
//! metrics count by (user, coin, source, outcome) as fields, not in the message text; a batch
//! is one line with a count per outcome; and nothing written to a file or a pipe (`-log_dir`,
//! stderr under a supervisor or journald) carries an ANSI colour code.

use std::{
    path::Path,
    process::{Command, Stdio},
    time::Duration,
};

use serde_json::{Value, json};
use switchyard_proto::v1::{SwitchCoinRequest, SwitchCoinsRequest, switcher_admin_client};
use switchyard_tests::{
    control::{ControlProcess, channel, free_port, wait_serving, workspace_binary},
    wait::wait_until,
};

const T: Duration = Duration::from_secs(30);

fn switch(user: &str, coin: &str) -> SwitchCoinRequest {
    SwitchCoinRequest {
        user: user.into(),
        coin: coin.into(),
    }
}

/// The JSON log lines whose message is `message`.
fn lines_with<'a>(lines: &'a [Value], message: &str) -> Vec<&'a Value> {
    lines
        .iter()
        .filter(|l| l["fields"]["message"] == message)
        .collect()
}

fn parse_json_lines(log: &str) -> Vec<Value> {
    log.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON line ({e}): {l:?}")))
        .collect()
}

#[tokio::test]
async fn json_switch_lines_carry_user_coin_source_and_outcome_as_fields() {
    let http_port = free_port().expect("port");
    let mut control = ControlProcess::start_with(
        |c| {
            c["LogFormat"] = json!("json");
            c["EnableAPIServer"] = json!(true);
            c["ListenAddr"] = json!(format!("127.0.0.1:{http_port}"));
            c["APIUser"] = json!("u");
            c["APIPassword"] = json!("p");
            // bch's list is ingested (never reachable here): a switch to bch is held back.
            c["UserListAPI"] = json!({"bch": "http://127.0.0.1:9/unused"});
            c["IntervalSeconds"] = json!(60);
        },
        Vec::new(),
    )
    .await
    .expect("control");
    let mut admin = control.admin();
    admin
        .switch_coin(switch("alice", "btc"))
        .await
        .expect("alice");
    admin
        .switch_coin(switch("alice", "bch"))
        .await
        .expect("held back");
    admin
        .switch_coins(SwitchCoinsRequest {
            switches: vec![
                switch("bob", "btc"),
                switch("carol", "ltc"),
                switch("x/y", "btc"),
            ],
        })
        .await
        .expect("batch");
    let http = reqwest::Client::new();
    for query in ["puname=erin&coin=ltc", "puname=jo&coin=doge"] {
        http.get(format!("http://127.0.0.1:{http_port}/switch?{query}"))
            .basic_auth("u", Some("p"))
            .send()
            .await
            .expect("HTTP switch");
    }
    let lines = wait_until(T, "every switch logged", || async {
        let lines = parse_json_lines(&control.log());
        let done = !lines_with(&lines, "HTTP switch refused").is_empty()
            && !lines_with(&lines, "switched a batch of users").is_empty();
        if done { Ok(lines) } else { Err(control.log()) }
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let log = control.log();
    assert!(
        !log.contains('\u{1b}'),
        "no ANSI code in a piped log:\n{log}"
    );

    let one = |message: &str| -> &Value {
        let found = lines_with(&lines, message);
        assert_eq!(found.len(), 1, "one {message:?} line:\n{log}");
        &found[0]["fields"]
    };
    let written = one("switched user");
    assert_eq!(written["source"], "grpc", "{written}");
    assert_eq!(written["outcome"], "written", "{written}");
    assert_eq!(written["user"], "alice", "{written}");
    assert_eq!(written["coin"], "btc", "{written}");

    // The held-back switch: its due time is a field, the message the same for every switch.
    let held = lines_with(&lines, "switch held back by the safety period");
    assert!(!held.is_empty(), "held-back lines:\n{log}");
    for line in held {
        let fields = &line["fields"];
        assert_eq!(fields["source"], "grpc", "{fields}");
        assert_eq!(fields["outcome"], "held_back", "{fields}");
        assert_eq!(fields["user"], "alice", "{fields}");
        assert_eq!(fields["coin"], "bch", "{fields}");
        let until = fields["held_until"].as_str().unwrap_or_default();
        assert!(until.ends_with('Z') && until.len() == 20, "{fields}");
        assert!(
            fields["apply_at"].as_u64().is_some_and(|t| t > 0),
            "{fields}"
        );
    }

    // A batch is one line with a count per outcome.
    let batch = one("switched a batch of users");
    assert_eq!(batch["source"], "grpc", "{batch}");
    assert_eq!(batch["requested"], 3, "{batch}");
    assert_eq!(batch["written"], 2, "{batch}");
    assert_eq!(batch["invalid"], 1, "{batch}");
    assert_eq!(batch["held_back"], 0, "{batch}");
    assert_eq!(batch["failed"], 0, "{batch}");

    let http_written = one("HTTP switch applied");
    assert_eq!(http_written["source"], "http", "{http_written}");
    assert_eq!(http_written["outcome"], "written", "{http_written}");
    assert_eq!(http_written["user"], "erin", "{http_written}");
    assert_eq!(http_written["coin"], "ltc", "{http_written}");
    let http_refused = one("HTTP switch refused");
    assert_eq!(http_refused["source"], "http", "{http_refused}");
    assert_eq!(http_refused["outcome"], "invalid", "{http_refused}");
    assert_eq!(http_refused["coin"], "doge", "{http_refused}");
    assert_eq!(http_refused["err_no"], 104, "{http_refused}");

    let status = control.terminate().await.expect("stops");
    assert!(status.success(), "{status}");
}

/// A 2,000-user switch held back by the safety period, then written when due: a handful of
/// info lines and counts, never a line per user.
#[tokio::test]
async fn a_mass_held_back_switch_logs_a_few_lines_with_counts() {
    const USERS: usize = 2_000;
    let mut control = ControlProcess::start_with(
        |c| {
            c["LogFormat"] = json!("json");
            c["UserListAPI"] = json!({"bch": "http://127.0.0.1:9/unused"});
            // The safety period: 1.5 s.
            c["IntervalSeconds"] = json!(1);
        },
        Vec::new(),
    )
    .await
    .expect("control");
    let batch = |coin: &str| SwitchCoinsRequest {
        switches: (0..USERS)
            .map(|i| switch(&format!("mass{i:05}"), coin))
            .collect(),
    };
    let mut admin = control.admin();
    // Created at once (new users), then all held back (bch's list never listed them).
    admin.switch_coins(batch("btc")).await.expect("create");
    let held = admin.switch_coins(batch("bch")).await.expect("hold");
    assert!(
        held.get_ref()
            .results
            .iter()
            .all(|r| r.pending_applies_at_unix > 0),
        "every switch held back"
    );
    let lines = wait_until(
        Duration::from_secs(120),
        "the held-back switches written",
        || async {
            let lines = parse_json_lines(&control.log());
            let written: u64 = lines_with(
                &lines,
                "held-back switches due (the first ones logged one by one)",
            )
            .iter()
            .filter_map(|l| l["fields"]["written"].as_u64())
            .sum();
            if written == USERS as u64 {
                Ok(lines)
            } else {
                Err(format!("{written} written"))
            }
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let count = |message: &str| lines_with(&lines, message).len();
    assert_eq!(count("switched a batch of users"), 2);
    let held_batch = lines_with(&lines, "switched a batch of users")
        .into_iter()
        .find(|l| l["fields"]["held_back"] == USERS)
        .unwrap_or_else(|| panic!("the held-back batch's line:\n{}", control.log()));
    assert_eq!(held_batch["fields"]["written"], 0);
    assert_eq!(count("switch held back by the safety period"), 10);
    let summary = lines_with(
        &lines,
        "switches held back by the safety period (the first ones logged one by one)",
    );
    assert_eq!(summary.len(), 1);
    assert_eq!(summary[0]["fields"]["switches"], USERS);
    assert_eq!(summary[0]["fields"]["source"], "grpc");
    assert_eq!(count("wrote a switch held back by the safety period"), 10);
    assert!(
        lines.len() < 100,
        "{} lines for a 2,000-user switch",
        lines.len()
    );
    control.terminate().await.expect("stops");
}

fn assert_no_ansi(what: &str, text: &str) {
    assert!(
        !text.contains('\u{1b}'),
        "{what} carries ANSI codes:\n{text:?}"
    );
}

fn read_dir_logs(dir: &Path) -> String {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok())
                .filter_map(|e| std::fs::read_to_string(e.path()).ok())
                .collect::<Vec<_>>()
                .join("")
        })
        .unwrap_or_default()
}

/// The real binary with `-log_dir` and `-alsologtostderr`, its stderr a file (as under a
/// supervisor or journald: not a terminal): neither the daily file nor stderr carries a colour
/// code, in text format, the default.
#[tokio::test]
async fn logs_to_files_and_pipes_carry_no_colour_codes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port().expect("port");
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let config = dir.path().join("control.json");
    std::fs::write(
        &config,
        json!({
            "GrpcListenAddr": addr.to_string(),
            "DataDir": dir.path().join("data"),
            "AvailableCoins": ["btc", "bch"],
        })
        .to_string(),
    )
    .expect("config");
    let log_dir = dir.path().join("log");
    let stderr_path = dir.path().join("stderr.log");
    let stderr = std::fs::File::create(&stderr_path).expect("stderr file");
    let mut child = Command::new(workspace_binary("switchyard-control").expect("binary"))
        .arg(format!("-config={}", config.display()))
        .arg(format!("-log_dir={}", log_dir.display()))
        .arg("-alsologtostderr")
        .arg("-v")
        .arg("2")
        .env_remove("RUST_LOG")
        .env_remove("NO_COLOR")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .expect("spawn");
    let served = wait_serving(addr).await;
    let mut admin = switcher_admin_client::SwitcherAdminClient::new(channel(addr));
    let switched = match served {
        Ok(()) => admin.switch_coin(switch("alice", "btc")).await.map(|_| ()),
        Err(e) => Err(tonic::Status::unavailable(e.to_string())),
    };
    let logged = wait_until(T, "the switch in both logs", || async {
        let (files, stderr) = (
            read_dir_logs(&log_dir),
            std::fs::read_to_string(&stderr_path).unwrap_or_default(),
        );
        if files.contains("switched user") && stderr.contains("switched user") {
            Ok((files, stderr))
        } else {
            Err(format!("files: {files}\nstderr: {stderr}"))
        }
    })
    .await;
    let _ = child.kill();
    let _ = child.wait();
    switched.expect("switch");
    let (files, stderr) = logged.unwrap_or_else(|e| panic!("{e}"));
    assert_no_ansi("the -log_dir file", &files);
    assert_no_ansi("stderr written to a file", &stderr);
    assert!(files.contains("source=grpc"), "{files}");
}
