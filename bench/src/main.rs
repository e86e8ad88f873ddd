//! `fog-bench`: measures the fog system with its real binaries on loopback
//! and prints figures (no pass/fail: speed is measured, not asserted).
//!
//! Every benchmark runs twice by default, once without keys and once with
//! CurveZMQ on every socket ([`pair`]), one right after the other, so the
//! cost of the security is read off two rows measured on the same machine
//! in the same minute:
//!
//! - `transport`: the ceiling — a bare libzmq DEALER→ROUTER echo of the
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
//! - `uplink`: messages and readings per second JetStream acks from a bare
//!   async-nats publisher of the uplink's messages, into an R3 stream of a
//!   3-node NATS cluster on loopback ([`uplink`]); needs `nats-server`;
//! - `all` (the default): all of the above in one run, so the ratio to the
//!   transport ceiling holds on a noisy machine (`uplink` only where
//!   `nats-server` is installed).

mod echo;
mod load;
mod pair;
mod system;
mod uplink;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use fog_testkit::{Proc, bin, free_port, rss_mib, scratch_dir, wait_for};
use load::{LoadResult, LoadShape, Target};
use pair::{Endpoint, Keys, Security, ServerPair};
use serde::Serialize;

/// Measure the fog system with its real binaries on loopback.
///
/// Build first with `cargo build --release`; fog-bench starts
/// target/release/fog-server itself (and refuses one older than its source)
/// and prints one table (or with --json one JSON object) of figures.
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

    /// Print the figures as one JSON object on stdout: {"none": {...},
    /// "curve": {...}}, one set of figures per security mode.
    #[arg(long, global = true)]
    json: bool,

    /// Run each benchmark without keys (`none`), with CurveZMQ on every
    /// socket (`curve`), or both, one right after the other.
    #[arg(long, value_enum, default_value_t = Modes::Both, global = true)]
    security: Modes,

    /// Load-generator connections (simulated hosts).
    #[arg(long, default_value_t = 2, global = true)]
    connections: usize,

    /// Batches in flight per connection.
    #[arg(long, default_value_t = 4, global = true)]
    in_flight: usize,

    /// Simulated sensors per connection in the throughput benchmarks; each
    /// batch carries all of them. A batch may carry at most 65 536 sensors
    /// and 65 536 readings (the protocol's caps).
    #[arg(long, default_value_t = 1000, global = true)]
    sensors: u32,

    /// Readings per sensor in each throughput batch.
    #[arg(long, default_value_t = 10, global = true)]
    readings_per_sensor: u32,

    /// Sensors of the host in the end-to-end benchmark.
    #[arg(long, default_value_t = 10_000, global = true)]
    host_sensors: u32,

    /// Reading interval of the host's sensors in the end-to-end benchmark
    /// (the host visits each every 100 ms and takes the readings of the
    /// intervals since: 5 ms offers 2 000 000 readings/s from 10 000
    /// sensors, more than the machine carries, so the figure is what it
    /// does carry).
    #[arg(long, default_value = "5ms", value_parser = parse_duration, global = true)]
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

    /// Readings per message in the uplink benchmark (JSON, ~100 bytes each).
    #[arg(long, default_value_t = 1000, global = true)]
    uplink_readings: usize,

    /// Publishes awaiting their JetStream ack, at most, in the uplink benchmark.
    #[arg(long, default_value_t = 64, global = true)]
    uplink_in_flight: usize,

    /// Readings the fog pair counts while the cloud is away, and then
    /// forwards, in the uplink benchmark.
    #[arg(long, default_value_t = 1_000_000, global = true)]
    uplink_fog_readings: u64,
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
    /// Readings/s into an R3 JetStream stream on a 3-node NATS cluster
    /// (needs nats-server).
    Uplink,
    /// Run the bare echo server (used by `transport`).
    #[command(hide = true)]
    EchoServer {
        endpoint: String,
        #[arg(long, requires = "authorized_keys")]
        key: Option<PathBuf>,
        #[arg(long, requires = "key")]
        authorized_keys: Option<PathBuf>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Modes {
    None,
    Curve,
    Both,
}

impl Modes {
    fn list(self) -> &'static [Security] {
        match self {
            Modes::None => &[Security::None],
            Modes::Curve => &[Security::Curve],
            Modes::Both => &[Security::None, Security::Curve],
        }
    }
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{e} (examples: 500ms, 10s)"))
}

/// The figures of each security mode that ran.
#[derive(Debug, Default, Serialize)]
struct Report {
    #[serde(skip_serializing_if = "Option::is_none")]
    none: Option<Figures>,
    #[serde(skip_serializing_if = "Option::is_none")]
    curve: Option<Figures>,
}

impl Report {
    fn of(&mut self, security: Security) -> &mut Figures {
        match security {
            Security::None => self.none.get_or_insert_default(),
            Security::Curve => self.curve.get_or_insert_default(),
        }
    }

