//! Sensors written in Python (componentize-py) and JavaScript
//! (componentize-js), each against `wit/sensor.wit` unchanged, run by the
//! released `fog-host` beside the built-in Rust sensor: every reading acked
//! and counted once, every sensor on the server's average stream with the
//! same digest as the built-in sensors at the same position; a hot swap
//! moves sensors from one language to the other with their state; and a
//! component that does not fit the host's limits is refused with the flag
//! to raise.
//!
//! The components are built by `scripts/build-sensors` (the test command
//! runs it); without them these tests say they are skipped, unless
//! `FOG_REQUIRE_SENSORS=1` (CI) makes them fail.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use fog_testkit::history::{check, host_side, server_side};
use fog_testkit::languages::sensor_component;
use fog_testkit::{
    Pair, Proc, bin, check_counts, check_pair, finish_host, is_caught_up, log_lines_with, scratch_dir, server_counts,
    server_status, start_host, start_server, status_when, wait_for, wait_for_log_line,
};
use serde_json::Value;

/// Linear memory the Python (13 MiB) and JavaScript (10 MiB) sensors need.
const MEMORY: &str = "32";

fn u(v: &Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not a number: {v}"))
}

/// Both components, or `None` when the test is skipped.
fn components(test: &str) -> Option<(PathBuf, PathBuf)> {
    let python = sensor_component(test, "python").unwrap()?;
    let js = sensor_component(test, "js").unwrap()?;
    Some((python, js))
}

/// Replaces `to` with a copy of `from` in one rename, as a deploy would.
fn install(from: &Path, to: &Path) {
    let tmp = to.with_extension("tmp");
    std::fs::copy(from, &tmp).unwrap();
    std::fs::rename(&tmp, to).unwrap();
}

/// A scratch dir and a primary serving alone in it.
fn primary_alone(label: &str) -> (PathBuf, Pair, Proc) {
    let dir = scratch_dir(label).unwrap();
    let pair = Pair::on_free_ports().unwrap();
    let primary = start_server(&pair, true, &["--lateness", "200ms"], &dir).unwrap();
    (dir, pair, primary)
}

fn refs(args: &[String]) -> Vec<&str> {
    args.iter().map(String::as_str).collect()
}

/// A host in a directory of its own (its log is `<dir>/host.log`).
fn host_in(dir: &Path, name: &str, args: &[&str]) -> Proc {
    let own = dir.join(name);
    std::fs::create_dir_all(&own).unwrap();
    start_host(args, &own).unwrap()
}

