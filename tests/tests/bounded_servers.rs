//! Bounded servers (issue 13, item 3) on real sockets against a real control service: the
//! WatchSwitches stream limit, the unary timeout that leaves streams alone, a snapshot that
//! does not block switches while its watcher does not read (and still ends right), slowloris
//! headers and bodies, oversized bodies, and the user-list API's pages.

use std::{collections::BTreeMap, net::SocketAddr, sync::Arc, time::Duration};

use prost::bytes::{Buf, BufMut};
use switchyard_control::config::ControlConfig;
use switchyard_initializer::{
    api::router_with_page_size,
    http_server::{HttpLimits, serve},
    listed::ListedUsers,
};
use switchyard_proto::v1::{
    GetUserCoinRequest, GetUserCoinResponse, SwitchCoinRequest, SwitchCoinsRequest,
    WatchSwitchesRequest, WatchSwitchesResponse,
};
use switchyard_tests::{control::InProcessControl, wait::wait_until};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    time::Instant,
};
use tokio_util::sync::CancellationToken;
use tonic::{
    Code, Status, Streaming,
    codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder},
};

/// A prost codec (the tests crate does not depend on tonic-prost).
struct Prost<E, D>(std::marker::PhantomData<(E, D)>);

impl<E, D> Default for Prost<E, D> {
    fn default() -> Self {
        Self(std::marker::PhantomData)
    }
}

struct Enc<E>(std::marker::PhantomData<E>);
struct Dec<D>(std::marker::PhantomData<D>);

impl<E: prost::Message + Send + 'static> Encoder for Enc<E> {
    type Item = E;
    type Error = Status;
    fn encode(&mut self, item: E, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        let mut bytes = Vec::new();
        item.encode(&mut bytes)
            .map_err(|e| Status::internal(e.to_string()))?;
        dst.put_slice(&bytes);
        Ok(())
    }
}

impl<D: prost::Message + Default + Send + 'static> Decoder for Dec<D> {
    type Item = D;
    type Error = Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<D>, Status> {
        let bytes = src.copy_to_bytes(src.remaining());
        D::decode(bytes)
            .map(Some)
            .map_err(|e| Status::internal(e.to_string()))
    }
}

impl<E, D> Codec for Prost<E, D>
where
    E: prost::Message + Send + 'static,
    D: prost::Message + Default + Send + 'static,
{
    type Encode = E;
    type Decode = D;
    type Encoder = Enc<E>;
    type Decoder = Dec<D>;
    fn encoder(&mut self) -> Enc<E> {
        Enc(std::marker::PhantomData)
    }
    fn decoder(&mut self) -> Dec<D> {
        Dec(std::marker::PhantomData)
    }
}

async fn watch(control: &InProcessControl) -> Result<Streaming<WatchSwitchesResponse>, Status> {
    control
        .proxy_control()
        .watch_switches(WatchSwitchesRequest::default())
        .await
        .map(tonic::Response::into_inner)
}

async fn next(stream: &mut Streaming<WatchSwitchesResponse>) -> WatchSwitchesResponse {
    tokio::time::timeout(Duration::from_secs(20), stream.message())
        .await
        .expect("a message within 20 s")
        .expect("no stream error")
        .expect("stream open")
}

#[tokio::test]
async fn watch_streams_beyond_the_limit_are_refused_until_one_ends() {
    let control = InProcessControl::start_with(|c: &mut ControlConfig| c.max_watch_streams = 2)
        .await
        .expect("control");
    let mut first = watch(&control).await.expect("first stream");
    let mut second = watch(&control).await.expect("second stream");
    assert!(next(&mut first).await.snapshot_complete);
    assert!(next(&mut second).await.snapshot_complete);
    let refused = watch(&control).await.expect_err("a third is refused");
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    drop(first);
    // The slot comes back once the server notices the stream is gone.
    wait_until(
        Duration::from_secs(10),
        "a stream slot is free again",
        || {
            let control = &control;
            async move {
                match watch(control).await {
                    Ok(stream) => Ok(stream),
                    Err(e) => Err(e.to_string()),
                }
            }
        },
    )
    .await
    .expect("slot freed");
    control.shutdown().await.expect("shutdown");
}

