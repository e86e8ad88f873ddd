//! The bounded HTTP endpoint: `/metrics`, `/healthz`, `/readyz`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{AUTHORIZATION, CONTENT_TYPE, WWW_AUTHENTICATE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::sync::Semaphore;

use crate::{CONNECTION_LIFETIME, Endpoint, HEAD_TIMEOUT, Health, MAX_CONNECTIONS, MAX_HEAD_BYTES, ObserveError};

/// How often histogram samples are folded into their buckets between scrapes.
const UPKEEP_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// Binds `endpoint` and serves it on a thread of its own until the process
/// ends. Returns the address bound (the port, when it was 0).
pub fn serve(endpoint: &Endpoint, metrics: PrometheusHandle, health: Arc<Health>) -> Result<SocketAddr, ObserveError> {
    endpoint.check()?;
    let bind_err = |e: std::io::Error| ObserveError::Bind { addr: endpoint.addr, reason: e.to_string() };
    let listener = std::net::TcpListener::bind(endpoint.addr).map_err(bind_err)?;
    listener.set_nonblocking(true).map_err(bind_err)?;
    let addr = listener.local_addr().map_err(bind_err)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| ObserveError::Thread(e.to_string()))?;
    let service = Arc::new(Service { metrics, health, token: endpoint.token.clone() });
    std::thread::Builder::new()
        .name("fog-metrics".into())
        .spawn(move || runtime.block_on(accept_loop(listener, service)))
        .map_err(|e| ObserveError::Thread(e.to_string()))?;
    Ok(addr)
}

/// [`serve`] for a process: logs where it serves; a default address that
/// cannot be bound is warned about and skipped, an explicit one is an error.
pub fn serve_or_warn(endpoint: &Endpoint, health: Arc<Health>) -> Result<Option<SocketAddr>, ObserveError> {
    match serve(endpoint, crate::recorder::install(), health) {
        Ok(addr) => {
            let guard = if endpoint.token.is_some() { " (bearer token required)" } else { "" };
            tracing::info!("metrics on http://{addr}/metrics, health on /healthz and /readyz{guard}");
            Ok(Some(addr))
        }
        Err(ObserveError::Bind { addr, reason }) if !endpoint.explicit => {
            tracing::warn!("not serving metrics: cannot bind the default address {addr}: {reason}; give --metrics-bind IP:PORT (or off)");
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

struct Service {
    metrics: PrometheusHandle,
    health: Arc<Health>,
    token: Option<crate::Token>,
}

async fn accept_loop(listener: std::net::TcpListener, service: Arc<Service>) {
    let listener = match tokio::net::TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!("the metrics endpoint stopped: {e}");
            return;
        }
    };
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut upkeep = tokio::time::interval(UPKEEP_EVERY);
    loop {
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                // Out of file descriptors and the like: wait, then go on.
                Err(_) => {
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = upkeep.tick() => {
                service.metrics.run_upkeep();
                continue;
            }
        };
        // Over the limit: closed at once rather than queued.
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            metrics::counter!("fog_http_connections_refused_total").increment(1);
            continue;
        };
        let service = service.clone();
        tokio::spawn(async move {
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEAD_TIMEOUT)
                .max_buf_size(MAX_HEAD_BYTES)
                .serve_connection(
                    TokioIo::new(stream),
                    hyper::service::service_fn(move |req| {
                        let service = service.clone();
                        async move { Ok::<_, Infallible>(service.answer(&req)) }
                    }),
                );
            let _ = tokio::time::timeout(CONNECTION_LIFETIME, conn).await;
            drop(slot);
        });
    }
}

