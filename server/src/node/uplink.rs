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

    /// The stream holds this site's items up to `fork`, then `fork + 1..=end`
    /// of another history (a side that lost a split forwarded them), with
    /// chain value `chain` at `end` and `readings`: an active writes the
    /// readings, then the adoption, to the log (see
    /// [`crate::outbox::Outbox::adopt`]).
    pub fn handle_uplink_adopt(&mut self, now: Now, fork: u64, end: u64, chain: u64, readings: &[fog_protocol::ReadingInCloud]) -> Result<(), String> {
        let now = self.observe_time(now);
        if self.fsm.state() != NodeState::Active {
            return Err("no longer active".into());
        }
        let outbox = &self.replica.outbox;
        if end < fork || fork > outbox.last_seq() || outbox.chain_at(fork).is_none() {
            return Err(format!("cannot take over items {}..={end} after item {fork}: this site's outbox does not end its history there", fork + 1));
        }
        if readings.len() > crate::outbox::MAX_IN_CLOUD {
            return Err(format!("{} readings of another history: more than the {} the site keeps track of", readings.len(), crate::outbox::MAX_IN_CLOUD));
        }
        for chunk in readings.chunks(fog_protocol::MAX_IN_CLOUD_PER_RECORD) {
            self.append(now, Record::UplinkInCloud { readings: chunk.to_vec() });
        }
        self.append(now, Record::UplinkAdopted { fork, end, chain });
        Ok(())
    }
}
