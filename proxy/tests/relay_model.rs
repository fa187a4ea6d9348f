//! A randomized model test of the relay state machine ([`switchyard_proxy::relay`]): a seeded
//! generator drives one session through interleaved miner requests (ids reused on purpose),
//! upstream answers held and released in any order across connections, jobs (clean or not),
//! switches (A→B, A→B→A, rapid chains, coins without an sserver), upstream drops, slow and
//! failed opens, and time passing over drain windows. Model sservers stand in for the real
//! ones; every action the relay takes is checked as it happens, and at the end of each run:
//!
//! - the miner got exactly one answer per request it sent (counted per id, since ids repeat);
//! - only whole JSON lines reached either side;
//! - no job of a coin reached the miner after the session left that coin;
//! - every authorized worker is authorized on the current upstream;
//! - one sserver never held two connections of the session (one SID) at once;
//! - every submit reached the sserver that announced its job while that connection still held
//!   it (a job nobody holds any more goes to the current upstream, or is answered stale by the
//!   proxy when it was another coin's);
//! - with the metrics attached, every submit that reached an upstream was counted once by
//!   outcome (`switchyard_proxy_shares_total`), and after a switch or a reconnect the first
//!   job at the miner was announced once ([`Action::FirstJob`]).
//!
//! `SWITCHYARD_MODEL_CASES=N` runs N cases (default 300); `SWITCHYARD_MODEL_SEED=S` runs the
//! one case with seed S. A failure prints its seed.

use std::{
    collections::{BTreeMap, HashMap, HashSet, VecDeque},
    sync::Arc,
};

use bytes::Bytes;
use rand::{Rng, SeedableRng, rngs::StdRng};
use serde_json::{Value, json};
use switchyard_proxy::{
    handshake::{Handshake, NameRules, Step},
    metrics::{Metrics, ShareOutcome},
    relay::{Action, MAX_JOBS, Opened, Relay, RelaySettings, SessionSnapshot, UpstreamId},
    session_id::{ChainType, SessionId},
};

const COINS: [&str; 3] = ["btc", "bch", "ltc"];
const NO_SSERVER: &str = "xmr";
const DRAIN_WINDOW_MS: u64 = 60_000;

struct Names;

impl NameRules for Names {
    fn case_insensitive(&self) -> bool {
        false
    }
    fn canonical_name(&self, _lowercase: &str) -> Option<String> {
        None
    }
}

/// One model sserver connection.
#[derive(Debug)]
struct Conn {
    coin: String,
    /// Opened (login done); before that it is being opened.
    opened: bool,
    closed: bool,
    /// Requests waiting for an answer, in order.
    inbox: VecDeque<Value>,
    authorized: HashSet<String>,
    /// Jobs this connection announced that reached the miner, since its last clean job.
    live_jobs: Vec<String>,
    next_job: u32,
}

struct World {
    rng: StdRng,
    now: u64,
    relay: Relay,
    conns: BTreeMap<UpstreamId, Conn>,
    /// Requests the miner sent that expect an answer, per id.
    sent: HashMap<String, u32>,
    /// Answers the miner got, per id.
    answers: HashMap<String, u32>,
    /// The miner's jobs, newest last.
    miner_jobs: Vec<String>,
    /// The coin whose jobs the miner may get.
    miner_coin: String,
    /// Workers the miner saw authorized.
    authorized: HashSet<String>,
    /// Authorize requests in flight from the miner: id → workers.
    authorizing: HashMap<String, Vec<String>>,
    next_worker: u32,
    ended: bool,
    /// Jobs the miner received so far.
    jobs_received: u64,
    /// An upstream opened by a switch or a reconnect serves since the miner had received this
    /// many jobs, and its first job has not been announced ([`Action::FirstJob`]).
    first_job_due: Option<u64>,
    /// First jobs announced.
    first_jobs: u64,
    /// Submits the miner sent.
    submits_sent: u64,
    metrics: Arc<Metrics>,
    log: Vec<String>,
}

