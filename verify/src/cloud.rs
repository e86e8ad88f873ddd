//! The cloud of `--uplink`: a 3-node NATS JetStream cluster (the test
//! kit's, JWT credentials with one user per site) that every site's
//! servers forward to, the uplink flags each server is started with, and
//! the check at the end: each site's stream read back and compared with
//! what the site counted (the kit's [`fog_testkit::cloud`] checker).
//!
//! The cluster runs in the root namespace. On loopback the servers reach
//! it at `127.0.0.1`; with network namespaces the cluster's client ports
//! listen on every address and each server reaches them over its own link
//! to the root namespace (the root side's address), with
//! `--uplink-insecure` since that address is not loopback. So cutting the
//! hosts' link to a server also cuts it off from the cloud, as one network
//! would.

use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, bail};
use fog_testkit::cloud::{CloudCheck, check_stream, read_settled, stream_of};
use fog_testkit::nats::{NatsAuth, NatsCluster, Outgoing};
use serde::Serialize;
use serde_json::Value;

use crate::cluster::Cluster;

/// Nodes of the cluster, and replicas of every site's stream.
pub const NODES: usize = 3;
/// JetStream's duplicate window of the streams: shorter than the cloud
/// faults' outages, so message ids cannot be what keeps resends out.
pub const DUPLICATE_WINDOW: &str = "2s";
/// How long the end of a run waits for a site's uplink to forward its backlog.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(120);
/// How long reading a stream back may take.
const READ_TIMEOUT: Duration = Duration::from_secs(120);

/// The cluster and the sites forwarding to it.
pub struct Cloud {
    pub nats: NatsCluster,
    pub sites: Vec<String>,
    /// Client ports on every address (servers in namespaces), or loopback.
    beyond_loopback: bool,
}

/// What the report says about the cloud.
#[derive(Serialize)]
pub struct CloudReport {
    pub nodes: usize,
    pub replicas: usize,
    pub duplicate_window: &'static str,
    /// Each site's stream, checked.
    pub streams: Vec<CloudCheck>,
    /// What was planted into a stream to test the check, if anything.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub planted: Option<String>,
}

impl Cloud {
    /// Starts the cluster in `dir` with a user for each of `sites`, its
    /// client ports on every address when `beyond_loopback`.
    pub fn start(dir: &Path, sites: &[String], beyond_loopback: bool) -> anyhow::Result<Cloud> {
        let listen = if beyond_loopback { IpAddr::V4(Ipv4Addr::UNSPECIFIED) } else { IpAddr::V4(Ipv4Addr::LOCALHOST) };
        let nats = NatsCluster::start_listening(dir, NODES, NatsAuth::Sites(sites.to_vec()), listen)
            .context("cannot start the NATS cluster of --uplink")?;
        Ok(Cloud { nats, sites: sites.to_vec(), beyond_loopback })
    }

    /// The uplink flags of a server of `site` that reaches the root
    /// namespace at `via` (its link's root side; `None` on loopback).
    pub fn server_flags(&self, site: &str, via: Option<Ipv4Addr>) -> anyhow::Result<Vec<String>> {
        let creds = self.nats.site_creds(site).with_context(|| format!("the cloud has no user for {site}"))?;
        let urls = match via {
            Some(addr) if self.beyond_loopback => self.nats.urls_via(IpAddr::V4(addr)),
            Some(_) => bail!("the cloud listens on loopback only: servers in namespaces cannot reach it"),
            None => self.nats.urls(),
        };
        let mut flags: Vec<String> = [
            "--uplink",
            &urls,
            "--site",
            site,
            "--uplink-creds",
            &creds.display().to_string(),
            "--uplink-replicas",
            &NODES.to_string(),
            "--uplink-duplicate-window",
            DUPLICATE_WINDOW,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        if via.is_some() {
            flags.push("--uplink-insecure".into());
        }
        Ok(flags)
    }

    /// Publishes again, as the cluster's admin, the first readings message
    /// of `site`'s stream, byte for byte with its headers (its message id
    /// too: the duplicate window has long passed): a duplicate the check
    /// must find. Returns what was done.
    pub fn plant_duplicate(&self, site: &str) -> anyhow::Result<String> {
        let stream = stream_of(site);
        let messages = self.nats.read_stream(&stream, READ_TIMEOUT)?;
        let Some(m) = messages.iter().find(|m| m.subject.contains(".readings.")) else {
            bail!("nothing to plant: the stream {stream} holds no readings");
        };
        let mut headers = m.headers.clone();
        let id = headers.iter().position(|(n, _)| n.eq_ignore_ascii_case("Nats-Msg-Id")).map(|i| headers.remove(i).1);
        headers.retain(|(n, _)| !n.to_ascii_lowercase().starts_with("nats-expected"));
        let copy = Outgoing { subject: m.subject.clone(), msg_id: id, expected_last_seq: None, headers, payload: m.payload.clone() };
        let acks = self.nats.publish(None, vec![copy], 1)?;
        match acks.first() {
            Some(ack) if !ack.duplicate => Ok(format!(
                "planted: message {} of {stream} ({}) published again as the cloud's admin, now message {}",
                m.seq, m.subject, ack.seq
            )),
            _ => bail!("the planted copy of message {} was dropped by {stream} as a duplicate", m.seq),
        }
    }

    /// Waits until `site`'s active server has forwarded everything it
    /// owes, reads its stream and checks it against what the site counted
    /// (the kit's [`read_settled`] and [`check_stream`]). A site that does
    /// not drain in time is checked all the same (what is missing shows).
    pub fn check(&self, cluster: &Cluster) -> anyhow::Result<CloudCheck> {
        let stream = stream_of(&cluster.site);
        let settled = read_settled(
            || active_status(cluster),
            || self.nats.read_stream(&stream, READ_TIMEOUT).with_context(|| format!("reading {stream} back")),
            DRAIN_TIMEOUT,
        )
        .with_context(|| format!("{}: checking {stream}", cluster.site))?;
        let mut check = check_stream(&cluster.site, &settled.messages, &settled.status);
        if !settled.drained {
            check.violations.insert(
                0,
                format!("the uplink did not drain within {DRAIN_TIMEOUT:?}: last seen {}", settled.status["uplink"]),
            );
        }
        Ok(check)
    }
}

/// The status of the site's active server, if one answers as active.
fn active_status(cluster: &Cluster) -> Option<Value> {
    cluster.servers.iter().filter(|s| s.up()).filter_map(|s| cluster.status(s.primary).ok()).find(|s| s["state"] == "active")
}