    fn modes(&self) -> impl Iterator<Item = (Security, &Figures)> {
        [(Security::None, &self.none), (Security::Curve, &self.curve)].into_iter().filter_map(|(s, f)| f.as_ref().map(|f| (s, f)))
    }
}

#[derive(Debug, Default, Serialize)]
struct Figures {
    #[serde(skip_serializing_if = "Option::is_none")]
    transport: Option<Throughput>,
    #[serde(skip_serializing_if = "Option::is_none")]
    ingest: Option<Throughput>,
    #[serde(skip_serializing_if = "Option::is_none")]
    ingest_fraction_of_transport: Option<f64>,
    /// Ingest with the servers' metrics endpoints off, measured right
    /// before `ingest` (on, scraped every second).
    #[serde(skip_serializing_if = "Option::is_none")]
    ingest_metrics_off: Option<Throughput>,
    #[serde(skip_serializing_if = "Option::is_none")]
    latency: Option<Latency>,
    #[serde(skip_serializing_if = "Option::is_none")]
    e2e: Option<system::EndToEnd>,
    #[serde(skip_serializing_if = "Option::is_none")]
    failover: Option<system::Failover>,
    #[serde(skip_serializing_if = "Option::is_none")]
    recovery: Option<system::Recovery>,
    #[serde(skip_serializing_if = "Option::is_none")]
    uplink: Option<uplink::Uplink>,
}

#[derive(Debug, Serialize)]
struct Throughput {
    readings_per_s: f64,
    batches_per_s: f64,
    readings_per_batch: u64,
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
    if let What::EchoServer { endpoint, key, authorized_keys } = what {
        return echo::serve(endpoint, key.as_deref().zip(authorized_keys.as_deref())).await;
    }
    shape(&args).check().context("the throughput load (--sensors, --readings-per-sensor, --in-flight)")?;
    let uplink_shape = uplink::UplinkShape { readings_per_message: args.uplink_readings, max_in_flight: args.uplink_in_flight };
    // The uplink runs where nats-server is: asked for alone it must be
    // there; in `all` it is left out without it, and said so.
    let uplink_wanted = match what {
        What::Uplink => {
            uplink_shape.check()?;
            fog_testkit::nats::nats_server().context("the uplink benchmark needs nats-server (apt-get install nats-server)")?;
            true
        }
        What::All => match fog_testkit::nats::nats_server() {
            Some(_) => uplink_shape.check().map(|()| true)?,
            None => {
                eprintln!("uplink: left out, nats-server is not installed (apt-get install nats-server)");
                false
            }
        },
        _ => false,
    };
    // The binaries the benchmarks start, built from the current source: a
    // stale or missing one is one error line that says what to build.
    let needs_server = !matches!(what, What::Transport | What::Uplink);
    let needs_host = matches!(what, What::All | What::E2e | What::Failover);
    for (name, needed) in [("fog-server", needs_server), ("fog-host", needs_host)] {
        if needed {
            bin(name)?;
        }
    }
    let modes = args.security.list();
    let mut report = Report::default();
    let all = matches!(what, What::All);
    // Each benchmark runs in every mode before the next one starts, so the
    // rows compared were measured close together.
    if all || matches!(what, What::Transport) {
        for &s in modes {
            report.of(s).transport = Some(transport(&args, s).await?);
        }
    }
    if all || matches!(what, What::Ingest) {
        for &s in modes {
            report.of(s).ingest_metrics_off = Some(ingest(&args, s, false).await?);
            report.of(s).ingest = Some(ingest(&args, s, true).await?);
        }
    }
    for &s in modes {
        let f = report.of(s);
        if let (Some(t), Some(i)) = (&f.transport, &f.ingest) {
            f.ingest_fraction_of_transport = Some(i.readings_per_s / t.readings_per_s);
        }
    }
    if all || matches!(what, What::Latency) {
        for &s in modes {
            report.of(s).latency = Some(latency(&args, s).await?);
        }
    }
    if all || matches!(what, What::E2e) {
        for &s in modes {
            eprintln!("e2e [{}]: fog-host with {} sensors every {:?} for {:?} ...", s.name(), args.host_sensors, args.host_interval, args.measure);
            let (sensors, interval, measure) = (args.host_sensors, args.host_interval, args.measure);
            report.of(s).e2e = Some(tokio::task::spawn_blocking(move || system::end_to_end(s, sensors, interval, measure)).await??);
        }
    }
    if all || matches!(what, What::Failover) {
        for &s in modes {
            eprintln!("failover [{}]: kill -9 the active server under {} sensors, {} runs ...", s.name(), args.failover_sensors, args.failover_runs);
            report.of(s).failover = Some(system::failover(s, args.failover_sensors, args.failover_runs).await?);
        }
    }
    if all || matches!(what, What::Recovery) {
        for &s in modes {
            eprintln!("recovery [{}]: restart a server whose log holds {} readings ...", s.name(), args.recovery_readings);
            report.of(s).recovery = Some(system::recovery(s, args.recovery_readings, shape(&args)).await?);
        }
    }
    if uplink_wanted {
        // The bare publisher does not depend on the site's security; it
        // runs in each mode so that the fog uplink of that mode has its
        // ceiling measured right beside it.
        for &s in modes {
            report.of(s).uplink = Some(uplink::run(uplink_shape, s, args.uplink_fog_readings, args.warmup, args.measure).await?);
        }
    }
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print_table(&report);
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
        readings_per_batch: shape.readings_per_batch(),
        frame_bytes: r.frame_bytes,
        batch_rtt_p50_ms: r.rtt_us.value_at_quantile(0.5) as f64 / 1000.0,
        batch_rtt_p99_ms: r.rtt_us.value_at_quantile(0.99) as f64 / 1000.0,
        server_rss_mib: rss,
    }
}

