//! A NATS JetStream cluster on loopback for the uplink's tests, benchmark
//! and verifier: real `nats-server` processes (Debian's package, 2.9.10
//! here), each node with its own client, route and monitoring port (all
//! from [`free_port`]) and its own store dir, killed on drop.
//!
//! The kit is synchronous; it drives the `async-nats` client on a small
//! tokio runtime of its own, so every method may be called from a plain
//! test thread and from inside another runtime alike (it blocks the caller
//! until the answer or its deadline).
//!
//! Without `nats-server` a test says it is skipped, unless
//! `FOG_REQUIRE_NATS=1` (set by `.ci/run`) makes it fail: see
//! [`require_nats`].
//!
//! # Authentication
//!
//! With [`NatsAuth::Site`] or [`NatsAuth::Sites`] the cluster runs in NATS
//! operator mode (decentralised JWT authentication, `resolver: MEMORY`):
//! the kit makes an operator, a system account and an account `FOG` with
//! JetStream, and in `FOG` one user per site and an admin user for the
//! kit itself. No secret is written into the servers' config: a server
//! holds the account JWTs only, and a client proves its identity by
//! signing the server's nonce with its user key (ed25519).
//!
//! Each user's credentials are a standard NATS **`.creds` file** (what
//! `nsc` writes and `async_nats::ConnectOptions::with_credentials_file`,
//! the `nats` CLI's `--creds` and every NATS client read):
//!
//! ```text
//! -----BEGIN NATS USER JWT-----
//! eyJ0eXAiOiJKV1QiLCJhbGciOiJlZDI1NTE5LW5rZXkifQ.eyJqdGkiOi...
//! ------END NATS USER JWT------
//!
//! ************************* IMPORTANT *************************
//! NKEY Seed printed below can be used to sign and prove identity.
//! NKEYs are sensitive and should be treated as secrets.
//!
//! -----BEGIN USER NKEY SEED-----
//! SUAM...
//! ------END USER NKEY SEED------
//!
//! *************************************************************
//! ```
//!
//! The JWT names the user and its permissions (signed by the account);
//! the seed is the user's private key. The files are written mode 0600.
//! `fog-server --uplink-creds FILE` takes such a file.
//!
//! Permissions of a site user: publish to its subjects and to the
//! JetStream API (`$JS.API.>`: stream info, message get, publish acks come
//! back on an inbox), subscribe to inboxes (`_INBOX.>`) only. Its subjects
//! are `fog.>` for [`NatsAuth::Site`] (one user, named `site`) and
//! `fog.<name>.>` for each name of [`NatsAuth::Sites`], so one site cannot
//! publish as another. The admin user may do anything in the account: the
//! kit creates and reads streams with it.
//!
//! With [`NatsAuth::Open`] any client may connect and no file is written.

use std::collections::BTreeMap;
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, anyhow, bail};
use async_nats::jetstream;
use futures_util::StreamExt;
use serde_json::{Value, json};

use crate::{Proc, free_port, wait_for};

/// Set to `1` where tests must not skip for want of `nats-server`.
pub const REQUIRE_ENV: &str = "FOG_REQUIRE_NATS";

/// The name of the cluster (its route handshake checks it).
pub const CLUSTER_NAME: &str = "fog-cloud";

/// The account every user of an authenticated cluster belongs to.
pub const ACCOUNT_NAME: &str = "FOG";

/// How long a cluster may take to start, or a node to come back, before
/// the kit gives up.
const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// The most sequences [`NatsCluster::read_stream`] reads.
const MAX_READ: u64 = 10_000_000;

/// How long one JetStream API request or publish ack may take.
const API_TIMEOUT: Duration = Duration::from_secs(5);

/// The `nats-server` binary: `$PATH` first, then where Debian puts it.
pub fn nats_server() -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/usr/bin")])
        .map(|dir| dir.join("nats-server"))
        .find(|candidate| candidate.is_file())
}

/// Whether `nats-server` is required here (see [`REQUIRE_ENV`]).
pub fn required() -> bool {
    std::env::var(REQUIRE_ENV).is_ok_and(|v| v == "1")
}

/// What a test does without `nats-server`: says it is skipped (`Ok`), or
/// fails when [`REQUIRE_ENV`] says it must be there.
pub fn skip_or_fail(test: &str, why: &str) -> anyhow::Result<()> {
    if required() {
        bail!("{test}: nats-server is required ({REQUIRE_ENV}=1) but unavailable: {why}");
    }
    eprintln!("[{test}] SKIPPED: {why}; {REQUIRE_ENV}=1 makes it fail instead");
    Ok(())
}

/// The `nats-server` a test runs, or `None` when it is missing and the
/// test is to skip (said on stderr); an error when it is missing and
/// [`REQUIRE_ENV`] is set. Typical use:
///
/// ```no_run
/// # fn main() -> anyhow::Result<()> {
/// let Some(_server) = fog_testkit::nats::require_nats("my_test")? else { return Ok(()) };
/// # Ok(()) }
/// ```
pub fn require_nats(test: &str) -> anyhow::Result<Option<PathBuf>> {
    match nats_server() {
        Some(path) => Ok(Some(path)),
        None => skip_or_fail(test, "nats-server is not installed (apt-get install nats-server)").map(|()| None),
    }
}

