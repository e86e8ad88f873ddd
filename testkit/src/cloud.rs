//! The cloud's side of the uplink checked against the site's: what a
//! site's JetStream stream holds (every message, as
//! [`crate::nats::NatsCluster::read_stream`] reads it) against what the
//! site's active server says it counted, published and owed (its status
//! JSON). The one checker of the uplink's tests and of `fog-verify
//! --uplink`:
//!
//! - every message is one the uplink sends: JSON on `fog.<site>.readings.<segment>`
//!   or `fog.<site>.averages.<segment>`, with headers that agree with its body
//!   (`Fog-Site-Seq-First`, `Fog-Site-Seq-Last`, `Fog-Part`, `Nats-Msg-Id`) and
//!   items inside its window;
//! - the site sequence: every item `1..=last_seq` exactly once (none twice,
//!   none missing, none past what the site gave out);
//! - every sensor's readings in the order the site counted them (site
//!   sequences increasing; seqs may not be, when the site filled a gap
//!   later: those are counted as late, not wrong), and per sensor
//!   incarnation the count and speed sum the site counted;
//! - averages `1..=averages_published`, in order, once the averages a
//!   superseded marker voids are set aside: after a split, the site took
//!   over items another history had forwarded (`fog.<site>.superseded`, a
//!   range of site items and the epoch of the active that took it over);
//!   the readings among those items count, the averages forwarded by an
//!   active of an older epoch do not, and site items of the range the
//!   stream lacks are not missing;
//! - nothing dropped at the backlog bound, and everything forwarded.
//!
//! It returns what it found ([`CloudCheck`]: counts, and violations in
//! words) instead of panicking, so a test asserts on it and the verifier
//! puts it in its verdict. Memory is bounded by the site's item count (one
//! bit per site sequence) and its sensors, not by the messages.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::Value;

use crate::history::SensorKey;
use crate::nats::StoredMessage;

/// Most site sequences one check tracks (a bit each: 128 MiB).
pub const MAX_ITEMS: u64 = 1 << 30;

/// Most detailed lines one check keeps (the counts count everything).
const MAX_DETAILS: usize = 20;

/// One sensor incarnation's readings in the cloud.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SensorInCloud {
    pub count: u64,
    pub sum_kmh: u64,
    /// The highest seq of its readings so far in stream order.
    pub max_seq: Option<u64>,
    /// The site sequence of its last reading in stream order.
    pub last_site_seq: Option<u64>,
}

/// What a site's stream holds, checked against the site.
#[derive(Debug, Clone, Default, Serialize)]
pub struct CloudCheck {
    pub site: String,
    pub stream: String,
    pub messages: u64,
    pub readings: u64,
    pub averages: u64,
    /// Items the site gave out (its uplink's `last_seq`) and averages it published.
    pub site_items: u64,
    pub site_averages: u64,
    /// Items whose site sequence the stream already held (each copy beyond the first).
    pub duplicated: u64,
    /// Site sequences in `1..=site_items` the stream lacks.
    pub missing: u64,
    /// Items with site sequence 0 or past what the site gave out.
    pub beyond: u64,
    /// Readings that come in the stream after a reading of their sensor
    /// the site counted later (a site sequence at or above theirs): each
    /// sensor's readings must be in the order the site counted them.
    pub readings_out_of_order: u64,
    /// Readings whose seq is below one of their sensor's earlier in the
    /// stream: a gap the site filled later (a batch resent after a lost
    /// ack or a failover; the site counts by seq, not in seq order). In
    /// the site's order, so not a violation.
    pub readings_late: u64,
    /// Averages whose seq does not follow the previous one in the stream (the first must be 1).
    pub averages_out_of_order: u64,
    /// Sensor incarnations whose (count, speed sum) in the cloud differ from the site's.
    pub sensor_mismatches: u64,
    /// Messages that are not what the uplink sends (not JSON, a subject or
    /// header that disagrees with the body, items outside the window).
    pub malformed: u64,
    /// Items the site dropped unforwarded at its backlog bound.
    pub dropped: u64,
    /// Superseded markers, the averages they void, and the site items of
    /// their ranges the stream lacks (not counted as missing).
    pub markers: u64,
    pub averages_superseded: u64,
    pub superseded_gaps: u64,
    /// The first few problems, in detail.
    pub details: Vec<String>,
    /// One line per kind of violation found; empty when the stream is right.
    pub violations: Vec<String>,
    /// Per sensor incarnation, what the stream holds.
    #[serde(skip)]
    pub sensors: BTreeMap<SensorKey, SensorInCloud>,
}

