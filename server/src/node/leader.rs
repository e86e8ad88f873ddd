//! The active's side of replication: accepting a batch (screening it,
//! dropping duplicates, writing one entry), appending entries and sending
//! them to the passive, letting a passive join, and holding each reply
//! until its entry is durable here and, once a passive has made its
//! snapshot durable, there too. Without a passive, while one joins, and
//! while one that fell silent catches up, the active acks alone ("solo").

use std::borrow::Cow;
use std::collections::{HashSet, VecDeque};

use fog_protocol::{
    BatchReply, LogEntry, MAX_SNAPSHOT_PARTS, NodeState, PeerMessage, Reading, Record, RefusedReadings, Reply, SNAPSHOT_PART_BYTES, Seal, SensorBatch,
};
use tracing::{error, info, warn};

use super::{ClientToken, Held, Node, Output, PassiveView};
use crate::fsm::Event;
use crate::replica::UNKNOWN_SEQ;

/// Most entries, and readings in them, kept for a passive that has not
/// acked them; beyond either it is dropped and must join again.
const MAX_TAIL_ENTRIES: usize = 100_000;
const MAX_TAIL_READINGS: usize = 4_000_000;
/// An idle active still publishes (and so prunes) this often.
const PRUNE_EVERY_MS: u64 = 1_000;
/// A passive that joins, or fell silent, may be silent this many
/// heartbeats (installing a large snapshot, or its loop or machine busy)
/// before it is dropped as gone and must join again with a new snapshot.
/// One that replicates is taken for silent after two: the active then acks
/// alone and keeps what it has not acked, so waiting for it holds nothing
/// up, and dropping it would only make it join again, a snapshot of the
/// whole state each way.
const SILENCE_HEARTBEATS: u64 = 8;
/// Readings sent to the passive in one message at most when the entries it
/// has not acked go again (a frame holds 16 MiB).
pub(super) const RESEND_READINGS: usize = 4 * fog_protocol::MAX_READINGS_PER_BATCH;
/// A join repeated this many heartbeats after the snapshot went out is
/// answered by that snapshot, still on its way; a later one gets a new
/// snapshot. (A passive asks again after 4 heartbeats without a part.)
const JOIN_REPEAT_HEARTBEATS: u64 = 8;

/// The entries the passive has not made durable, in order, and how many
/// readings they hold.
#[derive(Debug, Default)]
pub(super) struct Tail {
    pub(super) entries: VecDeque<LogEntry>,
    pub(super) readings: usize,
}

impl Tail {
    fn push(&mut self, entry: LogEntry) {
        self.readings += readings_in(&entry);
        self.entries.push_back(entry);
    }

    /// Drops the entries up to `lsn`.
    fn drop_through(&mut self, lsn: u64) {
        while self.entries.front().is_some_and(|e| e.lsn <= lsn) {
            if let Some(e) = self.entries.pop_front() {
                self.readings -= readings_in(&e);
            }
        }
    }

    pub(super) fn clear(&mut self) {
        self.entries.clear();
        self.readings = 0;
    }

    fn too_long(&self) -> bool {
        self.entries.len() > MAX_TAIL_ENTRIES || self.readings > MAX_TAIL_READINGS
    }
}

/// The readings an entry carries (a sensor with only a cursor counts one).
fn readings_in(entry: &LogEntry) -> usize {
    match &entry.record {
        Record::ReadingsAccepted { sensors, .. } => sensors.iter().map(|s| s.readings.len().max(1)).sum(),
        _ => 1,
    }
}

impl Node {
    /// A batch from a host: its epoch and its sensors' cursors as evidence,
    /// then (if this node serves) its readings, with the reply held until
    /// they are committed.
    pub(super) fn handle_batch(&mut self, now: u64, to: ClientToken, batch_id: u64, epoch: u64, seal: &Seal, sensors: &[SensorBatch]) {
        self.host_epoch(now, epoch, seal);
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
        let reply = self.accept(now, batch_id, sensors, &placeable);
        self.held.push_back((self.replica.lsn, Held::Client(to, Reply::Batch(reply))));
        self.release();
        self.maybe_snapshot();
    }

