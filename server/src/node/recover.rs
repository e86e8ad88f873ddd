//! The local snapshot and recovery: what a snapshot file holds (the
//! replicated state and the readings accepted alone), when the node writes
//! one, and how a node is rebuilt from it and the log entries after it.

use fog_protocol::{LogEntry, Record, SensorBatch};
use serde::{Deserialize, Serialize};
use tracing::{error, warn};

use super::{Node, NodeConfig, Output};
use crate::replica::{Replica, SnapshotError};

/// What a local snapshot file holds: the replicated state, and the readings
/// this node accepted alone that its peer may not have.
/// After it, the replica's outbox (absent in a snapshot from before the
/// uplink: then the outbox is empty).
#[derive(Debug, Deserialize)]
struct LocalSnapshot {
    replica: Replica,
    unconfirmed: Vec<SensorBatch>,
}

/// [`LocalSnapshot`] as it is written, without copying the state.
#[derive(Serialize)]
struct LocalSnapshotRef<'a> {
    replica: &'a Replica,
    unconfirmed: Vec<&'a SensorBatch>,
}

/// Why a node could not be rebuilt from its data directory.
#[derive(Debug, thiserror::Error)]
pub enum RecoverError {
    #[error("snapshot: {0}")]
    Snapshot(#[from] SnapshotError),
    #[error("log entry {lsn}: {why}")]
    Entry { lsn: u64, why: String },
}

impl Node {
    /// Rebuilds a node from a local snapshot (as written by
    /// [`Output::SaveSnapshot`]) and the log entries that follow it. The
    /// readings of those entries count as unconfirmed: the node offers them
    /// to its peer when it rejoins.
    pub fn recover(cfg: NodeConfig, snapshot: Option<&[u8]>, entries: &[LogEntry]) -> Result<Self, RecoverError> {
        let mut node = Node::new(cfg);
        if let Some(bytes) = snapshot {
            let err = |e: postcard::Error| SnapshotError(e.to_string());
            let (local, rest): (LocalSnapshot, &[u8]) = postcard::take_from_bytes(bytes).map_err(err)?;
            node.replica = local.replica;
            // The outbox, then what it took over of other histories (a
            // snapshot from before either has none).
            if !rest.is_empty() {
                let (outbox, rest) = postcard::take_from_bytes(rest).map_err(err)?;
                node.replica.outbox = outbox;
                if !rest.is_empty() {
                    node.replica.outbox.set_adopted_state(postcard::from_bytes(rest).map_err(err)?);
                }
            }
            node.replica.set_config(cfg.windows);
            node.replica.set_outbox(cfg.outbox);
            let lsn = node.replica.lsn;
            node.unconfirmed = local.unconfirmed.into_iter().map(|b| (lsn, b)).collect();
            node.snapshot_lsn = lsn;
        }
        for entry in entries {
            if entry.lsn <= node.replica.lsn {
                continue;
            }
            if let Err(e) = node.replica.apply(entry) {
                match e {
                    crate::replica::ApplyError::OutOfOrder { .. } => {
                        return Err(RecoverError::Entry { lsn: entry.lsn, why: e.to_string() });
                    }
                    crate::replica::ApplyError::Diverged { .. } => {
                        warn!("while replaying the log: {e}");
                        node.divergences += 1;
                    }
                }
            }
            // Whether the peer has an entry is not recorded; merging one it
            // has is harmless (readings are idempotent by id).
            if let Record::ReadingsAccepted { sensors, .. } = &entry.record {
                node.push_unconfirmed(entry.lsn, sensors);
            }
            node.entries_since_snapshot += 1;
        }
        node.known_epoch = node.replica.epoch;
        node.durable_lsn = node.replica.lsn;
        Ok(node)
    }

    pub(super) fn maybe_snapshot(&mut self) {
        if self.entries_since_snapshot < self.cfg.snapshot_every {
            return;
        }
        match self.local_snapshot() {
            Ok(bytes) => {
                self.entries_since_snapshot = 0;
                self.snapshot_lsn = self.replica.lsn;
                self.out.push_back(Output::SaveSnapshot { lsn: self.replica.lsn, bytes });
            }
            Err(e) => error!("cannot encode a snapshot: {e}"),
        }
    }

    /// The local snapshot of a replica just decoded from `peer`'s bytes
    /// ([`Replica::encode`], the replica ending at `replica_end` as
    /// [`Replica::decode_split`] found), with nothing unconfirmed: what
    /// [`Node::local_snapshot`] makes, copied rather than encoded again (a
    /// large state takes a fifth of a second to encode, on a loop that
    /// must keep its heartbeats). Postcard writes the fields in order and
    /// an empty list as one zero byte. `None` for bytes that hold no
    /// outbox (written before the uplink): those are encoded again.
    pub(super) fn local_snapshot_from(peer: &[u8], replica_end: usize) -> Option<Vec<u8>> {
        if replica_end >= peer.len() {
            return None;
        }
        let mut bytes = Vec::with_capacity(peer.len() + 1);
        bytes.extend_from_slice(&peer[..replica_end]);
        bytes.push(0); // unconfirmed: none
        // The outbox and what it took over of other histories, as they came.
        bytes.extend_from_slice(&peer[replica_end..]);
        Some(bytes)
    }

    pub(super) fn local_snapshot(&self) -> Result<Vec<u8>, SnapshotError> {
        let err = |e: postcard::Error| SnapshotError(e.to_string());
        let local = LocalSnapshotRef { replica: &self.replica, unconfirmed: self.unconfirmed.iter().map(|(_, b)| b).collect() };
        let bytes = postcard::to_allocvec(&local).map_err(err)?;
        let bytes = postcard::to_extend(&self.replica.outbox, bytes).map_err(err)?;
        postcard::to_extend(self.replica.outbox.adopted_state(), bytes).map_err(err)
    }
}
