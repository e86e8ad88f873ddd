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
//!
//! Servers carry an *epoch* that grows at every takeover. Replies tell the
//! host the epoch of the server that sent them, with the pair's [`Seal`] of
//! it, and the host repeats the highest sealed epoch it has seen in every
//! request: a server that learns of a higher epoch than its own has been
//! replaced and steps down at once. Only the two servers can seal an epoch,
//! so a host (or anyone who got hold of a host's key) cannot forge one.
//!
//! Every count in a message is bounded here ([`MAX_FRAME_BYTES`],
//! [`MAX_SENSORS_PER_BATCH`], [`MAX_READINGS_PER_BATCH`]) so that one
//! request is a bounded amount of work for a server.
//!
//! The two servers of a pair speak [`PeerMessage`]s on their state channels:
//! heartbeats, and the replication of the log of state changes
//! ([`LogEntry`]).

use serde::{Deserialize, Serialize};

pub mod bounded;

/// The version byte that leads every frame.
pub const PROTOCOL_VERSION: u8 = 4;
/// Largest frame accepted or produced, in bytes. The transport refuses a
/// longer message before it allocates for it (ZeroMQ's `ZMQ_MAXMSGSIZE`).
pub const MAX_FRAME_BYTES: usize = 16 * 1024 * 1024;
/// Bytes of a snapshot in one [`PeerMessage::Snapshot`] at most...
pub const SNAPSHOT_PART_BYTES: usize = 8 * 1024 * 1024;
/// ... and parts of one snapshot at most (1 GiB).
pub const MAX_SNAPSHOT_PARTS: u32 = 128;
/// Most readings a single batch may carry: a batch is a few milliseconds of
/// a server's time at most. A host with more to send sends more batches.
pub const MAX_READINGS_PER_BATCH: usize = 65_536;
/// Most sensors a single batch may carry.
pub const MAX_SENSORS_PER_BATCH: usize = 65_536;
/// Epochs at or above this are refused as evidence from anyone (host, sensor
/// cursor or peer): a takeover adds one or two to the highest epoch known,
/// which must not wrap, and no pair takes over 2^62 times.
pub const MAX_EPOCH: u64 = 1 << 62;
/// Seqs at or above this are refused from any sensor: `seq + 1` can never
/// wrap, and 2^53 readings are 285 000 years of one reading a millisecond
/// (it is also the largest integer a JSON number carries exactly).
pub const MAX_SEQ: u64 = 1 << 53;
/// Most averages a single reply carries; a sensor further behind gets the
/// rest in following replies.
pub const MAX_AVERAGES_PER_REPLY: usize = 4096;

pub use fog_core::{Average, AverageCursor, Reading};

/// What one sensor has to say in a batch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SensorBatch {
    pub sensor_id: u32,
    pub incarnation: u64,
    pub segment: u32,
    #[serde(deserialize_with = "bounded::vec::<_, _, MAX_READINGS_PER_BATCH>")]
    pub readings: Vec<Reading>,
    /// The last average the sensor applied (its average ack); `None` for a
    /// sensor that has applied none yet.
    pub average_cursor: Option<AverageCursor>,
}

/// A keyed hash of an epoch that only the two servers of a pair can make:
/// the proof that a server of the pair issued the epoch. All zeros: none.
pub type Seal = [u8; 16];

/// A host's request to a server.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Request {
    /// Readings and average acks of many sensors; answered by
    /// [`Reply::Batch`], [`Reply::NotActive`] from a server that does not
    /// serve clients right now, or [`Reply::Refused`].
    Batch {
        batch_id: u64,
        /// The highest server epoch the host has seen in a reply (0: none),
        /// and the seal that came with it.
        epoch: u64,
        seal: Seal,
        #[serde(deserialize_with = "bounded::vec::<_, _, MAX_SENSORS_PER_BATCH>")]
        sensors: Vec<SensorBatch>,
    },
    /// Ask for the server's [`StatusReport`]; any server answers a client
    /// with an admin key.
    Status,
}

