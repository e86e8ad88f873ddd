//! What the site still owes the cloud: every counted reading and every
//! published average (revisions included), in the order the log made
//! them, each with a site sequence number (`site_seq`, from 1, gap-free),
//! until the uplink has it acked by JetStream.
//!
//! It is part of the replicated state ([`crate::replica::Replica`]): both
//! nodes build it from the same log entries, so it is the same on both,
//! survives a restart (snapshot + log), reaches a joining passive in its
//! snapshot, and a new active forwards from where the pair had got to.
//! The forwarding position moves by a log record of its own
//! (`Record::UplinkAcked`), written by the active when JetStream has
//! acked.
//!
//! Items are chained (`chain`: a hash over every item owed before and
//! this one), so the uplink can tell whether the stream it resumes holds
//! this site's branch of history or another one (after a split, the side
//! that lost may have forwarded items the pair later abandoned).
//!
//! It is bounded by `backlog_bytes`. Past the bound the oldest unforwarded
//! items are dropped and counted (`dropped`): the site keeps acking its
//! sensors and publishing averages (the roadside comes first), and the
//! cloud sees the gap in the site sequence. Both nodes run with the same
//! bound, so both drop the same items. An item dropped while it was on its
//! way to JetStream may still land: the ack of its window
//! (`Record::UplinkAcked`, which names the items it covers) takes it off
//! the count, so `dropped` is what the cloud will never get.

use std::collections::{BTreeMap, VecDeque};

use fog_core::{Average, Reading};
use fog_protocol::ReadingInCloud;
use serde::{Deserialize, Serialize};

/// Bytes an item is counted as against the bound: its size in memory.
pub const ITEM_BYTES: u64 = std::mem::size_of::<Item>() as u64;

/// How the outbox is kept; the same on both nodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct OutboxConfig {
    /// Whether the pair keeps an outbox at all (`--uplink`).
    pub enabled: bool,
    /// Most bytes of unforwarded items kept (`--uplink-backlog`).
    pub backlog_bytes: u64,
}

/// One thing owed to the cloud.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Item {
    pub site_seq: u64,
    /// The chain value after this item.
    pub chain: u64,
    /// The log entry that made it: it may leave the site once that entry
    /// is committed (durable here and, in sync, at the passive).
    pub lsn: u64,
    /// The wall-clock time of that entry (for the backlog's age).
    pub at_ms: u64,
    pub what: Owed,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub enum Owed {
    Reading { sensor_id: u32, incarnation: u64, segment: u32, reading: Reading },
    Average(Average),
}

impl Owed {
    pub fn segment(&self) -> u32 {
        match self {
            Owed::Reading { segment, .. } => *segment,
            Owed::Average(a) => a.segment,
        }
    }

    pub fn is_reading(&self) -> bool {
        matches!(self, Owed::Reading { .. })
    }

    fn bytes(&self) -> u64 {
        ITEM_BYTES
    }

    /// The chain value after this item, from `prev`: a reading by its
    /// identity (sensor, incarnation, seq), an average by its own chain
    /// value (which covers the whole average stream before it).
    pub fn link(&self, prev: u64) -> u64 {
        let fold = |h: u64, x: u64| fog_core::mix64(h ^ x);
        match self {
            Owed::Reading { sensor_id, incarnation, reading, .. } => {
                [u64::from(*sensor_id), *incarnation, reading.seq].into_iter().fold(fold(prev, 1), fold)
            }
            Owed::Average(a) => fold(fold(prev, 2), a.chain),
        }
    }
}

/// The replicated outbox.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Outbox {
    #[serde(skip)]
    cfg: OutboxConfig,
    /// The site sequence the next item gets.
    next_seq: u64,
    /// Every item up to here is in the cloud (or was dropped), and the
    /// chain value there.
    forwarded: u64,
    forwarded_chain: u64,
    /// The last item JetStream acked (not counting drops), and the chain
    /// value there: where the stream should end.
    acked: u64,
    acked_chain: u64,
    /// The chain value after the last item owed.
    chain: u64,
    items: VecDeque<Item>,
    bytes: u64,
    dropped: u64,
    /// Kept apart in snapshots (after the outbox), so a snapshot from
    /// before it still reads.
    #[serde(skip)]
    adopted: Adopted,
    /// Items this process dropped at the bound, whether or not they landed
    /// later (a counter for metrics: it never goes down).
    #[serde(skip)]
    drops: u64,
}

/// Site sequences stay below this (an adoption that would pass it is
/// refused): far beyond any real site, and room to count on from it.
pub const MAX_SITE_SEQ: u64 = 1 << 62;

