//! CurveZMQ keys for a test's server pair: one keypair for each server,
//! for an admin and for every client the test names, written into the
//! test's scratch dir as `fog-server keygen` would, with each server's
//! authorized-keys file (the clients, the admin, and the other server as
//! `peer`).
//!
//! [`PairKeys`] hands out the extra arguments of `fog-server` and
//! `fog-host`, the [`StatusAuth`] that `fog-server status` needs, and the
//! keypairs themselves for tests that talk to a server with
//! `fog_transport` directly.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use fog_transport::{Keypair, PublicKey};

/// One keypair and the files it was written to.
#[derive(Debug, Clone)]
pub struct KeyFiles {
    pub name: String,
    pub pair: Keypair,
    /// `<name>.secret`: both keys, mode 0600.
    pub secret: PathBuf,
    /// `<name>.pub`: the public key.
    pub public: PathBuf,
}

impl KeyFiles {
    fn generate(dir: &Path, name: &str) -> anyhow::Result<KeyFiles> {
        let pair = Keypair::generate().context("cannot generate a CurveZMQ keypair")?;
        let (secret, public) = pair.write(&dir.join(name)).with_context(|| format!("cannot write the keys of {name}"))?;
        Ok(KeyFiles { name: name.to_string(), pair, secret, public })
    }
}

/// What `fog-server status` authenticates with against a server run with
/// keys: a secret key with the `admin` right, and the server's public key.
#[derive(Debug, Clone)]
pub struct StatusAuth {
    pub key: PathBuf,
    pub server_key: PathBuf,
}

impl StatusAuth {
    /// `--key FILE --server-key FILE`.
    pub fn args(&self) -> Vec<String> {
        vec![
            "--key".into(),
            self.key.display().to_string(),
            "--server-key".into(),
            self.server_key.display().to_string(),
        ]
    }
}

/// The keys of a server pair and of its clients.
#[derive(Debug, Clone)]
pub struct PairKeys {
    pub primary: KeyFiles,
    pub backup: KeyFiles,
    /// A key with the `admin` right only.
    pub admin: KeyFiles,
    /// Client keys with their rights as written in the authorized-keys files.
    pub clients: Vec<(KeyFiles, String)>,
    /// The authorized-keys file of each server.
    pub primary_authorized: PathBuf,
    pub backup_authorized: PathBuf,
}

impl PairKeys {
    /// Generates keys in `dir/keys` for both servers, an admin (`admin`)
    /// and each `(name, rights)` of `clients` (rights as in the
    /// authorized-keys file: `sensors=1-20`, `sensors=1-5 admin` ...), and
    /// writes both authorized-keys files.
    pub fn generate(dir: &Path, clients: &[(&str, &str)]) -> anyhow::Result<PairKeys> {
        let keys_dir = dir.join("keys");
        std::fs::create_dir_all(&keys_dir).with_context(|| format!("cannot create {}", keys_dir.display()))?;
        for reserved in ["primary", "backup", "admin"] {
            if clients.iter().any(|(name, _)| *name == reserved) {
                bail!("{reserved:?} names a server or the admin key; give the client another name");
            }
        }
        let primary = KeyFiles::generate(&keys_dir, "primary")?;
        let backup = KeyFiles::generate(&keys_dir, "backup")?;
        let admin = KeyFiles::generate(&keys_dir, "admin")?;
        let clients = clients
            .iter()
            .map(|(name, rights)| Ok((KeyFiles::generate(&keys_dir, name)?, rights.to_string())))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let mut common = format!("# written by fog-testkit\n{} admin admin\n", admin.pair.public);
        for (client, rights) in &clients {
            common.push_str(&format!("{} {} {rights}\n", client.pair.public, client.name));
        }
        let write = |file: &str, peer: &KeyFiles| -> anyhow::Result<PathBuf> {
            let path = keys_dir.join(file);
            let text = format!("{common}{} {} peer\n", peer.pair.public, peer.name);
            std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))?;
            Ok(path)
        };
        let primary_authorized = write("primary.authorized", &backup)?;
        let backup_authorized = write("backup.authorized", &primary)?;
        Ok(PairKeys { primary, backup, admin, clients, primary_authorized, backup_authorized })
    }

    fn server(&self, primary: bool) -> &KeyFiles {
        if primary { &self.primary } else { &self.backup }
    }

    /// `--key FILE --authorized-keys FILE` for one server of the pair.
    pub fn server_args(&self, primary: bool) -> Vec<String> {
        let authorized = if primary { &self.primary_authorized } else { &self.backup_authorized };
        vec![
            "--key".into(),
            self.server(primary).secret.display().to_string(),
            "--authorized-keys".into(),
            authorized.display().to_string(),
        ]
    }

    /// The public key of one server, for a client connecting to it.
    pub fn server_public(&self, primary: bool) -> PublicKey {
        self.server(primary).pair.public
    }

    /// The keys of the client named `name`.
    pub fn client(&self, name: &str) -> anyhow::Result<&KeyFiles> {
        self.clients
            .iter()
            .map(|(k, _)| k)
            .find(|k| k.name == name)
            .with_context(|| format!("no client key named {name:?} (the clients are given to PairKeys::generate)"))
    }

    /// `--key FILE --server-keys PRIMARY.pub,BACKUP.pub` for a `fog-host`
    /// using the key of client `name`.
    pub fn host_args(&self, name: &str) -> anyhow::Result<Vec<String>> {
        let client = self.client(name)?;
        Ok(vec![
            "--key".into(),
            client.secret.display().to_string(),
            "--server-keys".into(),
            format!("{},{}", self.primary.public.display(), self.backup.public.display()),
        ])
    }

    /// The admin's [`StatusAuth`] for one server of the pair.
    pub fn admin_status(&self, primary: bool) -> StatusAuth {
        StatusAuth { key: self.admin.secret.clone(), server_key: self.server(primary).public.clone() }
    }

    /// A [`StatusAuth`] with the key of client `name` (for checking that a
    /// key without `admin` is refused).
    pub fn client_status(&self, name: &str, primary: bool) -> anyhow::Result<StatusAuth> {
        Ok(StatusAuth { key: self.client(name)?.secret.clone(), server_key: self.server(primary).public.clone() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_keys_and_authorized_files_the_transport_accepts() {
        let dir = crate::scratch_dir("keys-fixture").unwrap();
        let keys = PairKeys::generate(&dir, &[("host", "sensors=1-20"), ("rogue", "sensors=9000-9999")]).unwrap();
        let list = fog_transport::AccessList::read(&keys.primary_authorized).unwrap();
        assert_eq!(list.len(), 4, "admin, two clients and the peer");
        assert_eq!(list.peer().map(|c| c.key), Some(keys.backup.pair.public));
        let backup_list = fog_transport::AccessList::read(&keys.backup_authorized).unwrap();
        assert_eq!(backup_list.peer().map(|c| c.key), Some(keys.primary.pair.public));
        let host = list.get(&keys.client("host").unwrap().pair.public).unwrap();
        assert!(host.rights.may_send_for(20) && !host.rights.may_send_for(21) && !host.rights.admin);
        assert!(list.get(&keys.admin.pair.public).unwrap().rights.admin);
        let back = Keypair::read(&keys.client("rogue").unwrap().secret).unwrap();
        assert_eq!(back.public, keys.client("rogue").unwrap().pair.public);
        assert!(keys.client("nobody").is_err());
        assert!(PairKeys::generate(&crate::scratch_dir("keys-fixture").unwrap(), &[("admin", "admin")]).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
