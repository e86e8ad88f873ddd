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
//!   does not, the stream ends in a history this pair abandoned (a side
//!   cut off in a split forwarded it). The uplink reads back to the last
//!   window of this site's own history ([`find_fork`]) and takes what
//!   follows over ([`crate::outbox::Outbox::adopt`]): its readings stay
//!   counted in the cloud and are not sent again, this site's items take
//!   the site sequences after it, and a marker (`fog.<site>.superseded`)
//!   voids its averages. Without such a window it stops and says so
//!   rather than interleave two histories.
//! - A round starts only once the last round's client is gone: a client
//!   reconnecting by itself sends what it held once it gets through, and
//!   a message of an old round landing after the new round read the
//!   stream could put items in twice.
//!   A last message that repeats an older window (JetStream has been seen
//!   to store one again after a change of stream leader) is passed over:
//!   the history ends at the newest window before it ([`stream_tail`]);
//!   the copy's items are then in the stream twice, each with its site
//!   sequence, and the uplink logs it.
//! - Acks move the forwarding position in the pair's log
//!   (`Record::UplinkAcked`), so a restart or a new active starts near
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
/// Items in one window at most: the items handed over together, split
/// into messages by segment.
pub const MAX_WINDOW: usize = 8192;
/// Messages published and not yet acked, at most.
pub const MAX_IN_FLIGHT: usize = 256;
/// Batches of work queued between the loop and the connection.
pub const WORK_QUEUE: usize = 64;
/// Attempts a client makes to reconnect by itself before it gives up.
const MAX_RECONNECTS: usize = 6;
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

/// One message: part `part` of `parts` of the window of site items
/// `window.0..=window.1`, with the window's readings of one segment (in
/// site order) or a run of consecutive averages of one segment; `round`
/// names the resync it was made after.
#[derive(Debug)]
pub struct Work {
    pub round: u64,
    pub window: (u64, u64),
    /// The chain value at the window's last item.
    pub chain: u64,
    /// Once the window's last part lands, the stream holds every item from
    /// here to its end (the window's first item, unless the pair dropped
    /// some of a window cut short).
    pub landed_from: u64,
    pub part: u32,
    pub parts: u32,
    pub items: Vec<Item>,
}

/// A window the stream holds only some parts of (the uplink stopped
/// mid-window): its bounds, the site items that landed, and the parts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Partial {
    pub window: (u64, u64),
    pub landed: std::collections::BTreeSet<u64>,
    pub parts_done: u32,
}

/// Splits a window into its messages: readings by segment (each sensor
/// stays on one segment, so its readings keep their order), averages in
/// runs of consecutive items of one segment (so averages keep theirs),
/// every group cut at [`MAX_ITEMS_PER_MESSAGE`]; ordered by first item.
pub fn parts_of(items: &[Item]) -> Vec<Vec<Item>> {
    let mut readings: std::collections::BTreeMap<u32, usize> = std::collections::BTreeMap::new();
    let mut groups: Vec<Vec<Item>> = Vec::new();
    let mut last_average: Option<usize> = None;
    for item in items {
        let slot = if item.what.is_reading() {
            last_average = None;
            match readings.get(&item.what.segment()) {
                Some(&g) if groups[g].len() < MAX_ITEMS_PER_MESSAGE => g,
                _ => {
                    groups.push(Vec::new());
                    readings.insert(item.what.segment(), groups.len() - 1);
                    groups.len() - 1
                }
            }
        } else {
            match last_average {
                Some(g) if groups[g].len() < MAX_ITEMS_PER_MESSAGE && groups[g][0].what.segment() == item.what.segment() => g,
                _ => {
                    groups.push(Vec::new());
                    last_average = Some(groups.len() - 1);
                    groups.len() - 1
                }
            }
        };
        groups[slot].push(*item);
    }
    groups.sort_by_key(|g| g[0].site_seq);
    groups
}

/// The stream of the site ends at site item `through` (chain value
/// `chain`) and holds every item from `from` to it (`through + 1`: only
/// where it ends is known).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Landed {
    pub from: u64,
    pub through: u64,
    pub chain: u64,
}

impl Landed {
    /// `next` continued from where `self` ends: one landing covering both.
    pub fn extend(self, next: Landed) -> Option<Landed> {
        (next.from == self.through + 1).then_some(Landed { from: self.from, ..next })
    }
}

