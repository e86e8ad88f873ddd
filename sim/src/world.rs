//! The world: two server machines, one host, a rogue client, the network
//! between them and the faults, all on one simulated clock that moves a
//! millisecond at a time. A seed decides every loss, delay, duplicate and
//! fault, so a failing seed replays exactly.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use fog_protocol::{NodeState, PeerMessage, Reply, Request, decode, encode};
use fog_server::{Node, Output, Role};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::host::{Effect, SimHost};
use crate::native::Traps;
use crate::rogue::{ROGUE, Rogue};
use crate::servers::{Job, Link, Server};

/// Wall-clock time at the start of a run.
pub const T0: u64 = 1_700_000_000_000;
/// Cars pass the sensors until then (ms of simulated time).
pub const GENERATE_UNTIL: u64 = 10_000;
/// Faults start before then; each lasts at most [`MAX_FAULT`].
pub const FAULTS_UNTIL: u64 = 9_000;
pub const MAX_FAULT: u64 = 3_000;
/// The run ends then; the last part is quiet (no faults, no loss).
pub const RUN_UNTIL: u64 = 24_000;
/// Clock steps are at most this large, either way: well inside the
/// servers' allowed clock skew (a minute) even when host and server step
/// in opposite directions.
pub const MAX_CLOCK_STEP: u64 = 20_000;

#[derive(Debug, Clone, Copy)]
pub enum Fault {
    Crash(usize, u64),
    CrashBoth(u64),
    Partition(u64),
    /// A node frozen while the world goes on (as with SIGSTOP).
    Pause(usize, u64),
    /// The active loses its disk (only while its passive is in sync).
    Wipe(u64),
    /// The server link is cut for a while; halfway the host moves over.
    SplitAndMove(u64),
    MoveHost,
    /// A server's wall clock steps by this many ms (NTP).
    StepServerClock(usize, i64),
    /// The host's wall clock steps.
    StepHostClock(i64),
}

pub struct World {
    pub rng: StdRng,
    /// Simulated time in ms since the start.
    pub t: u64,
    pub servers: [Server; 2],
    /// `[0]`: from server 0 to 1; `[1]`: from 1 to 0.
    pub links: [Link; 2],
    /// Requests on their way to each server: `(at, token, request)`.
    pub to_server: [VecDeque<(u64, u64, Request)>; 2],
    /// Replies on their way to the host: `(at, server, generation, frame)`.
    pub to_host: VecDeque<(u64, usize, u64, Vec<u8>)>,
    pub host: SimHost,
    pub host_wall_offset: i64,
    pub partitioned_until: u64,
    pub loss_peer: f64,
    pub loss_client: f64,
    pub dup: f64,
    pub max_delay: u64,
    /// The nodes that acked a batch in each epoch.
    pub ackers: BTreeMap<u64, BTreeSet<usize>>,
    /// Until when a fault (or an election, or a passive rejoining) disturbs the system;
    /// the progress check waits for calm after it.
    pub disturbed_until: u64,
    pub clock_steps: u64,
    pub watch: crate::checks::Watch,
    /// The faults to run instead of the seed's own (a test's scenario).
    pub planned: Option<Vec<(u64, Fault)>>,
    pub log: Vec<String>,
    pub rogue: Rogue,
    /// The highest epoch a node has served in.
    pub served_epoch: u64,
    last_states: [Option<(NodeState, u64, bool, bool)>; 2],
    pub trace: bool,
}

impl World {
    pub fn new(seed: u64) -> World {
        let mut rng = StdRng::seed_from_u64(seed);
        let loss_peer = rng.random_range(0.0..0.1);
        let loss_client = rng.random_range(0.0..0.05);
        let dup = rng.random_range(0.0..0.05);
        let max_delay = rng.random_range(1..10);
        // One seed in three has sensor calls that trap now and then (a
        // sensor is called about once a visit).
        let trap_probability = if rng.random_bool(1.0 / 3.0) { rng.random_range(0.0025..0.015) } else { 0.0 };
        let traps = Traps::new(rng.random(), trap_probability);
        World {
            rng,
            t: 0,
            servers: [Server::new(Role::Primary), Server::new(Role::Backup)],
            links: [Link::default(), Link::default()],
            to_server: [VecDeque::new(), VecDeque::new()],
            to_host: VecDeque::new(),
            host: SimHost::new(seed, 0, T0, GENERATE_UNTIL, traps),
            host_wall_offset: 0,
            partitioned_until: 0,
            loss_peer,
            loss_client,
            dup,
            max_delay,
            ackers: BTreeMap::new(),
            disturbed_until: 0,
            clock_steps: 0,
            watch: Default::default(),
            planned: None,
            log: Vec::new(),
            rogue: Rogue::default(),
            served_epoch: 0,
            last_states: [None, None],
            trace: false,
        }
    }

