//! The relay of one logged-in session as a state machine over plain data, apart from sockets
//! and futures (SPEC §4). The session task ([`crate::session`]) owns the sockets; it feeds this
//! machine what happened (a line from the miner, a line from an upstream, an upstream opened,
//! failed or lost, the user's coin changed, time passed) and carries out the [`Action`]s it
//! returns (write these bytes to the miner or to an upstream, open an upstream, close one, end
//! the session). Because [`Relay`] is data with serde derives, a hot upgrade can write it out
//! and read it back ([`SessionSnapshot`] adds the partial lines held by the sockets' readers),
//! and a model test (`proxy/tests/relay_model.rs`) drives it with a seeded generator.
//!
//! # States
//!
//! [`Phase`] says what the session is doing:
//!
//! - **`Relaying { current }`**: one upstream serves the session.
//! - **`Switching { current, opening }`**: the user's coin changed; an upstream to the new coin
//!   is being opened while `current` still serves (the miner's lines go to it: they name its
//!   jobs).
//! - **`Reconnecting { opening, queued }`**: the upstream was lost; one to the user's coin is
//!   being opened; the miner's lines wait in `queued` (bounded: [`MAX_QUEUED_LINES`], then the
//!   miner is not read).
//!
//! Beside the phase, [`Relay::draining`] holds the old upstreams of earlier switches (at most
//! [`MAX_DRAINS`]): each still answers what it was sent and takes the shares of its own jobs,
//! but nothing it announces reaches the miner.
//!
//! # Transitions
//!
//! | from | event | to |
//! |---|---|---|
//! | `Relaying{c}` | coin changed to X ≠ c.coin, X has an sserver | `Switching{c, open X}` |
//! | `Switching{c, o}` | coin changed back to c.coin | `Relaying{c}`, the open of o cancelled |
//! | `Switching{c, o}` | coin changed to Y ∉ {c, o} | `Switching{c, open Y}`, o cancelled |
//! | `Switching{c, o}` | o opened | `Relaying{o}`, c drained |
//! | `Switching{c, o}` | o failed | session ends (the miner reconnects and lands on the user's coin) |
//! | `Switching{c, o}` | c lost | `Reconnecting{o}` |
//! | `Relaying{c}` | c lost | `Reconnecting{open c.coin}` |
//! | `Reconnecting{o, q}` | coin changed to Y ≠ o.coin | `Reconnecting{open Y, q}`, o cancelled |
//! | `Reconnecting{o, q}` | o opened | `Relaying{o}`, q sent to it |
//! | `Reconnecting{o, q}` | o failed | session ends |
//! | any | a coin without an sserver, or the coin it is on or going to | unchanged |
//! | any | a BTCAgent session's coin changed | session ends |
//!
//! Opening an upstream to a coin whose old upstream is still drained closes that drain first,
//! so that one sserver never holds two connections with one session ID.
//!
//! A drained upstream is closed when it announced a `clean_jobs` job (its jobs are stale) and
//! owes nothing, when the drain window ends ([`RelaySettings::drain_window_ms`]), when it is lost,
//! when more than [`MAX_DRAINS`] are held (the oldest goes), or when the process runs short of
//! file descriptors ([`Relay::drop_drains`]).
//!
//! # Who owes the miner which answer
//!
//! Every request the miner sends with an id is counted on the upstream it went to
//! ([`UpstreamState::owed`], a count per id: miners reuse ids freely). An answer from an
//! upstream with an id it owes goes to the miner and is counted off; an answer nobody owes is
//! relayed from the current upstream and dropped from a drained one. Authorize requests are
//! sent under the proxy's own ids ([`Pending`]) so that their answers say which workers to
//! replay; the proxy's replays are answered to the proxy only. When an upstream is closed or
//! lost while it still owes answers, the proxy answers those requests itself with an error, and
//! authorize requests are sent again to the next upstream: every request gets exactly one
//! answer.
//!
//! # Shares go to the coin of their job
//!
//! Each upstream remembers the jobs it announced to the miner ([`UpstreamState::jobs`], digests,
//! at most [`MAX_JOBS`]): `mining.notify` params\[0\], and for Ethereum the header hash of ETHProxy
//! work. A `mining.submit` or `eth_submitWork` (job: params\[1\]) goes to the upstream that
//! announced its job, drained or not. When that was an old upstream of another coin which has
//! since closed or announced a clean job, the proxy answers the share stale itself, as that
//! sserver would (error 21, counted as a stale share of that coin; [`RetiredCoins`]: the jobs
//! of such upstreams, per coin, for the last [`MAX_RETIRED_COINS`] coins): sent on, it would
//! reach another coin's sserver. Any other job nobody holds goes to the current upstream.
//!
//! # Shares and switches for the metrics
//!
//! With the proxy's metrics attached ([`Relay::attach_metrics`]; never in the model test),
//! every submit counted in flight is also remembered with its send time
//! ([`UpstreamState::submits`]) and counted once when it ends
//! ([`crate::metrics::ShareOutcome`]): by the answer of its upstream (accepted; rejected or
//! stale by the error code; `draining` when it went to a drained upstream), or unanswered
//! when its upstream or the session ends first. After a switch or a reconnect, the new
//! upstream's first job written to the miner is announced with [`Action::FirstJob`]: where
//! the session's switch latency ends.

#![forbid(unsafe_code)]

use std::{collections::VecDeque, fmt, sync::Arc};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use smallvec::SmallVec;

use crate::{
    handshake::{Handshake, Login, NameRules, Request, error_line, normalize_worker, result_line},
    message::{Line, job_digest},
    metrics::{CoinMetrics, Metrics, STALE_CODE, ShareOutcome, UpstreamFailure},
    session_id::ChainType,
    upstream::suffixed_worker,
};

/// The most miner lines queued while reconnecting; beyond it the miner is not read until the
/// new upstream is up (TCP holds the rest).
pub const MAX_QUEUED_LINES: usize = 64;

/// The most workers a session authorizes besides its login (mining proxies multiplex their
/// workers over one connection); later ones are relayed without being replayed on a switch.
pub const MAX_WORKERS: usize = 256;

/// The most old upstreams one session drains at once; a switch beyond it closes the oldest.
pub const MAX_DRAINS: usize = 4;

/// The most jobs remembered per upstream (the oldest are forgotten first), and per coin once
/// its upstreams closed ([`RetiredCoins`]).
pub const MAX_JOBS: usize = 32;

/// The most coins whose closed upstreams' jobs a session remembers ([`RetiredCoins`]); beyond
/// it the coin left longest ago is forgotten.
pub const MAX_RETIRED_COINS: usize = 4;

/// The most requests the proxy has in flight under its own ids per upstream; beyond it, the
/// miner's authorize is answered with an error instead of being relayed.
pub const MAX_PENDING: usize = 512;

/// The most miner requests counted in flight per upstream. A miner with more unanswered
/// requests than this (one flooding a stalled sserver) has the rest relayed untracked: they are
/// answered if the upstream answers while it serves, and memory stays bounded (the proxy's own
/// answers for a lost upstream are at most this many lines).
pub const MAX_OWED: u32 = 1024;

/// The id prefix of requests the proxy sends under its own ids.
const PROXY_ID_PREFIX: &str = "sy-";

/// Error code of the answers the proxy gives itself for requests an upstream cannot answer
/// any more (btcpool's 20, "Other/Unknown").
const ERR_UNANSWERED: i64 = 20;

/// A number naming one upstream connection of a session.
pub type UpstreamId = u32;

/// Settings of the relay.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RelaySettings {
    /// How long an old upstream is kept after a switch for the shares of its jobs, in ms.
    pub drain_window_ms: u64,
}

/// A worker the connection authorized besides its login: the login method and its params,
/// `params[0]` the normalized `sub.miner` name (without a suffix).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Worker {
    /// `mining.authorize` or `eth_submitLogin`.
    pub method: String,
    /// The params.
    pub params: Vec<Value>,
}

