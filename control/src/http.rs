//! The HTTP switch API of SPEC §6, kept for pool backends: `GET|POST /switch` for one user and
//! `POST /switch/multi-user` (also spelled `/switch-multi-user`) for many, behind HTTP basic
//! auth. A thin adapter over [`SwitchCore`], like the gRPC `SwitcherAdmin` service: it
//! translates requests and answers, and never touches the store itself. The sub-pool coinbase
//! routes of SPEC §6 ([`crate::subpool`]) are served by the same router, behind the same auth.
//!
//! # Answers
//!
//! Every request the API handles is answered with the JSON shape pool backends read:
//! `{"err_no":0,"err_msg":"","success":true}` on success and
//! `{"err_no":N,"err_msg":"...","success":false}` otherwise. The API errors of SPEC §6 come with
//! HTTP 200:
//!
//! | err_no | err_msg | when |
//! |---|---|---|
//! | 101 | `puname is empty` | no `puname`, or an empty one |
//! | 102 | `puname invalid` | a name [`SwitchCore::normalize_user`] refuses: `/`, `.` or `..`, a control character, more than 128 bytes (the reason is logged, the message stays as the Go server wrote it) |
//! | 103 | `coin is empty` | no `coin`, or an empty one |
//! | 104 | `coin is inexistent` | a coin not in `AvailableCoins` |
//! | 105 | `read record failed` | never sent: the core answers reads from memory, so no read can fail |
//! | 107 | `write record failed` | the store refused the write |
//! | 108 | `usercoins is empty` | a multi-user request with no user to switch |
//!
//! Requests that never reach the switch logic are refused in the same shape, still with HTTP
//! 200 (SPEC §6: "Replies are HTTP 200", as the Go API server answered), `err_no` an HTTP-like
//! number:
//!
//! - 400 for an unreadable request: a multi-user body that is empty, not JSON, truncated or of
//!   the wrong shape (the Go server's 400); a `/switch` query string or form body that does not
//!   decode, or a non-empty `/switch` body that is neither `application/x-www-form-urlencoded`
//!   nor `multipart/form-data` (what PHP's curl sends for an array of fields), or a multipart
//!   body without a boundary or cut short.
//! - 413 for a body over the limit: [`SWITCH_BODY_LIMIT`] for `/switch`,
//!   [`MULTI_USER_BODY_LIMIT`] for the multi-user routes.
//! - 500 for a body that cannot be read at all (the connection failed), or a request that could
//!   not be processed (a failed worker task).
//!
//! The one answer that is not HTTP 200 is 401, without valid credentials, with
//! `WWW-Authenticate: Basic realm="switcher"` (as the Go server). Every route of this router
//! needs them; the user and the password are both compared in full, in constant time. An empty
//! `APIUser`/`APIPassword` is not refused here (the credentials must then be sent empty, as with
//! the Go server); refusing such a configuration is the config's business.
//!
//! Every route takes any method, as the Go server's did: `/switch` reads a form body for POST,
//! PUT and PATCH (like Go's `FormValue`) and only the query string otherwise; the multi-user
//! and sub-pool routes read the body whatever the method.
//!
//! # Choices where SPEC §6 is silent
//!
//! - `/switch` takes `puname` and `coin` from the query string, or (POST) from a form body;
//!   when both have a parameter the body's wins, as in Go's `FormValue`. A POST with an empty
//!   body needs no content type. Of repeated parameters the first counts.
//! - The multi-user body is read as JSON whatever its content type (the Go server did not
//!   check it). Missing or `null` `usercoins`/`punames`/`coin` count as empty; unknown fields
//!   are ignored.
//! - Multi-user requests are validated per (puname, coin) pair, in request order, like the Go
//!   server: an entry whose `punames` is empty adds nothing and is not checked. A request with
//!   no pair at all (no entry, or only entries with empty `punames`) gets 108.
//! - When any pair is invalid, the answer is the first invalid pair's error and nothing is
//!   written. Otherwise the pairs are written in request order, in chunks of the core's
//!   `max_batch`, one [`SwitchCore::switch_coins`] call per chunk; the answer is 107 if any
//!   write failed, and then no later chunk is tried. Such a request may be written in part
//!   (earlier chunks, and within a chunk whatever the store wrote: the embedded store writes a
//!   chunk whole or not at all, ZooKeeper entry by entry). A switch is idempotent, so the
//!   caller can send the whole request again.
//! - Case-insensitive mode (`StratumServerCaseInsensitive`) stores names lowercased; the core
//!   does it.
//!
//! # Elsewhere
//!
//! - Reading a request is bounded in time ([`serve`]: header and body read timeouts) and in
//!   size (the limits above); [`switchyard_initializer::http_server`] has the details.
//! - The safety period of SPEC §6 applies to these switches as to every other: the core holds a
//!   switch back (the answer is still success, as in the Go server) and writes it when due.
//!   The scheduled pull and the user-list API of SPEC §7 are [`crate::cron`]'s and the
//!   initializer's.

