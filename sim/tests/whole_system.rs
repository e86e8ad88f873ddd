//! The whole system on simulated time (see the `fog_sim` crate docs): a
//! sweep of seeded runs, one seed with a trace, and a planted host bug the
//! sweep must catch.
//!
//! - `FOG_SIM_SEED=n`: the seed `one_seed` runs, with a trace of every
//!   state change and fault (`cargo test --release -p fog-sim --test
//!   whole_system one_seed -- --nocapture` replays a failure). Unset, it
//!   runs seed 0, so the test always checks a run; a value that is not a
//!   number fails the test rather than being ignored.
//! - `FOG_SIM_SEEDS=n`: how many seeds the sweep runs (2 000 unset). Below
//!   500 the sweep skips its checks that rare paths were exercised.

use fog_sim::world::Fault;
use fog_sim::{RunFacts, run_seed};

/// A number from environment variable `name`; `None` when it is unset. A
/// value that is set but not a number fails: a typo must not quietly run
/// something else than what was asked for.
fn env_u64(name: &str) -> Option<u64> {
    let value = std::env::var(name).ok()?;
    match value.trim().parse() {
        Ok(n) => Some(n),
        Err(e) => panic!("{name}={value:?} is not a number: {e}"),
    }
}

/// Runs seeds `0..seeds` with `setup`; the failures, and the facts of the
/// runs that passed.
fn sweep(seeds: u64, setup: impl Fn(&mut fog_sim::World) + Sync) -> (Vec<(u64, String)>, Vec<RunFacts>) {
    std::panic::set_hook(Box::new(|_| {}));
    // Two threads share the seeds: each run is independent.
    let results: Vec<(u64, Result<RunFacts, String>)> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..2u64)
            .map(|w| {
                let setup = &setup;
                scope.spawn(move || (0..seeds).filter(|s| s % 2 == w).map(|seed| (seed, run_seed(seed, setup))).collect::<Vec<_>>())
            })
            .collect();
        // A worker that panicked outside a run (setting a world up) fails
        // the sweep rather than leaving its seeds out.
        workers.into_iter().flat_map(|h| h.join().unwrap_or_else(|_| vec![(u64::MAX, Err("a sweep worker panicked outside a run".to_string()))])).collect()
    });
    let _ = std::panic::take_hook();
    let mut failed = Vec::new();
    let mut passed = Vec::new();
    for (seed, result) in results {
        match result {
            Ok(facts) => passed.push(facts),
            Err(why) => failed.push((seed, why)),
        }
    }
    failed.sort_by_key(|(seed, _)| *seed);
    (failed, passed)
}

#[test]
fn thousands_of_seeded_runs_lose_nothing_and_count_nothing_twice() {
    let seeds = env_u64("FOG_SIM_SEEDS").unwrap_or(2_000);
    let (failed, passed) = sweep(seeds, |_| {});
    let count = |f: &dyn Fn(&RunFacts) -> bool| passed.iter().filter(|r| f(r)).count() as u64;
    let forked = count(&|r| r.superseded > 0);
    let stepped = count(&|r| r.clock_steps > 0);
    let failed_over = count(&|r| r.failovers > 0);
    let restarted = count(&|r| r.sensor_restarts > 0);
    let pipelined = count(&|r| r.most_in_flight > 1);
    let rogue_all_kinds = count(&|r| r.rogue.forged_epochs > 0 && r.rogue.poison_readings > 0 && r.rogue.big_batches > 0);
    let rogue_refused = count(&|r| r.rogue.refused > 0);
    println!("{forked} of {seeds} seeds had sensors served by both sides of a split (averages superseded)");
    println!("{stepped} of {seeds} seeds stepped a wall clock; in {failed_over} the host failed over; in {restarted} sensors trapped and were restarted");
    println!("in {pipelined} of {seeds} seeds the host had more than one batch in flight");
    println!("{rogue_all_kinds} of {seeds} seeds had the rogue forge epochs, poison readings and send its big batch; in {rogue_refused} its readings were refused");
    if let Some((seed, why)) = failed.first() {
        panic!(
            "{} of {seeds} seeds failed; first: seed {seed} (replay: FOG_SIM_SEED={seed} cargo test --release -p fog-sim --test whole_system one_seed -- --nocapture)\n{why}\nall failing seeds: {:?}",
            failed.len(),
            failed.iter().map(|(s, _)| *s).collect::<Vec<_>>()
        );
    }
    if seeds >= 500 {
        assert!(forked > 0, "no seed served sensors from both sides of a split: the rewind path went untested");
        assert!(stepped * 10 >= seeds * 3, "only {stepped} of {seeds} seeds stepped a clock");
        assert!(failed_over * 10 >= seeds * 5, "the host failed over in only {failed_over} of {seeds} seeds");
        assert!(restarted * 100 >= seeds * 15, "sensors were restarted in only {restarted} of {seeds} seeds");
        assert!(pipelined * 10 >= seeds * 8, "the host had more than one batch in flight in only {pipelined} of {seeds} seeds");
        assert!(rogue_all_kinds * 10 >= seeds * 8, "the rogue fired every attack in only {rogue_all_kinds} of {seeds} seeds");
        assert!(rogue_refused * 10 >= seeds * 8, "the rogue had readings refused in only {rogue_refused} of {seeds} seeds");
    }
}

