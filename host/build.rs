//! Builds the repository's sensor component (`sensor-wasm`, for
//! `wasm32-wasip2`) so that `cargo build` produces everything in one step.
//!
//! The inner cargo gets a target dir of its own under `OUT_DIR` (the outer
//! build holds the lock on the main one) and none of the flags inherited from
//! the outer build. The component is embedded into `fog-host` and also copied
//! next to the host binary as `fog_sensor.wasm`.

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let root = manifest_dir.parent().expect("host/ lives in the workspace root").to_path_buf();
    let out_dir = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let target_dir = out_dir.join("wasm-target");
    let cargo = env::var("CARGO").unwrap_or_else(|_| "cargo".into());

    for watched in ["wit", "sensor-wasm/src", "sensor-wasm/Cargo.toml"] {
        println!("cargo:rerun-if-changed={}", root.join(watched).display());
    }

    let mut cmd = Command::new(cargo);
    cmd.current_dir(&root)
        .args(["build", "--release", "--target", "wasm32-wasip2", "-p", "fog-sensor", "--target-dir"])
        .arg(&target_dir)
        // The outer build's flags (and target) are for the native host.
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_BUILD_TARGET")
        .env_remove("CARGO_TARGET_DIR")
        .env_remove("CARGO_PRIMARY_PACKAGE")
        // A small guest stack keeps each sensor to kilobytes of memory.
        .env("CARGO_ENCODED_RUSTFLAGS", "-Clink-arg=-zstack-size=65536")
        .env("CARGO_PROFILE_RELEASE_OPT_LEVEL", "s")
        .env("CARGO_PROFILE_RELEASE_LTO", "true")
        .env("CARGO_PROFILE_RELEASE_CODEGEN_UNITS", "1")
        .env("CARGO_PROFILE_RELEASE_PANIC", "abort")
        .env("CARGO_PROFILE_RELEASE_STRIP", "true")
        .env("CARGO_PROFILE_RELEASE_DEBUG", "false")
        .env("CARGO_PROFILE_RELEASE_INCREMENTAL", "false");
    let status = cmd.status().expect("cannot run cargo to build the sensor component");
    if !status.success() {
        panic!(
            "building the sensor component (sensor-wasm for wasm32-wasip2) failed; \
             if the error above says \"can't find crate for `std`\", run: rustup target add wasm32-wasip2"
        );
    }

    let built = target_dir.join("wasm32-wasip2/release/fog_sensor.wasm");
    emit_rerun_for_deps(&target_dir.join("wasm32-wasip2/release/fog_sensor.d"));
    let embedded = out_dir.join("fog_sensor.wasm");
    std::fs::copy(&built, &embedded).unwrap_or_else(|e| panic!("cannot copy {}: {e}", built.display()));
    println!("cargo:rustc-env=FOG_SENSOR_WASM={}", embedded.display());

    // OUT_DIR is <target>/<profile>/build/fog-host-<hash>/out: put a copy
    // beside the binaries, where users look for it.
    if let Some(profile_dir) = out_dir.ancestors().nth(3) {
        let _ = std::fs::copy(&built, profile_dir.join("fog_sensor.wasm"));
    }
}

/// Every source file the component was built from, as the inner cargo's
/// dep-info lists it.
fn emit_rerun_for_deps(dep_file: &Path) {
    let Ok(text) = std::fs::read_to_string(dep_file) else { return };
    let Some((_, deps)) = text.split_once(": ") else { return };
    for dep in deps.split_whitespace() {
        let dep = dep.trim_end_matches('\\');
        if !dep.is_empty() && !dep.contains("/.cargo/registry/") {
            println!("cargo:rerun-if-changed={dep}");
        }
    }
}
