//! One simulation of the whole system, in one process on simulated time:
//! the real server [`Node`](fog_server::Node)s of a Binary Star pair, the
//! real host ([`fog_host::core::HostCore`] deciding what goes where and
//! when, [`fog_host::fleet::Fleet`] choosing the sensors of a batch, merging
//! acks and routing replies) and the real sensor code ([`fog_sensor`]'s
//! core, compiled in instead of run as a wasm component), with a rogue
//! client among them.
//!
//! A seed decides everything: message loss, delay and duplication on every
//! link, crashes and restarts of either or both servers (what was not yet
//! durable is lost; the node recovers from its simulated disk), the loss of
//! the active's disk while its passive is in sync, partitions of the link
//! between the servers, pauses (a node frozen while the world goes on),
//! the host moving to the other server while the servers are cut off from
//! each other, steps of the wall clock (forward and back, on either
//! server or on the host) while the monotonic clocks run on, and sensor
//! calls that trap (the fleet restarts the sensor from its last snapshot
//! and the readings that left since).
//!
//! After every step the invariants are checked ([`checks`]): no node
//! believes in an epoch no node served, no two nodes ack in one epoch, no
//! node counts more readings of a sensor than it made, no sensor misses an
//! average, and once the world has been calm for a while every sensor sees
//! its readings acked. At the end of a run (whose last part is quiet):
//! every reading acked, and counted exactly once by both nodes, and every
//! sensor at the active node's newest average on the same hash chain.
//!
//! - [`servers`]: the server machines, their disks and the state channel;
//! - [`host`]: the host as `fog-host` drives it, over [`native`] sensors;
//! - [`rogue`]: the hostile client;
//! - [`world`]: the network, the faults and the clock;
//! - [`checks`]: the invariants.

pub mod checks;
pub mod host;
pub mod native;
pub mod rogue;
pub mod servers;
pub mod world;

pub use world::World;

/// What a passing run saw, for the sweep's coverage checks.
#[derive(Debug, Default, Clone, Copy)]
pub struct RunFacts {
    /// Averages sensors applied from abandoned branches (and replaced).
    pub superseded: u64,
    pub rogue: rogue::Rogue,
    /// Wall-clock steps, on a server or on the host.
    pub clock_steps: u64,
    /// Times the host failed over.
    pub failovers: u64,
    /// The epoch of the active node at the end.
    pub epoch: u64,
    /// Sensor restarts after planted traps.
    pub sensor_restarts: u64,
    /// The most batches the host had in flight at once.
    pub most_in_flight: usize,
}

/// Runs one seed; on failure, what broke and the faults of the run.
/// `setup` may change the world before it runs (plant a bug, trace).
pub fn run_seed(seed: u64, setup: impl FnOnce(&mut World)) -> Result<RunFacts, String> {
    let mut world = World::new(seed);
    setup(&mut world);
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        world.run();
        world.check_end();
    }));
    match outcome {
        Ok(()) => Ok(RunFacts {
            superseded: world.host.fleet.summaries().iter().map(|s| s.averages_superseded).sum(),
            rogue: world.rogue,
            clock_steps: world.clock_steps,
            failovers: world.host.core.failovers(),
            epoch: world.active().map_or(0, fog_server::Node::epoch),
            sensor_restarts: world.host.fleet.restarts,
            most_in_flight: world.host.core.most_in_flight(),
        }),
        Err(e) => {
            let why = e.downcast_ref::<String>().cloned().or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string())).unwrap_or_default();
            Err(format!("{why}\nfaults:\n{}", world.log.join("\n")))
        }
    }
}
