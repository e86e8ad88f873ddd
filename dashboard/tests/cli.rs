//! `fog-dashboard` as a user and an attacker meet it: its help and flag
//! errors, the metrics endpoints it scrapes misbehaving (gone, silent,
//! too large, not metrics), and its own HTTP side refusing what it should
//! (other methods, huge headers, missing tokens, too many connections).
//! Every endpoint here is a real socket on loopback; the misbehaving ones
//! are small servers of the test's own.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use fog_testkit::{Proc, bin, free_port, scratch_dir, wait_for};
use serde_json::Value;

fn dashboard(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(bin("fog-dashboard").unwrap()).args(args).output().unwrap();
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// Starts the dashboard on a free loopback port with `args`; its address.
fn start(name: &str, args: &[&str], dir: &Path) -> (Proc, String) {
    let bind = format!("127.0.0.1:{}", free_port().unwrap());
    start_at(name, &bind, args, dir)
}

fn start_at(name: &str, bind: &str, args: &[&str], dir: &Path) -> (Proc, String) {
    let mut all = vec!["--bind".to_string(), bind.to_string()];
    all.extend(args.iter().map(|s| s.to_string()));
    let proc = Proc::spawn(name, &bin("fog-dashboard").unwrap(), &all, dir).unwrap();
    let addr = bind.replace("0.0.0.0", "127.0.0.1");
    wait_for("the dashboard to listen", Duration::from_secs(20), || TcpStream::connect(&addr).ok()).unwrap();
    (proc, addr)
}

/// One HTTP/1.1 request, raw; the status code and the whole response.
fn request(addr: &str, head: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    // A connection the dashboard closes at once may refuse the write: what was read tells.
    let _ = stream.write_all(head.as_bytes());
    let mut response = Vec::new();
    let _ = stream.read_to_end(&mut response);
    let text = String::from_utf8_lossy(&response).into_owned();
    let status = text.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    (status, text)
}

fn get(addr: &str, path: &str, extra: &str) -> (u16, String) {
    request(addr, &format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n{extra}\r\n"))
}

fn live(addr: &str) -> Value {
    let (status, text) = get(addr, "/api/live", "");
    assert_eq!(status, 200, "{text}");
    let body = &text[text.find("\r\n\r\n").unwrap() + 4..];
    serde_json::from_str(body).unwrap_or_else(|e| panic!("/api/live is not JSON ({e}): {body}"))
}

/// A metrics endpoint of the test's own that answers every request with
/// `respond` (given the stream, after the request head was read).
fn endpoint(respond: fn(&mut TcpStream)) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let mut stream = stream;
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") && head.len() < 65_536 && stream.read(&mut byte).unwrap_or(0) == 1 {
                    head.push(byte[0]);
                }
                respond(&mut stream);
            });
        }
    });
    url
}

fn ok(stream: &mut TcpStream, body: &str) {
    let _ = write!(stream, "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nContent-Type: text/plain\r\n\r\n{body}", body.len());
}

