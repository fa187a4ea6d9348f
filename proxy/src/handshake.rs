//! The miner side of a session before it has an upstream (SPEC §1): the proxy answers
//! subscribe and configure itself, learns the dialect, and turns the first authorize (or
//! `eth_submitLogin`) into a [`Login`] with a normalized worker name. Pure logic over parsed
//! lines: the session task feeds it lines and writes out what it answers.

#![forbid(unsafe_code)]

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

use crate::session_id::{ChainType, SessionId};

/// The Stratum dialect a session speaks, learnt from its first requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Dialect {
    /// Bitcoin-like chains (bitcoin, decred-normal, decred-gominer).
    Bitcoin,
    /// Ethereum, ETHProxy: no subscribe, `eth_submitLogin`, JSON-RPC 2.0 replies (the default).
    EthProxy,
    /// Ethereum, plain Ethereum Stratum: subscribe answered `true`.
    EthStratum,
    /// Ethereum, EthereumStratum/1.0.0 (NiceHash).
    EthereumStratum1,
}

/// The error codes the proxy answers itself (SPEC §1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StratumError {
    /// 101: authorize before subscribe.
    NeedSubscribed,
    /// 102: a second subscribe.
    DuplicateSubscribed,
    /// 103: a request with too few params.
    TooFewParams,
    /// 104: the worker name is not a string.
    WorkerNameMustBeString,
    /// 105: the sub-account part of the worker name is empty.
    SubAccountEmpty,
    /// 201: the sub-account is unknown (and auto-registration is off or failed).
    InvalidSubAccount,
    /// 301: the user's coin has no configured sserver.
    StratumServerNotFound,
    /// 302: the coin's sserver could not be reached.
    ConnectStratumServerFailed,
}

impl StratumError {
    /// The error number.
    pub fn code(self) -> i64 {
        match self {
            Self::NeedSubscribed => 101,
            Self::DuplicateSubscribed => 102,
            Self::TooFewParams => 103,
            Self::WorkerNameMustBeString => 104,
            Self::SubAccountEmpty => 105,
            Self::InvalidSubAccount => 201,
            Self::StratumServerNotFound => 301,
            Self::ConnectStratumServerFailed => 302,
        }
    }

    /// The message.
    pub fn message(self) -> &'static str {
        match self {
            Self::NeedSubscribed => "Need Subscribed",
            Self::DuplicateSubscribed => "Duplicate Subscribed",
            Self::TooFewParams => "Too Few Params",
            Self::WorkerNameMustBeString => "Worker Name Must be a String",
            Self::SubAccountEmpty => "Sub-account Name Cannot be Empty",
            Self::InvalidSubAccount => "Invalid Sub-account Name",
            Self::StratumServerNotFound => "Stratum Server Not Found",
            Self::ConnectStratumServerFailed => "Connect Stratum Server Failed",
        }
    }

    /// A short stable label, for metrics.
    pub fn reason(self) -> &'static str {
        match self {
            Self::NeedSubscribed => "need_subscribed",
            Self::DuplicateSubscribed => "duplicate_subscribed",
            Self::TooFewParams => "too_few_params",
            Self::WorkerNameMustBeString => "worker_not_string",
            Self::SubAccountEmpty => "empty_sub_account",
            Self::InvalidSubAccount => "unknown_user",
            Self::StratumServerNotFound => "no_sserver",
            Self::ConnectStratumServerFailed => "sserver_unreachable",
        }
    }
}

/// How sub-account names are normalized (SPEC §1, worker name).
pub trait NameRules {
    /// Case-insensitive mode: sub-accounts are lowercased.
    fn case_insensitive(&self) -> bool;
    /// The case index: the canonical name for a lowercase sub-account, if the index has one.
    fn canonical_name(&self, lowercase: &str) -> Option<String>;
}

/// A miner's request, as far as the proxy reads it.
#[derive(Debug, Clone)]
pub struct Request {
    /// The request id, as the miner sent it (ids are not unique: miners reuse them freely).
    pub id: Value,
    /// The method.
    pub method: String,
    /// The params (an empty array when absent or not an array).
    pub params: Vec<Value>,
    /// Ethereum's optional top-level `worker` field.
    pub worker: Option<String>,
    /// The request says `"jsonrpc": "2.0"`.
    pub json_rpc2: bool,
}

