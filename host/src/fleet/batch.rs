//! Batches out, replies in. Choosing the sensors of the next batch within
//! the protocol's caps (sensors with news for the server, and every running
//! sensor once a second, each batch starting where the last one stopped),
//! and routing a reply back: its acks merged into each sensor's unsent ack
//! (one sort however often a reply names a sensor), its averages into the
//! fleet's list, both taken by the sensors with their next tick (see
//! [`super::news`]), and its repositions given at once. The acks and
//! repositions are grouped by sensor in [`Routes`] so a pass over threads
//! finds them.

use std::ops::Range;
use std::time::{Duration, Instant};

use fog_protocol::{AverageCursor, BatchReply, MAX_AVERAGES_PER_REPLY, MAX_READINGS_PER_BATCH, MAX_SENSORS_PER_BATCH, SensorBatch};

use crate::runtime::WitAverage;

use crate::sensor::{SensorCalls, SensorRuntime};

use super::pool::each_sensor;
use super::{Fleet, Life, SensorSlot};

/// How often a batch carries every running sensor, news or not: so that a
/// server can reposition a sensor whose cursor it does not hold (after a
/// split) and a sensor that is idle still hears of new averages.
const FULL_BATCH_EVERY: Duration = Duration::from_secs(1);

/// Batches whose cursors the fleet remembers (more than the host keeps in
/// flight, see [`crate::core::MAX_IN_FLIGHT`]).
const CARRIED_BATCHES: usize = 2 * crate::core::MAX_IN_FLIGHT;

/// The cursors one batch carried, by sensor index (sorted): a reply's
/// reposition answers the cursor its batch carried, and is given only to
/// a sensor still there. One that moved since (it took averages, or an
/// earlier reply repositioned it) is checked again by a later batch; with
/// several batches in flight the same stale cursor can be answered more
/// than once, and a reposition given twice would count the averages it
/// skips twice.
pub(super) struct Carried {
    batch_id: u64,
    cursors: Vec<(usize, Option<AverageCursor>)>,
}

impl Carried {
    fn cursor_of(&self, i: usize) -> Option<Option<AverageCursor>> {
        let k = self.cursors.binary_search_by_key(&i, |&(j, _)| j).ok()?;
        Some(self.cursors[k].1)
    }
}

/// An ack as a sensor takes it: `(incarnation, next_seq, also)`.
pub(super) type AckView = (u64, u64, Vec<u64>);

/// Folds `acks` into `into`: acks of one incarnation are cumulative, so the
/// highest watermark wins and the selective acks above it are kept; an ack
/// of another incarnation (the sensor restarted) replaces what was there.
/// The selective acks are sorted once for all of them (a reply may name a
/// sensor 65 536 times), and at most [`MAX_READINGS_PER_BATCH`] of them are
/// kept, the lowest: an honest server never names more in one batch, and a
/// reading whose ack is dropped is only sent again and acked again.
fn merge_acks<'a>(into: &mut Option<AckView>, acks: impl Iterator<Item = &'a fog_protocol::SensorAck>) {
    let mut merged = false;
    for ack in acks {
        match into {
            Some((incarnation, next_seq, also)) if *incarnation == ack.incarnation => {
                *next_seq = (*next_seq).max(ack.next_seq);
                also.extend_from_slice(&ack.also);
            }
            _ => *into = Some((ack.incarnation, ack.next_seq, ack.also.clone())),
        }
        merged = true;
    }
    if let Some((_, watermark, also)) = into.as_mut().filter(|_| merged) {
        let watermark = *watermark;
        also.retain(|&s| s >= watermark);
        also.sort_unstable();
        also.dedup();
        also.truncate(MAX_READINGS_PER_BATCH);
    }
}

