//! The server's average log against the sensor's own average stream (the
//! code the sensor component runs): a sensor follows the log's hash chain,
//! and one served by the losing side of a split ends on the survivor's.

use fog_core::{Average, AverageCursor};
use fog_sensor::averages::AverageStream;
use fog_server::average_log::{AverageLog, Retention};

const T0: u64 = 1_700_000_000_000;

fn retain_100() -> Retention {
    Retention { averages: 100, ..Retention::default() }
}

/// Publishes `n` more averages into `log` in `epoch`, one a second from
/// `from_ms`, pruning after each as the windows do; returns the time after
/// the last.
fn publish(log: &mut AverageLog, epoch: u64, n: u64, speed_kmh: u64, from_ms: u64) -> u64 {
    let mut now = from_ms;
    for _ in 0..n {
        now += 1_000;
        let average = Average { seq: 0, epoch, segment: 0, window_end_ms: now, count: 1, sum_kmh: speed_kmh, revision: 0, chain: 0 };
        log.append(now, average);
        log.prune(now);
    }
    now
}

#[test]
fn the_log_is_a_hash_chain_the_sensors_can_follow() {
    let mut log = AverageLog::new(retain_100());
    publish(&mut log, 1, 10, 100, T0);
    let chain: Vec<AverageCursor> = log.chain().collect();
    assert_eq!(chain[0], AverageCursor::default());
    let mut sensor = AverageStream::new(0);
    let all: Vec<Average> = log.retained().copied().collect();
    let mut from_start = AverageStream::new(0);
    from_start.reposition(None, AverageCursor::default());
    let end = from_start.apply(&all).expect("applies the whole log");
    assert_eq!(end.seq, log.last_seq().unwrap());
    assert_eq!(end.chain, log.last_position().chain);
    sensor.apply(&all[3..]);
    assert_eq!(sensor.digest(), end.chain, "a late joiner ends on the same chain value");
}

#[test]
fn a_sensor_on_the_abandoned_branch_ends_on_the_survivors_stream() {
    // Two logs that share 20 averages of epoch 1, then went on in epochs 3
    // (cut off) and 4 (the survivor).
    let mut loser = AverageLog::new(retain_100());
    let now = publish(&mut loser, 1, 20, 100, T0);
    let mut winner = loser.clone();
    publish(&mut loser, 3, 15, 90, now);
    publish(&mut winner, 4, 30, 110, now);
    let mut on_loser = AverageStream::new(0);
    let mut on_winner = on_loser.clone();
    on_loser.apply(&loser.retained().copied().collect::<Vec<_>>());
    on_winner.apply(&winner.retained().copied().collect::<Vec<_>>());
    // The winner's averages do not continue the loser's chain.
    let stuck = on_loser.cursor();
    assert_eq!(on_loser.apply(&winner.retained().copied().collect::<Vec<_>>()), stuck);
    let (avg, repos) = winner.reply_for(&[(1, stuck)]);
    let r = repos[0];
    on_loser.reposition(r.rewind_to, r.to);
    on_loser.apply(&avg);
    assert_eq!(on_loser.cursor(), on_winner.cursor());
    assert_eq!(on_loser.superseded(), 15);
    assert_eq!(on_loser.missed(), 0);
}
