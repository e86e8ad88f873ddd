//! Sliding averages in event time, and the log of published averages that
//! sensors read from with their cursors.
//!
//! Readings fall into 1 s buckets per road segment by their own timestamp.
//! The window ending at `t` (a whole second) covers `[t - 5 s, t)` and is
//! published once `now >= t + lateness`, if any reading fell into it. A
//! reading that arrives after its window was published marks that window
//! again; at the next timeout the window is published as a revision if its
//! count or sum changed. Every publication, first or revision, of any
//! segment takes the next number of one global, gap-free sequence.
//!
//! The published averages form a log of bounded length and age. A reply to a
//! batch carries the log from the lowest position any of its sensors wants
//! (each sensor applies what follows its own cursor), and tells a sensor that
//! fell behind the retained range exactly which sequence numbers it missed.
//!
//! Readings outside `[now - horizon, now + 1 h]` are counted by the ingest
//! but go into no window; they are reported together as `too_late` (a
//! reading from the far future is as unusable as one from the far past).

use std::collections::{BTreeSet, HashMap, VecDeque};

use fog_protocol::{Average, MAX_AVERAGES_PER_REPLY, Missed, Reading};
use serde::{Deserialize, Serialize};

/// Length of one averaging window.
pub const WINDOW_MS: u64 = 5_000;
/// Distance between two windows, and the width of a bucket.
pub const HOP_MS: u64 = 1_000;
/// Readings stamped further ahead of the server's clock go into no window.
pub const FUTURE_LIMIT_MS: u64 = 60 * 60 * 1_000;

/// Timing and retention of the averages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WindowConfig {
    /// How long after a window's end its first publication waits for
    /// stragglers.
    pub lateness_ms: u64,
    /// How far back in event time readings still revise windows.
    pub horizon_ms: u64,
    /// Most published averages kept for sensors that are behind.
    pub retain_averages: usize,
    /// Published averages older than this (by publication time) are dropped.
    pub retain_age_ms: u64,
    /// Readings stamped further back are acked but never counted, and the
    /// dedup state of sensor incarnations silent for this long is compacted
    /// (see [`crate::ingest`]). At least `horizon_ms`.
    pub dedup_horizon_ms: u64,
}

