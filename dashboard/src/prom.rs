//! The Prometheus text exposition format (version 0.0.4), read strictly and
//! within bounds: what a scrape of `/metrics` returns becomes a [`Scrape`],
//! its samples by metric name, or a [`ParseError`] naming the line.
//!
//! The page trusts nothing it scrapes. A response is refused whole, never
//! half-read, when it is not UTF-8, when a line is longer than
//! [`Limits::max_line`], when it holds more than [`Limits::max_series`]
//! samples, when a sample has more than [`Limits::max_labels`] labels, a
//! name or a label value is too long, a number is not one, or a series
//! appears twice (as Prometheus itself refuses such a scrape). `# HELP`,
//! `# TYPE` and other comments are skipped: the dashboard knows the types of
//! the metrics it reads from the contract (`monitoring/README.md`).
//! Timestamps after the value are accepted and ignored.

use std::collections::{BTreeMap, HashSet};

/// How much one scrape may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Longest line, in bytes (without its newline).
    pub max_line: usize,
    /// Most samples (lines that are not comments) in one scrape.
    pub max_series: usize,
    /// Most labels on one sample.
    pub max_labels: usize,
    /// Longest metric or label name, in bytes.
    pub max_name: usize,
    /// Longest label value, in bytes, after unescaping.
    pub max_label_value: usize,
}

impl Default for Limits {
    /// Far above what a fog server or host exports (a few hundred series,
    /// 64 segments at most), far below what would hurt the dashboard.
    fn default() -> Self {
        Limits { max_line: 16 * 1024, max_series: 20_000, max_labels: 16, max_name: 200, max_label_value: 1024 }
    }
}

/// Why a scrape was refused; the line is 1-based.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ParseError {
    #[error("the response is not UTF-8 text")]
    NotUtf8,
    #[error("line {line} is longer than {max} bytes")]
    LineTooLong { line: usize, max: usize },
    #[error("more than {max} series")]
    TooManySeries { max: usize },
    #[error("line {line}: {what}")]
    Bad { line: usize, what: String },
    #[error("line {line}: the series {series} appears twice")]
    Duplicate { line: usize, series: String },
}

/// One sample's labels, in the order they were written.
pub type Labels = Vec<(String, String)>;

/// One scrape: every sample, grouped by metric name.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Scrape {
    by_name: BTreeMap<String, Vec<(Labels, f64)>>,
    series: usize,
}

impl Scrape {
    /// Parses `bytes` within `limits`.
    pub fn parse(bytes: &[u8], limits: &Limits) -> Result<Scrape, ParseError> {
        let text = std::str::from_utf8(bytes).map_err(|_| ParseError::NotUtf8)?;
        let mut scrape = Scrape::default();
        let mut seen: HashSet<(String, Labels)> = HashSet::new();
        for (index, raw) in text.split('\n').enumerate() {
            let line = index + 1;
            if raw.len() > limits.max_line {
                return Err(ParseError::LineTooLong { line, max: limits.max_line });
            }
            let raw = raw.strip_suffix('\r').unwrap_or(raw);
            let trimmed = raw.trim_start_matches([' ', '\t']);
            if trimmed.is_empty() || trimmed.starts_with('#') {
                continue;
            }
            if scrape.series == limits.max_series {
                return Err(ParseError::TooManySeries { max: limits.max_series });
            }
            let (name, labels, value) = parse_sample(trimmed, limits).map_err(|what| ParseError::Bad { line, what })?;
            if !seen.insert((name.clone(), labels.clone())) {
                return Err(ParseError::Duplicate { line, series: show_series(&name, &labels) });
            }
            scrape.by_name.entry(name).or_default().push((labels, value));
            scrape.series += 1;
        }
        Ok(scrape)
    }

    /// How many samples the scrape holds.
    pub fn len(&self) -> usize {
        self.series
    }

    pub fn is_empty(&self) -> bool {
        self.series == 0
    }

    /// Every sample of metric `name`: its labels and value.
    pub fn series(&self, name: &str) -> impl Iterator<Item = (&Labels, f64)> {
        self.by_name.get(name).into_iter().flatten().map(|(labels, value)| (labels, *value))
    }

