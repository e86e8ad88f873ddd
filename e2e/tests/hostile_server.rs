//! A hostile *server* against a real `fog-host`. The host is the real
//! binary running the real sensor component with CurveZMQ keys; the party
//! it talks to first is a fake server written here: a libzmq ROUTER that
//! holds the primary's real keypair (so the host's CURVE handshake trusts
//! it: the attacker stole the key, or took over the primary's endpoint)
//! and is bound on the primary's frontend after the real primary was
//! killed. The real backup, a caught-up passive of the real pair, stays on
//! the backup endpoint for the host to fail over to.
//!
//! The fake reads the host's batches and answers each with hostile
//! traffic, then with one reply to that batch that is within every bound
//! and acks nothing (so the host keeps talking to it). In turn:
//!
//! 1. garbage: random bytes, empty frames, undecodable frames of 6 MiB,
//!    truncated replies, replies with trailing bytes, extra multipart
//!    frames;
//! 2. lies: well-formed replies that would lose readings or move the
//!    sensors off the real average stream if the host applied them (acks
//!    of every reading of every sensor it heard of, chained forged
//!    averages, repositions to seq 2^53), under batch ids the host never
//!    sent, and the same under the right batch id with one value past
//!    what an honest server sends (seqs above 2^53, epochs at 2^62 and
//!    `u64::MAX`, 4 097 averages, 65 537 acks, too many selective acks, a
//!    `NotActive` at epoch 2^62); its in-bound replies claim an epoch just
//!    below 2^62 under a seal it made up, ack sensors the host does not
//!    run and incarnations its sensors do not have, and refuse readings;
//! 3. a flood: as many unsolicited frames of those kinds as the host
//!    takes, for a few seconds, then frames of 6 and 15 MiB that are
//!    rejected at their first bytes or after a short reply;
//! 4. a frame past the host's 16 MiB message limit; then it closes.
//!
//! [`a_host_survives_a_hostile_server_with_the_primarys_key_and_loses_nothing`]
//! proves that the host survives it and loses nothing: it never panics,
//! its resident memory stays under [`MAX_HOST_RSS_MIB`] throughout, it
//! counts the frames it could not use as bad replies (thousands, never
//! more than the fake sent such frames) and logs that once, not per frame,
//! it fails over to the real backup, and in the end the backup counts
//! every reading the host's sensors made exactly once (per sensor, count
//! and speed sum), every reading is acked, no sensor failed, and every
//! sensor ends on the real server's average stream with no average
//! superseded or missed: none applied an average the fake sent.
//!
//! [`a_flood_of_replies_that_decode_into_huge_lists_keeps_the_host_bounded`]
//! floods the host with 16 MiB replies whose lists would decode into 16.7
//! million selective acks or 2.1 million averages (134 MB and a tenth of a
//! second each, were they decoded whole before their bounds are checked),
//! and holds the host to the same memory bound. The host refuses such a
//! list on its length prefix, and its queues are bounded in bytes as well
//! as messages (libzmq's high-water mark on the link, the transport's
//! queue, the loop's channel). It still checks that nothing was lost.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, mpsc};
use std::time::{Duration, Instant};

use fog_protocol::{
    Average, AverageCursor, BatchReply, MAX_AVERAGES_PER_REPLY, MAX_EPOCH, MAX_FRAME_BYTES, MAX_READINGS_PER_BATCH, MAX_SENSORS_PER_BATCH, MAX_SEQ,
    NodeState, PROTOCOL_VERSION, Refusal, RefusedReadings, Reply, Reposition, Request, SensorAck, decode_request, encode,
};
use fog_testkit::history::{Observation, check, host_side, server_side};
use fog_testkit::{
    Pair, PairKeys, Proc, check_counts, finish_host, is_active, is_caught_up, log_lines_with, rss_mib, scratch_dir, start_host,
    start_keyed_server, status_when_as,
};
use fog_transport::Keypair;
use serde_json::Value;

/// Server flags: short lateness, so averages flow in a short run.
const SERVER_FLAGS: &[&str] = &["--lateness", "200ms"];
/// The host's sensors, ids 1..=20, and the rights of its key.
const HOST_SENSORS: u64 = 20;
const HOST_RIGHTS: &str = "sensors=1-20";
/// How long the host generates readings after the fake's last phase (on
/// the real backup).
const AFTER_THE_FAKE: Duration = Duration::from_secs(6);
/// The fake's phases in the main test, each from the end of the last.
const MAIN_PLAN: &[(Phase, Duration)] = &[
    (Phase::Garbage, Duration::from_millis(2500)),
    (Phase::Lies, Duration::from_millis(3000)),
    (Phase::Flood, Duration::from_millis(2500)),
    (Phase::BigFlood, Duration::from_millis(2500)),
];
/// The phases of the test of replies that decode into huge lists.
const BOMB_PLAN: &[(Phase, Duration)] = &[(Phase::Lies, Duration::from_millis(1000)), (Phase::Bombs, Duration::from_millis(5000))];
/// Resident memory the host may reach under the attack: it peaked at
/// 55-95 MiB under the main test's attack (a frame being decoded is up to
/// 16 MiB, and 16 MiB frames are on their way). 256 MiB leaves room for
/// that several times over, and none for frames queued without bound.
const MAX_HOST_RSS_MIB: f64 = 256.0;
/// The fake's send queue per connection: small, so that the flood goes as
/// fast as the host reads and the test process does not hold gigabytes of
/// big frames queued.
const FAKE_SNDHWM: i32 = 8;
/// Longest the fake tries to get its in-range reply to a batch out before
/// it takes the host for gone (its deadline to answer is the host's
/// `--timeout`, 1 s).
const MUST_SEND_FOR: Duration = Duration::from_millis(1500);
/// A batch id the host never reaches in a run of this length.
const FAR_AHEAD: u64 = 1_000_000;

