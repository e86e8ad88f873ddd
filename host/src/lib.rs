//! `fog-host`: runs many sandboxed sensor components in one process and
//! connects them to a fog server pair.
//!
//! - [`runtime`] holds the one Engine and Linker (pooling allocator, memory
//!   cap, call deadlines), loads components into an `InstancePre` and
//!   instantiates one Store per sensor;
//! - [`fleet`] ticks the sensors, batches their readings, routes replies,
//!   restarts or quarantines sensors that fail, and swaps the component;
//! - [`sensor`] is what the fleet asks of a sensor and of the runtime that
//!   makes sensors, as traits (so the fleet also runs native sensors);
//! - [`state`] keeps the sensors' snapshots in `--state-dir` (group commit);
//! - [`link`] is one DEALER connection to one server;
//! - [`core`] decides the conversation with the server pair without I/O:
//!   pacing, resends, failover, epochs, draining;
//! - [`session`] drives it: the core's actions against the link and the fleet.

pub mod core;
pub mod fleet;
pub mod link;
mod metrics;
pub mod runtime;
pub mod sensor;
pub mod session;
pub mod state;
