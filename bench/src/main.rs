//! `fog-bench`: measures the fog system with its real binaries on loopback
//! and prints figures (no pass/fail: speed is measured, not asserted).
//!
//! - `transport`: the ceiling — a bare zmq.rs DEALER→ROUTER echo of the
//!   same frames the ingest benchmark sends, in its own process;
//! - `ingest`: acked readings per second from a native load generator into
//!   a primary with its backup running;
//! - `latency`: ack latency of 10 000 sensors × 1 reading/s;
//! - `e2e`: acked readings per second through `fog-host` running the real
//!   sensor component, and the host's memory per sensor;
//! - `failover`: kill -9 of the active server under 10 000 sensors, time to
//!   the first batch acked by the new active, over several runs;
//! - `recovery`: kill -9 of a server whose log holds 10 M readings, time
//!   until the restarted server answers with all of them counted;
//! - `all` (the default): all of the above in one run, so the ratio to the
//!   transport ceiling holds on a noisy machine.

mod echo;
mod load;
mod system;

use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use fog_e2e::{Pair, free_port, scratch_dir, start_server};
use load::{LoadResult, LoadShape, Target};
use fog_e2e::rss_mib;
use serde::Serialize;

/// Measure the fog system with its real binaries on loopback.
///
/// Build first with `cargo build --release`; fog-bench starts
/// target/release/fog-server itself and prints one table (or with --json one
/// JSON object) of figures.
#[derive(Debug, Parser)]
#[command(name = "fog-bench", version, max_term_width = 100)]
struct Args {
    #[command(subcommand)]
    what: Option<What>,

    /// How long each benchmark measures.
    #[arg(long, default_value = "10s", value_parser = parse_duration, global = true)]
    measure: Duration,

    /// Load before measuring starts.
    #[arg(long, default_value = "2s", value_parser = parse_duration, global = true)]
    warmup: Duration,

    /// Print the figures as one JSON object on stdout.
    #[arg(long, global = true)]
    json: bool,

    /// Load-generator connections (simulated hosts).
    #[arg(long, default_value_t = 2, global = true)]
    connections: usize,

    /// Batches in flight per connection.
    #[arg(long, default_value_t = 4, global = true)]
    in_flight: usize,

    /// Simulated sensors per connection in the throughput benchmarks.
    #[arg(long, default_value_t = 1000, global = true)]
    sensors: u32,

    /// Readings per sensor in each throughput batch.
    #[arg(long, default_value_t = 10, global = true)]
    readings_per_sensor: u32,

    /// Sensors of the host in the end-to-end benchmark.
    #[arg(long, default_value_t = 10_000, global = true)]
    host_sensors: u32,

    /// Reading interval of the host's sensors in the end-to-end benchmark.
    #[arg(long, default_value = "40ms", value_parser = parse_duration, global = true)]
    host_interval: Duration,

    /// Sensors of the host in the failover benchmark.
    #[arg(long, default_value_t = 10_000, global = true)]
    failover_sensors: u32,

    /// Kills of the active server in the failover benchmark.
    #[arg(long, default_value_t = 10, global = true)]
    failover_runs: usize,

    /// Readings in the log of the server restarted by the recovery benchmark.
    #[arg(long, default_value_t = 10_000_000, global = true)]
    recovery_readings: u64,
}

#[derive(Debug, Subcommand)]
enum What {
    /// Every benchmark, one after the other (the default).
    All,
    /// The transport ceiling: bare DEALER→ROUTER echo of the same frames.
    Transport,
    /// Ingest throughput into a primary with its backup running.
    Ingest,
    /// Ack latency of 10 000 sensors at 1 reading/s each.
    Latency,
    /// Throughput through fog-host running the real sensor component.
    E2e,
    /// Time from kill -9 of the active server to the first ack of the new one.
    Failover,
    /// Restart of a server whose write-ahead log holds many readings.
    Recovery,
    /// Run the bare echo server (used by `transport`).
    #[command(hide = true)]
    EchoServer { endpoint: String },
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{e} (examples: 500ms, 10s)"))
}

#[derive(Debug, Default, Serialize)]
struct Figures {
    #[serde(skip_serializing_if = "Option::is_none")]
    transport: Option<Throughput>,
    #[serde(skip_serializing_if = "Option::is_none")]
    ingest: Option<Throughput>,
    #[serde(skip_serializing_if = "Option::is_none")]
    ingest_fraction_of_transport: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    latency: Option<Latency>,
    #[serde(skip_serializing_if = "Option::is_none")]
    e2e: Option<system::EndToEnd>,
    #[serde(skip_serializing_if = "Option::is_none")]
    failover: Option<system::Failover>,
    #[serde(skip_serializing_if = "Option::is_none")]
    recovery: Option<system::Recovery>,
}

