//! The host's side of the conversation with a Binary Star pair, without
//! I/O: which server to talk to, when a batch goes, when the batches in
//! flight are sent again and where, how the highest sealed epoch is kept, and when
//! the run ends. The driver ([`crate::session`]) feeds it what happened, each
//! with the time it happened at (`handle_*`), carries out the [`Action`]s it
//! asks for ([`HostCore::poll_action`]) against the link and the fleet, and
//! wakes it at [`HostCore::poll_timeout`]. It reads no clock, no socket and
//! no sensor, so its tests run on simulated time.
//!
//! Time is a [`std::time::Instant`] handed in by the driver, not a count of
//! milliseconds: the pacing works in fractions of a round of visits (a slice
//! of a 100 ms round over 10 slices is 10 ms, a batch gap 25 ms) that
//! milliseconds would round, the fleet's own clock ([`Fleet::restart_due`])
//! takes an `Instant`, and tokio's converts to it without loss. Tests start
//! from any `Instant` and add durations to it.
//!
//! Up to [`MAX_IN_FLIGHT`] batches are on their way at once, so a host that
//! makes more readings than one batch holds is not held to one round trip
//! per batch. Delivery is judged only by replies. When the oldest batch got
//! no reply within the timeout, every batch in flight is sent again,
//! unchanged and in order, to the other server; the server's exactly-once
//! counting (a watermark and the seqs above it, per sensor) makes that safe
//! whatever order they land in. The sensors' own resend buffers cover
//! everything else, so a lost batch never loses a reading.
//!
//! [`Fleet::restart_due`]: crate::fleet::Fleet::restart_due

use std::collections::{HashSet, VecDeque};
use std::time::{Duration, Instant};

use fog_protocol::{BatchReply, MAX_READINGS_PER_BATCH, Reply, Request, Seal, SensorBatch};

/// How soon a server that answered "not active" is asked again.
pub const NOT_ACTIVE_RETRY: Duration = Duration::from_millis(50);
/// How long the host waits before connecting again after a server refused
/// its handshake (a key problem an operator has to fix).
pub const REFUSED_RETRY: Duration = Duration::from_secs(1);
/// The visits of one round (every sensor visited once, see
/// [`CoreConfig::visit_every`]) are spread over this many slices (fewer
/// with fewer sensors), so a large fleet does not produce every reading at
/// the same instant.
pub const TICK_SLICES: usize = 10;
/// Batches per round at most: readings of several slices travel
/// together. A full batch's worth of readings waiting goes at once.
pub const BATCHES_PER_INTERVAL: u32 = 4;
/// Batches on their way at most (sent, or to be sent again after a
/// failover, and not yet answered).
pub const MAX_IN_FLIGHT: usize = 4;
/// Readings waiting that send a batch while others are in flight (once the
/// gap since the last batch is over, or at once when they fill a batch): a
/// host that makes more than one batch carries per round trip does not
/// wait for replies, and one that does not sends fewer, larger batches
/// (each costs the server a commit and the host passes over its sensors).
pub const PIPELINE_READINGS: usize = MAX_READINGS_PER_BATCH / 4;

/// What the core needs to know at start.
#[derive(Debug, Clone)]
pub struct CoreConfig {
    /// The servers' endpoints, in the order they are tried (for log lines).
    pub servers: Vec<String>,
    /// How many sensors the fleet runs (decides the tick slices).
    pub sensors: usize,
    /// The reading interval of every sensor.
    pub interval: Duration,
    /// Readings each visit makes (at least 1): the sensors are visited
    /// every `interval × readings_per_visit`.
    pub readings_per_visit: u32,
    pub timeout: Duration,
    /// Stop generating after this long; `None` runs until shut down.
    pub duration: Option<Duration>,
    pub drain_timeout: Duration,
    /// How often to print a progress line; `None` prints none.
    pub progress: Option<Duration>,
    /// The highest server epoch seen before a restart, and its seal.
    pub epoch: Option<(u64, Seal)>,
    /// Readings waiting that send a batch while others are in flight
    /// ([`PIPELINE_READINGS`]; the simulation's small fleet uses fewer).
    pub pipeline_readings: usize,
}

