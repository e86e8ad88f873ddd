//! A native load generator: many simulated sensors in one process, their
//! readings batched into large frames, sent over a few DEALER connections
//! (libzmq through `fog_transport`, with CurveZMQ when the endpoint has
//! keys) with several batches in flight on each.
//!
//! Every reading is new (its own `(sensor_id, incarnation, seq)`), so the
//! server does the full work of counting it. A batch's id is its send time
//! in nanoseconds since the run started, so the reply alone gives the
//! batch's round-trip time without any shared bookkeeping.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use fog_protocol::{MAX_READINGS_PER_BATCH, MAX_SENSORS_PER_BATCH, Reading, Reply, Request, SensorBatch};
use fog_transport::{Event, Limits, Message, SendError};
use hdrhistogram::Histogram;
use tokio::sync::{Mutex, Semaphore};

use crate::pair::Endpoint;

/// The shape of the load.
#[derive(Debug, Clone, Copy)]
pub struct LoadShape {
    pub connections: usize,
    /// Batches sent without waiting for their reply, per connection.
    pub in_flight: usize,
    /// Sensors per connection; each batch carries all of them.
    pub sensors: u32,
    /// Readings per sensor per batch.
    pub readings_per_sensor: u32,
    /// Batches per second per connection; `None` sends as fast as replies allow.
    pub rate: Option<f64>,
    /// Stop sending after this many readings per connection.
    pub max_readings: Option<u64>,
}

impl LoadShape {
    pub fn readings_per_batch(&self) -> u64 {
        u64::from(self.sensors) * u64::from(self.readings_per_sensor)
    }

    /// Refuses a shape whose batches a server would refuse, or whose batches
    /// in flight the sockets' queues could not hold.
    pub fn check(&self) -> anyhow::Result<()> {
        if self.connections == 0 || self.sensors == 0 || self.readings_per_sensor == 0 {
            bail!("connections, sensors and readings per sensor must be at least 1");
        }
        if self.sensors as usize > MAX_SENSORS_PER_BATCH {
            bail!("{} sensors per batch: the protocol allows at most {MAX_SENSORS_PER_BATCH}", self.sensors);
        }
        if self.readings_per_batch() > MAX_READINGS_PER_BATCH as u64 {
            bail!(
                "{} sensors x {} readings = {} readings per batch: the protocol allows at most {MAX_READINGS_PER_BATCH}",
                self.sensors,
                self.readings_per_sensor,
                self.readings_per_batch()
            );
        }
        if !(1..=MAX_IN_FLIGHT).contains(&self.in_flight) {
            bail!("{} batches in flight: give 1 to {MAX_IN_FLIGHT}", self.in_flight);
        }
        Ok(())
    }
}

/// Most batches in flight per connection: the socket's high-water mark, so
/// libzmq never drops one of them.
pub const MAX_IN_FLIGHT: usize = 1000;

/// What a load run measured.
#[derive(Debug, Clone)]
pub struct LoadResult {
    /// Readings the server acked (acks that advanced, counted once).
    pub acked: u64,
    pub batches: u64,
    pub not_active: u64,
    /// Readings the server refused (not acked, not counted).
    pub refused: u64,
    pub elapsed: Duration,
    /// Batch round-trip times, microseconds.
    pub rtt_us: Histogram<u64>,
    pub frame_bytes: usize,
    /// Batches the socket could not send (its queue or the peer's was
    /// full); each one leaves a connection with one batch less in flight.
    pub dropped: u64,
}

impl LoadResult {
    pub fn per_second(&self) -> f64 {
        self.acked as f64 / self.elapsed.as_secs_f64()
    }
}

/// What the server under test answers with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// A fog server: replies are decoded and acks counted.
    Server,
    /// A bare echo: every reply counts the whole batch.
    Echo,
}

struct Conn {
    acked: u64,
    batches: u64,
    not_active: u64,
    refused: u64,
    next_seq: HashMap<u32, u64>,
    rtt: Histogram<u64>,
}

