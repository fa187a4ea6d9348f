//! A scripted sserver: a real TCP listener whose connections are handed to the test one by
//! one, so that the test itself decides what each line gets as an answer, and when. It is for
//! driving interleavings the simulated sserver ([`crate::sserver`]) answers too fast to
//! provoke: "hold the login answer of the new sserver until the miner's next request has gone
//! to the old one", "answer a submit only after a second switch" (TESTING.md: races are driven,
//! not hoped for).
//!
//! - [`ScriptedSserver::start`] listens on `127.0.0.1:0`; a background task accepts every
//!   connection, counts it ([`ScriptedSserver::accepted`]) and queues it for
//!   [`ScriptedSserver::next_conn`].
//! - A [`ScriptedConn`] reads the proxy's lines one at a time ([`ScriptedConn::recv`],
//!   [`ScriptedConn::recv_method`]) and writes what the test tells it to
//!   ([`ScriptedConn::send`] and the helpers for logins, jobs and ETHProxy work).
//! - The login of SPEC §2 (configure?, subscribe, auth, with the proxy's ids `configure`,
//!   `subscribe`, `auth`) can be answered in one go ([`ScriptedConn::answer_login`]) or in two
//!   steps, so that a test can hold the answers ([`ScriptedConn::read_login`], then
//!   [`ScriptedConn::finish_login`]).
//!
//! Nothing is answered unless the test says so. Every line read is kept
//! ([`ScriptedConn::lines`]) for failure messages.

use std::{
    net::{Ipv4Addr, SocketAddr},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use serde_json::{Value, json};
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::{
        TcpListener, TcpStream,
        tcp::{OwnedReadHalf, OwnedWriteHalf},
    },
    sync::{Mutex, mpsc},
    task::JoinHandle,
    time::Instant,
};

use crate::sserver::Dialect;

/// The seed hash every ETHProxy work line of [`ScriptedConn::eth_push_work`] carries.
pub const ETH_SEED_HASH: &str =
    "0x5eed5eed5eed5eed5eed5eed5eed5eed5eed5eed5eed5eed5eed5eed5eed5eed";

/// The target every ETHProxy work line of [`ScriptedConn::eth_push_work`] carries.
pub const ETH_TARGET: &str = "0x00000000ffffffffffffffffffffffffffffffffffffffffffffffffffffffff";

/// A listener whose accepted connections the test takes one by one; see the module doc.
/// Dropping it stops accepting and closes the connections not taken yet.
#[derive(Debug)]
pub struct ScriptedSserver {
    coin: String,
    dialect: Dialect,
    addr: SocketAddr,
    accepted: Arc<AtomicU64>,
    conns: Mutex<mpsc::UnboundedReceiver<TcpStream>>,
    task: JoinHandle<()>,
}

impl ScriptedSserver {
    /// A bitcoin-like scripted sserver of `coin` on a free loopback port.
    pub async fn start(coin: &str) -> Self {
        Self::start_with(coin, Dialect::Bitcoin).await
    }