impl Default for WindowConfig {
    fn default() -> Self {
        WindowConfig {
            lateness_ms: 1_000,
            horizon_ms: 10 * 60 * 1_000,
            retain_averages: 10_000,
            retain_age_ms: 10 * 60 * 1_000,
            dedup_horizon_ms: crate::ingest::DEFAULT_DEDUP_HORIZON_MS,
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Tally {
    count: u64,
    sum_kmh: u64,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
struct Published {
    tally: Tally,
    revision: u32,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
struct Logged {
    published_at_ms: u64,
    average: Average,
}

/// Buckets, windows and the average log of all segments.
///
/// Part of the replicated state: every field that decides a later
/// publication is serialized; the configuration comes from the flags of the
/// node that loads it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Windows {
    #[serde(skip)]
    cfg: WindowConfig,
    /// `(segment, bucket start) -> tally`
    buckets: HashMap<(u32, u64), Tally>,
    /// `(segment, window end) -> what was last published for it`
    published: HashMap<(u32, u64), Published>,
    /// Windows that gained readings since they were last considered,
    /// ordered by `(window end, segment)`.
    due: BTreeSet<(u64, u32)>,
    /// The bucket of each segment whose windows are already in `due`; spares
    /// five set inserts per reading in the common case. Cleared whenever
    /// `due` shrinks.
    #[serde(skip)]
    last_touched: HashMap<u32, u64>,
    /// Contiguous in seq, oldest first.
    log: VecDeque<Logged>,
    next_seq: u64,
    cursors: HashMap<u32, u64>,
    too_late: u64,
    averages_published: u64,
    revisions_published: u64,
    #[serde(skip)]
    jump_logged: bool,
    last_prune_ms: u64,
}

impl Windows {
    pub fn new(cfg: WindowConfig) -> Self {
        Windows {
            cfg,
            buckets: HashMap::new(),
            published: HashMap::new(),
            due: BTreeSet::new(),
            last_touched: HashMap::new(),
            log: VecDeque::new(),
            next_seq: 1,
            cursors: HashMap::new(),
            too_late: 0,
            averages_published: 0,
            revisions_published: 0,
            jump_logged: false,
            last_prune_ms: 0,
        }
    }

    pub fn config(&self) -> &WindowConfig {
        &self.cfg
    }

    /// Puts a configuration on windows loaded from a snapshot.
    pub fn set_config(&mut self, cfg: WindowConfig) {
        self.cfg = cfg;
    }

    /// Whether nothing is left to publish or prune.
    pub fn is_idle(&self) -> bool {
        self.due.is_empty() && self.buckets.is_empty() && self.published.is_empty() && self.log.is_empty()
    }

    /// The seq the next publication will take.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Adds a newly counted reading of `segment`; returns false if it lies
    /// outside the windowed range (then it is only counted in `too_late`).
    pub fn add(&mut self, now_ms: u64, segment: u32, reading: &Reading) -> bool {
        let ts = reading.timestamp_ms;
        if ts < now_ms.saturating_sub(self.cfg.horizon_ms)
            || ts > now_ms.saturating_add(FUTURE_LIMIT_MS)
        {
            self.too_late += 1;
            return false;
        }
        let bucket = ts - ts % HOP_MS;
        let tally = self.buckets.entry((segment, bucket)).or_default();
        tally.count += 1;
        tally.sum_kmh += u64::from(reading.speed_kmh);
        if self.last_touched.get(&segment) != Some(&bucket) {
            for k in 1..=WINDOW_MS / HOP_MS {
                self.due.insert((bucket + k * HOP_MS, segment));
            }
            self.last_touched.insert(segment, bucket);
        }
        true
    }

    /// The next time [`Windows::handle_timeout`] has something to publish.
    pub fn poll_timeout(&self) -> Option<u64> {
        self.due
            .first()
            .map(|&(end, _)| end.saturating_add(self.cfg.lateness_ms))
    }

    /// Publishes every window that is due at `now_ms` and new or changed,
    /// drops what fell out of the horizon and retention, and returns what was
    /// published, in sequence order.
    pub fn handle_timeout(&mut self, now_ms: u64) -> Vec<Average> {
        let mut out = Vec::new();
        while let Some(&(end, segment)) = self.due.first() {
            if end.saturating_add(self.cfg.lateness_ms) > now_ms {
                break;
            }
            self.due.pop_first();
            let tally = self.window_tally(segment, end);
            let revision = match self.published.get(&(segment, end)) {
                None if tally.count > 0 => 0,
                Some(p) if p.tally != tally => p.revision + 1,
                _ => continue,
            };
            self.published
                .insert((segment, end), Published { tally, revision });
            out.push(self.publish(now_ms, segment, end, tally, revision));
        }
        self.last_touched.clear();
        self.prune(now_ms);
        out
    }

    fn window_tally(&self, segment: u32, end: u64) -> Tally {
        let mut t = Tally::default();
        let mut b = end.saturating_sub(WINDOW_MS);
        while b < end {
            if let Some(x) = self.buckets.get(&(segment, b)) {
                t.count += x.count;
                t.sum_kmh += x.sum_kmh;
            }
            b += HOP_MS;
        }
        t
    }

    fn publish(&mut self, now_ms: u64, segment: u32, end: u64, t: Tally, revision: u32) -> Average {
        let average = Average {
            seq: self.next_seq,
            segment,
            window_end_ms: end,
            count: u32::try_from(t.count).unwrap_or(u32::MAX),
            sum_kmh: t.sum_kmh,
            revision,
        };
        self.next_seq += 1;
        self.averages_published += 1;
        if revision > 0 {
            self.revisions_published += 1;
        }
        self.log.push_back(Logged {
            published_at_ms: now_ms,
            average,
        });
        average
    }

    fn prune(&mut self, now_ms: u64) {
        while self.log.len() > self.cfg.retain_averages {
            self.log.pop_front();
        }
        let cutoff = now_ms.saturating_sub(self.cfg.retain_age_ms);
        while self.log.front().is_some_and(|l| l.published_at_ms < cutoff) {
            self.log.pop_front();
        }
        // Buckets and window records are pruned in sweeps, once a second.
        if now_ms < self.last_prune_ms.saturating_add(HOP_MS) {
            return;
        }
        self.last_prune_ms = now_ms;
        let horizon = now_ms.saturating_sub(self.cfg.horizon_ms);
        // A reading admitted at the horizon still revises windows ending up
        // to 5 s later, which need buckets up to 5 s before them.
        self.published.retain(|&(_, end), _| end >= horizon);
        self.buckets
            .retain(|&(_, b), _| b + WINDOW_MS + HOP_MS >= horizon);
    }

    /// Records the cursor a sensor reported. A cursor beyond anything this
    /// server published means another server served the sensor before a
    /// failover; the sequence jumps past it so it never goes backwards, and
    /// the log restarts there (sensors below learn what they missed).
    pub fn note_cursor(&mut self, sensor_id: u32, cursor: Option<u64>) {
        let Some(c) = cursor else { return };
        self.cursors.insert(sensor_id, c);
        if c >= self.next_seq {
            if !self.jump_logged {
                tracing::warn!(
                    sensor_id,
                    cursor = c,
                    next_seq = self.next_seq,
                    "a sensor has applied averages this server never published \
                     (served by the peer before a failover); continuing the average \
                     sequence after its cursor"
                );
                self.jump_logged = true;
            }
            self.next_seq = c.saturating_add(1);
            self.log.clear();
        }
    }

    /// The first average seq a sensor with this cursor still needs.
    fn wanted(&self, cursor: Option<u64>) -> u64 {
        match cursor {
            Some(c) => c.saturating_add(1),
            // A sensor that has applied nothing starts with the newest
            // average, so it has a current one at once.
            None => self.log.back().map_or(self.next_seq, |l| l.average.seq),
        }
    }

    fn oldest_retained(&self) -> u64 {
        self.log.front().map_or(self.next_seq, |l| l.average.seq)
    }

    /// The averages and missed ranges for a reply to sensors with these
    /// `(sensor_id, cursor)`s: the log from the lowest wanted seq, at most
    /// [`MAX_AVERAGES_PER_REPLY`] of it.
    pub fn reply_for(&self, sensors: &[(u32, Option<u64>)]) -> (Vec<Average>, Vec<Missed>) {
        let oldest = self.oldest_retained();
        let mut missed = Vec::new();
        let mut min_wanted = u64::MAX;
        for &(sensor_id, cursor) in sensors {
            let wanted = self.wanted(cursor);
            if wanted < oldest {
                missed.push(Missed {
                    sensor_id,
                    from: wanted,
                    to: oldest - 1,
                });
            }
            min_wanted = min_wanted.min(wanted);
        }
        let start = min_wanted.max(oldest);
        let skip = usize::try_from(start - oldest).unwrap_or(usize::MAX);
        let averages = self
            .log
            .iter()
            .skip(skip)
            .take(MAX_AVERAGES_PER_REPLY)
            .map(|l| l.average)
            .collect();
        (averages, missed)
    }

    /// The seq of the newest average, if any was published (or jumped past).
    pub fn last_seq(&self) -> Option<u64> {
        (self.next_seq > 1).then(|| self.next_seq - 1)
    }

    /// The last cursor `sensor_id` reported.
    pub fn cursor(&self, sensor_id: u32) -> Option<u64> {
        self.cursors.get(&sensor_id).copied()
    }

    /// Published averages still retained, oldest first.
    pub fn retained(&self) -> impl Iterator<Item = &Average> {
        self.log.iter().map(|l| &l.average)
    }

    pub fn averages_published(&self) -> u64 {
        self.averages_published
    }

    pub fn revisions_published(&self) -> u64 {
        self.revisions_published
    }

    pub fn too_late(&self) -> u64 {
        self.too_late
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: u64 = 1_700_000_000_000;

    fn reading(ts: u64, speed: u16) -> Reading {
        Reading {
            seq: 0,
            speed_kmh: speed,
            timestamp_ms: ts,
        }
    }

    fn cfg() -> WindowConfig {
        WindowConfig::default()
    }

    /// Runs timeouts every 100 ms up to `until`, collecting publications.
    fn run_until(w: &mut Windows, from: u64, until: u64) -> Vec<Average> {
        let mut out = Vec::new();
        let mut now = from;
        while now <= until {
            out.extend(w.handle_timeout(now));
            now += 100;
        }
        out
    }

    #[test]
    fn windows_slide_over_five_one_second_buckets() {
        let mut w = Windows::new(cfg());
        w.add(T0, 0, &reading(T0 + 100, 100));
        w.add(T0, 0, &reading(T0 + 1_500, 110));
        w.add(T0, 0, &reading(T0 + 2_999, 120));
        assert_eq!(w.poll_timeout(), Some(T0 + 2_000));
        let got = run_until(&mut w, T0, T0 + 20_000);
        let summary: Vec<(u64, u32, u64)> = got
            .iter()
            .map(|a| (a.window_end_ms - T0, a.count, a.sum_kmh))
            .collect();
        assert_eq!(
            summary,
            vec![
                (1_000, 1, 100),
                (2_000, 2, 210),
                (3_000, 3, 330),
                (4_000, 3, 330),
                (5_000, 3, 330),
                (6_000, 2, 230),
                (7_000, 1, 120),
            ]
        );
        let seqs: Vec<u64> = got.iter().map(|a| a.seq).collect();
        assert_eq!(seqs, (1..=7).collect::<Vec<_>>());
        assert!(got.iter().all(|a| a.revision == 0));
        assert_eq!(w.poll_timeout(), None);
    }

    #[test]
    fn a_window_waits_for_its_lateness() {
        let mut w = Windows::new(cfg());
        w.add(T0, 0, &reading(T0 + 10, 90));
        assert!(w.handle_timeout(T0 + 1_999).is_empty());
        assert_eq!(w.handle_timeout(T0 + 2_000).len(), 1);
    }

    #[test]
    fn late_readings_republish_with_a_new_seq_and_revision() {
        let mut w = Windows::new(cfg());
        w.add(T0, 0, &reading(T0 + 100, 100));
        let first = run_until(&mut w, T0, T0 + 3_000);
        assert_eq!(first.len(), 2, "windows ending at +1 s and +2 s");
        // A straggler for the first second arrives after both were published.
        w.add(T0 + 3_050, 0, &reading(T0 + 200, 80));
        let again = w.handle_timeout(T0 + 3_100);
        let summary: Vec<(u64, u64, u32, u32, u64)> = again
            .iter()
            .map(|a| (a.seq, a.window_end_ms - T0, a.revision, a.count, a.sum_kmh))
            .collect();
        assert_eq!(summary, vec![(3, 1_000, 1, 2, 180), (4, 2_000, 1, 2, 180)]);
        assert_eq!(w.revisions_published(), 2);
        // The not yet published windows include it as revision 0.
        let rest = run_until(&mut w, T0 + 3_200, T0 + 10_000);
        assert!(rest.iter().all(|a| a.revision == 0 && a.count == 2));
        assert_eq!(rest.first().map(|a| a.seq), Some(5));
    }

    #[test]
    fn an_unchanged_window_is_not_republished() {
        let mut w = Windows::new(cfg());
        w.add(T0, 0, &reading(T0 + 100, 100));
        run_until(&mut w, T0, T0 + 10_000);
        let before = w.averages_published();
        // Touch the same windows with nothing new: a zero-effect handle.
        w.due.insert((T0 + 1_000, 0));
        assert!(w.handle_timeout(T0 + 10_100).is_empty());
        assert_eq!(w.averages_published(), before);
    }

    #[test]
    fn seqs_are_global_and_gap_free_across_segments() {
        let mut w = Windows::new(cfg());
        let mut all = Vec::new();
        for s in 0..20u64 {
            let now = T0 + s * 1_000;
            for seg in 0..3u32 {
                w.add(
                    now,
                    seg,
                    &reading(now + 100 * u64::from(seg), 100 + seg as u16),
                );
            }
            // A late reading now and then.
            if s % 4 == 3 {
                w.add(now, 1, &reading(now - 2_500, 70));
            }
            all.extend(w.handle_timeout(now));
        }
        all.extend(run_until(&mut w, T0 + 20_000, T0 + 40_000));
        let seqs: Vec<u64> = all.iter().map(|a| a.seq).collect();
        assert_eq!(seqs, (1..=all.len() as u64).collect::<Vec<_>>());
        assert!(all.iter().any(|a| a.revision > 0));
        for seg in 0..3 {
            assert!(all.iter().any(|a| a.segment == seg));
        }
        assert_eq!(w.last_seq(), Some(all.len() as u64));
    }

    #[test]
    fn readings_outside_the_horizon_go_in_no_window() {
        let mut w = Windows::new(cfg());
        assert!(!w.add(T0, 0, &reading(T0 - 11 * 60 * 1_000, 100)));
        assert!(!w.add(T0, 0, &reading(T0 + 2 * FUTURE_LIMIT_MS, 100)));
        assert_eq!(w.too_late(), 2);
        assert_eq!(w.poll_timeout(), None);
        assert!(w.add(T0, 0, &reading(T0 - 9 * 60 * 1_000, 100)));
    }

    /// A log of at least `n` averages, one reading per second, with nothing
    /// left pending.
    fn published(n: u64) -> Windows {
        let mut w = Windows::new(WindowConfig {
            retain_averages: 100,
            ..cfg()
        });
        let mut now = T0;
        while w.averages_published() < n {
            w.add(now, 0, &reading(now, 100));
            now += 1_000;
            w.handle_timeout(now);
        }
        w.handle_timeout(now + 10_000);
        assert_eq!(w.poll_timeout(), None);
        w
    }

    #[test]
    fn replies_start_at_the_lowest_cursor_and_new_sensors_get_the_newest() {
        let w = published(10);
        let last = w.last_seq().unwrap();
        let (avg, missed) = w.reply_for(&[(1, Some(last - 3)), (2, None)]);
        assert!(missed.is_empty());
        let seqs: Vec<u64> = avg.iter().map(|a| a.seq).collect();
        assert_eq!(seqs, vec![last - 2, last - 1, last]);
        let (avg, _) = w.reply_for(&[(2, None)]);
        assert_eq!(avg.iter().map(|a| a.seq).collect::<Vec<_>>(), vec![last]);
        let (avg, _) = w.reply_for(&[(1, Some(last))]);
        assert!(avg.is_empty());
        let (avg, missed) = w.reply_for(&[]);
        assert!(avg.is_empty() && missed.is_empty());
    }

    #[test]
    fn a_new_sensor_before_any_average_waits_for_the_first() {
        let w = Windows::new(cfg());
        let (avg, missed) = w.reply_for(&[(1, None)]);
        assert!(avg.is_empty() && missed.is_empty());
    }

    #[test]
    fn retention_by_count_reports_what_was_missed() {
        let mut w = published(150);
        let last = w.last_seq().unwrap();
        let retained: Vec<u64> = w.retained().map(|a| a.seq).collect();
        assert_eq!(retained.len(), 100);
        let oldest = retained[0];
        assert_eq!(*retained.last().unwrap(), last);
        let (avg, missed) = w.reply_for(&[(7, Some(3)), (8, Some(last - 1))]);
        assert_eq!(
            missed,
            vec![Missed {
                sensor_id: 7,
                from: 4,
                to: oldest - 1
            }]
        );
        assert_eq!(avg.first().map(|a| a.seq), Some(oldest));
        assert_eq!(avg.len(), 100);
        // Retention by age: nothing is newer than ten minutes later.
        w.handle_timeout(T0 + 60 * 60 * 1_000);
        assert_eq!(w.retained().count(), 0);
        let (avg, missed) = w.reply_for(&[(7, Some(last - 5)), (9, None)]);
        assert!(avg.is_empty());
        assert_eq!(
            missed,
            vec![Missed {
                sensor_id: 7,
                from: last - 4,
                to: last
            }]
        );
    }

    #[test]
    fn a_cursor_beyond_the_log_moves_the_sequence_forward() {
        let mut w = published(5);
        let last = w.last_seq().unwrap();
        w.note_cursor(3, Some(last + 40));
        assert_eq!(w.cursor(3), Some(last + 40));
        assert_eq!(w.last_seq(), Some(last + 40));
        let (_, missed) = w.reply_for(&[(4, Some(last))]);
        assert_eq!(
            missed,
            vec![Missed {
                sensor_id: 4,
                from: last + 1,
                to: last + 40
            }]
        );
        let mut now = T0 + 100_000;
        w.add(now, 0, &reading(now, 100));
        now += 2_000;
        let got = w.handle_timeout(now);
        assert_eq!(got.first().map(|a| a.seq), Some(last + 41));
    }
}
