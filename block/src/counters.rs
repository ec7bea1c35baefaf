//! Per-disk I/O counters, updated on the hot path without locks: each queue writes its own
//! [`QueueCounters`] (plain stores), summed with the disk's into a snapshot.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use crate::queue::RequestKind;
use crate::sync::lock;

/// Buckets of the latency histogram: bucket `i` counts latencies in `[2^i, 2^(i+1))` ns.
pub const LATENCY_BUCKETS: usize = 40;

/// Ops, bytes and errors of one request kind.
#[derive(Debug, Default)]
struct KindCounters {
    ops: AtomicU64,
    bytes: AtomicU64,
    errors: AtomicU64,
}

/// One set of counters. [`DiskCounters`] has one updated by anyone (atomic adds) and one
/// per [`QueueCounters`], each updated by its queue's thread alone (plain stores, no
/// locked instructions on the I/O path, no cache line shared between queues).
#[derive(Debug)]
struct Counts {
    kinds: [KindCounters; 5],
    submitted: AtomicU64,
    completed: AtomicU64,
    throttled_ns: AtomicU64,
    latency: [AtomicU64; LATENCY_BUCKETS],
}

impl Default for Counts {
    fn default() -> Self {
        Counts {
            kinds: Default::default(),
            submitted: AtomicU64::new(0),
            completed: AtomicU64::new(0),
            throttled_ns: AtomicU64::new(0),
            latency: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }
}

/// Adds `n` to a counter: an atomic add when several threads may write it, a load and a
/// store when only one does (`owned`).
fn bump(c: &AtomicU64, n: u64, owned: bool) {
    if owned {
        c.store(c.load(Relaxed).wrapping_add(n), Relaxed);
    } else {
        c.fetch_add(n, Relaxed);
    }
}

impl Counts {
    fn record_start(&self, owned: bool) {
        bump(&self.submitted, 1, owned);
    }

    fn record_completion(
        &self,
        kind: RequestKind,
        result: Result<u64, ()>,
        latency_ns: u64,
        owned: bool,
    ) {
        let k = &self.kinds[kind as usize];
        match result {
            Ok(bytes) => {
                bump(&k.ops, 1, owned);
                bump(&k.bytes, bytes, owned);
            }
            Err(()) => bump(&k.errors, 1, owned),
        }
        bump(&self.latency[latency_bucket(latency_ns)], 1, owned);
        bump(&self.completed, 1, owned);
    }

    /// Adds every counter of `self` into `into` (atomic adds).
    fn add_to(&self, into: &Counts) {
        for (a, b) in self.kinds.iter().zip(&into.kinds) {
            b.ops.fetch_add(a.ops.load(Relaxed), Relaxed);
            b.bytes.fetch_add(a.bytes.load(Relaxed), Relaxed);
            b.errors.fetch_add(a.errors.load(Relaxed), Relaxed);
        }
        into.submitted
            .fetch_add(self.submitted.load(Relaxed), Relaxed);
        into.completed
            .fetch_add(self.completed.load(Relaxed), Relaxed);
        into.throttled_ns
            .fetch_add(self.throttled_ns.load(Relaxed), Relaxed);
        for (a, b) in self.latency.iter().zip(&into.latency) {
            b.fetch_add(a.load(Relaxed), Relaxed);
        }
    }
}

/// Counters of one disk, shared by all its queues (which may run on different threads).
#[derive(Debug, Default)]
pub struct DiskCounters {
    counts: Counts,
    /// The counters of live queues, summed into snapshots.
    queues: Mutex<Vec<Arc<Counts>>>,
}

/// The counters one queue of a disk writes, from one thread at a time; they count in the
/// disk's [`DiskCounters`] (and are folded into it when dropped).
#[derive(Debug)]
pub(crate) struct QueueCounters {
    disk: Arc<DiskCounters>,
    counts: Arc<Counts>,
}

impl QueueCounters {
    /// Counters of a new queue of `disk`.
    pub(crate) fn new(disk: Arc<DiskCounters>) -> Self {
        let counts = Arc::new(Counts::default());
        lock(&disk.queues).push(counts.clone());
        QueueCounters { disk, counts }
    }

    /// The disk's counters.
    pub(crate) fn disk(&self) -> &Arc<DiskCounters> {
        &self.disk
    }

    /// Counts a request entering the disk.
    pub(crate) fn record_start(&self) {
        self.counts.record_start(true);
    }

