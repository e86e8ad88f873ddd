//! Benchmarks of the whole system: `fog-host` running the real sensor
//! component against a real server pair (end-to-end throughput), the
//! failover time when the active server is killed under load, and the
//! restart of a server with a long log. Each runs in the security mode of
//! its [`ServerPair`].

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use fog_testkit::{Proc, bin, finish_host, history, rss_mib, scratch_dir};
use serde::Serialize;

use crate::pair::{Security, ServerPair};

#[derive(Debug, Serialize)]
pub struct EndToEnd {
    pub sensors: u32,
    pub interval_ms: u64,
    pub generated: u64,
    pub acked: u64,
    /// Readings acked per second of the whole run: generation for the
    /// measured time, then the drain until the last ack.
    pub acked_per_s: f64,
    /// The host's run, drain included.
    pub elapsed_s: f64,
    pub host_rss_mib: f64,
    pub host_rss_kib_per_sensor: f64,
    pub server_rss_mib: Option<f64>,
}

#[derive(Debug, Serialize)]
pub struct Failover {
    pub sensors: u32,
    pub runs: usize,
    /// Kill of the active server to the first batch acked by the new one.
    pub times_ms: Vec<f64>,
    pub median_ms: f64,
    pub max_ms: f64,
    /// Readings the host saw acked that the surviving server does not count.
    pub lost: u64,
    /// Readings the surviving server counted more often than generated.
    pub duplicated: u64,
}

#[derive(Debug, Serialize)]
pub struct Recovery {
    pub readings: u64,
    pub write_s: f64,
    pub counted: u64,
    pub data_dir_mib: f64,
    /// Restart of the killed server until it answers status with every
    /// reading counted again.
    pub ready_ms: f64,
}

/// Fills a lone primary's log with `readings`, kills it with SIGKILL and
/// times its restart from the data dir.
pub async fn recovery(security: Security, readings: u64, shape: crate::load::LoadShape) -> anyhow::Result<Recovery> {
    let dir = scratch_dir("bench-recovery")?;
    let _cleanup = RemoveOnDrop(dir.clone());
    let pair = ServerPair::new(security, &dir)?;
    let mut primary = pair.start(true)?;
    let per_connection = readings.div_ceil(shape.connections as u64);
    let shape = crate::load::LoadShape { max_readings: Some(per_connection), ..shape };
    let began = Instant::now();
    crate::load::run(&pair.frontend(true), shape, crate::load::Target::Server, Duration::ZERO, Duration::from_secs(600)).await?;
    let write_s = began.elapsed().as_secs_f64();
    let before = pair.status(true, Duration::from_secs(5)).await?;
    if before.counted < readings {
        bail!("only {} of {readings} readings were counted before the restart", before.counted);
    }
    primary.kill()?;
    let data_dir_mib = dir_bytes(&dir.join("primary-data")) as f64 / (1 << 20) as f64;
    // The same data dir: the restarted server recovers the killed one's log.
    let restarted = Instant::now();
    let server = pair.spawn(true)?;
    let mut poll = status_poll();
    let ready = loop {
        poll.tick().await;
        if let Ok(s) = pair.status(true, Duration::from_millis(200)).await
            && s.counted >= before.counted
        {
            break restarted.elapsed();
        }
        if restarted.elapsed() > Duration::from_secs(120) {
            bail!("the restarted server did not recover within 120 s:\n{}", server.log_tail(10));
        }
    };
    Ok(Recovery {
        readings: before.counted,
        write_s,
        counted: before.counted,
        data_dir_mib,
        ready_ms: ready.as_secs_f64() * 1000.0,
    })
}

