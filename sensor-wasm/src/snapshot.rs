//! A sensor's whole state as bytes, so a host can move a sensor into a new
//! component or a new process and it carries on: same incarnation, same
//! sequence, same unacked readings, same average cursor and limit.
//!
//! Format version 2, all integers little-endian, floats as IEEE bits:
//!
//! ```text
//! u8  version = 1
//! u32 sensor_id   u32 segment   u64 incarnation   u64 next_seq
//! u64 generated   u64 sum_kmh   u16 min_kmh       u16 max_kmh
//! u8  has_settings_error [u32 len, len × u8 UTF-8]
//! traffic:  u64 rng_state  u64 road_seed  f64 free_flow_kmh  f64 stream_kmh  u64 last_ms
//! resend:   u64 resend_after_ms  u32 max_buffered  u64 acked  u64 resent  u64 overflowed
//!           u32 n, n × (u64 seq, u16 speed_kmh, u64 timestamp_ms, u64 last_sent_ms)
//! averages: u8 has_last [u64 seq, u64 epoch, u64 chain]  u64 applied  u64 missed  u64 superseded
//!           u8 has_window [u64 window_end_ms, u32 revision]  u32 limit_kmh
//! u64 checksum of every byte before it
//! ```
//!
//! The bytes come from outside the sensor, so decoding checks everything it
//! can (version, checksum, lengths, and that the counters and buffer agree)
//! and returns an error rather than panicking or adopting a state the rest
//! of the code would trip over.

use crate::averages::{AverageStream, AverageCursor, WindowVersion};
use crate::core::SensorCore;
use crate::limit::AdvisoryLimit;
use crate::resend::{Pending, Reading, ResendBuffer};
use crate::rng::{Rng, mix64};
use crate::traffic::{SpeedRange, TrafficModel};
use std::collections::VecDeque;

/// The format this sensor writes and reads.
pub const SNAPSHOT_VERSION: u8 = 2;
const CHECKSUM_LEN: usize = 8;
/// Bytes of one buffered reading, for bounding `n` before allocating.
const PENDING_LEN: usize = 8 + 2 + 8 + 8;

/// Why a snapshot could not be restored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RestoreError {
    Empty,
    Version(u8),
    /// Damaged or cut short in transit.
    Checksum,
    Truncated {
        offset: usize,
    },
    TrailingBytes(usize),
    /// Well-formed bytes describing an impossible state.
    Inconsistent(&'static str),
}

impl std::fmt::Display for RestoreError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RestoreError::Empty => write!(f, "empty sensor snapshot"),
            RestoreError::Version(v) => {
                write!(
                    f,
                    "sensor snapshot format version {v}, this sensor reads version {SNAPSHOT_VERSION}"
                )
            }
            RestoreError::Checksum => write!(
                f,
                "sensor snapshot damaged or truncated (checksum mismatch)"
            ),
            RestoreError::Truncated { offset } => {
                write!(f, "sensor snapshot truncated at byte {offset}")
            }
            RestoreError::TrailingBytes(n) => {
                write!(f, "sensor snapshot has {n} unexpected trailing bytes")
            }
            RestoreError::Inconsistent(what) => write!(f, "sensor snapshot inconsistent: {what}"),
        }
    }
}

impl std::error::Error for RestoreError {}

fn checksum(bytes: &[u8]) -> u64 {
    bytes.chunks(8).fold(mix64(bytes.len() as u64), |h, chunk| {
        let mut word = [0u8; 8];
        word[..chunk.len()].copy_from_slice(chunk);
        mix64(h ^ u64::from_le_bytes(word))
    })
}

struct Writer(Vec<u8>);

impl Writer {
    fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    fn u16(&mut self, v: u16) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn f64(&mut self, v: f64) {
        self.u64(v.to_bits());
    }
    fn len(&mut self, n: usize) {
        // Buffers are bounded by a u32 `max_buffered`; strings are ours.
        self.u32(u32::try_from(n).unwrap_or(u32::MAX));
    }
}

struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take<const N: usize>(&mut self) -> Result<[u8; N], RestoreError> {
        let end = self
            .pos
            .checked_add(N)
            .filter(|end| *end <= self.bytes.len());
        let end = end.ok_or(RestoreError::Truncated { offset: self.pos })?;
        let mut out = [0u8; N];
        out.copy_from_slice(&self.bytes[self.pos..end]);
        self.pos = end;
        Ok(out)
    }
    fn u8(&mut self) -> Result<u8, RestoreError> {
        Ok(self.take::<1>()?[0])
    }
    fn u16(&mut self) -> Result<u16, RestoreError> {
        self.take().map(u16::from_le_bytes)
    }
    fn u32(&mut self) -> Result<u32, RestoreError> {
        self.take().map(u32::from_le_bytes)
    }
    fn u64(&mut self) -> Result<u64, RestoreError> {
        self.take().map(u64::from_le_bytes)
    }
    fn f64(&mut self) -> Result<f64, RestoreError> {
        let v = f64::from_bits(self.u64()?);
        if v.is_finite() {
            Ok(v)
        } else {
            Err(RestoreError::Inconsistent("non-finite speed"))
        }
    }
    fn flag(&mut self) -> Result<bool, RestoreError> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(RestoreError::Inconsistent("flag byte neither 0 nor 1")),
        }
    }
    /// A length prefix, checked against the bytes left so a forged length
    /// cannot make us allocate gigabytes.
    fn len(&mut self, item_len: usize) -> Result<usize, RestoreError> {
        let offset = self.pos;
        let n = self.u32()? as usize;
        if n.saturating_mul(item_len) > self.bytes.len() - self.pos {
            return Err(RestoreError::Truncated { offset });
        }
        Ok(n)
    }
}

impl SensorCore {
    /// The whole state as bytes; [`SensorCore::restore`] reads them back.
    pub fn snapshot(&self) -> Vec<u8> {
        let mut w = Writer(Vec::with_capacity(200 + self.resend.len() * PENDING_LEN));
        w.u8(SNAPSHOT_VERSION);
        w.u32(self.sensor_id);
        w.u32(self.averages.segment);
        w.u64(self.incarnation);
        w.u64(self.next_seq);
        w.u64(self.generated);
        w.u64(self.sum_kmh);
        w.u16(self.traffic.range.min_kmh);
        w.u16(self.traffic.range.max_kmh);
        match &self.settings_error {
            None => w.u8(0),
            Some(e) => {
                w.u8(1);
                w.len(e.len());
                w.0.extend_from_slice(e.as_bytes());
            }
        }

        let t = &self.traffic;
        w.u64(t.rng.state());
        w.u64(t.road_seed);
        w.f64(t.free_flow_kmh);
        w.f64(t.stream_kmh);
        w.u64(t.last_ms);

        let r = &self.resend;
        w.u64(r.resend_after_ms);
        w.u32(r.max_buffered);
        w.u64(r.acked);
        w.u64(r.resent);
        w.u64(r.overflowed);
        w.len(r.pending.len());
        for p in &r.pending {
            w.u64(p.reading.seq);
            w.u16(p.reading.speed_kmh);
            w.u64(p.reading.timestamp_ms);
            w.u64(p.last_sent_ms);
        }

        let a = &self.averages;
        match a.last {
            None => w.u8(0),
            Some(c) => {
                w.u8(1);
                w.u64(c.seq);
                w.u64(c.epoch);
                w.u64(c.chain);
            }
        }
        w.u64(a.applied);
        w.u64(a.missed);
        w.u64(a.superseded);
        match a.newest_own {
            None => w.u8(0),
            Some(v) => {
                w.u8(1);
                w.u64(v.window_end_ms);
                w.u32(v.revision);
            }
        }
        w.u32(a.limit.kmh());

        let sum = checksum(&w.0);
        w.u64(sum);
        w.0
    }

    /// A sensor from [`SensorCore::snapshot`] bytes, or why not.
    pub fn restore(bytes: &[u8]) -> Result<SensorCore, RestoreError> {
        let (&version, _) = bytes.split_first().ok_or(RestoreError::Empty)?;
        if version != SNAPSHOT_VERSION {
            return Err(RestoreError::Version(version));
        }
        let body_len = bytes
            .len()
            .checked_sub(CHECKSUM_LEN)
            .ok_or(RestoreError::Checksum)?;
        let (body, sum) = bytes.split_at(body_len);
        if sum != checksum(body).to_le_bytes() {
            return Err(RestoreError::Checksum);
        }
        let mut r = Reader {
            bytes: body,
            pos: 1,
        };
        let core = read_core(&mut r)?;
        if r.pos != body.len() {
            return Err(RestoreError::TrailingBytes(body.len() - r.pos));
        }
        Ok(core)
    }
}