    pub fn note(&mut self, what: String) {
        let line = format!("[{:>6} ms] {what}", self.t);
        if self.trace {
            println!("{line}");
        }
        self.log.push(line);
    }

    pub fn wall(&self) -> u64 {
        T0 + self.t
    }

    pub fn up(&self, i: usize) -> bool {
        self.servers[i].up(self.t)
    }

    fn crash(&mut self, i: usize, down_for: u64) {
        if self.servers[i].node.is_none() {
            return;
        }
        self.note(format!("crash {:?} for {down_for} ms", self.servers[i].role));
        self.servers[i].crash(self.t, down_for);
        self.to_server[i].clear();
        for l in &mut self.links {
            l.queue.clear();
        }
        let effects = self.host.server_gone(self.t, i);
        self.host_effects(effects);
    }

    /// The active node's machine is lost with its disk, while its passive
    /// is in sync (the only moment that can be survived); it comes back
    /// empty later. Skipped at any other moment.
    fn wipe(&mut self, down_for: u64) {
        let wiped = (0..2).find(|&i| self.servers[i].node.as_ref().is_some_and(|n| n.state() == NodeState::Active && n.has_passive_in_sync()));
        let Some(i) = wiped else { return };
        self.note(format!("wipe {:?} (data lost) for {down_for} ms", self.servers[i].role));
        self.crash(i, down_for);
        self.servers[i].disk = Default::default();
    }

    /// Runs a node's outputs into the world.
    fn drain(&mut self, i: usize) {
        let Some(node) = self.servers[i].node.as_mut() else { return };
        let mut outs = Vec::new();
        while let Some(o) = node.poll_output() {
            outs.push(o);
        }
        for o in outs {
            match o {
                Output::Append(e) => {
                    let at = self.t + self.rng.random_range(0..3);
                    self.servers[i].writes.push_back((at, Job::Append(e)));
                }
                Output::SaveSnapshot { lsn, bytes } => {
                    let at = self.t + self.rng.random_range(0..3);
                    self.servers[i].writes.push_back((at, Job::Snapshot(lsn, bytes)));
                }
                Output::Reply { to, reply } => {
                    if let Reply::Batch(b) = &reply {
                        self.ackers.entry(b.epoch).or_default().insert(i);
                        let ackers = &self.ackers[&b.epoch];
                        assert!(ackers.len() <= 1, "epoch {} was acked by both nodes", b.epoch);
                    }
                    if self.rng.random_bool(self.loss_client) {
                        continue;
                    }
                    if to & ROGUE != 0 {
                        self.rogue.note_reply(&reply);
                        continue;
                    }
                    let frame = encode(&reply).unwrap_or_else(|e| panic!("a node's reply does not encode: {e}"));
                    let at = self.t + self.rng.random_range(1..=self.max_delay);
                    self.to_host.push_back((at, i, to, frame));
                }
                Output::Peer(msg) => self.send_peer(i, msg),
            }
        }
    }

    fn send_peer(&mut self, from: usize, msg: PeerMessage) {
        // A PUB socket drops what no subscriber receives.
        if self.servers[1 - from].node.is_none() || self.t < self.partitioned_until || self.rng.random_bool(self.loss_peer) {
            return;
        }
        let copies = if self.rng.random_bool(self.dup) { 2 } else { 1 };
        let at = (self.t + self.rng.random_range(1..=self.max_delay)).max(self.links[from].last_at);
        let link = &mut self.links[from];
        link.last_at = at;
        for _ in 0..copies {
            link.queue.push_back((at, msg.clone()));
        }
    }

    /// Notes every change of a node's state, and takes a takeover or a
    /// passive that rejoins as a disturbance.
    fn watch_states(&mut self) {
        for i in 0..2 {
            let Some(n) = self.servers[i].node.as_ref() else { continue };
            let state = (n.state(), n.epoch(), n.caught_up(), n.has_passive_in_sync());
            if self.last_states[i] != Some(state) {
                // A takeover (a lossy link can bring one about without a
                // fault) or a passive that lost its place and rejoins
                // disturbs the system as a fault does: the pair settles.
                let takeover = self.last_states[i].is_some_and(|(_, epoch, _, _)| epoch != state.1);
                let rejoins = self.last_states[i].is_some_and(|(was, _, caught_up, _)| was == NodeState::Passive && caught_up && !state.2);
                if takeover || rejoins {
                    self.disturbed_until = self.disturbed_until.max(self.t);
                }
                self.last_states[i] = Some(state);
                let line = format!("{:?}: {:?} epoch {} caught_up {} passive_in_sync {} lsn {}", self.servers[i].role, state.0, state.1, state.2, state.3, n.lsn());
                self.note(line);
            }
        }
    }