/// The index postcard gives [`Reply::Status`]: the byte after the version.
const STATUS_VARIANT: u8 = 2;

/// A server's answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Reply {
    Batch(BatchReply),
    /// This server is not active: try the other one at once.
    NotActive { state: NodeState, epoch: u64, seal: Seal },
    Status(Box<StatusReport>),
    /// The request was not served, and why; a batch refused as a whole
    /// names its id (0 when it could not be read).
    Refused { batch_id: u64, reason: Refusal },
}

/// Why a server refused a request, or some readings of a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, thiserror::Error)]
pub enum Refusal {
    #[error("the frame could not be decoded")]
    Malformed,
    #[error("the batch exceeds a limit (sensors, readings or bytes per batch)")]
    TooLarge,
    #[error("this key may not ask for that")]
    NotAuthorized,
    #[error("the key has no rights for this sensor id")]
    ForeignSensor,
    #[error("the reading's timestamp is too far ahead of the server's clock")]
    FromTheFuture,
    #[error("the reading's seq is too far ahead of the sensor's counted readings")]
    SeqOutOfRange,
    #[error("the server is busy; send again later")]
    Busy,
}
/// The answer to a [`Request::Batch`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct BatchReply {
    pub batch_id: u64,
    /// The epoch of the active server that acked the batch, and its seal.
    pub epoch: u64,
    pub seal: Seal,
    #[serde(deserialize_with = "bounded::vec::<_, _, MAX_SENSORS_PER_BATCH>")]
    pub acks: Vec<SensorAck>,
    /// Averages following the lowest cursor of the batch's sensors, in
    /// sequence order; each sensor applies those after its own cursor.
    #[serde(deserialize_with = "bounded::vec::<_, _, MAX_AVERAGES_PER_REPLY>")]
    pub averages: Vec<Average>,
    /// Sensors whose cursor is not on this server's stream (behind
    /// retention, or on a branch abandoned after a split), and where they
    /// continue; applied before `averages`.
    #[serde(deserialize_with = "bounded::vec::<_, _, MAX_SENSORS_PER_BATCH>")]
    pub repositions: Vec<Reposition>,
    /// Readings not accepted (not acked, not counted), one entry per sensor
    /// and reason: the host logs them and keeps the readings.
    #[serde(deserialize_with = "bounded::vec::<_, _, MAX_READINGS_PER_BATCH>")]
    pub refused: Vec<RefusedReadings>,
}

/// Readings of one sensor a server did not accept, and why.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RefusedReadings {
    pub sensor_id: u32,
    pub reason: Refusal,
    pub count: u32,
}

/// The server has counted every reading of `(sensor_id, incarnation)` with
/// `seq < next_seq`, and in addition the ones in `also`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SensorAck {
    pub sensor_id: u32,
    pub incarnation: u64,
    pub next_seq: u64,
    #[serde(deserialize_with = "bounded::vec::<_, _, MAX_READINGS_PER_BATCH>")]
    pub also: Vec<u64>,
}

/// Moves a sensor to `to` in the server's average stream.
///
/// With `rewind_to: Some(r)` the sensor's cursor lies on a branch that a
/// server published while cut off from its peer and that the surviving log
/// does not contain: the averages it applied after seq `r` are superseded.
/// Averages between the (rewound) position and `to` are no longer retained:
/// the sensor missed them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reposition {
    pub sensor_id: u32,
    pub rewind_to: Option<u64>,
    pub to: AverageCursor,
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

/// What one server tells the other on its state channel.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum PeerMessage {
    /// Sent every heartbeat interval.
    Heartbeat(PeerHeartbeat),
    /// Active to passive: log entries to apply, in order.
    Records { epoch: u64, entries: Vec<LogEntry> },
    /// Passive to active: every entry up to `durable` is applied and durable.
    Ack { epoch: u64, durable: u64 },
    /// Passive to active: send me a snapshot (the Clone pattern: a snapshot,
    /// then the entries that follow it).
    Join { epoch: u64 },
    /// Active to passive: part `part` (from 0) of `parts` of the replicated
    /// state as of entry `lsn`, each at most [`SNAPSHOT_PART_BYTES`]: a
    /// large site's state (half a million sensors' ledgers) does not fit
    /// in one frame.
    Snapshot { epoch: u64, lsn: u64, part: u32, parts: u32, state: Vec<u8> },
    /// A node that stepped down to the other: readings it acked while it
    /// served alone, which the other must count (idempotent by id).
    Merge { epoch: u64, id: u64, sensors: Vec<SensorBatch> },
    /// The readings of merge `id` are counted and durable.
    MergeAck { id: u64 },
}

