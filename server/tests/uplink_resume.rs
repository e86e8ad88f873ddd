//! The uplink's connection against a real JetStream (one `nats-server`):
//! a stream that ends in the middle of a window (the parts before landed,
//! the rest did not: the active died between them) is read back on
//! resume, and the window is finished without what landed, so every item
//! is in the stream once. A stream holding another history is refused,
//! unless this site's history is in it before: then it is taken over.
//!
//! The loop's side is played by the test: an outbox and the uplink's
//! events, handled as the server's driver handles them.
//!
//! Without nats-server this test says SKIPPED, unless FOG_REQUIRE_NATS=1.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use fog_core::{Average, Reading};
use fog_server::outbox::{Outbox, OutboxConfig, Owed};
use fog_server::uplink::{Uplink, UplinkConfig, UplinkEvent, Work, message, parts_of};
use fog_testkit::nats::{NatsAuth, NatsCluster, Outgoing, require_nats};
use fog_testkit::scratch_dir;

const STREAM: &str = "FOG_T1";
/// Forward until the outbox's last item.
const ALL: u64 = u64::MAX;

fn outbox() -> Outbox {
    let mut o = Outbox::default();
    o.set_config(OutboxConfig { enabled: true, backlog_bytes: 1 << 20 });
    for i in 0..30u64 {
        let reading = Reading { seq: i / 3, speed_kmh: 90, timestamp_ms: 1_000 + i };
        o.push(1, 0, Owed::Reading { sensor_id: (i % 3) as u32, incarnation: 1, segment: (i % 3) as u32, reading });
        if i % 10 == 9 {
            let a = Average { seq: i / 10 + 1, epoch: 1, segment: 0, window_end_ms: i, count: 1, sum_kmh: 90, revision: 0, chain: i };
            o.push(1, 0, Owed::Average(a));
        }
    }
    o
}

fn config(urls: String) -> UplinkConfig {
    UplinkConfig { urls, creds: None, site: "t1".into(), replicas: 1, duplicate_window: Duration::from_secs(1), backlog_bytes: 1 << 20 }
}

/// A one-node cloud with the stream of site `t1`, the uplink's config for
/// it, and a runtime to drive uplinks on; `None` (skipped) without
/// nats-server.
fn cloud_for(test: &str, label: &str) -> Option<(NatsCluster, UplinkConfig, tokio::runtime::Runtime)> {
    require_nats(test).unwrap()?;
    let dir = scratch_dir(label).unwrap();
    let cloud = NatsCluster::start(&dir, 1, NatsAuth::Open).unwrap();
    cloud.create_stream(STREAM, &["fog.t1.>"], 1, Duration::from_secs(1)).unwrap();
    let cfg = config(cloud.urls());
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    Some((cloud, cfg, runtime))
}

/// Plays the server's loop until the outbox is forwarded through `want`
/// (`ALL`: its last item, wherever that ends up) or the uplink reports
/// `Failed`; returns the failures seen.
async fn drive(up: &mut Uplink, outbox: &mut Outbox, want: u64) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut failures = Vec::new();
    up.control(true, 1);
    let target = |o: &Outbox| if want == ALL { o.last_seq() } else { want };
    while outbox.forwarded() < target(outbox) && Instant::now() < deadline && failures.is_empty() {
        if let Some(after) = up.next_after() {
            up.feed(outbox.after(after, u64::MAX));
        }
        let Ok(Some(event)) = tokio::time::timeout(Duration::from_millis(100), up.events.recv()).await else { continue };
        match event {
            UplinkEvent::Check { in_cloud, chain, answer } => {
                let _ = answer.send(outbox.check_stream(in_cloud, chain));
            }
            UplinkEvent::ChainAt { site_seq, answer } => {
                let _ = answer.send(outbox.chain_known(site_seq));
            }
            UplinkEvent::Adopt { fork, end, chain, readings, answer } => {
                outbox.add_in_cloud(&readings);
                outbox.adopt(fork, end, chain);
                let _ = answer.send(Ok(()));
            }
            UplinkEvent::Resync { round, from, partial } => up.resync(round, from, partial, outbox.forwarded()),
            UplinkEvent::Acked { landed, .. } => {
                if let Some(l) = landed {
                    outbox.acked(l.through, l.chain, l.from);
                }
            }
            UplinkEvent::Connected(_) => {}
            UplinkEvent::Failed(e) => failures.push(e),
        }
    }
    up.control(false, 1);
    failures
}

/// A new uplink connection of `cfg`, driven until `outbox` is forwarded
/// through `want` or the uplink fails; the failures seen.
fn forward(runtime: &tokio::runtime::Runtime, cfg: &UplinkConfig, outbox: &mut Outbox, want: u64) -> Vec<String> {
    runtime.block_on(async {
        let mut up = Uplink::start(cfg.clone(), None);
        drive(&mut up, outbox, want).await
    })
}

