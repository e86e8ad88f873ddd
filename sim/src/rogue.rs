//! A rogue client beside the host: now and then it sends both servers
//! batches with forged epochs (random, `u64::MAX`, `MAX_EPOCH`, the current
//! one plus one; with no seal or a random one), sensor cursors of epochs no
//! server issued, readings for the host's own sensors that would poison
//! their ledgers (seqs of 2^62 and `u64::MAX`, stamped 0 or far in the
//! future), and once a batch of 65 536 readings of a sensor of its own.
//! Its replies come back to it, not to the host.

use fog_protocol::{AverageCursor, MAX_EPOCH, MAX_READINGS_PER_BATCH, Reading, Reply, Request, SensorBatch};
use fog_server::Node;
use rand::Rng;

use crate::world::{FAULTS_UNTIL, World};

/// Requests of the rogue carry tokens with this bit; its replies go to it.
pub const ROGUE: u64 = 1 << 63;
/// The rogue's own sensors have ids from here on.
pub const ROGUE_SENSORS: u32 = 1_000;

/// What the rogue did, and what came back to it.
#[derive(Debug, Default, Clone, Copy)]
pub struct Rogue {
    next_token: u64,
    sent_big_batch: bool,
    /// Requests sent, per kind of attack.
    pub forged_epochs: u64,
    pub poison_readings: u64,
    pub big_batches: u64,
    /// Readings the servers' replies said they refused.
    pub refused: u64,
    /// Replies it got (any kind).
    pub replies: u64,
}

impl Rogue {
    pub fn note_reply(&mut self, reply: &Reply) {
        self.replies += 1;
        if let Reply::Batch(b) = reply {
            self.refused += b.refused.iter().map(|r| u64::from(r.count)).sum::<u64>();
        }
    }
}

/// One step of the rogue.
pub fn step(w: &mut World) {
    let t = w.t;
    if !(300..FAULTS_UNTIL).contains(&t) {
        return;
    }
    let big_at = 3_000 + (w.rogue.next_token % 7) * 500;
    let big = !w.rogue.sent_big_batch && t >= big_at && w.rng.random_bool(0.01);
    if !big && !w.rng.random_bool(0.003) {
        return;
    }
    let now = w.host_wall();
    let known = w.servers.iter().filter_map(|s| s.node.as_ref().map(Node::epoch)).max().unwrap_or(0);
    let mut seal = [0u8; 16];
    if w.rng.random_bool(0.5) {
        w.rng.fill(&mut seal);
    }
    let (epoch, sensors) = if big {
        w.rogue.sent_big_batch = true;
        w.rogue.big_batches += 1;
        let readings = (0..MAX_READINGS_PER_BATCH as u64).map(|seq| Reading { seq, speed_kmh: 50, timestamp_ms: now }).collect();
        (0, vec![SensorBatch { sensor_id: ROGUE_SENSORS, incarnation: 99, segment: 1, readings, average_cursor: None }])
    } else if w.rng.random_bool(0.5) {
        w.rogue.forged_epochs += 1;
        let epoch = match w.rng.random_range(0..4) {
            0 => w.rng.random(),
            1 => u64::MAX,
            2 => MAX_EPOCH,
            _ => known + 1,
        };
        // A sensor of its own whose cursor claims an epoch no server issued
        // (were it believed, the node would step down or move it).
        let cursor = AverageCursor { seq: w.rng.random_range(0..1_000), epoch: epoch.max(known + 1), chain: w.rng.random() };
        (epoch, vec![SensorBatch { sensor_id: ROGUE_SENSORS + 1, incarnation: 1, segment: 0, readings: Vec::new(), average_cursor: Some(cursor) }])
    } else {
        w.rogue.poison_readings += 1;
        let sensors = w
            .host
            .fleet
            .summaries()
            .iter()
            .map(|s| {
                let next = s.generated;
                let readings = vec![
                    Reading { seq: 1 << 62, speed_kmh: 1, timestamp_ms: 0 },
                    Reading { seq: 1 << 62, speed_kmh: 1, timestamp_ms: now },
                    Reading { seq: u64::MAX, speed_kmh: 1, timestamp_ms: now },
                    Reading { seq: next + 1_000, speed_kmh: 1, timestamp_ms: 0 },
                    Reading { seq: next, speed_kmh: 1, timestamp_ms: now + 24 * 3_600_000 },
                    Reading { seq: next + 1, speed_kmh: 1, timestamp_ms: u64::MAX },
                ];
                SensorBatch { sensor_id: s.sensor_id, incarnation: s.incarnation, segment: s.segment, readings, average_cursor: None }
            })
            .collect();
        (if w.rng.random_bool(0.5) { known + 1 } else { 0 }, sensors)
    };
    w.rogue.next_token += 1;
    let req = Request::Batch { batch_id: ROGUE | w.rogue.next_token, epoch, seal, sensors };
    for i in 0..2 {
        // A node with an empty log takes the first client request it hears,
        // without a sealed epoch, as the go-ahead to serve: it cannot tell a
        // fresh pair from a node that lost its disk. The host's sealed epoch
        // stops a wiped node; a rogue's request that came first would not
        // (a known limit, see the module doc of fog_server::node), so the
        // rogue never casts that first vote.
        if w.servers[i].node.as_ref().is_none_or(|n| n.lsn() == 0) {
            continue;
        }
        let at = t + w.rng.random_range(1..=w.max_delay);
        w.to_server[i].push_back((at, ROGUE | w.rogue.next_token, req.clone()));
    }
}
