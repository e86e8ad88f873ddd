//! One fuzz run per seed, and a campaign of runs.
//!
//! A run builds a [`Cluster`], draws a [`Swarm`] and then, for each case,
//! lets time pass (the legit host sends, timeouts fire) and feeds one
//! hostile input: decoded as the driver decodes it, and if it decodes,
//! handed to a node. Each case runs under `catch_unwind`; after each one
//! the invariants are checked, and at the end of the run the legit stream
//! must be acked and counted exactly once. A run stops at its first
//! violation (the state after it proves nothing more); a seed replays it
//! exactly, since the seed decides everything.

use std::cell::RefCell;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::{Arc, Mutex, Once, mpsc};
use std::time::{Duration, Instant};

use fog_protocol::{NodeState, PeerMessage, Record, Request, decode, decode_request};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::cluster::{Cluster, Violation};
use crate::inputs::{Channel, Context, Generator, Input, Swarm, disarm_impersonation};

/// What a campaign is asked to do.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    /// Hostile inputs per run.
    pub cases: u64,
    /// One input that takes more CPU time than this is a finding.
    pub slow: Duration,
    /// Most batches at the caps per run (each takes up to seconds).
    pub max_huge: u32,
    /// Use this swarm in every run instead of drawing one per seed.
    pub swarm: Option<Swarm>,
}

impl Default for Options {
    fn default() -> Self {
        Options { cases: 64, slow: Duration::from_millis(250), max_huge: 1, swarm: None }
    }
}

/// One broken invariant, with what replays it.
#[derive(Debug, Clone)]
pub struct Finding {
    pub sig: String,
    pub detail: String,
    pub seed: u64,
    /// The input it showed at (`cases` for the end-of-run checks).
    pub case: u64,
    /// The input's bytes; for an end-of-run finding, every frame of the run
    /// that decoded, each preceded by its length (u32, little-endian).
    pub bytes: Vec<u8>,
}

/// What one run did.
#[derive(Debug, Default)]
pub struct RunReport {
    pub executions: u64,
    /// Inputs that decoded and reached a node.
    pub reached: u64,
    pub finding: Option<Finding>,
    /// The slowest input: microseconds of CPU, and its case.
    pub slowest_us: u64,
    pub slowest_case: u64,
    pub swarm: Option<Swarm>,
}

thread_local! {
    static PANIC: RefCell<Option<(String, String)>> = const { RefCell::new(None) };
}

/// Panics inside a run are findings, not noise: a hook records where and
/// what (for the signature) instead of printing.
fn quiet_panics() {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let msg = info
                .payload()
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| info.payload().downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            let at = info.location().map(|l| format!("{}:{}", l.file(), l.line())).unwrap_or_default();
            let in_run = PANIC.with(|p| {
                let mut p = p.borrow_mut();
                let in_run = p.is_some();
                if in_run {
                    *p = Some((msg.clone(), at.clone()));
                }
                in_run
            });
            if !in_run {
                previous(info);
            }
        }));
    });
}

/// Runs `f` as one case: a panic becomes a violation named by its message
/// (digits removed) and file.
fn guarded<T>(f: impl FnOnce() -> Result<T, Violation>) -> Result<T, Violation> {
    quiet_panics();
    PANIC.with(|p| *p.borrow_mut() = Some((String::new(), String::new())));
    let result = catch_unwind(AssertUnwindSafe(f));
    let caught = PANIC.with(|p| p.borrow_mut().take());
    match result {
        Ok(r) => r,
        Err(_) => {
            let (msg, at) = caught.unwrap_or_default();
            let file = at.rsplit_once(':').map_or(at.as_str(), |(f, _)| f);
            let short: String = msg.chars().map(|c| if c.is_ascii_digit() { 'N' } else { c }).take(60).collect();
            Err(Violation { sig: format!("panic: {short} @ {file}"), detail: format!("panicked at {at}: {msg}") })
        }
    }
}

