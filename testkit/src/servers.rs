//! Server pairs and hosts as real processes: their arguments, starting
//! them, `fog-server status` queries, and the comparison of what servers
//! counted with what hosts generated.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use serde_json::Value;

use crate::{BinError, PairKeys, Proc, StatusAuth, bin, free_port, wait_for};

/// The four endpoints of a server pair.
#[derive(Debug, Clone)]
pub struct Pair {
    pub primary_frontend: String,
    pub backup_frontend: String,
    pub primary_state: String,
    pub backup_state: String,
}

impl Pair {
    /// Waits (up to `timeout`) until one node is active and the other a
    /// caught-up passive (asked without keys); the active's frontend.
    pub fn settled_active(&self, timeout: Duration) -> anyhow::Result<String> {
        wait_for("one active node and a caught-up passive", timeout, || {
            let p = server_status(&self.primary_frontend).ok()?;
            let b = server_status(&self.backup_frontend).ok()?;
            match (is_active(&p), is_active(&b)) {
                (true, false) if is_caught_up(&b) => Some(self.primary_frontend.clone()),
                (false, true) if is_caught_up(&p) => Some(self.backup_frontend.clone()),
                _ => None,
            }
        })
    }

    /// A pair on loopback, each endpoint on a port from [`free_port`].
    pub fn on_free_ports() -> anyhow::Result<Self> {
        let ep = || -> anyhow::Result<String> { Ok(format!("tcp://127.0.0.1:{}", free_port()?)) };
        Ok(Self { primary_frontend: ep()?, backup_frontend: ep()?, primary_state: ep()?, backup_state: ep()? })
    }

    /// The frontend of one node: where hosts and `status` reach it.
    pub fn frontend(&self, primary: bool) -> &str {
        if primary { &self.primary_frontend } else { &self.backup_frontend }
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

/// The name (`primary` or `backup`) and the arguments of one node of `pair`,
/// with its own data dir under `dir` unless `extra` names one.
pub fn server_args(pair: &Pair, primary: bool, extra: &[&str], dir: &Path) -> (&'static str, Vec<String>) {
    let mut args = pair.server_args(primary);
    args.extend(extra.iter().map(|s| s.to_string()));
    let name = node_name(primary);
    // Each node keeps its log in the test's scratch dir, so a restarted
    // node finds its own data and tests never share any.
    if !extra.contains(&"--data-dir") {
        args.extend(["--data-dir".to_string(), data_dir(dir, primary).display().to_string()]);
    }
    (name, args)
}

fn node_name(primary: bool) -> &'static str {
    if primary { "primary" } else { "backup" }
}

/// The data dir [`server_args`] gives one node of a pair run in `dir`.
pub fn data_dir(dir: &Path, primary: bool) -> PathBuf {
    dir.join(format!("{}-data", node_name(primary)))
}

/// Starts one server node and waits until it answers `status`.
pub fn start_server(pair: &Pair, primary: bool, extra: &[&str], dir: &Path) -> anyhow::Result<Proc> {
    start_server_with_env(pair, primary, extra, dir, &[])
}

/// [`start_server`] with more environment variables (a fake clock).
pub fn start_server_with_env(pair: &Pair, primary: bool, extra: &[&str], dir: &Path, env: &[(String, String)]) -> anyhow::Result<Proc> {
    let (name, args) = server_args(pair, primary, extra, dir);
    let proc = Proc::spawn_with_env(name, &bin("fog-server")?, &args, dir, env)?;
    wait_until_serving(proc, pair.frontend(primary))
}

/// Starts one server node with its keys from `keys` (CurveZMQ on every
/// socket) and waits until it answers `status` to the admin key.
pub fn start_keyed_server(pair: &Pair, primary: bool, extra: &[&str], dir: &Path, keys: &PairKeys) -> anyhow::Result<Proc> {
    let key_args = keys.server_args(primary);
    let mut all: Vec<&str> = extra.to_vec();
    all.extend(key_args.iter().map(String::as_str));
    let (name, args) = server_args(pair, primary, &all, dir);
    let proc = Proc::spawn(name, &bin("fog-server")?, &args, dir)?;
    wait_until_serving_as(proc, pair.frontend(primary), Some(&keys.admin_status(primary)))
}

/// Waits until the server `proc` answers `status` at `endpoint`, at most 20 s.
pub fn wait_until_serving(proc: Proc, endpoint: &str) -> anyhow::Result<Proc> {
    wait_until_serving_as(proc, endpoint, None)
}

/// [`wait_until_serving`] for a server run with keys: `status` asks with `auth`.
pub fn wait_until_serving_as(mut proc: Proc, endpoint: &str, auth: Option<&StatusAuth>) -> anyhow::Result<Proc> {
    let what = format!("{} to answer status at {endpoint}", proc.name);
    let served = wait_for(&what, Duration::from_secs(20), || {
        match server_status_as(endpoint, auth) {
            Ok(_) => return Some(Ok(())),
            // No status client to ask with: waiting cannot help.
            Err(e) if e.downcast_ref::<BinError>().is_some() => return Some(Err(e)),
            Err(_) => {}
        }
        match proc.child.try_wait() {
            Ok(None) => None,
            Ok(Some(exit)) => Some(Err(anyhow!("{} exited ({exit}) before it answered status", proc.name))),
            Err(e) => Some(Err(anyhow!("cannot wait for {}: {e}", proc.name))),
        }
    });
    match served.and_then(|outcome| outcome) {
        Ok(()) => Ok(proc),
        Err(e) => bail!("{e:#}; last lines of its log:\n{}", proc.log_tail(20)),
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
    let out = Command::new(bin("fog-server")?).args(&args).output().context("cannot run fog-server status")?;
    if !out.status.success() {
        bail!("status of {endpoint} failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    let text = String::from_utf8_lossy(&out.stdout);
    if text.trim().lines().count() != 1 {
        bail!("status --json of {endpoint} printed {} lines, not one: {text}", text.trim().lines().count());
    }
    serde_json::from_str(&text).with_context(|| format!("status output is not one JSON object: {text}"))
}

/// Starts `fog-host` with `--json` and the given arguments.
pub fn start_host(args: &[&str], dir: &Path) -> anyhow::Result<Proc> {
    let mut all: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    all.push("--json".into());
    Proc::spawn("host", &bin("fog-host")?, &all, dir)
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
    let status = host.wait_for_exit(timeout)?;
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

