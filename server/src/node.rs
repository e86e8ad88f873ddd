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
//! here and, while a passive is in sync, durable there too (synchronous
//! replication; a batch is one entry, so one round trip and one sync).
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
//! and reported in the reply ([`BatchReply::refused`]).
//!
//! A known limit: a node with an empty log that has not heard its peer
//! serves on the first client request (that is how a fresh pair starts).
//! A node that lost its disk is stopped by the first request carrying a
//! sealed epoch; any client whose request comes first without one (a new
//! host, or a rogue with a host's key) lets it serve, with the epochs it
//! used before its disk was lost.

use std::borrow::Cow;
use std::collections::{HashSet, VecDeque};

use fog_protocol::{
    BatchReply, LogEntry, MAX_EPOCH, NodeState, PeerHeartbeat, PeerMessage, Reading, Record, Refusal,
    RefusedCounts, RefusedReadings, Reply, Request, Seal, SensorBatch, StatusReport,
};
use serde::{Deserialize, Serialize};
use tracing::{error, info, warn};

use crate::fsm::{BinaryStar, Event, Role, Step};
use crate::replica::{Replica, SnapshotError, UNKNOWN_SEQ};
use crate::seal::EpochSeal;
use crate::windows::WindowConfig;

/// A clock jump of this many heartbeats means the node was paused.
const PAUSE_HEARTBEATS: u64 = 4;
/// A passive repeats a join or merge request after this many heartbeats.
const RETRY_HEARTBEATS: u64 = 4;
/// Most readings in one merge message.
const MERGE_CHUNK_READINGS: usize = 100_000;
/// Most entries kept for a passive that has not acked them; beyond this it
/// is dropped and must join again.
const MAX_TAIL_ENTRIES: usize = 100_000;
/// An idle active still publishes (and so prunes) this often.
const PRUNE_EVERY_MS: u64 = 1_000;

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
}

impl std::fmt::Debug for NodeConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeConfig")
            .field("role", &self.role)
            .field("heartbeat_ms", &self.heartbeat_ms)
            .field("windows", &self.windows)
            .field("snapshot_every", &self.snapshot_every)
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

/// What a local snapshot file holds: the replicated state, and the readings
/// this node accepted alone that its peer may not have.
#[derive(Debug, Serialize, Deserialize)]
struct LocalSnapshot {
    replica: Replica,
    unconfirmed: Vec<SensorBatch>,
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
    /// The entry its snapshot was taken at: until it has made that durable
    /// it is joining, and what this node accepted before exists here alone.
    joined_at: u64,
}

impl PassiveView {
    fn in_sync(&self) -> bool {
        self.durable >= self.joined_at
    }
}

