//! Failover at scale: one host with a few thousand sensors multiplexes them
//! over one connection, so killing the active server costs the host one
//! failover, not one per sensor, and every reading is still acked, with
//! its sensors called from two threads, and counted exactly once by the
//! server that took over and by the old primary once it has caught up.

use std::time::Duration;

use fog_testkit::{
    Pair, check_pair, finish_host, is_active, is_caught_up, scratch_dir, server_counts, start_host, start_server,
    status_when,
};
use serde_json::Value;

fn u(v: &Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not a number: {v}"))
}

#[test]
fn killing_the_primary_costs_one_failover_for_thousands_of_sensors() {
    let dir = scratch_dir("scale").unwrap();
    let pair = Pair::on_free_ports().unwrap();
    let mut primary = start_server(&pair, true, &["--lateness", "200ms"], &dir).unwrap();
    let _backup = start_server(&pair, false, &["--lateness", "200ms"], &dir).unwrap();
    let host = start_host(
        &[
            "--sensors", "3000", "--interval", "250ms", "--duration", "5s", "--timeout", "500ms",
            "--threads", "2", "--servers", &pair.servers(),
        ],
        &dir,
    )
    .unwrap();
    // The kill comes under load, once the primary serves every sensor and
    // the backup holds a replica of what it counted.
    status_when(&pair.primary_frontend, "active and counting all 3000 sensors", Duration::from_secs(30), |s| {
        is_active(s) && server_counts(s).len() == 3000
    })
    .unwrap();
    status_when(&pair.backup_frontend, "a caught-up passive", Duration::from_secs(15), is_caught_up).unwrap();
    primary.kill().unwrap();

    let (code, summary) = finish_host(host, Duration::from_secs(90)).unwrap();
    assert_eq!(code, 0, "host exit code; failovers {}, unacked {}", summary["failovers"], summary["unacked"]);
    assert_eq!(u(&summary["unacked"]), 0);
    // One failover to the backup; a second or third at most if the backup
    // answered "not active" once before it took over. Never one per sensor.
    let failovers = u(&summary["failovers"]);
    assert!((1..=3).contains(&failovers), "failovers: {failovers}");

    // The backup took over with the replica: it counts every reading of
    // every sensor exactly once, and so does the old primary once it is
    // back as a caught-up passive.
    let _primary = start_server(&pair, true, &["--lateness", "200ms"], &dir).unwrap();
    check_pair("scale", &pair.backup_frontend, &pair.primary_frontend, &[&summary]).unwrap();
}
