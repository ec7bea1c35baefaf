//! In-VM contenders: the freestanding test guest (`tests/guest`) drives one virtio-blk
//! disk, 4 KiB random reads at full depth, first polling the used ring, then waiting for
//! MSI-X interrupts, then random 4 KiB writes at full depth and reads at QD1 (latency),
//! each polled and with interrupts, and reports every phase on its serial console. It runs
//! under our `vmm` (a dedicated iothread: guest kick -> ioeventfd -> iothread -> engine ->
//! irqfd) and under `qemu-system-x86_64 -accel kvm`, with an `-object iothread` (QEMU's
//! data plane) and without one (the pre-data-plane baseline), on the same fully allocated
//! image with `cache=none` and either engine, or on a null backend.

// Figures and setup values, not guest input.
#![allow(clippy::cast_precision_loss)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::test_guest::parse_report;

/// Which monitor runs the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Monitor {
    /// Our `vmm`, the disk on a dedicated iothread.
    Ours,
    /// QEMU with `-object iothread` and `virtio-blk-pci,iothread=`.
    QemuIothread,
    /// QEMU without an iothread (the device runs in QEMU's main loop).
    Qemu,
}

/// What backs the guest's disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backing {
    /// The benchmark file, O_DIRECT (`cache=none`), through this engine.
    File(&'static str),
    /// A null backend (reads return zeroes).
    Null,
}

/// One in-VM column.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VmContender {
    /// Name on the command line and in the table and JSON.
    pub name: &'static str,
    /// Who runs the guest.
    pub monitor: Monitor,
    /// What backs the disk.
    pub backing: Backing,
}

const fn c(name: &'static str, monitor: Monitor, backing: Backing) -> VmContender {
    VmContender {
        name,
        monitor,
        backing,
    }
}

/// Every in-VM contender, in run order (each backing's three monitors in a row, so that
/// they see the same conditions).
pub const ALL: [VmContender; 9] = [
    c("vm-ours-null", Monitor::Ours, Backing::Null),
    c(
        "vm-qemu-iothread-null",
        Monitor::QemuIothread,
        Backing::Null,
    ),
    c("vm-qemu-null", Monitor::Qemu, Backing::Null),
    c("vm-ours-io_uring", Monitor::Ours, Backing::File("io_uring")),
    c(
        "vm-qemu-iothread-io_uring",
        Monitor::QemuIothread,
        Backing::File("io_uring"),
    ),
    c("vm-qemu-io_uring", Monitor::Qemu, Backing::File("io_uring")),
    c("vm-ours-native", Monitor::Ours, Backing::File("native")),
    c(
        "vm-qemu-iothread-native",
        Monitor::QemuIothread,
        Backing::File("native"),
    ),
    c("vm-qemu-native", Monitor::Qemu, Backing::File("native")),
];

/// The in-VM contenders `names` picks, in run order: contender names, or `all`, `ours`,
/// `qemu` (both QEMU monitors), `null`, `io_uring`, `native` (the three monitors on
/// that backing); a group and a name may be mixed.
pub fn parse_list(names: &[String]) -> Result<Vec<VmContender>, String> {
    let mut wanted: Vec<&str> = Vec::new();
    for name in names.iter().map(|s| s.trim()).filter(|s| !s.is_empty()) {
        let picked: Vec<&str> = ALL
            .iter()
            .filter(|c| match name {
                "all" => true,
                "ours" => c.monitor == Monitor::Ours,
                "qemu" => c.monitor != Monitor::Ours,
                "null" => c.backing == Backing::Null,
                "io_uring" | "native" => {
                    c.backing
                        == Backing::File(if name == "native" {
                            "native"
                        } else {
                            "io_uring"
                        })
                }
                _ => c.name == name,
            })
            .map(|c| c.name)
            .collect();
        if picked.is_empty() {
            let known: Vec<&str> = ALL.iter().map(|c| c.name).collect();
            return Err(format!(
                "unknown in-VM contender {name:?}; known: all, ours, qemu, null, io_uring, \
                 native, {}",
                known.join(", ")
            ));
        }
        wanted.extend(picked);
    }
    super::pick_in_order(&ALL, |c| c.name, &wanted)
}