fn u(v: &Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not a number: {v}"))
}

/// A field (`VmRSS:`, `VmHWM:`) of /proc/PID/status in MiB.
fn proc_mib(pid: u32, field: &str) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib: f64 = status.lines().find(|l| l.starts_with(field))?.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

fn random_bytes(n: usize) -> Vec<u8> {
    let mut bytes = vec![0u8; n];
    rand::fill(&mut bytes[..]);
    bytes
}

fn random_seal() -> [u8; 16] {
    rand::random()
}

/// Random bytes that can never decode: the first one is not the protocol
/// version.
fn garbage(n: usize) -> Vec<u8> {
    let mut bytes = random_bytes(n.max(1));
    bytes[0] = 0x17;
    bytes
}

/// The protocol version, then a variant no `Reply` has, then random bytes.
fn bad_variant(n: usize) -> Vec<u8> {
    let mut bytes = random_bytes(n.max(2));
    bytes[0] = PROTOCOL_VERSION;
    bytes[1] = 0x7f;
    bytes
}

fn frame(reply: &Reply) -> Vec<u8> {
    encode(reply).expect("a reply the fake builds fits a frame")
}

/// What the fake sends in one go: one message (one frame, or several),
/// and whether the host must count it as a bad reply (it cannot be
/// decoded, or says what no honest server says) or ignore it silently (a
/// reply to a batch it did not send, a refusal, a message of several
/// frames).
struct Shot {
    frames: Vec<Vec<u8>>,
    bad_reply: bool,
}

impl Shot {
    fn bad(frame: Vec<u8>) -> Shot {
        Shot { frames: vec![frame], bad_reply: true }
    }
    fn ignored(frames: Vec<Vec<u8>>) -> Shot {
        Shot { frames, bad_reply: false }
    }
}

/// The phases of the fake, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Phase {
    Garbage,
    Lies,
    /// Small frames, unsolicited.
    Flood,
    /// Big frames that are rejected at once, unsolicited.
    BigFlood,
    /// Big frames whose lists decode into hundreds of MiB, unsolicited.
    Bombs,
}

/// What the fake did, for the checks.
#[derive(Debug, Default)]
struct FakeReport {
    /// Batches of the host answered in each phase.
    batches: BTreeMap<Phase, u64>,
    /// Messages queued to the host that it must count as bad replies, and
    /// those it must ignore.
    bad_replies_sent: u64,
    ignored_sent: u64,
    /// Unsolicited frames queued to the host, per phase, and how often the
    /// host's queue was full (the fake waited).
    flooded: BTreeMap<Phase, u64>,
    pushback: u64,
    /// Hostile frames of 1 MiB or more queued to the host, in any phase.
    big_frames: u64,
    /// When the fake found the host gone (it failed over), if it did
    /// before the end, in seconds from the host's first batch.
    host_left: Option<(Phase, f64)>,
    /// The frame past the host's message limit went out.
    oversized_sent: bool,
    /// Every sensor the host named so far, with its incarnation.
    sensors: BTreeMap<u32, u64>,
    elapsed_s: f64,
}

/// One batch request as the fake reads it.
struct Batch {
    batch_id: u64,
    /// The sensors it names, with their incarnations.
    named: Vec<(u32, u64)>,
}

/// The fake server: a ROUTER with the primary's keypair.
struct Fake {
    socket: zmq::Socket,
    _ctx: zmq::Context,
    /// The routing id of the host's connection, once it sent a batch.
    peer: Option<Vec<u8>>,
    report: FakeReport,
    began: Instant,
    phase: Phase,
}

enum SendOutcome {
    Sent,
    /// The host's queue is full.
    Full,
    /// The host's connection is gone.
    Gone,
}

impl Fake {
    /// Binds a CURVE server ROUTER on `endpoint` with `keys`: no ZAP
    /// handler, so any client key is let in, as the host's is.
    fn bind(endpoint: &str, keys: &Keypair) -> anyhow::Result<Fake> {
        let ctx = zmq::Context::new();
        let socket = ctx.socket(zmq::ROUTER)?;
        socket.set_linger(0)?;
        socket.set_sndhwm(FAKE_SNDHWM)?;
        // A send to a full or gone host fails instead of being dropped,
        // so the fake knows what it delivered.
        socket.set_router_mandatory(true)?;
        socket.set_curve_server(true)?;
        socket.set_curve_secretkey(&keys.secret.0)?;
        socket.bind(endpoint)?;
        Ok(Fake {
            socket,
            _ctx: ctx,
            peer: None,
            report: FakeReport::default(),
            began: Instant::now(),
            phase: Phase::Garbage,
        })
    }

