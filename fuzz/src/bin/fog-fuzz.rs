//! `fog-fuzz`: runs seeded fuzz runs against fog-server's Node until the
//! time is up, and reports what it found.
//!
//! Exit codes: 0 nothing found, 1 findings (each written to
//! `fuzz-findings/<signature>.bin`), 2 bad usage.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use clap::Parser;
use fog_fuzz::{Campaign, Finding, Options, run_seed, run_seed_watched};

/// Feeds hostile frames into real fog-server Nodes, checking after every
/// input that nothing panics and that legit sensors are still acked and
/// counted exactly once.
#[derive(Parser)]
#[command(version)]
struct Args {
    /// Run for this many seconds.
    #[arg(long, default_value_t = 60)]
    seconds: u64,
    /// Stop after this many executions instead (whichever comes first).
    #[arg(long)]
    executions: Option<u64>,
    /// The first run's seed; run k uses seed + k.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Replay one finding, printing every input up to it: SEED:CASE as
    /// printed with the finding.
    #[arg(long, value_name = "SEED:CASE")]
    replay: Option<String>,
    /// Print the summary as JSON.
    #[arg(long)]
    json: bool,
    /// Hostile inputs per run.
    #[arg(long, default_value_t = 64)]
    cases: u64,
    /// An input that takes more CPU time than this many milliseconds is a
    /// finding (CPU time: other load on the machine does not count).
    #[arg(long, default_value_t = 250)]
    slow_ms: u64,
    /// An input still running after this many milliseconds is a hang: it
    /// is reported and the campaign ends (`next_seed` in the JSON resumes).
    #[arg(long, default_value_t = 5_000)]
    hang_ms: u64,
    /// Where findings are written.
    #[arg(long, default_value = "fuzz-findings")]
    out: PathBuf,
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("fog-fuzz: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn run(args: &Args) -> anyhow::Result<bool> {
    let opts = Options { cases: args.cases, slow: Duration::from_millis(args.slow_ms), ..Options::default() };
    if let Some(at) = &args.replay {
        let (seed, case) = at.split_once(':').context("--replay wants SEED:CASE")?;
        let seed: u64 = seed.parse().context("--replay: SEED is not a number")?;
        let case: u64 = case.parse().context("--replay: CASE is not a number")?;
        if case > opts.cases {
            bail!("--replay: case {case} is past the run's {} cases", opts.cases);
        }
        let report = run_seed(seed, &opts, Some(case));
        match report.finding {
            Some(f) => println!("replayed: {} at case {}\n  {}", f.sig, f.case, f.detail),
            None => println!("replayed seed {seed} to case {case}: nothing found"),
        }
        return Ok(true);
    }
    let started = Instant::now();
    let deadline = started + Duration::from_secs(args.seconds);
    let mut campaign = Campaign::default();
    let mut seed = args.seed;
    let hang = Duration::from_millis(args.hang_ms);
    let mut hung = false;
    while !hung && Instant::now() < deadline && args.executions.is_none_or(|n| campaign.executions < n) {
        let (report, stuck) = run_seed_watched(seed, &opts, hang);
        hung = stuck;
        if let Some(f) = campaign.add(report, started.elapsed(), seed).cloned() {
            let f = &f;
            let path = write_finding(&args.out, f)?;
            if !args.json {
                println!(
                    "NEW {} after {} executions ({:.1} s)\n  {}\n  input: {}\n  replay: fog-fuzz --replay {}:{}",
                    f.sig,
                    campaign.executions,
                    started.elapsed().as_secs_f64(),
                    f.detail,
                    path.display(),
                    f.seed,
                    f.case
                );
            }
        }
        seed += 1;
    }
    let secs = started.elapsed().as_secs_f64();
    let rate = campaign.executions as f64 / secs;
    if args.json {
        let findings: Vec<_> = campaign
            .findings
            .iter()
            .map(|(sig, (f, execs, at, runs))| {
                serde_json::json!({
                    "signature": sig, "detail": f.detail, "replay": format!("{}:{}", f.seed, f.case),
                    "first_after_executions": execs, "first_after_seconds": at.as_secs_f64(), "runs": runs,
                })
            })
            .collect();
        let summary = serde_json::json!({
            "executions": campaign.executions, "reached_a_node": campaign.reached, "runs": campaign.runs, "seconds": secs, "executions_per_second": rate,
            "slowest_input_us": campaign.slowest_us,
            "slowest_input": format!("{}:{}", campaign.slowest_at.0, campaign.slowest_at.1),
            "findings": findings,
            "stopped_by_hang": hung, "next_seed": seed,
        });
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        println!(
            "{} executions ({} decoded and reached a node) in {} runs, {secs:.1} s: {rate:.0} executions/s; slowest input {} µs (replay {}:{})",
            campaign.executions, campaign.reached, campaign.runs, campaign.slowest_us, campaign.slowest_at.0, campaign.slowest_at.1
        );
        println!("{} distinct failure signatures", campaign.findings.len());
        if hung {
            println!("stopped by a hang (its thread cannot be stopped); resume with --seed {seed}");
        }
        for (sig, (f, execs, at, runs)) in &campaign.findings {
            println!("  {sig}: {runs} runs; first after {execs} executions ({:.1} s), replay {}:{}", at.as_secs_f64(), f.seed, f.case);
        }
    }
    Ok(campaign.findings.is_empty())
}

/// Writes a finding's input to `<out>/<signature>.bin` (the signature made
/// a file name).
fn write_finding(out: &PathBuf, f: &Finding) -> anyhow::Result<PathBuf> {
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let name: String = f.sig.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' { c } else { '_' }).take(100).collect();
    let path = out.join(format!("{name}.bin"));
    std::fs::write(&path, &f.bytes).with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}
