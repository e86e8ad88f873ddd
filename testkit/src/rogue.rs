//! What hostile clients send a server's frontend (through a
//! [`Client`](crate::Client)): the batch builders here are the attacks,
//! [`forged_claims`] (epochs without a valid seal) and [`poison`]
//! (readings that must never move a sensor's ledger), plus plain
//! [`readings`], [`sensor`] and [`batch`] for the rest.
//!
//! Used by the hostile tests, the server's command-line tests and
//! `fog-verify`'s `rogue` fault.

use anyhow::bail;

pub use fog_protocol::{
    BatchReply, MAX_READINGS_PER_BATCH, MAX_SEQ, Reading, Refusal, Reply, Request, Seal, SensorBatch, decode, encode,
};

/// Milliseconds since the Unix epoch on the wall clock: what readings are
/// stamped with.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// `n` readings from `first_seq` on, all at `timestamp_ms`, 88 km/h.
pub fn readings(first_seq: u64, n: u64, timestamp_ms: u64) -> Vec<Reading> {
    (first_seq..first_seq + n).map(|seq| Reading { seq, speed_kmh: 88, timestamp_ms }).collect()
}

pub fn sensor(sensor_id: u32, incarnation: u64, segment: u32, readings: Vec<Reading>) -> SensorBatch {
    SensorBatch { sensor_id, incarnation, segment, readings, average_cursor: None }
}

/// A batch that claims no epoch.
pub fn batch(batch_id: u64, sensors: Vec<SensorBatch>) -> Request {
    Request::Batch { batch_id, epoch: 0, seal: [0; 16], sensors }
}

pub fn batch_reply(reply: Reply) -> anyhow::Result<BatchReply> {
    match reply {
        Reply::Batch(b) => Ok(b),
        other => bail!("expected a batch reply, got {other:?}"),
    }
}

/// How many readings of `reply` were refused for `reason`.
pub fn refused_count(reply: &BatchReply, reason: Refusal) -> u64 {
    reply.refused.iter().filter(|r| r.reason == reason).map(|r| u64::from(r.count)).sum()
}

/// The epoch and seal a server names in its reply, if it names one.
pub fn named_epoch(reply: &Reply) -> Option<(u64, Seal)> {
    match reply {
        Reply::Batch(b) => Some((b.epoch, b.seal)),
        Reply::NotActive { epoch, seal, .. } => Some((*epoch, *seal)),
        _ => None,
    }
}

/// Epoch claims a forger makes against a server that named `epoch` with
/// `real_seal`: the next epoch with the real seal and with none, the
/// largest epochs, the current epoch with a made-up seal, and `random`
/// more ahead of it with random seals. None is sealed by the pair, so every
/// one is a forged epoch to the server.
pub fn forged_claims(epoch: u64, real_seal: Seal, random: usize) -> Vec<(u64, Seal)> {
    let mut claims = vec![
        (epoch + 1, real_seal),
        (epoch + 1, [0; 16]),
        (u64::MAX, [0xff; 16]),
        (1 << 62, real_seal),
        (epoch, [0xab; 16]),
    ];
    for _ in 0..random {
        let mut seal = [0u8; 16];
        rand::fill(&mut seal);
        claims.push((epoch + 1 + rand::random_range(0..1000u64), seal));
    }
    claims
}

/// What a server must do with a [`poison`] reading: refuse it for this
/// reason, or (`None`) ack it as expired without counting it.
pub type Expect = Option<Refusal>;

const HOUR_MS: u64 = 3_600_000;

/// Poison readings for a live sensor that has about `next_seq` readings
/// counted, at server time `now`, each with what the server must do with
/// it. Counted, any of them would show as a duplicate or a wrong sum of
/// that sensor; acked as counted, as a jump of its watermark. Each is
/// refused or expired whatever the server knows of the sensor (a seq just
/// under [`MAX_SEQ`] stamped now is not: a server that has no ledger for
/// the sensor may count it, as it would a new sensor's).
pub fn poison(next_seq: u64, now: u64) -> Vec<(Reading, Expect)> {
    // Seqs the sensor has yet to generate: a reading the server wrongly
    // counted would make the sensor's own one a duplicate.
    let ahead = next_seq + 1_000;
    vec![
        (Reading { seq: 1 << 62, speed_kmh: 1, timestamp_ms: 0 }, Some(Refusal::SeqOutOfRange)),
        (Reading { seq: u64::MAX, speed_kmh: 1, timestamp_ms: now }, Some(Refusal::SeqOutOfRange)),
        (Reading { seq: ahead, speed_kmh: 1, timestamp_ms: now + HOUR_MS }, Some(Refusal::FromTheFuture)),
        (Reading { seq: ahead + 1, speed_kmh: 1, timestamp_ms: 0 }, None),
        (Reading { seq: (1 << 52) + 7, speed_kmh: 1, timestamp_ms: 1 }, None),
    ]
}

/// `n` poison readings for one live sensor (see [`poison`]) with distinct
/// seqs from `next_seq + 2000` on: alternately an hour ahead (refused) and
/// stamped 0 (expired). A batch of [`MAX_READINGS_PER_BATCH`] of them is
/// served in full and none counted.
pub fn poison_bulk(next_seq: u64, now: u64, n: u64) -> Vec<(Reading, Expect)> {
    let from = next_seq + 2_000;
    (0..n)
        .map(|i| {
            if i % 2 == 0 {
                (Reading { seq: from + i, speed_kmh: 1, timestamp_ms: now + HOUR_MS }, Some(Refusal::FromTheFuture))
            } else {
                (Reading { seq: from + i, speed_kmh: 1, timestamp_ms: 0 }, None)
            }
        })
        .collect()
}
