//! The `fog-host` command: parses flags and runs a fleet of sensors.
//!
//! Exit codes: 0 when every reading generated was acked, 1 on an error
//! (bad component, bad address ...), 2 on bad flags, 3 when the drain
//! timeout passed with readings still unacked.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Parser;
use fog_host::fleet::{Fleet, FleetConfig};
use fog_host::runtime::{Limits, SensorRuntime};
use fog_host::session::{self, SessionConfig, Summary};

/// Run roadside speed sensors (WebAssembly components) and send their
/// readings to a fog server pair.
///
/// Every sensor is a sandboxed instance of SENSOR.wasm (the sensor built from
/// this repository when no path is given). All sensors share one connection
/// to the active server; when it stops answering, the host fails over to the
/// other one and sends the unacked readings there.
///
/// Without a state directory, a restarted host starts its sensors afresh:
/// readings buffered but not yet acked when the process died are lost, and
/// the sensors come back with new incarnations (so no reading id is reused).
#[derive(Debug, Parser)]
#[command(name = "fog-host", version, max_term_width = 100)]
struct Args {
    /// Sensor component (a wasm32-wasip2 component of world fog:sensor/sensor@0.1.0);
    /// default: the built-in sensor.
    #[arg(value_name = "SENSOR.wasm")]
    component: Option<PathBuf>,

    /// Number of sensor instances to run.
    #[arg(short = 'n', long, default_value_t = 10)]
    sensors: u32,

    /// Id of the first sensor; the others follow.
    #[arg(long, default_value_t = 1)]
    first_id: u32,

    /// Number of road segments; sensors are spread over them round-robin.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    segments: u32,

    /// How often every sensor produces a reading (and the host talks to the server).
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    interval: Duration,

    /// Server endpoints, in failover order.
    #[arg(long, value_delimiter = ',', default_value = "tcp://127.0.0.1:5001,tcp://127.0.0.1:5002")]
    servers: Vec<String>,

    /// Fail over when the server has not answered within this time.
    #[arg(long, default_value = "1000ms", value_parser = parse_duration)]
    timeout: Duration,

    /// Stop generating after this long, wait until every reading is acked, print a summary and exit.
    #[arg(long, value_parser = parse_duration)]
    duration: Option<Duration>,

    /// How long to wait for the last acks after --duration (or Ctrl-C).
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    drain_timeout: Duration,

    /// Print the summary as one JSON object on stdout (logs stay on stderr).
    #[arg(long)]
    json: bool,

    /// How often to print a progress line on stderr.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    progress: Duration,

    /// Print no progress lines.
    #[arg(short, long)]
    quiet: bool,

    /// Sensors resend a reading not acked within this time.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    resend_after: Duration,

    /// Most unacked readings a sensor keeps; beyond that the oldest is dropped and counted.
    #[arg(long, default_value_t = 100_000)]
    max_buffered: u32,

    /// A setting passed to every sensor as key=value (repeatable), e.g. --set min-kmh=60.
    #[arg(long = "set", value_name = "KEY=VALUE", value_parser = parse_setting)]
    settings: Vec<(String, String)>,

    /// Largest linear memory one sensor may use, in MiB.
    #[arg(long, default_value_t = 16)]
    max_memory_mib: usize,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{e} (examples: 500ms, 1s, 2m)"))
}

fn parse_setting(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("expected KEY=VALUE, got `{s}`")),
    }
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let args = Args::parse();
    match run(args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn run(args: Args) -> anyhow::Result<ExitCode> {
    if args.servers.is_empty() {
        bail!("--servers needs at least one endpoint");
    }
    for server in &args.servers {
        server
            .parse::<zeromq::Endpoint>()
            .map_err(|e| anyhow::anyhow!("bad server endpoint `{server}`: {e} (expected e.g. tcp://127.0.0.1:5001)"))?;
    }
    if args.interval.is_zero() {
        bail!("--interval must be greater than zero");
    }
    let limits = Limits { max_memory_bytes: args.max_memory_mib << 20 };
    let runtime = SensorRuntime::load(args.component.as_deref(), limits)?;
    let fleet_config = FleetConfig {
        first_id: args.first_id,
        count: args.sensors,
        segments: args.segments,
        resend_after_ms: args.resend_after.as_millis() as u64,
        max_buffered: args.max_buffered,
        settings: args.settings.clone(),
        seed: rand::random(),
    };
    let started = std::time::Instant::now();
    let mut fleet = Fleet::start(&runtime, &fleet_config).context("cannot start sensors")?;
    tracing::info!(
        "started {} sensors of {} in {:.1?}; servers {}",
        fleet.len(),
        runtime.origin,
        started.elapsed(),
        args.servers.join(", ")
    );
    let session_config = SessionConfig {
        servers: args.servers.clone(),
        interval: args.interval,
        timeout: args.timeout,
        duration: args.duration,
        drain_timeout: args.drain_timeout,
        progress: (!args.quiet).then_some(args.progress),
    };
    let tokio = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let summary = tokio.block_on(async {
        let shutdown = async {
            let _ = tokio::signal::ctrl_c().await;
        };
        session::run(&mut fleet, &session_config, shutdown).await
    });
    if args.json {
        println!("{}", serde_json::to_string(&summary).context("cannot encode the summary")?);
    } else {
        print_summary(&summary);
    }
    Ok(if summary.drained && summary.unacked == 0 { ExitCode::SUCCESS } else { ExitCode::from(3) })
}

fn print_summary(s: &Summary) {
    eprintln!(
        "summary: {} sensors, {} readings generated, {} acked, {} unacked, {} resent, {} averages received, {} failovers, {} failed sensors, {:.1}s",
        s.sensors, s.generated, s.acked, s.unacked, s.resent, s.averages_received, s.failovers, s.failed_sensors, s.elapsed_s
    );
    for seg in &s.segments {
        let limits: Vec<String> = seg.limits.iter().map(|(l, n)| format!("{l} km/h x{n}")).collect();
        eprintln!(
            "  segment {}: last average {:.1} km/h over {} readings; limits {}",
            seg.segment,
            seg.mean_kmh,
            seg.count,
            limits.join(", ")
        );
    }
}