fn job_coin(job: &str) -> &str {
    job.split('-').next().unwrap_or("")
}

fn job_conn(job: &str) -> Option<UpstreamId> {
    job.split('-').nth(1)?.parse().ok()
}

impl World {
    fn new(seed: u64) -> Self {
        let rng = StdRng::seed_from_u64(seed);
        let mut hs = Handshake::new(ChainType::Bitcoin, SessionId(0x0100_0080), 1);
        let subscribe = br#"{"id":1,"method":"mining.subscribe","params":["cgminer/4.11"]}"#;
        assert!(matches!(hs.on_line(subscribe, &Names), Step::Reply(_)));
        let auth = br#"{"id":2,"method":"mining.authorize","params":["alice.w0","x"]}"#;
        let Step::Login(login) = hs.on_line(auth, &Names) else {
            panic!("login expected");
        };
        let mut conn = Conn {
            coin: "btc".into(),
            opened: true,
            closed: false,
            inbox: VecDeque::new(),
            authorized: HashSet::from(["alice.w0".to_string()]),
            live_jobs: Vec::new(),
            next_job: 1,
        };
        let first_job = "btc-0-0".to_string();
        conn.live_jobs.push(first_job.clone());
        let opened = Opened {
            suffixed: false,
            user_suffix: "btc".into(),
            allowed_mask: None,
            held: vec![notify_line(&first_job, true)],
        };
        let mut relay = Relay::start(
            hs,
            login,
            "btc".into(),
            opened,
            r#"{"id":2,"result":true,"error":null}"#.into(),
            Vec::new(),
            RelaySettings {
                drain_window_ms: DRAIN_WINDOW_MS,
            },
        );
        let metrics = Metrics::new(COINS);
        relay.attach_metrics(&metrics);
        let mut world = Self {
            rng,
            now: 1_000_000,
            relay,
            conns: BTreeMap::from([(0, conn)]),
            sent: HashMap::from([("2".to_string(), 1)]),
            answers: HashMap::new(),
            miner_jobs: Vec::new(),
            miner_coin: "btc".into(),
            authorized: HashSet::from(["alice.w0".to_string()]),
            authorizing: HashMap::new(),
            next_worker: 1,
            ended: false,
            jobs_received: 0,
            first_job_due: None,
            first_jobs: 0,
            submits_sent: 0,
            metrics,
            log: Vec::new(),
        };
        world.take_actions();
        world
    }

    fn take_actions(&mut self) {
        for action in self.relay.take_actions() {
            self.log
                .push(format!("{action:?}").chars().take(200).collect());
            match action {
                Action::ToMiner(bytes) => self.miner_gets(&bytes),
                Action::ToUpstream(id, bytes) => self.upstream_gets(id, &bytes),
                Action::Open { id, coin, .. } => {
                    let clash = self
                        .conns
                        .iter()
                        .find(|(_, c)| !c.closed && c.coin == coin)
                        .map(|(i, _)| *i);
                    assert_eq!(
                        clash, None,
                        "a second connection to {coin} with the session's SID (open {id})"
                    );
                    assert!(!self.conns.contains_key(&id), "upstream number {id} reused");
                    self.conns.insert(
                        id,
                        Conn {
                            coin,
                            opened: false,
                            closed: false,
                            inbox: VecDeque::new(),
                            authorized: HashSet::new(),
                            live_jobs: Vec::new(),
                            next_job: 0,
                        },
                    );
                }
                Action::CancelOpen(id) | Action::Close(id) => {
                    if let Some(conn) = self.conns.get_mut(&id) {
                        conn.closed = true;
                        conn.inbox.clear();
                    }
                }
                Action::Outcome(done) if done.outcome == "ok" => {
                    self.miner_coin = done.coin;
                    self.first_job_due = Some(self.jobs_received);
                }
                Action::Outcome(_) => {}
                Action::FirstJob => {
                    // Once per opened upstream, right after its first job reached the miner.
                    let since = self
                        .first_job_due
                        .take()
                        .expect("a first job announced twice, or with no upstream opened");
                    assert!(
                        self.jobs_received > since,
                        "a first job announced before any job reached the miner"
                    );
                    let last = self.miner_jobs.last().expect("a job");
                    assert_eq!(job_coin(last), self.miner_coin, "the first job's coin");
                    self.first_jobs += 1;
                }
                Action::End(_) => self.ended = true,
            }
        }
    }