impl CloudCheck {
    pub fn ok(&self) -> bool {
        self.violations.is_empty()
    }

    fn detail(&mut self, what: String) {
        if self.details.len() < MAX_DETAILS {
            self.details.push(what);
        }
    }

    /// One line: what the stream holds and every count checked.
    pub fn summary(&self) -> String {
        format!(
            "{} readings and {} averages in {} messages (the site owed {} items): duplicated {}, missing {}, beyond the site's {}, \
             readings out of order {} (late-filled gaps {}), averages out of order {}, sensor count mismatches {}, malformed messages {}, \
             dropped {}, superseded markers {} (voiding {} averages, {} items absent in their ranges)",
            self.readings,
            self.averages,
            self.messages,
            self.site_items,
            self.duplicated,
            self.missing,
            self.beyond,
            self.readings_out_of_order,
            self.readings_late,
            self.averages_out_of_order,
            self.sensor_mismatches,
            self.malformed,
            self.dropped,
            self.markers,
            self.averages_superseded,
            self.superseded_gaps
        )
    }
}

/// The stream of site `site`: `FOG_<SITE>` (upper case, `-` as `_`).
pub fn stream_of(site: &str) -> String {
    format!("FOG_{}", site.to_ascii_uppercase().replace('-', "_"))
}

/// A site's whole stream and the status of its active server to check
/// it against (see [`read_settled`]).
pub struct Settled {
    pub messages: Vec<StoredMessage>,
    pub status: Value,
    /// Whether the site had forwarded everything it owed, and owed nothing
    /// more by the time the stream was read.
    pub drained: bool,
}

/// Whether a status is an active server's that has forwarded everything
/// it gave out and is connected to the cloud.
pub fn drained(status: &Value) -> bool {
    let u = &status["uplink"];
    status["state"] == "active"
        && u["backlog_items"] == 0
        && u["last_seq"].is_u64()
        && u["forwarded_through"] == u["last_seq"]
        && u["connected"] == true
}

