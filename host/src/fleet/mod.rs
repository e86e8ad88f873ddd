//! The sensors of one host: instantiates them, ticks them, gathers their
//! readings into batches for the server, and routes the server's acks,
//! averages and repositions back to the right instance.
//!
//! It is also where a sensor's life is managed. The fleet keeps, for every
//! sensor, its last snapshot (taken every [`SNAPSHOT_EVERY`], or sooner
//! when many readings left since) and the readings that left the host
//! after it, and [`Fleet::commit`] writes the readings of each batch
//! before the batch leaves (with a state directory, with one fsync). That
//! is the sensor's last good state, cheap to keep: a tick costs no
//! snapshot. A sensor whose call traps, runs past its deadline or grows
//! past its memory cap is stopped, reported once, and after a backoff
//! restarted from its snapshot and those readings (the WIT `restore`), so
//! its sequence continues after every reading that left and every unacked
//! one is resent when due. A sensor that keeps failing is quarantined; the
//! others never notice.
//!
//! Sensors are independent stores, so the calls of one pass (a tick slice,
//! a commit's snapshots, a reply's acks and repositions, a status refresh) are
//! spread over worker threads, each taking chunks of neighbouring sensors.
//! A failure found on a worker is only noted there; it is handled on the
//! fleet's own thread once the pass is over, in the order a single thread
//! would have met it.
//!
//! This file holds the [`Fleet`], its configuration, one sensor's slot, and
//! the calls that start, tick and read the sensors. The rest of the fleet's
//! work is one file per responsibility, each an `impl Fleet` of its own:
//!
//! - `batch`: which sensors go into a batch within the protocol's caps, and
//!   a reply's acks, averages and repositions routed back to them;
//! - `news`: what replies leave for the sensors (the averages, one list for
//!   the fleet, and each sensor's acks), taken right before each tick;
//! - `persist`: committing the sensors' states, to the state directory if
//!   there is one, before any of their readings leaves the host;
//! - `supervisor`: a failed sensor stopped, restarted after a backoff from
//!   its last good state, or quarantined;
//! - `swap`: every running sensor moved onto a new component, all or
//!   nothing;
//! - `pool`: one pass of sensor calls spread over threads, its failures
//!   gathered for the supervisor.

mod batch;
mod news;
mod persist;
mod pool;
mod supervisor;
mod swap;

use std::collections::HashMap;
use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, Instant};

use fog_protocol::{AverageCursor, Reading};
use serde::Serialize;

use crate::runtime::{SensorConfig, SensorEngine, SensorStatus};
use crate::sensor::{SensorCalls, SensorRuntime};
use crate::state::{Saved, StateStore};

use self::batch::AckView;

/// A sensor's snapshot is taken again this long after the last one...
pub const SNAPSHOT_EVERY: Duration = Duration::from_secs(10);
/// ... or once this many readings left the host since: what a restart
/// replays stays short.
pub const SNAPSHOT_AFTER_READINGS: usize = 256;
use self::pool::each_sensor;
pub use self::swap::{SWAP_STEP, SwapError, SwapPlan, Swapped, prepare_swap};

/// How every sensor of the fleet is configured.
#[derive(Debug, Clone)]
pub struct FleetConfig {
    pub first_id: u32,
    pub count: u32,
    pub segments: u32,
    pub resend_after_ms: u64,
    pub max_buffered: u32,
    pub settings: Vec<(String, String)>,
    /// Fresh for every start of the host; sensors derive their incarnation
    /// from it, so a sensor started afresh never reuses a reading id.
    pub seed: u64,
    /// Wait before the first restart of a failed sensor; doubles with each
    /// further failure.
    pub restart_backoff: Duration,
    /// Failures in a row after which a sensor is quarantined (not restarted).
    pub max_restarts: u32,
    /// Threads that call into sensors at once (at least 1: the caller's own).
    pub threads: usize,
    /// The reading interval in milliseconds: several readings made in one
    /// visit are stamped this far apart. Only when it is longer than
    /// [`news::CATCH_UP_AFTER`] are sensors visited in between to take
    /// their news (a sensor that reads rarely still follows the averages);
    /// a host that visits less often to make several readings a visit
    /// (`--visit-every`) hands the news over at those visits, and one
    /// that falls behind its round adds no visits to it.
    pub every_ms: u32,
}

/// The new readings one visit asks a sensor for (the WIT `visit.make` and
/// `visit.every-ms`).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Make {
    count: u32,
    every_ms: u32,
}

