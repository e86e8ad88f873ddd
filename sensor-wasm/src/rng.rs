//! Deterministic randomness and hashing for the sensor: splitmix64 as both
//! the PRNG and the 64-bit mixer behind incarnations, the congestion
//! schedule and the averages digest.
//!
//! Hand-written rather than the `rand` crate because the component should
//! stay a few tens of kilobytes and every draw must be reproducible from a
//! seed (tests, snapshots, replays).

/// The splitmix64 increment (2^64 / golden ratio).
const GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;

pub use fog_core::mix64;

/// A splitmix64 stream. Its state is a plain counter, so any value (even 0)
/// is a valid state and it round-trips through a snapshot as one `u64`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rng {
    state: u64,
}

impl Rng {
    pub fn new(state: u64) -> Self {
        Rng { state }
    }

    pub fn state(&self) -> u64 {
        self.state
    }

    pub fn next_u64(&mut self) -> u64 {
        let current = self.state;
        self.state = current.wrapping_add(GAMMA);
        mix64(current)
    }

    /// Uniform in `[0, 1)` with 53 bits of precision.
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Approximately standard normal: the Irwin–Hall sum of four uniforms,
    /// rescaled. Bounded at ±3.46 σ, which suits speeds (no absurd outliers)
    /// and needs no `ln`/`cos`, keeping libm out of the component.
    pub fn normal(&mut self) -> f64 {
        let sum = self.unit() + self.unit() + self.unit() + self.unit();
        (sum - 2.0) * 1.732_050_807_568_877_2
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mix_matches_reference_splitmix64() {
        // First output of the reference splitmix64 seeded with 0.
        assert_eq!(Rng::new(0).next_u64(), 0xE220_A839_7B1D_CDAF);
        assert_ne!(mix64(0), 0);
    }

    #[test]
    fn normal_has_unit_variance_and_zero_mean() {
        let mut rng = Rng::new(42);
        let n = 100_000;
        let xs: Vec<f64> = (0..n).map(|_| rng.normal()).collect();
        let mean = xs.iter().sum::<f64>() / n as f64;
        let var = xs.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / n as f64;
        assert!(mean.abs() < 0.02, "mean {mean}");
        assert!((var - 1.0).abs() < 0.03, "variance {var}");
    }
}
