//! The passive's side of replication: joining the active (after handing
//! over any readings accepted alone), installing the active's snapshot and
//! applying the entries that follow; [`Node::handle_durable`] acks them
//! once they are durable. Only a passive that is caught up may take over.

use fog_protocol::{LogEntry, NodeState, PeerMessage};
use tracing::{error, info, warn};

use super::{Node, Output};
use crate::replica::Replica;

/// A passive repeats a join or merge request after this many heartbeats.
const RETRY_HEARTBEATS: u64 = 4;

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
        self.send_peer(PeerMessage::Join { epoch: self.known_epoch });
    }

    /// The active's snapshot, asked for by a join.
    pub(super) fn handle_snapshot(&mut self, epoch: u64, lsn: u64, state: Vec<u8>) {
        if self.fsm.state() == NodeState::Active || epoch < self.known_epoch || !self.unconfirmed.is_empty() {
            return;
        }
        if self.last_join_ms.is_none() {
            return; // not asked for (or already installed)
        }
        match Replica::decode(&state, self.cfg.windows, self.cfg.outbox) {
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
}
