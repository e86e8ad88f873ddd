//! The monitoring files of `monitoring/` against the metric contract of
//! `monitoring/README.md`, promtool, and a real Prometheus scraping a real
//! server pair and host.
//!
//! - promtool checks the alert rules and the scrape configurations, and
//!   runs the rules' unit tests (`monitoring/alerts_test.yml`); planted
//!   faults in copies of the rules show those unit tests catch a rule that
//!   no longer fires and one that fires on normal values;
//! - every `fog_…` name the rules, their tests, the scrape configuration and
//!   the Grafana dashboard use is a metric of the README's tables (a
//!   histogram's `_bucket`, `_sum` and `_count` included), so the files
//!   cannot drift from the contract;
//! - a real Prometheus loads the rules (each says what is normal) and, in
//!   the live test, scrapes a real pair and host every second: it sees the
//!   readings counted and acked grow, and after `kill -9` of the primary a
//!   failover counted by the backup, the backup active and the primary
//!   down; every dashboard query evaluates there.
//!
//! Without `prometheus` and `promtool` the tests that need them say
//! SKIPPED, unless `FOG_REQUIRE_PROMETHEUS=1` (set by `.ci/run`).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use fog_testkit::prometheus::{self, Prometheus, Target, promtool, scrape_config};
use fog_testkit::scratch_dir;
use serde_json::Value;

/// The repository's root.
fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("e2e/ is in the repository").to_path_buf()
}

