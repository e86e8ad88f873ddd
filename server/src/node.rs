//! One server node without I/O: the Binary Star FSM, the ingest and the
//! averages behind one interface that the driver feeds with requests,
//! heartbeats and timeouts, each with the time it happened at.
//!
//! Only an active node serves batches and publishes averages; any node
//! answers a status request. Replication (a later issue) will sit between
//! accepting a batch and replying to it.

use fog_protocol::{
    BatchReply, NodeState, PeerHeartbeat, Reply, Request, SensorBatch, StatusReport,
};

use crate::fsm::{BinaryStar, Event, Role, Step};
use crate::ingest::Ingest;
use crate::windows::{WindowConfig, Windows};

/// What a node needs to know at start.
#[derive(Debug, Clone, Copy)]
pub struct NodeConfig {
    pub role: Role,
    pub heartbeat_ms: u64,
    pub windows: WindowConfig,
}

/// A server node's whole protocol state.
#[derive(Debug, Clone)]
pub struct Node {
    fsm: BinaryStar,
    ingest: Ingest,
    windows: Windows,
    malformed_frames: u64,
    batches: u64,
}

impl Node {
    pub fn new(cfg: NodeConfig) -> Self {
        Node {
            fsm: BinaryStar::new(cfg.role, cfg.heartbeat_ms),
            ingest: Ingest::new(),
            windows: Windows::new(cfg.windows),
            malformed_frames: 0,
            batches: 0,
        }
    }

    pub fn role(&self) -> Role {
        self.fsm.role()
    }

    pub fn state(&self) -> NodeState {
        self.fsm.state()
    }

    /// The heartbeat this node publishes to its peer.
    pub fn heartbeat(&self) -> PeerHeartbeat {
        PeerHeartbeat {
            state: self.fsm.state(),
        }
    }

    /// Answers one client request received at `now_ms`.
    pub fn handle_request(&mut self, now_ms: u64, request: &Request) -> Reply {
        self.handle_request_step(now_ms, request).0
    }

    /// Like [`Node::handle_request`], also returning the FSM step a batch
    /// caused, so the driver can log state changes.
    pub fn handle_request_step(&mut self, now_ms: u64, request: &Request) -> (Reply, Option<Step>) {
        match request {
            Request::Status => (Reply::Status(Box::new(self.status(now_ms))), None),
            Request::Batch { batch_id, sensors } => {
                let step = self.fsm.handle(now_ms, Event::ClientRequest);
                let reply = if step.accepted {
                    Reply::Batch(self.apply_batch(now_ms, *batch_id, sensors))
                } else {
                    Reply::NotActive {
                        state: self.fsm.state(),
                    }
                };
                (reply, Some(step))
            }
        }
    }

    fn apply_batch(&mut self, now_ms: u64, batch_id: u64, sensors: &[SensorBatch]) -> BatchReply {
        self.batches += 1;
        let mut acks = Vec::with_capacity(sensors.len());
        let mut cursors = Vec::with_capacity(sensors.len());
        for s in sensors {
            let key = (s.sensor_id, s.incarnation);
            for r in &s.readings {
                if self.ingest.admit(key, r) {
                    self.windows.add(now_ms, s.segment, r);
                }
            }
            acks.push(self.ingest.ack(key, s.readings.iter().map(|r| r.seq)));
            self.windows.note_cursor(s.sensor_id, s.average_cursor);
            cursors.push((s.sensor_id, s.average_cursor));
        }
        let (averages, missed) = self.windows.reply_for(&cursors);
        BatchReply {
            batch_id,
            acks,
            averages,
            missed,
        }
    }

    /// Feeds a heartbeat of the peer received at `now_ms`.
    pub fn handle_heartbeat(&mut self, now_ms: u64, heartbeat: PeerHeartbeat) -> Step {
        self.fsm.handle(now_ms, Event::Peer(heartbeat.state))
    }

    /// The next time [`Node::handle_timeout`] has work, if any.
    pub fn poll_timeout(&self) -> Option<u64> {
        if self.fsm.state() == NodeState::Active {
            self.windows.poll_timeout()
        } else {
            None
        }
    }

    /// Publishes the averages that are due; returns how many.
    pub fn handle_timeout(&mut self, now_ms: u64) -> usize {
        // A node that does not serve must not number averages: with
        // replication, only the active node's sequence counts.
        if self.fsm.state() != NodeState::Active {
            return 0;
        }
        self.windows.handle_timeout(now_ms).len()
    }

    /// Counts a frame that was dropped before it became a request.
    pub fn record_malformed(&mut self) {
        self.malformed_frames += 1;
    }

    pub fn ingest(&self) -> &Ingest {
        &self.ingest
    }

    pub fn windows(&self) -> &Windows {
        &self.windows
    }

