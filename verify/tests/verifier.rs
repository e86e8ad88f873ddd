//! The fault verifier run for real: a short run of two hosts under every
//! fault (server, host, disk and network) finds no violation, and a server
//! built with a planted bug (it acks a reading before the passive has it)
//! is caught losing acked readings.

use std::path::PathBuf;
use std::process::Command;

use serde_json::Value;

fn verify(args: &[&str]) -> (i32, Value, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_fog-verify")).args(args).arg("--json").output().expect("run fog-verify");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let report: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("no JSON report ({e}); stderr:\n{stderr}"));
    (out.status.code().unwrap_or(-1), report, stderr)
}

#[test]
fn a_short_run_of_two_hosts_under_every_fault_finds_no_violation() {
    let (code, report, stderr) = verify(&[
        "--duration", "40s", "--seed", "20261125", "--hosts", "2", "--sensors", "50", "--interval", "50ms",
        "--fault-every", "2s", "--faults", "kill,stop,host,wipe,split,isolate",
    ]);
    eprintln!("{stderr}");
    assert_eq!(code, 0, "violations: {}", report["verdict"]["violations"]);
    assert_eq!(report["ok"], true);
    assert!(report["verdict"]["readings_checked"].as_u64().unwrap_or(0) > 10_000, "{report}");
    assert!(report["schedule"].as_array().is_some_and(|s| s.len() >= 10), "too few faults applied: {report}");
}

/// Builds fog-server with the `unsafe-early-ack` feature in a target dir of
/// its own, beside the one this test was built in.
fn planted_server() -> PathBuf {
    let exe = PathBuf::from(env!("CARGO_BIN_EXE_fog-verify"));
    let target = exe.parent().and_then(|p| p.parent()).expect("target/<profile>/fog-verify").join("planted");
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../server/Cargo.toml");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(cargo)
        .args(["build", "--release", "--features", "unsafe-early-ack", "--manifest-path"])
        .arg(&manifest)
        .arg("--target-dir")
        .arg(&target)
        .env_remove("CARGO_TARGET_DIR")
        .status()
        .expect("run cargo");
    assert!(status.success(), "building the planted server failed");
    target.join("release/fog-server")
}

#[test]
fn a_server_that_acks_before_replicating_is_caught_losing_readings() {
    let server = planted_server();
    let (code, report, stderr) = verify(&[
        "--duration", "20s", "--seed", "5", "--sensors", "100", "--interval", "50ms", "--fault-every", "2s",
        "--faults", "wipe", "--server-bin", server.to_str().expect("utf-8 path"),
    ]);
    eprintln!("{stderr}");
    if report["network"] != "namespaces" {
        eprintln!("SKIPPED: the planted bug is only exposed with network namespaces (needs root and `ip netns`)");
        return;
    }
    assert_eq!(code, 1, "the planted bug went unnoticed: {report}");
    assert!(report["verdict"]["lost"].as_u64().unwrap_or(0) > 0, "{report}");
    assert!(stderr.contains("replay with --seed 5"), "a failing run says how to replay it");
}
