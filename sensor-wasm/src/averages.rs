//! The averages a sensor receives: applied strictly in server-sequence
//! order, checked against the server's hash chain, and turned into the
//! advisory limit.
//!
//! The server's published averages form a hash chain: every average carries
//! `chain`, the hash of the chain value before it and its own fields
//! ([`fog_core::Average::link`]). A sensor applies an average only if it continues
//! both its sequence (`last + 1`) and its chain, so its digest (the chain
//! value of the last average applied) names the whole stream it applied:
//! two sensors with the same cursor have applied the same averages.
//!
//! The server resends whatever follows the cursor a sensor acked, so the
//! same average may arrive several times and a reply may start before or
//! after the sensor's position. Applying only continuations makes that
//! harmless: duplicates are skipped, and after a gap (an average the host
//! lost) or a chain that does not continue its own, the sensor stops, acks
//! what it has, and the server sends the rest again or repositions it.
//!
//! A reposition ([`AverageStream::reposition`]) moves the cursor where the
//! server says: forward past averages it no longer holds (counted as
//! missed), or back to the point where a branch published by a server cut
//! off from its peer left the surviving log (the averages beyond it are
//! counted as superseded and the sensor then applies the surviving ones).

use crate::limit::AdvisoryLimit;
pub use fog_core::{Average, AverageCursor};

/// Which window of its own segment the limit currently reflects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct WindowVersion {
    pub(crate) window_end_ms: u64,
    pub(crate) revision: u32,
}

#[derive(Debug, Clone, PartialEq)]
pub struct AverageStream {
    pub(crate) segment: u32,
    pub(crate) last: Option<AverageCursor>,
    pub(crate) applied: u64,
    pub(crate) missed: u64,
    pub(crate) superseded: u64,
    pub(crate) newest_own: Option<WindowVersion>,
    pub(crate) limit: AdvisoryLimit,
}

impl AverageStream {
    pub fn new(segment: u32) -> Self {
        AverageStream {
            segment,
            last: None,
            applied: 0,
            missed: 0,
            superseded: 0,
            newest_own: None,
            limit: AdvisoryLimit::default(),
        }
    }

    /// The last average applied (or repositioned to): what to ack.
    pub fn cursor(&self) -> Option<AverageCursor> {
        self.last
    }

    pub fn last_seq(&self) -> Option<u64> {
        self.last.map(|c| c.seq)
    }

    pub fn applied(&self) -> u64 {
        self.applied
    }

    pub fn missed(&self) -> u64 {
        self.missed
    }

    /// Averages applied from a branch the servers abandoned after a split.
    pub fn superseded(&self) -> u64 {
        self.superseded
    }

    /// The chain value at the cursor: equal digests at equal sequence
    /// numbers mean the same stream.
    pub fn digest(&self) -> u64 {
        self.last.map_or(0, |c| c.chain)
    }

    pub fn limit_kmh(&self) -> u32 {
        self.limit.kmh()
    }

    /// Applies the averages that continue the sequence and the chain, in
    /// order; a fresh sensor starts wherever the server's stream starts and
    /// takes its chain value from there. Stops at the first average that
    /// does not continue. Returns the position to ack.
    pub fn apply(&mut self, averages: &[Average]) -> Option<AverageCursor> {
        for avg in averages {
            match self.last {
                None => {}
                Some(last) if avg.seq <= last.seq => continue,
                Some(last) => {
                    if last.seq.checked_add(1) != Some(avg.seq) || avg.link(last.chain) != avg.chain {
                        break;
                    }
                }
            }
            self.apply_one(avg);
        }
        self.last
    }