use std::{borrow::Cow, collections::BTreeSet, net::SocketAddr, sync::Arc};

use axum::{
    Router,
    body::Bytes,
    extract::{ConnectInfo, DefaultBodyLimit, FromRequest, Query, Request, State},
    http::{HeaderMap, HeaderValue, Method, StatusCode, header},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::any,
};
use base64::Engine as _;
use serde::{
    Deserialize, Serialize,
    de::{IgnoredAny, MapAccess, Visitor},
};
use switchyard_cli::Secret;
use switchyard_initializer::http_server::HttpLimits;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::{
    core::{SwitchCore, SwitchError, SwitchSource},
    metrics::SwitchCount,
    subpool::{SUB_POOL_BODY_LIMIT, SubPoolApi, SubPoolError},
    validate::InvalidInput,
};

/// The largest body `POST /switch` accepts, in bytes.
pub const SWITCH_BODY_LIMIT: usize = 64 * 1024;

/// The largest body the multi-user routes accept, in bytes: room for well over 100,000 names.
pub const MULTI_USER_BODY_LIMIT: usize = 16 * 1024 * 1024;

/// The realm of the `WWW-Authenticate` challenge.
const REALM_CHALLENGE: &str = "Basic realm=\"switcher\"";

/// The longest error message echoed from a parser, in bytes (parsers may quote the input).
const MAX_DETAIL_BYTES: usize = 200;

/// The credentials of the switch API (`APIUser`, `APIPassword`).
#[derive(Debug, Clone)]
pub struct SwitchApiAuth {
    user: String,
    password: Secret,
}

impl SwitchApiAuth {
    /// The credentials every request must present with HTTP basic auth.
    pub fn new(user: impl Into<String>, password: impl Into<Secret>) -> Self {
        Self {
            user: user.into(),
            password: password.into(),
        }
    }

    /// True when the `Authorization` header carries these credentials. Both the user and the
    /// password are compared in full, in constant time, whatever the first comparison gave.
    fn accepts(&self, headers: &HeaderMap) -> bool {
        let Some((user, password)) = basic_credentials(headers) else {
            return false;
        };
        let user_ok = constant_time_eq(user.as_bytes(), self.user.as_bytes());
        let password_ok = constant_time_eq(password.as_bytes(), self.password.expose().as_bytes());
        // `&`, not `&&`: no short cut on the first result.
        user_ok & password_ok
    }
}

/// The user and password of a `Basic` `Authorization` header, if it has a well-formed one.
fn basic_credentials(headers: &HeaderMap) -> Option<(String, String)> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?.trim();
    let (scheme, encoded) = value.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()?;
    let decoded = String::from_utf8(decoded).ok()?;
    let (user, password) = decoded.split_once(':')?;
    Some((user.to_owned(), password.to_owned()))
}

/// Compares two byte strings in time that depends on their lengths only, never on where they
/// differ.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = u8::from(a.len() != b.len());
    for i in 0..a.len().max(b.len()) {
        let x = a.get(i).copied().unwrap_or(0);
        let y = b.get(i).copied().unwrap_or(0);
        diff |= x ^ y;
    }
    std::hint::black_box(diff) == 0
}

/// The JSON body of every answer.
#[derive(Debug, Serialize)]
struct Reply {
    err_no: u32,
    err_msg: String,
    success: bool,
}

/// An API error of SPEC §6, answered with HTTP 200.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ApiError {
    PunameEmpty,
    PunameInvalid,
    CoinEmpty,
    CoinInexistent,
    /// 105: kept for the table of SPEC §6; see the module doc.
    #[expect(dead_code, reason = "reads come from memory and cannot fail")]
    ReadRecordFailed,
    WriteRecordFailed,
    UsercoinsEmpty,
}

