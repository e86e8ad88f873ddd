//! The uplink: the active server forwards what the site owes the cloud
//! (the replicated [`crate::outbox`]) to a NATS JetStream stream of the
//! site's own, in order, exactly once.
//!
//! How exactly once holds, whatever happens:
//!
//! - The stream is the site's alone (`FOG_<SITE>`, subjects
//!   `fog.<site>.>`). Every message carries the site sequences of the first
//!   and last item in it (`Fog-Site-Seq-First`, `Fog-Site-Seq-Last`) and
//!   is published with `Nats-Expected-Last-Sequence`: the stream sequence
//!   the message before it got. JetStream stores a message only if the
//!   stream's last sequence is that one, so messages land in order and a
//!   gap can never be followed by a later message: if one is lost in
//!   flight, every message after it is refused, and the uplink starts over
//!   from what the stream holds.
//! - On every (re)connect, and after any error, the uplink reads the
//!   stream's last message and resumes after its `Fog-Site-Seq-Last`: what
//!   the stream has is never sent again, however long the outage was
//!   (JetStream's duplicate window plays no part in it). Its
//!   `Fog-Site-Chain` must match the outbox's chain at that item; if it
//!   does not, the stream holds a history this pair abandoned (a side cut
//!   off in a split forwarded it), and the uplink stops and says so rather
//!   than interleave two histories.
//! - Acks move the forwarding position in the pair's log
//!   (`Record::UplinkForwarded`), so a restart or a new active starts near
//!   where the pair had got to, and the outbox frees what the cloud has.
//! - `Nats-Msg-Id` (`<site>:<first>-<last>`) is set too, so JetStream also
//!   drops a resend inside its window by itself.
//!
//! `Nats-Expected-Last-Subject-Sequence` would order each subject (segment)
//! alone and let a lost message on one subject go unnoticed while another
//! subject moves on; a sequence of the site's own checked only at
//! reconnect would let pipelined messages land after a lost one. Hence
//! the stream-wide expected sequence on a stream of the site's own.
//!
//! The connection runs as a task beside the node's loop: the loop feeds it
//! committed items in batches ([`Work`], a bounded channel) and hears back
//! acks and resyncs ([`UplinkEvent`]); the node is never waited on.

use std::collections::VecDeque;
use std::future::{Future, IntoFuture};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::time::Duration;

use async_nats::jetstream::message::PublishMessage as Publish;
use async_nats::jetstream::publish::PublishAck;
use async_nats::jetstream::{self, stream};
use async_nats::{ConnectOptions, HeaderMap};
use serde::Serialize;
use tokio::sync::{mpsc, watch};
use tracing::{info, warn};

use crate::outbox::{Item, Owed};

/// Items in one message at most (one segment and kind per message).
pub const MAX_ITEMS_PER_MESSAGE: usize = 1000;
/// Messages published and not yet acked, at most.
pub const MAX_IN_FLIGHT: usize = 256;
/// Batches of work queued between the loop and the connection.
pub const WORK_QUEUE: usize = 64;
/// Longest wait between two connection attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(10);
/// A credentials file is small.
const MAX_CREDS_BYTES: u64 = 64 * 1024;

/// Where the uplink goes and how.
#[derive(Debug, Clone)]
pub struct UplinkConfig {
    /// NATS servers, comma-separated (`nats://…` or `tls://…`).
    pub urls: String,
    /// How to authenticate: a file (see [`Creds::read`]).
    pub creds: Option<PathBuf>,
    /// The site's name: in subjects, the stream's name, message ids.
    pub site: String,
    /// Replicas of the stream, when the uplink has to create it.
    pub replicas: usize,
    /// JetStream's duplicate window, when the uplink creates the stream.
    pub duplicate_window: Duration,
    /// Most bytes of unforwarded items the pair keeps (see [`crate::outbox`]).
    pub backlog_bytes: u64,
}

impl UplinkConfig {
    /// The stream of the site: `FOG_<SITE>`.
    pub fn stream(&self) -> String {
        format!("FOG_{}", self.site.to_ascii_uppercase().replace('-', "_"))
    }

