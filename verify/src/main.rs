//! `fog-verify`: a Jepsen-style fault verifier. It starts a primary, a
//! backup and one or more hosts as real processes, applies a seeded random
//! schedule of faults while the sensors produce, then heals everything,
//! lets the hosts drain, and checks every history (see [`check`]).
//!
//! The servers, hosts and status queries use CurveZMQ keys made for the
//! run (see [`Cluster`]); the `rogue` fault (see [`rogue`]) plays a
//! compromised host key.
//!
//! Exit codes: 0 no violation, 1 violations found, 2 bad flags, 3 the run
//! itself could not be carried out (a process would not start ...).

mod cluster;
mod judge;
mod observe;
mod rogue;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use fog_testkit::netns::{Link, ROOT};
use fog_testkit::{Pair, PairKeys, bin, finish_host, free_port, scratch_dir};
use serde::Serialize;

use fog_testkit::history as check;

use cluster::{Cluster, HostNode, Net, ServerNode, build_net, signal, start_host_node, start_node, supports};
use observe::{Memory, MemoryTrace, Watch};

/// Run the fog system under a random schedule of faults and check that no
/// acked reading was lost, none counted twice, every sensor ended on the
/// server's average stream (same seq, same chain value), and at most one
/// server was active per epoch.
///
/// Every process runs with CurveZMQ keys made for the run in its dir (one
/// key per host with rights for exactly its sensors, an admin key for
/// status, one key for the rogue fault); --no-keys runs without.
///
/// Build first with `cargo build --release` (binaries older than their source
/// are refused). The same --seed replays the same schedule of faults.
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

    /// Faults to choose from (each comes once, in a seeded order, then they
    /// are drawn at random): kill (kill -9 a server, restart it later),
    /// stop (SIGSTOP a server, SIGCONT later), host (kill -9 a host, restart
    /// it with its state dir), wipe (while the active is in sync, stall the
    /// passive for 200 ms and meanwhile kill -9 the active and erase its data
    /// dir: a lost disk, which sync replication must survive), split (cut the
    /// link between the two servers), isolate (cut the hosts' link to one
    /// server), rogue (for 1-4 s a client holding a valid host key, with
    /// rights for sensors of its own and for half of the first host's,
    /// sends both servers forged epochs, readings for sensors outside its
    /// rights, poison readings for the first host's live sensors: seqs 2^62
    /// and 2^64-1, timestamps an hour ahead or long expired, and a batch of
    /// 65 536 of them; every check must still pass, and the run fails if
    /// the servers counted no refusal). split, isolate and the wipe's stall
    /// use network namespaces; rogue needs keys.
    #[arg(long, value_delimiter = ',', default_value = "kill,stop,host,wipe,split,isolate,rogue")]
    faults: Vec<Fault>,

    /// Run without keys: servers without --key (with --insecure in
    /// namespaces), hosts without --key, status without the admin key, and
    /// no rogue fault.
    #[arg(long)]
    no_keys: bool,

    /// The fog-server binary to run (default: the one built beside fog-verify).
    #[arg(long, value_name = "PATH")]
    server_bin: Option<PathBuf>,

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
    Wipe,
    Split,
    Isolate,
    Rogue,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{e} (examples: 500ms, 60s, 30m)"))
}

/// A small deterministic generator (splitmix64): the schedule depends on
/// the seed alone.
struct Rng(fog_sensor::rng::Rng);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0.next_u64() % n.max(1)
    }
    /// A duration uniformly in `[lo, hi]`.
    fn between(&mut self, lo: Duration, hi: Duration) -> Duration {
        let span = (hi - lo).as_millis() as u64;
        lo + Duration::from_millis(self.below(span + 1))
    }
}