    /// Writes the readings not counted before (and changed cursors) as one
    /// entry, and builds the reply. `placeable[i]`: whether sensor `i`'s
    /// cursor may be noted and answered (its epoch is verified).
    fn accept(&mut self, now: u64, batch_id: u64, sensors: &[SensorBatch], placeable: &[bool]) -> BatchReply {
        let (sensors, refused) = self.screen(sensors);
        let (record, duplicates) = self.new_readings(&sensors, Some(placeable));
        self.replica.ingest.note_duplicates(duplicates);
        if let Some(sensors) = record {
            self.append(now, Record::ReadingsAccepted { now_ms: self.wall_ms, sensors });
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
    /// A reading is from the future by the wall clock.
    fn screen<'a>(&mut self, sensors: &'a [SensorBatch]) -> (Cow<'a, [SensorBatch]>, Vec<RefusedReadings>) {
        let now = self.wall_ms;
        let skew = self.cfg.windows.max_clock_skew_ms;
        let ingest = &self.replica.ingest;
        let mut refused: Vec<RefusedReadings> = Vec::new();
        let mut kept: Option<Vec<SensorBatch>> = None;
        for (i, s) in sensors.iter().enumerate() {
            let watermark = ingest.watermark((s.sensor_id, s.incarnation));
            if s.readings.iter().all(|r| ingest.refusal_of(now, skew, watermark, r).is_none()) {
                if let Some(kept) = kept.as_mut() {
                    kept.push(s.clone());
                }
                continue;
            }
            let kept = kept.get_or_insert_with(|| sensors[..i].to_vec());
            let mut readings = Vec::with_capacity(s.readings.len());
            let first_refusal = refused.len();
            for r in &s.readings {
                let Some(reason) = ingest.refusal_of(now, skew, watermark, r) else {
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
    pub(super) fn new_readings(&self, sensors: &[SensorBatch], placeable: Option<&[bool]>) -> (Option<Vec<SensorBatch>>, u64) {
        let mut out = Vec::new();
        let mut duplicates = 0u64;
        let mut in_batch: HashSet<u64> = HashSet::new();
        for (i, s) in sensors.iter().enumerate() {
            let counted = self.replica.ingest.counted_of((s.sensor_id, s.incarnation));
            let mut readings: Vec<Reading> = Vec::with_capacity(s.readings.len());
            // While the seqs rise, none repeats one before it; the set of
            // seen seqs is made only once they do not.
            let (mut rising, mut last) = (true, 0u64);
            in_batch.clear();
            for (j, r) in s.readings.iter().enumerate() {
                let again = if rising && (j == 0 || r.seq > last) {
                    false
                } else {
                    if rising {
                        rising = false;
                        in_batch.extend(s.readings[..j].iter().map(|r| r.seq));
                    }
                    !in_batch.insert(r.seq)
                };
                last = r.seq;
                if again || counted.contains(r.seq) {
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
                out.push(SensorBatch { sensor_id: s.sensor_id, incarnation: s.incarnation, segment: s.segment, readings, average_cursor: cursor });
            }
        }
        ((!out.is_empty()).then_some(out), duplicates)
    }

    /// Writes one entry as the active: applies it, logs it, replicates it.
    pub(super) fn append(&mut self, now: u64, record: Record) {
        let epoch = match record {
            Record::EpochChanged { epoch } => epoch,
            _ => self.replica.epoch,
        };
        let replicating = self.passive.as_ref().is_some_and(PassiveView::replicating);
        let mut entry = LogEntry { lsn: self.replica.lsn + 1, epoch, solo: !replicating, record };
        if let Err(e) = self.replica.apply(&entry) {
            error!("cannot apply an entry this node wrote: {e}");
            self.divergences += 1;
            return;
        }
        if let Record::AveragesPublished { next_seq, .. } = &mut entry.record {
            *next_seq = self.replica.windows.next_seq();
            self.last_publish_ms = now;
            self.trim_unconfirmed(self.wall_ms);
        }
        if entry.solo {
            if let Record::ReadingsAccepted { sensors, .. } = &entry.record {
                self.push_unconfirmed(entry.lsn, sensors);
            }
        }
        if let Some(p) = self.passive.as_mut() {
            if entry.solo {
                p.solo_through = entry.lsn;
            }
            self.tail.push(entry.clone());
            self.out.push_back(Output::Peer(PeerMessage::Records { epoch: self.known_epoch, entries: vec![entry.clone()] }));
        }
        self.out.push_back(Output::Append(entry));
        self.entries_since_snapshot += 1;
    }

    /// Drops the passive. What it has not acked becomes unconfirmed (it is
    /// acked from now on without the passive; see
    /// [`Node::ack_tail_alone`]). (Entries acked alone while it joined are
    /// unconfirmed already.)
    pub(super) fn go_solo(&mut self) {
        self.passive = None;
        self.ack_tail_alone();
        self.tail.clear();
        self.release();
    }

    /// The passive fell silent: what it has not acked is acked alone from
    /// now on (as in [`Node::go_solo`]), but kept. Heard again, it is sent
    /// what it lacks, and replies wait for it again once it has all it had
    /// before; silent for [`SILENCE_HEARTBEATS`], it is dropped.
    fn lapse(&mut self, now: u64) {
        let Some(p) = self.passive.as_mut() else { return };
        p.joined_at = self.replica.lsn + 1;
        p.snapshot_sent_ms = None;
        p.last_progress_ms = now;
        self.ack_tail_alone();
        self.release();
    }

    /// Marks the entries the passive has not acked as acked alone: their
    /// readings become unconfirmed. A restart counts the readings of the
    /// entries after the last local snapshot unconfirmed; if the snapshot
    /// holds some of these, a new one (with them unconfirmed) is made
    /// durable before any held reply is released.
    fn ack_tail_alone(&mut self) {
        let mut tail = std::mem::take(&mut self.tail);
        let mut in_snapshot = false;
        for entry in tail.entries.iter_mut().filter(|e| !e.solo) {
            entry.solo = true;
            if let Record::ReadingsAccepted { sensors, .. } = &entry.record {
                in_snapshot |= entry.lsn <= self.snapshot_lsn && sensors.iter().any(|s| !s.readings.is_empty());
                self.push_unconfirmed(entry.lsn, sensors);
            }
        }
        self.tail = tail;
        if in_snapshot {
            self.entries_since_snapshot = self.cfg.snapshot_every;
            self.maybe_snapshot();
            self.awaiting_snapshot_durable = Some(self.replica.lsn);
        }
    }

    /// The highest entry a reply may be released at.
    pub(super) fn commit_lsn(&self) -> u64 {
        if cfg!(feature = "unsafe-early-ack") {
            return u64::MAX;
        }
        if self.awaiting_snapshot_durable.is_some() {
            return 0;
        }
        match &self.passive {
            Some(p) if p.replicating() => self.durable_lsn.min(p.durable),
            _ => self.durable_lsn,
        }
    }

    pub(super) fn release(&mut self) {
        let commit = self.commit_lsn();
        while self.held.front().is_some_and(|(lsn, _)| *lsn <= commit) {
            let Some((_, held)) = self.held.pop_front() else { break };
            self.out.push_back(match held {
                Held::Client(to, reply) => Output::Reply { to, reply },
                Held::MergeAck(id) => Output::Peer(PeerMessage::MergeAck { id }),
            });
        }
    }

    /// The passive made entries up to `durable` durable.
    pub(super) fn handle_ack(&mut self, now: u64, epoch: u64, durable: u64) {
        if self.fsm.state() != NodeState::Active || epoch > self.known_epoch {
            return;
        }
        if let Some(p) = self.passive.as_mut() {
            if durable > p.durable {
                p.durable = durable.min(self.replica.lsn);
                p.last_progress_ms = now;
            }
            let d = p.durable;
            self.tail.drop_through(d);
            while self.unconfirmed.front().is_some_and(|(lsn, _)| *lsn <= d) {
                self.unconfirmed.pop_front();
            }
            self.release();
        }
    }

    /// The passive asks for a snapshot to start from.
    pub(super) fn handle_join(&mut self, now: u64, epoch: u64) {
        if self.newer_epoch(now, epoch, "the peer is in") || self.fsm.state() != NodeState::Active {
            return;
        }
        if let Some(p) = &self.passive {
            let repeat = JOIN_REPEAT_HEARTBEATS.saturating_mul(self.cfg.heartbeat_ms);
            if !p.replicating() && p.snapshot_sent_ms.is_some_and(|at| now < at.saturating_add(repeat)) {
                return; // its snapshot is on its way
            }
            // It lost what it had (restarted, or missed entries).
            self.go_solo();
        }
        let state = match self.replica.encode() {
            Ok(state) => state,
            Err(e) => return error!("cannot encode a snapshot for the passive: {e}"),
        };
        let parts = state.len().div_ceil(SNAPSHOT_PART_BYTES).max(1);
        let Some(parts) = u32::try_from(parts).ok().filter(|&n| n <= MAX_SNAPSHOT_PARTS) else {
            return error!(bytes = state.len(), "the state is too large to send to the passive ({MAX_SNAPSHOT_PARTS} parts of {SNAPSHOT_PART_BYTES} bytes at most)");
        };
        info!(lsn = self.replica.lsn, bytes = state.len(), parts, "the passive joins: sending a snapshot");
        let (epoch, lsn) = (self.known_epoch, self.replica.lsn);
        for part in 0..parts {
            let from = part as usize * SNAPSHOT_PART_BYTES;
            let bytes = state[from.min(state.len())..(from + SNAPSHOT_PART_BYTES).min(state.len())].to_vec();
            self.send_peer(PeerMessage::Snapshot { epoch, lsn, part, parts, state: bytes });
        }
        self.passive = Some(PassiveView { durable: 0, last_progress_ms: now, joined_at: self.replica.lsn, solo_through: 0, snapshot_sent_ms: Some(now) });
        self.tail.clear();
    }

    /// Sends the passive again the entries it has not acked, in order, in
    /// messages of at most [`RESEND_READINGS`] readings (and one entry at
    /// least).
    fn resend_tail(&mut self) {
        let mut entries = Vec::new();
        let mut readings = 0;
        for entry in &self.tail.entries {
            let n = readings_in(entry);
            if !entries.is_empty() && readings + n > RESEND_READINGS {
                self.out.push_back(Output::Peer(PeerMessage::Records { epoch: self.known_epoch, entries: std::mem::take(&mut entries) }));
                readings = 0;
            }
            readings += n;
            entries.push(entry.clone());
        }
        if !entries.is_empty() {
            self.out.push_back(Output::Peer(PeerMessage::Records { epoch: self.known_epoch, entries }));
        }
    }

    /// The active's timeout: drops a passive that is gone or too far
    /// behind, resends what the passive has not acked, and publishes due
    /// averages.
    pub(super) fn active_timeout(&mut self, now: u64) {
        let hb = self.cfg.heartbeat_ms;
        if let Some(p) = &self.passive {
            // The FSM's expiry is two heartbeats.
            let gone_after = (SILENCE_HEARTBEATS - 2).saturating_mul(hb);
            if !self.fsm.peer_heard_within(now, gone_after) {
                warn!(lsn = self.replica.lsn, "the passive is gone: carrying on alone until it joins again");
                self.go_solo();
            } else if p.replicating() && !self.fsm.peer_heard_within(now, 0) {
                warn!(lsn = self.replica.lsn, durable = p.durable, "the passive is silent: acking alone, and keeping what it lacks for when it is heard again");
                self.lapse(now);
            }
        }
        if self.tail.too_long() {
            let (entries, readings) = (self.tail.entries.len(), self.tail.readings);
            warn!(entries, readings, "the passive fell too far behind: carrying on alone until it joins again");
            self.go_solo();
        }
        let heard = self.fsm.peer_heard_within(now, 0);
        if let Some(p) = self.passive.as_mut()
            && heard
            && p.durable < self.replica.lsn
            && now >= p.last_progress_ms.saturating_add(hb.saturating_mul(2))
        {
            p.last_progress_ms = now;
            self.resend_tail();
        }
        let due = self.replica.windows.poll_timeout().is_some_and(|t| t <= self.wall_ms);
        let prune = now >= self.last_publish_ms.saturating_add(PRUNE_EVERY_MS) && !self.replica.windows.is_idle();
        if due || prune {
            self.append(now, Record::AveragesPublished { now_ms: self.wall_ms, next_seq: UNKNOWN_SEQ });
            self.maybe_snapshot();
        }
    }
}