impl Service {
    fn answer(&self, req: &Request<Incoming>) -> Response<Full<Bytes>> {
        if let Some(token) = &self.token {
            if !token.admits(req.headers().get(AUTHORIZATION).map(|v| v.as_bytes())) {
                let mut r = text(StatusCode::UNAUTHORIZED, "a bearer token is required\n".into());
                r.headers_mut().insert(WWW_AUTHENTICATE, hyper::header::HeaderValue::from_static("Bearer"));
                return r;
            }
        }
        if req.method() != Method::GET {
            return text(StatusCode::METHOD_NOT_ALLOWED, "only GET is served\n".into());
        }
        match req.uri().path() {
            "/metrics" => {
                let mut r = text(StatusCode::OK, self.metrics.render());
                r.headers_mut().insert(CONTENT_TYPE, hyper::header::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"));
                r
            }
            "/healthz" => verdict(self.health.alive(), "ok"),
            "/readyz" => verdict(self.health.ready(), "ready"),
            "/" => text(StatusCode::OK, "/metrics  Prometheus metrics\n/healthz  200 while the event loop turns\n/readyz   200 while ready to serve\n".into()),
            _ => text(StatusCode::NOT_FOUND, "not found: try /metrics, /healthz or /readyz\n".into()),
        }
    }
}

fn verdict(result: Result<(), String>, ok: &str) -> Response<Full<Bytes>> {
    match result {
        Ok(()) => text(StatusCode::OK, format!("{ok}\n")),
        Err(why) => text(StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")),
    }
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    if status != StatusCode::OK || !r.headers().contains_key(CONTENT_TYPE) {
        r.headers_mut().insert(CONTENT_TYPE, hyper::header::HeaderValue::from_static("text/plain; charset=utf-8"));
    }
    r
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::net::TcpStream;
    use std::time::Duration;

    use super::*;
    use crate::Token;

    fn start(token: Option<&str>) -> (SocketAddr, Arc<Health>) {
        let health = Arc::new(Health::default());
        let endpoint = Endpoint { addr: "127.0.0.1:0".parse().unwrap(), token: token.map(|t| Token::new(t).unwrap()), explicit: true };
        let addr = serve(&endpoint, crate::recorder::install(), health.clone()).unwrap();
        (addr, health)
    }

    /// One raw request; the whole response as text.
    fn ask(addr: SocketAddr, request: &[u8]) -> String {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let _ = s.write_all(request);
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        String::from_utf8_lossy(&out).into_owned()
    }

    fn get(addr: SocketAddr, path: &str, auth: Option<&str>) -> String {
        let auth = auth.map_or(String::new(), |a| format!("Authorization: {a}\r\n"));
        ask(addr, format!("GET {path} HTTP/1.1\r\nHost: x\r\n{auth}Connection: close\r\n\r\n").as_bytes())
    }

    #[test]
    fn serves_metrics_and_health() {
        let (addr, health) = start(None);
        metrics::counter!("fog_test_served_total").increment(1);
        let r = get(addr, "/metrics", None);
        assert!(r.starts_with("HTTP/1.1 200"), "{r}");
        assert!(r.contains("text/plain; version=0.0.4"), "{r}");
        assert!(r.contains("fog_test_served_total"), "{r}");
        assert!(get(addr, "/healthz", None).starts_with("HTTP/1.1 503"));
        health.turned();
        assert!(get(addr, "/healthz", None).starts_with("HTTP/1.1 200"));
        let r = get(addr, "/readyz", None);
        assert!(r.starts_with("HTTP/1.1 503") && r.contains("starting"), "{r}");
        health.set_ready(true, "");
        assert!(get(addr, "/readyz", None).starts_with("HTTP/1.1 200"));
        assert!(get(addr, "/nothing", None).starts_with("HTTP/1.1 404"));
        let post = ask(addr, b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
        assert!(post.starts_with("HTTP/1.1 405"), "{post}");
    }

    #[test]
    fn a_token_is_required_when_set() {
        let (addr, _) = start(Some("0123456789abcdef"));
        let r = get(addr, "/metrics", None);
        assert!(r.starts_with("HTTP/1.1 401") && r.to_ascii_lowercase().contains("www-authenticate: bearer"), "{r}");
        assert!(get(addr, "/metrics", Some("Bearer wrong-token-0000000")).starts_with("HTTP/1.1 401"));
        assert!(get(addr, "/metrics", Some("Bearer 0123456789abcdef")).starts_with("HTTP/1.1 200"));
    }

    #[test]
    fn hostile_requests_are_bounded() {
        let (addr, health) = start(None);
        health.turned();
        // A head larger than the limit: refused, the connection closed.
        let huge = format!("GET /metrics HTTP/1.1\r\nHost: x\r\nX-Junk: {}\r\n\r\n", "a".repeat(64 * 1024));
        let r = ask(addr, huge.as_bytes());
        assert!(r.is_empty() || r.starts_with("HTTP/1.1 431") || r.starts_with("HTTP/1.1 400"), "{r}");
        // Garbage: a 400 or a closed connection, and the endpoint lives on.
        let r = ask(addr, b"\x00\x01\x02 not http at all\r\n\r\n");
        assert!(r.is_empty() || r.starts_with("HTTP/1.1 400"), "{r}");
        // Connections beyond the limit are closed at once; once they go,
        // the endpoint serves again.
        let idle: Vec<TcpStream> = (0..crate::MAX_CONNECTIONS).map(|_| TcpStream::connect(addr).unwrap()).collect();
        std::thread::sleep(Duration::from_millis(200));
        let mut extra = TcpStream::connect(addr).unwrap();
        extra.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let _ = extra.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        let mut out = Vec::new();
        let _ = extra.read_to_end(&mut out);
        assert!(out.is_empty(), "a connection over the limit was served: {}", String::from_utf8_lossy(&out));
        drop(idle);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            health.turned();
            if get(addr, "/healthz", None).starts_with("HTTP/1.1 200") {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "the endpoint did not recover after the idle connections closed");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}
