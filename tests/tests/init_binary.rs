//! `switchyard-init` run apart from the control service: it pulls the user lists, sends the
//! users to a remote control service over gRPC (with its admin token), and serves the
//! user-list API itself.

use std::{
    process::{Child, Command, Stdio},
    time::Duration,
};

use switchyard_proto::v1::GetUserCoinRequest;
use switchyard_tests::{
    control::{InProcessControl, free_port, workspace_binary},
    userlist::{Answer, UserListBackend},
    wait::wait_until,
};
use tonic::Request;

/// Kills the child on drop.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn switchyard_init_ingests_into_a_remote_control_service() {
    let control = InProcessControl::start_with(|c| c.admin_token = Some("adm".into()))
        .await
        .expect("control");
    let backend = UserListBackend::start().await.expect("backend");
    backend.script(
        "btc",
        [Answer::page(&[("alice", 1), ("bob_btc", 2), ("x/y", 3)])],
    );
    backend.script("ltc", [Answer::page(&[("carol", 5)])]);
    let dir = tempfile::tempdir().expect("tempdir");
    let api_port = free_port().expect("port");
    let config = serde_json::json!({
        "ControlEndpoints": ["http://127.0.0.1:1", format!("http://{}", control.addr)],
        "UserListAPI": {"btc": backend.url("btc"), "ltc": backend.url("ltc")},
        "IntervalSeconds": 1,
        "EnableAPIServer": true,
        "ListenAddr": format!("127.0.0.1:{api_port}"),
        "ZKBroker": ["127.0.0.1:2181"],
    });
    let path = dir.path().join("init.json");
    std::fs::write(&path, config.to_string()).expect("write config");
    let log = std::fs::File::create(dir.path().join("init.log")).expect("log");
    let child = Command::new(workspace_binary("switchyard-init").expect("binary built"))
        .arg("--config")
        .arg(&path)
        .env("SWITCHYARD_ADMIN_TOKEN", "adm")
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .spawn()
        .expect("spawn switchyard-init");
    let _running = Running(child);

    let admin = control.admin();
    for (user, coin) in [("alice", "btc"), ("bob", "btc"), ("carol", "ltc")] {
        wait_until(Duration::from_secs(30), &format!("{user} ingested"), || {
            let mut admin = admin.clone();
            async move {
                let mut request = Request::new(GetUserCoinRequest { user: user.into() });
                request
                    .metadata_mut()
                    .insert("authorization", "Bearer adm".parse().expect("ascii"));
                match admin.get_user_coin(request).await {
                    Ok(r) => Ok(r.into_inner().user_coin.map(|u| u.coin).unwrap_or_default()),
                    Err(e) => Err(e.to_string()),
                }
                .and_then(|c| if c == coin { Ok(()) } else { Err(c) })
            }
        })
        .await
        .unwrap_or_else(|e| {
            let log = std::fs::read_to_string(dir.path().join("init.log")).unwrap_or_default();
            panic!("{e}\n--- switchyard-init log ---\n{log}")
        });
    }
    // The init process serves the list it ingested.
    let expected = r#"{"err_no":0,"err_msg":null,"data":{"alice":1,"bob":2}}"#;
    wait_until(Duration::from_secs(10), "the user-list API", || async {
        let url = format!("http://127.0.0.1:{api_port}/?coin=btc&last_id=0");
        let body = match reqwest::get(url).await {
            Ok(r) => r.text().await.map_err(|e| e.to_string())?,
            Err(e) => return Err(e.to_string()),
        };
        if body == expected { Ok(()) } else { Err(body) }
    })
    .await
    .unwrap_or_else(|e| {
        let log = std::fs::read_to_string(dir.path().join("init.log")).unwrap_or_default();
        panic!("{e}\n--- switchyard-init log ---\n{log}")
    });
}

#[test]
fn switchyard_init_refuses_a_config_without_control_endpoints() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("init.json");
    std::fs::write(&path, r#"{"UserListAPI": {"btc": "http://127.0.0.1:1/"}}"#).expect("write");
    let out = Command::new(workspace_binary("switchyard-init").expect("binary built"))
        .args(["--check-config", "--config"])
        .arg(&path)
        .output()
        .expect("runs");
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("ControlEndpoints"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