/// Runs the load for `warmup + measure` against `endpoint`; only the
/// measured part is reported.
pub async fn run(endpoint: &Endpoint, shape: LoadShape, target: Target, warmup: Duration, measure: Duration) -> anyhow::Result<LoadResult> {
    shape.check()?;
    let start = Instant::now();
    let measure_from = start + warmup;
    let stop_at = measure_from + measure;
    let ctx = fog_transport::Context::new();
    let limits = Limits { hwm: MAX_IN_FLIGHT as i32, ..Limits::default() };
    let curve = endpoint.curve.as_ref().map(|(keys, server)| (keys, server));
    let mut tasks = Vec::new();
    let mut frame_bytes = 0;
    for c in 0..shape.connections {
        let mut socket = fog_transport::connect_monitored(&format!("load-{c}"), &ctx, fog_transport::SocketType::DEALER, &endpoint.address, curve, &limits)?;
        let send = socket.sender();
        let first_id = 1 + c as u32 * shape.sensors;
        let incarnation = 0xbe7c_0000_0000_0000 | ((start.elapsed().as_nanos() as u64) << 8) | c as u64;
        frame_bytes = encode_batch(0, first_id, shape, incarnation, &mut vec![0; shape.sensors as usize])?.len();
        let permits = Arc::new(Semaphore::new(shape.in_flight));
        let conn = Arc::new(Mutex::new(Conn {
            acked: 0,
            batches: 0,
            not_active: 0,
            refused: 0,
            next_seq: HashMap::new(),
            rtt: Histogram::new_with_bounds(1, 60_000_000, 3).context("histogram")?,
        }));

        let sender_permits = permits.clone();
        let sender_done = Arc::new(AtomicBool::new(false));
        let done = sender_done.clone();
        let sender = tokio::spawn(async move {
            let mut seqs = vec![0u64; shape.sensors as usize];
            let mut tick = shape.rate.map(|r| tokio::time::interval(Duration::from_secs_f64(1.0 / r)));
            let per_batch = shape.readings_per_batch();
            let mut sent = 0u64;
            let stop = tokio::time::Instant::from_std(stop_at);
            while Instant::now() < stop_at && shape.max_readings.is_none_or(|max| sent < max) {
                sent += per_batch;
                if let Some(t) = tick.as_mut() {
                    t.tick().await;
                }
                // A batch whose reply never comes must not hold the sender
                // past the end of the run.
                let Ok(Ok(permit)) = tokio::time::timeout_at(stop, sender_permits.clone().acquire_owned()).await else { break };
                permit.forget();
                let id = start.elapsed().as_nanos() as u64;
                let frame = encode_batch(id, first_id, shape, incarnation, &mut seqs)?;
                match send.send(vec![frame]) {
                    Ok(()) => {}
                    // The receiver closes the socket once the run is over.
                    Err(SendError::Closed) if Instant::now() >= stop_at => break,
                    Err(e) => bail!("cannot queue a batch: {e}"),
                }
            }
            done.store(true, Ordering::SeqCst);
            anyhow::Ok(())
        });
        let receiver_conn = conn.clone();
        let address = endpoint.address.clone();
        let receiver = tokio::spawn(async move {
            loop {
                // Stop once the sender is done and every batch is answered,
                // or shortly after the end of the run.
                let frames = match tokio::time::timeout(Duration::from_millis(100), socket.recv()).await {
                    Ok(Some(Event::Message(Message { frames, .. }))) => frames,
                    Ok(Some(Event::HandshakeFailed(why))) => bail!("{address} refused the load generator: {why}"),
                    Ok(Some(_)) => continue,
                    Ok(None) => break,
                    Err(_) => {
                        let all_answered = permits.available_permits() == shape.in_flight;
                        if (sender_done.load(Ordering::SeqCst) && all_answered) || Instant::now() > stop_at + Duration::from_secs(2) {
                            break;
                        }
                        continue;
                    }
                };
                permits.add_permits(1);
                let now = Instant::now();
                let Some(frame) = frames.last() else { continue };
                let measured = now >= measure_from && now <= stop_at;
                let mut c = receiver_conn.lock().await;
                match target {
                    Target::Echo => {
                        if measured {
                            c.acked += shape.readings_per_batch();
                            c.batches += 1;
                            if let Some(id) = echoed_batch_id(frame) {
                                record_rtt(&mut c.rtt, start, id, now);
                            }
                        }
                    }
                    Target::Server => match fog_protocol::decode::<Reply>(frame) {
                        Ok(Reply::Batch(reply)) => {
                            let mut advanced = 0;
                            for ack in &reply.acks {
                                let prev = c.next_seq.insert(ack.sensor_id, ack.next_seq).unwrap_or(0);
                                advanced += ack.next_seq.saturating_sub(prev);
                            }
                            c.refused += reply.refused.iter().map(|r| u64::from(r.count)).sum::<u64>();
                            if measured {
                                c.acked += advanced;
                                c.batches += 1;
                                record_rtt(&mut c.rtt, start, reply.batch_id, now);
                            }
                        }
                        Ok(Reply::NotActive { .. }) => c.not_active += 1,
                        Ok(Reply::Refused { reason, .. }) => bail!("{address} refused a batch: {reason:?}"),
                        Ok(_) => {}
                        Err(e) => bail!("undecodable reply: {e}"),
                    },
                }
                if now > stop_at {
                    break;
                }
            }
            let dropped = socket.stats().dropped_out.load(Ordering::Relaxed);
            anyhow::Ok(dropped)
        });
        tasks.push((sender, receiver, conn));
    }
    let mut result = LoadResult {
        acked: 0,
        batches: 0,
        not_active: 0,
        refused: 0,
        elapsed: measure,
        rtt_us: Histogram::new_with_bounds(1, 60_000_000, 3).context("histogram")?,
        frame_bytes,
        dropped: 0,
    };
    for (sender, receiver, conn) in tasks {
        // The receiver's error first: when it stops (a refused handshake,
        // a refused batch), the sender only sees its socket closed.
        let sent = sender.await.context("sender task")?;
        result.dropped += receiver.await.context("receiver task")??;
        sent?;
        let c = conn.lock().await;
        result.acked += c.acked;
        result.batches += c.batches;
        result.not_active += c.not_active;
        result.refused += c.refused;
        result.rtt_us.add(&c.rtt).context("histogram")?;
    }
    if result.not_active > 0 && result.batches == 0 {
        bail!("the server answered \"not active\" to every batch");
    }
    if result.refused > 0 {
        eprintln!("  warning: the server refused {} readings", result.refused);
    }
    if result.dropped > 0 {
        eprintln!("  warning: {} batches could not be sent (a socket queue was full)", result.dropped);
    }
    Ok(result)
}

