//! A simulated miner: a real TCP client speaking Stratum line by line, for the proxy's
//! end-to-end tests and benchmarks. It checks every line it receives: a line that is not a
//! complete JSON object is counted as malformed (the Go switcher could hand miners half a
//! line), so tests can assert that none ever arrives.

use std::{net::SocketAddr, time::Duration};

use serde_json::{Value, json};
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::{
        TcpSocket,
        tcp::{OwnedReadHalf, OwnedWriteHalf},
    },
    time::Instant,
};

/// A miner connection.
pub struct Miner {
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
    /// Every parsed line received, in order.
    pub received: Vec<Value>,
    /// Lines received that were not a complete JSON object.
    pub malformed: Vec<String>,
    next_id: u64,
}

/// What went wrong talking to the proxy.
#[derive(Debug, thiserror::Error)]
pub enum MinerError {
    /// A socket error.
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    /// The proxy closed the connection.
    #[error("connection closed")]
    Closed,
    /// Nothing arrived in time.
    #[error("timed out waiting for {0}")]
    Timeout(String),
}

impl Miner {
    /// Connects to `addr`.
    pub async fn connect(addr: SocketAddr) -> Result<Self, MinerError> {
        Self::connect_from(addr, None).await
    }

    /// Connects to `addr` from a given loopback source address (127.0.0.2, ...), so that many
    /// miners do not run out of ephemeral ports.
    pub async fn connect_from(
        addr: SocketAddr,
        source: Option<std::net::IpAddr>,
    ) -> Result<Self, MinerError> {
        let socket = TcpSocket::new_v4()?;
        if let Some(ip) = source {
            socket.bind(SocketAddr::new(ip, 0))?;
        }
        Self::from_stream(socket.connect(addr).await?)
    }

    /// A miner on a connected stream (for a test that set socket options itself).
    pub fn from_stream(stream: tokio::net::TcpStream) -> Result<Self, MinerError> {
        stream.set_nodelay(true)?;
        let (reader, writer) = stream.into_split();
        Ok(Self {
            reader: BufReader::new(reader),
            writer,
            received: Vec::new(),
            malformed: Vec::new(),
            next_id: 1,
        })
    }

    /// This end's address and the proxy's, of the connection.
    pub fn addrs(&self) -> std::io::Result<(SocketAddr, SocketAddr)> {
        Ok((self.writer.local_addr()?, self.writer.peer_addr()?))
    }

    /// The connection's two halves, for a test that reads and writes from separate tasks.
    pub fn into_parts(self) -> (BufReader<OwnedReadHalf>, OwnedWriteHalf) {
        (self.reader, self.writer)
    }

    /// Sends one JSON value as a line.
    pub async fn send(&mut self, value: &Value) -> Result<(), MinerError> {
        let mut line = value.to_string();
        line.push('\n');
        self.writer.write_all(line.as_bytes()).await?;
        Ok(())
    }

    /// Sends raw bytes.
    pub async fn send_raw(&mut self, bytes: &[u8]) -> Result<(), MinerError> {
        self.writer.write_all(bytes).await?;
        Ok(())
    }

    /// Sends a request with a fresh numeric id; returns the id.
    pub async fn request(&mut self, method: &str, params: Value) -> Result<u64, MinerError> {
        let id = self.next_id;
        self.next_id += 1;
        self.send(&json!({"id": id, "method": method, "params": params}))
            .await?;
        Ok(id)
    }

    /// The next line, parsed; a malformed line is recorded and skipped.
    pub async fn recv(&mut self, timeout: Duration) -> Result<Value, MinerError> {
        let deadline = Instant::now() + timeout;
        loop {
            let mut line = String::new();
            let n = tokio::time::timeout_at(deadline, self.reader.read_line(&mut line))
                .await
                .map_err(|_| MinerError::Timeout("a line".into()))??;
            if n == 0 {
                return Err(MinerError::Closed);
            }
            match serde_json::from_str::<Value>(line.trim_end()) {
                Ok(value @ Value::Object(_)) if line.ends_with('\n') => {
                    self.received.push(value.clone());
                    return Ok(value);
                }
                _ => self.malformed.push(line),
            }
        }
    }

    /// Reads lines until one satisfies `matches`; every line read is kept in `received`.
    pub async fn wait_for(
        &mut self,
        what: &str,
        timeout: Duration,
        mut matches: impl FnMut(&Value) -> bool,
    ) -> Result<Value, MinerError> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.recv(left).await {
                Ok(value) if matches(&value) => return Ok(value),
                Ok(_) => {}
                Err(MinerError::Timeout(_)) => return Err(MinerError::Timeout(what.into())),
                Err(e) => return Err(e),
            }
        }
    }

    /// The answer to request `id` (reading past notifications).
    pub async fn answer(&mut self, id: u64, timeout: Duration) -> Result<Value, MinerError> {
        self.wait_for(&format!("the answer to id {id}"), timeout, |v| {
            v.get("id") == Some(&json!(id)) && v.get("method").is_none()
        })
        .await
    }

    /// Bitcoin login: subscribe, authorize `worker`; returns the subscribe and authorize
    /// answers.
    pub async fn bitcoin_login(
        &mut self,
        worker: &str,
        timeout: Duration,
    ) -> Result<(Value, Value), MinerError> {
        let sub = self
            .request("mining.subscribe", json!(["cgminer/4.10"]))
            .await?;
        let sub = self.answer(sub, timeout).await?;
        let auth = self
            .request("mining.authorize", json!([worker, "x"]))
            .await?;
        let auth = self.answer(auth, timeout).await?;
        Ok((sub, auth))
    }

    /// Waits for a `mining.notify` whose job id starts with `coin` (the simulated sserver names
    /// jobs `btc-42`).
    pub async fn wait_job_of(
        &mut self,
        coin: &str,
        timeout: Duration,
    ) -> Result<Value, MinerError> {
        let prefix = format!("{coin}-");
        self.wait_for(&format!("a {coin} job"), timeout, |v| {
            v["method"] == "mining.notify"
                && v["params"][0]
                    .as_str()
                    .is_some_and(|j| j.starts_with(&prefix))
        })
        .await
    }

    /// True when the proxy closed the connection within `timeout` (lines read meanwhile are
    /// kept).
    pub async fn closed_within(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.recv(left).await {
                Ok(_) => {}
                Err(MinerError::Closed) | Err(MinerError::Io(_)) => return true,
                Err(MinerError::Timeout(_)) => return false,
            }
        }
    }
}
