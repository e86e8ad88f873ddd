//! What replies leave for the sensors until they next tick. A reply's
//! averages concern every sensor and its acks the sensors it names; giving
//! them over as each reply comes would be a call into every sensor for
//! every reply with averages (several a second, however many sensors), each
//! a visit to a store long out of the cache. Instead a reply's averages go
//! into one list for the whole fleet ([`Averages`]) and its acks are merged
//! into each sensor's unsent ack, and a sensor takes what is new for it
//! with its next tick ([`SensorSlot::visit`]): one call hands over the ack,
//! the averages it lacks and the readings to make, while its store is warm.
//!
//! Nothing is late for it: a sensor decides what to resend only in a tick,
//! and takes the ack first. Where sensors read less often than every
//! [`CATCH_UP_AFTER`] (a long interval), a sensor not visited
//! for that long is visited in a catch-up pass with nothing to make (a
//! visit returns the readings due again: a host behind its round adds no
//! such visits), and a status refresh and a commit of every sensor visit
//! every sensor first, so what the host reports and keeps is never behind
//! a reply.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use fog_protocol::AverageCursor;

use crate::runtime::{WitAck, WitAverage, WitVisit};
use crate::sensor::{SensorCalls, SensorRuntime};

use super::pool::each_sensor;
use super::{Fleet, Life, Make, SensorSlot};

/// A sensor that has not taken its news for this long gets it without a
/// tick.
pub(super) const CATCH_UP_AFTER: Duration = Duration::from_secs(2);
/// How often the fleet looks for such sensors.
const CATCH_UP_EVERY: Duration = Duration::from_secs(1);
/// Averages given to a sensor in one call at most; one further behind
/// takes them in several calls. A list is lowered into the sensor's own
/// memory, whose allocator keeps a freed block for the next of its size:
/// a sensor handed a long list once would hold its size for good, which
/// over half a million sensors is gigabytes.
pub(super) const AVERAGES_PER_CALL: usize = 32;
/// Averages the fleet holds at most: sixteen replies' worth. A sensor
/// further behind than that is brought back by the server, which sees its
/// cursor in a batch.
const MAX_HELD: usize = 16 * fog_protocol::MAX_AVERAGES_PER_REPLY;

/// The averages replies brought, as one run of consecutive seqs: what the
/// server's log holds as far as this host has seen it.
#[derive(Default)]
pub(super) struct Averages {
    /// The seq of `held[0]`.
    start: u64,
    /// Kept contiguous (see [`VecDeque::make_contiguous`]) so a sensor's
    /// news is one slice.
    held: VecDeque<WitAverage>,
}

impl Averages {
    /// Takes in a reply's averages (a run of consecutive seqs, in server
    /// order; a reply that breaks the run is taken up to the break). Where
    /// the run overlaps what is held it is the newer word: from the first
    /// average that differs (another branch, after a failover) what was
    /// held is replaced. A run that neither overlaps nor adjoins what is
    /// held replaces it all.
    pub(super) fn merge(&mut self, run: &[WitAverage]) {
        let Some(first) = run.first() else { return };
        let n = 1 + run.windows(2).take_while(|w| w[0].seq.checked_add(1) == Some(w[1].seq)).count();
        let run = &run[..n];
        let (a, end) = (first.seq, self.start.saturating_add(self.held.len() as u64));
        let disjoint = self.held.is_empty() || a > end || a.saturating_add(n as u64) < self.start;
        if disjoint {
            self.held = run.iter().cloned().collect();
            self.start = a;
        } else {
            let older = a < self.start;
            for avg in run {
                if avg.seq < self.start {
                    continue;
                }
                let i = (avg.seq - self.start) as usize;
                match self.held.get(i) {
                    Some(held) if held.chain == avg.chain => {}
                    Some(_) => {
                        self.held.truncate(i);
                        self.held.push_back(avg.clone());
                    }
                    None => self.held.push_back(avg.clone()),
                }
            }
            if older {
                // What a sensor behind the list asked for goes in front.
                for avg in run[..(self.start - a) as usize].iter().rev() {
                    self.held.push_front(avg.clone());
                }
                self.start = a;
                // Kept for the sensor that asked: the newest go, and come
                // again with the next reply.
                self.held.truncate(MAX_HELD);
            }
        }
        while self.held.len() > MAX_HELD {
            self.held.pop_front();
            self.start += 1;
        }
        self.held.make_contiguous();
    }

