//! A real Prometheus (Debian's `prometheus` package, which brings
//! `promtool`) for the monitoring tests, and a small HTTP client for its
//! API and for the `/metrics`, `/healthz` and `/readyz` endpoints of fog's
//! servers and hosts.
//!
//! [`Prometheus::start`] runs the server on a port from
//! [`free_port`](crate::free_port) with a scrape configuration from
//! [`scrape_config`], its storage in the test's scratch dir, and waits until
//! it is ready; [`Prometheus::query`] evaluates an instant query.
//! [`parse_exposition`] reads the whole Prometheus text format (names,
//! labels, types), where [`crate::http::sample`] finds one series;
//! [`http_get`] also decodes chunked replies (Prometheus's API sends them
//! for larger answers) and bounds connecting and the reply's size.
//!
//! Without the binaries a test says it is skipped, unless
//! `FOG_REQUIRE_PROMETHEUS=1` (set by `.ci/run`) makes it fail.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use serde_json::Value;

use crate::{Proc, free_port, wait_for};

/// Set to `1` where tests must not skip for want of Prometheus.
pub const REQUIRE_ENV: &str = "FOG_REQUIRE_PROMETHEUS";

/// The largest HTTP reply read (a bound, not an expectation).
const MAX_REPLY: u64 = 64 << 20;

/// Where `program` is on `PATH`, if it is.
fn on_path(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|dir| dir.join(program)).find(|p| p.is_file())
}

/// Why Prometheus cannot run here, if it cannot: `prometheus` or
/// `promtool` is not on `PATH`.
pub fn unavailable() -> Option<String> {
    let missing: Vec<&str> = ["prometheus", "promtool"].into_iter().filter(|p| on_path(p).is_none()).collect();
    (!missing.is_empty()).then(|| format!("{} not on PATH (apt-get install prometheus)", missing.join(" and ")))
}

/// What a test does without Prometheus: says it is skipped (`Ok`), or fails
/// when [`REQUIRE_ENV`] says it must be there.
pub fn skip_or_fail(test: &str, why: &str) -> anyhow::Result<()> {
    if std::env::var(REQUIRE_ENV).is_ok_and(|v| v == "1") {
        bail!("{test}: Prometheus is required ({REQUIRE_ENV}=1) but unavailable: {why}");
    }
    eprintln!("[{test}] SKIPPED: {why}; {REQUIRE_ENV}=1 makes it fail instead");
    Ok(())
}

/// Runs `promtool` with `args` in `dir` and returns what it printed,
/// whatever its exit status (the caller decides what success is).
pub fn promtool(args: &[&str], dir: &Path) -> anyhow::Result<Output> {
    Command::new("promtool").args(args).current_dir(dir).output().context("cannot run promtool")
}

/// One scrape target of [`scrape_config`].
#[derive(Debug, Clone)]
pub struct Target {
    /// The job (`fog-server`, `fog-host`): the alert rules select by it.
    pub job: String,
    /// `host:port` of its metrics endpoint.
    pub address: String,
    /// Labels Prometheus adds to every series of the target.
    pub labels: Vec<(String, String)>,
}

impl Target {
    pub fn new(job: &str, address: &str, labels: &[(&str, &str)]) -> Target {
        Target {
            job: job.to_string(),
            address: address.to_string(),
            labels: labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        }
    }
}