/// Runs seed `seed`; with `stop_after: Some(k)` stops after case `k` and
/// prints every case (the replay).
pub fn run_seed(seed: u64, opts: &Options, stop_after: Option<u64>) -> RunReport {
    run_seed_with(seed, opts, stop_after, None)
}

/// The case a run is at, its input and when it started, for a watchdog.
#[derive(Debug)]
pub struct Progress(Mutex<(u64, Vec<u8>, Instant)>);

impl Progress {
    fn at(&self, case: u64, bytes: &[u8]) {
        if let Ok(mut p) = self.0.lock() {
            *p = (case, bytes.to_vec(), Instant::now());
        }
    }
}

/// Runs seed `seed` on a thread of its own and lets no single input (nor
/// the setup, nor the final settling) run longer than `hang`. One that does
/// is reported as a `hang` at its case (with its bytes) and abandoned: its
/// thread spins on, so the caller should end the process soon (`hung`).
pub fn run_seed_watched(seed: u64, opts: &Options, hang: Duration) -> (RunReport, bool) {
    let progress = Arc::new(Progress(Mutex::new((0, Vec::new(), Instant::now()))));
    let (done, finished) = mpsc::channel();
    let (opts_copy, watched) = (*opts, Arc::clone(&progress));
    let spawned = std::thread::Builder::new().name(format!("fuzz-seed-{seed}")).spawn(move || {
        let _ = done.send(run_seed_with(seed, &opts_copy, None, Some(&watched)));
    });
    if spawned.is_err() {
        return (run_seed(seed, opts, None), false);
    }
    loop {
        match finished.recv_timeout(Duration::from_millis(20)) {
            Ok(report) => return (report, false),
            Err(mpsc::RecvTimeoutError::Timeout) => {
                let Ok(p) = progress.0.lock() else { continue };
                let (case, bytes, since) = (p.0, p.1.clone(), p.2);
                drop(p);
                if since.elapsed() < hang {
                    continue;
                }
                let finding = Finding {
                    sig: "hang".to_string(),
                    detail: format!("case {case} ({} bytes) did not finish within {} ms", bytes.len(), hang.as_millis()),
                    seed,
                    case,
                    bytes,
                };
                return (RunReport { executions: case + 1, finding: Some(finding), ..RunReport::default() }, true);
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => return (RunReport::default(), false),
        }
    }
}

fn run_seed_with(seed: u64, opts: &Options, stop_after: Option<u64>, progress: Option<&Progress>) -> RunReport {
    let verbose = stop_after.is_some();
    let mut rng = StdRng::seed_from_u64(seed);
    let drawn = Swarm::draw(&mut rng);
    let swarm = opts.swarm.unwrap_or(drawn);
    let mut report = RunReport { swarm: Some(swarm), ..RunReport::default() };
    if verbose {
        println!("seed {seed}: {swarm:?}");
    }
    let found = |case: u64, bytes: Vec<u8>, v: Violation| Finding { sig: v.sig, detail: v.detail, seed, case, bytes };
    let mut cluster = match guarded(|| Cluster::new(swarm.pair)) {
        Ok(c) => c,
        Err(v) => {
            report.finding = Some(found(0, Vec::new(), v));
            return report;
        }
    };
    let mut generator = Generator::new(swarm, opts.max_huge);
    let mut decoded_frames: Vec<u8> = Vec::new();
    // Hostile input on the state channel may legitimately take a node out
    // of service; then only double counting is judged at the end.
    let mut peer_input = false;
    let last = stop_after.unwrap_or(opts.cases.saturating_sub(1)).min(opts.cases.saturating_sub(1));
    for case in 0..=last {
        let step = rng.random_range(1..=40);
        if let Err(v) = guarded(|| cluster.advance(step)) {
            report.finding = Some(found(case, Vec::new(), v));
            return report;
        }
        let cx = Context { now: cluster.now, epoch: cluster.max_epoch(), lsn: cluster.max_lsn(), sealed: cluster.sealed() };
        let input = generator.input(&mut rng, &cx);
        if let Some(p) = progress {
            p.at(case, &input.bytes);
        }
        let started = thread_cpu_time();
        let outcome = guarded(|| feed(&mut cluster, &input, verbose.then_some(case)));
        let took = thread_cpu_time().saturating_sub(started);
        report.executions += 1;
        let us = took.as_micros() as u64;
        if us > report.slowest_us {
            report.slowest_us = us;
            report.slowest_case = case;
        }
        let outcome = outcome.and_then(|decoded| {
            if decoded {
                decoded_frames.extend_from_slice(&(input.bytes.len() as u32).to_le_bytes());
                decoded_frames.extend_from_slice(&input.bytes);
                peer_input |= input.channel == Channel::Peer;
                report.reached += 1;
            }
            if took > opts.slow {
                return Err(Violation::new(
                    "slow-input",
                    format!(
                        "one {:?} {:?} input of {} bytes ({}) took {} ms of CPU",
                        input.kind,
                        input.channel,
                        input.bytes.len(),
                        shape(&input.bytes),
                        took.as_millis()
                    ),
                ));
            }
            Ok(())
        });
        if let Err(v) = outcome {
            report.finding = Some(found(case, input.bytes.clone(), v));
            return report;
        }
    }
    if stop_after.is_some_and(|k| k < opts.cases) {
        return report;
    }
    if let Some(p) = progress {
        p.at(opts.cases, &decoded_frames);
    }
    if let Err(v) = guarded(|| cluster.settle_and_check(30_000, !peer_input)) {
        report.finding = Some(found(opts.cases, decoded_frames, v));
    }
    report
}

/// Decodes `input` as its channel's receiver does and hands it to a node;
/// returns whether it decoded.
fn feed(cluster: &mut Cluster, input: &Input, trace: Option<u64>) -> Result<bool, Violation> {
    let target = cluster.target(input.to_active);
    match input.channel {
        Channel::Frontend => {
            let Ok(mut request) = decode_request(&input.bytes) else {
                if let Some(case) = trace {
                    println!("case {case}: {:?} frontend frame of {} bytes: not decoded", input.kind, input.bytes.len());
                }
                return Ok(false);
            };
            if let Request::Batch { sensors, .. } = &mut request {
                disarm_impersonation(sensors);
            }
            if let Some(case) = trace {
                println!("case {case}: {:?} request to node {target} ({:?}): {}", input.kind, cluster.state(target), brief(&request));
            }
            // A batch may carry a genuinely sealed newer epoch when hostile
            // peer messages made the other node take over: stepping down on
            // that is right.
            let proves_takeover = matches!(&request, Request::Batch { epoch, seal, .. } if cluster.is_genuine(*epoch, *seal));
            let was = cluster.state(target);
            cluster.hostile_request(target, &request)?;
            let is = cluster.state(target);
            if was == NodeState::Active && is != NodeState::Active && !proves_takeover {
                return Err(Violation::new(
                    "active-stepped-down-on-request",
                    format!("node {target} went from active to {is:?} on a client's request: {}", brief(&request)),
                ));
            }
        }
        Channel::Peer => {
            let Ok(mut msg) = decode::<PeerMessage>(&input.bytes) else {
                if let Some(case) = trace {
                    println!("case {case}: {:?} peer frame of {} bytes: not decoded", input.kind, input.bytes.len());
                }
                return Ok(false);
            };
            match &mut msg {
                PeerMessage::Merge { sensors, .. } => disarm_impersonation(sensors),
                PeerMessage::Records { entries, .. } => {
                    for e in entries {
                        if let Record::ReadingsAccepted { sensors, .. } = &mut e.record {
                            disarm_impersonation(sensors);
                        }
                    }
                }
                _ => {}
            }
            if let Some(case) = trace {
                println!("case {case}: {:?} peer message to node {target} ({:?}): {}", input.kind, cluster.state(target), clip(&format!("{msg:?}")));
            }
            cluster.hostile_peer(target, msg)?;
        }
    }
    Ok(true)
}

/// The CPU time this thread has used: what an input costs, whatever
/// else the machine runs (wall time on a shared 2-core box varies by 5x).
#[cfg(target_os = "linux")]
fn thread_cpu_time() -> Duration {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes one timespec through a valid pointer.
    let ok = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) } == 0;
    if !ok {
        return Duration::ZERO;
    }
    Duration::new(u64::try_from(ts.tv_sec).unwrap_or(0), u32::try_from(ts.tv_nsec).unwrap_or(0))
}

