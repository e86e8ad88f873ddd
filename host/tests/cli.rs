//! What a user sees from `fog-host` when the input is wrong: one clear line
//! on stderr and a non-zero exit code, before any connection is made.

use std::path::PathBuf;
use std::process::{Command, Output};

fn host(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_fog-host"))
        .args(args)
        .env("RUST_LOG", "off")
        .output()
        .expect("run fog-host")
}

fn write_temp(name: &str, bytes: &[u8]) -> PathBuf {
    let path = std::env::temp_dir().join(format!("fog-host-cli-{}-{name}", std::process::id()));
    std::fs::write(&path, bytes).expect("write temp file");
    path
}

fn assert_one_line_error(out: &Output, needle: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "exit code; stderr: {stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "one line expected, got: {stderr}");
    assert!(stderr.starts_with("error: "), "{stderr}");
    assert!(stderr.contains(needle), "expected `{needle}` in: {stderr}");
}

#[test]
fn missing_component_file() {
    let out = host(&["/nonexistent/sensor.wasm"]);
    assert_one_line_error(&out, "cannot read component /nonexistent/sensor.wasm");
}

#[test]
fn file_that_is_not_webassembly() {
    let path = write_temp("text.wasm", b"hello, not wasm\n");
    let out = host(&[path.to_str().unwrap()]);
    assert_one_line_error(&out, "is not a WebAssembly file");
}

#[test]
fn core_module_instead_of_component() {
    let path = write_temp("module.wasm", b"\0asm\x01\0\0\0");
    let out = host(&[path.to_str().unwrap()]);
    assert_one_line_error(&out, "is a core WebAssembly module, not a component");
}

#[test]
fn component_of_another_world() {
    // The smallest valid component: it exports nothing.
    let path = write_temp("empty-component.wasm", b"\0asm\x0d\0\x01\0");
    let out = host(&[path.to_str().unwrap()]);
    assert_one_line_error(&out, "does not implement the world fog:sensor/sensor@0.4.0");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("init"), "names what is missing: {stderr}");
}

#[test]
fn bad_flags_exit_with_usage_error() {
    let out = host(&["--sensors", "many"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--sensors"));
    let out = host(&["--interval", "soon"]);
    assert_eq!(out.status.code(), Some(2));
    let out = host(&["--threads", "0"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--threads"));
    let out = host(&["--servers", "not-an-endpoint", "--duration", "1s"]);
    assert_one_line_error(&out, "bad server endpoint `not-an-endpoint`");
    // Durations of ages would overflow the host's clocks.
    for flag in ["--interval", "--duration", "--timeout", "--progress", "--visit-every"] {
        let out = host(&[flag, "400000000000y"]);
        assert_eq!(out.status.code(), Some(2), "{flag}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(flag) && stderr.contains("at most 100 years"), "{stderr}");
    }
}

#[test]
fn help_explains_the_common_flags() {
    let out = host(&["--help"]);
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in ["--sensors", "--servers", "--interval", "--timeout", "--duration", "--json"] {
        assert!(help.contains(flag), "--help lacks {flag}");
    }
    assert!(help.contains("lost"), "--help says what is lost without a state directory");
}

#[test]
fn key_flags_are_checked_before_anything_starts() {
    let dir = std::env::temp_dir().join(format!("fog-host-cli-keys-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("dir");
    let secret = dir.join("host.secret");
    std::fs::write(&secret, "public-key = \"x\"\n").expect("write");
    // A Z85 key may start with '-': it is taken as a value, and here the
    // secret file is what is wrong.
    let out = host(&["--key", secret.to_str().unwrap(), "--server-keys", "-a3f0000000000000000000000000000000000000"]);
    assert_one_line_error(&out, "readable by its owner only");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let out = host(&["--key", secret.to_str().unwrap(), "--server-keys", "k1"]);
    assert_one_line_error(&out, "not a CurveZMQ key");
    let out = host(&["--key", secret.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2), "--key needs --server-keys");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_resend_timeout_shorter_than_two_visits_is_warned_about() {
    let run = |resend_after: &str| {
        let out = Command::new(env!("CARGO_BIN_EXE_fog-host"))
            .args(["--sensors", "1", "--interval", "100ms", "--visit-every", "1s", "--resend-after", resend_after])
            .args(["--duration", "10ms", "--drain-timeout", "10ms", "--servers", "tcp://127.0.0.1:9", "--metrics-bind", "off", "--quiet"])
            .env("RUST_LOG", "warn")
            .output()
            .expect("run fog-host");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let short = run("1s");
    assert!(short.contains("--resend-after 1s is shorter than two visits") && short.contains("consider --resend-after 3s"), "{short}");
    let long = run("3s");
    assert!(!long.contains("shorter than two visits"), "{long}");
}