/// A Prometheus configuration that scrapes and evaluates every `interval`
/// (Prometheus rounds to milliseconds), loads `rule_files` and scrapes
/// `targets`, one job per distinct [`Target::job`] in their order.
pub fn scrape_config(interval: Duration, rule_files: &[PathBuf], targets: &[Target]) -> String {
    // A JSON string is a YAML double-quoted scalar: every value is quoted.
    let q = |s: &str| Value::String(s.to_string()).to_string();
    let every = format!("{}ms", interval.as_millis().max(1));
    let mut yaml = format!("global:\n  scrape_interval: {every}\n  scrape_timeout: {every}\n  evaluation_interval: {every}\n");
    if !rule_files.is_empty() {
        yaml.push_str("rule_files:\n");
        for file in rule_files {
            yaml.push_str(&format!("  - {}\n", q(&file.display().to_string())));
        }
    }
    yaml.push_str("scrape_configs:\n");
    let mut jobs: Vec<&str> = Vec::new();
    for t in targets {
        if !jobs.contains(&t.job.as_str()) {
            jobs.push(&t.job);
        }
    }
    for job in jobs {
        yaml.push_str(&format!("  - job_name: {}\n    static_configs:\n", q(job)));
        for t in targets.iter().filter(|t| t.job == job) {
            yaml.push_str(&format!("      - targets: [{}]\n", q(&t.address)));
            if !t.labels.is_empty() {
                yaml.push_str("        labels:\n");
                for (k, v) in &t.labels {
                    yaml.push_str(&format!("          {}: {}\n", q(k), q(v)));
                }
            }
        }
    }
    yaml
}

/// One sample of an instant query: the series' labels (`__name__`
/// included when the result keeps it) and its value.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

impl Sample {
    /// The value of label `name`, or "".
    pub fn label(&self, name: &str) -> &str {
        self.labels.get(name).map(String::as_str).unwrap_or("")
    }
}

/// A Prometheus server run by a test; killed when dropped.
pub struct Prometheus {
    pub proc: Proc,
    /// `127.0.0.1:<port>` of its web interface and API.
    pub address: String,
    /// The configuration file it was started with.
    pub config: PathBuf,
}

impl Prometheus {
    /// Writes `config` to `dir/prometheus.yml`, starts `prometheus` with its
    /// storage in `dir/prometheus-data` on a free loopback port, and waits
    /// (at most 30 s) until it says it is ready.
    pub fn start(dir: &Path, config: &str) -> anyhow::Result<Prometheus> {
        let file = dir.join("prometheus.yml");
        std::fs::write(&file, config).with_context(|| format!("cannot write {}", file.display()))?;
        let address = format!("127.0.0.1:{}", free_port()?);
        let args = vec![
            format!("--config.file={}", file.display()),
            format!("--storage.tsdb.path={}", dir.join("prometheus-data").display()),
            format!("--web.listen-address={address}"),
        ];
        let program = on_path("prometheus").ok_or_else(|| anyhow!("prometheus is not on PATH"))?;
        let mut proc = Proc::spawn("prometheus", &program, &args, dir)?;
        let ready = wait_for(&format!("prometheus at {address} to be ready"), Duration::from_secs(30), || {
            if let Ok(Some(exit)) = proc.child.try_wait() {
                return Some(Err(anyhow!("prometheus exited ({exit}) before it was ready")));
            }
            match http_get(&address, "/-/ready", None) {
                Ok(reply) if reply.status == 200 => Some(Ok(())),
                _ => None,
            }
        });
        match ready.and_then(|outcome| outcome) {
            Ok(()) => Ok(Prometheus { proc, address, config: file }),
            Err(e) => bail!("{e:#}; last lines of its log:\n{}", proc.log_tail(20)),
        }
    }

    /// `GET /api/v1/<path>?<params>`: the `data` of a successful answer; an
    /// error with Prometheus's own message otherwise.
    pub fn api(&self, path: &str, params: &[(&str, &str)]) -> anyhow::Result<Value> {
        let query: Vec<String> = params.iter().map(|(k, v)| format!("{}={}", url_encode(k), url_encode(v))).collect();
        let target = if query.is_empty() { format!("/api/v1/{path}") } else { format!("/api/v1/{path}?{}", query.join("&")) };
        let reply = http_get(&self.address, &target, None)?;
        let body: Value = serde_json::from_str(&reply.body)
            .with_context(|| format!("{target}: HTTP {} with a body that is not JSON: {:.300}", reply.status, reply.body))?;
        if body["status"] != "success" {
            bail!("{target}: HTTP {}: {} {}", reply.status, body["errorType"], body["error"]);
        }
        Ok(body["data"].clone())
    }

