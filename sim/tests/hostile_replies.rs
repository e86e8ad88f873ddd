//! A server that lies to a host. A server holds a key the host trusts, so
//! what it says within the protocol's ranges is believed (an ack drops the
//! readings it names); what the host must do is survive everything else.
//! Seeded hostile reply frames (raw bytes, replies with values at and past
//! the protocol's caps, garbled encodings of honest replies, forged epochs)
//! go into the real `HostCore` and `Fleet` over the real sensor code, on the
//! link of the batch in flight:
//!
//! - nothing panics, in the host or in a sensor;
//! - every frame `decode_reply` refuses is counted as a bad reply, and
//!   none of them reaches a sensor;
//! - the replies within range reach the sensors and no sensor fails on
//!   them: every sensor still runs, its books balance (generated = acked +
//!   unacked + overflowed), and its limit is one a sign can show.

use fog_protocol::{
    Average, AverageCursor, BatchReply, MAX_AVERAGES_PER_REPLY, MAX_EPOCH, MAX_READINGS_PER_BATCH, MAX_SENSORS_PER_BATCH, MAX_SEQ,
    NodeState, Refusal, RefusedReadings, Reply, Reposition, Request, Seal, SensorAck, decode_reply, decode_request, encode,
};
use fog_sim::host::{Effect, SimHost};
use fog_sim::native::Traps;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const WALL0: u64 = 1_700_000_000_000;
const CASES: usize = 3_000;

/// What the host's newest batch said: the reply a server owes.
#[derive(Clone, Default)]
struct InFlight {
    batch_id: u64,
    epoch: u64,
    seal: Seal,
    /// (sensor id, incarnation) of the batch's sensors.
    sensors: Vec<(u32, u64)>,
}

fn note_sent(effects: Vec<Effect>, into: &mut InFlight) {
    for Effect::Send { frame, .. } in effects {
        if let Ok(Request::Batch { batch_id, epoch, seal, sensors }) = decode_request(&frame) {
            *into = InFlight { batch_id, epoch, seal, sensors: sensors.iter().map(|s| (s.sensor_id, s.incarnation)).collect() };
        }
    }
}

/// A value at one of the edges a host must survive, or any; `within`:
/// one a seq or an epoch may take (below 2^53).
fn edge(rng: &mut StdRng, within: bool) -> u64 {
    if within {
        return match rng.random_range(0..5) {
            0 => 0,
            1 => 1,
            2 => MAX_SEQ - 1,
            3 => rng.random_range(0..64),
            _ => rng.random_range(0..MAX_SEQ),
        };
    }
    match rng.random_range(0..10) {
        0 => 0,
        1 => 1,
        2 => MAX_SEQ - 1,
        3 => MAX_SEQ,
        4 => MAX_SEQ + 1,
        5 => MAX_EPOCH - 1,
        6 => MAX_EPOCH,
        7 => u64::MAX,
        8 => rng.random_range(0..64),
        _ => rng.random(),
    }
}

/// A count: mostly small, now and then at a cap or (unless `within`) one
/// past it.
fn count(rng: &mut StdRng, cap: usize, within: bool) -> usize {
    match rng.random_range(0..40) {
        0 => cap,
        1 => cap + usize::from(!within),
        _ => rng.random_range(0..5),
    }
}

fn sensor_of(rng: &mut StdRng, f: &InFlight) -> (u32, u64) {
    match f.sensors.len() {
        n if n > 0 && rng.random_bool(0.8) => {
            let (id, incarnation) = f.sensors[rng.random_range(0..n)];
            (id, if rng.random_bool(0.8) { incarnation } else { rng.random() })
        }
        _ => (rng.random(), rng.random()),
    }
}

