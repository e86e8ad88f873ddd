//! The averages a sensor receives: applied strictly in server-sequence
//! order, folded into a digest, and turned into the advisory limit.
//!
//! The server resends whatever follows the cursor a sensor acked, so the
//! same average may arrive several times and a reply may start before or
//! after the sensor's position. Applying only `last + 1` makes that
//! harmless: duplicates are skipped, and after a gap (an average the host
//! lost) the sensor stops, acks what it has, and gets the rest again.

use crate::limit::AdvisoryLimit;
use crate::rng::mix64;

/// A published (or revised) average of one road segment over the 5 s window
/// ending at `window_end_ms`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Average {
    /// The server's global, gap-free average sequence number.
    pub seq: u64,
    pub segment: u32,
    pub window_end_ms: u64,
    pub count: u32,
    pub mean_kmh: f32,
    /// 0 for the first publication of a window, n for its n-th revision.
    pub revision: u32,
}

/// Which window of its own segment the limit currently reflects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct WindowVersion {
    pub(crate) window_end_ms: u64,
    pub(crate) revision: u32,
}

#[derive(Debug, Clone, PartialEq)]
pub struct AverageStream {
    pub(crate) segment: u32,
    pub(crate) last_seq: Option<u64>,
    pub(crate) applied: u64,
    pub(crate) missed: u64,
    pub(crate) digest: u64,
    pub(crate) newest_own: Option<WindowVersion>,
    pub(crate) limit: AdvisoryLimit,
}

impl AverageStream {
    pub fn new(segment: u32) -> Self {
        AverageStream {
            segment,
            last_seq: None,
            applied: 0,
            missed: 0,
            digest: 0,
            newest_own: None,
            limit: AdvisoryLimit::default(),
        }
    }

    /// The highest average sequence applied or skipped: what to ack.
    pub fn last_seq(&self) -> Option<u64> {
        self.last_seq
    }

    pub fn applied(&self) -> u64 {
        self.applied
    }

    pub fn missed(&self) -> u64 {
        self.missed
    }

    /// Equal digests mean the same averages were applied in the same order.
    pub fn digest(&self) -> u64 {
        self.digest
    }

    pub fn limit_kmh(&self) -> u32 {
        self.limit.kmh()
    }

    /// Applies the averages that continue the sequence, in order; a fresh
    /// sensor starts wherever the server's stream starts. Stops at the first
    /// gap. Returns the position to ack.
    pub fn apply(&mut self, averages: &[Average]) -> Option<u64> {
        for avg in averages {
            let expected = match self.last_seq {
                None => avg.seq,
                Some(last) if avg.seq <= last => continue,
                Some(last) => match last.checked_add(1) {
                    Some(next) => next,
                    None => break,
                },
            };
            if avg.seq != expected {
                break;
            }
            self.apply_one(avg);
        }
        self.last_seq
    }

    fn apply_one(&mut self, avg: &Average) {
        for field in [
            avg.seq,
            u64::from(avg.segment),
            avg.window_end_ms,
            u64::from(avg.count),
            u64::from(avg.revision),
            u64::from(avg.mean_kmh.to_bits()),
        ] {
            self.digest = mix64(self.digest ^ field);
        }
        self.last_seq = Some(avg.seq);
        self.applied = self.applied.saturating_add(1);

        if avg.segment != self.segment {
            return;
        }
        let version = WindowVersion {
            window_end_ms: avg.window_end_ms,
            revision: avg.revision,
        };
        let newer = self.newest_own.is_none_or(|cur| {
            (version.window_end_ms, version.revision) > (cur.window_end_ms, cur.revision)
        });
        if newer {
            self.newest_own = Some(version);
            // An empty window says nothing about speed: keep the sign as is.
            if avg.count > 0 {
                self.limit.update(avg.mean_kmh);
            }
        }
    }

