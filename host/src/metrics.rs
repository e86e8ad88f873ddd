//! What a host shows on `/metrics`, `/healthz` and `/readyz`
//! (`fog-observe` serves them; `monitoring/README.md` lists every series).
//!
//! The session times what passes through it (a batch's round trip, the
//! sensors' tick calls, the state directory's commits) and once a second
//! sets the fleet's totals, absolute, from the same pass over the sensors
//! the progress line makes. No sensor id is a label; per-segment series
//! exist for the [`MAX_SEGMENT_SERIES`] lowest segments.

use std::sync::Arc;
use std::time::{Duration, Instant};

use fog_observe::Health;
use metrics::{Histogram, counter, gauge, histogram};

use crate::session::SegmentView;

/// Per-segment series are kept for the lowest segment ids only.
pub const MAX_SEGMENT_SERIES: usize = 64;

/// The host's registered metrics and what it times between events.
pub(crate) struct HostMetrics {
    pub health: Arc<Health>,
    batch: Histogram,
    call: Histogram,
    commit: Histogram,
    /// When the batch in flight left.
    sent_at: Option<Instant>,
    /// When the last reply was applied.
    last_reply: Option<Instant>,
    /// A host is ready while replies come within this.
    ready_within: Duration,
}

/// The fleet's figures at one moment, for [`HostMetrics::publish`].
pub(crate) struct FleetFigures<'a> {
    pub sensors: usize,
    pub restarting: u64,
    pub quarantined: u64,
    pub generated: u64,
    pub acked: u64,
    pub resent: u64,
    pub overflowed: u64,
    pub averages: u64,
    pub missed: u64,
    pub failovers: u64,
    pub traps: u64,
    pub restarts: u64,
    pub swaps: u64,
    pub connected: bool,
    pub segments: &'a [SegmentView],
}

impl HostMetrics {
    pub fn new(health: Arc<Health>, interval: Duration, timeout: Duration) -> Self {
        HostMetrics {
            health,
            batch: histogram!("fog_host_batch_seconds"),
            call: histogram!("fog_host_sensor_call_seconds"),
            commit: histogram!("fog_host_state_commit_seconds"),
            sent_at: None,
            last_reply: None,
            ready_within: (interval * 3).max(timeout).max(Duration::from_secs(3)),
        }
    }

    /// A batch left.
    pub fn sent(&mut self) {
        self.sent_at = Some(Instant::now());
    }

    /// A reply was applied (the round trip of the batch in flight ends).
    pub fn replied(&mut self) {
        let now = Instant::now();
        if let Some(at) = self.sent_at.take() {
            self.batch.record(now.duration_since(at).as_secs_f64());
        }
        self.last_reply = Some(now);
    }

    /// The link went: not ready until a reply comes over the next one.
    pub fn disconnected(&mut self) {
        self.sent_at = None;
        self.last_reply = None;
    }

    /// `calls` tick calls took `took` together.
    pub fn ticked(&self, calls: usize, took: Duration) {
        if calls > 0 {
            self.call.record(took.as_secs_f64() / calls as f64);
        }
    }

    pub fn committed(&self, took: Duration) {
        self.commit.record(took.as_secs_f64());
    }

    /// Once a second: liveness, readiness and the fleet's figures.
    pub fn publish(&self, f: &FleetFigures<'_>) {
        self.health.turned();
        let replying = self.last_reply.is_some_and(|at| at.elapsed() <= self.ready_within);
        let ready = f.connected && replying;
        let why = if !f.connected { "not connected to a server" } else { "connected, but no batch acked lately (the server may not be active)" };
        self.health.set_ready(ready, why);
        gauge!("fog_host_ready").set(f64::from(u8::from(ready)));
        gauge!("fog_host_connected").set(f64::from(u8::from(ready)));
        let running = (f.sensors as u64).saturating_sub(f.restarting + f.quarantined);
        for (state, n) in [("running", running), ("restarting", f.restarting), ("quarantined", f.quarantined)] {
            gauge!("fog_host_sensors", "state" => state).set(n as f64);
        }
        counter!("fog_host_readings_generated_total").absolute(f.generated);
        counter!("fog_host_readings_acked_total").absolute(f.acked);
        counter!("fog_host_readings_resent_total").absolute(f.resent);
        counter!("fog_host_readings_overflowed_total").absolute(f.overflowed);
        gauge!("fog_host_readings_unacked").set(f.generated.saturating_sub(f.acked) as f64);
        counter!("fog_host_averages_received_total").absolute(f.averages);
        counter!("fog_host_averages_missed_total").absolute(f.missed);
        counter!("fog_host_failovers_total").absolute(f.failovers);
        counter!("fog_host_sensor_traps_total").absolute(f.traps);
        counter!("fog_host_sensor_restarts_total").absolute(f.restarts);
        counter!("fog_host_swaps_total").absolute(f.swaps);
        if let Some(rss) = fog_observe::resident_bytes() {
            gauge!("fog_host_memory_bytes").set(rss as f64);
            gauge!("fog_host_memory_per_sensor_bytes").set(rss as f64 / f.sensors.max(1) as f64);
        }
        for seg in f.segments.iter().take(MAX_SEGMENT_SERIES) {
            let label = seg.segment.to_string();
            gauge!("fog_host_segment_average_kmh", "segment" => label.clone()).set(f64::from(seg.mean_kmh));
            // The limit most of the segment's sensors show.
            if let Some((&limit, _)) = seg.limits.iter().max_by_key(|(limit, n)| (**n, std::cmp::Reverse(**limit))) {
                gauge!("fog_host_segment_limit_kmh", "segment" => label.clone()).set(f64::from(limit));
            }
            gauge!("fog_host_segment_sensors", "segment" => label).set(f64::from(seg.limits.values().sum::<u32>()));
        }
    }
}
