//! Smoke tests of the ZooKeeper fixture: a real server starts, serves a zookeeper-async client,
//! keeps its data across a stop and restart, dies with its fixture, and the shared server and
//! unique roots work.

use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use switchyard_tests::zookeeper::{ZooKeeperServer, unique_root};
use zookeeper_async::{Acl, CreateMode, ZooKeeperExt};

/// Session timeout of the test clients.
const SESSION_TIMEOUT: Duration = Duration::from_secs(5);

/// Deadline of every single ZooKeeper operation in these tests.
const OPERATION_DEADLINE: Duration = Duration::from_secs(20);

/// Awaits `future`, failing the test if it takes longer than [`OPERATION_DEADLINE`].
async fn within<T>(what: &str, future: impl Future<Output = T>) -> T {
    tokio::time::timeout(OPERATION_DEADLINE, future)
        .await
        .unwrap_or_else(|_| panic!("{what}: no answer within {OPERATION_DEADLINE:?}"))
}

/// Whether something accepts TCP connections on the loopback port.
fn port_accepts(port: u16) -> bool {
    TcpStream::connect_timeout(
        &SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
        Duration::from_secs(1),
    )
    .is_ok()
}

#[tokio::test]
async fn znode_survives_stop_and_restart() {
    let mut server = ZooKeeperServer::start().expect("start a private ZooKeeper server");
    assert_eq!(
        server.connect_string(),
        format!("127.0.0.1:{}", server.port()),
        "connect string"
    );
    assert!(
        server.data_dir().is_dir(),
        "data directory {} should exist",
        server.data_dir().display()
    );

    let root = unique_root("smoke");
    let parent = format!("{root}/parent");
    let path = format!("{parent}/znode");
    let data = b"switchyard \x00\x01\xfe\xff smoke".to_vec();

    let client = within("connect", server.connect(SESSION_TIMEOUT))
        .await
        .expect("connect a zookeeper-async client");
    within("ensure_path", client.ensure_path(&parent))
        .await
        .unwrap_or_else(|error| panic!("create the parents {parent}: {error}"));
    within(
        "create",
        client.create(
            &path,
            data.clone(),
            Acl::open_unsafe().clone(),
            CreateMode::Persistent,
        ),
    )
    .await
    .unwrap_or_else(|error| panic!("create {path}: {error}"));
    let (read, _) = within("get_data", client.get_data(&path, false))
        .await
        .unwrap_or_else(|error| panic!("read {path}: {error}"));
    assert_eq!(
        read, data,
        "data of {path} read back right after creating it"
    );
    within("close", client.close())
        .await
        .expect("close the first client");

    server.stop().expect("stop the server");
    assert!(
        !server.is_running(),
        "server should be stopped after stop()"
    );
    assert!(
        !port_accepts(server.port()),
        "port {} should refuse connections after stop()",
        server.port()
    );

    let port = server.port();
    server.restart().unwrap_or_else(|error| {
        panic!("restart the server on port {port}: {error}");
    });
    assert_eq!(server.port(), port, "restart keeps the port");
    assert_eq!(
        server.four_letter_word("ruok").expect("ruok after restart"),
        "imok",
        "answer to ruok after restart"
    );

    let client = within("reconnect", server.connect(SESSION_TIMEOUT))
        .await
        .expect("connect a new client after the restart");
    let (read, _) = within("get_data after restart", client.get_data(&path, false))
        .await
        .unwrap_or_else(|error| panic!("read {path} after the restart: {error}"));
    assert_eq!(read, data, "data of {path} after stop() and restart()");
    within("close", client.close())
        .await
        .expect("close the second client");
}

#[tokio::test]
async fn shared_server_answers_and_unique_roots_differ() {
    let server = ZooKeeperServer::shared().expect("start the shared ZooKeeper server");
    let again = ZooKeeperServer::shared().expect("get the shared ZooKeeper server again");
    assert!(
        std::ptr::eq(server, again),
        "shared() should return the same server every time (ports {} and {})",
        server.port(),
        again.port()
    );
    assert_eq!(
        server.four_letter_word("ruok").expect("send ruok"),
        "imok",
        "answer of the shared server to ruok"
    );

    let first = unique_root("shared");
    let second = unique_root("shared");
    assert_ne!(first, second, "two unique_root() calls");
    for root in [&first, &second] {
        assert!(
            root.starts_with("/t-shared-") && !root[1..].contains('/'),
            "unique root {root:?} should be a single path segment starting with /t-shared-"
        );
    }
    assert!(
        unique_root("a/b c").starts_with("/t-a_b_c-"),
        "unique_root should replace characters that are not allowed in one znode name"
    );

    let client = within("connect", server.connect(SESSION_TIMEOUT))
        .await
        .expect("connect to the shared server");
    let znode = format!("{first}/only-here");
    within("ensure_path", client.ensure_path(&znode))
        .await
        .unwrap_or_else(|error| panic!("create {znode}: {error}"));
    let elsewhere = format!("{second}/only-here");
    let seen = within("exists", client.exists(&elsewhere, false))
        .await
        .unwrap_or_else(|error| panic!("check {elsewhere}: {error}"));
    assert!(
        seen.is_none(),
        "{elsewhere} should not exist after creating {znode}, found {seen:?}"
    );
    within("close", client.close())
        .await
        .expect("close the client");
}

#[test]
fn dropping_the_server_kills_it() {
    let server = ZooKeeperServer::start().expect("start a private ZooKeeper server");
    let port = server.port();
    let dir = server
        .data_dir()
        .parent()
        .expect("the data directory is inside the server's directory")
        .to_owned();
    assert!(
        port_accepts(port),
        "port {port} should accept connections while the server runs"
    );
    drop(server);

    let deadline = Instant::now() + Duration::from_secs(10);
    while port_accepts(port) {
        assert!(
            Instant::now() < deadline,
            "port {port} still accepts connections 10 s after dropping its server"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        !dir.exists(),
        "the server's directory {} should be removed on drop",
        dir.display()
    );
}
