//! The `fog-server` command: parses flags and hands over to the library
//! (`fog_server::run` for a node, `fog_server::query_status` for `status`).
//!
//! Exit codes: 0 on success and on a clean shutdown (Ctrl-C, SIGTERM),
//! 1 on an error (printed as one `error: …` line on stderr), 2 on bad usage.

use std::io::IsTerminal;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{ArgGroup, Args, Parser, Subcommand};
use fog_server::{FsyncPolicy, Role, ServerConfig, WindowConfig};
use tracing_subscriber::EnvFilter;

/// glibc's malloc was 8 % of a loaded server's time (a vector per sensor
/// per batch, entries copied for the log, the passive and the tail).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// One node of a fog server pair: acks, deduplicates and averages the
/// readings of roadside speed sensors.
///
/// Run one node with --primary and one with --backup. The pair follows the
/// ZeroMQ guide's Binary Star pattern: the node that is active serves sensor
/// hosts, the other answers "not active" and takes over when its peer has
/// gone silent and a host asks it for service.
///
/// The active node acks a reading only once it is in its write-ahead log
/// and, while the passive is in sync, in the passive's too: an acked reading
/// survives the death of either node, or of both.
///
/// With --key and --authorized-keys every socket uses CurveZMQ: traffic is
/// encrypted and only listed keys get in, each with the rights the file
/// gives it (`fog-server keygen` makes keys). Without keys the node listens
/// on loopback only.
#[derive(Parser, Debug)]
#[command(name = "fog-server", version)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
#[command(group(ArgGroup::new("role").required(true).args(["primary", "backup"])))]
#[command(after_help = "Examples:\n  \
    fog-server --primary\n  \
    fog-server --backup\n  \
    fog-server status --json tcp://127.0.0.1:5002\n  \
    fog-server keygen keys/primary\n  \
    fog-server --primary --key keys/primary.secret --authorized-keys keys/authorized\n  \
    fog-server status --key keys/ops.secret --server-key keys/primary.pub\n  \
    curl http://127.0.0.1:9101/metrics      (and /healthz, /readyz)\n\n\
    Logs go to stderr; set RUST_LOG (e.g. RUST_LOG=debug) to change their level.")]
struct Cli {
    /// Run as the primary node (reference ports: frontend 5001, state 5003).
    #[arg(long)]
    primary: bool,

    /// Run as the backup node (reference ports: frontend 5002, state 5004).
    #[arg(long)]
    backup: bool,

    /// Address sensor hosts connect to [default: tcp://127.0.0.1:5001 for the
    /// primary, :5002 for the backup]. `tcp://*:PORT` listens on all
    /// interfaces.
    #[arg(long, value_name = "ADDR")]
    frontend: Option<String>,

    /// Address this node publishes its heartbeats on [default: :5003 for the
    /// primary, :5004 for the backup].
    #[arg(long, value_name = "ADDR")]
    state_bind: Option<String>,

    /// The peer's heartbeat address [default: :5004 for the primary, :5003
    /// for the backup].
    #[arg(long, value_name = "ADDR")]
    state_connect: Option<String>,

    /// Where this node keeps its write-ahead log and snapshots; it recovers
    /// from them on start [default: ./fog-data/primary or ./fog-data/backup].
    #[arg(long, value_name = "DIR")]
    data_dir: Option<std::path::PathBuf>,

    /// When the log is synced to disk before a reading is acked: `batch`
    /// syncs once per group of batches (group commit), `always` after every
    /// log entry, `never` leaves it to the OS (a power loss may then lose
    /// acked readings; a crash of the process does not).
    #[arg(long, value_name = "POLICY", default_value = "batch")]
    fsync: FsyncPolicy,

    /// Write a snapshot (and start a fresh log) after this many log entries.
    #[arg(long, value_name = "N", default_value_t = 10_000)]
    snapshot_every: u64,

    /// Interval between heartbeats; the peer counts as dead after two missed.
    #[arg(long, value_name = "DURATION", default_value = "250ms", value_parser = parse_duration)]
    heartbeat: Duration,

