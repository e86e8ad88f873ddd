//! The `fog-host` command: parses flags and runs a fleet of sensors.
//!
//! Exit codes: 0 when every reading generated was acked, 1 on an error
//! (bad component, bad address, unusable state directory ...), 2 on bad
//! flags, 3 when readings were still unacked at the end (the drain timeout
//! passed, or a quarantined sensor holds them).

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Parser;
use fog_host::fleet::{Fleet, FleetConfig};
use fog_host::runtime::{Limits, SensorEngine, default_cache_dir, needs_of, read_component};
use fog_host::session::{self, SessionConfig, Summary};
use fog_host::state::StateStore;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::mpsc;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The longest duration any flag takes: the host's clocks add them (and
/// up to 64 intervals a visit) to the time, which must not overflow.
const MAX_DURATION: Duration = Duration::from_secs(100 * 365 * 24 * 60 * 60);

/// How often a start of many sensors says how far it is.
const START_PROGRESS_EVERY: Duration = Duration::from_secs(5);

/// Run roadside speed sensors (WebAssembly components) and send their
/// readings to a fog server pair.
///
/// Every sensor is a sandboxed instance of SENSOR.wasm (the sensor built from
/// this repository when no path is given). All sensors share one connection
/// to the active server; when it stops answering, the host fails over to the
/// other one and sends the unacked readings there.
///
/// Without --state-dir, a restarted host starts its sensors afresh: readings
/// buffered but not yet acked when the process died are lost, and the
/// sensors come back with new incarnations (so no reading id is reused).
/// With --state-dir, every sensor resumes where it was and resends them.
///
/// Each sensor is sandboxed: its memory is capped, every call into it has a
/// deadline, and one that traps, hangs or runs out of memory is restarted
/// from its last good state (with backoff) or, failing repeatedly,
/// quarantined. SIGHUP (or --watch) swaps in a new build of SENSOR.wasm
/// while running, moving every sensor's state over.
#[derive(Debug, Parser)]
#[command(name = "fog-host", version, max_term_width = 100)]
struct Args {
    /// Sensor component (a WebAssembly component of world fog:sensor/sensor@0.4.0, e.g. built for wasm32-wasip2);
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

    /// How often every sensor produces a reading. The host visits each
    /// sensor as often, or every --visit-every when that is longer.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    interval: Duration,

    /// How often each sensor is visited at most: with a shorter --interval
    /// each visit makes the readings of several intervals (stamped an
    /// interval apart), which costs a call into the sandbox per visit
    /// instead of per reading. At most 64 readings a visit. Readings then
    /// reach the servers up to this late: give the servers a --lateness a
    /// second longer, or they revise windows already published.
    #[arg(long, default_value = "100ms", value_parser = parse_duration)]
    visit_every: Duration,

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

    /// Sensors resend a reading not acked within this time (checked at
    /// each visit; with several readings a visit, give it at least two
    /// visits).
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    resend_after: Duration,

    /// Most unacked readings a sensor keeps; beyond that the oldest is dropped and counted.
    #[arg(long, default_value_t = 100_000)]
    max_buffered: u32,

    /// A setting passed to every sensor as key=value (repeatable), e.g. --set min-kmh=60.
    #[arg(long = "set", value_name = "KEY=VALUE", value_parser = parse_setting)]
    settings: Vec<(String, String)>,

    /// Keep every sensor's state in DIR (created if missing): its snapshots
    /// and each batch's readings, written before the batch leaves with one
    /// fsync; a host restarted with the same DIR resumes each sensor and
    /// resends its unacked readings.
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,

    /// Reload SENSOR.wasm when the file changes (as on SIGHUP) and move the
    /// sensors onto it without losing a reading.
    #[arg(long)]
    watch: bool,

    /// Largest linear memory one sensor may use, in MiB; growing past it
    /// stops the sensor.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=4096))]
    max_memory_mib: u32,

    /// Longest one call into a sensor may run before it is stopped (a call
    /// whose thread waited for the CPU meanwhile goes on while it spends
    /// under half of this more in CPU time, up to ten times this in all).
    #[arg(long, default_value = "100ms", value_parser = parse_duration)]
    call_deadline: Duration,

    /// Core instances the instance pool holds per sensor (with half as many
    /// memories and as many tables). The component loaded at start gets what
    /// it needs in any case; this is room for a component swapped in later
    /// that needs more (a componentize-py sensor needs 14).
    #[arg(long, default_value_t = 6, value_parser = clap::value_parser!(u32).range(1..=1024))]
    core_instances_per_sensor: u32,

    /// Keep compiled components in DIR, so a second start of the same
    /// component does not compile it again [default: $XDG_CACHE_HOME/fog or
    /// ~/.cache/fog].
    #[arg(long, value_name = "DIR")]
    cache_dir: Option<PathBuf>,

    /// Compile the component at every start; keep nothing.
    #[arg(long, conflicts_with = "cache_dir")]
    no_cache: bool,

    /// Wait before restarting a failed sensor; doubles with each failure in a row.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    restart_backoff: Duration,

    /// Failures in a row after which a sensor is quarantined instead of restarted.
    #[arg(long, default_value_t = 3)]
    max_restarts: u32,