impl Request {
    /// Parses a line; `None` when it is not a JSON object with a string `method`.
    pub fn parse(line: &[u8]) -> Option<Self> {
        let Value::Object(mut object) = serde_json::from_slice::<Value>(line).ok()? else {
            return None;
        };
        let method = match object.remove("method")? {
            Value::String(method) => method,
            _ => return None,
        };
        let params = match object.remove("params") {
            Some(Value::Array(params)) => params,
            _ => Vec::new(),
        };
        let worker = match object.remove("worker") {
            Some(Value::String(worker)) => Some(worker),
            _ => None,
        };
        Some(Self {
            id: object.remove("id").unwrap_or(Value::Null),
            method,
            params,
            worker,
            json_rpc2: object.get("jsonrpc").and_then(Value::as_str) == Some("2.0"),
        })
    }
}

/// A login the handshake accepted: what the session needs to pick an upstream and log in.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Login {
    /// The miner's request id, to answer under.
    pub id: Value,
    /// The login method (`mining.authorize` or `eth_submitLogin`).
    pub method: String,
    /// The miner's params with `params[0]` replaced by the normalized worker name.
    pub params: Vec<Value>,
    /// The normalized sub-account (the user).
    pub sub_account: String,
    /// The rest of the worker name after the sub-account, including its leading `.`; may be
    /// empty.
    pub miner_name: String,
}

impl Login {
    /// The normalized full worker name, `sub.miner`.
    pub fn worker(&self) -> String {
        format!("{}{}", self.sub_account, self.miner_name)
    }
}

/// What the handshake makes of one line.
#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    /// Nothing to do (not JSON, or a request the handshake ignores).
    Ignore,
    /// Answer the miner with this line and go on.
    Reply(String),
    /// Answer the miner with this error line and go on (the miner may try again).
    Refuse(String, StratumError),
    /// The miner logged in: look the user up and open the upstream.
    Login(Login),
    /// A request for the upstream (`mining.suggest_difficulty`, or anything else with an id
    /// the proxy does not answer itself): hold it and send it after the upstream's login.
    Hold,
}

/// The handshake state of one session.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Handshake {
    chain: ChainType,
    sid: SessionId,
    server_id: u8,
    dialect: Dialect,
    subscribed: bool,
    agent: Option<String>,
    protocol: Option<String>,
    btc_agent: bool,
    nicehash: bool,
    version_mask: Option<u32>,
    /// The miner writes JSON-RPC 2.0 (`"jsonrpc": "2.0"` in a request): the proxy's own answers
    /// take that form too.
    #[serde(default)]
    miner_json_rpc2: bool,
}

/// Keeps only the characters SPEC §1 allows in a worker name.
pub fn filter_worker_name(name: &str) -> String {
    name.chars()
        .filter(|c| c.is_ascii_alphanumeric() || ".:_|^/-".contains(*c))
        .collect()
}

/// Where a NiceHash extranonce ends: they take at most 2 bytes.
const NICEHASH_EXTRANONCE_DIGITS: usize = 4;

impl Handshake {
    /// A fresh handshake for a session with ID `sid` on a proxy with `server_id`.
    pub fn new(chain: ChainType, sid: SessionId, server_id: u8) -> Self {
        Self {
            chain,
            sid,
            server_id,
            dialect: match chain {
                ChainType::Ethereum => Dialect::EthProxy,
                _ => Dialect::Bitcoin,
            },
            subscribed: false,
            agent: None,
            protocol: None,
            btc_agent: false,
            nicehash: false,
            version_mask: None,
            miner_json_rpc2: false,
        }
    }

    /// The proxy's server ID when the session started (in the proxy's error answers).
    pub fn server_id(&self) -> u8 {
        self.server_id
    }

    /// The chain type.
    pub fn chain(&self) -> ChainType {
        self.chain
    }

    /// The session ID.
    pub fn sid(&self) -> SessionId {
        self.sid
    }

    /// The dialect learnt so far.
    pub fn dialect(&self) -> Dialect {
        self.dialect
    }