#[tokio::test]
async fn a_unary_call_times_out_but_a_stream_lives_on() {
    let control =
        InProcessControl::start_with(|c: &mut ControlConfig| c.grpc_request_timeout_seconds = 1)
            .await
            .expect("control");
    let mut stream = watch(&control).await.expect("stream");
    assert!(next(&mut stream).await.snapshot_complete);

    // A GetUserCoin whose request never arrives: only the server's timeout ends it.
    let mut grpc = tonic::client::Grpc::new(switchyard_tests::control::channel(control.addr));
    grpc.ready().await.expect("ready");
    let started = Instant::now();
    let call = grpc.client_streaming(
        tonic::Request::new(futures::stream::pending::<GetUserCoinRequest>()),
        tonic::codegen::http::uri::PathAndQuery::from_static(
            "/switchyard.v1.SwitcherAdmin/GetUserCoin",
        ),
        Prost::<GetUserCoinRequest, GetUserCoinResponse>::default(),
    );
    let answer = tokio::time::timeout(Duration::from_secs(15), call)
        .await
        .expect("the server ends the call, the client need not");
    let status = answer.expect_err("no request, no answer");
    assert_eq!(status.code(), Code::Cancelled, "{status:?}");
    assert!(started.elapsed() < Duration::from_secs(10));

    // The stream, older than the timeout, still delivers.
    control
        .admin()
        .switch_coin(SwitchCoinRequest {
            user: "alice".into(),
            coin: "bch".into(),
        })
        .await
        .expect("switch");
    let msg = next(&mut stream).await;
    assert_eq!(msg.users.first().map(|u| u.user.as_str()), Some("alice"));
    control.shutdown().await.expect("shutdown");
}

/// Watchers that never read stall in the middle of a 40,000-user snapshot; SwitchCoin calls
/// complete meanwhile, and a stalled watcher that reads again ends with every switch.
#[tokio::test]
async fn a_snapshot_being_sent_does_not_block_switches() {
    const USERS: usize = 40_000;
    let control = InProcessControl::start_with(|c: &mut ControlConfig| {
        c.watch_buffer_bytes = 16 * 1024;
    })
    .await
    .expect("control");
    let mut expected = BTreeMap::new();
    for chunk in (0..USERS).collect::<Vec<_>>().chunks(10_000) {
        let switches = chunk
            .iter()
            .map(|i| {
                let user = format!("user{i:06}");
                expected.insert(user.clone(), "btc".to_owned());
                SwitchCoinRequest {
                    user,
                    coin: "btc".into(),
                }
            })
            .collect();
        control
            .admin()
            .switch_coins(SwitchCoinsRequest { switches })
            .await
            .expect("populate");
    }
    let mut stalled = Vec::new();
    for _ in 0..3 {
        stalled.push(watch(&control).await.expect("stream"));
    }
    // A first message proves each snapshot started; then nobody reads.
    let mut firsts = Vec::new();
    for stream in &mut stalled {
        let first = next(stream).await;
        assert!(first.reset && !first.snapshot_complete);
        firsts.push(first);
    }
    let mut admin = control.admin();
    for i in 0..30 {
        // Spread over the key space, before and after where the snapshots stopped.
        let user = format!("user{:06}", (i * 1_333) % USERS);
        let coin = if i.is_multiple_of(2) { "bch" } else { "ltc" };
        tokio::time::timeout(
            Duration::from_secs(5),
            admin.switch_coin(SwitchCoinRequest {
                user: user.clone(),
                coin: coin.into(),
            }),
        )
        .await
        .expect("a switch completes while snapshots stall")
        .expect("switch");
        expected.insert(user, coin.to_owned());
    }
    let last_revision = control.core.index().revision();

    // A stalled watcher reads on: snapshot, then changes, up to the last switch.
    let mut stream = stalled.swap_remove(0);
    let mut state = BTreeMap::new();
    let mut first = Some(firsts.swap_remove(0));
    loop {
        let msg = match first.take() {
            Some(msg) => msg,
            None => next(&mut stream).await,
        };
        for u in msg.users {
            if u.removed {
                state.remove(&u.user);
            } else {
                state.insert(u.user, u.coin);
            }
        }
        if msg.revision >= last_revision {
            break;
        }
    }
    assert_eq!(state.len(), expected.len());
    assert!(
        state == expected,
        "the stalled watcher ends with every switch"
    );
    control.shutdown().await.expect("shutdown");
}

async fn control_with_http() -> (InProcessControl, SocketAddr) {
    let port = switchyard_tests::control::free_port().expect("port");
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
    let control = InProcessControl::start_with(|c: &mut ControlConfig| {
        c.enable_api_server = true;
        c.listen_addr = addr.to_string();
        c.api_user = "admin".into();
        c.api_password = "secret".into();
        c.http_header_read_timeout_seconds = 1;
        c.http_body_read_timeout_seconds = 1;
    })
    .await
    .expect("control");
    wait_until(Duration::from_secs(10), "HTTP listener up", || async move {
        TcpStream::connect(addr)
            .await
            .map(drop)
            .map_err(|e| e.to_string())
    })
    .await
    .expect("listening");
    (control, addr)
}

/// Reads until the server closes; what it sent. Fails after `within`.
async fn read_until_closed(stream: &mut TcpStream, within: Duration) -> Result<String, String> {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Err(_) => return Err(format!("still open after {within:?}")),
            Ok(Ok(0)) | Ok(Err(_)) => return Ok(String::from_utf8_lossy(&got).into_owned()),
            Ok(Ok(n)) => got.extend_from_slice(buf.get(..n).unwrap_or_default()),
        }
    }
}