/// A heartbeat on the Binary Star state channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerHeartbeat {
    pub state: NodeState,
    /// The highest epoch this node knows of.
    pub epoch: u64,
    /// The last log entry this node applied.
    pub lsn: u64,
    /// Whether this node could serve with what it has: a passive that is
    /// caught up, or any node that is not a passive.
    pub complete: bool,
    /// For an active node: whether it waits for its passive before acking
    /// (the passive is in sync).
    pub peer_in_sync: bool,
}

/// One entry of the replicated log of state changes: numbered, and stamped
/// with the epoch of the active node that wrote it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LogEntry {
    pub lsn: u64,
    pub epoch: u64,
    /// Written by a node that had no passive in sync: its readings must be
    /// merged into the other node should the pair have split.
    pub solo: bool,
    pub record: Record,
}

/// A state change. Applying the same records in the same order to the same
/// state gives the same state, on any node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Record {
    /// Readings accepted at `now_ms` (only the ones not counted before),
    /// and average cursors that changed (`average_cursor`).
    ReadingsAccepted { now_ms: u64, sensors: Vec<SensorBatch> },
    /// Windows due at `now_ms` were published; afterwards the next average
    /// seq is `next_seq` (a replica checks it got the same).
    AveragesPublished { now_ms: u64, next_seq: u64 },
    /// A takeover: from here on the log belongs to this epoch.
    EpochChanged { epoch: u64 },
    /// The cloud (JetStream) has everything the site owed it up to site
    /// sequence `through` (written by an active's uplink before
    /// `UplinkAcked`; still read from older logs).
    UplinkForwarded { through: u64 },
    /// The cloud's stream of the site ends at site item `through`, whose
    /// chain value is `chain`, and holds every item from `landed_from` to
    /// it (`through + 1`: only where it ends is known). Written by the
    /// active's uplink when JetStream has acked.
    UplinkAcked { through: u64, chain: u64, landed_from: u64 },
    /// Readings the cloud's stream holds in items of another history (a
    /// side that lost a split forwarded them): not to be forwarded again.
    /// Written before the `UplinkAdopted` they belong to.
    UplinkInCloud { readings: Vec<ReadingInCloud> },
    /// The cloud's stream holds this site's history up to site item `fork`,
    /// then items `fork + 1..=end` of another history (chain value `chain`
    /// at `end`), forwarded by a side that lost a split: this site's items
    /// after `fork` take site sequences after `end`, and the averages among
    /// the other history's items are superseded (a marker in the stream
    /// says so).
    UplinkAdopted { fork: u64, end: u64, chain: u64 },
}

/// Most readings in one `Record::UplinkInCloud`.
pub const MAX_IN_CLOUD_PER_RECORD: usize = 65_536;

/// A reading's identity in the cloud, and its time (it is forgotten once
/// past the dedup horizon, as the site forgets its ledgers).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ReadingInCloud {
    pub sensor_id: u32,
    pub incarnation: u64,
    pub seq: u64,
    pub timestamp_ms: u64,
}