/// What the connection tells the loop.
#[derive(Debug)]
pub enum UplinkEvent {
    /// The stream's last message ends at site item `in_cloud`, with chain
    /// value `chain`: is that this site's history? (`Err`: why not.)
    Check { in_cloud: u64, chain: u64, answer: tokio::sync::oneshot::Sender<Result<(), String>> },
    /// This site's chain value at site item `site_seq`, if its outbox knows
    /// it (`Err`: the outbox knows nothing that old).
    ChainAt { site_seq: u64, answer: tokio::sync::oneshot::Sender<Result<Option<u64>, ()>> },
    /// The stream holds this site's items up to `fork`, then `fork + 1..=end`
    /// of another history (chain value `chain` at `end`) with `readings`:
    /// take it over (see [`crate::outbox::Outbox::adopt`]).
    Adopt { fork: u64, end: u64, chain: u64, readings: Vec<fog_protocol::ReadingInCloud>, answer: tokio::sync::oneshot::Sender<Result<(), String>> },
    /// Send items after `from` from now on, marked `round`; first the rest
    /// of a window the stream holds only some parts of.
    Resync { round: u64, from: u64, partial: Option<Partial> },
    /// JetStream acked `messages` messages; with `landed`, the last of them
    /// completed a window (or, after a connect, where the stream ends).
    Acked { landed: Option<Landed>, messages: u64 },
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
    /// The rest of a window the stream holds only some parts of.
    partial: Option<Partial>,
    /// Messages of the current window not yet handed over.
    queued: VecDeque<Work>,
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
        Uplink { cfg, control, work, events, round: None, sent_through: 0, partial: None, queued: VecDeque::new(), connected: false, last_error: String::new(), messages: 0 }
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
                self.queued.clear();
                self.partial = None;
            }
            let _ = self.control.send(next);
        }
    }

    /// The connection resynced: items after `from` (or after the pair's
    /// own position, if that is further) go next.
    pub fn resync(&mut self, round: u64, from: u64, partial: Option<Partial>, forwarded: u64) {
        self.round = Some(round);
        self.queued.clear();
        self.sent_through = from.max(forwarded);
        // The rest of the window goes unless the pair is past its end (the
        // items of it the pair dropped stay out: the outbox has none).
        self.partial = partial.filter(|p| p.window.1 > self.sent_through);
        if let Some(p) = &self.partial {
            self.sent_through = p.window.0 - 1;
        }
    }

    /// Hands the connection what it has room for: the queued messages of
    /// the current window, then the next window from `owed` (the items
    /// after [`Uplink::next_after`] that may leave now, in order).
    pub fn feed<'a>(&mut self, owed: impl Iterator<Item = &'a Item>) {
        let Some(round) = self.round else { return };
        if !self.hand_over() {
            return;
        }
        let (items, window, chain, landed_from, part_base) = match &self.partial {
            // The rest of a window the stream holds some parts of: all of it
            // at once (it was committed when its first parts left), minus
            // what landed.
            Some(p) => {
                let all: Vec<Item> = owed.take_while(|i| i.site_seq <= p.window.1).copied().collect();
                let (Some(start), Some(end)) = (all.first(), all.last().filter(|i| i.site_seq == p.window.1)) else { return };
                let (chain, landed_from) = (end.chain, start.site_seq);
                (all.into_iter().filter(|i| !p.landed.contains(&i.site_seq)).collect::<Vec<_>>(), p.window, chain, landed_from, p.parts_done)
            }
            None => {
                let items: Vec<Item> = owed.take(MAX_WINDOW).copied().collect();
                let (Some(first), Some(last)) = (items.first(), items.last()) else { return };
                let (window, chain) = ((first.site_seq, last.site_seq), last.chain);
                (items, window, chain, window.0, 0)
            }
        };
        self.partial = None;
        let groups = parts_of(&items);
        let parts = part_base + groups.len() as u32;
        for (i, group) in groups.into_iter().enumerate() {
            self.queued.push_back(Work { round, window, chain, landed_from, part: part_base + i as u32 + 1, parts, items: group });
        }
        self.sent_through = window.1;
        self.hand_over();
    }

    /// Hands over queued messages while the channel has room; whether
    /// all were.
    fn hand_over(&mut self) -> bool {
        while let Some(next) = self.queued.pop_front() {
            match self.work.try_reserve() {
                Ok(permit) => permit.send(next),
                Err(_) => {
                    self.queued.push_front(next);
                    return false;
                }
            }
        }
        true
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
        let (client_alive, mut client_gone) = mpsc::channel::<()>(1);
        let outcome = forward(&cfg, creds.as_ref(), round, client_alive, &mut control, &mut work, &events).await;
        let _ = events.send(UplinkEvent::Connected(false)).await;
        // The next round reads where the stream ends, so nothing of this
        // round may land after that: its client must be gone first. A
        // client keeps the publishes it could not send while it reconnects
        // and sends them once it gets through, even when nothing holds it
        // any more; it gives up after a few attempts (MAX_RECONNECTS), or
        // sends what it holds and closes.
        let mut waited = Duration::ZERO;
        while tokio::time::timeout(Duration::from_secs(30), client_gone.recv()).await.is_err() {
            waited += Duration::from_secs(30);
            warn!(stream = %cfg.stream(), "uplink: the last connection's client has not closed after {waited:?}; waiting for it before connecting again");
        }
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
    client_alive: mpsc::Sender<()>,
    control: &mut watch::Receiver<Control>,
    work: &mut mpsc::Receiver<Work>,
    events: &mpsc::Sender<UplinkEvent>,
) -> Result<(), String> {
    // The client reconnects by itself, a few times; a publish lost
    // meanwhile shows as an ack that fails or times out, and the uplink
    // starts over from the stream. Its event callback lives as long as the
    // client's connection task: `client_alive` closes when both are gone.
    let mut options = ConnectOptions::new()
        .connection_timeout(Duration::from_secs(5))
        .ping_interval(Duration::from_secs(5))
        .max_reconnects(MAX_RECONNECTS)
        .event_callback(move |_event| {
            let _alive = &client_alive;
            async {}
        });
    if let Some(creds) = creds {
        options = creds.apply(options).await?;
    }
    let urls: Vec<&str> = cfg.urls.split(',').map(str::trim).filter(|u| !u.is_empty()).collect();
    let client = options.connect(urls).await.map_err(|e| format!("cannot connect to {}: {e}", cfg.urls))?;
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
    // Where the stream is: its last message names the window of site items
    // it belongs to, which part of it it is, and the chain value at the
    // window's end. A window whose last part is there is in the cloud
    // whole; otherwise the parts before are read back to see which of its
    // items landed.
    let last_seq = stream.info().await.map_err(|e| format!("cannot read the stream {name}: {e}"))?.state.last_sequence;
    let (window_end, chain, partial) = if last_seq == 0 {
        (0, 0, None)
    } else {
        let read_head = |seq: u64| {
            let stream = &stream;
            let name = &name;
            async move {
                let m = stream.get_raw_message(seq).await.map_err(|e| format!("cannot read message {seq} of {name}: {e}"))?;
                Head::of(&m.headers).ok_or_else(|| format!("message {seq} of {name} lacks the Fog-Site-* headers: the stream must be this site's alone"))
            }
        };
        let (tail, head) = stream_tail(last_seq, read_head(last_seq).await?, read_head).await?;
        if tail < last_seq {
            warn!(
                stream = %name,
                "uplink: messages {}..={last_seq} of {name} repeat items the stream already holds up to {} (stored again by the cloud, seen after a change of stream leader); they stay, and forwarding goes on after item {}",
                tail + 1,
                head.window.1,
                head.window.1
            );
        }
        if head.part == head.parts {
            (head.window.1, head.chain, None)
        } else {
            let mut landed = std::collections::BTreeSet::new();
            for seq in (tail + 1).saturating_sub(u64::from(head.part)).max(1)..=tail {
                let m = stream.get_raw_message(seq).await.map_err(|e| format!("cannot read message {seq} of {name}: {e}"))?;
                Head::of(&m.headers).filter(|h| h.window == head.window).ok_or_else(|| format!("message {seq} of {name} is not a part of the window {:?} its last message is in", head.window))?;
                landed.extend(site_seqs(&m.payload).ok_or_else(|| format!("message {seq} of {name} has no readable body"))?);
            }
            (head.window.1, head.chain, Some(Partial { window: head.window, landed, parts_done: head.part }))
        }
    };
    // The stream must hold this site's history: ask the loop whether its
    // outbox has the same chain value at that item.
    let (answer, verdict) = tokio::sync::oneshot::channel();
    let _ = events.send(UplinkEvent::Check { in_cloud: window_end, chain, answer }).await;
    let mut expected = last_seq;
    let (partial, window_end) = match verdict.await {
        Ok(Ok(())) => (partial, window_end),
        Ok(Err(why)) => {
            // Another history at the end of the stream: a side that lost a
            // split forwarded it. Take it over if this site's history is in
            // the stream before it.
            let Some(fork) = find_fork(&stream, &name, last_seq, events).await? else { return Err(why) };
            let end = adopt(&stream, &name, fork, last_seq, window_end, chain, events).await?;
            let marker = superseded(cfg, control.borrow().epoch, fork.window_end + 1, end, chain);
            let ack = js
                .send_publish(format!("fog.{}.superseded", cfg.site), marker.expected_last_sequence(last_seq))
                .await
                .map_err(|e| format!("cannot publish to {name}: {e}"))?
                .await
                .map_err(|e| format!("publish to {name} failed: {e}"))?;
            if ack.sequence != last_seq + 1 {
                return Err(format!("the stream {name} moved under the uplink (its superseded marker got stream seq {}): resyncing", ack.sequence));
            }
            expected = last_seq + 1;
            (None, end)
        }
        Err(_) => return Ok(()),
    };
    let in_cloud = match &partial {
        Some(p) => p.window.0 - 1,
        None => window_end,
    };
    info!(stream = %name, last_seq, in_cloud, partial = partial.is_some(), "uplink connected: the stream holds this site's items up to {in_cloud}");
    let _ = events.send(UplinkEvent::Connected(true)).await;
    if in_cloud > 0 && partial.is_none() {
        let landed = Landed { from: in_cloud + 1, through: in_cloud, chain };
        let _ = events.send(UplinkEvent::Acked { landed: Some(landed), messages: 0 }).await;
    }
    let _ = events.send(UplinkEvent::Resync { round, from: in_cloud, partial }).await;

    // Each message in flight: its ack, what lands with it (if it is the
    // last part of its window), and the stream sequence it must get.
    let mut in_flight: VecDeque<(AckFuture, Option<Landed>, u64)> = VecDeque::new();
    loop {
        tokio::select! {
            biased;
            changed = control.changed() => {
                if changed.is_err() || !control.borrow().active {
                    return Ok(());
                }
            }
            ack = async { (&mut in_flight.front_mut().expect("guarded").0).await }, if !in_flight.is_empty() => {
                let Some((_, landed, want)) = in_flight.pop_front() else { continue };
                let ack = ack.map_err(|e| format!("publish to {name} failed: {e}"))?;
                if ack.duplicate || ack.sequence != want {
                    return Err(format!("the stream {name} moved under the uplink (ack of stream seq {} for the message expected at {want}{}): resyncing", ack.sequence, if ack.duplicate { ", a duplicate" } else { "" }));
                }
                let _ = events.send(UplinkEvent::Acked { landed, messages: 1 }).await;
            }
            next = work.recv(), if in_flight.len() < MAX_IN_FLIGHT => {
                let Some(next) = next else { return Ok(()) };
                if next.round != round || next.items.is_empty() {
                    continue;
                }
                let (subject, headers, payload) = message(cfg, control.borrow().epoch, &next);
                let publish = Publish::build().headers(headers).payload(payload.into()).expected_last_sequence(expected);
                let ack = js.send_publish(subject, publish).await.map_err(|e| format!("cannot publish to {name}: {e}"))?;
                expected += 1;
                let landed = (next.part == next.parts).then_some(Landed { from: next.landed_from, through: next.window.1, chain: next.chain });
                in_flight.push_back((ack.into_future(), landed, expected));
            }
        }
    }
}

