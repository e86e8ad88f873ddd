//! The client side of `fog-server status`: ask a running server for its
//! [`StatusReport`] and render it for people or as JSON.
//!
//! Any server answers a status request, whatever its Binary Star state, so
//! this also tells an operator which node of a pair is active.

use std::time::{Duration, Instant};

use fog_protocol::{DecodeError, EncodeError, Refusal, Replication, Reply, Request, StatusReport, decode, encode};
use fog_transport::{Event, Keypair, Limits, PublicKey};

/// The keys a status client authenticates with: its own (a key with the
/// `admin` right) and the server's public key.
#[derive(Debug, Clone)]
pub struct ClientKeys {
    pub keys: Keypair,
    pub server: PublicKey,
}

/// Why a status query failed.
#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    #[error("no answer from {endpoint} within {}", humantime::format_duration(*.after))]
    Timeout { endpoint: String, after: Duration },
    #[error("cannot talk to {endpoint}: {reason}")]
    Socket { endpoint: String, reason: String },
    #[error("{endpoint} refused the connection: {why} (check --key and --server-key)")]
    Handshake { endpoint: String, why: &'static str },
    #[error("{endpoint} refused the request: {reason} (status needs a key with the `admin` right)")]
    Refused { endpoint: String, reason: Refusal },
    #[error("cannot encode the status request")]
    Encode(#[from] EncodeError),
    #[error("{endpoint} sent an undecodable reply")]
    Decode {
        endpoint: String,
        #[source]
        source: DecodeError,
    },
    #[error("{endpoint} answered the status request with something else: {reply}")]
    Unexpected { endpoint: String, reply: String },
}

/// Asks the server at `endpoint` for its status, giving up after `timeout`.
pub async fn query_status(endpoint: &str, timeout: Duration, keys: Option<&ClientKeys>) -> Result<StatusReport, StatusError> {
    let (endpoint, keys) = (endpoint.to_string(), keys.cloned());
    tokio::task::spawn_blocking(move || query_status_blocking(&endpoint, timeout, keys.as_ref()))
        .await
        .map_err(|e| StatusError::Socket { endpoint: String::new(), reason: e.to_string() })?
}

/// [`query_status`] for callers without an async runtime.
pub fn query_status_blocking(endpoint: &str, timeout: Duration, keys: Option<&ClientKeys>) -> Result<StatusReport, StatusError> {
    let request = encode(&Request::Status)?;
    let socket_err = |reason: String| StatusError::Socket { endpoint: endpoint.to_string(), reason };
    let ctx = fog_transport::Context::new();
    let curve = keys.map(|k| (&k.keys, &k.server));
    let mut socket = fog_transport::connect_monitored("status", &ctx, fog_transport::SocketType::DEALER, endpoint, curve, &Limits::default())
        .map_err(|e| socket_err(e.to_string()))?;
    let deadline = Instant::now() + timeout;
    loop {
        socket.send(vec![request.clone()]).map_err(|e| socket_err(e.to_string()))?;
        let frame = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match socket.recv_blocking(left) {
                Some(Event::Message(m)) => break m.frames.into_iter().last().unwrap_or_default(),
                Some(Event::HandshakeFailed(why)) => return Err(StatusError::Handshake { endpoint: endpoint.to_string(), why }),
                Some(_) => continue,
                None => return Err(StatusError::Timeout { endpoint: endpoint.to_string(), after: timeout }),
            }
        };
        let reply: Reply = decode(&frame).map_err(|source| StatusError::Decode { endpoint: endpoint.to_string(), source })?;
        match reply {
            Reply::Status(report) => return Ok(*report),
            // The server builds a few reports a second at most: ask again.
            Reply::Refused { reason: Refusal::Busy, .. } if Instant::now() + BUSY_RETRY < deadline => std::thread::sleep(BUSY_RETRY),
            Reply::Refused { reason, .. } => return Err(StatusError::Refused { endpoint: endpoint.to_string(), reason }),
            other => return Err(StatusError::Unexpected { endpoint: endpoint.to_string(), reply: format!("{other:?}") }),
        }
    }
}

