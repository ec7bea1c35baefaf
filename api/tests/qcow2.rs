//! qcow2 disks under `vmmd`, in a sandboxed VM process: the test guest writes a
//! pattern with a per-pass generation number to random blocks of a qcow2 overlay (made
//! by `qemu-img create -b base.raw -F raw`) on a throttled iothread, and verifies every
//! block it wrote. Then `qemu-img check` finds no error, the overlay (read by
//! `qemu-img convert`) holds exactly what the guest wrote over the base, and the base
//! is unchanged. A raw file named as qcow2 is refused with a clear 400.
//!
//! Skips, saying why, without `/dev/kvm` or `qemu-img`.

#![allow(clippy::cast_possible_truncation)] // Test data and offsets, not guest input.

use std::process::Command;
use std::time::Duration;

mod support;

use serde_json::json;
use support::{Events, Service, expect};

const SEED: u64 = 3;
const SPAN_MIB: u64 = 16;

use support::console_value as value;

fn qemu_img(args: &[&str]) -> String {
    let out = Command::new("qemu-img").args(args).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "qemu-img {args:?}: {text}{out:?}");
    text
}

/// A qcow2 overlay named `name` in the service's directory over the raw `base`.
fn overlay_on(s: &Service, base: &std::path::Path, name: &str) -> std::path::PathBuf {
    let overlay = s.path(name);
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        base.to_str().unwrap(),
        "-F",
        "raw",
        overlay.to_str().unwrap(),
    ]);
    overlay
}

#[test]
fn the_test_guest_writes_and_verifies_a_qcow2_overlay() {
    let test = "the_test_guest_writes_and_verifies_a_qcow2_overlay";
    if !tests::skip::kvm_or_skip(test) || !tests::nbd_server::have("qemu-img", test, "qemu-utils") {
        return;
    }
    let s = Service::start(&[]);
    let events = Events::follow(&s.socket);
    let base = s.image("base.raw", 32);
    let before = std::fs::read(&base).unwrap();
    let overlay = overlay_on(&s, &base, "d0.qcow2");
    let elf = support::guest();
    let tsc = support::tsc_khz();
    let vm = |id: &str, path: &std::path::Path| {
        json!({
            "id": id,
            "memory": {"size_mib": 64},
            "payload": {"kernel": elf, "cmdline": format!(
                "exit=acpi pci=auto tsc_khz={tsc} ms=50 blocks=1 seed={SEED} gens=40 gen_writes=32 gen_span_mib={SPAN_MIB}")},
            "serial": {"mode": "file", "path": s.path(&format!("{id}.serial"))},
            "iothreads": [{"id": "io0"}],
            "disks": [{"id": "d0", "path": path, "format": "qcow2", "iothread": "io0",
                       "cache": "none", "throttle": {"iops_total": 4000}}]
        })
    };
    // A raw file is not qcow2: refused at create, saying why.
    let r = s.put("vm.create", &vm("bad", &base));
    expect(&r, 400, &["not a qcow2 image"]);

    s.ok("PUT", "vm.create", Some(&vm("q", &overlay)));
    let info = s.ok("GET", "vm.info?id=q", None).json();
    assert_eq!(info["config"]["disks"][0]["format"], "qcow2", "{info}");
    s.ok("PUT", "vm.boot?id=q", None);
    let console = || std::fs::read_to_string(s.path("q.serial")).unwrap_or_default();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !events
        .drain()
        .iter()
        .any(|e| e["vm"] == "q" && e["event"] == "guest-poweroff")
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the guest did not finish: {}",
            console()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = console();
    assert_eq!(value(&out, "disk0.gens_verify"), "ok", "{out}");
    assert_eq!(value(&out, "disk0.verify"), "ok", "{out}");
    assert_eq!(value(&out, "disk0.capacity_sectors"), "65536", "{out}");
    s.ok("PUT", "vm.delete?id=q", None);

    let data = tests::image::qcow2_bytes(&overlay);
    let untouched = |b: u64| -> Vec<u8> {
        let off = ((b + 1) * 4096) as usize;
        (off..off + 4096).map(|i| (i % 251) as u8).collect()
    };
    let gens = value(&out, "disk0.gen").parse().unwrap_or(0);
    let (blocks, digest) =
        tests::test_guest::gens_digest(&data, SEED, SPAN_MIB * 256, gens, &untouched)
            .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        blocks.to_string(),
        value(&out, "disk0.gens_blocks"),
        "{out}"
    );
    assert_eq!(digest, value(&out, "disk0.gens_digest"), "{out}");
    assert!(
        std::fs::read(&base).unwrap() == before,
        "the backing file is unchanged"
    );
}

