//! Stratum framing: a message is one line ending in `\n` (SPEC §1). [`LineReader`] reads whole
//! lines from a socket through one buffer with a bound on the line length, so memory per
//! session stays bounded whatever the peer sends; a partial line stays in the buffer until the
//! rest arrives (and survives a switch of upstream: the reader is the miner's, not the
//! upstream's).

use bytes::{Bytes, BytesMut};
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncReadExt};

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
        loop {
            if let Some(line) = self.take_line(raw)? {
                return Ok(Some(line));
            }
            // Small first reads, growing with a long line: an idle session holds no buffer
            // (it is released once every line in it is taken) and a busy one little.
            let want = self
                .buffer
                .len()
                .clamp(FIRST_READ, MAX_READ)
                .min(self.max_line + 1 - self.buffer.len())
                .max(1);
            self.buffer.reserve(want);
            let n = (&mut self.inner)
                .take(want as u64)
                .read_buf(&mut self.buffer)
                .await?;
            if n == 0 {
                return Ok(None);
            }
        }
    }

    /// A complete line from the buffer, if there is one.
    fn take_line(&mut self, raw: bool) -> Result<Option<Bytes>, FrameError> {
        match self.buffer[self.scanned..].iter().position(|&b| b == b'\n') {
            Some(i) => {
                let end = self.scanned + i;
                if end > self.max_line {
                    return Err(FrameError::TooLong(self.max_line));
                }
                let mut line = self.buffer.split_to(end + 1);
                self.scanned = 0;
                if self.buffer.is_empty() {
                    // Let go of the rest of the allocation (it stays with the line until the
                    // line is dropped): an idle session keeps no buffer.
                    self.buffer = BytesMut::new();
                }
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

    /// The reader's socket.
    pub fn get_mut(&mut self) -> &mut R {
        &mut self.inner
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