/// A server's state, as `fog-server status` prints it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusReport {
    pub role: String,
    pub state: NodeState,
    pub epoch: u64,
    /// The last log entry applied, and the last one durable on disk.
    pub lsn: u64,
    pub durable_lsn: u64,
    /// How this node replicates right now.
    pub replication: Replication,
    /// For an active node: entries its passive has not yet made durable; for
    /// a passive: entries behind the active's last heartbeat.
    pub lag: u64,
    /// Readings accepted alone and not yet known to the peer.
    pub unconfirmed: u64,
    /// Unique readings counted.
    pub counted: u64,
    /// Readings received again and not counted again.
    pub duplicates: u64,
    pub averages_published: u64,
    pub revisions_published: u64,
    /// The newest average published: the end of the stream every sensor
    /// converges on.
    pub last_average: Option<AverageCursor>,
    /// The retained averages' positions, oldest first, preceded by the
    /// position just before them: what a sensor's final cursor is checked
    /// against.
    pub average_chain: Vec<AverageCursor>,
    /// Readings older than the window horizon: counted, in no average.
    pub too_late: u64,
    /// Readings older than the dedup horizon: acked, never counted. Per
    /// node: every node that applies the log entry carrying one (a passive
    /// replicating it, a node recovering or catching up) counts it again.
    pub expired: u64,
    /// Sensor incarnations silent for longer than the dedup horizon, whose
    /// dedup state was compacted away; their readings stay in `counted`
    /// but no longer appear in `per_sensor`.
    pub retired_incarnations: u64,
    /// Frames dropped undecodable (the same count as `refused.malformed`).
    pub malformed_frames: u64,
    /// Replies dropped because the client did not take them (it stopped
    /// reading, or went away); it resends, nothing acked is lost.
    pub replies_dropped: u64,
    /// Requests and readings refused, per reason.
    pub refused: RefusedCounts,
    /// Epochs claimed by hosts or sensor cursors without a valid seal (or
    /// at or above [`MAX_EPOCH`]): ignored, never a reason to step down.
    pub forged_epochs: u64,
    pub batches: u64,
    pub peer_alive: bool,
    pub per_sensor: Vec<SensorCount>,
    /// The uplink to the cloud, when the pair runs one.
    pub uplink: Option<UplinkReport>,
}

/// The uplink's state, as `fog-server status` shows it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct UplinkReport {
    /// The JetStream stream the site forwards to.
    pub stream: String,
    /// Connected to NATS and forwarding (the active only).
    pub connected: bool,
    /// Items (readings and averages) not yet in the cloud, their bytes, and
    /// the age of the oldest in milliseconds.
    pub backlog_items: u64,
    pub backlog_bytes: u64,
    pub oldest_ms: u64,
    /// Every item up to this site sequence is in the cloud; the last site
    /// sequence given out.
    pub forwarded_through: u64,
    pub last_seq: u64,
    /// Items dropped unforwarded at the backlog bound.
    pub dropped: u64,
    /// Items of another history the stream held (forwarded by a side that
    /// lost a split) that this site took over, and the times it did.
    pub adopted_items: u64,
    pub adoptions: u64,
    /// Messages this node published and had acked since it started.
    pub messages: u64,
    /// The last error, if any.
    pub last_error: String,
}

/// How many requests or readings a server refused, per [`Refusal`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RefusedCounts {
    pub malformed: u64,
    pub too_large: u64,
    pub not_authorized: u64,
    pub foreign_sensor: u64,
    pub from_the_future: u64,
    pub seq_out_of_range: u64,
    pub busy: u64,
}

impl RefusedCounts {
    /// The counter of `reason`.
    pub fn of(&mut self, reason: Refusal) -> &mut u64 {
        match reason {
            Refusal::Malformed => &mut self.malformed,
            Refusal::TooLarge => &mut self.too_large,
            Refusal::NotAuthorized => &mut self.not_authorized,
            Refusal::ForeignSensor => &mut self.foreign_sensor,
            Refusal::FromTheFuture => &mut self.from_the_future,
            Refusal::SeqOutOfRange => &mut self.seq_out_of_range,
            Refusal::Busy => &mut self.busy,
        }
    }

    /// Adds `n` refusals for `reason` (saturating: a counter, not a sum
    /// anyone relies on past 2^64).
    pub fn add(&mut self, reason: Refusal, n: u64) {
        let c = self.of(reason);
        *c = c.saturating_add(n);
    }
}