    pub fn malformed_frames(&self) -> u64 {
        self.malformed_frames
    }

    pub fn batches(&self) -> u64 {
        self.batches
    }

    pub fn status(&self, now_ms: u64) -> StatusReport {
        StatusReport {
            role: self.fsm.role().as_str().to_string(),
            state: self.fsm.state(),
            counted: self.ingest.counted(),
            duplicates: self.ingest.duplicates(),
            averages_published: self.windows.averages_published(),
            revisions_published: self.windows.revisions_published(),
            last_average_seq: self.windows.last_seq(),
            too_late: self.windows.too_late(),
            malformed_frames: self.malformed_frames,
            batches: self.batches,
            peer_alive: self.fsm.peer_alive(now_ms),
            per_sensor: self.ingest.per_sensor(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fog_protocol::{Average, Reading};

    const T0: u64 = 1_700_000_000_000;
    const HB: u64 = 250;

    fn node(role: Role) -> Node {
        Node::new(NodeConfig {
            role,
            heartbeat_ms: HB,
            windows: WindowConfig::default(),
        })
    }

    fn batch(id: u64, sensor: u32, seqs: &[u64], ts: u64, cursor: Option<u64>) -> Request {
        Request::Batch {
            batch_id: id,
            sensors: vec![SensorBatch {
                sensor_id: sensor,
                incarnation: 42,
                segment: 0,
                readings: seqs
                    .iter()
                    .map(|&seq| Reading {
                        seq,
                        speed_kmh: 100,
                        timestamp_ms: ts,
                    })
                    .collect(),
                average_cursor: cursor,
            }],
        }
    }

    fn batch_reply(reply: Reply) -> BatchReply {
        match reply {
            Reply::Batch(b) => b,
            other => panic!("expected a batch reply, got {other:?}"),
        }
    }

    #[test]
    fn an_active_primary_acks_counts_and_publishes() {
        let mut n = node(Role::Primary);
        let b = batch_reply(n.handle_request(T0, &batch(1, 5, &[0, 1, 2], T0, None)));
        assert_eq!(b.batch_id, 1);
        assert_eq!(b.acks[0].next_seq, 3);
        assert!(b.averages.is_empty());
        assert_eq!(n.state(), NodeState::Active);
        assert_eq!(n.poll_timeout(), Some(T0 + 2_000));
        assert_eq!(n.handle_timeout(T0 + 2_000), 1);
        let b = batch_reply(n.handle_request(T0 + 2_100, &batch(2, 6, &[0], T0 + 2_000, None)));
        assert_eq!(
            b.averages.len(),
            1,
            "a new sensor gets the newest average at once"
        );
        assert_eq!(b.averages[0].count, 3);
        let st = n.status(T0 + 2_100);
        assert_eq!((st.counted, st.batches, st.averages_published), (4, 2, 1));
        assert_eq!(st.per_sensor.len(), 2);
    }

    #[test]
    fn a_passive_node_says_so_and_counts_nothing() {
        let mut n = node(Role::Backup);
        n.handle_heartbeat(
            T0,
            PeerHeartbeat {
                state: NodeState::Active,
            },
        );
        let reply = n.handle_request(T0 + 10, &batch(1, 5, &[0], T0, None));
        assert_eq!(
            reply,
            Reply::NotActive {
                state: NodeState::Passive
            }
        );
        assert_eq!(n.ingest().counted(), 0);
        assert!(matches!(
            n.handle_request(T0, &Request::Status),
            Reply::Status(_)
        ));
        // The peer dies; the next batch fails over.
        let b = batch_reply(n.handle_request(T0 + 2 * HB, &batch(2, 5, &[0], T0, None)));
        assert_eq!(b.acks[0].next_seq, 1);
        assert_eq!(n.state(), NodeState::Active);
    }

    #[test]
    fn resent_batches_are_acked_again_but_counted_once() {
        let mut n = node(Role::Primary);
        let req = batch(1, 5, &[0, 1], T0, None);
        n.handle_request(T0, &req);
        let b = batch_reply(n.handle_request(T0 + 1, &req));
        assert_eq!(b.acks[0].next_seq, 2);
        let st = n.status(T0);
        assert_eq!((st.counted, st.duplicates), (2, 2));
        assert_eq!(st.per_sensor[0].sum_kmh, 200);
    }

    /// A seeded simulation: hosts resend unacked readings over a link that
    /// loses requests and replies, and delays some readings by seconds. Every
    /// reading must be counted once, every sensor must see a gap-free run of
    /// averages, and the last revision of every window must match the truth.
    #[test]
    fn simulated_lossy_hosts_count_every_reading_once() {
        use rand::rngs::StdRng;
        use rand::{Rng, SeedableRng};
        use std::collections::{BTreeMap, HashMap};

        for seed in 0..40u64 {
            let mut rng = StdRng::seed_from_u64(seed);
            let mut n = node(Role::Primary);
            const SENSORS: u32 = 6;
            // Per sensor: readings not yet acked (with the time they may
            // first be sent), next seq, cursor, applied average seqs.
            let mut unacked: Vec<BTreeMap<u64, (Reading, u64)>> =
                vec![BTreeMap::new(); SENSORS as usize];
            let mut next_seq = vec![0u64; SENSORS as usize];
            let mut cursor: Vec<Option<u64>> = vec![None; SENSORS as usize];
            let mut applied: Vec<Vec<u64>> = vec![Vec::new(); SENSORS as usize];
            let mut truth: HashMap<u64, (u64, u64)> = HashMap::new(); // bucket -> (count, sum)
            let mut latest: HashMap<u64, Average> = HashMap::new(); // window end -> last revision
            let mut all_seqs = Vec::new();
            let mut batch_id = 0;
            let mut now = T0;
            let end = T0 + 60_000;
            while now < end + 20_000 {
                now += 100;
                if now < end && now.is_multiple_of(1_000) {
                    for s in 0..SENSORS as usize {
                        let r = Reading {
                            seq: next_seq[s],
                            speed_kmh: rng.random_range(70..=120),
                            timestamp_ms: now,
                        };
                        next_seq[s] += 1;
                        let delay = if rng.random_bool(0.1) {
                            rng.random_range(1_000..4_000)
                        } else {
                            0
                        };
                        unacked[s].insert(r.seq, (r, now + delay));
                        let t = truth.entry(now - now % 1_000).or_default();
                        t.0 += 1;
                        t.1 += u64::from(r.speed_kmh);
                    }
                }
                if now.is_multiple_of(200) {
                    batch_id += 1;
                    let sensors: Vec<SensorBatch> = (0..SENSORS as usize)
                        .map(|s| SensorBatch {
                            sensor_id: s as u32,
                            incarnation: 9,
                            segment: 0,
                            readings: unacked[s]
                                .values()
                                .filter(|(_, at)| *at <= now)
                                .map(|(r, _)| *r)
                                .collect(),
                            average_cursor: cursor[s],
                        })
                        .collect();
                    let req = Request::Batch { batch_id, sensors };
                    if !rng.random_bool(0.2) {
                        let reply = batch_reply(n.handle_request(now, &req));
                        if !rng.random_bool(0.2) {
                            for ack in &reply.acks {
                                let s = ack.sensor_id as usize;
                                unacked[s]
                                    .retain(|&q, _| q >= ack.next_seq && !ack.also.contains(&q));
                            }
                            for s in 0..SENSORS as usize {
                                for a in &reply.averages {
                                    if cursor[s].is_none_or(|c| a.seq > c) {
                                        applied[s].push(a.seq);
                                        cursor[s] = Some(a.seq);
                                    }
                                }
                            }
                            assert!(reply.missed.is_empty(), "seed {seed}: nothing ages out");
                        }
                    }
                }
                if n.poll_timeout().is_some_and(|t| t <= now) {
                    n.handle_timeout(now);
                }
                for a in n.windows().retained() {
                    if all_seqs.last().is_none_or(|&l| a.seq > l) {
                        all_seqs.push(a.seq);
                        latest.insert(a.window_end_ms, *a);
                    }
                }
            }
            let generated: u64 = next_seq.iter().sum();
            assert!(
                unacked.iter().all(|u| u.is_empty()),
                "seed {seed}: readings left unacked"
            );
            assert_eq!(n.ingest().counted(), generated, "seed {seed}");
            assert_eq!(
                all_seqs,
                (1..=all_seqs.len() as u64).collect::<Vec<_>>(),
                "seed {seed}"
            );
            for (s, seqs) in applied.iter().enumerate() {
                let first = seqs.first().copied().unwrap_or(1);
                let expect: Vec<u64> = (first..first + seqs.len() as u64).collect();
                assert_eq!(seqs, &expect, "seed {seed}: sensor {s} saw a gap");
            }
            for b in truth.keys() {
                for k in 1..=5 {
                    assert!(
                        latest.contains_key(&(b + k * 1_000)),
                        "seed {seed}: window unpublished"
                    );
                }
            }
            for (end_ms, a) in &latest {
                let (mut count, mut sum) = (0, 0);
                for b in (end_ms - 5_000..*end_ms).step_by(1_000) {
                    if let Some(t) = truth.get(&b) {
                        count += t.0;
                        sum += t.1;
                    }
                }
                assert_eq!(
                    (u64::from(a.count), a.sum_kmh),
                    (count, sum),
                    "seed {seed}: window {end_ms}"
                );
            }
            assert!(
                n.windows().revisions_published() > 0,
                "seed {seed}: the delays make revisions"
            );
        }
    }
}
