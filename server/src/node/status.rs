//! What the node tells an operator: the counts of refused readings and
//! frames (the driver reports its own refusals here too), forged epochs,
//! and the status report (`fog-server status`, whose client is
//! [`crate::status`]).

use fog_protocol::{NodeState, Refusal, RefusedCounts, Replication, StatusReport, UplinkReport};

use super::Node;

impl Node {
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

    /// How this node replicates, and its lag in log entries (an active:
    /// entries its passive has not made durable; a passive: entries it is
    /// behind its active).
    pub fn replication(&self) -> (Replication, u64) {
        match self.fsm.state() {
            NodeState::Active => match &self.passive {
                Some(p) if p.in_sync() => (Replication::InSync, self.replica.lsn.saturating_sub(p.durable)),
                Some(p) => (Replication::PassiveJoining, self.replica.lsn.saturating_sub(p.durable)),
                None => (Replication::Alone, 0),
            },
            NodeState::Passive => {
                let behind = self.peer.map_or(0, |p| p.lsn.saturating_sub(self.replica.lsn));
                if self.merging.is_some() {
                    (Replication::Merging, behind)
                } else if self.caught_up {
                    (Replication::CaughtUp, behind)
                } else {
                    (Replication::CatchingUp, behind)
                }
            }
            _ => (Replication::WaitingForPeer, 0),
        }
    }

    pub fn status(&self) -> StatusReport {
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
            peer_alive: self.fsm.peer_alive(self.mono_ms),
            per_sensor: self.replica.ingest.per_sensor(),
            uplink: self.replica.outbox.config().enabled.then(|| {
                let o = &self.replica.outbox;
                UplinkReport {
                    backlog_items: o.len() as u64,
                    backlog_bytes: o.bytes(),
                    oldest_ms: o.oldest_at_ms().map_or(0, |at| self.wall_ms.saturating_sub(at)),
                    forwarded_through: o.forwarded(),
                    last_seq: o.last_seq(),
                    dropped: o.dropped(),
                    adopted_items: o.adopted().0,
                    adoptions: o.adopted().1,
                    ..UplinkReport::default()
                }
            }),
        }
    }
}
