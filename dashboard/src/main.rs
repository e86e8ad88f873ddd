//! `fog-dashboard`: reads its flags and runs [`fog_dashboard::run`] until
//! Ctrl-C or SIGTERM.
//!
//! Exit codes: 0 when stopped by a signal; 1 when it cannot do what the
//! flags ask (the token file cannot be read, the address cannot be bound);
//! 2 for bad flags, with one line saying which.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::Parser;
use fog_dashboard::Config;
use fog_dashboard::scrape::Endpoint;

/// At most this many `--server`s and `--host`s: each is scraped every second.
const MAX_SERVERS: usize = 8;
const MAX_HOSTS: usize = 64;

/// The live page of a fog site: the server pair, the road and the hosts, updating every second.
///
/// Every second fog-dashboard scrapes the /metrics endpoints of both fog-servers and of the
/// fog-hosts (each scrape within 1 s and 4 MiB; one that fails shows its process as DOWN), keeps
/// the last 10 minutes in memory, and serves one self-contained page at http://BIND/ (nothing
/// loaded from elsewhere; it works on a phone). It shows who is active, the epoch, whether the
/// passive is in sync and how far behind, readings counted per second, ack latency (p50, p99),
/// each road segment's average speed and advisory limit over time, failovers as marks on the
/// timeline, and every host with its sensors by state. The same data is at /api/live (JSON).
///
/// Beyond loopback the page needs --token-file, and visitors give the token as
/// `Authorization: Bearer TOKEN` or open http://BIND/?token=TOKEN.
#[derive(Debug, Parser)]
#[command(name = "fog-dashboard", version)]
struct Args {
    /// Where to serve the page (HOST:PORT). An address beyond loopback needs --token-file.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:8080")]
    bind: SocketAddr,

    /// A fog-server's metrics endpoint, http://HOST:PORT[/PATH] (/metrics unless a path is given); repeat for each server of the pair.
    #[arg(long = "server", value_name = "URL", default_values = ["http://127.0.0.1:9101", "http://127.0.0.1:9102"])]
    servers: Vec<Endpoint>,

    /// A fog-host's metrics endpoint, as --server; repeat for each host.
    #[arg(long = "host", value_name = "URL", default_values = ["http://127.0.0.1:9103"])]
    hosts: Vec<Endpoint>,

    /// A file holding one line, a bearer token: sent with every scrape (for metrics endpoints
    /// beyond loopback, started with --metrics-token-file), and required from the page's
    /// visitors when --bind is beyond loopback.
    #[arg(long, value_name = "FILE")]
    token_file: Option<PathBuf>,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .init();
    let args = match Args::try_parse() {
        Ok(args) => args,
        Err(e) if matches!(e.kind(), clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion) => {
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            // clap's first line says what is wrong; its usage block does not fit one line.
            let text = e.to_string();
            let first = text.lines().next().unwrap_or("bad arguments").trim_start_matches("error: ");
            eprintln!("fog-dashboard: {first} (see --help)");
            return ExitCode::from(2);
        }
    };
    if let Err(e) = check(&args) {
        eprintln!("fog-dashboard: {e} (see --help)");
        return ExitCode::from(2);
    }
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("fog-dashboard: error: {e:#}");
            ExitCode::from(1)
        }
    }
}

/// What the flags alone can tell is wrong.
fn check(args: &Args) -> anyhow::Result<()> {
    if args.servers.len() > MAX_SERVERS {
        bail!("at most {MAX_SERVERS} --server endpoints, not {}", args.servers.len());
    }
    if args.hosts.len() > MAX_HOSTS {
        bail!("at most {MAX_HOSTS} --host endpoints, not {}", args.hosts.len());
    }
    if !args.bind.ip().is_loopback() && args.token_file.is_none() {
        bail!("--bind {} is beyond loopback: give --token-file, whose token every visitor then needs", args.bind);
    }
    Ok(())
}

fn run(args: Args) -> anyhow::Result<()> {
    let token = args.token_file.as_deref().map(read_token).transpose()?;
    let config = Config {
        bind: args.bind,
        servers: args.servers,
        hosts: args.hosts,
        scrape_token: token.clone(),
        page_token: if args.bind.ip().is_loopback() { None } else { token },
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async {
        let (stop, shutdown) = tokio::sync::watch::channel(false);
        let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).context("cannot listen for SIGTERM")?;
        tokio::spawn(async move {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = terminate.recv() => {}
            }
            tracing::info!("stopping");
            let _ = stop.send(true);
        });
        fog_dashboard::run(config, shutdown).await
    })
}

/// The token: the file's first line, without surrounding blanks, of at
/// least 16 visible characters.
fn read_token(path: &Path) -> anyhow::Result<String> {
    let meta = std::fs::metadata(path).with_context(|| format!("cannot read the token file {}", path.display()))?;
    if meta.len() > 4096 {
        bail!("the token file {} is {} bytes: it holds one line, the token", path.display(), meta.len());
    }
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read the token file {}", path.display()))?;
    let token = text.lines().next().unwrap_or("").trim();
    if token.is_empty() {
        bail!("the token file {} is empty: it holds one line, the token", path.display());
    }
    if !token.bytes().all(|b| b.is_ascii_graphic()) {
        bail!("the token in {} has characters an HTTP header cannot carry: use printable ASCII", path.display());
    }
    // As the servers' and hosts' --metrics-token-file, whose token this one usually is.
    if token.len() < 16 {
        bail!("the token in {} is {} characters: use at least 16", path.display(), token.len());
    }
    Ok(token.to_string())
}