/// Who may connect to a [`NatsCluster`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NatsAuth {
    /// Anyone (no authentication).
    Open,
    /// One site user, `site`, that may publish to `fog.>`.
    Site,
    /// One user per name, each of which may publish to `fog.<name>.>` only.
    Sites(Vec<String>),
}

/// One message as a stream holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredMessage {
    /// Its stream sequence.
    pub seq: u64,
    pub subject: String,
    /// Its headers, sorted by name (then value), one pair per value.
    pub headers: Vec<(String, String)>,
    pub payload: Vec<u8>,
}

impl StoredMessage {
    /// The (first) value of header `name`, compared case-insensitively.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
}

/// One message to publish with [`NatsCluster::publish`] or [`publish_pipelined`].
#[derive(Debug, Clone)]
pub struct Outgoing {
    pub subject: String,
    /// `Nats-Msg-Id`: JetStream drops a second message with the same id
    /// inside the stream's duplicate window.
    pub msg_id: Option<String>,
    /// `Nats-Expected-Last-Sequence`: JetStream refuses the message unless
    /// the stream's last sequence is this.
    pub expected_last_seq: Option<u64>,
    /// More headers.
    pub headers: Vec<(String, String)>,
    pub payload: Vec<u8>,
}

impl Outgoing {
    /// A message with an id and no other header.
    pub fn with_id(subject: &str, msg_id: &str, payload: impl Into<Vec<u8>>) -> Outgoing {
        Outgoing {
            subject: subject.to_string(),
            msg_id: Some(msg_id.to_string()),
            expected_last_seq: None,
            headers: Vec::new(),
            payload: payload.into(),
        }
    }
}

/// JetStream's answer to one published message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Acked {
    /// The stream sequence the message has (for a duplicate: the sequence
    /// of the message it duplicates).
    pub seq: u64,
    /// The stream already had a message with this id (inside the window)
    /// and did not store this one.
    pub duplicate: bool,
}

/// A stream's state as its leader reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamState {
    pub messages: u64,
    pub first_seq: u64,
    pub last_seq: u64,
    /// The server name of its leader (`n0`, `n1` ...), if it has one.
    pub leader: Option<String>,
}

/// One node of a cluster: where it listens and its files.
#[derive(Debug, Clone)]
pub struct NatsNode {
    /// Its server name, `n<i>`.
    pub name: String,
    pub client_port: u16,
    pub route_port: u16,
    pub monitor_port: u16,
    pub config: PathBuf,
    pub store_dir: PathBuf,
}

impl NatsNode {
    /// Its client URL, `nats://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.client_port)
    }

    /// Its monitoring endpoint, `127.0.0.1:PORT`.
    pub fn monitor(&self) -> String {
        format!("127.0.0.1:{}", self.monitor_port)
    }
}

/// A JetStream cluster of 1 or 3 `nats-server` processes on loopback,
/// killed when dropped.
pub struct NatsCluster {
    dir: PathBuf,
    server: PathBuf,
    nodes: Vec<NatsNode>,
    procs: Vec<Option<Proc>>,
    /// How often each node was started, for its log's name.
    starts: Vec<u32>,
    creds: Creds,
    runtime: Option<tokio::runtime::Runtime>,
    /// The kit's own connection (the admin user), made on first use and
    /// kept: it reconnects by itself when nodes die and come back.
    admin: Mutex<Option<async_nats::Client>>,
}

/// The credentials files of a cluster (all empty for [`NatsAuth::Open`]).
#[derive(Debug, Clone, Default)]
struct Creds {
    admin: Option<PathBuf>,
    sites: BTreeMap<String, PathBuf>,
    /// The site users' JWTs, by site, to forge files from.
    site_jwts: BTreeMap<String, String>,
}

impl NatsCluster {
    /// Starts `nodes` (1 or 3) JetStream servers on loopback with their
    /// files under `dir` and waits until the cluster has a JetStream meta
    /// leader that every node knows and every node reports itself healthy,
    /// at most 60 s.
    pub fn start(dir: &Path, nodes: usize, auth: NatsAuth) -> anyhow::Result<NatsCluster> {
        NatsCluster::start_listening(dir, nodes, auth, IpAddr::V4(Ipv4Addr::LOCALHOST))
    }

