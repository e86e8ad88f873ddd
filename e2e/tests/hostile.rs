//! Hostile clients against a keyed server pair: the real `fog-server`
//! processes with CurveZMQ keys, a legit keyed `fog-host` running the real
//! sensor component, and, while it runs, one attack per test — raw bytes
//! and huge ZMTP frame headers, clients without a key or with an unknown
//! one, a key sending for sensors it has no rights for, forged epochs,
//! poison readings from a compromised host key, a batch at and past the
//! reading limit, clients that never read their replies, and status asked
//! for with a host key.
//!
//! Every test ends the same way ([`Stage::finish`]): the host exits 0 with
//! every reading acked, both servers count exactly what the host generated
//! for each of its sensors (no reading lost, none counted twice), one node
//! is active and the other a caught-up passive, and the servers are alive
//! and small. Then the test checks the counter the server shows for its
//! attack. The tests run one at a time, so that two pairs do not compete
//! for the CPU and miss heartbeats.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use fog_testkit::history::{Observation, check, host_side, server_side};
use fog_testkit::{
    Pair, PairKeys, Proc, StatusAuth, finish_host, is_caught_up, log_lines_with, rss_mib, scratch_dir, server_counts,
    server_status_as, start_host, start_keyed_server, start_server, wait_for,
};
use fog_testkit::Client;
use fog_testkit::rogue::{batch, batch_reply, forged_claims, named_epoch, readings, refused_count, sensor};
use fog_protocol::{AverageCursor, MAX_READINGS_PER_BATCH, Reading, Refusal, Reply, Request, SensorBatch, encode};
use fog_testkit::rogue::now_ms;
use fog_transport::{Context as ZmqContext, Keypair, Limits, PublicKey, SocketType};
use serde_json::Value;

/// Server flags of every test: short lateness so averages flow in a short run.
const SERVER_FLAGS: &[&str] = &["--lateness", "200ms"];
/// The legit host's sensors: ids 1..=20.
const HOST_SENSORS: u64 = 20;
/// The rights of the legit host's key.
const HOST_RIGHTS: &str = "sensors=1-20";
/// Rights of a rogue key of its own: sensors nobody else sends for.
const OTHER_RIGHTS: &str = "sensors=9000-9999";
/// The segment rogue keys send their own sensors' readings for, so that the
/// legit sensors' averages stay theirs.
const ROGUE_SEGMENT: u32 = 7;
/// Resident memory a server may reach under any attack here.
const MAX_SERVER_RSS_MIB: f64 = 300.0;
/// How long a rogue waits for a reply it expects.
const REPLY_TIMEOUT: Duration = Duration::from_secs(10);

fn serial() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn u(v: &Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not a number: {v}"))
}

/// A keyed pair, its keys, and a legit keyed host running 20 sensors for 8 s.
struct Stage {
    label: &'static str,
    dir: PathBuf,
    pair: Pair,
    keys: PairKeys,
    primary: Proc,
    backup: Proc,
    host: Option<Proc>,
    started: Instant,
    observations: Vec<Observation>,
}

/// What a stage ended with, for the case-specific checks.
struct Ending {
    /// The host's JSON summary.
    summary: Value,
    /// Status of the active node, then of the caught-up passive.
    active: Value,
    passive: Value,
}

impl Stage {
    /// Starts the pair with keys for the host and each of `clients`, waits
    /// until the primary is active with a caught-up passive, starts the host
    /// and waits until the active has counted some of its readings.
    fn start(label: &'static str, clients: &[(&str, &str)]) -> anyhow::Result<Stage> {
        let dir = scratch_dir(label)?;
        let pair = Pair::on_free_ports()?;
        let mut all_clients = vec![("host", HOST_RIGHTS)];
        all_clients.extend_from_slice(clients);
        let keys = PairKeys::generate(&dir, &all_clients)?;
        let primary = start_keyed_server(&pair, true, SERVER_FLAGS, &dir, &keys)?;
        let backup = start_keyed_server(&pair, false, SERVER_FLAGS, &dir, &keys)?;
        let mut stage = Stage {
            label,
            dir,
            pair,
            keys,
            primary,
            backup,
            host: None,
            started: Instant::now(),
            observations: Vec::new(),
        };
        let host_keys = stage.keys.host_args("host")?;
        let servers = stage.pair.servers();
        let mut args = vec![
            "--sensors", "20", "--interval", "100ms", "--duration", "8s", "--servers", &servers,
        ];
        args.extend(host_keys.iter().map(String::as_str));
        stage.host = Some(start_host(&args, &stage.dir)?);
        stage.status_when(true, "active and counting the host's readings", Duration::from_secs(15), |s| {
            s["state"] == "active" && s["counted"].as_u64().unwrap_or(0) > 0
        })?;
        stage.status_when(false, "a caught-up passive", Duration::from_secs(15), is_caught_up)?;
        eprintln!("[{label}] pair and host running after {:.1}s; the attack starts", stage.started.elapsed().as_secs_f64());
        Ok(stage)
    }

    fn endpoint(&self, primary: bool) -> &str {
        if primary { &self.pair.primary_frontend } else { &self.pair.backup_frontend }
    }

    fn admin(&self, primary: bool) -> StatusAuth {
        self.keys.admin_status(primary)
    }

