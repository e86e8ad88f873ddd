//! The WebAssembly side of the host: one wasmtime `Engine` and `Linker` for
//! the whole process, one `InstancePre` per loaded sensor component, and one
//! `Store` per sensor.
//!
//! Density comes from the pooling allocator: the engine reserves address
//! space for every instance up front (sized from the number of sensors), so
//! instantiating is a few microseconds of copying and each sensor costs the
//! pages it touches: for the built-in sensor two pages of linear memory
//! (stack, data and heap), the page of the table pool that wit-component's
//! shim fills, a page of the kernel's page tables for its memory slot, and
//! about 9 KB of the host's heap (its `Store` and wasmtime's records of its
//! instances). Isolation comes from two limits on every instance: a
//! cap on linear memory (growing past it traps) and a deadline on every call
//! (epoch interruption, advanced by a ticker thread), so a guest that loops
//! forever is stopped instead of stalling every other sensor.
//!
//! The component gets all of WASI Preview 2 linked (other toolchains import
//! it even for pure logic) but is granted nothing: no directories, sockets,
//! environment or stdin. Its clock, seed and configuration come through the
//! `fog:sensor/environment` imports, served from the store's data.

mod guest_log;
mod needs;
mod visit;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use wasmtime::component::{Component, HasSelf, Linker, ResourceTable};
use wasmtime::{
    Cache, CacheConfig, Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig, Store, StoreLimits,
    StoreLimitsBuilder, UpdateDeadline,
};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

pub use self::guest_log::GuestLog;
pub use self::needs::Needs;

wasmtime::component::bindgen!({ path: "../wit", world: "sensor" });

pub use self::visit::{Average as WitAverage, Visit as WitVisit};
pub use fog::sensor::types::{
    Ack as WitAck, Config as SensorConfig, Cursor as WitCursor, Reading as WitReading, Status as SensorStatus,
};

/// The WIT world every sensor component must implement.
pub const WORLD: &str = "fog:sensor/sensor@0.4.0";

/// The component built from this repository's `sensor-wasm`.
pub const BUILTIN_SENSOR: &[u8] = include_bytes!(env!("FOG_SENSOR_WASM"));

/// How often the engine's epoch advances: the granularity of call deadlines.
const EPOCH_TICK: Duration = Duration::from_millis(5);
/// A call past its deadline on the wall clock is stopped only if it also
/// kept the CPU (see [`Overrun`]), or at the latest after this many
/// deadlines in all.
const MOST_DEADLINES_ON_A_STARVED_THREAD: u32 = 10;

/// Table elements the pool holds per table at least.
const TABLE_ELEMENTS: u64 = 10_000;
/// Instances whose memories and tables are decommitted together.
const DECOMMIT_BATCH: usize = 64;
/// A component whose memories start with at most this much data has it
/// copied into each instance's memory; a larger one has it mapped
/// copy-on-write (see [`SensorEngine::new`]).
const COPY_IMAGES_UP_TO: u64 = 16 << 10;
/// A component that takes longer than this to compile is reported, and
/// then again at every further [`COMPILE_REPORT_EVERY`].
const COMPILE_QUIET: Duration = Duration::from_secs(2);
const COMPILE_REPORT_EVERY: Duration = Duration::from_secs(10);

// The WIT records and the domain's plain types carry the same fields.

impl From<&fog_protocol::Reading> for WitReading {
    fn from(r: &fog_protocol::Reading) -> WitReading {
        WitReading { seq: r.seq, speed_kmh: r.speed_kmh, timestamp_ms: r.timestamp_ms }
    }
}

impl From<&WitReading> for fog_protocol::Reading {
    fn from(r: &WitReading) -> fog_protocol::Reading {
        fog_protocol::Reading { seq: r.seq, speed_kmh: r.speed_kmh, timestamp_ms: r.timestamp_ms }
    }
}

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
    #[error("{path} needs at least {needs_mib} MiB of linear memory per sensor, more than the {limit_mib} MiB limit: raise {} to {needs_mib} or more", Limits::MEMORY_FLAG)]
    Memory { path: String, needs_mib: u64, limit_mib: u64 },
    #[error("{path} needs {needs} {what} per sensor; the instance pool holds {holds} per sensor (sized when fog-host started, for the component it started with): start fog-host with {} {wanted} or more", Limits::INSTANCES_FLAG)]
    Pool { path: String, what: &'static str, needs: u64, holds: u64, wanted: u32 },
    #[error("cannot set up the WebAssembly engine: {0}")]
    Engine(String),
}

