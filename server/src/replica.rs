//! The replicated state of a node: the exactly-once ledgers, the windows and
//! the average log, the epoch, and the number of the last log entry applied.
//!
//! It changes only by [`Replica::apply`] of a [`LogEntry`], on the active
//! node that writes the entry, on the passive that receives it, and on any
//! node replaying its write-ahead log. Records carry the time the active
//! decided at, so the same entries applied in the same order give the same
//! state everywhere; an `AveragesPublished` record also carries the average
//! seq that should follow it, which catches a replica that diverged.

use fog_protocol::{LogEntry, Record};
use serde::{Deserialize, Serialize};

use crate::ingest::Ingest;
use crate::outbox::{Outbox, OutboxConfig, Owed};
use crate::windows::{WindowConfig, Windows};

/// A log entry that could not be applied as it came.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ApplyError {
    #[error("log entry {got} does not follow entry {last}")]
    OutOfOrder { last: u64, got: u64 },
    #[error("entry {lsn}: publishing gave next average seq {got}, the active had {expected}")]
    Diverged { lsn: u64, expected: u64, got: u64 },
}

/// Why a snapshot could not be read.
#[derive(Debug, thiserror::Error)]
#[error("undecodable snapshot: {0}")]
pub struct SnapshotError(pub String);

/// Marks an `AveragesPublished` record whose resulting seq is not known yet
/// (the active fills it in after publishing).
pub const UNKNOWN_SEQ: u64 = u64::MAX;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Replica {
    pub ingest: Ingest,
    pub windows: Windows,
    pub epoch: u64,
    /// The last entry applied; 0 for none.
    pub lsn: u64,
    /// What the site still owes the cloud. Encoded after the rest of the
    /// replica, so a snapshot from before the uplink reads as an empty one.
    #[serde(skip)]
    pub outbox: Outbox,
}

impl Replica {
    pub fn new(cfg: WindowConfig) -> Self {
        Replica {
            ingest: Ingest::new(cfg.dedup_horizon_ms),
            windows: Windows::new(cfg),
            epoch: 0,
            lsn: 0,
            outbox: Outbox::default(),
        }
    }

    /// Keeps (or not) what is owed to the cloud; the same on both nodes.
    pub fn set_outbox(&mut self, cfg: OutboxConfig) {
        self.outbox.set_config(cfg);
    }

    /// Applies the entry that follows the last one applied. A divergence is
    /// reported after the entry was applied (the state moved on regardless).
    pub fn apply(&mut self, entry: &LogEntry) -> Result<(), ApplyError> {
        if entry.lsn != self.lsn + 1 {
            return Err(ApplyError::OutOfOrder { last: self.lsn, got: entry.lsn });
        }
        self.lsn = entry.lsn;
        match &entry.record {
            Record::ReadingsAccepted { now_ms, sensors } => {
                for s in sensors {
                    let key = (s.sensor_id, s.incarnation);
                    let (windows, outbox) = (&mut self.windows, &mut self.outbox);
                    self.ingest.admit_all(*now_ms, key, &s.readings, |r| {
                        windows.add(*now_ms, s.segment, r);
                        let owed = Owed::Reading { sensor_id: s.sensor_id, incarnation: s.incarnation, segment: s.segment, reading: *r };
                        outbox.push(entry.lsn, *now_ms, owed);
                    });
                    if s.average_cursor.is_some() {
                        self.windows.note_cursor(s.sensor_id, s.average_cursor);
                    }
                }
            }
            Record::AveragesPublished { now_ms, next_seq } => {
                for average in self.windows.handle_timeout(*now_ms, entry.epoch) {
                    self.outbox.push(entry.lsn, *now_ms, Owed::Average(average));
                }
                self.ingest.compact(*now_ms);
                self.outbox.expire_in_cloud(now_ms.saturating_sub(self.windows.config().dedup_horizon_ms));
                let got = self.windows.next_seq();
                if *next_seq != UNKNOWN_SEQ && *next_seq != got {
                    return Err(ApplyError::Diverged { lsn: entry.lsn, expected: *next_seq, got });
                }
            }
            Record::EpochChanged { epoch } => self.epoch = self.epoch.max(*epoch),
            Record::UplinkForwarded { through } => self.outbox.forwarded_through(*through),
            Record::UplinkAcked { through, chain, landed_from } => self.outbox.acked(*through, *chain, *landed_from),
            Record::UplinkInCloud { readings } => self.outbox.add_in_cloud(readings),
            Record::UplinkAdopted { fork, end, chain } => self.outbox.adopt(*fork, *end, *chain),
        }
        Ok(())
    }

