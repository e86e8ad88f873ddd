//! ZeroMQ for fog, with the security ZeroMQ itself defines: CurveZMQ
//! encryption and authentication on every socket, a ZAP handler that
//! checks each client's key against the authorized-keys file, a maximum
//! message size enforced by libzmq before it allocates (`ZMQ_MAXMSGSIZE`),
//! high-water marks on every queue, and ZMTP heartbeats that notice a dead
//! peer.
//!
//! This wraps libzmq (the reference implementation, linked from the
//! system, with libsodium). Its sockets are not thread-safe, so each one is
//! owned by a thread of its own ([`socket`]); async code talks to it
//! through bounded queues.

pub mod access;
pub mod keys;
pub mod socket;
pub mod zap;

use std::time::Duration;

pub use access::{AccessError, AccessList, Client, Rights};
pub use keys::{KeyError, Keypair, PublicKey, SecretKey};
pub use socket::{Event, Message, SendError, Sender, Socket, SocketStats};
pub use zap::{FRONTEND_DOMAIN, STATE_DOMAIN, SharedAccess, ZapHandler};
pub use zmq::{Context, SocketType};

/// Whether libzmq was built with CURVE (libsodium).
pub fn has_curve() -> bool {
    zmq::has("curve").unwrap_or(false)
}

/// Why a socket could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("cannot {action} {endpoint}: {reason}")]
    Endpoint { action: &'static str, endpoint: String, reason: String },
    #[error("cannot set up a socket: {0}")]
    Socket(String),
    #[error("this libzmq has no CURVE support (it was built without libsodium); install the system's libzmq (libzmq3-dev)")]
    NoCurve,
}

fn socket_err(e: impl std::fmt::Display) -> TransportError {
    TransportError::Socket(e.to_string())
}

/// Limits every fog socket is given.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Longest message accepted; libzmq drops the connection of a peer that
    /// announces a longer one, before allocating for it.
    pub max_message_bytes: usize,
    /// Messages queued per peer in each direction (ZMQ_SNDHWM/RCVHWM).
    pub hwm: i32,
    /// ZMTP heartbeat interval: a peer silent for three of them is dropped.
    pub heartbeat: Duration,
    /// Longest a new connection may take to complete its handshake.
    pub handshake: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_message_bytes: 16 * 1024 * 1024 + 4096,
            hwm: 1000,
            heartbeat: Duration::from_secs(1),
            handshake: Duration::from_secs(5),
        }
    }
}

fn ms(d: Duration) -> i32 {
    i32::try_from(d.as_millis()).unwrap_or(i32::MAX)
}

fn configure(socket: &zmq::Socket, limits: &Limits) -> Result<(), TransportError> {
    socket.set_linger(0).map_err(socket_err)?;
    socket.set_maxmsgsize(i64::try_from(limits.max_message_bytes).unwrap_or(i64::MAX)).map_err(socket_err)?;
    socket.set_sndhwm(limits.hwm).map_err(socket_err)?;
    socket.set_rcvhwm(limits.hwm).map_err(socket_err)?;
    socket.set_heartbeat_ivl(ms(limits.heartbeat)).map_err(socket_err)?;
    socket.set_heartbeat_timeout(ms(limits.heartbeat * 3)).map_err(socket_err)?;
    socket.set_handshake_ivl(ms(limits.handshake)).map_err(socket_err)?;
    Ok(())
}

/// An endpoint that cannot be bound or connected, with a reason a person
/// can act on.
fn endpoint_err(action: &'static str, endpoint: &str, e: zmq::Error) -> TransportError {
    let reason = match e {
        zmq::Error::EADDRINUSE => "the address is in use (another server on this port?)".to_string(),
        other => other.to_string(),
    };
    TransportError::Endpoint { action, endpoint: endpoint.to_string(), reason }
}

/// A socket that binds `endpoint`. With `curve`, it is a CurveZMQ server
/// with that key, and every client is checked by the ZAP handler under
/// `domain` (which must be running on `ctx`).
pub fn bind(
    ctx: &zmq::Context,
    kind: zmq::SocketType,
    endpoint: &str,
    curve: Option<&Keypair>,
    domain: &str,
    limits: &Limits,
) -> Result<zmq::Socket, TransportError> {
    let socket = ctx.socket(kind).map_err(socket_err)?;
    configure(&socket, limits)?;
    if kind == zmq::ROUTER {
        // A reply to a peer that is gone or not reading fails at once
        // (and is counted) instead of being dropped silently.
        socket.set_router_mandatory(true).map_err(socket_err)?;
    }
    if let Some(keys) = curve {
        if !has_curve() {
            return Err(TransportError::NoCurve);
        }
        socket.set_curve_server(true).map_err(socket_err)?;
        socket.set_curve_secretkey(&keys.secret.0).map_err(socket_err)?;
        socket.set_zap_domain(domain).map_err(socket_err)?;
    }
    socket.bind(endpoint).map_err(|e| endpoint_err("bind", endpoint, e))?;
    Ok(socket)
}

