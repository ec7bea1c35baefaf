//! Latency samples and their percentiles.

// Percentiles over latency samples far below 2^53.
#![allow(
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    clippy::cast_precision_loss
)]

/// What one measurement found.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Figures {
    /// I/O operations per second.
    pub iops: f64,
    /// Median completion latency in microseconds.
    pub p50_us: f64,
    /// 99th percentile completion latency in microseconds.
    pub p99_us: f64,
}

impl Figures {
    /// The run with the median IOPS of `runs` (None when empty).
    pub fn median(mut runs: Vec<Figures>) -> Option<Figures> {
        runs.sort_by(|a, b| a.iops.total_cmp(&b.iops));
        runs.get(runs.len() / 2).copied()
    }
}

/// Collected latencies in nanoseconds.
#[derive(Debug, Default)]
pub struct Latencies(Vec<u64>);

impl Latencies {
    /// An empty set with room for `n` samples.
    pub fn with_capacity(n: usize) -> Self {
        Latencies(Vec::with_capacity(n))
    }

    /// Adds one sample.
    pub fn push(&mut self, ns: u64) {
        self.0.push(ns);
    }

    /// Adds every sample of `other`.
    pub fn extend(&mut self, other: Latencies) {
        self.0.extend(other.0);
    }

    /// Number of samples.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether there are no samples.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The `p`-th percentile (0..=100) in microseconds, by nearest rank.
    pub fn percentile_us(&mut self, p: f64) -> f64 {
        if self.0.is_empty() {
            return 0.0;
        }
        self.0.sort_unstable();
        let rank = ((p / 100.0) * self.0.len() as f64).ceil() as usize;
        self.0[rank.clamp(1, self.0.len()) - 1] as f64 / 1000.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_run() {
        let f = |iops| Figures {
            iops,
            p50_us: iops / 10.0,
            p99_us: 0.0,
        };
        assert_eq!(Figures::median(vec![f(3.0), f(1.0), f(2.0)]), Some(f(2.0)));
        assert_eq!(Figures::median(vec![]), None);
    }

    #[test]
    fn nearest_rank() {
        let mut l = Latencies::default();
        for ns in [5000, 1000, 3000, 2000, 4000] {
            l.push(ns);
        }
        assert_eq!(l.percentile_us(50.0), 3.0);
        assert_eq!(l.percentile_us(99.0), 5.0);
        assert_eq!(l.percentile_us(0.0), 1.0);
    }
}