/// Most messages read back from the end of a stream to find where this
/// site's history and another one part.
const MAX_FORK_SCAN: u64 = 100_000;

/// Where this site's history ends in a stream that ends in another one.
#[derive(Debug, Clone, Copy)]
struct Fork {
    /// The stream sequence of the last message of this site's history.
    seq: u64,
    /// The site item that message's window ends at.
    window_end: u64,
}

/// Reads the stream back from its end to the last whole window whose chain
/// value is this site's at that item; `None` if there is none (within
/// [`MAX_FORK_SCAN`] messages, or before the oldest item the outbox knows).
async fn find_fork(stream: &stream::Stream, name: &str, last_seq: u64, events: &mpsc::Sender<UplinkEvent>) -> Result<Option<Fork>, String> {
    let mut seq = last_seq;
    while seq >= 1 && last_seq - seq < MAX_FORK_SCAN {
        let m = stream.get_raw_message(seq).await.map_err(|e| format!("cannot read message {seq} of {name}: {e}"))?;
        if let Some(head) = Head::of(&m.headers).filter(|h| h.part == h.parts) {
            let (answer, mine) = tokio::sync::oneshot::channel();
            let _ = events.send(UplinkEvent::ChainAt { site_seq: head.window.1, answer }).await;
            match mine.await {
                Ok(Ok(Some(chain))) if chain == head.chain => return Ok(Some(Fork { seq, window_end: head.window.1 })),
                Ok(Ok(_)) => {}
                Ok(Err(())) | Err(_) => return Ok(None),
            }
        }
        seq -= 1;
    }
    Ok(None)
}

