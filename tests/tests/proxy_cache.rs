//! The proxy's local cache fed by a real control service (`switchyard_proxy::control` and
//! `switchyard_proxy::cache`): the snapshot then live switches reaching a session's
//! `UserWatch`, resuming across a control restart on the same data directory and address,
//! failover across endpoints, the cache answering while the control is down, server-ID leases,
//! auto-registration requests and the proxy token.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use axum::{Router, routing::post};
use futures::FutureExt;
use switchyard_control::{
    ControlError, ControlPlane,
    config::{AutoRegApiConfig, ControlConfig},
    core::{SwitchCore, SwitchSource},
};
use switchyard_proto::v1::{
    ListProxiesRequest, ProxyInfo, SwitchCoinRequest, SwitchCoinsRequest,
    switcher_admin_client::SwitcherAdminClient,
};
use switchyard_proxy::{
    cache::{UserCoinCache, UserWatch},
    control::{
        ControlEndpoints, LeaseRequest, ServerIdLease, acquire_server_id, follow_switches,
        keep_server_id, request_registration,
    },
};
use switchyard_tests::{
    control::{InProcessControl, channel, test_config, wait_serving},
    wait::wait_until,
};
use tokio::{net::TcpListener, sync::watch, task::JoinHandle};
use tokio_util::sync::CancellationToken;
use tonic::{Code, transport::Channel};

/// How long any one condition may take.
const DEADLINE: Duration = Duration::from_secs(15);

fn url(addr: SocketAddr) -> String {
    format!("http://{addr}")
}

/// A loopback address nothing listens on.
fn dead_addr() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("local_addr")
}

fn switch(user: &str, coin: &str) -> SwitchCoinRequest {
    SwitchCoinRequest {
        user: user.into(),
        coin: coin.into(),
    }
}

/// Switches `user` to `coin` and returns the revision of the write.
async fn switch_coin(admin: &mut SwitcherAdminClient<Channel>, user: &str, coin: &str) -> u64 {
    admin
        .switch_coin(switch(user, coin))
        .await
        .unwrap_or_else(|e| panic!("switch {user} to {coin}: {e}"))
        .into_inner()
        .user_coin
        .expect("the record after the switch")
        .revision
}

fn coin(name: &str) -> Option<Arc<str>> {
    Some(Arc::from(name))
}

/// A proxy's cache and the task feeding it from `urls`.
struct Feed {
    cache: Arc<UserCoinCache>,
    shutdown: CancellationToken,
    task: Option<JoinHandle<()>>,
}

impl Feed {
    fn start(urls: &[String], token: Option<&str>) -> Self {
        let endpoints =
            ControlEndpoints::new(urls, token.map(str::to_owned)).expect("valid endpoints");
        let cache = UserCoinCache::new();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(follow_switches(
            Arc::clone(&cache),
            endpoints,
            shutdown.clone(),
        ));
        Self {
            cache,
            shutdown,
            task: Some(task),
        }
    }

    async fn synced(&self) {
        tokio::time::timeout(DEADLINE, self.cache.wait_synced())
            .await
            .expect("the cache syncs with the control service");
    }

    /// Waits until the cache has `user` with `coin` (`None`: without a record).
    async fn until_coin(&self, user: &str, coin: Option<&str>) {
        let cache = &self.cache;
        wait_until(
            DEADLINE,
            &format!("{user} to have {coin:?}"),
            || async move {
                let got = cache.coin_of(user);
                if got.as_deref() == coin {
                    Ok(())
                } else {
                    Err(format!("{got:?}"))
                }
            },
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    }

    async fn until_disconnected(&self) {
        let cache = &self.cache;
        wait_until(DEADLINE, "the feed to notice the loss", || async move {
            if cache.is_connected() {
                Err("still connected".into())
            } else {
                Ok(())
            }
        })
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    }

    async fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(task) = self.task.take() {
            tokio::time::timeout(DEADLINE, task)
                .await
                .expect("the feed stops on shutdown")
                .expect("the feed task");
        }
    }
}

