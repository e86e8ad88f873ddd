//! The `rogue` fault: a compromised host key. While the fault is active a
//! thread of the verifier holds a key the servers list as a host's (rights
//! for a range of its own and for the first half of the first host's
//! sensors) and sends both servers what no host sends: epochs without a
//! valid seal, readings for sensors outside its rights, poison readings
//! for the first host's live sensors (seqs at or above 2^53, timestamps an
//! hour ahead or long expired), a batch of 65 536 such readings for one
//! sensor and one reading past that limit.
//!
//! None of it may change what the servers count: the run's checks (no
//! acked reading lost, none counted twice, every sum right, every sensor
//! on the server's stream) cover the poisoned sensors like every other.
//! What the rogue sent and what it was told is tallied here; what the
//! servers counted comes from their status ([`ServerCounters`]).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use fog_testkit::rogue::{
    Expect, MAX_READINGS_PER_BATCH, Reading, Reply, Request, SensorBatch, batch, forged_claims, named_epoch, now_ms, poison,
    poison_bulk, readings, sensor,
};
use fog_testkit::{Client, PairKeys};
use serde::Serialize;
use serde_json::Value;

/// The name of the rogue's key in the authorized-keys files.
pub const KEY_NAME: &str = "rogue";

/// Which sensor ids the rogue key may and may not send for.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The first host's ids the key also has rights for: its poison targets.
    pub overlap: (u32, u32),
    /// The key's own ids (no host sends for them).
    pub own: (u32, u32),
    /// Ids outside its rights: the rest of the first host's, other hosts',
    /// and ids nobody has.
    pub foreign: Vec<u32>,
}

impl Plan {
    /// The plan for `hosts` hosts of `sensors` sensors each, host `i`
    /// owning ids `1 + i * sensors ..= (i + 1) * sensors`.
    pub fn new(hosts: u32, sensors: u32) -> Plan {
        let overlap = (1, (sensors / 2).max(1));
        let own_first = hosts * sensors + 1;
        let own = (own_first, own_first + 99);
        let mut foreign: Vec<u32> = (overlap.1 + 1..=sensors).take(8).collect();
        if hosts > 1 {
            foreign.extend((sensors + 1..=2 * sensors).take(8));
        }
        foreign.extend([own.1 + 1, u32::MAX - 1]);
        Plan { overlap, own, foreign }
    }

    /// The key's line in the authorized-keys files.
    pub fn rights(&self) -> String {
        format!("sensors={}-{},{}-{}", self.own.0, self.own.1, self.overlap.0, self.overlap.1)
    }
}

/// A live sensor of the first host the rogue poisons, as the admin status
/// lists it.
#[derive(Debug, Clone, Copy)]
pub struct Target {
    pub sensor_id: u32,
    pub incarnation: u64,
    pub count: u64,
}

/// The poison targets, refreshed from every status the verifier reads.
#[derive(Clone, Default)]
pub struct Targets(Arc<Mutex<Vec<Target>>>);

impl Targets {
    /// Takes the counted incarnations of the overlap's sensors from an
    /// active server's status (the newest incarnation of each sensor).
    pub fn update(&self, plan: &Plan, status: &Value) {
        if status["state"] != "active" {
            return;
        }
        let mut newest: BTreeMap<u32, Target> = BTreeMap::new();
        for (&(id, incarnation), &(count, _)) in &fog_testkit::server_counts(status) {
            let Ok(sensor_id) = u32::try_from(id) else { continue };
            if !(plan.overlap.0..=plan.overlap.1).contains(&sensor_id) {
                continue;
            }
            let t = Target { sensor_id, incarnation, count };
            let e = newest.entry(sensor_id).or_insert(t);
            if count > e.count {
                *e = t;
            }
        }
        if let (false, Ok(mut v)) = (newest.is_empty(), self.0.lock()) {
            *v = newest.into_values().collect();
        }
    }

    fn get(&self) -> Vec<Target> {
        self.0.lock().map(|v| v.clone()).unwrap_or_default()
    }
}

/// What the rogue sent and what the servers told it, over every time the
/// fault was active.
#[derive(Debug, Default, Clone, Serialize)]
pub struct Tally {
    /// Times the fault was applied.
    pub activations: u64,
    /// Every batch sent, of every kind below.
    pub batches_sent: u64,
    /// Batches claiming an epoch without a valid seal.
    pub forged_epoch_batches: u64,
    /// Batches of readings for sensors outside the key's rights, and those readings.
    pub foreign_batches: u64,
    pub foreign_readings: u64,
    /// Batches of poison readings for live sensors, and those readings.
    pub poison_batches: u64,
    pub poison_readings: u64,
    /// Batches of exactly 65 536 poison readings for one sensor.
    pub limit_batches: u64,
    /// Batches one reading past that limit.
    pub over_limit_batches: u64,
    /// Replies received, and the refusals they named, per reason (readings
    /// for a batch's refused readings, one for a batch refused whole).
    pub replies: u64,
    pub told_refused: BTreeMap<String, u64>,
    /// Of the poison readings, those a server must ack as expired (it
    /// refuses the others); the passive answers `NotActive` to all.
    pub poison_expected_expired: u64,
    /// Acks for a poisoned sensor whose watermark jumped to a poison seq
    /// (at or above 2^52): a violation.
    pub watermark_jumps: u64,
    /// Connections that could not be opened.
    pub connect_errors: u64,
}

