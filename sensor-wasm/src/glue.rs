//! What every sensor component built on [`SensorCore`] shares: the
//! `fog:sensor` world's exports, written once.
//!
//! A component describes only what makes it different, as a
//! [`SensorLogic`] (how it starts, ticks, snapshots and restores), and
//! invokes [`export_sensor!`](crate::export_sensor) with the path of the
//! WIT folder. The macro generates the WIT bindings in the calling crate
//! (wit-bindgen's types are per crate), keeps the logic in a static (a
//! component instance is single-threaded), converts between WIT records
//! and core types, and initialises the sensor on the first export called,
//! so a host that forgets `init` gets a working sensor rather than a trap.

use crate::core::{SensorConfig, SensorCore};
use crate::resend::Reading;

/// The parts of a sensor component that differ from one to another.
pub trait SensorLogic: Sized + 'static {
    /// A new sensor from the host's configuration, seed and clock.
    fn start(config: &SensorConfig, seed: u64, now_ms: u64) -> Self;

    /// The core that owns sequence numbers, resends, acks and averages.
    fn core(&mut self) -> &mut SensorCore;

    /// One tick making `make` readings (see [`SensorCore::tick`]); by
    /// default with the core's own traffic model.
    fn tick(&mut self, now_ms: u64, make: u32, every_ms: u32) -> Vec<Reading> {
        self.core().tick(now_ms, make, every_ms)
    }

    /// The whole state as bytes; by default the core's snapshot.
    fn snapshot(&mut self) -> Vec<u8> {
        self.core().snapshot()
    }

    /// A sensor from a snapshot taken by this logic (or one it accepts). By
    /// default the core's snapshot, which must be of this sensor id.
    fn restore(bytes: &[u8], config: &SensorConfig, now_ms: u64) -> Result<Self, String>;
}

/// Restores a core snapshot for `config`'s sensor, with the host's current
/// resend timeout and bound (those are host flags, not sensor memory).
pub fn restore_core(bytes: &[u8], config: &SensorConfig) -> Result<SensorCore, String> {
    let mut core = SensorCore::restore(bytes).map_err(|e| e.to_string())?;
    if core.sensor_id() != config.sensor_id {
        return Err(format!("sensor snapshot is of sensor {}, this is sensor {}", core.sensor_id(), config.sensor_id));
    }
    core.set_resend_policy(config.resend_after_ms, config.max_buffered);
    Ok(core)
}

