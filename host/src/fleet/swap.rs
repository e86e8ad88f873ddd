//! Hot swap: every running sensor moved onto a new component by snapshot
//! and restore, keeping its incarnation so readings in flight are still
//! acked to it. All or nothing: if one sensor cannot move, the old component
//! keeps running. Quarantined sensors get another chance on the new one.
//!
//! The costly part, instantiating the new component once per sensor, does
//! not need the fleet: [`Fleet::swap_plan`] says what to instantiate and
//! [`prepare_swap`] does it on another thread (the driver's loop goes on
//! meanwhile). [`Fleet::begin_swap`] then takes those instances, and
//! [`Fleet::swap_step`] moves the states over, [`SWAP_STEP`] sensors at a
//! time (a few microseconds each, over the fleet's worker threads), so a
//! loop that calls it once a turn goes on serving replies and timers
//! between steps however large the fleet. Meanwhile the fleet makes no
//! readings (its ticks wait, so no sensor's state moves on after it was
//! moved), replies are taken in as always (their acks and averages wait for
//! the sensors' next tick, a reposition goes to the old and the new
//! instance), and the last step puts every new instance in place at once,
//! or, if one sensor could not move, none.

use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

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

/// The prepared instances no sensor took.
fn unused<S>(fresh: Vec<Mutex<Option<S>>>) -> impl Iterator<Item = Box<S>> {
    fresh.into_iter().filter_map(|f| f.into_inner().unwrap_or_else(PoisonError::into_inner).map(Box::new))
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Sensors one [`Fleet::swap_step`] moves at most: 5 to 12 ms of the loop's
/// time on two threads.
pub const SWAP_STEP: usize = 1024;

/// What a finished swap did: how many sensors moved, or why none did; and
/// the instances it leaves behind (the old ones, or the new ones when it
/// was refused), which the caller drops where it suits it (freeing an
/// instance gives its memory back to the kernel, microseconds each).
pub struct Swapped<S> {
    pub outcome: Result<usize, SwapError>,
    pub retired: Vec<Box<S>>,
    /// Steps it took, and the longest of them.
    pub steps: usize,
    pub longest_step: Duration,
}

/// A hot swap under way (see the module docs).
pub(super) struct Swapping<R: SensorRuntime> {
    component: R::Component,
    origin: String,
    /// The instance prepared for sensor `i`, until it is moved.
    fresh: Vec<Mutex<Option<R::Sensor>>>,
    /// What moving sensor `i` found, once it was moved.
    moves: Vec<Mutex<Move<R::Sensor>>>,
    /// The first sensor not yet moved.
    next: usize,
    steps: usize,
    longest_step: Duration,
}

impl<R: SensorRuntime> Swapping<R> {
    /// Gives a reposition to sensor `i`'s new instance too, if it has one
    /// already, so it does not fall behind its old one.
    pub(super) fn reposition(&self, i: usize, rewind_to: Option<u64>, to: crate::runtime::WitCursor) -> wasmtime::Result<()> {
        if let Some(Move::Moved(new, _)) = self.moves.get(i).map(lock).as_deref_mut() {
            new.on_reposition(rewind_to, to)?;
        }
        Ok(())
    }
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
    /// [`prepare_swap`], [`Fleet::begin_swap`] and every
    /// [`Fleet::swap_step`] in one go.
    pub fn swap(&mut self, now: Instant, component: R::Component) -> Result<usize, SwapError> {
        let prepared = prepare_swap(&*self.engine, &component, self.swap_plan())?;
        self.begin_swap(component, prepared);
        loop {
            if let Some(done) = self.swap_step(now) {
                return done.outcome;
            }
        }
    }

    /// Whether a swap is under way: the fleet's ticks wait for it.
    pub fn swapping(&self) -> bool {
        self.swapping.is_some()
    }

    /// Starts moving every running sensor onto `component`, into the
    /// instances `prepared` holds for them (a sensor restarted since the
    /// plan gets one made when it is moved); [`Fleet::swap_step`] does the
    /// moving. A swap already under way is cut short first.
    pub fn begin_swap(&mut self, component: R::Component, prepared: Vec<(usize, R::Sensor)>) {
        if let Some(cut) = self.cancel_swap() {
            tracing::warn!("a hot swap was cut short by another ({} new instances dropped)", cut.len());
        }
        let n = self.sensors.len();
        let fresh: Vec<Mutex<Option<R::Sensor>>> = (0..n).map(|_| Mutex::new(None)).collect();
        for (i, new) in prepared {
            if let Some(slot) = fresh.get(i) {
                *lock(slot) = Some(new);
            }
        }
        let origin = self.engine.origin(&component).to_string();
        let moves = (0..n).map(|_| Mutex::new(Move::Stays)).collect();
        self.swapping = Some(Swapping { component, origin, fresh, moves, next: 0, steps: 0, longest_step: Duration::ZERO });
    }

    /// Drops a swap under way; the old component keeps running. Returns the
    /// new instances made so far, for the caller to drop where it suits it.
    pub fn cancel_swap(&mut self) -> Option<Vec<Box<R::Sensor>>> {
        let swap = self.swapping.take()?;
        let staged = swap.moves.into_iter().filter_map(|m| match m.into_inner().unwrap_or_else(PoisonError::into_inner) {
            Move::Moved(new, _) => Some(Box::new(new)),
            _ => None,
        });
        let fresh = unused(swap.fresh);
        Some(staged.chain(fresh).collect())
    }

    /// Moves the next [`SWAP_STEP`] sensors of the swap under way onto
    /// their new instances; after the last, puts them all in place (or,
    /// if one could not move, none). `None` while there is more to do
    /// (and when no swap is under way).
    pub fn swap_step(&mut self, now: Instant) -> Option<Swapped<R::Sensor>> {
        self.now = now;
        let began = Instant::now();
        let mut swap = self.swapping.take()?;
        let range = swap.next..(swap.next + SWAP_STEP).min(self.sensors.len());
        swap.next = range.end;
        let workers = self.workers(range.len());
        let (engine, config) = (&*self.engine, &self.config);
        each_sensor(&mut self.sensors[range.clone()], range.start, workers, |_, i, slot| {
            let outcome = move_one(engine, config, &swap.component, &swap.origin, slot, lock(&swap.fresh[i]).take());
            *lock(&swap.moves[i]) = outcome;
        });
        swap.steps += 1;
        swap.longest_step = swap.longest_step.max(began.elapsed());
        let refused = range.into_iter().any(|i| matches!(*lock(&swap.moves[i]), Move::Refused(_)));
        if !refused && swap.next < self.sensors.len() {
            self.swapping = Some(swap);
            return None;
        }
        Some(self.finish_swap(now, swap))
    }

    /// Every sensor moved, or one refused: puts the new instances in place,
    /// or drops them.
    fn finish_swap(&mut self, now: Instant, swap: Swapping<R>) -> Swapped<R::Sensor> {
        let Swapping { component, fresh, moves, steps, longest_step, .. } = swap;
        let mut retired: Vec<Box<R::Sensor>> = unused(fresh).collect();
        let mut moved: Vec<(usize, R::Sensor, Vec<u8>)> = Vec::new();
        let mut refusal = None;
        for (i, outcome) in moves.into_iter().enumerate() {
            match outcome.into_inner().unwrap_or_else(PoisonError::into_inner) {
                Move::Stays => {}
                // The old sensor failed: it restarts, on the new component
                // if the swap goes through.
                Move::SnapshotFailed(e) => self.fail(i, "snapshot", &e),
                Move::Refused(e) => {
                    refusal.get_or_insert(e);
                }
                // A sensor that failed since it moved (a reposition) stays
                // as it is: it restarts on the new component.
                Move::Moved(new, _) if !matches!(self.sensors[i].life, Life::Running(_)) => retired.push(Box::new(new)),
                Move::Moved(new, state) => moved.push((i, new, state)),
            }
        }
        if let Some(e) = refusal {
            retired.extend(moved.into_iter().map(|(_, new, _)| Box::new(new)));
            return Swapped { outcome: Err(e), retired, steps, longest_step };
        }
        let count = moved.len();
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
            self.restart_at(now);
            tracing::info!("hot swap: {revived} quarantined sensors get another chance on the new component");
        }
        Swapped { outcome: Ok(count), retired, steps, longest_step }
    }
}
