//! The whole system with its real parts: `fog-server` processes, a
//! `fog-host` running the real sensor component, ZeroMQ on loopback.

use std::collections::BTreeSet;
use std::time::Duration;

use fog_e2e::{Pair, finish_host, scratch_dir, server_counts, server_status, start_host, start_server};
use serde_json::Value;

fn per_sensor(summary: &Value) -> &Vec<Value> {
    summary["per_sensor"].as_array().expect("per_sensor list")
}

fn u(v: &Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not a number: {v}"))
}

#[test]
fn every_reading_is_acked_and_counted_once() {
    let dir = scratch_dir("acked");
    let pair = Pair::on_free_ports();
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
    let counts = server_counts(&status);
    assert_eq!(u(&status["counted"]), u(&summary["generated"]), "server counted each reading exactly once");
    for s in per_sensor(&summary) {
        let key = (u(&s["sensor_id"]), u(&s["incarnation"]));
        let (count, sum) = counts.get(&key).copied().unwrap_or_else(|| panic!("server has no sensor {key:?}"));
        assert_eq!(count, u(&s["generated"]), "count of sensor {key:?}");
        assert_eq!(sum, u(&s["sum_kmh"]), "sum_kmh of sensor {key:?}");
    }

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
    let dir = scratch_dir("failover");
    let pair = Pair::on_free_ports();
    let mut primary = start_server(&pair, true, &["--lateness", "200ms"], &dir).unwrap();
    let backup = start_server(&pair, false, &["--lateness", "200ms"], &dir).unwrap();
    let host = start_host(
        &[
            "--sensors", "10", "--interval", "100ms", "--duration", "6s", "--timeout", "500ms",
            "--servers", &pair.servers(),
        ],
        &dir,
    )
    .unwrap();
    std::thread::sleep(Duration::from_secs(2));
    let before = server_status(&pair.primary_frontend).unwrap();
    assert_eq!(before["state"], "active", "primary serves first: {before}");
    let counted_by_primary = server_counts(&before);
    primary.kill();

    let (code, summary) = finish_host(host, Duration::from_secs(60)).unwrap();
    assert_eq!(code, 0, "host exit code; summary {summary}");
    assert!(u(&summary["failovers"]) >= 1, "no failover recorded: {summary}");
    assert_eq!(u(&summary["unacked"]), 0, "readings generated during the outage were not all acked");
    assert_eq!(summary["generated"], summary["acked"]);

    let after = server_status(&pair.backup_frontend).unwrap();
    assert_eq!(after["state"], "active", "backup took over: {after}");
    let counted_by_backup = server_counts(&after);
    for s in per_sensor(&summary) {
        let key = (u(&s["sensor_id"]), u(&s["incarnation"]));
        let (p, _) = counted_by_primary.get(&key).copied().unwrap_or_default();
        let (b, _) = counted_by_backup.get(&key).copied().unwrap_or_default();
        // Without replication the two servers may both count the readings
        // acked between the status query and the kill; none may be missing.
        assert!(p + b >= u(&s["generated"]), "sensor {key:?}: primary {p} + backup {b} < generated {}", s["generated"]);
        assert!(b > 0, "backup counted nothing for sensor {key:?}");
    }
    drop(backup);
}
