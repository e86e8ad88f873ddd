//! The tokio + ZeroMQ shell around a [`Node`]: sockets, the wall clock,
//! the disk, logging and shutdown. No protocol decision is made here.
//!
//! - Frontend: a ROUTER; a request is exactly `[identity, payload]` and the
//!   reply goes back as `[identity, payload]`. Anything else is dropped and
//!   counted, and logged once per peer identity.
//! - State channel: a PUB bound locally carries every [`PeerMessage`] of this
//!   node (heartbeats, log entries, snapshots, acks); a SUB connected to the
//!   peer's PUB feeds the peer's messages to the node. zmq.rs does not
//!   reliably reconnect, so the SUB is recreated whenever the peer is silent
//!   for two heartbeats; what is lost meanwhile, the replication protocol
//!   sends again.
//! - Disk: one thread owns the write-ahead log. It takes every group of
//!   entries queued while it was busy, writes them at once and syncs once
//!   (group commit), then reports "durable up to" back to the node.
//! - One task owns the node; socket receivers run in their own tasks so a
//!   receive is always pending, and hand frames over through channels.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

pub use fog_protocol::now_ms;

use bytes::Bytes;
use fog_protocol::{LogEntry, PeerMessage, decode, decode_request, encode};
use tokio::sync::mpsc;
use tokio::time::{Instant, MissedTickBehavior};
use tracing::{debug, error, info, warn};
use zeromq::{
    PubSocket, RouterSocket, Socket, SocketOptions, SocketRecv, SocketSend, SubSocket, ZmqError,
    ZmqMessage,
};

use crate::fsm::Role;
use crate::node::{ClientToken, Node, NodeConfig, Output};
use crate::wal::{FsyncPolicy, Wal, WalError};
use crate::windows::WindowConfig;

/// How often the driver logs progress.
const PROGRESS_EVERY: Duration = Duration::from_secs(5);
/// Distinct peers whose malformed frames are logged; beyond that, only counted.
const MALFORMED_LOG_PEERS: usize = 1024;
/// A reply that cannot be queued within this time is dropped (the client
/// resends); one stuck client must not stall the others.
const REPLY_SEND_TIMEOUT: Duration = Duration::from_secs(1);
/// Requests taken in one go before their entries go to the disk together.
const MAX_REQUESTS_PER_ROUND: usize = 256;

/// Everything a server process is started with.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub role: Role,
    /// Where clients connect (bound).
    pub frontend: String,
    /// Where this node publishes its heartbeats and replication (bound).
    pub state_bind: String,
    /// The peer's state endpoint (connected).
    pub state_connect: String,
    pub heartbeat: Duration,
    pub windows: WindowConfig,
    /// Where the write-ahead log and snapshots live.
    pub data_dir: PathBuf,
    pub fsync: FsyncPolicy,
    /// A local snapshot after this many log entries.
    pub snapshot_every: u64,
}

