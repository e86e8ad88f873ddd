//! The metrics and health endpoints of real servers and a real host: the
//! figures move as readings flow, readiness follows the pair's states, a
//! kill -9 of the primary shows as a failover on the backup, and the
//! endpoints refuse what they must (no token, bad flags, hostile requests).

use std::io::Write;
use std::net::TcpStream;
use std::time::Duration;

use fog_testkit::http::{get, sample};
use fog_testkit::{PairKeys, Pair, bin, finish_host, free_port, scratch_dir, start_host, start_keyed_server, wait_for};

/// `IP:PORT` on loopback, free.
fn endpoint() -> String {
    format!("127.0.0.1:{}", free_port().unwrap())
}

/// One sample of `series` from `addr`'s /metrics, if it answers and has it.
fn metric(addr: &str, series: &str) -> Option<f64> {
    let r = get(addr, "/metrics", None).ok()?;
    (r.status == 200).then(|| sample(&r.body, series)).flatten()
}

/// Waits until `series` at `addr` satisfies `ok`; returns its value.
fn metric_when(addr: &str, series: &str, what: &str, ok: impl Fn(f64) -> bool) -> f64 {
    wait_for(&format!("{series} at {addr} {what}"), Duration::from_secs(20), || metric(addr, series).filter(|v| ok(*v))).unwrap()
}

fn status_of(addr: &str, path: &str) -> u16 {
    get(addr, path, None).map_or(0, |r| r.status)
}

#[test]
fn figures_move_and_a_failover_shows() {
    let dir = scratch_dir("observe").unwrap();
    let pair = Pair::on_free_ports().unwrap();
    let keys = PairKeys::generate(&dir, &[("host", "sensors=1-10")]).unwrap();
    let (pm, bm, hm) = (endpoint(), endpoint(), endpoint());
    let mut primary = start_keyed_server(&pair, true, &["--metrics-bind", &pm, "--lateness", "200ms"], &dir, &keys).unwrap();
    let _backup = start_keyed_server(&pair, false, &["--metrics-bind", &bm, "--lateness", "200ms"], &dir, &keys).unwrap();
    let mut args: Vec<String> = ["--sensors", "10", "--first-id", "1", "--segments", "2", "--interval", "100ms", "--duration", "20s", "--timeout", "500ms", "--metrics-bind", &hm, "--servers", &pair.servers()]
        .iter()
        .map(|s| s.to_string())
        .collect();
    args.extend(keys.host_args("host").unwrap());
    let host = start_host(&args.iter().map(String::as_str).collect::<Vec<_>>(), &dir).unwrap();

    // Readings flow: counted on both nodes, acked at the host; the pair's
    // states and readiness are what they should be.
    let counted = metric_when(&pm, "fog_server_readings_counted_total", "above 100", |v| v > 100.0);
    metric_when(&pm, "fog_server_readings_counted_total", "growing", |v| v > counted);
    metric_when(&hm, "fog_host_readings_acked_total", "above 100", |v| v > 100.0);
    metric_when(&pm, "fog_server_active", "= 1", |v| v == 1.0);
    metric_when(&bm, "fog_server_active", "= 0", |v| v == 0.0);
    metric_when(&pm, "fog_server_passive_in_sync", "= 1", |v| v == 1.0);
    metric_when(&bm, "fog_server_readings_counted_total", "replicated", |v| v > 100.0);
    metric_when(&pm, "fog_server_ack_seconds_count", "timing acks", |v| v > 10.0);
    metric_when(&pm, "fog_server_ack_stage_seconds_count{stage=\"replication\"}", "timing replication", |v| v > 10.0);
    metric_when(&pm, "fog_server_wal_fsync_seconds_count", "timing syncs", |v| v > 0.0);
    metric_when(&pm, "fog_server_segment_average_kmh{segment=\"1\"}", "an average speed", |v| v > 0.0 && v < 300.0);
    metric_when(&hm, "fog_host_segment_limit_kmh{segment=\"0\"}", "a limit", |v| [60.0, 80.0, 100.0, 120.0, 130.0].contains(&v));
    metric_when(&hm, "fog_host_sensors{state=\"running\"}", "= 10", |v| v == 10.0);
    metric_when(&hm, "fog_host_batch_seconds_count", "timing batches", |v| v > 10.0);
    assert_eq!(metric(&pm, "fog_server_info{role=\"primary\"}"), Some(1.0));
    assert_eq!(metric(&pm, "fog_server_unclean_takeovers_total"), Some(0.0));
    assert!(metric(&pm, "fog_server_disk_free_bytes").is_some_and(|v| v > 0.0));
    for addr in [&pm, &bm, &hm] {
        assert_eq!(status_of(addr, "/healthz"), 200, "{addr}/healthz");
    }
    // The passive is ready once caught up: it could take over now.
    wait_for("all three ready", Duration::from_secs(20), || [&pm, &bm, &hm].iter().all(|a| status_of(a, "/readyz") == 200).then_some(())).unwrap();

    // kill -9 of the primary: the backup takes over and counts it; the host
    // is ready again once the backup acks.
    primary.kill().unwrap();
    metric_when(&bm, "fog_server_failovers_total", ">= 1", |v| v >= 1.0);
    metric_when(&bm, "fog_server_active", "= 1", |v| v == 1.0);
    metric_when(&bm, "fog_server_takeover_seconds", "timed", |v| v > 0.0 && v < 60.0);
    assert_eq!(metric(&bm, "fog_server_unclean_takeovers_total"), Some(0.0));
    metric_when(&hm, "fog_host_failovers_total", ">= 1", |v| v >= 1.0);
    assert_eq!(status_of(&pm, "/healthz"), 0, "the dead primary still answers");
    wait_for("the host ready on the backup", Duration::from_secs(20), || (status_of(&hm, "/readyz") == 200).then_some(())).unwrap();
    let (code, summary) = finish_host(host, Duration::from_secs(60)).unwrap();
    assert_eq!(code, 0, "{summary}");
}

