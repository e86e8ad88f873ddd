//! The host's state directory (`--state-dir`): every sensor's last committed
//! snapshot, so a host killed with `kill -9` resumes each sensor where it
//! was, with the same incarnation, sequence and unacked readings.
//!
//! The snapshots are opaque bytes owned by the component. They are kept in
//! one append-only file, `sensors.state`: a header, then records of
//! `u32 sensor_id, u32 len, len bytes, u32 crc32` (little-endian; the CRC
//! covers id, length and bytes). Each commit appends the snapshots of the
//! sensors that changed and ends with one fsync (group commit: one per
//! batch, not per reading). On open, the last record of each sensor wins
//! and a torn or damaged tail (a crash in the middle of a write) is cut
//! off: the records before it were synced by an earlier commit. When the
//! file has grown well past the live state, it is rewritten into a fresh
//! file, synced and renamed over the old one.
//!
//! A `LOCK` file held with an exclusive lock keeps two hosts from sharing
//! one directory. The file `epoch` holds the highest server epoch the host
//! has seen, with the pair's seal of it: a host restarted with its
//! directory still tells a server that lost its data that it is behind.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

const MAGIC: &[u8; 8] = b"FOGSTATE";
const VERSION: u32 = 1;
const HEADER_LEN: u64 = 12;
const FILE_NAME: &str = "sensors.state";
/// Larger than any snapshot a sensor within its memory cap could hand over.
const MAX_RECORD: u32 = 256 << 20;
const EPOCH_FILE: &str = "epoch";

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("cannot use state directory {dir}: {reason}")]
    Io { dir: String, reason: String },
    #[error("state directory {dir} is in use by another fog-host (its LOCK file is held)")]
    Locked { dir: String },
    #[error("{path} is not a fog-host state file ({reason})")]
    NotState { path: String, reason: String },
}

pub struct StateStore {
    dir: PathBuf,
    file: File,
    _lock: File,
    /// Bytes in the file, header included.
    log_bytes: u64,
    /// Size of the newest record of each sensor.
    live: HashMap<u32, u64>,
}

/// What opening found.
pub struct Opened {
    pub store: StateStore,
    /// The newest snapshot of every sensor in the directory.
    pub saved: HashMap<u32, Vec<u8>>,
    /// Bytes of a torn tail that were cut off.
    pub torn_bytes: u64,
    /// The highest server epoch seen, with its seal (none saved: `None`).
    pub epoch: Option<(u64, [u8; 16])>,
}