    fn lines(bytes: &[u8]) -> Vec<Value> {
        assert!(
            bytes.ends_with(b"\n"),
            "a write that does not end a line: {:?}",
            String::from_utf8_lossy(bytes)
        );
        bytes
            .split(|b| *b == b'\n')
            .filter(|l| !l.is_empty())
            .map(|l| {
                serde_json::from_slice(l).unwrap_or_else(|_| {
                    panic!("not a whole JSON line: {:?}", String::from_utf8_lossy(l))
                })
            })
            .collect()
    }

    fn miner_gets(&mut self, bytes: &[u8]) {
        for line in Self::lines(bytes) {
            match line.get("method").and_then(Value::as_str) {
                Some("mining.notify") => {
                    let job = line["params"][0].as_str().expect("job id").to_string();
                    assert_eq!(
                        job_coin(&job),
                        self.miner_coin,
                        "a {} job reached the miner after it moved to {}",
                        job_coin(&job),
                        self.miner_coin
                    );
                    // Old jobs stay around: shares found on them still come after a clean job
                    // or a switch (work in the miner's pipeline).
                    if self.miner_jobs.len() >= 16 {
                        self.miner_jobs.remove(0);
                    }
                    self.miner_jobs.push(job);
                    self.jobs_received += 1;
                }
                Some("mining.set_difficulty") => {
                    let difficulty = line["params"][0].as_u64().expect("difficulty");
                    let coin = COINS[(difficulty / 1000) as usize % COINS.len()];
                    assert_eq!(
                        coin, self.miner_coin,
                        "{coin}'s difficulty reached the miner after it moved to {}",
                        self.miner_coin
                    );
                }
                Some(_) => {}
                None => {
                    let id = line["id"].to_string();
                    *self.answers.entry(id.clone()).or_default() += 1;
                    if let Some(workers) = self.authorizing.get_mut(&id)
                        && !workers.is_empty()
                    {
                        let worker = workers.remove(0);
                        if line["result"] == json!(true) {
                            self.authorized.insert(worker);
                        }
                    }
                }
            }
        }
    }

    fn upstream_gets(&mut self, id: UpstreamId, bytes: &[u8]) {
        let lines = Self::lines(bytes);
        let conns = &self.conns;
        let conn = conns
            .get(&id)
            .expect("a write to an upstream that was never opened");
        assert!(!conn.closed, "a write to closed upstream {id}");
        assert!(conn.opened, "a write to upstream {id} before its login");
        let coin = conn.coin.clone();
        for line in lines {
            if line["method"] == json!("mining.submit") {
                let job = line["params"][1].as_str().unwrap_or("").to_string();
                // Where it had to go: the connection that announced it, while it holds it.
                if let Some(owner) = job_conn(&job)
                    && let Some(owner_conn) = self.conns.get(&owner)
                    && !owner_conn.closed
                    && owner_conn
                        .live_jobs
                        .iter()
                        .rev()
                        .take(MAX_JOBS)
                        .any(|j| *j == job)
                {
                    assert_eq!(
                        owner, id,
                        "submit of {job} went to upstream {id} ({coin}), not to {owner} that holds it"
                    );
                }
            }
            if line["method"] == json!("mining.suggest_difficulty") && !line["id"].is_string() {
                continue; // the miner's own: this sserver answers none
            }
            if line.get("method").is_some() && !line["id"].is_null() {
                self.conns.get_mut(&id).expect("conn").inbox.push_back(line);
            }
        }
    }

