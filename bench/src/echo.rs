//! The transport ceiling: a bare zmq.rs ROUTER that answers every request
//! with its first 16 bytes and does nothing else. Run in a process of its
//! own (`fog-bench echo-server`), as a server would be.

use anyhow::Context;
use zeromq::{RouterSocket, Socket, SocketRecv, SocketSend, ZmqMessage};

pub async fn serve(endpoint: &str) -> anyhow::Result<()> {
    let mut router = RouterSocket::new();
    router.bind(endpoint).await.with_context(|| format!("cannot bind {endpoint}"))?;
    loop {
        let msg = router.recv().await.context("recv")?;
        let mut frames = msg.into_vec();
        if frames.len() != 2 {
            continue;
        }
        let payload = frames.pop().unwrap_or_default();
        let identity = frames.pop().unwrap_or_default();
        let head = payload.slice(..payload.len().min(16));
        let reply = ZmqMessage::try_from(vec![identity, head]).map_err(|e| anyhow::anyhow!("{e:?}"))?;
        router.send(reply).await.context("send")?;
    }
}