    /// Threads that start and run sensors at the same time; default: one
    /// per CPU core.
    /// 1 runs every sensor on one thread. Below 512 sensors the host uses
    /// one thread whatever this says (starting threads would cost more than
    /// it saves).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    threads: Option<u32>,

    /// This host's CurveZMQ secret key file (from `fog-server keygen`); the
    /// servers must list its public key with rights for these sensor ids.
    #[arg(long, value_name = "FILE", requires = "server_keys")]
    key: Option<PathBuf>,

    /// The servers' public keys (.pub files or 40 Z85 characters), in the
    /// order of --servers; one key serves for all if both use it.
    // A Z85 key may start with '-': it is a value, not a flag.
    #[arg(long, value_name = "KEY,KEY", value_delimiter = ',', requires = "key", allow_hyphen_values = true)]
    server_keys: Vec<String>,

    /// Where /metrics (Prometheus), /healthz and /readyz are served, or
    /// `off` [default: 127.0.0.1:9103; if it is taken, the host runs
    /// without them and says so]. Beyond loopback needs --metrics-token-file.
    #[arg(long, value_name = "IP:PORT|off")]
    metrics_bind: Option<fog_observe::Bind>,

    /// A file holding the bearer token scrapers must send
    /// (`Authorization: Bearer <token>`; Prometheus: `credentials_file`).
    #[arg(long, value_name = "FILE")]
    metrics_token_file: Option<PathBuf>,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| format!("{e} (examples: 500ms, 1s, 2m)"))?;
    if d > MAX_DURATION {
        return Err("at most 100 years".into());
    }
    Ok(d)
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
        // Colours only for a person at a terminal, not in log files.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
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
        fog_transport::check_endpoint(server)
            .map_err(|e| anyhow::anyhow!("bad server endpoint `{server}`: {e} (expected e.g. tcp://127.0.0.1:5001)"))?;
    }
    let keys = match &args.key {
        None => None,
        Some(path) => {
            let keys = fog_transport::Keypair::read(path).context("--key")?;
            let servers = args
                .server_keys
                .iter()
                .map(|k| fog_transport::PublicKey::from_arg(k))
                .collect::<Result<Vec<_>, _>>()
                .context("--server-keys")?;
            if servers.len() != 1 && servers.len() != args.servers.len() {
                bail!("--server-keys has {} keys for {} servers: give one per server, or one for all", servers.len(), args.servers.len());
            }
            Some(session::HostKeys { keys: Arc::new(keys), servers })
        }
    };
    if args.interval.is_zero() {
        bail!("--interval must be greater than zero");
    }

    if args.call_deadline.is_zero() {
        bail!("--call-deadline must be greater than zero");
    }
    if args.watch && args.component.is_none() {
        bail!("--watch needs a SENSOR.wasm path to watch");
    }
    let metrics = fog_observe::Endpoint::from_flags(args.metrics_bind, std::net::SocketAddr::from(([127, 0, 0, 1], 9103)), args.metrics_token_file.as_deref())?;
    // Multi-threaded (with one worker for the sockets) because calls into
    // sensors step out of the runtime with `block_in_place`, which a
    // current-thread runtime does not allow.
    let tokio = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let _runtime = tokio.enter();
    // Served from the start: /healthz says "not started" while sensors load.
    let health = match &metrics {
        Some(endpoint) => {
            let health = Arc::new(fog_observe::Health::default());
            fog_observe::serve_or_warn(endpoint, health.clone())?.map(|_| health)
        }
        None => None,
    };
    // Before the (possibly long) start, so an early SIGHUP does not kill us.
    let (reload_tx, reload_rx) = mpsc::unbounded_channel();
    let mut hangup = signal(SignalKind::hangup()).context("cannot listen for SIGHUP")?;
    let hup_tx = reload_tx.clone();
    tokio.spawn(async move {
        while hangup.recv().await.is_some() {
            if hup_tx.send(()).is_err() {
                break;
            }
        }
    });
    if let (true, Some(path)) = (args.watch, args.component.clone()) {
        tokio.spawn(watch(path, reload_tx));
    }

    // The pool is sized for the component: read it first.
    let (origin, bytes) = read_component(args.component.as_deref())?;
    let needs = needs_of(&origin, &bytes)?;
    let limits = Limits {
        max_memory_bytes: (args.max_memory_mib as usize) << 20,
        call_deadline: args.call_deadline,
        // Twice the fleet: a hot swap holds the old and new instance of
        // every sensor for a moment. Unused slots cost address space only.
        max_instances: args.sensors.saturating_mul(2).saturating_add(16),
        per_instance: Limits::pool_for(&needs, args.core_instances_per_sensor),
    };
    let cache_dir = if args.no_cache { None } else { args.cache_dir.clone().or_else(default_cache_dir) };
    let engine = Arc::new(SensorEngine::new(limits, cache_dir.as_deref())?);
    let component = engine.from_bytes(origin, &bytes)?;
    let origin = component.origin.clone();
    let mut saved_epoch = None;
    let store = match &args.state_dir {
        None => None,
        Some(dir) => {
            let opened = StateStore::open(dir)?;
            if opened.torn_bytes > 0 {
                tracing::warn!(
                    "{}: cut off {} bytes of an unfinished write (the host stopped mid-commit; nothing sent depended on it)",
                    dir.display(),
                    opened.torn_bytes
                );
            }
            tracing::info!("{}: saved state of {} sensors", dir.display(), opened.saved.len());
            saved_epoch = opened.epoch;
            Some((opened.store, opened.saved))
        }
    };
    let readings_per_visit = session::readings_per_visit(args.interval, args.visit_every);
    let visit_every = args.interval.saturating_mul(readings_per_visit);
    let fleet_config = FleetConfig {
        first_id: args.first_id,
        count: args.sensors,
        segments: args.segments,
        resend_after_ms: args.resend_after.as_millis() as u64,
        max_buffered: args.max_buffered,
        settings: args.settings.clone(),
        seed: rand::random(),
        restart_backoff: args.restart_backoff,
        max_restarts: args.max_restarts,
        threads: match args.threads {
            Some(n) => n as usize,
            None => std::thread::available_parallelism().map_or(1, |n| n.get()),
        },
        every_ms: u32::try_from(args.interval.as_millis()).unwrap_or(u32::MAX),
    };
    let started = std::time::Instant::now();
    let count = fleet_config.count;
    // A large fleet takes a while: a line every few seconds says how far.
    let last_line = std::sync::Mutex::new(started);
    let progress = |done: usize| {
        let mut last = last_line.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if last.elapsed() >= START_PROGRESS_EVERY && done < count as usize {
            *last = std::time::Instant::now();
            tracing::info!("starting sensors: {done} of {count} in {:.1?}", started.elapsed());
        }
    };
    let mut fleet = Fleet::start_reporting(engine, component, fleet_config, store, std::time::Instant::now(), &progress)
        .context("cannot start sensors")?;
    tracing::info!(
        "started {} sensors of {} in {:.1?}; servers {}",
        fleet.len(),
        origin,
        started.elapsed(),
        args.servers.join(", ")
    );
    if readings_per_visit > 1 {
        tracing::info!(
            "each sensor is visited every {visit_every:?} and makes {readings_per_visit} readings a visit (--interval {:?}, --visit-every {:?})",
            args.interval,
            args.visit_every
        );
        if args.resend_after < visit_every.saturating_mul(2) {
            tracing::warn!(
                "--resend-after {:?} is shorter than two visits: a reading whose ack has not come by its sensor's next visit is sent again (a host behind its round resends what is on its way); consider --resend-after {:?}",
                args.resend_after,
                visit_every.saturating_mul(3)
            );
        }
    }
    let session_config = SessionConfig {
        servers: args.servers.clone(),
        interval: args.interval,
        readings_per_visit,
        timeout: args.timeout,
        duration: args.duration,
        drain_timeout: args.drain_timeout,
        progress: (!args.quiet).then_some(args.progress),
        component: args.component.clone(),
        keys,
        epoch: saved_epoch,
        health,
    };
    let summary = tokio.block_on(async {
        let shutdown = async {
            let _ = tokio::signal::ctrl_c().await;
        };
        session::run(&mut fleet, &session_config, shutdown, reload_rx).await
    });
    if args.json {
        println!("{}", serde_json::to_string(&summary).context("cannot encode the summary")?);
    } else {
        print_summary(&summary);
    }
    Ok(if summary.drained && summary.unacked == 0 { ExitCode::SUCCESS } else { ExitCode::from(3) })
}

