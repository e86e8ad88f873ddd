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
//!   down; the rules alert on none of it while the pair is healthy and on
//!   the dead primary after; every dashboard query evaluates there, with
//!   data;
//! - the `/metrics` pages of a real pair and host serve exactly the
//!   documented metrics, with their documented types.
//!
//! Without `prometheus` and `promtool` the tests that need them say
//! SKIPPED, unless `FOG_REQUIRE_PROMETHEUS=1` (set by `.ci/run`); the
//! others always run.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use fog_testkit::prometheus::{self, Prometheus, Target, promtool, scrape_config};
use fog_testkit::{Pair, is_caught_up, scratch_dir, start_host, start_server, status_when, wait_for};
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
    assert_eq!(contract.get("fog_http_connections_refused_total").map(String::as_str), Some("counter"));
    assert!(["fog_server_", "fog_host_", "fog_http_"].iter().all(|p| contract.keys().any(|n| n.starts_with(p))), "{contract:?}");
    assert!(contract.keys().all(|n| n.starts_with("fog_server_") || n.starts_with("fog_host_") || n.starts_with("fog_http_")), "{contract:?}");
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
        Duration::from_secs(1),
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
    let prom = Prometheus::start(&dir, &scrape_config(Duration::from_secs(1), &[monitoring_file("alerts.yml")], &[])).unwrap();
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

// ---------------------------------------------------------------------
// Real processes: a pair, a host, and a Prometheus scraping them.

/// The tests that start a pair run one at a time, so that two pairs do not
/// compete for the CPU and miss heartbeats.
fn serial() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A loopback address for one process's metrics endpoint.
fn metrics_address() -> String {
    format!("127.0.0.1:{}", fog_testkit::free_port().unwrap())
}

/// Server flags of these tests: short lateness so averages flow at once,
/// a snapshot every 200 entries so the snapshot figures move too.
fn server_flags(metrics: &str) -> Vec<&str> {
    vec!["--lateness", "200ms", "--snapshot-every", "200", "--metrics-bind", metrics]
}

/// The arguments of a host of 10 sensors on two segments, for longer than
/// any test runs (it is killed when the test ends).
fn host_args<'a>(servers: &'a str, metrics: &'a str) -> Vec<&'a str> {
    vec![
        "--sensors", "10", "--segments", "2", "--interval", "100ms", "--timeout", "500ms", "--duration", "600s", "--servers", servers,
        "--metrics-bind", metrics,
    ]
}

/// The page `/metrics` of `address`, parsed.
fn scrape(address: &str) -> anyhow::Result<prometheus::Exposition> {
    let reply = prometheus::http_get(address, "/metrics", None)?;
    anyhow::ensure!(reply.status == 200, "GET {address}/metrics: HTTP {}: {}", reply.status, reply.body);
    prometheus::parse_exposition(&reply.body)
}

/// The value of `expr` in `prom` once it is one sample satisfying `pred`,
/// at most `timeout`; the panic names `what` and the last answer.
fn value_when(prom: &Prometheus, expr: &str, what: &str, timeout: Duration, pred: impl Fn(f64) -> bool) -> f64 {
    let mut last = String::from("no answer yet");
    let found = wait_for(what, timeout, || match prom.query(expr) {
        Ok(samples) => match samples.as_slice() {
            [one] if pred(one.value) => Some(one.value),
            other => {
                last = format!("{other:?}");
                None
            }
        },
        Err(e) => {
            last = format!("{e:#}");
            None
        }
    });
    found.unwrap_or_else(|e| panic!("{e:#}: Prometheus never said so; `{expr}` was last {last}"))
}

/// The alerts Prometheus has pending or firing, as `name{node} state`.
fn alerts_now(prom: &Prometheus) -> Vec<String> {
    prom.query("ALERTS")
        .unwrap()
        .iter()
        .map(|s| format!("{}{{{}}} {}", s.label("alertname"), s.label("node"), s.label("alertstate")))
        .collect()
}

