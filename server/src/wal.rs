//! The write-ahead log and snapshots of one node, in its data directory.
//!
//! Files come in generations: `snapshot.<N>` holds the state as of some log
//! entry, `wal.<N>` the entries that follow it. A new snapshot is written to
//! a temporary file, synced, renamed to `snapshot.<N+1>`, and only then is
//! `wal.<N+1>` started and generation N deleted, so a crash at any point
//! leaves one complete generation to recover from. Generation 0 has no
//! snapshot (an empty state).
//!
//! A log record is `[length u32][crc32 u32][payload]`, little-endian, the
//! payload a protocol-encoded [`LogEntry`]. On recovery a record cut short
//! by the end of the file, or a bad last record, is a torn write: the tail
//! is truncated and the truncation logged. A bad record with more data after
//! it is corruption in the middle: recovery stops with an error that names
//! the file and the offset, because skipping it would silently lose data.
//!
//! A `LOCK` file held with an exclusive lock, from [`recover`] for as long
//! as the [`Wal`] lives, keeps two servers from sharing one data directory
//! (both would append to the same log).
//!
//! `--fsync always` syncs after every entry, `batch` once per group of
//! entries handed over together (group commit), `never` leaves it to the
//! operating system (a power loss may lose acked readings; a process crash
//! does not).

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use fog_protocol::{LogEntry, decode, encode};

const HEADER: usize = 8;
/// Largest record accepted; a longer length field is corruption.
pub const MAX_RECORD_BYTES: usize = fog_protocol::MAX_FRAME_BYTES;
const SNAPSHOT_MAGIC: &[u8; 8] = b"FOGSNAP1";

/// When the log is synced to disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FsyncPolicy {
    Always,
    Batch,
    Never,
}

impl std::str::FromStr for FsyncPolicy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "always" => Ok(FsyncPolicy::Always),
            "batch" => Ok(FsyncPolicy::Batch),
            "never" => Ok(FsyncPolicy::Never),
            other => Err(format!("unknown fsync policy `{other}` (use always, batch or never)")),
        }
    }
}

/// Why the log could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum WalError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{}: corrupt record at offset {offset} ({why}); the log continues after it, so it is not a torn write — refusing to start", path.display())]
    Corrupt { path: PathBuf, offset: u64, why: String },
    #[error("{}: corrupt snapshot ({why})", path.display())]
    BadSnapshot { path: PathBuf, why: String },
    #[error("cannot encode a log entry: {0}")]
    Encode(String),
    #[error("data directory {} is in use by another fog-server (its LOCK file is held)", dir.display())]
    Locked { dir: PathBuf },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> WalError + '_ {
    move |source| WalError::Io { path: path.to_path_buf(), source }
}

/// What was found in a data directory.
#[derive(Debug, Default)]
pub struct Recovered {
    pub generation: u64,
    /// The snapshot payload of this generation, if any.
    pub snapshot: Option<Vec<u8>>,
    /// The log entries after the snapshot, in order.
    pub entries: Vec<LogEntry>,
    /// `(file, offset, bytes)` of a torn tail that was cut off.
    pub truncated: Option<(PathBuf, u64, u64)>,
    /// Byte length of the valid log.
    pub wal_len: u64,
    /// The directory's `LOCK` file, locked; [`Wal::open`] keeps it.
    lock: Option<File>,
}

/// Locks `dir` for this process (see the module doc).
fn lock_dir(dir: &Path) -> Result<File, WalError> {
    let path = dir.join("LOCK");
    let lock = OpenOptions::new().create(true).truncate(false).write(true).open(&path).map_err(io_err(&path))?;
    match lock.try_lock() {
        Ok(()) => Ok(lock),
        Err(fs::TryLockError::WouldBlock) => Err(WalError::Locked { dir: dir.to_path_buf() }),
        Err(fs::TryLockError::Error(e)) => Err(io_err(&path)(e)),
    }
}

fn snapshot_path(dir: &Path, generation: u64) -> PathBuf {
    dir.join(format!("snapshot.{generation:020}"))
}

