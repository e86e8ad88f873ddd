//! Unit tests of the node alone: a primary that serves without its peer,
//! screening and deduplicating batches, and which epochs it takes as
//! evidence. The pair together, with a host and its sensors, is tested by the
//! whole-system simulation (the `fog-sim` crate).

use fog_protocol::{
    BatchReply, MAX_EPOCH, NodeState, PeerHeartbeat, PeerMessage, Reading, Refusal, RefusedReadings, Reply, Request, Seal,
    SensorBatch,
};

use super::{Node, NodeConfig, Output};
use crate::clock::Now;
use crate::fsm::Role;
use crate::seal::EpochSeal;
use crate::windows::WindowConfig;

const T0: u64 = 1_700_000_000_000;
const HOUR: u64 = 3_600_000;

fn batch(id: u64, seq: u64, ts: u64) -> Request {
    Request::Batch {
        batch_id: id,
        epoch: 0,
        seal: [0; 16],
        sensors: vec![SensorBatch {
            sensor_id: 1,
            incarnation: 7,
            segment: 0,
            readings: vec![Reading { seq, speed_kmh: 100, timestamp_ms: ts }],
            average_cursor: None,
        }],
    }
}

const KEY: [u8; 32] = [9; 32];

fn config() -> NodeConfig {
    NodeConfig { role: Role::Primary, heartbeat_ms: 250, windows: WindowConfig::default(), snapshot_every: 1_000_000, seal_key: KEY, outbox: Default::default() }
}

/// Drives a lone primary: every write is made durable at once.
fn settle(node: &mut Node, now: u64) {
    while let Some(out) = node.poll_output() {
        if let Output::Append(entry) = out {
            node.handle_durable(Now::both(now), entry.lsn, false);
        } else if let Output::SaveSnapshot { lsn, .. } = out {
            node.handle_durable(Now::both(now), lsn, true);
        }
    }
}

/// A primary that never heard its peer, active after `n` batches of one
/// reading a second; and the time after them.
fn serving_alone(n: u64) -> (Node, u64) {
    let cfg = config();
    let mut node = Node::new(cfg);
    let mut now = T0 + 10_000;
    for seq in 0..n {
        node.handle_request(Now::both(now), seq, &batch(seq, seq, now));
        settle(&mut node, now);
        node.handle_timeout(Now::both(now));
        settle(&mut node, now);
        now += 1_000;
    }
    assert_eq!(node.state(), NodeState::Active);
    (node, now)
}

#[test]
fn readings_accepted_alone_are_kept_for_a_merge_only_within_the_dedup_horizon() {
    // Alone from the start: the peer never appeared.
    let (mut node, mut now) = serving_alone(50);
    assert_eq!(node.status().unconfirmed, 50, "readings accepted alone wait for a merge");
    // Serving alone for more than the horizon (time passes in steps, as
    // a running node sees it: a jump would look like a pause): the old
    // ones are let go, the recent ones are still kept.
    let late = now + HOUR;
    while now < late {
        node.handle_timeout(Now::both(now));
        settle(&mut node, now);
        now += 500;
    }
    for seq in 50..60 {
        node.handle_request(Now::both(late + seq), seq, &batch(seq, seq, late + seq));
        settle(&mut node, late + seq);
    }
    let mut now = late + 100;
    while now < late + 10_000 {
        node.handle_timeout(Now::both(now));
        settle(&mut node, now);
        now += 500;
    }
    assert_eq!(node.state(), NodeState::Active, "still serving alone");
    let status = node.status();
    assert_eq!(status.unconfirmed, 10, "only the readings within the horizon are kept: {status:?}");
    assert_eq!(status.counted, 60, "trimming forgets nothing that was counted");
}

#[test]
fn a_passive_that_joins_before_its_first_heartbeat_is_not_dropped_at_the_next_timeout() {
    let (mut node, now) = serving_alone(3);
    // A restarted backup joins; its heartbeats have not come through
    // (its first went out before this node's subscription was up).
    node.handle_peer(Now::both(now), PeerMessage::Join { epoch: 0 });
    settle(&mut node, now);
    let mut t = now + 10;
    while t < now + 400 {
        node.handle_timeout(Now::both(t));
        settle(&mut node, t);
        t += 50;
    }
    let replication = node.status().replication;
    assert_eq!(replication, fog_protocol::Replication::PassiveJoining, "the passive was dropped as gone");
}

#[test]
fn while_a_passive_joins_the_active_acks_alone_and_is_in_sync_only_once_the_passive_has_that_too() {
    use fog_protocol::Replication;
    let (mut node, now) = serving_alone(3);
    let joined_at = node.lsn();
    node.handle_peer(Now::both(now), PeerMessage::Join { epoch: 0 });
    settle(&mut node, now);
    // The passive is installing its snapshot: a batch is acked alone,
    // and its readings wait for a merge should the pair split now.
    node.handle_request(Now::both(now + 10), 99, &batch(99, 3, now + 10));
    let acked = replies(&mut node, now + 10);
    assert!(matches!(acked.as_slice(), [Reply::Batch(r)] if r.acks[0].next_seq == 4), "not acked alone while the passive joins: {acked:?}");
    let solo = node.lsn();
    assert!(solo > joined_at);
    assert_eq!(node.status().unconfirmed, 4, "the reading acked alone is unconfirmed too");
    // Its snapshot durable there: the passive replicates from now on, but
    // it is in sync only once it has what was acked alone meanwhile.
    node.handle_peer(Now::both(now + 20), PeerMessage::Ack { epoch: node.epoch(), durable: joined_at });
    assert_eq!(node.status().replication, Replication::PassiveJoining);
    node.handle_request(Now::both(now + 30), 100, &batch(100, 4, now + 30));
    assert!(replies(&mut node, now + 30).is_empty(), "a reply must wait for a passive whose snapshot is durable");
    assert!(!node.has_passive_in_sync());
    node.handle_peer(Now::both(now + 40), PeerMessage::Ack { epoch: node.epoch(), durable: solo });
    assert!(node.has_passive_in_sync(), "the passive has the snapshot and everything acked alone");
    assert_eq!(node.status().unconfirmed, 0, "what the passive holds is confirmed");
    assert!(replies(&mut node, now + 40).is_empty(), "the held reply waits for its own entry");
    node.handle_peer(Now::both(now + 50), PeerMessage::Ack { epoch: node.epoch(), durable: node.lsn() });
    assert_eq!(replies(&mut node, now + 50).len(), 1);
}

