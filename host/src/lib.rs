//! `fog-host`: runs many sandboxed sensor components in one process and
//! connects them to a fog server pair.
//!
//! - [`runtime`] holds the one Engine and Linker (pooling allocator, memory
//!   cap, call deadlines), loads components into an `InstancePre` and
//!   instantiates one Store per sensor;
//! - [`fleet`] ticks the sensors, batches their readings, routes replies,
//!   restarts or quarantines sensors that fail, and swaps the component;
//! - [`state`] keeps the sensors' snapshots in `--state-dir` (group commit);
//! - [`link`] is one DEALER connection to one server;
//! - [`session`] drives it all: ticks, batches, timeouts and failover.

pub mod fleet;
pub mod link;
pub mod runtime;
pub mod session;
pub mod state;
