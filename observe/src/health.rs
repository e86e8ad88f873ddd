//! Liveness and readiness, as the event loop reports them and `/healthz`
//! and `/readyz` read them (from another thread: atomics and a short lock).

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// A loop that has not turned for this long is not alive.
const STALE_AFTER: Duration = Duration::from_secs(2);

/// What the loop last said about itself.
#[derive(Debug)]
pub struct Health {
    origin: Instant,
    /// When the loop last turned, in ms since `origin` (0: never).
    turned_ms: AtomicU64,
    ready: AtomicBool,
    /// Why the process is not ready (empty when it is).
    why: Mutex<String>,
}

impl Default for Health {
    fn default() -> Self {
        Health {
            origin: Instant::now(),
            turned_ms: AtomicU64::new(0),
            ready: AtomicBool::new(false),
            why: Mutex::new("starting".into()),
        }
    }
}

impl Health {
    /// The loop turned: call at least every second.
    pub fn turned(&self) {
        let ms = u64::try_from(self.origin.elapsed().as_millis()).unwrap_or(u64::MAX).max(1);
        self.turned_ms.store(ms, Ordering::Relaxed);
    }

    /// Ready, or not and why (one short line).
    pub fn set_ready(&self, ready: bool, why: &str) {
        if self.ready.swap(ready, Ordering::Relaxed) == ready && (ready || self.why() == why) {
            return;
        }
        if let Ok(mut w) = self.why.lock() {
            w.clear();
            w.push_str(if ready { "" } else { why });
        }
    }

    fn why(&self) -> String {
        self.why.lock().map(|w| w.clone()).unwrap_or_default()
    }

    /// `Ok` while the loop turns; otherwise why not.
    pub fn alive(&self) -> Result<(), String> {
        let turned = self.turned_ms.load(Ordering::Relaxed);
        if turned == 0 {
            return Err("the event loop has not started".into());
        }
        let now = u64::try_from(self.origin.elapsed().as_millis()).unwrap_or(u64::MAX);
        let since = now.saturating_sub(turned);
        if since > STALE_AFTER.as_millis() as u64 {
            return Err(format!("the event loop has not turned for {since} ms"));
        }
        Ok(())
    }

    /// `Ok` while alive and ready; otherwise why not.
    pub fn ready(&self) -> Result<(), String> {
        self.alive()?;
        if self.ready.load(Ordering::Relaxed) {
            Ok(())
        } else {
            Err(self.why())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alive_once_turned_ready_once_said() {
        let h = Health::default();
        assert!(h.alive().unwrap_err().contains("not started"));
        h.turned();
        assert!(h.alive().is_ok());
        assert_eq!(h.ready().unwrap_err(), "starting");
        h.set_ready(false, "passive, catching up");
        assert_eq!(h.ready().unwrap_err(), "passive, catching up");
        h.set_ready(true, "");
        assert!(h.ready().is_ok());
        h.set_ready(false, "no passive");
        assert_eq!(h.ready().unwrap_err(), "no passive");
    }
}