/// Takes over the other history in messages `fork.seq + 1..=last_seq`
/// (its items end at `end`, chain value `chain`): reads the readings they
/// hold and has the loop write the adoption to the pair's log. Returns
/// `end`.
async fn adopt(stream: &stream::Stream, name: &str, fork: Fork, last_seq: u64, end: u64, chain: u64, events: &mpsc::Sender<UplinkEvent>) -> Result<u64, String> {
    let mut readings = Vec::new();
    for seq in fork.seq + 1..=last_seq {
        let m = stream.get_raw_message(seq).await.map_err(|e| format!("cannot read message {seq} of {name}: {e}"))?;
        readings_after(&m.payload, fork.window_end, &mut readings).map_err(|e| format!("message {seq} of {name}: {e}"))?;
        if readings.len() > crate::outbox::MAX_IN_CLOUD {
            return Err(format!("the stream {name} holds more than {} readings of another history after site item {}: too many to take over; forwarding stops until an operator looks", crate::outbox::MAX_IN_CLOUD, fork.window_end));
        }
    }
    let n = readings.len();
    let (answer, done) = tokio::sync::oneshot::channel();
    let _ = events.send(UplinkEvent::Adopt { fork: fork.window_end, end, chain, readings, answer }).await;
    done.await.map_err(|_| "the server stopped".to_string())??;
    warn!(
        stream = %name,
        fork = fork.window_end,
        end,
        readings = n,
        "uplink: the stream held items {}..={end} of another history after this site's item {} (forwarded by a side that lost a split): taken over ({n} readings stay counted in the cloud, its averages are marked superseded); this site's items after {} follow from {}",
        fork.window_end + 1,
        fork.window_end,
        fork.window_end,
        end + 1
    );
    Ok(end)
}

