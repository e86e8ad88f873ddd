//! A libzmq socket owned by a thread of its own, with an async face.
//!
//! libzmq sockets are not thread-safe, so each [`Socket`] lives on one
//! dedicated thread that polls it together with a wake-up pipe (for
//! outgoing messages) and, when asked for, the socket's monitor (for
//! connection events). Async code talks to it through bounded queues:
//!
//! - **out**: [`Socket::send`] never blocks. A message that finds the queue
//!   full, or that libzmq cannot take at once (the peer's high-water mark is
//!   reached, or a ROUTER's peer is gone), is dropped and counted in
//!   [`SocketStats`]: one client that does not read cannot stall a server's
//!   loop or grow its memory. The protocols above resend what matters.
//! - **in**: [`Socket::recv`] yields [`Event`]s. When the async side falls
//!   behind, the thread stops reading, so libzmq's own queue fills to its
//!   high-water mark and TCP pushes back on the sender.

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, mpsc as std_mpsc};
use std::thread::JoinHandle;
use std::time::Duration;

use tokio::sync::mpsc;

use crate::keys::PublicKey;

/// Outgoing messages queued for one socket's thread before sends are dropped.
pub const OUT_QUEUE: usize = 4096;
/// Incoming events queued for the async side before the thread stops reading.
pub const IN_QUEUE: usize = 4096;
/// Bytes of incoming messages queued for the async side before the thread
/// stops reading (it reads one message more when below: a message larger
/// than this still gets through an empty queue). With messages of up to
/// 16 MiB, a count alone would let a flood queue gigabytes.
pub const IN_QUEUE_BYTES: u64 = 32 * 1024 * 1024;
/// Longest the thread waits in one poll; bounds how late it notices that
/// its owner is gone.
const POLL_MS: i64 = 250;
/// Monitor events a socket reports (see [`Event`]).
const MONITOR_EVENTS: u16 = 0x0001 /* CONNECTED */ | 0x0200 /* DISCONNECTED */ | 0x0800 /* HANDSHAKE_FAILED_NO_DETAIL */
    | 0x1000 /* HANDSHAKE_SUCCEEDED */ | 0x2000 /* HANDSHAKE_FAILED_PROTOCOL */ | 0x4000 /* HANDSHAKE_FAILED_AUTH */;

/// One message received, with the authenticated key of the client that
/// sent it (CurveZMQ's `User-Id`, set by the ZAP handler; `None` on a
/// socket without security).
#[derive(Debug)]
pub struct Message {
    pub frames: Vec<Vec<u8>>,
    pub user: Option<PublicKey>,
}

/// What a socket's thread reports.
#[derive(Debug)]
pub enum Event {
    Message(Message),
    /// A connection completed its handshake (with security, if any).
    Connected,
    /// A connection closed: the peer died or closed it.
    Disconnected,
    /// A peer failed the handshake: wrong or unknown key, or not speaking
    /// the same security mechanism. The text says which.
    HandshakeFailed(&'static str),
}

/// Counters of one socket.
#[derive(Debug, Default)]
pub struct SocketStats {
    /// Messages dropped on the way out (queue full, peer's high-water mark
    /// reached, peer gone).
    pub dropped_out: AtomicU64,
    pub sent: AtomicU64,
    pub received: AtomicU64,
    /// Bytes of received messages the async side has not taken yet.
    pub queued_in_bytes: AtomicU64,
}

/// Why a message was not queued for sending.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SendError {
    #[error("the outgoing queue is full")]
    Full,
    #[error("the socket is closed")]
    Closed,
}

struct Waker {
    stream: UnixStream,
    pending: AtomicBool,
}

impl Waker {
    fn wake(&self) {
        if !self.pending.swap(true, Ordering::AcqRel) {
            // A full pipe already holds a wake-up: nothing is lost.
            let _ = (&self.stream).write(&[1]);
        }
    }
}

/// The sending half of a [`Socket`]; cheap to clone, usable from any thread.
#[derive(Clone)]
pub struct Sender {
    out: std_mpsc::SyncSender<Vec<Vec<u8>>>,
    waker: Arc<Waker>,
    stats: Arc<SocketStats>,
}

impl Sender {
    /// Queues one multipart message; never blocks. A message that cannot be
    /// queued is counted as dropped.
    pub fn send(&self, frames: Vec<Vec<u8>>) -> Result<(), SendError> {
        let result = match self.out.try_send(frames) {
            Ok(()) => Ok(()),
            Err(std_mpsc::TrySendError::Full(_)) => Err(SendError::Full),
            Err(std_mpsc::TrySendError::Disconnected(_)) => Err(SendError::Closed),
        };
        match result {
            Ok(()) => self.waker.wake(),
            Err(_) => {
                self.stats.dropped_out.fetch_add(1, Ordering::Relaxed);
            }
        }
        result
    }

    pub fn stats(&self) -> &SocketStats {
        &self.stats
    }
}