/// Why a node could not be rebuilt from its data directory.
#[derive(Debug, thiserror::Error)]
pub enum RecoverError {
    #[error("snapshot: {0}")]
    Snapshot(#[from] SnapshotError),
    #[error("log entry {lsn}: {why}")]
    Entry { lsn: u64, why: String },
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
    tail: VecDeque<LogEntry>,
    /// `(lsn, readings)` accepted with no passive in sync.
    unconfirmed: VecDeque<(u64, SensorBatch)>,
    /// A passive that has its active's state (snapshot installed, no gap
    /// since), or a node that stepped down from active with its own data.
    caught_up: bool,
    last_join_ms: Option<u64>,
    /// `(merge id, sent at, readings in it)`.
    merging: Option<(u64, u64, usize)>,
    next_merge_id: u64,
    peer: Option<PeerHeartbeat>,
    next_heartbeat_ms: u64,
    last_publish_ms: u64,
    last_now_ms: u64,
    entries_since_snapshot: u64,
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
            replica: Replica::new(cfg.windows),
            known_epoch: 0,
            durable_lsn: 0,
            awaiting_snapshot_durable: None,
            out: VecDeque::new(),
            held: VecDeque::new(),
            passive: None,
            tail: VecDeque::new(),
            unconfirmed: VecDeque::new(),
            caught_up: false,
            last_join_ms: None,
            merging: None,
            next_merge_id: 1,
            peer: None,
            next_heartbeat_ms: 0,
            last_publish_ms: 0,
            last_now_ms: 0,
            entries_since_snapshot: 0,
            refused: RefusedCounts::default(),
            forged_epochs: 0,
            batches: 0,
            divergences: 0,
        }
    }

    /// Rebuilds a node from a local snapshot (as written by
    /// [`Output::SaveSnapshot`]) and the log entries that follow it. The
    /// readings of those entries count as unconfirmed: the node offers them
    /// to its peer when it rejoins.
    pub fn recover(cfg: NodeConfig, snapshot: Option<&[u8]>, entries: &[LogEntry]) -> Result<Self, RecoverError> {
        let mut node = Node::new(cfg);
        if let Some(bytes) = snapshot {
            let local: LocalSnapshot = postcard::from_bytes(bytes).map_err(|e| SnapshotError(e.to_string()))?;
            node.replica = local.replica;
            node.replica.set_config(cfg.windows);
            let lsn = node.replica.lsn;
            node.unconfirmed = local.unconfirmed.into_iter().map(|b| (lsn, b)).collect();
        }
        for entry in entries {
            if entry.lsn <= node.replica.lsn {
                continue;
            }
            if let Err(e) = node.replica.apply(entry) {
                match e {
                    crate::replica::ApplyError::OutOfOrder { .. } => {
                        return Err(RecoverError::Entry { lsn: entry.lsn, why: e.to_string() });
                    }
                    crate::replica::ApplyError::Diverged { .. } => {
                        warn!("while replaying the log: {e}");
                        node.divergences += 1;
                    }
                }
            }
            // Whether the peer has an entry is not recorded; merging one it
            // has is harmless (readings are idempotent by id).
            if let Record::ReadingsAccepted { sensors, .. } = &entry.record {
                node.push_unconfirmed(entry.lsn, sensors);
            }
            node.entries_since_snapshot += 1;
        }
        node.known_epoch = node.replica.epoch;
        node.durable_lsn = node.replica.lsn;
        Ok(node)
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

    /// The next time [`Node::handle_timeout`] has work.
    pub fn poll_timeout(&self) -> u64 {
        let mut t = self.next_heartbeat_ms;
        if self.fsm.state() == NodeState::Active {
            if let Some(w) = self.replica.windows.poll_timeout() {
                t = t.min(w);
            }
        }
        t
    }

    fn heartbeat(&self) -> PeerHeartbeat {
        PeerHeartbeat {
            state: self.fsm.state(),
            epoch: self.known_epoch,
            lsn: self.replica.lsn,
            complete: self.complete(),
            peer_in_sync: self.passive.is_some(),
        }
    }

    /// Whether this node could serve with the data it has.
    fn complete(&self) -> bool {
        self.fsm.state() != NodeState::Passive || self.caught_up
    }

    /// The order in which nodes take the lead: complete before incomplete,
    /// then newer epoch, then longer log, then the primary.
    fn outranked_by(&self, peer: &PeerHeartbeat) -> bool {
        let mine = (self.complete(), self.known_epoch, self.replica.lsn, self.role() == Role::Primary);
        let theirs = (peer.complete, peer.epoch, peer.lsn, self.role() != Role::Primary);
        theirs > mine
    }

    /// Notices a pause: a clock jump of several heartbeats between two
    /// events means this process was stopped, and the peer may have taken
    /// over meanwhile.
    fn observe_time(&mut self, now: u64) {
        let limit = PAUSE_HEARTBEATS * self.cfg.heartbeat_ms;
        if self.last_now_ms != 0 && now > self.last_now_ms.saturating_add(limit) {
            self.fsm.restart_peer_expiry(now);
            if self.fsm.state() == NodeState::Active {
                let paused = now.saturating_sub(self.last_now_ms);
                self.step_down(now, true, &format!("this node was paused for {paused} ms: stepping down until it hears its peer"));
            }
        }
        self.last_now_ms = self.last_now_ms.max(now);
    }

    fn log_step(&self, step: &Step) {
        match (step.note, step.accepted) {
            (Some(note), false) => warn!(from = step.from.as_str(), to = step.to.as_str(), epoch = self.known_epoch, "{note}"),
            (Some(note), true) => info!(from = step.from.as_str(), to = step.to.as_str(), epoch = self.known_epoch, "{note}"),
            (None, _) if step.changed() => info!("state {} -> {}", step.from.as_str(), step.to.as_str()),
            (None, _) => {}
        }
    }

    /// After an FSM step: a new active takes a new epoch; an active that
    /// lost the lead drops what it held.
    fn after_step(&mut self, now: u64, step: Step) {
        self.log_step(&step);
        if step.to == NodeState::Active && step.from != NodeState::Active {
            self.take_over(now);
        } else if step.from == NodeState::Active && step.to != NodeState::Active {
            self.stepped_down(false);
        }
    }

    fn take_over(&mut self, now: u64) {
        // The primary takes odd epochs and the backup even ones, so two
        // nodes that take over from the same epoch (cut off from each
        // other) never share one: an epoch names one node's reign.
        let parity = u64::from(self.role() == Role::Primary);
        let next = self
            .known_epoch
            .checked_add(1)
            .and_then(|e| if e % 2 == parity { Some(e) } else { e.checked_add(1) })
            .filter(|&e| e < MAX_EPOCH);
        let Some(epoch) = next else {
            // Unreachable while every epoch heard is below MAX_EPOCH; were
            // it reached, serving under a wrapped epoch would be worse.
            error!(epoch = self.known_epoch, "no epoch left to take over with");
            self.step_down(now, true, "no epoch left to take over with: stepping down");
            return;
        };
        self.known_epoch = epoch;
        self.passive = None;
        self.tail.clear();
        self.merging = None;
        self.last_join_ms = None;
        info!(epoch, lsn = self.replica.lsn, "serving as active in epoch {epoch}");
        self.append(now, Record::EpochChanged { epoch });
    }

    fn step_down(&mut self, now: u64, keep_caught_up: bool, why: &str) {
        let step = self.fsm.step_down();
        let _ = now;
        if step.from == NodeState::Active {
            warn!(epoch = self.known_epoch, "{why}");
            self.stepped_down(keep_caught_up);
        } else {
            self.caught_up &= keep_caught_up;
        }
    }

    fn stepped_down(&mut self, keep_caught_up: bool) {
        // Replies not yet released were never acked; hosts send them again.
        self.held.clear();
        self.passive = None;
        self.tail.clear();
        self.caught_up = keep_caught_up;
        self.last_join_ms = None;
    }

    /// Writes one entry as the active: applies it, logs it, replicates it.
    fn append(&mut self, now: u64, record: Record) {
        let epoch = match record {
            Record::EpochChanged { epoch } => epoch,
            _ => self.replica.epoch,
        };
        let mut entry = LogEntry { lsn: self.replica.lsn + 1, epoch, solo: self.passive.is_none(), record };
        if let Err(e) = self.replica.apply(&entry) {
            error!("cannot apply an entry this node wrote: {e}");
            self.divergences += 1;
            return;
        }
        if let Record::AveragesPublished { next_seq, .. } = &mut entry.record {
            *next_seq = self.replica.windows.next_seq();
            self.last_publish_ms = now;
            self.trim_unconfirmed(now);
        }
        if entry.solo {
            if let Record::ReadingsAccepted { sensors, .. } = &entry.record {
                self.push_unconfirmed(entry.lsn, sensors);
            }
        }
        if self.passive.is_some() {
            self.tail.push_back(entry.clone());
            self.out.push_back(Output::Peer(PeerMessage::Records { epoch: self.known_epoch, entries: vec![entry.clone()] }));
        }
        self.out.push_back(Output::Append(entry));
        self.entries_since_snapshot += 1;
    }

    /// Drops the passive. What it has not acked becomes unconfirmed (it is
    /// acked from now on without the passive), and that is made durable in
    /// a snapshot before any held reply is released.
    fn go_solo(&mut self) {
        self.passive = None;
        let tail = std::mem::take(&mut self.tail);
        let mut any = false;
        for entry in &tail {
            if let Record::ReadingsAccepted { sensors, .. } = &entry.record {
                any |= sensors.iter().any(|s| !s.readings.is_empty());
                self.push_unconfirmed(entry.lsn, sensors);
            }
        }
        if any {
            self.entries_since_snapshot = self.cfg.snapshot_every;
            self.maybe_snapshot();
            self.awaiting_snapshot_durable = Some(self.replica.lsn);
        }
        self.release();
    }

    /// Forgets readings accepted alone once they are past the dedup horizon:
    /// a peer would not count them any more (they are expired there), so
    /// they need not wait for a merge, and a node that serves alone for days
    /// keeps memory bounded.
    fn trim_unconfirmed(&mut self, now: u64) {
        let oldest = now.saturating_sub(self.cfg.windows.dedup_horizon_ms);
        while self.unconfirmed.front().is_some_and(|(_, b)| b.readings.iter().all(|r| r.timestamp_ms < oldest)) {
            self.unconfirmed.pop_front();
        }
    }

    fn push_unconfirmed(&mut self, lsn: u64, sensors: &[SensorBatch]) {
        for s in sensors.iter().filter(|s| !s.readings.is_empty()) {
            self.unconfirmed.push_back((lsn, SensorBatch { average_cursor: None, ..s.clone() }));
        }
    }

    fn maybe_snapshot(&mut self) {
        if self.entries_since_snapshot < self.cfg.snapshot_every {
            return;
        }
        match self.local_snapshot() {
            Ok(bytes) => {
                self.entries_since_snapshot = 0;
                self.out.push_back(Output::SaveSnapshot { lsn: self.replica.lsn, bytes });
            }
            Err(e) => error!("cannot encode a snapshot: {e}"),
        }
    }

    fn local_snapshot(&self) -> Result<Vec<u8>, SnapshotError> {
        let local = LocalSnapshot {
            replica: self.replica.clone(),
            unconfirmed: self.unconfirmed.iter().map(|(_, b)| b.clone()).collect(),
        };
        postcard::to_allocvec(&local).map_err(|e| SnapshotError(e.to_string()))
    }

    /// The highest entry a reply may be released at.
    fn commit_lsn(&self) -> u64 {
        if cfg!(feature = "unsafe-early-ack") {
            return u64::MAX;
        }
        if self.awaiting_snapshot_durable.is_some() {
            return 0;
        }
        match &self.passive {
            Some(p) => self.durable_lsn.min(p.durable),
            None => self.durable_lsn,
        }
    }

    fn release(&mut self) {
        let commit = self.commit_lsn();
        while self.held.front().is_some_and(|(lsn, _)| *lsn <= commit) {
            let Some((_, held)) = self.held.pop_front() else { break };
            self.out.push_back(match held {
                Held::Client(to, reply) => Output::Reply { to, reply },
                Held::MergeAck(id) => Output::Peer(PeerMessage::MergeAck { id }),
            });
        }
    }

    /// Handles one client request received at `now`.
    pub fn handle_request(&mut self, now: u64, to: ClientToken, request: &Request) {
        self.observe_time(now);
        match request {
            Request::Status => {
                let reply = Reply::Status(Box::new(self.status(now)));
                self.out.push_back(Output::Reply { to, reply });
            }
            Request::Batch { batch_id, epoch, seal, sensors } => {
                self.host_epoch(now, *epoch, seal);
                // A sensor's cursor names the epoch that published its last
                // average, but a cursor carries no seal: it is evidence only
                // up to the epoch the host's seal vouches for, and that one
                // was taken as evidence just above. A cursor from a newer
                // epoch is unverifiable: the node neither steps down for it
                // nor moves that sensor (a forger could otherwise stop the
                // pair, or rewind sensors off the stream).
                let placeable: Vec<bool> = sensors
                    .iter()
                    .map(|s| s.average_cursor.is_none_or(|c| c.epoch <= self.known_epoch))
                    .collect();
                let unverifiable = placeable.iter().filter(|&&ok| !ok).count();
                self.forged_epochs = self.forged_epochs.saturating_add(unverifiable as u64);
                let step = self.fsm.handle(now, Event::ClientRequest { complete: self.complete() });
                let accepted = step.accepted;
                self.after_step(now, step);
                if !accepted {
                    let reply = Reply::NotActive { state: self.fsm.state(), epoch: self.known_epoch, seal: self.seal_of_known_epoch() };
                    self.out.push_back(Output::Reply { to, reply });
                    return;
                }
                self.batches = self.batches.saturating_add(1);
                let reply = self.accept(now, *batch_id, sensors, &placeable);
                self.held.push_back((self.replica.lsn, Held::Client(to, Reply::Batch(reply))));
                self.release();
                self.maybe_snapshot();
            }
        }
    }

    /// Writes the readings not counted before (and changed cursors) as one
    /// entry, and builds the reply. `placeable[i]`: whether sensor `i`'s
    /// cursor may be noted and answered (its epoch is verified).
    fn accept(&mut self, now: u64, batch_id: u64, sensors: &[SensorBatch], placeable: &[bool]) -> BatchReply {
        let (sensors, refused) = self.screen(now, sensors);
        let (record, duplicates) = self.new_readings(&sensors, Some(placeable));
        self.replica.ingest.note_duplicates(duplicates);
        if let Some(sensors) = record {
            self.append(now, Record::ReadingsAccepted { now_ms: now, sensors });
        }
        let acks = sensors
            .iter()
            .map(|s| self.replica.ingest.ack((s.sensor_id, s.incarnation), s.readings.iter().map(|r| r.seq)))
            .collect();
        let cursors: Vec<_> = sensors
            .iter()
            .zip(placeable)
            .filter(|&(_, &ok)| ok)
            .map(|(s, _)| (s.sensor_id, s.average_cursor))
            .collect();
        let (averages, repositions) = self.replica.windows.reply_for(&cursors);
        let seal = self.seal_of_known_epoch();
        BatchReply { batch_id, epoch: self.known_epoch, seal, acks, averages, repositions, refused }
    }

    /// Takes out the readings that must not be accepted at all (see
    /// [`crate::ingest::Ingest::refusal`]), counts them per reason, and says
    /// which they were; borrows the batch when nothing is refused.
    fn screen<'a>(&mut self, now: u64, sensors: &'a [SensorBatch]) -> (Cow<'a, [SensorBatch]>, Vec<RefusedReadings>) {
        let skew = self.cfg.windows.max_clock_skew_ms;
        let ingest = &self.replica.ingest;
        let mut refused: Vec<RefusedReadings> = Vec::new();
        let mut kept: Option<Vec<SensorBatch>> = None;
        for (i, s) in sensors.iter().enumerate() {
            let key = (s.sensor_id, s.incarnation);
            if s.readings.iter().all(|r| ingest.refusal(now, skew, key, r).is_none()) {
                if let Some(kept) = kept.as_mut() {
                    kept.push(s.clone());
                }
                continue;
            }
            let kept = kept.get_or_insert_with(|| sensors[..i].to_vec());
            let mut readings = Vec::with_capacity(s.readings.len());
            let first_refusal = refused.len();
            for r in &s.readings {
                let Some(reason) = ingest.refusal(now, skew, key, r) else {
                    readings.push(*r);
                    continue;
                };
                match refused[first_refusal..].iter_mut().find(|x| x.reason == reason) {
                    Some(x) => x.count = x.count.saturating_add(1),
                    None => refused.push(RefusedReadings { sensor_id: s.sensor_id, reason, count: 1 }),
                }
            }
            kept.push(SensorBatch {
                sensor_id: s.sensor_id,
                incarnation: s.incarnation,
                segment: s.segment,
                readings,
                average_cursor: s.average_cursor,
            });
        }
        for r in &refused {
            self.refused.add(r.reason, u64::from(r.count));
        }
        (kept.map_or(Cow::Borrowed(sensors), Cow::Owned), refused)
    }

    /// The part of `sensors` that changes the state, if any, and how many
    /// readings were duplicates. Cursors are taken only where `placeable`
    /// allows (none without it). Linear in the readings: a batch of 65 536
    /// readings of one sensor costs what 65 536 sensors of one reading do.
    fn new_readings(&self, sensors: &[SensorBatch], placeable: Option<&[bool]>) -> (Option<Vec<SensorBatch>>, u64) {
        let mut out = Vec::new();
        let mut duplicates = 0u64;
        let mut in_batch: HashSet<u64> = HashSet::new();
        for (i, s) in sensors.iter().enumerate() {
            let key = (s.sensor_id, s.incarnation);
            let mut readings: Vec<Reading> = Vec::new();
            in_batch.clear();
            for r in &s.readings {
                if self.replica.ingest.contains(key, r.seq) || !in_batch.insert(r.seq) {
                    duplicates = duplicates.saturating_add(1);
                } else {
                    readings.push(*r);
                }
            }
            let with_cursor = placeable.is_some_and(|p| p.get(i).copied().unwrap_or(false));
            let cursor = s
                .average_cursor
                .filter(|&c| with_cursor && self.replica.windows.cursor(s.sensor_id) != Some(c));
            if !readings.is_empty() || cursor.is_some() {
                out.push(SensorBatch { readings, average_cursor: cursor, ..s.clone() });
            }
        }
        ((!out.is_empty()).then_some(out), duplicates)
    }

    /// The pair's seal of the epoch this node names in its replies.
    fn seal_of_known_epoch(&self) -> Seal {
        self.seal.seal(self.known_epoch)
    }

    /// A host's epoch: evidence (and a reason to step down) only with the
    /// pair's seal of it; otherwise ignored and counted. Epoch 0 is a host
    /// that has seen no reply yet, and needs no seal.
    fn host_epoch(&mut self, now: u64, epoch: u64, seal: &Seal) {
        if epoch == 0 {
            return;
        }
        if !self.seal.verify(epoch, seal) {
            self.forged_epochs = self.forged_epochs.saturating_add(1);
            return;
        }
        self.newer_epoch(now, epoch, "a host has seen");
    }

    /// The disk reports entries up to `lsn` durable (`snapshot`: the report
    /// is for a snapshot).
    pub fn handle_durable(&mut self, now: u64, lsn: u64, snapshot: bool) {
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
    pub fn handle_peer(&mut self, now: u64, msg: PeerMessage) {
        self.observe_time(now);
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
            PeerMessage::Ack { epoch, durable } => {
                if self.fsm.state() != NodeState::Active || epoch > self.known_epoch {
                    return;
                }
                if let Some(p) = self.passive.as_mut() {
                    if durable > p.durable {
                        p.durable = durable.min(self.replica.lsn);
                        p.last_progress_ms = now;
                    }
                    let d = p.durable;
                    while self.tail.front().is_some_and(|e| e.lsn <= d) {
                        self.tail.pop_front();
                    }
                    while self.unconfirmed.front().is_some_and(|(lsn, _)| *lsn <= d) {
                        self.unconfirmed.pop_front();
                    }
                    self.release();
                }
            }
            PeerMessage::Join { epoch } => {
                if self.newer_epoch(now, epoch, "the peer is in") || self.fsm.state() != NodeState::Active {
                    return;
                }
                if self.passive.is_some() {
                    // It lost what it had (restarted, or missed entries).
                    self.go_solo();
                }
                match self.replica.encode() {
                    Ok(state) => {
                        info!(lsn = self.replica.lsn, bytes = state.len(), "the passive joins: sending a snapshot");
                        self.send_peer(PeerMessage::Snapshot { epoch: self.known_epoch, lsn: self.replica.lsn, state });
                        self.passive = Some(PassiveView { durable: 0, last_progress_ms: now, joined_at: self.replica.lsn });
                        self.tail.clear();
                    }
                    Err(e) => error!("cannot encode a snapshot for the passive: {e}"),
                }
            }
            PeerMessage::Snapshot { epoch, lsn, state } => {
                if self.fsm.state() == NodeState::Active || epoch < self.known_epoch || !self.unconfirmed.is_empty() {
                    return;
                }
                if self.last_join_ms.is_none() {
                    return; // not asked for (or already installed)
                }
                match Replica::decode(&state, self.cfg.windows) {
                    Ok(replica) => {
                        info!(lsn, epoch, "caught up from the active's snapshot");
                        self.known_epoch = epoch;
                        self.replica = replica;
                        self.caught_up = true;
                        self.last_join_ms = None;
                        self.entries_since_snapshot = 0;
                        self.awaiting_snapshot_durable = Some(lsn);
                        match self.local_snapshot() {
                            Ok(bytes) => self.out.push_back(Output::SaveSnapshot { lsn, bytes }),
                            Err(e) => error!("cannot encode a snapshot: {e}"),
                        }
                    }
                    Err(e) => warn!("dropped an undecodable snapshot from the active: {e}"),
                }
            }
            PeerMessage::Merge { epoch, id, sensors } => {
                if self.newer_epoch(now, epoch, "the peer is in") || self.fsm.state() != NodeState::Active {
                    return;
                }
                if self.passive.is_some() {
                    warn!("the passive restarted: carrying on alone until it has joined again");
                    self.go_solo();
                }
                let (record, _) = self.new_readings(&sensors, None);
                let n: usize = record.iter().flatten().map(|s| s.readings.len()).sum();
                if let Some(sensors) = record {
                    info!(readings = n, "merging readings the peer accepted alone");
                    self.append(now, Record::ReadingsAccepted { now_ms: now, sensors });
                }
                self.held.push_back((self.replica.lsn, Held::MergeAck(id)));
                self.release();
            }
            PeerMessage::MergeAck { id } => {
                if let Some((want, _, n)) = self.merging {
                    if want == id {
                        let mut left = n;
                        while left > 0 {
                            let Some((_, b)) = self.unconfirmed.pop_front() else { break };
                            left = left.saturating_sub(b.readings.len());
                        }
                        self.merging = None;
                        info!(readings = n, "the active has the readings this node accepted alone");
                        if self.unconfirmed.is_empty() {
                            // Persist that they are merged, so a restart does not
                            // merge them again (harmless, but slow).
                            self.entries_since_snapshot = self.cfg.snapshot_every;
                            self.maybe_snapshot();
                        }
                        self.rejoin(now);
                    }
                }
            }
        }
    }

    /// Steps down (if active) when `epoch` is newer than any known.
    /// `source` says who showed it ("the peer is in", "a host has seen" ...).
    /// An epoch at or above [`MAX_EPOCH`] is evidence from no one: counted,
    /// and ignored.
    fn newer_epoch(&mut self, now: u64, epoch: u64, source: &str) -> bool {
        if epoch <= self.known_epoch {
            return false;
        }
        if epoch >= MAX_EPOCH {
            self.forged_epochs = self.forged_epochs.saturating_add(1);
            return false;
        }
        self.known_epoch = epoch;
        self.step_down(now, false, &format!("{source} epoch {epoch}: stepping down"));
        true
    }

    fn handle_heartbeat(&mut self, now: u64, hb: PeerHeartbeat) {
        self.peer = Some(hb);
        self.newer_epoch(now, hb.epoch, "the peer is in");
        if self.passive.is_some() && matches!(hb.state, NodeState::Primary | NodeState::Backup) {
            warn!("the passive restarted: carrying on alone until it has joined again");
            self.go_solo();
        }
        if self.fsm.state() == NodeState::Passive && hb.state == NodeState::Active && self.caught_up && !hb.peer_in_sync && self.last_join_ms.is_none() {
            // The active does not count this node as in sync (it went on
            // alone, or this node stepped down to it): join again.
            self.caught_up = false;
        }
        let outranks = self.outranked_by(&hb);
        let step = self.fsm.handle(now, Event::Peer { state: hb.state, outranks });
        self.after_step(now, step);
        if self.fsm.state() == NodeState::Passive && hb.state == NodeState::Active && !self.caught_up {
            self.rejoin(now);
        }
    }

    /// A passive that is not caught up: first hand over readings accepted
    /// alone, then ask for a snapshot; each repeated if unanswered.
    fn rejoin(&mut self, now: u64) {
        let retry = RETRY_HEARTBEATS * self.cfg.heartbeat_ms;
        if !self.unconfirmed.is_empty() {
            if self.merging.is_some_and(|(_, at, _)| now < at.saturating_add(retry)) {
                return;
            }
            let id = self.next_merge_id;
            self.next_merge_id += 1;
            let mut sensors = Vec::new();
            let mut n = 0;
            for (_, b) in &self.unconfirmed {
                if n >= MERGE_CHUNK_READINGS {
                    break;
                }
                n += b.readings.len();
                sensors.push(b.clone());
            }
            info!(readings = n, "handing readings accepted alone to the active");
            self.merging = Some((id, now, n));
            self.send_peer(PeerMessage::Merge { epoch: self.known_epoch, id, sensors });
            return;
        }
        if self.caught_up || self.last_join_ms.is_some_and(|at| now < at.saturating_add(retry)) {
            return;
        }
        self.last_join_ms = Some(now);
        self.send_peer(PeerMessage::Join { epoch: self.known_epoch });
    }

    fn handle_records(&mut self, now: u64, epoch: u64, entries: Vec<LogEntry>) {
        if self.fsm.state() == NodeState::Active {
            self.newer_epoch(now, epoch, "the peer is in");
            return;
        }
        if epoch < self.known_epoch || !self.caught_up {
            return;
        }
        self.known_epoch = self.known_epoch.max(epoch);
        let mut applied = false;
        for entry in entries {
            if entry.lsn <= self.replica.lsn {
                continue;
            }
            if let Err(e) = self.replica.apply(&entry) {
                match e {
                    crate::replica::ApplyError::OutOfOrder { .. } => {
                        info!("missed log entries ({e}): joining again");
                        self.caught_up = false;
                        self.rejoin(now);
                        return;
                    }
                    crate::replica::ApplyError::Diverged { .. } => {
                        error!("replica diverged from the active: {e}");
                        self.divergences += 1;
                    }
                }
            }
            applied = true;
            self.entries_since_snapshot += 1;
            self.out.push_back(Output::Append(entry));
        }
        if applied {
            self.maybe_snapshot();
        } else {
            // A resend of entries already applied: the ack was lost.
            self.send_peer(PeerMessage::Ack { epoch: self.known_epoch, durable: self.durable_lsn });
        }
    }

    /// Heartbeats, the peer's expiry, resends to the passive, publication of
    /// due averages, retries of joins and merges.
    pub fn handle_timeout(&mut self, now: u64) {
        self.observe_time(now);
        let hb = self.cfg.heartbeat_ms;
        if self.fsm.state() == NodeState::Active {
            if self.passive.is_some() && !self.fsm.peer_alive(now) {
                warn!(lsn = self.replica.lsn, "the passive is gone: carrying on alone");
                self.go_solo();
            }
            if self.tail.len() > MAX_TAIL_ENTRIES {
                warn!("the passive fell {} entries behind: carrying on alone until it joins again", self.tail.len());
                self.go_solo();
            }
            if let Some(p) = self.passive.as_mut() {
                if p.durable < self.replica.lsn && now >= p.last_progress_ms.saturating_add(hb.saturating_mul(2)) {
                    p.last_progress_ms = now;
                    let entries: Vec<LogEntry> = self.tail.iter().cloned().collect();
                    if !entries.is_empty() {
                        self.send_peer(PeerMessage::Records { epoch: self.known_epoch, entries });
                    }
                }
            }
            let due = self.replica.windows.poll_timeout().is_some_and(|t| t <= now);
            let prune = now >= self.last_publish_ms.saturating_add(PRUNE_EVERY_MS) && !self.replica.windows.is_idle();
            if due || prune {
                self.append(now, Record::AveragesPublished { now_ms: now, next_seq: UNKNOWN_SEQ });
                self.maybe_snapshot();
            }
        } else if self.fsm.state() == NodeState::Passive
            && self.peer.is_some_and(|p| p.state == NodeState::Active)
            && self.fsm.peer_alive(now)
        {
            self.rejoin(now);
        }
        if now >= self.next_heartbeat_ms {
            self.next_heartbeat_ms = now.saturating_add(hb);
            self.send_peer(PeerMessage::Heartbeat(self.heartbeat()));
        }
    }

    /// Counts a frame that was dropped before it became a request.
    pub fn record_malformed(&mut self) {
        self.record_refusal(Refusal::Malformed, 1);
    }

    /// Counts `n` refusals the driver made itself (a frame too large or
    /// undecodable, a key without the rights for a request or a sensor),
    /// so that the status shows every refusal in one place.
    pub fn record_refusal(&mut self, reason: Refusal, n: u64) {
        self.refused.add(reason, n);
    }

    pub fn malformed_frames(&self) -> u64 {
        self.refused.malformed
    }

    /// Refusals so far, per reason.
    pub fn refused(&self) -> RefusedCounts {
        self.refused
    }

    /// Epochs claimed without a valid seal, or past [`MAX_EPOCH`].
    pub fn forged_epochs(&self) -> u64 {
        self.forged_epochs
    }

    pub fn batches(&self) -> u64 {
        self.batches
    }

    fn replication(&self) -> (String, u64) {
        match self.fsm.state() {
            NodeState::Active => match &self.passive {
                Some(p) if p.in_sync() => ("active, in sync with the passive".into(), self.replica.lsn.saturating_sub(p.durable)),
                Some(p) => ("active, passive joining (its snapshot is not yet durable)".into(), self.replica.lsn.saturating_sub(p.durable)),
                None => ("active, alone (no passive in sync)".into(), 0),
            },
            NodeState::Passive => {
                let behind = self.peer.map_or(0, |p| p.lsn.saturating_sub(self.replica.lsn));
                if self.merging.is_some() {
                    ("passive, merging readings it accepted alone into the active".into(), behind)
                } else if self.caught_up {
                    ("passive, caught up".into(), behind)
                } else {
                    ("passive, catching up (may not take over)".into(), behind)
                }
            }
            _ => ("waiting for the peer".into(), 0),
        }
    }

    pub fn status(&self, now: u64) -> StatusReport {
        let (replication, lag) = self.replication();
        let w = &self.replica.windows;
        StatusReport {
            role: self.fsm.role().as_str().to_string(),
            state: self.fsm.state(),
            epoch: self.known_epoch,
            lsn: self.replica.lsn,
            durable_lsn: self.durable_lsn,
            replication,
            lag,
            unconfirmed: self.unconfirmed.iter().map(|(_, b)| b.readings.len() as u64).sum(),
            counted: self.replica.ingest.counted(),
            duplicates: self.replica.ingest.duplicates(),
            averages_published: w.averages_published(),
            revisions_published: w.revisions_published(),
            last_average: w.last_seq().map(|_| w.last_position()),
            average_chain: w.chain().collect(),
            too_late: w.too_late(),
            expired: self.replica.ingest.expired(),
            retired_incarnations: self.replica.ingest.retired().incarnations,
            malformed_frames: self.refused.malformed,
            replies_dropped: 0,
            refused: self.refused,
            forged_epochs: self.forged_epochs,
            batches: self.batches,
            peer_alive: self.fsm.peer_alive(now),
            per_sensor: self.replica.ingest.per_sensor(),
        }
    }
}