    /// The miner sends something.
    fn miner_sends(&mut self) {
        if !self.relay.reads_miner() {
            return;
        }
        let id = self.rng.random_range(1..=4u32);
        let kind = self.rng.random_range(0..100u32);
        let line = if kind < 70 {
            // A share, usually of the newest job, sometimes of an older or unknown one.
            let job = match self.miner_jobs.len() {
                0 => "btc-9-999".to_string(),
                n if self.rng.random_bool(0.8) => self.miner_jobs[n - 1].clone(),
                n => self.miner_jobs[self.rng.random_range(0..n)].clone(),
            };
            let worker = self
                .authorized
                .iter()
                .next()
                .cloned()
                .unwrap_or_else(|| "alice.w0".into());
            *self.sent.entry(id.to_string()).or_default() += 1;
            self.submits_sent += 1;
            json!({"id": id, "method": "mining.submit", "params": [worker, job, "00", "01", "02"]})
        } else if kind < 82 {
            let worker = format!("alice.w{}", self.next_worker);
            self.next_worker += 1;
            *self.sent.entry(id.to_string()).or_default() += 1;
            self.authorizing
                .entry(id.to_string())
                .or_default()
                .push(worker.clone());
            json!({"id": id, "method": "mining.authorize", "params": [worker, "x"]})
        } else if kind < 88 {
            json!({"id": id, "method": "mining.suggest_difficulty", "params": [self.rng.random_range(1..4096)]})
        } else if kind < 94 {
            *self.sent.entry(id.to_string()).or_default() += 1;
            json!({"id": id, "method": "mining.extranonce.subscribe", "params": []})
        } else {
            *self.sent.entry(id.to_string()).or_default() += 1;
            json!({"id": id, "method": "mining.get_transactions", "params": ["x"]})
        };
        if line["method"] == json!("mining.suggest_difficulty") {
            // No answer expected: sservers answer none.
        }
        let mut text = line.to_string().into_bytes();
        text.push(b'\n');
        self.relay.on_miner_line(Bytes::from(text), &Names);
    }

    fn open_conns(&self, opened: bool) -> Vec<UpstreamId> {
        self.conns
            .iter()
            .filter(|(_, c)| !c.closed && c.opened == opened)
            .map(|(i, _)| *i)
            .collect()
    }

    /// An upstream answers its oldest request.
    fn upstream_answers(&mut self) {
        let ids: Vec<_> = self
            .open_conns(true)
            .into_iter()
            .filter(|i| !self.conns[i].inbox.is_empty())
            .collect();
        if ids.is_empty() {
            return;
        }
        let id = ids[self.rng.random_range(0..ids.len())];
        self.answer_one(id);
    }

    fn answer_one(&mut self, id: UpstreamId) {
        let conn = self.conns.get_mut(&id).expect("conn");
        let Some(request) = conn.inbox.pop_front() else {
            return;
        };
        let result = match request["method"].as_str() {
            Some("mining.authorize") => {
                let worker = request["params"][0].as_str().unwrap_or("").to_string();
                conn.authorized.insert(worker);
                json!(true)
            }
            Some("mining.submit") => json!(true),
            Some("mining.get_transactions") => json!([]),
            _ => json!(true),
        };
        let answer = json!({"id": request["id"], "result": result, "error": null});
        let mut text = answer.to_string().into_bytes();
        text.push(b'\n');
        self.relay.on_upstream_line(id, Bytes::from(text), self.now);
    }

    /// An upstream announces a job or a difficulty.
    fn upstream_notifies(&mut self) {
        let ids = self.open_conns(true);
        if ids.is_empty() {
            return;
        }
        let id = ids[self.rng.random_range(0..ids.len())];
        let clean = self.rng.random_bool(0.3);
        let difficulty = self.rng.random_bool(0.2);
        let is_current = self.relay.current().is_some_and(|c| c.id == id);
        let conn = self.conns.get_mut(&id).expect("conn");
        let line = if difficulty {
            Bytes::from(format!(
                "{{\"id\":null,\"method\":\"mining.set_difficulty\",\"params\":[{}]}}\n",
                difficulty_of(&conn.coin)
            ))
        } else {
            let job = format!("{}-{id}-{}", conn.coin, conn.next_job);
            conn.next_job += 1;
            if clean {
                conn.live_jobs.clear();
            }
            // Only the current upstream's jobs reach the miner.
            if is_current {
                conn.live_jobs.push(job.clone());
            }
            let mut line = notify_line(&job, clean).to_vec();
            line.push(b'\n');
            Bytes::from(line)
        };
        self.relay.on_upstream_line(id, line, self.now);
    }

