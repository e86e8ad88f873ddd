//! `uplink`: what the cloud tier takes. A 3-node NATS JetStream cluster on
//! loopback (the test kit's, Debian's `nats-server`) with an R3 file
//! stream, and publishers of the messages fog's uplink sends: JSON batches
//! of readings, each with a `Nats-Msg-Id` (JetStream's deduplication) and
//! a `Nats-Expected-Last-Sequence` (its optimistic concurrency), pipelined
//! with a bounded number of acks in flight.
//!
//! [`bare_publisher`] is the ceiling: async-nats publishing prepared
//! messages as fast as the cluster acks them, with nothing of fog in
//! between. The fog uplink's figure (a site pair forwarding what it
//! counted) is measured against the same [`Cloud`] in the same run and
//! sits beside it in [`Uplink`].

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use fog_testkit::nats::{self, NatsAuth, NatsCluster, Outgoing};
use fog_testkit::scratch_dir;
use serde::Serialize;

use crate::system::RemoveOnDrop;

/// The site name of the benchmark's messages (`fog.<site>.readings.<segment>`).
pub const SITE: &str = "bench";

/// The stream the benchmark publishes to.
pub const STREAM: &str = "FOG";

/// Road segments the readings are spread over (one subject each).
const SEGMENTS: u64 = 16;

/// At most this many readings per message: 100 bytes each stay well
/// under the servers' 1 MiB `max_payload`.
pub const MAX_READINGS_PER_MESSAGE: usize = 5_000;

/// At most this many acks in flight.
pub const MAX_IN_FLIGHT: usize = 4_096;

/// The messages of a run and how they are sent.
#[derive(Debug, Clone, Copy)]
pub struct UplinkShape {
    pub readings_per_message: usize,
    /// Publishes whose ack has not arrived, at most: the oldest is awaited
    /// before another is sent.
    pub max_in_flight: usize,
}

impl UplinkShape {
    /// Refuses a shape the cluster or the client could not take, before
    /// anything starts.
    pub fn check(&self) -> anyhow::Result<()> {
        if !(1..=MAX_READINGS_PER_MESSAGE).contains(&self.readings_per_message) {
            bail!("--uplink-readings must be 1 to {MAX_READINGS_PER_MESSAGE} (a message stays under NATS's 1 MiB max_payload), not {}", self.readings_per_message);
        }
        if !(1..=MAX_IN_FLIGHT).contains(&self.max_in_flight) {
            bail!("--uplink-in-flight must be 1 to {MAX_IN_FLIGHT}, not {}", self.max_in_flight);
        }
        Ok(())
    }
}

/// The figures of one uplink run.
#[derive(Debug, Serialize)]
pub struct Uplink {
    pub nats_nodes: usize,
    pub replicas: usize,
    pub readings_per_message: usize,
    /// Size of one message's payload (JSON).
    pub message_bytes: usize,
    pub max_in_flight: usize,
    /// A bare async-nats publisher of the same messages: the ceiling.
    pub bare: UplinkThroughput,
}

/// Messages and readings JetStream acked per second of the measurement.
#[derive(Debug, Serialize)]
pub struct UplinkThroughput {
    pub messages_per_s: f64,
    pub readings_per_s: f64,
    pub mib_per_s: f64,
    /// Messages acked during the measurement.
    pub messages: u64,
    /// Messages the stream held at the end (warm-up and drain included):
    /// every one published once.
    pub stored: u64,
}

/// The cloud of one run: a 3-node cluster with an R3 stream on `fog.>`,
/// its site user's credentials, its files in a scratch dir removed when
/// dropped (after the servers are killed).
pub struct Cloud {
    pub cluster: NatsCluster,
    _cleanup: RemoveOnDrop,
}

impl Cloud {
    pub fn start() -> anyhow::Result<Cloud> {
        let dir = scratch_dir("bench-uplink")?;
        let cleanup = RemoveOnDrop(dir.clone());
        let cluster = NatsCluster::start(&dir, 3, NatsAuth::Site)?;
        cluster.create_stream(STREAM, &["fog.>"], 3, Duration::from_secs(120))?;
        Ok(Cloud { cluster, _cleanup: cleanup })
    }
}

