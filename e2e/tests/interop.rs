//! Interop with a stock libzmq peer: `interop.py` (pyzmq, libzmq's own
//! CurveZMQ) sends a batch to a keyed `fog-server` with a host key and gets
//! it acked; with a key the server does not list, or trusting another
//! server's key, it gets no reply at all.
//!
//! The request is encoded here with `fog_protocol::encode` (the payload is
//! postcard) and handed to the script as a file; the script writes the
//! reply frame to a file that is decoded here.
//!
//! Without pyzmq (`python3 -c 'import zmq'` fails) the test fails when the
//! `CI` environment variable is set and is skipped, saying so, otherwise.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use fog_testkit::{Pair, PairKeys, scratch_dir, server_status_as, start_keyed_server};
use fog_protocol::{Reading, Reply, Request, SensorBatch, decode, encode};
use fog_testkit::rogue::now_ms;

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/interop.py");

/// Whether pyzmq can be imported; `None` with the reason when it cannot.
fn pyzmq_missing() -> Option<String> {
    match Command::new("python3").args(["-c", "import zmq; assert zmq.has('curve')"]).output() {
        Ok(out) if out.status.success() => None,
        Ok(out) => Some(String::from_utf8_lossy(&out.stderr).trim().lines().last().unwrap_or("").to_string()),
        Err(e) => Some(format!("cannot run python3: {e}")),
    }
}

/// Runs the script; returns its exit code and stdout.
fn run_script(endpoint: &str, server_pub: &Path, client_secret: &Path, request: &Path, reply: &Path, timeout: Duration) -> (i32, String) {
    let out = Command::new("python3")
        .arg(SCRIPT)
        .args(["--endpoint", endpoint])
        .arg("--server-key")
        .arg(server_pub)
        .arg("--client-key")
        .arg(client_secret)
        .arg("--request")
        .arg(request)
        .arg("--reply")
        .arg(reply)
        .args(["--timeout-ms", &timeout.as_millis().to_string()])
        .output()
        .expect("python3 runs");
    let stdout = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
    eprintln!("[interop] interop.py: exit {:?}; {stdout} {stderr}", out.status.code());
    (out.status.code().unwrap_or(-1), stdout)
}

#[test]
fn a_stock_libzmq_peer_with_a_host_key_gets_its_batch_acked_and_a_stranger_gets_nothing() {
    if let Some(why) = pyzmq_missing() {
        if std::env::var_os("CI").is_some() {
            panic!("pyzmq is required in CI (pip install pyzmq): {why}");
        }
        eprintln!("SKIPPED interop (a stock libzmq peer): pyzmq is not installed ({why}); `pip install pyzmq` to run this test");
        return;
    }
    let dir = scratch_dir("interop").unwrap();
    let pair = Pair::on_free_ports().unwrap();
    let keys = PairKeys::generate(&dir, &[("host", "sensors=1-20")]).unwrap();
    // A key no authorized-keys file lists.
    let (stranger_secret, _) = fog_transport::Keypair::generate().unwrap().write(&dir.join("stranger")).unwrap();
    let flags = ["--lateness", "200ms"];
    let _primary = start_keyed_server(&pair, true, &flags, &dir, &keys).unwrap();
    let _backup = start_keyed_server(&pair, false, &flags, &dir, &keys).unwrap();

    let incarnation = 0x1e7_0b0e;
    let request = Request::Batch {
        batch_id: 42,
        epoch: 0,
        seal: [0; 16],
        sensors: vec![SensorBatch {
            sensor_id: 3,
            incarnation,
            segment: 0,
            readings: (0..5).map(|seq| Reading { seq, speed_kmh: 70 + seq as u16, timestamp_ms: now_ms() }).collect(),
            average_cursor: None,
        }],
    };
    let request_file = dir.join("request.bin");
    std::fs::write(&request_file, encode(&request).unwrap()).unwrap();
    let reply_file = dir.join("reply.bin");
    let host = keys.client("host").unwrap();

    // The primary answers the stock peer.
    let (code, stdout) = run_script(&pair.primary_frontend, &keys.primary.public, &host.secret, &request_file, &reply_file, Duration::from_secs(10));
    assert_eq!(code, 0, "no reply to the stock libzmq peer: {stdout}");
    assert!(stdout.starts_with("reply: "), "{stdout}");
    let frame = std::fs::read(&reply_file).unwrap();
    let Reply::Batch(reply) = decode::<Reply>(&frame).unwrap() else { panic!("not a batch reply") };
    assert_eq!(reply.batch_id, 42);
    assert_eq!(reply.acks.len(), 1, "{reply:?}");
    assert_eq!((reply.acks[0].sensor_id, reply.acks[0].incarnation, reply.acks[0].next_seq), (3, incarnation, 5));
    assert!(reply.refused.is_empty(), "{reply:?}");
    let status = server_status_as(&pair.primary_frontend, Some(&keys.admin_status(true))).unwrap();
    let counted = fog_testkit::server_counts(&status);
    assert_eq!(counted.get(&(3, incarnation)), Some(&(5, 70 + 71 + 72 + 73 + 74)), "{status}");

    // A key no server lists, and the host's key trusting the backup's key
    // at the primary's address: no reply, nothing counted.
    let no_reply: [(&str, &PathBuf, &PathBuf); 2] = [
        ("an unlisted key", &keys.primary.public, &stranger_secret),
        ("the wrong server key", &keys.backup.public, &host.secret),
    ];
    for (what, server_pub, client_secret) in no_reply {
        let _ = std::fs::remove_file(&reply_file);
        let (code, stdout) = run_script(&pair.primary_frontend, server_pub, client_secret, &request_file, &reply_file, Duration::from_secs(2));
        assert_eq!(code, 3, "{what}: expected no reply: {stdout}");
        assert!(!reply_file.exists(), "{what}: a reply was written");
    }
    let after = server_status_as(&pair.primary_frontend, Some(&keys.admin_status(true))).unwrap();
    assert_eq!(after["counted"], status["counted"], "nothing more was counted");
}
