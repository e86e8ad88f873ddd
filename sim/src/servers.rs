//! The simulated server machines: a real [`Node`] each, a disk that keeps
//! only what was written before a crash, and a state channel per direction
//! that can lose, delay and duplicate messages but keeps their order (as a
//! ZeroMQ PUB/SUB link does).

use std::collections::VecDeque;

use fog_protocol::{LogEntry, PeerMessage};
use fog_server::{Node, NodeConfig, Now, Role, WindowConfig};

/// The pair's heartbeat.
pub const HB: u64 = 50;
const SEAL_KEY: [u8; 32] = [0x5e; 32];

pub fn config(role: Role) -> NodeConfig {
    NodeConfig {
        role,
        heartbeat_ms: HB,
        windows: WindowConfig { lateness_ms: 200, ..WindowConfig::default() },
        snapshot_every: 50,
        seal_key: SEAL_KEY,
        // The uplink's outbox is kept (and checked) in every run.
        outbox: fog_server::outbox::OutboxConfig { enabled: true, backlog_bytes: 1 << 30 },
    }
}

/// What survives a crash.
#[derive(Default, Clone)]
pub struct Disk {
    pub snapshot: Option<Vec<u8>>,
    pub entries: Vec<LogEntry>,
}

pub enum Job {
    Append(LogEntry),
    Snapshot(u64, Vec<u8>),
}

pub struct Server {
    pub role: Role,
    pub node: Option<Node>,
    pub disk: Disk,
    /// Writes under way, each done at its time.
    pub writes: VecDeque<(u64, Job)>,
    pub paused_until: u64,
    pub down_until: Option<u64>,
    /// Added to the simulated time for this machine's wall clock (a step
    /// of NTP moves it); its monotonic clock is the simulated time.
    pub wall_offset: i64,
}

impl Server {
    pub fn new(role: Role) -> Server {
        Server { role, node: Some(Node::new(config(role))), disk: Disk::default(), writes: VecDeque::new(), paused_until: 0, down_until: None, wall_offset: 0 }
    }

    /// The machine's two clocks at simulated time `t`, whose wall-clock
    /// reading without steps is `wall`.
    pub fn now(&self, t: u64, wall: u64) -> Now {
        Now { mono_ms: t, wall_ms: wall.saturating_add_signed(self.wall_offset) }
    }

    pub fn up(&self, t: u64) -> bool {
        self.node.is_some() && t >= self.paused_until
    }

    /// The process dies: what was not yet written is lost.
    pub fn crash(&mut self, t: u64, down_for: u64) {
        self.node = None;
        self.writes.clear();
        self.paused_until = 0;
        self.down_until = Some(t + down_for);
    }

    /// The process starts again from its disk.
    pub fn restart(&mut self) -> Result<(), String> {
        let node = Node::recover(config(self.role), self.disk.snapshot.as_deref(), &self.disk.entries).map_err(|e| format!("{:?} cannot recover from its disk: {e}", self.role))?;
        self.node = Some(node);
        self.down_until = None;
        Ok(())
    }

    /// Completes the writes due by `t`, in order; returns `(lsn, snapshot)`
    /// of each, for the node's `handle_durable`.
    pub fn complete_writes(&mut self, t: u64) -> Vec<(u64, bool)> {
        let mut done = Vec::new();
        while self.writes.front().is_some_and(|(at, _)| *at <= t) {
            let Some((_, job)) = self.writes.pop_front() else { break };
            done.push(match job {
                Job::Append(e) => {
                    let lsn = e.lsn;
                    self.disk.entries.push(e);
                    (lsn, false)
                }
                Job::Snapshot(lsn, bytes) => {
                    self.disk.snapshot = Some(bytes);
                    self.disk.entries.clear();
                    (lsn, true)
                }
            });
        }
        done
    }
}

/// One direction of the state channel.
#[derive(Default)]
pub struct Link {
    pub queue: VecDeque<(u64, PeerMessage)>,
    pub last_at: u64,
}
