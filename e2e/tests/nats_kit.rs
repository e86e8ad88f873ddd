//! The test kit's NATS JetStream cluster, the ground the uplink's tests
//! stand on: real `nats-server` processes on loopback, an R3 stream that
//! keeps every message exactly once through a kill -9 of its leader and
//! a stop of the whole cluster, and authentication that refuses a forged
//! key, a missing one and a site publishing as another.
//!
//! Without nats-server these tests say SKIPPED, unless FOG_REQUIRE_NATS=1
//! (as `.ci/run` sets it) makes them fail.

use std::time::Duration;

use fog_testkit::nats::{NatsAuth, NatsCluster, Outgoing, StoredMessage, require_nats};
use fog_testkit::{scratch_dir, wait_for};

const STREAM: &str = "FOG";

/// Messages `range`, each with its own id and its number as payload, on
/// four subjects of site `site`.
fn messages(site: &str, range: std::ops::Range<u64>) -> Vec<Outgoing> {
    range.map(|i| Outgoing::with_id(&format!("fog.{site}.readings.{}", i % 4), &format!("m-{i}"), format!("{{\"n\":{i}}}"))).collect()
}

/// The stream holds message `i` of `expected` at sequence `i + 1`, once
/// each, with its id, subject and payload: the exactly-once check the
/// uplink tests make.
fn check_exactly(stored: &[StoredMessage], site: &str, expected: std::ops::Range<u64>) -> anyhow::Result<()> {
    let want = messages(site, expected);
    anyhow::ensure!(stored.len() == want.len(), "the stream holds {} messages, not {}", stored.len(), want.len());
    for (i, (got, want)) in stored.iter().zip(&want).enumerate() {
        let id = got.header("Nats-Msg-Id");
        anyhow::ensure!(
            got.seq == i as u64 + 1 && got.subject == want.subject && id == want.msg_id.as_deref() && got.payload == want.payload,
            "stored message {i}: seq {} subject {} id {id:?} payload {:?}; expected seq {} subject {} id {:?} payload {:?}",
            got.seq,
            got.subject,
            String::from_utf8_lossy(&got.payload),
            i + 1,
            want.subject,
            want.msg_id,
            String::from_utf8_lossy(&want.payload)
        );
    }
    Ok(())
}

#[test]
fn an_r3_stream_keeps_every_message_once_through_a_kill_of_its_leader() -> anyhow::Result<()> {
    let Some(_) = require_nats("an_r3_stream_keeps_every_message_once_through_a_kill_of_its_leader")? else { return Ok(()) };
    let dir = scratch_dir("nats-leader-kill")?;
    let mut cluster = NatsCluster::start(&dir, 3, NatsAuth::Site)?;
    assert_eq!(cluster.urls().split(',').count(), 3);
    cluster.create_stream(STREAM, &["fog.>"], 3, Duration::from_secs(120))?;
    let site = cluster.creds().expect("an authenticated cluster has site credentials").to_path_buf();

    let acks = cluster.publish(Some(&site), messages("site", 0..1000), 256)?;
    let seqs: Vec<u64> = acks.iter().map(|a| a.seq).collect();
    assert_eq!(seqs, (1..=1000).collect::<Vec<_>>(), "the first 1000 messages were not stored in order");
    assert!(acks.iter().all(|a| !a.duplicate), "a new message was taken for a duplicate");

    let leader = wait_for("the stream to have a leader", Duration::from_secs(30), || cluster.stream_leader(STREAM))?;
    cluster.kill(leader)?;
    let new_leader = wait_for("another node to lead the stream", Duration::from_secs(60), || {
        cluster.stream_leader(STREAM).filter(|&l| l != leader)
    })?;
    eprintln!("stream leader n{leader} killed; n{new_leader} leads now");

    // A publisher that lost its acks sends 500..1000 again, then goes on:
    // the new leader knows the ids of the old one.
    let acks = cluster.publish(Some(&site), messages("site", 500..1500), 256)?;
    for (i, ack) in acks.iter().enumerate() {
        let n = 500 + i as u64;
        assert_eq!((ack.seq, ack.duplicate), (n + 1, n < 1000), "message {n} after the failover");
    }
    check_exactly(&cluster.read_stream(STREAM, Duration::from_secs(60))?, "site", 0..1500)?;

    // The killed node comes back with its store and catches up; then it
    // is needed for a quorum: the stream survives losing another node.
    cluster.restart(leader)?;
    let other = (0..3).find(|&i| i != leader).expect("three nodes");
    cluster.kill(other)?;
    wait_for("the stream to have a leader with the restarted node", Duration::from_secs(60), || cluster.stream_leader(STREAM))?;
    check_exactly(&cluster.read_stream(STREAM, Duration::from_secs(60))?, "site", 0..1500)?;
    assert_eq!(cluster.stream_state(STREAM)?.last_seq, 1500);
    cluster.restart(other)?;
    Ok(())
}

