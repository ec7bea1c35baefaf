//! The results of a benchmark: every run of every cell, the medians and spreads, the
//! ratios against the peers, and the JSON that holds them all.

// Statistics for the report: figures far below 2^53.
#![allow(
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    clippy::cast_precision_loss
)]

use std::path::PathBuf;

use serde_json::{Value, json};

use super::contenders::{Contender, Server};
use super::engine::LoadResult;
use super::host::HostInfo;
use super::pattern::Pattern;
use super::workload::NamedWorkload;
use crate::contender::version_number;

/// The figures of one run.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RunRecord {
    /// I/O operations per second.
    pub iops: f64,
    /// Throughput in MiB/s.
    pub mib_s: f64,
    /// Median completion latency, microseconds.
    pub p50_us: f64,
    /// 99th percentile completion latency, microseconds.
    pub p99_us: f64,
    /// CPU microseconds the server process spent per I/O (None without a server).
    pub cpu_us_per_io: Option<f64>,
    /// Requests completed in the measured window.
    pub ios: u64,
    /// Length of the measured window, seconds.
    pub seconds: f64,
}

impl RunRecord {
    /// The record of one load run with requests of `block_size` bytes.
    pub fn new(r: &LoadResult, block_size: usize) -> RunRecord {
        RunRecord {
            iops: r.figures.iops,
            mib_s: r.figures.iops * block_size as f64 / f64::from(1 << 20),
            p50_us: r.figures.p50_us,
            p99_us: r.figures.p99_us,
            cpu_us_per_io: r.cpu.map(|c| c.as_secs_f64() * 1e6 / r.ios.max(1) as f64),
            ios: r.ios,
            seconds: r.seconds,
        }
    }
}

/// Medians of a cell's runs, each figure on its own.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Summary {
    /// Median IOPS.
    pub iops: f64,
    /// Median MiB/s.
    pub mib_s: f64,
    /// Median of the runs' p50 latencies, microseconds.
    pub p50_us: f64,
    /// Median of the runs' p99 latencies, microseconds.
    pub p99_us: f64,
    /// Median CPU microseconds per I/O (None without a server).
    pub cpu_us_per_io: Option<f64>,
    /// Run-to-run spread: the highest IOPS over the lowest (1 for a single run; None
    /// when a run moved no I/O).
    pub spread: Option<f64>,
}

/// One workload on one contender.
#[derive(Clone, Debug)]
pub struct Cell {
    /// The workload.
    pub workload: NamedWorkload,
    /// The contender.
    pub contender: Contender,
    /// The client pattern (always batch for the host io_uring limit).
    pub pattern: Pattern,
    /// Every successful run, in order.
    pub runs: Vec<RunRecord>,
    /// What went wrong in the runs that failed.
    pub errors: Vec<String>,
}

impl Cell {
    /// The medians of the runs (None when no run succeeded).
    pub fn summary(&self) -> Option<Summary> {
        if self.runs.is_empty() {
            return None;
        }
        let m = |f: fn(&RunRecord) -> f64| median(self.runs.iter().map(f).collect());
        let cpu: Vec<f64> = self.runs.iter().filter_map(|r| r.cpu_us_per_io).collect();
        Some(Summary {
            iops: m(|r| r.iops)?,
            mib_s: m(|r| r.mib_s)?,
            p50_us: m(|r| r.p50_us)?,
            p99_us: m(|r| r.p99_us)?,
            cpu_us_per_io: median(cpu),
            spread: spread(self.runs.iter().map(|r| r.iops)),
        })
    }
}

/// The highest value over the lowest; None when there is none or the lowest is not
/// above zero.
pub fn spread(values: impl IntoIterator<Item = f64>) -> Option<f64> {
    let (lo, hi) = values
        .into_iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
            (lo.min(v), hi.max(v))
        });
    (lo > 0.0 && hi.is_finite()).then(|| hi / lo)
}

/// The median (mean of the middle two for an even count); None when empty.
pub fn median(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

/// Which peer a ratio compares against.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PeerKind {
    /// qemu-storage-daemon (its best engine on the file, null-co on null).
    Qsd,
    /// Host io_uring on the file.
    Limit,
}

impl PeerKind {
    /// `qsd` or `limit`.
    pub fn as_str(self) -> &'static str {
        match self {
            PeerKind::Qsd => "qsd",
            PeerKind::Limit => "limit",
        }
    }
}

