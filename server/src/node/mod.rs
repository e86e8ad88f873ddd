//! One server node without I/O: the Binary Star FSM, the replicated state
//! and the replication protocol behind one interface that a driver (or the
//! simulation) feeds with client requests, peer messages, "durable up to"
//! notices from the disk and timeouts, each with the time it happened at,
//! and drains of [`Output`]s: replies, peer messages, log entries and
//! snapshots to write.
//!
//! Every change of the replicated state is a [`LogEntry`] written by the
//! active node, applied locally, appended to the write-ahead log and sent to
//! the passive. A reply to a batch is held until its entries are durable
//! here and, once a passive has made its snapshot durable, there too
//! (synchronous replication; a batch is one entry, so one round trip and
//! one sync). While a passive joins, the active acks alone.
//!
//! A passive joins by asking for a snapshot and then applies the entries
//! that follow (the Clone pattern); only then may it take over. An active
//! that loses its passive carries on alone and marks what it writes as
//! *solo*: should the pair have split, those readings are merged into the
//! other node when this one steps down. Epochs grow at each takeover; a
//! node that hears of a newer epoch from its peer or from a host steps down
//! at once, and so does a node that notices it was paused (its own clock
//! jumped by more than four heartbeats), so that a node frozen and resumed
//! never acks as active before it has heard its peer again.
//!
//! Hosts are not trusted with epochs: a host's epoch counts only with the
//! pair's seal of it ([`crate::seal`]), and a sensor's cursor only up to
//! what the host's seal vouches for; an epoch at or above [`MAX_EPOCH`]
//! counts from no one. Readings that would poison a ledger (a seq out of
//! range, a timestamp from the future) are refused before they are logged
//! and reported in the reply ([`BatchReply::refused`](fog_protocol::BatchReply::refused)).
//!
//! A known limit: a node with an empty log that has not heard its peer
//! serves on the first client request (that is how a fresh pair starts).
//! A node that lost its disk is stopped by the first request carrying a
//! sealed epoch; any client whose request comes first without one (a new
//! host, or a rogue with a host's key) lets it serve, with the epochs it
//! used before its disk was lost.
//!
//! Where each behaviour lives: this file holds the node's state, its
//! configuration and outputs, and the events in, which it hands on to the
//! rest. `epochs.rs` decides who leads (heartbeats, takeover, step-down,
//! evidence of newer epochs); `leader.rs` is the active's side (accepting
//! batches, replicating to the passive, releasing replies once they are
//! committed); `follower.rs` is the passive's side (joining, installing
//! the active's snapshot, applying its entries, acking them); `merge.rs`
//! keeps the readings accepted alone and hands them over after a split;
//! `recover.rs` writes local snapshots and rebuilds a node from one and
//! the log; `status.rs` counts refusals and builds the status report.

mod epochs;
mod follower;
mod leader;
mod merge;
mod recover;
mod status;
mod uplink;
#[cfg(test)]
mod tests;

use std::collections::VecDeque;

use fog_protocol::{
    LogEntry, MAX_EPOCH, NodeState, PeerHeartbeat, PeerMessage, RefusedCounts, Reply, Request, SensorBatch,
};
use tracing::warn;

use crate::clock::Now;
use crate::fsm::{BinaryStar, Role};
use crate::outbox::OutboxConfig;
use crate::replica::Replica;
use crate::seal::EpochSeal;
use crate::windows::WindowConfig;

pub use recover::RecoverError;

/// What a node needs to know at start.
#[derive(Clone, Copy)]
pub struct NodeConfig {
    pub role: Role,
    pub heartbeat_ms: u64,
    pub windows: WindowConfig,
    /// Write a local snapshot after this many log entries.
    pub snapshot_every: u64,
    /// The key both servers of the pair seal epochs with
    /// ([`crate::seal::EpochSeal`]); the driver supplies it.
    pub seal_key: [u8; 32],
    /// Whether the pair keeps what it owes the cloud, and how much.
    pub outbox: OutboxConfig,
}

impl std::fmt::Debug for NodeConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeConfig")
            .field("role", &self.role)
            .field("heartbeat_ms", &self.heartbeat_ms)
            .field("windows", &self.windows)
            .field("snapshot_every", &self.snapshot_every)
            .field("outbox", &self.outbox)
            .field("seal_key", &"<redacted>")
            .finish()
    }
}

/// Identifies the client a reply goes to; chosen by the driver.
pub type ClientToken = u64;

/// Something the node wants done.
#[derive(Debug, Clone, PartialEq)]
pub enum Output {
    Reply { to: ClientToken, reply: Reply },
    Peer(PeerMessage),
    /// Append to the write-ahead log; report with [`Node::handle_durable`].
    Append(LogEntry),
    /// Start a new log generation from this snapshot (as of entry `lsn`);
    /// report with [`Node::handle_durable`] (`snapshot: true`).
    SaveSnapshot { lsn: u64, bytes: Vec<u8> },
}