/// Per-sensor state living in its `Store`.
pub struct SensorHost {
    /// Made at the component's first WASI call: the repository's sensors
    /// import no WASI and never pay for it (about a kilobyte per sensor).
    wasi: Option<Box<WasiCtx>>,
    table: ResourceTable,
    limits: StoreLimits,
    pub config: SensorConfig,
    pub seed: u64,
    /// The current call ran past its deadline on the wall clock.
    overrun: Option<Overrun>,
}

/// A call past its deadline on the wall clock. On a machine short of CPU
/// a sensor's thread can wait to run longer than the deadline, in the
/// middle of a call of a few microseconds; stopping that sensor would
/// restart a healthy one. So the call goes on, and is stopped once its
/// thread has spent half a deadline more of CPU time in it (a sensor stuck
/// in a loop spends all it gets), or after
/// [`MOST_DEADLINES_ON_A_STARVED_THREAD`] deadlines in all.
#[derive(Debug, Clone, Copy)]
struct Overrun {
    /// The thread's CPU time when the deadline passed, if the system tells.
    cpu_at_deadline: Option<Duration>,
    /// Deadlines passed in this call.
    deadlines: u32,
}

impl Overrun {
    /// Whether a call that passed its deadline, seen again at the end of
    /// the next one (or first seen when `overrun` is `None`) with the
    /// thread's CPU time `cpu_now`, is to be stopped; updates `overrun`.
    fn stop(overrun: &mut Option<Overrun>, cpu_now: Option<Duration>, deadline: Duration) -> bool {
        let Some(o) = overrun else {
            *overrun = Some(Overrun { cpu_at_deadline: cpu_now, deadlines: 1 });
            return cpu_now.is_none();
        };
        o.deadlines += 1;
        let spent = match (o.cpu_at_deadline, cpu_now) {
            (Some(then), Some(now)) => now.saturating_sub(then),
            _ => return true,
        };
        spent >= deadline / 2 || o.deadlines >= MOST_DEADLINES_ON_A_STARVED_THREAD
    }
}

/// The calling thread's CPU time (Linux: `/proc/thread-self/schedstat`),
/// read only when a call passes its deadline.
fn thread_cpu_time() -> Option<Duration> {
    let stat = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    let ns: u64 = stat.split_whitespace().next()?.parse().ok()?;
    Some(Duration::from_nanos(ns))
}

impl WasiView for SensorHost {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        let id = self.config.sensor_id;
        // Nothing granted: no preopens, env, args or sockets; stdout and
        // stderr go to the host's log as lines with the sensor's id.
        let wasi = self.wasi.get_or_insert_with(|| {
            Box::new(WasiCtx::builder().stdout(GuestLog::new(id, "stdout")).stderr(GuestLog::new(id, "stderr")).build())
        });
        WasiCtxView { ctx: wasi, table: &mut self.table }
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
    /// What the pool holds for each sensor instance: see [`Limits::pool_for`].
    pub per_instance: Needs,
}

impl Limits {
    /// The flag that raises each limit, for error messages.
    pub const MEMORY_FLAG: &'static str = "--max-memory-mib";
    pub const DEADLINE_FLAG: &'static str = "--call-deadline";
    pub const INSTANCES_FLAG: &'static str = "--core-instances-per-sensor";

    /// What the pool holds per sensor instance for a component with
    /// `needs`: what it needs, and room for a component swapped in later
    /// with up to `core_instances` core instances (half as many memories,
    /// as many tables). Unused room costs address space, not memory.
    pub fn pool_for(needs: &Needs, core_instances: u32) -> Needs {
        let core = needs.core_instances.max(core_instances).max(1);
        Needs {
            core_instances: core,
            memories: needs.memories.max(core.div_ceil(2)),
            tables: needs.tables.max(core),
            min_memory_bytes: needs.min_memory_bytes,
            min_table_elements: needs.min_table_elements.max(TABLE_ELEMENTS),
            image_bytes: needs.image_bytes,
        }
    }