/// What the runs need.
#[derive(Clone, Debug)]
pub struct VmSetup {
    /// The test guest ELF.
    pub elf: PathBuf,
    /// Our `vmm` binary.
    pub vmm: PathBuf,
    /// `qemu-system-x86_64`, with its data directory (`-L`) when it is not the system's.
    pub qemu: Option<(PathBuf, Option<PathBuf>)>,
    /// The fully allocated image.
    pub file: PathBuf,
    /// The null backend's size in bytes.
    pub null_size: u64,
    /// Milliseconds of each of the guest's phases.
    pub phase_ms: u64,
    /// The TSC rate the guest times itself with.
    pub tsc_khz: u64,
    /// Where configs and consoles go.
    pub dir: PathBuf,
    /// Settings of our disk's iothread (`key=value,...`, as blkbench's `--iothread`);
    /// None: the dedicated iothread with the defaults.
    pub iothread: Option<String>,
}

/// What one guest run measured.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct VmFigures {
    /// Read IOPS while the guest polls the used ring.
    pub iops_poll: f64,
    /// Read IOPS while the guest waits for MSI-X interrupts.
    pub iops_irq: f64,
    /// Write IOPS, polled (0: not measured).
    pub write_poll: f64,
    /// Write IOPS with interrupts (0: not measured).
    pub write_irq: f64,
    /// QD1 read latency in us, polled (0: not measured).
    pub lat_poll_us: f64,
    /// QD1 read latency in us with interrupts (0: not measured).
    pub lat_irq_us: f64,
    /// Completions per MSI-X interrupt in the interrupt-driven read phase (0: not
    /// reported): how well the monitor batches its signals.
    pub ops_per_irq: f64,
}

/// How long one guest run may take.
const RUN_TIMEOUT: Duration = Duration::from_secs(120);

/// Boots the guest under `c` and returns what it measured.
pub fn run(c: &VmContender, s: &VmSetup) -> Result<VmFigures, String> {
    let cmdline = |exit: &str| {
        format!(
            "exit={exit} pci=auto tsc_khz={} ms={} blocks=0 more=1",
            s.tsc_khz, s.phase_ms
        )
    };
    let console = match c.monitor {
        Monitor::Ours => {
            let config = ours_config(c, s, &cmdline("acpi"));
            let path = s.dir.join(format!("{}.json", c.name));
            std::fs::write(&path, config).map_err(|e| format!("{}: {e}", path.display()))?;
            let mut cmd = Command::new(&s.vmm);
            cmd.arg("--config").arg(&path);
            run_to_end(cmd)?;
            let serial = s.dir.join(format!("{}.serial", c.name));
            std::fs::read_to_string(&serial).map_err(|e| format!("{}: {e}", serial.display()))?
        }
        Monitor::QemuIothread | Monitor::Qemu => {
            let Some((qemu, data)) = &s.qemu else {
                return Err("qemu-system-x86_64 missing (apt-get install qemu-system-x86)".into());
            };
            let mut cmd = Command::new(qemu);
            if let Some(data) = data {
                cmd.arg("-L").arg(data);
            }
            cmd.args(qemu_args(c, s, &cmdline("isa")));
            run_to_end(cmd)?
        }
    };
    figures(&parse_report(&console))
        .ok_or_else(|| format!("{}: the guest reported no IOPS:\n{console}", c.name))
}

