//! `vmctl`'s human tables: aligned columns, the counters of `vm.counters` read from the
//! typed [`VmCounters`], and the block jobs of `vm.jobs` read from the typed [`JobInfo`].

use block::jobs::JobInfo;

use crate::backend::VmCounters;

/// `headers` and `rows` as left-aligned columns two spaces apart, one line each.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for r in rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.len());
        }
    }
    let line = |cells: &[String]| {
        let s: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        format!("{}\n", s.join("  ").trim_end())
    };
    let headers: Vec<String> = headers.iter().map(|h| h.to_string()).collect();
    let mut out = line(&headers);
    for r in rows {
        out += &line(r);
    }
    out
}

/// A table row: `id`, then each number.
fn row(id: &str, numbers: &[u64]) -> Vec<String> {
    std::iter::once(id.to_string())
        .chain(numbers.iter().map(u64::to_string))
        .collect()
}

/// The disk table and the iothread table of `vmctl counters`, a blank line between.
pub fn counters(c: &VmCounters) -> String {
    let disks: Vec<Vec<String>> = c
        .disks
        .iter()
        .map(|(id, d)| {
            let io = &d.io;
            row(
                id,
                &[
                    io.read.ops,
                    io.read.bytes,
                    io.write.ops,
                    io.write.bytes,
                    io.flush.ops,
                    io.errors(),
                    io.in_flight,
                    d.signals,
                ],
            )
        })
        .collect();
    let iothreads: Vec<Vec<String>> = c
        .iothreads
        .iter()
        .map(|(id, t)| {
            row(
                id,
                &[
                    t.requests,
                    t.completions,
                    t.wakeups,
                    t.poll_hits,
                    t.poll_ns,
                    t.cpu_ns,
                ],
            )
        })
        .collect();
    let mut out = table(
        &[
            "DISK",
            "READS",
            "READ_BYTES",
            "WRITES",
            "WRITE_BYTES",
            "FLUSHES",
            "ERRORS",
            "IN_FLIGHT",
            "SIGNALS",
        ],
        &disks,
    );
    out.push('\n');
    out += &table(
        &[
            "IOTHREAD",
            "REQUESTS",
            "COMPLETIONS",
            "WAKEUPS",
            "POLL_HITS",
            "POLL_NS",
            "CPU_NS",
        ],
        &iothreads,
    );
    let nbd: Vec<(&String, &block::nbd::NbdStatus)> = c
        .disks
        .iter()
        .filter_map(|(id, d)| d.nbd.as_ref().map(|n| (id, n)))
        .collect();
    if !nbd.is_empty() {
        let rows: Vec<Vec<String>> = nbd
            .iter()
            .map(|(id, n)| {
                let state = serde_json::to_value(n.state)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_string))
                    .unwrap_or_default();
                vec![
                    (*id).clone(),
                    n.server.clone(),
                    if n.export.is_empty() {
                        "-".into()
                    } else {
                        n.export.clone()
                    },
                    state,
                    n.connections.to_string(),
                    n.reconnects.to_string(),
                ]
            })
            .collect();
        out.push('\n');
        out += &table(
            &[
                "NBD_DISK",
                "SERVER",
                "EXPORT",
                "STATE",
                "CONNECTIONS",
                "RECONNECTS",
            ],
            &rows,
        );
        for (id, n) in nbd {
            if let Some(e) = &n.last_error {
                out += &format!("{id}: last error: {e}\n");
            }
        }
    }
    out
}

/// `bytes` in MiB with one decimal, rounded down (`1.5`): a figure short of a whole
/// never shows as the whole.
pub fn mib(bytes: u64) -> String {
    let tenths = (u128::from(bytes) * 10) >> 20;
    format!("{}.{}", tenths / 10, tenths % 10)
}

