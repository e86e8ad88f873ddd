//! The fog roadside speed sensor.
//!
//! [`SensorCore`] is the sensor's logic as a plain struct (traffic model,
//! resend buffer, average cursor, advisory limit, snapshots) that native
//! tests drive directly. On `wasm32`, `component` wraps it in the
//! `fog:sensor` WIT world so a host runs it as a sandboxed component; the
//! WIT types never leak into the core.

pub mod alloc;
pub mod averages;
pub mod core;
pub mod glue;
pub mod limit;
pub mod resend;
pub mod rng;
pub mod snapshot;
pub mod traffic;

// The component glue is optional so that other sensors (see `sensors/`)
// can build on the core and export the world themselves.
#[cfg(all(target_arch = "wasm32", feature = "component"))]
mod component;

pub use fog_core::{Average, AverageCursor, Reading};
pub use crate::core::{SensorConfig, SensorCore, Status, incarnation};
pub use crate::snapshot::{RestoreError, SNAPSHOT_VERSION};
pub use crate::traffic::{SettingsError, SpeedRange, TrafficModel};
