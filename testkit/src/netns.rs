//! A small network lab for fault tests: Linux network namespaces joined by
//! veth links with IPv4 addresses, processes started inside a namespace, and
//! links that can be cut and healed while those processes run.
//!
//! A [`Lab`] owns everything it creates and removes it when dropped, also
//! while a test panics. Names carry the process id and a per-process
//! counter, so tests running in parallel (in one process or several) never
//! collide, and a lab also removes what a killed earlier process left
//! behind. Needs root and the `ip` tool; [`Lab::new`] says clearly why it
//! cannot run otherwise, so a caller can skip.
//!
//! Typical use, the link between two servers cut while a host in the root
//! namespace reaches both:
//!
//! ```no_run
//! # fn main() -> Result<(), fog_testkit::netns::LabError> {
//! use fog_testkit::netns::{Lab, ROOT};
//! let mut lab = Lab::new("split")?;
//! let p = lab.namespace("primary")?;
//! let b = lab.namespace("backup")?;
//! let to_p = lab.link(ROOT, &p)?; // host side .1, primary side .2
//! let to_b = lab.link(ROOT, &b)?;
//! let p_b = lab.link(&p, &b)?;
//! lab.cut(&p_b)?;
//! lab.heal(&p_b)?;
//! # let _ = (to_p, to_b); Ok(()) }
//! ```
//!
//! A cut takes both ends of the veth link down: packets are dropped, and the
//! kernel on either side reports the network unreachable until it is
//! healed (no `netem` is needed, which not every kernel has).

use std::net::Ipv4Addr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

use crate::Proc;

/// The root (initial) namespace, where the test process itself runs.
pub const ROOT: &str = "";

/// Namespaces of this module start with this, followed by the process id.
const NAME_PREFIX: &str = "fog-";

/// Why the lab could not do something.
#[derive(Debug, thiserror::Error)]
pub enum LabError {
    /// Network namespaces cannot be used here (not root, no `ip`, no
    /// kernel support): a test should skip with this reason (see
    /// [`skip_or_fail`]).
    #[error("network namespaces are unavailable: {0}")]
    Unavailable(String),
    #[error("`{command}` failed: {stderr}")]
    Command { command: String, stderr: String },
    #[error("a lab holds at most 64 links")]
    TooManyLinks,
}

/// Set (to 1) where network namespaces must be available, as in CI: a test
/// that needs them then fails instead of skipping.
pub const REQUIRE_ENV: &str = "FOG_REQUIRE_NETNS";

/// Whether namespaces are required here (see [`REQUIRE_ENV`]).
pub fn required() -> bool {
    std::env::var(REQUIRE_ENV).is_ok_and(|v| v == "1")
}

/// What a test does when namespaces are unavailable: says it is skipped
/// (`Ok`), or fails (an error) when [`REQUIRE_ENV`] says they must be there.
pub fn skip_or_fail(test: &str, why: &str) -> anyhow::Result<()> {
    if required() {
        anyhow::bail!("{test}: network namespaces are required ({REQUIRE_ENV}=1) but unavailable: {why}");
    }
    eprintln!("[{test}] SKIPPED: {why}; this test needs root and `ip netns` ({REQUIRE_ENV}=1 makes it fail instead)");
    Ok(())
}

/// One veth link between two namespaces (either may be [`ROOT`]).
#[derive(Debug, Clone)]
pub struct Link {
    pub a_ns: String,
    pub a_dev: String,
    pub a_addr: Ipv4Addr,
    pub b_ns: String,
    pub b_dev: String,
    pub b_addr: Ipv4Addr,
}

/// Namespaces and links created for one test, removed on drop.
#[derive(Debug)]
pub struct Lab {
    tag: String,
    /// Two octets that make this lab's `10.x.y.0/24` unique among labs
    /// running at the same time.
    subnet: (u8, u8),
    namespaces: Vec<String>,
    links: Vec<Link>,
}

