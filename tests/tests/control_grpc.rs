//! The control service's gRPC API through a real client on a real socket (issue 2's
//! acceptance): switching, batches, paging, the WatchSwitches stream and its resume, leases,
//! auth, reflection and bad input.

use std::{collections::BTreeMap, time::Duration};

use futures::StreamExt;
use switchyard_proto::v1::{
    AcquireServerIdRequest, GetUserCoinRequest, ListProxiesRequest, ListUserCoinsRequest,
    RenewServerIdRequest, SwitchCoinRequest, SwitchCoinsRequest, WatchSwitchesRequest,
    WatchSwitchesResponse, switcher_admin_client::SwitcherAdminClient,
};
use switchyard_tests::control::{InProcessControl, channel};
use tonic::{Code, Request, Streaming, transport::Channel};

fn switch(user: &str, coin: &str) -> SwitchCoinRequest {
    SwitchCoinRequest {
        user: user.into(),
        coin: coin.into(),
    }
}

async fn next(stream: &mut Streaming<WatchSwitchesResponse>) -> WatchSwitchesResponse {
    match tokio::time::timeout(Duration::from_secs(10), stream.next()).await {
        Ok(Some(Ok(msg))) => msg,
        Ok(Some(Err(status))) => panic!("stream failed: {status}"),
        Ok(None) => panic!("stream ended while a message was expected"),
        Err(_) => panic!("no stream message within 10 s"),
    }
}

/// Reads a whole initial sync (up to `snapshot_complete`) into a user → (coin, revision) map.
async fn read_sync(
    stream: &mut Streaming<WatchSwitchesResponse>,
) -> (BTreeMap<String, (String, u64)>, WatchSwitchesResponse) {
    let mut users = BTreeMap::new();
    loop {
        let msg = next(stream).await;
        for u in &msg.users {
            users.insert(u.user.clone(), (u.coin.clone(), u.revision));
        }
        if msg.snapshot_complete {
            return (users, msg);
        }
    }
}

async fn user_count(admin: &mut SwitcherAdminClient<Channel>) -> usize {
    let mut count = 0;
    let mut token = String::new();
    loop {
        let page = admin
            .list_user_coins(ListUserCoinsRequest {
                page_size: 10_000,
                page_token: token,
            })
            .await
            .expect("list")
            .into_inner();
        count += page.users.len();
        if page.next_page_token.is_empty() {
            return count;
        }
        token = page.next_page_token;
    }
}

#[tokio::test]
async fn switch_a_user_and_read_it_back() {
    let control = InProcessControl::start().await.expect("control starts");
    let mut admin = control.admin();

    let first = admin
        .switch_coin(switch("alice", "btc"))
        .await
        .expect("switch")
        .into_inner();
    assert_eq!(first.previous_coin, "", "alice was created by the switch");
    let created = first.user_coin.expect("record");
    assert_eq!(
        (created.user.as_str(), created.coin.as_str()),
        ("alice", "btc")
    );

    let second = admin
        .switch_coin(switch("alice", "bch"))
        .await
        .expect("switch")
        .into_inner();
    assert_eq!(second.previous_coin, "btc");
    let switched = second.user_coin.expect("record");
    assert!(switched.revision > created.revision, "revisions increase");

    let read = admin
        .get_user_coin(GetUserCoinRequest {
            user: "alice".into(),
        })
        .await
        .expect("get")
        .into_inner()
        .user_coin
        .expect("record");
    assert_eq!(read, switched);

    let missing = admin
        .get_user_coin(GetUserCoinRequest { user: "bob".into() })
        .await
        .expect_err("bob does not exist");
    assert_eq!(missing.code(), Code::NotFound);
}

