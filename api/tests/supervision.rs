//! One VM per process, on the real backend (docs/architecture.md):
//! - three test-guest VMs under one vmmd; `kill -9` of one VM process touches neither
//!   the others (their I/O goes on) nor the service, and makes that VM `Crashed` with
//!   signal 9, with an event within 1 s; `kill -9` of vmmd leaves the VM processes running
//!   (their counters, read through their own sockets, grow); a new vmmd on the same state
//!   directory lists them `Running`, serves their counters and a live throttle change,
//!   relays their events, and holds each image lock exactly once; `vmm.shutdown` leaves
//!   no process and no state directory;
//! - a guest that powers off ends its VM process within 1 s, with no API call; one that
//!   resets runs again within 5 s.
//!
//! Skips, saying why, when `/dev/kvm` is missing.

#![allow(clippy::cast_precision_loss)] // Test figures, not guest input.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

mod support;

use serde_json::{Value, json};
use support::{Events, Service, process_alive};

/// A test-guest VM `id` with one disk `d0` (its own image) whose guest, after short IOPS
/// phases, keeps `d0` busy for about a minute (rate windows), then powers off.
fn busy_vm(s: &Service, elf: &Path, id: &str, tsc: u32) -> Value {
    let image = s.sparse_image(&format!("{id}.raw"), 16);
    json!({
        "id": id,
        "memory": {"size_mib": 64},
        "payload": {"kernel": elf,
                    "cmdline": format!("exit=acpi pci=auto tsc_khz={tsc} ms=50 windows=600 window_ms=100")},
        "serial": {"mode": "file", "path": s.path(&format!("{id}.serial"))},
        "disks": [{"id": "d0", "path": image, "cache": "writeback"}]
    })
}

fn ops(counters: &Value) -> u64 {
    let io = &counters["disks"]["d0"];
    ["read", "write"]
        .iter()
        .map(|k| io[k]["ops"].as_u64().unwrap_or(0))
        .sum()
}

/// d0's requests of the VM behind `socket` (vmmd's with `?id=`, or a VM process's own).
fn ops_at(socket: &Path, query: &str) -> u64 {
    let r = api::client::Client::new(socket)
        .request_blocking("GET", &format!("/api/v1/vm.counters{query}"), None)
        .unwrap_or_else(|e| panic!("{}: {e}", socket.display()));
    assert!(r.ok(), "{}: {}", r.status, r.text());
    ops(&r.json())
}

/// Waits until `count()` has grown twice in a row (the guest does I/O now).
fn assert_grows(what: &str, mut count: impl FnMut() -> u64) {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut last = count();
    let mut grew = 0;
    while grew < 2 {
        std::thread::sleep(Duration::from_millis(150));
        let now = count();
        if now > last {
            grew += 1;
        }
        last = now;
        assert!(
            Instant::now() < deadline,
            "{what}: I/O does not go on ({last} requests)"
        );
    }
}

/// OFD locks on the file at `path` (from `/proc/locks`, by device and inode).
fn locks_on(path: &Path) -> usize {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).unwrap_or_else(|e| panic!("{e}"));
    let dev = m.dev();
    // /proc/locks names the file as MAJOR:MINOR:INODE (major and minor in hex).
    let (major, minor) = (libc::major(dev), libc::minor(dev));
    let id = format!("{major:02x}:{minor:02x}:{}", m.ino());
    std::fs::read_to_string("/proc/locks")
        .unwrap_or_default()
        .lines()
        .filter(|l| l.split_whitespace().any(|w| w == id))
        .count()
}

/// (thread name, `Seccomp:` field) of every thread of `pid`.
fn seccomp_modes(pid: u32) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for t in std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .flatten()
    {
        let status = std::fs::read_to_string(t.path().join("status")).unwrap_or_default();
        let field = |k: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(k))
                .map(|v| v.trim().to_string())
                .unwrap_or_default()
        };
        out.push((field("Name:"), field("Seccomp:")));
    }
    out
}

fn kill9(pid: u32) {
    let ok = Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "kill -9 {pid}");
}

