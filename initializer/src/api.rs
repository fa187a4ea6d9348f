//! The user-list HTTP API (SPEC §7, `EnableAPIServer`): `GET /?coin=COIN&last_id=N` answers
//! `{"err_no":0,"err_msg":null,"data":{"name":puid,...}}` with the users seen for that coin (all
//! coins for an empty or missing coin) whose puid is above N, in ascending puid; `"data":{}`
//! when there are none. Names are JSON-escaped (the Go server wrote them raw). No auth, like the
//! original. A `last_id` that is not a non-negative integer is refused with `err_no` 400 and an
//! empty `data`, in an HTTP 200 reply like every answer of the Go programs' HTTP APIs (the Go
//! server read it as 0 and sent the whole list).
//!
//! Answers are pages: at most [`DEFAULT_PAGE_SIZE`] users (`UserListAPIPageSize` in the control
//! service), the lowest puids above `last_id` (a few more only when several coins' lists share
//! the last puid, so that none is skipped). A reader that asks again with the largest puid it
//! got, as sservers and initUserCoin do on their next poll, gets every user; no request makes
//! the server build an answer of the whole user table (the Go server answered every user above
//! `last_id` at once). [`crate::http_server`] serves the router within its time and connection
//! limits.

use std::{collections::HashMap, fmt::Write as _, sync::Arc};

use axum::{
    Router,
    extract::{Query, State},
    http::{StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};

use crate::listed::ListedUsers;

/// Users per answer, at most, by default: a 1,000,000-user pool is read in 10 polls, and an
/// answer stays a few MB (at most ~15 MB with 128-byte names).
pub const DEFAULT_PAGE_SIZE: usize = 100_000;

/// The router of the user-list API: `GET /`, pages of [`DEFAULT_PAGE_SIZE`]. It can be merged
/// with the switch API's router.
pub fn router(listed: Arc<ListedUsers>) -> Router {
    router_with_page_size(listed, DEFAULT_PAGE_SIZE)
}

/// The router of the user-list API answering at most `page_size` users (at least 1) at a time.
pub fn router_with_page_size(listed: Arc<ListedUsers>, page_size: usize) -> Router {
    Router::new()
        .route("/", get(user_list))
        .with_state((listed, page_size.max(1)))
}

async fn user_list(
    State((listed, page_size)): State<(Arc<ListedUsers>, usize)>,
    Query(params): Query<HashMap<String, String>>,
) -> Response {
    let coin = params.get("coin").filter(|c| !c.is_empty()).cloned();
    let last_id = match params.get("last_id").map(|s| s.trim()) {
        None | Some("") => 0,
        Some(s) => match s.parse::<u64>() {
            Ok(n) => n,
            Err(_) => {
                return (
                    StatusCode::OK,
                    [(header::CONTENT_TYPE, "application/json")],
                    r#"{"err_no":400,"err_msg":"last_id must be a non-negative integer","data":{}}"#,
                )
                    .into_response();
            }
        },
    };
    let entries =
        tokio::task::spawn_blocking(move || listed.page_after(coin.as_deref(), last_id, page_size))
            .await
            .unwrap_or_default();
    let mut body = String::with_capacity(64 + entries.len() * 24);
    body.push_str(r#"{"err_no":0,"err_msg":null,"data":{"#);
    for (i, (name, puid)) in entries.iter().enumerate() {
        if i > 0 {
            body.push(',');
        }
        let name = serde_json::to_string(name).unwrap_or_else(|_| "\"\"".into());
        let _ = write!(body, "{name}:{puid}");
    }
    body.push_str("}}");
    ([(header::CONTENT_TYPE, "application/json")], body).into_response()
}