/// A socket on a thread of its own; dropping it closes the socket.
pub struct Socket {
    sender: Sender,
    events: mpsc::Receiver<Event>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Socket {
    /// Moves `socket` (bound or connected, options set) onto a thread of its
    /// own. With `monitor`, connection events are reported too; a socket
    /// that connects should rather be started by [`crate::connect_monitored`],
    /// which watches it before the connection starts.
    pub fn spawn(name: &str, ctx: &zmq::Context, socket: zmq::Socket, monitor: bool) -> std::io::Result<Socket> {
        let monitor = if monitor { Some(watch(ctx, &socket).map_err(std::io::Error::other)?) } else { None };
        Self::start(name, socket, monitor)
    }

    /// Moves `socket` onto a thread of its own, with `monitor` (from
    /// [`watch`]) reporting its connection events.
    pub(crate) fn start(name: &str, socket: zmq::Socket, monitor: Option<zmq::Socket>) -> std::io::Result<Socket> {
        let (wake_tx, wake_rx) = UnixStream::pair()?;
        wake_tx.set_nonblocking(true)?;
        wake_rx.set_nonblocking(true)?;
        let waker = Arc::new(Waker { stream: wake_tx, pending: AtomicBool::new(false) });
        let stats = Arc::new(SocketStats::default());
        let (out_tx, out_rx) = std_mpsc::sync_channel(OUT_QUEUE);
        let (in_tx, in_rx) = mpsc::channel(IN_QUEUE);
        let stop = Arc::new(AtomicBool::new(false));
        let actor = Actor {
            socket,
            monitor,
            wake: wake_rx,
            waker: waker.clone(),
            out: out_rx,
            events: in_tx,
            stats: stats.clone(),
            stop: stop.clone(),
            held: None,
        };
        let thread = std::thread::Builder::new().name(format!("zmq-{name}")).spawn(move || actor.run())?;
        Ok(Socket { sender: Sender { out: out_tx, waker, stats }, events: in_rx, stop, thread: Some(thread) })
    }

    pub fn send(&self, frames: Vec<Vec<u8>>) -> Result<(), SendError> {
        self.sender.send(frames)
    }

    /// A sending half that can be kept apart from the socket.
    pub fn sender(&self) -> Sender {
        self.sender.clone()
    }

    /// The next event; `None` once the socket's thread has stopped.
    pub async fn recv(&mut self) -> Option<Event> {
        let event = self.events.recv().await;
        self.took(event)
    }

    /// The next event if one is waiting.
    pub fn try_recv(&mut self) -> Option<Event> {
        let event = self.events.try_recv().ok();
        self.took(event)
    }

    /// Frees the room a message taken from the queue held.
    fn took(&self, event: Option<Event>) -> Option<Event> {
        if let Some(Event::Message(m)) = &event {
            self.sender.stats.queued_in_bytes.fetch_sub(message_bytes(&m.frames), Ordering::AcqRel);
        }
        event
    }

    /// The next event, waiting at most `timeout` (blocking; for tools and
    /// tests outside an async runtime).
    pub fn recv_blocking(&mut self, timeout: Duration) -> Option<Event> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if let Ok(event) = self.events.try_recv() {
                return self.took(Some(event));
            }
            if std::time::Instant::now() >= deadline || self.events.is_closed() {
                return None;
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    pub fn stats(&self) -> &SocketStats {
        &self.sender.stats
    }
}

fn message_bytes(frames: &[Vec<u8>]) -> u64 {
    frames.iter().map(|f| f.len() as u64).sum()
}

impl Drop for Socket {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        self.sender.waker.wake();
        // The thread sees the flag within one poll; it is not joined here so
        // that dropping never blocks an async task.
        self.thread.take();
    }
}

/// A monitor of `socket`'s connection events, to poll beside it. Events
/// from before it is attached are not reported, and libzmq reports a
/// refused handshake once, without trying again.
pub(crate) fn watch(ctx: &zmq::Context, socket: &zmq::Socket) -> Result<zmq::Socket, zmq::Error> {
    static N: AtomicU64 = AtomicU64::new(0);
    let endpoint = format!("inproc://fog-monitor-{}", N.fetch_add(1, Ordering::Relaxed));
    socket.monitor(&endpoint, i32::from(MONITOR_EVENTS))?;
    let pair = ctx.socket(zmq::PAIR)?;
    pair.connect(&endpoint)?;
    Ok(pair)
}

struct Actor {
    socket: zmq::Socket,
    monitor: Option<zmq::Socket>,
    wake: UnixStream,
    waker: Arc<Waker>,
    out: std_mpsc::Receiver<Vec<Vec<u8>>>,
    events: mpsc::Sender<Event>,
    stats: Arc<SocketStats>,
    stop: Arc<AtomicBool>,
    /// An event the async side had no room for yet.
    held: Option<Event>,
}

impl Actor {
    fn run(mut self) {
        let _ = self.socket.set_linger(0);
        while !self.stop.load(Ordering::Acquire) {
            if let Some(event) = self.held.take() {
                match self.events.try_send(event) {
                    Ok(()) => {}
                    Err(mpsc::error::TrySendError::Full(event)) => self.held = Some(event),
                    Err(mpsc::error::TrySendError::Closed(_)) => return,
                }
            }
            let reading = self.held.is_none() && self.room();
            let (socket_ready, wake_ready, monitor_ready) = {
                let mut items = Vec::with_capacity(3);
                items.push(self.socket.as_poll_item(if reading { zmq::POLLIN } else { zmq::PollEvents::empty() }));
                items.push(zmq::PollItem::from_fd(self.wake.as_raw_fd(), zmq::POLLIN));
                if let Some(m) = &self.monitor {
                    items.push(m.as_poll_item(zmq::POLLIN));
                }
                let timeout = if reading { POLL_MS } else { 1 };
                if zmq::poll(&mut items, timeout).is_err() {
                    continue; // EINTR
                }
                (items[0].is_readable(), items[1].is_readable(), items.get(2).is_some_and(|i| i.is_readable()))
            };
            if wake_ready || self.waker.pending.load(Ordering::Acquire) {
                let mut buf = [0u8; 64];
                while matches!((&self.wake).read(&mut buf), Ok(n) if n > 0) {}
                self.waker.pending.store(false, Ordering::Release);
            }
            if !self.send_queued() {
                return;
            }
            if socket_ready && !self.receive() {
                return;
            }
            if monitor_ready && !self.watch() {
                return;
            }
        }
    }