impl Make {
    /// A visit that only hands over news.
    const NONE: Make = Make { count: 0, every_ms: 0 };
}

enum Life<S> {
    Running(Box<S>),
    /// Stopped after a failure; restarted from its last good state at `at`.
    Restarting { at: Instant },
    /// Failed too often; not restarted.
    Quarantined,
}

struct SensorSlot<S> {
    id: u32,
    segment: u32,
    incarnation: u64,
    life: Life<S>,
    /// Failures since the last quiet period.
    failures: u32,
    running_since: Instant,
    /// Readings returned by `tick` and not yet put into a batch.
    pending: Vec<Reading>,
    /// The sensor's position in the average stream (its average ack).
    cursor: Option<AverageCursor>,
    /// Last status read from the sensor.
    status: Option<SensorStatus>,
    /// The sensor's last snapshot, and the readings that left the host
    /// after it was taken: the state to restart from.
    saved: Saved,
    /// When `saved` was taken.
    saved_at: Instant,
    /// What of `saved` the state directory lacks: the snapshot, and the
    /// readings from `since_written` on.
    snapshot_unwritten: bool,
    since_written: usize,
    /// The last ack the running instance took. Replies often ack a sensor
    /// again with what it already knows; within one instance sequence
    /// numbers only grow, so the same ack again would change nothing and
    /// is dropped. Cleared whenever a new instance takes over.
    last_ack: Option<AckView>,
    /// Acks from replies not yet given to the sensor, merged into one (it
    /// takes them with its news, see [`news`]).
    unsent_ack: Option<AckView>,
    /// When the sensor last took its news.
    news_taken_at: Instant,
}

/// Why the fleet could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot instantiate sensor {id}: {reason}")]
    Instantiate { id: u32, reason: String },
    #[error("sensor {id} failed in init: {reason}")]
    Init { id: u32, reason: String },
    #[error(
        "cannot resume sensor {id} from its saved state: {reason} (start with another --state-dir, or move the old one away, to start every sensor afresh)"
    )]
    Resume { id: u32, reason: String },
}

impl<S: SensorCalls> SensorSlot<S> {
    /// A new snapshot of the running instance replaces the saved state.
    fn take_snapshot(&mut self, now: Instant) -> wasmtime::Result<()> {
        let Life::Running(inst) = &mut self.life else { return Ok(()) };
        let snapshot = inst.snapshot()?;
        self.saved = Saved { snapshot, since: Vec::new() };
        self.saved_at = now;
        self.snapshot_unwritten = true;
        self.since_written = 0;
        Ok(())
    }
}

impl<S> SensorSlot<S> {
    /// Takes the readings a tick returned into `pending`, but not a resend
    /// of one still there: it has not left yet (the host is behind), and
    /// sending it twice would only add to what holds the host up. The
    /// sensor keeps it until it is acked, so nothing is lost.
    fn take_readings(&mut self, readings: &[crate::runtime::WitReading]) {
        let waiting = self.pending.len();
        if waiting == 0 {
            self.pending.extend(readings.iter().map(Reading::from));
            return;
        }
        let mut seqs: Vec<u64> = self.pending.iter().map(|r| r.seq).collect();
        seqs.sort_unstable();
        let fresh = readings.iter().filter(|r| seqs.binary_search(&r.seq).is_err());
        self.pending.extend(fresh.map(Reading::from));
    }
}

/// Per-sensor figures of the host's summary.
#[derive(Debug, Clone, Serialize)]
pub struct SensorSummary {
    pub sensor_id: u32,
    pub segment: u32,
    pub incarnation: u64,
    pub generated: u64,
    pub acked: u64,
    pub unacked: u64,
    pub resent: u64,
    pub overflowed: u64,
    pub sum_kmh: u64,
    pub averages_applied: u64,
    pub averages_missed: u64,
    pub averages_superseded: u64,
    /// The chain value at `last_average_seq`.
    pub averages_digest: String,
    pub last_average_seq: Option<u64>,
    pub limit_kmh: u32,
    /// Not running at the end (restarting or quarantined).
    pub failed: bool,
    pub quarantined: bool,
    /// Failures since the sensor last ran quietly for a minute.
    pub failures: u32,
}

