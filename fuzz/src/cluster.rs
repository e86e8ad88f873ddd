//! The system under attack: one real [`Node`] (a lone primary that took
//! over) or a pair (an active and its passive in sync), on simulated time
//! with an instant disk and network, plus a legit host whose sensors send a
//! steady stream of readings through the same nodes.
//!
//! Only the Node's public API is used (`new`, `handle_*`, `poll_*`, `state`,
//! `epoch`, `has_passive_in_sync`, `status`), so the harness survives
//! changes of the Node's internals. [`Cluster::pump`] runs every output
//! to completion and checks each reply as it goes out.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};

use fog_protocol::{
    MAX_AVERAGES_PER_REPLY, MAX_FRAME_BYTES, NodeState, PeerMessage, Reading, Reply, Request, Seal, SensorBatch, encode,
};
use fog_server::{Node, NodeConfig, Now, Output, Role, WindowConfig};

use crate::inputs::{LEGIT_INCARNATION, LEGIT_SENSORS};

pub const T0: u64 = 1_700_000_000_000;
pub const HEARTBEAT_MS: u64 = 100;
/// Legit sensors make a reading this often.
const READING_EVERY_MS: u64 = 50;
/// The legit host sends its batch again after this long without an answer.
const RESEND_AFTER_MS: u64 = 300;
/// Most outputs one input may cause before it counts as a storm.
const MAX_OUTPUTS_PER_INPUT: usize = 200_000;

/// The pair's key for sealing epochs (both nodes share it; hosts never
/// see it).
const SEAL_KEY: [u8; 32] = [0x5e; 32];

/// The one place a [`NodeConfig`] is built: a field the Node gains (a seal
/// key) is one line here.
/// The uplink's outbox is kept, so hostile uplink records reach it.
pub fn node_config(role: Role) -> NodeConfig {
    let outbox = fog_server::outbox::OutboxConfig { enabled: true, backlog_bytes: 16 << 20 };
    NodeConfig { role, heartbeat_ms: HEARTBEAT_MS, windows: WindowConfig::default(), snapshot_every: 200, seal_key: SEAL_KEY, outbox }
}

/// A broken invariant: `sig` names the kind (stable across runs, no
/// numbers), `detail` says what happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    pub sig: String,
    pub detail: String,
}

impl Violation {
    pub fn new(sig: &str, detail: impl Into<String>) -> Violation {
        Violation { sig: sig.to_string(), detail: detail.into() }
    }
}

/// A request sent, and how many replies it got.
struct Sent {
    sensors: usize,
    replies: u32,
}

struct LegitSensor {
    id: u32,
    next_seq: u64,
    unacked: BTreeMap<u64, Reading>,
    count: u64,
    sum: u64,
}

/// Behaves like fog-host: one batch in flight, sent again unchanged on a
/// timeout or a "not active" reply (to the other node, in a pair), the
/// highest epoch seen carried in every request.
struct LegitHost {
    sensors: Vec<LegitSensor>,
    generating: bool,
    next_reading_at: u64,
    next_batch: u64,
    /// `(batch id, request, sent at, token)`.
    in_flight: Option<(u64, Request, u64, u64)>,
    resend_now: bool,
    current: usize,
    epoch: u64,
    seal: Seal,
}

pub struct Cluster {
    nodes: Vec<Node>,
    pub now: u64,
    links: VecDeque<(usize, PeerMessage)>,
    sent: HashMap<u64, Sent>,
    next_token: u64,
    host: LegitHost,
    epochs: Vec<u64>,
    /// Every `(epoch, seal)` a node showed in a reply: evidence a host may
    /// carry, unlike an epoch it made up.
    genuine: HashSet<(u64, Seal)>,
}