    /// Forgets what is held past `last`: the server's log ends there.
    pub(super) fn end_at(&mut self, last: u64) {
        let Some(next) = last.checked_add(1) else { return };
        self.held.truncate(usize::try_from(next.saturating_sub(self.start)).unwrap_or(usize::MAX));
    }

    fn all(&self) -> &[WitAverage] {
        self.held.as_slices().0
    }

    /// Where the average with `seq` is held, if it is.
    fn index(&self, seq: u64) -> Option<usize> {
        let i = usize::try_from(seq.checked_sub(self.start)?).ok()?;
        (i < self.held.len()).then_some(i)
    }

    /// What a sensor at `cursor` is to take: for a sensor that has applied
    /// none the newest average (as the server would give it); for the
    /// others what follows their cursor when it continues their chain (the
    /// check a sensor makes, see `average.chain` in the WIT); nothing when
    /// it does not (the server repositions such a sensor, or a later reply
    /// brings the branch it is on).
    pub(super) fn after(&self, cursor: Option<AverageCursor>) -> &[WitAverage] {
        let all = self.all();
        let Some(c) = cursor else { return all.last().map_or(&[], std::slice::from_ref) };
        match c.seq.checked_add(1).and_then(|next| self.index(next)) {
            Some(i) if fog_protocol::Average::from(&all[i]).link(c.chain) == all[i].chain => &all[i..],
            _ => &[],
        }
    }

    /// Whether the list continues `cursor` (or ends there), so a sensor
    /// there needs nothing from the server but what every batch brings.
    pub(super) fn continues(&self, cursor: Option<AverageCursor>) -> bool {
        let Some(c) = cursor else { return !self.held.is_empty() };
        let at_end = self.index(c.seq).is_some_and(|i| i + 1 == self.held.len() && self.all()[i].chain == c.chain);
        at_end || !self.after(cursor).is_empty()
    }
}

impl<S: SensorCalls> SensorSlot<S> {
    /// Visits the running instance (the WIT `tick`): hands it its unsent
    /// ack and the averages that follow its cursor, has it make `make`
    /// readings (see [`Make`]), and takes the readings it returns into
    /// `pending` and its status; returns how many readings it returned. A
    /// sensor more than [`AVERAGES_PER_CALL`] averages behind is visited
    /// again at once, with `make` 0, for each further part.
    pub(super) fn visit(&mut self, averages: &Averages, make: Make, now: Instant) -> wasmtime::Result<usize> {
        let mut returned = 0;
        let mut count = make.count;
        // At most the whole list, a call per part of it.
        for _ in 0..=MAX_HELD / AVERAGES_PER_CALL {
            let Life::Running(inst) = &mut self.life else { break };
            let news = averages.after(self.cursor);
            let part = &news[..news.len().min(AVERAGES_PER_CALL)];
            let more = news.len() > part.len();
            let ack = self.unsent_ack.take();
            let visit = WitVisit {
                ack: ack.map(|(incarnation, next_seq, also)| WitAck {
                    incarnation,
                    next_seq,
                    also: (!also.is_empty()).then_some(also),
                }),
                averages: (!part.is_empty()).then(|| part.to_vec()),
                make: count,
                every_ms: make.every_ms,
            };
            let result = inst.tick(&visit)?;
            if let Some(ack) = visit.ack {
                self.last_ack = Some((ack.incarnation, ack.next_seq, ack.also.unwrap_or_default()));
            }
            returned += result.readings.len();
            self.take_readings(&result.readings);
            self.cursor = result.status.last_average.map(AverageCursor::from);
            self.status = Some(result.status);
            count = 0;
            // A sensor that stopped short of the part's end stopped where
            // the list breaks its chain: it waits for the server.
            if !more || self.cursor.map(|c| c.seq) != part.last().map(|a| a.seq) {
                break;
            }
        }
        self.news_taken_at = now;
        Ok(returned)
    }

