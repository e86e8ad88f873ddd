//! The host's conversation with the server pair: ticks the fleet every
//! interval, sends one batch at a time to the active server, routes replies,
//! and fails over to the other server on silence or a "not active" reply.
//!
//! Delivery is judged only by replies. A batch that got no reply within the
//! timeout is sent again, unchanged, to the other server; the server's
//! exactly-once counting makes that safe. The sensors' own resend buffers
//! cover everything else, so a lost batch never loses a reading.

use std::collections::BTreeMap;
use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

use fog_protocol::{Average, Reply};
use serde::Serialize;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::{Instant, sleep_until};

use crate::fleet::{Fleet, SensorSummary};
use crate::runtime::{LoadError, SensorComponent};
use crate::link::{Incoming, Link, LinkError, LinkEvent, LinkKeys};

/// How soon a server that answered "not active" is asked again.
const NOT_ACTIVE_RETRY: Duration = Duration::from_millis(50);
/// How long the host waits before connecting again after a server refused
/// its handshake (a key problem an operator has to fix).
const REFUSED_RETRY: Duration = Duration::from_secs(1);

#[derive(Debug, Clone)]
pub struct SessionConfig {
    pub servers: Vec<String>,
    pub interval: Duration,
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
}

/// The keys a host authenticates with, and the servers' public keys.
#[derive(Debug, Clone)]
pub struct HostKeys {
    pub keys: std::sync::Arc<fog_transport::Keypair>,
    pub servers: Vec<fog_transport::PublicKey>,
}

/// Ticks of one interval are spread over this many slices (fewer with
/// fewer sensors), so a large fleet does not produce every reading at the
/// same instant.
const TICK_SLICES: usize = 10;
/// Batches per interval at most: readings of several slices travel together.
const BATCHES_PER_INTERVAL: u32 = 4;

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
    pub elapsed_s: f64,
    /// Every reading generated was acked before the host stopped.
    pub drained: bool,
    pub server: String,
    pub segments: Vec<SegmentView>,
    pub per_sensor: Vec<SensorSummary>,
}

struct InFlight {
    batch_id: u64,
    frame: Vec<u8>,
    deadline: Instant,
}

struct Session<'a> {
    fleet: &'a mut Fleet,
    cfg: &'a SessionConfig,
    current: usize,
    generation: u64,
    link: Option<Link>,
    connecting: Option<JoinHandle<Result<Link, LinkError>>>,
    incoming_tx: mpsc::UnboundedSender<Incoming>,
    in_flight: Option<InFlight>,
    next_batch_id: u64,
    failovers: u64,
    batches_acked: u64,
    bad_replies: u64,
    refused_batches: u64,
    /// Servers (by index) that refused the handshake; each is logged once.
    refused_by: std::collections::HashSet<usize>,
    latest: BTreeMap<u32, Average>,
    started: Instant,
    /// The highest server epoch seen in a reply, with its seal; sent with
    /// every batch so a server that was replaced while it was paused or cut
    /// off steps down.
    epoch: u64,
    seal: fog_protocol::Seal,
    /// Least time between two batches, and when the next may go.
    batch_gap: Duration,
    next_batch_at: Instant,
    /// The last commit failed (already reported).
    commit_failing: bool,
    /// When each server was last given up for silence or a closed
    /// connection; cleared by its next reply.
    lost_at: Vec<Option<Instant>>,
    /// Send the batch in flight again to the current server at this time.
    retry_at: Option<Instant>,
}