    /// A scripted sserver of `coin` speaking `dialect` (which decides the login answers of
    /// [`ScriptedConn::finish_login`]) on a free loopback port.
    pub async fn start_with(coin: &str, dialect: Dialect) -> Self {
        let listener = TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))
            .await
            .expect("a loopback port to listen on");
        let addr = listener
            .local_addr()
            .expect("a bound listener has an address");
        let accepted = Arc::new(AtomicU64::new(0));
        let (tx, rx) = mpsc::unbounded_channel();
        let counter = Arc::clone(&accepted);
        let task = tokio::spawn(async move {
            loop {
                match listener.accept().await {
                    Ok((stream, _)) => {
                        let _ = stream.set_nodelay(true);
                        counter.fetch_add(1, Ordering::SeqCst);
                        if tx.send(stream).is_err() {
                            return;
                        }
                    }
                    // Out of descriptors or the like: try again a little later.
                    Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
                }
            }
        });
        Self {
            coin: coin.to_string(),
            dialect,
            addr,
            accepted,
            conns: Mutex::new(rx),
            task,
        }
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The coin (the key of the proxy's `StratumServerMap`).
    pub fn coin(&self) -> &str {
        &self.coin
    }

    /// The dialect.
    pub fn dialect(&self) -> Dialect {
        self.dialect
    }

    /// How many connections were accepted so far (taken by the test or not).
    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::SeqCst)
    }

    /// The next accepted connection, in the order they came; an error when none comes
    /// within `timeout`.
    pub async fn next_conn(&self, timeout: Duration) -> Result<ScriptedConn, String> {
        let mut conns = self.conns.lock().await;
        match tokio::time::timeout(timeout, conns.recv()).await {
            Ok(Some(stream)) => {
                let (read, write) = stream.into_split();
                Ok(ScriptedConn {
                    coin: self.coin.clone(),
                    dialect: self.dialect,
                    reader: BufReader::new(read),
                    writer: write,
                    partial: Vec::new(),
                    lines: Vec::new(),
                    skipped: Vec::new(),
                    eof: false,
                })
            }
            Ok(None) => Err(format!("{}: the accept task ended", self.coin)),
            Err(_) => Err(format!(
                "{}: no new connection within {timeout:?} ({} accepted so far)",
                self.coin,
                self.accepted()
            )),
        }
    }
}

impl Drop for ScriptedSserver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// What the proxy sent to log in (SPEC §2), as read by [`ScriptedConn::read_login`].
#[derive(Debug, Clone, PartialEq)]
pub struct LoginSeen {
    /// The `mining.configure` request, if one came.
    pub configure: Option<Value>,
    /// The `mining.subscribe` request.
    pub subscribe: Value,
    /// The login request (`mining.authorize` or `eth_submitLogin`).
    pub auth: Value,
    /// The session ID text of the subscribe: SIDHEX (bitcoin `params[1]`) or Ethereum's SID
    /// (`params[2]`).
    pub sid: String,
    /// Ethereum's protocol (`params[1]` of the subscribe), if any.
    pub protocol: Option<String>,
    /// The worker of the login, `params[0]`.
    pub worker: String,
}

/// One accepted connection, driven by the test; see the module doc. Dropping it closes the
/// connection.
#[derive(Debug)]
pub struct ScriptedConn {
    coin: String,
    dialect: Dialect,
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
    /// The bytes of a line not complete yet (kept across a timed-out read).
    partial: Vec<u8>,
    /// Every line received, parsed (lines that are not JSON as JSON strings), in order.
    pub lines: Vec<Value>,
    /// The lines [`ScriptedConn::recv_method`] and [`ScriptedConn::read_login`] passed over,
    /// in order.
    pub skipped: Vec<Value>,
    eof: bool,
}

impl ScriptedConn {
    /// This end's address and the proxy's, of the connection.
    pub fn addrs(&self) -> std::io::Result<(SocketAddr, SocketAddr)> {
        Ok((self.writer.local_addr()?, self.writer.peer_addr()?))
    }

    /// The coin of the server that accepted it.
    pub fn coin(&self) -> &str {
        &self.coin
    }

    /// The next line from the proxy, parsed; an error on end of stream, on a read error or
    /// after `timeout`. A line that is not JSON comes back as a JSON string.
    pub async fn recv(&mut self, timeout: Duration) -> Result<Value, String> {
        if self.eof {
            return Err(format!("{}: the proxy closed the connection", self.coin));
        }
        let read = tokio::time::timeout(timeout, self.reader.read_until(b'\n', &mut self.partial));
        match read.await {
            Err(_) => Err(format!(
                "{}: no line from the proxy within {timeout:?}; lines so far: {}",
                self.coin,
                self.history()
            )),
            Ok(Err(e)) => {
                self.eof = true;
                Err(format!("{}: read failed: {e}", self.coin))
            }
            Ok(Ok(_)) if !self.partial.ends_with(b"\n") => {
                self.eof = true;
                Err(format!(
                    "{}: the proxy closed the connection; lines so far: {}",
                    self.coin,
                    self.history()
                ))
            }
            Ok(Ok(_)) => {
                let raw = std::mem::take(&mut self.partial);
                let text = String::from_utf8_lossy(&raw);
                let text = text.trim_end();
                let value = serde_json::from_str::<Value>(text)
                    .unwrap_or_else(|_| Value::String(text.to_string()));
                self.lines.push(value.clone());
                Ok(value)
            }
        }
    }