/// The IOPS of both phases from a guest report, if it finished.
pub fn figures(report: &BTreeMap<String, String>) -> Option<VmFigures> {
    if report.get("result").map(String::as_str) != Some("ok") {
        return None;
    }
    let num = |k: &str| report.get(k)?.parse::<f64>().ok().filter(|v| *v > 0.0);
    let opt = |k: &str| num(k).unwrap_or(0.0);
    Some(VmFigures {
        iops_poll: num("disk0.iops_poll")?,
        iops_irq: num("disk0.iops_irq")?,
        write_poll: opt("disk0.iops_write_poll"),
        write_irq: opt("disk0.iops_write_irq"),
        lat_poll_us: opt("disk0.lat_qd1_ns_poll") / 1000.0,
        lat_irq_us: opt("disk0.lat_qd1_ns_irq") / 1000.0,
        ops_per_irq: num("disk0.irqs").map_or(0.0, |irqs| opt("disk0.ops_irq") / irqs),
    })
}

/// Our VM config: one vCPU, 128 MiB, the disk on its dedicated iothread, the console in
/// `<dir>/<name>.serial`.
fn ours_config(c: &VmContender, s: &VmSetup, cmdline: &str) -> String {
    let disk = match c.backing {
        Backing::Null => serde_json::json!({"id": "d0", "path": "null", "null_size": s.null_size}),
        Backing::File(aio) => {
            serde_json::json!({"id": "d0", "path": s.file, "cache": "none", "aio": aio})
        }
    };
    let mut disk = disk;
    let mut iothreads = Vec::new();
    if let Some(settings) = &s.iothread {
        iothreads.push(iothread_json(settings));
        disk["iothread"] = "io0".into();
    }
    serde_json::json!({
        "id": "bench",
        "iothreads": iothreads,
        "cpus": {"boot_vcpus": 1},
        "memory": {"size_mib": 128},
        "payload": {"kernel": s.elf, "cmdline": cmdline},
        "serial": {"mode": "file", "path": s.dir.join(format!("{}.serial", c.name))},
        "disks": [disk],
    })
    .to_string()
}

/// `key=value,...` as an iothread object named `io0` (an `id=` given is overridden: the
/// disk names `io0`): `cpu_affinity`'s `a:b` as a list of numbers, other numbers as
/// numbers, anything else as a string; `vmm` checks it.
fn iothread_json(settings: &str) -> serde_json::Value {
    let number = |v: &str| v.parse::<u64>().map_or_else(|_| v.into(), Into::into);
    let mut obj = serde_json::Map::new();
    for pair in settings.split(',').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let parsed = if key == "cpu_affinity" {
            value
                .split(':')
                .map(number)
                .collect::<Vec<serde_json::Value>>()
                .into()
        } else {
            number(value)
        };
        obj.insert(key.into(), parsed);
    }
    obj.insert("id".into(), "io0".into());
    obj.into()
}