impl ApiError {
    fn err_no(self) -> u32 {
        match self {
            Self::PunameEmpty => 101,
            Self::PunameInvalid => 102,
            Self::CoinEmpty => 103,
            Self::CoinInexistent => 104,
            Self::ReadRecordFailed => 105,
            Self::WriteRecordFailed => 107,
            Self::UsercoinsEmpty => 108,
        }
    }

    fn message(self) -> &'static str {
        match self {
            Self::PunameEmpty => "puname is empty",
            Self::PunameInvalid => "puname invalid",
            Self::CoinEmpty => "coin is empty",
            Self::CoinInexistent => "coin is inexistent",
            Self::ReadRecordFailed => "read record failed",
            Self::WriteRecordFailed => "write record failed",
            Self::UsercoinsEmpty => "usercoins is empty",
        }
    }
}

impl From<&InvalidInput> for ApiError {
    fn from(invalid: &InvalidInput) -> Self {
        match invalid {
            InvalidInput::EmptyUser => Self::PunameEmpty,
            InvalidInput::UserTooLong(_)
            | InvalidInput::UserHasSlash
            | InvalidInput::UserHasDots
            | InvalidInput::UserHasForbiddenChar(_) => Self::PunameInvalid,
            InvalidInput::EmptyCoin => Self::CoinEmpty,
            InvalidInput::UnknownCoin(_) => Self::CoinInexistent,
        }
    }
}

impl From<&SwitchError> for ApiError {
    fn from(e: &SwitchError) -> Self {
        match e {
            SwitchError::Invalid(invalid) => invalid.into(),
            SwitchError::Store(_) => Self::WriteRecordFailed,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        reply(StatusCode::OK, self.err_no(), self.message().to_owned())
    }
}

/// A refusal before the switch logic: HTTP 200 (SPEC §6) with `err_no` the number of `status`.
fn refusal(status: StatusCode, message: impl Into<String>) -> Response {
    reply(StatusCode::OK, u32::from(status.as_u16()), message.into())
}

fn reply(status: StatusCode, err_no: u32, err_msg: String) -> Response {
    let success = err_no == 0;
    (
        status,
        axum::Json(Reply {
            err_no,
            err_msg,
            success,
        }),
    )
        .into_response()
}

fn success() -> Response {
    reply(StatusCode::OK, 0, String::new())
}

/// Keeps parser messages short: some quote the input.
fn bounded(message: impl std::fmt::Display) -> String {
    let mut s = message.to_string();
    if s.len() > MAX_DETAIL_BYTES {
        let mut end = MAX_DETAIL_BYTES;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
        s.push('…');
    }
    s
}

/// The router of the switch API over `core`, every route behind `auth`, with the sub-pool
/// routes disabled (they answer 403 `API disabled`, as the Go server without
/// `ZKSubPoolUpdateBaseDir`); see [`router_with_sub_pool`].
pub fn router(core: Arc<SwitchCore>, auth: SwitchApiAuth) -> Router {
    router_with_sub_pool(core, auth, Arc::new(SubPoolApi::disabled()))
}

/// The router of the switch API over `core` and the sub-pool API over `sub_pool`, every route
/// behind `auth`.
///
/// Its routes: `/switch`, `/switch/multi-user`, `/switch-multi-user`, `/subpool/get-coinbase`,
/// `/subpool-get-coinbase`, `/subpool/update-coinbase`, `/subpool-update-coinbase`, any
/// method. It has no fallback, so it can be merged with other routers on the same listener
/// (unknown paths get an empty 404).
pub fn router_with_sub_pool(
    core: Arc<SwitchCore>,
    auth: SwitchApiAuth,
    sub_pool: Arc<SubPoolApi>,
) -> Router {
    let auth = Arc::new(auth);
    let switch_routes = Router::new()
        .route(
            "/switch",
            any(switch).layer(DefaultBodyLimit::max(SWITCH_BODY_LIMIT)),
        )
        .route(
            "/switch/multi-user",
            any(multi_user).layer(DefaultBodyLimit::max(MULTI_USER_BODY_LIMIT)),
        )
        .route(
            "/switch-multi-user",
            any(multi_user).layer(DefaultBodyLimit::max(MULTI_USER_BODY_LIMIT)),
        )
        .with_state(core);
    let limit = || DefaultBodyLimit::max(SUB_POOL_BODY_LIMIT);
    let sub_pool_routes = Router::new()
        .route("/subpool/get-coinbase", any(get_coinbase).layer(limit()))
        .route("/subpool-get-coinbase", any(get_coinbase).layer(limit()))
        .route(
            "/subpool/update-coinbase",
            any(update_coinbase).layer(limit()),
        )
        .route(
            "/subpool-update-coinbase",
            any(update_coinbase).layer(limit()),
        )
        .with_state(sub_pool);
    switch_routes
        .merge(sub_pool_routes)
        .route_layer(middleware::from_fn_with_state(auth, require_auth))
}

/// Serves `router` on `listener` within `limits` (header and body read timeouts, connections)
/// until `shutdown` is cancelled, then stops taking connections and returns once the requests
/// in flight are answered.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: HttpLimits,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let local = listener.local_addr().ok();
    info!(addr = ?local, ?limits, "HTTP switch API listening");
    switchyard_initializer::http_server::serve(listener, router, limits, shutdown).await?;
    info!(addr = ?local, "HTTP switch API stopped");
    Ok(())
}

