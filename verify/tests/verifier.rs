//! The fault verifier run for real: a short run of two hosts under every
//! fault (server, host, disk, network and a rogue host key) finds no
//! violation, a rogue alone is refused and counted for every attack it
//! makes, and a server built with a planted bug (it acks a reading before
//! the passive has it) is caught losing acked readings. With --uplink: two
//! sites forwarding to a NATS JetStream cluster whose nodes are killed
//! (the leader of a stream, another node, all of them) end with every
//! item in the cloud exactly once, in order; and a stream holding a
//! message twice is caught.

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
        "--fault-every", "2s", "--faults", "kill,stop,host,wipe,split,isolate,rogue",
    ]);
    eprintln!("{stderr}");
    assert_eq!(code, 0, "violations: {}", report["verdict"]["violations"]);
    assert_eq!(report["ok"], true);
    assert_eq!(report["security"], "curve", "keys by default");
    assert!(n(&report["rogue"]["batches_sent"]) > 0, "the rogue never ran: {}", report["schedule"]);
    assert!(report["verdict"]["readings_checked"].as_u64().unwrap_or(0) > 10_000, "{report}");
    assert!(report["schedule"].as_array().is_some_and(|s| s.len() >= 10), "too few faults applied: {report}");
}

fn n(v: &Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not a number: {v}"))
}

#[test]
fn a_rogue_host_key_is_refused_and_counted_for_every_attack_and_changes_no_count() {
    let (code, report, stderr) = verify(&[
        "--duration", "15s", "--seed", "7", "--hosts", "2", "--sensors", "40", "--interval", "50ms",
        "--fault-every", "2s", "--faults", "rogue",
    ]);
    eprintln!("{stderr}");
    assert_eq!(code, 0, "violations: {}", report["verdict"]["violations"]);
    let rogue = &report["rogue"];
    let counted = &report["server_counted"];
    assert!(n(&rogue["activations"]) >= 2, "{}", report["schedule"]);
    // Both servers refuse (and count) what is refused before the node looks
    // at its state: forged epochs, foreign sensors, oversized batches. With
    // no other fault, every one sent arrives.
    assert_eq!(n(&counted["forged_epochs"]), n(&rogue["forged_epoch_batches"]), "{report}");
    assert_eq!(n(&counted["refused.foreign_sensor"]), n(&rogue["foreign_readings"]), "{report}");
    assert_eq!(n(&counted["refused.too_large"]), n(&rogue["over_limit_batches"]), "{report}");
    assert!(n(&rogue["limit_batches"]) > 0 && n(&rogue["poison_readings"]) > 65_536, "{rogue}");
    // Poison reaches the active only (the passive answers NotActive).
    for counter in ["refused.seq_out_of_range", "refused.from_the_future", "expired"] {
        assert!(n(&counted[counter]) > 0, "{counter}: {report}");
    }
    assert_eq!(n(&rogue["watermark_jumps"]), 0);
    assert_eq!(n(&report["verdict"]["unchecked_incarnations"]), 0, "the rogue got nothing counted");
}

/// Builds fog-server with the `unsafe-early-ack` feature in a target dir of
/// its own, beside the one this test was built in.
fn planted_server() -> PathBuf {
    let exe = PathBuf::from(env!("CARGO_BIN_EXE_fog-verify"));
    let target = exe.parent().and_then(|p| p.parent()).expect("target/<profile>/fog-verify").join("planted");
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../server/Cargo.toml");
    // A first build starts from a copy of the dependencies this test was
    // built with (same sources, same flags: cargo takes them as built), so
    // that only the server and the crates it shares with the workspace are
    // compiled again; without the copy it would be the whole tree, minutes.
    let release = exe.parent().expect("target/<profile>");
    let planted_release = target.join("release");
    if !planted_release.exists() {
        std::fs::create_dir_all(&planted_release).expect("make the planted target dir");
        for part in ["deps", "build", ".fingerprint"] {
            let copied = Command::new("cp").arg("-a").arg(release.join(part)).arg(&planted_release).status();
            if !copied.is_ok_and(|s| s.success()) {
                eprintln!("could not copy {} for the planted build; it builds from scratch", release.join(part).display());
            }
        }
    }
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
        fog_testkit::netns::skip_or_fail("planted bug", "the planted bug is only exposed with network namespaces").unwrap();
        return;
    }
    assert_eq!(code, 1, "the planted bug went unnoticed: {report}");
    assert!(report["verdict"]["lost"].as_u64().unwrap_or(0) > 0, "{report}");
    assert!(stderr.contains("replay with --seed 5"), "a failing run says how to replay it");
}

