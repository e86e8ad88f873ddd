//! A sensor that misbehaves on purpose, for testing that a host contains
//! it: the built-in sensor's core, except that the sensors named in the
//! `fault` setting go wrong after `fault-after` ticks of each life.
//!
//! Settings (`--set` on fog-host):
//! - `fault=3:trap,5:loop,7:hog` — sensor 3 traps (a panic, which aborts),
//!   sensor 5 loops forever, sensor 7 grows its memory without bound;
//! - `fault-after=N` — ticks each instance runs normally first (default 5).
//!   The count lives in the instance, not in the snapshot, so a sensor
//!   restarted from its last good state works for N ticks and fails again:
//!   restart, backoff and quarantine can all be observed in one run.
//!
//! Not for production: it exists so the host's isolation tests run real,
//! misbehaving components.

/// How a sensor goes wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    Trap,
    Loop,
    Hog,
}

/// The fault of `sensor_id` according to the settings, and after how many
/// ticks it strikes.
pub fn fault_for(settings: &[(String, String)], sensor_id: u32) -> Option<(Fault, u64)> {
    let get = |key: &str| settings.iter().rev().find(|(k, _)| k == key).map(|(_, v)| v.as_str());
    let after = get("fault-after").and_then(|v| v.parse().ok()).unwrap_or(5);
    let fault = get("fault")?.split(',').find_map(|entry| {
        let (id, kind) = entry.split_once(':')?;
        if id.trim().parse::<u32>().ok()? != sensor_id {
            return None;
        }
        match kind.trim() {
            "trap" => Some(Fault::Trap),
            "loop" => Some(Fault::Loop),
            "hog" => Some(Fault::Hog),
            _ => None,
        }
    })?;
    Some((fault, after))
}

/// Does the harm. Never returns when the fault is a loop; the others end
/// the call with a trap.
pub fn strike(fault: Fault) {
    match fault {
        Fault::Trap => panic!("fault injected: trap"),
        Fault::Loop => {
            let mut spins = 0u64;
            loop {
                spins = std::hint::black_box(spins.wrapping_add(1));
            }
        }
        Fault::Hog => {
            let mut hoard: Vec<Vec<u8>> = Vec::new();
            loop {
                // Touch every page, so the memory is really used.
                hoard.push(vec![1u8; 1 << 20]);
                std::hint::black_box(&hoard);
            }
        }
    }
}

#[cfg(target_arch = "wasm32")]
mod component {
    use std::cell::{Cell, RefCell};

    use fog_sensor::{SensorConfig, SensorCore};

    use crate::{fault_for, strike};

    wit_bindgen::generate!({ path: "../../wit", world: "sensor" });

    use fog::sensor::environment;

    thread_local! {
        static SENSOR: RefCell<Option<SensorCore>> = const { RefCell::new(None) };
        static TICKS: Cell<u64> = const { Cell::new(0) };
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

    fn with_sensor<T>(f: impl FnOnce(&mut SensorCore) -> T) -> T {
        SENSOR.with(|cell| {
            let mut slot = cell.borrow_mut();
            let core = slot.get_or_insert_with(|| SensorCore::new(&host_config(), environment::seed(), environment::now_ms()));
            f(core)
        })
    }

    struct Faulty;

    impl Guest for Faulty {
        fn init() -> u64 {
            with_sensor(|core| core.incarnation())
        }

        fn tick(produce: bool) -> Vec<Reading> {
            let ticks = TICKS.with(|t| {
                t.set(t.get() + 1);
                t.get()
            });
            let config = host_config();
            if let Some((fault, after)) = fault_for(&config.settings, config.sensor_id) {
                if ticks > after {
                    strike(fault);
                }
            }
            let now = environment::now_ms();
            with_sensor(|core| core.tick(now, produce))
                .into_iter()
                .map(|r| Reading { seq: r.seq, speed_kmh: r.speed_kmh, timestamp_ms: r.timestamp_ms })
                .collect()
        }

        fn on_ack(incarnation: u64, next_seq: u64, also: Vec<u64>) {
            with_sensor(|core| core.on_ack(incarnation, next_seq, &also))
        }

        fn on_averages(averages: Vec<Average>) -> Option<u64> {
            let averages: Vec<fog_sensor::Average> = averages
                .into_iter()
                .map(|a| fog_sensor::Average {
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

        fn restore(state: Vec<u8>) -> Result<(), String> {
            let mut restored = SensorCore::restore(&state).map_err(|e| e.to_string())?;
            let config = host_config();
            restored.set_resend_policy(config.resend_after_ms, config.max_buffered);
            SENSOR.with(|cell| *cell.borrow_mut() = Some(restored));
            Ok(())
        }
    }

    export!(Faulty);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn faults_are_per_sensor_and_default_to_five_ticks() {
        let s = settings(&[("fault", "3:trap, 5:loop,7:hog")]);
        assert_eq!(fault_for(&s, 3), Some((Fault::Trap, 5)));
        assert_eq!(fault_for(&s, 5), Some((Fault::Loop, 5)));
        assert_eq!(fault_for(&s, 7), Some((Fault::Hog, 5)));
        assert_eq!(fault_for(&s, 4), None);
        let s = settings(&[("fault", "2:loop"), ("fault-after", "12")]);
        assert_eq!(fault_for(&s, 2), Some((Fault::Loop, 12)));
        assert_eq!(fault_for(&settings(&[("fault", "2:melt")]), 2), None);
        assert_eq!(fault_for(&[], 2), None);
    }
}
