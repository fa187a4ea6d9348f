//! User-list ingestion (issue 4, SPEC §7) against a real ZooKeeper and a real HTTP fixture of
//! the pool backend: the znodes, the cursor, restarts that never overwrite a user's switch, and
//! the user-list API sservers read.

use std::time::Duration;

use switchyard_control::config::ControlConfig;
use switchyard_proto::v1::GetUserCoinRequest;
use switchyard_tests::{
    control::{InProcessControl, free_port, test_config},
    userlist::{Answer, UserListBackend},
    wait::wait_until,
    zookeeper::{ZooKeeperServer, unique_root},
};

fn config(
    backend: &UserListBackend,
    zk: &ZooKeeperServer,
    root: &str,
    dir: &std::path::Path,
) -> ControlConfig {
    let mut c = test_config(dir);
    c.zk_broker = vec![zk.connect_string()];
    c.zk_switcher_watch_dir = format!("{root}/switcher/");
    c.zk_switchyard_dir = format!("{root}/switchyard/");
    c.zk_server_id_assign_dir = format!("{root}/swid/");
    c.zk_case_index_dir = format!("{root}/case/");
    c.zk_session_timeout_seconds = 4;
    c.user_list_api = ["btc", "bch", "ltc"]
        .iter()
        .map(|coin| ((*coin).to_owned(), backend.url(coin)))
        .collect();
    c.interval_seconds = 1;
    c.user_list_timeout_seconds = 1;
    c
}

async fn node(client: &zookeeper_async::ZooKeeper, path: &str) -> Option<String> {
    client
        .get_data(path, false)
        .await
        .ok()
        .map(|(d, _)| String::from_utf8_lossy(&d).into_owned())
}

fn non_decreasing(asked: &[u64]) -> bool {
    asked.windows(2).all(|w| w[0] <= w[1])
}

