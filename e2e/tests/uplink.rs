//! The uplink from a site to the cloud, with real parts: a keyed fog
//! server pair forwarding to a real 3-node NATS JetStream cluster (R3
//! stream, JWT credentials), a real host with the real sensor component,
//! and the faults the uplink must ride out: kill -9 of the active fog
//! server while forwarding, kill -9 of the stream's leader, the cloud away
//! for longer than JetStream's duplicate window, the whole cluster down
//! for a while, a side that lost a split forwarding its own history
//! before the winner took it over. Each ends by reading the stream back: every reading the
//! site counted is there exactly once, each sensor's in the order the site counted them, every average
//! in sequence order, and the site sequence has no gap and no repeat.
//!
//! Without nats-server these tests say SKIPPED, unless FOG_REQUIRE_NATS=1
//! (as `.ci/run` sets it) makes them fail. They run one at a time: two
//! clusters and two pairs at once would compete for two cores.

use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::time::Duration;

use fog_testkit::cloud::{CloudCheck, Settled, check_stream, read_settled};
use fog_testkit::nats::{NatsAuth, NatsCluster, require_nats};
use fog_testkit::netns::{Lab, ROOT};
use fog_testkit::{
    PairKeys, Pair, Proc, finish_host, is_active, is_caught_up, scratch_dir, server_status, server_status_as, start_host, start_keyed_server, status_when,
    status_when_as, wait_for,
};
use serde_json::Value;

const SITE: &str = "a1";
const STREAM: &str = "FOG_A1";

fn serial() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// A site (a keyed pair forwarding to a cloud) and its cloud.
struct Site {
    dir: PathBuf,
    pair: Pair,
    keys: PairKeys,
    primary: Option<Proc>,
    backup: Option<Proc>,
    cloud: NatsCluster,
}

impl Site {
    /// A 3-node cluster and a pair forwarding to it, with JetStream's
    /// duplicate window `window`; `None` when nats-server is missing.
    fn start(label: &str, window: &str) -> Option<Site> {
        Site::start_with(label, window, "256M")
    }

    fn start_with(label: &str, window: &str, backlog: &str) -> Option<Site> {
        require_nats(label).unwrap()?;
        let dir = scratch_dir(label).unwrap();
        let cloud = NatsCluster::start(&dir.join("cloud"), 3, NatsAuth::Sites(vec![SITE.into()])).unwrap();
        let pair = Pair::on_free_ports().unwrap();
        let keys = PairKeys::generate(&dir, &[("host", "sensors=1-1000")]).unwrap();
        let mut site = Site { dir, pair, keys, primary: None, backup: None, cloud };
        site.primary = Some(site.server_with(true, window, backlog));
        site.backup = Some(site.server_with(false, window, backlog));
        Some(site)
    }

    fn server_with(&self, primary: bool, window: &str, backlog: &str) -> Proc {
        let creds = self.cloud.site_creds(SITE).expect("site credentials").display().to_string();
        let urls = self.cloud.urls();
        let flags = ["--lateness", "200ms", "--uplink", &urls, "--site", SITE, "--uplink-creds", &creds, "--uplink-replicas", "3", "--uplink-duplicate-window", window, "--uplink-backlog", backlog];
        start_keyed_server(&self.pair, primary, &flags, &self.dir, &self.keys).unwrap()
    }

    /// A host of `sensors` sensors sending every 100 ms for `secs`.
    fn host(&self, sensors: u32, secs: u32) -> Proc {
        let (duration, sensors) = (format!("{secs}s"), sensors.to_string());
        let mut args: Vec<String> = ["--sensors", &sensors, "--first-id", "1", "--segments", "3", "--interval", "100ms", "--timeout", "500ms", "--duration", &duration, "--servers", &self.pair.servers()]
            .iter()
            .map(|s| s.to_string())
            .collect();
        args.extend(self.keys.host_args("host").unwrap());
        start_host(&args.iter().map(String::as_str).collect::<Vec<_>>(), &self.dir).unwrap()
    }

