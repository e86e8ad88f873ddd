//! Hot swap under load: the host runs the built-in sensor from a file; the
//! file is replaced by the scenario sensor and the host gets SIGHUP. Every
//! sensor moves over through snapshot and restore: same incarnation,
//! sequence continued, no reading lost or counted twice, and the readings
//! after the swap come from the new logic. Swapping back is refused (the
//! built-in sensor cannot read the scenario sensor's snapshot) and the
//! scenario sensor keeps running.

use std::path::{Path, PathBuf};
use std::time::Duration;

use fog_testkit::{
    Pair, Proc, bin, check_counts, finish_host, log_lines_with, scratch_dir, server_counts, server_status, start_host,
    start_server, status_when, wait_for_log_line,
};
use serde_json::Value;

fn u(v: &Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not a number: {v}"))
}

/// A primary, and a sensor file in a scratch dir holding `component`.
struct Stage {
    dir: PathBuf,
    pair: Pair,
    _primary: Proc,
    sensor: PathBuf,
}

impl Stage {
    fn new(name: &str, component: &str) -> Stage {
        let dir = scratch_dir(name).unwrap();
        let pair = Pair::on_free_ports().unwrap();
        let _primary = start_server(&pair, true, &["--lateness", "200ms"], &dir).unwrap();
        let sensor = dir.join("sensor.wasm");
        install(&bin(component).unwrap(), &sensor);
        Stage { dir, pair, _primary, sensor }
    }
}

/// Every sensor of the host's summary is counted by the primary exactly as
/// it generated: same count, same speed sum, and nothing else counted.
fn assert_counted_as_generated(pair: &Pair, summary: &Value) {
    check_counts("primary", &server_status(&pair.primary_frontend).unwrap(), &[summary]).unwrap();
}

/// The primary's status once it counts readings of all `sensors` of the
/// host: the host's session, and with it `--watch`, is running.
fn counting_every_sensor(pair: &Pair, sensors: usize) -> Value {
    let what = format!("counting readings of all {sensors} sensors");
    status_when(&pair.primary_frontend, &what, Duration::from_secs(15), |s| server_counts(s).len() == sensors).unwrap()
}

/// Replaces `to` with a copy of `from` in one rename, as a deploy would.
fn install(from: &Path, to: &Path) {
    let tmp = to.with_extension("tmp");
    std::fs::copy(from, &tmp).unwrap();
    std::fs::rename(&tmp, to).unwrap();
}

#[test]
fn sighup_swaps_the_component_without_losing_or_repeating_a_reading() {
    let Stage { dir, pair, _primary, sensor } = Stage::new("swap", "fog_sensor.wasm");
    let host = start_host(
        &[
            sensor.to_str().unwrap(),
            "--sensors", "20", "--interval", "100ms", "--duration", "4s",
            // Read by the scenario sensor only: a constant 200 km/h, which
            // the built-in sensor (70-120 km/h) never produces.
            "--set", "free-kmh=200", "--set", "noise-kmh=0", "--set", "jam-at=1000",
            "--servers", &pair.servers(),
        ],
        &dir,
    )
    .unwrap();
    let log = host.log.clone();
    let before = server_counts(&counting_every_sensor(&pair, 20));
    install(&bin("fog_scenario_sensor.wasm").unwrap(), &sensor);
    host.signal("HUP").unwrap();
    wait_for_log_line(&log, &["hot swap: 20 sensors moved"], Duration::from_secs(10)).unwrap();

    install(&bin("fog_sensor.wasm").unwrap(), &sensor);
    host.signal("HUP").unwrap();
    let (code, summary) = finish_host(host, Duration::from_secs(60)).unwrap();
    assert_eq!(code, 0, "host exit code; summary {summary}");
    assert_eq!(log_lines_with(&log, &["hot swap: 20 sensors moved"]), 1, "the swap is logged once");
    assert_eq!(u(&summary["swaps"]), 1, "the swap back was refused: {summary}");
    assert_eq!(log_lines_with(&log, &["hot swap refused, still running", "restore failed"]), 1);
    assert_eq!(u(&summary["failed_sensors"]), 0);

    let counts = server_counts(&server_status(&pair.primary_frontend).unwrap());
    assert_eq!(counts.len(), 20, "one incarnation per sensor: {counts:?}");
    for s in summary["per_sensor"].as_array().expect("per_sensor") {
        let key = (u(&s["sensor_id"]), u(&s["incarnation"]));
        let (count, sum) = counts.get(&key).copied().unwrap_or_default();
        assert!(before.contains_key(&key), "sensor {key:?} kept its incarnation across the swap");
        assert_eq!((count, sum), (u(&s["generated"]), u(&s["sum_kmh"])), "sensor {key:?}: {s}");
        let (old_count, old_sum) = before[&key];
        let after = (count - old_count, sum - old_sum);
        // Some readings after the swap came from the scenario (200 km/h).
        assert!(after.1 > after.0 * 120, "sensor {key:?}: {} readings summing {} km/h after the swap", after.0, after.1);
    }
}

