//! The checks run on histories after a run with faults (by `fog-verify`,
//! and by `fog-bench failover`): what the hosts say was generated and acked
//! against what the servers counted, the average streams the sensors
//! received, and which node was active in which epoch.

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
    pub digest: String,
    pub averages_missed: u64,
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
    /// Hosts whose sensors did not all receive the same average stream.
    pub diverging_average_streams: u64,
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

/// Server per-sensor counts from a status JSON.
pub fn server_side(status: &Value) -> BTreeMap<SensorKey, (u64, u64)> {
    crate::server_counts(status)
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
                digest: s["averages_digest"].as_str().unwrap_or("").to_string(),
                averages_missed: s["averages_missed"].as_u64().unwrap_or(0),
            },
        );
    }
    out
}

/// Checks every history; `hosts` holds one summary map per host.
pub fn check(
    hosts: &[BTreeMap<SensorKey, HostSide>],
    server: &BTreeMap<SensorKey, (u64, u64)>,
    observations: &[Observation],
) -> Verdict {
    let mut v = Verdict::default();
    let mut seen = BTreeSet::new();
    for (h, host) in hosts.iter().enumerate() {
        let digests: BTreeSet<&str> = host.values().map(|s| s.digest.as_str()).collect();
        if digests.len() > 1 {
            v.diverging_average_streams += 1;
            v.violations.push(format!("host {h}: its sensors received {} different average streams", digests.len()));
        }
        for (key, s) in host {
            seen.insert(*key);
            v.sensors_checked += 1;
            v.readings_checked += s.generated;
            v.unacked += s.generated.saturating_sub(s.acked);
            v.averages_missed += s.averages_missed;
            let (count, sum) = server.get(key).copied().unwrap_or_default();
            if count < s.acked {
                v.lost += s.acked - count;
            }
            if count > s.generated {
                v.duplicated += count - s.generated;
            }
            if count == s.generated && sum != s.sum_kmh {
                v.sum_mismatches += 1;
            }
        }
    }
    v.unchecked_incarnations = server.keys().filter(|k| !seen.contains(k)).count() as u64;

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
    for e in &v.epochs_with_two_actives {
        v.violations.push(format!("two nodes were active in epoch {e}"));
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(entries: &[(SensorKey, u64, u64, u64, &str)]) -> BTreeMap<SensorKey, HostSide> {
        entries
            .iter()
            .map(|&(k, generated, acked, sum_kmh, digest)| {
                (k, HostSide { generated, acked, sum_kmh, digest: digest.into(), averages_missed: 0 })
            })
            .collect()
    }

    #[test]
    fn a_clean_history_passes() {
        let h = host(&[((1, 7), 10, 10, 900, "a"), ((2, 8), 5, 5, 500, "a")]);
        let s = BTreeMap::from([((1, 7), (10, 900)), ((2, 8), (5, 500))]);
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
        let h = host(&[((1, 7), 10, 10, 900, "a"), ((2, 8), 5, 5, 500, "b")]);
        let s = BTreeMap::from([((1, 7), (8, 700)), ((2, 8), (6, 600)), ((3, 9), (1, 1))]);
        let obs = [
            Observation { at_s: 0.0, node: "primary", state: "active".into(), epoch: Some(3) },
            Observation { at_s: 1.0, node: "backup", state: "active".into(), epoch: Some(3) },
        ];
        let v = check(&[h], &s, &obs);
        assert_eq!(v.lost, 2);
        assert_eq!(v.duplicated, 1);
        assert_eq!(v.diverging_average_streams, 1);
        assert_eq!(v.epochs_with_two_actives, vec![3]);
        assert_eq!(v.unchecked_incarnations, 1);
        assert!(!v.ok());
    }
}