#[tokio::test]
async fn user_lists_become_znodes_without_ever_overwriting_a_switch() {
    let zk = ZooKeeperServer::shared().expect("ZooKeeper");
    let root = unique_root("ingest");
    let backend = UserListBackend::start().await.expect("backend");
    backend.script(
        "btc",
        [Answer::page(&[
            ("alice", 1),
            ("bob", 2),
            ("mmm_btc", 4),
            ("x/y", 5),
            ("Carol", 6),
        ])],
    );
    backend.script(
        "bch",
        [
            Answer::ok(r#"{"err_no":1,"err_msg":"busy","data":[]}"#),
            Answer::page(&[("bob", 3), ("dave", 7), ("mmm_bch", 8)]),
        ],
    );
    backend.script(
        "ltc",
        [
            Answer {
                status: 500,
                body: "oops".into(),
                delay: Duration::ZERO,
            },
            Answer {
                delay: Duration::from_secs(3),
                ..Answer::page(&[("erin", 9)])
            },
            Answer::ok("not json"),
            Answer::page(&[("erin", 9), ("frank", 10)]),
        ],
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let http_port = free_port().expect("port");
    let mut cfg = config(&backend, zk, &root, dir.path());
    cfg.enable_api_server = true;
    cfg.listen_addr = format!("127.0.0.1:{http_port}");
    cfg.api_user = "u".into();
    cfg.api_password = "p".into();
    let control = InProcessControl::start_config(&cfg).await.expect("control");

    let client = zk.connect(Duration::from_secs(4)).await.expect("client");
    let users = format!("{root}/switcher");
    wait_until(Duration::from_secs(30), "every list ingested", || async {
        let mut children = client
            .get_children(&users, false)
            .await
            .map_err(|e| format!("{e:?}"))?;
        children.sort();
        (children == ["Carol", "alice", "bob", "dave", "erin", "frank", "mmm"])
            .then_some(())
            .ok_or(format!("{children:?}"))
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    for (user, coin) in [
        ("alice", "btc"),
        ("bob", "btc"), // in two lists: the coin written first
        ("mmm", "btc"), // alias names map to their user
        ("Carol", "btc"),
        ("dave", "bch"),
        ("erin", "ltc"),
        ("frank", "ltc"),
    ] {
        assert_eq!(
            node(&client, &format!("{users}/{user}")).await.as_deref(),
            Some(coin),
            "{user}"
        );
    }
    for (lower, name) in [("carol", "Carol"), ("alice", "alice"), ("mmm", "mmm")] {
        assert_eq!(
            node(&client, &format!("{root}/case/{lower}"))
                .await
                .as_deref(),
            Some(name),
            "case index of {name}"
        );
    }
    assert_eq!(
        node(&client, &format!("{root}/case/x")).await,
        None,
        "x/y is skipped"
    );

    // The user-list API serves what was ingested, in ascending puid, an alias as the user it
    // stands for (`mmm_btc` is listed as `mmm`, as the Go initUserCoin listed it).
    let http = reqwest::Client::new();
    let get = |query: &str| {
        let url = format!("http://127.0.0.1:{http_port}/?{query}");
        let http = http.clone();
        async move {
            http.get(url)
                .send()
                .await
                .expect("HTTP")
                .text()
                .await
                .expect("body")
        }
    };
    assert_eq!(
        get("coin=btc&last_id=0").await,
        r#"{"err_no":0,"err_msg":null,"data":{"alice":1,"bob":2,"mmm":4,"Carol":6}}"#
    );
    assert_eq!(
        get("coin=btc&last_id=2").await,
        r#"{"err_no":0,"err_msg":null,"data":{"mmm":4,"Carol":6}}"#
    );
    assert_eq!(
        get("coin=&last_id=3").await,
        r#"{"err_no":0,"err_msg":null,"data":{"mmm":4,"Carol":6,"dave":7,"erin":9,"frank":10}}"#
    );
    assert_eq!(
        get("coin=bch&last_id=0").await,
        r#"{"err_no":0,"err_msg":null,"data":{"bob":3,"dave":7,"mmm":8}}"#
    );
    // A cursor that is not a number is refused in an HTTP 200 reply, like every API error.
    let response = http
        .get(format!(
            "http://127.0.0.1:{http_port}/?coin=btc&last_id=abc"
        ))
        .send()
        .await
        .expect("HTTP");
    assert_eq!(response.status(), reqwest::StatusCode::OK);
    assert_eq!(
        response.text().await.expect("body"),
        r#"{"err_no":400,"err_msg":"last_id must be a non-negative integer","data":{}}"#
    );
    assert_eq!(
        get("coin=ltc&last_id=10").await,
        r#"{"err_no":0,"err_msg":null,"data":{}}"#
    );

    // Users switch (here by an outside writer, as the Go API server would); then the ingestion
    // restarts from the first page and overwrites nothing.
    client
        .set_data(&format!("{users}/alice"), b"ltc".to_vec(), None)
        .await
        .expect("switch alice");
    control.shutdown().await.expect("stops");
    for coin in ["btc", "bch", "ltc"] {
        assert!(
            non_decreasing(&backend.asked(coin)),
            "{coin}: {:?}",
            backend.asked(coin)
        );
    }
    assert_eq!(
        backend.remaining("ltc"),
        0,
        "every scripted answer was asked for"
    );
    backend.script("btc", [Answer::page(&[("alice", 1), ("newbie", 11)])]);
    let before = backend.asked("btc").len();
    let control = InProcessControl::start_config(&cfg)
        .await
        .expect("control restarts");
    wait_until(
        Duration::from_secs(30),
        "the restarted ingestion",
        || async {
            let asked = backend.asked("btc");
            asked[before..]
                .contains(&11)
                .then_some(())
                .ok_or(format!("{asked:?}"))
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        node(&client, &format!("{users}/alice")).await.as_deref(),
        Some("ltc")
    );
    assert_eq!(
        node(&client, &format!("{users}/newbie")).await.as_deref(),
        Some("btc")
    );
    let alice = control
        .admin()
        .get_user_coin(GetUserCoinRequest {
            user: "alice".into(),
        })
        .await
        .expect("alice")
        .into_inner()
        .user_coin
        .expect("record");
    assert_eq!(alice.coin, "ltc");
    let asked = backend.asked("btc");
    assert!(
        non_decreasing(&asked[before..]),
        "the cursor never moves backwards: {asked:?}"
    );
}
