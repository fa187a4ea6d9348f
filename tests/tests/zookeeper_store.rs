//! The control service on a real ZooKeeper (issue 3): outside writers reach WatchSwitches
//! subscribers, replicas see each other's switches, and nothing is lost across a ZooKeeper
//! outage or a session expiry. The store itself: batched creates answer each write exactly,
//! and its feed brings in what others write next to them.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
    time::{Duration, Instant},
};

use futures::StreamExt;
use switchyard_control::{
    config::ControlConfig,
    index::UserCoinIndex,
    store::{
        Record, RecordKey, StoreContents, StoreWrite, UserCoinStore,
        zookeeper::{ZkSettings, ZooKeeperStore},
    },
    zk_session::ZkSession,
};
use switchyard_proto::v1::{
    AcquireServerIdRequest, GetUserCoinRequest, ListProxiesRequest, RenewServerIdRequest,
    SwitchCoinRequest, WatchSwitchesRequest, WatchSwitchesResponse,
};
use switchyard_tests::{
    control::{InProcessControl, channel},
    relay::TcpRelay,
    wait::wait_until,
    zookeeper::{ZooKeeperServer, unique_root},
};
use tokio_util::sync::CancellationToken;
use tonic::Streaming;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};
use zookeeper_async::{Acl, CreateMode, ZooKeeper};

const SESSION: Duration = Duration::from_secs(4);

fn zk_config(c: &mut ControlConfig, connect: &str, root: &str) {
    c.zk_broker = vec![connect.to_owned()];
    c.zk_switcher_watch_dir = format!("{root}/switcher/");
    c.zk_switchyard_dir = format!("{root}/switchyard/");
    c.zk_server_id_assign_dir = format!("{root}/swid/");
    c.zk_session_timeout_seconds = SESSION.as_secs();
    c.zk_request_timeout_seconds = 5;
}

fn switch(user: &str, coin: &str) -> SwitchCoinRequest {
    SwitchCoinRequest {
        user: user.into(),
        coin: coin.into(),
    }
}

/// A WatchSwitches subscriber that keeps what it received.
struct Subscriber {
    stream: Streaming<WatchSwitchesResponse>,
    /// Every user entry received after the initial sync, in arrival order.
    changes: Vec<(String, String, u64)>,
    users: BTreeMap<String, String>,
    revision: u64,
    store_id: String,
}

impl Subscriber {
    async fn connect(control: &InProcessControl, resume: Option<(u64, String)>) -> Self {
        let (resume_revision, store_id) = resume.unwrap_or_default();
        let stream = control
            .proxy_control()
            .watch_switches(WatchSwitchesRequest {
                resume_revision,
                store_id,
            })
            .await
            .expect("watch")
            .into_inner();
        let mut this = Self {
            stream,
            changes: Vec::new(),
            users: BTreeMap::new(),
            revision: 0,
            store_id: String::new(),
        };
        loop {
            let msg = this.next().await;
            this.apply(&msg, false);
            if msg.snapshot_complete {
                return this;
            }
        }
    }

    async fn next(&mut self) -> WatchSwitchesResponse {
        match tokio::time::timeout(Duration::from_secs(30), self.stream.next()).await {
            Ok(Some(Ok(msg))) => msg,
            other => panic!("a stream message was expected, got {other:?}"),
        }
    }

    fn apply(&mut self, msg: &WatchSwitchesResponse, live: bool) {
        if msg.reset {
            self.users.clear();
        }
        for u in &msg.users {
            if live {
                self.changes
                    .push((u.user.clone(), u.coin.clone(), u.revision));
            }
            if u.removed {
                self.users.remove(&u.user);
            } else {
                self.users.insert(u.user.clone(), u.coin.clone());
            }
        }
        if msg.revision > 0 {
            self.revision = msg.revision;
            self.store_id = msg.store_id.clone();
        }
    }

    /// Reads until `user` has `coin`; returns how long it took.
    async fn until(&mut self, user: &str, coin: &str) -> Duration {
        let start = Instant::now();
        while self.users.get(user).map(String::as_str) != Some(coin) {
            let msg = self.next().await;
            self.apply(&msg, true);
        }
        start.elapsed()
    }

    fn assert_revision_order(&self) {
        let revisions: Vec<u64> = self.changes.iter().map(|c| c.2).collect();
        let mut sorted = revisions.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(
            revisions, sorted,
            "changes arrive once each, in revision order"
        );
    }
}

async fn outside_client(zk: &ZooKeeperServer) -> ZooKeeper {
    zk.connect(SESSION).await.expect("plain ZooKeeper client")
}

async fn outside_put(client: &ZooKeeper, path: &str, coin: &str) {
    match client.set_data(path, coin.as_bytes().to_vec(), None).await {
        Ok(_) => {}
        Err(zookeeper_async::ZkError::NoNode) => {
            client
                .create(
                    path,
                    coin.as_bytes().to_vec(),
                    Acl::open_unsafe().clone(),
                    CreateMode::Persistent,
                )
                .await
                .expect("create");
        }
        Err(e) => panic!("set {path}: {e:?}"),
    }
}

