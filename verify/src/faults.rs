//! The faults and their seeded schedule: which faults a run can apply,
//! which comes next and when (the seed alone decides), applying each to
//! a site's [`Cluster`] (drawn among the sites when there are several) or
//! to the cloud, undoing it when its time is up (restart, SIGCONT, heal a
//! link, calm the rogue, bring NATS back), and healing everything at the
//! end. Every step is one line of the schedule the report shows.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use fog_testkit::netns::Link;
use serde::Serialize;

use crate::cluster::{Cluster, Net, System};
use crate::rogue;

/// One kind of fault; --faults (its help says what each does) lists those
/// a run draws from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Fault {
    Kill,
    Stop,
    Host,
    Wipe,
    Split,
    Isolate,
    Rogue,
    NatsLeader,
    NatsAll,
    NatsNode,
}

impl Fault {
    /// A fault of the cloud (needs --uplink) rather than of a site.
    pub fn of_the_cloud(self) -> bool {
        matches!(self, Fault::NatsLeader | Fault::NatsAll | Fault::NatsNode)
    }
}

/// The faults a run draws from unless --faults says otherwise: every
/// site fault, and with --uplink the cloud's too.
pub fn default_faults(uplink: bool) -> Vec<Fault> {
    let mut faults = vec![Fault::Kill, Fault::Stop, Fault::Host, Fault::Wipe, Fault::Split, Fault::Isolate, Fault::Rogue];
    if uplink {
        faults.extend([Fault::NatsLeader, Fault::NatsAll, Fault::NatsNode]);
    }
    faults
}