#[test]
fn beyond_loopback_the_endpoint_needs_a_token() {
    let dir = scratch_dir("observe-token").unwrap();
    let pair = Pair::on_free_ports().unwrap();
    // No token file: refused at start, naming the flag.
    let out = std::process::Command::new(bin("fog-server").unwrap())
        .args(pair.server_args(true))
        .args(["--data-dir", &dir.join("p").display().to_string(), "--metrics-bind", "0.0.0.0:0"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("--metrics-token-file"), "{err}");
    // A bad address and a short token: one clear line each.
    let out = std::process::Command::new(bin("fog-host").unwrap()).args(["--metrics-bind", "somewhere"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not an address"));
    let short = dir.join("short.token");
    std::fs::write(&short, "abc\n").unwrap();
    let out = std::process::Command::new(bin("fog-host").unwrap())
        .args(["--metrics-bind", "0.0.0.0:0", "--metrics-token-file", &short.display().to_string()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("at least 16"), "{}", String::from_utf8_lossy(&out.stderr));

    // With a token: only requests that carry it are served.
    let token = dir.join("metrics.token");
    std::fs::write(&token, "s3cret-token-for-scrapers\n").unwrap();
    let port = free_port().unwrap();
    let keys = PairKeys::generate(&dir, &[]).unwrap();
    let bind = format!("0.0.0.0:{port}");
    let _primary = start_keyed_server(&pair, true, &["--metrics-bind", &bind, "--metrics-token-file", &token.display().to_string()], &dir, &keys).unwrap();
    let addr = format!("127.0.0.1:{port}");
    wait_for("the endpoint", Duration::from_secs(10), || get(&addr, "/healthz", None).ok()).unwrap();
    assert_eq!(get(&addr, "/metrics", None).unwrap().status, 401);
    assert_eq!(get(&addr, "/metrics", Some("s3cret-token-for-scraperX")).unwrap().status, 401);
    let ok = get(&addr, "/metrics", Some("s3cret-token-for-scrapers")).unwrap();
    assert_eq!(ok.status, 200);
    assert!(ok.body.contains("fog_server_info"));

    // Hostile requests: an endless head, garbage, a flood of idle
    // connections. None takes the endpoint down.
    let mut endless = TcpStream::connect(&addr).unwrap();
    let _ = endless.write_all(format!("GET /metrics HTTP/1.1\r\nX: {}\r\n", "a".repeat(100_000)).as_bytes());
    let mut garbage = TcpStream::connect(&addr).unwrap();
    let _ = garbage.write_all(&[0xff; 4096]);
    let idle: Vec<TcpStream> = (0..100).filter_map(|_| TcpStream::connect(&addr).ok()).collect();
    drop(idle);
    wait_for("the endpoint serving after the flood", Duration::from_secs(15), || {
        get(&addr, "/metrics", Some("s3cret-token-for-scrapers")).ok().filter(|r| r.status == 200)
    })
    .unwrap();
}
