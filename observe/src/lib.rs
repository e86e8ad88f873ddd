//! What a fog process shows its operators, over HTTP:
//!
//! - `/metrics`: every counter, gauge and histogram recorded through the
//!   `metrics` macros, in the Prometheus text format ([`recorder`]);
//! - `/healthz`: the process's event loop turns ([`Health::turned`]);
//! - `/readyz`: the process says it can do its job ([`Health::set_ready`]).
//!
//! The endpoint ([`serve`]) runs on a thread of its own, so a scrape never
//! waits on the loop it reports on (and a stuck loop shows as a failing
//! `/healthz`, not as a hanging one). It is bounded as every socket of
//! fog is: GET only, request heads of at most [`MAX_HEAD_BYTES`] read within
//! [`HEAD_TIMEOUT`], [`MAX_CONNECTIONS`] connections at once, each closed
//! after [`CONNECTION_LIFETIME`]. It binds to loopback unless told
//! otherwise, and beyond loopback only with a bearer token
//! ([`Endpoint::check`]).

mod health;
mod http;
pub mod recorder;
mod system;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use health::Health;
pub use http::{serve, serve_or_warn};
pub use system::{DiskSpace, disk_space, resident_bytes};

/// Most bytes of a request's head (request line and headers).
pub const MAX_HEAD_BYTES: usize = 8 * 1024;
/// A request's head must arrive within this.
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections served at once; more are closed at once.
pub const MAX_CONNECTIONS: usize = 32;
/// A connection (keep-alive included) is closed after this.
pub const CONNECTION_LIFETIME: Duration = Duration::from_secs(60);
/// Shortest token accepted: a bearer token is a password.
pub const MIN_TOKEN_LEN: usize = 16;

/// Why the endpoint cannot be set up.
#[derive(Debug, thiserror::Error)]
pub enum ObserveError {
    #[error("cannot serve metrics on {addr}: {reason} (choose another address with --metrics-bind, or --metrics-bind off)")]
    Bind { addr: SocketAddr, reason: String },
    #[error("refusing to serve metrics on {0} without a token: give --metrics-token-file FILE, or bind to loopback")]
    NoToken(SocketAddr),
    #[error("cannot read the metrics token from {}: {reason}", path.display())]
    Token { path: PathBuf, reason: String },
    #[error("cannot start the metrics thread: {0}")]
    Thread(String),
}

/// Where the endpoint listens, as a flag gives it: an address, or `off`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bind {
    Off,
    At(SocketAddr),
}

impl std::str::FromStr for Bind {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.eq_ignore_ascii_case("off") {
            return Ok(Bind::Off);
        }
        s.parse::<SocketAddr>()
            .map(Bind::At)
            .map_err(|_| format!("`{s}` is not an address (IP:PORT, e.g. 127.0.0.1:9101) nor `off`"))
    }
}

/// A bearer token a scraper must send (`Authorization: Bearer <token>`).
#[derive(Clone)]
pub struct Token(String);

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

impl Token {
    /// Reads a token file: one line, at least [`MIN_TOKEN_LEN`] visible
    /// ASCII characters (what Prometheus' `credentials_file` sends).
    pub fn read(path: &Path) -> Result<Token, ObserveError> {
        let err = |reason: String| ObserveError::Token { path: path.to_path_buf(), reason };
        let meta = std::fs::metadata(path).map_err(|e| err(e.to_string()))?;
        if meta.len() > 4096 {
            return Err(err(format!("{} bytes; a token file holds one short line", meta.len())));
        }
        let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
        Token::new(text.trim()).map_err(err)
    }

    pub fn new(token: &str) -> Result<Token, String> {
        if token.len() < MIN_TOKEN_LEN {
            return Err(format!("the token has {} characters; it needs at least {MIN_TOKEN_LEN}", token.len()));
        }
        if !token.bytes().all(|b| b.is_ascii_graphic()) {
            return Err("the token must be visible ASCII characters, without spaces".into());
        }
        Ok(Token(token.to_string()))
    }