    /// Whether the pool and the memory cap fit a component with `needs`.
    fn check(&self, path: &str, needs: &Needs) -> Result<(), LoadError> {
        let mib = |bytes: u64| bytes.div_ceil(1 << 20);
        if needs.min_memory_bytes > self.max_memory_bytes as u64 {
            return Err(LoadError::Memory { path: path.into(), needs_mib: mib(needs.min_memory_bytes), limit_mib: mib(self.max_memory_bytes as u64) });
        }
        let holds = self.per_instance;
        let short = [
            ("core instances", needs.core_instances.into(), holds.core_instances.into()),
            ("memories", needs.memories.into(), holds.memories.into()),
            ("tables", needs.tables.into(), holds.tables.into()),
            ("table elements", needs.min_table_elements, holds.min_table_elements),
        ];
        match short.into_iter().find(|(_, need, hold)| need > hold) {
            // The core-instance budget that makes room for all of it
            // (table elements grow with the component itself).
            Some((what, need, hold)) => Err(LoadError::Pool {
                path: path.into(),
                what,
                needs: need,
                holds: hold,
                wanted: needs.core_instances.max(needs.memories.saturating_mul(2)).max(needs.tables),
            }),
            None => Ok(()),
        }
    }
}

/// Reads the component at `path`, or the built-in sensor when `None`:
/// where it came from (for messages) and its bytes.
pub fn read_component(path: Option<&Path>) -> Result<(String, Vec<u8>), LoadError> {
    match path {
        None => Ok(("built-in sensor".to_string(), BUILTIN_SENSOR.to_vec())),
        Some(p) => {
            let origin = p.display().to_string();
            let bytes = std::fs::read(p).map_err(|e| LoadError::Read { path: origin.clone(), reason: e.to_string() })?;
            Ok((origin, bytes))
        }
    }
}

/// What a component's bytes need, or why they are not a component.
pub fn needs_of(origin: &str, bytes: &[u8]) -> Result<Needs, LoadError> {
    check_header(origin, bytes)?;
    Needs::of(bytes).map_err(|reason| LoadError::NotAComponent { path: origin.to_string(), reason })
}

fn check_header(origin: &str, bytes: &[u8]) -> Result<(), LoadError> {
    // A core module has version 1 in its preamble; a component has the
    // component-model layer there.
    if !bytes.starts_with(b"\0asm") {
        return Err(LoadError::NotWasm { path: origin.to_string() });
    }
    if bytes.len() >= 8 && bytes[4..8] == [1, 0, 0, 0] {
        return Err(LoadError::CoreModule { path: origin.to_string() });
    }
    Ok(())
}

/// Where compiled components are kept between starts, by default:
/// `$XDG_CACHE_HOME/fog`, else `$HOME/.cache/fog`.
pub fn default_cache_dir() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CACHE_HOME").filter(|v| !v.is_empty()).map(PathBuf::from);
    base.or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cache"))).map(|dir| dir.join("fog"))
}

/// The process's one engine and linker, and the thread that advances the
/// engine's epoch for call deadlines.
pub struct SensorEngine {
    engine: Engine,
    linker: Linker<SensorHost>,
    limits: Limits,
    deadline_ticks: u64,
    ticker_stop: Arc<AtomicBool>,
    /// Where compiled components are cached, if anywhere.
    cache_dir: Option<PathBuf>,
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
    /// The `tick` export, typed with the host's own [`WitVisit`] (see
    /// `visit.rs`); checked against the component when instantiated.
    tick: wasmtime::component::Func,
    deadline_ticks: u64,
}

