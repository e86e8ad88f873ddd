//! The Binary Star state machine of the ZeroMQ guide, without sockets or
//! clocks.
//!
//! A [`BinaryStar`] is fed the heartbeats its peer publishes and the client
//! requests that reach the node, each with the time it happened at, and
//! answers whether the request may be served. Everything else (when to send a
//! heartbeat, how to reach the peer) belongs to the driver. The rules are the
//! guide's: a node takes over only when its peer has been silent for two
//! heartbeats *and* a client asks it for service, and a restarted primary
//! that finds an active backup comes back passive.
//!
//! Deviations, because the pair replicates and carries epochs: which of two
//! nodes that are not serving becomes active is decided by rank (epoch, log
//! position, role; the caller says whether the peer outranks this node)
//! rather than by role alone, so a primary restarted with older data yields
//! to a backup with newer data; two active nodes (a healed partition) do not
//! abort: the outranked one steps down; and a passive that is not caught up
//! never takes over.

use fog_protocol::NodeState;

/// The configured role of a node; fixed for the life of the process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    Primary,
    Backup,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Primary => "primary",
            Role::Backup => "backup",
        }
    }

    /// The state a node of this role starts in.
    pub fn initial_state(self) -> NodeState {
        match self {
            Role::Primary => NodeState::Primary,
            Role::Backup => NodeState::Backup,
        }
    }
}

/// An input to the state machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// The peer published a heartbeat carrying this state; `outranks` says
    /// whether its rank (epoch, log position, role) is above this node's.
    Peer { state: NodeState, outranks: bool },
    /// A client asked this node for service; `complete` says whether a
    /// passive node has all the data it needs to take over.
    ClientRequest { complete: bool },
}

/// What one event did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Step {
    pub from: NodeState,
    pub to: NodeState,
    /// For a client request: whether this node serves it. For a peer event:
    /// false when the pair is in a state the protocol does not allow (two
    /// passive nodes, two active nodes), which the driver should log.
    pub accepted: bool,
    /// A sentence for the log when something noteworthy happened.
    pub note: Option<&'static str>,
}

impl Step {
    pub fn changed(&self) -> bool {
        self.from != self.to
    }
}

/// One node's Binary Star state.
#[derive(Debug, Clone)]
pub struct BinaryStar {
    role: Role,
    state: NodeState,
    heartbeat_ms: u64,
    /// The peer counts as dead from this time on; 0 until it is first heard,
    /// so that a primary started alone serves at once.
    peer_expiry_ms: u64,
}

impl BinaryStar {
    pub fn new(role: Role, heartbeat_ms: u64) -> Self {
        BinaryStar {
            role,
            state: role.initial_state(),
            heartbeat_ms,
            peer_expiry_ms: 0,
        }
    }

    pub fn role(&self) -> Role {
        self.role
    }

    pub fn state(&self) -> NodeState {
        self.state
    }

    /// Whether the peer has been heard within the last two heartbeats.
    pub fn peer_alive(&self, now_ms: u64) -> bool {
        now_ms < self.peer_expiry_ms
    }

    /// Whether the peer has been heard within the last two heartbeats
    /// and `grace_ms`.
    pub fn peer_heard_within(&self, now_ms: u64, grace_ms: u64) -> bool {
        now_ms < self.peer_expiry_ms.saturating_add(grace_ms)
    }

    /// Feeds one event that happened at `now_ms`.
    pub fn handle(&mut self, now_ms: u64, event: Event) -> Step {
        use NodeState::*;
        let from = self.state;
        if let Event::Peer { .. } = event {
            self.peer_expiry_ms = now_ms.saturating_add(2 * self.heartbeat_ms);
        }
        let peer_dead = now_ms >= self.peer_expiry_ms;
        let (to, accepted, note) = match (from, event) {
            (Active, Event::Peer { state: Active, outranks: true }) => (
                Passive,
                false,
                Some("dual active: the peer outranks this node (newer epoch); stepping down"),
            ),
            (Active, Event::Peer { state: Active, outranks: false }) => (
                Active,
                false,
                Some("dual active: this node outranks the peer, which will step down"),
            ),
            (Active, Event::Peer { .. }) => (Active, true, None),
            (Primary, Event::Peer { state: Active, .. }) => (
                Passive,
                true,
                Some("connected to backup (active), ready as passive"),
            ),
            (Backup, Event::Peer { state: Active, .. }) => (
                Passive,
                true,
                Some("connected to primary (active), ready as passive"),
            ),
            (Passive, Event::Peer { state: Active, .. }) => (Passive, true, None),
            // Neither node serves: the higher-ranked one takes the lead.
            (Primary | Backup | Passive, Event::Peer { state: _, outranks: false }) => (
                Active,
                true,
                Some(match from {
                    Primary => "connected to the peer, which does not serve: ready as active",
                    Backup => "the primary yields (older data): ready as active",
                    _ => "the peer is not serving and this node outranks it: ready as active",
                }),
            ),
            (Primary, Event::Peer { outranks: true, state }) if state != Passive => (
                Passive,
                true,
                Some("the peer has newer data: waiting as passive for it to take the lead"),
            ),
            (Passive, Event::Peer { state: Passive, outranks: true }) => (Passive, true, None),
            (_, Event::Peer { .. }) => (from, true, None),
            (Primary, Event::ClientRequest { .. }) if peer_dead => (Active, true, None),
            (Passive, Event::ClientRequest { complete: true }) if peer_dead => (
                Active,
                true,
                Some("failover: peer expired and a client asked, taking over as active"),
            ),
            (Primary | Passive | Backup, Event::ClientRequest { .. }) => (from, false, None),
            (Active, Event::ClientRequest { .. }) => (Active, true, None),
        };
        self.state = to;
        Step {
            from,
            to,
            accepted,
            note,
        }
    }

