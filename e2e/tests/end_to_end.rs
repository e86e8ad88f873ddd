//! The whole system with its real parts: `fog-server` processes, a
//! `fog-host` running the real sensor component, ZeroMQ on loopback.

use std::collections::BTreeSet;
use std::time::Duration;

use fog_testkit::{
    Pair, check_counts, check_pair, finish_host, is_active, is_caught_up, scratch_dir, server_counts, server_status, start_host,
    start_server, status_when,
};
use serde_json::Value;

fn per_sensor(summary: &Value) -> &Vec<Value> {
    summary["per_sensor"].as_array().expect("per_sensor list")
}

fn u(v: &Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not a number: {v}"))
}

#[test]
fn every_reading_is_acked_and_counted_once() {
    let dir = scratch_dir("acked").unwrap();
    let pair = Pair::on_free_ports().unwrap();
    let _primary = start_server(&pair, true, &["--lateness", "200ms"], &dir).unwrap();
    let host = start_host(
        &["--sensors", "10", "--interval", "100ms", "--duration", "4s", "--servers", &pair.servers()],
        &dir,
    )
    .unwrap();
    let (code, summary) = finish_host(host, Duration::from_secs(60)).unwrap();
    assert_eq!(code, 0, "host exit code; summary {summary}");
    assert_eq!(u(&summary["sensors"]), 10);
    assert_eq!(u(&summary["unacked"]), 0);
    assert!(u(&summary["generated"]) >= 10 * 20, "too few readings: {summary}");
    assert_eq!(summary["generated"], summary["acked"]);

    let status = server_status(&pair.primary_frontend).unwrap();
    check_counts("acked", &status, &[&summary]).unwrap();

    // Every sensor received the same averages, in the same order.
    let digests: BTreeSet<String> = per_sensor(&summary).iter().map(|s| s["averages_digest"].to_string()).collect();
    let applied: BTreeSet<u64> = per_sensor(&summary).iter().map(|s| u(&s["averages_applied"])).collect();
    assert_eq!(digests.len(), 1, "sensors saw different average streams: {summary}");
    assert_eq!(applied.len(), 1, "sensors applied different numbers of averages: {summary}");
    assert!(applied.iter().all(|&n| n >= 2), "expected averages during a 4 s run: {summary}");
    assert!(u(&status["averages_published"]) >= 2);
    for s in per_sensor(&summary) {
        let limit = u(&s["limit_kmh"]);
        assert!([60, 80, 100, 120, 130].contains(&limit), "limit {limit} is not a step");
    }
}

#[test]
fn host_fails_over_when_the_primary_is_killed() {
    let dir = scratch_dir("failover").unwrap();
    let pair = Pair::on_free_ports().unwrap();
    let mut primary = start_server(&pair, true, &["--lateness", "200ms"], &dir).unwrap();
    let _backup = start_server(&pair, false, &["--lateness", "200ms"], &dir).unwrap();
    let host = start_host(
        &[
            "--sensors", "10", "--interval", "100ms", "--duration", "6s", "--timeout", "500ms",
            "--servers", &pair.servers(),
        ],
        &dir,
    )
    .unwrap();
    // The kill comes under load, once the primary serves every sensor and
    // the backup holds a replica of what it counted.
    status_when(&pair.primary_frontend, "active and counting all 10 sensors", Duration::from_secs(15), |s| {
        is_active(s) && server_counts(s).len() == 10
    })
    .unwrap();
    status_when(&pair.backup_frontend, "a caught-up passive", Duration::from_secs(15), is_caught_up).unwrap();
    primary.kill().unwrap();

    let (code, summary) = finish_host(host, Duration::from_secs(60)).unwrap();
    assert_eq!(code, 0, "host exit code; summary {summary}");
    assert!(u(&summary["failovers"]) >= 1, "no failover recorded: {summary}");
    assert_eq!(u(&summary["unacked"]), 0, "readings generated during the outage were not all acked");
    assert_eq!(summary["generated"], summary["acked"]);

    // The backup took over with the replica, so it counts every reading
    // exactly once: those acked by the primary before the kill and its
    // own since. The old primary comes back as passive, catches up, and
    // must count exactly the same.
    let _primary = start_server(&pair, true, &["--lateness", "200ms"], &dir).unwrap();
    check_pair("failover", &pair.backup_frontend, &pair.primary_frontend, &[&summary]).unwrap();
}
