//! `fog-verify`: a Jepsen-style fault verifier. It starts a primary, a
//! backup and one or more hosts as real processes, applies a seeded random
//! schedule of faults while the sensors produce, then heals everything,
//! lets the hosts drain, and checks every history (see [`check`]).
//!
//! With --uplink it also runs the cloud, a 3-node NATS JetStream cluster
//! every server forwards to, draws faults of the cloud too, and at the
//! end checks each site's stream against what the site counted (see
//! [`cloud`]); --sites runs several independent sites (each its own pair
//! and hosts) at once, all forwarding to the same cloud.
//!
//! The servers, hosts and status queries use CurveZMQ keys made for the
//! run (see [`Cluster`]); the `rogue` fault (see [`rogue`]) plays a
//! compromised host key.
//!
//! Here: the flags, the run as a sequence of steps, the report and the
//! exit codes. The steps live in [`cluster`] (the processes, keys and
//! network namespaces), [`cloud`] (the NATS cluster and the check of the
//! streams), [`faults`] (the seeded schedule, applying and undoing each
//! fault, healing), [`observe`] (statuses and memory read during the run)
//! and [`judge`] (the verdict).
//!
//! Exit codes: 0 no violation, 1 violations found, 2 bad flags, 3 the run
//! itself could not be carried out (a process would not start ...).

mod cloud;
mod cluster;
mod faults;
mod judge;
mod observe;
mod rogue;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use fog_testkit::history as check;
use fog_testkit::{bin, scratch_dir};
use serde::Serialize;

use cloud::{Cloud, CloudReport};
use cluster::{Cluster, Durability, System};
use faults::{Fault, Schedule};
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
    /// use network namespaces; rogue needs keys. With --uplink, the cloud's
    /// faults: nats-leader (kill -9 the NATS node leading a site's stream,
    /// restart it 1-4 s later), nats-node (the same for a node that does
    /// not lead it), nats-all (kill -9 every NATS node, start them again
    /// 3-6 s later, past the streams' 2 s duplicate window). With several
    /// sites, each site fault hits a site drawn at random. Default: every
    /// fault, the cloud's only with --uplink.
    #[arg(long, value_delimiter = ',')]
    faults: Option<Vec<Fault>>,

    /// Run the cloud too: a 3-node NATS JetStream cluster (JWT users, one
    /// per site) that every server forwards to with --uplink, each site to
    /// a stream of its own (FOG_SITE1 ..., 3 replicas); at the end each
    /// stream must hold every item the site counted and published exactly
    /// once, in order (needs nats-server).
    #[arg(long)]
    uplink: bool,

    /// Independent sites to run at once, each its own pair of servers and
    /// --hosts hosts with --sensors sensors (site1, site2 ...); with
    /// --uplink all forward to the same cloud.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=8))]
    sites: u32,

    /// After the run, publish the first readings message of site1's stream
    /// again (as the cloud's admin, past the duplicate window): a duplicate
    /// the cloud check must report. To show that the check can fail.
    #[arg(long, requires = "uplink")]
    plant_cloud_duplicate: bool,

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

fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{e} (examples: 500ms, 60s, 30m)"))
}