    fn opening_finishes(&mut self) {
        let Some(opening) = self.relay.opening().cloned() else {
            return;
        };
        let id = opening.id;
        let login = self.relay.login.params[0]
            .as_str()
            .unwrap_or("")
            .to_string();
        let conn = self.conns.get_mut(&id).expect("the opening conn exists");
        if conn.closed {
            return;
        }
        if self.rng.random_bool(0.03) {
            conn.closed = true;
            self.relay.on_open_failed(id);
            return;
        }
        conn.opened = true;
        conn.authorized.insert(login);
        let job = format!("{}-{id}-0", conn.coin);
        conn.next_job = 1;
        conn.live_jobs.push(job.clone());
        let opened = Opened {
            suffixed: false,
            user_suffix: conn.coin.clone(),
            allowed_mask: None,
            held: vec![
                Bytes::from(format!(
                    "{{\"id\":null,\"method\":\"mining.set_difficulty\",\"params\":[{}]}}",
                    difficulty_of(&conn.coin)
                )),
                notify_line(&job, true),
            ],
        };
        self.relay.on_opened(id, opened, self.now);
    }

    fn upstream_drops(&mut self) {
        let ids = self.open_conns(true);
        if ids.is_empty() {
            return;
        }
        let id = ids[self.rng.random_range(0..ids.len())];
        let conn = self.conns.get_mut(&id).expect("conn");
        conn.closed = true;
        conn.inbox.clear();
        self.relay.on_upstream_lost(id, self.now);
    }

    fn coin_changes(&mut self) {
        let pick = self.rng.random_range(0..=COINS.len());
        let coin = COINS.get(pick).copied().unwrap_or(NO_SSERVER);
        self.relay.on_coin_changed(coin, coin != NO_SSERVER);
    }

    fn step(&mut self) {
        match self.rng.random_range(0..100u32) {
            0..30 => self.miner_sends(),
            30..55 => self.upstream_answers(),
            55..67 => self.upstream_notifies(),
            67..77 => self.opening_finishes(),
            77..80 => self.upstream_drops(),
            80..90 => self.coin_changes(),
            _ => {
                self.now += self.rng.random_range(0..30_000);
                self.relay.on_tick(self.now);
            }
        }
        self.take_actions();
    }

    /// Lets everything settle: opens finish, every request is answered, windows pass.
    fn settle(&mut self) {
        for _ in 0..1_000 {
            if self.ended {
                return;
            }
            if self.relay.opening().is_some() {
                let id = self.relay.opening().map(|o| o.id).unwrap_or_default();
                let conn = self.conns.get_mut(&id).expect("conn");
                conn.opened = true;
                conn.authorized.insert(
                    self.relay.login.params[0]
                        .as_str()
                        .unwrap_or("")
                        .to_string(),
                );
                let opened = Opened {
                    suffixed: false,
                    user_suffix: conn.coin.clone(),
                    allowed_mask: None,
                    held: Vec::new(),
                };
                self.relay.on_opened(id, opened, self.now);
                self.take_actions();
                continue;
            }
            let busy: Vec<_> = self
                .open_conns(true)
                .into_iter()
                .filter(|i| !self.conns[i].inbox.is_empty())
                .collect();
            if let Some(id) = busy.first() {
                self.answer_one(*id);
                self.take_actions();
                continue;
            }
            self.now += DRAIN_WINDOW_MS + 1;
            self.relay.on_tick(self.now);
            self.take_actions();
            if self.relay.draining.is_empty() {
                return;
            }
        }
        panic!("the session did not settle");
    }

