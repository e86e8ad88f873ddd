//! Hot swap: every running sensor moved onto a new component by snapshot
//! and restore, keeping its incarnation so readings in flight are still
//! acked to it. All or nothing: if one sensor cannot move, the old component
//! keeps running. Quarantined sensors get another chance on the new one.
//!
//! The costly part, instantiating the new component once per sensor, does
//! not need the fleet: [`Fleet::swap_plan`] says what to instantiate and
//! [`prepare_swap`] does it on another thread (the driver's loop goes on
//! meanwhile); [`Fleet::swap_prepared`] then moves the state over, a few
//! microseconds a sensor, spread over the fleet's worker threads.

use std::sync::{Mutex, PoisonError};
use std::time::Instant;

use crate::runtime::SensorConfig;
use crate::sensor::{SensorCalls, SensorRuntime};
use crate::state::Saved;

use super::pool::each_sensor;
use super::{Fleet, FleetConfig, Life, SensorSlot, sensor_config};

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

/// What moving one sensor found.
enum Move<S> {
    /// Not running: nothing to move.
    Stays,
    /// The old instance could not give its state.
    SnapshotFailed(wasmtime::Error),
    /// The new component cannot take the sensor over: the swap is off.
    Refused(SwapError),
    /// The new instance, restored, and the state it was restored from.
    Moved(S, Vec<u8>),
}

/// Moves one running sensor onto a new instance of `component` (`fresh`,
/// or one made here): snapshot, restore, and the incarnation checked.
fn move_one<R: SensorRuntime>(
    engine: &R,
    config: &FleetConfig,
    component: &R::Component,
    origin: &str,
    slot: &mut SensorSlot<R::Sensor>,
    fresh: Option<R::Sensor>,
) -> Move<R::Sensor> {
    let Life::Running(old) = &mut slot.life else { return Move::Stays };
    let state = match old.snapshot() {
        Ok(state) => state,
        Err(e) => return Move::SnapshotFailed(e),
    };
    let (id, incarnation) = (slot.id, slot.incarnation);
    let refused = |reason: String| Move::Refused(SwapError::Restore { origin: origin.to_string(), id, reason });
    let mut new = match fresh {
        Some(new) => new,
        None => match engine.instantiate(component, sensor_config(config, id, slot.segment), config.seed) {
            Ok(new) => new,
            Err(e) => {
                let reason = engine.describe_instantiate_failure(&e, config.count);
                return Move::Refused(SwapError::Instantiate { origin: origin.to_string(), id, reason });
            }
        },
    };
    match new.restore(&state, &[]) {
        Ok(Ok(())) => {}
        Ok(Err(reason)) => return refused(reason),
        Err(e) => return refused(engine.describe_failure(&e)),
    }
    // The incarnation must survive the move, or the readings in flight
    // would be acked to an identity the sensor no longer has.
    match new.init() {
        Ok(now) if now == incarnation => Move::Moved(new, state),
        Ok(now) => refused(format!("incarnation changed from {incarnation} to {now}")),
        Err(e) => refused(engine.describe_failure(&e)),
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
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
        let n = self.sensors.len();
        let fresh: Vec<Mutex<Option<R::Sensor>>> = (0..n).map(|_| Mutex::new(None)).collect();
        for (i, new) in prepared {
            if let Some(slot) = fresh.get(i) {
                *lock(slot) = Some(new);
            }
        }
        // Every sensor's move is its own (two stores, no shared state): the
        // moves go over the worker threads, and what they found is handled
        // here in sensor order, as one thread would have met it.
        let outcomes: Vec<Mutex<Move<R::Sensor>>> = (0..n).map(|_| Mutex::new(Move::Stays)).collect();
        let origin = self.engine.origin(&component).to_string();
        let workers = self.workers(n);
        let (engine, config) = (&*self.engine, &self.config);
        each_sensor(&mut self.sensors, 0, workers, |_, i, slot| {
            let outcome = move_one(engine, config, &component, &origin, slot, lock(&fresh[i]).take());
            *lock(&outcomes[i]) = outcome;
        });
        let mut moved: Vec<(usize, R::Sensor, Vec<u8>)> = Vec::new();
        for (i, outcome) in outcomes.into_iter().enumerate() {
            match outcome.into_inner().unwrap_or_else(PoisonError::into_inner) {
                Move::Stays => {}
                // The old sensor failed: it restarts, on the new component
                // if the swap goes through.
                Move::SnapshotFailed(e) => self.fail(i, "snapshot", &e),
                Move::Refused(e) => return Err(e),
                Move::Moved(new, state) => moved.push((i, new, state)),
            }
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