fn dir_bytes(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_bytes(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

/// Least time between two status queries to one server while timing it.
/// A server builds at most 20 status reports a second and answers the rest
/// `Busy`, so polling faster only buys refusals (and, in bursts, a second
/// without any report); the failover and recovery times are therefore late
/// by up to this much, half of it on average.
pub const STATUS_POLL: Duration = Duration::from_millis(50);

fn status_poll() -> tokio::time::Interval {
    let mut poll = tokio::time::interval(STATUS_POLL);
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    poll
}

/// Removes a benchmark's scratch dir (logs, data dirs: the recovery log
/// alone is 100 MiB) when dropped; declared before the processes that use
/// it, so it goes after them.
pub struct RemoveOnDrop(pub std::path::PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}


fn host_args(pair: &ServerPair, sensors: u32, interval: Duration, duration: Option<Duration>) -> Vec<String> {
    let mut a = vec![
        "--sensors".to_string(),
        sensors.to_string(),
        "--interval".into(),
        format!("{}ms", interval.as_millis()),
        "--quiet".into(),
        "--json".into(),
    ];
    a.extend(pair.host_args());
    if let Some(d) = duration {
        a.push("--duration".into());
        a.push(format!("{}ms", d.as_millis()));
    }
    a
}

/// Acked readings per second through fog-host and the real component.
pub fn end_to_end(security: Security, sensors: u32, interval: Duration, measure: Duration) -> anyhow::Result<EndToEnd> {
    let dir = scratch_dir("bench-e2e")?;
    let _cleanup = RemoveOnDrop(dir.clone());
    let pair = ServerPair::new(security, &dir)?;
    let primary = pair.start(true)?;
    let _backup = pair.start(false)?;
    let host = Proc::spawn("host", &bin("fog-host")?, &host_args(&pair, sensors, interval, Some(measure)), &dir)?;
    let pid = host.child.id();
    // Sample the host's memory while it runs; it is largest near the end.
    let sampler = std::thread::spawn(move || {
        let mut peak: f64 = 0.0;
        while let Some(rss) = rss_mib(pid) {
            peak = peak.max(rss);
            std::thread::sleep(Duration::from_millis(200));
        }
        peak
    });
    let server_rss = rss_mib(primary.child.id());
    let (code, summary) = finish_host(host, measure + Duration::from_secs(120))?;
    let host_rss = sampler.join().unwrap_or(0.0);
    if code != 0 {
        bail!("fog-host exited with code {code}: {summary}");
    }
    let acked = summary["acked"].as_u64().unwrap_or(0);
    let elapsed = summary["elapsed_s"].as_f64().unwrap_or(measure.as_secs_f64());
    Ok(EndToEnd {
        sensors,
        interval_ms: interval.as_millis() as u64,
        generated: summary["generated"].as_u64().unwrap_or(0),
        acked,
        // Generation stops at `measure`; the drain that follows counts too,
        // so a host that outruns its servers is not credited with readings
        // they ack later.
        acked_per_s: acked as f64 / measure.as_secs_f64().max(elapsed),
        elapsed_s: elapsed,
        host_rss_mib: host_rss,
        host_rss_kib_per_sensor: host_rss * 1024.0 / f64::from(sensors),
        server_rss_mib: server_rss.or_else(|| rss_mib(primary.child.id())),
    })
}

/// Kills the active server under load `runs` times and times the takeover.
pub async fn failover(security: Security, sensors: u32, runs: usize) -> anyhow::Result<Failover> {
    let mut times = Vec::new();
    let mut lost = 0;
    let mut duplicated = 0;
    for run in 0..runs {
        let dir = scratch_dir("bench-failover")?;
        let _cleanup = RemoveOnDrop(dir.clone());
        let pair = ServerPair::new(security, &dir)?;
        // Index 0 is the primary, 1 the backup.
        let mut nodes = [pair.start(true)?, pair.start(false)?];
        let mut host = Proc::spawn("host", &bin("fog-host")?, &host_args(&pair, sensors, Duration::from_secs(1), None), &dir)?;
        // Wait until one server serves the host and the other stands by.
        let t0 = Instant::now();
        let active = 'found: loop {
            for i in 0..nodes.len() {
                let s = pair.status(i == 0, Duration::from_secs(1)).await;
                if s.is_ok_and(|s| s.state == fog_protocol::NodeState::Active && s.batches >= 3) {
                    break 'found i;
                }
            }
            if let Ok(Some(exit)) = host.child.try_wait() {
                bail!("run {}: fog-host exited ({exit}) before a server served it:\n{}", run + 1, host.log_tail(10));
            }
            if t0.elapsed() > Duration::from_secs(60) {
                bail!("run {}: no server served the host within 60 s:\n{}", run + 1, host.log_tail(10));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let survivor = active == 1;
        let before = pair.status(survivor, Duration::from_secs(1)).await?.batches;
        let killed = Instant::now();
        nodes[active].kill()?;
        let mut poll = status_poll();
        let taken_over = loop {
            poll.tick().await;
            if let Ok(s) = pair.status(survivor, Duration::from_millis(200)).await
                && s.batches > before
            {
                break killed.elapsed();
            }
            if killed.elapsed() > Duration::from_secs(30) {
                bail!("run {}: the surviving server did not serve within 30 s:\n{}", run + 1, nodes[1 - active].log_tail(10));
            }
        };
        times.push(taken_over.as_secs_f64() * 1000.0);
        // Stop the host (it drains first) and compare histories.
        host.signal("INT")?;
        let (_, summary) = finish_host(host, Duration::from_secs(60)).context("host summary")?;
        let status = pair.status(survivor, Duration::from_secs(2)).await?;
        let server = history::server_side(&serde_json::to_value(&status)?);
        let verdict = history::check(&[history::host_side(&summary)], &server, &[]);
        lost += verdict.lost;
        duplicated += verdict.duplicated;
        eprintln!("  run {}: {:.0} ms", run + 1, times[times.len() - 1]);
    }
    if times.is_empty() {
        bail!("--failover-runs must be at least 1");
    }
    let mut sorted = times.clone();
    sorted.sort_by(f64::total_cmp);
    Ok(Failover {
        sensors,
        runs,
        median_ms: sorted[sorted.len() / 2],
        max_ms: sorted[sorted.len() - 1],
        times_ms: times,
        lost,
        duplicated,
    })
}
