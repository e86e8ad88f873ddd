//! A reposition answers the cursor its batch carried. With several batches
//! in flight, two of them can carry the same cursor and both replies move
//! the sensor; the second must find it moved already and leave it, or the
//! averages it skips are counted twice. Real `Fleet` over the real sensor
//! code (native), fed replies as a server would write them.

use std::time::{Duration, Instant};

use fog_protocol::{Average, AverageCursor, BatchReply, Reposition};
use fog_sim::host::SimHost;
use fog_sim::native::Traps;

const WALL0: u64 = 1_700_000_000_000;

/// Averages 1..=n of segment 0, chained from 0 as a server chains them.
fn chained(n: u64, epoch: u64) -> Vec<Average> {
    let mut prev = 0;
    (1..=n)
        .map(|seq| {
            let mut a = Average { seq, epoch, segment: 0, window_end_ms: WALL0 + seq * 1_000, count: 10, sum_kmh: 900, revision: 0, chain: 0 };
            a.chain = a.link(prev);
            prev = a.chain;
            a
        })
        .collect()
}

fn reply(batch_id: u64, averages: Vec<Average>, repositions: Vec<Reposition>) -> BatchReply {
    BatchReply { batch_id, epoch: 1, averages, repositions, ..BatchReply::default() }
}

#[test]
fn a_stale_cursor_answered_twice_moves_the_sensor_once() {
    let mut host = SimHost::new(7, 0, WALL0, 0, Traps::new(7, 0.0));
    let fleet = &mut host.fleet;
    let t0 = Instant::now();
    let at = |ms: u64| t0 + Duration::from_millis(ms);

    // Every sensor takes the newest of five averages (it has none yet).
    let log = chained(5, 1);
    let (first, _) = fleet.take_batch(at(0), 1);
    assert!(first.iter().all(|s| s.average_cursor.is_none()));
    fleet.apply(at(10), &reply(1, log.clone(), Vec::new()));
    fleet.tick_all(at(20), 0);
    let five = AverageCursor { seq: 5, epoch: 1, chain: log[4].chain };

    // Two batches in flight, both carrying sensor 0 at 5: the once-a-second
    // pass, then a batch with no news, where one sensor still asks.
    let (second, _) = fleet.take_batch(at(1_100), 2);
    let (third, _) = fleet.take_batch(at(1_200), 3);
    for batch in [&second, &third] {
        let s0 = batch.iter().find(|s| s.sensor_id == 0).expect("sensor 0 in both batches");
        assert_eq!(s0.average_cursor, Some(five));
    }

    // The server holds another branch from 4 on: both replies move sensor 0
    // back to 3 (2 averages superseded) and on to 4 of its branch.
    let to = AverageCursor { seq: 4, epoch: 2, chain: 0x4444 };
    let moved = Reposition { sensor_id: 0, rewind_to: Some(3), to };
    fleet.apply(at(1_300), &reply(2, Vec::new(), vec![moved]));
    fleet.apply(at(1_310), &reply(3, Vec::new(), vec![moved]));
    // A reply to a batch the fleet never took moves nobody.
    fleet.apply(at(1_320), &reply(99, Vec::new(), vec![Reposition { sensor_id: 1, rewind_to: Some(1), to }]));

    fleet.refresh_status(at(1_400));
    let summaries = fleet.summaries();
    assert_eq!(summaries[0].averages_superseded, 2, "counted once: {:?}", summaries[0]);
    assert_eq!(summaries[0].last_average_seq, Some(4));
    assert_eq!(summaries[1].averages_superseded, 0);
    assert_eq!(summaries[1].last_average_seq, Some(5));
}