#[test]
fn a_join_repeated_while_its_snapshot_is_on_the_way_gets_no_second_snapshot_and_a_silent_joining_passive_is_kept_longer() {
    let (mut node, now) = serving_alone(3);
    let snapshots_sent = |node: &mut Node, now: u64| {
        let mut n = 0;
        while let Some(out) = node.poll_output() {
            match out {
                Output::Peer(PeerMessage::Snapshot { .. }) => n += 1,
                Output::Append(entry) => node.handle_durable(Now::both(now), entry.lsn, false),
                Output::SaveSnapshot { lsn, .. } => node.handle_durable(Now::both(now), lsn, true),
                _ => {}
            }
        }
        n
    };
    node.handle_peer(Now::both(now), PeerMessage::Join { epoch: 0 });
    assert_eq!(snapshots_sent(&mut node, now), 1);
    // Asked again one retry later (4 heartbeats): the snapshot is still
    // on its way, and a second one would only crowd it out.
    node.handle_peer(Now::both(now + 1_000), PeerMessage::Join { epoch: 0 });
    assert_eq!(snapshots_sent(&mut node, now + 1_000), 0, "a repeated join got a second snapshot");
    // Silent since (installing it): kept past two heartbeats of silence.
    let mut t = now + 1_000;
    while t < now + 2_200 {
        node.handle_timeout(Now::both(t));
        settle(&mut node, t);
        t += 50;
    }
    assert_eq!(node.status().replication, fog_protocol::Replication::PassiveJoining, "a joining passive was dropped after 1.2 s of silence");
    // Asked again later: it lost the snapshot, and gets a new one.
    node.handle_peer(Now::both(t), PeerMessage::Join { epoch: 0 });
    assert_eq!(snapshots_sent(&mut node, t), 1);
    // Silent for good: dropped after eight heartbeats.
    let until = t + 2_500;
    while t < until {
        node.handle_timeout(Now::both(t));
        settle(&mut node, t);
        t += 50;
    }
    assert_eq!(node.status().replication, fog_protocol::Replication::Alone, "a silent joining passive is dropped in the end");
}

/// Every reply the node has for clients, drained.
fn replies(node: &mut Node, now: u64) -> Vec<Reply> {
    let mut out = Vec::new();
    while let Some(o) = node.poll_output() {
        match o {
            Output::Append(entry) => node.handle_durable(Now::both(now), entry.lsn, false),
            Output::SaveSnapshot { lsn, .. } => node.handle_durable(Now::both(now), lsn, true),
            Output::Reply { reply, .. } => out.push(reply),
            Output::Peer(_) => {}
        }
    }
    out
}

/// A batch of one sensor (1, incarnation 7) with these readings, the
/// host's `epoch` and `seal`, and the sensor's `cursor`.
fn sealed_batch(id: u64, epoch: u64, seal: Seal, readings: Vec<Reading>, cursor: Option<fog_protocol::AverageCursor>) -> Request {
    Request::Batch {
        batch_id: id,
        epoch,
        seal,
        sensors: vec![SensorBatch { sensor_id: 1, incarnation: 7, segment: 0, readings, average_cursor: cursor }],
    }
}

fn batch_reply(replies: &[Reply]) -> &BatchReply {
    match replies {
        [Reply::Batch(b)] => b,
        other => panic!("expected one batch reply: {other:?}"),
    }
}

#[test]
fn a_node_that_lost_its_data_does_not_serve_sensors_that_applied_a_newer_epochs_averages() {
    let cfg = config();
    let seal = EpochSeal::new(KEY);
    // A primary restarted with an empty data dir, its peer out of reach,
    // and a host whose sensors applied averages of epoch 7; the host has
    // the pair's seal of epoch 7 from a reply.
    let now = T0 + 10_000;
    let cursor = Some(fog_protocol::AverageCursor { seq: 2_000, epoch: 7, chain: 42 });
    let mut node = Node::new(cfg);
    node.handle_request(Now::both(now), 1, &sealed_batch(1, 7, seal.seal(7), vec![Reading { seq: 0, speed_kmh: 100, timestamp_ms: now }], cursor));
    let got = replies(&mut node, now);
    assert!(matches!(got.as_slice(), [Reply::NotActive { epoch: 7, seal: s, .. }] if *s == seal.seal(7)), "{got:?}");
    assert_ne!(node.state(), NodeState::Active);
    // A host that cannot show a seal of epoch 7 (it restarted, or it
    // forges): the cursors alone prove nothing. The node serves, and
    // neither steps down nor moves (rewinds) those sensors.
    for (epoch, host_seal) in [(0, [0; 16]), (7, [0; 16]), (7, seal.seal(6))] {
        let mut node = Node::new(cfg);
        node.handle_request(Now::both(now), 1, &sealed_batch(1, epoch, host_seal, vec![Reading { seq: 0, speed_kmh: 100, timestamp_ms: now }], cursor));
        let got = replies(&mut node, now);
        let reply = batch_reply(&got);
        assert_eq!(node.state(), NodeState::Active, "host epoch {epoch}");
        assert!(reply.repositions.is_empty() && reply.averages.is_empty(), "an unverifiable cursor was moved: {reply:?}");
        assert_eq!(reply.acks[0].next_seq, 1, "its readings are still acked");
        assert_eq!((reply.epoch, reply.seal), (1, seal.seal(1)), "the reply names its own epoch, sealed");
        let forged = if epoch == 0 { 1 } else { 2 };
        assert_eq!(node.status().forged_epochs, forged, "the host's and the cursor's epochs are counted");
    }
}

