//! Stratum framing: a message is one line ending in `\n` (SPEC §1). [`LineReader`] reads whole
//! lines from a socket through one buffer with a bound on the line length, so memory per
//! session stays bounded whatever the peer sends; a partial line stays in the buffer until the
//! rest arrives (and survives a switch of upstream: the reader is the miner's, not the
//! upstream's).

#![forbid(unsafe_code)]

use bytes::{Bytes, BytesMut};
use std::{
    mem::MaybeUninit,
    pin::Pin,
    task::{Context, Poll},
};
use thiserror::Error;

use tokio::io::{AsyncRead, ReadBuf};

/// The default longest line, in bytes (without the `\n`).
pub const DEFAULT_MAX_LINE: usize = 16 * 1024;

/// The size of the first read into an empty buffer.
const FIRST_READ: usize = 512;

/// The largest single read.
const MAX_READ: usize = 8 * 1024;

/// Why a line could not be read.
#[derive(Debug, Error)]
pub enum FrameError {
    /// The peer sent more than the bound without a `\n`.
    #[error("line longer than {0} bytes")]
    TooLong(usize),
    /// The socket failed.
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// Reads whole lines; see the module doc.
#[derive(Debug)]
pub struct LineReader<R> {
    inner: R,
    buffer: BytesMut,
    max_line: usize,
    /// Where the search for `\n` resumes in `buffer`.
    scanned: usize,
}

impl<R: AsyncRead + Unpin> LineReader<R> {
    /// A reader of lines of at most `max_line` bytes.
    pub fn new(inner: R, max_line: usize) -> Self {
        Self {
            inner,
            buffer: BytesMut::new(),
            max_line,
            scanned: 0,
        }
    }

    /// The next line, without its `\n` (and without a `\r` before it); `None` at a clean end of
    /// stream. A partial line at the end of the stream is dropped: it is not a message.
    pub async fn read_line(&mut self) -> Result<Option<Bytes>, FrameError> {
        self.read(false).await
    }

    /// The next line with its `\n` (and any `\r` before it) kept, ready to relay as it is;
    /// `None` at a clean end of stream. Cancel-safe: a partial line stays buffered.
    pub async fn read_raw_line(&mut self) -> Result<Option<Bytes>, FrameError> {
        self.read(true).await
    }

    async fn read(&mut self, raw: bool) -> Result<Option<Bytes>, FrameError> {
        std::future::poll_fn(|cx| self.poll_line(raw, cx)).await
    }