    /// How long after a window's end the first average waits for late readings.
    #[arg(long, value_name = "DURATION", default_value = "1s", value_parser = parse_duration)]
    lateness: Duration,

    /// How far back in event time late readings still revise averages; older
    /// readings are counted but averaged nowhere.
    #[arg(long, value_name = "DURATION", default_value = "10m", value_parser = parse_duration)]
    window_horizon: Duration,

    /// Most published averages kept for sensors that fell behind.
    #[arg(long, value_name = "N", default_value_t = 10_000)]
    retain_averages: usize,

    /// Published averages older than this are dropped; a sensor further
    /// behind is told what it missed.
    #[arg(long, value_name = "DURATION", default_value = "10m", value_parser = parse_duration)]
    retain_age: Duration,

    /// Readings stamped further back than this are acked but not counted,
    /// and the dedup state of sensors silent this long is compacted. Must be
    /// longer than any delay before a host resends (see the README's
    /// "Durability and failover") and at least --window-horizon; use the
    /// same value on both nodes.
    #[arg(long, value_name = "DURATION", default_value = "1h", value_parser = parse_duration)]
    dedup_horizon: Duration,

    /// Readings stamped further ahead of this node's clock are refused (not
    /// acked, not counted) until the clock catches up.
    #[arg(long, value_name = "DURATION", default_value = "1m", value_parser = parse_duration)]
    max_clock_skew: Duration,

    /// This node's CurveZMQ secret key file (from `fog-server keygen`).
    /// With it, every socket is encrypted and authenticated.
    #[arg(long, value_name = "FILE", requires = "authorized_keys")]
    key: Option<std::path::PathBuf>,

    /// The keys allowed in, one a line: `PUBLIC-KEY NAME RIGHTS`, with
    /// rights `sensors=FIRST-LAST,…`, `admin` (status) or `peer` (the other
    /// server). Re-read on SIGHUP.
    #[arg(long, value_name = "FILE", requires = "key")]
    authorized_keys: Option<std::path::PathBuf>,

    /// Serve without keys on addresses other than loopback: anyone who can
    /// reach them can send readings and read the status.
    #[arg(long, conflicts_with = "key")]
    insecure: bool,

    /// Where /metrics (Prometheus), /healthz and /readyz are served, or
    /// `off` [default: 127.0.0.1:9101 for the primary, :9102 for the
    /// backup; if the default is taken, the server runs without them and
    /// says so]. An address beyond loopback needs --metrics-token-file.
    #[arg(long, value_name = "IP:PORT|off")]
    metrics_bind: Option<fog_observe::Bind>,

    /// A file holding the bearer token scrapers must send
    /// (`Authorization: Bearer <token>`; Prometheus: `credentials_file`).
    #[arg(long, value_name = "FILE")]
    metrics_token_file: Option<std::path::PathBuf>,

    /// Forward every counted reading and published average, exactly once,
    /// to NATS JetStream while this node is active: the NATS servers,
    /// comma-separated (`tls://HOST:PORT`; plain `nats://` on loopback, or
    /// with --uplink-insecure). Give both nodes the same uplink flags.
    #[arg(long, value_name = "URLS", requires = "site")]
    uplink: Option<String>,

    /// The site's name: subjects `fog.<SITE>.readings.<SEGMENT>` and
    /// `fog.<SITE>.averages.<SEGMENT>` in the stream `FOG_<SITE>`.
    #[arg(long, value_name = "NAME", requires = "uplink")]
    site: Option<String>,

    /// NATS credentials: a `.creds` file, or `user = NAME` and
    /// `password = SECRET` lines, or a `token = SECRET` line.
    #[arg(long, value_name = "FILE", requires = "uplink")]
    uplink_creds: Option<std::path::PathBuf>,

    /// Most of what is not yet in the cloud kept, in bytes (K, M, G
    /// suffixes); past it the oldest is dropped, counted and logged, and
    /// the site keeps serving its sensors.
    #[arg(long, value_name = "BYTES", default_value = "256M", value_parser = parse_bytes, requires = "uplink")]
    uplink_backlog: u64,

