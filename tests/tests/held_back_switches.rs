//! Held-back switches (SPEC §6's safety period): the main path, and where things overlap, on both stores and on
//! two replicas: a same-coin switch is never held; a held-back batch is one store batch; an
//! older held-back coin never overwrites a newer switch (another replica's, an outside
//! writer's); first-seen times survive a restart; another replica applies a switch held back by
//! a stopped one; two deployments on one ZooKeeper never take each other's switches.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use switchyard_control::{config::ControlConfig, core::Creator};
use switchyard_proto::v1::{
    GetUserCoinRequest, GetUserCoinResponse, SwitchCoinRequest, SwitchCoinsRequest,
};
use switchyard_tests::{
    control::{InProcessControl, test_config},
    wait::wait_until,
    zookeeper::{ZooKeeperServer, unique_root},
};
use zookeeper_async::{Acl, CreateMode, ZooKeeper};

/// IntervalSeconds: the safety period is 1.5 times this (3 s).
const INTERVAL: u64 = 2;

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Only bch's user list is ingested: bch switches may wait, btc and ltc ones do not.
fn with_user_lists(c: &mut ControlConfig) {
    c.user_list_api = [("bch".to_owned(), "http://127.0.0.1:9/unused".to_owned())].into();
    c.interval_seconds = INTERVAL;
}

fn embedded_config(dir: &std::path::Path) -> ControlConfig {
    let mut c = test_config(dir);
    with_user_lists(&mut c);
    c
}

/// A deployment watching `{root}/{name}/`, with Switchyard's own nodes under the shared
/// `{root}/switchyard/` (as two deployments that both keep the default would have).
fn zk_config(zk: &ZooKeeperServer, root: &str, name: &str, dir: &std::path::Path) -> ControlConfig {
    let mut c = embedded_config(dir);
    c.zk_broker = vec![zk.connect_string()];
    c.zk_switcher_watch_dir = format!("{root}/{name}/");
    c.zk_switchyard_dir = format!("{root}/switchyard/");
    c.zk_server_id_assign_dir = format!("{root}/swid-{name}/");
    c.zk_session_timeout_seconds = 4;
    c
}