#[cfg(test)]
mod tests {
    use super::*;
    use fog_protocol::Reading;

    const T0: u64 = 1_700_000_000_000;
    const HOUR: u64 = 3_600_000;

    fn batch(id: u64, seq: u64, ts: u64) -> Request {
        Request::Batch {
            batch_id: id,
            epoch: 0,
            seal: [0; 16],
            sensors: vec![SensorBatch {
                sensor_id: 1,
                incarnation: 7,
                segment: 0,
                readings: vec![Reading { seq, speed_kmh: 100, timestamp_ms: ts }],
                average_cursor: None,
            }],
        }
    }

    const KEY: [u8; 32] = [9; 32];

    fn config() -> NodeConfig {
        NodeConfig { role: Role::Primary, heartbeat_ms: 250, windows: WindowConfig::default(), snapshot_every: 1_000_000, seal_key: KEY }
    }

    /// Drives a lone primary: every write is made durable at once.
    fn settle(node: &mut Node, now: u64) {
        while let Some(out) = node.poll_output() {
            if let Output::Append(entry) = out {
                node.handle_durable(now, entry.lsn, false);
            } else if let Output::SaveSnapshot { lsn, .. } = out {
                node.handle_durable(now, lsn, true);
            }
        }
    }

    /// A primary that never heard its peer, active after `n` batches of one
    /// reading a second; and the time after them.
    fn serving_alone(n: u64) -> (Node, u64) {
        let cfg = config();
        let mut node = Node::new(cfg);
        let mut now = T0 + 10_000;
        for seq in 0..n {
            node.handle_request(now, seq, &batch(seq, seq, now));
            settle(&mut node, now);
            node.handle_timeout(now);
            settle(&mut node, now);
            now += 1_000;
        }
        assert_eq!(node.state(), NodeState::Active);
        (node, now)
    }

