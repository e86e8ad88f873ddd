//! The one harness for end-to-end tests: starts real `fog-server` and
//! `fog-host` processes on loopback, asks them for their state, and kills
//! them when dropped.
//!
//! Binaries are found next to the test executable (`target/<profile>/`);
//! `cargo test --workspace` builds them, because the host and server
//! packages have integration tests of their own.
//! Each process writes its stderr to a log file; when a test fails, the tail
//! of every log is printed so the failure can be understood. [`netns`]
//! builds network namespaces for tests that cut links; [`history`] checks
//! what hosts saw acked against what servers counted; [`keys`] makes the
//! CurveZMQ keys and authorized-keys files of a keyed pair; [`rogue`]
//! builds hostile clients and the batches they send.

use std::net::{Ipv4Addr, TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::Value;

pub mod history;
pub mod keys;
pub mod netns;
pub mod rogue;

pub use keys::{PairKeys, StatusAuth};

/// Path of a workspace binary built beside the running program: a test
/// (`target/<profile>/deps/<test>`) or a binary (`target/<profile>/<bin>`).
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("executable path");
    let beside = exe.parent().expect("an executable lives in a directory");
    let candidates = [beside.join(name), beside.parent().unwrap_or(beside).join(name)];
    let found = candidates.iter().find(|p| p.exists());
    assert!(
        found.is_some(),
        "{name} not found beside {}: build the workspace first (cargo build --release)",
        exe.display()
    );
    found.cloned().unwrap_or_default()
}

/// Resident memory of a process in MiB, from /proc (`None` once it is gone).
pub fn rss_mib(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib: f64 = status.lines().find(|l| l.starts_with("VmRSS:"))?.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

/// A port on 127.0.0.1 that no other user of this harness will be handed
/// while this process runs, and that nothing else held a moment ago.
///
/// The servers bind their ports themselves, so the harness cannot hold a
/// port for them; asking the kernel for port 0 and letting it go (what
/// this did before) races with every process on the machine, and worst
/// with the kernel itself, which hands out the same ephemeral range as the
/// local ports of outgoing connections (each `fog-server status` and each
/// host makes some). So ports come from below the ephemeral range, each
/// handed out once per process, and each claimed across processes: a UDP
/// socket bound to the same number is held until the process exits. TCP
/// and UDP ports are separate, so the claim does not stop the server
/// binding its TCP port, but every other test process (of this or another
/// checkout) sees the claim and moves on. A TCP bind test skips ports that
/// something else holds. What remains is a program outside this harness
/// binding a fixed port in this range between the test and the server.
///
/// Retrying a server start on another port when it fails to bind is not
/// done: a pair's ports are known to its peer and to the host, and a node
/// restarted in a test must come back on the same ones.
pub fn free_port() -> u16 {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    static CLAIMS: Mutex<Vec<UdpSocket>> = Mutex::new(Vec::new());
    let pool = claimable_ports();
    let span = u32::from(pool.end - pool.start);
    // Processes start at different places, so that they rarely meet.
    let start = std::process::id().wrapping_mul(7_919) % span;
    for _ in 0..span {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = pool.start + ((start + n) % span) as u16;
        let Ok(claim) = UdpSocket::bind((Ipv4Addr::LOCALHOST, port)) else { continue };
        if TcpListener::bind((Ipv4Addr::LOCALHOST, port)).is_ok() {
            CLAIMS.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).push(claim);
            return port;
        }
    }
    panic!("no free port left in {pool:?}");
}

/// Ports [`free_port`] hands out: from 10 000 up to where the kernel's
/// ephemeral range (`/proc/sys/net/ipv4/ip_local_port_range`) begins.
fn claimable_ports() -> std::ops::Range<u16> {
    let ephemeral_start = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32_768);
    // A machine whose ephemeral range starts very low still gets a pool;
    // there the claims and the bind test are all that keep ports apart.
    10_000..ephemeral_start.max(12_000)
}