/// Runs `ip ARGS` (inside `ns` unless it is [`ROOT`]).
fn ip(ns: &str, args: &[&str]) -> Result<String, LabError> {
    let mut cmd = Command::new("ip");
    if ns != ROOT {
        cmd.args(["-n", ns]);
    }
    let command = format!("ip {}{}", if ns == ROOT { String::new() } else { format!("-n {ns} ") }, args.join(" "));
    let out = cmd
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| LabError::Unavailable(format!("cannot run `ip` ({e}); install iproute2")))?;
    if !out.status.success() {
        return Err(LabError::Command { command, stderr: String::from_utf8_lossy(&out.stderr).trim().to_string() });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn process_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

impl Lab {
    /// A new lab for test `test`, or `None` when namespaces are unavailable
    /// and the test is to be skipped (see [`skip_or_fail`]; it panics when
    /// they are required, or on any other error).
    pub fn for_test(tag: &str, test: &str) -> Option<Lab> {
        match Lab::new(tag) {
            Ok(lab) => Some(lab),
            Err(LabError::Unavailable(why)) => {
                skip_or_fail(test, &why).unwrap();
                None
            }
            Err(e) => panic!("{test}: {e}"),
        }
    }

    /// A new, empty lab. `tag` names it in namespace names (keep it short).
    pub fn new(tag: &str) -> Result<Lab, LabError> {
        static LABS: AtomicU32 = AtomicU32::new(0);
        let n = LABS.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        remove_stale_namespaces();
        let k = (pid.wrapping_mul(8).wrapping_add(n)) % (1 << 14);
        let lab = Lab {
            tag: format!("{NAME_PREFIX}{pid}-{n}-{tag}"),
            subnet: (128 + (k >> 8) as u8, (k & 0xff) as u8),
            namespaces: Vec::new(),
            links: Vec::new(),
        };
        // Probe: creating a namespace is what needs root and kernel support.
        let probe = format!("{}-probe", lab.tag);
        ip(ROOT, &["netns", "add", &probe]).map_err(|e| match e {
            LabError::Command { stderr, .. } => LabError::Unavailable(format!("`ip netns add` failed: {stderr} (needs root)")),
            other => other,
        })?;
        let _ = ip(ROOT, &["netns", "del", &probe]);
        Ok(lab)
    }

    /// Creates a namespace (with its loopback up) and returns its full name.
    pub fn namespace(&mut self, name: &str) -> Result<String, LabError> {
        let full = format!("{}-{name}", self.tag);
        ip(ROOT, &["netns", "add", &full])?;
        self.namespaces.push(full.clone());
        ip(&full, &["link", "set", "lo", "up"])?;
        Ok(full)
    }

    /// Joins namespaces `a` and `b` with a veth link and a `/30`: the `a`
    /// end gets the lower address.
    pub fn link(&mut self, a: &str, b: &str) -> Result<Link, LabError> {
        let i = self.links.len();
        if i >= 64 {
            return Err(LabError::TooManyLinks);
        }
        // Interface names are at most 15 bytes and live in the root
        // namespace at first, so they carry the pid and the lab too.
        let base = format!("fg{:x}{:02x}{:02x}", std::process::id(), self.subnet.1, i);
        let (a_dev, b_dev) = (format!("{base}a"), format!("{base}b"));
        let (x, y) = self.subnet;
        let host = |last: usize| Ipv4Addr::new(10, x, y, (4 * i + last) as u8);
        let link = Link {
            a_ns: a.to_string(),
            a_dev: a_dev.clone(),
            a_addr: host(1),
            b_ns: b.to_string(),
            b_dev: b_dev.clone(),
            b_addr: host(2),
        };
        ip(ROOT, &["link", "add", &a_dev, "type", "veth", "peer", "name", &b_dev])?;
        self.links.push(link.clone());
        for (ns, dev, addr) in [(a, &a_dev, link.a_addr), (b, &b_dev, link.b_addr)] {
            if ns != ROOT {
                ip(ROOT, &["link", "set", dev, "netns", ns])?;
            }
            ip(ns, &["addr", "add", &format!("{addr}/30"), "dev", dev])?;
            ip(ns, &["link", "set", dev, "up"])?;
        }
        Ok(link)
    }

    /// Cuts a link: both ends go down, nothing passes.
    pub fn cut(&self, link: &Link) -> Result<(), LabError> {
        ip(&link.a_ns, &["link", "set", &link.a_dev, "down"])?;
        ip(&link.b_ns, &["link", "set", &link.b_dev, "down"])?;
        Ok(())
    }

    /// Heals a cut link (addresses and routes come back with it).
    pub fn heal(&self, link: &Link) -> Result<(), LabError> {
        ip(&link.a_ns, &["link", "set", &link.a_dev, "up"])?;
        ip(&link.b_ns, &["link", "set", &link.b_dev, "up"])?;
        Ok(())
    }

    /// A command that runs `program` inside namespace `ns` (through
    /// `ip netns exec`, which execs it: the child's pid is the program's,
    /// so signals reach it directly).
    pub fn command(&self, ns: &str, program: &Path) -> Command {
        if ns == ROOT {
            return Command::new(program);
        }
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", ns]).arg(program);
        cmd
    }

    /// Starts `program` inside `ns` as a [`Proc`] (killed on drop, stderr in
    /// `dir/<name>.log`).
    pub fn spawn(&self, ns: &str, name: &str, program: &Path, args: &[String], dir: &Path) -> anyhow::Result<Proc> {
        if ns == ROOT {
            return Proc::spawn(name, program, args, dir);
        }
        let mut all = vec!["netns".to_string(), "exec".to_string(), ns.to_string(), program.display().to_string()];
        all.extend(args.iter().cloned());
        Proc::spawn(name, Path::new("ip"), &all, dir)
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        // Ends left in the root namespace would outlive the namespaces.
        for link in &self.links {
            if link.a_ns == ROOT {
                let _ = ip(ROOT, &["link", "del", &link.a_dev]);
            }
            if link.b_ns == ROOT {
                let _ = ip(ROOT, &["link", "del", &link.b_dev]);
            }
        }
        // Deleting a namespace deletes the veth ends inside it, and so
        // their peers.
        for ns in &self.namespaces {
            let _ = ip(ROOT, &["netns", "del", ns]);
        }
    }
}

/// Removes namespaces of this module whose process is gone (killed before
/// its labs were dropped).
fn remove_stale_namespaces() {
    let Ok(list) = ip(ROOT, &["netns", "list"]) else { return };
    for line in list.lines() {
        let Some(name) = line.split_whitespace().next() else { continue };
        let Some(rest) = name.strip_prefix(NAME_PREFIX) else { continue };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else { continue };
        if pid != std::process::id() && !process_alive(pid) {
            let _ = ip(ROOT, &["netns", "del", name]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds a small lab, checks that a cut really separates two
    /// namespaces and a heal joins them again, and that nothing is left
    /// after drop.
    #[test]
    fn a_cut_link_separates_namespaces_and_drop_removes_everything() {
        let Some(mut lab) = Lab::for_test("unit", "netns unit") else { return };
        let a = lab.namespace("a").unwrap();
        let b = lab.namespace("b").unwrap();
        let link = lab.link(&a, &b).unwrap();
        // The kernel's own answer: is there a route from `a` to `b`?
        let reaches = |lab: &Lab| {
            let out = lab
                .command(&a, Path::new("ip"))
                .args(["route", "get", &link.b_addr.to_string()])
                .output()
                .unwrap();
            out.status.success()
        };
        assert!(reaches(&lab), "a reaches b over the link");
        lab.cut(&link).unwrap();
        assert!(!reaches(&lab), "a does not reach b after the cut");
        lab.heal(&link).unwrap();
        assert!(reaches(&lab), "a reaches b again after the heal");
        let names = (a.clone(), b.clone());
        drop(lab);
        let list = ip(ROOT, &["netns", "list"]).unwrap();
        assert!(!list.contains(&names.0) && !list.contains(&names.1), "namespaces left behind: {list}");
    }
}