/// The sensors of one host, and what the host keeps about each of them.
///
/// Generic over what makes the sensors ([`SensorRuntime`]): wasmtime
/// components in `fog-host`, sensor code compiled in for the simulation.
pub struct Fleet<R: SensorRuntime = SensorEngine> {
    engine: Arc<R>,
    component: R::Component,
    config: FleetConfig,
    /// Sensor `i` has id `config.first_id + i` (wrapping).
    sensors: Vec<SensorSlot<R::Sensor>>,
    store: Option<StateStore>,
    /// Sensor failures (traps, deadlines, memory) over the run.
    pub failures: u64,
    pub restarts: u64,
    /// Hot swaps done.
    pub swaps: u64,
    /// When the first sensor waiting for a restart is due (`None`: none
    /// waits), so a tick does not look at every sensor for one.
    next_restart: Option<Instant>,
    /// The averages replies brought, which each sensor takes from.
    averages: news::Averages,
    /// When the fleet last looked for sensors to catch up.
    last_catch_up: Option<Instant>,
    /// A hot swap under way: ticks, restarts and catch-ups wait for it.
    swapping: Option<swap::Swapping<R>>,
    /// When a batch last carried every running sensor.
    last_full_batch: Option<Instant>,
    /// Where the next batch starts looking for sensors, so that when the
    /// protocol's caps leave some out, the next batch takes them first.
    batch_start: usize,
    /// Sensors of the current once-a-second pass not yet in a batch.
    full_pass_left: usize,
    /// The cursors of the last batches taken, for their replies.
    carried: std::collections::VecDeque<batch::Carried>,
    /// Readings refused by a server, per reason (logged once per reason).
    refused: std::collections::BTreeMap<String, u64>,
    /// The time of the call under way: the fleet reads no clock, its
    /// caller hands it the time with every call that needs one.
    now: Instant,
}

impl<R: SensorRuntime> Fleet<R> {
    /// Starts every sensor: from its saved state when `store` holds one,
    /// afresh otherwise; on the fleet's threads, in chunks of neighbouring
    /// sensors.
    pub fn start(
        engine: Arc<R>,
        component: R::Component,
        config: FleetConfig,
        store: Option<(StateStore, HashMap<u32, Saved>)>,
        now: Instant,
    ) -> Result<Self, StartError> {
        Self::start_reporting(engine, component, config, store, now, &|_| {})
    }

    /// [`Fleet::start`], calling `progress` with the number of sensors
    /// started so far (from any of the threads that start them, after
    /// each chunk of [`START_CHUNK`]).
    pub fn start_reporting(
        engine: Arc<R>,
        component: R::Component,
        config: FleetConfig,
        store: Option<(StateStore, HashMap<u32, Saved>)>,
        now: Instant,
        progress: &(dyn Fn(usize) + Sync),
    ) -> Result<Self, StartError> {
        let (store, mut saved) = match store {
            Some((store, saved)) => (Some(store), saved),
            None => (None, HashMap::new()),
        };
        let resumed: Vec<Option<Saved>> = (0..config.count).map(|i| saved.remove(&config.first_id.wrapping_add(i))).collect();
        let workers = pool::workers_for(config.threads, resumed.len());
        let sensors = pool::start_sensors(resumed, workers, progress, |i, resumed| start_sensor(&*engine, &component, &config, i, resumed, now))?;
        if !saved.is_empty() {
            tracing::info!("the state directory also holds {} sensors this host does not run; kept as they are", saved.len());
        }
        Ok(Self {
            engine,
            component,
            config,
            sensors,
            store,
            failures: 0,
            restarts: 0,
            swaps: 0,
            next_restart: None,
            averages: news::Averages::default(),
            last_catch_up: None,
            swapping: None,
            last_full_batch: None,
            batch_start: 0,
            full_pass_left: 0,
            carried: std::collections::VecDeque::new(),
            refused: std::collections::BTreeMap::new(),
            now,
        })
    }

    pub fn len(&self) -> usize {
        self.sensors.len()
    }

    pub fn is_empty(&self) -> bool {
        self.sensors.is_empty()
    }

    pub fn engine(&self) -> &Arc<R> {
        &self.engine
    }

    /// Where the running component came from.
    pub fn component_origin(&self) -> &str {
        self.engine.origin(&self.component)
    }

    /// The sensors of tick slice `k` of `slices`: contiguous, so a slice's
    /// stores sit together in memory.
    pub fn slice(&self, k: usize, slices: usize) -> Range<usize> {
        let n = self.sensors.len();
        let slices = slices.max(1);
        (n * k / slices)..(n * (k + 1) / slices)
    }