#[test]
fn the_stream_outlives_the_whole_cluster_and_checks_the_last_sequence() -> anyhow::Result<()> {
    let Some(_) = require_nats("the_stream_outlives_the_whole_cluster_and_checks_the_last_sequence")? else { return Ok(()) };
    let dir = scratch_dir("nats-whole-cluster")?;
    let mut cluster = NatsCluster::start(&dir, 3, NatsAuth::Site)?;
    cluster.create_stream(STREAM, &["fog.>"], 3, Duration::from_secs(120))?;
    let site = cluster.creds().expect("site credentials").to_path_buf();
    cluster.publish(Some(&site), messages("site", 0..100), 64)?;

    cluster.stop_all()?;
    assert!((0..3).all(|i| !cluster.is_running(i)));
    assert!(cluster.stream_state(STREAM).is_err(), "a stream answered with every node killed");
    cluster.start_all()?;
    wait_for("the stream to have a leader after the restart", Duration::from_secs(60), || cluster.stream_leader(STREAM))?;

    // Optimistic concurrency: a message that expects another last
    // sequence is refused and not stored; one that expects 100 is stored.
    let mut stale = messages("site", 100..101);
    stale[0].expected_last_seq = Some(99);
    let refused = cluster.publish(Some(&site), stale, 1);
    assert!(refused.is_err(), "a message expecting last sequence 99 of 100 was stored: {refused:?}");
    let mut next: Vec<Outgoing> = messages("site", 100..200);
    for (i, message) in next.iter_mut().enumerate() {
        message.expected_last_seq = Some(100 + i as u64);
    }
    cluster.publish(Some(&site), next, 32)?;
    check_exactly(&cluster.read_stream(STREAM, Duration::from_secs(60))?, "site", 0..200)?;
    Ok(())
}

#[test]
fn forged_or_missing_keys_and_another_sites_subjects_are_refused() -> anyhow::Result<()> {
    let Some(_) = require_nats("forged_or_missing_keys_and_another_sites_subjects_are_refused")? else { return Ok(()) };
    let dir = scratch_dir("nats-auth")?;
    let cluster = NatsCluster::start(&dir, 1, NatsAuth::Sites(vec!["a".into(), "b".into()]))?;
    cluster.create_stream(STREAM, &["fog.>"], 1, Duration::from_secs(120))?;
    let a = cluster.site_creds("a").expect("site a").to_path_buf();

    cluster.try_connect(Some(&a))?;
    let anonymous = cluster.try_connect(None).expect_err("a client without credentials was let in");
    eprintln!("without credentials: {anonymous:#}");
    let forged = dir.join("forged.creds");
    cluster.write_forged_creds("a", &forged)?;
    let refused = cluster.try_connect(Some(&forged)).expect_err("site a's JWT with another key was let in");
    eprintln!("with a forged key: {refused:#}");
    assert!(format!("{refused:#}").to_lowercase().contains("authorization"), "not refused for authorization: {refused:#}");

    // Site a may publish as itself, and not as site b.
    let acks = cluster.publish(Some(&a), messages("a", 0..10), 4)?;
    assert_eq!(acks.last().map(|a| a.seq), Some(10));
    let as_b = cluster.publish(Some(&a), messages("b", 0..1), 1);
    assert!(as_b.is_err(), "site a published on site b's subjects: {as_b:?}");
    check_exactly(&cluster.read_stream(STREAM, Duration::from_secs(30))?, "a", 0..10)?;
    Ok(())
}
