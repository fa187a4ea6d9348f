//! The hot upgrade (SPEC §9): on SIGUSR2 the proxy hands everything it holds to a new image
//! of itself, in the same process (the PID stays, so supervisors see nothing).
//!
//! The steps, in [`crate::server::Proxy::upgrade`]:
//! 1. **Check.** The binary at the path the proxy was started with is run with the same
//!    arguments and [`CHECK_ENV`] set: it reads and validates the config and exits. If it
//!    cannot (a broken binary, a bad config), nothing else happens: the proxy keeps serving
//!    and logs why.
//! 2. **Freeze.** The listener stops accepting (connections that arrive meanwhile wait in its
//!    accept queue, which is handed over with it), and every relaying session stops at its
//!    next turn (after it has carried out its actions, so no line is half written) and hands
//!    over its sockets and its [`SessionSnapshot`] as a [`HandedSession`]. Sessions still in
//!    their handshake are not waited for: they close at the `exec` (counted).
//! 3. **Exec.** The state (a [`HandOverHeader`] line: the listener's descriptor, the server-ID
//!    lease and the session-ID cursor; then a [`SessionState`] line per session, busiest
//!    first) is written to an anonymous memory file; that file, the listener
//!    and every handed socket lose close-on-exec, and the process `exec`s the new binary with
//!    the same arguments and [`STATE_FD_ENV`] naming the memory file. The same descriptors
//!    carry over: none is duplicated, so an upgrade at the open-file limit needs none spare.
//! 4. **Resume.** The new image reads the state, owns the descriptors ([`crate::inherit`]),
//!    takes the listener, renews the same lease, claims every session's ID, and rebuilds each
//!    session without sending anything to either side; an open that was under way is started
//!    again, and the user's coin is checked against the new cache as soon as it is synced
//!    (switching if it changed meanwhile).
//!
//! If `exec` itself fails, the old image resumes the same sessions in place, on the sockets it
//! never let go of (still registered with tokio, their session IDs still held), and keeps
//! serving.

#![forbid(unsafe_code)]

use std::{
    ffi::OsString,
    io::{BufRead, Seek, Write},
    net::SocketAddr,
    os::fd::{AsFd, AsRawFd, OwnedFd, RawFd},
    path::PathBuf,
    time::Duration,
};

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::{
    control::ServerIdLease,
    inherit::{InheritError, Inherited},
    relay::{SessionSnapshot, UpstreamId},
    session::SessionIdGuard,
    session_id::SessionId,
};

/// Set (to `1`) when the binary is run only to check that it can start with its arguments
/// and config: it validates them and exits 0, or prints why not and exits non-zero.
pub const CHECK_ENV: &str = "SWITCHYARD_UPGRADE_CHECK";

/// Names the descriptor of the handed-over state in the new image.
pub const STATE_FD_ENV: &str = "SWITCHYARD_UPGRADE_STATE_FD";

/// How long the check of the new binary may take.
pub const CHECK_TIMEOUT: Duration = Duration::from_secs(20);

/// How long relaying sessions get to hand over (one busy in a write to a full socket waits
/// for it within its write deadline; one that does not make it closes at the `exec`).
pub const FREEZE_TIMEOUT: Duration = Duration::from_secs(5);

/// Milliseconds since the Unix epoch (wall time: it carries across the `exec`).
pub fn wall_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The format of [`HandOverState`]; a new image refuses another.
const FORMAT: u32 = 1;

