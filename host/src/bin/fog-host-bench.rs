//! `fog-host-bench`: how dense a host can be. Starts fleets of the real
//! sensor component with the same engine settings `fog-host` uses (pooling
//! allocator, memory cap, call deadlines) and prints, per fleet size, the
//! instantiation time per sensor, the memory per sensor, and the cost of one
//! tick (which returns the readings with the state and status after it) and
//! of one full snapshot (state and status, as at shutdown or a hot swap)
//! per sensor; then finds the largest
//! fleet this machine can start. No servers are involved: this measures
//! the sandbox, not the network (fog-bench measures that).
//!
//! Figures are printed, never judged: there is no pass or fail.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The allocator `fog-host` runs with, so the figures are the host's.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use anyhow::Context;
use clap::Parser;
use fog_host::fleet::{Fleet, FleetConfig};
use fog_host::runtime::{Limits, SensorEngine, needs_of, read_component};
use serde::Serialize;

/// Measure instantiation time, memory and tick cost per sensor, and the
/// largest number of sensors one host process can start.
#[derive(Debug, Parser)]
#[command(name = "fog-host-bench", version, max_term_width = 100)]
struct Args {
    /// Sensor component; default: the built-in sensor.
    #[arg(value_name = "SENSOR.wasm")]
    component: Option<PathBuf>,

    /// Fleet sizes to measure, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1000,10000")]
    sensors: Vec<u32>,

    /// Ticks (each followed by a full snapshot) per fleet size.
    #[arg(long, default_value_t = 10)]
    rounds: u32,

    /// Then double the fleet from the largest size measured up to this many
    /// sensors, and report the largest that started (0: skip).
    #[arg(long, default_value_t = 100_000)]
    largest_up_to: u32,

    /// Memory cap per sensor in MiB, as fog-host's --max-memory-mib.
    #[arg(long, default_value_t = 4)]
    max_memory_mib: u32,