/// Runs the fleet against the servers until the duration has passed and
/// every reading is acked (or the drain timeout), or `shutdown` fires twice.
/// Each message on `reload` asks for a hot swap of the component file.
pub async fn run(
    fleet: &mut Fleet,
    cfg: &SessionConfig,
    shutdown: impl Future<Output = ()>,
    mut reload: mpsc::UnboundedReceiver<()>,
) -> Summary {
    let (incoming_tx, mut incoming_rx) = mpsc::unbounded_channel();
    let started = Instant::now();
    let slices = fleet.len().clamp(1, TICK_SLICES);
    let mut s = Session {
        fleet,
        cfg,
        current: 0,
        generation: 0,
        link: None,
        connecting: None,
        incoming_tx,
        in_flight: None,
        next_batch_id: 1,
        failovers: 0,
        batches_acked: 0,
        bad_replies: 0,
        refused_batches: 0,
        refused_by: std::collections::HashSet::new(),
        latest: BTreeMap::new(),
        started,
        epoch: cfg.epoch.map_or(0, |e| e.0),
        seal: cfg.epoch.map_or([0; 16], |e| e.1),
        batch_gap: cfg.interval / BATCHES_PER_INTERVAL,
        next_batch_at: started,
        commit_failing: false,
        lost_at: vec![None; cfg.servers.len()],
        retry_at: None,
    };
    s.start_connect(Duration::ZERO);

    let generate_until = cfg.duration.map(|d| started + d);
    let mut drain_deadline: Option<Instant> = None;
    let slice_every = cfg.interval / slices as u32;
    let mut slice = 0usize;
    let mut next_tick = started;
    let mut next_progress = cfg.progress.map(|p| started + p);
    let mut loading: Option<JoinHandle<Result<SensorComponent, LoadError>>> = None;
    let mut reload_open = true;
    tokio::pin!(shutdown);
    let mut interrupted = false;
    let drained = loop {
        let reply_deadline = s.in_flight.as_ref().filter(|_| s.link.is_some()).map(|f| f.deadline);
        tokio::select! {
            () = &mut shutdown, if !interrupted => {
                interrupted = true;
                if drain_deadline.is_none() {
                    tracing::info!("interrupted: no new readings; draining unacked ones (up to {:?})", cfg.drain_timeout);
                    drain_deadline = Some(Instant::now() + cfg.drain_timeout);
                } else {
                    break false;
                }
            }
            res = async { s.connecting.as_mut().expect("guarded").await }, if s.connecting.is_some() => {
                s.connecting = None;
                match res {
                    Ok(Ok(link)) => {
                        tracing::info!(server = %link.endpoint, "connected");
                        s.link = Some(link);
                        if s.in_flight.is_some() {
                            s.resend_in_flight().await;
                        } else if s.fleet.pending() > 0 {
                            s.send_batch().await;
                        }
                    }
                    Ok(Err(e)) => {
                        tracing::warn!("{e}");
                        s.give_up();
                    }
                    Err(e) => {
                        tracing::warn!("connection attempt failed: {e}");
                        s.give_up();
                    }
                }
            }
            Some(incoming) = incoming_rx.recv() => {
                if incoming.generation == s.generation {
                    match incoming.event {
                        LinkEvent::Frame(frame) => s.handle_frame(&frame).await,
                        LinkEvent::Closed if s.link.is_some() => {
                            tracing::warn!(server = %s.endpoint(), "connection closed: failing over");
                            s.give_up();
                        }
                        LinkEvent::Closed => {}
                        LinkEvent::Refused(why) => {
                            if s.refused_by.insert(s.current) {
                                tracing::warn!(server = %s.endpoint(), "the server refused the connection: {why} (check --key and --server-keys); asking every {:?}", REFUSED_RETRY);
                            }
                            s.lost_at[s.current] = Some(Instant::now());
                            s.failover(REFUSED_RETRY);
                        }
                    }
                }
            }
            () = sleep_until(reply_deadline.unwrap_or(started)), if reply_deadline.is_some() => {
                tracing::warn!(server = %s.endpoint(), "no reply within {:?}: failing over", cfg.timeout);
                s.give_up();
            }
            () = sleep_until(s.retry_at.unwrap_or(started)), if s.retry_at.is_some() => {
                s.retry_at = None;
                s.resend_in_flight().await;
            }
            request = reload.recv(), if reload_open => {
                match (request, &cfg.component) {
                    (None, _) => reload_open = false,
                    (Some(()), None) => tracing::warn!("reload requested, but the host runs the built-in sensor: start it with a component path to swap"),
                    (Some(()), Some(_)) if loading.is_some() => tracing::info!("reload requested while one is in progress: ignored"),
                    (Some(()), Some(path)) => {
                        tracing::info!("loading {} to swap it in", path.display());
                        // Compiling takes a while: off the loop, so sensors keep ticking.
                        let (engine, path) = (s.fleet.engine().clone(), path.clone());
                        loading = Some(tokio::task::spawn_blocking(move || engine.load(Some(&path))));
                    }
                }
            }
            res = async { loading.as_mut().expect("guarded").await }, if loading.is_some() => {
                loading = None;
                let from = s.fleet.component_origin().to_string();
                match res {
                    Ok(Ok(component)) => {
                        let to = component.origin.clone();
                        let began = std::time::Instant::now();
                        match sandboxed(|| s.fleet.swap(component)) {
                            Ok(moved) => tracing::info!("hot swap: {moved} sensors moved from {from} to {to} in {:.1?}", began.elapsed()),
                            Err(e) => tracing::error!("hot swap refused, still running {from}: {e}"),
                        }
                    }
                    Ok(Err(e)) => tracing::error!("hot swap refused, still running {from}: {e}"),
                    Err(e) => tracing::error!("hot swap refused, still running {from}: loading failed: {e}"),
                }
            }
            () = sleep_until(next_tick) => {
                let now = Instant::now();
                next_tick += slice_every;
                if next_tick < now {
                    next_tick = now + slice_every;
                }
                let first_slice = slice == 0;
                let range = s.fleet.slice(slice, slices);
                slice = (slice + 1) % slices;
                if first_slice && drain_deadline.is_none() && generate_until.is_some_and(|t| now >= t) {
                    tracing::info!("generation stopped after {:?}; draining unacked readings (up to {:?})", cfg.duration.unwrap_or_default(), cfg.drain_timeout);
                    drain_deadline = Some(now + cfg.drain_timeout);
                }
                let produce = drain_deadline.is_none();
                sandboxed(|| {
                    s.fleet.restart_due(now.into_std());
                    s.fleet.tick(range, produce);
                });
                // Every interval a batch goes out even without readings, so
                // every sensor keeps receiving averages.
                if s.link.is_some() && s.in_flight.is_none() && now >= s.next_batch_at && (first_slice || s.fleet.pending() > 0) {
                    s.send_batch().await;
                }
                if !first_slice {
                    continue;
                }
                // While draining the statuses are read anyway; the progress
                // line uses the same reading.
                let mut refreshed = false;
                if let Some(deadline) = drain_deadline {
                    if sandboxed(|| s.fleet.refresh_status()) {
                        break true;
                    }
                    refreshed = true;
                    if now >= deadline {
                        tracing::warn!("drain timeout: some readings were never acked");
                        break false;
                    }
                }
                if let (Some(at), Some(every)) = (next_progress, cfg.progress) {
                    if now >= at {
                        next_progress = Some(at + every);
                        if !refreshed {
                            sandboxed(|| s.fleet.refresh_status());
                        }
                        eprintln!("{}", s.progress_line());
                    }
                }
            }
        }
    };
    sandboxed(|| s.fleet.refresh_status());
    if s.fleet.has_state_dir() {
        // Acks that arrived since the last batch: on disk, so a restart
        // does not resend what the server already counted.
        if let Err(e) = sandboxed(|| s.fleet.commit_all()) {
            tracing::error!("cannot write the final sensor state: {e}");
        }
    }
    s.summary(drained)
}

