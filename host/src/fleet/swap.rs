//! Hot swap: every running sensor moved onto a new component by snapshot
//! and restore, keeping its incarnation so readings in flight are still
//! acked to it. All or nothing: if one sensor cannot move, the old component
//! keeps running. Quarantined sensors get another chance on the new one.
//!
//! The costly part, instantiating the new component once per sensor, does
//! not need the fleet: [`Fleet::swap_plan`] says what to instantiate and
//! [`prepare_swap`] does it on another thread (the driver's loop goes on
//! meanwhile); [`Fleet::swap_prepared`] then moves the state over, a few
//! microseconds a sensor.

use std::time::Instant;

use crate::runtime::SensorConfig;
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

/// What a swap instantiates: a sensor (by its index in the fleet) and its
/// configuration, for every sensor running when the swap was planned; and
/// the seed and fleet size they are instantiated with.
pub struct SwapPlan {
    pub sensors: Vec<(usize, SensorConfig)>,
    seed: u64,
    count: u32,
}

/// New instances of `component`, one per sensor of `plan`: the costly part
/// of a swap, done away from the fleet (on another thread while the driver
/// goes on).
pub fn prepare_swap<R: SensorRuntime>(engine: &R, component: &R::Component, plan: SwapPlan) -> Result<Vec<(usize, R::Sensor)>, SwapError> {
    let origin = || engine.origin(component).to_string();
    plan.sensors
        .into_iter()
        .map(|(i, config)| {
            let id = config.sensor_id;
            let mut new = engine.instantiate(component, config, plan.seed).map_err(|e| SwapError::Instantiate {
                origin: origin(),
                id,
                reason: engine.describe_instantiate_failure(&e, plan.count),
            })?;
            // A first call starts the guest, which touches (and so faults
            // in) the memory it runs in: here, not on the driver's loop.
            // The restore that follows replaces what it started.
            new.init().map_err(|e| SwapError::Restore { origin: origin(), id, reason: engine.describe_failure(&e) })?;
            Ok((i, new))
        })
        .collect()
}

/// What a swap did: how many sensors moved, and their old instances, which
/// the caller drops where it suits it (freeing an instance gives its memory
/// back to the kernel, tens of microseconds each).
pub struct Swapped<S> {
    pub moved: usize,
    pub retired: Vec<Box<S>>,
}

impl<R: SensorRuntime> Fleet<R> {
    /// What [`prepare_swap`] instantiates: one instance per running sensor.
    pub fn swap_plan(&self) -> SwapPlan {
        let sensors = self
            .sensors
            .iter()
            .enumerate()
            .filter(|(_, s)| matches!(s.life, Life::Running(_)))
            .map(|(i, s)| (i, sensor_config(&self.config, s.id, s.segment)))
            .collect();
        SwapPlan { sensors, seed: self.config.seed, count: self.config.count }
    }

    /// Moves every running sensor onto `component` through snapshot and
    /// restore, instantiating it here: [`Fleet::swap_plan`],
    /// [`prepare_swap`] and [`Fleet::swap_prepared`] in one go.
    pub fn swap(&mut self, now: Instant, component: R::Component) -> Result<usize, SwapError> {
        let prepared = prepare_swap(&*self.engine, &component, self.swap_plan())?;
        Ok(self.swap_prepared(now, component, prepared)?.moved)
    }

    /// Moves every running sensor onto `component` through snapshot and
    /// restore into the instances `prepared` holds for them (a sensor
    /// restarted since the plan gets one made here). All or nothing: if any
    /// sensor cannot be moved, the new instances are dropped and the old
    /// component keeps running.
    pub fn swap_prepared(&mut self, now: Instant, component: R::Component, prepared: Vec<(usize, R::Sensor)>) -> Result<Swapped<R::Sensor>, SwapError> {
        self.now = now;
        let mut fresh: Vec<Option<R::Sensor>> = (0..self.sensors.len()).map(|_| None).collect();
        for (i, new) in prepared {
            if let Some(slot) = fresh.get_mut(i) {
                *slot = Some(new);
            }
        }
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
            let origin = self.engine.origin(&component).to_string();
            let mut new = match fresh[i].take() {
                Some(new) => new,
                None => {
                    let config = sensor_config(&self.config, slot.id, slot.segment);
                    self.engine.instantiate(&component, config, self.config.seed).map_err(|e| SwapError::Instantiate {
                        origin: origin.clone(),
                        id: slot.id,
                        reason: self.engine.describe_instantiate_failure(&e, self.config.count),
                    })?
                }
            };
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
        let mut retired = Vec::with_capacity(count);
        for (i, new, state) in moved {
            let slot = &mut self.sensors[i];
            if let Life::Running(old) = std::mem::replace(&mut slot.life, Life::Running(Box::new(new))) {
                retired.push(old);
            }
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
        Ok(Swapped { moved: count, retired })
    }
}
