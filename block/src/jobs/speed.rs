//! A block job's `speed` limit in bytes per second (0: unlimited), changeable while the
//! job runs. Time is cut into slices of [`SLICE`]; a slice lets `speed * SLICE` bytes
//! go, and a chunk that would exceed it waits for the next slice. A chunk larger than a
//! slice's quota still goes, alone in its slice, and the slices it used up are then
//! waited out, so the average holds for any chunk size.

use std::time::{Duration, Instant};

/// The length of one accounting slice.
pub const SLICE: Duration = Duration::from_millis(100);

/// A job's rate limit.
#[derive(Clone, Debug)]
pub struct RateLimit {
    speed: u64,
    slice_start: Option<Instant>,
    /// Bytes let go in the current slice (and the ones it borrowed from).
    dispatched: u64,
}

impl RateLimit {
    /// A limit of `speed` bytes/s (0: unlimited).
    pub fn new(speed: u64) -> RateLimit {
        RateLimit {
            speed,
            slice_start: None,
            dispatched: 0,
        }
    }

    /// The limit in bytes/s (0: unlimited).
    pub fn speed(&self) -> u64 {
        self.speed
    }

    /// Changes the limit; it applies from the next chunk on.
    pub fn set_speed(&mut self, speed: u64) {
        self.speed = speed;
        self.slice_start = None;
        self.dispatched = 0;
    }

    /// Bytes one slice lets go.
    fn quota(&self) -> u64 {
        let per_slice = u128::from(self.speed) * SLICE.as_nanos() / 1_000_000_000;
        u64::try_from(per_slice).unwrap_or(u64::MAX).max(1)
    }

    /// How long a chunk of `bytes` must wait at `now` before it goes (zero: go now). When
    /// it says zero the chunk is counted; otherwise ask again after the wait.
    pub fn delay(&mut self, bytes: u64, now: Instant) -> Duration {
        if self.speed == 0 {
            return Duration::ZERO;
        }
        let quota = self.quota();
        let start = *self.slice_start.get_or_insert(now);
        let elapsed = now.saturating_duration_since(start);
        // Slices this one's dispatches cover (a big chunk uses up several).
        let used = self.dispatched.div_ceil(quota).max(1);
        let covered = SLICE.saturating_mul(u32::try_from(used).unwrap_or(u32::MAX));
        if elapsed >= covered {
            // A new slice begins.
            self.slice_start = Some(now);
            self.dispatched = bytes;
            return Duration::ZERO;
        }
        if self.dispatched == 0 || self.dispatched + bytes <= quota * used {
            self.dispatched += bytes;
            return Duration::ZERO;
        }
        covered - elapsed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Sends `chunks` chunks of `size` as fast as the limit allows on a simulated clock;
    /// returns the simulated time taken.
    fn simulate(speed: u64, size: u64, chunks: u64) -> Duration {
        let mut r = RateLimit::new(speed);
        let t0 = Instant::now();
        let mut now = t0;
        for _ in 0..chunks {
            loop {
                let d = r.delay(size, now);
                if d.is_zero() {
                    break;
                }
                now += d;
            }
        }
        now - t0
    }

    #[test]
    fn unlimited_never_waits() {
        assert_eq!(simulate(0, 1 << 20, 1000), Duration::ZERO);
    }

    #[test]
    fn the_average_rate_holds_for_small_and_large_chunks() {
        // 10 MiB/s: 100 MiB take about 10 s whatever the chunk size.
        for size in [64 << 10, 1 << 20, 4 << 20] {
            let took = simulate(10 << 20, size, (100 << 20) / size);
            let s = took.as_secs_f64();
            assert!((9.0..=10.5).contains(&s), "chunks of {size}: {s} s");
        }
    }

    #[test]
    fn a_new_speed_applies_at_once() {
        let mut r = RateLimit::new(1 << 20);
        let t = Instant::now();
        assert!(r.delay(100 << 10, t).is_zero());
        // The slice's quota (~102 KiB) is used: the next chunk waits...
        assert!(!r.delay(100 << 10, t).is_zero());
        // ...until the limit is lifted.
        r.set_speed(0);
        assert!(r.delay(100 << 10, t).is_zero());
        assert_eq!(r.speed(), 0);
    }
}
