//! `fog-host`: runs many sandboxed sensor components in one process and
//! connects them to a fog server pair.
//!
//! - [`runtime`] loads the component (one Engine, Linker and `InstancePre`)
//!   and instantiates one Store per sensor;
//! - [`fleet`] ticks the sensors, batches their readings and routes replies;
//! - [`link`] is one DEALER connection to one server;
//! - [`session`] drives it all: ticks, batches, timeouts and failover.

pub mod clock;
pub mod fleet;
pub mod link;
pub mod runtime;
pub mod session;
