//! Adaptive polling, as QEMU's iothreads do it: after work, spin for a window checking
//! for more before sleeping in epoll; grow the window while sleeps are short, shrink it
//! when they are longer than the cap.

use std::time::Duration;

/// Where the window starts when it first grows.
pub const START_NS: u64 = 4_000;

/// The polling window of one iothread.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PollWindow {
    /// Current window in ns (0: no polling).
    pub ns: u64,
    /// Cap (`poll_max_ns`; 0 disables polling).
    pub max_ns: u64,
    /// Growth factor (`poll_grow`; 0 means 2).
    pub grow: u64,
    /// Shrink divisor (`poll_shrink`; 0 means back to 0).
    pub shrink: u64,
}

impl PollWindow {
    /// A window with the given settings, starting closed.
    pub fn new(max_ns: u64, grow: u64, shrink: u64) -> Self {
        PollWindow {
            ns: 0,
            max_ns,
            grow,
            shrink,
        }
    }

    /// Changes the settings, keeping the current window within the new cap.
    pub fn configure(&mut self, max_ns: u64, grow: u64, shrink: u64) {
        self.max_ns = max_ns;
        self.grow = grow;
        self.shrink = shrink;
        self.ns = self.ns.min(max_ns);
    }

    /// The current window as a duration.
    pub fn window(&self) -> Duration {
        Duration::from_nanos(self.ns)
    }

    /// Adjusts the window after a sleep in epoll that lasted `block_ns`.
    pub fn after_block(&mut self, block_ns: u64) {
        if self.max_ns == 0 {
            self.ns = 0;
        } else if block_ns <= self.ns {
            // The window would have caught it: keep it.
        } else if block_ns > self.max_ns {
            // Polling could not have caught it: poll less.
            self.ns = self.ns.checked_div(self.shrink).unwrap_or(0);
        } else if self.ns < self.max_ns {
            // A longer window would have caught it: grow.
            let grow = if self.grow == 0 { 2 } else { self.grow };
            self.ns = if self.ns == 0 {
                START_NS
            } else {
                self.ns.saturating_mul(grow)
            };
            self.ns = self.ns.min(self.max_ns);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_from_4us_doubling_to_the_cap() {
        let mut w = PollWindow::new(32_768, 0, 0);
        let mut seen = Vec::new();
        for _ in 0..6 {
            w.after_block(30_000);
            seen.push(w.ns);
        }
        // Once the window covers the 30 us sleeps it stops growing.
        assert_eq!(seen, [4_000, 8_000, 16_000, 32_000, 32_000, 32_000]);
        w.after_block(32_500);
        assert_eq!(w.ns, 32_768, "capped at poll_max_ns");
    }

    #[test]
    fn long_sleeps_shrink_or_reset() {
        let mut w = PollWindow::new(32_768, 0, 0);
        w.ns = 16_000;
        w.after_block(1_000_000);
        assert_eq!(w.ns, 0, "shrink 0 resets");
        let mut w = PollWindow::new(32_768, 4, 2);
        w.ns = 16_000;
        w.after_block(1_000_000);
        assert_eq!(w.ns, 8_000);
        w.after_block(10_000);
        assert_eq!(w.ns, 32_000, "grow 4");
        w.after_block(5_000);
        assert_eq!(w.ns, 32_000, "short sleeps inside the window keep it");
    }

    #[test]
    fn zero_cap_disables_and_reconfigure_clamps() {
        let mut w = PollWindow::new(0, 0, 0);
        w.after_block(100);
        assert_eq!(w.ns, 0);
        let mut w = PollWindow::new(32_768, 0, 0);
        w.ns = 32_768;
        w.configure(10_000, 0, 0);
        assert_eq!(w.ns, 10_000);
    }
}
