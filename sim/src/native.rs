//! Sensors compiled into the process: the sensor component's own code
//! ([`SensorCore`], what `sensor-wasm` exports through the WIT glue) behind
//! the fleet's [`SensorRuntime`] traits, so the real fleet runs it without
//! wasmtime. Its clock import is the simulated host's wall clock, read
//! from a shared cell the world sets; a road can go quiet (no more cars
//! pass) from a given wall-clock time on. A seed may also make calls trap
//! now and then ([`Traps`]): the fleet then restarts the sensor from its
//! last snapshot and the readings that left since, as it does a wasm trap.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use fog_host::runtime::{SensorConfig, SensorStatus, TickResult, WitCursor, WitReading, WitVisit};
use fog_host::sensor::{SensorCalls, SensorRuntime};
use fog_sensor::{Average, SensorCore, Status};

/// The simulated host's wall clock, shared by its sensors.
#[derive(Debug, Clone, Default)]
pub struct WallClock(Arc<AtomicU64>);

impl WallClock {
    pub fn set(&self, ms: u64) {
        self.0.store(ms, Ordering::Relaxed);
    }

    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Calls that trap: each call of a sensor (tick, snapshot)
/// traps with this probability, drawn from the world's seed.
#[derive(Clone)]
pub struct Traps {
    rng: Arc<Mutex<StdRng>>,
    probability: f64,
    /// Off until the fleet has started (a sensor that cannot start stops
    /// the host, as it should).
    armed: Arc<AtomicBool>,
    /// Traps planted so far.
    pub planted: Arc<AtomicU64>,
}

impl Traps {
    pub fn new(seed: u64, probability: f64) -> Traps {
        Traps { rng: Arc::new(Mutex::new(StdRng::seed_from_u64(seed))), probability, armed: Arc::default(), planted: Arc::default() }
    }

    /// Traps are planted from now on (`true`) or no longer (`false`).
    pub fn arm(&self, on: bool) {
        self.armed.store(on, Ordering::Relaxed);
    }

    /// A trap, now and then.
    fn call(&self, what: &str) -> wasmtime::Result<()> {
        if self.probability > 0.0 && self.armed.load(Ordering::Relaxed) && self.rng.lock().unwrap_or_else(PoisonError::into_inner).random_bool(self.probability) {
            self.planted.fetch_add(1, Ordering::Relaxed);
            return Err(wasmtime::Error::msg(format!("planted trap in {what}")));
        }
        Ok(())
    }
}

/// Makes native sensors.
pub struct NativeRuntime {
    pub traps: Traps,
    pub clock: WallClock,
    /// No car passes at or after this many ms of simulated time (by the
    /// monotonic clock: a step of the host's wall clock does not move it).
    pub quiet_from: Arc<AtomicU64>,
    pub sim_ms: Arc<AtomicU64>,
}

/// The one program native sensors run.
pub struct BuiltIn;

pub struct NativeSensor {
    config: fog_sensor::SensorConfig,
    seed: u64,
    core: Option<SensorCore>,
    clock: WallClock,
    quiet_from: Arc<AtomicU64>,
    sim_ms: Arc<AtomicU64>,
    traps: Traps,
}

impl SensorRuntime for NativeRuntime {
    type Component = BuiltIn;
    type Sensor = NativeSensor;

    fn instantiate(&self, _: &BuiltIn, config: SensorConfig, seed: u64) -> wasmtime::Result<NativeSensor> {
        let config = fog_sensor::SensorConfig {
            sensor_id: config.sensor_id,
            segment: config.segment,
            resend_after_ms: config.resend_after_ms,
            max_buffered: config.max_buffered,
            settings: config.settings,
        };
        Ok(NativeSensor {
            config,
            seed,
            core: None,
            clock: self.clock.clone(),
            quiet_from: self.quiet_from.clone(),
            sim_ms: self.sim_ms.clone(),
            traps: self.traps.clone(),
        })
    }

    fn origin<'a>(&self, _: &'a BuiltIn) -> &'a str {
        "the built-in sensor, compiled in"
    }

    fn describe_failure(&self, e: &wasmtime::Error) -> String {
        format!("failed: {e:#}")
    }

    fn describe_instantiate_failure(&self, e: &wasmtime::Error, _: u32) -> String {
        format!("{e:#}")
    }
}

impl NativeSensor {
    /// As the component glue does: the sensor starts on the first call.
    fn core(&mut self) -> &mut SensorCore {
        let (config, seed, now) = (&self.config, self.seed, self.clock.get());
        self.core.get_or_insert_with(|| SensorCore::new(config, seed, now))
    }
}

impl SensorCalls for NativeSensor {
    fn init(&mut self) -> wasmtime::Result<u64> {
        Ok(self.core().incarnation())
    }

    /// As the component glue does: the news, then the readings.
    fn tick(&mut self, visit: &WitVisit) -> wasmtime::Result<TickResult> {
        self.traps.call("tick")?;
        let now = self.clock.get();
        let cars = self.sim_ms.load(Ordering::Relaxed) < self.quiet_from.load(Ordering::Relaxed);
        let averages: Vec<Average> = visit.averages.iter().flatten().map(Average::from).collect();
        let ack = visit.ack.as_ref().map(|a| (a.incarnation, a.next_seq, a.also.as_deref().unwrap_or(&[])));
        let core = self.core();
        core.take_news(ack, &averages);
        let readings = core.tick(now, if cars { visit.make } else { 0 }, visit.every_ms);
        Ok(TickResult { readings: readings.iter().map(WitReading::from).collect(), status: to_wit_status(core.status()) })
    }

    fn on_reposition(&mut self, rewind_to: Option<u64>, to: WitCursor) -> wasmtime::Result<Option<WitCursor>> {
        Ok(self.core().on_reposition(rewind_to, to.into()).map(WitCursor::from))
    }

    fn status(&mut self) -> wasmtime::Result<SensorStatus> {
        Ok(to_wit_status(self.core().status()))
    }

    fn snapshot(&mut self) -> wasmtime::Result<Vec<u8>> {
        self.traps.call("snapshot")?;
        Ok(self.core().snapshot())
    }

    fn restore(&mut self, state: &[u8], since: &[WitReading]) -> wasmtime::Result<Result<(), String>> {
        let since: Vec<fog_sensor::Reading> = since.iter().map(fog_sensor::Reading::from).collect();
        let now = self.clock.get();
        Ok(fog_sensor::glue::restore_core(state, &self.config).map(|mut core| {
            core.adopt(&since, now);
            self.core = Some(core);
        }))
    }
}

fn to_wit_status(s: Status) -> SensorStatus {
    SensorStatus {
        incarnation: s.incarnation,
        generated: s.generated,
        acked: s.acked,
        buffered: s.buffered,
        resent: s.resent,
        overflowed: s.overflowed,
        sum_kmh: s.sum_kmh,
        averages_applied: s.averages_applied,
        last_average: s.last_average.map(WitCursor::from),
        averages_missed: s.averages_missed,
        averages_superseded: s.averages_superseded,
        averages_digest: s.averages_digest,
        limit_kmh: s.limit_kmh,
    }
}
