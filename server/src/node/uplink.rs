//! The node's side of the uplink: what the active may forward (items of
//! committed entries only: durable here and, in sync, at the passive, so
//! the cloud never gets a reading the pair could still lose), and the log
//! record that moves the forwarding position once JetStream has acked.

use fog_protocol::{NodeState, Record};
use tracing::warn;

use super::Node;
use crate::clock::Now;
use crate::outbox::{Item, Outbox};

impl Node {
    /// What the site owes the cloud.
    pub fn outbox(&self) -> &Outbox {
        &self.replica.outbox
    }

    /// Items after site sequence `after` that may leave now: none unless
    /// this node is active.
    pub fn uplink_owed(&self, after: u64) -> impl Iterator<Item = &Item> {
        let commit = if self.fsm.state() == NodeState::Active { self.commit_lsn() } else { 0 };
        self.replica.outbox.after(after, commit)
    }

    /// JetStream's stream of the site ends at site item `through` (chain
    /// value `chain`) and holds every item from `landed_from` to it: an
    /// active writes it to the log (replicated like any entry), so a
    /// restart or a new active resumes after it. A position beyond what
    /// this node has given out is not taken (the stream holds items of a
    /// branch this node never had; the uplink's check refuses it).
    pub fn handle_uplink_acked(&mut self, now: Now, through: u64, chain: u64, landed_from: u64) {
        let now = self.observe_time(now);
        if self.fsm.state() != NodeState::Active {
            return;
        }
        let last = self.replica.outbox.last_seq();
        if through > last {
            warn!(through, last, "the cloud stream is ahead of this site's outbox: not taking its position");
            return;
        }
        if through > self.replica.outbox.acked_through() {
            self.append(now, Record::UplinkAcked { through, chain, landed_from });
        }
    }
}