#[derive(Debug)]
enum Held {
    Client(ClientToken, Reply),
    MergeAck(u64),
}

/// The active's view of a passive that joined.
#[derive(Debug)]
struct PassiveView {
    durable: u64,
    last_progress_ms: u64,
    /// Until it has made this entry durable, what this node accepts it
    /// acks alone: the entry its snapshot was taken at while it joins (a
    /// join of a large state on a busy machine takes seconds, and hosts
    /// would take held replies for a dead server), or the one after the
    /// last it had when it fell silent.
    joined_at: u64,
    /// The last entry acked alone meanwhile (0: none).
    solo_through: u64,
    /// When its snapshot was sent (none: it fell silent, and its tail is
    /// what it resumes from).
    snapshot_sent_ms: Option<u64>,
}

impl PassiveView {
    /// It has what it joined or resumed from: from now on a reply waits
    /// for it too.
    fn replicating(&self) -> bool {
        self.durable >= self.joined_at
    }

    /// It holds everything acked: what it joined or resumed from and
    /// every entry acked alone meanwhile are durable there.
    fn in_sync(&self) -> bool {
        self.durable >= self.joined_at.max(self.solo_through)
    }
}

/// A server node's whole protocol state.
#[derive(Debug)]
pub struct Node {
    cfg: NodeConfig,
    seal: EpochSeal,
    fsm: BinaryStar,
    replica: Replica,
    /// The highest epoch heard of, from anyone.
    known_epoch: u64,
    durable_lsn: u64,
    /// After installing a snapshot, durable reports are ignored until the
    /// one for the snapshot arrives.
    awaiting_snapshot_durable: Option<u64>,
    out: VecDeque<Output>,
    held: VecDeque<(u64, Held)>,
    passive: Option<PassiveView>,
    /// Entries the passive has not made durable yet.
    tail: leader::Tail,
    /// `(lsn, readings)` accepted with no passive in sync.
    unconfirmed: VecDeque<(u64, SensorBatch)>,
    /// A passive that has its active's state (snapshot installed, no gap
    /// since), or a node that stepped down from active with its own data.
    caught_up: bool,
    last_join_ms: Option<u64>,
    /// The parts of the active's snapshot received so far.
    snapshot_parts: Option<follower::SnapshotParts>,
    /// `(merge id, sent at, readings in it)`.
    merging: Option<(u64, u64, usize)>,
    next_merge_id: u64,
    peer: Option<PeerHeartbeat>,
    next_heartbeat_ms: u64,
    last_publish_ms: u64,
    /// The latest monotonic time seen (0: none yet), and the wall-clock
    /// time of the latest event: see [`crate::clock`].
    mono_ms: u64,
    wall_ms: u64,
    entries_since_snapshot: u64,
    /// The entry of the last local snapshot asked for (or recovered from):
    /// the log on disk holds the entries after it, and a restart counts
    /// their readings unconfirmed.
    snapshot_lsn: u64,
    refused: RefusedCounts,
    forged_epochs: u64,
    batches: u64,
    divergences: u64,
}

impl Node {
    pub fn new(cfg: NodeConfig) -> Self {
        Node {
            cfg,
            seal: EpochSeal::new(cfg.seal_key),
            fsm: BinaryStar::new(cfg.role, cfg.heartbeat_ms),
            replica: {
                let mut r = Replica::new(cfg.windows);
                r.set_outbox(cfg.outbox);
                r
            },
            known_epoch: 0,
            durable_lsn: 0,
            awaiting_snapshot_durable: None,
            out: VecDeque::new(),
            held: VecDeque::new(),
            passive: None,
            tail: leader::Tail::default(),
            unconfirmed: VecDeque::new(),
            caught_up: false,
            last_join_ms: None,
            snapshot_parts: None,
            merging: None,
            next_merge_id: 1,
            peer: None,
            next_heartbeat_ms: 0,
            last_publish_ms: 0,
            mono_ms: 0,
            wall_ms: 0,
            entries_since_snapshot: 0,
            snapshot_lsn: 0,
            refused: RefusedCounts::default(),
            forged_epochs: 0,
            batches: 0,
            divergences: 0,
        }
    }

    pub fn role(&self) -> Role {
        self.fsm.role()
    }

    pub fn state(&self) -> NodeState {
        self.fsm.state()
    }

    pub fn epoch(&self) -> u64 {
        self.known_epoch
    }

    pub fn lsn(&self) -> u64 {
        self.replica.lsn
    }

    /// The last log entry this node knows to be durable on its own disk.
    pub fn durable_lsn(&self) -> u64 {
        self.durable_lsn
    }

    pub fn replica(&self) -> &Replica {
        &self.replica
    }

    /// Whether this node has a passive that holds everything it holds (the
    /// passive's snapshot is durable) and waits for it before acking.
    pub fn has_passive_in_sync(&self) -> bool {
        self.passive.as_ref().is_some_and(PassiveView::in_sync)
    }

    pub fn caught_up(&self) -> bool {
        self.caught_up
    }

    pub fn divergences(&self) -> u64 {
        self.divergences
    }

