//! QEMU's leaky-bucket model, with bucket sizes suited to timerfds.
//!
//! Each bucket has a `level` leaking at `avg` units per second and, when a burst rate is
//! set, a `burst_level` leaking at `max` per second. A request may start when no relevant
//! bucket is over its size; it is charged once admitted, so one request may overfill a
//! bucket and the next one waits until the excess has leaked.
//!
//! Sizes (deliberately not QEMU's): without a burst rate a bucket holds `avg / 100`
//! units, 10 ms at the average rate. QEMU allows 100 ms (`avg / 10`) because its timers
//! are coarse; ours are timerfds with sub-millisecond precision, so a smaller bucket
//! keeps the rate smooth over short windows without costing throughput. With a burst
//! rate the main bucket holds `avg / 100 + (max - avg) * max_length`, and the burst
//! bucket, leaking at `max`, holds `max / 100`: from idle, I/O runs at `max` for
//! `max_length` seconds (the main bucket fills at `max - avg` per second), then at `avg`.

use std::time::{Duration, Instant};

use super::Direction;
use super::limits::{BPS_TOTAL, BUCKETS, OPS_TOTAL, ThrottleLimits};

/// Fraction of a second of traffic a bucket holds (10 ms).
const SLACK: f64 = 0.01;

/// The longest wait handed out at once; a caller retrying then simply waits again.
const MAX_WAIT_NS: f64 = 3_600.0 * 1e9;

/// A rate, size or byte count as the bucket arithmetic's f64.
// Exact below 2^53; beyond, a relative error of 2^-52 is far below what throttling can
// tell apart.
#[allow(clippy::cast_precision_loss)]
fn f64_of(x: u64) -> f64 {
    x as f64
}

/// One leaky bucket.
#[derive(Clone, Debug, Default)]
struct LeakyBucket {
    avg: f64,
    max: f64,
    max_length: f64,
    level: f64,
    burst_level: f64,
}

impl LeakyBucket {
    fn enabled(&self) -> bool {
        self.avg > 0.0
    }

    fn size(&self) -> f64 {
        if self.max > 0.0 {
            self.avg * SLACK + (self.max - self.avg) * self.max_length
        } else {
            self.avg * SLACK
        }
    }

    fn burst_size(&self) -> f64 {
        self.max * SLACK
    }

    fn leak(&mut self, secs: f64) {
        self.level = (self.level - self.avg * secs).max(0.0);
        self.burst_level = (self.burst_level - self.max * secs).max(0.0);
    }

    /// Nanoseconds until this bucket admits a request, or `None` if it admits now.
    fn wait_ns(&self) -> Option<f64> {
        if !self.enabled() {
            return None;
        }
        let over = |level: f64, size: f64, rate: f64| {
            let extra = level - size;
            // Tolerate rounding: after waiting the computed time the level may be a hair
            // above the size.
            (extra > size.max(1.0) * 1e-9).then(|| (extra * 1e9 / rate).ceil().max(1.0))
        };
        let main = over(self.level, self.size(), self.avg);
        let burst = if self.max > 0.0 {
            over(self.burst_level, self.burst_size(), self.max)
        } else {
            None
        };
        match (main, burst) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        }
    }

    fn charge(&mut self, units: f64) {
        if self.enabled() {
            self.level += units;
            if self.max > 0.0 {
                self.burst_level += units;
            }
        }
    }

    /// Takes new settings, keeping the levels but never above the new sizes, so a
    /// tighter limit does not start with a long stall.
    fn configure(&mut self, avg: u64, max: u64, max_length: u64) {
        self.avg = f64_of(avg);
        self.max = f64_of(max);
        self.max_length = f64_of(max_length);
        if !self.enabled() {
            self.level = 0.0;
            self.burst_level = 0.0;
            return;
        }
        self.level = self.level.min(self.size());
        self.burst_level = if self.max > 0.0 {
            self.burst_level.min(self.burst_size())
        } else {
            0.0
        };
    }
}

/// The six buckets of one throttle group, leaked together.
#[derive(Clone, Debug)]
pub(crate) struct Buckets {
    buckets: [LeakyBucket; BUCKETS],
    /// 0.0 when unset.
    iops_size: f64,
    enabled: bool,
    /// Time up to which the buckets have leaked; never goes backwards.
    last: Option<Instant>,
}

/// The buckets charged by a request in each direction.
fn relevant(dir: Direction) -> [usize; 4] {
    match dir {
        Direction::Read => [BPS_TOTAL, BPS_TOTAL + 1, OPS_TOTAL, OPS_TOTAL + 1],
        Direction::Write => [BPS_TOTAL, BPS_TOTAL + 2, OPS_TOTAL, OPS_TOTAL + 2],
    }
}

impl Buckets {
    /// Empty buckets for `limits` (assumed valid).
    pub fn new(limits: &ThrottleLimits) -> Self {
        let mut b = Buckets {
            buckets: Default::default(),
            iops_size: 0.0,
            enabled: false,
            last: None,
        };
        b.configure(limits, None);
        b
    }

    /// Whether any bucket is active.
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// Applies new limits at `now` (leaking at the old rates up to then), keeping levels
    /// within the new sizes.
    pub fn configure(&mut self, limits: &ThrottleLimits, now: Option<Instant>) {
        if let Some(now) = now {
            self.leak(now);
        }
        for (i, b) in self.buckets.iter_mut().enumerate() {
            let spec = limits.bucket(i);
            b.configure(spec.avg, spec.max, spec.effective_length());
        }
        self.iops_size = f64_of(limits.iops_size);
        self.enabled = limits.is_enabled();
    }

