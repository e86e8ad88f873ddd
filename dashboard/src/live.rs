//! What the page shows, kept in memory: the latest view of every server
//! and host, and a bounded time series of the site (the last
//! [`HISTORY`] ticks, one a second) with failovers marked on it.
//!
//! [`Live::observe`] takes one tick's scrapes (or why each failed) and
//! derives the figures from the metric contract of `monitoring/README.md`:
//! who is active (a server whose `fog_server_active` is 1; of two, the one
//! in the newer epoch), its epoch, whether its passive is in sync and how
//! far behind it is, readings counted per second (the active's
//! `fog_server_readings_counted_total` over its last 5 scrapes), ack latency
//! (p50 and p99 of the active's `fog_server_ack_seconds` observations in
//! the interval), each segment's average speed (the active's, else the
//! hosts') and advisory limit (the hosts'), and the hosts' sensors by
//! state. A failover is marked when the active changes or a server's
//! `fog_server_failovers_total` grows. Nothing here does I/O, so the tests
//! feed it metrics text and check the figures.

use std::collections::{BTreeMap, VecDeque};
use std::time::Instant;

use serde::Serialize;

use crate::prom::{Scrape, quantile_between};
use crate::scrape::Endpoint;

/// Ticks kept: ten minutes at one a second.
pub const HISTORY: usize = 600;
/// Segments followed: the 64 lowest ids, as the servers and hosts export.
pub const MAX_SEGMENTS: usize = 64;
/// A failover mark within this long of one for the same server is the same
/// failover seen twice (the active changed, and its counter grew).
const SAME_FAILOVER_MS: u64 = 10_000;
/// Readings per second are averaged over this many scrapes: a process
/// brings its figures up to date once a second, as often as they are
/// scraped, so one interval may see two updates and the next none.
const RATE_SCRAPES: usize = 5;

/// One scrape's outcome: the metrics, or why there are none.
pub type Outcome = Result<Scrape, String>;

/// A scraped process: its last good scrape and the one before (for rates).
#[derive(Debug)]
struct Source {
    endpoint: Endpoint,
    error: Option<String>,
    last: Option<(Instant, Scrape)>,
    before: Option<(Instant, Scrape)>,
    /// `primary` or `backup`, once a scrape said so; kept while it is down.
    role: Option<String>,
    /// Wall-clock ms of the last good scrape.
    seen_ms: Option<u64>,
    /// `fog_server_readings_counted_total` of the last good scrapes in a
    /// row, at most [`RATE_SCRAPES`] + 1 of them.
    counted: VecDeque<(Instant, f64)>,
}

impl Source {
    fn new(endpoint: Endpoint) -> Self {
        Source {
            endpoint,
            error: Some("not scraped yet".to_string()),
            last: None,
            before: None,
            role: None,
            seen_ms: None,
            counted: VecDeque::with_capacity(RATE_SCRAPES + 1),
        }
    }

    fn up(&self) -> bool {
        self.error.is_none()
    }

    /// The current scrape, while the process answers.
    fn now(&self) -> Option<&Scrape> {
        if self.up() { self.last.as_ref().map(|(_, s)| s) } else { None }
    }

    fn record(&mut self, at: Instant, wall_ms: u64, outcome: Outcome) {
        match outcome {
            Ok(scrape) => {
                if let Some(role) = ["primary", "backup"].into_iter().find(|r| scrape.get("fog_server_info", &[("role", r)]) == Some(1.0)) {
                    self.role = Some(role.to_string());
                }
                if self.counted.len() > RATE_SCRAPES {
                    self.counted.pop_front();
                }
                match scrape.value("fog_server_readings_counted_total").filter(|n| n.is_finite()) {
                    Some(counted) => self.counted.push_back((at, counted)),
                    None => self.counted.clear(),
                }
                self.before = self.last.take();
                self.last = Some((at, scrape));
                self.error = None;
                self.seen_ms = Some(wall_ms);
            }
            Err(error) => {
                self.error = Some(error);
                // A rate across an outage would blend two runs of the process.
                self.before = None;
                self.counted.clear();
            }
        }
    }

    /// `(now, before, seconds between)` of two consecutive good scrapes.
    fn interval(&self) -> Option<(&Scrape, &Scrape, f64)> {
        let (now_at, now) = self.last.as_ref().filter(|_| self.up())?;
        let (before_at, before) = self.before.as_ref()?;
        let seconds = now_at.duration_since(*before_at).as_secs_f64();
        (seconds > 0.0).then_some((now, before, seconds))
    }