impl Cluster {
    /// A lone primary, or a pair whose primary is active with its backup
    /// passive and in sync; the legit host has been served once.
    pub fn new(pair: bool) -> Result<Cluster, Violation> {
        let mut nodes = vec![Node::new(node_config(Role::Primary))];
        if pair {
            nodes.push(Node::new(node_config(Role::Backup)));
        }
        let host = LegitHost {
            sensors: LEGIT_SENSORS.iter().map(|&id| LegitSensor { id, next_seq: 0, unacked: BTreeMap::new(), count: 0, sum: 0 }).collect(),
            generating: true,
            next_reading_at: T0,
            next_batch: 1,
            in_flight: None,
            resend_now: false,
            current: 0,
            epoch: 0,
            seal: [0; 16],
        };
        let epochs = vec![0; nodes.len()];
        let mut c = Cluster { nodes, now: T0, links: VecDeque::new(), sent: HashMap::new(), next_token: 1, host, epochs, genuine: HashSet::new() };
        let deadline = T0 + 5_000;
        while !c.ready() {
            if c.now > deadline {
                return Err(Violation::new("setup-no-active", "the node(s) did not become active within 5 s"));
            }
            c.advance(10)?;
        }
        Ok(c)
    }

    fn ready(&self) -> bool {
        let active = self.nodes[0].state() == NodeState::Active && self.host.sensors.iter().any(|s| s.count > 0 && s.unacked.is_empty());
        active && (self.nodes.len() == 1 || self.nodes[0].has_passive_in_sync())
    }

    pub fn is_pair(&self) -> bool {
        self.nodes.len() == 2
    }

    /// The index of the node an input for the active goes to (or the
    /// other one): the active if there is one, else the primary.
    pub fn target(&self, to_active: bool) -> usize {
        let active = self.nodes.iter().position(|n| n.state() == NodeState::Active).unwrap_or(0);
        if to_active || self.nodes.len() == 1 { active } else { 1 - active }
    }

    pub fn state(&self, i: usize) -> NodeState {
        self.nodes[i].state()
    }

    pub fn max_epoch(&self) -> u64 {
        self.nodes.iter().map(Node::epoch).max().unwrap_or(0)
    }

    /// Whether a node showed `(epoch, seal)` in a reply: a request that
    /// carries it proves a takeover, and an active that has it from
    /// neither itself nor its peer rightly steps down.
    pub fn is_genuine(&self, epoch: u64, seal: Seal) -> bool {
        self.genuine.contains(&(epoch, seal))
    }

    /// The newest epoch a reply showed the legit host, and its seal.
    pub fn sealed(&self) -> (u64, Seal) {
        (self.host.epoch, self.host.seal)
    }

    pub fn max_lsn(&self) -> u64 {
        self.nodes.iter().map(|n| n.lsn()).max().unwrap_or(0)
    }

    /// Moves time on by `ms`: the legit host acts, due timeouts fire,
    /// every output runs to completion.
    pub fn advance(&mut self, ms: u64) -> Result<(), Violation> {
        self.now += ms;
        self.step_host()?;
        for i in 0..self.nodes.len() {
            if self.nodes[i].poll_timeout() <= self.now {
                let now = self.now;
                self.nodes[i].handle_timeout(Now::both(now));
                self.pump()?;
            }
        }
        self.check_epochs()
    }

    /// A hostile request into node `i`.
    pub fn hostile_request(&mut self, i: usize, request: &Request) -> Result<(), Violation> {
        let token = self.token(request);
        let now = self.now;
        self.nodes[i].handle_request(Now::both(now), token, request);
        self.pump()
    }

    /// A hostile peer message into node `i`.
    pub fn hostile_peer(&mut self, i: usize, msg: PeerMessage) -> Result<(), Violation> {
        let now = self.now;
        self.nodes[i].handle_peer(Now::both(now), msg);
        self.pump()
    }

