//! The sensors of one host: instantiates them, ticks them, gathers their
//! readings into one batch for the server, and routes the server's acks,
//! averages and missed-range notices back to the right instance.
//!
//! A sensor whose guest call fails (a trap) is stopped and reported once;
//! the others carry on.

use std::collections::HashMap;

use fog_protocol::{Average, BatchReply, Reading, Request, SensorBatch};
use serde::Serialize;

use crate::runtime::{one_line, SensorConfig, SensorInstance, SensorRuntime, SensorStatus, WitAverage};

/// How every sensor of the fleet is configured.
#[derive(Debug, Clone)]
pub struct FleetConfig {
    pub first_id: u32,
    pub count: u32,
    pub segments: u32,
    pub resend_after_ms: u64,
    pub max_buffered: u32,
    pub settings: Vec<(String, String)>,
    /// Fresh for every start of the host; sensors derive their incarnation
    /// from it, so a restarted sensor never reuses a reading id.
    pub seed: u64,
}

struct SensorSlot {
    id: u32,
    segment: u32,
    incarnation: u64,
    instance: Option<SensorInstance>,
    /// Readings returned by `tick` and not yet put into a batch.
    pending: Vec<Reading>,
    /// Highest average applied (the sensor's average ack).
    cursor: Option<u64>,
    /// Last status read from the sensor.
    status: Option<SensorStatus>,
}

/// Why the fleet could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot instantiate sensor {id}: {reason}{hint}")]
    Instantiate { id: u32, reason: String, hint: &'static str },
    #[error("sensor {id} failed in init: {reason}")]
    Init { id: u32, reason: String },
}

/// Per-sensor figures of the host's summary.
#[derive(Debug, Clone, Serialize)]
pub struct SensorSummary {
    pub sensor_id: u32,
    pub segment: u32,
    pub incarnation: u64,
    pub generated: u64,
    pub acked: u64,
    pub unacked: u64,
    pub resent: u64,
    pub overflowed: u64,
    pub sum_kmh: u64,
    pub averages_applied: u64,
    pub averages_missed: u64,
    pub averages_digest: String,
    pub last_average_seq: Option<u64>,
    pub limit_kmh: u32,
    pub failed: bool,
}

pub struct Fleet {
    sensors: Vec<SensorSlot>,
    by_id: HashMap<u32, usize>,
    /// Sensors stopped after a failed guest call.
    pub failed: u64,
}

impl Fleet {
    pub fn start(runtime: &SensorRuntime, config: &FleetConfig) -> Result<Self, StartError> {
        let mut sensors = Vec::with_capacity(config.count as usize);
        let mut by_id = HashMap::with_capacity(config.count as usize);
        for i in 0..config.count {
            let id = config.first_id.wrapping_add(i);
            let segment = if config.segments == 0 { 0 } else { i % config.segments };
            let sensor_config = SensorConfig {
                sensor_id: id,
                segment,
                resend_after_ms: config.resend_after_ms,
                max_buffered: config.max_buffered,
                settings: config.settings.clone(),
            };
            // One seed for the whole fleet: sensors mix in their id for the
            // incarnation, and share traffic events (jams) per segment.
            let mut instance = runtime.instantiate(sensor_config, config.seed).map_err(|e| {
                let reason = one_line(&e);
                let hint = if reason.contains("Cannot allocate memory") || reason.contains("ENOMEM") {
                    " (the kernel's vm.max_map_count may be too low for this many sensors: raise it with `sysctl -w vm.max_map_count=1048576`)"
                } else {
                    ""
                };
                StartError::Instantiate { id, reason, hint }
            })?;
            let incarnation = instance
                .bindings
                .call_init(&mut instance.store)
                .map_err(|e| StartError::Init { id, reason: one_line(&e) })?;
            by_id.insert(id, sensors.len());
            sensors.push(SensorSlot {
                id,
                segment,
                incarnation,
                instance: Some(instance),
                pending: Vec::new(),
                cursor: None,
                status: None,
            });
        }
        Ok(Self { sensors, by_id, failed: 0 })
    }

    pub fn len(&self) -> usize {
        self.sensors.len()
    }

    pub fn is_empty(&self) -> bool {
        self.sensors.is_empty()
    }

    /// Ticks every sensor once; returns how many readings they handed over.
    pub fn tick(&mut self, produce: bool) -> usize {
        let mut handed = 0;
        for i in 0..self.sensors.len() {
            let slot = &mut self.sensors[i];
            let Some(inst) = slot.instance.as_mut() else { continue };
            match inst.bindings.call_tick(&mut inst.store, produce) {
                Ok(readings) => {
                    handed += readings.len();
                    slot.pending.extend(readings.into_iter().map(|r| Reading {
                        seq: r.seq,
                        speed_kmh: r.speed_kmh,
                        timestamp_ms: r.timestamp_ms,
                    }));
                }
                Err(e) => self.stop(i, "tick", &e),
            }
        }
        handed
    }

