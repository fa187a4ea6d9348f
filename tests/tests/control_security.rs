//! No open admin by accident (issue 13, item 1), on the real `switchyard-control` binary: it
//! refuses to start, naming the setting, when gRPC listens beyond loopback without AdminToken
//! or ProxyToken, or the HTTP switch API lacks credentials; on loopback without tokens it starts
//! with exactly one warning line; tokens read from a file or from the environment are the ones
//! the server checks, the environment taking precedence over the config file.

use std::{
    path::Path,
    process::{Command, ExitStatus, Stdio},
    time::Duration,
};

use serde_json::json;
use switchyard_proto::v1::{
    GetUserCoinRequest, LookupUserRequest, proxy_control_client::ProxyControlClient,
    switcher_admin_client::SwitcherAdminClient,
};
use switchyard_tests::{
    control::{ControlProcess, channel, free_port, workspace_binary},
    wait::wait_until,
};
use tonic::{Code, Request};

/// The bound on every wait.
const T: Duration = Duration::from_secs(30);

/// The environment variables that would change what the binary is given.
const SECRET_ENV: [&str; 6] = [
    "SWITCHYARD_ADMIN_TOKEN",
    "SWITCHYARD_ADMIN_TOKEN_FILE",
    "SWITCHYARD_PROXY_TOKEN",
    "SWITCHYARD_PROXY_TOKEN_FILE",
    "SWITCHYARD_API_PASSWORD",
    "SWITCHYARD_API_PASSWORD_FILE",
];

/// Runs the binary (not `--check-config`: a real start) on `config` with `args` and `env`, and
/// waits for it to exit. Returns its status and stderr; panics if it is still running after
/// [`T`] (it started when it should not have).
async fn run_to_exit(
    dir: &Path,
    config: serde_json::Value,
    args: &[&str],
    env: &[(&str, &str)],
) -> (ExitStatus, String) {
    let config_path = dir.join("control.json");
    std::fs::write(&config_path, config.to_string()).expect("write the config");
    let stderr_path = dir.join("stderr.txt");
    let stderr = std::fs::File::create(&stderr_path).expect("stderr file");
    let mut command = Command::new(workspace_binary("switchyard-control").expect("built"));
    command
        .arg("--config")
        .arg(&config_path)
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr);
    for key in SECRET_ENV {
        command.env_remove(key);
    }
    for (key, value) in env {
        command.env(key, value);
    }
    let mut child = command.spawn().expect("spawn switchyard-control");
    let waited = wait_until(T, "switchyard-control to exit", || {
        let status = child.try_wait();
        async move {
            match status {
                Ok(Some(status)) => Ok(status),
                Ok(None) => Err("still running".to_owned()),
                Err(e) => Err(e.to_string()),
            }
        }
    })
    .await;
    let status = match waited {
        Ok(status) => status,
        Err(e) => {
            let _ = child.kill();
            let _ = child.wait();
            let log = std::fs::read_to_string(&stderr_path).unwrap_or_default();
            panic!("{e}: it started when it must refuse\n{log}");
        }
    };
    let log = std::fs::read_to_string(&stderr_path).unwrap_or_default();
    (status, log)
}

