//! What the fleet asks of a sensor, and of the runtime that makes sensors:
//! the calls of the `fog:sensor` world (`wit/sensor.wit`) as two traits.
//!
//! [`crate::runtime`] implements them with wasmtime: a [`SensorEngine`]
//! instantiates a loaded component, one sandboxed store per sensor. The
//! fleet (supervision, batches, reply routing, persistence, hot swap) is
//! written against the traits alone, so it runs just as well against
//! sensors compiled into the process: the whole-system simulation drives
//! the real fleet and the real sensor code natively, on simulated time.
//!
//! Errors are `wasmtime::Error` (an `anyhow::Error`): a failed call, which
//! the fleet's supervisor turns into a stop and a restart.

use crate::runtime::{SensorComponent, SensorConfig, SensorEngine, SensorInstance, SensorStatus, TickResult, WitCursor, WitReading, WitVisit};

/// One running sensor: every export of the `fog:sensor` world.
pub trait SensorCalls: Send {
    /// The sensor's incarnation; idempotent, and after `restore` the
    /// restored one.
    fn init(&mut self) -> wasmtime::Result<u64>;
    /// One visit: its news taken, its readings made; the readings and
    /// the status after it.
    fn tick(&mut self, visit: &WitVisit) -> wasmtime::Result<TickResult>;
    fn on_reposition(&mut self, rewind_to: Option<u64>, to: WitCursor) -> wasmtime::Result<Option<WitCursor>>;
    fn status(&mut self) -> wasmtime::Result<SensorStatus>;
    fn snapshot(&mut self) -> wasmtime::Result<Vec<u8>>;
    /// A snapshot, and the readings that left after it was taken;
    /// `Ok(Err(reason))` when the sensor refused the snapshot.
    fn restore(&mut self, state: &[u8], since: &[WitReading]) -> wasmtime::Result<Result<(), String>>;
}

/// What makes sensors: a loaded program instantiated once per sensor.
pub trait SensorRuntime: Send + Sync + 'static {
    /// A loaded sensor program (shared by the threads of a swap).
    type Component: Sync;
    /// One sensor made from it.
    type Sensor: SensorCalls;

    /// A new sensor; the caller then calls `init`, or `restore` and `init`.
    fn instantiate(&self, component: &Self::Component, config: SensorConfig, seed: u64) -> wasmtime::Result<Self::Sensor>;
    /// Where the component came from, for messages.
    fn origin<'a>(&self, component: &'a Self::Component) -> &'a str;
    /// A failed call, in words an operator can act on.
    fn describe_failure(&self, e: &wasmtime::Error) -> String;
    /// A failed instantiation in a fleet of `sensors`, with the remedy
    /// when the cause is a known limit.
    fn describe_instantiate_failure(&self, e: &wasmtime::Error, sensors: u32) -> String;
}

impl SensorCalls for SensorInstance {
    fn init(&mut self) -> wasmtime::Result<u64> {
        SensorInstance::init(self)
    }
    fn tick(&mut self, visit: &WitVisit) -> wasmtime::Result<TickResult> {
        SensorInstance::tick(self, visit)
    }
    fn on_reposition(&mut self, rewind_to: Option<u64>, to: WitCursor) -> wasmtime::Result<Option<WitCursor>> {
        SensorInstance::on_reposition(self, rewind_to, to)
    }
    fn status(&mut self) -> wasmtime::Result<SensorStatus> {
        SensorInstance::status(self)
    }
    fn snapshot(&mut self) -> wasmtime::Result<Vec<u8>> {
        SensorInstance::snapshot(self)
    }
    fn restore(&mut self, state: &[u8], since: &[WitReading]) -> wasmtime::Result<Result<(), String>> {
        SensorInstance::restore(self, state, since)
    }
}

impl SensorRuntime for SensorEngine {
    type Component = SensorComponent;
    type Sensor = SensorInstance;

    fn instantiate(&self, component: &SensorComponent, config: SensorConfig, seed: u64) -> wasmtime::Result<SensorInstance> {
        SensorEngine::instantiate(self, component, config, seed)
    }
    fn origin<'a>(&self, component: &'a SensorComponent) -> &'a str {
        &component.origin
    }
    fn describe_failure(&self, e: &wasmtime::Error) -> String {
        crate::runtime::describe_failure(e, &self.limits())
    }
    fn describe_instantiate_failure(&self, e: &wasmtime::Error, sensors: u32) -> String {
        let mut limits = self.limits();
        limits.max_instances = sensors;
        crate::runtime::describe_instantiate_failure(e, &limits, sensors)
    }
}
