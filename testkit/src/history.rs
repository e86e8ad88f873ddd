//! The checks run on histories after a run with faults (by `fog-verify`,
//! and by `fog-bench failover`): what the hosts say was generated and acked
//! against what the servers counted, the average streams the sensors
//! received against the server's published hash chain, and which node was
//! active in which epoch.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;
use serde_json::Value;

/// `(sensor_id, incarnation)`.
pub type SensorKey = (u64, u64);

/// What one sensor incarnation reported at the end of the run.
#[derive(Debug, Clone, Default)]
pub struct HostSide {
    pub generated: u64,
    pub acked: u64,
    pub sum_kmh: u64,
    /// The last average the sensor applied, and its chain value there.
    pub last_average_seq: Option<u64>,
    pub digest: u64,
    pub averages_missed: u64,
    pub averages_superseded: u64,
}

/// What the server left active at the end reports.
#[derive(Debug, Clone, Default)]
pub struct ServerSide {
    /// Per-sensor `(count, sum_kmh)`.
    pub counts: BTreeMap<SensorKey, (u64, u64)>,
    /// seq -> chain value, for the position before the retained averages
    /// and each retained one.
    pub chain: BTreeMap<u64, u64>,
}

/// One observation of a server's state during the run.
#[derive(Debug, Clone)]
pub struct Observation {
    pub at_s: f64,
    pub node: &'static str,
    pub state: String,
    pub epoch: Option<u64>,
}

#[derive(Debug, Default, Serialize)]
pub struct Verdict {
    /// Readings a host saw acked that the servers do not count.
    pub lost: u64,
    /// Readings counted more often than they were generated.
    pub duplicated: u64,
    /// Sensors whose counted sum of speeds differs from what they generated.
    pub sum_mismatches: u64,
    /// Readings still unacked when the hosts stopped.
    pub unacked: u64,
    /// Sensors told they missed averages (fell behind retention).
    pub averages_missed: u64,
    /// Averages sensors applied from a branch abandoned after a split and
    /// replaced with the surviving stream's (expected after splits in which
    /// a host was served by both sides; not a violation).
    pub averages_superseded: u64,
    /// Sensors whose last average is not the server's at that seq (another
    /// chain value, or a seq the server never published).
    pub sensors_off_the_server_stream: u64,
    /// Sensors that applied no average at all.
    pub sensors_without_averages: u64,
    /// Sensors whose last average is older than the server retains, so it
    /// cannot be compared.
    pub sensors_behind_retention: u64,
    /// Epochs in which two different nodes were seen active.
    pub epochs_with_two_actives: Vec<u64>,
    /// Incarnations the servers counted that no final host summary has
    /// (sensors of a host killed without a state dir): not checkable.
    pub unchecked_incarnations: u64,
    pub sensors_checked: u64,
    pub readings_checked: u64,
    pub notes: Vec<String>,
    pub violations: Vec<String>,
}

impl Verdict {
    pub fn ok(&self) -> bool {
        self.violations.is_empty()
    }
}

/// Counts and the average chain from a server's status JSON.
pub fn server_side(status: &Value) -> ServerSide {
    let chain = status["average_chain"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|c| Some((c["seq"].as_u64()?, c["chain"].as_u64()?)))
        .collect();
    ServerSide { counts: crate::server_counts(status), chain }
}

/// Host per-sensor figures from a host summary JSON.
pub fn host_side(summary: &Value) -> BTreeMap<SensorKey, HostSide> {
    let mut out = BTreeMap::new();
    for s in summary["per_sensor"].as_array().into_iter().flatten() {
        let key = (s["sensor_id"].as_u64().unwrap_or(0), s["incarnation"].as_u64().unwrap_or(0));
        out.insert(
            key,
            HostSide {
                generated: s["generated"].as_u64().unwrap_or(0),
                acked: s["acked"].as_u64().unwrap_or(0),
                sum_kmh: s["sum_kmh"].as_u64().unwrap_or(0),
                last_average_seq: s["last_average_seq"].as_u64(),
                digest: s["averages_digest"].as_str().and_then(|d| u64::from_str_radix(d, 16).ok()).unwrap_or(0),
                averages_missed: s["averages_missed"].as_u64().unwrap_or(0),
                averages_superseded: s["averages_superseded"].as_u64().unwrap_or(0),
            },
        );
    }
    out
}