impl CoreConfig {
    /// How often each sensor is visited.
    pub fn visit_every(&self) -> Duration {
        self.interval.saturating_mul(self.readings_per_visit.max(1))
    }
}

/// Something the core wants done.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Drop the current link (and any attempt under way) and connect to
    /// `servers[server]` after `after`; report with
    /// [`HostCore::handle_connected`], [`HostCore::handle_link_failed`] or
    /// [`HostCore::handle_refused`]. The next batch carries every sensor:
    /// a new server checks every cursor.
    Connect { server: usize, after: Duration },
    /// Send this frame on the current link.
    Send { frame: Vec<u8> },
    /// Visit the sensors of slice `slice` of `slices`, each making `make`
    /// readings (none while draining), restart the sensors due, and, with
    /// `refresh`, read every sensor's status; report with
    /// [`HostCore::handle_ticked`].
    Tick { slice: usize, slices: usize, make: u32, refresh: bool },
    /// Commit the sensors' state and take batch `batch_id`; report it
    /// with [`HostCore::handle_batch`], or report nothing when the commit
    /// fails (a reading may only leave once a restart would resume after
    /// it). The reply to it carries the same id.
    TakeBatch { batch_id: u64 },
    /// Hand the reply to the sensors; report with [`HostCore::handle_applied`].
    ApplyReply(BatchReply),
    /// Keep this epoch and seal across a restart of the host.
    SaveEpoch { epoch: u64, seal: Seal },
    /// Print a progress line.
    Progress,
    /// The run is over: every reading acked (`drained`), or not.
    Finish { drained: bool },
}

struct InFlight {
    batch_id: u64,
    frame: Vec<u8>,
    /// The epoch the frame claims (the highest seen when it was made).
    epoch: u64,
    /// When the current server is given up, if this is the oldest batch
    /// in flight: a timeout after it was sent, or after the batch ahead of
    /// it was answered if that was later. Set when the frame is sent.
    deadline: Option<Instant>,
}

/// The host's protocol state.
pub struct HostCore {
    cfg: CoreConfig,
    out: VecDeque<Action>,
    current: usize,
    connected: bool,
    /// Oldest first; at most [`MAX_IN_FLIGHT`].
    in_flight: VecDeque<InFlight>,
    next_batch_id: u64,
    /// Send the batches in flight again to the current server at this time.
    retry_at: Option<Instant>,
    /// When each server was last given up for silence or a closed
    /// connection; cleared by its next reply.
    lost_at: Vec<Option<Instant>>,
    /// Servers (by index) that refused the handshake; each is logged once.
    refused_by: HashSet<usize>,
    /// The highest server epoch seen in a reply, with its seal; sent with
    /// every batch so a server that was replaced while it was paused or cut
    /// off steps down.
    epoch: u64,
    seal: Seal,
    /// Least time between two batches, and when the next may go.
    batch_gap: Duration,
    next_batch_at: Instant,
    slices: usize,
    slice: usize,
    slice_every: Duration,
    next_tick: Instant,
    /// The tick reported next began a round (its first slice).
    ticking_first_slice: bool,
    generate_until: Option<Instant>,
    drain_deadline: Option<Instant>,
    next_progress: Option<Instant>,
    finished: bool,
    failovers: u64,
    batches_acked: u64,
    bad_replies: u64,
    refused_batches: u64,
    /// Epochs taken back because a server served a batch that claimed them.
    unvouched_epochs: u64,
    /// The most batches in flight at once over the run.
    most_in_flight: usize,
    /// A deliberate bug, planted by [`HostCore::plant_forgotten_resend`].
    forgets_resend: bool,
}