/// QEMU's arguments for `c`: q35 under KVM, one vCPU, 128 MiB, isa-debug-exit, the disk
/// as a modern `virtio-blk-pci` over `-blockdev`.
pub fn qemu_args(c: &VmContender, s: &VmSetup, cmdline: &str) -> Vec<String> {
    let mut a: Vec<String> = [
        "-accel",
        "kvm",
        "-machine",
        "q35",
        "-m",
        "128",
        "-smp",
        "1",
        "-nographic",
        "-no-reboot",
        "-net",
        "none",
        "-kernel",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    a.push(s.elf.display().to_string());
    a.extend(["-append".into(), cmdline.into()]);
    a.extend([
        "-device".into(),
        "isa-debug-exit,iobase=0xf4,iosize=0x04".into(),
    ]);
    match c.backing {
        Backing::Null => a.extend([
            "-blockdev".into(),
            format!(
                "driver=null-co,node-name=d0,size={},read-zeroes=on",
                s.null_size
            ),
        ]),
        Backing::File(aio) => a.extend([
            "-blockdev".into(),
            format!(
                "driver=file,node-name=f0,filename={},cache.direct=on,aio={aio}",
                s.file.display()
            ),
            "-blockdev".into(),
            "driver=raw,node-name=d0,file=f0,cache.direct=on".into(),
        ]),
    }
    let mut device = "virtio-blk-pci,drive=d0,disable-legacy=on,num-queues=1".to_string();
    if c.monitor == Monitor::QemuIothread {
        a.extend(["-object".into(), "iothread,id=io0".into()]);
        device.push_str(",iothread=io0");
    }
    a.extend(["-device".into(), device]);
    a
}

/// Runs `cmd` to its end (killed after [`RUN_TIMEOUT`], an error); returns its stdout
/// and stderr.
fn run_to_end(cmd: Command) -> Result<String, String> {
    let shown = format!("{cmd:?}");
    let run =
        crate::test_guest::run_captured(cmd, RUN_TIMEOUT).map_err(|e| format!("{shown}: {e}"))?;
    if run.timed_out {
        return Err(format!("{shown}: no end after {RUN_TIMEOUT:?}"));
    }
    Ok(run.output)
}

/// `qemu-system-x86_64`: the QEMU 10 tree unpacked by `scripts/qemu10.sh` when it is
/// at `qemu10_bin`, else the one on `PATH`; with its data directory when not the system's.
pub fn find_qemu(qemu10_bin: &Path) -> Option<(PathBuf, Option<PathBuf>)> {
    let q10 = qemu10_bin.join("qemu-system-x86_64");
    if q10.is_file() {
        let data = qemu10_bin.parent().map(|usr| usr.join("share/qemu"));
        return Some((q10, data));
    }
    crate::test_guest::find_qemu().map(|q| (q, None))
}

/// The first line of `qemu --version` (e.g. `QEMU emulator version 10.0.2 (...)`).
pub fn qemu_version(qemu: &Path) -> String {
    Command::new(qemu)
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .map(str::to_string)
        })
        .unwrap_or_else(|| "unknown version".into())
}

/// The TSC rate, measured against the monotonic clock (the guest's TSC runs at it under
/// KVM): the guest's own PIT calibration is off by tens of percent on a loaded host.
pub fn tsc_khz() -> u64 {
    // SAFETY: RDTSC has no memory effects; x86-64 always has it.
    let tsc = || unsafe { core::arch::x86_64::_rdtsc() };
    let (t0, c0) = (Instant::now(), tsc());
    std::thread::sleep(Duration::from_millis(100));
    let (t1, c1) = (Instant::now(), tsc());
    let us = u64::try_from((t1 - t0).as_micros())
        .unwrap_or(u64::MAX)
        .max(1);
    (c1.wrapping_sub(c0) / us) * 1000
}

/// What [`run_all`] measured.
#[derive(Clone, Debug, Default)]
pub struct InVmResults {
    /// The figures per contender that ran.
    pub runs: Vec<(VmContender, Vec<VmFigures>)>,
    /// Host io_uring 4 KiB random reads at the guest's depth on the image, O_DIRECT, once
    /// per round before the guests (empty when no contender uses the file): what the
    /// disk itself gives, so that file rows near it show where the ceiling is.
    pub limit: Vec<f64>,
}

/// The guest's requests in flight at full depth (its slots per queue).
pub const GUEST_DEPTH: usize = 32;