    #[test]
    fn readings_accepted_alone_are_kept_for_a_merge_only_within_the_dedup_horizon() {
        // Alone from the start: the peer never appeared.
        let (mut node, mut now) = serving_alone(50);
        assert_eq!(node.status(now).unconfirmed, 50, "readings accepted alone wait for a merge");
        // Serving alone for more than the horizon (time passes in steps, as
        // a running node sees it: a jump would look like a pause): the old
        // ones are let go, the recent ones are still kept.
        let late = now + HOUR;
        while now < late {
            node.handle_timeout(now);
            settle(&mut node, now);
            now += 500;
        }
        for seq in 50..60 {
            node.handle_request(late + seq, seq, &batch(seq, seq, late + seq));
            settle(&mut node, late + seq);
        }
        let mut now = late + 100;
        while now < late + 10_000 {
            node.handle_timeout(now);
            settle(&mut node, now);
            now += 500;
        }
        assert_eq!(node.state(), NodeState::Active, "still serving alone");
        let status = node.status(now);
        assert_eq!(status.unconfirmed, 10, "only the readings within the horizon are kept: {status:?}");
        assert_eq!(status.counted, 60, "trimming forgets nothing that was counted");
    }

    #[test]
    fn a_passive_that_joins_before_its_first_heartbeat_is_not_dropped_at_the_next_timeout() {
        let (mut node, now) = serving_alone(3);
        // A restarted backup joins; its heartbeats have not come through
        // (its first went out before this node's subscription was up).
        node.handle_peer(now, PeerMessage::Join { epoch: 0 });
        settle(&mut node, now);
        node.handle_request(now + 10, 99, &batch(99, 3, now + 10));
        let mut replied = false;
        let mut t = now + 10;
        while t < now + 400 {
            node.handle_timeout(t);
            while let Some(out) = node.poll_output() {
                match out {
                    Output::Append(entry) => node.handle_durable(t, entry.lsn, false),
                    Output::SaveSnapshot { lsn, .. } => node.handle_durable(t, lsn, true),
                    Output::Reply { .. } => replied = true,
                    _ => {}
                }
            }
            t += 50;
        }
        assert!(!replied, "the reading was acked before the passive had it: the passive was dropped as gone");
        let replication = node.status(t).replication;
        assert!(replication.contains("passive joining"), "still waiting for the passive: {replication}");
    }

