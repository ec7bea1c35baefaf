//! `GET /metrics`: every numeric counter of every disk and iothread in Prometheus text
//! format, labelled `vm` and `disk` / `iothread`. Metric names follow the JSON field
//! paths of `vm.counters` (`read.ops` of a disk is `vmm_disk_read_ops_total`, `poll_ns`
//! of an iothread the gauge `vmm_iothread_poll_ns`). The counters are read from the typed
//! structs, destructured in full: a counter added to them does not compile until it is
//! exported here. The latency histogram is left to `vm.counters`.

use std::collections::BTreeMap;
use std::fmt::Write;

use block::counters::{CountersSnapshot, KindSnapshot};
use devices::iothread::IoThreadCounters;
use devices::virtio_blk::device::BlkCounters;
use devices::virtio_blk::io_error::IoErrorCounts;

use crate::backend::{VmCounters, VmState};

/// One number of a disk or an iothread.
struct Sample {
    /// The name after `vmm_disk_` / `vmm_iothread_`, without `_total`.
    field: String,
    /// The metric's help text.
    help: String,
    /// A level rather than a running total.
    gauge: bool,
    value: u64,
}

fn counter(field: impl Into<String>, help: impl Into<String>, value: u64) -> Sample {
    Sample {
        field: field.into(),
        help: help.into(),
        gauge: false,
        value,
    }
}

fn gauge(field: &str, help: &str, value: u64) -> Sample {
    Sample {
        gauge: true,
        ..counter(field, help, value)
    }
}

fn disk_samples(c: &BlkCounters) -> Vec<Sample> {
    let BlkCounters {
        io:
            CountersSnapshot {
                read,
                write,
                flush,
                discard,
                write_zeroes,
                in_flight,
                throttled_ns,
                latency_log2_ns: _,
            },
        invalid_requests,
        signals,
        io_errors,
        nbd,
    } = c;
    let mut out = Vec::new();
    for (kind, what, k) in [
        ("read", "reads", read),
        ("write", "writes", write),
        ("flush", "flushes", flush),
        ("discard", "discards", discard),
        ("write_zeroes", "write-zeroes requests", write_zeroes),
    ] {
        let KindSnapshot { ops, bytes, errors } = *k;
        out.push(counter(
            format!("{kind}_ops"),
            format!("Disk {what} completed successfully."),
            ops,
        ));
        out.push(counter(
            format!("{kind}_bytes"),
            format!("Bytes covered by disk {what} completed successfully."),
            bytes,
        ));
        out.push(counter(
            format!("{kind}_errors"),
            format!("Disk {what} that failed."),
            errors,
        ));
    }
    out.push(gauge(
        "in_flight",
        "Disk requests started and not yet completed.",
        *in_flight,
    ));
    out.push(counter(
        "throttled_ns",
        "Time disk requests waited for the throttle, in ns.",
        *throttled_ns,
    ));
    out.push(counter(
        "invalid_requests",
        "Descriptor chains rejected as malformed or unsupported.",
        *invalid_requests,
    ));
    out.push(counter(
        "signals",
        "Interrupts the disk sent to the driver.",
        *signals,
    ));
    let IoErrorCounts {
        reported,
        stopped,
        ignored,
    } = *io_errors;
    for (action, what, n) in [
        ("reported", "completed with an I/O error", reported),
        ("stopped", "held for a retry, stopping the disk", stopped),
        (
            "ignored",
            "completed as successful although they failed",
            ignored,
        ),
    ] {
        out.push(counter(
            format!("io_errors_{action}"),
            format!("Failed disk requests {what} (the error policy's action)."),
            n,
        ));
    }
    if let Some(n) = nbd {
        out.push(gauge(
            "nbd_connections",
            "Connections of an NBD disk that are up.",
            u64::from(n.connections),
        ));
        out.push(gauge(
            "nbd_failed",
            "1 when an NBD disk's connection is down for good (reconnect_delay 0, or the export changed).",
            u64::from(n.state == block::nbd::NbdLinkState::Failed),
        ));
        out.push(counter(
            "nbd_reconnects",
            "Successful reconnects of an NBD disk.",
            n.reconnects,
        ));
    }
    out
}

fn iothread_samples(c: &IoThreadCounters) -> Vec<Sample> {
    let IoThreadCounters {
        passes,
        wakeups,
        poll_hits,
        requests,
        completions,
        signals,
        poll_ns,
        cpu_ns,
    } = *c;
    vec![
        counter("passes", "Iothread loop iterations.", passes),
        counter(
            "wakeups",
            "Iothread returns from epoll_wait with events.",
            wakeups,
        ),
        counter(
            "poll_hits",
            "Iothread passes where polling found work before sleeping.",
            poll_hits,
        ),
        counter(
            "requests",
            "Descriptor chains the iothread took from virtqueues.",
            requests,
        ),
        counter(
            "completions",
            "Requests the iothread completed.",
            completions,
        ),
        counter(
            "signals",
            "Interrupts the iothread sent to drivers.",
            signals,
        ),
        gauge(
            "poll_ns",
            "Current adaptive polling window of the iothread, in ns.",
            poll_ns,
        ),
        counter("cpu_ns", "CPU time the iothread has used, in ns.", cpu_ns),
    ]
}

