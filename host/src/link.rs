//! One DEALER connection to one server, on a socket thread of its own (see
//! `fog_transport::socket`), with its events forwarded by a task.
//!
//! A `Link` is disposable: the session drops it on silence and connects a
//! fresh one, and only a reply counts as delivery. Frames arrive on a
//! shared channel tagged with the link's generation, so late frames from a
//! dropped link are recognised and ignored. The socket's monitor reports a
//! closed connection, or a server that refused the host's key, on the same
//! channel: a server that died is given up at once instead of after the
//! reply timeout.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use fog_transport::{Event, Keypair, Limits, PublicKey};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// Messages libzmq queues each way on a link (ZMQ_SNDHWM/RCVHWM). A host
/// sends at most four batches before it hears back.
const LINK_HWM: i32 = 16;

/// The keys a host connects with: its own, and each server's public key.
#[derive(Debug, Clone)]
pub struct LinkKeys {
    pub keys: Arc<Keypair>,
    pub server: PublicKey,
}

/// Something that happened on the link of the given generation.
pub struct Incoming {
    pub generation: u64,
    pub event: LinkEvent,
}

pub enum LinkEvent {
    /// A frame from the server.
    Frame(Bytes),
    /// The connection closed (the server process died or closed it): no
    /// reply will come on this link, so there is no point waiting for one.
    Closed,
    /// The server refused the handshake (it does not list this host's key,
    /// or the host does not hold the server's key): asking again at once
    /// would be refused again.
    Refused(&'static str),
}

pub struct Link {
    pub endpoint: String,
    pub generation: u64,
    send: fog_transport::Sender,
    events_task: JoinHandle<()>,
    _ctx: fog_transport::Context,
}

#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("cannot connect to {0}: {1}")]
    Connect(String, String),
    #[error("cannot send to {0}: {1}")]
    Send(String, String),
}

impl Link {
    pub async fn connect(
        endpoint: String,
        generation: u64,
        incoming: mpsc::Sender<Incoming>,
        keys: Option<LinkKeys>,
    ) -> Result<Link, LinkError> {
        let ctx = fog_transport::Context::new();
        // A host has at most a few batches in flight: a server that queues
        // more replies than LINK_HWM in libzmq is flooding it, and its
        // frames of up to 16 MiB wait in TCP, not in memory.
        let limits = Limits { max_message_bytes: fog_protocol::MAX_FRAME_BYTES + 1024, hwm: LINK_HWM, ..Limits::default() };
        let curve = keys.as_ref().map(|k| (k.keys.as_ref(), &k.server));
        let mut socket = fog_transport::connect_monitored("link", &ctx, fog_transport::SocketType::DEALER, &endpoint, curve, &limits)
            .map_err(|e| LinkError::Connect(endpoint.clone(), e.to_string()))?;
        let send = socket.sender();
        let events_task = tokio::spawn(async move {
            while let Some(event) = socket.recv().await {
                let event = match event {
                    // A reply is a single frame; anything else is not ours.
                    Event::Message(m) => match <[Vec<u8>; 1]>::try_from(m.frames) {
                        Ok([frame]) => LinkEvent::Frame(Bytes::from(frame)),
                        Err(_) => continue,
                    },
                    Event::Disconnected => LinkEvent::Closed,
                    Event::HandshakeFailed(why) => LinkEvent::Refused(why),
                    Event::Connected => continue,
                };
                let closed = matches!(event, LinkEvent::Closed | LinkEvent::Refused(_));
                // Bounded: a loop behind on its replies stops this reading
                // the socket, whose own queue is bounded too.
                if incoming.send(Incoming { generation, event }).await.is_err() || closed {
                    break;
                }
            }
        });
        Ok(Link { endpoint, generation, send, events_task, _ctx: ctx })
    }

    /// Queues one frame; libzmq sends it once connected. A frame that
    /// cannot be queued (the server has not taken the earlier ones) is an
    /// error like any other.
    pub async fn send(&mut self, frame: Vec<u8>, _timeout: Duration) -> Result<(), LinkError> {
        self.send.send(vec![frame]).map_err(|e| LinkError::Send(self.endpoint.clone(), e.to_string()))
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        self.events_task.abort();
    }
}