    /// Visits the sensors in `range` once at `now`: each takes its news
    /// (see [`news`]) and makes `make` readings (the last stamped now, the
    /// others [`FleetConfig::every_ms`] apart), in one call; then those due
    /// a snapshot take one (see [`SNAPSHOT_EVERY`]). Returns how many
    /// readings they handed over. While a hot swap is under way nothing
    /// ticks (see [`swap`]).
    pub fn tick(&mut self, now: Instant, range: Range<usize>, make: u32) -> usize {
        if self.swapping() {
            return 0;
        }
        self.catch_up(now);
        self.now = now;
        let workers = self.workers(range.len());
        let first = range.start;
        let averages = &self.averages;
        let make = Make { count: make, every_ms: self.config.every_ms };
        let pass = each_sensor(&mut self.sensors[range], first, workers, |pass, i, slot| {
            match slot.visit(averages, make, now) {
                Ok(returned) => pass.readings += returned,
                Err(error) => return pass.failed(i, "tick", error),
            }
            let due = now >= slot.saved_at + SNAPSHOT_EVERY || slot.saved.since.len() >= SNAPSHOT_AFTER_READINGS;
            if due {
                if let Err(error) = slot.take_snapshot(now) {
                    pass.failed(i, "snapshot", error);
                }
            }
        });
        self.handle_failures(pass.failures);
        pass.readings
    }

    /// Visits every sensor once, each making `make` readings.
    pub fn tick_all(&mut self, now: Instant, make: u32) -> usize {
        self.tick(now, 0..self.sensors.len(), make)
    }

    /// Visits every running sensor with its news (its unsent ack, the
    /// averages it lacks) and nothing to make, and keeps the status it
    /// returns; returns whether all their readings are acked and no sensor
    /// waits for a restart (a quarantined sensor is not waited for). While
    /// a hot swap is under way the statuses stay as they are and it
    /// returns false: the swap is waited for.
    pub fn refresh_status(&mut self, now: Instant) -> bool {
        if self.swapping() {
            return false;
        }
        self.now = now;
        let workers = self.workers(self.sensors.len());
        let averages = &self.averages;
        let pass = each_sensor(&mut self.sensors, 0, workers, |pass, i, slot| {
            match &slot.life {
                Life::Running(_) => match slot.visit(averages, Make::NONE, now) {
                    Ok(returned) => {
                        pass.readings += returned;
                        let buffered = slot.status.as_ref().is_some_and(|s| s.buffered > 0);
                        pass.unacked |= buffered || !slot.pending.is_empty();
                    }
                    Err(error) => {
                        pass.unacked = true;
                        pass.failed(i, "tick", error);
                    }
                },
                Life::Restarting { .. } => pass.unacked = true,
                Life::Quarantined => {}
            }
        });
        self.handle_failures(pass.failures);
        !pass.unacked
    }

    /// Per-sensor figures from the last status refresh.
    pub fn summaries(&self) -> Vec<SensorSummary> {
        self.sensors
            .iter()
            .map(|s| {
                let st = s.status.as_ref();
                SensorSummary {
                    sensor_id: s.id,
                    segment: s.segment,
                    incarnation: s.incarnation,
                    generated: st.map_or(0, |x| x.generated),
                    acked: st.map_or(0, |x| x.acked),
                    unacked: st.map_or(0, |x| x.generated.saturating_sub(x.acked)),
                    resent: st.map_or(0, |x| x.resent),
                    overflowed: st.map_or(0, |x| x.overflowed),
                    sum_kmh: st.map_or(0, |x| x.sum_kmh),
                    averages_applied: st.map_or(0, |x| x.averages_applied),
                    averages_missed: st.map_or(0, |x| x.averages_missed),
                    averages_superseded: st.map_or(0, |x| x.averages_superseded),
                    averages_digest: format!("{:016x}", st.map_or(0, |x| x.averages_digest)),
                    last_average_seq: st.and_then(|x| x.last_average.map(|c| c.seq)),
                    limit_kmh: st.map_or(0, |x| x.limit_kmh),
                    failed: !matches!(s.life, Life::Running(_)),
                    quarantined: matches!(s.life, Life::Quarantined),
                    failures: s.failures,
                }
            })
            .collect()
    }

    /// Where the sensor with this id sits, if this fleet runs it.
    fn index_of(&self, sensor_id: u32) -> Option<usize> {
        let i = sensor_id.wrapping_sub(self.config.first_id) as usize;
        self.sensors.get(i).filter(|s| s.id == sensor_id).map(|_| i)
    }
}