/// How a server replicates right now, as its status reports it (JSON:
/// `in-sync`, `passive-joining`, `alone`, `merging`, `caught-up`,
/// `catching-up`, `waiting-for-peer`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Replication {
    /// Active, and the passive has made the state durable: every ack waits
    /// for the passive's disk too.
    InSync,
    /// Active; a passive joined and its snapshot is not yet durable.
    PassiveJoining,
    /// Active without a passive in sync: acks are durable on this node only.
    Alone,
    /// Passive, handing the readings it accepted alone to the active.
    Merging,
    /// Passive with every entry of the active: may take over.
    CaughtUp,
    /// Passive, still receiving the active's state: may not take over.
    CatchingUp,
    /// Neither active nor passive: has not heard its peer yet.
    WaitingForPeer,
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
    /// A list longer than the protocol allows, refused on its length
    /// before it was read.
    #[error("{0}")]
    ListTooLong(String),
    /// A reply no honest server sends: more entries than a batch can
    /// bring back, or a value past the protocol's ranges.
    #[error("reply out of bounds: {0}")]
    ReplyOutOfBounds(String),
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

/// [`decode`] with at most `elements` elements in all the message's
/// bounded lists (see [`bounded`]).
fn decode_within<'a, T: Deserialize<'a>>(frame: &'a [u8], elements: usize) -> Result<T, DecodeError> {
    match bounded::within(elements, || decode(frame)) {
        (Err(_), Some(over)) => Err(DecodeError::ListTooLong(over.to_string())),
        (msg, _) => msg,
    }
}

/// Elements a request's lists may hold in all: its sensors and their
/// readings.
const REQUEST_ELEMENTS: usize = MAX_SENSORS_PER_BATCH + MAX_READINGS_PER_BATCH;
/// Elements a reply's lists may hold in all: acks and their selective
/// acks, averages, repositions and refusals.
const REPLY_ELEMENTS: usize = 2 * MAX_SENSORS_PER_BATCH + 2 * MAX_READINGS_PER_BATCH + MAX_AVERAGES_PER_REPLY;

/// Decodes a request and checks its limits. A list past them is refused
/// on its length, before anything is allocated for it.
pub fn decode_request(frame: &[u8]) -> Result<Request, DecodeError> {
    let req: Request = decode_within(frame, REQUEST_ELEMENTS)?;
    // Each list is within its bound already; the readings of all the
    // sensors together are checked here.
    if let Request::Batch { sensors, .. } = &req {
        let n: usize = sensors.iter().map(|s| s.readings.len()).sum();
        if n > MAX_READINGS_PER_BATCH {
            return Err(DecodeError::TooManyReadings(n));
        }
    }
    Ok(req)
}

/// Decodes a server's reply and checks that it is one an honest server
/// could send: no more acks, refusals or repositions than a batch has
/// sensors or readings, no more selective acks than it has readings, no
/// more than [`MAX_AVERAGES_PER_REPLY`] averages, and seqs and epochs
/// within [`MAX_SEQ`] and [`MAX_EPOCH`]. A host drops anything else before
/// it reaches a sensor. Lists are refused on their length before anything
/// is allocated for them, and a status report (which a host never asks
/// for, and whose lists are a server's whole state) before it is read.
pub fn decode_reply(frame: &[u8]) -> Result<Reply, DecodeError> {
    // The variant index leads the message: Reply::Status is 2.
    if frame.len() > 1 && frame[0] == PROTOCOL_VERSION && frame[1] == STATUS_VARIANT {
        return Err(DecodeError::ReplyOutOfBounds("a status report, which a host does not ask for".into()));
    }
    let reply: Reply = decode_within(frame, REPLY_ELEMENTS)?;
    check_reply(&reply).map_err(DecodeError::ReplyOutOfBounds)?;
    Ok(reply)
}