    /// The miner's agent (from its subscribe), if it sent one.
    pub fn agent(&self) -> Option<&str> {
        self.agent.as_deref()
    }

    /// Ethereum's protocol (from its subscribe), if it sent one.
    pub fn protocol(&self) -> Option<&str> {
        self.protocol.as_deref()
    }

    /// The session is a BTCAgent (one connection, many miners): closed on a switch.
    pub fn is_btc_agent(&self) -> bool {
        self.btc_agent
    }

    /// The session is a NiceHash Ethereum client.
    pub fn is_nicehash(&self) -> bool {
        self.nicehash
    }

    /// The version-rolling mask the miner asked for.
    pub fn version_mask(&self) -> Option<u32> {
        self.version_mask
    }

    /// The proxy's answers to the miner use JSON-RPC 2.0: ETHProxy, or a miner that writes
    /// 2.0 itself.
    pub fn json_rpc2(&self) -> bool {
        self.dialect == Dialect::EthProxy || self.miner_json_rpc2
    }

    /// The proxy's own requests to the sserver use JSON-RPC 2.0 (ETHProxy): the sserver's
    /// dialect decides, not the miner's.
    pub fn upstream_json_rpc2(&self) -> bool {
        self.dialect == Dialect::EthProxy
    }

    /// The SID text the miner is given (SPEC §3).
    pub fn sid_text(&self) -> String {
        self.sid.text(self.chain)
    }

    /// The extranonce an EthereumStratum/1.0.0 miner is given: the SID, or its first four hex
    /// digits for NiceHash.
    pub fn extranonce(&self) -> String {
        let sid = self.sid_text();
        if self.nicehash {
            sid.chars().take(NICEHASH_EXTRANONCE_DIGITS).collect()
        } else {
            sid
        }
    }

    /// Handles one line from the miner.
    pub fn on_line(&mut self, line: &[u8], names: &dyn NameRules) -> Step {
        let Some(request) = Request::parse(line) else {
            return Step::Ignore;
        };
        self.miner_json_rpc2 |= request.json_rpc2;
        match request.method.as_str() {
            "mining.subscribe" => self.subscribe(request),
            "mining.configure" if self.chain != ChainType::Ethereum => self.configure(request),
            "mining.authorize" => {
                if !self.subscribed && self.chain != ChainType::Ethereum {
                    return self.refuse(&request.id, StratumError::NeedSubscribed);
                }
                self.login(request, names)
            }
            "eth_submitLogin" if self.chain == ChainType::Ethereum => self.login(request, names),
            // The session ID never changes, not even across a switch: no set_extranonce is ever
            // needed, so the proxy answers this itself.
            "mining.extranonce.subscribe" if !request.id.is_null() => {
                Step::Reply(self.result_line(&request.id, Value::Bool(true)))
            }
            "mining.suggest_difficulty" => Step::Hold,
            _ if !request.id.is_null() => Step::Hold,
            _ => Step::Ignore,
        }
    }

    fn refuse(&self, id: &Value, error: StratumError) -> Step {
        Step::Refuse(self.error_line(id, error), error)
    }

    /// The error line for `error` under `id`, in the session's JSON-RPC form.
    pub fn error_line(&self, id: &Value, error: StratumError) -> String {
        error_line(
            id,
            error.code(),
            error.message(),
            self.server_id,
            self.json_rpc2(),
        )
    }

    /// A result line under `id`, in the session's JSON-RPC form.
    pub fn result_line(&self, id: &Value, result: Value) -> String {
        result_line(id, result, Value::Null, self.json_rpc2())
    }

