//! What the relay needs to know of one Stratum line, read cheaply: its id, its method, the
//! job ID a submit names or a notification announces, and whether a job is clean. The line is
//! read through borrowed slices of itself ([`RawValue`]), without building a JSON tree, so
//! relaying a line costs one scan of it; the line itself is relayed as it came.

#![forbid(unsafe_code)]

use std::{borrow::Cow, fmt};

use serde::{
    Deserialize, Deserializer,
    de::{DeserializeSeed, IgnoredAny, SeqAccess, Visitor},
};
use serde_json::value::RawValue;

/// The top-level fields the relay reads; every other field is skipped.
#[derive(Deserialize)]
struct Peek<'a> {
    #[serde(borrow, default)]
    id: Option<&'a RawValue>,
    #[serde(borrow, default)]
    method: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    params: Option<&'a RawValue>,
    #[serde(borrow, default)]
    result: Option<&'a RawValue>,
    #[serde(borrow, default)]
    error: Option<&'a RawValue>,
}

/// A line read by [`Line::read`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Line<'a> {
    /// The id as JSON text (`1`, `"abc"`); `None` when absent or `null`.
    pub id: Option<&'a str>,
    /// The method, when the line is a request or a notification.
    pub method: Option<Cow<'a, str>>,
    /// The params as JSON text.
    pub params: Option<&'a str>,
    /// The result as JSON text (answers; ETHProxy work pushed as an answer).
    pub result: Option<&'a str>,
    /// The error as JSON text (answers); `None` when absent or `null`.
    pub error: Option<&'a str>,
}

impl<'a> Line<'a> {
    /// Reads `line` (with or without its `\n`); `None` when it is not a JSON object.
    pub fn read(line: &'a [u8]) -> Option<Self> {
        let line = trim(line);
        if let Some(fast) = Self::read_compact(line) {
            return Some(fast);
        }
        let peek: Peek<'a> = serde_json::from_slice(line).ok()?;
        Some(Self {
            id: peek.id.map(RawValue::get).filter(|id| *id != "null"),
            method: peek.method,
            params: peek.params.map(RawValue::get),
            result: peek.result.map(RawValue::get).filter(|r| *r != "null"),
            error: peek.error.map(RawValue::get).filter(|e| *e != "null"),
        })
    }

    /// Compact lines (no whitespace between tokens, no escapes in keys or the method), read
    /// by a scan instead of the parser, whatever the order of their keys: sservers write
    /// `{"id":1,"result":true,"error":null}`, others `{"error":null,"id":1,"result":true}`.
    /// Anything else (whitespace, escapes, a repeated key, a line cut short) is left to the
    /// parser, which reads the same fields.
    fn read_compact(line: &'a [u8]) -> Option<Self> {
        let text = std::str::from_utf8(line).ok()?;
        let mut rest = text.strip_prefix('{')?;
        let mut read = Self {
            id: None,
            method: None,
            params: None,
            result: None,
            error: None,
        };
        if rest == "}" {
            return Some(read);
        }
        let mut seen = 0u8;
        loop {
            let after_quote = rest.strip_prefix('"')?;
            let key_end = after_quote.find('"')?;
            let key = &after_quote[..key_end];
            let after_key = after_quote[key_end + 1..].strip_prefix(':')?;
            let end = value_end(after_key)?;
            let value = &after_key[..end];
            let bit = match key {
                "id" => {
                    if value.starts_with(['[', '{']) {
                        return None;
                    }
                    read.id = (value != "null").then_some(value);
                    1
                }
                "method" => {
                    let method = value.strip_prefix('"')?.strip_suffix('"')?;
                    if method.contains('\\') {
                        return None;
                    }
                    read.method = Some(Cow::Borrowed(method));
                    2
                }
                "params" => {
                    read.params = Some(value);
                    4
                }
                "result" => {
                    read.result = (value != "null").then_some(value);
                    8
                }
                "error" => {
                    read.error = (value != "null").then_some(value);
                    16
                }
                _ if key.contains('\\') => return None,
                _ => 0,
            };
            if seen & bit != 0 {
                return None;
            }
            seen |= bit;
            rest = &after_key[end..];
            match rest.as_bytes().first()? {
                b',' => rest = &rest[1..],
                b'}' if rest.len() == 1 => return Some(read),
                _ => return None,
            }
        }
    }

