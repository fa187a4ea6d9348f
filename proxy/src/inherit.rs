//! Descriptors a hot upgrade hands over (SPEC §9), turned back into sockets and files by the
//! new process. This is the one module of the workspace allowed `unsafe`: a raw descriptor
//! number read from the handed-over state becomes an owned descriptor here, and only here.
//!
//! [`Inherited::take`] checks each number before it is owned: not a standard stream, not taken
//! twice, and open in this process. The listener is also checked for its type
//! ([`Inherited::tcp_listener`]).

#![allow(unsafe_code)]

use std::{
    collections::HashSet,
    os::fd::{BorrowedFd, FromRawFd, OwnedFd, RawFd},
};

use rustix::net::sockopt;
use thiserror::Error;

/// Why an inherited descriptor cannot be used.
#[derive(Debug, Error)]
pub enum InheritError {
    /// Numbers 0 to 2 are the standard streams, never handed over.
    #[error("descriptor {0} is a standard stream")]
    Reserved(RawFd),
    /// The state names the number twice.
    #[error("descriptor {0} is named twice")]
    Duplicate(RawFd),
    /// Nothing is open under the number.
    #[error("descriptor {0} is not open: {1}")]
    NotOpen(RawFd, rustix::io::Errno),
    /// Not a stream socket.
    #[error("descriptor {0} is not a stream socket")]
    NotStreamSocket(RawFd),
}

/// The descriptors taken so far from what the previous process handed over.
#[derive(Debug, Default)]
pub struct Inherited {
    taken: HashSet<RawFd>,
}

impl Inherited {
    /// Nothing taken yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Owns inherited descriptor `fd`, close-on-exec again.
    pub fn take(&mut self, fd: RawFd) -> Result<OwnedFd, InheritError> {
        if (0..=2).contains(&fd) || fd < 0 {
            return Err(InheritError::Reserved(fd));
        }
        if !self.taken.insert(fd) {
            return Err(InheritError::Duplicate(fd));
        }
        // SAFETY: `fd` is borrowed only for the `fcntl` below, which fails cleanly (EBADF) if
        // nothing is open under the number; nothing in this process owns it yet (the
        // previous image handed it over across `exec`, and `taken` makes sure each number is
        // owned once).
        let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
        // One call checks that it is open and makes it close-on-exec again (so that no child
        // process inherits it).
        rustix::io::fcntl_setfd(borrowed, rustix::io::FdFlags::CLOEXEC)
            .map_err(|e| InheritError::NotOpen(fd, e))?;
        // SAFETY: `fd` is open (checked just above), was handed over by the previous image for
        // this process to own, and is owned by nothing else here: `taken` refuses a second
        // take of the same number, and no other code turns raw numbers into descriptors.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    }

    /// Inherited descriptor `fd` as a connected TCP stream, taken as the previous image left
    /// it: a non-blocking stream socket (tokio's sockets are). Neither is checked again here:
    /// thousands of sessions would pay a system call each while every one of them waits (a
    /// descriptor that were not one would fail the session's first read, nothing else).
    pub fn tcp_stream(&mut self, fd: RawFd) -> Result<std::net::TcpStream, InheritError> {
        Ok(std::net::TcpStream::from(self.take(fd)?))
    }

    /// Inherited descriptor `fd` as a listening TCP socket (non-blocking, for tokio).
    pub fn tcp_listener(&mut self, fd: RawFd) -> Result<std::net::TcpListener, InheritError> {
        let owned = self.stream_socket(fd)?;
        let listener = std::net::TcpListener::from(owned);
        listener
            .set_nonblocking(true)
            .map_err(|_| InheritError::NotStreamSocket(fd))?;
        Ok(listener)
    }

    /// Inherited descriptor `fd` as a file (the handed-over state).
    pub fn file(&mut self, fd: RawFd) -> Result<std::fs::File, InheritError> {
        Ok(std::fs::File::from(self.take(fd)?))
    }

    fn stream_socket(&mut self, fd: RawFd) -> Result<OwnedFd, InheritError> {
        let owned = self.take(fd)?;
        match sockopt::socket_type(&owned) {
            Ok(rustix::net::SocketType::STREAM) => Ok(owned),
            _ => Err(InheritError::NotStreamSocket(fd)),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::IntoRawFd;

    use super::*;

    #[test]
    fn a_socket_handed_over_comes_back_once_and_other_numbers_are_refused() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let fd = listener.into_raw_fd();
        let mut inherited = Inherited::new();
        let back = inherited.tcp_listener(fd).expect("a listener");
        assert_eq!(back.local_addr().expect("addr"), addr);
        assert!(matches!(
            inherited.tcp_listener(fd),
            Err(InheritError::Duplicate(_))
        ));
        assert!(matches!(inherited.take(1), Err(InheritError::Reserved(1))));
        drop(back);
        let mut fresh = Inherited::new();
        // Far above any open-file limit: never open.
        assert!(matches!(
            fresh.take(1_000_000),
            Err(InheritError::NotOpen(..))
        ));
        let file = std::fs::File::open("/proc/self/stat")
            .expect("open")
            .into_raw_fd();
        assert!(matches!(
            fresh.tcp_listener(file),
            Err(InheritError::NotStreamSocket(_))
        ));
    }
}
