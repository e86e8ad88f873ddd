//! The passive's side of replication: joining the active (after handing
//! over any readings accepted alone), installing the active's snapshot and
//! applying the entries that follow (a gap is filled by the active's
//! resend, not a new join); [`Node::handle_durable`] acks them once they
//! are durable. Only a passive that is caught up may take over.

use fog_protocol::{LogEntry, MAX_SNAPSHOT_PARTS, NodeState, PeerMessage, SNAPSHOT_PART_BYTES};
use tracing::{debug, error, info, warn};

use super::{Node, Output};
use crate::replica::Replica;

/// A passive repeats a join or merge request after this many heartbeats.
const RETRY_HEARTBEATS: u64 = 4;

/// The parts of a snapshot gathered so far: `next` of `parts`, of the
/// snapshot of `lsn` in `epoch`.
pub(super) struct SnapshotParts {
    epoch: u64,
    lsn: u64,
    parts: u32,
    next: u32,
    bytes: Vec<u8>,
}

impl std::fmt::Debug for SnapshotParts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "part {} of {} of the snapshot of {} in epoch {} ({} bytes)", self.next, self.parts, self.lsn, self.epoch, self.bytes.len())
    }
}

impl Node {
    /// A passive that is not caught up: first hand over readings accepted
    /// alone, then ask for a snapshot; each repeated if unanswered.
    pub(super) fn rejoin(&mut self, now: u64) {
        let retry = RETRY_HEARTBEATS * self.cfg.heartbeat_ms;
        if !self.unconfirmed.is_empty() {
            self.offer_merge(now, retry);
            return;
        }
        if self.caught_up || self.last_join_ms.is_some_and(|at| now < at.saturating_add(retry)) {
            return;
        }
        self.last_join_ms = Some(now);
        // A new join brings a new snapshot: what was gathered is stale.
        self.snapshot_parts = None;
        self.send_peer(PeerMessage::Join { epoch: self.known_epoch });
    }

    /// A part of the active's snapshot, asked for by a join. The parts
    /// come in order on the state channel; each counts as an answer to the
    /// join (a large snapshot is not asked for again while it comes). One
    /// out of order (a part lost, or another join's snapshot) drops what
    /// was gathered, and the passive asks again when its join goes
    /// unanswered.
    pub(super) fn handle_snapshot(&mut self, now: u64, epoch: u64, lsn: u64, (part, parts): (u32, u32), state: Vec<u8>) {
        if self.fsm.state() == NodeState::Active || epoch < self.known_epoch || !self.unconfirmed.is_empty() {
            return;
        }
        if self.last_join_ms.is_none() {
            return; // not asked for (or already installed)
        }
        let fits = part < parts && parts <= MAX_SNAPSHOT_PARTS && state.len() <= SNAPSHOT_PART_BYTES;
        let gathered = self.snapshot_parts.take();
        let mut parts_so_far = match gathered {
            _ if !fits => return warn!(part, parts, bytes = state.len(), "dropped a snapshot part out of bounds from the active"),
            // Room for all of it, reserved (not touched) at once: within
            // the bound, and never doubled past it.
            _ if part == 0 => SnapshotParts { epoch, lsn, parts, next: 0, bytes: Vec::with_capacity(parts as usize * SNAPSHOT_PART_BYTES) },
            Some(p) if (p.epoch, p.lsn, p.parts, p.next) == (epoch, lsn, parts, part) => p,
            _ => return warn!(part, parts, lsn, "dropped a snapshot part out of order from the active; asking again"),
        };
        parts_so_far.bytes.extend_from_slice(&state);
        parts_so_far.next += 1;
        if parts_so_far.next < parts {
            self.snapshot_parts = Some(parts_so_far);
            self.last_join_ms = Some(now);
            return;
        }
        match Replica::decode_split(&parts_so_far.bytes, self.cfg.windows, self.cfg.outbox) {
            Ok((replica, replica_end)) => {
                info!(lsn, epoch, "caught up from the active's snapshot");
                self.known_epoch = epoch;
                self.replica = replica;
                self.caught_up = true;
                self.last_join_ms = None;
                self.entries_since_snapshot = 0;
                self.awaiting_snapshot_durable = Some(lsn);
                // Nothing unconfirmed here (a passive with readings
                // accepted alone hands them over before it joins).
                let local = Node::local_snapshot_from(&parts_so_far.bytes, replica_end).map(Ok).unwrap_or_else(|| self.local_snapshot());
                match local {
                    Ok(bytes) => {
                        self.snapshot_lsn = lsn;
                        self.out.push_back(Output::SaveSnapshot { lsn, bytes });
                    }
                    Err(e) => error!("cannot encode a snapshot: {e}"),
                }
            }
            Err(e) => warn!("dropped an undecodable snapshot from the active: {e}"),
        }
    }

    pub(super) fn handle_records(&mut self, now: u64, epoch: u64, entries: Vec<LogEntry>) {
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
                    // Messages lost on the way (or dropped after a pause):
                    // the active sends again what this node has not acked
                    // (and tells it to join again if it no longer keeps it).
                    crate::replica::ApplyError::OutOfOrder { .. } => {
                        debug!("missed log entries ({e}): waiting for the active to send them again");
                        break;
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
            // Nothing applied (a resend of entries already applied whose
            // ack was lost, or entries past a gap): tell the active where
            // this node stands.
            self.send_peer(PeerMessage::Ack { epoch: self.known_epoch, durable: self.durable_lsn });
        }
    }
}