    /// Readings counted per second over the last scrapes in a row.
    fn readings_per_second(&self) -> Option<f64> {
        let (first_at, first) = self.counted.front()?;
        let (last_at, last) = self.counted.back()?;
        let seconds = last_at.duration_since(*first_at).as_secs_f64();
        (seconds > 0.0 && last >= first).then(|| (last - first) / seconds)
    }

    fn name(&self) -> String {
        self.role.clone().unwrap_or_else(|| self.endpoint.url.clone())
    }
}

/// A server as the page shows it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ServerView {
    pub url: String,
    /// `primary`, `backup`, or the URL until a scrape said which.
    pub name: String,
    pub up: bool,
    pub error: Option<String>,
    /// `active`, `passive`, `primary` or `backup` (the Binary Star state).
    pub state: Option<String>,
    pub active: bool,
    pub ready: Option<bool>,
    pub epoch: Option<f64>,
    pub passive_in_sync: Option<bool>,
    pub lag_entries: Option<f64>,
    pub lag_seconds: Option<f64>,
    pub failovers: Option<f64>,
    pub readings_counted: Option<f64>,
    pub unclean_takeovers: Option<f64>,
    pub peer_heartbeat_age_seconds: Option<f64>,
    pub seen_ms: Option<u64>,
}

/// A host as the page shows it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct HostView {
    pub url: String,
    pub up: bool,
    pub error: Option<String>,
    pub connected: Option<bool>,
    pub running: Option<f64>,
    pub restarting: Option<f64>,
    pub quarantined: Option<f64>,
    pub readings_unacked: Option<f64>,
    pub failovers: Option<f64>,
    pub seen_ms: Option<u64>,
}

/// One segment at one tick: average speed and advisory limit, km/h.
#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct SegmentPoint {
    pub average_kmh: Option<f64>,
    pub limit_kmh: Option<f64>,
}

/// The site at one tick.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Sample {
    /// Wall clock, Unix ms.
    pub t: u64,
    /// Index of the active server in the `servers` list.
    pub active: Option<usize>,
    /// More than one server said it was active.
    pub split: bool,
    pub epoch: Option<f64>,
    pub passive_in_sync: Option<bool>,
    pub lag_entries: Option<f64>,
    pub lag_seconds: Option<f64>,
    pub readings_per_second: Option<f64>,
    pub ack_p50_ms: Option<f64>,
    pub ack_p99_ms: Option<f64>,
    /// Which servers answered, by index.
    pub up: Vec<bool>,
    /// By segment id (as the metrics' `segment` label).
    pub segments: BTreeMap<u32, SegmentPoint>,
}

/// A failover on the timeline.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Failover {
    pub t: u64,
    /// The server that took over (index, and its name).
    pub to: usize,
    pub name: String,
    pub epoch: Option<f64>,
}

/// `/api/live`: the current views, the samples after `since`, the marks.
#[derive(Debug, Serialize)]
pub struct Snapshot<'a> {
    pub now: u64,
    pub interval_ms: u64,
    pub history: usize,
    pub servers: Vec<ServerView>,
    pub hosts: Vec<HostView>,
    pub failovers: &'a VecDeque<Failover>,
    pub samples: Vec<&'a Sample>,
}

/// The state behind the page.
#[derive(Debug)]
pub struct Live {
    servers: Vec<Source>,
    hosts: Vec<Source>,
    samples: VecDeque<Sample>,
    failovers: VecDeque<Failover>,
    /// The last server seen active, across ticks when none is.
    last_active: Option<usize>,
}

impl Live {
    pub fn new(servers: Vec<Endpoint>, hosts: Vec<Endpoint>) -> Self {
        Live {
            servers: servers.into_iter().map(Source::new).collect(),
            hosts: hosts.into_iter().map(Source::new).collect(),
            samples: VecDeque::with_capacity(HISTORY),
            failovers: VecDeque::new(),
            last_active: None,
        }
    }

    pub fn server_endpoints(&self) -> Vec<Endpoint> {
        self.servers.iter().map(|s| s.endpoint.clone()).collect()
    }

