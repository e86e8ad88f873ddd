//! Readings accepted alone, and the merge that hands them over after a
//! split: the node that served alone keeps them (trimmed at the dedup
//! horizon, kept in its local snapshot) and, once passive, sends them to
//! the active in chunks; the active counts the new ones and acks the merge
//! once they are committed.

use fog_protocol::{NodeState, PeerMessage, Record, SensorBatch};
use tracing::{info, warn};

use super::{Held, Node};

/// Most readings in one merge message.
const MERGE_CHUNK_READINGS: usize = 100_000;

impl Node {
    /// Forgets readings accepted alone once they are past the dedup horizon:
    /// a peer would not count them any more (they are expired there), so
    /// they need not wait for a merge, and a node that serves alone for days
    /// keeps memory bounded.
    pub(super) fn trim_unconfirmed(&mut self, wall_ms: u64) {
        let oldest = wall_ms.saturating_sub(self.cfg.windows.dedup_horizon_ms);
        while self.unconfirmed.front().is_some_and(|(_, b)| b.readings.iter().all(|r| r.timestamp_ms < oldest)) {
            self.unconfirmed.pop_front();
        }
    }

    pub(super) fn push_unconfirmed(&mut self, lsn: u64, sensors: &[SensorBatch]) {
        for s in sensors.iter().filter(|s| !s.readings.is_empty()) {
            self.unconfirmed.push_back((lsn, SensorBatch { average_cursor: None, ..s.clone() }));
        }
    }

    /// Hands the next chunk of readings accepted alone to the active,
    /// unless the last one went out less than `retry` ago unanswered.
    pub(super) fn offer_merge(&mut self, now: u64, retry: u64) {
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
    }

    /// The peer hands over readings it accepted alone.
    pub(super) fn handle_merge(&mut self, now: u64, epoch: u64, id: u64, sensors: Vec<SensorBatch>) {
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
            self.append(now, Record::ReadingsAccepted { now_ms: self.wall_ms, sensors });
        }
        self.held.push_back((self.replica.lsn, Held::MergeAck(id)));
        self.release();
    }

    /// The active has the readings of merge `id`.
    pub(super) fn handle_merge_ack(&mut self, now: u64, id: u64) {
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
