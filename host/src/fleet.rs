//! The sensors of one host: instantiates them, ticks them, gathers their
//! readings into batches for the server, and routes the server's acks,
//! averages and repositions back to the right instance.
//!
//! It is also where a sensor's life is managed. Every tick returns the
//! sensor's state after it, and before any reading goes out in a batch,
//! [`Fleet::commit`] makes the states of the sensors ticked since the last
//! commit the ones to restart from (with a state directory, writing them
//! all with one fsync). That is the sensor's last good state: a sensor
//! whose call traps, runs past its deadline or grows past its memory cap is
//! stopped, reported once, and after a backoff restarted from it, so its
//! sequence continues and every reading it produced is still in its resend
//! buffer, to go out when due. A sensor that keeps failing is quarantined;
//! the others never notice.
//!
//! Sensors are independent stores, so the calls of one pass (a tick slice,
//! a commit's snapshots, a reply's acks and averages, a status refresh) are
//! spread over worker threads, each taking chunks of neighbouring sensors.
//! A failure found on a worker is only noted there; it is handled on the
//! fleet's own thread once the pass is over, in the order a single thread
//! would have met it.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use fog_protocol::{Average, AverageCursor, BatchReply, MAX_READINGS_PER_BATCH, MAX_SENSORS_PER_BATCH, Reading, SensorBatch};
use serde::Serialize;

use crate::runtime::{
    SensorComponent, SensorConfig, SensorEngine, SensorInstance, SensorStatus, WitAverage, WitCursor, describe_failure,
    describe_instantiate_failure,
};
use crate::state::StateStore;

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
}

/// A sensor that has run this long since its last restart has its failure
/// count forgiven: an occasional fault does not add up to a quarantine.
const QUIET_PERIOD: Duration = Duration::from_secs(60);
const MAX_BACKOFF: Duration = Duration::from_secs(60);

/// A pass over fewer sensors than this per thread stays on fewer threads:
/// starting one costs tens of microseconds, a sensor call about one to four.
const MIN_SENSORS_PER_THREAD: usize = 256;
/// Chunks per thread: a thread held up by one slow sensor (a call running
/// into its deadline) leaves the remaining chunks to the others.
const CHUNKS_PER_THREAD: usize = 4;

enum Life {
    Running(Box<SensorInstance>),
    /// Stopped after a failure; restarted from its last good state at `at`.
    Restarting { at: Instant },
    /// Failed too often; not restarted.
    Quarantined,
}

struct SensorSlot {
    id: u32,
    segment: u32,
    incarnation: u64,
    life: Life,
    /// Failures since the last quiet period.
    failures: u32,
    running_since: Instant,
    /// Readings returned by `tick` and not yet put into a batch.
    pending: Vec<Reading>,
    /// The sensor's position in the average stream (its average ack).
    cursor: Option<AverageCursor>,
    /// Last status read from the sensor.
    status: Option<SensorStatus>,
    /// The sensor's state after its last tick (or last full commit): the
    /// state to restart from.
    saved: Option<Vec<u8>>,
    /// `saved` changed since the last commit wrote it.
    dirty: bool,
    /// The last ack the running instance took. Replies often ack a sensor
    /// again with what it already knows; within one instance sequence
    /// numbers only grow, so the same ack again would change nothing and
    /// is dropped. Cleared whenever a new instance takes over.
    last_ack: Option<AckView>,
    /// Acks from replies not yet given to the sensor, merged into one (see
    /// [`Fleet::ack_every`]).
    unsent_ack: Option<AckView>,
    /// When the running instance last took an ack.
    ack_given_at: Option<Instant>,
}

/// An ack as a sensor takes it: `(incarnation, next_seq, also)`.
type AckView = (u64, u64, Vec<u64>);

/// Folds `ack` into `into`: acks of one incarnation are cumulative, so the
/// higher watermark wins and the selective acks above it are kept.
fn merge_ack(into: &mut Option<AckView>, ack: &fog_protocol::SensorAck) {
    match into {
        Some((incarnation, next_seq, also)) if *incarnation == ack.incarnation => {
            *next_seq = (*next_seq).max(ack.next_seq);
            also.extend_from_slice(&ack.also);
            let watermark = *next_seq;
            also.retain(|&s| s >= watermark);
            also.sort_unstable();
            also.dedup();
        }
        _ => *into = Some((ack.incarnation, ack.next_seq, ack.also.clone())),
    }
}