/// A fresh scratch directory for one test.
pub fn scratch_dir(test: &str) -> PathBuf {
    static N: AtomicU32 = AtomicU32::new(0);
    let dir = std::env::temp_dir().join(format!(
        "fog-e2e-{}-{}-{}",
        test,
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir
}

/// The four endpoints of a server pair.
#[derive(Debug, Clone)]
pub struct Pair {
    pub primary_frontend: String,
    pub backup_frontend: String,
    pub primary_state: String,
    pub backup_state: String,
}

impl Pair {
    pub fn on_free_ports() -> Self {
        let ep = |p: u16| format!("tcp://127.0.0.1:{p}");
        Self {
            primary_frontend: ep(free_port()),
            backup_frontend: ep(free_port()),
            primary_state: ep(free_port()),
            backup_state: ep(free_port()),
        }
    }

    /// `--servers` for a host: primary first.
    pub fn servers(&self) -> String {
        format!("{},{}", self.primary_frontend, self.backup_frontend)
    }

    /// Arguments that start one node of this pair.
    pub fn server_args(&self, primary: bool) -> Vec<String> {
        let (role, frontend, bind, connect) = if primary {
            ("--primary", &self.primary_frontend, &self.primary_state, &self.backup_state)
        } else {
            ("--backup", &self.backup_frontend, &self.backup_state, &self.primary_state)
        };
        [role, "--frontend", frontend, "--state-bind", bind, "--state-connect", connect]
            .iter()
            .map(|s| s.to_string())
            .collect()
    }
}

/// A child process that is killed (SIGKILL) when dropped.
pub struct Proc {
    pub name: String,
    pub child: Child,
    pub log: PathBuf,
}

impl Proc {
    pub fn spawn(name: &str, program: &Path, args: &[String], dir: &Path) -> anyhow::Result<Proc> {
        let log = dir.join(format!("{name}.log"));
        let stderr = std::fs::File::create(&log)?;
        let child = Command::new(program)
            .args(args)
            .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .with_context(|| format!("cannot start {}", program.display()))?;
        Ok(Proc { name: name.to_string(), child, log })
    }

    /// SIGKILL, as `kill -9` would.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!("---- last lines of {} ({}) ----\n{}", self.name, self.log.display(), self.log_tail(40));
        }
    }
}

/// The name (`primary` or `backup`) and the arguments of one node of `pair`,
/// with its own data dir under `dir` unless `extra` names one.
pub fn server_args(pair: &Pair, primary: bool, extra: &[&str], dir: &Path) -> (&'static str, Vec<String>) {
    let mut args = pair.server_args(primary);
    args.extend(extra.iter().map(|s| s.to_string()));
    let name = if primary { "primary" } else { "backup" };
    // Each node keeps its log in the test's scratch dir, so a restarted
    // node finds its own data and tests never share any.
    if !extra.contains(&"--data-dir") {
        args.extend(["--data-dir".to_string(), dir.join(format!("{name}-data")).display().to_string()]);
    }
    (name, args)
}

/// Starts one server node and waits until it answers `status`.
pub fn start_server(pair: &Pair, primary: bool, extra: &[&str], dir: &Path) -> anyhow::Result<Proc> {
    let (name, args) = server_args(pair, primary, extra, dir);
    let proc = Proc::spawn(name, &bin("fog-server"), &args, dir)?;
    let endpoint = if primary { &pair.primary_frontend } else { &pair.backup_frontend };
    wait_until_serving(proc, endpoint)
}

/// Starts one server node with its keys from `keys` (CurveZMQ on every
/// socket) and waits until it answers `status` to the admin key.
pub fn start_keyed_server(pair: &Pair, primary: bool, extra: &[&str], dir: &Path, keys: &PairKeys) -> anyhow::Result<Proc> {
    let key_args = keys.server_args(primary);
    let mut all: Vec<&str> = extra.to_vec();
    all.extend(key_args.iter().map(String::as_str));
    let (name, args) = server_args(pair, primary, &all, dir);
    let proc = Proc::spawn(name, &bin("fog-server"), &args, dir)?;
    let endpoint = if primary { &pair.primary_frontend } else { &pair.backup_frontend };
    wait_until_serving_as(proc, endpoint, Some(&keys.admin_status(primary)))
}

/// Waits until the server `proc` answers `status` at `endpoint`, at most 20 s.
pub fn wait_until_serving(proc: Proc, endpoint: &str) -> anyhow::Result<Proc> {
    wait_until_serving_as(proc, endpoint, None)
}

