//! The traffic model: where a sensor's speeds come from.
//!
//! A reading is the speed of one passing car. It is the stream speed of the
//! road plus a little per-car spread, and the stream speed is an
//! Ornstein–Uhlenbeck walk (mean-reverting, about 20 s memory) towards a
//! target: normally the free-flow speed, which itself drifts slowly (about
//! 10 min memory), and during a congestion episode a much lower jam speed.
//! Consecutive readings are therefore correlated, as on a real road, and the
//! model steps by the elapsed clock time so it does not care how often the
//! host ticks.
//!
//! Congestion episodes are a pure function of `(road seed, time slot)`, with
//! the road seed derived from the host's seed and the segment (not the
//! sensor): sensors of one segment started by the same host see the same
//! jams at the same time, so the segment's average, and with it the advisory
//! limit, actually moves.

use crate::rng::{Rng, mix64};

/// Default speed range, as in the reference prototype.
pub const DEFAULT_MIN_KMH: u16 = 70;
pub const DEFAULT_MAX_KMH: u16 = 120;
/// Highest `max-kmh` accepted; above that a setting is surely a typo.
const MAX_SETTING_KMH: u16 = 400;

/// Memory of the stream speed, seconds.
const SPEED_TAU_S: f64 = 20.0;
/// Memory of the free-flow speed, seconds.
const FREE_FLOW_TAU_S: f64 = 600.0;
/// Where free flow settles, as a fraction of the range above `min`.
const FREE_FLOW_LEVEL: f64 = 0.7;
/// Stationary spreads as fractions of the range (4 km/h, 4 km/h and
/// 2.5 km/h for 70–120).
const FREE_FLOW_SD: f64 = 0.08;
const STREAM_SD: f64 = 0.08;
const VEHICLE_SD: f64 = 0.05;
/// Congestion schedule: time is cut into slots; a slot starts an episode
/// with probability `EPISODE_START_PER_MILLE`/1000, lasting 2–8 slots
/// (1–4 min), so roughly a fifth of the time some jam is on.
const SLOT_MS: u64 = 30_000;
const EPISODE_START_PER_MILLE: u64 = 40;
const EPISODE_MIN_SLOTS: u64 = 2;
const EPISODE_MAX_SLOTS: u64 = 8;
/// Jam speeds lie in the lowest 40 % of the range.
const JAM_DEPTH: f64 = 0.4;
/// Longest clock step the model takes in one go; beyond it the walk has
/// forgotten its past anyway (several memories), so the cap changes nothing
/// but keeps the arithmetic tame after a suspended host wakes up.
const MAX_STEP_S: f64 = 3600.0;

/// The speeds a sensor reports, inclusive, from the `min-kmh`/`max-kmh`
/// settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpeedRange {
    pub min_kmh: u16,
    pub max_kmh: u16,
}

impl Default for SpeedRange {
    fn default() -> Self {
        SpeedRange {
            min_kmh: DEFAULT_MIN_KMH,
            max_kmh: DEFAULT_MAX_KMH,
        }
    }
}

/// Why the settings could not be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SettingsError {
    /// `key=value` where value is not a whole number of km/h up to 400.
    NotASpeed { key: String, value: String },
    /// `min-kmh` is not below `max-kmh`.
    EmptyRange { min_kmh: u16, max_kmh: u16 },
}

impl std::fmt::Display for SettingsError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SettingsError::NotASpeed { key, value } => write!(
                f,
                "setting {key}=\"{value}\" is not a speed in km/h (0..={MAX_SETTING_KMH})"
            ),
            SettingsError::EmptyRange { min_kmh, max_kmh } => {
                write!(f, "min-kmh={min_kmh} is not below max-kmh={max_kmh}")
            }
        }
    }
}

impl std::error::Error for SettingsError {}

impl SpeedRange {
    /// Reads `min-kmh` and `max-kmh`; other keys belong to other sensor
    /// implementations and are ignored. A later duplicate key wins, as in
    /// most `key=value` configurations.
    pub fn from_settings(settings: &[(String, String)]) -> Result<SpeedRange, SettingsError> {
        let mut range = SpeedRange::default();
        for (key, value) in settings {
            let slot = match key.as_str() {
                "min-kmh" => &mut range.min_kmh,
                "max-kmh" => &mut range.max_kmh,
                _ => continue,
            };
            *slot = value
                .trim()
                .parse::<u16>()
                .ok()
                .filter(|v| *v <= MAX_SETTING_KMH)
                .ok_or_else(|| SettingsError::NotASpeed {
                    key: key.clone(),
                    value: value.clone(),
                })?;
        }
        if range.min_kmh >= range.max_kmh {
            return Err(SettingsError::EmptyRange {
                min_kmh: range.min_kmh,
                max_kmh: range.max_kmh,
            });
        }
        Ok(range)
    }