/// [`serve`] over TLS (https) with `tls`'s certificate, reloaded as its files change.
pub async fn serve_tls(
    listener: TcpListener,
    tls: Arc<switchyard_tls::ServerTls>,
    router: Router,
    limits: HttpLimits,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    use futures::StreamExt;
    let local = listener.local_addr().ok();
    info!(addr = ?local, ?limits, "HTTP switch API listening over TLS");
    tokio::spawn(switchyard_tls::keep_reloaded(
        Arc::clone(&tls),
        shutdown.child_token(),
    ));
    let incoming =
        switchyard_tls::accept_tls(listener, tls, shutdown.child_token()).map(|stream| {
            stream.and_then(|stream| {
                let peer = stream.get_ref().0.peer_addr()?;
                Ok((stream, peer))
            })
        });
    switchyard_initializer::http_server::serve_incoming(incoming, router, limits, shutdown).await;
    info!(addr = ?local, "HTTP switch API stopped");
    Ok(())
}

/// The peer of a request, when the server recorded it.
fn peer(request: &Request) -> Option<SocketAddr> {
    request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0)
}

async fn require_auth(
    State(auth): State<Arc<SwitchApiAuth>>,
    request: Request,
    next: Next,
) -> Response {
    if auth.accepts(request.headers()) {
        return next.run(request).await;
    }
    info!(
        peer = ?peer(&request),
        path = request.uri().path(),
        err_no = 401,
        "switch API request refused: missing or wrong credentials"
    );
    let mut response = reply(StatusCode::UNAUTHORIZED, 401, "unauthorized".to_owned());
    response.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static(REALM_CHALLENGE),
    );
    response
}

/// Form or query parameters as pairs, in order.
type Params = Vec<(String, String)>;

/// The first value of `key`: in the body's parameters first, then in the query's.
fn param<'a>(body: &'a Params, query: &'a Params, key: &str) -> Option<&'a str> {
    body.iter()
        .chain(query)
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

/// The request's `Content-Type`, empty when it has none (or one that is not text).
fn content_type(headers: &HeaderMap) -> &str {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
}

/// The same test as axum's `Form` extractor, which reads the body when this holds.
fn is_form(headers: &HeaderMap) -> bool {
    content_type(headers).starts_with("application/x-www-form-urlencoded")
}

/// Whether the body is `multipart/form-data` (what PHP's curl sends for an array of fields),
/// which Go's `FormValue` read too.
fn is_multipart(headers: &HeaderMap) -> bool {
    content_type(headers)
        .get(..19)
        .is_some_and(|t| t.eq_ignore_ascii_case("multipart/form-data"))
}

/// Reads a `multipart/form-data` body's fields, in order, as Go's `FormValue` sees them: a
/// part with a file name is a file, not a form value, and is skipped. The body is bounded like
/// a form's ([`SWITCH_BODY_LIMIT`]); an error is the answer to send.
async fn read_multipart_body(request: Request) -> Result<Params, Response> {
    let unreadable = |detail: String| {
        refusal(
            StatusCode::BAD_REQUEST,
            format!("unreadable multipart body: {}", bounded(detail)),
        )
    };
    let failed = |e: axum::extract::multipart::MultipartError| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            too_large(SWITCH_BODY_LIMIT)
        } else {
            unreadable(e.body_text())
        }
    };
    let mut multipart = axum::extract::Multipart::from_request(request, &())
        .await
        .map_err(|rejection| unreadable(rejection.body_text()))?;
    let mut params = Params::new();
    while let Some(field) = multipart.next_field().await.map_err(failed)? {
        let name = field.name().map(str::to_owned);
        match name.filter(|_| field.file_name().is_none()) {
            Some(name) => params.push((name, field.text().await.map_err(failed)?)),
            // A file or a nameless part: read whole (any bytes) and dropped, the next part
            // starts after it.
            None => drop(field.bytes().await.map_err(failed)?),
        }
    }
    Ok(params)
}