/// Averages that link into a chain from a made-up position (so a sensor
/// without a position, or one the run put there, applies them), with
/// hostile fields: empty windows, sums at the top of u64, windows at the
/// end of time, the last revision.
fn averages(rng: &mut StdRng, within: bool) -> Vec<Average> {
    let n = count(rng, MAX_AVERAGES_PER_REPLY, within);
    let mut seq = if rng.random_bool(0.5) { rng.random_range(1..20) } else { edge(rng, within) };
    if within {
        seq = seq.min(MAX_SEQ - n as u64);
    }
    let mut chain: u64 = rng.random();
    let linked = rng.random_bool(0.7);
    (0..n)
        .map(|_| {
            let mut a = Average {
                seq,
                epoch: if rng.random_bool(0.8) { rng.random_range(1..4) } else { edge(rng, within) },
                segment: if rng.random_bool(0.8) { rng.random_range(0..3) } else { rng.random() },
                window_end_ms: if rng.random_bool(0.5) { WALL0 + rng.random_range(0..100_000) } else { edge(rng, false) },
                count: if rng.random_bool(0.3) { 0 } else { rng.random() },
                sum_kmh: edge(rng, false),
                revision: if rng.random_bool(0.2) { u32::MAX } else { rng.random_range(0..3) },
                chain: rng.random(),
            };
            if linked {
                a.chain = a.link(chain);
            }
            chain = a.chain;
            seq = seq.wrapping_add(1);
            a
        })
        .collect()
}

/// A reply to the batch `f`; `within`: only values and counts within the
/// protocol's ranges (the reply reaches the sensors), else anything.
fn batch_reply(rng: &mut StdRng, f: &InFlight, within: bool) -> BatchReply {
    let n = count(rng, MAX_SENSORS_PER_BATCH, within);
    let acks = (0..n)
        .map(|_| {
            let (sensor_id, incarnation) = sensor_of(rng, f);
            // Long lists of selective acks in replies of a few acks (a
            // reply of 16 MiB is the most a frame holds).
            let also = match rng.random_range(0..20) {
                0 if n < 5 => vec![rng.random_range(0..MAX_SEQ); MAX_READINGS_PER_BATCH / n.max(1) + usize::from(!within)],
                1 if n < 5 => (0..(MAX_READINGS_PER_BATCH / n.max(1)) as u64).collect(),
                _ => (0..rng.random_range(0..3)).map(|_| edge(rng, within)).collect(),
            };
            let next_seq = if rng.random_bool(0.5) { rng.random_range(0..40) } else { edge(rng, within) };
            SensorAck { sensor_id, incarnation, next_seq, also }
        })
        .collect();
    let repositions = (0..count(rng, MAX_SENSORS_PER_BATCH, within))
        .map(|_| Reposition {
            sensor_id: sensor_of(rng, f).0,
            rewind_to: rng.random_bool(0.5).then(|| edge(rng, within)),
            to: AverageCursor { seq: edge(rng, within), epoch: edge(rng, within), chain: rng.random() },
        })
        .collect();
    let refused = (0..count(rng, 8, within))
        .map(|_| RefusedReadings {
            sensor_id: sensor_of(rng, f).0,
            reason: [Refusal::FromTheFuture, Refusal::SeqOutOfRange, Refusal::ForeignSensor, Refusal::Busy][rng.random_range(0..4)],
            count: if rng.random_bool(0.3) { u32::MAX } else { rng.random_range(0..10) },
        })
        .collect();
    BatchReply {
        batch_id: if rng.random_bool(0.9) { f.batch_id } else { edge(rng, false) },
        epoch: if rng.random_bool(0.7) { f.epoch } else { edge(rng, within) },
        seal: if rng.random_bool(0.7) { f.seal } else { rng.random() },
        acks,
        averages: averages(rng, within),
        repositions,
        refused,
    }
}