impl StateStore {
    /// Opens (creating if needed) the state in `dir`.
    pub fn open(dir: &Path) -> Result<Opened, StateError> {
        let io = |e: std::io::Error| StateError::Io { dir: dir.display().to_string(), reason: e.to_string() };
        std::fs::create_dir_all(dir).map_err(io)?;
        let lock = OpenOptions::new().create(true).truncate(false).write(true).open(dir.join("LOCK")).map_err(io)?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => return Err(StateError::Locked { dir: dir.display().to_string() }),
            Err(std::fs::TryLockError::Error(e)) => return Err(io(e)),
        }
        let path = dir.join(FILE_NAME);
        let mut file = OpenOptions::new().create(true).truncate(false).read(true).write(true).open(&path).map_err(io)?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes).map_err(io)?;
        if bytes.is_empty() {
            file.write_all(&header()).map_err(io)?;
            file.sync_all().map_err(io)?;
            sync_dir(dir).map_err(io)?;
            bytes = header().to_vec();
        }
        let not_state = |reason: String| StateError::NotState { path: path.display().to_string(), reason };
        if bytes.len() < HEADER_LEN as usize || &bytes[..8] != MAGIC {
            return Err(not_state("no FOGSTATE header".into()));
        }
        let version = u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]);
        if version != VERSION {
            return Err(not_state(format!("format version {version}, this host reads version {VERSION}")));
        }
        let (records, good_len) = parse_records(&bytes[HEADER_LEN as usize..]);
        let good_len = HEADER_LEN + good_len as u64;
        let torn_bytes = bytes.len() as u64 - good_len;
        if torn_bytes > 0 {
            file.set_len(good_len).map_err(io)?;
            file.sync_all().map_err(io)?;
        }
        file.seek(SeekFrom::End(0)).map_err(io)?;
        let mut saved = HashMap::new();
        let mut live = HashMap::new();
        for (id, state) in records {
            live.insert(id, record_len(state.len()));
            saved.insert(id, state.to_vec());
        }
        let store = StateStore { dir: dir.to_path_buf(), file, _lock: lock, log_bytes: good_len, live };
        // 8 bytes of epoch and 16 of seal; anything else (a torn write
        // cannot happen: the file is renamed into place) is ignored.
        let epoch = std::fs::read(dir.join(EPOCH_FILE)).ok().and_then(|b| {
            let epoch = u64::from_le_bytes(b.get(..8)?.try_into().ok()?);
            let seal: [u8; 16] = b.get(8..24)?.try_into().ok()?;
            Some((epoch, seal))
        });
        Ok(Opened { store, saved, torn_bytes, epoch })
    }

    /// Saves the highest server epoch seen and its seal: written to a
    /// temporary file, synced and renamed into place.
    pub fn save_epoch(&self, epoch: u64, seal: &[u8; 16]) -> std::io::Result<()> {
        let tmp = self.dir.join("epoch.tmp");
        let mut bytes = epoch.to_le_bytes().to_vec();
        bytes.extend_from_slice(seal);
        let mut f = File::create(&tmp)?;
        f.write_all(&bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, self.dir.join(EPOCH_FILE))?;
        sync_dir(&self.dir)
    }

    /// Appends snapshots and syncs them to disk with one fsync.
    pub fn append<'a>(&mut self, records: impl Iterator<Item = (u32, &'a [u8])>) -> std::io::Result<()> {
        let mut buf = Vec::new();
        for (id, state) in records {
            encode_record(&mut buf, id, state);
            self.live.insert(id, record_len(state.len()));
        }
        if buf.is_empty() {
            return Ok(());
        }
        self.file.write_all(&buf)?;
        self.file.sync_data()?;
        self.log_bytes += buf.len() as u64;
        Ok(())
    }

    /// Whether the file has grown enough past the live state to rewrite it.
    pub fn needs_compaction(&self) -> bool {
        let live: u64 = self.live.values().sum();
        self.log_bytes > 4 * live + (1 << 20)
    }

    /// Replaces the file with one holding exactly `records`: written to a
    /// temporary file, synced, renamed over the old one, and the directory
    /// synced, so a crash at any point leaves one complete file.
    pub fn compact<'a>(&mut self, records: impl Iterator<Item = (u32, &'a [u8])>) -> std::io::Result<()> {
        let mut buf = header().to_vec();
        let mut live = HashMap::new();
        for (id, state) in records {
            encode_record(&mut buf, id, state);
            live.insert(id, record_len(state.len()));
        }
        // Sensors this host does not run keep their last snapshot.
        let mut current = Vec::new();
        File::open(self.dir.join(FILE_NAME))?.read_to_end(&mut current)?;
        let (old, _) = parse_records(current.get(HEADER_LEN as usize..).unwrap_or_default());
        let mut others: HashMap<u32, &[u8]> = HashMap::new();
        for (id, state) in old {
            if !live.contains_key(&id) {
                others.insert(id, state);
            }
        }
        for (id, state) in others {
            encode_record(&mut buf, id, state);
            live.insert(id, record_len(state.len()));
        }
        let tmp = self.dir.join(format!("{FILE_NAME}.tmp"));
        let mut file = OpenOptions::new().create(true).truncate(true).read(true).write(true).open(&tmp)?;
        file.write_all(&buf)?;
        file.sync_all()?;
        std::fs::rename(&tmp, self.dir.join(FILE_NAME))?;
        sync_dir(&self.dir)?;
        file.seek(SeekFrom::End(0))?;
        self.file = file;
        self.log_bytes = buf.len() as u64;
        self.live = live;
        Ok(())
    }
}

fn header() -> [u8; HEADER_LEN as usize] {
    let mut h = [0u8; HEADER_LEN as usize];
    h[..8].copy_from_slice(MAGIC);
    h[8..].copy_from_slice(&VERSION.to_le_bytes());
    h
}

fn record_len(state_len: usize) -> u64 {
    12 + state_len as u64
}

fn encode_record(buf: &mut Vec<u8>, id: u32, state: &[u8]) {
    let start = buf.len();
    buf.extend_from_slice(&id.to_le_bytes());
    buf.extend_from_slice(&(state.len() as u32).to_le_bytes());
    buf.extend_from_slice(state);
    let crc = crc32fast::hash(&buf[start..]);
    buf.extend_from_slice(&crc.to_le_bytes());
}