    /// Lets the legit sensors stop generating and the pair run without
    /// hostile input until every legit reading is acked (or `limit_ms`
    /// passes); then checks each legit sensor was counted exactly once.
    /// `strict`: hostile input came only from clients, so a server must
    /// have stayed available; on the state channel anything goes, and only
    /// double counting is checked.
    pub fn settle_and_check(&mut self, limit_ms: u64, strict: bool) -> Result<(), Violation> {
        self.host.generating = false;
        let deadline = self.now + limit_ms;
        while self.now < deadline && !self.host_done() {
            self.advance(10)?;
        }
        let unacked: u64 = self.host.sensors.iter().map(|s| s.unacked.len() as u64).sum();
        if strict && unacked > 0 {
            let states: Vec<_> = self.nodes.iter().map(|n| (n.state(), n.epoch())).collect();
            return Err(Violation::new(
                "legit-unacked",
                format!("{unacked} legit readings never acked after {limit_ms} ms of quiet; nodes (state, epoch): {states:?}"),
            ));
        }
        let Some(active) = self.nodes.iter().position(|n| n.state() == NodeState::Active) else {
            return Ok(());
        };
        let status = self.nodes[active].status();
        for s in &self.host.sensors {
            let (count, sum) = status
                .per_sensor
                .iter()
                .find(|c| c.sensor_id == s.id && c.incarnation == LEGIT_INCARNATION)
                .map_or((0, 0), |c| (c.count, c.sum_kmh));
            // Hostile readings on a legit key were disarmed to speed 0:
            // they may add to the count, never to the sum.
            let acked_sum: u64 = s.sum - s.unacked.values().map(|r| u64::from(r.speed_kmh)).sum::<u64>();
            let exact = if strict { sum == s.sum && count >= s.count } else { sum <= s.sum };
            if !exact {
                return Err(Violation::new(
                    "legit-miscounted",
                    format!(
                        "sensor {}: the active counted {count} readings summing {sum} km/h; the sensor made {} summing {} ({} acked summing {acked_sum})",
                        s.id,
                        s.count,
                        s.sum,
                        s.count - s.unacked.len() as u64
                    ),
                ));
            }
        }
        Ok(())
    }

    fn host_done(&self) -> bool {
        self.host.in_flight.is_none() && self.host.sensors.iter().all(|s| s.unacked.is_empty())
    }

    fn token(&mut self, request: &Request) -> u64 {
        let token = self.next_token;
        self.next_token += 1;
        let sensors = match request {
            Request::Batch { sensors, .. } => sensors.len(),
            Request::Status => 0,
        };
        self.sent.insert(token, Sent { sensors, replies: 0 });
        token
    }

    fn check_epochs(&mut self) -> Result<(), Violation> {
        for (i, n) in self.nodes.iter().enumerate() {
            let e = n.epoch();
            if e < self.epochs[i] {
                return Err(Violation::new("epoch-went-down", format!("node {i}: epoch {} -> {e}", self.epochs[i])));
            }
            self.epochs[i] = e;
        }
        Ok(())
    }

    /// Runs outputs until none is left: writes are durable at once, peer
    /// messages arrive at once, replies are checked and the legit host's go
    /// to it.
    pub fn pump(&mut self) -> Result<(), Violation> {
        let mut outputs = 0;
        loop {
            let mut any = false;
            for i in 0..self.nodes.len() {
                while let Some(out) = self.nodes[i].poll_output() {
                    any = true;
                    outputs += 1;
                    if outputs > MAX_OUTPUTS_PER_INPUT {
                        return Err(Violation::new("output-storm", format!("more than {MAX_OUTPUTS_PER_INPUT} outputs for one input")));
                    }
                    let now = self.now;
                    match out {
                        Output::Append(entry) => self.nodes[i].handle_durable(Now::both(now), entry.lsn, false),
                        Output::SaveSnapshot { lsn, .. } => self.nodes[i].handle_durable(Now::both(now), lsn, true),
                        Output::Peer(msg) => {
                            if self.nodes.len() == 2 {
                                self.links.push_back((1 - i, msg));
                            }
                        }
                        Output::Reply { to, reply } => self.reply(i, to, reply)?,
                    }
                }
            }
            while let Some((to, msg)) = self.links.pop_front() {
                any = true;
                let now = self.now;
                self.nodes[to].handle_peer(Now::both(now), msg);
            }
            self.check_epochs()?;
            if !any {
                return Ok(());
            }
        }
    }

