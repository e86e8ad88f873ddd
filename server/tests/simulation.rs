//! Deterministic simulation of a server pair and a host of sensors, in one
//! process on simulated time, driving the real sans-IO [`Node`]s.
//!
//! A seed decides everything: message loss, delay and duplication on every
//! link, crashes and restarts of either or both servers (what was not yet
//! durable is lost; the node recovers from its simulated disk), the loss of
//! the active's disk while its passive is in sync, partitions
//! of the link between the servers, pauses (a node frozen while the world
//! goes on, as with SIGSTOP), and the host moving to the other server while
//! the servers are cut off from each other (so that it is served by both
//! sides of a split). The host behaves like `fog-host`: one
//! batch in flight, resent unchanged to the other server on a timeout or a
//! "not active" reply, the highest epoch seen carried in every request; its
//! sensors resend unacked readings after a while.
//!
//! Alongside the host runs a rogue client that sends both servers, at
//! random moments, batches with forged epochs (random, `u64::MAX`,
//! `MAX_EPOCH`, the current one plus one; with no seal or a random one),
//! sensor cursors of epochs no server issued, readings for the host's own
//! sensors that would poison their ledgers (stamped 0, seqs of 2^62 and
//! `u64::MAX`, timestamps far in the future), and once a batch of 65 536
//! readings of one sensor of its own. Its replies go to it, not the host.
//!
//! After every run the checks are: every reading acked and counted exactly
//! once by the node left active (and by its passive once caught up), at
//! most one node acking per epoch, replicas never diverged, and every
//! sensor (the real [`AverageStream`] of the sensor component) ends at the
//! active node's newest average on the same hash chain, having missed
//! none (the rogue's sensors aside). Averages a sensor applied from a branch abandoned after a split
//! are superseded and replaced; the sweep checks that this happens in some
//! seeds, so the path is exercised. A failure names its
//! seed, and two environment variables steer the runs:
//!
//! - `FOG_SIM_SEED=n`: the seed `one_seed` runs, with a trace of every
//!   state change and fault (`cargo test --release -p fog-server --test
//!   simulation one_seed -- --nocapture` replays a failure). Unset, it runs
//!   [`DEFAULT_SEED`], so the test always checks a run; a value that is not
//!   a number fails the test rather than being ignored.
//! - `FOG_SIM_SEEDS=n`: how many seeds the sweep runs (1 000 unset); below
//!   500 the sweep skips its checks that rare paths were exercised.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};

use fog_protocol::{AverageCursor, LogEntry, MAX_EPOCH, NodeState, PeerMessage, Reading, Reply, Request, SensorBatch};
use fog_sensor::averages::AverageStream;
use fog_server::{Node, NodeConfig, Now, Output, Role, WindowConfig};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const HB: u64 = 50;
const T0: u64 = 1_700_000_000_000;
const SENSORS: usize = 4;
const GENERATE_UNTIL: u64 = 10_000;
const FAULTS_UNTIL: u64 = 9_000;
const RUN_UNTIL: u64 = 24_000;
const HOST_TIMEOUT: u64 = 200;
const RESEND_AFTER: u64 = 300;
const TICK: u64 = 100;
const SEAL_KEY: [u8; 32] = [0x5e; 32];
/// The host's sensors' incarnation.
const INCARNATION: u64 = 7;
/// Requests of the rogue carry tokens with this bit; its replies go to it.
const ROGUE: u64 = 1 << 63;
/// The rogue's own sensors have ids from here on.
const ROGUE_SENSORS: u32 = 1_000;
/// The seed `one_seed` runs when `FOG_SIM_SEED` is unset.
const DEFAULT_SEED: u64 = 0;

/// A number from environment variable `name`; `None` when it is unset. A
/// value that is set but not a number panics: a typo must not quietly run
/// something else than what was asked for.
fn env_u64(name: &str) -> Option<u64> {
    let value = std::env::var(name).ok()?;
    let parsed = value.trim().parse();
    Some(parsed.unwrap_or_else(|e| panic!("{name}={value:?} is not a number: {e}")))
}

#[derive(Default, Clone)]
struct Disk {
    snapshot: Option<Vec<u8>>,
    entries: Vec<LogEntry>,
}

