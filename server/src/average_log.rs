//! The log of published averages that sensors read from with their cursors.
//!
//! [`AverageLog`] owns what happens to an average after it was published:
//! its place in one global, gap-free sequence, its retention (bounded by
//! count and by age), the hash chain, the branch history of the epochs that
//! published it, the cursors sensors report, and the repositions that bring
//! a sensor whose cursor is not a position of this log back onto it. Which
//! averages are published, and when, is decided by [`crate::windows`],
//! which appends them here.
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

use std::collections::{HashMap, VecDeque};

use fog_protocol::{Average, AverageCursor, MAX_AVERAGES_PER_REPLY, Reposition};
use serde::{Deserialize, Serialize};

/// How much of the log is kept for sensors that are behind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    /// Most published averages kept.
    pub averages: usize,
    /// Published averages older than this (by publication time) are dropped.
    pub age_ms: u64,
}

impl Default for Retention {
    fn default() -> Self {
        Retention { averages: 10_000, age_ms: 10 * 60 * 1_000 }
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
struct Logged {
    published_at_ms: u64,
    average: Average,
}

/// The published averages still retained, their chain and branch history,
/// and the cursors of the sensors that read them.
///
/// Part of the replicated state (inside [`crate::windows::Windows`]); the
/// retention comes from the flags of the node that loads it. The fields are
/// serialized in the order they had when they were fields of `Windows`,
/// which keeps snapshots byte-compatible (postcard writes a nested struct
/// as its fields, in order, and nothing else).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AverageLog {
    #[serde(skip)]
    retention: Retention,
    /// Contiguous in seq, oldest first; a hash chain that starts at `base`.
    entries: VecDeque<Logged>,
    /// The position just before the oldest retained average (the last one
    /// pruned; seq 0 and chain 0 before any).
    base: AverageCursor,
    /// `(epoch, first seq it published)`, oldest first, from the branch that
    /// holds `base` on: where each epoch's part of the log begins.
    branches: VecDeque<(u64, u64)>,
    next_seq: u64,
    cursors: HashMap<u32, AverageCursor>,
    /// The epoch of the last abandoned branch warned about.
    #[serde(skip)]
    fork_logged: std::cell::Cell<Option<u64>>,
}

impl AverageLog {
    pub fn new(retention: Retention) -> Self {
        AverageLog {
            retention,
            entries: VecDeque::new(),
            base: AverageCursor::default(),
            branches: VecDeque::new(),
            next_seq: 1,
            cursors: HashMap::new(),
            fork_logged: std::cell::Cell::new(None),
        }
    }

    /// Puts a retention on a log loaded from a snapshot.
    pub fn set_retention(&mut self, retention: Retention) {
        self.retention = retention;
    }

    /// Whether no average is retained.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The seq the next publication will take.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Appends an average published at `now_ms`: it takes the next seq and
    /// the chain value that links it to the newest position (whatever `seq`
    /// and `chain` it carried are replaced). Returns it as logged.
    pub fn append(&mut self, now_ms: u64, mut average: Average) -> Average {
        average.seq = self.next_seq;
        average.chain = average.link(self.last_position().chain);
        if self.branches.back().is_none_or(|b| b.0 != average.epoch) {
            self.branches.push_back((average.epoch, average.seq));
        }
        self.next_seq += 1;
        self.entries.push_back(Logged { published_at_ms: now_ms, average });
        average
    }

    /// Drops the averages beyond the retention at `now_ms`, oldest first,
    /// and the branches that no longer hold a retained position.
    pub fn prune(&mut self, now_ms: u64) {
        let cutoff = now_ms.saturating_sub(self.retention.age_ms);
        while self.entries.len() > self.retention.averages
            || self.entries.front().is_some_and(|l| l.published_at_ms < cutoff)
        {
            if let Some(l) = self.entries.pop_front() {
                self.base = l.average.cursor();
            }
        }
        // Keep the branch that holds the base and every later one.
        while self.branches.get(1).is_some_and(|b| b.1 <= self.base.seq) {
            self.branches.pop_front();
        }
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
        self.entries.back().map_or(self.base, |l| l.average.cursor())
    }

    /// The position at `seq`, for `base.seq <= seq < next_seq`.
    fn position(&self, seq: u64) -> Option<AverageCursor> {
        if seq == self.base.seq {
            return Some(self.base);
        }
        let i = usize::try_from(seq.checked_sub(self.base.seq + 1)?).ok()?;
        self.entries.get(i).map(|l| l.average.cursor())
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
            return (self.entries.back().map_or(self.next_seq, |l| l.average.seq), None);
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
            .entries
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
        self.entries.iter().map(|l| &l.average)
    }

    /// The position before the retained averages, then each of theirs.
    pub fn chain(&self) -> impl Iterator<Item = AverageCursor> + '_ {
        std::iter::once(self.base).chain(self.retained().map(Average::cursor))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: u64 = 1_700_000_000_000;