impl ServerConfig {
    /// The reference addresses of the ZeroMQ guide's Binary Star for `role`:
    /// frontends 5001/5002, state channels 5003/5004, on localhost; data in
    /// `./fog-data/<role>`.
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
            data_dir: PathBuf::from("fog-data").join(role.as_str()),
            fsync: FsyncPolicy::Batch,
            snapshot_every: 10_000,
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
    #[error("data directory: {0}")]
    Wal(#[from] WalError),
    #[error("cannot recover from {}: {why}", dir.display())]
    Recover { dir: PathBuf, why: String },
}

/// The innermost cause of a ZeroMQ error, without zmq.rs's wrapper text
/// (its wrappers repeat their source in their own message).
pub(crate) fn zmq_reason(e: &ZmqError) -> String {
    match e {
        ZmqError::Network(io) => io.to_string(),
        other => other.to_string(),
    }
}

/// Accepts the libzmq spelling `tcp://*:PORT` for "all interfaces", which
/// zmq.rs does not.
pub fn bind_endpoint(endpoint: &str) -> String {
    match endpoint.strip_prefix("tcp://*:") {
        Some(port) => format!("tcp://0.0.0.0:{port}"),
        None => endpoint.to_string(),
    }
}

/// A job for the disk thread.
enum DiskJob {
    Append(Vec<LogEntry>),
    Snapshot { lsn: u64, bytes: Vec<u8> },
}

/// What the disk thread reports: durable up to `lsn`, or a failure.
enum DiskDone {
    Durable { lsn: u64, snapshot: bool },
    Failed(WalError),
}

/// Runs the write-ahead log: takes every job queued while the previous
/// group was being written, so one sync covers many batches.
fn disk_thread(mut wal: Wal, jobs: std::sync::mpsc::Receiver<DiskJob>, done: mpsc::UnboundedSender<DiskDone>) {
    while let Ok(first) = jobs.recv() {
        let mut group = vec![first];
        while let Ok(more) = jobs.try_recv() {
            group.push(more);
        }
        let mut pending: Vec<LogEntry> = Vec::new();
        let flush = |wal: &mut Wal, pending: &mut Vec<LogEntry>| -> Result<Option<u64>, WalError> {
            if pending.is_empty() {
                return Ok(None);
            }
            wal.append(pending)?;
            let last = pending.last().map(|e| e.lsn);
            pending.clear();
            Ok(last)
        };
        for job in group {
            let result = match job {
                DiskJob::Append(entries) => {
                    pending.extend(entries);
                    Ok(())
                }
                DiskJob::Snapshot { lsn, bytes } => flush(&mut wal, &mut pending).and_then(|_| {
                    wal.write_snapshot(&bytes)?;
                    let _ = done.send(DiskDone::Durable { lsn, snapshot: true });
                    Ok(())
                }),
            };
            if let Err(e) = result {
                let _ = done.send(DiskDone::Failed(e));
                return;
            }
        }
        match flush(&mut wal, &mut pending) {
            Ok(Some(lsn)) => {
                let _ = done.send(DiskDone::Durable { lsn, snapshot: false });
            }
            Ok(None) => {}
            Err(e) => {
                let _ = done.send(DiskDone::Failed(e));
                return;
            }
        }
    }
}

/// Opens the data directory and rebuilds the node from it.
fn recover_node(cfg: &ServerConfig, node_cfg: NodeConfig) -> Result<(Node, Wal), ServerError> {
    let recovered = crate::wal::recover(&cfg.data_dir)?;
    let node = Node::recover(node_cfg, recovered.snapshot.as_deref(), &recovered.entries)
        .map_err(|e| ServerError::Recover { dir: cfg.data_dir.clone(), why: e.to_string() })?;
    let wal = Wal::open(&cfg.data_dir, &recovered, cfg.fsync)?;
    info!(
        data_dir = %cfg.data_dir.display(),
        generation = recovered.generation,
        entries = recovered.entries.len(),
        lsn = node.lsn(),
        epoch = node.epoch(),
        counted = node.replica().ingest.counted(),
        "recovered from the data directory"
    );
    Ok((node, wal))
}

/// Runs a server until `shutdown` completes.
pub async fn run(cfg: ServerConfig, shutdown: impl Future<Output = ()>) -> Result<(), ServerError> {
    let heartbeat_ms = u64::try_from(cfg.heartbeat.as_millis()).unwrap_or(u64::MAX);
    if heartbeat_ms == 0 {
        return Err(ServerError::Config(
            "the heartbeat must be at least 1 ms".into(),
        ));
    }

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
    // Recovery comes after binding, so that a second server started on the
    // same ports fails before it touches the data directory.
    let (mut node, wal) = recover_node(
        &cfg,
        NodeConfig {
            role: cfg.role,
            heartbeat_ms,
            windows: cfg.windows,
            snapshot_every: cfg.snapshot_every.max(1),
            // The transport derives the pair's seal key from the two
            // servers' keys and supplies it here; until it does, every
            // pair shares this fixed one.
            seal_key: *b"fog pair epoch seal key (fixed) ",
        },
    )?;
    let (mut replies, requests_rx) = router.split();

    let (request_tx, mut requests) = mpsc::channel::<ZmqMessage>(4096);
    let reader = tokio::spawn(read_frontend(requests_rx, request_tx));
    let (peer_tx, mut peer_rx) = mpsc::channel::<PeerMessage>(1024);
    let watcher = tokio::spawn(watch_peer(
        cfg.state_connect.clone(),
        cfg.heartbeat,
        peer_tx,
    ));
    let (disk_tx, disk_jobs) = std::sync::mpsc::channel::<DiskJob>();
    let (done_tx, mut disk_done) = mpsc::unbounded_channel::<DiskDone>();
    let disk = std::thread::Builder::new()
        .name("fog-wal".into())
        .spawn(move || disk_thread(wal, disk_jobs, done_tx))
        .map_err(|e| ServerError::Config(format!("cannot start the log thread: {e}")))?;

    info!(
        role = cfg.role.as_str(),
        frontend = %cfg.frontend,
        state_bind = %cfg.state_bind,
        peer = %cfg.state_connect,
        heartbeat = ?cfg.heartbeat,
        fsync = ?cfg.fsync,
        "fog-server started as {}", cfg.role.as_str()
    );

    let mut progress = tokio::time::interval_at(Instant::now() + PROGRESS_EVERY, PROGRESS_EVERY);
    progress.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut report = Progress::default();
    let mut malformed_peers: HashSet<Bytes> = HashSet::new();
    let mut clients = Clients::default();
    let mut failure: Option<ServerError> = None;
    tokio::pin!(shutdown);

    node.handle_timeout(now_ms());
    loop {
        let io = Io { replies: &mut replies, publisher: &mut publisher, disk: &disk_tx, clients: &mut clients };
        if let Err(e) = flush(&mut node, io).await {
            failure = Some(e);
            break;
        }
        let wake = Instant::now() + Duration::from_millis(node.poll_timeout().saturating_sub(now_ms()));
        tokio::select! {
            () = &mut shutdown => break,
            Some(frame) = requests.recv() => {
                handle_frame(&mut node, now_ms(), frame, &mut malformed_peers, &mut clients);
                // Take what else is waiting, so its entries share one sync.
                for _ in 1..MAX_REQUESTS_PER_ROUND {
                    match requests.try_recv() {
                        Ok(frame) => handle_frame(&mut node, now_ms(), frame, &mut malformed_peers, &mut clients),
                        Err(_) => break,
                    }
                }
            }
            Some(msg) = peer_rx.recv() => {
                node.handle_peer(now_ms(), msg);
                while let Ok(msg) = peer_rx.try_recv() {
                    node.handle_peer(now_ms(), msg);
                }
            }
            Some(done) = disk_done.recv() => match done {
                DiskDone::Durable { lsn, snapshot } => node.handle_durable(now_ms(), lsn, snapshot),
                DiskDone::Failed(e) => {
                    error!("the write-ahead log failed; stopping rather than acking what is not durable: {e}");
                    failure = Some(e.into());
                    break;
                }
            },
            () = tokio::time::sleep_until(wake) => node.handle_timeout(now_ms()),
            _ = progress.tick() => report.log(&node, now_ms()),
        }
    }

    info!(
        counted = node.replica().ingest.counted(),
        averages_published = node.replica().windows.averages_published(),
        lsn = node.lsn(),
        "shutting down"
    );
    reader.abort();
    watcher.abort();
    drop(disk_tx);
    let _ = tokio::task::spawn_blocking(move || disk.join()).await;
    match failure {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// Frontend identities of the clients with a reply outstanding.
#[derive(Default)]
struct Clients {
    next: ClientToken,
    identities: HashMap<ClientToken, Bytes>,
}

struct Io<'a> {
    replies: &'a mut zeromq::RouterSendHalf,
    publisher: &'a mut PubSocket,
    disk: &'a std::sync::mpsc::Sender<DiskJob>,
    clients: &'a mut Clients,
}

/// Carries out what the node asked for: log entries go to the disk thread
/// as one group, replies to their clients, messages to the peer.
async fn flush(node: &mut Node, io: Io<'_>) -> Result<(), ServerError> {
    let mut appends = Vec::new();
    let disk_gone = || ServerError::Config("the log thread stopped".into());
    while let Some(output) = node.poll_output() {
        match output {
            Output::Append(entry) => appends.push(entry),
            Output::SaveSnapshot { lsn, bytes } => {
                if !appends.is_empty() {
                    io.disk.send(DiskJob::Append(std::mem::take(&mut appends))).map_err(|_| disk_gone())?;
                }
                io.disk.send(DiskJob::Snapshot { lsn, bytes }).map_err(|_| disk_gone())?;
            }
            Output::Reply { to, reply } => {
                let Some(identity) = io.clients.identities.remove(&to) else { continue };
                match encode(&reply) {
                    Ok(payload) => {
                        let mut out = ZmqMessage::from(identity);
                        out.push_back(Bytes::from(payload));
                        send_reply(io.replies, out).await;
                    }
                    Err(e) => error!("cannot encode a reply: {e}"),
                }
            }
            Output::Peer(msg) => match encode(&msg) {
                Ok(frame) => {
                    if let Err(e) = io.publisher.send(ZmqMessage::from(frame)).await {
                        debug!("peer message not sent: {e}");
                    }
                }
                Err(e) => error!("cannot encode a message to the peer: {e}"),
            },
        }
    }
    if !appends.is_empty() {
        io.disk.send(DiskJob::Append(appends)).map_err(|_| disk_gone())?;
    }
    Ok(())
}

/// Hands one frontend message to the node, or drops it as malformed.
fn handle_frame(
    node: &mut Node,
    now: u64,
    message: ZmqMessage,
    malformed_peers: &mut HashSet<Bytes>,
    clients: &mut Clients,
) {
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
            return;
        }
    };
    clients.next += 1;
    let token = clients.next;
    clients.identities.insert(token, identity);
    node.handle_request(now, token, &request);
}

