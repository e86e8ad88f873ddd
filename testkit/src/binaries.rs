//! Workspace binaries built from the current source.
//!
//! Tests, `fog-bench` and `fog-verify` start `fog-server` and `fog-host`
//! from the target directory they were built in. Building a test does not
//! build those binaries (`cargo test -p fog-e2e` compiles the tests, and
//! the e2e package does not depend on the server or the host), so the
//! binary found there can be older than the source. [`bin`] refuses such a
//! binary, and a missing one, with a one-line error that names it, the
//! source file that changed after it was built, and the build to run.
//!
//! Which files a binary is built from comes from the dep-info file cargo
//! writes beside it at every build (`target/<profile>/<name>.d`): the
//! sources of its package and of the workspace crates it uses, and what
//! their build scripts watch (fog-host's: `wit/`, `sensor-wasm/`,
//! `sensors/`). A change to any of them makes cargo rebuild the binary, so
//! the build the error names always cures it, and a change elsewhere in the
//! workspace (a benchmark's source) does not count. Without a dep-info file
//! (a binary cargo did not put there) every source of the workspace
//! counts: each crate's `src/`, the `Cargo.toml`s, `Cargo.lock`, `wit/` and
//! `sensors/`; the next build writes the dep-info file. Sensor components
//! (`*.wasm`) are built and copied beside the binaries by fog-host's build
//! script, so they are current when fog-host is.
//!
//! A stale binary is not rebuilt from here. A `cargo build` started by a
//! running test does not wait on the target directory's lock (cargo
//! releases it before it runs the tests), but rebuilding fog-host takes
//! minutes on a small machine, within one test's time and beside its
//! processes, and a benchmark or the verifier must not compile anything;
//! the error says what to run instead.

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::SystemTime;

/// Why a workspace binary cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum BinError {
    #[error("cannot tell where the workspace binaries are: {0}")]
    NoExe(io::Error),
    #[error("{name} is not in {}: run `{build}`", dir.display())]
    Missing { name: String, dir: PathBuf, build: String },
    #[error("{} is older than {}, which changed after it was built: run `{build}`", binary.display(), changed.display())]
    Stale { binary: PathBuf, changed: PathBuf, build: String },
    #[error("{} was built from {}, which is gone: run `{build}`", binary.display(), gone.display())]
    SourceGone { binary: PathBuf, gone: PathBuf, build: String },
    #[error("cannot read {}: {error}", path.display())]
    Unreadable { path: PathBuf, error: io::Error },
}

/// Path of a workspace binary (or sensor component) built from the current
/// source, from the target directory of the running program: a test
/// (`target/<profile>/deps/<test>`) or a binary (`target/<profile>/<bin>`).
/// See the [module docs](self) for what "current" means.
pub fn bin(name: &str) -> Result<PathBuf, BinError> {
    static CURRENT: Mutex<BTreeMap<String, PathBuf>> = Mutex::new(BTreeMap::new());
    let known = CURRENT.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).get(name).cloned();
    if let Some(path) = known {
        return Ok(path);
    }
    let exe = std::env::current_exe().map_err(BinError::NoExe)?;
    let beside = exe.parent().ok_or_else(|| BinError::NoExe(io::Error::other("the executable has no directory")))?;
    let path = locate(name, beside, &workspace_root())?;
    CURRENT.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).insert(name.to_string(), path.clone());
    Ok(path)
}

/// The workspace this kit was compiled in.
fn workspace_root() -> PathBuf {
    let kit = Path::new(env!("CARGO_MANIFEST_DIR"));
    kit.parent().unwrap_or(kit).to_path_buf()
}

/// [`bin`] for a program in `beside` (its target dir's profile dir or
/// `deps/` in it) and the workspace at `workspace`.
fn locate(name: &str, beside: &Path, workspace: &Path) -> Result<PathBuf, BinError> {
    let profile_dir = if beside.file_name().is_some_and(|n| n == "deps") { beside.parent().unwrap_or(beside) } else { beside };
    let build = build_command(profile_dir);
    let Some(found) = [beside.join(name), profile_dir.join(name)].into_iter().find(|p| p.exists()) else {
        return Err(BinError::Missing { name: name.to_string(), dir: profile_dir.to_path_buf(), build });
    };
    if name.ends_with(".wasm") {
        // Built and copied there by fog-host's build script.
        locate("fog-host", beside, workspace)?;
        return Ok(found);
    }
    let shown = |p: &Path| p.strip_prefix(workspace).map(Path::to_path_buf).unwrap_or_else(|_| p.to_path_buf());
    match changed_since_built(&found, workspace) {
        Ok(None) => Ok(found),
        Ok(Some(Changed::Newer(changed))) => Err(BinError::Stale { binary: shown(&found), changed: shown(&changed), build }),
        Ok(Some(Changed::Gone(gone))) => Err(BinError::SourceGone { binary: shown(&found), gone: shown(&gone), build }),
        Err(error) => Err(BinError::Unreadable { path: found, error }),
    }
}