/// One hostile frame for the batch `f`.
fn hostile_frame(rng: &mut StdRng, f: &InFlight) -> Vec<u8> {
    match rng.random_range(0..10) {
        0 => (0..rng.random_range(0..64)).map(|_| rng.random()).collect(),
        1 => {
            // The right version byte, then garbage: postcard must refuse it.
            let mut frame = vec![fog_protocol::PROTOCOL_VERSION];
            frame.extend((0..rng.random_range(0..256)).map(|_| rng.random::<u8>()));
            frame
        }
        2 => {
            let mut frame = encode(&Reply::Batch(batch_reply(rng, f, true))).unwrap_or_default();
            for _ in 0..rng.random_range(1..4) {
                if frame.len() > 1 {
                    let i = rng.random_range(1..frame.len());
                    frame[i] ^= rng.random_range(1..=255u8);
                }
            }
            if rng.random_bool(0.3) && frame.len() > 2 {
                frame.truncate(rng.random_range(1..frame.len()));
            }
            frame
        }
        3 => {
            let within = rng.random_bool(0.5);
            encode(&Reply::NotActive { state: NodeState::Passive, epoch: edge(rng, within), seal: rng.random() }).unwrap()
        }
        4 => encode(&Reply::Refused { batch_id: f.batch_id, reason: Refusal::Busy }).unwrap(),
        _ => {
            let within = rng.random_bool(0.7);
            encode(&Reply::Batch(batch_reply(rng, f, within))).unwrap_or_default()
        }
    }
}

fn run(seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut host = SimHost::new(seed, 0, WALL0, u64::MAX, Traps::new(seed, 0.0));
    let mut f = InFlight::default();
    let (mut t, mut refused, mut accepted, mut reached) = (0u64, 0u64, 0u64, 0usize);
    for _ in 0..CASES {
        // Time goes on (ticks, batches, timeouts, failovers) until the host
        // is connected with a batch in flight that no reply has answered.
        loop {
            t += rng.random_range(1..40);
            let effects = host.step(t, WALL0 + t, |_| true);
            note_sent(effects, &mut f);
            if host.link.is_some() && f.batch_id > 0 {
                break;
            }
        }
        let Some((from, generation)) = host.link else { unreachable!() };
        let frame = hostile_frame(&mut rng, &f);
        match decode_reply(&frame) {
            Ok(_) => accepted += 1,
            Err(_) => refused += 1,
        }
        let before = host.core.bad_replies();
        let effects = host.deliver(t, from, generation, &frame);
        note_sent(effects, &mut f);
        if decode_reply(&frame).is_err() {
            assert_eq!(host.core.bad_replies(), before + 1, "seed {seed}: a refused frame was not counted");
            assert!(host.applied.is_empty(), "seed {seed}: a refused frame reached the sensors");
        }
        // The simulated host keeps every reply it applied; these are large.
        let applied = std::mem::take(&mut host.applied).len();
        if applied > 0 {
            // Answered: the next case waits for the next batch.
            reached += applied;
            f.batch_id = 0;
        }
    }
    assert_eq!(host.core.bad_replies(), refused, "seed {seed}: bad replies counted vs refused");
    assert!(refused > CASES as u64 / 10 && accepted > CASES as u64 / 10, "seed {seed}: {refused} refused, {accepted} accepted");
    assert!(reached > CASES / 10, "seed {seed}: only {reached} hostile replies reached the sensors");
    let (_, sensors) = host.summaries(t);
    assert_eq!(sensors.len(), fog_sim::host::SENSORS as usize);
    for s in &sensors {
        assert!(!s.failed && s.failures == 0, "seed {seed}: sensor {} failed on a reply within range: {s:?}", s.sensor_id);
        assert_eq!(s.acked + s.unacked + s.overflowed, s.generated, "seed {seed}: sensor {}'s books: {s:?}", s.sensor_id);
        assert!(fog_sensor::limit::LIMIT_STEPS_KMH.contains(&s.limit_kmh), "seed {seed}: limit {}", s.limit_kmh);
    }
    eprintln!(
        "seed {seed}: {CASES} hostile frames, {refused} refused and counted, {reached} replies reached the sensors, {} readings generated",
        sensors.iter().map(|s| s.generated).sum::<u64>()
    );
}

#[test]
fn a_lying_server_crashes_nothing_and_its_bad_frames_are_counted() {
    for seed in 1..=2 {
        run(seed);
    }
}
