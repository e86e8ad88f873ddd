//! The system under test: the primary and backup servers and the sensor
//! hosts as real processes, the endpoints and CurveZMQ keys they run with,
//! and the network namespaces and links between them. Here a process is
//! started, restarted, killed, stopped, resumed or waited for, and a
//! server asked for its status; which fault does that when is in
//! [`crate::faults`].

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::Context;
use fog_testkit::netns::{Lab, Link, ROOT};
use fog_testkit::{
    Pair, PairKeys, Proc, StatusAuth, bin, finish_host, free_port, server_args, server_status_as, wait_until_serving_as,
};
use serde_json::Value;

use crate::cloud::Cloud;
use crate::{Args, rogue};

/// Which durability features the binaries have: the verifier uses them
/// where they exist.
#[derive(Debug, Clone, Copy)]
pub struct Durability {
    /// fog-server has --data-dir: a restarted server recovers what it had.
    pub servers: bool,
    /// fog-host has --state-dir: a restarted host resumes its sensors.
    pub hosts: bool,
}

impl Durability {
    /// Asks both binaries; notes that a restarted server starts empty
    /// where fog-server cannot keep data.
    pub fn probe() -> anyhow::Result<Durability> {
        let durability = Durability { servers: supports("fog-server", "--data-dir")?, hosts: supports("fog-host", "--state-dir")? };
        if !durability.servers {
            eprintln!("note: fog-server has no --data-dir: a restarted server starts empty");
        }
        Ok(durability)
    }
}

/// Whether a binary's `--help` mentions a flag.
fn supports(binary: &str, flag: &str) -> anyhow::Result<bool> {
    let help = Command::new(bin(binary)?).arg("--help").output();
    Ok(help.is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(flag)))
}

/// One of the two servers: its process (none while killed) and what every
/// start of it is given.
pub struct ServerNode {
    pub name: &'static str,
    pub primary: bool,
    pub proc: Option<Proc>,
    pub stopped: bool,
    pub starts: u32,
    extra: Vec<String>,
    pub data_dir: PathBuf,
    program: PathBuf,
    /// The network namespace it runs in (`ROOT` without a lab).
    ns: String,
}

impl ServerNode {
    /// Running and not stopped: it can answer.
    pub fn up(&self) -> bool {
        self.proc.is_some() && !self.stopped
    }

    /// Sends a signal (`STOP`, `CONT`) to its process, if it runs.
    pub fn signal(&self, sig: &str) {
        if let Some(p) = &self.proc {
            let _ = Command::new("kill").arg(format!("-{sig}")).arg(p.child.id().to_string()).status();
        }
    }
}

/// The network the run uses when namespaces are available: each server in
/// a namespace of its own, the hosts in the root namespace, three links.
pub struct Net {
    lab: Lab,
    /// Host side to the primary, host side to the backup, primary to backup.
    pub to_primary: Link,
    pub to_backup: Link,
    pub peer: Link,
    /// Devices (host side) of the links cut right now.
    cut: Vec<String>,
}

impl Net {
    /// Namespaces for the two servers and links to them, or `None` (with a
    /// note) where namespaces cannot be used; an error where they are required.
    pub fn build() -> anyhow::Result<Option<Net>> {
        let attempt = || -> Result<Net, fog_testkit::netns::LabError> {
            let mut lab = Lab::new("verify")?;
            let p = lab.namespace("primary")?;
            let b = lab.namespace("backup")?;
            let to_primary = lab.link(ROOT, &p)?;
            let to_backup = lab.link(ROOT, &b)?;
            let peer = lab.link(&p, &b)?;
            Ok(Net { lab, to_primary, to_backup, peer, cut: Vec::new() })
        };
        match attempt() {
            Ok(net) => Ok(Some(net)),
            Err(e) if fog_testkit::netns::required() => {
                anyhow::bail!("{e}, and {}=1 requires network namespaces", fog_testkit::netns::REQUIRE_ENV)
            }
            Err(e) => {
                eprintln!("note: {e}: link faults are left out and the wipe stalls the passive with SIGSTOP instead");
                Ok(None)
            }
        }
    }

    pub fn cut(&mut self, link: &Link) -> anyhow::Result<()> {
        self.lab.cut(link)?;
        self.cut.push(link.a_dev.clone());
        Ok(())
    }

    pub fn heal(&mut self, link: &Link) -> anyhow::Result<()> {
        self.lab.heal(link)?;
        self.cut.retain(|d| *d != link.a_dev);
        Ok(())
    }

    /// Whether the hosts' link to one server is cut right now.
    fn hosts_cut_off_from(&self, primary: bool) -> bool {
        let link = if primary { &self.to_primary } else { &self.to_backup };
        self.cut.contains(&link.a_dev)
    }
}