impl Worker {
    fn name(&self) -> Option<&str> {
        self.params.first().and_then(Value::as_str)
    }
}

/// [`Relay::worker_names`]: written when formatted, nothing allocated before.
#[derive(Debug, Clone, Copy)]
pub struct WorkerNames<'a>(&'a Relay);

impl fmt::Display for WorkerNames<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let login = &self.0.login;
        write!(f, "{}{}", login.sub_account, login.miner_name)?;
        for name in self.0.workers.iter().filter_map(Worker::name) {
            write!(f, ",{name}")?;
        }
        Ok(())
    }
}

/// What a request sent under the proxy's own id is for.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ProxyRequest {
    /// The miner's authorize: its answer goes to the miner under `miner_id`; on success the
    /// worker is replayed on every later upstream.
    MinerAuth {
        /// The miner's id.
        miner_id: Value,
        /// The worker.
        worker: Worker,
    },
    /// A replayed authorize or `mining.suggest_difficulty`: its answer is the proxy's.
    Replay,
}

/// A request in flight under the proxy's id `sy-<id>`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Pending {
    /// The number in the id.
    pub id: u64,
    /// What it is for.
    pub request: ProxyRequest,
}

/// A request id's JSON text. Ids are nearly always short (`1`, `"42"`): those are kept in
/// place, so tracking a request in flight allocates nothing; longer ones on the heap.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "String", into = "String")]
pub struct IdText(IdRepr);

#[derive(Clone, PartialEq, Eq)]
enum IdRepr {
    /// Up to [`INLINE_ID`] bytes, in place.
    Inline { len: u8, bytes: [u8; INLINE_ID] },
    /// Longer.
    Heap(Box<str>),
}

/// The longest id kept in place.
const INLINE_ID: usize = 22;

impl IdText {
    /// The id `text`.
    pub fn new(text: &str) -> Self {
        if text.len() <= INLINE_ID {
            let mut bytes = [0u8; INLINE_ID];
            bytes[..text.len()].copy_from_slice(text.as_bytes());
            Self(IdRepr::Inline {
                len: text.len() as u8,
                bytes,
            })
        } else {
            Self(IdRepr::Heap(text.into()))
        }
    }

    /// The text's bytes.
    pub fn as_bytes(&self) -> &[u8] {
        match &self.0 {
            IdRepr::Inline { len, bytes } => &bytes[..usize::from(*len)],
            IdRepr::Heap(text) => text.as_bytes(),
        }
    }

    /// The text.
    pub fn as_str(&self) -> &str {
        match &self.0 {
            // Always whole UTF-8: copied from a `&str` of at most INLINE_ID bytes.
            IdRepr::Inline { len, bytes } => {
                std::str::from_utf8(&bytes[..usize::from(*len)]).unwrap_or_default()
            }
            IdRepr::Heap(text) => text,
        }
    }
}

impl fmt::Debug for IdText {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

impl From<String> for IdText {
    fn from(text: String) -> Self {
        Self::new(&text)
    }
}

impl From<IdText> for String {
    fn from(id: IdText) -> Self {
        id.as_str().to_owned()
    }
}

/// Miner requests in flight with one id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Owed {
    /// The id as JSON text.
    pub id: IdText,
    /// How many requests with this id await their answer.
    pub count: u32,
}

/// A submit in flight (tracked only with metrics attached): its id, when the proxy read it
/// (µs on the system's monotonic clock, which a hot upgrade's next image shares), and whether
/// it went to a drained upstream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InFlightSubmit {
    /// The id as JSON text.
    pub id: IdText,
    /// When the miner's line was read, µs on the monotonic clock ([`clock_us`]).
    pub at_us: u64,
    /// Routed to a drained upstream (a job of an old coin).
    pub drained: bool,
}

/// The system's monotonic clock in µs (`CLOCK_MONOTONIC`, the same for every process of the
/// machine: submits in flight keep their times across a hot upgrade).
pub fn clock_us() -> u64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    (t.tv_sec as u64)
        .saturating_mul(1_000_000)
        .saturating_add(t.tv_nsec as u64 / 1_000)
}

/// The series an upstream counts on, its coin's (not part of the relay's state: a hot
/// upgrade's next image attaches its own). Compares equal to any other.
#[derive(Clone, Default)]
pub struct CoinMeter(Option<Arc<CoinMetrics>>);

impl PartialEq for CoinMeter {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl fmt::Debug for CoinMeter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.0.is_some() { "metered" } else { "-" })
    }
}

/// The proxy's metrics, for the relay to resolve its upstreams' coins with (not part of its
/// state). Compares equal to any other.
#[derive(Clone, Default)]
struct Meters(Option<Arc<Metrics>>);

impl PartialEq for Meters {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl fmt::Debug for Meters {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.0.is_some() { "metered" } else { "-" })
    }
}

impl Meters {
    fn coin(&self, coin: &str) -> CoinMeter {
        CoinMeter(self.0.as_ref().and_then(|m| m.coin(coin)))
    }
}

/// The error code of an answer's `error` (JSON text): `[code, message, data]` or
/// `{"code": code, ...}`.
fn error_code(error: &str) -> Option<i64> {
    match serde_json::from_str::<Value>(error).ok()? {
        Value::Array(items) => items.first()?.as_i64(),
        Value::Object(fields) => fields.get("code")?.as_i64(),
        _ => None,
    }
}

/// One upstream connection as data (its socket lives in the session task). The fields read on
/// every line come first, in declaration order (`repr(C)`): they share two cache lines rather
/// than being spread over the whole struct (the session's state is cold when a line wakes it).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[repr(C)]
pub struct UpstreamState {
    /// Its number.
    pub id: UpstreamId,
    /// The sum of the counts in `owed` (at most [`MAX_OWED`]).
    pub owed_total: u32,
    /// Its login needed the `sub_SUFFIX` retry: replayed workers carry the suffix.
    pub suffixed: bool,
    /// Its coin's series.
    #[serde(skip)]
    pub meter: CoinMeter,
    /// Miner requests it owes answers to (the first two in place: a miner has one or two in
    /// flight nearly always, and their entries then share the relay's memory, no allocation of
    /// their own to fetch on every line).
    pub owed: SmallVec<[Owed; 2]>,
    /// Digests of the jobs it announced to the miner.
    pub jobs: JobDigests,
    /// Submits in flight, oldest first (with metrics attached only; see the module doc), the
    /// first two in place like `owed`.
    #[serde(default)]
    pub submits: SmallVec<[InFlightSubmit; 2]>,
    /// Its coin.
    pub coin: String,
    /// The suffix of its coin.
    pub user_suffix: String,
    /// The proxy's requests awaiting its answer.
    pub pending: Vec<Pending>,
}

impl UpstreamState {
    fn new(id: UpstreamId, coin: String, opened: &Opened) -> Self {
        Self {
            id,
            coin,
            suffixed: opened.suffixed,
            user_suffix: opened.user_suffix.clone(),
            owed: SmallVec::new(),
            owed_total: 0,
            pending: Vec::new(),
            jobs: JobDigests::default(),
            submits: SmallVec::new(),
            meter: CoinMeter::default(),
        }
    }

    /// Counts a request in flight; whether it was counted (not beyond [`MAX_OWED`]).
    fn owe(&mut self, id: &str) -> bool {
        if self.owed_total >= MAX_OWED {
            return false;
        }
        self.owed_total += 1;
        match self
            .owed
            .iter_mut()
            .find(|o| o.id.as_bytes() == id.as_bytes())
        {
            Some(o) => o.count += 1,
            None => self.owed.push(Owed {
                id: IdText::new(id),
                count: 1,
            }),
        }
        true
    }

    /// Remembers a submit sent to it (with metrics attached).
    fn track_submit(&mut self, id: &str, drained: bool) {
        if self.meter.0.is_some() {
            self.submits.push(InFlightSubmit {
                id: IdText::new(id),
                at_us: clock_us(),
                drained,
            });
        }
    }

