//! Linux boot smoke (docs/architecture.md, "Tests"): the Debian cloud kernel, as the PVH
//! `vmlinux` extracted from its bzImage, booted by our VMM with its ACPI tables, PCI root
//! complex and serial port, prints its banner, command line, e820 map and the ACPI tables
//! it found on our serial console. Guest kernel mode is emulated on these machines, so
//! the boot later dies on an instruction the emulator lacks; the test stops the VM once
//! the ACPI table list is out. Skips, saying why, without /dev/kvm, the kernel or lz4.

use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use vmm::config::VmConfig;
use vmm::vm::Vm;

use tests::skip::{kvm_or_skip, skip};

#[test]
fn debian_kernel_prints_banner_cmdline_e820_and_acpi_tables() {
    let test = "debian_kernel_prints_banner_cmdline_e820_and_acpi_tables";
    if !kvm_or_skip(test) {
        return;
    }
    let Some(bzimage) = tests::vmlinux::find_bzimage() else {
        return skip(
            test,
            "no /boot/vmlinuz-*-cloud-amd64 (apt-get install linux-image-cloud-amd64)",
        );
    };
    let vmlinux = match tests::vmlinux::extract(&bzimage, &tests::vmlinux::default_cache()) {
        Ok(p) => p,
        Err(e) => {
            return skip(
                test,
                &format!("cannot extract vmlinux ({e}); apt-get install lz4"),
            );
        }
    };
    smoke(&vmlinux, "PVH vmlinux");
}

/// The same through the Linux boot protocol: the bzImage decompresses itself first,
/// which takes about a minute and a half in emulated kernel mode here.
#[test]
fn debian_bzimage_prints_banner_cmdline_e820_and_acpi_tables() {
    let test = "debian_bzimage_prints_banner_cmdline_e820_and_acpi_tables";
    if !kvm_or_skip(test) {
        return;
    }
    let Some(bzimage) = tests::vmlinux::find_bzimage() else {
        return skip(
            test,
            "no /boot/vmlinuz-*-cloud-amd64 (apt-get install linux-image-cloud-amd64)",
        );
    };
    smoke(&bzimage, "bzImage");
}

/// Boots `kernel` and waits for the banner, command line, e820 map and ACPI table list.
fn smoke(kernel: &Path, what: &str) {
    let vmlinux = kernel;
    let dir = tempfile::tempdir().unwrap();
    let serial = dir.path().join("serial.log");
    let cmdline = "console=ttyS0 earlyprintk=serial panic=-1 smoke-test-marker=42";
    let config: VmConfig = serde_json::from_value(serde_json::json!({
        "id": "linux-smoke",
        "cpus": {"boot_vcpus": 1},
        "memory": {"size_mib": 256},
        "payload": {"kernel": vmlinux, "cmdline": cmdline},
        "serial": {"mode": "file", "path": serial},
    }))
    .unwrap();
    let mut vm = Vm::create(config).unwrap_or_else(|e| panic!("{e}"));
    vm.boot().unwrap_or_else(|e| panic!("{e}"));
    let started = Instant::now();
    let want = [
        "Linux version",
        "Command line: console=ttyS0",
        "smoke-test-marker=42",
        "BIOS-e820: [mem 0x0000000000000000-",
        "BIOS-e820: [mem 0x00000000e0000000-0x00000000efffffff] reserved",
        "ACPI: RSDP",
        "ACPI: XSDT",
        "ACPI: FACP",
        "ACPI: DSDT",
        "ACPI: APIC",
        "ACPI: MCFG",
    ];
    let mut console = String::new();
    let mut exit = None;
    while started.elapsed() < Duration::from_secs(300) {
        console = std::fs::read_to_string(&serial).unwrap_or_default();
        if want.iter().all(|w| console.contains(w)) {
            break;
        }
        if let Some(e) = vm.wait_timeout(Some(Duration::from_millis(200))) {
            exit = Some(e);
            console = std::fs::read_to_string(&serial).unwrap_or_default();
            break;
        }
    }
    let elapsed = started.elapsed();
    vm.shutdown();
    let missing: Vec<_> = want.iter().filter(|w| !console.contains(*w)).collect();
    assert!(
        missing.is_empty(),
        "after {elapsed:.1?} (exit {exit:?}) the console lacks {missing:?}:\n{console}"
    );
    let _ = writeln!(
        std::io::stdout(),
        "Debian kernel ({what}) on our VMM: banner, command line, e820 and 6 ACPI tables in {elapsed:.1?}"
    );
    print_lines(
        &console,
        &["Linux version", "Command line", "BIOS-e820", "ACPI: "],
    );
}

fn print_lines(console: &str, prefixes: &[&str]) {
    let mut out = std::io::stdout().lock();
    for line in console
        .lines()
        .filter(|l| prefixes.iter().any(|p| l.contains(p)))
    {
        let _ = writeln!(out, "  {}", line.trim_end());
    }
}