    /// Readings waiting to be put into a batch.
    pub fn pending(&self) -> usize {
        self.sensors.iter().map(|s| s.pending.len()).sum()
    }

    /// One request carrying every sensor's pending readings and average
    /// cursor (so every sensor keeps receiving averages).
    pub fn take_batch(&mut self, batch_id: u64) -> (Request, usize) {
        let mut readings = 0;
        let sensors = self
            .sensors
            .iter_mut()
            .filter(|s| s.instance.is_some())
            .map(|s| {
                readings += s.pending.len();
                SensorBatch {
                    sensor_id: s.id,
                    incarnation: s.incarnation,
                    segment: s.segment,
                    readings: std::mem::take(&mut s.pending),
                    average_cursor: s.cursor,
                }
            })
            .collect();
        (Request::Batch { batch_id, sensors }, readings)
    }

    /// Delivers a server's reply to the sensors it concerns.
    pub fn apply(&mut self, reply: &BatchReply) {
        for ack in &reply.acks {
            let Some(&i) = self.by_id.get(&ack.sensor_id) else { continue };
            let Some(inst) = self.sensors[i].instance.as_mut() else { continue };
            if let Err(e) = inst.bindings.call_on_ack(&mut inst.store, ack.incarnation, ack.next_seq, &ack.also) {
                self.stop(i, "on-ack", &e);
            }
        }
        for missed in &reply.missed {
            let Some(&i) = self.by_id.get(&missed.sensor_id) else { continue };
            let Some(inst) = self.sensors[i].instance.as_mut() else { continue };
            match inst.bindings.call_on_missed(&mut inst.store, missed.from, missed.to) {
                Ok(cursor) => self.sensors[i].cursor = cursor,
                Err(e) => self.stop(i, "on-missed", &e),
            }
        }
        if reply.averages.is_empty() {
            return;
        }
        let averages: Vec<WitAverage> = reply.averages.iter().map(to_wit).collect();
        for i in 0..self.sensors.len() {
            let Some(inst) = self.sensors[i].instance.as_mut() else { continue };
            match inst.bindings.call_on_averages(&mut inst.store, &averages) {
                Ok(cursor) => self.sensors[i].cursor = cursor,
                Err(e) => self.stop(i, "on-averages", &e),
            }
        }
    }

    /// Reads every sensor's status; returns whether all readings are acked.
    pub fn refresh_status(&mut self) -> bool {
        let mut all_acked = true;
        for i in 0..self.sensors.len() {
            let Some(inst) = self.sensors[i].instance.as_mut() else { continue };
            match inst.bindings.call_status(&mut inst.store) {
                Ok(status) => {
                    all_acked &= status.buffered == 0 && self.sensors[i].pending.is_empty();
                    self.sensors[i].status = Some(status);
                }
                Err(e) => self.stop(i, "status", &e),
            }
        }
        all_acked
    }

    /// Per-sensor figures from the last status refresh.
    pub fn summaries(&self) -> Vec<SensorSummary> {
        self.sensors
            .iter()
            .map(|s| {
                let st = s.status.as_ref();
                SensorSummary {
                    sensor_id: s.id,
                    segment: s.segment,
                    incarnation: s.incarnation,
                    generated: st.map_or(0, |x| x.generated),
                    acked: st.map_or(0, |x| x.acked),
                    unacked: st.map_or(0, |x| x.generated.saturating_sub(x.acked)),
                    resent: st.map_or(0, |x| x.resent),
                    overflowed: st.map_or(0, |x| x.overflowed),
                    sum_kmh: st.map_or(0, |x| x.sum_kmh),
                    averages_applied: st.map_or(0, |x| x.averages_applied),
                    averages_missed: st.map_or(0, |x| x.averages_missed),
                    averages_digest: format!("{:016x}", st.map_or(0, |x| x.averages_digest)),
                    last_average_seq: st.and_then(|x| x.last_average_seq),
                    limit_kmh: st.map_or(0, |x| x.limit_kmh),
                    failed: s.instance.is_none(),
                }
            })
            .collect()
    }

    fn stop(&mut self, i: usize, call: &str, e: &wasmtime::Error) {
        let slot = &mut self.sensors[i];
        tracing::error!(sensor_id = slot.id, "sensor stopped: `{call}` failed: {}", one_line(e));
        slot.instance = None;
        slot.pending.clear();
        self.failed += 1;
    }
}

fn to_wit(a: &Average) -> WitAverage {
    WitAverage {
        seq: a.seq,
        segment: a.segment,
        window_end_ms: a.window_end_ms,
        count: a.count,
        mean_kmh: a.mean_kmh(),
        revision: a.revision,
    }
}