    /// Replicas of the stream, when the uplink creates it (an existing
    /// stream is used as it is).
    #[arg(long, value_name = "N", default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=5), requires = "uplink")]
    uplink_replicas: u32,

    /// JetStream's duplicate window, when the uplink creates the stream.
    #[arg(long, value_name = "DURATION", default_value = "2m", value_parser = parse_duration, requires = "uplink")]
    uplink_duplicate_window: Duration,

    /// Allow plain `nats://` to a host other than loopback: the site's
    /// data then crosses the network unencrypted.
    #[arg(long, requires = "uplink")]
    uplink_insecure: bool,

    #[command(subcommand)]
    command: Option<Command>,
}

/// A duration flag, at most 100 years: the server adds them to its clocks
/// and multiplies some (three heartbeats), which must not overflow.
fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| e.to_string())?;
    if d > std::time::Duration::from_secs(100 * 365 * 24 * 60 * 60) {
        return Err("at most 100 years".into());
    }
    Ok(d)
}

/// `256M`, `1G`, `65536`: bytes.
fn parse_bytes(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (digits, unit) = match s.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((i, _)) => s.split_at(i),
        None => (s, ""),
    };
    let n: u64 = digits.parse().map_err(|_| format!("`{s}` is not a size (e.g. 65536, 256M, 2G)"))?;
    let unit = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 1,
        "K" | "KB" | "KIB" => 1 << 10,
        "M" | "MB" | "MIB" => 1 << 20,
        "G" | "GB" | "GIB" => 1 << 30,
        other => return Err(format!("`{other}` is not a size unit (K, M or G)")),
    };
    n.checked_mul(unit).filter(|&b| b > 0).ok_or_else(|| format!("`{s}` is not a size above 0 that fits in 64 bits"))
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Ask a running server for its state and counts.
    Status(StatusArgs),
    /// Write a new CurveZMQ keypair: BASE.secret (mode 0600, for the
    /// machine that uses it) and BASE.pub (to hand out), as Z85 text.
    Keygen(KeygenArgs),
}

#[derive(Args, Debug)]
struct KeygenArgs {
    /// Path and name of the key files, without suffix (e.g. keys/host-a).
    #[arg(value_name = "BASE")]
    base: std::path::PathBuf,
}

#[derive(Args, Debug)]
struct StatusArgs {
    /// The server's frontend address.
    #[arg(value_name = "ENDPOINT", default_value = "tcp://127.0.0.1:5001")]
    endpoint: String,

    /// Print the status as one JSON object on stdout.
    #[arg(long)]
    json: bool,

    /// Give up when the server has not answered within this time.
    #[arg(long, value_name = "DURATION", default_value = "2s", value_parser = parse_duration)]
    timeout: Duration,

    /// Secret key file of a key with the `admin` right (for a server run
    /// with keys).
    #[arg(long, value_name = "FILE", requires = "server_key")]
    key: Option<std::path::PathBuf>,

    /// The server's public key: its .pub file, or the 40 Z85 characters.
    // A Z85 key may start with '-': it is a value, not a flag.
    #[arg(long, value_name = "KEY", requires = "key", allow_hyphen_values = true)]
    server_key: Option<String>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // zmq.rs logs every reconnection attempt to a dead peer as a warning;
    // the driver already says when the peer goes silent and comes back.
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    match &cli.command {
        Some(Command::Status(args)) => runtime.block_on(status(args)),
        Some(Command::Keygen(args)) => keygen(args),
        None => runtime.block_on(serve(server_config(&cli)?)),
    }
}

fn keygen(args: &KeygenArgs) -> Result<()> {
    if let Some(dir) = args.base.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let pair = fog_transport::Keypair::generate()?;
    let (secret, public) = pair.write(&args.base)?;
    println!("{}", pair.public);
    eprintln!("wrote {} (keep it private) and {}", secret.display(), public.display());
    Ok(())
}

