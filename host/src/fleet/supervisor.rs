//! The supervisor: what happens to a sensor whose call failed. It is
//! stopped and reported once; after a backoff that doubles with each failure
//! in a row it is restarted from its last good state (its last snapshot and
//! the readings that left the host after it), so its sequence continues
//! after every reading that left and its unacked readings are resent. A sensor that keeps
//! failing is quarantined, and a quiet minute forgives past failures.
//! Failures met during a pass on worker threads come here once the pass is
//! over.

use std::time::{Duration, Instant};

use crate::sensor::{SensorCalls, SensorRuntime};

use super::pool::Failure;
use fog_protocol::AverageCursor;

use super::{Fleet, Life, sensor_config};

/// A sensor that has run this long since its last restart has its failure
/// count forgiven: an occasional fault does not add up to a quarantine.
const QUIET_PERIOD: Duration = Duration::from_secs(60);
const MAX_BACKOFF: Duration = Duration::from_secs(60);

impl<R: SensorRuntime> Fleet<R> {
    /// Restarts the failed sensors whose backoff has passed (once a hot swap
    /// under way is over: on the component it leaves running).
    pub fn restart_due(&mut self, now: Instant) {
        if self.swapping() || self.next_restart.is_none_or(|at| now < at) {
            return;
        }
        self.now = now;
        for i in 0..self.sensors.len() {
            if matches!(self.sensors[i].life, Life::Restarting { at } if at <= now) {
                self.restart(i, now);
            }
        }
        // A restart that failed was scheduled again; the others wait on.
        self.next_restart = self
            .sensors
            .iter()
            .filter_map(|s| match s.life {
                Life::Restarting { at } => Some(at),
                _ => None,
            })
            .min();
    }

    /// Notes that a sensor is to restart at `at`.
    pub(super) fn restart_at(&mut self, at: Instant) {
        self.next_restart = Some(self.next_restart.map_or(at, |t| t.min(at)));
    }

    fn restart(&mut self, i: usize, now: Instant) {
        let slot = &self.sensors[i];
        let config = sensor_config(&self.config, slot.id, slot.segment);
        let mut instance = match self.engine.instantiate(&self.component, config, self.config.seed) {
            Ok(instance) => instance,
            Err(e) => {
                // The pool or the kernel said no: not the sensor's fault, but
                // retried with the same backoff.
                let reason = self.engine.describe_instantiate_failure(&e, self.config.count);
                return self.fail_with(i, "instantiate", reason);
            }
        };
        match super::persist::restore(&mut instance, &slot.saved) {
            Ok(Ok(())) => {}
            Ok(Err(reason)) => return self.fail_with(i, "restore", format!("refused its last good state: {reason}")),
            Err(e) => return self.fail(i, "restore", &e),
        }
        let incarnation = match instance.init() {
            Ok(incarnation) => incarnation,
            Err(e) => return self.fail(i, "init", &e),
        };
        let status = match instance.status() {
            Ok(status) => status,
            Err(e) => return self.fail(i, "status", &e),
        };
        let slot = &mut self.sensors[i];
        tracing::info!(
            sensor_id = slot.id,
            "sensor restarted from its last good state ({} readings generated, {} unacked to resend)",
            status.generated,
            status.buffered
        );
        slot.incarnation = incarnation;
        slot.cursor = status.last_average.map(AverageCursor::from);
        slot.status = Some(status);
        slot.life = Life::Running(Box::new(instance));
        slot.last_ack = None;
        slot.running_since = now;
        self.restarts += 1;
    }

    /// Sensors quarantined after failing too often.
    pub fn quarantined(&self) -> u64 {
        self.sensors.iter().filter(|s| matches!(s.life, Life::Quarantined)).count() as u64
    }

    /// Sensors waiting for a restart.
    pub fn restarting(&self) -> u64 {
        self.sensors.iter().filter(|s| matches!(s.life, Life::Restarting { .. })).count() as u64
    }

    pub(super) fn handle_failures(&mut self, failures: Vec<Failure>) {
        for f in failures {
            self.fail(f.slot, f.call, &f.error);
        }
    }

    pub(super) fn fail(&mut self, i: usize, call: &str, e: &wasmtime::Error) {
        let reason = self.engine.describe_failure(e);
        self.fail_with(i, call, reason);
    }

    /// Stops sensor `i`, reports it once, and schedules its restart or
    /// quarantines it.
    fn fail_with(&mut self, i: usize, call: &str, reason: String) {
        let now = self.now;
        let (backoff, max_restarts) = (self.config.restart_backoff, self.config.max_restarts);
        let slot = &mut self.sensors[i];
        if matches!(slot.life, Life::Running(_)) && now.duration_since(slot.running_since) >= QUIET_PERIOD {
            slot.failures = 0;
        }
        slot.failures += 1;
        // Readings not yet put into a batch never left: the restart resumes
        // after the last that did (those before the snapshot are in its
        // resend buffer and go out when due).
        slot.pending.clear();
        self.failures += 1;
        if slot.failures > max_restarts {
            slot.life = Life::Quarantined;
            tracing::error!(
                sensor_id = slot.id,
                "sensor quarantined: `{call}` {reason}; failed {} times in a row, not restarted",
                slot.failures
            );
        } else {
            let wait = backoff.saturating_mul(1 << (slot.failures - 1).min(16)).min(MAX_BACKOFF);
            slot.life = Life::Restarting { at: now + wait };
            tracing::warn!(
                sensor_id = slot.id,
                "sensor stopped: `{call}` {reason}; restarting from its last good state in {wait:?} (failure {} of {})",
                slot.failures,
                max_restarts + 1
            );
            self.restart_at(now + wait);
        }
    }
}
