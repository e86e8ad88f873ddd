//! The live page in a real browser: a server pair and a host with their
//! metrics endpoints, `fog-dashboard` scraping them, and headless Chromium
//! looking at the page before and after the primary is killed with
//! SIGKILL. The page must show the primary active and every segment's
//! average and limit, then the backup active, the primary DOWN and the
//! failover marked.
//!
//! Needs Chromium (Debian's `chromium`): without it the test says SKIPPED,
//! unless `FOG_REQUIRE_CHROMIUM=1`. `FOG_LIVE_PAGE_SCREENSHOT=PATH` keeps
//! the screenshot it takes (1200 × 900) at PATH.

use std::time::Duration;

use fog_testkit::browser::{Browser, Element, element, elements};
use fog_testkit::{Pair, Proc, bin, free_port, is_active, is_caught_up, scratch_dir, start_host, start_server, status_when, wait_for};

const SEGMENTS: usize = 4;
const LIMITS: [&str; 5] = ["130", "120", "100", "80", "60"];

/// What the page shows, read from its DOM.
#[derive(Debug)]
struct Shown {
    active: String,
    epoch: Option<u64>,
    states: Vec<(String, String)>,
    segments: Vec<(String, f64, String)>,
    running: Option<u64>,
    failovers_to: Vec<String>,
}

fn read_page(dom: &str) -> Shown {
    let attr = |e: Option<Element>, name: &str| e.and_then(|e| e.attr(name)).unwrap_or("").to_string();
    let segments = elements(dom, "data-segment=\"")
        .iter()
        .filter_map(|e| {
            let average = e.attr("data-average-kmh")?.parse::<f64>().ok()?;
            Some((e.attr("data-segment")?.to_string(), average, e.attr("data-limit-kmh")?.to_string()))
        })
        .collect();
    Shown {
        active: attr(element(dom, "id=\"active-server\""), "data-active"),
        epoch: element(dom, "id=\"epoch\"").and_then(|e| e.text.trim().parse().ok()),
        states: elements(dom, "data-server=\"")
            .iter()
            .map(|e| (e.attr("data-server").unwrap_or("").to_string(), e.attr("data-state").unwrap_or("").to_string()))
            .collect(),
        segments,
        running: element(dom, "data-sensors=\"running\"").and_then(|e| e.text.trim().parse().ok()),
        failovers_to: elements(dom, "data-failover-to=\"").iter().filter_map(|e| e.attr("data-failover-to").map(str::to_string)).collect(),
    }
}

impl Shown {
    fn state_of(&self, server: &str) -> &str {
        self.states.iter().find(|(name, _)| name == server).map_or("", |(_, state)| state.as_str())
    }

    /// Every segment with a finite average speed and a limit the signs can show.
    fn road_complete(&self) -> bool {
        self.segments.len() == SEGMENTS
            && self.segments.iter().all(|(_, average, limit)| average.is_finite() && *average > 0.0 && LIMITS.contains(&limit.as_str()))
    }
}

/// Dumps the page until `good` holds, at most `timeout`; the error shows
/// the last thing the page showed.
fn page_when(browser: &Browser, url: &str, what: &str, timeout: Duration, good: impl Fn(&Shown) -> bool) -> Shown {
    let mut last = None;
    let shown = wait_for(what, timeout, || match browser.dump_dom(url) {
        Ok(dom) => {
            let shown = read_page(&dom);
            if good(&shown) {
                return Some(shown);
            }
            last = Some(format!("{shown:?}"));
            None
        }
        Err(e) => {
            last = Some(format!("{e:#}"));
            None
        }
    });
    shown.unwrap_or_else(|e| panic!("{e}; the page last showed {}", last.unwrap_or_default()))
}

#[test]
fn the_live_page_follows_a_failover() {
    let dir = scratch_dir("live-page").unwrap();
    let Some(browser) = Browser::find("the_live_page_follows_a_failover", &dir).unwrap() else { return };
    let pair = Pair::on_free_ports().unwrap();
    let metrics = |port: u16| format!("127.0.0.1:{port}");
    let (primary_metrics, backup_metrics, host_metrics) = (metrics(free_port().unwrap()), metrics(free_port().unwrap()), metrics(free_port().unwrap()));
    let page_bind = metrics(free_port().unwrap());
    let mut primary = start_server(&pair, true, &["--lateness", "200ms", "--metrics-bind", &primary_metrics], &dir).unwrap();
    let _backup = start_server(&pair, false, &["--lateness", "200ms", "--metrics-bind", &backup_metrics], &dir).unwrap();
    let _host = start_host(
        &[
            "--sensors", "8", "--segments", "4", "--interval", "100ms", "--timeout", "500ms",
            "--servers", &pair.servers(), "--metrics-bind", &host_metrics,
        ],
        &dir,
    )
    .unwrap();
    let args: Vec<String> = [
        "--bind", &page_bind,
        "--server", &format!("http://{primary_metrics}"),
        "--server", &format!("http://{backup_metrics}"),
        "--host", &format!("http://{host_metrics}"),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let _dashboard = Proc::spawn("dashboard", &bin("fog-dashboard").unwrap(), &args, &dir).unwrap();
    let url = format!("http://{page_bind}/");

    let before = page_when(&browser, &url, "the page to show the primary active and every segment", Duration::from_secs(60), |s| {
        s.active == "primary" && s.state_of("primary") == "active" && s.state_of("backup") == "passive" && s.road_complete() && s.running == Some(8)
    });
    eprintln!("before the kill the page showed {before:?}");
    assert!(before.failovers_to.is_empty(), "no failover yet: {before:?}");
    let epoch_before = before.epoch.expect("the page shows the epoch");

    let png = std::env::var_os("FOG_LIVE_PAGE_SCREENSHOT").map_or_else(|| dir.join("live-page.png"), Into::into);
    browser.screenshot(&url, std::path::Path::new(&png), 1200, 900).unwrap();

    // The kill comes once the backup holds all of it, so it can take over.
    status_when(&pair.primary_frontend, "active", Duration::from_secs(10), is_active).unwrap();
    status_when(&pair.backup_frontend, "a caught-up passive", Duration::from_secs(15), is_caught_up).unwrap();
    primary.kill().unwrap();

    let after = page_when(&browser, &url, "the page to show the backup active and the primary DOWN", Duration::from_secs(60), |s| {
        s.active == "backup" && s.state_of("primary") == "down" && s.state_of("backup") == "active" && !s.failovers_to.is_empty()
    });
    eprintln!("after the kill the page showed {after:?}");
    assert_eq!(after.failovers_to, ["backup"], "one failover, to the backup: {after:?}");
    assert!(after.epoch.is_some_and(|e| e > epoch_before), "a takeover starts a new epoch: {epoch_before} then {after:?}");
    let dom = browser.dump_dom(&url).unwrap();
    let primary_card = element(&dom, "data-server=\"primary\"").unwrap();
    let card_text = &dom[dom.find(primary_card.tag).unwrap()..];
    assert!(card_text[..card_text.find("</div>").unwrap_or(card_text.len())].contains("DOWN"), "the primary's card says DOWN");
    // The road goes on being shown from the new active.
    page_when(&browser, &url, "every segment again, from the backup", Duration::from_secs(30), Shown::road_complete);
}
