//! The simulated host: the real [`HostCore`] and the real [`Fleet`] (batch
//! selection, ack merging, reply routing, supervision) over native sensors,
//! driven the way `fog-host`'s session drives them, with the link to a
//! server replaced by the world's message queues.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use fog_host::core::{Action, CoreConfig, HostCore};
use fog_host::fleet::{Fleet, FleetConfig, SensorSummary};
use fog_protocol::{BatchReply, Seal};

use crate::native::{BuiltIn, NativeRuntime, Traps, WallClock};

/// Sensors of the simulated host.
pub const SENSORS: u32 = 4;
/// Their reading interval, the readings of each visit (a visit every
/// 500 ms), the host's reply timeout and the sensors' resend timeout.
pub const INTERVAL: Duration = Duration::from_millis(250);
pub const READINGS_PER_VISIT: u32 = 2;
pub const TIMEOUT: Duration = Duration::from_millis(200);
pub const RESEND_AFTER_MS: u64 = 300;

/// What the host asks of the world.
pub enum Effect {
    /// A frame for server `to` on connection `generation`.
    Send { to: usize, generation: u64, frame: Vec<u8> },
}

pub struct SimHost {
    pub core: HostCore,
    pub traps: Traps,
    pub fleet: Fleet<NativeRuntime>,
    clock: WallClock,
    sim_ms: Arc<AtomicU64>,
    base: Instant,
    /// The server the link is up to, and the link's generation.
    pub link: Option<(usize, u64)>,
    /// A connection under way: `(up at, server, generation)`.
    connecting: Option<(u64, usize, u64)>,
    generation: u64,
    /// The epoch the host would keep across a restart.
    pub saved_epoch: Option<(u64, Seal)>,
    /// Every reply applied, for the checks.
    pub applied: Vec<(u64, BatchReply)>,
}

impl SimHost {
    /// A host starting at simulated time `t` (ms) with wall clock `wall`;
    /// its sensors stop seeing cars at `quiet_from` (ms of simulated time).
    pub fn new(seed: u64, t: u64, wall: u64, quiet_from: u64, traps: Traps) -> SimHost {
        let base = Instant::now();
        let clock = WallClock::default();
        clock.set(wall);
        let sim_ms = Arc::new(AtomicU64::new(t));
        let runtime = NativeRuntime { traps: traps.clone(), clock: clock.clone(), quiet_from: Arc::new(AtomicU64::new(quiet_from)), sim_ms: sim_ms.clone() };
        let config = FleetConfig {
            first_id: 0,
            count: SENSORS,
            segments: 2,
            resend_after_ms: RESEND_AFTER_MS,
            max_buffered: 10_000,
            settings: Vec::new(),
            seed: seed ^ 0x5e45_0125,
            restart_backoff: Duration::from_millis(100),
            // Planted traps are rare and random: never quarantine.
            max_restarts: 1_000_000,
            threads: 1,
            every_ms: INTERVAL.as_millis() as u32,
        };
        let now = base + Duration::from_millis(t);
        let fleet = match Fleet::start(Arc::new(runtime), BuiltIn, config, None, now) {
            Ok(fleet) => fleet,
            Err(e) => panic!("native sensors cannot fail to start: {e}"),
        };
        traps.arm(true);
        let core = HostCore::new(
            CoreConfig {
                // A few sensors never make a quarter batch: every reading
                // waiting sends one, so the faults meet batches in flight.
                pipeline_readings: 1,
                servers: vec!["primary".into(), "backup".into()],
                sensors: SENSORS as usize,
                interval: INTERVAL,
                readings_per_visit: READINGS_PER_VISIT,
                timeout: TIMEOUT,
                duration: None,
                drain_timeout: Duration::from_secs(60),
                progress: None,
                epoch: None,
            },
            now,
        );
        SimHost { core, traps, fleet, clock, sim_ms, base, link: None, connecting: None, generation: 0, saved_epoch: None, applied: Vec::new() }
    }

    fn instant(&self, t: u64) -> Instant {
        self.base + Duration::from_millis(t)
    }

    /// Time moves on to `t` (ms of simulated time), the wall clock reading
    /// `wall`; connections due come up and the core's timeout runs if due.
    pub fn step(&mut self, t: u64, wall: u64, up: impl Fn(usize) -> bool) -> Vec<Effect> {
        self.clock.set(wall);
        self.sim_ms.store(t, Ordering::Relaxed);
        let now = self.instant(t);
        let mut effects = Vec::new();
        if let Some((at, server, generation)) = self.connecting {
            if t >= at {
                self.connecting = None;
                // A DEALER connects lazily: the link is up whether or not
                // the server is; what it sends to a dead one is lost.
                let _ = up(server);
                self.link = Some((server, generation));
                self.core.handle_connected(now, self.fleet.pending());
                self.carry_out(t, &mut effects);
            }
        }
        if self.core.poll_timeout().is_some_and(|at| at <= now) {
            self.core.handle_timeout(now);
            self.carry_out(t, &mut effects);
        }
        effects
    }

    /// A reply frame from server `from` on connection `generation`.
    pub fn deliver(&mut self, t: u64, from: usize, generation: u64, frame: &[u8]) -> Vec<Effect> {
        let mut effects = Vec::new();
        if self.link == Some((from, generation)) {
            self.core.handle_frame(self.instant(t), frame);
            self.carry_out(t, &mut effects);
        }
        effects
    }

    /// The server the link is up to went away (its process died).
    pub fn server_gone(&mut self, t: u64, server: usize) -> Vec<Effect> {
        let mut effects = Vec::new();
        if self.link.is_some_and(|(s, _)| s == server) {
            self.core.handle_closed(self.instant(t));
            self.carry_out(t, &mut effects);
        }
        effects
    }

    /// Carries out the core's actions as `fog-host`'s session does.
    fn carry_out(&mut self, t: u64, effects: &mut Vec<Effect>) {
        let now = self.instant(t);
        while let Some(action) = self.core.poll_action() {
            match action {
                Action::Connect { server, after } => {
                    self.link = None;
                    self.fleet.force_full_batch();
                    self.generation += 1;
                    let at = t + u64::try_from(after.as_millis()).unwrap_or(u64::MAX) + 1;
                    self.connecting = Some((at, server, self.generation));
                }
                Action::Send { frame } => {
                    if let Some((to, generation)) = self.link {
                        effects.push(Effect::Send { to, generation, frame });
                    }
                }
                Action::Tick { slice, slices, make, refresh } => {
                    let range = self.fleet.slice(slice, slices);
                    self.fleet.restart_due(now);
                    self.fleet.tick(now, range, make);
                    let all_acked = refresh.then(|| self.fleet.refresh_status(now));
                    self.core.handle_ticked(now, self.fleet.pending(), all_acked);
                }
                Action::TakeBatch { batch_id } => {
                    let (sensors, _) = self.fleet.take_batch(now, batch_id);
                    if self.fleet.commit().is_ok() {
                        self.core.handle_batch(now, batch_id, sensors);
                    }
                }
                Action::ApplyReply(reply) => {
                    self.fleet.apply(now, &reply);
                    self.applied.push((t, reply));
                    self.core.handle_applied(now, self.fleet.pending());
                }
                Action::SaveEpoch { epoch, seal } => self.saved_epoch = Some((epoch, seal)),
                Action::Progress | Action::Finish { .. } => {}
            }
        }
    }

    /// Every sensor's figures, read from the sensors now.
    pub fn summaries(&mut self, t: u64) -> (bool, Vec<SensorSummary>) {
        let all_acked = self.fleet.refresh_status(self.instant(t));
        (all_acked, self.fleet.summaries())
    }
}