#[test]
fn python_and_javascript_sensors_are_counted_like_the_built_in_ones() {
    let label = "languages";
    let Some((python, js)) = components(label) else { return };
    let dir = scratch_dir(label).unwrap();
    let pair = Pair::on_free_ports().unwrap();
    let flags = ["--lateness", "200ms"];
    let _primary = start_server(&pair, true, &flags, &dir).unwrap();
    let _backup = start_server(&pair, false, &flags, &dir).unwrap();
    let servers = pair.servers();
    let common = |first: &'static str| -> Vec<String> {
        // A reading every 25 ms, a visit every 100 ms: each visit makes four.
        ["--first-id", first, "--sensors", "5", "--segments", "2", "--interval", "25ms", "--visit-every", "100ms", "--duration", "5s", "--max-memory-mib", MEMORY, "--servers", &servers]
            .iter()
            .map(|s| s.to_string())
            .collect()
    };
    let args = |component: Option<&Path>, first: &'static str| -> Vec<String> {
        component.map(|c| c.display().to_string()).into_iter().chain(common(first)).collect()
    };
    let (builtin_args, python_args, js_args) = (args(None, "1"), args(Some(&python), "101"), args(Some(&js), "201"));
    let hosts = [
        host_in(&dir, "built-in", &refs(&builtin_args)),
        host_in(&dir, "python", &refs(&python_args)),
        host_in(&dir, "js", &refs(&js_args)),
    ];
    let mut summaries = Vec::new();
    for host in hosts {
        // A first start compiles the Python and JavaScript components (tens
        // of seconds); later starts take them from the cache.
        let (code, summary) = finish_host(host, Duration::from_secs(180)).unwrap();
        assert_eq!(code, 0, "{label}: host exit code; summary {summary}");
        assert_eq!(u(&summary["unacked"]), 0, "{label}: {summary}");
        // 50 visits a sensor in 5 s: more than 50 readings each is
        // several a visit.
        assert!(u(&summary["generated"]) >= 5 * 160, "{label}: every sensor made four readings a visit: {summary}");
        eprintln!("[{label}] {}: generated {}, acked {}", summary["component"], summary["generated"], summary["acked"]);
        summaries.push(summary);
    }
    let all: Vec<&Value> = summaries.iter().collect();
    status_when(&pair.backup_frontend, "a caught-up passive", Duration::from_secs(10), is_caught_up).unwrap();
    check_pair(label, &pair.primary_frontend, &pair.backup_frontend, &all).unwrap();

    // Every sensor, whatever its language, is on the server's stream.
    let status = server_status(&pair.primary_frontend).unwrap();
    let verdict = check(&summaries.iter().map(host_side).collect::<Vec<_>>(), &server_side(&status), &[]);
    assert!(verdict.ok(), "{label}: {:?}", verdict.violations);
    assert_eq!(verdict.sensors_checked, 15);
    assert_eq!((verdict.sensors_without_averages, verdict.sensors_off_the_server_stream), (0, 0), "{label}: {verdict:?}");
    // Sensors at the same position hold the same digest, language aside.
    let mut digests: BTreeMap<u64, BTreeMap<String, String>> = BTreeMap::new();
    for (summary, language) in summaries.iter().zip(["rust", "python", "js"]) {
        for s in summary["per_sensor"].as_array().unwrap() {
            let seq = u(&s["last_average_seq"]);
            let digest = s["averages_digest"].as_str().unwrap().to_string();
            let previous = digests.entry(seq).or_default().insert(language.to_string(), digest.clone());
            assert!(previous.is_none_or(|p| p == digest), "{label}: two {language} sensors at average {seq} differ");
        }
    }
    for (seq, by_language) in &digests {
        let distinct: std::collections::BTreeSet<&String> = by_language.values().collect();
        assert_eq!(distinct.len(), 1, "{label}: at average {seq} the languages' digests differ: {by_language:?}");
    }
    eprintln!("[{label}] {} sensors in 3 languages, all on the server's stream; positions held: {:?}", verdict.sensors_checked, digests.keys().collect::<Vec<_>>());
}

#[test]
fn a_hot_swap_moves_sensors_between_python_and_javascript_with_their_state() {
    let label = "language-swap";
    let Some((python, js)) = components(label) else { return };
    let (dir, pair, _primary) = primary_alone(label);
    let sensor = dir.join("sensor.wasm");
    install(&python, &sensor);
    let servers = pair.servers();
    let host = start_host(
        // Runs until interrupted: a first swap to a component not yet in
        // the compile cache takes a while.
        &[sensor.to_str().unwrap(), "--watch", "--sensors", "10", "--interval", "100ms", "--max-memory-mib", MEMORY, "--servers", &servers],
        &dir,
    )
    .unwrap();
    let log = host.log.clone();
    let counting = |n: usize| status_when(&pair.primary_frontend, "counting all 10 sensors", Duration::from_secs(120), |s| server_counts(s).len() == n).unwrap();
    let before = server_counts(&counting(10));
    let moved = |times: usize| {
        wait_for(&format!("hot swap number {times}"), Duration::from_secs(120), || (log_lines_with(&log, &["hot swap: 10 sensors moved"]) >= times).then_some(())).unwrap();
    };
    install(&js, &sensor);
    moved(1);
    install(&python, &sensor);
    moved(2);
    // The built-in sensor's snapshots are binary: it cannot take over.
    install(&bin("fog_sensor.wasm").unwrap(), &sensor);
    wait_for_log_line(&log, &["hot swap refused, still running"], Duration::from_secs(30)).unwrap();
    // The Python sensors go on after the refusal; then the host drains.
    let counted = |s: &Value| server_counts(s).values().map(|c| c.0).sum::<u64>();
    let now = counted(&server_status(&pair.primary_frontend).unwrap());
    status_when(&pair.primary_frontend, "readings after the refusal", Duration::from_secs(30), |s| counted(s) > now + 20).unwrap();
    host.signal("INT").unwrap();

    let (code, summary) = finish_host(host, Duration::from_secs(60)).unwrap();
    assert_eq!(code, 0, "{label}: host exit code; summary {summary}");
    assert_eq!(u(&summary["swaps"]), 2, "{label}: {summary}");
    assert_eq!(log_lines_with(&log, &["hot swap refused", "cannot take over sensor", "restore failed"]), 1, "{label}: the refusal says why");
    check_counts(label, &server_status(&pair.primary_frontend).unwrap(), &[&summary]).unwrap();
    let after = server_counts(&server_status(&pair.primary_frontend).unwrap());
    assert_eq!(after.keys().collect::<Vec<_>>(), before.keys().collect::<Vec<_>>(), "{label}: every sensor kept its incarnation through both swaps");
    eprintln!("[{label}] python -> js -> python with state, built-in refused: generated {}, acked {}", summary["generated"], summary["acked"]);
}