/// Asks for a reload whenever the file's modification time or size changes
/// and then holds still for one poll (so a file being written is not loaded
/// half-way).
async fn watch(path: PathBuf, reload: mpsc::UnboundedSender<()>) {
    const POLL: Duration = Duration::from_millis(500);
    let stamp = |p: &PathBuf| std::fs::metadata(p).ok().map(|m| (m.modified().ok(), m.len()));
    let mut loaded = stamp(&path);
    let mut seen = loaded;
    loop {
        tokio::time::sleep(POLL).await;
        let now = stamp(&path);
        if now.is_some() && now == seen && now != loaded {
            loaded = now;
            tracing::info!("{} changed", path.display());
            if reload.send(()).is_err() {
                return;
            }
        }
        seen = now;
    }
}

fn print_summary(s: &Summary) {
    eprintln!(
        "summary: {} sensors, {} readings generated, {} acked, {} unacked, {} resent, {} averages received, {} failovers, \
         {} sensor failures, {} restarts, {} quarantined, {} swaps, {:.1}s",
        s.sensors,
        s.generated,
        s.acked,
        s.unacked,
        s.resent,
        s.averages_received,
        s.failovers,
        s.failed_sensors,
        s.restarts,
        s.quarantined,
        s.swaps,
        s.elapsed_s
    );
    if s.averages_missed > 0 || s.averages_superseded > 0 {
        eprintln!(
            "  averages missed (fell behind the servers' retention): {}; superseded (applied from a branch \
             abandoned after a server split, then replaced): {}",
            s.averages_missed, s.averages_superseded
        );
    }
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