impl SensorEngine {
    /// An engine whose pool holds `limits.max_instances` sensors of
    /// `limits.per_instance` each; compiled components are cached in
    /// `cache_dir` (none: compiled at every start).
    pub fn new(limits: Limits, cache_dir: Option<&Path>) -> Result<Self, LoadError> {
        let engine_err = |e: wasmtime::Error| LoadError::Engine(one_line(&e));
        let memory = limits.max_memory_bytes as u64;
        let mut pool = PoolingAllocationConfig::default();
        let instances = limits.max_instances.max(1);
        let per = limits.per_instance;
        pool.total_component_instances(instances)
            .total_core_instances(instances.saturating_mul(per.core_instances))
            .total_memories(instances.saturating_mul(per.memories))
            .total_tables(instances.saturating_mul(per.tables))
            .table_elements(usize::try_from(per.min_table_elements).unwrap_or(usize::MAX))
            .max_memory_size(limits.max_memory_bytes)
            // Calls are synchronous: guests run on the host thread's stack.
            .total_stacks(0)
            // A dropped instance's memory and tables are given back to the
            // kernel 64 at a time, not one system call each: a hot swap or
            // the end of a fleet drops a sensor in 5.5 µs instead of 8.
            .decommit_batch_size(DECOMMIT_BATCH);
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
            .memory_reservation_for_growth(0)
            // A memory's initial data is mapped copy-on-write from one
            // image that all instances share, or copied into each instance.
            // Mapping costs a system call and a memory mapping per instance
            // (about 6 of the built-in sensor's 24 µs to instantiate) and
            // saves the private copies of pages no instance writes:
            // megabytes of a CPython sensor's heap, but one 4 KiB page of
            // the built-in sensor. Decided by the component the engine
            // starts with.
            .memory_init_cow(per.image_bytes > COPY_IMAGES_UP_TO);
        let mut cached_in = None;
        if let Some(dir) = cache_dir {
            match Cache::new(CacheConfig::new().with_directory(dir).clone()) {
                Ok(cache) => {
                    config.cache(Some(cache));
                    cached_in = Some(dir.to_path_buf());
                }
                Err(e) => tracing::warn!("cannot keep compiled components in {}: {}; compiling at every start", dir.display(), one_line(&e)),
            }
        }
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
        Ok(Self { engine, linker, limits, deadline_ticks, ticker_stop, cache_dir: cached_in })
    }

    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// Loads the component at `path`, or the built-in sensor when `None`.
    pub fn load(&self, path: Option<&Path>) -> Result<SensorComponent, LoadError> {
        let (origin, bytes) = read_component(path)?;
        self.from_bytes(origin, &bytes)
    }

    /// Checks that a component fits the pool and the memory cap, compiles
    /// it (or takes it from the cache), and checks that it implements the
    /// sensor world.
    pub fn from_bytes(&self, origin: String, bytes: &[u8]) -> Result<SensorComponent, LoadError> {
        let needs = needs_of(&origin, bytes)?;
        self.limits.check(&origin, &needs)?;
        let component = self.compile(&origin, bytes)?;
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
            wasi: None,
            table: ResourceTable::new(),
            limits: StoreLimitsBuilder::new()
                .memory_size(self.limits.max_memory_bytes)
                .trap_on_grow_failure(true)
                .build(),
            config,
            seed,
            overrun: None,
        };
        let mut store = Store::new(&self.engine, host);
        store.limiter(|h| &mut h.limits);
        let (deadline, deadline_ticks) = (self.limits.call_deadline, self.deadline_ticks);
        store.epoch_deadline_callback(move |mut ctx| {
            let stop = Overrun::stop(&mut ctx.data_mut().overrun, thread_cpu_time(), deadline);
            Ok(if stop { UpdateDeadline::Interrupt } else { UpdateDeadline::Continue(deadline_ticks) })
        });
        // Instantiation runs the component's start functions: deadline them too.
        store.set_epoch_deadline(self.deadline_ticks);
        let bindings = component.pre.instantiate(&mut store)?;
        let tick = *bindings.func_tick().func();
        tick.typed::<(&WitVisit,), (TickResult,)>(&store)?;
        Ok(SensorInstance { store, bindings, tick, deadline_ticks: self.deadline_ticks })
    }
}