/// The complete records at the start of `bytes`, and how many bytes they
/// span; parsing stops at the first record cut short or damaged.
fn parse_records(bytes: &[u8]) -> (Vec<(u32, &[u8])>, usize) {
    let mut out = Vec::new();
    let mut pos = 0;
    loop {
        let Some(head) = bytes.get(pos..pos + 8) else { break };
        let id = u32::from_le_bytes([head[0], head[1], head[2], head[3]]);
        let len = u32::from_le_bytes([head[4], head[5], head[6], head[7]]);
        if len > MAX_RECORD {
            break;
        }
        let end = pos + 8 + len as usize;
        let Some(crc_bytes) = bytes.get(end..end + 4) else { break };
        let crc = u32::from_le_bytes([crc_bytes[0], crc_bytes[1], crc_bytes[2], crc_bytes[3]]);
        if crc32fast::hash(&bytes[pos..end]) != crc {
            break;
        }
        out.push((id, &bytes[pos + 8..end]));
        pos = end + 4;
    }
    (out, pos)
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("fog-state-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn newest_snapshot_of_each_sensor_survives_reopen() {
        let dir = temp_dir("reopen");
        {
            let mut opened = StateStore::open(&dir).unwrap();
            assert!(opened.saved.is_empty());
            opened.store.append([(1, &b"one"[..]), (2, &b"two"[..])].into_iter()).unwrap();
            opened.store.append([(1, &b"one again"[..])].into_iter()).unwrap();
        }
        let opened = StateStore::open(&dir).unwrap();
        assert_eq!(opened.saved.get(&1).map(Vec::as_slice), Some(&b"one again"[..]));
        assert_eq!(opened.saved.get(&2).map(Vec::as_slice), Some(&b"two"[..]));
        assert_eq!(opened.torn_bytes, 0);
    }

    #[test]
    fn a_torn_tail_is_cut_off_and_earlier_records_kept() {
        let dir = temp_dir("torn");
        {
            let mut opened = StateStore::open(&dir).unwrap();
            opened.store.append([(7, &b"committed"[..])].into_iter()).unwrap();
            opened.store.append([(7, &b"half-written"[..])].into_iter()).unwrap();
        }
        let path = dir.join(FILE_NAME);
        let len = std::fs::metadata(&path).unwrap().len();
        OpenOptions::new().write(true).open(&path).unwrap().set_len(len - 3).unwrap();
        let opened = StateStore::open(&dir).unwrap();
        assert_eq!(opened.saved.get(&7).map(Vec::as_slice), Some(&b"committed"[..]));
        assert_eq!(opened.torn_bytes, 12 + 12 - 3);
        drop(opened);
        // The cut is durable: a second open finds a clean file.
        assert_eq!(StateStore::open(&dir).unwrap().torn_bytes, 0);
    }

    #[test]
    fn a_flipped_bit_ends_the_log_there() {
        let dir = temp_dir("crc");
        {
            let mut opened = StateStore::open(&dir).unwrap();
            opened.store.append([(1, &b"good"[..])].into_iter()).unwrap();
            opened.store.append([(2, &b"flipped"[..])].into_iter()).unwrap();
        }
        let path = dir.join(FILE_NAME);
        let mut bytes = std::fs::read(&path).unwrap();
        let at = bytes.len() - 6;
        bytes[at] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        let opened = StateStore::open(&dir).unwrap();
        assert!(opened.saved.contains_key(&1));
        assert!(!opened.saved.contains_key(&2));
    }

    #[test]
    fn compaction_keeps_the_newest_state_and_sensors_not_run() {
        let dir = temp_dir("compact");
        {
            let mut opened = StateStore::open(&dir).unwrap();
            opened.store.append([(9, &b"other host's range"[..])].into_iter()).unwrap();
            let big = vec![5u8; 300 << 10];
            for _ in 0..8 {
                opened.store.append([(1, &big[..])].into_iter()).unwrap();
            }
            assert!(opened.store.needs_compaction());
            opened.store.compact([(1, &b"latest"[..])].into_iter()).unwrap();
            assert!(!opened.store.needs_compaction());
            opened.store.append([(2, &b"after"[..])].into_iter()).unwrap();
        }
        assert!(std::fs::metadata(dir.join(FILE_NAME)).unwrap().len() < 200);
        let opened = StateStore::open(&dir).unwrap();
        assert_eq!(opened.saved.get(&1).map(Vec::as_slice), Some(&b"latest"[..]));
        assert_eq!(opened.saved.get(&2).map(Vec::as_slice), Some(&b"after"[..]));
        assert_eq!(opened.saved.get(&9).map(Vec::as_slice), Some(&b"other host's range"[..]));
    }

    #[test]
    fn a_second_host_cannot_share_the_directory() {
        let dir = temp_dir("lock");
        let _first = StateStore::open(&dir).unwrap();
        assert!(matches!(StateStore::open(&dir), Err(StateError::Locked { .. })));
    }

    #[test]
    fn a_foreign_file_is_refused() {
        let dir = temp_dir("foreign");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(FILE_NAME), b"something else entirely").unwrap();
        assert!(matches!(StateStore::open(&dir), Err(StateError::NotState { .. })));
    }
}