impl Tally {
    pub fn add(&mut self, o: &Tally) {
        self.activations += o.activations;
        self.batches_sent += o.batches_sent;
        self.forged_epoch_batches += o.forged_epoch_batches;
        self.foreign_batches += o.foreign_batches;
        self.foreign_readings += o.foreign_readings;
        self.poison_batches += o.poison_batches;
        self.poison_readings += o.poison_readings;
        self.limit_batches += o.limit_batches;
        self.over_limit_batches += o.over_limit_batches;
        self.replies += o.replies;
        for (k, v) in &o.told_refused {
            *self.told_refused.entry(k.clone()).or_default() += v;
        }
        self.poison_expected_expired += o.poison_expected_expired;
        self.watermark_jumps += o.watermark_jumps;
        self.connect_errors += o.connect_errors;
    }
}

/// A running rogue; [`RogueRun::stop`] ends it and returns its tally.
pub struct RogueRun {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<Tally>,
}

impl RogueRun {
    /// Starts the rogue against the two frontends (primary's first).
    pub fn start(keys: &PairKeys, frontends: [String; 2], plan: Plan, targets: Targets) -> RogueRun {
        let stop = Arc::new(AtomicBool::new(false));
        let keys = keys.clone();
        let flag = stop.clone();
        let thread = std::thread::spawn(move || attack(&keys, &frontends, &plan, &targets, &flag));
        RogueRun { stop, thread }
    }

    pub fn stop(self) -> Tally {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap_or_default()
    }
}

/// One server as the rogue sees it.
struct Victim {
    rogue: Client,
    /// The epoch and seal the server last named.
    epoch: Option<(u64, [u8; 16])>,
    limit_sent: bool,
}

fn attack(keys: &PairKeys, frontends: &[String; 2], plan: &Plan, targets: &Targets, stop: &AtomicBool) -> Tally {
    let mut tally = Tally { activations: 1, ..Tally::default() };
    let Ok(key) = keys.client(KEY_NAME) else {
        tally.connect_errors += 1;
        return tally;
    };
    let mut victims = Vec::new();
    for (primary, endpoint) in [true, false].into_iter().zip(frontends) {
        match Client::connect(endpoint, Some((&key.pair, &keys.server_public(primary)))) {
            Ok(rogue) => victims.push(Victim { rogue, epoch: None, limit_sent: false }),
            Err(_) => tally.connect_errors += 1,
        }
    }
    let mut batch_id = 1u64 << 40;
    let mut next_id = || {
        batch_id += 1;
        batch_id
    };
    while !stop.load(Ordering::Relaxed) {
        let round = Instant::now();
        let live = targets.get();
        for v in victims.iter_mut() {
            drain(v, &live, Duration::from_millis(50), &mut tally);
            let Some((epoch, seal)) = v.epoch else {
                // Learn the server's epoch first: the claims are forged
                // relative to it.
                send(v, &batch(next_id(), Vec::new()), &mut tally);
                continue;
            };
            for (claimed, forged_seal) in forged_claims(epoch, seal, 3) {
                let request = Request::Batch { batch_id: next_id(), epoch: claimed, seal: forged_seal, sensors: Vec::new() };
                if send(v, &request, &mut tally) {
                    tally.forged_epoch_batches += 1;
                }
            }
            let now = now_ms();
            let foreign: Vec<SensorBatch> =
                plan.foreign.iter().map(|&id| sensor(id, 1, 0, readings(1_000_000, 5, now))).collect();
            let n: u64 = foreign.iter().map(|s| s.readings.len() as u64).sum();
            if send(v, &batch(next_id(), foreign), &mut tally) {
                tally.foreign_batches += 1;
                tally.foreign_readings += n;
            }
            if live.is_empty() {
                continue;
            }
            let p = poison_sensors(live.iter().take(8), |t| poison(t.count, now));
            if send(v, &batch(next_id(), p.sensors), &mut tally) {
                tally.poison_batches += 1;
                tally.poison_readings += p.readings;
                tally.poison_expected_expired += p.expired;
            }
            if !v.limit_sent {
                v.limit_sent = true;
                let limit = MAX_READINGS_PER_BATCH as u64;
                let p = poison_sensors(live.iter().take(1), |t| poison_bulk(t.count, now, limit));
                if send(v, &batch(next_id(), p.sensors), &mut tally) {
                    tally.limit_batches += 1;
                    tally.poison_readings += p.readings;
                    tally.poison_expected_expired += p.expired;
                }
                let past = poison_sensors(live.iter().take(1), |t| poison_bulk(t.count, now, limit + 1));
                if send(v, &batch(next_id(), past.sensors), &mut tally) {
                    tally.over_limit_batches += 1;
                }
            }
        }
        let rest = Duration::from_millis(250).saturating_sub(round.elapsed());
        std::thread::sleep(rest);
    }
    let live = targets.get();
    for v in victims.iter_mut() {
        drain(v, &live, Duration::from_millis(150), &mut tally);
    }
    tally
}

