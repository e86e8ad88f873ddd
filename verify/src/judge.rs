//! The verdict once everything is healed and the hosts have drained: what
//! every host says it generated and saw acked, checked against the final
//! counts of the servers and the states seen during the run (see
//! [`check`]), and what the rogue fault shows.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::bail;
use fog_testkit::history::{self as check, Observation};
use serde_json::Value;

use crate::cluster::Cluster;
use crate::rogue;

/// Checks the hosts' `summaries` against the servers' final counts and
/// the `observations`, and the rogue's `tally` against what the servers
/// `counted` against hostile clients.
pub fn verdict(
    cluster: &Cluster,
    summaries: &[Value],
    observations: &[Observation],
    tally: &rogue::Tally,
    counted: &BTreeMap<&'static str, u64>,
) -> anyhow::Result<check::Verdict> {
    let hosts: Vec<_> = summaries.iter().map(check::host_side).collect();
    let final_status = final_counts(cluster)?;
    let mut verdict = check::check(&hosts, &check::server_side(&final_status), observations);
    judge_rogue(tally, counted, &mut verdict);
    Ok(verdict)
}

/// The counts to check: the active server's, once both servers agree (with
/// replication they converge); the larger one if they never do.
fn final_counts(cluster: &Cluster) -> anyhow::Result<Value> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let p = cluster.status(true).ok();
        let b = cluster.status(false).ok();
        let counted = |s: &Option<Value>| s.as_ref().and_then(|s| s["counted"].as_u64());
        let active = [&p, &b].into_iter().flatten().find(|s| s["state"] == "active").cloned();
        if counted(&p).is_some() && counted(&p) == counted(&b) {
            if let Some(a) = active {
                return Ok(a);
            }
        }
        if Instant::now() > deadline {
            eprintln!("note: the servers did not converge on one count within 15 s; checking the larger");
            let best = [p, b].into_iter().flatten().max_by_key(|s| s["counted"].as_u64().unwrap_or(0));
            match best {
                Some(s) => return Ok(s),
                None => bail!("no server answers status after healing"),
            }
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// Adds to `verdict` what the rogue fault shows: a rogue that sent batches
/// the servers counted no refusal for did nothing the run can vouch for;
/// a poisoned sensor whose watermark jumped took a poison seq.
fn judge_rogue(tally: &rogue::Tally, counted: &BTreeMap<&'static str, u64>, verdict: &mut check::Verdict) {
    if tally.activations == 0 {
        return;
    }
    let refusals: u64 = rogue::REFUSALS.iter().map(|c| counted.get(c).copied().unwrap_or(0)).sum();
    if tally.batches_sent > 0 && refusals == 0 {
        verdict.violations.push(format!(
            "the rogue sent {} batches but the servers counted no refusal and no forged epoch: the fault did nothing checkable",
            tally.batches_sent
        ));
    }
    if tally.watermark_jumps > 0 {
        verdict.violations.push(format!(
            "{} acks of poisoned sensors carried a watermark at or above 2^52: a poison seq was taken",
            tally.watermark_jumps
        ));
    }
    for (sent, counter, what) in [
        (tally.forged_epoch_batches, "forged_epochs", "forged epochs"),
        (tally.foreign_readings, "refused.foreign_sensor", "readings for foreign sensors"),
        (tally.poison_readings, "refused.seq_out_of_range", "poison readings"),
        (tally.poison_readings, "refused.from_the_future", "poison readings"),
        (tally.over_limit_batches, "refused.too_large", "batches past the reading limit"),
    ] {
        if sent > 0 && counted.get(counter).copied().unwrap_or(0) == 0 {
            verdict.notes.push(format!("the rogue sent {sent} {what}, but no status read showed {counter} above 0"));
        }
    }
}

/// Adds one site's `verdict` to the run's `into`: counts summed, notes and
/// violations named by the site's `label` (`site2: `).
pub fn merge(into: &mut check::Verdict, verdict: &check::Verdict, label: &str) {
    into.lost += verdict.lost;
    into.duplicated += verdict.duplicated;
    into.sum_mismatches += verdict.sum_mismatches;
    into.unacked += verdict.unacked;
    into.averages_missed += verdict.averages_missed;
    into.averages_superseded += verdict.averages_superseded;
    into.sensors_off_the_server_stream += verdict.sensors_off_the_server_stream;
    into.sensors_without_averages += verdict.sensors_without_averages;
    into.sensors_behind_retention += verdict.sensors_behind_retention;
    into.epochs_with_two_actives.extend(&verdict.epochs_with_two_actives);
    into.unchecked_incarnations += verdict.unchecked_incarnations;
    into.sensors_checked += verdict.sensors_checked;
    into.readings_checked += verdict.readings_checked;
    into.notes.extend(verdict.notes.iter().map(|n| format!("{label}{n}")));
    into.violations.extend(verdict.violations.iter().map(|v| format!("{label}{v}")));
}

/// Adds one site's counters against hostile clients to the run's: summed,
/// `expired` the largest (as [`rogue::ServerCounters::totals`] does).
pub fn merge_counted(into: &mut BTreeMap<&'static str, u64>, counted: &BTreeMap<&'static str, u64>) {
    for (&name, &value) in counted {
        let total = into.entry(name).or_default();
        *total = if name == "expired" { (*total).max(value) } else { *total + value };
    }
}
