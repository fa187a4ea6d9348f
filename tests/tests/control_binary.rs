//! The real `switchyard-control` binary: restarts on the same data directory keep every user
//! with revisions still increasing, SIGTERM ends streams and exits cleanly, logs come as text or
//! JSON, `--help` documents the settings, and a bad config fails with a clear message.

use std::{process::Command, time::Duration};

use futures::StreamExt;
use switchyard_proto::v1::{
    GetUserCoinRequest, ListUserCoinsRequest, SwitchCoinRequest, SwitchCoinsRequest,
    WatchSwitchesRequest,
};
use switchyard_tests::control::{ControlProcess, workspace_binary};

fn switch(user: &str, coin: &str) -> SwitchCoinRequest {
    SwitchCoinRequest {
        user: user.into(),
        coin: coin.into(),
    }
}

#[tokio::test]
async fn a_restarted_binary_keeps_every_user_and_revisions_keep_increasing() {
    let mut control = ControlProcess::start_with(|_| {}, vec![])
        .await
        .expect("control starts");
    let mut admin = control.admin();
    let switches: Vec<_> = (0..500)
        .map(|i| switch(&format!("miner{i}"), ["btc", "bch", "ltc"][i % 3]))
        .collect();
    admin
        .switch_coins(SwitchCoinsRequest { switches })
        .await
        .expect("batch");
    let before = admin
        .switch_coin(switch("miner7", "btc"))
        .await
        .expect("switch")
        .into_inner()
        .user_coin
        .expect("record");

    // A watcher sees its stream end cleanly when the process is told to stop.
    let mut watch = control
        .proxy_control()
        .watch_switches(WatchSwitchesRequest::default())
        .await
        .expect("watch")
        .into_inner();
    let mut store_id = String::new();
    let mut resume_revision = 0;
    while let Some(msg) = tokio::time::timeout(Duration::from_secs(10), watch.next())
        .await
        .expect("snapshot arrives")
    {
        let msg = msg.expect("snapshot message");
        if msg.snapshot_complete {
            store_id = msg.store_id;
            resume_revision = msg.revision;
            break;
        }
    }
    assert_eq!(resume_revision, before.revision);

    let status = control.terminate().await.expect("the process exits");
    assert!(
        status.success(),
        "exit status after SIGTERM: {status}\n{}",
        control.log()
    );
    let end = tokio::time::timeout(Duration::from_secs(10), watch.next())
        .await
        .expect("the stream ends");
    assert!(
        matches!(end, None | Some(Err(_))),
        "no message after shutdown: {end:?}"
    );
    let log = control.log();
    assert!(
        log.contains("shutting down"),
        "the log tells the shutdown:\n{log}"
    );

    control.restart().await.expect("control restarts");
    let mut admin = control.admin();
    let page = admin
        .list_user_coins(ListUserCoinsRequest {
            page_size: 10_000,
            page_token: String::new(),
        })
        .await
        .expect("list")
        .into_inner();
    assert_eq!(page.users.len(), 500, "every user survived the restart");
    assert_eq!(page.revision, before.revision);
    for u in &page.users {
        let i: usize = u.user["miner".len()..].parse().expect("numbered user");
        let expected = if i == 7 {
            "btc"
        } else {
            ["btc", "bch", "ltc"][i % 3]
        };
        assert_eq!(u.coin, expected, "{}", u.user);
    }
    let read = admin
        .get_user_coin(GetUserCoinRequest {
            user: "miner7".into(),
        })
        .await
        .expect("get")
        .into_inner()
        .user_coin
        .expect("record");
    assert_eq!(read, before);

    let after = admin
        .switch_coin(switch("miner7", "ltc"))
        .await
        .expect("switch")
        .into_inner()
        .user_coin
        .expect("record");
    assert!(
        after.revision > before.revision,
        "revision {} after the restart must exceed {}",
        after.revision,
        before.revision
    );

    // The same store: a watcher resumes where it stopped and gets only the new change.
    let mut watch = control
        .proxy_control()
        .watch_switches(WatchSwitchesRequest {
            resume_revision,
            store_id,
        })
        .await
        .expect("resume")
        .into_inner();
    let msg = tokio::time::timeout(Duration::from_secs(10), watch.next())
        .await
        .expect("resume message arrives")
        .expect("stream open")
        .expect("message");
    assert!(!msg.reset, "the store is the same one: no snapshot");
    assert_eq!(msg.users.len(), 1);
    assert_eq!(msg.users[0].user, "miner7");
    assert_eq!(msg.users[0].revision, after.revision);
}

