//! `fog-fuzz`: a fuzz harness for fog-server that runs on the stable
//! toolchain (no libFuzzer): seeded generators of hostile frames ([`inputs`]),
//! the real sans-IO `Node`s they attack with a legit sensor stream beside
//! them ([`cluster`]), and runs with their invariant checks ([`campaign`]).
//!
//! The invariant that matters: hostile input must not poison legit
//! sensors. Every legit reading is acked and counted exactly once at the
//! end of a run, whatever came in between. Along the way: no panic, at most
//! one reply per request and of bounded size, no node's epoch going down,
//! no active stepping down because a client said so, no input slower than
//! a bound. A finding names its seed and case; the seed replays it.

pub mod campaign;
pub mod cluster;
pub mod inputs;

pub use inputs::Swarm;
pub use campaign::{Campaign, Finding, Options, RunReport, run_seed, run_seed_watched};
