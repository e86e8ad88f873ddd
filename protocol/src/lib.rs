//! The fog wire protocol: the messages a host and a server exchange, and the
//! one way to put them into and take them out of a ZeroMQ frame.
//!
//! A frame is one protocol-version byte followed by a postcard-encoded
//! message. Decoding never panics: a frame that is too large, of another
//! version, or not a valid message is a [`DecodeError`] that the receiver
//! counts and drops.
//!
//! Readings are identified by `(sensor_id, incarnation, seq)`. A host
//! multiplexes all of its sensors over one connection per server, so every
//! per-sensor item carries its sensor id.

use serde::{Deserialize, Serialize};

/// The version byte that leads every frame.
pub const PROTOCOL_VERSION: u8 = 1;
/// Largest frame accepted or produced, in bytes.
pub const MAX_FRAME_BYTES: usize = 64 * 1024 * 1024;
/// Most readings a single batch may carry.
pub const MAX_READINGS_PER_BATCH: usize = 4_000_000;
/// Most averages a single reply carries; a sensor further behind gets the
/// rest in following replies.
pub const MAX_AVERAGES_PER_REPLY: usize = 4096;

/// One speed reading of one sensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reading {
    pub seq: u64,
    pub speed_kmh: u16,
    /// Event time, milliseconds since the Unix epoch.
    pub timestamp_ms: u64,
}

/// What one sensor has to say in a batch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SensorBatch {
    pub sensor_id: u32,
    pub incarnation: u64,
    pub segment: u32,
    pub readings: Vec<Reading>,
    /// Highest average sequence the sensor has applied (its average ack);
    /// `None` for a sensor that has applied none yet.
    pub average_cursor: Option<u64>,
}

/// A host's request to a server.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Request {
    /// Readings and average acks of many sensors; answered by
    /// [`Reply::Batch`], or [`Reply::NotActive`] from a server that does not
    /// serve clients right now.
    Batch { batch_id: u64, sensors: Vec<SensorBatch> },
    /// Ask for the server's [`StatusReport`]; any server answers.
    Status,
}

/// A server's answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Reply {
    Batch(BatchReply),
    /// This server is not active: try the other one at once.
    NotActive { state: NodeState },
    Status(Box<StatusReport>),
}

/// The answer to a [`Request::Batch`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct BatchReply {
    pub batch_id: u64,
    pub acks: Vec<SensorAck>,
    /// Averages following the lowest cursor of the batch's sensors, in
    /// sequence order; each sensor applies those after its own cursor.
    pub averages: Vec<Average>,
    /// Sensors whose cursor fell behind retention, and what they missed.
    pub missed: Vec<Missed>,
}

/// The server has counted every reading of `(sensor_id, incarnation)` with
/// `seq < next_seq`, and in addition the ones in `also`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SensorAck {
    pub sensor_id: u32,
    pub incarnation: u64,
    pub next_seq: u64,
    pub also: Vec<u64>,
}

/// The average speed of one road segment over the 5 s window ending at
/// `window_end_ms` (exclusive), in event time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Average {
    /// Global, gap-free average sequence number.
    pub seq: u64,
    pub segment: u32,
    pub window_end_ms: u64,
    pub count: u32,
    pub sum_kmh: u64,
    /// 0 for the first publication of a window, n for its n-th revision
    /// (late readings arrived after it was published).
    pub revision: u32,
}

impl Average {
    pub fn mean_kmh(&self) -> f32 {
        if self.count == 0 { 0.0 } else { self.sum_kmh as f32 / self.count as f32 }
    }
}

/// Averages `from..=to` are no longer retained; the sensor skips them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Missed {
    pub sensor_id: u32,
    pub from: u64,
    pub to: u64,
}

/// The Binary Star states of a server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeState {
    /// A primary that has not yet heard from its peer.
    Primary,
    /// A backup that has not yet heard from its peer.
    Backup,
    /// Serving clients.
    Active,
    /// Standing by; answers clients with [`Reply::NotActive`].
    Passive,
}

impl NodeState {
    pub fn as_str(self) -> &'static str {
        match self {
            NodeState::Primary => "primary",
            NodeState::Backup => "backup",
            NodeState::Active => "active",
            NodeState::Passive => "passive",
        }
    }
}

/// A heartbeat on the Binary Star state channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerHeartbeat {
    pub state: NodeState,
}

/// A server's state, as `fog-server status` prints it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusReport {
    pub role: String,
    pub state: NodeState,
    /// Unique readings counted.
    pub counted: u64,
    /// Readings received again and not counted again.
    pub duplicates: u64,
    pub averages_published: u64,
    pub revisions_published: u64,
    pub last_average_seq: Option<u64>,
    /// Readings older than the window horizon: counted, in no average.
    pub too_late: u64,
    pub malformed_frames: u64,
    pub batches: u64,
    pub peer_alive: bool,
    pub per_sensor: Vec<SensorCount>,
}