impl HostCore {
    /// A core that starts at `now` by connecting to the first server.
    pub fn new(cfg: CoreConfig, now: Instant) -> Self {
        assert!(!cfg.servers.is_empty(), "a host needs at least one server");
        let slices = cfg.sensors.clamp(1, TICK_SLICES);
        let visit_every = cfg.visit_every();
        let mut core = HostCore {
            out: VecDeque::new(),
            current: 0,
            connected: false,
            in_flight: VecDeque::new(),
            next_batch_id: 1,
            retry_at: None,
            lost_at: vec![None; cfg.servers.len()],
            refused_by: HashSet::new(),
            epoch: cfg.epoch.map_or(0, |e| e.0),
            seal: cfg.epoch.map_or([0; 16], |e| e.1),
            batch_gap: visit_every / BATCHES_PER_INTERVAL,
            next_batch_at: now,
            slices,
            slice: 0,
            slice_every: visit_every / slices as u32,
            next_tick: now,
            ticking_first_slice: false,
            generate_until: cfg.duration.map(|d| now + d),
            drain_deadline: None,
            next_progress: cfg.progress.map(|p| now + p),
            finished: false,
            failovers: 0,
            batches_acked: 0,
            bad_replies: 0,
            unvouched_epochs: 0,
            refused_batches: 0,
            most_in_flight: 0,
            forgets_resend: false,
            cfg,
        };
        core.out.push_back(Action::Connect { server: 0, after: Duration::ZERO });
        core
    }

    pub fn poll_action(&mut self) -> Option<Action> {
        self.out.pop_front()
    }