    /// It answered `id`, which it owed: when that was a submit, counts the share's outcome
    /// and round trip.
    fn share_answered(&mut self, id: &str, read: &Line<'_>) {
        if self.submits.is_empty() {
            return;
        }
        let Some(i) = self
            .submits
            .iter()
            .position(|s| s.id.as_bytes() == id.as_bytes())
        else {
            return;
        };
        let submit = self.submits.remove(i);
        let Some(meter) = &self.meter.0 else {
            return;
        };
        meter.submit_took(clock_us().saturating_sub(submit.at_us) as f64 / 1e6);
        let outcome = if read.result == Some("true") {
            ShareOutcome::Accepted
        } else {
            let code = read.error.and_then(error_code);
            meter.reject(code);
            if code == Some(STALE_CODE) {
                ShareOutcome::Stale
            } else {
                ShareOutcome::Rejected
            }
        };
        meter.share(if submit.drained {
            ShareOutcome::Draining
        } else {
            outcome
        });
    }

    /// Its submits in flight will never be answered (it is closed or lost, or the session
    /// ends).
    fn abandon_submits(&mut self) {
        if let Some(meter) = &self.meter.0 {
            for _ in self.submits.drain(..) {
                meter.share(ShareOutcome::Unanswered);
            }
        }
    }

    /// Counts off one answer to `id`; whether one was owed.
    fn answered(&mut self, id: &str) -> bool {
        let Some(i) = self
            .owed
            .iter()
            .position(|o| o.id.as_bytes() == id.as_bytes())
        else {
            return false;
        };
        self.owed[i].count -= 1;
        self.owed_total = self.owed_total.saturating_sub(1);
        if self.owed[i].count == 0 {
            self.owed.swap_remove(i);
        }
        true
    }

    fn owes_nothing(&self) -> bool {
        self.owed.is_empty() && self.pending.is_empty()
    }
}

/// The digests of the jobs an upstream announced, oldest first, at most [`MAX_JOBS`]. The
/// newest is also kept in place: nearly every share names it, and finding it then reads no
/// memory but the relay's own. Written and read as the list of digests.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "VecDeque<u64>", into = "VecDeque<u64>")]
pub struct JobDigests {
    newest: Option<u64>,
    all: VecDeque<u64>,
}

impl JobDigests {
    /// Whether `digest` is one of them.
    pub fn contains(&self, digest: u64) -> bool {
        // Newest first: nearly every share names the latest job.
        self.newest == Some(digest) || self.all.iter().rev().any(|&j| j == digest)
    }

    /// Adds the job `digest`; a clean job (`clean_jobs`) forgets the others first.
    pub fn add(&mut self, digest: u64, clean: bool) {
        if clean {
            self.clear();
        }
        if self.newest == Some(digest) {
            return;
        }
        if self.all.len() >= MAX_JOBS {
            self.all.pop_front();
        }
        self.all.push_back(digest);
        self.newest = Some(digest);
    }

    /// Forgets them all.
    pub fn clear(&mut self) {
        self.all.clear();
        self.newest = None;
    }

    /// Whether there is none.
    pub fn is_empty(&self) -> bool {
        self.newest.is_none()
    }
}

impl From<VecDeque<u64>> for JobDigests {
    fn from(mut all: VecDeque<u64>) -> Self {
        while all.len() > MAX_JOBS {
            all.pop_front();
        }
        Self {
            newest: all.back().copied(),
            all,
        }
    }
}

impl From<JobDigests> for VecDeque<u64> {
    fn from(jobs: JobDigests) -> Self {
        jobs.all
    }
}

/// An upstream being opened.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Opening {
    /// The number it will have.
    pub id: UpstreamId,
    /// Its coin.
    pub coin: String,
}

/// What the session is doing; see the module doc.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Phase {
    /// One upstream serves.
    Relaying {
        /// It.
        current: UpstreamState,
    },
    /// An upstream to the new coin is being opened; `current` still serves.
    Switching {
        /// The upstream that serves meanwhile.
        current: UpstreamState,
        /// The one being opened.
        opening: Opening,
    },
    /// The upstream was lost; another is being opened.
    Reconnecting {
        /// The one being opened.
        opening: Opening,
        /// Miner lines waiting for it.
        queued: VecDeque<Bytes>,
    },
}

/// An old upstream kept after a switch; see the module doc.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Drain {
    /// The upstream.
    pub upstream: UpstreamState,
    /// When it is closed whatever it still owes (ms since the Unix epoch).
    pub until_ms: u64,
    /// It announced a clean job: its jobs are stale, it is closed once it owes nothing.
    pub stale: bool,
}

/// An upstream that finished its login (from [`crate::upstream::Upstream`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Opened {
    /// Its login needed the suffix.
    pub suffixed: bool,
    /// The suffix of its coin.
    pub user_suffix: String,
    /// The version mask it allows.
    pub allowed_mask: Option<u32>,
    /// Lines it sent during the login (difficulty, jobs), raw without `\n`.
    pub held: Vec<Bytes>,
}

/// Why the relay ends the session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RelayEnd {
    /// A BTCAgent session's coin changed: it is closed instead of switched.
    BtcAgentSwitched,
    /// The upstream being opened could not be opened.
    OpenFailed,
}

/// What the session task must do, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Write these whole lines to the miner.
    ToMiner(Bytes),
    /// Write these whole lines to an upstream.
    ToUpstream(UpstreamId, Bytes),
    /// Open an upstream to a coin (with the session's login).
    Open {
        /// Its number.
        id: UpstreamId,
        /// The coin.
        coin: String,
        /// A reconnect rather than a switch.
        reconnect: bool,
    },
    /// Stop opening this upstream.
    CancelOpen(UpstreamId),
    /// Close this upstream.
    Close(UpstreamId),
    /// A switch or reconnect ended: for the metrics and the log (boxed: it is rare, and the
    /// actions of every line are as large as their largest kind).
    Outcome(Box<SwitchOutcome>),
    /// The first job of the upstream opened by a switch or a reconnect was just written to
    /// the miner (with the actions before this one).
    FirstJob,
    /// End the session.
    End(RelayEnd),
}

/// How a switch or reconnect ended ([`Action::Outcome`]).
#[derive(Debug, Clone, PartialEq)]
pub struct SwitchOutcome {
    /// The coin.
    pub coin: String,
    /// `switch` or `reconnect`.
    pub kind: &'static str,
    /// `ok`, `failed`, `no_sserver`, `closed_btcagent`, `cancelled`.
    pub outcome: &'static str,
}

impl Action {
    fn outcome(coin: String, kind: &'static str, outcome: &'static str) -> Self {
        Self::Outcome(Box::new(SwitchOutcome {
            coin,
            kind,
            outcome,
        }))
    }
}

/// Actions taken at once: nearly always one or two (a line to relay, an answer), kept in place.
pub type Actions = smallvec::SmallVec<[Action; 2]>;

/// The relay state of one logged-in session; see the module doc. Everything here survives a
/// hot upgrade. What every line reads comes first, in declaration order (`repr(C)`), the
/// login's data last: see [`UpstreamState`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[repr(C)]
pub struct Relay {
    /// Actions not yet taken by the session task.
    #[serde(skip)]
    out: Actions,
    /// The metrics, when attached.
    #[serde(skip)]
    meters: Meters,
    /// Settings.
    pub settings: RelaySettings,
    /// Old upstreams, oldest first.
    pub draining: Vec<Drain>,
    /// The handshake: SID, dialect, agent, version mask.
    pub hs: Handshake,
    /// What the session is doing.
    pub phase: Phase,
    /// The next proxy request id.
    pub next_request: u64,
    /// The next upstream number.
    pub next_upstream: UpstreamId,
    /// The jobs of the old upstreams of the session that closed or declared them stale, per
    /// coin (on the heap only once one has: most sessions never switch).
    #[serde(default)]
    pub retired: Option<Box<RetiredCoins>>,
    /// Authorize requests whose upstream was lost, to send to the next one.
    pub orphans: Vec<Pending>,
    /// The login.
    pub login: Login,
    /// Further workers authorized successfully.
    pub workers: Vec<Worker>,
    /// The params of the miner's last `mining.suggest_difficulty`.
    pub suggested_difficulty: Option<Vec<Value>>,
    /// An upstream opened by a switch or a reconnect serves, and none of its jobs has reached
    /// the miner yet ([`Action::FirstJob`] when one does).
    #[serde(default)]
    pub awaiting_first_job: bool,
}

