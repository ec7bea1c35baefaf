//! What the benchmark ran on: kernel, CPU model, CPU count and the date, for the JSON.

#![allow(clippy::cast_possible_wrap)] // Calendar arithmetic on the current date.

use std::time::{SystemTime, UNIX_EPOCH};

/// The host a result came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostInfo {
    /// Kernel release (`uname -r`).
    pub kernel: String,
    /// CPU model name from /proc/cpuinfo.
    pub cpu_model: String,
    /// CPUs this process may run on.
    pub nproc: usize,
    /// When the benchmark started, UTC, ISO 8601.
    pub date: String,
}

impl HostInfo {
    /// Reads the host's details now.
    pub fn probe() -> HostInfo {
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|_| "unknown".into());
        let cpu_model = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("model name"))
                    .and_then(|l| l.split_once(':'))
                    .map(|(_, v)| v.trim().to_string())
            })
            .unwrap_or_else(|| "unknown".into());
        let nproc = std::thread::available_parallelism().map_or(1, |n| n.get());
        let secs = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        HostInfo {
            kernel,
            cpu_model,
            nproc,
            date: iso8601(secs),
        }
    }
}

/// Seconds since the epoch as `YYYY-MM-DDTHH:MM:SSZ`.
pub fn iso8601(secs: u64) -> String {
    format!("{}Z", block::utc::UtcTime::from_epoch_secs(secs).iso8601())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates() {
        assert_eq!(iso8601(0), "1970-01-01T00:00:00Z");
        assert_eq!(iso8601(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(iso8601(1_735_689_599), "2024-12-31T23:59:59Z");
    }

    #[test]
    fn probe_fills_every_field() {
        let h = HostInfo::probe();
        assert!(h.nproc >= 1);
        assert!(!h.kernel.is_empty() && h.date.ends_with('Z'));
    }
}
