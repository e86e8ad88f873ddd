//! The system under test: the primary and backup servers and the sensor
//! hosts as real processes, the endpoints and CurveZMQ keys they run with,
//! and the network namespaces and links between them; starting a process
//! and asking a server for its status.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use fog_testkit::netns::{Lab, Link, ROOT};
use fog_testkit::{Pair, PairKeys, Proc, StatusAuth, bin, server_args, server_status_as, wait_until_serving_as};

use crate::Args;

/// Whether a binary's `--help` mentions a flag: lets the verifier use
/// durability features where the binaries have them.
pub fn supports(binary: &str, flag: &str) -> anyhow::Result<bool> {
    let help = Command::new(bin(binary)?).arg("--help").output();
    Ok(help.is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(flag)))
}

pub struct ServerNode {
    pub name: &'static str,
    pub primary: bool,
    pub proc: Option<Proc>,
    pub stopped: bool,
    pub starts: u32,
    pub extra: Vec<String>,
    pub data_dir: PathBuf,
    pub program: PathBuf,
    /// The network namespace it runs in (`ROOT` without a lab).
    pub ns: String,
}

/// The network the run uses when namespaces are available: each server in
/// a namespace of its own, the hosts in the root namespace, three links.
pub struct Net {
    pub lab: Lab,
    /// Host side to the primary, host side to the backup, primary to backup.
    pub to_primary: Link,
    pub to_backup: Link,
    pub peer: Link,
}

pub struct HostNode {
    pub index: u32,
    pub proc: Option<Proc>,
    pub starts: u32,
    pub state_dir: Option<PathBuf>,
}

/// Namespaces for the two servers and links to them, or `None` (with a
/// note) where namespaces cannot be used; an error where they are required.
pub fn build_net() -> anyhow::Result<Option<Net>> {
    let attempt = || -> Result<Net, fog_testkit::netns::LabError> {
        let mut lab = Lab::new("verify")?;
        let p = lab.namespace("primary")?;
        let b = lab.namespace("backup")?;
        let to_primary = lab.link(ROOT, &p)?;
        let to_backup = lab.link(ROOT, &b)?;
        let peer = lab.link(&p, &b)?;
        Ok(Net { lab, to_primary, to_backup, peer })
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

/// The pair's endpoints and, unless --no-keys, the run's keys: how every
/// process is started and every status asked for.
pub struct Cluster {
    pub pair: Pair,
    pub keys: Option<PairKeys>,
}

impl Cluster {
    pub fn frontend(&self, primary: bool) -> &str {
        self.pair.frontend(primary)
    }

    /// The admin's credentials for one server's status (none without keys).
    pub fn auth(&self, primary: bool) -> Option<StatusAuth> {
        self.keys.as_ref().map(|k| k.admin_status(primary))
    }

    pub fn status(&self, primary: bool) -> anyhow::Result<serde_json::Value> {
        server_status_as(self.frontend(primary), self.auth(primary).as_ref())
    }
}

/// Starts (or restarts) a server; waits until it answers unless `reachable`
/// is false (its link to the hosts is cut right now).
pub fn start_node(lab: Option<&Lab>, cluster: &Cluster, node: &mut ServerNode, dir: &std::path::Path, reachable: bool) -> anyhow::Result<()> {
    node.starts += 1;
    let mut extra: Vec<&str> = node.extra.iter().map(String::as_str).collect();
    let key_args = cluster.keys.as_ref().map(|k| k.server_args(node.primary)).unwrap_or_default();
    extra.extend(key_args.iter().map(String::as_str));
    if lab.is_some() && cluster.keys.is_none() {
        // Veth addresses are not loopback: without keys a server needs
        // --insecure there (the namespaces are the verifier's own).
        extra.push("--insecure");
    }
    let (_, args) = server_args(&cluster.pair, node.primary, &extra, dir);
    // Every incarnation keeps its own log.
    let name = format!("{}-{}", node.name, node.starts);
    let proc = match lab {
        Some(lab) => lab.spawn(&node.ns, &name, &node.program, &args, dir)?,
        None => Proc::spawn(&name, &node.program, &args, dir)?,
    };
    let endpoint = cluster.frontend(node.primary);
    let auth = cluster.auth(node.primary);
    node.proc = Some(if reachable { wait_until_serving_as(proc, endpoint, auth.as_ref())? } else { proc });
    node.stopped = false;
    Ok(())
}

pub fn start_host_node(args: &Args, cluster: &Cluster, h: &mut HostNode, dir: &std::path::Path, duration: Duration) -> anyhow::Result<()> {
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
        cluster.pair.servers(),
        "--quiet".into(),
        "--json".into(),
    ]
    .into();
    if let Some(state) = &h.state_dir {
        a.push("--state-dir".into());
        a.push(state.display().to_string());
    }
    if let Some(keys) = &cluster.keys {
        a.extend(keys.host_args(&format!("host{}", h.index))?);
    }
    h.proc = Some(Proc::spawn(&format!("host{}-{}", h.index, h.starts), &bin("fog-host")?, &a, dir)?);
    Ok(())
}

pub fn signal(node: &ServerNode, sig: &str) {
    if let Some(p) = &node.proc {
        let _ = Command::new("kill").arg(format!("-{sig}")).arg(p.child.id().to_string()).status();
    }
}