    /// Whether an `Authorization` header value carries this token; the
    /// comparison takes the same time wherever the first difference is.
    pub fn admits(&self, header: Option<&[u8]>) -> bool {
        let Some(given) = header.and_then(|h| h.strip_prefix(b"Bearer ")) else { return false };
        let want = self.0.as_bytes();
        given.len() == want.len() && given.iter().zip(want).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
    }
}

/// The endpoint a process serves: its address and, beyond loopback, the
/// token scrapers must send.
#[derive(Debug, Clone)]
pub struct Endpoint {
    pub addr: SocketAddr,
    pub token: Option<Token>,
    /// Asked for with a flag: failing to bind it is an error. A default
    /// address that is taken (a second process on the machine) is only
    /// warned about, and the process runs without the endpoint.
    pub explicit: bool,
}

impl Endpoint {
    /// The endpoint for `--metrics-bind` and `--metrics-token-file`, or
    /// `None` when it is off. Beyond loopback a token is required.
    /// `bind` is the flag's value, if given; `default` the address without it.
    pub fn from_flags(bind: Option<Bind>, default: SocketAddr, token_file: Option<&Path>) -> Result<Option<Endpoint>, ObserveError> {
        let (addr, explicit) = match bind {
            Some(Bind::Off) => return Ok(None),
            Some(Bind::At(addr)) => (addr, true),
            None => (default, false),
        };
        let token = token_file.map(Token::read).transpose()?;
        let endpoint = Endpoint { addr, token, explicit };
        endpoint.check()?;
        Ok(Some(endpoint))
    }

    /// Refuses an address beyond loopback without a token.
    pub fn check(&self) -> Result<(), ObserveError> {
        if !self.addr.ip().is_loopback() && self.token.is_none() {
            return Err(ObserveError::NoToken(self.addr));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binds_parse_and_off_is_off() {
        assert_eq!("off".parse::<Bind>().unwrap(), Bind::Off);
        assert_eq!("127.0.0.1:9101".parse::<Bind>().unwrap(), Bind::At("127.0.0.1:9101".parse().unwrap()));
        assert!("localhost:9101".parse::<Bind>().unwrap_err().contains("not an address"));
        assert!("".parse::<Bind>().is_err());
    }

    #[test]
    fn beyond_loopback_needs_a_token() {
        let wide = Endpoint { addr: "0.0.0.0:9101".parse().unwrap(), token: None, explicit: true };
        assert!(matches!(wide.check(), Err(ObserveError::NoToken(_))));
        let local = Endpoint { addr: "127.0.0.1:9101".parse().unwrap(), token: None, explicit: false };
        assert!(local.check().is_ok());
        let guarded = Endpoint { token: Some(Token::new("0123456789abcdef").unwrap()), ..wide };
        assert!(guarded.check().is_ok());
    }

    #[test]
    fn tokens_are_checked_whole() {
        assert!(Token::new("short").is_err());
        assert!(Token::new("has a space in the middle").is_err());
        let t = Token::new("0123456789abcdef").unwrap();
        assert!(t.admits(Some(b"Bearer 0123456789abcdef")));
        assert!(!t.admits(Some(b"Bearer 0123456789abcdeX")));
        assert!(!t.admits(Some(b"Bearer 0123456789abcdef0")));
        assert!(!t.admits(Some(b"Bearer 0123456789abcde")));
        assert!(!t.admits(Some(b"Basic 0123456789abcdef")));
        assert!(!t.admits(Some(b"")));
        assert!(!t.admits(None));
        assert!(!format!("{t:?}").contains("0123"));
    }

    #[test]
    fn a_token_file_is_one_short_line() {
        let dir = std::env::temp_dir().join(format!("fog-observe-token-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let good = dir.join("good");
        std::fs::write(&good, "0123456789abcdef\n").unwrap();
        assert!(Token::read(&good).unwrap().admits(Some(b"Bearer 0123456789abcdef")));
        let big = dir.join("big");
        std::fs::write(&big, vec![b'a'; 10_000]).unwrap();
        assert!(Token::read(&big).unwrap_err().to_string().contains("one short line"));
        assert!(Token::read(&dir.join("missing")).unwrap_err().to_string().contains("cannot read the metrics token"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
