//! Persistence: the commit that makes each sensor's state after its last
//! tick the one to restart from. It must precede every batch, so no reading
//! leaves the host before the state that produced it would survive a
//! restart. With a state directory, the committed snapshots are written with
//! one fsync (appended, or the whole file compacted), and the server epoch
//! is saved there too.

use std::time::{Duration, Instant};

use crate::sensor::{SensorCalls, SensorRuntime};

use super::pool::each_sensor;
use super::{Fleet, Life};

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

    /// Commits the state of every sensor ticked since the last commit (each
    /// tick returns the state after it): with a state directory, writes
    /// them with one fsync. Must precede every batch: a reading may only
    /// leave the host once the state that produced it is the one a restart
    /// would resume from.
    pub fn commit(&mut self) -> std::io::Result<usize> {
        let fresh: Vec<usize> = (0..self.sensors.len()).filter(|&i| self.sensors[i].dirty).collect();
        for &i in &fresh {
            self.sensors[i].dirty = false;
        }
        if let (Some(store), false) = (self.store.as_mut(), fresh.is_empty()) {
            let sensors = &self.sensors;
            let written = if store.needs_compaction() {
                store.compact(sensors.iter().filter_map(|s| Some((s.id, s.saved.as_deref()?))))
            } else {
                // Only the snapshots just taken: the others are on disk.
                store.append(fresh.iter().filter_map(|&i| Some((sensors[i].id, sensors[i].saved.as_deref()?))))
            };
            if let Err(e) = written {
                // Write these again next time, so that what is on disk
                // catches up before any of their readings is sent.
                for &i in &fresh {
                    self.sensors[i].dirty = true;
                }
                return Err(e);
            }
        }
        Ok(fresh.len())
    }

    /// Snapshots and commits every running sensor: the state on disk then
    /// reflects every ack applied, so a restart resends nothing.
    pub fn commit_all(&mut self, now: Instant) -> std::io::Result<usize> {
        self.now = now;
        let workers = self.workers(self.sensors.len());
        let pass = each_sensor(&mut self.sensors, 0, workers, |pass, i, slot| {
            if let Err(error) = slot.give_ack(now, Duration::ZERO) {
                return pass.failed(i, "on-ack", error);
            }
            let Life::Running(inst) = &mut slot.life else { return };
            match inst.snapshot().and_then(|state| Ok((state, inst.status()?))) {
                Ok((state, status)) => {
                    slot.saved = Some(state);
                    slot.status = Some(status);
                    slot.dirty = true;
                }
                Err(error) => pass.failed(i, "snapshot", error),
            }
        });
        self.handle_failures(pass.failures);
        self.commit()
    }
}