#[test]
fn watch_swaps_when_the_file_changes_and_keeps_running_on_a_bad_one() {
    let Stage { dir, pair, _primary, sensor } = Stage::new("watch", "fog_sensor.wasm");
    let host = start_host(
        &[
            sensor.to_str().unwrap(),
            "--watch",
            "--sensors", "10", "--interval", "100ms", "--duration", "5s",
            "--set", "free-kmh=200", "--set", "noise-kmh=0", "--set", "jam-at=1000",
            "--servers", &pair.servers(),
        ],
        &dir,
    )
    .unwrap();
    let log = host.log.clone();
    // Readings arrive once the session runs, and with it the watch.
    counting_every_sensor(&pair, 10);
    // A broken deploy first: not a component at all.
    let junk = dir.join("junk.wasm");
    std::fs::write(&junk, b"not a component").unwrap();
    install(&junk, &sensor);
    wait_for_log_line(&log, &["hot swap refused, still running"], Duration::from_secs(10)).unwrap();
    // Then the real one.
    install(&bin("fog_scenario_sensor.wasm").unwrap(), &sensor);
    wait_for_log_line(&log, &["hot swap: 10 sensors moved"], Duration::from_secs(10)).unwrap();

    let (code, summary) = finish_host(host, Duration::from_secs(60)).unwrap();
    assert_eq!(code, 0, "host exit code; summary {summary}");
    assert_eq!(log_lines_with(&log, &["hot swap refused, still running"]), 1, "the bad file is refused once");
    assert_eq!(log_lines_with(&log, &["hot swap: 10 sensors moved"]), 1, "the new file is swapped in once");
    assert_eq!(u(&summary["swaps"]), 1);
    assert_counted_as_generated(&pair, &summary);
}

#[test]
fn a_swap_gives_quarantined_sensors_a_fresh_start_on_the_new_component() {
    let Stage { dir, pair, _primary, sensor } = Stage::new("revive", "fog_faulty_sensor.wasm");
    let host = start_host(
        &[
            sensor.to_str().unwrap(),
            "--watch",
            "--sensors", "5", "--interval", "100ms", "--duration", "5s",
            // Sensor 3 traps on its third tick of every life: quarantined
            // after one restart.
            "--set", "fault=3:trap", "--set", "fault-after=2",
            "--max-restarts", "1", "--restart-backoff", "100ms",
            "--servers", &pair.servers(),
        ],
        &dir,
    )
    .unwrap();
    let log = host.log.clone();
    wait_for_log_line(&log, &["sensor quarantined"], Duration::from_secs(10)).unwrap();
    assert_eq!(log_lines_with(&log, &["sensor quarantined"]), 1, "sensor 3 alone is quarantined before the swap");
    // The fixed sensor: the built-in one, which reads the faulty sensor's
    // snapshots (both are the core's).
    install(&bin("fog_sensor.wasm").unwrap(), &sensor);
    wait_for_log_line(&log, &["1 quarantined sensors get another chance"], Duration::from_secs(10)).unwrap();

    let (code, summary) = finish_host(host, Duration::from_secs(60)).unwrap();
    assert_eq!(code, 0, "every reading acked, sensor 3's included: {summary}");
    assert_eq!(log_lines_with(&log, &["1 quarantined sensors get another chance"]), 1);
    assert_eq!(u(&summary["quarantined"]), 0, "{summary}");
    assert_eq!(u(&summary["swaps"]), 1);
    assert_counted_as_generated(&pair, &summary);
    let three = summary["per_sensor"].as_array().unwrap().iter().find(|s| s["sensor_id"] == 3).expect("sensor 3");
    assert!(u(&three["generated"]) > 20, "sensor 3 ran on after the swap: {three}");
}

#[test]
fn a_large_fleet_moves_in_steps_while_the_loop_serves_replies() {
    // 10 000 sensors: ten steps of at most 1 024 (`SWAP_STEP`), with the
    // loop taking replies between them; then a swap back that the first
    // step refuses, whose new instances are all dropped.
    let Stage { dir, pair, _primary, sensor } = Stage::new("swap-steps", "fog_sensor.wasm");
    let host = start_host(
        &[
            sensor.to_str().unwrap(),
            "--sensors", "10000", "--interval", "500ms", "--duration", "8s",
            "--set", "free-kmh=200", "--set", "noise-kmh=0", "--set", "jam-at=1000",
            "--servers", &pair.servers(),
        ],
        &dir,
    )
    .unwrap();
    let log = host.log.clone();
    counting_every_sensor(&pair, 10_000);
    install(&bin("fog_scenario_sensor.wasm").unwrap(), &sensor);
    host.signal("HUP").unwrap();
    wait_for_log_line(&log, &["hot swap: 10000 sensors moved", "10 steps of at most"], Duration::from_secs(30)).unwrap();
    install(&bin("fog_sensor.wasm").unwrap(), &sensor);
    host.signal("HUP").unwrap();
    wait_for_log_line(&log, &["hot swap refused, still running", "restore failed"], Duration::from_secs(30)).unwrap();

    let (code, summary) = finish_host(host, Duration::from_secs(90)).unwrap();
    assert_eq!(code, 0, "every reading acked; summary {}", summary["totals"]);
    assert_eq!(u(&summary["swaps"]), 1);
    assert_eq!(u(&summary["failed_sensors"]), 0);
    assert_counted_as_generated(&pair, &summary);
    // Every sensor ran on the scenario sensor after the swap: its readings
    // (200 km/h) raise the mean above what the built-in sensor makes.
    for s in summary["per_sensor"].as_array().expect("per_sensor") {
        assert!(u(&s["sum_kmh"]) > u(&s["generated"]) * 120, "sensor {} ran on the new component: {s}", s["sensor_id"]);
    }
}
