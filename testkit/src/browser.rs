//! A real headless browser for tests of the live page: Debian's
//! `chromium`, run once per look (`--dump-dom` for what the page shows
//! after its script has run, `--screenshot` for a picture), each run with a
//! fresh profile and killed if it takes too long.
//!
//! Without Chromium a test skips (says so, and passes), unless
//! `FOG_REQUIRE_CHROMIUM=1` (as `.ci/run` sets it), where it fails.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use anyhow::{Context, bail};

use crate::wait_for;

/// Longest one Chromium run may take before it is killed.
const RUN_TIMEOUT: Duration = Duration::from_secs(60);

/// Headless Chromium, with a directory for its profiles.
pub struct Browser {
    program: PathBuf,
    dir: PathBuf,
    runs: AtomicU32,
    /// Virtual time the page gets per look: its script's timers run that
    /// long (fetches pause it until they are answered).
    pub virtual_time_ms: u32,
}

impl Browser {
    /// Chromium, when it is installed; `Ok(None)` (after printing SKIPPED
    /// for `test`) when it is not and `FOG_REQUIRE_CHROMIUM` is not 1.
    pub fn find(test: &str, dir: &Path) -> anyhow::Result<Option<Browser>> {
        let found = ["chromium", "chromium-browser", "google-chrome"].into_iter().find_map(|name| {
            let out = Command::new(name).arg("--version").stdin(Stdio::null()).output().ok()?;
            out.status.success().then(|| PathBuf::from(name))
        });
        match found {
            Some(program) => Ok(Some(Browser { program, dir: dir.to_path_buf(), runs: AtomicU32::new(0), virtual_time_ms: 3000 })),
            None if std::env::var("FOG_REQUIRE_CHROMIUM").is_ok_and(|v| v == "1") => {
                bail!("{test}: FOG_REQUIRE_CHROMIUM=1 and no chromium on PATH (apt-get install chromium)")
            }
            None => {
                eprintln!("SKIPPED {test}: no chromium on PATH (apt-get install chromium; FOG_REQUIRE_CHROMIUM=1 makes this a failure)");
                Ok(None)
            }
        }
    }

    /// The page at `url` as the browser's DOM after its scripts ran for
    /// [`Browser::virtual_time_ms`], serialized as HTML.
    pub fn dump_dom(&self, url: &str) -> anyhow::Result<String> {
        let budget = format!("--virtual-time-budget={}", self.virtual_time_ms);
        let out = self.run(&[&budget, "--dump-dom", url])?;
        Ok(String::from_utf8_lossy(&out).into_owned())
    }

    /// A PNG of the page at `url`, `width` × `height`, written to `png`.
    pub fn screenshot(&self, url: &str, png: &Path, width: u32, height: u32) -> anyhow::Result<()> {
        let budget = format!("--virtual-time-budget={}", self.virtual_time_ms);
        let size = format!("--window-size={width},{height}");
        let target = format!("--screenshot={}", png.display());
        let _ = std::fs::remove_file(png);
        self.run(&[&budget, "--hide-scrollbars", &size, &target, url])?;
        let bytes = std::fs::read(png).with_context(|| format!("chromium wrote no screenshot to {}", png.display()))?;
        if !bytes.starts_with(b"\x89PNG\r\n\x1a\n") {
            bail!("{} is not a PNG", png.display());
        }
        Ok(())
    }

    /// One headless run with `args`; its stdout. Its stderr (Chromium is
    /// chatty about D-Bus and the like) goes to a log in the directory.
    fn run(&self, args: &[&str]) -> anyhow::Result<Vec<u8>> {
        let n = self.runs.fetch_add(1, Ordering::Relaxed);
        let profile = self.dir.join(format!("chromium-profile-{n}"));
        let log = self.dir.join(format!("chromium-{n}.log"));
        let stderr = std::fs::File::create(&log).with_context(|| format!("cannot create {}", log.display()))?;
        let mut child = Command::new(&self.program)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--disable-extensions",
            ])
            .arg(format!("--user-data-dir={}", profile.display()))
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .with_context(|| format!("cannot start {}", self.program.display()))?;
        let mut stdout = child.stdout.take().context("chromium's stdout")?;
        let reader = std::thread::spawn(move || {
            let mut bytes = Vec::new();
            let _ = std::io::Read::read_to_end(&mut stdout, &mut bytes);
            bytes
        });
        let exited = wait_for("chromium to finish", RUN_TIMEOUT, || child.try_wait().ok().flatten());
        if exited.is_err() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let out = reader.join().unwrap_or_default();
        let _ = std::fs::remove_dir_all(&profile);
        match exited {
            Ok(status) if status.success() => Ok(out),
            Ok(status) => bail!("chromium {args:?} failed ({status}); see {}", log.display()),
            Err(e) => bail!("{e}: killed; see {}", log.display()),
        }
    }
}

/// The attributes of the first start tag of `html` that contains `marker`
/// (e.g. `id="active-server"`), and the text up to the next tag; scripts
/// are not searched.
pub fn element<'a>(html: &'a str, marker: &str) -> Option<Element<'a>> {
    elements(html, marker).into_iter().next()
}

/// Every start tag of `html` that contains `marker`, as [`element`].
pub fn elements<'a>(html: &'a str, marker: &str) -> Vec<Element<'a>> {
    let mut found = Vec::new();
    let mut rest = without_scripts(html);
    while let Some(at) = rest.find(marker) {
        let Some(open) = rest[..at].rfind('<') else { break };
        let Some(close) = rest[at..].find('>').map(|c| at + c) else { break };
        let text_end = rest[close + 1..].find('<').map_or(rest.len(), |e| close + 1 + e);
        found.push(Element { tag: &rest[open..=close], text: &rest[close + 1..text_end] });
        rest = &rest[close + 1..];
    }
    found
}

/// `html` up to its first `<script`: the live page's script comes after
/// its markup, and its source names the same attributes.
fn without_scripts(html: &str) -> &str {
    html.find("<script").map_or(html, |at| &html[..at])
}

/// A start tag and the text right after it.
#[derive(Debug, Clone, Copy)]
pub struct Element<'a> {
    pub tag: &'a str,
    pub text: &'a str,
}

impl<'a> Element<'a> {
    /// The value of attribute `name` (as the DOM serializes it: in double quotes).
    pub fn attr(&self, name: &str) -> Option<&'a str> {
        let key = format!(" {name}=\"");
        let start = self.tag.find(&key)? + key.len();
        let len = self.tag[start..].find('"')?;
        Some(&self.tag[start..start + len])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn elements_and_attributes_are_found_outside_scripts() {
        let html = r#"<div><b id="active-server" data-active="backup">backup · http://x</b>
            <div class="server" data-server="primary" data-state="down"><span>DOWN</span></div>
            <div data-segment="0" data-average-kmh="97.5"></div><div data-segment="1" data-average-kmh=""></div></div>
            <script>el("div", { "data-segment": id })</script>"#;
        let active = element(html, "id=\"active-server\"").unwrap();
        assert_eq!(active.attr("data-active"), Some("backup"));
        assert_eq!(active.text, "backup · http://x");
        assert_eq!(element(html, "data-server=\"primary\"").unwrap().attr("data-state"), Some("down"));
        let segments = elements(html, "data-segment=");
        assert_eq!(segments.len(), 2, "the script's mention is not an element");
        assert_eq!(segments[0].attr("data-average-kmh"), Some("97.5"));
        assert_eq!(segments[1].attr("data-average-kmh"), Some(""));
        assert_eq!(segments[1].attr("data-limit-kmh"), None);
        assert!(element(html, "id=\"nothing\"").is_none());
    }
}
