//! A second sensor: a scripted congestion scenario instead of random
//! traffic. It runs on the same host binary as the built-in sensor (pass
//! the path of `fog_scenario_sensor.wasm`), which is the point: the sensor
//! logic is a file, not part of the host.
//!
//! Free-flowing traffic at `free-kmh`, until a jam reaches the sensor:
//! `jam-at` seconds after the scenario started, plus `wave-s` seconds per
//! sensor id (a jam travels upstream, from low ids to high), it drops to
//! `jam-kmh` for `jam-for` seconds, then recovers. Speeds vary by ±`noise-kmh`.
//! Defaults: free-kmh=110, jam-kmh=25, jam-at=10, jam-for=20, wave-s=0,
//! noise-kmh=4. Resend buffer, averages and limit are the built-in
//! sensor's core, reused as a library.
//!
//! Its snapshot is the core's with the scenario's clock and noise state in
//! front (format `S1`). It also accepts the built-in sensor's snapshot, so a
//! host can hot-swap from the built-in sensor to this one: the sensor keeps
//! its identity, sequence and unacked readings, and its scenario starts at
//! the swap. The built-in sensor refuses an `S1` snapshot, so swapping back
//! is refused and the host keeps this one running.

use fog_sensor::rng::{Rng, mix64};

/// First byte of this sensor's snapshots; the built-in sensor's start with
/// its format version (1), so the two cannot be confused.
pub const SNAPSHOT_TAG: u8 = b'S';
const SNAPSHOT_VERSION: u8 = 1;

/// The scripted scenario, from the sensor's settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Scenario {
    pub free_kmh: f64,
    pub jam_kmh: f64,
    pub jam_at_ms: u64,
    pub jam_for_ms: u64,
    pub wave_ms_per_sensor: u64,
    pub noise_kmh: f64,
}

impl Scenario {
    /// Unknown keys are ignored (they may be meant for another sensor); a
    /// value that is not a number keeps the default.
    pub fn from_settings(settings: &[(String, String)]) -> Scenario {
        let get = |key: &str, default: f64| -> f64 {
            settings
                .iter()
                .rev()
                .find(|(k, _)| k == key)
                .and_then(|(_, v)| v.parse::<f64>().ok())
                .filter(|v| v.is_finite() && *v >= 0.0)
                .unwrap_or(default)
        };
        Scenario {
            free_kmh: get("free-kmh", 110.0),
            jam_kmh: get("jam-kmh", 25.0),
            jam_at_ms: (get("jam-at", 10.0) * 1000.0) as u64,
            jam_for_ms: (get("jam-for", 20.0) * 1000.0) as u64,
            wave_ms_per_sensor: (get("wave-s", 0.0) * 1000.0) as u64,
            noise_kmh: get("noise-kmh", 4.0),
        }
    }

    /// Whether sensor `sensor_id` is in the jam `elapsed_ms` into the scenario.
    pub fn jammed(&self, sensor_id: u32, elapsed_ms: u64) -> bool {
        let start = self.jam_at_ms.saturating_add(self.wave_ms_per_sensor.saturating_mul(u64::from(sensor_id)));
        elapsed_ms >= start && elapsed_ms < start.saturating_add(self.jam_for_ms)
    }

    /// The speed of the next car, with noise from `rng`, in 1..=300 km/h.
    pub fn speed(&self, sensor_id: u32, elapsed_ms: u64, rng: &mut Rng) -> u16 {
        let base = if self.jammed(sensor_id, elapsed_ms) { self.jam_kmh } else { self.free_kmh };
        let noise = (rng.unit() * 2.0 - 1.0) * self.noise_kmh;
        (base + noise).round().clamp(1.0, 300.0) as u16
    }
}

/// What this sensor adds to the core's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScenarioClock {
    pub started_ms: u64,
    pub rng_state: u64,
}

impl ScenarioClock {
    pub fn new(started_ms: u64, incarnation: u64) -> Self {
        ScenarioClock { started_ms, rng_state: mix64(incarnation ^ 0x7363_656e) } // "scen"
    }

    /// `S`, version, started_ms, rng_state, then the core's snapshot.
    pub fn encode(&self, core_snapshot: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(18 + core_snapshot.len());
        out.push(SNAPSHOT_TAG);
        out.push(SNAPSHOT_VERSION);
        out.extend_from_slice(&self.started_ms.to_le_bytes());
        out.extend_from_slice(&self.rng_state.to_le_bytes());
        out.extend_from_slice(core_snapshot);
        out
    }

    /// Splits a snapshot into the scenario clock (if it is one of ours) and
    /// the core's snapshot.
    pub fn decode(bytes: &[u8]) -> Result<(Option<ScenarioClock>, &[u8]), String> {
        match bytes.first() {
            Some(&SNAPSHOT_TAG) => {
                if bytes.get(1) != Some(&SNAPSHOT_VERSION) {
                    return Err(format!("scenario snapshot version {:?}, this sensor reads {SNAPSHOT_VERSION}", bytes.get(1)));
                }
                let word = |at: usize| -> Result<u64, String> {
                    let b = bytes.get(at..at + 8).ok_or("scenario snapshot truncated")?;
                    let mut w = [0u8; 8];
                    w.copy_from_slice(b);
                    Ok(u64::from_le_bytes(w))
                };
                let clock = ScenarioClock { started_ms: word(2)?, rng_state: word(10)? };
                Ok((Some(clock), &bytes[18..]))
            }
            // The built-in sensor's snapshot: the scenario starts now.
            _ => Ok((None, bytes)),
        }
    }
}