    fn span(&self) -> f64 {
        f64::from(self.max_kmh - self.min_kmh)
    }

    fn at(&self, fraction: f64) -> f64 {
        f64::from(self.min_kmh) + fraction * self.span()
    }

    /// A reported speed: rounded to whole km/h and inside the range.
    fn clamp(&self, kmh: f64) -> u16 {
        // `as` saturates and maps NaN to 0, which `max` then lifts to min.
        (kmh.round() as u16).max(self.min_kmh).min(self.max_kmh)
    }

    /// Keeps a model speed within `[at(low), max]`. `max`/`min` rather than
    /// `f64::clamp`, whose panic message drags float formatting (~20 KB)
    /// into the component.
    fn bound(&self, low: f64, kmh: f64) -> f64 {
        kmh.max(self.at(low)).min(f64::from(self.max_kmh))
    }
}

/// The state of one sensor's road. Everything in it round-trips through a
/// snapshot, so a restored sensor continues the same walk.
#[derive(Debug, Clone, PartialEq)]
pub struct TrafficModel {
    pub(crate) range: SpeedRange,
    pub(crate) rng: Rng,
    /// Shared by the sensors of one segment under one host seed.
    pub(crate) road_seed: u64,
    pub(crate) free_flow_kmh: f64,
    pub(crate) stream_kmh: f64,
    /// Clock time of the last step; the next step covers the time since.
    pub(crate) last_ms: u64,
    /// What the last step worked out that the next is likely to need again.
    pub(crate) known: Known,
}

/// Values a step derives from its inputs alone, kept for the next step:
/// readings come at a steady interval (the same decays) and for 30 s the
/// same congestion slot (the same jam speed), and working them out again
/// (two `exp` and eight hashes) is most of what a reading costs. Not part
/// of the state: a model equals another with the same state whatever each
/// has kept, and a restored one works them out afresh.
#[derive(Debug, Clone, Default)]
pub(crate) struct Known {
    /// The congestion slot and its jam speed.
    jam: Option<(u64, Option<f64>)>,
    /// A step's length in ms and its free-flow and stream decays.
    decays: Option<(u64, Decay, Decay)>,
}

impl PartialEq for Known {
    fn eq(&self, _: &Known) -> bool {
        true
    }
}

/// One exact Ornstein–Uhlenbeck step's factors for a given step length:
/// how much of the distance to the mean is kept, and the noise's scale.
#[derive(Debug, Clone, Copy)]
struct Decay {
    kept: f64,
    noise: f64,
}

impl Decay {
    fn new(dt_s: f64, tau_s: f64) -> Decay {
        let kept = (-dt_s / tau_s).exp();
        Decay { kept, noise: (1.0 - kept * kept).sqrt() }
    }
}

impl TrafficModel {
    pub fn new(range: SpeedRange, sensor_seed: u64, road_seed: u64, now_ms: u64) -> Self {
        let mut rng = Rng::new(sensor_seed);
        let free_flow_kmh = range.at(FREE_FLOW_LEVEL) + FREE_FLOW_SD * range.span() * rng.normal();
        let target = jam_speed(range, road_seed, now_ms / SLOT_MS).unwrap_or(free_flow_kmh);
        let stream_kmh = target + STREAM_SD * range.span() * rng.normal();
        TrafficModel {
            range,
            rng,
            road_seed,
            free_flow_kmh,
            stream_kmh,
            last_ms: now_ms,
            known: Known::default(),
        }
    }