enum Pending {
    Restart(usize),
    Cont(usize),
    RestartHost(usize),
    Heal(Link, &'static str),
    CalmRogue,
}

#[derive(Serialize)]
struct Report {
    seed: u64,
    duration_s: f64,
    hosts: u32,
    sensors_per_host: u32,
    /// "namespaces" (servers in network namespaces of their own, links that
    /// can be cut) or "loopback" (no link faults).
    network: &'static str,
    /// "curve" (every process with keys made for the run) or "none" (--no-keys).
    security: &'static str,
    schedule: Vec<String>,
    /// What the rogue fault sent and was told (all zero when it never ran).
    rogue: rogue::Tally,
    /// What the servers counted against hostile clients, summed over every
    /// server life (as last seen in a status read during the run):
    /// forged_epochs and refused.*; expired: the most any one life showed.
    server_counted: std::collections::BTreeMap<&'static str, u64>,
    /// Resident memory of every process over the run, to show it stays flat.
    memory: Vec<MemoryTrace>,
    verdict: check::Verdict,
    ok: bool,
    dir: String,
}

impl Report {
    /// The summary on stderr: the counts checked, the rogue's and the
    /// servers' tallies, memory, then the verdict with every violation.
    fn print(&self) {
        let v = &self.verdict;
        eprintln!(
            "checked {} sensors, {} readings: lost {}, duplicated {}, sum mismatches {}, unacked {}, averages missed {}, \
             sensors off the server's average stream {}, sensors without averages {}, averages superseded {}, \
             epochs with two actives {:?}, unchecked incarnations {}",
            v.sensors_checked, v.readings_checked, v.lost, v.duplicated, v.sum_mismatches, v.unacked,
            v.averages_missed, v.sensors_off_the_server_stream, v.sensors_without_averages, v.averages_superseded,
            v.epochs_with_two_actives, v.unchecked_incarnations
        );
        for note in &v.notes {
            eprintln!("note: {note}");
        }
        let counted: Vec<String> =
            self.server_counted.iter().filter(|(_, n)| **n > 0).map(|(k, n)| format!("{k} {n}")).collect();
        let counted = if counted.is_empty() { "nothing".to_string() } else { counted.join(", ") };
        let r = &self.rogue;
        if r.activations > 0 {
            eprintln!(
                "rogue: {} times active, {} batches sent ({} forged epochs, {} with {} readings for foreign sensors, \
                 {} with {} poison readings of which {} to expire, {} of 65 536 readings, {} past that); {} replies",
                r.activations, r.batches_sent, r.forged_epoch_batches, r.foreign_batches, r.foreign_readings,
                r.poison_batches, r.poison_readings, r.poison_expected_expired, r.limit_batches,
                r.over_limit_batches, r.replies
            );
        }
        eprintln!("the servers counted (summed over their lives; expired: the most one life showed): {counted}");
        for m in self.memory.iter().filter(|m| m.samples >= 8) {
            eprintln!(
                "memory {}: {:.0} MiB at start, {:.0} MiB midway, {:.0} MiB at the end (peak {:.0} MiB, {} samples)",
                m.process, m.first_mib, m.mid_mib, m.last_mib, m.peak_mib, m.samples
            );
        }
        if self.ok {
            eprintln!("verdict: OK (seed {}; data and logs in {})", self.seed, self.dir);
        } else {
            for violation in &v.violations {
                eprintln!("violation: {violation}");
            }
            eprintln!("verdict: FAILED — replay with --seed {} (data and logs in {})", self.seed, self.dir);
        }
    }
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
            report.print();
            if report.ok { ExitCode::SUCCESS } else { ExitCode::from(1) }
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(3)
        }
    }
}