#[test]
fn a_forged_host_epoch_does_not_make_the_active_step_down() {
    let (mut node, now) = serving_alone(2);
    let epoch = node.epoch();
    for (i, claimed) in [epoch + 1, epoch + 2, 1 << 40, MAX_EPOCH - 1, MAX_EPOCH, u64::MAX].into_iter().enumerate() {
        for forged in [[0; 16], [0xab; 16]] {
            node.handle_request(Now::both(now), 10, &sealed_batch(10 + i as u64, claimed, forged, Vec::new(), None));
            let got = replies(&mut node, now);
            assert!(matches!(got.as_slice(), [Reply::Batch(_)]), "epoch {claimed}: {got:?}");
            assert_eq!((node.state(), node.epoch()), (NodeState::Active, epoch), "epoch {claimed}");
        }
    }
    assert_eq!(node.status().forged_epochs, 12);
    // The pair's own seal of a newer epoch still counts.
    let seal = EpochSeal::new(KEY);
    node.handle_request(Now::both(now), 11, &sealed_batch(99, epoch + 1, seal.seal(epoch + 1), Vec::new(), None));
    assert!(matches!(replies(&mut node, now).as_slice(), [Reply::NotActive { .. }]));
    assert_ne!(node.state(), NodeState::Active);
}

#[test]
fn an_epoch_past_the_limit_counts_from_no_one_and_takeovers_never_wrap() {
    // Sealed by the pair itself (say, a key that leaked), or heard from
    // the peer: at or above MAX_EPOCH it is not evidence.
    let seal = EpochSeal::new(KEY);
    for claimed in [MAX_EPOCH, u64::MAX] {
        let (mut node, now) = serving_alone(2);
        node.handle_request(Now::both(now), 10, &sealed_batch(10, claimed, seal.seal(claimed), Vec::new(), None));
        assert!(matches!(replies(&mut node, now).as_slice(), [Reply::Batch(_)]), "host epoch {claimed}");
        let hb = PeerHeartbeat { state: NodeState::Backup, epoch: claimed, lsn: 0, complete: true, peer_in_sync: false };
        node.handle_peer(Now::both(now), PeerMessage::Heartbeat(hb));
        node.handle_peer(Now::both(now), PeerMessage::Join { epoch: claimed });
        assert_eq!((node.state(), node.epoch()), (NodeState::Active, 1), "peer epoch {claimed}");
        assert_eq!(node.status().forged_epochs, 3);
    }
    // The highest epoch a node can hear of still leaves room to take
    // over with (MAX_EPOCH - 1 is odd: the primary's next is MAX_EPOCH,
    // which it must not take).
    let mut node = Node::new(config());
    let now = T0 + 10_000;
    node.handle_request(Now::both(now), 1, &sealed_batch(1, MAX_EPOCH - 1, seal.seal(MAX_EPOCH - 1), Vec::new(), None));
    assert_eq!(node.epoch(), MAX_EPOCH - 1);
    assert!(matches!(replies(&mut node, now).as_slice(), [Reply::NotActive { .. }]));
    node.handle_request(Now::both(now), 2, &sealed_batch(2, MAX_EPOCH - 1, seal.seal(MAX_EPOCH - 1), Vec::new(), None));
    let _ = replies(&mut node, now);
    assert!(node.epoch() < MAX_EPOCH, "took epoch {}", node.epoch());
    assert_ne!(node.state(), NodeState::Active, "no epoch left: it must not serve");
}

#[test]
fn an_expired_reading_with_a_far_seq_is_acked_but_moves_no_ledger() {
    let (mut node, now) = serving_alone(3);
    let poison = Reading { seq: 1_000_000, speed_kmh: 1, timestamp_ms: 0 };
    node.handle_request(Now::both(now), 10, &sealed_batch(10, 0, [0; 16], vec![poison], None));
    let got = replies(&mut node, now);
    let reply = batch_reply(&got);
    assert_eq!(reply.acks[0].next_seq, 3);
    assert_eq!(reply.acks[0].also, vec![1_000_000], "the expired reading is acked");
    assert!(reply.refused.is_empty());
    // The sensor's next reading still counts.
    node.handle_request(Now::both(now), 11, &sealed_batch(11, 0, [0; 16], vec![Reading { seq: 3, speed_kmh: 100, timestamp_ms: now }], None));
    let got = replies(&mut node, now);
    assert_eq!(batch_reply(&got).acks[0].next_seq, 4);
    let status = node.status();
    assert_eq!((status.counted, status.expired, status.duplicates), (4, 1, 0));
}