fn wal_path(dir: &Path, generation: u64) -> PathBuf {
    dir.join(format!("wal.{generation:020}"))
}

fn generations(dir: &Path, prefix: &str) -> Result<Vec<u64>, WalError> {
    let mut out = Vec::new();
    for item in fs::read_dir(dir).map_err(io_err(dir))? {
        let item = item.map_err(io_err(dir))?;
        let name = item.file_name();
        if let Some(n) = name.to_str().and_then(|n| n.strip_prefix(prefix)).and_then(|n| n.parse().ok()) {
            out.push(n);
        }
    }
    out.sort_unstable();
    Ok(out)
}

/// Reads the newest generation in `dir` (created if missing), truncating a
/// torn tail of its log.
pub fn recover(dir: &Path) -> Result<Recovered, WalError> {
    fs::create_dir_all(dir).map_err(io_err(dir))?;
    let lock = lock_dir(dir)?;
    let generation = generations(dir, "snapshot.")?.last().copied().unwrap_or(0);
    let snapshot = if generation > 0 { Some(read_snapshot(&snapshot_path(dir, generation))?) } else { None };
    // Older generations and unfinished snapshots are leftovers of a crash
    // in the middle of a snapshot.
    for g in generations(dir, "snapshot.")?.into_iter().filter(|&g| g < generation) {
        let _ = fs::remove_file(snapshot_path(dir, g));
    }
    for g in generations(dir, "wal.")?.into_iter().filter(|&g| g < generation) {
        let _ = fs::remove_file(wal_path(dir, g));
    }
    let _ = fs::remove_file(dir.join("snapshot.tmp"));

    let path = wal_path(dir, generation);
    let mut bytes = Vec::new();
    match File::open(&path) {
        Ok(mut f) => {
            f.read_to_end(&mut bytes).map_err(io_err(&path))?;
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err(&path)(e)),
    }
    let (entries, valid) = parse_log(&path, &bytes)?;
    let mut truncated = None;
    if valid < bytes.len() {
        let cut = (bytes.len() - valid) as u64;
        let f = OpenOptions::new().write(true).open(&path).map_err(io_err(&path))?;
        f.set_len(valid as u64).map_err(io_err(&path))?;
        f.sync_all().map_err(io_err(&path))?;
        tracing::warn!(file = %path.display(), offset = valid, bytes = cut, "torn write at the end of the log: truncated");
        truncated = Some((path.clone(), valid as u64, cut));
    }
    Ok(Recovered { generation, snapshot, entries, truncated, wal_len: valid as u64, lock: Some(lock) })
}

/// Parses records; returns the entries and the length of the valid prefix.
fn parse_log(path: &Path, bytes: &[u8]) -> Result<(Vec<LogEntry>, usize), WalError> {
    let mut entries: Vec<LogEntry> = Vec::new();
    let mut at = 0usize;
    while at < bytes.len() {
        let rest = &bytes[at..];
        let corrupt = |why: String| WalError::Corrupt { path: path.to_path_buf(), offset: at as u64, why };
        if rest.len() < HEADER {
            break; // torn header
        }
        let len = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
        let crc = u32::from_le_bytes([rest[4], rest[5], rest[6], rest[7]]);
        if len == 0 && crc == 0 && rest.iter().all(|&b| b == 0) {
            break; // zero-filled tail of a torn write
        }
        if len > MAX_RECORD_BYTES {
            if rest.len() < HEADER + MAX_RECORD_BYTES {
                break; // cannot tell from a torn length: treat as the tail
            }
            return Err(corrupt(format!("length {len} exceeds the limit")));
        }
        let end = HEADER + len;
        if rest.len() < end {
            break; // record cut short by the end of the file
        }
        let payload = &rest[HEADER..end];
        let last = rest.len() == end;
        if crc32fast::hash(payload) != crc {
            if last {
                break;
            }
            return Err(corrupt("checksum mismatch".into()));
        }
        let entry: LogEntry = match decode(payload) {
            Ok(e) => e,
            Err(e) if last => {
                tracing::debug!("undecodable last record: {e}");
                break;
            }
            Err(e) => return Err(corrupt(format!("undecodable entry: {e}"))),
        };
        if let Some(prev) = entries.last() {
            if entry.lsn != prev.lsn + 1 {
                return Err(corrupt(format!("entry {} follows entry {}", entry.lsn, prev.lsn)));
            }
        }
        entries.push(entry);
        at += end;
    }
    Ok((entries, at))
}