impl SensorSlot {
    /// Takes the acks of a reply: drops those the sensor already has and
    /// merges the rest into the unsent one.
    fn note_acks<'a>(&mut self, acks: impl Iterator<Item = &'a fog_protocol::SensorAck>) {
        for ack in acks {
            let known = self.last_ack.as_ref().is_some_and(|(incarnation, next_seq, also)| {
                *incarnation == ack.incarnation && *next_seq == ack.next_seq && *also == ack.also
            });
            if !known {
                merge_ack(&mut self.unsent_ack, ack);
            }
        }
    }

    /// Gives the running instance its unsent ack, if any, when the last one
    /// was given at least `every` ago (or `every` is zero).
    fn give_ack(&mut self, now: Instant, every: Duration) -> wasmtime::Result<()> {
        let due = self.ack_given_at.is_none_or(|at| now >= at + every);
        let Life::Running(inst) = &mut self.life else { return Ok(()) };
        if !due {
            return Ok(());
        }
        let Some(ack) = self.unsent_ack.take() else { return Ok(()) };
        inst.on_ack(ack.0, ack.1, &ack.2)?;
        self.last_ack = Some(ack);
        self.ack_given_at = Some(now);
        Ok(())
    }
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

/// Why a hot swap was refused; the old component keeps running.
#[derive(Debug, thiserror::Error)]
pub enum SwapError {
    #[error("cannot instantiate {origin} for sensor {id}: {reason}")]
    Instantiate { origin: String, id: u32, reason: String },
    #[error("{origin} cannot take over sensor {id}: restore failed: {reason}")]
    Restore { origin: String, id: u32, reason: String },
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

pub struct Fleet {
    engine: Arc<SensorEngine>,
    component: SensorComponent,
    config: FleetConfig,
    /// Sensor `i` has id `config.first_id + i` (wrapping).
    sensors: Vec<SensorSlot>,
    store: Option<StateStore>,
    /// Sensor failures (traps, deadlines, memory) over the run.
    pub failures: u64,
    pub restarts: u64,
    /// Hot swaps done.
    pub swaps: u64,
    /// The newest average seq the last reply with averages carried: a
    /// sensor whose cursor is there has nothing to catch up on.
    newest_average: u64,
    /// When a batch last carried every running sensor.
    last_full_batch: Option<Instant>,
    /// Where the next batch starts looking for sensors, so that when the
    /// protocol's caps leave some out, the next batch takes them first.
    batch_start: usize,
    /// Sensors of the current once-a-second pass not yet in a batch.
    full_pass_left: usize,
    /// Readings refused by a server, per reason (logged once per reason).
    refused: std::collections::BTreeMap<String, u64>,
}

/// How often a batch carries every running sensor, news or not: so that a
/// server can reposition a sensor whose cursor it does not hold (after a
/// split) and a sensor that is idle still hears of new averages.
const FULL_BATCH_EVERY: Duration = Duration::from_secs(1);

impl Fleet {
    /// Starts every sensor: from its saved state when `store` holds one,
    /// afresh otherwise.
    pub fn start(
        engine: Arc<SensorEngine>,
        component: SensorComponent,
        config: FleetConfig,
        store: Option<(StateStore, HashMap<u32, Vec<u8>>)>,
    ) -> Result<Self, StartError> {
        let (store, mut saved) = match store {
            Some((store, saved)) => (Some(store), saved),
            None => (None, HashMap::new()),
        };
        let now = Instant::now();
        let mut sensors = Vec::with_capacity(config.count as usize);
        let mut fleet_limits = engine.limits();
        fleet_limits.max_instances = config.count;
        for i in 0..config.count {
            let id = config.first_id.wrapping_add(i);
            let segment = if config.segments == 0 { 0 } else { i % config.segments };
            let sensor_config = sensor_config(&config, id, segment);
            // One seed for the whole fleet: sensors mix in their id for the
            // incarnation, and share traffic events (jams) per segment.
            let mut instance = engine.instantiate(&component, sensor_config, config.seed).map_err(|e| {
                StartError::Instantiate { id, reason: describe_instantiate_failure(&e, &fleet_limits, config.count) }
            })?;
            let saved = saved.remove(&id);
            if let Some(state) = &saved {
                match instance.restore(state) {
                    Ok(Ok(())) => {}
                    Ok(Err(reason)) => return Err(StartError::Resume { id, reason }),
                    Err(e) => {
                        return Err(StartError::Resume { id, reason: describe_failure(&e, &engine.limits()) });
                    }
                }
            }
            let incarnation = instance
                .init()
                .map_err(|e| StartError::Init { id, reason: describe_failure(&e, &engine.limits()) })?;
            // A resumed sensor reports where its average stream stands.
            let status = if saved.is_some() { instance.status().ok() } else { None };
            sensors.push(SensorSlot {
                id,
                segment,
                incarnation,
                life: Life::Running(Box::new(instance)),
                failures: 0,
                running_since: now,
                pending: Vec::new(),
                cursor: status.as_ref().and_then(|s| s.last_average).map(from_wit),
                status,
                saved,
                dirty: false,
                last_ack: None,
                unsent_ack: None,
                ack_given_at: None,
            });
        }
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
            newest_average: 0,
            last_full_batch: None,
            batch_start: 0,
            full_pass_left: 0,
            refused: std::collections::BTreeMap::new(),
        })
    }

    pub fn len(&self) -> usize {
        self.sensors.len()
    }

    pub fn is_empty(&self) -> bool {
        self.sensors.is_empty()
    }

    pub fn engine(&self) -> &Arc<SensorEngine> {
        &self.engine
    }

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

    /// Where the running component came from.
    pub fn component_origin(&self) -> &str {
        &self.component.origin
    }

    /// The sensors of tick slice `k` of `slices`: contiguous, so a slice's
    /// stores sit together in memory.
    pub fn slice(&self, k: usize, slices: usize) -> Range<usize> {
        let n = self.sensors.len();
        let slices = slices.max(1);
        (n * k / slices)..(n * (k + 1) / slices)
    }

    /// Ticks the sensors in `range` once; returns how many readings they
    /// handed over.
    pub fn tick(&mut self, range: Range<usize>, produce: bool) -> usize {
        let workers = self.workers(range.len());
        let first = range.start;
        let pass = each_sensor(&mut self.sensors[range], first, workers, |pass, i, slot| {
            let Life::Running(inst) = &mut slot.life else { return };
            match inst.tick(produce) {
                Ok(result) => {
                    pass.readings += result.readings.len();
                    slot.pending.extend(result.readings.into_iter().map(|r| Reading {
                        seq: r.seq,
                        speed_kmh: r.speed_kmh,
                        timestamp_ms: r.timestamp_ms,
                    }));
                    // The status goes with the state: if the sensor fails
                    // later, its figures in the summary are those of the
                    // state it restarts from.
                    slot.saved = Some(result.state);
                    slot.status = Some(result.status);
                    slot.dirty = true;
                }
                Err(error) => pass.failed(i, "tick", error),
            }
        });
        self.handle_failures(pass.failures);
        pass.readings
    }

    /// Ticks every sensor once.
    pub fn tick_all(&mut self, produce: bool) -> usize {
        self.tick(0..self.sensors.len(), produce)
    }

    /// Restarts the failed sensors whose backoff has passed.
    pub fn restart_due(&mut self, now: Instant) {
        for i in 0..self.sensors.len() {
            if matches!(self.sensors[i].life, Life::Restarting { at } if at <= now) {
                self.restart(i, now);
            }
        }
    }

    fn restart(&mut self, i: usize, now: Instant) {
        let slot = &self.sensors[i];
        let limits = self.engine.limits();
        let config = sensor_config(&self.config, slot.id, slot.segment);
        let mut instance = match self.engine.instantiate(&self.component, config, self.config.seed) {
            Ok(instance) => instance,
            Err(e) => {
                // The pool or the kernel said no: not the sensor's fault, but
                // retried with the same backoff.
                let reason = describe_instantiate_failure(&e, &limits, self.config.count);
                return self.fail_with(i, "instantiate", reason);
            }
        };
        if let Some(state) = slot.saved.as_deref() {
            match instance.restore(state) {
                Ok(Ok(())) => {}
                Ok(Err(reason)) => return self.fail_with(i, "restore", format!("refused its last good state: {reason}")),
                Err(e) => return self.fail(i, "restore", &e),
            }
        }
        let incarnation = match instance.init() {
            Ok(incarnation) => incarnation,
            Err(e) => return self.fail(i, "init", &e),
        };
        let status = match instance.status() {
            Ok(status) => status,
            Err(e) => return self.fail(i, "status", &e),
        };
        let slot = &mut self.sensors[i];
        tracing::info!(
            sensor_id = slot.id,
            "sensor restarted from its last good state ({} readings generated, {} unacked to resend)",
            status.generated,
            status.buffered
        );
        slot.incarnation = incarnation;
        slot.cursor = status.last_average.map(from_wit);
        slot.status = Some(status);
        slot.life = Life::Running(Box::new(instance));
        slot.last_ack = None;
        slot.running_since = now;
        self.restarts += 1;
    }

    /// Readings waiting to be put into a batch.
    pub fn pending(&self) -> usize {
        self.sensors.iter().map(|s| s.pending.len()).sum()
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
    pub fn commit_all(&mut self) -> std::io::Result<usize> {
        let workers = self.workers(self.sensors.len());
        let now = Instant::now();
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

    /// The sensors with news for one batch, and how many readings that is:
    /// every running sensor with readings to send or averages to catch up
    /// on (a reply's averages reach every sensor, so one sensor that asks
    /// is enough for all), and every running sensor once a second (see
    /// [`FULL_BATCH_EVERY`]). Call [`Fleet::commit`] first.
    ///
    /// A batch holds at most [`MAX_SENSORS_PER_BATCH`] sensors and
    /// [`MAX_READINGS_PER_BATCH`] readings (the server refuses more); what
    /// does not fit goes first in the next batch, which is sent as soon as
    /// the reply comes (`pending` stays above zero).
    pub fn take_batch(&mut self) -> (Vec<SensorBatch>, usize) {
        let now = Instant::now();
        if self.last_full_batch.is_none_or(|at| now >= at + FULL_BATCH_EVERY) {
            self.last_full_batch = Some(now);
            self.full_pass_left = self.sensors.len();
        }
        let n = self.sensors.len();
        let newest = self.newest_average;
        let news = |s: &SensorSlot| !s.pending.is_empty() || s.cursor.is_none_or(|c| c.seq < newest);
        let (mut sensors, mut readings) = (Vec::new(), 0usize);
        let mut visited = 0;
        while visited < n && sensors.len() < MAX_SENSORS_PER_BATCH && readings < MAX_READINGS_PER_BATCH {
            let i = (self.batch_start + visited) % n;
            visited += 1;
            let in_full_pass = self.full_pass_left > 0;
            self.full_pass_left = self.full_pass_left.saturating_sub(1);
            let s = &mut self.sensors[i];
            if !matches!(s.life, Life::Running(_)) || !(in_full_pass || news(s)) {
                continue;
            }
            let take = s.pending.len().min(MAX_READINGS_PER_BATCH - readings);
            readings += take;
            sensors.push(SensorBatch {
                sensor_id: s.id,
                incarnation: s.incarnation,
                segment: s.segment,
                readings: s.pending.drain(..take).collect(),
                average_cursor: s.cursor,
            });
        }
        self.batch_start = (self.batch_start + visited) % n.max(1);
        if sensors.is_empty() {
            // Nothing new anywhere: one sensor still asks for what follows
            // its cursor, so new averages keep coming.
            if let Some(s) = self.sensors.iter().find(|s| matches!(s.life, Life::Running(_))) {
                sensors.push(SensorBatch {
                    sensor_id: s.id,
                    incarnation: s.incarnation,
                    segment: s.segment,
                    readings: Vec::new(),
                    average_cursor: s.cursor,
                });
            }
        }
        (sensors, readings)
    }

    /// Notes readings a server refused (they stay with their sensors and
    /// go again); each reason is logged once.
    fn note_refused(&mut self, reply: &BatchReply) {
        for r in &reply.refused {
            let count = self.refused.entry(r.reason.to_string()).or_insert(0);
            if *count == 0 {
                tracing::warn!(sensor_id = r.sensor_id, "the server refused {} readings: {}; they are kept and sent again", r.count, r.reason);
            }
            *count = count.saturating_add(u64::from(r.count));
        }
    }

    /// Makes the next batch carry every running sensor (after a failover:
    /// the new server checks every cursor).
    pub fn force_full_batch(&mut self) {
        self.last_full_batch = None;
    }

    /// Delivers a server's reply to the sensors it concerns. A sensor that
    /// is not running misses it; once restarted it resends what was not
    /// acked in its saved state, and the server acks it again.
    pub fn apply(&mut self, reply: &BatchReply) {
        self.note_refused(reply);
        if let Some(last) = reply.averages.last() {
            self.newest_average = last.seq;
        }
        let acks = Routes::new(self.sensors.len(), reply.acks.iter().map(|a| self.index_of(a.sensor_id)));
        let repositions = Routes::new(self.sensors.len(), reply.repositions.iter().map(|r| self.index_of(r.sensor_id)));
        let averages: Vec<WitAverage> = reply.averages.iter().map(to_wit).collect();
        // Without averages only the sensors named in the reply are called.
        let calls = if averages.is_empty() { acks.len() + repositions.len() } else { self.sensors.len() };
        let workers = self.workers(calls);
        let (now, every) = (Instant::now(), self.ack_every());
        let mut pass = each_sensor(&mut self.sensors, 0, workers, |pass, i, slot| {
            slot.note_acks(acks.of(i).iter().map(|&k| &reply.acks[k]));
            if let Err(error) = slot.give_ack(now, every) {
                // A stopped sensor gets no further calls.
                return pass.failed_at((0, i), i, "on-ack", error);
            }
            let Life::Running(inst) = &mut slot.life else { return };
            for &k in repositions.of(i) {
                let r = &reply.repositions[k];
                match inst.on_reposition(r.rewind_to, to_wit_cursor(r.to)) {
                    Ok(cursor) => slot.cursor = cursor.map(from_wit),
                    Err(error) => return pass.failed_at((1, k), i, "on-reposition", error),
                }
            }
            if averages.is_empty() {
                return;
            }
            match inst.on_averages(&averages) {
                Ok(cursor) => slot.cursor = cursor.map(from_wit),
                Err(error) => pass.failed_at((2, i), i, "on-averages", error),
            }
        });
        // As one thread reports them: every failed ack, then every
        // reposition, then the averages, each in sensor order.
        pass.failures.sort_by_key(|f| f.order);
        self.handle_failures(pass.failures);
    }

    /// How long acks may wait before a sensor is given them: every ack a
    /// reply carries would be one call per reading, while a sensor only
    /// needs its acks before it would resend (`--resend-after`), so they are
    /// merged and given at most four times per resend timeout and per
    /// 250 ms. Statuses and snapshots give every unsent ack first.
    fn ack_every(&self) -> Duration {
        Duration::from_millis((self.config.resend_after_ms / 4).min(250))
    }

    /// Gives every running sensor its unsent ack, then reads its status;
    /// returns whether all their readings are acked and no sensor waits for
    /// a restart (a quarantined sensor is not waited for).
    pub fn refresh_status(&mut self) -> bool {
        let workers = self.workers(self.sensors.len());
        let now = Instant::now();
        let pass = each_sensor(&mut self.sensors, 0, workers, |pass, i, slot| {
            if let Err(error) = slot.give_ack(now, Duration::ZERO) {
                pass.unacked = true;
                return pass.failed(i, "on-ack", error);
            }
            match &mut slot.life {
                Life::Running(inst) => match inst.status() {
                    Ok(status) => {
                        pass.unacked |= status.buffered > 0 || !slot.pending.is_empty();
                        slot.status = Some(status);
                    }
                    Err(error) => {
                        pass.unacked = true;
                        pass.failed(i, "status", error);
                    }
                },
                Life::Restarting { .. } => pass.unacked = true,
                Life::Quarantined => {}
            }
        });
        self.handle_failures(pass.failures);
        !pass.unacked
    }

    /// Sensors quarantined after failing too often.
    pub fn quarantined(&self) -> u64 {
        self.sensors.iter().filter(|s| matches!(s.life, Life::Quarantined)).count() as u64
    }

    /// Sensors waiting for a restart.
    pub fn restarting(&self) -> u64 {
        self.sensors.iter().filter(|s| matches!(s.life, Life::Restarting { .. })).count() as u64
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

    /// Moves every running sensor onto `component` through snapshot and
    /// restore. All or nothing: if any sensor cannot be moved, the new
    /// instances are dropped and the old component keeps running.
    pub fn swap(&mut self, component: SensorComponent) -> Result<usize, SwapError> {
        let limits = self.engine.limits();
        let mut moved: Vec<(usize, SensorInstance, Vec<u8>)> = Vec::new();
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
            let origin = component.origin.clone();
            let mut new = self.engine.instantiate(&component, config, self.config.seed).map_err(|e| {
                SwapError::Instantiate { origin: origin.clone(), id: slot.id, reason: describe_instantiate_failure(&e, &limits, self.config.count) }
            })?;
            match new.restore(&state) {
                Ok(Ok(())) => {}
                Ok(Err(reason)) => return Err(SwapError::Restore { origin, id: slot.id, reason }),
                Err(e) => return Err(SwapError::Restore { origin, id: slot.id, reason: describe_failure(&e, &limits) }),
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
                Err(e) => return Err(SwapError::Restore { origin, id: slot.id, reason: describe_failure(&e, &limits) }),
            }
            moved.push((i, new, state));
        }
        let count = moved.len();
        for (i, new, state) in moved {
            let slot = &mut self.sensors[i];
            slot.life = Life::Running(Box::new(new));
            slot.last_ack = None;
            slot.saved = Some(state);
            // The state directory holds an older snapshot; commit this one
            // before the next batch.
            slot.dirty = true;
        }
        self.component = component;
        self.swaps += 1;
        // The new component may be the fix: every quarantined sensor gets
        // a fresh start on it, from its last good state.
        let now = Instant::now();
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

    /// Where the sensor with this id sits, if this fleet runs it.
    fn index_of(&self, sensor_id: u32) -> Option<usize> {
        let i = sensor_id.wrapping_sub(self.config.first_id) as usize;
        self.sensors.get(i).filter(|s| s.id == sensor_id).map(|_| i)
    }

    /// Threads for a pass that makes `calls` sensor calls.
    fn workers(&self, calls: usize) -> usize {
        self.config.threads.min(calls / MIN_SENSORS_PER_THREAD).max(1)
    }

    fn handle_failures(&mut self, failures: Vec<Failure>) {
        for f in failures {
            self.fail(f.slot, f.call, &f.error);
        }
    }

    fn fail(&mut self, i: usize, call: &str, e: &wasmtime::Error) {
        let reason = describe_failure(e, &self.engine.limits());
        self.fail_with(i, call, reason);
    }

    /// Stops sensor `i`, reports it once, and schedules its restart or
    /// quarantines it.
    fn fail_with(&mut self, i: usize, call: &str, reason: String) {
        let now = Instant::now();
        let (backoff, max_restarts) = (self.config.restart_backoff, self.config.max_restarts);
        let slot = &mut self.sensors[i];
        if matches!(slot.life, Life::Running(_)) && now.duration_since(slot.running_since) >= QUIET_PERIOD {
            slot.failures = 0;
        }
        slot.failures += 1;
        // Readings not yet put into a batch were never sent; the restart
        // resumes from the state of the last tick, which holds them in its
        // resend buffer, so they go out when due.
        slot.pending.clear();
        slot.dirty = false;
        self.failures += 1;
        if slot.failures > max_restarts {
            slot.life = Life::Quarantined;
            tracing::error!(
                sensor_id = slot.id,
                "sensor quarantined: `{call}` {reason}; failed {} times in a row, not restarted",
                slot.failures
            );
        } else {
            let wait = backoff.saturating_mul(1 << (slot.failures - 1).min(16)).min(MAX_BACKOFF);
            slot.life = Life::Restarting { at: now + wait };
            tracing::warn!(
                sensor_id = slot.id,
                "sensor stopped: `{call}` {reason}; restarting from its last good state in {wait:?} (failure {} of {})",
                slot.failures,
                max_restarts + 1
            );
        }
    }
}

/// A sensor call that failed during a pass, handled once the pass is over.
struct Failure {
    slot: usize,
    call: &'static str,
    error: wasmtime::Error,
    /// Where a single thread would have met it within the pass.
    order: (u8, usize),
}

/// What one pass over sensors gathered; each thread fills its own, and they
/// are merged in sensor order.
#[derive(Default)]
struct Pass {
    readings: usize,
    /// Some sensor still has unacked readings or waits for a restart.
    unacked: bool,
    failures: Vec<Failure>,
}

impl Pass {
    fn failed(&mut self, slot: usize, call: &'static str, error: wasmtime::Error) {
        self.failed_at((0, slot), slot, call, error);
    }

    fn failed_at(&mut self, order: (u8, usize), slot: usize, call: &'static str, error: wasmtime::Error) {
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
fn each_sensor<F>(slots: &mut [SensorSlot], first: usize, workers: usize, visit: F) -> Pass
where
    F: Fn(&mut Pass, usize, &mut SensorSlot) + Sync,
{
    let visit_chunk = |pass: &mut Pass, start: usize, chunk: &mut [SensorSlot]| {
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

/// The entries of a reply (acks, or repositions) grouped by the sensor
/// they concern, each group in reply order.
struct Routes {
    /// Sensor `i`'s entries are `positions[starts[i]..starts[i + 1]]`;
    /// empty when the reply has none.
    starts: Vec<usize>,
    positions: Vec<usize>,
}

impl Routes {
    /// `targets`: the sensor index of each entry, `None` for a sensor this
    /// fleet does not run.
    fn new(sensors: usize, targets: impl ExactSizeIterator<Item = Option<usize>>) -> Self {
        if targets.len() == 0 {
            return Routes { starts: Vec::new(), positions: Vec::new() };
        }
        let targets: Vec<Option<usize>> = targets.collect();
        // A counting sort: linear, and stable, so each group keeps reply order.
        let mut starts = vec![0; sensors + 1];
        for &i in targets.iter().flatten() {
            starts[i + 1] += 1;
        }
        for i in 0..sensors {
            starts[i + 1] += starts[i];
        }
        let mut next = starts.clone();
        let mut positions = vec![0; starts[sensors]];
        for (k, target) in targets.into_iter().enumerate() {
            if let Some(i) = target {
                positions[next[i]] = k;
                next[i] += 1;
            }
        }
        Routes { starts, positions }
    }

    fn len(&self) -> usize {
        self.positions.len()
    }

    fn of(&self, i: usize) -> &[usize] {
        match self.starts.get(i..i + 2) {
            Some(&[start, end]) => &self.positions[start..end],
            _ => &[],
        }
    }
}

fn sensor_config(config: &FleetConfig, id: u32, segment: u32) -> SensorConfig {
    SensorConfig {
        sensor_id: id,
        segment,
        resend_after_ms: config.resend_after_ms,
        max_buffered: config.max_buffered,
        settings: config.settings.clone(),
    }
}

fn to_wit(a: &Average) -> WitAverage {
    WitAverage {
        seq: a.seq,
        epoch: a.epoch,
        segment: a.segment,
        window_end_ms: a.window_end_ms,
        count: a.count,
        sum_kmh: a.sum_kmh,
        mean_kmh: a.mean_kmh(),
        revision: a.revision,
        chain: a.chain,
    }
}

fn to_wit_cursor(c: AverageCursor) -> WitCursor {
    WitCursor { seq: c.seq, epoch: c.epoch, chain: c.chain }
}

fn from_wit(c: WitCursor) -> AverageCursor {
    AverageCursor { seq: c.seq, epoch: c.epoch, chain: c.chain }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fog_protocol::SensorAck;

    fn ack(incarnation: u64, next_seq: u64, also: &[u64]) -> SensorAck {
        SensorAck { sensor_id: 1, incarnation, next_seq, also: also.to_vec() }
    }

    #[test]
    fn acks_merge_into_the_highest_watermark_with_the_selective_acks_above_it() {
        let mut unsent = None;
        merge_ack(&mut unsent, &ack(7, 10, &[12, 15]));
        merge_ack(&mut unsent, &ack(7, 13, &[15, 16]));
        assert_eq!(unsent, Some((7, 13, vec![15, 16])));
        // An older ack that arrives late takes nothing back.
        merge_ack(&mut unsent, &ack(7, 11, &[20]));
        assert_eq!(unsent, Some((7, 13, vec![15, 16, 20])));
        // Another incarnation (the sensor restarted): its ack replaces it.
        merge_ack(&mut unsent, &ack(8, 2, &[]));
        assert_eq!(unsent, Some((8, 2, vec![])));
    }
}