    /// The replica, then its outbox, then what the outbox took over of
    /// another history.
    pub fn encode(&self) -> Result<Vec<u8>, SnapshotError> {
        let err = |e: postcard::Error| SnapshotError(e.to_string());
        let bytes = postcard::to_allocvec(self).map_err(err)?;
        let bytes = postcard::to_extend(&self.outbox, bytes).map_err(err)?;
        postcard::to_extend(self.outbox.adopted_state(), bytes).map_err(err)
    }

    /// Reads [`Replica::encode`]'s bytes; a snapshot from before the
    /// uplink (nothing after the replica) has an empty outbox, one from
    /// before adoptions (nothing after the outbox) none taken over.
    pub fn decode(bytes: &[u8], cfg: WindowConfig, outbox: OutboxConfig) -> Result<Self, SnapshotError> {
        Self::decode_split(bytes, cfg, outbox).map(|(r, _)| r)
    }

    /// [`Replica::decode`], and where in `bytes` the replica ends (its
    /// outbox follows): the pieces a node's own snapshot is made of, so a
    /// passive that installs one need not encode it again.
    pub fn decode_split(bytes: &[u8], cfg: WindowConfig, outbox: OutboxConfig) -> Result<(Self, usize), SnapshotError> {
        let err = |e: postcard::Error| SnapshotError(e.to_string());
        let (mut r, rest): (Replica, &[u8]) = postcard::take_from_bytes(bytes).map_err(err)?;
        let replica_end = bytes.len() - rest.len();
        if !rest.is_empty() {
            let (o, rest): (Outbox, &[u8]) = postcard::take_from_bytes(rest).map_err(err)?;
            r.outbox = o;
            if !rest.is_empty() {
                r.outbox.set_adopted_state(postcard::from_bytes(rest).map_err(err)?);
            }
        }
        r.set_config(cfg);
        r.set_outbox(outbox);
        Ok((r, replica_end))
    }

