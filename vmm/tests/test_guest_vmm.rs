//! The freestanding test guest (docs/architecture.md, "Tests") on our VMM under KVM:
//! PCI enumeration, virtio-blk through ioeventfd (notify) and irqfd (MSI-X), pattern
//! checks, IOPS polled and with interrupts, a read-only disk, a throttled disk,
//! pause/resume during I/O, ACPI poweroff, and the disk lock between two VMs.
//! Skips, saying why, when `/dev/kvm` is missing.

#![allow(clippy::cast_precision_loss)] // Test data and figures, not guest input.

use std::io::{Read, Write};
use std::path::Path;
use std::time::{Duration, Instant};

use tests::test_guest::{self, parse_report};
use vmm::config::VmConfig;
use vmm::vm::{Vm, VmError, VmExit};

/// How long one guest run may take.
const RUN_TIMEOUT: Duration = Duration::from_secs(120);

fn skip_without_kvm(test: &str) -> bool {
    !tests::skip::kvm_or_skip(test)
}

use tests::image::sparse as image;

/// A VM config for the test guest with `cmdline` and `disks` (JSON objects), the serial
/// console in `dir/serial.log`.
fn guest_config(dir: &Path, cmdline: &str, extra: &str, disks: &[String]) -> VmConfig {
    let elf = test_guest::build().unwrap_or_else(|e| panic!("{e}"));
    let json = format!(
        r#"{{"id": "tg", "cpus": {{"boot_vcpus": 1}}, "memory": {{"size_mib": 128}},
            "payload": {{"kernel": {kernel:?}, "cmdline": {cmdline:?}}},
            "serial": {{"mode": "file", "path": {serial:?}}}{extra},
            "disks": [{disks}]}}"#,
        kernel = elf.display().to_string(),
        cmdline = format!("exit=acpi pci=auto tsc_khz={} {cmdline}", host_tsc_khz()),
        serial = dir.join("serial.log").display().to_string(),
        disks = disks.join(","),
    );
    VmConfig::from_json(&json).unwrap_or_else(|e| panic!("{json}\n{:?}", e.details()))
}

/// The vCPUs' TSC frequency as KVM reports it: the guest's PIT calibration is off by
/// tens of percent on a loaded host, which would skew every IOPS figure.
fn host_tsc_khz() -> u32 {
    static KHZ: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    *KHZ.get_or_init(|| {
        let vm = vmm::kvm::Vm::new().unwrap_or_else(|e| panic!("{e}"));
        let vcpu = vmm::kvm::Vcpu::new(&vm, 0, 1).unwrap_or_else(|e| panic!("{e}"));
        vcpu.fd()
            .get_tsc_khz()
            .unwrap_or_else(|e| panic!("KVM_GET_TSC_KHZ: {e}"))
    })
}

fn disk(id: &str, path: &Path, rest: &str) -> String {
    format!(
        r#"{{"id": {id:?}, "path": {p:?}, "cache": "writeback"{rest}}}"#,
        p = path.display().to_string()
    )
}

/// The serial console of a run in `dir`.
fn console(dir: &Path) -> String {
    let mut s = String::new();
    if let Ok(mut f) = std::fs::File::open(dir.join("serial.log")) {
        let _ = f.read_to_string(&mut s);
    }
    s
}

struct Run {
    exit: VmExit,
    console: String,
    values: std::collections::BTreeMap<String, String>,
}

impl Run {
    fn get(&self, k: &str) -> Option<&str> {
        self.values.get(k).map(String::as_str)
    }
    fn num(&self, k: &str) -> u64 {
        self.get(k).and_then(|v| v.parse().ok()).unwrap_or(0)
    }
}