fn read_snapshot(path: &Path) -> Result<Vec<u8>, WalError> {
    let bytes = fs::read(path).map_err(io_err(path))?;
    let bad = |why: &str| WalError::BadSnapshot { path: path.to_path_buf(), why: why.to_string() };
    if bytes.len() < 16 || &bytes[..8] != SNAPSHOT_MAGIC {
        return Err(bad("not a fog snapshot"));
    }
    let len = u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize;
    let crc = u32::from_le_bytes([bytes[12], bytes[13], bytes[14], bytes[15]]);
    let payload = &bytes[16..];
    if payload.len() != len {
        return Err(bad("length does not match"));
    }
    if crc32fast::hash(payload) != crc {
        return Err(bad("checksum mismatch"));
    }
    Ok(payload.to_vec())
}

/// Appends one encoded record to `buf`.
pub fn frame_entry(entry: &LogEntry, buf: &mut Vec<u8>) -> Result<(), WalError> {
    let payload = encode(entry).map_err(|e| WalError::Encode(e.to_string()))?;
    let len = u32::try_from(payload.len()).map_err(|_| WalError::Encode("entry too large".into()))?;
    buf.extend_from_slice(&len.to_le_bytes());
    buf.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
    buf.extend_from_slice(&payload);
    Ok(())
}

/// The open log of the current generation.
pub struct Wal {
    dir: PathBuf,
    generation: u64,
    file: File,
    path: PathBuf,
    policy: FsyncPolicy,
    buf: Vec<u8>,
    /// Bytes in the current log file.
    len: u64,
    _lock: File,
}

/// How long one [`Wal::append`] took: writing, and syncing (when the
/// policy syncs).
#[derive(Debug, Clone, Copy, Default)]
pub struct AppendTimes {
    pub write: std::time::Duration,
    pub sync: Option<std::time::Duration>,
}

impl Wal {
    /// Opens the log found by [`recover`] for appending.
    /// Keeps the directory's lock that [`recover`] took.
    pub fn open(dir: &Path, recovered: &Recovered, policy: FsyncPolicy) -> Result<Wal, WalError> {
        let lock = match &recovered.lock {
            // The same open file: the lock lasts while either handle does.
            Some(lock) => lock.try_clone().map_err(io_err(&dir.join("LOCK")))?,
            None => lock_dir(dir)?,
        };
        let path = wal_path(dir, recovered.generation);
        let file = OpenOptions::new().create(true).append(true).open(&path).map_err(io_err(&path))?;
        sync_dir(dir)?;
        Ok(Wal { dir: dir.to_path_buf(), generation: recovered.generation, file, path, policy, buf: Vec::new(), len: recovered.wal_len, _lock: lock })
    }

    /// Appends entries and makes them durable per the policy: one write and
    /// (with `batch`) one sync for the whole group.
    pub fn append(&mut self, entries: &[LogEntry]) -> Result<AppendTimes, WalError> {
        let mut times = AppendTimes::default();
        let write = |file: &mut File, buf: &[u8], path: &Path, times: &mut AppendTimes| -> Result<(), WalError> {
            let began = std::time::Instant::now();
            file.write_all(buf).map_err(io_err(path))?;
            times.write += began.elapsed();
            Ok(())
        };
        let sync = |file: &mut File, path: &Path, times: &mut AppendTimes| -> Result<(), WalError> {
            let began = std::time::Instant::now();
            file.sync_data().map_err(io_err(path))?;
            times.sync = Some(times.sync.unwrap_or_default() + began.elapsed());
            Ok(())
        };
        self.buf.clear();
        for entry in entries {
            frame_entry(entry, &mut self.buf)?;
            if self.policy == FsyncPolicy::Always {
                write(&mut self.file, &self.buf, &self.path, &mut times)?;
                sync(&mut self.file, &self.path, &mut times)?;
                self.len += self.buf.len() as u64;
                self.buf.clear();
            }
        }
        if !self.buf.is_empty() {
            write(&mut self.file, &self.buf, &self.path, &mut times)?;
            self.len += self.buf.len() as u64;
            if self.policy == FsyncPolicy::Batch {
                sync(&mut self.file, &self.path, &mut times)?;
            }
        }
        Ok(times)
    }

