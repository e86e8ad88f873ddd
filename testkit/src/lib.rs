//! The one harness of fog's tests, benchmarks (`fog-bench`) and verifier
//! (`fog-verify`): it starts real `fog-server` and `fog-host` processes,
//! asks them for their state, and kills them when dropped.
//!
//! Every function returns an error instead of panicking, so a test fails
//! with what went wrong and a tool prints it as its own error.
//!
//! - [`bin`] finds a workspace binary beside the running program and
//!   refuses one older than its source, naming the file that changed and
//!   the build to run ([`binaries`]);
//! - [`free_port`] hands out loopback ports no other user of the kit is
//!   handed, claimed across processes ([`ports`]);
//! - [`Proc`] is a child process killed on drop whose stderr goes to a log
//!   file; when a test panics the tail of every log is printed;
//! - [`servers`] starts nodes and hosts, queries `fog-server status`, and
//!   compares what servers counted with what hosts generated;
//! - [`wait_for`] polls a probe until a deadline: tests wait for a state
//!   instead of sleeping and hoping it has come;
//! - [`netns`] builds network namespaces for tests that cut links;
//!   [`history`] checks what hosts saw acked against what servers counted;
//!   [`keys`] makes the CurveZMQ keys and authorized-keys files of a keyed
//!   pair; [`client`] speaks to a server's frontend directly, and
//!   [`rogue`] builds the batches hostile clients send;
//! - [`browser`] runs headless Chromium on a page (the live page's tests);
//! - [`prometheus`] runs a real Prometheus and `promtool`, reads the text
//!   format, and GETs `/metrics`, `/healthz` and `/readyz`;
//! - [`nats`] runs a NATS JetStream cluster for the uplink, and [`cloud`]
//!   checks a site's stream against what the site counted.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

pub mod binaries;
pub mod browser;
pub mod client;
pub mod cloud;
pub mod faketime;
pub mod history;
pub mod http;
pub mod keys;
pub mod languages;
pub mod nats;
pub mod netns;
pub mod ports;
pub mod process;
pub mod prometheus;
pub mod rogue;
pub mod servers;

pub use binaries::{BinError, bin};
pub use client::Client;
pub use keys::{PairKeys, StatusAuth};
pub use ports::free_port;
pub use process::{Proc, log_lines_with, wait_for_log_line};
pub use servers::{
    Pair, check_counts, check_pair, count_mismatches, data_dir, finish_host, is_active, is_caught_up, server_args,
    server_counts, server_status, server_status_as, start_host, start_keyed_server, start_server, start_server_with_env,
    status_when,
    status_when_as, wait_until_serving, wait_until_serving_as,
};

/// Resident memory of a process in MiB, from /proc (`None` once it is gone).
pub fn rss_mib(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib: f64 = status.lines().find(|l| l.starts_with("VmRSS:"))?.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

/// A fresh, empty scratch directory for one test (or one benchmark run),
/// under the system's temporary directory.
pub fn scratch_dir(test: &str) -> anyhow::Result<PathBuf> {
    static N: AtomicU32 = AtomicU32::new(0);
    let dir = std::env::temp_dir().join(format!(
        "fog-test-{}-{}-{}",
        test,
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create the scratch dir {}", dir.display()))?;
    Ok(dir)
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
