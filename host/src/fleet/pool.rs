//! Spreading one pass of sensor calls over threads. Sensors are independent
//! stores, so a pass (a tick slice, a commit's snapshots, a reply's
//! repositions, a status refresh, a step of a hot swap) hands chunks of neighbouring sensors to
//! scoped threads, the caller's own included. A failure on a worker is only
//! noted in its [`Pass`]; the fleet's own thread handles it once the pass is
//! over, in the order a single thread would have met it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, PoisonError};

use crate::sensor::SensorRuntime;

use super::{Fleet, SensorSlot};

/// A pass over fewer sensors than this per thread stays on fewer threads:
/// starting one costs tens of microseconds, a sensor call about one to four.
const MIN_SENSORS_PER_THREAD: usize = 256;
/// Chunks per thread: a thread held up by one slow sensor (a call running
/// into its deadline) leaves the remaining chunks to the others.
const CHUNKS_PER_THREAD: usize = 4;

impl<R: SensorRuntime> Fleet<R> {
    /// Threads for a pass that makes `calls` sensor calls.
    pub(super) fn workers(&self, calls: usize) -> usize {
        self.config.threads.min(calls / MIN_SENSORS_PER_THREAD).max(1)
    }
}

/// A sensor call that failed during a pass, handled once the pass is over.
pub(super) struct Failure {
    pub(super) slot: usize,
    pub(super) call: &'static str,
    pub(super) error: wasmtime::Error,
    /// Where a single thread would have met it within the pass.
    pub(super) order: (u8, usize),
}

/// What one pass over sensors gathered; each thread fills its own, and they
/// are merged in sensor order.
#[derive(Default)]
pub(super) struct Pass {
    pub(super) readings: usize,
    /// Some sensor still has unacked readings or waits for a restart.
    pub(super) unacked: bool,
    pub(super) failures: Vec<Failure>,
}

impl Pass {
    pub(super) fn failed(&mut self, slot: usize, call: &'static str, error: wasmtime::Error) {
        self.failed_at((0, slot), slot, call, error);
    }

    pub(super) fn failed_at(&mut self, order: (u8, usize), slot: usize, call: &'static str, error: wasmtime::Error) {
        self.failures.push(Failure { slot, call, error, order });
    }

    fn merge(&mut self, other: Pass) {
        self.readings += other.readings;
        self.unacked |= other.unacked;
        self.failures.extend(other.failures);
    }
}

/// Calls `visit(pass, index, slot)` for every slot of `slots` (the first
/// being sensor `first`), on up to `workers` threads, the caller's included.
/// The threads take chunks of neighbouring sensors from a shared queue until
/// none is left.
pub(super) fn each_sensor<S: Send, F>(slots: &mut [SensorSlot<S>], first: usize, workers: usize, visit: F) -> Pass
where
    F: Fn(&mut Pass, usize, &mut SensorSlot<S>) + Sync,
{
    let visit_chunk = |pass: &mut Pass, start: usize, chunk: &mut [SensorSlot<S>]| {
        for (k, slot) in chunk.iter_mut().enumerate() {
            visit(pass, start + k, slot);
        }
    };
    if workers <= 1 || slots.is_empty() {
        let mut pass = Pass::default();
        visit_chunk(&mut pass, first, slots);
        return pass;
    }
    let chunk_len = slots.len().div_ceil(workers * CHUNKS_PER_THREAD);
    let chunk_count = slots.len().div_ceil(chunk_len);
    // Popped from the end: reversed, so chunks go out in sensor order.
    let queue = Mutex::new(slots.chunks_mut(chunk_len).enumerate().rev().collect::<Vec<_>>());
    let work = || {
        let mut done: Vec<(usize, Pass)> = Vec::new();
        loop {
            let next = queue.lock().unwrap_or_else(PoisonError::into_inner).pop();
            let Some((c, chunk)) = next else { return done };
            let mut pass = Pass::default();
            visit_chunk(&mut pass, first + c * chunk_len, chunk);
            done.push((c, pass));
        }
    };
    let mut passes: Vec<Option<Pass>> = (0..chunk_count).map(|_| None).collect();
    std::thread::scope(|scope| {
        let helpers: Vec<_> = (1..workers)
            .filter_map(|_| match std::thread::Builder::new().name("sensor-calls".into()).spawn_scoped(scope, work) {
                Ok(handle) => Some(handle),
                Err(e) => {
                    // The chunks it would have taken go to the others.
                    static WARNED: AtomicBool = AtomicBool::new(false);
                    if !WARNED.swap(true, Ordering::Relaxed) {
                        tracing::warn!("cannot start a thread for sensor calls: {e}; fewer threads call into sensors");
                    }
                    None
                }
            })
            .collect();
        for (c, pass) in work() {
            passes[c] = Some(pass);
        }
        for helper in helpers {
            match helper.join() {
                Ok(done) => done.into_iter().for_each(|(c, pass)| passes[c] = Some(pass)),
                // A bug in the host, not a sensor failure: as if on one thread.
                Err(panic) => std::panic::resume_unwind(panic),
            }
        }
    });
    let mut all = Pass::default();
    for pass in passes.into_iter().flatten() {
        all.merge(pass);
    }
    all
}
