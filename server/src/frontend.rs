//! The frontend's side of a request: who sent it (its CurveZMQ key), what
//! it may ask ([`crate::edge`]), how often a status report may be built,
//! and what to log about refusals (once per key and kind, never once per
//! message); then the node gets the request, and later the reply goes back
//! to the client's identity. The driver owns the sockets; this owns the
//! bookkeeping between them and the node.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use fog_protocol::{DecodeError, Refusal, RefusedReadings, Reply, decode_request, encode};
use fog_transport::{AccessList, Event, PublicKey, Socket};
use tracing::{error, warn};

use crate::clock::Now;
use crate::edge::{Admission, admit, rights_of};
use crate::metrics::Arrival;
use crate::node::{ClientToken, Node};

/// Distinct peers whose malformed frames or refused requests are logged;
/// beyond that, only counted.
const LOGGED_PEERS: usize = 1024;
/// Status reports built per second at most, over all clients: one report
/// lists every sensor, so it costs milliseconds at tens of thousands of
/// sensors; beyond this, requests get `Refused(Busy)` and ask again.
const STATUS_PER_SECOND: u32 = 20;
/// Least time between two status reports to one client (one connection).
const STATUS_GAP_PER_CLIENT: Duration = Duration::from_millis(200);

/// A client with a reply outstanding: its frontend identity, the sensors
/// taken out of its batch, and when the request arrived.
pub(crate) struct Pending {
    pub identity: Vec<u8>,
    pub refused: Vec<RefusedReadings>,
    pub arrival: Arrival,
}

/// What the frontend keeps between a request and its reply, and what it
/// has refused.
#[derive(Default)]
pub(crate) struct Gate {
    next: ClientToken,
    /// The clients with a reply outstanding.
    pub(crate) pending: HashMap<ClientToken, Pending>,
    /// Readings in the batches handed to the node, and bytes of the frames
    /// received (for `/metrics`).
    pub(crate) readings_received: u64,
    pub(crate) bytes_received: u64,
    /// Peers already named in a log line.
    logged: HashSet<Vec<u8>>,
    /// Readings refused for sensors outside a key's rights, per key.
    pub(crate) foreign: HashMap<PublicKey, u64>,
    /// Status reports built in the current second, and when it began.
    status_window: (Option<std::time::Instant>, u32),
    /// When each client last got a status report.
    status_last: HashMap<Vec<u8>, std::time::Instant>,
}

impl Gate {
    /// Whether `who` (a key, or a connection without one) and `what` are
    /// logged for the first time; after [`LOGGED_PEERS`], nothing more is.
    fn log_once(&mut self, who: &[u8], what: &str) -> bool {
        let mut id = who.to_vec();
        id.extend_from_slice(what.as_bytes());
        self.logged.len() < LOGGED_PEERS && self.logged.insert(id)
    }

    /// Whether a status report may be built for `identity` now.
    fn status_allowed(&mut self, identity: &[u8]) -> bool {
        let now = std::time::Instant::now();
        if self.status_last.get(identity).is_some_and(|at| now.duration_since(*at) < STATUS_GAP_PER_CLIENT) {
            return false;
        }
        let (start, built) = &mut self.status_window;
        if start.is_none_or(|s| now.duration_since(s) >= Duration::from_secs(1)) {
            *start = Some(now);
            *built = 0;
        }
        if *built >= STATUS_PER_SECOND {
            return false;
        }
        *built += 1;
        if self.status_last.len() >= 4096 {
            self.status_last.retain(|_, at| now.duration_since(*at) < STATUS_GAP_PER_CLIENT);
        }
        self.status_last.insert(identity.to_vec(), now);
        true
    }
}

/// Queues a reply; one the client cannot take is dropped and counted.
pub(crate) fn send_reply(frontend: &Socket, identity: Vec<u8>, reply: &Reply) {
    match encode(reply) {
        Ok(payload) => {
            let _ = frontend.send(vec![identity, payload]);
        }
        Err(e) => error!("cannot encode a reply: {e}"),
    }
}