    /// Shares counted so far, every coin and outcome.
    fn shares_counted(&self) -> u64 {
        COINS
            .iter()
            .filter_map(|c| self.metrics.coin(c))
            .map(|c| ShareOutcome::ALL.iter().map(|o| c.shares(*o)).sum::<u64>())
            .sum()
    }

    fn check_end(&mut self) {
        if self.ended {
            // The miner was closed: nothing more is owed to it. Submits still queued for an
            // upstream that never opened were never sent anywhere: not counted.
            self.relay.end();
            assert!(
                self.shares_counted() <= self.submits_sent,
                "{} shares counted, {} sent",
                self.shares_counted(),
                self.submits_sent
            );
            return;
        }
        assert_eq!(
            self.shares_counted(),
            self.submits_sent,
            "every submit counted once by outcome"
        );
        let ids: HashSet<&String> = self.sent.keys().chain(self.answers.keys()).collect();
        for id in ids {
            let sent = self.sent.get(id).copied().unwrap_or(0);
            let got = self.answers.get(id).copied().unwrap_or(0);
            assert_eq!(sent, got, "id {id}: {sent} requests, {got} answers");
        }
        let current = self
            .relay
            .current()
            .expect("an upstream serves after settling");
        let conn = &self.conns[&current.id];
        for worker in &self.authorized {
            assert!(
                conn.authorized.contains(worker),
                "worker {worker} is not authorized on the current upstream {} ({}): {:?}",
                current.id,
                conn.coin,
                conn.authorized
            );
        }
        // The state is plain data: it survives a round trip through JSON.
        let snapshot = SessionSnapshot {
            relay: self.relay.clone(),
            miner_partial: Bytes::from_static(b"{\"id\":5,\"meth"),
            upstream_partials: vec![(current.id, Bytes::from_static(b"{\"id\":null,"))],
        };
        let text = serde_json::to_string(&snapshot).expect("serialize");
        let back: SessionSnapshot = serde_json::from_str(&text).expect("deserialize");
        assert_eq!(back, snapshot, "the session state survives serialization");
    }
}

/// A difficulty that names its coin: 1000 × the coin's index, plus a little.
fn difficulty_of(coin: &str) -> u64 {
    let index = COINS.iter().position(|c| *c == coin).unwrap_or(0) as u64;
    index * 1000 + 512
}

fn notify_line(job: &str, clean: bool) -> Bytes {
    Bytes::from(
        json!({"id": null, "method": "mining.notify",
               "params": [job, "prev", "cb1", "cb2", [], "20000000", "1d00ffff", "5f5e1000", clean]})
        .to_string(),
    )
}

fn run_case(seed: u64, steps: usize) {
    let mut world = World::new(seed);
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        for step in 0..steps {
            if world.ended {
                break;
            }
            world.step();
            if step % 50 == 0 {
                // What a hot upgrade writes and the new image reads back is the same relay.
                let json = serde_json::to_string(&world.relay).expect("the relay serializes");
                let back: Relay = serde_json::from_str(&json).expect("and reads back");
                assert_eq!(back, world.relay, "the relay survives a round trip: {json}");
            }
        }
        world.settle();
        world.check_end();
    }));
    if let Err(panic) = outcome {
        let start = world.log.len().saturating_sub(60);
        for entry in &world.log[start..] {
            eprintln!("  {entry}");
        }
        let message = panic
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default();
        panic!("model case failed with seed {seed} (SWITCHYARD_MODEL_SEED={seed}): {message}");
    }
}

