//! What a server shows on `/metrics`, `/healthz` and `/readyz`
//! (`fog-observe` serves them; `monitoring/README.md` lists every series).
//!
//! The node stays free of it: the driver reads the node's counters once a
//! second and sets them here (absolute values, so nothing is counted
//! twice), and times what only it sees: a batch from arrival to ack, the
//! disk thread's writes and syncs, takeovers. Handles are registered once;
//! labels are few (refusal reasons, states, stages, at most
//! [`MAX_SEGMENT_SERIES`] segments), never a sensor id.

use std::collections::{BTreeMap, VecDeque};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use fog_observe::Health;
use fog_protocol::{Average, NodeState, Reply, Replication};
use metrics::{Counter, Gauge, Histogram, counter, gauge, histogram};

use crate::node::Node;
use crate::uplink::Uplink;

/// Per-segment series are kept for the lowest segment ids only.
pub const MAX_SEGMENT_SERIES: usize = 64;
/// Samples of "entry made at" kept to tell the replication lag in seconds.
const LAG_SAMPLES: usize = 65_536;
/// Samples of "durable at" kept to split an ack into its stages.
const DURABLE_SAMPLES: usize = 4_096;

/// What the driver keeps of a request until its reply leaves.
pub(crate) struct Arrival {
    pub at: Instant,
    /// The node's last log entry once the request was handled: the reply
    /// waits for it to be durable here (and, in sync, at the passive).
    pub lsn: u64,
}

/// The server's registered metrics and what it tracks between events.
pub(crate) struct ServerMetrics {
    pub health: Arc<Health>,
    data_dir: PathBuf,
    // Transitions seen after each turn of the loop.
    last_state: NodeState,
    last_in_sync: bool,
    last_caught_up: bool,
    failovers: Counter,
    unclean_takeovers: Counter,
    takeover_seconds: Gauge,
    sync_lost: Counter,
    sync_regained: Counter,
    // Samples of when entries were made and became durable.
    appended: VecDeque<(u64, Instant)>,
    durable: VecDeque<(u64, Instant)>,
    // Timed per reply.
    ack: Histogram,
    ack_wal: Histogram,
    ack_replication: Histogram,
    behind_retention: Counter,
    abandoned_branch: Counter,
}

impl ServerMetrics {
    pub fn new(role: &str, data_dir: PathBuf, health: Arc<Health>) -> Self {
        gauge!("fog_server_info", "role" => role.to_string()).set(1.0);
        ServerMetrics {
            health,
            data_dir,
            last_state: NodeState::Primary,
            last_in_sync: false,
            last_caught_up: false,
            failovers: counter!("fog_server_failovers_total"),
            unclean_takeovers: counter!("fog_server_unclean_takeovers_total"),
            takeover_seconds: gauge!("fog_server_takeover_seconds"),
            sync_lost: counter!("fog_server_sync_lost_total"),
            sync_regained: counter!("fog_server_sync_regained_total"),
            appended: VecDeque::new(),
            durable: VecDeque::new(),
            ack: histogram!("fog_server_ack_seconds"),
            ack_wal: histogram!("fog_server_ack_stage_seconds", "stage" => "wal"),
            ack_replication: histogram!("fog_server_ack_stage_seconds", "stage" => "replication"),
            behind_retention: counter!("fog_server_repositions_total", "kind" => "behind_retention"),
            abandoned_branch: counter!("fog_server_repositions_total", "kind" => "abandoned_branch"),
        }
    }

    /// The figures of the last start.
    pub fn recovered(&self, took: Duration, truncated_bytes: u64) {
        gauge!("fog_server_recovery_seconds").set(took.as_secs_f64());
        gauge!("fog_server_recovery_truncated_bytes").set(truncated_bytes as f64);
    }

    /// After each turn of the loop: takeovers and the passive's sync,
    /// which may come and go between two publications.
    pub fn after_turn(&mut self, node: &Node, peer_heard_at: Option<Instant>) {
        let state = node.state();
        if state == NodeState::Active && self.last_state == NodeState::Passive {
            self.failovers.increment(1);
            if !self.last_caught_up {
                self.unclean_takeovers.increment(1);
            }
            if let Some(at) = peer_heard_at {
                self.takeover_seconds.set(at.elapsed().as_secs_f64());
            }
        }
        let in_sync = state == NodeState::Active && node.has_passive_in_sync();
        if in_sync != self.last_in_sync && state == NodeState::Active && self.last_state == NodeState::Active {
            if in_sync { self.sync_regained.increment(1) } else { self.sync_lost.increment(1) }
        }
        self.last_state = state;
        self.last_in_sync = in_sync;
        self.last_caught_up = node.caught_up();
    }

    /// Entries up to `lsn` were handed to the disk.
    pub fn appended(&mut self, lsn: u64) {
        push_bounded(&mut self.appended, lsn, LAG_SAMPLES);
    }