    /// [`Self::read_raw_line`] as a poll, for a loop that polls its sockets itself (the relay):
    /// no future is kept between polls, only the buffer.
    pub fn poll_raw_line(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Option<Bytes>, FrameError>> {
        self.poll_line(true, cx)
    }

    fn poll_line(
        &mut self,
        raw: bool,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Option<Bytes>, FrameError>> {
        loop {
            if let Some(line) = self.take_line(raw)? {
                return Poll::Ready(Ok(Some(line)));
            }
            // Small first reads, growing with a long line: an idle session holds no buffer
            // (it is released once every line in it is taken) and a busy one little.
            let want = self
                .buffer
                .len()
                .clamp(FIRST_READ, MAX_READ)
                .min(self.max_line + 1 - self.buffer.len())
                .max(1);
            if self.buffer.is_empty() {
                // Nothing buffered (the common case between lines): read onto the stack and
                // keep only what came, so that a poll that finds nothing allocates nothing.
                let mut scratch = [MaybeUninit::<u8>::uninit(); FIRST_READ];
                let mut dst = ReadBuf::uninit(&mut scratch);
                match Pin::new(&mut self.inner).poll_read(cx, &mut dst) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e.into())),
                    Poll::Ready(Ok(())) if dst.filled().is_empty() => {
                        return Poll::Ready(Ok(None));
                    }
                    Poll::Ready(Ok(())) => self.buffer.extend_from_slice(dst.filled()),
                }
                continue;
            }
            let filled = self.buffer.len();
            self.buffer.resize(filled + want, 0);
            let mut dst = ReadBuf::new(&mut self.buffer[filled..]);
            let read = Pin::new(&mut self.inner).poll_read(cx, &mut dst);
            let n = dst.filled().len();
            self.buffer.truncate(filled + n);
            match read {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e.into())),
                Poll::Ready(Ok(())) if n == 0 => return Poll::Ready(Ok(None)),
                Poll::Ready(Ok(())) => {}
            }
        }
    }

    /// A complete line from the buffer, if there is one.
    fn take_line(&mut self, raw: bool) -> Result<Option<Bytes>, FrameError> {
        match memchr::memchr(b'\n', &self.buffer[self.scanned..]) {
            Some(i) => {
                let end = self.scanned + i;
                if end > self.max_line {
                    return Err(FrameError::TooLong(self.max_line));
                }
                self.scanned = 0;
                let mut line = if end + 1 == self.buffer.len() {
                    // The whole buffer is the line (the common case): handed over as it is,
                    // and the session keeps no buffer while idle.
                    std::mem::take(&mut self.buffer)
                } else {
                    self.buffer.split_to(end + 1)
                };
                if raw {
                    return Ok(Some(line.freeze()));
                }
                line.truncate(end);
                if line.last() == Some(&b'\r') {
                    line.truncate(end - 1);
                }
                Ok(Some(line.freeze()))
            }
            None => {
                self.scanned = self.buffer.len();
                if self.buffer.len() > self.max_line {
                    Err(FrameError::TooLong(self.max_line))
                } else {
                    Ok(None)
                }
            }
        }
    }

    /// The bytes of a line not finished yet (kept for the next upstream on a switch).
    pub fn partial(&self) -> &[u8] {
        &self.buffer
    }

    /// A reader whose buffer starts with `partial`: the start of a line read by another
    /// process (hot upgrade).
    pub fn with_partial(inner: R, max_line: usize, partial: &[u8]) -> Self {
        let mut reader = Self::new(inner, max_line);
        reader.buffer.extend_from_slice(partial);
        reader
    }

    /// The socket and the bytes of the line not finished yet.
    pub fn into_parts(self) -> (R, Bytes) {
        (self.inner, self.buffer.freeze())
    }

    /// The reader's socket.
    pub fn get_mut(&mut self) -> &mut R {
        &mut self.inner
    }

    /// The reader's socket, shared (a TCP socket is written through a shared reference).
    pub fn get_ref(&self) -> &R {
        &self.inner
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn lines_come_whole_across_reads_and_the_partial_one_waits() {
        let (mut tx, rx) = tokio::io::duplex(64);
        let mut reader = LineReader::new(rx, 100);
        use tokio::io::AsyncWriteExt;
        tx.write_all(b"{\"id\":1}\r\n{\"id\"").await.expect("write");
        assert_eq!(
            reader.read_line().await.expect("line").as_deref(),
            Some(&b"{\"id\":1}"[..])
        );
        tx.write_all(b":2}\n").await.expect("write");
        assert_eq!(
            reader.read_line().await.expect("line").as_deref(),
            Some(&b"{\"id\":2}"[..])
        );
        tx.write_all(b"half").await.expect("write");
        drop(tx);
        assert!(reader.read_line().await.expect("end").is_none());
    }

    #[tokio::test]
    async fn a_line_over_the_bound_is_an_error_without_buffering_it_all() {
        let (mut tx, rx) = tokio::io::duplex(1 << 16);
        let mut reader = LineReader::new(rx, 1024);
        use tokio::io::AsyncWriteExt;
        let writer = tokio::spawn(async move {
            let chunk = vec![b'x'; 4096];
            for _ in 0..256 {
                if tx.write_all(&chunk).await.is_err() {
                    break;
                }
            }
        });
        assert!(matches!(
            reader.read_line().await,
            Err(FrameError::TooLong(1024))
        ));
        assert!(reader.partial().len() <= 1025, "buffer stays bounded");
        drop(reader);
        writer.await.expect("writer");
    }
}