    pub fn host_endpoints(&self) -> Vec<Endpoint> {
        self.hosts.iter().map(|s| s.endpoint.clone()).collect()
    }

    /// Takes one tick's outcomes, in the order of the endpoints given to
    /// [`Live::new`], at monotonic `at` and wall-clock `wall_ms`, and
    /// appends a sample.
    pub fn observe(&mut self, at: Instant, wall_ms: u64, servers: Vec<Outcome>, hosts: Vec<Outcome>) {
        for (source, outcome) in self.servers.iter_mut().zip(servers) {
            source.record(at, wall_ms, outcome);
        }
        for (source, outcome) in self.hosts.iter_mut().zip(hosts) {
            source.record(at, wall_ms, outcome);
        }
        let (active, split) = self.active();
        self.mark_failovers(wall_ms, active);
        let sample = self.sample(wall_ms, active, split);
        if self.samples.len() == HISTORY {
            self.samples.pop_front();
        }
        self.samples.push_back(sample);
        let oldest = self.samples.front().map_or(wall_ms, |s| s.t);
        while self.failovers.front().is_some_and(|f| f.t < oldest) {
            self.failovers.pop_front();
        }
    }

    /// The active server: of those that answer and say they are active,
    /// the one in the newest epoch (the other steps down when it hears of
    /// it); and whether there were several.
    fn active(&self) -> (Option<usize>, bool) {
        let actives: Vec<(usize, f64)> = self
            .servers
            .iter()
            .enumerate()
            .filter_map(|(i, s)| {
                let scrape = s.now()?;
                (scrape.flag("fog_server_active") == Some(true)).then(|| (i, scrape.value("fog_server_epoch").unwrap_or(0.0)))
            })
            .collect();
        let newest = actives.iter().copied().reduce(|a, b| if b.1 > a.1 { b } else { a }).map(|(i, _)| i);
        (newest, actives.len() > 1)
    }

    fn mark_failovers(&mut self, wall_ms: u64, active: Option<usize>) {
        let mut took_over = Vec::new();
        if let (Some(now), Some(before)) = (active, self.last_active)
            && now != before
        {
            took_over.push(now);
        }
        for (i, source) in self.servers.iter().enumerate() {
            if let Some((now, before, _)) = source.interval()
                && let (Some(n), Some(b)) = (now.value("fog_server_failovers_total"), before.value("fog_server_failovers_total"))
                && n > b
            {
                took_over.push(i);
            }
        }
        for to in took_over {
            let repeated = self.failovers.back().is_some_and(|f| f.to == to && wall_ms.saturating_sub(f.t) < SAME_FAILOVER_MS);
            if !repeated {
                let epoch = self.servers[to].now().and_then(|s| s.value("fog_server_epoch"));
                self.failovers.push_back(Failover { t: wall_ms, to, name: self.servers[to].name(), epoch });
            }
        }
        // The epoch a takeover starts may show a scrape after the takeover
        // itself: the mark takes the newest while it is recent.
        if let (Some(to), Some(mark)) = (active, self.failovers.back_mut())
            && mark.to == to
            && wall_ms.saturating_sub(mark.t) < SAME_FAILOVER_MS
            && let Some(epoch) = self.servers[to].now().and_then(|s| s.value("fog_server_epoch"))
            && mark.epoch.is_none_or(|e| epoch > e)
        {
            mark.epoch = Some(epoch);
        }
        if active.is_some() {
            self.last_active = active;
        }
    }

    fn sample(&self, wall_ms: u64, active: Option<usize>, split: bool) -> Sample {
        let source = active.map(|i| &self.servers[i]);
        let scrape = source.and_then(Source::now);
        let get = |name: &str| scrape.and_then(|s| s.value(name)).filter(|v| v.is_finite());
        let interval = source.and_then(Source::interval);
        let readings_per_second = source.filter(|s| s.up()).and_then(Source::readings_per_second);
        let ack = |q: f64| {
            let (now, before, _) = interval?;
            quantile_between(q, &before.buckets("fog_server_ack_seconds"), &now.buckets("fog_server_ack_seconds")).map(|s| s * 1000.0)
        };
        Sample {
            t: wall_ms,
            active,
            split,
            epoch: get("fog_server_epoch"),
            passive_in_sync: scrape.and_then(|s| s.flag("fog_server_passive_in_sync")),
            lag_entries: get("fog_server_replication_lag_entries"),
            lag_seconds: get("fog_server_replication_lag_seconds"),
            readings_per_second,
            ack_p50_ms: ack(0.5),
            ack_p99_ms: ack(0.99),
            up: self.servers.iter().map(Source::up).collect(),
            segments: self.segments(scrape),
        }
    }