    /// Bytes in the current log file.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Starts a new generation from `snapshot`: entries appended from now on
    /// follow it.
    pub fn write_snapshot(&mut self, snapshot: &[u8]) -> Result<(), WalError> {
        let next = self.generation + 1;
        let tmp = self.dir.join("snapshot.tmp");
        let mut bytes = Vec::with_capacity(snapshot.len() + 16);
        bytes.extend_from_slice(SNAPSHOT_MAGIC);
        let len = u32::try_from(snapshot.len()).map_err(|_| WalError::Encode("snapshot too large".into()))?;
        bytes.extend_from_slice(&len.to_le_bytes());
        bytes.extend_from_slice(&crc32fast::hash(snapshot).to_le_bytes());
        bytes.extend_from_slice(snapshot);
        {
            let mut f = File::create(&tmp).map_err(io_err(&tmp))?;
            f.write_all(&bytes).map_err(io_err(&tmp))?;
            if self.policy != FsyncPolicy::Never {
                f.sync_all().map_err(io_err(&tmp))?;
            }
        }
        let snap = snapshot_path(&self.dir, next);
        fs::rename(&tmp, &snap).map_err(io_err(&snap))?;
        let path = wal_path(&self.dir, next);
        let file = OpenOptions::new().create(true).truncate(true).write(true).open(&path).map_err(io_err(&path))?;
        if self.policy != FsyncPolicy::Never {
            sync_dir(&self.dir)?;
        }
        let old = self.generation;
        self.file = file;
        self.path = path;
        self.generation = next;
        self.len = 0;
        let _ = fs::remove_file(wal_path(&self.dir, old));
        let _ = fs::remove_file(snapshot_path(&self.dir, old));
        Ok(())
    }

    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// The current log file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

fn sync_dir(dir: &Path) -> Result<(), WalError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(io_err(dir))
}

#[cfg(test)]
mod tests {
    use super::*;
    use fog_protocol::Record;

    fn entry(lsn: u64) -> LogEntry {
        LogEntry { lsn, epoch: 1, solo: false, record: Record::EpochChanged { epoch: lsn } }
    }

    fn temp_dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("fog-wal-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        d
    }

    fn write(dir: &Path, n: u64, policy: FsyncPolicy) -> PathBuf {
        let rec = recover(dir).unwrap();
        let mut wal = Wal::open(dir, &rec, policy).unwrap();
        let entries: Vec<LogEntry> = (1..=n).map(entry).collect();
        wal.append(&entries).unwrap();
        wal.path().to_path_buf()
    }

    #[test]
    fn a_second_server_cannot_share_the_data_directory() {
        let dir = temp_dir("lock");
        let rec = recover(&dir).unwrap();
        let wal = Wal::open(&dir, &rec, FsyncPolicy::Batch).unwrap();
        let second = recover(&dir).unwrap_err();
        assert!(matches!(second, WalError::Locked { .. }), "{second}");
        assert!(second.to_string().contains(&dir.display().to_string()), "the error names the directory: {second}");
        drop(rec);
        assert!(matches!(recover(&dir), Err(WalError::Locked { .. })), "the open log keeps the lock");
        drop(wal);
        recover(&dir).expect("free once the log is closed");
    }