/// Reads a site's stream once the site has settled: its active server
/// says it has forwarded everything it gave out ([`drained`]), the stream
/// is read, and the status read again names the same last item, so the
/// stream holds all the status owes and the status all the stream holds
/// (a site still closes windows, and publishes their averages, for a
/// while after its hosts stopped). `status` returns the active server's
/// status (`None` when no active answers), `read` the whole stream. Past
/// `timeout`, the last stream and status read are returned, with
/// `drained` false.
pub fn read_settled(
    mut status: impl FnMut() -> Option<Value>,
    mut read: impl FnMut() -> anyhow::Result<Vec<StoredMessage>>,
    timeout: Duration,
) -> anyhow::Result<Settled> {
    let deadline = Instant::now() + timeout;
    loop {
        let before = status();
        let ready = before.as_ref().is_some_and(drained);
        let late = Instant::now() >= deadline;
        if ready || late {
            let messages = read()?;
            if let Some(after) = status() {
                let same = before.is_some_and(|b| b["uplink"]["last_seq"] == after["uplink"]["last_seq"]);
                if ready && same {
                    return Ok(Settled { messages, status: after, drained: true });
                }
                if late {
                    return Ok(Settled { messages, status: after, drained: false });
                }
            } else if late {
                anyhow::bail!("no active server answered status within {timeout:?}");
            }
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// Checks `messages` (a whole stream, in stream order) of site `site`
/// against `status`, the site's active server's status JSON read after the
/// messages were (so everything it owed was given out before).
pub fn check_stream(site: &str, messages: &[StoredMessage], status: &Value) -> CloudCheck {
    let uplink = &status["uplink"];
    let mut c = CloudCheck {
        site: site.to_string(),
        stream: stream_of(site),
        messages: messages.len() as u64,
        site_items: uplink["last_seq"].as_u64().unwrap_or(0),
        site_averages: status["averages_published"].as_u64().unwrap_or(0),
        dropped: uplink["dropped"].as_u64().unwrap_or(0),
        ..CloudCheck::default()
    };
    if !uplink.is_object() {
        c.violations.push("the site's status has no uplink: it forwards nothing".to_string());
        return c;
    }
    let tracked = c.site_items.min(MAX_ITEMS);
    if tracked < c.site_items {
        c.violations.push(format!("the site owes {} items: more than the {MAX_ITEMS} a check tracks", c.site_items));
    }
    let mut seen = vec![0u64; tracked.div_ceil(64) as usize];
    let mut found = Found::default();
    for m in messages {
        read_message(site, m, &mut c, &mut seen, tracked, &mut found);
    }
    // Averages in stream order, less the ones a marker voids.
    let mut last_average = 0u64;
    for a in &found.averages {
        if found.markers.iter().any(|m| (m.first..=m.last).contains(&a.site_seq) && a.epoch < m.epoch) {
            c.averages_superseded += 1;
            continue;
        }
        c.averages += 1;
        if a.seq != last_average + 1 {
            c.averages_out_of_order += 1;
            c.detail(format!("message {}: average {} after average {last_average}", a.message, a.seq));
        }
        last_average = a.seq;
    }
    // What a marker's range lacks was never this site's to forward.
    for m in &found.markers {
        for s in m.first.max(1)..=m.last.min(tracked) {
            let (word, bit) = (((s - 1) / 64) as usize, (s - 1) % 64);
            if seen[word] & (1 << bit) == 0 {
                seen[word] |= 1 << bit;
                c.superseded_gaps += 1;
            }
        }
    }
    let present: u64 = seen.iter().map(|w| u64::from(w.count_ones())).sum();
    c.missing = tracked - present;

    let counted = crate::server_counts(status);
    let mut keys: Vec<SensorKey> = counted.keys().copied().collect();
    keys.extend(c.sensors.keys().filter(|k| !counted.contains_key(k)));
    for key in keys {
        let site_side = counted.get(&key).copied().unwrap_or_default();
        let cloud = c.sensors.get(&key).map(|s| (s.count, s.sum_kmh)).unwrap_or_default();
        if site_side != cloud {
            c.sensor_mismatches += 1;
            c.detail(format!("sensor {} incarnation {:016x}: (count, sum) {cloud:?} in the cloud, {site_side:?} counted by the site", key.0, key.1));
        }
    }

    let site_name = site;
    let mut v = Vec::new();
    if c.duplicated > 0 {
        v.push(format!("{} items are in the {} stream more than once", c.duplicated, c.stream));
    }
    if c.missing > 0 {
        v.push(format!("{} of the {} items site {site_name} gave out are not in the cloud", c.missing, c.site_items));
    }
    if c.beyond > 0 {
        v.push(format!("{} items in the cloud have a site sequence site {site_name} never gave out", c.beyond));
    }
    if c.readings_out_of_order > 0 {
        v.push(format!("{} readings are in the cloud out of their sensor's order", c.readings_out_of_order));
    }
    if c.averages_out_of_order > 0 {
        v.push(format!("{} averages are in the cloud out of sequence order", c.averages_out_of_order));
    }
    if c.averages != c.site_averages || last_average != c.site_averages {
        v.push(format!(
            "the cloud holds {} averages ending at seq {last_average}; site {site_name} published 1..={}",
            c.averages, c.site_averages
        ));
    }
    if c.sensor_mismatches > 0 {
        v.push(format!("{} sensor incarnations have a count or speed sum in the cloud unlike the site's", c.sensor_mismatches));
    }
    if c.malformed > 0 {
        v.push(format!("{} messages in the {} stream are not what the uplink sends", c.malformed, c.stream));
    }
    if c.dropped > 0 {
        v.push(format!("site {site_name} dropped {} items at its backlog bound", c.dropped));
    }
    let forwarded = uplink["forwarded_through"].as_u64().unwrap_or(0);
    if forwarded != c.site_items || uplink["backlog_items"].as_u64() != Some(0) {
        v.push(format!(
            "site {site_name} had not forwarded everything when checked: through {forwarded} of {}, {} items in its backlog",
            c.site_items, uplink["backlog_items"]
        ));
    }
    c.violations = v;
    c
}

/// An average in the stream, checked once the markers are known.
struct AverageSeen {
    site_seq: u64,
    /// The epoch of the active that forwarded it.
    epoch: u64,
    seq: u64,
    message: u64,
}

/// A superseded marker: site items `first..=last` are of a history the
/// site took over, by an active in `epoch`.
struct Marker {
    first: u64,
    last: u64,
    epoch: u64,
}

/// What the messages hold that is checked after all are read.
#[derive(Default)]
struct Found {
    averages: Vec<AverageSeen>,
    markers: Vec<Marker>,
}

/// Checks one message and tallies its items.
fn read_message(site: &str, m: &StoredMessage, c: &mut CloudCheck, seen: &mut [u64], tracked: u64, found: &mut Found) {
    let body: Value = match serde_json::from_slice(&m.payload) {
        Ok(v) => v,
        Err(e) => {
            c.malformed += 1;
            c.detail(format!("message {}: not JSON ({e})", m.seq));
            return;
        }
    };
    if body["superseded"] == true {
        let (first, last, epoch) = (body["first"].as_u64(), body["last"].as_u64(), body["epoch"].as_u64());
        let headers_agree = m.header("Fog-Site-Seq-First") == first.map(|f| f.to_string()).as_deref() && m.header("Fog-Site-Seq-Last") == last.map(|l| l.to_string()).as_deref();
        match (first, last, epoch) {
            (Some(first), Some(last), Some(epoch)) if first <= last && headers_agree && m.subject == format!("fog.{site}.superseded") && body["site"].as_str() == Some(site) => {
                c.markers += 1;
                found.markers.push(Marker { first, last, epoch });
            }
            _ => {
                c.malformed += 1;
                c.detail(format!("message {} ({}): a superseded marker without a range, an epoch, or headers and subject that agree: {body}", m.seq, m.subject));
            }
        }
        return;
    }
    let message_epoch = body["epoch"].as_u64().unwrap_or(0);
    let mut wrong = Vec::new();
    let number = |field: &str| body[field].as_u64();
    let (first, last, part, parts, segment) = (number("first"), number("last"), number("part"), number("parts"), number("segment"));
    let (Some(first), Some(last)) = (first, last) else {
        c.malformed += 1;
        c.detail(format!("message {}: no first/last in its body", m.seq));
        return;
    };
    let prefix = format!("fog.{site}.");
    let kind = m.subject.strip_prefix(&prefix).and_then(|rest| rest.split_once('.'));
    match (kind, segment) {
        (Some((_, seg)), Some(segment)) if seg == segment.to_string() => {}
        _ => wrong.push(format!("subject {} for segment {:?} of site {site}", m.subject, segment)),
    }
    if body["site"].as_str() != Some(site) {
        wrong.push(format!("site {} in the body", body["site"]));
    }
    if m.header("Fog-Site-Seq-First") != Some(first.to_string().as_str()) || m.header("Fog-Site-Seq-Last") != Some(last.to_string().as_str()) {
        wrong.push(format!("headers Fog-Site-Seq-First/Last {:?}/{:?} for the window {first}..={last}", m.header("Fog-Site-Seq-First"), m.header("Fog-Site-Seq-Last")));
    }
    match (part, parts) {
        (Some(part), Some(parts)) if part >= 1 && part <= parts => {
            if m.header("Fog-Part") != Some(format!("{part}/{parts}").as_str()) {
                wrong.push(format!("header Fog-Part {:?} for part {part}/{parts}", m.header("Fog-Part")));
            }
            if m.header("Nats-Msg-Id") != Some(format!("{site}:{first}-{last}:{part}").as_str()) {
                wrong.push(format!("header Nats-Msg-Id {:?}", m.header("Nats-Msg-Id")));
            }
        }
        _ => wrong.push(format!("part {part:?} of {parts:?}")),
    }
    let readings = body["readings"].as_array();
    let averages = body["averages"].as_array();
    let kind = kind.map(|(k, _)| k);
    if readings.is_some_and(|r| !r.is_empty()) && kind != Some("readings") || averages.is_some_and(|a| !a.is_empty()) && kind != Some("averages") {
        wrong.push(format!("items of another kind than its subject {}", m.subject));
    }
    let mut items = 0u64;
    let mut outside = 0u64;
    let mut site_seq = |s: Option<u64>, c: &mut CloudCheck| {
        items += 1;
        let Some(s) = s else {
            outside += 1;
            return;
        };
        if !(first..=last).contains(&s) {
            outside += 1;
        }
        if s == 0 || s > tracked {
            c.beyond += 1;
            return;
        }
        let (word, bit) = (((s - 1) / 64) as usize, (s - 1) % 64);
        if seen[word] & (1 << bit) != 0 {
            c.duplicated += 1;
        } else {
            seen[word] |= 1 << bit;
        }
    };
    for r in readings.into_iter().flatten() {
        let this_site_seq = r["site_seq"].as_u64();
        site_seq(this_site_seq, c);
        c.readings += 1;
        let (Some(id), Some(incarnation), Some(seq), Some(speed)) =
            (r["sensor_id"].as_u64(), r["incarnation"].as_u64(), r["seq"].as_u64(), r["speed_kmh"].as_u64())
        else {
            wrong.push(format!("a reading without sensor_id, incarnation, seq or speed_kmh: {r}"));
            continue;
        };
        let s = c.sensors.entry((id, incarnation)).or_default();
        s.count += 1;
        s.sum_kmh = s.sum_kmh.saturating_add(speed);
        let late = s.max_seq.is_some_and(|max| seq < max);
        s.max_seq = s.max_seq.max(Some(seq));
        let out_of_order = match (s.last_site_seq, this_site_seq) {
            (Some(prev), Some(this)) => this <= prev,
            _ => false,
        };
        let prev_site_seq = s.last_site_seq;
        s.last_site_seq = this_site_seq.or(s.last_site_seq);
        if late {
            c.readings_late += 1;
        }
        if out_of_order {
            c.readings_out_of_order += 1;
            c.detail(format!(
                "message {}: sensor {id} incarnation {incarnation:016x}: seq {seq} (site item {}) after its site item {}",
                m.seq,
                this_site_seq.unwrap_or(0),
                prev_site_seq.unwrap_or(0)
            ));
        }
    }
    for a in averages.into_iter().flatten() {
        site_seq(a["site_seq"].as_u64(), c);
        let (Some(item), Some(seq)) = (a["site_seq"].as_u64(), a["seq"].as_u64()) else {
            wrong.push(format!("an average without site_seq or seq: {a}"));
            continue;
        };
        found.averages.push(AverageSeen { site_seq: item, epoch: message_epoch, seq, message: m.seq });
    }
    if items == 0 {
        wrong.push("no items".to_string());
    }
    if outside > 0 {
        wrong.push(format!("{outside} items outside its window {first}..={last}"));
    }
    if !wrong.is_empty() {
        c.malformed += 1;
        c.detail(format!("message {} ({}): {}", m.seq, m.subject, wrong.join("; ")));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn message(seq: u64, site: &str, segment: u64, first: u64, last: u64, items: Value) -> StoredMessage {
        let kind = if items.get("readings").is_some() { "readings" } else { "averages" };
        let mut body = json!({"site": site, "segment": segment, "first": first, "last": last, "part": 1, "parts": 1, "epoch": 1});
        for (k, v) in items.as_object().unwrap() {
            body[k] = v.clone();
        }
        let mut headers = vec![
            ("Fog-Part".to_string(), "1/1".to_string()),
            ("Fog-Site-Seq-First".to_string(), first.to_string()),
            ("Fog-Site-Seq-Last".to_string(), last.to_string()),
            ("Nats-Msg-Id".to_string(), format!("{site}:{first}-{last}:1")),
        ];
        headers.sort();
        StoredMessage { seq, subject: format!("fog.{site}.{kind}.{segment}"), headers, payload: serde_json::to_vec(&body).unwrap() }
    }

    fn reading(site_seq: u64, sensor: u64, seq: u64, speed: u64) -> Value {
        json!({"site_seq": site_seq, "sensor_id": sensor, "incarnation": 7, "seq": seq, "timestamp_ms": 1, "speed_kmh": speed})
    }

    fn average(site_seq: u64, seq: u64) -> Value {
        json!({"site_seq": site_seq, "seq": seq, "epoch": 1, "window_end_ms": 5000, "count": 2, "sum_kmh": 180, "mean_kmh": 90.0, "revision": 0, "chain": "00"})
    }

    fn status(last_seq: u64, published: u64, per_sensor: Value) -> Value {
        json!({
            "averages_published": published,
            "per_sensor": per_sensor,
            "uplink": {"last_seq": last_seq, "forwarded_through": last_seq, "backlog_items": 0, "dropped": 0},
        })
    }

    fn stream() -> Vec<StoredMessage> {
        vec![
            message(1, "s1", 0, 1, 3, json!({"readings": [reading(1, 1, 1, 90), reading(2, 1, 2, 100)]})),
            message(2, "s1", 1, 1, 3, json!({"readings": [reading(3, 2, 1, 80)]})),
            message(3, "s1", 0, 4, 4, json!({"averages": [average(4, 1)]})),
        ]
    }

    fn counted() -> Value {
        json!([{"sensor_id": 1, "incarnation": 7, "count": 2, "sum_kmh": 190}, {"sensor_id": 2, "incarnation": 7, "count": 1, "sum_kmh": 80}])
    }

    #[test]
    fn a_stream_with_every_item_once_passes() {
        let c = check_stream("s1", &stream(), &status(4, 1, counted()));
        assert!(c.ok(), "{:?} {:?}", c.violations, c.details);
        assert_eq!((c.readings, c.averages, c.messages), (3, 1, 3));
        assert_eq!(c.sensors[&(1, 7)], SensorInCloud { count: 2, sum_kmh: 190, max_seq: Some(2), last_site_seq: Some(2) });
    }

    #[test]
    fn a_message_published_twice_is_a_duplicate() {
        let mut s = stream();
        let mut again = s[0].clone();
        again.seq = 4;
        s.push(again);
        let c = check_stream("s1", &s, &status(4, 1, counted()));
        assert_eq!(c.duplicated, 2);
        // Site item 1 after item 2 is out of order; the 2 after it is not.
        assert_eq!(c.readings_out_of_order, 1);
        assert_eq!(c.sensor_mismatches, 1);
        assert!(!c.ok());
        assert!(c.violations.iter().any(|v| v.contains("more than once")), "{:?}", c.violations);
    }

    #[test]
    fn gaps_foreign_items_disorder_and_forgeries_are_found() {
        let s = vec![
            // Item 1 missing; a reading out of the order the site counted
            // its sensor's readings in (item 2 after item 3).
            message(1, "s1", 0, 2, 3, json!({"readings": [reading(3, 1, 2, 100), reading(2, 1, 1, 90)]})),
            // A site sequence the site never gave out; average 2 before 1.
            message(2, "s1", 0, 4, 9, json!({"averages": [average(9, 2), average(4, 1)]})),
            // Headers that disagree with the body.
            StoredMessage { seq: 3, subject: "fog.s1.readings.1".into(), headers: vec![], payload: b"{\"first\": 1, \"last\": 1}".to_vec() },
            StoredMessage { seq: 4, subject: "fog.s1.readings.1".into(), headers: vec![], payload: b"not json".to_vec() },
            // Readings on an averages subject.
            StoredMessage { subject: "fog.s1.averages.1".into(), ..message(5, "s1", 1, 3, 3, json!({"readings": [reading(3, 2, 1, 80)]})) },
        ];
        let mut st = status(4, 1, counted());
        st["uplink"]["dropped"] = json!(3);
        let c = check_stream("s1", &s, &st);
        assert_eq!(c.missing, 1, "{:?}", c.details);
        assert_eq!(c.beyond, 1);
        assert_eq!(c.readings_out_of_order, 1);
        assert_eq!(c.readings_late, 1);
        assert_eq!(c.averages_out_of_order, 2);
        assert_eq!(c.malformed, 3, "{:?}", c.details);
        assert_eq!(c.dropped, 3);
        assert!(c.violations.len() >= 7, "{:?}", c.violations);
    }

    #[test]
    fn a_gap_the_site_filled_later_is_in_the_sites_order() {
        // Sensor 1's seq 1 was counted after its seq 2 (resent after a lost ack).
        let s = vec![
            message(1, "s1", 0, 1, 3, json!({"readings": [reading(1, 1, 2, 100), reading(2, 1, 1, 90)]})),
            message(2, "s1", 1, 1, 3, json!({"readings": [reading(3, 2, 1, 80)]})),
            message(3, "s1", 0, 4, 4, json!({"averages": [average(4, 1)]})),
        ];
        let c = check_stream("s1", &s, &status(4, 1, counted()));
        assert!(c.ok(), "{:?} {:?}", c.violations, c.details);
        assert_eq!((c.readings_late, c.readings_out_of_order), (1, 0));
    }

    fn marker(seq: u64, first: u64, last: u64, epoch: u64) -> StoredMessage {
        let body = json!({"site": "s1", "superseded": true, "first": first, "last": last, "part": 1, "parts": 1, "epoch": epoch});
        let headers = vec![("Fog-Site-Seq-First".to_string(), first.to_string()), ("Fog-Site-Seq-Last".to_string(), last.to_string())];
        StoredMessage { seq, subject: "fog.s1.superseded".into(), headers, payload: serde_json::to_vec(&body).unwrap() }
    }

    #[test]
    fn a_history_taken_over_counts_its_readings_and_not_its_averages() {
        let with_epoch = |mut m: StoredMessage, epoch: u64| {
            let mut body: Value = serde_json::from_slice(&m.payload).unwrap();
            body["epoch"] = json!(epoch);
            m.payload = serde_json::to_vec(&body).unwrap();
            m
        };
        let mut s = stream();
        // A side that lost a split forwarded items 5..=8 (its item 7 never
        // landed): a reading of sensor 2, its own average 2.
        s.push(with_epoch(message(4, "s1", 1, 5, 8, json!({"readings": [reading(5, 2, 2, 70)]})), 2));
        s.push(with_epoch(message(5, "s1", 0, 5, 8, json!({"averages": [average(6, 2), average(8, 3)]})), 2));
        // The winner took them over, and its own average 2 follows.
        s.push(marker(6, 5, 8, 3));
        s.push(with_epoch(message(7, "s1", 0, 9, 9, json!({"averages": [average(9, 2)]})), 3));
        let counted = json!([{"sensor_id": 1, "incarnation": 7, "count": 2, "sum_kmh": 190}, {"sensor_id": 2, "incarnation": 7, "count": 2, "sum_kmh": 150}]);
        let c = check_stream("s1", &s, &status(9, 2, counted.clone()));
        assert!(c.ok(), "{:?} {:?}", c.violations, c.details);
        assert_eq!((c.markers, c.averages_superseded, c.superseded_gaps, c.averages, c.readings), (1, 2, 1, 2, 4));
        // Without the marker the other history's averages are out of order,
        // and its lost item is missing.
        let unmarked: Vec<StoredMessage> = s.iter().filter(|m| m.seq != 6).cloned().collect();
        let c = check_stream("s1", &unmarked, &status(9, 2, counted.clone()));
        assert_eq!((c.missing, c.averages_out_of_order), (1, 1), "{:?}", c.details);
        // A marker of an older epoch voids nothing of a newer one.
        let mut old = s.clone();
        old[5] = marker(6, 5, 9, 1);
        let c = check_stream("s1", &old, &status(9, 2, counted));
        assert!(c.averages_out_of_order > 0, "{:?}", c.details);
    }

    #[test]
    fn a_site_that_has_not_forwarded_everything_fails() {
        let mut st = status(4, 1, counted());
        st["uplink"]["forwarded_through"] = json!(3);
        let c = check_stream("s1", &stream(), &st);
        assert!(c.violations.iter().any(|v| v.contains("had not forwarded")), "{:?}", c.violations);
        let c = check_stream("s1", &stream(), &json!({"per_sensor": []}));
        assert!(!c.ok());
    }

    #[test]
    fn a_stream_is_read_only_when_the_site_owes_nothing_more_than_it() {
        // The site publishes a late average between the first read of the
        // stream and the status after it: that read is not taken.
        let statuses = std::cell::RefCell::new(vec![
            json!({"state": "active", "uplink": {"last_seq": 3, "forwarded_through": 2, "backlog_items": 1, "connected": true}}),
            json!({"state": "active", "uplink": {"last_seq": 3, "forwarded_through": 3, "backlog_items": 0, "connected": true}}),
            json!({"state": "active", "uplink": {"last_seq": 4, "forwarded_through": 3, "backlog_items": 1, "connected": true}}),
            json!({"state": "active", "uplink": {"last_seq": 4, "forwarded_through": 4, "backlog_items": 0, "connected": true}}),
            json!({"state": "active", "uplink": {"last_seq": 4, "forwarded_through": 4, "backlog_items": 0, "connected": true}}),
        ]);
        let reads = std::cell::Cell::new(0);
        let settled = read_settled(
            || Some(statuses.borrow_mut().remove(0)),
            || {
                reads.set(reads.get() + 1);
                Ok(stream().into_iter().take(reads.get() + 1).collect())
            },
            Duration::from_secs(10),
        )
        .unwrap();
        assert!(settled.drained);
        assert_eq!((reads.get(), settled.messages.len(), settled.status["uplink"]["last_seq"].as_u64()), (2, 3, Some(4)));
        // A site that never drains: the last read, not drained.
        let settled = read_settled(
            || Some(json!({"state": "active", "uplink": {"last_seq": 3, "forwarded_through": 1, "backlog_items": 2, "connected": false}})),
            || Ok(stream()),
            Duration::from_millis(300),
        )
        .unwrap();
        assert!(!settled.drained);
        assert!(read_settled(|| None, || Ok(stream()), Duration::from_millis(300)).is_err());
    }

    #[test]
    fn stream_names_follow_the_site() {
        assert_eq!(stream_of("site-1"), "FOG_SITE_1");
    }
}