/// Runs every contender of `which` `repeat` times, interleaved (one round of all, then
/// the next, every other round in reverse order so that no contender always follows the
/// same one), with the host limit on the file first in each round; prints a line per
/// run. A contender that fails is reported and left out; QEMU's are left out, saying so,
/// without QEMU.
pub fn run_all(which: &[VmContender], s: &VmSetup, repeat: usize) -> InVmResults {
    let mut results: Vec<(VmContender, Vec<VmFigures>)> =
        which.iter().map(|c| (*c, Vec::new())).collect();
    let mut limit = Vec::new();
    let uses_file = which.iter().any(|c| matches!(c.backing, Backing::File(_)));
    for round in 1..=repeat {
        if uses_file {
            match host_limit(s) {
                Ok(iops) => {
                    eprintln!("[{round}/{repeat}] {:<28} read {iops:>8.0}", "host-limit");
                    limit.push(iops);
                }
                Err(e) => eprintln!("[{round}/{repeat}] host-limit: {e}"),
            }
        }
        let mut order: Vec<usize> = (0..results.len()).collect();
        if round.is_multiple_of(2) {
            order.reverse();
        }
        for i in order {
            let (c, runs) = &mut results[i];
            if c.monitor != Monitor::Ours && s.qemu.is_none() {
                continue;
            }
            match run(c, s) {
                Ok(f) => {
                    eprintln!(
                        "[{round}/{repeat}] {:<28} read {:>8.0} : {:>8.0}  write {:>8.0} : {:>8.0}  \
                         QD1 {:>6.1} : {:>6.1} us (polled : irq), {:.1} reads per irq",
                        c.name,
                        f.iops_poll,
                        f.iops_irq,
                        f.write_poll,
                        f.write_irq,
                        f.lat_poll_us,
                        f.lat_irq_us,
                        f.ops_per_irq
                    );
                    runs.push(f);
                }
                Err(e) => eprintln!("[{round}/{repeat}] {}: {e}", c.name),
            }
        }
    }
    if s.qemu.is_none() {
        eprintln!(
            "SKIP QEMU in-VM contenders: qemu-system-x86_64 missing (apt-get install qemu-system-x86)"
        );
    }
    results.retain(|(_, runs)| !runs.is_empty());
    InVmResults {
        runs: results,
        limit,
    }
}

/// Host io_uring on the image: 4 KiB random reads at [`GUEST_DEPTH`], one phase long.
fn host_limit(s: &VmSetup) -> Result<f64, String> {
    let workload = super::workload::Workload {
        random: true,
        write: false,
        block_size: 4096,
        iodepth: GUEST_DEPTH,
        queues: 1,
    };
    let phase = Duration::from_millis(s.phase_ms);
    let r = super::host_uring::run(&s.file, workload, Duration::from_millis(200), phase)?;
    Ok(r.figures.iops)
}

/// The median of `v` (0 for none).
pub fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// The median of one figure over `runs`.
fn med_of(runs: &[VmFigures], f: impl Fn(&VmFigures) -> f64) -> f64 {
    median(&runs.iter().map(f).collect::<Vec<_>>())
}

/// The tables: per contender the medians of the read phases, and for ours the ratios
/// against QEMU with and without an iothread on the same backing; then the write IOPS and
/// QD1 read latencies likewise (ratios of latencies are QEMU's over ours: above 1 is
/// faster); last, the interrupt-driven phase per interrupt.
pub fn table(all: &InVmResults) -> String {
    let results = all.runs.as_slice();
    let mut out = read_table(results);
    if !all.limit.is_empty() {
        let limit = median(&all.limit);
        out += &format!(
            "{:<28}{:>12.0}{:>12}   (host io_uring, QD{GUEST_DEPTH}, O_DIRECT; {} runs)\n",
            "host-limit",
            limit,
            "",
            all.limit.len()
        );
        let shares: Vec<String> = results
            .iter()
            .filter(|(c, _)| matches!(c.backing, Backing::File(_)))
            .map(|(c, runs)| {
                let poll = med_of(runs, |f| f.iops_poll);
                format!("{} {:.2}", c.name, poll / limit.max(1.0))
            })
            .collect();
        if !shares.is_empty() {
            out += &format!("polled file reads / host limit: {}\n", shares.join(", "));
        }
    }
    out += &format!(
        "\n{:<28}{:>10}{:>10}{:>12}{:>12}{:>22}{:>22}\n",
        "in-VM, writes and QD1",
        "wr poll",
        "wr irq",
        "qd1 us poll",
        "qd1 us irq",
        "wr ours/qemu-iothr",
        "qd1 qemu-iothr/ours"
    );
    let find = |monitor: Monitor, backing: Backing| {
        results
            .iter()
            .find(|(c, _)| c.monitor == monitor && c.backing == backing)
            .map(|(_, runs)| runs.as_slice())
    };
    for (c, runs) in results {
        let m = |f: fn(&VmFigures) -> f64| med_of(runs, f);
        let (wp, wi, lp, li) = (
            m(|f| f.write_poll),
            m(|f| f.write_irq),
            m(|f| f.lat_poll_us),
            m(|f| f.lat_irq_us),
        );
        let mut vs_w = String::new();
        let mut vs_l = String::new();
        if c.monitor == Monitor::Ours
            && let Some(q) = find(Monitor::QemuIothread, c.backing)
        {
            let (qwp, qwi) = (med_of(q, |f| f.write_poll), med_of(q, |f| f.write_irq));
            let (qlp, qli) = (med_of(q, |f| f.lat_poll_us), med_of(q, |f| f.lat_irq_us));
            if qwp > 0.0 && qwi > 0.0 {
                vs_w = format!("{:.2} : {:.2}", wp / qwp, wi / qwi);
            }
            if lp > 0.0 && li > 0.0 {
                vs_l = format!("{:.2} : {:.2}", qlp / lp, qli / li);
            }
        }
        out += &format!(
            "{:<28}{:>10.0}{:>10.0}{:>12.1}{:>12.1}{:>22}{:>22}\n",
            c.name, wp, wi, lp, li, vs_w, vs_l
        );
    }
    out + &irq_table(results)
}