/// Everything a session is, as data: its relay state and the bytes of any line not finished
/// yet on either side (they live in the sockets' readers). What a hot upgrade writes for each
/// session and reads back, beside the sockets it hands over.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SessionSnapshot {
    /// The relay state.
    pub relay: Relay,
    /// The start of the miner's next line.
    pub miner_partial: Bytes,
    /// The start of the next line of each upstream (current and drained).
    pub upstream_partials: Vec<(UpstreamId, Bytes)>,
}

/// The jobs of an old upstream that closed or declared them stale (a `clean_jobs` job), with
/// its coin: a share of one of them that reaches the proxy afterwards (the miner found it
/// before it got the new coin's work) is answered stale by the proxy, as that upstream's
/// sserver would, rather than sent to another coin's sserver (docs/stratum.md).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RetiredJobs {
    /// Their coin.
    pub coin: String,
    /// Their digests.
    pub digests: JobDigests,
}

/// The jobs of a session's old upstreams that closed or declared them stale, one entry per
/// coin, the coin left last at the end: at most [`MAX_RETIRED_COINS`] coins of at most
/// [`MAX_JOBS`] jobs each. After A→B→C, a share of an A job that reaches the proxy once both A
/// and B have closed is still known as A's.
///
/// Written as the last entry with the others under `earlier` (`RetiredForm`): the version
/// before kept one entry, in that shape without `earlier`, so a hot upgrade from it reads, and
/// a rollback to it reads the last entry and ignores the rest.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(from = "RetiredForm", into = "RetiredForm")]
pub struct RetiredCoins(Vec<RetiredJobs>);

/// [`RetiredCoins`] as written: its last entry, and the entries before it.
#[derive(Serialize, Deserialize)]
struct RetiredForm {
    #[serde(flatten)]
    last: RetiredJobs,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    earlier: Vec<RetiredJobs>,
}

impl From<RetiredForm> for RetiredCoins {
    fn from(form: RetiredForm) -> Self {
        let RetiredForm { last, earlier } = form;
        let mut coins = Self::default();
        for entry in earlier.into_iter().chain([last]) {
            if !entry.digests.is_empty() {
                coins.add(entry);
            }
        }
        coins
    }
}

impl From<RetiredCoins> for RetiredForm {
    fn from(coins: RetiredCoins) -> Self {
        let mut earlier = coins.0;
        // Never empty in a session (`None` until an upstream retires jobs); an empty one is
        // written as an entry without jobs, which reads back as nothing.
        let last = earlier.pop().unwrap_or(RetiredJobs {
            coin: String::new(),
            digests: JobDigests::default(),
        });
        Self { last, earlier }
    }
}

impl RetiredCoins {
    /// Adds the jobs of `upstream`, an old upstream that closes or declares them stale, to
    /// those of `retired` (made when this is the session's first).
    fn take_from(retired: &mut Option<Box<Self>>, upstream: &mut UpstreamState) {
        if upstream.jobs.is_empty() {
            return;
        }
        retired.get_or_insert_default().add(RetiredJobs {
            coin: upstream.coin.clone(),
            digests: std::mem::take(&mut upstream.jobs),
        });
    }

    /// Adds `entry`: to the jobs of its coin when it has some (the newest kept), else as a new
    /// coin; the coin goes to the end, and the coin left longest ago goes beyond the bound.
    fn add(&mut self, entry: RetiredJobs) {
        let RetiredJobs { coin, digests } = entry;
        let mut merged = match self.0.iter().position(|e| e.coin == coin) {
            Some(i) => self.0.remove(i),
            None => RetiredJobs {
                coin,
                digests: JobDigests::default(),
            },
        };
        for digest in VecDeque::from(digests) {
            merged.digests.add(digest, false);
        }
        self.0.push(merged);
        if self.0.len() > MAX_RETIRED_COINS {
            self.0.remove(0);
        }
    }

    /// The entry of a job with `digest` of a coin other than `current_coin` (whose sserver
    /// may still know it: btcpool's job ids are the server's, not the connection's).
    fn find(&self, digest: u64, current_coin: &str) -> Option<usize> {
        self.0
            .iter()
            .rposition(|e| e.coin != current_coin && e.digests.contains(digest))
    }

    /// The coin of entry `i`.
    fn coin(&self, i: usize) -> Option<&str> {
        self.0.get(i).map(|e| e.coin.as_str())
    }
}

/// Where a miner request goes.
enum Route {
    /// The serving upstream.
    Current,
    /// The drained upstream at this index of [`Relay::draining`].
    Drain(usize),
    /// The queue (reconnecting: no upstream serves).
    Queue,
    /// Nowhere: a share of a job of another coin's upstream that closed or declared its jobs
    /// stale (the entry of [`Relay::retired`] that holds it); the proxy answers it stale.
    Stale(usize),
}

impl Relay {
    /// The relay of a session whose first upstream (number 0, coin `coin`) just logged in:
    /// the miner gets the login answer, the version mask and what the upstream sent meanwhile;
    /// the upstream gets the suggested difficulty and the requests the handshake held.
    #[allow(clippy::too_many_arguments)]
    pub fn start(
        hs: Handshake,
        login: Login,
        coin: String,
        opened: Opened,
        auth_answer: String,
        held_requests: Vec<Bytes>,
        settings: RelaySettings,
    ) -> Self {
        let mut relay = Self {
            hs,
            login,
            workers: Vec::new(),
            suggested_difficulty: None,
            phase: Phase::Relaying {
                current: UpstreamState::new(0, coin, &opened),
            },
            draining: Vec::new(),
            orphans: Vec::new(),
            next_request: 1,
            next_upstream: 1,
            retired: None,
            settings,
            awaiting_first_job: false,
            meters: Meters::default(),
            out: Actions::new(),
        };
        for line in &opened.held {
            if let Phase::Relaying { current } = &mut relay.phase {
                note_held_job(relay.hs.chain(), current, line);
            }
        }
        let mut first = auth_answer.into_bytes();
        first.push(b'\n');
        relay.out.push(Action::ToMiner(Bytes::from(first)));
        relay.announce(&opened);
        // What the miner asked during the handshake (suggest_difficulty, other requests), in
        // order, as if it came now.
        for line in held_requests {
            relay.on_queued_line(with_newline(line));
        }
        relay
    }

    /// Counts shares, switches and lost upstreams on `metrics` from now on (the upstreams it
    /// has already too).
    pub fn attach_metrics(&mut self, metrics: &Arc<Metrics>) {
        self.meters = Meters(Some(Arc::clone(metrics)));
        let meters = self.meters.clone();
        if let Some(current) = self.current_mut() {
            current.meter = meters.coin(&current.coin);
        }
        for drain in &mut self.draining {
            drain.upstream.meter = meters.coin(&drain.upstream.coin);
        }
    }

    /// The session ends: its submits in flight are counted unanswered.
    pub fn end(&mut self) {
        if let Some(current) = self.current_mut() {
            current.abandon_submits();
        }
        for drain in &mut self.draining {
            drain.upstream.abandon_submits();
        }
    }

    /// Takes the actions to carry out, in order.
    pub fn take_actions(&mut self) -> Actions {
        std::mem::take(&mut self.out)
    }

    /// Whether the miner may be read (the queue has room).
    pub fn reads_miner(&self) -> bool {
        match &self.phase {
            Phase::Reconnecting { queued, .. } => queued.len() < MAX_QUEUED_LINES,
            _ => true,
        }
    }

