//! A native load generator: many simulated sensors in one process, their
//! readings batched into large frames, sent over a few DEALER connections
//! with several batches in flight on each.
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
use fog_protocol::{Reading, Reply, Request, SensorBatch};
use hdrhistogram::Histogram;
use tokio::sync::{Mutex, Semaphore};
use zeromq::{DealerSocket, Socket, SocketRecv, SocketSend, ZmqMessage};

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

/// What a load run measured.
#[derive(Debug, Clone)]
pub struct LoadResult {
    /// Readings the server acked (acks that advanced, counted once).
    pub acked: u64,
    pub batches: u64,
    pub not_active: u64,
    pub elapsed: Duration,
    /// Batch round-trip times, microseconds.
    pub rtt_us: Histogram<u64>,
    pub frame_bytes: usize,
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
    next_seq: HashMap<u32, u64>,
    rtt: Histogram<u64>,
}

/// Runs the load for `warmup + measure` against `endpoint`; only the
/// measured part is reported.
pub async fn run(endpoint: &str, shape: LoadShape, target: Target, warmup: Duration, measure: Duration) -> anyhow::Result<LoadResult> {
    let start = Instant::now();
    let measure_from = start + warmup;
    let stop_at = measure_from + measure;
    let mut tasks = Vec::new();
    let mut frame_bytes = 0;
    for c in 0..shape.connections {
        let mut socket = DealerSocket::new();
        tokio::time::timeout(Duration::from_secs(5), socket.connect(endpoint))
            .await
            .with_context(|| format!("no connection to {endpoint}"))?
            .with_context(|| format!("cannot connect to {endpoint}"))?;
        let (mut send, mut recv) = socket.split();
        let first_id = 1 + c as u32 * shape.sensors;
        let incarnation = 0xbe7c_0000_0000_0000 | ((start.elapsed().as_nanos() as u64) << 8) | c as u64;
        frame_bytes = encode_batch(0, first_id, shape, incarnation, &mut vec![0; shape.sensors as usize])?.len();
        let permits = Arc::new(Semaphore::new(shape.in_flight));
        let conn = Arc::new(Mutex::new(Conn {
            acked: 0,
            batches: 0,
            not_active: 0,
            next_seq: HashMap::new(),
            rtt: Histogram::new_with_bounds(1, 60_000_000, 3).context("histogram")?,
        }));

        let sender_permits = permits.clone();
        let sender_done = Arc::new(AtomicBool::new(false));
        let done = sender_done.clone();
        let sender = tokio::spawn(async move {
            let mut seqs = vec![0u64; shape.sensors as usize];
            let mut tick = shape.rate.map(|r| tokio::time::interval(Duration::from_secs_f64(1.0 / r)));
            let per_batch = u64::from(shape.sensors * shape.readings_per_sensor);
            let mut sent = 0u64;
            while Instant::now() < stop_at && shape.max_readings.is_none_or(|max| sent < max) {
                sent += per_batch;
                if let Some(t) = tick.as_mut() {
                    t.tick().await;
                }
                let Ok(permit) = sender_permits.clone().acquire_owned().await else { break };
                permit.forget();
                let id = start.elapsed().as_nanos() as u64;
                let frame = encode_batch(id, first_id, shape, incarnation, &mut seqs)?;
                send.send(ZmqMessage::from(frame)).await.context("send")?;
            }
            done.store(true, Ordering::SeqCst);
            anyhow::Ok(())
        });
        let receiver_conn = conn.clone();
        let receiver = tokio::spawn(async move {
            loop {
                // Stop once the sender is done and every batch is answered,
                // or shortly after the end of the run.
                let msg = match tokio::time::timeout(Duration::from_millis(100), recv.recv()).await {
                    Ok(Ok(msg)) => msg,
                    Ok(Err(_)) => break,
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
                let Some(frame) = msg.into_vec().pop() else { continue };
                let measured = now >= measure_from && now <= stop_at;
                let mut c = receiver_conn.lock().await;
                match target {
                    Target::Echo => {
                        if measured {
                            c.acked += u64::from(shape.sensors * shape.readings_per_sensor);
                            c.batches += 1;
                            if let Some(id) = echoed_batch_id(&frame) {
                                record_rtt(&mut c.rtt, start, id, now);
                            }
                        }
                    }
                    Target::Server => match fog_protocol::decode::<Reply>(&frame) {
                        Ok(Reply::Batch(reply)) => {
                            let mut advanced = 0;
                            for ack in &reply.acks {
                                let prev = c.next_seq.insert(ack.sensor_id, ack.next_seq).unwrap_or(0);
                                advanced += ack.next_seq.saturating_sub(prev);
                            }
                            if measured {
                                c.acked += advanced;
                                c.batches += 1;
                                record_rtt(&mut c.rtt, start, reply.batch_id, now);
                            }
                        }
                        Ok(Reply::NotActive { .. }) => c.not_active += 1,
                        Ok(_) => {}
                        Err(e) => bail!("undecodable reply: {e}"),
                    },
                }
                if now > stop_at {
                    break;
                }
            }
            anyhow::Ok(())
        });
        tasks.push((sender, receiver, conn));
    }
    let mut result = LoadResult {
        acked: 0,
        batches: 0,
        not_active: 0,
        elapsed: measure,
        rtt_us: Histogram::new_with_bounds(1, 60_000_000, 3).context("histogram")?,
        frame_bytes,
    };
    for (sender, receiver, conn) in tasks {
        sender.await.context("sender task")??;
        receiver.await.context("receiver task")??;
        let c = conn.lock().await;
        result.acked += c.acked;
        result.batches += c.batches;
        result.not_active += c.not_active;
        result.rtt_us.add(&c.rtt).context("histogram")?;
    }
    if result.not_active > 0 && result.batches == 0 {
        bail!("the server answered \"not active\" to every batch");
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
    let now_ms = fog_protocol::now_ms();
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
