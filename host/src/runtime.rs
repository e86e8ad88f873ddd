//! The WebAssembly side of the host: one wasmtime `Engine` and `Linker` for
//! the whole process, one `InstancePre` per loaded sensor component, and one
//! `Store` per sensor.
//!
//! Density comes from the pooling allocator: the engine reserves address
//! space for every instance up front (sized from the number of sensors), so
//! instantiating is a few microseconds of copying and each sensor costs the
//! pages it touches. Isolation comes from two limits on every instance: a
//! cap on linear memory (growing past it traps) and a deadline on every call
//! (epoch interruption, advanced by a ticker thread), so a guest that loops
//! forever is stopped instead of stalling every other sensor.
//!
//! The component gets all of WASI Preview 2 linked (other toolchains import
//! it even for pure logic) but is granted nothing: no directories, sockets,
//! environment or stdin. Its clock, seed and configuration come through the
//! `fog:sensor/environment` imports, served from the store's data.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use wasmtime::component::{Component, HasSelf, Linker, ResourceTable};
use wasmtime::{
    Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig, Store, StoreLimits, StoreLimitsBuilder,
};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

wasmtime::component::bindgen!({ path: "../wit", world: "sensor" });

pub use fog::sensor::types::{
    Average as WitAverage, Config as SensorConfig, Cursor as WitCursor, Reading as WitReading, Status as SensorStatus,
};

/// The WIT world every sensor component must implement.
pub const WORLD: &str = "fog:sensor/sensor@0.2.0";

/// The component built from this repository's `sensor-wasm`.
pub const BUILTIN_SENSOR: &[u8] = include_bytes!(env!("FOG_SENSOR_WASM"));

/// How often the engine's epoch advances: the granularity of call deadlines.
const EPOCH_TICK: Duration = Duration::from_millis(5);

/// A wasm32-wasip2 component carries the WASI adapter: 3 core instances and
/// 2 memories for one sensor. The pool is sized with room above that, since
/// other toolchains nest a few more (it costs address space, not memory).
const CORE_INSTANCES_PER_SENSOR: u32 = 6;
const MEMORIES_PER_SENSOR: u32 = 3;
const TABLES_PER_SENSOR: u32 = 6;

// The WIT records and the domain's plain types carry the same fields.

impl From<&fog_protocol::Average> for WitAverage {
    fn from(a: &fog_protocol::Average) -> WitAverage {
        WitAverage {
            seq: a.seq,
            epoch: a.epoch,
            segment: a.segment,
            window_end_ms: a.window_end_ms,
            count: a.count,
            sum_kmh: a.sum_kmh,
            mean_kmh: a.mean_kmh(),
            revision: a.revision,
            chain: a.chain,
        }
    }
}

impl From<&WitAverage> for fog_protocol::Average {
    fn from(a: &WitAverage) -> fog_protocol::Average {
        fog_protocol::Average {
            seq: a.seq,
            epoch: a.epoch,
            segment: a.segment,
            window_end_ms: a.window_end_ms,
            count: a.count,
            sum_kmh: a.sum_kmh,
            revision: a.revision,
            chain: a.chain,
        }
    }
}

impl From<fog_protocol::AverageCursor> for WitCursor {
    fn from(c: fog_protocol::AverageCursor) -> WitCursor {
        WitCursor { seq: c.seq, epoch: c.epoch, chain: c.chain }
    }
}

impl From<WitCursor> for fog_protocol::AverageCursor {
    fn from(c: WitCursor) -> fog_protocol::AverageCursor {
        fog_protocol::AverageCursor { seq: c.seq, epoch: c.epoch, chain: c.chain }
    }
}

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
    /// Wall-clock time: what readings are stamped with (event time).
    fn now_ms(&mut self) -> u64 {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    }
    fn seed(&mut self) -> u64 {
        self.seed
    }
    fn sensor_config(&mut self) -> SensorConfig {
        self.config.clone()
    }
}

/// Sandbox limits applied to every sensor instance, and the size of the
/// instance pool.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest linear memory one instance may grow to, in bytes.
    pub max_memory_bytes: usize,
    /// Longest one call into a sensor may run before it is interrupted.
    pub call_deadline: Duration,
    /// Sensor instances the pool holds at once. A hot swap briefly needs
    /// two instances per sensor, so the host asks for twice its fleet.
    pub max_instances: u32,
}

impl Limits {
    /// The flag that raises each limit, for error messages.
    pub const MEMORY_FLAG: &'static str = "--max-memory-mib";
    pub const DEADLINE_FLAG: &'static str = "--call-deadline";
}

/// The process's one engine and linker, and the thread that advances the
/// engine's epoch for call deadlines.
pub struct SensorEngine {
    engine: Engine,
    linker: Linker<SensorHost>,
    limits: Limits,
    deadline_ticks: u64,
    ticker_stop: Arc<AtomicBool>,
}