async fn send_reply(replies: &mut zeromq::RouterSendHalf, reply: ZmqMessage) {
    match tokio::time::timeout(REPLY_SEND_TIMEOUT, replies.send(reply)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => debug!("reply not sent (client gone?): {e}"),
        Err(_) => warn!("reply dropped: the client did not take it within {REPLY_SEND_TIMEOUT:?}"),
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

/// Subscribes to the peer's messages, recreating the SUB socket whenever
/// the connection fails or the peer is silent for two heartbeats.
async fn watch_peer(endpoint: String, heartbeat: Duration, out: mpsc::Sender<PeerMessage>) {
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
                    match decode::<PeerMessage>(frame) {
                        Ok(hb) => {
                            if !connected {
                                info!(peer = %endpoint, "hearing the peer");
                                connected = true;
                            }
                            if out.send(hb).await.is_err() {
                                return;
                            }
                        }
                        Err(e) => debug!("ignored a bad frame from the peer: {e}"),
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
        let counted = node.replica().ingest.counted();
        let secs = self.last_at_ms.map_or(PROGRESS_EVERY.as_secs_f64(), |t| {
            (now.saturating_sub(t) as f64 / 1000.0).max(0.001)
        });
        let rate = (counted - self.last_counted) as f64 / secs;
        let status = node.status(now);
        info!(
            state = node.state().as_str(),
            epoch = status.epoch,
            counted,
            rate = format!("{rate:.0}/s"),
            averages = status.averages_published,
            last_average = ?status.last_average.map(|c| c.seq),
            lsn = status.lsn,
            replication = %status.replication,
            lag = status.lag,
            malformed = node.malformed_frames(),
            "progress"
        );
        self.last_counted = counted;
        self.last_at_ms = Some(now);
    }
}