/// How long a status client waits before asking a busy server again.
const BUSY_RETRY: Duration = Duration::from_millis(250);

/// How a node replicates, in words for people (logs, `fog-server status`).
pub fn describe_replication(r: Replication) -> &'static str {
    match r {
        Replication::InSync => "active, in sync with the passive",
        Replication::PassiveJoining => "active, passive joining or catching up (acking alone until the passive holds all of it)",
        Replication::Alone => "active, alone (no passive in sync)",
        Replication::Merging => "passive, merging readings it accepted alone into the active",
        Replication::CaughtUp => "passive, caught up",
        Replication::CatchingUp => "passive, catching up (may not take over)",
        Replication::WaitingForPeer => "waiting for the peer",
    }
}

/// A few lines an operator can read at a glance.
pub fn human_summary(r: &StatusReport) -> String {
    let mut out = format!(
        "{} node, state {}, epoch {}, peer {}\n\
         replication: {} (lag {} entries); log at entry {}, durable to {}\n\
         counted {} readings ({} duplicates dropped, {} outside the windows, {} expired) in {} batches\n\
         averages published {} ({} revisions), last seq {}\n\
         malformed frames {}; refused: {} from the future, {} seq out of range, {} too large, {} not authorized, {} foreign sensor, {} busy; forged epochs {}\n",
        r.role,
        r.state.as_str(),
        r.epoch,
        if r.peer_alive { "alive" } else { "not heard" },
        describe_replication(r.replication),
        r.lag,
        r.lsn,
        r.durable_lsn,
        r.counted,
        r.duplicates,
        r.too_late,
        r.expired,
        r.batches,
        r.averages_published,
        r.revisions_published,
        r.last_average
            .map_or_else(|| "-".to_string(), |c| format!("{} (epoch {}, chain {:016x})", c.seq, c.epoch, c.chain)),
        r.malformed_frames,
        r.refused.from_the_future,
        r.refused.seq_out_of_range,
        r.refused.too_large,
        r.refused.not_authorized,
        r.refused.foreign_sensor,
        r.refused.busy,
        r.forged_epochs,
    );
    if let Some(u) = &r.uplink {
        out.push_str(&format!(
            "uplink to {}: {}; in the cloud through site item {} of {}; backlog {} items ({} bytes, oldest {}); {} dropped at the bound; {} messages acked{}{}\n",
            u.stream,
            if u.connected { "connected" } else { "not connected" },
            u.forwarded_through,
            u.last_seq,
            u.backlog_items,
            u.backlog_bytes,
            humantime::format_duration(std::time::Duration::from_secs(u.oldest_ms / 1000)),
            u.dropped,
            u.messages,
            if u.adoptions == 0 { String::new() } else { format!("; {} items of another history taken over ({} times, after splits)", u.adopted_items, u.adoptions) },
            if u.last_error.is_empty() { String::new() } else { format!("; last error: {}", u.last_error) },
        ));
    }
    out.push_str(&format!(
        "{} sensor incarnations ({} more retired after the dedup horizon)",
        r.per_sensor.len(),
        r.retired_incarnations
    ));
    for s in r.per_sensor.iter().take(20) {
        let mean = if s.count == 0 {
            0.0
        } else {
            s.sum_kmh as f64 / s.count as f64
        };
        out.push_str(&format!(
            "\n  sensor {:>6} incarnation {:016x}: {} readings, mean {:.1} km/h",
            s.sensor_id, s.incarnation, s.count, mean
        ));
    }
    if r.per_sensor.len() > 20 {
        out.push_str(&format!(
            "\n  … and {} more (use --json)",
            r.per_sensor.len() - 20
        ));
    }
    out
}