    fn at_s(&self) -> f64 {
        self.began.elapsed().as_secs_f64()
    }

    /// The next batch of the host within `wait`, noting its sensors and
    /// the connection it came on.
    fn next_batch(&mut self, wait: Duration) -> Option<Batch> {
        let deadline = Instant::now() + wait;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let ready = self.socket.poll(zmq::POLLIN, i64::try_from(left.as_millis()).unwrap_or(i64::MAX)).unwrap_or(0);
            if ready > 0 {
                if let Ok(mut frames) = self.socket.recv_multipart(zmq::DONTWAIT) {
                    if frames.len() == 2 {
                        let payload = frames.pop().expect("two frames");
                        let peer = frames.pop().expect("two frames");
                        if let Ok(Request::Batch { batch_id, sensors, .. }) = decode_request(&payload) {
                            self.peer = Some(peer);
                            let named: Vec<(u32, u64)> = sensors.iter().map(|s| (s.sensor_id, s.incarnation)).collect();
                            self.report.sensors.extend(named.iter().copied());
                            *self.report.batches.entry(self.phase).or_default() += 1;
                            return Some(Batch { batch_id, named });
                        }
                    }
                }
                continue;
            }
            if Instant::now() >= deadline {
                return None;
            }
        }
    }

    /// Tries once to queue `frames` as one message to the host.
    fn try_send(&mut self, frames: &[Vec<u8>]) -> SendOutcome {
        let Some(peer) = self.peer.clone() else { return SendOutcome::Gone };
        let mut parts: Vec<&[u8]> = vec![&peer];
        parts.extend(frames.iter().map(Vec::as_slice));
        match self.socket.send_multipart(parts, zmq::DONTWAIT) {
            Ok(()) => SendOutcome::Sent,
            Err(zmq::Error::EAGAIN) => SendOutcome::Full,
            Err(_) => {
                // EHOSTUNREACH: the host dropped this connection.
                if self.report.host_left.is_none() {
                    self.report.host_left = Some((self.phase, self.at_s()));
                }
                self.peer = None;
                SendOutcome::Gone
            }
        }
    }

    /// Queues `frames` as one message, waiting while the host's queue is
    /// full, at most [`MUST_SEND_FOR`]; whether it went out.
    fn deliver(&mut self, frames: &[Vec<u8>]) -> bool {
        let deadline = Instant::now() + MUST_SEND_FOR;
        loop {
            match self.try_send(frames) {
                SendOutcome::Sent => return true,
                SendOutcome::Gone => return false,
                SendOutcome::Full if Instant::now() >= deadline => return false,
                SendOutcome::Full => {
                    self.report.pushback += 1;
                    std::thread::sleep(Duration::from_micros(200));
                }
            }
        }
    }

    /// Notes a hostile message that went out.
    fn sent(&mut self, shot: &Shot) {
        self.report.big_frames += shot.frames.iter().filter(|f| f.len() >= 1 << 20).count() as u64;
        if shot.bad_reply {
            self.report.bad_replies_sent += 1;
        } else {
            self.report.ignored_sent += 1;
        }
    }

    /// Forged averages `1..=n` of segment 0, chained as a server chains
    /// them (a fresh sensor would apply them), at 500 km/h.
    fn forged_averages(n: u64) -> Vec<Average> {
        let mut prev = 0;
        (1..=n)
            .map(|seq| {
                let mut a = Average { seq, epoch: 1, segment: 0, window_end_ms: seq * 1000, count: 1, sum_kmh: 500, revision: 0, chain: 0 };
                a.chain = a.link(prev);
                prev = a.chain;
                a
            })
            .collect()
    }

    /// A reply within every bound that, applied, would ack every reading
    /// of every sensor the host named so far (readings the real servers
    /// never counted), give them forged averages, and move them to seq
    /// 2^53 of the average stream.
    fn lethal(&self, batch_id: u64) -> BatchReply {
        BatchReply {
            batch_id,
            epoch: 1,
            seal: random_seal(),
            acks: self
                .report
                .sensors
                .iter()
                .map(|(&sensor_id, &incarnation)| SensorAck { sensor_id, incarnation, next_seq: MAX_SEQ, also: vec![MAX_SEQ - 1] })
                .collect(),
            averages: Self::forged_averages(8),
            repositions: self
                .report
                .sensors
                .keys()
                .map(|&sensor_id| Reposition { sensor_id, rewind_to: Some(0), to: AverageCursor { seq: MAX_SEQ, epoch: 1, chain: 0xbad } })
                .collect(),
            refused: Vec::new(),
        }
    }

    /// The lethal reply to `batch_id` with one value past what an honest
    /// server sends, in each way the protocol bounds a reply, and
    /// `NotActive` at epochs no pair reaches: each must be dropped whole.
    fn out_of_bounds(&self, batch_id: u64) -> Vec<Reply> {
        let base = self.lethal(batch_id);
        let mut replies = Vec::new();
        let mut with = |change: &dyn Fn(&mut BatchReply)| {
            let mut r = base.clone();
            change(&mut r);
            replies.push(Reply::Batch(r));
        };
        with(&|r| r.acks.iter_mut().for_each(|a| a.next_seq = u64::MAX));
        with(&|r| r.acks.iter_mut().for_each(|a| a.next_seq = MAX_SEQ + 1));
        with(&|r| r.acks.iter_mut().for_each(|a| a.also = vec![MAX_SEQ]));
        with(&|r| r.epoch = MAX_EPOCH);
        with(&|r| r.epoch = u64::MAX);
        with(&|r| r.averages = Self::forged_averages(MAX_AVERAGES_PER_REPLY as u64 + 1));
        with(&|r| r.averages.iter_mut().for_each(|a| a.epoch = MAX_EPOCH));
        with(&|r| r.averages[0].seq = u64::MAX);
        with(&|r| r.repositions.iter_mut().for_each(|p| p.to.seq = MAX_SEQ + 1));
        with(&|r| r.repositions.iter_mut().for_each(|p| p.rewind_to = Some(u64::MAX)));
        with(&|r| r.repositions.iter_mut().for_each(|p| p.to.epoch = MAX_EPOCH));
        with(&|r| {
            // 65 537 acks: the named sensors' lethal ones, repeated.
            let lethal = r.acks.clone();
            r.acks = lethal.iter().cycle().take(MAX_SENSORS_PER_BATCH + 1).cloned().collect();
        });
        with(&|r| {
            // More selective acks than a batch has readings.
            let each = MAX_READINGS_PER_BATCH / r.acks.len().max(1) + 1;
            r.acks.iter_mut().for_each(|a| a.also = (0..each as u64).collect());
        });
        replies.push(Reply::NotActive { state: NodeState::Passive, epoch: MAX_EPOCH, seal: random_seal() });
        replies.push(Reply::NotActive { state: NodeState::Active, epoch: u64::MAX, seal: random_seal() });
        replies
    }

    /// The reply that answers batch `b` within every bound and changes
    /// nothing a sensor keeps: it claims an epoch just below 2^62 under a
    /// made-up seal, acks every sensor the host named with an incarnation
    /// none of them has (sensors the batch did not name too), acks and
    /// repositions a thousand sensors the host does not run, and refuses
    /// u32::MAX readings of each sensor the batch named (a host keeps
    /// refused readings).
    fn answer(&self, b: &Batch) -> Reply {
        let strangers = (0..1000u32).map(|k| 1_000_000 + k);
        let mut acks: Vec<SensorAck> = self
            .report
            .sensors
            .iter()
            .map(|(&sensor_id, &incarnation)| SensorAck { sensor_id, incarnation: !incarnation, next_seq: MAX_SEQ, also: vec![0, 1, 2] })
            .collect();
        acks.extend(strangers.clone().map(|sensor_id| SensorAck { sensor_id, incarnation: 1, next_seq: MAX_SEQ, also: Vec::new() }));
        Reply::Batch(BatchReply {
            batch_id: b.batch_id,
            epoch: MAX_EPOCH - 1,
            seal: random_seal(),
            acks,
            averages: Vec::new(),
            repositions: strangers
                .map(|sensor_id| Reposition { sensor_id, rewind_to: Some(0), to: AverageCursor { seq: MAX_SEQ, epoch: MAX_EPOCH - 1, chain: 7 } })
                .collect(),
            refused: b.named.iter().map(|&(sensor_id, _)| RefusedReadings { sensor_id, reason: Refusal::FromTheFuture, count: u32::MAX }).collect(),
        })
    }

    /// Answers `b`: the phase's hostile messages, then the in-range reply.
    fn serve(&mut self, b: &Batch, n: u64) {
        let shots = match self.phase {
            Phase::Garbage => self.garbage_for(b, n),
            Phase::Lies => self.lies_for(b),
            Phase::Flood | Phase::BigFlood | Phase::Bombs => Vec::new(),
        };
        for shot in &shots {
            if !self.deliver(&shot.frames) {
                return;
            }
            self.sent(shot);
        }
        let answer = frame(&self.answer(b));
        self.deliver(&[answer]);
    }

    fn garbage_for(&self, b: &Batch, n: u64) -> Vec<Shot> {
        let lethal = frame(&Reply::Batch(self.lethal(b.batch_id)));
        let mut truncated = lethal.clone();
        truncated.pop();
        let mut trailing = lethal.clone();
        trailing.push(0);
        let mut shots = vec![
            Shot::bad(garbage(1 + rand::random::<u16>() as usize % 4096)),
            Shot::bad(Vec::new()),
            Shot::bad(bad_variant(1024)),
            Shot::bad(truncated),
            Shot::bad(trailing),
            // The lethal reply with a second frame: not a reply at all.
            Shot::ignored(vec![lethal.clone(), b"and one more frame".to_vec()]),
            Shot::ignored(vec![Vec::new(), Vec::new(), garbage(64)]),
            Shot::ignored(vec![frame(&Reply::Refused { batch_id: rand::random(), reason: Refusal::Busy })]),
        ];
        // Every third batch, 6 MiB: random, or the lethal reply followed by
        // 6 MiB of zeros.
        if n % 3 == 0 {
            shots.push(Shot::bad(bad_variant(6 << 20)));
        } else if n % 3 == 1 {
            let mut padded = lethal;
            padded.resize(padded.len() + (6 << 20), 0);
            shots.push(Shot::bad(padded));
        }
        shots
    }

    fn lies_for(&self, b: &Batch) -> Vec<Shot> {
        let mut shots: Vec<Shot> = [b.batch_id + FAR_AHEAD, 0, u64::MAX]
            .into_iter()
            .map(|id| Shot::ignored(vec![frame(&Reply::Batch(self.lethal(id)))]))
            .collect();
        shots.extend(self.out_of_bounds(b.batch_id).iter().map(|r| Shot::bad(frame(r))));
        shots
    }

    /// The unsolicited frames of the flood, small ones: every kind above.
    fn small_flood(&self) -> Vec<Shot> {
        let mut shots = vec![
            Shot::bad(garbage(100)),
            Shot::bad(Vec::new()),
            Shot::bad(bad_variant(200)),
            Shot::ignored(vec![frame(&Reply::Batch(self.lethal(FAR_AHEAD * 7)))]),
            Shot::ignored(vec![frame(&Reply::Refused { batch_id: FAR_AHEAD * 9, reason: Refusal::TooLarge })]),
            Shot::ignored(vec![garbage(10), garbage(10)]),
        ];
        // The small out-of-bounds replies (not the 4 097 averages nor the
        // 65 537 acks), to batch ids the host may have in flight.
        for (k, r) in self.out_of_bounds(1).into_iter().enumerate() {
            let big = matches!(&r, Reply::Batch(b) if b.averages.len() > 8 || b.acks.len() > self.report.sensors.len() || b.acks.iter().any(|a| a.also.len() > 1));
            if !big {
                let r = match r {
                    Reply::Batch(mut b) => {
                        b.batch_id = 1 + k as u64;
                        Reply::Batch(b)
                    }
                    other => other,
                };
                shots.push(Shot::bad(frame(&r)));
            }
        }
        shots
    }

    /// The big frames of the flood, each under the 16 MiB frame limit and
    /// rejected at its first bytes or after a short reply: random bytes
    /// of 6 and 15 MiB, and a lethal reply padded with 6 MiB of zeros.
    fn big_flood(&self) -> Vec<Shot> {
        let mut padded = frame(&Reply::Batch(self.lethal(2)));
        padded.resize(padded.len() + (6 << 20), 0);
        vec![Shot::bad(bad_variant(6 << 20)), Shot::bad(padded), Shot::bad(garbage(15 << 20))]
    }

    /// Replies of 16 MiB whose lists decode far larger than the frame: 16.7
    /// million selective acks of one byte each (8 bytes each decoded), and
    /// 2.1 million averages of eight bytes each (56 decoded). Both are
    /// out of bounds, so nothing of them reaches a sensor.
    fn bombs(&self) -> Vec<Shot> {
        let room = MAX_FRAME_BYTES - 4096;
        let acks = Reply::Batch(BatchReply {
            batch_id: 3,
            acks: vec![SensorAck { sensor_id: 1, incarnation: 1, next_seq: 0, also: vec![1; room - 64] }],
            ..BatchReply::default()
        });
        let one = Average { seq: 1, epoch: 1, segment: 0, window_end_ms: 1, count: 1, sum_kmh: 1, revision: 0, chain: 1 };
        let averages = Reply::Batch(BatchReply { batch_id: 4, averages: vec![one; (room - 64) / 8], ..BatchReply::default() });
        vec![Shot::bad(frame(&acks)), Shot::bad(frame(&averages))]
    }

    /// Floods the host with `shots`, round robin and as fast as it takes
    /// them, until `until`, answering its batches meanwhile.
    fn flood(&mut self, shots: &[Shot], until: Instant) {
        let mut k = 0;
        let mut n = 0;
        while Instant::now() < until && self.peer.is_some() {
            while let Some(b) = self.next_batch(Duration::ZERO) {
                n += 1;
                self.serve(&b, n);
            }
            let shot = &shots[k % shots.len()];
            match self.try_send(&shot.frames) {
                SendOutcome::Sent => {
                    k += 1;
                    self.sent(shot);
                    *self.report.flooded.entry(self.phase).or_default() += 1;
                }
                SendOutcome::Full => {
                    self.report.pushback += 1;
                    // Wait for room, or for a batch to answer.
                    let _ = self.socket.poll(zmq::POLLIN, 1);
                }
                SendOutcome::Gone => break,
            }
        }
    }

    /// Plays `plan` against the host from its first batch on, then sends a
    /// frame past the host's message limit; returns what it did. The
    /// socket closes when the fake is dropped.
    fn run(mut self, plan: &[(Phase, Duration)]) -> FakeReport {
        self.phase = plan[0].0;
        let Some(first) = self.next_batch(Duration::from_secs(30)) else {
            return self.report;
        };
        self.began = Instant::now();
        let mut n = 0;
        self.serve(&first, n);
        for &(phase, lasts) in plan {
            self.phase = phase;
            let until = Instant::now() + lasts;
            let flood = match phase {
                Phase::Garbage | Phase::Lies => None,
                Phase::Flood => Some(self.small_flood()),
                Phase::BigFlood => Some(self.big_flood()),
                Phase::Bombs => Some(self.bombs()),
            };
            if let Some(shots) = flood {
                self.flood(&shots, until);
                continue;
            }
            while Instant::now() < until && self.peer.is_some() {
                if let Some(b) = self.next_batch(until.saturating_duration_since(Instant::now())) {
                    n += 1;
                    self.serve(&b, n);
                }
            }
        }
        // Past the host's message limit: its libzmq drops the connection.
        if self.peer.is_some() && self.deliver(&[garbage(MAX_FRAME_BYTES + (4 << 20))]) {
            self.report.oversized_sent = true;
            std::thread::sleep(Duration::from_millis(300));
        }
        self.report.elapsed_s = self.at_s();
        self.report
    }
}

