//! The wit-bindgen glue: the `fog:sensor` world around [`SensorCore`].
//!
//! Only conversions between WIT records and core types live here, plus
//! reading the `environment` imports. A component instance is
//! single-threaded, so the core sits in a thread-local `RefCell`. Every
//! export initialises the sensor if the host has not called `init` yet: a
//! host that forgets gets a working sensor rather than a trap.

use crate::core::{SensorConfig, SensorCore};
use std::cell::RefCell;

wit_bindgen::generate!({ path: "../wit", world: "sensor" });

use fog::sensor::environment;

thread_local! {
    static SENSOR: RefCell<Option<SensorCore>> = const { RefCell::new(None) };
}

fn host_config() -> SensorConfig {
    let c = environment::sensor_config();
    SensorConfig {
        sensor_id: c.sensor_id,
        segment: c.segment,
        resend_after_ms: c.resend_after_ms,
        max_buffered: c.max_buffered,
        settings: c.settings,
    }
}

/// Runs `f` on the sensor, creating it from the environment first if needed.
fn with_sensor<T>(f: impl FnOnce(&mut SensorCore) -> T) -> T {
    SENSOR.with(|cell| {
        let mut slot = cell.borrow_mut();
        let core = slot.get_or_insert_with(|| {
            SensorCore::new(&host_config(), environment::seed(), environment::now_ms())
        });
        f(core)
    })
}

struct Sensor;

impl Guest for Sensor {
    /// Idempotent: a second call (or a call after `restore`) returns the
    /// incarnation in force instead of starting a new life and losing the
    /// unacked readings.
    fn init() -> u64 {
        with_sensor(|core| core.incarnation())
    }

    fn tick(produce: bool) -> Vec<Reading> {
        let now = environment::now_ms();
        with_sensor(|core| core.tick(now, produce))
            .into_iter()
            .map(|r| Reading {
                seq: r.seq,
                speed_kmh: r.speed_kmh,
                timestamp_ms: r.timestamp_ms,
            })
            .collect()
    }

    fn on_ack(incarnation: u64, next_seq: u64, also: Vec<u64>) {
        with_sensor(|core| core.on_ack(incarnation, next_seq, &also))
    }

    fn on_averages(averages: Vec<Average>) -> Option<u64> {
        let averages: Vec<crate::Average> = averages
            .into_iter()
            .map(|a| crate::Average {
                seq: a.seq,
                segment: a.segment,
                window_end_ms: a.window_end_ms,
                count: a.count,
                mean_kmh: a.mean_kmh,
                revision: a.revision,
            })
            .collect();
        with_sensor(|core| core.on_averages(&averages))
    }

    fn on_missed(from: u64, to: u64) -> Option<u64> {
        with_sensor(|core| core.on_missed(from, to))
    }

    fn status() -> Status {
        let s = with_sensor(|core| core.status());
        Status {
            incarnation: s.incarnation,
            generated: s.generated,
            acked: s.acked,
            buffered: s.buffered,
            resent: s.resent,
            overflowed: s.overflowed,
            sum_kmh: s.sum_kmh,
            averages_applied: s.averages_applied,
            last_average_seq: s.last_average_seq,
            averages_missed: s.averages_missed,
            averages_digest: s.averages_digest,
            limit_kmh: s.limit_kmh,
        }
    }

    fn snapshot() -> Vec<u8> {
        with_sensor(|core| core.snapshot())
    }

    /// Replaces the sensor's state with the snapshot's: identity, sequence,
    /// unacked readings, average cursor and limit. The snapshot must be of
    /// this sensor id; the resend timeout and bound are the host's current
    /// ones, since those are the host's flags, not the sensor's memory.
    fn restore(state: Vec<u8>) -> Result<(), String> {
        let mut restored = SensorCore::restore(&state).map_err(|e| e.to_string())?;
        let config = host_config();
        if restored.sensor_id() != config.sensor_id {
            return Err(format!(
                "sensor snapshot is of sensor {}, this is sensor {}",
                restored.sensor_id(),
                config.sensor_id
            ));
        }
        restored.set_resend_policy(config.resend_after_ms, config.max_buffered);
        SENSOR.with(|cell| *cell.borrow_mut() = Some(restored));
        Ok(())
    }
}

export!(Sensor);