    /// The `n`th param when it is a string.
    pub fn param_str(&self, n: usize) -> Option<Cow<'a, str>> {
        let params = self.params?;
        match nth_compact_str(params, n) {
            Some(found) => found.map(Cow::Borrowed),
            None => nth::<Cow<'a, str>>(params, n),
        }
    }

    /// The `n`th param when it is a boolean.
    pub fn param_bool(&self, n: usize) -> Option<bool> {
        nth::<bool>(self.params?, n)
    }

    /// ETHProxy work: a result that is an array whose first item is a `0x` string, the header
    /// hash of the job (the answer to `eth_getWork`, or work the sserver pushes with id 0).
    pub fn eth_work(&self) -> Option<Cow<'a, str>> {
        let result = self.result?;
        if !result.starts_with('[') {
            return None;
        }
        nth::<Cow<'a, str>>(result, 0).filter(|h| h.starts_with("0x"))
    }

    /// Whether the id is the `0` ETHProxy sservers push work under.
    pub fn id_is_zero(&self) -> bool {
        matches!(self.id, Some("0") | Some("\"0\""))
    }
}

/// The `n`th item of a JSON array text, when it is a `T`: read in one pass, the items before
/// it skipped, nothing allocated for them.
fn nth<'a, T: Deserialize<'a>>(array: &'a str, n: usize) -> Option<T> {
    let mut de = serde_json::Deserializer::from_str(array);
    de.deserialize_seq(NthItem::<T> {
        n,
        item: std::marker::PhantomData,
    })
    .ok()
    .flatten()
}

/// A visitor of a JSON array that keeps its `n`th item.
struct NthItem<T> {
    n: usize,
    item: std::marker::PhantomData<T>,
}

impl<'de, T: Deserialize<'de>> Visitor<'de> for NthItem<T> {
    type Value = Option<T>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an array")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        for _ in 0..self.n {
            if seq.next_element::<IgnoredAny>()?.is_none() {
                return Ok(None);
            }
        }
        // An item of another type is not an error of the line: it just is not a T.
        let item = seq.next_element_seed(Maybe::<T>(std::marker::PhantomData))?;
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(item.flatten())
    }
}

/// Deserializes a `T`, or `None` when the value is something else.
struct Maybe<T>(std::marker::PhantomData<T>);

impl<'de, T: Deserialize<'de>> DeserializeSeed<'de> for Maybe<T> {
    type Value = Option<T>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        let raw = <&'de RawValue>::deserialize(deserializer)?;
        Ok(serde_json::from_str(raw.get()).ok())
    }
}

/// The `n`th item of a compact JSON array (no whitespace) read by a scan: `Some(Some(text))`
/// for a string without escapes, `Some(None)` when the item is something else or the array is
/// shorter; `None` when the scan cannot tell (whitespace, escapes, a malformed array), which
/// leaves the array to the parser.
fn nth_compact_str(array: &str, n: usize) -> Option<Option<&str>> {
    let mut rest = array.strip_prefix('[')?;
    for i in 0..=n {
        if rest.starts_with(']') {
            return Some(None);
        }
        let end = value_end(rest)?;
        let item = &rest[..end];
        if i == n {
            return match item.strip_prefix('"').and_then(|s| s.strip_suffix('"')) {
                Some(text) if !text.contains('\\') => Some(Some(text)),
                Some(_) => None,
                None if item.starts_with(|c: char| c.is_ascii_whitespace()) => None,
                None => Some(None),
            };
        }
        rest = &rest[end..];
        rest = match rest.as_bytes().first() {
            Some(b',') => &rest[1..],
            Some(b']') => return Some(None),
            _ => return None,
        };
    }
    None
}

