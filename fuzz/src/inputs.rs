//! Hostile inputs, drawn from a seeded generator: raw bytes, valid frames
//! of structured messages built from hostile-biased values, and mutations
//! of valid frames.
//!
//! Values are biased towards the edges a server must survive: 0, 1, the
//! server's clock and its horizons, 2^53, 2^62 and the top of `u64`; counts
//! go up to (and one past) the protocol's caps. Which kinds of hostility a
//! run uses is drawn once per run ([`Swarm`], after swarm testing): a run
//! without forged epochs can find what a node that keeps stepping down
//! would hide.
//!
//! A hostile reading on a legit sensor's own key with a seq the legit
//! sensor will use is indistinguishable from the sensor itself, so no
//! server can refuse it; [`disarm_impersonation`] moves such seqs out of the
//! legit range (and zeroes their speed) so that the oracle only judges what
//! a server can tell apart.

use fog_protocol::{
    AverageCursor, LogEntry, MAX_READINGS_PER_BATCH, MAX_SENSORS_PER_BATCH, NodeState, PeerHeartbeat, PeerMessage,
    Reading, Record, Request, Seal, SensorBatch, encode,
};
use rand::rngs::StdRng;
use rand::Rng;

/// The legit sensors' ids and incarnation.
pub const LEGIT_SENSORS: [u32; 3] = [11, 12, 13];
pub const LEGIT_INCARNATION: u64 = 7;
/// Legit seqs stay below this; hostile readings on a legit key stay above.
pub const LEGIT_SEQ_LIMIT: u64 = 1 << 32;
/// The dedup horizon of the node under test (the server's default).
pub const HORIZON_MS: u64 = 60 * 60 * 1_000;

/// Which channel an input arrives on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Channel {
    /// A client's request (`decode_request`, then `Node::handle_request`).
    Frontend,
    /// The peer's state channel (`decode::<PeerMessage>`, then `Node::handle_peer`).
    Peer,
}

/// How an input was made.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Raw,
    Valid,
    Mutated,
}

/// One hostile input.
#[derive(Debug, Clone)]
pub struct Input {
    pub channel: Channel,
    pub kind: Kind,
    pub bytes: Vec<u8>,
    /// Send it to the active node (else to the other one, in a pair).
    pub to_active: bool,
}

/// The kinds of hostility one run uses.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Swarm {
    pub forged_epochs: bool,
    pub hostile_cursors: bool,
    pub hostile_timestamps: bool,
    pub hostile_seqs: bool,
    pub huge_batches: bool,
    pub raw: bool,
    pub mutations: bool,
    pub peer_messages: bool,
    pub pair: bool,
}

impl Swarm {
    /// Nothing hostile: values a well-behaved host could send (random
    /// sensors, batch ids and incarnations; epochs no newer than the
    /// pair's; timestamps of the last few seconds). What the oracle must
    /// pass: a finding here is a false alarm of the harness or a bug
    /// that needs no attacker.
    pub fn tame(pair: bool) -> Swarm {
        Swarm {
            forged_epochs: false,
            hostile_cursors: false,
            hostile_timestamps: false,
            hostile_seqs: false,
            huge_batches: false,
            raw: false,
            mutations: false,
            peer_messages: false,
            pair,
        }
    }

    pub fn draw(rng: &mut StdRng) -> Swarm {
        let mut on = |p: f64| rng.random_bool(p);
        Swarm {
            forged_epochs: on(0.5),
            hostile_cursors: on(0.5),
            hostile_timestamps: on(0.7),
            hostile_seqs: on(0.7),
            huge_batches: on(0.15),
            raw: on(0.5),
            mutations: on(0.7),
            peer_messages: on(0.25),
            pair: on(0.4),
        }
    }
}

/// What the generator knows of the world it attacks.
#[derive(Debug, Clone, Copy)]
pub struct Context {
    pub now: u64,
    /// The highest epoch of the nodes under test.
    pub epoch: u64,
    /// The newest lsn of the nodes under test.
    pub lsn: u64,
    /// The newest epoch a reply showed the legit host, with its seal.
    pub sealed: (u64, Seal),
}

/// Draws hostile inputs for one run.
pub struct Generator {
    pub swarm: Swarm,
    /// Huge batches drawn so far in this run (they are slow to make).
    huge: u32,
    /// Most huge batches per run.
    max_huge: u32,
}

impl Generator {
    pub fn new(swarm: Swarm, max_huge: u32) -> Generator {
        Generator { swarm, huge: 0, max_huge }
    }