#[derive(Debug, Serialize)]
struct Throughput {
    readings_per_s: f64,
    batches_per_s: f64,
    readings_per_batch: u32,
    frame_bytes: usize,
    batch_rtt_p50_ms: f64,
    batch_rtt_p99_ms: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    server_rss_mib: Option<f64>,
}

#[derive(Debug, Serialize)]
struct Latency {
    sensors: u32,
    readings_acked: u64,
    p50_ms: f64,
    p99_ms: f64,
    p999_ms: f64,
    max_ms: f64,
    server_rss_mib: Option<f64>,
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return std::process::ExitCode::from(1);
        }
    };
    match rt.block_on(run(args)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::from(1)
        }
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    let what = args.what.as_ref().unwrap_or(&What::All);
    if let What::EchoServer { endpoint } = what {
        return echo::serve(endpoint).await;
    }
    let mut figures = Figures::default();
    let all = matches!(what, What::All);
    if all || matches!(what, What::Transport) {
        figures.transport = Some(transport(&args).await?);
    }
    if all || matches!(what, What::Ingest) {
        figures.ingest = Some(ingest(&args).await?);
    }
    if let (Some(t), Some(i)) = (&figures.transport, &figures.ingest) {
        figures.ingest_fraction_of_transport = Some(i.readings_per_s / t.readings_per_s);
    }
    if all || matches!(what, What::Latency) {
        figures.latency = Some(latency(&args).await?);
    }
    if all || matches!(what, What::E2e) {
        eprintln!("e2e: fog-host with {} sensors every {:?} for {:?} ...", args.host_sensors, args.host_interval, args.measure);
        let (sensors, interval, measure) = (args.host_sensors, args.host_interval, args.measure);
        figures.e2e = Some(tokio::task::spawn_blocking(move || system::end_to_end(sensors, interval, measure)).await??);
    }
    if all || matches!(what, What::Failover) {
        eprintln!("failover: kill -9 the active server under {} sensors, {} runs ...", args.failover_sensors, args.failover_runs);
        figures.failover = Some(system::failover(args.failover_sensors, args.failover_runs).await?);
    }
    if all || matches!(what, What::Recovery) {
        eprintln!("recovery: restart a server whose log holds {} readings ...", args.recovery_readings);
        figures.recovery = Some(system::recovery(args.recovery_readings, shape(&args)).await?);
    }
    if args.json {
        println!("{}", serde_json::to_string(&figures)?);
    } else {
        print_table(&figures);
    }
    Ok(())
}

fn shape(args: &Args) -> LoadShape {
    LoadShape {
        connections: args.connections,
        in_flight: args.in_flight,
        sensors: args.sensors,
        readings_per_sensor: args.readings_per_sensor,
        rate: None,
        max_readings: None,
    }
}

fn throughput(r: &LoadResult, shape: LoadShape, rss: Option<f64>) -> Throughput {
    Throughput {
        readings_per_s: r.per_second(),
        batches_per_s: r.batches as f64 / r.elapsed.as_secs_f64(),
        readings_per_batch: shape.sensors * shape.readings_per_sensor,
        frame_bytes: r.frame_bytes,
        batch_rtt_p50_ms: r.rtt_us.value_at_quantile(0.5) as f64 / 1000.0,
        batch_rtt_p99_ms: r.rtt_us.value_at_quantile(0.99) as f64 / 1000.0,
        server_rss_mib: rss,
    }
}

async fn transport(args: &Args) -> anyhow::Result<Throughput> {
    eprintln!("transport: bare echo of the ingest frames for {:?} ...", args.measure);
    let dir = scratch_dir("bench-transport");
    let _cleanup = system::RemoveOnDrop(dir.clone());
    let endpoint = format!("tcp://127.0.0.1:{}", free_port());
    let exe = std::env::current_exe().context("own path")?;
    let echo = fog_e2e::Proc::spawn("echo", &exe, &["echo-server".into(), endpoint.clone()], &dir)?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let shape = shape(args);
    let r = load::run(&endpoint, shape, Target::Echo, args.warmup, args.measure).await?;
    drop(echo);
    Ok(throughput(&r, shape, None))
}