/// Runs calls into the sensors. WASI's synchronous streams (a guest
/// printing, e.g. a panic message) block on the ambient tokio runtime, which
/// is only allowed outside of it: `block_in_place` steps out of the runtime
/// for the duration (inline, on the thread of a multi-threaded runtime's
/// `block_on`), so a guest's output cannot bring the host down.
fn sandboxed<R>(f: impl FnOnce() -> R) -> R {
    tokio::task::block_in_place(f)
}

impl Session<'_> {
    fn endpoint(&self) -> &str {
        &self.cfg.servers[self.current]
    }

    fn start_connect(&mut self, pause: Duration) {
        self.generation += 1;
        let endpoint = self.endpoint().to_string();
        let generation = self.generation;
        let tx = self.incoming_tx.clone();
        let keys = self.cfg.keys.as_ref().map(|k| LinkKeys {
            keys: k.keys.clone(),
            server: k.servers.get(self.current).or(k.servers.last()).copied().unwrap_or(fog_transport::PublicKey([0; 32])),
        });
        if let Some(old) = self.connecting.take() {
            old.abort();
        }
        self.connecting = Some(tokio::spawn(async move {
            tokio::time::sleep(pause).await;
            Link::connect(endpoint, generation, tx, keys).await
        }));
    }

    /// The current server is gone (silent, closed, unreachable): remember
    /// when, and fail over.
    fn give_up(&mut self) {
        self.lost_at[self.current] = Some(Instant::now());
        self.failover(Duration::ZERO);
    }

    /// Drops the current server and starts connecting to the next one. The
    /// batch in flight, if any, is sent there once connected.
    fn failover(&mut self, pause: Duration) {
        self.link = None;
        self.retry_at = None;
        self.current = (self.current + 1) % self.cfg.servers.len();
        self.failovers += 1;
        self.fleet.force_full_batch();
        tracing::info!(server = %self.endpoint(), "failing over");
        self.start_connect(pause);
    }

    /// Commits the sensors' state, then sends one batch with every pending
    /// reading. When the commit fails nothing is sent: a reading may only
    /// leave once a restart would resume after it.
    async fn send_batch(&mut self) {
        self.next_batch_at = Instant::now() + self.batch_gap;
        match sandboxed(|| self.fleet.commit()) {
            Ok(_) if self.commit_failing => {
                self.commit_failing = false;
                tracing::info!("sensor state written again; sending resumes");
            }
            Ok(_) => {}
            Err(e) => {
                if !self.commit_failing {
                    tracing::error!("cannot write the sensor state: {e}; holding readings back until it can be written");
                }
                self.commit_failing = true;
                return;
            }
        }
        let batch_id = self.next_batch_id;
        self.next_batch_id += 1;
        let (sensors, _) = self.fleet.take_batch();
        let request = fog_protocol::Request::Batch { batch_id, epoch: self.epoch, seal: self.seal, sensors };
        match fog_protocol::encode(&request) {
            Ok(frame) => {
                self.in_flight = Some(InFlight { batch_id, frame, deadline: Instant::now() });
                self.resend_in_flight().await;
            }
            // The readings are still in the sensors' resend buffers.
            Err(e) => tracing::error!("cannot encode batch {batch_id}: {e}"),
        }
    }

    async fn resend_in_flight(&mut self) {
        let (Some(link), Some(flight)) = (self.link.as_mut(), self.in_flight.as_mut()) else { return };
        flight.deadline = Instant::now() + self.cfg.timeout;
        if let Err(e) = link.send(flight.frame.clone(), self.cfg.timeout).await {
            tracing::warn!("{e}");
            self.give_up();
        }
    }

    async fn handle_frame(&mut self, frame: &[u8]) {
        match fog_protocol::decode::<Reply>(frame) {
            Ok(Reply::Batch(reply)) => {
                if self.in_flight.as_ref().is_none_or(|f| f.batch_id != reply.batch_id) {
                    return; // a late answer to a batch already resent elsewhere
                }
                self.in_flight = None;
                self.lost_at[self.current] = None;
                self.batches_acked += 1;
                self.note_epoch(reply.epoch, reply.seal);
                for avg in &reply.averages {
                    let newer = self
                        .latest
                        .get(&avg.segment)
                        .is_none_or(|cur| (avg.window_end_ms, avg.revision) > (cur.window_end_ms, cur.revision));
                    if newer {
                        self.latest.insert(avg.segment, *avg);
                    }
                }
                sandboxed(|| self.fleet.apply(&reply));
                if self.fleet.pending() > 0 && Instant::now() >= self.next_batch_at {
                    self.send_batch().await;
                }
            }
            Ok(Reply::NotActive { state, epoch, seal }) => {
                self.note_epoch(epoch, seal);
                let next = (self.current + 1) % self.cfg.servers.len();
                let next_lost_recently =
                    self.lost_at[next].is_some_and(|at| at.elapsed() < self.cfg.timeout * 3);
                if next_lost_recently && next != self.current {
                    // The other server was just lost: this one is taking
                    // over (it needs its peer to expire first). Ask it again
                    // shortly instead of waiting on a dead server.
                    tracing::debug!(server = %self.endpoint(), "server is {}: asking again", state.as_str());
                    self.retry_at = Some(Instant::now() + NOT_ACTIVE_RETRY);
                } else {
                    tracing::info!(server = %self.endpoint(), "server is {}: failing over", state.as_str());
                    // Both servers may be passive for a moment (a takeover
                    // in progress): do not bounce between them at full speed.
                    self.failover(NOT_ACTIVE_RETRY);
                }
            }
            Ok(Reply::Refused { batch_id, reason }) => {
                // The batch stays in flight and goes again at its deadline;
                // its readings stay in the sensors until acked.
                self.refused_batches += 1;
                if self.refused_batches == 1 {
                    tracing::warn!(server = %self.endpoint(), batch_id, "batch refused: {reason}; it will be sent again");
                }
            }
            Ok(Reply::Status(_)) => {}
            Err(e) => {
                self.bad_replies += 1;
                if self.bad_replies == 1 {
                    tracing::warn!(server = %self.endpoint(), "dropped a reply that cannot be decoded: {e}");
                }
            }
        }
    }

    /// Keeps the highest epoch a server has shown, with its seal.
    fn note_epoch(&mut self, epoch: u64, seal: fog_protocol::Seal) {
        if epoch > self.epoch {
            self.epoch = epoch;
            self.seal = seal;
            if let Err(e) = self.fleet.save_epoch(epoch, &seal) {
                tracing::warn!("cannot save the server epoch in the state directory: {e}");
            }
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

    fn progress_line(&self) -> String {
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
            self.failovers,
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

    fn summary(&self, drained: bool) -> Summary {
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
            failovers: self.failovers,
            failed_sensors: self.fleet.failures,
            restarts: self.fleet.restarts,
            quarantined: self.fleet.quarantined(),
            swaps: self.fleet.swaps,
            component: self.fleet.component_origin().to_string(),
            batches_acked: self.batches_acked,
            bad_replies: self.bad_replies,
            elapsed_s: self.started.elapsed().as_secs_f64(),
            drained,
            server: self.endpoint().to_string(),
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
