//! The resend buffer: every reading the sensor generated and no server has
//! acked yet, with when it was last sent.
//!
//! The sensor, not the host, decides what to resend and when, so a host can
//! stay a dumb pipe and a restored sensor resends exactly what is still
//! unacked. The buffer is bounded; dropping the oldest reading on overflow is
//! counted, never silent, so `generated == acked + buffered + overflowed`
//! holds at all times.

use std::collections::VecDeque;

pub use fog_core::Reading;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Pending {
    pub(crate) reading: Reading,
    pub(crate) last_sent_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResendBuffer {
    /// In ascending `seq` order: readings are pushed in order and only ever
    /// removed.
    pub(crate) pending: VecDeque<Pending>,
    pub(crate) resend_after_ms: u64,
    pub(crate) max_buffered: u32,
    pub(crate) acked: u64,
    pub(crate) resent: u64,
    pub(crate) overflowed: u64,
    /// A lower bound of every pending `last_sent_ms`: while it is not due,
    /// nothing is, and a tick costs O(1) instead of a scan of the buffer.
    pub(crate) earliest_sent_ms: u64,
}

impl ResendBuffer {
    pub fn new(resend_after_ms: u64, max_buffered: u32) -> Self {
        ResendBuffer {
            pending: VecDeque::new(),
            resend_after_ms,
            max_buffered,
            acked: 0,
            resent: 0,
            overflowed: 0,
            earliest_sent_ms: u64::MAX,
        }
    }

    pub fn len(&self) -> usize {
        self.pending.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    /// Readings acked while buffered, each once.
    pub fn acked(&self) -> u64 {
        self.acked
    }

    pub fn resent(&self) -> u64 {
        self.resent
    }

    pub fn overflowed(&self) -> u64 {
        self.overflowed
    }

    /// Appends every reading due for resending at `now_ms` to `out` and
    /// marks it sent now.
    pub fn take_due(&mut self, now_ms: u64, out: &mut Vec<Reading>) {
        if now_ms.saturating_sub(self.earliest_sent_ms) < self.resend_after_ms {
            return;
        }
        let mut earliest = u64::MAX;
        for p in &mut self.pending {
            // A clock that stepped back makes nothing due (saturating).
            if now_ms.saturating_sub(p.last_sent_ms) >= self.resend_after_ms {
                p.last_sent_ms = now_ms;
                self.resent = self.resent.saturating_add(1);
                out.push(p.reading);
            }
            earliest = earliest.min(p.last_sent_ms);
        }
        self.earliest_sent_ms = earliest;
    }

    /// Keeps a reading that is being sent for the first time at `now_ms`.
    pub fn push(&mut self, reading: Reading, now_ms: u64) {
        self.pending.push_back(Pending {
            reading,
            last_sent_ms: now_ms,
        });
        self.earliest_sent_ms = self.earliest_sent_ms.min(now_ms);
        self.trim();
    }

    /// Forgets the readings with `seq < next_seq` and those in `also`;
    /// readings already forgotten are not counted again.
    pub fn ack(&mut self, next_seq: u64, also: &[u64]) {
        let before = self.pending.len();
        // Pending is sorted, so the cumulative part is a prefix.
        while self
            .pending
            .front()
            .is_some_and(|p| p.reading.seq < next_seq)
        {
            self.pending.pop_front();
        }
        if !also.is_empty() && !self.pending.is_empty() {
            // Look each selective ack up in the sorted buffer and sweep once:
            // O(also · log n + n), with no sort (and no sort code in the
            // component) for a list the host hands over unsorted.
            let mut hit = vec![false; self.pending.len()];
            for seq in also {
                if let Ok(i) = self.pending.binary_search_by_key(seq, |p| p.reading.seq) {
                    hit[i] = true;
                }
            }
            let mut index = 0;
            self.pending.retain(|_| {
                index += 1;
                !hit[index - 1]
            });
        }
        self.acked = self
            .acked
            .saturating_add((before - self.pending.len()) as u64);
    }

    /// Applies a new resend timeout and bound (a host restoring a sensor
    /// brings its own); a smaller bound drops the oldest readings, counted.
    pub fn set_policy(&mut self, resend_after_ms: u64, max_buffered: u32) {
        self.resend_after_ms = resend_after_ms;
        self.max_buffered = max_buffered;
        self.trim();
    }

    fn trim(&mut self) {
        while self.pending.len() > self.max_buffered as usize {
            self.pending.pop_front();
            self.overflowed = self.overflowed.saturating_add(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reading(seq: u64) -> Reading {
        Reading {
            seq,
            speed_kmh: 100,
            timestamp_ms: seq * 1000,
        }
    }

    fn seqs(buf: &ResendBuffer) -> Vec<u64> {
        buf.pending.iter().map(|p| p.reading.seq).collect()
    }

    fn due(buf: &mut ResendBuffer, now: u64) -> Vec<u64> {
        let mut out = Vec::new();
        buf.take_due(now, &mut out);
        out.iter().map(|r| r.seq).collect()
    }

    #[test]
    fn resends_only_after_the_timeout_and_then_again_after_another() {
        let mut buf = ResendBuffer::new(1000, 10);
        buf.push(reading(0), 0);
        buf.push(reading(1), 500);
        assert_eq!(due(&mut buf, 999), Vec::<u64>::new());
        assert_eq!(due(&mut buf, 1000), vec![0]);
        assert_eq!(due(&mut buf, 1499), Vec::<u64>::new());
        assert_eq!(due(&mut buf, 1500), vec![1]);
        assert_eq!(due(&mut buf, 2000), vec![0]);
        assert_eq!(buf.resent(), 3);
        // A clock stepping back resends nothing.
        assert_eq!(due(&mut buf, 10), Vec::<u64>::new());
    }

    #[test]
    fn cumulative_and_selective_acks_count_each_reading_once() {
        let mut buf = ResendBuffer::new(1000, 10);
        for seq in 0..6 {
            buf.push(reading(seq), 0);
        }
        buf.ack(2, &[4, 4, 9]);
        assert_eq!(seqs(&buf), vec![2, 3, 5]);
        assert_eq!(buf.acked(), 3);
        buf.ack(2, &[4]);
        buf.ack(1, &[]);
        assert_eq!(buf.acked(), 3, "a repeated ack counts nothing");
        buf.ack(6, &[]);
        assert!(buf.is_empty());
        assert_eq!(buf.acked(), 6);
        assert_eq!(due(&mut buf, 5000), Vec::<u64>::new());
    }

    #[test]
    fn overflow_drops_the_oldest_and_counts_it() {
        let mut buf = ResendBuffer::new(1000, 3);
        for seq in 0..5 {
            buf.push(reading(seq), seq);
        }
        assert_eq!(seqs(&buf), vec![2, 3, 4]);
        assert_eq!(buf.overflowed(), 2);
        buf.set_policy(1000, 1);
        assert_eq!(seqs(&buf), vec![4]);
        assert_eq!(buf.overflowed(), 4);
    }
}