/// Waits for a complete console line of VM `id` starting with `prefix`; fails if the VM
/// stops first or 60 s pass.
fn wait_line(s: &Service, id: &str, prefix: &str) -> String {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let log = std::fs::read_to_string(s.path(&format!("{id}.serial"))).unwrap_or_default();
        if let Some(l) = log
            .split_inclusive('\n')
            .find(|l| l.ends_with('\n') && l.starts_with(prefix))
        {
            return l.trim_end().to_string();
        }
        let state = s.state(id);
        assert!(
            std::time::Instant::now() < deadline && state == "Running",
            "{id}: no {prefix:?} line; state {state}:\n{log}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A qcow2 overlay hot plugged into a running VM (throttled, on its own iothread):
/// the guest, acting as an OS's ACPI hot plug driver, brings it up and verifies what
/// it writes; the disk is then unplugged. `qemu-img check` finds the overlay sound,
/// holding the guest's writes itself, and its backing file is unchanged.
#[test]
fn a_qcow2_overlay_hot_plugs_into_a_running_vm_and_out_again() {
    let test = "a_qcow2_overlay_hot_plugs_into_a_running_vm_and_out_again";
    if !tests::skip::kvm_or_skip(test) || !tests::nbd_server::have("qemu-img", test, "qemu-utils") {
        return;
    }
    let s = Service::start(&[]);
    let base = s.image("hot-base.raw", 8);
    let before = std::fs::read(&base).unwrap();
    let overlay = overlay_on(&s, &base, "hot.qcow2");
    let elf = support::guest();
    let tsc = support::tsc_khz();
    let d0 = s.sparse_image("h-0.raw", 8);
    s.ok(
        "PUT",
        "vm.create",
        Some(&json!({
            "id": "h",
            "memory": {"size_mib": 64},
            "payload": {"kernel": elf, "cmdline": format!(
                "exit=acpi pci=auto tsc_khz={tsc} ms=50 hotplug=2")},
            "serial": {"mode": "file", "path": s.path("h.serial")},
            "disks": [{"id": "d0", "path": d0, "cache": "writeback"}]
        })),
    );
    s.ok("PUT", "vm.boot?id=h", None);
    wait_line(&s, "h", "hotplug.ready=1");
    s.ok(
        "PUT",
        "vm.add-disk?id=h",
        Some(
            &json!({"id": "q", "path": overlay, "format": "qcow2", "cache": "none",
                     "throttle": {"iops_total": 2000}}),
        ),
    );
    let added = wait_line(&s, "h", "hotplug.added slot=");
    assert!(
        added.contains("verify=ok") && added.contains("capacity_sectors=16384"),
        "the guest could not use the hot plugged qcow2 disk: {added}"
    );
    let info = s.ok("GET", "vm.info?id=h", None).json();
    assert_eq!(info["config"]["disks"][1]["format"], "qcow2", "{info}");
    s.ok("PUT", "vm.remove-device?id=h", Some(&json!({"id": "q"})));
    let ejected = wait_line(&s, "h", "hotplug.ejected slot=");
    assert!(ejected.contains("gone=1"), "{ejected}");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let info = s.ok("GET", "vm.info?id=h", None).json();
        let disks = info["config"]["disks"].as_array().map_or(0, Vec::len);
        if disks == 1 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "q was not removed: {info}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // Unplugged means closed: qemu-img may lock and check the image now, VM running or not.
    let check = Command::new("qemu-img")
        .args(["check", "-f", "qcow2"])
        .arg(&overlay)
        .output()
        .unwrap();
    assert!(check.status.success(), "qemu-img check: {check:?}");
    let map = qemu_img(&[
        "map",
        "--output=json",
        "-f",
        "qcow2",
        overlay.to_str().unwrap(),
    ]);
    assert!(
        map.contains("\"depth\": 0, \"present\": true, \"zero\": false, \"data\": true"),
        "the guest's writes are not in the overlay: {map}"
    );
    s.ok("PUT", "vm.delete?id=h", None);
    assert!(
        std::fs::read(&base).unwrap() == before,
        "the backing file is unchanged"
    );
}
