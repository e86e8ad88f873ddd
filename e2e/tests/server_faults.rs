//! Real-process fault tests of the server pair: the real `fog-server` and
//! `fog-host` binaries, the real sensor component, and faults an operator
//! meets — `kill -9` of one or both servers, a restart and catch-up, a
//! frozen primary (SIGSTOP/SIGCONT), steps of the servers' wall clocks
//! (libfaketime, see `fog_testkit::faketime`), and a cut link between the
//! two servers (network namespaces, see `fog_testkit::netns`).
//!
//! Every test ends the same way: the host's JSON summary (generated, acked
//! and sum of speeds per sensor incarnation) must equal what the active
//! server counted, and, once it has caught up, what the passive counted: no
//! acked reading lost, none counted twice. Each test prints what it did and
//! what it found. The tests of this file run one at a time, so that two
//! pairs of servers do not compete for the CPU and miss heartbeats.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use fog_testkit::faketime::{self, FakeWallClock};
use fog_testkit::netns::{Lab, ROOT};
use fog_testkit::{
    Pair, Proc, check_pair, finish_host, is_active, is_caught_up, scratch_dir, server_status, start_host, start_server,
    start_server_with_env, status_when, wait_for,
};
use serde_json::Value;

/// Server flags shared by every test: short lateness so averages flow in a
/// short run; the default heartbeat (250 ms).
const SERVER_FLAGS: &[&str] = &["--lateness", "200ms"];

fn serial() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn u(v: &Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not a number: {v}"))
}

/// Checks that a host exited after acking everything it generated.
fn host_done(label: &str, code: i32, summary: &Value) {
    assert_eq!(code, 0, "{label}: host exit code; summary {summary}");
    assert_eq!(u(&summary["unacked"]), 0, "{label}: unacked readings: {summary}");
    assert_eq!(summary["generated"], summary["acked"], "{label}: {summary}");
}

/// Time from `since` until the server at `endpoint` is active and has
/// counted more than `counted_before` readings: the first acks it gives.
fn time_to_first_ack(endpoint: &str, since: Instant, counted_before: u64) -> Duration {
    status_when(endpoint, "active and counting", Duration::from_secs(15), |s| {
        is_active(s) && u(&s["counted"]) > counted_before
    }).unwrap();
    since.elapsed()
}

fn host_args<'a>(servers: &'a str, sensors: &'a str, duration: &'a str) -> Vec<&'a str> {
    vec![
        "--sensors", sensors, "--interval", "100ms", "--timeout", "500ms", "--duration", duration,
        "--servers", servers,
    ]
}

#[test]
fn kill_9_of_the_primary_under_load_loses_no_acked_reading() {
    let _serial = serial();
    let label = "kill-primary";
    let dir = scratch_dir(label).unwrap();
    let pair = Pair::on_free_ports().unwrap();
    let mut primary = start_server(&pair, true, SERVER_FLAGS, &dir).unwrap();
    let backup = start_server(&pair, false, SERVER_FLAGS, &dir).unwrap();
    let servers = pair.servers();
    let host = start_host(&host_args(&servers, "20", "8s"), &dir).unwrap();

    let before = status_when(&pair.backup_frontend, "a caught-up passive", Duration::from_secs(10), |s| {
        is_caught_up(s) && u(&s["counted"]) > 0
    }).unwrap();
    std::thread::sleep(Duration::from_secs(2));
    let at_kill = u(&server_status(&pair.backup_frontend).unwrap()["counted"]);
    let killed = Instant::now();
    primary.kill().unwrap();
    eprintln!("[{label}] killed the primary (kill -9) under load; the backup had {at_kill} readings replicated (epoch {})", before["epoch"]);
    let failover = time_to_first_ack(&pair.backup_frontend, killed, at_kill);
    eprintln!("[{label}] failover: the backup counted new readings as active {} ms after the kill", failover.as_millis());

    let (code, summary) = finish_host(host, Duration::from_secs(60)).unwrap();
    host_done(label, code, &summary);
    assert!(u(&summary["failovers"]) >= 1, "{label}: the host recorded no failover: {summary}");
    eprintln!("[{label}] host: generated {}, acked {}, failovers {}", summary["generated"], summary["acked"], summary["failovers"]);

    // The old primary comes back from its data dir as passive and catches up.
    let _primary = start_server(&pair, true, SERVER_FLAGS, &dir).unwrap();
    check_pair(label, &pair.backup_frontend, &pair.primary_frontend, &[&summary]).unwrap();
    drop(backup);
}