/// Adds the readings of a message body whose site items are past `fork`
/// (each with its identity and time) to `out`. The body comes from the
/// cloud: anything but what the uplink writes is an error.
fn readings_after(payload: &[u8], fork: u64, out: &mut Vec<fog_protocol::ReadingInCloud>) -> Result<(), String> {
    let body: serde_json::Value = serde_json::from_slice(payload).map_err(|e| format!("no readable body: {e}"))?;
    if !body.is_object() {
        return Err("a body that is not an object".into());
    }
    for r in body.get("readings").and_then(|v| v.as_array()).into_iter().flatten() {
        let get = |k: &str| r.get(k).and_then(serde_json::Value::as_u64);
        let (Some(site_seq), Some(sensor_id), Some(incarnation), Some(seq), Some(timestamp_ms)) = (get("site_seq"), get("sensor_id"), get("incarnation"), get("seq"), get("timestamp_ms")) else {
            return Err(format!("a reading without its identity: {r}"));
        };
        if site_seq <= fork {
            continue;
        }
        let sensor_id = u32::try_from(sensor_id).map_err(|_| format!("sensor id {sensor_id} out of range"))?;
        out.push(fog_protocol::ReadingInCloud { sensor_id, incarnation, seq, timestamp_ms });
    }
    Ok(())
}

/// The marker that says the items `first..=last` of the stream are of a
/// history this site took over: their readings count, their averages are
/// superseded (by this site's, which follow). It ends at `last` with the
/// chain value there, as a window would.
fn superseded(cfg: &UplinkConfig, epoch: u64, first: u64, last: u64, chain: u64) -> Publish {
    let mut headers = place_headers(cfg, (first, last), (1, 1), chain);
    headers.insert("Fog-Superseded", "1");
    let body = serde_json::json!({ "site": cfg.site, "superseded": true, "first": first, "last": last, "part": 1, "parts": 1, "epoch": epoch });
    Publish::build().headers(headers).payload(body.to_string().into_bytes().into())
}

/// The headers that give a message its place (what [`Head::of`] reads):
/// the site, the window of site items, the part, the chain value at the
/// window's end.
fn place_headers(cfg: &UplinkConfig, window: (u64, u64), (part, parts): (u32, u32), chain: u64) -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert("Fog-Site", cfg.site.as_str());
    headers.insert("Fog-Site-Seq-First", window.0.to_string().as_str());
    headers.insert("Fog-Site-Seq-Last", window.1.to_string().as_str());
    headers.insert("Fog-Part", format!("{part}/{parts}").as_str());
    headers.insert("Fog-Site-Chain", format!("{chain:016x}").as_str());
    headers
}

/// A message of the uplink: its subject, headers (without the expected
/// last sequence, which depends on the stream) and JSON body.
pub fn message(cfg: &UplinkConfig, epoch: u64, work: &Work) -> (String, HeaderMap, Vec<u8>) {
    let (first, last) = work.window;
    let mut headers = place_headers(cfg, work.window, (work.part, work.parts), work.chain);
    headers.insert("Nats-Msg-Id", format!("{}:{first}-{last}:{}", cfg.site, work.part).as_str());
    let subject = work.items.first().map_or_else(|| format!("fog.{}.empty", cfg.site), |i| cfg.subject(&i.what));
    (subject, headers, encode(cfg, epoch, work))
}

/// Most messages at the end of a stream taken for copies of older ones.
const MAX_STRAYS: u64 = 64;