/// Most readings of another history the outbox keeps track of: an
/// adoption that would need more is refused.
pub const MAX_IN_CLOUD: usize = 2_000_000;

/// What the outbox took over of another history in the cloud's stream
/// (see [`Outbox::adopt`]).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Adopted {
    /// Readings the stream holds in another history's items that this
    /// site has not counted yet (it will, when the side that lost hands
    /// them over): by identity (sensor, incarnation, seq), with their time.
    in_cloud: BTreeMap<(u32, u64, u64), u64>,
    /// Items of other histories taken over, and how many times.
    items: u64,
    adoptions: u64,
}

impl Outbox {
    pub fn set_config(&mut self, cfg: OutboxConfig) {
        self.cfg = cfg;
        if self.next_seq == 0 {
            self.next_seq = 1;
        }
        self.bound();
    }

    pub fn config(&self) -> OutboxConfig {
        self.cfg
    }

    /// Owes `what`, made by entry `lsn` at `at_ms` (a no-op without the uplink).
    pub fn push(&mut self, lsn: u64, at_ms: u64, what: Owed) {
        if !self.cfg.enabled {
            return;
        }
        if let Owed::Reading { sensor_id, incarnation, reading, .. } = &what {
            if !self.adopted.in_cloud.is_empty() && self.adopted.in_cloud.remove(&(*sensor_id, *incarnation, reading.seq)).is_some() {
                return;
            }
        }
        let site_seq = self.next_seq.max(1);
        self.next_seq = site_seq + 1;
        self.bytes += what.bytes();
        self.chain = what.link(self.chain);
        self.items.push_back(Item { site_seq, chain: self.chain, lsn, at_ms, what });
        self.bound();
    }

    fn bound(&mut self) {
        while self.bytes > self.cfg.backlog_bytes {
            let Some(old) = self.items.pop_front() else { break };
            self.bytes -= old.what.bytes();
            self.dropped += 1;
            self.drops += 1;
            // Logged at the first drop and at every power of two after it.
            if self.dropped.is_power_of_two() {
                tracing::warn!(
                    dropped = self.dropped,
                    backlog_bytes = self.cfg.backlog_bytes,
                    site_seq = old.site_seq,
                    "the uplink's backlog is full: dropping the oldest items the cloud has not got ({} so far); raise --uplink-backlog to ride out longer outages",
                    self.dropped
                );
            }
            self.forwarded = old.site_seq;
            self.forwarded_chain = old.chain;
        }
    }

    /// The cloud has every item up to `through` (a log written before
    /// [`Outbox::acked`]: no chain value, so a position among dropped items
    /// is not taken).
    pub fn forwarded_through(&mut self, through: u64) {
        if let Some(chain) = self.chain_at(through).filter(|_| through > self.acked) {
            self.acked(through, chain, through.saturating_add(1));
        }
    }

    /// The stream ends at site item `through`, with chain value `chain`,
    /// and holds every item from `landed_from` to it (`through + 1`: only
    /// that the stream ends there is known). Items the bound dropped that
    /// are among those reached the cloud after all (they were on their
    /// way when dropped): they no longer count as dropped.
    pub fn acked(&mut self, through: u64, chain: u64, landed_from: u64) {
        if through <= self.acked {
            return;
        }
        // Items in (acked, forwarded] are the ones dropped and not yet known
        // to be in the cloud.
        let (lo, hi) = (landed_from.max(self.acked + 1), through.min(self.forwarded));
        if hi >= lo {
            self.dropped = self.dropped.saturating_sub(hi - lo + 1);
        }
        while self.items.front().is_some_and(|i| i.site_seq <= through) {
            if let Some(i) = self.items.pop_front() {
                self.bytes -= i.what.bytes();
            }
        }
        self.acked = through;
        self.acked_chain = chain;
        if through > self.forwarded {
            self.forwarded = through;
            self.forwarded_chain = chain;
        }
    }

    /// Readings the cloud's stream holds in another history's items: they
    /// are not forwarded again (now or when counted later).
    pub fn add_in_cloud(&mut self, readings: &[ReadingInCloud]) {
        for r in readings {
            if self.adopted.in_cloud.len() >= MAX_IN_CLOUD {
                tracing::warn!(MAX_IN_CLOUD, "too many readings of another history in the cloud to keep track of: the rest may be forwarded again");
                break;
            }
            self.adopted.in_cloud.insert((r.sensor_id, r.incarnation, r.seq), r.timestamp_ms);
        }
    }