    /// Puts the configuration of this node on a state loaded from a snapshot.
    pub fn set_config(&mut self, cfg: WindowConfig) {
        self.windows.set_config(cfg);
        self.ingest.set_horizon(cfg.dedup_horizon_ms);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fog_protocol::{Reading, SensorBatch};

    const T0: u64 = 1_700_000_000_000;

    fn readings(lsn: u64, now: u64, seqs: std::ops::Range<u64>) -> LogEntry {
        LogEntry {
            lsn,
            epoch: 1,
            solo: false,
            record: Record::ReadingsAccepted {
                now_ms: now,
                sensors: vec![SensorBatch {
                    sensor_id: 1,
                    incarnation: 2,
                    segment: 0,
                    readings: seqs.map(|seq| Reading { seq, speed_kmh: 100, timestamp_ms: now }).collect(),
                    average_cursor: None,
                }],
            },
        }
    }

    #[test]
    fn the_outbox_owes_counted_readings_and_averages_and_survives_a_snapshot() {
        let cfg = OutboxConfig { enabled: true, backlog_bytes: 1 << 20 };
        let mut a = Replica::new(WindowConfig::default());
        a.set_outbox(cfg);
        a.apply(&readings(1, T0, 0..5)).unwrap();
        // Resends are counted once, and owed once.
        a.apply(&readings(2, T0, 3..7)).unwrap();
        a.apply(&LogEntry { lsn: 3, epoch: 1, solo: false, record: Record::AveragesPublished { now_ms: T0 + 7_000, next_seq: UNKNOWN_SEQ } }).unwrap();
        let owed: Vec<_> = a.outbox.after(0, u64::MAX).copied().collect();
        let readings_owed: Vec<u64> = owed.iter().filter_map(|i| match i.what { Owed::Reading { reading, .. } => Some(reading.seq), Owed::Average(_) => None }).collect();
        assert_eq!(readings_owed, (0..7).collect::<Vec<_>>());
        let averages = owed.iter().filter(|i| !i.what.is_reading()).count() as u64;
        assert_eq!(averages, a.windows.averages_published());
        assert!(averages >= 1);
        assert_eq!(owed.iter().map(|i| i.site_seq).collect::<Vec<_>>(), (1..=owed.len() as u64).collect::<Vec<_>>(), "site sequences are gap-free");
        // The position moves by a record; a snapshot carries what is left.
        a.apply(&LogEntry { lsn: 4, epoch: 1, solo: false, record: Record::UplinkForwarded { through: 3 } }).unwrap();
        a.apply(&LogEntry { lsn: 5, epoch: 1, solo: false, record: Record::UplinkInCloud { readings: vec![fog_protocol::ReadingInCloud { sensor_id: 1, incarnation: 9, seq: 99, timestamp_ms: T0 }] } }).unwrap();
        let b = Replica::decode(&a.encode().unwrap(), WindowConfig::default(), cfg).unwrap();
        assert_eq!(b.outbox.forwarded(), 3);
        assert_eq!(b.outbox.adopted_state(), a.outbox.adopted_state(), "what was taken over of another history is in the snapshot");
        assert_eq!(b.outbox.after(0, u64::MAX).copied().collect::<Vec<_>>(), a.outbox.after(0, u64::MAX).copied().collect::<Vec<_>>());
        assert_eq!(b.outbox.last_seq(), a.outbox.last_seq());
        // A snapshot from before the uplink (no outbox after the replica).
        let old = postcard::to_allocvec(&a).unwrap();
        let c = Replica::decode(&old, WindowConfig::default(), cfg).unwrap();
        assert!(c.outbox.is_empty());
        assert_eq!(c.ingest.counted(), 7);
        // Trailing junk is an error, not a silent empty outbox.
        let mut junk = old.clone();
        junk.extend_from_slice(&[0xff; 3]);
        assert!(Replica::decode(&junk, WindowConfig::default(), cfg).is_err());
    }

    #[test]
    fn the_same_entries_give_the_same_state_through_a_snapshot() {
        let mut a = Replica::new(WindowConfig::default());
        a.apply(&readings(1, T0, 0..5)).unwrap();
        let mut b = Replica::decode(&a.encode().unwrap(), WindowConfig::default(), OutboxConfig::default()).unwrap();
        let publish = |lsn| LogEntry {
            lsn,
            epoch: 1,
            solo: false,
            record: Record::AveragesPublished { now_ms: T0 + 3_000, next_seq: UNKNOWN_SEQ },
        };
        a.apply(&publish(2)).unwrap();
        let mut checked = publish(2);
        checked.record = Record::AveragesPublished { now_ms: T0 + 3_000, next_seq: a.windows.next_seq() };
        b.apply(&checked).unwrap();
        assert_eq!(a.windows.retained().collect::<Vec<_>>(), b.windows.retained().collect::<Vec<_>>());
        assert_eq!(b.ingest.counted(), 5);
        assert_eq!(b.lsn, 2);
    }

    /// A small history that leaves something in every part of the state:
    /// buckets and windows of two segments, a revision, a reading outside
    /// the windows, averages of two epochs, and sensors' cursors.
    fn history() -> Vec<LogEntry> {
        let batch = |lsn, now_ms, sensors| LogEntry { lsn, epoch: if lsn < 4 { 1 } else { 2 }, solo: false, record: Record::ReadingsAccepted { now_ms, sensors } };
        // Seqs derive from the stamps, so each reading has its own.
        let sensor = |sensor_id, segment, stamps: &[u64], average_cursor| SensorBatch {
            sensor_id,
            incarnation: 7,
            segment,
            readings: stamps.iter().enumerate().map(|(i, &ts)| Reading { seq: ts % 1_000 + i as u64, speed_kmh: 80 + i as u16, timestamp_ms: ts }).collect(),
            average_cursor,
        };
        let publish = |lsn, epoch, now_ms| LogEntry { lsn, epoch, solo: false, record: Record::AveragesPublished { now_ms, next_seq: UNKNOWN_SEQ } };
        let cursor = fog_protocol::AverageCursor { seq: 2, epoch: 1, chain: 0x9e37_79b9_7f4a_7c15 };
        vec![
            batch(1, T0, vec![sensor(1, 0, &[T0 + 100, T0 + 600, T0 + 1_200], None), sensor(2, 1, &[T0 + 300, T0 - 11 * 60 * 1_000], None)]),
            publish(2, 1, T0 + 3_000),
            LogEntry { lsn: 3, epoch: 2, solo: false, record: Record::EpochChanged { epoch: 2 } },
            batch(4, T0 + 3_100, vec![sensor(1, 0, &[T0 + 200], Some(cursor)), sensor(2, 1, &[T0 + 3_050], None)]),
            publish(5, 2, T0 + 4_000),
        ]
    }

    /// The snapshot of [`history`] as fog-server wrote it before the average
    /// log was a struct of its own (hex, in lines).
    const HISTORY_SNAPSHOT: &str = concat!(
        "020107000464e4d095ffbc31c801c8d195ffbc31ca01b0d995ffbc31d904d8d495ffbc3104c302b0d995ffbc31020700",
        "0301e0abedfebc3132eae795ffbc31ac02acd295ffbc3103f101eae795ffbc310700000000040180d095ffbc31015000",
        "e8d795ffbc3101520080d095ffbc3103f10101b8e795ffbc3101500601e8d795ffbc3101500001d0df95ffbc31015000",
        "00d0df95ffbc3104c3020100b8e795ffbc3104c3020000e8d795ffbc3103f1010101b8e795ffbc3101500008a0ef95ff",
        "bc3100a0ef95ffbc310188f795ffbc310088f795ffbc3101f0fe95ffbc3100f0fe95ffbc3101d88696ffbc3101c08e96",
        "ffbc310108b8e795ffbc31010100e8d795ffbc3102a10100fcdbf2e19283a4af9901b8e795ffbc31020101e8d795ffbc",
        "31015000ada5bcbba9b2c1af66b8e795ffbc31030100d0df95ffbc3103f30100c485d3e3b4a7878ea901b8e795ffbc31",
        "040101d0df95ffbc31015000e495ae99c3ad92f636a0ef95ffbc31050200e8d795ffbc3103f10101b4deb3d9fdd4d9ca",
        "63a0ef95ffbc31060200d0df95ffbc3104c30201c4bf86ffe08483f1b801a0ef95ffbc31070200b8e795ffbc3104c302",
        "00eeede8c7c7be8ebb7ca0ef95ffbc31080201b8e795ffbc3101500096a8c2fdcedd8dc3400000000201010205090101",
        "020195f8a9fa97b7de9b9e01010802a0ef95ffbc310205",
    );

    /// A node reads the snapshots of the version before it (its peer's,
    /// during a rolling upgrade, or its own on disk) and goes on from them
    /// exactly as a node that applied the history itself. Postcard encodes
    /// by position, so a field moved, added or dropped shows here.
    #[test]
    fn a_snapshot_of_the_previous_version_loads_and_goes_on_alike() {
        let bytes: Vec<u8> = (0..HISTORY_SNAPSHOT.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&HISTORY_SNAPSHOT[i..i + 2], 16).unwrap())
            .collect();
        let (mut loaded, rest) = postcard::take_from_bytes::<Replica>(&bytes).unwrap();
        assert!(rest.is_empty(), "{} bytes left over", rest.len());
        loaded.set_config(WindowConfig::default());
        let mut replayed = Replica::new(WindowConfig::default());
        for e in history() {
            replayed.apply(&e).unwrap();
        }
        // The maps come out in any order, so compare lengths, not bytes.
        // (The replica part: the outbox follows it in a snapshot.)
        assert_eq!(postcard::to_allocvec(&replayed).unwrap().len(), bytes.len());
        let seen = |r: &Replica| {
            let w = &r.windows;
            (
                (r.lsn, r.epoch, r.ingest.counted(), w.next_seq(), w.poll_timeout()),
                (w.averages_published(), w.revisions_published(), w.too_late(), w.cursor(1), w.cursor(2)),
                w.chain().collect::<Vec<_>>(),
                w.retained().copied().collect::<Vec<_>>(),
            )
        };
        assert_eq!(seen(&loaded), seen(&replayed));
        assert_eq!(loaded.windows.revisions_published(), 2, "the history revises windows");
        // A straggler and the next publications revise the same windows alike.
        let more = [
            LogEntry { lsn: 6, epoch: 2, solo: false, record: Record::ReadingsAccepted { now_ms: T0 + 4_100, sensors: vec![SensorBatch { sensor_id: 2, incarnation: 7, segment: 1, readings: vec![Reading { seq: 900, speed_kmh: 60, timestamp_ms: T0 + 900 }], average_cursor: None }] } },
            LogEntry { lsn: 7, epoch: 2, solo: false, record: Record::AveragesPublished { now_ms: T0 + 20_000, next_seq: UNKNOWN_SEQ } },
        ];
        for e in &more {
            loaded.apply(e).unwrap();
            replayed.apply(e).unwrap();
        }
        assert_eq!(seen(&loaded), seen(&replayed));
    }