    /// The speed of the next car passing at `now_ms`.
    pub fn next_speed(&mut self, now_ms: u64) -> u16 {
        // A clock that steps back (NTP) is treated as no time passing.
        let dt_ms = now_ms.saturating_sub(self.last_ms);
        self.last_ms = self.last_ms.max(now_ms);
        let (free_flow, stream) = match self.known.decays {
            Some((ms, free_flow, stream)) if ms == dt_ms => (free_flow, stream),
            _ => {
                let dt_s = (dt_ms as f64 / 1000.0).min(MAX_STEP_S);
                let decays = (Decay::new(dt_s, FREE_FLOW_TAU_S), Decay::new(dt_s, SPEED_TAU_S));
                self.known.decays = Some((dt_ms, decays.0, decays.1));
                decays
            }
        };
        let span = self.range.span();

        let free_flow_mean = self.range.at(FREE_FLOW_LEVEL);
        self.free_flow_kmh = self.range.bound(
            0.4,
            ou_step(&mut self.rng, self.free_flow_kmh, free_flow_mean, FREE_FLOW_SD * span, free_flow),
        );

        let slot = now_ms / SLOT_MS;
        let jam = match self.known.jam {
            Some((known, jam)) if known == slot => jam,
            _ => {
                let jam = jam_speed(self.range, self.road_seed, slot);
                self.known.jam = Some((slot, jam));
                jam
            }
        };
        let target = jam.unwrap_or(self.free_flow_kmh);
        self.stream_kmh = ou_step(&mut self.rng, self.stream_kmh, target, STREAM_SD * span, stream);
        // Keep the stream itself inside the range so a long clamp at a bound
        // does not leave it stuck far outside, where the readings would sit
        // flat on the bound.
        self.stream_kmh = self.range.bound(0.0, self.stream_kmh);

        self.range
            .clamp(self.stream_kmh + VEHICLE_SD * span * self.rng.normal())
    }
}

/// One exact Ornstein–Uhlenbeck step (its factors in `decay`): the distance
/// to `mean` shrinks by e^(−dt/τ) and noise keeps the stationary spread at
/// `sd`. Exact rather than Euler, so it is stable for any tick interval.
fn ou_step(rng: &mut Rng, x: f64, mean: f64, sd: f64, decay: Decay) -> f64 {
    mean + (x - mean) * decay.kept + sd * decay.noise * rng.normal()
}