#[cfg(not(target_os = "linux"))]
fn thread_cpu_time() -> Duration {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    START.get_or_init(Instant::now).elapsed()
}

/// The size of a frame's request: sensors, readings, distinct seqs of
/// the largest sensor (what a slow input is slow at).
fn shape(frame: &[u8]) -> String {
    let Ok(Request::Batch { sensors, .. }) = decode_request(frame) else {
        return "not a batch".to_string();
    };
    let readings: usize = sensors.iter().map(|s| s.readings.len()).sum();
    let largest = sensors.iter().max_by_key(|s| s.readings.len());
    let distinct = largest.map_or(0, |s| s.readings.iter().map(|r| r.seq).collect::<std::collections::HashSet<_>>().len());
    format!("{} sensors, {readings} readings, {distinct} distinct seqs in the largest sensor", sensors.len())
}

/// A request in one line: ids, epoch, and the sizes (not every reading).
fn brief(request: &Request) -> String {
    match request {
        Request::Status => "status".to_string(),
        Request::Batch { batch_id, epoch, sensors, .. } => {
            let readings: usize = sensors.iter().map(|s| s.readings.len()).sum();
            let head: Vec<String> = sensors
                .iter()
                .take(3)
                .map(|s| format!("{}/{} {:?} cursor {:?}", s.sensor_id, s.incarnation, s.readings.iter().take(3).collect::<Vec<_>>(), s.average_cursor))
                .collect();
            clip(&format!("batch {batch_id} epoch {epoch}, {} sensors, {readings} readings: {}", sensors.len(), head.join("; ")))
        }
    }
}