impl<S: SensorCalls> SensorSlot<S> {
    /// Takes the acks of a reply: drops those the sensor already has and
    /// merges the rest into the unsent one.
    fn note_acks<'a>(&mut self, acks: impl Iterator<Item = &'a fog_protocol::SensorAck>) {
        let last = self.last_ack.as_ref();
        let known = |ack: &fog_protocol::SensorAck| {
            last.is_some_and(|(incarnation, next_seq, also)| *incarnation == ack.incarnation && *next_seq == ack.next_seq && *also == ack.also)
        };
        merge_acks(&mut self.unsent_ack, acks.filter(|ack| !known(ack)));
    }
}

impl<R: SensorRuntime> Fleet<R> {
    /// Readings waiting to be put into a batch.
    pub fn pending(&self) -> usize {
        self.sensors.iter().map(|s| s.pending.len()).sum()
    }

    /// The sensors with news for one batch, and how many readings that is:
    /// every running sensor with readings to send or with a cursor the
    /// fleet's averages do not continue (one that has applied none before
    /// any came, one behind them, one on another branch), and every running
    /// sensor once a second (see [`FULL_BATCH_EVERY`]). A sensor the list
    /// continues needs no place in a batch: every reply brings what follows
    /// the lowest cursor in it, and the sensor takes it from the list.
    ///
    /// `batch_id` is the batch's id: the reply to it carries the same, and
    /// its repositions are checked against the cursors this batch carried.
    ///
    /// Call [`Fleet::commit`] after it, before the batch is sent.
    ///
    /// A batch holds at most [`MAX_SENSORS_PER_BATCH`] sensors and
    /// [`MAX_READINGS_PER_BATCH`] readings (the server refuses more); what
    /// does not fit goes first in the next batch (`pending` stays above
    /// zero), which may go before this one is answered (see
    /// [`crate::core::HostCore`]).
    pub fn take_batch(&mut self, now: Instant, batch_id: u64) -> (Vec<SensorBatch>, usize) {
        self.now = now;
        if self.last_full_batch.is_none_or(|at| now >= at + FULL_BATCH_EVERY) {
            self.last_full_batch = Some(now);
            self.full_pass_left = self.sensors.len();
        }
        let n = self.sensors.len();
        let averages = &self.averages;
        let news = |s: &SensorSlot<R::Sensor>| !s.pending.is_empty() || !averages.continues(s.cursor);
        let (mut sensors, mut readings) = (Vec::new(), 0usize);
        let mut cursors = Vec::new();
        let mut visited = 0;
        while visited < n && sensors.len() < MAX_SENSORS_PER_BATCH && readings < MAX_READINGS_PER_BATCH {
            let i = (self.batch_start + visited) % n;
            visited += 1;
            let in_full_pass = self.full_pass_left > 0;
            self.full_pass_left = self.full_pass_left.saturating_sub(1);
            let s = &mut self.sensors[i];
            if !matches!(s.life, Life::Running(_)) || !(in_full_pass || news(s)) {
                continue;
            }
            let take = s.pending.len().min(MAX_READINGS_PER_BATCH - readings);
            readings += take;
            cursors.push((i, s.cursor));
            sensors.push(batch_entry(s, take));
        }
        self.batch_start = (self.batch_start + visited) % n.max(1);
        if sensors.is_empty() {
            // Nothing new anywhere: one sensor still asks for what follows
            // its cursor, so new averages keep coming.
            if let Some((i, s)) = self.sensors.iter_mut().enumerate().find(|(_, s)| matches!(s.life, Life::Running(_))) {
                cursors.push((i, s.cursor));
                sensors.push(batch_entry(s, 0));
            }
        }
        // In visiting order, which wraps around at most once.
        cursors.sort_unstable_by_key(|&(i, _)| i);
        if self.carried.len() == CARRIED_BATCHES {
            self.carried.pop_front();
        }
        self.carried.push_back(Carried { batch_id, cursors });
        (sensors, readings)
    }

    /// Notes readings a server refused (they stay with their sensors and
    /// go again); each reason is logged once.
    fn note_refused(&mut self, reply: &BatchReply) {
        for r in &reply.refused {
            let count = self.refused.entry(r.reason.to_string()).or_insert(0);
            if *count == 0 {
                tracing::warn!(sensor_id = r.sensor_id, "the server refused {} readings: {}; they are kept and sent again", r.count, r.reason);
            }
            *count = count.saturating_add(u64::from(r.count));
        }
    }