    pub fn input(&mut self, rng: &mut StdRng, cx: &Context) -> Input {
        let channel = if self.swarm.peer_messages && rng.random_bool(0.3) { Channel::Peer } else { Channel::Frontend };
        let to_active = rng.random_bool(0.85);
        let roll = rng.random_range(0..100);
        let (kind, bytes) = if self.swarm.raw && roll < 15 {
            (Kind::Raw, raw_bytes(rng))
        } else if self.swarm.mutations && roll < 55 {
            let mut frame = self.valid_frame(rng, cx, channel, false);
            let other = self.valid_frame(rng, cx, channel, false);
            mutate(rng, &mut frame, &other);
            (Kind::Mutated, frame)
        } else {
            (Kind::Valid, self.valid_frame(rng, cx, channel, true))
        };
        Input { channel, kind, bytes, to_active }
    }

    fn valid_frame(&mut self, rng: &mut StdRng, cx: &Context, channel: Channel, may_be_huge: bool) -> Vec<u8> {
        let encoded = match channel {
            Channel::Frontend => {
                let req = self.request(rng, cx, may_be_huge);
                encode(&req)
            }
            Channel::Peer => encode(&self.peer_message(rng, cx)),
        };
        // A message over the frame limit is one a peer cannot send: send
        // the smallest request instead.
        encoded.unwrap_or_else(|_| encode(&Request::Status).unwrap_or_default())
    }

    pub fn request(&mut self, rng: &mut StdRng, cx: &Context, may_be_huge: bool) -> Request {
        let batch_id = if self.tame() { rng.random() } else { hostile_u64(rng, cx) };
        if rng.random_bool(0.03) {
            return Request::Status;
        }
        let (epoch, seal) = self.epoch_and_seal(rng, cx);
        let sensors = if may_be_huge && self.swarm.huge_batches && self.huge < self.max_huge && rng.random_bool(0.05) {
            self.huge += 1;
            self.huge_sensors(rng, cx)
        } else {
            (0..rng.random_range(0..=6)).map(|_| self.sensor(rng, cx, 8)).collect()
        };
        Request::Batch { batch_id, epoch, seal, sensors }
    }

    /// Up to (and sometimes one past) the caps: many readings of one
    /// sensor with distinct new seqs, or many sensors.
    fn huge_sensors(&mut self, rng: &mut StdRng, cx: &Context) -> Vec<SensorBatch> {
        let caps = [MAX_READINGS_PER_BATCH, MAX_READINGS_PER_BATCH + 1, MAX_READINGS_PER_BATCH / 2, 4096];
        if rng.random_bool(0.25) {
            let n = [MAX_SENSORS_PER_BATCH, MAX_SENSORS_PER_BATCH + 1, 4096][rng.random_range(0..3)];
            return (0..n).map(|_| self.sensor(rng, cx, 1)).collect();
        }
        let n = caps[rng.random_range(0..caps.len())];
        let sensor_id = rng.random::<u32>() | 0x8000_0000;
        let base = if rng.random_bool(0.5) { 0 } else { rng.random_range(0..1u64 << 40) };
        let same_seq = rng.random_bool(0.2);
        let readings = (0..n as u64)
            .map(|i| Reading { seq: if same_seq { base } else { base + i }, speed_kmh: 90, timestamp_ms: cx.now })
            .collect();
        vec![SensorBatch { sensor_id, incarnation: rng.random(), segment: rng.random_range(0..4), readings, average_cursor: None }]
    }

    /// One sensor's part of a batch, with up to `max_readings` readings.
    fn sensor(&self, rng: &mut StdRng, cx: &Context, max_readings: usize) -> SensorBatch {
        let readings = rng.random_range(0..=max_readings);
        let legit = rng.random_bool(0.3);
        let sensor_id = if legit {
            LEGIT_SENSORS[rng.random_range(0..LEGIT_SENSORS.len())]
        } else {
            [0, 1, u32::MAX, rng.random()][rng.random_range(0..4)]
        };
        let incarnation = if legit && rng.random_bool(0.7) {
            LEGIT_INCARNATION
        } else if self.tame() {
            rng.random()
        } else {
            hostile_u64(rng, cx)
        };
        let base_seq = if self.swarm.hostile_seqs { hostile_u64(rng, cx) } else { rng.random_range(0..1_000) };
        let readings = (0..readings as u64)
            .map(|i| Reading {
                seq: if rng.random_bool(0.2) { base_seq } else { base_seq.wrapping_add(i) },
                speed_kmh: [0, 1, 90, u16::MAX, rng.random()][rng.random_range(0..5)],
                timestamp_ms: if self.swarm.hostile_timestamps { hostile_u64(rng, cx) } else { cx.now - rng.random_range(0..5_000) },
            })
            .collect();
        let average_cursor = match rng.random_range(0..3) {
            0 => None,
            _ if !self.swarm.hostile_cursors => Some(AverageCursor { seq: rng.random_range(0..100), epoch: cx.epoch.min(self.epoch(rng, cx)), chain: rng.random() }),
            _ => Some(AverageCursor { seq: hostile_u64(rng, cx), epoch: self.epoch(rng, cx), chain: hostile_u64(rng, cx) }),
        };
        SensorBatch { sensor_id, incarnation, segment: [0, 1, u32::MAX, rng.random()][rng.random_range(0..4)], readings, average_cursor }
    }

