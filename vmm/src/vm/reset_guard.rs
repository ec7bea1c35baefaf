//! The reset-loop guard: a guest that resets turns into a reboot, unless it resets too
//! often (a kernel that triple-faults at once would otherwise loop forever).

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Most guest resets turned into reboots within [`RESET_WINDOW`].
pub const MAX_RESETS: usize = 16;
/// The window [`MAX_RESETS`] counts in.
pub const RESET_WINDOW: Duration = Duration::from_secs(60);

/// Counts the guest's resets within a sliding window: a guest that reboots now and then
/// for months keeps rebooting; one that resets [`MAX_RESETS`] times within
/// [`RESET_WINDOW`] is left shut down.
#[derive(Clone, Debug)]
pub struct ResetGuard {
    limit: usize,
    window: Duration,
    recent: VecDeque<Instant>,
}

impl Default for ResetGuard {
    fn default() -> Self {
        Self::new(MAX_RESETS, RESET_WINDOW)
    }
}

impl ResetGuard {
    /// At most `limit` resets within any `window`.
    pub fn new(limit: usize, window: Duration) -> Self {
        ResetGuard {
            limit,
            window,
            recent: VecDeque::with_capacity(limit),
        }
    }

    /// A guest reset at `now`: whether it may reboot (and it is counted), or has reset
    /// too often (it is not).
    pub fn allow(&mut self, now: Instant) -> bool {
        while self
            .recent
            .front()
            .is_some_and(|&t| now.saturating_duration_since(t) >= self.window)
        {
            self.recent.pop_front();
        }
        if self.recent.len() >= self.limit {
            return false;
        }
        self.recent.push_back(now);
        true
    }

    /// Forgets every reset (a boot through the API starts afresh).
    pub fn clear(&mut self) {
        self.recent.clear();
    }

    /// Resets counted in the window ending at `now`.
    #[cfg(test)]
    fn recent(&self, now: Instant) -> usize {
        self.recent
            .iter()
            .filter(|&&t| now.saturating_duration_since(t) < self.window)
            .count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_guest_that_reboots_now_and_then_keeps_running() {
        let mut g = ResetGuard::default();
        let t0 = Instant::now();
        // One reset every 10 minutes for a year's worth of resets: never refused.
        for i in 0..1000u64 {
            assert!(g.allow(t0 + Duration::from_secs(600 * i)), "reset {i}");
        }
    }

    #[test]
    fn a_reset_loop_is_stopped_within_the_window() {
        let mut g = ResetGuard::default();
        let t0 = Instant::now();
        for i in 0..MAX_RESETS {
            assert!(g.allow(t0 + Duration::from_millis(i as u64 * 100)));
        }
        assert!(!g.allow(t0 + Duration::from_secs(2)), "17th reset in 2 s");
        assert_eq!(g.recent(t0 + Duration::from_secs(2)), MAX_RESETS);
        // Once the window has passed the first resets, it may reboot again.
        assert!(g.allow(t0 + RESET_WINDOW + Duration::from_millis(50)));
        g.clear();
        assert_eq!(g.recent(t0), 0);
    }

    #[test]
    fn resets_spread_over_more_than_the_window_never_trip() {
        // 16 per 60 s is allowed; 17 within the window is not.
        let mut g = ResetGuard::new(3, Duration::from_secs(60));
        let t0 = Instant::now();
        let at = |s| t0 + Duration::from_secs(s);
        assert!(g.allow(at(0)) && g.allow(at(20)) && g.allow(at(40)));
        assert!(!g.allow(at(59)));
        assert!(g.allow(at(61)));
        assert!(!g.allow(at(62)));
    }
}
