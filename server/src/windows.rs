//! Sliding averages in event time: readings into windows, and windows into
//! published averages.
//!
//! [`Windows`] owns the buckets, the record of what each window last
//! published, and the schedule of windows still due; every publication goes
//! into the [`AverageLog`] it holds, which numbers, chains, retains and
//! serves the averages to sensors (see [`crate::average_log`]).
//!
//! Readings fall into 1 s buckets per road segment by their own timestamp.
//! The window ending at `t` (a whole second) covers `[t - 5 s, t)` and is
//! published once `now >= t + lateness`, if any reading fell into it. A
//! reading that arrives after its window was published marks that window
//! again, and the window is published as a revision if its count or sum
//! changed, but each revision waits twice as long as the one before: the
//! first 1 s after the first publication, then 2, 4 and 8 s after the
//! revision before, and every 8 s after that (see [`revise_at`]).
//! Every sensor applies every average, so a stream of stragglers (a host
//! that visits its sensors every few seconds sends each reading up to that
//! late) must not become a revision of every window every second; a window
//! still settles within seconds, and a reading however late is counted.
//! Every publication, first or revision, of any segment takes the next
//! number of one global, gap-free sequence.
//!
//! Readings outside `[now - horizon, now + 1 h]` are counted by the ingest
//! but go into no window; they are reported together as `too_late` (a
//! reading from the far future is as unusable as one from the far past).

use std::collections::{BTreeSet, HashMap};

use fog_protocol::{Average, AverageCursor, Reading, Reposition};
use serde::{Deserialize, Serialize};

use crate::average_log::{AverageLog, Retention};

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
    /// Readings stamped further ahead of the server's clock are refused
    /// ([`fog_protocol::Refusal::FromTheFuture`]): not acked, not counted.
    /// Sensors stamp readings with their host's clock, which NTP keeps
    /// within a second or so of the servers'; a minute tolerates a badly
    /// kept clock, while a reading from further ahead would sit in a ledger
    /// without ever expiring (and keep it from being retired) and fall into
    /// no window anyway. The sensor keeps a refused reading and resends it,
    /// so once the clocks agree again nothing is lost.
    pub max_clock_skew_ms: u64,
}

impl WindowConfig {
    /// What the average log keeps.
    pub fn retention(&self) -> Retention {
        Retention { averages: self.retain_averages, age_ms: self.retain_age_ms }
    }
}

