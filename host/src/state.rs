//! The host's state directory (`--state-dir`): for every sensor its last
//! snapshot and the readings that left the host after it, so a host killed
//! with `kill -9` resumes each sensor where it was, with the same
//! incarnation, sequence and unacked readings (the sensor's `restore`
//! takes both).
//!
//! Snapshots are opaque bytes owned by the component, taken now and then;
//! readings are what every batch carries. Both are kept in one append-only
//! file, `sensors.state`: a header, then records of `u32 sensor_id, u32
//! len, len bytes, u32 crc32` (little-endian; the CRC covers id, length and
//! bytes), whose first byte says what they hold: 0, a snapshot (the rest);
//! 1, readings (18 bytes each: `u64 seq, u16 speed, u64 timestamp`). Each
//! commit appends the readings of one batch (and any snapshot taken since
//! the last commit) and ends with one fsync: one per batch, before it
//! leaves, a few bytes per reading. On open, a sensor's last snapshot
//! holds, with the readings recorded after it; a torn or damaged tail (a
//! crash in the middle of a write) is cut off: the records before it were
//! synced by an earlier commit. When the file has grown well past the live
//! state, it is rewritten into a fresh file, synced and renamed over the
//! old one.
//!
//! A `LOCK` file held with an exclusive lock keeps two hosts from sharing
//! one directory. The file `epoch` holds the highest server epoch the host
//! has seen, with the pair's seal of it: a host restarted with its
//! directory still tells a server that lost its data that it is behind.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};

use fog_protocol::Reading;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

const MAGIC: &[u8; 8] = b"FOGSTATE";
const VERSION: u32 = 2;
const SNAPSHOT: u8 = 0;
const READINGS: u8 = 1;
const READING_LEN: usize = 18;
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
    /// Bytes of each sensor's live records: its newest snapshot and the
    /// readings after it.
    live: HashMap<u32, u64>,
}

/// One sensor's saved state: a snapshot, and the readings that left the
/// host after it was taken.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Saved {
    pub snapshot: Vec<u8>,
    pub since: Vec<Reading>,
}