/// [`wait_until_serving`] for a server run with keys: `status` asks with `auth`.
pub fn wait_until_serving_as(mut proc: Proc, endpoint: &str, auth: Option<&StatusAuth>) -> anyhow::Result<Proc> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if server_status_as(endpoint, auth).is_ok() {
            return Ok(proc);
        }
        if let Some(exit) = proc.child.try_wait()? {
            bail!("{} exited ({exit}) before it answered status:\n{}", proc.name, proc.log_tail(20));
        }
        if Instant::now() > deadline {
            bail!("{} did not answer status within 20 s:\n{}", proc.name, proc.log_tail(20));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `fog-server status ENDPOINT --json`, parsed.
pub fn server_status(endpoint: &str) -> anyhow::Result<Value> {
    server_status_as(endpoint, None)
}

/// `fog-server status ENDPOINT --json`, parsed, authenticated with `auth`
/// when the server runs with keys.
pub fn server_status_as(endpoint: &str, auth: Option<&StatusAuth>) -> anyhow::Result<Value> {
    let mut args: Vec<String> = ["status", endpoint, "--json", "--timeout", "1s"].iter().map(|s| s.to_string()).collect();
    args.extend(auth.map(StatusAuth::args).unwrap_or_default());
    let out = Command::new(bin("fog-server")).args(&args).output().context("cannot run fog-server status")?;
    if !out.status.success() {
        bail!("status of {endpoint} failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    serde_json::from_slice(&out.stdout).with_context(|| {
        format!("status output is not one JSON object: {}", String::from_utf8_lossy(&out.stdout))
    })
}

/// Starts `fog-host` with `--json` and the given arguments.
pub fn start_host(args: &[&str], dir: &Path) -> anyhow::Result<Proc> {
    let mut all: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    all.push("--json".into());
    Proc::spawn("host", &bin("fog-host"), &all, dir)
}

/// Waits for a host started with [`start_host`] to exit; returns its exit
/// code and its JSON summary.
pub fn finish_host(mut host: Proc, timeout: Duration) -> anyhow::Result<(i32, Value)> {
    // Read stdout while waiting: a large summary would fill the pipe.
    let mut stdout_pipe = host.child.stdout.take().context("host stdout")?;
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        use std::io::Read;
        let _ = stdout_pipe.read_to_string(&mut text);
        text
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = host.child.try_wait()? {
            break status;
        }
        if Instant::now() > deadline {
            bail!("host did not exit within {timeout:?}:\n{}", host.log_tail(20));
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let stdout = reader.join().unwrap_or_default();
    let summary: Value = serde_json::from_str(stdout.trim())
        .with_context(|| format!("host summary is not one JSON object: {stdout:?}\n{}", host.log_tail(20)))?;
    Ok((status.code().unwrap_or(-1), summary))
}

/// Per-sensor `(count, sum_kmh)` from a server status, keyed by
/// `(sensor_id, incarnation)`.
pub fn server_counts(status: &Value) -> std::collections::BTreeMap<(u64, u64), (u64, u64)> {
    status["per_sensor"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|s| {
            (
                (s["sensor_id"].as_u64().unwrap_or(0), s["incarnation"].as_u64().unwrap_or(0)),
                (s["count"].as_u64().unwrap_or(0), s["sum_kmh"].as_u64().unwrap_or(0)),
            )
        })
        .collect()
}

/// Polls `probe` every 100 ms until it returns `Some`, for at most
/// `timeout`; the error names `what` was awaited. Tests wait with this
/// instead of sleeping a fixed time and hoping the state has arrived: a
/// slow machine then costs time, not a false failure, and a state that
/// never comes fails with its name.
pub fn wait_for<T>(what: &str, timeout: Duration, mut probe: impl FnMut() -> Option<T>) -> anyhow::Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = probe() {
            return Ok(v);
        }
        if Instant::now() > deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The status of the server at `endpoint` once it satisfies `pred`, at
/// most `timeout`; the error names `what` and gives the last status seen.
pub fn status_when(endpoint: &str, what: &str, timeout: Duration, pred: impl Fn(&Value) -> bool) -> anyhow::Result<Value> {
    status_when_as(endpoint, None, what, timeout, pred)
}

/// [`status_when`] for a server run with keys: `status` asks with `auth`.
pub fn status_when_as(
    endpoint: &str,
    auth: Option<&StatusAuth>,
    what: &str,
    timeout: Duration,
    pred: impl Fn(&Value) -> bool,
) -> anyhow::Result<Value> {
    let mut last = Value::Null;
    wait_for(what, timeout, || match server_status_as(endpoint, auth) {
        Ok(s) if pred(&s) => Some(s),
        Ok(s) => {
            last = s;
            None
        }
        Err(e) => {
            last = Value::String(format!("{e:#}"));
            None
        }
    })
    .with_context(|| format!("{endpoint} was not {what}; last status {last}"))
}

/// A node that serves.
pub fn is_active(status: &Value) -> bool {
    status["state"] == "active"
}

/// A passive that has the active's whole log.
pub fn is_caught_up(status: &Value) -> bool {
    status["state"] == "passive" && status["replication"] == "caught-up" && status["lag"] == 0
}

/// How what a server counted (its `status`) differs from what hosts
/// generated (their JSON summaries): every sensor incarnation the hosts ran
/// must have exactly the count and speed sum they generated, every reading
/// must have been acked, and the server must count nothing else. Empty
/// when they agree. A reading counted twice, lost, or counted for a sensor
/// no host ran shows here; a lower bound (`count >= generated`) would let
/// a double count through.
pub fn count_mismatches(status: &Value, summaries: &[&Value]) -> Vec<String> {
    let counts = server_counts(status);
    let mut wrong = Vec::new();
    let mut expected = std::collections::BTreeMap::new();
    for summary in summaries {
        for s in summary["per_sensor"].as_array().into_iter().flatten() {
            let number = |field: &str| s[field].as_u64().unwrap_or(0);
            let key = (number("sensor_id"), number("incarnation"));
            if number("generated") != number("acked") {
                wrong.push(format!("sensor {key:?}: the host generated {} readings and got {} acked", number("generated"), number("acked")));
            }
            expected.insert(key, (number("generated"), number("sum_kmh")));
        }
    }
    if expected.is_empty() {
        wrong.push("the hosts' summaries list no sensor".to_string());
    }
    for (key, want) in &expected {
        let got = counts.get(key).copied().unwrap_or_default();
        if got != *want {
            wrong.push(format!("sensor {key:?}: server (count, sum) {got:?}, host (generated, sum) {want:?}"));
        }
    }
    for key in counts.keys().filter(|k| !expected.contains_key(k)) {
        wrong.push(format!("sensor {key:?}: counted by the server, unknown to the hosts"));
    }
    let generated: u64 = expected.values().map(|(count, _)| count).sum();
    if status["counted"].as_u64() != Some(generated) {
        wrong.push(format!("counted in total: server {}, hosts generated {generated}", status["counted"]));
    }
    wrong
}

/// [`count_mismatches`] as a check that says what it found: `Ok` when the
/// server at `label` counted exactly what the hosts generated.
pub fn check_counts(label: &str, status: &Value, summaries: &[&Value]) -> anyhow::Result<()> {
    let wrong = count_mismatches(status, summaries);
    eprintln!(
        "[{label}] {} server (state {}, epoch {}): counted {} readings of {} sensor incarnations; {} mismatches with the hosts' summaries",
        status["role"].as_str().unwrap_or("?"),
        status["state"].as_str().unwrap_or("?"),
        status["epoch"],
        status["counted"],
        server_counts(status).len(),
        wrong.len()
    );
    if !wrong.is_empty() {
        bail!("{label}: server counts differ from the hosts' summaries:\n{}", wrong.join("\n"));
    }
    Ok(())
}

/// The active at `active` and, once it has caught up, the passive at
/// `passive` each count exactly what the hosts generated (replication makes
/// both exact), and they agree on the epoch.
pub fn check_pair(label: &str, active: &str, passive: &str, summaries: &[&Value]) -> anyhow::Result<()> {
    let a = status_when(active, "active", Duration::from_secs(10), is_active)?;
    check_counts(&format!("{label}, active"), &a, summaries)?;
    let p = status_when(passive, "a caught-up passive", Duration::from_secs(15), is_caught_up)?;
    check_counts(&format!("{label}, passive"), &p, summaries)?;
    if a["epoch"] != p["epoch"] {
        bail!("{label}: the active is in epoch {} and its passive in epoch {}", a["epoch"], p["epoch"]);
    }
    Ok(())
}

impl Proc {
    /// Sends a signal by name (`HUP`, `TERM` ...), as `kill -s NAME` would.
    pub fn signal(&self, name: &str) -> anyhow::Result<()> {
        let status = Command::new("kill")
            .args(["-s", name, &self.child.id().to_string()])
            .status()
            .context("cannot run kill")?;
        if !status.success() {
            bail!("kill -s {name} {} failed", self.child.id());
        }
        Ok(())
    }
}

/// How many lines of a process's log (its [`Proc::log`]) contain every one
/// of `needles`.
pub fn log_lines_with(log: &Path, needles: &[&str]) -> usize {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter(|line| needles.iter().all(|n| line.contains(n)))
        .count()
}

/// Waits until a line of `log` contains every one of `needles`, at most
/// `timeout`.
pub fn wait_for_log_line(log: &Path, needles: &[&str], timeout: Duration) -> anyhow::Result<()> {
    let what = format!("a line with {needles:?} in {}", log.display());
    wait_for(&what, timeout, || (log_lines_with(log, needles) > 0).then_some(()))
}