fn monitoring_file(name: &str) -> PathBuf {
    repo().join("monitoring").join(name)
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

/// `true` when the test may go on; `false` (after saying SKIPPED) when
/// Prometheus is missing and not required; a panic when it is required.
fn prometheus_here(test: &str) -> bool {
    match prometheus::unavailable() {
        None => true,
        Some(why) => {
            prometheus::skip_or_fail(test, &why).unwrap();
            false
        }
    }
}

// ---------------------------------------------------------------------
// The contract: the metric tables of monitoring/README.md.

/// The metrics the README's tables document, by full name, with their type
/// (`gauge`, `counter`, `histogram`). A row names one or more metrics in
/// its first cell (`` `a`, `b` ``); a name may carry its labels (`{role}`)
/// and may abbreviate the first name's stem with `…` (`` `…_acked_total` ``
/// after `` `fog_host_readings_generated_total` ``: the `…` stands for the
/// first name less as many `_` parts as follow the `…`). The type cell
/// gives one type for all, or one per name.
fn documented_metrics(readme: &str) -> BTreeMap<String, String> {
    let mut metrics = BTreeMap::new();
    for line in readme.lines() {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        // "| `fog_…` | type | meaning |" splits into ["", names, type, meaning, ""].
        if cells.len() < 4 || !cells[1].starts_with("`fog_") {
            continue;
        }
        let names: Vec<&str> = cells[1].split(',').map(|n| n.trim().trim_matches('`')).collect();
        let types: Vec<&str> = cells[2].split(',').map(str::trim).collect();
        let first = names[0].split('{').next().unwrap_or_default().to_string();
        for (i, name) in names.iter().enumerate() {
            let bare = name.split('{').next().unwrap_or_default();
            let full = match bare.strip_prefix('…') {
                Some(tail) => {
                    let dropped = tail.matches('_').count();
                    let parts: Vec<&str> = first.split('_').collect();
                    format!("{}{tail}", parts[..parts.len().saturating_sub(dropped)].join("_"))
                }
                None => bare.to_string(),
            };
            let kind = if types.len() == names.len() { types[i] } else { types[0] };
            metrics.insert(full, kind.to_string());
        }
    }
    metrics
}

fn contract() -> BTreeMap<String, String> {
    documented_metrics(&read(&monitoring_file("README.md")))
}

/// Every `fog_…` token of `text` (a run of lowercase letters, digits and
/// `_` starting `fog_`), deduplicated.
fn fog_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while let Some(at) = text[i..].find("fog_") {
        let start = i + at;
        let preceded = start > 0 && (bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_');
        let mut end = start;
        while end < bytes.len() && (bytes[end].is_ascii_lowercase() || bytes[end].is_ascii_digit() || bytes[end] == b'_') {
            end += 1;
        }
        if !preceded {
            names.insert(text[start..end].to_string());
        }
        i = end.max(start + 1);
    }
    names
}

/// The names of `names` that the contract does not document: neither a
/// documented metric nor a documented histogram's `_bucket`, `_sum` or
/// `_count` series.
fn undocumented(names: &BTreeSet<String>, contract: &BTreeMap<String, String>) -> Vec<String> {
    names
        .iter()
        .filter(|name| {
            if contract.contains_key(name.as_str()) {
                return false;
            }
            !["_bucket", "_sum", "_count"].iter().any(|suffix| {
                name.strip_suffix(suffix).is_some_and(|base| contract.get(base).is_some_and(|kind| kind == "histogram"))
            })
        })
        .cloned()
        .collect()
}

#[test]
fn the_contract_is_read_from_the_readme() {
    let contract = contract();
    // Spot checks of each form a row takes.
    for (name, kind) in [
        ("fog_server_info", "gauge"),
        ("fog_server_lsn", "gauge"),
        ("fog_server_durable_lsn", "gauge"),
        ("fog_server_snapshots_total", "counter"),
        ("fog_server_snapshot_seconds", "histogram"),
        ("fog_server_wal_fsync_seconds", "histogram"),
        ("fog_host_readings_generated_total", "counter"),
        ("fog_host_readings_acked_total", "counter"),
        ("fog_host_readings_overflowed_total", "counter"),
        ("fog_host_segment_limit_kmh", "gauge"),
    ] {
        assert_eq!(contract.get(name).map(String::as_str), Some(kind), "{name} in {contract:?}");
    }
    assert!(contract.keys().all(|n| n.starts_with("fog_server_") || n.starts_with("fog_host_")), "{contract:?}");
    assert!(contract.values().all(|k| ["gauge", "counter", "histogram"].contains(&k.as_str())), "{contract:?}");
    assert!(contract.len() >= 60, "only {} metrics read from the README: {contract:?}", contract.len());
}

#[test]
fn the_monitoring_files_use_only_documented_metrics() {
    let contract = contract();
    for file in ["alerts.yml", "alerts_test.yml", "prometheus.yml", "grafana-dashboard.json"] {
        let names = fog_names(&read(&monitoring_file(file)));
        let wrong = undocumented(&names, &contract);
        assert!(wrong.is_empty(), "monitoring/{file} uses metrics monitoring/README.md does not document: {wrong:?}");
        eprintln!("[names] monitoring/{file}: {} fog_ names, all documented", names.len());
    }
    // The check finds a name that is not there, and a histogram series of
    // a metric that is not a histogram.
    let planted = fog_names("rate(fog_server_readings_counted_total[1m]) + fog_server_readings_countd_total + fog_server_epoch_bucket + fog_server_ack_seconds_bucket");
    assert_eq!(undocumented(&planted, &contract), ["fog_server_epoch_bucket", "fog_server_readings_countd_total"]);
}

#[test]
fn the_dashboard_is_grafana_json_over_the_documented_metrics() {
    let text = read(&monitoring_file("grafana-dashboard.json"));
    let dashboard: Value = serde_json::from_str(&text).expect("grafana-dashboard.json is JSON");
    assert!(dashboard["title"].is_string() && dashboard["uid"].is_string(), "a dashboard has a title and a uid");
    let panels = dashboard["panels"].as_array().expect("a list of panels");
    let exprs = dashboard_queries(&dashboard);
    let mut ids = BTreeSet::new();
    for panel in panels {
        assert!(ids.insert(panel["id"].as_u64().expect("a panel id")), "panel ids are unique: {}", panel["id"]);
        let grid = &panel["gridPos"];
        assert!(["h", "w", "x", "y"].iter().all(|k| grid[k].is_u64()), "panel {} has a grid position", panel["title"]);
        assert!(grid["x"].as_u64().unwrap_or(0) + grid["w"].as_u64().unwrap_or(99) <= 24, "panel {} fits 24 columns", panel["title"]);
        if panel["type"] != "row" {
            let targets = panel["targets"].as_array().map(Vec::len).unwrap_or(0);
            assert!(targets > 0, "panel {} queries nothing", panel["title"]);
            assert_eq!(panel["datasource"]["type"], "prometheus", "panel {} reads Prometheus", panel["title"]);
        }
    }
    // What the issue asks the dashboard to show, by the metric that shows it.
    for (what, metric) in [
        ("pair state", "fog_server_active"),
        ("epoch", "fog_server_epoch"),
        ("lag", "fog_server_replication_lag_entries"),
        ("lag in seconds", "fog_server_replication_lag_seconds"),
        ("readings counted per second", "fog_server_readings_counted_total"),
        ("ack latency", "fog_server_ack_seconds_bucket"),
        ("segment average speed", "fog_server_segment_average_kmh"),
        ("segment limit", "fog_host_segment_limit_kmh"),
        ("failovers", "fog_server_failovers_total"),
        ("hosts' sensors by state", "fog_host_sensors"),
        ("disk free", "fog_server_disk_free_bytes"),
        ("WAL fsync", "fog_server_wal_fsync_seconds_bucket"),
    ] {
        assert!(exprs.iter().any(|e| fog_names(e).contains(metric)), "no dashboard query shows the {what} ({metric})");
    }
    let quantiles: Vec<&String> = exprs.iter().filter(|e| e.contains("fog_server_ack_seconds_bucket")).collect();
    assert!(
        ["histogram_quantile(0.5,", "histogram_quantile(0.99,"].iter().all(|q| quantiles.iter().any(|e| e.contains(q))),
        "ack latency p50 and p99 from the histogram: {quantiles:?}"
    );
}

/// Every PromQL expression of the dashboard: its panels' targets and its
/// annotation queries.
fn dashboard_queries(dashboard: &Value) -> Vec<String> {
    let mut exprs = Vec::new();
    for panel in dashboard["panels"].as_array().into_iter().flatten() {
        for target in panel["targets"].as_array().into_iter().flatten() {
            exprs.push(target["expr"].as_str().unwrap_or_default().to_string());
        }
    }
    for annotation in dashboard["annotations"]["list"].as_array().into_iter().flatten() {
        if let Some(expr) = annotation["expr"].as_str() {
            exprs.push(expr.to_string());
        }
    }
    exprs
}

/// A dashboard expression with Grafana's variables replaced as Grafana
/// would: all pairs, and rate windows for a scrape every second.
fn as_promql(expr: &str) -> String {
    expr.replace("$__rate_interval", "30s").replace("$__interval", "5s").replace("$pair", ".*")
}

// ---------------------------------------------------------------------
// promtool

fn promtool_ok(args: &[&str], dir: &Path) -> String {
    let out = promtool(args, dir).unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "promtool {} failed ({}):\n{text}", args.join(" "), out.status);
    text
}

