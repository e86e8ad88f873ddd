//! The tokio + ZeroMQ shell around a [`Node`]: sockets, the wall clock,
//! timers, logging and shutdown. No protocol decision is made here.
//!
//! - Frontend: a ROUTER; a request is exactly `[identity, payload]` and the
//!   reply goes back as `[identity, payload]`. Anything else is dropped and
//!   counted, and logged once per peer identity.
//! - State channel: a PUB bound locally publishes the node's heartbeat every
//!   `heartbeat`; a SUB connected to the peer's PUB feeds the peer's
//!   heartbeats to the FSM. zmq.rs does not reliably reconnect, so the SUB is
//!   recreated whenever the peer is silent for two heartbeats.
//! - One task owns the node; socket receivers run in their own tasks so a
//!   receive is always pending, and hand frames over through channels.

use std::collections::HashSet;
use std::future::Future;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use fog_protocol::{PeerHeartbeat, decode, decode_request, encode};
use tokio::sync::mpsc;
use tokio::time::{Instant, MissedTickBehavior};
use tracing::{debug, error, info, warn};
use zeromq::{
    PubSocket, RouterSocket, Socket, SocketOptions, SocketRecv, SocketSend, SubSocket, ZmqError,
    ZmqMessage,
};

use crate::fsm::{Role, Step};
use crate::node::{Node, NodeConfig};
use crate::windows::WindowConfig;

/// How often the driver logs progress.
const PROGRESS_EVERY: Duration = Duration::from_secs(5);
/// Distinct peers whose malformed frames are logged; beyond that, only counted.
const MALFORMED_LOG_PEERS: usize = 1024;
/// A reply that cannot be queued within this time is dropped (the client
/// resends); one stuck client must not stall the others.
const REPLY_SEND_TIMEOUT: Duration = Duration::from_secs(1);

/// Everything a server process is started with.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub role: Role,
    /// Where clients connect (bound).
    pub frontend: String,
    /// Where this node publishes its heartbeats (bound).
    pub state_bind: String,
    /// The peer's heartbeat endpoint (connected).
    pub state_connect: String,
    pub heartbeat: Duration,
    pub windows: WindowConfig,
}

impl ServerConfig {
    /// The reference addresses of the ZeroMQ guide's Binary Star for `role`:
    /// frontends 5001/5002, state channels 5003/5004, on localhost.
    pub fn reference(role: Role) -> Self {
        let (frontend, bind, connect) = match role {
            Role::Primary => (5001, 5003, 5004),
            Role::Backup => (5002, 5004, 5003),
        };
        ServerConfig {
            role,
            frontend: format!("tcp://127.0.0.1:{frontend}"),
            state_bind: format!("tcp://127.0.0.1:{bind}"),
            state_connect: format!("tcp://127.0.0.1:{connect}"),
            heartbeat: Duration::from_millis(250),
            windows: WindowConfig::default(),
        }
    }
}

/// Why a server could not start or run.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("cannot bind the {what} socket to {endpoint}: {reason}")]
    Bind {
        what: &'static str,
        endpoint: String,
        reason: String,
    },
}

/// The innermost cause of a ZeroMQ error, without zmq.rs's wrapper text
/// (its wrappers repeat their source in their own message).
pub(crate) fn zmq_reason(e: &ZmqError) -> String {
    match e {
        ZmqError::Network(io) => io.to_string(),
        other => other.to_string(),
    }
}

/// Milliseconds since the Unix epoch, the clock every node decision uses.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Accepts the libzmq spelling `tcp://*:PORT` for "all interfaces", which
/// zmq.rs does not.
pub fn bind_endpoint(endpoint: &str) -> String {
    match endpoint.strip_prefix("tcp://*:") {
        Some(port) => format!("tcp://0.0.0.0:{port}"),
        None => endpoint.to_string(),
    }
}