    /// Evaluates the instant query `expr` now; its samples (a scalar is one
    /// sample without labels).
    pub fn query(&self, expr: &str) -> anyhow::Result<Vec<Sample>> {
        let data = self.api("query", &[("query", expr)]).with_context(|| format!("query {expr}"))?;
        let value_of = |v: &Value| -> anyhow::Result<f64> {
            let text = v[1].as_str().ok_or_else(|| anyhow!("a sample without a value: {v}"))?;
            text.parse::<f64>().with_context(|| format!("sample value {text:?}"))
        };
        match data["resultType"].as_str() {
            Some("vector") => data["result"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|s| {
                    let labels = s["metric"]
                        .as_object()
                        .into_iter()
                        .flatten()
                        .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
                        .collect();
                    Ok(Sample { labels, value: value_of(&s["value"])? })
                })
                .collect(),
            Some("scalar") => Ok(vec![Sample { labels: BTreeMap::new(), value: value_of(&data["result"])? }]),
            other => bail!("query {expr}: a result of type {other:?}, not a vector or scalar"),
        }
    }

    /// The value of `expr` if it is exactly one sample.
    pub fn query_one(&self, expr: &str) -> anyhow::Result<Option<f64>> {
        let samples = self.query(expr)?;
        match samples.as_slice() {
            [] => Ok(None),
            [one] => Ok(Some(one.value)),
            many => bail!("query {expr}: {} samples, not one: {many:?}", many.len()),
        }
    }
}

/// An HTTP reply: status code and body (decoded from chunks if need be).
#[derive(Debug, Clone)]
pub struct HttpReply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl HttpReply {
    /// The first header of that name (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
}

/// `GET path` from `address` (`host:port`) over HTTP/1.1, one request per
/// connection, with `Authorization: Bearer <token>` when `bearer` is
/// given. Connecting, sending and each read are bounded by 5 s.
pub fn http_get(address: &str, path: &str, bearer: Option<&str>) -> anyhow::Result<HttpReply> {
    let timeout = Duration::from_secs(5);
    let socket = address
        .to_socket_addrs()
        .with_context(|| format!("bad address {address}"))?
        .next()
        .ok_or_else(|| anyhow!("{address} names no address"))?;
    let mut stream = TcpStream::connect_timeout(&socket, timeout).with_context(|| format!("cannot connect to {address}"))?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    let auth = bearer.map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
    let request = format!("GET {path} HTTP/1.1\r\nHost: {address}\r\nAccept: */*\r\nConnection: close\r\n{auth}\r\n");
    stream.write_all(request.as_bytes()).with_context(|| format!("cannot send to {address}"))?;
    let mut raw = Vec::new();
    stream.take(MAX_REPLY).read_to_end(&mut raw).with_context(|| format!("cannot read the reply of {address}{path}"))?;
    parse_reply(&raw).with_context(|| format!("GET {address}{path}"))
}

fn parse_reply(raw: &[u8]) -> anyhow::Result<HttpReply> {
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").ok_or_else(|| anyhow!("no end of headers in {} bytes", raw.len()))?;
    let head = String::from_utf8_lossy(&raw[..split]);
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse::<u16>().ok())
        .ok_or_else(|| anyhow!("bad status line {status_line:?}"))?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    let mut body = raw[split + 4..].to_vec();
    let chunked = headers
        .iter()
        .any(|(k, v)| k.eq_ignore_ascii_case("transfer-encoding") && v.to_ascii_lowercase().contains("chunked"));
    if chunked {
        body = dechunk(&body)?;
    } else if let Some(length) = headers.iter().find(|(k, _)| k.eq_ignore_ascii_case("content-length")) {
        let n: usize = length.1.parse().with_context(|| format!("bad content-length {:?}", length.1))?;
        if body.len() < n {
            bail!("the body ended after {} of {n} bytes", body.len());
        }
        body.truncate(n);
    }
    Ok(HttpReply { status, headers, body: String::from_utf8_lossy(&body).into_owned() })
}