async fn ingest(args: &Args) -> anyhow::Result<Throughput> {
    eprintln!("ingest: load generator into primary + backup for {:?} ...", args.measure);
    let dir = scratch_dir("bench-ingest");
    let _cleanup = system::RemoveOnDrop(dir.clone());
    let pair = Pair::on_free_ports();
    let primary = start_server(&pair, true, &[], &dir)?;
    let _backup = start_server(&pair, false, &[], &dir)?;
    let shape = shape(args);
    let r = load::run(&pair.primary_frontend, shape, Target::Server, args.warmup, args.measure).await?;
    let rss = rss_mib(primary.child.id());
    Ok(throughput(&r, shape, rss))
}

async fn latency(args: &Args) -> anyhow::Result<Latency> {
    eprintln!("latency: 10 000 sensors x 1 reading/s for {:?} ...", args.measure);
    let dir = scratch_dir("bench-latency");
    let _cleanup = system::RemoveOnDrop(dir.clone());
    let pair = Pair::on_free_ports();
    let primary = start_server(&pair, true, &[], &dir)?;
    let _backup = start_server(&pair, false, &[], &dir)?;
    // A host ticks its sensors spread over the second: 100 batches/s of
    // 100 readings each make 10 000 readings/s.
    let shape = LoadShape {
        connections: 1,
        in_flight: 64,
        sensors: 100,
        readings_per_sensor: 1,
        rate: Some(100.0),
        max_readings: None,
    };
    let r = load::run(&pair.primary_frontend, shape, Target::Server, args.warmup, args.measure).await?;
    let ms = |q: f64| r.rtt_us.value_at_quantile(q) as f64 / 1000.0;
    Ok(Latency {
        sensors: 10_000,
        readings_acked: r.acked,
        p50_ms: ms(0.5),
        p99_ms: ms(0.99),
        p999_ms: ms(0.999),
        max_ms: r.rtt_us.max() as f64 / 1000.0,
        server_rss_mib: rss_mib(primary.child.id()),
    })
}


fn print_table(f: &Figures) {
    println!("{:<28} {:>16}  notes", "figure", "value");
    let t_line = |name: &str, t: &Throughput, extra: String| {
        println!(
            "{:<28} {:>12.0} r/s  {:.0} batches/s of {} readings ({} B), batch RTT p50 {:.2} ms p99 {:.2} ms{}",
            name, t.readings_per_s, t.batches_per_s, t.readings_per_batch, t.frame_bytes, t.batch_rtt_p50_ms, t.batch_rtt_p99_ms, extra
        );
    };
    if let Some(t) = &f.transport {
        t_line("transport ceiling", t, String::new());
    }
    if let Some(i) = &f.ingest {
        let mut extra = String::new();
        if let Some(frac) = f.ingest_fraction_of_transport {
            extra.push_str(&format!(", {:.0}% of transport", frac * 100.0));
        }
        if let Some(rss) = i.server_rss_mib {
            extra.push_str(&format!(", server RSS {rss:.0} MiB"));
        }
        t_line("ingest throughput", i, extra);
    }
    if let Some(l) = &f.latency {
        println!(
            "{:<28} {:>12.2} ms   p50 {:.2} ms, p99.9 {:.2} ms, max {:.2} ms over {} readings{}",
            "ack latency p99 (10k x 1/s)",
            l.p99_ms,
            l.p50_ms,
            l.p999_ms,
            l.max_ms,
            l.readings_acked,
            l.server_rss_mib.map(|r| format!(", server RSS {r:.0} MiB")).unwrap_or_default()
        );
    }
    if let Some(e) = &f.e2e {
        println!(
            "{:<28} {:>12.0} r/s  {} sensors every {} ms through fog-host; host RSS {:.0} MiB ({:.0} KiB/sensor){}",
            "end-to-end throughput",
            e.acked_per_s,
            e.sensors,
            e.interval_ms,
            e.host_rss_mib,
            e.host_rss_kib_per_sensor,
            e.server_rss_mib.map(|r| format!(", server RSS {r:.0} MiB")).unwrap_or_default()
        );
    }
    if let Some(r) = &f.recovery {
        println!(
            "{:<28} {:>12.0} ms   until a restarted server answers with all {} readings counted; data dir {:.0} MiB, {} readings written in {:.1} s",
            "recovery", r.ready_ms, r.counted, r.data_dir_mib, r.readings, r.write_s
        );
    }
    if let Some(fo) = &f.failover {
        println!(
            "{:<28} {:>12.0} ms   median of {} runs under {} sensors, max {:.0} ms; lost {}, duplicated {}",
            "failover", fo.median_ms, fo.runs, fo.sensors, fo.max_ms, fo.lost, fo.duplicated
        );
    }
}