#[test]
fn readings_with_seqs_out_of_range_or_from_the_future_are_refused_and_counted() {
    let (mut node, now) = serving_alone(3);
    let skew = WindowConfig::default().max_clock_skew_ms;
    let hostile = vec![
        Reading { seq: 1 << 62, speed_kmh: 1, timestamp_ms: 0 },
        Reading { seq: u64::MAX, speed_kmh: 1, timestamp_ms: now },
        Reading { seq: fog_protocol::MAX_SEQ, speed_kmh: 1, timestamp_ms: now },
        Reading { seq: 3 + crate::ingest::MAX_SEQ_AHEAD + 1, speed_kmh: 1, timestamp_ms: now },
        Reading { seq: 3, speed_kmh: 1, timestamp_ms: now + skew + 1 },
        Reading { seq: 4, speed_kmh: 1, timestamp_ms: u64::MAX },
        Reading { seq: 5, speed_kmh: 100, timestamp_ms: now + skew },
    ];
    node.handle_request(Now::both(now), 10, &sealed_batch(10, 0, [0; 16], hostile, None));
    let got = replies(&mut node, now);
    let reply = batch_reply(&got);
    assert_eq!(reply.acks[0].next_seq, 3);
    assert_eq!(reply.acks[0].also, vec![5], "only the reading within the skew is acked");
    let mut refused = reply.refused.clone();
    refused.sort_by_key(|r| r.count);
    assert_eq!(
        refused,
        vec![
            RefusedReadings { sensor_id: 1, reason: Refusal::FromTheFuture, count: 2 },
            RefusedReadings { sensor_id: 1, reason: Refusal::SeqOutOfRange, count: 4 },
        ]
    );
    let status = node.status();
    assert_eq!((status.refused.seq_out_of_range, status.refused.from_the_future), (4, 2));
    assert_eq!(status.counted, 4, "refused readings are not counted");
    // Nothing refused reached the log or the ledger: the sensor's own
    // readings 3 and 4 still count.
    let readings = (3..5).map(|seq| Reading { seq, speed_kmh: 100, timestamp_ms: now }).collect();
    node.handle_request(Now::both(now), 11, &sealed_batch(11, 0, [0; 16], readings, None));
    let got = replies(&mut node, now);
    assert_eq!(batch_reply(&got).acks[0].next_seq, 6);
    assert_eq!(node.status().counted, 6);
    node.record_refusal(Refusal::ForeignSensor, 3);
    node.record_malformed();
    let status = node.status();
    assert_eq!((status.refused.foreign_sensor, status.refused.malformed, status.malformed_frames), (3, 1, 1));
}

#[test]
fn a_reading_far_above_the_watermark_cannot_close_the_gap_below_it_later() {
    // A current reading with a seq far ahead would be counted above the
    // watermark; once it aged past the horizon, compaction would move
    // the watermark over it and every later reading would be a
    // duplicate. It is refused instead.
    let (mut node, mut now) = serving_alone(3);
    let far = [1 << 62, 3 + crate::ingest::MAX_SEQ_AHEAD + 1];
    let readings = far.iter().map(|&seq| Reading { seq, speed_kmh: 1, timestamp_ms: now }).collect();
    node.handle_request(Now::both(now), 10, &sealed_batch(10, 0, [0; 16], readings, None));
    let _ = replies(&mut node, now);
    let late = now + HOUR + 10_000;
    while now < late {
        node.handle_timeout(Now::both(now));
        let _ = replies(&mut node, now);
        now += 500;
    }
    node.handle_request(Now::both(now), 11, &sealed_batch(11, 0, [0; 16], vec![Reading { seq: 3, speed_kmh: 100, timestamp_ms: now }], None));
    let _ = replies(&mut node, now);
    let status = node.status();
    assert_eq!((status.counted, status.duplicates), (4, 0), "{status:?}");
}

#[test]
fn a_batch_of_65536_readings_of_one_sensor_is_counted_and_acked_once_each() {
    let (mut node, now) = serving_alone(1);
    let n = fog_protocol::MAX_READINGS_PER_BATCH as u64;
    // Seqs 1.. in reverse order, the last 100 of them twice.
    let mut readings: Vec<Reading> = (1..n - 99).rev().map(|seq| Reading { seq, speed_kmh: 90, timestamp_ms: now }).collect();
    readings.extend((n - 199..n - 99).map(|seq| Reading { seq, speed_kmh: 90, timestamp_ms: now }));
    assert_eq!(readings.len() as u64, n);
    node.handle_request(Now::both(now), 10, &sealed_batch(10, 0, [0; 16], readings, None));
    let got = replies(&mut node, now);
    let ack = &batch_reply(&got).acks[0];
    assert_eq!((ack.next_seq, ack.also.len()), (n - 99, 0));
    let status = node.status();
    assert_eq!((status.counted, status.duplicates), (n - 99, 100));
    assert_eq!(status.per_sensor[0].sum_kmh, 100 + (n - 100) * 90);
}

#[test]
fn a_seq_repeated_in_a_batch_counts_once_whether_the_seqs_rise_before_it_or_not() {
    let (mut node, now) = serving_alone(1);
    let r = |seq: u64| Reading { seq, speed_kmh: 90, timestamp_ms: now };
    // Seq 0 was counted before (at 100 km/h); then a seq repeated at
    // once, rising seqs, a repeat of an earlier one, seqs rising again,
    // the second one again, and two out of order.
    let seqs = [0, 1, 1, 2, 3, 2, 4, 5, 1, 7, 6];
    node.handle_request(Now::both(now), 10, &sealed_batch(11, 0, [0; 16], seqs.iter().map(|&s| r(s)).collect(), None));
    // The log holds each new reading once.
    let mut logged = Vec::new();
    let mut got = Vec::new();
    while let Some(o) = node.poll_output() {
        match o {
            Output::Append(entry) => {
                if let fog_protocol::Record::ReadingsAccepted { sensors, .. } = &entry.record {
                    logged.extend(sensors.iter().flat_map(|s| s.readings.iter().map(|r| r.seq)));
                }
                node.handle_durable(Now::both(now), entry.lsn, false);
            }
            Output::Reply { reply, .. } => got.push(reply),
            _ => {}
        }
    }
    assert_eq!(logged, [1, 2, 3, 4, 5, 7, 6]);
    let ack = &batch_reply(&got).acks[0];
    assert_eq!((ack.next_seq, ack.also.len()), (8, 0));
    let status = node.status();
    assert_eq!((status.counted, status.duplicates), (8, 4), "{status:?}");
    assert_eq!(status.per_sensor[0].sum_kmh, 100 + 7 * 90);
}