#[test]
fn vm_processes_outlive_crashes_and_vmmd() {
    if !tests::skip::kvm_or_skip("vm_processes_outlive_crashes_and_vmmd") {
        return;
    }
    let elf = support::guest();
    let tsc = support::tsc_khz();
    // Debug builds only: each VM process tries to open this file once confined.
    let outside = tempfile::NamedTempFile::new().unwrap_or_else(|e| panic!("{e}"));
    let probe = outside.path().to_path_buf();
    let mut s = Service::start_with(&[], |c| {
        c.env("VMM_TEST_LANDLOCK_PROBE", &probe);
    });
    let events = Events::follow(&s.socket);
    let ids = ["v1", "v2", "v3"];
    for id in ids {
        s.ok("PUT", "vm.create", Some(&busy_vm(&s, &elf, id, tsc)));
        s.ok("PUT", &format!("vm.boot?id={id}"), None);
    }
    let pids: Vec<u32> = ids
        .iter()
        .map(|id| {
            let info = s.ok("GET", &format!("vm.info?id={id}"), None).json();
            let pid = info["pid"].as_u64().unwrap_or_else(|| panic!("{info}"));
            u32::try_from(pid).unwrap_or_else(|e| panic!("{e}"))
        })
        .collect();
    assert_ne!(pids[0], pids[1]);
    assert!(
        pids.iter().all(|p| *p != s.pid()),
        "the VMs run in vmmd: {pids:?}"
    );
    for id in ids {
        events.wait_for(id, "booted", Duration::from_secs(5));
        assert_grows(id, || ops_at(&s.socket, &format!("?id={id}")));
    }
    // Each VM process is confined to its own files (Landlock): the probe was refused.
    for id in ids {
        let log =
            std::fs::read_to_string(s.state_dir().join(id).join("vmm.log")).unwrap_or_default();
        let line = log
            .lines()
            .find(|l| l.contains("landlock probe"))
            .unwrap_or_else(|| panic!("{id}: no probe in its log:\n{log}"));
        assert!(line.contains("Permission denied"), "{id}: {line}");
    }
    // A disk hot plugged into a confined VM: vmmd opens it and hands it over.
    let hot = s.sparse_image("v1-hot.raw", 4);
    s.ok(
        "PUT",
        "vm.add-disk?id=v1",
        Some(&json!({"id": "hot", "path": hot})),
    );
    let c = s.counters("v1");
    assert!(c["disks"].get("hot").is_some(), "{c}");
    assert_eq!(
        locks_on(&hot),
        1,
        "the hot plugged image is not locked once"
    );
    // Every thread of every VM process runs under a seccomp filter.
    for (pid, id) in pids.iter().zip(ids) {
        let threads = seccomp_modes(*pid);
        assert!(threads.len() >= 4, "{id}: {threads:?}");
        assert!(
            threads.iter().all(|(_, mode)| mode == "2"),
            "{id}: threads without a filter: {threads:?}"
        );
    }

    // kill -9 of v2's process: v2 is Crashed with signal 9 (event within 1 s); the
    // service and the other VMs go on.
    let killed = Instant::now();
    kill9(pids[1]);
    let (at, event) = events.wait_for("v2", "crashed", Duration::from_secs(5));
    let after = at.duration_since(killed);
    println!("crashed event {after:?} after kill -9: {event}");
    assert!(
        after <= Duration::from_secs(1),
        "crashed event after {after:?}"
    );
    assert_eq!(event["signal"], 9, "{event}");
    let info = s.ok("GET", "vm.info?id=v2", None).json();
    assert_eq!(info["state"], "Crashed", "{info}");
    assert_eq!(info["crash"]["signal"], 9, "{info}");
    assert!(info.get("pid").is_none(), "{info}");
    let listed = s.ok("GET", "vms", None).json();
    assert_eq!(listed[1]["state"], "Crashed", "{listed}");
    assert_eq!(listed[1]["crash"]["signal"], 9, "{listed}");
    s.ok("GET", "vmm.ping", None);
    for id in ["v1", "v3"] {
        assert_grows(id, || ops_at(&s.socket, &format!("?id={id}")));
    }
    // A crashed VM refuses what needs its process, saying so.
    let r = s.req("PUT", "vm.pause?id=v2", None);
    assert_eq!(r.status, 409, "{}", r.text());
    assert!(
        r.text().contains("Crashed") && r.text().contains("signal 9"),
        "{}",
        r.text()
    );

    // Each image is locked once, by its VM's process.
    let images: Vec<_> = ids.iter().map(|id| s.path(&format!("{id}.raw"))).collect();
    let held: Vec<usize> = images.iter().map(|p| locks_on(p)).collect();
    assert!(held[0] > 0 && held[2] > 0 && held[1] == 0, "locks {held:?}");

    // kill -9 of vmmd: the VM processes go on; their own sockets serve their counters.
    let mut child = s.child.take().unwrap_or_else(|| panic!("no vmmd"));
    let _ = child.kill();
    let _ = child.wait();
    for (i, id) in [(0, "v1"), (2, "v3")] {
        assert!(process_alive(pids[i]), "{id}'s process died with vmmd");
        let own = s.state_dir().join(id).join("api.sock");
        assert_grows(id, || ops_at(&own, ""));
    }

    // A new vmmd re-attaches: v1 and v3 Running (same processes), v2 Crashed.
    s.spawn(&[], |_| {});
    let events = Events::follow(&s.socket);
    let listed = s.ok("GET", "vms", None).json();
    let states: Vec<(&str, &str)> = listed
        .as_array()
        .into_iter()
        .flatten()
        .map(|v| {
            (
                v["id"].as_str().unwrap_or(""),
                v["state"].as_str().unwrap_or(""),
            )
        })
        .collect();
    assert_eq!(
        states,
        [("v1", "Running"), ("v2", "Crashed"), ("v3", "Running")],
        "{listed}"
    );
    assert_eq!(listed[0]["pid"], pids[0], "{listed}");
    assert_eq!(listed[1]["crash"]["signal"], 9, "{listed}");
    assert_grows("v1 after re-attach", || ops_at(&s.socket, "?id=v1"));
    assert_eq!(
        images.iter().map(|p| locks_on(p)).collect::<Vec<_>>(),
        held,
        "image locks changed across the vmmd restart"
    );
    let mut clash = busy_vm(&s, &elf, "x", tsc);
    clash["disks"][0]["path"] = json!(images[0]);
    let r = s.req("PUT", "vm.create", Some(&clash));
    assert_eq!(r.status, 409, "{}", r.text());
    // A live throttle change on a re-attached VM: d0's rate drops to the limit.
    s.ok(
        "PUT",
        "vm.update-disk?id=v1",
        Some(&json!({"id": "d0", "throttle": {"iops_total": 200}})),
    );
    std::thread::sleep(Duration::from_millis(300));
    let t0 = (Instant::now(), ops_at(&s.socket, "?id=v1"));
    std::thread::sleep(Duration::from_secs(1));
    let rate = (ops_at(&s.socket, "?id=v1") - t0.1) as f64 / t0.0.elapsed().as_secs_f64();
    println!("v1/d0 at iops_total 200 after re-attach: {rate:.0} IOPS");
    assert!(
        rate > 50.0 && rate < 260.0,
        "v1/d0 rate {rate:.0} IOPS under a 200 IOPS limit"
    );
    let info = s.ok("GET", "vm.info?id=v1", None).json();
    assert_eq!(
        info["config"]["disks"][0]["throttle"]["iops_total"], 200,
        "{info}"
    );
    // Their events reach the new vmmd's stream.
    s.ok("PUT", "vm.pause?id=v3", None);
    events.wait_for("v3", "paused", Duration::from_secs(5));

    // Deleting the crashed VM cleans its state; vmm.shutdown ends every VM process and
    // leaves no state directory.
    s.ok("PUT", "vm.delete?id=v2", None);
    assert!(!s.state_dir().join("v2").exists());
    events.wait_for("v2", "deleted", Duration::from_secs(5));
    s.ok("PUT", "vmm.shutdown", None);
    let mut child = s.child.take().unwrap_or_else(|| panic!("no vmmd"));
    assert!(
        support::wait_exit(&mut child, Duration::from_secs(20)),
        "vmmd did not exit"
    );
    assert!(child.wait().is_ok_and(|st| st.success()));
    for (pid, id) in pids.iter().zip(ids) {
        assert!(!process_alive(*pid), "{id}'s process {pid} is left");
    }
    let left: Vec<_> = std::fs::read_dir(s.state_dir())
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "state left behind: {left:?}");
    assert!(images.iter().all(|p| locks_on(p) == 0), "image locks left");
}

