//! Who leads, and in which epoch: the heartbeat a node sends and how it
//! ranks itself against its peer's, the FSM steps that follow, taking over
//! with a new epoch, stepping down (on a newer epoch, or after a pause),
//! and which epochs count as evidence: the peer's, and a host's only with
//! the pair's seal of it.

use fog_protocol::{MAX_EPOCH, NodeState, PeerHeartbeat, Record, Seal};
use tracing::{error, info, warn};

use super::Node;
use crate::clock::Now;
use crate::fsm::{Event, Role, Step};

/// A clock jump of this many heartbeats means the node was paused.
const PAUSE_HEARTBEATS: u64 = 4;

impl Node {
    pub(super) fn heartbeat(&self) -> PeerHeartbeat {
        PeerHeartbeat {
            state: self.fsm.state(),
            epoch: self.known_epoch,
            lsn: self.replica.lsn,
            complete: self.complete(),
            peer_in_sync: self.passive.is_some(),
        }
    }

    /// Whether this node could serve with the data it has.
    pub(super) fn complete(&self) -> bool {
        self.fsm.state() != NodeState::Passive || self.caught_up
    }

    /// The order in which nodes take the lead: complete before incomplete,
    /// then newer epoch, then longer log, then the primary.
    fn outranked_by(&self, peer: &PeerHeartbeat) -> bool {
        let mine = (self.complete(), self.known_epoch, self.replica.lsn, self.role() == Role::Primary);
        let theirs = (peer.complete, peer.epoch, peer.lsn, self.role() != Role::Primary);
        theirs > mine
    }

    /// Takes the time of an event: notices a pause (a jump of the
    /// monotonic clock by several heartbeats between two events means this
    /// process was stopped, and the peer may have taken over meanwhile),
    /// keeps the wall-clock time for event time, and returns the monotonic
    /// time, which is what the node's liveness runs on.
    pub(super) fn observe_time(&mut self, now: Now) -> u64 {
        self.wall_ms = now.wall_ms;
        let mono = now.mono_ms;
        let limit = PAUSE_HEARTBEATS * self.cfg.heartbeat_ms;
        if self.mono_ms != 0 && mono > self.mono_ms.saturating_add(limit) {
            self.fsm.restart_peer_expiry(mono);
            if self.fsm.state() == NodeState::Active {
                let paused = mono.saturating_sub(self.mono_ms);
                self.step_down(mono, true, &format!("this node was paused for {paused} ms: stepping down until it hears its peer"));
            }
        }
        self.mono_ms = self.mono_ms.max(mono);
        self.mono_ms
    }

    fn log_step(&self, step: &Step) {
        match (step.note, step.accepted) {
            (Some(note), false) => warn!(from = step.from.as_str(), to = step.to.as_str(), epoch = self.known_epoch, "{note}"),
            (Some(note), true) => info!(from = step.from.as_str(), to = step.to.as_str(), epoch = self.known_epoch, "{note}"),
            (None, _) if step.changed() => info!("state {} -> {}", step.from.as_str(), step.to.as_str()),
            (None, _) => {}
        }
    }

    /// After an FSM step: a new active takes a new epoch; an active that
    /// lost the lead drops what it held.
    pub(super) fn after_step(&mut self, now: u64, step: Step) {
        self.log_step(&step);
        if step.to == NodeState::Active && step.from != NodeState::Active {
            self.take_over(now);
        } else if step.from == NodeState::Active && step.to != NodeState::Active {
            self.stepped_down(false);
        }
    }

    fn take_over(&mut self, now: u64) {
        // The primary takes odd epochs and the backup even ones, so two
        // nodes that take over from the same epoch (cut off from each
        // other) never share one: an epoch names one node's reign.
        let parity = u64::from(self.role() == Role::Primary);
        let next = self
            .known_epoch
            .checked_add(1)
            .and_then(|e| if e % 2 == parity { Some(e) } else { e.checked_add(1) })
            .filter(|&e| e < MAX_EPOCH);
        let Some(epoch) = next else {
            // Unreachable while every epoch heard is below MAX_EPOCH; were
            // it reached, serving under a wrapped epoch would be worse.
            error!(epoch = self.known_epoch, "no epoch left to take over with");
            self.step_down(now, true, "no epoch left to take over with: stepping down");
            return;
        };
        self.known_epoch = epoch;
        self.passive = None;
        self.tail.clear();
        self.merging = None;
        self.last_join_ms = None;
        info!(epoch, lsn = self.replica.lsn, "serving as active in epoch {epoch}");
        self.append(now, Record::EpochChanged { epoch });
    }

    fn step_down(&mut self, now: u64, keep_caught_up: bool, why: &str) {
        let step = self.fsm.step_down();
        let _ = now;
        if step.from == NodeState::Active {
            warn!(epoch = self.known_epoch, "{why}");
            self.stepped_down(keep_caught_up);
        } else {
            self.caught_up &= keep_caught_up;
        }
    }

    fn stepped_down(&mut self, keep_caught_up: bool) {
        // Replies not yet released were never acked; hosts send them again.
        self.held.clear();
        self.passive = None;
        self.tail.clear();
        self.caught_up = keep_caught_up;
        self.last_join_ms = None;
    }

    /// The pair's seal of the epoch this node names in its replies.
    pub(super) fn seal_of_known_epoch(&self) -> Seal {
        self.seal.seal(self.known_epoch)
    }

    /// A host's epoch: evidence (and a reason to step down) only with the
    /// pair's seal of it; otherwise ignored and counted. Epoch 0 is a host
    /// that has seen no reply yet, and needs no seal.
    pub(super) fn host_epoch(&mut self, now: u64, epoch: u64, seal: &Seal) {
        if epoch == 0 {
            return;
        }
        if !self.seal.verify(epoch, seal) {
            self.forged_epochs = self.forged_epochs.saturating_add(1);
            return;
        }
        self.newer_epoch(now, epoch, "a host has seen");
    }

    /// Steps down (if active) when `epoch` is newer than any known.
    /// `source` says who showed it ("the peer is in", "a host has seen" ...).
    /// An epoch at or above [`MAX_EPOCH`] is evidence from no one: counted,
    /// and ignored.
    pub(super) fn newer_epoch(&mut self, now: u64, epoch: u64, source: &str) -> bool {
        if epoch <= self.known_epoch {
            return false;
        }
        if epoch >= MAX_EPOCH {
            self.forged_epochs = self.forged_epochs.saturating_add(1);
            return false;
        }
        self.known_epoch = epoch;
        self.step_down(now, false, &format!("{source} epoch {epoch}: stepping down"));
        true
    }

    pub(super) fn handle_heartbeat(&mut self, now: u64, hb: PeerHeartbeat) {
        self.peer = Some(hb);
        self.newer_epoch(now, hb.epoch, "the peer is in");
        if self.passive.is_some() && matches!(hb.state, NodeState::Primary | NodeState::Backup) {
            warn!("the passive restarted: carrying on alone until it has joined again");
            self.go_solo();
        }
        if self.fsm.state() == NodeState::Passive && hb.state == NodeState::Active && self.caught_up && !hb.peer_in_sync && self.last_join_ms.is_none() {
            // The active does not count this node as in sync (it went on
            // alone, or this node stepped down to it): join again.
            self.caught_up = false;
        }
        let outranks = self.outranked_by(&hb);
        let step = self.fsm.handle(now, Event::Peer { state: hb.state, outranks });
        self.after_step(now, step);
        if self.fsm.state() == NodeState::Passive && hb.state == NodeState::Active && !self.caught_up {
            self.rejoin(now);
        }
    }
}
