//! Exactly-once counting of readings, keyed by `(sensor_id, incarnation,
//! seq)`, with memory bounded by a dedup horizon.
//!
//! Per sensor incarnation the ledger keeps a contiguous watermark (every
//! `seq < next_seq` is counted) and the counted seqs above it, which fold
//! into the watermark as the gaps fill. A reading sent again — after a lost
//! ack, a timeout or a failover — is recognised and not counted twice.
//! The acks built here are what lets a sensor drop readings from its resend
//! buffer: cumulative up to the watermark, selective above it.
//!
//! **The dedup horizon.** A reading stamped more than the horizon before
//! the server's clock (the time of the log entry that carries it) is acked
//! but never counted: it is *expired*. That one rule is what makes the
//! ledgers compactable without ever counting a reading twice:
//! - a ledger whose newest reading is older than the horizon can only see
//!   expired readings from now on, so it is *retired*: dropped, its count
//!   and sum kept in the totals ([`Ingest::retired`]);
//! - a sensor stamps its readings in seq order, so a gap above the
//!   watermark whose next counted reading is older than the horizon can
//!   only be filled by expired readings: compaction closes it.
//!
//! So the ledgers hold at most the incarnations heard from within the
//! horizon, each with at most a horizon's worth of seqs above its
//! watermark. Compaction runs with the record time of every published
//! average, so every replica compacts at the same log positions.
//!
//! **Readings from outside are bounded.** Anyone who can send a batch can
//! claim any seq and timestamp for a sensor, so what a reading may do to a
//! ledger is limited:
//! - an expired reading is acked and counted as expired but never moves a
//!   watermark (one reading stamped 0 with seq 2^62 would otherwise make
//!   every later reading of the sensor a "duplicate");
//! - [`Ingest::refusal`] refuses, before anything is logged, a seq at or
//!   above [`MAX_SEQ`], a seq further than [`MAX_SEQ_AHEAD`] above an
//!   incarnation's watermark (compaction would otherwise move the
//!   watermark over the whole range once the reading ages), and a
//!   timestamp further ahead of the server's clock than the allowed skew
//!   (such a reading would sit in a ledger, never expire, and keep it from
//!   being retired).

use std::collections::{BTreeMap, HashMap};

use fog_protocol::{MAX_SEQ, Reading, Refusal, SensorAck, SensorCount};
use serde::{Deserialize, Serialize};

/// Identifies one run of one sensor: its seqs start again when this changes.
pub type SensorKey = (u32, u64);

/// The default dedup horizon: far beyond any resend horizon of a host (see
/// the README's *Durability and failover*).
pub const DEFAULT_DEDUP_HORIZON_MS: u64 = 60 * 60 * 1_000;

/// How far above an incarnation's watermark a reading's seq may be.
///
/// A sensor keeps every reading no server has acked in its resend buffer,
/// and every seq below the oldest one it keeps is counted, so while nothing
/// overflows a legit reading is at most the buffer bound above the
/// watermark: fog-host's `--max-buffered` defaults to 100 000. This is 40
/// times that, for operators who raise it and sensors that overflowed. A
/// forged seq within it can at worst, once compaction closes the gap below
/// it, make this many of the sensor's later readings look like duplicates;
/// beyond it the reading is refused ([`Refusal::SeqOutOfRange`]).
pub const MAX_SEQ_AHEAD: u64 = 4_000_000;

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Ledger {
    next_seq: u64,
    /// Counted seqs above the watermark, with their timestamps.
    above: BTreeMap<u64, u64>,
    count: u64,
    sum_kmh: u64,
    /// The newest timestamp of any reading counted in this ledger.
    newest_ms: u64,
}

impl Ledger {
    fn contains(&self, seq: u64) -> bool {
        seq < self.next_seq || self.above.contains_key(&seq)
    }

    fn insert(&mut self, seq: u64, timestamp_ms: u64) {
        if seq == self.next_seq {
            self.next_seq = self.next_seq.saturating_add(1);
            self.fold();
        } else {
            self.above.insert(seq, timestamp_ms);
        }
    }

    /// Moves the watermark over the seqs above it that are now contiguous.
    fn fold(&mut self) {
        while self.above.remove(&self.next_seq).is_some() {
            self.next_seq = self.next_seq.saturating_add(1);
        }
    }

