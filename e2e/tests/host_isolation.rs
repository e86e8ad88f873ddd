//! One host, healthy sensors and misbehaving ones side by side: the
//! purpose-built `fog_faulty_sensor.wasm` makes sensor 3 trap, sensor 5 loop
//! forever and sensor 7 grow its memory without bound, after a few ticks of
//! every life. Each failure is reported once, the sensor is restarted from
//! its last good state until it has failed too often, then quarantined;
//! every other sensor's readings are all acked and counted exactly once.
//! The same holds when the sensors are called from several threads.

use std::collections::BTreeMap;
use std::time::Duration;

use fog_testkit::{Pair, bin, finish_host, log_lines_with, scratch_dir, server_counts, server_status, start_host, start_server};
use serde_json::Value;

fn u(v: &Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not a number: {v}"))
}

#[test]
fn misbehaving_sensors_are_restarted_then_quarantined_and_the_others_never_notice() {
    let run = Faults { sensors: 20, trap: 3, looping: 5, hog: 7, interval: "100ms", duration: "4s", min_generated: 30 };
    run.check(&[]);
}

#[test]
fn misbehaving_sensors_are_contained_when_the_fleet_runs_on_two_threads() {
    // Enough sensors that every tick slice, commit and reply is spread over
    // both threads; the faulty ones sit in different chunks.
    let run = Faults { sensors: 6000, trap: 3, looping: 2999, hog: 5998, interval: "250ms", duration: "6s", min_generated: 18 };
    run.check(&["--threads", "2"]);
}

/// A host of `sensors` faulty-component sensors, three of which misbehave.
struct Faults {
    sensors: u32,
    trap: u64,
    looping: u64,
    hog: u64,
    interval: &'static str,
    duration: &'static str,
    /// Readings each healthy sensor makes at least.
    min_generated: u64,
}

impl Faults {
    fn check(&self, extra: &[&str]) {
        let dir = scratch_dir("isolation").unwrap();
        let pair = Pair::on_free_ports().unwrap();
        let _primary = start_server(&pair, true, &["--lateness", "200ms"], &dir).unwrap();
        let faulty = bin("fog_faulty_sensor.wasm").unwrap();
        let sensors = self.sensors.to_string();
        let faults = format!("fault={}:trap,{}:loop,{}:hog", self.trap, self.looping, self.hog);
        let servers = pair.servers();
        let mut args = vec![
            faulty.to_str().unwrap(),
            "--sensors", &sensors, "--interval", self.interval, "--duration", self.duration,
            "--set", &faults, "--set", "fault-after=4",
            "--restart-backoff", "100ms", "--max-restarts", "2",
            "--call-deadline", "50ms", "--max-memory-mib", "4",
            "--servers", &servers,
        ];
        args.extend_from_slice(extra);
        let host = start_host(&args, &dir).unwrap();
        let log = host.log.clone();
        let (code, summary) = finish_host(host, Duration::from_secs(60)).unwrap();
        let per_sensor: BTreeMap<u64, &Value> =
            summary["per_sensor"].as_array().expect("per_sensor").iter().map(|s| (u(&s["sensor_id"]), s)).collect();

        assert_eq!(u(&summary["quarantined"]), 3, "summary: {summary}");
        // Each faulty sensor failed three times: twice restarted, then quarantined.
        assert_eq!(u(&summary["failed_sensors"]), 9, "summary: {summary}");
        assert_eq!(u(&summary["restarts"]), 6, "summary: {summary}");
        let expected = [
            (self.trap, "trapped: wasm trap: wasm `unreachable`"),
            (self.looping, "call deadline"),
            (self.hog, "past the 4 MiB limit"),
        ];
        let faulty_ids = [self.trap, self.looping, self.hog];
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
            if faulty_ids.contains(id) {
                // Restarts resumed the sensor's own sequence: one incarnation,
                // nothing counted that the sensor did not generate.
                assert!(count >= u(&s["acked"]) && count <= u(&s["generated"]), "sensor {id}: server {count}, {s}");
                assert!(u(&s["generated"]) > 4, "sensor {id} produced across its restarts: {s}");
            } else {
                assert_eq!(s["failed"], false, "sensor {id}: {s}");
                assert_eq!(u(&s["unacked"]), 0, "sensor {id}: {s}");
                assert!(u(&s["generated"]) >= self.min_generated, "sensor {id} kept its pace: {s}");
                assert_eq!((count, sum), (u(&s["generated"]), u(&s["sum_kmh"])), "sensor {id}");
            }
        }
        let incarnations_per_sensor = counts.keys().fold(BTreeMap::<u64, u32>::new(), |mut m, (id, _)| {
            *m.entry(*id).or_default() += 1;
            m
        });
        assert!(incarnations_per_sensor.values().all(|&n| n == 1), "a restart changed an incarnation: {incarnations_per_sensor:?}");
        // Readings a quarantined sensor still holds are reported, not hidden.
        let held: u64 = faulty_ids.iter().map(|id| u(&per_sensor[id]["unacked"])).sum();
        assert_eq!(u(&summary["unacked"]), held, "summary: {summary}");
        assert_eq!(code, if held == 0 { 0 } else { 3 }, "exit code; summary {summary}");
    }
}