    fn tame(&self) -> bool {
        let s = &self.swarm;
        !(s.forged_epochs || s.hostile_cursors || s.hostile_timestamps || s.hostile_seqs || s.huge_batches)
    }

    /// The epoch a batch claims and its seal: the genuine pair a reply
    /// showed, an epoch with no seal or a random one, or (forging) a
    /// genuine seal under another epoch.
    fn epoch_and_seal(&self, rng: &mut StdRng, cx: &Context) -> (u64, Seal) {
        let (sealed_epoch, genuine) = cx.sealed;
        match rng.random_range(0..10) {
            0..3 => (sealed_epoch, genuine),
            3..5 if self.swarm.forged_epochs => {
                let forged = [sealed_epoch.saturating_add(1), sealed_epoch.saturating_add(2), u64::MAX, hostile_u64(rng, cx)];
                (forged[rng.random_range(0..forged.len())], genuine)
            }
            _ => {
                let mut seal = [0u8; 16];
                if rng.random_bool(0.5) {
                    rng.fill(&mut seal[..]);
                }
                (self.epoch(rng, cx), seal)
            }
        }
    }

    /// An epoch a request or message claims: forged (ahead of the pair's)
    /// only in runs that forge epochs.
    fn epoch(&self, rng: &mut StdRng, cx: &Context) -> u64 {
        let claimed = if rng.random_bool(0.5) { cx.epoch } else { hostile_u64(rng, cx) };
        if self.swarm.forged_epochs { claimed } else { claimed.min(cx.epoch) }
    }

    pub fn peer_message(&self, rng: &mut StdRng, cx: &Context) -> PeerMessage {
        let epoch = self.epoch(rng, cx);
        let state = [NodeState::Primary, NodeState::Backup, NodeState::Active, NodeState::Passive][rng.random_range(0..4)];
        match rng.random_range(0..7) {
            0 => PeerMessage::Heartbeat(PeerHeartbeat {
                state,
                epoch,
                lsn: self.lsn(rng, cx),
                complete: rng.random(),
                peer_in_sync: rng.random(),
            }),
            1 => PeerMessage::Records {
                epoch,
                entries: (0..rng.random_range(0..4))
                    .map(|i| LogEntry { lsn: self.lsn(rng, cx).wrapping_add(i), epoch: self.epoch(rng, cx), solo: rng.random(), record: self.record(rng, cx) })
                    .collect(),
            },
            2 => PeerMessage::Ack { epoch, durable: self.lsn(rng, cx) },
            3 => PeerMessage::Join { epoch },
            4 => {
                let mut state = vec![0u8; rng.random_range(0..64)];
                rng.fill(&mut state[..]);
                // Mostly a snapshot of a few parts, in or out of order;
                // now and then counts at and past the bounds.
                let parts = match rng.random_range(0..4) {
                    0 => hostile_u64(rng, cx) as u32,
                    n => n,
                };
                let part = match rng.random_range(0..4) {
                    0 => hostile_u64(rng, cx) as u32,
                    _ => rng.random_range(0..parts.max(1)),
                };
                PeerMessage::Snapshot { epoch, lsn: self.lsn(rng, cx), part, parts, state }
            }
            5 => PeerMessage::Merge {
                epoch,
                id: hostile_u64(rng, cx),
                sensors: (0..rng.random_range(0..4)).map(|_| self.sensor(rng, cx, 6)).collect(),
            },
            _ => PeerMessage::MergeAck { id: hostile_u64(rng, cx) },
        }
    }

    fn lsn(&self, rng: &mut StdRng, cx: &Context) -> u64 {
        match rng.random_range(0..4) {
            0 => cx.lsn,
            1 => cx.lsn + 1,
            2 => cx.lsn.saturating_sub(rng.random_range(0..5)),
            _ => hostile_u64(rng, cx),
        }
    }

