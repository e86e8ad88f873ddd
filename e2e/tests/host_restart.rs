//! Restart without loss: a host killed with `kill -9` and started again with
//! the same `--state-dir` resumes every sensor where its last commit left
//! it. The server then holds, for every sensor, exactly one incarnation
//! whose count and speed sum equal what the sensor generated over both
//! lives: no reading lost, none counted twice, no sequence number reused.

use std::collections::BTreeMap;
use std::time::Duration;

use fog_testkit::{
    Pair, finish_host, scratch_dir, server_counts, server_status, start_host, start_server, status_when, wait_for_log_line,
};
use serde_json::Value;

fn u(v: &Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not a number: {v}"))
}

#[test]
fn a_host_killed_with_kill_9_resumes_every_sensor_from_its_state_dir() {
    let dir = scratch_dir("restart").unwrap();
    let state = dir.join("state");
    let pair = Pair::on_free_ports().unwrap();
    let _primary = start_server(&pair, true, &["--lateness", "200ms"], &dir).unwrap();
    let servers = pair.servers();
    let common = [
        // Four readings a visit: a restart resumes after every one that left.
        "--sensors", "50", "--interval", "25ms", "--visit-every", "100ms", "--servers", servers.as_str(),
        "--state-dir", state.to_str().unwrap(),
    ];

    let mut first = start_host(&common, &dir).unwrap();
    // The first life lasts until every sensor has 80 readings counted (about
    // 2 s), so that the second life's ~80 cannot reach 120 on their own.
    let status = status_when(&pair.primary_frontend, "counting 80 readings of every one of 50 sensors", Duration::from_secs(20), |s| {
        let counts = server_counts(s);
        counts.len() == 50 && counts.values().all(|(count, _)| *count >= 80)
    })
    .unwrap();
    let before = server_counts(&status);
    first.kill().unwrap();

    let mut args = common.to_vec();
    args.extend(["--duration", "2s"]);
    let second = start_host(&args, &dir).unwrap();
    let (code, summary) = finish_host(second, Duration::from_secs(60)).unwrap();
    assert_eq!(code, 0, "host exit code; summary {summary}");
    assert_eq!(u(&summary["unacked"]), 0);

    let counts = server_counts(&server_status(&pair.primary_frontend).unwrap());
    let mut incarnations: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
    for (id, incarnation) in counts.keys() {
        incarnations.entry(*id).or_default().push(*incarnation);
    }
    assert!(incarnations.values().all(|i| i.len() == 1), "a sensor came back with a new incarnation: {incarnations:?}");
    for s in summary["per_sensor"].as_array().expect("per_sensor") {
        let key = (u(&s["sensor_id"]), u(&s["incarnation"]));
        assert!(before.contains_key(&key), "sensor {key:?} resumed its first life's incarnation");
        let (count, sum) = counts.get(&key).copied().unwrap_or_default();
        // Generated over both lives: the counter is part of the snapshot.
        assert_eq!((count, sum), (u(&s["generated"]), u(&s["sum_kmh"])), "sensor {key:?}: {s}");
        assert!(count > before[&key].0, "sensor {key:?} kept producing after the restart");
        assert!(u(&s["generated"]) >= 120, "sensor {key:?} resumed with its earlier readings: {s}");
    }
}

#[test]
fn a_second_host_cannot_use_a_state_dir_in_use() {
    let dir = scratch_dir("state-locked").unwrap();
    let state = dir.join("state");
    let pair = Pair::on_free_ports().unwrap();
    let servers = pair.servers();
    let args = ["--sensors", "2", "--servers", servers.as_str(), "--state-dir", state.to_str().unwrap()];
    let first = start_host(&args, &dir).unwrap();
    // The host logs its saved state once it holds the directory's lock.
    wait_for_log_line(&first.log, &["saved state of"], Duration::from_secs(10)).unwrap();
    let out = std::process::Command::new(fog_testkit::bin("fog-host").unwrap())
        .args(args)
        .env("RUST_LOG", "off")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("is in use by another fog-host"), "{stderr}");
}
