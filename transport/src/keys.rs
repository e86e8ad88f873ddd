//! CurveZMQ keys: Z85 text as `curve_keygen` prints it, in files an
//! operator can read, copy and rotate.
//!
//! A key file holds `public-key = "…"` and, for a secret key file, also
//! `secret-key = "…"`; `#` starts a comment. Secret files are written with
//! mode 0600 and refused when others can read them.

use std::fmt;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Why a key could not be made, read or written.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("{0:?} is not a CurveZMQ key (expected 40 Z85 characters)")]
    NotAKey(String),
    #[error("{}: {why}", path.display())]
    File { path: PathBuf, why: String },
    #[error("cannot generate a keypair: {0} (is libzmq built with libsodium?)")]
    Generate(String),
}

/// A CurveZMQ public key (32 bytes).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct PublicKey(pub [u8; 32]);

/// A CurveZMQ secret key (32 bytes). Not printed by `Debug`.
#[derive(Clone)]
pub struct SecretKey(pub [u8; 32]);

/// A public key with its secret key.
#[derive(Clone, Debug)]
pub struct Keypair {
    pub public: PublicKey,
    pub secret: SecretKey,
}

fn decode32(text: &str) -> Result<[u8; 32], KeyError> {
    let text = text.trim();
    if text.len() != 40 {
        return Err(KeyError::NotAKey(text.chars().take(48).collect()));
    }
    let bytes = zmq::z85_decode(text).map_err(|_| KeyError::NotAKey(text.to_string()))?;
    bytes.try_into().map_err(|_| KeyError::NotAKey(text.to_string()))
}

fn encode32(bytes: &[u8; 32]) -> String {
    // 32 bytes are a multiple of 4: Z85 encoding cannot fail.
    zmq::z85_encode(bytes).unwrap_or_default()
}

impl PublicKey {
    /// Parses 40 Z85 characters.
    pub fn from_z85(text: &str) -> Result<Self, KeyError> {
        decode32(text).map(PublicKey)
    }

    pub fn to_z85(&self) -> String {
        encode32(&self.0)
    }

    /// A key given on a command line: 40 Z85 characters, or the path of a
    /// key file (public or secret) to take the public key from.
    pub fn from_arg(arg: &str) -> Result<Self, KeyError> {
        if arg.len() == 40 && !Path::new(arg).exists() {
            return Self::from_z85(arg);
        }
        let path = Path::new(arg);
        let fields = read_fields(path)?;
        let public = field(&fields, "public-key", path)?;
        Self::from_z85(public).map_err(|e| file_err(path, e))
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_z85())
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({})", self.to_z85())
    }
}

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretKey(..)")
    }
}

fn file_err(path: &Path, e: impl fmt::Display) -> KeyError {
    KeyError::File { path: path.to_path_buf(), why: e.to_string() }
}

fn read_fields(path: &Path) -> Result<Vec<(String, String)>, KeyError> {
    let text = std::fs::read_to_string(path).map_err(|e| file_err(path, e))?;
    let mut fields = Vec::new();
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')) {
        let (name, value) = line
            .split_once('=')
            .ok_or_else(|| file_err(path, format!("expected `name = \"value\"`, found {line:?}")))?;
        fields.push((name.trim().to_string(), value.trim().trim_matches('"').to_string()));
    }
    Ok(fields)
}

fn field<'a>(fields: &'a [(String, String)], name: &str, path: &Path) -> Result<&'a str, KeyError> {
    fields
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.as_str())
        .ok_or_else(|| file_err(path, format!("no `{name}` in the file")))
}

impl Keypair {
    /// A new random keypair (libzmq's `zmq_curve_keypair`).
    pub fn generate() -> Result<Self, KeyError> {
        let pair = zmq::CurveKeyPair::new().map_err(|e| KeyError::Generate(e.to_string()))?;
        Ok(Keypair { public: PublicKey(pair.public_key), secret: SecretKey(pair.secret_key) })
    }

