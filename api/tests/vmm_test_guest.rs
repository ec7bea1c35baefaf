//! The `vmm` binary runs the freestanding test guest (docs/architecture.md, "Tests") under
//! KVM and exits 0 when the guest powers off. Skips, saying why, when `/dev/kvm` is
//! missing.

use std::io::Write;
use std::path::Path;
use std::process::Command;

use tests::test_guest::{self, parse_report};

fn skip_without_kvm(test: &str) -> bool {
    if vmm::kvm_available() {
        return false;
    }
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "SKIP {test}: /dev/kvm is missing or not accessible");
    let _ = out.flush();
    true
}

/// The vCPUs' TSC frequency as KVM reports it (the guest's own calibration is off on a
/// loaded host).
fn host_tsc_khz() -> u32 {
    let vm = vmm::kvm::Vm::new().unwrap_or_else(|e| panic!("{e}"));
    let vcpu = vmm::kvm::Vcpu::new(&vm, 0, 1).unwrap_or_else(|e| panic!("{e}"));
    vcpu.fd()
        .get_tsc_khz()
        .unwrap_or_else(|e| panic!("KVM_GET_TSC_KHZ: {e}"))
}

fn console(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("serial.log")).unwrap_or_default()
}

#[test]
fn binary_runs_the_guest_and_exits_zero_on_poweroff() {
    if skip_without_kvm("binary_runs_the_guest_and_exits_zero_on_poweroff") {
        return;
    }
    let elf = test_guest::build().unwrap_or_else(|e| panic!("{e}"));
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let img = tests::image::sparse(dir.path(), "d0.raw", 16);
    let config = serde_json::json!({
        "id": "tg",
        "cpus": {"boot_vcpus": 1},
        "memory": {"size_mib": 128},
        "payload": {
            "kernel": elf,
            "cmdline": format!("exit=acpi pci=auto tsc_khz={} ms=50", host_tsc_khz()),
        },
        "serial": {"mode": "file", "path": dir.path().join("serial.log")},
        "disks": [{"id": "d0", "path": img, "cache": "writeback"}],
    });
    let path = dir.path().join("vm.json");
    std::fs::write(&path, config.to_string()).unwrap_or_else(|e| panic!("{e}"));
    let out = Command::new(env!("CARGO_BIN_EXE_vmm"))
        .arg("--config")
        .arg(&path)
        .output()
        .unwrap_or_else(|e| panic!("{e}"));
    let console = console(dir.path());
    assert!(
        out.status.success(),
        "vmm exited {:?}\nstderr: {}\nconsole:\n{console}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        parse_report(&console).get("result").map(String::as_str),
        Some("ok")
    );
}