#[tokio::test]
async fn ten_thousand_users_listed_in_pages_of_a_thousand_each_exactly_once() {
    let control = InProcessControl::start().await.expect("control starts");
    let mut admin = control.admin();
    let switches: Vec<_> = (0..10_000)
        .map(|i| switch(&format!("user{i:05}"), ["btc", "bch"][i % 2]))
        .collect();
    let results = admin
        .switch_coins(SwitchCoinsRequest { switches })
        .await
        .expect("batch")
        .into_inner()
        .results;
    assert!(
        results.iter().all(|r| r.applied.is_some()),
        "every switch applied"
    );

    let mut seen = Vec::new();
    let mut token = String::new();
    let mut pages = 0;
    loop {
        let page = admin
            .list_user_coins(ListUserCoinsRequest {
                page_size: 1_000,
                page_token: token,
            })
            .await
            .expect("page")
            .into_inner();
        assert!(page.users.len() <= 1_000, "page larger than asked");
        if !page.users.is_empty() {
            pages += 1;
        }
        seen.extend(page.users.into_iter().map(|u| (u.user, u.coin)));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(pages, 10, "10,000 users in pages of 1,000");
    let expected: Vec<_> = (0..10_000)
        .map(|i| (format!("user{i:05}"), ["btc", "bch"][i % 2].to_owned()))
        .collect();
    assert_eq!(
        seen, expected,
        "every user exactly once, in name order, with its coin"
    );
}

#[tokio::test]
async fn a_batch_with_one_invalid_user_answers_each_and_applies_the_valid_ones() {
    let control = InProcessControl::start().await.expect("control starts");
    let mut admin = control.admin();
    let results = admin
        .switch_coins(SwitchCoinsRequest {
            switches: vec![
                switch("carol", "btc"),
                switch("bad/name", "btc"),
                switch("dave", "ltc"),
            ],
        })
        .await
        .expect("batch")
        .into_inner()
        .results;
    assert_eq!(results.len(), 3, "one result per entry");
    assert_eq!(
        results[0].applied.as_ref().map(|u| u.coin.as_str()),
        Some("btc")
    );
    let error = results[1]
        .error
        .as_ref()
        .expect("the invalid entry has an error");
    assert_eq!(error.code, Code::InvalidArgument as i32);
    assert!(
        error.message.contains('/'),
        "message says why: {}",
        error.message
    );
    assert!(results[1].applied.is_none());
    assert_eq!(
        results[2].applied.as_ref().map(|u| u.coin.as_str()),
        Some("ltc")
    );
    assert_eq!(
        user_count(&mut admin).await,
        2,
        "only the valid users exist"
    );
}

#[tokio::test]
async fn bad_input_is_invalid_argument_and_writes_nothing() {
    let control = InProcessControl::start().await.expect("control starts");
    let mut admin = control.admin();
    let long = "a".repeat(4096);
    let cases = [
        ("a/b", "btc", "'/'"),
        ("..", "btc", ".."),
        ("x..y", "btc", ".."),
        ("nul\0byte", "btc", "forbidden character"),
        (long.as_str(), "btc", "4096 bytes"),
        ("", "btc", "empty"),
        ("erin", "doge", "not one of the available coins"),
        ("erin", "", "coin is empty"),
    ];
    for (user, coin, says) in cases {
        let status = admin
            .switch_coin(switch(user, coin))
            .await
            .expect_err("bad input is refused");
        assert_eq!(status.code(), Code::InvalidArgument, "{user:?}/{coin:?}");
        assert!(
            status.message().contains(says),
            "{user:?}/{coin:?}: message {:?} should mention {says:?}",
            status.message()
        );
        if !user.is_empty() {
            let status = admin
                .get_user_coin(GetUserCoinRequest { user: user.into() })
                .await
                .expect_err("nothing to read");
            assert!(matches!(
                status.code(),
                Code::InvalidArgument | Code::NotFound
            ));
        }
    }
    let empty = admin
        .switch_coins(SwitchCoinsRequest { switches: vec![] })
        .await
        .expect_err("an empty batch is refused");
    assert_eq!(empty.code(), Code::InvalidArgument);
    assert!(empty.message().contains("empty"), "{}", empty.message());
    assert_eq!(user_count(&mut admin).await, 0, "nothing was written");

    // The stream agrees: an empty snapshot at revision 0.
    let mut watch = control
        .proxy_control()
        .watch_switches(WatchSwitchesRequest::default())
        .await
        .expect("watch")
        .into_inner();
    let (users, last) = read_sync(&mut watch).await;
    assert!(users.is_empty());
    assert_eq!(last.revision, 0);
}

#[tokio::test]
async fn a_watcher_gets_the_snapshot_then_every_change_in_revision_order() {
    let control = InProcessControl::start().await.expect("control starts");
    let mut admin = control.admin();
    // More than one snapshot message's worth of users.
    let switches: Vec<_> = (0..2_500)
        .map(|i| switch(&format!("s{i}"), "btc"))
        .collect();
    admin
        .switch_coins(SwitchCoinsRequest { switches })
        .await
        .expect("batch");

    let mut watch = control
        .proxy_control()
        .watch_switches(WatchSwitchesRequest::default())
        .await
        .expect("watch")
        .into_inner();
    let first = next(&mut watch).await;
    assert!(first.reset, "a snapshot starts with reset");
    let mut snapshot: BTreeMap<String, String> = first
        .users
        .iter()
        .map(|u| (u.user.clone(), u.coin.clone()))
        .collect();
    let mut last = first;
    while !last.snapshot_complete {
        last = next(&mut watch).await;
        assert!(!last.reset);
        snapshot.extend(last.users.iter().map(|u| (u.user.clone(), u.coin.clone())));
    }
    assert_eq!(snapshot.len(), 2_500);
    let snapshot_revision = last.revision;
    assert_eq!(snapshot_revision, 2_500);

    // 50 changes, one call each, while the watcher reads.
    for i in 0..50 {
        admin
            .switch_coin(switch(&format!("s{}", i % 7), ["bch", "ltc"][i % 2]))
            .await
            .expect("switch");
    }
    let mut revisions = Vec::new();
    while revisions.len() < 50 {
        let msg = next(&mut watch).await;
        assert!(!msg.reset);
        for u in &msg.users {
            revisions.push(u.revision);
        }
        assert_eq!(msg.revision, revisions.last().copied().unwrap_or(0));
    }
    let expected: Vec<u64> = (snapshot_revision + 1..=snapshot_revision + 50).collect();
    assert_eq!(revisions, expected, "every change once, in revision order");
}

#[tokio::test]
async fn a_watcher_that_reconnects_gets_exactly_what_it_missed() {
    let control = InProcessControl::start().await.expect("control starts");
    let mut admin = control.admin();
    for i in 0..10 {
        admin
            .switch_coin(switch(&format!("r{i}"), "btc"))
            .await
            .expect("switch");
    }
    let mut proxy = control.proxy_control();
    let mut watch = proxy
        .watch_switches(WatchSwitchesRequest::default())
        .await
        .expect("watch")
        .into_inner();
    let (_, last) = read_sync(&mut watch).await;
    let (resume_revision, store_id) = (last.revision, last.store_id.clone());
    assert!(!store_id.is_empty());
    drop(watch);

    // Missed while away: r3 twice (only its latest counts), r11 new.
    for (user, coin) in [("r3", "bch"), ("r11", "ltc"), ("r3", "ltc")] {
        admin.switch_coin(switch(user, coin)).await.expect("switch");
    }
    let mut watch = proxy
        .watch_switches(WatchSwitchesRequest {
            resume_revision,
            store_id: store_id.clone(),
        })
        .await
        .expect("resume")
        .into_inner();
    let msg = next(&mut watch).await;
    assert!(!msg.reset, "a resume is not a snapshot");
    assert!(msg.snapshot_complete, "the missed changes fit one message");
    let got: Vec<_> = msg
        .users
        .iter()
        .map(|u| (u.user.as_str(), u.coin.as_str(), u.revision))
        .collect();
    assert_eq!(got, vec![("r11", "ltc", 12), ("r3", "ltc", 13)]);
    assert_eq!(msg.revision, 13);

    // Live changes follow the resume.
    admin
        .switch_coin(switch("r0", "bch"))
        .await
        .expect("switch");
    let live = next(&mut watch).await;
    assert_eq!(live.users.len(), 1);
    assert_eq!(live.users[0].revision, 14);

    // Nothing missed: an empty, complete message.
    let mut again = proxy
        .watch_switches(WatchSwitchesRequest {
            resume_revision: 14,
            store_id: store_id.clone(),
        })
        .await
        .expect("resume")
        .into_inner();
    let msg = next(&mut again).await;
    assert!(msg.users.is_empty() && msg.snapshot_complete && !msg.reset);
    assert_eq!(msg.revision, 14);

    // Another store's revision, or one from the future, gets a fresh snapshot.
    for (rev, id) in [(5, "some-other-store".to_owned()), (99, store_id)] {
        let mut fresh = proxy
            .watch_switches(WatchSwitchesRequest {
                resume_revision: rev,
                store_id: id,
            })
            .await
            .expect("watch")
            .into_inner();
        let msg = next(&mut fresh).await;
        assert!(msg.reset && msg.snapshot_complete);
        assert_eq!(msg.users.len(), 11, "r0..r9 and r11");
    }
}

#[tokio::test]
async fn watch_streams_end_cleanly_on_shutdown() {
    let control = InProcessControl::start().await.expect("control starts");
    let mut watch = control
        .proxy_control()
        .watch_switches(WatchSwitchesRequest::default())
        .await
        .expect("watch")
        .into_inner();
    read_sync(&mut watch).await;
    let shutdown = tokio::spawn(control.shutdown());
    let end = tokio::time::timeout(Duration::from_secs(10), watch.next())
        .await
        .expect("the stream ends within 10 s of shutdown");
    assert!(end.is_none(), "the stream ends without an error: {end:?}");
    shutdown
        .await
        .expect("shutdown task")
        .expect("the server stops cleanly");
}

#[tokio::test]
async fn admin_calls_need_the_token_when_one_is_configured() {
    let control = InProcessControl::start_with(|c| {
        c.admin_token = Some("t0ken".into());
    })
    .await
    .expect("control starts");
    let mut admin = control.admin();
    let status = admin
        .switch_coin(switch("alice", "btc"))
        .await
        .expect_err("no token");
    assert_eq!(status.code(), Code::Unauthenticated);

    let mut wrong = Request::new(switch("alice", "btc"));
    wrong
        .metadata_mut()
        .insert("authorization", "Bearer nope".parse().expect("ascii"));
    assert_eq!(
        admin
            .switch_coin(wrong)
            .await
            .expect_err("wrong token")
            .code(),
        Code::Unauthenticated
    );
    let status = admin
        .list_proxies(ListProxiesRequest {})
        .await
        .expect_err("no token");
    assert_eq!(status.code(), Code::Unauthenticated);

    let mut right = Request::new(switch("alice", "btc"));
    right
        .metadata_mut()
        .insert("authorization", "Bearer t0ken".parse().expect("ascii"));
    admin
        .switch_coin(right)
        .await
        .expect("the right token passes");

    // ProxyControl has its own token, unset here.
    control
        .proxy_control()
        .watch_switches(WatchSwitchesRequest::default())
        .await
        .expect("proxy calls need no admin token");
}

#[tokio::test]
async fn proxies_lease_distinct_ids_and_are_listed_with_their_sessions() {
    let control = InProcessControl::start().await.expect("control starts");
    let mut proxy = control.proxy_control();
    let mut ids = Vec::new();
    for i in 0..10 {
        let lease = proxy
            .acquire_server_id(AcquireServerIdRequest {
                chain_type: "bitcoin".into(),
                instance_id: format!("proxy-{i}"),
                coins: vec!["btc".into(), "bch".into()],
                listen_addr: format!("127.0.0.1:{}", 3333 + i),
                host_name: "test".into(),
                ..Default::default()
            })
            .await
            .expect("lease")
            .into_inner();
        assert!((1..=255).contains(&lease.server_id));
        ids.push(lease.server_id);
    }
    let mut unique = ids.clone();
    unique.sort_unstable();
    unique.dedup();
    assert_eq!(unique.len(), 10, "10 distinct server IDs: {ids:?}");

    proxy
        .renew_server_id(RenewServerIdRequest {
            chain_type: "bitcoin".into(),
            server_id: ids[0],
            instance_id: "proxy-0".into(),
            sessions_by_coin: [("btc".to_owned(), 7), ("bch".to_owned(), 3)].into(),
        })
        .await
        .expect("renew");
    let stolen = proxy
        .renew_server_id(RenewServerIdRequest {
            chain_type: "bitcoin".into(),
            server_id: ids[0],
            instance_id: "someone-else".into(),
            ..Default::default()
        })
        .await
        .expect_err("another instance cannot renew it");
    assert_eq!(stolen.code(), Code::NotFound);

    let listed = control
        .admin()
        .list_proxies(ListProxiesRequest {})
        .await
        .expect("list")
        .into_inner()
        .proxies;
    assert_eq!(listed.len(), 10);
    let first = listed
        .iter()
        .find(|p| p.server_id == ids[0])
        .expect("the renewed proxy is listed");
    assert_eq!(first.sessions, 10);
    assert_eq!(first.sessions_by_coin.get("btc"), Some(&7));
    assert_eq!(first.listen_addr, "127.0.0.1:3333");
    assert_eq!(first.instance_id, "proxy-0");

    let bad = proxy
        .acquire_server_id(AcquireServerIdRequest {
            chain_type: "dogecoin".into(),
            instance_id: "x".into(),
            ..Default::default()
        })
        .await
        .expect_err("unknown chain type");
    assert_eq!(bad.code(), Code::InvalidArgument);
}

#[tokio::test]
async fn reflection_lists_and_resolves_every_service() {
    use tonic_reflection::pb::v1::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };

    let control = InProcessControl::start().await.expect("control starts");
    let mut client = ServerReflectionClient::new(channel(control.addr));
    let ask = |message_request| ServerReflectionRequest {
        host: String::new(),
        message_request: Some(message_request),
    };
    let requests = vec![
        ask(MessageRequest::ListServices(String::new())),
        ask(MessageRequest::FileContainingSymbol(
            "switchyard.v1.SwitcherAdmin".into(),
        )),
        ask(MessageRequest::FileContainingSymbol(
            "switchyard.v1.ProxyControl".into(),
        )),
        ask(MessageRequest::FileContainingSymbol(
            "grpc.health.v1.Health".into(),
        )),
    ];
    let mut responses = client
        .server_reflection_info(futures::stream::iter(requests))
        .await
        .expect("reflection")
        .into_inner();

    let listed = match next_reflection(&mut responses).await {
        MessageResponse::ListServicesResponse(list) => {
            list.service.into_iter().map(|s| s.name).collect::<Vec<_>>()
        }
        other => panic!("expected a service list, got {other:?}"),
    };
    for name in [
        "switchyard.v1.SwitcherAdmin",
        "switchyard.v1.ProxyControl",
        "grpc.health.v1.Health",
    ] {
        assert!(
            listed.iter().any(|s| s == name),
            "{name} listed in {listed:?}"
        );
    }
    for (service, method) in [
        ("SwitcherAdmin", "SwitchCoins"),
        ("ProxyControl", "WatchSwitches"),
        ("Health", "Check"),
    ] {
        let files = match next_reflection(&mut responses).await {
            MessageResponse::FileDescriptorResponse(files) => files.file_descriptor_proto,
            other => panic!("expected descriptors, got {other:?}"),
        };
        let found = files.iter().any(|bytes| {
            use prost::Message;
            prost_types::FileDescriptorProto::decode(bytes.as_slice())
                .map(|file| {
                    file.service
                        .iter()
                        .any(|s| s.name() == service && s.method.iter().any(|m| m.name() == method))
                })
                .unwrap_or(false)
        });
        assert!(found, "the descriptor of {service} with {method} resolves");
    }
}

