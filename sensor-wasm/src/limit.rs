//! The advisory speed limit: a step function of the segment's mean speed,
//! with hysteresis so a mean hovering at a threshold does not make the sign
//! flap between two limits every second.

/// The limits a sign can show, fastest first. A fresh sensor shows 130.
pub const LIMIT_STEPS_KMH: [u32; 5] = [130, 120, 100, 80, 60];
/// `THRESHOLDS_KMH[i]` separates step `i` from step `i + 1`: a mean of
/// 100 km/h or more is free flow (130), below 55 km/h is heavy congestion (60).
pub const THRESHOLDS_KMH: [f32; 4] = [100.0, 90.0, 75.0, 55.0];
/// The mean must cross a threshold by this much to change the step.
pub const HYSTERESIS_KMH: f32 = 3.0;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct AdvisoryLimit {
    /// Index into [`LIMIT_STEPS_KMH`].
    step: usize,
}

impl AdvisoryLimit {
    pub fn kmh(&self) -> u32 {
        LIMIT_STEPS_KMH[self.step]
    }

    /// The limit showing `kmh`, if that is one of the steps (snapshots store
    /// the km/h, which is what an operator reads).
    pub fn from_kmh(kmh: u32) -> Option<Self> {
        LIMIT_STEPS_KMH
            .iter()
            .position(|s| *s == kmh)
            .map(|step| AdvisoryLimit { step })
    }

    /// Moves to the step for `mean_kmh`: down while the mean is below the
    /// current step's lower threshold minus the band, up while it is above
    /// the next step's threshold plus the band. A non-finite mean changes
    /// nothing.
    pub fn update(&mut self, mean_kmh: f32) -> u32 {
        if mean_kmh.is_finite() {
            while self.step < THRESHOLDS_KMH.len()
                && mean_kmh < THRESHOLDS_KMH[self.step] - HYSTERESIS_KMH
            {
                self.step += 1;
            }
            while self.step > 0 && mean_kmh >= THRESHOLDS_KMH[self.step - 1] + HYSTERESIS_KMH {
                self.step -= 1;
            }
        }
        self.kmh()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_follow_the_mean() {
        let mut limit = AdvisoryLimit::default();
        assert_eq!(limit.kmh(), 130);
        assert_eq!(limit.update(105.0), 130);
        assert_eq!(limit.update(97.5), 130, "inside the band below 100");
        assert_eq!(limit.update(96.9), 120);
        assert_eq!(limit.update(102.5), 120, "inside the band above 100");
        assert_eq!(limit.update(103.0), 130);
        assert_eq!(limit.update(96.0), 120);
        assert_eq!(limit.update(80.0), 100);
        assert_eq!(limit.update(60.0), 80);
        assert_eq!(limit.update(20.0), 60);
        // A jump skips steps at once, both ways.
        assert_eq!(limit.update(110.0), 130);
        assert_eq!(limit.update(30.0), 60);
        assert_eq!(limit.update(f32::NAN), 60);
        assert_eq!(limit.update(f32::INFINITY), 60);
    }

    #[test]
    fn a_mean_hovering_at_a_threshold_does_not_flap() {
        let mut limit = AdvisoryLimit::default();
        limit.update(88.0);
        assert_eq!(limit.kmh(), 120);
        // Wobbling ±2.5 km/h around 90 keeps the current step...
        let shown: Vec<u32> = (0..100)
            .map(|i| limit.update(if i % 2 == 0 { 87.5 } else { 92.5 }))
            .collect();
        assert!(shown.iter().all(|k| *k == 120), "{shown:?}");
        // ...and only a real move past the band changes it, once.
        let shown: Vec<u32> = (0..100)
            .map(|i| limit.update(if i % 2 == 0 { 86.9 } else { 92.5 }))
            .collect();
        assert_eq!(shown.iter().filter(|k| **k == 120).count(), 0, "{shown:?}");
        assert!(shown.iter().all(|k| *k == 100));
    }

    #[test]
    fn every_step_round_trips_through_kmh() {
        for kmh in LIMIT_STEPS_KMH {
            assert_eq!(AdvisoryLimit::from_kmh(kmh).map(|l| l.kmh()), Some(kmh));
        }
        assert_eq!(AdvisoryLimit::from_kmh(110), None);
    }
}