    /// Makes the next batch carry every running sensor (after a failover:
    /// the new server checks every cursor), and forgets the averages the
    /// last server sent: the next may hold another branch, and sensors take
    /// only what it sends.
    pub fn force_full_batch(&mut self) {
        self.last_full_batch = None;
        self.averages = super::news::Averages::default();
    }

    /// Routes a server's reply to the sensors it concerns: its averages
    /// into the fleet's list and its acks into each sensor's unsent ack,
    /// which they take before their next tick, and its repositions given
    /// now to the sensors still at the cursor the batch carried. A sensor
    /// that is not running misses them; once restarted it resends what was
    /// not acked in its saved state, and the server acks it again.
    pub fn apply(&mut self, now: Instant, reply: &BatchReply) {
        self.now = now;
        self.note_refused(reply);
        let averages: Vec<WitAverage> = reply.averages.iter().map(WitAverage::from).collect();
        self.averages.merge(&averages);
        // A reply holds the server's log from the lowest seq its batch
        // needs to the log's end, unless the protocol's cap cut it: what the
        // list holds past that end, the server does not (a branch it
        // abandoned). An empty reply with a reposition ends where it points.
        let log_end = match reply.averages.last() {
            Some(last) => (reply.averages.len() < MAX_AVERAGES_PER_REPLY).then_some(last.seq),
            None => reply.repositions.iter().map(|r| r.to.seq).min(),
        };
        if let Some(end) = log_end {
            self.averages.end_at(end);
        }
        let carried = self.carried.iter().position(|c| c.batch_id == reply.batch_id).and_then(|k| self.carried.remove(k));
        let acks = Routes::new(self.sensors.len(), reply.acks.iter().map(|a| self.index_of(a.sensor_id)));
        let repositions = Routes::new(self.sensors.len(), reply.repositions.iter().map(|r| self.index_of(r.sensor_id)));
        if let Some(named) = acks.span().into_iter().chain(repositions.span()).reduce(|a, b| a.start.min(b.start)..a.end.max(b.end)) {
            let workers = self.workers(repositions.len());
            let swapping = self.swapping.as_ref();
            // Only the sensors the reply names: a batch is a run of
            // neighbours, so that is a part of a large fleet.
            let first = named.start;
            let mut pass = each_sensor(&mut self.sensors[named], first, workers, |pass, i, slot| {
                slot.note_acks(acks.of(i).iter().map(|&k| &reply.acks[k]));
                let Life::Running(inst) = &mut slot.life else { return };
                for &k in repositions.of(i) {
                    if carried.as_ref().and_then(|c| c.cursor_of(i)) != Some(slot.cursor) {
                        continue; // not where this batch found it (see [`Carried`])
                    }
                    let r = &reply.repositions[k];
                    match inst.on_reposition(r.rewind_to, r.to.into()) {
                        Ok(cursor) => slot.cursor = cursor.map(AverageCursor::from),
                        Err(error) => return pass.failed_at((1, k), i, "on-reposition", error),
                    }
                    // A hot swap under way: the new instance follows too.
                    if let Err(error) = swapping.map_or(Ok(()), |swap| swap.reposition(i, r.rewind_to, r.to.into())) {
                        return pass.failed_at((1, k), i, "on-reposition", error);
                    }
                }
            });
            pass.failures.sort_by_key(|f| f.order);
            self.handle_failures(pass.failures);
        }
        self.catch_up(now);
    }
}

/// The entries of a reply (acks, or repositions) grouped by the sensor
/// they concern, each group in reply order.
struct Routes {
    /// Sensor `i`'s entries are `positions[starts[i]..starts[i + 1]]`;
    /// empty when the reply has none.
    starts: Vec<usize>,
    positions: Vec<usize>,
}

