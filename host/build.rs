//! Builds the repository's sensor components (the built-in sensor from
//! `sensor-wasm`, and the ones under `sensors/`) so that `cargo build`
//! produces everything in one step.
//!
//! Each is compiled for `wasm32-unknown-unknown` into a core module and made
//! a component here with `wit-component`, from the world that wit-bindgen
//! embedded in it. A `wasm32-wasip2` build would import WASI for the
//! standard library's own use (stdio, environment, exit) although the
//! sensors do no I/O: their clock, seed and configuration are WIT imports.
//! Without WASI a component is smaller, imports nothing the host must make
//! per sensor, and is one core module with one memory and one table plus
//! the two tiny modules wit-component adds to lower `sensor-config` (which
//! needs the module's own memory and allocator).
//!
//! The inner cargo gets a target dir of its own under `OUT_DIR` (the outer
//! build holds the lock on the main one) and none of the flags inherited from
//! the outer build. The built-in sensor is embedded into `fog-host`; every
//! component is also copied next to the host binary (`fog_sensor.wasm`,
//! `fog_scenario_sensor.wasm`, `fog_faulty_sensor.wasm`).

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

/// What the sensors are compiled for: see the top of this file.
const TARGET: &str = "wasm32-unknown-unknown";

/// The components built: (package, file stem). The first is the built-in
/// sensor, embedded into `fog-host`; the others are copied beside it.
const COMPONENTS: [(&str, &str); 3] = [
    ("fog-sensor", "fog_sensor"),
    // A second sensor, run by passing its path: proof that the logic is a file.
    ("fog-scenario-sensor", "fog_scenario_sensor"),
    // Misbehaves on purpose, for the isolation tests.
    ("fog-faulty-sensor", "fog_faulty_sensor"),
];

fn main() {
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let root = manifest_dir.parent().expect("host/ lives in the workspace root").to_path_buf();
    let out_dir = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let target_dir = out_dir.join("wasm-target");

    // The Rust sensors only: sensors/python and sensors/js are built by
    // scripts/build-sensors.
    for watched in ["wit", "sensor-wasm/src", "sensor-wasm/Cargo.toml", "sensors/scenario", "sensors/faulty"] {
        println!("cargo:rerun-if-changed={}", root.join(watched).display());
    }

    // OUT_DIR is <target>/<profile>/build/fog-host-<hash>/out: copies go
    // beside the binaries, where users (and the tests) look for them.
    let profile_dir = out_dir.ancestors().nth(3).map(Path::to_path_buf);
    for (package, stem) in COMPONENTS {
        // One cargo run per component: they would otherwise share one
        // feature set of fog-sensor, and only the built-in sensor may
        // export the world from it.
        build_module(&root, &target_dir, package);
        let module = target_dir.join(format!("{TARGET}/release/{stem}.wasm"));
        emit_rerun_for_deps(&target_dir.join(format!("{TARGET}/release/{stem}.d")));
        let component = out_dir.join(format!("{stem}.wasm"));
        make_component(&module, &component);
        if package == "fog-sensor" {
            println!("cargo:rustc-env=FOG_SENSOR_WASM={}", component.display());
        }
        if let Some(dir) = &profile_dir {
            let _ = std::fs::copy(&component, dir.join(format!("{stem}.wasm")));
        }
    }
}

/// Compiles `package` into a core module.
fn build_module(root: &Path, target_dir: &Path, package: &str) {
    let cargo = env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(root)
        .args(["build", "--release", "--target", TARGET, "-p", package, "--target-dir"])
        .arg(target_dir)
        // The outer build's flags (and target) are for the native host.
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_BUILD_TARGET")
        .env_remove("CARGO_TARGET_DIR")
        .env_remove("CARGO_PRIMARY_PACKAGE")
        // A small guest stack keeps each sensor to kilobytes of memory; the
        // sensors' calls are shallow (under 1 KiB) and their buffers live on
        // the heap. The stack comes first in memory and grows down from its
        // size, where the data starts; 30 KiB rather than 32 puts its top
        // 2 KiB in the page where the data starts, and the heap follows the
        // data: the built-in sensor's stack, data (3.5 KiB) and heap then take
        // two pages of memory, not three.
        .env("CARGO_ENCODED_RUSTFLAGS", "-Clink-arg=-zstack-size=30720")
        .env("CARGO_PROFILE_RELEASE_OPT_LEVEL", "s")
        .env("CARGO_PROFILE_RELEASE_LTO", "true")
        .env("CARGO_PROFILE_RELEASE_CODEGEN_UNITS", "1")
        .env("CARGO_PROFILE_RELEASE_PANIC", "abort")
        .env("CARGO_PROFILE_RELEASE_STRIP", "true")
        .env("CARGO_PROFILE_RELEASE_DEBUG", "false")
        .env("CARGO_PROFILE_RELEASE_INCREMENTAL", "false");
    let status = cmd.status().unwrap_or_else(|e| panic!("cannot run cargo to build {package}: {e}"));
    if !status.success() {
        panic!(
            "building the sensor component {package} for {TARGET} failed; \
             if the error above says \"can't find crate for `std`\", run: rustup target add {TARGET}"
        );
    }
}

/// Wraps the core module at `module` into a component at `component`: its
/// imports and exports are lifted and lowered per the WIT world that
/// wit-bindgen left in its `component-type` section.
fn make_component(module: &Path, component: &Path) {
    let bytes = std::fs::read(module).unwrap_or_else(|e| panic!("cannot read {}: {e}", module.display()));
    let encoded = wit_component::ComponentEncoder::default()
        .module(&bytes)
        .and_then(|encoder| encoder.validate(true).encode())
        .unwrap_or_else(|e| panic!("cannot make a component of {}: {e:#}", module.display()));
    std::fs::write(component, encoded).unwrap_or_else(|e| panic!("cannot write {}: {e}", component.display()));
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