/// The jam speed in congestion slot `slot` (of [`SLOT_MS`]) if an episode
/// is on, the deepest of overlapping ones.
fn jam_speed(range: SpeedRange, road_seed: u64, slot: u64) -> Option<f64> {
    let first = slot.saturating_sub(EPISODE_MAX_SLOTS - 1);
    (first..=slot)
        .filter_map(|start| {
            let h = mix64(road_seed ^ mix64(start));
            let starts = h % 1000 < EPISODE_START_PER_MILLE;
            let len = EPISODE_MIN_SLOTS + (h >> 16) % (EPISODE_MAX_SLOTS - EPISODE_MIN_SLOTS + 1);
            let depth = ((h >> 32) as f64 / (1u64 << 32) as f64) * JAM_DEPTH;
            (starts && start + len > slot).then(|| range.at(depth))
        })
        .min_by(f64::total_cmp)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    /// Speeds of one car per second for `n` seconds.
    fn run(range: SpeedRange, seed: u64, n: u64) -> Vec<u16> {
        let start = 1_700_000_000_000;
        let mut model = TrafficModel::new(range, seed, seed ^ 1, start);
        (1..=n)
            .map(|i| model.next_speed(start + i * 1000))
            .collect()
    }

    #[test]
    fn settings_default_to_the_reference_range() {
        assert_eq!(
            SpeedRange::from_settings(&[]),
            Ok(SpeedRange {
                min_kmh: 70,
                max_kmh: 120
            })
        );
        let custom = settings(&[("colour", "red"), ("min-kmh", " 30 "), ("max-kmh", "80")]);
        assert_eq!(
            SpeedRange::from_settings(&custom),
            Ok(SpeedRange {
                min_kmh: 30,
                max_kmh: 80
            })
        );
    }

    #[test]
    fn bad_settings_name_the_problem() {
        let err = SpeedRange::from_settings(&settings(&[("max-kmh", "fast")])).unwrap_err();
        assert_eq!(
            err.to_string(),
            "setting max-kmh=\"fast\" is not a speed in km/h (0..=400)"
        );
        assert!(SpeedRange::from_settings(&settings(&[("min-kmh", "-5")])).is_err());
        assert!(SpeedRange::from_settings(&settings(&[("max-kmh", "401")])).is_err());
        let err = SpeedRange::from_settings(&settings(&[("min-kmh", "130")])).unwrap_err();
        assert_eq!(
            err,
            SettingsError::EmptyRange {
                min_kmh: 130,
                max_kmh: 120
            }
        );
    }

    #[test]
    fn speeds_stay_in_range() {
        for (range, seed) in [
            (SpeedRange::default(), 1),
            (
                SpeedRange {
                    min_kmh: 10,
                    max_kmh: 11,
                },
                2,
            ),
        ] {
            let speeds = run(range, seed, 50_000);
            assert!(
                speeds
                    .iter()
                    .all(|s| (range.min_kmh..=range.max_kmh).contains(s))
            );
        }
    }

    #[test]
    fn speeds_vary_but_consecutive_readings_are_correlated() {
        let speeds: Vec<f64> = run(SpeedRange::default(), 7, 20_000)
            .into_iter()
            .map(f64::from)
            .collect();
        let n = speeds.len() as f64;
        let mean = speeds.iter().sum::<f64>() / n;
        let var = speeds.iter().map(|s| (s - mean).powi(2)).sum::<f64>() / n;
        let lag1 = speeds
            .windows(2)
            .map(|w| (w[0] - mean) * (w[1] - mean))
            .sum::<f64>()
            / (n - 1.0);
        let autocorrelation = lag1 / var;
        assert!(var.sqrt() > 3.0, "speeds barely vary: sd {}", var.sqrt());
        // White noise would give ~0.
        assert!(
            autocorrelation > 0.6,
            "lag-1 autocorrelation {autocorrelation}"
        );
        assert!((90.0..115.0).contains(&mean), "mean {mean}");
    }

    #[test]
    fn what_a_step_keeps_for_the_next_changes_no_speed() {
        let start = 1_700_000_000_000u64;
        let mut kept = TrafficModel::new(SpeedRange::default(), 3, 4, start);
        let mut afresh = kept.clone();
        let mut now = start;
        // Steady steps, uneven ones, a step back, and slots that change.
        for i in 0..20_000u64 {
            now = match i % 7 {
                5 => now + 1 + i % 5_000,
                6 => now.saturating_sub(3),
                _ => now + 250,
            };
            afresh.known = Known::default();
            assert_eq!(kept.next_speed(now), afresh.next_speed(now), "step {i}");
        }
        assert_eq!(kept.free_flow_kmh.to_bits(), afresh.free_flow_kmh.to_bits());
        assert_eq!(kept.stream_kmh.to_bits(), afresh.stream_kmh.to_bits());
    }

    #[test]
    fn congestion_episodes_come_and_go_and_slow_traffic_down() {
        let range = SpeedRange::default();
        let road = 99;
        let start = 1_700_000_000_000u64;
        let jammed: Vec<bool> = (0..24 * 3600)
            .step_by(30)
            .map(|s| jam_speed(range, road, (start + s * 1000) / SLOT_MS).is_some())
            .collect();
        let share = jammed.iter().filter(|j| **j).count() as f64 / jammed.len() as f64;
        assert!(
            (0.08..0.4).contains(&share),
            "jammed {:.0}% of the day",
            share * 100.0
        );

        let mut model = TrafficModel::new(range, 5, road, start);
        let (mut jam, mut free) = (Vec::new(), Vec::new());
        for s in 1..24 * 3600u64 {
            let now = start + s * 1000;
            let speed = f64::from(model.next_speed(now));
            // Judge only well inside a state, after the 20 s walk caught up.
            let settled = (0..60).all(|back| {
                jam_speed(range, road, (now - back * 1000) / SLOT_MS).is_some()
                    == jam_speed(range, road, now / SLOT_MS).is_some()
            });
            if settled {
                if jam_speed(range, road, now / SLOT_MS).is_some() {
                    jam.push(speed)
                } else {
                    free.push(speed)
                }
            }
        }
        let avg = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
        assert!(
            avg(&jam) + 15.0 < avg(&free),
            "jam {} vs free {}",
            avg(&jam),
            avg(&free)
        );
    }

    #[test]
    fn the_walk_is_reproducible_from_its_seed() {
        assert_eq!(
            run(SpeedRange::default(), 3, 500),
            run(SpeedRange::default(), 3, 500)
        );
        assert_ne!(
            run(SpeedRange::default(), 3, 500),
            run(SpeedRange::default(), 4, 500)
        );
    }

    #[test]
    fn clock_jumps_either_way_are_harmless() {
        let range = SpeedRange::default();
        let mut model = TrafficModel::new(range, 1, 2, 1_000_000);
        for now in [0, u64::MAX, 5, u64::MAX / 2, 1_000_000] {
            let speed = model.next_speed(now);
            assert!((70..=120).contains(&speed));
            assert!(model.stream_kmh.is_finite() && model.free_flow_kmh.is_finite());
        }
    }
}