    fn record(&self, rng: &mut StdRng, cx: &Context) -> Record {
        match rng.random_range(0..7) {
            0 => Record::ReadingsAccepted {
                now_ms: hostile_u64(rng, cx),
                sensors: (0..rng.random_range(0..3)).map(|_| self.sensor(rng, cx, 4)).collect(),
            },
            1 => Record::AveragesPublished { now_ms: hostile_u64(rng, cx), next_seq: hostile_u64(rng, cx) },
            2 => Record::UplinkForwarded { through: hostile_u64(rng, cx) },
            3 => Record::UplinkAcked { through: hostile_u64(rng, cx), chain: hostile_u64(rng, cx), landed_from: hostile_u64(rng, cx) },
            4 => Record::UplinkInCloud {
                readings: (0..rng.random_range(0..4))
                    .map(|_| fog_protocol::ReadingInCloud { sensor_id: rng.random(), incarnation: hostile_u64(rng, cx), seq: hostile_u64(rng, cx), timestamp_ms: hostile_u64(rng, cx) })
                    .collect(),
            },
            5 => Record::UplinkAdopted { fork: hostile_u64(rng, cx), end: hostile_u64(rng, cx), chain: hostile_u64(rng, cx) },
            _ => Record::EpochChanged { epoch: self.epoch(rng, cx) },
        }
    }
}

/// A u64 from the edges: 0, 1, small, the clock and its horizons, powers
/// near the float and integer limits, the top of the range.
pub fn hostile_u64(rng: &mut StdRng, cx: &Context) -> u64 {
    match rng.random_range(0..14) {
        0 => 0,
        1 => 1,
        2 => rng.random_range(2..1_000),
        3 => cx.now,
        4 => cx.now.saturating_sub(HORIZON_MS),
        5 => cx.now.saturating_sub(HORIZON_MS + 1),
        6 => cx.now.saturating_add(HORIZON_MS),
        7 => cx.now.saturating_add(rng.random_range(1..10_000)),
        8 => 1 << 53,
        9 => 1 << 62,
        10 => u64::MAX - 1,
        11 => u64::MAX,
        12 => cx.epoch.saturating_add(rng.random_range(1..3)),
        _ => rng.random(),
    }
}

fn raw_bytes(rng: &mut StdRng) -> Vec<u8> {
    let len = if rng.random_bool(0.9) { rng.random_range(0..64) } else { rng.random_range(0..4096) };
    let mut bytes = vec![0u8; len];
    rng.fill(&mut bytes[..]);
    if !bytes.is_empty() && rng.random_bool(0.8) {
        bytes[0] = fog_protocol::PROTOCOL_VERSION;
    }
    bytes
}

/// Varints a length prefix can be inflated to: 2^16, 2^32-1, 2^64-1.
const INFLATED: [&[u8]; 3] = [&[0x80, 0x80, 0x04], &[0xff, 0xff, 0xff, 0xff, 0x0f], &[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01]];

/// One to four mutations of `frame`: bit flips, edge bytes, truncation,
/// splicing with `other`, inflated length prefixes, duplicated or deleted
/// spans. The version byte is kept most of the time, so that most
/// mutants reach the message decoder.
pub fn mutate(rng: &mut StdRng, frame: &mut Vec<u8>, other: &[u8]) {
    for _ in 0..rng.random_range(1..=4) {
        if frame.len() < 2 {
            frame.push(rng.random());
            continue;
        }
        let at = rng.random_range(1..frame.len());
        match rng.random_range(0..7) {
            0 => frame[at] ^= 1 << rng.random_range(0..8),
            1 => frame[at] = [0x00, 0x01, 0x7f, 0x80, 0xff][rng.random_range(0..5)],
            2 => frame.truncate(at),
            3 => {
                let from = rng.random_range(0..=other.len());
                frame.truncate(at);
                frame.extend_from_slice(&other[from..]);
            }
            4 => {
                let with = INFLATED[rng.random_range(0..INFLATED.len())];
                let end = (at + 1).min(frame.len());
                frame.splice(at..end, with.iter().copied());
            }
            5 => {
                let end = rng.random_range(at..=frame.len().min(at + 64));
                let span = frame[at..end].to_vec();
                let to = rng.random_range(1..=frame.len());
                frame.splice(to..to, span);
            }
            _ => {
                let end = rng.random_range(at..=frame.len().min(at + 16));
                frame.drain(at..end);
            }
        }
    }
}

/// Moves a hostile reading on a legit sensor's own key out of the legit
/// seq range, with speed 0 (see the module doc): what is left is what a
/// server can tell from the sensor, and the legit sums stay exact.
pub fn disarm_impersonation(sensors: &mut [SensorBatch]) {
    for s in sensors.iter_mut().filter(|s| is_legit_key(s.sensor_id, s.incarnation)) {
        for r in &mut s.readings {
            if r.seq < LEGIT_SEQ_LIMIT {
                r.seq |= LEGIT_SEQ_LIMIT;
            }
            r.speed_kmh = 0;
        }
    }
}

pub fn is_legit_key(sensor_id: u32, incarnation: u64) -> bool {
    incarnation == LEGIT_INCARNATION && LEGIT_SENSORS.contains(&sensor_id)
}
