//! Spreading one pass of sensor calls over threads. Sensors are independent
//! stores, so a pass (a tick slice, a commit's snapshots, a reply's
//! repositions, a status refresh, a step of a hot swap) hands chunks of neighbouring sensors to
//! scoped threads, the caller's own included. A failure on a worker is only
//! noted in its [`Pass`]; the fleet's own thread handles it once the pass is
//! over, in the order a single thread would have met it. The start of a
//! fleet is spread the same way ([`start_sensors`]).

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Mutex, PoisonError};

use crate::sensor::SensorRuntime;

use super::{Fleet, START_CHUNK, SensorSlot};
use crate::state::Saved;

/// A pass over fewer sensors than this per thread stays on fewer threads:
/// starting one costs tens of microseconds, a sensor call about one to four.
const MIN_SENSORS_PER_THREAD: usize = 256;
/// Chunks per thread: a thread held up by one slow sensor (a call running
/// into its deadline) leaves the remaining chunks to the others.
const CHUNKS_PER_THREAD: usize = 4;

impl<R: SensorRuntime> Fleet<R> {
    /// Threads for a pass that makes `calls` sensor calls.
    pub(super) fn workers(&self, calls: usize) -> usize {
        workers_for(self.config.threads, calls)
    }
}

/// Threads, of at most `threads`, for a pass that makes `calls` calls.
pub(super) fn workers_for(threads: usize, calls: usize) -> usize {
    threads.min(calls / MIN_SENSORS_PER_THREAD).max(1)
}

/// Starts sensor `i` with `resumed[i]` by `start(i, resumed[i])` for
/// every `i`, in chunks of [`START_CHUNK`] on up to `workers` threads (the
/// caller's included), and returns them in order; `progress` hears how
/// many have started after each chunk. On a failure no further chunk is
/// begun, and the first failure in sensor order is returned.
pub(super) fn start_sensors<T: Send, E: Send>(
    resumed: Vec<Option<Saved>>,
    workers: usize,
    progress: &(dyn Fn(usize) + Sync),
    start: impl Fn(usize, Option<Saved>) -> Result<T, E> + Sync,
) -> Result<Vec<T>, E> {
    let count = resumed.len();
    let mut chunks: Vec<(usize, Vec<Option<Saved>>)> = Vec::with_capacity(count.div_ceil(START_CHUNK));
    let mut rest = resumed.into_iter();
    for first in (0..count).step_by(START_CHUNK) {
        chunks.push((first, rest.by_ref().take(START_CHUNK).collect()));
    }
    let started = AtomicUsize::new(0);
    let done = spread(chunks, workers, "sensor-start", |_, (first, chunk)| {
        let n = chunk.len();
        let result: Result<Vec<T>, E> = chunk.into_iter().enumerate().map(|(k, saved)| start(first + k, saved)).collect();
        progress(started.fetch_add(n, Ordering::Relaxed) + n);
        let failed = result.is_err();
        (result, failed)
    });
    let mut sensors = Vec::with_capacity(count);
    for result in done {
        sensors.extend(result?);
    }
    Ok(sensors)
}

/// Runs `run(c, chunk)` for every chunk on up to `workers` threads named
/// `name` (the caller's included), which take the chunks in order from a
/// shared queue until none is left, and returns the outputs in chunk
/// order. Once a run returns `true` (stop), no further chunk is begun:
/// the outputs are then those of the chunks begun, a prefix.
fn spread<C: Send, O: Send>(chunks: Vec<C>, workers: usize, name: &str, run: impl Fn(usize, C) -> (O, bool) + Sync) -> Vec<O> {
    let count = chunks.len();
    // Popped from the end: reversed, so chunks go out in order.
    let queue = Mutex::new(chunks.into_iter().enumerate().rev().collect::<Vec<_>>());
    let stopped = AtomicBool::new(false);
    let work = || {
        let mut done: Vec<(usize, O)> = Vec::new();
        while !stopped.load(Ordering::Relaxed) {
            let next = queue.lock().unwrap_or_else(PoisonError::into_inner).pop();
            let Some((c, chunk)) = next else { break };
            let (out, stop) = run(c, chunk);
            stopped.fetch_or(stop, Ordering::Relaxed);
            done.push((c, out));
        }
        done
    };
    let mut outs: Vec<Option<O>> = (0..count).map(|_| None).collect();
    std::thread::scope(|scope| {
        let helpers: Vec<_> = (1..workers)
            .filter_map(|_| match std::thread::Builder::new().name(name.into()).spawn_scoped(scope, work) {
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
        for (c, out) in work() {
            outs[c] = Some(out);
        }
        for helper in helpers {
            match helper.join() {
                Ok(done) => done.into_iter().for_each(|(c, out)| outs[c] = Some(out)),
                // A bug in the host, not a sensor failure: as if on one thread.
                Err(panic) => std::panic::resume_unwind(panic),
            }
        }
    });
    outs.into_iter().flatten().collect()
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
    let passes = spread(slots.chunks_mut(chunk_len).collect(), workers, "sensor-calls", |c, chunk| {
        let mut pass = Pass::default();
        visit_chunk(&mut pass, first + c * chunk_len, chunk);
        (pass, false)
    });
    let mut all = Pass::default();
    for pass in passes {
        all.merge(pass);
    }
    all
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_start_on_threads_keeps_sensor_order_and_reports_the_first_failure() {
        let n = 5 * START_CHUNK + 7;
        let resumed = || (0..n).map(|i| (i % 3 == 0).then(|| Saved { snapshot: vec![i as u8], since: Vec::new() })).collect::<Vec<_>>();
        let most = AtomicUsize::new(0);
        let progress = |done: usize| {
            most.fetch_max(done, Ordering::Relaxed);
        };
        let threads = std::sync::Mutex::new(std::collections::HashSet::new());
        let started = start_sensors(resumed(), 2, &progress, |i, saved| {
            threads.lock().unwrap().insert(std::thread::current().id());
            if i % START_CHUNK == 0 {
                // Long enough for the other thread to take a chunk.
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            Ok::<_, usize>((i, saved.map(|s| s.snapshot)))
        })
        .unwrap();
        assert_eq!(started.len(), n);
        assert!(started.iter().enumerate().all(|(k, (i, s))| *i == k && *s == (k % 3 == 0).then(|| vec![k as u8])));
        assert_eq!(most.load(Ordering::Relaxed), n, "progress reaches every sensor");
        assert_eq!(threads.lock().unwrap().len(), 2, "both threads started sensors");
        // Sensors 1500 and 3000 fail, on whichever thread: the first is reported.
        for _ in 0..20 {
            let r = start_sensors(resumed(), 2, &|_| {}, |i, _| if i == 1500 || i == 3000 { Err(i) } else { Ok(i) });
            assert_eq!(r.unwrap_err(), 1500);
        }
        // One thread does the same.
        let r = start_sensors(resumed(), 1, &|_| {}, |i, _| if i == 3000 { Err(i) } else { Ok(i) });
        assert_eq!(r.unwrap_err(), 3000);
    }
}
