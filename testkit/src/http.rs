//! A plain HTTP/1.1 GET over loopback, for tests of the metrics and health
//! endpoints, and a reader of the Prometheus text format's samples.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use anyhow::{Context, bail};

/// A response: its status code and body.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub body: String,
}

/// `GET path` from `addr` (`IP:PORT`), with a bearer token if given; the
/// response is read to its end (the request asks to close).
pub fn get(addr: &str, path: &str, token: Option<&str>) -> anyhow::Result<Response> {
    let mut stream = TcpStream::connect(addr).with_context(|| format!("cannot connect to {addr}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    write!(stream, "GET {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Connection: close\r\n\r\n")?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).with_context(|| format!("cannot read the answer of {addr}{path}"))?;
    let text = String::from_utf8_lossy(&raw);
    let Some((head, body)) = text.split_once("\r\n\r\n") else { bail!("{addr}{path}: not an HTTP response: {text:.200}") };
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("{addr}{path}: no status in {head:.200}"))?;
    Ok(Response { status, body: body.to_string() })
}

/// The value of the sample `series` (a metric name with its labels as
/// rendered, e.g. `fog_host_sensors{state="running"}`) in a Prometheus
/// text body, if present.
pub fn sample(body: &str, series: &str) -> Option<f64> {
    body.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (name, value) = l.rsplit_once(' ')?;
        (name == series).then(|| value.parse().ok()).flatten()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_are_found_by_their_whole_series() {
        let body = "# TYPE a counter\na 3\na_total 4\nb{x=\"1\"} 2.5\nbad\n";
        assert_eq!(sample(body, "a"), Some(3.0));
        assert_eq!(sample(body, "a_total"), Some(4.0));
        assert_eq!(sample(body, "b{x=\"1\"}"), Some(2.5));
        assert_eq!(sample(body, "b"), None);
        assert_eq!(sample(body, "bad"), None);
    }
}