#[tokio::test]
async fn slow_headers_bodies_and_oversized_bodies_are_cut_off() {
    let (control, addr) = control_with_http().await;

    // Slowloris: a header a byte at a time, for ever. Closed at the 1 s header timeout.
    let mut slow = TcpStream::connect(addr).await.expect("connect");
    slow.write_all(b"GET /switch?puname=a&coin=btc HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        .await
        .expect("write");
    let started = Instant::now();
    let (mut rd, mut wr) = slow.into_split();
    let dripping = tokio::spawn(async move {
        while wr.write_all(b"a").await.is_ok() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    let mut buf = [0u8; 1024];
    let closed = tokio::time::timeout(Duration::from_secs(8), async {
        loop {
            match rd.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "a header sent byte by byte is cut off");
    assert!(started.elapsed() >= Duration::from_millis(900));
    dripping.abort();

    // A body that stops coming: answered (not a success) and closed at the 1 s body timeout.
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream
        .write_all(
            b"POST /switch/multi-user HTTP/1.1\r\nHost: x\r\nAuthorization: Basic YWRtaW46c2VjcmV0\r\nContent-Length: 1000\r\n\r\n{\"usercoins\"",
        )
        .await
        .expect("write");
    let answer = read_until_closed(&mut stream, Duration::from_secs(8))
        .await
        .expect("a stalled body is cut off");
    assert!(!answer.contains("\"success\":true"), "{answer}");

    // An oversized body: refused with 413 before it is all sent, then closed.
    let stream = TcpStream::connect(addr).await.expect("connect");
    let (mut rd, mut wr) = stream.into_split();
    let size = 64 * 1024 * 1024;
    let writer = tokio::spawn(async move {
        let head = format!(
            "POST /switch HTTP/1.1\r\nHost: x\r\nAuthorization: Basic YWRtaW46c2VjcmV0\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: {size}\r\n\r\n"
        );
        wr.write_all(head.as_bytes()).await?;
        let chunk = vec![b'a'; 64 * 1024];
        let mut sent = 0;
        while sent < size {
            wr.write_all(&chunk).await?;
            sent += chunk.len();
        }
        Ok::<usize, std::io::Error>(sent)
    });
    let mut got = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match rd.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got.extend_from_slice(buf.get(..n).unwrap_or_default()),
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "an oversized body's connection is closed");
    let answer = String::from_utf8_lossy(&got);
    assert!(answer.contains("\"err_no\":413"), "{answer}");
    let sent = writer.await.expect("writer");
    assert!(
        sent.is_err(),
        "the server stopped reading before the whole 64 MiB body"
    );
    control.shutdown().await.expect("shutdown");
}

#[tokio::test]
async fn the_user_list_api_answers_in_pages_that_cover_every_user() {
    let listed = Arc::new(ListedUsers::new());
    listed.record("btc", (1..=25).map(|i| (i, format!("b{i}"))));
    listed.record("bch", (3..=30).step_by(4).map(|i| (i, format!("c{i}"))));
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let shutdown = CancellationToken::new();
    let server = tokio::spawn(serve(
        listener,
        router_with_page_size(Arc::clone(&listed), 4),
        HttpLimits::default(),
        shutdown.clone(),
    ));
    let client = reqwest::Client::new();
    for coin in ["", "btc"] {
        let mut last_id = 0u64;
        let mut got = Vec::new();
        loop {
            let body: serde_json::Value = client
                .get(format!("http://{addr}/?coin={coin}&last_id={last_id}"))
                .send()
                .await
                .expect("answer")
                .json()
                .await
                .expect("json");
            assert_eq!(body["err_no"], 0);
            let data = body["data"].as_object().expect("data").clone();
            if data.is_empty() {
                break;
            }
            assert!(
                data.len() <= 5,
                "a page of at most 4 (+1 sharing the last puid)"
            );
            let mut page: Vec<(u64, String)> = data
                .iter()
                .map(|(name, puid)| (puid.as_u64().expect("puid"), name.clone()))
                .collect();
            page.sort();
            last_id = page.last().map(|(p, _)| *p).expect("non-empty");
            got.extend(page);
        }
        let coin = (!coin.is_empty()).then_some(coin);
        let whole: Vec<(u64, String)> = listed
            .after(coin, 0)
            .into_iter()
            .map(|(name, puid)| (puid, name))
            .collect();
        // Within one puid the order is the server's; compare sorted.
        let mut whole = whole;
        whole.sort();
        assert_eq!(got, whole, "{coin:?}");
    }
    shutdown.cancel();
    server.await.expect("join").expect("served");
}
