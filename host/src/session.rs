//! The tokio + ZeroMQ driver of the host's conversation with the server
//! pair: turns the link's events, the timers and interrupts into events of
//! the [`HostCore`], which makes every protocol decision (which server,
//! when a batch goes and goes again, failover, epochs, pacing, draining),
//! and carries out its actions against the [`Link`] and the [`Fleet`]. It
//! also loads a new component off the loop and swaps it in (fleet
//! management, not part of the conversation), and builds the progress line
//! and the summary.

use std::collections::BTreeMap;
use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

use fog_protocol::Average;
use serde::Serialize;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::{Instant, sleep_until};

use crate::core::{Action, CoreConfig, HostCore};
use crate::fleet::{Fleet, SensorSummary, Swapped, prepare_swap};
use crate::link::{Incoming, Link, LinkError, LinkEvent, LinkKeys};
use crate::metrics::{FleetFigures, HostMetrics};
use crate::runtime::{SensorComponent, SensorInstance};

/// How often `/metrics` and readiness are brought up to date.
const PUBLISH_EVERY: Duration = Duration::from_secs(1);
/// Link events waiting for the loop, at most: with up to four batches in
/// flight, a server that sends more is flooding (each event may hold a
/// frame of up to 16 MiB, so this also bounds the memory a flood takes).
const INCOMING_BOUND: usize = 16;
/// Link events the loop takes in before it looks at its timers, at most.
const READ_BEFORE_TIMERS: usize = 16;

/// Readings one visit makes at most.
pub const MAX_READINGS_PER_VISIT: u32 = 64;

/// How many readings each visit makes for sensors that read every
/// `interval` and are visited at most every `visit_every`: as many
/// intervals as fit in it, at least 1 and at most
/// [`MAX_READINGS_PER_VISIT`].
pub fn readings_per_visit(interval: Duration, visit_every: Duration) -> u32 {
    let fit = visit_every.as_nanos().checked_div(interval.as_nanos()).unwrap_or(1);
    u32::try_from(fit).unwrap_or(u32::MAX).clamp(1, MAX_READINGS_PER_VISIT)
}

#[derive(Debug, Clone)]
pub struct SessionConfig {
    pub servers: Vec<String>,
    pub interval: Duration,
    /// Readings each visit makes (see [`readings_per_visit`]).
    pub readings_per_visit: u32,
    pub timeout: Duration,
    /// Stop generating after this long; `None` runs until interrupted.
    pub duration: Option<Duration>,
    pub drain_timeout: Duration,
    /// How often to print a progress line; `None` prints none.
    pub progress: Option<Duration>,
    /// The component file a hot swap reloads; `None` for the built-in sensor.
    pub component: Option<PathBuf>,
    /// The host's keys and each server's public key (in `servers` order);
    /// `None` talks to servers run without keys.
    pub keys: Option<HostKeys>,
    /// The highest server epoch seen before a restart, and its seal.
    pub epoch: Option<(u64, fog_protocol::Seal)>,
    /// What `/healthz` and `/readyz` report, when the host serves them;
    /// `None`: no metrics are published.
    pub health: Option<std::sync::Arc<fog_observe::Health>>,
}

/// The keys a host authenticates with, and the servers' public keys.
#[derive(Debug, Clone)]
pub struct HostKeys {
    pub keys: std::sync::Arc<fog_transport::Keypair>,
    pub servers: Vec<fog_transport::PublicKey>,
}

/// The newest average the host has seen for one road segment.
#[derive(Debug, Clone, Serialize)]
pub struct SegmentView {
    pub segment: u32,
    pub window_end_ms: u64,
    pub mean_kmh: f32,
    pub count: u32,
    pub revision: u32,
    /// Advisory limits the segment's sensors show, with how many show each.
    pub limits: BTreeMap<u32, u32>,
}