    /// When [`HostCore::handle_timeout`] is due next; `None` once finished.
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.finished {
            return None;
        }
        [self.reply_deadline(), self.retry_at, Some(self.next_tick)].into_iter().flatten().min()
    }

    /// The server talked to (or being connected to).
    pub fn server(&self) -> &str {
        &self.cfg.servers[self.current]
    }

    pub fn failovers(&self) -> u64 {
        self.failovers
    }

    pub fn batches_acked(&self) -> u64 {
        self.batches_acked
    }

    pub fn bad_replies(&self) -> u64 {
        self.bad_replies
    }

    /// Epochs taken back because a server served a batch that claimed them
    /// (see [`HostCore::handle_reply`]).
    pub fn unvouched_epochs(&self) -> u64 {
        self.unvouched_epochs
    }

    /// The highest epoch seen in a reply and vouched for, as batches carry it.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The most batches that were in flight at once over the run.
    pub fn most_in_flight(&self) -> usize {
        self.most_in_flight
    }

    pub fn is_finished(&self) -> bool {
        self.finished
    }

    /// When the current server is given up: the deadline of the oldest
    /// batch in flight. A server answers in order, so a batch behind it
    /// waits for it; its own timeout starts once the one ahead is answered
    /// (see [`HostCore::handle_reply`]). A server busy with several batches
    /// is not left for the time they queue, and one that answers the later
    /// batches but not the oldest is.
    fn reply_deadline(&self) -> Option<Instant> {
        self.in_flight.front().filter(|_| self.connected).and_then(|f| f.deadline)
    }

    /// Whether a batch may be taken now: connected, room in flight (no
    /// batch being taken already), and a full batch's worth of readings
    /// waiting, or the gap since the last batch over and something to say.
    /// With batches in flight that is enough readings (see
    /// [`PIPELINE_READINGS`]); with none, any reading, or the round's
    /// first slice (a batch goes out even without readings, so every sensor
    /// keeps receiving averages).
    fn may_take(&self, now: Instant, pending: usize, first_slice: bool) -> bool {
        let taking = self.out.iter().any(|a| matches!(a, Action::TakeBatch { .. }));
        if !self.connected || taking || self.in_flight.len() >= MAX_IN_FLIGHT {
            return false;
        }
        if pending >= MAX_READINGS_PER_BATCH {
            return true;
        }
        let enough = match self.in_flight.len() {
            0 => first_slice || pending > 0,
            _ => pending >= self.cfg.pipeline_readings.max(1),
        };
        now >= self.next_batch_at && enough
    }

    /// Silence past the reply deadline, a retry due, a tick due.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.finished {
            return;
        }
        if self.reply_deadline().is_some_and(|d| now >= d) {
            tracing::warn!(server = %self.server(), "no reply within {:?}: failing over", self.cfg.timeout);
            self.give_up(now);
        }
        if self.retry_at.is_some_and(|t| now >= t) {
            self.retry_at = None;
            self.send_in_flight(now);
        }
        if now >= self.next_tick {
            self.tick(now);
        }
    }

    fn tick(&mut self, now: Instant) {
        // The slices keep their pace: after one that ran long the next
        // ones come at once until the time is made up, so a late slice
        // does not slow every round after it. A host further behind than
        // a round (stalled, or slower than its sensors for long) starts
        // again from now instead of visiting every sensor twice in a row.
        self.next_tick += self.slice_every;
        if self.next_tick + self.cfg.visit_every() < now {
            self.next_tick = now + self.slice_every;
        }
        let first_slice = self.slice == 0;
        let slice = self.slice;
        self.slice = (self.slice + 1) % self.slices;
        if first_slice && self.drain_deadline.is_none() && self.generate_until.is_some_and(|t| now >= t) {
            tracing::info!(
                "generation stopped after {:?}; draining unacked readings (up to {:?})",
                self.cfg.duration.unwrap_or_default(),
                self.cfg.drain_timeout
            );
            self.drain_deadline = Some(now + self.cfg.drain_timeout);
        }
        // While draining the statuses are read anyway; the progress line
        // uses the same reading. Otherwise it uses what each sensor's last
        // tick said, read again for it only when ticks are further apart
        // than progress lines: a read of every sensor is a call into each.
        let progress_due = self.next_progress.is_some_and(|at| now >= at);
        let stale_for_progress = self.cfg.progress.is_some_and(|every| self.cfg.visit_every() > every);
        let refresh = first_slice && (self.drain_deadline.is_some() || (progress_due && stale_for_progress));
        self.ticking_first_slice = first_slice;
        let make = if self.drain_deadline.is_none() { self.cfg.readings_per_visit.max(1) } else { 0 };
        self.out.push_back(Action::Tick { slice, slices: self.slices, make, refresh });
    }

    /// The tick asked for is done: `pending` readings wait in the sensors,
    /// and, when the tick refreshed the statuses, `all_acked` says whether
    /// every reading is acked.
    pub fn handle_ticked(&mut self, now: Instant, pending: usize, all_acked: Option<bool>) {
        if self.finished {
            return;
        }
        let first_slice = std::mem::take(&mut self.ticking_first_slice);
        if self.may_take(now, pending, first_slice) {
            self.take_batch(now);
        }
        if !first_slice {
            return;
        }
        if let Some(deadline) = self.drain_deadline {
            if all_acked == Some(true) {
                return self.finish(true);
            }
            if now >= deadline {
                tracing::warn!("drain timeout: some readings were never acked");
                return self.finish(false);
            }
        }
        if let (Some(at), Some(every)) = (self.next_progress, self.cfg.progress) {
            if now >= at {
                self.next_progress = Some(at + every);
                self.out.push_back(Action::Progress);
            }
        }
    }

    /// An interrupt: stops generating and drains; while draining already,
    /// ends the run at once.
    pub fn handle_shutdown(&mut self, now: Instant) {
        if self.finished {
            return;
        }
        if self.drain_deadline.is_none() {
            tracing::info!("interrupted: no new readings; draining unacked ones (up to {:?})", self.cfg.drain_timeout);
            self.drain_deadline = Some(now + self.cfg.drain_timeout);
        } else {
            self.finish(false);
        }
    }

    fn finish(&mut self, drained: bool) {
        self.finished = true;
        self.out.push_back(Action::Finish { drained });
    }

    /// Plants a bug: after a failover the batches in flight are kept but
    /// never sent again, so the host waits for a reply that cannot come. It
    /// exists so that the whole-system simulation (`fog-sim`) can show it
    /// catches a host that forgets to resend; nothing else calls it.
    #[doc(hidden)]
    pub fn plant_forgotten_resend(&mut self) {
        self.forgets_resend = true;
    }

    /// The connection asked for is up; `pending` readings wait in the sensors.
    pub fn handle_connected(&mut self, now: Instant, pending: usize) {
        tracing::info!(server = %self.server(), "connected");
        self.connected = true;
        if self.forgets_resend {
            self.in_flight.iter_mut().for_each(|f| f.deadline = None);
        } else {
            self.send_in_flight(now);
        }
        if pending > 0 && self.may_take(now, pending, false) {
            self.take_batch(now);
        }
    }

    /// The connection closed (the server process died or closed it).
    pub fn handle_closed(&mut self, now: Instant) {
        if self.connected {
            tracing::warn!(server = %self.server(), "connection closed: failing over");
            self.give_up(now);
        }
    }

    /// Connecting or sending failed (the driver logged why).
    pub fn handle_link_failed(&mut self, now: Instant) {
        self.give_up(now);
    }

    /// The server refused the handshake: asking again at once would be
    /// refused again.
    pub fn handle_refused(&mut self, now: Instant, why: &str) {
        if self.refused_by.insert(self.current) {
            tracing::warn!(server = %self.server(), "the server refused the connection: {why} (check --key and --server-keys); asking every {:?}", REFUSED_RETRY);
        }
        self.lost_at[self.current] = Some(now);
        self.failover(REFUSED_RETRY);
    }

    /// The current server is gone (silent, closed, unreachable): remember
    /// when, and fail over.
    fn give_up(&mut self, now: Instant) {
        self.lost_at[self.current] = Some(now);
        self.failover(Duration::ZERO);
    }

    /// Drops the current server and connects to the next one. The batches
    /// in flight are sent there once connected.
    fn failover(&mut self, pause: Duration) {
        self.connected = false;
        self.retry_at = None;
        self.current = (self.current + 1) % self.cfg.servers.len();
        self.failovers += 1;
        tracing::info!(server = %self.server(), "failing over");
        self.out.push_back(Action::Connect { server: self.current, after: pause });
    }

    fn take_batch(&mut self, now: Instant) {
        self.next_batch_at = now + self.batch_gap;
        let batch_id = self.next_batch_id;
        self.next_batch_id += 1;
        self.out.push_back(Action::TakeBatch { batch_id });
    }

    /// The batch asked for: it goes out with the highest epoch seen. A
    /// batch taken after the run ended, or with no room in flight, is not
    /// sent.
    pub fn handle_batch(&mut self, now: Instant, batch_id: u64, sensors: Vec<SensorBatch>) {
        if self.finished || self.in_flight.len() >= MAX_IN_FLIGHT {
            return; // its readings are still in the sensors' resend buffers
        }
        let request = Request::Batch { batch_id, epoch: self.epoch, seal: self.seal, sensors };
        match fog_protocol::encode(&request) {
            Ok(frame) => {
                self.in_flight.push_back(InFlight { batch_id, frame, epoch: self.epoch, deadline: None });
                self.most_in_flight = self.most_in_flight.max(self.in_flight.len());
                if self.connected {
                    self.send(now, self.in_flight.len() - 1);
                }
            }
            // The readings are still in the sensors' resend buffers.
            Err(e) => tracing::error!("cannot encode batch {batch_id}: {e}"),
        }
    }

    /// Sends every batch in flight, oldest first (after a failover, or
    /// when a server that was not active yet is asked again).
    fn send_in_flight(&mut self, now: Instant) {
        if self.connected {
            (0..self.in_flight.len()).for_each(|k| self.send(now, k));
        }
    }

    fn send(&mut self, now: Instant, k: usize) {
        let flight = &mut self.in_flight[k];
        flight.deadline = Some(now + self.cfg.timeout);
        self.out.push_back(Action::Send { frame: flight.frame.clone() });
    }

    /// A frame from the current server.
    pub fn handle_frame(&mut self, now: Instant, frame: &[u8]) {
        // Bounded like the server's requests: a reply no honest server
        // sends (too many entries, seqs or epochs out of range) never
        // reaches a sensor, and the batch stays in flight.
        match fog_protocol::decode_reply(frame) {
            Ok(reply) => self.handle_reply(now, reply),
            Err(e) => {
                self.bad_replies += 1;
                if self.bad_replies == 1 {
                    tracing::warn!(server = %self.server(), "dropped a reply that cannot be decoded: {e}");
                }
            }
        }
    }

    /// A decoded reply from the current server.
    pub fn handle_reply(&mut self, now: Instant, reply: Reply) {
        match reply {
            Reply::Batch(reply) => {
                let Some(k) = self.in_flight.iter().position(|f| f.batch_id == reply.batch_id) else {
                    return; // a late answer to a batch already answered
                };
                let claimed = self.in_flight.remove(k).map_or(0, |f| f.epoch);
                if reply.epoch < claimed {
                    self.unvouched_epoch(claimed, reply.epoch, reply.seal);
                }
                if k == 0 {
                    // The next oldest now has the server's attention.
                    let timeout = self.cfg.timeout;
                    if let Some(deadline) = self.in_flight.front_mut().and_then(|f| f.deadline.as_mut()) {
                        *deadline = (*deadline).max(now + timeout);
                    }
                }
                self.lost_at[self.current] = None;
                self.batches_acked += 1;
                self.note_epoch(reply.epoch, reply.seal);
                self.out.push_back(Action::ApplyReply(reply));
            }
            Reply::NotActive { state, epoch, seal } => {
                self.note_epoch(epoch, seal);
                if !self.connected {
                    return; // another batch's answer: this server was left already
                }
                let next = (self.current + 1) % self.cfg.servers.len();
                let next_lost_recently =
                    self.lost_at[next].is_some_and(|at| now.saturating_duration_since(at) < self.cfg.timeout * 3);
                if next_lost_recently && next != self.current {
                    // The other server was just lost: this one is taking
                    // over (it needs its peer to expire first). Ask it again
                    // shortly instead of waiting on a dead server.
                    tracing::debug!(server = %self.server(), "server is {}: asking again", state.as_str());
                    self.retry_at = Some(now + NOT_ACTIVE_RETRY);
                } else {
                    tracing::info!(server = %self.server(), "server is {}: failing over", state.as_str());
                    // Both servers may be passive for a moment (a takeover
                    // in progress): do not bounce between them at full speed.
                    self.failover(NOT_ACTIVE_RETRY);
                }
            }
            Reply::Refused { batch_id, reason } => {
                // The batch stays in flight and goes again after its
                // deadline; its readings stay in the sensors until acked.
                self.refused_batches += 1;
                if self.refused_batches == 1 {
                    tracing::warn!(server = %self.server(), batch_id, "batch refused: {reason}; it will be sent again");
                }
            }
            Reply::Status(_) => {}
        }
    }

    /// The reply was applied; `pending` readings wait in the sensors (more
    /// than one batch held, or produced since).
    pub fn handle_applied(&mut self, now: Instant, pending: usize) {
        if pending > 0 && self.may_take(now, pending, false) {
            self.take_batch(now);
        }
    }

    /// A server served, in `epoch`, a batch that claimed the newer epoch
    /// `claimed`. A server of the pair checks a claim's seal and steps
    /// down (answering `NotActive`) for a newer epoch it can verify, so
    /// this claim had no valid seal: it came from something that held a
    /// server's key but not the pair's seal key. Carried on, it would be
    /// ignored by the pair in every batch, and the host's true epoch with
    /// it: the host takes the epoch of the server that served it instead.
    fn unvouched_epoch(&mut self, claimed: u64, epoch: u64, seal: Seal) {
        if self.epoch != claimed {
            return; // already taken back, or raised since
        }
        self.unvouched_epochs += 1;
        if self.unvouched_epochs == 1 {
            tracing::warn!(
                server = %self.server(),
                "the server served epoch {epoch} to a batch that claimed epoch {claimed}: that epoch has no valid seal \
                 (a server's key in the wrong hands?); taking epoch {epoch}"
            );
        }
        self.epoch = epoch;
        self.seal = seal;
        self.out.push_back(Action::SaveEpoch { epoch, seal });
    }

    /// Keeps the highest epoch a server has shown, with its seal.
    fn note_epoch(&mut self, epoch: u64, seal: Seal) {
        if epoch > self.epoch {
            self.epoch = epoch;
            self.seal = seal;
            self.out.push_back(Action::SaveEpoch { epoch, seal });
        }
    }
}

#[cfg(test)]
mod tests;
