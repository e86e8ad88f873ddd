//! Loopback ports for servers the kit starts.

use std::net::{Ipv4Addr, TcpListener, UdpSocket};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::bail;

/// A port on 127.0.0.1 that no other user of this kit will be handed
/// while this process runs, and that nothing else held a moment ago.
///
/// The servers bind their ports themselves, so the kit cannot hold a port
/// for them; asking the kernel for port 0 and letting it go races with
/// every process on the machine, and worst with the kernel itself, which
/// hands out the same ephemeral range as the local ports of outgoing
/// connections (each `fog-server status` and each host makes some). So
/// ports come from below the ephemeral range, each handed out once per
/// process, and each claimed across processes: a UDP socket bound to the
/// same number is held until the process exits. TCP and UDP ports are
/// separate, so the claim does not stop the server binding its TCP port,
/// but every other process using the kit (of this or another checkout)
/// sees the claim and moves on. A TCP bind test skips ports that something
/// else holds. What remains is a program outside the kit binding a fixed
/// port in this range between the caller and the server.
///
/// Retrying a server start on another port when it fails to bind is not
/// done: a pair's ports are known to its peer and to the host, and a node
/// restarted in a test must come back on the same ones.
pub fn free_port() -> anyhow::Result<u16> {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    static CLAIMS: Mutex<Vec<UdpSocket>> = Mutex::new(Vec::new());
    let pool = claimable_ports();
    let span = u32::from(pool.end - pool.start);
    // Processes start at different places, so that they rarely meet.
    let start = std::process::id().wrapping_mul(7_919) % span;
    for _ in 0..span {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = pool.start + ((start + n) % span) as u16;
        let Ok(claim) = UdpSocket::bind((Ipv4Addr::LOCALHOST, port)) else { continue };
        if TcpListener::bind((Ipv4Addr::LOCALHOST, port)).is_ok() {
            CLAIMS.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).push(claim);
            return Ok(port);
        }
    }
    bail!("no free port left in {pool:?}: every one is handed out or in use")
}

/// Ports [`free_port`] hands out: from 10 000 up to where the kernel's
/// ephemeral range (`/proc/sys/net/ipv4/ip_local_port_range`) begins.
fn claimable_ports() -> std::ops::Range<u16> {
    let ephemeral_start = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32_768);
    // A machine whose ephemeral range starts very low still gets a pool;
    // there the claims and the bind test are all that keep ports apart.
    10_000..ephemeral_start.max(12_000)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_handed_out_once_and_claimed_against_other_processes() {
        let ports: Vec<u16> = (0..50).map(|_| free_port().unwrap()).collect();
        let mut unique = ports.clone();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(unique.len(), ports.len(), "a port was handed out twice: {ports:?}");
        let pool = claimable_ports();
        assert!(ports.iter().all(|p| pool.contains(p)), "{ports:?} not all in {pool:?}");
        // Another process sees the claim: its UDP bind of the number fails.
        assert!(UdpSocket::bind((Ipv4Addr::LOCALHOST, ports[0])).is_err(), "port {} is not claimed", ports[0]);
        // The server can still bind its TCP port.
        assert!(TcpListener::bind((Ipv4Addr::LOCALHOST, ports[0])).is_ok());
    }
}
