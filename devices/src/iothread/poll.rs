//! Adaptive polling, as QEMU's iothreads do it: after work, spin for a window checking
//! for more before sleeping in epoll; grow the window while sleeps are short, shrink it
//! when they are longer than the cap.
//!
//! Two additions for machines where a wake-up is dear (a few vCPUs, an IPI per wake-up):
//! - The iothreads spin for a disk only where its completions come often: its recent
//!   latency per request in flight (the expected wait for the next completion) must be
//!   within [`SLOW_DISK_NS`] (or the cap, if lower). At QD32 on a disk of a few hundred us
//!   a completion comes every 10 us or so, and spinning catches each without a wake-up
//!   (vhost-user 4k random reads at QD32 on a file: 80.7k -> 92.3k IOPS, 0.88 -> 0.93 of
//!   the host's own io_uring, CPU per I/O 3.8 -> 3.6 us). At QD1 the wait is the whole
//!   latency: spinning would cost it in CPU and return nothing a sleep would not, the
//!   completion wakes the thread anyway. An idle queue follows the same rule with its
//!   disk's latency: a driver that waits that long per request sleeps in between, so its
//!   next kick comes only after its own wake-up; measured on a 2-vCPU guest (QD1 4k
//!   reads, 30-60 us disk), spinning for it raised the median latency by 14 us and the
//!   CPU per request by 15 us: the busy thread also steers the scheduler away from
//!   handing the CPU straight to the woken driver. Letting such a queue spin anyway (the
//!   window alone deciding) took vhost-user QD1 4k reads on a file from 16.2k to 10.7k
//!   IOPS and the CPU per I/O from 32 to 64 us on a 2-vCPU machine.
//! - A sleep measures a wait that includes the wake-up itself, longer than what polling
//!   would have waited, so a window that has shrunk may never grow back by sleeps alone.
//!   Every [`PROBE_EVERY`] sleeps with a window below the cap, one spin uses the whole cap
//!   (a probe); a hit sets the window to cover what it waited.

use std::time::Duration;

/// A disk whose recent latency per request in flight is longer than this (or than
/// `poll_max_ns`, if lower) is not spun for (see the module docs). Fixed, not the cap:
/// the cap covers how long a driver may take to come back, which on a nested or busy host
/// includes taking an interrupt; the disk rule is about when completions come.
pub const SLOW_DISK_NS: u64 = 32_768;

/// Where the window starts when it first grows.
pub const START_NS: u64 = 4_000;

/// Sleeps between two probes with the whole cap while the window is below it.
pub const PROBE_EVERY: u32 = 16;

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
    /// Sleeps since the last probe.
    sleeps: u32,
}

impl PollWindow {
    /// A window with the given settings, starting closed.
    pub fn new(max_ns: u64, grow: u64, shrink: u64) -> Self {
        PollWindow {
            ns: 0,
            max_ns,
            grow,
            shrink,
            sleeps: 0,
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

    /// How long to spin now: the window, or the whole cap when a probe is due (zero: do
    /// not spin).
    pub fn spin_budget(&mut self) -> Duration {
        if self.max_ns > 0 && self.ns < self.max_ns && self.sleeps >= PROBE_EVERY {
            self.sleeps = 0;
            return Duration::from_nanos(self.max_ns);
        }
        self.window()
    }

    /// Notes that spinning found work after `waited_ns`: a probe that waited longer than
    /// the window grows it (from [`START_NS`], by the growth factor) until it covers that.
    pub fn after_hit(&mut self, waited_ns: u64) {
        if waited_ns <= self.ns || self.max_ns == 0 {
            return;
        }
        let grow = if self.grow == 0 { 2 } else { self.grow.max(2) };
        let mut ns = self.ns.max(START_NS);
        while ns < waited_ns && ns < self.max_ns {
            ns = ns.saturating_mul(grow);
        }
        self.ns = ns.min(self.max_ns);
    }

    /// Adjusts the window after a sleep in epoll that lasted `block_ns` (counted from
    /// the start of the spin before it, as QEMU does).
    pub fn after_block(&mut self, block_ns: u64) {
        self.sleeps = self.sleeps.saturating_add(1);
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

    #[test]
    fn a_probe_spins_the_whole_cap_and_a_hit_regrows_the_window() {
        let mut w = PollWindow::new(32_768, 0, 0);
        // Sleeps longer than the cap (they include the wake-up) keep the window shut...
        for _ in 0..PROBE_EVERY {
            assert_eq!(w.spin_budget(), Duration::ZERO);
            w.after_block(40_000);
        }
        assert_eq!(w.ns, 0);
        // ...until a probe spins the whole cap.
        assert_eq!(w.spin_budget(), Duration::from_nanos(32_768));
        assert_eq!(
            w.spin_budget(),
            Duration::ZERO,
            "one probe per round of sleeps"
        );
        w.after_hit(20_000);
        assert_eq!(w.ns, 32_000, "4 us doubled until it covers 20 us");
        w.after_hit(1_000);
        assert_eq!(w.ns, 32_000, "hits inside the window keep it");
        w.after_hit(32_700);
        assert_eq!(w.ns, 32_768, "capped");
        // Disabled polling never probes.
        let mut off = PollWindow::new(0, 0, 0);
        for _ in 0..2 * PROBE_EVERY {
            off.after_block(1_000);
            assert_eq!(off.spin_budget(), Duration::ZERO);
        }
        off.after_hit(500);
        assert_eq!(off.ns, 0);
    }
}