/// One sensor host: its process (none while killed) and the state dir
/// every start of it resumes from.
pub struct HostNode {
    pub index: u32,
    pub proc: Option<Proc>,
    starts: u32,
    state_dir: Option<PathBuf>,
}

/// Everything a run starts: the sites and, with --uplink, their cloud.
pub struct System {
    pub sites: Vec<Cluster>,
    pub cloud: Option<Cloud>,
}

/// One site: the pair's endpoints and, unless --no-keys, the run's keys:
/// how every process is started and every status asked for; the processes
/// and the network between them.
pub struct Cluster {
    /// The site's name (`site1` ...): its stream in the cloud.
    pub site: String,
    /// What the site's lines in the schedule start with: empty when the run
    /// has one site, else `site2: `.
    pub label: String,
    pub pair: Pair,
    pub keys: Option<PairKeys>,
    pub net: Option<Net>,
    pub servers: Vec<ServerNode>,
    pub hosts: Vec<HostNode>,
    /// Data dirs, state dirs, keys and every process's log.
    dir: PathBuf,
    /// Sensors per host and their reading interval.
    sensors: u32,
    interval: Duration,
}

impl Cluster {
    /// Endpoints on the links of `net` (on loopback without one), the run's
    /// keys unless --no-keys (one per host with rights for exactly its
    /// sensors, the rogue's with the rights of `plan`), and both servers
    /// started and serving; the hosts are set up but not started.
    /// With a `cloud`, every server also forwards to it as `site`.
    #[allow(clippy::too_many_arguments)]
    pub fn start_servers(
        args: &Args,
        dir: &Path,
        net: Option<Net>,
        durable: Durability,
        plan: &rogue::Plan,
        site: &str,
        label: String,
        cloud: Option<&Cloud>,
    ) -> anyhow::Result<Cluster> {
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
        let keys = if args.no_keys {
            None
        } else {
            let mut clients: Vec<(String, String)> = (0..args.hosts)
                .map(|i| (format!("host{i}"), format!("sensors={}-{}", 1 + i * args.sensors, (i + 1) * args.sensors)))
                .collect();
            clients.push((rogue::KEY_NAME.to_string(), plan.rights()));
            let clients: Vec<(&str, &str)> = clients.iter().map(|(n, r)| (n.as_str(), r.as_str())).collect();
            Some(PairKeys::generate(dir, &clients).context("cannot make the run's keys")?)
        };
        let mut servers = Vec::new();
        for primary in [true, false] {
            let name = if primary { "primary" } else { "backup" };
            let data_dir = dir.join(format!("{name}-data"));
            let mut extra = vec!["--lateness".to_string(), "500ms".to_string()];
            if durable.servers {
                extra.push("--data-dir".into());
                extra.push(data_dir.display().to_string());
            }
            let program = match &args.server_bin {
                Some(p) => p.clone(),
                None => bin("fog-server")?,
            };
            let (ns, via) = match &net {
                Some(n) if primary => (n.to_primary.b_ns.clone(), Some(n.to_primary.a_addr)),
                Some(n) => (n.to_backup.b_ns.clone(), Some(n.to_backup.a_addr)),
                None => (ROOT.to_string(), None),
            };
            if let Some(cloud) = cloud {
                extra.extend(cloud.server_flags(site, via)?);
            }
            servers.push(ServerNode { name, primary, proc: None, stopped: false, starts: 0, extra, data_dir, program, ns });
        }
        let hosts = (0..args.hosts)
            .map(|index| HostNode {
                index,
                proc: None,
                starts: 0,
                state_dir: durable.hosts.then(|| dir.join(format!("host{index}-state"))),
            })
            .collect();
        let mut cluster = Cluster {
            site: site.to_string(),
            label,
            pair,
            keys,
            net,
            servers,
            hosts,
            dir: dir.to_path_buf(),
            sensors: args.sensors,
            interval: args.interval,
        };
        for i in 0..cluster.servers.len() {
            cluster.start_server(i, true)?;
        }
        Ok(cluster)
    }

    fn frontend(&self, primary: bool) -> &str {
        self.pair.frontend(primary)
    }

    /// The admin's credentials for one server's status (none without keys).
    fn auth(&self, primary: bool) -> Option<StatusAuth> {
        self.keys.as_ref().map(|k| k.admin_status(primary))
    }

    pub fn status(&self, primary: bool) -> anyhow::Result<serde_json::Value> {
        server_status_as(self.frontend(primary), self.auth(primary).as_ref())
    }