    fn step_servers(&mut self) {
        /// How often (simulated ms) an active's uplink gets an ack.
        const CLOUD_ACK_EVERY: u64 = 97;
        let (t, wall) = (self.t, self.wall());
        for i in 0..2 {
            if self.servers[i].down_until.is_some_and(|at| t >= at) {
                let role = self.servers[i].role;
                if let Err(e) = self.servers[i].restart() {
                    panic!("{e}");
                }
                self.note(format!("restart {role:?}"));
            }
            if !self.up(i) {
                continue;
            }
            let now = self.servers[i].now(t, wall);
            for (lsn, snapshot) in self.servers[i].complete_writes(t) {
                if let Some(n) = self.servers[i].node.as_mut() {
                    n.handle_durable(now, lsn, snapshot);
                }
                self.drain(i);
            }
            let from = 1 - i;
            while self.links[from].queue.front().is_some_and(|(at, _)| *at <= t) {
                let Some((_, msg)) = self.links[from].queue.pop_front() else { break };
                if let Some(n) = self.servers[i].node.as_mut() {
                    n.handle_peer(now, msg);
                }
                self.drain(i);
            }
            while self.to_server[i].front().is_some_and(|(at, _, _)| *at <= t) {
                let Some((_, token, req)) = self.to_server[i].pop_front() else { break };
                if let Some(n) = self.servers[i].node.as_mut() {
                    n.handle_request(now, token, &req);
                }
                self.drain(i);
            }
            if self.servers[i].node.as_ref().is_some_and(|n| n.poll_timeout() <= t) {
                if let Some(n) = self.servers[i].node.as_mut() {
                    n.handle_timeout(now);
                }
                self.drain(i);
            }
            // The cloud acks what an active forwarded, now and then: the
            // position goes through the log like any entry.
            if t % CLOUD_ACK_EVERY == 0 {
                if let Some(n) = self.servers[i].node.as_mut() {
                    let from = n.outbox().forwarded() + 1;
                    let last = n.uplink_owed(from - 1).last().map(|item| (item.site_seq, item.chain));
                    if let Some((through, chain)) = last {
                        n.handle_uplink_acked(now, through, chain, from);
                    }
                }
                self.drain(i);
            }
        }
        self.watch_states();
    }

    pub fn host_wall(&self) -> u64 {
        self.wall().saturating_add_signed(self.host_wall_offset)
    }

    fn host_effects(&mut self, effects: Vec<Effect>) {
        for Effect::Send { to, generation, frame } in effects {
            if self.servers[to].node.is_none() || self.rng.random_bool(self.loss_client) {
                continue; // lost on the way, or nobody listens
            }
            let request = decode::<Request>(&frame).unwrap_or_else(|e| panic!("the host sent a frame that does not decode: {e}"));
            let at = self.t + self.rng.random_range(1..=self.max_delay);
            self.to_server[to].push_back((at, generation, request));
        }
    }

    fn step_host(&mut self) {
        let (t, wall) = (self.t, self.host_wall());
        while self.to_host.front().is_some_and(|(at, ..)| *at <= t) {
            let Some((_, from, generation, frame)) = self.to_host.pop_front() else { break };
            let effects = self.host.deliver(t, from, generation, &frame);
            self.host_effects(effects);
        }
        let alive: [bool; 2] = [self.servers[0].node.is_some(), self.servers[1].node.is_some()];
        let effects = self.host.step(t, wall, |i| alive[i]);
        self.host_effects(effects);
    }

    fn schedule_faults(&mut self) -> Vec<(u64, Fault)> {
        if let Some(planned) = self.planned.take() {
            return planned;
        }
        let n = self.rng.random_range(0..=5);
        let mut faults = Vec::new();
        for _ in 0..n {
            let at = self.rng.random_range(500..FAULTS_UNTIL);
            let node = self.rng.random_range(0..2);
            let dur = self.rng.random_range(100..MAX_FAULT);
            let step = self.rng.random_range(500..=MAX_CLOCK_STEP) as i64 * if self.rng.random_bool(0.5) { 1 } else { -1 };
            let f = match self.rng.random_range(0..9) {
                0 | 1 => Fault::Crash(node, dur),
                2 => Fault::CrashBoth(dur),
                3 => Fault::Partition(dur),
                4 => Fault::Pause(node, dur),
                5 => Fault::SplitAndMove(dur),
                6 => Fault::Wipe(dur),
                7 => Fault::StepServerClock(node, step),
                _ => Fault::StepHostClock(step),
            };
            faults.push((at, f));
        }
        faults.sort_by_key(|(at, _)| *at);
        faults
    }