    #[test]
    fn entries_survive_a_reopen_under_every_policy() {
        for policy in [FsyncPolicy::Always, FsyncPolicy::Batch, FsyncPolicy::Never] {
            let dir = temp_dir(&format!("reopen-{policy:?}"));
            write(&dir, 10, policy);
            let rec = recover(&dir).unwrap();
            assert_eq!(rec.entries.len(), 10);
            assert_eq!(rec.entries[9], entry(10));
            assert!(rec.truncated.is_none());
            let _ = fs::remove_dir_all(&dir);
        }
    }

    #[test]
    fn a_torn_tail_is_truncated_at_every_cut() {
        let dir = temp_dir("torn");
        let path = write(&dir, 3, FsyncPolicy::Batch);
        let full = fs::read(&path).unwrap();
        let one = full.len() / 3;
        for cut in (2 * one + 1)..full.len() {
            fs::write(&path, &full[..cut]).unwrap();
            let rec = recover(&dir).unwrap();
            assert_eq!(rec.entries.len(), 2, "cut at {cut}");
            let (file, offset, bytes) = rec.truncated.clone().expect("truncation reported");
            assert_eq!((file, offset, bytes), (path.clone(), (2 * one) as u64, (cut - 2 * one) as u64));
            assert_eq!(fs::metadata(&path).unwrap().len(), (2 * one) as u64, "file cut back");
        }
        // A garbled last record (a torn overwrite) is also a tail.
        let mut bad = full.clone();
        let last = bad.len() - 1;
        bad[last] ^= 0xff;
        fs::write(&path, &bad).unwrap();
        assert_eq!(recover(&dir).unwrap().entries.len(), 2);
        // Zeros after the last good record (a torn append on some filesystems).
        let mut zeros = full.clone();
        zeros.extend_from_slice(&[0u8; 100]);
        fs::write(&path, &zeros).unwrap();
        let rec = recover(&dir).unwrap();
        assert_eq!(rec.entries.len(), 3);
        assert_eq!(rec.truncated.map(|t| t.2), Some(100));
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn corruption_in_the_middle_names_the_file_and_offset() {
        let dir = temp_dir("middle");
        let path = write(&dir, 3, FsyncPolicy::Batch);
        let mut bytes = fs::read(&path).unwrap();
        let one = bytes.len() / 3;
        bytes[one + HEADER + 1] ^= 0x55; // inside the second record's payload
        fs::write(&path, &bytes).unwrap();
        let err = recover(&dir).unwrap_err();
        let text = err.to_string();
        assert!(text.contains(&path.display().to_string()), "{text}");
        assert!(text.contains(&format!("offset {one}")), "{text}");
        assert!(text.contains("checksum"), "{text}");
        assert_eq!(fs::read(&path).unwrap(), bytes, "nothing was cut");
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn snapshots_start_a_new_generation() {
        let dir = temp_dir("snap");
        let rec = recover(&dir).unwrap();
        let mut wal = Wal::open(&dir, &rec, FsyncPolicy::Batch).unwrap();
        wal.append(&[entry(1), entry(2)]).unwrap();
        wal.write_snapshot(b"state at 2").unwrap();
        wal.append(&[entry(3)]).unwrap();
        drop((wal, rec));
        let rec = recover(&dir).unwrap();
        assert_eq!(rec.generation, 1);
        assert_eq!(rec.snapshot.as_deref(), Some(&b"state at 2"[..]));
        assert_eq!(rec.entries, vec![entry(3)]);
        drop(rec);
        let names: Vec<String> = fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        assert_eq!(names.len(), 3, "old generation removed (the LOCK file stays): {names:?}");
        // A corrupt snapshot is an error naming it.
        let snap = snapshot_path(&dir, 1);
        let mut bytes = fs::read(&snap).unwrap();
        let n = bytes.len() - 1;
        bytes[n] ^= 1;
        fs::write(&snap, bytes).unwrap();
        let err = recover(&dir).unwrap_err().to_string();
        assert!(err.contains("snapshot.") && err.contains("checksum"), "{err}");
        let _ = fs::remove_dir_all(&dir);
    }
}