#[test]
fn kill_9_of_both_servers_and_a_restart_loses_no_acked_reading() {
    let _serial = serial();
    let label = "kill-both";
    let dir = scratch_dir(label).unwrap();
    let pair = Pair::on_free_ports().unwrap();
    let mut primary = start_server(&pair, true, SERVER_FLAGS, &dir).unwrap();
    let mut backup = start_server(&pair, false, SERVER_FLAGS, &dir).unwrap();
    let servers = pair.servers();
    let host = start_host(&host_args(&servers, "20", "9s"), &dir).unwrap();

    status_when(&pair.backup_frontend, "a caught-up passive", Duration::from_secs(10), |s| {
        is_caught_up(s) && u(&s["counted"]) > 0
    }).unwrap();
    std::thread::sleep(Duration::from_secs(2));
    let counted = u(&server_status(&pair.primary_frontend).unwrap()["counted"]);
    primary.kill().unwrap();
    backup.kill().unwrap();
    eprintln!("[{label}] killed both servers (kill -9) after the primary counted at least {counted} readings; the host keeps generating");
    std::thread::sleep(Duration::from_secs(1));

    let restarted = Instant::now();
    let primary = start_server(&pair, true, SERVER_FLAGS, &dir).unwrap();
    let backup = start_server(&pair, false, SERVER_FLAGS, &dir).unwrap();
    let recovered = u(&server_status(&pair.primary_frontend).unwrap()["counted"]);
    eprintln!("[{label}] restarted both from their data dirs; the primary recovered {recovered} counted readings");
    assert!(recovered >= counted, "{label}: the primary recovered {recovered} readings, fewer than the {counted} it had counted");

    // Whichever node the pair elects serves; find it.
    let active = wait_for("an active server after the restart", Duration::from_secs(15), || {
        [&pair.primary_frontend, &pair.backup_frontend]
            .into_iter()
            .find(|e| server_status(e).is_ok_and(|s| is_active(&s) && u(&s["counted"]) > recovered))
            .cloned()
    }).unwrap();
    eprintln!("[{label}] {active} acks again {} ms after the restart began", restarted.elapsed().as_millis());

    let (code, summary) = finish_host(host, Duration::from_secs(60)).unwrap();
    host_done(label, code, &summary);
    eprintln!("[{label}] host: generated {}, acked {}, failovers {}", summary["generated"], summary["acked"], summary["failovers"]);
    let passive = if active == pair.primary_frontend { &pair.backup_frontend } else { &pair.primary_frontend };
    check_pair(label, &active, passive, &[&summary]).unwrap();
    drop((primary, backup));
}