    /// The coin of the serving upstream, or of the one being opened when none serves.
    pub fn coin(&self) -> &str {
        match &self.phase {
            Phase::Relaying { current } | Phase::Switching { current, .. } => &current.coin,
            Phase::Reconnecting { opening, .. } => &opening.coin,
        }
    }

    /// What [`coin`](Self::coin) and the phase's kind are, told apart without comparing
    /// text: the number of the upstream whose coin `coin` is (each upstream's coin is fixed
    /// and numbers are never reused in a session) and whether the session is relaying.
    pub fn state_key(&self) -> (UpstreamId, bool) {
        match &self.phase {
            Phase::Relaying { current } => (current.id, true),
            Phase::Switching { current, .. } => (current.id, false),
            Phase::Reconnecting { opening, .. } => (opening.id, false),
        }
    }

    /// The coin the session is on or moving to.
    pub fn target_coin(&self) -> &str {
        match &self.phase {
            Phase::Relaying { current } => &current.coin,
            Phase::Switching { opening, .. } | Phase::Reconnecting { opening, .. } => &opening.coin,
        }
    }

    /// The serving upstream.
    pub fn current(&self) -> Option<&UpstreamState> {
        match &self.phase {
            Phase::Relaying { current } | Phase::Switching { current, .. } => Some(current),
            Phase::Reconnecting { .. } => None,
        }
    }

    fn current_mut(&mut self) -> Option<&mut UpstreamState> {
        match &mut self.phase {
            Phase::Relaying { current } | Phase::Switching { current, .. } => Some(current),
            Phase::Reconnecting { .. } => None,
        }
    }

    /// The upstream being opened.
    pub fn opening(&self) -> Option<&Opening> {
        match &self.phase {
            Phase::Switching { opening, .. } | Phase::Reconnecting { opening, .. } => Some(opening),
            Phase::Relaying { .. } => None,
        }
    }

    /// When the next drain window ends (ms since the Unix epoch).
    pub fn next_deadline(&self) -> Option<u64> {
        self.draining.iter().map(|d| d.until_ms).min()
    }