/// Runs a server until `shutdown` completes.
pub async fn run(cfg: ServerConfig, shutdown: impl Future<Output = ()>) -> Result<(), ServerError> {
    let heartbeat_ms = u64::try_from(cfg.heartbeat.as_millis()).unwrap_or(u64::MAX);
    if heartbeat_ms == 0 {
        return Err(ServerError::Config(
            "the heartbeat must be at least 1 ms".into(),
        ));
    }
    let mut node = Node::new(NodeConfig {
        role: cfg.role,
        heartbeat_ms,
        windows: cfg.windows,
    });

    let frontend = bind_endpoint(&cfg.frontend);
    let mut router = RouterSocket::new();
    router
        .bind(&frontend)
        .await
        .map_err(|e| ServerError::Bind {
            what: "frontend",
            endpoint: cfg.frontend.clone(),
            reason: zmq_reason(&e),
        })?;
    let state_bind = bind_endpoint(&cfg.state_bind);
    let mut publisher = PubSocket::new();
    publisher
        .bind(&state_bind)
        .await
        .map_err(|e| ServerError::Bind {
            what: "state",
            endpoint: cfg.state_bind.clone(),
            reason: zmq_reason(&e),
        })?;
    let (mut replies, requests_rx) = router.split();

    let (request_tx, mut requests) = mpsc::channel::<ZmqMessage>(1024);
    let reader = tokio::spawn(read_frontend(requests_rx, request_tx));
    let (heartbeat_tx, mut heartbeats) = mpsc::channel::<PeerHeartbeat>(64);
    let watcher = tokio::spawn(watch_peer(
        cfg.state_connect.clone(),
        cfg.heartbeat,
        heartbeat_tx,
    ));

    info!(
        role = cfg.role.as_str(),
        frontend = %cfg.frontend,
        state_bind = %cfg.state_bind,
        peer = %cfg.state_connect,
        heartbeat = ?cfg.heartbeat,
        "fog-server started as {}", cfg.role.as_str()
    );

    let mut beat = tokio::time::interval(cfg.heartbeat);
    beat.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut progress = tokio::time::interval_at(Instant::now() + PROGRESS_EVERY, PROGRESS_EVERY);
    progress.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut report = Progress::default();
    let mut malformed_peers: HashSet<Bytes> = HashSet::new();
    tokio::pin!(shutdown);

    loop {
        let wake = node
            .poll_timeout()
            .map(|at| Instant::now() + Duration::from_millis(at.saturating_sub(now_ms())));
        tokio::select! {
            () = &mut shutdown => break,
            Some(frame) = requests.recv() => {
                let now = now_ms();
                if let Some(reply) = handle_frame(&mut node, now, frame, &mut malformed_peers) {
                    send_reply(&mut replies, reply).await;
                }
            }
            Some(hb) = heartbeats.recv() => {
                let step = node.handle_heartbeat(now_ms(), hb);
                log_step(&step);
            }
            _ = beat.tick() => {
                let frame = match encode(&node.heartbeat()) {
                    Ok(f) => f,
                    Err(e) => { error!("cannot encode a heartbeat: {e}"); continue; }
                };
                if let Err(e) = publisher.send(ZmqMessage::from(frame)).await {
                    debug!("heartbeat not sent: {e}");
                }
                node.handle_timeout(now_ms());
            }
            () = sleep_until_some(wake) => {
                node.handle_timeout(now_ms());
            }
            _ = progress.tick() => report.log(&node, now_ms()),
        }
    }

    info!(
        counted = node.ingest().counted(),
        averages_published = node.windows().averages_published(),
        "shutting down"
    );
    reader.abort();
    watcher.abort();
    Ok(())
}