    /// Each segment's average (the active's; without one, the mean of the
    /// hosts') and limit (of the host with the most sensors on it).
    fn segments(&self, active: Option<&Scrape>) -> BTreeMap<u32, SegmentPoint> {
        let by_segment = |scrape: &Scrape, name: &str| -> BTreeMap<u32, f64> {
            scrape
                .by_label(name, "segment")
                .into_iter()
                .filter_map(|(segment, value)| Some((segment.parse::<u32>().ok()?, value)))
                .filter(|(_, value)| value.is_finite())
                .collect()
        };
        let server_averages = active.map(|s| by_segment(s, "fog_server_segment_average_kmh")).unwrap_or_default();
        let mut host_averages: BTreeMap<u32, (f64, u32)> = BTreeMap::new();
        let mut limits: BTreeMap<u32, (f64, f64)> = BTreeMap::new();
        for host in self.hosts.iter().filter_map(Source::now) {
            for (segment, average) in by_segment(host, "fog_host_segment_average_kmh") {
                let entry = host_averages.entry(segment).or_default();
                entry.0 += average;
                entry.1 += 1;
            }
            let sensors = by_segment(host, "fog_host_segment_sensors");
            for (segment, limit) in by_segment(host, "fog_host_segment_limit_kmh") {
                let weight = sensors.get(&segment).copied().unwrap_or(0.0);
                let entry = limits.entry(segment).or_insert((limit, weight));
                if weight > entry.1 {
                    *entry = (limit, weight);
                }
            }
        }
        let mut ids: Vec<u32> = server_averages.keys().chain(host_averages.keys()).chain(limits.keys()).copied().collect();
        ids.sort_unstable();
        ids.dedup();
        ids.truncate(MAX_SEGMENTS);
        ids.into_iter()
            .map(|id| {
                let average_kmh = server_averages
                    .get(&id)
                    .copied()
                    .or_else(|| host_averages.get(&id).map(|(sum, n)| sum / f64::from(*n)));
                (id, SegmentPoint { average_kmh, limit_kmh: limits.get(&id).map(|(limit, _)| *limit) })
            })
            .collect()
    }

    /// Everything the page needs, with the samples taken after `since`
    /// (Unix ms; 0 for all of them).
    pub fn snapshot(&self, now: u64, interval_ms: u64, since: u64) -> Snapshot<'_> {
        let (active, _) = self.active();
        Snapshot {
            now,
            interval_ms,
            history: HISTORY,
            servers: self.servers.iter().enumerate().map(|(i, s)| server_view(s, active == Some(i))).collect(),
            hosts: self.hosts.iter().map(host_view).collect(),
            failovers: &self.failovers,
            samples: self.samples.iter().filter(|s| s.t > since).collect(),
        }
    }

    pub fn samples(&self) -> &VecDeque<Sample> {
        &self.samples
    }

    pub fn failovers(&self) -> &VecDeque<Failover> {
        &self.failovers
    }
}

fn server_view(source: &Source, active: bool) -> ServerView {
    let scrape = source.now();
    let get = |name: &str| scrape.and_then(|s| s.value(name)).filter(|v| v.is_finite());
    let state = scrape.and_then(|s| {
        ["active", "passive", "primary", "backup"].into_iter().find(|st| s.get("fog_server_state", &[("state", st)]) == Some(1.0))
    });
    ServerView {
        url: source.endpoint.url.clone(),
        name: source.name(),
        up: source.up(),
        error: source.error.clone(),
        state: state.map(str::to_string),
        active,
        ready: scrape.and_then(|s| s.flag("fog_server_ready")),
        epoch: get("fog_server_epoch"),
        passive_in_sync: scrape.and_then(|s| s.flag("fog_server_passive_in_sync")),
        lag_entries: get("fog_server_replication_lag_entries"),
        lag_seconds: get("fog_server_replication_lag_seconds"),
        failovers: get("fog_server_failovers_total"),
        readings_counted: get("fog_server_readings_counted_total"),
        unclean_takeovers: get("fog_server_unclean_takeovers_total"),
        peer_heartbeat_age_seconds: get("fog_server_peer_heartbeat_age_seconds"),
        seen_ms: source.seen_ms,
    }
}