fn dechunk(mut data: &[u8]) -> anyhow::Result<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let eol = data.windows(2).position(|w| w == b"\r\n").ok_or_else(|| anyhow!("a chunk without a size line"))?;
        let size_text = String::from_utf8_lossy(&data[..eol]);
        let size_hex = size_text.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_hex, 16).with_context(|| format!("bad chunk size {size_hex:?}"))?;
        data = &data[eol + 2..];
        if size == 0 {
            return Ok(out);
        }
        if data.len() < size {
            bail!("a chunk of {size} bytes ended after {}", data.len());
        }
        out.extend_from_slice(&data[..size]);
        data = data.get(size + 2..).unwrap_or_default();
    }
}

/// Percent-encodes everything but the unreserved characters of RFC 3986.
pub fn url_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// One line of the Prometheus text format: a sample.
#[derive(Debug, Clone, PartialEq)]
pub struct ExposedSample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// What a `/metrics` page declares and holds: `# TYPE` per family name,
/// and every sample.
#[derive(Debug, Clone, Default)]
pub struct Exposition {
    pub types: BTreeMap<String, String>,
    pub samples: Vec<ExposedSample>,
}

impl Exposition {
    /// The samples of the series `name` whose labels include `labels`.
    pub fn find<'a>(&'a self, name: &'a str, labels: &'a [(&'a str, &'a str)]) -> impl Iterator<Item = &'a ExposedSample> + 'a {
        self.samples
            .iter()
            .filter(move |s| s.name == name && labels.iter().all(|(k, v)| s.labels.get(*k).is_some_and(|x| x == v)))
    }

    /// The value of the one sample `name` with `labels`, if there is one.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let mut found = self.find(name, labels);
        let first = found.next()?;
        found.next().is_none().then_some(first.value)
    }
}

/// Parses the Prometheus text format (version 0.0.4). A line it cannot
/// read is an error naming the line: a test must not pass over a
/// malformed page.
pub fn parse_exposition(text: &str) -> anyhow::Result<Exposition> {
    let mut page = Exposition::default();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        if let Some(comment) = line.strip_prefix('#') {
            let mut words = comment.split_whitespace();
            if words.next() == Some("TYPE") {
                let (Some(name), Some(kind)) = (words.next(), words.next()) else {
                    bail!("line {}: a TYPE line without a name and a type: {line:?}", n + 1);
                };
                page.types.insert(name.to_string(), kind.to_string());
            }
            continue;
        }
        let sample = parse_sample(line).with_context(|| format!("line {}: {line:?}", n + 1))?;
        page.samples.push(sample);
    }
    Ok(page)
}