    /// The value of the sample of `name` that carries every label of
    /// `want` (and perhaps others); the first such one.
    pub fn get(&self, name: &str, want: &[(&str, &str)]) -> Option<f64> {
        self.series(name)
            .find(|(labels, _)| want.iter().all(|(k, v)| label(labels, k) == Some(*v)))
            .map(|(_, value)| value)
    }

    /// The value of the sample of `name` without labels, or its only one.
    pub fn value(&self, name: &str) -> Option<f64> {
        self.get(name, &[])
    }

    /// `name` (a gauge) read as a flag: `Some(true)` for a non-zero value.
    pub fn flag(&self, name: &str) -> Option<bool> {
        self.value(name).filter(|v| v.is_finite()).map(|v| v != 0.0)
    }

    /// `name`'s samples keyed by the value of label `key`; samples without
    /// that label are passed over.
    pub fn by_label(&self, name: &str, key: &str) -> BTreeMap<String, f64> {
        self.series(name).filter_map(|(labels, value)| Some((label(labels, key)?.to_string(), value))).collect()
    }

    /// The cumulative buckets of histogram `name` (`name_bucket{le=…}`),
    /// by upper bound, ascending; `+Inf` last. Buckets whose `le` is not a
    /// number are passed over.
    pub fn buckets(&self, name: &str) -> Vec<(f64, f64)> {
        let mut buckets: Vec<(f64, f64)> = self
            .series(&format!("{name}_bucket"))
            .filter_map(|(labels, count)| Some((parse_value(label(labels, "le")?).ok()?, count)))
            .filter(|(le, count)| !le.is_nan() && count.is_finite())
            .collect();
        buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
        buckets
    }
}

/// The value of label `key` in `labels`.
pub fn label<'a>(labels: &'a Labels, key: &str) -> Option<&'a str> {
    labels.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
}

/// The `q` quantile (0..=1) of the observations that fell between two
/// scrapes of one histogram, from its cumulative buckets then (`before`)
/// and now (`after`), interpolated linearly inside the bucket as
/// Prometheus's `histogram_quantile` does. `None` when nothing was observed
/// in between, when the buckets of the two scrapes differ, or when a count
/// went down (the process restarted: its counters began again).
pub fn quantile_between(q: f64, before: &[(f64, f64)], after: &[(f64, f64)]) -> Option<f64> {
    if before.len() != after.len() || after.is_empty() || !(0.0..=1.0).contains(&q) {
        return None;
    }
    let mut delta = Vec::with_capacity(after.len());
    for ((le_before, n_before), (le_after, n_after)) in before.iter().zip(after) {
        if le_before != le_after || n_after < n_before {
            return None;
        }
        delta.push((*le_after, n_after - n_before));
    }
    quantile(q, &delta)
}

/// The `q` quantile of cumulative buckets `(upper bound, count)`,
/// ascending with `+Inf` last.
pub fn quantile(q: f64, buckets: &[(f64, f64)]) -> Option<f64> {
    let &(last_le, total) = buckets.last()?;
    if last_le != f64::INFINITY || total <= 0.0 {
        return None;
    }
    let rank = q * total;
    let mut lower = (0.0, 0.0);
    for &(le, count) in buckets {
        if count >= rank {
            if le == f64::INFINITY {
                // Above the highest finite bound: that bound is all we know.
                return Some(lower.0);
            }
            let in_bucket = count - lower.1;
            if in_bucket <= 0.0 {
                return Some(le);
            }
            return Some(lower.0 + (le - lower.0) * (rank - lower.1) / in_bucket);
        }
        lower = (le, count);
    }
    None
}

fn show_series(name: &str, labels: &Labels) -> String {
    if labels.is_empty() {
        return name.to_string();
    }
    let inner: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v:?}")).collect();
    format!("{name}{{{}}}", inner.join(","))
}

