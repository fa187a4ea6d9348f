//! A pool backend's user-list API (SPEC §7) for tests: a real HTTP server on loopback serving
//! scripted answers per coin, in order, and recording every `last_id` it was asked for. When a
//! coin's script runs out it answers an empty page.

use std::{
    collections::{HashMap, VecDeque},
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::{
    Router,
    extract::{Path, Query, State},
    http::StatusCode,
    response::{IntoResponse, Response},
    routing::get,
};
use tokio::{net::TcpListener, task::JoinHandle};

/// One scripted answer.
#[derive(Debug, Clone)]
pub struct Answer {
    /// The HTTP status.
    pub status: u16,
    /// The body.
    pub body: String,
    /// How long to wait before answering.
    pub delay: Duration,
}

impl Answer {
    /// A 200 answer with `body`.
    pub fn ok(body: impl Into<String>) -> Self {
        Self {
            status: 200,
            body: body.into(),
            delay: Duration::ZERO,
        }
    }

    /// A page with `data` as its entries.
    pub fn page(users: &[(&str, u64)]) -> Self {
        let data: serde_json::Map<String, serde_json::Value> = users
            .iter()
            .map(|(n, p)| ((*n).to_owned(), (*p).into()))
            .collect();
        Self::ok(serde_json::json!({"err_no": 0, "err_msg": null, "data": data}).to_string())
    }
}

#[derive(Debug, Default)]
struct Script {
    answers: HashMap<String, VecDeque<Answer>>,
    asked: HashMap<String, Vec<u64>>,
}

/// The fixture server; see the module doc.
#[derive(Debug)]
pub struct UserListBackend {
    /// Where it listens.
    pub addr: SocketAddr,
    script: Arc<Mutex<Script>>,
    task: JoinHandle<()>,
}

impl UserListBackend {
    /// Starts the server with no script.
    pub async fn start() -> std::io::Result<Self> {
        let script = Arc::new(Mutex::new(Script::default()));
        let app = Router::new()
            .route("/{coin}/userlist", get(answer))
            .with_state(Arc::clone(&script));
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(Self { addr, script, task })
    }

    /// The list URL of `coin`.
    pub fn url(&self, coin: &str) -> String {
        format!("http://{}/{coin}/userlist", self.addr)
    }

    /// Queues answers for `coin`.
    pub fn script(&self, coin: &str, answers: impl IntoIterator<Item = Answer>) {
        let mut script = self.script.lock().unwrap_or_else(|e| e.into_inner());
        script
            .answers
            .entry(coin.to_owned())
            .or_default()
            .extend(answers);
    }

    /// The `last_id`s `coin`'s list was asked for, in order.
    pub fn asked(&self, coin: &str) -> Vec<u64> {
        let script = self.script.lock().unwrap_or_else(|e| e.into_inner());
        script.asked.get(coin).cloned().unwrap_or_default()
    }

    /// Answers still queued for `coin`.
    pub fn remaining(&self, coin: &str) -> usize {
        let script = self.script.lock().unwrap_or_else(|e| e.into_inner());
        script.answers.get(coin).map_or(0, VecDeque::len)
    }
}

impl Drop for UserListBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn answer(
    State(script): State<Arc<Mutex<Script>>>,
    Path(coin): Path<String>,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    let last_id = query
        .get("last_id")
        .and_then(|s| s.parse::<u64>().ok())
        .unwrap_or(u64::MAX);
    let next = {
        let mut script = script.lock().unwrap_or_else(|e| e.into_inner());
        script.asked.entry(coin.clone()).or_default().push(last_id);
        script.answers.get_mut(&coin).and_then(VecDeque::pop_front)
    };
    let answer = next.unwrap_or_else(|| Answer::ok(r#"{"err_no":0,"err_msg":null,"data":[]}"#));
    if !answer.delay.is_zero() {
        tokio::time::sleep(answer.delay).await;
    }
    let status = StatusCode::from_u16(answer.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (status, answer.body).into_response()
}