fn promtool_fails(args: &[&str], dir: &Path) -> String {
    let out = promtool(args, dir).unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(!out.status.success(), "promtool {} passed where it must fail:\n{text}", args.join(" "));
    text
}

/// The alert names of a rule file, in order (`- alert: Name` lines).
fn alert_names(rules: &str) -> Vec<String> {
    rules
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- alert:"))
        .map(|n| n.trim().to_string())
        .collect()
}

#[test]
fn alert_rules_and_scrape_configs_pass_promtool() {
    let test = "promtool-check";
    if !prometheus_here(test) {
        return;
    }
    let monitoring = repo().join("monitoring");
    let out = promtool_ok(&["check", "rules", "alerts.yml"], &monitoring);
    let alerts = alert_names(&read(&monitoring.join("alerts.yml")));
    assert!(out.contains(&format!("SUCCESS: {} rules found", alerts.len())), "promtool found other rules than the {} alerts: {out}", alerts.len());
    // The repository's configuration, and one like the live test's, for
    // real ports and with the rules by absolute path.
    promtool_ok(&["check", "config", "prometheus.yml"], &monitoring);
    let dir = scratch_dir(test).unwrap();
    let generated = scrape_config(
        std::time::Duration::from_secs(1),
        &[monitoring.join("alerts.yml")],
        &[
            Target::new("fog-server", "127.0.0.1:10001", &[("pair", "test"), ("node", "primary")]),
            Target::new("fog-server", "127.0.0.1:10002", &[("pair", "test"), ("node", "backup")]),
            Target::new("fog-host", "127.0.0.1:10003", &[("pair", "test")]),
        ],
    );
    std::fs::write(dir.join("generated.yml"), &generated).unwrap();
    promtool_ok(&["check", "config", "generated.yml"], &dir);
    // The commented job for endpoints beyond loopback is a valid job once
    // uncommented, with its token file.
    let repo_config = read(&monitoring.join("prometheus.yml"));
    let remote: String = repo_config
        .lines()
        .skip_while(|l| !l.contains("# - job_name: fog-server-remote"))
        .take_while(|l| l.trim_start().starts_with("# "))
        .map(|l| format!("{}\n", l.replacen("# ", "", 1)))
        .collect();
    assert!(remote.contains("credentials_file:"), "prometheus.yml shows a bearer token file for remote endpoints:\n{remote}");
    let token = dir.join("fog-metrics.token");
    std::fs::write(&token, "not-a-real-token\n").unwrap();
    let with_remote = format!(
        "{}\n{}",
        repo_config.replace("  - alerts.yml", &format!("  - {}", monitoring.join("alerts.yml").display())),
        remote.replace("/etc/prometheus/fog-metrics.token", &token.display().to_string())
    );
    std::fs::write(dir.join("remote.yml"), &with_remote).unwrap();
    let out = promtool_ok(&["check", "config", "remote.yml"], &dir);
    eprintln!("[{test}] the remote job checks:\n{remote}{out}");
    // A broken rule is found: the checks read promtool's verdict.
    let broken = read(&monitoring.join("alerts.yml")).replacen("fog_server_active) > 1", "fog_server_active) >", 1);
    std::fs::write(dir.join("broken.yml"), broken).unwrap();
    promtool_fails(&["check", "rules", "broken.yml"], &dir);
}

