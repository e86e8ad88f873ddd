//! Failover at scale: one host with a few thousand sensors multiplexes them
//! over one connection, so killing the active server costs the host one
//! failover, not one per sensor, and every reading is still acked, with
//! its sensors called from two threads.

use std::time::Duration;

use fog_e2e::{Pair, finish_host, scratch_dir, server_counts, server_status, start_host, start_server};
use serde_json::Value;

fn u(v: &Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not a number: {v}"))
}

#[test]
fn killing_the_primary_costs_one_failover_for_thousands_of_sensors() {
    let dir = scratch_dir("scale");
    let pair = Pair::on_free_ports();
    let mut primary = start_server(&pair, true, &["--lateness", "200ms"], &dir).unwrap();
    let backup = start_server(&pair, false, &["--lateness", "200ms"], &dir).unwrap();
    let host = start_host(
        &[
            "--sensors", "3000", "--interval", "250ms", "--duration", "5s", "--timeout", "500ms",
            "--threads", "2", "--servers", &pair.servers(),
        ],
        &dir,
    )
    .unwrap();
    std::thread::sleep(Duration::from_secs(2));
    let counted_by_primary = server_counts(&server_status(&pair.primary_frontend).unwrap());
    assert_eq!(counted_by_primary.len(), 3000, "all sensors reached the primary before the kill");
    primary.kill();

    let (code, summary) = finish_host(host, Duration::from_secs(90)).unwrap();
    assert_eq!(code, 0, "host exit code; failovers {}, unacked {}", summary["failovers"], summary["unacked"]);
    assert_eq!(u(&summary["unacked"]), 0);
    // One failover to the backup; a second or third at most if the backup
    // answered "not active" once before it took over. Never one per sensor.
    let failovers = u(&summary["failovers"]);
    assert!((1..=3).contains(&failovers), "failovers: {failovers}");

    let counted_by_backup = server_counts(&server_status(&pair.backup_frontend).unwrap());
    for s in summary["per_sensor"].as_array().expect("per_sensor") {
        let key = (u(&s["sensor_id"]), u(&s["incarnation"]));
        let p = counted_by_primary.get(&key).map_or(0, |c| c.0);
        let b = counted_by_backup.get(&key).map_or(0, |c| c.0);
        assert!(p + b >= u(&s["generated"]), "sensor {key:?}: primary {p} + backup {b} < generated {}", s["generated"]);
        assert!(b > 0, "backup counted nothing for sensor {key:?}");
    }
    drop(backup);
}