    fn subscribe(&mut self, request: Request) -> Step {
        if self.subscribed {
            return self.refuse(&request.id, StratumError::DuplicateSubscribed);
        }
        self.subscribed = true;
        let text = |i: usize| {
            request
                .params
                .get(i)
                .and_then(Value::as_str)
                .map(|s| s.chars().take(128).collect::<String>())
        };
        self.agent = text(0);
        let agent_lower = self.agent.as_deref().unwrap_or("").to_ascii_lowercase();
        self.btc_agent = agent_lower.starts_with("btccom-agent/");
        if self.chain != ChainType::Ethereum {
            let sid = self.sid_text();
            return Step::Reply(self.result_line(
                &request.id,
                json!([
                    [["mining.set_difficulty", sid], ["mining.notify", sid]],
                    sid,
                    8
                ]),
            ));
        }
        self.protocol = text(1);
        self.nicehash = agent_lower.starts_with("nicehash/");
        let es1 = self.btc_agent
            || self
                .protocol
                .as_deref()
                .is_some_and(|p| p.to_ascii_lowercase().starts_with("ethereumstratum/"));
        if es1 {
            self.dialect = Dialect::EthereumStratum1;
            Step::Reply(self.result_line(
                &request.id,
                json!([
                    ["mining.notify", self.sid_text(), "EthereumStratum/1.0.0"],
                    self.extranonce()
                ]),
            ))
        } else {
            self.dialect = Dialect::EthStratum;
            Step::Reply(self.result_line(&request.id, json!(true)))
        }
    }