#[test]
fn help_explains_and_bad_flags_say_one_line() {
    let (code, stdout, _) = dashboard(&["--help"]);
    assert_eq!(code, 0);
    for needle in ["--server", "--host", "--bind", "--token-file", "/api/live", "DOWN", "127.0.0.1:8080", "http://127.0.0.1:9101"] {
        assert!(stdout.contains(needle), "--help does not mention {needle}:\n{stdout}");
    }
    for (args, needle) in [
        (vec!["--bogus"], "unexpected argument '--bogus'"),
        (vec!["--server", "127.0.0.1:9101"], "expected http://HOST:PORT"),
        (vec!["--host", "https://127.0.0.1:9100"], "only http:// is scraped"),
        (vec!["--bind", "nowhere"], "invalid value 'nowhere' for '--bind <ADDR>'"),
        (vec!["--bind", "0.0.0.0:8080"], "is beyond loopback: give --token-file"),
    ] {
        let (code, stdout, stderr) = dashboard(&args);
        assert_eq!(code, 2, "{args:?}: {stderr}");
        assert!(stdout.is_empty(), "{args:?}: {stdout}");
        assert_eq!(stderr.lines().count(), 1, "{args:?}: one line, not:\n{stderr}");
        assert!(stderr.starts_with("fog-dashboard: ") && stderr.contains(needle), "{args:?}: {stderr}");
    }
    let too_many: Vec<String> = (0..65).flat_map(|i| ["--host".to_string(), format!("http://127.0.0.1:{}", 10_000 + i)]).collect();
    let (code, _, stderr) = dashboard(&too_many.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(code, 2);
    assert!(stderr.contains("at most 64 --host endpoints"), "{stderr}");
}

#[test]
fn what_it_cannot_do_is_an_error_that_says_why() {
    let dir = scratch_dir("dashboard-errors").unwrap();
    let missing = dir.join("no-such-token");
    let (code, _, stderr) = dashboard(&["--bind", "127.0.0.1:0", "--token-file", missing.to_str().unwrap()]);
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("cannot read the token file") && stderr.contains("no-such-token"), "{stderr}");
    let empty = dir.join("empty-token");
    std::fs::write(&empty, "\n").unwrap();
    let (code, _, stderr) = dashboard(&["--bind", "127.0.0.1:0", "--token-file", empty.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(stderr.contains("is empty"), "{stderr}");
    std::fs::write(&empty, "short\n").unwrap();
    let (code, _, stderr) = dashboard(&["--bind", "127.0.0.1:0", "--token-file", empty.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(stderr.contains("is 5 characters: use at least 16"), "{stderr}");
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let (code, _, stderr) = dashboard(&["--bind", &addr]);
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains(&format!("cannot listen on {addr}")), "{stderr}");
}

#[test]
fn endpoints_that_misbehave_are_shown_down_with_the_reason() {
    let dir = scratch_dir("dashboard-scrapes").unwrap();
    let nothing = format!("http://127.0.0.1:{}", free_port().unwrap());
    let silent = endpoint(|stream| {
        let mut sink = [0u8; 64];
        let _ = stream.read(&mut sink);
    });
    let declared_huge = endpoint(|stream| {
        let _ = write!(stream, "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", 5 << 20);
        let _ = stream.write_all(&vec![b'#'; 5 << 20]);
    });
    let streamed_huge = endpoint(|stream| {
        let _ = stream.write_all(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n");
        let line = format!("# {}\n", "x".repeat(1000));
        for _ in 0..5_000 {
            if stream.write_all(line.as_bytes()).is_err() {
                return;
            }
        }
    });
    let not_metrics = endpoint(|stream| ok(stream, "fog_server_active yes\n"));
    let refused = endpoint(|stream| {
        let _ = stream.write_all(b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\n\r\n");
    });
    let host = endpoint(|stream| {
        ok(stream, "fog_host_sensors{state=\"running\"} 5\nfog_host_sensors{state=\"restarting\"} 1\nfog_host_sensors{state=\"quarantined\"} 2\nfog_host_connected 0\n")
    });
    let servers = [&nothing, &silent, &declared_huge, &streamed_huge, &not_metrics, &refused];
    let mut args = Vec::new();
    for server in servers {
        args.extend(["--server", server.as_str()]);
    }
    args.extend(["--host", host.as_str()]);
    let (_dashboard, addr) = start("dashboard", &args, &dir);
    let want = [
        "cannot connect",
        "no answer within 1s",
        "the response is larger than 4194304 bytes",
        "the response is larger than 4194304 bytes",
        "bad metrics: line 1: \"yes\" is not a number",
        "answered 401 Unauthorized",
    ];
    let state = wait_for("every server scraped once", Duration::from_secs(30), || {
        let state = live(&addr);
        let scraped = state["servers"].as_array()?.iter().all(|s| s["error"] != "not scraped yet") && state["hosts"][0]["up"] == true;
        scraped.then_some(state)
    })
    .unwrap();
    for (i, reason) in want.iter().enumerate() {
        let server = &state["servers"][i];
        assert_eq!(server["up"], false, "{server}");
        assert!(server["error"].as_str().unwrap_or("").contains(reason), "server {i}: want {reason:?}, got {server}");
    }
    let host = &state["hosts"][0];
    assert_eq!((host["running"].as_f64(), host["restarting"].as_f64(), host["quarantined"].as_f64()), (Some(5.0), Some(1.0), Some(2.0)), "{host}");
    assert_eq!(host["connected"], false);
    let sample = state["samples"].as_array().unwrap().last().unwrap();
    assert_eq!(sample["active"], Value::Null, "no server answered: none is active");
    assert_eq!(sample["up"], serde_json::json!([false, false, false, false, false, false]));
}

#[test]
fn its_http_side_is_bounded() {
    let dir = scratch_dir("dashboard-http").unwrap();
    let (_dashboard, addr) = start("dashboard", &["--server", "http://127.0.0.1:1", "--host", "http://127.0.0.1:1"], &dir);

    let (status, page) = get(&addr, "/", "");
    assert_eq!(status, 200, "{page}");
    assert!(page.contains("content-type: text/html; charset=utf-8"), "{page}");
    assert!(page.contains("content-security-policy: default-src 'none'"), "{page}");
    assert!(page.contains("id=\"active-server\""));
    assert_eq!(get(&addr, "/nothing", "").0, 404);
    assert_eq!(get(&addr, "/api/live?since=soon", "").0, 400);
    let (status, text) = request(&addr, &format!("POST /api/live HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"));
    assert_eq!(status, 405, "{text}");
    let (status, text) = get(&addr, "/", "Content-Length: 5\r\n");
    assert_eq!(status, 400, "a GET with a body: {text}");
    let (status, _) = get(&addr, "/", &format!("X-Big: {}\r\n", "a".repeat(10_000)));
    assert_eq!(status, 431, "headers over 8 KiB");
    let many: String = (0..60).map(|i| format!("X-{i}: a\r\n")).collect();
    assert_eq!(get(&addr, "/", &many).0, 431, "more than 48 headers");
    // A client that sends nothing is cut off (after the 5 s header timeout).
    let mut idle = TcpStream::connect(&addr).unwrap();
    idle.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let mut buf = [0u8; 16];
    assert_eq!(idle.read(&mut buf).unwrap_or(0), 0, "an idle connection is closed");
}

#[test]
fn at_most_32_connections_at_once() {
    let dir = scratch_dir("dashboard-connections").unwrap();
    let (_dashboard, addr) = start("dashboard", &["--server", "http://127.0.0.1:1", "--host", "http://127.0.0.1:1"], &dir);
    // Held connections are closed after the 5 s header timeout, and a
    // connection that just ended (the probe that saw the dashboard listen)
    // may still hold its place for a moment; a run where either got in the
    // way says so and tries again.
    for attempt in 1..=5 {
        wait_for("the dashboard to serve", Duration::from_secs(30), || (get(&addr, "/", "").0 == 200).then_some(())).unwrap();
        // Every one of them is being served: each answers a request.
        let held: Vec<Option<TcpStream>> = (0..32).map(|_| served_connection(&addr)).collect();
        let Some(mut held) = held.into_iter().collect::<Option<Vec<TcpStream>>>() else {
            eprintln!("attempt {attempt}: not all of 32 connections were served (one still held by a connection that had ended); again");
            continue;
        };
        let (status, _) = get(&addr, "/", "");
        let still_held = held.iter_mut().all(|s| {
            let _ = s.set_nonblocking(true);
            let mut buf = [0u8; 1];
            matches!(s.read(&mut buf), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
        });
        if still_held {
            assert_eq!(status, 0, "the 33rd connection was served while 32 were open");
            for s in &held {
                let _ = s.shutdown(Shutdown::Both);
            }
            drop(held);
            wait_for("a connection to be served again", Duration::from_secs(30), || (get(&addr, "/", "").0 == 200).then_some(())).unwrap();
            return;
        }
        eprintln!("attempt {attempt}: held connections timed out before the 33rd was tried; again");
    }
    panic!("could not hold 32 connections open long enough to try a 33rd");
}

/// A keep-alive connection that has been answered once (so the dashboard
/// serves it), or `None` when it was closed instead.
fn served_connection(addr: &str) -> Option<TcpStream> {
    let mut s = TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(30))).ok()?;
    s.write_all(format!("GET /nothing HTTP/1.1\r\nHost: {addr}\r\n\r\n").as_bytes()).ok()?;
    let mut head = [0u8; 12];
    s.read_exact(&mut head).ok()?;
    assert_eq!(&head, b"HTTP/1.1 404");
    // The rest of the answer (a short body), so that nothing is left to read.
    let mut rest = [0u8; 4096];
    let mut seen = Vec::new();
    while !String::from_utf8_lossy(&seen).contains("/api/live\n") {
        let n = s.read(&mut rest).ok()?;
        if n == 0 {
            return None;
        }
        seen.extend_from_slice(&rest[..n]);
    }
    Some(s)
}

#[test]
fn beyond_loopback_every_request_needs_the_token() {
    let dir = scratch_dir("dashboard-token").unwrap();
    let token_file = dir.join("token");
    std::fs::write(&token_file, "s3cret-token-0123456789\n").unwrap();
    let bind = format!("0.0.0.0:{}", free_port().unwrap());
    let (_dashboard, addr) =
        start_at("dashboard", &bind, &["--token-file", token_file.to_str().unwrap(), "--server", "http://127.0.0.1:1", "--host", "http://127.0.0.1:1"], &dir);
    let (status, text) = get(&addr, "/", "");
    assert_eq!(status, 401, "{text}");
    assert!(text.contains("www-authenticate: Bearer"), "{text}");
    assert_eq!(get(&addr, "/api/live", "Authorization: Bearer wrong-token\r\n").0, 401);
    assert_eq!(get(&addr, "/api/live?token=s3cret-token-012345678", "").0, 401);
    assert_eq!(get(&addr, "/", "Authorization: Bearer s3cret-token-0123456789\r\n").0, 200);
    assert_eq!(get(&addr, "/api/live", "Authorization: Bearer s3cret-token-0123456789\r\n").0, 200);
    assert_eq!(get(&addr, "/?token=s3cret-token-0123456789", "").0, 200, "the page's URL may carry it");
    assert_eq!(get(&addr, "/api/live?since=0&token=s3cret-token-0123456789", "").0, 200);
}
