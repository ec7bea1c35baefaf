//! PCI hot plug on KVM with the test guest acting as the guest OS's ACPI hot plug
//! driver (tests/guest/src/hotplug.rs): it takes the GED interrupt through the IOAPIC,
//! reads the controller's registers, probes each plugged slot and verifies I/O on the new
//! disk, and for each eject request resets the device and writes `B0EJ`. The AML side (the
//! DSDT's `PCNT`, `_EJ0`, `_EVT`) is run by ACPICA's acpiexec in acpi_iasl.rs.
//! Skips, saying why, when `/dev/kvm` is missing.

use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use devices::config::DiskConfig;
use tests::skip::kvm_or_skip;
use tests::test_guest::{self, parse_report};
use vmm::config::VmConfig;
use vmm::vm::{Vm, VmExit};

const WAIT: Duration = Duration::from_secs(60);

use tests::image::sparse as image;

fn console(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("serial.log")).unwrap_or_default()
}

/// Waits until the console has a whole line starting with `prefix`; returns it.
fn wait_line(dir: &Path, vm: &mut Vm, prefix: &str) -> String {
    let deadline = Instant::now() + WAIT;
    loop {
        let text = console(dir);
        // Whole lines only: the guest writes the console a byte at a time.
        let whole = text.split_inclusive('\n').filter(|l| l.ends_with('\n'));
        if let Some(l) = whole.into_iter().find(|l| l.starts_with(prefix)) {
            return l.trim_end().to_string();
        }
        if let Some(exit) = vm.wait_timeout(Some(Duration::ZERO)) {
            panic!("guest ended ({exit:?}) before {prefix:?}; console:\n{text}");
        }
        assert!(
            Instant::now() < deadline,
            "no {prefix:?} on the console:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// `key=value` of a console line.
fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split_whitespace()
        .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
}

fn disk_json(id: &str, path: &Path, rest: &str) -> String {
    format!(
        r#"{{"id": {id:?}, "path": {p:?}, "cache": "writeback"{rest}}}"#,
        p = path.display().to_string()
    )
}

fn disk(id: &str, path: &Path, rest: &str) -> DiskConfig {
    serde_json::from_str(&disk_json(id, path, rest)).unwrap_or_else(|e| panic!("{e}"))
}

/// Whether another user could open `path` writable now (the VM released its lock).
fn unlocked(path: &Path) -> bool {
    block::Disk::open(&block::DiskOptions::new(path)).is_ok()
}

#[test]
fn disks_hot_plugged_and_ejected_while_the_guest_runs() {
    if !kvm_or_skip("disks_hot_plugged_and_ejected_while_the_guest_runs") {
        return;
    }
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let d = dir.path();
    let (a, b, c) = (
        image(d, "a.raw", 8),
        image(d, "b.raw", 8),
        image(d, "c.raw", 8),
    );
    let elf = test_guest::build().unwrap_or_else(|e| panic!("{e}"));
    let json = format!(
        r#"{{"id": "hp", "cpus": {{"boot_vcpus": 1}}, "memory": {{"size_mib": 128}},
            "payload": {{"kernel": {kernel:?}, "cmdline": "exit=acpi ms=20 blocks=8 hotplug=4"}},
            "serial": {{"mode": "file", "path": {serial:?}}},
            "iothreads": [{{"id": "io0"}}],
            "disks": [{d0}]}}"#,
        kernel = elf.display().to_string(),
        serial = d.join("serial.log").display().to_string(),
        d0 = disk_json("d0", &a, ""),
    );
    let config = VmConfig::from_json(&json).unwrap_or_else(|e| panic!("{:?}", e.details()));
    let mut vm = Vm::create(config).unwrap_or_else(|e| panic!("create: {e}"));
    vm.boot().unwrap_or_else(|e| panic!("boot: {e}"));
    wait_line(d, &mut vm, "hotplug.ready=1");
    let threads = |vm: &Vm| -> Vec<String> {
        vm.devices()
            .all_iothreads()
            .into_iter()
            .map(|(n, _)| n)
            .collect()
    };

    // 1. Plug d1 (its own dedicated iothread): the guest finds it and verifies I/O.
    let s1 = vm
        .hot_add_disk(disk("d1", &b, ""))
        .unwrap_or_else(|e| panic!("add d1: {e}"));
    let added = wait_line(d, &mut vm, &format!("hotplug.added slot={s1} "));
    assert_eq!(field(&added, "verify"), Some("ok"), "{added}");
    let irqs1: u64 = field(&added, "irqs")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    assert!(
        irqs1 >= 1,
        "no hot plug interrupt reached the guest: {added}"
    );
    assert!(threads(&vm).contains(&"dedicated:d1".to_string()));
    let c1 = vm.devices().disk("d1").map(|x| x.counters());
    assert!(
        c1.as_ref()
            .is_some_and(|c| c.io.write.ops >= 16 && c.io.read.ops >= 16),
        "d1 counters: {c1:?}"
    );
    // A duplicate id and an image in use are refused; the VM keeps running.
    assert!(vm.hot_add_disk(disk("d1", &c, "")).is_err());
    assert!(vm.hot_add_disk(disk("dx", &b, "")).is_err());

    // 2. Eject d0 (cold plugged): the guest lets go, the slot empties, the lock goes.
    assert!(!unlocked(&a), "d0's image should be locked while attached");
    let s0 = vm.devices().disk_slot("d0").unwrap_or(0);
    vm.request_disk_removal("d0")
        .unwrap_or_else(|e| panic!("remove d0: {e}"));
    let ejected = wait_line(d, &mut vm, &format!("hotplug.ejected slot={s0} "));
    assert_eq!(field(&ejected, "gone"), Some("1"), "{ejected}");
    let irqs2: u64 = field(&ejected, "irqs")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    assert!(
        irqs2 > irqs1,
        "the eject request raised no interrupt: {ejected}"
    );
    assert_eq!(vm.take_ejected(), ["d0"]);
    assert!(vm.devices().disk("d0").is_none());
    assert!(vm.config().disks.iter().all(|x| x.id != "d0"));
    assert!(unlocked(&a), "d0's image is still locked after the eject");

    // 3. Plug d2 on the named iothread: it takes the freed slot.
    let s2 = vm
        .hot_add_disk(disk("d2", &c, r#", "iothread": "io0""#))
        .unwrap_or_else(|e| panic!("add d2: {e}"));
    assert_eq!(s2, s0, "the freed slot is reused");
    let added = wait_line(d, &mut vm, &format!("hotplug.added slot={s2} "));
    assert_eq!(field(&added, "verify"), Some("ok"), "{added}");

    // 4. Eject d1: its dedicated iothread stops.
    vm.request_disk_removal("d1")
        .unwrap_or_else(|e| panic!("remove d1: {e}"));
    assert_eq!(vm.pending_removals(), ["d1"]);
    let ejected = wait_line(d, &mut vm, &format!("hotplug.ejected slot={s1} "));
    assert_eq!(field(&ejected, "gone"), Some("1"), "{ejected}");

    let exit = vm.wait_timeout(Some(WAIT));
    let text = console(d);
    assert_eq!(exit, Some(VmExit::Poweroff), "console:\n{text}");
    let report = parse_report(&text);
    assert_eq!(
        report.get("result").map(String::as_str),
        Some("ok"),
        "{text}"
    );
    assert_eq!(vm.take_ejected(), ["d1"]);
    assert!(
        !threads(&vm).contains(&"dedicated:d1".to_string()),
        "{:?}",
        threads(&vm)
    );
    let ids: Vec<String> = vm.config().disks.iter().map(|x| x.id.clone()).collect();
    assert_eq!(ids, ["d2"]);
    drop(vm);
    assert!(unlocked(&b) && unlocked(&c));
    let _ = writeln!(
        std::io::stdout(),
        "hot plug: slots d1={s1} d0={s0} d2={s2}; guest saw {irqs2}+ interrupts"
    );
}

#[test]
fn removal_on_a_created_vm_is_immediate() {
    if !kvm_or_skip("removal_on_a_created_vm_is_immediate") {
        return;
    }
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let d = dir.path();
    let (a, b) = (image(d, "a.raw", 8), image(d, "b.raw", 8));
    let elf = test_guest::build().unwrap_or_else(|e| panic!("{e}"));
    let json = format!(
        r#"{{"id": "c", "memory": {{"size_mib": 64}},
            "payload": {{"kernel": {kernel:?}, "cmdline": "exit=acpi"}},
            "serial": {{"mode": "null"}}, "disks": [{d0}]}}"#,
        kernel = elf.display().to_string(),
        d0 = disk_json("d0", &a, ""),
    );
    let config = VmConfig::from_json(&json).unwrap_or_else(|e| panic!("{:?}", e.details()));
    let mut vm = Vm::create(config).unwrap_or_else(|e| panic!("create: {e}"));
    vm.hot_add_disk(disk("d1", &b, ""))
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(vm.devices().hotplug().present().count_ones(), 2);
    vm.request_disk_removal("d0")
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(vm.devices().disk("d0").is_none());
    assert!(unlocked(&a));
    assert!(vm.request_disk_removal("nope").is_err());
    let ids: Vec<String> = vm.config().disks.iter().map(|x| x.id.clone()).collect();
    assert_eq!(ids, ["d1"]);
    vm.shutdown();
    assert!(vm.hot_add_disk(disk("d2", &a, "")).is_err(), "shut down");
}
