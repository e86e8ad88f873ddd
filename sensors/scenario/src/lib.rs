//! A second sensor: a scripted congestion scenario instead of random
//! traffic. It runs on the same host binary as the built-in sensor (pass
//! the path of `fog_scenario_sensor.wasm`), which is the point: the sensor
//! logic is a file, not part of the host.
//!
//! Free-flowing traffic at `free-kmh`, until a jam reaches the sensor:
//! `jam-at` seconds after the scenario started, plus `wave-s` seconds per
//! sensor id and `segment-wave-s` seconds per road segment (a jam travels
//! upstream, from low ids to high, from one segment to the next), it drops
//! to `jam-kmh` for `jam-for` seconds, then recovers. With `jam-every` it
//! comes back that many seconds after it began (0: once; a `jam-every`
//! not longer than `jam-for` leaves the road jammed). Speeds vary by
//! ±`noise-kmh`. Defaults: free-kmh=110, jam-kmh=25, jam-at=10, jam-for=20,
//! wave-s=0, segment-wave-s=0, jam-every=0, noise-kmh=4. Resend buffer,
//! averages and limit are the built-in sensor's core, reused as a library.
//!
//! Its snapshot is the core's with the scenario's clock and noise state in
//! front (format `S1`). The script itself is not in it: it comes from the
//! settings at every start, so a sensor restored with other settings
//! follows them from the clock it had, and snapshots of sensors without
//! the recurring or travelling settings read as before. It also accepts the built-in sensor's snapshot, so a
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
    pub wave_ms_per_segment: u64,
    /// From one jam's start to the next's; 0 for a single jam.
    pub jam_every_ms: u64,
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
            wave_ms_per_segment: (get("segment-wave-s", 0.0) * 1000.0) as u64,
            jam_every_ms: (get("jam-every", 0.0) * 1000.0) as u64,
            noise_kmh: get("noise-kmh", 4.0),
        }
    }

    /// Whether sensor `sensor_id` on `segment` is in a jam `elapsed_ms`
    /// into the scenario.
    pub fn jammed(&self, sensor_id: u32, segment: u32, elapsed_ms: u64) -> bool {
        let start = self
            .jam_at_ms
            .saturating_add(self.wave_ms_per_sensor.saturating_mul(u64::from(sensor_id)))
            .saturating_add(self.wave_ms_per_segment.saturating_mul(u64::from(segment)));
        let Some(since) = elapsed_ms.checked_sub(start) else { return false };
        let into_jam = if self.jam_every_ms == 0 { since } else { since % self.jam_every_ms };
        into_jam < self.jam_for_ms
    }

    /// The speed of the next car, with noise from `rng`, in 1..=300 km/h.
    pub fn speed(&self, sensor_id: u32, segment: u32, elapsed_ms: u64, rng: &mut Rng) -> u16 {
        let base = if self.jammed(sensor_id, segment, elapsed_ms) { self.jam_kmh } else { self.free_kmh };
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
    use fog_sensor::glue::{SensorLogic, restore_core};
    use fog_sensor::rng::Rng;
    use fog_sensor::{Reading, SensorConfig, SensorCore};

    use crate::{Scenario, ScenarioClock};

    /// The core, plus the scenario's own clock and script.
    pub struct ScenarioSensor {
        core: SensorCore,
        clock: ScenarioClock,
        scenario: Scenario,
    }

    impl SensorLogic for ScenarioSensor {
        fn start(config: &SensorConfig, seed: u64, now_ms: u64) -> Self {
            let core = SensorCore::new(config, seed, now_ms);
            let clock = ScenarioClock::new(now_ms, core.incarnation());
            ScenarioSensor { core, clock, scenario: Scenario::from_settings(&config.settings) }
        }

        fn core(&mut self) -> &mut SensorCore {
            &mut self.core
        }

        fn tick(&mut self, now_ms: u64, make: u32, every_ms: u32) -> Vec<Reading> {
            let (id, segment) = (self.core.sensor_id(), self.core.segment());
            let (scenario, clock) = (self.scenario, &mut self.clock);
            self.core.tick_with(now_ms, make, every_ms, |_, at_ms| {
                let elapsed = at_ms.saturating_sub(clock.started_ms);
                let mut rng = Rng::new(clock.rng_state);
                let speed = scenario.speed(id, segment, elapsed, &mut rng);
                clock.rng_state = rng.state();
                speed
            })
        }

        fn snapshot(&mut self) -> Vec<u8> {
            self.clock.encode(&self.core.snapshot())
        }

        /// Takes its own snapshots and the built-in sensor's (whose traffic
        /// it replaces with the scenario from then on).
        fn restore(bytes: &[u8], config: &SensorConfig, now_ms: u64) -> Result<Self, String> {
            let (clock, core_bytes) = ScenarioClock::decode(bytes)?;
            let core = restore_core(core_bytes, config)?;
            let clock = clock.unwrap_or_else(|| ScenarioClock::new(now_ms, core.incarnation()));
            Ok(ScenarioSensor { core, clock, scenario: Scenario::from_settings(&config.settings) })
        }
    }

    fog_sensor::export_sensor!("../../wit", ScenarioSensor);
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
        assert!(!s.jammed(0, 0, 9_999));
        assert!(s.jammed(0, 0, 10_000));
        assert!(!s.jammed(3, 0, 10_000), "sensor 3 is reached 6 s later");
        assert!(s.jammed(3, 0, 16_000));
        assert!(!s.jammed(0, 0, 15_000), "the jam has passed sensor 0");
        assert!(!s.jammed(0, 0, 1_000_000), "without jam-every there is one jam");
    }

    #[test]
    fn the_jam_travels_segment_by_segment() {
        let s = Scenario::from_settings(&settings(&[("jam-at", "10"), ("jam-for", "20"), ("segment-wave-s", "15")]));
        // Each sensor of a segment is reached at once, whatever its id.
        for id in [1, 5, 9] {
            assert!(s.jammed(id, 0, 10_000) && !s.jammed(id, 1, 10_000));
        }
        let jammed_at = |t: u64| (0..4).filter(|seg| s.jammed(1, *seg, t)).collect::<Vec<u32>>();
        assert_eq!(jammed_at(9_000), Vec::<u32>::new());
        assert_eq!(jammed_at(12_000), vec![0]);
        assert_eq!(jammed_at(27_000), vec![0, 1], "the wave spans two segments");
        assert_eq!(jammed_at(35_000), vec![1]);
        assert_eq!(jammed_at(58_000), vec![2, 3]);
        assert_eq!(jammed_at(80_000), Vec::<u32>::new(), "it has left the last segment");
    }

    #[test]
    fn a_recurring_jam_comes_back_every_period() {
        let s = Scenario::from_settings(&settings(&[("jam-at", "10"), ("jam-for", "5"), ("jam-every", "30"), ("segment-wave-s", "2")]));
        let jammed: Vec<u64> = (0..100).filter(|t| s.jammed(7, 1, t * 1000)).collect();
        // Segment 1 is reached 2 s after jam-at, then every 30 s, for 5 s each time.
        assert_eq!(jammed, vec![12, 13, 14, 15, 16, 42, 43, 44, 45, 46, 72, 73, 74, 75, 76]);
        let once = Scenario::from_settings(&settings(&[("jam-at", "10"), ("jam-for", "5"), ("jam-every", "0")]));
        assert_eq!((0..100).filter(|t| once.jammed(7, 0, t * 1000)).count(), 5, "jam-every=0: a single jam");
        let always = Scenario::from_settings(&settings(&[("jam-at", "1"), ("jam-for", "5"), ("jam-every", "5")]));
        assert!((1..1000).all(|t| always.jammed(0, 0, t * 1000)), "a period no longer than the jam never clears");
        let bad = Scenario::from_settings(&settings(&[("jam-every", "often"), ("segment-wave-s", "-1")]));
        assert_eq!((bad.jam_every_ms, bad.wave_ms_per_segment), (0, 0));
    }

    #[test]
    fn speeds_follow_the_script_within_the_noise() {
        let s = Scenario::from_settings(&settings(&[("jam-at", "1"), ("jam-for", "1"), ("noise-kmh", "3")]));
        let mut rng = Rng::new(9);
        for _ in 0..1000 {
            assert!((107..=113).contains(&s.speed(1, 0, 0, &mut rng)));
            assert!((22..=28).contains(&s.speed(1, 0, 1_500, &mut rng)));
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