#[test]
fn prometheus_scrapes_a_pair_and_a_host_through_a_failover() {
    let test = "prometheus-live";
    if !prometheus_here(test) {
        return;
    }
    let _serial = serial();
    let dir = scratch_dir(test).unwrap();
    let pair = Pair::on_free_ports().unwrap();
    let (primary_metrics, backup_metrics, host_metrics) = (metrics_address(), metrics_address(), metrics_address());
    let mut primary = start_server(&pair, true, &server_flags(&primary_metrics), &dir).unwrap();
    let backup = start_server(&pair, false, &server_flags(&backup_metrics), &dir).unwrap();
    let servers = pair.servers();
    let host = start_host(&host_args(&servers, &host_metrics), &dir).unwrap();

    // The repository's rules, the test's targets, a scrape every second.
    let config = scrape_config(
        Duration::from_secs(1),
        &[monitoring_file("alerts.yml")],
        &[
            Target::new("fog-server", &primary_metrics, &[("pair", "test"), ("node", "primary")]),
            Target::new("fog-server", &backup_metrics, &[("pair", "test"), ("node", "backup")]),
            Target::new("fog-host", &host_metrics, &[("pair", "test"), ("node", "host")]),
        ],
    );
    let prom = Prometheus::start(&dir, &config).unwrap();
    eprintln!("[{test}] Prometheus at {} scrapes the primary at {primary_metrics}, the backup at {backup_metrics}, the host at {host_metrics}", prom.address);
    let long = Duration::from_secs(30);
    for node in ["primary", "backup", "host"] {
        value_when(&prom, &format!("up{{node=\"{node}\"}}"), &format!("the {node} scraped"), long, |v| v == 1.0);
    }

    // Readings flow: the active counts them, the host has them acked.
    value_when(&prom, r#"fog_server_active{node="primary"}"#, "the primary active", long, |v| v == 1.0);
    let counted = r#"fog_server_readings_counted_total{node="primary"}"#;
    let first = value_when(&prom, counted, "readings counted by the primary", long, |v| v > 0.0);
    let later = value_when(&prom, counted, "the primary's count growing", long, |v| v > first);
    let acked = r#"fog_host_readings_acked_total{node="host"}"#;
    let first_acked = value_when(&prom, acked, "readings acked to the host", long, |v| v > 0.0);
    let later_acked = value_when(&prom, acked, "the host's acked readings growing", long, |v| v > first_acked);
    eprintln!("[{test}] counted by the primary: {first} then {later}; acked to the host: {first_acked} then {later_acked}");

    // A healthy pair: the passive in sync, and no alert pending or firing
    // (but those about this machine's disk, which is not the pair's doing).
    status_when(&pair.backup_frontend, "a caught-up passive", long, is_caught_up).unwrap();
    value_when(&prom, r#"fog_server_passive_in_sync{node="primary"}"#, "the passive in sync", long, |v| v == 1.0);
    let mut pending = Vec::new();
    wait_for("no alert on a healthy pair", long, || {
        pending = alerts_now(&prom);
        pending.retain(|a| !a.starts_with("FogWalFsyncSlow") && !a.starts_with("FogDiskNearlyFull"));
        pending.is_empty().then_some(())
    })
    .unwrap_or_else(|e| panic!("{e:#}: the rules alert on a healthy pair: {pending:?}"));
    let epoch = value_when(&prom, r#"fog_server_epoch{node="backup"}"#, "the backup's epoch", long, |v| v >= 1.0);

    // kill -9 of the active primary: the host fails over to the backup.
    primary.kill().unwrap();
    let killed = Instant::now();
    eprintln!("[{test}] killed the primary (kill -9) in epoch {epoch}");
    value_when(&prom, r#"up{node="primary"}"#, "the primary down", long, |v| v == 0.0);
    let failovers = value_when(&prom, r#"fog_server_failovers_total{node="backup"}"#, "a failover counted by the backup", long, |v| v >= 1.0);
    value_when(&prom, r#"fog_server_active{node="backup"}"#, "the backup active", long, |v| v == 1.0);
    let new_epoch = value_when(&prom, r#"fog_server_epoch{node="backup"}"#, "a new epoch", long, |v| v > epoch);
    // The backup was caught up: its takeover was clean.
    assert_eq!(prom.query_one(r#"fog_server_unclean_takeovers_total{node="backup"}"#).unwrap(), Some(0.0), "an unclean takeover");
    // Readings flow again, through the backup.
    let at_takeover = prom.query_one(acked).unwrap().unwrap_or(0.0);
    value_when(&prom, acked, "the host's acked readings growing after the failover", long, |v| v > at_takeover);
    let backup_counted = r#"fog_server_readings_counted_total{node="backup"}"#;
    let now_counted = value_when(&prom, backup_counted, "readings counted by the backup", long, |v| v > 0.0);
    value_when(&prom, backup_counted, "the backup's count growing", long, |v| v > now_counted);
    eprintln!(
        "[{test}] Prometheus saw the failover {} ms after the kill: backup active in epoch {new_epoch}, {failovers} failover(s), readings acked again",
        killed.elapsed().as_millis()
    );

    // The rules see it: the primary down, the backup alone.
    for (alert, node) in [("FogServerDown", "primary"), ("FogPassiveOutOfSync", "backup")] {
        let expr = format!("ALERTS{{alertname=\"{alert}\", node=\"{node}\"}}");
        wait_for(&format!("{alert} for the {node}"), long, || prom.query(&expr).ok().filter(|s| !s.is_empty()))
            .unwrap_or_else(|e| panic!("{e:#}; alerts now: {:?}", alerts_now(&prom)));
    }
    eprintln!("[{test}] alerts after the kill: {:?}", alerts_now(&prom));

    // Every dashboard query is valid PromQL that Prometheus evaluates, and
    // every panel has data; the takeover marks only around a takeover.
    let dashboard: Value = serde_json::from_str(&read(&monitoring_file("grafana-dashboard.json"))).unwrap();
    // The uplink's series exist only with --uplink, which this pair has not.
    let on_events_only = ["changes(fog_server_epoch", "fog_server_uplink_"];
    let mut empty = Vec::new();
    for expr in dashboard_queries(&dashboard) {
        let samples = prom.query(&as_promql(&expr)).unwrap_or_else(|e| panic!("the dashboard's query fails: {e:#}"));
        if samples.is_empty() && !on_events_only.iter().any(|m| expr.contains(m)) {
            empty.push(expr);
        }
    }
    assert!(empty.is_empty(), "dashboard queries without data on a running pair and host: {empty:#?}");
    drop((host, backup, prom));
}

#[test]
fn served_metrics_are_the_documented_ones() {
    let test = "served-metrics";
    let _serial = serial();
    let dir = scratch_dir(test).unwrap();
    let pair = Pair::on_free_ports().unwrap();
    let (primary_metrics, backup_metrics, host_metrics) = (metrics_address(), metrics_address(), metrics_address());
    let _primary = start_server(&pair, true, &server_flags(&primary_metrics), &dir).unwrap();
    let _backup = start_server(&pair, false, &server_flags(&backup_metrics), &dir).unwrap();
    let servers = pair.servers();
    let _host = start_host(&host_args(&servers, &host_metrics), &dir).unwrap();
    let contract = contract();

    // Once readings flow, averages are published and a snapshot is written,
    // every documented metric of a server (`fog_server_…`) or host
    // (`fog_host_…`) is served, with its type, and nothing undocumented is
    // (`fog_http_…`, served by both, appears at its first event; the
    // uplink's `fog_server_uplink_…` only with `--uplink`).
    let long = Duration::from_secs(30);
    for (process, address, prefix, moving) in [
        ("primary", &primary_metrics, "fog_server_", "fog_server_snapshots_total"),
        ("backup", &backup_metrics, "fog_server_", "fog_server_snapshots_total"),
        ("host", &host_metrics, "fog_host_", "fog_host_averages_received_total"),
    ] {
        let page = wait_for(&format!("the {process}'s {moving} above 0"), long, || {
            scrape(address).ok().filter(|p| p.find(moving, &[]).any(|s| s.value > 0.0))
        })
        .unwrap_or_else(|e| panic!("{e:#}; its page now: {:?}", scrape(address).map(|p| p.types)));
        let mut wrong = Vec::new();
        for (name, kind) in &page.types {
            match contract.get(name) {
                None => wrong.push(format!("{name} ({kind}) is served but not documented")),
                Some(documented) if documented != kind => wrong.push(format!("{name} is a {kind}, documented as a {documented}")),
                Some(_) => {}
            }
        }
        for name in contract.keys().filter(|n| n.starts_with(prefix)) {
            // The uplink's figures exist only with --uplink: without it, a
            // `connected 0` would say a link is down that nobody asked for.
            let uplink = name.starts_with("fog_server_uplink_");
            match (page.types.contains_key(name), uplink) {
                (false, false) => wrong.push(format!("{name} is documented but not served")),
                (true, true) => wrong.push(format!("{name} is served by a server run without --uplink")),
                _ => {}
            }
        }
        for sample in &page.samples {
            if sample.labels.keys().any(|l| l.contains("sensor")) {
                wrong.push(format!("{} has a sensor label: {:?}", sample.name, sample.labels));
            }
        }
        assert!(wrong.is_empty(), "the {process}'s /metrics and monitoring/README.md disagree:\n{}", wrong.join("\n"));
        eprintln!("[{test}] {process}: {} metrics served, {} samples, all documented", page.types.len(), page.samples.len());
    }
}