    fn subject(&self, owed: &Owed) -> String {
        let kind = if owed.is_reading() { "readings" } else { "averages" };
        format!("fog.{}.{kind}.{}", self.site, owed.segment())
    }
}

/// Checks a site name: 1–64 of `a-z A-Z 0-9 _ -` (it is a subject token
/// and part of a stream name).
pub fn check_site(site: &str) -> Result<(), String> {
    let ok = !site.is_empty() && site.len() <= 64 && site.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if ok { Ok(()) } else { Err(format!("`{site}` is not a site name: 1 to 64 letters, digits, `_` or `-`")) }
}

/// Checks the URLs: NATS beyond loopback only over TLS, unless allowed.
pub fn check_urls(urls: &str, allow_plain: bool) -> Result<(), String> {
    for url in urls.split(',').map(str::trim) {
        let (scheme, rest) = url.split_once("://").ok_or_else(|| format!("`{url}` is not a NATS URL (nats://HOST:PORT or tls://HOST:PORT)"))?;
        let host = rest.rsplit_once('@').map_or(rest, |(_, h)| h);
        let host = host.rsplit_once(':').map_or(host, |(h, _)| h).trim_matches(['[', ']']);
        match scheme {
            "tls" => {}
            "nats" if allow_plain || host == "localhost" || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback()) => {}
            "nats" => return Err(format!("refusing plain nats:// to {host}: use tls://, or --uplink-insecure to send the site's data unencrypted")),
            other => return Err(format!("`{other}://` is not a NATS scheme (nats:// or tls://)")),
        }
    }
    Ok(())
}

/// Credentials from a file: a NATS `.creds` file (user JWT and nkey seed),
/// or lines `user = NAME` and `password = SECRET`, or `token = SECRET`.
#[derive(Clone)]
pub enum Creds {
    File(PathBuf),
    UserPassword(String, String),
    Token(String),
}

impl std::fmt::Debug for Creds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Creds::File(_) => "Creds(.creds file)",
            Creds::UserPassword(..) => "Creds(user and password)",
            Creds::Token(_) => "Creds(token)",
        })
    }
}

impl Creds {
    pub fn read(path: &Path) -> Result<Creds, String> {
        let err = |why: String| format!("{}: {why}", path.display());
        let len = std::fs::metadata(path).map_err(|e| err(e.to_string()))?.len();
        if len > MAX_CREDS_BYTES {
            return Err(err(format!("{len} bytes: not a credentials file")));
        }
        let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
        if text.contains("-----BEGIN NATS USER JWT-----") {
            return Ok(Creds::File(path.to_path_buf()));
        }
        let mut user = None;
        let mut password = None;
        let mut token = None;
        for line in text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')) {
            let (key, value) = line.split_once('=').ok_or_else(|| err(format!("`{line}` is not KEY = VALUE")))?;
            let value = value.trim().trim_matches('"').to_string();
            match key.trim() {
                "user" => user = Some(value),
                "password" => password = Some(value),
                "token" => token = Some(value),
                other => return Err(err(format!("unknown key `{other}` (user, password or token)"))),
            }
        }
        match (user, password, token) {
            (Some(u), Some(p), None) => Ok(Creds::UserPassword(u, p)),
            (None, None, Some(t)) => Ok(Creds::Token(t)),
            _ => Err(err("give `user` and `password`, or `token`, or a NATS .creds file".into())),
        }
    }

    async fn apply(&self, options: ConnectOptions) -> Result<ConnectOptions, String> {
        Ok(match self {
            Creds::File(path) => options.credentials_file(path).await.map_err(|e| format!("{}: {e}", path.display()))?,
            Creds::UserPassword(u, p) => options.user_and_password(u.clone(), p.clone()),
            Creds::Token(t) => options.token(t.clone()),
        })
    }
}

/// What the loop tells the connection: serve (this node is active) or not.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Control {
    pub active: bool,
    pub epoch: u64,
}