/// Why an upgrade did not happen (the proxy kept serving).
#[derive(Debug, Error)]
pub enum UpgradeError {
    /// The new binary could not be run.
    #[error("cannot run {path}: {source}")]
    Spawn {
        /// The binary.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The new binary refused its arguments or config.
    #[error("the new binary refused to start: {0}")]
    CheckFailed(String),
    /// The new binary did not answer in time.
    #[error("the new binary's check took longer than {0:?}")]
    CheckTimeout(Duration),
    /// An upgrade is already under way.
    #[error("an upgrade is already under way")]
    Busy,
    /// The listener is gone (the proxy is shutting down).
    #[error("the proxy is shutting down")]
    ShuttingDown,
    /// The state could not be written or a descriptor prepared.
    #[error("cannot prepare the hand-over: {0}")]
    Prepare(#[from] std::io::Error),
    /// The state could not be serialized.
    #[error("cannot write the hand-over state: {0}")]
    Serialize(#[from] serde_json::Error),
    /// `exec` failed.
    #[error("exec of {path} failed: {source}")]
    Exec {
        /// The binary.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// Why the new image could not read what it was handed.
#[derive(Debug, Error)]
pub enum ResumeError {
    /// The variable is not a descriptor number.
    #[error("{STATE_FD_ENV} is not a descriptor number: {0:?}")]
    BadVariable(String),
    /// A descriptor is unusable.
    #[error(transparent)]
    Descriptor(#[from] InheritError),
    /// The state could not be read.
    #[error("cannot read the hand-over state: {0}")]
    Read(#[from] std::io::Error),
    /// The state is not what this binary writes.
    #[error("the hand-over state cannot be parsed: {0}")]
    Parse(#[from] serde_json::Error),
    /// Written by a binary with another format.
    #[error("the hand-over state has format {0}, this binary reads {FORMAT}")]
    Format(u32),
}

/// How this process was started: what an upgrade runs again.
#[derive(Debug, Clone)]
pub struct Invocation {
    /// The binary's path as started (a binary replaced at that path is the new one).
    pub exe: PathBuf,
    /// The arguments after the program name.
    pub args: Vec<OsString>,
}

impl Invocation {
    /// This process's invocation, read at start (before any upgrade replaces the binary).
    pub fn current() -> std::io::Result<Self> {
        let exe = std::env::current_exe()?;
        // `current_exe` reads /proc/self/exe: a binary replaced since shows as "... (deleted)";
        // at start the path is the one the binary was started from.
        Ok(Self {
            exe,
            args: std::env::args_os().skip(1).collect(),
        })
    }

    /// Runs the binary in check mode; `Ok` when it would start.
    pub async fn check(&self) -> Result<(), UpgradeError> {
        let child = tokio::process::Command::new(&self.exe)
            .args(&self.args)
            .env(CHECK_ENV, "1")
            .env_remove(STATE_FD_ENV)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|source| UpgradeError::Spawn {
                path: self.exe.clone(),
                source,
            })?;
        let output = tokio::time::timeout(CHECK_TIMEOUT, child.wait_with_output())
            .await
            .map_err(|_| UpgradeError::CheckTimeout(CHECK_TIMEOUT))?
            .map_err(|source| UpgradeError::Spawn {
                path: self.exe.clone(),
                source,
            })?;
        if output.status.success() {
            return Ok(());
        }
        let stderr = String::from_utf8_lossy(&output.stderr);
        let why = stderr
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("no message")
            .chars()
            .take(500)
            .collect::<String>();
        Err(UpgradeError::CheckFailed(format!(
            "{}: {why}",
            output.status
        )))
    }
}

/// A socket of a session handed over.
#[derive(Debug)]
pub enum HandedSocket {
    /// In the old image: still registered with tokio. The `exec` closes the registry, and if
    /// the `exec` fails the session resumes on it as it is (taking a socket out of tokio
    /// costs a system call per socket, while every session waits).
    Live(tokio::net::TcpStream),
    /// In the new image: owned, not registered yet. The session's own task registers it (a
    /// system call per socket, which the runtime's threads share).
    Inherited(std::net::TcpStream),
}

impl HandedSocket {
    /// The socket, registered with tokio.
    pub fn into_tokio(self) -> std::io::Result<tokio::net::TcpStream> {
        match self {
            Self::Live(socket) => Ok(socket),
            Self::Inherited(socket) => tokio::net::TcpStream::from_std(socket),
        }
    }

    fn raw_fd(&self) -> RawFd {
        match self {
            Self::Live(socket) => socket.as_raw_fd(),
            Self::Inherited(socket) => socket.as_raw_fd(),
        }
    }

    fn set_cloexec(&self, cloexec: bool) -> std::io::Result<()> {
        match self {
            Self::Live(socket) => set_cloexec(socket, cloexec),
            Self::Inherited(socket) => set_cloexec(socket, cloexec),
        }
    }
}

/// One relaying session as handed over: its sockets and its state.
#[derive(Debug)]
pub struct HandedSession {
    /// Its session ID.
    pub sid: SessionId,
    /// The miner's address.
    pub peer: SocketAddr,
    /// The miner's socket.
    pub miner: HandedSocket,
    /// Its upstreams' sockets (the serving one and the drained ones), by number.
    pub upstreams: Vec<(UpstreamId, HandedSocket)>,
    /// Its state, partial lines included.
    pub snapshot: SessionSnapshot,
    /// When its miner last sent a line (the old image's coarse clock): the busiest sessions
    /// are written first, so the new image resumes them first.
    pub active_at: u32,
    /// In the old image, its session ID, still held: if the `exec` fails, the session
    /// resumes with it (never freed meanwhile, so never handed to another session).
    pub sid_guard: Option<SessionIdGuard>,
}

impl HandedSession {
    /// Its line of the state (without the `\n`).
    pub fn state_line(&self) -> Result<Vec<u8>, serde_json::Error> {
        serde_json::to_vec(&SessionState {
            sid: self.sid.0,
            peer: self.peer,
            miner_fd: self.miner.raw_fd(),
            upstream_fds: self
                .upstreams
                .iter()
                .map(|(id, socket)| (*id, socket.raw_fd()))
                .collect(),
            snapshot: &self.snapshot,
        })
    }
}

/// What the old process hands over, as written for the new one: this header on the first
/// line of the state, then one [`SessionState`] per line, so that the new image rebuilds the
/// first sessions while it still reads the others.
#[derive(Debug, Serialize, Deserialize)]
pub struct HandOverHeader {
    /// The format of this state (`FORMAT`); a new image refuses another.
    pub format: u32,
    /// The miners' listener.
    pub listener_fd: RawFd,
    /// Its address.
    pub listen_addr: SocketAddr,
    /// The server-ID lease, when the ID was leased.
    pub lease: Option<LeaseState>,
    /// The server ID of new sessions.
    pub server_id: u8,
    /// Where the session-ID search stood.
    pub sid_cursor: u32,
    /// Sessions in their handshake, closed by the upgrade.
    pub closed_in_handshake: u64,
    /// When the sessions were frozen (ms since the Unix epoch): the new image logs how long
    /// they waited.
    pub frozen_at_ms: u64,
    /// How many session lines follow.
    pub sessions: usize,
}

/// A server-ID lease as handed over.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LeaseState {
    /// The ID.
    pub server_id: u8,
    /// The lease's identity.
    pub instance_id: String,
    /// Its time to live, in seconds.
    pub ttl_seconds: u64,
}

impl From<&ServerIdLease> for LeaseState {
    fn from(lease: &ServerIdLease) -> Self {
        Self {
            server_id: lease.server_id,
            instance_id: lease.instance_id.clone(),
            ttl_seconds: lease.ttl.as_secs().max(1),
        }
    }
}

impl From<LeaseState> for ServerIdLease {
    fn from(lease: LeaseState) -> Self {
        Self {
            server_id: lease.server_id,
            instance_id: lease.instance_id,
            ttl: Duration::from_secs(lease.ttl_seconds.max(1)),
        }
    }
}

/// One session as handed over (one line of the state): descriptor numbers and state.
#[derive(Debug, Serialize, Deserialize)]
pub struct SessionState<S = SessionSnapshot> {
    /// Its session ID.
    pub sid: u32,
    /// The miner's address.
    pub peer: SocketAddr,
    /// The miner's socket.
    pub miner_fd: RawFd,
    /// Its upstreams' sockets, by number.
    pub upstream_fds: Vec<(UpstreamId, RawFd)>,
    /// Its state (written from a reference: nothing is copied).
    pub snapshot: S,
}

/// What the old process hands over, before it is written: the descriptors still owned.
#[derive(Debug)]
pub struct HandOver {
    /// The miners' listener (taken by the process that serves on with it).
    pub listener: Option<OwnedFd>,
    /// Its address.
    pub listen_addr: SocketAddr,
    /// The server-ID lease, when the ID was leased.
    pub lease: Option<ServerIdLease>,
    /// The server ID of new sessions.
    pub server_id: u8,
    /// Where the session-ID search stood.
    pub sid_cursor: u32,
    /// Sessions in their handshake, closed by the upgrade.
    pub closed_in_handshake: u64,
    /// When the sessions were frozen (ms since the Unix epoch).
    pub frozen_at_ms: u64,
    /// The relaying sessions.
    pub sessions: Vec<HandedSession>,
}

impl HandOver {
    /// Writes the state, lets every descriptor through `exec` and execs `invocation`. Returns
    /// only when that failed, with everything handed back (close-on-exec set again).
    pub fn exec(self, invocation: &Invocation) -> (Self, UpgradeError) {
        let writing = std::time::Instant::now();
        let state = match self.write_state() {
            Ok(state) => state,
            Err(e) => return (self, e),
        };
        tracing::info!(
            sessions = self.sessions.len(),
            write_ms = writing.elapsed().as_millis() as u64,
            "hot upgrade: state written; exec"
        );
        if let Err(e) = self.set_inherited(true).and(set_cloexec(&state, false)) {
            let _ = self.set_inherited(false);
            return (self, e.into());
        }
        use std::os::unix::process::CommandExt;
        let source = std::process::Command::new(&invocation.exe)
            .args(&invocation.args)
            .env(STATE_FD_ENV, state.as_raw_fd().to_string())
            .env_remove(CHECK_ENV)
            .exec();
        let _ = self.set_inherited(false);
        drop(state);
        (
            self,
            UpgradeError::Exec {
                path: invocation.exe.clone(),
                source,
            },
        )
    }

    fn write_state(&self) -> Result<OwnedFd, UpgradeError> {
        let header = HandOverHeader {
            format: FORMAT,
            listener_fd: self
                .listener
                .as_ref()
                .map(AsRawFd::as_raw_fd)
                .ok_or_else(|| std::io::Error::other("no listener to hand over"))?,
            listen_addr: self.listen_addr,
            lease: self.lease.as_ref().map(LeaseState::from),
            server_id: self.server_id,
            sid_cursor: self.sid_cursor,
            closed_in_handshake: self.closed_in_handshake,
            frozen_at_ms: self.frozen_at_ms,
            sessions: self.sessions.len(),
        };
        let fd = rustix::fs::memfd_create("switchyard-upgrade", rustix::fs::MemfdFlags::CLOEXEC)
            .map_err(std::io::Error::from)?;
        let mut file = std::fs::File::from(fd);
        let mut writer = std::io::BufWriter::with_capacity(1 << 20, &mut file);
        serde_json::to_writer(&mut writer, &header)?;
        writer.write_all(b"\n")?;
        for session in &self.sessions {
            writer.write_all(&session.state_line()?)?;
            writer.write_all(b"\n")?;
        }
        writer.flush()?;
        drop(writer);
        file.rewind()?;
        Ok(OwnedFd::from(file))
    }

    /// Clears (`true`) or sets close-on-exec on every handed descriptor.
    fn set_inherited(&self, inherited: bool) -> std::io::Result<()> {
        if let Some(listener) = &self.listener {
            set_cloexec(listener, !inherited)?;
        }
        for session in &self.sessions {
            session.miner.set_cloexec(!inherited)?;
            for (_, socket) in &session.upstreams {
                socket.set_cloexec(!inherited)?;
            }
        }
        Ok(())
    }
}

fn set_cloexec(fd: &impl AsFd, cloexec: bool) -> std::io::Result<()> {
    let flags = if cloexec {
        rustix::io::FdFlags::CLOEXEC
    } else {
        rustix::io::FdFlags::empty()
    };
    rustix::io::fcntl_setfd(fd, flags).map_err(std::io::Error::from)
}

/// What a new image inherits: the header's part (listener, lease, IDs) as a [`HandOver`]
/// without sessions, and the sessions still to read ([`Self::take_sessions`]).
#[derive(Debug)]
pub struct Inheritance {
    /// The listener, lease and IDs; `sessions` is empty.
    pub handed: HandOver,
    /// How many sessions the old image handed over.
    pub sessions: usize,
    lines: std::io::Lines<std::io::BufReader<std::fs::File>>,
    inherited: Inherited,
}

impl Inheritance {
    /// The sessions: those rebuilt, and why others could not be (their descriptors, if
    /// owned, are closed). One pass: each line read, parsed, its descriptors owned (parsing on
    /// several threads was measured no faster for 9,000 sessions: docs/benchmarks.md part 7).
    pub fn take_sessions(self) -> (Vec<HandedSession>, Vec<String>) {
        let Self {
            mut inherited,
            lines,
            sessions,
            ..
        } = self;
        let started = std::time::Instant::now();
        let mut handed = Vec::with_capacity(sessions);
        let mut unusable = Vec::new();
        for line in lines {
            let session = match line
                .map_err(ResumeError::from)
                .and_then(|l| serde_json::from_str::<SessionState>(&l).map_err(ResumeError::from))
            {
                Ok(session) => session,
                Err(e) => {
                    unusable.push(format!("a session's state: {e}"));
                    continue;
                }
            };
            match adopt_session(&mut inherited, &session) {
                Ok((miner, upstreams)) => handed.push(HandedSession {
                    sid: SessionId(session.sid),
                    peer: session.peer,
                    miner,
                    upstreams,
                    snapshot: session.snapshot,
                    active_at: 0,
                    sid_guard: None,
                }),
                Err(e) => unusable.push(format!("{}: {e}", session.peer)),
            }
        }
        tracing::info!(
            read_ms = started.elapsed().as_millis() as u64,
            "hot upgrade: sessions read"
        );
        (handed, unusable)
    }
}

/// In the new image: what the old one handed over, if this process is one (the listener
/// owned, close-on-exec set again; the sessions are read by [`Inheritance::take_sessions`]).
pub fn take_handed_over() -> Result<Option<Inheritance>, ResumeError> {
    let Some(value) = std::env::var_os(STATE_FD_ENV) else {
        return Ok(None);
    };
    // The variable stays set (removing it is not thread-safe); a later upgrade sets it anew
    // and the check of a new binary runs without it.
    let text = value.to_string_lossy().into_owned();
    let fd: RawFd = text
        .parse()
        .map_err(|_| ResumeError::BadVariable(text.clone()))?;
    let mut inherited = Inherited::new();
    let file = inherited.file(fd)?;
    let mut lines = std::io::BufReader::with_capacity(1 << 20, file).lines();
    let first = lines.next().transpose()?.unwrap_or_default();
    let header: HandOverHeader = serde_json::from_str(&first)?;
    if header.format != FORMAT {
        return Err(ResumeError::Format(header.format));
    }
    let listener = OwnedFd::from(inherited.tcp_listener(header.listener_fd)?);
    Ok(Some(Inheritance {
        handed: HandOver {
            listener: Some(listener),
            listen_addr: header.listen_addr,
            lease: header.lease.map(ServerIdLease::from),
            server_id: header.server_id,
            sid_cursor: header.sid_cursor,
            closed_in_handshake: header.closed_in_handshake,
            frozen_at_ms: header.frozen_at_ms,
            sessions: Vec::new(),
        },
        sessions: header.sessions,
        lines,
        inherited,
    }))
}

/// A session's sockets, owned.
#[allow(clippy::type_complexity)]
fn adopt_session(
    inherited: &mut Inherited,
    session: &SessionState,
) -> Result<(HandedSocket, Vec<(UpstreamId, HandedSocket)>), ResumeError> {
    let miner = HandedSocket::Inherited(inherited.tcp_stream(session.miner_fd)?);
    let mut upstreams = Vec::with_capacity(session.upstream_fds.len());
    for (id, fd) in &session.upstream_fds {
        upstreams.push((*id, HandedSocket::Inherited(inherited.tcp_stream(*fd)?)));
    }
    Ok((miner, upstreams))
}
