//! `SensorCore`: the whole sensor as a plain struct, fed with the host's
//! clock readings and messages and asked for what to send. No wit types, no
//! I/O, so it is unit-tested natively and the component glue stays thin.
//!
//! It ties together the traffic model (speeds), the resend buffer (what is
//! unacked), and the average stream (cursor, digest, advisory limit), and
//! owns the sensor's identity: id, segment and incarnation.

use crate::averages::{Average, AverageStream, AverageCursor};
use crate::resend::{Reading, ResendBuffer};
use crate::rng::mix64;
use crate::traffic::{SpeedRange, TrafficModel};

/// What the host tells a sensor about itself (the WIT `config`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SensorConfig {
    pub sensor_id: u32,
    pub segment: u32,
    /// Resend a reading that has not been acked after this long.
    pub resend_after_ms: u64,
    /// Most unacked readings kept.
    pub max_buffered: u32,
    /// `min-kmh` and `max-kmh` are read; other keys are ignored.
    pub settings: Vec<(String, String)>,
}

/// The counters a sensor reports (the WIT `status`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Status {
    pub incarnation: u64,
    pub generated: u64,
    pub acked: u64,
    pub buffered: u32,
    pub resent: u64,
    pub overflowed: u64,
    pub sum_kmh: u64,
    pub averages_applied: u64,
    /// The last average applied (or repositioned to).
    pub last_average: Option<AverageCursor>,
    pub averages_missed: u64,
    /// Averages applied from a branch the servers abandoned after a split.
    pub averages_superseded: u64,
    /// The chain value at `last_average` (0 before any).
    pub averages_digest: u64,
    pub limit_kmh: u32,
}

