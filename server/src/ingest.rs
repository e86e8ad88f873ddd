//! Exactly-once counting of readings, keyed by `(sensor_id, incarnation,
//! seq)`.
//!
//! Per sensor incarnation the ledger keeps a contiguous watermark (every
//! `seq < next_seq` is counted) and the set of counted seqs above it, which
//! folds into the watermark as the gaps fill. A reading sent again — after a
//! lost ack, a timeout or a failover — is recognised and not counted twice.
//! The acks built here are what lets a sensor drop readings from its resend
//! buffer: cumulative up to the watermark, selective above it.

use std::collections::{BTreeSet, HashMap};

use fog_protocol::{Reading, SensorAck, SensorCount};
use serde::{Deserialize, Serialize};

/// Identifies one run of one sensor: its seqs start again when this changes.
pub type SensorKey = (u32, u64);

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Ledger {
    next_seq: u64,
    above: BTreeSet<u64>,
    count: u64,
    sum_kmh: u64,
}

impl Ledger {
    fn contains(&self, seq: u64) -> bool {
        seq < self.next_seq || self.above.contains(&seq)
    }

    fn insert(&mut self, seq: u64) {
        if seq == self.next_seq {
            self.next_seq += 1;
            while self.above.remove(&self.next_seq) {
                self.next_seq += 1;
            }
        } else {
            self.above.insert(seq);
        }
    }
}

/// The counted readings of every sensor incarnation.
///
/// It is part of the replicated state; `duplicates` is not (each node counts
/// the resends it saw itself).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Ingest {
    ledgers: HashMap<SensorKey, Ledger>,
    counted: u64,
    #[serde(skip)]
    duplicates: u64,
}

impl Ingest {
    pub fn new() -> Self {
        Self::default()
    }

    /// Counts `reading` unless it was counted before; returns whether it is
    /// new (and so belongs in the averages).
    pub fn admit(&mut self, key: SensorKey, reading: &Reading) -> bool {
        let ledger = self.ledgers.entry(key).or_default();
        if ledger.contains(reading.seq) {
            self.duplicates += 1;
            return false;
        }
        ledger.insert(reading.seq);
        ledger.count += 1;
        ledger.sum_kmh += u64::from(reading.speed_kmh);
        self.counted += 1;
        true
    }

    /// Whether `seq` of `key` was counted before.
    pub fn contains(&self, key: SensorKey, seq: u64) -> bool {
        self.ledgers.get(&key).is_some_and(|l| l.contains(seq))
    }

    /// Counts `n` readings that arrived again and were not counted again.
    pub fn note_duplicates(&mut self, n: u64) {
        self.duplicates += n;
    }

    /// The ack for a batch of `key` that carried `seqs`: the watermark, plus
    /// the batch's seqs above it (all counted by now).
    pub fn ack(&self, key: SensorKey, seqs: impl IntoIterator<Item = u64>) -> SensorAck {
        let next_seq = self.ledgers.get(&key).map_or(0, |l| l.next_seq);
        let mut also: Vec<u64> = seqs.into_iter().filter(|&s| s >= next_seq).collect();
        also.sort_unstable();
        also.dedup();
        SensorAck {
            sensor_id: key.0,
            incarnation: key.1,
            next_seq,
            also,
        }
    }

    /// Unique readings counted, over all sensors.
    pub fn counted(&self) -> u64 {
        self.counted
    }

    /// Readings received again and not counted again.
    pub fn duplicates(&self) -> u64 {
        self.duplicates
    }

    /// What was counted per sensor incarnation, ordered by key.
    pub fn per_sensor(&self) -> Vec<SensorCount> {
        let mut out: Vec<SensorCount> = self
            .ledgers
            .iter()
            .map(|(&(sensor_id, incarnation), l)| SensorCount {
                sensor_id,
                incarnation,
                count: l.count,
                sum_kmh: l.sum_kmh,
            })
            .collect();
        out.sort_unstable_by_key(|c| (c.sensor_id, c.incarnation));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(seq: u64, speed: u16) -> Reading {
        Reading {
            seq,
            speed_kmh: speed,
            timestamp_ms: 1_000 + seq,
        }
    }

    fn feed(ingest: &mut Ingest, key: SensorKey, seqs: &[u64]) -> SensorAck {
        for &s in seqs {
            ingest.admit(key, &r(s, 100));
        }
        ingest.ack(key, seqs.iter().copied())
    }

    #[test]
    fn resends_are_not_counted_twice() {
        let mut ing = Ingest::new();
        let key = (1, 7);
        feed(&mut ing, key, &[0, 1, 2]);
        let ack = feed(&mut ing, key, &[0, 1, 2, 3]);
        assert_eq!(ing.counted(), 4);
        assert_eq!(ing.duplicates(), 3);
        assert_eq!(
            ack,
            SensorAck {
                sensor_id: 1,
                incarnation: 7,
                next_seq: 4,
                also: vec![]
            }
        );
        assert_eq!(ing.per_sensor()[0].sum_kmh, 400);
    }

    #[test]
    fn out_of_order_readings_ack_selectively_then_cumulatively() {
        let mut ing = Ingest::new();
        let key = (1, 7);
        let ack = feed(&mut ing, key, &[3, 5, 1]);
        assert_eq!(ack.next_seq, 0);
        assert_eq!(ack.also, vec![1, 3, 5]);
        let ack = feed(&mut ing, key, &[0, 2]);
        assert_eq!(ack.next_seq, 4, "0..=3 contiguous now");
        assert_eq!(ack.also, Vec::<u64>::new());
        let ack = feed(&mut ing, key, &[4, 6]);
        assert_eq!(ack.next_seq, 7, "the set above the watermark folds in");
        assert_eq!(ing.counted(), 7);
        assert_eq!(ing.duplicates(), 0);
    }

    #[test]
    fn duplicates_within_one_batch_count_once() {
        let mut ing = Ingest::new();
        let ack = feed(&mut ing, (2, 1), &[9, 9, 9]);
        assert_eq!(ing.counted(), 1);
        assert_eq!(ing.duplicates(), 2);
        assert_eq!(ack.also, vec![9]);
    }

    #[test]
    fn a_new_incarnation_is_counted_separately() {
        let mut ing = Ingest::new();
        feed(&mut ing, (1, 100), &[0, 1, 2]);
        let ack = feed(&mut ing, (1, 200), &[0, 1]);
        assert_eq!(ack.incarnation, 200);
        assert_eq!(ack.next_seq, 2);
        assert_eq!(ing.counted(), 5);
        let per = ing.per_sensor();
        assert_eq!(per.len(), 2);
        assert_eq!((per[0].incarnation, per[0].count), (100, 3));
        assert_eq!((per[1].incarnation, per[1].count), (200, 2));
    }

    #[test]
    fn an_empty_batch_reports_the_watermark() {
        let mut ing = Ingest::new();
        feed(&mut ing, (1, 1), &[0, 1]);
        assert_eq!(ing.ack((1, 1), []).next_seq, 2);
        assert_eq!(ing.ack((9, 9), []).next_seq, 0);
    }
}