/// Drives a lone active through `steps` timeouts 100 ms apart on the
/// monotonic clock, the wall clock reading `wall(mono)`; returns whether it
/// stayed active all along.
fn stays_active(node: &mut Node, mono0: u64, steps: u64, wall: impl Fn(u64) -> u64) -> bool {
    (0..steps).all(|i| {
        let mono = mono0 + i * 100;
        let now = Now {
            mono_ms: mono,
            wall_ms: wall(mono),
        };
        node.handle_timeout(now);
        while let Some(out) = node.poll_output() {
            match out {
                Output::Append(entry) => node.handle_durable(now, entry.lsn, false),
                Output::SaveSnapshot { lsn, .. } => node.handle_durable(now, lsn, true),
                _ => {}
            }
        }
        node.state() == NodeState::Active
    })
}

#[test]
fn a_step_of_the_wall_clock_is_not_a_pause_but_a_jump_of_the_monotonic_one_is() {
    // An NTP step forward by a minute, then back by two: event time moves,
    // liveness does not notice.
    let (mut node, now) = serving_alone(5);
    let epoch = node.epoch();
    let steps = |mono: u64| {
        if mono < now + 2_000 {
            mono
        } else if mono < now + 4_000 {
            mono + 60_000
        } else {
            mono - 60_000
        }
    };
    assert!(
        stays_active(&mut node, now, 60, steps),
        "a wall-clock step made the active step down"
    );
    assert_eq!(node.epoch(), epoch);
    // Averages are still published, by the wall clock as it now reads.
    let published = node.status().averages_published;
    let (mono, wall) = (now + 6_000, now - 54_000);
    node.handle_request(
        Now {
            mono_ms: mono,
            wall_ms: wall,
        },
        50,
        &batch(50, 5, wall),
    );
    assert!(stays_active(&mut node, mono, 100, |m| m - 60_000));
    assert!(
        node.status().averages_published > published,
        "the reading's window was not published"
    );
    assert_eq!(node.status().counted, 6);
    // The process was frozen for two seconds: the monotonic clock jumps
    // and the node steps down until it hears its peer.
    assert!(
        !stays_active(&mut node, now + 20_000, 1, |mono| mono - 60_000),
        "a pause went unnoticed"
    );
}

#[test]
fn a_state_larger_than_a_frame_reaches_a_joining_passive_in_parts() {
    // Enough sensors that the active's state takes several frames.
    let (mut primary, mut now) = serving_alone(1);
    let sensors_per_batch = fog_protocol::MAX_SENSORS_PER_BATCH as u32;
    for b in 0..6u32 {
        let sensors = (0..sensors_per_batch)
            .map(|i| SensorBatch {
                sensor_id: 100 + b * sensors_per_batch + i,
                incarnation: u64::from(i) << 20 | 7,
                segment: 0,
                readings: vec![Reading { seq: 3, speed_kmh: 100, timestamp_ms: now }],
                average_cursor: None,
            })
            .collect();
        let request = Request::Batch { batch_id: 1_000 + u64::from(b), epoch: 0, seal: [0; 16], sensors };
        primary.handle_request(Now::both(now), 1_000, &request);
        settle(&mut primary, now);
    }
    let state_bytes = primary.replica.encode().unwrap().len();
    assert!(state_bytes > fog_protocol::SNAPSHOT_PART_BYTES, "the state is {state_bytes} bytes: not enough for two parts");

    let mut backup = Node::new(NodeConfig { role: Role::Backup, ..config() });
    let heartbeat = |node: &Node| PeerMessage::Heartbeat(PeerHeartbeat {
        state: NodeState::Active,
        epoch: node.epoch(),
        lsn: node.replica.lsn,
        complete: true,
        peer_in_sync: false,
    });
    let mut parts = 0;
    let mut saved = None;
    for _ in 0..20 {
        now += 250;
        backup.handle_peer(Now::both(now), heartbeat(&primary));
        backup.handle_timeout(Now::both(now));
        while let Some(out) = backup.poll_output() {
            match out {
                Output::Peer(msg) => primary.handle_peer(Now::both(now), msg),
                Output::SaveSnapshot { lsn, bytes } => {
                    saved = Some(bytes);
                    backup.handle_durable(Now::both(now), lsn, true);
                }
                _ => {}
            }
        }
        while let Some(out) = primary.poll_output() {
            if let Output::Peer(msg @ PeerMessage::Snapshot { .. }) = out {
                let bytes = fog_protocol::encode(&msg).expect("every part fits in a frame");
                assert!(bytes.len() <= fog_protocol::MAX_FRAME_BYTES);
                parts += 1;
                backup.handle_peer(Now::both(now), msg);
            }
        }
        if backup.caught_up {
            break;
        }
    }
    assert!(backup.caught_up, "the passive never installed the snapshot ({parts} parts came)");
    assert_eq!(parts, state_bytes.div_ceil(fog_protocol::SNAPSHOT_PART_BYTES));
    assert_eq!(backup.status().counted, primary.status().counted);
    assert_eq!(backup.replica.lsn, primary.replica.lsn);
    // What it saved is its own snapshot, copied from the parts rather than
    // encoded again: as long as what encoding gives (the maps' order may
    // differ), and a restart from it has the same state.
    while let Some(out) = backup.poll_output() {
        if let Output::SaveSnapshot { bytes, .. } = out {
            saved = Some(bytes);
        }
    }
    let saved = saved.expect("the passive saved the installed state");
    assert_eq!(saved.len(), backup.local_snapshot().expect("encodes").len());
    let restarted = Node::recover(NodeConfig { role: Role::Backup, ..config() }, Some(&saved), &[]).expect("recovers");
    assert_eq!(restarted.lsn(), backup.lsn());
    assert_eq!(restarted.status().per_sensor, backup.status().per_sensor);
    assert_eq!(restarted.status().counted, primary.status().counted);
}