#[tokio::test]
async fn refuses_each_unsafe_combination_naming_the_setting() {
    let dir = tempfile::tempdir().expect("tempdir");
    let open = format!("0.0.0.0:{}", free_port().expect("port"));
    let loopback = format!("127.0.0.1:{}", free_port().expect("port"));
    let http_open = format!("0.0.0.0:{}", free_port().expect("port"));
    let data = dir.path().join("data");
    let base = |grpc: &str| {
        json!({
            "GrpcListenAddr": grpc,
            "DataDir": data,
            "AvailableCoins": ["btc", "bch"],
        })
    };
    let with = |mut config: serde_json::Value, extra: serde_json::Value| {
        for (k, v) in extra.as_object().expect("an object") {
            config[k] = v.clone();
        }
        config
    };
    let tokens = json!({"AdminToken": "a", "ProxyToken": "p"});
    let cases: Vec<(&str, serde_json::Value, Vec<&str>, &str)> = vec![
        (
            "gRPC on 0.0.0.0 without AdminToken",
            with(base(&open), json!({"ProxyToken": "p"})),
            vec![],
            "AdminToken",
        ),
        (
            "gRPC on 0.0.0.0 without ProxyToken",
            with(base(&open), json!({"AdminToken": "a"})),
            vec![],
            "ProxyToken",
        ),
        (
            "gRPC on 0.0.0.0 without any token",
            base(&open),
            vec![],
            "AdminToken",
        ),
        (
            "--grpc-listen 0.0.0.0 over a loopback config without AdminToken",
            with(base(&loopback), json!({"ProxyToken": "p"})),
            vec!["--grpc-listen", open.as_str()],
            "AdminToken",
        ),
        (
            "HTTP switch API on 0.0.0.0 without credentials",
            with(
                with(base(&loopback), tokens.clone()),
                json!({"EnableAPIServer": true, "ListenAddr": http_open}),
            ),
            vec![],
            "APIUser",
        ),
        (
            "HTTP switch API on 0.0.0.0 without a password",
            with(
                with(base(&loopback), tokens.clone()),
                json!({"EnableAPIServer": true, "ListenAddr": http_open, "APIUser": "backend"}),
            ),
            vec![],
            "APIPassword",
        ),
    ];
    for (what, config, args, setting) in cases {
        let (status, stderr) = run_to_exit(dir.path(), config, &args, &[]).await;
        assert!(!status.success(), "{what}: must be refused\n{stderr}");
        assert!(
            stderr.contains(&format!("config setting {setting}")),
            "{what}: the error names {setting}:\n{stderr}"
        );
        assert!(
            !stderr.contains("gRPC listening"),
            "{what}: nothing was served\n{stderr}"
        );
    }
    // An unreadable token file is refused too, naming its setting.
    let (status, stderr) = run_to_exit(
        dir.path(),
        with(
            base(&open),
            json!({"AdminTokenFile": dir.path().join("missing"), "ProxyToken": "p"}),
        ),
        &[],
        &[],
    )
    .await;
    assert!(!status.success());
    assert!(stderr.contains("AdminTokenFile"), "{stderr}");
}

/// The lines of `log` at WARN level.
fn warnings(log: &str) -> Vec<&str> {
    log.lines().filter(|l| l.contains(" WARN ")).collect()
}

#[tokio::test]
async fn loopback_without_tokens_starts_with_exactly_one_warning_line() {
    let mut control = ControlProcess::start_with(|_| {}, vec![])
        .await
        .expect("control starts on loopback without tokens");
    // The warning is logged before "gRPC listening", which the fixture's SERVING implies.
    let log = control.log();
    let warned = warnings(&log);
    assert_eq!(warned.len(), 1, "exactly one warning line:\n{log}");
    assert!(
        warned[0].contains("AdminToken and ProxyToken") && warned[0].contains("loopback"),
        "{}",
        warned[0]
    );
    // Open on loopback indeed: calls without a token pass.
    control
        .admin()
        .get_user_coin(GetUserCoinRequest {
            user: "nobody".into(),
        })
        .await
        .map(|_| ())
        .or_else(|s| {
            if s.code() == Code::NotFound {
                Ok(())
            } else {
                Err(s)
            }
        })
        .expect("no token needed on loopback");
    assert!(control.terminate().await.expect("exits").success());

    // With both tokens: no warning at all.
    let mut control = ControlProcess::start_with(
        |c| {
            c["AdminToken"] = "a".into();
            c["ProxyToken"] = "p".into();
        },
        vec![],
    )
    .await
    .expect("control starts");
    let log = control.log();
    assert!(warnings(&log).is_empty(), "{log}");
    assert!(control.terminate().await.expect("exits").success());
}

/// A request carrying `authorization: Bearer <token>` when `token` is set.
fn with_token<T>(message: T, token: Option<&str>) -> Request<T> {
    let mut request = Request::new(message);
    if let Some(token) = token {
        request.metadata_mut().insert(
            "authorization",
            format!("Bearer {token}").parse().expect("ASCII"),
        );
    }
    request
}