    #[test]
    fn gaps_and_divergence_are_reported() {
        let mut a = Replica::new(WindowConfig::default());
        assert_eq!(a.apply(&readings(2, T0, 0..1)), Err(ApplyError::OutOfOrder { last: 0, got: 2 }));
        a.apply(&readings(1, T0, 0..1)).unwrap();
        let wrong = LogEntry {
            lsn: 2,
            epoch: 1,
            solo: false,
            record: Record::AveragesPublished { now_ms: T0 + 3_000, next_seq: 99 },
        };
        assert!(matches!(a.apply(&wrong), Err(ApplyError::Diverged { expected: 99, .. })));
    }

    /// An endless run in miniature: 20 sensors that restart (new
    /// incarnation) every 10 minutes, a batch every 10 s, averages published
    /// after each, for 12 hours. The snapshot (what a node writes to disk
    /// and sends a joining passive) stays bounded, and a replica started
    /// from a mid-run snapshot compacts exactly like the original.
    #[test]
    fn an_endless_run_keeps_the_snapshot_bounded_and_replicas_compact_alike() {
        let mut a = Replica::new(WindowConfig::default());
        let mut b: Option<Replica> = None;
        let mut lsn = 0;
        let mut sizes = Vec::new();
        let mut generated = 0u64;
        for tick in 0..(12 * 360u64) {
            let now = T0 + tick * 10_000;
            let sensors = (0..20u32)
                .map(|sensor_id| SensorBatch {
                    sensor_id,
                    incarnation: tick / 60,
                    segment: 0,
                    readings: vec![Reading { seq: tick % 60, speed_kmh: 90, timestamp_ms: now - 500 }],
                    average_cursor: None,
                })
                .collect();
            generated += 20;
            let entries = [
                LogEntry { lsn: lsn + 1, epoch: 1, solo: false, record: Record::ReadingsAccepted { now_ms: now, sensors } },
                LogEntry { lsn: lsn + 2, epoch: 1, solo: false, record: Record::AveragesPublished { now_ms: now + 1, next_seq: UNKNOWN_SEQ } },
            ];
            lsn += 2;
            for e in &entries {
                a.apply(e).unwrap();
                if let Some(b) = b.as_mut() {
                    b.apply(e).unwrap();
                }
            }
            if tick % 360 == 359 {
                sizes.push(a.encode().unwrap().len());
            }
            if tick == 2 * 360 {
                b = Some(Replica::decode(&a.encode().unwrap(), WindowConfig::default(), OutboxConfig::default()).unwrap());
            }
        }
        let b = b.unwrap();
        assert_eq!(a.ingest.counted(), generated);
        assert_eq!((b.ingest.counted(), b.ingest.retired(), b.ingest.per_sensor()), (a.ingest.counted(), a.ingest.retired(), a.ingest.per_sensor()));
        assert!(a.ingest.retired().incarnations >= 20 * 60, "incarnations older than the horizon were retired: {:?}", a.ingest.retired());
        // After the first hour (the dedup horizon) the snapshot stops growing.
        let settled = &sizes[2..];
        let (lo, hi) = (settled.iter().min().unwrap(), settled.iter().max().unwrap());
        assert!(*hi <= lo + lo / 10, "snapshot sizes per hour grow: {sizes:?}");
    }
}
