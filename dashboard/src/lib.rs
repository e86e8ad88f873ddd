//! `fog-dashboard`: the live page of a fog site.
//!
//! Every second it scrapes the `/metrics` endpoints of the server pair and
//! of the hosts ([`scrape`], parsed by [`prom`]), folds what they say into
//! a ten-minute time series ([`live`]), and serves one page that draws it
//! and updates itself, and the series as JSON ([`serve`]). The page follows
//! whichever server is active, so it keeps working across a failover, and
//! shows a server that does not answer as down.
//!
//! The binary (`src/main.rs`) only reads flags and calls [`run`].

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;

pub mod live;
pub mod prom;
pub mod scrape;
pub mod serve;

use live::{Live, Outcome};
use scrape::Endpoint;
use serve::Site;

/// How often every endpoint is scraped, and the page's resolution.
pub const INTERVAL: Duration = Duration::from_secs(1);

/// What to scrape and where to serve.
#[derive(Debug, Clone)]
pub struct Config {
    pub bind: SocketAddr,
    pub servers: Vec<Endpoint>,
    pub hosts: Vec<Endpoint>,
    /// Sent with every scrape when set.
    pub scrape_token: Option<String>,
    /// Required from every visitor when set.
    pub page_token: Option<String>,
}

/// Binds the page's address, then scrapes and serves until `shutdown`
/// turns true.
pub async fn run(config: Config, shutdown: watch::Receiver<bool>) -> anyhow::Result<()> {
    let listener = TcpListener::bind(config.bind).await.with_context(|| format!("cannot listen on {}", config.bind))?;
    let bound = listener.local_addr().context("cannot read the bound address")?;
    let site = Arc::new(Site {
        live: Mutex::new(Live::new(config.servers.clone(), config.hosts.clone())),
        token: config.page_token.clone(),
        interval_ms: INTERVAL.as_millis() as u64,
    });
    tracing::info!(
        "the live page is at http://{bound}/ ; scraping {} servers ({}) and {} hosts ({}) every {INTERVAL:?}",
        config.servers.len(),
        list(&config.servers),
        config.hosts.len(),
        list(&config.hosts)
    );
    let scraper = tokio::spawn(scrape_forever(site.clone(), config.scrape_token.clone(), shutdown.clone()));
    serve::serve(listener, site, shutdown).await;
    scraper.abort();
    Ok(())
}

fn list(endpoints: &[Endpoint]) -> String {
    endpoints.iter().map(|e| e.url.as_str()).collect::<Vec<_>>().join(", ")
}

/// Scrapes every endpoint at once each [`INTERVAL`] and records the tick.
async fn scrape_forever(site: Arc<Site>, token: Option<String>, mut shutdown: watch::Receiver<bool>) {
    let (servers, hosts) = {
        let live = site.live.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        (live.server_endpoints(), live.host_endpoints())
    };
    let token: Option<Arc<str>> = token.map(Arc::from);
    let mut ticks = tokio::time::interval(INTERVAL);
    // A tick that came late (a slow scrape) is not made up with a burst.
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            _ = shutdown.wait_for(|stop| *stop) => return,
        }
        let at = Instant::now();
        let wall_ms = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
        let mut outcomes = scrape_all(servers.iter().chain(&hosts), &token).await;
        let host_outcomes = outcomes.split_off(servers.len());
        site.live.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).observe(at, wall_ms, outcomes, host_outcomes);
    }
}

/// Scrapes `endpoints` concurrently; the outcomes in their order.
async fn scrape_all<'a>(endpoints: impl Iterator<Item = &'a Endpoint>, token: &Option<Arc<str>>) -> Vec<Outcome> {
    let mut set = JoinSet::new();
    let mut count = 0;
    for (i, endpoint) in endpoints.enumerate() {
        let endpoint = endpoint.clone();
        let token = token.clone();
        set.spawn(async move { (i, scrape::scrape(&endpoint, token.as_deref()).await.map_err(|e| e.to_string())) });
        count += 1;
    }
    let mut outcomes: Vec<Outcome> = (0..count).map(|_| Err("not scraped".to_string())).collect();
    while let Some(joined) = set.join_next().await {
        if let Ok((i, outcome)) = joined {
            outcomes[i] = outcome;
        }
    }
    outcomes
}