    /// Every reply the node has for clients, drained.
    fn replies(node: &mut Node, now: u64) -> Vec<Reply> {
        let mut out = Vec::new();
        while let Some(o) = node.poll_output() {
            match o {
                Output::Append(entry) => node.handle_durable(now, entry.lsn, false),
                Output::SaveSnapshot { lsn, .. } => node.handle_durable(now, lsn, true),
                Output::Reply { reply, .. } => out.push(reply),
                Output::Peer(_) => {}
            }
        }
        out
    }

    /// A batch of one sensor (1, incarnation 7) with these readings, the
    /// host's `epoch` and `seal`, and the sensor's `cursor`.
    fn sealed_batch(id: u64, epoch: u64, seal: Seal, readings: Vec<Reading>, cursor: Option<fog_protocol::AverageCursor>) -> Request {
        Request::Batch {
            batch_id: id,
            epoch,
            seal,
            sensors: vec![SensorBatch { sensor_id: 1, incarnation: 7, segment: 0, readings, average_cursor: cursor }],
        }
    }

    fn batch_reply(replies: &[Reply]) -> &BatchReply {
        match replies {
            [Reply::Batch(b)] => b,
            other => panic!("expected one batch reply: {other:?}"),
        }
    }

    #[test]
    fn a_node_that_lost_its_data_does_not_serve_sensors_that_applied_a_newer_epochs_averages() {
        let cfg = config();
        let seal = EpochSeal::new(KEY);
        // A primary restarted with an empty data dir, its peer out of reach,
        // and a host whose sensors applied averages of epoch 7; the host has
        // the pair's seal of epoch 7 from a reply.
        let now = T0 + 10_000;
        let cursor = Some(fog_protocol::AverageCursor { seq: 2_000, epoch: 7, chain: 42 });
        let mut node = Node::new(cfg);
        node.handle_request(now, 1, &sealed_batch(1, 7, seal.seal(7), vec![Reading { seq: 0, speed_kmh: 100, timestamp_ms: now }], cursor));
        let got = replies(&mut node, now);
        assert!(matches!(got.as_slice(), [Reply::NotActive { epoch: 7, seal: s, .. }] if *s == seal.seal(7)), "{got:?}");
        assert_ne!(node.state(), NodeState::Active);
        // A host that cannot show a seal of epoch 7 (it restarted, or it
        // forges): the cursors alone prove nothing. The node serves, and
        // neither steps down nor moves (rewinds) those sensors.
        for (epoch, host_seal) in [(0, [0; 16]), (7, [0; 16]), (7, seal.seal(6))] {
            let mut node = Node::new(cfg);
            node.handle_request(now, 1, &sealed_batch(1, epoch, host_seal, vec![Reading { seq: 0, speed_kmh: 100, timestamp_ms: now }], cursor));
            let got = replies(&mut node, now);
            let reply = batch_reply(&got);
            assert_eq!(node.state(), NodeState::Active, "host epoch {epoch}");
            assert!(reply.repositions.is_empty() && reply.averages.is_empty(), "an unverifiable cursor was moved: {reply:?}");
            assert_eq!(reply.acks[0].next_seq, 1, "its readings are still acked");
            assert_eq!((reply.epoch, reply.seal), (1, seal.seal(1)), "the reply names its own epoch, sealed");
            let forged = if epoch == 0 { 1 } else { 2 };
            assert_eq!(node.status(now).forged_epochs, forged, "the host's and the cursor's epochs are counted");
        }
    }

