//! The server pair a benchmark measures, with or without CurveZMQ.
//!
//! Without keys the servers listen on loopback in the clear, as they do for
//! a developer. With [`Security::Curve`] the benchmark makes throwaway keys
//! in its scratch dir, as an operator would with `fog-server keygen`: one
//! per server, one for the load generator and hosts (`sensors=*`) and one
//! for status queries (`admin`); each server's authorized-keys file lists
//! the other server as its `peer`. Every process then runs with the flags
//! a deployment uses (`--key`, `--authorized-keys`, `--server-keys`), so the
//! two rows of a figure differ only in the security.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use fog_testkit::{Proc, bin};
use fog_protocol::StatusReport;
use fog_server::ClientKeys;
use fog_transport::{Keypair, PublicKey};
use serde::Serialize;

/// How the benchmark's processes talk to each other.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Security {
    /// No keys: plain ZMTP on loopback.
    None,
    /// CurveZMQ on every socket, clients checked against authorized keys.
    Curve,
}

impl Security {
    pub fn name(self) -> &'static str {
        match self {
            Security::None => "none",
            Security::Curve => "curve",
        }
    }
}

/// Where a client connects: the address and, with CurveZMQ, its own keys
/// and the server's public key.
#[derive(Debug, Clone)]
pub struct Endpoint {
    pub address: String,
    pub curve: Option<(Keypair, PublicKey)>,
}

/// Throwaway keys of one benchmark, written to its scratch dir.
pub struct Keys {
    dir: PathBuf,
    primary: Keypair,
    backup: Keypair,
    /// The load generator's and the hosts' key: `sensors=*`.
    client: Keypair,
    /// Status queries: `admin`.
    admin: Keypair,
}

impl Keys {
    pub fn generate(dir: &Path) -> anyhow::Result<Keys> {
        let write = |name: &str| -> anyhow::Result<Keypair> {
            let keys = Keypair::generate()?;
            keys.write(&dir.join(name))?;
            Ok(keys)
        };
        let keys = Keys {
            dir: dir.to_path_buf(),
            primary: write("primary")?,
            backup: write("backup")?,
            client: write("client")?,
            admin: write("admin")?,
        };
        for (server, peer, peer_name) in [("primary", &keys.backup, "backup"), ("backup", &keys.primary, "primary")] {
            let text = format!(
                "# authorized keys of the {server} (fog-bench)\n{} {peer_name} peer\n{} bench-client sensors=*\n{} bench-admin admin\n",
                peer.public, keys.client.public, keys.admin.public
            );
            let path = dir.join(format!("{server}.authorized-keys"));
            std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))?;
        }
        Ok(keys)
    }

    fn server(&self, primary: bool) -> &Keypair {
        if primary { &self.primary } else { &self.backup }
    }

    /// `--key` and `--authorized-keys` of a server (or of the echo).
    pub fn server_args(&self, primary: bool) -> Vec<String> {
        let name = if primary { "primary" } else { "backup" };
        vec![
            "--key".into(),
            self.dir.join(format!("{name}.secret")).display().to_string(),
            "--authorized-keys".into(),
            self.dir.join(format!("{name}.authorized-keys")).display().to_string(),
        ]
    }

    /// The load generator's keys for talking to one server.
    pub fn client(&self, primary: bool) -> (Keypair, PublicKey) {
        (self.client.clone(), self.server(primary).public)
    }
}

/// A primary and a backup on free loopback ports, in one security mode.
pub struct ServerPair {
    pub endpoints: fog_testkit::Pair,
    keys: Option<Keys>,
    dir: PathBuf,
    /// Each server's `/metrics` address (`IP:PORT`), or `None` when they
    /// run with `--metrics-bind off`.
    pub metrics: Option<[String; 2]>,
}

impl ServerPair {
    /// Chooses the ports and, with CurveZMQ, writes the keys into `dir`;
    /// starts nothing.
    pub fn new(security: Security, dir: &Path) -> anyhow::Result<ServerPair> {
        let keys = match security {
            Security::None => None,
            Security::Curve => Some(Keys::generate(dir)?),
        };
        let port = || -> anyhow::Result<String> { Ok(format!("127.0.0.1:{}", fog_testkit::free_port()?)) };
        Ok(ServerPair { endpoints: fog_testkit::Pair::on_free_ports()?, keys, dir: dir.to_path_buf(), metrics: Some([port()?, port()?]) })
    }

    /// The same pair with its metrics endpoints off.
    pub fn without_metrics(self) -> ServerPair {
        ServerPair { metrics: None, ..self }
    }

    /// Starts one server (its data dir in the scratch dir) without waiting.
    pub fn spawn(&self, primary: bool) -> anyhow::Result<Proc> {
        let (name, mut args) = fog_testkit::server_args(&self.endpoints, primary, &[], &self.dir);
        if let Some(keys) = &self.keys {
            args.extend(keys.server_args(primary));
        }
        let metrics = self.metrics.as_ref().map_or("off".to_string(), |m| m[usize::from(!primary)].clone());
        args.extend(["--metrics-bind".to_string(), metrics]);
        Proc::spawn(name, &bin("fog-server")?, &args, &self.dir)
    }

    /// Starts one server and waits until it answers a status query.
    pub fn start(&self, primary: bool) -> anyhow::Result<Proc> {
        let proc = self.spawn(primary)?;
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            match fog_server::query_status_blocking(self.frontend_address(primary), Duration::from_millis(500), self.status_keys(primary).as_ref()) {
                Ok(_) => return Ok(proc),
                Err(e) if Instant::now() > deadline => {
                    bail!("{} did not answer status within 20 s ({e}):\n{}", proc.name, proc.log_tail(20))
                }
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }

    pub fn frontend_address(&self, primary: bool) -> &str {
        self.endpoints.frontend(primary)
    }

    /// Where the load generator sends its batches.
    pub fn frontend(&self, primary: bool) -> Endpoint {
        Endpoint { address: self.frontend_address(primary).to_string(), curve: self.keys.as_ref().map(|k| k.client(primary)) }
    }

    fn status_keys(&self, primary: bool) -> Option<ClientKeys> {
        self.keys.as_ref().map(|k| ClientKeys { keys: k.admin.clone(), server: k.server(primary).public })
    }

    /// One status query (with the admin key under CurveZMQ).
    pub async fn status(&self, primary: bool, timeout: Duration) -> anyhow::Result<StatusReport> {
        let address = self.frontend_address(primary);
        fog_server::query_status(address, timeout, self.status_keys(primary).as_ref())
            .await
            .with_context(|| format!("status of {address}"))
    }

    /// `--servers` and, under CurveZMQ, `--key` and `--server-keys` of a
    /// `fog-host` serving sensors against this pair.
    pub fn host_args(&self) -> Vec<String> {
        let mut args = vec!["--servers".to_string(), self.endpoints.servers()];
        if let Some(keys) = &self.keys {
            // The .pub files rather than the keys' text: a Z85 key may
            // start with `-`, which a command line takes for a flag.
            args.extend([
                "--key".to_string(),
                keys.dir.join("client.secret").display().to_string(),
                format!("--server-keys={},{}", keys.dir.join("primary.pub").display(), keys.dir.join("backup.pub").display()),
            ]);
        }
        args
    }
}