impl Drop for Feed {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// The next change a watch reports, within [`DEADLINE`].
async fn next_change(watch: &mut UserWatch) -> Option<Arc<str>> {
    tokio::time::timeout(DEADLINE, watch.changed())
        .await
        .unwrap_or_else(|_| panic!("no change of {} within {DEADLINE:?}", watch.user()))
}

/// Whether the watch has a change to report right now (a wake-up is immediate).
fn has_change(watch: &mut UserWatch) -> bool {
    watch.changed().now_or_never().is_some()
}

/// A control service on a data directory and address of the test's choosing, so that it can
/// be stopped and started again on both.
struct Restartable {
    config: ControlConfig,
    addr: SocketAddr,
    shutdown: CancellationToken,
    task: Option<JoinHandle<Result<(), ControlError>>>,
}

impl Restartable {
    /// Opens the store of `config` (waiting while a previous run still holds it).
    async fn open(config: &ControlConfig) -> (ControlPlane, CancellationToken) {
        wait_until(DEADLINE, "the control store to open", || async {
            let shutdown = CancellationToken::new();
            ControlPlane::open(config, shutdown.clone())
                .await
                .map(|plane| (plane, shutdown))
                .map_err(|e| e.to_string())
        })
        .await
        .unwrap_or_else(|e| panic!("{e}"))
    }

    /// Serves an opened `plane` on `addr` (waiting while the port is still taken).
    async fn serve(
        config: ControlConfig,
        addr: SocketAddr,
        plane: ControlPlane,
        shutdown: CancellationToken,
    ) -> Self {
        let listener = wait_until(DEADLINE, "the control address to be free", || async {
            TcpListener::bind(addr).await.map_err(|e| e.to_string())
        })
        .await
        .unwrap_or_else(|e| panic!("{e}"));
        let task = tokio::spawn(plane.serve(listener, shutdown.clone()));
        wait_serving(addr).await.expect("the control serves");
        Self {
            config,
            addr,
            shutdown,
            task: Some(task),
        }
    }

    /// Starts a control service on `data_dir`, on a free address.
    async fn start(data_dir: &std::path::Path, adjust: impl FnOnce(&mut ControlConfig)) -> Self {
        let mut config = test_config(data_dir);
        adjust(&mut config);
        let addr = TcpListener::bind("127.0.0.1:0")
            .await
            .and_then(|l| l.local_addr())
            .expect("a free port");
        let (plane, shutdown) = Self::open(&config).await;
        Self::serve(config, addr, plane, shutdown).await
    }

    /// Stops it and waits until it has stopped.
    async fn stop(&mut self) {
        self.shutdown.cancel();
        if let Some(task) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(30), task)
                .await
                .expect("the control stops within 30 s")
                .expect("the server task")
                .expect("the control stops cleanly");
        }
    }

    /// Starts it again on the same data directory and address; `meanwhile` runs on the
    /// reopened core before it serves (changes made while no proxy can reach it).
    async fn restart<F, Fut>(&mut self, meanwhile: F)
    where
        F: FnOnce(Arc<SwitchCore>) -> Fut,
        Fut: Future<Output = ()>,
    {
        self.stop().await;
        let (plane, shutdown) = Self::open(&self.config).await;
        meanwhile(Arc::clone(plane.core())).await;
        *self = Self::serve(self.config.clone(), self.addr, plane, shutdown).await;
    }

    fn admin(&self) -> SwitcherAdminClient<Channel> {
        SwitcherAdminClient::new(channel(self.addr))
    }
}