/// What a run did, as printed at its end (`--json` prints it as one object).
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub sensors: usize,
    pub generated: u64,
    pub acked: u64,
    pub unacked: u64,
    pub resent: u64,
    pub overflowed: u64,
    /// Averages applied, summed over sensors.
    pub averages_received: u64,
    pub averages_missed: u64,
    /// Averages sensors applied from a branch abandoned after a split and
    /// then replaced with the surviving stream's.
    pub averages_superseded: u64,
    pub failovers: u64,
    /// Sensor failures over the run: traps, missed call deadlines, memory
    /// growth past the limit. Each stopped the sensor until its restart.
    pub failed_sensors: u64,
    /// Sensors restarted from their last good state after a failure.
    pub restarts: u64,
    /// Sensors quarantined (not restarted) after failing repeatedly.
    pub quarantined: u64,
    /// Hot swaps of the sensor component done.
    pub swaps: u64,
    /// The component the sensors run at the end.
    pub component: String,
    pub batches_acked: u64,
    pub bad_replies: u64,
    /// Epochs the host took back because a server served a batch that
    /// claimed them: they had no valid seal.
    pub unvouched_epochs: u64,
    pub elapsed_s: f64,
    /// Every reading generated was acked before the host stopped.
    pub drained: bool,
    pub server: String,
    pub segments: Vec<SegmentView>,
    pub per_sensor: Vec<SensorSummary>,
}

/// The driver's side: the fleet, the link and what only it can see.
struct Driver<'a> {
    fleet: &'a mut Fleet,
    cfg: &'a SessionConfig,
    generation: u64,
    link: Option<Link>,
    connecting: Option<JoinHandle<Result<Link, LinkError>>>,
    incoming_tx: mpsc::Sender<Incoming>,
    latest: BTreeMap<u32, Average>,
    started: Instant,
    /// The last commit failed (already reported).
    commit_failing: bool,
    /// The hot swap under way: the component it replaces, when its moves
    /// began, and how long loading and instantiating took.
    swap_began: Option<(String, std::time::Instant, Duration)>,
    metrics: HostMetrics,
}