fn parse_sample(line: &str) -> anyhow::Result<ExposedSample> {
    let name_end = line.find(|c: char| c == '{' || c.is_whitespace()).ok_or_else(|| anyhow!("no value"))?;
    let name = &line[..name_end];
    if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':') {
        bail!("bad metric name {name:?}");
    }
    let mut rest = &line[name_end..];
    let mut labels = BTreeMap::new();
    if let Some(inner) = rest.strip_prefix('{') {
        let mut chars = inner.char_indices().peekable();
        let mut consumed = None;
        loop {
            // Skip separators, find `}` or a label name.
            while chars.peek().is_some_and(|(_, c)| *c == ',' || c.is_whitespace()) {
                chars.next();
            }
            match chars.peek() {
                Some((i, '}')) => {
                    consumed = Some(i + 1);
                    break;
                }
                None => break,
                _ => {}
            }
            let mut key = String::new();
            while let Some((_, c)) = chars.peek().copied() {
                if c == '=' {
                    break;
                }
                key.push(c);
                chars.next();
            }
            if chars.next().map(|(_, c)| c) != Some('=') || chars.next().map(|(_, c)| c) != Some('"') {
                bail!("bad label {key:?}");
            }
            let mut value = String::new();
            loop {
                match chars.next() {
                    Some((_, '"')) => break,
                    Some((_, '\\')) => match chars.next() {
                        Some((_, 'n')) => value.push('\n'),
                        Some((_, c)) => value.push(c),
                        None => bail!("label {key:?}: an escape at the end"),
                    },
                    Some((_, c)) => value.push(c),
                    None => bail!("label {key:?}: no closing quote"),
                }
            }
            labels.insert(key.trim().to_string(), value);
        }
        let end = consumed.ok_or_else(|| anyhow!("no closing brace"))?;
        rest = &inner[end..];
    }
    let value_text = rest.split_whitespace().next().ok_or_else(|| anyhow!("no value"))?;
    let value = value_text.parse::<f64>().with_context(|| format!("bad value {value_text:?}"))?;
    Ok(ExposedSample { name: name.to_string(), labels, value })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_text_format_is_read_with_labels_escapes_and_special_values() {
        let page = parse_exposition(
            "# HELP fog_x A help text, with { and }.\n\
             # TYPE fog_x counter\n\
             fog_x 3\n\
             fog_y{segment=\"1\",state=\"a \\\"quoted\\\" b\"} 2.5 1700000000\n\
             fog_h_bucket{le=\"+Inf\"} +Inf\n\
             fog_h_sum NaN\n",
        )
        .unwrap();
        assert_eq!(page.types.get("fog_x").map(String::as_str), Some("counter"));
        assert_eq!(page.value("fog_x", &[]), Some(3.0));
        assert_eq!(page.value("fog_y", &[("state", "a \"quoted\" b")]), Some(2.5));
        assert_eq!(page.value("fog_h_bucket", &[("le", "+Inf")]), Some(f64::INFINITY));
        assert!(page.value("fog_h_sum", &[]).is_some_and(f64::is_nan));
        assert_eq!(page.value("fog_y", &[("segment", "2")]), None);
    }

    #[test]
    fn a_malformed_line_is_an_error_naming_it() {
        for bad in ["fog_x", "fog_x{a=\"1\" 3", "fog_x{a=1} 3", "fog x 3", "fog_x three"] {
            let err = parse_exposition(&format!("# TYPE fog_x gauge\n{bad}\n")).unwrap_err();
            assert!(format!("{err:#}").contains("line 2"), "{bad}: {err:#}");
        }
    }

    #[test]
    fn chunked_and_sized_replies_are_decoded() {
        let chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6;x=y\r\n world\r\n0\r\n\r\n";
        let reply = parse_reply(chunked).unwrap();
        assert_eq!((reply.status, reply.body.as_str()), (200, "hello world"));
        let sized = b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 4\r\n\r\nwhy!extra";
        let reply = parse_reply(sized).unwrap();
        assert_eq!((reply.status, reply.body.as_str(), reply.header("Content-Length")), (503, "why!", Some("4")));
        assert!(parse_reply(b"HTTP/1.1 200 OK\r\ncontent-length: 9\r\n\r\nshort").is_err());
        assert!(parse_reply(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n").is_err());
        assert!(parse_reply(b"garbage").is_err());
    }

    #[test]
    fn queries_are_percent_encoded_and_configs_quote_every_value() {
        assert_eq!(url_encode("up{job=\"a b\"} == 0"), "up%7Bjob%3D%22a%20b%22%7D%20%3D%3D%200");
        let config = scrape_config(
            Duration::from_secs(1),
            &[PathBuf::from("/r/alerts.yml")],
            &[
                Target::new("fog-server", "127.0.0.1:1", &[("node", "primary")]),
                Target::new("fog-host", "127.0.0.1:3", &[]),
                Target::new("fog-server", "127.0.0.1:2", &[("node", "backup")]),
            ],
        );
        assert!(config.contains("scrape_interval: 1000ms\n  scrape_timeout: 1000ms"), "{config}");
        assert_eq!(config.matches("job_name").count(), 2, "{config}");
        let server_job = config.find("\"fog-server\"").unwrap();
        let host_job = config.find("\"fog-host\"").unwrap();
        let backup = config.find("\"127.0.0.1:2\"").unwrap();
        assert!(server_job < backup && backup < host_job, "targets of a job stay together: {config}");
        assert!(config.contains("  - \"/r/alerts.yml\"\n"), "{config}");
    }
}