impl Drop for Restartable {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

#[tokio::test]
async fn a_snapshot_then_live_switches_reach_the_users_watches() {
    let control = InProcessControl::start().await.expect("control starts");
    let mut admin = control.admin();
    // Three snapshot messages' worth of users.
    const USERS: usize = 2_500;
    let switches = (0..USERS)
        .map(|i| switch(&format!("u{i}"), ["btc", "bch"][i % 2]))
        .collect();
    admin
        .switch_coins(SwitchCoinsRequest { switches })
        .await
        .expect("batch");

    let feed = Feed::start(&[url(control.addr)], None);
    feed.synced().await;
    let cache = &feed.cache;
    assert_eq!(cache.user_count(), USERS);
    assert_eq!(cache.coin_of("u0"), coin("btc"));
    assert_eq!(cache.coin_of("u1"), coin("bch"));
    assert_eq!(cache.coin_of("nobody"), None);
    assert_eq!(cache.revision(), USERS as u64);
    assert!(!cache.store_id().is_empty());
    assert!(cache.is_connected());
    assert_eq!(cache.connects(), 1);
    assert_eq!(cache.snapshots_applied(), 1);
    assert_eq!(cache.announced_revision(), USERS as u64);

    let mut u42 = cache.watch_user("u42");
    let mut u43 = cache.watch_user("u43");
    let mut newcomer = cache.watch_user("newcomer");
    assert_eq!(cache.watched_user_count(), 3);
    assert_eq!(u42.current(), coin("btc"));

    let revision = switch_coin(&mut admin, "u42", "ltc").await;
    assert_eq!(next_change(&mut u42).await, coin("ltc"));
    assert_eq!(cache.revision(), revision, "applied with its revision");
    assert!(
        !has_change(&mut u43),
        "another user's switch wakes nobody else"
    );
    assert!(!has_change(&mut newcomer));

    // A user created by a switch reaches a session waiting for it.
    switch_coin(&mut admin, "newcomer", "bch").await;
    assert_eq!(next_change(&mut newcomer).await, coin("bch"));
    assert_eq!(cache.user_count(), USERS + 1);

    // The same coin again: the control re-announces it, the cache moves on, nobody wakes.
    let revision = switch_coin(&mut admin, "u42", "ltc").await;
    wait_until(DEADLINE, "the re-announcement to be applied", || async {
        if cache.revision() == revision {
            Ok(())
        } else {
            Err(format!("revision {}", cache.revision()))
        }
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    assert!(!has_change(&mut u42), "the same coin wakes nobody");

    drop((u42, u43, newcomer));
    assert_eq!(
        cache.watched_user_count(),
        0,
        "no index entry outlives its watches"
    );
    let cache = Arc::clone(cache);
    feed.stop().await;
    assert!(!cache.is_connected());
    assert_eq!(
        cache.coin_of("u42"),
        coin("ltc"),
        "a stopped feed keeps its state"
    );
}

#[tokio::test]
async fn the_feed_resumes_after_a_control_restart_and_the_cache_answers_meanwhile() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut control = Restartable::start(dir.path(), |_| {}).await;
    let mut admin = control.admin();
    switch_coin(&mut admin, "alice", "btc").await;
    switch_coin(&mut admin, "bob", "btc").await;

    let feed = Feed::start(&[url(control.addr)], None);
    feed.synced().await;
    let cache = &feed.cache;
    let store_id = cache.store_id();
    let mut bob = cache.watch_user("bob");
    let mut carol = cache.watch_user("carol");

    control.stop().await;
    feed.until_disconnected().await;
    // Away from the control, the cache keeps answering what it knows.
    assert_eq!(cache.coin_of("alice"), coin("btc"));
    assert_eq!(cache.coin_of("bob"), coin("btc"));
    assert!(cache.is_synced());

    // Switches made while the proxy cannot reach the control.
    control
        .restart(|core| async move {
            core.switch_coin(SwitchSource::Grpc, "bob", "ltc")
                .await
                .expect("switch bob");
            core.switch_coin(SwitchSource::Grpc, "carol", "bch")
                .await
                .expect("create carol");
        })
        .await;
    assert_eq!(next_change(&mut bob).await, coin("ltc"));
    assert_eq!(next_change(&mut carol).await, coin("bch"));
    assert_eq!(cache.coin_of("alice"), coin("btc"));
    assert_eq!(cache.store_id(), store_id, "the same store");
    assert_eq!(cache.revision(), 4);
    assert_eq!(
        cache.snapshots_applied(),
        1,
        "resumed with the missed changes, not a fresh snapshot"
    );
    assert!(cache.connects() >= 2, "reconnected: {}", cache.connects());

    // And live changes flow again.
    let mut admin = control.admin();
    switch_coin(&mut admin, "alice", "bch").await;
    feed.until_coin("alice", Some("bch")).await;
    feed.stop().await;
    control.stop().await;
}

#[tokio::test]
async fn the_second_endpoint_serves_when_the_first_is_dead() {
    let control = InProcessControl::start().await.expect("control starts");
    let mut admin = control.admin();
    switch_coin(&mut admin, "alice", "btc").await;
    let feed = Feed::start(&[url(dead_addr()), url(control.addr)], None);
    feed.synced().await;
    assert_eq!(feed.cache.coin_of("alice"), coin("btc"));
    assert_eq!(
        feed.cache.connects(),
        1,
        "the dead endpoint never connected"
    );
    let mut alice = feed.cache.watch_user("alice");
    switch_coin(&mut admin, "alice", "ltc").await;
    assert_eq!(next_change(&mut alice).await, coin("ltc"));
    feed.stop().await;
}

#[tokio::test]
async fn failing_over_to_a_replica_of_another_store_swaps_its_snapshot_in() {
    let a = InProcessControl::start().await.expect("control A");
    let b = InProcessControl::start().await.expect("control B");
    switch_coin(&mut a.admin(), "only-on-a", "btc").await;
    switch_coin(&mut a.admin(), "both", "btc").await;
    switch_coin(&mut b.admin(), "both", "bch").await;

    let feed = Feed::start(&[url(a.addr), url(b.addr)], None);
    feed.synced().await;
    let cache = &feed.cache;
    let store_a = cache.store_id();
    assert_eq!(cache.coin_of("only-on-a"), coin("btc"));
    let mut only_on_a = cache.watch_user("only-on-a");
    let mut both = cache.watch_user("both");

    a.shutdown().await.expect("A stops");
    assert_eq!(next_change(&mut both).await, coin("bch"));
    assert_eq!(next_change(&mut only_on_a).await, None, "not in B's store");
    assert_ne!(cache.store_id(), store_a);
    assert_eq!(cache.snapshots_applied(), 2);
    assert_eq!(cache.user_count(), 1);
    feed.stop().await;
}

fn lease_request(listen_addr: &str) -> LeaseRequest {
    LeaseRequest {
        chain_type: "bitcoin".into(),
        preferred_server_id: 0,
        coins: vec!["btc".into(), "bch".into()],
        ips: vec!["127.0.0.1".into()],
        host_name: "proxy-test".into(),
        listen_addr: listen_addr.into(),
    }
}

async fn proxies(admin: &mut SwitcherAdminClient<Channel>) -> Result<Vec<ProxyInfo>, String> {
    admin
        .list_proxies(ListProxiesRequest {})
        .await
        .map(|r| r.into_inner().proxies)
        .map_err(|e| e.to_string())
}

/// Waits until `lease` is the only one listed, with `sessions` sessions.
async fn until_listed(addr: SocketAddr, lease: &ServerIdLease, sessions: u64) {
    let admin = SwitcherAdminClient::new(channel(addr));
    wait_until(
        DEADLINE,
        &format!("the lease listed with {sessions} sessions"),
        || {
            let mut admin = admin.clone();
            async move {
                let listed = proxies(&mut admin).await?;
                match listed.as_slice() {
                    [p] if p.server_id == u32::from(lease.server_id)
                        && p.instance_id == lease.instance_id
                        && p.sessions == sessions =>
                    {
                        Ok(())
                    }
                    other => Err(format!("{other:?}")),
                }
            }
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
}

#[tokio::test]
async fn a_lease_is_acquired_renewed_regained_after_a_restart_and_released() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut control = Restartable::start(dir.path(), |c| c.lease_ttl_seconds = 3).await;
    // The first endpoint is dead: acquiring fails over to the second.
    let endpoints = ControlEndpoints::new(&[url(dead_addr()), url(control.addr)], None)
        .expect("valid endpoints");
    let request = lease_request("0.0.0.0:3333");
    let lease = acquire_server_id(&endpoints, &request)
        .await
        .expect("a lease");
    assert!(lease.server_id >= 1);
    assert_eq!(lease.ttl, Duration::from_secs(3));
    assert!(!lease.instance_id.is_empty());
    let mut admin = control.admin();
    let listed = proxies(&mut admin).await.expect("list");
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].server_id, u32::from(lease.server_id));
    assert_eq!(listed[0].instance_id, lease.instance_id);
    assert_eq!(listed[0].listen_addr, "0.0.0.0:3333");

    // Renewals report the session counts.
    let sessions = Arc::new(AtomicU64::new(7));
    let counts = {
        let sessions = Arc::clone(&sessions);
        move || HashMap::from([("btc".to_owned(), sessions.load(Ordering::Relaxed))])
    };
    let (current, current_rx) = watch::channel(lease.server_id);
    let shutdown = CancellationToken::new();
    let keeper = tokio::spawn(keep_server_id(
        endpoints.clone(),
        request.clone(),
        lease.clone(),
        counts,
        current,
        shutdown.clone(),
    ));
    until_listed(control.addr, &lease, 7).await;

    // The control restarts and forgets its leases: the keeper takes the same ID back.
    sessions.store(9, Ordering::Relaxed);
    control.restart(|_| async {}).await;
    until_listed(control.addr, &lease, 9).await;
    assert_eq!(*current_rx.borrow(), lease.server_id, "the same ID");

    // On shutdown the keeper releases the lease and returns.
    shutdown.cancel();
    tokio::time::timeout(DEADLINE, keeper)
        .await
        .expect("the keeper returns on shutdown")
        .expect("keeper task");
    let mut admin = control.admin();
    assert_eq!(proxies(&mut admin).await.expect("list"), vec![]);
    control.stop().await;
}

#[tokio::test]
async fn a_lost_id_taken_by_another_proxy_is_replaced_and_published() {
    let dir = tempfile::tempdir().expect("tempdir");
    // A 30 s TTL: the keeper renews every 10 s, so it sleeps through the restart below.
    let mut control = Restartable::start(dir.path(), |c| c.lease_ttl_seconds = 30).await;
    let endpoints = ControlEndpoints::new(&[url(control.addr)], None).expect("valid endpoints");
    let request = lease_request("0.0.0.0:3333");
    let lease = acquire_server_id(&endpoints, &request)
        .await
        .expect("a lease");
    let (current, mut current_rx) = watch::channel(lease.server_id);
    let shutdown = CancellationToken::new();
    let keeper = tokio::spawn(keep_server_id(
        endpoints.clone(),
        request.clone(),
        lease.clone(),
        HashMap::new,
        current,
        shutdown.clone(),
    ));

    // The control restarts and forgets its leases; another proxy takes the keeper's ID
    // before the keeper's next renewal.
    control.restart(|_| async {}).await;
    let other = ControlEndpoints::new(&[url(control.addr)], None).expect("valid");
    let taken = acquire_server_id(
        &other,
        &LeaseRequest {
            preferred_server_id: u32::from(lease.server_id),
            ..lease_request("0.0.0.0:4444")
        },
    )
    .await
    .expect("the other proxy's lease");
    assert_eq!(taken.server_id, lease.server_id, "the free ID is granted");

    // At its renewal the keeper finds its lease gone, takes another ID and publishes it.
    tokio::time::timeout(
        Duration::from_secs(20),
        current_rx.wait_for(|id| *id != lease.server_id),
    )
    .await
    .expect("a new ID is published")
    .expect("the channel is open");
    let mine = *current_rx.borrow();
    let mut admin = control.admin();
    let listed = proxies(&mut admin).await.expect("list");
    assert!(
        listed
            .iter()
            .any(|p| p.instance_id == lease.instance_id && p.server_id == u32::from(mine)),
        "the keeper's new lease is listed: {listed:?}"
    );
    assert_eq!(listed.len(), 2);

    shutdown.cancel();
    tokio::time::timeout(DEADLINE, keeper)
        .await
        .expect("the keeper returns")
        .expect("keeper task");
    let left = proxies(&mut admin).await.expect("list");
    assert_eq!(
        left.len(),
        1,
        "only the other proxy's lease is left: {left:?}"
    );
    assert_eq!(left[0].instance_id, taken.instance_id);
    control.stop().await;
}

#[tokio::test]
async fn a_registration_request_is_refused_when_auto_registration_is_off() {
    let control = InProcessControl::start().await.expect("control starts");
    let endpoints = ControlEndpoints::new(&[url(control.addr)], None).expect("valid");
    let err = request_registration(&endpoints, "newbie", "newbie.rig1", 0x0100_0080)
        .await
        .expect_err("auto-registration is off");
    assert_eq!(err.code(), Some(Code::FailedPrecondition), "{err}");
}

/// A pool backend whose registration endpoint grants every name a puid.
async fn registration_backend() -> (String, JoinHandle<()>) {
    let app = Router::new().route(
        "/register",
        post(|| async {
            (
                [(axum::http::header::CONTENT_TYPE, "application/json")],
                r#"{"data":{"puid":42},"status":"success"}"#,
            )
        }),
    );
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("local_addr");
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (format!("http://{addr}/register"), task)
}

#[tokio::test]
async fn a_registered_user_reaches_the_waiting_session_through_the_feed() {
    let (backend_url, backend) = registration_backend().await;
    let control = InProcessControl::start_with(|c| {
        c.enable_user_auto_reg = true;
        c.user_auto_reg_api = AutoRegApiConfig {
            interval_seconds: 0,
            url: backend_url.clone(),
            user: String::new(),
            password: Default::default(),
            default_coin: "bch".into(),
            post_data: [("sub_name".to_owned(), "{sub_name}".to_owned())].into(),
        };
    })
    .await
    .expect("control starts");
    // The first endpoint is dead: the request fails over.
    let endpoints =
        ControlEndpoints::new(&[url(dead_addr()), url(control.addr)], None).expect("valid");
    let feed = Feed::start(&[url(control.addr)], None);
    feed.synced().await;

    let mut waiting = feed.cache.watch_user("newbie");
    assert_eq!(waiting.current(), None);
    let created = request_registration(&endpoints, "newbie", "newbie.rig1", 0x0100_0080)
        .await
        .expect("the request is accepted");
    assert!(created, "this call recorded the request");
    assert_eq!(next_change(&mut waiting).await, coin("bch"));
    // The user exists now: nothing to register.
    let again = request_registration(&endpoints, "newbie", "newbie.rig2", 0x0100_0081)
        .await
        .expect("answered");
    assert!(!again);
    feed.stop().await;
    backend.abort();
}

#[tokio::test]
async fn calls_carry_the_proxy_token() {
    let control = InProcessControl::start_with(|c| c.proxy_token = Some("pr0xy".into()))
        .await
        .expect("control starts");
    switch_coin(&mut control.admin(), "alice", "btc").await;

    let feed = Feed::start(&[url(control.addr)], Some("pr0xy"));
    feed.synced().await;
    assert_eq!(feed.cache.coin_of("alice"), coin("btc"));
    feed.stop().await;

    for token in [None, Some("wrong".to_owned())] {
        let endpoints = ControlEndpoints::new(&[url(control.addr)], token).expect("valid");
        let err = request_registration(&endpoints, "x", "x.y", 1)
            .await
            .expect_err("refused");
        assert_eq!(err.code(), Some(Code::Unauthenticated), "{err}");
    }
}