/// Checks one frontend message and hands it to the node, or refuses it.
pub(crate) fn handle_event(node: &mut Node, now: Now, event: Event, access: Option<&AccessList>, frontend: &Socket, gate: &mut Gate) {
    let Event::Message(message) = event else { return };
    let user = message.user;
    let mut frames = message.frames;
    let arrived = std::time::Instant::now();
    gate.bytes_received = gate.bytes_received.saturating_add(frames.iter().map(|f| f.len() as u64).sum());
    let identity = if frames.is_empty() { Vec::new() } else { frames.remove(0) };
    let decoded = match frames.as_slice() {
        [payload] => decode_request(payload),
        other => Err(DecodeError::Malformed(format!("{} payload frames, expected exactly 1", other.len()))),
    };
    // Log lines name the key; a client without one, its connection.
    let who: Vec<u8> = user.map_or_else(|| identity.clone(), |k| k.0.to_vec());
    // The key and the name the authorized-keys file gives it, for log lines.
    let name = || {
        let key = user.map_or_else(|| "-".to_string(), |k| k.to_z85());
        let host = user.and_then(|k| access.and_then(|a| a.get(&k)).map(|c| c.name.clone())).unwrap_or_default();
        (key, host)
    };
    let request = match decoded {
        Ok(r) => r,
        Err(e @ (DecodeError::TooManyReadings(_) | DecodeError::TooLarge(_) | DecodeError::ListTooLong(_))) => {
            node.record_refusal(Refusal::TooLarge, 1);
            if gate.log_once(&who, "too large") {
                let (key, host) = name();
                warn!(peer = %hex(&identity), key = %key, host = %host, "refused a batch: {e}; further ones from this client are only counted");
            }
            send_reply(frontend, identity, &Reply::Refused { batch_id: 0, reason: Refusal::TooLarge });
            return;
        }
        Err(why) => {
            node.record_malformed();
            if gate.log_once(&who, "malformed") {
                let (key, host) = name();
                warn!(peer = %hex(&identity), key = %key, host = %host, "dropped a malformed frame ({why}); further ones from this client are only counted");
            }
            return;
        }
    };
    let rights = rights_of(access, user.as_ref());
    let batch_id = match &request {
        fog_protocol::Request::Batch { batch_id, .. } => *batch_id,
        fog_protocol::Request::Status => 0,
    };
    match admit(rights.as_ref(), request) {
        Admission::Refuse(reason) => {
            node.record_refusal(reason, 1);
            if gate.log_once(&who, "refused") {
                let (key, host) = name();
                warn!(key = %key, host = %host, "refused a request: {reason}; further ones from this client are only counted");
            }
            send_reply(frontend, identity, &Reply::Refused { batch_id, reason });
        }
        Admission::Serve { request, refused } => {
            if !refused.is_empty() {
                let n: u64 = refused.iter().map(|r| u64::from(r.count)).sum();
                node.record_refusal(Refusal::ForeignSensor, n);
                if let Some(key) = user {
                    let count = gate.foreign.entry(key).or_insert(0);
                    if *count == 0 {
                        let (key, host) = name();
                        warn!(key = %key, host = %host, sensor_id = refused[0].sensor_id, "refused readings for sensors outside this key's rights; further ones from this key are only counted");
                    }
                    *count = count.saturating_add(n);
                }
            }
            if matches!(request, fog_protocol::Request::Status) && !gate.status_allowed(&identity) {
                node.record_refusal(Refusal::Busy, 1);
                send_reply(frontend, identity, &Reply::Refused { batch_id: 0, reason: Refusal::Busy });
                return;
            }
            gate.next = gate.next.wrapping_add(1);
            let token = gate.next;
            if let fog_protocol::Request::Batch { sensors, .. } = &request {
                gate.readings_received = gate.readings_received.saturating_add(sensors.iter().map(|s| s.readings.len() as u64).sum());
            }
            gate.pending.insert(token, Pending { identity, refused, arrival: Arrival { at: arrived, lsn: 0 } });
            let (refused_before, forged_before) = (node.refused(), node.forged_epochs());
            node.handle_request(now, token, &request);
            if let Some(p) = gate.pending.get_mut(&token) {
                p.arrival.lsn = node.lsn();
            }
            // The node refuses forged epochs and readings out of range; the
            // log names the key they came from, once per key and kind.
            if node.forged_epochs() > forged_before && gate.log_once(&who, "forged epoch") {
                let (key, host) = name();
                warn!(key = %key, host = %host, "a batch claimed an epoch without a valid seal (ignored, counted in forged_epochs); further ones from this key are only counted");
            }
            let after = node.refused();
            if (after.seq_out_of_range, after.from_the_future) != (refused_before.seq_out_of_range, refused_before.from_the_future)
                && gate.log_once(&who, "readings out of range")
            {
                let (key, host) = name();
                warn!(key = %key, host = %host, "refused readings with a seq or timestamp out of range (counted in refused); further ones from this key are only counted");
            }
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