    /// The numbers of the drained upstreams.
    pub fn drained_ids(&self) -> impl Iterator<Item = UpstreamId> + '_ {
        self.draining.iter().map(|d| d.upstream.id)
    }

    fn upstream_mut(&mut self, id: UpstreamId) -> Option<&mut UpstreamState> {
        if self.current().is_some_and(|c| c.id == id) {
            return self.current_mut();
        }
        self.draining
            .iter_mut()
            .map(|d| &mut d.upstream)
            .find(|u| u.id == id)
    }

    /// Takes the phase out to move between states (a placeholder stands in until the new one
    /// is put back, in the same call).
    fn take_phase(&mut self) -> Phase {
        std::mem::replace(
            &mut self.phase,
            Phase::Reconnecting {
                opening: Opening {
                    id: 0,
                    coin: String::new(),
                },
                queued: VecDeque::new(),
            },
        )
    }

    fn proxy_id(&mut self) -> u64 {
        let id = self.next_request;
        self.next_request += 1;
        id
    }

    fn send_miner(&mut self, line: Bytes) {
        self.out.push(Action::ToMiner(line));
    }

    fn miner_text(&mut self, text: String) {
        let mut line = text.into_bytes();
        line.push(b'\n');
        self.send_miner(Bytes::from(line));
    }

    /// A share of a retired job ([`Route::Stale`]): answered as the sserver that announced the
    /// job answers a stale share, and counted as a stale share of its coin.
    fn answer_stale_share(&mut self, id: &str, entry: usize) {
        if let Some(coin) = self.retired.as_ref().and_then(|r| r.coin(entry))
            && let Some(meter) = self.meters.coin(coin).0
        {
            meter.share(ShareOutcome::Stale);
        }
        self.answer_code(id, STALE_CODE, "Job not found (=stale)");
    }

    /// The proxy's own error answer under a miner id (JSON text): a request nobody answers.
    fn answer_error(&mut self, id: &str, message: &str) {
        self.answer_code(id, ERR_UNANSWERED, message);
    }

    /// The proxy's own error answer with `code` under a miner id (JSON text).
    fn answer_code(&mut self, id: &str, code: i64, message: &str) {
        let id: Value = serde_json::from_str(id).unwrap_or(Value::Null);
        let line = error_line(&id, code, message, self.hs.server_id(), self.hs.json_rpc2());
        self.miner_text(line);
    }

    // ----- the miner -----

    /// A whole line (with its `\n`) from the miner.
    pub fn on_miner_line(&mut self, line: Bytes, names: &dyn NameRules) {
        let Some(read) = Line::read(&line) else {
            // Not JSON: the sserver's business, as it came.
            return self.send_untracked(line);
        };
        match read.method.as_deref() {
            Some("mining.authorize" | "eth_submitLogin") if read.id.is_some() => {
                self.on_miner_authorize(&line, names)
            }
            Some("mining.extranonce.subscribe") => {
                if let Some(id) = read.id {
                    let id: Value = serde_json::from_str(id).unwrap_or(Value::Null);
                    let answer = self.hs.result_line(&id, Value::Bool(true));
                    self.miner_text(answer);
                }
            }
            Some("mining.suggest_difficulty") => {
                if let Some(params) = read
                    .params
                    .and_then(|p| serde_json::from_str::<Vec<Value>>(p).ok())
                {
                    self.suggested_difficulty = Some(params);
                }
                // Answered (or not) by the sserver: relayed without being owed.
                self.send_untracked(line);
            }
            Some(method) if read.id.is_some() => {
                let submit = matches!(method, "mining.submit" | "eth_submitWork");
                let job = if submit { read.param_str(1) } else { None };
                let route = self.route(job.as_deref());
                if let Route::Stale(entry) = route {
                    return self.answer_stale_share(read.id.unwrap_or("null"), entry);
                }
                let drained = matches!(route, Route::Drain(_));
                let to = match self.route_target(&route) {
                    Some(upstream) => {
                        let id = read.id.unwrap_or("null");
                        if upstream.owe(id) && submit {
                            upstream.track_submit(id, drained);
                        }
                        upstream.id
                    }
                    None => return self.queue(line),
                };
                self.out.push(Action::ToUpstream(to, line));
            }
            // A notification, or an answer to an sserver's request: the current upstream's.
            _ => self.send_untracked(line),
        }
    }

    /// Where a request naming `job` (if any) goes: the upstream that announced the job, or the
    /// proxy's stale answer when that was an old upstream of another coin which has closed or
    /// declared its jobs stale ([`RetiredJobs`]), or the current one, or the queue.
    fn route(&self, job: Option<&str>) -> Route {
        if let Some(job) = job {
            let digest = job_digest(job);
            let holds = |u: &UpstreamState| u.jobs.contains(digest);
            if self.current().is_some_and(holds) {
                return Route::Current;
            }
            if let Some(i) = self.draining.iter().position(|d| holds(&d.upstream)) {
                return Route::Drain(i);
            }
            if let Some(entry) = self
                .retired
                .as_ref()
                .and_then(|r| r.find(digest, self.target_coin()))
            {
                return Route::Stale(entry);
            }
        }
        match self.current() {
            Some(_) => Route::Current,
            None => Route::Queue,
        }
    }

    fn route_target(&mut self, route: &Route) -> Option<&mut UpstreamState> {
        match route {
            Route::Queue | Route::Stale(_) => None,
            Route::Current => self.current_mut(),
            Route::Drain(i) => self.draining.get_mut(*i).map(|d| &mut d.upstream),
        }
    }

    fn queue(&mut self, line: Bytes) {
        if let Phase::Reconnecting { queued, .. } = &mut self.phase {
            queued.push_back(line);
        }
    }

    fn send_untracked(&mut self, line: Bytes) {
        match self.current() {
            Some(current) => {
                let to = current.id;
                self.out.push(Action::ToUpstream(to, line));
            }
            None => self.queue(line),
        }
    }

    /// A later authorize (another worker on this connection): normalized, and sent under the
    /// proxy's id so that its answer tells whether to replay it.
    fn on_miner_authorize(&mut self, line: &[u8], names: &dyn NameRules) {
        let Some(request) = Request::parse(line) else {
            return;
        };
        let name = match request.params.first().map(Value::as_str) {
            None => Err(crate::handshake::StratumError::TooFewParams),
            Some(None) => Err(crate::handshake::StratumError::WorkerNameMustBeString),
            Some(Some(raw)) => {
                normalize_worker(raw, request.worker.as_deref(), self.hs.chain(), names)
            }
        };
        let (sub, miner_name) = match name {
            Ok(parts) => parts,
            Err(error) => {
                let line = self.hs.error_line(&request.id, error);
                return self.miner_text(line);
            }
        };
        let mut params = request.params;
        params[0] = Value::String(format!("{sub}{miner_name}"));
        let pending = Pending {
            id: 0,
            request: ProxyRequest::MinerAuth {
                miner_id: request.id,
                worker: Worker {
                    method: request.method,
                    params,
                },
            },
        };
        self.send_pending(pending);
    }

    /// Sends a proxy request to the current upstream, or keeps it for the next one.
    fn send_pending(&mut self, mut pending: Pending) {
        let Some((full, suffixed, suffix)) = self.current().map(|c| {
            (
                c.pending.len() >= MAX_PENDING,
                c.suffixed,
                c.user_suffix.clone(),
            )
        }) else {
            self.orphans.push(pending);
            return;
        };
        if full {
            if let ProxyRequest::MinerAuth { miner_id, .. } = &pending.request {
                let id = miner_id.to_string();
                self.answer_error(&id, "Too many requests in flight");
            }
            return;
        }
        pending.id = self.proxy_id();
        let line = self.pending_line(&pending, suffixed, &suffix);
        let Some(current) = self.current_mut() else {
            return;
        };
        let to = current.id;
        current.pending.push(pending);
        self.out.push(Action::ToUpstream(to, line));
    }

    fn pending_line(&self, pending: &Pending, suffixed: bool, suffix: &str) -> Bytes {
        let id = format!("{PROXY_ID_PREFIX}{}", pending.id);
        let mut object = match &pending.request {
            ProxyRequest::MinerAuth { worker, .. } => {
                let mut params = worker.params.clone();
                if suffixed && let Some(Value::String(name)) = params.first_mut() {
                    *name = suffixed_worker(name, suffix);
                }
                json!({"id": id, "method": worker.method, "params": params})
            }
            ProxyRequest::Replay => Value::Null,
        };
        if self.hs.upstream_json_rpc2() && object.is_object() {
            object["jsonrpc"] = json!("2.0");
        }
        text_line(&object)
    }

    /// Replays a worker or the suggested difficulty on the current upstream.
    fn replay(&mut self, method: &str, params: Vec<Value>) {
        let Some(current) = self.current() else {
            return;
        };
        let mut params = params;
        if method != "mining.suggest_difficulty"
            && current.suffixed
            && let Some(Value::String(name)) = params.first_mut()
        {
            *name = suffixed_worker(name, &current.user_suffix);
        }
        let id = self.proxy_id();
        let mut object =
            json!({"id": format!("{PROXY_ID_PREFIX}{id}"), "method": method, "params": params});
        if self.hs.upstream_json_rpc2() {
            object["jsonrpc"] = json!("2.0");
        }
        let line = text_line(&object);
        let Some(current) = self.current_mut() else {
            return;
        };
        let to = current.id;
        current.pending.push(Pending {
            id,
            request: ProxyRequest::Replay,
        });
        self.out.push(Action::ToUpstream(to, line));
    }

    // ----- upstreams -----

    /// A whole line (with its `\n`) from upstream `from`.
    pub fn on_upstream_line(&mut self, from: UpstreamId, line: Bytes, now_ms: u64) {
        let is_current = self.current().is_some_and(|c| c.id == from);
        let drain = self.draining.iter().position(|d| d.upstream.id == from);
        if !is_current && drain.is_none() {
            return; // closed meanwhile
        }
        let Some(read) = Line::read(&line) else {
            if is_current {
                self.send_miner(line);
            }
            return;
        };
        if let Some(method) = read.method.as_deref() {
            if method == "mining.notify"
                && let Some(job) = read.param_str(0)
            {
                let clean = self.notify_is_clean(&read);
                match drain {
                    Some(i) => {
                        if clean {
                            let drain = &mut self.draining[i];
                            drain.stale = true;
                            RetiredCoins::take_from(&mut self.retired, &mut drain.upstream);
                            self.close_settled_drains(now_ms);
                        }
                        return;
                    }
                    None => {
                        if let Some(current) = self.current_mut() {
                            current.jobs.add(job_digest(&job), clean);
                        }
                        self.send_miner(line);
                        return self.first_job_sent();
                    }
                }
            }
            if is_current {
                self.send_miner(line);
            }
            return;
        }
        // An answer, or ETHProxy work pushed as one.
        if let Some(number) = read.id.and_then(proxy_request_number) {
            self.on_proxy_answer(from, number, &read);
            self.close_settled_drains(now_ms);
            return;
        }
        let work = if self.hs.chain() == ChainType::Ethereum {
            read.eth_work()
        } else {
            None
        };
        let owed = match read.id {
            Some(id) if !(work.is_some() && read.id_is_zero()) => {
                self.upstream_mut(from).is_some_and(|u| {
                    let owed = u.answered(id);
                    if owed {
                        u.share_answered(id, &read);
                    }
                    owed
                })
            }
            _ => false,
        };
        let mut new_job = false;
        if let Some(work) = &work
            && is_current
            && let Some(current) = self.current_mut()
        {
            current.jobs.add(job_digest(work), false);
            new_job = true;
        }
        if owed || is_current {
            self.send_miner(line);
            if new_job {
                self.first_job_sent();
            }
        }
        if drain.is_some() {
            self.close_settled_drains(now_ms);
        }
    }

    /// A job of the current upstream was just queued for the miner.
    fn first_job_sent(&mut self) {
        if self.awaiting_first_job {
            self.awaiting_first_job = false;
            self.out.push(Action::FirstJob);
        }
    }

    fn notify_is_clean(&self, read: &Line<'_>) -> bool {
        notify_is_clean(self.hs.chain(), read)
    }

    fn on_proxy_answer(&mut self, from: UpstreamId, number: u64, read: &Line<'_>) {
        let from_current = self.current().is_some_and(|c| c.id == from);
        let Some(upstream) = self.upstream_mut(from) else {
            return;
        };
        let Some(i) = upstream.pending.iter().position(|p| p.id == number) else {
            return;
        };
        let pending = upstream.pending.swap_remove(i);
        let ProxyRequest::MinerAuth { miner_id, worker } = pending.request else {
            return;
        };
        let result: Value = read
            .result
            .and_then(|r| serde_json::from_str(r).ok())
            .unwrap_or(Value::Null);
        let error: Value = read
            .error
            .and_then(|e| serde_json::from_str(e).ok())
            .unwrap_or(Value::Null);
        let accepted = result == Value::Bool(true);
        let answer = result_line(&miner_id, result, error, self.hs.json_rpc2());
        self.miner_text(answer);
        if !accepted || worker.name() == self.login.params.first().and_then(Value::as_str) {
            return;
        }
        if self.workers.iter().any(|w| w.name() == worker.name())
            || self.workers.len() >= MAX_WORKERS
        {
            return;
        }
        // Authorized by an old upstream after the switch: authorize it on the current one too.
        if !from_current {
            self.replay(&worker.method, worker.params.clone());
        }
        self.workers.push(worker);
        // From here on the session's log lines name every worker (`Relay::worker_names`); this one
        // says when the connection took another.
        tracing::info!(sid = %self.hs.sid(), worker = %self.worker_names(),
                       "another worker authorized on this connection");
    }

    /// Every worker of the connection, for the log: the login's, then the further ones
    /// authorized successfully, comma-separated (`alice.rig1,alice.rig2`).
    pub fn worker_names(&self) -> WorkerNames<'_> {
        WorkerNames(self)
    }

    /// An upstream's connection ended (closed, failed, or a line over the bound).
    pub fn on_upstream_lost(&mut self, id: UpstreamId, now_ms: u64) {
        if let Some(i) = self.draining.iter().position(|d| d.upstream.id == id) {
            let drain = self.draining.remove(i);
            self.settle(drain.upstream, "Stratum server connection lost");
            self.close_settled_drains(now_ms);
            return;
        }
        if self.current().is_none_or(|c| c.id != id) {
            return;
        }
        if let Some(meter) = self.current().and_then(|c| c.meter.0.as_ref()) {
            meter.upstream_failure(UpstreamFailure::Closed);
        }
        let phase = self.take_phase();
        let (lost, opening) = match phase {
            Phase::Relaying { current } => {
                let opening = self.new_opening(current.coin.clone());
                self.out.push(Action::Open {
                    id: opening.id,
                    coin: opening.coin.clone(),
                    reconnect: true,
                });
                (current, opening)
            }
            Phase::Switching { current, opening } => (current, opening),
            reconnecting @ Phase::Reconnecting { .. } => {
                self.phase = reconnecting;
                return;
            }
        };
        self.phase = Phase::Reconnecting {
            opening,
            queued: VecDeque::new(),
        };
        self.settle(lost, "Stratum server connection lost");
        self.close_settled_drains(now_ms);
    }

    /// Answers what `upstream` still owes with errors, keeps its miner authorizes for the
    /// next upstream, and closes it.
    fn settle(&mut self, mut upstream: UpstreamState, message: &str) {
        RetiredCoins::take_from(&mut self.retired, &mut upstream);
        upstream.abandon_submits();
        for owed in &upstream.owed {
            for _ in 0..owed.count {
                self.answer_error(owed.id.as_str(), message);
            }
        }
        for pending in upstream.pending {
            if matches!(pending.request, ProxyRequest::MinerAuth { .. }) {
                self.orphans.push(pending);
            }
        }
        self.out.push(Action::Close(upstream.id));
    }

    fn resend_orphans(&mut self) {
        if self.current().is_none() {
            return;
        }
        for pending in std::mem::take(&mut self.orphans) {
            self.send_pending(pending);
        }
    }

    fn new_opening(&mut self, coin: String) -> Opening {
        let id = self.next_upstream;
        self.next_upstream += 1;
        // One sserver never holds two connections with one session ID.
        if let Some(i) = self.draining.iter().position(|d| d.upstream.coin == coin) {
            let drain = self.draining.remove(i);
            self.settle(drain.upstream, "Stratum server connection closed");
        }
        Opening { id, coin }
    }

    /// The user's coin changed to `coin`; `has_sserver` says whether the proxy serves it.
    pub fn on_coin_changed(&mut self, coin: &str, has_sserver: bool) {
        if coin == self.target_coin() {
            return;
        }
        if !has_sserver {
            self.out
                .push(Action::outcome(coin.to_string(), "switch", "no_sserver"));
            return;
        }
        if self.hs.is_btc_agent() {
            self.out.push(Action::outcome(
                coin.to_string(),
                "switch",
                "closed_btcagent",
            ));
            self.out.push(Action::End(RelayEnd::BtcAgentSwitched));
            return;
        }
        let phase = self.take_phase();
        self.phase = match phase {
            Phase::Relaying { current } => {
                let opening = self.new_opening(coin.to_string());
                self.open(&opening, false);
                Phase::Switching { current, opening }
            }
            Phase::Switching { current, opening } => {
                self.out.push(Action::CancelOpen(opening.id));
                self.out
                    .push(Action::outcome(opening.coin.clone(), "switch", "cancelled"));
                if current.coin == coin {
                    Phase::Relaying { current }
                } else {
                    let opening = self.new_opening(coin.to_string());
                    self.open(&opening, false);
                    Phase::Switching { current, opening }
                }
            }
            Phase::Reconnecting { opening, queued } => {
                self.out.push(Action::CancelOpen(opening.id));
                let opening = self.new_opening(coin.to_string());
                self.open(&opening, true);
                Phase::Reconnecting { opening, queued }
            }
        };
    }

    /// The relay restored from a [`SessionSnapshot`] by a new process (hot upgrade): nothing is
    /// sent to either side; an upstream that was being opened is opened again (its open
    /// did not survive the old process).
    pub fn resume(&mut self) {
        match &self.phase {
            Phase::Relaying { .. } => {}
            Phase::Switching { opening, .. } => {
                let opening = opening.clone();
                self.open(&opening, false);
            }
            Phase::Reconnecting { opening, .. } => {
                let opening = opening.clone();
                self.open(&opening, true);
            }
        }
    }

    fn open(&mut self, opening: &Opening, reconnect: bool) {
        self.out.push(Action::Open {
            id: opening.id,
            coin: opening.coin.clone(),
            reconnect,
        });
    }

    /// Upstream `id` finished its login.
    pub fn on_opened(&mut self, id: UpstreamId, opened: Opened, now_ms: u64) {
        if self.opening().is_none_or(|o| o.id != id) {
            self.out.push(Action::Close(id));
            return;
        }
        let phase = self.take_phase();
        let (old, opening, queued, kind) = match phase {
            Phase::Switching { current, opening } => {
                (Some(current), opening, VecDeque::new(), "switch")
            }
            Phase::Reconnecting { opening, queued } => (None, opening, queued, "reconnect"),
            relaying @ Phase::Relaying { .. } => {
                self.phase = relaying;
                return;
            }
        };
        let mut current = UpstreamState::new(opening.id, opening.coin.clone(), &opened);
        current.meter = self.meters.coin(&opening.coin);
        for line in &opened.held {
            note_held_job(self.hs.chain(), &mut current, line);
        }
        let job_held = !current.jobs.is_empty();
        self.phase = Phase::Relaying { current };
        self.out.push(Action::outcome(opening.coin, kind, "ok"));
        if let Some(old) = old {
            self.drain(old, now_ms);
        }
        self.announce(&opened);
        self.awaiting_first_job = true;
        if job_held {
            self.first_job_sent();
        }
        // Every worker authorized so far, and the suggested difficulty, on the new upstream.
        for worker in self.workers.clone() {
            self.replay(&worker.method, worker.params);
        }
        if let Some(params) = self.suggested_difficulty.clone() {
            self.replay("mining.suggest_difficulty", params);
        }
        self.resend_orphans();
        for line in queued {
            self.on_queued_line(line);
        }
    }

    /// A miner line read earlier (queued during a reconnect, or held by the handshake).
    fn on_queued_line(&mut self, line: Bytes) {
        // Authorizes are never queued (they wait as orphans, normalized): no renaming here.
        self.on_miner_line(line, &NoRenames);
    }

    /// After a login: the version mask (when the miner asked for version rolling), then the
    /// lines the sserver sent during the login, in order, in one write.
    fn announce(&mut self, opened: &Opened) {
        let mut out =
            Vec::with_capacity(128 + opened.held.iter().map(|l| l.len() + 1).sum::<usize>());
        if let Some(mask) = self.hs.version_mask() {
            let allowed = opened.allowed_mask.map_or(mask, |allowed| allowed & mask);
            let line = json!({"id": null, "method": "mining.set_version_mask", "params": [format!("{allowed:08x}")]});
            out.extend_from_slice(line.to_string().as_bytes());
            out.push(b'\n');
        }
        for line in &opened.held {
            out.extend_from_slice(line);
            out.push(b'\n');
        }
        if !out.is_empty() {
            self.send_miner(Bytes::from(out));
        }
    }

    /// Keeps the old upstream of a switch for the shares of its jobs.
    fn drain(&mut self, old: UpstreamState, now_ms: u64) {
        if old.jobs.is_empty() && old.owes_nothing() {
            self.out.push(Action::Close(old.id));
            return;
        }
        if self.draining.len() >= MAX_DRAINS {
            let oldest = self.draining.remove(0);
            self.settle(oldest.upstream, "Stratum server connection closed");
        }
        self.draining.push(Drain {
            upstream: old,
            until_ms: now_ms + self.settings.drain_window_ms,
            stale: false,
        });
    }

    fn close_settled_drains(&mut self, now_ms: u64) {
        let mut i = 0;
        while i < self.draining.len() {
            let d = &self.draining[i];
            if d.stale && d.upstream.owes_nothing() {
                let drain = self.draining.remove(i);
                self.out.push(Action::Close(drain.upstream.id));
            } else if d.until_ms <= now_ms {
                let drain = self.draining.remove(i);
                self.settle(drain.upstream, "Stratum server did not answer in time");
            } else {
                i += 1;
            }
        }
        self.resend_orphans();
    }

    /// Time passed: drains whose window ended are closed.
    pub fn on_tick(&mut self, now_ms: u64) {
        self.close_settled_drains(now_ms);
    }

    /// Closes every drain (the process is short of file descriptors).
    pub fn drop_drains(&mut self) {
        for drain in std::mem::take(&mut self.draining) {
            self.settle(drain.upstream, "Stratum server connection closed");
        }
        self.resend_orphans();
    }

    /// Upstream `id` could not be opened.
    pub fn on_open_failed(&mut self, id: UpstreamId) {
        let Some(opening) = self.opening().filter(|o| o.id == id) else {
            return;
        };
        let kind = match self.phase {
            Phase::Reconnecting { .. } => "reconnect",
            _ => "switch",
        };
        self.out
            .push(Action::outcome(opening.coin.clone(), kind, "failed"));
        self.out.push(Action::End(RelayEnd::OpenFailed));
    }
}