    /// Reads until a request with `method`, keeping the lines passed over in
    /// [`ScriptedConn::skipped`]; an error when none comes within `timeout`.
    pub async fn recv_method(&mut self, method: &str, timeout: Duration) -> Result<Value, String> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = self
                .recv(left)
                .await
                .map_err(|e| format!("waiting for {method}: {e}"))?;
            if line["method"] == method {
                return Ok(line);
            }
            self.skipped.push(line);
        }
    }

    /// Sends one JSON value as a line.
    pub async fn send(&mut self, message: &Value) -> Result<(), String> {
        let mut line = message.to_string();
        line.push('\n');
        self.writer
            .write_all(line.as_bytes())
            .await
            .map_err(|e| format!("{}: write failed: {e}", self.coin))
    }

    /// Answers `request` (anything with an `id`) with `result` and a null error.
    pub async fn reply(&mut self, request: &Value, result: Value) -> Result<(), String> {
        let id = request.get("id").cloned().unwrap_or(Value::Null);
        self.send(&json!({"id": id, "result": result, "error": null}))
            .await
    }

    /// True when the proxy closes the connection within `timeout` (lines read meanwhile are
    /// kept in [`ScriptedConn::lines`]).
    pub async fn closed_within(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self.eof {
                return true;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            if self.recv(left).await.is_err() && !self.eof {
                return false;
            }
        }
    }

    /// Reads the login requests of SPEC §2 (configure if any, subscribe, auth) without
    /// answering them; other lines are kept in [`ScriptedConn::skipped`].
    pub async fn read_login(&mut self, timeout: Duration) -> Result<LoginSeen, String> {
        let deadline = Instant::now() + timeout;
        let mut configure = None;
        let mut subscribe = None;
        let auth = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = self
                .recv(left)
                .await
                .map_err(|e| format!("reading the login: {e}"))?;
            match line["id"].as_str() {
                Some("configure") if subscribe.is_none() => configure = Some(line),
                Some("subscribe") => subscribe = Some(line),
                Some("auth") => break line,
                _ => self.skipped.push(line),
            }
        };
        let subscribe = subscribe.ok_or_else(|| {
            format!(
                "{}: the auth came before any subscribe: {}",
                self.coin,
                self.history()
            )
        })?;
        let params = &subscribe["params"];
        let (sid, protocol) = match self.dialect {
            Dialect::Ethereum => (&params[2], params[1].as_str().map(str::to_owned)),
            _ => (&params[1], None),
        };
        let sid = sid
            .as_str()
            .ok_or_else(|| {
                format!(
                    "{}: a subscribe without a session ID: {subscribe}",
                    self.coin
                )
            })?
            .to_string();
        let worker = auth["params"][0].as_str().unwrap_or_default().to_string();
        Ok(LoginSeen {
            configure,
            subscribe,
            auth,
            sid,
            protocol,
            worker,
        })
    }

    /// Sends the answers to the login `seen`: the configure (granting the mask asked for),
    /// the subscribe (bitcoin-like: `[[["mining.set_difficulty",SID],["mining.notify",SID]],SID,8]`
    /// echoing the SID; Ethereum Stratum and ETHProxy: `true`; EthereumStratum/1.0.0 its
    /// form, NiceHash's 4-digit extranonce included), then the auth (`true`), in one write.
    pub async fn finish_login(&mut self, seen: &LoginSeen) -> Result<(), String> {
        let mut out = String::new();
        if let Some(configure) = &seen.configure {
            let mask = configure["params"][1]["version-rolling.mask"]
                .as_str()
                .unwrap_or("1fffe000");
            let answer = json!({"id": "configure", "error": null,
                                "result": {"version-rolling": true, "version-rolling.mask": mask}});
            out.push_str(&format!("{answer}\n"));
        }
        let sid = &seen.sid;
        let subscribe = match self.dialect {
            Dialect::Ethereum => {
                let agent = seen.subscribe["params"][0]
                    .as_str()
                    .unwrap_or_default()
                    .to_ascii_lowercase();
                let es1 = seen
                    .protocol
                    .as_deref()
                    .is_some_and(|p| p.to_ascii_lowercase().starts_with("ethereumstratum/"));
                if es1 {
                    let extranonce: String = if agent.starts_with("nicehash/") {
                        sid.chars().take(4).collect()
                    } else {
                        sid.clone()
                    };
                    json!([["mining.notify", sid, "EthereumStratum/1.0.0"], extranonce])
                } else {
                    json!(true)
                }
            }
            _ => json!([
                [["mining.set_difficulty", sid], ["mining.notify", sid]],
                sid,
                8
            ]),
        };
        out.push_str(&format!(
            "{}\n",
            json!({"id": "subscribe", "result": subscribe, "error": null})
        ));
        out.push_str(&format!(
            "{}\n",
            json!({"id": "auth", "result": true, "error": null})
        ));
        self.writer
            .write_all(out.as_bytes())
            .await
            .map_err(|e| format!("{}: write failed: {e}", self.coin))
    }

    /// [`ScriptedConn::read_login`] then [`ScriptedConn::finish_login`].
    pub async fn answer_login(&mut self, timeout: Duration) -> Result<LoginSeen, String> {
        let seen = self.read_login(timeout).await?;
        self.finish_login(&seen).await?;
        Ok(seen)
    }

    /// Writes `bytes` as they are (a line cut short, say).
    pub async fn send_raw(&mut self, bytes: &[u8]) -> Result<(), String> {
        self.writer
            .write_all(bytes)
            .await
            .map_err(|e| format!("{}: write failed: {e}", self.coin))
    }

    /// Sends a bitcoin `mining.notify` for `job_id`:
    /// `[job_id, prevhash, coinb1, coinb2, [], version, nbits, ntime, clean]`.
    pub async fn notify(&mut self, job_id: &str, clean: bool) -> Result<(), String> {
        let prevhash = format!("{:0>64}", hex_of(&self.coin));
        let coinb1 =
            "01000000010000000000000000000000000000000000000000000000000000000000000000ffffffff20";
        let coinb2 = "ffffffff0100f2052a010000001976a914000000000000000000000000000000000000000088ac00000000";
        self.send(&json!({"id": null, "method": "mining.notify",
                          "params": [job_id, prevhash, coinb1, coinb2, [], "20000000",
                                     "1705ae3a", "6553f100", clean]}))
            .await
    }

    /// Sends `mining.set_difficulty` `[difficulty]`.
    pub async fn set_difficulty(&mut self, difficulty: u64) -> Result<(), String> {
        self.send(&json!({"id": null, "method": "mining.set_difficulty", "params": [difficulty]}))
            .await
    }

    /// Pushes ETHProxy work: `{"id":0,"jsonrpc":"2.0","result":[header_hash, seed, target]}`
    /// with [`ETH_SEED_HASH`] and [`ETH_TARGET`].
    pub async fn eth_push_work(&mut self, header_hash: &str) -> Result<(), String> {
        self.send(&json!({"id": 0, "jsonrpc": "2.0",
                          "result": [header_hash, ETH_SEED_HASH, ETH_TARGET]}))
            .await
    }

    /// The lines received so far, for failure messages.
    pub fn history(&self) -> String {
        let lines: Vec<String> = self.lines.iter().map(Value::to_string).collect();
        format!("[{}]", lines.join(", "))
    }
}

/// The bytes of `text` as hex digits.
fn hex_of(text: &str) -> String {
    text.bytes().map(|b| format!("{b:02x}")).collect()
}