    /// BIP 310: every extension asked for gets an answer. Version rolling is granted
    /// provisionally with the miner's own mask (the sserver's `mining.set_version_mask`, sent
    /// after the login and before any job, narrows it); `subscribe-extranonce` is granted
    /// (the session ID never changes); `minimum-difficulty` is refused (the sserver sets the
    /// difficulty; `mining.suggest_difficulty` is relayed instead); `info` is taken.
    fn configure(&mut self, request: Request) -> Step {
        if request.params.len() < 2 {
            return self.refuse(&request.id, StratumError::TooFewParams);
        }
        let mask = request.params[1]
            .get("version-rolling.mask")
            .and_then(Value::as_str)
            .and_then(|hex| u32::from_str_radix(hex.trim_start_matches("0x"), 16).ok());
        let mut answer = Map::new();
        let extensions: Vec<&str> = request.params[0]
            .as_array()
            .map(|exts| exts.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        for extension in extensions.iter().take(16) {
            match *extension {
                "version-rolling" => {}
                "minimum-difficulty" => {
                    answer.insert("minimum-difficulty".into(), Value::Bool(false));
                }
                "subscribe-extranonce" => {
                    answer.insert("subscribe-extranonce".into(), Value::Bool(true));
                }
                "info" => {
                    answer.insert("info".into(), Value::Bool(true));
                }
                other => {
                    let name: String = filter_worker_name(other).chars().take(64).collect();
                    answer.insert(name, Value::Bool(false));
                }
            }
        }
        match mask {
            Some(mask) => {
                let granted = mask;
                self.version_mask = Some(granted);
                answer.insert("version-rolling".into(), Value::Bool(true));
                answer.insert(
                    "version-rolling.mask".into(),
                    Value::String(format!("{granted:08x}")),
                );
            }
            None if extensions.contains(&"version-rolling") => {
                answer.insert("version-rolling".into(), Value::Bool(false));
            }
            None => {}
        }
        Step::Reply(self.result_line(&request.id, Value::Object(answer)))
    }

    fn login(&mut self, mut request: Request, names: &dyn NameRules) -> Step {
        let Some(first) = request.params.first() else {
            return self.refuse(&request.id, StratumError::TooFewParams);
        };
        let Some(raw) = first.as_str() else {
            return self.refuse(&request.id, StratumError::WorkerNameMustBeString);
        };
        let (sub_account, miner_name) =
            match normalize_worker(raw, request.worker.as_deref(), self.chain, names) {
                Ok(parts) => parts,
                Err(error) => return self.refuse(&request.id, error),
            };
        request.params[0] = Value::String(format!("{sub_account}{miner_name}"));
        Step::Login(Login {
            id: request.id,
            method: request.method,
            params: request.params,
            sub_account,
            miner_name,
        })
    }
}

/// Normalizes a worker name (SPEC §1): filter the characters, add Ethereum's `worker` field,
/// drop a leading Ethereum wallet address, split at the first `.`, normalize the sub-account.
/// Returns the sub-account and the miner name (with its leading `.`).
pub fn normalize_worker(
    raw: &str,
    eth_worker: Option<&str>,
    chain: ChainType,
    names: &dyn NameRules,
) -> Result<(String, String), StratumError> {
    let mut name = filter_worker_name(raw);
    if chain == ChainType::Ethereum {
        if let Some(worker) = eth_worker.map(filter_worker_name) {
            name.push('.');
            name.push_str(&worker);
        }
        let bytes = name.as_bytes();
        if bytes.len() > 42
            && bytes[42] == b'.'
            && (name.starts_with("0x") || name.starts_with("0X"))
        {
            name.drain(..43);
        }
    }
    let (sub, miner) = match name.find('.') {
        Some(dot) => name.split_at(dot),
        None => (name.as_str(), ""),
    };
    if sub.is_empty() {
        return Err(StratumError::SubAccountEmpty);
    }
    let sub = if names.case_insensitive() {
        sub.to_lowercase()
    } else {
        names
            .canonical_name(&sub.to_lowercase())
            .unwrap_or_else(|| sub.to_string())
    };
    Ok((sub, miner.to_string()))
}

/// An error line: JSON-RPC 1.0 `{"id","result":null,"error":[code,msg,server_id]}` or 2.0
/// `{"id","jsonrpc":"2.0","error":{"code","message","data"}}`.
pub fn error_line(id: &Value, code: i64, message: &str, server_id: u8, json_rpc2: bool) -> String {
    let mut object = Map::new();
    object.insert("id".into(), id.clone());
    if json_rpc2 {
        object.insert("jsonrpc".into(), json!("2.0"));
        object.insert(
            "error".into(),
            json!({"code": code, "message": message, "data": server_id}),
        );
    } else {
        object.insert("result".into(), Value::Null);
        object.insert("error".into(), json!([code, message, server_id]));
    }
    Value::Object(object).to_string()
}

/// A result line (with `error` as given, usually null) in the JSON-RPC 1.0 or 2.0 form.
pub fn result_line(id: &Value, result: Value, error: Value, json_rpc2: bool) -> String {
    let mut object = Map::new();
    object.insert("id".into(), id.clone());
    if json_rpc2 {
        object.insert("jsonrpc".into(), json!("2.0"));
        if error.is_null() {
            object.insert("result".into(), result);
        } else {
            object.insert("error".into(), error);
        }
    } else {
        object.insert("result".into(), result);
        object.insert("error".into(), error);
    }
    Value::Object(object).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Rules {
        insensitive: bool,
    }

    impl NameRules for Rules {
        fn case_insensitive(&self) -> bool {
            self.insensitive
        }
        fn canonical_name(&self, lowercase: &str) -> Option<String> {
            (lowercase == "alice").then(|| "Alice".to_string())
        }
    }

    const SENSITIVE: Rules = Rules { insensitive: false };

    fn reply(step: Step) -> Value {
        match step {
            Step::Reply(line) | Step::Refuse(line, _) => {
                serde_json::from_str(&line).expect("reply is JSON")
            }
            other => panic!("expected a reply, got {other:?}"),
        }
    }

    #[test]
    fn a_miner_writing_json_rpc_2_gets_the_proxys_own_answers_in_that_form() {
        let mut hs = Handshake::new(ChainType::Bitcoin, SessionId(0x0100_0080), 1);
        let configure = br#"{"id":1,"jsonrpc":"2.0","method":"mining.configure","params":[["version-rolling"],{"version-rolling.mask":"1fffe000"}]}"#;
        assert_eq!(
            reply(hs.on_line(configure, &SENSITIVE)),
            json!({"id":1,"jsonrpc":"2.0","result":{"version-rolling":true,"version-rolling.mask":"1fffe000"}})
        );
        let early = br#"{"id":2,"jsonrpc":"2.0","method":"mining.authorize","params":["a.b","x"]}"#;
        assert_eq!(
            reply(hs.on_line(early, &SENSITIVE)),
            json!({"id":2,"jsonrpc":"2.0","error":{"code":101,"message":"Need Subscribed","data":1}})
        );
        let subscribe =
            br#"{"id":3,"jsonrpc":"2.0","method":"mining.subscribe","params":["bmminer/2.0"]}"#;
        let answer = reply(hs.on_line(subscribe, &SENSITIVE));
        assert_eq!(answer["jsonrpc"], json!("2.0"));
        assert!(answer.get("error").is_none(), "{answer}");
        assert_eq!(answer["result"][1], json!("01000080"));
        let extranonce =
            br#"{"id":4,"jsonrpc":"2.0","method":"mining.extranonce.subscribe","params":[]}"#;
        assert_eq!(
            reply(hs.on_line(extranonce, &SENSITIVE)),
            json!({"id":4,"jsonrpc":"2.0","result":true})
        );
        // The sserver still gets the Bitcoin dialect's requests.
        assert!(hs.json_rpc2() && !hs.upstream_json_rpc2());
    }

    #[test]
    fn bitcoin_subscribe_configure_and_authorize() {
        let mut hs = Handshake::new(ChainType::Bitcoin, SessionId(0x0100_0080), 1);
        let configure = br#"{"id":1,"method":"mining.configure","params":[["version-rolling"],{"version-rolling.mask":"1fffe000"}]}"#;
        assert_eq!(
            reply(hs.on_line(configure, &SENSITIVE)),
            json!({"id":1,"result":{"version-rolling":true,"version-rolling.mask":"1fffe000"},"error":null})
        );
        let early = br#"{"id":2,"method":"mining.authorize","params":["a.b","x"]}"#;
        assert_eq!(
            reply(hs.on_line(early, &SENSITIVE))["error"],
            json!([101, "Need Subscribed", 1])
        );
        let subscribe = br#"{"id":3,"method":"mining.subscribe","params":["BTCcom-Agent/1.0"]}"#;
        assert_eq!(
            reply(hs.on_line(subscribe, &SENSITIVE))["result"],
            json!([
                [
                    ["mining.set_difficulty", "01000080"],
                    ["mining.notify", "01000080"]
                ],
                "01000080",
                8
            ])
        );
        assert!(hs.is_btc_agent());
        assert_eq!(
            reply(hs.on_line(subscribe, &SENSITIVE))["error"][0],
            json!(102)
        );
        assert_eq!(hs.on_line(b"not json", &SENSITIVE), Step::Ignore);
        let auth = br#"{"id":4,"method":"mining.authorize","params":["ALICE.rig#1","x"]}"#;
        let Step::Login(login) = hs.on_line(auth, &SENSITIVE) else {
            panic!("login expected")
        };
        assert_eq!(login.sub_account, "Alice");
        assert_eq!(login.miner_name, ".rig1");
        assert_eq!(login.params, vec![json!("Alice.rig1"), json!("x")]);
        assert_eq!(hs.version_mask(), Some(0x1fff_e000));
    }

    #[test]
    fn worker_name_errors() {
        let mut hs = Handshake::new(ChainType::Bitcoin, SessionId(0x0100_0080), 7);
        hs.on_line(
            br#"{"id":1,"method":"mining.subscribe","params":[]}"#,
            &SENSITIVE,
        );
        for (line, code) in [
            (
                &br#"{"id":1,"method":"mining.authorize","params":[]}"#[..],
                103,
            ),
            (br#"{"id":1,"method":"mining.authorize","params":[5]}"#, 104),
            (
                br#"{"id":1,"method":"mining.authorize","params":[".rig"]}"#,
                105,
            ),
            (
                br##"{"id":1,"method":"mining.authorize","params":["#$%"]}"##,
                105,
            ),
            (
                br#"{"id":1,"method":"mining.configure","params":[[]]}"#,
                103,
            ),
        ] {
            assert_eq!(reply(hs.on_line(line, &SENSITIVE))["error"][0], json!(code));
        }
    }

    #[test]
    fn configure_without_a_mask_is_answered_empty() {
        let mut hs = Handshake::new(ChainType::Bitcoin, SessionId(0x0100_0080), 1);
        let line = br#"{"id":9,"method":"mining.configure","params":[[],{}]}"#;
        assert_eq!(reply(hs.on_line(line, &SENSITIVE))["result"], json!({}));
        assert_eq!(hs.version_mask(), None);
    }

    #[test]
    fn configure_answers_every_bip310_extension() {
        let mut hs = Handshake::new(ChainType::Bitcoin, SessionId(0x0100_0080), 1);
        let line = br#"{"id":1,"method":"mining.configure","params":[["version-rolling","minimum-difficulty","subscribe-extranonce","info"],{"version-rolling.mask":"ffffffff","version-rolling.min-bit-count":2,"minimum-difficulty.value":2048,"info.connection-url":"x"}]}"#;
        assert_eq!(
            reply(hs.on_line(line, &SENSITIVE))["result"],
            json!({
                "version-rolling": true,
                "version-rolling.mask": "ffffffff",
                "minimum-difficulty": false,
                "subscribe-extranonce": true,
                "info": true
            })
        );
        assert_eq!(hs.version_mask(), Some(0xffff_ffff));
    }

    #[test]
    fn handshake_requests_are_answered_or_held() {
        let mut hs = Handshake::new(ChainType::Bitcoin, SessionId(0x0100_0080), 1);
        let line = br#"{"id":5,"method":"mining.extranonce.subscribe","params":[]}"#;
        assert_eq!(reply(hs.on_line(line, &SENSITIVE))["result"], json!(true));
        let suggest = br#"{"id":6,"method":"mining.suggest_difficulty","params":[512]}"#;
        assert_eq!(hs.on_line(suggest, &SENSITIVE), Step::Hold);
        let other = br#"{"id":7,"method":"mining.get_transactions","params":[]}"#;
        assert_eq!(hs.on_line(other, &SENSITIVE), Step::Hold);
        let notification = br#"{"id":null,"method":"client.show_message","params":[]}"#;
        assert_eq!(hs.on_line(notification, &SENSITIVE), Step::Ignore);
    }

    #[test]
    fn decred_sid_texts() {
        let mut hs = Handshake::new(ChainType::DecredNormal, SessionId(0x0100_0080), 1);
        let line = br#"{"id":1,"method":"mining.subscribe","params":[]}"#;
        assert_eq!(
            reply(hs.on_line(line, &SENSITIVE))["result"][1],
            json!("000000000000000080000001")
        );
        let mut hs = Handshake::new(ChainType::DecredGominer, SessionId(0x0100_0080), 1);
        assert_eq!(
            reply(hs.on_line(line, &SENSITIVE))["result"][1],
            json!("80000001")
        );
    }

    #[test]
    fn ethereum_dialects() {
        let sid = SessionId(0x0001_2380);
        let mut proxy = Handshake::new(ChainType::Ethereum, sid, 1);
        let login = br#"{"id":1,"jsonrpc":"2.0","method":"eth_submitLogin","params":["0x0123456789012345678901234567890123456789.Bob"],"worker":"rig 1"}"#;
        let Step::Login(l) = proxy.on_line(login, &Rules { insensitive: true }) else {
            panic!("login expected")
        };
        assert_eq!(
            (l.sub_account.as_str(), l.miner_name.as_str()),
            ("bob", ".rig1")
        );
        assert!(proxy.json_rpc2());
        assert_eq!(
            serde_json::from_str::<Value>(
                &proxy.error_line(&json!(1), StratumError::InvalidSubAccount)
            )
            .expect("json"),
            json!({"id":1,"jsonrpc":"2.0","error":{"code":201,"message":"Invalid Sub-account Name","data":1}})
        );

        let mut plain = Handshake::new(ChainType::Ethereum, sid, 1);
        let sub = br#"{"id":1,"method":"mining.subscribe","params":["ethminer/0.19","Stratum"]}"#;
        assert_eq!(reply(plain.on_line(sub, &SENSITIVE))["result"], json!(true));
        assert_eq!(plain.dialect(), Dialect::EthStratum);

        let mut nicehash = Handshake::new(ChainType::Ethereum, sid, 1);
        let sub = br#"{"id":1,"method":"mining.subscribe","params":["NiceHash/1.0","EthereumStratum/1.0.0"]}"#;
        assert_eq!(
            reply(nicehash.on_line(sub, &SENSITIVE))["result"],
            json!([["mining.notify", "012380", "EthereumStratum/1.0.0"], "0123"])
        );
        assert_eq!(nicehash.dialect(), Dialect::EthereumStratum1);
        let auth = br#"{"id":2,"method":"mining.authorize","params":["bob.x","x"]}"#;
        assert!(matches!(nicehash.on_line(auth, &SENSITIVE), Step::Login(_)));
    }
}