    /// Leaks every bucket up to `now`. A `now` earlier than a previous one (clocks read
    /// on other threads) counts as no time passing.
    pub fn leak(&mut self, now: Instant) {
        match self.last {
            Some(last) if now > last => {
                let secs = (now - last).as_secs_f64();
                for b in &mut self.buckets {
                    b.leak(secs);
                }
                self.last = Some(now);
            }
            Some(_) => {}
            None => self.last = Some(now),
        }
    }

    /// Leaks up to `now`, then returns `None` if a request in `dir` may start now, or the
    /// instant at which to retry (always later than `now`).
    pub fn check(&mut self, dir: Direction, now: Instant) -> Option<Instant> {
        if !self.enabled {
            return None;
        }
        self.leak(now);
        let mut wait: Option<f64> = None;
        for i in relevant(dir) {
            if let Some(w) = self.buckets[i].wait_ns() {
                wait = Some(wait.map_or(w, |v| v.max(w)));
            }
        }
        // `wait_ns` is at least 1 and capped here, so the saturating `as` keeps the value.
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let ns = wait?.min(MAX_WAIT_NS) as u64;
        let base = self.last.unwrap_or(now).max(now);
        Some(
            base.checked_add(Duration::from_nanos(ns))
                .unwrap_or(base + Duration::from_secs(1)),
        )
    }

    /// Charges an admitted request of `bytes` in `dir`.
    pub fn charge(&mut self, dir: Direction, bytes: u64) {
        if !self.enabled {
            return;
        }
        let bytes_f = f64_of(bytes);
        let ops = if self.iops_size > 0.0 && bytes_f > self.iops_size {
            bytes_f / self.iops_size
        } else {
            1.0
        };
        let [bt, bd, ot, od] = relevant(dir);
        self.buckets[bt].charge(bytes_f);
        self.buckets[bd].charge(bytes_f);
        self.buckets[ot].charge(ops);
        self.buckets[od].charge(ops);
    }

    /// The levels (main, burst) of bucket `i`, for tests.
    #[cfg(test)]
    pub fn level(&self, i: usize) -> (f64, f64) {
        (self.buckets[i].level, self.buckets[i].burst_level)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn waits_for_the_excess_and_never_zero() {
        let limits = ThrottleLimits {
            iops_total: 1000,
            ..Default::default()
        };
        let mut b = Buckets::new(&limits);
        let t0 = Instant::now();
        // The bucket holds 10 ops: 11 requests start at once (the 11th overfills it).
        let mut n = 0;
        while b.check(Direction::Read, t0).is_none() {
            b.charge(Direction::Read, 4096);
            n += 1;
            assert!(n < 100);
        }
        assert_eq!(n, 11);
        // One op over at 1000/s: exactly 1 ms.
        assert_eq!(b.check(Direction::Write, t0), Some(t0 + ms(1)));
        assert_eq!(b.check(Direction::Write, t0 + ms(1)), None);
        // A hair over still waits at least 1 ns.
        b.charge(Direction::Write, 0);
        let d = b.check(Direction::Write, t0 + ms(1)).unwrap();
        assert!(d > t0 + ms(1));
        // Time going backwards does not leak or panic.
        assert_eq!(b.check(Direction::Write, t0), Some(d));
    }

    #[test]
    fn burst_bucket_limits_to_max_and_main_bucket_to_length() {
        let limits = ThrottleLimits {
            bps_read: 1000,
            bps_read_max: 3000,
            bps_read_max_length: 2,
            ..Default::default()
        };
        let mut b = Buckets::new(&limits);
        let t0 = Instant::now();
        assert_eq!(b.check(Direction::Read, t0), None);
        b.charge(Direction::Read, 100);
        // Burst bucket holds 30: 70 over at 3000/s = 23.33.. ms.
        let d = b.check(Direction::Read, t0).unwrap();
        assert_eq!(d - t0, Duration::from_nanos(23_333_334));
        // Writes are not limited.
        assert_eq!(b.check(Direction::Write, t0), None);
        b.charge(Direction::Write, 1 << 30);
        assert_eq!(b.level(BPS_TOTAL + 2), (0.0, 0.0));
        // Main bucket: 10 + 2000 * 2 = 4010.
        b.charge(Direction::Read, 5000);
        let d = b.check(Direction::Read, t0).unwrap();
        // Main: 5100 - 4010 = 1090 over at 1000/s; burst: 5070 over at 3000/s.
        assert_eq!(d - t0, ms(1690));
    }

    #[test]
    fn reconfigure_clamps_levels() {
        let mut b = Buckets::new(&ThrottleLimits {
            iops_total: 1000,
            ..Default::default()
        });
        let t0 = Instant::now();
        b.check(Direction::Read, t0);
        for _ in 0..11 {
            b.charge(Direction::Read, 1);
        }
        b.configure(
            &ThrottleLimits {
                iops_total: 100,
                ..Default::default()
            },
            Some(t0),
        );
        assert_eq!(b.level(OPS_TOTAL).0, 1.0);
        assert_eq!(b.check(Direction::Read, t0), None);
        b.configure(&ThrottleLimits::default(), Some(t0));
        assert!(!b.enabled());
        assert_eq!(b.level(OPS_TOTAL).0, 0.0);
    }
}