/// Which of the `asked` faults this run can apply, with a note for each
/// left out (rogue needs keys, host a fog-host with --state-dir, split and
/// isolate network namespaces), and the namespaces of each of the `sites`
/// when a fault uses them (all or none).
pub fn usable(asked: &[Fault], no_keys: bool, durable_hosts: bool, sites: u32) -> anyhow::Result<(Vec<Fault>, Vec<Option<Net>>)> {
    let mut faults = asked.to_vec();
    if no_keys && faults.contains(&Fault::Rogue) {
        eprintln!("note: --no-keys: the rogue fault needs keys and is left out");
        faults.retain(|f| *f != Fault::Rogue);
    }
    if !durable_hosts && faults.contains(&Fault::Host) {
        eprintln!("note: fog-host has no --state-dir: host faults are left out");
        faults.retain(|f| *f != Fault::Host);
    }
    let wants_net = faults.iter().any(|f| matches!(f, Fault::Split | Fault::Isolate | Fault::Wipe));
    let first = if wants_net { Net::build()? } else { None };
    let mut nets = Vec::new();
    if first.is_none() {
        faults.retain(|f| !matches!(f, Fault::Split | Fault::Isolate));
        nets.resize_with(sites as usize, || None);
    } else {
        nets.push(first);
        for _ in 1..sites {
            nets.push(Some(Net::build()?.context("network namespaces worked for the first site but not for the next")?));
        }
    }
    Ok((faults, nets))
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

/// What undoes a fault once its time is up; the first number is the site.
enum Pending {
    Restart(usize, usize),
    Cont(usize, usize),
    RestartHost(usize, usize),
    Heal(usize, Link, &'static str),
    CalmRogue(usize),
    /// A NATS node killed, and the whole NATS cluster stopped.
    NatsRestart(usize),
    NatsStartAll,
}

impl Pending {
    fn of_the_cloud(&self) -> bool {
        matches!(self, Pending::NatsRestart(_) | Pending::NatsStartAll)
    }
}

/// The run's faults: the next one and when, what is due to be undone, the
/// rogue while it runs, and the lines of what was done.
pub struct Schedule {
    started: Instant,
    /// When the sensors stop producing: a restarted host produces until then.
    end: Instant,
    rng: Rng,
    faults: Vec<Fault>,
    /// Every fault asked for comes once, in a seeded order, before the
    /// draws: a short run covers them all.
    unplayed: Vec<Fault>,
    /// Mean time between faults.
    every: Duration,
    next_fault: Instant,
    pending: Vec<(Instant, Pending)>,
    plan: rogue::Plan,
    /// Per site: the rogue's poison targets, kept up to date from the
    /// statuses read, and the rogue while it runs.
    targets: Vec<rogue::Targets>,
    rogue: Vec<Option<rogue::RogueRun>>,
    /// Per site: what the rogue sent and was told, over every time it ran.
    pub rogue_tally: Vec<rogue::Tally>,
    /// What was done, one line each, stamped with the time into the run.
    pub lines: Vec<String>,
}

impl Schedule {
    /// The schedule of `faults` for the seed, its first fault about `every`
    /// after `started`; `targets` has one entry per site.
    pub fn new(
        seed: u64,
        faults: Vec<Fault>,
        every: Duration,
        started: Instant,
        end: Instant,
        plan: rogue::Plan,
        targets: Vec<rogue::Targets>,
    ) -> Schedule {
        let mut rng = Rng(fog_sensor::rng::Rng::new(seed));
        let next_fault = started + rng.between(every / 2, every * 3 / 2);
        let mut unplayed = faults.clone();
        for i in (1..unplayed.len()).rev() {
            unplayed.swap(i, rng.below(i as u64 + 1) as usize);
        }
        Schedule {
            started,
            end,
            rng,
            faults,
            unplayed,
            every,
            next_fault,
            pending: Vec::new(),
            plan,
            rogue: targets.iter().map(|_| None).collect(),
            rogue_tally: targets.iter().map(|_| rogue::Tally::default()).collect(),
            targets,
            lines: Vec::new(),
        }
    }

    /// Prints a line of the schedule and keeps it for the report.
    pub fn log(&mut self, what: String) {
        let line = format!("[{:>6.1}s] {what}", self.started.elapsed().as_secs_f64());
        eprintln!("{line}");
        self.lines.push(line);
    }

    /// Undoes every fault whose time is up at `now`.
    pub fn undo_due(&mut self, sys: &mut System, now: Instant) -> anyhow::Result<()> {
        let (due, later): (Vec<_>, Vec<_>) = self.pending.drain(..).partition(|(at, _)| *at <= now);
        self.pending = later;
        for (_, action) in due {
            match action {
                Pending::Restart(s, i) => {
                    let cluster = &mut sys.sites[s];
                    cluster.restart_server(i)?;
                    let line = format!("{}restarted {}", cluster.label, cluster.servers[i].name);
                    self.log(line);
                }
                Pending::Heal(s, link, what) => {
                    let cluster = &mut sys.sites[s];
                    if let Some(n) = &mut cluster.net {
                        n.heal(&link)?;
                    }
                    let line = format!("{}healed the link {what}", cluster.label);
                    self.log(line);
                }
                Pending::Cont(s, i) => {
                    let cluster = &mut sys.sites[s];
                    cluster.resume_server(i);
                    let line = format!("{}SIGCONT {}", cluster.label, cluster.servers[i].name);
                    self.log(line);
                }
                Pending::RestartHost(s, h) => {
                    let remaining = self.end.saturating_duration_since(Instant::now()).max(Duration::from_secs(1));
                    let cluster = &mut sys.sites[s];
                    cluster.start_host(h, remaining)?;
                    let line = format!("{}restarted host {h} with its state dir", cluster.label);
                    self.log(line);
                }
                Pending::CalmRogue(s) => {
                    if let Some(run) = self.rogue[s].take() {
                        let t = run.stop();
                        let label = &sys.sites[s].label;
                        self.log(format!("{label}the rogue stops ({} batches sent, {} replies)", t.batches_sent, t.replies));
                        self.rogue_tally[s].add(&t);
                    }
                }
                // Started, not waited for: the schedule goes on while
                // the nodes rejoin and elect leaders.
                Pending::NatsRestart(i) => {
                    if let Some(cloud) = &mut sys.cloud {
                        cloud.nats.launch(i)?;
                        let name = cloud.nats.nodes()[i].name.clone();
                        self.log(format!("restarted NATS node {name}"));
                    }
                }
                Pending::NatsStartAll => {
                    if let Some(cloud) = &mut sys.cloud {
                        for i in 0..cloud.nats.nodes().len() {
                            cloud.nats.launch(i)?;
                        }
                        self.log("started every NATS node again".into());
                    }
                }
            }
        }
        Ok(())
    }

    /// Applies the next fault if its time has come at `now`, and draws the
    /// time of the one after. A fault that cannot apply right now (nothing
    /// up to kill, the link already cut, the rogue already running) is
    /// skipped.
    ///
    /// A site fault hits a site drawn at random (with one site, no draw is
    /// made: a seed gives the schedule it always gave). A cloud fault waits
    /// while another is still to be undone: drawn then, it is skipped, and
    /// before the random draws it is put back to come after the others.
    /// One that finds its stream without a leader is not played either:
    /// before the random draws it is asked again a second later.
    pub fn apply_due(&mut self, sys: &mut System, now: Instant) -> anyhow::Result<()> {
        if now < self.next_fault || self.faults.is_empty() {
            return Ok(());
        }
        self.next_fault = now + self.rng.between(self.every / 2, self.every * 3 / 2);
        let (fault, unplayed) = match self.unplayed.pop() {
            Some(f) => (f, true),
            None => (self.faults[self.rng.below(self.faults.len() as u64) as usize], false),
        };
        if fault.of_the_cloud() {
            if self.pending.iter().any(|(_, p)| p.of_the_cloud()) {
                if unplayed {
                    self.unplayed.insert(0, fault);
                }
                return Ok(());
            }
            let played = self.cloud_fault(sys, fault, now)?;
            if !played && unplayed {
                // Asked again a second from now (asking for the leader may
                // itself have taken seconds), before the other faults.
                self.unplayed.push(fault);
                self.next_fault = Instant::now() + Duration::from_secs(1);
            }
            return Ok(());
        }
        let s = self.draw_site(sys);
        let cluster = &mut sys.sites[s];
        match fault {
            Fault::Kill | Fault::Stop => self.kill_or_stop(cluster, s, fault == Fault::Kill, now),
            Fault::Split | Fault::Isolate => self.cut_link(cluster, s, fault == Fault::Split, now),
            Fault::Wipe => self.wipe(cluster, s),
            Fault::Host => self.kill_host(cluster, s, now),
            Fault::Rogue => self.start_rogue(cluster, s, now),
            Fault::NatsLeader | Fault::NatsAll | Fault::NatsNode => Ok(()),
        }
    }

    /// A site drawn at random; no draw with one site.
    fn draw_site(&mut self, sys: &System) -> usize {
        match sys.sites.len() {
            0 | 1 => 0,
            n => self.rng.below(n as u64) as usize,
        }
    }

    /// The cloud's faults: kill -9 of the NATS node that leads a site's
    /// stream (nats-leader) or of one that does not (nats-node), restarted
    /// 1-4 s later; the whole cluster stopped (nats-all), started again
    /// 3-6 s later, longer than the streams' duplicate window. Says
    /// whether the fault was played: a stream with no leader (still
    /// electing one after an earlier fault) has no leader to kill or spare.
    fn cloud_fault(&mut self, sys: &mut System, fault: Fault, now: Instant) -> anyhow::Result<bool> {
        let s = self.draw_site(sys);
        let Some(cloud) = &mut sys.cloud else { return Ok(false) };
        if fault == Fault::NatsAll {
            let back_in = self.rng.between(Duration::from_secs(3), Duration::from_secs(6));
            cloud.nats.stop_all()?;
            self.log(format!("kill -9 of every NATS node: the cloud is away (start again in {:.1}s)", back_in.as_secs_f64()));
            self.pending.push((now + back_in, Pending::NatsStartAll));
            return Ok(true);
        }
        let back_in = self.rng.between(Duration::from_secs(1), Duration::from_secs(4));
        let pick = self.rng.below(cloud.nats.nodes().len() as u64 - 1) as usize;
        let stream = fog_testkit::cloud::stream_of(&cloud.sites[s]);
        // Asked twice: the first ask may go to a node that just died.
        let Some(leader) = cloud.nats.stream_leader(&stream).or_else(|| cloud.nats.stream_leader(&stream)) else {
            let which = if fault == Fault::NatsLeader { "nats-leader" } else { "nats-node" };
            self.log(format!("{which} skipped: the stream {stream} has no leader now"));
            return Ok(false);
        };
        // Asking may have taken seconds: the restart counts from now.
        let now = Instant::now();
        let (victim, what) = if fault == Fault::NatsLeader {
            (leader, format!("the leader of {stream}"))
        } else {
            let others: Vec<usize> = (0..cloud.nats.nodes().len()).filter(|&i| i != leader).collect();
            (others[pick % others.len()], format!("not the leader of {stream}"))
        };
        cloud.nats.kill(victim)?;
        let name = cloud.nats.nodes()[victim].name.clone();
        self.log(format!("kill -9 NATS node {name}, {what} (restart in {:.1}s)", back_in.as_secs_f64()));
        self.pending.push((now + back_in, Pending::NatsRestart(victim)));
        Ok(true)
    }

    /// kill -9 or SIGSTOP a server that is up, undone 0.5-4 s later.
    fn kill_or_stop(&mut self, cluster: &mut Cluster, s: usize, kill: bool, now: Instant) -> anyhow::Result<()> {
        let up: Vec<usize> = (0..cluster.servers.len()).filter(|&i| cluster.servers[i].up()).collect();
        if up.is_empty() {
            return Ok(());
        }
        let i = up[self.rng.below(up.len() as u64) as usize];
        let back_in = self.rng.between(Duration::from_millis(500), Duration::from_secs(4));
        let name = cluster.servers[i].name;
        let label = cluster.label.clone();
        if kill {
            cluster.kill_server(i)?;
            self.log(format!("{label}kill -9 {name} (restart in {:.1}s)", back_in.as_secs_f64()));
            self.pending.push((now + back_in, Pending::Restart(s, i)));
        } else {
            cluster.stop_server(i);
            self.log(format!("{label}SIGSTOP {name} (SIGCONT in {:.1}s)", back_in.as_secs_f64()));
            self.pending.push((now + back_in, Pending::Cont(s, i)));
        }
        Ok(())
    }

    /// Cuts the link between the servers (split) or the hosts' link to one
    /// of them (isolate) for 0.5-4 s.
    fn cut_link(&mut self, cluster: &mut Cluster, s: usize, split: bool, now: Instant) -> anyhow::Result<()> {
        let label = cluster.label.clone();
        let Some(n) = &mut cluster.net else { return Ok(()) };
        let (link, what) = if split {
            (n.peer.clone(), "between the servers")
        } else if self.rng.below(2) == 0 {
            (n.to_primary.clone(), "from the hosts to the primary")
        } else {
            (n.to_backup.clone(), "from the hosts to the backup")
        };
        if self.pending.iter().any(|(_, p)| matches!(p, Pending::Heal(_, l, _) if l.a_dev == link.a_dev)) {
            return Ok(());
        }
        let back_in = self.rng.between(Duration::from_millis(500), Duration::from_secs(4));
        n.cut(&link)?;
        self.log(format!("{label}cut the link {what} (heal in {:.1}s)", back_in.as_secs_f64()));
        self.pending.push((now + back_in, Pending::Heal(s, link, what)));
        Ok(())
    }

    /// A lost disk (see [`wipe_active`]); the erased server restarts empty
    /// 0.5-3 s later, after the link between the servers is healed.
    fn wipe(&mut self, cluster: &mut Cluster, s: usize) -> anyhow::Result<()> {
        let label = cluster.label.clone();
        let Some((victim, what)) = wipe_active(cluster)? else {
            self.log(format!("{label}wipe skipped: no active server in sync with its passive"));
            return Ok(());
        };
        let mut back_in = self.rng.between(Duration::from_millis(500), Duration::from_secs(3));
        if let Some(n) = &cluster.net {
            // The cut outlasts the takeover, so what the dead node's kernel
            // still had to send to the passive arrives too late to count.
            let heal_in = Duration::from_millis(1500);
            self.pending.push((Instant::now() + heal_in, Pending::Heal(s, n.peer.clone(), "between the servers")));
            back_in += heal_in;
        }
        self.log(format!("{label}{what} (restart with an empty data dir in {:.1}s)", back_in.as_secs_f64()));
        self.pending.push((Instant::now() + back_in, Pending::Restart(s, victim)));
        Ok(())
    }

    /// kill -9 a running host, restarted with its state dir 0.3-2 s later.
    fn kill_host(&mut self, cluster: &mut Cluster, s: usize, now: Instant) -> anyhow::Result<()> {
        let up: Vec<usize> = (0..cluster.hosts.len()).filter(|&h| cluster.hosts[h].proc.is_some()).collect();
        if up.is_empty() {
            return Ok(());
        }
        let h = up[self.rng.below(up.len() as u64) as usize];
        let back_in = self.rng.between(Duration::from_millis(300), Duration::from_secs(2));
        cluster.kill_host(h)?;
        self.log(format!("{}kill -9 host {h} (restart in {:.1}s)", cluster.label, back_in.as_secs_f64()));
        self.pending.push((now + back_in, Pending::RestartHost(s, h)));
        Ok(())
    }

    /// Lets the rogue (see [`rogue`]) loose on both servers for 1-4 s;
    /// only with keys.
    fn start_rogue(&mut self, cluster: &Cluster, s: usize, now: Instant) -> anyhow::Result<()> {
        let Some(keys) = &cluster.keys else { return Ok(()) };
        if self.rogue[s].is_some() {
            return Ok(());
        }
        let calm_in = self.rng.between(Duration::from_secs(1), Duration::from_secs(4));
        let frontends = [cluster.pair.primary_frontend.clone(), cluster.pair.backup_frontend.clone()];
        self.rogue[s] = Some(rogue::RogueRun::start(keys, frontends, self.plan.clone(), self.targets[s].clone()));
        self.log(format!(
            "{}a rogue with a host key sends forged epochs, foreign sensors and poison readings (for {:.1}s)",
            cluster.label,
            calm_in.as_secs_f64()
        ));
        self.pending.push((now + calm_in, Pending::CalmRogue(s)));
        Ok(())
    }

    /// Undoes every fault still pending, links first so every restarted
    /// server can be reached: every server resumed or restarted, every
    /// host restarted (to drain), the rogue stopped, every NATS node
    /// running again.
    pub fn heal(&mut self, sys: &mut System) -> anyhow::Result<()> {
        if sys.cloud.is_some() {
            self.log("healing: every server resumed or restarted, every host restarted, every NATS node started".into());
        } else {
            self.log("healing: every server resumed or restarted, every host restarted".into());
        }
        self.pending.sort_by_key(|(_, p)| !matches!(p, Pending::Heal(..)));
        for (_, action) in std::mem::take(&mut self.pending) {
            match action {
                Pending::Heal(s, link, _) => {
                    if let Some(n) = &mut sys.sites[s].net {
                        n.heal(&link)?;
                    }
                }
                Pending::Restart(s, i) => sys.sites[s].start_server(i, true)?,
                Pending::Cont(s, i) => sys.sites[s].resume_server(i),
                Pending::RestartHost(s, h) => sys.sites[s].start_host(h, Duration::from_secs(1))?,
                Pending::CalmRogue(s) => {
                    if let Some(run) = self.rogue[s].take() {
                        self.rogue_tally[s].add(&run.stop());
                    }
                }
                Pending::NatsRestart(_) | Pending::NatsStartAll => {}
            }
        }
        // Every node running, and the cluster ready (it may still be
        // rejoining from a fault undone just before).
        if let Some(cloud) = &mut sys.cloud {
            cloud.nats.start_all()?;
        }
        Ok(())
    }
}

/// Cuts the passive off (the link between the servers; the caller heals it
/// after the takeover. Without namespaces: a 200 ms SIGSTOP, well under the
/// peer expiry), and 150 ms later kills the active and erases its data dir:
/// a machine lost with its disk. Done only while the active says it is in
/// sync, so every reading it acked is on the passive: losing its disk must
/// lose nothing. Returns the erased node and what was done.
fn wipe_active(cluster: &mut Cluster) -> anyhow::Result<Option<(usize, String)>> {
    let mut active = None;
    for (i, s) in cluster.servers.iter().enumerate() {
        if !s.up() {
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
    if !cluster.servers[p].up() {
        return Ok(None);
    }
    match &mut cluster.net {
        Some(n) => {
            let peer = n.peer.clone();
            n.cut(&peer)?;
        }
        None => cluster.servers[p].signal("STOP"),
    }
    std::thread::sleep(Duration::from_millis(150));
    cluster.kill_server(a)?;
    let erased = std::fs::remove_dir_all(&cluster.servers[a].data_dir);
    if cluster.net.is_none() {
        std::thread::sleep(Duration::from_millis(50));
        cluster.servers[p].signal("CONT");
    }
    if let Err(e) = erased {
        if e.kind() != std::io::ErrorKind::NotFound {
            bail!("cannot erase {}: {e}", cluster.servers[a].data_dir.display());
        }
    }
    let how = if cluster.net.is_some() { "cut the link between the servers" } else { "stalled the passive 200 ms" };
    Ok(Some((a, format!("{how}; meanwhile kill -9 {} (active) and erased its data dir", cluster.servers[a].name))))
}