/// Ours against a peer on one workload, from the medians.
#[derive(Clone, Debug, PartialEq)]
pub struct Ratio {
    /// Workload name.
    pub workload: &'static str,
    /// The client pattern of our run and of the qsd peer's.
    pub pattern: Pattern,
    /// Our contender.
    pub ours: &'static str,
    /// The peer contender.
    pub peer: &'static str,
    /// What kind of peer.
    pub kind: PeerKind,
    /// Our median IOPS over the peer's (above 1: we are faster).
    pub iops: f64,
    /// Our median p50 latency over the peer's (below 1: we answer sooner).
    pub p50: f64,
}

/// Every ratio the cells allow: each of our nbd contenders against qsd's, each of our file
/// contenders against qsd's best file
/// contender (by median IOPS) with the same client pattern and against the limit (which
/// always batches), and ours-null against qsd-null with the same pattern.
pub fn ratios(cells: &[Cell]) -> Vec<Ratio> {
    let mut out = Vec::new();
    let mut workloads: Vec<&'static str> = Vec::new();
    for c in cells {
        if !workloads.contains(&c.workload.name) {
            workloads.push(c.workload.name);
        }
    }
    for w in workloads {
        let here: Vec<(&Cell, Summary)> = cells
            .iter()
            .filter(|c| c.workload.name == w)
            .filter_map(|c| c.summary().map(|s| (c, s)))
            .collect();
        let best = |storage: &str, server: Server, pattern: Option<Pattern>| {
            here.iter()
                .filter(|(c, _)| {
                    c.contender.server == server && c.contender.storage_name() == storage
                })
                .filter(|(c, _)| pattern.is_none_or(|p| c.pattern == p))
                .max_by(|a, b| a.1.iops.total_cmp(&b.1.iops))
        };
        for (ours, s) in here
            .iter()
            .filter(|(c, _)| c.contender.server == Server::Ours)
        {
            let storage = ours.contender.storage_name();
            let pattern = ours.pattern;
            let mut peers = vec![(PeerKind::Qsd, best(storage, Server::Qsd, Some(pattern)))];
            if storage == "file" {
                peers.push((PeerKind::Limit, best("file", Server::Host, None)));
            }
            for (kind, peer) in peers {
                if let Some((p, ps)) = peer {
                    out.push(Ratio {
                        workload: w,
                        pattern,
                        ours: ours.contender.name,
                        peer: p.contender.name,
                        kind,
                        iops: s.iops / ps.iops,
                        p50: s.p50_us / ps.p50_us,
                    });
                }
            }
        }
    }
    out
}

/// How the benchmark was run.
#[derive(Clone, Debug)]
pub struct Settings {
    /// The benchmark file.
    pub file: PathBuf,
    /// Its length in bytes.
    pub size: u64,
    /// Size of the null backends in bytes.
    pub null_size: u64,
    /// Measured seconds per run.
    pub runtime_s: f64,
    /// Warm-up seconds before each measured window.
    pub warmup_s: f64,
    /// Runs per cell.
    pub repeat: usize,
    /// Whether `--quick` chose the defaults.
    pub quick: bool,
    /// The client patterns the vhost-user contenders ran with.
    pub patterns: Vec<Pattern>,
    /// Our binary.
    pub ours: PathBuf,
    /// qemu-storage-daemon, when found.
    pub qsd: Option<PathBuf>,
    /// Its version line (`qemu-storage-daemon version 10.0.2 (...)`).
    pub qsd_version: Option<String>,
    /// Settings of our iothread.
    pub iothread: Option<String>,
}

/// Everything one benchmark produced.
#[derive(Clone, Debug)]
pub struct Report {
    /// The host.
    pub host: HostInfo,
    /// How it ran.
    pub settings: Settings,
    /// The workloads measured, in order.
    pub workloads: Vec<NamedWorkload>,
    /// The contenders asked for, in order (skipped ones included).
    pub contenders: Vec<Contender>,
    /// Contenders not run, with the reason.
    pub skipped: Vec<(&'static str, String)>,
    /// Every cell, workload-major in table order.
    pub cells: Vec<Cell>,
}

impl Report {
    /// The cells that have no successful run.
    pub fn failed(&self) -> impl Iterator<Item = &Cell> {
        self.cells.iter().filter(|c| c.runs.is_empty())
    }

