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

fn value(console: &str, key: &str) -> String {
    console
        .lines()
        .filter_map(|l| l.strip_prefix(&format!("{key}=")))
        .next_back()
        .unwrap_or("")
        .to_string()
}

fn qemu_img(args: &[&str]) -> String {
    let out = Command::new("qemu-img").args(args).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "qemu-img {args:?}: {text}{out:?}");
    text
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
    let overlay = s.path("d0.qcow2");
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