/// Reads a POST /switch body's parameters; an error is the answer to send.
async fn read_form_body(request: Request) -> Result<Params, Response> {
    if is_multipart(request.headers()) {
        return read_multipart_body(request).await;
    }
    if is_form(request.headers()) {
        return match axum::Form::<Params>::from_request(request, &()).await {
            Ok(axum::Form(params)) => Ok(params),
            Err(rejection) if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE => {
                Err(too_large(SWITCH_BODY_LIMIT))
            }
            Err(rejection) => Err(refusal(
                StatusCode::BAD_REQUEST,
                format!("unreadable form body: {}", bounded(rejection.body_text())),
            )),
        };
    }
    match Bytes::from_request(request, &()).await {
        Ok(bytes) if bytes.is_empty() => Ok(Params::new()),
        Ok(_) => Err(refusal(
            StatusCode::BAD_REQUEST,
            "a /switch body must be application/x-www-form-urlencoded or multipart/form-data",
        )),
        Err(rejection) if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            Err(too_large(SWITCH_BODY_LIMIT))
        }
        Err(rejection) => Err(unreadable_body(&rejection.body_text())),
    }
}

fn too_large(limit: usize) -> Response {
    refusal(
        StatusCode::PAYLOAD_TOO_LARGE,
        format!("request body is larger than {limit} bytes"),
    )
}

/// A body that could not be read at all (the Go server's 500).
fn unreadable_body(detail: &str) -> Response {
    refusal(
        StatusCode::INTERNAL_SERVER_ERROR,
        format!("cannot read the request body: {}", bounded(detail)),
    )
}

/// `/switch?puname=NAME&coin=COIN`, any method; POST, PUT and PATCH may send a form body.
async fn switch(State(core): State<Arc<SwitchCore>>, request: Request) -> Response {
    let query = match Query::<Params>::try_from_uri(request.uri()) {
        Ok(Query(params)) => params,
        Err(rejection) => {
            warn!(
                err_no = 400,
                "switch request with an unreadable query string"
            );
            return refusal(
                StatusCode::BAD_REQUEST,
                format!(
                    "unreadable query string: {}",
                    bounded(rejection.body_text())
                ),
            );
        }
    };
    // The methods whose body Go's `FormValue` reads.
    let body = if [Method::POST, Method::PUT, Method::PATCH].contains(request.method()) {
        match read_form_body(request).await {
            Ok(params) => params,
            Err(response) => {
                warn!("switch request with an unreadable body; refused");
                return response;
            }
        }
    } else {
        Params::new()
    };
    let puname = param(&body, &query, "puname").unwrap_or_default();
    let coin = param(&body, &query, "coin").unwrap_or_default();

    let source = SwitchSource::Http;
    match core.switch_coin(source, puname, coin).await {
        Ok(outcome) => {
            match outcome.pending_until {
                Some(due) => info!(
                    source = %source,
                    outcome = %SwitchCount::HeldBack,
                    users = 1,
                    user = %outcome.record.user,
                    coin,
                    current = %outcome.record.coin,
                    apply_at = due,
                    held_until = %crate::core::utc_text(due),
                    err_no = 0,
                    "HTTP switch held back by the safety period"
                ),
                None => info!(
                    source = %source,
                    outcome = %SwitchCount::Written,
                    users = 1,
                    user = %outcome.record.user,
                    coin = %outcome.record.coin,
                    previous = outcome.previous_coin.as_deref().unwrap_or(""),
                    revision = outcome.record.revision,
                    err_no = 0,
                    "HTTP switch applied"
                ),
            }
            success()
        }
        Err(e) => {
            let api = ApiError::from(&e);
            match &e {
                SwitchError::Store(store) => error!(
                    source = %source,
                    outcome = %SwitchCount::Failed,
                    users = 1,
                    coin = %bounded(coin),
                    err_no = api.err_no(),
                    error = %store,
                    "HTTP switch not written"
                ),
                SwitchError::Invalid(invalid) => warn!(
                    source = %source,
                    outcome = %SwitchCount::Invalid,
                    users = 1,
                    coin = %bounded(coin),
                    err_no = api.err_no(),
                    reason = %invalid,
                    "HTTP switch refused"
                ),
            }
            api.into_response()
        }
    }
}