async fn health_of(control: &InProcessControl, service: &str) -> i32 {
    HealthClient::new(channel(control.addr))
        .check(HealthCheckRequest {
            service: service.into(),
        })
        .await
        .map(|r| r.into_inner().status)
        .unwrap_or(-1)
}

/// Waits until the whole server and each ZooKeeper session report `want` (each session is
/// reported on its own, see `zk_session`).
async fn wait_health(control: &InProcessControl, want: ServingStatus) {
    for service in [
        "",
        "switchyard.zookeeper.main",
        "switchyard.zookeeper.batch",
    ] {
        wait_until(
            Duration::from_secs(30),
            &format!("health of {service:?} {want:?}"),
            || async {
                match health_of(control, service).await {
                    s if s == want as i32 => Ok(()),
                    s => Err(format!("status {s}")),
                }
            },
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    }
}

#[tokio::test]
async fn a_change_by_a_plain_zookeeper_client_reaches_subscribers() {
    let zk = ZooKeeperServer::shared().expect("ZooKeeper");
    let root = unique_root("outside");
    let control = InProcessControl::start_with(|c| zk_config(c, &zk.connect_string(), &root))
        .await
        .expect("control on ZooKeeper");
    let mut sub = Subscriber::connect(&control, None).await;
    assert!(sub.users.is_empty());

    let client = outside_client(zk).await;
    let path = format!("{root}/switcher/alice");
    outside_put(&client, &path, "bch").await;
    let created = sub.until("alice", "bch").await;
    outside_put(&client, &path, "btc").await;
    let changed = sub.until("alice", "btc").await;
    eprintln!("outside create reached the subscriber in {created:?}, change in {changed:?}");
    sub.assert_revision_order();

    // The revision is the znode's modification zxid.
    let (_, stat) = client.get_data(&path, false).await.expect("read");
    assert_eq!(sub.changes.last().map(|c| c.2), Some(stat.mzxid as u64));

    // Written through Switchyard: the node holds the coin, as the Go tools expect.
    control
        .admin()
        .switch_coin(switch("bob", "ltc"))
        .await
        .expect("switch");
    let (data, _) = client
        .get_data(&format!("{root}/switcher/bob"), false)
        .await
        .expect("bob's node");
    assert_eq!(data, b"ltc");
    sub.until("bob", "ltc").await;

    // A node deleted by an outside writer disappears from the stream.
    client.delete(&path, None).await.expect("delete");
    while sub.users.contains_key("alice") {
        let msg = sub.next().await;
        sub.apply(&msg, true);
    }
    assert!(
        control
            .admin()
            .get_user_coin(GetUserCoinRequest {
                user: "alice".into()
            })
            .await
            .is_err(),
        "alice is gone"
    );
}

#[tokio::test]
async fn a_switch_through_one_replica_reaches_the_subscribers_of_another() {
    let zk = ZooKeeperServer::shared().expect("ZooKeeper");
    let root = unique_root("replicas");
    let a = InProcessControl::start_with(|c| zk_config(c, &zk.connect_string(), &root))
        .await
        .expect("replica A");
    let b = InProcessControl::start_with(|c| zk_config(c, &zk.connect_string(), &root))
        .await
        .expect("replica B");
    let mut sub_b = Subscriber::connect(&b, None).await;
    let mut sub_a = Subscriber::connect(&a, None).await;

    let written = a
        .admin()
        .switch_coin(switch("carol", "bch"))
        .await
        .expect("switch via A")
        .into_inner()
        .user_coin
        .expect("record");
    sub_b.until("carol", "bch").await;
    sub_a.until("carol", "bch").await;
    assert_eq!(sub_b.changes.last().map(|c| c.2), Some(written.revision));

    // Both replicas hand out the same store identity and revisions: a subscriber of A resumes
    // on B and receives exactly what it missed.
    let resume = (sub_a.revision, sub_a.store_id.clone());
    assert_eq!(resume.1, sub_b.store_id);
    drop(sub_a);
    for (user, coin) in [("dave", "btc"), ("carol", "ltc")] {
        b.admin()
            .switch_coin(switch(user, coin))
            .await
            .expect("switch via B");
    }
    let resumed = Subscriber::connect(&b, Some(resume)).await;
    let got: Vec<(&str, &str)> = resumed
        .users
        .iter()
        .map(|(u, c)| (u.as_str(), c.as_str()))
        .collect();
    assert_eq!(got, vec![("carol", "ltc"), ("dave", "btc")]);
}

#[tokio::test]
async fn nothing_is_lost_across_a_zookeeper_outage() {
    let mut zk = ZooKeeperServer::start().expect("own ZooKeeper");
    let root = unique_root("outage");
    let control = InProcessControl::start_with(|c| zk_config(c, &zk.connect_string(), &root))
        .await
        .expect("control on ZooKeeper");
    let mut sub = Subscriber::connect(&control, None).await;
    let mut admin = control.admin();
    admin
        .switch_coin(switch("before", "bch"))
        .await
        .expect("switch before");
    sub.until("before", "bch").await;

    let stopped = Instant::now();
    zk.stop().expect("stop ZooKeeper");
    wait_health(&control, ServingStatus::NotServing).await;
    let during = admin.switch_coin(switch("during", "ltc")).await;
    assert!(
        during.is_err(),
        "a switch while ZooKeeper is down cannot be written: {during:?}"
    );
    // The outage lasts 10 s, as a real one would.
    if let Some(rest) = Duration::from_secs(10).checked_sub(stopped.elapsed()) {
        tokio::time::sleep(rest).await;
    }
    zk.restart().expect("restart ZooKeeper");
    wait_health(&control, ServingStatus::Serving).await;

    // The switch that failed is retried by its caller, and other writers carry on.
    wait_until(Duration::from_secs(30), "the retried switch", || {
        let mut admin = admin.clone();
        async move {
            admin
                .switch_coin(switch("during", "ltc"))
                .await
                .map(|_| ())
                .map_err(|e| e.to_string())
        }
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let client = outside_client(&zk).await;
    outside_put(&client, &format!("{root}/switcher/outside"), "btc").await;
    admin
        .switch_coin(switch("after", "btc"))
        .await
        .expect("switch after");
    sub.until("during", "ltc").await;
    sub.until("outside", "btc").await;
    sub.until("after", "btc").await;
    sub.assert_revision_order();
    let expected: BTreeMap<String, String> = [
        ("after", "btc"),
        ("before", "bch"),
        ("during", "ltc"),
        ("outside", "btc"),
    ]
    .into_iter()
    .map(|(u, c)| (u.to_owned(), c.to_owned()))
    .collect();
    assert_eq!(sub.users, expected);
}

#[tokio::test]
async fn nothing_is_lost_across_a_session_expiry() {
    let zk = ZooKeeperServer::start().expect("own ZooKeeper");
    let relay = TcpRelay::start(([127, 0, 0, 1], zk.port()).into())
        .await
        .expect("relay");
    let root = unique_root("expiry");
    let control = InProcessControl::start_with(|c| zk_config(c, &relay.addr.to_string(), &root))
        .await
        .expect("control on ZooKeeper through the relay");
    let mut sub = Subscriber::connect(&control, None).await;
    control
        .admin()
        .switch_coin(switch("before", "bch"))
        .await
        .expect("switch before");
    sub.until("before", "bch").await;
    let resume = (sub.revision, sub.store_id.clone());
    let leased = control
        .proxy_control()
        .acquire_server_id(lease_request("survivor", 0))
        .await
        .expect("lease")
        .into_inner()
        .server_id;
    let lease_path = format!("{root}/swid/{leased}");

    // Cut the control off; ZooKeeper runs on and expires its session (its barrier node, an
    // ephemeral, disappears), while an outside writer keeps writing.
    let client = outside_client(&zk).await;
    let barriers = format!("{root}/switchyard/barriers");
    assert_eq!(
        client
            .get_children(&barriers, false)
            .await
            .expect("barriers")
            .len(),
        1,
        "the control holds one barrier node"
    );
    relay.block();
    outside_put(&client, &format!("{root}/switcher/during"), "ltc").await;
    outside_put(&client, &format!("{root}/switcher/before"), "btc").await;
    wait_health(&control, ServingStatus::NotServing).await;
    wait_until(
        Duration::from_secs(30),
        "the control's session to expire",
        || {
            let client = &client;
            let barriers = barriers.clone();
            async move {
                match client.get_children(&barriers, false).await {
                    Ok(children) if children.is_empty() => Ok(()),
                    other => Err(format!("{other:?}")),
                }
            }
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    relay.unblock();
    wait_health(&control, ServingStatus::Serving).await;

    control
        .admin()
        .switch_coin(switch("after", "bch"))
        .await
        .expect("switch after the new session");
    sub.until("during", "ltc").await;
    sub.until("before", "btc").await;
    sub.until("after", "bch").await;
    sub.assert_revision_order();

    // The lease node went with the old session and is back, and the lease still renews.
    wait_until(
        Duration::from_secs(30),
        "the lease node to be re-created",
        || {
            let client = &client;
            let lease_path = lease_path.clone();
            async move {
                match client.exists(&lease_path, false).await {
                    Ok(Some(stat)) if stat.ephemeral_owner != 0 => Ok(()),
                    other => Err(format!("{other:?}")),
                }
            }
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    control
        .proxy_control()
        .renew_server_id(RenewServerIdRequest {
            chain_type: "bitcoin".into(),
            server_id: leased,
            instance_id: "survivor".into(),
            ..Default::default()
        })
        .await
        .expect("the lease survived the session expiry");

    // A subscriber that was away for all of it gets exactly what it missed.
    let resumed = Subscriber::connect(&control, Some(resume)).await;
    let got: Vec<(&str, &str)> = resumed
        .users
        .iter()
        .map(|(u, c)| (u.as_str(), c.as_str()))
        .collect();
    assert_eq!(
        got,
        vec![("after", "bch"), ("before", "btc"), ("during", "ltc")]
    );
}

fn lease_request(instance: &str, preferred: u32) -> AcquireServerIdRequest {
    AcquireServerIdRequest {
        chain_type: "bitcoin".into(),
        preferred_server_id: preferred,
        instance_id: instance.into(),
        coins: vec!["btc".into(), "bch".into()],
        ips: vec!["10.1.2.3".into()],
        host_name: format!("host-{instance}"),
        listen_addr: "0.0.0.0:3333".into(),
    }
}

#[tokio::test]
async fn proxies_on_two_replicas_get_distinct_ids_and_respect_go_proxies() {
    let zk = ZooKeeperServer::shared().expect("ZooKeeper");
    let root = unique_root("leases");
    let a = InProcessControl::start_with(|c| zk_config(c, &zk.connect_string(), &root))
        .await
        .expect("replica A");
    let b = InProcessControl::start_with(|c| zk_config(c, &zk.connect_string(), &root))
        .await
        .expect("replica B");

    // An old Go proxy holds ID 1: its node is respected.
    let client = outside_client(zk).await;
    let go_node = br#"{"ChainType":"bitcoin","Coins":["btc"],"IPs":["10.9.9.9"],"HostName":"go-proxy","ListenAddr":"0.0.0.0:1800"}"#;
    client
        .create(
            &format!("{root}/swid/1"),
            go_node.to_vec(),
            Acl::open_unsafe().clone(),
            CreateMode::Ephemeral,
        )
        .await
        .expect("the Go proxy's lease node");

    // Ten proxies at once, half on each replica, two of them asking for the Go proxy's ID.
    let requests = (0..10).map(|i| {
        let replica = if i % 2 == 0 { &a } else { &b };
        let mut client = replica.proxy_control();
        async move {
            client
                .acquire_server_id(lease_request(
                    &format!("proxy-{i}"),
                    if i < 2 { 1 } else { 0 },
                ))
                .await
                .map(|r| r.into_inner().server_id)
        }
    });
    let ids: Vec<u32> = futures::future::join_all(requests)
        .await
        .into_iter()
        .collect::<Result<_, _>>()
        .expect("every proxy gets a lease");
    let mut unique = ids.clone();
    unique.sort_unstable();
    unique.dedup();
    assert_eq!(unique.len(), 10, "10 distinct server IDs: {ids:?}");
    assert!(
        !ids.contains(&1),
        "the Go proxy's ID is never handed out: {ids:?}"
    );

    // Session counts reported to B are visible through A.
    b.proxy_control()
        .renew_server_id(RenewServerIdRequest {
            chain_type: "bitcoin".into(),
            server_id: ids[1],
            instance_id: "proxy-1".into(),
            sessions_by_coin: [("btc".to_owned(), 42)].into(),
        })
        .await
        .expect("renew on the replica that holds the lease");
    let listed = a
        .admin()
        .list_proxies(ListProxiesRequest {})
        .await
        .expect("list")
        .into_inner()
        .proxies;
    assert_eq!(listed.len(), 11, "ten proxies and the Go one: {listed:?}");
    let go = listed
        .iter()
        .find(|p| p.server_id == 1)
        .expect("the Go proxy");
    assert_eq!(go.host_name, "go-proxy");
    let renewed = listed
        .iter()
        .find(|p| p.server_id == ids[1])
        .expect("proxy-1");
    assert_eq!(renewed.sessions, 42);
    assert_eq!(renewed.instance_id, "proxy-1");

    // A proxy that restarts gets its previous ID back once it is free.
    b.proxy_control()
        .release_server_id(switchyard_proto::v1::ReleaseServerIdRequest {
            chain_type: "bitcoin".into(),
            server_id: ids[3],
            instance_id: "proxy-3".into(),
        })
        .await
        .expect("release");
    let again = a
        .proxy_control()
        .acquire_server_id(lease_request("proxy-3-restarted", ids[3]))
        .await
        .expect("re-acquire")
        .into_inner()
        .server_id;
    assert_eq!(again, ids[3]);
}

#[tokio::test]
async fn the_http_switch_api_writes_the_nodes_the_go_tools_read() {
    use switchyard_tests::control::{ControlProcess, free_port};

    let zk = ZooKeeperServer::shared().expect("ZooKeeper");
    let root = unique_root("http");
    let http_port = free_port().expect("port");
    let connect = zk.connect_string();
    let _control = ControlProcess::start_with(
        |c| {
            c["ZKBroker"] = serde_json::json!([connect]);
            c["ZKSwitcherWatchDir"] = format!("{root}/switcher/").into();
            c["ZKSwitchyardDir"] = format!("{root}/switchyard/").into();
            c["ZKServerIDAssignDir"] = format!("{root}/swid/").into();
            c["EnableAPIServer"] = true.into();
            c["ListenAddr"] = format!("127.0.0.1:{http_port}").into();
            c["APIUser"] = "backend".into();
            c["APIPassword"] = "pw".into();
        },
        vec![],
    )
    .await
    .expect("the control binary on ZooKeeper");
    let http = reqwest::Client::new();
    let base = format!("http://127.0.0.1:{http_port}");
    let answer: serde_json::Value = http
        .post(format!("{base}/switch"))
        .basic_auth("backend", Some("pw"))
        .form(&[("puname", "frank"), ("coin", "bch")])
        .send()
        .await
        .expect("HTTP")
        .json()
        .await
        .expect("JSON");
    assert_eq!(answer["err_no"], 0, "{answer}");
    let client = outside_client(zk).await;
    let (data, _) = client
        .get_data(&format!("{root}/switcher/frank"), false)
        .await
        .expect("frank's node");
    assert_eq!(data, b"bch");

    // 1,000 users in one multi-user call, over two coins.
    let btc: Vec<String> = (0..500).map(|i| format!("m{i}")).collect();
    let ltc: Vec<String> = (500..1000).map(|i| format!("m{i}")).collect();
    let answer: serde_json::Value = http
        .post(format!("{base}/switch/multi-user"))
        .basic_auth("backend", Some("pw"))
        .json(&serde_json::json!({"usercoins": [
            {"coin": "btc", "punames": btc},
            {"coin": "ltc", "punames": ltc},
        ]}))
        .send()
        .await
        .expect("HTTP")
        .json()
        .await
        .expect("JSON");
    assert_eq!(answer["err_no"], 0, "{answer}");
    let mut children = client
        .get_children(&format!("{root}/switcher"), false)
        .await
        .expect("list");
    children.sort();
    assert_eq!(children.len(), 1001, "frank and the thousand");
    for (user, coin) in [
        ("m0", "btc"),
        ("m499", "btc"),
        ("m500", "ltc"),
        ("m999", "ltc"),
    ] {
        let (data, _) = client
            .get_data(&format!("{root}/switcher/{user}"), false)
            .await
            .expect("node");
        assert_eq!(data, coin.as_bytes(), "{user}");
    }
}

/// The store on a main session of its own, as the control service opens it.
async fn connect_store(settings: ZkSettings) -> ZooKeeperStore {
    let main = ZkSession::connect(&settings.brokers, settings.session_timeout)
        .await
        .expect("main session");
    ZooKeeperStore::connect(settings, &main)
        .await
        .expect("store")
}

/// Applies the store's change stream to a fresh index, as the core does.
fn follow(store: &ZooKeeperStore, shutdown: &CancellationToken) -> Arc<UserCoinIndex> {
    let index = Arc::new(UserCoinIndex::new(StoreContents {
        records: Vec::new(),
        revision: 0,
        store_id: store.store_id().to_owned(),
    }));
    let mut changes = store
        .changes(Arc::clone(&index) as _, shutdown.clone())
        .expect("changes");
    let applying = Arc::clone(&index);
    tokio::spawn(async move {
        while let Some(change) = changes.recv().await {
            applying.apply(change.records, change.through);
        }
    });
    index
}

/// Store settings under `root`, without a case index.
fn store_settings(zk: &ZooKeeperServer, root: &str) -> ZkSettings {
    ZkSettings {
        brokers: vec![zk.connect_string()],
        switcher_dir: format!("{root}/switcher/"),
        case_index_dir: None,
        switchyard_dir: format!("{root}/switchyard/"),
        deployment_dir: format!("{root}/switchyard/{root}/switcher/").replace("//", "/"),
        session_timeout: SESSION,
        request_timeout: Duration::from_secs(10),
        reconcile_interval: Duration::from_secs(3600),
    }
}

fn user_write(user: &str, coin: &str) -> StoreWrite {
    StoreWrite::SetUserCoin {
        user: user.into(),
        coin: coin.into(),
    }
}

/// A node's value and modification zxid, read by a plain client.
async fn node_stat(client: &ZooKeeper, path: &str) -> (String, u64) {
    let (data, stat) = client.get_data(path, false).await.expect("node");
    (
        String::from_utf8_lossy(&data).into_owned(),
        stat.mzxid as u64,
    )
}

/// Creates go into multi transactions of 1,000; a transaction fails whole when one of its
/// nodes exists. Every write still gets its exact outcome: created (with the node's zxid as
/// revision) or already there (and left alone), also when a transaction fails more often
/// than it is retried, for a second write to the same node, and for a write the store cannot
/// make.
#[tokio::test]
async fn batched_creates_answer_created_or_existed_exactly() {
    let zk = ZooKeeperServer::shared().expect("ZooKeeper");
    let root = unique_root("batch");
    let store = connect_store(store_settings(zk, &root)).await;
    let client = outside_client(zk).await;
    let path = |i: usize| format!("{root}/switcher/u{i}");
    // Five in the first transaction (more failures than it retries), one each in the others.
    let existing: BTreeSet<usize> = [3, 10, 11, 500, 999, 1500, 2400].into();
    for i in &existing {
        outside_put(&client, &path(*i), "ltc").await;
    }
    const USERS: usize = 2_500;
    let mut writes: Vec<StoreWrite> = (0..USERS)
        .map(|i| user_write(&format!("u{i}"), "btc"))
        .collect();
    writes.push(user_write("u7", "bch"));
    writes.push(StoreWrite::SetCaseIndex {
        lowercase_name: "u8".into(),
        name: "u8".into(),
    });
    let results = store.create_if_absent(writes).await;
    assert_eq!(results.len(), USERS + 2, "one result per write");

    let mut revisions_of_chunk: BTreeMap<usize, BTreeSet<u64>> = BTreeMap::new();
    for (i, result) in results.iter().take(USERS).enumerate() {
        let (value, mzxid) = node_stat(&client, &path(i)).await;
        if existing.contains(&i) {
            assert!(matches!(result, Ok(None)), "u{i} existed: {result:?}");
            assert_eq!(value, "ltc", "u{i} was left alone");
        } else {
            let expected = Record {
                key: RecordKey::User(format!("u{i}")),
                value: Some("btc".into()),
                revision: mzxid,
            };
            assert_eq!(
                result.as_ref().ok(),
                Some(&Some(expected)),
                "u{i} was created: {result:?}"
            );
            assert_eq!(value, "btc");
            revisions_of_chunk
                .entry(i / 1_000)
                .or_default()
                .insert(mzxid);
        }
    }
    assert!(
        matches!(results[USERS], Ok(None)),
        "the second write to u7 found it: {:?}",
        results[USERS]
    );
    assert!(
        results[USERS + 1].is_err(),
        "no case index is configured: {:?}",
        results[USERS + 1]
    );
    // The first transaction failed more often than it is retried: its nodes were then created
    // one by one. The others failed once and were retried whole: one zxid each.
    assert!(
        revisions_of_chunk.get(&0).map_or(0, BTreeSet::len) > 900,
        "the first 1,000 were created one by one"
    );
    assert_eq!(revisions_of_chunk.get(&1).map(BTreeSet::len), Some(1));
    assert_eq!(revisions_of_chunk.get(&2).map(BTreeSet::len), Some(1));
    let children = client
        .get_children(&format!("{root}/switcher"), false)
        .await
        .expect("children");
    assert_eq!(children.len(), USERS, "nothing else was created");
}

/// The feed brings batched creates into the index, and with them what a plain client
/// creates, changes and deletes in the same directory meanwhile.
#[tokio::test]
async fn the_feed_follows_batched_creates_and_outside_writers() {
    let zk = ZooKeeperServer::shared().expect("ZooKeeper");
    let root = unique_root("feed");
    let store = connect_store(store_settings(zk, &root)).await;
    let client = outside_client(zk).await;
    outside_put(&client, &format!("{root}/switcher/before"), "ltc").await;
    let shutdown = CancellationToken::new();
    let index = follow(&store, &shutdown);

    const USERS: usize = 3_000;
    let writes = (0..USERS)
        .map(|i| user_write(&format!("u{i}"), "btc"))
        .collect();
    let (results, ()) = tokio::join!(store.create_if_absent(writes), async {
        for i in 0..20 {
            outside_put(&client, &format!("{root}/switcher/outside{i}"), "bch").await;
        }
    });
    let highest = results
        .iter()
        .map(|r| match r {
            Ok(Some(record)) => record.revision,
            _ => 0,
        })
        .max()
        .unwrap_or(0);
    assert!(
        results.iter().all(|r| matches!(r, Ok(Some(_)))),
        "all created"
    );
    assert!(index.wait_for(highest, Duration::from_secs(30)).await);
    outside_put(&client, &format!("{root}/switcher/u5"), "ltc").await;
    client
        .delete(&format!("{root}/switcher/u6"), None)
        .await
        .expect("delete u6");
    wait_until(Duration::from_secs(30), "the index to follow", || {
        let index = &index;
        async move {
            let state = (
                index.user_count(),
                index.user_coin("before").map(|c| c.0),
                index.user_coin("outside19").map(|c| c.0),
                index.user_coin("u2999").map(|c| c.0),
                index.user_coin("u5").map(|c| c.0),
                index.user_coin("u6"),
            );
            let want = (
                1 + 20 + USERS - 1,
                Some("ltc".to_owned()),
                Some("bch".to_owned()),
                Some("btc".to_owned()),
                Some("ltc".to_owned()),
                None,
            );
            if state == want {
                Ok(())
            } else {
                Err(format!("{state:?}"))
            }
        }
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    shutdown.cancel();
}

/// Issue 14, deliver 6: an outside writer's switches reach the subscribers in revision order,
/// and the feed puts no ZooKeeper write of its own between a change and the stream. On a
/// private ZooKeeper, where every zxid is accounted for: 200 set_data calls of a plain client
/// between two writes of a probe node take exactly 201 zxids, and the control's barrier node
/// is not written meanwhile.
#[tokio::test]
async fn outside_writes_reach_subscribers_in_order_without_a_write_of_the_feed() {
    let zk = ZooKeeperServer::start().expect("own ZooKeeper");
    let root = unique_root("nowrite");
    let control = InProcessControl::start_with(|c| zk_config(c, &zk.connect_string(), &root))
        .await
        .expect("control on ZooKeeper");
    let client = outside_client(&zk).await;
    const USERS: usize = 10;
    const WRITES: usize = 200;
    const COINS: [&str; 3] = ["bch", "ltc", "btc"];
    let path = |user: &str| format!("{root}/switcher/{user}");
    for i in 0..USERS {
        outside_put(&client, &path(&format!("w{i}")), "btc").await;
    }
    let mut sub = Subscriber::connect(&control, None).await;
    for i in 0..USERS {
        sub.until(&format!("w{i}"), "btc").await;
    }
    let barriers = format!("{root}/switchyard/barriers");
    let children = client
        .get_children(&barriers, false)
        .await
        .expect("barriers");
    assert_eq!(children.len(), 1, "the control holds one barrier node");
    let barrier = format!("{barriers}/{}", children[0]);
    let (_, barrier_before) = client.get_data(&barrier, false).await.expect("barrier");
    let probe = format!("{root}/probe");
    outside_put(&client, &probe, "start").await;
    let first = client
        .set_data(&probe, b"first".to_vec(), None)
        .await
        .expect("probe")
        .mzxid as u64;
    let from = sub.changes.len();

    // Each user's coin differs from its previous one at every write.
    let mut written: BTreeMap<u64, (String, String)> = BTreeMap::new();
    let mut last: BTreeMap<String, String> = BTreeMap::new();
    for n in 0..WRITES {
        let user = format!("w{}", n % USERS);
        let coin = COINS[(n / USERS) % COINS.len()];
        let stat = client
            .set_data(&path(&user), coin.as_bytes().to_vec(), None)
            .await
            .expect("set_data");
        written.insert(stat.mzxid as u64, (user.clone(), coin.to_owned()));
        last.insert(user, coin.to_owned());
    }
    let newest = written.keys().last().copied().unwrap_or(0);
    while sub.revision < newest || last.iter().any(|(u, c)| sub.users.get(u) != Some(c)) {
        let msg = sub.next().await;
        sub.apply(&msg, true);
    }
    let end = client
        .set_data(&probe, b"end".to_vec(), None)
        .await
        .expect("probe")
        .mzxid as u64;

    assert_eq!(
        end - first,
        WRITES as u64 + 1,
        "no transaction on the ensemble but the outside writer's: the feed wrote nothing"
    );
    let (_, barrier_after) = client.get_data(&barrier, false).await.expect("barrier");
    assert_eq!(
        (barrier_after.version, barrier_after.mzxid),
        (barrier_before.version, barrier_before.mzxid),
        "the barrier node was not written"
    );
    // In revision order, each change one of the writes (with its zxid), the last one of each
    // user among them.
    sub.assert_revision_order();
    let changes = &sub.changes[from..];
    for (user, coin, revision) in changes {
        assert_eq!(
            written.get(revision),
            Some(&(user.clone(), coin.clone())),
            "revision {revision} is the write that set {user} to {coin}"
        );
    }
    for (user, coin) in &last {
        let (value, mzxid) = node_stat(&client, &path(user)).await;
        assert_eq!(&value, coin);
        assert!(
            changes.contains(&(user.clone(), coin.clone(), mzxid)),
            "{user}'s last write ({mzxid}) reached the subscriber"
        );
    }
    assert_eq!(
        control
            .admin()
            .get_user_coin(GetUserCoinRequest { user: "w3".into() })
            .await
            .expect("w3")
            .into_inner()
            .user_coin
            .map(|u| u.coin),
        last.get("w3").cloned()
    );
}

/// Many outside writers at once, on shared nodes and on nodes of their own (set, create,
/// delete), on four sessions: a WatchSwitches subscriber receives every change in revision
/// order (strictly increasing, except that removals read together share their directory's
/// revision), each value with the zxid of a write that set it, and ends with ZooKeeper's state.
#[tokio::test]
async fn concurrent_outside_writers_reach_subscribers_in_revision_order() {
    let zk = ZooKeeperServer::shared().expect("ZooKeeper");
    let root = unique_root("model");
    let control = InProcessControl::start_with(|c| zk_config(c, &zk.connect_string(), &root))
        .await
        .expect("control on ZooKeeper");
    let mut sub = Subscriber::connect(&control, None).await;
    const CLIENTS: usize = 4;
    const WRITERS: usize = 8;
    const OPS: usize = 60;
    const COINS: [&str; 3] = ["btc", "bch", "ltc"];
    let mut clients = Vec::new();
    for _ in 0..CLIENTS {
        clients.push(Arc::new(outside_client(zk).await));
    }
    // zxid → (user, coin) of every set_data, from its answer.
    let written = Arc::new(std::sync::Mutex::new(
        BTreeMap::<u64, (String, String)>::new(),
    ));
    let writers = (0..WRITERS).map(|w| {
        let client = Arc::clone(&clients[w % CLIENTS]);
        let written = Arc::clone(&written);
        let root = root.clone();
        tokio::spawn(async move {
            // A small deterministic generator per writer.
            let mut state = 0x9e37_79b9_7f4a_7c15_u64 ^ (w as u64 + 1);
            let mut next = move || {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state
            };
            for _ in 0..OPS {
                let r = next();
                let coin = COINS[(r % 3) as usize];
                let user = if r % 10 < 5 {
                    format!("shared{}", (r >> 8) % 3)
                } else {
                    format!("own{w}x{}", (r >> 8) % 4)
                };
                let path = format!("{root}/switcher/{user}");
                if r % 10 >= 8 {
                    match client.delete(&path, None).await {
                        Ok(()) | Err(zookeeper_async::ZkError::NoNode) => {}
                        Err(e) => panic!("delete {path}: {e:?}"),
                    }
                    continue;
                }
                match client.set_data(&path, coin.as_bytes().to_vec(), None).await {
                    Ok(stat) => {
                        written
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .insert(stat.mzxid as u64, (user, coin.to_owned()));
                    }
                    Err(zookeeper_async::ZkError::NoNode) => {
                        match client
                            .create(
                                &path,
                                coin.as_bytes().to_vec(),
                                Acl::open_unsafe().clone(),
                                CreateMode::Persistent,
                            )
                            .await
                        {
                            Ok(_) | Err(zookeeper_async::ZkError::NodeExists) => {}
                            Err(e) => panic!("create {path}: {e:?}"),
                        }
                    }
                    Err(e) => panic!("set {path}: {e:?}"),
                }
            }
        })
    });
    // Read the stream while the writers run.
    let mut all = futures::future::join_all(writers);
    let mut entries: Vec<(String, String, u64, bool)> = Vec::new();
    let mut live = |sub: &mut Subscriber, msg: WatchSwitchesResponse| {
        for u in &msg.users {
            entries.push((u.user.clone(), u.coin.clone(), u.revision, u.removed));
        }
        sub.apply(&msg, true);
    };
    let done = loop {
        tokio::select! {
            done = &mut all => break done,
            msg = sub.next() => live(&mut sub, msg),
        }
    };
    for result in done {
        result.expect("a writer");
    }

    // ZooKeeper's final state, read by a plain client.
    let client = &clients[0];
    let dir = format!("{root}/switcher");
    let mut truth = BTreeMap::new();
    for name in client.get_children(&dir, false).await.expect("list") {
        let (value, _) = node_stat(client, &format!("{dir}/{name}")).await;
        truth.insert(name, value);
    }
    assert!(
        truth.len() >= 3,
        "the shared nodes and some own ones: {truth:?}"
    );
    while sub.users != truth {
        let msg = sub.next().await;
        live(&mut sub, msg);
    }

    let written = written.lock().unwrap_or_else(|e| e.into_inner()).clone();
    assert!(written.len() > WRITERS * OPS / 3, "most writes were sets");
    for pair in entries.windows(2) {
        let ((_, _, a, a_removed), (_, _, b, b_removed)) = (&pair[0], &pair[1]);
        assert!(
            a < b || (a == b && (*a_removed || *b_removed)),
            "revisions strictly increase (removals may share one): {pair:?}"
        );
    }
    for (user, coin, revision, removed) in &entries {
        if !removed && let Some(write) = written.get(revision) {
            assert_eq!(
                write,
                &(user.clone(), coin.clone()),
                "revision {revision} is the write that set {user} to {coin}"
            );
        }
    }
    let values = entries.iter().filter(|e| !e.3).count();
    assert!(values > 0, "changes came live");
    eprintln!(
        "{} writes, {} live entries ({values} values), final state of {} users",
        written.len(),
        entries.len(),
        truth.len()
    );
}
