//! The tokio + ZeroMQ shell around a [`Node`]: sockets, keys, the clocks,
//! the disk, logging and shutdown. No protocol decision is made here.
//!
//! - Frontend: a ROUTER (CurveZMQ server, every client key checked by the
//!   ZAP handler); a request is exactly `[identity, payload]` and the reply
//!   goes back as `[identity, payload]`. What a client may ask is checked
//!   against its key's rights ([`crate::edge`]) before the node sees it,
//!   by the frontend's bookkeeping (`frontend.rs`).
//!   Anything malformed is dropped and counted, and logged once per peer.
//!   Replies a client does not take (it stopped reading) are dropped and
//!   counted: the client resends, nothing acked is lost.
//! - State channel: a PUB bound locally carries every [`PeerMessage`] of this
//!   node (heartbeats, log entries, snapshots, acks) to the peer only (the
//!   ZAP handler admits the `peer` key alone); a SUB connected to the peer's
//!   PUB, authenticating the peer by its server key, feeds the peer's
//!   messages to the node. libzmq reconnects by itself.
//! - Keys: the node's own keypair, and the authorized-keys file, reloaded on
//!   SIGHUP. The pair's seal key (for epochs) is derived from the two
//!   servers' keys, so only they can make it.
//! - Disk: one thread owns the write-ahead log. It takes every group of
//!   entries queued while it was busy, writes them at once and syncs once
//!   (group commit), then reports "durable up to" back to the node.
//! - Every socket lives on a thread of its own (`fog_transport::Socket`);
//!   one task owns the node.

use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use fog_protocol::{LogEntry, PeerMessage, Reply, decode, encode};
use fog_transport::{AccessList, Event, Limits, PublicKey, SharedAccess, Socket, ZapHandler};
use tokio::sync::mpsc;
use tokio::time::{Instant, MissedTickBehavior};
use tracing::{debug, error, info, warn};

use crate::clock::{Clock, Now};
use crate::edge::Security;
use crate::frontend::{Gate, Pending, handle_event, send_reply};
use crate::metrics::{DriverFigures, ServerMetrics};
use crate::fsm::Role;
use crate::node::{Node, NodeConfig, Output};
use crate::outbox::OutboxConfig;
use crate::uplink::{Creds, Landed, Uplink, UplinkConfig, UplinkEvent};
use crate::wal::{FsyncPolicy, Wal, WalError};
use crate::windows::WindowConfig;