    /// As [`DiskCounters::record_completion`].
    pub(crate) fn record_completion(
        &self,
        kind: RequestKind,
        result: Result<u64, ()>,
        latency_ns: u64,
    ) {
        self.counts
            .record_completion(kind, result, latency_ns, true);
    }

    /// Adds time requests spent waiting for the throttle.
    pub(crate) fn add_throttled_ns(&self, ns: u64) {
        bump(&self.counts.throttled_ns, ns, true);
    }
}

impl Drop for QueueCounters {
    fn drop(&mut self) {
        let mut queues = lock(&self.disk.queues);
        queues.retain(|c| !Arc::ptr_eq(c, &self.counts));
        // Under the lock, so no snapshot sees the counts twice or not at all.
        self.counts.add_to(&self.disk.counts);
    }
}

impl DiskCounters {
    /// Counts a request entering the disk.
    pub fn record_start(&self) {
        self.counts.record_start(false);
    }

    /// Counts a finished request: `bytes` moved on success, an error otherwise, and its
    /// latency in nanoseconds.
    pub fn record_completion(&self, kind: RequestKind, result: Result<u64, ()>, latency_ns: u64) {
        self.counts
            .record_completion(kind, result, latency_ns, false);
    }

    /// Adds time requests spent waiting for the throttle.
    pub fn add_throttled_ns(&self, ns: u64) {
        self.counts.throttled_ns.fetch_add(ns, Relaxed);
    }

    /// Requests submitted so far, over every queue (cheaper than a snapshot: a block
    /// job that yields to the guest watches it move).
    pub fn submitted(&self) -> u64 {
        let queues = lock(&self.queues);
        self.counts.submitted.load(Relaxed)
            + queues
                .iter()
                .map(|q| q.submitted.load(Relaxed))
                .sum::<u64>()
    }

    /// A copy of every counter (the disk's plus its live queues').
    pub fn snapshot(&self) -> CountersSnapshot {
        let total = Counts::default();
        {
            let queues = lock(&self.queues);
            self.counts.add_to(&total);
            for q in queues.iter() {
                q.add_to(&total);
            }
        }
        let kind = |k: RequestKind| {
            let c = &total.kinds[k as usize];
            KindSnapshot {
                ops: c.ops.load(Relaxed),
                bytes: c.bytes.load(Relaxed),
                errors: c.errors.load(Relaxed),
            }
        };
        let completed = total.completed.load(Relaxed);
        let submitted = total.submitted.load(Relaxed);
        CountersSnapshot {
            read: kind(RequestKind::Read),
            write: kind(RequestKind::Write),
            flush: kind(RequestKind::Flush),
            discard: kind(RequestKind::Discard),
            write_zeroes: kind(RequestKind::WriteZeroes),
            in_flight: submitted.saturating_sub(completed),
            throttled_ns: total.throttled_ns.load(Relaxed),
            latency_log2_ns: total.latency.iter().map(|b| b.load(Relaxed)).collect(),
        }
    }
}

fn latency_bucket(ns: u64) -> usize {
    let bucket = 63 - ns.max(1).leading_zeros() as usize;
    bucket.min(LATENCY_BUCKETS - 1)
}

/// Ops, bytes and errors of one request kind, as read at one moment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
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
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
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
        // A percentile of a count: the f64 product is at least 1 and `as` saturates, and
        // counts beyond 2^53 lose only low bits that a log2 histogram cannot resolve.
        #[allow(
            clippy::cast_precision_loss,
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss
        )]
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

    #[test]
    fn queue_counters_count_in_the_disk_while_live_and_after_drop() {
        let disk = std::sync::Arc::new(DiskCounters::default());
        let q1 = QueueCounters::new(disk.clone());
        let q2 = QueueCounters::new(disk.clone());
        q1.record_start();
        q1.record_completion(RequestKind::Read, Ok(4096), 1500);
        q2.record_start();
        q2.record_start();
        q2.record_completion(RequestKind::Write, Err(()), 3_000_000);
        q2.add_throttled_ns(7);
        disk.record_start();
        let s = disk.snapshot();
        assert_eq!(s.read.bytes, 4096);
        assert_eq!(s.write.errors, 1);
        assert_eq!(s.in_flight, 2);
        assert_eq!(s.throttled_ns, 7);
        assert_eq!(s.latency_log2_ns[10], 1);
        drop(q2);
        drop(q1);
        assert_eq!(
            disk.snapshot(),
            s,
            "dropped queues keep counting in the disk"
        );
        assert!(lock(&disk.queues).is_empty());
    }
}