/// Whether a `mining.notify` asks the miner to drop its earlier jobs (bitcoin-like params[8],
/// Ethereum params[3]).
fn notify_is_clean(chain: ChainType, read: &Line<'_>) -> bool {
    match chain {
        ChainType::Ethereum => read.param_bool(3).unwrap_or(false),
        _ => read.param_bool(8).unwrap_or(false),
    }
}

/// Remembers the job a line the sserver sent during its login announces, if any.
fn note_held_job(chain: ChainType, upstream: &mut UpstreamState, line: &[u8]) {
    let Some(read) = Line::read(line) else {
        return;
    };
    if read.method.as_deref() == Some("mining.notify") {
        if let Some(job) = read.param_str(0) {
            upstream
                .jobs
                .add(job_digest(&job), notify_is_clean(chain, &read));
        }
    } else if chain == ChainType::Ethereum
        && let Some(work) = read.eth_work()
    {
        upstream.jobs.add(job_digest(&work), false);
    }
}

/// Name rules that change nothing (for queued authorizes, normalized when they were read).
struct NoRenames;

impl NameRules for NoRenames {
    fn case_insensitive(&self) -> bool {
        false
    }

    fn canonical_name(&self, _lowercase: &str) -> Option<String> {
        None
    }
}

/// `"sy-N"` → N.
fn proxy_request_number(id: &str) -> Option<u64> {
    id.strip_prefix('"')?
        .strip_suffix('"')?
        .strip_prefix(PROXY_ID_PREFIX)?
        .parse()
        .ok()
}