#[test]
fn guests_that_power_off_or_reset_need_no_api_call() {
    if !tests::skip::kvm_or_skip("guests_that_power_off_or_reset_need_no_api_call") {
        return;
    }
    let elf = support::guest();
    let tsc = support::tsc_khz();
    let s = Service::start(&[]);
    let events = Events::follow(&s.socket);
    let vm = |id: &str, exit: &str| {
        json!({
            "id": id,
            "memory": {"size_mib": 64},
            "payload": {"kernel": elf, "cmdline": format!("exit={exit} pci=auto tsc_khz={tsc} ms=50")},
            "serial": {"mode": "file", "path": s.path(&format!("{id}.serial"))},
            "disks": [{"id": "d0", "path": s.sparse_image(&format!("{id}.raw"), 16)}]
        })
    };
    s.ok("PUT", "vm.create", Some(&vm("off", "acpi")));
    s.ok("PUT", "vm.create", Some(&vm("rst", "reset")));
    s.ok("PUT", "vm.boot?id=off", None);
    s.ok("PUT", "vm.boot?id=rst", None);
    let off_pid = s.vm_pid("off").unwrap_or_else(|| panic!("no pid file"));

    // Poweroff: the event, then the process is gone within 1 s; no API call between.
    let (at, _) = events.wait_for("off", "guest-poweroff", Duration::from_secs(60));
    while process_alive(off_pid) {
        assert!(
            at.elapsed() < Duration::from_secs(1),
            "off's process still there"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    println!(
        "off's process gone {:?} after its guest-poweroff event",
        at.elapsed()
    );
    assert_eq!(s.state("off"), "Shutdown");
    // Its counters stay readable; booting it again starts a new process.
    assert!(ops(&s.counters("off")) > 0);
    s.ok("PUT", "vm.boot?id=off", None);
    let again = s.vm_pid("off").unwrap_or_default();
    assert!(
        again != off_pid && process_alive(again),
        "{again} vs {off_pid}"
    );

    // Reset: rebooted by its own process, running again (a second boot on its console)
    // within 5 s of the event.
    let (at, event) = events.wait_for("rst", "guest-reset", Duration::from_secs(60));
    assert_eq!(event["rebooting"], true, "{event}");
    loop {
        let console = std::fs::read_to_string(s.path("rst.serial")).unwrap_or_default();
        if console.matches("guest=virtio-blk-test").count() >= 2 {
            break;
        }
        assert!(
            at.elapsed() < Duration::from_secs(5),
            "rst did not boot again:\n{console}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    println!(
        "rst booted again {:?} after its guest-reset event",
        at.elapsed()
    );
    assert_eq!(s.state("rst"), "Running");
    for id in ["off", "rst"] {
        s.ok("PUT", &format!("vm.delete?id={id}"), None);
    }
    assert!(!process_alive(again));
}

#[test]
fn a_syscall_outside_the_filter_ends_only_that_vm() {
    if !tests::skip::kvm_or_skip("a_syscall_outside_the_filter_ends_only_that_vm") {
        return;
    }
    let elf = support::guest();
    let tsc = support::tsc_khz();
    // Debug builds only: the vCPU of VM "bad" makes a syscall outside its filter
    // (acct) when it starts.
    let s = Service::start_with(&[], |c| {
        c.env("VMM_TEST_BAD_SYSCALL", "bad:vcpu");
    });
    let events = Events::follow(&s.socket);
    for id in ["good", "bad"] {
        s.ok("PUT", "vm.create", Some(&busy_vm(&s, &elf, id, tsc)));
    }
    s.ok("PUT", "vm.boot?id=good", None);
    assert_grows("good", || ops_at(&s.socket, "?id=good"));
    // The boot may answer before or after the vCPU thread dies.
    let _ = s.req("PUT", "vm.boot?id=bad", None);
    let (_, event) = events.wait_for("bad", "crashed", Duration::from_secs(10));
    assert_eq!(event["signal"], libc::SIGSYS, "{event}");
    // A process that died before the boot reached it makes the boot start another,
    // which dies the same way: the VM ends Crashed either way.
    let deadline = Instant::now() + Duration::from_secs(10);
    let info = loop {
        let info = s.ok("GET", "vm.info?id=bad", None).json();
        if info["state"] == "Crashed" || Instant::now() > deadline {
            break info;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(info["state"], "Crashed", "{info}");
    assert_eq!(info["crash"]["signal"], libc::SIGSYS, "{info}");
    assert!(
        info["crash"]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("seccomp")),
        "{info}"
    );
    // The other VM and the service go on.
    assert_eq!(s.state("good"), "Running");
    assert_grows("good after bad's crash", || ops_at(&s.socket, "?id=good"));
    s.ok("GET", "vmm.ping", None);
}