/// The tests run one at a time: a flood takes both cores of a small box.
fn serial() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The real backup, the host and what the fake did to it, once the fake
/// has closed.
struct Attacked {
    label: &'static str,
    started: Instant,
    dir: PathBuf,
    pair: Pair,
    keys: PairKeys,
    backup: Proc,
    host: Proc,
    report: FakeReport,
    /// The host's resident memory: the most sampled (every 20 ms), and its
    /// peak as the kernel saw it (VmHWM).
    rss_max: f64,
    rss_peak: f64,
}

/// Starts the real pair with keys, waits until the backup is a caught-up
/// passive, kills the primary, binds the fake on its frontend with its
/// keypair, starts the host (20 sensors, a reading each every 100 ms,
/// `--timeout` 1 s) and samples its memory while the fake plays `plan`.
fn attack(label: &'static str, plan: &'static [(Phase, Duration)]) -> Attacked {
    let started = Instant::now();
    let dir = scratch_dir(label).unwrap();
    let pair = Pair::on_free_ports().unwrap();
    let keys = PairKeys::generate(&dir, &[("host", HOST_RIGHTS)]).unwrap();
    let mut primary = start_keyed_server(&pair, true, SERVER_FLAGS, &dir, &keys).unwrap();
    let backup = start_keyed_server(&pair, false, SERVER_FLAGS, &dir, &keys).unwrap();
    status_when_as(&pair.backup_frontend, Some(&keys.admin_status(false)), "a caught-up passive", Duration::from_secs(15), is_caught_up).unwrap();
    primary.kill().unwrap();

    let (bound_tx, bound_rx) = mpsc::channel();
    let endpoint = pair.primary_frontend.clone();
    let primary_keys = keys.primary.pair.clone();
    let fake = std::thread::spawn(move || match Fake::bind(&endpoint, &primary_keys) {
        Ok(fake) => {
            let _ = bound_tx.send(Ok(()));
            fake.run(plan)
        }
        Err(e) => {
            let _ = bound_tx.send(Err(e));
            FakeReport::default()
        }
    });
    bound_rx.recv().unwrap().expect("the fake binds the primary's frontend");

    // The host generates through the fake's phases and a few seconds after.
    let duration = plan.iter().map(|&(_, d)| d).sum::<Duration>() + AFTER_THE_FAKE;
    let duration = format!("{}ms", duration.as_millis());
    let host_keys = keys.host_args("host").unwrap();
    let servers = pair.servers();
    let mut args = vec!["--sensors", "20", "--interval", "100ms", "--duration", &duration, "--servers", &servers, "--metrics-bind", "off"];
    args.extend(host_keys.iter().map(String::as_str));
    let host = start_host(&args, &dir).unwrap();
    let pid = host.child.id();
    eprintln!(
        "[{label}] pair up, primary killed, the fake on {} with its keys; host {pid} started after {:.1}s",
        pair.primary_frontend,
        started.elapsed().as_secs_f64()
    );

    let (mut rss_first, mut rss_max) = (None, 0.0f64);
    while !fake.is_finished() {
        if let Some(rss) = rss_mib(pid) {
            rss_first.get_or_insert(rss);
            rss_max = rss_max.max(rss);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let report = fake.join().expect("the fake does not panic");
    let rss_peak = proc_mib(pid, "VmHWM:").unwrap_or(f64::MAX);
    eprintln!(
        "[{label}] the fake played {:.1}s: batches answered per phase {:?}; unsolicited frames per phase {:?} \
         (the host's queue was full {} times); {} frames of 1 MiB or more; {} frames the host must count as bad replies and {} it must \
         ignore; it found the host gone: {:?}; the frame past the limit went out: {}",
        report.elapsed_s,
        report.batches,
        report.flooded,
        report.pushback,
        report.big_frames,
        report.bad_replies_sent,
        report.ignored_sent,
        report.host_left,
        report.oversized_sent
    );
    let rss_first = rss_first.unwrap_or(0.0);
    eprintln!("[{label}] host memory: {rss_first:.0} MiB when first seen, at most {rss_max:.0} MiB sampled, peak (VmHWM) {rss_peak:.0} MiB");
    Attacked { label, started, dir, pair, keys, backup, host, report, rss_max, rss_peak }
}

/// The times of the host's progress lines (`[   8.0s] ...`, one a second
/// while its loop turns), in seconds since it started.
fn progress_times(log: &Path) -> Vec<f64> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.strip_prefix('[')?.split_once("s]")?.0.trim().parse().ok())
        .collect()
}