fn run(args: &Args) -> anyhow::Result<Report> {
    // The binaries a run starts (and asks for status), built from the
    // current source: a stale or missing one is one error line that says
    // what to build, before anything starts.
    for name in ["fog-server", "fog-host"] {
        bin(name)?;
    }
    let seed = args.seed.unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(1)
    });
    let mut rng = Rng(fog_sensor::rng::Rng::new(seed));
    let dir = match &args.dir {
        Some(d) => {
            std::fs::create_dir_all(d).with_context(|| format!("cannot create {}", d.display()))?;
            d.clone()
        }
        None => scratch_dir("verify")?,
    };
    eprintln!("fog-verify: seed {seed}, {:?}, {} host(s) x {} sensors, faults {:?}, dir {}", args.duration, args.hosts, args.sensors, args.faults, dir.display());

    if let Some(p) = &args.server_bin {
        if !p.exists() {
            bail!("--server-bin {} does not exist", p.display());
        }
    }
    let durable_servers = supports("fog-server", "--data-dir")?;
    let durable_hosts = supports("fog-host", "--state-dir")?;
    if !durable_servers {
        eprintln!("note: fog-server has no --data-dir: a restarted server starts empty");
    }
    let mut faults = args.faults.clone();
    if args.no_keys && faults.contains(&Fault::Rogue) {
        eprintln!("note: --no-keys: the rogue fault needs keys and is left out");
        faults.retain(|f| *f != Fault::Rogue);
    }
    if !durable_hosts && faults.contains(&Fault::Host) {
        eprintln!("note: fog-host has no --state-dir: host faults are left out");
        faults.retain(|f| *f != Fault::Host);
    }

    let wants_net = faults.iter().any(|f| matches!(f, Fault::Split | Fault::Isolate | Fault::Wipe));
    let net = if wants_net { build_net()? } else { None };
    if net.is_none() && wants_net {
        faults.retain(|f| !matches!(f, Fault::Split | Fault::Isolate));
    }
    let pair = match &net {
        Some(n) => {
            let ep = |addr: std::net::Ipv4Addr| -> anyhow::Result<String> { Ok(format!("tcp://{addr}:{}", free_port()?)) };
            Pair {
                primary_frontend: ep(n.to_primary.b_addr)?,
                backup_frontend: ep(n.to_backup.b_addr)?,
                primary_state: ep(n.peer.a_addr)?,
                backup_state: ep(n.peer.b_addr)?,
            }
        }
        None => Pair::on_free_ports()?,
    };
    let plan = rogue::Plan::new(args.hosts, args.sensors);
    let keys = if args.no_keys {
        None
    } else {
        let mut clients: Vec<(String, String)> = (0..args.hosts)
            .map(|i| (format!("host{i}"), format!("sensors={}-{}", 1 + i * args.sensors, (i + 1) * args.sensors)))
            .collect();
        clients.push((rogue::KEY_NAME.to_string(), plan.rights()));
        let clients: Vec<(&str, &str)> = clients.iter().map(|(n, r)| (n.as_str(), r.as_str())).collect();
        Some(PairKeys::generate(&dir, &clients).context("cannot make the run's keys")?)
    };
    let cluster = Cluster { pair, keys };
    let pair = &cluster.pair;
    let mut servers = Vec::new();
    for primary in [true, false] {
        let name = if primary { "primary" } else { "backup" };
        let data_dir = dir.join(format!("{name}-data"));
        let mut extra = vec!["--lateness".to_string(), "500ms".to_string()];
        if durable_servers {
            extra.push("--data-dir".into());
            extra.push(data_dir.display().to_string());
        }
        let program = match &args.server_bin {
            Some(p) => p.clone(),
            None => bin("fog-server")?,
        };
        let ns = match &net {
            Some(n) if primary => n.to_primary.b_ns.clone(),
            Some(n) => n.to_backup.b_ns.clone(),
            None => ROOT.to_string(),
        };
        servers.push(ServerNode { name, primary, proc: None, stopped: false, starts: 0, extra, data_dir, program, ns });
    }
    let lab = net.as_ref().map(|n| &n.lab);
    for i in 0..servers.len() {
        start_node(lab, &cluster, &mut servers[i], &dir, true)?;
    }
    // Devices (host side) of the links cut right now.
    let mut cut: Vec<String> = Vec::new();
    let host_link_cut = |cut: &[String], primary: bool| {
        net.as_ref().is_some_and(|n| {
            let link = if primary { &n.to_primary } else { &n.to_backup };
            cut.contains(&link.a_dev)
        })
    };

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
        start_host_node(args, &cluster, h, &dir, args.duration)?;
    }

    let mut schedule = Vec::new();
    let mut log = |started: Instant, what: String| {
        let line = format!("[{:>6.1}s] {what}", started.elapsed().as_secs_f64());
        eprintln!("{line}");
        schedule.push(line);
    };
    let mut watch = Watch::new(started, plan.clone());
    let mut rogue_run: Option<rogue::RogueRun> = None;
    let mut rogue_tally = rogue::Tally::default();
    let mut memory = Memory::default();
    let mut pending: Vec<(Instant, Pending)> = Vec::new();
    let mut next_fault = started + rng.between(args.fault_every / 2, args.fault_every * 3 / 2);
    let mut unplayed = faults.clone();
    for i in (1..unplayed.len()).rev() {
        unplayed.swap(i, rng.below(i as u64 + 1) as usize);
    }
    let mut next_poll = started;
    while Instant::now() < end {
        let now = Instant::now();
        if now >= next_poll {
            next_poll = now + Duration::from_millis(250);
            watch.observe(&cluster, &servers);
            memory.sample(servers.iter().filter_map(|s| s.proc.as_ref()).chain(hosts.iter().filter_map(|h| h.proc.as_ref())));
        }
        let (due, later): (Vec<_>, Vec<_>) = pending.drain(..).partition(|(at, _)| *at <= now);
        pending = later;
        for (_, action) in due {
            match action {
                Pending::Restart(i) => {
                    let reachable = !host_link_cut(&cut, servers[i].primary);
                    start_node(lab, &cluster, &mut servers[i], &dir, reachable)?;
                    log(started, format!("restarted {}", servers[i].name));
                }
                Pending::Heal(link, what) => {
                    if let Some(n) = &net {
                        n.lab.heal(&link)?;
                    }
                    cut.retain(|d| *d != link.a_dev);
                    log(started, format!("healed the link {what}"));
                }
                Pending::Cont(i) => {
                    signal(&servers[i], "CONT");
                    servers[i].stopped = false;
                    log(started, format!("SIGCONT {}", servers[i].name));
                }
                Pending::RestartHost(h) => {
                    let remaining = end.saturating_duration_since(Instant::now()).max(Duration::from_secs(1));
                    start_host_node(args, &cluster, &mut hosts[h], &dir, remaining)?;
                    log(started, format!("restarted host {h} with its state dir"));
                }
                Pending::CalmRogue => {
                    if let Some(run) = rogue_run.take() {
                        let t = run.stop();
                        log(started, format!("the rogue stops ({} batches sent, {} replies)", t.batches_sent, t.replies));
                        rogue_tally.add(&t);
                    }
                }
            }
        }
        if now >= next_fault && !faults.is_empty() {
            next_fault = now + rng.between(args.fault_every / 2, args.fault_every * 3 / 2);
            // Every fault asked for comes once, in a seeded order, before
            // the draws: a short run covers them all.
            let fault = match unplayed.pop() {
                Some(f) => f,
                None => faults[rng.below(faults.len() as u64) as usize],
            };
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
                            p.kill()?;
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
                Fault::Split | Fault::Isolate => {
                    let Some(n) = &net else { continue };
                    let (link, what) = if fault == Fault::Split {
                        (n.peer.clone(), "between the servers")
                    } else if rng.below(2) == 0 {
                        (n.to_primary.clone(), "from the hosts to the primary")
                    } else {
                        (n.to_backup.clone(), "from the hosts to the backup")
                    };
                    if pending.iter().any(|(_, p)| matches!(p, Pending::Heal(l, _) if l.a_dev == link.a_dev)) {
                        continue;
                    }
                    let back_in = rng.between(Duration::from_millis(500), Duration::from_secs(4));
                    n.lab.cut(&link)?;
                    cut.push(link.a_dev.clone());
                    log(started, format!("cut the link {what} (heal in {:.1}s)", back_in.as_secs_f64()));
                    pending.push((now + back_in, Pending::Heal(link, what)));
                }
                Fault::Wipe => {
                    match wipe(&cluster, &mut servers, net.as_ref()) {
                        Ok(Some((victim, what))) => {
                            let mut back_in = rng.between(Duration::from_millis(500), Duration::from_secs(3));
                            if let Some(n) = &net {
                                // The cut outlasts the takeover, so what the
                                // dead node's kernel still had to send to the
                                // passive arrives too late to count.
                                let heal_in = Duration::from_millis(1500);
                                cut.push(n.peer.a_dev.clone());
                                pending.push((Instant::now() + heal_in, Pending::Heal(n.peer.clone(), "between the servers")));
                                back_in += heal_in;
                            }
                            log(started, format!("{what} (restart with an empty data dir in {:.1}s)", back_in.as_secs_f64()));
                            pending.push((Instant::now() + back_in, Pending::Restart(victim)));
                        }
                        Ok(None) => log(started, "wipe skipped: no active server in sync with its passive".into()),
                        Err(e) => return Err(e),
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
                        p.kill()?;
                    }
                    log(started, format!("kill -9 host {h} (restart in {:.1}s)", back_in.as_secs_f64()));
                    pending.push((now + back_in, Pending::RestartHost(h)));
                }
                Fault::Rogue => {
                    let Some(keys) = &cluster.keys else { continue };
                    if rogue_run.is_some() {
                        continue;
                    }
                    let calm_in = rng.between(Duration::from_secs(1), Duration::from_secs(4));
                    let frontends = [pair.primary_frontend.clone(), pair.backup_frontend.clone()];
                    rogue_run = Some(rogue::RogueRun::start(keys, frontends, plan.clone(), watch.targets.clone()));
                    log(
                        started,
                        format!(
                            "a rogue with a host key sends forged epochs, foreign sensors and poison readings (for {:.1}s)",
                            calm_in.as_secs_f64()
                        ),
                    );
                    pending.push((now + calm_in, Pending::CalmRogue));
                }
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }

    // Heal: resume and restart everything, then let the hosts drain.
    log(started, "healing: every server resumed or restarted, every host restarted".into());
    // Links first, so every restarted server can be reached.
    pending.sort_by_key(|(_, p)| !matches!(p, Pending::Heal(..)));
    for (_, action) in pending.drain(..) {
        match action {
            Pending::Heal(link, _) => {
                if let Some(n) = &net {
                    n.lab.heal(&link)?;
                }
            }
            Pending::Restart(i) => start_node(lab, &cluster, &mut servers[i], &dir, true)?,
            Pending::Cont(i) => {
                signal(&servers[i], "CONT");
                servers[i].stopped = false;
            }
            Pending::RestartHost(h) => start_host_node(args, &cluster, &mut hosts[h], &dir, Duration::from_secs(1))?,
            Pending::CalmRogue => {
                if let Some(run) = rogue_run.take() {
                    rogue_tally.add(&run.stop());
                }
            }
        }
    }
    let mut summaries = Vec::new();
    for h in hosts.iter_mut() {
        let proc = h.proc.take().context("every host runs after healing")?;
        let (code, summary) = finish_host(proc, Duration::from_secs(120)).with_context(|| format!("host {}", h.index))?;
        if code != 0 {
            log(started, format!("host {} exited with code {code}", h.index));
        }
        summaries.push(summary);
    }
    watch.observe(&cluster, &servers);
    let server_counted = watch.counters.totals();
    let verdict = judge::verdict(&cluster, &summaries, &watch.observations, &rogue_tally, &server_counted)?;
    Ok(Report {
        seed,
        duration_s: args.duration.as_secs_f64(),
        hosts: args.hosts,
        sensors_per_host: args.sensors,
        network: if net.is_some() { "namespaces" } else { "loopback" },
        security: if cluster.keys.is_some() { "curve" } else { "none" },
        schedule,
        rogue: rogue_tally,
        server_counted,
        memory: memory.traces(),
        ok: verdict.ok(),
        verdict,
        dir: dir.display().to_string(),
    })
}

