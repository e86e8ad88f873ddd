//! The transport ceiling: a bare ROUTER that answers every request with its
//! first 16 bytes and does nothing else. It runs in a process of its own
//! (`fog-bench echo-server`), as a server would, and sets its socket up the
//! way a server's frontend is set up: `fog_transport` (libzmq, one socket
//! thread), with the same limits, and with `--key` and `--authorized-keys`
//! CurveZMQ and the same ZAP check of each client's key.

use std::path::Path;
use std::sync::{Arc, RwLock};

use anyhow::Context;
use fog_transport::{AccessList, Event, Keypair, Limits, Message, Socket, ZapHandler};

/// With `curve` (a secret key file and an authorized-keys file), the
/// echo is a CurveZMQ server that lets in the keys listed there.
pub async fn serve(endpoint: &str, curve: Option<(&Path, &Path)>) -> anyhow::Result<()> {
    let ctx = fog_transport::Context::new();
    let (keys, _zap) = match curve {
        Some((key, authorized)) => {
            let keys = Keypair::read(key).context("--key")?;
            let list = AccessList::read(authorized).context("--authorized-keys")?;
            let zap = ZapHandler::start(&ctx, Arc::new(RwLock::new(Arc::new(list)))).context("cannot start the ZAP handler")?;
            (Some(keys), Some(zap))
        }
        None => (None, None),
    };
    let router = fog_transport::bind(
        &ctx,
        fog_transport::SocketType::ROUTER,
        endpoint,
        keys.as_ref(),
        fog_transport::FRONTEND_DOMAIN,
        &Limits::default(),
    )?;
    let mut socket = Socket::spawn("echo", &ctx, router, false).context("cannot start the socket thread")?;
    while let Some(event) = socket.recv().await {
        let Event::Message(Message { mut frames, .. }) = event else { continue };
        if frames.len() != 2 {
            continue;
        }
        let mut head = frames.pop().unwrap_or_default();
        head.truncate(16);
        frames.push(head);
        // A reply that finds the queue full is counted by the socket; the
        // load generator then has one batch less in flight.
        let _ = socket.send(frames);
    }
    Ok(())
}
