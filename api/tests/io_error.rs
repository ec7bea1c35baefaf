//! The error policy under `vmmd` (docs/architecture.md): the test
//! guest writes a pattern with a per-pass generation number to random blocks of an
//! image on a small tmpfs. The storage fills: the disk (`on_write_error` left at its
//! default, `enospc`) holds the failed writes and the VM pauses with reason `io-error`
//! (an `io-error` event, `vm.info` naming the op and errno). The test grows the tmpfs
//! and resumes: the guest finishes without a write error and verifies every block, and
//! the image holds exactly what the guest wrote. The policy is set live on the way
//! (`vm.update-disk`); the disk is throttled (held requests were charged once and go
//! first; what waits behind them in the throttle's queue keeps its order).
//!
//! Needs root (it mounts a tmpfs) and `/dev/kvm`; skips, saying why, otherwise.

use std::time::{Duration, Instant};

mod support;

use serde_json::json;
use support::{Events, Service};
use tests::tmpfs::Tmpfs;

const SEED: u64 = 11;
const SPAN_MIB: u64 = 8;

use support::console_value as value;

/// A test-guest VM `id` whose one disk (`disk`) takes `gens` passes of 64 random
/// writes over [`SPAN_MIB`], then verifies them; its console goes to `<id>.serial`.
fn gens_vm(s: &Service, id: &str, gens: u64, disk: serde_json::Value) -> serde_json::Value {
    let elf = support::guest();
    let tsc = support::tsc_khz();
    json!({
        "id": id,
        "memory": {"size_mib": 64},
        "payload": {"kernel": elf, "cmdline": format!(
            "exit=acpi pci=auto tsc_khz={tsc} ms=50 blocks=1 seed={SEED} gens={gens} gen_writes=64 gen_span_mib={SPAN_MIB}")},
        "serial": {"mode": "file", "path": s.path(&format!("{id}.serial"))},
        "disks": [disk]
    })
}

#[test]
fn out_of_space_pauses_the_vm_and_resume_loses_nothing() {
    let test = "out_of_space_pauses_the_vm_and_resume_loses_nothing";
    if !tests::skip::kvm_or_skip(test) {
        return;
    }
    let s = Service::start(&[]);
    let Some(small) = Tmpfs::mount(test, &s.path("small"), "1m") else {
        return;
    };
    let events = Events::follow(&s.socket);
    let image = small.path().join("d0.raw");
    std::fs::File::create(&image)
        .unwrap()
        .set_len((SPAN_MIB + 1) << 20)
        .unwrap();
    let disk = json!({"id": "d0", "path": image, "cache": "writeback",
                      "on_write_error": "report", "throttle": {"iops_total": 5000}});
    s.ok("PUT", "vm.create", Some(&gens_vm(&s, "e", 20, disk)));
    // The policy changes live: back to the default, `enospc`, on the built VM (with
    // `report` the guest would see errors and the VM would not pause).
    s.ok(
        "PUT",
        "vm.update-disk?id=e",
        Some(&json!({"id": "d0", "on_write_error": "enospc", "on_read_error": "stop"})),
    );
    let info = s.ok("GET", "vm.info?id=e", None).json();
    let d0 = &info["config"]["disks"][0];
    assert!(
        d0.get("on_write_error").is_none(),
        "the default is not shown: {d0}"
    );
    assert_eq!(d0["on_read_error"], "stop", "{d0}");
    s.ok("PUT", "vm.boot?id=e", None);
    let console = || std::fs::read_to_string(s.path("e.serial")).unwrap_or_default();

    // The tmpfs fills: the VM pauses on the disk's stop.
    let (_, ev) = events.wait_for("e", "io-error", Duration::from_secs(60));
    assert_eq!(ev["disk"], "d0", "{ev}");
    assert_eq!(ev["errno"], libc::ENOSPC, "{ev}");
    let deadline = Instant::now() + Duration::from_secs(10);
    let info = loop {
        let info = s.ok("GET", "vm.info?id=e", None).json();
        if info["state"] == "Paused" {
            break info;
        }
        assert!(
            Instant::now() < deadline,
            "not paused: {info}\n{}",
            console()
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(info["pause_reason"], "io-error", "{info}");
    assert_eq!(info["io_status"]["d0"]["op"], "write", "{info}");
    assert_eq!(info["io_status"]["d0"]["errno"], libc::ENOSPC, "{info}");
    assert!(
        info["io_status"]["d0"]["count"].as_u64().unwrap_or(0) >= 1,
        "{info}"
    );
    // Paused means paused: nothing moves while the storage is full.
    let before = s.counters("e")["disks"]["d0"]["write"]["ops"].clone();
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        s.counters("e")["disks"]["d0"]["write"]["ops"],
        before,
        "writes went on while paused"
    );

    // The operator grows the storage and resumes: the held writes go first.
    small.resize("64m");
    s.ok("PUT", "vm.resume?id=e", None);
    let (_, _) = events.wait_for("e", "guest-poweroff", Duration::from_secs(60));
    let out = console();
    assert_eq!(value(&out, "disk0.gens_verify"), "ok", "{out}");
    assert_eq!(value(&out, "disk0.verify"), "ok", "{out}");
    let counters = s.counters("e");
    let io_errors = &counters["disks"]["d0"]["io_errors"];
    assert!(
        io_errors["stopped"].as_u64().unwrap_or(0) >= 1,
        "{counters}"
    );
    assert_eq!(
        io_errors["reported"], 0,
        "the guest saw no error: {counters}"
    );
    // The storage's failures are still counted where they happened.
    assert_eq!(
        counters["disks"]["d0"]["write"]["errors"], io_errors["stopped"],
        "{counters}"
    );

    // The image holds exactly what the guest wrote.
    let data = std::fs::read(&image).unwrap();
    let gens = value(&out, "disk0.gen").parse().unwrap_or(0);
    let (blocks, digest) =
        tests::test_guest::gens_digest(&data, SEED, SPAN_MIB * 256, gens, &|_| vec![0u8; 4096])
            .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        blocks.to_string(),
        value(&out, "disk0.gens_blocks"),
        "{out}"
    );
    assert_eq!(digest, value(&out, "disk0.gens_digest"), "{out}");
    s.ok("PUT", "vm.delete?id=e", None);
}