/// Consecutive items of one kind and segment, for one message; `round`
/// names the resync they were sent after.
#[derive(Debug)]
pub struct Work {
    pub round: u64,
    pub items: Vec<Item>,
}

/// What the connection tells the loop.
#[derive(Debug)]
pub enum UplinkEvent {
    /// The stream's last message ends at site item `in_cloud`, with chain
    /// value `chain`: is that this site's history? (`Err`: why not.)
    Check { in_cloud: u64, chain: u64, answer: tokio::sync::oneshot::Sender<Result<(), String>> },
    /// Send items after `from` from now on, marked `round`.
    Resync { round: u64, from: u64 },
    /// JetStream holds every item up to `through`.
    Acked { through: u64, messages: u64 },
    Connected(bool),
    Failed(String),
}

/// The loop's side of the uplink.
pub struct Uplink {
    cfg: UplinkConfig,
    control: watch::Sender<Control>,
    work: mpsc::Sender<Work>,
    pub events: mpsc::Receiver<UplinkEvent>,
    /// The round the connection is in, and the last item sent in it; `None`
    /// until the connection asked for items.
    round: Option<u64>,
    sent_through: u64,
    pub connected: bool,
    pub last_error: String,
    pub messages: u64,
}

impl Uplink {
    /// Starts the connection task (idle until [`Uplink::control`] says
    /// active).
    pub fn start(cfg: UplinkConfig, creds: Option<Creds>) -> Uplink {
        let (control, control_rx) = watch::channel(Control::default());
        let (work, work_rx) = mpsc::channel(WORK_QUEUE);
        let (events_tx, events) = mpsc::channel(MAX_IN_FLIGHT * 2);
        tokio::spawn(connection(cfg.clone(), creds, control_rx, work_rx, events_tx));
        Uplink { cfg, control, work, events, round: None, sent_through: 0, connected: false, last_error: String::new(), messages: 0 }
    }

    pub fn config(&self) -> &UplinkConfig {
        &self.cfg
    }

    /// Whether this node is active (and in which epoch).
    pub fn control(&mut self, active: bool, epoch: u64) {
        let next = Control { active, epoch };
        if *self.control.borrow() != next {
            if !active {
                self.round = None;
            }
            let _ = self.control.send(next);
        }
    }

    /// The connection resynced: items after `from` (or after the pair's
    /// own position, if that is further) go next.
    pub fn resync(&mut self, round: u64, from: u64, forwarded: u64) {
        self.round = Some(round);
        self.sent_through = from.max(forwarded);
    }

    /// Hands the connection what it has room for, from `owed` (the items
    /// after [`Uplink::next_after`] that may leave now, in order).
    pub fn feed<'a>(&mut self, owed: impl Iterator<Item = &'a Item>) {
        let Some(round) = self.round else { return };
        let mut owed = owed.peekable();
        while owed.peek().is_some() {
            let Ok(permit) = self.work.try_reserve() else { return };
            let mut items: Vec<Item> = Vec::new();
            while let Some(next) = owed.peek() {
                let same = items.first().is_none_or(|f| f.what.is_reading() == next.what.is_reading() && f.what.segment() == next.what.segment());
                if !same || items.len() >= MAX_ITEMS_PER_MESSAGE {
                    break;
                }
                items.push(**next);
                owed.next();
            }
            self.sent_through = items.last().map_or(self.sent_through, |i| i.site_seq);
            permit.send(Work { round, items });
        }
    }

    /// The connection's side of a status report.
    pub fn fill(&self, report: &mut fog_protocol::UplinkReport) {
        report.stream = self.cfg.stream();
        report.connected = self.connected;
        report.messages = self.messages;
        report.last_error.clone_from(&self.last_error);
    }

    /// Items after this site sequence are the next to feed.
    pub fn next_after(&self) -> Option<u64> {
        self.round.map(|_| self.sent_through)
    }
}

