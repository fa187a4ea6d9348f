//! A real Prometheus for tests, from Debian's `prometheus` package (`prometheus` and
//! `promtool`): a server on a free loopback port with its own temporary directory, its HTTP API
//! ([`PrometheusServer::query`], [`PrometheusServer::series`], ...), and a small PromQL reader
//! ([`parse_expr`]) that finds the metric names, selectors and grouping labels an expression
//! uses, so a test can check them against what Prometheus scraped.

use std::{
    collections::{BTreeMap, BTreeSet},
    ffi::OsStr,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::Duration,
};

use serde_json::Value;
use tempfile::TempDir;

use crate::{control::free_port, wait::wait_until};

/// The Debian package that ships `prometheus` and `promtool`.
pub const PACKAGE: &str = "prometheus";

/// Why the Prometheus fixture failed.
#[derive(Debug, thiserror::Error)]
pub enum PrometheusError {
    /// The binary is not installed.
    #[error(
        "`{0}` is not installed: install Debian's `{PACKAGE}` package, which ships prometheus \
         and promtool (`apt-get install --no-install-recommends {PACKAGE}`; .ci/run does)"
    )]
    NotInstalled(&'static str),
    /// A file or process operation failed.
    #[error("{0}: {1}")]
    Io(String, std::io::Error),
    /// The server did not start, or did not answer in time.
    #[error("{0}")]
    Start(String),
    /// An HTTP API call failed or answered an error.
    #[error("Prometheus API {0}")]
    Api(String),
}

/// The path of `name` (`prometheus`, `promtool`): Debian's `/usr/bin/<name>`, else the first
/// on `PATH`.
pub fn binary(name: &'static str) -> Result<PathBuf, PrometheusError> {
    let debian = Path::new("/usr/bin").join(name);
    if debian.is_file() {
        return Ok(debian);
    }
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join(name))
        .find(|path| path.is_file())
        .ok_or(PrometheusError::NotInstalled(name))
}

/// Runs `promtool` with `args` in `dir`; its output, whatever its exit status.
pub fn promtool<S: AsRef<OsStr>>(dir: &Path, args: &[S]) -> Result<Output, PrometheusError> {
    Command::new(binary("promtool")?)
        .current_dir(dir)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| PrometheusError::Io("running promtool".into(), e))
}

/// A Prometheus server. Killed on drop.
#[derive(Debug)]
pub struct PrometheusServer {
    /// Where its HTTP API listens.
    pub addr: SocketAddr,
    child: Option<Child>,
    log_path: PathBuf,
    client: reqwest::Client,
    _dir: TempDir,
}