impl Routes {
    /// `targets`: the sensor index of each entry, `None` for a sensor this
    /// fleet does not run.
    fn new(sensors: usize, targets: impl ExactSizeIterator<Item = Option<usize>>) -> Self {
        if targets.len() == 0 {
            return Routes { starts: Vec::new(), positions: Vec::new() };
        }
        let targets: Vec<Option<usize>> = targets.collect();
        // A counting sort: linear, and stable, so each group keeps reply order.
        let mut starts = vec![0; sensors + 1];
        for &i in targets.iter().flatten() {
            starts[i + 1] += 1;
        }
        for i in 0..sensors {
            starts[i + 1] += starts[i];
        }
        let mut next = starts.clone();
        let mut positions = vec![0; starts[sensors]];
        for (k, target) in targets.into_iter().enumerate() {
            if let Some(i) = target {
                positions[next[i]] = k;
                next[i] += 1;
            }
        }
        Routes { starts, positions }
    }

    fn len(&self) -> usize {
        self.positions.len()
    }

    /// The sensors from the first to the last with an entry, if any.
    fn span(&self) -> Option<Range<usize>> {
        let first = self.starts.windows(2).position(|w| w[1] > w[0])?;
        let last = self.starts.windows(2).rposition(|w| w[1] > w[0])?;
        Some(first..last + 1)
    }

    fn of(&self, i: usize) -> &[usize] {
        match self.starts.get(i..i + 2) {
            Some(&[start, end]) => &self.positions[start..end],
            _ => &[],
        }
    }
}

/// What one sensor says in a batch: its first `take` pending readings and
/// its cursor.
/// What sensor `s` says in a batch: `take` of its pending readings, which
/// from now on count as left (kept after its snapshot, for a restart).
fn batch_entry<S>(s: &mut SensorSlot<S>, take: usize) -> SensorBatch {
    let readings: Vec<_> = s.pending.drain(..take).collect();
    s.saved.since.extend_from_slice(&readings);
    SensorBatch { sensor_id: s.id, incarnation: s.incarnation, segment: s.segment, readings, average_cursor: s.cursor }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fog_protocol::SensorAck;

    fn ack(incarnation: u64, next_seq: u64, also: &[u64]) -> SensorAck {
        SensorAck { sensor_id: 1, incarnation, next_seq, also: also.to_vec() }
    }

    fn merge_ack(into: &mut Option<AckView>, ack: &SensorAck) {
        merge_acks(into, std::iter::once(ack));
    }

    #[test]
    fn acks_merge_into_the_highest_watermark_with_the_selective_acks_above_it() {
        let mut unsent = None;
        merge_ack(&mut unsent, &ack(7, 10, &[12, 15]));
        merge_ack(&mut unsent, &ack(7, 13, &[15, 16]));
        assert_eq!(unsent, Some((7, 13, vec![15, 16])));
        // An older ack that arrives late takes nothing back.
        merge_ack(&mut unsent, &ack(7, 11, &[20]));
        assert_eq!(unsent, Some((7, 13, vec![15, 16, 20])));
        // Another incarnation (the sensor restarted): its ack replaces it.
        merge_ack(&mut unsent, &ack(8, 2, &[]));
        assert_eq!(unsent, Some((8, 2, vec![])));
    }

    #[test]
    fn a_sensor_named_in_every_ack_of_a_reply_is_merged_in_one_sort() {
        // 65 536 acks of one sensor, each with selective acks: one pass (a
        // sort per ack would take minutes), the lowest 65 536 kept.
        let acks: Vec<SensorAck> = (0..MAX_READINGS_PER_BATCH as u64).map(|k| ack(7, k, &[k + 10, 1_000_000 - k])).collect();
        let mut unsent = None;
        merge_acks(&mut unsent, acks.iter());
        let (incarnation, next_seq, also) = unsent.unwrap();
        assert_eq!((incarnation, next_seq), (7, MAX_READINGS_PER_BATCH as u64 - 1));
        assert_eq!(also.len(), MAX_READINGS_PER_BATCH);
        assert!(also.windows(2).all(|w| w[0] < w[1]) && also[0] == next_seq);
    }
}
