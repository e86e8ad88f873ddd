//! The benchmark program runs end to end and prints figures a script can
//! read. (Its numbers are not judged here: speed is for people to read.)

use std::process::Command;

#[test]
fn prints_every_figure_as_json() {
    let out = Command::new(env!("CARGO_BIN_EXE_fog-bench"))
        .args([
            "--measure", "1s", "--warmup", "200ms", "--json", "--sensors", "100",
            "--host-sensors", "50", "--host-interval", "100ms",
            "--failover-sensors", "20", "--failover-runs", "1",
            "--recovery-readings", "100000",
        ])
        .output()
        .expect("run fog-bench");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "fog-bench failed: {stderr}");
    let figures: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object on stdout");
    for path in [
        "/transport/readings_per_s",
        "/ingest/readings_per_s",
        "/ingest_fraction_of_transport",
        "/latency/p99_ms",
        "/e2e/acked_per_s",
        "/e2e/host_rss_kib_per_sensor",
        "/failover/median_ms",
        "/recovery/ready_ms",
    ] {
        let v = figures.pointer(path).and_then(|v| v.as_f64());
        assert!(v.is_some_and(|v| v > 0.0), "{path} missing or not positive in {figures}");
    }
    assert!(figures.pointer("/latency/readings_acked").and_then(|v| v.as_u64()).unwrap_or(0) > 0);
    // The restarted server recovered every reading from its log.
    assert!(figures.pointer("/recovery/counted").and_then(|v| v.as_u64()).unwrap_or(0) >= 100_000);
    // Killing the active lost and duplicated nothing.
    assert_eq!(figures.pointer("/failover/lost").and_then(|v| v.as_u64()), Some(0));
    assert_eq!(figures.pointer("/failover/duplicated").and_then(|v| v.as_u64()), Some(0));
}

#[test]
fn bad_flags_are_a_usage_error() {
    let out = Command::new(env!("CARGO_BIN_EXE_fog-bench")).args(["--measure", "forever"]).output().expect("run");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--measure"));
}