/// What a server counted for one `(sensor_id, incarnation)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SensorCount {
    pub sensor_id: u32,
    pub incarnation: u64,
    pub count: u64,
    pub sum_kmh: u64,
}

/// Why a frame could not be decoded.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("empty frame")]
    Empty,
    #[error("frame of {0} bytes exceeds the {MAX_FRAME_BYTES}-byte limit")]
    TooLarge(usize),
    #[error("protocol version {0}, expected {PROTOCOL_VERSION}")]
    Version(u8),
    #[error("malformed message: {0}")]
    Malformed(String),
    #[error("batch of {0} readings exceeds the {MAX_READINGS_PER_BATCH}-reading limit")]
    TooManyReadings(usize),
}

/// Why a message could not be encoded.
#[derive(Debug, thiserror::Error)]
pub enum EncodeError {
    #[error("encoded message of {0} bytes exceeds the {MAX_FRAME_BYTES}-byte limit")]
    TooLarge(usize),
    #[error("cannot encode message: {0}")]
    Serialize(String),
}

/// Encodes `msg` as one frame: the version byte, then postcard.
pub fn encode<T: Serialize>(msg: &T) -> Result<Vec<u8>, EncodeError> {
    let out = postcard::to_extend(msg, vec![PROTOCOL_VERSION])
        .map_err(|e| EncodeError::Serialize(e.to_string()))?;
    if out.len() > MAX_FRAME_BYTES {
        return Err(EncodeError::TooLarge(out.len()));
    }
    Ok(out)
}

/// Decodes one frame produced by [`encode`].
pub fn decode<'a, T: Deserialize<'a>>(frame: &'a [u8]) -> Result<T, DecodeError> {
    let (&version, body) = frame.split_first().ok_or(DecodeError::Empty)?;
    if frame.len() > MAX_FRAME_BYTES {
        return Err(DecodeError::TooLarge(frame.len()));
    }
    if version != PROTOCOL_VERSION {
        return Err(DecodeError::Version(version));
    }
    let (msg, rest) =
        postcard::take_from_bytes(body).map_err(|e| DecodeError::Malformed(e.to_string()))?;
    if !rest.is_empty() {
        return Err(DecodeError::Malformed(format!("{} trailing bytes", rest.len())));
    }
    Ok(msg)
}

/// Decodes a request and checks its limits.
pub fn decode_request(frame: &[u8]) -> Result<Request, DecodeError> {
    let req: Request = decode(frame)?;
    if let Request::Batch { sensors, .. } = &req {
        let n: usize = sensors.iter().map(|s| s.readings.len()).sum();
        if n > MAX_READINGS_PER_BATCH {
            return Err(DecodeError::TooManyReadings(n));
        }
    }
    Ok(req)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Request {
        Request::Batch {
            batch_id: 7,
            sensors: vec![SensorBatch {
                sensor_id: 3,
                incarnation: 0xdead_beef,
                segment: 0,
                readings: vec![Reading { seq: 0, speed_kmh: 97, timestamp_ms: 1_700_000_000_000 }],
                average_cursor: Some(12),
            }],
        }
    }

    #[test]
    fn round_trips() {
        let frame = encode(&sample()).unwrap();
        assert_eq!(frame[0], PROTOCOL_VERSION);
        assert_eq!(decode_request(&frame).unwrap(), sample());
    }

    #[test]
    fn rejects_bad_frames_without_panicking() {
        assert_eq!(decode_request(&[]), Err(DecodeError::Empty));
        let mut frame = encode(&sample()).unwrap();
        frame[0] = 99;
        assert_eq!(decode_request(&frame), Err(DecodeError::Version(99)));
        let good = encode(&sample()).unwrap();
        for cut in 1..good.len() {
            assert!(decode_request(&good[..cut]).is_err(), "truncated at {cut}");
        }
        let mut trailing = good.clone();
        trailing.push(0);
        assert!(matches!(decode_request(&trailing), Err(DecodeError::Malformed(_))));
        // Every byte flipped: decodes to something or errors, never panics.
        for i in 1..good.len() {
            let mut f = good.clone();
            f[i] ^= 0xff;
            let _ = decode_request(&f);
        }
        // A huge declared length must not allocate or panic.
        let _ = decode_request(&[PROTOCOL_VERSION, 0, 0xff, 0xff, 0xff, 0xff, 0x0f]);
    }
}