    /// Reads a secret key file written by [`Keypair::write`]; refuses one
    /// that others may read.
    pub fn read(path: &Path) -> Result<Self, KeyError> {
        let meta = std::fs::metadata(path).map_err(|e| file_err(path, e))?;
        if meta.permissions().mode() & 0o077 != 0 {
            return Err(file_err(
                path,
                format!(
                    "a secret key must be readable by its owner only (mode {:o}; chmod 600 it)",
                    meta.permissions().mode() & 0o777
                ),
            ));
        }
        let fields = read_fields(path)?;
        let public = PublicKey::from_z85(field(&fields, "public-key", path)?).map_err(|e| file_err(path, e))?;
        let secret = SecretKey(decode32(field(&fields, "secret-key", path)?).map_err(|e| file_err(path, e))?);
        Ok(Keypair { public, secret })
    }

    /// Writes `<base>.secret` (mode 0600, both keys) and `<base>.pub` (the
    /// public key, to hand out); refuses to overwrite either.
    pub fn write(&self, base: &Path) -> Result<(PathBuf, PathBuf), KeyError> {
        let secret_path = with_suffix(base, "secret");
        let public_path = with_suffix(base, "pub");
        let public = self.public.to_z85();
        let name = base.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        write_new(
            &secret_path,
            0o600,
            &format!(
                "# fog CurveZMQ secret key {name}: keep it on this machine, readable by its owner only\npublic-key = \"{public}\"\nsecret-key = \"{}\"\n",
                encode32(&self.secret.0)
            ),
        )?;
        write_new(&public_path, 0o644, &format!("# fog CurveZMQ public key {name}\npublic-key = \"{public}\"\n"))?;
        Ok((secret_path, public_path))
    }

    /// The X25519 shared secret of this key and `peer`'s: the same on both
    /// sides (mine with their public key, theirs with mine), and known to
    /// nobody else.
    pub fn shared_secret(&self, peer: &PublicKey) -> [u8; 32] {
        let secret = x25519_dalek::StaticSecret::from(self.secret.0);
        secret.diffie_hellman(&x25519_dalek::PublicKey::from(peer.0)).to_bytes()
    }
}

fn with_suffix(base: &Path, suffix: &str) -> PathBuf {
    let mut name = base.as_os_str().to_os_string();
    name.push(".");
    name.push(suffix);
    PathBuf::from(name)
}

fn write_new(path: &Path, mode: u32, text: &str) -> Result<(), KeyError> {
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|e| file_err(path, e))?;
    file.write_all(text.as_bytes()).and_then(|()| file.sync_all()).map_err(|e| file_err(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_through_files_and_secret_files_must_be_private() {
        let dir = std::env::temp_dir().join(format!("fog-keys-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let pair = Keypair::generate().unwrap();
        let (secret, public) = pair.write(&dir.join("host-a")).unwrap();
        let back = Keypair::read(&secret).unwrap();
        assert_eq!(back.public, pair.public);
        assert_eq!(back.secret.0, pair.secret.0);
        assert_eq!(PublicKey::from_arg(public.to_str().unwrap()).unwrap(), pair.public);
        assert_eq!(PublicKey::from_arg(&pair.public.to_z85()).unwrap(), pair.public);
        assert!(pair.write(&dir.join("host-a")).is_err(), "overwrote a key");
        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = Keypair::read(&secret).unwrap_err().to_string();
        assert!(err.contains("chmod 600"), "{err}");
        assert!(PublicKey::from_z85("short").is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_shared_secret_is_the_same_on_both_sides() {
        let a = Keypair::generate().unwrap();
        let b = Keypair::generate().unwrap();
        assert_eq!(a.shared_secret(&b.public), b.shared_secret(&a.public));
        let c = Keypair::generate().unwrap();
        assert_ne!(a.shared_secret(&b.public), a.shared_secret(&c.public));
    }
}