/// The connection task: idle while the node is not active; otherwise
/// connect, find where the stream is, and forward until stepped down or
/// an error (then start over, after a pause that grows to [`MAX_BACKOFF`]).
async fn connection(cfg: UplinkConfig, creds: Option<Creds>, mut control: watch::Receiver<Control>, mut work: mpsc::Receiver<Work>, events: mpsc::Sender<UplinkEvent>) {
    let mut round = 0u64;
    let mut backoff = Duration::from_millis(250);
    loop {
        while !control.borrow_and_update().active {
            if control.changed().await.is_err() {
                return;
            }
        }
        round += 1;
        let outcome = forward(&cfg, creds.as_ref(), round, &mut control, &mut work, &events).await;
        let _ = events.send(UplinkEvent::Connected(false)).await;
        match outcome {
            Ok(()) => backoff = Duration::from_millis(250),
            Err(e) => {
                warn!(stream = %cfg.stream(), "uplink: {e}; trying again in {backoff:?}");
                let _ = events.send(UplinkEvent::Failed(e)).await;
                tokio::select! {
                    () = tokio::time::sleep(backoff) => {}
                    _ = control.changed() => {}
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}

type AckFuture = Pin<Box<dyn Future<Output = Result<PublishAck, async_nats::jetstream::context::PublishError>> + Send>>;

/// One connection: until the node steps down (`Ok`) or something fails.
async fn forward(
    cfg: &UplinkConfig,
    creds: Option<&Creds>,
    round: u64,
    control: &mut watch::Receiver<Control>,
    work: &mut mpsc::Receiver<Work>,
    events: &mpsc::Sender<UplinkEvent>,
) -> Result<(), String> {
    let mut options = ConnectOptions::new().connection_timeout(Duration::from_secs(5)).max_reconnects(0).ping_interval(Duration::from_secs(5));
    if let Some(creds) = creds {
        options = creds.apply(options).await?;
    }
    let client = options.connect(cfg.urls.as_str()).await.map_err(|e| format!("cannot connect to {}: {e}", cfg.urls))?;
    let js = jetstream::new(client);
    let name = cfg.stream();
    let mut stream = js
        .get_or_create_stream(stream::Config {
            name: name.clone(),
            subjects: vec![format!("fog.{}.>", cfg.site)],
            num_replicas: cfg.replicas,
            duplicate_window: cfg.duplicate_window,
            ..Default::default()
        })
        .await
        .map_err(|e| format!("cannot find or create the stream {name}: {e}"))?;
    // Where the stream is: its last message, the last site item in it,
    // and the chain value there.
    let last_seq = stream.info().await.map_err(|e| format!("cannot read the stream {name}: {e}"))?.state.last_sequence;
    let (in_cloud, chain) = if last_seq == 0 {
        (0, 0)
    } else {
        let last = stream.get_raw_message(last_seq).await.map_err(|e| format!("cannot read message {last_seq} of {name}: {e}"))?;
        let seq = header_u64(&last.headers, "Fog-Site-Seq-Last");
        let chain = last.headers.get("Fog-Site-Chain").and_then(|v| u64::from_str_radix(v.as_str(), 16).ok());
        seq.zip(chain).ok_or_else(|| format!("message {last_seq} of {name} has no Fog-Site-Seq-Last or Fog-Site-Chain header: the stream must be this site's alone"))?
    };
    // The stream must hold this site's history: ask the loop whether its
    // outbox has the same chain value at that item.
    let (answer, verdict) = tokio::sync::oneshot::channel();
    let _ = events.send(UplinkEvent::Check { in_cloud, chain, answer }).await;
    match verdict.await {
        Ok(Ok(())) => {}
        Ok(Err(why)) => return Err(why),
        Err(_) => return Ok(()),
    }
    info!(stream = %name, last_seq, in_cloud, "uplink connected: the stream holds this site's items up to {in_cloud}");
    let _ = events.send(UplinkEvent::Connected(true)).await;
    if in_cloud > 0 {
        let _ = events.send(UplinkEvent::Acked { through: in_cloud, messages: 0 }).await;
    }
    let _ = events.send(UplinkEvent::Resync { round, from: in_cloud }).await;

    let mut expected = last_seq;
    let mut in_flight: VecDeque<(AckFuture, u64, u64)> = VecDeque::new();
    loop {
        tokio::select! {
            biased;
            changed = control.changed() => {
                if changed.is_err() || !control.borrow().active {
                    return Ok(());
                }
            }
            ack = async { (&mut in_flight.front_mut().expect("guarded").0).await }, if !in_flight.is_empty() => {
                let Some((_, through, want)) = in_flight.pop_front() else { continue };
                let ack = ack.map_err(|e| format!("publish to {name} failed: {e}"))?;
                if ack.duplicate || ack.sequence != want {
                    return Err(format!("the stream {name} moved under the uplink (ack of stream seq {} for the message expected at {want}{}): resyncing", ack.sequence, if ack.duplicate { ", a duplicate" } else { "" }));
                }
                let _ = events.send(UplinkEvent::Acked { through, messages: 1 }).await;
            }
            next = work.recv(), if in_flight.len() < MAX_IN_FLIGHT => {
                let Some(next) = next else { return Ok(()) };
                if next.round != round || next.items.is_empty() {
                    continue;
                }
                let (first, last) = (next.items[0].site_seq, next.items[next.items.len() - 1].site_seq);
                let chain = next.items[next.items.len() - 1].chain;
                let subject = cfg.subject(&next.items[0].what);
                let payload = encode(cfg, control.borrow().epoch, &next.items);
                let mut headers = HeaderMap::new();
                headers.insert("Fog-Site", cfg.site.as_str());
                headers.insert("Fog-Site-Seq-First", first.to_string().as_str());
                headers.insert("Fog-Site-Seq-Last", last.to_string().as_str());
                headers.insert("Fog-Site-Chain", format!("{chain:016x}").as_str());
                let publish = Publish::build()
                    .headers(headers)
                    .payload(payload.into())
                    .message_id(format!("{}:{first}-{last}", cfg.site))
                    .expected_last_sequence(expected);
                let ack = js.send_publish(subject, publish).await.map_err(|e| format!("cannot publish to {name}: {e}"))?;
                expected += 1;
                in_flight.push_back((ack.into_future(), last, expected));
            }
        }
    }
}

fn header_u64(headers: &HeaderMap, name: &str) -> Option<u64> {
    headers.get(name)?.as_str().parse().ok()
}

/// A message's body: JSON, one object with the site, the segment, the
/// site sequences it spans and its readings or averages.
#[derive(Serialize)]
struct Body<'a> {
    site: &'a str,
    segment: u32,
    first: u64,
    last: u64,
    /// The epoch of the active that forwarded it.
    epoch: u64,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    readings: Vec<ReadingOut>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    averages: Vec<AverageOut>,
}

#[derive(Serialize)]
struct ReadingOut {
    site_seq: u64,
    sensor_id: u32,
    incarnation: u64,
    seq: u64,
    timestamp_ms: u64,
    speed_kmh: u16,
}

#[derive(Serialize)]
struct AverageOut {
    site_seq: u64,
    seq: u64,
    epoch: u64,
    window_end_ms: u64,
    count: u32,
    sum_kmh: u64,
    mean_kmh: f32,
    revision: u32,
    chain: u64,
}

fn encode(cfg: &UplinkConfig, epoch: u64, items: &[Item]) -> Vec<u8> {
    let mut body = Body {
        site: &cfg.site,
        segment: items.first().map_or(0, |i| i.what.segment()),
        first: items.first().map_or(0, |i| i.site_seq),
        last: items.last().map_or(0, |i| i.site_seq),
        epoch,
        readings: Vec::new(),
        averages: Vec::new(),
    };
    for item in items {
        match item.what {
            Owed::Reading { sensor_id, incarnation, reading, .. } => body.readings.push(ReadingOut {
                site_seq: item.site_seq,
                sensor_id,
                incarnation,
                seq: reading.seq,
                timestamp_ms: reading.timestamp_ms,
                speed_kmh: reading.speed_kmh,
            }),
            Owed::Average(a) => body.averages.push(AverageOut {
                site_seq: item.site_seq,
                seq: a.seq,
                epoch: a.epoch,
                window_end_ms: a.window_end_ms,
                count: a.count,
                sum_kmh: a.sum_kmh,
                mean_kmh: a.mean_kmh(),
                revision: a.revision,
                chain: a.chain,
            }),
        }
    }
    serde_json::to_vec(&body).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn site_names_and_urls_are_checked() {
        assert!(check_site("a1_b-c").is_ok());
        for bad in ["", "a.b", "a b", "a>", &"x".repeat(65)] {
            assert!(check_site(bad).is_err(), "{bad}");
        }
        assert!(check_urls("nats://127.0.0.1:4222,nats://localhost:4223", false).is_ok());
        assert!(check_urls("tls://cloud.example:4222", false).is_ok());
        assert!(check_urls("nats://cloud.example:4222", false).unwrap_err().contains("--uplink-insecure"));
        assert!(check_urls("nats://user:pw@10.0.0.1:4222", true).is_ok());
        assert!(check_urls("http://x:1", true).is_err());
        assert!(check_urls("127.0.0.1:4222", true).is_err());
    }

    #[test]
    fn credentials_files_are_read_strictly() {
        let dir = std::env::temp_dir().join(format!("fog-creds-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let write = |name: &str, text: &str| {
            let p = dir.join(name);
            std::fs::write(&p, text).unwrap();
            p
        };
        assert!(matches!(Creds::read(&write("up", "user = site\npassword = \"s3cret\"\n")), Ok(Creds::UserPassword(u, p)) if u == "site" && p == "s3cret"));
        assert!(matches!(Creds::read(&write("tok", "# comment\ntoken=abc\n")), Ok(Creds::Token(t)) if t == "abc"));
        assert!(Creds::read(&write("bad", "user = a\n")).unwrap_err().contains("give `user` and `password`"));
        assert!(Creds::read(&write("junk", "hello\n")).unwrap_err().contains("KEY = VALUE"));
        assert!(Creds::read(&write("big", &"a".repeat(100_000))).unwrap_err().contains("not a credentials file"));
        assert!(format!("{:?}", Creds::read(&write("up2", "user=a\npassword=b\n")).unwrap()).contains("user and password"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_feed_groups_items_by_kind_and_segment_and_stops_when_full() {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let (control, _c) = watch::channel(Control::default());
            let (work, mut work_rx) = mpsc::channel(2);
            let (_e, events) = mpsc::channel(1);
            let cfg = UplinkConfig { urls: String::new(), creds: None, site: "s".into(), replicas: 1, duplicate_window: Duration::from_secs(1), backlog_bytes: 1 };
            let mut up = Uplink { cfg, control, work, events, round: None, sent_through: 0, connected: false, last_error: String::new(), messages: 0 };
            let reading = |site_seq, segment| Item {
                site_seq,
                chain: 0,
                lsn: 1,
                at_ms: 0,
                what: Owed::Reading { sensor_id: 1, incarnation: 1, segment, reading: fog_core::Reading { seq: site_seq, speed_kmh: 90, timestamp_ms: 0 } },
            };
            let items: Vec<Item> = vec![reading(1, 0), reading(2, 0), reading(3, 1), reading(4, 0)];
            up.feed(items.iter());
            assert!(work_rx.try_recv().is_err(), "nothing is fed before the connection resynced");
            up.resync(7, 0, 1);
            up.feed(items.iter().filter(|i| i.site_seq > 1));
            let a = work_rx.try_recv().unwrap();
            let b = work_rx.try_recv().unwrap();
            assert_eq!((a.round, a.items.iter().map(|i| i.site_seq).collect::<Vec<_>>()), (7, vec![2]));
            assert_eq!(b.items.iter().map(|i| i.site_seq).collect::<Vec<_>>(), vec![3]);
            assert_eq!(up.next_after(), Some(3), "the queue was full after two batches");
        });
    }
}