async fn transport(args: &Args, security: Security) -> anyhow::Result<Throughput> {
    eprintln!("transport [{}]: bare echo of the ingest frames for {:?} ...", security.name(), args.measure);
    let dir = scratch_dir("bench-transport")?;
    let _cleanup = system::RemoveOnDrop(dir.clone());
    let port = free_port()?;
    let address = format!("tcp://127.0.0.1:{port}");
    let exe = std::env::current_exe().context("own path")?;
    let mut echo_args = vec!["echo-server".to_string(), address.clone()];
    // The echo takes the primary's keys and authorized-keys file.
    let keys = match security {
        Security::None => None,
        Security::Curve => Some(Keys::generate(&dir)?),
    };
    if let Some(keys) = &keys {
        echo_args.extend(keys.server_args(true));
    }
    let mut echo = Proc::spawn("echo", &exe, &echo_args, &dir)?;
    wait_for("the echo server to listen", Duration::from_secs(10), || {
        let exited = !matches!(echo.child.try_wait(), Ok(None));
        (exited || std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()).then_some(())
    })?;
    if let Ok(Some(exit)) = echo.child.try_wait() {
        anyhow::bail!("the echo server exited ({exit}):\n{}", echo.log_tail(10));
    }
    let shape = shape(args);
    let endpoint = Endpoint { address, curve: keys.as_ref().map(|k| k.client(true)) };
    let r = load::run(&endpoint, shape, Target::Echo, args.warmup, args.measure)
        .await
        .with_context(|| format!("echo log:\n{}", echo.log_tail(10)))?;
    drop(echo);
    Ok(throughput(&r, shape, None))
}

/// Ingest into a pair; with `metrics`, both servers serve `/metrics` and a
/// scraper reads both every second (Prometheus scrapes every 15 s by
/// default: this is the heavier case).
async fn ingest(args: &Args, security: Security, metrics: bool) -> anyhow::Result<Throughput> {
    let on = if metrics { "metrics on, scraped every second" } else { "metrics off" };
    eprintln!("ingest [{}]: load generator into primary + backup for {:?}, {on} ...", security.name(), args.measure);
    let dir = scratch_dir("bench-ingest")?;
    let _cleanup = system::RemoveOnDrop(dir.clone());
    let pair = ServerPair::new(security, &dir)?;
    let pair = if metrics { pair } else { pair.without_metrics() };
    let primary = pair.start(true)?;
    let _backup = pair.start(false)?;
    let shape = shape(args);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let scraper = pair.metrics.clone().map(|addrs| {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut scraped = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                for addr in &addrs {
                    scraped += u64::from(fog_testkit::http::get(addr, "/metrics", None).is_ok_and(|r| r.status == 200));
                }
                std::thread::sleep(Duration::from_secs(1));
            }
            scraped
        })
    });
    let r = load::run(&pair.frontend(true), shape, Target::Server, args.warmup, args.measure).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    if let Some(scraper) = scraper {
        let scraped = scraper.join().unwrap_or(0);
        if scraped == 0 {
            anyhow::bail!("the servers' /metrics never answered during the ingest benchmark");
        }
    }
    let r = r?;
    let rss = rss_mib(primary.child.id());
    Ok(throughput(&r, shape, rss))
}