    /// The server no longer holds averages `from..=to`: skip past them,
    /// counting every sequence number jumped over. Nothing changes if the
    /// sensor is already past `to` (a stale notice) or the range is empty.
    pub fn skip(&mut self, from: u64, to: u64) -> Option<u64> {
        if from > to {
            return self.last_seq;
        }
        let first_skipped = match self.last_seq {
            Some(last) if last >= to => return self.last_seq,
            Some(last) => last + 1,
            None => from,
        };
        self.missed = self
            .missed
            .saturating_add((to - first_skipped).saturating_add(1));
        self.last_seq = Some(to);
        self.last_seq
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn avg(seq: u64, segment: u32, window_end_ms: u64, revision: u32, mean_kmh: f32) -> Average {
        Average {
            seq,
            segment,
            window_end_ms,
            count: 10,
            mean_kmh,
            revision,
        }
    }

    fn stream(seqs: std::ops::RangeInclusive<u64>) -> Vec<Average> {
        seqs.map(|s| avg(s, 0, s * 1000, 0, 100.0 + s as f32))
            .collect()
    }

    #[test]
    fn applies_in_order_skipping_duplicates_and_stopping_at_a_gap() {
        let mut s = AverageStream::new(0);
        assert_eq!(s.apply(&[]), None);
        // A fresh sensor accepts the first average whatever its seq.
        assert_eq!(s.apply(&stream(5..=7)), Some(7));
        assert_eq!(s.apply(&stream(3..=8)), Some(8), "overlap skipped");
        let mut gappy = stream(9..=10);
        gappy.extend(stream(12..=13));
        assert_eq!(s.apply(&gappy), Some(10), "stops before the gap at 11");
        assert_eq!(s.apply(&stream(11..=13)), Some(13));
        assert_eq!(s.applied(), 9);
    }

    #[test]
    fn equal_streams_give_equal_digests_however_they_were_delivered() {
        let mut whole = AverageStream::new(0);
        whole.apply(&stream(0..=20));
        let mut pieces = AverageStream::new(0);
        for chunk in [0..=4, 2..=9, 9..=9, 15..=20, 10..=16, 17..=20] {
            pieces.apply(&stream(chunk));
        }
        assert_eq!(pieces.last_seq(), Some(20));
        assert_eq!(whole.digest(), pieces.digest());
        assert_ne!(whole.digest(), 0);

        let mut revised = AverageStream::new(0);
        let mut other = stream(0..=20);
        other[7].revision = 1;
        revised.apply(&other);
        assert_ne!(whole.digest(), revised.digest());
        let mut shorter = AverageStream::new(0);
        shorter.apply(&stream(0..=19));
        assert_ne!(whole.digest(), shorter.digest());
    }

    #[test]
    fn missed_averages_are_skipped_and_counted() {
        let mut s = AverageStream::new(0);
        s.apply(&stream(0..=3));
        assert_eq!(s.skip(4, 9), Some(9));
        assert_eq!(s.missed(), 6);
        assert_eq!(s.skip(2, 8), Some(9), "stale notice");
        assert_eq!(s.skip(9, 3), Some(9), "empty range");
        assert_eq!(s.missed(), 6);
        // Overlapping what was applied: only the part beyond counts.
        assert_eq!(s.skip(5, 12), Some(12));
        assert_eq!(s.missed(), 9);
        assert_eq!(s.apply(&stream(12..=14)), Some(14));
        assert_eq!(s.applied(), 6);

        let mut fresh = AverageStream::new(0);
        assert_eq!(fresh.skip(10, 19), Some(19));
        assert_eq!(fresh.missed(), 10);
        assert_eq!(fresh.skip(0, u64::MAX), Some(u64::MAX));
        assert_eq!(
            fresh.apply(&stream(0..=3)),
            Some(u64::MAX),
            "nothing follows u64::MAX"
        );
    }

    #[test]
    fn limit_follows_the_newest_window_of_the_own_segment() {
        let mut s = AverageStream::new(2);
        assert_eq!(s.limit_kmh(), 130);
        s.apply(&[avg(0, 2, 10_000, 0, 80.0)]);
        assert_eq!(s.limit_kmh(), 100);
        // Another segment's jam is not ours.
        s.apply(&[avg(1, 7, 11_000, 0, 40.0)]);
        assert_eq!(s.limit_kmh(), 100);
        // A revision of an older window does not override a newer one...
        s.apply(&[avg(2, 2, 11_000, 0, 81.0), avg(3, 2, 10_000, 1, 40.0)]);
        assert_eq!(s.limit_kmh(), 100);
        // ...but a revision of the newest window does.
        s.apply(&[avg(4, 2, 11_000, 1, 110.0)]);
        assert_eq!(s.limit_kmh(), 130);
        // An empty window keeps the sign.
        s.apply(&[Average {
            count: 0,
            ..avg(5, 2, 12_000, 0, 0.0)
        }]);
        assert_eq!(s.limit_kmh(), 130);
    }
}
