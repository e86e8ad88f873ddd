//! The two clocks of a node. Liveness (heartbeats, the peer's expiry,
//! resends to the passive, retries, pause detection) runs on a monotonic
//! clock, which only moves forward and at a steady pace; event time (which
//! window a reading falls in, when a window is due, what is too old or from
//! the future) is wall-clock time, the time the sensors stamp their
//! readings with. An NTP step of the wall clock therefore moves event time
//! and nothing else: it cannot look like a pause, trip a takeover or delay
//! the peer's expiry.
//!
//! The node is handed both with every event ([`Now`]); the driver reads
//! them from a [`Clock`].

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// The time of one event, on both clocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Now {
    /// Milliseconds on the monotonic clock since an arbitrary origin.
    pub mono_ms: u64,
    /// Milliseconds since the Unix epoch on the wall clock.
    pub wall_ms: u64,
}

impl Now {
    /// Both clocks read `ms` (tests and simulations that do not step one
    /// clock against the other).
    pub fn both(ms: u64) -> Now {
        Now { mono_ms: ms, wall_ms: ms }
    }
}

/// The process's clocks: `Instant` for monotonic time (counted from when
/// the clock was made, starting at 1 so that 0 can mean "never"), and
/// `SystemTime` for wall-clock time.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    origin: Instant,
}

impl Default for Clock {
    fn default() -> Self {
        Clock::new()
    }
}

impl Clock {
    pub fn new() -> Clock {
        Clock { origin: Instant::now() }
    }

    pub fn now(&self) -> Now {
        Now { mono_ms: self.mono_ms(Instant::now()), wall_ms: wall_ms() }
    }

    fn mono_ms(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.origin).as_millis()).unwrap_or(u64::MAX).saturating_add(1)
    }

    /// The instant of a monotonic time this clock handed out (or a later
    /// one): when to wake for a node's [`poll_timeout`](crate::Node::poll_timeout).
    pub fn instant_of(&self, mono_ms: u64) -> Instant {
        let now = Instant::now();
        now + Duration::from_millis(mono_ms.saturating_sub(self.mono_ms(now)).min(u64::from(u32::MAX)))
    }
}

/// Milliseconds since the Unix epoch on the wall clock (0 before 1970).
pub fn wall_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn monotonic_time_starts_at_one_and_wakes_map_back_to_instants() {
        let clock = Clock::new();
        let before = Instant::now();
        let now = clock.now();
        let after = Instant::now();
        assert!(now.mono_ms >= 1, "{now:?}");
        assert!(now.wall_ms > 1_600_000_000_000, "{now:?}");
        // Whenever it is asked, the wake is 250 ms after `now` was read
        // (give or take the millisecond the clock rounds to).
        let wake = clock.instant_of(now.mono_ms + 250);
        let ms = Duration::from_millis;
        assert!(wake + ms(2) >= before + ms(250) && wake <= after + ms(252), "{:?}", wake - before);
        // A time already past wakes at once.
        assert!(clock.instant_of(0) <= Instant::now());
    }
}