    /// The next thing the node wants done, if any.
    pub fn poll_output(&mut self) -> Option<Output> {
        self.out.pop_front()
    }

    /// The next time [`Node::handle_timeout`] has work, on the monotonic
    /// clock. (Windows are due by the wall clock; the wait until then is
    /// counted from the latest event.)
    pub fn poll_timeout(&self) -> u64 {
        let mut t = self.next_heartbeat_ms;
        if self.fsm.state() == NodeState::Active {
            if let Some(w) = self.replica.windows.poll_timeout() {
                t = t.min(self.mono_ms.saturating_add(w.saturating_sub(self.wall_ms)));
            }
        }
        t
    }

    /// Handles one client request received at `now`.
    pub fn handle_request(&mut self, now: Now, to: ClientToken, request: &Request) {
        let now = self.observe_time(now);
        match request {
            Request::Status => {
                let reply = Reply::Status(Box::new(self.status()));
                self.out.push_back(Output::Reply { to, reply });
            }
            Request::Batch { batch_id, epoch, seal, sensors } => self.handle_batch(now, to, *batch_id, *epoch, seal, sensors),
        }
    }

    /// The disk reports entries up to `lsn` durable (`snapshot`: the report
    /// is for a snapshot).
    pub fn handle_durable(&mut self, now: Now, lsn: u64, snapshot: bool) {
        self.observe_time(now);
        if let Some(want) = self.awaiting_snapshot_durable {
            if !(snapshot && lsn == want) {
                return;
            }
            self.awaiting_snapshot_durable = None;
            self.durable_lsn = lsn;
        } else {
            self.durable_lsn = self.durable_lsn.max(lsn);
        }
        match self.fsm.state() {
            NodeState::Active => self.release(),
            _ if self.caught_up && self.peer.is_some_and(|p| p.state == NodeState::Active) => {
                self.send_peer(PeerMessage::Ack { epoch: self.known_epoch, durable: self.durable_lsn });
            }
            _ => {}
        }
    }

    fn send_peer(&mut self, msg: PeerMessage) {
        self.out.push_back(Output::Peer(msg));
    }

    /// Handles one message of the peer received at `now`.
    pub fn handle_peer(&mut self, now: Now, msg: PeerMessage) {
        let now = self.observe_time(now);
        let epoch = match &msg {
            PeerMessage::Heartbeat(hb) => Some(hb.epoch),
            PeerMessage::Records { epoch, .. }
            | PeerMessage::Ack { epoch, .. }
            | PeerMessage::Join { epoch }
            | PeerMessage::Snapshot { epoch, .. }
            | PeerMessage::Merge { epoch, .. } => Some(*epoch),
            PeerMessage::MergeAck { .. } => None,
        };
        if epoch.is_some_and(|e| e >= MAX_EPOCH) {
            // No pair gets there: whatever sent it is not a sane peer, and
            // the epoch would be taken over (and wrap) in a heartbeat.
            if self.forged_epochs == 0 {
                warn!(epoch, "dropped a peer message with an epoch past the limit; further ones are only counted");
            }
            self.forged_epochs = self.forged_epochs.saturating_add(1);
            return;
        }
        // A passive's join and acks show it is alive even before its first
        // heartbeat comes through. (An active's records do not count: the
        // passive takes over on two silent heartbeats, not on the last
        // record it happened to receive, which would delay a failover.)
        if matches!(msg, PeerMessage::Join { .. } | PeerMessage::Ack { .. }) {
            self.fsm.heard_peer(now);
        }
        match msg {
            PeerMessage::Heartbeat(hb) => self.handle_heartbeat(now, hb),
            PeerMessage::Records { epoch, entries } => self.handle_records(now, epoch, entries),
            PeerMessage::Ack { epoch, durable } => self.handle_ack(now, epoch, durable),
            PeerMessage::Join { epoch } => self.handle_join(now, epoch),
            PeerMessage::Snapshot { epoch, lsn, part, parts, state } => self.handle_snapshot(now, epoch, lsn, (part, parts), state),
            PeerMessage::Merge { epoch, id, sensors } => self.handle_merge(now, epoch, id, sensors),
            PeerMessage::MergeAck { id } => self.handle_merge_ack(now, id),
        }
    }

    /// Heartbeats, the peer's expiry, resends to the passive, publication of
    /// due averages, retries of joins and merges.
    pub fn handle_timeout(&mut self, now: Now) {
        let now = self.observe_time(now);
        if self.fsm.state() == NodeState::Active {
            self.active_timeout(now);
        } else if self.fsm.state() == NodeState::Passive
            && self.peer.is_some_and(|p| p.state == NodeState::Active)
            && self.fsm.peer_alive(now)
        {
            self.rejoin(now);
        }
        if now >= self.next_heartbeat_ms {
            self.next_heartbeat_ms = now.saturating_add(self.cfg.heartbeat_ms);
            self.send_peer(PeerMessage::Heartbeat(self.heartbeat()));
        }
    }
}