/// The body of the multi-user routes. Both it and its entries are read from JSON objects only
/// (serde's derived `Deserialize` would also take arrays, the wrong shape here); missing and
/// `null` fields count as empty, unknown ones are skipped.
#[derive(Debug, Default)]
struct MultiUserRequest {
    usercoins: Option<Vec<UserCoins>>,
}

/// One entry of a multi-user request: many users to one coin.
#[derive(Debug, Default)]
struct UserCoins {
    coin: Option<String>,
    punames: Option<Vec<String>>,
}

impl<'de> Deserialize<'de> for MultiUserRequest {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Fields;
        impl<'de> Visitor<'de> for Fields {
            type Value = MultiUserRequest;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("an object with \"usercoins\"")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut this = MultiUserRequest::default();
                while let Some(key) = map.next_key::<Cow<'de, str>>()? {
                    match key.as_ref() {
                        "usercoins" => this.usercoins = map.next_value()?,
                        _ => drop(map.next_value::<IgnoredAny>()?),
                    }
                }
                Ok(this)
            }
        }
        deserializer.deserialize_map(Fields)
    }
}

impl<'de> Deserialize<'de> for UserCoins {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Fields;
        impl<'de> Visitor<'de> for Fields {
            type Value = UserCoins;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("an object with \"coin\" and \"punames\"")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut this = UserCoins::default();
                while let Some(key) = map.next_key::<Cow<'de, str>>()? {
                    match key.as_ref() {
                        "coin" => this.coin = map.next_value()?,
                        "punames" => this.punames = map.next_value()?,
                        _ => drop(map.next_value::<IgnoredAny>()?),
                    }
                }
                Ok(this)
            }
        }
        deserializer.deserialize_map(Fields)
    }
}

/// A multi-user request after parsing and validation.
enum MultiUserCheck {
    /// The body is not a multi-user request.
    Unreadable(String),
    /// An entry is invalid: its error, why, and how many pairs the request carried (none is
    /// written).
    Invalid(ApiError, InvalidInput, usize),
    /// No pair to switch.
    Empty,
    /// Every pair is valid.
    Valid(Vec<UserCoins>),
}

/// Parses a multi-user body and validates every (puname, coin) pair, in request order.
fn check_multi_user(core: &SwitchCore, body: &[u8]) -> MultiUserCheck {
    let request: MultiUserRequest = match serde_json::from_slice(body) {
        Ok(r) => r,
        Err(e) => return MultiUserCheck::Unreadable(bounded(e)),
    };
    let entries = request.usercoins.unwrap_or_default();
    let total: usize = entries
        .iter()
        .map(|e| e.punames.as_ref().map_or(0, Vec::len))
        .sum();
    let mut pairs = 0usize;
    for entry in &entries {
        let coin = entry.coin.as_deref().unwrap_or_default();
        for puname in entry.punames.iter().flatten() {
            pairs += 1;
            if let Err(invalid) = core
                .normalize_user(puname)
                .and_then(|_| core.settings().coins.check(coin))
            {
                return MultiUserCheck::Invalid(ApiError::from(&invalid), invalid, total);
            }
        }
    }
    if pairs == 0 {
        MultiUserCheck::Empty
    } else {
        MultiUserCheck::Valid(entries)
    }
}