/// Threads (not counting the kernel's io_uring workers and the API runtime's blocking
/// pool, which come and go with the load) and open descriptors of process `pid`.
fn threads_and_fds(pid: u64) -> (usize, usize) {
    let threads = std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|d| {
            d.flatten()
                .filter(|t| {
                    let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
                    !comm.starts_with("iou-") && comm.trim() != "api"
                })
                .count()
        })
        .unwrap_or(0);
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(Iterator::count)
        .unwrap_or(0);
    (threads, fds)
}

/// EIO from an NBD server (`nbdkit` with its `error` filter, switched on by a file):
/// with `stop` for writes and reads the VM pauses on the first failed request, the test
/// removes the file and resumes, and the guest goes on. One hundred such cycles while
/// the guest writes and verifies: no error reaches the guest, its data verifies, and
/// the VM process has no more threads or descriptors than after the first cycle. Then
/// the VM, booted again and paused on an error, is deleted at once.
#[test]
fn eio_cycles_from_an_nbd_server_pause_and_resume_without_loss_or_leaks() {
    let test = "eio_cycles_from_an_nbd_server_pause_and_resume_without_loss_or_leaks";
    if !tests::skip::kvm_or_skip(test) || !tests::nbd_server::have("nbdkit", test, "nbdkit") {
        return;
    }
    let s = Service::start(&[]);
    let events = Events::follow(&s.socket);
    let trigger = s.path("fail-now");
    let server = tests::nbd_server::NbdServer::nbdkit(
        &[
            "--filter=error",
            "memory",
            &format!("size={}M", SPAN_MIB + 1),
            "error=EIO",
            "error-pwrite-rate=100%",
            "error-pread-rate=100%",
            &format!("error-file={}", trigger.display()),
        ],
        tests::nbd_server::Listen::Unix(s.path("nbd.sock")),
    );
    let disk = json!({"id": "d0", "path": server.uri(), "cache": "writeback",
                      "on_write_error": "stop", "on_read_error": "stop"});
    s.ok("PUT", "vm.create", Some(&gens_vm(&s, "n", 400, disk)));
    s.ok("PUT", "vm.boot?id=n", None);
    let console = || std::fs::read_to_string(s.path("n.serial")).unwrap_or_default();
    let pid = s.ok("GET", "vm.info?id=n", None).json()["pid"]
        .as_u64()
        .unwrap_or_else(|| panic!("no pid"));
    let mut after_first = None;
    for cycle in 0..100 {
        std::fs::write(&trigger, b"").unwrap();
        let (_, ev) = events.wait_for("n", "io-error", Duration::from_secs(30));
        assert_eq!(ev["errno"], libc::EIO, "cycle {cycle}: {ev}");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let info = s.ok("GET", "vm.info?id=n", None).json();
            if info["state"] == "Paused" {
                assert_eq!(info["pause_reason"], "io-error", "{info}");
                break;
            }
            assert!(
                Instant::now() < deadline && info["state"] == "Running",
                "cycle {cycle}: not paused: {info}\n{}",
                console()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        std::fs::remove_file(&trigger).unwrap();
        s.ok("PUT", "vm.resume?id=n", None);
        if cycle == 0 {
            after_first = Some(threads_and_fds(pid));
        }
    }
    let after = threads_and_fds(pid);
    let first = after_first.unwrap_or_default();
    assert!(
        after.0 <= first.0 && after.1 <= first.1,
        "threads, fds after the first cycle {first:?}, after 100 {after:?}"
    );
    events.wait_for("n", "guest-poweroff", Duration::from_secs(120));
    let out = console();
    assert_eq!(value(&out, "disk0.gens_verify"), "ok", "{out}");
    assert_eq!(value(&out, "disk0.verify"), "ok", "{out}");
    let c = s.counters("n");
    let io_errors = &c["disks"]["d0"]["io_errors"];
    assert!(io_errors["stopped"].as_u64().unwrap_or(0) >= 100, "{c}");
    assert_eq!(io_errors["reported"], 0, "the guest saw no error: {c}");

    // Deleted while paused on an I/O error: its held requests fail, nothing waits.
    std::fs::write(&trigger, b"").unwrap();
    s.ok("PUT", "vm.boot?id=n", None);
    events.wait_for("n", "io-error", Duration::from_secs(30));
    let deadline = Instant::now() + Duration::from_secs(10);
    while s.state("n") != "Paused" {
        assert!(Instant::now() < deadline, "not paused again");
        std::thread::sleep(Duration::from_millis(5));
    }
    let started = Instant::now();
    s.ok("PUT", "vm.delete?id=n", None);
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "deleting a VM paused on an I/O error took {:?}",
        started.elapsed()
    );
    let r = s.req("GET", "vm.info?id=n", None);
    assert_eq!(r.status, 404, "{}", r.text());
}