/// The code of a GetUserCoin call with `token` (`Ok` for OK or NOT_FOUND: authenticated).
async fn admin_call(addr: std::net::SocketAddr, token: Option<&str>) -> Result<(), Code> {
    let mut admin = SwitcherAdminClient::new(channel(addr));
    match admin
        .get_user_coin(with_token(
            GetUserCoinRequest {
                user: "nobody".into(),
            },
            token,
        ))
        .await
    {
        Ok(_) => Ok(()),
        Err(s) if s.code() == Code::NotFound => Ok(()),
        Err(s) => Err(s.code()),
    }
}

/// The code of a LookupUser call with `token`.
async fn proxy_call(addr: std::net::SocketAddr, token: Option<&str>) -> Result<(), Code> {
    let mut proxy = ProxyControlClient::new(channel(addr));
    proxy
        .lookup_user(with_token(
            LookupUserRequest {
                user: "nobody".into(),
            },
            token,
        ))
        .await
        .map(|_| ())
        .map_err(|s| s.code())
}

#[tokio::test]
async fn tokens_from_files_and_the_environment_are_the_ones_checked() {
    let secrets = tempfile::tempdir().expect("tempdir");
    let admin_file = secrets.path().join("admin-token");
    let proxy_file = secrets.path().join("proxy-token");
    std::fs::write(&admin_file, "admin-from-file\n").expect("write");
    std::fs::write(&proxy_file, "proxy-from-file\n").expect("write");

    // AdminTokenFile in the config, the proxy token's file from the environment; on 0.0.0.0,
    // which the file tokens make allowed. The fixture reaches it on 127.0.0.1.
    let mut control = ControlProcess::start_with(
        |c| {
            let port = c["GrpcListenAddr"]
                .as_str()
                .and_then(|a| a.rsplit_once(':'))
                .map(|(_, port)| port.to_owned())
                .expect("host:port");
            c["GrpcListenAddr"] = format!("0.0.0.0:{port}").into();
            c["AdminTokenFile"] = admin_file.to_string_lossy().into_owned().into();
        },
        vec![(
            "SWITCHYARD_PROXY_TOKEN_FILE".into(),
            proxy_file.to_string_lossy().into_owned(),
        )],
    )
    .await
    .expect("starts on 0.0.0.0 with tokens from files");
    let addr = control.addr;
    assert_eq!(admin_call(addr, Some("admin-from-file")).await, Ok(()));
    assert_eq!(admin_call(addr, None).await, Err(Code::Unauthenticated));
    // (The call above passing shows the file's line end was trimmed off.)
    assert_eq!(proxy_call(addr, Some("proxy-from-file")).await, Ok(()));
    assert_eq!(proxy_call(addr, None).await, Err(Code::Unauthenticated));
    assert_eq!(
        proxy_call(addr, Some("admin-from-file")).await,
        Err(Code::Unauthenticated),
        "each service has its own token"
    );
    let log = control.log();
    for secret in ["admin-from-file", "proxy-from-file"] {
        assert!(!log.contains(secret), "{secret} logged:\n{log}");
    }
    assert!(warnings(&log).is_empty(), "{log}");
    assert!(control.terminate().await.expect("exits").success());

    // Tokens in the environment take precedence over the config file's.
    let mut control = ControlProcess::start_with(
        |c| {
            c["AdminToken"] = "admin-from-config".into();
            c["ProxyToken"] = "proxy-from-config".into();
        },
        vec![
            ("SWITCHYARD_ADMIN_TOKEN".into(), "admin-from-env".into()),
            ("SWITCHYARD_PROXY_TOKEN".into(), "proxy-from-env".into()),
        ],
    )
    .await
    .expect("starts");
    let addr = control.addr;
    assert_eq!(admin_call(addr, Some("admin-from-env")).await, Ok(()));
    assert_eq!(
        admin_call(addr, Some("admin-from-config")).await,
        Err(Code::Unauthenticated)
    );
    assert_eq!(admin_call(addr, None).await, Err(Code::Unauthenticated));
    assert_eq!(proxy_call(addr, Some("proxy-from-env")).await, Ok(()));
    assert_eq!(
        proxy_call(addr, Some("proxy-from-config")).await,
        Err(Code::Unauthenticated)
    );
    assert!(control.terminate().await.expect("exits").success());
}