async fn next_reflection(
    responses: &mut Streaming<tonic_reflection::pb::v1::ServerReflectionResponse>,
) -> tonic_reflection::pb::v1::server_reflection_response::MessageResponse {
    match tokio::time::timeout(Duration::from_secs(10), responses.next()).await {
        Ok(Some(Ok(r))) => r.message_response.expect("a response body"),
        other => panic!("reflection answer expected, got {other:?}"),
    }
}

#[tokio::test]
async fn ingesting_a_user_list_creates_only_absent_users() {
    use switchyard_proto::v1::{IngestOutcome, IngestUserListRequest};

    let control = InProcessControl::start_with(|c| {
        c.zk_case_index_dir = "/stratumSwitcher/bitcoin_case/".into();
    })
    .await
    .expect("control starts");
    let mut admin = control.admin();
    let ingest = |coin: &str, users: &[&str]| IngestUserListRequest {
        coin: coin.into(),
        users: users.iter().map(|u| (*u).to_owned()).collect(),
    };
    let outcomes = |r: switchyard_proto::v1::IngestUserListResponse| {
        r.results.iter().map(|r| r.outcome).collect::<Vec<_>>()
    };
    let first = admin
        .ingest_user_list(ingest("btc", &["Alice", "bob", "bad/name"]))
        .await
        .expect("ingest")
        .into_inner();
    assert_eq!(
        outcomes(first),
        vec![
            IngestOutcome::Created as i32,
            IngestOutcome::Created as i32,
            IngestOutcome::Invalid as i32
        ]
    );
    admin
        .switch_coin(switch("Alice", "bch"))
        .await
        .expect("switch");
    // The same list again, and bob in another coin's list: nothing is overwritten.
    let again = admin
        .ingest_user_list(ingest("btc", &["Alice", "bob"]))
        .await
        .expect("ingest")
        .into_inner();
    assert_eq!(outcomes(again), vec![IngestOutcome::Existed as i32; 2]);
    let other = admin
        .ingest_user_list(ingest("ltc", &["bob"]))
        .await
        .expect("ingest")
        .into_inner();
    assert_eq!(outcomes(other), vec![IngestOutcome::Existed as i32]);
    for (user, coin) in [("Alice", "bch"), ("bob", "btc")] {
        let got = admin
            .get_user_coin(GetUserCoinRequest { user: user.into() })
            .await
            .expect("get")
            .into_inner()
            .user_coin
            .expect("record");
        assert_eq!(got.coin, coin, "{user}");
    }
    // The case index reaches the proxies' stream.
    let mut watch = control
        .proxy_control()
        .watch_switches(WatchSwitchesRequest::default())
        .await
        .expect("watch")
        .into_inner();
    let mut index = BTreeMap::new();
    loop {
        let msg = next(&mut watch).await;
        index.extend(
            msg.case_index
                .iter()
                .map(|e| (e.lowercase_name.clone(), e.name.clone())),
        );
        if msg.snapshot_complete {
            break;
        }
    }
    assert_eq!(index.get("alice").map(String::as_str), Some("Alice"));
    assert_eq!(index.get("bob").map(String::as_str), Some("bob"));

    let bad = admin
        .ingest_user_list(ingest("doge", &["x"]))
        .await
        .expect_err("unknown coin");
    assert_eq!(bad.code(), Code::InvalidArgument);
    let empty = admin
        .ingest_user_list(ingest("btc", &[]))
        .await
        .expect_err("empty batch");
    assert_eq!(empty.code(), Code::InvalidArgument);
}