impl Default for WindowConfig {
    fn default() -> Self {
        let retention = Retention::default();
        WindowConfig {
            lateness_ms: 1_000,
            horizon_ms: 10 * 60 * 1_000,
            retain_averages: retention.averages,
            retain_age_ms: retention.age_ms,
            dedup_horizon_ms: crate::ingest::DEFAULT_DEDUP_HORIZON_MS,
            max_clock_skew_ms: 60 * 1_000,
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

/// Buckets and windows of all segments, and the log they publish into.
///
/// Part of the replicated state: every field that decides a later
/// publication is serialized; the configuration comes from the flags of the
/// node that loads it. The log sits between `due` and `too_late` because
/// its fields were serialized there before it was a struct of its own:
/// snapshots keep the same bytes.
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
    /// When the first window of `due` may be published (see
    /// [`Windows::due_at`]); worked out again whenever `due` or what was
    /// published changes, so that asking costs nothing.
    #[serde(skip)]
    next_due: Option<u64>,
    log: AverageLog,
    too_late: u64,
    averages_published: u64,
    revisions_published: u64,
    last_prune_ms: u64,
}

/// Revisions of a window that each wait twice as long as the one before
/// (1, 2, 4 and 8 s after the publication before them) ...
const DOUBLING_REVISIONS: u32 = 4;
/// ... and the wait of every later one: the longest between two
/// publications of a window.
const MOST_BETWEEN_REVISIONS_MS: u64 = HOP_MS << (DOUBLING_REVISIONS - 1);

/// The earliest time the window ending at `end` may be published as
/// revision `revision` (at least 1): 1 s, 3 s, 7 s, 15 s, 23 s, 31 s, ...
/// after its first publication.
fn revise_at(end: u64, lateness_ms: u64, revision: u32) -> u64 {
    let doubled = revision.min(DOUBLING_REVISIONS);
    let wait = HOP_MS
        .saturating_mul((1u64 << doubled) - 1)
        .saturating_add(MOST_BETWEEN_REVISIONS_MS.saturating_mul(u64::from(revision - doubled)));
    end.saturating_add(lateness_ms).saturating_add(wait)
}

impl Windows {
    pub fn new(cfg: WindowConfig) -> Self {
        Windows {
            cfg,
            buckets: HashMap::new(),
            published: HashMap::new(),
            due: BTreeSet::new(),
            last_touched: HashMap::new(),
            next_due: None,
            log: AverageLog::new(cfg.retention()),
            too_late: 0,
            averages_published: 0,
            revisions_published: 0,
            last_prune_ms: 0,
        }
    }

    pub fn config(&self) -> &WindowConfig {
        &self.cfg
    }

    /// Puts a configuration on windows loaded from a snapshot.
    pub fn set_config(&mut self, cfg: WindowConfig) {
        self.cfg = cfg;
        self.log.set_retention(cfg.retention());
        self.next_due = self.earliest_due();
    }

    /// Whether nothing is left to publish or prune.
    pub fn is_idle(&self) -> bool {
        self.due.is_empty() && self.buckets.is_empty() && self.published.is_empty() && self.log.is_empty()
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
        tally.count = tally.count.saturating_add(1);
        tally.sum_kmh = tally.sum_kmh.saturating_add(u64::from(reading.speed_kmh));
        if self.last_touched.get(&segment) != Some(&bucket) {
            for k in 1..=WINDOW_MS / HOP_MS {
                let end = bucket.saturating_add(k * HOP_MS);
                self.due.insert((end, segment));
                let at = self.due_at(end, segment);
                self.next_due = Some(self.next_due.map_or(at, |n| n.min(at)));
            }
            self.last_touched.insert(segment, bucket);
        }
        true
    }

    /// The next time [`Windows::handle_timeout`] has something to publish.
    pub fn poll_timeout(&self) -> Option<u64> {
        self.next_due
    }

    /// The earliest time a window of `due` may be published. Looks at the
    /// revisions waiting their turn and the first window not yet
    /// published, no further.
    fn earliest_due(&self) -> Option<u64> {
        let mut next: Option<u64> = None;
        for &(end, segment) in &self.due {
            let earliest = end.saturating_add(self.cfg.lateness_ms);
            if next.is_some_and(|n| earliest >= n) {
                // Ordered by end: nothing further is due sooner.
                break;
            }
            let at = self.due_at(end, segment);
            next = Some(next.map_or(at, |n| n.min(at)));
        }
        next
    }

    /// When the window `(segment, end)`, marked due, may be published: its
    /// first publication after the lateness, a revision as [`revise_at`]
    /// says.
    fn due_at(&self, end: u64, segment: u32) -> u64 {
        match self.published.get(&(segment, end)) {
            None => end.saturating_add(self.cfg.lateness_ms),
            Some(p) => revise_at(end, self.cfg.lateness_ms, p.revision.saturating_add(1)),
        }
    }

    /// Publishes every window that is due at `now_ms` and new or changed,
    /// drops what fell out of the horizon and retention, and returns what was
    /// published, in sequence order.
    pub fn handle_timeout(&mut self, now_ms: u64, epoch: u64) -> Vec<Average> {
        let mut out = Vec::new();
        // Revisions not yet due go back into `due` once the pass is over.
        let mut later = Vec::new();
        while let Some(&(end, segment)) = self.due.first() {
            if end.saturating_add(self.cfg.lateness_ms) > now_ms {
                break;
            }
            self.due.pop_first();
            let tally = self.window_tally(segment, end);
            let revision = match self.published.get(&(segment, end)) {
                None if tally.count > 0 => 0,
                Some(p) if p.tally != tally => {
                    let revision = p.revision.saturating_add(1);
                    if revise_at(end, self.cfg.lateness_ms, revision) > now_ms {
                        later.push((end, segment));
                        continue;
                    }
                    revision
                }
                _ => continue,
            };
            self.published
                .insert((segment, end), Published { tally, revision });
            out.push(self.publish(now_ms, epoch, (segment, end), tally, revision));
        }
        self.due.extend(later);
        self.next_due = self.earliest_due();
        self.last_touched.clear();
        self.log.prune(now_ms);
        self.prune(now_ms);
        out
    }

    fn window_tally(&self, segment: u32, end: u64) -> Tally {
        let mut t = Tally::default();
        let mut b = end.saturating_sub(WINDOW_MS);
        while b < end {
            if let Some(x) = self.buckets.get(&(segment, b)) {
                t.count = t.count.saturating_add(x.count);
                t.sum_kmh = t.sum_kmh.saturating_add(x.sum_kmh);
            }
            b += HOP_MS;
        }
        t
    }

    fn publish(&mut self, now_ms: u64, epoch: u64, (segment, end): (u32, u64), t: Tally, revision: u32) -> Average {
        let average = Average {
            // The log numbers and chains it.
            seq: 0,
            chain: 0,
            epoch,
            segment,
            window_end_ms: end,
            count: u32::try_from(t.count).unwrap_or(u32::MAX),
            sum_kmh: t.sum_kmh,
            revision,
        };
        self.averages_published += 1;
        if revision > 0 {
            self.revisions_published += 1;
        }
        self.log.append(now_ms, average)
    }

    /// Drops buckets and window records that fell out of the horizon, in
    /// sweeps, once a second.
    fn prune(&mut self, now_ms: u64) {
        if now_ms < self.last_prune_ms.saturating_add(HOP_MS) {
            return;
        }
        self.last_prune_ms = now_ms;
        // A reading admitted at the horizon still revises windows ending up
        // to 5 s later, which need buckets up to 5 s before them, and the
        // revision may wait its turn (see `revise_at`).
        let horizon = now_ms.saturating_sub(self.cfg.horizon_ms).saturating_sub(MOST_BETWEEN_REVISIONS_MS);
        self.published.retain(|&(_, end), _| end >= horizon);
        self.buckets
            .retain(|&(_, b), _| b.saturating_add(WINDOW_MS + HOP_MS) >= horizon);
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

    // The log's own calls, for the callers that hold the windows (the node,
    // the replica, the tests): the log changes only through the windows.

    /// See [`AverageLog::next_seq`].
    pub fn next_seq(&self) -> u64 {
        self.log.next_seq()
    }

    /// See [`AverageLog::note_cursor`].
    pub fn note_cursor(&mut self, sensor_id: u32, cursor: Option<AverageCursor>) {
        self.log.note_cursor(sensor_id, cursor);
    }

    /// See [`AverageLog::reply_for`].
    pub fn reply_for(&self, sensors: &[(u32, Option<AverageCursor>)]) -> (Vec<Average>, Vec<Reposition>) {
        self.log.reply_for(sensors)
    }

    /// See [`AverageLog::cursor`].
    pub fn cursor(&self, sensor_id: u32) -> Option<AverageCursor> {
        self.log.cursor(sensor_id)
    }

    /// See [`AverageLog::last_seq`].
    pub fn last_seq(&self) -> Option<u64> {
        self.log.last_seq()
    }

    /// See [`AverageLog::last_position`].
    pub fn last_position(&self) -> AverageCursor {
        self.log.last_position()
    }

    /// See [`AverageLog::retained`].
    pub fn retained(&self) -> impl Iterator<Item = &Average> {
        self.log.retained()
    }

    /// See [`AverageLog::chain`].
    pub fn chain(&self) -> impl Iterator<Item = AverageCursor> + '_ {
        self.log.chain()
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
            out.extend(w.handle_timeout(now, 1));
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
        assert!(w.handle_timeout(T0 + 1_999, 1).is_empty());
        assert_eq!(w.handle_timeout(T0 + 2_000, 1).len(), 1);
    }

    #[test]
    fn late_readings_republish_with_a_new_seq_and_revision() {
        let mut w = Windows::new(cfg());
        w.add(T0, 0, &reading(T0 + 100, 100));
        let first = run_until(&mut w, T0, T0 + 3_000);
        assert_eq!(first.len(), 2, "windows ending at +1 s and +2 s");
        // A straggler for the first second arrives after both were published.
        // A revision waits 1 s after the window's first publication: the
        // first window's is due, the second's comes at +4 s, with the
        // first publication of the window ending at +3 s.
        w.add(T0 + 3_050, 0, &reading(T0 + 200, 80));
        let summary = |got: &[Average]| -> Vec<(u64, u64, u32, u32, u64)> {
            got.iter().map(|a| (a.seq, a.window_end_ms - T0, a.revision, a.count, a.sum_kmh)).collect()
        };
        assert_eq!(summary(&w.handle_timeout(T0 + 3_100, 1)), vec![(3, 1_000, 1, 2, 180)]);
        assert_eq!(w.poll_timeout(), Some(T0 + 4_000));
        assert!(w.handle_timeout(T0 + 3_900, 1).is_empty());
        assert_eq!(summary(&w.handle_timeout(T0 + 4_000, 1)), vec![(4, 2_000, 1, 2, 180), (5, 3_000, 0, 2, 180)]);
        assert_eq!(w.revisions_published(), 2);
        // The not yet published windows include it as revision 0.
        let rest = run_until(&mut w, T0 + 4_100, T0 + 10_000);
        assert!(rest.iter().all(|a| a.revision == 0 && a.count == 2));
        assert_eq!(rest.first().map(|a| a.seq), Some(6));
    }

    /// A straggler every 100 ms for a minute, all for one window: it is
    /// revised 1, 3, 7, 15, 23, ... s after its first publication, not
    /// every time one arrives, and the last revision counts every reading.
    #[test]
    fn revisions_of_a_window_wait_longer_and_longer() {
        let mut w = Windows::new(cfg());
        w.add(T0, 0, &reading(T0 + 100, 100));
        let mut got = Vec::new();
        let mut now = T0;
        let mut readings = 1u32;
        while now <= T0 + 80_000 {
            if (T0 + 2_000..T0 + 62_000).contains(&now) {
                w.add(now, 0, &reading(T0 + 100, 100));
                readings += 1;
            }
            if w.poll_timeout().is_some_and(|t| t <= now) {
                let first_window = w.handle_timeout(now, 1).into_iter().filter(|a| a.window_end_ms == T0 + 1_000);
                got.extend(first_window.map(|a| (a, now)));
            }
            now += 100;
        }
        let times: Vec<(u32, u64)> = got.iter().map(|(a, at)| (a.revision, at - T0)).collect();
        let expected: Vec<(u32, u64)> =
            [2_000, 3_000, 5_000, 9_000, 17_000, 25_000, 33_000, 41_000, 49_000, 57_000, 65_000]
                .into_iter()
                .enumerate()
                .map(|(r, t)| (r as u32, t))
                .collect();
        assert_eq!(times, expected);
        assert_eq!(got.last().map(|(a, _)| (a.count, a.sum_kmh)), Some((readings, u64::from(readings) * 100)));
        assert_eq!(w.poll_timeout(), None, "nothing left over");
    }

    #[test]
    fn a_revision_far_out_saturates() {
        assert_eq!(revise_at(T0, 1_000, 1), T0 + 2_000);
        assert_eq!(revise_at(T0, 1_000, 4), T0 + 16_000);
        assert_eq!(revise_at(T0, 1_000, 5), T0 + 24_000);
        assert_eq!(revise_at(T0, 1_000, u32::MAX), T0 + 1_000 + 15_000 + 8_000 * u64::from(u32::MAX - 4));
        assert_eq!(revise_at(u64::MAX - 5, 1_000, 1), u64::MAX);
    }

    #[test]
    fn an_unchanged_window_is_not_republished() {
        let mut w = Windows::new(cfg());
        w.add(T0, 0, &reading(T0 + 100, 100));
        run_until(&mut w, T0, T0 + 10_000);
        let before = w.averages_published();
        // Touch the same windows with nothing new: a zero-effect handle.
        w.due.insert((T0 + 1_000, 0));
        assert!(w.handle_timeout(T0 + 10_100, 1).is_empty());
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
            all.extend(w.handle_timeout(now, 1));
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

    /// What a host sends decides which windows wait: readings of any
    /// segment id, any age within the horizon, stragglers or from ahead.
    /// Through all of it the time the windows give for their next
    /// publication is the one a full look at them gives, a timeout at that
    /// time publishes something, and every window ends up counting every
    /// reading it covers.
    #[test]
    fn the_next_publication_time_follows_whatever_readings_come() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        let mut w = Windows::new(cfg());
        let segments = [0, 1, 7, u32::MAX - 1, u32::MAX];
        let mut now = T0;
        let mut last: HashMap<(u32, u64), (u32, u64)> = HashMap::new();
        let mut truth: HashMap<(u32, u64), (u32, u64)> = HashMap::new();
        while now < T0 + 120_000 {
            for _ in 0..rng.random_range(0..20) {
                let segment = segments[rng.random_range(0..segments.len())];
                let age = match rng.random_range(0..10) {
                    0 => rng.random_range(0..9 * 60_000),
                    1..=3 => rng.random_range(0..20_000),
                    _ => rng.random_range(0..2_000),
                };
                let ts = (now + rng.random_range(0..500)).saturating_sub(age);
                assert!(w.add(now, segment, &reading(ts, 50)));
                let bucket = ts - ts % HOP_MS;
                for k in 1..=WINDOW_MS / HOP_MS {
                    let t = truth.entry((segment, bucket + k * HOP_MS)).or_default();
                    *t = (t.0 + 1, t.1 + 50);
                }
            }
            assert_eq!(w.poll_timeout(), w.earliest_due());
            if let Some(at) = w.poll_timeout().filter(|&at| at <= now) {
                let got = w.handle_timeout(now, 1);
                assert!(!got.is_empty(), "woken at +{} ms for nothing", at - T0);
                for a in got {
                    last.insert((a.segment, a.window_end_ms), (a.count, a.sum_kmh));
                }
                assert_eq!(w.poll_timeout(), w.earliest_due());
            }
            now += rng.random_range(1..300);
        }
        // No more readings: what waits is published, and then nothing.
        while let Some(at) = w.poll_timeout() {
            for a in w.handle_timeout(at, 1) {
                last.insert((a.segment, a.window_end_ms), (a.count, a.sum_kmh));
            }
        }
        assert_eq!(last, truth);
    }
}