/// The interrupt-driven read phase per interrupt (see [`table`]): the reads one
/// interrupt covered, the cycle's length, and what waiting for an interrupt adds to a QD1
/// read (its latency with interrupts less the polled one, same run): the guest taking the
/// interrupt, plus the monitor's wake-up when it slept meanwhile. Ratios are
/// QEMU-iothread's over ours.
fn irq_table(results: &[(VmContender, Vec<VmFigures>)]) -> String {
    let cycle = |runs: &[VmFigures]| {
        let per_irq = med_of(runs, |f| f.ops_per_irq);
        let iops = med_of(runs, |f| f.iops_irq);
        let added = med_of(runs, |f| f.lat_irq_us - f.lat_poll_us);
        let us = if iops > 0.0 {
            per_irq / iops * 1e6
        } else {
            0.0
        };
        (per_irq, us, added)
    };
    let mut out = format!(
        "\n{:<28}{:>10}{:>11}{:>20}{:>22}\n",
        "in-VM, per interrupt", "reads", "cycle us", "QD1 irq-poll us", "qemu-iothr/ours"
    );
    for (c, runs) in results {
        let (per_irq, us, added) = cycle(runs);
        if per_irq == 0.0 {
            continue;
        }
        let mut vs = String::new();
        if c.monitor == Monitor::Ours
            && let Some((_, q)) = results
                .iter()
                .find(|(o, _)| o.monitor == Monitor::QemuIothread && o.backing == c.backing)
        {
            let (_, q_us, q_added) = cycle(q);
            if us > 0.0 && added > 0.0 {
                vs = format!("{:.2} : {:.2}", q_us / us, q_added / added);
            }
        }
        out += &format!(
            "{:<28}{:>10.1}{:>11.1}{:>20.1}{:>22}\n",
            c.name, per_irq, us, added, vs
        );
    }
    out
}

