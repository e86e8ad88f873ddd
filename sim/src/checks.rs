//! The invariants, checked after every step of the world and at the end of
//! a run. A violation panics with what broke and when; the caller turns
//! the panic into a failure that names the seed and lists the faults.

use std::collections::HashMap;

use fog_protocol::NodeState;
use fog_server::Node;

use crate::rogue::ROGUE_SENSORS;
use crate::world::World;

/// After the last disturbance (a fault, the pair's first election, a
/// takeover, a passive rejoining) the pair has this long to settle.
pub const SETTLE: u64 = 5_000;
/// Once settled, a sensor with unacked readings must see one acked at
/// least this often.
pub const STALL: u64 = 3_000;
/// The costlier checks run this often (ms of simulated time).
const EVERY: u64 = 10;

/// What the per-step checks remember between steps.
#[derive(Debug, Default)]
pub struct Watch {
    /// Per sensor id: its acked count, and when that last grew.
    acked: HashMap<u32, (u64, u64)>,
}

impl World {
    /// Checked after every step.
    pub fn check_step(&mut self) {
        self.check_epochs();
        if self.t % EVERY == 0 {
            self.check_counts();
            self.check_progress();
        }
    }

    /// Every epoch a node believes in was served by a node: no node took a
    /// forged epoch as evidence.
    fn check_epochs(&mut self) {
        let nodes = || self.servers.iter().filter_map(|s| s.node.as_ref());
        let served = nodes().filter(|n| n.state() == NodeState::Active).map(Node::epoch).max().unwrap_or(0);
        self.served_epoch = self.served_epoch.max(served);
        for n in nodes() {
            assert!(n.epoch() <= self.served_epoch, "at {} ms a node believes in epoch {} that no node served (highest {})", self.t, n.epoch(), self.served_epoch);
        }
    }

    /// No node counts more readings of a sensor than it generated, nor
    /// holds a ledger for an incarnation no sensor has; no sensor misses
    /// an average.
    fn check_counts(&self) {
        let sensors = self.host.fleet.summaries();
        let generated: HashMap<(u32, u64), u64> = sensors.iter().map(|s| ((s.sensor_id, s.incarnation), s.generated)).collect();
        for server in &self.servers {
            let Some(node) = server.node.as_ref() else { continue };
            for c in node.replica().ingest.per_sensor().iter().filter(|c| c.sensor_id < ROGUE_SENSORS) {
                let Some(&made) = generated.get(&(c.sensor_id, c.incarnation)) else {
                    panic!("at {} ms {:?} holds a ledger for an incarnation no sensor has: {c:?}", self.t, server.role);
                };
                assert!(c.count <= made, "at {} ms {:?} counted {} readings of sensor {}, which generated {made}", self.t, server.role, c.count, c.sensor_id);
            }
        }
        for s in &sensors {
            assert_eq!(s.averages_missed, 0, "at {} ms sensor {} missed averages", self.t, s.sensor_id);
        }
    }

    /// Once the world has been calm for [`SETTLE`], a sensor with unacked
    /// readings has one acked every [`STALL`] at least: the host and the
    /// pair make progress.
    fn check_progress(&mut self) {
        let t = self.t;
        let calm = t >= self.disturbed_until + SETTLE;
        for s in self.host.fleet.summaries() {
            let entry = self.watch.acked.entry(s.sensor_id).or_insert((s.acked, t));
            // A restarted sensor's count goes back to its snapshot's and
            // climbs again as the readings after it are acked anew.
            if s.acked != entry.0 || s.unacked == 0 {
                *entry = (s.acked, t);
            }
            let stalled = t.saturating_sub(entry.1.max(self.disturbed_until + SETTLE));
            assert!(
                !calm || stalled <= STALL,
                "at {t} ms sensor {} has had {} readings unacked for {stalled} ms with no ack, though nothing has disturbed the system since {} ms",
                s.sensor_id,
                s.unacked,
                self.disturbed_until
            );
        }
    }

    /// Checked at the end of a run (whose last part is quiet).
    pub fn check_end(&mut self) {
        let t = self.t;
        let (all_acked, sensors) = self.host.summaries(t);
        for s in &sensors {
            assert_eq!(s.unacked, 0, "sensor {} has {} readings never acked", s.sensor_id, s.unacked);
        }
        assert!(all_acked, "the host still holds unacked readings");
        // The pair checks every epoch a host claims and steps down for a
        // newer one it can verify: it never serves below a host's claim,
        // and the host never has to take one back.
        assert_eq!(self.host.core.unvouched_epochs(), 0, "the pair served a batch below the sealed epoch it claimed");
        let active: Vec<usize> = (0..2).filter(|&i| self.servers[i].node.as_ref().is_some_and(|n| n.state() == NodeState::Active)).collect();
        assert_eq!(active.len(), 1, "exactly one active node at the end");
        let active_lsn = self.servers[active[0]].node.as_ref().map_or(0, Node::lsn);
        let mut truth: Vec<(u32, u64, u64, u64)> = sensors.iter().map(|s| (s.sensor_id, s.incarnation, s.generated, s.sum_kmh)).collect();
        truth.sort_unstable();
        for (i, server) in self.servers.iter().enumerate() {
            // Every down time ends before the quiet end: both nodes are up.
            let node = server.node.as_ref().unwrap_or_else(|| panic!("{:?} is still down at the end", server.role));
            assert_eq!(node.divergences(), 0, "{:?} diverged from its active", server.role);
            let in_sync = i == active[0] || node.caught_up() && node.lsn() == active_lsn;
            assert!(in_sync, "{:?} is up but not caught up with the active at the end of a quiet run (lsn {} of {active_lsn})", server.role, node.lsn());
            let mut counts: Vec<(u32, u64, u64, u64)> =
                node.replica().ingest.per_sensor().iter().filter(|c| c.sensor_id < ROGUE_SENSORS).map(|c| (c.sensor_id, c.incarnation, c.count, c.sum_kmh)).collect();
            counts.sort_unstable();
            assert_eq!(counts, truth, "{:?}: per-sensor (id, incarnation, count, sum) differ from what the sensors generated", server.role);
        }
        // The outbox owes every counted reading and published average, once,
        // and both nodes owe the same (same items, same chain, same position).
        let owed = |n: &Node| {
            let o = n.outbox();
            (o.last_seq(), o.chain_at(o.last_seq()), o.forwarded(), o.len())
        };
        for server in &self.servers {
            let n = server.node.as_ref().expect("both nodes are up at the end");
            let r = n.replica();
            assert_eq!(n.outbox().last_seq(), r.ingest.counted() + r.windows.averages_published(), "{:?}: the outbox did not owe every counted reading and average once", server.role);
            assert_eq!(n.outbox().dropped(), 0);
        }
        let (a, b) = (self.servers[0].node.as_ref().expect("up"), self.servers[1].node.as_ref().expect("up"));
        assert_eq!(owed(a), owed(b), "the nodes' outboxes differ at the end of a quiet run");
        let node = self.servers[active[0]].node.as_ref().expect("the active node is up");
        assert!(node.outbox().forwarded() > 0, "the cloud never acked anything");
        let end = node.replica().windows.last_position();
        assert!(end.seq > 0, "no average was published");
        for s in &sensors {
            assert_eq!(s.last_average_seq, Some(end.seq), "sensor {} did not end at the active node's newest average", s.sensor_id);
            assert_eq!(s.averages_digest, format!("{:016x}", end.chain), "sensor {} ended on another chain than the active's", s.sensor_id);
            assert!(s.averages_applied > 0, "sensor {} applied no average", s.sensor_id);
        }
    }
}