    /// Print the figures as one JSON object on stdout.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Serialize)]
struct FleetFigures {
    sensors: u32,
    /// Compiling the component included.
    start_s: f64,
    instantiate_us_per_sensor: f64,
    rss_mib: f64,
    rss_kib_per_sensor: f64,
    /// After the rounds: each sensor has then buffered a reading per round
    /// (nothing acks them) and been snapshotted.
    rss_kib_per_sensor_after_rounds: f64,
    /// The kernel's page tables, which RSS leaves out: about a page per
    /// sensor, for the memory slot's mapping.
    page_tables_kib_per_sensor: f64,
    tick_us_per_sensor: f64,
    snapshot_us_per_sensor: f64,
}

#[derive(Debug, Serialize)]
struct Figures {
    component: String,
    max_memory_mib: u32,
    vm_max_map_count: Option<u64>,
    fleets: Vec<FleetFigures>,
    largest_started: Option<u32>,
    largest_failure: Option<String>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn run(args: &Args) -> anyhow::Result<()> {
    let mut figures = Figures {
        component: args.component.as_ref().map_or("built-in sensor".into(), |p| p.display().to_string()),
        max_memory_mib: args.max_memory_mib,
        vm_max_map_count: std::fs::read_to_string("/proc/sys/vm/max_map_count").ok().and_then(|s| s.trim().parse().ok()),
        fleets: Vec::new(),
        largest_started: None,
        largest_failure: None,
    };
    for &n in &args.sensors {
        let f = measure(args, n)?;
        if !args.json {
            println!(
                "{:>7} sensors: started in {:.2} s, {:.1} µs/sensor to instantiate; RSS {:.0} MiB = {:.1} KiB/sensor ({:.1} after the rounds; page tables {:.1}); tick (with its status) {:.2} µs/sensor; full snapshot {:.2} µs/sensor",
                f.sensors,
                f.start_s,
                f.instantiate_us_per_sensor,
                f.rss_mib,
                f.rss_kib_per_sensor,
                f.rss_kib_per_sensor_after_rounds,
                f.page_tables_kib_per_sensor,
                f.tick_us_per_sensor,
                f.snapshot_us_per_sensor
            );
        }
        figures.fleets.push(f);
    }
    if args.largest_up_to > 0 {
        let mut n = args.sensors.iter().copied().max().unwrap_or(1000).max(1);
        while n <= args.largest_up_to {
            match start(args, n) {
                Ok(_) => figures.largest_started = Some(n),
                Err(e) => {
                    figures.largest_failure = Some(format!("{n} sensors: {e:#}"));
                    break;
                }
            }
            if n == args.largest_up_to {
                break;
            }
            n = n.saturating_mul(2).min(args.largest_up_to);
        }
        if !args.json {
            match figures.largest_started {
                Some(n) => println!("largest fleet started: {n} sensors (tried up to {})", args.largest_up_to),
                None => println!("no fleet started"),
            }
            if let Some(why) = &figures.largest_failure {
                println!("stopped at {why}");
            }
        }
    }
    if args.json {
        println!("{}", serde_json::to_string(&figures)?);
    }
    Ok(())
}

/// A started fleet, and how long compiling the component took (excluded
/// from the per-sensor figures: it is paid once per host).
fn start(args: &Args, n: u32) -> anyhow::Result<(Fleet, Duration)> {
    let (origin, bytes) = read_component(args.component.as_deref())?;
    let needs = needs_of(&origin, &bytes)?;
    let limits = Limits {
        max_memory_bytes: (args.max_memory_mib as usize) << 20,
        call_deadline: Duration::from_millis(100),
        max_instances: n.saturating_mul(2).saturating_add(16),
        per_instance: Limits::pool_for(&needs, 0),
    };
    // No cache: the compile time is one of the figures.
    let engine = Arc::new(SensorEngine::new(limits, None)?);
    let t = Instant::now();
    let component = engine.from_bytes(origin, &bytes)?;
    let compile = t.elapsed();
    let config = FleetConfig {
        first_id: 1,
        count: n,
        segments: 1,
        resend_after_ms: 1000,
        max_buffered: 1000,
        settings: Vec::new(),
        seed: 42,
        restart_backoff: Duration::from_secs(1),
        max_restarts: 3,
        // One thread: the figures are the CPU cost of a sensor.
        threads: 1,
        every_ms: 1_000,
    };
    let fleet = Fleet::start(engine, component, config, None, Instant::now()).context("cannot start the fleet")?;
    Ok((fleet, compile))
}

fn measure(args: &Args, n: u32) -> anyhow::Result<FleetFigures> {
    let (rss_before, page_tables_before) = (rss_kib(), status_kib("VmPTE:"));
    let t = Instant::now();
    let (mut fleet, compile) = start(args, n)?;
    let start_s = t.elapsed().as_secs_f64();
    let instantiate_s = (t.elapsed() - compile).as_secs_f64();
    let rss_after = rss_kib();
    let page_tables = status_kib("VmPTE:").saturating_sub(page_tables_before);
    let rounds = args.rounds.max(1);
    let (mut tick, mut snapshot) = (Duration::ZERO, Duration::ZERO);
    for _ in 0..rounds {
        let t = Instant::now();
        fleet.tick_all(Instant::now(), 1);
        fleet.commit()?;
        tick += t.elapsed();
        let t = Instant::now();
        fleet.commit_all(Instant::now())?;
        snapshot += t.elapsed();
        // Drop what a batch would have taken, so memory stays flat.
        let _ = fleet.take_batch(Instant::now(), 0);
    }
    let rss_after_rounds = rss_kib();
    let per = |d: Duration| d.as_secs_f64() * 1e6 / (f64::from(n) * f64::from(rounds));
    Ok(FleetFigures {
        sensors: n,
        start_s,
        instantiate_us_per_sensor: instantiate_s * 1e6 / f64::from(n),
        rss_mib: rss_after as f64 / 1024.0,
        rss_kib_per_sensor: rss_after.saturating_sub(rss_before) as f64 / f64::from(n),
        rss_kib_per_sensor_after_rounds: rss_after_rounds.saturating_sub(rss_before) as f64 / f64::from(n),
        page_tables_kib_per_sensor: page_tables as f64 / f64::from(n),
        tick_us_per_sensor: per(tick),
        snapshot_us_per_sensor: per(snapshot),
    })
}

/// Resident memory of this process, KiB.
fn rss_kib() -> u64 {
    status_kib("VmRSS:")
}

/// A figure of this process's `/proc/self/status` in KiB (0 where there is none).
fn status_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with(field))?.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0)
}