    /// Every figure as JSON.
    pub fn to_json(&self) -> Value {
        let s = &self.settings;
        let summary = |x: Option<Summary>| match x {
            Some(m) => json!({
                "iops": m.iops, "mib_s": m.mib_s, "p50_us": m.p50_us, "p99_us": m.p99_us,
                "cpu_us_per_io": m.cpu_us_per_io,
            }),
            None => Value::Null,
        };
        let cells: Vec<Value> = self
            .cells
            .iter()
            .map(|c| {
                let pattern = c.pattern.as_str();
                let version = match c.contender.server {
                    Server::Qsd => s.qsd_version.as_deref(),
                    _ => None,
                };
                json!({
                    "workload": c.workload.name,
                    "contender": c.contender.name,
                    "pattern": pattern,
                    "storage": c.contender.storage_name(),
                    "server_version": version,
                    "median": summary(c.summary()),
                    "spread": c.summary().and_then(|m| m.spread),
                    "runs": c.runs.iter().map(|r| json!({
                        "pattern": pattern,
                        "iops": r.iops, "mib_s": r.mib_s, "p50_us": r.p50_us,
                        "p99_us": r.p99_us, "cpu_us_per_io": r.cpu_us_per_io,
                        "ios": r.ios, "seconds": r.seconds,
                    })).collect::<Vec<_>>(),
                    "errors": c.errors,
                })
            })
            .collect();
        json!({
            "tool": "blkbench",
            "host": {
                "kernel": self.host.kernel, "cpu_model": self.host.cpu_model,
                "nproc": self.host.nproc, "date": self.host.date,
            },
            "settings": {
                "file": s.file, "size": s.size, "null_size": s.null_size,
                "runtime_s": s.runtime_s,
                "warmup_s": s.warmup_s, "repeat": s.repeat, "quick": s.quick,
                "patterns": s.patterns.iter().map(|p| p.as_str()).collect::<Vec<_>>(),
                "ours": s.ours, "qsd": s.qsd, "qsd_version": s.qsd_version,
                "qsd_version_number": s.qsd_version.as_deref().and_then(version_number),
                "iothread": s.iothread, "client": "libblkio virtio-blk-vhost-user",
                "median": "each figure's median over the runs",
                "spread": "highest IOPS over the lowest among the runs",
                "limit_pattern": "batch",
            },
            "workloads": self.workloads.iter().map(|w| json!({
                "name": w.name, "label": w.workload.label(), "random": w.workload.random,
                "write": w.workload.write, "block_size": w.workload.block_size,
                "iodepth": w.workload.iodepth, "queues": w.workload.queues,
            })).collect::<Vec<_>>(),
            "contenders": self.contenders.iter().map(|c| c.name).collect::<Vec<_>>(),
            "skipped": self.skipped.iter().map(|(c, why)| json!({"contender": c, "reason": why}))
                .collect::<Vec<_>>(),
            "cells": cells,
            "ratios": ratios(&self.cells).iter().map(|r| json!({
                "workload": r.workload, "pattern": r.pattern.as_str(), "ours": r.ours, "peer": r.peer, "kind": r.kind.as_str(),
                "iops": r.iops, "p50": r.p50,
            })).collect::<Vec<_>>(),
        })
    }
}

/// Values for the reporting tests (of this module and of the table).
#[cfg(test)]
pub(crate) mod fixtures {
    use super::*;
    use crate::bench::{contenders, workload};

    /// A cell of `c` on workload `w` with one run per figure in `iops`.
    pub(crate) fn cell(w: &str, c: &str, pattern: Pattern, iops: &[f64]) -> Cell {
        Cell {
            workload: workload::by_name(w).unwrap(),
            contender: contenders::by_name(c).unwrap(),
            pattern,
            runs: iops
                .iter()
                .map(|&iops| RunRecord {
                    iops,
                    mib_s: iops / 256.0,
                    p50_us: 1e6 / iops,
                    p99_us: 2e6 / iops,
                    cpu_us_per_io: Some(1.0),
                    ios: iops as u64,
                    seconds: 1.0,
                })
                .collect(),
            errors: Vec::new(),
        }
    }

    /// Settings of a 2-run benchmark with both patterns against qsd `qsd` of `version`.
    pub(crate) fn settings(qsd: &str, version: &str) -> Settings {
        Settings {
            file: "/var/tmp/x.raw".into(),
            size: 1 << 20,
            null_size: 1 << 20,
            runtime_s: 1.0,
            warmup_s: 0.0,
            repeat: 2,
            quick: false,
            patterns: vec![Pattern::Batch, Pattern::Resubmit],
            ours: "vhost-user-blk".into(),
            qsd: Some(qsd.into()),
            qsd_version: Some(version.into()),
            iothread: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::{contenders, workload};

    fn cell(w: &str, c: &str, iops: &[f64]) -> Cell {
        fixtures::cell(w, c, Pattern::Batch, iops)
    }

    #[test]
    fn medians() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), Some(2.5));
        assert_eq!(median(vec![]), None);
        let s = cell("randread-4k-qd1", "limit", &[10.0, 30.0, 20.0])
            .summary()
            .unwrap();
        assert_eq!(s.iops, 20.0);
        assert_eq!(s.p50_us, 1e6 / 20.0);
        assert_eq!(s.spread, Some(3.0));
    }