    /// Forgets readings of another history older than `before_ms`: past
    /// the dedup horizon, the site would not count them any more.
    pub fn expire_in_cloud(&mut self, before_ms: u64) {
        if !self.adopted.in_cloud.is_empty() {
            self.adopted.in_cloud.retain(|_, at| *at >= before_ms);
        }
    }

    /// The cloud's stream holds this site's items up to `fork`, then items
    /// `fork + 1..=end` of another history (a side that lost a split
    /// forwarded them; chain value `chain` at `end`). This site's items
    /// after `fork` take the site sequences after `end`, chained on from
    /// `chain`, without the readings the stream already holds (see
    /// [`Outbox::add_in_cloud`]); the stream is taken to end at `end`.
    pub fn adopt(&mut self, fork: u64, end: u64, chain: u64) {
        if end < fork || fork > self.last_seq() || end >= MAX_SITE_SEQ {
            tracing::warn!(fork, end, last = self.last_seq(), "an adoption that does not fit this outbox: ignored");
            return;
        }
        let rest: Vec<Item> = self.items.drain(..).filter(|i| i.site_seq > fork).collect();
        self.bytes = 0;
        self.chain = chain;
        self.next_seq = end + 1;
        for item in rest {
            self.push(item.lsn, item.at_ms, item.what);
        }
        self.acked = end;
        self.acked_chain = chain;
        self.forwarded = end;
        self.forwarded_chain = chain;
        self.adopted.items += end - fork;
        self.adopted.adoptions += 1;
    }

    /// Items of other histories taken over, and the times it happened.
    pub fn adopted(&self) -> (u64, u64) {
        (self.adopted.items, self.adopted.adoptions)
    }

    /// The part of the outbox kept apart in snapshots.
    pub fn adopted_state(&self) -> &Adopted {
        &self.adopted
    }

    pub fn set_adopted_state(&mut self, adopted: Adopted) {
        self.adopted = adopted;
    }

    /// The chain value after site item `site_seq`, if this outbox still
    /// knows it (the forwarded position, or an item it holds; 0 before
    /// the first item).
    pub fn chain_at(&self, site_seq: u64) -> Option<u64> {
        if site_seq == 0 {
            return Some(0);
        }
        if site_seq == self.forwarded {
            return Some(self.forwarded_chain);
        }
        if site_seq == self.acked {
            return Some(self.acked_chain);
        }
        let i = self.items.partition_point(|i| i.site_seq < site_seq);
        self.items.get(i).filter(|i| i.site_seq == site_seq).map(|i| i.chain)
    }

    /// The chain value after site item `site_seq` if this outbox knows it;
    /// `Err` if the item is older than the last one JetStream acked (what
    /// the outbox knows of the past ends there).
    pub fn chain_known(&self, site_seq: u64) -> Result<Option<u64>, ()> {
        match self.chain_at(site_seq) {
            Some(chain) => Ok(Some(chain)),
            None if site_seq < self.acked => Err(()),
            None => Ok(None),
        }
    }

    /// Items after `after`, in order, from entries up to `commit_lsn`.
    pub fn after(&self, after: u64, commit_lsn: u64) -> impl Iterator<Item = &Item> {
        let start = self.items.partition_point(|i| i.site_seq <= after);
        self.items.range(start..).take_while(move |i| i.lsn <= commit_lsn)
    }

    /// Whether a stream whose last message ends at site item `in_cloud`
    /// with chain value `chain` holds this pair's history (`Err`: why not).
    /// A stream that ends among the items the bound dropped cannot be
    /// checked (their chain values are gone); the items were this pair's,
    /// handed to JetStream before the drop, so it is taken as this pair's.
    pub fn check_stream(&self, in_cloud: u64, chain: u64) -> Result<(), String> {
        match self.chain_at(in_cloud) {
            Some(mine) if mine == chain => Ok(()),
            Some(_) => Err(format!("the stream's item {in_cloud} is not this site's (another history: a side of a split forwarded items the pair abandoned); forwarding stops until an operator looks")),
            None if in_cloud > self.last_seq() => Err(format!("the stream is ahead of this site (item {in_cloud}, this site has {}): it holds another history; forwarding stops until an operator looks", self.last_seq())),
            None if in_cloud > self.acked && in_cloud <= self.forwarded => {
                tracing::warn!(in_cloud, acked = self.acked, forwarded = self.forwarded, "the cloud stream ends at item {in_cloud}, among the items the backlog dropped: they reached the cloud after all; resuming after it");
                Ok(())
            }
            None if in_cloud < self.acked => Err(format!("the stream lost items: it ends at item {in_cloud}, JetStream had acked up to {}; forwarding stops until an operator looks", self.acked)),
            None => Err(format!("cannot check the stream's item {in_cloud} against this site's outbox")),
        }
    }