fn clip(s: &str) -> String {
    if s.len() > 400 { format!("{}…", &s[..s.char_indices().nth(400).map_or(s.len(), |(i, _)| i)]) } else { s.to_string() }
}

/// The first finding of each signature, and totals, over many runs.
#[derive(Debug, Default)]
pub struct Campaign {
    pub runs: u64,
    pub executions: u64,
    /// Inputs that decoded and reached a node.
    pub reached: u64,
    pub slowest_us: u64,
    /// `seed:case` of the slowest input.
    pub slowest_at: (u64, u64),
    /// Per signature: the first finding, the executions and the time it
    /// took to find it, and how many runs hit it.
    pub findings: std::collections::BTreeMap<String, (Finding, u64, Duration, u64)>,
}

impl Campaign {
    /// Adds one run; returns its finding if the signature is new.
    pub fn add(&mut self, report: RunReport, elapsed: Duration, seed: u64) -> Option<&Finding> {
        self.runs += 1;
        self.executions += report.executions;
        self.reached += report.reached;
        if report.slowest_us > self.slowest_us {
            self.slowest_us = report.slowest_us;
            self.slowest_at = (seed, report.slowest_case);
        }
        let f = report.finding?;
        let executions = self.executions;
        let sig = f.sig.clone();
        let entry = self.findings.entry(sig).or_insert((f, executions, elapsed, 0));
        entry.3 += 1;
        (entry.3 == 1).then_some(&entry.0)
    }
}