enum Job {
    Append(LogEntry),
    Snapshot(u64, Vec<u8>),
}

struct Server {
    role: Role,
    node: Option<Node>,
    disk: Disk,
    writes: VecDeque<(u64, Job)>,
    paused_until: u64,
    down_until: Option<u64>,
}

struct Link {
    queue: VecDeque<(u64, PeerMessage)>,
    last_at: u64,
}

struct Sensor {
    id: u32,
    next_seq: u64,
    unacked: BTreeMap<u64, (Reading, Option<u64>)>,
    stream: AverageStream,
    count: u64,
    sum: u64,
}

struct Host {
    current: usize,
    in_flight: Option<(u64, Request, u64)>,
    send_at: u64,
    epoch: u64,
    seal: fog_protocol::Seal,
    next_batch: u64,
    sensors: Vec<Sensor>,
}

struct World {
    rng: StdRng,
    now: u64,
    servers: [Server; 2],
    links: [Link; 2], // [0]: 0 -> 1, [1]: 1 -> 0
    to_server: [VecDeque<(u64, u64, Request)>; 2],
    to_host: VecDeque<(u64, usize, u64, Reply)>,
    tokens: u64,
    host: Host,
    partitioned_until: u64,
    loss_peer: f64,
    loss_client: f64,
    dup: f64,
    max_delay: u64,
    ackers: BTreeMap<u64, BTreeSet<usize>>,
    log: Vec<String>,
    last_states: [Option<(NodeState, u64, bool, bool)>; 2],
    /// (sensor, seq) -> (server, epoch, time) of the ack.
    acked_by: HashMap<(u32, u64), (usize, u64, u64)>,
    has_probe: [Option<bool>; 2],
    rogue: Rogue,
    /// The highest epoch a node has served in: no node may believe in a
    /// newer one (it would have taken a forged epoch as evidence).
    served_epoch: u64,
    /// Print every state change of a node as it happens (`one_seed`).
    trace: bool,
}

/// What the rogue client did, and what came back to it.
#[derive(Debug, Default, Clone, Copy)]
struct Rogue {
    next_batch: u64,
    sent_big_batch: bool,
    /// Requests sent, per kind of attack.
    forged_epochs: u64,
    poison_readings: u64,
    big_batches: u64,
    /// Readings the servers' replies said they refused.
    refused: u64,
    /// Replies it got (any kind).
    replies: u64,
}

fn config(role: Role) -> NodeConfig {
    NodeConfig {
        role,
        heartbeat_ms: HB,
        windows: WindowConfig { lateness_ms: 200, ..WindowConfig::default() },
        snapshot_every: 50,
        seal_key: SEAL_KEY,
    }
}

impl World {
    fn new(seed: u64) -> World {
        let mut rng = StdRng::seed_from_u64(seed);
        let loss_peer = rng.random_range(0.0..0.1);
        let loss_client = rng.random_range(0.0..0.05);
        let dup = rng.random_range(0.0..0.05);
        let max_delay = rng.random_range(1..10);
        let server = |role| Server { role, node: Some(Node::new(config(role))), disk: Disk::default(), writes: VecDeque::new(), paused_until: 0, down_until: None };
        World {
            rng,
            now: T0,
            servers: [server(Role::Primary), server(Role::Backup)],
            links: [Link { queue: VecDeque::new(), last_at: 0 }, Link { queue: VecDeque::new(), last_at: 0 }],
            to_server: [VecDeque::new(), VecDeque::new()],
            to_host: VecDeque::new(),
            tokens: 0,
            host: Host {
                current: 0,
                in_flight: None,
                send_at: T0,
                epoch: 0,
                seal: [0; 16],
                next_batch: 1,
                sensors: (0..SENSORS)
                    .map(|i| Sensor { id: i as u32, next_seq: 0, unacked: BTreeMap::new(), stream: AverageStream::new(0), count: 0, sum: 0 })
                    .collect(),
            },
            partitioned_until: 0,
            loss_peer,
            loss_client,
            dup,
            max_delay,
            ackers: BTreeMap::new(),
            log: Vec::new(),
            last_states: [None, None],
            acked_by: HashMap::new(),
            has_probe: [None, None],
            rogue: Rogue { next_batch: 1 << 60, ..Rogue::default() },
            served_epoch: 0,
            trace: false,
        }
    }

