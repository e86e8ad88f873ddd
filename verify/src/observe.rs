//! What the verifier watches while the faults go on: every status it reads
//! from a server that is up (its state and epoch for the one-active check,
//! what it counted against the rogue, the rogue's poison targets), and the
//! resident memory of every process, to show it stays flat.

use std::collections::BTreeMap;
use std::time::Instant;

use fog_testkit::history::Observation;
use fog_testkit::{Proc, rss_mib};
use serde::Serialize;

use crate::cluster::Cluster;
use crate::rogue;

/// What the verifier takes from every status it reads during the run.
pub struct Watch {
    started: Instant,
    plan: rogue::Plan,
    /// The rogue's poison targets, from the active's sensors.
    pub targets: rogue::Targets,
    pub counters: rogue::ServerCounters,
    /// Which node was in which state and epoch, for the one-active check.
    pub observations: Vec<Observation>,
}

impl Watch {
    pub fn new(started: Instant, plan: rogue::Plan) -> Watch {
        Watch {
            started,
            plan,
            targets: rogue::Targets::default(),
            counters: rogue::ServerCounters::default(),
            observations: Vec::new(),
        }
    }

    /// Reads the status of every server that is up.
    pub fn observe(&mut self, cluster: &Cluster) {
        for s in cluster.servers.iter().filter(|s| s.up()) {
            if let Ok(status) = cluster.status(s.primary) {
                self.observations.push(Observation {
                    at_s: self.started.elapsed().as_secs_f64(),
                    node: s.name,
                    state: status["state"].as_str().unwrap_or("").to_string(),
                    epoch: status["epoch"].as_u64(),
                });
                self.counters.record(&format!("{}-{}", s.name, s.starts), &status);
                self.targets.update(&self.plan, &status);
            }
        }
    }
}

#[derive(Serialize)]
pub struct MemoryTrace {
    pub process: String,
    pub samples: usize,
    pub first_mib: f64,
    /// Over the second half of the process's samples, so start-up does not
    /// count as growth.
    pub mid_mib: f64,
    pub peak_mib: f64,
    pub last_mib: f64,
}

/// Resident memory samples of every process incarnation, by name.
#[derive(Default)]
pub struct Memory {
    samples: BTreeMap<String, Vec<f64>>,
}

impl Memory {
    /// Samples every process of `procs`, named `prefix` and its name.
    pub fn sample<'a>(&mut self, prefix: &str, procs: impl Iterator<Item = &'a Proc>) {
        for p in procs {
            if let Some(rss) = rss_mib(p.child.id()) {
                self.samples.entry(format!("{prefix}{}", p.name)).or_default().push(rss);
            }
        }
    }

    pub fn traces(&self) -> Vec<MemoryTrace> {
        self.samples
            .iter()
            .filter(|(_, v)| !v.is_empty())
            .map(|(name, v)| MemoryTrace {
                process: name.clone(),
                samples: v.len(),
                first_mib: v[0],
                mid_mib: v[v.len() / 2],
                peak_mib: v.iter().copied().fold(0.0, f64::max),
                last_mib: v[v.len() - 1],
            })
            .collect()
    }
}