fn server_config(cli: &Cli) -> Result<ServerConfig> {
    let role = if cli.primary {
        Role::Primary
    } else {
        Role::Backup
    };
    let reference = ServerConfig::reference(role);
    let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
    if cli.heartbeat.is_zero() {
        anyhow::bail!("--heartbeat must be at least 1ms");
    }
    if cli.dedup_horizon < cli.window_horizon {
        anyhow::bail!(
            "--dedup-horizon ({}) must be at least --window-horizon ({}): a reading that can still revise an average must still be deduplicated",
            humantime::format_duration(cli.dedup_horizon),
            humantime::format_duration(cli.window_horizon)
        );
    }
    Ok(ServerConfig {
        role,
        frontend: cli.frontend.clone().unwrap_or(reference.frontend),
        state_bind: cli.state_bind.clone().unwrap_or(reference.state_bind),
        state_connect: cli.state_connect.clone().unwrap_or(reference.state_connect),
        heartbeat: cli.heartbeat,
        windows: WindowConfig {
            lateness_ms: ms(cli.lateness),
            horizon_ms: ms(cli.window_horizon),
            retain_averages: cli.retain_averages,
            retain_age_ms: ms(cli.retain_age),
            dedup_horizon_ms: ms(cli.dedup_horizon),
            max_clock_skew_ms: ms(cli.max_clock_skew),
        },
        data_dir: cli.data_dir.clone().unwrap_or(reference.data_dir),
        fsync: cli.fsync,
        snapshot_every: cli.snapshot_every.max(1),
        security: match (&cli.key, &cli.authorized_keys) {
            (Some(key), Some(access)) => fog_server::Security::Curve {
                keys: fog_transport::Keypair::read(key).context("--key")?,
                access: access.clone(),
            },
            _ => fog_server::Security::None { allow_remote: cli.insecure },
        },
        uplink: match (&cli.uplink, &cli.site) {
            (Some(urls), Some(site)) => {
                fog_server::uplink::check_site(site).map_err(|e| anyhow::anyhow!("--site: {e}"))?;
                fog_server::uplink::check_urls(urls, cli.uplink_insecure).map_err(|e| anyhow::anyhow!("--uplink: {e}"))?;
                Some(fog_server::uplink::UplinkConfig {
                    urls: urls.clone(),
                    creds: cli.uplink_creds.clone(),
                    site: site.clone(),
                    replicas: cli.uplink_replicas as usize,
                    duplicate_window: cli.uplink_duplicate_window,
                    backlog_bytes: cli.uplink_backlog,
                })
            }
            _ => None,
        },
        metrics: fog_observe::Endpoint::from_flags(
            cli.metrics_bind,
            std::net::SocketAddr::from(([127, 0, 0, 1], if role == Role::Primary { 9101 } else { 9102 })),
            cli.metrics_token_file.as_deref(),
        )?,
    })
}

async fn serve(cfg: ServerConfig) -> Result<()> {
    fog_server::run(cfg, shutdown_signal()).await?;
    Ok(())
}

/// Completes on Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => tracing::info!("interrupted (Ctrl-C)"),
                    _ = term.recv() => tracing::info!("terminated (SIGTERM)"),
                }
            }
            Err(e) => {
                tracing::warn!("cannot listen for SIGTERM: {e}");
                let _ = tokio::signal::ctrl_c().await;
                tracing::info!("interrupted (Ctrl-C)");
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
        tracing::info!("interrupted (Ctrl-C)");
    }
}

async fn status(args: &StatusArgs) -> Result<()> {
    let keys = match (&args.key, &args.server_key) {
        (Some(key), Some(server)) => Some(fog_server::ClientKeys {
            keys: fog_transport::Keypair::read(key).context("--key")?,
            server: fog_transport::PublicKey::from_arg(server).context("--server-key")?,
        }),
        _ => None,
    };
    let report = fog_server::query_status(&args.endpoint, args.timeout, keys.as_ref()).await?;
    if args.json {
        println!(
            "{}",
            serde_json::to_string(&report).context("cannot serialize the status")?
        );
    } else {
        println!("{}", fog_server::human_summary(&report));
    }
    Ok(())
}
