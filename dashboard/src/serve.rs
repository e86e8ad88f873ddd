//! The page's HTTP side: `/` (the page, one self-contained HTML file
//! compiled into the binary) and `/api/live` (the [`Live`] state as JSON;
//! `?since=MS` for only the samples after that Unix millisecond).
//!
//! Every request is bounded, as the servers' metrics endpoints are: GET
//! (or HEAD) only and no body, headers at most [`MAX_HEADER_BYTES`] and
//! [`MAX_HEADERS`] of them, read within [`HEADER_TIMEOUT`] (which also ends
//! a keep-alive connection idle that long), at most [`MAX_CONNECTIONS`]
//! connections at once (one more is closed at once) and each one for at
//! most [`CONNECTION_LIFETIME`]. When a token is required (a bind beyond
//! loopback), every request carries it, as `Authorization: Bearer TOKEN`
//! or as `?token=TOKEN` in the URL (the page passes the token it was
//! opened with on to its own requests).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};

use crate::live::Live;

pub const MAX_CONNECTIONS: usize = 32;
pub const MAX_HEADER_BYTES: usize = 8 * 1024;
pub const MAX_HEADERS: usize = 48;
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
pub const CONNECTION_LIFETIME: Duration = Duration::from_secs(300);

/// The page, with its styles and scripts inline: no other file is served.
pub const PAGE: &str = include_str!("page.html");

/// What the handlers share.
pub struct Site {
    pub live: Mutex<Live>,
    /// Required on every request when set.
    pub token: Option<String>,
    pub interval_ms: u64,
}

/// Serves `listener` until `shutdown` turns true; then stops accepting and
/// lets the open connections finish their request.
pub async fn serve(listener: TcpListener, site: Arc<Site>, mut shutdown: watch::Receiver<bool>) {
    let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut refused_logged = false;
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = shutdown.wait_for(|stop| *stop) => return,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of file descriptors, most likely: wait instead of spinning.
                tracing::warn!("cannot accept a connection: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            if !refused_logged {
                tracing::warn!("{MAX_CONNECTIONS} connections open: closing new ones until one ends (logged once)");
                refused_logged = true;
            }
            drop(stream);
            continue;
        };
        let site = site.clone();
        let mut shutdown = shutdown.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let service = hyper::service::service_fn(move |request| {
                let site = site.clone();
                async move { Ok::<_, Infallible>(respond(&site, peer, &request)) }
            });
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .max_header_size(MAX_HEADER_BYTES)
                .max_headers(MAX_HEADERS)
                .max_buf_size(64 * 1024);
            let connection = builder.serve_connection(TokioIo::new(stream), service);
            tokio::pin!(connection);
            tokio::select! {
                _ = connection.as_mut() => return,
                _ = tokio::time::sleep(CONNECTION_LIFETIME) => {}
                _ = shutdown.wait_for(|stop| *stop) => {}
            }
            connection.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(HEADER_TIMEOUT, connection).await;
        });
    }
}

fn respond(site: &Site, peer: SocketAddr, request: &Request<Incoming>) -> Response<Full<Bytes>> {
    if request.method() != Method::GET && request.method() != Method::HEAD {
        return plain(StatusCode::METHOD_NOT_ALLOWED, "GET only\n").with(header::ALLOW, "GET, HEAD");
    }
    let has_body = request.headers().contains_key(header::TRANSFER_ENCODING)
        || request.headers().get(header::CONTENT_LENGTH).is_some_and(|n| n.as_bytes() != b"0");
    if has_body {
        return plain(StatusCode::BAD_REQUEST, "a GET has no body\n").with(header::CONNECTION, "close");
    }
    let query = request.uri().query().unwrap_or("");
    if let Some(token) = &site.token {
        let bearer = request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::to_string);
        let given = bearer.or_else(|| query_param(query, "token"));
        if !given.is_some_and(|given| same_secret(given.as_bytes(), token.as_bytes())) {
            tracing::debug!("refused {peer}: no valid token");
            return plain(StatusCode::UNAUTHORIZED, "a token is required: Authorization: Bearer TOKEN, or ?token=TOKEN\n")
                .with(header::WWW_AUTHENTICATE, "Bearer");
        }
    }
    match request.uri().path() {
        "/" => page(),
        "/api/live" => {
            let since = match query_param(query, "since").map(|s| s.parse::<u64>()) {
                None => 0,
                Some(Ok(since)) => since,
                Some(Err(_)) => return plain(StatusCode::BAD_REQUEST, "since is a Unix time in milliseconds\n"),
            };
            live_json(site, since)
        }
        _ => plain(StatusCode::NOT_FOUND, "not found: the page is at /, its data at /api/live\n"),
    }
}