    #[test]
    fn a_forged_host_epoch_does_not_make_the_active_step_down() {
        let (mut node, now) = serving_alone(2);
        let epoch = node.epoch();
        for (i, claimed) in [epoch + 1, epoch + 2, 1 << 40, MAX_EPOCH - 1, MAX_EPOCH, u64::MAX].into_iter().enumerate() {
            for forged in [[0; 16], [0xab; 16]] {
                node.handle_request(now, 10, &sealed_batch(10 + i as u64, claimed, forged, Vec::new(), None));
                let got = replies(&mut node, now);
                assert!(matches!(got.as_slice(), [Reply::Batch(_)]), "epoch {claimed}: {got:?}");
                assert_eq!((node.state(), node.epoch()), (NodeState::Active, epoch), "epoch {claimed}");
            }
        }
        assert_eq!(node.status(now).forged_epochs, 12);
        // The pair's own seal of a newer epoch still counts.
        let seal = EpochSeal::new(KEY);
        node.handle_request(now, 11, &sealed_batch(99, epoch + 1, seal.seal(epoch + 1), Vec::new(), None));
        assert!(matches!(replies(&mut node, now).as_slice(), [Reply::NotActive { .. }]));
        assert_ne!(node.state(), NodeState::Active);
    }

    #[test]
    fn an_epoch_past_the_limit_counts_from_no_one_and_takeovers_never_wrap() {
        // Sealed by the pair itself (say, a key that leaked), or heard from
        // the peer: at or above MAX_EPOCH it is not evidence.
        let seal = EpochSeal::new(KEY);
        for claimed in [MAX_EPOCH, u64::MAX] {
            let (mut node, now) = serving_alone(2);
            node.handle_request(now, 10, &sealed_batch(10, claimed, seal.seal(claimed), Vec::new(), None));
            assert!(matches!(replies(&mut node, now).as_slice(), [Reply::Batch(_)]), "host epoch {claimed}");
            let hb = PeerHeartbeat { state: NodeState::Backup, epoch: claimed, lsn: 0, complete: true, peer_in_sync: false };
            node.handle_peer(now, PeerMessage::Heartbeat(hb));
            node.handle_peer(now, PeerMessage::Join { epoch: claimed });
            assert_eq!((node.state(), node.epoch()), (NodeState::Active, 1), "peer epoch {claimed}");
            assert_eq!(node.status(now).forged_epochs, 3);
        }
        // The highest epoch a node can hear of still leaves room to take
        // over with (MAX_EPOCH - 1 is odd: the primary's next is MAX_EPOCH,
        // which it must not take).
        let mut node = Node::new(config());
        let now = T0 + 10_000;
        node.handle_request(now, 1, &sealed_batch(1, MAX_EPOCH - 1, seal.seal(MAX_EPOCH - 1), Vec::new(), None));
        assert_eq!(node.epoch(), MAX_EPOCH - 1);
        assert!(matches!(replies(&mut node, now).as_slice(), [Reply::NotActive { .. }]));
        node.handle_request(now, 2, &sealed_batch(2, MAX_EPOCH - 1, seal.seal(MAX_EPOCH - 1), Vec::new(), None));
        let _ = replies(&mut node, now);
        assert!(node.epoch() < MAX_EPOCH, "took epoch {}", node.epoch());
        assert_ne!(node.state(), NodeState::Active, "no epoch left: it must not serve");
    }

