//! CurveZMQ through the real libzmq: an authorized key gets through with
//! its identity, an unknown key and a client without keys do not, an
//! oversized message costs its sender the connection and nothing else, and
//! a refused key is always reported to the client.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use fog_transport::{AccessList, Event, Keypair, Limits, Socket, ZapHandler, bind, connect, connect_monitored, zap};

/// An endpoint on a port of the test kit's, claimed against other test
/// processes and outside the kernel's ephemeral range.
fn free_endpoint() -> String {
    format!("tcp://127.0.0.1:{}", fog_testkit::free_port().unwrap())
}

struct Server {
    _zap: ZapHandler,
    socket: Socket,
    access: fog_transport::SharedAccess,
    endpoint: String,
    keys: Keypair,
}

fn server(ctx: &zmq::Context, clients: &[(&Keypair, &str)]) -> Server {
    let keys = Keypair::generate().unwrap();
    let text: String = clients.iter().map(|(k, rights)| format!("{} client {rights}\n", k.public)).collect();
    let access = Arc::new(RwLock::new(Arc::new(AccessList::parse(&text, "test").unwrap())));
    let zap = ZapHandler::start(ctx, access.clone()).unwrap();
    let endpoint = free_endpoint();
    let limits = Limits { max_message_bytes: 1024, ..Limits::default() };
    let sock = bind(ctx, zmq::ROUTER, &endpoint, Some(&keys), fog_transport::FRONTEND_DOMAIN, &limits).unwrap();
    let socket = Socket::spawn("router", ctx, sock, false).unwrap();
    Server { _zap: zap, socket, access, endpoint, keys }
}

fn next_message(socket: &mut Socket, within: Duration) -> Option<fog_transport::Message> {
    let deadline = std::time::Instant::now() + within;
    while let Some(left) = deadline.checked_duration_since(std::time::Instant::now()) {
        match socket.recv_blocking(left) {
            Some(Event::Message(m)) => return Some(m),
            Some(_) => continue,
            None => return None,
        }
    }
    None
}

#[test]
fn an_authorized_key_talks_and_others_do_not() {
    let ctx = zmq::Context::new();
    let host = Keypair::generate().unwrap();
    let stranger = Keypair::generate().unwrap();
    let mut srv = server(&ctx, &[(&host, "sensors=1-10")]);

    let limits = Limits::default();
    let mut client = connect_monitored("client", &ctx, zmq::DEALER, &srv.endpoint, Some((&host, &srv.keys.public)), &limits).unwrap();
    client.send(vec![b"hello".to_vec()]).unwrap();
    let m = next_message(&mut srv.socket, Duration::from_secs(5)).expect("the authorized client got through");
    assert_eq!(m.frames.last().unwrap(), b"hello");
    assert_eq!(m.user, Some(host.public), "the message names its sender's key");
    // And the reply goes back.
    srv.socket.send(vec![m.frames[0].clone(), b"welcome".to_vec()]).unwrap();
    let r = next_message(&mut client, Duration::from_secs(5)).expect("a reply");
    assert_eq!(r.frames, vec![b"welcome".to_vec()]);

    // An unknown key: the handshake fails and nothing reaches the server.
    let mut stranger_sock = connect_monitored("stranger", &ctx, zmq::DEALER, &srv.endpoint, Some((&stranger, &srv.keys.public)), &limits).unwrap();
    stranger_sock.send(vec![b"let me in".to_vec()]).unwrap();
    let mut refused = false;
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while std::time::Instant::now() < deadline && !refused {
        refused = matches!(stranger_sock.recv_blocking(Duration::from_millis(100)), Some(Event::HandshakeFailed(_)));
    }
    assert!(refused, "the stranger was told its key was refused");
    // No keys at all: a NULL client cannot talk to a CURVE server.
    let n = connect(&ctx, zmq::DEALER, &srv.endpoint, None, &limits).unwrap();
    let anon = Socket::spawn("anon", &ctx, n, false).unwrap();
    anon.send(vec![b"anonymous".to_vec()]).unwrap();
    assert!(next_message(&mut srv.socket, Duration::from_millis(500)).is_none(), "nothing from the stranger or the anonymous client");

    // Rotation: the host's key is removed from the list; new handshakes fail.
    zap::replace(&srv.access, AccessList::parse(&format!("{} other admin\n", stranger.public), "test").unwrap());
    let mut again = connect_monitored("again", &ctx, zmq::DEALER, &srv.endpoint, Some((&host, &srv.keys.public)), &limits).unwrap();
    again.send(vec![b"still me".to_vec()]).unwrap();
    let mut refused = false;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while std::time::Instant::now() < deadline && !refused {
        refused = matches!(again.recv_blocking(Duration::from_millis(100)), Some(Event::HandshakeFailed(_)));
    }
    assert!(refused, "a removed key is refused at its next handshake");
    assert!(next_message(&mut srv.socket, Duration::from_millis(500)).is_none(), "nothing from the removed key");
}

#[test]
fn an_oversized_message_is_refused_before_it_is_read() {
    let ctx = zmq::Context::new();
    let host = Keypair::generate().unwrap();
    let mut srv = server(&ctx, &[(&host, "sensors=*")]);
    let c = connect(&ctx, zmq::DEALER, &srv.endpoint, Some((&host, &srv.keys.public)), &Limits::default()).unwrap();
    let client = Socket::spawn("big", &ctx, c, false).unwrap();
    client.send(vec![vec![7u8; 4096]]).unwrap();
    client.send(vec![b"small".to_vec()]).unwrap();
    // The oversized message ends the connection; nothing of it arrives.
    if let Some(m) = next_message(&mut srv.socket, Duration::from_millis(800)) {
        assert!(m.frames.iter().all(|f| f.len() <= 1024), "a {}-byte frame got through", m.frames.iter().map(Vec::len).max().unwrap_or(0));
    }
    // A well-behaved client still gets through.
    let c2 = connect(&ctx, zmq::DEALER, &srv.endpoint, Some((&host, &srv.keys.public)), &Limits::default()).unwrap();
    let ok = Socket::spawn("ok", &ctx, c2, false).unwrap();
    ok.send(vec![b"fine".to_vec()]).unwrap();
    let m = next_message(&mut srv.socket, Duration::from_secs(5)).expect("the server still serves");
    assert_eq!(m.frames.last().unwrap(), b"fine");
}

#[test]
fn a_refusal_is_reported_however_late_the_owner_looks() {
    // libzmq reports a refused key once and does not try again: a monitor
    // attached after the connection started can miss it for good. The
    // monitor of a connecting socket is attached before it connects.
    let ctx = zmq::Context::new();
    let host = Keypair::generate().unwrap();
    let stranger = Keypair::generate().unwrap();
    let srv = server(&ctx, &[(&host, "sensors=1-10")]);
    let mut sock = connect_monitored("stranger", &ctx, zmq::DEALER, &srv.endpoint, Some((&stranger, &srv.keys.public)), &Limits::default()).unwrap();
    // The handshake is over long before anyone looks.
    std::thread::sleep(Duration::from_millis(1500));
    let mut refused = false;
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while std::time::Instant::now() < deadline && !refused {
        refused = matches!(sock.recv_blocking(Duration::from_millis(100)), Some(Event::HandshakeFailed(_)));
    }
    assert!(refused, "the refusal was reported");
}