fn host_view(source: &Source) -> HostView {
    let scrape = source.now();
    let get = |name: &str| scrape.and_then(|s| s.value(name)).filter(|v| v.is_finite());
    let sensors = |state: &str| scrape.and_then(|s| s.get("fog_host_sensors", &[("state", state)])).filter(|v| v.is_finite());
    HostView {
        url: source.endpoint.url.clone(),
        up: source.up(),
        error: source.error.clone(),
        connected: scrape.and_then(|s| s.flag("fog_host_connected")),
        running: sensors("running"),
        restarting: sensors("restarting"),
        quarantined: sensors("quarantined"),
        readings_unacked: get("fog_host_readings_unacked"),
        failovers: get("fog_host_failovers_total"),
        seen_ms: source.seen_ms,
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::prom::Limits;

    fn endpoint(url: &str) -> Endpoint {
        url.parse().unwrap()
    }

    fn live() -> Live {
        Live::new(
            vec![endpoint("http://127.0.0.1:9101"), endpoint("http://127.0.0.1:9102")],
            vec![endpoint("http://127.0.0.1:9103")],
        )
    }

    /// A server's metrics: role, active or not, epoch, readings counted,
    /// failovers, ack buckets (≤1 ms, ≤10 ms, +Inf) and segment averages.
    fn server(role: &str, active: bool, epoch: u32, counted: u32, failovers: u32, acks: [u32; 3], averages: &[(u32, f64)]) -> Outcome {
        let state = if active { "active" } else { "passive" };
        let mut text = format!(
            "fog_server_info{{role=\"{role}\"}} 1\nfog_server_state{{state=\"{state}\"}} 1\nfog_server_state{{state=\"primary\"}} 0\n\
             fog_server_active {}\nfog_server_ready 1\nfog_server_epoch {epoch}\nfog_server_readings_counted_total {counted}\n\
             fog_server_failovers_total {failovers}\nfog_server_passive_in_sync 1\nfog_server_replication_lag_entries 2\n\
             fog_server_replication_lag_seconds 0.004\n\
             fog_server_ack_seconds_bucket{{le=\"0.001\"}} {}\nfog_server_ack_seconds_bucket{{le=\"0.01\"}} {}\n\
             fog_server_ack_seconds_bucket{{le=\"+Inf\"}} {}\n",
            u8::from(active),
            acks[0],
            acks[1],
            acks[2]
        );
        for (segment, kmh) in averages {
            text += &format!("fog_server_segment_average_kmh{{segment=\"{segment}\"}} {kmh}\n");
        }
        Ok(Scrape::parse(text.as_bytes(), &Limits::default()).unwrap())
    }

    fn host(quarantined: u32, segments: &[(u32, f64, f64, u32)]) -> Outcome {
        let mut text = format!(
            "fog_host_sensors{{state=\"running\"}} 8\nfog_host_sensors{{state=\"restarting\"}} 0\n\
             fog_host_sensors{{state=\"quarantined\"}} {quarantined}\nfog_host_connected 1\n"
        );
        for (segment, average, limit, sensors) in segments {
            text += &format!(
                "fog_host_segment_average_kmh{{segment=\"{segment}\"}} {average}\nfog_host_segment_limit_kmh{{segment=\"{segment}\"}} {limit}\n\
                 fog_host_segment_sensors{{segment=\"{segment}\"}} {sensors}\n"
            );
        }
        Ok(Scrape::parse(text.as_bytes(), &Limits::default()).unwrap())
    }

    fn down() -> Outcome {
        Err("cannot connect: refused".to_string())
    }

    #[test]
    fn the_active_its_rates_latency_and_segments() {
        let mut live = live();
        let t0 = Instant::now();
        let segs = [(0, 110.0), (1, 40.0)];
        live.observe(t0, 1_000, vec![server("primary", true, 1, 100, 0, [10, 20, 20], &segs), server("backup", false, 1, 100, 0, [0, 0, 0], &[])], vec![host(1, &[(0, 108.0, 130.0, 4), (1, 41.0, 60.0, 4)])]);
        let first = live.samples().back().unwrap().clone();
        assert_eq!(first.active, Some(0));
        assert_eq!(first.epoch, Some(1.0));
        assert_eq!(first.passive_in_sync, Some(true));
        assert_eq!(first.readings_per_second, None, "a rate needs two scrapes");
        assert_eq!(first.segments[&0], SegmentPoint { average_kmh: Some(110.0), limit_kmh: Some(130.0) }, "the server's average wins");
        assert_eq!(first.segments[&1].limit_kmh, Some(60.0));

        // Two seconds later: 300 more readings, 100 more acks of which 50 within 1 ms.
        live.observe(t0 + Duration::from_secs(2), 3_000, vec![server("primary", true, 1, 400, 0, [60, 120, 120], &segs), server("backup", false, 1, 400, 0, [0, 0, 0], &[])], vec![host(1, &[])]);
        let second = live.samples().back().unwrap();
        assert_eq!(second.readings_per_second, Some(150.0));
        assert_eq!(second.ack_p50_ms, Some(1.0));
        assert!((second.ack_p99_ms.unwrap() - 9.82).abs() < 1e-9, "{:?}", second.ack_p99_ms);
        let snapshot = live.snapshot(3_000, 1000, 0);
        assert_eq!(snapshot.servers[0].name, "primary");
        assert_eq!(snapshot.servers[0].state.as_deref(), Some("active"));
        assert!(snapshot.servers[0].active && !snapshot.servers[1].active);
        assert_eq!(snapshot.hosts[0].quarantined, Some(1.0));
        assert_eq!(snapshot.samples.len(), 2);
        assert_eq!(live.snapshot(3_000, 1000, 1_000).samples.len(), 1, "only the samples after `since`");
        assert!(live.failovers().is_empty());
    }

    #[test]
    fn a_server_that_does_not_answer_is_down_and_keeps_its_name() {
        let mut live = live();
        let t0 = Instant::now();
        live.observe(t0, 1_000, vec![server("primary", true, 1, 100, 0, [0, 0, 0], &[]), server("backup", false, 1, 100, 0, [0, 0, 0], &[])], vec![host(0, &[])]);
        live.observe(t0 + Duration::from_secs(1), 2_000, vec![down(), server("backup", false, 1, 100, 0, [0, 0, 0], &[])], vec![down()]);
        let snapshot = live.snapshot(2_000, 1000, 0);
        let primary = &snapshot.servers[0];
        assert!(!primary.up && !primary.active);
        assert_eq!(primary.name, "primary");
        assert_eq!(primary.error.as_deref(), Some("cannot connect: refused"));
        assert_eq!(primary.epoch, None, "nothing stale is shown for a server that is down");
        assert!(!snapshot.hosts[0].up);
        let sample = live.samples().back().unwrap();
        assert_eq!((sample.active, sample.up.clone()), (None, vec![false, true]));
        assert_eq!(sample.readings_per_second, None);
    }

    #[test]
    fn a_failover_is_marked_once_and_rates_do_not_span_it() {
        let mut live = live();
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        live.observe(at(0), 1_000, vec![server("primary", true, 1, 100, 0, [0, 0, 0], &[]), server("backup", false, 1, 100, 0, [0, 0, 0], &[])], vec![]);
        live.observe(at(1), 2_000, vec![down(), server("backup", false, 1, 110, 0, [0, 0, 0], &[])], vec![]);
        assert!(live.failovers().is_empty(), "a server down is not yet a failover");
        // The backup takes over: its active flag and its counter both say so.
        live.observe(at(2), 3_000, vec![down(), server("backup", true, 2, 120, 1, [0, 0, 0], &[])], vec![]);
        live.observe(at(3), 4_000, vec![down(), server("backup", true, 2, 150, 1, [0, 0, 0], &[])], vec![]);
        assert_eq!(live.failovers().len(), 1, "{:?}", live.failovers());
        let mark = &live.failovers()[0];
        assert_eq!((mark.t, mark.to, mark.name.as_str(), mark.epoch), (3_000, 1, "backup", Some(2.0)));
        // The backup's own scrapes since it was last unreachable (never): 100 to 150 in 3 s.
        assert_eq!(live.samples().back().unwrap().readings_per_second, Some(50.0 / 3.0));
        // The primary comes back passive: no mark; a split (both active) picks the newer epoch.
        live.observe(at(4), 5_000, vec![server("primary", false, 2, 150, 0, [0, 0, 0], &[]), server("backup", true, 2, 150, 1, [0, 0, 0], &[])], vec![]);
        live.observe(at(5), 6_000, vec![server("primary", true, 3, 150, 1, [0, 0, 0], &[]), server("backup", true, 2, 150, 1, [0, 0, 0], &[])], vec![]);
        let sample = live.samples().back().unwrap();
        assert_eq!((sample.active, sample.split), (Some(0), true));
        assert_eq!(live.failovers().len(), 2);
        assert_eq!(live.failovers()[1].name, "primary");
    }

    #[test]
    fn readings_per_second_average_over_the_last_scrapes_and_restart_after_an_outage() {
        let mut live = live();
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let active = |counted| vec![server("primary", true, 1, counted, 0, [0, 0, 0], &[]), down()];
        // The figures came up to date twice in one interval and not in the next.
        for (i, counted) in [0, 160, 160, 480, 640, 800, 960].into_iter().enumerate() {
            live.observe(at(i as u64), 1_000 * (i as u64 + 1), active(counted), vec![]);
        }
        let rates: Vec<Option<f64>> = live.samples().iter().map(|s| s.readings_per_second).collect();
        assert_eq!(rates, [None, Some(160.0), Some(80.0), Some(160.0), Some(160.0), Some(160.0), Some(160.0)]);
        live.observe(at(7), 8_000, vec![down(), down()], vec![]);
        live.observe(at(8), 9_000, active(2_000), vec![]);
        assert_eq!(live.samples().back().unwrap().readings_per_second, None, "no rate across the outage");
        live.observe(at(9), 10_000, active(2_100), vec![]);
        assert_eq!(live.samples().back().unwrap().readings_per_second, Some(100.0));
    }

    #[test]
    fn a_mark_takes_the_epoch_the_takeover_starts_when_it_shows_late() {
        let mut live = live();
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        live.observe(at(0), 1_000, vec![server("primary", true, 1, 100, 0, [0, 0, 0], &[]), server("backup", false, 1, 100, 0, [0, 0, 0], &[])], vec![]);
        // The counter moved before the node said it was active in a new epoch.
        live.observe(at(1), 2_000, vec![down(), server("backup", false, 1, 100, 1, [0, 0, 0], &[])], vec![]);
        assert_eq!(live.failovers()[0].epoch, Some(1.0));
        live.observe(at(2), 3_000, vec![down(), server("backup", true, 2, 100, 1, [0, 0, 0], &[])], vec![]);
        assert_eq!(live.failovers().len(), 1);
        assert_eq!(live.failovers()[0].epoch, Some(2.0));
        assert_eq!(live.failovers()[0].t, 2_000, "the mark stays where the takeover was first seen");
    }

    #[test]
    fn history_and_segments_are_bounded() {
        let mut live = live();
        let t0 = Instant::now();
        let many: Vec<(u32, f64)> = (0..200).rev().map(|s| (s, 100.0)).collect();
        for i in 0..(HISTORY as u64 + 50) {
            live.observe(t0 + Duration::from_secs(i), 1_000 * (i + 1), vec![server("primary", true, 1, 100, 0, [0, 0, 0], &many), down()], vec![]);
        }
        assert_eq!(live.samples().len(), HISTORY);
        assert_eq!(live.samples().front().unwrap().t, 51_000, "the oldest fell off");
        let segments = &live.samples().back().unwrap().segments;
        assert_eq!(segments.len(), MAX_SEGMENTS);
        assert_eq!(segments.keys().copied().collect::<Vec<_>>(), (0..64).collect::<Vec<u32>>(), "the lowest ids");
    }

    #[test]
    fn without_a_server_average_the_hosts_give_it_and_the_majority_host_gives_the_limit() {
        let mut live = Live::new(vec![endpoint("http://127.0.0.1:9101")], vec![endpoint("http://127.0.0.1:9103"), endpoint("http://127.0.0.1:9104")]);
        live.observe(Instant::now(), 1_000, vec![down()], vec![host(0, &[(3, 50.0, 80.0, 1)]), host(0, &[(3, 70.0, 100.0, 5)])]);
        let point = live.samples().back().unwrap().segments[&3];
        assert_eq!(point, SegmentPoint { average_kmh: Some(60.0), limit_kmh: Some(100.0) });
    }
}
