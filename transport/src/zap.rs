//! The ZAP handler: libzmq asks it, at every CurveZMQ handshake, whether a
//! client's public key may connect (RFC 27, ZeroMQ Authentication
//! Protocol). Without one, libzmq's CURVE server accepts any client key:
//! encryption without authentication.
//!
//! The answer depends on the socket's ZAP domain: the frontend lets in
//! keys with the `sensors` or `admin` right, the state channel only the
//! pair's `peer`. An accepted client's `User-Id` is its public key (Z85), so
//! every message it sends carries the key its rights are looked up by.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::thread::JoinHandle;

use tracing::warn;

use crate::access::AccessList;
use crate::keys::PublicKey;

/// The ZAP domain of a server's frontend (hosts and admins).
pub const FRONTEND_DOMAIN: &str = "fog-frontend";
/// The ZAP domain of a server's state channel (the peer only).
pub const STATE_DOMAIN: &str = "fog-state";
/// Distinct refused keys logged by name; beyond that, only counted.
const LOGGED_REFUSALS: usize = 1024;

/// The authorized keys, swapped whole on reload.
pub type SharedAccess = Arc<RwLock<Arc<AccessList>>>;

/// Reads the current list (a poisoned lock still holds a whole list).
pub fn current(access: &SharedAccess) -> Arc<AccessList> {
    match access.read() {
        Ok(list) => list.clone(),
        Err(poisoned) => poisoned.into_inner().clone(),
    }
}

/// Replaces the list; handshakes from now on use the new one.
pub fn replace(access: &SharedAccess, list: AccessList) {
    let list = Arc::new(list);
    match access.write() {
        Ok(mut guard) => *guard = list,
        Err(poisoned) => *poisoned.into_inner() = list,
    }
}

/// A running ZAP handler; stops when dropped.
pub struct ZapHandler {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    refused: Arc<AtomicU64>,
}

impl ZapHandler {
    /// Binds the handler on `ctx` (before any CURVE server socket of that
    /// context accepts a connection).
    pub fn start(ctx: &zmq::Context, access: SharedAccess) -> Result<ZapHandler, zmq::Error> {
        let socket = ctx.socket(zmq::REP)?;
        socket.set_linger(0)?;
        socket.set_rcvtimeo(200)?;
        socket.bind("inproc://zeromq.zap.01")?;
        let stop = Arc::new(AtomicBool::new(false));
        let refused = Arc::new(AtomicU64::new(0));
        let (s, r) = (stop.clone(), refused.clone());
        let thread = std::thread::Builder::new()
            .name("zmq-zap".into())
            .spawn(move || serve(socket, access, s, r))
            .map_err(|_| zmq::Error::EMFILE)?;
        Ok(ZapHandler { stop, thread: Some(thread), refused })
    }

    /// Handshakes refused so far.
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }
}

impl Drop for ZapHandler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn serve(socket: zmq::Socket, access: SharedAccess, stop: Arc<AtomicBool>, refused: Arc<AtomicU64>) {
    let mut logged: HashSet<PublicKey> = HashSet::new();
    while !stop.load(Ordering::Acquire) {
        let Ok(request) = socket.recv_multipart(0) else { continue };
        // version, request id, domain, address, identity, mechanism, credentials…
        let field = |i: usize| request.get(i).map(Vec::as_slice).unwrap_or_default();
        let (domain, address, mechanism) = (field(2), field(3), field(5));
        let key: Option<PublicKey> = field(6).try_into().ok().map(PublicKey);
        let decision = match (mechanism, key) {
            (b"CURVE", Some(key)) => {
                let list = current(&access);
                match list.get(&key) {
                    Some(c) if domain == STATE_DOMAIN.as_bytes() && c.rights.peer => Ok(key),
                    Some(c) if domain == FRONTEND_DOMAIN.as_bytes() && (c.rights.admin || !c.rights.sensors.is_empty()) => Ok(key),
                    Some(c) => Err((key, format!("key of {} has no right on this socket", c.name))),
                    None => Err((key, "unknown key".to_string())),
                }
            }
            _ => Err((PublicKey([0; 32]), "not CURVE".to_string())),
        };
        let (status, text, user) = match decision {
            Ok(key) => ("200", "OK".to_string(), key.to_z85()),
            Err((key, why)) => {
                refused.fetch_add(1, Ordering::Relaxed);
                if logged.len() < LOGGED_REFUSALS && logged.insert(key) {
                    warn!(
                        key = %key,
                        address = %String::from_utf8_lossy(address),
                        domain = %String::from_utf8_lossy(domain),
                        "refused a connection: {why}; further refusals of this key are only counted"
                    );
                }
                ("400", why, String::new())
            }
        };
        let reply: [&[u8]; 6] = [b"1.0", field(1), status.as_bytes(), text.as_bytes(), user.as_bytes(), b""];
        let _ = socket.send_multipart(reply, 0);
    }
}