impl SensorEngine {
    /// Compiles on a thread of its own, saying so when it takes a while (a
    /// componentize-py sensor takes tens of seconds the first time).
    fn compile(&self, origin: &str, bytes: &[u8]) -> Result<Component, LoadError> {
        let started = Instant::now();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::scope(|scope| {
            scope.spawn(|| {
                let _ = tx.send(Component::from_binary(&self.engine, bytes));
            });
            let mut wait = COMPILE_QUIET;
            loop {
                match rx.recv_timeout(wait) {
                    Ok(result) => return result.map_err(|e| LoadError::NotAComponent { path: origin.to_string(), reason: one_line(&e) }),
                    Err(std::sync::mpsc::RecvTimeoutError::Timeout) if wait == COMPILE_QUIET => {
                        let cache = match &self.cache_dir {
                            Some(dir) => format!("the next start takes it from the cache in {}", dir.display()),
                            None => "without a cache (--cache-dir) every start compiles it again".to_string(),
                        };
                        tracing::info!("compiling {origin} ({:.1} MB) to machine code; {cache}", bytes.len() as f64 / 1e6);
                        wait = COMPILE_REPORT_EVERY;
                    }
                    Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                        tracing::info!("still compiling {origin} ({:.0?} so far)", started.elapsed());
                    }
                    Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                        return Err(LoadError::Engine(format!("the compiler thread for {origin} stopped without an answer")));
                    }
                }
            }
        })
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
        self.store.data_mut().overrun = None;
    }

    pub fn init(&mut self) -> wasmtime::Result<u64> {
        self.arm();
        self.bindings.call_init(&mut self.store)
    }

    pub fn tick(&mut self, visit: &WitVisit) -> wasmtime::Result<TickResult> {
        self.arm();
        // SAFETY: `instantiate` checked this signature against the
        // component (`Func::typed`).
        let tick = unsafe { wasmtime::component::TypedFunc::<(&WitVisit,), (TickResult,)>::new_unchecked(self.tick) };
        tick.call(&mut self.store, (visit,)).map(|(result,)| result)
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
    pub fn restore(&mut self, state: &[u8], since: &[WitReading]) -> wasmtime::Result<Result<(), String>> {
        self.arm();
        self.bindings.call_restore(&mut self.store, state, since)
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
        if *trap == wasmtime::Trap::UnreachableCodeReached {
            // How Python, JavaScript and Rust panics end a guest. The
            // repository's own sensors import no WASI: their panics trap
            // without a message.
            return format!("trapped: {trap} (an uncaught error in the sensor: its stderr lines just before this, if it has stderr, say which)");
        }
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
        // Two mappings per instance (four where its memory is mapped from
        // an image, see `memory_init_cow`), twice for a hot swap, and room.
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

#[cfg(test)]
mod tests {
    use super::*;

    const DEADLINE: Duration = Duration::from_millis(100);

    #[test]
    fn a_call_past_its_deadline_that_waited_for_the_cpu_goes_on_and_one_that_kept_it_is_stopped() {
        let ms = Duration::from_millis;
        // Waited to run: a millisecond of CPU over nine deadlines goes on,
        // the tenth deadline stops it all the same.
        let mut o = None;
        assert!(!Overrun::stop(&mut o, Some(ms(50)), DEADLINE));
        for _ in 2..MOST_DEADLINES_ON_A_STARVED_THREAD {
            assert!(!Overrun::stop(&mut o, Some(ms(51)), DEADLINE));
        }
        assert!(Overrun::stop(&mut o, Some(ms(51)), DEADLINE));
        // Kept the CPU: half a deadline more of it, and it is stopped.
        let mut o = None;
        assert!(!Overrun::stop(&mut o, Some(ms(50)), DEADLINE));
        assert!(!Overrun::stop(&mut o, Some(ms(99)), DEADLINE));
        assert!(Overrun::stop(&mut o, Some(ms(100)), DEADLINE));
        // No CPU clock to ask: the wall clock's deadline holds.
        assert!(Overrun::stop(&mut None, None, DEADLINE));
    }

    #[test]
    fn the_threads_cpu_time_grows_with_work_and_not_with_sleep() {
        let start = thread_cpu_time().expect("this thread's CPU time");
        std::thread::sleep(Duration::from_millis(50));
        let slept = thread_cpu_time().expect("this thread's CPU time") - start;
        let t = Instant::now();
        let mut x = 0u64;
        while t.elapsed() < Duration::from_millis(50) {
            x = std::hint::black_box(x.wrapping_add(1));
        }
        let worked = thread_cpu_time().expect("this thread's CPU time") - start - slept;
        assert!(slept < Duration::from_millis(10), "asleep for 50 ms, the thread spent {slept:?} of CPU");
        assert!(worked > slept, "busy for 50 ms the thread spent {worked:?}, asleep {slept:?}");
    }
}
