//! Sealed epochs: the proof, in a host's request, that an epoch it claims
//! was issued by a server of this pair.
//!
//! A server that hears of a newer epoch than its own steps down at once, so
//! a claimed epoch is a lever on which server serves. Hosts only repeat the
//! epochs servers told them, each with its [`Seal`]: a keyed BLAKE3 hash of
//! the epoch under a key only the two servers hold, truncated to 16 bytes.
//! A server believes a host's epoch only if the seal verifies; anything
//! else is a forgery (or garbage) that it ignores and counts.

use fog_protocol::Seal;

/// Seals and verifies epochs with the pair's key.
#[derive(Clone)]
pub struct EpochSeal {
    key: [u8; 32],
}

impl std::fmt::Debug for EpochSeal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("EpochSeal { key: <redacted> }")
    }
}

impl EpochSeal {
    pub fn new(key: [u8; 32]) -> Self {
        EpochSeal { key }
    }

    /// The seal of `epoch`: the first 16 bytes of its keyed BLAKE3 hash.
    pub fn seal(&self, epoch: u64) -> Seal {
        let hash = blake3::keyed_hash(&self.key, &epoch.to_le_bytes());
        let mut seal = [0; 16];
        seal.copy_from_slice(&hash.as_bytes()[..16]);
        seal
    }

    /// Whether `seal` is the seal of `epoch`. The comparison takes the same
    /// time wherever the bytes differ, so that timing replies does not let
    /// a forger find a seal byte by byte.
    pub fn verify(&self, epoch: u64, seal: &Seal) -> bool {
        let expected = self.seal(epoch);
        let diff = expected.iter().zip(seal.iter()).fold(0u8, |acc, (a, b)| acc | (a ^ b));
        std::hint::black_box(diff) == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_key_that_sealed_an_epoch_verifies_it() {
        let pair = EpochSeal::new([7; 32]);
        let other = EpochSeal::new([8; 32]);
        let seal = pair.seal(42);
        assert!(pair.verify(42, &seal));
        assert!(!pair.verify(43, &seal), "a seal names one epoch");
        assert!(!other.verify(42, &seal), "another key cannot make or check it");
        assert!(!pair.verify(42, &[0; 16]), "no seal is not a seal");
        let mut flipped = seal;
        flipped[15] ^= 1;
        assert!(!pair.verify(42, &flipped));
    }
}
