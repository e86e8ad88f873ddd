//! The host core on simulated time, without tokio, a socket or sensors: a
//! [`Sim`] plays the driver and a fleet that holds a count of pending
//! readings, and records what the core asked of the link.

use std::io::Write;
use std::sync::{Arc, Mutex};

use fog_protocol::{NodeState, Refusal};

use super::*;

const INTERVAL: Duration = Duration::from_millis(100);
const TIMEOUT: Duration = Duration::from_millis(200);

fn config(sensors: usize) -> CoreConfig {
    CoreConfig {
        servers: vec!["tcp://primary".into(), "tcp://backup".into()],
        sensors,
        interval: INTERVAL,
        readings_per_visit: 1,
        timeout: TIMEOUT,
        duration: None,
        drain_timeout: Duration::from_secs(2),
        progress: None,
        epoch: None,
        pipeline_readings: PIPELINE_READINGS,
    }
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// A batch as the core encoded it.
fn request(frame: &[u8]) -> (u64, u64, Seal) {
    match fog_protocol::decode_request(frame).expect("the core sends valid frames") {
        Request::Batch { batch_id, epoch, seal, .. } => (batch_id, epoch, seal),
        other => panic!("not a batch: {other:?}"),
    }
}

fn ack(batch_id: u64, epoch: u64, seal: Seal) -> Reply {
    Reply::Batch(BatchReply { batch_id, epoch, seal, ..BatchReply::default() })
}

/// The driver and the fleet, simulated: ticks, batches and applied replies
/// are reported back at once; everything else the core asks is recorded.
struct Sim {
    core: HostCore,
    t0: Instant,
    now: Instant,
    /// Readings waiting in the sensors; each tick adds `produce_per_tick`.
    pending: usize,
    produce_per_tick: usize,
    /// What `refresh_status` answers.
    all_acked: bool,
    /// Every connected server answers every batch at once.
    auto_ack: bool,
    /// How long the ticks take, in turn: the clock moves on by this much.
    tick_takes: Vec<Duration>,
    ticks: usize,
    log: Vec<(Instant, Action)>,
}

impl Sim {
    fn new(cfg: CoreConfig) -> Sim {
        let t0 = Instant::now();
        let mut sim = Sim {
            core: HostCore::new(cfg, t0),
            t0,
            now: t0,
            pending: 0,
            produce_per_tick: 0,
            all_acked: false,
            auto_ack: false,
            tick_takes: Vec::new(),
            ticks: 0,
            log: Vec::new(),
        };
        sim.step();
        sim
    }

    /// Carries out the core's actions as a driver would.
    fn step(&mut self) {
        while let Some(action) = self.core.poll_action() {
            match &action {
                Action::Tick { make, refresh, .. } => {
                    if *make > 0 {
                        self.pending += self.produce_per_tick;
                    }
                    let all_acked = refresh.then_some(self.all_acked);
                    if !self.tick_takes.is_empty() {
                        self.now += self.tick_takes[self.ticks % self.tick_takes.len()];
                    }
                    self.ticks += 1;
                    self.core.handle_ticked(self.now, self.pending, all_acked);
                }
                Action::TakeBatch { batch_id } => {
                    self.pending -= self.pending.min(MAX_READINGS_PER_BATCH);
                    self.core.handle_batch(self.now, *batch_id, Vec::new());
                }
                Action::ApplyReply(_) => self.core.handle_applied(self.now, self.pending),
                Action::Send { frame } if self.auto_ack => {
                    let (batch_id, epoch, seal) = request(frame);
                    self.core.handle_reply(self.now, ack(batch_id, epoch, seal));
                }
                _ => {}
            }
            self.log.push((self.now, action));
        }
    }

    /// Moves simulated time to `t0 + at`, waking the core whenever it asked.
    fn run_until(&mut self, at: Duration) {
        let target = self.t0 + at;
        while let Some(wake) = self.core.poll_timeout().filter(|&w| w <= target) {
            self.now = self.now.max(wake);
            self.core.handle_timeout(self.now);
            self.step();
        }
        // A tick that took time may have carried the clock past `target`.
        self.now = self.now.max(target);
    }

    fn connected(&mut self) {
        self.core.handle_connected(self.now, self.pending);
        self.step();
    }

    fn reply(&mut self, reply: Reply) {
        self.core.handle_reply(self.now, reply);
        self.step();
    }

    /// What was asked since the last call, ticks and their follow-ups left out.
    fn asked(&mut self) -> Vec<Action> {
        let log = std::mem::take(&mut self.log);
        log.into_iter()
            .map(|(_, a)| a)
            .filter(|a| !matches!(a, Action::Tick { .. } | Action::TakeBatch { .. } | Action::ApplyReply(_)))
            .collect()
    }

    fn sent(&mut self) -> Vec<Vec<u8>> {
        self.asked()
            .into_iter()
            .filter_map(|a| match a {
                Action::Send { frame } => Some(frame),
                _ => None,
            })
            .collect()
    }
}

/// Connected to the primary with one batch (id 1) in flight, sent at t0.
fn batch_in_flight() -> (Sim, Vec<u8>) {
    let mut sim = Sim::new(config(1));
    assert_eq!(sim.asked(), vec![Action::Connect { server: 0, after: Duration::ZERO }]);
    sim.pending = 5;
    sim.connected();
    let sent = sim.sent();
    assert_eq!(sent.len(), 1);
    assert_eq!(request(&sent[0]).0, 1);
    (sim, sent[0].clone())
}

#[test]
fn silence_sends_the_batch_again_to_the_other_server_after_the_timeout() {
    let (mut sim, frame) = batch_in_flight();
    sim.run_until(TIMEOUT - ms(1));
    let later = sim.sent();
    assert!(later.iter().all(|f| request(f).0 != 1), "nothing sent again before the timeout");
    sim.run_until(TIMEOUT);
    assert_eq!(sim.asked(), vec![Action::Connect { server: 1, after: Duration::ZERO }]);
    assert_eq!(sim.core.server(), "tcp://backup");
    sim.connected();
    assert_eq!(sim.sent(), [vec![frame], later].concat(), "every batch in flight, unchanged, oldest first");
    assert_eq!(sim.core.failovers(), 1);
}

#[test]
fn not_active_moves_to_the_other_server_after_a_pause() {
    let (mut sim, frame) = batch_in_flight();
    sim.reply(Reply::NotActive { state: NodeState::Passive, epoch: 0, seal: [0; 16] });
    assert_eq!(sim.asked(), vec![Action::Connect { server: 1, after: NOT_ACTIVE_RETRY }]);
    sim.connected();
    assert_eq!(sim.sent(), vec![frame]);
}

#[test]
fn not_active_right_after_losing_the_other_server_asks_again_there() {
    let (mut sim, frame) = batch_in_flight();
    sim.run_until(TIMEOUT - ms(1));
    let later = sim.sent();
    sim.run_until(TIMEOUT);
    assert_eq!(sim.asked(), vec![Action::Connect { server: 1, after: Duration::ZERO }]);
    sim.connected();
    let in_flight = [vec![frame], later].concat();
    assert_eq!(sim.sent(), in_flight);
    // The backup has not yet noticed that the primary is gone; it answers
    // every batch so.
    for _ in &in_flight {
        sim.reply(Reply::NotActive { state: NodeState::Backup, epoch: 0, seal: [0; 16] });
    }
    assert_eq!(sim.asked(), vec![], "no failover back to the server just lost");
    sim.run_until(TIMEOUT + NOT_ACTIVE_RETRY - ms(1));
    assert_eq!(sim.asked(), vec![]);
    sim.run_until(TIMEOUT + NOT_ACTIVE_RETRY);
    assert_eq!(sim.sent(), in_flight, "asked again after the retry pause");
    assert_eq!(sim.core.server(), "tcp://backup");
}

#[test]
fn a_closed_connection_fails_over_at_once() {
    let (mut sim, frame) = batch_in_flight();
    sim.run_until(ms(10));
    sim.asked();
    sim.core.handle_closed(sim.now);
    sim.step();
    assert_eq!(sim.asked(), vec![Action::Connect { server: 1, after: Duration::ZERO }]);
    // A close reported while connecting (the old link) changes nothing.
    sim.core.handle_closed(sim.now);
    sim.step();
    assert_eq!(sim.asked(), vec![]);
    sim.connected();
    assert_eq!(sim.sent(), vec![frame]);
}

/// Collects what the core logs while `f` runs.
fn logged(f: impl FnOnce()) -> String {
    #[derive(Clone)]
    struct Capture(Arc<Mutex<Vec<u8>>>);
    impl Write for Capture {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().expect("not poisoned").extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let capture = Capture(Arc::new(Mutex::new(Vec::new())));
    let writer = capture.clone();
    let subscriber = tracing_subscriber::fmt().with_writer(move || writer.clone()).with_ansi(false).finish();
    tracing::subscriber::with_default(subscriber, f);
    let bytes = capture.0.lock().expect("not poisoned").clone();
    String::from_utf8(bytes).expect("log lines are text")
}

#[test]
fn a_refused_handshake_waits_before_asking_again_and_is_logged_once_per_server() {
    let mut sim = Sim::new(config(1));
    sim.asked();
    let log = logged(|| {
        for _ in 0..3 {
            sim.core.handle_refused(sim.now, "the key is not authorized");
            sim.step();
        }
    });
    assert_eq!(
        sim.asked(),
        vec![
            Action::Connect { server: 1, after: REFUSED_RETRY },
            Action::Connect { server: 0, after: REFUSED_RETRY },
            Action::Connect { server: 1, after: REFUSED_RETRY },
        ]
    );
    assert_eq!(log.matches("refused the connection").count(), 2, "once per server:\n{log}");
    assert!(log.contains("tcp://primary") && log.contains("tcp://backup"), "{log}");
}

#[test]
fn a_late_reply_to_an_old_batch_is_ignored() {
    let (mut sim, _) = batch_in_flight();
    sim.reply(ack(1, 0, [0; 16]));
    assert_eq!(sim.core.batches_acked(), 1);
    // Batch 2 goes at the next interval.
    sim.pending = 1;
    sim.run_until(INTERVAL);
    let sent = sim.sent();
    assert_eq!(sent.len(), 1);
    assert_eq!(request(&sent[0]).0, 2);
    // Batch 1 again (an answer to a copy sent to the other server).
    sim.core.handle_reply(sim.now, ack(1, 0, [0; 16]));
    assert_eq!(sim.core.poll_action(), None, "nothing applied");
    assert_eq!(sim.core.batches_acked(), 1);
    // Batch 2 is still in flight: its own reply counts.
    sim.reply(ack(2, 0, [0; 16]));
    assert_eq!(sim.core.batches_acked(), 2);
}

#[test]
fn the_highest_sealed_epoch_is_kept_and_sent_with_every_batch() {
    let mut sim = Sim::new(CoreConfig { epoch: Some((3, [3; 16])), ..config(1) });
    sim.pending = 1;
    sim.connected();
    assert_eq!(request(&sim.sent()[0]), (1, 3, [3; 16]), "the epoch saved before a restart");
    sim.reply(ack(1, 5, [5; 16]));
    assert_eq!(sim.asked(), vec![Action::SaveEpoch { epoch: 5, seal: [5; 16] }]);
    sim.pending = 1;
    sim.run_until(INTERVAL);
    let sent = sim.sent();
    assert_eq!(request(&sent[0]), (2, 5, [5; 16]));
    // A lower epoch, from a stale server: neither saved nor sent.
    sim.reply(Reply::NotActive { state: NodeState::Passive, epoch: 4, seal: [4; 16] });
    assert!(!sim.asked().iter().any(|a| matches!(a, Action::SaveEpoch { .. })));
    sim.connected();
    assert_eq!(request(&sim.sent()[0]), (2, 5, [5; 16]));
}

#[test]
fn an_epoch_a_server_serves_below_is_taken_back_for_the_servers_own() {
    // A fake server with a server's key (not the pair's seal key) made the
    // host take epoch 2^62 - 1; the real active, in epoch 5, cannot verify
    // it and serves the batch that claims it.
    let forged = (1u64 << 62) - 1;
    let mut sim = Sim::new(CoreConfig { epoch: Some((forged, [9; 16])), ..config(1) });
    sim.pending = 1;
    sim.connected();
    assert_eq!(request(&sim.sent()[0]), (1, forged, [9; 16]));
    let warned = logged(|| sim.reply(ack(1, 5, [5; 16])));
    assert!(warned.contains("has no valid seal"), "{warned}");
    assert_eq!(sim.asked(), vec![Action::SaveEpoch { epoch: 5, seal: [5; 16] }]);
    assert_eq!((sim.core.epoch(), sim.core.unvouched_epochs()), (5, 1));
    sim.pending = 1;
    sim.run_until(INTERVAL);
    assert_eq!(request(&sim.sent()[0]), (2, 5, [5; 16]), "the next batch carries the server's epoch");
    // A reply in the epoch the batch claimed, or above, takes nothing back.
    sim.reply(ack(2, 5, [5; 16]));
    assert_eq!(sim.core.epoch(), 5);
    assert!(!sim.asked().iter().any(|a| matches!(a, Action::SaveEpoch { .. })));
}

#[test]
fn pacing_sends_at_most_four_batches_per_interval() {
    let mut sim = Sim::new(config(1000));
    sim.produce_per_tick = 100;
    sim.auto_ack = true;
    sim.connected();
    sim.run_until(INTERVAL * 10 - ms(1));
    let sends: Vec<Instant> =
        sim.log.iter().filter(|(_, a)| matches!(a, Action::Send { .. })).map(|&(at, _)| at).collect();
    for k in 0..10u32 {
        let (from, to) = (sim.t0 + INTERVAL * k, sim.t0 + INTERVAL * (k + 1));
        let n = sends.iter().filter(|&&at| at >= from && at < to).count();
        assert!(n <= BATCHES_PER_INTERVAL as usize, "{n} batches in interval {k}");
    }
    assert!(sends.len() >= 30, "only {} batches in 10 intervals", sends.len());
    // And every batch goes to the server it is connected to, one at a time.
    assert_eq!(sim.core.batches_acked(), sends.len() as u64);
}

#[test]
fn an_idle_fleet_still_sends_one_batch_per_interval() {
    let mut sim = Sim::new(config(1000));
    sim.auto_ack = true;
    sim.connected();
    sim.run_until(INTERVAL * 5 - ms(1));
    assert_eq!(sim.sent().len(), 5, "one at each interval's first slice");
}

#[test]
fn several_readings_a_visit_make_the_rounds_that_much_longer() {
    let mut sim = Sim::new(CoreConfig { readings_per_visit: 4, duration: Some(INTERVAL * 8), ..config(10) });
    sim.connected();
    sim.run_until(INTERVAL * 8 - ms(1));
    let ticks: Vec<(Duration, u32, usize)> = sim
        .log
        .iter()
        .filter_map(|(at, a)| match a {
            Action::Tick { slice, make, .. } => Some((*at - sim.t0, *make, *slice)),
            _ => None,
        })
        .collect();
    // Two rounds of ten slices in eight intervals, each visit making four.
    assert_eq!(ticks.len(), 20, "{ticks:?}");
    assert!(ticks.iter().all(|&(_, make, _)| make == 4));
    assert_eq!(ticks[10], (INTERVAL * 4, 4, 0), "the second round starts four intervals on");
    // Draining makes none.
    sim.run_until(INTERVAL * 12);
    assert!(sim.log.iter().any(|(at, a)| *at > sim.t0 + INTERVAL * 8 && matches!(a, Action::Tick { make: 0, .. })));
    assert!(!sim.log.iter().any(|(at, a)| *at >= sim.t0 + INTERVAL * 8 && matches!(a, Action::Tick { make: 1.., .. })));
}

#[test]
fn a_slice_that_runs_long_is_made_up_for_and_a_stall_starts_the_rounds_again() {
    let tick_times = |sim: &Sim| -> Vec<u128> {
        sim.log.iter().filter(|(_, a)| matches!(a, Action::Tick { .. })).map(|(at, _)| (*at - sim.t0).as_millis()).collect()
    };
    // Ten slices of a 100 ms round: one tick in five takes 25 ms, the
    // others 5 ms. The host keeps up on average (45 ms for five slices
    // of 10 ms) and makes up for each long one: a round of visits still
    // every 100 ms, not a round slowed by every tick that ran late.
    let mut sim = Sim::new(config(10));
    sim.connected();
    sim.tick_takes = vec![ms(25), ms(5), ms(5), ms(5), ms(5)];
    sim.run_until(ms(2_000));
    let times = tick_times(&sim);
    let by_2s = times.iter().filter(|&&t| t <= 2_000).count();
    assert!(by_2s >= 199, "{by_2s} ticks in 2 s, not 200: {times:?}");

    // One tick stalls for half a second, five rounds: the slice due comes
    // at once, and the rounds start again from then, without a burst of
    // the slices missed.
    let mut sim = Sim::new(config(10));
    sim.connected();
    sim.run_until(ms(95));
    sim.tick_takes = vec![ms(500)];
    sim.run_until(ms(100));
    sim.tick_takes = Vec::new();
    sim.run_until(ms(700));
    let times = tick_times(&sim);
    let after: Vec<u128> = times.iter().copied().filter(|&t| t > 100).collect();
    assert_eq!(after[..3], [600, 600, 610], "the stalled tick ends at 600 ms, the slice due comes at once, the next a slice later: {times:?}");
    assert!(after[1..].windows(2).all(|w| w[1] - w[0] == 10), "{times:?}");
}

#[test]
fn draining_ends_once_every_reading_is_acked() {
    let mut sim = Sim::new(CoreConfig { duration: Some(INTERVAL * 3), ..config(10) });
    sim.produce_per_tick = 1;
    sim.auto_ack = true;
    sim.connected();
    sim.run_until(INTERVAL * 3 - ms(1));
    assert!(!sim.core.is_finished());
    sim.all_acked = true;
    sim.run_until(INTERVAL * 3);
    assert!(sim.asked().contains(&Action::Finish { drained: true }));
    assert_eq!(sim.core.poll_timeout(), None);
}

#[test]
fn draining_stops_producing_and_ends_at_the_drain_deadline() {
    let drain = Duration::from_secs(2);
    let mut sim = Sim::new(CoreConfig { duration: Some(INTERVAL), drain_timeout: drain, ..config(10) });
    sim.produce_per_tick = 1;
    sim.auto_ack = true;
    sim.connected();
    sim.run_until(INTERVAL + drain - ms(1));
    let log = std::mem::take(&mut sim.log);
    assert!(!log.iter().any(|(_, a)| matches!(a, Action::Finish { .. })), "not before the deadline");
    let producing_after = log.iter().any(|(at, a)| *at >= sim.t0 + INTERVAL && matches!(a, Action::Tick { make: 1.., .. }));
    assert!(!producing_after, "no readings produced while draining");
    sim.run_until(INTERVAL + drain);
    assert!(sim.asked().contains(&Action::Finish { drained: false }));
}

#[test]
fn an_interrupt_while_draining_ends_the_run_at_once() {
    let mut sim = Sim::new(config(10));
    sim.run_until(ms(150));
    sim.core.handle_shutdown(sim.now);
    sim.step();
    assert!(!sim.core.is_finished(), "the first drains");
    sim.run_until(ms(180));
    sim.core.handle_shutdown(sim.now);
    sim.step();
    assert_eq!(sim.asked().last(), Some(&Action::Finish { drained: false }));
}

#[test]
fn a_refused_batch_stays_in_flight_until_its_deadline() {
    let (mut sim, frame) = batch_in_flight();
    sim.reply(Reply::Refused { batch_id: 1, reason: Refusal::Busy });
    assert_eq!(sim.asked(), vec![]);
    sim.run_until(TIMEOUT - ms(1));
    let later = sim.sent();
    sim.run_until(TIMEOUT);
    assert_eq!(sim.asked(), vec![Action::Connect { server: 1, after: Duration::ZERO }]);
    sim.connected();
    assert_eq!(sim.sent(), [vec![frame], later].concat());
}

#[test]
fn a_reply_out_of_bounds_is_dropped_and_counted_and_the_batch_goes_again() {
    let (mut sim, frame) = batch_in_flight();
    let (batch_id, epoch, seal) = request(&frame);
    let hostile = [
        // More averages than a reply carries.
        Reply::Batch(BatchReply {
            batch_id,
            epoch,
            seal,
            averages: vec![
                fog_protocol::Average { seq: 1, epoch: 1, segment: 0, window_end_ms: 0, count: 0, sum_kmh: 0, revision: 0, chain: 0 };
                fog_protocol::MAX_AVERAGES_PER_REPLY + 1
            ],
            ..BatchReply::default()
        }),
        // An ack past every seq a sensor may use.
        Reply::Batch(BatchReply {
            batch_id,
            epoch,
            seal,
            acks: vec![fog_protocol::SensorAck { sensor_id: 1, incarnation: 1, next_seq: u64::MAX, also: vec![] }],
            ..BatchReply::default()
        }),
        // An epoch no pair reaches.
        Reply::Batch(BatchReply { batch_id, epoch: u64::MAX, seal, ..BatchReply::default() }),
    ];
    for (k, reply) in hostile.iter().enumerate() {
        sim.core.handle_frame(sim.now, &fog_protocol::encode(reply).unwrap());
        assert_eq!(sim.core.bad_replies(), k as u64 + 1);
    }
    sim.core.handle_frame(sim.now, &[fog_protocol::PROTOCOL_VERSION, 0xff, 0xff]);
    assert_eq!(sim.core.bad_replies(), 4);
    assert_eq!(sim.core.poll_action(), None, "nothing reached the sensors");
    assert_eq!(sim.core.batches_acked(), 0);
    // The batch is still in flight: at its deadline it goes to the other
    // server, as after silence.
    sim.run_until(TIMEOUT - ms(1));
    let later = sim.sent();
    sim.run_until(TIMEOUT);
    assert_eq!(sim.asked(), vec![Action::Connect { server: 1, after: Duration::ZERO }]);
    sim.connected();
    assert_eq!(sim.sent(), [vec![frame], later].concat());
}

#[test]
fn batches_go_while_earlier_ones_wait_for_their_replies_up_to_the_bound() {
    let mut sim = Sim::new(CoreConfig { timeout: INTERVAL * 10, ..config(1000) });
    sim.produce_per_tick = 100;
    sim.connected();
    // A few readings wait for the reply...
    sim.run_until(INTERVAL * 3);
    assert_eq!(sim.sent().len(), 1, "small batches wait for the one in flight");
    // ... a quarter batch's worth goes once the gap since the last is over.
    sim.produce_per_tick = PIPELINE_READINGS;
    sim.run_until(INTERVAL * 4);
    let ids: Vec<u64> = sim.sent().iter().map(|f| request(f).0).collect();
    assert_eq!(ids, (2..=MAX_IN_FLIGHT as u64).collect::<Vec<_>>(), "no more than the bound unanswered");
    assert!(sim.pending > 0, "readings wait for room");
    // Answers in any order: each frees a place.
    sim.reply(ack(3, 0, [0; 16]));
    sim.reply(ack(1, 0, [0; 16]));
    sim.run_until(INTERVAL * 5);
    let ids: Vec<u64> = sim.sent().iter().map(|f| request(f).0).collect();
    assert_eq!(ids, vec![5, 6]);
    assert_eq!(sim.core.batches_acked(), 2);
    // A second answer to a batch already answered changes nothing.
    sim.reply(ack(3, 0, [0; 16]));
    assert_eq!(sim.core.batches_acked(), 2);
    assert!(!sim.asked().iter().any(|a| matches!(a, Action::ApplyReply(_))));
}

#[test]
fn a_full_batch_of_readings_goes_without_waiting_for_the_gap() {
    let mut sim = Sim::new(config(1000));
    sim.produce_per_tick = 3 * MAX_READINGS_PER_BATCH;
    sim.auto_ack = true;
    sim.connected();
    sim.run_until(INTERVAL - ms(1));
    let sent = sim.sent().len();
    // Ten slices of three full batches each, every one answered at once.
    assert!(sent > 10 * 2, "only {sent} batches in one interval");
    assert!(sim.pending < MAX_READINGS_PER_BATCH, "{} readings left waiting", sim.pending);
}

#[test]
fn a_server_that_answers_every_batch_in_flight_not_active_is_left_once() {
    let mut sim = Sim::new(CoreConfig { timeout: INTERVAL * 10, ..config(1000) });
    sim.produce_per_tick = PIPELINE_READINGS;
    sim.connected();
    sim.run_until(INTERVAL * 3);
    assert_eq!(sim.sent().len(), MAX_IN_FLIGHT);
    for _ in 0..MAX_IN_FLIGHT {
        sim.reply(Reply::NotActive { state: NodeState::Passive, epoch: 0, seal: [0; 16] });
    }
    assert_eq!(sim.asked(), vec![Action::Connect { server: 1, after: NOT_ACTIVE_RETRY }]);
    assert_eq!(sim.core.failovers(), 1);
    sim.connected();
    let ids: Vec<u64> = sim.sent().iter().map(|f| request(f).0).collect();
    assert_eq!(ids, (1..=MAX_IN_FLIGHT as u64).collect::<Vec<_>>(), "all of them, oldest first");
}

#[test]
fn a_server_answering_in_order_gets_a_timeout_per_batch_and_one_that_skips_the_oldest_is_left() {
    // Every reading waiting sends a batch while others are in flight.
    let mut sim = Sim::new(CoreConfig { pipeline_readings: 1, ..config(1000) });
    sim.produce_per_tick = 100;
    sim.connected();
    // Batches go every 25 ms (a quarter interval) up to the bound.
    sim.run_until(TIMEOUT - ms(1));
    let ids: Vec<u64> = sim.sent().iter().map(|f| request(f).0).collect();
    assert_eq!(ids, (1..=MAX_IN_FLIGHT as u64).collect::<Vec<_>>());
    // Batch 1 is answered just before its timeout. Batch 2, sent 25 ms
    // after it, would time out 25 ms later; it gets a whole timeout from
    // the answer instead, as the server only now turns to it.
    sim.reply(ack(1, 0, [0; 16]));
    let sent: Vec<u64> = sim.sent().iter().map(|f| request(f).0).collect();
    assert_eq!(sent, vec![MAX_IN_FLIGHT as u64 + 1], "the answer made room for one more");
    sim.run_until(TIMEOUT * 2 - ms(2));
    assert!(!sim.asked().iter().any(|a| matches!(a, Action::Connect { .. })), "no failover while the server answers in turn");
    // It answers the newest batch, never batch 2: it is left at batch 2's
    // timeout.
    sim.reply(ack(MAX_IN_FLIGHT as u64 + 1, 0, [0; 16]));
    sim.run_until(TIMEOUT * 2);
    assert!(sim.asked().contains(&Action::Connect { server: 1, after: Duration::ZERO }));
}