/// Cuts the passive off (the link between the servers; the caller heals it
/// after the takeover. Without namespaces: a 200 ms SIGSTOP, well under the
/// peer expiry), and 150 ms later kills the active and erases its data dir:
/// a machine lost with its disk. Done only while the active says it is in
/// sync, so every reading it acked is on the passive: losing its disk must
/// lose nothing. Returns the erased node and what was done.
fn wipe(cluster: &Cluster, servers: &mut [ServerNode], net: Option<&Net>) -> anyhow::Result<Option<(usize, String)>> {
    let mut active = None;
    for (i, s) in servers.iter().enumerate() {
        if s.proc.is_none() || s.stopped {
            continue;
        }
        if let Ok(st) = cluster.status(s.primary) {
            let in_sync = st["replication"] == "in-sync";
            if st["state"] == "active" && in_sync && st["unconfirmed"].as_u64() == Some(0) {
                active = Some(i);
            }
        }
    }
    let Some(a) = active else { return Ok(None) };
    let p = 1 - a;
    if servers[p].proc.is_none() || servers[p].stopped {
        return Ok(None);
    }
    match net {
        Some(n) => n.lab.cut(&n.peer)?,
        None => signal(&servers[p], "STOP"),
    }
    std::thread::sleep(Duration::from_millis(150));
    if let Some(mut proc) = servers[a].proc.take() {
        proc.kill()?;
    }
    let erased = std::fs::remove_dir_all(&servers[a].data_dir);
    if net.is_none() {
        std::thread::sleep(Duration::from_millis(50));
        signal(&servers[p], "CONT");
    }
    if let Err(e) = erased {
        if e.kind() != std::io::ErrorKind::NotFound {
            bail!("cannot erase {}: {e}", servers[a].data_dir.display());
        }
    }
    let how = if net.is_some() { "cut the link between the servers" } else { "stalled the passive 200 ms" };
    Ok(Some((a, format!("{how}; meanwhile kill -9 {} (active) and erased its data dir", servers[a].name))))
}