    /// Every seq up to `seq` is expired: nothing below it can count again.
    /// Only compaction calls it, with a seq this ledger counted.
    fn expire_through(&mut self, seq: u64) {
        if seq >= self.next_seq {
            self.next_seq = seq.saturating_add(1);
            self.above = self.above.split_off(&self.next_seq);
            self.fold();
        }
    }

    /// Closes gaps whose next counted reading is older than `oldest_ms`:
    /// the readings missing below it are older still.
    fn close_expired_gaps(&mut self, oldest_ms: u64) {
        while let Some((&seq, &ts)) = self.above.first_key_value() {
            if ts >= oldest_ms {
                break;
            }
            self.expire_through(seq);
        }
    }
}

/// The seqs one sensor incarnation counted ([`Ingest::counted_of`]).
pub struct Counted<'a>(Option<&'a Ledger>);

impl Counted<'_> {
    pub fn contains(&self, seq: u64) -> bool {
        self.0.is_some_and(|l| l.contains(seq))
    }
}

/// Incarnations compacted away, in total.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Retired {
    pub incarnations: u64,
    pub count: u64,
    pub sum_kmh: u64,
}

/// The counted readings of every sensor incarnation heard from within the
/// dedup horizon, and totals of the ones retired.
///
/// It is part of the replicated state; `duplicates` is not (each node counts
/// the resends it saw itself).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Ingest {
    #[serde(skip, default = "default_horizon")]
    horizon_ms: u64,
    ledgers: HashMap<SensorKey, Ledger>,
    counted: u64,
    expired: u64,
    retired: Retired,
    #[serde(skip)]
    duplicates: u64,
}

fn default_horizon() -> u64 {
    DEFAULT_DEDUP_HORIZON_MS
}

impl Default for Ingest {
    fn default() -> Self {
        Self::new(DEFAULT_DEDUP_HORIZON_MS)
    }
}

impl Ingest {
    pub fn new(horizon_ms: u64) -> Self {
        Ingest {
            horizon_ms,
            ledgers: HashMap::new(),
            counted: 0,
            expired: 0,
            retired: Retired::default(),
            duplicates: 0,
        }
    }

    /// Puts the dedup horizon on a ledger loaded from a snapshot.
    pub fn set_horizon(&mut self, horizon_ms: u64) {
        self.horizon_ms = horizon_ms;
    }

    /// Why `reading` of `key`, arriving at `now_ms`, must not be accepted
    /// at all (not acked, not counted, not logged), if it must not: a seq
    /// out of range, or a timestamp more than `max_clock_skew_ms` ahead.
    pub fn refusal(&self, now_ms: u64, max_clock_skew_ms: u64, key: SensorKey, reading: &Reading) -> Option<Refusal> {
        self.refusal_of(now_ms, max_clock_skew_ms, self.watermark(key), reading)
    }

    /// Every seq below it is counted, for an incarnation with a ledger.
    /// One look-up for all the readings of a sensor in a batch.
    pub fn watermark(&self, key: SensorKey) -> Option<u64> {
        self.ledgers.get(&key).map(|l| l.next_seq)
    }

    /// [`Ingest::refusal`], with the incarnation's [`Ingest::watermark`].
    pub fn refusal_of(&self, now_ms: u64, max_clock_skew_ms: u64, watermark: Option<u64>, reading: &Reading) -> Option<Refusal> {
        if reading.seq >= MAX_SEQ {
            return Some(Refusal::SeqOutOfRange);
        }
        if reading.timestamp_ms < now_ms.saturating_sub(self.horizon_ms) {
            // Expired: acked, and harmless whatever its seq.
            return None;
        }
        if watermark.is_some_and(|w| reading.seq.saturating_sub(w) > MAX_SEQ_AHEAD) {
            return Some(Refusal::SeqOutOfRange);
        }
        if reading.timestamp_ms > now_ms.saturating_add(max_clock_skew_ms) {
            return Some(Refusal::FromTheFuture);
        }
        None
    }

    /// Counts `reading`, arrived at `now_ms`, unless it was counted before
    /// or is expired; returns whether it is new (and so belongs in the
    /// averages). An expired reading is acked but changes no ledger: its
    /// seq and timestamp say nothing anyone can rely on.
    pub fn admit(&mut self, now_ms: u64, key: SensorKey, reading: &Reading) -> bool {
        let mut new = false;
        self.admit_all(now_ms, key, std::slice::from_ref(reading), |_| new = true);
        new
    }

