//! Tests of the real `fog-server` binary: what an operator sees on bad
//! flags and errors, and what a client sees from a running node (malformed
//! frames dropped and counted, batches still served, `status --json`,
//! failover of a pair, clean shutdown on SIGTERM, counts that survive
//! `kill -9`, a corrupt log refused with its file and offset).
//!
//! Ports, scratch dirs, server processes (killed on drop, their logs
//! printed when a test fails), status queries and the client come from
//! fog-testkit.

use std::net::TcpListener;
use std::ops::Range;
use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::Duration;

use fog_protocol::{BatchReply, Reply, Request, decode};
use fog_testkit::rogue::{batch, now_ms, readings, sensor};
use fog_testkit::{
    Client, Pair, Proc, bin, data_dir, free_port, scratch_dir, server_status, start_server, status_when, wait_for,
    wait_for_log_line,
};

/// Flags of every server started here: heartbeats short enough for a pair
/// to fail over within a test.
const FLAGS: &[&str] = &["--heartbeat", "50ms"];

/// How long a client waits for a reply.
const REPLY_TIMEOUT: Duration = Duration::from_secs(5);

fn endpoint(port: u16) -> String {
    format!("tcp://127.0.0.1:{port}")
}

/// `fog-server ARGS`, run to its end.
fn run(args: &[&str]) -> Output {
    Command::new(bin("fog-server").unwrap()).args(args).output().expect("run fog-server")
}

/// A lone primary on free ports, in a fresh scratch dir: its pair, the dir
/// and the process.
fn lone_primary(test: &str) -> (Pair, PathBuf, Proc) {
    let dir = scratch_dir(test).unwrap();
    let pair = Pair::on_free_ports().unwrap();
    let primary = start_server(&pair, true, FLAGS, &dir).unwrap();
    (pair, dir, primary)
}

/// A batch of readings `seqs` of sensor `sensor_id` (incarnation 77),
/// stamped now.
fn batch_of(batch_id: u64, sensor_id: u32, seqs: Range<u64>) -> Request {
    batch(batch_id, vec![sensor(sensor_id, 77, 0, readings(seqs.start, seqs.end - seqs.start, now_ms()))])
}

/// The server's reply to `request`, which must be a batch reply.
fn batch_reply(client: &mut Client, request: &Request) -> BatchReply {
    fog_testkit::rogue::batch_reply(client.ask(request, REPLY_TIMEOUT).unwrap()).unwrap()
}