/// `line` ending in `\n`.
fn with_newline(line: Bytes) -> Bytes {
    if line.ends_with(b"\n") {
        return line;
    }
    let mut owned = line.to_vec();
    owned.push(b'\n');
    Bytes::from(owned)
}

fn text_line(value: &Value) -> Bytes {
    let mut text = value.to_string().into_bytes();
    text.push(b'\n');
    Bytes::from(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retired_coins_read_both_forms_merge_per_coin_and_stay_bounded() {
        // The one entry the previous version wrote.
        let one: RetiredCoins =
            serde_json::from_str(r#"{"coin":"btc","digests":[1,2]}"#).expect("one entry reads");
        assert_eq!(one.find(2, "bch"), Some(0));
        assert_eq!(
            one.find(2, "btc"),
            None,
            "a job of the current coin is not stale"
        );
        let written = serde_json::to_string(&one).expect("writes");
        assert_eq!(written, r#"{"coin":"btc","digests":[1,2]}"#);
        let again: RetiredCoins = serde_json::from_str(&written).expect("reads back");
        assert_eq!(again, one);

        let entry = |coin: &str, digests: &[u64]| RetiredJobs {
            coin: coin.into(),
            digests: VecDeque::from(digests.to_vec()).into(),
        };
        let mut coins = RetiredCoins::default();
        coins.add(entry("btc", &[1]));
        coins.add(entry("bch", &[2]));
        coins.add(entry("btc", &[3]));
        assert_eq!(coins.0.len(), 2, "one entry per coin");
        assert_eq!(coins.coin(1), Some("btc"), "the coin left last at the end");
        assert_eq!(coins.find(1, "ltc"), Some(1), "btc's earlier jobs kept");
        assert_eq!(coins.find(3, "ltc"), Some(1));
        for (i, coin) in ["ltc", "doge", "xmr", "zec"].iter().enumerate() {
            coins.add(entry(coin, &[10 + i as u64]));
        }
        assert_eq!(coins.0.len(), MAX_RETIRED_COINS);
        assert_eq!(
            coins.find(2, "ltc"),
            None,
            "the coin left longest ago forgotten"
        );
        assert_eq!(coins.find(1, "ltc"), None);
        // Written as the last entry with the others under `earlier`: read back whole, and by
        // the previous version (one `RetiredJobs`) as the last entry.
        let written = serde_json::to_string(&coins).expect("writes");
        let again: RetiredCoins = serde_json::from_str(&written).expect("reads back");
        assert_eq!(again, coins);
        let previous: RetiredJobs = serde_json::from_str(&written).expect("the previous reads");
        assert_eq!(
            Some(previous.coin.as_str()),
            coins.coin(MAX_RETIRED_COINS - 1)
        );
        let many: Vec<u64> = (0..MAX_JOBS as u64 * 2).collect();
        coins.add(entry("zec", &many));
        let zec = coins.coin(MAX_RETIRED_COINS - 1);
        assert_eq!(zec, Some("zec"));
        assert_eq!(
            VecDeque::from(coins.0[MAX_RETIRED_COINS - 1].digests.clone()).len(),
            MAX_JOBS,
            "a coin's jobs stay bounded"
        );
    }

    #[test]
    fn job_digests_read_and_write_the_list_of_digests() {
        // The form a hot upgrade's earlier image wrote (a plain list, oldest first).
        let jobs: JobDigests = serde_json::from_str("[1,2,3]").expect("a list reads");
        assert!(jobs.contains(1) && jobs.contains(3) && !jobs.contains(4));
        assert_eq!(serde_json::to_string(&jobs).expect("writes"), "[1,2,3]");
        let long: Vec<u64> = (0..MAX_JOBS as u64 + 5).collect();
        let jobs: JobDigests =
            serde_json::from_str(&serde_json::to_string(&long).expect("list")).expect("reads");
        assert!(
            !jobs.contains(4),
            "the oldest beyond the bound are forgotten"
        );
        assert!(jobs.contains(5) && jobs.contains(MAX_JOBS as u64 + 4));
        let mut jobs = JobDigests::default();
        assert!(jobs.is_empty());
        jobs.add(7, false);
        jobs.add(8, false);
        assert!(jobs.contains(7) && jobs.contains(8));
        jobs.add(9, true);
        assert!(!jobs.contains(7) && !jobs.contains(8) && jobs.contains(9));
        jobs.clear();
        assert!(jobs.is_empty() && !jobs.contains(9));
    }
}