    /// [`Ingest::admit`] for each of `readings` of `key`, in order, with
    /// one look-up of the ledger; `new` is called with each reading that
    /// is new.
    pub fn admit_all(&mut self, now_ms: u64, key: SensorKey, readings: &[Reading], mut new: impl FnMut(&Reading)) {
        let oldest = now_ms.saturating_sub(self.horizon_ms);
        // A seq out of range was refused before it was logged: never here
        // but from a log written by a server that did not refuse it.
        let (mut counted, mut expired, mut duplicates) = (0u64, 0u64, 0u64);
        // The ledger is made only for a reading that may count: the ones
        // before it are out of range or expired.
        let first = readings.iter().position(|r| r.seq < MAX_SEQ && r.timestamp_ms >= oldest).unwrap_or(readings.len());
        expired += readings[..first].iter().filter(|r| r.seq < MAX_SEQ).count() as u64;
        if first < readings.len() {
            let ledger = self.ledgers.entry(key).or_default();
            for reading in &readings[first..] {
                if reading.seq >= MAX_SEQ {
                    continue;
                }
                if reading.timestamp_ms < oldest {
                    expired += 1;
                    continue;
                }
                if ledger.contains(reading.seq) {
                    duplicates += 1;
                    continue;
                }
                ledger.insert(reading.seq, reading.timestamp_ms);
                ledger.count = ledger.count.saturating_add(1);
                ledger.sum_kmh = ledger.sum_kmh.saturating_add(u64::from(reading.speed_kmh));
                ledger.newest_ms = ledger.newest_ms.max(reading.timestamp_ms);
                counted += 1;
                new(reading);
            }
        }
        self.counted = self.counted.saturating_add(counted);
        self.expired = self.expired.saturating_add(expired);
        self.duplicates = self.duplicates.saturating_add(duplicates);
    }

    /// Compacts the ledgers as of `now_ms`: closes gaps that can no longer
    /// fill and retires incarnations whose readings are all expired.
    pub fn compact(&mut self, now_ms: u64) {
        let oldest = now_ms.saturating_sub(self.horizon_ms);
        let retired = &mut self.retired;
        self.ledgers.retain(|_, ledger| {
            if ledger.newest_ms < oldest {
                retired.incarnations = retired.incarnations.saturating_add(1);
                retired.count = retired.count.saturating_add(ledger.count);
                retired.sum_kmh = retired.sum_kmh.saturating_add(ledger.sum_kmh);
                return false;
            }
            ledger.close_expired_gaps(oldest);
            true
        });
    }

    /// Whether `seq` of `key` was counted before.
    pub fn contains(&self, key: SensorKey, seq: u64) -> bool {
        self.counted_of(key).contains(seq)
    }