/// The command that builds the binaries of `profile_dir` (`target/release`,
/// `target/debug`, `target/<profile>`).
fn build_command(profile_dir: &Path) -> String {
    match profile_dir.file_name().and_then(|n| n.to_str()) {
        Some("debug") => "cargo build --workspace".to_string(),
        Some("release") | None => "cargo build --release --workspace".to_string(),
        Some(profile) => format!("cargo build --profile {profile} --workspace"),
    }
}

/// A source that makes a binary out of date.
#[derive(Debug, PartialEq, Eq)]
enum Changed {
    /// Modified after the binary was built (the newest such file).
    Newer(PathBuf),
    /// Listed in the binary's dep-info file, and no longer there.
    Gone(PathBuf),
}

/// What changed since `binary` was built, if anything (see the module docs
/// for which files count).
fn changed_since_built(binary: &Path, workspace: &Path) -> io::Result<Option<Changed>> {
    let built = std::fs::metadata(binary)?.modified()?;
    let mut newest: Option<(SystemTime, PathBuf)> = None;
    let mut note = |path: &Path, modified: SystemTime| {
        if modified > built && newest.as_ref().is_none_or(|(t, _)| modified > *t) {
            newest = Some((modified, path.to_path_buf()));
        }
    };
    match std::fs::read_to_string(binary.with_extension("d")) {
        Ok(dep_info) => {
            for source in dep_info_sources(&dep_info) {
                let source = workspace.join(source);
                if !source.exists() {
                    return Ok(Some(Changed::Gone(source)));
                }
                visit(&source, &mut note);
            }
        }
        Err(_) if workspace.is_dir() => {
            for top in ["Cargo.toml", "Cargo.lock", "wit", "sensors"] {
                visit(&workspace.join(top), &mut note);
            }
            for entry in std::fs::read_dir(workspace)?.flatten() {
                let dir = entry.path();
                visit(&dir.join("Cargo.toml"), &mut note);
                visit(&dir.join("src"), &mut note);
            }
        }
        // Neither a dep-info file nor the workspace: nothing to compare with.
        Err(_) => {}
    }
    Ok(newest.map(|(_, path)| Changed::Newer(path)))
}

/// Calls `note` with every file at or below `path` and its modification
/// time; build output (`target/`) and hidden entries are passed over, and
/// what cannot be read counts as absent.
fn visit(path: &Path, note: &mut impl FnMut(&Path, SystemTime)) {
    let Ok(meta) = std::fs::metadata(path) else { return };
    if meta.is_dir() {
        let Ok(entries) = std::fs::read_dir(path) else { return };
        for entry in entries.flatten() {
            let name = entry.file_name();
            if name == "target" || name.to_string_lossy().starts_with('.') {
                continue;
            }
            visit(&entry.path(), note);
        }
    } else if let Ok(modified) = meta.modified() {
        note(path, modified);
    }
}