/// A compiled sensor component, ready to be instantiated many times.
pub struct SensorComponent {
    pre: SensorPre<SensorHost>,
    /// Where the component came from, for messages.
    pub origin: String,
}

/// One running sensor instance.
pub struct SensorInstance {
    store: Store<SensorHost>,
    bindings: Sensor,
    deadline_ticks: u64,
}

impl SensorEngine {
    pub fn new(limits: Limits) -> Result<Self, LoadError> {
        let engine_err = |e: wasmtime::Error| LoadError::Engine(one_line(&e));
        let memory = limits.max_memory_bytes as u64;
        let mut pool = PoolingAllocationConfig::default();
        let instances = limits.max_instances.max(1);
        pool.total_component_instances(instances)
            .total_core_instances(instances.saturating_mul(CORE_INSTANCES_PER_SENSOR))
            .total_memories(instances.saturating_mul(MEMORIES_PER_SENSOR))
            .total_tables(instances.saturating_mul(TABLES_PER_SENSOR))
            .table_elements(10_000)
            .max_memory_size(limits.max_memory_bytes)
            // Calls are synchronous: guests run on the host thread's stack.
            .total_stacks(0);
        let mut config = Config::new();
        config
            .wasm_component_model(true)
            .allocation_strategy(InstanceAllocationStrategy::Pooling(pool))
            .epoch_interruption(true)
            // Reserve exactly the cap: no guard region and no room to grow
            // beyond it. Bounds checks become explicit, which for small
            // sensors costs less than tens of thousands of 4 GiB reservations.
            .memory_reservation(memory)
            .memory_guard_size(0)
            .memory_reservation_for_growth(0);
        let engine = Engine::new(&config).map_err(engine_err)?;
        let mut linker: Linker<SensorHost> = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_sync(&mut linker).map_err(engine_err)?;
        Sensor::add_to_linker::<SensorHost, HasSelf<SensorHost>>(&mut linker, |h| h).map_err(engine_err)?;

        let ticker_stop = Arc::new(AtomicBool::new(false));
        let (ticker_engine, stop) = (engine.clone(), ticker_stop.clone());
        std::thread::Builder::new()
            .name("epoch-ticker".into())
            .spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    std::thread::sleep(EPOCH_TICK);
                    ticker_engine.increment_epoch();
                }
            })
            .map_err(|e| LoadError::Engine(format!("cannot start the epoch ticker thread: {e}")))?;
        // One tick more than the deadline: the current tick may be about to end.
        let deadline_ticks = limits.call_deadline.as_nanos().div_ceil(EPOCH_TICK.as_nanos()).max(1) as u64 + 1;
        Ok(Self { engine, linker, limits, deadline_ticks, ticker_stop })
    }

    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// Loads the component at `path`, or the built-in sensor when `None`.
    pub fn load(&self, path: Option<&Path>) -> Result<SensorComponent, LoadError> {
        let (origin, bytes) = match path {
            None => ("built-in sensor".to_string(), BUILTIN_SENSOR.to_vec()),
            Some(p) => {
                let origin = p.display().to_string();
                let bytes = std::fs::read(p).map_err(|e| LoadError::Read { path: origin.clone(), reason: e.to_string() })?;
                (origin, bytes)
            }
        };
        self.from_bytes(origin, &bytes)
    }

    /// Compiles a component and checks that it implements the sensor world.
    pub fn from_bytes(&self, origin: String, bytes: &[u8]) -> Result<SensorComponent, LoadError> {
        // A core module has version 1 in its preamble; a component has the
        // component-model layer there.
        if !bytes.starts_with(b"\0asm") {
            return Err(LoadError::NotWasm { path: origin });
        }
        if bytes.len() >= 8 && bytes[4..8] == [1, 0, 0, 0] {
            return Err(LoadError::CoreModule { path: origin });
        }
        let component = Component::from_binary(&self.engine, bytes)
            .map_err(|e| LoadError::NotAComponent { path: origin.clone(), reason: one_line(&e) })?;
        let instance_pre = self
            .linker
            .instantiate_pre(&component)
            .map_err(|e| LoadError::WrongWorld { path: origin.clone(), reason: one_line(&e) })?;
        let pre = SensorPre::new(instance_pre)
            .map_err(|e| LoadError::WrongWorld { path: origin.clone(), reason: one_line(&e) })?;
        Ok(SensorComponent { pre, origin })
    }

    /// Instantiates one sensor; the caller then calls `init` or `restore`.
    pub fn instantiate(
        &self,
        component: &SensorComponent,
        config: SensorConfig,
        seed: u64,
    ) -> wasmtime::Result<SensorInstance> {
        let host = SensorHost {
            // Nothing granted: no preopens, env, args, sockets or stdio.
            wasi: WasiCtx::builder().build(),
            table: ResourceTable::new(),
            limits: StoreLimitsBuilder::new()
                .memory_size(self.limits.max_memory_bytes)
                .trap_on_grow_failure(true)
                .build(),
            config,
            seed,
        };
        let mut store = Store::new(&self.engine, host);
        store.limiter(|h| &mut h.limits);
        // Instantiation runs the component's start functions: deadline them too.
        store.set_epoch_deadline(self.deadline_ticks);
        let bindings = component.pre.instantiate(&mut store)?;
        Ok(SensorInstance { store, bindings, deadline_ticks: self.deadline_ticks })
    }
}