fn check_reply(reply: &Reply) -> Result<(), String> {
    let over = |what: &str, n: usize, max: usize| -> Result<(), String> {
        if n > max { Err(format!("{n} {what}, at most {max}")) } else { Ok(()) }
    };
    let epoch = |what: &str, e: u64| -> Result<(), String> {
        if e >= MAX_EPOCH { Err(format!("{what} epoch {e} is not below 2^62")) } else { Ok(()) }
    };
    let seq = |what: &str, s: u64| -> Result<(), String> {
        if s > MAX_SEQ { Err(format!("{what} {s} is above 2^53")) } else { Ok(()) }
    };
    match reply {
        Reply::Batch(b) => {
            // Each list is within its bound already (see `bounded`); the
            // selective acks of all the acks together are checked here.
            epoch("the reply's", b.epoch)?;
            let also: usize = b.acks.iter().map(|a| a.also.len()).sum();
            over("selective acks", also, MAX_READINGS_PER_BATCH)?;
            for a in &b.acks {
                seq("an ack's next seq", a.next_seq)?;
                if let Some(&s) = a.also.iter().find(|&&s| s >= MAX_SEQ) {
                    return Err(format!("a selective ack's seq {s} is not below 2^53"));
                }
            }
            for a in &b.averages {
                seq("an average's seq", a.seq)?;
                epoch("an average's", a.epoch)?;
            }
            for r in &b.repositions {
                seq("a reposition's seq", r.to.seq)?;
                epoch("a reposition's", r.to.epoch)?;
                if let Some(back) = r.rewind_to {
                    seq("a reposition's rewind point", back)?;
                }
            }
            Ok(())
        }
        Reply::NotActive { epoch: e, .. } => epoch("the server's", *e),
        Reply::Status(_) | Reply::Refused { .. } => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Request {
        Request::Batch {
            batch_id: 7,
            epoch: 3,
            seal: [7; 16],
            sensors: vec![SensorBatch {
                sensor_id: 3,
                incarnation: 0xdead_beef,
                segment: 0,
                readings: vec![Reading { seq: 0, speed_kmh: 97, timestamp_ms: 1_700_000_000_000 }],
                average_cursor: Some(AverageCursor { seq: 12, epoch: 3, chain: 0xfeed }),
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

    fn honest_reply() -> BatchReply {
        BatchReply {
            batch_id: 9,
            epoch: 3,
            seal: [1; 16],
            acks: vec![SensorAck { sensor_id: 3, incarnation: 5, next_seq: 10, also: vec![12, 14] }],
            averages: vec![Average { seq: 4, epoch: 3, segment: 0, window_end_ms: 1_700_000_000_000, count: 2, sum_kmh: 180, revision: 0, chain: 77 }],
            repositions: vec![Reposition { sensor_id: 3, rewind_to: Some(2), to: AverageCursor { seq: 3, epoch: 3, chain: 5 } }],
            refused: vec![RefusedReadings { sensor_id: 3, reason: Refusal::FromTheFuture, count: 1 }],
        }
    }

    fn out_of_bounds(reply: BatchReply) -> String {
        match decode_reply(&encode(&Reply::Batch(reply)).unwrap()) {
            Err(DecodeError::ReplyOutOfBounds(why) | DecodeError::ListTooLong(why)) => why,
            other => panic!("accepted a reply out of bounds: {other:?}"),
        }
    }

    #[test]
    fn the_status_variant_is_the_one_a_host_refuses_unread() {
        // Variants are numbered in declaration order: Status sits between
        // NotActive and Refused.
        let not_active = encode(&Reply::NotActive { state: NodeState::Passive, epoch: 1, seal: [0; 16] }).unwrap();
        let refused = encode(&Reply::Refused { batch_id: 1, reason: Refusal::Busy }).unwrap();
        assert_eq!((not_active[1], refused[1]), (STATUS_VARIANT - 1, STATUS_VARIANT + 1));
        assert!(decode_reply(&refused).is_ok() && decode_reply(&not_active).is_ok());
    }

    #[test]
    fn a_reply_past_what_an_honest_server_sends_is_refused() {
        let frame = encode(&Reply::Batch(honest_reply())).unwrap();
        assert_eq!(decode_reply(&frame).unwrap(), Reply::Batch(honest_reply()));
        let ack = |also: Vec<u64>| SensorAck { sensor_id: 1, incarnation: 1, next_seq: 1, also };
        let average = honest_reply().averages[0];
        let cases: Vec<(BatchReply, &str)> = vec![
            (BatchReply { epoch: MAX_EPOCH, ..honest_reply() }, "the reply's epoch"),
            (BatchReply { acks: vec![ack(vec![]); MAX_SENSORS_PER_BATCH + 1], ..honest_reply() }, "65537 elements, at most 65536"),
            (BatchReply { acks: vec![ack(vec![1; MAX_READINGS_PER_BATCH / 2 + 1]); 2], ..honest_reply() }, "selective acks"),
            (BatchReply { acks: vec![SensorAck { next_seq: MAX_SEQ + 1, ..ack(vec![]) }], ..honest_reply() }, "next seq"),
            (BatchReply { acks: vec![ack(vec![3, MAX_SEQ])], ..honest_reply() }, "selective ack's seq"),
            (BatchReply { averages: vec![average; MAX_AVERAGES_PER_REPLY + 1], ..honest_reply() }, "4097 elements, at most 4096"),
            (BatchReply { averages: vec![Average { seq: u64::MAX, ..average }], ..honest_reply() }, "an average's seq"),
            (BatchReply { averages: vec![Average { epoch: u64::MAX, ..average }], ..honest_reply() }, "an average's epoch"),
            (
                BatchReply { repositions: vec![Reposition { sensor_id: 1, rewind_to: Some(u64::MAX), to: AverageCursor::default() }], ..honest_reply() },
                "rewind point",
            ),
            (
                BatchReply {
                    repositions: vec![Reposition { sensor_id: 1, rewind_to: None, to: AverageCursor { seq: MAX_SEQ + 1, epoch: 1, chain: 0 } }],
                    ..honest_reply()
                },
                "a reposition's seq",
            ),
            (
                BatchReply {
                    repositions: vec![Reposition { sensor_id: 1, rewind_to: None, to: AverageCursor { seq: 1, epoch: MAX_EPOCH, chain: 0 } }],
                    ..honest_reply()
                },
                "a reposition's epoch",
            ),
            (
                BatchReply {
                    repositions: vec![Reposition { sensor_id: 1, rewind_to: None, to: AverageCursor::default() }; MAX_SENSORS_PER_BATCH + 1],
                    ..honest_reply()
                },
                "65537 elements, at most 65536",
            ),
        ];
        for (reply, what) in cases {
            let why = out_of_bounds(reply);
            assert!(why.contains(what), "refused for {why:?}, expected {what:?}");
        }
        // At the caps themselves: accepted.
        let at_caps = BatchReply {
            acks: vec![ack(vec![MAX_SEQ - 1; MAX_READINGS_PER_BATCH / 2]); 2],
            averages: vec![Average { seq: MAX_SEQ, epoch: MAX_EPOCH - 1, ..average }; MAX_AVERAGES_PER_REPLY],
            ..honest_reply()
        };
        assert!(decode_reply(&encode(&Reply::Batch(at_caps)).unwrap()).is_ok());
        let not_active = Reply::NotActive { state: NodeState::Passive, epoch: u64::MAX, seal: [0; 16] };
        assert!(matches!(decode_reply(&encode(&not_active).unwrap()), Err(DecodeError::ReplyOutOfBounds(_))));
    }

    #[test]
    fn a_garbled_reply_is_an_error_not_a_panic() {
        let good = encode(&Reply::Batch(honest_reply())).unwrap();
        for cut in 0..good.len() {
            assert!(decode_reply(&good[..cut]).is_err(), "truncated at {cut}");
        }
        for i in 1..good.len() {
            for flip in [0x01, 0x80, 0xff] {
                let mut f = good.clone();
                f[i] ^= flip;
                let _ = decode_reply(&f);
            }
        }
        // Declared lengths far beyond the frame: an error, no allocation.
        let _ = decode_reply(&[PROTOCOL_VERSION, 0, 9, 3, 0xff, 0xff, 0xff, 0xff, 0x0f]);
    }
}