/// Where the stream really ends: its last message (`last`, with `head`),
/// unless that one repeats an older window (its window ends before the
/// window of the message before it). JetStream has been seen to store a
/// message again after a change of stream leader; such copies hold items
/// the stream already has, so the stream's history ends at the newest
/// window among the last [`MAX_STRAYS`] messages (at its last part there).
/// Copies that are not older than the message before them are not told
/// from history here: the outbox's check then refuses the stream.
async fn stream_tail<F, Fut>(last: u64, head: Head, read_head: F) -> Result<(u64, Head), String>
where
    F: Fn(u64) -> Fut,
    Fut: Future<Output = Result<Head, String>>,
{
    if last <= 1 {
        return Ok((last, head));
    }
    let before = read_head(last - 1).await?;
    if before.window.1 <= head.window.1 {
        return Ok((last, head));
    }
    let (mut tail, mut newest) = (last - 1, before);
    let mut seq = last - 1;
    while seq > 1 && last - seq < MAX_STRAYS {
        seq -= 1;
        let h = read_head(seq).await?;
        // Scanning back, the first message of the newest window met is
        // its last part.
        if h.window.1 > newest.window.1 {
            (tail, newest) = (seq, h);
        }
    }
    Ok((tail, newest))
}

/// What a message's headers say of its place.
struct Head {
    window: (u64, u64),
    part: u32,
    parts: u32,
    chain: u64,
}

impl Head {
    fn of(h: &HeaderMap) -> Option<Head> {
        let get = |name: &str| h.get(name).map(|v| v.as_str().to_string());
        let (part, parts) = get("Fog-Part")?.split_once('/').and_then(|(a, b)| Some((a.parse().ok()?, b.parse().ok()?)))?;
        let head = Head {
            window: (get("Fog-Site-Seq-First")?.parse().ok()?, get("Fog-Site-Seq-Last")?.parse().ok()?),
            part,
            parts,
            chain: u64::from_str_radix(&get("Fog-Site-Chain")?, 16).ok()?,
        };
        (head.part >= 1 && head.part <= head.parts && head.window.0 <= head.window.1).then_some(head)
    }
}

/// The site sequences of the items in a message body.
fn site_seqs(payload: &[u8]) -> Option<Vec<u64>> {
    let body: serde_json::Value = serde_json::from_slice(payload).ok()?;
    let mut out = Vec::new();
    for kind in ["readings", "averages"] {
        for item in body.get(kind).and_then(|v| v.as_array()).into_iter().flatten() {
            out.push(item.get("site_seq")?.as_u64()?);
        }
    }
    Some(out)
}

/// A message's body: JSON, one object with the site, the segment, the
/// site sequences it spans and its readings or averages.
#[derive(Serialize)]
struct Body<'a> {
    site: &'a str,
    segment: u32,
    /// The window of site items this message is a part of.
    first: u64,
    last: u64,
    part: u32,
    parts: u32,
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

