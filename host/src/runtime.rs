//! The WebAssembly side of the host: one wasmtime `Engine`, one `Linker` and
//! one `InstancePre` for the sensor component, and one `Store` per sensor.
//!
//! The component gets all of WASI Preview 2 linked (other toolchains import
//! it even for pure logic) but is granted nothing: no directories, sockets,
//! environment or stdin. Its clock, seed and configuration come through the
//! `fog:sensor/environment` imports, served from the store's data.

use std::path::Path;

use wasmtime::component::{Component, HasSelf, Linker, ResourceTable};
use wasmtime::{Config, Engine, Store, StoreLimits, StoreLimitsBuilder};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

wasmtime::component::bindgen!({ path: "../wit", world: "sensor" });

pub use fog::sensor::types::{Average as WitAverage, Config as SensorConfig, Reading as WitReading, Status as SensorStatus};

/// The WIT world every sensor component must implement.
pub const WORLD: &str = "fog:sensor/sensor@0.1.0";

/// The component built from this repository's `sensor-wasm`.
pub const BUILTIN_SENSOR: &[u8] = include_bytes!(env!("FOG_SENSOR_WASM"));

/// Why a component cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot read component {path}: {reason}")]
    Read { path: String, reason: String },
    #[error("{path} is not a WebAssembly file (it does not start with the \\0asm header)")]
    NotWasm { path: String },
    #[error("{path} is a core WebAssembly module, not a component: build it for wasm32-wasip2 (or wrap it with `wasm-tools component new`)")]
    CoreModule { path: String },
    #[error("{path} is not a WebAssembly component: {reason}")]
    NotAComponent { path: String, reason: String },
    #[error("{path} does not implement the world {WORLD}: {reason}")]
    WrongWorld { path: String, reason: String },
    #[error("cannot set up the WebAssembly engine: {0}")]
    Engine(String),
}

/// Per-sensor state living in its `Store`.
pub struct SensorHost {
    wasi: WasiCtx,
    table: ResourceTable,
    limits: StoreLimits,
    pub config: SensorConfig,
    pub seed: u64,
}

impl WasiView for SensorHost {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView { ctx: &mut self.wasi, table: &mut self.table }
    }
}

impl fog::sensor::types::Host for SensorHost {}

impl fog::sensor::environment::Host for SensorHost {
    fn now_ms(&mut self) -> u64 {
        crate::clock::now_ms()
    }
    fn seed(&mut self) -> u64 {
        self.seed
    }
    fn sensor_config(&mut self) -> SensorConfig {
        self.config.clone()
    }
}

/// Sandbox limits applied to every sensor instance.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest linear memory one instance may grow to, in bytes.
    pub max_memory_bytes: usize,
}

/// A compiled sensor component, ready to be instantiated many times.
pub struct SensorRuntime {
    engine: Engine,
    pre: SensorPre<SensorHost>,
    limits: Limits,
    /// Where the component came from, for messages.
    pub origin: String,
}

/// One running sensor instance.
pub struct SensorInstance {
    pub store: Store<SensorHost>,
    pub bindings: Sensor,
}

impl SensorRuntime {
    /// Loads the component at `path`, or the built-in sensor when `None`.
    pub fn load(path: Option<&Path>, limits: Limits) -> Result<Self, LoadError> {
        let (origin, bytes) = match path {
            None => ("built-in sensor".to_string(), BUILTIN_SENSOR.to_vec()),
            Some(p) => {
                let origin = p.display().to_string();
                let bytes = std::fs::read(p).map_err(|e| LoadError::Read { path: origin.clone(), reason: e.to_string() })?;
                (origin, bytes)
            }
        };
        Self::from_bytes(origin, &bytes, limits)
    }

    pub fn from_bytes(origin: String, bytes: &[u8], limits: Limits) -> Result<Self, LoadError> {
        // A core module has version 1 in its preamble; a component has the
        // component-model layer there.
        if !bytes.starts_with(b"\0asm") {
            return Err(LoadError::NotWasm { path: origin });
        }
        if bytes.len() >= 8 && bytes[4..8] == [1, 0, 0, 0] {
            return Err(LoadError::CoreModule { path: origin });
        }
        let mut config = Config::new();
        config.wasm_component_model(true);
        let engine = Engine::new(&config).map_err(|e| LoadError::Engine(format!("{e:#}")))?;
        let component = Component::from_binary(&engine, bytes)
            .map_err(|e| LoadError::NotAComponent { path: origin.clone(), reason: one_line(&e) })?;
        let mut linker: Linker<SensorHost> = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_sync(&mut linker).map_err(|e| LoadError::Engine(format!("{e:#}")))?;
        Sensor::add_to_linker::<SensorHost, HasSelf<SensorHost>>(&mut linker, |h| h)
            .map_err(|e| LoadError::Engine(format!("{e:#}")))?;
        let instance_pre = linker
            .instantiate_pre(&component)
            .map_err(|e| LoadError::WrongWorld { path: origin.clone(), reason: one_line(&e) })?;
        let pre = SensorPre::new(instance_pre)
            .map_err(|e| LoadError::WrongWorld { path: origin.clone(), reason: one_line(&e) })?;
        Ok(Self { engine, pre, limits, origin })
    }

    /// Instantiates one sensor; the caller then calls `init`.
    pub fn instantiate(&self, config: SensorConfig, seed: u64) -> wasmtime::Result<SensorInstance> {
        let host = SensorHost {
            // Nothing granted: no preopens, env, args, sockets or stdio.
            wasi: WasiCtx::builder().build(),
            table: ResourceTable::new(),
            limits: StoreLimitsBuilder::new().memory_size(self.limits.max_memory_bytes).trap_on_grow_failure(true).build(),
            config,
            seed,
        };
        let mut store = Store::new(&self.engine, host);
        store.limiter(|h| &mut h.limits);
        let bindings = self.pre.instantiate(&mut store)?;
        Ok(SensorInstance { store, bindings })
    }
}

/// An error and its causes on one line.
pub fn one_line(e: &wasmtime::Error) -> String {
    format!("{e:#}").replace('\n', " ")
}