/// Boots `config`, calling `during` while it runs, and waits for the guest to end.
fn run_vm(dir: &Path, config: VmConfig, during: impl FnOnce(&mut Vm)) -> Run {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("VMM_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_test_writer()
        .try_init();
    let start = Instant::now();
    let mut vm = Vm::create(config).unwrap_or_else(|e| panic!("create: {e}"));
    vm.boot().unwrap_or_else(|e| panic!("boot: {e}"));
    during(&mut vm);
    let exit = match vm.wait_timeout(Some(RUN_TIMEOUT)) {
        Some(e) => e,
        None => {
            vm.shutdown();
            panic!("guest timed out; console:\n{}", console(dir));
        }
    };
    drop(vm);
    let console = console(dir);
    eprintln!("{console}\n--- {:.2?}", start.elapsed());
    Run {
        exit,
        values: parse_report(&console),
        console,
    }
}

fn check_ok(run: &Run, disks: u64) {
    assert_eq!(run.exit, VmExit::Poweroff, "console:\n{}", run.console);
    assert_eq!(run.get("result"), Some("ok"), "console:\n{}", run.console);
    assert_eq!(run.num("disks"), disks);
    assert_eq!(run.num("unexpected_irqs"), 0);
}

fn check_disk(run: &Run, i: usize, img: &Path, queues: u64, ro: bool) {
    let k = |s: &str| format!("disk{i}.{s}");
    assert_eq!(run.num(&k("num_queues")), queues, "disk{i}");
    assert_eq!(run.num(&k("read_errors")), 0, "disk{i}");
    for key in ["iops_poll", "iops_irq", "irqs"] {
        assert!(run.num(&k(key)) > 0, "disk{i}.{key}");
    }
    let mut out = std::io::stdout().lock();
    let _ = writeln!(
        out,
        "disk{i}: iops_poll={} iops_irq={} irqs={}",
        run.num(&k("iops_poll")),
        run.num(&k("iops_irq")),
        run.num(&k("irqs"))
    );
    let data = std::fs::read(img).unwrap_or_default();
    if ro {
        assert_eq!(run.get(&k("ro")), Some("1"));
        assert_eq!(run.get(&k("ro_write")), Some("ioerr"));
        assert!(data.iter().all(|&b| b == 0), "read-only image written");
        return;
    }
    assert_eq!(run.get(&k("verify")), Some("ok"), "disk{i}");
    assert_eq!(run.num(&k("write_errors")), 0, "disk{i}");
    assert!(data.len() >= 4096);
    for (w, chunk) in data[..4096].chunks_exact(8).enumerate() {
        let mut b = [0u8; 8];
        b.copy_from_slice(chunk);
        assert_eq!(
            u64::from_le_bytes(b),
            test_guest::pattern_word(1, 0, w as u64),
            "disk{i} image word {w}"
        );
    }
}

#[test]
fn one_disk_on_kvm() {
    if skip_without_kvm("one_disk_on_kvm") {
        return;
    }
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let img = image(dir.path(), "d0.raw", 64);
    let config = guest_config(dir.path(), "ms=200", "", &[disk("d0", &img, "")]);
    let run = run_vm(dir.path(), config, |_| {});
    check_ok(&run, 1);
    assert_eq!(run.get("pci.access"), Some("ecam"));
    check_disk(&run, 0, &img, 1, false);
}

#[test]
fn three_disks_iothreads_multiqueue_readonly() {
    if skip_without_kvm("three_disks_iothreads_multiqueue_readonly") {
        return;
    }
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let imgs = [
        image(dir.path(), "d0.raw", 32),
        image(dir.path(), "d1.raw", 16),
        image(dir.path(), "d2.raw", 16),
    ];
    let config = guest_config(
        dir.path(),
        "ms=150",
        r#", "iothreads": [{"id": "shared"}, {"id": "io1"}]"#,
        &[
            disk(
                "d0",
                &imgs[0],
                r#", "num_queues": 2, "iothread_vq_mapping":
                   [{"iothread": "shared", "vqs": [0]}, {"iothread": "io1", "vqs": [1]}]"#,
            ),
            disk(
                "d1",
                &imgs[1],
                r#", "readonly": true, "iothread": "shared""#,
            ),
            disk("d2", &imgs[2], ""),
        ],
    );
    let run = run_vm(dir.path(), config, |_| {});
    check_ok(&run, 3);
    check_disk(&run, 0, &imgs[0], 2, false);
    check_disk(&run, 1, &imgs[1], 1, true);
    check_disk(&run, 2, &imgs[2], 1, false);
}

#[test]
fn throttled_disk_iops_match_the_limit() {
    if skip_without_kvm("throttled_disk_iops_match_the_limit") {
        return;
    }
    const LIMIT: u64 = 2000;
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let img = image(dir.path(), "d0.raw", 16);
    let config = guest_config(
        dir.path(),
        "ms=1000 blocks=16",
        "",
        &[disk(
            "d0",
            &img,
            &format!(r#", "throttle": {{"iops_total": {LIMIT}}}"#),
        )],
    );
    let run = run_vm(dir.path(), config, |_| {});
    check_ok(&run, 1);
    for key in ["disk0.iops_poll", "disk0.iops_irq"] {
        let iops = run.num(key);
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "throttled {key}={iops} (limit {LIMIT})");
        let err = iops.abs_diff(LIMIT) as f64 / LIMIT as f64;
        assert!(err <= 0.05, "{key}={iops}, limit {LIMIT}");
    }
}

#[test]
fn pause_resume_during_io_loses_nothing() {
    if skip_without_kvm("pause_resume_during_io_loses_nothing") {
        return;
    }
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let img = image(dir.path(), "d0.raw", 32);
    let config = guest_config(dir.path(), "ms=400", "", &[disk("d0", &img, "")]);
    let run = run_vm(dir.path(), config, |vm| {
        for _ in 0..8 {
            std::thread::sleep(Duration::from_millis(60));
            vm.pause().unwrap_or_else(|e| panic!("pause: {e}"));
            assert_eq!(vm.state(), vmm::vm::VmState::Paused);
            std::thread::sleep(Duration::from_millis(30));
            vm.resume().unwrap_or_else(|e| panic!("resume: {e}"));
        }
    });
    check_ok(&run, 1);
    check_disk(&run, 0, &img, 1, false);
}

#[test]
fn second_vm_on_the_same_writable_image_is_refused() {
    if skip_without_kvm("second_vm_on_the_same_writable_image_is_refused") {
        return;
    }
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let img = image(dir.path(), "d0.raw", 16);
    let config = guest_config(dir.path(), "", "", &[disk("d0", &img, "")]);
    let first = Vm::create(config.clone()).unwrap_or_else(|e| panic!("first VM: {e}"));
    // Its own console (the first VM's console file is locked as well).
    let mut second = config.clone();
    second.serial.path = Some(dir.path().join("second.log"));
    match Vm::create(second) {
        Err(e @ VmError::Disk { .. }) => {
            let msg = e.to_string();
            assert!(msg.contains("lock"), "{msg}");
        }
        Err(e) => panic!("wrong error: {e}"),
        Ok(_) => panic!("second VM opened a locked image"),
    }
    drop(first);
    // Once the first VM is gone the image is free again.
    drop(Vm::create(config).unwrap_or_else(|e| panic!("third VM: {e}")));
}

/// The benchmark phases (`more=1`): random writes at full depth land on the disk, and the
/// QD1 read latency is reported for both completion modes.
#[test]
fn write_and_qd1_latency_phases() {
    if skip_without_kvm("write_and_qd1_latency_phases") {
        return;
    }
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let img = image(dir.path(), "d0.raw", 16);
    let config = guest_config(
        dir.path(),
        "ms=100 blocks=0 span_mib=16 more=1",
        "",
        &[disk("d0", &img, "")],
    );
    let run = run_vm(dir.path(), config, |_| {});
    check_ok(&run, 1);
    for key in [
        "disk0.iops_write_poll",
        "disk0.iops_write_irq",
        "disk0.lat_qd1_ns_poll",
        "disk0.lat_qd1_ns_irq",
    ] {
        assert!(run.num(key) > 0, "{key}: console:\n{}", run.console);
    }
    // The writes reached the image: it is no longer all zeroes.
    let data = std::fs::read(&img).unwrap_or_else(|e| panic!("{e}"));
    assert!(data.iter().any(|&b| b != 0), "no write reached the image");
}