    /// Entries up to `lsn` are durable here.
    pub fn durable(&mut self, lsn: u64) {
        push_bounded(&mut self.durable, lsn, DURABLE_SAMPLES);
    }

    /// A reply leaves for a request that arrived as `arrival`.
    pub fn replied(&self, arrival: &Arrival, reply: &Reply) {
        let Reply::Batch(batch) = reply else { return };
        let now = Instant::now();
        self.ack.record(now.duration_since(arrival.at).as_secs_f64());
        if let Some(&(_, durable_at)) = self.durable.iter().find(|(lsn, _)| *lsn >= arrival.lsn) {
            let durable_at = durable_at.max(arrival.at);
            self.ack_wal.record(durable_at.duration_since(arrival.at).as_secs_f64());
            self.ack_replication.record(now.saturating_duration_since(durable_at).as_secs_f64());
        }
        for r in &batch.repositions {
            if r.rewind_to.is_some() { self.abandoned_branch.increment(1) } else { self.behind_retention.increment(1) }
        }
    }

    /// Once a second: every figure the node keeps, liveness and readiness.
    pub fn publish(&mut self, node: &Node, uplink: Option<&Uplink>, figures: &DriverFigures) {
        self.health.turned();
        let state = node.state();
        let (replication, lag) = node.replication();
        let (ready, why) = readiness(state, replication);
        self.health.set_ready(ready, why);
        gauge!("fog_server_ready").set(f64::from(u8::from(ready)));
        for s in [NodeState::Primary, NodeState::Backup, NodeState::Active, NodeState::Passive] {
            gauge!("fog_server_state", "state" => s.as_str()).set(f64::from(u8::from(s == state)));
        }
        gauge!("fog_server_active").set(f64::from(u8::from(state == NodeState::Active)));
        gauge!("fog_server_epoch").set(node.epoch() as f64);
        gauge!("fog_server_lsn").set(node.lsn() as f64);
        gauge!("fog_server_durable_lsn").set(node.durable_lsn() as f64);
        gauge!("fog_server_replication_lag_entries").set(lag as f64);
        gauge!("fog_server_passive_in_sync").set(f64::from(u8::from(replication == Replication::InSync)));
        let lag_seconds = match replication {
            Replication::InSync | Replication::PassiveJoining => {
                let confirmed = node.lsn().saturating_sub(lag);
                self.appended.retain(|(lsn, _)| *lsn > confirmed);
                self.appended.front().map_or(0.0, |(_, at)| at.elapsed().as_secs_f64())
            }
            _ => {
                self.appended.clear();
                0.0
            }
        };
        gauge!("fog_server_replication_lag_seconds").set(lag_seconds);
        gauge!("fog_server_peer_heartbeat_age_seconds").set(figures.peer_heard_at.map_or(f64::NAN, |at| at.elapsed().as_secs_f64()));

        let r = node.replica();
        counter!("fog_server_readings_counted_total").absolute(r.ingest.counted());
        counter!("fog_server_readings_duplicate_total").absolute(r.ingest.duplicates());
        counter!("fog_server_readings_expired_total").absolute(r.ingest.expired());
        counter!("fog_server_readings_late_total").absolute(r.windows.too_late());
        counter!("fog_server_readings_received_total").absolute(figures.readings_received);
        counter!("fog_server_bytes_received_total").absolute(figures.bytes_received);
        counter!("fog_server_batches_total").absolute(node.batches());
        counter!("fog_server_replies_dropped_total").absolute(figures.replies_dropped);
        counter!("fog_server_forged_epochs_total").absolute(node.forged_epochs());
        let refused = node.refused();
        counter!("fog_server_malformed_frames_total").absolute(refused.malformed);
        for (reason, n) in [
            ("from_the_future", refused.from_the_future),
            ("seq_out_of_range", refused.seq_out_of_range),
            ("too_large", refused.too_large),
            ("not_authorized", refused.not_authorized),
            ("foreign_sensor", refused.foreign_sensor),
            ("busy", refused.busy),
            ("malformed", refused.malformed),
        ] {
            counter!("fog_server_readings_refused_total", "reason" => reason).absolute(n);
        }
        gauge!("fog_server_dedup_incarnations").set(r.ingest.incarnations() as f64);
        gauge!("fog_server_retired_incarnations").set(r.ingest.retired().incarnations as f64);
        counter!("fog_server_averages_published_total").absolute(r.windows.averages_published());
        counter!("fog_server_average_revisions_total").absolute(r.windows.revisions_published());
        self.publish_averages(r.windows.retained());
        if let Some(up) = uplink {
            let o = node.outbox();
            gauge!("fog_server_uplink_connected").set(f64::from(u8::from(up.connected)));
            gauge!("fog_server_uplink_backlog_items").set(o.len() as f64);
            gauge!("fog_server_uplink_backlog_bytes").set(o.bytes() as f64);
            let age = o.oldest_at_ms().map_or(0.0, |at| crate::clock::wall_ms().saturating_sub(at) as f64 / 1000.0);
            gauge!("fog_server_uplink_backlog_age_seconds").set(age);
            gauge!("fog_server_uplink_forwarded_seq").set(o.forwarded() as f64);
            counter!("fog_server_uplink_dropped_total").absolute(o.drops());
            gauge!("fog_server_uplink_lost_items").set(o.dropped() as f64);
            counter!("fog_server_uplink_adopted_items_total").absolute(o.adopted().0);
            counter!("fog_server_uplink_messages_total").absolute(up.messages);
        }
        if let Some(d) = fog_observe::disk_space(&self.data_dir) {
            gauge!("fog_server_disk_free_bytes").set(d.free as f64);
            gauge!("fog_server_disk_size_bytes").set(d.size as f64);
        }
    }