    fn apply_one(&mut self, avg: &Average) {
        self.last = Some(AverageCursor {
            seq: avg.seq,
            epoch: avg.epoch,
            chain: avg.chain,
        });
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
                self.limit.update(avg.mean_kmh());
            }
        }
    }

    /// The server moves this sensor to `to`. With `rewind_to: Some(r)`, the
    /// averages applied after seq `r` belong to an abandoned branch: they
    /// are counted as superseded. Whatever lies between the (rewound)
    /// position and `to` is no longer held by the server: counted as missed.
    /// A notice that would move a sensor backwards without a rewind is stale
    /// and changes nothing.
    pub fn reposition(&mut self, rewind_to: Option<u64>, to: AverageCursor) -> Option<AverageCursor> {
        let Some(last) = self.last else {
            self.last = Some(to);
            return self.last;
        };
        let base = match rewind_to {
            Some(r) if r < last.seq => {
                self.superseded = self.superseded.saturating_add(last.seq - r);
                // The limit follows the surviving branch's windows from here,
                // whatever revision numbers the abandoned one reached.
                self.newest_own = None;
                r
            }
            _ if to.seq <= last.seq => return self.last,
            _ => last.seq,
        };
        self.missed = self.missed.saturating_add(to.seq.saturating_sub(base));
        self.last = Some(to);
        self.last
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn avg(seq: u64, segment: u32, window_end_ms: u64, revision: u32, mean_kmh: f32) -> Average {
        Average {
            seq,
            epoch: 1,
            segment,
            window_end_ms,
            count: 10,
            sum_kmh: (mean_kmh * 10.0) as u64,
            revision,
            chain: 0,
        }
    }

    /// Sets every chain value as a server would, starting from `prev`.
    fn chained(mut averages: Vec<Average>, mut prev: u64) -> Vec<Average> {
        for a in &mut averages {
            a.chain = a.link(prev);
            prev = a.chain;
        }
        averages
    }

    /// One server log: seqs `1..=n` of epoch 1, then the rest in `epoch`.
    fn log(n: u64, fork_after: u64, epoch: u64) -> Vec<Average> {
        let raw = (1..=n)
            .map(|s| {
            let e = if s > fork_after { epoch } else { 1 };
            Average { epoch: e, ..avg(s, 0, s * 1000, 0, (100 + s + e) as f32) }
        })
            .collect();
        chained(raw, 0)
    }

    fn at(log: &[Average], seq: u64) -> AverageCursor {
        let a = log[(seq - 1) as usize];
        AverageCursor { seq, epoch: a.epoch, chain: a.chain }
    }

    fn span(log: &[Average], seqs: std::ops::RangeInclusive<u64>) -> Vec<Average> {
        log[(*seqs.start() - 1) as usize..*seqs.end() as usize].to_vec()
    }

    #[test]
    fn applies_in_order_skipping_duplicates_and_stopping_at_a_gap() {
        let log = log(13, 13, 1);
        let mut s = AverageStream::new(0);
        assert_eq!(s.apply(&[]), None);
        // A fresh sensor accepts the first average whatever its seq.
        assert_eq!(s.apply(&span(&log, 5..=7)), Some(at(&log, 7)));
        assert_eq!(s.apply(&span(&log, 3..=8)), Some(at(&log, 8)), "overlap skipped");
        let mut gappy = span(&log, 9..=10);
        gappy.extend(span(&log, 12..=13));
        assert_eq!(s.apply(&gappy), Some(at(&log, 10)), "stops before the gap at 11");
        assert_eq!(s.apply(&span(&log, 11..=13)), Some(at(&log, 13)));
        assert_eq!(s.applied(), 9);
        assert_eq!(s.digest(), log[12].chain);
    }

    #[test]
    fn the_digest_is_the_chain_so_equal_positions_mean_equal_streams() {
        let log = log(20, 20, 1);
        let mut whole = AverageStream::new(0);
        whole.apply(&log);
        let mut pieces = AverageStream::new(0);
        for chunk in [1..=4, 2..=9, 9..=9, 15..=20, 10..=16, 17..=20] {
            pieces.apply(&span(&log, chunk));
        }
        assert_eq!(pieces.cursor(), whole.cursor());
        assert_eq!(whole.digest(), log[19].chain);
        assert_ne!(whole.digest(), 0);
    }

    #[test]
    fn an_average_that_does_not_continue_the_chain_is_not_applied() {
        let ours = log(10, 5, 3);
        let theirs = log(10, 5, 4);
        assert_eq!(ours[4], theirs[4]);
        assert_ne!(ours[5].chain, theirs[5].chain);
        let mut s = AverageStream::new(0);
        s.apply(&span(&ours, 1..=7));
        assert_eq!(s.apply(&span(&theirs, 1..=10)), Some(at(&ours, 7)));
        let mut revised = span(&ours, 8..=8);
        revised[0].revision = 1;
        assert_eq!(s.apply(&revised), Some(at(&ours, 7)), "a changed field breaks the chain");
        assert_eq!(s.apply(&span(&ours, 8..=10)), Some(at(&ours, 10)));
    }

    #[test]
    fn a_rewind_drops_an_abandoned_branch_and_the_sensor_joins_the_survivor() {
        // Both servers agree up to seq 5; the one in epoch 3 was cut off and
        // published 6..=9, the survivor (epoch 4) published 6..=12.
        let loser = log(9, 5, 3);
        let winner = log(12, 5, 4);
        let mut on_loser = AverageStream::new(0);
        on_loser.apply(&loser);
        let mut on_winner = AverageStream::new(0);
        on_winner.apply(&winner);

        assert_eq!(on_loser.reposition(Some(5), at(&winner, 5)), Some(at(&winner, 5)));
        assert_eq!(on_loser.superseded(), 4);
        assert_eq!(on_loser.missed(), 0);
        on_loser.apply(&span(&winner, 6..=12));
        assert_eq!(on_loser.cursor(), on_winner.cursor());
        assert_eq!(on_loser.digest(), on_winner.digest());

        // A rewind past what the server still holds: back, then forward.
        let mut far = AverageStream::new(0);
        far.apply(&loser);
        assert_eq!(far.reposition(Some(5), at(&winner, 8)), Some(at(&winner, 8)));
        assert_eq!((far.superseded(), far.missed()), (4, 3));
        far.apply(&span(&winner, 9..=12));
        assert_eq!(far.digest(), on_winner.digest());
    }

    #[test]
    fn missed_averages_are_skipped_and_counted() {
        let log = log(20, 20, 1);
        let mut s = AverageStream::new(0);
        s.apply(&span(&log, 1..=4));
        assert_eq!(s.reposition(None, at(&log, 9)), Some(at(&log, 9)));
        assert_eq!(s.missed(), 5);
        assert_eq!(s.reposition(None, at(&log, 8)), Some(at(&log, 9)), "stale notice");
        assert_eq!(s.reposition(Some(12), at(&log, 9)), Some(at(&log, 9)), "nothing to rewind");
        assert_eq!((s.missed(), s.superseded()), (5, 0));
        assert_eq!(s.apply(&span(&log, 10..=14)), Some(at(&log, 14)));
        assert_eq!(s.applied(), 9);

        let mut fresh = AverageStream::new(0);
        assert_eq!(fresh.reposition(None, at(&log, 19)), Some(at(&log, 19)));
        assert_eq!(fresh.missed(), 0, "a sensor that applied nothing missed nothing");
        assert_eq!(fresh.apply(&span(&log, 18..=20)), Some(at(&log, 20)));
    }

    #[test]
    fn limit_follows_the_newest_window_of_the_own_segment() {
        let mut s = AverageStream::new(2);
        assert_eq!(s.limit_kmh(), 130);
        let stream = chained(
            vec![
                avg(1, 2, 10_000, 0, 80.0),
                // Another segment's jam is not ours.
                avg(2, 7, 11_000, 0, 40.0),
                // A revision of an older window does not override a newer one...
                avg(3, 2, 11_000, 0, 81.0),
                avg(4, 2, 10_000, 1, 40.0),
                // ...but a revision of the newest window does.
                avg(5, 2, 11_000, 1, 110.0),
                // An empty window keeps the sign.
                Average { count: 0, ..avg(6, 2, 12_000, 0, 0.0) },
            ],
            0,
        );
        let limits: Vec<u32> = stream
            .iter()
            .map(|a| {
                s.apply(std::slice::from_ref(a));
                s.limit_kmh()
            })
            .collect();
        assert_eq!(limits, vec![100, 100, 100, 100, 130, 130]);
    }
}