#[test]
fn the_relay_keeps_its_guarantees_under_random_interleavings() {
    if let Some(seed) = std::env::var("SWITCHYARD_MODEL_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
    {
        return run_case(seed, 400);
    }
    let cases: u64 = std::env::var("SWITCHYARD_MODEL_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(300);
    for seed in 0..cases {
        run_case(seed, 400);
    }
}

/// Seen in the benchmark's stress run (29 of 4,000 session-switches, on a slow machine): the
/// old coin's upstream announces a clean job, owes nothing and is closed; a share the miner found
/// on one of its jobs reaches the proxy just after, and went to the new coin's sserver.
#[test]
fn a_share_of_a_closed_old_coins_job_is_answered_stale_not_sent_to_the_new_coin() {
    let mut world = World::new(7);
    switch_and_retire(&mut world, "bch", 1, 0);
    let answer = answered_by_the_proxy(&mut world, 77, "btc-0-0");
    assert_eq!(answer["id"], json!(77));
    assert_eq!(answer["error"][0], json!(21), "{answer}");
    let btc = world.metrics.coin("btc").expect("btc's series");
    assert_eq!(
        btc.shares(ShareOutcome::Stale),
        1,
        "counted as btc's stale share"
    );
}

/// Switches the world's session to `coin` on upstream `id` and lets the upstream it leaves
/// declare its jobs stale (a clean job), so that it closes owing nothing.
fn switch_and_retire(world: &mut World, coin: &str, id: UpstreamId, left: UpstreamId) {
    world.relay.on_coin_changed(coin, true);
    world.take_actions();
    let conn = world.conns.get_mut(&id).expect("the new coin being opened");
    conn.opened = true;
    conn.authorized.insert("alice.w0".into());
    let opened = Opened {
        suffixed: false,
        user_suffix: coin.into(),
        allowed_mask: None,
        held: vec![notify_line(&format!("{coin}-{id}-0"), true)],
    };
    world.relay.on_opened(id, opened, world.now);
    world.take_actions();
    assert!(
        world.relay.draining.iter().any(|d| d.upstream.id == left),
        "the old upstream kept for its jobs"
    );
    let mut clean = notify_line(&format!("{coin}-{left}-9"), true).to_vec();
    clean.push(b'\n');
    world
        .relay
        .on_upstream_line(left, Bytes::from(clean), world.now);
    world.take_actions();
    assert!(
        world.relay.draining.is_empty(),
        "the old upstream's jobs are stale and it owes nothing: closed"
    );
}

/// The proxy's own answer to a share of `job` under `id`: the share must reach no upstream.
fn answered_by_the_proxy(world: &mut World, id: u32, job: &str) -> Value {
    let submit = format!(
        "{}\n",
        json!({"id": id, "method": "mining.submit",
               "params": ["alice.w0", job, "00", "01", "02"]})
    );
    world.relay.on_miner_line(Bytes::from(submit), &Names);
    let actions = world.relay.take_actions();
    assert!(
        !actions.iter().any(|a| matches!(a, Action::ToUpstream(..))),
        "a share of {job} went to an upstream: {actions:?}"
    );
    actions
        .iter()
        .find_map(|a| match a {
            Action::ToMiner(line) => serde_json::from_slice::<Value>(line).ok(),
            _ => None,
        })
        .expect("the share is answered")
}

#[test]
fn after_two_switches_a_share_of_the_first_coins_job_is_still_answered_stale() {
    let mut world = World::new(11);
    // btc (0) → bch (1), btc declares its jobs stale; bch → ltc (2), bch does too.
    switch_and_retire(&mut world, "bch", 1, 0);
    switch_and_retire(&mut world, "ltc", 2, 1);

    // A btc share the miner found before it had any other coin's work reaches the proxy now.
    let answer = answered_by_the_proxy(&mut world, 78, "btc-0-0");
    assert_eq!(answer["error"][0], json!(21), "{answer}");
    let btc = world.metrics.coin("btc").expect("btc's series");
    assert_eq!(btc.shares(ShareOutcome::Stale), 1, "a stale share of btc");

    // A bch share too, counted on bch.
    let answer = answered_by_the_proxy(&mut world, 79, "bch-1-0");
    assert_eq!(answer["error"][0], json!(21), "{answer}");
    let bch = world.metrics.coin("bch").expect("bch's series");
    assert_eq!(bch.shares(ShareOutcome::Stale), 1, "a stale share of bch");
}