/// Runs the fleet against the servers until the duration has passed and
/// every reading is acked (or the drain timeout). `shutdown` stops
/// generating and drains, or ends the run at once when already draining.
/// Each message on `reload` asks for a hot swap of the component file.
pub async fn run(
    fleet: &mut Fleet,
    cfg: &SessionConfig,
    shutdown: impl Future<Output = ()>,
    mut reload: mpsc::UnboundedReceiver<()>,
) -> Summary {
    let (incoming_tx, mut incoming_rx) = mpsc::channel(INCOMING_BOUND);
    let started = Instant::now();
    let core_config = CoreConfig {
        pipeline_readings: crate::core::PIPELINE_READINGS,
        servers: cfg.servers.clone(),
        sensors: fleet.len(),
        interval: cfg.interval,
        readings_per_visit: cfg.readings_per_visit,
        timeout: cfg.timeout,
        duration: cfg.duration,
        drain_timeout: cfg.drain_timeout,
        progress: cfg.progress,
        epoch: cfg.epoch,
    };
    let visit_every = core_config.visit_every();
    let mut core = HostCore::new(core_config, started.into_std());
    let mut d = Driver {
        fleet,
        cfg,
        generation: 0,
        link: None,
        connecting: None,
        incoming_tx,
        latest: BTreeMap::new(),
        started,
        commit_failing: false,
        swap_began: None,
        metrics: HostMetrics::new(cfg.health.clone().unwrap_or_default(), visit_every, cfg.timeout),
    };
    let mut publish = tokio::time::interval(PUBLISH_EVERY);
    publish.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut loading: Option<JoinHandle<Result<Prepared, String>>> = None;
    let mut reload_open = true;
    tokio::pin!(shutdown);
    let mut interrupted = false;
    let drained = loop {
        if let Some(drained) = d.carry_out(&mut core).await {
            break drained;
        }
        let wake = core.poll_timeout().map(Instant::from_std);
        tokio::select! {
            () = &mut shutdown, if !interrupted => {
                interrupted = true;
                core.handle_shutdown(now());
            }
            res = async { d.connecting.as_mut().expect("guarded").await }, if d.connecting.is_some() => {
                d.connecting = None;
                match res {
                    Ok(Ok(link)) => {
                        d.link = Some(link);
                        core.handle_connected(now(), d.fleet.pending());
                    }
                    Ok(Err(e)) => {
                        tracing::warn!("{e}");
                        core.handle_link_failed(now());
                    }
                    Err(e) => {
                        tracing::warn!("connection attempt failed: {e}");
                        core.handle_link_failed(now());
                    }
                }
            }
            Some(incoming) = incoming_rx.recv() => d.take_in(&mut core, incoming),
            () = sleep_until(wake.unwrap_or(started)), if wake.is_some() => {
                // A loop that was busy (a large fleet's tick) first takes
                // the replies that came meanwhile, a bounded few, so a reply
                // waiting to be read is never taken for silence.
                for _ in 0..READ_BEFORE_TIMERS {
                    let Ok(incoming) = incoming_rx.try_recv() else { break };
                    d.take_in(&mut core, incoming);
                }
                core.handle_timeout(now());
            }
            request = reload.recv(), if reload_open => {
                match (request, &cfg.component) {
                    (None, _) => reload_open = false,
                    (Some(()), None) => tracing::warn!("reload requested, but the host runs the built-in sensor: start it with a component path to swap"),
                    (Some(()), Some(_)) if loading.is_some() || d.fleet.swapping() => tracing::info!("reload requested while one is in progress: ignored"),
                    (Some(()), Some(path)) => {
                        tracing::info!("loading {} to swap it in", path.display());
                        // Compiling and instantiating take a while: off the
                        // loop, so sensors keep ticking and replies keep
                        // coming; the loop then moves the states over, a
                        // step a turn.
                        let (engine, path, plan) = (d.fleet.engine().clone(), path.clone(), d.fleet.swap_plan());
                        loading = Some(tokio::task::spawn_blocking(move || {
                            let began = std::time::Instant::now();
                            let component = engine.load(Some(&path)).map_err(|e| e.to_string())?;
                            let prepared = prepare_swap(&*engine, &component, plan).map_err(|e| e.to_string())?;
                            Ok(Prepared { component, instances: prepared, took: began.elapsed() })
                        }));
                    }
                }
            }
            res = async { loading.as_mut().expect("guarded").await }, if loading.is_some() => {
                loading = None;
                d.begin_swap(res);
            }
            () = std::future::ready(()), if d.fleet.swapping() => d.swap_step(),
            _ = publish.tick(), if cfg.health.is_some() => d.publish(&core),
        }
    };
    if d.fleet.cancel_swap().is_some() {
        tracing::warn!("hot swap cut short by the end of the run: the sensors stay on {}", d.fleet.component_origin());
    }
    sandboxed(|| d.fleet.refresh_status(now()));
    if d.fleet.has_state_dir() {
        // Acks that arrived since the last batch: on disk, so a restart
        // does not resend what the server already counted.
        if let Err(e) = sandboxed(|| d.fleet.commit_all(now())) {
            tracing::error!("cannot write the final sensor state: {e}");
        }
    }
    d.summary(&core, drained)
}

/// A component loaded for a swap, with an instance of it for every sensor
/// running when the swap was planned.
struct Prepared {
    component: SensorComponent,
    instances: Vec<(usize, SensorInstance)>,
    took: Duration,
}

/// The time an event happened at, as the core takes it: tokio's clock, so
/// the core's deadlines and the driver's timers agree.
fn now() -> std::time::Instant {
    Instant::now().into_std()
}

/// Runs calls into the sensors. WASI's synchronous streams (a guest
/// printing, e.g. a panic message) block on the ambient tokio runtime, which
/// is only allowed outside of it: `block_in_place` steps out of the runtime
/// for the duration (inline, on the thread of a multi-threaded runtime's
/// `block_on`), so a guest's output cannot bring the host down.
fn sandboxed<R>(f: impl FnOnce() -> R) -> R {
    tokio::task::block_in_place(f)
}