/// Where the JSON value at the start of `text` ends: after a string, an array or an object
/// (brackets matched, strings skipped with their escapes), or at the `,` or `}` that ends a
/// number, `true`, `false` or `null`. `None` when the text ends first.
fn value_end(text: &str) -> Option<usize> {
    let bytes = text.as_bytes();
    match bytes.first()? {
        b'"' => string_end(bytes, 0),
        b'[' | b'{' => {
            let mut depth = 0usize;
            let mut i = 0;
            while i < bytes.len() {
                match bytes[i] {
                    b'"' => {
                        i = string_end(bytes, i)?;
                        continue;
                    }
                    b'[' | b'{' => depth += 1,
                    b']' | b'}' => {
                        depth -= 1;
                        if depth == 0 {
                            return Some(i + 1);
                        }
                    }
                    _ => {}
                }
                i += 1;
            }
            None
        }
        _ => bytes
            .iter()
            .position(|b| matches!(b, b',' | b'}' | b']'))
            .filter(|&end| end > 0),
    }
}

/// Where the string starting at `bytes[start]` (a `"`) ends: just after its closing quote.
fn string_end(bytes: &[u8], start: usize) -> Option<usize> {
    let mut i = start + 1;
    while i < bytes.len() {
        i += memchr::memchr2(b'\\', b'"', &bytes[i..])?;
        match bytes[i] {
            b'\\' => i += 2,
            _ => return Some(i + 1),
        }
    }
    None
}

/// `line` without its line end.
pub fn trim(line: &[u8]) -> &[u8] {
    let mut end = line.len();
    while end > 0 && matches!(line[end - 1], b'\n' | b'\r') {
        end -= 1;
    }
    &line[..end]
}