    /// [`NatsCluster::start`] with the client ports bound to `listen`
    /// instead of loopback: `0.0.0.0` lets processes in network namespaces
    /// reach the cluster over their link's root-side address (see
    /// [`NatsCluster::urls_via`]). Routes and monitoring stay on loopback,
    /// and beyond loopback the servers advertise no addresses of their own
    /// to clients (`no_advertise`), so a client keeps to the URLs it was
    /// given.
    pub fn start_listening(dir: &Path, nodes: usize, auth: NatsAuth, listen: IpAddr) -> anyhow::Result<NatsCluster> {
        let Some(server) = nats_server() else { bail!("nats-server is not installed (apt-get install nats-server)") };
        if nodes != 1 && nodes != 3 {
            bail!("a NATS cluster of the kit has 1 or 3 nodes, not {nodes}");
        }
        if let NatsAuth::Sites(names) = &auth {
            if names.is_empty() {
                bail!("NatsAuth::Sites needs at least one site name");
            }
            if let Some(bad) = names.iter().find(|n| !valid_token(n)) {
                bail!("site name {bad:?} is not one subject token (letters, digits, - and _)");
            }
        }
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let mut node_list = Vec::with_capacity(nodes);
        for i in 0..nodes {
            let name = format!("n{i}");
            node_list.push(NatsNode {
                config: dir.join(format!("nats-{name}.conf")),
                store_dir: dir.join(format!("nats-{name}-store")),
                name,
                client_port: free_port()?,
                route_port: free_port()?,
                monitor_port: free_port()?,
            });
        }
        let (auth_config, creds) = match &auth {
            NatsAuth::Open => (String::new(), Creds::default()),
            NatsAuth::Site => operator_mode(dir, &[("site".to_string(), "fog.>".to_string())])?,
            NatsAuth::Sites(names) => {
                let users: Vec<(String, String)> = names.iter().map(|n| (n.clone(), format!("fog.{n}.>"))).collect();
                operator_mode(dir, &users)?
            }
        };
        for node in &node_list {
            let config = node_config(node, &node_list, &auth_config, listen);
            std::fs::write(&node.config, config).with_context(|| format!("cannot write {}", node.config.display()))?;
        }
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("fog-testkit-nats")
            .enable_all()
            .build()
            .context("cannot start the NATS client's runtime")?;
        let mut cluster = NatsCluster {
            dir: dir.to_path_buf(),
            server,
            procs: (0..nodes).map(|_| None).collect(),
            starts: vec![0; nodes],
            nodes: node_list,
            creds,
            runtime: Some(runtime),
            admin: Mutex::new(None),
        };
        for i in 0..nodes {
            cluster.spawn(i)?;
        }
        cluster.wait_ready(&(0..nodes).collect::<Vec<_>>())?;
        Ok(cluster)
    }

    /// The nodes, whether running or not.
    pub fn nodes(&self) -> &[NatsNode] {
        &self.nodes
    }

    /// Every node's client URL, comma-separated (`nats://127.0.0.1:P0,...`),
    /// as `fog-server --uplink` takes them. (async-nats does not split such
    /// a string itself: split it on `,` and pass the list.)
    pub fn urls(&self) -> String {
        self.nodes.iter().map(NatsNode::url).collect::<Vec<_>>().join(",")
    }

    /// Every node's client URL at `host` instead of loopback,
    /// comma-separated: for a cluster started with
    /// [`NatsCluster::start_listening`] on an address that covers `host`.
    pub fn urls_via(&self, host: IpAddr) -> String {
        let host = match host {
            IpAddr::V6(v6) => format!("[{v6}]"),
            IpAddr::V4(v4) => v4.to_string(),
        };
        self.nodes.iter().map(|n| format!("nats://{host}:{}", n.client_port)).collect::<Vec<_>>().join(",")
    }

    /// The processes of the running nodes (for their pid and memory).
    pub fn procs(&self) -> impl Iterator<Item = &Proc> {
        self.procs.iter().flatten()
    }

    /// The credentials file of the site user (`site` for [`NatsAuth::Site`],
    /// the first name of [`NatsAuth::Sites`]); `None` for an open cluster.
    pub fn creds(&self) -> Option<&Path> {
        self.creds.sites.values().next().map(PathBuf::as_path)
    }

    /// The credentials file of the site user `site`, if there is one.
    pub fn site_creds(&self, site: &str) -> Option<&Path> {
        self.creds.sites.get(site).map(PathBuf::as_path)
    }

    /// The credentials file of the kit's admin user (anything in the
    /// account); `None` for an open cluster.
    pub fn admin_creds(&self) -> Option<&Path> {
        self.creds.admin.as_deref()
    }

    /// Writes a credentials file at `path` that names the site user `site`
    /// (its real, signed JWT) with a key that is not its own: what someone
    /// who copied the JWT but not the seed would have. The servers must
    /// refuse it.
    pub fn write_forged_creds(&self, site: &str, path: &Path) -> anyhow::Result<()> {
        let jwt = self.creds.site_jwts.get(site).with_context(|| format!("no site user {site:?} in this cluster"))?;
        let seed = nkeys::KeyPair::new_user().seed().map_err(|e| anyhow!("cannot make a user key: {e}"))?;
        write_secret(path, &creds_file(jwt, &seed))
    }

    /// Whether node `i` is running (started and not killed).
    pub fn is_running(&self, i: usize) -> bool {
        self.procs.get(i).is_some_and(Option::is_some)
    }

    /// The log file of node `i`'s latest start.
    pub fn log(&self, i: usize) -> Option<&Path> {
        self.procs.get(i)?.as_ref().map(|p| p.log.as_path())
    }

    /// `kill -9` of node `i`; waits until it is gone.
    pub fn kill(&mut self, i: usize) -> anyhow::Result<()> {
        let slot = self.procs.get_mut(i).with_context(|| format!("no NATS node {i}"))?;
        let mut proc = slot.take().with_context(|| format!("NATS node {i} is not running"))?;
        proc.kill()
    }