    #[test]
    fn an_expired_reading_with_a_far_seq_is_acked_but_moves_no_ledger() {
        let (mut node, now) = serving_alone(3);
        let poison = Reading { seq: 1_000_000, speed_kmh: 1, timestamp_ms: 0 };
        node.handle_request(now, 10, &sealed_batch(10, 0, [0; 16], vec![poison], None));
        let got = replies(&mut node, now);
        let reply = batch_reply(&got);
        assert_eq!(reply.acks[0].next_seq, 3);
        assert_eq!(reply.acks[0].also, vec![1_000_000], "the expired reading is acked");
        assert!(reply.refused.is_empty());
        // The sensor's next reading still counts.
        node.handle_request(now, 11, &sealed_batch(11, 0, [0; 16], vec![Reading { seq: 3, speed_kmh: 100, timestamp_ms: now }], None));
        let got = replies(&mut node, now);
        assert_eq!(batch_reply(&got).acks[0].next_seq, 4);
        let status = node.status(now);
        assert_eq!((status.counted, status.expired, status.duplicates), (4, 1, 0));
    }

    #[test]
    fn readings_with_seqs_out_of_range_or_from_the_future_are_refused_and_counted() {
        let (mut node, now) = serving_alone(3);
        let skew = WindowConfig::default().max_clock_skew_ms;
        let hostile = vec![
            Reading { seq: 1 << 62, speed_kmh: 1, timestamp_ms: 0 },
            Reading { seq: u64::MAX, speed_kmh: 1, timestamp_ms: now },
            Reading { seq: fog_protocol::MAX_SEQ, speed_kmh: 1, timestamp_ms: now },
            Reading { seq: 3 + crate::ingest::MAX_SEQ_AHEAD + 1, speed_kmh: 1, timestamp_ms: now },
            Reading { seq: 3, speed_kmh: 1, timestamp_ms: now + skew + 1 },
            Reading { seq: 4, speed_kmh: 1, timestamp_ms: u64::MAX },
            Reading { seq: 5, speed_kmh: 100, timestamp_ms: now + skew },
        ];
        node.handle_request(now, 10, &sealed_batch(10, 0, [0; 16], hostile, None));
        let got = replies(&mut node, now);
        let reply = batch_reply(&got);
        assert_eq!(reply.acks[0].next_seq, 3);
        assert_eq!(reply.acks[0].also, vec![5], "only the reading within the skew is acked");
        let mut refused = reply.refused.clone();
        refused.sort_by_key(|r| r.count);
        assert_eq!(
            refused,
            vec![
                RefusedReadings { sensor_id: 1, reason: Refusal::FromTheFuture, count: 2 },
                RefusedReadings { sensor_id: 1, reason: Refusal::SeqOutOfRange, count: 4 },
            ]
        );
        let status = node.status(now);
        assert_eq!((status.refused.seq_out_of_range, status.refused.from_the_future), (4, 2));
        assert_eq!(status.counted, 4, "refused readings are not counted");
        // Nothing refused reached the log or the ledger: the sensor's own
        // readings 3 and 4 still count.
        let readings = (3..5).map(|seq| Reading { seq, speed_kmh: 100, timestamp_ms: now }).collect();
        node.handle_request(now, 11, &sealed_batch(11, 0, [0; 16], readings, None));
        let got = replies(&mut node, now);
        assert_eq!(batch_reply(&got).acks[0].next_seq, 6);
        assert_eq!(node.status(now).counted, 6);
        node.record_refusal(Refusal::ForeignSensor, 3);
        node.record_malformed();
        let status = node.status(now);
        assert_eq!((status.refused.foreign_sensor, status.refused.malformed, status.malformed_frames), (3, 1, 1));
    }