#[test]
fn a_restarted_backup_catches_up_and_then_takes_over_without_loss() {
    let _serial = serial();
    let label = "backup-catch-up";
    let dir = scratch_dir(label).unwrap();
    let pair = Pair::on_free_ports().unwrap();
    let mut primary = start_server(&pair, true, SERVER_FLAGS, &dir).unwrap();
    let mut backup = start_server(&pair, false, SERVER_FLAGS, &dir).unwrap();
    let servers = pair.servers();
    let host = start_host(&host_args(&servers, "20", "10s"), &dir).unwrap();

    std::thread::sleep(Duration::from_secs(2));
    backup.kill().unwrap();
    eprintln!("[{label}] killed the backup (kill -9); the primary goes on alone");
    let alone = status_when(&pair.primary_frontend, "active alone", Duration::from_secs(10), |s| {
        is_active(s) && s["replication"].as_str().is_some_and(|r| r.contains("alone"))
    }).unwrap();
    eprintln!("[{label}] primary: {}", alone["replication"]);
    std::thread::sleep(Duration::from_secs(1));

    let restarted = Instant::now();
    let _backup = start_server(&pair, false, SERVER_FLAGS, &dir).unwrap();
    let caught_up = status_when(&pair.backup_frontend, "a caught-up passive", Duration::from_secs(15), is_caught_up).unwrap();
    eprintln!(
        "[{label}] restarted the backup; caught up (lsn {}, lag {}) {} ms later",
        caught_up["lsn"],
        caught_up["lag"],
        restarted.elapsed().as_millis()
    );
    let in_sync = status_when(&pair.primary_frontend, "in sync with its passive", Duration::from_secs(10), |s| {
        s["replication"] == "in-sync"
    }).unwrap();
    eprintln!("[{label}] primary: {}", in_sync["replication"]);
    std::thread::sleep(Duration::from_secs(1));

    let at_kill = u(&server_status(&pair.backup_frontend).unwrap()["counted"]);
    let killed = Instant::now();
    primary.kill().unwrap();
    eprintln!("[{label}] killed the primary (kill -9); the backup had {at_kill} readings");
    let failover = time_to_first_ack(&pair.backup_frontend, killed, at_kill);
    eprintln!("[{label}] failover: the caught-up backup counted new readings as active {} ms after the kill", failover.as_millis());

    let (code, summary) = finish_host(host, Duration::from_secs(60)).unwrap();
    host_done(label, code, &summary);
    eprintln!("[{label}] host: generated {}, acked {}, failovers {}", summary["generated"], summary["acked"], summary["failovers"]);
    let _primary = start_server(&pair, true, SERVER_FLAGS, &dir).unwrap();
    check_pair(label, &pair.backup_frontend, &pair.primary_frontend, &[&summary]).unwrap();
}