    /// The retained averages' count, and the newest of each of the lowest
    /// [`MAX_SEGMENT_SERIES`] segments.
    fn publish_averages<'a>(&self, retained: impl Iterator<Item = &'a Average>) {
        let mut newest: BTreeMap<u32, &Average> = BTreeMap::new();
        let mut count = 0u64;
        for a in retained {
            count += 1;
            let slot = newest.entry(a.segment).or_insert(a);
            if (a.window_end_ms, a.revision) > (slot.window_end_ms, slot.revision) {
                *slot = a;
            }
        }
        gauge!("fog_server_retained_averages").set(count as f64);
        for (segment, a) in newest.iter().take(MAX_SEGMENT_SERIES) {
            let label = segment.to_string();
            gauge!("fog_server_segment_average_kmh", "segment" => label.clone()).set(a.mean_kmh());
            gauge!("fog_server_segment_readings", "segment" => label.clone()).set(f64::from(a.count));
            gauge!("fog_server_segment_window_end_seconds", "segment" => label).set(a.window_end_ms as f64 / 1000.0);
        }
    }
}

/// What only the driver counts, for [`ServerMetrics::publish`].
pub(crate) struct DriverFigures {
    pub peer_heard_at: Option<Instant>,
    pub readings_received: u64,
    pub bytes_received: u64,
    pub replies_dropped: u64,
}

/// `/readyz`: an active node can ack; a passive is ready once caught up
/// (it could take over with everything acked).
fn readiness(state: NodeState, replication: Replication) -> (bool, &'static str) {
    match (state, replication) {
        (NodeState::Active, _) => (true, ""),
        (NodeState::Passive, Replication::CaughtUp) => (true, ""),
        (NodeState::Passive, Replication::Merging) => (false, "passive, merging readings it accepted alone into the active"),
        (NodeState::Passive, _) => (false, "passive, catching up with the active"),
        _ => (false, "waiting for the peer"),
    }
}

fn push_bounded(samples: &mut VecDeque<(u64, Instant)>, lsn: u64, cap: usize) {
    if samples.back().is_some_and(|(last, _)| *last >= lsn) {
        return;
    }
    if samples.len() >= cap {
        samples.pop_front();
    }
    samples.push_back((lsn, Instant::now()));
}

/// The disk thread's figures: one group commit, one snapshot, the log's size.
pub(crate) fn wal_group(write: Duration, sync: Option<Duration>, wal_bytes: u64) {
    histogram!("fog_server_wal_write_seconds").record(write.as_secs_f64());
    if let Some(sync) = sync {
        histogram!("fog_server_wal_fsync_seconds").record(sync.as_secs_f64());
    }
    gauge!("fog_server_wal_bytes").set(wal_bytes as f64);
}

pub(crate) fn snapshot_written(took: Duration, wal_bytes: u64) {
    counter!("fog_server_snapshots_total").increment(1);
    histogram!("fog_server_snapshot_seconds").record(took.as_secs_f64());
    gauge!("fog_server_wal_bytes").set(wal_bytes as f64);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_follows_the_state() {
        assert!(readiness(NodeState::Active, Replication::Alone).0);
        assert!(readiness(NodeState::Passive, Replication::CaughtUp).0);
        assert_eq!(readiness(NodeState::Passive, Replication::CatchingUp), (false, "passive, catching up with the active"));
        assert!(!readiness(NodeState::Primary, Replication::WaitingForPeer).0);
    }

    #[test]
    fn samples_are_bounded_and_increasing() {
        let mut s = VecDeque::new();
        for lsn in [1, 1, 2, 0, 3, 4, 5] {
            push_bounded(&mut s, lsn, 3);
        }
        assert_eq!(s.iter().map(|(l, _)| *l).collect::<Vec<_>>(), vec![3, 4, 5]);
    }
}