    /// The status of one node (asked with the admin key).
    fn status_when(&self, primary: bool, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        status_when_as(self.pair.frontend(primary), Some(&self.keys.admin_status(primary)), what, Duration::from_secs(90), pred).unwrap()
    }

    /// Waits until the cloud has some of the site's items (forwarding runs).
    fn forwarding(&self, primary: bool) {
        self.status_when(primary, "forwarding to the cloud", |s| s["uplink"]["forwarded_through"].as_u64().unwrap_or(0) > 50);
    }

    /// The stream and the active's status once the site has forwarded
    /// everything it owes (the kit's [`read_settled`]).
    fn settled(&self, active_is_primary: bool) -> Settled {
        let auth = self.keys.admin_status(active_is_primary);
        let settled = read_settled(
            || server_status_as(self.pair.frontend(active_is_primary), Some(&auth)).ok().filter(|s| s["state"] == "active"),
            || self.cloud.read_stream(STREAM, Duration::from_secs(60)),
            Duration::from_secs(90),
        )
        .unwrap();
        assert!(settled.drained, "the site never drained: {}", settled.status["uplink"]);
        settled
    }

    /// After the host finished: waits until the active node has forwarded
    /// everything, then reads the stream and checks it against what the
    /// site counted (the kit's [`check_stream`]).
    fn finish(&self, host: Proc, active_is_primary: bool) -> CloudCheck {
        let (code, summary) = finish_host(host, Duration::from_secs(120)).unwrap();
        assert_eq!(code, 0, "host exit code; summary {summary}");
        let Settled { messages, status, .. } = self.settled(active_is_primary);
        let cloud = check_stream(SITE, &messages, &status);
        assert!(cloud.ok(), "the cloud's stream is wrong: {:#?}\n{:#?}", cloud.violations, cloud.details);
        // The host's sensors: every reading they generated is in the cloud once.
        for s in summary["per_sensor"].as_array().unwrap() {
            let key = (s["sensor_id"].as_u64().unwrap(), s["incarnation"].as_u64().unwrap());
            let seqs = cloud.sensors.get(&key).map_or(0, |c| c.count);
            assert_eq!(seqs, s["generated"].as_u64().unwrap(), "sensor {key:?}: readings in the cloud vs generated");
        }
        eprintln!("the cloud holds {}", cloud.summary());
        cloud
    }
}

#[test]
fn a_kill_of_the_active_server_while_forwarding_sends_nothing_twice() {
    let _serial = serial();
    let Some(mut site) = Site::start("uplink-kill-active", "2m") else { return };
    // 10 000 readings a second: windows of thousands of items in many
    // parts, so the kill likely cuts one short.
    let host = site.host(1000, 12);
    site.forwarding(true);
    site.status_when(false, "a caught-up passive", is_caught_up);
    site.primary.take().expect("the primary").kill().unwrap();
    let cloud = site.finish(host, false);
    assert!(cloud.messages > 0);
}

#[test]
fn a_kill_of_the_stream_leader_sends_nothing_twice() {
    let _serial = serial();
    let Some(mut site) = Site::start("uplink-kill-leader", "2m") else { return };
    let host = site.host(1000, 12);
    site.forwarding(true);
    let leader = wait_for("the stream's leader", Duration::from_secs(30), || site.cloud.stream_leader(STREAM)).unwrap();
    site.cloud.kill(leader).unwrap();
    // Forwarding goes on with the two others.
    let before = site.status_when(true, "still forwarding", |_| true)["uplink"]["forwarded_through"].as_u64().unwrap();
    site.status_when(true, "forwarding past the kill", |s| s["uplink"]["forwarded_through"].as_u64().unwrap_or(0) > before + 50);
    site.cloud.restart(leader).unwrap();
    site.finish(host, true);
}

