//! One host, healthy sensors and misbehaving ones side by side: the
//! purpose-built `fog_faulty_sensor.wasm` makes sensor 3 trap, sensor 5 loop
//! forever and sensor 7 grow its memory without bound, after a few ticks of
//! every life. Each failure is reported once, the sensor is restarted from
//! its last good state until it has failed too often, then quarantined;
//! every other sensor's readings are all acked and counted exactly once.

use std::collections::BTreeMap;
use std::time::Duration;

use fog_e2e::{Pair, bin, finish_host, log_lines_with, scratch_dir, server_counts, server_status, start_host, start_server};
use serde_json::Value;

fn u(v: &Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not a number: {v}"))
}

#[test]
fn misbehaving_sensors_are_restarted_then_quarantined_and_the_others_never_notice() {
    let dir = scratch_dir("isolation");
    let pair = Pair::on_free_ports();
    let _primary = start_server(&pair, true, &["--lateness", "200ms"], &dir).unwrap();
    let faulty = bin("fog_faulty_sensor.wasm");
    let host = start_host(
        &[
            faulty.to_str().unwrap(),
            "--sensors", "20", "--interval", "100ms", "--duration", "4s",
            "--set", "fault=3:trap,5:loop,7:hog", "--set", "fault-after=4",
            "--restart-backoff", "100ms", "--max-restarts", "2",
            "--call-deadline", "50ms", "--max-memory-mib", "4",
            "--servers", &pair.servers(),
        ],
        &dir,
    )
    .unwrap();
    let log = host.log.clone();
    let (code, summary) = finish_host(host, Duration::from_secs(60)).unwrap();
    let per_sensor: BTreeMap<u64, &Value> =
        summary["per_sensor"].as_array().expect("per_sensor").iter().map(|s| (u(&s["sensor_id"]), s)).collect();

    assert_eq!(u(&summary["quarantined"]), 3, "summary: {summary}");
    // Each faulty sensor failed three times: twice restarted, then quarantined.
    assert_eq!(u(&summary["failed_sensors"]), 9, "summary: {summary}");
    assert_eq!(u(&summary["restarts"]), 6, "summary: {summary}");
    let expected = [(3, "trapped: wasm trap: wasm `unreachable`"), (5, "call deadline"), (7, "past the 4 MiB limit")];
    let text = std::fs::read_to_string(&log).unwrap();
    for (id, what) in expected {
        let s = per_sensor[&id];
        assert_eq!(s["quarantined"], true, "sensor {id}: {s}");
        assert_eq!(u(&s["failures"]), 3, "sensor {id}: {s}");
        let reports: Vec<&str> = text
            .lines()
            .filter(|l| l.contains(&format!("sensor_id={id}")) && (l.contains("sensor stopped") || l.contains("sensor quarantined")))
            .collect();
        assert_eq!(reports.len(), 3, "one report per failure of sensor {id}: {reports:#?}");
        assert!(reports.iter().all(|l| l.contains(what)), "sensor {id}'s reports say what happened ({what}): {reports:#?}");
    }
    assert_eq!(log_lines_with(&log, &["sensor restarted from its last good state"]), 6);

    // The healthy sensors never noticed: every reading acked, and the server
    // counted each exactly once.
    let status = server_status(&pair.primary_frontend).unwrap();
    let counts = server_counts(&status);
    for (id, s) in &per_sensor {
        let key = (*id, u(&s["incarnation"]));
        let (count, sum) = counts.get(&key).copied().unwrap_or_default();
        if [3, 5, 7].contains(id) {
            // Restarts resumed the sensor's own sequence: one incarnation,
            // nothing counted that the sensor did not generate.
            assert!(count >= u(&s["acked"]) && count <= u(&s["generated"]), "sensor {id}: server {count}, {s}");
            assert!(u(&s["generated"]) > 4, "sensor {id} produced across its restarts: {s}");
        } else {
            assert_eq!(s["failed"], false, "sensor {id}: {s}");
            assert_eq!(u(&s["unacked"]), 0, "sensor {id}: {s}");
            assert!(u(&s["generated"]) >= 30, "sensor {id} kept its pace: {s}");
            assert_eq!((count, sum), (u(&s["generated"]), u(&s["sum_kmh"])), "sensor {id}");
        }
    }
    let incarnations_per_sensor = counts.keys().fold(BTreeMap::<u64, u32>::new(), |mut m, (id, _)| {
        *m.entry(*id).or_default() += 1;
        m
    });
    assert!(incarnations_per_sensor.values().all(|&n| n == 1), "a restart changed an incarnation: {incarnations_per_sensor:?}");
    // Readings a quarantined sensor still holds are reported, not hidden.
    let held: u64 = [3, 5, 7].iter().map(|id| u(&per_sensor[id]["unacked"])).sum();
    assert_eq!(u(&summary["unacked"]), held, "summary: {summary}");
    assert_eq!(code, if held == 0 { 0 } else { 3 }, "exit code; summary {summary}");
}