    fn t(&self) -> u64 {
        self.now - T0
    }

    fn note(&mut self, what: String) {
        let line = format!("[{:>6} ms] {what}", self.t());
        self.log.push(line);
    }

    fn up(&self, i: usize) -> bool {
        self.servers[i].node.is_some() && self.now >= self.servers[i].paused_until
    }

    fn crash(&mut self, i: usize, down_for: u64) {
        if self.servers[i].node.is_none() {
            return;
        }
        self.note(format!("crash {:?} for {down_for} ms", self.servers[i].role));
        let s = &mut self.servers[i];
        s.node = None;
        s.writes.clear(); // not durable: lost
        s.paused_until = 0;
        s.down_until = Some(self.now + down_for);
        self.to_server[i].clear();
        for l in &mut self.links {
            l.queue.clear();
        }
    }

    /// The active node's machine is lost with its disk, while its passive
    /// is in sync (the only moment that can be survived); it comes back
    /// empty later. Skipped at any other moment.
    fn wipe(&mut self, down_for: u64) {
        let Some(i) = (0..2).find(|&i| self.servers[i].node.as_ref().is_some_and(|n| n.state() == NodeState::Active && n.has_passive_in_sync())) else {
            return;
        };
        self.note(format!("wipe {:?} (data lost) for {down_for} ms", self.servers[i].role));
        self.crash(i, down_for);
        self.servers[i].disk = Disk::default();
    }