    fn apply_fault(&mut self, f: Fault, faults: &mut VecDeque<(u64, Fault)>) {
        let t = self.t;
        let lasts = match f {
            Fault::Crash(_, d) | Fault::CrashBoth(d) | Fault::Partition(d) | Fault::Pause(_, d) | Fault::Wipe(d) | Fault::SplitAndMove(d) => d,
            Fault::MoveHost | Fault::StepServerClock(..) | Fault::StepHostClock(_) => 0,
        };
        self.disturbed_until = self.disturbed_until.max(t + lasts);
        match f {
            Fault::Crash(i, d) => self.crash(i, d),
            Fault::CrashBoth(d) => {
                self.crash(0, d);
                self.crash(1, d / 2);
            }
            Fault::Partition(d) => {
                self.note(format!("partition for {d} ms"));
                self.partitioned_until = t + d;
            }
            Fault::Wipe(d) => self.wipe(d),
            Fault::SplitAndMove(d) => {
                self.note(format!("partition for {d} ms; the host moves to the other server halfway"));
                self.partitioned_until = t + d;
                faults.push_back((t + d / 2, Fault::MoveHost));
                faults.make_contiguous().sort_by_key(|(at, _)| *at);
            }
            Fault::MoveHost => {
                // As if the host lost its connection: it fails over.
                self.note("the host moves to the other server".to_string());
                if let Some((server, _)) = self.host.link {
                    let effects = self.host.server_gone(t, server);
                    self.host_effects(effects);
                }
            }
            Fault::Pause(i, d) => {
                if self.servers[i].node.is_some() {
                    self.note(format!("pause {:?} for {d} ms", self.servers[i].role));
                    self.servers[i].paused_until = t + d;
                }
            }
            Fault::StepServerClock(i, by) => {
                self.note(format!("the wall clock of {:?} steps by {by} ms", self.servers[i].role));
                self.servers[i].wall_offset += by;
                self.clock_steps += 1;
            }
            Fault::StepHostClock(by) => {
                self.note(format!("the host's wall clock steps by {by} ms"));
                self.host_wall_offset += by;
                self.clock_steps += 1;
            }
        }
    }

    /// Runs the world to the end, checking the invariants after every step.
    pub fn run(&mut self) {
        let mut faults: VecDeque<(u64, Fault)> = self.schedule_faults().into();
        while self.t < RUN_UNTIL || (self.t < RUN_UNTIL + MAX_CLOCK_STEP && !self.settled()) {
            while faults.front().is_some_and(|(at, _)| *at <= self.t) {
                // A crash waits (up to 200 ms) for writes in flight: where
                // an ack before durability would show.
                if let Some((at, Fault::Crash(i, _))) = faults.front() {
                    if self.servers[*i].writes.is_empty() && self.t < at + 200 {
                        break;
                    }
                }
                let Some((_, f)) = faults.pop_front() else { break };
                self.apply_fault(f, &mut faults);
            }
            // A quiet end: links heal so the pair can converge, and sensors
            // stop trapping.
            if self.t > FAULTS_UNTIL + MAX_FAULT {
                self.loss_peer = 0.0;
                self.loss_client = 0.0;
                self.host.traps.arm(false);
            }
            self.step_servers();
            self.step_host();
            crate::rogue::step(self);
            self.check_step();
            self.t += 1;
        }
    }

    /// Whether the run has come to rest: every sensor holds the active
    /// node's newest average, and the passive holds every entry of the
    /// active. The run goes on past its end until then (an active whose
    /// wall clock was stepped back publishes its last windows that much
    /// later; an entry written at the last moment is still on its way), or
    /// for at most [`MAX_CLOCK_STEP`] more.
    fn settled(&self) -> bool {
        let Some(active) = self.active() else { return false };
        let newest = active.replica().windows.last_position().seq;
        let passive_in_step = self.servers.iter().filter_map(|s| s.node.as_ref()).all(|n| n.lsn() == active.lsn());
        passive_in_step && self.host.fleet.summaries().iter().all(|s| s.last_average_seq == Some(newest))
    }

    /// No loss, delay of 1 ms, no duplicates: a network that only faults
    /// disturb.
    pub fn perfect_network(&mut self) {
        (self.loss_peer, self.loss_client, self.dup, self.max_delay) = (0.0, 0.0, 0.0, 1);
    }

    /// The node that is active now, if exactly one is.
    pub fn active(&self) -> Option<&Node> {
        let mut active = self.servers.iter().filter_map(|s| s.node.as_ref()).filter(|n| n.state() == NodeState::Active);
        let first = active.next();
        if active.next().is_some() { None } else { first }
    }
}