/// What a commit writes for one sensor.
pub enum Record<'a> {
    Snapshot(&'a [u8]),
    Readings(&'a [Reading]),
}

/// What opening found.
pub struct Opened {
    pub store: StateStore,
    /// The saved state of every sensor in the directory.
    pub saved: HashMap<u32, Saved>,
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
        let saved = replay(&records);
        let live = saved.iter().map(|(id, s)| (*id, live_len(s))).collect();
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

    /// Appends snapshots and readings and syncs them to disk with one fsync.
    pub fn append<'a>(&mut self, records: impl Iterator<Item = (u32, Record<'a>)>) -> std::io::Result<()> {
        let mut buf = Vec::new();
        for (id, record) in records {
            let len = encode(&mut buf, id, &record);
            match record {
                Record::Snapshot(_) => self.live.insert(id, len),
                Record::Readings(_) => self.live.insert(id, self.live.get(&id).copied().unwrap_or(0) + len),
            };
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

    /// Replaces the file with one holding exactly `states` (snapshot and
    /// readings since, per sensor): written to a temporary file, synced,
    /// renamed over the old one, and the directory synced, so a crash at any
    /// point leaves one complete file.
    pub fn compact<'a>(&mut self, states: impl Iterator<Item = (u32, &'a [u8], &'a [Reading])>) -> std::io::Result<()> {
        let mut buf = header().to_vec();
        let mut live = HashMap::new();
        for (id, snapshot, since) in states {
            let mut len = encode(&mut buf, id, &Record::Snapshot(snapshot));
            if !since.is_empty() {
                len += encode(&mut buf, id, &Record::Readings(since));
            }
            live.insert(id, len);
        }
        // Sensors this host does not run keep their saved state.
        let mut current = Vec::new();
        File::open(self.dir.join(FILE_NAME))?.read_to_end(&mut current)?;
        let (old, _) = parse_records(current.get(HEADER_LEN as usize..).unwrap_or_default());
        for (id, saved) in replay(&old) {
            if !live.contains_key(&id) {
                let mut len = encode(&mut buf, id, &Record::Snapshot(&saved.snapshot));
                if !saved.since.is_empty() {
                    len += encode(&mut buf, id, &Record::Readings(&saved.since));
                }
                live.insert(id, len);
            }
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

fn live_len(saved: &Saved) -> u64 {
    13 + saved.snapshot.len() as u64 + if saved.since.is_empty() { 0 } else { 13 + (READING_LEN * saved.since.len()) as u64 }
}

/// Appends one record to `buf`; returns its length.
fn encode(buf: &mut Vec<u8>, id: u32, record: &Record) -> u64 {
    let start = buf.len();
    buf.extend_from_slice(&id.to_le_bytes());
    buf.extend_from_slice(&[0; 4]);
    match record {
        Record::Snapshot(state) => {
            buf.push(SNAPSHOT);
            buf.extend_from_slice(state);
        }
        Record::Readings(readings) => {
            buf.push(READINGS);
            for r in *readings {
                buf.extend_from_slice(&r.seq.to_le_bytes());
                buf.extend_from_slice(&r.speed_kmh.to_le_bytes());
                buf.extend_from_slice(&r.timestamp_ms.to_le_bytes());
            }
        }
    }
    let len = (buf.len() - start - 8) as u32;
    buf[start + 4..start + 8].copy_from_slice(&len.to_le_bytes());
    let crc = crc32fast::hash(&buf[start..]);
    buf.extend_from_slice(&crc.to_le_bytes());
    (buf.len() - start) as u64
}

/// Every sensor's saved state from the records, in file order: its last
/// snapshot, and the readings recorded after it. Readings of a sensor with
/// no snapshot before them, and records of an unknown kind, are passed
/// over.
fn replay(records: &[(u32, &[u8])]) -> HashMap<u32, Saved> {
    let mut saved: HashMap<u32, Saved> = HashMap::new();
    for (id, payload) in records {
        match payload.split_first() {
            Some((&SNAPSHOT, state)) => {
                saved.insert(*id, Saved { snapshot: state.to_vec(), since: Vec::new() });
            }
            Some((&READINGS, readings)) => {
                let Some(s) = saved.get_mut(id) else { continue };
                s.since.extend(readings.chunks_exact(READING_LEN).map(|r| Reading {
                    seq: u64::from_le_bytes(r[0..8].try_into().unwrap_or_default()),
                    speed_kmh: u16::from_le_bytes(r[8..10].try_into().unwrap_or_default()),
                    timestamp_ms: u64::from_le_bytes(r[10..18].try_into().unwrap_or_default()),
                }));
            }
            _ => {}
        }
    }
    saved
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

    fn reading(seq: u64) -> Reading {
        Reading { seq, speed_kmh: 90 + seq as u16, timestamp_ms: 1_700_000_000_000 + seq }
    }

    fn snap(id: u32, state: &[u8]) -> (u32, Record<'_>) {
        (id, Record::Snapshot(state))
    }

    fn saved<'a>(opened: &'a Opened, id: u32) -> Option<(&'a [u8], Vec<u64>)> {
        opened.saved.get(&id).map(|s| (s.snapshot.as_slice(), s.since.iter().map(|r| r.seq).collect()))
    }

    #[test]
    fn the_newest_snapshot_and_the_readings_after_it_survive_reopen() {
        let dir = temp_dir("reopen");
        let (r1, r2, r3) = ([reading(1), reading(2)], [reading(3)], [reading(4)]);
        {
            let mut opened = StateStore::open(&dir).unwrap();
            assert!(opened.saved.is_empty());
            opened.store.append([snap(1, b"one"), snap(2, b"two")].into_iter()).unwrap();
            opened.store.append([(1, Record::Readings(&r1)), (2, Record::Readings(&r2))].into_iter()).unwrap();
            opened.store.append([snap(1, b"one again"), (1, Record::Readings(&r3))].into_iter()).unwrap();
        }
        let opened = StateStore::open(&dir).unwrap();
        assert_eq!(saved(&opened, 1), Some((&b"one again"[..], vec![4])));
        assert_eq!(saved(&opened, 2), Some((&b"two"[..], vec![3])));
        assert_eq!(opened.saved[&2].since, r2.to_vec(), "readings come back whole");
        assert_eq!(opened.torn_bytes, 0);
    }

    #[test]
    fn a_torn_tail_is_cut_off_and_earlier_records_kept() {
        let dir = temp_dir("torn");
        {
            let mut opened = StateStore::open(&dir).unwrap();
            opened.store.append([snap(7, b"committed")].into_iter()).unwrap();
            opened.store.append([(7, Record::Readings(&[reading(1)]))].into_iter()).unwrap();
        }
        let path = dir.join(FILE_NAME);
        let len = std::fs::metadata(&path).unwrap().len();
        OpenOptions::new().write(true).open(&path).unwrap().set_len(len - 3).unwrap();
        let opened = StateStore::open(&dir).unwrap();
        assert_eq!(saved(&opened, 7), Some((&b"committed"[..], vec![])));
        assert_eq!(opened.torn_bytes, 13 + 18 - 3);
        drop(opened);
        // The cut is durable: a second open finds a clean file.
        assert_eq!(StateStore::open(&dir).unwrap().torn_bytes, 0);
    }

    #[test]
    fn a_flipped_bit_ends_the_log_there() {
        let dir = temp_dir("crc");
        {
            let mut opened = StateStore::open(&dir).unwrap();
            opened.store.append([snap(1, b"good")].into_iter()).unwrap();
            opened.store.append([snap(2, b"flipped")].into_iter()).unwrap();
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
            opened.store.append([snap(9, b"other host's range"), (9, Record::Readings(&[reading(5)]))].into_iter()).unwrap();
            let big = vec![5u8; 300 << 10];
            for _ in 0..8 {
                opened.store.append([snap(1, &big)].into_iter()).unwrap();
            }
            assert!(opened.store.needs_compaction());
            opened.store.compact([(1, &b"latest"[..], &[reading(7)][..])].into_iter()).unwrap();
            assert!(!opened.store.needs_compaction());
            opened.store.append([snap(2, b"after")].into_iter()).unwrap();
        }
        assert!(std::fs::metadata(dir.join(FILE_NAME)).unwrap().len() < 200);
        let opened = StateStore::open(&dir).unwrap();
        assert_eq!(saved(&opened, 1), Some((&b"latest"[..], vec![7])));
        assert_eq!(saved(&opened, 2), Some((&b"after"[..], vec![])));
        assert_eq!(saved(&opened, 9), Some((&b"other host's range"[..], vec![5])));
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