fn page() -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from_static(PAGE.as_bytes())));
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/html; charset=utf-8"));
    // The page loads nothing from anywhere: its script and styles are
    // inline, it talks to this server only, and it cannot be framed.
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; img-src data:; \
             base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
        ),
    );
    secure(response)
}

fn live_json(site: &Site, since: u64) -> Response<Full<Bytes>> {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
    let body = {
        let live = site.live.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        serde_json::to_vec(&live.snapshot(now, site.interval_ms, since))
    };
    match body {
        Ok(body) => {
            let mut response = Response::new(Full::new(Bytes::from(body)));
            response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
            secure(response)
        }
        Err(e) => plain(StatusCode::INTERNAL_SERVER_ERROR, &format!("cannot write the state as JSON: {e}\n")),
    }
}

fn plain(status: StatusCode, text: &str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(text.to_string())));
    *response.status_mut() = status;
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    secure(response)
}

fn secure(mut response: Response<Full<Bytes>>) -> Response<Full<Bytes>> {
    let headers = response.headers_mut();
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    // The token may be in the page's URL: never hand it on.
    headers.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    response
}

trait With {
    fn with(self, name: header::HeaderName, value: &'static str) -> Self;
}

impl With for Response<Full<Bytes>> {
    fn with(mut self, name: header::HeaderName, value: &'static str) -> Self {
        self.headers_mut().insert(name, HeaderValue::from_static(value));
        self
    }
}

/// The first value of `key` in a query string, percent-decoded.
fn query_param(query: &str, key: &str) -> Option<String> {
    query.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (k == key).then(|| percent_decode(v))?
    })
}

/// `%XX` and `+` undone; `None` for a bad escape or a result that is not UTF-8.
fn percent_decode(s: &str) -> Option<String> {
    let mut out = Vec::with_capacity(s.len());
    let mut bytes = s.bytes();
    while let Some(b) = bytes.next() {
        match b {
            b'%' => {
                let hex = [bytes.next()?, bytes.next()?];
                out.push(u8::from_str_radix(std::str::from_utf8(&hex).ok()?, 16).ok()?);
            }
            b'+' => out.push(b' '),
            b => out.push(b),
        }
    }
    String::from_utf8(out).ok()
}

/// Compares two secrets in time that depends on their lengths only.
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_parameters_are_found_and_decoded() {
        assert_eq!(query_param("since=12&token=a%2Bb+c", "token").as_deref(), Some("a+b c"));
        assert_eq!(query_param("since=12&token=a", "since").as_deref(), Some("12"));
        assert_eq!(query_param("tokens=x", "token"), None);
        assert_eq!(query_param("token=%zz", "token"), None, "a bad escape is no token");
        assert_eq!(query_param("token=%ff", "token"), None, "nor is one that is not UTF-8");
        assert_eq!(query_param("token", "token").as_deref(), Some(""));
    }

    #[test]
    fn secrets_compare_whole() {
        assert!(same_secret(b"abc", b"abc"));
        assert!(!same_secret(b"abc", b"abd"));
        assert!(!same_secret(b"abc", b"abcd"));
        assert!(!same_secret(b"", b"a"));
    }

    #[test]
    fn the_page_is_self_contained() {
        // Nothing is loaded from elsewhere: no src or href to another
        // origin, no @import; charts are drawn by the page's own script.
        for needle in ["src=\"http", "href=\"http", "src='http", "@import", "//cdn", "<link"] {
            assert!(!PAGE.contains(needle), "the page contains {needle:?}");
        }
        for id in ["id=\"active-server\"", "id=\"epoch\"", "id=\"in-sync\"", "id=\"lag\"", "id=\"servers\"", "id=\"segments\"", "id=\"hosts\"", "name=\"viewport\""] {
            assert!(PAGE.contains(id), "the page has no {id}");
        }
    }
}
