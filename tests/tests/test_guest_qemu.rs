//! The freestanding test guest under QEMU (TCG unless `TEST_GUEST_ACCEL` says otherwise):
//! PCI enumeration, virtio-blk pattern checks, IOPS polled and with MSI-X interrupts, a
//! read-only disk refusing writes. Skips, saying why, when qemu-system-x86_64 is missing.

use std::io::Read;
use std::path::Path;

use tests::test_guest::{self, GuestRun, QemuDisk, QemuOptions};

fn skip_without_qemu(test: &str) -> bool {
    if test_guest::find_qemu().is_some() {
        return false;
    }
    tests::skip::skip(
        test,
        "qemu-system-x86_64 missing (apt-get install qemu-system-x86)",
    );
    true
}

use tests::image::sparse as image;

fn boot(opts: &QemuOptions) -> GuestRun {
    let elf = test_guest::build().unwrap_or_else(|e| panic!("{e}"));
    let run = test_guest::run_qemu(&elf, opts).unwrap_or_else(|e| panic!("{e}"));
    eprintln!(
        "{}\n--- {:.2?} (accel {})",
        run.console, run.elapsed, opts.accel
    );
    run
}

/// Checks one writable disk's report and that its first block holds the guest's pattern.
fn check_writable(run: &GuestRun, i: usize, img: &Path, queues: u64) {
    let k = |s: &str| format!("disk{i}.{s}");
    assert_eq!(run.get(&k("ro")), Some("0"));
    assert_eq!(run.get(&k("verify")), Some("ok"), "disk{i}");
    assert_eq!(run.num(&k("verified_blocks")), Some(64));
    assert_eq!(run.num(&k("num_queues")), Some(queues));
    assert_eq!(run.num(&k("write_errors")), Some(0));
    assert_eq!(run.num(&k("read_errors")), Some(0));
    check_common(run, i);
    let mut block = [0u8; 4096];
    std::fs::File::open(img)
        .and_then(|mut f| f.read_exact(&mut block))
        .unwrap_or_else(|e| panic!("{}: {e}", img.display()));
    for (w, chunk) in block.chunks_exact(8).enumerate() {
        let mut b = [0u8; 8];
        b.copy_from_slice(chunk);
        assert_eq!(
            u64::from_le_bytes(b),
            test_guest::pattern_word(1, 0, w as u64),
            "disk{i} image word {w}"
        );
    }
}

fn check_common(run: &GuestRun, i: usize) {
    let k = |s: &str| format!("disk{i}.{s}");
    for key in ["iops_poll", "iops_irq", "irqs"] {
        let v = run.num(&k(key)).unwrap_or(0);
        assert!(v > 0, "disk{i}.{key}={v}");
    }
}

#[test]
fn one_disk_patterns_iops_and_msix() {
    if skip_without_qemu("one_disk_patterns_iops_and_msix") {
        return;
    }
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let img = image(dir.path(), "d0.raw", 64);
    let run = boot(&QemuOptions::new(vec![QemuDisk::new(&img)]));
    assert!(run.succeeded(), "guest failed (exit {:?})", run.exit_code);
    assert_eq!(run.num("disks"), Some(1));
    assert_eq!(run.get("pci.access"), Some("ecam"));
    assert_eq!(run.num("unexpected_irqs"), Some(0));
    check_writable(&run, 0, &img, 1);
}

#[test]
fn three_disks_multiqueue_readonly_port_io() {
    if skip_without_qemu("three_disks_multiqueue_readonly_port_io") {
        return;
    }
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let imgs = [
        image(dir.path(), "d0.raw", 32),
        image(dir.path(), "d1.raw", 16),
        image(dir.path(), "d2.raw", 16),
    ];
    let mut disks: Vec<QemuDisk> = imgs.iter().map(QemuDisk::new).collect();
    disks[0].num_queues = 2;
    disks[1].readonly = true;
    let mut opts = QemuOptions::new(disks);
    opts.cmdline = "ms=150 pci=port".into();
    let run = boot(&opts);
    assert!(run.succeeded(), "guest failed (exit {:?})", run.exit_code);
    assert_eq!(run.num("disks"), Some(3));
    assert_eq!(run.get("pci.access"), Some("port"));
    check_writable(&run, 0, &imgs[0], 2);
    check_writable(&run, 2, &imgs[2], 1);
    assert_eq!(run.get("disk1.ro"), Some("1"));
    assert_eq!(run.get("disk1.ro_write"), Some("ioerr"));
    assert_eq!(run.num("disk1.read_errors"), Some(0));
    check_common(&run, 1);
    let untouched = std::fs::read(&imgs[1]).unwrap_or_default();
    assert!(untouched.iter().all(|&b| b == 0), "read-only image written");
}

#[test]
fn failing_guest_is_reported() {
    if skip_without_qemu("failing_guest_is_reported") {
        return;
    }
    // No disk at all: the guest must report failure (exit status 3), not success.
    let run = boot(&QemuOptions::new(Vec::new()));
    assert_eq!(run.num("disks"), Some(0));
    assert_eq!(run.get("result"), Some("fail"));
    assert_eq!(run.exit_code, Some(3));
    assert!(!run.succeeded());
}
