//! The text table `blkbench` prints: one line per cell (a contender with a client
//! pattern), grouped by workload, with the run-to-run spread and the ratios on our rows.

use std::fmt::Write;

use super::contenders::Server;
use super::report::{PeerKind, Report, ratios};

/// The whole table, header lines included.
pub fn render(report: &Report) -> String {
    let s = &report.settings;
    let h = &report.host;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "blkbench: libblkio virtio-blk-vhost-user client; {} s per run after {} s warm-up; \
         median of {} run(s), contenders interleaved",
        s.runtime_s, s.warmup_s, s.repeat
    );
    if report.cells.iter().any(|c| c.contender.uses_file()) {
        let _ = write!(
            out,
            "file {} ({} MiB, O_DIRECT); ",
            s.file.display(),
            s.size >> 20
        );
    }
    let _ = writeln!(
        out,
        "{}; kernel {}; {} CPUs; {}",
        h.cpu_model, h.kernel, h.nproc, h.date
    );
    let _ = writeln!(
        out,
        "ours/qsd: against qsd's best engine (file), qsd-null (null) or qsd-nbd (nbd: both \
         NBD clients of one qemu-nbd on the file); ours/limit: against \
         host io_uring on the file; CPU: server process, us per I/O"
    );
    let _ = writeln!(
        out,
        "pattern: batch = reap up to QD completions per do_io, send their replacements \
         together; resubmit = reap one, send its replacement at the next do_io (fio's \
         default); limit (host io_uring) batches only"
    );
    let _ = writeln!(
        out,
        "spread: highest IOPS over the lowest of the {} run(s)",
        s.repeat
    );
    if report
        .cells
        .iter()
        .any(|c| c.contender.server == Server::Qsd)
    {
        let _ = writeln!(
            out,
            "qsd-* rows: {}, {}",
            s.qsd_version
                .as_deref()
                .unwrap_or("qemu-storage-daemon of unknown version"),
            s.qsd
                .as_deref()
                .map_or(String::new(), |p| p.display().to_string())
        );
    }
    for (c, why) in &report.skipped {
        let _ = writeln!(out, "skipped {c}: {why}");
    }
    let _ = writeln!(
        out,
        "\n{:<22} {:<14} {:<8} {:>9} {:>6} {:>8} {:>8} {:>8} {:>9} {:>8} {:>10}",
        "workload",
        "contender",
        "pattern",
        "IOPS",
        "spread",
        "MiB/s",
        "p50 us",
        "p99 us",
        "CPU us/IO",
        "ours/qsd",
        "ours/limit"
    );
    let ratios = ratios(&report.cells);
    let mut last = "";
    for cell in &report.cells {
        let label = if cell.workload.name == last {
            String::new()
        } else {
            cell.workload.workload.label()
        };
        last = cell.workload.name;
        let Some(m) = cell.summary() else {
            let why = cell.errors.first().map_or("no run", String::as_str);
            let _ = writeln!(
                out,
                "{label:<22} {:<14} {:<8} failed: {why}",
                cell.contender.name,
                cell.pattern.as_str()
            );
            continue;
        };
        let ratio = |kind| {
            ratios
                .iter()
                .find(|r| {
                    r.workload == cell.workload.name
                        && r.pattern == cell.pattern
                        && r.ours == cell.contender.name
                        && r.kind == kind
                })
                .map_or(String::new(), |r| format!("{:.2}", r.iops))
        };
        let (to_qsd, to_limit) = if cell.contender.server == Server::Ours {
            (ratio(PeerKind::Qsd), ratio(PeerKind::Limit))
        } else {
            (String::new(), String::new())
        };
        let cpu = m
            .cpu_us_per_io
            .map_or("-".to_string(), |c| format!("{c:.2}"));
        let spread = m.spread.map_or("-".to_string(), |x| format!("{x:.2}"));
        let _ = writeln!(
            out,
            "{label:<22} {:<14} {:<8} {:>9.0} {:>6} {:>8.1} {:>8.1} {:>8.1} {:>9} {:>8} {:>10}",
            cell.contender.name,
            cell.pattern.as_str(),
            m.iops,
            spread,
            m.mib_s,
            m.p50_us,
            m.p99_us,
            cpu,
            to_qsd,
            to_limit
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::host::HostInfo;
    use crate::bench::pattern::Pattern;
    use crate::bench::report::{Cell, fixtures};
    use crate::bench::workload;

    fn cell(c: &str, pattern: Pattern, iops: &[f64]) -> Cell {
        fixtures::cell("randread-4k-qd32", c, pattern, iops)
    }

    #[test]
    fn rows_show_pattern_spread_and_the_qsd_version() {
        let report = Report {
            host: HostInfo::probe(),
            settings: fixtures::settings(
                "/q/qemu-storage-daemon",
                "qemu-storage-daemon version 10.0.2",
            ),
            workloads: vec![workload::by_name("randread-4k-qd32").unwrap()],
            contenders: Vec::new(),
            skipped: Vec::new(),
            cells: vec![
                cell("ours-null", Pattern::Batch, &[300.0, 330.0]),
                cell("qsd-null", Pattern::Batch, &[100.0, 100.0]),
                cell("ours-null", Pattern::Resubmit, &[200.0, 200.0]),
                cell("qsd-null", Pattern::Resubmit, &[50.0, 50.0]),
            ],
        };
        let t = render(&report);
        assert!(
            t.contains("qsd-* rows: qemu-storage-daemon version 10.0.2, /q/qemu-storage-daemon"),
            "{t}"
        );
        let row = |c: &str, p: &str| {
            t.lines()
                .find(|l| l.contains(c) && l.contains(p))
                .unwrap_or_else(|| panic!("no {c} {p} row in\n{t}"))
                .split_whitespace()
                .map(str::to_string)
                .collect::<Vec<_>>()
        };
        let head = row("contender", "pattern");
        assert_eq!(
            head[..5],
            ["workload", "contender", "pattern", "IOPS", "spread"]
        );
        // The first row carries the workload's label (4 words) before the contender.
        let ours = row("ours-null", "batch");
        assert_eq!(ours[4..8], ["ours-null", "batch", "315", "1.10"]);
        assert_eq!(ours.last().unwrap(), "3.15");
        let ours = row("ours-null", "resubmit");
        assert_eq!(ours[..4], ["ours-null", "resubmit", "200", "1.00"]);
        assert_eq!(ours.last().unwrap(), "4.00");
        assert_eq!(
            row("qsd-null", "resubmit").len(),
            8,
            "no ratios on qsd rows"
        );
    }
}
