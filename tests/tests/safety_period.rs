//! The safety period of SPEC §6, on both stores: a switch of an existing user to a coin whose
//! user list has not held the user long enough is answered at once and written later; the wait
//! survives a restart, GetUserCoin shows it, and an immediate switch replaces it.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use switchyard_control::config::ControlConfig;
use switchyard_proto::v1::{GetUserCoinRequest, GetUserCoinResponse, SwitchCoinRequest};
use switchyard_tests::{
    control::{InProcessControl, test_config},
    wait::wait_until,
    zookeeper::{ZooKeeperServer, unique_root},
};

/// IntervalSeconds: the safety period is 1.5 times this.
const INTERVAL: u64 = 2;

fn with_user_lists(c: &mut ControlConfig) {
    // Only bch's user list is ingested: bch switches wait, btc and ltc ones do not.
    c.user_list_api = [("bch".to_owned(), "http://127.0.0.1:9/unused".to_owned())].into();
    c.interval_seconds = INTERVAL;
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

fn switch(user: &str, coin: &str) -> SwitchCoinRequest {
    SwitchCoinRequest {
        user: user.into(),
        coin: coin.into(),
    }
}

async fn get(control: &InProcessControl, user: &str) -> GetUserCoinResponse {
    control
        .admin()
        .get_user_coin(GetUserCoinRequest { user: user.into() })
        .await
        .expect("get")
        .into_inner()
}

async fn wait_coin(control: &InProcessControl, user: &str, coin: &str) {
    wait_until(
        Duration::from_secs(30),
        &format!("{user} on {coin}"),
        || async {
            let got = get(control, user).await;
            match got.user_coin {
                Some(u) if u.coin == coin && got.pending_coin.is_empty() => Ok(()),
                other => Err(format!("{other:?}, pending {:?}", got.pending_coin)),
            }
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
}

async fn scenario(config: ControlConfig) {
    let control = InProcessControl::start_config(&config)
        .await
        .expect("control");
    let mut admin = control.admin();

    // A new user is created at once, whatever the list says.
    let created = admin
        .switch_coin(switch("alice", "btc"))
        .await
        .expect("create")
        .into_inner();
    assert_eq!(created.pending_applies_at_unix, 0);

    // Alice was never seen in bch's list: the switch waits the whole period.
    let before = now();
    let held = admin
        .switch_coin(switch("alice", "bch"))
        .await
        .expect("switch")
        .into_inner();
    let due = held.pending_applies_at_unix;
    assert!(
        due >= before + (INTERVAL * 3 / 2) as i64 - 1,
        "held back for the whole period: due {due}, asked at {before}"
    );
    assert_eq!(
        held.user_coin.as_ref().map(|u| u.coin.as_str()),
        Some("btc")
    );
    let shown = get(&control, "alice").await;
    assert_eq!(shown.user_coin.map(|u| u.coin).as_deref(), Some("btc"));
    assert_eq!(shown.pending_coin, "bch");
    assert_eq!(shown.pending_applies_at_unix, due);

    // Carol has been in bch's list for long enough: written at once.
    admin
        .switch_coin(switch("carol", "btc"))
        .await
        .expect("create");
    control
        .core
        .record_first_seen("bch", vec!["carol".into()], (now() - 3_600) as u64)
        .await
        .expect("recorded");
    let at_once = admin
        .switch_coin(switch("carol", "bch"))
        .await
        .expect("switch")
        .into_inner();
    assert_eq!(at_once.pending_applies_at_unix, 0);
    assert_eq!(at_once.user_coin.map(|u| u.coin).as_deref(), Some("bch"));

    // Dave's held-back switch is replaced by an immediate one (ltc has no list).
    admin
        .switch_coin(switch("dave", "btc"))
        .await
        .expect("create");
    let dave = admin
        .switch_coin(switch("dave", "bch"))
        .await
        .expect("switch")
        .into_inner();
    assert!(dave.pending_applies_at_unix > 0);
    admin
        .switch_coin(switch("dave", "ltc"))
        .await
        .expect("immediate");
    assert!(get(&control, "dave").await.pending_coin.is_empty());

    // A restart before the switch is due does not lose it.
    control.shutdown().await.expect("stops");
    let control = InProcessControl::start_config(&config)
        .await
        .expect("restarts");
    assert_eq!(
        get(&control, "alice").await.pending_coin,
        "bch",
        "still pending"
    );
    wait_coin(&control, "alice", "bch").await;
    assert!(now() >= due, "not written before it was due");
    // Dave's cancelled switch never lands.
    assert_eq!(
        get(&control, "dave")
            .await
            .user_coin
            .map(|u| u.coin)
            .as_deref(),
        Some("ltc")
    );
    control.shutdown().await.expect("stops");
}

#[tokio::test]
async fn held_back_switches_on_the_embedded_store() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = test_config(dir.path());
    with_user_lists(&mut config);
    scenario(config).await;
}

#[tokio::test]
async fn held_back_switches_on_zookeeper() {
    let zk = ZooKeeperServer::shared().expect("ZooKeeper");
    let root = unique_root("safety");
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = test_config(dir.path());
    with_user_lists(&mut config);
    config.zk_broker = vec![zk.connect_string()];
    config.zk_switcher_watch_dir = format!("{root}/switcher/");
    config.zk_switchyard_dir = format!("{root}/switchyard/");
    config.zk_server_id_assign_dir = format!("{root}/swid/");
    config.zk_session_timeout_seconds = 4;
    scenario(config).await;
}