#[test]
fn a_window_cut_short_in_the_stream_is_finished_once() {
    let Some((cloud, cfg, runtime)) = cloud_for("a_window_cut_short_in_the_stream_is_finished_once", "uplink-resume") else { return };
    let mut outbox = outbox();
    let last = outbox.last_seq();
    assert_eq!(last, 33);

    // What a dying active left: the first two parts of the window 1..=33.
    let items: Vec<_> = outbox.after(0, u64::MAX).copied().collect();
    let parts = parts_of(&items);
    assert!(parts.len() >= 4, "{} parts", parts.len());
    let chain = items.last().unwrap().chain;
    let planted: Vec<Outgoing> = parts
        .iter()
        .take(2)
        .enumerate()
        .map(|(i, group)| {
            let work = Work { round: 0, window: (1, last), chain, landed_from: 1, part: i as u32 + 1, parts: parts.len() as u32, items: group.clone() };
            let (subject, headers, payload) = message(&cfg, 1, &work);
            Outgoing {
                subject,
                msg_id: None,
                expected_last_seq: Some(i as u64),
                headers: headers.iter().flat_map(|(k, vs)| vs.iter().map(move |v| (k.to_string(), v.as_str().to_string()))).collect(),
                payload,
            }
        })
        .collect();
    let landed: usize = parts.iter().take(2).map(Vec::len).sum();
    cloud.publish(None, planted, 2).unwrap();

    let failures = forward(&runtime, &cfg, &mut outbox, last);
    assert!(failures.is_empty(), "{failures:?}");
    assert_eq!(outbox.forwarded(), last);

    let stored = cloud.read_stream(STREAM, Duration::from_secs(20)).unwrap();
    let seen = items_in(&stored);
    assert_eq!(seen.keys().copied().collect::<Vec<_>>(), (1..=last).collect::<Vec<_>>(), "every item is in the stream");
    assert!(seen.values().all(|&n| n == 1), "an item is in the stream twice: {seen:?}");
    assert!(stored.len() > 2 && stored.len() < 2 + parts.len(), "the window was finished with its missing parts only ({} messages, {landed} items had landed)", stored.len());
    assert_eq!(stored.last().unwrap().header("Fog-Part").map(|p| p.split_once('/').map(|(a, b)| a == b)), Some(Some(true)));

    // Another site's history in the stream: refused, not mixed in.
    let mut other = Outbox::default();
    other.set_config(OutboxConfig { enabled: true, backlog_bytes: 1 << 20 });
    for i in 0..40u64 {
        other.push(1, 0, Owed::Reading { sensor_id: 7, incarnation: 2, segment: 0, reading: Reading { seq: i, speed_kmh: 50, timestamp_ms: i } });
    }
    let failures = forward(&runtime, &cfg, &mut other, 40);
    assert!(failures.first().is_some_and(|f| f.contains("not this site's")), "{failures:?}");
    assert_eq!(other.forwarded(), 0);
    assert_eq!(cloud.read_stream(STREAM, Duration::from_secs(20)).unwrap().len(), stored.len(), "nothing was added");
}

/// Every site item's count in the stream.
fn items_in(stored: &[fog_testkit::nats::StoredMessage]) -> BTreeMap<u64, usize> {
    let mut seen: BTreeMap<u64, usize> = BTreeMap::new();
    for m in stored {
        let body: serde_json::Value = serde_json::from_slice(&m.payload).unwrap();
        for kind in ["readings", "averages"] {
            for item in body[kind].as_array().into_iter().flatten() {
                *seen.entry(item["site_seq"].as_u64().unwrap()).or_default() += 1;
            }
        }
    }
    seen
}

#[test]
fn a_copy_of_an_older_message_at_the_end_of_the_stream_does_not_stop_the_uplink() {
    let Some((cloud, cfg, runtime)) = cloud_for("a_copy_of_an_older_message_at_the_end_of_the_stream_does_not_stop_the_uplink", "uplink-stray") else { return };
    let mut outbox = outbox();
    // Two windows forwarded (the outbox frees what the cloud has).
    let more = |outbox: &mut Outbox, from: u64| {
        for i in 0..20u64 {
            let reading = Reading { seq: from + i, speed_kmh: 80, timestamp_ms: 5_000 + from + i };
            outbox.push(2, 0, Owed::Reading { sensor_id: 1, incarnation: 1, segment: 1, reading });
        }
        outbox.last_seq()
    };
    for round in 0..2 {
        let want = if round == 0 { outbox.last_seq() } else { more(&mut outbox, 100) };
        let failures = forward(&runtime, &cfg, &mut outbox, want);
        assert!(failures.is_empty(), "{failures:?}");
    }

    // What the cloud has been seen to do after a change of stream leader:
    // an older message stored again at the end of the stream (another id,
    // so that the duplicate window does not drop it).
    let stored = cloud.read_stream(STREAM, Duration::from_secs(20)).unwrap();
    let copy = &stored[0];
    let stray = Outgoing {
        subject: copy.subject.clone(),
        msg_id: Some("a stray copy".into()),
        expected_last_seq: None,
        headers: copy.headers.iter().filter(|(k, _)| !k.to_ascii_lowercase().starts_with("nats-")).cloned().collect(),
        payload: copy.payload.clone(),
    };
    cloud.publish(None, vec![stray], 1).unwrap();
    let copied = items_in(std::slice::from_ref(copy));

    // The site goes on, and its uplink connects again.
    let last = more(&mut outbox, 200);
    let failures = forward(&runtime, &cfg, &mut outbox, last);
    assert!(failures.is_empty(), "the uplink stopped at the copy: {failures:?}");
    assert_eq!(outbox.forwarded(), last);
    let seen = items_in(&cloud.read_stream(STREAM, Duration::from_secs(20)).unwrap());
    assert_eq!(seen.keys().copied().collect::<Vec<_>>(), (1..=last).collect::<Vec<_>>(), "every item is in the stream");
    for (item, n) in &seen {
        let expected = if copied.contains_key(item) { 2 } else { 1 };
        assert_eq!(*n, expected, "item {item}: the copy's items twice, every other once");
    }
}