    /// The last item JetStream acked (drops aside).
    pub fn acked_through(&self) -> u64 {
        self.acked
    }

    pub fn forwarded(&self) -> u64 {
        self.forwarded
    }

    /// The last site sequence given out (0: none).
    pub fn last_seq(&self) -> u64 {
        self.next_seq.saturating_sub(1)
    }

    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Items dropped at the bound that the cloud will not get.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    /// Items this process dropped at the bound, landed later or not.
    pub fn drops(&self) -> u64 {
        self.drops
    }

    /// When the oldest unforwarded item was made (wall-clock ms).
    pub fn oldest_at_ms(&self) -> Option<u64> {
        self.items.front().map(|i| i.at_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reading(seq: u64) -> Owed {
        Owed::Reading { sensor_id: 1, incarnation: 7, segment: 0, reading: Reading { seq, speed_kmh: 100, timestamp_ms: 1_000 + seq } }
    }

    fn outbox(backlog_bytes: u64) -> Outbox {
        let mut o = Outbox::default();
        o.set_config(OutboxConfig { enabled: true, backlog_bytes });
        o
    }

    #[test]
    fn items_are_numbered_and_leave_once_forwarded() {
        let mut o = outbox(1 << 20);
        for seq in 0..5 {
            o.push(10 + seq, 0, reading(seq));
        }
        assert_eq!(o.last_seq(), 5);
        assert_eq!(o.after(0, 12).map(|i| i.site_seq).collect::<Vec<_>>(), vec![1, 2, 3], "only committed entries leave");
        assert_eq!(o.after(2, u64::MAX).map(|i| i.site_seq).collect::<Vec<_>>(), vec![3, 4, 5]);
        let at3 = o.chain_at(3).unwrap();
        o.forwarded_through(3);
        assert_eq!((o.len(), o.forwarded(), o.bytes()), (2, 3, 2 * ITEM_BYTES));
        o.forwarded_through(2);
        assert_eq!(o.forwarded(), 3, "the position never goes back");
        assert_eq!(o.chain_at(3), Some(at3), "the chain at the position is kept");
        assert!(o.chain_at(2).is_none() && o.chain_at(4).is_some() && o.chain_at(9).is_none());
    }

    #[test]
    fn past_the_bound_the_oldest_are_dropped_and_counted() {
        let mut o = outbox(3 * ITEM_BYTES);
        for seq in 0..5 {
            o.push(1, 0, reading(seq));
        }
        assert_eq!((o.len(), o.dropped(), o.forwarded()), (3, 2, 2));
        assert_eq!(o.after(0, u64::MAX).next().map(|i| i.site_seq), Some(3));
        // The stream still ends where JetStream last acked (nothing, here):
        // the uplink resumes there and the cloud sees the gap.
        assert_eq!(o.chain_at(0), Some(0));
        o.forwarded_through(3);
        for seq in 5..8 {
            o.push(1, 0, reading(seq));
        }
        assert!(o.dropped() > 2);
        assert!(o.chain_at(3).is_some(), "the last acked item's chain outlives drops after it");
    }

    #[test]
    fn dropped_items_that_land_after_all_come_off_the_count() {
        let mut o = outbox(4 * ITEM_BYTES);
        for seq in 0..4 {
            o.push(1, 0, reading(seq));
        }
        // Items 1..=4 went out in one window; six more push 1..=6 out.
        let chain_at_4 = o.chain_at(4).unwrap();
        for seq in 4..10 {
            o.push(1, 0, reading(seq));
        }
        assert_eq!((o.dropped(), o.forwarded(), o.acked_through()), (6, 6, 0));
        assert_eq!(o.check_stream(4, chain_at_4), Ok(()), "a stream ending among the dropped items is this pair's");
        o.acked(4, chain_at_4, 1);
        assert_eq!((o.dropped(), o.forwarded(), o.acked_through(), o.len()), (2, 6, 4, 4), "1..=4 landed; 5 and 6 did not");
        assert_eq!(o.drops(), 6, "the counter of drops never goes down");
        assert_eq!(o.chain_at(4), Some(chain_at_4));
        // The next window resumes after the gap; its ack frees what it covers.
        let chain_at_8 = o.chain_at(8).unwrap();
        o.acked(8, chain_at_8, 7);
        assert_eq!((o.dropped(), o.forwarded(), o.len()), (2, 8, 2));
        // An ack that only says where the stream ends takes nothing off.
        let chain_at_10 = o.chain_at(10).unwrap();
        o.acked(10, chain_at_10, 11);
        assert_eq!((o.dropped(), o.forwarded(), o.len(), o.bytes()), (2, 10, 0, 0));
        o.acked(9, 0, 1);
        assert_eq!((o.dropped(), o.acked_through()), (2, 10), "an old ack changes nothing");
        assert!(o.check_stream(3, 0).unwrap_err().contains("lost items"));
    }

    fn seen(seq: u64) -> ReadingInCloud {
        ReadingInCloud { sensor_id: 1, incarnation: 7, seq, timestamp_ms: 1_000 + seq }
    }

    #[test]
    fn another_history_in_the_cloud_is_taken_over_and_this_sites_items_follow_it() {
        let mut o = outbox(1 << 20);
        for seq in 0..6 {
            o.push(1, 0, reading(seq));
        }
        o.acked(2, o.chain_at(2).unwrap(), 1);
        // The stream holds 1..=3 of this site, then 4..=9 of a side that lost
        // a split, holding readings 4 and 9 of sensor 1 (and others).
        o.add_in_cloud(&[seen(4), seen(9)]);
        o.adopt(3, 9, 0xabc);
        assert_eq!((o.forwarded(), o.acked_through(), o.chain_at(9)), (9, 9, Some(0xabc)));
        let after: Vec<(u64, u64)> = o.after(0, u64::MAX).map(|i| (i.site_seq, if let Owed::Reading { reading, .. } = i.what { reading.seq } else { 0 })).collect();
        assert_eq!(after, vec![(10, 3), (11, 5)], "this site's items after the fork follow the stream, without the readings it holds");
        assert_eq!(o.chain_at(10), Some(reading(3).link(0xabc)));
        assert_eq!(o.adopted(), (6, 1));
        // Reading 9 comes later (the side that lost hands it over): not owed again.
        o.push(2, 0, reading(9));
        o.push(2, 0, reading(10));
        assert_eq!(o.last_seq(), 12);
        assert_eq!(o.after(11, u64::MAX).map(|i| i.site_seq).collect::<Vec<_>>(), vec![12]);
        assert!(o.adopted.in_cloud.is_empty());
        // Forgotten past the horizon.
        o.add_in_cloud(&[seen(20), seen(30)]);
        o.expire_in_cloud(1_025);
        assert_eq!(o.adopted.in_cloud.len(), 1);
        // An adoption that does not fit is ignored.
        o.adopt(50, 60, 1);
        o.adopt(11, u64::MAX, 1);
        o.adopt(11, 5, 1);
        assert_eq!((o.adopted(), o.last_seq()), ((6, 1), 12));
    }

    #[test]
    fn an_item_is_small() {
        assert!(ITEM_BYTES <= 104, "{ITEM_BYTES} bytes an item");
    }

    #[test]
    fn the_chain_tells_two_histories_apart() {
        let (mut a, mut b) = (outbox(1 << 20), outbox(1 << 20));
        for seq in 0..3 {
            a.push(1, 0, reading(seq));
            b.push(1, 0, reading(seq));
        }
        assert_eq!(a.chain_at(3), b.chain_at(3));
        a.push(2, 0, reading(3));
        b.push(2, 0, reading(4));
        assert_ne!(a.chain_at(4), b.chain_at(4), "same site sequence, different item");
    }

    #[test]
    fn without_the_uplink_nothing_is_kept() {
        let mut o = Outbox::default();
        o.push(1, 0, reading(0));
        assert!(o.is_empty());
        assert_eq!(o.last_seq(), 0);
    }

    #[test]
    fn it_survives_encoding() {
        let mut o = outbox(1 << 20);
        o.push(1, 5, reading(0));
        o.push(2, 6, Owed::Average(Average { seq: 0, epoch: 1, segment: 3, window_end_ms: 5_000, count: 2, sum_kmh: 200, revision: 0, chain: 9 }));
        let bytes = postcard::to_allocvec(&o).unwrap();
        let mut back: Outbox = postcard::from_bytes(&bytes).unwrap();
        back.set_config(o.config());
        assert_eq!(back.after(0, u64::MAX).copied().collect::<Vec<_>>(), o.after(0, u64::MAX).copied().collect::<Vec<_>>());
        assert_eq!(back.last_seq(), 2);
    }
}