impl Attacked {
    /// The host's memory stayed under the bound.
    fn assert_memory_bounded(&self) {
        let (label, max, peak) = (self.label, self.rss_max, self.rss_peak);
        assert!(max < MAX_HOST_RSS_MIB, "[{label}] the host grew to {max:.0} MiB (bound {MAX_HOST_RSS_MIB} MiB)");
        assert!(peak < MAX_HOST_RSS_MIB, "[{label}] the host's memory peaked at {peak:.0} MiB (bound {MAX_HOST_RSS_MIB} MiB)");
    }

    /// The host is alive and never panicked.
    fn assert_host_alive(&mut self) {
        let label = self.label;
        let exited = self.host.child.try_wait().unwrap();
        assert!(exited.is_none(), "[{label}] the host exited ({exited:?}) under the attack:\n{}", self.host.log_tail(30));
        for fatal in ["panicked", "memory allocation"] {
            assert_eq!(log_lines_with(&self.host.log, &[fatal]), 0, "[{label}] the host logged {fatal:?}:\n{}", self.host.log_tail(30));
        }
    }

    /// Lets the host drain on the real backup and checks the end: exit 0
    /// with every reading acked, no sensor failed, the backup active and
    /// counting exactly what the host generated per sensor, and every
    /// sensor on the backup's average stream with nothing superseded or
    /// missed. Returns the host's summary.
    fn drain_and_check(mut self) -> Value {
        let label = self.label;
        let log = self.host.log.clone();
        let (code, summary) = finish_host(self.host, Duration::from_secs(60)).unwrap();
        // Not checked (it is a matter of time): how long the host's loop
        // went without a turn, as its progress lines show.
        let (longest, at) = progress_times(&log).windows(2).map(|w| (w[1] - w[0], w[0])).fold((0.0f64, 0.0), |a, b| if b.0 > a.0 { b } else { a });
        eprintln!("[{label}] longest gap between the host's progress lines (one a second while its loop turns): {longest:.1}s, after the one at {at:.1}s");
        eprintln!(
            "[{label}] host: exit {code}, generated {}, acked {}, unacked {}, resent {}, bad_replies {}, failovers {}, batches acked {}, \
             averages received {} missed {} superseded {}, failed sensors {}",
            summary["generated"],
            summary["acked"],
            summary["unacked"],
            summary["resent"],
            summary["bad_replies"],
            summary["failovers"],
            summary["batches_acked"],
            summary["averages_received"],
            summary["averages_missed"],
            summary["averages_superseded"],
            summary["failed_sensors"]
        );
        assert_eq!(code, 0, "[{label}] host exit code; summary {summary}");
        assert_eq!(summary["drained"], true, "[{label}] {summary}");
        assert_eq!(u(&summary["sensors"]), HOST_SENSORS);
        assert_eq!(u(&summary["unacked"]), 0, "[{label}] readings never acked: {summary}");
        assert_eq!(summary["generated"], summary["acked"]);
        assert!(u(&summary["failovers"]) >= 1, "[{label}] the host never left the fake: {summary}");
        assert_eq!(u(&summary["failed_sensors"]), 0, "[{label}] a sensor failed: {summary}");
        assert_eq!(u(&summary["quarantined"]), 0);
        assert_eq!(log_lines_with(&log, &["panicked"]), 0, "[{label}] the host panicked while draining");
        // The fake's frames that can be used were never sent: every bad
        // reply counted is one of the fake's, and it logs that once.
        let bad = u(&summary["bad_replies"]);
        assert!(bad <= self.report.bad_replies_sent, "[{label}] {bad} bad replies counted, the fake sent {} such frames", self.report.bad_replies_sent);
        assert_eq!(log_lines_with(&log, &["dropped a reply that cannot be decoded"]), 1, "[{label}] lines about undecodable replies in the host's log");
        let log_bytes = std::fs::metadata(&log).map(|m| m.len()).unwrap_or(0);
        assert!(log_bytes < 1 << 20, "[{label}] the host's log grew to {log_bytes} bytes");

        // The real backup took over and counts every reading exactly once;
        // every sensor is on its average stream, none rewound from a forged
        // one, none told it missed averages.
        let admin = self.keys.admin_status(false);
        let status = status_when_as(&self.pair.backup_frontend, Some(&admin), "active", Duration::from_secs(10), is_active).unwrap();
        check_counts(label, &status, &[&summary]).unwrap();
        let seen = [Observation { at_s: self.started.elapsed().as_secs_f64(), node: "backup", state: "active".into(), epoch: status["epoch"].as_u64() }];
        let verdict = check(&[host_side(&summary)], &server_side(&status), &seen);
        assert!(verdict.ok(), "[{label}] {:?}\n{:?}", verdict.violations, verdict.notes);
        assert_eq!(verdict.averages_superseded, 0, "[{label}] sensors applied averages the real server never published");
        assert_eq!(verdict.sensors_off_the_server_stream, 0);
        assert_eq!(verdict.averages_missed, 0);
        let exited = self.backup.child.try_wait().unwrap();
        assert!(exited.is_none(), "[{label}] the backup exited: {exited:?}");
        // An unsealed epoch the host took from the fake reaches the backup
        // only in the batches on their way when the backup first answers
        // one: the host then takes the backup's epoch back, rather than
        // carrying a claim the pair ignores for the rest of its life.
        let forged = u(&status["forged_epochs"]);
        let unvouched = u(&summary["unvouched_epochs"]);
        assert!(forged <= 16, "[{label}] the backup saw {forged} forged epochs: the host kept the fake's claim ({unvouched} taken back)");
        assert!(unvouched == 0 || forged > 0, "[{label}] the host took back {unvouched} epochs the backup never saw");
        assert_eq!(log_lines_with(&log, &["has no valid seal"]), unvouched.min(1) as usize, "[{label}] lines about a taken-back epoch");
        eprintln!(
            "[{label}] the backup (active, epoch {}) counts {} readings of the host's {} sensors, exactly what they made, and every \
             sensor is on its average stream; it saw {} forged epochs (the fake's claim, carried by the host until the backup's first \
             reply: {unvouched} taken back) and {} malformed frames; \
             the host's log has {log_bytes} bytes; {:.1}s in all ({})",
            status["epoch"],
            status["counted"],
            verdict.sensors_checked,
            status["forged_epochs"],
            status["malformed_frames"],
            self.started.elapsed().as_secs_f64(),
            self.dir.display()
        );
        summary
    }
}