impl Driver<'_> {
    /// An event of a link: a frame, a close or a refusal, if it is the
    /// current link's.
    fn take_in(&self, core: &mut HostCore, incoming: Incoming) {
        if incoming.generation == self.generation {
            match incoming.event {
                LinkEvent::Frame(frame) => core.handle_frame(now(), &frame),
                LinkEvent::Closed => core.handle_closed(now()),
                LinkEvent::Refused(why) => core.handle_refused(now(), why),
            }
        }
    }

    /// Carries out what the core asks for, feeding back what each action
    /// found, until it asks for nothing more; returns how the run ended
    /// once the core finished it.
    async fn carry_out(&mut self, core: &mut HostCore) -> Option<bool> {
        let mut finished = None;
        while let Some(action) = core.poll_action() {
            match action {
                Action::Connect { server, after } => {
                    self.link = None;
                    self.metrics.disconnected();
                    self.fleet.force_full_batch();
                    self.start_connect(server, after);
                }
                Action::Send { frame } => {
                    let Some(link) = self.link.as_mut() else { continue };
                    match link.send(frame, self.cfg.timeout).await {
                        Ok(()) => self.metrics.sent(),
                        Err(e) => {
                            tracing::warn!("{e}");
                            // The other batches in flight queued behind this
                            // one do not try the dead link: one failover.
                            self.link = None;
                            core.handle_link_failed(now());
                        }
                    }
                }
                Action::Tick { slice, slices, make, refresh } => {
                    let range = self.fleet.slice(slice, slices);
                    let calls = range.len();
                    sandboxed(|| {
                        self.fleet.restart_due(now());
                        let began = std::time::Instant::now();
                        self.fleet.tick(now(), range, make);
                        self.metrics.ticked(calls, began.elapsed());
                    });
                    let all_acked = refresh.then(|| sandboxed(|| self.fleet.refresh_status(now())));
                    core.handle_ticked(now(), self.fleet.pending(), all_acked);
                }
                Action::TakeBatch { batch_id } => {
                    // The batch's readings are written (with a state
                    // directory) before it leaves; if they cannot be, it
                    // does not leave (its readings stay in their sensors'
                    // resend buffers).
                    let (sensors, _) = self.fleet.take_batch(now(), batch_id);
                    if self.commit() {
                        core.handle_batch(now(), batch_id, sensors);
                    }
                }
                Action::ApplyReply(reply) => {
                    for avg in &reply.averages {
                        let newer = self
                            .latest
                            .get(&avg.segment)
                            .is_none_or(|cur| (avg.window_end_ms, avg.revision) > (cur.window_end_ms, cur.revision));
                        if newer {
                            self.latest.insert(avg.segment, *avg);
                        }
                    }
                    sandboxed(|| self.fleet.apply(now(), &reply));
                    self.metrics.replied();
                    core.handle_applied(now(), self.fleet.pending());
                }
                Action::SaveEpoch { epoch, seal } => {
                    if let Err(e) = self.fleet.save_epoch(epoch, &seal) {
                        tracing::warn!("cannot save the server epoch in the state directory: {e}");
                    }
                }
                Action::Progress => eprintln!("{}", self.progress_line(core)),
                Action::Finish { drained } => finished = Some(drained),
            }
        }
        finished
    }

    fn start_connect(&mut self, server: usize, pause: Duration) {
        self.generation += 1;
        let endpoint = self.cfg.servers[server].clone();
        let generation = self.generation;
        let tx = self.incoming_tx.clone();
        let keys = self.cfg.keys.as_ref().map(|k| LinkKeys {
            keys: k.keys.clone(),
            server: k.servers.get(server).or(k.servers.last()).copied().unwrap_or(fog_transport::PublicKey([0; 32])),
        });
        if let Some(old) = self.connecting.take() {
            old.abort();
        }
        self.connecting = Some(tokio::spawn(async move {
            tokio::time::sleep(pause).await;
            Link::connect(endpoint, generation, tx, keys).await
        }));
    }

    /// Commits the sensors' state before a batch; false holds the batch
    /// back: a reading may only leave once a restart would resume after it.
    fn commit(&mut self) -> bool {
        let began = std::time::Instant::now();
        let committed = sandboxed(|| self.fleet.commit());
        if self.fleet.has_state_dir() {
            self.metrics.committed(began.elapsed());
        }
        match committed {
            Ok(_) if self.commit_failing => {
                self.commit_failing = false;
                tracing::info!("sensor state written again; sending resumes");
                true
            }
            Ok(_) => true,
            Err(e) => {
                if !self.commit_failing {
                    tracing::error!("cannot write the sensor state: {e}; holding readings back until it can be written");
                }
                self.commit_failing = true;
                false
            }
        }
    }

    /// Starts moving the sensors onto the component loaded and
    /// instantiated off the loop, or says why it cannot.
    fn begin_swap(&mut self, loaded: Result<Result<Prepared, String>, tokio::task::JoinError>) {
        let from = self.fleet.component_origin().to_string();
        match loaded {
            Ok(Ok(Prepared { component, instances, took })) => {
                self.swap_began = Some((from, std::time::Instant::now(), took));
                self.fleet.begin_swap(component, instances);
            }
            Ok(Err(e)) => tracing::error!("hot swap refused, still running {from}: {e}"),
            Err(e) => tracing::error!("hot swap refused, still running {from}: loading failed: {e}"),
        }
    }

    /// One step of the hot swap under way; at its end, says how it went.
    fn swap_step(&mut self) {
        let Some(Swapped { outcome, retired, steps, longest_step }) = sandboxed(|| self.fleet.swap_step(now())) else { return };
        // Freeing the instances left over is slow: beside the loop too.
        tokio::task::spawn_blocking(move || drop(retired));
        let (from, began, took) = self.swap_began.take().unwrap_or_else(|| (String::from("the old component"), std::time::Instant::now(), Duration::ZERO));
        match outcome {
            Ok(moved) => tracing::info!(
                "hot swap: {moved} sensors moved from {from} to {} in {:.1?}, {steps} steps of at most {longest_step:.1?} on the loop (loaded and instantiated beside the loop in {took:.1?})",
                self.fleet.component_origin(),
                began.elapsed()
            ),
            Err(e) => tracing::error!("hot swap refused, still running {from}: {e}"),
        }
    }

    /// The newest average of each segment, with the limits its sensors show.
    fn segments(&self, sensors: &[SensorSummary]) -> Vec<SegmentView> {
        let mut limits: BTreeMap<u32, BTreeMap<u32, u32>> = BTreeMap::new();
        for s in sensors {
            if !s.failed {
                *limits.entry(s.segment).or_default().entry(s.limit_kmh).or_default() += 1;
            }
        }
        self.latest
            .values()
            .map(|a| SegmentView {
                segment: a.segment,
                window_end_ms: a.window_end_ms,
                mean_kmh: a.mean_kmh(),
                count: a.count,
                revision: a.revision,
                limits: limits.remove(&a.segment).unwrap_or_default(),
            })
            .collect()
    }

    /// Brings `/metrics` and readiness up to date.
    fn publish(&self, core: &HostCore) {
        let sensors = self.fleet.summaries();
        let t = Totals::of(&sensors);
        self.metrics.publish(&FleetFigures {
            sensors: self.fleet.len(),
            restarting: self.fleet.restarting(),
            quarantined: self.fleet.quarantined(),
            generated: t.generated,
            acked: t.acked,
            resent: t.resent,
            overflowed: t.overflowed,
            averages: t.averages,
            missed: t.missed,
            failovers: core.failovers(),
            traps: self.fleet.failures,
            restarts: self.fleet.restarts,
            swaps: self.fleet.swaps,
            connected: self.link.is_some(),
            segments: &self.segments(&sensors),
        });
    }

    fn progress_line(&self, core: &HostCore) -> String {
        // One pass over the fleet serves the totals and the segments.
        let sensors = self.fleet.summaries();
        let t = Totals::of(&sensors);
        let mut line = format!(
            "[{:>6.1}s] {} | sensors {}{} generated {} acked {} unacked {} resent {} failovers {}",
            self.started.elapsed().as_secs_f64(),
            self.link.as_ref().map_or("(connecting)", |l| l.endpoint.as_str()),
            self.fleet.len(),
            self.sensor_health(),
            t.generated,
            t.acked,
            t.generated - t.acked.min(t.generated),
            t.resent,
            core.failovers(),
        );
        for seg in self.segments(&sensors) {
            let limits: Vec<String> = seg.limits.iter().map(|(l, n)| format!("{l} km/h x{n}")).collect();
            line.push_str(&format!(
                " | segment {}: avg {:.1} km/h over {} readings{} -> limit {}",
                seg.segment,
                seg.mean_kmh,
                seg.count,
                if seg.revision > 0 { format!(" (revision {})", seg.revision) } else { String::new() },
                limits.join(", "),
            ));
        }
        line
    }

    /// ` (2 restarting, 1 quarantined)`, or nothing when all run.
    fn sensor_health(&self) -> String {
        let (restarting, quarantined) = (self.fleet.restarting(), self.fleet.quarantined());
        match (restarting, quarantined) {
            (0, 0) => String::new(),
            (r, 0) => format!(" ({r} restarting)"),
            (0, q) => format!(" ({q} quarantined)"),
            (r, q) => format!(" ({r} restarting, {q} quarantined)"),
        }
    }

    fn summary(&self, core: &HostCore, drained: bool) -> Summary {
        let sensors = self.fleet.summaries();
        let t = Totals::of(&sensors);
        Summary {
            sensors: self.fleet.len(),
            generated: t.generated,
            acked: t.acked,
            unacked: t.generated.saturating_sub(t.acked),
            resent: t.resent,
            overflowed: t.overflowed,
            averages_received: t.averages,
            averages_missed: t.missed,
            averages_superseded: t.superseded,
            failovers: core.failovers(),
            failed_sensors: self.fleet.failures,
            restarts: self.fleet.restarts,
            quarantined: self.fleet.quarantined(),
            swaps: self.fleet.swaps,
            component: self.fleet.component_origin().to_string(),
            batches_acked: core.batches_acked(),
            bad_replies: core.bad_replies(),
            unvouched_epochs: core.unvouched_epochs(),
            elapsed_s: self.started.elapsed().as_secs_f64(),
            drained,
            server: core.server().to_string(),
            segments: self.segments(&sensors),
            per_sensor: sensors,
        }
    }
}

