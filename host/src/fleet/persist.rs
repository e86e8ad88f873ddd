//! Persistence: what a restart of a sensor resumes from. The fleet keeps
//! each sensor's last snapshot and the readings that left after it (see
//! the [fleet docs](super)); with a state directory, [`Fleet::commit`]
//! writes what is new of them, a batch's readings and the snapshots taken
//! since the last commit, with one fsync before the batch leaves, and the
//! server epoch is saved there too.

use std::time::Instant;

use crate::runtime::WitReading;
use crate::sensor::{SensorCalls, SensorRuntime};
use crate::state::{Record, Saved};

use super::pool::each_sensor;
use super::{Fleet, Make};

/// Restores `sensor` from a saved state: its snapshot and the readings that
/// left after it (the WIT `restore`). `Ok(Err(reason))` when it refused.
pub(super) fn restore<S: SensorCalls>(sensor: &mut S, saved: &Saved) -> wasmtime::Result<Result<(), String>> {
    let since: Vec<WitReading> = saved.since.iter().map(WitReading::from).collect();
    sensor.restore(&saved.snapshot, &since)
}

impl<R: SensorRuntime> Fleet<R> {
    /// Whether committed snapshots go to a state directory.
    pub fn has_state_dir(&self) -> bool {
        self.store.is_some()
    }

    /// Saves a newer server epoch and its seal in the state directory, if
    /// there is one.
    pub fn save_epoch(&self, epoch: u64, seal: &fog_protocol::Seal) -> std::io::Result<()> {
        match &self.store {
            Some(store) => store.save_epoch(epoch, seal),
            None => Ok(()),
        }
    }

    /// Writes what the state directory lacks of the sensors' saved state
    /// (snapshots taken, readings put into batches since the last commit)
    /// with one fsync; returns how many sensors it wrote for. Must follow
    /// [`Fleet::take_batch`] and precede sending the batch: a reading may
    /// only leave once a restart would resume after it. Without a state
    /// directory there is nothing to write.
    pub fn commit(&mut self) -> std::io::Result<usize> {
        let Some(store) = self.store.as_mut() else { return Ok(0) };
        let fresh: Vec<usize> =
            (0..self.sensors.len()).filter(|&i| self.sensors[i].snapshot_unwritten || self.sensors[i].since_written < self.sensors[i].saved.since.len()).collect();
        if fresh.is_empty() {
            return Ok(0);
        }
        let sensors = &self.sensors;
        if store.needs_compaction() {
            store.compact(sensors.iter().map(|s| (s.id, s.saved.snapshot.as_slice(), s.saved.since.as_slice())))?;
        } else {
            let records = fresh.iter().flat_map(|&i| {
                let s = &sensors[i];
                let snapshot = s.snapshot_unwritten.then(|| (s.id, Record::Snapshot(&s.saved.snapshot)));
                // A snapshot not yet written has no readings written after it.
                let since = &s.saved.since[s.since_written..];
                let readings = (!since.is_empty()).then(|| (s.id, Record::Readings(since)));
                snapshot.into_iter().chain(readings)
            });
            store.append(records)?;
        }
        for &i in &fresh {
            let s = &mut self.sensors[i];
            s.snapshot_unwritten = false;
            s.since_written = s.saved.since.len();
        }
        Ok(fresh.len())
    }

    /// Snapshots and commits every running sensor, each after a visit
    /// that hands over its news: the state on disk then reflects every ack
    /// and average that came, so a restart resends nothing. A hot swap under way is dropped
    /// first (the old component's states are the ones to keep).
    pub fn commit_all(&mut self, now: Instant) -> std::io::Result<usize> {
        if let Some(dropped) = self.cancel_swap() {
            tracing::warn!("a hot swap was cut short to commit every sensor's state ({} new instances dropped)", dropped.len());
        }
        self.now = now;
        let workers = self.workers(self.sensors.len());
        let averages = &self.averages;
        let pass = each_sensor(&mut self.sensors, 0, workers, |pass, i, slot| {
            // The visit leaves the status it returns.
            if let Err(error) = slot.visit(averages, Make::NONE, now) {
                return pass.failed(i, "tick", error);
            }
            if let Err(error) = slot.take_snapshot(now) {
                pass.failed(i, "snapshot", error);
            }
        });
        self.handle_failures(pass.failures);
        self.commit()
    }
}