/// The identities of the readings in the stream, each with its count, and
/// the stream's superseded markers (first and last item).
fn readings_and_markers(stored: &[fog_testkit::nats::StoredMessage]) -> (BTreeMap<(u64, u64, u64), usize>, Vec<(u64, u64)>) {
    let mut readings: BTreeMap<(u64, u64, u64), usize> = BTreeMap::new();
    let mut markers = Vec::new();
    for m in stored {
        let body: serde_json::Value = serde_json::from_slice(&m.payload).unwrap();
        if body["superseded"] == true {
            markers.push((body["first"].as_u64().unwrap(), body["last"].as_u64().unwrap()));
        }
        for r in body["readings"].as_array().into_iter().flatten() {
            let id = |k: &str| r[k].as_u64().unwrap();
            *readings.entry((id("sensor_id"), id("incarnation"), id("seq"))).or_default() += 1;
        }
    }
    (readings, markers)
}

#[test]
fn another_history_at_the_end_of_the_stream_is_taken_over_and_nothing_goes_twice() {
    let Some((cloud, cfg, runtime)) = cloud_for("another_history_at_the_end_of_the_stream_is_taken_over_and_nothing_goes_twice", "uplink-adopt") else { return };
    let reading = |sensor_id: u32, seq: u64| Owed::Reading { sensor_id, incarnation: 1, segment: sensor_id % 2, reading: Reading { seq, speed_kmh: 70, timestamp_ms: 9_000 + seq } };

    // The pair's history, forwarded.
    let mut winner = outbox();
    let fork = winner.last_seq();
    assert!(forward(&runtime, &cfg, &mut winner, fork).is_empty());
    // A side cut off in a split goes on alone and forwards its own items:
    // readings of sensor 5 (the winner gets 0..4 later, in the merge) and
    // of sensor 6 (the winner counted 0..2 itself too), and an average.
    let mut loser = winner.clone();
    for seq in 0..5 {
        loser.push(3, 0, reading(5, seq));
    }
    for seq in 0..3 {
        loser.push(3, 0, reading(6, seq));
    }
    loser.push(3, 0, Owed::Average(Average { seq: 9, epoch: 2, segment: 0, window_end_ms: 1, count: 3, sum_kmh: 210, revision: 0, chain: 77 }));
    let end = loser.last_seq();
    assert!(forward(&runtime, &cfg, &mut loser, end).is_empty());
    // The winner's own items after the fork, and the merge of the loser's.
    for seq in 0..3 {
        winner.push(4, 0, reading(6, seq));
    }
    winner.push(4, 0, reading(7, 0));
    winner.push(4, 0, Owed::Average(Average { seq: 4, epoch: 3, segment: 0, window_end_ms: 1, count: 2, sum_kmh: 140, revision: 0, chain: 78 }));
    let failures = forward(&runtime, &cfg, &mut winner, ALL);
    assert!(failures.is_empty(), "{failures:?}");
    assert_eq!(winner.forwarded(), winner.last_seq());
    assert_eq!(winner.adopted(), (end - fork, 1));
    for seq in 0..5 {
        winner.push(5, 0, reading(5, seq));
    }
    winner.push(5, 0, reading(7, 1));
    let last = winner.last_seq();
    let failures = forward(&runtime, &cfg, &mut winner, last);
    assert!(failures.is_empty(), "{failures:?}");

    let stored = cloud.read_stream(STREAM, Duration::from_secs(20)).unwrap();
    let seen = items_in(&stored);
    assert!(seen.values().all(|&n| n == 1), "an item is in the stream twice: {seen:?}");
    assert_eq!(seen.keys().copied().collect::<Vec<_>>(), (1..=last).collect::<Vec<_>>(), "site items follow on, the other history's included");
    let (readings, markers) = readings_and_markers(&stored);
    assert!(readings.values().all(|&n| n == 1), "a reading is in the stream twice: {readings:?}");
    for (sensor, seqs) in [(5, 0..5), (6, 0..3), (7, 0..2)] {
        for seq in seqs {
            assert_eq!(readings.get(&(sensor, 1, seq)), Some(&1), "sensor {sensor} reading {seq}");
        }
    }
    assert_eq!(markers, vec![(fork + 1, end)], "the other history's items are marked");
    assert_eq!(last, end + 3, "the winner's items after the fork, less the readings the stream held: 7/0, its average, 7/1");
}