/// Sensors started by one thread at a time when a fleet starts.
pub const START_CHUNK: usize = 1024;

/// Starts sensor `i` of the fleet: from `resumed` when the state
/// directory holds its state, afresh otherwise.
fn start_sensor<R: SensorRuntime>(
    engine: &R,
    component: &R::Component,
    config: &FleetConfig,
    i: usize,
    resumed: Option<Saved>,
    now: Instant,
) -> Result<SensorSlot<R::Sensor>, StartError> {
    let i = i as u32;
    let id = config.first_id.wrapping_add(i);
    let segment = if config.segments == 0 { 0 } else { i % config.segments };
    let sensor_config = sensor_config(config, id, segment);
    // One seed for the whole fleet: sensors mix in their id for the
    // incarnation, and share traffic events (jams) per segment.
    let mut instance = engine
        .instantiate(component, sensor_config, config.seed)
        .map_err(|e| StartError::Instantiate { id, reason: engine.describe_instantiate_failure(&e, config.count) })?;
    if let Some(state) = &resumed {
        match persist::restore(&mut instance, state) {
            Ok(Ok(())) => {}
            Ok(Err(reason)) => return Err(StartError::Resume { id, reason }),
            Err(e) => {
                return Err(StartError::Resume { id, reason: engine.describe_failure(&e) });
            }
        }
    }
    let incarnation = instance.init().map_err(|e| StartError::Init { id, reason: engine.describe_failure(&e) })?;
    // A resumed sensor reports where its average stream stands.
    let status = if resumed.is_some() { instance.status().ok() } else { None };
    // A fresh sensor's first snapshot: what a restart before its
    // next one resumes from.
    let (saved, fresh) = match resumed {
        Some(state) => (state, false),
        None => {
            let snapshot = instance.snapshot().map_err(|e| StartError::Init { id, reason: engine.describe_failure(&e) })?;
            (Saved { snapshot, since: Vec::new() }, true)
        }
    };
    let since_written = saved.since.len();
    Ok(SensorSlot {
        id,
        segment,
        incarnation,
        life: Life::Running(Box::new(instance)),
        failures: 0,
        running_since: now,
        pending: Vec::new(),
        cursor: status.as_ref().and_then(|s| s.last_average).map(AverageCursor::from),
        status,
        saved,
        saved_at: now,
        snapshot_unwritten: fresh,
        since_written,
        last_ack: None,
        unsent_ack: None,
        news_taken_at: now,
    })
}

pub(crate) fn sensor_config(config: &FleetConfig, id: u32, segment: u32) -> SensorConfig {
    SensorConfig {
        sensor_id: id,
        segment,
        resend_after_ms: config.resend_after_ms,
        max_buffered: config.max_buffered,
        settings: config.settings.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::WitReading;

    impl<S> SensorSlot<S> {
        /// Sensor 1 of incarnation 7, with nothing pending, taken or saved.
        pub(super) fn for_test(life: Life<S>, now: Instant) -> Self {
            SensorSlot {
                id: 1,
                segment: 0,
                incarnation: 7,
                life,
                failures: 0,
                running_since: now,
                pending: Vec::new(),
                cursor: None,
                status: None,
                saved: Saved { snapshot: Vec::new(), since: Vec::new() },
                saved_at: now,
                snapshot_unwritten: false,
                since_written: 0,
                last_ack: None,
                unsent_ack: None,
                news_taken_at: now,
            }
        }
    }

    #[test]
    fn a_resend_of_a_reading_still_waiting_to_leave_is_not_taken_twice() {
        let now = Instant::now();
        let mut slot: SensorSlot<()> = SensorSlot::for_test(Life::Quarantined, now);
        let r = |seq| WitReading { seq, speed_kmh: 90, timestamp_ms: 1_000 + seq };
        slot.take_readings(&[r(5), r(6)]);
        // 5 and 6 again (resent while still waiting), 7 new, 2 resent after it left.
        slot.take_readings(&[r(2), r(5), r(6), r(7)]);
        let seqs: Vec<u64> = slot.pending.iter().map(|r| r.seq).collect();
        assert_eq!(seqs, vec![5, 6, 2, 7]);
        // Once they left, a resend is taken.
        slot.pending.clear();
        slot.take_readings(&[r(5)]);
        assert_eq!(slot.pending.len(), 1);
    }
}