    /// Stops serving at once (a newer epoch exists, or this node was paused
    /// long enough that a takeover may have happened).
    pub fn step_down(&mut self) -> Step {
        let from = self.state;
        self.state = NodeState::Passive;
        Step { from, to: NodeState::Passive, accepted: true, note: None }
    }

    /// A message from the peer other than a heartbeat shows it is alive too:
    /// a passive that joins may not have had a heartbeat through yet.
    pub fn heard_peer(&mut self, now_ms: u64) {
        self.peer_expiry_ms = self.peer_expiry_ms.max(now_ms.saturating_add(2 * self.heartbeat_ms));
    }

    /// Starts the peer's expiry afresh: after this node was paused, the
    /// peer's silence says nothing about the peer.
    pub fn restart_peer_expiry(&mut self, now_ms: u64) {
        if self.peer_expiry_ms != 0 {
            self.peer_expiry_ms = now_ms.saturating_add(2 * self.heartbeat_ms);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use NodeState::*;

    const HB: u64 = 250;

    /// Two nodes on simulated time; heartbeats are delivered at once unless
    /// a node is down or the link is cut.
    struct Pair {
        now: u64,
        primary: Option<BinaryStar>,
        backup: Option<BinaryStar>,
        link_up: bool,
        backup_epoch_ahead: bool,
    }

    impl Pair {
        fn new() -> Self {
            Pair {
                now: 1_000_000,
                primary: Some(BinaryStar::new(Role::Primary, HB)),
                backup: Some(BinaryStar::new(Role::Backup, HB)),
                link_up: true,
                backup_epoch_ahead: false,
            }
        }

        /// Advances time by `ms`, exchanging heartbeats every `HB`.
        fn run(&mut self, ms: u64) {
            let end = self.now + ms;
            while self.now < end {
                self.now += HB;
                let p = self.primary.as_ref().map(|n| n.state());
                let b = self.backup.as_ref().map(|n| n.state());
                // Equal data: the primary outranks the backup; after a
                // takeover the taker's newer epoch outranks.
                let backup_ahead = self.backup_epoch_ahead;
                if self.link_up {
                    if let (Some(n), Some(s)) = (self.backup.as_mut(), p) {
                        n.handle(self.now, Event::Peer { state: s, outranks: !backup_ahead });
                    }
                    if let (Some(n), Some(s)) = (self.primary.as_mut(), b) {
                        n.handle(self.now, Event::Peer { state: s, outranks: backup_ahead });
                    }
                }
            }
        }

        fn client(node: &mut Option<BinaryStar>, now: u64) -> bool {
            node.as_mut()
                .is_some_and(|n| n.handle(now, Event::ClientRequest { complete: true }).accepted)
        }

        fn state(node: &Option<BinaryStar>) -> Option<NodeState> {
            node.as_ref().map(|n| n.state())
        }
    }

    #[test]
    fn primary_started_alone_serves_clients() {
        let mut n = BinaryStar::new(Role::Primary, HB);
        assert_eq!(n.state(), Primary);
        assert!(n.handle(5_000, Event::ClientRequest { complete: true }).accepted);
        assert_eq!(n.state(), Active);
    }

    #[test]
    fn backup_started_alone_never_serves() {
        let mut n = BinaryStar::new(Role::Backup, HB);
        for t in (0..10_000).step_by(500) {
            assert!(!n.handle(t, Event::ClientRequest { complete: true }).accepted);
        }
        assert_eq!(n.state(), Backup);
    }

    #[test]
    fn pair_settles_primary_active_backup_passive() {
        let mut pair = Pair::new();
        pair.run(2 * HB);
        assert_eq!(Pair::state(&pair.primary), Some(Active));
        assert_eq!(Pair::state(&pair.backup), Some(Passive));
        let now = pair.now;
        assert!(
            !Pair::client(&mut pair.backup, now),
            "passive must not serve while peer lives"
        );
        assert!(Pair::client(&mut pair.primary, now));
    }

    #[test]
    fn backup_takes_over_only_after_expiry_and_a_client_request() {
        let mut pair = Pair::new();
        pair.run(2 * HB);
        pair.primary = None; // crash
        let crash = pair.now;
        // Within two heartbeats of the last one heard: refuse.
        assert!(!Pair::client(&mut pair.backup, crash + HB));
        assert_eq!(Pair::state(&pair.backup), Some(Passive));
        // Expired, but nobody asked: still passive.
        pair.run(10 * HB);
        assert_eq!(Pair::state(&pair.backup), Some(Passive));
        let now = pair.now;
        assert!(Pair::client(&mut pair.backup, now));
        assert_eq!(Pair::state(&pair.backup), Some(Active));
    }

    #[test]
    fn restarted_primary_comes_back_passive() {
        let mut pair = Pair::new();
        pair.run(2 * HB);
        pair.primary = None;
        pair.run(4 * HB);
        let now = pair.now;
        assert!(Pair::client(&mut pair.backup, now));
        pair.backup_epoch_ahead = true;
        pair.primary = Some(BinaryStar::new(Role::Primary, HB));
        pair.run(2 * HB);
        assert_eq!(Pair::state(&pair.primary), Some(Passive));
        assert_eq!(Pair::state(&pair.backup), Some(Active));
        let now = pair.now;
        assert!(!Pair::client(&mut pair.primary, now));
        assert!(Pair::client(&mut pair.backup, now));
    }

    #[test]
    fn restarted_backup_rejoins_as_passive() {
        let mut pair = Pair::new();
        pair.run(2 * HB);
        pair.backup = None;
        pair.run(4 * HB);
        pair.backup = Some(BinaryStar::new(Role::Backup, HB));
        pair.run(2 * HB);
        assert_eq!(Pair::state(&pair.primary), Some(Active));
        assert_eq!(Pair::state(&pair.backup), Some(Passive));
    }

    #[test]
    fn healed_partition_converges_on_the_higher_epoch() {
        let mut pair = Pair::new();
        pair.run(2 * HB);
        pair.link_up = false;
        pair.run(4 * HB);
        let now = pair.now;
        assert!(
            Pair::client(&mut pair.backup, now),
            "backup takes over during partition"
        );
        assert!(
            Pair::client(&mut pair.primary, now),
            "primary keeps serving its clients"
        );
        pair.backup_epoch_ahead = true; // the backup took over: a newer epoch
        pair.link_up = true;
        pair.run(2 * HB);
        assert_eq!(Pair::state(&pair.primary), Some(Passive));
        assert_eq!(Pair::state(&pair.backup), Some(Active));
    }

    #[test]
    fn a_passive_that_is_not_caught_up_never_takes_over() {
        let mut n = BinaryStar::new(Role::Backup, HB);
        n.handle(0, Event::Peer { state: Active, outranks: true });
        assert_eq!(n.state(), Passive);
        assert!(!n.handle(10 * HB, Event::ClientRequest { complete: false }).accepted);
        assert!(n.handle(10 * HB, Event::ClientRequest { complete: true }).accepted);
    }

    #[test]
    fn a_primary_with_older_data_yields_to_the_backup() {
        let mut p = BinaryStar::new(Role::Primary, HB);
        let mut b = BinaryStar::new(Role::Backup, HB);
        p.handle(0, Event::Peer { state: Backup, outranks: true });
        b.handle(0, Event::Peer { state: Primary, outranks: false });
        assert_eq!((p.state(), b.state()), (Passive, Active));
        p.handle(HB, Event::Peer { state: Active, outranks: true });
        assert_eq!(p.state(), Passive);
    }

    #[test]
    fn of_two_passive_nodes_the_higher_ranked_takes_the_lead() {
        let mut n = BinaryStar::new(Role::Backup, HB);
        n.handle(0, Event::Peer { state: Active, outranks: true });
        assert_eq!(n.state(), Passive);
        n.handle(HB, Event::Peer { state: Passive, outranks: true });
        assert_eq!(n.state(), Passive);
        n.handle(2 * HB, Event::Peer { state: Passive, outranks: false });
        assert_eq!(n.state(), Active);
    }

    #[test]
    fn at_most_one_node_serves_at_a_time_while_the_link_is_up() {
        // A small deterministic sweep of crash/restart schedules.
        for crash_at in 1..8u64 {
            for restart_after in 1..8u64 {
                let mut pair = Pair::new();
                for step in 0..40u64 {
                    if step == crash_at {
                        pair.primary = None;
                    }
                    if step == crash_at + restart_after {
                        pair.primary = Some(BinaryStar::new(Role::Primary, HB));
                    }
                    pair.run(HB);
                    let now = pair.now;
                    let p = Pair::client(&mut pair.primary, now);
                    let b = Pair::client(&mut pair.backup, now);
                    assert!(
                        !(p && b),
                        "both serve at step {step} (crash {crash_at}, restart +{restart_after})"
                    );
                }
                let states = (Pair::state(&pair.primary), Pair::state(&pair.backup));
                assert!(
                    states == (Some(Active), Some(Passive))
                        || states == (Some(Passive), Some(Active)),
                    "unsettled pair {states:?}"
                );
            }
        }
    }
}