/// Whether the --uplink runs can go ahead (nats-server installed), or are
/// skipped (or fail, when the kit's environment says it is required).
fn nats_here(test: &str) -> bool {
    fog_testkit::nats::require_nats(test).expect("nats-server is required here").is_some()
}

#[test]
fn two_sites_forward_every_item_to_the_cloud_once_while_nats_nodes_die() {
    if !nats_here("two_sites_forward_every_item_to_the_cloud_once_while_nats_nodes_die") {
        return;
    }
    let (code, report, stderr) = verify(&[
        "--uplink", "--sites", "2", "--duration", "30s", "--seed", "20261201", "--hosts", "1", "--sensors", "30",
        "--interval", "50ms", "--fault-every", "2s", "--faults", "nats-leader,nats-all,nats-node,kill,isolate",
    ]);
    eprintln!("{stderr}");
    assert_eq!(code, 0, "violations: {}", report["verdict"]["violations"]);
    assert_eq!(report["ok"], true);
    let schedule: Vec<&str> = report["schedule"].as_array().expect("a schedule").iter().filter_map(Value::as_str).collect();
    for what in ["kill -9 of every NATS node", ", the leader of FOG_SITE", ", not the leader of FOG_SITE"] {
        assert!(schedule.iter().any(|l| l.contains(what)), "no '{what}' in the schedule: {schedule:#?}");
    }
    assert!(schedule.iter().any(|l| l.contains("site1: ")) && schedule.iter().any(|l| l.contains("site2: ")), "{schedule:#?}");
    let streams = report["cloud"]["streams"].as_array().expect("the cloud's streams");
    assert_eq!(streams.len(), 2, "{report}");
    for (stream, name) in streams.iter().zip(["FOG_SITE1", "FOG_SITE2"]) {
        assert_eq!(stream["stream"], name);
        assert!(stream["violations"].as_array().is_some_and(Vec::is_empty), "{stream}");
        // 30 sensors at 20/s for 30 s: some 18 000 readings, every one there.
        assert!(n(&stream["readings"]) > 5_000, "{stream}");
        assert!(n(&stream["averages"]) > 0, "{stream}");
        assert_eq!(n(&stream["readings"]) + n(&stream["averages"]), n(&stream["site_items"]), "{stream}");
        assert_eq!(n(&stream["duplicated"]) + n(&stream["missing"]) + n(&stream["dropped"]), 0, "{stream}");
    }
    // The hosts' checks cover both sites: every reading checked is in a stream.
    let in_cloud: u64 = streams.iter().map(|s| n(&s["readings"])).sum();
    assert_eq!(n(&report["verdict"]["readings_checked"]), in_cloud, "{report}");
}

#[test]
fn a_message_published_twice_into_a_sites_stream_is_caught() {
    if !nats_here("a_message_published_twice_into_a_sites_stream_is_caught") {
        return;
    }
    let (code, report, stderr) = verify(&[
        "--uplink", "--plant-cloud-duplicate", "--duration", "8s", "--seed", "3", "--sensors", "20", "--interval", "50ms",
        "--fault-every", "3s", "--faults", "kill",
    ]);
    eprintln!("{stderr}");
    assert_eq!(code, 1, "the duplicate went unnoticed: {report}");
    assert!(report["cloud"]["planted"].as_str().is_some_and(|p| p.contains("published again")), "{report}");
    let stream = &report["cloud"]["streams"][0];
    assert!(n(&stream["duplicated"]) > 0, "{stream}");
    assert_eq!(n(&stream["missing"]), 0, "{stream}");
    let violations = report["verdict"]["violations"].as_array().expect("violations");
    assert!(violations.iter().filter_map(Value::as_str).any(|v| v.starts_with("cloud FOG_SITE1: ") && v.contains("more than once")), "{violations:?}");
    // The site itself is right: only the cloud's stream is wrong.
    assert_eq!((n(&report["verdict"]["lost"]), n(&report["verdict"]["duplicated"])), (0, 0), "{report}");
    assert!(stderr.contains("replay with --seed 3"));
}