/// A stable 64-bit digest of a job ID (FNV-1a): the relay remembers jobs by digest, 8 bytes
/// each whatever the sserver's job IDs look like, and the digest is the same in every process
/// (a hot upgrade carries them over).
pub fn job_digest(job_id: &str) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in job_id.as_bytes() {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_scan_of_a_line_agrees_with_the_parser() {
        let lines = [
            r#"{"id":1,"result":true,"error":null}"#,
            r#"{"error":null,"id":1,"result":true}"#,
            r#"{"id":"a,b","method":"mining.submit","params":["w","j",1]}"#,
            r#"{"params":["w"],"id":2,"method":"mining.authorize","jsonrpc":"2.0"}"#,
            r#"{"id":null,"method":"mining.notify","params":["j",[1,{"x":"}"}],true]}"#,
            r#"{"id":0,"jsonrpc":"2.0","result":["0xabc","0xs","0xt"]}"#,
            r#"{"id":3,"result":null,"error":[21,"Job not found",null]}"#,
            r#"{"id":[1],"result":true}"#,
            r#"{"id":4,"method":"esc\u0061ped","params":[]}"#,
            r#"{"id":5,"id":6,"result":true}"#,
            r#"{"id": 7, "result": true}"#,
            r#"{}"#,
            r#"{"id":8,"result":true"#,
        ];
        for line in lines {
            let parsed = serde_json::from_str::<Peek<'_>>(line)
                .ok()
                .map(|peek| Line {
                    id: peek.id.map(RawValue::get).filter(|id| *id != "null"),
                    method: peek.method,
                    params: peek.params.map(RawValue::get),
                    result: peek.result.map(RawValue::get).filter(|r| *r != "null"),
                    error: peek.error.map(RawValue::get).filter(|e| *e != "null"),
                });
            if let Some(scanned) = Line::read_compact(line.as_bytes()) {
                assert_eq!(Some(scanned), parsed, "{line}");
            }
            assert_eq!(Line::read(line.as_bytes()), parsed, "{line}");
        }
        assert!(Line::read_compact(br#"{"error":null,"id":1,"result":true}"#).is_some());
    }

    #[test]
    fn the_scan_of_a_param_agrees_with_the_parser() {
        let arrays = [
            r#"["a.b","btc-3","00","01","02"]"#,
            r#"["a.b",7,"x"]"#,
            r#"[1,[2,"]"],{"k":"v,"},"four"]"#,
            r#"[ "spaced" , "b"]"#,
            r#"["esc\"aped","b"]"#,
            r#"["a"]"#,
            r#"[]"#,
            r#"["a",null,true,"d"]"#,
            r#"["cut"#,
        ];
        for array in arrays {
            for n in 0..5 {
                let parsed = nth::<Cow<'_, str>>(array, n).map(Cow::into_owned);
                let scanned = match nth_compact_str(array, n) {
                    Some(found) => found.map(str::to_owned),
                    None => parsed.clone(),
                };
                assert_eq!(scanned, parsed, "{array} item {n}");
            }
        }
    }

    #[test]
    fn reads_requests_answers_and_work() {
        let submit = br#"{"id":7,"method":"mining.submit","params":["a.b","btc-3","00","01","02"]}
"#;
        let line = Line::read(submit).expect("json");
        assert_eq!(line.id, Some("7"));
        assert_eq!(line.method.as_deref(), Some("mining.submit"));
        assert_eq!(line.param_str(1).as_deref(), Some("btc-3"));

        let notify = br#"{"id":null,"method":"mining.notify","params":["j1","p","c1","c2",[],"v","n","t",true]}"#;
        let line = Line::read(notify).expect("json");
        assert_eq!(line.id, None);
        assert_eq!(line.param_str(0).as_deref(), Some("j1"));
        assert_eq!(line.param_bool(8), Some(true));

        let push = br#"{"id":0,"jsonrpc":"2.0","result":["0xabc","0xseed","0xtarget"]}"#;
        let line = Line::read(push).expect("json");
        assert!(line.id_is_zero());
        assert_eq!(line.method, None);
        assert_eq!(line.eth_work().as_deref(), Some("0xabc"));

        let answer = br#"{"id":"sy-3","result":true,"error":null}"#;
        let line = Line::read(answer).expect("json");
        assert_eq!(line.id, Some("\"sy-3\""));
        assert_eq!(line.result, Some("true"));
        assert_eq!(line.eth_work(), None);

        assert!(Line::read(b"not json\n").is_none());
        assert!(Line::read(b"[1,2]").is_none());
    }

    #[test]
    fn the_compact_scan_reads_what_the_parser_reads() {
        let lines: [&[u8]; 12] = [
            br#"{"id":7,"method":"mining.submit","params":["a.b","btc-3","00","01","02"]}"#,
            br#"{"id":"x,y","method":"mining.submit","params":["a","j\"]1",[1,{"a":"]"}]],"worker":"w"}"#,
            br#"{"id":null,"method":"mining.notify","params":["j1","p","c1","c2",[],"v","n","t",true]}"#,
            br#"{"id":4,"result":true,"error":null}"#,
            br#"{"id":"sy-3","result":[1,"]",{"x":2}],"error":[21,"Job not found",null]}"#,
            br#"{"id":0,"jsonrpc":"2.0","result":["0xabc","0xseed","0xtarget"]}"#,
            br#"{"id":1,"method":"mining.subscribe"}"#,
            br#"{"params":[1],"id":2,"method":"mining.suggest_difficulty"}"#,
            br#"{"id": 2, "method": "x", "params": []}"#,
            br#"{"id":2,"method":"ab","params":[]}"#,
            br#"{"id":2,"method":"x","params":[1,2"#,
            br#"{"id":5,"result":false}"#,
        ];
        for line in lines {
            let fast = Line::read(line);
            let peek: Option<Peek<'_>> = serde_json::from_slice(line).ok();
            let slow = peek.map(|peek| Line {
                id: peek.id.map(RawValue::get).filter(|id| *id != "null"),
                method: peek.method,
                params: peek.params.map(RawValue::get),
                result: peek.result.map(RawValue::get).filter(|r| *r != "null"),
                error: peek.error.map(RawValue::get).filter(|e| *e != "null"),
            });
            assert_eq!(fast, slow, "{}", String::from_utf8_lossy(line));
        }
    }

    #[test]
    fn job_digests_are_stable() {
        assert_eq!(job_digest(""), 0xcbf2_9ce4_8422_2325);
        assert_ne!(job_digest("btc-1"), job_digest("btc-2"));
    }
}