    /// Starts node `i` again (after [`NatsCluster::kill`]) on the same ports
    /// with the same store, and waits until it is healthy (its JetStream
    /// state is current) and knows the meta leader, at most 60 s.
    pub fn restart(&mut self, i: usize) -> anyhow::Result<()> {
        if i >= self.nodes.len() {
            bail!("no NATS node {i}");
        }
        if self.is_running(i) {
            bail!("NATS node {i} is running: kill it first");
        }
        self.spawn(i)?;
        self.wait_ready(&[i])
    }

    /// Starts node `i` again if it is not running, without waiting for it:
    /// the caller goes on while it rejoins ([`NatsCluster::start_all`]
    /// waits until the whole cluster is ready).
    pub fn launch(&mut self, i: usize) -> anyhow::Result<()> {
        if i >= self.nodes.len() {
            bail!("no NATS node {i}");
        }
        if !self.is_running(i) {
            self.spawn(i)?;
        }
        Ok(())
    }

    /// `kill -9` of every running node: the whole cluster down.
    pub fn stop_all(&mut self) -> anyhow::Result<()> {
        for i in 0..self.nodes.len() {
            if self.is_running(i) {
                self.kill(i)?;
            }
        }
        Ok(())
    }

    /// Starts every node that is not running and waits until the cluster
    /// is ready again (as [`NatsCluster::start`] does).
    pub fn start_all(&mut self) -> anyhow::Result<()> {
        for i in 0..self.nodes.len() {
            if !self.is_running(i) {
                self.spawn(i)?;
            }
        }
        self.wait_ready(&(0..self.nodes.len()).collect::<Vec<_>>())
    }

    /// The node that leads `stream`, as the stream's leader itself reports
    /// it (`None` when the stream has no leader now, or cannot be asked).
    pub fn stream_leader(&self, stream: &str) -> Option<usize> {
        let leader = self.stream_state(stream).ok()?.leader?;
        self.nodes.iter().position(|n| n.name == leader)
    }

    /// The state of `stream` (messages, first and last sequence, leader).
    pub fn stream_state(&self, stream: &str) -> anyhow::Result<StreamState> {
        let js = self.admin_js()?;
        let name = stream.to_string();
        let info = self.run(API_TIMEOUT * 2, async move {
            let stream = js.get_stream_no_info(&name).await?;
            anyhow::Ok(stream.get_info().await?)
        })??;
        Ok(StreamState {
            messages: info.state.messages,
            first_seq: info.state.first_sequence,
            last_seq: info.state.last_sequence,
            // A single server leads what it holds (standalone JetStream
            // names no leader).
            leader: info.cluster.and_then(|c| c.leader).filter(|l| !l.is_empty()).or_else(|| (self.nodes.len() == 1).then(|| self.nodes[0].name.clone())),
        })
    }