#[test]
fn a_host_survives_a_hostile_server_with_the_primarys_key_and_loses_nothing() {
    let _serial = serial();
    let mut attacked = attack("hostile-server", MAIN_PLAN);
    let report = &attacked.report;
    // The attack reached the host: the fake heard of every sensor,
    // answered batches in the phases that answer, flooded thousands of
    // small frames and sent big ones (fewer when the box is busy: the host
    // may time out and leave during the big flood).
    assert_eq!(report.sensors.len() as u64, HOST_SENSORS, "the fake heard of every sensor: {:?}", report.sensors);
    for phase in [Phase::Garbage, Phase::Lies] {
        assert!(report.batches.get(&phase).copied().unwrap_or(0) >= 3, "few batches answered in {phase:?}: {:?}", report.batches);
    }
    let flooded = |phase| report.flooded.get(&phase).copied().unwrap_or(0);
    assert!(flooded(Phase::Flood) >= 1000, "only {} small frames flooded", flooded(Phase::Flood));
    assert!(report.big_frames >= 5, "only {} frames of 1 MiB or more reached the host", report.big_frames);
    let sent_bad = report.bad_replies_sent;
    attacked.assert_host_alive();
    attacked.assert_memory_bounded();
    let summary = attacked.drain_and_check();
    let bad = u(&summary["bad_replies"]);
    eprintln!("[hostile-server] the host counted {bad} bad replies of the {sent_bad} the fake sent");
    assert!(bad >= 1000, "only {bad} bad replies counted");
}

#[test]
fn a_flood_of_replies_that_decode_into_huge_lists_keeps_the_host_bounded() {
    let _serial = serial();
    let mut attacked = attack("decode-bombs", BOMB_PLAN);
    let flooded = attacked.report.flooded.get(&Phase::Bombs).copied().unwrap_or(0);
    assert!(flooded >= 5, "only {flooded} big replies flooded");
    attacked.assert_host_alive();
    // Nothing is lost whatever the memory did; then the bound.
    let (rss_max, rss_peak) = (attacked.rss_max, attacked.rss_peak);
    attacked.drain_and_check();
    assert!(
        rss_max.max(rss_peak) < MAX_HOST_RSS_MIB,
        "[decode-bombs] the host's memory reached {rss_max:.0} MiB sampled, {rss_peak:.0} MiB at its peak, under a flood of {flooded} \
         replies of 16 MiB (bound {MAX_HOST_RSS_MIB} MiB)"
    );
}