/// How often the figures on `/metrics` (and readiness) are brought up to date.
const PUBLISH_EVERY: Duration = Duration::from_secs(1);
/// Least time between two uplink positions written to the log.
const UPLINK_RECORD_EVERY: Duration = Duration::from_millis(20);
/// How often the driver logs progress.
const PROGRESS_EVERY: Duration = Duration::from_secs(5);
/// Requests taken in one go before their entries go to the disk together.
const MAX_REQUESTS_PER_ROUND: usize = 256;
/// ... or until they have taken this long: a turn of the loop that runs
/// for seconds (a few full batches on a starved core) misses heartbeats,
/// and one late by four is taken for a pause.
const MAX_ROUND_TIME: Duration = Duration::from_millis(50);
/// Messages queued per peer and direction on the state channel.
const HWM: i32 = 1000;
/// Messages queued per client and direction on the frontend. A host has
/// one batch in flight, a load generator a few: 64 is ample, and it bounds
/// what a client that stops reading can make the server hold for it
/// (64 replies; a batch reply is at most a few hundred KiB).
const CLIENT_HWM: i32 = 64;

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
    /// Keys, or none (loopback only unless explicitly allowed).
    pub security: Security,
    /// Where `/metrics`, `/healthz` and `/readyz` are served; `None`: nowhere.
    pub metrics: Option<fog_observe::Endpoint>,
    /// The uplink to the cloud (NATS JetStream); `None`: no uplink, and no
    /// outbox is kept. Give both nodes the same.
    pub uplink: Option<UplinkConfig>,
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
            security: Security::None { allow_remote: false },
            metrics: None,
            uplink: None,
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
    #[error(transparent)]
    Wal(#[from] WalError),
    #[error("cannot recover from {}: {why}", dir.display())]
    Recover { dir: PathBuf, why: String },
    #[error(transparent)]
    Transport(#[from] fog_transport::TransportError),
    #[error("keys: {0}")]
    Access(#[from] fog_transport::AccessError),
    #[error("{0}")]
    Insecure(String),
    #[error(transparent)]
    Metrics(#[from] fog_observe::ObserveError),
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
    crate::metrics::wal_group(Duration::ZERO, None, wal.len());
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
            let times = wal.append(pending)?;
            crate::metrics::wal_group(times.write, times.sync, wal.len());
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
                    let began = std::time::Instant::now();
                    wal.write_snapshot(&bytes)?;
                    crate::metrics::snapshot_written(began.elapsed(), wal.len());
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
fn recover_node(cfg: &ServerConfig, node_cfg: NodeConfig, observed: &ServerMetrics) -> Result<(Node, Wal), ServerError> {
    let began = std::time::Instant::now();
    let recovered = crate::wal::recover(&cfg.data_dir)?;
    let node = Node::recover(node_cfg, recovered.snapshot.as_deref(), &recovered.entries)
        .map_err(|e| ServerError::Recover { dir: cfg.data_dir.clone(), why: e.to_string() })?;
    let wal = Wal::open(&cfg.data_dir, &recovered, cfg.fsync)?;
    observed.recovered(began.elapsed(), recovered.truncated.as_ref().map_or(0, |t| t.2));
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

/// The sockets and keys of a running node.
struct Edge {
    frontend: Socket,
    publisher: Socket,
    peer: Socket,
    /// How to connect to the peer again (after a pause of this process).
    peer_connect: PeerConnect,
    /// The authorized keys; `None` without security.
    access: Option<SharedAccess>,
    access_path: Option<PathBuf>,
    /// The key epochs are sealed with: derived from the two servers' keys
    /// (their X25519 shared secret), so only the pair can make it. Without
    /// keys, a fixed one: on loopback there is nobody to keep out.
    seal_key: [u8; 32],
    _zap: Option<ZapHandler>,
    _ctx: fog_transport::Context,
}

/// Binds the frontend and the state channel and connects to the peer, with
/// the node's keys (or, without keys, on loopback only).
fn open_edge(cfg: &ServerConfig) -> Result<Edge, ServerError> {
    let ctx = fog_transport::Context::new();
    let limits = Limits { max_message_bytes: fog_protocol::MAX_FRAME_BYTES + 1024, hwm: HWM, ..Limits::default() };
    let socket_err = |e: std::io::Error| ServerError::Config(format!("cannot start a socket thread: {e}"));
    let (curve, peer_key, access, access_path, zap) = match &cfg.security {
        Security::None { allow_remote } => {
            let remote: Vec<&str> = [&cfg.frontend, &cfg.state_bind]
                .into_iter()
                .map(String::as_str)
                .filter(|e| !fog_transport::is_local(e))
                .collect();
            if !remote.is_empty() && !allow_remote {
                return Err(ServerError::Insecure(format!(
                    "refusing to listen on {} without keys: give --key and --authorized-keys (see `fog-server keygen`), or --insecure to serve anyone who can reach it",
                    remote.join(" and ")
                )));
            }
            (None, None, None, None, None)
        }
        Security::Curve { keys, access: path } => {
            let list = AccessList::read(path)?;
            let Some(peer) = list.peer().map(|c| c.key) else {
                return Err(ServerError::Config(format!(
                    "{} lists no key with the `peer` right: the other server's public key must be there",
                    path.display()
                )));
            };
            info!(keys = list.len(), file = %path.display(), key = %keys.public, "CurveZMQ on every socket; clients checked against the authorized keys");
            let shared: SharedAccess = Arc::new(RwLock::new(Arc::new(list)));
            let zap = ZapHandler::start(&ctx, shared.clone())
                .map_err(|e| ServerError::Config(format!("cannot start the ZAP handler: {e}")))?;
            (Some(keys.clone()), Some(peer), Some(shared), Some(path.clone()), Some(zap))
        }
    };
    fn bind_err<'a>(what: &'static str, endpoint: &'a str) -> impl FnOnce(fog_transport::TransportError) -> ServerError + 'a {
        move |e| match e {
            fog_transport::TransportError::Endpoint { reason, .. } => ServerError::Bind { what, endpoint: endpoint.to_string(), reason },
            other => other.into(),
        }
    }
    let client_limits = Limits { hwm: CLIENT_HWM, ..limits };
    let frontend = fog_transport::bind(&ctx, fog_transport::SocketType::ROUTER, &cfg.frontend, curve.as_ref(), fog_transport::FRONTEND_DOMAIN, &client_limits)
        .map_err(bind_err("frontend", &cfg.frontend))?;
    let publisher = fog_transport::bind(&ctx, fog_transport::SocketType::PUB, &cfg.state_bind, curve.as_ref(), fog_transport::STATE_DOMAIN, &limits)
        .map_err(bind_err("state", &cfg.state_bind))?;
    match &cfg.security {
        Security::Curve { .. } => {}
        Security::None { allow_remote: false } => warn!("no keys: serving without authentication or encryption, on loopback only"),
        Security::None { allow_remote: true } => warn!("--insecure: serving without authentication or encryption to anyone who can reach these ports"),
    }
    let peer = fog_transport::connect(
        &ctx,
        fog_transport::SocketType::SUB,
        &cfg.state_connect,
        curve.as_ref().zip(peer_key.as_ref()),
        &limits,
    )?;
    let peer_connect = PeerConnect { endpoint: cfg.state_connect.clone(), curve: curve.clone().zip(peer_key), limits };
    Ok(Edge {
        frontend: Socket::spawn("frontend", &ctx, frontend, false).map_err(socket_err)?,
        publisher: Socket::spawn("state", &ctx, publisher, false).map_err(socket_err)?,
        peer: Socket::spawn("peer", &ctx, peer, false).map_err(socket_err)?,
        peer_connect,
        access,
        access_path,
        seal_key: match (&curve, &peer_key) {
            (Some(keys), Some(peer)) => blake3::derive_key("fog 2026-12 pair epoch seal", &keys.shared_secret(peer)),
            _ => blake3::derive_key("fog 2026-12 pair epoch seal, no keys", b""),
        },
        _zap: zap,
        _ctx: ctx,
    })
}

/// The peer's state endpoint and the keys to reach it with.
struct PeerConnect {
    endpoint: String,
    curve: Option<(fog_transport::Keypair, PublicKey)>,
    limits: Limits,
}

impl Edge {
    /// Replaces the connection to the peer's state channel, dropping every
    /// message queued on it. After this process was paused (SIGSTOP, a VM
    /// freeze), what is queued is the peer's past: heartbeats from before
    /// it took over would make this node act on a world that is gone.
    fn reconnect_peer(&mut self) -> Result<(), ServerError> {
        warn!("this process was paused: dropping the peer's messages queued meanwhile and reconnecting");
        let c = &self.peer_connect;
        let curve = c.curve.as_ref().map(|(k, p)| (k, p));
        let sub = fog_transport::connect(&self._ctx, fog_transport::SocketType::SUB, &c.endpoint, curve, &c.limits)?;
        self.peer = Socket::spawn("peer", &self._ctx, sub, false)
            .map_err(|e| ServerError::Config(format!("cannot start a socket thread: {e}")))?;
        Ok(())
    }
}

/// Re-reads the authorized-keys file (SIGHUP); a file that does not parse
/// leaves the old keys in force.
fn reload_keys(edge: &Edge) {
    let (Some(shared), Some(path)) = (&edge.access, &edge.access_path) else {
        info!("SIGHUP: no authorized-keys file to reload (running without keys)");
        return;
    };
    match AccessList::read(path) {
        Ok(list) => {
            let n = list.len();
            fog_transport::zap::replace(shared, list);
            info!(keys = n, file = %path.display(), "reloaded the authorized keys; connections of keys still listed carry on");
        }
        Err(e) => warn!("kept the authorized keys in force: the new file is refused: {e}"),
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
    let mut edge = open_edge(&cfg)?;
    let health = Arc::new(fog_observe::Health::default());
    if let Some(endpoint) = &cfg.metrics {
        fog_observe::serve_or_warn(endpoint, health.clone())?;
    }
    let mut observed = ServerMetrics::new(cfg.role.as_str(), cfg.data_dir.clone(), health);
    // Recovery comes after binding, so that a second server started on the
    // same ports fails before it touches the data directory.
    let (mut node, wal) = recover_node(
        &cfg,
        NodeConfig {
            role: cfg.role,
            heartbeat_ms,
            windows: cfg.windows,
            snapshot_every: cfg.snapshot_every.max(1),
            seal_key: edge.seal_key,
            outbox: cfg.uplink.as_ref().map_or(OutboxConfig::default(), |u| OutboxConfig { enabled: true, backlog_bytes: u.backlog_bytes }),
        },
        &observed,
    )?;
    let mut uplink = match &cfg.uplink {
        Some(u) => {
            let creds = u.creds.as_deref().map(Creds::read).transpose().map_err(|e| ServerError::Config(format!("--uplink-creds: {e}")))?;
            info!(urls = %u.urls, stream = %u.stream(), site = %u.site, "uplink to NATS JetStream: forwarding while active");
            Some(Uplink::start(u.clone(), creds))
        }
        None => None,
    };
    // Acks not yet in the log: one landing of consecutive items.
    let mut uplink_pending: Option<Landed> = None;
    let mut uplink_recorded_at = std::time::Instant::now();
    let (disk_tx, disk_jobs) = std::sync::mpsc::channel::<DiskJob>();
    let (done_tx, mut disk_done) = mpsc::unbounded_channel::<DiskDone>();
    let disk = std::thread::Builder::new()
        .name("fog-wal".into())
        .spawn(move || disk_thread(wal, disk_jobs, done_tx))
        .map_err(|e| ServerError::Config(format!("cannot start the log thread: {e}")))?;
    let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .map_err(|e| ServerError::Config(format!("cannot listen for SIGHUP: {e}")))?;

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
    let mut publish = tokio::time::interval(PUBLISH_EVERY);
    publish.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut gate = Gate::default();
    let mut failure: Option<ServerError> = None;
    let mut peer_heard_at: Option<std::time::Instant> = None;
    let silence = cfg.heartbeat * 2;
    // A wake this late means the process was paused (the node's own pause
    // detection uses the same four heartbeats).
    let paused_after = cfg.heartbeat * 4;
    tokio::pin!(shutdown);

    let clock = Clock::new();
    node.handle_timeout(clock.now());
    let mut last_wake: Option<Instant> = None;
    loop {
        if let Err(e) = flush(&mut node, &edge, &disk_tx, &mut gate, &mut observed, uplink.as_ref()) {
            failure = Some(e);
            break;
        }
        observed.after_turn(&node, peer_heard_at);
        if let Some(up) = uplink.as_mut() {
            // Acks move the position in the log, at most every
            // UPLINK_RECORD_EVERY (each is an entry, replicated).
            if let Some(l) = uplink_pending.filter(|_| uplink_recorded_at.elapsed() >= UPLINK_RECORD_EVERY) {
                node.handle_uplink_acked(clock.now(), l.through, l.chain, l.from);
                uplink_pending = None;
                uplink_recorded_at = std::time::Instant::now();
                continue;
            }
            up.control(node.state() == fog_protocol::NodeState::Active, node.epoch());
            if let Some(after) = up.next_after() {
                up.feed(node.uplink_owed(after));
            }
        }
        // Whichever event woke the loop after a pause, the peer's queued
        // past must not reach the node.
        if last_wake.is_some_and(|w| Instant::now() > w + paused_after) {
            if let Err(e) = edge.reconnect_peer() {
                failure = Some(e);
                break;
            }
        }
        let wake = Instant::from_std(clock.instant_of(node.poll_timeout()));
        last_wake = Some(wake);
        tokio::select! {
            () = &mut shutdown => break,
            Some(event) = edge.frontend.recv() => {
                let access = edge.access.as_ref().map(fog_transport::zap::current);
                handle_event(&mut node, clock.now(), event, access.as_deref(), &edge.frontend, &mut gate);
                // Take what else is waiting, so its entries share one sync.
                let round = std::time::Instant::now();
                for _ in 1..MAX_REQUESTS_PER_ROUND {
                    if round.elapsed() >= MAX_ROUND_TIME {
                        break;
                    }
                    match edge.frontend.try_recv() {
                        Some(event) => handle_event(&mut node, clock.now(), event, access.as_deref(), &edge.frontend, &mut gate),
                        None => break,
                    }
                }
            }
            Some(event) = edge.peer.recv() => {
                if Instant::now() > wake + paused_after {
                    if let Err(e) = edge.reconnect_peer() {
                        failure = Some(e);
                        break;
                    }
                    node.handle_timeout(clock.now());
                    continue;
                }
                let mut next = Some(event);
                while let Some(event) = next.take() {
                    if let Event::Message(m) = event {
                        match m.frames.as_slice() {
                            [frame] => match decode::<PeerMessage>(frame) {
                                Ok(msg) => {
                                    if peer_heard_at.is_none_or(|at| at.elapsed() > silence) {
                                        info!(peer = %cfg.state_connect, "hearing the peer");
                                    }
                                    peer_heard_at = Some(std::time::Instant::now());
                                    node.handle_peer(clock.now(), msg);
                                }
                                Err(e) => debug!("ignored a bad frame from the peer: {e}"),
                            },
                            _ => debug!("ignored a message of {} frames from the peer", m.frames.len()),
                        }
                    }
                    next = edge.peer.try_recv();
                }
            }
            Some(done) = disk_done.recv() => match done {
                DiskDone::Durable { lsn, snapshot } => {
                    observed.durable(lsn);
                    node.handle_durable(clock.now(), lsn, snapshot);
                }
                DiskDone::Failed(e) => {
                    error!("the write-ahead log failed; stopping rather than acking what is not durable: {e}");
                    failure = Some(e.into());
                    break;
                }
            },
            _ = hangup.recv() => reload_keys(&edge),
            Some(event) = next_uplink_event(&mut uplink) => {
                let mut next = Some(event);
                while let Some(event) = next.take() {
                    let up = uplink.as_mut().expect("an event came from it");
                    match event {
                        UplinkEvent::Check { in_cloud, chain, answer } => {
                            let _ = answer.send(node.outbox().check_stream(in_cloud, chain));
                        }
                        UplinkEvent::ChainAt { site_seq, answer } => {
                            let _ = answer.send(node.outbox().chain_known(site_seq));
                        }
                        UplinkEvent::Adopt { fork, end, chain, readings, answer } => {
                            if let Some(p) = uplink_pending.take() {
                                node.handle_uplink_acked(clock.now(), p.through, p.chain, p.from);
                            }
                            let _ = answer.send(node.handle_uplink_adopt(clock.now(), fork, end, chain, &readings));
                        }
                        UplinkEvent::Resync { round, from, partial } => up.resync(round, from, partial, node.outbox().forwarded()),
                        UplinkEvent::Acked { landed, messages } => {
                            up.messages += messages;
                            if let Some(next) = landed {
                                // Landings that do not follow on go to the
                                // log apart (a gap holds dropped items).
                                uplink_pending = match uplink_pending {
                                    None => Some(next),
                                    Some(p) => p.extend(next).or_else(|| {
                                        node.handle_uplink_acked(clock.now(), p.through, p.chain, p.from);
                                        Some(next)
                                    }),
                                };
                            }
                        }
                        UplinkEvent::Connected(c) => up.connected = c,
                        UplinkEvent::Failed(e) => up.last_error = e,
                    }
                    next = up.events.try_recv().ok();
                }
            }
            () = tokio::time::sleep_until(wake) => node.handle_timeout(clock.now()),
            _ = progress.tick() => report.log(&node, clock.now(), &edge, &gate),
            _ = publish.tick() => observed.publish(&node, uplink.as_ref(), &DriverFigures {
                peer_heard_at,
                readings_received: gate.readings_received,
                bytes_received: gate.bytes_received,
                replies_dropped: edge.frontend.stats().dropped_out.load(Ordering::Relaxed),
            }),
        }
    }

    info!(
        counted = node.replica().ingest.counted(),
        averages_published = node.replica().windows.averages_published(),
        lsn = node.lsn(),
        "shutting down"
    );
    drop(disk_tx);
    let _ = tokio::task::spawn_blocking(move || disk.join()).await;
    match failure {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// The next event of the uplink, if there is one (never, without).
async fn next_uplink_event(uplink: &mut Option<Uplink>) -> Option<UplinkEvent> {
    match uplink {
        Some(up) => up.events.recv().await,
        None => std::future::pending().await,
    }
}

/// Carries out what the node asked for: log entries go to the disk thread
/// as one group, replies to their clients, messages to the peer. Never
/// waits on a socket.
fn flush(node: &mut Node, edge: &Edge, disk: &std::sync::mpsc::Sender<DiskJob>, gate: &mut Gate, observed: &mut ServerMetrics, uplink: Option<&Uplink>) -> Result<(), ServerError> {
    let mut appends = Vec::new();
    let disk_gone = || ServerError::Config("the log thread stopped".into());
    while let Some(output) = node.poll_output() {
        match output {
            Output::Append(entry) => appends.push(entry),
            Output::SaveSnapshot { lsn, bytes } => {
                if !appends.is_empty() {
                    disk.send(DiskJob::Append(std::mem::take(&mut appends))).map_err(|_| disk_gone())?;
                }
                disk.send(DiskJob::Snapshot { lsn, bytes }).map_err(|_| disk_gone())?;
            }
            Output::Reply { to, mut reply } => {
                let Some(Pending { identity, refused, arrival }) = gate.pending.remove(&to) else { continue };
                observed.replied(&arrival, &reply);
                match &mut reply {
                    Reply::Batch(batch) => batch.refused.extend(refused),
                    Reply::Status(status) => {
                        status.replies_dropped = edge.frontend.stats().dropped_out.load(Ordering::Relaxed);
                        if let (Some(report), Some(up)) = (status.uplink.as_mut(), uplink) {
                            up.fill(report);
                        }
                    }
                    _ => {}
                }
                send_reply(&edge.frontend, identity, &reply);
            }
            Output::Peer(msg) => match encode(&msg) {
                // The PUB drops what the peer cannot take; replication resends.
                Ok(frame) => {
                    let _ = edge.publisher.send(vec![frame]);
                }
                Err(e) => error!("cannot encode a message to the peer: {e}"),
            },
        }
    }
    if !appends.is_empty() {
        disk.send(DiskJob::Append(appends)).map_err(|_| disk_gone())?;
        observed.appended(node.lsn());
    }
    Ok(())
}

/// The periodic progress line.
#[derive(Default)]
struct Progress {
    last_counted: u64,
    last_at_ms: Option<u64>,
}

impl Progress {
    fn log(&mut self, node: &Node, now: Now, edge: &Edge, gate: &Gate) {
        let counted = node.replica().ingest.counted();
        let secs = self.last_at_ms.map_or(PROGRESS_EVERY.as_secs_f64(), |t| {
            (now.mono_ms.saturating_sub(t) as f64 / 1000.0).max(0.001)
        });
        let rate = (counted - self.last_counted) as f64 / secs;
        let status = node.status();
        info!(
            state = node.state().as_str(),
            epoch = status.epoch,
            counted,
            rate = format!("{rate:.0}/s"),
            averages = status.averages_published,
            last_average = ?status.last_average.map(|c| c.seq),
            lsn = status.lsn,
            replication = crate::status::describe_replication(status.replication),
            lag = status.lag,
            malformed = node.malformed_frames(),
            replies_dropped = edge.frontend.stats().dropped_out.load(Ordering::Relaxed),
            foreign_readings_refused = gate.foreign.values().sum::<u64>(),
            "progress"
        );
        self.last_counted = counted;
        self.last_at_ms = Some(now.mono_ms);
    }
}
