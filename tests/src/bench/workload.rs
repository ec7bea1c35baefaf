//! The workloads `blkbench` knows, by name, and the quick subset.

/// One workload: request shape, queue depth and number of queues.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Workload {
    /// Random (true) or sequential offsets.
    pub random: bool,
    /// Writes (true) or reads.
    pub write: bool,
    /// Request size in bytes (a multiple of 4096).
    pub block_size: usize,
    /// Requests in flight per queue.
    pub iodepth: usize,
    /// Queues, each driven by its own thread.
    pub queues: usize,
}

impl Workload {
    /// A short label like `4k randread QD32 x1`.
    pub fn label(&self) -> String {
        let kind = match (self.random, self.write) {
            (true, false) => "randread",
            (true, true) => "randwrite",
            (false, false) => "read",
            (false, true) => "write",
        };
        format!(
            "{}k {kind} QD{} x{}",
            self.block_size / 1024,
            self.iodepth,
            self.queues
        )
    }
}

/// A workload with the name the command line and the JSON use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NamedWorkload {
    /// Name, e.g. `randread-4k-qd32`.
    pub name: &'static str,
    /// What it does.
    pub workload: Workload,
}

const fn w(
    name: &'static str,
    random: bool,
    write: bool,
    kib: usize,
    iodepth: usize,
    queues: usize,
) -> NamedWorkload {
    NamedWorkload {
        name,
        workload: Workload {
            random,
            write,
            block_size: kib * 1024,
            iodepth,
            queues,
        },
    }
}

/// Every workload, in table order.
pub const ALL: [NamedWorkload; 8] = [
    w("randread-4k-qd1", true, false, 4, 1, 1),
    w("randread-4k-qd32", true, false, 4, 32, 1),
    w("randwrite-4k-qd1", true, true, 4, 1, 1),
    w("randwrite-4k-qd32", true, true, 4, 32, 1),
    w("read-128k-qd8", false, false, 128, 8, 1),
    w("write-128k-qd8", false, true, 128, 8, 1),
    w("randread-4k-qd32-2q", true, false, 4, 32, 2),
    w("randread-4k-qd32-4q", true, false, 4, 32, 4),
];

/// The `--quick` subset: QD1 and QD32 random 4k (read and write), a 128k sequential
/// stream and two queues.
pub const QUICK: [&str; 5] = [
    "randread-4k-qd1",
    "randread-4k-qd32",
    "randwrite-4k-qd32",
    "read-128k-qd8",
    "randread-4k-qd32-2q",
];

/// Looks a workload up by name.
pub fn by_name(name: &str) -> Option<NamedWorkload> {
    ALL.iter().copied().find(|w| w.name == name)
}

/// Parses a `--workloads` list (names, or `all`) into catalogue order without repeats.
pub fn parse_list(names: &[String]) -> Result<Vec<NamedWorkload>, String> {
    let mut wanted = Vec::new();
    for name in names.iter().map(|s| s.trim()).filter(|s| !s.is_empty()) {
        if name == "all" {
            wanted.extend(ALL.iter().map(|w| w.name));
            continue;
        }
        match by_name(name) {
            Some(w) => wanted.push(w.name),
            None => {
                return Err(format!(
                    "unknown workload {name:?}; known: all, {}",
                    names_of_all()
                ));
            }
        }
    }
    if wanted.is_empty() {
        return Err("--workloads names none".into());
    }
    Ok(ALL
        .iter()
        .copied()
        .filter(|w| wanted.contains(&w.name))
        .collect())
}

/// Every workload name, comma separated (for help and errors).
pub fn names_of_all() -> String {
    ALL.iter().map(|w| w.name).collect::<Vec<_>>().join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quick_names_exist() {
        for name in QUICK {
            assert!(by_name(name).is_some(), "{name}");
        }
    }

    #[test]
    fn parse_keeps_catalogue_order() {
        let got = parse_list(&["read-128k-qd8".into(), "randread-4k-qd1".into()]).unwrap();
        let names: Vec<_> = got.iter().map(|w| w.name).collect();
        assert_eq!(names, ["randread-4k-qd1", "read-128k-qd8"]);
        assert_eq!(parse_list(&["all".into()]).unwrap().len(), ALL.len());
        assert!(parse_list(&["randread-3k".into()]).is_err());
        assert!(parse_list(&[]).is_err());
    }

    #[test]
    fn labels() {
        assert_eq!(ALL[1].workload.label(), "4k randread QD32 x1");
        assert_eq!(ALL[5].workload.label(), "128k write QD8 x1");
    }
}
