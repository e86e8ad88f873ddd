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
    use fog_sensor::glue::{SensorLogic, restore_core};
    use fog_sensor::{Reading, SensorConfig, SensorCore};

    use crate::{Fault, fault_for, strike};

    /// The built-in sensor's logic, plus the fault it was told to commit
    /// and how many ticks this instance has run.
    pub struct Faulty {
        core: SensorCore,
        fault: Option<(Fault, u64)>,
        ticks: u64,
    }

    impl SensorLogic for Faulty {
        fn start(config: &SensorConfig, seed: u64, now_ms: u64) -> Self {
            Faulty { core: SensorCore::new(config, seed, now_ms), fault: fault_for(&config.settings, config.sensor_id), ticks: 0 }
        }

        fn core(&mut self) -> &mut SensorCore {
            &mut self.core
        }

        fn tick(&mut self, now_ms: u64, make: u32, every_ms: u32) -> Vec<Reading> {
            self.ticks += 1;
            if let Some((fault, after)) = self.fault {
                if self.ticks > after {
                    strike(fault);
                }
            }
            self.core.tick(now_ms, make, every_ms)
        }

        /// A restored instance counts its ticks afresh, as a new instance
        /// does: a sensor told to fail after n ticks fails again n ticks
        /// after each restart.
        fn restore(bytes: &[u8], config: &SensorConfig, _now_ms: u64) -> Result<Self, String> {
            let core = restore_core(bytes, config)?;
            Ok(Faulty { core, fault: fault_for(&config.settings, config.sensor_id), ticks: 0 })
        }
    }

    fog_sensor::export_sensor!("../../wit", Faulty);
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