    #[test]
    fn a_reading_far_above_the_watermark_cannot_close_the_gap_below_it_later() {
        // A current reading with a seq far ahead would be counted above the
        // watermark; once it aged past the horizon, compaction would move
        // the watermark over it and every later reading would be a
        // duplicate. It is refused instead.
        let (mut node, mut now) = serving_alone(3);
        let far = [1 << 62, 3 + crate::ingest::MAX_SEQ_AHEAD + 1];
        let readings = far.iter().map(|&seq| Reading { seq, speed_kmh: 1, timestamp_ms: now }).collect();
        node.handle_request(now, 10, &sealed_batch(10, 0, [0; 16], readings, None));
        let _ = replies(&mut node, now);
        let late = now + HOUR + 10_000;
        while now < late {
            node.handle_timeout(now);
            let _ = replies(&mut node, now);
            now += 500;
        }
        node.handle_request(now, 11, &sealed_batch(11, 0, [0; 16], vec![Reading { seq: 3, speed_kmh: 100, timestamp_ms: now }], None));
        let _ = replies(&mut node, now);
        let status = node.status(now);
        assert_eq!((status.counted, status.duplicates), (4, 0), "{status:?}");
    }

    #[test]
    fn a_batch_of_65536_readings_of_one_sensor_is_counted_and_acked_once_each() {
        let (mut node, now) = serving_alone(1);
        let n = fog_protocol::MAX_READINGS_PER_BATCH as u64;
        // Seqs 1.. in reverse order, the last 100 of them twice.
        let mut readings: Vec<Reading> = (1..n - 99).rev().map(|seq| Reading { seq, speed_kmh: 90, timestamp_ms: now }).collect();
        readings.extend((n - 199..n - 99).map(|seq| Reading { seq, speed_kmh: 90, timestamp_ms: now }));
        assert_eq!(readings.len() as u64, n);
        node.handle_request(now, 10, &sealed_batch(10, 0, [0; 16], readings, None));
        let got = replies(&mut node, now);
        let ack = &batch_reply(&got).acks[0];
        assert_eq!((ack.next_seq, ack.also.len()), (n - 99, 0));
        let status = node.status(now);
        assert_eq!((status.counted, status.duplicates), (n - 99, 100));
        assert_eq!(status.per_sensor[0].sum_kmh, 100 + (n - 100) * 90);
    }
}