#[derive(Default)]
struct Totals {
    generated: u64,
    acked: u64,
    resent: u64,
    overflowed: u64,
    averages: u64,
    missed: u64,
    superseded: u64,
}

impl Totals {
    fn of(sensors: &[SensorSummary]) -> Totals {
        let mut t = Totals::default();
        for s in sensors {
            t.generated += s.generated;
            t.acked += s.acked;
            t.resent += s.resent;
            t.overflowed += s.overflowed;
            t.averages += s.averages_applied;
            t.missed += s.averages_missed;
            t.superseded += s.averages_superseded;
        }
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_visit_makes_the_readings_of_the_intervals_that_fit_in_it_within_bounds() {
        let ms = Duration::from_millis;
        assert_eq!(readings_per_visit(ms(1_000), ms(100)), 1, "a slow sensor: one a visit");
        assert_eq!(readings_per_visit(ms(20), ms(100)), 5);
        assert_eq!(readings_per_visit(ms(30), ms(100)), 3, "whole intervals only");
        assert_eq!(readings_per_visit(Duration::from_micros(10), ms(100)), MAX_READINGS_PER_VISIT);
        assert_eq!(readings_per_visit(ms(20), Duration::ZERO), 1);
        assert_eq!(readings_per_visit(Duration::ZERO, ms(100)), 1);
        assert_eq!(readings_per_visit(Duration::from_nanos(1), Duration::MAX), MAX_READINGS_PER_VISIT);
    }
}