#[test]
fn a_side_that_lost_a_split_after_forwarding_is_taken_over_and_nothing_goes_twice() {
    let _serial = serial();
    let label = "uplink-split";
    let Some(_) = require_nats(label).unwrap() else { return };
    let Some(mut lab) = Lab::for_test("usplit", label) else { return };
    let dir = scratch_dir(label).unwrap();
    // The cluster in the root namespace, its client ports on every
    // address; each server in a namespace of its own, the hosts reaching
    // it over a link of its own; the servers replicate over a third link;
    // the backup reaches the cloud over a fourth.
    let cloud = NatsCluster::start_listening(&dir.join("cloud"), 3, NatsAuth::Sites(vec![SITE.into()]), IpAddr::V4(Ipv4Addr::UNSPECIFIED)).unwrap();
    let p = lab.namespace("primary").unwrap();
    let b = lab.namespace("backup").unwrap();
    let to_p = lab.link(ROOT, &p).unwrap();
    let to_b = lab.link(ROOT, &b).unwrap();
    let peer = lab.link(&p, &b).unwrap();
    let b_cloud = lab.link(ROOT, &b).unwrap();
    let pair = Pair {
        primary_frontend: format!("tcp://{}:5001", to_p.b_addr),
        backup_frontend: format!("tcp://{}:5002", to_b.b_addr),
        primary_state: format!("tcp://{}:5003", peer.a_addr),
        backup_state: format!("tcp://{}:5004", peer.b_addr),
    };
    let creds = cloud.site_creds(SITE).expect("site credentials").display().to_string();
    let server = |ns: &str, primary: bool, via: Ipv4Addr| {
        let urls = cloud.urls_via(IpAddr::V4(via));
        let flags = ["--lateness", "200ms", "--insecure", "--uplink", &urls, "--uplink-insecure", "--site", SITE, "--uplink-creds", &creds, "--uplink-replicas", "3"];
        let (name, args) = fog_testkit::server_args(&pair, primary, &flags, &dir);
        let proc = lab.spawn(ns, name, &fog_testkit::bin("fog-server").unwrap(), &args, &dir).unwrap();
        fog_testkit::wait_until_serving(proc, pair.frontend(primary)).unwrap()
    };
    let _primary = server(&p, true, to_p.a_addr);
    let _backup = server(&b, false, b_cloud.a_addr);
    let host = |servers: &str, first_id: &str, duration: &str| {
        let args = ["--sensors", "20", "--first-id", first_id, "--segments", "3", "--interval", "100ms", "--timeout", "500ms", "--duration", duration, "--servers", servers];
        start_host(&args, &dir).unwrap()
    };
    // One host per server, each knowing only its own: the primary keeps
    // its sensors through the split.
    let first = host(&pair.primary_frontend, "1", "9s");
    let wait = |endpoint: &str, what: &str, pred: &dyn Fn(&Value) -> bool| status_when(endpoint, what, Duration::from_secs(30), pred).unwrap();
    wait(&pair.primary_frontend, "forwarding", &|s| s["uplink"]["forwarded_through"].as_u64().unwrap_or(0) > 50);
    wait(&pair.backup_frontend, "a caught-up passive", &is_caught_up);

    // The backup loses the cloud, then the servers are cut off from each
    // other; a second host asks the backup, and it takes over: both sides
    // serve, and the primary, in the older epoch, forwards alone.
    lab.cut(&b_cloud).unwrap();
    lab.cut(&peer).unwrap();
    wait(&pair.primary_frontend, "active alone", &|s| is_active(s) && s["replication"].as_str().is_some_and(|r| r.contains("alone")));
    let second = host(&pair.backup_frontend, "101", "5s");
    wait(&pair.backup_frontend, "active", &is_active);
    let forwarded = server_status(&pair.primary_frontend).unwrap()["uplink"]["forwarded_through"].as_u64().unwrap_or(0);
    wait(&pair.primary_frontend, "the primary forwarding alone", &|s| s["uplink"]["forwarded_through"].as_u64().unwrap_or(0) > forwarded + 50);
    for (name, h) in [("first", first), ("second", second)] {
        let (code, summary) = finish_host(h, Duration::from_secs(60)).unwrap();
        assert_eq!(code, 0, "the {name} host: {summary}");
    }

    // The servers' link comes back: the primary, in the older epoch, steps
    // down and hands over what it accepted alone. Then the backup reaches
    // the cloud: the stream ends in what the primary forwarded alone, and
    // the backup takes it over.
    lab.heal(&peer).unwrap();
    wait(&pair.primary_frontend, "the primary passive", &|s| s["state"] == "passive");
    lab.heal(&b_cloud).unwrap();
    let active = pair.settled_active(Duration::from_secs(30)).unwrap();
    assert_eq!(active, pair.backup_frontend, "the side in the newer epoch serves");
    let settled = read_settled(
        || server_status(&active).ok().filter(|s| s["state"] == "active"),
        || cloud.read_stream(STREAM, Duration::from_secs(60)),
        Duration::from_secs(90),
    )
    .unwrap();
    assert!(settled.drained, "the site never drained: {}", settled.status["uplink"]);
    let check = check_stream(SITE, &settled.messages, &settled.status);
    eprintln!("[{label}] the cloud holds {}; the active's uplink: {}", check.summary(), settled.status["uplink"]);
    assert!(check.ok(), "the cloud's stream is wrong: {:#?}\n{:#?}", check.violations, check.details);
    assert!(settled.status["uplink"]["adoptions"].as_u64().unwrap_or(0) >= 1, "the winner took nothing over: {}", settled.status["uplink"]);
    assert!(check.markers >= 1, "{}", check.summary());
}