/// `/switch/multi-user` and `/switch-multi-user`, any method.
async fn multi_user(
    State(core): State<Arc<SwitchCore>>,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Response {
    let body = match body {
        Ok(body) => body,
        Err(rejection) => {
            let too_large_body = rejection.status() == StatusCode::PAYLOAD_TOO_LARGE;
            warn!(
                err_no = if too_large_body { 413 } else { 500 },
                error = %bounded(rejection.body_text()),
                "multi-user switch request with an unreadable body"
            );
            return if too_large_body {
                too_large(MULTI_USER_BODY_LIMIT)
            } else {
                unreadable_body(&rejection.body_text())
            };
        }
    };
    // Parsing and checking up to 16 MiB of names takes a while: off the async workers.
    let checking = Arc::clone(&core);
    let checked =
        match tokio::task::spawn_blocking(move || check_multi_user(&checking, &body)).await {
            Ok(checked) => checked,
            Err(e) => {
                error!(err_no = 500, error = %e, "multi-user switch check failed");
                return refusal(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "the request could not be processed",
                );
            }
        };
    let entries = match checked {
        MultiUserCheck::Unreadable(detail) => {
            warn!(err_no = 400, error = %detail, "multi-user switch request with an unreadable body");
            return refusal(
                StatusCode::BAD_REQUEST,
                format!("unreadable multi-user body: {detail}"),
            );
        }
        MultiUserCheck::Empty => {
            let api = ApiError::UsercoinsEmpty;
            warn!(
                users = 0,
                err_no = api.err_no(),
                "multi-user switch refused"
            );
            return api.into_response();
        }
        MultiUserCheck::Invalid(api, reason, pairs) => {
            // Every asked switch is refused: counted as invalid, as the core counts its own.
            let source = SwitchSource::Http;
            core.metrics()
                .count_switches(source, SwitchCount::Invalid, pairs as u64);
            warn!(
                source = %source,
                outcome = %SwitchCount::Invalid,
                users = pairs,
                err_no = api.err_no(),
                reason = %reason,
                "multi-user switch refused; nothing written"
            );
            return api.into_response();
        }
        MultiUserCheck::Valid(entries) => entries,
    };
    write_multi_user(&core, entries).await
}

/// Writes validated multi-user entries in chunks of the core's `max_batch`.
async fn write_multi_user(core: &SwitchCore, entries: Vec<UserCoins>) -> Response {
    let coins: BTreeSet<String> = entries
        .iter()
        .filter(|e| e.punames.as_ref().is_some_and(|p| !p.is_empty()))
        .filter_map(|e| e.coin.clone())
        .collect();
    let coins = coins.into_iter().collect::<Vec<_>>().join(",");
    let mut pairs = entries.into_iter().flat_map(|entry| {
        let coin = entry.coin.unwrap_or_default();
        entry
            .punames
            .unwrap_or_default()
            .into_iter()
            .map(move |puname| (puname, coin.clone()))
    });
    let chunk_size = core.settings().max_batch.max(1);
    let source = SwitchSource::Http;
    // Switches done, of which held back by the safety period.
    let (mut done, mut held_back) = (0usize, 0usize);
    loop {
        let chunk: Vec<(String, String)> = pairs.by_ref().take(chunk_size).collect();
        if chunk.is_empty() {
            break;
        }
        let len = chunk.len();
        let failure = match core.switch_coins(source, chunk).await {
            Ok(results) => {
                held_back += results
                    .iter()
                    .filter(|r| r.as_ref().is_ok_and(|o| o.pending_until.is_some()))
                    .count();
                results.into_iter().find_map(Result::err).map(|e| {
                    let api = ApiError::from(&e);
                    (api, e.to_string())
                })
            }
            // Cannot happen (every chunk is non-empty and within max_batch); a refused write.
            Err(e) => Some((ApiError::WriteRecordFailed, e.to_string())),
        };
        if let Some((api, reason)) = failure {
            error!(
                source = %source,
                outcome = %SwitchCount::Failed,
                users_written = done,
                users_failed = len,
                coins = %coins,
                err_no = api.err_no(),
                error = %reason,
                "multi-user switch not fully written"
            );
            return api.into_response();
        }
        done += len;
    }
    // One line for the whole request, whatever its size.
    info!(
        source = %source,
        users = done,
        written = done - held_back,
        held_back,
        coins = %coins,
        revision = core.index().revision(),
        err_no = 0,
        "HTTP multi-user switch applied"
    );
    success()
}

/// The body of a sub-pool request, or the refusal to answer.
fn sub_pool_body(
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<Bytes, SubPoolError> {
    body.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            SubPoolError::TooLarge
        } else {
            SubPoolError::Unreadable(bounded(rejection.body_text()))
        }
    })
}