/// A host core that forgets to resend its batch in flight after a
/// failover stalls; the sweep must see it, in most seeds that fail over.
#[test]
fn a_host_that_forgets_to_resend_is_caught() {
    let (failed, _) = sweep(200, |w| w.host.core.plant_forgotten_resend());
    let first = failed.first().map(|(seed, why)| format!("seed {seed}: {}", why.lines().next().unwrap_or_default()));
    println!("{} of 200 seeds caught the planted bug; first: {first:?}", failed.len());
    assert!(failed.len() >= 100, "only {} of 200 seeds caught a host that never resends after a failover", failed.len());
    // A stall shows as readings left unacked, or (a host with nothing to
    // send) as sensors that stop hearing averages.
    let stall = |why: &str| ["unacked", "never acked", "did not end at the active node's newest average"].iter().any(|s| why.contains(s));
    let other = failed.iter().find(|(_, why)| !stall(why));
    assert!(other.is_none(), "the planted bug was caught for another reason than a stall: {other:?}");
}

/// Steps of the wall clocks (NTP), forward and back, on both servers and
/// on the host, are not pauses: nothing fails over, the first epoch serves
/// to the end, and every reading is counted once.
#[test]
fn wall_clock_steps_fail_nothing_over() {
    for seed in 0..20 {
        let steps = vec![
            (1_000, Fault::StepServerClock(0, 15_000)),
            (2_000, Fault::StepServerClock(1, -15_000)),
            (3_000, Fault::StepHostClock(10_000)),
            (4_000, Fault::StepServerClock(0, -20_000)),
            (5_000, Fault::StepHostClock(-20_000)),
            (6_000, Fault::StepServerClock(1, 18_000)),
            (7_000, Fault::StepServerClock(0, 5_000)),
        ];
        let facts = run_seed(seed, |w| {
            w.perfect_network();
            w.planned = Some(steps);
        });
        let facts = facts.unwrap_or_else(|why| panic!("seed {seed}: {why}"));
        assert_eq!(facts.clock_steps, 7);
        assert_eq!(facts.failovers, 0, "seed {seed}: the host failed over on a clock step");
        assert_eq!(facts.epoch, 1, "seed {seed}: the pair changed leaders on a clock step");
    }
}

/// One seed with a trace: `FOG_SIM_SEED`, or seed 0 when unset.
#[test]
fn one_seed() {
    let seed = env_u64("FOG_SIM_SEED").unwrap_or(0);
    println!("seed {seed}");
    let _ = tracing_subscriber::fmt().with_env_filter("info").without_time().with_test_writer().try_init();
    match run_seed(seed, |w| w.trace = true) {
        Ok(facts) => println!("{facts:?}"),
        Err(why) => panic!("seed {seed} failed: {why}"),
    }
}
