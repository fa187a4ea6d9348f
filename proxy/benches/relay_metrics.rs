//! What the metrics cost the relay, in user space and in isolation (issue 15): the relay state
//! machine ([`switchyard_proxy::relay::Relay`]) takes a miner's submit and the sserver's
//! answer, over and over, with the proxy's metrics attached (the share counted by outcome, the
//! submit's round trip timed into the coin's histogram) and without, in alternating rounds on
//! one thread. No sockets: the difference is the metrics' own CPU per submit, to set against
//! the proxy's whole CPU per submit in `cargo bench -p switchyard-tests --bench proxy` (part 3,
//! kernel included).
//!
//! ```sh
//! cargo bench -p switchyard-proxy --bench relay_metrics
//! ```

use std::{
    hint::black_box,
    time::{Duration, Instant},
};

use bytes::Bytes;
use switchyard_proxy::{
    handshake::{Handshake, NameRules, Step},
    metrics::Metrics,
    relay::{Opened, Relay, RelaySettings},
    session_id::{ChainType, SessionId},
};

struct Names;

impl NameRules for Names {
    fn case_insensitive(&self) -> bool {
        false
    }
    fn canonical_name(&self, _lowercase: &str) -> Option<String> {
        None
    }
}

/// Submits per round.
const SUBMITS: usize = 200_000;
/// Rounds of each kind, alternating.
const ROUNDS: usize = 9;

fn relay(metered: bool) -> Relay {
    let mut hs = Handshake::new(ChainType::Bitcoin, SessionId(0x0100_0080), 1);
    let subscribe = br#"{"id":1,"method":"mining.subscribe","params":["cgminer/4.11"]}"#;
    assert!(matches!(hs.on_line(subscribe, &Names), Step::Reply(_)));
    let auth = br#"{"id":2,"method":"mining.authorize","params":["alice.w0","x"]}"#;
    let Step::Login(login) = hs.on_line(auth, &Names) else {
        panic!("login expected");
    };
    let job = br#"{"id":null,"method":"mining.notify","params":["btc-1","prev","cb1","cb2",[],"20000000","1d00ffff","5f5e1000",true]}"#;
    let mut relay = Relay::start(
        hs,
        login,
        "btc".into(),
        Opened {
            suffixed: false,
            user_suffix: "btc".into(),
            allowed_mask: None,
            held: vec![Bytes::from_static(job)],
        },
        r#"{"id":2,"result":true,"error":null}"#.into(),
        Vec::new(),
        RelaySettings {
            drain_window_ms: 60_000,
        },
    );
    if metered {
        relay.attach_metrics(&Metrics::new(["btc", "bch"]));
    }
    relay.take_actions();
    relay
}

/// One round: `SUBMITS` submits and their answers; the time per submit.
fn round(relay: &mut Relay, submits: &[Bytes], answers: &[Bytes]) -> Duration {
    let started = Instant::now();
    for i in 0..SUBMITS {
        let k = i % submits.len();
        relay.on_miner_line(submits[k].clone(), &Names);
        black_box(relay.take_actions());
        relay.on_upstream_line(0, answers[k].clone(), 0);
        black_box(relay.take_actions());
    }
    started.elapsed() / SUBMITS as u32
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort_unstable();
    v[v.len() / 2]
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    // Miners number their requests: ids 10 to 17 in turn, each answered before the next.
    let submits: Vec<Bytes> = (10..18)
        .map(|id| {
            Bytes::from(format!(
                "{{\"id\":{id},\"method\":\"mining.submit\",\"params\":[\"alice.w0\",\"btc-1\",\"0000000000000000\",\"5f5e1000\",\"00000000\"]}}\n"
            ))
        })
        .collect();
    let answers: Vec<Bytes> = (10..18)
        .map(|id| Bytes::from(format!("{{\"id\":{id},\"result\":true,\"error\":null}}\n")))
        .collect();
    let mut plain = relay(false);
    let mut metered = relay(true);
    // Warm-up.
    round(&mut plain, &submits, &answers);
    round(&mut metered, &submits, &answers);
    let (mut without, mut with) = (Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        without.push(round(&mut plain, &submits, &answers));
        with.push(round(&mut metered, &submits, &answers));
    }
    let (without, with) = (median(without), median(with));
    println!(
        "relay, one submit and its answer (user space, no sockets), median of {ROUNDS} rounds of \
         {SUBMITS}: without metrics {} ns, with metrics {} ns, the metrics' cost {} ns per submit",
        without.as_nanos(),
        with.as_nanos(),
        with.as_nanos() as i128 - without.as_nanos() as i128
    );
}