#[test]
fn bad_flags_exit_non_zero_with_a_message() {
    let out = run(&[]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--primary") && err.contains("--backup"),
        "{err}"
    );

    let out = run(&["--primary", "--backup"]);
    assert_eq!(out.status.code(), Some(2));

    let out = run(&["--primary", "--heartbeat", "soon"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--heartbeat"));

    // A duration of ages would overflow the server's clocks.
    for flag in ["--heartbeat", "--lateness", "--dedup-horizon", "--max-clock-skew"] {
        let out = run(&["--primary", flag, "400000000000y"]);
        assert_eq!(out.status.code(), Some(2), "{flag}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(flag) && err.contains("at most 100 years"), "{err}");
    }

    let out = run(&["--primary", "--heartbeat", "0s"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).starts_with("error: --heartbeat"));

    let out = run(&["--primary", "--fsync", "sometimes"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--fsync") && err.contains("always, batch or never"), "{err}");

    let out = run(&["--primary", "--dedup-horizon", "5m", "--window-horizon", "10m"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.starts_with("error: --dedup-horizon (5m) must be at least --window-horizon (10m)"), "{err}");
}

#[test]
fn help_is_written_for_people() {
    let out = run(&["--help"]);
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--primary",
        "--backup",
        "--frontend",
        "--heartbeat",
        "--retain-averages",
        "--data-dir",
        "--fsync",
        "status",
    ] {
        assert!(help.contains(flag), "--help lacks {flag}");
    }
}

#[test]
fn status_of_a_missing_server_is_one_error_line() {
    let out = run(&["status", &endpoint(free_port().unwrap()), "--timeout", "300ms"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.starts_with("error: no answer from tcp://127.0.0.1:"), "{err}");
    assert!(out.stdout.is_empty());
}

#[test]
fn an_address_in_use_is_one_error_line() {
    let taken = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = taken.local_addr().expect("addr").port();
    let dir = scratch_dir("in-use").unwrap();
    let out = run(&[
        "--primary",
        "--data-dir",
        dir.join("data").to_str().expect("utf-8 temp dir"),
        "--frontend",
        &endpoint(port),
        "--state-bind",
        &endpoint(free_port().unwrap()),
    ]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.starts_with("error: cannot bind the frontend socket to tcp://127.0.0.1:"), "{err}");
    assert_eq!(err.matches("in use").count(), 1, "the cause once: {err}");
}

#[test]
fn a_malformed_frame_is_counted_and_the_server_keeps_serving() {
    let (pair, _dir, _primary) = lone_primary("malformed");
    let frontend = pair.frontend(true);
    let mut client = Client::connect(frontend, None).unwrap();

    client.send_frames(vec![b"\x01not postcard at all".to_vec()]).unwrap();
    // The server answers nothing to it; the status shows it was counted.
    let status =
        status_when(frontend, "one malformed frame counted", Duration::from_secs(5), |s| s["malformed_frames"] == 1).unwrap();
    let state = status["state"].as_str().unwrap_or_default();
    assert!(state == "primary" || state == "active", "state {state}");

    let b = batch_reply(&mut client, &batch_of(1, 3, 0..5));
    assert_eq!(b.batch_id, 1);
    assert_eq!(b.acks.len(), 1);
    assert_eq!(b.acks[0].next_seq, 5);
    // Resent: acked again, not counted again.
    batch_reply(&mut client, &batch_of(2, 3, 0..5));

    let status = server_status(frontend).unwrap();
    assert_eq!(status["state"], "active");
    assert_eq!(status["counted"], 5);
    assert_eq!(status["duplicates"], 5);
    assert_eq!(status["malformed_frames"], 1);
    assert_eq!(status["per_sensor"][0]["sensor_id"], 3);
    assert_eq!(status["per_sensor"][0]["incarnation"], 77);
    assert_eq!(status["per_sensor"][0]["count"], 5);
    assert_eq!(status["per_sensor"][0]["sum_kmh"], 5 * 88);

    // The window holding those readings is published by the timer (its end
    // plus the 1 s lateness), and a sensor new to the server gets it at once.
    status_when(frontend, "an average published", Duration::from_secs(5), |s| {
        s["averages_published"].as_u64().unwrap_or(0) > 0
    })
    .unwrap();
    let b = batch_reply(&mut client, &batch_of(3, 4, 0..1));
    assert_eq!(b.averages.len(), 1, "{b:?}");
    assert_eq!(b.averages[0].count, 5);
    assert_eq!(b.averages[0].sum_kmh, 5 * 88);
}

#[test]
fn the_backup_takes_over_when_the_primary_dies() {
    let dir = scratch_dir("takeover").unwrap();
    let pair = Pair::on_free_ports().unwrap();
    let primary = start_server(&pair, true, FLAGS, &dir).unwrap();
    let _backup = start_server(&pair, false, FLAGS, &dir).unwrap();

    // The pair settles: primary active, backup passive.
    status_when(&pair.backup_frontend, "passive", Duration::from_secs(10), |s| s["state"] == "passive").unwrap();
    let mut to_backup = Client::connect(&pair.backup_frontend, None).unwrap();
    let reply = to_backup.ask(&batch_of(1, 1, 0..1), REPLY_TIMEOUT).unwrap();
    assert!(matches!(reply, Reply::NotActive { .. }), "{reply:?}");

    drop(primary);
    // Two heartbeats (100 ms) of silence, then a client request fails over.
    let served = wait_for("the backup to serve a batch", Duration::from_secs(10), || {
        match to_backup.ask(&batch_of(2, 1, 0..3), REPLY_TIMEOUT) {
            Ok(Reply::NotActive { .. }) => None,
            other => Some(other),
        }
    })
    .unwrap();
    let b = fog_testkit::rogue::batch_reply(served.unwrap()).unwrap();
    assert_eq!(b.acks[0].next_seq, 3);
    let status = server_status(&pair.backup_frontend).unwrap();
    assert_eq!(status["state"], "active");
    assert_eq!(status["counted"], 3);
}

#[test]
fn sigterm_ends_the_server_cleanly() {
    let (_pair, _dir, mut server) = lone_primary("sigterm");
    server.signal("TERM").unwrap();
    let exit = server.wait_for_exit(Duration::from_secs(5)).unwrap();
    assert_eq!(exit.code(), Some(0), "{}", server.log_tail(20));
}

#[test]
fn acked_readings_survive_kill_9_and_a_restart() {
    let (pair, dir, mut server) = lone_primary("kill9");
    let frontend = pair.frontend(true);
    let mut client = Client::connect(frontend, None).unwrap();
    for (i, start) in (0..500u64).step_by(50).enumerate() {
        let b = batch_reply(&mut client, &batch_of(i as u64 + 1, 9, start..start + 50));
        assert_eq!(b.acks[0].next_seq, start + 50);
    }
    let before = server_status(frontend).unwrap();
    assert_eq!(before["counted"], 500);
    server.kill().unwrap();
    drop(server);

    let server = start_server(&pair, true, FLAGS, &dir).unwrap();
    let after = server_status(frontend).unwrap();
    assert_eq!(after["counted"], 500, "every acked reading is back: {after}");
    assert_eq!(after["per_sensor"], before["per_sensor"]);
    // Resent after the restart: acked, not counted again.
    let mut client = Client::connect(frontend, None).unwrap();
    let b = batch_reply(&mut client, &batch_of(99, 9, 400..500));
    assert_eq!(b.acks[0].next_seq, 500);
    let served = server_status(frontend).unwrap();
    assert_eq!(served["counted"], 500);
    assert!(served["epoch"].as_u64() > before["epoch"].as_u64(), "serving again is a new epoch: {served}");
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_log_corrupt_in_the_middle_is_refused_with_its_file_and_offset() {
    let (pair, dir, mut server) = lone_primary("corrupt");
    let mut client = Client::connect(pair.frontend(true), None).unwrap();
    for i in 0..5u64 {
        batch_reply(&mut client, &batch_of(i + 1, 1, i * 10..i * 10 + 10));
    }
    server.kill().unwrap();
    drop(server);

    let data = data_dir(&dir, true);
    let wal = std::fs::read_dir(&data)
        .expect("data dir")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("wal.")))
        .expect("a log file");
    let mut bytes = std::fs::read(&wal).expect("read the log");
    // The first record's payload: corrupt, with good records after it.
    bytes[10] ^= 0xff;
    std::fs::write(&wal, &bytes).expect("write the log");
    let out = run(&[
        "--primary",
        "--data-dir",
        data.to_str().expect("utf-8"),
        "--frontend",
        &endpoint(free_port().unwrap()),
        "--state-bind",
        &endpoint(free_port().unwrap()),
    ]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    let line = err.lines().find(|l| l.starts_with("error:")).unwrap_or_default();
    assert!(line.contains(&wal.display().to_string()) && line.contains("offset 0"), "{err}");

    // A torn tail instead (the last record cut short) is truncated and
    // logged; what it held was never acked.
    bytes[10] ^= 0xff;
    let last_counts = last_record_counts_readings(&bytes);
    bytes.truncate(bytes.len() - 3);
    std::fs::write(&wal, &bytes).expect("write the log");
    let server = start_server(&pair, true, FLAGS, &dir).unwrap();
    let expected = if last_counts { 40 } else { 50 };
    assert_eq!(server_status(pair.frontend(true)).unwrap()["counted"], expected, "everything before the torn record is back");
    wait_for_log_line(&server.log, &["torn write at the end of the log: truncated"], Duration::from_secs(5)).unwrap();
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Whether the last record of a log holds readings (rather than, say, a
/// publication of averages), read with the log's own framing.
fn last_record_counts_readings(log: &[u8]) -> bool {
    let mut at = 0;
    let mut last = None;
    while at + 8 <= log.len() {
        let len = u32::from_le_bytes([log[at], log[at + 1], log[at + 2], log[at + 3]]) as usize;
        last = Some(&log[at + 8..at + 8 + len]);
        at += 8 + len;
    }
    let entry: fog_protocol::LogEntry = decode(last.expect("a record")).expect("a log entry");
    matches!(entry.record, fog_protocol::Record::ReadingsAccepted { .. })
}