/// A sub-pool answer: the job maker's ack as JSON, or the error in the API's shape; HTTP 200.
fn sub_pool_reply<T: Serialize>(result: Result<T, SubPoolError>) -> Response {
    match result {
        Ok(ack) => (StatusCode::OK, axum::Json(ack)).into_response(),
        Err(e) => {
            info!(err_no = e.err_no(), error = %e, "sub-pool request answered with an error");
            reply(StatusCode::OK, e.err_no(), e.to_string())
        }
    }
}

/// `/subpool/get-coinbase` and `/subpool-get-coinbase`, any method.
async fn get_coinbase(
    State(api): State<Arc<SubPoolApi>>,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Response {
    let result = match sub_pool_body(body) {
        Ok(body) => api.get_coinbase(&body).await,
        Err(e) => Err(e),
    };
    sub_pool_reply(result)
}

/// `/subpool/update-coinbase` and `/subpool-update-coinbase`, any method.
async fn update_coinbase(
    State(api): State<Arc<SubPoolApi>>,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Response {
    let result = match sub_pool_body(body) {
        Ok(body) => api.update_coinbase(&body).await,
        Err(e) => Err(e),
    };
    sub_pool_reply(result)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constant_time_eq_compares_whole_strings() {
        assert!(constant_time_eq(b"", b""));
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"secret", b"secret\0"));
        assert!(!constant_time_eq(b"secret\0", b"secret"));
        assert!(!constant_time_eq(b"", b"x"));
    }

    fn headers(value: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        if let Ok(v) = HeaderValue::from_str(value) {
            h.insert(header::AUTHORIZATION, v);
        }
        h
    }

    #[test]
    fn basic_credentials_are_decoded() {
        let encoded = base64::engine::general_purpose::STANDARD.encode("al:ice:pa:ss");
        assert_eq!(
            basic_credentials(&headers(&format!("Basic {encoded}"))),
            Some(("al".into(), "ice:pa:ss".into()))
        );
        assert_eq!(
            basic_credentials(&headers(&format!("basic  {encoded}"))),
            Some(("al".into(), "ice:pa:ss".into()))
        );
        assert_eq!(basic_credentials(&headers("Bearer abc")), None);
        assert_eq!(basic_credentials(&headers("Basic !!!")), None);
        let no_colon = base64::engine::general_purpose::STANDARD.encode("alice");
        assert_eq!(
            basic_credentials(&headers(&format!("Basic {no_colon}"))),
            None
        );
        assert_eq!(basic_credentials(&HeaderMap::new()), None);
    }

    #[test]
    fn auth_needs_both_fields() {
        let auth = SwitchApiAuth::new("user", "pass");
        let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
        assert!(auth.accepts(&headers(&format!("Basic {}", b64("user:pass")))));
        assert!(!auth.accepts(&headers(&format!("Basic {}", b64("user:pas")))));
        assert!(!auth.accepts(&headers(&format!("Basic {}", b64("usr:pass")))));
        assert!(!auth.accepts(&headers(&format!("Basic {}", b64(":")))));
        assert!(!format!("{auth:?}").contains("pass\""));
    }

    #[test]
    fn invalid_input_maps_to_spec_numbers() {
        let cases = [
            (InvalidInput::EmptyUser, 101),
            (InvalidInput::UserHasSlash, 102),
            (InvalidInput::UserHasDots, 102),
            (InvalidInput::UserTooLong(200), 102),
            (InvalidInput::UserHasForbiddenChar(0), 102),
            (InvalidInput::EmptyCoin, 103),
            (InvalidInput::UnknownCoin("x".into()), 104),
        ];
        for (invalid, err_no) in cases {
            assert_eq!(ApiError::from(&invalid).err_no(), err_no, "{invalid:?}");
        }
    }
}