    fn restart(&mut self, i: usize) {
        let s = &mut self.servers[i];
        let node = Node::recover(config(s.role), s.disk.snapshot.as_deref(), &s.disk.entries).expect("recover from the simulated disk");
        s.node = Some(node);
        s.down_until = None;
        let role = s.role;
        self.note(format!("restart {role:?}"));
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
                    let at = self.now + self.rng.random_range(0..3);
                    self.servers[i].writes.push_back((at, Job::Append(e)));
                }
                Output::SaveSnapshot { lsn, bytes } => {
                    let at = self.now + self.rng.random_range(0..3);
                    self.servers[i].writes.push_back((at, Job::Snapshot(lsn, bytes)));
                }
                Output::Reply { to, reply } => {
                    if self.rng.random_bool(self.loss_client) {
                        continue;
                    }
                    if let Reply::Batch(b) = &reply {
                        self.ackers.entry(b.epoch).or_default().insert(i);
                    }
                    if to & ROGUE != 0 {
                        self.rogue.replies += 1;
                        if let Reply::Batch(b) = &reply {
                            self.rogue.refused += b.refused.iter().map(|r| u64::from(r.count)).sum::<u64>();
                        }
                        continue;
                    }
                    let at = self.now + self.rng.random_range(1..=self.max_delay);
                    self.to_host.push_back((at, i, to, reply));
                }
                Output::Peer(msg) => {
                    // A PUB socket drops what no subscriber receives.
                    if self.servers[1 - i].node.is_none() || self.now < self.partitioned_until || self.rng.random_bool(self.loss_peer) {
                        continue;
                    }
                    let copies = if self.rng.random_bool(self.dup) { 2 } else { 1 };
                    let link = &mut self.links[i];
                    let at = (self.now + self.rng.random_range(1..=self.max_delay)).max(link.last_at);
                    link.last_at = at;
                    for _ in 0..copies {
                        link.queue.push_back((at, msg.clone()));
                    }
                }
            }
        }
    }

    /// Checked after every step: every epoch a node knows of was served
    /// by a node.
    fn check_epochs(&mut self) {
        let nodes = || self.servers.iter().filter_map(|s| s.node.as_ref());
        let served = nodes().filter(|n| n.state() == NodeState::Active).map(Node::epoch).max().unwrap_or(0);
        self.served_epoch = self.served_epoch.max(served);
        for n in nodes() {
            assert!(n.epoch() <= self.served_epoch, "a node believes in epoch {} that no node served (highest {})", n.epoch(), self.served_epoch);
        }
    }

    fn step_servers(&mut self) {
        self.check_epochs();
        for i in 0..2 {
            if self.trace {
                if let Some(n) = self.servers[i].node.as_ref() {
                    let has = n.replica().ingest.contains((0, INCARNATION), 1);
                    if self.has_probe[i] != Some(has) {
                        self.has_probe[i] = Some(has);
                        println!("[{:>6} ms] {:?} has (0,1): {has} lsn {}", self.now - T0, self.servers[i].role, n.lsn());
                    }
                    let now_state = (n.state(), n.epoch(), n.caught_up(), n.has_passive_in_sync());
                    if self.last_states[i] != Some(now_state) {
                        self.last_states[i] = Some(now_state);
                        let line = format!("{:?}: {:?} epoch {} caught_up {} passive_in_sync {} lsn {}", self.servers[i].role, now_state.0, now_state.1, now_state.2, now_state.3, n.lsn());
                        self.note(line);
                        println!("{}", self.log.last().cloned().unwrap_or_default());
                    }
                }
            }
            if let Some(at) = self.servers[i].down_until {
                if self.now >= at {
                    self.restart(i);
                }
            }
            if !self.up(i) {
                continue;
            }
            let now = self.now;
            // Disk completions, in order.
            while self.servers[i].writes.front().is_some_and(|(at, _)| *at <= now) {
                let Some((_, job)) = self.servers[i].writes.pop_front() else { break };
                let s = &mut self.servers[i];
                let (lsn, snapshot) = match job {
                    Job::Append(e) => {
                        let lsn = e.lsn;
                        s.disk.entries.push(e);
                        (lsn, false)
                    }
                    Job::Snapshot(lsn, bytes) => {
                        s.disk.snapshot = Some(bytes);
                        s.disk.entries.clear();
                        (lsn, true)
                    }
                };
                if let Some(n) = s.node.as_mut() {
                    n.handle_durable(Now::both(now), lsn, snapshot);
                }
                self.drain(i);
            }
            // Peer messages from the other node.
            let from = 1 - i;
            while self.links[from].queue.front().is_some_and(|(at, _)| *at <= now) {
                let Some((_, msg)) = self.links[from].queue.pop_front() else { break };
                if let Some(n) = self.servers[i].node.as_mut() {
                    n.handle_peer(Now::both(now), msg);
                }
                self.drain(i);
            }
            while self.to_server[i].front().is_some_and(|(at, _, _)| *at <= now) {
                let Some((_, token, req)) = self.to_server[i].pop_front() else { break };
                if let Some(n) = self.servers[i].node.as_mut() {
                    n.handle_request(Now::both(now), token, &req);
                }
                self.drain(i);
            }
            let due = self.servers[i].node.as_ref().is_some_and(|n| n.poll_timeout() <= now);
            if due {
                if let Some(n) = self.servers[i].node.as_mut() {
                    n.handle_timeout(Now::both(now));
                }
                self.drain(i);
            }
        }
    }

    fn send_in_flight(&mut self) {
        let Some((_, req, deadline)) = self.host.in_flight.as_mut() else { return };
        *deadline = self.now + HOST_TIMEOUT;
        let req = req.clone();
        if self.rng.random_bool(self.loss_client) {
            return;
        }
        self.tokens += 1;
        let at = self.now + self.rng.random_range(1..=self.max_delay);
        let i = self.host.current;
        if self.servers[i].node.is_some() {
            self.to_server[i].push_back((at, self.tokens, req));
        }
    }

    fn failover(&mut self, pause: u64) {
        self.host.current = 1 - self.host.current;
        self.host.send_at = self.now + pause;
        if let Some((_, _, deadline)) = self.host.in_flight.as_mut() {
            *deadline = u64::MAX; // resent once the pause is over
        }
    }

    fn step_host(&mut self) {
        let now = self.now;
        let t = self.t();
        if t < GENERATE_UNTIL && t % 1_000 == 0 {
            for s in &mut self.host.sensors {
                let r = Reading { seq: s.next_seq, speed_kmh: self.rng.random_range(70..=120), timestamp_ms: now };
                s.next_seq += 1;
                s.unacked.insert(r.seq, (r, None));
                s.count += 1;
                s.sum += u64::from(r.speed_kmh);
            }
        }
        while self.to_host.front().is_some_and(|(at, _, _, _)| *at <= now) {
            let Some((_, from, _, reply)) = self.to_host.pop_front() else { break };
            if from != self.host.current {
                continue; // an old connection
            }
            match reply {
                Reply::Batch(b) => {
                    if self.host.in_flight.as_ref().is_none_or(|(id, _, _)| *id != b.batch_id) {
                        continue;
                    }
                    self.host.in_flight = None;
                    if b.epoch > self.host.epoch {
                        self.host.epoch = b.epoch;
                        self.host.seal = b.seal;
                    }
                    for ack in &b.acks {
                        let s = &mut self.host.sensors[ack.sensor_id as usize];
                        let before: Vec<u64> = s.unacked.keys().copied().collect();
                        s.unacked.retain(|&q, _| q >= ack.next_seq && !ack.also.contains(&q));
                        for q in before.into_iter().filter(|q| !s.unacked.contains_key(q)) {
                            self.acked_by.insert((ack.sensor_id, q), (from, b.epoch, now - T0));
                        }
                    }
                    let averages: Vec<fog_core::Average> = b.averages.clone();
                    for s in &mut self.host.sensors {
                        for r in b.repositions.iter().filter(|r| r.sensor_id == s.id) {
                            s.stream.reposition(r.rewind_to, r.to);
                        }
                        s.stream.apply(&averages);
                    }
                    self.host.send_at = now;
                }
                Reply::NotActive { epoch, seal, .. } => {
                    if epoch > self.host.epoch {
                        self.host.epoch = epoch;
                        self.host.seal = seal;
                    }
                    if self.host.in_flight.is_some() {
                        self.failover(50);
                    }
                }
                Reply::Status(_) | Reply::Refused { .. } => {}
            }
        }
        if let Some((_, _, deadline)) = &self.host.in_flight {
            if now >= *deadline && *deadline != u64::MAX {
                self.failover(0);
            } else if *deadline == u64::MAX && now >= self.host.send_at {
                self.send_in_flight();
            }
            return;
        }
        if now < self.host.send_at || t % TICK != 0 {
            return;
        }
        let batch_id = self.host.next_batch;
        self.host.next_batch += 1;
        let sensors = self
            .host
            .sensors
            .iter_mut()
            .map(|s| {
                let readings = s
                    .unacked
                    .values_mut()
                    .filter(|(_, sent)| sent.is_none_or(|at| now >= at + RESEND_AFTER))
                    .map(|(r, sent)| {
                        *sent = Some(now);
                        *r
                    })
                    .collect();
                let average_cursor = s.stream.cursor();
                SensorBatch { sensor_id: s.id, incarnation: INCARNATION, segment: 0, readings, average_cursor }
            })
            .collect();
        let req = Request::Batch { batch_id, epoch: self.host.epoch, seal: self.host.seal, sensors };
        self.host.in_flight = Some((batch_id, req, 0));
        self.send_in_flight();
    }

    /// The rogue client: now and then a hostile batch to both servers.
    fn step_rogue(&mut self) {
        let t = self.t();
        if !(300..FAULTS_UNTIL).contains(&t) {
            return;
        }
        let big_at = 3_000 + (self.rogue.next_batch % 7) * 500; // differs little; the rng decides the rest
        let big = !self.rogue.sent_big_batch && t >= big_at && self.rng.random_bool(0.01);
        if !big && !self.rng.random_bool(0.003) {
            return;
        }
        let now = self.now;
        let known = self.servers.iter().filter_map(|s| s.node.as_ref().map(Node::epoch)).max().unwrap_or(0);
        let mut seal = [0u8; 16];
        if self.rng.random_bool(0.5) {
            self.rng.fill(&mut seal);
        }
        let (epoch, sensors) = if big {
            self.rogue.sent_big_batch = true;
            self.rogue.big_batches += 1;
            let n = fog_protocol::MAX_READINGS_PER_BATCH as u64;
            let readings = (0..n).map(|seq| Reading { seq, speed_kmh: 50, timestamp_ms: now }).collect();
            (0, vec![SensorBatch { sensor_id: ROGUE_SENSORS, incarnation: 99, segment: 1, readings, average_cursor: None }])
        } else if self.rng.random_bool(0.5) {
            self.rogue.forged_epochs += 1;
            let epoch = match self.rng.random_range(0..4) {
                0 => self.rng.random(),
                1 => u64::MAX,
                2 => MAX_EPOCH,
                _ => known + 1,
            };
            // A sensor of its own whose cursor claims an epoch no server
            // issued (were it believed, the node would step down or move it).
            let cursor = AverageCursor { seq: self.rng.random_range(0..1_000), epoch: epoch.max(known + 1), chain: self.rng.random() };
            (epoch, vec![SensorBatch { sensor_id: ROGUE_SENSORS + 1, incarnation: 1, segment: 0, readings: Vec::new(), average_cursor: Some(cursor) }])
        } else {
            self.rogue.poison_readings += 1;
            let sensors = self
                .host
                .sensors
                .iter()
                .map(|s| {
                    let next = s.next_seq;
                    let readings = vec![
                        Reading { seq: 1 << 62, speed_kmh: 1, timestamp_ms: 0 },
                        Reading { seq: 1 << 62, speed_kmh: 1, timestamp_ms: now },
                        Reading { seq: u64::MAX, speed_kmh: 1, timestamp_ms: now },
                        Reading { seq: next + 1_000, speed_kmh: 1, timestamp_ms: 0 },
                        Reading { seq: next, speed_kmh: 1, timestamp_ms: now + 24 * 3_600_000 },
                        Reading { seq: next + 1, speed_kmh: 1, timestamp_ms: u64::MAX },
                    ];
                    SensorBatch { sensor_id: s.id, incarnation: INCARNATION, segment: 0, readings, average_cursor: None }
                })
                .collect();
            (if self.rng.random_bool(0.5) { known + 1 } else { 0 }, sensors)
        };
        let batch_id = self.rogue.next_batch;
        self.rogue.next_batch += 1;
        let req = Request::Batch { batch_id, epoch, seal, sensors };
        for i in 0..2 {
            // A node with an empty log takes the first client request it
            // hears, without a sealed epoch, as the go-ahead to serve: it
            // cannot tell a fresh pair from a node that lost its disk. The
            // host's sealed epoch stops a wiped node; a rogue's request
            // that came first would not (a known limit, see the module doc
            // of fog_server::node), so the rogue never casts that first vote.
            if self.servers[i].node.as_ref().is_none_or(|n| n.lsn() == 0) {
                continue;
            }
            self.tokens += 1;
            let at = now + self.rng.random_range(1..=self.max_delay);
            self.to_server[i].push_back((at, ROGUE | self.tokens, req.clone()));
        }
    }

    fn schedule_faults(&mut self) -> Vec<(u64, Fault)> {
        let n = self.rng.random_range(0..=4);
        let mut faults = Vec::new();
        for _ in 0..n {
            let at = self.rng.random_range(500..FAULTS_UNTIL);
            let node = self.rng.random_range(0..2);
            let dur = self.rng.random_range(100..3_000);
            let f = match self.rng.random_range(0..7) {
                0 | 1 => Fault::Crash(node, dur),
                2 => Fault::CrashBoth(dur),
                3 => Fault::Partition(dur),
                4 => Fault::Pause(node, dur),
                5 => Fault::SplitAndMove(dur),
                _ => Fault::Wipe(dur),
            };
            faults.push((T0 + at, f));
        }
        faults.sort_by_key(|(at, _)| *at);
        faults
    }

    fn run(&mut self) {
        let mut faults: VecDeque<(u64, Fault)> = self.schedule_faults().into();
        while self.t() < RUN_UNTIL {
            while faults.front().is_some_and(|(at, _)| *at <= self.now) {
                // A crash waits (up to 200 ms) for writes in flight: where
                // an ack before durability would show.
                if let Some((at, Fault::Crash(i, _))) = faults.front() {
                    if self.servers[*i].writes.is_empty() && self.now < at + 200 {
                        break;
                    }
                }
                let Some((_, f)) = faults.pop_front() else { break };
                match f {
                    Fault::Crash(i, d) => self.crash(i, d),
                    Fault::CrashBoth(d) => {
                        self.crash(0, d);
                        self.crash(1, d / 2);
                    }
                    Fault::Partition(d) => {
                        self.note(format!("partition for {d} ms"));
                        self.partitioned_until = self.now + d;
                    }
                    Fault::Wipe(d) => self.wipe(d),
                    Fault::SplitAndMove(d) => {
                        self.note(format!("partition for {d} ms; the host moves to the other server halfway"));
                        self.partitioned_until = self.now + d;
                        faults.push_back((self.now + d / 2, Fault::MoveHost));
                        faults.make_contiguous().sort_by_key(|(at, _)| *at);
                    }
                    Fault::MoveHost => {
                        self.note("the host moves to the other server".to_string());
                        if self.host.in_flight.is_some() {
                            self.failover(0);
                        } else {
                            self.host.current = 1 - self.host.current;
                        }
                    }
                    Fault::Pause(i, d) => {
                        if self.servers[i].node.is_some() {
                            self.note(format!("pause {:?} for {d} ms", self.servers[i].role));
                            self.servers[i].paused_until = self.now + d;
                        }
                    }
                }
            }
            // A quiet end: links heal so the pair can converge.
            if self.t() > FAULTS_UNTIL + 3_000 {
                self.loss_peer = 0.0;
                self.loss_client = 0.0;
            }
            self.step_servers();
            self.step_host();
            self.step_rogue();
            self.now += 1;
        }
    }

    fn check(&self) {
        for s in &self.host.sensors {
            assert!(s.unacked.is_empty(), "sensor {} has {} readings never acked", s.id, s.unacked.len());
        }
        let active: Vec<usize> = (0..2)
            .filter(|&i| self.servers[i].node.as_ref().is_some_and(|n| n.state() == NodeState::Active))
            .collect();
        assert_eq!(active.len(), 1, "exactly one active node at the end");
        for (epoch, nodes) in &self.ackers {
            assert!(nodes.len() <= 1, "epoch {epoch} was acked by both nodes");
        }
        let truth: Vec<(u64, u64)> = self.host.sensors.iter().map(|s| (s.count, s.sum)).collect();
        for i in 0..2 {
            // Every down time ends before the quiet end: both nodes are up.
            let node = self.servers[i].node.as_ref().unwrap_or_else(|| panic!("{:?} is still down at the end", self.servers[i].role));
            assert_eq!(node.divergences(), 0, "{:?} diverged from its active", self.servers[i].role);
            // The last 15 s are quiet (no faults, no loss): a passive that
            // is up has caught up by then, so its counts are always checked.
            let in_sync = i == active[0] || node.caught_up() && node.lsn() == self.servers[active[0]].node.as_ref().map_or(0, |n| n.lsn());
            assert!(in_sync, "{:?} is up but not caught up with the active at the end of a quiet run (lsn {})", self.servers[i].role, node.lsn());
            let per: Vec<(u64, u64)> = node
                .replica()
                .ingest
                .per_sensor()
                .iter()
                .filter(|c| c.sensor_id < ROGUE_SENSORS)
                .map(|c| {
                    assert_eq!(c.incarnation, INCARNATION, "a ledger for an incarnation no sensor has: {c:?}");
                    (c.count, c.sum_kmh)
                })
                .collect();
            if per != truth {
                for s in &self.host.sensors {
                    for q in 0..s.next_seq {
                        if !node.replica().ingest.contains((s.id, INCARNATION), q) {
                            eprintln!("missing sensor {} seq {q}: acked by {:?}", s.id, self.acked_by.get(&(s.id, q)));
                        }
                    }
                }
            }
            assert_eq!(per, truth, "{:?}: per-sensor (count, sum) differ from what the sensors generated", self.servers[i].role);
        }
        let node = self.servers[active[0]].node.as_ref().expect("the active node is up");
        let end = node.replica().windows.last_position();
        assert!(end.seq > 0, "no average was published");
        for s in &self.host.sensors {
            let at = s.stream.cursor();
            assert_eq!(at, Some(end), "sensor {} did not end at the active node's newest average", s.id);
            assert_eq!(s.stream.missed(), 0, "sensor {} missed averages", s.id);
            assert!(s.stream.applied() > 0, "sensor {} applied no average", s.id);
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Fault {
    Crash(usize, u64),
    CrashBoth(u64),
    Partition(u64),
    Pause(usize, u64),
    /// The active loses its disk (only while its passive is in sync).
    Wipe(u64),
    /// The server link is cut for a while; halfway the host moves over.
    SplitAndMove(u64),
    MoveHost,
}

/// Runs one seed; on success, how many averages the sensors applied from
/// abandoned branches (and replaced), and what the rogue did.
fn run_seed(seed: u64) -> Result<(u64, Rogue), String> {
    let result = std::panic::catch_unwind(|| {
        let mut w = World::new(seed);
        w.run();
        let log = w.log.clone();
        let superseded = w.host.sensors.iter().map(|s| s.stream.superseded()).sum::<u64>();
        let rogue = w.rogue;
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| w.check())).map(|()| (superseded, rogue)).map_err(|e| (e, log))
    });
    match result {
        Ok(Ok(n)) => Ok(n),
        Ok(Err((e, log))) => Err(format!("{}\nfaults:\n{}", panic_text(&e), log.join("\n"))),
        Err(e) => Err(panic_text(&e)),
    }
}

