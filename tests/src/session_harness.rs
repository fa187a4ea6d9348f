//! What the end-to-end tests of a proxied session share: a control service and the real proxy
//! binary in front of scripted sservers ([`crate::scripted`]), logins, and checks of what a
//! miner received (exactly one answer per request, no malformed line).

use std::{collections::BTreeSet, time::Duration};

use serde_json::{Value, json};
use switchyard_proto::v1::SwitchCoinRequest;
use tokio::time::Instant;

use crate::{
    control::InProcessControl,
    miner::Miner,
    proxy::{ProxyProcess, proxy_config_for},
    scripted::{ScriptedConn, ScriptedSserver},
};

/// How long any awaited condition may take.
pub const T: Duration = Duration::from_secs(20);

/// A control service (users on their coins) and a proxy in front of scripted sservers.
pub struct Node {
    /// The control service.
    pub control: InProcessControl,
    /// The proxy.
    pub proxy: ProxyProcess,
}

/// A control service accepting `extra_coins` besides the test coins, with `users` on their
/// coins.
pub async fn control(users: &[(&str, &str)], extra_coins: &[&str]) -> InProcessControl {
    let extra: Vec<String> = extra_coins.iter().map(|c| (*c).to_string()).collect();
    let control = InProcessControl::start_with(move |c| c.available_coins.extend(extra))
        .await
        .expect("the control service starts");
    for (user, coin) in users {
        switch(&control, user, coin).await;
    }
    control
}

/// A bitcoin proxy for `alice` (on btc) in front of `sservers`.
pub async fn node(sservers: &[&ScriptedSserver]) -> Node {
    node_with(&[("alice", "btc")], &[], "bitcoin", sservers).await
}

/// A proxy for `users` on `chain`, its control service accepting `extra_coins` too.
pub async fn node_with(
    users: &[(&str, &str)],
    extra_coins: &[&str],
    chain: &str,
    sservers: &[&ScriptedSserver],
) -> Node {
    let control = control(users, extra_coins).await;
    let pairs: Vec<(&str, std::net::SocketAddr)> =
        sservers.iter().map(|s| (s.coin(), s.addr())).collect();
    let mut config = proxy_config_for(&[control.addr], &pairs).expect("a proxy config");
    config["ChainType"] = json!(chain);
    let proxy = ProxyProcess::start(&config)
        .await
        .expect("the proxy starts");
    Node { control, proxy }
}

/// Switches `user` to `coin` through the admin API.
pub async fn switch(control: &InProcessControl, user: &str, coin: &str) {
    control
        .admin()
        .switch_coin(SwitchCoinRequest {
            user: user.into(),
            coin: coin.into(),
        })
        .await
        .unwrap_or_else(|e| panic!("switching {user} to {coin}: {e}"));
}

/// Panics with the message of a harness step that failed.
pub fn ok<V>(step: &str, result: Result<V, String>) -> V {
    result.unwrap_or_else(|e| panic!("{step}: {e}"))
}

/// Subscribes, authorizes `worker`, lets `sserver`'s next connection answer the login, and
/// waits for the miner's authorize answer; returns the sserver's end.
pub async fn login(miner: &mut Miner, worker: &str, sserver: &ScriptedSserver) -> ScriptedConn {
    let sub = miner
        .request("mining.subscribe", json!(["cgminer/4.10"]))
        .await
        .expect("the subscribe is sent");
    miner
        .answer(sub, T)
        .await
        .expect("the proxy answers the subscribe");
    let auth = miner
        .request("mining.authorize", json!([worker, "x"]))
        .await
        .expect("the authorize is sent");
    let mut conn = ok("the first upstream", sserver.next_conn(T).await);
    let seen = ok("the first login", conn.answer_login(T).await);
    assert_eq!(seen.worker, worker, "the login names the worker: {seen:?}");
    let answer = miner.answer(auth, T).await.expect("the authorize answered");
    assert_eq!(answer["result"], json!(true), "{answer}");
    conn
}

/// The answers (no `method`) with `id` the miner received so far.
pub fn answers_to(miner: &Miner, id: &Value) -> Vec<Value> {
    miner
        .received
        .iter()
        .filter(|v| v.get("method").is_none() && v.get("id") == Some(id))
        .cloned()
        .collect()
}

/// Asserts that the miner got exactly one answer to `id`; that answer.
pub fn assert_one_answer(miner: &Miner, id: Value) -> Value {
    let answers = answers_to(miner, &id);
    assert_eq!(
        answers.len(),
        1,
        "exactly one answer to id {id}; got {answers:?}; everything received: {:?}",
        miner.received
    );
    answers[0].clone()
}

/// Asserts that the miner got no malformed line.
pub fn assert_no_malformed(miner: &Miner) {
    assert!(
        miner.malformed.is_empty(),
        "malformed lines: {:?}",
        miner.malformed
    );
}

/// Waits for the `mining.notify` of `job_id`.
pub async fn wait_job(miner: &mut Miner, job_id: &str) -> Value {
    miner
        .wait_for(&format!("job {job_id}"), T, |v| {
            v["method"] == "mining.notify" && v["params"][0] == job_id
        })
        .await
        .unwrap_or_else(|e| panic!("{e}; received: {:?}", miner.received))
}

/// Reads `conn` until it has received an authorize (any id) for each of `wanted` or the
/// deadline passes, answering every authorize `true` under its id. Returns the workers whose
/// authorize never came (empty on success).
pub async fn authorizes_for(
    conn: &mut ScriptedConn,
    wanted: &BTreeSet<String>,
    timeout: Duration,
) -> BTreeSet<String> {
    let deadline = Instant::now() + timeout;
    let mut missing = wanted.clone();
    while !missing.is_empty() {
        let left = deadline.saturating_duration_since(Instant::now());
        let Ok(request) = conn.recv_method("mining.authorize", left).await else {
            break;
        };
        let worker = request["params"][0]
            .as_str()
            .unwrap_or_default()
            .to_string();
        missing.remove(&worker);
        ok(
            "answering an authorize",
            conn.reply(&request, json!(true)).await,
        );
    }
    missing
}

/// Reads the miner until it has at least one answer to each of `ids`; an error naming the ids
/// still unanswered when `timeout` passes first.
pub async fn wait_answers(
    miner: &mut Miner,
    ids: &[Value],
    timeout: Duration,
) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    loop {
        let unanswered: Vec<&Value> = ids
            .iter()
            .filter(|id| answers_to(miner, id).is_empty())
            .collect();
        if unanswered.is_empty() {
            return Ok(());
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if let Err(e) = miner.recv(left).await {
            return Err(format!(
                "the miner never got an answer to ids {unanswered:?} ({e})"
            ));
        }
    }
}

/// A `mining.submit` of `worker` for `job_id` under `id`.
pub fn submit(id: u64, worker: &str, job_id: &str) -> Value {
    json!({"id": id, "method": "mining.submit",
           "params": [worker, job_id, "0000000000000001", "6553f100", "00000001"]})
}