    /// What `key` counted: one look-up for the readings of a batch.
    pub fn counted_of(&self, key: SensorKey) -> Counted<'_> {
        Counted(self.ledgers.get(&key))
    }

    /// Counts `n` readings that arrived again and were not counted again.
    pub fn note_duplicates(&mut self, n: u64) {
        self.duplicates = self.duplicates.saturating_add(n);
    }

    /// The ack for a batch of `key` that carried `seqs`: the watermark, plus
    /// the batch's seqs above it (all counted or expired by now).
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

    /// Unique readings counted, over all sensors (retired ones included).
    pub fn counted(&self) -> u64 {
        self.counted
    }

    /// Readings received again and not counted again.
    pub fn duplicates(&self) -> u64 {
        self.duplicates
    }

    /// Readings older than the dedup horizon: acked, never counted.
    pub fn expired(&self) -> u64 {
        self.expired
    }

    /// Incarnations compacted away, with what they counted.
    pub fn retired(&self) -> Retired {
        self.retired
    }

    /// Sensor incarnations with a ledger.
    pub fn incarnations(&self) -> usize {
        self.ledgers.len()
    }

    /// Seqs held above the watermarks, over all ledgers.
    pub fn seqs_above_watermarks(&self) -> usize {
        self.ledgers.values().map(|l| l.above.len()).sum()
    }

    /// What was counted per sensor incarnation still in a ledger, ordered
    /// by key.
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

    const T0: u64 = 1_700_000_000_000;

    fn r(seq: u64, speed: u16) -> Reading {
        Reading {
            seq,
            speed_kmh: speed,
            timestamp_ms: T0 + seq,
        }
    }

    fn feed(ingest: &mut Ingest, key: SensorKey, seqs: &[u64]) -> SensorAck {
        for &s in seqs {
            ingest.admit(T0, key, &r(s, 100));
        }
        ingest.ack(key, seqs.iter().copied())
    }

    #[test]
    fn resends_are_not_counted_twice() {
        let mut ing = Ingest::default();
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
        let mut ing = Ingest::default();
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
        let mut ing = Ingest::default();
        let ack = feed(&mut ing, (2, 1), &[9, 9, 9]);
        assert_eq!(ing.counted(), 1);
        assert_eq!(ing.duplicates(), 2);
        assert_eq!(ack.also, vec![9]);
    }

    #[test]
    fn a_new_incarnation_is_counted_separately() {
        let mut ing = Ingest::default();
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
        let mut ing = Ingest::default();
        feed(&mut ing, (1, 1), &[0, 1]);
        assert_eq!(ing.ack((1, 1), []).next_seq, 2);
        assert_eq!(ing.ack((9, 9), []).next_seq, 0);
    }

    const HOUR: u64 = 60 * 60 * 1_000;

    fn at(seq: u64, timestamp_ms: u64) -> Reading {
        Reading { seq, speed_kmh: 100, timestamp_ms }
    }

    #[test]
    fn an_incarnation_silent_past_the_horizon_is_retired_and_its_resends_are_not_counted_again() {
        let mut ing = Ingest::new(HOUR);
        let key = (1, 7);
        for seq in 0..10 {
            assert!(ing.admit(T0, key, &at(seq, T0)));
        }
        ing.compact(T0 + HOUR);
        assert_eq!(ing.incarnations(), 1, "kept while within the horizon");
        ing.compact(T0 + HOUR + 1);
        assert_eq!(ing.incarnations(), 0, "retired once all its readings are past the horizon");
        assert_eq!(ing.retired(), Retired { incarnations: 1, count: 10, sum_kmh: 1_000 });
        assert_eq!(ing.counted(), 10, "retired readings stay counted");
        // The sensor resends (a host restarted from an old state dir): the
        // readings are older than the horizon, so they are acked, not counted.
        for seq in 0..10 {
            assert!(!ing.admit(T0 + HOUR + 2, key, &at(seq, T0)));
        }
        let ack = ing.ack(key, 0..10);
        assert_eq!(ack.also, (0..10).collect::<Vec<_>>(), "expired readings are acked: {ack:?}");
        assert_eq!(ing.incarnations(), 0, "expired readings bring no ledger back");
        assert_eq!(ing.counted(), 10);
        assert_eq!(ing.expired(), 10);
    }

    #[test]
    fn a_reading_within_the_horizon_is_never_counted_twice_however_late_it_comes_back() {
        let mut ing = Ingest::new(HOUR);
        let key = (1, 7);
        assert!(ing.admit(T0, key, &at(0, T0)));
        // Compaction every second for most of the horizon keeps the ledger.
        for s in 1..3_500 {
            ing.compact(T0 + s * 1_000);
        }
        assert!(!ing.admit(T0 + 3_500_000, key, &at(0, T0)), "a resend within the horizon is a duplicate");
        assert_eq!((ing.counted(), ing.duplicates(), ing.expired()), (1, 1, 0));
    }

    #[test]
    fn a_gap_that_can_no_longer_fill_is_closed_after_the_horizon() {
        let mut ing = Ingest::new(HOUR);
        let key = (2, 1);
        // Seqs 0..5 were counted by a ledger retired long ago; the sensor
        // comes back with fresh readings from seq 5 on.
        let t = T0 + 3 * HOUR;
        for seq in 5..20 {
            ing.admit(t + seq, key, &at(seq, t + seq));
        }
        assert_eq!(ing.ack(key, []).next_seq, 0);
        assert_eq!(ing.seqs_above_watermarks(), 15, "waiting for 0..5");
        ing.compact(t + HOUR);
        assert_eq!(ing.seqs_above_watermarks(), 15, "the gap may still fill within the horizon");
        ing.compact(t + 5 + HOUR + 1);
        assert_eq!(ing.ack(key, []).next_seq, 20, "the gap closed and the seqs above folded in");
        assert_eq!(ing.seqs_above_watermarks(), 0);
        assert_eq!(ing.counted(), 15);
        assert!(!ing.admit(t + 5 + HOUR + 2, key, &at(2, t - 1)), "a reading from the gap is expired");
    }

    #[test]
    fn an_endless_run_of_restarting_sensors_keeps_the_ledgers_bounded() {
        let mut ing = Ingest::new(HOUR);
        let mut generated = 0;
        // 100 sensors, each restarting (a new incarnation) every 10 minutes,
        // one reading every 10 s, for 24 hours; compaction every second.
        let mut most = 0;
        for tick in 0..(24 * 360) {
            let now = T0 + tick * 10_000;
            for sensor in 0..100u32 {
                let incarnation = tick / 60;
                let seq = tick % 60;
                assert!(ing.admit(now, (sensor, incarnation), &at(seq, now)));
                generated += 1;
            }
            for s in 0..10 {
                ing.compact(now + s * 1_000);
            }
            most = most.max(ing.incarnations());
        }
        // A new incarnation every 10 minutes; the horizon keeps about 6 of
        // each sensor's.
        assert!(most <= 100 * 8, "{most} incarnations held at once");
        assert_eq!(ing.counted(), generated);
        let held: u64 = ing.per_sensor().iter().map(|c| c.count).sum();
        assert_eq!(held + ing.retired().count, generated, "nothing lost by compaction");
        assert_eq!(ing.retired().incarnations as usize + ing.incarnations(), 100 * 24 * 6);
    }

    #[test]
    fn an_expired_reading_moves_no_watermark_whatever_its_seq() {
        let mut ing = Ingest::new(HOUR);
        let key = (1, 7);
        let now = T0 + 2 * HOUR;
        for seq in 0..3 {
            assert!(ing.admit(now, key, &at(seq, now)));
        }
        for poison in [at(1 << 40, 0), at(MAX_SEQ - 1, 0), at(u64::MAX, 0), at(1 << 62, now - HOUR - 1)] {
            assert!(!ing.admit(now, key, &poison));
        }
        assert_eq!(ing.ack(key, []).next_seq, 3, "the watermark stayed");
        assert!(ing.admit(now, key, &at(3, now)), "the sensor's next reading counts");
        // Seqs at or above MAX_SEQ are not even expired: refused before a
        // log, ignored in one.
        assert_eq!((ing.counted(), ing.duplicates(), ing.expired()), (4, 0, 2));
    }

    #[test]
    fn seqs_out_of_range_and_readings_from_the_future_are_refused() {
        let mut ing = Ingest::new(HOUR);
        let key = (1, 7);
        let now = T0 + 2 * HOUR;
        const SKEW: u64 = 60_000;
        for seq in 0..3 {
            ing.admit(now, key, &at(seq, now));
        }
        let refusal = |r: Reading| ing.refusal(now, SKEW, key, &r);
        assert_eq!(refusal(at(MAX_SEQ, now)), Some(Refusal::SeqOutOfRange));
        assert_eq!(refusal(at(u64::MAX, 0)), Some(Refusal::SeqOutOfRange), "even expired");
        assert_eq!(refusal(at(1 << 62, now)), Some(Refusal::SeqOutOfRange));
        assert_eq!(refusal(at(3 + MAX_SEQ_AHEAD + 1, now)), Some(Refusal::SeqOutOfRange));
        assert_eq!(refusal(at(3 + MAX_SEQ_AHEAD, now)), None);
        assert_eq!(refusal(at(3 + MAX_SEQ_AHEAD + 1, 0)), None, "expired: acked, harmless");
        assert_eq!(refusal(at(3, now + SKEW + 1)), Some(Refusal::FromTheFuture));
        assert_eq!(refusal(at(3, u64::MAX)), Some(Refusal::FromTheFuture));
        assert_eq!(refusal(at(3, now + SKEW)), None);
        // An incarnation without a ledger (new, or retired) may start
        // anywhere below MAX_SEQ: a sensor restored from its state resumes
        // its seqs.
        assert_eq!(ing.refusal(now, SKEW, (2, 1), &at(MAX_SEQ - 1, now)), None);
        // A seq at the very top would wrap `seq + 1`; never counted.
        assert!(!ing.admit(now, (3, 1), &at(u64::MAX, now)));
        assert_eq!(ing.ack((3, 1), []).next_seq, 0);
    }
}