/// Poison for some live sensors: one [`SensorBatch`] per target with the
/// readings `make` gives it.
struct Poisoned {
    sensors: Vec<SensorBatch>,
    readings: u64,
    /// Of those, the ones the server must ack as expired (it refuses the rest).
    expired: u64,
}

fn poison_sensors<'a>(
    targets: impl Iterator<Item = &'a Target>,
    make: impl Fn(&Target) -> Vec<(Reading, Expect)>,
) -> Poisoned {
    let mut p = Poisoned { sensors: Vec::new(), readings: 0, expired: 0 };
    for t in targets {
        let poisoned = make(t);
        p.readings += poisoned.len() as u64;
        p.expired += poisoned.iter().filter(|(_, e)| e.is_none()).count() as u64;
        p.sensors.push(sensor(t.sensor_id, t.incarnation, 0, poisoned.into_iter().map(|(r, _)| r).collect()));
    }
    p
}

fn send(v: &Victim, request: &Request, tally: &mut Tally) -> bool {
    let sent = v.rogue.send(request).is_ok();
    if sent {
        tally.batches_sent += 1;
    }
    sent
}

/// Reads every reply waiting (for at most `window`): notes the epoch the
/// server names, the refusals it gives, and any ack of a poisoned sensor
/// whose watermark jumped.
fn drain(v: &mut Victim, live: &[Target], window: Duration, tally: &mut Tally) {
    let deadline = Instant::now() + window;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let reply = match v.rogue.reply(left) {
            Ok(Some(r)) => r,
            Ok(None) => return,
            Err(_) => {
                tally.connect_errors += 1;
                return;
            }
        };
        tally.replies += 1;
        if let Some(named) = named_epoch(&reply) {
            v.epoch = Some(named);
        }
        match reply {
            Reply::Batch(b) => {
                for r in &b.refused {
                    *tally.told_refused.entry(format!("{:?}", r.reason)).or_default() += u64::from(r.count);
                }
                for ack in &b.acks {
                    let poisoned = live.iter().any(|t| t.sensor_id == ack.sensor_id);
                    if poisoned && ack.next_seq >= 1 << 52 {
                        tally.watermark_jumps += 1;
                    }
                }
            }
            Reply::Refused { reason, .. } => *tally.told_refused.entry(format!("{reason:?}")).or_default() += 1,
            _ => {}
        }
    }
}

/// What the servers counted against hostile clients, summed over every
/// life of every server (a restarted server counts from zero): the
/// largest value each life showed in a status the verifier read, so a
/// lower bound when a server is killed between two reads. Both servers
/// count forged epochs, foreign sensors and oversized batches (refused
/// before the node looks at its state); only the active refuses readings
/// out of range. Expired readings are in the log: every node that applies
/// it (the passive, a node recovering or catching up) counts them again,
/// so `expired` is the largest any one life showed, not a sum.
#[derive(Debug, Default)]
pub struct ServerCounters {
    /// Per server life (`primary-3`), per counter, the largest value seen.
    lives: BTreeMap<String, BTreeMap<&'static str, u64>>,
}

/// The counters reported: `forged_epochs`, `expired` and `refused.*`;
/// first the [`REFUSALS`], then the rest.
pub const COUNTERS: [&str; 9] = [
    "forged_epochs",
    "refused.foreign_sensor",
    "refused.seq_out_of_range",
    "refused.from_the_future",
    "refused.too_large",
    "refused.not_authorized",
    "refused.malformed",
    "refused.busy",
    "expired",
];

/// The counters a rogue's batches raise: the first six [`COUNTERS`] (not
/// `malformed`, `busy`, which comes from status polling, or `expired`,
/// which is no refusal).
pub const REFUSALS: &[&str] = COUNTERS.split_at(6).0;

impl ServerCounters {
    pub fn record(&mut self, life: &str, status: &Value) {
        let counters = self.lives.entry(life.to_string()).or_default();
        for name in COUNTERS {
            let value = match name.split_once('.') {
                Some((group, field)) => status[group][field].as_u64(),
                None => status[name].as_u64(),
            };
            if let Some(value) = value {
                let e = counters.entry(name).or_default();
                *e = (*e).max(value);
            }
        }
    }

    /// Every counter summed over the lives (`expired`: the largest).
    pub fn totals(&self) -> BTreeMap<&'static str, u64> {
        let mut out: BTreeMap<&'static str, u64> = COUNTERS.iter().map(|&c| (c, 0)).collect();
        for counters in self.lives.values() {
            for (name, value) in counters {
                let total = out.entry(name).or_default();
                *total = if *name == "expired" { (*total).max(*value) } else { *total + value };
            }
        }
        out
    }
}