impl Drop for SensorEngine {
    fn drop(&mut self) {
        self.ticker_stop.store(true, Ordering::Relaxed);
    }
}

/// Every export of the sensor world, each call under the call deadline.
impl SensorInstance {
    /// Starts the deadline for the next call.
    fn arm(&mut self) {
        self.store.set_epoch_deadline(self.deadline_ticks);
    }

    pub fn init(&mut self) -> wasmtime::Result<u64> {
        self.arm();
        self.bindings.call_init(&mut self.store)
    }

    pub fn tick(&mut self, produce: bool) -> wasmtime::Result<TickResult> {
        self.arm();
        self.bindings.call_tick(&mut self.store, produce)
    }

    pub fn on_ack(&mut self, incarnation: u64, next_seq: u64, also: &[u64]) -> wasmtime::Result<()> {
        self.arm();
        self.bindings.call_on_ack(&mut self.store, incarnation, next_seq, also)
    }

    pub fn on_averages(&mut self, averages: &[WitAverage]) -> wasmtime::Result<Option<WitCursor>> {
        self.arm();
        self.bindings.call_on_averages(&mut self.store, averages)
    }

    pub fn on_reposition(&mut self, rewind_to: Option<u64>, to: WitCursor) -> wasmtime::Result<Option<WitCursor>> {
        self.arm();
        self.bindings.call_on_reposition(&mut self.store, rewind_to, to)
    }

    pub fn status(&mut self) -> wasmtime::Result<SensorStatus> {
        self.arm();
        self.bindings.call_status(&mut self.store)
    }

    pub fn snapshot(&mut self) -> wasmtime::Result<Vec<u8>> {
        self.arm();
        self.bindings.call_snapshot(&mut self.store)
    }

    /// `Ok(Err(reason))` when the sensor refused the snapshot.
    pub fn restore(&mut self, state: &[u8]) -> wasmtime::Result<Result<(), String>> {
        self.arm();
        self.bindings.call_restore(&mut self.store, state)
    }
}

/// What went wrong in a failed guest call, in words an operator can act on.
pub fn describe_failure(e: &wasmtime::Error, limits: &Limits) -> String {
    if let Some(trap) = e.downcast_ref::<wasmtime::Trap>() {
        if *trap == wasmtime::Trap::Interrupt {
            return format!(
                "ran past the {:?} call deadline (stuck in a loop?); raise {} if it needs longer",
                limits.call_deadline,
                Limits::DEADLINE_FLAG
            );
        }
        // The trap itself; the wasm backtrace around it names only
        // function indices, which tell an operator nothing.
        return format!("trapped: {trap}");
    }
    let text = one_line(e);
    if text.contains("forcing trap when growing memory") || text.contains("forcing a memory growth failure") {
        return format!(
            "tried to grow its memory past the {} MiB limit; raise {} if it needs more",
            limits.max_memory_bytes >> 20,
            Limits::MEMORY_FLAG
        );
    }
    format!("trapped: {text}")
}

/// Why instantiating failed, with the remedy when the cause is a known limit.
pub fn describe_instantiate_failure(e: &wasmtime::Error, limits: &Limits, sensors: u32) -> String {
    let text = one_line(e);
    if text.contains("Cannot allocate memory") || text.contains("os error 12") {
        let current = std::fs::read_to_string("/proc/sys/vm/max_map_count").unwrap_or_default();
        // About four mappings per instance, twice for a hot swap, and room.
        let wanted = (u64::from(sensors) * 16).max(262_144).next_power_of_two();
        return format!(
            "{text}: the kernel refused more memory mappings (vm.max_map_count is {}); \
             raise it with `sysctl -w vm.max_map_count={wanted}` (as root) or run fewer sensors per host",
            current.trim()
        );
    }
    if text.contains("exceeds the configured maximum") || text.contains("maximum memory size") || text.contains("minimum memory size") {
        return format!("{text}: the component needs more memory than the {} MiB limit; raise {}", limits.max_memory_bytes >> 20, Limits::MEMORY_FLAG);
    }
    text
}

/// An error and its causes on one line.
pub fn one_line(e: &wasmtime::Error) -> String {
    format!("{e:#}").replace('\n', " ")
}
