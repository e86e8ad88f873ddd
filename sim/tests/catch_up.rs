//! A sensor's news (acks, averages) waits for its next visit, and the host
//! visits in between only when its sensors read rarely (a long interval):
//! a host that visits every few seconds to make several readings a visit
//! hands the news over then, and one that falls behind a short round must
//! not add visits (each returns the readings due again, which adds to what
//! holds it up). Real `Fleet` over the real sensor code (native).

use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant};

use fog_host::fleet::{Fleet, FleetConfig};
use fog_protocol::{BatchReply, SensorAck};
use fog_sim::native::{BuiltIn, NativeRuntime, Traps, WallClock};

const WALL0: u64 = 1_700_000_000_000;

fn fleet(interval: Duration, t0: Instant) -> Fleet<NativeRuntime> {
    let clock = WallClock::default();
    clock.set(WALL0);
    let traps = Traps::new(1, 0.0);
    let runtime = NativeRuntime { traps, clock, quiet_from: Arc::new(AtomicU64::new(u64::MAX)), sim_ms: Arc::new(AtomicU64::new(0)) };
    let config = FleetConfig {
        first_id: 0,
        count: 3,
        segments: 1,
        resend_after_ms: 60_000,
        max_buffered: 100,
        settings: Vec::new(),
        seed: 5,
        restart_backoff: Duration::from_millis(100),
        max_restarts: 10,
        threads: 1,
        every_ms: interval.as_millis() as u32,
    };
    match Fleet::start(Arc::new(runtime), BuiltIn, config, None, t0) {
        Ok(fleet) => fleet,
        Err(e) => panic!("native sensors start: {e}"),
    }
}

/// Visits every sensor once (two readings each, `interval` apart), sends
/// them, and brings the server's ack of them; then, `later`, an empty
/// reply. Returns how many readings each sensor's last visit said were
/// acked.
fn acked_after_a_quiet_spell(interval: Duration, later: Duration) -> Vec<u64> {
    let t0 = Instant::now();
    let mut fleet = fleet(interval, t0);
    assert_eq!(fleet.tick_all(t0, 2), 6);
    let (batch, readings) = fleet.take_batch(t0, 1);
    assert_eq!(readings, 6);
    let incarnations: Vec<u64> = fleet.summaries().iter().map(|s| s.incarnation).collect();
    let acks = batch.iter().map(|s| SensorAck { sensor_id: s.sensor_id, incarnation: incarnations[s.sensor_id as usize], next_seq: 2, also: Vec::new() }).collect();
    fleet.apply(t0 + Duration::from_millis(10), &BatchReply { batch_id: 1, epoch: 1, acks, ..BatchReply::default() });
    fleet.apply(t0 + later, &BatchReply { batch_id: 2, epoch: 1, ..BatchReply::default() });
    fleet.summaries().iter().map(|s| s.acked).collect()
}

#[test]
fn a_long_interval_hands_news_over_between_visits_and_a_short_one_waits_for_the_next() {
    // A reading every 10 s: 2.5 s on, the ack is handed over without a visit.
    assert_eq!(acked_after_a_quiet_spell(Duration::from_secs(10), Duration::from_millis(2_500)), vec![2, 2, 2]);
    // ... but not before 2 s.
    assert_eq!(acked_after_a_quiet_spell(Duration::from_secs(10), Duration::from_millis(1_500)), vec![0, 0, 0]);
    // A reading every second (visited every second, or every few seconds
    // for several): however late the next visit, the ack waits for it.
    assert_eq!(acked_after_a_quiet_spell(Duration::from_secs(1), Duration::from_secs(5)), vec![0, 0, 0]);
}
