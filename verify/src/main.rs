//! `fog-verify`: a Jepsen-style fault verifier. It starts a primary, a
//! backup and one or more hosts as real processes, applies a seeded random
//! schedule of faults while the sensors produce, then heals everything,
//! lets the hosts drain, and checks every history (see [`check`]).
//!
//! Exit codes: 0 no violation, 1 violations found, 2 bad flags, 3 the run
//! itself could not be carried out (a process would not start ...).

mod check;

use std::path::PathBuf;
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use fog_e2e::{Pair, Proc, bin, finish_host, scratch_dir, server_status, start_server};
use serde::Serialize;

use check::Observation;

/// Run the fog system under a random schedule of faults and check that no
/// acked reading was lost, none counted twice, every sensor of a host got the
/// same averages, and at most one server was active per epoch.
///
/// Build first with `cargo build --release`. The same --seed replays the same
/// schedule of faults.
#[derive(Debug, Parser)]
#[command(name = "fog-verify", version, max_term_width = 100)]
struct Args {
    /// How long the sensors produce while faults are applied.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    duration: Duration,

    /// Seed of the fault schedule (default: from the clock; printed).
    #[arg(long)]
    seed: Option<u64>,

    /// Sensor hosts to run.
    #[arg(long, default_value_t = 1)]
    hosts: u32,

    /// Sensors per host.
    #[arg(long, default_value_t = 100)]
    sensors: u32,

    /// Reading interval of every sensor.
    #[arg(long, default_value = "100ms", value_parser = parse_duration)]
    interval: Duration,

    /// Mean time between faults.
    #[arg(long, default_value = "3s", value_parser = parse_duration)]
    fault_every: Duration,

    /// Faults to choose from: kill (kill -9 a server, restart it later),
    /// stop (SIGSTOP a server, SIGCONT later), host (kill -9 a host, restart
    /// it with its state dir).
    #[arg(long, value_delimiter = ',', default_value = "kill,stop,host")]
    faults: Vec<Fault>,

    /// Directory for data, state and logs (default: a fresh temp dir, kept).
    #[arg(long)]
    dir: Option<PathBuf>,

    /// Print the result as one JSON object on stdout.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
enum Fault {
    Kill,
    Stop,
    Host,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{e} (examples: 500ms, 60s, 30m)"))
}

/// A small deterministic generator (splitmix64): the schedule depends on
/// the seed alone.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    /// A duration uniformly in `[lo, hi]`.
    fn between(&mut self, lo: Duration, hi: Duration) -> Duration {
        let span = (hi - lo).as_millis() as u64;
        lo + Duration::from_millis(self.below(span + 1))
    }
}

struct ServerNode {
    name: &'static str,
    primary: bool,
    proc: Option<Proc>,
    stopped: bool,
    starts: u32,
    extra: Vec<String>,
}

struct HostNode {
    index: u32,
    proc: Option<Proc>,
    starts: u32,
    state_dir: Option<PathBuf>,
}

enum Pending {
    Restart(usize),
    Cont(usize),
    RestartHost(usize),
}

#[derive(Serialize)]
struct Report {
    seed: u64,
    duration_s: f64,
    hosts: u32,
    sensors_per_host: u32,
    schedule: Vec<String>,
    verdict: check::Verdict,
    ok: bool,
    dir: String,
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(report) => {
            if args.json {
                match serde_json::to_string(&report) {
                    Ok(s) => println!("{s}"),
                    Err(e) => eprintln!("error: cannot encode the report: {e}"),
                }
            }
            let v = &report.verdict;
            eprintln!(
                "checked {} sensors, {} readings: lost {}, duplicated {}, sum mismatches {}, unacked {}, averages missed {}, diverging average streams {}, epochs with two actives {:?}, unchecked incarnations {}",
                v.sensors_checked, v.readings_checked, v.lost, v.duplicated, v.sum_mismatches, v.unacked,
                v.averages_missed, v.diverging_average_streams, v.epochs_with_two_actives, v.unchecked_incarnations
            );
            for note in &v.notes {
                eprintln!("note: {note}");
            }
            if report.ok {
                eprintln!("verdict: OK (seed {}; data and logs in {})", report.seed, report.dir);
                ExitCode::SUCCESS
            } else {
                for violation in &v.violations {
                    eprintln!("violation: {violation}");
                }
                eprintln!("verdict: FAILED — replay with --seed {} (data and logs in {})", report.seed, report.dir);
                ExitCode::from(1)
            }
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(3)
        }
    }
}

/// Whether a binary's `--help` mentions a flag: lets the verifier use
/// durability features where the binaries have them.
fn supports(binary: &str, flag: &str) -> bool {
    Command::new(bin(binary))
        .arg("--help")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains(flag))
        .unwrap_or(false)
}

