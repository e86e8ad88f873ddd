//! The plain types of fog's domain and the one definition of the average
//! chain, shared by the sensors, the wire protocol and the servers, so that
//! there is one `Average` and one `link` everywhere.
//!
//! - [`Reading`]: one speed reading of one sensor, identified within its
//!   sensor incarnation by `seq`.
//! - [`Average`]: the mean speed of one road segment over a [`WINDOW_MS`]
//!   window in event time, published every [`HOP_MS`]; published averages
//!   form a hash chain ([`Average::link`]).
//! - [`AverageCursor`]: a position in that chain.
//!
//! No clock, no I/O, no dependencies (the `serde` feature only derives the
//! wire's traits).

/// A window covers this much event time.
pub const WINDOW_MS: u64 = 5_000;
/// A window is published (and the next begins) this often.
pub const HOP_MS: u64 = 1_000;

/// splitmix64 of `x`: a bijective, well-avalanching 64-bit mix. Adding the
/// increment first keeps 0 from being a fixed point, so chaining it over
/// zeros still moves.
pub fn mix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// One speed reading of one sensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct Reading {
    pub seq: u64,
    pub speed_kmh: u16,
    /// Event time, milliseconds since the Unix epoch.
    pub timestamp_ms: u64,
}

/// The average speed of one road segment over the [`WINDOW_MS`] window
/// ending at `window_end_ms` (exclusive), in event time.
///
/// The published averages form a hash chain: `chain` is
/// [`Average::link`] of the chain value before this average.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct Average {
    /// Global, gap-free average sequence number.
    pub seq: u64,
    /// The epoch of the active server that published it.
    pub epoch: u64,
    pub segment: u32,
    pub window_end_ms: u64,
    pub count: u32,
    pub sum_kmh: u64,
    /// 0 for the first publication of a window, n for its n-th revision
    /// (late readings arrived after it was published).
    pub revision: u32,
    /// The chain value after this average.
    pub chain: u64,
}

impl Average {
    /// The mean speed (0 for a window without readings).
    pub fn mean_kmh(&self) -> f32 {
        if self.count == 0 { 0.0 } else { self.sum_kmh as f32 / self.count as f32 }
    }

    /// The chain value that follows `prev` when this average is appended:
    /// `mix64` folded over `prev` and the fields seq, epoch, segment,
    /// window_end_ms, count, sum_kmh and revision, in that order, each
    /// widened to u64 (`h = mix64(h ^ field)`). The mean is derived from
    /// count and sum, so it is covered too. Servers publish with it and
    /// sensors check with it.
    pub fn link(&self, prev: u64) -> u64 {
        [
            self.seq,
            self.epoch,
            u64::from(self.segment),
            self.window_end_ms,
            u64::from(self.count),
            self.sum_kmh,
            u64::from(self.revision),
        ]
        .into_iter()
        .fold(prev, |h, field| mix64(h ^ field))
    }

    /// The position in the chain right after this average.
    pub fn cursor(&self) -> AverageCursor {
        AverageCursor { seq: self.seq, epoch: self.epoch, chain: self.chain }
    }
}

/// A position in the average stream: the last average applied, with its
/// epoch and the chain value after it. `seq` 0 with chain 0 is the position
/// before the first average a server ever publishes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct AverageCursor {
    pub seq: u64,
    pub epoch: u64,
    pub chain: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn average(seq: u64, prev: u64) -> Average {
        let mut a = Average { seq, epoch: 1, segment: 2, window_end_ms: 5_000 * seq, count: 10, sum_kmh: 1_000, revision: 0, chain: 0 };
        a.chain = a.link(prev);
        a
    }

    #[test]
    fn the_chain_covers_every_field_and_the_past() {
        let first = average(1, 0);
        let second = average(2, first.chain);
        assert_ne!(first.chain, second.chain);
        // Any field changed, or another past, gives another chain value.
        let base = second.link(first.chain);
        for changed in [
            Average { epoch: 2, ..second },
            Average { segment: 3, ..second },
            Average { count: 11, ..second },
            Average { sum_kmh: 1_001, ..second },
            Average { revision: 1, ..second },
            Average { window_end_ms: 1, ..second },
        ] {
            assert_ne!(changed.link(first.chain), base, "{changed:?}");
        }
        assert_ne!(second.link(first.chain ^ 1), base);
        assert_eq!(second.cursor(), AverageCursor { seq: 2, epoch: 1, chain: second.chain });
        assert_eq!(Average { count: 0, ..second }.mean_kmh(), 0.0);
        assert_eq!(second.mean_kmh(), 100.0);
    }

    #[test]
    fn the_fold_is_the_documented_one() {
        // The WIT spells this fold out for sensor authors; it must not drift.
        let a = average(1, 0);
        let mut h = 0u64;
        for f in [a.seq, a.epoch, u64::from(a.segment), a.window_end_ms, u64::from(a.count), a.sum_kmh, u64::from(a.revision)] {
            h = mix64(h ^ f);
        }
        assert_eq!(a.chain, h);
        assert_eq!(mix64(0), 0xE220_A839_7B1D_CDAF);
    }
}