#[test]
fn snapshot_parts_out_of_order_or_out_of_bounds_install_nothing() {
    let (primary, now) = serving_alone(3);
    let state = primary.replica.encode().unwrap();
    let mut backup = Node::new(NodeConfig { role: Role::Backup, ..config() });
    backup.last_join_ms = Some(now); // it asked
    let part = |part, parts, state: &[u8]| PeerMessage::Snapshot { epoch: 0, lsn: primary.replica.lsn, part, parts, state: state.to_vec() };
    let (a, b) = state.split_at(state.len() / 2);
    // The second part first, a part past the count, too many parts, a part
    // too large, and a first part followed by another snapshot's second.
    for msg in [
        part(1, 2, b),
        part(2, 2, a),
        part(0, fog_protocol::MAX_SNAPSHOT_PARTS + 1, a),
        part(0, 1, &vec![0; fog_protocol::SNAPSHOT_PART_BYTES + 1]),
        part(0, 2, a),
        PeerMessage::Snapshot { epoch: 0, lsn: primary.replica.lsn + 1, part: 1, parts: 2, state: b.to_vec() },
    ] {
        backup.handle_peer(Now::both(now), msg);
        assert!(!backup.caught_up);
    }
    // In order, it is installed.
    backup.handle_peer(Now::both(now), part(0, 2, a));
    backup.handle_peer(Now::both(now), part(1, 2, b));
    assert!(backup.caught_up);
    assert_eq!(backup.status().counted, 3);
}

#[test]
fn a_nodes_own_snapshot_keeps_what_its_outbox_took_over_of_another_history() {
    use fog_protocol::{LogEntry, ReadingInCloud, Record};
    let cfg = NodeConfig { outbox: crate::outbox::OutboxConfig { enabled: true, backlog_bytes: 1 << 20 }, ..config() };
    let mut node = Node::new(cfg);
    // Readings a side that lost a split forwarded: not to go twice.
    let in_cloud = vec![ReadingInCloud { sensor_id: 1, incarnation: 7, seq: 3, timestamp_ms: T0 }];
    node.replica.apply(&LogEntry { lsn: 1, epoch: 1, solo: false, record: Record::UplinkInCloud { readings: in_cloud } }).unwrap();
    assert!(*node.replica.outbox.adopted_state() != Default::default());
    let bytes = node.local_snapshot().expect("encodes");
    let restarted = Node::recover(cfg, Some(&bytes), &[]).expect("recovers");
    assert_eq!(restarted.replica.outbox.adopted_state(), node.replica.outbox.adopted_state(), "lost at a restart");
    // A snapshot from before the adopted state was kept still reads.
    let without = &bytes[..bytes.len() - postcard::to_allocvec(node.replica.outbox.adopted_state()).unwrap().len()];
    assert_eq!(Node::recover(cfg, Some(without), &[]).expect("recovers").lsn(), 1);
}

/// What a pair moved: the primary's replies and local snapshots, and the
/// peer messages each node sent (whether the link carried them or not).
#[derive(Default)]
struct Moved {
    replies: Vec<Reply>,
    primary_snapshots: usize,
    from_primary: Vec<PeerMessage>,
    from_backup: Vec<PeerMessage>,
}

impl Moved {
    fn any_from_primary(&self, what: fn(&PeerMessage) -> bool) -> bool {
        self.from_primary.iter().any(what)
    }

    fn any_from_backup(&self, what: fn(&PeerMessage) -> bool) -> bool {
        self.from_backup.iter().any(what)
    }
}

/// Which peer messages the link between a pair carries.
type Link = fn(bool, &PeerMessage) -> bool;
const UP: Link = |_, _| true;
const DOWN: Link = |_, _| false;

fn is_snapshot(m: &PeerMessage) -> bool {
    matches!(m, PeerMessage::Snapshot { .. })
}

fn is_join(m: &PeerMessage) -> bool {
    matches!(m, PeerMessage::Join { .. })
}

/// Runs a primary and a backup for `steps` steps of 50 ms from `now`: at
/// each both take their timeout, every write is made durable at once, and
/// each peer message goes to the other node if `link(from_primary,
/// message)` carries it.
fn run_pair(primary: &mut Node, backup: &mut Node, now: &mut u64, steps: usize, link: Link) -> Moved {
    let mut moved = Moved::default();
    for _ in 0..steps {
        *now += 50;
        let t = Now::both(*now);
        primary.handle_timeout(t);
        backup.handle_timeout(t);
        let mut any = true;
        while any {
            any = false;
            for from_primary in [true, false] {
                let (node, other) = if from_primary { (&mut *primary, &mut *backup) } else { (&mut *backup, &mut *primary) };
                while let Some(out) = node.poll_output() {
                    any = true;
                    match out {
                        Output::Append(entry) => node.handle_durable(t, entry.lsn, false),
                        Output::SaveSnapshot { lsn, .. } => {
                            moved.primary_snapshots += usize::from(from_primary);
                            node.handle_durable(t, lsn, true);
                        }
                        Output::Reply { reply, .. } => moved.replies.push(reply),
                        Output::Peer(msg) => {
                            if link(from_primary, &msg) {
                                other.handle_peer(t, msg.clone());
                            }
                            if from_primary { &mut moved.from_primary } else { &mut moved.from_backup }.push(msg);
                        }
                    }
                }
            }
        }
    }
    moved
}