fn run(args: &Args) -> anyhow::Result<Report> {
    let seed = args.seed.unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(1)
    });
    let mut rng = Rng(seed);
    let dir = match &args.dir {
        Some(d) => {
            std::fs::create_dir_all(d).with_context(|| format!("cannot create {}", d.display()))?;
            d.clone()
        }
        None => scratch_dir("verify"),
    };
    eprintln!("fog-verify: seed {seed}, {:?}, {} host(s) x {} sensors, faults {:?}, dir {}", args.duration, args.hosts, args.sensors, args.faults, dir.display());

    let durable_servers = supports("fog-server", "--data-dir");
    let durable_hosts = supports("fog-host", "--state-dir");
    if !durable_servers {
        eprintln!("note: fog-server has no --data-dir: a restarted server starts empty");
    }
    let mut faults = args.faults.clone();
    if !durable_hosts && faults.contains(&Fault::Host) {
        eprintln!("note: fog-host has no --state-dir: host faults are left out");
        faults.retain(|f| *f != Fault::Host);
    }

    let pair = Pair::on_free_ports();
    let mut servers = Vec::new();
    for primary in [true, false] {
        let name = if primary { "primary" } else { "backup" };
        let mut extra = vec!["--lateness".to_string(), "500ms".to_string()];
        if durable_servers {
            extra.push("--data-dir".into());
            extra.push(dir.join(format!("{name}-data")).display().to_string());
        }
        servers.push(ServerNode { name, primary, proc: None, stopped: false, starts: 0, extra });
    }
    for i in 0..servers.len() {
        start_node(&pair, &mut servers[i], &dir)?;
    }

    let started = Instant::now();
    let end = started + args.duration;
    let mut hosts: Vec<HostNode> = (0..args.hosts)
        .map(|index| HostNode {
            index,
            proc: None,
            starts: 0,
            state_dir: durable_hosts.then(|| dir.join(format!("host{index}-state"))),
        })
        .collect();
    for h in hosts.iter_mut() {
        start_host_node(args, &pair, h, &dir, args.duration)?;
    }

    let mut schedule = Vec::new();
    let mut log = |started: Instant, what: String| {
        let line = format!("[{:>6.1}s] {what}", started.elapsed().as_secs_f64());
        eprintln!("{line}");
        schedule.push(line);
    };
    let mut observations = Vec::new();
    let mut pending: Vec<(Instant, Pending)> = Vec::new();
    let mut next_fault = started + rng.between(args.fault_every / 2, args.fault_every * 3 / 2);
    let mut next_poll = started;
    while Instant::now() < end {
        let now = Instant::now();
        if now >= next_poll {
            next_poll = now + Duration::from_millis(250);
            observe(&pair, &servers, started, &mut observations);
        }
        let (due, later): (Vec<_>, Vec<_>) = pending.drain(..).partition(|(at, _)| *at <= now);
        pending = later;
        for (_, action) in due {
            match action {
                Pending::Restart(i) => {
                    start_node(&pair, &mut servers[i], &dir)?;
                    log(started, format!("restarted {}", servers[i].name));
                }
                Pending::Cont(i) => {
                    signal(&servers[i], "CONT");
                    servers[i].stopped = false;
                    log(started, format!("SIGCONT {}", servers[i].name));
                }
                Pending::RestartHost(h) => {
                    let remaining = end.saturating_duration_since(Instant::now()).max(Duration::from_secs(1));
                    start_host_node(args, &pair, &mut hosts[h], &dir, remaining)?;
                    log(started, format!("restarted host {h} with its state dir"));
                }
            }
        }
        if now >= next_fault && !faults.is_empty() {
            next_fault = now + rng.between(args.fault_every / 2, args.fault_every * 3 / 2);
            let fault = faults[rng.below(faults.len() as u64) as usize];
            match fault {
                Fault::Kill | Fault::Stop => {
                    let up: Vec<usize> = (0..servers.len()).filter(|&i| servers[i].proc.is_some() && !servers[i].stopped).collect();
                    if up.is_empty() {
                        continue;
                    }
                    let i = up[rng.below(up.len() as u64) as usize];
                    let back_in = rng.between(Duration::from_millis(500), Duration::from_secs(4));
                    if fault == Fault::Kill {
                        if let Some(mut p) = servers[i].proc.take() {
                            p.kill();
                        }
                        log(started, format!("kill -9 {} (restart in {:.1}s)", servers[i].name, back_in.as_secs_f64()));
                        pending.push((now + back_in, Pending::Restart(i)));
                    } else {
                        signal(&servers[i], "STOP");
                        servers[i].stopped = true;
                        log(started, format!("SIGSTOP {} (SIGCONT in {:.1}s)", servers[i].name, back_in.as_secs_f64()));
                        pending.push((now + back_in, Pending::Cont(i)));
                    }
                }
                Fault::Host => {
                    let up: Vec<usize> = (0..hosts.len()).filter(|&h| hosts[h].proc.is_some()).collect();
                    if up.is_empty() {
                        continue;
                    }
                    let h = up[rng.below(up.len() as u64) as usize];
                    let back_in = rng.between(Duration::from_millis(300), Duration::from_secs(2));
                    if let Some(mut p) = hosts[h].proc.take() {
                        p.kill();
                    }
                    log(started, format!("kill -9 host {h} (restart in {:.1}s)", back_in.as_secs_f64()));
                    pending.push((now + back_in, Pending::RestartHost(h)));
                }
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }

    // Heal: resume and restart everything, then let the hosts drain.
    log(started, "healing: every server resumed or restarted, every host restarted".into());
    for (_, action) in pending.drain(..) {
        match action {
            Pending::Restart(i) => start_node(&pair, &mut servers[i], &dir)?,
            Pending::Cont(i) => {
                signal(&servers[i], "CONT");
                servers[i].stopped = false;
            }
            Pending::RestartHost(h) => start_host_node(args, &pair, &mut hosts[h], &dir, Duration::from_secs(1))?,
        }
    }
    let mut summaries = Vec::new();
    for h in hosts.iter_mut() {
        let proc = h.proc.take().context("every host runs after healing")?;
        let (code, summary) = finish_host(proc, Duration::from_secs(120)).with_context(|| format!("host {}", h.index))?;
        if code != 0 {
            log(started, format!("host {} exited with code {code}", h.index));
        }
        summaries.push(check::host_side(&summary));
    }
    observe(&pair, &servers, started, &mut observations);
    let final_status = final_counts(&pair)?;
    let verdict = check::check(&summaries, &check::server_side(&final_status), &observations);
    Ok(Report {
        seed,
        duration_s: args.duration.as_secs_f64(),
        hosts: args.hosts,
        sensors_per_host: args.sensors,
        schedule,
        ok: verdict.ok(),
        verdict,
        dir: dir.display().to_string(),
    })
}

fn start_node(pair: &Pair, node: &mut ServerNode, dir: &std::path::Path) -> anyhow::Result<()> {
    node.starts += 1;
    let extra: Vec<&str> = node.extra.iter().map(String::as_str).collect();
    let mut proc = start_server(pair, node.primary, &extra, dir)?;
    // Keep every incarnation's log.
    let log = dir.join(format!("{}-{}.log", node.name, node.starts));
    let _ = std::fs::rename(&proc.log, &log);
    proc.log = log;
    node.proc = Some(proc);
    node.stopped = false;
    Ok(())
}

fn start_host_node(args: &Args, pair: &Pair, h: &mut HostNode, dir: &std::path::Path, duration: Duration) -> anyhow::Result<()> {
    h.starts += 1;
    let mut a: Vec<String> = [
        "--sensors".to_string(),
        args.sensors.to_string(),
        "--first-id".into(),
        (1 + h.index * args.sensors).to_string(),
        "--interval".into(),
        humantime::format_duration(args.interval).to_string(),
        "--duration".into(),
        format!("{}ms", duration.as_millis()),
        "--drain-timeout".into(),
        "60s".into(),
        "--timeout".into(),
        "500ms".into(),
        "--servers".into(),
        pair.servers(),
        "--quiet".into(),
        "--json".into(),
    ]
    .into();
    if let Some(state) = &h.state_dir {
        a.push("--state-dir".into());
        a.push(state.display().to_string());
    }
    h.proc = Some(Proc::spawn(&format!("host{}-{}", h.index, h.starts), &bin("fog-host"), &a, dir)?);
    Ok(())
}

fn signal(node: &ServerNode, sig: &str) {
    if let Some(p) = &node.proc {
        let _ = Command::new("kill").arg(format!("-{sig}")).arg(p.child.id().to_string()).status();
    }
}

fn observe(pair: &Pair, servers: &[ServerNode], started: Instant, out: &mut Vec<Observation>) {
    for s in servers.iter().filter(|s| s.proc.is_some() && !s.stopped) {
        let endpoint = if s.primary { &pair.primary_frontend } else { &pair.backup_frontend };
        if let Ok(status) = server_status(endpoint) {
            out.push(Observation {
                at_s: started.elapsed().as_secs_f64(),
                node: s.name,
                state: status["state"].as_str().unwrap_or("").to_string(),
                epoch: status["epoch"].as_u64(),
            });
        }
    }
}

/// The counts to check: the active server's, once both servers agree (with
/// replication they converge); the larger one if they never do.
fn final_counts(pair: &Pair) -> anyhow::Result<serde_json::Value> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let p = server_status(&pair.primary_frontend).ok();
        let b = server_status(&pair.backup_frontend).ok();
        let counted = |s: &Option<serde_json::Value>| s.as_ref().and_then(|s| s["counted"].as_u64());
        let active = [&p, &b].into_iter().flatten().find(|s| s["state"] == "active").cloned();
        if counted(&p).is_some() && counted(&p) == counted(&b) {
            if let Some(a) = active {
                return Ok(a);
            }
        }
        if Instant::now() > deadline {
            eprintln!("note: the servers did not converge on one count within 15 s; checking the larger");
            let best = [p, b].into_iter().flatten().max_by_key(|s| s["counted"].as_u64().unwrap_or(0));
            match best {
                Some(s) => return Ok(s),
                None => bail!("no server answers status after healing"),
            }
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}