/// Starts a [`Cloud`] and measures the publishers against it.
pub async fn run(shape: UplinkShape, warmup: Duration, measure: Duration) -> anyhow::Result<Uplink> {
    shape.check()?;
    let cloud = Cloud::start()?;
    let payloads = payloads(shape.readings_per_message)?;
    let message_bytes = payloads[0].len();
    let bare = bare_publisher(&cloud, shape, &payloads, warmup, measure).await?;
    Ok(Uplink {
        nats_nodes: cloud.cluster.nodes().len(),
        replicas: 3,
        readings_per_message: shape.readings_per_message,
        message_bytes,
        max_in_flight: shape.max_in_flight,
        bare,
    })
}

/// One JSON batch per segment: `readings_per_message` readings of
/// distinct sensors, as the uplink forwards what a site counted.
pub fn payloads(readings_per_message: usize) -> anyhow::Result<Vec<Vec<u8>>> {
    let now_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0);
    (0..SEGMENTS)
        .map(|segment| {
            let readings: Vec<serde_json::Value> = (0..readings_per_message as u64)
                .map(|r| {
                    serde_json::json!({
                        "sensor_id": segment * 100_000 + r,
                        "incarnation": 1,
                        "seq": 1_000_000 + r,
                        "segment": segment,
                        "speed_kmh": 80 + (r % 50),
                        "timestamp_ms": now_ms + r,
                    })
                })
                .collect();
            let batch = serde_json::json!({"site": SITE, "segment": segment, "readings": readings});
            serde_json::to_vec(&batch).context("cannot encode a batch")
        })
        .collect()
}

/// async-nats alone: publishes `payloads` in turn as the site user, each
/// message with its id and the stream sequence it expects to follow,
/// `max_in_flight` acks outstanding, for `warmup` and then `measure`;
/// counts the acks that arrive during `measure`. Fails if any message is
/// refused or stored out of place.
pub async fn bare_publisher(cloud: &Cloud, shape: UplinkShape, payloads: &[Vec<u8>], warmup: Duration, measure: Duration) -> anyhow::Result<UplinkThroughput> {
    eprintln!(
        "uplink: bare async-nats publisher, {} readings per message, {} acks in flight, R3 on 3 nodes, for {measure:?} ...",
        shape.readings_per_message, shape.max_in_flight
    );
    let cluster = &cloud.cluster;
    let client = nats::connect(&cluster.client_urls(), cluster.creds()).await?;
    let js = nats::context(client.clone(), shape.max_in_flight);
    let first_seq = cluster.stream_state(STREAM)?.last_seq;
    let began = Instant::now();
    let (measure_from, end) = (began + warmup, began + warmup + measure);
    let mut next = 0u64;
    let messages = std::iter::from_fn(|| {
        if Instant::now() >= end {
            return None;
        }
        let i = next;
        next += 1;
        Some(Outgoing {
            subject: format!("fog.{SITE}.readings.{}", i % SEGMENTS),
            msg_id: Some(format!("{SITE}.bare.{i}")),
            expected_last_seq: Some(first_seq + i),
            headers: Vec::new(),
            payload: payloads[(i % payloads.len() as u64) as usize].clone(),
        })
    });
    let (mut measured, mut acked, mut misplaced) = (0u64, 0u64, Vec::new());
    let mut bytes = 0u64;
    nats::publish_pipelined(&js, messages, shape.max_in_flight, |i, ack| {
        let now = Instant::now();
        acked += 1;
        if ack.duplicate || ack.seq != first_seq + i as u64 + 1 {
            misplaced.push((i, ack));
        }
        if now >= measure_from && now < end {
            measured += 1;
            bytes += payloads[i % payloads.len()].len() as u64;
        }
    })
    .await?;
    let _ = client.drain().await;
    if !misplaced.is_empty() {
        bail!("{} messages were stored out of place or as duplicates, the first {:?}", misplaced.len(), misplaced[0]);
    }
    let stored = cluster.stream_state(STREAM)?.last_seq.saturating_sub(first_seq);
    if stored != acked {
        bail!("JetStream acked {acked} messages and the stream holds {stored} more than before");
    }
    let seconds = measure.as_secs_f64();
    Ok(UplinkThroughput {
        messages_per_s: measured as f64 / seconds,
        readings_per_s: (measured * shape.readings_per_message as u64) as f64 / seconds,
        mib_per_s: bytes as f64 / seconds / (1024.0 * 1024.0),
        messages: measured,
        stored,
    })
}