/// Exports the `fog:sensor` world for a [`SensorLogic`] type:
/// `fog_sensor::export_sensor!("../wit", MyLogic);` (the path is relative
/// to the calling crate's manifest). The calling crate depends on
/// `wit-bindgen` itself.
#[macro_export]
macro_rules! export_sensor {
    ($wit:literal, $logic:ty) => {
        mod fog_sensor_component {
            use std::cell::RefCell;

            #[allow(unused_imports)]
            use super::*;

            #[allow(unused_imports)]
            use $crate::glue::SensorLogic as _;

            wit_bindgen::generate!({ path: $wit, world: "sensor" });

            use fog::sensor::environment;

            /// The sensor. A component instance runs on one thread, so a
            /// plain static does; a `thread_local!` is reached through a
            /// function pointer, and that indirect call on every export
            /// makes the host fill in a page of the instance's function
            /// table for each sensor.
            struct Slot(RefCell<Option<$logic>>);

            // SAFETY: a component instance has one thread.
            unsafe impl Sync for Slot {}

            static SENSOR: Slot = Slot(RefCell::new(None));

            fn host_config() -> $crate::SensorConfig {
                let c = environment::sensor_config();
                $crate::SensorConfig {
                    sensor_id: c.sensor_id,
                    segment: c.segment,
                    resend_after_ms: c.resend_after_ms,
                    max_buffered: c.max_buffered,
                    settings: c.settings,
                }
            }

            fn with_logic<T>(f: impl FnOnce(&mut $logic) -> T) -> T {
                let mut slot = SENSOR.0.borrow_mut();
                let logic = slot.get_or_insert_with(|| <$logic>::start(&host_config(), environment::seed(), environment::now_ms()));
                f(logic)
            }

            fn to_wit(c: $crate::AverageCursor) -> Cursor {
                Cursor { seq: c.seq, epoch: c.epoch, chain: c.chain }
            }

            struct Component;

            impl Guest for Component {
                /// Idempotent: a second call (or a call after `restore`)
                /// returns the incarnation in force instead of starting a new
                /// life and losing the unacked readings.
                fn init() -> u64 {
                    with_logic(|l| l.core().incarnation())
                }

                /// The visit's news first, then the readings (see the WIT).
                fn tick(visit: Visit) -> TickResult {
                    let now = environment::now_ms();
                    let averages: Vec<$crate::Average> = visit
                        .averages
                        .unwrap_or_default()
                        .into_iter()
                        .map(|a| $crate::Average {
                            seq: a.seq,
                            epoch: a.epoch,
                            segment: a.segment,
                            window_end_ms: a.window_end_ms,
                            count: a.count,
                            sum_kmh: a.sum_kmh,
                            revision: a.revision,
                            chain: a.chain,
                        })
                        .collect();
                    let ack = visit.ack.as_ref().map(|a| (a.incarnation, a.next_seq, a.also.as_deref().unwrap_or(&[])));
                    let (readings, status) = with_logic(|l| {
                        l.core().take_news(ack, &averages);
                        let readings = l.tick(now, visit.make, visit.every_ms);
                        (readings, l.core().status())
                    });
                    TickResult {
                        readings: readings
                            .into_iter()
                            .map(|r| Reading { seq: r.seq, speed_kmh: r.speed_kmh, timestamp_ms: r.timestamp_ms })
                            .collect(),
                        status: to_wit_status(status),
                    }
                }

                fn on_reposition(rewind_to: Option<u64>, to: Cursor) -> Option<Cursor> {
                    let to = $crate::AverageCursor { seq: to.seq, epoch: to.epoch, chain: to.chain };
                    with_logic(|l| l.core().on_reposition(rewind_to, to)).map(to_wit)
                }

                fn status() -> Status {
                    to_wit_status(with_logic(|l| l.core().status()))
                }

                fn snapshot() -> Vec<u8> {
                    with_logic(|l| l.snapshot())
                }

                /// The logic's own restore, then the readings that left
                /// since that snapshot (see `SensorCore::adopt`).
                fn restore(state: Vec<u8>, since: Vec<Reading>) -> Result<(), String> {
                    let now = environment::now_ms();
                    let mut restored = <$logic>::restore(&state, &host_config(), now)?;
                    let since: Vec<$crate::Reading> = since
                        .into_iter()
                        .map(|r| $crate::Reading { seq: r.seq, speed_kmh: r.speed_kmh, timestamp_ms: r.timestamp_ms })
                        .collect();
                    restored.core().adopt(&since, now);
                    *SENSOR.0.borrow_mut() = Some(restored);
                    Ok(())
                }
            }

            fn to_wit_status(s: $crate::Status) -> Status {
                Status {
                    incarnation: s.incarnation,
                    generated: s.generated,
                    acked: s.acked,
                    buffered: s.buffered,
                    resent: s.resent,
                    overflowed: s.overflowed,
                    sum_kmh: s.sum_kmh,
                    averages_applied: s.averages_applied,
                    last_average: s.last_average.map(to_wit),
                    averages_missed: s.averages_missed,
                    averages_superseded: s.averages_superseded,
                    averages_digest: s.averages_digest,
                    limit_kmh: s.limit_kmh,
                }
            }

            export!(Component);
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(id: u32) -> SensorConfig {
        SensorConfig { sensor_id: id, segment: 0, resend_after_ms: 1_000, max_buffered: 100, settings: Vec::new() }
    }

    #[test]
    fn a_snapshot_restores_only_into_the_same_sensor() {
        let mut core = SensorCore::new(&config(7), 42, 1_000);
        core.tick(1_000, 1, 0);
        let bytes = core.snapshot();
        let restored = restore_core(&bytes, &config(7)).expect("same sensor");
        assert_eq!(restored.incarnation(), core.incarnation());
        assert_eq!(restored.status().generated, 1);
        let err = restore_core(&bytes, &config(8)).err().expect("another sensor refuses it");
        assert!(err.contains("of sensor 7, this is sensor 8"), "{err}");
        assert!(restore_core(b"garbage", &config(7)).is_err());
    }

    #[test]
    fn a_restored_sensor_takes_the_hosts_current_resend_policy() {
        let mut core = SensorCore::new(&config(7), 42, 1_000);
        core.tick(1_000, 1, 0);
        let bytes = core.snapshot();
        let later = SensorConfig { resend_after_ms: 60_000, ..config(7) };
        let mut restored = restore_core(&bytes, &later).expect("restores");
        // Under the old policy the reading would be resent 1 s later; under
        // the host's new one it is not yet due.
        assert!(restored.tick(2_500, 0, 0).is_empty(), "the new 60 s resend timeout applies");
        assert_eq!(restored.tick(62_000, 0, 0).len(), 1);
    }
}