    fn has_news(&self, averages: &Averages) -> bool {
        matches!(self.life, Life::Running(_)) && (self.unsent_ack.is_some() || !averages.after(self.cursor).is_empty())
    }
}

impl<R: SensorRuntime> Fleet<R> {
    /// Gives their news to the sensors that have not taken it for
    /// [`CATCH_UP_AFTER`]; looks at most every [`CATCH_UP_EVERY`].
    pub(super) fn catch_up(&mut self, now: Instant) {
        let reads_often = Duration::from_millis(self.config.every_ms.into()) <= CATCH_UP_AFTER;
        if reads_often || self.swapping() || self.last_catch_up.is_some_and(|at| now < at + CATCH_UP_EVERY) {
            return;
        }
        self.last_catch_up = Some(now);
        let due = |slot: &SensorSlot<R::Sensor>, averages: &Averages| now >= slot.news_taken_at + CATCH_UP_AFTER && slot.has_news(averages);
        let calls = self.sensors.iter().filter(|s| due(s, &self.averages)).count();
        if calls == 0 {
            return;
        }
        self.now = now;
        let workers = self.workers(calls);
        let averages = &self.averages;
        let pass = each_sensor(&mut self.sensors, 0, workers, |pass, i, slot| {
            if due(slot, averages) {
                match slot.visit(averages, Make::NONE, now) {
                    Ok(returned) => pass.readings += returned,
                    Err(error) => pass.failed(i, "tick", error),
                }
            }
        });
        self.handle_failures(pass.failures);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The averages `seqs` of a branch whose chain before `seqs.start()`
    /// was `chain`, each linked as a server links them.
    fn branch(seqs: std::ops::RangeInclusive<u64>, epoch: u64, mut chain: u64) -> Vec<WitAverage> {
        seqs.map(|seq| {
            let mut a = WitAverage { seq, epoch, segment: 0, window_end_ms: seq * 1000, count: 1, sum_kmh: 60, mean_kmh: 60.0, revision: 0, chain: 0 };
            chain = fog_protocol::Average::from(&a).link(chain);
            a.chain = chain;
            a
        })
        .collect()
    }

    fn seqs(list: &[WitAverage]) -> Vec<u64> {
        list.iter().map(|a| a.seq).collect()
    }

    fn at(list: &[WitAverage], seq: u64) -> Option<AverageCursor> {
        let a = list.iter().find(|a| a.seq == seq).unwrap();
        Some(AverageCursor { seq, epoch: a.epoch, chain: a.chain })
    }

    #[test]
    fn overlapping_replies_make_one_run_and_a_sensor_takes_what_follows_its_cursor() {
        let stream = branch(1..=8, 1, 0);
        let mut list = Averages::default();
        assert!(list.after(None).is_empty() && !list.continues(None));
        list.merge(&stream[0..5]);
        list.merge(&stream[2..8]);
        assert_eq!(seqs(list.after(None)), vec![8], "a sensor with no position starts with the newest");
        assert_eq!(seqs(list.after(at(&stream, 5))), vec![6, 7, 8]);
        let before_all = Some(AverageCursor::default());
        assert_eq!(seqs(list.after(before_all)), (1..=8).collect::<Vec<_>>(), "just before the list: all of it");
        assert!(list.after(at(&stream, 8)).is_empty());
        let elsewhere = Some(AverageCursor { seq: 5, epoch: 1, chain: 999 });
        assert!(list.after(elsewhere).is_empty(), "another chain at that seq: the server repositions it");
        assert!(list.continues(at(&stream, 5)) && list.continues(at(&stream, 8)) && list.continues(None) && list.continues(before_all));
        assert!(!list.continues(elsewhere) && !list.continues(Some(AverageCursor { seq: 9, epoch: 1, chain: 0 })));
    }

    #[test]
    fn another_branch_replaces_what_follows_the_fork_and_a_far_run_replaces_all() {
        let old = branch(1..=10, 1, 0);
        let mut list = Averages::default();
        list.merge(&old);
        // Seqs 6.. of another branch (after a failover): 7..=10 of the old
        // one go with them.
        let new = branch(6..=7, 2, old[4].chain);
        list.merge(&new);
        assert_eq!(seqs(list.all()), (1..=7).collect::<Vec<_>>());
        assert_eq!(list.all()[5].chain, new[0].chain);
        assert!(list.after(at(&old, 8)).is_empty() && !list.continues(at(&old, 8)));
        assert_eq!(seqs(list.after(at(&old, 5))), vec![6, 7]);
        // A sensor that applied the new branch's 6 and 7 while the list
        // held the old one's 6 (a reply of the losing side came later) is
        // continued by what follows.
        let mut stale = Averages::default();
        stale.merge(&old[..6]);
        let newer = branch(7..=9, 2, new[0].chain);
        stale.merge(&newer);
        assert_eq!(seqs(stale.after(at(&new, 6))), vec![7, 8, 9]);
        // The server's log ends at 6: 7 goes.
        list.end_at(6);
        assert_eq!(seqs(list.all()), (1..=6).collect::<Vec<_>>());
        list.end_at(u64::MAX);
        assert_eq!(list.all().len(), 6);
        list.merge(&new[1..]);
        // A run behind, adjoining: put in front.
        list.merge(&old[0..1]);
        assert_eq!(list.all().len(), 7);
        // A run far ahead or far behind replaces the list.
        let far = branch(100..=101, 3, 0);
        list.merge(&far);
        assert_eq!(seqs(list.all()), vec![100, 101]);
        list.merge(&old[2..4]);
        assert_eq!(seqs(list.all()), vec![3, 4]);
    }

    #[test]
    fn hostile_runs_are_cut_at_the_first_break_and_the_list_stays_bounded() {
        let mut list = Averages::default();
        let mut broken = branch(5..=6, 1, 0);
        broken.extend(branch(6..=6, 1, 0));
        broken.extend(branch(u64::MAX >> 11..=u64::MAX >> 11, 1, 0));
        list.merge(&broken);
        assert_eq!(seqs(list.all()), vec![5, 6]);
        // Seqs and cursors at the top of the range overflow nothing.
        let mut top = Averages::default();
        let high = branch(u64::MAX - 1..=u64::MAX, 1, 0);
        top.merge(&high[1..]);
        top.merge(&branch(0..=0, 1, 0));
        top.merge(&high[..1]);
        assert_eq!(seqs(top.all()), vec![u64::MAX - 1]);
        assert!(top.after(at(&high, u64::MAX)).is_empty() && !top.continues(at(&high, u64::MAX)));
        assert!(top.after(at(&high, u64::MAX - 1)).is_empty() && top.continues(at(&high, u64::MAX - 1)));
        // Replies of the protocol's largest size, one after another: the
        // oldest go.
        let max = fog_protocol::MAX_AVERAGES_PER_REPLY as u64;
        let long = branch(1..=41 * max, 1, 0);
        for k in 0..41 {
            list.merge(&long[(k * max) as usize..((k + 1) * max) as usize]);
        }
        assert_eq!(list.all().len(), MAX_HELD);
        assert_eq!(list.all().last().unwrap().seq, 41 * max);
        // A run behind that adjoins a full list keeps its own averages.
        let start = list.start;
        list.merge(&long[(start - 1 - max) as usize..(start - 1) as usize]);
        assert_eq!(list.all().len(), MAX_HELD);
        assert_eq!(list.all()[0].seq, start - max);
    }

    /// A sensor that applies every average it is given and notes how many
    /// came in each visit and how many readings it was asked for; or,
    /// `stuck_at` a position, applies none.
    #[derive(Default)]
    struct Counting {
        calls: Vec<(usize, u32)>,
        stuck_at: Option<crate::runtime::WitCursor>,
        cursor: Option<crate::runtime::WitCursor>,
    }

    impl SensorCalls for Counting {
        fn tick(&mut self, visit: &WitVisit) -> wasmtime::Result<crate::runtime::TickResult> {
            let averages = visit.averages.as_deref().unwrap_or_default();
            assert!(visit.averages.as_ref().is_none_or(|a| !a.is_empty()), "no averages go as none, not as an empty list");
            self.calls.push((averages.len(), visit.make));
            if let Some(last) = averages.last() {
                self.cursor = Some(self.stuck_at.unwrap_or(crate::runtime::WitCursor { seq: last.seq, epoch: last.epoch, chain: last.chain }));
            }
            let status = crate::runtime::SensorStatus {
                incarnation: 7,
                generated: 0,
                acked: 0,
                buffered: 0,
                resent: 0,
                overflowed: 0,
                sum_kmh: 0,
                averages_applied: 0,
                last_average: self.cursor,
                averages_missed: 0,
                averages_superseded: 0,
                averages_digest: 0,
                limit_kmh: 0,
            };
            Ok(crate::runtime::TickResult { readings: Vec::new(), status })
        }
        fn init(&mut self) -> wasmtime::Result<u64> {
            unreachable!()
        }
        fn on_reposition(&mut self, _: Option<u64>, _: crate::runtime::WitCursor) -> wasmtime::Result<Option<crate::runtime::WitCursor>> {
            unreachable!()
        }
        fn status(&mut self) -> wasmtime::Result<crate::runtime::SensorStatus> {
            unreachable!()
        }
        fn snapshot(&mut self) -> wasmtime::Result<Vec<u8>> {
            unreachable!()
        }
        fn restore(&mut self, _: &[u8], _: &[crate::runtime::WitReading]) -> wasmtime::Result<Result<(), String>> {
            unreachable!()
        }
    }

    #[test]
    fn a_sensor_far_behind_takes_the_averages_a_bounded_list_at_a_time() {
        let stream = branch(1..=100, 1, 0);
        let mut list = Averages::default();
        list.merge(&stream);
        let now = Instant::now();
        let start = Some(AverageCursor { seq: 0, epoch: 1, chain: 0 });
        let counting = Counting { cursor: start.map(Into::into), ..Counting::default() };
        let mut slot = SensorSlot::for_test(Life::Running(Box::new(counting)), now);
        slot.cursor = start;
        let make = Make { count: 3, every_ms: 100 };
        slot.visit(&list, make, now).unwrap();
        let Life::Running(sensor) = &slot.life else { unreachable!() };
        // The readings are asked for once, with the first part.
        let part = AVERAGES_PER_CALL;
        assert_eq!(sensor.calls, vec![(part, 3), (part, 0), (part, 0), (100 - 3 * part, 0)]);
        assert_eq!(slot.cursor, at(&stream, 100));
        // Nothing new: one visit, with no list.
        slot.visit(&list, make, now).unwrap();
        let Life::Running(sensor) = &slot.life else { unreachable!() };
        assert_eq!(sensor.calls.last(), Some(&(0, 3)));
        // One that does not move is not asked again and again.
        let forty = at(&stream, 40);
        let stuck = Counting { stuck_at: forty.map(Into::into), cursor: forty.map(Into::into), ..Counting::default() };
        let mut slot = SensorSlot::for_test(Life::Running(Box::new(stuck)), now);
        slot.cursor = forty;
        slot.visit(&list, make, now).unwrap();
        let Life::Running(sensor) = &slot.life else { unreachable!() };
        assert_eq!(sensor.calls, vec![(part, 3)]);
        assert_eq!(slot.cursor, forty);
    }
}