/// The echo returns the head of the request: version byte, variant tag,
/// then the batch id as a postcard varint.
fn echoed_batch_id(head: &[u8]) -> Option<u64> {
    let mut id = 0u64;
    for (i, &b) in head.get(2..)?.iter().take(10).enumerate() {
        id |= u64::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return Some(id);
        }
    }
    None
}

fn record_rtt(h: &mut Histogram<u64>, start: Instant, sent_ns: u64, now: Instant) {
    let rtt_ns = (now - start).as_nanos() as u64;
    let us = rtt_ns.saturating_sub(sent_ns) / 1000;
    let _ = h.record(us.max(1));
}

fn encode_batch(batch_id: u64, first_id: u32, shape: LoadShape, incarnation: u64, seqs: &mut [u64]) -> anyhow::Result<Vec<u8>> {
    let now_ms = fog_testkit::rogue::now_ms();
    let sensors = seqs
        .iter_mut()
        .enumerate()
        .map(|(i, seq)| {
            let readings = (0..shape.readings_per_sensor)
                .map(|_| {
                    let r = Reading { seq: *seq, speed_kmh: 70 + (*seq % 51) as u16, timestamp_ms: now_ms };
                    *seq += 1;
                    r
                })
                .collect();
            SensorBatch {
                sensor_id: first_id + i as u32,
                incarnation,
                segment: i as u32 % 4,
                readings,
                average_cursor: None,
            }
        })
        .collect();
    Ok(fog_protocol::encode(&Request::Batch { batch_id, epoch: 0, seal: [0; 16], sensors })?)
}