/// `name{labels} value [timestamp]`, the line's leading blanks removed.
fn parse_sample(line: &str, limits: &Limits) -> Result<(String, Labels, f64), String> {
    let name_end = line.find(|c: char| !is_name_char(c, true)).unwrap_or(line.len());
    let name = &line[..name_end];
    check_name(name, true, limits)?;
    let mut rest = &line[name_end..];
    let mut labels = Labels::new();
    if let Some(after_brace) = rest.strip_prefix('{') {
        let (parsed, after) = parse_labels(after_brace, limits)?;
        labels = parsed;
        rest = after;
    }
    let mut fields = rest.split([' ', '\t']).filter(|f| !f.is_empty());
    if !rest.is_empty() && !rest.starts_with([' ', '\t']) {
        return Err(format!("expected a blank after {name:?}"));
    }
    let value = fields.next().ok_or_else(|| format!("{name} has no value"))?;
    let value = parse_value(value).map_err(|_| format!("{value:?} is not a number"))?;
    if let Some(timestamp) = fields.next() {
        timestamp.parse::<i64>().map_err(|_| format!("{timestamp:?} is not a timestamp (integer milliseconds)"))?;
    }
    if let Some(extra) = fields.next() {
        return Err(format!("unexpected {extra:?} after the value"));
    }
    Ok((name.to_string(), labels, value))
}

/// The labels after `{`, up to and including `}`; returns what follows.
fn parse_labels<'a>(mut s: &'a str, limits: &Limits) -> Result<(Labels, &'a str), String> {
    let mut labels = Labels::new();
    loop {
        s = s.trim_start_matches([' ', '\t']);
        if let Some(after) = s.strip_prefix('}') {
            return Ok((labels, after));
        }
        if labels.len() == limits.max_labels {
            return Err(format!("more than {} labels", limits.max_labels));
        }
        let name_end = s.find(|c: char| !is_name_char(c, false)).unwrap_or(s.len());
        let key = &s[..name_end];
        check_name(key, false, limits)?;
        s = s[name_end..].trim_start_matches([' ', '\t']);
        s = s.strip_prefix('=').ok_or_else(|| format!("expected = after the label {key:?}"))?;
        s = s.trim_start_matches([' ', '\t']);
        s = s.strip_prefix('"').ok_or_else(|| format!("the value of label {key:?} is not quoted"))?;
        let (value, after) = parse_quoted(s, limits.max_label_value).map_err(|e| format!("label {key:?}: {e}"))?;
        if labels.iter().any(|(k, _)| k == key) {
            return Err(format!("the label {key:?} appears twice"));
        }
        labels.push((key.to_string(), value));
        s = after.trim_start_matches([' ', '\t']);
        if let Some(after_comma) = s.strip_prefix(',') {
            s = after_comma;
        } else if !s.starts_with('}') {
            return Err("expected , or } after a label".to_string());
        }
    }
}

/// A label value after its opening quote: unescapes `\\`, `\"` and `\n`;
/// returns the value and what follows the closing quote.
fn parse_quoted(s: &str, max: usize) -> Result<(String, &str), String> {
    let mut value = String::new();
    let mut chars = s.char_indices();
    while let Some((i, c)) = chars.next() {
        let unescaped = match c {
            '"' => return Ok((value, &s[i + 1..])),
            '\\' => match chars.next() {
                Some((_, '\\')) => '\\',
                Some((_, '"')) => '"',
                Some((_, 'n')) => '\n',
                Some((_, other)) => return Err(format!("unknown escape \\{other}")),
                None => return Err("the value ends in a backslash".to_string()),
            },
            c => c,
        };
        if value.len() + unescaped.len_utf8() > max {
            return Err(format!("value longer than {max} bytes"));
        }
        value.push(unescaped);
    }
    Err("the value has no closing quote".to_string())
}

fn is_name_char(c: char, metric: bool) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || (metric && c == ':')
}

fn check_name(name: &str, metric: bool, limits: &Limits) -> Result<(), String> {
    let what = if metric { "metric" } else { "label" };
    match name.chars().next() {
        None => Err(format!("expected a {what} name")),
        Some(c) if c.is_ascii_digit() => Err(format!("the {what} name {name:?} starts with a digit")),
        Some(_) if name.len() > limits.max_name => Err(format!("a {what} name longer than {} bytes", limits.max_name)),
        Some(_) => Ok(()),
    }
}