    #[test]
    fn spreads() {
        assert_eq!(spread([5.0]), Some(1.0));
        assert_eq!(spread([4.0, 5.0, 2.0]), Some(2.5));
        assert_eq!(spread([]), None);
        assert_eq!(spread([0.0, 5.0]), None);
    }

    #[test]
    fn ratios_compare_within_a_pattern_and_against_the_batch_limit() {
        let w = "randread-4k-qd32";
        let cells = vec![
            cell(w, "limit", &[200.0]),
            cell(w, "ours-null", &[300.0]),
            cell(w, "qsd-null", &[100.0]),
            cell(w, "ours-io_uring", &[100.0]),
            fixtures::cell(w, "ours-io_uring", Pattern::Resubmit, &[150.0]),
            fixtures::cell(w, "ours-null", Pattern::Resubmit, &[400.0]),
            fixtures::cell(w, "qsd-null", Pattern::Resubmit, &[50.0]),
        ];
        let r = ratios(&cells);
        let find = |ours: &str, pattern, kind| {
            r.iter()
                .find(|x| x.ours == ours && x.pattern == pattern && x.kind == kind)
                .map(|x| (x.peer, x.iops))
        };
        let (b, s) = (Pattern::Batch, Pattern::Resubmit);
        assert_eq!(find("ours-null", b, PeerKind::Qsd), Some(("qsd-null", 3.0)));
        assert_eq!(find("ours-null", s, PeerKind::Qsd), Some(("qsd-null", 8.0)));
        assert_eq!(
            find("ours-io_uring", s, PeerKind::Limit),
            Some(("limit", 0.75))
        );
        assert_eq!(find("ours-io_uring", s, PeerKind::Qsd), None);
        assert_eq!(r.len(), 4);
    }

    #[test]
    fn json_records_patterns_spreads_and_the_qsd_version() {
        let w = "randread-4k-qd32";
        let report = Report {
            host: HostInfo::probe(),
            settings: fixtures::settings(
                "qemu-storage-daemon",
                "qemu-storage-daemon version 10.0.2 (Debian)",
            ),
            workloads: vec![workload::by_name(w).unwrap()],
            contenders: vec![contenders::by_name("ours-null").unwrap()],
            skipped: Vec::new(),
            cells: vec![
                cell(w, "ours-null", &[100.0, 125.0]),
                fixtures::cell(w, "qsd-null", Pattern::Resubmit, &[50.0, 50.0]),
            ],
        };
        let j = report.to_json();
        assert_eq!(j["settings"]["qsd_version_number"], "10.0.2");
        assert_eq!(j["settings"]["patterns"], json!(["batch", "resubmit"]));
        let cells = &j["cells"];
        assert_eq!(cells[0]["pattern"], "batch");
        assert_eq!(cells[0]["runs"][1]["pattern"], "batch");
        assert_eq!(cells[0]["spread"], 1.25);
        assert!(cells[0]["server_version"].is_null());
        assert_eq!(cells[1]["pattern"], "resubmit");
        assert_eq!(cells[1]["spread"], 1.0);
        assert_eq!(
            cells[1]["server_version"],
            "qemu-storage-daemon version 10.0.2 (Debian)"
        );
    }

    #[test]
    fn ratios_pick_the_best_qsd_engine_and_the_limit() {
        let w = "randread-4k-qd32";
        let cells = vec![
            cell(w, "limit", &[200.0]),
            cell(w, "ours-io_uring", &[100.0]),
            cell(w, "qsd-io_uring", &[40.0]),
            cell(w, "qsd-native", &[50.0]),
            cell(w, "ours-null", &[300.0]),
            cell(w, "qsd-null", &[100.0]),
        ];
        let r = ratios(&cells);
        let find = |ours: &str, kind| r.iter().find(|x| x.ours == ours && x.kind == kind);
        let q = find("ours-io_uring", PeerKind::Qsd).unwrap();
        assert_eq!((q.peer, q.iops, q.p50), ("qsd-native", 2.0, 0.5));
        let l = find("ours-io_uring", PeerKind::Limit).unwrap();
        assert_eq!((l.peer, l.iops), ("limit", 0.5));
        let n = find("ours-null", PeerKind::Qsd).unwrap();
        assert_eq!((n.peer, n.iops), ("qsd-null", 3.0));
        assert!(find("ours-null", PeerKind::Limit).is_none());
        assert_eq!(r.len(), 3);
    }

    #[test]
    fn failed_cells_have_no_median_and_no_ratio() {
        let w = "randread-4k-qd1";
        let cells = vec![cell(w, "ours-native", &[]), cell(w, "qsd-native", &[5.0])];
        assert!(cells[0].summary().is_none());
        assert!(ratios(&cells).is_empty());
    }
}
