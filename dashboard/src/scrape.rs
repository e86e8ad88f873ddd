//! One scrape of a `/metrics` endpoint: an HTTP/1.1 GET over a fresh TCP
//! connection, bounded in time (the whole exchange, connect included,
//! within [`SCRAPE_TIMEOUT`]) and in size (a body over [`MAX_BODY`] is
//! refused, by its `Content-Length` before it is read, or as it grows),
//! parsed by [`crate::prom`].
//!
//! Only `http://` endpoints are scraped: fog's metrics endpoints serve plain
//! HTTP on loopback, or beyond it behind a bearer token (`--token-file`);
//! TLS, where wanted, is a proxy's job.

use std::time::Duration;

use http_body_util::{BodyExt, Empty, Limited};
use hyper::body::Bytes;
use hyper::header::{AUTHORIZATION, CONTENT_LENGTH, HOST};
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::prom::{Limits, Scrape};

/// The most a response body may hold.
pub const MAX_BODY: usize = 4 * 1024 * 1024;
/// How long one scrape may take, connect to last byte.
pub const SCRAPE_TIMEOUT: Duration = Duration::from_secs(1);

/// Where to scrape: `http://HOST:PORT[/PATH]`; the path is `/metrics`
/// unless one is given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// What the user wrote, as shown on the page.
    pub url: String,
    /// `HOST:PORT`, to connect to and for the `Host` header.
    pub authority: String,
    pub path: String,
}

impl std::str::FromStr for Endpoint {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let rest = s.strip_prefix("http://").ok_or_else(|| {
            if s.starts_with("https://") {
                format!("{s}: only http:// is scraped (put TLS in a proxy)")
            } else {
                format!("{s}: expected http://HOST:PORT")
            }
        })?;
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        let port = authority.rsplit_once(':').map(|(_, p)| p).ok_or_else(|| format!("{s}: the address has no :PORT"))?;
        if port.parse::<u16>().is_err() || authority.starts_with(':') {
            return Err(format!("{s}: expected http://HOST:PORT"));
        }
        if authority.contains(['@', ' ']) || path.contains([' ', '#', '?']) {
            return Err(format!("{s}: expected http://HOST:PORT[/PATH] without user, query or fragment"));
        }
        let path = if path.is_empty() || path == "/" { "/metrics" } else { path };
        Ok(Endpoint { url: s.trim_end_matches('/').to_string(), authority: authority.to_string(), path: path.to_string() })
    }
}

/// Why a scrape failed, as the page shows it.
#[derive(Debug, thiserror::Error)]
pub enum ScrapeError {
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("cannot connect: {0}")]
    Connect(std::io::Error),
    #[error("HTTP: {0}")]
    Http(#[from] hyper::Error),
    #[error("answered {0}")]
    Status(StatusCode),
    #[error("the response is larger than {MAX_BODY} bytes")]
    TooLarge,
    #[error("cannot read the response: {0}")]
    Body(String),
    #[error("bad metrics: {0}")]
    Parse(#[from] crate::prom::ParseError),
}

/// Scrapes `endpoint` once, within [`SCRAPE_TIMEOUT`], with `token` as a
/// bearer token when given.
pub async fn scrape(endpoint: &Endpoint, token: Option<&str>) -> Result<Scrape, ScrapeError> {
    match tokio::time::timeout(SCRAPE_TIMEOUT, fetch(endpoint, token)).await {
        Ok(body) => Ok(Scrape::parse(&body?, &Limits::default())?),
        Err(_) => Err(ScrapeError::Timeout(SCRAPE_TIMEOUT)),
    }
}

async fn fetch(endpoint: &Endpoint, token: Option<&str>) -> Result<Bytes, ScrapeError> {
    let stream = TcpStream::connect(&endpoint.authority).await.map_err(ScrapeError::Connect)?;
    let _ = stream.set_nodelay(true);
    let (mut sender, connection) = hyper::client::conn::http1::Builder::new()
        .max_buf_size(64 * 1024)
        .handshake::<_, Empty<Bytes>>(TokioIo::new(stream))
        .await?;
    // The connection is driven beside the request, and ends with this
    // function (the task is aborted when the scrape is dropped by its timeout).
    let driver = tokio::spawn(connection);
    let _abort = AbortOnDrop(driver);
    let mut request = Request::get(endpoint.path.as_str()).header(HOST, endpoint.authority.as_str());
    if let Some(token) = token {
        request = request.header(AUTHORIZATION, format!("Bearer {token}"));
    }
    let request = request.body(Empty::new()).map_err(|e| ScrapeError::Body(e.to_string()))?;
    let response = sender.send_request(request).await?;
    if response.status() != StatusCode::OK {
        return Err(ScrapeError::Status(response.status()));
    }
    let declared = response.headers().get(CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_BODY as u64) {
        return Err(ScrapeError::TooLarge);
    }
    match Limited::new(response.into_body(), MAX_BODY).collect().await {
        Ok(body) => Ok(body.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(ScrapeError::TooLarge),
        Err(e) => Err(ScrapeError::Body(e.to_string())),
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<Result<(), hyper::Error>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_are_http_host_port_with_metrics_by_default() {
        let e: Endpoint = "http://127.0.0.1:9101".parse().unwrap();
        assert_eq!((e.authority.as_str(), e.path.as_str()), ("127.0.0.1:9101", "/metrics"));
        let e: Endpoint = "http://localhost:9100/".parse().unwrap();
        assert_eq!((e.url.as_str(), e.path.as_str()), ("http://localhost:9100", "/metrics"));
        let e: Endpoint = "http://[::1]:9100/other/metrics".parse().unwrap();
        assert_eq!((e.authority.as_str(), e.path.as_str()), ("[::1]:9100", "/other/metrics"));
        for bad in ["127.0.0.1:9101", "https://a:1", "http://a", "http://a:x", "http://a:70000", "http://:1", "http://u@a:1", "http://a:1/m?x=1"] {
            assert!(bad.parse::<Endpoint>().is_err(), "{bad}");
        }
        assert_eq!("https://a:1".parse::<Endpoint>().unwrap_err(), "https://a:1: only http:// is scraped (put TLS in a proxy)");
    }
}