#[test]
fn a_cloud_away_longer_than_the_duplicate_window_gets_everything_once() {
    let _serial = serial();
    // A duplicate window of 1 s: the outage is far longer, so JetStream's
    // message ids cannot be what keeps resends out.
    let Some(mut site) = Site::start("uplink-outage", "1s") else { return };
    let host = site.host(20, 16);
    site.forwarding(true);
    site.cloud.stop_all().unwrap();
    // The site keeps acking and averaging; its backlog grows.
    let away = site.status_when(true, "a growing backlog", |s| s["uplink"]["backlog_items"].as_u64().unwrap_or(0) > 300 && s["uplink"]["connected"] == false);
    assert!(away["uplink"]["last_error"].as_str().is_some_and(|e| !e.is_empty()), "no error shown while the cloud is away: {away}");
    std::thread::sleep(Duration::from_secs(4));
    site.cloud.start_all().unwrap();
    site.finish(host, true);
}

#[test]
fn past_the_backlog_bound_the_oldest_are_dropped_counted_and_the_rest_arrive_once() {
    let _serial = serial();
    // 96 bytes an item: a bound of 48 KiB holds 512 items.
    let Some(mut site) = Site::start_with("uplink-bound", "1s", "48K") else { return };
    let host = site.host(20, 14);
    site.forwarding(true);
    site.cloud.stop_all().unwrap();
    let full = site.status_when(true, "dropping at the bound", |s| s["uplink"]["dropped"].as_u64().unwrap_or(0) > 200);
    assert!(full["uplink"]["backlog_bytes"].as_u64().unwrap() <= 48 * 1024, "{full}");
    site.cloud.start_all().unwrap();
    let (code, summary) = finish_host(host, Duration::from_secs(120)).unwrap();
    assert_eq!(code, 0, "the site kept acking its sensors while the cloud was away: {summary}");
    let settled = site.settled(true);
    let cloud = check_stream(SITE, &settled.messages, &settled.status);
    // Every item is in the cloud once or was dropped (counted), never both;
    // what arrived is in order and well-formed.
    let dropped = settled.status["uplink"]["dropped"].as_u64().unwrap();
    assert!(dropped > 200, "{}", settled.status["uplink"]);
    assert_eq!(cloud.dropped, dropped);
    assert_eq!((cloud.duplicated, cloud.beyond, cloud.malformed), (0, 0, 0), "{}\n{:#?}", cloud.summary(), cloud.details);
    assert_eq!(cloud.missing, dropped, "in the cloud or dropped, never both: {}", cloud.summary());
    assert_eq!(cloud.readings + cloud.averages + dropped, cloud.site_items, "{}", cloud.summary());
    assert_eq!(cloud.readings_out_of_order, 0, "{:#?}", cloud.details);
    let log = std::fs::read_to_string(site.dir.join("primary.log")).unwrap();
    assert!(log.contains("the uplink's backlog is full"), "the drops were not logged");
}
