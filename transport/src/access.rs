//! The authorized-keys file: which client keys a server lets in, and what
//! each may do (the fog counterpart of Mosquitto's ACL file or NATS
//! permissions).
//!
//! ```text
//! # PUBLIC-KEY                               NAME     RIGHTS
//! rq:rM>}U?@Lns47E1%kR.o@n%FcmmsL/@{H8]yf7   host-a   sensors=1-1000,2001-3000
//! Yne@$w-vo<fVvi]a<NY6T1ed:M$fCG*[IaLV{hID   ops      admin
//! JTKVSB%%)wK0E.X)V>+}o?pNmC{O&4W4b!Ni{Lh6   backup   peer
//! ```
//!
//! Rights: `sensors=RANGES` (send readings for those sensor ids; `*` for
//! all), `admin` (ask for status), `peer` (the other server of the pair,
//! on the state channel). A key may have several, separated by spaces.
//! The file is read at start and again on SIGHUP; a file that does not
//! parse is refused with the line number and the old list stays.

use std::collections::HashMap;
use std::ops::RangeInclusive;
use std::path::Path;

use crate::keys::PublicKey;

/// Most entries (keys) one file may hold.
pub const MAX_KEYS: usize = 100_000;
/// Most sensor-id ranges one key may hold.
pub const MAX_RANGES_PER_KEY: usize = 4096;

/// Why an authorized-keys file was refused.
#[derive(Debug, thiserror::Error)]
#[error("{path}:{line}: {why}")]
pub struct AccessError {
    pub path: String,
    pub line: usize,
    pub why: String,
}

/// What one key may do.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Rights {
    /// Sensor ids it may send readings for: sorted, non-overlapping.
    pub sensors: Vec<RangeInclusive<u32>>,
    pub admin: bool,
    pub peer: bool,
}

impl Rights {
    /// Every right: what a client has on a server run without keys.
    pub fn all() -> Self {
        Rights { sensors: vec![0..=u32::MAX], admin: true, peer: true }
    }

    /// Whether readings for `sensor_id` may come from this key.
    pub fn may_send_for(&self, sensor_id: u32) -> bool {
        let i = self.sensors.partition_point(|r| *r.end() < sensor_id);
        self.sensors.get(i).is_some_and(|r| r.contains(&sensor_id))
    }
}

/// One authorized key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Client {
    pub key: PublicKey,
    pub name: String,
    pub rights: Rights,
}

/// The keys a server lets in.
#[derive(Debug, Clone, Default)]
pub struct AccessList {
    clients: HashMap<PublicKey, Client>,
}

impl AccessList {
    /// Reads and checks an authorized-keys file.
    pub fn read(path: &Path) -> Result<Self, AccessError> {
        let text = std::fs::read_to_string(path).map_err(|e| AccessError {
            path: path.display().to_string(),
            line: 0,
            why: e.to_string(),
        })?;
        Self::parse(&text, &path.display().to_string())
    }

    /// Parses the text of an authorized-keys file (`origin` names it in errors).
    pub fn parse(text: &str, origin: &str) -> Result<Self, AccessError> {
        let mut clients = HashMap::new();
        for (n, line) in text.lines().enumerate() {
            let err = |why: String| AccessError { path: origin.to_string(), line: n + 1, why };
            // Z85 keys may contain '#': a comment is a line whose first word
            // is not a key, or the words from one starting with '#' after
            // the key and the name.
            let mut words = line.split_whitespace();
            let Some(key) = words.next() else { continue };
            let key = match PublicKey::from_z85(key) {
                Ok(key) => key,
                Err(_) if key.starts_with('#') => continue,
                Err(e) => return Err(err(e.to_string())),
            };
            let Some(name) = words.next().filter(|n| !n.starts_with('#')) else {
                return Err(err("expected `PUBLIC-KEY NAME RIGHTS…`".into()));
            };
            let mut rights = Rights::default();
            for word in words.take_while(|w| !w.starts_with('#')) {
                match word {
                    "admin" => rights.admin = true,
                    "peer" => rights.peer = true,
                    _ => match word.strip_prefix("sensors=") {
                        Some(ranges) => rights.sensors.extend(parse_ranges(ranges).map_err(&err)?),
                        None => return Err(err(format!("unknown right {word:?} (sensors=FIRST-LAST,…, admin or peer)"))),
                    },
                }
            }
            if rights == Rights::default() {
                return Err(err(format!("{name} has no rights (sensors=FIRST-LAST,…, admin or peer)")));
            }
            rights.sensors = normalize(rights.sensors);
            if rights.sensors.len() > MAX_RANGES_PER_KEY {
                return Err(err(format!("more than {MAX_RANGES_PER_KEY} sensor ranges")));
            }
            if clients.len() >= MAX_KEYS {
                return Err(err(format!("more than {MAX_KEYS} keys")));
            }
            let client = Client { key, name: name.to_string(), rights };
            if clients.insert(key, client).is_some() {
                return Err(err(format!("the key of {name} is listed twice")));
            }
        }
        if clients.values().filter(|c| c.rights.peer).count() > 1 {
            return Err(AccessError { path: origin.to_string(), line: 0, why: "more than one key has the `peer` right".into() });
        }
        Ok(AccessList { clients })
    }