/// A primary that served `n` batches alone, and a backup that joined it:
/// in sync, after one snapshot.
fn pair_in_sync(n: u64) -> (Node, Node, u64) {
    let (mut primary, mut now) = serving_alone(n);
    let mut backup = Node::new(NodeConfig { role: Role::Backup, ..config() });
    let moved = run_pair(&mut primary, &mut backup, &mut now, 20, UP);
    assert!(primary.has_passive_in_sync() && backup.caught_up, "the pair never got in sync");
    assert_eq!(moved.from_primary.iter().filter(|m| is_snapshot(m)).count(), 1);
    (primary, backup, now)
}

#[test]
fn a_passive_that_falls_silent_or_misses_entries_catches_up_from_what_the_active_kept_without_a_new_snapshot() {
    use fog_protocol::Replication;
    let (mut primary, mut backup, mut now) = pair_in_sync(3);
    let mut seq = 3;
    let mut send = |primary: &mut Node, now: u64| {
        primary.handle_request(Now::both(now), seq, &batch(100 + seq, seq, now));
        seq += 1;
    };
    let same = |primary: &Node, backup: &Node| (backup.lsn(), backup.status().counted) == (primary.lsn(), primary.status().counted);

    // The passive falls silent (its machine starved, its loop busy): a
    // batch waiting for it is acked alone two heartbeats on, and so is
    // every batch after it.
    send(&mut primary, now);
    let silent = run_pair(&mut primary, &mut backup, &mut now, 16, DOWN);
    send(&mut primary, now);
    let later = run_pair(&mut primary, &mut backup, &mut now, 8, DOWN);
    assert_eq!(silent.replies.len() + later.replies.len(), 2, "batches were held for a silent passive");
    assert!(!silent.any_from_primary(is_snapshot) && !later.any_from_primary(is_snapshot));
    assert_eq!(primary.status().replication, Replication::PassiveJoining);
    assert_eq!(primary.status().unconfirmed, 2, "what was acked alone waits for a merge should the pair split");
    // Heard again: it gets what it lacks, not a new snapshot, and is in
    // sync again.
    let back = run_pair(&mut primary, &mut backup, &mut now, 30, UP);
    assert!(!back.any_from_primary(is_snapshot), "a passive back from silence got a new snapshot");
    assert!(!back.any_from_backup(is_join), "a passive back from silence joined again");
    assert!(primary.has_passive_in_sync(), "{:?}", primary.status().replication);
    assert!(same(&primary, &backup));
    assert_eq!(primary.status().unconfirmed, 0, "what the passive holds is confirmed");
    // Replies wait for it again.
    send(&mut primary, now);
    assert!(replies(&mut primary, now).is_empty(), "a reply did not wait for the passive back in sync");
    assert_eq!(run_pair(&mut primary, &mut backup, &mut now, 1, UP).replies.len(), 1);

    // One message of entries is lost on the way: the passive does not
    // join again, it takes the entries when the active sends them again.
    send(&mut primary, now);
    run_pair(&mut primary, &mut backup, &mut now, 1, |from_primary, m| !(from_primary && matches!(m, PeerMessage::Records { .. })));
    assert!(backup.lsn() < primary.lsn());
    send(&mut primary, now);
    let filled = run_pair(&mut primary, &mut backup, &mut now, 30, UP);
    assert!(!filled.any_from_primary(is_snapshot), "a gap was filled by a new snapshot");
    assert!(!filled.any_from_backup(is_join), "a gap made the passive join again");
    assert_eq!(filled.replies.len(), 2, "both batches are acked once the passive has them");
    assert!(primary.has_passive_in_sync() && backup.caught_up && same(&primary, &backup));

    // Silent for good: dropped after eight heartbeats, and told to join
    // again.
    run_pair(&mut primary, &mut backup, &mut now, 60, DOWN);
    assert_eq!(primary.status().replication, Replication::Alone, "a passive silent for good was kept");
}

#[test]
fn what_a_silent_passive_lacks_goes_again_in_messages_that_fit_a_frame() {
    let (mut primary, mut backup, mut now) = pair_in_sync(1);
    // Silent while six full batches are acked alone.
    let per_batch = fog_protocol::MAX_SENSORS_PER_BATCH as u32;
    for b in 0..6u32 {
        let sensors = (0..per_batch)
            .map(|i| SensorBatch {
                sensor_id: 100 + b * per_batch + i,
                incarnation: 7,
                segment: 0,
                readings: vec![Reading { seq: 0, speed_kmh: 100, timestamp_ms: now }],
                average_cursor: None,
            })
            .collect();
        let id = 1_000 + u64::from(b);
        primary.handle_request(Now::both(now), id, &Request::Batch { batch_id: id, epoch: 0, seal: [0; 16], sensors });
        run_pair(&mut primary, &mut backup, &mut now, 1, DOWN);
    }
    run_pair(&mut primary, &mut backup, &mut now, 8, DOWN);
    // Heard again: what it lacks comes in several messages, each within
    // the resend's bound and a frame.
    let readings = |entries: &[fog_protocol::LogEntry]| -> usize {
        entries
            .iter()
            .map(|e| match &e.record {
                fog_protocol::Record::ReadingsAccepted { sensors, .. } => sensors.iter().map(|s| s.readings.len()).sum(),
                _ => 0,
            })
            .sum()
    };
    let resent: Vec<(usize, usize)> = run_pair(&mut primary, &mut backup, &mut now, 30, UP)
        .from_primary
        .iter()
        .filter_map(|m| match m {
            PeerMessage::Records { entries, .. } if readings(entries) > 0 => Some((fog_protocol::encode(m).expect("fits a frame").len(), readings(entries))),
            _ => None,
        })
        .collect();
    assert!(resent.len() >= 2, "the entries went again in one message: {resent:?}");
    for (bytes, readings) in &resent {
        assert!(*readings <= super::leader::RESEND_READINGS && *bytes <= fog_protocol::MAX_FRAME_BYTES, "{readings} readings, {bytes} bytes");
    }
    assert!(primary.has_passive_in_sync());
    assert_eq!((backup.lsn(), backup.status().counted), (primary.lsn(), primary.status().counted));
}