fn read_core(r: &mut Reader<'_>) -> Result<SensorCore, RestoreError> {
    use RestoreError::Inconsistent;

    let sensor_id = r.u32()?;
    let segment = r.u32()?;
    let incarnation = r.u64()?;
    let next_seq = r.u64()?;
    let generated = r.u64()?;
    let sum_kmh = r.u64()?;
    let range = SpeedRange {
        min_kmh: r.u16()?,
        max_kmh: r.u16()?,
    };
    if range.min_kmh >= range.max_kmh {
        return Err(Inconsistent("empty speed range"));
    }
    let settings_error = if r.flag()? {
        let n = r.len(1)?;
        let mut text = Vec::with_capacity(n);
        for _ in 0..n {
            text.push(r.u8()?);
        }
        Some(String::from_utf8(text).map_err(|_| Inconsistent("settings error is not UTF-8"))?)
    } else {
        None
    };

    let traffic = TrafficModel {
        range,
        rng: Rng::new(r.u64()?),
        road_seed: r.u64()?,
        free_flow_kmh: r.f64()?,
        stream_kmh: r.f64()?,
        last_ms: r.u64()?,
        known: Default::default(),
    };

    let mut resend = ResendBuffer::new(r.u64()?, r.u32()?);
    resend.acked = r.u64()?;
    resend.resent = r.u64()?;
    resend.overflowed = r.u64()?;
    let n = r.len(PENDING_LEN)?;
    let mut pending = VecDeque::with_capacity(n);
    for _ in 0..n {
        let reading = Reading {
            seq: r.u64()?,
            speed_kmh: r.u16()?,
            timestamp_ms: r.u64()?,
        };
        let last_sent_ms = r.u64()?;
        if reading.seq >= next_seq {
            return Err(Inconsistent("buffered reading not yet generated"));
        }
        if pending
            .back()
            .is_some_and(|p: &Pending| p.reading.seq >= reading.seq)
        {
            return Err(Inconsistent("buffered readings out of order"));
        }
        resend.earliest_sent_ms = resend.earliest_sent_ms.min(last_sent_ms);
        pending.push_back(Pending {
            reading,
            last_sent_ms,
        });
    }
    resend.pending = pending;
    if resend.pending.len() > resend.max_buffered as usize {
        return Err(Inconsistent("more readings buffered than allowed"));
    }
    let accounted = resend
        .acked
        .checked_add(n as u64)
        .and_then(|x| x.checked_add(resend.overflowed));
    if accounted != Some(generated) {
        return Err(Inconsistent("generated != acked + buffered + overflowed"));
    }

    let mut averages = AverageStream::new(segment);
    averages.last = if r.flag()? {
        Some(AverageCursor {
            seq: r.u64()?,
            epoch: r.u64()?,
            chain: r.u64()?,
        })
    } else {
        None
    };
    averages.applied = r.u64()?;
    averages.missed = r.u64()?;
    averages.superseded = r.u64()?;
    averages.newest_own = if r.flag()? {
        Some(WindowVersion {
            window_end_ms: r.u64()?,
            revision: r.u32()?,
        })
    } else {
        None
    };
    averages.limit =
        AdvisoryLimit::from_kmh(r.u32()?).ok_or(Inconsistent("limit is not one of the steps"))?;

    Ok(SensorCore {
        sensor_id,
        settings_error,
        incarnation,
        next_seq,
        generated,
        sum_kmh,
        traffic,
        resend,
        averages,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::averages::Average;
    use crate::core::SensorConfig;

    const T0: u64 = 1_700_000_000_000;

    /// A sensor with something in every part of its state.
    fn busy_sensor() -> SensorCore {
        let cfg = SensorConfig {
            sensor_id: 9,
            segment: 4,
            resend_after_ms: 1000,
            max_buffered: 5,
            settings: vec![("min-kmh".into(), "oops".into())],
        };
        let mut core = SensorCore::new(&cfg, 1234, T0);
        for i in 0..12 {
            core.tick(T0 + i * 700, 1, 0);
        }
        core.on_ack(core.incarnation(), 5, &[8]);
        let mut avg = Average {
            seq: 3,
            epoch: 2,
            segment: 4,
            window_end_ms: T0,
            count: 3,
            sum_kmh: 241,
            revision: 1,
            chain: 0,
        };
        avg.chain = avg.link(77);
        core.on_averages(&[avg]);
        core.on_reposition(None, AverageCursor { seq: 6, epoch: 2, chain: 99 });
        core
    }

    #[test]
    fn round_trip_restores_a_sensor_that_carries_on_identically() {
        let original = busy_sensor();
        let s = original.status();
        assert!(
            s.acked > 0 && s.buffered > 0 && s.overflowed > 0 && s.resent > 0,
            "{s:?}"
        );
        assert!(original.settings_error().is_some());
        let bytes = original.snapshot();
        assert_eq!(bytes[0], SNAPSHOT_VERSION);
        let mut restored = SensorCore::restore(&bytes).expect("restores");
        assert_eq!(restored, original);
        assert_eq!(restored.snapshot(), bytes);

        let mut original = original;
        for i in 0..20 {
            let now = T0 + 20_000 + i * 400;
            assert_eq!(
                restored.tick(now, u32::from(i % 3 != 0), 0),
                original.tick(now, u32::from(i % 3 != 0), 0)
            );
        }
        assert_eq!(restored.status(), original.status());
    }

    #[test]
    fn a_fresh_sensor_round_trips_too() {
        let core = SensorCore::new(&SensorConfig::default(), 0, 0);
        assert_eq!(SensorCore::restore(&core.snapshot()), Ok(core));
    }

    #[test]
    fn truncated_or_damaged_snapshots_are_refused_with_a_reason() {
        let bytes = busy_sensor().snapshot();
        assert_eq!(SensorCore::restore(&[]), Err(RestoreError::Empty));
        for cut in 1..bytes.len() {
            assert!(SensorCore::restore(&bytes[..cut]).is_err(), "cut at {cut}");
        }
        let mut other = bytes.clone();
        other[0] = 1;
        let err = SensorCore::restore(&other).unwrap_err();
        assert_eq!(
            err.to_string(),
            "sensor snapshot format version 1, this sensor reads version 2"
        );
        for i in 1..bytes.len() {
            let mut flipped = bytes.clone();
            flipped[i] ^= 0x10;
            assert_eq!(
                SensorCore::restore(&flipped),
                Err(RestoreError::Checksum),
                "byte {i}"
            );
        }
        let mut rng = Rng::new(5);
        for len in 0..300 {
            let mut garbage: Vec<u8> = (0..len).map(|_| rng.next_u64() as u8).collect();
            if let Some(first) = garbage.first_mut() {
                *first = SNAPSHOT_VERSION;
            }
            assert!(SensorCore::restore(&garbage).is_err());
        }
    }

    /// Bytes that pass the checksum but describe nonsense: the checks behind
    /// the checksum must catch them without panicking or allocating wildly.
    #[test]
    fn well_formed_but_impossible_states_are_refused() {
        let seal = |mut body: Vec<u8>| {
            let sum = checksum(&body);
            body.extend_from_slice(&sum.to_le_bytes());
            body
        };
        let bytes = busy_sensor().snapshot();
        let body = &bytes[..bytes.len() - CHECKSUM_LEN];

        let mut trailing = body.to_vec();
        trailing.push(0);
        assert_eq!(
            SensorCore::restore(&seal(trailing)),
            Err(RestoreError::TrailingBytes(1))
        );

        // generated (offset 1+4+4+8+8) one higher than the buffer accounts for.
        let mut miscount = body.to_vec();
        miscount[25] = miscount[25].wrapping_add(1);
        assert!(matches!(
            SensorCore::restore(&seal(miscount)),
            Err(RestoreError::Inconsistent(_))
        ));

        // Every byte changed in turn, re-sealed: an error or a state, never a panic.
        for i in 1..body.len() {
            for v in [0x00, 0xff, 0x80] {
                let mut forged = body.to_vec();
                forged[i] = v;
                let _ = SensorCore::restore(&seal(forged));
            }
        }
        let mut huge = body[..body.len() - 4].to_vec();
        huge.extend_from_slice(&u32::MAX.to_le_bytes());
        assert!(SensorCore::restore(&seal(huge)).is_err());
    }
}