    /// Creates a file stream `name` on `subjects` with `replicas` copies and
    /// a deduplication window of `duplicate_window`; waits until it has a
    /// leader.
    pub fn create_stream(&self, name: &str, subjects: &[&str], replicas: usize, duplicate_window: Duration) -> anyhow::Result<()> {
        if replicas == 0 || replicas > self.nodes.len() {
            bail!("a stream of this {}-node cluster has 1 to {} replicas, not {replicas}", self.nodes.len(), self.nodes.len());
        }
        let js = self.admin_js()?;
        let config = jetstream::stream::Config {
            name: name.to_string(),
            subjects: subjects.iter().map(|s| s.to_string()).collect(),
            num_replicas: replicas,
            duplicate_window,
            storage: jetstream::stream::StorageType::File,
            ..Default::default()
        };
        // A JetStream just started on a busy machine can let the first
        // request time out; creating the same stream again is harmless.
        let deadline = std::time::Instant::now() + READY_TIMEOUT;
        loop {
            let (js, config) = (js.clone(), config.clone());
            let created = self.run(API_TIMEOUT * 3, async move { js.create_stream(config).await.map(|_| ()) })?;
            match created {
                Ok(()) => break,
                Err(e) if e.kind() == jetstream::context::CreateStreamErrorKind::TimedOut && std::time::Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(200));
                }
                Err(e) => return Err(e).with_context(|| format!("cannot create the stream {name}")),
            }
        }
        wait_for(&format!("the stream {name} to have a leader"), READY_TIMEOUT, || self.stream_leader(name))?;
        Ok(())
    }

    /// Every message of `stream`, in sequence order, up to the last
    /// sequence the stream had when the call began; an error if they have
    /// not all been read within `timeout`.
    ///
    /// Each message is fetched by its sequence from the stream's leader
    /// (`$JS.API.STREAM.MSG.GET`, 64 requests in flight), which works as
    /// soon as the stream has a leader, also while the cluster elects a
    /// new meta leader (a consumer could not be made then). A request that
    /// fails during a failover is retried until the deadline; a sequence
    /// the stream no longer holds (deleted) is skipped.
    pub fn read_stream(&self, stream: &str, timeout: Duration) -> anyhow::Result<Vec<StoredMessage>> {
        let js = self.admin_js()?;
        let name = stream.to_string();
        let deadline = Instant::now() + timeout;
        self.run(timeout + Duration::from_secs(1), async move {
            let stream = js.get_stream_no_info(&name).await.with_context(|| format!("no stream {name}"))?;
            let info = loop {
                match stream.get_info().await {
                    Ok(info) => break info,
                    Err(e) if Instant::now() > deadline => return Err(anyhow!("no info for the stream {name} before the deadline: {e}")),
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            };
            let (first, last) = (info.state.first_sequence, info.state.last_sequence);
            if info.state.messages == 0 {
                return Ok(Vec::new());
            }
            if last.saturating_sub(first) >= MAX_READ {
                bail!("the stream {name} spans sequences {first}..={last}: more than the {MAX_READ} a test reads");
            }
            let fetched: Vec<anyhow::Result<Option<StoredMessage>>> = futures_util::stream::iter(first..=last)
                .map(|seq| {
                    let stream = stream.clone();
                    async move { fetch(&stream, seq, deadline).await }
                })
                .buffered(64)
                .collect()
                .await;
            let mut out = Vec::with_capacity(fetched.len());
            for message in fetched {
                if let Some(message) = message.with_context(|| format!("reading the stream {name} (sequences {first}..={last})"))? {
                    out.push(message);
                }
            }
            Ok(out)
        })?
    }

    /// Publishes `messages` in order, with at most `max_in_flight` acks
    /// outstanding, as the user of `creds` (`None`: the admin user, or
    /// nobody in an open cluster); returns JetStream's ack of each. Fails
    /// at the first message JetStream refuses or does not ack in time,
    /// naming its index.
    pub fn publish(&self, creds: Option<&Path>, messages: Vec<Outgoing>, max_in_flight: usize) -> anyhow::Result<Vec<Acked>> {
        let creds = creds.map(Path::to_path_buf).or_else(|| self.creds.admin.clone());
        let urls = self.client_urls();
        let budget = API_TIMEOUT * 4 + Duration::from_millis(50).saturating_mul(u32::try_from(messages.len()).unwrap_or(u32::MAX));
        self.run(budget, async move {
            let client = connect(&urls, creds.as_deref()).await?;
            let js = context(client.clone(), max_in_flight);
            let mut acks = Vec::with_capacity(messages.len());
            publish_pipelined(&js, messages, max_in_flight, |_, ack| acks.push(ack)).await?;
            // Flushes and closes: nothing of it outlives the call.
            let _ = client.drain().await;
            Ok(acks)
        })?
    }

    /// Connects as the user of `creds` (`None`: without credentials) and
    /// round-trips a flush: `Ok` when the cluster accepts the connection,
    /// the server's refusal otherwise.
    pub fn try_connect(&self, creds: Option<&Path>) -> anyhow::Result<()> {
        let urls = self.client_urls();
        let creds = creds.map(Path::to_path_buf);
        self.run(API_TIMEOUT * 2, async move {
            let client = connect(&urls, creds.as_deref()).await?;
            client.flush().await.context("the connection was accepted but a flush failed")?;
            let _ = client.drain().await;
            anyhow::Ok(())
        })?
    }

    /// The URLs of the nodes, each on its own.
    pub fn client_urls(&self) -> Vec<String> {
        self.nodes.iter().map(NatsNode::url).collect()
    }

    /// Runs `fut` on the kit's runtime and waits for it, at most `timeout`
    /// (then it is cancelled). Callable from any thread, also from inside
    /// another tokio runtime.
    pub fn run<T: Send + 'static>(&self, timeout: Duration, fut: impl Future<Output = T> + Send + 'static) -> anyhow::Result<T> {
        let runtime = self.runtime.as_ref().context("the NATS client's runtime is gone")?;
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let task = runtime.spawn(async move {
            let _ = tx.send(fut.await);
        });
        match rx.recv_timeout(timeout) {
            Ok(value) => Ok(value),
            Err(_) => {
                task.abort();
                bail!("a NATS operation took longer than {timeout:?}")
            }
        }
    }

    fn admin_js(&self) -> anyhow::Result<jetstream::Context> {
        let mut admin = self.admin.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let client = match admin.as_ref() {
            Some(client) => client.clone(),
            None => {
                let urls = self.client_urls();
                let creds = self.creds.admin.clone();
                let client = self.run(API_TIMEOUT * 2, async move { connect(&urls, creds.as_deref()).await })??;
                *admin = Some(client.clone());
                client
            }
        };
        // A context spawns its acker task on the current runtime.
        let _entered = self.runtime.as_ref().context("the NATS client's runtime is gone")?.enter();
        Ok(context(client, 256))
    }

    fn spawn(&mut self, i: usize) -> anyhow::Result<()> {
        let node = &self.nodes[i];
        self.starts[i] += 1;
        let name = match self.starts[i] {
            1 => format!("nats-{}", node.name),
            n => format!("nats-{}-start{n}", node.name),
        };
        let args = vec!["-c".to_string(), node.config.display().to_string()];
        self.procs[i] = Some(Proc::spawn(&name, &self.server, &args, &self.dir)?);
        Ok(())
    }

    /// Waits until each node of `which` is running, answers `/healthz` with
    /// 200 and (in a cluster) names the same meta leader as the others.
    fn wait_ready(&mut self, which: &[usize]) -> anyhow::Result<()> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            for &i in which {
                if let Some(proc) = self.procs[i].as_mut()
                    && let Ok(Some(exit)) = proc.child.try_wait()
                {
                    bail!("NATS node {i} exited ({exit}) while starting; last lines of {}:\n{}", proc.log.display(), proc.log_tail(20));
                }
            }
            let last = match self.readiness(which) {
                Ok(()) => return Ok(()),
                Err(e) => format!("{e:#}"),
            };
            if Instant::now() > deadline {
                let logs: Vec<String> = which
                    .iter()
                    .filter_map(|&i| self.procs[i].as_ref())
                    .map(|p| format!("---- {} ----\n{}", p.log.display(), p.log_tail(15)))
                    .collect();
                bail!("the NATS cluster was not ready within {READY_TIMEOUT:?}: {last}\n{}", logs.join("\n"));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn readiness(&self, which: &[usize]) -> anyhow::Result<()> {
        let mut leaders = BTreeMap::new();
        for &i in which {
            let node = &self.nodes[i];
            let health = crate::http::get(&node.monitor(), "/healthz", None)?;
            if health.status != 200 {
                bail!("{} is not healthy yet: {} {}", node.name, health.status, health.body.trim());
            }
            if self.nodes.len() > 1 {
                let jsz: Value = serde_json::from_str(&crate::http::get(&node.monitor(), "/jsz", None)?.body)
                    .with_context(|| format!("{}: /jsz is not JSON", node.name))?;
                let leader = jsz["meta_cluster"]["leader"].as_str().unwrap_or_default().to_string();
                if leader.is_empty() {
                    bail!("{} knows no JetStream meta leader yet", node.name);
                }
                leaders.insert(node.name.clone(), leader);
            }
        }
        let distinct: std::collections::BTreeSet<&String> = leaders.values().collect();
        if distinct.len() > 1 {
            bail!("the nodes name different meta leaders: {leaders:?}");
        }
        Ok(())
    }
}

