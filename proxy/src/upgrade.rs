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
//! 3. **Exec.** The [`HandOverState`] (descriptor numbers, snapshots, the server-ID lease and
//!    the session-ID cursor) is written to an anonymous memory file; that file, the listener
//!    and every handed socket lose close-on-exec, and the process `exec`s the new binary with
//!    the same arguments and [`STATE_FD_ENV`] naming the memory file. The same descriptors
//!    carry over: none is duplicated, so an upgrade at the open-file limit needs none spare.
//! 4. **Resume.** The new image reads the state, owns the descriptors ([`crate::inherit`]),
//!    takes the listener, renews the same lease, claims every session's ID, and rebuilds each
//!    session without sending anything to either side; an open that was under way is started
//!    again, and the user's coin is checked against the new cache as soon as it is synced
//!    (switching if it changed meanwhile).
//!
//! If `exec` itself fails, the old image rebuilds the same sessions from the same handed-over
//! state, in place, and keeps serving.

#![forbid(unsafe_code)]

use std::{
    ffi::OsString,
    io::{Read, Seek, Write},
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

/// One relaying session as handed over, in the old process: its sockets and its state.
#[derive(Debug)]
pub struct HandedSession {
    /// Its session ID.
    pub sid: SessionId,
    /// The miner's address.
    pub peer: SocketAddr,
    /// The miner's socket.
    pub miner: OwnedFd,
    /// Its upstreams' sockets (the serving one and the drained ones), by number.
    pub upstreams: Vec<(UpstreamId, OwnedFd)>,
    /// Its state, partial lines included.
    pub snapshot: SessionSnapshot,
}

/// What the old process hands over, as written for the new one.
#[derive(Debug, Serialize, Deserialize)]
pub struct HandOverState {
    /// [`FORMAT`].
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
    /// The relaying sessions.
    pub sessions: Vec<SessionState>,
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

/// One session as handed over: descriptor numbers and state.
#[derive(Debug, Serialize, Deserialize)]
pub struct SessionState {
    /// Its session ID.
    pub sid: u32,
    /// The miner's address.
    pub peer: SocketAddr,
    /// The miner's socket.
    pub miner_fd: RawFd,
    /// Its upstreams' sockets, by number.
    pub upstream_fds: Vec<(UpstreamId, RawFd)>,
    /// Its state.
    pub snapshot: SessionSnapshot,
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
    /// The relaying sessions.
    pub sessions: Vec<HandedSession>,
}

impl HandOver {
    /// Writes the state, lets every descriptor through `exec` and execs `invocation`. Returns
    /// only when that failed, with everything handed back (close-on-exec set again).
    pub fn exec(self, invocation: &Invocation) -> (Self, UpgradeError) {
        let state = match self.write_state() {
            Ok(state) => state,
            Err(e) => return (self, e),
        };
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
        let state = HandOverState {
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
            sessions: self
                .sessions
                .iter()
                .map(|s| SessionState {
                    sid: s.sid.0,
                    peer: s.peer,
                    miner_fd: s.miner.as_raw_fd(),
                    upstream_fds: s
                        .upstreams
                        .iter()
                        .map(|(id, fd)| (*id, fd.as_raw_fd()))
                        .collect(),
                    snapshot: s.snapshot.clone(),
                })
                .collect(),
        };
        let fd = rustix::fs::memfd_create("switchyard-upgrade", rustix::fs::MemfdFlags::CLOEXEC)
            .map_err(std::io::Error::from)?;
        let mut file = std::fs::File::from(fd);
        let mut writer = std::io::BufWriter::new(&mut file);
        serde_json::to_writer(&mut writer, &state)?;
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
            set_cloexec(&session.miner, !inherited)?;
            for (_, fd) in &session.upstreams {
                set_cloexec(fd, !inherited)?;
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

/// In the new image: the state the old one handed over, if this process is one (its
/// descriptors owned, close-on-exec set again), and the peers of sessions whose descriptors
/// were unusable (closed).
pub fn take_handed_over() -> Result<Option<(HandOver, Vec<SocketAddr>)>, ResumeError> {
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
    let mut file = inherited.file(fd)?;
    set_cloexec(&file, true)?;
    let mut json = Vec::new();
    file.read_to_end(&mut json)?;
    drop(file);
    let state: HandOverState = serde_json::from_slice(&json)?;
    if state.format != FORMAT {
        return Err(ResumeError::Format(state.format));
    }
    let listener = OwnedFd::from(inherited.tcp_listener(state.listener_fd)?);
    set_cloexec(&listener, true)?;
    let mut sessions = Vec::with_capacity(state.sessions.len());
    let mut unusable = Vec::new();
    for session in state.sessions {
        match adopt_session(&mut inherited, &session) {
            Ok((miner, upstreams)) => sessions.push(HandedSession {
                sid: SessionId(session.sid),
                peer: session.peer,
                miner,
                upstreams,
                snapshot: session.snapshot,
            }),
            Err(_) => unusable.push(session.peer),
        }
    }
    Ok(Some((
        HandOver {
            listener: Some(listener),
            listen_addr: state.listen_addr,
            lease: state.lease.map(ServerIdLease::from),
            server_id: state.server_id,
            sid_cursor: state.sid_cursor,
            closed_in_handshake: state.closed_in_handshake,
            sessions,
        },
        unusable,
    )))
}

#[allow(clippy::type_complexity)]
fn adopt_session(
    inherited: &mut Inherited,
    session: &SessionState,
) -> Result<(OwnedFd, Vec<(UpstreamId, OwnedFd)>), ResumeError> {
    let miner = OwnedFd::from(inherited.tcp_stream(session.miner_fd)?);
    set_cloexec(&miner, true)?;
    let mut upstreams = Vec::with_capacity(session.upstream_fds.len());
    for (id, fd) in &session.upstream_fds {
        let upstream = OwnedFd::from(inherited.tcp_stream(*fd)?);
        set_cloexec(&upstream, true)?;
        upstreams.push((*id, upstream));
    }
    Ok((miner, upstreams))
}