/// The incarnation of sensor `sensor_id` under the host seed `seed`: a new
/// seed (a new host process) gives every sensor a new incarnation, so a
/// sequence that restarts at 0 never collides with the previous one's. Never
/// 0, so a host may use 0 for "not initialised".
pub fn incarnation(seed: u64, sensor_id: u32) -> u64 {
    match mix64(seed ^ mix64(u64::from(sensor_id))) {
        0 => 1,
        id => id,
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct SensorCore {
    pub(crate) sensor_id: u32,
    /// Settings that could not be used, so the defaults are in force. `init`
    /// cannot fail in the WIT, so the sensor keeps running and the error is
    /// kept here for whoever inspects it.
    pub(crate) settings_error: Option<String>,
    pub(crate) incarnation: u64,
    pub(crate) next_seq: u64,
    pub(crate) generated: u64,
    pub(crate) sum_kmh: u64,
    pub(crate) traffic: TrafficModel,
    pub(crate) resend: ResendBuffer,
    pub(crate) averages: AverageStream,
}

impl SensorCore {
    /// A sensor starting afresh at `now_ms`. Invalid speed settings fall
    /// back to the default range (see [`SensorCore::settings_error`]).
    pub fn new(config: &SensorConfig, seed: u64, now_ms: u64) -> Self {
        let (range, settings_error) = match SpeedRange::from_settings(&config.settings) {
            Ok(range) => (range, None),
            Err(e) => (SpeedRange::default(), Some(e.to_string())),
        };
        let incarnation = incarnation(seed, config.sensor_id);
        // The walk is the sensor's own; the jams belong to the road segment.
        let sensor_seed = mix64(incarnation ^ 0x7261_6666_6963); // "raffic"
        let road_seed = mix64(seed ^ mix64(u64::from(config.segment) ^ 0x726f_6164)); // "road"
        SensorCore {
            sensor_id: config.sensor_id,
            settings_error,
            incarnation,
            next_seq: 0,
            generated: 0,
            sum_kmh: 0,
            traffic: TrafficModel::new(range, sensor_seed, road_seed, now_ms),
            resend: ResendBuffer::new(config.resend_after_ms, config.max_buffered),
            averages: AverageStream::new(config.segment),
        }
    }

    pub fn sensor_id(&self) -> u32 {
        self.sensor_id
    }

    pub fn segment(&self) -> u32 {
        self.averages.segment
    }

    pub fn incarnation(&self) -> u64 {
        self.incarnation
    }

    pub fn speed_range(&self) -> SpeedRange {
        self.traffic.range
    }

    /// Why the speed settings were rejected, if they were.
    pub fn settings_error(&self) -> Option<&str> {
        self.settings_error.as_deref()
    }

    /// Readings to send at `now_ms`: those due for resending, in `seq`
    /// order, then `make` new ones, the last stamped `now_ms` and each
    /// earlier one `every_ms` before the next (the WIT `visit`).
    pub fn tick(&mut self, now_ms: u64, make: u32, every_ms: u32) -> Vec<Reading> {
        self.tick_with(now_ms, make, every_ms, |traffic, at_ms| traffic.next_speed(at_ms))
    }

    /// [`SensorCore::tick`] with the speed of each new reading taken from
    /// `speed` (given the reading's stamp) instead of the built-in traffic
    /// model: how another sensor (a scenario, a replayed trace) reuses the
    /// resend buffer, average stream and snapshots. `speed` is only called
    /// when a reading is made.
    pub fn tick_with(&mut self, now_ms: u64, make: u32, every_ms: u32, mut speed: impl FnMut(&mut TrafficModel, u64) -> u16) -> Vec<Reading> {
        let mut out = Vec::with_capacity(make as usize);
        self.resend.take_due(now_ms, &mut out);
        for k in (0..u64::from(make)).rev() {
            // A sequence at u64::MAX cannot number another reading;
            // unreachable by counting, only through a doctored snapshot.
            let Some(next) = self.next_seq.checked_add(1) else { break };
            let timestamp_ms = now_ms.saturating_sub(k.saturating_mul(u64::from(every_ms)));
            let reading = Reading { seq: self.next_seq, speed_kmh: speed(&mut self.traffic, timestamp_ms), timestamp_ms };
            self.next_seq = next;
            self.generated = self.generated.saturating_add(1);
            self.sum_kmh = self.sum_kmh.saturating_add(u64::from(reading.speed_kmh));
            self.resend.push(reading, now_ms);
            out.push(reading);
        }
        out
    }

    /// What a visit of the host (the WIT `tick`) brings, taken before its
    /// readings are made: the ack `(incarnation, next_seq, also)`, then the
    /// averages.
    pub fn take_news(&mut self, ack: Option<(u64, u64, &[u64])>, averages: &[Average]) {
        if let Some((incarnation, next_seq, also)) = ack {
            self.on_ack(incarnation, next_seq, also);
        }
        if !averages.is_empty() {
            self.on_averages(averages);
        }
    }

    /// Takes the readings that left the host after the snapshot this core
    /// was restored from (in seq order): each at or above `next_seq` is
    /// this sensor's own, made after the snapshot; it counts as generated,
    /// is kept unacked (sent at `now_ms`, so resent when due), and the next
    /// reading follows it. The others are in the snapshot already. Readings
    /// of a seq that cannot follow (`u64::MAX`) are passed over.
    pub fn adopt(&mut self, since: &[Reading], now_ms: u64) {
        for r in since {
            let Some(next) = r.seq.checked_add(1) else { continue };
            if r.seq < self.next_seq {
                continue;
            }
            self.next_seq = next;
            self.generated = self.generated.saturating_add(1);
            self.sum_kmh = self.sum_kmh.saturating_add(u64::from(r.speed_kmh));
            self.resend.push(*r, now_ms);
        }
    }

    /// A server counted every reading with `seq < next_seq` and those in
    /// `also`. Acks for another incarnation (an earlier life of this sensor
    /// id) are not ours and are ignored.
    pub fn on_ack(&mut self, incarnation: u64, next_seq: u64, also: &[u64]) {
        if incarnation == self.incarnation {
            self.resend.ack(next_seq, also);
        }
    }

    /// Applies averages in server order; returns the position to ack.
    pub fn on_averages(&mut self, averages: &[Average]) -> Option<AverageCursor> {
        self.averages.apply(averages)
    }

    /// Moves the average cursor where the server says (see
    /// [`AverageStream::reposition`]).
    pub fn on_reposition(&mut self, rewind_to: Option<u64>, to: AverageCursor) -> Option<AverageCursor> {
        self.averages.reposition(rewind_to, to)
    }

    /// Takes the host's current resend timeout and bound, e.g. after a
    /// restore into a host started with other flags.
    pub fn set_resend_policy(&mut self, resend_after_ms: u64, max_buffered: u32) {
        self.resend.set_policy(resend_after_ms, max_buffered);
    }

    pub fn status(&self) -> Status {
        Status {
            incarnation: self.incarnation,
            generated: self.generated,
            acked: self.resend.acked(),
            buffered: u32::try_from(self.resend.len()).unwrap_or(u32::MAX),
            resent: self.resend.resent(),
            overflowed: self.resend.overflowed(),
            sum_kmh: self.sum_kmh,
            averages_applied: self.averages.applied(),
            last_average: self.averages.cursor(),
            averages_missed: self.averages.missed(),
            averages_superseded: self.averages.superseded(),
            averages_digest: self.averages.digest(),
            limit_kmh: self.averages.limit_kmh(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    #[test]
    fn a_restored_core_adopts_the_readings_that_left_after_its_snapshot() {
        let config = SensorConfig { sensor_id: 4, segment: 0, resend_after_ms: 1_000, max_buffered: 100, settings: Vec::new() };
        let mut core = SensorCore::new(&config, 9, 1_000);
        core.tick(1_000, 1, 0);
        let snapshot = core.snapshot();
        // Three more readings left; the first was acked before the crash.
        let left: Vec<Reading> = (2..5).flat_map(|t| core.tick(t * 1_000, 1, 0)).collect();
        core.on_ack(core.incarnation(), 2, &[]);
        let before = core.status();
        let mut restored = SensorCore::restore(&snapshot).unwrap();
        restored.adopt(&left, 9_000);
        restored.adopt(&left, 9_000); // twice changes nothing
        let after = restored.status();
        assert_eq!((after.generated, after.sum_kmh), (before.generated, before.sum_kmh));
        // Every reading from the snapshot on is kept unacked, and resent when due.
        assert_eq!(after.buffered, 4);
        let resent: Vec<u64> = restored.tick(10_000, 0, 0).iter().map(|r| r.seq).collect();
        assert_eq!(resent, vec![0, 1, 2, 3]);
        // The next new reading follows the last that left.
        assert_eq!(restored.tick(11_000, 1, 0).last().map(|r| r.seq), Some(4));
    }

    const T0: u64 = 1_700_000_000_000;

    pub(crate) fn config(sensor_id: u32) -> SensorConfig {
        SensorConfig {
            sensor_id,
            segment: 0,
            resend_after_ms: 1000,
            max_buffered: 100,
            settings: Vec::new(),
        }
    }

    #[test]
    fn incarnations_differ_by_seed_and_id_and_are_never_zero() {
        let a = SensorCore::new(&config(1), 42, T0);
        assert_eq!(
            a.incarnation(),
            SensorCore::new(&config(1), 42, T0 + 5).incarnation()
        );
        assert_ne!(
            a.incarnation(),
            SensorCore::new(&config(2), 42, T0).incarnation()
        );
        assert_ne!(
            a.incarnation(),
            SensorCore::new(&config(1), 43, T0).incarnation()
        );
        for seed in 0..10_000 {
            assert_ne!(incarnation(seed, 0), 0);
        }
    }

    #[test]
    fn one_reading_per_producing_tick_with_host_time_and_rising_seq() {
        let mut core = SensorCore::new(&config(1), 7, T0);
        let first = core.tick(T0 + 10, 1, 0);
        assert_eq!(first.len(), 1);
        assert_eq!((first[0].seq, first[0].timestamp_ms), (0, T0 + 10));
        assert!((70..=120).contains(&first[0].speed_kmh));
        assert!(
            core.tick(T0 + 20, 0, 0).is_empty(),
            "nothing due, nothing produced"
        );
        core.on_ack(core.incarnation(), 1, &[]);
        let next = core.tick(T0 + 1000, 1, 0);
        assert_eq!(next.iter().map(|r| r.seq).collect::<Vec<_>>(), vec![1]);
        let s = core.status();
        assert_eq!((s.generated, s.acked, s.buffered), (2, 1, 1));
        assert_eq!(
            s.sum_kmh,
            u64::from(first[0].speed_kmh) + u64::from(next[0].speed_kmh)
        );
    }

    #[test]
    fn a_visit_makes_several_readings_stamped_an_interval_apart_after_its_news() {
        let mut core = SensorCore::new(&config(1), 7, T0);
        let first = core.tick(T0 + 1_000, 4, 250);
        let stamps: Vec<(u64, u64)> = first.iter().map(|r| (r.seq, r.timestamp_ms)).collect();
        assert_eq!(stamps, vec![(0, T0 + 250), (1, T0 + 500), (2, T0 + 750), (3, T0 + 1_000)]);
        let s = core.status();
        assert_eq!((s.generated, s.buffered), (4, 4));
        assert_eq!(s.sum_kmh, first.iter().map(|r| u64::from(r.speed_kmh)).sum::<u64>());
        // The news comes first: what it acks is not resent with the
        // readings.
        core.take_news(Some((core.incarnation(), 2, &[3])), &[]);
        let next = core.tick(T0 + 2_000, 2, 1_000);
        let stamps: Vec<(u64, u64)> = next.iter().map(|r| (r.seq, r.timestamp_ms)).collect();
        assert_eq!(stamps, vec![(2, T0 + 750), (4, T0 + 1_000), (5, T0 + 2_000)]);
        assert_eq!(core.status().acked, 3);
        // Stamps never go below 0.
        let mut early = SensorCore::new(&config(1), 7, 0);
        let stamps: Vec<u64> = early.tick(1_000, 3, u32::MAX).iter().map(|r| r.timestamp_ms).collect();
        assert_eq!(stamps, vec![0, 0, 1_000]);
        // Past the bound the oldest go, counted, however many one visit makes.
        let mut small = SensorCore::new(&SensorConfig { max_buffered: 3, ..config(1) }, 7, T0);
        assert_eq!(small.tick(T0, 5, 10).len(), 5);
        let s = small.status();
        assert_eq!((s.generated, s.buffered, s.overflowed), (5, 3, 2));
    }

    #[test]
    fn unacked_readings_come_back_after_the_timeout() {
        let mut core = SensorCore::new(&config(1), 7, T0);
        core.tick(T0, 1, 0);
        core.tick(T0 + 500, 1, 0);
        // Resends first, in seq order, then the new reading.
        let out: Vec<u64> = core.tick(T0 + 1000, 1, 0).iter().map(|r| r.seq).collect();
        assert_eq!(out, vec![0, 2]);
        let out: Vec<u64> = core.tick(T0 + 1500, 0, 0).iter().map(|r| r.seq).collect();
        assert_eq!(out, vec![1]);
        // An ack for an earlier life of sensor 1 acks nothing here.
        core.on_ack(core.incarnation() ^ 1, 10, &[]);
        assert_eq!(core.status().buffered, 3);
        core.on_ack(core.incarnation(), 1, &[2]);
        core.on_ack(core.incarnation(), 1, &[2]);
        let s = core.status();
        assert_eq!((s.acked, s.buffered, s.resent), (2, 1, 2));
    }

    #[test]
    fn bad_settings_fall_back_to_defaults_and_say_why() {
        let mut cfg = config(1);
        cfg.settings = vec![
            ("min-kmh".into(), "30".into()),
            ("max-kmh".into(), "50".into()),
        ];
        let core = SensorCore::new(&cfg, 1, T0);
        assert_eq!(
            (core.speed_range().min_kmh, core.speed_range().max_kmh),
            (30, 50)
        );
        assert_eq!(core.settings_error(), None);
        cfg.settings.push(("max-kmh".into(), "20".into()));
        let core = SensorCore::new(&cfg, 1, T0);
        assert_eq!(
            (core.speed_range().min_kmh, core.speed_range().max_kmh),
            (70, 120)
        );
        assert_eq!(
            core.settings_error(),
            Some("min-kmh=30 is not below max-kmh=20")
        );
    }

    /// Random ticks, lost sends, duplicate acks: every generated reading is
    /// in exactly one of acked, buffered, overflowed, and after an ack
    /// nothing the simulated server counted is still buffered.
    #[test]
    fn every_reading_is_acked_buffered_or_overflowed_exactly_once() {
        for seed in 0..50 {
            let mut rng = Rng::new(seed);
            let mut cfg = config(3);
            cfg.max_buffered = 1 + (rng.next_u64() % 40) as u32;
            let mut core = SensorCore::new(&cfg, seed, T0);
            let mut counted = std::collections::BTreeSet::new();
            let mut now = T0;
            for _ in 0..500 {
                now += rng.next_u64() % 700;
                let sent = core.tick(now, u32::from(!rng.next_u64().is_multiple_of(4)), 0);
                // The network loses a third of the readings.
                counted.extend(
                    sent.iter()
                        .filter(|_| !rng.next_u64().is_multiple_of(3))
                        .map(|r| r.seq),
                );
                if rng.next_u64().is_multiple_of(3) {
                    let next_seq = (0..).find(|s| !counted.contains(s)).unwrap_or(0);
                    let also: Vec<u64> = counted.range(next_seq..).copied().collect();
                    core.on_ack(core.incarnation(), next_seq, &also);
                    assert!(
                        core.resend
                            .pending
                            .iter()
                            .all(|p| !counted.contains(&p.reading.seq))
                    );
                    if rng.next_u64().is_multiple_of(2) {
                        core.on_ack(core.incarnation(), next_seq, &also);
                    }
                }
                let s = core.status();
                assert_eq!(
                    s.generated,
                    s.acked + u64::from(s.buffered) + s.overflowed,
                    "seed {seed}"
                );
                assert!(s.buffered <= cfg.max_buffered);
            }
        }
    }
}