    pub fn get(&self, key: &PublicKey) -> Option<&Client> {
        self.clients.get(key)
    }

    /// The other server of the pair, if listed.
    pub fn peer(&self) -> Option<&Client> {
        self.clients.values().find(|c| c.rights.peer)
    }

    pub fn len(&self) -> usize {
        self.clients.len()
    }

    pub fn is_empty(&self) -> bool {
        self.clients.is_empty()
    }
}

fn parse_ranges(text: &str) -> Result<Vec<RangeInclusive<u32>>, String> {
    if text == "*" {
        return Ok(vec![0..=u32::MAX]);
    }
    text.split(',')
        .map(|part| {
            let bad = || format!("{part:?} is not a sensor id or FIRST-LAST range");
            let (first, last) = part.split_once('-').unwrap_or((part, part));
            let first: u32 = first.parse().map_err(|_| bad())?;
            let last: u32 = last.parse().map_err(|_| bad())?;
            if first > last {
                return Err(bad());
            }
            Ok(first..=last)
        })
        .collect()
}

/// Sorts ranges and merges overlapping or adjacent ones.
fn normalize(mut ranges: Vec<RangeInclusive<u32>>) -> Vec<RangeInclusive<u32>> {
    ranges.sort_by_key(|r| *r.start());
    let mut out: Vec<RangeInclusive<u32>> = Vec::with_capacity(ranges.len());
    for r in ranges {
        match out.last_mut() {
            Some(last) if *r.start() <= last.end().saturating_add(1) => {
                *last = *last.start()..=(*last.end()).max(*r.end());
            }
            _ => out.push(r),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::Keypair;

    #[test]
    fn parses_rights_and_checks_sensor_ids() {
        let (a, b, c) = (Keypair::generate().unwrap(), Keypair::generate().unwrap(), Keypair::generate().unwrap());
        let text = format!(
            "# hosts\n{} host-a sensors=1-10,20,11-12 # twelve and one\n{} ops admin\n\n{} backup peer\n",
            a.public, b.public, c.public
        );
        let list = AccessList::parse(&text, "keys").unwrap();
        let host = list.get(&a.public).unwrap();
        assert_eq!(host.name, "host-a");
        assert_eq!(host.rights.sensors, vec![1..=12, 20..=20]);
        for (id, ok) in [(0, false), (1, true), (12, true), (13, false), (20, true), (21, false), (u32::MAX, false)] {
            assert_eq!(host.rights.may_send_for(id), ok, "sensor {id}");
        }
        assert!(list.get(&b.public).unwrap().rights.admin);
        assert!(!list.get(&b.public).unwrap().rights.may_send_for(1));
        assert_eq!(list.peer().unwrap().name, "backup");
        assert!(Rights::all().may_send_for(u32::MAX));
    }

    #[test]
    fn refuses_bad_files_with_the_line() {
        let a = Keypair::generate().unwrap();
        for (text, needle) in [
            (format!("{} host-a\n", a.public), ":1: host-a has no rights"),
            (format!("\n{} host-a sensors=5-1\n", a.public), ":2: \"5-1\""),
            (format!("{} host-a sensors=1 root\n", a.public), "unknown right \"root\""),
            ("notakey host-a admin\n".to_string(), "not a CurveZMQ key"),
            (format!("{0} a admin\n{0} b admin\n", a.public), "listed twice"),
        ] {
            let err = AccessList::parse(&text, "keys").unwrap_err().to_string();
            assert!(err.contains(needle), "{err:?} lacks {needle:?}");
        }
    }
}
