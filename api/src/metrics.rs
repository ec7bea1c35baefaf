//! `GET /metrics`: every numeric counter of every disk and iothread in Prometheus text
//! format, labelled `vm` and `disk` / `iothread`. Metric names follow the JSON field
//! paths of `vm.counters` (`vmm_disk_read_ops_total`, `vmm_iothread_poll_ns`), so new
//! counters appear without changes here.

use std::collections::BTreeMap;
use std::fmt::Write;

use serde_json::Value;

use crate::backend::{VmCounters, VmState};

/// Fields that are levels, not running totals.
const GAUGES: &[&str] = &["in_flight", "poll_ns"];

#[derive(Default)]
struct Family {
    gauge: bool,
    samples: Vec<String>,
}

fn flatten(prefix: &str, v: &Value, out: &mut Vec<(String, u64)>) {
    match v {
        Value::Object(map) => {
            for (k, v) in map {
                let name = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}_{k}")
                };
                flatten(&name, v, out);
            }
        }
        Value::Number(n) => {
            if let Some(n) = n.as_u64() {
                out.push((prefix.to_string(), n));
            }
        }
        // Histograms (arrays) and strings are left to vm.counters.
        _ => {}
    }
}

fn escape(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn add<T: serde::Serialize>(
    families: &mut BTreeMap<String, Family>,
    kind: &str,
    labels: &str,
    counters: &T,
) {
    let Ok(value) = serde_json::to_value(counters) else {
        return;
    };
    let mut fields = Vec::new();
    flatten("", &value, &mut fields);
    for (field, n) in fields {
        let gauge = GAUGES.contains(&field.as_str());
        let name = if gauge {
            format!("vmm_{kind}_{field}")
        } else {
            format!("vmm_{kind}_{field}_total")
        };
        let family = families.entry(name.clone()).or_default();
        family.gauge = gauge;
        family.samples.push(format!("{name}{{{labels}}} {n}"));
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
            add(&mut families, "disk", &labels, c);
        }
        for (thread, c) in &counters.iothreads {
            let labels = format!("vm=\"{vm_label}\",iothread=\"{}\"", escape(thread));
            add(&mut families, "iothread", &labels, c);
        }
    }
    for (name, family) in families {
        let kind = if family.gauge { "gauge" } else { "counter" };
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
    use devices::iothread::IoThreadCounters;
    use devices::virtio_blk::device::BlkCounters;

    #[test]
    fn labels_and_types() {
        let mut c = VmCounters::default();
        let mut d = BlkCounters::default();
        d.io.read.ops = 7;
        c.disks.insert("d0".into(), d);
        c.iothreads
            .insert("io0".into(), IoThreadCounters::default());
        let text = render(&[("vm1".into(), VmState::Running, c)]);
        assert!(
            text.contains("vmm_disk_read_ops_total{vm=\"vm1\",disk=\"d0\"} 7"),
            "{text}"
        );
        assert!(text.contains("# TYPE vmm_disk_in_flight gauge"), "{text}");
        assert!(
            text.contains("vmm_iothread_poll_ns{vm=\"vm1\",iothread=\"io0\"} 0"),
            "{text}"
        );
        assert!(
            text.contains("vmm_vm_running{vm=\"vm1\",state=\"Running\"} 1"),
            "{text}"
        );
    }
}