/// Where a deployment keeps a user's held-back switch.
fn pending_node(root: &str, name: &str, user: &str) -> String {
    format!("{root}/switchyard{root}/{name}/pending/{user}")
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

fn coin_of(got: &GetUserCoinResponse) -> Option<String> {
    got.user_coin.as_ref().map(|u| u.coin.clone())
}

/// Switches `user` (existing) to bch and checks it was held back; answers when it is due.
async fn hold(control: &InProcessControl, user: &str) -> u64 {
    let held = control
        .admin()
        .switch_coin(switch(user, "bch"))
        .await
        .expect("switch")
        .into_inner();
    assert!(
        held.pending_applies_at_unix > 0,
        "{user}'s switch is held back"
    );
    held.pending_applies_at_unix as u64
}

async fn create(control: &InProcessControl, user: &str, coin: &str) {
    let created = control
        .admin()
        .switch_coin(switch(user, coin))
        .await
        .expect("create")
        .into_inner();
    assert_eq!(
        created.pending_applies_at_unix, 0,
        "a new user is created at once"
    );
}

async fn outside_client(zk: &ZooKeeperServer) -> ZooKeeper {
    zk.connect(Duration::from_secs(10))
        .await
        .expect("outside ZooKeeper client")
}

async fn wait_gone(client: &ZooKeeper, path: &str) {
    wait_until(Duration::from_secs(30), &format!("{path} gone"), || async {
        match client.exists(path, false).await {
            Ok(None) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"));
}

async fn wait_coin(control: &InProcessControl, user: &str, coin: &str) {
    wait_until(
        Duration::from_secs(30),
        &format!("{user} on {coin}"),
        || async {
            let got = get(control, user).await;
            if coin_of(&got).as_deref() == Some(coin) && got.pending_coin.is_empty() {
                Ok(())
            } else {
                Err(format!("{got:?}"))
            }
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
}

/// A user already on a coin whose list is ingested, switched to that coin again, is
/// re-announced at once (a new revision), never held back.
async fn same_coin_scenario(config: ControlConfig) {
    let control = InProcessControl::start_config(&config)
        .await
        .expect("control");
    create(&control, "alice", "bch").await;
    let before = get(&control, "alice").await;
    let again = control
        .admin()
        .switch_coin(switch("alice", "bch"))
        .await
        .expect("switch")
        .into_inner();
    assert_eq!(again.pending_applies_at_unix, 0, "not held back: {again:?}");
    let revision =
        |r: &Option<switchyard_proto::v1::UserCoin>| r.as_ref().map_or(0, |u| u.revision);
    assert!(
        revision(&again.user_coin) > revision(&before.user_coin),
        "re-announced with a new revision: {again:?} after {before:?}"
    );
    assert!(get(&control, "alice").await.pending_coin.is_empty());
    control.shutdown().await.expect("stops");
}

#[tokio::test]
async fn a_same_coin_switch_is_never_held_back_on_the_embedded_store() {
    let dir = tempfile::tempdir().expect("tempdir");
    same_coin_scenario(embedded_config(dir.path())).await;
}

#[tokio::test]
async fn a_same_coin_switch_is_never_held_back_on_zookeeper() {
    let zk = ZooKeeperServer::shared().expect("ZooKeeper");
    let dir = tempfile::tempdir().expect("tempdir");
    same_coin_scenario(zk_config(zk, &unique_root("same"), "a", dir.path())).await;
}

/// First-seen times are in the store: a user long in bch's list is switched to bch at once
/// after a restart too (the Go server and earlier versions kept them in memory, so every such
/// switch waited the whole period again).
async fn first_seen_scenario(config: ControlConfig) {
    let control = InProcessControl::start_config(&config)
        .await
        .expect("control");
    create(&control, "erin", "btc").await;
    create(&control, "fred", "btc").await;
    control
        .core
        .create_users_if_absent(
            "bch",
            vec!["erin".into()],
            now() - 3_600,
            Creator::Ingestion,
        )
        .await
        .expect("bch is a coin");
    control.shutdown().await.expect("stops");

    let control = InProcessControl::start_config(&config)
        .await
        .expect("restarts");
    let erin = control
        .admin()
        .switch_coin(switch("erin", "bch"))
        .await
        .expect("switch")
        .into_inner();
    assert_eq!(
        erin.pending_applies_at_unix, 0,
        "seen an hour ago, before the restart: written at once"
    );
    assert_eq!(
        coin_of(&get(&control, "erin").await).as_deref(),
        Some("bch")
    );
    // Fred was never seen in bch's list: still held back.
    hold(&control, "fred").await;
    control.shutdown().await.expect("stops");
}

#[tokio::test]
async fn first_seen_times_survive_a_restart_on_the_embedded_store() {
    let dir = tempfile::tempdir().expect("tempdir");
    first_seen_scenario(embedded_config(dir.path())).await;
}

#[tokio::test]
async fn first_seen_times_survive_a_restart_on_zookeeper() {
    let zk = ZooKeeperServer::shared().expect("ZooKeeper");
    let dir = tempfile::tempdir().expect("tempdir");
    first_seen_scenario(zk_config(zk, &unique_root("seen"), "a", dir.path())).await;
}

/// On one replica of the embedded store: a held-back switch replaced by an immediate one never
/// lands, and one left alone lands when due.
#[tokio::test]
async fn an_immediate_switch_replaces_a_held_back_one_on_the_embedded_store() {
    let dir = tempfile::tempdir().expect("tempdir");
    let control = InProcessControl::start_config(&embedded_config(dir.path()))
        .await
        .expect("control");
    create(&control, "alice", "btc").await;
    create(&control, "bob", "btc").await;
    hold(&control, "alice").await;
    let due = hold(&control, "bob").await;
    control
        .admin()
        .switch_coin(switch("alice", "ltc"))
        .await
        .expect("immediate");
    wait_coin(&control, "bob", "bch").await;
    assert!(now() >= due);
    let alice = get(&control, "alice").await;
    assert_eq!(coin_of(&alice).as_deref(), Some("ltc"), "{alice:?}");
    assert!(alice.pending_coin.is_empty());
    control.shutdown().await.expect("stops");
}

/// Two replicas on one ZooKeeper. A switch held back by replica A is made obsolete by a newer
/// switch through replica B (at once, before B could have read A's record) and by an outside
/// writer (the Go API server, zkCli): when it is due, A drops it instead of writing the older
/// coin over the newer one.
#[tokio::test]
async fn an_older_held_back_switch_never_overwrites_a_newer_one_on_two_replicas() {
    let zk = ZooKeeperServer::shared().expect("ZooKeeper");
    let root = unique_root("newer");
    let (dir_a, dir_b) = (
        tempfile::tempdir().expect("tempdir"),
        tempfile::tempdir().expect("tempdir"),
    );
    let a = InProcessControl::start_config(&zk_config(zk, &root, "sw", dir_a.path()))
        .await
        .expect("replica A");
    let b = InProcessControl::start_config(&zk_config(zk, &root, "sw", dir_b.path()))
        .await
        .expect("replica B");
    let client = outside_client(zk).await;
    for user in ["alice", "bob", "carol"] {
        create(&a, user, "btc").await;
    }
    hold(&a, "alice").await;
    b.admin()
        .switch_coin(switch("alice", "ltc"))
        .await
        .expect("B's immediate switch");
    hold(&a, "bob").await;
    client
        .set_data(&format!("{root}/sw/bob"), b"ltc".to_vec(), None)
        .await
        .expect("outside write");
    // Carol's held-back switch is left alone: it lands, so the timer did run.
    hold(&a, "carol").await;
    wait_coin(&a, "carol", "bch").await;
    for user in ["alice", "bob"] {
        wait_gone(&client, &pending_node(&root, "sw", user)).await;
        for replica in [&a, &b] {
            let got = get(replica, user).await;
            assert_eq!(coin_of(&got).as_deref(), Some("ltc"), "{user}: {got:?}");
            assert!(got.pending_coin.is_empty(), "{user}: {got:?}");
        }
        let (data, _) = client
            .get_data(&format!("{root}/sw/{user}"), false)
            .await
            .expect("node");
        assert_eq!(data, b"ltc", "{user}'s node keeps the newer coin");
    }
    a.shutdown().await.expect("stops");
    b.shutdown().await.expect("stops");
}

/// 2,000 held-back switches of one call go to ZooKeeper as a few transactions, not one
/// write each (counted in zxids between two probe writes), and all land when due. A ZooKeeper
/// of its own: other tests' writes on a shared one would take zxids in between.
#[tokio::test]
async fn a_held_back_batch_is_a_few_zookeeper_transactions() {
    let own = ZooKeeperServer::start().expect("ZooKeeper");
    let zk = &own;
    let root = unique_root("batch");
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = zk_config(zk, &root, "sw", dir.path());
    config.max_switch_batch = 10_000;
    let control = InProcessControl::start_config(&config)
        .await
        .expect("control");
    let users: Vec<String> = (0..2_000).map(|i| format!("u{i}")).collect();
    let batch = |coin: &str| SwitchCoinsRequest {
        switches: users.iter().map(|u| switch(u, coin)).collect(),
    };
    control
        .admin()
        .switch_coins(batch("btc"))
        .await
        .expect("create");
    let client = outside_client(zk).await;
    let probe = format!("{root}/probe");
    let created = client
        .create(
            &probe,
            Vec::new(),
            Acl::open_unsafe().clone(),
            CreateMode::Persistent,
        )
        .await
        .expect("probe");
    let before = client
        .exists(&created, false)
        .await
        .expect("stat")
        .expect("probe")
        .mzxid;
    let answer = control
        .admin()
        .switch_coins(batch("bch"))
        .await
        .expect("hold")
        .into_inner();
    let after = client
        .set_data(&probe, Vec::new(), None)
        .await
        .expect("probe")
        .mzxid;
    assert_eq!(answer.results.len(), users.len());
    assert!(
        answer
            .results
            .iter()
            .all(|r| r.pending_applies_at_unix > 0 && r.error.is_none()),
        "every switch held back"
    );
    let transactions = after - before - 1;
    assert!(
        transactions <= 10,
        "2,000 held-back switches took {transactions} ZooKeeper transactions"
    );
    for user in ["u0", "u999", "u1999"] {
        wait_coin(&control, user, "bch").await;
    }
    wait_until(Duration::from_secs(30), "every user on bch", || async {
        let on_bch = users
            .iter()
            .filter(|u| {
                control
                    .core
                    .user_coin(u)
                    .ok()
                    .flatten()
                    .is_some_and(|r| r.coin == "bch")
            })
            .count();
        if on_bch == users.len() {
            Ok(())
        } else {
            Err(format!("{on_bch} on bch"))
        }
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    control.shutdown().await.expect("stops");
}

/// A replica that held a switch back stops before it is due: another replica (which learns of
/// it at its reconcile, ZKReconcileSeconds) applies it.
#[tokio::test]
async fn another_replica_applies_a_switch_held_back_by_a_stopped_one() {
    let zk = ZooKeeperServer::shared().expect("ZooKeeper");
    let root = unique_root("handover");
    let (dir_a, dir_b) = (
        tempfile::tempdir().expect("tempdir"),
        tempfile::tempdir().expect("tempdir"),
    );
    let mut config_b = zk_config(zk, &root, "sw", dir_b.path());
    config_b.zk_reconcile_seconds = 1;
    let a = InProcessControl::start_config(&zk_config(zk, &root, "sw", dir_a.path()))
        .await
        .expect("replica A");
    let b = InProcessControl::start_config(&config_b)
        .await
        .expect("replica B");
    create(&a, "alice", "btc").await;
    let due = hold(&a, "alice").await;
    a.shutdown().await.expect("A stops");
    wait_coin(&b, "alice", "bch").await;
    assert!(now() >= due, "not before it was due");
    b.shutdown().await.expect("stops");
}

/// Two deployments (watch directories) on one ensemble, sharing ZKSwitchyardDir as two that
/// keep the default do. Deployment A holds a switch back and stops; deployment B, reconciling
/// every second, runs past the due time and never takes it; A, back, applies it in its own
/// directory. B's own held-back switch lands in B's directory only.
#[tokio::test]
async fn two_deployments_on_one_zookeeper_never_take_each_others_switches() {
    let zk = ZooKeeperServer::shared().expect("ZooKeeper");
    let root = unique_root("deploy");
    let (dir_a, dir_b) = (
        tempfile::tempdir().expect("tempdir"),
        tempfile::tempdir().expect("tempdir"),
    );
    let mut config_a = zk_config(zk, &root, "a", dir_a.path());
    config_a.zk_reconcile_seconds = 1;
    let mut config_b = zk_config(zk, &root, "b", dir_b.path());
    config_b.zk_reconcile_seconds = 1;
    let client = outside_client(zk).await;

    let a = InProcessControl::start_config(&config_a)
        .await
        .expect("deployment A");
    let b = InProcessControl::start_config(&config_b)
        .await
        .expect("deployment B");
    create(&a, "alice", "btc").await;
    create(&b, "bob", "btc").await;
    let due_a = hold(&a, "alice").await;
    a.shutdown().await.expect("A stops");
    hold(&b, "bob").await;
    wait_coin(&b, "bob", "bch").await;
    // Let B run past A's due time (and reconcile meanwhile): B must leave A's record alone.
    wait_until(Duration::from_secs(30), "past A's due time", || async {
        if now() > due_a + 1 {
            Ok(())
        } else {
            Err(format!("now {}", now()))
        }
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let b_pass = b.core.pending_switch("bob").await.expect("valid");
    assert!(b_pass.is_none(), "B's own switch was applied");
    assert!(
        client
            .exists(&pending_node(&root, "a", "alice"), false)
            .await
            .expect("exists")
            .is_some(),
        "A's held-back switch is still there while A is down"
    );
    assert!(
        b.core.user_coin("alice").expect("valid").is_none(),
        "B never wrote A's user into its own directory"
    );
    let a = InProcessControl::start_config(&config_a)
        .await
        .expect("A restarts");
    wait_coin(&a, "alice", "bch").await;
    assert!(
        a.core.user_coin("bob").expect("valid").is_none(),
        "A never wrote B's user into its own directory"
    );
    a.shutdown().await.expect("stops");
    b.shutdown().await.expect("stops");
}

/// Held-back switches are not read again every second: with 500 of them pending (due in an
/// hour), an idle replica sends ZooKeeper only its session pings over an observation window
/// (earlier versions listed the directory and read every pending node each second, on every
/// replica). A ZooKeeper of its own, so that other tests' requests do not count.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pending_switches_are_not_polled() {
    let zk = ZooKeeperServer::start().expect("ZooKeeper");
    let root = unique_root("idle");
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = zk_config(&zk, &root, "sw", dir.path());
    config.interval_seconds = 2_400;
    let control = InProcessControl::start_config(&config)
        .await
        .expect("control");
    let users: Vec<String> = (0..500).map(|i| format!("u{i}")).collect();
    let batch = |coin: &str| SwitchCoinsRequest {
        switches: users.iter().map(|u| switch(u, coin)).collect(),
    };
    control
        .admin()
        .switch_coins(batch("btc"))
        .await
        .expect("create");
    let held = control
        .admin()
        .switch_coins(batch("bch"))
        .await
        .expect("hold")
        .into_inner();
    assert!(held.results.iter().all(|r| r.pending_applies_at_unix > 0));
    let packets = || {
        tokio::task::block_in_place(|| zk.four_letter_word("mntr"))
            .ok()
            .and_then(|m| {
                m.lines().find_map(|l| {
                    l.strip_prefix("zk_packets_received")?
                        .trim()
                        .parse::<u64>()
                        .ok()
                })
            })
            .expect("mntr answers zk_packets_received")
    };
    let before = packets();
    // An observation window, not a synchronisation: what the replica sends while idle.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let sent = packets() - before;
    eprintln!("an idle replica with 500 pending switches: {sent} ZooKeeper requests in 3 s");
    assert!(
        sent < 100,
        "an idle replica with 500 pending switches sent {sent} requests in 3 s"
    );
    control.shutdown().await.expect("stops");
}

/// The safety period's main path (moved here from safety_period.rs): a new user is created at
/// once, a user never seen waits the whole period, one seen long ago does not, an immediate
/// switch replaces a held-back one, and a restart before the due time loses nothing.
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
    let before = now() as i64;
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
        .record_first_seen("bch", vec!["carol".into()], now() - 3_600)
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
    assert!(now() as i64 >= due, "not written before it was due");
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
    scenario(embedded_config(dir.path())).await;
}

#[tokio::test]
async fn held_back_switches_on_zookeeper() {
    let zk = ZooKeeperServer::shared().expect("ZooKeeper");
    let dir = tempfile::tempdir().expect("tempdir");
    scenario(zk_config(
        zk,
        &unique_root("safety"),
        "switcher",
        dir.path(),
    ))
    .await;
}
