//! The benchmark program runs end to end, without keys and with CurveZMQ,
//! and prints figures a script can read. (Its numbers are not judged here:
//! speed is for people to read.)

use std::process::Command;

fn fog_bench(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_fog-bench")).args(args).output().expect("run fog-bench")
}

/// Runs every benchmark, briefly, in one security mode and checks its
/// figures; the two modes run as two tests, side by side.
fn every_figure(mode: &str) {
    let out = fog_bench(&[
        "--security", mode, "--measure", "300ms", "--warmup", "100ms", "--json", "--sensors", "100",
        "--host-sensors", "50", "--host-interval", "100ms",
        "--failover-sensors", "20", "--failover-runs", "1",
        "--recovery-readings", "100000",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "fog-bench failed: {stderr}");
    let figures: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object on stdout");
    let modes: Vec<&String> = figures.as_object().expect("an object").keys().collect();
    assert_eq!(modes, [mode], "{figures}");
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
        let v = figures.pointer(&format!("/{mode}{path}")).and_then(|v| v.as_f64());
        assert!(v.is_some_and(|v| v > 0.0), "/{mode}{path} missing or not positive in {figures}");
    }
    let u64_at = |path: &str| figures.pointer(&format!("/{mode}{path}")).and_then(|v| v.as_u64());
    assert!(u64_at("/latency/readings_acked").unwrap_or(0) > 0, "no latency readings acked: {figures}");
    // Every reading the host generated was acked (two missing figures
    // would compare equal: the run must have generated some).
    assert!(u64_at("/e2e/generated").is_some_and(|g| g > 0), "no readings generated: {figures}");
    assert_eq!(u64_at("/e2e/acked"), u64_at("/e2e/generated"), "{figures}");
    // The restarted server recovered every reading from its log.
    assert!(u64_at("/recovery/counted").unwrap_or(0) >= 100_000, "{figures}");
    // Killing the active lost and duplicated nothing.
    assert_eq!(u64_at("/failover/lost"), Some(0), "{figures}");
    assert_eq!(u64_at("/failover/duplicated"), Some(0), "{figures}");
    // The uplink runs where nats-server is installed, and only there.
    if fog_testkit::nats::nats_server().is_some() {
        for path in ["/uplink/bare/readings_per_s", "/uplink/bare/messages_per_s", "/uplink/message_bytes"] {
            let v = figures.pointer(&format!("/{mode}{path}")).and_then(|v| v.as_f64());
            assert!(v.is_some_and(|v| v > 0.0), "/{mode}{path} missing or not positive in {figures}");
        }
        assert!(u64_at("/uplink/bare/stored").unwrap_or(0) >= u64_at("/uplink/bare/messages").unwrap_or(u64::MAX), "{figures}");
    } else {
        fog_testkit::nats::skip_or_fail(&format!("every_figure({mode}), uplink"), "nats-server is not installed").unwrap();
        assert!(figures.pointer(&format!("/{mode}/uplink")).is_none(), "an uplink figure without nats-server: {figures}");
        assert!(stderr.contains("uplink: left out"), "{stderr}");
    }
}

#[test]
fn every_figure_without_keys() {
    every_figure("none");
}

/// A CurveZMQ client cannot talk to a server without keys, nor the other
/// way round: figures at all mean every socket used CurveZMQ.
#[test]
fn every_figure_with_curvezmq() {
    every_figure("curve");
}

#[test]
fn by_default_both_modes_are_measured_side_by_side() {
    let out = fog_bench(&["transport", "--measure", "300ms", "--warmup", "100ms", "--sensors", "100"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "fog-bench failed: {}", String::from_utf8_lossy(&out.stderr));
    let modes: Vec<&str> = stdout
        .lines()
        .filter(|l| l.starts_with("transport ceiling"))
        .filter_map(|l| l.split_whitespace().nth(2))
        .collect();
    assert_eq!(modes, ["none", "curve"], "{stdout}");
}

#[test]
fn a_load_beyond_the_protocol_caps_is_refused_before_anything_starts() {
    for (flags, expected) in [
        (["--sensors", "70000", "--readings-per-sensor", "1"], "at most 65536"),
        (["--sensors", "10000", "--readings-per-sensor", "10"], "100000 readings per batch"),
    ] {
        let out = fog_bench(&[&["ingest"][..], &flags[..]].concat());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{flags:?}: {stderr}");
        assert!(stderr.contains(expected), "{flags:?}: {stderr}");
        assert!(!stderr.contains("ingest ["), "{flags:?} started a benchmark: {stderr}");
    }
}

#[test]
fn an_uplink_shape_nats_cannot_take_is_refused_before_anything_starts() {
    for (flags, expected) in [
        (["--uplink-readings", "0"], "--uplink-readings must be 1 to"),
        (["--uplink-readings", "100000"], "max_payload"),
        (["--uplink-in-flight", "0"], "--uplink-in-flight must be 1 to"),
    ] {
        let out = fog_bench(&[&["uplink"][..], &flags[..]].concat());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{flags:?}: {stderr}");
        assert!(stderr.contains(expected), "{flags:?}: {stderr}");
        assert!(!stderr.contains("uplink: bare"), "{flags:?} started a benchmark: {stderr}");
    }
}

#[test]
fn bad_flags_are_a_usage_error() {
    for flags in [&["--measure", "forever"][..], &["--security", "tls"][..]] {
        let out = fog_bench(flags);
        assert_eq!(out.status.code(), Some(2), "{flags:?}");
        assert!(String::from_utf8_lossy(&out.stderr).contains(flags[0]), "{flags:?}");
    }
}