#[tokio::test]
async fn logs_can_be_json_and_the_admin_token_comes_from_the_environment() {
    let mut control = ControlProcess::start_with(
        |c| c["LogFormat"] = "json".into(),
        vec![("SWITCHYARD_ADMIN_TOKEN".into(), "env-token".into())],
    )
    .await
    .expect("control starts");
    let status = control
        .admin()
        .switch_coin(switch("alice", "btc"))
        .await
        .expect_err("the token from the environment is required");
    assert_eq!(status.code(), tonic::Code::Unauthenticated);
    let exit = control.terminate().await.expect("exits");
    assert!(exit.success());
    let log = control.log();
    let lines: Vec<&str> = log.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(!lines.is_empty(), "the binary logged something");
    for line in lines {
        let parsed: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("{line:?} is not JSON: {e}"));
        assert!(parsed.get("level").is_some(), "{line}");
    }
}

#[test]
fn help_documents_the_settings_and_bad_configs_fail_clearly() {
    let binary = workspace_binary("switchyard-control").expect("binary built");
    let help = Command::new(&binary).arg("--help").output().expect("runs");
    assert!(help.status.success());
    let help = String::from_utf8_lossy(&help.stdout);
    for key in [
        "GrpcListenAddr",
        "DataDir",
        "AdminToken",
        "ProxyToken",
        "AvailableCoins",
        "ZKBroker",
        "ZKSwitcherWatchDir",
        "StratumServerCaseInsensitive",
        "LogFormat",
        "--config",
    ] {
        assert!(help.contains(key), "--help mentions {key}:\n{help}");
    }

    let dir = tempfile::tempdir().expect("tempdir");
    for (config, says) in [
        (r#"{"AvailableCoins": []}"#, "AvailableCoins"),
        (
            r#"{"AvailableCoins": ["btc"], "GrpcListenAddr": "nowhere"}"#,
            "GrpcListenAddr",
        ),
        (
            r#"{"AvailableCoins": ["btc"], "LogFormat": "xml"}"#,
            "LogFormat",
        ),
        (r#"{"AvailableCoins": "btc"}"#, "not valid"),
        ("not json", "not valid"),
    ] {
        let path = dir.path().join("bad.json");
        std::fs::write(&path, config).expect("write");
        let out = Command::new(&binary)
            .arg("--config")
            .arg(&path)
            .arg("--check-config")
            .output()
            .expect("runs");
        assert!(!out.status.success(), "{config} must be refused");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains(says),
            "{config}: stderr {stderr:?} should mention {says}"
        );
    }
    let path = dir.path().join("good.json");
    std::fs::write(
        &path,
        r#"{"AvailableCoins": ["btc","bch"], "APIUser": "x"}"#,
    )
    .expect("write");
    let out = Command::new(&binary)
        .args(["--check-config", "--config"])
        .arg(&path)
        .output()
        .expect("runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn the_binary_serves_the_http_switch_api_beside_grpc() {
    let http_port = switchyard_tests::control::free_port().expect("port");
    let mut control = ControlProcess::start_with(
        |c| {
            c["EnableAPIServer"] = true.into();
            c["ListenAddr"] = format!("127.0.0.1:{http_port}").into();
            c["APIUser"] = "backend".into();
            c["APIPassword"] = "s3cret".into();
        },
        vec![],
    )
    .await
    .expect("control starts");
    let http = reqwest::Client::new();
    let url = format!("http://127.0.0.1:{http_port}/switch?puname=erin&coin=bch");
    let denied = http.get(&url).send().await.expect("HTTP answers");
    assert_eq!(denied.status(), 401);
    let body: serde_json::Value = http
        .get(&url)
        .basic_auth("backend", Some("s3cret"))
        .send()
        .await
        .expect("HTTP answers")
        .json()
        .await
        .expect("JSON");
    assert_eq!(
        body,
        serde_json::json!({"err_no":0,"err_msg":"","success":true})
    );
    let read = control
        .admin()
        .get_user_coin(GetUserCoinRequest {
            user: "erin".into(),
        })
        .await
        .expect("erin exists")
        .into_inner()
        .user_coin
        .expect("record");
    assert_eq!(read.coin, "bch", "HTTP and gRPC share one core");
    assert!(control.terminate().await.expect("exits").success());
}