#[test]
fn readings_acked_alone_when_the_passive_falls_silent_are_written_again_only_if_a_snapshot_holds_them() {
    let (mut primary, mut backup, mut now) = pair_in_sync(3);
    // Silent with a batch waiting for it, after the last local snapshot:
    // a restart would count its readings unconfirmed from the log, so no
    // snapshot is made, and the batch is acked alone.
    primary.handle_request(Now::both(now), 1, &batch(1, 3, now));
    let silent = run_pair(&mut primary, &mut backup, &mut now, 14, DOWN);
    assert_eq!((silent.primary_snapshots, silent.replies.len()), (0, 1));
    assert!(primary.status().unconfirmed > 0);
    run_pair(&mut primary, &mut backup, &mut now, 40, UP);
    assert!(primary.has_passive_in_sync());

    // Silent with a batch waiting for it that a local snapshot taken
    // since holds: a restart would not know its readings are unconfirmed,
    // so a new snapshot writes them so before the reply goes.
    primary.handle_request(Now::both(now), 2, &batch(2, 4, now));
    let waiting = primary.lsn();
    primary.entries_since_snapshot = primary.cfg.snapshot_every;
    primary.maybe_snapshot();
    assert_eq!(primary.snapshot_lsn, waiting);
    let silent = run_pair(&mut primary, &mut backup, &mut now, 14, DOWN);
    assert_eq!((silent.primary_snapshots, silent.replies.len()), (2, 1), "the snapshot taken, and the one with the readings unconfirmed");
    let mut saved = None;
    primary.entries_since_snapshot = primary.cfg.snapshot_every;
    primary.maybe_snapshot();
    while let Some(out) = primary.poll_output() {
        if let Output::SaveSnapshot { bytes, .. } = out {
            saved = Some(bytes);
        }
    }
    let restarted = Node::recover(config(), saved.as_deref(), &[]).expect("recovers");
    assert!(restarted.status().unconfirmed > 0);
    assert_eq!(restarted.status().unconfirmed, primary.status().unconfirmed);
}

#[test]
fn a_passive_heard_but_not_acking_is_dropped_once_its_tail_holds_too_many_readings() {
    let (mut primary, mut backup, mut now) = pair_in_sync(1);
    // Its heartbeats come, nothing else either way.
    let heartbeats_only: Link = |from_primary, m| !from_primary && matches!(m, PeerMessage::Heartbeat(_));
    let per_batch = fog_protocol::MAX_READINGS_PER_BATCH as u64;
    let mut b = 0;
    while primary.status().replication != fog_protocol::Replication::Alone && b < 100 {
        let readings = (b * per_batch..(b + 1) * per_batch).map(|seq| Reading { seq, speed_kmh: 90, timestamp_ms: now }).collect();
        let sensors = vec![SensorBatch { sensor_id: 5, incarnation: 7, segment: 0, readings, average_cursor: None }];
        primary.handle_request(Now::both(now), b, &Request::Batch { batch_id: 10 + b, epoch: 0, seal: [0; 16], sensors });
        run_pair(&mut primary, &mut backup, &mut now, 1, heartbeats_only);
        b += 1;
    }
    let kept = b * per_batch;
    assert!(kept > 4_000_000 && kept <= 4_000_000 + 2 * per_batch, "dropped after {b} batches ({kept} readings)");
    assert!(primary.tail.entries.is_empty() && primary.tail.readings == 0);
}

#[test]
fn a_passive_fed_entries_past_its_log_applies_none_and_says_where_it_stands() {
    let (primary, mut backup, now) = pair_in_sync(3);
    let (lsn, counted) = (backup.lsn(), backup.status().counted);
    while backup.poll_output().is_some() {}
    // Entries that do not continue its log: the next but one, and one at
    // the top of the range (forged, or after lost messages).
    for far in [lsn + 2, u64::MAX] {
        let entry = fog_protocol::LogEntry {
            lsn: far,
            epoch: primary.epoch(),
            solo: false,
            record: fog_protocol::Record::ReadingsAccepted { now_ms: now, sensors: vec![SensorBatch { sensor_id: 1, incarnation: 7, segment: 0, readings: vec![Reading { seq: 50, speed_kmh: 90, timestamp_ms: now }], average_cursor: None }] },
        };
        backup.handle_peer(Now::both(now + 10), PeerMessage::Records { epoch: primary.epoch(), entries: vec![entry] });
        let out: Vec<Output> = std::iter::from_fn(|| backup.poll_output()).collect();
        assert!(matches!(out.as_slice(), [Output::Peer(PeerMessage::Ack { durable, .. })] if *durable == lsn), "{out:?}");
        assert_eq!((backup.lsn(), backup.status().counted), (lsn, counted));
        assert!(backup.caught_up, "a gap made the passive drop what it has");
    }
}