impl Drop for NatsCluster {
    fn drop(&mut self) {
        // Every process is killed by its own drop; the runtime is shut
        // down without waiting, which is allowed inside another runtime.
        if let Ok(mut admin) = self.admin.lock() {
            admin.take();
        }
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

/// Connects to the first reachable of `urls` as the user of `creds`
/// (`None`: without credentials), failing within 5 s.
pub async fn connect(urls: &[String], creds: Option<&Path>) -> anyhow::Result<async_nats::Client> {
    let options = match creds {
        Some(path) => async_nats::ConnectOptions::with_credentials_file(path)
            .await
            .with_context(|| format!("cannot read the NATS credentials {}", path.display()))?,
        None => async_nats::ConnectOptions::new(),
    };
    options
        .name("fog-testkit")
        .connection_timeout(API_TIMEOUT)
        .max_reconnects(None)
        // The first attempt at once, then 100 ms doubling up to 1 s: a
        // cluster that comes back is found within a second.
        .reconnect_delay_callback(|attempt| match attempt {
            0 | 1 => Duration::ZERO,
            n => Duration::from_millis(100u64 << (n - 2).min(4)).min(Duration::from_secs(1)),
        })
        .connect(urls)
        .await
        .map_err(|e| anyhow!("cannot connect to NATS at {}: {e}", urls.join(",")))
}

/// A JetStream context on `client` that allows `max_in_flight` un-acked
/// publishes and waits (instead of failing) when they are all taken: the
/// pipelined publisher keeps at most that many itself, and must never hold
/// more than the context allows (async-nats would refuse or stall them).
pub fn context(client: async_nats::Client, max_in_flight: usize) -> jetstream::Context {
    jetstream::ContextBuilder::new()
        .timeout(API_TIMEOUT)
        .max_ack_inflight(max_in_flight.max(1))
        .backpressure_on_inflight(true)
        .build(client)
}

/// Publishes `messages` in order, keeping at most `max_in_flight` acks
/// outstanding (the oldest is awaited before another is sent), and calls
/// `on_ack(index, ack)` for each, in order. Fails at the first message
/// JetStream refuses or does not ack within the context's timeout, naming
/// its index. Use a [`context`] built with the same `max_in_flight`.
pub async fn publish_pipelined(
    js: &jetstream::Context,
    messages: impl IntoIterator<Item = Outgoing>,
    max_in_flight: usize,
    mut on_ack: impl FnMut(usize, Acked),
) -> anyhow::Result<()> {
    let window = max_in_flight.max(1);
    let mut pending = std::collections::VecDeque::with_capacity(window);
    let mut next_to_ack = 0usize;
    for (i, message) in messages.into_iter().enumerate() {
        if pending.len() >= window {
            let ack: jetstream::context::PublishAckFuture = pending.pop_front().context("no pending ack")?;
            on_ack(next_to_ack, await_ack(ack, next_to_ack).await?);
            next_to_ack += 1;
        }
        let ack = js
            .send_publish(message.subject.clone(), build(message))
            .await
            .map_err(|e| anyhow!("cannot publish message {i}: {e}"))?;
        pending.push_back(ack);
    }
    while let Some(ack) = pending.pop_front() {
        on_ack(next_to_ack, await_ack(ack, next_to_ack).await?);
        next_to_ack += 1;
    }
    Ok(())
}

async fn await_ack(ack: jetstream::context::PublishAckFuture, index: usize) -> anyhow::Result<Acked> {
    let ack = ack.await.map_err(|e| anyhow!("message {index} was not acked: {e}"))?;
    Ok(Acked { seq: ack.sequence, duplicate: ack.duplicate })
}

/// Message `seq` of `stream` from its leader, retried until `deadline`;
/// `None` when the stream does not hold it (deleted).
async fn fetch(stream: &jetstream::stream::Stream<()>, seq: u64, deadline: Instant) -> anyhow::Result<Option<StoredMessage>> {
    use jetstream::stream::LastRawMessageErrorKind;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, stream.get_raw_message(seq)).await {
            Ok(Ok(message)) => {
                let mut headers: Vec<(String, String)> = message
                    .headers
                    .iter()
                    .flat_map(|(name, values)| values.iter().map(move |v| (name.to_string(), v.to_string())))
                    .collect();
                headers.sort();
                return Ok(Some(StoredMessage { seq: message.sequence, subject: message.subject.to_string(), headers, payload: message.payload.to_vec() }));
            }
            Ok(Err(e)) if e.kind() == LastRawMessageErrorKind::NoMessageFound => return Ok(None),
            Ok(Err(e)) if Instant::now() > deadline => bail!("message {seq} could not be read before the deadline: {e}"),
            Ok(Err(_)) => tokio::time::sleep(Duration::from_millis(100)).await,
            Err(_) => bail!("message {seq} could not be read before the deadline"),
        }
    }
}

