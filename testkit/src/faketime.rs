//! A process's wall clock under a test's control, through libfaketime
//! (Debian's `faketime` package): the process is started with the library
//! preloaded, reading its offset from a file the test rewrites, so the
//! test can step the wall clock forward and back as NTP would, while the
//! monotonic clock (which libfaketime is told to leave alone) runs on.
//!
//! Without the library a test says it is skipped, unless
//! `FOG_REQUIRE_FAKETIME=1` (set by `.ci/run`) makes it fail.

use std::path::{Path, PathBuf};

use anyhow::Context;

/// Set to `1` where tests must not skip for want of libfaketime.
pub const REQUIRE_ENV: &str = "FOG_REQUIRE_FAKETIME";

const LIBRARY: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1";

/// One process's fake wall clock: an offset from the real one.
pub struct FakeWallClock {
    spec: PathBuf,
}

/// Why the library is not there, if it is not.
pub fn unavailable() -> Option<String> {
    (!Path::new(LIBRARY).exists()).then(|| format!("{LIBRARY} is missing (apt-get install faketime)"))
}

/// What a test does without libfaketime: says it is skipped (`Ok`), or
/// fails when [`REQUIRE_ENV`] says the library must be there.
pub fn skip_or_fail(test: &str, why: &str) -> anyhow::Result<()> {
    if std::env::var(REQUIRE_ENV).is_ok_and(|v| v == "1") {
        anyhow::bail!("{test}: libfaketime is required ({REQUIRE_ENV}=1) but unavailable: {why}");
    }
    eprintln!("[{test}] SKIPPED: {why}; {REQUIRE_ENV}=1 makes it fail instead");
    Ok(())
}

impl FakeWallClock {
    /// A clock at the real time, its offset kept in `dir/<name>.faketime`.
    pub fn new(dir: &Path, name: &str) -> anyhow::Result<FakeWallClock> {
        let clock = FakeWallClock { spec: dir.join(format!("{name}.faketime")) };
        clock.set_offset_s(0)?;
        Ok(clock)
    }

    /// The environment a process needs to run on this clock.
    pub fn env(&self) -> Vec<(String, String)> {
        vec![
            ("LD_PRELOAD".into(), LIBRARY.into()),
            ("FAKETIME_TIMESTAMP_FILE".into(), self.spec.display().to_string()),
            // Liveness runs on the monotonic clock: it must stay real.
            ("FAKETIME_DONT_FAKE_MONOTONIC".into(), "1".into()),
            // Read the file again at every call, so a step takes effect at once.
            ("FAKETIME_NO_CACHE".into(), "1".into()),
        ]
    }

    /// Sets the wall clock `seconds` away from the real one (negative:
    /// behind), from the process's next reading of it on.
    pub fn set_offset_s(&self, seconds: i64) -> anyhow::Result<()> {
        let spec = format!("{seconds:+}s\n");
        // Written beside and renamed over, so a reader never sees half a line.
        let tmp = self.spec.with_extension("tmp");
        std::fs::write(&tmp, spec).with_context(|| format!("cannot write {}", tmp.display()))?;
        std::fs::rename(&tmp, &self.spec).with_context(|| format!("cannot replace {}", self.spec.display()))
    }
}