async fn sleep_until_some(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Turns one frontend message into a reply `[identity, payload]`, or drops
/// it as malformed.
fn handle_frame(
    node: &mut Node,
    now: u64,
    message: ZmqMessage,
    malformed_peers: &mut HashSet<Bytes>,
) -> Option<ZmqMessage> {
    let mut frames = message.into_vec();
    let identity = if frames.is_empty() {
        Bytes::new()
    } else {
        frames.remove(0)
    };
    let decoded = match frames.as_slice() {
        [payload] => decode_request(payload).map_err(|e| e.to_string()),
        other => Err(format!(
            "{} payload frames, expected exactly 1",
            other.len()
        )),
    };
    let request = match decoded {
        Ok(r) => r,
        Err(why) => {
            node.record_malformed();
            if malformed_peers.len() < MALFORMED_LOG_PEERS
                && malformed_peers.insert(identity.clone())
            {
                warn!(
                    peer = %hex(&identity),
                    "dropped a malformed frame ({why}); further ones from this peer are only counted"
                );
            }
            return None;
        }
    };
    let (reply, step) = node.handle_request_step(now, &request);
    if let Some(step) = step {
        log_step(&step);
    }
    let payload = match encode(&reply) {
        Ok(p) => p,
        Err(e) => {
            error!("cannot encode a reply: {e}");
            return None;
        }
    };
    let mut out = ZmqMessage::from(identity);
    out.push_back(Bytes::from(payload));
    Some(out)
}

async fn send_reply(replies: &mut zeromq::RouterSendHalf, reply: ZmqMessage) {
    match tokio::time::timeout(REPLY_SEND_TIMEOUT, replies.send(reply)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => debug!("reply not sent (client gone?): {e}"),
        Err(_) => warn!("reply dropped: the client did not take it within {REPLY_SEND_TIMEOUT:?}"),
    }
}

fn log_step(step: &Step) {
    match (step.note, step.accepted) {
        (Some(note), false) => error!(from = step.from.as_str(), to = step.to.as_str(), "{note}"),
        (Some(note), true) => info!(from = step.from.as_str(), to = step.to.as_str(), "{note}"),
        (None, _) if step.changed() => {
            info!("state {} -> {}", step.from.as_str(), step.to.as_str());
        }
        (None, _) => {}
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Keeps one receive pending on the frontend and hands messages to the node.
async fn read_frontend(mut socket: zeromq::RouterRecvHalf, out: mpsc::Sender<ZmqMessage>) {
    loop {
        match socket.recv().await {
            Ok(message) => {
                if out.send(message).await.is_err() {
                    return;
                }
            }
            Err(e) => {
                debug!("frontend receive failed: {e}");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

/// Subscribes to the peer's heartbeats, recreating the SUB socket whenever
/// the connection fails or the peer is silent for two heartbeats.
async fn watch_peer(endpoint: String, heartbeat: Duration, out: mpsc::Sender<PeerHeartbeat>) {
    let silence = heartbeat * 2;
    let mut connected = false;
    loop {
        let mut options = SocketOptions::default();
        options.connect_timeout(silence);
        let mut sub = SubSocket::with_options(options);
        let ready = tokio::time::timeout(silence, async {
            sub.connect(&endpoint).await?;
            sub.subscribe("").await
        })
        .await;
        if !matches!(ready, Ok(Ok(()))) {
            drop(sub);
            tokio::time::sleep(heartbeat).await;
            continue;
        }
        loop {
            match tokio::time::timeout(silence, sub.recv()).await {
                Ok(Ok(message)) => {
                    let Some(frame) = message.get(0) else {
                        continue;
                    };
                    match decode::<PeerHeartbeat>(frame) {
                        Ok(hb) => {
                            if !connected {
                                info!(peer = %endpoint, "hearing the peer");
                                connected = true;
                            }
                            if out.send(hb).await.is_err() {
                                return;
                            }
                        }
                        Err(e) => debug!("ignored a bad heartbeat frame: {e}"),
                    }
                }
                Ok(Err(_)) | Err(_) => {
                    if connected {
                        info!(peer = %endpoint, "peer silent for two heartbeats; reconnecting");
                        connected = false;
                    }
                    break;
                }
            }
        }
    }
}

/// The periodic progress line.
#[derive(Default)]
struct Progress {
    last_counted: u64,
    last_at_ms: Option<u64>,
}

impl Progress {
    fn log(&mut self, node: &Node, now: u64) {
        let counted = node.ingest().counted();
        let secs = self.last_at_ms.map_or(PROGRESS_EVERY.as_secs_f64(), |t| {
            (now.saturating_sub(t) as f64 / 1000.0).max(0.001)
        });
        let rate = (counted - self.last_counted) as f64 / secs;
        info!(
            state = node.state().as_str(),
            counted,
            rate = format!("{rate:.0}/s"),
            averages = node.windows().averages_published(),
            last_average = ?node.windows().last_seq(),
            malformed = node.malformed_frames(),
            "progress"
        );
        self.last_counted = counted;
        self.last_at_ms = Some(now);
    }
}