/// The samples of one metric, with its type and help.
#[derive(Default)]
struct Family {
    gauge: bool,
    help: String,
    samples: Vec<String>,
}

fn escape(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn add(families: &mut BTreeMap<String, Family>, kind: &str, labels: &str, samples: Vec<Sample>) {
    for s in samples {
        let name = if s.gauge {
            format!("vmm_{kind}_{}", s.field)
        } else {
            format!("vmm_{kind}_{}_total", s.field)
        };
        let family = families.entry(name.clone()).or_default();
        family.gauge = s.gauge;
        family.help = s.help;
        family
            .samples
            .push(format!("{name}{{{labels}}} {}", s.value));
    }
}

/// The exposition text for `vms` (id, state, counters).
pub fn render(vms: &[(String, VmState, VmCounters)]) -> String {
    let mut families: BTreeMap<String, Family> = BTreeMap::new();
    let mut out = String::new();
    out.push_str("# HELP vmm_vm_running Whether the VM is running (1) or not (0).\n");
    out.push_str("# TYPE vmm_vm_running gauge\n");
    for (vm, state, counters) in vms {
        let vm_label = escape(vm);
        let _ = writeln!(
            out,
            "vmm_vm_running{{vm=\"{vm_label}\",state=\"{state}\"}} {}",
            u8::from(*state == VmState::Running)
        );
        for (disk, c) in &counters.disks {
            let labels = format!("vm=\"{vm_label}\",disk=\"{}\"", escape(disk));
            add(&mut families, "disk", &labels, disk_samples(c));
        }
        for (thread, c) in &counters.iothreads {
            let labels = format!("vm=\"{vm_label}\",iothread=\"{}\"", escape(thread));
            add(&mut families, "iothread", &labels, iothread_samples(c));
        }
    }
    for (name, family) in families {
        let kind = if family.gauge { "gauge" } else { "counter" };
        let _ = writeln!(out, "# HELP {name} {}", family.help);
        let _ = writeln!(out, "# TYPE {name} {kind}");
        for s in family.samples {
            out.push_str(&s);
            out.push('\n');
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A disk whose every counter has its own value (1..=19 in field order).
    fn disk() -> BlkCounters {
        let kind = |n: u64| KindSnapshot {
            ops: n,
            bytes: n + 1,
            errors: n + 2,
        };
        BlkCounters {
            io: CountersSnapshot {
                read: kind(1),
                write: kind(4),
                flush: kind(7),
                discard: kind(10),
                write_zeroes: kind(13),
                in_flight: 16,
                throttled_ns: 17,
                latency_log2_ns: vec![5; block::counters::LATENCY_BUCKETS],
            },
            invalid_requests: 18,
            signals: 19,
            io_errors: IoErrorCounts {
                reported: 30,
                stopped: 31,
                ignored: 32,
            },
            nbd: Some(block::nbd::NbdStatus {
                server: "unix:/run/nbd.sock".into(),
                export: "e".into(),
                state: block::nbd::NbdLinkState::Reconnecting,
                connections: 20,
                reconnects: 21,
                last_error: Some("gone".into()),
            }),
        }
    }

    /// An iothread whose every counter has its own value (21..=28 in field order).
    fn iothread() -> IoThreadCounters {
        IoThreadCounters {
            passes: 21,
            wakeups: 22,
            poll_hits: 23,
            requests: 24,
            completions: 25,
            signals: 26,
            poll_ns: 27,
            cpu_ns: 28,
        }
    }

    fn known() -> Vec<(String, VmState, VmCounters)> {
        let vm1 = VmCounters {
            disks: BTreeMap::from([("d0".to_string(), disk())]),
            iothreads: BTreeMap::from([("io0".to_string(), iothread())]),
        };
        let vm2 = VmCounters {
            disks: BTreeMap::from([("d\"1".to_string(), BlkCounters::default())]),
            iothreads: BTreeMap::new(),
        };
        vec![
            ("vm1".into(), VmState::Running, vm1),
            ("vm2".into(), VmState::Paused, vm2),
        ]
    }

    #[test]
    fn known_counters_give_these_lines() {
        let text = render(&known());
        let lines: Vec<&str> = text.lines().collect();
        let d0 = "{vm=\"vm1\",disk=\"d0\"}";
        let io0 = "{vm=\"vm1\",iothread=\"io0\"}";
        let mut want = vec![
            "# TYPE vmm_vm_running gauge".to_string(),
            "vmm_vm_running{vm=\"vm1\",state=\"Running\"} 1".to_string(),
            "vmm_vm_running{vm=\"vm2\",state=\"Paused\"} 0".to_string(),
            "# TYPE vmm_disk_read_ops_total counter".to_string(),
            "# HELP vmm_disk_read_ops_total Disk reads completed successfully.".to_string(),
            "# TYPE vmm_disk_in_flight gauge".to_string(),
            "# TYPE vmm_iothread_poll_ns gauge".to_string(),
            "# TYPE vmm_iothread_cpu_ns_total counter".to_string(),
            // Label values are escaped.
            "vmm_disk_read_ops_total{vm=\"vm2\",disk=\"d\\\"1\"} 0".to_string(),
        ];
        for (kind, base) in [
            ("read", 1),
            ("write", 4),
            ("flush", 7),
            ("discard", 10),
            ("write_zeroes", 13),
        ] {
            want.push(format!("vmm_disk_{kind}_ops_total{d0} {base}"));
            want.push(format!("vmm_disk_{kind}_bytes_total{d0} {}", base + 1));
            want.push(format!("vmm_disk_{kind}_errors_total{d0} {}", base + 2));
        }
        want.extend([
            format!("vmm_disk_in_flight{d0} 16"),
            format!("vmm_disk_throttled_ns_total{d0} 17"),
            format!("vmm_disk_invalid_requests_total{d0} 18"),
            format!("vmm_disk_signals_total{d0} 19"),
            format!("vmm_disk_io_errors_reported_total{d0} 30"),
            format!("vmm_disk_io_errors_stopped_total{d0} 31"),
            format!("vmm_disk_io_errors_ignored_total{d0} 32"),
            format!("vmm_disk_nbd_connections{d0} 20"),
            format!("vmm_disk_nbd_reconnects_total{d0} 21"),
            format!("vmm_disk_nbd_failed{d0} 0"),
            format!("vmm_iothread_passes_total{io0} 21"),
            format!("vmm_iothread_wakeups_total{io0} 22"),
            format!("vmm_iothread_poll_hits_total{io0} 23"),
            format!("vmm_iothread_requests_total{io0} 24"),
            format!("vmm_iothread_completions_total{io0} 25"),
            format!("vmm_iothread_signals_total{io0} 26"),
            format!("vmm_iothread_poll_ns{io0} 27"),
            format!("vmm_iothread_cpu_ns_total{io0} 28"),
        ]);
        for w in &want {
            assert!(lines.contains(&w.as_str()), "no line {w:?} in:\n{text}");
        }
        // 25 disk families (3 of them for NBD disks only), 8 iothread families and
        // vmm_vm_running, each with HELP and TYPE; 22 disk samples per disk and 3 more for
        // the NBD one, 8 per iothread, one per VM; nothing else (the histogram is not
        // exported).
        let samples = lines.iter().filter(|l| !l.starts_with('#')).count();
        assert_eq!(samples, 2 * 22 + 3 + 8 + 2, "{text}");
        let types = lines.iter().filter(|l| l.starts_with("# TYPE")).count();
        assert_eq!(types, 25 + 8 + 1, "{text}");
        let helps = lines.iter().filter(|l| l.starts_with("# HELP")).count();
        assert_eq!(helps, types, "{text}");
    }

    /// The numbers in `v`'s JSON, each with its path joined by `_`.
    fn numbers(prefix: &str, v: &serde_json::Value, out: &mut Vec<(String, u64)>) {
        match v {
            serde_json::Value::Object(map) => {
                for (k, v) in map {
                    let path = if prefix.is_empty() {
                        k.clone()
                    } else {
                        format!("{prefix}_{k}")
                    };
                    numbers(&path, v, out);
                }
            }
            serde_json::Value::Number(n) => out.push((prefix.to_string(), n.as_u64().unwrap())),
            _ => {}
        }
    }

    /// Every number `vm.counters` shows for a disk or an iothread is exported under the
    /// name of its JSON path.
    #[test]
    fn every_number_of_vm_counters_has_the_metric_of_its_json_path() {
        let text = render(&known());
        for (kind, json, labels) in [
            (
                "disk",
                serde_json::to_value(disk()).unwrap(),
                "{vm=\"vm1\",disk=\"d0\"}",
            ),
            (
                "iothread",
                serde_json::to_value(iothread()).unwrap(),
                "{vm=\"vm1\",iothread=\"io0\"}",
            ),
        ] {
            let mut found = Vec::new();
            numbers("", &json, &mut found);
            assert!(found.len() >= 8, "{json}");
            for (path, value) in found {
                let counter = format!("vmm_{kind}_{path}_total{labels} {value}\n");
                let gauge = format!("vmm_{kind}_{path}{labels} {value}\n");
                assert!(
                    text.contains(&counter) || text.contains(&gauge),
                    "no metric for {kind} field {path}:\n{text}"
                );
            }
        }
    }
}