/// The read table (see [`table`]).
fn read_table(results: &[(VmContender, Vec<VmFigures>)]) -> String {
    let med = |c: &VmContender| {
        results.iter().find(|(x, _)| x == c).map(|(_, runs)| {
            (
                median(&runs.iter().map(|f| f.iops_poll).collect::<Vec<_>>()),
                median(&runs.iter().map(|f| f.iops_irq).collect::<Vec<_>>()),
            )
        })
    };
    let mut out = format!(
        "{:<28}{:>12}{:>12}{:>22}{:>22}\n",
        "in-VM, 4k randread", "polled", "irq", "ours/qemu-iothread", "ours/qemu-no-iothread"
    );
    for (c, runs) in results {
        let Some((poll, irq)) = med(c) else { continue };
        let ratio = |monitor: Monitor| {
            let other = ALL
                .iter()
                .find(|o| o.monitor == monitor && o.backing == c.backing)?;
            let (p, i) = med(other)?;
            (p > 0.0 && i > 0.0).then(|| format!("{:.2} : {:.2}", poll / p, irq / i))
        };
        let (vs_io, vs_plain) = if c.monitor == Monitor::Ours {
            (
                ratio(Monitor::QemuIothread).unwrap_or_default(),
                ratio(Monitor::Qemu).unwrap_or_default(),
            )
        } else {
            (String::new(), String::new())
        };
        out += &format!(
            "{:<28}{:>12.0}{:>12.0}{:>22}{:>22}   ({} runs)\n",
            c.name,
            poll,
            irq,
            vs_io,
            vs_plain,
            runs.len()
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup() -> VmSetup {
        VmSetup {
            elf: "/g".into(),
            vmm: "/vmm".into(),
            qemu: None,
            file: "/img.raw".into(),
            null_size: 1 << 30,
            phase_ms: 1000,
            tsc_khz: 2_000_000,
            dir: "/d".into(),
            iothread: None,
        }
    }

    #[test]
    fn qemu_gets_an_iothread_only_when_asked_and_o_direct_on_files() {
        let s = setup();
        let with = qemu_args(&ALL[4], &s, "x").join(" ");
        assert!(with.contains("-object iothread,id=io0"), "{with}");
        assert!(with.contains("iothread=io0"), "{with}");
        assert!(with.contains("cache.direct=on,aio=io_uring"), "{with}");
        let without = qemu_args(&ALL[5], &s, "x").join(" ");
        assert!(!without.contains("iothread"), "{without}");
        let null = qemu_args(&ALL[1], &s, "x").join(" ");
        assert!(null.contains("driver=null-co"), "{null}");
        assert!(null.contains("read-zeroes=on"), "{null}");
    }

    #[test]
    fn our_config_is_o_direct_on_files_and_null_otherwise() {
        let s = setup();
        let v: serde_json::Value = serde_json::from_str(&ours_config(&ALL[6], &s, "x")).unwrap();
        assert_eq!(v["disks"][0]["cache"], "none");
        assert_eq!(v["disks"][0]["aio"], "native");
        let v: serde_json::Value = serde_json::from_str(&ours_config(&ALL[0], &s, "x")).unwrap();
        assert_eq!(v["disks"][0]["path"], "null");
        assert!(v["disks"][0].get("iothread").is_none(), "its dedicated one");
        let tuned = VmSetup {
            iothread: Some("poll_max_ns=0,cpu_affinity=1:0".into()),
            ..s
        };
        let v: serde_json::Value =
            serde_json::from_str(&ours_config(&ALL[0], &tuned, "x")).unwrap();
        assert_eq!(v["disks"][0]["iothread"], "io0");
        assert_eq!(
            v["iothreads"][0],
            serde_json::json!({"id": "io0", "poll_max_ns": 0, "cpu_affinity": [1, 0]})
        );
        assert_eq!(
            iothread_json("cpu_affinity=2,id=x,poll_grow=4"),
            serde_json::json!({"id": "io0", "poll_grow": 4, "cpu_affinity": [2]}),
            "one CPU is still a list; the disk's iothread keeps its name"
        );
    }

    #[test]
    fn contender_lists_pick_by_name_and_group_in_run_order() {
        let names = |v: &[&str]| {
            parse_list(&v.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .map(|l| l.iter().map(|c| c.name).collect::<Vec<_>>())
        };
        assert_eq!(
            names(&["null"]).unwrap(),
            ["vm-ours-null", "vm-qemu-iothread-null", "vm-qemu-null"]
        );
        assert_eq!(
            names(&["vm-qemu-native", "ours"]).unwrap(),
            [
                "vm-ours-null",
                "vm-ours-io_uring",
                "vm-ours-native",
                "vm-qemu-native"
            ]
        );
        assert_eq!(names(&["native", "native"]).unwrap().len(), 3);
        assert_eq!(names(&["all"]).unwrap().len(), ALL.len());
        assert!(names(&["ours-null"]).unwrap_err().contains("vm-ours-null"));
        assert!(names(&[" "]).is_err());
    }

    #[test]
    fn figures_need_a_finished_guest_with_both_phases() {
        let report = |s: &str| parse_report(s);
        assert_eq!(
            figures(&report("disk0.iops_poll=10\ndisk0.iops_irq=5\nresult=ok\n")),
            Some(VmFigures {
                iops_poll: 10.0,
                iops_irq: 5.0,
                ..Default::default()
            })
        );
        let more = "disk0.iops_poll=10\ndisk0.iops_irq=5\ndisk0.iops_write_poll=8\n\
                    disk0.lat_qd1_ns_irq=45000\ndisk0.ops_irq=600\ndisk0.irqs=200\nresult=ok\n";
        let f = figures(&report(more)).unwrap();
        assert_eq!((f.write_poll, f.write_irq, f.lat_irq_us), (8.0, 0.0, 45.0));
        assert_eq!(f.ops_per_irq, 3.0);
        assert_eq!(
            figures(&report("disk0.iops_poll=10\ndisk0.iops_irq=5\n")),
            None
        );
        assert_eq!(figures(&report("disk0.iops_poll=10\nresult=ok\n")), None);
    }

    #[test]
    fn ratios_compare_ours_with_qemu_on_the_same_backing() {
        let f = |p, i| VmFigures {
            iops_poll: p,
            iops_irq: i,
            write_poll: p / 2.0,
            write_irq: i / 2.0,
            lat_poll_us: 10.0,
            lat_irq_us: 20.0,
            ops_per_irq: 4.0,
        };
        let results = vec![
            (
                ALL[0],
                vec![f(900.0, 300.0), f(1000.0, 200.0), f(800.0, 250.0)],
            ),
            (ALL[1], vec![f(450.0, 250.0)]),
            (ALL[2], vec![f(300.0, 100.0)]),
        ];
        let t = table(&InVmResults {
            runs: results,
            limit: vec![],
        });
        // Ours' rows of the read, write/QD1 and per-interrupt tables.
        let ours_row = |n: usize| {
            t.lines()
                .filter(|l| l.starts_with("vm-ours-null"))
                .nth(n)
                .unwrap()
        };
        let ours = ours_row(0);
        assert!(ours.contains("2.00 : 1.00"), "{t}");
        assert!(ours.contains("3.00 : 2.50"), "{t}");
        let writes = ours_row(1);
        assert!(
            writes.contains("2.00 : 1.00"),
            "writes against QEMU's iothread: {t}"
        );
        assert!(writes.contains("1.00 : 1.00"), "equal latencies: {t}");
        // Per interrupt 4 reads at 250 a second: a 16000 us cycle; interrupts add 10 us to
        // a QD1 read (20 us with them, 10 polled).
        let irq = ours_row(2);
        assert!(irq.contains("16000.0"), "{t}");
        assert!(irq.contains(" 10.0 "), "{t}");
        // QEMU's cycle 4 / 250 too: equal cycles.
        assert!(irq.contains("1.00 : 1.00"), "{t}");
        assert_eq!(median(&[3.0, 1.0, 2.0, 10.0]), 2.5);
    }

    #[test]
    fn file_rows_are_set_against_the_host_limit_of_the_same_run() {
        let f = |p| VmFigures {
            iops_poll: p,
            iops_irq: p,
            ..Default::default()
        };
        let all = InVmResults {
            runs: vec![(ALL[0], vec![f(900.0)]), (ALL[3], vec![f(80.0), f(84.0)])],
            limit: vec![100.0, 90.0, 200.0],
        };
        let t = table(&all);
        let limit = t.lines().find(|l| l.starts_with("host-limit")).unwrap();
        assert!(limit.contains(" 100 "), "median of the limit runs: {t}");
        assert!(
            t.contains("polled file reads / host limit: vm-ours-io_uring 0.82\n"),
            "{t}"
        );
        let without = table(&InVmResults {
            runs: all.runs.clone(),
            limit: vec![],
        });
        assert!(!without.contains("host-limit"), "{without}");
    }
}