/// The prerequisites of the first rule of a Makefile-style dep-info file,
/// as cargo writes it: `target: source source ...`, spaces in a path
/// escaped with a backslash.
fn dep_info_sources(dep_info: &str) -> Vec<PathBuf> {
    let rule = dep_info.replace("\\\n", " ");
    let Some(first) = rule.lines().find(|l| !l.trim().is_empty()) else { return Vec::new() };
    let Some((_, prerequisites)) = first.split_once(": ") else { return Vec::new() };
    let mut sources = Vec::new();
    let mut current = String::new();
    let mut chars = prerequisites.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\\' if chars.peek() == Some(&' ') => {
                current.push(' ');
                chars.next();
            }
            ' ' | '\t' => {
                if !current.is_empty() {
                    sources.push(PathBuf::from(std::mem::take(&mut current)));
                }
            }
            other => current.push(other),
        }
    }
    if !current.is_empty() {
        sources.push(PathBuf::from(current));
    }
    sources
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// A fake workspace: two crates, a lock file, `wit/` and `sensors/`,
    /// and `target/release` with a `fog-server` built after all of them.
    struct Tree {
        root: PathBuf,
        base: SystemTime,
    }

    impl Tree {
        fn new() -> Tree {
            let root = crate::scratch_dir("freshness").unwrap();
            let tree = Tree { root, base: SystemTime::now() - Duration::from_secs(3600) };
            for file in [
                "Cargo.toml",
                "Cargo.lock",
                "server/Cargo.toml",
                "server/src/lib.rs",
                "server/src/node/mod.rs",
                "bench/Cargo.toml",
                "bench/src/main.rs",
                "wit/sensor.wit",
                "sensors/scenario/src/lib.rs",
                "target/release/fog-host",
            ] {
                tree.write(file, 0);
            }
            tree.write("target/release/fog-server", 60);
            tree
        }

        fn path(&self, file: &str) -> PathBuf {
            self.root.join(file)
        }

        /// Writes `file` (if new) and sets its modification time to
        /// `minutes` after the tree's base time.
        fn write(&self, file: &str, minutes: u64) {
            let path = self.path(file);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            let f = std::fs::OpenOptions::new().create(true).append(true).open(&path).unwrap();
            f.set_modified(self.base + Duration::from_secs(60 * minutes)).unwrap();
        }

        fn dep_info(&self, sources: &[&str]) {
            let listed: Vec<String> = sources.iter().map(|s| self.path(s).display().to_string().replace(' ', "\\ ")).collect();
            let text = format!("{}: {}\n", self.path("target/release/fog-server").display(), listed.join(" "));
            std::fs::write(self.path("target/release/fog-server.d"), text).unwrap();
        }

        fn changed(&self) -> Option<Changed> {
            changed_since_built(&self.path("target/release/fog-server"), &self.root).unwrap()
        }

        fn locate(&self, name: &str) -> Result<PathBuf, BinError> {
            locate(name, &self.path("target/release/deps"), &self.root)
        }
    }

    impl Drop for Tree {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.root);
        }
    }

    #[test]
    fn with_a_dep_info_file_only_the_sources_it_lists_count() {
        let tree = Tree::new();
        tree.dep_info(&["server/src/lib.rs", "server/src/node/mod.rs", "sensors"]);
        assert_eq!(tree.changed(), None, "every listed source is older than the binary");
        tree.write("bench/src/main.rs", 90);
        tree.write("Cargo.lock", 90);
        assert_eq!(tree.changed(), None, "a benchmark's source and the lock file are not sources of the server");
        tree.write("server/src/node/mod.rs", 90);
        tree.write("server/src/lib.rs", 120);
        assert_eq!(tree.changed(), Some(Changed::Newer(tree.path("server/src/lib.rs"))), "the newest changed source is named");
        tree.write("server/src/lib.rs", 30);
        tree.write("server/src/node/mod.rs", 30);
        assert_eq!(tree.changed(), None);
        tree.write("sensors/scenario/src/lib.rs", 61);
        assert_eq!(tree.changed(), Some(Changed::Newer(tree.path("sensors/scenario/src/lib.rs"))), "a file in a listed directory");
    }

    #[test]
    fn a_listed_source_that_is_gone_makes_the_binary_stale() {
        let tree = Tree::new();
        tree.dep_info(&["server/src/lib.rs", "server/src/old.rs"]);
        assert_eq!(tree.changed(), Some(Changed::Gone(tree.path("server/src/old.rs"))));
    }

    #[test]
    fn without_a_dep_info_file_every_source_of_the_workspace_counts() {
        let tree = Tree::new();
        assert_eq!(tree.changed(), None);
        tree.write("target/release/fog-host", 90);
        assert_eq!(tree.changed(), None, "build output is not a source");
        for (file, minutes) in [
            ("bench/src/main.rs", 61),
            ("bench/Cargo.toml", 62),
            ("Cargo.lock", 63),
            ("Cargo.toml", 64),
            ("wit/sensor.wit", 65),
            ("sensors/scenario/src/lib.rs", 66),
        ] {
            tree.write(file, minutes);
            assert_eq!(tree.changed(), Some(Changed::Newer(tree.path(file))), "{file}");
        }
    }

    #[test]
    fn the_error_names_the_binary_the_changed_file_and_the_build() {
        let tree = Tree::new();
        tree.dep_info(&["server/src/lib.rs"]);
        assert_eq!(tree.locate("fog-server").unwrap(), tree.path("target/release/fog-server"));
        tree.write("server/src/lib.rs", 61);
        let error = tree.locate("fog-server").unwrap_err().to_string();
        assert_eq!(
            error,
            "target/release/fog-server is older than server/src/lib.rs, which changed after it was built: \
             run `cargo build --release --workspace`"
        );
        let missing = tree.locate("fog-nothing").unwrap_err().to_string();
        assert_eq!(
            missing,
            format!("fog-nothing is not in {}: run `cargo build --release --workspace`", tree.path("target/release").display())
        );
    }

    #[test]
    fn a_sensor_component_is_as_current_as_fog_host() {
        let tree = Tree::new();
        tree.write("target/release/fog_sensor.wasm", 10);
        assert_eq!(tree.locate("fog_sensor.wasm").unwrap(), tree.path("target/release/fog_sensor.wasm"));
        tree.write("sensors/scenario/src/lib.rs", 5);
        tree.write("target/release/fog-host", 4);
        let error = tree.locate("fog_sensor.wasm").unwrap_err().to_string();
        assert!(error.starts_with("target/release/fog-host is older than sensors/scenario/src/lib.rs"), "{error}");
    }

    #[test]
    fn dep_info_paths_keep_their_escaped_spaces() {
        let text = "/t/release/fog-server: /w/a\\ b/src/lib.rs /w/core/src/lib.rs\n\n/w/a\\ b/src/lib.rs:\n";
        assert_eq!(dep_info_sources(text), [PathBuf::from("/w/a b/src/lib.rs"), PathBuf::from("/w/core/src/lib.rs")]);
        assert!(dep_info_sources("").is_empty());
    }

    #[test]
    fn the_build_command_follows_the_profile() {
        assert_eq!(build_command(Path::new("/w/target/release")), "cargo build --release --workspace");
        assert_eq!(build_command(Path::new("/w/target/debug")), "cargo build --workspace");
        assert_eq!(build_command(Path::new("/w/target/fuzz")), "cargo build --profile fuzz --workspace");
    }
}