#[test]
fn a_python_exception_reaches_the_log_with_its_traceback() {
    let label = "traceback";
    let Some((python, _)) = components(label) else { return };
    let (dir, pair, _primary) = primary_alone(label);
    let servers = pair.servers();
    let host = start_host(
        &[python.to_str().unwrap(), "--sensors", "1", "--interval", "100ms", "--duration", "2s", "--set", "raise-at=3", "--max-restarts", "0", "--max-memory-mib", MEMORY, "--servers", &servers],
        &dir,
    )
    .unwrap();
    wait_for_log_line(&host.log, &["sensor quarantined"], Duration::from_secs(120)).unwrap();
    assert!(log_lines_with(&host.log, &["sensor_id=1", "sensor stderr: Traceback (most recent call last)"]) >= 1, "{}", host.log_tail(20));
    assert!(log_lines_with(&host.log, &["sensor_id=1", "RuntimeError: raise-at=3: sensor 1 fails on purpose"]) >= 1, "{}", host.log_tail(20));
    assert_eq!(log_lines_with(&host.log, &["an uncaught error in the sensor"]), 1, "{}", host.log_tail(20));
}

#[test]
fn a_component_that_does_not_fit_is_refused_naming_the_flag() {
    let label = "fit";
    let Some((python, _)) = components(label) else { return };
    let (dir, pair, _primary) = primary_alone(label);
    // Too little memory: the host does not start.
    let args: Vec<String> = [python.to_str().unwrap(), "--sensors", "2", "--servers", "tcp://127.0.0.1:9"].iter().map(|s| s.to_string()).collect();
    let mut host = Proc::spawn("small", &bin("fog-host").unwrap(), &args, &dir).unwrap();
    let status = host.wait_for_exit(Duration::from_secs(120)).unwrap();
    assert!(!status.success());
    assert_eq!(log_lines_with(&host.log, &["raise --max-memory-mib to 13 or more"]), 1, "{}", host.log_tail(5));

    // Too few core instances per sensor for the component swapped in.
    let sensor = dir.join("sensor.wasm");
    install(&bin("fog_sensor.wasm").unwrap(), &sensor);
    let servers = pair.servers();
    let host = host_in(&dir, "swap", &[sensor.to_str().unwrap(), "--watch", "--sensors", "3", "--interval", "100ms", "--duration", "4s", "--max-memory-mib", MEMORY, "--servers", &servers]);
    status_when(&pair.primary_frontend, "counting all 3 sensors", Duration::from_secs(30), |s| server_counts(s).len() == 3).unwrap();
    install(&python, &sensor);
    wait_for_log_line(&host.log, &["hot swap refused, still running", "--core-instances-per-sensor"], Duration::from_secs(120)).unwrap();
    let (code, summary) = finish_host(host, Duration::from_secs(60)).unwrap();
    assert_eq!((code, u(&summary["swaps"])), (0, 0), "{label}: {summary}");
}