    /// Starts (or restarts) server `i`; waits until it answers unless
    /// `reachable` is false (its link to the hosts is cut right now).
    pub fn start_server(&mut self, i: usize, reachable: bool) -> anyhow::Result<()> {
        let primary = self.servers[i].primary;
        let auth = self.auth(primary);
        let node = &mut self.servers[i];
        node.starts += 1;
        let mut extra: Vec<&str> = node.extra.iter().map(String::as_str).collect();
        let key_args = self.keys.as_ref().map(|k| k.server_args(primary)).unwrap_or_default();
        extra.extend(key_args.iter().map(String::as_str));
        if self.net.is_some() && self.keys.is_none() {
            // Veth addresses are not loopback: without keys a server needs
            // --insecure there (the namespaces are the verifier's own).
            extra.push("--insecure");
        }
        let (_, args) = server_args(&self.pair, primary, &extra, &self.dir);
        // Every incarnation keeps its own log.
        let name = format!("{}-{}", node.name, node.starts);
        let proc = match &self.net {
            Some(net) => net.lab.spawn(&node.ns, &name, &node.program, &args, &self.dir)?,
            None => Proc::spawn(&name, &node.program, &args, &self.dir)?,
        };
        let endpoint = self.pair.frontend(primary);
        node.proc = Some(if reachable { wait_until_serving_as(proc, endpoint, auth.as_ref())? } else { proc });
        node.stopped = false;
        Ok(())
    }

    /// Restarts server `i` after a kill; waits until it answers unless the
    /// hosts' link to it is cut.
    pub fn restart_server(&mut self, i: usize) -> anyhow::Result<()> {
        let cut_off = self.net.as_ref().is_some_and(|n| n.hosts_cut_off_from(self.servers[i].primary));
        self.start_server(i, !cut_off)
    }

    /// kill -9 server `i`.
    pub fn kill_server(&mut self, i: usize) -> anyhow::Result<()> {
        if let Some(mut p) = self.servers[i].proc.take() {
            p.kill()?;
        }
        Ok(())
    }

    pub fn stop_server(&mut self, i: usize) {
        self.servers[i].signal("STOP");
        self.servers[i].stopped = true;
    }

    pub fn resume_server(&mut self, i: usize) {
        self.servers[i].signal("CONT");
        self.servers[i].stopped = false;
    }

    /// Starts every host to produce for `duration`.
    pub fn start_hosts(&mut self, duration: Duration) -> anyhow::Result<()> {
        for h in 0..self.hosts.len() {
            self.start_host(h, duration)?;
        }
        Ok(())
    }

    /// Starts (or restarts, from its state dir) host `h` to produce for
    /// `duration`, then drain.
    pub fn start_host(&mut self, h: usize, duration: Duration) -> anyhow::Result<()> {
        let host = &mut self.hosts[h];
        host.starts += 1;
        let mut a: Vec<String> = [
            "--sensors".to_string(),
            self.sensors.to_string(),
            "--first-id".into(),
            (1 + host.index * self.sensors).to_string(),
            "--interval".into(),
            humantime::format_duration(self.interval).to_string(),
            "--duration".into(),
            format!("{}ms", duration.as_millis()),
            "--drain-timeout".into(),
            "60s".into(),
            "--timeout".into(),
            "500ms".into(),
            "--servers".into(),
            self.pair.servers(),
            "--quiet".into(),
            "--json".into(),
        ]
        .into();
        if let Some(state) = &host.state_dir {
            a.push("--state-dir".into());
            a.push(state.display().to_string());
        }
        if let Some(keys) = &self.keys {
            a.extend(keys.host_args(&format!("host{}", host.index))?);
        }
        host.proc = Some(Proc::spawn(&format!("host{}-{}", host.index, host.starts), &bin("fog-host")?, &a, &self.dir)?);
        Ok(())
    }

    /// kill -9 host `h`.
    pub fn kill_host(&mut self, h: usize) -> anyhow::Result<()> {
        if let Some(mut p) = self.hosts[h].proc.take() {
            p.kill()?;
        }
        Ok(())
    }

    /// Waits for every host to drain and exit and returns their JSON
    /// summaries, in host order; a host that exits with a code other than
    /// 0 is told to `log`.
    pub fn finish_hosts(&mut self, mut log: impl FnMut(String)) -> anyhow::Result<Vec<Value>> {
        let mut summaries = Vec::new();
        for h in self.hosts.iter_mut() {
            let proc = h.proc.take().context("every host runs after healing")?;
            let (code, summary) = finish_host(proc, Duration::from_secs(120)).with_context(|| format!("host {}", h.index))?;
            if code != 0 {
                log(format!("host {} exited with code {code}", h.index));
            }
            summaries.push(summary);
        }
        Ok(summaries)
    }

    /// Every process running right now: the servers', then the hosts'.
    pub fn procs(&self) -> impl Iterator<Item = &Proc> {
        self.servers.iter().filter_map(|s| s.proc.as_ref()).chain(self.hosts.iter().filter_map(|h| h.proc.as_ref()))
    }
}
