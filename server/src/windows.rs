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
//! The published averages form a log of bounded length and age, and a hash
//! chain: each average carries the epoch that published it and the chain
//! value after it, which sensors check. A reply to a batch carries the log
//! from the lowest position any of its sensors wants (each sensor applies
//! what follows its own cursor).
//!
//! A sensor's cursor `(seq, epoch, chain)` either is a position of this log,
//! or it is not, and then the reply repositions the sensor:
//! - behind the retained range: forward to the oldest retained position,
//!   telling it how many averages it missed;
//! - on a branch this log does not hold (a node cut off from its peer served
//!   the sensor and published averages the surviving log never had): back to
//!   the last position both share, found from the epochs as Kafka truncates
//!   a replica to its leader's epoch history. The averages beyond it are
//!   superseded, and the sensor then applies this log's. All sensors thus
//!   end on one stream.
//!
//! Readings outside `[now - horizon, now + 1 h]` are counted by the ingest
//! but go into no window; they are reported together as `too_late` (a
//! reading from the far future is as unusable as one from the far past).

use std::collections::{BTreeSet, HashMap, VecDeque};

use fog_protocol::{Average, AverageCursor, MAX_AVERAGES_PER_REPLY, Reading, Reposition};
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

impl Default for WindowConfig {
    fn default() -> Self {
        WindowConfig {
            lateness_ms: 1_000,
            horizon_ms: 10 * 60 * 1_000,
            retain_averages: 10_000,
            retain_age_ms: 10 * 60 * 1_000,
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

#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
struct Logged {
    published_at_ms: u64,
    average: Average,
}

fn cursor_of(a: &Average) -> AverageCursor {
    AverageCursor { seq: a.seq, epoch: a.epoch, chain: a.chain }
}

/// An average as the sensor core sees it.
pub fn sensor_average(a: &Average) -> fog_sensor::Average {
    fog_sensor::Average {
        seq: a.seq,
        epoch: a.epoch,
        segment: a.segment,
        window_end_ms: a.window_end_ms,
        count: a.count,
        sum_kmh: a.sum_kmh,
        mean_kmh: a.mean_kmh(),
        revision: a.revision,
        chain: a.chain,
    }
}

/// The chain value after `a`, following `prev`: the sensors' own function,
/// so that they can check every average they apply.
pub fn link(a: &Average, prev: u64) -> u64 {
    sensor_average(a).link(prev)
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
    /// Contiguous in seq, oldest first; a hash chain that starts at `base`.
    log: VecDeque<Logged>,
    /// The position just before the oldest retained average (the last one
    /// pruned; seq 0 and chain 0 before any).
    base: AverageCursor,
    /// `(epoch, first seq it published)`, oldest first, from the branch that
    /// holds `base` on: where each epoch's part of the log begins.
    branches: VecDeque<(u64, u64)>,
    next_seq: u64,
    cursors: HashMap<u32, AverageCursor>,
    too_late: u64,
    averages_published: u64,
    revisions_published: u64,
    #[serde(skip)]
    fork_logged: std::cell::Cell<Option<u64>>,
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
            base: AverageCursor::default(),
            branches: VecDeque::new(),
            next_seq: 1,
            cursors: HashMap::new(),
            too_late: 0,
            averages_published: 0,
            revisions_published: 0,
            fork_logged: std::cell::Cell::new(None),
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
        tally.count = tally.count.saturating_add(1);
        tally.sum_kmh = tally.sum_kmh.saturating_add(u64::from(reading.speed_kmh));
        if self.last_touched.get(&segment) != Some(&bucket) {
            for k in 1..=WINDOW_MS / HOP_MS {
                self.due.insert((bucket.saturating_add(k * HOP_MS), segment));
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
    pub fn handle_timeout(&mut self, now_ms: u64, epoch: u64) -> Vec<Average> {
        let mut out = Vec::new();
        while let Some(&(end, segment)) = self.due.first() {
            if end.saturating_add(self.cfg.lateness_ms) > now_ms {
                break;
            }
            self.due.pop_first();
            let tally = self.window_tally(segment, end);
            let revision = match self.published.get(&(segment, end)) {
                None if tally.count > 0 => 0,
                Some(p) if p.tally != tally => p.revision.saturating_add(1),
                _ => continue,
            };
            self.published
                .insert((segment, end), Published { tally, revision });
            out.push(self.publish(now_ms, epoch, (segment, end), tally, revision));
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
                t.count = t.count.saturating_add(x.count);
                t.sum_kmh = t.sum_kmh.saturating_add(x.sum_kmh);
            }
            b += HOP_MS;
        }
        t
    }

    fn publish(&mut self, now_ms: u64, epoch: u64, (segment, end): (u32, u64), t: Tally, revision: u32) -> Average {
        let mut average = Average {
            seq: self.next_seq,
            epoch,
            segment,
            window_end_ms: end,
            count: u32::try_from(t.count).unwrap_or(u32::MAX),
            sum_kmh: t.sum_kmh,
            revision,
            chain: 0,
        };
        average.chain = link(&average, self.last_position().chain);
        if self.branches.back().is_none_or(|b| b.0 != epoch) {
            self.branches.push_back((epoch, average.seq));
        }
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
        let cutoff = now_ms.saturating_sub(self.cfg.retain_age_ms);
        while self.log.len() > self.cfg.retain_averages
            || self.log.front().is_some_and(|l| l.published_at_ms < cutoff)
        {
            if let Some(l) = self.log.pop_front() {
                self.base = cursor_of(&l.average);
            }
        }
        // Keep the branch that holds the base and every later one.
        while self.branches.get(1).is_some_and(|b| b.1 <= self.base.seq) {
            self.branches.pop_front();
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
            .retain(|&(_, b), _| b.saturating_add(WINDOW_MS + HOP_MS) >= horizon);
    }

    /// Records the cursor a sensor reported.
    pub fn note_cursor(&mut self, sensor_id: u32, cursor: Option<AverageCursor>) {
        if let Some(c) = cursor {
            self.cursors.insert(sensor_id, c);
        }
    }

    /// The position just after the newest average (or the base if none is
    /// retained).
    pub fn last_position(&self) -> AverageCursor {
        self.log.back().map_or(self.base, |l| cursor_of(&l.average))
    }

    /// The position at `seq`, for `base.seq <= seq < next_seq`.
    fn position(&self, seq: u64) -> Option<AverageCursor> {
        if seq == self.base.seq {
            return Some(self.base);
        }
        let i = usize::try_from(seq.checked_sub(self.base.seq + 1)?).ok()?;
        self.log.get(i).map(|l| cursor_of(&l.average))
    }

    /// The epoch that published `seq`, as far as the branch history reaches.
    fn epoch_at(&self, seq: u64) -> Option<u64> {
        self.branches.iter().rev().find(|b| b.1 <= seq).map(|b| b.0)
    }

    /// The first seq of a cursor's stream that this log does not share: the
    /// end of the newest epoch not after the cursor's, in this log's branch
    /// history (the rule Kafka's leader epochs use to truncate replicas).
    fn fork_point(&self, c: AverageCursor) -> u64 {
        let newest_not_after = self.branches.iter().rposition(|b| b.0 <= c.epoch);
        let end = match newest_not_after {
            Some(i) => self.branches.get(i + 1).map_or(self.next_seq, |b| b.1),
            None => self.branches.front().map_or(self.next_seq, |b| b.1),
        };
        let fork = c.seq.saturating_add(1).min(end);
        if fork <= c.seq {
            return fork;
        }
        // The epochs do not place the fork: the cursor's epoch is missing
        // from this log's history (another node published it after taking
        // over from this log's newest branch), or the chain differs where
        // the epochs agree. That branch of this log began before the fork:
        // go back to its start.
        newest_not_after.map_or(1, |i| self.branches[i].1).max(self.base.seq + 1)
    }

    /// Where a sensor with `cursor` continues: the first seq it needs, and a
    /// reposition when its cursor is not a retained position of this log.
    fn place(&self, sensor_id: u32, cursor: Option<AverageCursor>) -> (u64, Option<Reposition>) {
        let Some(c) = cursor else {
            // A sensor that has applied nothing starts with the newest
            // average, so it has a current one at once.
            return (self.log.back().map_or(self.next_seq, |l| l.average.seq), None);
        };
        let repo = |rewind_to, to: AverageCursor| (to.seq + 1, Some(Reposition { sensor_id, rewind_to, to }));
        if c.seq < self.base.seq {
            // Behind retention: only the epoch can be compared.
            let shared = c == AverageCursor::default() || self.epoch_at(c.seq).is_none_or(|e| e == c.epoch);
            if shared {
                return repo(None, self.base);
            }
        } else if self.position(c.seq) == Some(c) {
            return (c.seq.saturating_add(1), None);
        }
        let keep = self.fork_point(c).saturating_sub(1);
        let to = self.position(keep).unwrap_or(self.base);
        // Once per abandoned branch, not once per sensor on it.
        if self.fork_logged.get() != Some(c.epoch) {
            tracing::warn!(
                sensor_id,
                cursor_seq = c.seq,
                cursor_epoch = c.epoch,
                kept = keep,
                "a sensor has applied averages that this log does not hold (published by a node \
                 cut off from its peer); it continues from the last average both streams share"
            );
            self.fork_logged.set(Some(c.epoch));
        }
        repo(Some(keep), to)
    }

    /// The averages and repositions for a reply to sensors with these
    /// `(sensor_id, cursor)`s: the log from the lowest seq any of them
    /// needs, at most [`MAX_AVERAGES_PER_REPLY`] of it.
    pub fn reply_for(&self, sensors: &[(u32, Option<AverageCursor>)]) -> (Vec<Average>, Vec<Reposition>) {
        let mut repositions = Vec::new();
        let mut min_wanted = u64::MAX;
        for &(sensor_id, cursor) in sensors {
            let (wanted, repo) = self.place(sensor_id, cursor);
            repositions.extend(repo);
            min_wanted = min_wanted.min(wanted);
        }
        let start = min_wanted.max(self.base.seq + 1);
        let skip = usize::try_from(start - self.base.seq - 1).unwrap_or(usize::MAX);
        let averages = self
            .log
            .iter()
            .skip(skip)
            .take(MAX_AVERAGES_PER_REPLY)
            .map(|l| l.average)
            .collect();
        (averages, repositions)
    }

    /// The seq of the newest average, if any was published.
    pub fn last_seq(&self) -> Option<u64> {
        (self.next_seq > 1).then(|| self.next_seq - 1)
    }

    /// The last cursor `sensor_id` reported.
    pub fn cursor(&self, sensor_id: u32) -> Option<AverageCursor> {
        self.cursors.get(&sensor_id).copied()
    }

    /// Published averages still retained, oldest first.
    pub fn retained(&self) -> impl Iterator<Item = &Average> {
        self.log.iter().map(|l| &l.average)
    }

    /// The position before the retained averages, then each of theirs.
    pub fn chain(&self) -> impl Iterator<Item = AverageCursor> + '_ {
        std::iter::once(self.base).chain(self.retained().map(cursor_of))
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
        w.add(T0 + 3_050, 0, &reading(T0 + 200, 80));
        let again = w.handle_timeout(T0 + 3_100, 1);
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
            w.handle_timeout(now, 1);
        }
        w.handle_timeout(now + 10_000, 1);
        assert_eq!(w.poll_timeout(), None);
        w
    }

    fn at(w: &Windows, seq: u64) -> Option<AverageCursor> {
        w.chain().find(|c| c.seq == seq)
    }

    #[test]
    fn replies_start_at_the_lowest_cursor_and_new_sensors_get_the_newest() {
        let w = published(10);
        let last = w.last_seq().unwrap();
        let (avg, repos) = w.reply_for(&[(1, at(&w, last - 3)), (2, None)]);
        assert!(repos.is_empty());
        let seqs: Vec<u64> = avg.iter().map(|a| a.seq).collect();
        assert_eq!(seqs, vec![last - 2, last - 1, last]);
        let (avg, _) = w.reply_for(&[(2, None)]);
        assert_eq!(avg.iter().map(|a| a.seq).collect::<Vec<_>>(), vec![last]);
        let (avg, _) = w.reply_for(&[(1, at(&w, last))]);
        assert!(avg.is_empty());
        let (avg, repos) = w.reply_for(&[]);
        assert!(avg.is_empty() && repos.is_empty());
    }

    #[test]
    fn the_log_is_a_hash_chain_the_sensors_can_follow() {
        let w = published(10);
        let chain: Vec<AverageCursor> = w.chain().collect();
        assert_eq!(chain[0], AverageCursor::default());
        let mut sensor = fog_sensor::averages::AverageStream::new(0);
        let wit: Vec<fog_sensor::Average> = w.retained().map(sensor_average).collect();
        let mut from_start = fog_sensor::averages::AverageStream::new(0);
        from_start.reposition(None, fog_sensor::Cursor::default());
        let end = from_start.apply(&wit).expect("applies the whole log");
        assert_eq!(end.seq, w.last_seq().unwrap());
        assert_eq!(end.chain, w.last_position().chain);
        sensor.apply(&wit[3..]);
        assert_eq!(sensor.digest(), end.chain, "a late joiner ends on the same chain value");
    }

    #[test]
    fn a_new_sensor_before_any_average_waits_for_the_first() {
        let w = Windows::new(cfg());
        let (avg, repos) = w.reply_for(&[(1, None)]);
        assert!(avg.is_empty() && repos.is_empty());
    }

    #[test]
    fn retention_by_count_moves_lagging_sensors_forward() {
        let mut w = published(150);
        let last = w.last_seq().unwrap();
        let retained: Vec<u64> = w.retained().map(|a| a.seq).collect();
        assert_eq!(retained.len(), 100);
        let oldest = retained[0];
        assert_eq!(*retained.last().unwrap(), last);
        let base = w.chain().next().unwrap();
        assert_eq!(base.seq, oldest - 1);
        // Sensor 7 applied seq 3 (epoch 1), long pruned.
        let old = AverageCursor { seq: 3, epoch: 1, chain: 12345 };
        let (avg, repos) = w.reply_for(&[(7, Some(old)), (8, at(&w, last - 1))]);
        assert_eq!(repos, vec![Reposition { sensor_id: 7, rewind_to: None, to: base }]);
        assert_eq!(avg.first().map(|a| a.seq), Some(oldest));
        assert_eq!(avg.len(), 100);
        // Retention by age: nothing is newer than ten minutes later.
        let before = at(&w, last - 5).unwrap();
        w.handle_timeout(T0 + 60 * 60 * 1_000, 1);
        assert_eq!(w.retained().count(), 0);
        assert_eq!(w.last_position().seq, last);
        let (avg, repos) = w.reply_for(&[(7, Some(before)), (9, None)]);
        assert!(avg.is_empty());
        assert_eq!(repos, vec![Reposition { sensor_id: 7, rewind_to: None, to: w.last_position() }]);
    }

    /// Two logs that share `shared` averages of epoch 1, then went on in
    /// epochs 3 (cut off) and 4 (the survivor).
    fn split(shared: u64, loser: u64, winner: u64) -> (Windows, Windows) {
        let mut a = Windows::new(WindowConfig { retain_averages: 100, ..cfg() });
        let mut now = T0;
        while a.averages_published() < shared {
            a.add(now, 0, &reading(now, 100));
            now += 1_000;
            a.handle_timeout(now, 1);
        }
        let mut b = a.clone();
        for (w, epoch, n, speed) in [(&mut a, 3, loser, 90), (&mut b, 4, winner, 110)] {
            let mut t = now;
            while w.averages_published() < shared + n {
                w.add(t, 0, &reading(t, speed));
                t += 1_000;
                w.handle_timeout(t, epoch);
            }
        }
        (a, b)
    }

    #[test]
    fn a_cursor_on_an_abandoned_branch_is_rewound_to_the_fork() {
        let (loser, winner) = split(20, 15, 30);
        let fork = loser.branches.iter().find(|b| b.0 == 3).unwrap().1;
        assert_eq!(fork, winner.branches.iter().find(|b| b.0 == 4).unwrap().1);
        let shared = at(&winner, fork - 1).unwrap();
        assert_eq!(at(&loser, fork - 1), Some(shared));
        // A sensor served by the loser, at its newest average and at one
        // just past the fork, is brought back to the last shared position.
        for seq in [loser.last_seq().unwrap(), fork] {
            let c = at(&loser, seq).unwrap();
            let (avg, repos) = winner.reply_for(&[(5, Some(c))]);
            assert_eq!(repos, vec![Reposition { sensor_id: 5, rewind_to: Some(fork - 1), to: shared }]);
            assert_eq!(avg.first().map(|a| a.seq), Some(fork));
            assert_eq!(avg.first().map(|a| a.epoch), Some(4));
        }
        // A sensor that only applied the shared part needs nothing.
        let (_, repos) = winner.reply_for(&[(5, Some(shared))]);
        assert!(repos.is_empty());
        // A cursor in the winner's own epoch but on another chain goes back
        // to where that epoch began; one of an epoch the winner never
        // published in (newer than its newest branch) likewise.
        let mut forged = winner.last_position();
        forged.chain ^= 1;
        let (_, repos) = winner.reply_for(&[(5, Some(forged))]);
        assert_eq!(repos[0].rewind_to, Some(fork - 1));
        let unknown = AverageCursor { epoch: 6, ..at(&winner, fork + 3).unwrap() };
        let (_, repos) = winner.reply_for(&[(5, Some(unknown))]);
        assert_eq!(repos[0].rewind_to, Some(fork - 1));
    }

    #[test]
    fn a_sensor_on_the_abandoned_branch_ends_on_the_survivors_stream() {
        let (loser, winner) = split(20, 15, 30);
        let to_sensor = sensor_average;
        let mut on_loser = fog_sensor::averages::AverageStream::new(0);
        let mut on_winner = on_loser.clone();
        on_loser.apply(&loser.retained().map(to_sensor).collect::<Vec<_>>());
        on_winner.apply(&winner.retained().map(to_sensor).collect::<Vec<_>>());
        // The winner's averages do not continue the loser's chain.
        let stuck = on_loser.cursor();
        assert_eq!(on_loser.apply(&winner.retained().map(to_sensor).collect::<Vec<_>>()), stuck);
        let c = stuck.map(|c| AverageCursor { seq: c.seq, epoch: c.epoch, chain: c.chain });
        let (avg, repos) = winner.reply_for(&[(1, c)]);
        let r = repos[0];
        let to = fog_sensor::Cursor { seq: r.to.seq, epoch: r.to.epoch, chain: r.to.chain };
        on_loser.reposition(r.rewind_to, to);
        on_loser.apply(&avg.iter().map(to_sensor).collect::<Vec<_>>());
        assert_eq!(on_loser.cursor(), on_winner.cursor());
        assert_eq!(on_loser.superseded(), 15);
        assert_eq!(on_loser.missed(), 0);
    }
}
