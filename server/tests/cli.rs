//! Tests of the real `fog-server` binary: what an operator sees on bad
//! flags and errors, and what a client sees from a running node (malformed
//! frames dropped and counted, batches still served, `status --json`,
//! failover of a pair, clean shutdown on SIGTERM, counts that survive
//! `kill -9`, a corrupt log refused with its file and offset).

use std::net::TcpListener;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

// Ports come from the test kit: handed out once, claimed across
// test processes, outside the kernel's ephemeral range (see its docs).
use fog_testkit::free_port;
use fog_protocol::{Reading, Reply, Request, SensorBatch, decode, encode};

const BIN: &str = env!("CARGO_BIN_EXE_fog-server");

fn endpoint(port: u16) -> String {
    format!("tcp://127.0.0.1:{port}")
}

/// A fresh, empty data directory for one server of one test.
fn data_dir(name: &str) -> std::path::PathBuf {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    let dir = std::env::temp_dir().join(format!(
        "fog-server-cli-{name}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

/// A server process on free ports, killed on drop.
struct Server {
    child: Child,
    frontend: String,
}

struct Ports {
    frontend: u16,
    state_bind: u16,
    state_connect: u16,
}

impl Ports {
    fn free() -> Self {
        Ports {
            frontend: free_port().unwrap(),
            state_bind: free_port().unwrap(),
            state_connect: free_port().unwrap(),
        }
    }
}

impl Server {
    fn start(role: &str, ports: &Ports) -> Server {
        Server::start_in(role, ports, &data_dir(role.trim_start_matches('-')))
    }

    fn start_in(role: &str, ports: &Ports, dir: &std::path::Path) -> Server {
        let child = Command::new(BIN)
            .arg(role)
            .arg("--data-dir")
            .arg(dir)
            .args(["--frontend", &endpoint(ports.frontend)])
            .args(["--state-bind", &endpoint(ports.state_bind)])
            .args(["--state-connect", &endpoint(ports.state_connect)])
            .args(["--heartbeat", "50ms"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start fog-server");
        let server = Server {
            child,
            frontend: endpoint(ports.frontend),
        };
        server.wait_ready();
        server
    }

    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if status_cmd(&self.frontend).status.success() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "fog-server on {} did not answer status within 10 s",
            self.frontend
        );
    }

    fn status(&self) -> serde_json::Value {
        let out = status_cmd(&self.frontend);
        assert!(
            out.status.success(),
            "status failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8(out.stdout).expect("utf-8 stdout");
        assert_eq!(
            text.trim().lines().count(),
            1,
            "exactly one JSON line: {text}"
        );
        serde_json::from_str(&text).expect("status --json prints JSON")
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn status_cmd(endpoint: &str) -> Output {
    Command::new(BIN)
        .args(["status", endpoint, "--json", "--timeout", "500ms"])
        .output()
        .expect("run fog-server status")
}

fn run(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .output()
        .expect("run fog-server")
}

/// A client with one DEALER, as a host would have.
/// A stock libzmq DEALER (no keys: the test servers run on loopback).
struct Client {
    socket: fog_transport::Socket,
    _ctx: fog_transport::Context,
}

impl Client {
    async fn connect(endpoint: &str) -> Client {
        let ctx = fog_transport::Context::new();
        let dealer = fog_transport::connect(&ctx, fog_transport::SocketType::DEALER, endpoint, None, &fog_transport::Limits::default())
            .expect("connect a dealer");
        let socket = fog_transport::Socket::spawn("test-client", &ctx, dealer, false).expect("socket thread");
        Client { socket, _ctx: ctx }
    }

    async fn send_raw(&mut self, frames: Vec<Vec<u8>>) {
        self.socket.send(frames).expect("send");
    }

    async fn request(&mut self, request: &Request) -> Reply {
        self.send_raw(vec![encode(request).expect("encode")]).await;
        loop {
            let event = tokio::time::timeout(Duration::from_secs(5), self.socket.recv())
                .await
                .expect("a reply within 5 s")
                .expect("receive");
            if let fog_transport::Event::Message(m) = event {
                assert_eq!(m.frames.len(), 1, "a reply is one payload frame");
                return decode(&m.frames[0]).expect("decode the reply");
            }
        }
    }
}

fn batch(batch_id: u64, sensor_id: u32, seqs: std::ops::Range<u64>) -> Request {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_millis() as u64;
    Request::Batch {
        batch_id,
        epoch: 0,
        seal: [0; 16],
        sensors: vec![SensorBatch {
            sensor_id,
            incarnation: 77,
            segment: 0,
            readings: seqs
                .map(|seq| Reading {
                    seq,
                    speed_kmh: 90,
                    timestamp_ms: now,
                })
                .collect(),
            average_cursor: None,
        }],
    }
}

#[test]
fn bad_flags_exit_non_zero_with_a_message() {
    let out = run(&[]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--primary") && err.contains("--backup"),
        "{err}"
    );

    let out = run(&["--primary", "--backup"]);
    assert_eq!(out.status.code(), Some(2));

    let out = run(&["--primary", "--heartbeat", "soon"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--heartbeat"));

    let out = run(&["--primary", "--heartbeat", "0s"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).starts_with("error: --heartbeat"));

    let out = run(&["--primary", "--fsync", "sometimes"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--fsync") && err.contains("always, batch or never"), "{err}");

    let out = run(&["--primary", "--dedup-horizon", "5m", "--window-horizon", "10m"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.starts_with("error: --dedup-horizon (5m) must be at least --window-horizon (10m)"), "{err}");
}

#[test]
fn help_is_written_for_people() {
    let out = run(&["--help"]);
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--primary",
        "--backup",
        "--frontend",
        "--heartbeat",
        "--retain-averages",
        "--data-dir",
        "--fsync",
        "status",
    ] {
        assert!(help.contains(flag), "--help lacks {flag}");
    }
}

#[test]
fn status_of_a_missing_server_is_one_error_line() {
    let out = run(&["status", &endpoint(free_port().unwrap()), "--timeout", "300ms"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(
        err.starts_with("error: no answer from tcp://127.0.0.1:"),
        "{err}"
    );
    assert!(out.stdout.is_empty());
}

#[test]
fn an_address_in_use_is_one_error_line() {
    let taken = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = taken.local_addr().expect("addr").port();
    let dir = data_dir("in-use");
    let out = run(&[
        "--primary",
        "--data-dir",
        dir.to_str().expect("utf-8 temp dir"),
        "--frontend",
        &endpoint(port),
        "--state-bind",
        &endpoint(free_port().unwrap()),
    ]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(
        err.starts_with("error: cannot bind the frontend socket to tcp://127.0.0.1:"),
        "{err}"
    );
    assert_eq!(err.matches("in use").count(), 1, "the cause once: {err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_frame_is_counted_and_the_server_keeps_serving() {
    let server = Server::start("--primary", &Ports::free());
    let mut client = Client::connect(&server.frontend).await;

    client
        .send_raw(vec![b"\x01not postcard at all".to_vec()])
        .await;
    // The server answers nothing to it; the status shows it was counted.
    let deadline = Instant::now() + Duration::from_secs(5);
    let status = loop {
        let s = server.status();
        if s["malformed_frames"] == 1 || Instant::now() > deadline {
            break s;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(status["malformed_frames"], 1);
    let state = status["state"].as_str().unwrap_or_default();
    assert!(state == "primary" || state == "active", "state {state}");

    match client.request(&batch(1, 3, 0..5)).await {
        Reply::Batch(b) => {
            assert_eq!(b.batch_id, 1);
            assert_eq!(b.acks.len(), 1);
            assert_eq!(b.acks[0].next_seq, 5);
        }
        other => panic!("expected a batch reply, got {other:?}"),
    }
    // Resent: acked again, not counted again.
    assert!(matches!(
        client.request(&batch(2, 3, 0..5)).await,
        Reply::Batch(_)
    ));

    let status = server.status();
    assert_eq!(status["state"], "active");
    assert_eq!(status["counted"], 5);
    assert_eq!(status["duplicates"], 5);
    assert_eq!(status["malformed_frames"], 1);
    assert_eq!(status["per_sensor"][0]["sensor_id"], 3);
    assert_eq!(status["per_sensor"][0]["incarnation"], 77);
    assert_eq!(status["per_sensor"][0]["count"], 5);
    assert_eq!(status["per_sensor"][0]["sum_kmh"], 450);

    // The window holding those readings is published by the timer (its end
    // plus the 1 s lateness), and a sensor new to the server gets it at once.
    let deadline = Instant::now() + Duration::from_secs(5);
    while server.status()["averages_published"] == 0 {
        assert!(Instant::now() < deadline, "no average published within 5 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    match client.request(&batch(3, 4, 0..1)).await {
        Reply::Batch(b) => {
            assert_eq!(b.averages.len(), 1, "{b:?}");
            assert_eq!(b.averages[0].count, 5);
            assert_eq!(b.averages[0].sum_kmh, 450);
        }
        other => panic!("expected a batch reply, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_backup_takes_over_when_the_primary_dies() {
    let primary_ports = Ports::free();
    let backup_ports = Ports {
        frontend: free_port().unwrap(),
        state_bind: primary_ports.state_connect,
        state_connect: primary_ports.state_bind,
    };
    let primary = Server::start("--primary", &primary_ports);
    let backup = Server::start("--backup", &backup_ports);

    // The pair settles: primary active, backup passive.
    let deadline = Instant::now() + Duration::from_secs(10);
    while backup.status()["state"] != "passive" {
        assert!(Instant::now() < deadline, "backup never became passive");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut to_backup = Client::connect(&backup.frontend).await;
    let reply = to_backup.request(&batch(1, 1, 0..1)).await;
    assert!(matches!(reply, Reply::NotActive { .. }), "{reply:?}");

    drop(primary);
    // Two heartbeats (100 ms) of silence, then a client request fails over.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        tokio::time::sleep(Duration::from_millis(50)).await;
        match to_backup.request(&batch(2, 1, 0..3)).await {
            Reply::Batch(b) => {
                assert_eq!(b.acks[0].next_seq, 3);
                break;
            }
            Reply::NotActive { .. } => assert!(Instant::now() < deadline, "no failover"),
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(backup.status()["state"], "active");
    assert_eq!(backup.status()["counted"], 3);
}

#[cfg(unix)]
#[test]
fn sigterm_ends_the_server_cleanly() {
    let mut server = Server::start("--primary", &Ports::free());
    let pid = server.child.id().to_string();
    let killed = Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("run kill");
    assert!(killed.success());
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if let Some(status) = server.child.try_wait().expect("wait") {
            assert_eq!(status.code(), Some(0));
            break;
        }
        assert!(Instant::now() < deadline, "still running 5 s after SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acked_readings_survive_kill_9_and_a_restart() {
    let dir = data_dir("kill9");
    let ports = Ports::free();
    let mut server = Server::start_in("--primary", &ports, &dir);
    let mut client = Client::connect(&server.frontend).await;
    for (i, start) in (0..500u64).step_by(50).enumerate() {
        match client.request(&batch(i as u64 + 1, 9, start..start + 50)).await {
            Reply::Batch(b) => assert_eq!(b.acks[0].next_seq, start + 50),
            other => panic!("expected a batch reply, got {other:?}"),
        }
    }
    let before = server.status();
    assert_eq!(before["counted"], 500);
    server.child.kill().expect("kill -9");
    let _ = server.child.wait();
    drop(server);

    let server = Server::start_in("--primary", &ports, &dir);
    let after = server.status();
    assert_eq!(after["counted"], 500, "every acked reading is back: {after}");
    assert_eq!(after["per_sensor"], before["per_sensor"]);
    // Resent after the restart: acked, not counted again.
    let mut client = Client::connect(&server.frontend).await;
    match client.request(&batch(99, 9, 400..500)).await {
        Reply::Batch(b) => assert_eq!(b.acks[0].next_seq, 500),
        other => panic!("expected a batch reply, got {other:?}"),
    }
    let served = server.status();
    assert_eq!(served["counted"], 500);
    assert!(served["epoch"].as_u64() > before["epoch"].as_u64(), "serving again is a new epoch: {served}");
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_corrupt_in_the_middle_is_refused_with_its_file_and_offset() {
    let dir = data_dir("corrupt");
    let ports = Ports::free();
    let mut server = Server::start_in("--primary", &ports, &dir);
    let mut client = Client::connect(&server.frontend).await;
    for i in 0..5u64 {
        assert!(matches!(client.request(&batch(i + 1, 1, i * 10..i * 10 + 10)).await, Reply::Batch(_)));
    }
    server.child.kill().expect("kill -9");
    let _ = server.child.wait();
    drop(server);

    let wal = std::fs::read_dir(&dir)
        .expect("data dir")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("wal.")))
        .expect("a log file");
    let mut bytes = std::fs::read(&wal).expect("read the log");
    // The first record's payload: corrupt, with good records after it.
    bytes[10] ^= 0xff;
    std::fs::write(&wal, &bytes).expect("write the log");
    let out = run(&["--primary", "--data-dir", dir.to_str().expect("utf-8"), "--frontend", &endpoint(free_port().unwrap()), "--state-bind", &endpoint(free_port().unwrap())]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    let line = err.lines().find(|l| l.starts_with("error:")).unwrap_or_default();
    assert!(line.contains(&wal.display().to_string()) && line.contains("offset 0"), "{err}");

    // A torn tail instead (the last record cut short) is truncated and
    // logged; what it held was never acked.
    bytes[10] ^= 0xff;
    let last_counts = last_record_counts_readings(&bytes);
    bytes.truncate(bytes.len() - 3);
    std::fs::write(&wal, &bytes).expect("write the log");
    let log_path = dir.with_extension("log");
    let child = Command::new(BIN)
        .args(["--primary", "--data-dir", dir.to_str().expect("utf-8")])
        .args(["--frontend", &endpoint(ports.frontend), "--state-bind", &endpoint(ports.state_bind)])
        .args(["--state-connect", &endpoint(ports.state_connect)])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log_path).expect("log file"))
        .spawn()
        .expect("start fog-server");
    let server = Server { child, frontend: endpoint(ports.frontend) };
    server.wait_ready();
    let expected = if last_counts { 40 } else { 50 };
    assert_eq!(server.status()["counted"], expected, "everything before the torn record is back");
    drop(server);
    let log = std::fs::read_to_string(&log_path).unwrap_or_default();
    assert!(log.contains("torn write at the end of the log: truncated"), "{log}");
    let _ = std::fs::remove_file(&log_path);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Whether the last record of a log holds readings (rather than, say, a
/// publication of averages), read with the log's own framing.
fn last_record_counts_readings(log: &[u8]) -> bool {
    let mut at = 0;
    let mut last = None;
    while at + 8 <= log.len() {
        let len = u32::from_le_bytes([log[at], log[at + 1], log[at + 2], log[at + 3]]) as usize;
        last = Some(&log[at + 8..at + 8 + len]);
        at += 8 + len;
    }
    let entry: fog_protocol::LogEntry = decode(last.expect("a record")).expect("a log entry");
    matches!(entry.record, fog_protocol::Record::ReadingsAccepted { .. })
}