#[test]
fn alert_unit_tests_fire_on_faults_and_stay_silent_on_normal_values() {
    let test = "promtool-test";
    if !prometheus_here(test) {
        return;
    }
    let monitoring = repo().join("monitoring");
    let out = promtool_ok(&["test", "rules", "alerts_test.yml"], &monitoring);
    eprintln!("[{test}] {}", out.trim());
    // Every alert is tested, firing and silent.
    let tests = read(&monitoring.join("alerts_test.yml"));
    for alert in alert_names(&read(&monitoring.join("alerts.yml"))) {
        let cases: Vec<&str> = tests.split("- eval_time:").filter(|c| c.contains(&format!("alertname: {alert}\n"))).collect();
        assert!(cases.iter().any(|c| c.contains("exp_alerts: []")), "alerts_test.yml never checks {alert} stays silent");
        assert!(cases.iter().any(|c| c.contains("exp_labels:")), "alerts_test.yml never checks {alert} fires");
    }
    // Planted faults in a copy of the rules: one alert that can no longer
    // fire, one that fires on normal values. The unit tests catch both.
    let rules = read(&monitoring.join("alerts.yml"));
    for (fault, from, to, alert) in [
        ("never fires", "sum by (pair) (fog_server_active) > 1", "sum by (pair) (fog_server_active) > 2", "FogBothActive"),
        ("fires when in sync", "fog_server_active == 1 and fog_server_passive_in_sync == 0", "fog_server_active == 1 and fog_server_passive_in_sync == 1", "FogPassiveOutOfSync"),
        ("a lower threshold", "< 0.10", "< 0.60", "FogDiskNearlyFull"),
    ] {
        assert!(rules.contains(from), "alerts.yml has no {from:?} to plant a fault in");
        let dir = scratch_dir(test).unwrap();
        std::fs::write(dir.join("alerts.yml"), rules.replacen(from, to, 1)).unwrap();
        std::fs::write(dir.join("alerts_test.yml"), &tests).unwrap();
        let out = promtool_fails(&["test", "rules", "alerts_test.yml"], &dir);
        assert!(out.contains(&format!("alertname: {alert},")), "the failure names {alert} ({fault}):\n{out}");
        eprintln!("[{test}] planted fault ({alert} {fault}) caught");
    }
}

#[test]
fn every_alert_says_what_is_normal() {
    let test = "alert-annotations";
    if !prometheus_here(test) {
        return;
    }
    let dir = scratch_dir(test).unwrap();
    let prom = Prometheus::start(&dir, &scrape_config(std::time::Duration::from_secs(1), &[monitoring_file("alerts.yml")], &[])).unwrap();
    let data = prom.api("rules", &[]).unwrap();
    let rules: Vec<&Value> = data["groups"].as_array().into_iter().flatten().flat_map(|g| g["rules"].as_array().into_iter().flatten()).collect();
    let names: BTreeSet<&str> = rules.iter().map(|r| r["name"].as_str().unwrap_or_default()).collect();
    let in_file = alert_names(&read(&monitoring_file("alerts.yml")));
    assert_eq!(rules.len(), in_file.len(), "Prometheus loaded every alert of alerts.yml once: {names:?}");
    assert_eq!(names, in_file.iter().map(String::as_str).collect(), "Prometheus loaded the alerts of alerts.yml");
    for rule in &rules {
        let name = &rule["name"];
        assert_eq!(rule["type"], "alerting", "{name}");
        assert_ne!(rule["health"], "err", "{name}: {}", rule["lastError"]);
        for annotation in ["summary", "normal"] {
            let text = rule["annotations"][annotation].as_str().unwrap_or_default();
            assert!(text.len() > 5, "{name} has no {annotation} annotation: {rule}");
        }
        assert!(["critical", "warning"].contains(&rule["labels"]["severity"].as_str().unwrap_or_default()), "{name}: severity");
    }
    // What the issue asks to be alerted on.
    for required in [
        "FogPassiveOutOfSync",
        "FogReplicationLagEntries",
        "FogReplicationLagSeconds",
        "FogUncleanTakeover",
        "FogDiskNearlyFull",
        "FogWalFsyncSlow",
        "FogSensorsQuarantined",
        "FogSensorsBehindRetention",
        "FogNoActiveServer",
        "FogBothActive",
        "FogServerDown",
        "FogHostDown",
        "FogHostNotConnected",
        "FogReadingsRefused",
    ] {
        assert!(names.contains(&required), "no alert {required}: {names:?}");
    }
    eprintln!("[{test}] {} alerts loaded by Prometheus, each with its normal value", rules.len());
}