    fn reply(&mut self, from: usize, to: u64, reply: Reply) -> Result<(), Violation> {
        let Some(sent) = self.sent.get_mut(&to) else {
            return Err(Violation::new("reply-to-unknown-token", format!("a reply to token {to}, which no request carried")));
        };
        sent.replies += 1;
        if sent.replies > 1 {
            return Err(Violation::new("reply-twice", format!("token {to} answered {} times", sent.replies)));
        }
        match &reply {
            Reply::Batch(b) => {
                self.genuine.insert((b.epoch, b.seal));
            }
            Reply::NotActive { epoch, seal, .. } => {
                self.genuine.insert((*epoch, *seal));
            }
            _ => {}
        }
        if let Reply::Batch(b) = &reply {
            if b.averages.len() > MAX_AVERAGES_PER_REPLY {
                return Err(Violation::new("reply-too-many-averages", format!("{} averages in one reply", b.averages.len())));
            }
            if b.acks.len() > sent.sensors {
                return Err(Violation::new("reply-too-many-acks", format!("{} acks for {} sensors", b.acks.len(), sent.sensors)));
            }
        }
        match encode(&reply) {
            Ok(frame) if frame.len() <= MAX_FRAME_BYTES => {}
            Ok(frame) => return Err(Violation::new("reply-too-large", format!("a reply of {} bytes", frame.len()))),
            Err(e) => return Err(Violation::new("reply-unencodable", format!("{e}"))),
        }
        if self.host.in_flight.as_ref().is_some_and(|f| f.3 == to) {
            self.host_reply(from, reply);
        }
        Ok(())
    }

    fn host_reply(&mut self, from: usize, reply: Reply) {
        let h = &mut self.host;
        match reply {
            Reply::Batch(b) => {
                if h.in_flight.as_ref().is_none_or(|f| f.0 != b.batch_id) {
                    return;
                }
                h.in_flight = None;
                if b.epoch > h.epoch {
                    h.epoch = b.epoch;
                    h.seal = b.seal;
                }
                for ack in &b.acks {
                    if let Some(s) = h.sensors.iter_mut().find(|s| s.id == ack.sensor_id && ack.incarnation == LEGIT_INCARNATION) {
                        s.unacked.retain(|&q, _| q >= ack.next_seq && !ack.also.contains(&q));
                    }
                }
            }
            Reply::NotActive { epoch, seal, .. } => {
                if epoch > h.epoch {
                    h.epoch = epoch;
                    h.seal = seal;
                }
                if self.nodes.len() == 2 {
                    h.current = 1 - from;
                }
                h.resend_now = true;
            }
            Reply::Refused { .. } => h.resend_now = true,
            Reply::Status(_) => {}
        }
    }

    fn step_host(&mut self) -> Result<(), Violation> {
        let now = self.now;
        let h = &mut self.host;
        if h.generating {
            while h.next_reading_at <= now {
                for (k, s) in h.sensors.iter_mut().enumerate() {
                    let speed = 50 + ((s.next_seq * 7 + k as u64 * 13) % 70) as u16;
                    let r = Reading { seq: s.next_seq, speed_kmh: speed, timestamp_ms: h.next_reading_at };
                    s.next_seq += 1;
                    s.unacked.insert(r.seq, r);
                    s.count += 1;
                    s.sum += u64::from(speed);
                }
                h.next_reading_at += READING_EVERY_MS;
            }
        }
        let request = match &h.in_flight {
            Some((_, req, sent_at, _)) if h.resend_now || now >= sent_at + RESEND_AFTER_MS => {
                if !h.resend_now && self.nodes.len() == 2 {
                    h.current = 1 - h.current;
                }
                req.clone()
            }
            Some(_) => return Ok(()),
            None if h.sensors.iter().all(|s| s.unacked.is_empty()) => return Ok(()),
            None => {
                let sensors = h
                    .sensors
                    .iter()
                    .map(|s| SensorBatch {
                        sensor_id: s.id,
                        incarnation: LEGIT_INCARNATION,
                        segment: 0,
                        readings: s.unacked.values().take(200).copied().collect(),
                        average_cursor: None,
                    })
                    .collect();
                let batch_id = h.next_batch;
                h.next_batch += 1;
                Request::Batch { batch_id, epoch: h.epoch, seal: h.seal, sensors }
            }
        };
        // A resend carries the highest epoch seen since (as fog-host does).
        let request = match request {
            Request::Batch { batch_id, sensors, .. } => Request::Batch { batch_id, epoch: h.epoch, seal: h.seal, sensors },
            other => other,
        };
        let batch_id = match &request {
            Request::Batch { batch_id, .. } => *batch_id,
            Request::Status => 0,
        };
        h.resend_now = false;
        let to = h.current;
        let token = self.token(&request);
        self.host.in_flight = Some((batch_id, request.clone(), now, token));
        self.nodes[to].handle_request(Now::both(now), token, &request);
        self.pump()
    }
}