/// The table of `vmctl jobs`: one row per job, oldest first, sizes in MiB.
pub fn jobs(jobs: &[JobInfo]) -> String {
    let rows: Vec<Vec<String>> = jobs
        .iter()
        .map(|j| {
            vec![
                j.id.clone(),
                j.kind.clone(),
                j.disk.clone(),
                j.state.as_str().to_string(),
                format!("{}/{} MiB", mib(j.bytes_done), mib(j.bytes_total)),
                format!("{} MiB", mib(j.dirty_bytes)),
                if j.state.is_final() {
                    "-".to_string()
                } else {
                    format!("{} MiB/s", mib(j.rate))
                },
                if j.speed == 0 {
                    "unlimited".to_string()
                } else {
                    format!("{} MiB/s", mib(j.speed))
                },
                j.target.clone(),
                j.error.clone().unwrap_or_else(|| "-".to_string()),
            ]
        })
        .collect();
    table(
        &[
            "ID",
            "TYPE",
            "DISK",
            "STATE",
            "DONE/TOTAL",
            "DIRTY",
            "RATE",
            "SPEED",
            "TARGET",
            "ERROR",
        ],
        &rows,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use devices::iothread::IoThreadCounters;
    use devices::virtio_blk::device::BlkCounters;

    #[test]
    fn nbd_disks_get_a_table_of_their_connections() {
        let mut c = VmCounters::default();
        let d = BlkCounters {
            nbd: Some(block::nbd::NbdStatus {
                server: "10.0.0.5:10809".into(),
                export: "vol1".into(),
                state: block::nbd::NbdLinkState::Reconnecting,
                connections: 1,
                reconnects: 2,
                last_error: Some("receiving from the server: reset".into()),
            }),
            ..Default::default()
        };
        c.disks.insert("net".into(), d);
        c.disks.insert("local".into(), BlkCounters::default());
        let text = counters(&c);
        let lines: Vec<&str> = text.lines().collect();
        let head = lines
            .iter()
            .position(|l| l.starts_with("NBD_DISK"))
            .unwrap();
        let row: Vec<&str> = lines[head + 1].split_whitespace().collect();
        assert_eq!(
            row,
            ["net", "10.0.0.5:10809", "vol1", "reconnecting", "1", "2"]
        );
        assert_eq!(
            lines[head + 2],
            "net: last error: receiving from the server: reset"
        );
        assert_eq!(lines.len(), head + 3, "{text}");
    }

    #[test]
    fn counters_tables_show_each_disk_and_iothread() {
        let mut c = VmCounters::default();
        let mut d = BlkCounters::default();
        d.io.read.ops = 3;
        d.io.read.bytes = 12288;
        d.io.write.ops = 2;
        d.io.write.bytes = 8192;
        d.io.flush.ops = 1;
        d.io.discard.errors = 4;
        d.io.in_flight = 5;
        d.signals = 6;
        c.disks.insert("d0".into(), d);
        c.disks.insert("d1".into(), BlkCounters::default());
        c.iothreads.insert(
            "io0".into(),
            IoThreadCounters {
                requests: 7,
                completions: 8,
                wakeups: 9,
                poll_hits: 10,
                poll_ns: 11,
                cpu_ns: 12,
                ..Default::default()
            },
        );
        let text = counters(&c);
        let rows: Vec<Vec<&str>> = text
            .lines()
            .map(|l| l.split_whitespace().collect())
            .collect();
        assert_eq!(
            rows,
            [
                vec![
                    "DISK",
                    "READS",
                    "READ_BYTES",
                    "WRITES",
                    "WRITE_BYTES",
                    "FLUSHES",
                    "ERRORS",
                    "IN_FLIGHT",
                    "SIGNALS"
                ],
                vec!["d0", "3", "12288", "2", "8192", "1", "4", "5", "6"],
                vec!["d1", "0", "0", "0", "0", "0", "0", "0", "0"],
                vec![],
                vec![
                    "IOTHREAD",
                    "REQUESTS",
                    "COMPLETIONS",
                    "WAKEUPS",
                    "POLL_HITS",
                    "POLL_NS",
                    "CPU_NS"
                ],
                vec!["io0", "7", "8", "9", "10", "11", "12"],
            ],
            "{text}"
        );
    }

    #[test]
    fn columns_are_aligned_to_the_widest_cell() {
        let text = table(
            &["A", "B"],
            &[
                vec!["long-id".into(), "1".into()],
                vec!["x".into(), "22".into()],
            ],
        );
        assert_eq!(text, "A        B\nlong-id  1\nx        22\n");
    }

    #[test]
    fn mib_rounds_down_to_a_tenth() {
        assert_eq!(mib(0), "0.0");
        assert_eq!(mib(1 << 20), "1.0");
        assert_eq!(mib(3 << 19), "1.5");
        assert_eq!(mib((1 << 20) - 1), "0.9");
        assert_eq!(mib(u64::MAX), "17592186044415.9");
    }

    #[test]
    fn jobs_table_shows_progress_in_mib() {
        use block::jobs::{CopyMode, JobState, SyncMode};
        let job = |id: &str, state, error: Option<&str>| JobInfo {
            id: id.into(),
            kind: "mirror".into(),
            disk: "disk0".into(),
            target: "/new.raw".into(),
            state,
            bytes_done: 3 << 19,
            bytes_total: 4 << 20,
            dirty_bytes: 1 << 19,
            rate: 1 << 20,
            speed: 0,
            sync: SyncMode::Full,
            copy_mode: CopyMode::Background,
            error: error.map(str::to_string),
        };
        let mut slow = job("m0", JobState::Running, None);
        slow.speed = 5 << 20;
        let text = jobs(&[slow, job("m1", JobState::Failed, Some("target: EIO"))]);
        let rows: Vec<Vec<&str>> = text
            .lines()
            .map(|l| l.split_whitespace().collect())
            .collect();
        assert_eq!(
            rows,
            [
                vec![
                    "ID",
                    "TYPE",
                    "DISK",
                    "STATE",
                    "DONE/TOTAL",
                    "DIRTY",
                    "RATE",
                    "SPEED",
                    "TARGET",
                    "ERROR"
                ],
                vec![
                    "m0", "mirror", "disk0", "running", "1.5/4.0", "MiB", "0.5", "MiB", "1.0",
                    "MiB/s", "5.0", "MiB/s", "/new.raw", "-"
                ],
                vec![
                    "m1",
                    "mirror",
                    "disk0",
                    "failed",
                    "1.5/4.0",
                    "MiB",
                    "0.5",
                    "MiB",
                    "-",
                    "unlimited",
                    "/new.raw",
                    "target:",
                    "EIO"
                ],
            ],
            "{text}"
        );
    }
}