/// A sample value: a decimal or exponent float, `NaN`, `+Inf`, `-Inf`.
/// Rust's own float syntax would also take `inf`, `infinity` and `nan` in
/// any case; the format has exactly these spellings.
fn parse_value(s: &str) -> Result<f64, ()> {
    match s {
        "NaN" => Ok(f64::NAN),
        "+Inf" | "Inf" => Ok(f64::INFINITY),
        "-Inf" => Ok(f64::NEG_INFINITY),
        _ if s.bytes().all(|b| b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'+' | b'e' | b'E')) => s.parse().map_err(|_| ()),
        _ => Err(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Scrape, ParseError> {
        Scrape::parse(text.as_bytes(), &Limits::default())
    }

    const SERVER: &str = r#"# HELP fog_server_active 1 while this node is active
# TYPE fog_server_active gauge
fog_server_active 1
fog_server_info{role="primary"} 1
fog_server_epoch 3
fog_server_readings_counted_total 1234 1700000000000
fog_server_segment_average_kmh{segment="0"} 97.5
fog_server_segment_average_kmh{segment="1"} 31.25
fog_server_readings_refused_total{reason="busy"} 0
fog_server_readings_refused_total{reason="malformed", } 2
# TYPE fog_server_ack_seconds histogram
fog_server_ack_seconds_bucket{le="0.001"} 10
fog_server_ack_seconds_bucket{le="0.005"} 30
fog_server_ack_seconds_bucket{le="+Inf"} 40
fog_server_ack_seconds_sum 0.1
fog_server_ack_seconds_count 40
weird_values{a="x\"y\\z\nw"} -Inf
nan_value NaN
exp_value 1.5e3
"#;

    #[test]
    fn reads_names_labels_values_and_skips_comments() {
        let s = parse(SERVER).unwrap();
        assert_eq!(s.len(), 16);
        assert_eq!(s.value("fog_server_active"), Some(1.0));
        assert_eq!(s.flag("fog_server_active"), Some(true));
        assert_eq!(s.value("fog_server_readings_counted_total"), Some(1234.0), "a timestamp is ignored");
        assert_eq!(s.get("fog_server_info", &[("role", "primary")]), Some(1.0));
        assert_eq!(s.get("fog_server_info", &[("role", "backup")]), None);
        assert_eq!(s.get("fog_server_readings_refused_total", &[("reason", "malformed")]), Some(2.0), "a trailing comma is allowed");
        let segments = s.by_label("fog_server_segment_average_kmh", "segment");
        assert_eq!(segments.into_iter().collect::<Vec<_>>(), vec![("0".to_string(), 97.5), ("1".to_string(), 31.25)]);
        assert_eq!(s.get("weird_values", &[("a", "x\"y\\z\nw")]), Some(f64::NEG_INFINITY), "escapes are undone");
        assert!(s.value("nan_value").unwrap().is_nan());
        assert_eq!(s.value("exp_value"), Some(1500.0));
        assert_eq!(s.value("missing"), None);
        assert_eq!(s.buckets("fog_server_ack_seconds"), vec![(0.001, 10.0), (0.005, 30.0), (f64::INFINITY, 40.0)]);
    }

    #[test]
    fn an_empty_scrape_is_empty_and_blank_lines_are_fine() {
        assert!(parse("").unwrap().is_empty());
        assert!(parse("\n\n  \n# only a comment\n").unwrap().is_empty());
        assert_eq!(parse("a 1\r\n\tb 2\r\n").unwrap().len(), 2, "CRLF and leading blanks");
    }

    #[test]
    fn bad_numbers_and_bad_syntax_are_refused_with_the_line() {
        for (text, want) in [
            ("a 1\nb one\n", "line 2: \"one\" is not a number"),
            ("a infinity\n", "line 1: \"infinity\" is not a number"),
            ("a 0x10\n", "line 1: \"0x10\" is not a number"),
            ("a 1 2.5\n", "line 1: \"2.5\" is not a timestamp (integer milliseconds)"),
            ("a 1 2 3\n", "line 1: unexpected \"3\" after the value"),
            ("a\n", "line 1: a has no value"),
            ("1a 2\n", "line 1: the metric name \"1a\" starts with a digit"),
            ("{a=\"b\"} 2\n", "line 1: expected a metric name"),
            ("a{b=\"c} 2\n", "line 1: label \"b\": the value has no closing quote"),
            ("a{b=c} 2\n", "line 1: the value of label \"b\" is not quoted"),
            ("a{b=\"\\x\"} 2\n", "line 1: label \"b\": unknown escape \\x"),
            ("a{b=\"1\",b=\"2\"} 2\n", "line 1: the label \"b\" appears twice"),
            ("a{b=\"1\" c=\"2\"} 2\n", "line 1: expected , or } after a label"),
            ("a{b=\"1\"}2\n", "line 1: expected a blank after \"a\""),
            ("a-b 2\n", "line 1: expected a blank after \"a\""),
        ] {
            assert_eq!(parse(text).unwrap_err().to_string(), want, "{text:?}");
        }
        assert_eq!(parse("a{x=\"1\"} 1\na{x=\"1\"} 2\n").unwrap_err().to_string(), "line 2: the series a{x=\"1\"} appears twice");
        assert_eq!(Scrape::parse(&[b'a', b' ', 0xff], &Limits::default()).unwrap_err(), ParseError::NotUtf8);
    }

    #[test]
    fn hostile_input_is_refused_within_the_limits() {
        let limits = Limits::default();
        // A huge line: refused by its length, before anything is parsed.
        let huge = format!("a{{b=\"{}\"}} 1\n", "x".repeat(1 << 20));
        assert_eq!(parse(&huge).unwrap_err(), ParseError::LineTooLong { line: 1, max: limits.max_line });
        let long_comment = format!("# {}\na 1\n", "x".repeat(limits.max_line));
        assert!(matches!(parse(&long_comment), Err(ParseError::LineTooLong { line: 1, .. })), "comments are bounded too");
        // Too many series: refused at the first one past the limit.
        let many: String = (0..limits.max_series + 1).map(|i| format!("s{{i=\"{i}\"}} 1\n")).collect();
        assert_eq!(parse(&many).unwrap_err(), ParseError::TooManySeries { max: limits.max_series });
        let exactly: String = (0..limits.max_series).map(|i| format!("s{{i=\"{i}\"}} 1\n")).collect();
        assert_eq!(parse(&exactly).unwrap().len(), limits.max_series);
        // Too many labels, a long name, a long label value.
        let labels: Vec<String> = (0..=limits.max_labels).map(|i| format!("l{i}=\"v\"")).collect();
        assert!(parse(&format!("a{{{}}} 1\n", labels.join(","))).unwrap_err().to_string().contains("more than 16 labels"));
        let name = "n".repeat(limits.max_name + 1);
        assert!(parse(&format!("{name} 1\n")).unwrap_err().to_string().contains("name longer than"));
        let value = "v".repeat(limits.max_label_value + 1);
        assert!(parse(&format!("a{{b=\"{value}\"}} 1\n")).unwrap_err().to_string().contains("value longer than 1024 bytes"));
        // Escapes count after unescaping, and a value of escapes is bounded.
        let escapes = "\\n".repeat(limits.max_label_value + 1);
        assert!(parse(&format!("a{{b=\"{escapes}\"}} 1\n")).is_err());
        // Junk of every byte never panics.
        for b in 0u8..=255 {
            let junk = [b'a', b'{', b, b'=', b'"', b, b'"', b'}', b' ', b, b'\n'];
            let _ = Scrape::parse(&junk, &limits);
        }
    }

    #[test]
    fn quantiles_come_from_the_buckets_of_the_interval() {
        let before = [(0.001, 10.0), (0.005, 30.0), (0.01, 30.0), (f64::INFINITY, 40.0)];
        // 100 more observations: 50 up to 1 ms, 20 in (1, 5] ms, 8 in (5, 10] ms, 22 above.
        let after = [(0.001, 60.0), (0.005, 100.0), (0.01, 108.0), (f64::INFINITY, 140.0)];
        let p50 = quantile_between(0.5, &before, &after).unwrap();
        assert!((p50 - 0.001).abs() < 1e-12, "the 50th of 100 is the top of the first bucket: {p50}");
        let p60 = quantile_between(0.6, &before, &after).unwrap();
        assert!((p60 - 0.003).abs() < 1e-12, "halfway through the second bucket: {p60}");
        let p99 = quantile_between(0.99, &before, &after).unwrap();
        assert!((p99 - 0.01).abs() < 1e-12, "above the highest finite bound: that bound: {p99}");
        assert_eq!(quantile_between(0.5, &before, &before), None, "nothing observed in between");
        assert_eq!(quantile_between(0.5, &after, &before), None, "a counter that went down: a restart");
        assert_eq!(quantile_between(0.5, &before, &after[..3]), None, "different buckets");
        assert_eq!(quantile(0.5, &[(0.1, 4.0)]), None, "no +Inf bucket");
    }
}