fn build(message: Outgoing) -> jetstream::message::PublishMessage {
    let mut publish = jetstream::message::PublishMessage::build().payload(message.payload.into());
    if let Some(id) = &message.msg_id {
        publish = publish.message_id(id);
    }
    if let Some(seq) = message.expected_last_seq {
        publish = publish.expected_last_sequence(seq);
    }
    for (name, value) in &message.headers {
        publish = publish.header(name.as_str(), value.as_str());
    }
    publish
}

/// Whether `s` can be one token of a subject.
fn valid_token(s: &str) -> bool {
    !s.is_empty() && s.len() <= 64 && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

fn node_config(node: &NatsNode, all: &[NatsNode], auth: &str, listen: IpAddr) -> String {
    let store = node.store_dir.display().to_string();
    let listen = match listen {
        IpAddr::V6(v6) => format!("[{v6}]"),
        IpAddr::V4(v4) => v4.to_string(),
    };
    let mut config = format!(
        "# One node of the test kit's JetStream cluster.\n\
         server_name: {name}\n\
         listen: {listen}:{client}\n\
         http: 127.0.0.1:{monitor}\n\
         jetstream {{\n  store_dir: {store:?}\n  max_memory_store: 256MB\n  max_file_store: 8GB\n}}\n",
        name = node.name,
        client = node.client_port,
        monitor = node.monitor_port,
    );
    if all.len() > 1 {
        let routes: Vec<String> =
            all.iter().filter(|n| n.name != node.name).map(|n| format!("nats-route://127.0.0.1:{}", n.route_port)).collect();
        config.push_str(&format!(
            "cluster {{\n  name: {CLUSTER_NAME}\n  listen: 127.0.0.1:{}\n  routes: [{}]\n{}}}\n",
            node.route_port,
            routes.join(", "),
            if listen == "127.0.0.1" { "" } else { "  no_advertise: true\n" }
        ));
    }
    config.push_str(auth);
    config
}

/// The operator-mode part of the servers' config and the users'
/// credentials files: an operator, a system account, the account `FOG`
/// with JetStream, an admin user and one user per `(name, subjects)`.
fn operator_mode(dir: &Path, sites: &[(String, String)]) -> anyhow::Result<(String, Creds)> {
    let key_error = |e: nkeys::error::Error| anyhow!("cannot make a NATS key: {e}");
    let operator = nkeys::KeyPair::new_operator();
    let system = nkeys::KeyPair::new_account();
    let account = nkeys::KeyPair::new_account();
    let unlimited = json!({
        "subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1,
        "wildcards": true, "conn": -1, "leaf": -1,
    });
    let mut js_limits = unlimited.clone();
    for field in ["mem_storage", "disk_storage", "streams", "consumer"] {
        js_limits[field] = json!(-1);
    }
    let operator_jwt = jwt(
        &operator,
        &operator.public_key(),
        "fog-test-operator",
        json!({"type": "operator", "version": 2, "system_account": system.public_key()}),
    )?;
    let system_jwt = jwt(&operator, &system.public_key(), "SYS", json!({"type": "account", "version": 2, "limits": unlimited}))?;
    let account_jwt = jwt(&operator, &account.public_key(), ACCOUNT_NAME, json!({"type": "account", "version": 2, "limits": js_limits}))?;
    let user = |name: &str, publish: Value, subscribe: Value| -> anyhow::Result<(String, String)> {
        let key = nkeys::KeyPair::new_user();
        let mut nats = json!({"type": "user", "version": 2, "subs": -1, "data": -1, "payload": -1});
        if !publish.is_null() {
            nats["pub"] = json!({"allow": publish});
            nats["sub"] = json!({"allow": subscribe});
        }
        let token = jwt(&account, &key.public_key(), name, nats)?;
        Ok((token.clone(), creds_file(&token, &key.seed().map_err(key_error)?)))
    };
    let mut creds = Creds::default();
    let (_, admin_text) = user("fog-testkit-admin", Value::Null, Value::Null)?;
    let admin_path = dir.join("nats-admin.creds");
    write_secret(&admin_path, &admin_text)?;
    creds.admin = Some(admin_path);
    for (name, subjects) in sites {
        let (token, text) = user(name, json!([subjects, "$JS.API.>"]), json!(["_INBOX.>"]))?;
        let path = dir.join(format!("nats-{name}.creds"));
        write_secret(&path, &text)?;
        creds.sites.insert(name.clone(), path);
        creds.site_jwts.insert(name.clone(), token);
    }
    let operator_path = dir.join("nats-operator.jwt");
    std::fs::write(&operator_path, &operator_jwt).with_context(|| format!("cannot write {}", operator_path.display()))?;
    let config = format!(
        "operator: {operator:?}\n\
         system_account: {system_key}\n\
         resolver: MEMORY\n\
         resolver_preload: {{\n  {system_key}: {system_jwt:?}\n  {account_key}: {account_jwt:?}\n}}\n",
        operator = operator_path.display().to_string(),
        system_key = system.public_key(),
        account_key = account.public_key(),
    );
    Ok((config, creds))
}

/// A NATS JWT: `typ` JWT, `alg` ed25519-nkey, claims `nats` about
/// `subject`, issued and signed by `issuer`.
fn jwt(issuer: &nkeys::KeyPair, subject: &str, name: &str, nats: Value) -> anyhow::Result<String> {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let issued_at = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let mut claims = json!({"jti": "", "iat": issued_at, "iss": issuer.public_key(), "name": name, "sub": subject, "nats": nats});
    // The id is the hash of the claims without it (as the NATS tools make it).
    let digest = <sha2::Sha512_256 as sha2::Digest>::digest(serde_json::to_vec(&claims)?);
    claims["jti"] = json!(data_encoding::BASE32_NOPAD.encode(&digest));
    let header = b64.encode(br#"{"typ":"JWT","alg":"ed25519-nkey"}"#);
    let body = b64.encode(serde_json::to_vec(&claims)?);
    let signed = format!("{header}.{body}");
    let signature = issuer.sign(signed.as_bytes()).map_err(|e| anyhow!("cannot sign a NATS JWT: {e}"))?;
    Ok(format!("{signed}.{}", b64.encode(signature)))
}

/// The text of a `.creds` file: a user JWT and the user's seed.
fn creds_file(jwt: &str, seed: &str) -> String {
    format!(
        "-----BEGIN NATS USER JWT-----\n{jwt}\n------END NATS USER JWT------\n\n\
         ************************* IMPORTANT *************************\n\
         NKEY Seed printed below can be used to sign and prove identity.\n\
         NKEYs are sensitive and should be treated as secrets.\n\n\
         -----BEGIN USER NKEY SEED-----\n{seed}\n------END USER NKEY SEED------\n\n\
         *************************************************************\n"
    )
}

/// Writes `text` to a new file at `path` that only its owner may read.
fn write_secret(path: &Path, text: &str) -> anyhow::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let _ = std::fs::remove_file(path);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    file.write_all(text.as_bytes()).with_context(|| format!("cannot write {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_jwt_is_signed_by_its_issuer_and_names_its_subject() {
        use base64::Engine as _;
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let account = nkeys::KeyPair::new_account();
        let user = nkeys::KeyPair::new_user();
        let token = jwt(&account, &user.public_key(), "site", json!({"type": "user", "version": 2})).unwrap();
        let parts: Vec<&str> = token.split('.').collect();
        assert_eq!(parts.len(), 3);
        let claims: Value = serde_json::from_slice(&b64.decode(parts[1]).unwrap()).unwrap();
        assert_eq!(claims["sub"], user.public_key());
        assert_eq!(claims["iss"], account.public_key());
        let signature = b64.decode(parts[2]).unwrap();
        let signed = format!("{}.{}", parts[0], parts[1]);
        account.verify(signed.as_bytes(), &signature).unwrap();
        // Another key's signature does not verify.
        assert!(user.verify(signed.as_bytes(), &signature).is_err());
    }

    #[test]
    fn site_names_must_be_one_subject_token() {
        assert!(valid_token("site-a_1"));
        for bad in ["", "a.b", "a*", ">", "a b", &"x".repeat(65)] {
            assert!(!valid_token(bad), "{bad:?}");
        }
    }
}
