//! The sensors written in other languages (`sensors/python`, `sensors/js`),
//! as components `scripts/build-sensors` builds into the target directory's
//! `sensors/` (the test command runs it first).
//!
//! Without them (no python3, node or network to install their toolchains)
//! a test says it is skipped, unless `FOG_REQUIRE_SENSORS=1` (set by
//! `.ci/run`) makes it fail; a component older than its sources or the WIT
//! is refused with the command that rebuilds it.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use anyhow::{Context, bail};

/// Set to `1` where tests must not skip for want of these components.
pub const REQUIRE_ENV: &str = "FOG_REQUIRE_SENSORS";

/// The component of the sensor in `sensors/<language>` (`python`, `js`):
/// `Ok(None)` when it is not built and may be skipped (said on stderr).
pub fn sensor_component(test: &str, language: &str) -> anyhow::Result<Option<PathBuf>> {
    let exe = std::env::current_exe().context("cannot tell where the target directory is")?;
    // target/<profile>/deps/<test> -> target
    let target = exe.ancestors().nth(3).context("a test runs from target/<profile>/deps")?;
    let component = target.join("sensors").join(format!("{language}-sensor.wasm"));
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).parent().context("the kit lives in the workspace")?;
    if !component.exists() {
        let why = format!("{} is not built (scripts/build-sensors builds it)", component.display());
        if std::env::var(REQUIRE_ENV).is_ok_and(|v| v == "1") {
            bail!("{test}: the {language} sensor is required ({REQUIRE_ENV}=1): {why}");
        }
        eprintln!("[{test}] SKIPPED: {why}; {REQUIRE_ENV}=1 makes it fail instead");
        return Ok(None);
    }
    let built = std::fs::metadata(&component)?.modified()?;
    for source in [workspace.join("sensors").join(language), workspace.join("wit")] {
        if let Some(newer) = newer_than(&source, built) {
            bail!("{} is older than {}: run scripts/build-sensors", component.display(), newer.display());
        }
    }
    Ok(Some(component))
}

/// A file at or below `path` modified after `built`, if any.
fn newer_than(path: &Path, built: SystemTime) -> Option<PathBuf> {
    let meta = std::fs::metadata(path).ok()?;
    if !meta.is_dir() {
        return meta.modified().ok().filter(|m| *m > built).map(|_| path.to_path_buf());
    }
    std::fs::read_dir(path).ok()?.flatten().find_map(|entry| newer_than(&entry.path(), built))
}