fn encode(cfg: &UplinkConfig, epoch: u64, work: &Work) -> Vec<u8> {
    let items = &work.items;
    let mut body = Body {
        site: &cfg.site,
        segment: items.first().map_or(0, |i| i.what.segment()),
        first: work.window.0,
        last: work.window.1,
        part: work.part,
        parts: work.parts,
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
    fn the_stream_ends_at_its_newest_window_before_copies_of_older_ones() {
        let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let tail_of = |stream: &[(u64, u64, u32, u32)]| {
            let at = |seq: u64| {
                let (first, last, part, parts) = stream[seq as usize - 1];
                Head { window: (first, last), part, parts, chain: last * 7 }
            };
            let n = stream.len() as u64;
            let (tail, head) = runtime.block_on(stream_tail(n, at(n), |seq| async move { Ok(at(seq)) })).unwrap();
            (tail, head.window, head.part)
        };
        let history = [(1, 10, 1, 1), (11, 20, 1, 2), (11, 20, 2, 2), (21, 30, 1, 3), (21, 30, 2, 3)];
        // No copies: the last message, a part of a window cut short.
        assert_eq!(tail_of(&history), (5, (21, 30), 2));
        assert_eq!(tail_of(&history[..1]), (1, (1, 10), 1));
        // A copy of an older window at the end, or two.
        let mut copied = history.to_vec();
        copied.push((11, 20, 2, 2));
        assert_eq!(tail_of(&copied), (5, (21, 30), 2));
        copied.push((1, 10, 1, 1));
        assert_eq!(tail_of(&copied), (5, (21, 30), 2));
        // Copies in rising order are not told from history (the outbox's
        // check refuses such a stream).
        let rising = [(1, 10, 1, 1), (11, 20, 1, 1), (21, 30, 1, 1), (1, 10, 1, 1), (11, 20, 1, 1)];
        assert_eq!(tail_of(&rising), (5, (11, 20), 1));
    }

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

    fn reading(site_seq: u64, segment: u32, sensor_id: u32) -> Item {
        Item {
            site_seq,
            chain: site_seq * 10,
            lsn: 1,
            at_ms: 0,
            what: Owed::Reading { sensor_id, incarnation: 1, segment, reading: fog_core::Reading { seq: site_seq, speed_kmh: 90, timestamp_ms: 0 } },
        }
    }

    fn average(site_seq: u64, segment: u32) -> Item {
        let a = fog_core::Average { seq: site_seq, epoch: 1, segment, window_end_ms: 0, count: 1, sum_kmh: 90, revision: 0, chain: 0 };
        Item { site_seq, chain: site_seq * 10, lsn: 1, at_ms: 0, what: Owed::Average(a) }
    }

    fn seqs(items: &[Item]) -> Vec<u64> {
        items.iter().map(|i| i.site_seq).collect()
    }

    #[test]
    fn a_window_splits_by_segment_keeping_each_sensors_and_the_averages_order() {
        let items = vec![reading(1, 0, 1), reading(2, 1, 2), average(3, 0), average(4, 1), reading(5, 0, 1), reading(6, 1, 2), average(7, 1)];
        let parts = parts_of(&items);
        let got: Vec<Vec<u64>> = parts.iter().map(|p| seqs(p)).collect();
        assert_eq!(got, vec![vec![1, 5], vec![2, 6], vec![3], vec![4], vec![7]]);
        let many: Vec<Item> = (1..=2500).map(|i| reading(i, 3, 9)).collect();
        let parts = parts_of(&many);
        assert_eq!(parts.iter().map(Vec::len).collect::<Vec<_>>(), vec![1000, 1000, 500]);
        assert_eq!(parts.concat().iter().map(|i| i.site_seq).collect::<Vec<_>>(), (1..=2500).collect::<Vec<_>>());
    }

    fn uplink(queue: usize) -> (Uplink, mpsc::Receiver<Work>) {
        let (control, _c) = watch::channel(Control::default());
        let (work, work_rx) = mpsc::channel(queue);
        let (_e, events) = mpsc::channel(1);
        let cfg = UplinkConfig { urls: String::new(), creds: None, site: "s".into(), replicas: 1, duplicate_window: Duration::from_secs(1), backlog_bytes: 1 };
        (Uplink { cfg, control, work, events, round: None, sent_through: 0, partial: None, queued: VecDeque::new(), connected: false, last_error: String::new(), messages: 0 }, work_rx)
    }

    #[test]
    fn the_feed_hands_over_windows_and_waits_when_full() {
        let (mut up, mut rx) = uplink(2);
        let items: Vec<Item> = vec![reading(1, 0, 1), reading(2, 1, 2), reading(3, 2, 3), reading(4, 0, 1)];
        up.feed(items.iter());
        assert!(rx.try_recv().is_err(), "nothing is fed before the connection resynced");
        up.resync(7, 0, None, 1);
        up.feed(items.iter().filter(|i| i.site_seq > 1));
        assert_eq!(up.next_after(), Some(4), "the window is planned whole");
        // The channel holds two: the third part waits, and no new window starts.
        up.feed(items.iter().filter(|i| i.site_seq > 4));
        let a = rx.try_recv().unwrap();
        let b = rx.try_recv().unwrap();
        assert!(rx.try_recv().is_err());
        assert_eq!((a.round, a.window, a.part, a.parts, seqs(&a.items)), (7, (2, 4), 1, 3, vec![2]));
        assert_eq!((b.part, seqs(&b.items), b.chain), (2, vec![3], 40));
        up.feed(std::iter::empty());
        let c = rx.try_recv().unwrap();
        assert_eq!((c.part, c.parts, seqs(&c.items)), (3, 3, vec![4]));
    }

    #[test]
    fn a_window_cut_short_is_finished_without_what_landed() {
        let (mut up, mut rx) = uplink(8);
        let items: Vec<Item> = vec![reading(5, 0, 1), reading(6, 1, 2), reading(7, 0, 1), reading(8, 2, 3), reading(9, 0, 4)];
        let partial = Partial { window: (5, 8), landed: [5, 7].into_iter().collect(), parts_done: 1 };
        up.resync(3, 4, Some(partial), 4);
        assert_eq!(up.next_after(), Some(4));
        up.feed(items.iter());
        let a = rx.try_recv().unwrap();
        let b = rx.try_recv().unwrap();
        assert_eq!((a.window, a.part, a.parts, seqs(&a.items), a.chain), ((5, 8), 2, 3, vec![6], 80));
        assert_eq!((b.part, b.parts, seqs(&b.items)), (3, 3, vec![8]));
        assert!(rx.try_recv().is_err(), "the window ends at 8; 9 starts the next");
        up.feed(items.iter().filter(|i| i.site_seq > 8));
        let c = rx.try_recv().unwrap();
        assert_eq!((c.window, c.part, c.parts), ((9, 9), 1, 1));
        assert_eq!((a.landed_from, c.landed_from), (5, 9));
        // A partial window the pair has already forwarded past is dropped.
        let (mut up, _rx) = uplink(8);
        up.resync(1, 4, Some(Partial { window: (3, 4), landed: Default::default(), parts_done: 1 }), 6);
        assert_eq!(up.next_after(), Some(6));
        // One the pair dropped the start of: the rest of it goes, without
        // what landed, and lands from the first item the pair still has.
        let (mut up, mut rx) = uplink(8);
        up.resync(2, 4, Some(Partial { window: (5, 8), landed: [5, 7].into_iter().collect(), parts_done: 1 }), 6);
        up.feed(items.iter().filter(|i| i.site_seq > 6));
        let d = rx.try_recv().unwrap();
        assert_eq!((d.window, d.part, d.parts, seqs(&d.items), d.landed_from), ((5, 8), 2, 2, vec![8], 7));
    }

    #[test]
    fn landings_join_only_when_they_follow_on() {
        let a = Landed { from: 5, through: 9, chain: 1 };
        assert_eq!(a.extend(Landed { from: 10, through: 12, chain: 2 }), Some(Landed { from: 5, through: 12, chain: 2 }));
        assert_eq!(a.extend(Landed { from: 11, through: 12, chain: 2 }), None, "a gap holds dropped items");
        let at_connect = Landed { from: 10, through: 9, chain: 1 };
        assert_eq!(at_connect.extend(Landed { from: 10, through: 12, chain: 2 }), Some(Landed { from: 10, through: 12, chain: 2 }));
    }

    #[test]
    fn bodies_read_back_from_the_cloud_are_checked() {
        let mut out = Vec::new();
        let good = br#"{"readings":[{"site_seq":4,"sensor_id":1,"incarnation":2,"seq":3,"timestamp_ms":5},{"site_seq":9,"sensor_id":7,"incarnation":8,"seq":9,"timestamp_ms":10}]}"#;
        readings_after(good, 4, &mut out).unwrap();
        assert_eq!(out, vec![fog_protocol::ReadingInCloud { sensor_id: 7, incarnation: 8, seq: 9, timestamp_ms: 10 }], "items up to the fork are this site's own");
        readings_after(br#"{"averages":[{"site_seq":5}]}"#, 0, &mut out).unwrap();
        assert_eq!(out.len(), 1);
        let hostile: [&[u8]; 7] = [
            b"not json",
            b"[1,2]",
            br#"{"readings":[{"site_seq":5}]}"#,
            br#"{"readings":[{"site_seq":5,"sensor_id":4294967296,"incarnation":1,"seq":1,"timestamp_ms":1}]}"#,
            br#"{"readings":[{"site_seq":-5,"sensor_id":1,"incarnation":1,"seq":1,"timestamp_ms":1}]}"#,
            br#"{"readings":[{"site_seq":5,"sensor_id":1,"incarnation":1.5,"seq":1,"timestamp_ms":1}]}"#,
            br#"{"readings":[{"site_seq":5,"sensor_id":"1","incarnation":1,"seq":1,"timestamp_ms":1}]}"#,
        ];
        for body in hostile {
            assert!(readings_after(body, 0, &mut out).is_err(), "{}", String::from_utf8_lossy(body));
        }
        assert_eq!(out.len(), 1, "the hostile bodies added nothing");
    }

    #[test]
    fn headers_are_read_strictly() {
        let mut h = HeaderMap::new();
        h.insert("Fog-Site-Seq-First", "5");
        h.insert("Fog-Site-Seq-Last", "9");
        h.insert("Fog-Part", "2/3");
        h.insert("Fog-Site-Chain", "00000000000000ff");
        let head = Head::of(&h).unwrap();
        assert_eq!((head.window, head.part, head.parts, head.chain), ((5, 9), 2, 3, 255));
        for (name, bad) in [("Fog-Part", "4/3"), ("Fog-Part", "0/3"), ("Fog-Part", "x"), ("Fog-Site-Seq-First", "10"), ("Fog-Site-Chain", "zz")] {
            let mut b = h.clone();
            b.insert(name, bad);
            assert!(Head::of(&b).is_none(), "{name}: {bad}");
        }
        assert_eq!(site_seqs(br#"{"readings":[{"site_seq":3}],"averages":[{"site_seq":4}]}"#), Some(vec![3, 4]));
        assert_eq!(site_seqs(b"not json"), None);
    }
}
