//! A client of one server frontend that speaks the frontend protocol over
//! libzmq (`fog_transport`), with a key (CurveZMQ) or without (NULL), and
//! reads its replies: for tests that send a server what a host would not
//! (malformed frames, forged epochs, poison readings; see [`rogue`](crate::rogue)),
//! and for `fog-verify`'s `rogue` fault.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use fog_protocol::{Reply, Request, decode, encode};
use fog_transport::{Context as ZmqContext, Event, Keypair, Limits, PublicKey, Socket, SocketType};

/// A DEALER connected to one frontend, as a host has.
pub struct Client {
    socket: Socket,
    _ctx: ZmqContext,
}

impl Client {
    /// Connects to `endpoint`; with `curve`, as the holder of that keypair
    /// trusting that server key.
    pub fn connect(endpoint: &str, curve: Option<(&Keypair, &PublicKey)>) -> anyhow::Result<Client> {
        let ctx = ZmqContext::new();
        let socket = fog_transport::connect_monitored("test-client", &ctx, SocketType::DEALER, endpoint, curve, &Limits::default())
            .with_context(|| format!("cannot connect to {endpoint}"))?;
        Ok(Client { socket, _ctx: ctx })
    }

    /// Queues `request` (never blocks; libzmq sends it once connected).
    pub fn send(&self, request: &Request) -> anyhow::Result<()> {
        self.send_frames(vec![encode(request)?])
    }

    /// Queues a message of these frames as they are, valid or not.
    pub fn send_frames(&self, frames: Vec<Vec<u8>>) -> anyhow::Result<()> {
        self.socket.send(frames)?;
        Ok(())
    }

    /// The next reply within `timeout`, or `None`; a failed handshake, a
    /// reply of more than one frame and one that does not decode are
    /// errors naming what came.
    pub fn reply(&mut self, timeout: Duration) -> anyhow::Result<Option<Reply>> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.socket.recv_blocking(left) {
                Some(Event::Message(m)) => {
                    let [frame] = &m.frames[..] else {
                        bail!("a reply of {} frames; a reply is one payload frame", m.frames.len());
                    };
                    return Ok(Some(decode(frame).context("a reply that does not decode")?));
                }
                Some(Event::HandshakeFailed(why)) => bail!("handshake failed: {why}"),
                Some(_) => continue,
                None => return Ok(None),
            }
        }
    }

    /// Sends `request` and returns the next reply, waiting at most `timeout`.
    pub fn ask(&mut self, request: &Request, timeout: Duration) -> anyhow::Result<Reply> {
        self.send(request)?;
        self.reply(timeout)?.with_context(|| format!("no reply within {timeout:?}"))
    }

    /// Everything the socket reports within `window`: what a client the
    /// server does not let in sees.
    pub fn events(&mut self, window: Duration) -> Vec<String> {
        let deadline = Instant::now() + window;
        let mut seen = Vec::new();
        while let Some(event) = self.socket.recv_blocking(deadline.saturating_duration_since(Instant::now())) {
            seen.push(match event {
                Event::Message(m) => format!("a message of {} frames", m.frames.len()),
                other => format!("{other:?}"),
            });
        }
        seen
    }
}