fn panic_text(e: &Box<dyn std::any::Any + Send>) -> String {
    e.downcast_ref::<String>().cloned().or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string())).unwrap_or_default()
}

#[test]
fn thousands_of_seeded_runs_lose_nothing_and_count_nothing_twice() {
    let seeds = env_u64("FOG_SIM_SEEDS").unwrap_or(1_000);
    std::panic::set_hook(Box::new(|_| {}));
    let mut failed = Vec::new();
    let mut forked = 0;
    // Seeds in which the rogue forged epochs, poisoned readings, sent its
    // big batch, and had readings refused, each at least once.
    let mut rogue_all_kinds = 0;
    let mut rogue_refused = 0;
    for seed in 0..seeds {
        match run_seed(seed) {
            Ok((superseded, rogue)) => {
                forked += u64::from(superseded > 0);
                rogue_all_kinds += u64::from(rogue.forged_epochs > 0 && rogue.poison_readings > 0 && rogue.big_batches > 0);
                rogue_refused += u64::from(rogue.refused > 0);
            }
            Err(why) => failed.push((seed, why)),
        }
    }
    let _ = std::panic::take_hook();
    println!("{forked} of {seeds} seeds had sensors served by both sides of a split (averages superseded)");
    println!("{rogue_all_kinds} of {seeds} seeds had the rogue forge epochs, poison readings and send its big batch; in {rogue_refused} its readings were refused");
    if let Some((seed, why)) = failed.first() {
        panic!(
            "{} of {seeds} seeds failed; first: seed {seed} (replay: FOG_SIM_SEED={seed} cargo test --release -p fog-server --test simulation one_seed -- --nocapture)\n{why}\nall failing seeds: {:?}",
            failed.len(),
            failed.iter().map(|(s, _)| *s).collect::<Vec<_>>()
        );
    }
    if seeds >= 500 {
        assert!(forked > 0, "no seed served sensors from both sides of a split: the rewind path went untested");
        assert!(rogue_all_kinds * 10 >= seeds * 8, "the rogue fired every attack in only {rogue_all_kinds} of {seeds} seeds");
        assert!(rogue_refused * 10 >= seeds * 8, "the rogue had readings refused in only {rogue_refused} of {seeds} seeds");
    }
}

/// One seed with a trace: `FOG_SIM_SEED`, or [`DEFAULT_SEED`] when unset.
#[test]
fn one_seed() {
    let seed = env_u64("FOG_SIM_SEED").unwrap_or(DEFAULT_SEED);
    println!("seed {seed}");
    let _ = tracing_subscriber::fmt().with_env_filter("info").without_time().with_test_writer().try_init();
    let mut w = World::new(seed);
    w.trace = true;
    w.run();
    println!("{}", w.log.join("\n"));
    println!("rogue: {:?}", w.rogue);
    w.check();
}