impl PrometheusServer {
    /// Starts Prometheus on `config` (the contents of prometheus.yml; YAML is a superset of
    /// JSON, so a JSON value is written as it is), on a free loopback port, with its data in
    /// a fresh temporary directory, and waits until it is ready. A port taken meanwhile is
    /// retried on a fresh one.
    pub async fn start(config: &Value) -> Result<Self, PrometheusError> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            match Self::start_once(config).await {
                Err(PrometheusError::Start(log))
                    if attempt < 5 && log.contains("address already in use") => {}
                other => return other,
            }
        }
    }

    async fn start_once(config: &Value) -> Result<Self, PrometheusError> {
        let binary = binary("prometheus")?;
        let dir = tempfile::Builder::new()
            .prefix("switchyard-prometheus-")
            .tempdir()
            .map_err(|e| PrometheusError::Io("creating a temporary directory".into(), e))?;
        let config_path = dir.path().join("prometheus.yml");
        std::fs::write(&config_path, config.to_string())
            .map_err(|e| PrometheusError::Io("writing prometheus.yml".into(), e))?;
        let port = free_port().map_err(|e| PrometheusError::Start(e.to_string()))?;
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let log_path = dir.path().join("prometheus.log");
        let log = std::fs::File::create(&log_path)
            .map_err(|e| PrometheusError::Io("creating the log".into(), e))?;
        let log_err = log
            .try_clone()
            .map_err(|e| PrometheusError::Io("cloning the log".into(), e))?;
        let child = Command::new(binary)
            .current_dir(dir.path())
            .arg(format!("--config.file={}", config_path.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .arg("--log.level=info")
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .spawn()
            .map_err(|e| PrometheusError::Io("spawning prometheus".into(), e))?;
        let mut this = Self {
            addr,
            child: Some(child),
            log_path,
            client: reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()
                .map_err(|e| PrometheusError::Start(format!("HTTP client: {e}")))?,
            _dir: dir,
        };
        this.wait_ready().await?;
        Ok(this)
    }

    async fn wait_ready(&mut self) -> Result<(), PrometheusError> {
        let url = format!("http://{}/-/ready", self.addr);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(response) = self.client.get(&url).send().await
                && response.status().is_success()
            {
                return Ok(());
            }
            let exited = self
                .child
                .as_mut()
                .is_some_and(|c| matches!(c.try_wait(), Ok(Some(_))));
            if exited || tokio::time::Instant::now() > deadline {
                return Err(PrometheusError::Start(format!(
                    "Prometheus on {} never became ready (exited: {exited})\n--- prometheus \
                     log ---\n{}",
                    self.addr,
                    self.log()
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// GETs `/api/v1/<path>` with `params`; the answer's `data` when its status is `success`.
    pub async fn api(&self, path: &str, params: &[(&str, &str)]) -> Result<Value, PrometheusError> {
        let url = format!("http://{}/api/v1/{path}", self.addr);
        let response = self
            .client
            .get(&url)
            .query(params)
            .send()
            .await
            .map_err(|e| PrometheusError::Api(format!("{path}: {e}")))?;
        let body: Value = response
            .json()
            .await
            .map_err(|e| PrometheusError::Api(format!("{path}: the answer is not JSON: {e}")))?;
        if body["status"] == "success" {
            Ok(body["data"].clone())
        } else {
            Err(PrometheusError::Api(format!(
                "{path} {params:?}: {} {}",
                body["errorType"], body["error"]
            )))
        }
    }

    /// An instant query at the current time; the samples of its vector result (a scalar or
    /// string result is returned as its one `[time, value]` pair in `value`).
    pub async fn query(&self, promql: &str) -> Result<Vec<Value>, PrometheusError> {
        let data = self.api("query", &[("query", promql)]).await?;
        match data["resultType"].as_str() {
            Some("vector") | Some("matrix") => {
                Ok(data["result"].as_array().cloned().unwrap_or_default())
            }
            _ => Ok(vec![
                serde_json::json!({"metric": {}, "value": data["result"]}),
            ]),
        }
    }

    /// The label sets of every series matching `selector` with samples since `start` (Unix
    /// seconds).
    pub async fn series(
        &self,
        selector: &str,
        start: f64,
    ) -> Result<Vec<BTreeMap<String, String>>, PrometheusError> {
        let start = format!("{start:.3}");
        let data = self
            .api("series", &[("match[]", selector), ("start", &start)])
            .await?;
        let sets = data.as_array().cloned().unwrap_or_default();
        Ok(sets
            .iter()
            .filter_map(Value::as_object)
            .map(|labels| {
                labels
                    .iter()
                    .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
                    .collect()
            })
            .collect())
    }

    /// The rule groups as `/api/v1/rules` reports them.
    pub async fn rule_groups(&self) -> Result<Vec<Value>, PrometheusError> {
        let data = self.api("rules", &[]).await?;
        Ok(data["groups"].as_array().cloned().unwrap_or_default())
    }

    /// Waits until every active scrape target is up; answers them (`job`, `scrapeUrl`).
    pub async fn wait_targets_up(
        &self,
        expected: usize,
        timeout: Duration,
    ) -> Result<Vec<(String, String)>, PrometheusError> {
        wait_until(timeout, "every scrape target up", || async {
            let data = self.api("targets", &[]).await.map_err(|e| e.to_string())?;
            let targets = data["activeTargets"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            let up: Vec<(String, String)> = targets
                .iter()
                .filter(|t| t["health"] == "up")
                .map(|t| {
                    (
                        t["labels"]["job"].as_str().unwrap_or_default().to_owned(),
                        t["scrapeUrl"].as_str().unwrap_or_default().to_owned(),
                    )
                })
                .collect();
            if targets.len() == expected && up.len() == expected {
                Ok(up)
            } else {
                Err(format!("{targets:?}"))
            }
        })
        .await
        .map_err(|e| PrometheusError::Start(format!("{e}\n--- prometheus log ---\n{}", self.log())))
    }
}

impl Drop for PrometheusServer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// One label matcher of a selector: `label op "value"`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Matcher {
    /// The label name.
    pub label: String,
    /// `=`, `!=`, `=~` or `!~`.
    pub op: String,
    /// The value, unescaped.
    pub value: String,
}

/// A vector selector: a metric name and its label matchers.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Selector {
    /// The metric name.
    pub name: String,
    /// The label matchers, as written.
    pub matchers: Vec<Matcher>,
}

/// What a PromQL expression uses.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExprParts {
    /// Every vector selector, in order.
    pub selectors: Vec<Selector>,
    /// Every label named in a `by`, `without`, `on`, `ignoring`, `group_left` or
    /// `group_right` list.
    pub grouping_labels: BTreeSet<String>,
}

impl ExprParts {
    /// The metric names of the selectors.
    pub fn names(&self) -> BTreeSet<String> {
        self.selectors.iter().map(|s| s.name.clone()).collect()
    }
}

#[derive(Debug, Clone, PartialEq)]
enum Token {
    Ident(String),
    Str(String),
    Op(String),
    Punct(char),
    /// A number, a duration, or a Grafana variable (`$__rate_interval`, `${job}`).
    Other,
}

/// Keywords that look like identifiers but are no metric name.
const KEYWORDS: [&str; 13] = [
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "bool",
    "and",
    "or",
    "unless",
    "offset",
    "inf",
    "nan",
];

/// Keywords followed by a list of label names.
const GROUPING: [&str; 6] = [
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
];

fn tokenize(expr: &str) -> Result<Vec<Token>, String> {
    let chars: Vec<char> = expr.chars().collect();
    let mut tokens = Vec::new();
    let mut i = 0;
    let ident_start = |c: char| c.is_ascii_alphabetic() || c == '_' || c == ':';
    let ident_char = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':';
    while i < chars.len() {
        let c = chars[i];
        if c.is_whitespace() {
            i += 1;
        } else if c == '#' {
            while i < chars.len() && chars[i] != '\n' {
                i += 1;
            }
        } else if c == '"' || c == '\'' || c == '`' {
            let quote = c;
            let mut value = String::new();
            i += 1;
            loop {
                let Some(&c) = chars.get(i) else {
                    return Err(format!("unterminated string in {expr:?}"));
                };
                i += 1;
                if c == quote {
                    break;
                }
                if c == '\\' && quote != '`' {
                    let Some(&escaped) = chars.get(i) else {
                        return Err(format!("unterminated escape in {expr:?}"));
                    };
                    i += 1;
                    value.push(match escaped {
                        'n' => '\n',
                        't' => '\t',
                        other => other,
                    });
                } else {
                    value.push(c);
                }
            }
            tokens.push(Token::Str(value));
        } else if c == '$' {
            i += 1;
            if chars.get(i) == Some(&'{') {
                while i < chars.len() && chars[i] != '}' {
                    i += 1;
                }
                i += 1;
            } else {
                while i < chars.len() && ident_char(chars[i]) {
                    i += 1;
                }
            }
            tokens.push(Token::Other);
        } else if ident_start(c) {
            let start = i;
            while i < chars.len() && ident_char(chars[i]) {
                i += 1;
            }
            tokens.push(Token::Ident(chars[start..i].iter().collect()));
        } else if c.is_ascii_digit()
            || (c == '.' && chars.get(i + 1).is_some_and(char::is_ascii_digit))
        {
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '.') {
                i += 1;
            }
            tokens.push(Token::Other);
        } else if matches!(c, '=' | '!' | '<' | '>') {
            let two: String = chars[i..(i + 2).min(chars.len())].iter().collect();
            let op = if matches!(two.as_str(), "=~" | "!~" | "!=" | "==" | "<=" | ">=") {
                two
            } else {
                c.to_string()
            };
            i += op.len();
            tokens.push(Token::Op(op));
        } else {
            tokens.push(Token::Punct(c));
            i += 1;
        }
    }
    Ok(tokens)
}

/// Reads a PromQL expression (Grafana variables allowed where a duration or a label value
/// goes) and answers its selectors and grouping labels. Every identifier that is not a
/// keyword, not a function (followed by `(`) and not inside a label list or matcher is a
/// metric name.
pub fn parse_expr(expr: &str) -> Result<ExprParts, String> {
    let tokens = tokenize(expr)?;
    let mut parts = ExprParts::default();
    let mut i = 0;
    while i < tokens.len() {
        match &tokens[i] {
            Token::Ident(word) if GROUPING.contains(&word.as_str()) => {
                i += 1;
                if tokens.get(i) == Some(&Token::Punct('(')) {
                    i += 1;
                    loop {
                        match tokens.get(i) {
                            Some(Token::Ident(label)) => {
                                parts.grouping_labels.insert(label.clone());
                            }
                            Some(Token::Punct(',')) => {}
                            Some(Token::Punct(')')) => break,
                            other => {
                                return Err(format!(
                                    "unexpected {other:?} in the label list of {word} in {expr:?}"
                                ));
                            }
                        }
                        i += 1;
                    }
                    i += 1;
                }
            }
            Token::Ident(word) if KEYWORDS.contains(&word.as_str()) => i += 1,
            // A function call, or an aggregation with its grouping first (`sum by (x) (...)`).
            Token::Ident(_)
                if match tokens.get(i + 1) {
                    Some(Token::Punct('(')) => true,
                    Some(Token::Ident(next)) => next == "by" || next == "without",
                    _ => false,
                } =>
            {
                i += 1
            }
            Token::Ident(name) => {
                let mut selector = Selector {
                    name: name.clone(),
                    matchers: Vec::new(),
                };
                i += 1;
                if tokens.get(i) == Some(&Token::Punct('{')) {
                    i += 1;
                    i = parse_matchers(&tokens, i, &mut selector.matchers)
                        .map_err(|e| format!("{e} in {expr:?}"))?;
                }
                parts.selectors.push(selector);
            }
            Token::Punct('{') => {
                return Err(format!(
                    "a selector without a metric name in {expr:?}: name the metric"
                ));
            }
            _ => i += 1,
        }
    }
    Ok(parts)
}

/// Parses `label op "value", ... }` from `i` (after the `{`); answers the index after the `}`.
fn parse_matchers(
    tokens: &[Token],
    mut i: usize,
    into: &mut Vec<Matcher>,
) -> Result<usize, String> {
    loop {
        match tokens.get(i) {
            Some(Token::Punct('}')) => return Ok(i + 1),
            Some(Token::Punct(',')) => i += 1,
            Some(Token::Ident(label)) => match (tokens.get(i + 1), tokens.get(i + 2)) {
                (Some(Token::Op(op)), Some(Token::Str(value)))
                    if matches!(op.as_str(), "=" | "!=" | "=~" | "!~") =>
                {
                    into.push(Matcher {
                        label: label.clone(),
                        op: op.clone(),
                        value: value.clone(),
                    });
                    i += 3;
                }
                other => return Err(format!("a malformed matcher of {label}: {other:?}")),
            },
            other => return Err(format!("unexpected {other:?} among the matchers")),
        }
    }
}

/// The metric selector and label of a Grafana `label_values(selector, label)` variable query.
pub fn parse_label_values(query: &str) -> Result<(ExprParts, String), String> {
    let inner = query
        .trim()
        .strip_prefix("label_values(")
        .and_then(|rest| rest.strip_suffix(')'))
        .ok_or_else(|| format!("not a label_values(selector, label) query: {query:?}"))?;
    let (selector, label) = inner
        .rsplit_once(',')
        .ok_or_else(|| format!("label_values without a label: {query:?}"))?;
    Ok((parse_expr(selector)?, label.trim().to_owned()))
}

/// The anchor GitHub gives a Markdown heading: lower case, punctuation other than `-` and `_`
/// dropped, spaces as `-`.
pub fn heading_anchor(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter_map(|c| match c {
            ' ' => Some('-'),
            c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
            _ => None,
        })
        .collect()
}

/// The anchors of every heading of a Markdown text (fenced code blocks skipped).
pub fn markdown_anchors(text: &str) -> BTreeSet<String> {
    let mut in_code = false;
    let mut anchors = BTreeSet::new();
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            in_code = !in_code;
        } else if !in_code && line.starts_with('#') {
            anchors.insert(heading_anchor(line.trim_start_matches('#')));
        }
    }
    anchors
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_selectors_grouping_labels_and_grafana_variables() {
        let parts = parse_expr(
            r#"histogram_quantile(0.99, sum by (coin, le) (rate(switchyard_proxy_submit_duration_seconds_bucket{job=~"$job",outcome!="a\"b"}[$__rate_interval]))) / on (job) group_left () job:x:rate5m offset 5m > bool 0 or up and vector(0)"#,
        )
        .expect("parses");
        assert_eq!(
            parts.names(),
            [
                "job:x:rate5m",
                "switchyard_proxy_submit_duration_seconds_bucket",
                "up",
            ]
            .map(String::from)
            .into()
        );
        assert_eq!(
            parts.grouping_labels,
            ["coin", "job", "le"].map(String::from).into()
        );
        assert_eq!(
            parts.selectors[0].matchers[1],
            Matcher {
                label: "outcome".into(),
                op: "!=".into(),
                value: "a\"b".into()
            }
        );
        assert!(parse_expr(r#"{__name__="x"}"#).is_err());
        let (parts, label) =
            parse_label_values(r#"label_values(switchyard_build_info{job=~"$job"}, instance)"#)
                .expect("parses");
        assert_eq!(label, "instance");
        assert_eq!(parts.selectors[0].name, "switchyard_build_info");
    }

    #[test]
    fn a_missing_binary_names_the_package() {
        let error = binary("switchyard-no-such-binary").expect_err("not installed");
        let message = error.to_string();
        assert!(
            message.contains("Debian's `prometheus` package"),
            "{message}"
        );
    }

    #[test]
    fn anchors_follow_github() {
        assert_eq!(
            heading_anchor(" 6. Alerts and runbooks"),
            "6-alerts-and-runbooks"
        );
        assert_eq!(
            heading_anchor(" SwitchyardProxyDown"),
            "switchyardproxydown"
        );
        assert_eq!(
            heading_anchor(" Unknown users (error 201)"),
            "unknown-users-error-201"
        );
    }
}
