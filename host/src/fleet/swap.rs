//! Hot swap: every running sensor moved onto a new component by snapshot
//! and restore, keeping its incarnation so readings in flight are still
//! acked to it. All or nothing: if one sensor cannot move, the old component
//! keeps running. Quarantined sensors get another chance on the new one.

use std::time::Instant;

use crate::sensor::{SensorCalls, SensorRuntime};
use crate::state::Saved;

use super::{Fleet, Life, sensor_config};

/// Why a hot swap was refused; the old component keeps running.
#[derive(Debug, thiserror::Error)]
pub enum SwapError {
    #[error("cannot instantiate {origin} for sensor {id}: {reason}")]
    Instantiate { origin: String, id: u32, reason: String },
    #[error("{origin} cannot take over sensor {id}: restore failed: {reason}")]
    Restore { origin: String, id: u32, reason: String },
}

impl<R: SensorRuntime> Fleet<R> {
    /// Moves every running sensor onto `component` through snapshot and
    /// restore. All or nothing: if any sensor cannot be moved, the new
    /// instances are dropped and the old component keeps running.
    pub fn swap(&mut self, now: Instant, component: R::Component) -> Result<usize, SwapError> {
        self.now = now;
        let mut moved: Vec<(usize, R::Sensor, Vec<u8>)> = Vec::new();
        for i in 0..self.sensors.len() {
            let slot = &mut self.sensors[i];
            let Life::Running(old) = &mut slot.life else { continue };
            let state = match old.snapshot() {
                Ok(state) => state,
                Err(e) => {
                    // The old sensor failed: it restarts, on the new component
                    // if the swap goes through.
                    self.fail(i, "snapshot", &e);
                    continue;
                }
            };
            let config = sensor_config(&self.config, slot.id, slot.segment);
            let origin = self.engine.origin(&component).to_string();
            let mut new = self.engine.instantiate(&component, config, self.config.seed).map_err(|e| {
                SwapError::Instantiate { origin: origin.clone(), id: slot.id, reason: self.engine.describe_instantiate_failure(&e, self.config.count) }
            })?;
            match new.restore(&state, &[]) {
                Ok(Ok(())) => {}
                Ok(Err(reason)) => return Err(SwapError::Restore { origin, id: slot.id, reason }),
                Err(e) => return Err(SwapError::Restore { origin, id: slot.id, reason: self.engine.describe_failure(&e) }),
            }
            // The incarnation must survive the move, or the readings in
            // flight would be acked to an identity the sensor no longer has.
            match new.init() {
                Ok(incarnation) if incarnation == slot.incarnation => {}
                Ok(incarnation) => {
                    return Err(SwapError::Restore {
                        origin,
                        id: slot.id,
                        reason: format!("incarnation changed from {} to {incarnation}", slot.incarnation),
                    });
                }
                Err(e) => return Err(SwapError::Restore { origin, id: slot.id, reason: self.engine.describe_failure(&e) }),
            }
            moved.push((i, new, state));
        }
        let count = moved.len();
        for (i, new, state) in moved {
            let slot = &mut self.sensors[i];
            slot.life = Life::Running(Box::new(new));
            slot.last_ack = None;
            // The state directory holds an older snapshot; the next commit
            // writes this one.
            slot.saved = Saved { snapshot: state, since: Vec::new() };
            slot.saved_at = now;
            slot.snapshot_unwritten = true;
            slot.since_written = 0;
        }
        self.component = component;
        self.swaps += 1;
        // The new component may be the fix: every quarantined sensor gets
        // a fresh start on it, from its last good state.
        let mut revived = 0;
        for slot in &mut self.sensors {
            if matches!(slot.life, Life::Quarantined) {
                slot.failures = 0;
                slot.life = Life::Restarting { at: now };
                revived += 1;
            }
        }
        if revived > 0 {
            tracing::info!("hot swap: {revived} quarantined sensors get another chance on the new component");
        }
        Ok(count)
    }
}