/// A socket that connects to `endpoint`. With `curve`, it authenticates
/// with `keys` and talks only to a server holding the secret of `server`.
pub fn connect(
    ctx: &zmq::Context,
    kind: zmq::SocketType,
    endpoint: &str,
    curve: Option<(&Keypair, &PublicKey)>,
    limits: &Limits,
) -> Result<zmq::Socket, TransportError> {
    let socket = unconnected(ctx, kind, curve, limits)?;
    socket.connect(endpoint).map_err(|e| endpoint_err("connect to", endpoint, e))?;
    Ok(socket)
}

/// A socket of `kind` with fog's options and `curve` keys, not connected yet.
fn unconnected(ctx: &zmq::Context, kind: zmq::SocketType, curve: Option<(&Keypair, &PublicKey)>, limits: &Limits) -> Result<zmq::Socket, TransportError> {
    let socket = ctx.socket(kind).map_err(socket_err)?;
    configure(&socket, limits)?;
    if let Some((keys, server)) = curve {
        if !has_curve() {
            return Err(TransportError::NoCurve);
        }
        socket.set_curve_serverkey(&server.0).map_err(socket_err)?;
        socket.set_curve_publickey(&keys.public.0).map_err(socket_err)?;
        socket.set_curve_secretkey(&keys.secret.0).map_err(socket_err)?;
    }
    if kind == zmq::SUB {
        socket.set_subscribe(b"").map_err(socket_err)?;
    }
    Ok(socket)
}

/// [`connect`], with the socket on a thread of its own ([`Socket`]) that
/// reports its connection events. The monitor is attached before the
/// connection starts: libzmq reports a refused key once and does not try
/// again, so a refusal that came before the monitor would be lost for good.
pub fn connect_monitored(
    name: &str,
    ctx: &zmq::Context,
    kind: zmq::SocketType,
    endpoint: &str,
    curve: Option<(&Keypair, &PublicKey)>,
    limits: &Limits,
) -> Result<Socket, TransportError> {
    let socket = unconnected(ctx, kind, curve, limits)?;
    let monitor = socket::watch(ctx, &socket).map_err(socket_err)?;
    socket.connect(endpoint).map_err(|e| endpoint_err("connect to", endpoint, e))?;
    Socket::start(name, socket, Some(monitor)).map_err(socket_err)
}

/// Checks the form of an endpoint a client connects to: `tcp://HOST:PORT`
/// or `ipc://PATH`.
pub fn check_endpoint(endpoint: &str) -> Result<(), String> {
    if let Some(path) = endpoint.strip_prefix("ipc://") {
        return if path.is_empty() { Err("an ipc endpoint needs a path".into()) } else { Ok(()) };
    }
    let rest = endpoint.strip_prefix("tcp://").ok_or("the transport must be tcp:// or ipc://")?;
    let (host, port) = rest.rsplit_once(':').ok_or("no :PORT")?;
    if host.is_empty() {
        return Err("no host".into());
    }
    match port.parse::<u16>() {
        Ok(p) if p > 0 => Ok(()),
        _ => Err(format!("{port:?} is not a port number")),
    }
}

/// Whether an endpoint can only be reached from this machine
/// (`tcp://127.x.x.x:…`, `tcp://localhost:…`, `tcp://[::1]:…`, `ipc://`,
/// `inproc://`).
pub fn is_local(endpoint: &str) -> bool {
    if endpoint.starts_with("ipc://") || endpoint.starts_with("inproc://") {
        return true;
    }
    let Some(rest) = endpoint.strip_prefix("tcp://") else { return false };
    let host = match rest.rsplit_once(':') {
        Some((host, _port)) => host,
        None => rest,
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host == "localhost" || host == "::1" || host.parse::<std::net::Ipv4Addr>().is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checks_endpoints() {
        assert!(check_endpoint("tcp://127.0.0.1:5001").is_ok());
        assert!(check_endpoint("tcp://server-a:5001").is_ok());
        for bad in ["127.0.0.1:5001", "tcp://127.0.0.1", "tcp://:5001", "tcp://h:0", "tcp://h:99999", "udp://h:1"] {
            assert!(check_endpoint(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn tells_local_endpoints() {
        for ep in ["tcp://127.0.0.1:5001", "tcp://127.3.4.5:1", "tcp://localhost:5001", "tcp://[::1]:5001", "ipc:///tmp/x"] {
            assert!(is_local(ep), "{ep}");
        }
        for ep in ["tcp://*:5001", "tcp://0.0.0.0:5001", "tcp://10.0.0.1:5001", "tcp://eth0:5001", "tcp://[::]:1"] {
            assert!(!is_local(ep), "{ep}");
        }
    }
}
