//! `fog-server`: one node of a Binary Star pair that acks, deduplicates and
//! averages the readings of roadside speed sensors.
//!
//! The protocol logic is sans-IO and driven with explicit time, on two
//! clocks ([`clock`]: monotonic for liveness, wall for event time):
//! [`fsm`] (Binary Star states), [`ingest`] (exactly-once counting and acks),
//! [`windows`] (event-time averages), [`average_log`] (the published
//! averages that sensors follow with their cursors), [`replica`] (the
//! replicated state, changed only by log entries) and [`node`], which puts
//! them and the replication protocol behind one interface of events in and
//! outputs out. [`seal`] seals the epochs a node hands hosts. [`wal`] keeps the log and snapshots on disk. [`driver`] is
//! the thin tokio + ZeroMQ shell that runs a node as a process, and
//! [`status`] is the client behind `fog-server status`; [`edge`] decides
//! what an authenticated client may ask.

pub mod average_log;
pub mod clock;
pub mod driver;
pub mod edge;
mod frontend;
mod metrics;
pub mod fsm;
pub mod ingest;
pub mod node;
pub mod outbox;
pub mod replica;
pub mod seal;
pub mod status;
pub mod uplink;
pub mod wal;
pub mod windows;

pub use clock::{Clock, Now};
pub use driver::{ServerConfig, ServerError, run};
pub use fsm::{BinaryStar, Role};
pub use node::{ClientToken, Node, NodeConfig, Output};
pub use wal::FsyncPolicy;
pub use edge::Security;
pub use status::{ClientKeys, StatusError, describe_replication, human_summary, query_status, query_status_blocking};
pub use windows::WindowConfig;