    /// The admin's status of one node, noted as an observation.
    fn status(&mut self, primary: bool) -> anyhow::Result<Value> {
        let status = server_status_as(self.endpoint(primary), Some(&self.admin(primary)))?;
        self.observations.push(Observation {
            at_s: self.started.elapsed().as_secs_f64(),
            node: if primary { "primary" } else { "backup" },
            state: status["state"].as_str().unwrap_or("?").to_string(),
            epoch: status["epoch"].as_u64(),
        });
        Ok(status)
    }

    /// The status of one node once it satisfies `pred`.
    fn status_when(
        &mut self,
        primary: bool,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> anyhow::Result<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let last = match self.status(primary) {
                Ok(s) if pred(&s) => return Ok(s),
                Ok(s) => s,
                Err(e) => Value::String(format!("{e:#}")),
            };
            if Instant::now() > deadline {
                let node = if primary { "primary" } else { "backup" };
                bail!("{node} was not {what} within {timeout:?}; last status {last}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The keypair of client `name` and the public key of one server.
    fn curve(&self, name: &str, primary: bool) -> anyhow::Result<(Keypair, PublicKey)> {
        Ok((self.keys.client(name)?.pair.clone(), self.keys.server_public(primary)))
    }

    /// A client of one node's frontend with the key of client `name`.
    fn rogue(&self, name: &str, primary: bool) -> anyhow::Result<Client> {
        let (keys, server) = self.curve(name, primary)?;
        Client::connect(self.endpoint(primary), Some((&keys, &server)))
    }

    /// The incarnation of each of the legit host's sensors, from the
    /// active's status.
    fn host_incarnations(&mut self) -> anyhow::Result<BTreeMap<u32, u64>> {
        let status = self.status_when(true, "counting all 20 sensors", Duration::from_secs(10), |s| {
            server_counts(s).keys().filter(|(id, _)| (1..=HOST_SENSORS).contains(id)).count() == HOST_SENSORS as usize
        })?;
        let mut out = BTreeMap::new();
        for (id, incarnation) in server_counts(&status).keys() {
            if (1..=HOST_SENSORS).contains(id) {
                out.insert(u32::try_from(*id)?, *incarnation);
            }
        }
        Ok(out)
    }

    /// Checks that neither server died and both stayed small.
    fn servers_alive(&mut self) {
        for proc in [&mut self.primary, &mut self.backup] {
            let exited = proc.child.try_wait().ok().flatten();
            assert!(exited.is_none(), "[{}] {} exited ({exited:?}):\n{}", self.label, proc.name, proc.log_tail(30));
            let rss = rss_mib(proc.child.id()).unwrap_or(f64::MAX);
            assert!(rss < MAX_SERVER_RSS_MIB, "[{}] {} uses {rss:.0} MiB", self.label, proc.name);
            for fatal in ["memory allocation", "panicked"] {
                assert_eq!(log_lines_with(&proc.log, &[fatal]), 0, "[{}] {} logged {fatal:?}", self.label, proc.name);
            }
        }
    }

    /// Waits for the host, then checks what every test checks: the host
    /// acked everything, both nodes count exactly what it generated per
    /// sensor, one node is active and the other a caught-up passive.
    fn finish(mut self) -> Ending {
        let label = self.label;
        let host = self.host.take().expect("the host runs until finish");
        let (code, summary) = finish_host(host, Duration::from_secs(90)).expect("host summary");
        assert_eq!(code, 0, "[{label}] host exit code; summary {summary}");
        assert_eq!(u(&summary["unacked"]), 0, "[{label}] unacked readings: {summary}");
        assert_eq!(summary["generated"], summary["acked"], "[{label}] {summary}");
        assert_eq!(u(&summary["sensors"]), HOST_SENSORS, "[{label}] {summary}");
        self.servers_alive();

        let primary = self.status(true).expect("the primary answers status");
        let backup = self.status(false).expect("the backup answers status");
        let actives = [&primary, &backup].iter().filter(|s| s["state"] == "active").count();
        assert_eq!(actives, 1, "[{label}] one active node: primary {} backup {}", primary["state"], backup["state"]);
        let active_is_primary = primary["state"] == "active";
        let active = if active_is_primary { primary } else { backup };
        let passive = self
            .status_when(!active_is_primary, "a caught-up passive", Duration::from_secs(15), is_caught_up)
            .expect("the passive catches up");
        assert_eq!(active["epoch"], passive["epoch"], "[{label}] active and passive agree on the epoch");

        let host = host_side(&summary);
        for (node, status) in [("active", &active), ("passive", &passive)] {
            let verdict = check(std::slice::from_ref(&host), &server_side(status), &self.observations);
            assert!(verdict.ok(), "[{label}] {node}: {:?}\n{:?}", verdict.violations, verdict.notes);
            let counts = server_counts(status);
            let mut wrong = Vec::new();
            for (key, s) in &host {
                let got = counts.get(key).copied().unwrap_or_default();
                if got != (s.generated, s.sum_kmh) || s.generated != s.acked {
                    wrong.push(format!(
                        "sensor {key:?}: server (count, sum) {got:?}, host generated {} acked {} sum {}",
                        s.generated, s.acked, s.sum_kmh
                    ));
                }
            }
            assert!(wrong.is_empty(), "[{label}] {node} counts differ from the host's:\n{}", wrong.join("\n"));
        }
        eprintln!(
            "[{label}] host generated and got acks for {} readings of {} sensors; active ({}, epoch {}) and passive count them exactly; {:.1}s",
            summary["generated"],
            host.len(),
            active["role"].as_str().unwrap_or("?"),
            active["epoch"],
            self.started.elapsed().as_secs_f64()
        );
        Ending { summary, active, passive }
    }
}

fn counter(status: &Value, name: &str) -> u64 {
    status["refused"][name].as_u64().unwrap_or_else(|| panic!("no refused.{name} in {status}"))
}

/// Opens a TCP connection to `endpoint` (`tcp://HOST:PORT`), writes
/// `bytes`, and returns how long the server took to close it (`None`:
/// still open after `wait`).
fn raw_attack(endpoint: &str, bytes: &[u8], wait: Duration) -> anyhow::Result<Option<Duration>> {
    let addr = endpoint.strip_prefix("tcp://").context("a tcp:// endpoint")?;
    let mut stream = TcpStream::connect(addr).with_context(|| format!("cannot connect to {addr}"))?;
    let sent = Instant::now();
    // The server may close before everything is written: that is its answer.
    let _ = stream.write_all(bytes);
    stream.set_read_timeout(Some(Duration::from_millis(50)))?;
    let mut buf = [0u8; 4096];
    while sent.elapsed() < wait {
        match stream.read(&mut buf) {
            Ok(0) => return Ok(Some(sent.elapsed())),
            Ok(_) => {}
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
            Err(_) => return Ok(Some(sent.elapsed())),
        }
    }
    Ok(None)
}

/// A ZMTP 3.0 greeting for `mechanism` (as a client).
fn greeting(mechanism: &str) -> Vec<u8> {
    let mut g = vec![0xff, 0, 0, 0, 0, 0, 0, 0, 1, 0x7f, 3, 0];
    let mut name = mechanism.as_bytes().to_vec();
    name.resize(20, 0);
    g.extend(name);
    g.push(0); // as-server
    g.extend([0u8; 31]);
    g
}

/// A ZMTP long frame header (`command` or message) declaring `size` bytes,
/// followed by a few of them.
fn long_frame_header(command: bool, size: u64) -> Vec<u8> {
    let mut f = vec![if command { 0x06 } else { 0x02 }];
    f.extend(size.to_be_bytes());
    f.extend([0x42u8; 64]);
    f
}

/// The NULL mechanism's READY command for a DEALER.
fn null_ready() -> Vec<u8> {
    let mut body = vec![5];
    body.extend(b"READY");
    body.push(11);
    body.extend(b"Socket-Type");
    body.extend(6u32.to_be_bytes());
    body.extend(b"DEALER");
    let mut f = vec![0x04, u8::try_from(body.len()).expect("a short command")];
    f.extend(body);
    f
}

#[test]
fn garbage_and_huge_frame_headers_on_raw_connections_do_not_hurt_the_server() {
    let _serial = serial();
    let stage = Stage::start("raw-bytes", &[]).unwrap();
    // A server without keys too: only there does a NULL greeting get past
    // the handshake, to the frame a 2^40-byte header announces.
    let lone = Pair::on_free_ports().unwrap();
    let lone_dir = stage.dir.join("keyless");
    std::fs::create_dir_all(&lone_dir).unwrap();
    let mut keyless = start_server(&lone, true, SERVER_FLAGS, &lone_dir).unwrap();
    let mut garbage = vec![0u8; 4096];
    rand::fill(&mut garbage[..]);
    garbage[0] = 0x17; // not a ZMTP signature
    // What each attack sends, and how soon the server must close the
    // connection: an announced size over ZMQ_MAXMSGSIZE is refused at once
    // (a server that waited for the bytes would close only at the handshake
    // (5 s) or heartbeat (3 s) timeout); garbage may be taken for a ZMTP
    // 1.0 peer by a server without keys, which the handshake timeout ends.
    let at_once = Duration::from_millis(1500);
    let handshake_timeout = Duration::from_secs(6);
    let mut attacks: Vec<(String, Vec<u8>, Duration)> = vec![("4 KiB of garbage".into(), garbage, handshake_timeout)];
    for size in [1u64 << 40, 1 << 35] {
        let mut null = greeting("NULL");
        null.extend(long_frame_header(false, size));
        attacks.push((format!("a NULL greeting, then a message of {size} bytes"), null, at_once));
        let mut ready = greeting("NULL");
        ready.extend(null_ready());
        ready.extend(long_frame_header(false, size));
        attacks.push((format!("a NULL greeting and READY, then a message of {size} bytes"), ready, at_once));
        let mut curve = greeting("CURVE");
        curve.extend(long_frame_header(true, size));
        attacks.push((format!("a CURVE greeting, then a command of {size} bytes"), curve, at_once));
    }
    let targets = [
        ("keyed primary", stage.pair.primary_frontend.clone()),
        ("keyed backup", stage.pair.backup_frontend.clone()),
        ("keyless server", lone.primary_frontend.clone()),
    ];
    for (server, endpoint) in &targets {
        for (what, bytes, within) in &attacks {
            let closed = raw_attack(endpoint, bytes, handshake_timeout + Duration::from_secs(1)).unwrap();
            eprintln!("[raw-bytes] {server}, {what}: connection closed by the server after {closed:?}");
            let closed = closed.unwrap_or_else(|| panic!("{server}, {what}: the connection was still open after 7 s"));
            assert!(closed < *within, "{server}, {what}: closed only after {closed:?}");
        }
    }
    let exited = keyless.child.try_wait().unwrap();
    assert!(exited.is_none(), "the keyless server exited ({exited:?}):\n{}", keyless.log_tail(30));
    assert_eq!(log_lines_with(&keyless.log, &["memory allocation"]), 0, "{}", keyless.log_tail(30));
    let keyless_rss = rss_mib(keyless.child.id()).unwrap_or(f64::MAX);
    assert!(keyless_rss < MAX_SERVER_RSS_MIB, "the keyless server uses {keyless_rss:.0} MiB");
    let lone_status = fog_testkit::server_status(&lone.primary_frontend).expect("the keyless server answers status");
    eprintln!("[raw-bytes] keyless server after the attacks: {} MiB, malformed_frames {}", keyless_rss, lone_status["malformed_frames"]);
    keyless.kill().unwrap();

    let end = stage.finish();
    // None of it reached the keyed nodes: nothing malformed, nothing but
    // the host's readings counted.
    for status in [&end.active, &end.passive] {
        assert_eq!(u(&status["malformed_frames"]), 0, "{status}");
        assert_eq!(u(&status["counted"]), u(&end.summary["generated"]), "only the host's readings are counted");
    }
}

#[test]
fn clients_without_a_key_or_with_an_unknown_key_get_nothing_counted() {
    let _serial = serial();
    let mut stage = Stage::start("no-key", &[]).unwrap();
    let stranger = Keypair::generate().unwrap();
    let incarnations = stage.host_incarnations().unwrap();
    for primary in [true, false] {
        let server = stage.keys.server_public(primary);
        let mut null = Client::connect(stage.endpoint(primary), None).unwrap();
        let mut unknown = Client::connect(stage.endpoint(primary), Some((&stranger, &server))).unwrap();
        for (i, rogue) in [&null, &unknown].into_iter().enumerate() {
            // Readings of sensors of their own, and of the host's sensors
            // far ahead of what it generated, and a status request.
            let mut sensors = vec![sensor(9000, 1, ROGUE_SEGMENT, readings(0, 100, now_ms()))];
            sensors.extend(incarnations.iter().map(|(&id, &inc)| sensor(id, inc, 0, readings(2_000, 50, now_ms()))));
            for n in 0..50 {
                rogue.send(&batch(100 * i as u64 + n, sensors.clone())).unwrap();
            }
            rogue.send(&Request::Status).unwrap();
        }
        let node = if primary { "primary" } else { "backup" };
        let null_saw = null.events(Duration::from_secs(2));
        let unknown_saw = unknown.events(Duration::from_millis(500));
        eprintln!("[no-key] {node}: the NULL client saw {null_saw:?}; the unknown key saw {unknown_saw:?}");
        for (who, saw) in [("NULL client", &null_saw), ("unknown key", &unknown_saw)] {
            assert!(!saw.iter().any(|e| e.starts_with("a message")), "{node}: the {who} got a reply: {saw:?}");
        }
        assert!(
            unknown_saw.iter().any(|e| e.starts_with("HandshakeFailed")),
            "{node}: the unknown key was not told its handshake failed: {unknown_saw:?}"
        );
    }
    let end = stage.finish();
    for status in [&end.active, &end.passive] {
        assert_eq!(u(&status["counted"]), u(&end.summary["generated"]), "only the host's readings are counted: {status}");
        assert!(!server_counts(status).keys().any(|(id, _)| *id == 9000), "sensor 9000 of a rogue was counted");
        assert_eq!(u(&status["malformed_frames"]), 0);
    }
}

#[test]
fn readings_for_sensors_outside_the_keys_rights_are_refused_and_counted() {
    let _serial = serial();
    let mut stage = Stage::start("foreign", &[("neighbour", OTHER_RIGHTS)]).unwrap();
    let incarnations = stage.host_incarnations().unwrap();
    let before = stage.status(true).unwrap();
    let mut rogue = stage.rogue("neighbour", true).unwrap();
    let mut refused_sent = 0u64;
    let mut own = 0u64;
    for round in 0..20u64 {
        // Seqs the host will generate later, stamped now: counted, they
        // would make the host's own readings duplicates.
        let mut sensors: Vec<SensorBatch> =
            incarnations.iter().map(|(&id, &inc)| sensor(id, inc, 0, readings(30 + round * 5, 5, now_ms()))).collect();
        refused_sent += 5 * sensors.len() as u64;
        sensors.push(sensor(9000, 0xbeef, ROGUE_SEGMENT, readings(round * 3, 3, now_ms())));
        own += 3;
        let reply = batch_reply(rogue.ask(&batch(round + 1, sensors), REPLY_TIMEOUT).unwrap()).unwrap();
        assert_eq!(refused_count(&reply, Refusal::ForeignSensor), 5 * HOST_SENSORS, "round {round}: {:?}", reply.refused);
        assert!(reply.acks.iter().all(|a| a.sensor_id == 9000), "a foreign sensor was acked: {:?}", reply.acks);
        assert_eq!(reply.acks.len(), 1, "its own sensor is acked: {:?}", reply.acks);
        std::thread::sleep(Duration::from_millis(100));
    }
    let end = stage.finish();
    let refused = counter(&end.active, "foreign_sensor") - counter(&before, "foreign_sensor");
    eprintln!("[foreign] refused.foreign_sensor grew by {refused} ({refused_sent} sent)");
    assert_eq!(refused, refused_sent, "refused.foreign_sensor counts every foreign reading");
    assert_eq!(server_counts(&end.active).get(&(9000, 0xbeef)).map(|c| c.0), Some(own), "its own sensor is counted");
    assert_eq!(u(&end.active["counted"]), u(&end.summary["generated"]) + own);
}

#[test]
fn forged_epochs_are_counted_and_never_make_the_active_step_down() {
    let _serial = serial();
    let mut stage = Stage::start("forged-epochs", &[("forger", OTHER_RIGHTS)]).unwrap();
    let before_primary = stage.status(true).unwrap();
    let before_backup = stage.status(false).unwrap();
    let epoch = u(&before_primary["epoch"]);
    let mut forged_sent = BTreeMap::from([(true, 0u64), (false, 0u64)]);
    for primary in [true, false] {
        let mut rogue = stage.rogue("forger", primary).unwrap();
        // A real seal, of the epoch the server names in its replies.
        let reply = rogue.ask(&batch(1, Vec::new()), REPLY_TIMEOUT).unwrap();
        let real = named_epoch(&reply).unwrap_or_else(|| panic!("unexpected reply {reply:?}"));
        assert_eq!(real.0, epoch, "the server names its epoch");
        let claims = forged_claims(epoch, real.1, 20);
        for (i, (claimed, seal)) in claims.iter().enumerate() {
            let request = Request::Batch { batch_id: 10 + i as u64, epoch: *claimed, seal: *seal, sensors: Vec::new() };
            let reply = rogue.ask(&request, REPLY_TIMEOUT).unwrap();
            if primary {
                let b = batch_reply(reply).unwrap();
                assert_eq!(b.epoch, epoch, "the active answers in its own epoch after a claim of {claimed}");
            } else {
                assert!(matches!(reply, Reply::NotActive { epoch: e, .. } if e == epoch), "the passive: {reply:?}");
            }
        }
        // A sensor cursor from an epoch no server has served.
        let mut s = sensor(9001, 3, ROGUE_SEGMENT, readings(0, 1, now_ms()));
        s.average_cursor = Some(AverageCursor { seq: 1, epoch: epoch + 7, chain: 0xdead });
        let cursor_batch = Request::Batch { batch_id: 99, epoch: real.0, seal: real.1, sensors: vec![s] };
        rogue.ask(&cursor_batch, REPLY_TIMEOUT).unwrap();
        *forged_sent.get_mut(&primary).unwrap() += claims.len() as u64 + 1;
        let now = stage.status(primary).unwrap();
        assert_eq!(now["state"], if primary { "active" } else { "passive" }, "right after the claims: {now}");
        assert_eq!(u(&now["epoch"]), epoch, "the epoch moved");
    }
    let end = stage.finish();
    assert_eq!(end.active["role"], "primary", "the primary is still the active: {}", end.active);
    assert_eq!(u(&end.active["epoch"]), epoch, "the active's epoch is unchanged");
    for (status, before, primary) in [(&end.active, &before_primary, true), (&end.passive, &before_backup, false)] {
        let forged = u(&status["forged_epochs"]) - u(&before["forged_epochs"]);
        eprintln!("[forged-epochs] {}: forged_epochs grew by {forged} ({} sent)", status["role"], forged_sent[&primary]);
        assert_eq!(forged, forged_sent[&primary], "forged epochs counted by the {}", status["role"]);
    }
}

#[test]
fn poison_readings_from_a_compromised_host_key_do_not_stop_the_sensors_being_counted() {
    let _serial = serial();
    let mut stage = Stage::start("poison", &[("compromised", HOST_RIGHTS)]).unwrap();
    let incarnations = stage.host_incarnations().unwrap();
    let before = stage.status(true).unwrap();
    let mut rogue = stage.rogue("compromised", true).unwrap();
    let hour = 3_600_000;
    let mut sent: std::collections::HashMap<Refusal, u64> = std::collections::HashMap::new();
    let mut expired_sent = 0u64;
    for (round, (&id, &inc)) in incarnations.iter().enumerate() {
        // The sensor is at about seq 30 here; 40..60 are seqs it has yet to
        // generate.
        let poison = vec![
            (Reading { seq: 1 << 62, speed_kmh: 1, timestamp_ms: 0 }, Some(Refusal::SeqOutOfRange)),
            (Reading { seq: u64::MAX, speed_kmh: 1, timestamp_ms: now_ms() }, Some(Refusal::SeqOutOfRange)),
            (Reading { seq: (1 << 53) - 1, speed_kmh: 1, timestamp_ms: now_ms() }, Some(Refusal::SeqOutOfRange)),
            (Reading { seq: 45, speed_kmh: 1, timestamp_ms: now_ms() + hour }, Some(Refusal::FromTheFuture)),
            (Reading { seq: 40, speed_kmh: 1, timestamp_ms: 0 }, None),
            (Reading { seq: (1 << 52) + 7, speed_kmh: 1, timestamp_ms: 1 }, None),
            (Reading { seq: 60, speed_kmh: 1, timestamp_ms: now_ms() - 2 * hour }, None),
        ];
        for (_, reason) in &poison {
            match reason {
                Some(r) => *sent.entry(*r).or_default() += 1,
                None => expired_sent += 1,
            }
        }
        let readings = poison.iter().map(|(r, _)| *r).collect();
        let reply = batch_reply(rogue.ask(&batch(round as u64 + 1, vec![sensor(id, inc, 0, readings)]), REPLY_TIMEOUT).unwrap()).unwrap();
        assert_eq!(refused_count(&reply, Refusal::SeqOutOfRange), 3, "sensor {id}: {:?}", reply.refused);
        assert_eq!(refused_count(&reply, Refusal::FromTheFuture), 1, "sensor {id}: {:?}", reply.refused);
        let ack = reply.acks.iter().find(|a| a.sensor_id == id).expect("the expired readings are acked");
        assert!(ack.next_seq < 1_000, "sensor {id}: the watermark jumped to {}", ack.next_seq);
    }
    let end = stage.finish();
    let grew = |name: &str| counter(&end.active, name) - counter(&before, name);
    let expired = u(&end.active["expired"]) - u(&before["expired"]);
    eprintln!(
        "[poison] refused.seq_out_of_range +{}, refused.from_the_future +{}, expired +{expired}; sent {sent:?} and {expired_sent} expired",
        grew("seq_out_of_range"),
        grew("from_the_future")
    );
    assert_eq!(grew("seq_out_of_range"), sent[&Refusal::SeqOutOfRange]);
    assert_eq!(grew("from_the_future"), sent[&Refusal::FromTheFuture]);
    assert_eq!(expired, expired_sent, "expired readings are acked and counted as expired");
    // Every sensor went on past the poisoned seqs and every reading of it counted.
    for s in end.summary["per_sensor"].as_array().unwrap() {
        assert!(u(&s["generated"]) > 60, "sensor {} generated only {}", s["sensor_id"], s["generated"]);
    }
    assert_eq!(u(&end.active["counted"]), u(&end.summary["generated"]));
}

#[test]
fn a_batch_at_the_reading_limit_is_served_and_one_past_it_refused() {
    let _serial = serial();
    let mut stage = Stage::start("huge-batch", &[("bulk", OTHER_RIGHTS)]).unwrap();
    let before = stage.status(true).unwrap();
    let mut rogue = stage.rogue("bulk", true).unwrap();
    let limit = MAX_READINGS_PER_BATCH as u64;
    let now = now_ms();
    let at_limit = batch(1, vec![sensor(9100, 5, ROGUE_SEGMENT, readings(0, limit, now))]);
    let asked = Instant::now();
    let reply = batch_reply(rogue.ask(&at_limit, REPLY_TIMEOUT).unwrap()).unwrap();
    eprintln!("[huge-batch] {limit} readings acked after {:?} ({} bytes)", asked.elapsed(), encode(&at_limit).unwrap().len());
    assert_eq!(reply.acks.len(), 1);
    assert_eq!(reply.acks[0].next_seq, limit, "every reading of the batch is acked: {:?}", reply.acks[0]);
    assert!(reply.refused.is_empty(), "{:?}", reply.refused);
    let past = batch(2, vec![sensor(9101, 5, ROGUE_SEGMENT, readings(0, limit + 1, now))]);
    let reply = rogue.ask(&past, REPLY_TIMEOUT).unwrap();
    assert_eq!(reply, Reply::Refused { batch_id: 0, reason: Refusal::TooLarge });
    let split = batch(3, vec![
        sensor(9102, 5, ROGUE_SEGMENT, readings(0, limit / 2, now)),
        sensor(9103, 5, ROGUE_SEGMENT, readings(0, limit / 2 + 1, now)),
    ]);
    let reply = rogue.ask(&split, REPLY_TIMEOUT).unwrap();
    assert_eq!(reply, Reply::Refused { batch_id: 0, reason: Refusal::TooLarge }, "the limit is per batch");
    // A batch whose list of sensors claims one more than the limit (the
    // bytes for them follow, all zeros): refused on the length, before
    // the server allocates for it or reads one of them.
    let mut bomb = encode(&batch(4, Vec::new())).unwrap();
    assert_eq!(bomb.pop(), Some(0), "an empty batch ends with its list's length");
    bomb.extend([0x81, 0x80, 0x04]); // 65 537 as a varint
    bomb.resize(bomb.len() + 5 * 65_537, 0);
    rogue.send_frames(vec![bomb]).unwrap();
    let reply = rogue.reply(REPLY_TIMEOUT).unwrap().expect("an answer to the bomb");
    assert_eq!(reply, Reply::Refused { batch_id: 0, reason: Refusal::TooLarge }, "a list past its bound");
    let end = stage.finish();
    let counts = server_counts(&end.active);
    assert_eq!(counts.get(&(9100, 5)).map(|c| c.0), Some(limit));
    assert!(!counts.keys().any(|(id, _)| [9101, 9102, 9103].contains(id)), "a refused batch was counted");
    assert_eq!(counter(&end.active, "too_large") - counter(&before, "too_large"), 3);
    assert_eq!(u(&end.active["counted"]), u(&end.summary["generated"]) + limit);
    assert_eq!(server_counts(&end.passive).get(&(9100, 5)).map(|c| c.0), Some(limit), "replicated");
}

/// The last value of `field=N` in a progress line of a server's log.
fn last_progress_field(proc: &Proc, field: &str) -> Option<u64> {
    let text = std::fs::read_to_string(&proc.log).ok()?;
    let needle = format!("{field}=");
    text.lines().rev().filter(|l| l.contains("progress")).find_map(|line| {
        let start = line.find(&needle)? + needle.len();
        line[start..].split(|c: char| !c.is_ascii_digit()).next()?.parse().ok()
    })
}

/// Sends `frames` on a raw libzmq socket that never reads, for at most
/// `within`; returns how many went out and the server's largest RSS seen.
fn flood(socket: &zmq::Socket, frames: &[Vec<u8>], within: Duration, server_pid: u32) -> (usize, f64) {
    let deadline = Instant::now() + within;
    let mut sent = 0;
    let mut max_rss: f64 = 0.0;
    while sent < frames.len() && Instant::now() < deadline {
        match socket.send(&frames[sent][..], zmq::DONTWAIT) {
            Ok(()) => sent += 1,
            Err(_) => std::thread::sleep(Duration::from_millis(2)),
        }
        if sent % 200 == 0 {
            max_rss = max_rss.max(rss_mib(server_pid).unwrap_or(0.0));
        }
    }
    (sent, max_rss)
}

#[test]
fn clients_that_never_read_their_replies_cannot_grow_the_server() {
    let _serial = serial();
    let stage = Stage::start("never-reads", &[("flood", OTHER_RIGHTS)]).unwrap();
    // Give the status a long per_sensor list first (a thousand incarnations
    // of the flood key's sensors), so that every status reply is tens of
    // KiB and the replies nobody reads overflow the buffers.
    let mut reader = stage.rogue("flood", true).unwrap();
    for incarnation in 1..=2u64 {
        let sensors = (9000..9500).map(|id| sensor(id, incarnation, ROGUE_SEGMENT, readings(0, 1, now_ms()))).collect();
        batch_reply(reader.ask(&batch(incarnation, sensors), REPLY_TIMEOUT).unwrap()).unwrap();
    }
    let pid = stage.primary.child.id();
    let rss_before = rss_mib(pid).unwrap_or(0.0);
    let ctx = ZmqContext::new();
    let (flood_keys, server) = stage.curve("flood", true).unwrap();
    let batches = fog_transport::connect(&ctx, SocketType::DEALER, &stage.pair.primary_frontend, Some((&flood_keys, &server)), &Limits::default()).unwrap();
    let admin = stage.keys.admin.pair.clone();
    let statuses = fog_transport::connect(&ctx, SocketType::DEALER, &stage.pair.primary_frontend, Some((&admin, &server)), &Limits::default()).unwrap();
    let batch_frames: Vec<Vec<u8>> = (0..3000u64)
        .map(|i| encode(&batch(1000 + i, vec![sensor(9999, 77, ROGUE_SEGMENT, readings(i * 10, 10, now_ms()))])).unwrap())
        .collect();
    let status_frame = encode(&Request::Status).unwrap();
    let status_frames = vec![status_frame; 3000];
    let (batches_sent, rss_a) = flood(&batches, &batch_frames, Duration::from_secs(3), pid);
    let (statuses_sent, rss_b) = flood(&statuses, &status_frames, Duration::from_secs(3), pid);
    let mut max_rss = rss_a.max(rss_b);
    let settle = Instant::now();
    while settle.elapsed() < Duration::from_secs(2) {
        max_rss = max_rss.max(rss_mib(pid).unwrap_or(0.0));
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!(
        "[never-reads] sent {batches_sent} batches and {statuses_sent} status requests without reading; primary RSS {rss_before:.0} MiB before, at most {max_rss:.0} MiB"
    );
    assert!(batches_sent >= 1000 && statuses_sent >= 1000, "the server stopped taking requests");
    assert!(max_rss < MAX_SERVER_RSS_MIB, "the primary grew to {max_rss:.0} MiB");
    // The replies that found no room were dropped and counted (the
    // progress line, every 5 s).
    let dropped = wait_for("replies_dropped > 0 on the primary's progress line", Duration::from_secs(8), || {
        last_progress_field(&stage.primary, "replies_dropped").filter(|&d| d > 0)
    })
    .unwrap_or_else(|e| panic!("{e:#}: no reply was dropped:\n{}", stage.primary.log_tail(10)));
    eprintln!("[never-reads] the primary's progress line shows replies_dropped={dropped}");
    let end = stage.finish();
    let flood_count = server_counts(&end.active).get(&(9999, 77)).map_or(0, |c| c.0);
    assert_eq!(flood_count, 10 * batches_sent as u64, "every batch sent was counted once, read or not");
    drop((batches, statuses));
}

#[test]
fn status_needs_the_admin_key() {
    let _serial = serial();
    let mut stage = Stage::start("status-rights", &[]).unwrap();
    let before = stage.status(true).unwrap();
    let host_auth = stage.keys.client_status("host", true).unwrap();
    let err = server_status_as(&stage.pair.primary_frontend, Some(&host_auth)).unwrap_err();
    eprintln!("[status-rights] fog-server status with the host's key: {err:#}");
    assert!(format!("{err:#}").contains("may not"), "the refusal says why: {err:#}");
    let mut host_key = stage.rogue("host", true).unwrap();
    assert_eq!(host_key.ask(&Request::Status, REPLY_TIMEOUT).unwrap(), Reply::Refused { batch_id: 0, reason: Refusal::NotAuthorized });
    let mut admin = Client::connect(&stage.pair.primary_frontend, Some((&stage.keys.admin.pair, &stage.keys.server_public(true)))).unwrap();
    let Reply::Status(report) = admin.ask(&Request::Status, REPLY_TIMEOUT).unwrap() else { panic!("the admin key got no status") };
    assert_eq!(report.role, "primary");
    // An admin key has no sensors: its batches are refused.
    let reply = admin.ask(&batch(5, vec![sensor(1, 1, 0, readings(0, 1, now_ms()))]), REPLY_TIMEOUT).unwrap();
    assert_eq!(reply, Reply::Refused { batch_id: 5, reason: Refusal::NotAuthorized });
    let end = stage.finish();
    let refused = counter(&end.active, "not_authorized") - counter(&before, "not_authorized");
    eprintln!("[status-rights] refused.not_authorized grew by {refused}");
    assert_eq!(refused, 3, "two status requests with a host key, one batch with the admin key");
}

#[test]
fn the_key_fixture_gives_a_pair_that_refuses_the_wrong_server_key() {
    // A host that trusts the wrong server key never gets in; with the right
    // ones the fixture's pair serves it (checked by every other test).
    let _serial = serial();
    let dir = scratch_dir("wrong-server-key").unwrap();
    let pair = Pair::on_free_ports().unwrap();
    let keys = PairKeys::generate(&dir, &[("host", HOST_RIGHTS)]).unwrap();
    let _primary = start_keyed_server(&pair, true, SERVER_FLAGS, &dir, &keys).unwrap();
    let impostor = Keypair::generate().unwrap();
    let mut rogue = Client::connect(&pair.primary_frontend, Some((&keys.client("host").unwrap().pair, &impostor.public))).unwrap();
    rogue.send(&batch(1, vec![sensor(1, 1, 0, readings(0, 1, now_ms()))])).unwrap();
    let saw = rogue.events(Duration::from_secs(2));
    assert!(!saw.iter().any(|e| e.starts_with("a message")), "a reply through the wrong server key: {saw:?}");
    let wrong = StatusAuth { key: keys.admin.secret.clone(), server_key: keys.backup.public.clone() };
    assert!(server_status_as(&pair.primary_frontend, Some(&wrong)).is_err(), "status through the backup's key");
    assert!(server_status_as(&pair.primary_frontend, None).is_err(), "status without a key");
    let status = server_status_as(&pair.primary_frontend, Some(&keys.admin_status(true))).unwrap();
    assert_eq!(u(&status["counted"]), 0);
}

/// The same attack with an admin key while the status is large: 40 000
/// sensor incarnations make every status reply about 800 KiB and take the
/// node about 17 ms to build. The server builds at most 20 reports a
/// second, and one per client per 200 ms; the rest get `Refused(Busy)`
/// (a few bytes), so the flood neither stalls the loop into a takeover nor
/// fills memory with queued reports.
#[test]
fn a_status_flood_with_a_long_sensor_list_neither_grows_nor_stalls_the_active() {
    let _serial = serial();
    let mut stage = Stage::start("status-flood", &[("flood", OTHER_RIGHTS)]).unwrap();
    let mut reader = stage.rogue("flood", true).unwrap();
    for incarnation in 1..=40u64 {
        let sensors = (9000..10000).map(|id| sensor(id, incarnation, ROGUE_SEGMENT, readings(0, 1, now_ms()))).collect();
        batch_reply(reader.ask(&batch(incarnation, sensors), REPLY_TIMEOUT).unwrap()).unwrap();
    }
    let epoch = u(&stage.status(true).unwrap()["epoch"]);
    let pid = stage.primary.child.id();
    let server = stage.keys.server_public(true);
    let ctx = ZmqContext::new();
    let admin = &stage.keys.admin.pair;
    let statuses = fog_transport::connect(&ctx, SocketType::DEALER, &stage.pair.primary_frontend, Some((admin, &server)), &Limits::default()).unwrap();
    let frames = vec![encode(&Request::Status).unwrap(); 2000];
    let (sent, rss) = flood(&statuses, &frames, Duration::from_secs(5), pid);
    let mut max_rss = rss;
    for _ in 0..50 {
        max_rss = max_rss.max(rss_mib(pid).unwrap_or(0.0));
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!("[status-flood] sent {sent} status requests without reading; primary RSS at most {max_rss:.0} MiB");
    assert!(max_rss < MAX_SERVER_RSS_MIB, "the primary grew to {max_rss:.0} MiB");
    let end = stage.finish();
    assert_eq!(end.active["role"], "primary", "the primary stayed active: {}", end.active);
    assert_eq!(u(&end.active["epoch"]), epoch, "no takeover");
    drop(statuses);
}
