//! One DEALER connection to one server, with its receive side in a task of
//! its own so a receive is always pending.
//!
//! zmq.rs DEALERs do not reconnect by themselves and a send to a dead peer
//! may succeed silently, so a `Link` is disposable: the session drops it on
//! silence and connects a fresh one, and only a reply counts as delivery.
//! Frames arrive on a shared channel tagged with the link's generation, so
//! late frames from a dropped link are recognised and ignored. The socket's
//! monitor reports a closed connection on the same channel: a server that
//! died is given up at once instead of after the reply timeout.

use std::time::Duration;

use bytes::Bytes;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use futures_util::StreamExt;
use zeromq::{DealerSocket, Socket, SocketEvent, SocketRecv, SocketSend, ZmqMessage};

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
}

pub struct Link {
    pub endpoint: String,
    pub generation: u64,
    send: zeromq::DealerSendHalf,
    recv_task: JoinHandle<()>,
    monitor_task: JoinHandle<()>,
}

#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("no connection to {0} within {1:?}")]
    ConnectTimeout(String, Duration),
    #[error("cannot connect to {0}: {1}")]
    Connect(String, String),
    #[error("cannot send to {0}: {1}")]
    Send(String, String),
}

impl Link {
    pub async fn connect(
        endpoint: String,
        generation: u64,
        timeout: Duration,
        incoming: mpsc::UnboundedSender<Incoming>,
    ) -> Result<Link, LinkError> {
        let mut socket = DealerSocket::new();
        let mut monitor = socket.monitor();
        match tokio::time::timeout(timeout, socket.connect(&endpoint)).await {
            Err(_) => return Err(LinkError::ConnectTimeout(endpoint, timeout)),
            Ok(Err(e)) => return Err(LinkError::Connect(endpoint, e.to_string())),
            Ok(Ok(())) => {}
        }
        let (send, mut recv) = socket.split();
        let closed = incoming.clone();
        let monitor_task = tokio::spawn(async move {
            while let Some(event) = monitor.next().await {
                if matches!(event, SocketEvent::Disconnected(_)) {
                    let _ = closed.send(Incoming { generation, event: LinkEvent::Closed });
                    break;
                }
            }
        });
        let recv_task = tokio::spawn(async move {
            while let Ok(msg) = recv.recv().await {
                // A reply is a single frame; anything else is not ours.
                let Some(frame) = msg.into_vec().pop() else { continue };
                if incoming.send(Incoming { generation, event: LinkEvent::Frame(frame) }).is_err() {
                    break;
                }
            }
        });
        Ok(Link { endpoint, generation, send, recv_task, monitor_task })
    }

    /// Sends one frame; a send that cannot complete within `timeout` (no
    /// peer to hand it to) is an error like any other.
    pub async fn send(&mut self, frame: Vec<u8>, timeout: Duration) -> Result<(), LinkError> {
        match tokio::time::timeout(timeout, self.send.send(ZmqMessage::from(frame))).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(LinkError::Send(self.endpoint.clone(), e.to_string())),
            Err(_) => Err(LinkError::Send(self.endpoint.clone(), format!("no peer within {timeout:?}"))),
        }
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        self.recv_task.abort();
        self.monitor_task.abort();
    }
}