#[derive(Serialize)]
struct Report {
    seed: u64,
    duration_s: f64,
    sites: u32,
    /// Hosts and sensors per host of each site.
    hosts: u32,
    sensors_per_host: u32,
    /// "namespaces" (servers in network namespaces of their own, links that
    /// can be cut) or "loopback" (no link faults).
    network: &'static str,
    /// "curve" (every process with keys made for the run) or "none" (--no-keys).
    security: &'static str,
    schedule: Vec<String>,
    /// What the rogue fault sent and was told, summed over the sites (all
    /// zero when it never ran).
    rogue: rogue::Tally,
    /// What the servers counted against hostile clients, summed over every
    /// server life of every site (as last seen in a status read during the
    /// run): forged_epochs and refused.*; expired: the most any one life showed.
    server_counted: std::collections::BTreeMap<&'static str, u64>,
    /// Resident memory of every process over the run, to show it stays flat.
    memory: Vec<MemoryTrace>,
    /// With --uplink: the cloud and each site's stream, checked.
    #[serde(skip_serializing_if = "Option::is_none")]
    cloud: Option<CloudReport>,
    /// Every site's checks together (violations named by site when there
    /// are several), and the cloud's violations.
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
        if let Some(cloud) = &self.cloud {
            for c in &cloud.streams {
                eprintln!("cloud {} ({}): {}", c.stream, if c.ok() { "right" } else { "WRONG" }, c.summary());
                for d in &c.details {
                    eprintln!("  {d}");
                }
            }
            if let Some(planted) = &cloud.planted {
                eprintln!("{planted}");
            }
        }
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
    if let Some(faults) = &args.faults
        && !args.uplink
        && faults.iter().any(|f| f.of_the_cloud())
    {
        eprintln!("error: --faults: nats-leader, nats-node and nats-all are faults of the cloud and need --uplink");
        return ExitCode::from(2);
    }
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
    if args.uplink && fog_testkit::nats::nats_server().is_none() {
        bail!("--uplink needs nats-server (apt-get install nats-server)");
    }
    let seed = args.seed.unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(1)
    });
    let dir = match &args.dir {
        Some(d) => {
            std::fs::create_dir_all(d).with_context(|| format!("cannot create {}", d.display()))?;
            d.clone()
        }
        None => scratch_dir("verify")?,
    };
    let asked = args.faults.clone().unwrap_or_else(|| faults::default_faults(args.uplink));
    eprintln!(
        "fog-verify: seed {seed}, {:?}, {} site(s) of {} host(s) x {} sensors{}, faults {:?}, dir {}",
        args.duration,
        args.sites,
        args.hosts,
        args.sensors,
        if args.uplink { ", forwarding to a 3-node NATS JetStream cloud" } else { "" },
        asked,
        dir.display()
    );
    if let Some(p) = &args.server_bin {
        if !p.exists() {
            bail!("--server-bin {} does not exist", p.display());
        }
    }
    let durable = Durability::probe()?;
    let (faults, nets) = faults::usable(&asked, args.no_keys, durable.hosts, args.sites)?;
    let plan = rogue::Plan::new(args.hosts, args.sensors);
    let names: Vec<String> = (1..=args.sites).map(|i| format!("site{i}")).collect();
    let namespaces = nets.iter().any(Option::is_some);
    let cloud = match args.uplink {
        true => Some(Cloud::start(&dir.join("cloud"), &names, namespaces)?),
        false => None,
    };
    let mut sites = Vec::new();
    for (name, net) in names.iter().zip(nets) {
        // One site keeps the run dir as it always was; several get one each.
        let (site_dir, label) = match args.sites {
            1 => (dir.clone(), String::new()),
            _ => (dir.join(name), format!("{name}: ")),
        };
        std::fs::create_dir_all(&site_dir).with_context(|| format!("cannot create {}", site_dir.display()))?;
        sites.push(Cluster::start_servers(args, &site_dir, net, durable, &plan, name, label, cloud.as_ref())?);
    }
    let mut sys = System { sites, cloud };

    let started = Instant::now();
    let end = started + args.duration;
    for cluster in &mut sys.sites {
        cluster.start_hosts(args.duration)?;
    }
    let mut watches: Vec<Watch> = sys.sites.iter().map(|_| Watch::new(started, plan.clone())).collect();
    let mut memory = Memory::default();
    let targets = watches.iter().map(|w| w.targets.clone()).collect();
    let mut schedule = Schedule::new(seed, faults, args.fault_every, started, end, plan, targets);
    // While the sensors produce: every 250 ms a look at every server and
    // process, and faults applied and undone as the schedule says.
    let mut next_poll = started;
    while Instant::now() < end {
        let now = Instant::now();
        if now >= next_poll {
            next_poll = now + Duration::from_millis(250);
            observe_all(&sys, &mut watches, &mut memory);
        }
        schedule.undo_due(&mut sys, now)?;
        schedule.apply_due(&mut sys, now)?;
        std::thread::sleep(Duration::from_millis(20));
    }

    // Then everything healed, the hosts drained, and every history checked.
    schedule.heal(&mut sys)?;
    let mut summaries = Vec::new();
    for cluster in &mut sys.sites {
        let label = cluster.label.clone();
        summaries.push(cluster.finish_hosts(|line| schedule.log(format!("{label}{line}")))?);
    }
    observe_all(&sys, &mut watches, &mut memory);
    let mut verdict = check::Verdict::default();
    let mut server_counted = std::collections::BTreeMap::new();
    let mut rogue_tally = rogue::Tally::default();
    for (s, cluster) in sys.sites.iter().enumerate() {
        let counted = watches[s].counters.totals();
        let v = judge::verdict(cluster, &summaries[s], &watches[s].observations, &schedule.rogue_tally[s], &counted)?;
        if sys.sites.len() == 1 {
            verdict = v;
        } else {
            judge::merge(&mut verdict, &v, &cluster.label);
        }
        judge::merge_counted(&mut server_counted, &counted);
        rogue_tally.add(&schedule.rogue_tally[s]);
    }

    // The cloud: every site's stream against what the site counted.
    let cloud = match &sys.cloud {
        Some(cloud) => {
            let mut streams = Vec::new();
            for cluster in &sys.sites {
                streams.push(cloud.check(cluster)?);
            }
            let mut planted = None;
            if args.plant_cloud_duplicate {
                planted = Some(cloud.plant_duplicate(&sys.sites[0].site)?);
                streams[0] = cloud.check(&sys.sites[0])?;
            }
            for c in &streams {
                verdict.violations.extend(c.violations.iter().map(|v| format!("cloud {}: {v}", c.stream)));
            }
            Some(CloudReport {
                nodes: cloud::NODES,
                replicas: cloud::NODES,
                duplicate_window: cloud::DUPLICATE_WINDOW,
                streams,
                planted,
            })
        }
        None => None,
    };
    let first = &sys.sites[0];
    Ok(Report {
        seed,
        duration_s: args.duration.as_secs_f64(),
        sites: args.sites,
        hosts: args.hosts,
        sensors_per_host: args.sensors,
        network: if first.net.is_some() { "namespaces" } else { "loopback" },
        security: if first.keys.is_some() { "curve" } else { "none" },
        schedule: schedule.lines,
        rogue: rogue_tally,
        server_counted,
        memory: memory.traces(),
        cloud,
        ok: verdict.ok(),
        verdict,
        dir: dir.display().to_string(),
    })
}

/// Reads every site's statuses and samples the memory of every process,
/// the cloud's too.
fn observe_all(sys: &System, watches: &mut [Watch], memory: &mut Memory) {
    for (cluster, watch) in sys.sites.iter().zip(watches.iter_mut()) {
        watch.observe(cluster);
        memory.sample(&cluster.label, cluster.procs());
    }
    if let Some(cloud) = &sys.cloud {
        memory.sample("", cloud.nats.procs());
    }
}
