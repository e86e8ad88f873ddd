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
}

impl Replica {
    pub fn new(cfg: WindowConfig) -> Self {
        Replica {
            ingest: Ingest::new(),
            windows: Windows::new(cfg),
            epoch: 0,
            lsn: 0,
        }
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
                    for r in &s.readings {
                        if self.ingest.admit(key, r) {
                            self.windows.add(*now_ms, s.segment, r);
                        }
                    }
                    if s.average_cursor.is_some() {
                        self.windows.note_cursor(s.sensor_id, s.average_cursor);
                    }
                }
            }
            Record::AveragesPublished { now_ms, next_seq } => {
                self.windows.handle_timeout(*now_ms);
                let got = self.windows.next_seq();
                if *next_seq != UNKNOWN_SEQ && *next_seq != got {
                    return Err(ApplyError::Diverged { lsn: entry.lsn, expected: *next_seq, got });
                }
            }
            Record::EpochChanged { epoch } => self.epoch = self.epoch.max(*epoch),
        }
        Ok(())
    }

    pub fn encode(&self) -> Result<Vec<u8>, SnapshotError> {
        postcard::to_allocvec(self).map_err(|e| SnapshotError(e.to_string()))
    }

    pub fn decode(bytes: &[u8], cfg: WindowConfig) -> Result<Self, SnapshotError> {
        let mut r: Replica = postcard::from_bytes(bytes).map_err(|e| SnapshotError(e.to_string()))?;
        r.windows.set_config(cfg);
        Ok(r)
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
    fn the_same_entries_give_the_same_state_through_a_snapshot() {
        let mut a = Replica::new(WindowConfig::default());
        a.apply(&readings(1, T0, 0..5)).unwrap();
        let mut b = Replica::decode(&a.encode().unwrap(), WindowConfig::default()).unwrap();
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
}
