//! The text table `blkbench` prints: one line per cell, grouped by workload, with the
//! ratios on our rows.

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
    if report.cells.iter().any(|c| c.contender.is_file()) {
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
        "ours/qsd: against qsd's best engine (file) or qsd-null (null); ours/limit: against \
         host io_uring on the file; CPU: server process, us per I/O"
    );
    for (c, why) in &report.skipped {
        let _ = writeln!(out, "skipped {c}: {why}");
    }
    let _ = writeln!(
        out,
        "\n{:<22} {:<14} {:>9} {:>8} {:>8} {:>8} {:>9} {:>8} {:>10}",
        "workload",
        "contender",
        "IOPS",
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
            let _ = writeln!(out, "{label:<22} {:<14} failed: {why}", cell.contender.name);
            continue;
        };
        let ratio = |kind| {
            ratios
                .iter()
                .find(|r| {
                    r.workload == cell.workload.name
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
        let _ = writeln!(
            out,
            "{label:<22} {:<14} {:>9.0} {:>8.1} {:>8.1} {:>8.1} {:>9} {:>8} {:>10}",
            cell.contender.name, m.iops, m.mib_s, m.p50_us, m.p99_us, cpu, to_qsd, to_limit
        );
    }
    out
}