/// NTP steps of both servers' wall clocks, forward and back by up to a
/// minute, while a host sends: nothing fails over (liveness runs on the
/// monotonic clock), the first epoch serves to the end, nothing is lost or
/// counted twice.
#[test]
fn steps_of_the_servers_wall_clocks_fail_nothing_over() {
    let label = "clock-steps";
    if let Some(why) = faketime::unavailable() {
        return faketime::skip_or_fail(label, &why).unwrap();
    }
    let _serial = serial();
    let dir = scratch_dir(label).unwrap();
    let pair = Pair::on_free_ports().unwrap();
    let clocks = [FakeWallClock::new(&dir, "primary").unwrap(), FakeWallClock::new(&dir, "backup").unwrap()];
    let _primary = start_server_with_env(&pair, true, SERVER_FLAGS, &dir, &clocks[0].env()).unwrap();
    let _backup = start_server_with_env(&pair, false, SERVER_FLAGS, &dir, &clocks[1].env()).unwrap();
    let servers = pair.servers();
    let host = start_host(&host_args(&servers, "20", "12s"), &dir).unwrap();
    let before = status_when(&pair.backup_frontend, "a caught-up passive", Duration::from_secs(10), |s| {
        is_caught_up(s) && u(&s["counted"]) > 0
    }).unwrap();
    let epoch = u(&before["epoch"]);
    // (primary offset, backup offset) in seconds, each held for 1.5 s.
    for (p, b) in [(30, 0), (-30, 0), (-30, 20), (0, -20), (0, 0)] {
        clocks[0].set_offset_s(p).unwrap();
        clocks[1].set_offset_s(b).unwrap();
        eprintln!("[{label}] wall clocks now {p:+} s (primary) and {b:+} s (backup)");
        let hold = Instant::now();
        while hold.elapsed() < Duration::from_millis(1_500) {
            let (ps, bs) = (server_status(&pair.primary_frontend).unwrap(), server_status(&pair.backup_frontend).unwrap());
            assert!(is_active(&ps) && u(&ps["epoch"]) == epoch, "{label}: the primary left epoch {epoch} as active: {ps}");
            assert!(bs["state"] == "passive" && u(&bs["epoch"]) == epoch, "{label}: the backup changed: {bs}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    let (code, summary) = finish_host(host, Duration::from_secs(60)).unwrap();
    host_done(label, code, &summary);
    eprintln!("[{label}] host: generated {}, acked {}, failovers {}", summary["generated"], summary["acked"], summary["failovers"]);
    assert_eq!(u(&summary["failovers"]), 0, "{label}: the host failed over: {summary}");
    check_pair(label, &pair.primary_frontend, &pair.backup_frontend, &[&summary]).unwrap();
}

#[test]
fn a_primary_frozen_for_5_s_does_not_go_on_acking_as_active() {
    let _serial = serial();
    let label = "sigstop";
    let dir = scratch_dir(label).unwrap();
    let pair = Pair::on_free_ports().unwrap();
    let primary = start_server(&pair, true, SERVER_FLAGS, &dir).unwrap();
    let _backup = start_server(&pair, false, SERVER_FLAGS, &dir).unwrap();
    let servers = pair.servers();
    let host = start_host(&host_args(&servers, "20", "12s"), &dir).unwrap();

    let before = status_when(&pair.backup_frontend, "a caught-up passive", Duration::from_secs(10), |s| {
        is_caught_up(s) && u(&s["counted"]) > 0
    }).unwrap();
    let first_epoch = u(&before["epoch"]);
    std::thread::sleep(Duration::from_secs(1));
    primary.signal("STOP").unwrap();
    let stopped = Instant::now();
    let at_stop = u(&server_status(&pair.backup_frontend).unwrap()["counted"]);
    eprintln!("[{label}] froze the active primary (SIGSTOP) in epoch {first_epoch}; the backup had {at_stop} readings");
    let failover = time_to_first_ack(&pair.backup_frontend, stopped, at_stop);
    let took_over = server_status(&pair.backup_frontend).unwrap();
    eprintln!("[{label}] the backup took over in epoch {} and acks {} ms after the freeze", took_over["epoch"], failover.as_millis());
    assert!(u(&took_over["epoch"]) > first_epoch, "{label}: a takeover starts a newer epoch: {took_over}");

    let left = Duration::from_secs(5).saturating_sub(stopped.elapsed());
    std::thread::sleep(left);
    primary.signal("CONT").unwrap();
    eprintln!("[{label}] resumed the primary (SIGCONT) after {} ms", stopped.elapsed().as_millis());

    // The resumed primary must step down, never serve as active again.
    let resumed = status_when(&pair.primary_frontend, "passive", Duration::from_secs(10), |s| s["state"] == "passive").unwrap();
    let backup_now = server_status(&pair.backup_frontend).unwrap();
    eprintln!(
        "[{label}] after the resume: primary {} in epoch {}, backup {} in epoch {}; primary log: {} pause lines, {} step-down lines",
        resumed["state"],
        resumed["epoch"],
        backup_now["state"],
        backup_now["epoch"],
        fog_testkit::log_lines_with(&primary.log, &["paused"]),
        fog_testkit::log_lines_with(&primary.log, &["stepping down"]),
    );
    assert_eq!(backup_now["state"], "active", "{label}: the backup stays active: {backup_now}");
    for _ in 0..10 {
        let p = server_status(&pair.primary_frontend).unwrap();
        assert_ne!(p["state"], "active", "{label}: the resumed primary serves as active again: {p}");
        std::thread::sleep(Duration::from_millis(200));
    }

    let (code, summary) = finish_host(host, Duration::from_secs(60)).unwrap();
    host_done(label, code, &summary);
    eprintln!("[{label}] host: generated {}, acked {}, failovers {}", summary["generated"], summary["acked"], summary["failovers"]);
    check_pair(label, &pair.backup_frontend, &pair.primary_frontend, &[&summary]).unwrap();
    drop(primary);
}

/// Starts one node of `pair` inside namespace `ns` and waits until it
/// answers `status` from the root namespace.
fn start_server_in(lab: &Lab, ns: &str, pair: &Pair, primary: bool, dir: &std::path::Path) -> Proc {
    // The veth addresses are not loopback: a server without keys needs
    // --insecure there (the namespaces are this test's own).
    let flags: Vec<&str> = SERVER_FLAGS.iter().copied().chain(["--insecure"]).collect();
    let (name, args) = fog_testkit::server_args(pair, primary, &flags, dir);
    let proc = lab.spawn(ns, name, &fog_testkit::bin("fog-server").unwrap(), &args, dir).unwrap();
    fog_testkit::wait_until_serving(proc, pair.frontend(primary)).unwrap()
}

#[test]
fn a_cut_link_between_the_servers_splits_the_pair_and_the_merge_loses_nothing() {
    let _serial = serial();
    let label = "split-brain";
    let Some(mut lab) = Lab::for_test("split", label) else { return };
    let dir = scratch_dir(label).unwrap();
    // The host stays in the root namespace and reaches each server over a
    // link of its own; the servers replicate over a third link.
    let p = lab.namespace("primary").unwrap();
    let b = lab.namespace("backup").unwrap();
    let host_p = lab.link(ROOT, &p).unwrap();
    let host_b = lab.link(ROOT, &b).unwrap();
    let peer = lab.link(&p, &b).unwrap();
    let pair = Pair {
        primary_frontend: format!("tcp://{}:5001", host_p.b_addr),
        backup_frontend: format!("tcp://{}:5002", host_b.b_addr),
        primary_state: format!("tcp://{}:5003", peer.a_addr),
        backup_state: format!("tcp://{}:5004", peer.b_addr),
    };
    eprintln!("[{label}] namespaces {p} and {b}; host links {} and {}, server link {}-{}", host_p.b_addr, host_b.b_addr, peer.a_addr, peer.b_addr);
    let _primary = start_server_in(&lab, &p, &pair, true, &dir);
    let _backup = start_server_in(&lab, &b, &pair, false, &dir);
    let servers = pair.servers();
    let first = start_host(&[&host_args(&servers, "10", "14s")[..], &["--first-id", "1"]].concat(), &dir).unwrap();
    let before = status_when(&pair.backup_frontend, "a caught-up passive", Duration::from_secs(10), |s| {
        is_caught_up(s) && u(&s["counted"]) > 0
    }).unwrap();
    std::thread::sleep(Duration::from_secs(1));

    lab.cut(&peer).unwrap();
    eprintln!("[{label}] cut the link between the servers in epoch {}; the host still reaches both", before["epoch"]);
    let alone = status_when(&pair.primary_frontend, "active alone", Duration::from_secs(10), |s| {
        is_active(s) && s["replication"].as_str().is_some_and(|r| r.contains("alone"))
    }).unwrap();
    eprintln!("[{label}] primary: {} in epoch {}", alone["replication"], alone["epoch"]);

    // A second host asks the backup first: cut off from its peer, the
    // backup takes over, and both sides accept readings.
    let backup_first = format!("{},{}", pair.backup_frontend, pair.primary_frontend);
    let second = start_host(&[&host_args(&backup_first, "10", "4s")[..], &["--first-id", "101"]].concat(), &dir).unwrap();
    let b_active = status_when(&pair.backup_frontend, "active", Duration::from_secs(10), is_active).unwrap();
    let p_active = server_status(&pair.primary_frontend).unwrap();
    eprintln!(
        "[{label}] split brain: primary {} in epoch {} (counted {}), backup {} in epoch {} (counted {})",
        p_active["state"], p_active["epoch"], p_active["counted"], b_active["state"], b_active["epoch"], b_active["counted"]
    );
    assert_ne!(p_active["epoch"], b_active["epoch"], "{label}: two active nodes never share an epoch");
    let (code, second_summary) = finish_host(second, Duration::from_secs(60)).unwrap();
    host_done(&format!("{label} (second host)"), code, &second_summary);
    eprintln!("[{label}] second host: generated {}, acked {}", second_summary["generated"], second_summary["acked"]);

    let healed = Instant::now();
    lab.heal(&peer).unwrap();
    eprintln!("[{label}] healed the link");
    let active = pair.settled_active(Duration::from_secs(20)).unwrap();
    eprintln!("[{label}] {} ms after the heal: {active} is active and its peer has caught up", healed.elapsed().as_millis());

    let (code, first_summary) = finish_host(first, Duration::from_secs(60)).unwrap();
    host_done(&format!("{label} (first host)"), code, &first_summary);
    eprintln!("[{label}] first host: generated {}, acked {}, failovers {}", first_summary["generated"], first_summary["acked"], first_summary["failovers"]);
    let passive = if active == pair.primary_frontend { &pair.backup_frontend } else { &pair.primary_frontend };
    check_pair(label, &active, passive, &[&first_summary, &second_summary]).unwrap();
}