#[cfg(target_arch = "wasm32")]
mod component {
    use std::cell::RefCell;

    use fog_sensor::rng::Rng;
    use fog_sensor::{SensorConfig, SensorCore};

    use crate::{Scenario, ScenarioClock};

    wit_bindgen::generate!({ path: "../../wit", world: "sensor" });

    use fog::sensor::environment;

    struct State {
        core: SensorCore,
        clock: ScenarioClock,
        scenario: Scenario,
    }

    thread_local! {
        static SENSOR: RefCell<Option<State>> = const { RefCell::new(None) };
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

    fn with_state<T>(f: impl FnOnce(&mut State) -> T) -> T {
        SENSOR.with(|cell| {
            let mut slot = cell.borrow_mut();
            let state = slot.get_or_insert_with(|| {
                let config = host_config();
                let now = environment::now_ms();
                let core = SensorCore::new(&config, environment::seed(), now);
                let clock = ScenarioClock::new(now, core.incarnation());
                State { core, clock, scenario: Scenario::from_settings(&config.settings) }
            });
            f(state)
        })
    }

    struct ScenarioSensor;

    impl Guest for ScenarioSensor {
        fn init() -> u64 {
            with_state(|s| s.core.incarnation())
        }

        fn tick(produce: bool) -> Vec<Reading> {
            let now = environment::now_ms();
            with_state(|s| {
                let elapsed = now.saturating_sub(s.clock.started_ms);
                let id = s.core.sensor_id();
                let (scenario, clock) = (s.scenario, &mut s.clock);
                s.core.tick_with(now, produce, |_| {
                    let mut rng = Rng::new(clock.rng_state);
                    let speed = scenario.speed(id, elapsed, &mut rng);
                    clock.rng_state = rng.state();
                    speed
                })
            })
            .into_iter()
            .map(|r| Reading { seq: r.seq, speed_kmh: r.speed_kmh, timestamp_ms: r.timestamp_ms })
            .collect()
        }

        fn on_ack(incarnation: u64, next_seq: u64, also: Vec<u64>) {
            with_state(|s| s.core.on_ack(incarnation, next_seq, &also))
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
            with_state(|s| s.core.on_averages(&averages))
        }

        fn on_missed(from: u64, to: u64) -> Option<u64> {
            with_state(|s| s.core.on_missed(from, to))
        }

        fn status() -> Status {
            let s = with_state(|s| s.core.status());
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
            with_state(|s| s.clock.encode(&s.core.snapshot()))
        }

        fn restore(state: Vec<u8>) -> Result<(), String> {
            let (clock, core_bytes) = ScenarioClock::decode(&state)?;
            let mut core = SensorCore::restore(core_bytes).map_err(|e| e.to_string())?;
            let config = host_config();
            if core.sensor_id() != config.sensor_id {
                return Err(format!("sensor snapshot is of sensor {}, this is sensor {}", core.sensor_id(), config.sensor_id));
            }
            core.set_resend_policy(config.resend_after_ms, config.max_buffered);
            let clock = clock.unwrap_or_else(|| ScenarioClock::new(environment::now_ms(), core.incarnation()));
            let scenario = Scenario::from_settings(&config.settings);
            SENSOR.with(|cell| *cell.borrow_mut() = Some(State { core, clock, scenario }));
            Ok(())
        }
    }

    export!(ScenarioSensor);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn the_jam_reaches_higher_ids_later_and_passes() {
        let s = Scenario::from_settings(&settings(&[("jam-at", "10"), ("jam-for", "5"), ("wave-s", "2")]));
        assert!(!s.jammed(0, 9_999));
        assert!(s.jammed(0, 10_000));
        assert!(!s.jammed(3, 10_000), "sensor 3 is reached 6 s later");
        assert!(s.jammed(3, 16_000));
        assert!(!s.jammed(0, 15_000), "the jam has passed sensor 0");
    }

    #[test]
    fn speeds_follow_the_script_within_the_noise() {
        let s = Scenario::from_settings(&settings(&[("jam-at", "1"), ("jam-for", "1"), ("noise-kmh", "3")]));
        let mut rng = Rng::new(9);
        for _ in 0..1000 {
            assert!((107..=113).contains(&s.speed(1, 0, &mut rng)));
            assert!((22..=28).contains(&s.speed(1, 1_500, &mut rng)));
        }
        let bad = Scenario::from_settings(&settings(&[("free-kmh", "fast"), ("jam-kmh", "-3")]));
        assert_eq!((bad.free_kmh, bad.jam_kmh), (110.0, 25.0));
    }

    #[test]
    fn snapshots_carry_the_clock_and_accept_the_builtin_format() {
        let clock = ScenarioClock { started_ms: 1_700_000_000_000, rng_state: 77 };
        let bytes = clock.encode(&[1, 2, 3]);
        assert_eq!(ScenarioClock::decode(&bytes), Ok((Some(clock), &[1u8, 2, 3][..])));
        let builtin = [fog_sensor::SNAPSHOT_VERSION, 9, 9];
        assert_eq!(ScenarioClock::decode(&builtin), Ok((None, &builtin[..])));
        assert!(ScenarioClock::decode(&bytes[..12]).is_err());
    }
}