/// Checks every history; `hosts` holds one summary map per host.
pub fn check(
    hosts: &[BTreeMap<SensorKey, HostSide>],
    server: &ServerSide,
    observations: &[Observation],
) -> Verdict {
    let mut v = Verdict::default();
    let mut seen = BTreeSet::new();
    let base = server.chain.keys().next().copied();
    let newest = server.chain.keys().next_back().copied();
    for host in hosts {
        for (key, s) in host {
            seen.insert(*key);
            v.sensors_checked += 1;
            v.readings_checked += s.generated;
            v.unacked += s.generated.saturating_sub(s.acked);
            v.averages_missed += s.averages_missed;
            v.averages_superseded += s.averages_superseded;
            match (s.last_average_seq, server.chain.is_empty()) {
                (_, true) => {}
                (None, false) => v.sensors_without_averages += 1,
                (Some(seq), false) => match server.chain.get(&seq) {
                    Some(&chain) if chain == s.digest => {}
                    Some(_) => v.sensors_off_the_server_stream += 1,
                    None if newest.is_some_and(|n| seq > n) => v.sensors_off_the_server_stream += 1,
                    None if base.is_some_and(|b| seq < b) => v.sensors_behind_retention += 1,
                    None => v.sensors_off_the_server_stream += 1,
                },
            }
            let (count, sum) = server.counts.get(key).copied().unwrap_or_default();
            if count < s.acked {
                v.lost += s.acked - count;
                if v.notes.len() < 10 {
                    v.notes.push(format!(
                        "sensor {} incarnation {:016x}: {} readings acked, {} counted",
                        key.0, key.1, s.acked, count
                    ));
                }
            }
            if count > s.generated {
                v.duplicated += count - s.generated;
            }
            if count == s.generated && sum != s.sum_kmh {
                v.sum_mismatches += 1;
            }
        }
    }
    v.unchecked_incarnations = server.counts.keys().filter(|k| !seen.contains(k)).count() as u64;
    if server.chain.is_empty() {
        v.notes.push("the server reports no average chain: the average streams were not checked".into());
    }
    if v.sensors_behind_retention > 0 {
        v.notes.push(format!(
            "{} sensors stopped at an average older than the server retains: their streams were not compared",
            v.sensors_behind_retention
        ));
    }
    if v.averages_superseded > 0 {
        v.notes.push(format!(
            "{} averages applied from a branch abandoned after a split were superseded, and those sensors \
             rejoined the surviving stream",
            v.averages_superseded
        ));
    }

    let mut actives: BTreeMap<u64, BTreeMap<&str, f64>> = BTreeMap::new();
    let mut epochs_known = false;
    for o in observations.iter().filter(|o| o.state == "active") {
        if let Some(epoch) = o.epoch {
            epochs_known = true;
            actives.entry(epoch).or_default().entry(o.node).or_insert(o.at_s);
        }
    }
    for (epoch, nodes) in actives.iter().filter(|(_, nodes)| nodes.len() > 1) {
        v.epochs_with_two_actives.push(*epoch);
        let seen: Vec<String> = nodes.iter().map(|(n, t)| format!("{n} at {t:.1}s")).collect();
        v.notes.push(format!("epoch {epoch}: active nodes {}", seen.join(", ")));
    }
    if !epochs_known {
        v.notes.push("servers report no epoch: the one-active-per-epoch check was skipped".into());
    }

    if v.lost > 0 {
        v.violations.push(format!("{} acked readings are not counted by the servers", v.lost));
    }
    if v.duplicated > 0 {
        v.violations.push(format!("{} readings were counted more than once", v.duplicated));
    }
    if v.sum_mismatches > 0 {
        v.violations.push(format!("{} sensors have a counted speed sum unlike what they generated", v.sum_mismatches));
    }
    if v.unacked > 0 {
        v.violations.push(format!("{} readings were never acked", v.unacked));
    }
    if v.averages_missed > 0 {
        v.violations.push(format!("sensors were told they missed {} averages", v.averages_missed));
    }
    if v.sensors_off_the_server_stream > 0 {
        v.violations.push(format!(
            "{} sensors ended on an average stream other than the server's (their last average is not the \
             server's at that seq)",
            v.sensors_off_the_server_stream
        ));
    }
    if v.sensors_without_averages > 0 {
        v.violations.push(format!("{} sensors applied no average at all", v.sensors_without_averages));
    }
    for e in &v.epochs_with_two_actives {
        v.violations.push(format!("two nodes were active in epoch {e}"));
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(entries: &[(SensorKey, u64, u64, u64, u64, u64)]) -> BTreeMap<SensorKey, HostSide> {
        entries
            .iter()
            .map(|&(k, generated, acked, sum_kmh, seq, digest)| {
                let last_average_seq = Some(seq);
                (k, HostSide { generated, acked, sum_kmh, last_average_seq, digest, ..HostSide::default() })
            })
            .collect()
    }

    fn server(counts: &[(SensorKey, (u64, u64))]) -> ServerSide {
        ServerSide { counts: counts.iter().copied().collect(), chain: BTreeMap::from([(10, 0xa), (11, 0xb), (12, 0xc)]) }
    }

    #[test]
    fn a_clean_history_passes() {
        let h = host(&[((1, 7), 10, 10, 900, 12, 0xc), ((2, 8), 5, 5, 500, 11, 0xb)]);
        let s = server(&[((1, 7), (10, 900)), ((2, 8), (5, 500))]);
        let obs = [
            Observation { at_s: 0.0, node: "primary", state: "active".into(), epoch: Some(1) },
            Observation { at_s: 1.0, node: "backup", state: "active".into(), epoch: Some(2) },
        ];
        let v = check(&[h], &s, &obs);
        assert!(v.ok(), "{:?}", v.violations);
        assert_eq!(v.readings_checked, 15);
    }

    #[test]
    fn finds_lost_duplicated_and_diverging() {
        let h = host(&[((1, 7), 10, 10, 900, 12, 0xc), ((2, 8), 5, 5, 500, 11, 0xf), ((4, 1), 0, 0, 0, 13, 0xd)]);
        let s = server(&[((1, 7), (8, 700)), ((2, 8), (6, 600)), ((3, 9), (1, 1))]);
        let obs = [
            Observation { at_s: 0.0, node: "primary", state: "active".into(), epoch: Some(3) },
            Observation { at_s: 1.0, node: "backup", state: "active".into(), epoch: Some(3) },
        ];
        let v = check(&[h], &s, &obs);
        assert_eq!(v.lost, 2);
        assert_eq!(v.duplicated, 1);
        assert_eq!(v.sensors_off_the_server_stream, 2, "another chain value at 11, and a seq past the server's newest");
        assert_eq!(v.epochs_with_two_actives, vec![3]);
        assert_eq!(v.unchecked_incarnations, 1);
        assert!(!v.ok());
    }

    #[test]
    fn old_positions_are_noted_and_sensors_without_averages_flagged() {
        let mut h = host(&[((1, 7), 1, 1, 90, 3, 0x3)]);
        h.insert((2, 8), HostSide { generated: 1, acked: 1, sum_kmh: 90, ..HostSide::default() });
        let s = server(&[((1, 7), (1, 90)), ((2, 8), (1, 90))]);
        let v = check(&[h], &s, &[]);
        assert_eq!(v.sensors_behind_retention, 1);
        assert_eq!(v.sensors_without_averages, 1);
        assert_eq!(v.violations.len(), 1, "{:?}", v.violations);
    }
}