    fn retain_100() -> Retention {
        Retention { averages: 100, ..Retention::default() }
    }

    /// Publishes `n` more averages into `log` in `epoch`, one a second from
    /// `from_ms`, pruning after each as the windows do; returns the time
    /// after the last.
    fn publish(log: &mut AverageLog, epoch: u64, n: u64, speed_kmh: u64, from_ms: u64) -> u64 {
        let mut now = from_ms;
        for _ in 0..n {
            now += 1_000;
            let average = Average { seq: 0, epoch, segment: 0, window_end_ms: now, count: 1, sum_kmh: speed_kmh, revision: 0, chain: 0 };
            log.append(now, average);
            log.prune(now);
        }
        now
    }

    /// A log of `n` averages of epoch 1 that keeps at most 100.
    fn published(n: u64) -> AverageLog {
        let mut log = AverageLog::new(retain_100());
        publish(&mut log, 1, n, 100, T0);
        log
    }

    fn at(log: &AverageLog, seq: u64) -> Option<AverageCursor> {
        log.chain().find(|c| c.seq == seq)
    }

    #[test]
    fn appending_numbers_and_chains_the_averages() {
        let log = published(3);
        let seqs: Vec<u64> = log.retained().map(|a| a.seq).collect();
        assert_eq!(seqs, vec![1, 2, 3]);
        assert_eq!((log.next_seq(), log.last_seq()), (4, Some(3)));
        let mut prev = AverageCursor::default();
        for a in log.retained() {
            assert_eq!(a.chain, a.link(prev.chain));
            prev = a.cursor();
        }
    }

    #[test]
    fn replies_start_at_the_lowest_cursor_and_new_sensors_get_the_newest() {
        let log = published(10);
        let last = log.last_seq().unwrap();
        let (avg, repos) = log.reply_for(&[(1, at(&log, last - 3)), (2, None)]);
        assert!(repos.is_empty());
        let seqs: Vec<u64> = avg.iter().map(|a| a.seq).collect();
        assert_eq!(seqs, vec![last - 2, last - 1, last]);
        let (avg, _) = log.reply_for(&[(2, None)]);
        assert_eq!(avg.iter().map(|a| a.seq).collect::<Vec<_>>(), vec![last]);
        let (avg, _) = log.reply_for(&[(1, at(&log, last))]);
        assert!(avg.is_empty());
        let (avg, repos) = log.reply_for(&[]);
        assert!(avg.is_empty() && repos.is_empty());
    }

    #[test]
    fn a_new_sensor_before_any_average_waits_for_the_first() {
        let log = AverageLog::new(Retention::default());
        let (avg, repos) = log.reply_for(&[(1, None)]);
        assert!(avg.is_empty() && repos.is_empty());
    }

    #[test]
    fn retention_by_count_moves_lagging_sensors_forward() {
        let mut log = published(150);
        let last = log.last_seq().unwrap();
        let retained: Vec<u64> = log.retained().map(|a| a.seq).collect();
        assert_eq!(retained.len(), 100);
        let oldest = retained[0];
        assert_eq!(*retained.last().unwrap(), last);
        let base = log.chain().next().unwrap();
        assert_eq!(base.seq, oldest - 1);
        // Sensor 7 applied seq 3 (epoch 1), long pruned.
        let old = AverageCursor { seq: 3, epoch: 1, chain: 12345 };
        let (avg, repos) = log.reply_for(&[(7, Some(old)), (8, at(&log, last - 1))]);
        assert_eq!(repos, vec![Reposition { sensor_id: 7, rewind_to: None, to: base }]);
        assert_eq!(avg.first().map(|a| a.seq), Some(oldest));
        assert_eq!(avg.len(), 100);
        // Retention by age: nothing is newer than ten minutes later.
        let before = at(&log, last - 5).unwrap();
        log.prune(T0 + 60 * 60 * 1_000);
        assert_eq!(log.retained().count(), 0);
        assert!(log.is_empty());
        assert_eq!(log.last_position().seq, last);
        let (avg, repos) = log.reply_for(&[(7, Some(before)), (9, None)]);
        assert!(avg.is_empty());
        assert_eq!(repos, vec![Reposition { sensor_id: 7, rewind_to: None, to: log.last_position() }]);
    }

    /// Two logs that share `shared` averages of epoch 1, then went on in
    /// epochs 3 (cut off) and 4 (the survivor).
    fn split(shared: u64, loser: u64, winner: u64) -> (AverageLog, AverageLog) {
        let mut a = AverageLog::new(retain_100());
        let now = publish(&mut a, 1, shared, 100, T0);
        let mut b = a.clone();
        publish(&mut a, 3, loser, 90, now);
        publish(&mut b, 4, winner, 110, now);
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
}
