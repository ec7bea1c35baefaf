//! Per-disk I/O counters, updated on the hot path with relaxed atomics (no lock).

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use serde::Serialize;

use crate::queue::RequestKind;

/// Buckets of the latency histogram: bucket `i` counts latencies in `[2^i, 2^(i+1))` ns.
pub const LATENCY_BUCKETS: usize = 40;

/// Ops, bytes and errors of one request kind.
#[derive(Debug, Default)]
struct KindCounters {
    ops: AtomicU64,
    bytes: AtomicU64,
    errors: AtomicU64,
}

/// Counters of one disk, shared by all its queues (which may run on different threads).
#[derive(Debug)]
pub struct DiskCounters {
    kinds: [KindCounters; 5],
    submitted: AtomicU64,
    completed: AtomicU64,
    throttled_ns: AtomicU64,
    latency: [AtomicU64; LATENCY_BUCKETS],
}

impl Default for DiskCounters {
    fn default() -> Self {
        DiskCounters {
            kinds: Default::default(),
            submitted: AtomicU64::new(0),
            completed: AtomicU64::new(0),
            throttled_ns: AtomicU64::new(0),
            latency: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }
}

impl DiskCounters {
    /// Counts a request entering the disk.
    pub fn record_start(&self) {
        self.submitted.fetch_add(1, Relaxed);
    }

    /// Counts a finished request: `bytes` moved on success, an error otherwise, and its
    /// latency in nanoseconds.
    pub fn record_completion(&self, kind: RequestKind, result: Result<u64, ()>, latency_ns: u64) {
        let k = &self.kinds[kind as usize];
        match result {
            Ok(bytes) => {
                k.ops.fetch_add(1, Relaxed);
                k.bytes.fetch_add(bytes, Relaxed);
            }
            Err(()) => {
                k.errors.fetch_add(1, Relaxed);
            }
        }
        self.latency[latency_bucket(latency_ns)].fetch_add(1, Relaxed);
        self.completed.fetch_add(1, Relaxed);
    }

    /// Adds time requests spent waiting for the throttle.
    pub fn add_throttled_ns(&self, ns: u64) {
        self.throttled_ns.fetch_add(ns, Relaxed);
    }

    /// A copy of every counter.
    pub fn snapshot(&self) -> CountersSnapshot {
        let kind = |k: RequestKind| {
            let c = &self.kinds[k as usize];
            KindSnapshot {
                ops: c.ops.load(Relaxed),
                bytes: c.bytes.load(Relaxed),
                errors: c.errors.load(Relaxed),
            }
        };
        let completed = self.completed.load(Relaxed);
        let submitted = self.submitted.load(Relaxed);
        CountersSnapshot {
            read: kind(RequestKind::Read),
            write: kind(RequestKind::Write),
            flush: kind(RequestKind::Flush),
            discard: kind(RequestKind::Discard),
            write_zeroes: kind(RequestKind::WriteZeroes),
            in_flight: submitted.saturating_sub(completed),
            throttled_ns: self.throttled_ns.load(Relaxed),
            latency_log2_ns: self.latency.iter().map(|b| b.load(Relaxed)).collect(),
        }
    }
}

fn latency_bucket(ns: u64) -> usize {
    let bucket = 63 - ns.max(1).leading_zeros() as usize;
    bucket.min(LATENCY_BUCKETS - 1)
}

/// Ops, bytes and errors of one request kind, as read at one moment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct KindSnapshot {
    /// Requests completed successfully.
    pub ops: u64,
    /// Bytes moved (or discarded / zeroed) by them.
    pub bytes: u64,
    /// Requests that failed.
    pub errors: u64,
}

/// The counters of one disk at one moment.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct CountersSnapshot {
    /// Reads.
    pub read: KindSnapshot,
    /// Writes.
    pub write: KindSnapshot,
    /// Flushes.
    pub flush: KindSnapshot,
    /// Discards.
    pub discard: KindSnapshot,
    /// Write-zeroes.
    pub write_zeroes: KindSnapshot,
    /// Requests started and not yet completed.
    pub in_flight: u64,
    /// Total time requests waited for the throttle, in ns.
    pub throttled_ns: u64,
    /// Latency histogram: entry `i` counts completions taking `[2^i, 2^(i+1))` ns.
    pub latency_log2_ns: Vec<u64>,
}

impl CountersSnapshot {
    /// Total errors over every kind.
    pub fn errors(&self) -> u64 {
        [
            &self.read,
            &self.write,
            &self.flush,
            &self.discard,
            &self.write_zeroes,
        ]
        .iter()
        .map(|k| k.errors)
        .sum()
    }

    /// Upper bound (ns) of the histogram bucket holding the `p`-th percentile (0..=100),
    /// or None when nothing completed.
    pub fn latency_percentile_ns(&self, p: f64) -> Option<u64> {
        let total: u64 = self.latency_log2_ns.iter().sum();
        if total == 0 {
            return None;
        }
        let rank = ((p / 100.0) * total as f64).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, n) in self.latency_log2_ns.iter().enumerate() {
            seen += n;
            if seen >= rank {
                return Some(1u64 << (i + 1).min(63));
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_per_kind_and_histogram() {
        let c = DiskCounters::default();
        for _ in 0..3 {
            c.record_start();
        }
        c.record_completion(RequestKind::Read, Ok(4096), 1500);
        c.record_completion(RequestKind::Write, Ok(512), 3_000_000);
        let s = c.snapshot();
        assert_eq!(
            s.read,
            KindSnapshot {
                ops: 1,
                bytes: 4096,
                errors: 0
            }
        );
        assert_eq!(s.write.bytes, 512);
        assert_eq!(s.in_flight, 1);
        c.record_completion(RequestKind::Discard, Err(()), 0);
        let s = c.snapshot();
        assert_eq!(s.discard.errors, 1);
        assert_eq!(s.errors(), 1);
        assert_eq!(s.in_flight, 0);
        // 1500 ns -> bucket 10 ([1024, 2048)), 3 ms -> bucket 21, 0 -> bucket 0.
        assert_eq!(s.latency_log2_ns[10], 1);
        assert_eq!(s.latency_log2_ns[21], 1);
        assert_eq!(s.latency_log2_ns[0], 1);
        assert_eq!(s.latency_percentile_ns(50.0), Some(2048));
        assert_eq!(s.latency_percentile_ns(100.0), Some(1 << 22));
    }

    #[test]
    fn counters_are_shared_across_threads_without_loss() {
        let c = std::sync::Arc::new(DiskCounters::default());
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let c = c.clone();
                std::thread::spawn(move || {
                    for _ in 0..10_000 {
                        c.record_start();
                        c.record_completion(RequestKind::Read, Ok(1), 100);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let s = c.snapshot();
        assert_eq!(s.read.ops, 40_000);
        assert_eq!(s.read.bytes, 40_000);
        assert_eq!(s.in_flight, 0);
    }
}
