//! Child processes that are killed when dropped, with their stderr in a log
//! file whose tail is printed when a test panics.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use anyhow::{Context, anyhow, bail};

use crate::wait_for;

/// A child process that is killed (SIGKILL) when dropped.
pub struct Proc {
    pub name: String,
    pub child: Child,
    /// Where its stderr goes: `<dir>/<name>.log`.
    pub log: PathBuf,
}

impl Proc {
    /// Starts `program` with `args`, stdin closed, stdout piped (see
    /// [`Proc::child`]) and stderr in `dir/<name>.log`; `RUST_LOG` is
    /// passed on (`info` when unset).
    pub fn spawn(name: &str, program: &Path, args: &[String], dir: &Path) -> anyhow::Result<Proc> {
        Proc::spawn_with_env(name, program, args, dir, &[])
    }

    /// [`Proc::spawn`] with more environment variables.
    pub fn spawn_with_env(name: &str, program: &Path, args: &[String], dir: &Path, env: &[(String, String)]) -> anyhow::Result<Proc> {
        let log = dir.join(format!("{name}.log"));
        let stderr = std::fs::File::create(&log).with_context(|| format!("cannot create {}", log.display()))?;
        let child = Command::new(program)
            .args(args)
            .envs(env.iter().map(|(k, v)| (k, v)))
            .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .with_context(|| format!("cannot start {}", program.display()))?;
        Ok(Proc { name: name.to_string(), child, log })
    }

    /// SIGKILL, as `kill -9` would, and waits for the process to end.
    pub fn kill(&mut self) -> anyhow::Result<()> {
        self.child.kill().with_context(|| format!("cannot kill {}", self.name))?;
        self.child.wait().with_context(|| format!("cannot wait for {} after killing it", self.name))?;
        Ok(())
    }

    /// Sends a signal by name (`HUP`, `TERM`, `STOP` ...), as `kill -s NAME`
    /// would.
    pub fn signal(&self, name: &str) -> anyhow::Result<()> {
        let status = Command::new("kill")
            .args(["-s", name, &self.child.id().to_string()])
            .status()
            .context("cannot run kill")?;
        if !status.success() {
            bail!("kill -s {name} {} ({}) failed", self.child.id(), self.name);
        }
        Ok(())
    }

    /// Waits until the process exits, at most `timeout`.
    pub fn wait_for_exit(&mut self, timeout: Duration) -> anyhow::Result<ExitStatus> {
        let what = format!("{} to exit", self.name);
        let mut failed = None;
        let exited = wait_for(&what, timeout, || match self.child.try_wait() {
            Ok(status) => status,
            Err(e) => {
                failed = Some(e);
                Some(ExitStatus::default())
            }
        });
        if let Some(e) = failed {
            return Err(e).with_context(|| format!("cannot wait for {}", self.name));
        }
        exited.map_err(|e| anyhow!("{e}; last lines of {}:\n{}", self.log.display(), self.log_tail(20)))
    }

    /// The last `lines` lines of its log (empty when there is none).
    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        // Best effort: a process that is gone already needs nothing.
        let _ = self.kill();
        if std::thread::panicking() {
            eprintln!("---- last lines of {} ({}) ----\n{}", self.name, self.log.display(), self.log_tail(40));
        }
    }
}

/// How many lines of a process's log (its [`Proc::log`]) contain every one
/// of `needles`.
pub fn log_lines_with(log: &Path, needles: &[&str]) -> usize {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter(|line| needles.iter().all(|n| line.contains(n)))
        .count()
}

/// Waits until a line of `log` contains every one of `needles`, at most
/// `timeout`.
pub fn wait_for_log_line(log: &Path, needles: &[&str], timeout: Duration) -> anyhow::Result<()> {
    let what = format!("a line with {needles:?} in {}", log.display());
    wait_for(&what, timeout, || (log_lines_with(log, needles) > 0).then_some(()))
}