async fn latency(args: &Args, security: Security) -> anyhow::Result<Latency> {
    eprintln!("latency [{}]: 10 000 sensors x 1 reading/s for {:?} ...", security.name(), args.measure);
    let dir = scratch_dir("bench-latency")?;
    let _cleanup = system::RemoveOnDrop(dir.clone());
    let pair = ServerPair::new(security, &dir)?;
    let primary = pair.start(true)?;
    let _backup = pair.start(false)?;
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
    let r = load::run(&pair.frontend(true), shape, Target::Server, args.warmup, args.measure).await?;
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

/// One line per figure and security mode; the modes of a figure are
/// adjacent so they read side by side.
fn print_table(report: &Report) {
    println!("{:<28} {:<8} {:>16}  notes", "figure", "security", "value");
    let rows = |name: &str, row: &dyn Fn(&Figures) -> Option<(String, String)>| {
        for (security, figures) in report.modes() {
            if let Some((value, notes)) = row(figures) {
                println!("{name:<28} {:<8} {value:>16}  {notes}", security.name());
            }
        }
    };
    let throughput_notes = |t: &Throughput| {
        format!(
            "{:.0} batches/s of {} readings ({} B), batch RTT p50 {:.2} ms p99 {:.2} ms",
            t.batches_per_s, t.readings_per_batch, t.frame_bytes, t.batch_rtt_p50_ms, t.batch_rtt_p99_ms
        )
    };
    let rss = |r: Option<f64>| r.map(|r| format!(", server RSS {r:.0} MiB")).unwrap_or_default();
    rows("transport ceiling", &|f| f.transport.as_ref().map(|t| (format!("{:.0} r/s", t.readings_per_s), throughput_notes(t))));
    rows("ingest throughput", &|f| {
        let i = f.ingest.as_ref()?;
        let fraction = f.ingest_fraction_of_transport.map(|x| format!(", {:.0}% of transport", x * 100.0)).unwrap_or_default();
        Some((format!("{:.0} r/s", i.readings_per_s), format!("{}{fraction}{}", throughput_notes(i), rss(i.server_rss_mib))))
    });
    rows("ingest, metrics off", &|f| {
        let (off, on) = (f.ingest_metrics_off.as_ref()?, f.ingest.as_ref()?);
        Some((
            format!("{:.0} r/s", off.readings_per_s),
            format!("with metrics on and scraped every second: {:+.1}%", (on.readings_per_s / off.readings_per_s - 1.0) * 100.0),
        ))
    });
    rows("ack latency p99 (10k x 1/s)", &|f| {
        let l = f.latency.as_ref()?;
        Some((
            format!("{:.2} ms", l.p99_ms),
            format!(
                "p50 {:.2} ms, p99.9 {:.2} ms, max {:.2} ms over {} readings{}",
                l.p50_ms,
                l.p999_ms,
                l.max_ms,
                l.readings_acked,
                rss(l.server_rss_mib)
            ),
        ))
    });
    rows("end-to-end throughput", &|f| {
        let e = f.e2e.as_ref()?;
        Some((
            format!("{:.0} r/s", e.acked_per_s),
            format!(
                "{} sensors every {} ms through fog-host, {:.1} s with the drain; host RSS {:.0} MiB ({:.0} KiB/sensor){}",
                e.sensors,
                e.interval_ms,
                e.elapsed_s,
                e.host_rss_mib,
                e.host_rss_kib_per_sensor,
                rss(e.server_rss_mib)
            ),
        ))
    });
    rows("recovery", &|f| {
        let r = f.recovery.as_ref()?;
        Some((
            format!("{:.0} ms", r.ready_ms),
            format!(
                "until a restarted server answers with all {} readings counted; data dir {:.0} MiB, {} readings written in {:.1} s",
                r.counted, r.data_dir_mib, r.readings, r.write_s
            ),
        ))
    });
    rows("uplink, fog pair", &|f| {
        let u = f.uplink.as_ref()?;
        Some((
            format!("{:.0} r/s", u.fog.items_per_s),
            format!(
                "{} items drained in {:.1} s after the cloud came back, {:.0} msg/s; {:.0}% of the bare publisher",
                u.fog.items,
                u.fog.seconds,
                u.fog.messages_per_s,
                u.fog.items_per_s / u.bare.readings_per_s * 100.0
            ),
        ))
    });
    rows("uplink, bare async-nats", &|f| {
        let u = f.uplink.as_ref()?;
        Some((
            format!("{:.0} r/s", u.bare.readings_per_s),
            format!(
                "{:.0} msg/s of {} readings ({} B), {:.1} MiB/s, {} acks in flight, R{} on {} NATS nodes",
                u.bare.messages_per_s, u.readings_per_message, u.message_bytes, u.bare.mib_per_s, u.max_in_flight, u.replicas, u.nats_nodes
            ),
        ))
    });
    rows("failover", &|f| {
        let fo = f.failover.as_ref()?;
        Some((
            format!("{:.0} ms", fo.median_ms),
            format!(
                "median of {} runs under {} sensors, max {:.0} ms; lost {}, duplicated {}",
                fo.runs, fo.sensors, fo.max_ms, fo.lost, fo.duplicated
            ),
        ))
    });
}