    /// Sends everything queued; false once the owner is gone.
    fn send_queued(&mut self) -> bool {
        loop {
            match self.out.try_recv() {
                Ok(frames) => {
                    let n = frames.len();
                    let mut ok = true;
                    for (i, frame) in frames.into_iter().enumerate() {
                        let more = if i + 1 < n { zmq::SNDMORE } else { 0 };
                        if self.socket.send(frame, zmq::DONTWAIT | more).is_err() {
                            // HWM reached or (ROUTER_MANDATORY) peer gone: a
                            // first frame that fails sends nothing at all.
                            ok = false;
                            break;
                        }
                    }
                    let counter = if ok { &self.stats.sent } else { &self.stats.dropped_out };
                    counter.fetch_add(1, Ordering::Relaxed);
                }
                Err(std_mpsc::TryRecvError::Empty) => return true,
                Err(std_mpsc::TryRecvError::Disconnected) => return false,
            }
        }
    }

    /// Whether the async side has room for another message.
    fn room(&self) -> bool {
        self.stats.queued_in_bytes.load(Ordering::Acquire) < IN_QUEUE_BYTES
    }

    /// Reads what is waiting, up to the room the async side has.
    fn receive(&mut self) -> bool {
        for _ in 0..IN_QUEUE {
            if !self.room() {
                return true;
            }
            let mut frames = Vec::new();
            let mut user = None;
            loop {
                match self.socket.recv_msg(zmq::DONTWAIT) {
                    Ok(mut msg) => {
                        if user.is_none() {
                            user = msg.gets("User-Id").and_then(|u| PublicKey::from_z85(u).ok());
                        }
                        let more = msg.get_more();
                        frames.push(msg.to_vec());
                        if !more {
                            break;
                        }
                    }
                    Err(_) if frames.is_empty() => return true,
                    // libzmq delivers the frames of a message atomically.
                    Err(_) => break,
                }
            }
            self.stats.received.fetch_add(1, Ordering::Relaxed);
            self.stats.queued_in_bytes.fetch_add(message_bytes(&frames), Ordering::AcqRel);
            match self.events.try_send(Event::Message(Message { frames, user })) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(event)) => {
                    self.held = Some(event);
                    return true;
                }
                Err(mpsc::error::TrySendError::Closed(_)) => return false,
            }
        }
        true
    }

    fn watch(&mut self) -> bool {
        let Some(monitor) = &self.monitor else { return true };
        // Always drained, even with the queue full (the event is then
        // dropped): libzmq sends monitor events with a blocking send, so a
        // monitor left unread could stall its I/O thread.
        while let Ok(first) = monitor.recv_msg(zmq::DONTWAIT) {
            // [event u16, value u32] then the endpoint.
            while monitor.get_rcvmore().unwrap_or(false) {
                let _ = monitor.recv_msg(zmq::DONTWAIT);
            }
            let raw = first.get(..2).map_or(0, |b| u16::from_le_bytes([b[0], b[1]]));
            let event = match raw {
                0x1000 => Event::Connected,
                0x0200 => Event::Disconnected,
                0x4000 => Event::HandshakeFailed("the peer refused the key (or it is not authorized)"),
                0x2000 => Event::HandshakeFailed("the peer speaks another security mechanism or protocol"),
                0x0800 => Event::HandshakeFailed("the handshake failed"),
                _ => continue,
            };
            if self.events.try_send(event).is_err() && self.events.is_closed() {
                return false;
            }
        }
        true
    }
}
