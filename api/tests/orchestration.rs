//! Orchestration on the real backend: `vmmd` (KVM) runs four test-guest VMs at once,
//! booted over HTTP and through `vmctl`; counters grow; disks are added and removed on a
//! created VM; a running VM is rebooted (fresh counters, its guest starts again) and
//! another paused (its disk counters stop) and resumed; a disk's throttle changes live
//! and moves into and out of a throttle group, and the request rate the guest itself
//! measures follows within 5%; guests power off (their VM processes end with them);
//! every VM is deleted and no VM process, state directory, thread or file descriptor is
//! left behind; `vmmd` exits 0.
//! Skips, saying why, when `/dev/kvm` is missing.

#![allow(clippy::cast_precision_loss)] // Test data and figures, not guest input.

use std::io::Write;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

mod support;

use serde_json::{Value, json};
use support::Service;

/// How long the guests may take to power off.
const RUN_TIMEOUT: Duration = Duration::from_secs(180);
/// Length of the guest's rate windows on t/d0 (`window_ms=`).
const WINDOW: Duration = Duration::from_millis(500);
/// How many rate windows t runs: long enough for the pause and the throttle phases.
const WINDOWS: u32 = 28;
/// How far the rate the guest measures may be from a limit.
const RATE_TOLERANCE: f64 = 0.05;
/// How far below the limit one rate window may fall (host scheduling on a busy machine).
const WINDOW_TOLERANCE: f64 = 0.15;

/// A test-guest VM with two disks: `d0` on the VM's shared iothread `sh`, `d1` on a
/// dedicated one (or also on `sh` when `both_shared`).
fn vm_json(s: &Service, elf: &Path, id: &str, ms: u32, tsc: u32, both_shared: bool) -> Value {
    let d0 = s.sparse_image(&format!("{id}-0.raw"), 16);
    let d1 = s.sparse_image(&format!("{id}-1.raw"), 16);
    let mut d1_json = json!({"id": "d1", "path": d1, "cache": "writeback"});
    if both_shared {
        d1_json["iothread"] = json!("sh");
    }
    json!({
        "id": id,
        "cpus": {"boot_vcpus": 1},
        "memory": {"size_mib": 64},
        "payload": {"kernel": elf, "cmdline": format!("exit=acpi pci=auto tsc_khz={tsc} ms={ms}")},
        "serial": {"mode": "file", "path": s.dir.path().join(format!("{id}.serial"))},
        "iothreads": [{"id": "sh"}],
        "disks": [
            {"id": "d0", "path": d0, "cache": "writeback", "iothread": "sh"},
            d1_json
        ]
    })
}

fn ops(counters: &Value, disk: &str) -> u64 {
    let io = &counters["disks"][disk];
    ["read", "write", "flush", "discard"]
        .iter()
        .map(|k| io[k]["ops"].as_u64().unwrap_or(0))
        .sum()
}

fn total_ops(counters: &Value) -> u64 {
    ops(counters, "d0") + ops(counters, "d1")
}

/// Threads of `pid` named like our vCPU and iothread threads.
fn vmm_threads(pid: u32) -> Vec<String> {
    let mut names = Vec::new();
    if let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for t in dir.flatten() {
            let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
            let comm = comm.trim();
            if comm.starts_with("vcpu") || comm.starts_with("iothread") {
                names.push(comm.to_string());
            }
        }
    }
    names
}

fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

fn serial(s: &Service, id: &str) -> Vec<u8> {
    std::fs::read(s.dir.path().join(format!("{id}.serial"))).unwrap_or_default()
}

/// Waits until `id`'s console shows `needle`; fails if the VM stops running first.
fn wait_console(s: &Service, id: &str, needle: &str) {
    let deadline = Instant::now() + RUN_TIMEOUT;
    loop {
        let log = serial(s, id);
        if String::from_utf8_lossy(&log).contains(needle) {
            return;
        }
        let st = s.state(id);
        assert!(
            Instant::now() < deadline && st == "Running",
            "{id}: no {needle:?} on the console; state {st}:\n{}",
            String::from_utf8_lossy(&log)
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Waits until `id`'s console has a whole line starting with `prefix`; returns it.
fn wait_line(s: &Service, id: &str, prefix: &str) -> String {
    loop {
        let log = String::from_utf8_lossy(&serial(s, id)).into_owned();
        let whole = log.split_inclusive('\n').filter(|l| l.ends_with('\n'));
        if let Some(l) = whole.into_iter().find(|l| l.starts_with(prefix)) {
            return l.trim_end().to_string();
        }
        wait_console(s, id, prefix);
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The guest's rate windows (`disk0.window=<k> iops=<x>`) among the complete lines of
/// `log`.
fn rate_windows(log: &[u8]) -> Vec<(u64, f64)> {
    let text = String::from_utf8_lossy(log);
    let mut lines: Vec<&str> = text.split('\n').collect();
    lines.pop(); // Not ended yet (or empty).
    lines
        .iter()
        .filter_map(|l| {
            let (k, iops) = l
                .trim()
                .strip_prefix("disk0.window=")?
                .split_once(" iops=")?;
            Some((k.parse().ok()?, iops.parse().ok()?))
        })
        .collect()
}

/// Applies `update` to t/d0, lets one window go by, and returns the rate windows the
/// guest printed over the next three: each lies entirely after the change.
fn guest_rate_phase(s: &Service, update: &Value) -> Vec<(u64, f64)> {
    s.ok("PUT", "vm.update-disk?id=t", Some(update));
    std::thread::sleep(WINDOW + Duration::from_millis(100));
    let from = serial(s, "t").len();
    std::thread::sleep(WINDOW * 3 + Duration::from_millis(100));
    let log = serial(s, "t");
    let tail = &log[from.min(log.len())..];
    assert!(
        !String::from_utf8_lossy(tail).contains("disk0.windows="),
        "t ran out of rate windows before {update}: raise WINDOWS"
    );
    rate_windows(tail)
}

#[test]
fn four_test_guests_through_the_service() {
    if !tests::skip::kvm_or_skip("four_test_guests_through_the_service") {
        return;
    }
    let elf = tests::test_guest::build().unwrap_or_else(|e| panic!("{e}"));
    let tsc = support::tsc_khz();
    let s = Service::start(&[]);
    let pid = s.pid();
    let base_fds = fd_count(pid);
    assert!(vmm_threads(pid).is_empty());
    let ping = s.ok("GET", "vmm.ping", None).json();
    assert_eq!(ping["backend"], "kvm");

    // Four VMs; "t" runs long IOPS phases for the live throttle change.
    let ids = ["a", "b", "c", "t"];
    // b runs longer IOPS phases so that it is reliably still running when rebooted.
    for (i, id) in ids.iter().enumerate() {
        let ms = if *id == "b" { 500 } else { 300 };
        let mut body = vm_json(&s, &elf, id, ms, tsc, i == 2);
        if *id == "c" {
            // c acts as an OS's ACPI hot plug driver once its IOPS phases are done.
            let cmdline = format!(
                "{} hotplug=2",
                body["payload"]["cmdline"].as_str().unwrap_or_default()
            );
            body["payload"]["cmdline"] = json!(cmdline);
        }
        if *id == "t" {
            let cmdline = format!(
                "{} windows={WINDOWS} window_ms={}",
                body["payload"]["cmdline"].as_str().unwrap_or_default(),
                WINDOW.as_millis()
            );
            body["payload"]["cmdline"] = json!(cmdline);
            body["throttle_groups"] = json!([{"id": "g800", "limits": {"iops_total": 800}}]);
        }
        s.ok("PUT", "vm.create", Some(&body));
        assert_eq!(s.state(id), "Created");
    }
    // An image in use by another VM is refused with 409 naming that VM.
    let mut clash = vm_json(&s, &elf, "x", 300, tsc, false);
    clash["disks"][0]["path"] = json!(s.dir.path().join("a-0.raw"));
    let r = s.req("PUT", "vm.create", Some(&clash));
    assert_eq!(r.status, 409, "{}", r.text());
    assert!(r.text().contains("in use by VM a (disk d0"), "{}", r.text());

    // Add and remove a disk on a created VM ("e", never booted).
    let e = vm_json(&s, &elf, "e", 300, tsc, false);
    s.ok("PUT", "vm.create", Some(&e));
    let extra = s.sparse_image("e-2.raw", 4);
    s.ok(
        "PUT",
        "vm.add-disk?id=e",
        Some(&json!({"id": "d2", "path": extra, "iothread": "sh"})),
    );
    let info = s.ok("GET", "vm.info?id=e", None).json();
    assert_eq!(info["config"]["disks"].as_array().map(Vec::len), Some(3));
    s.ok("PUT", "vm.remove-device?id=e", Some(&json!({"id": "d1"})));
    // Pausing a VM that never ran is refused, saying why.
    let r = s.req("PUT", "vm.pause?id=e", None);
    assert_eq!(r.status, 409, "{}", r.text());
    assert!(r.text().contains("Created"), "{}", r.text());
    let info = s.ok("GET", "vm.info?id=e", None).json();
    let disks: Vec<&str> = info["config"]["disks"]
        .as_array()
        .map(|d| d.iter().filter_map(|d| d["id"].as_str()).collect())
        .unwrap_or_default();
    assert_eq!(disks, ["d0", "d2"]);
    let c = s.counters("e");
    assert!(
        c["disks"].get("d2").is_some() && c["disks"].get("d1").is_none(),
        "{c}"
    );
    s.ok("PUT", "vm.delete?id=e", None);

    // Boot concurrently: three over HTTP, one through vmctl.
    std::thread::scope(|scope| {
        for id in ["a", "b", "t"] {
            let s = &s;
            scope.spawn(move || s.ok("PUT", &format!("vm.boot?id={id}"), None));
        }
        let out = Command::new(env!("CARGO_BIN_EXE_vmctl"))
            .arg("--api-socket")
            .arg(&s.socket)
            .args(["--id", "c", "boot"])
            .output()
            .unwrap_or_else(|e| panic!("vmctl: {e}"));
        assert!(out.status.success(), "vmctl boot: {out:?}");
    });

    // Reboot b while its guest runs its first IOPS phase: it comes back running with
    // fresh counters, and its console goes on with a second boot after the first.
    wait_console(&s, "b", "disk0.iops_poll=");
    let before = total_ops(&s.counters("b"));
    s.ok("PUT", "vm.reboot?id=b", None);
    assert_eq!(s.state("b"), "Running");
    let after = total_ops(&s.counters("b"));
    assert!(
        after < before,
        "b's counters after the reboot ({after}) are not fresh (before: {before})"
    );
    let deadline = Instant::now() + RUN_TIMEOUT;
    loop {
        let log = String::from_utf8_lossy(&serial(&s, "b")).into_owned();
        let boots = log.matches("guest=virtio-blk-test").count();
        if boots == 2 {
            assert!(
                log.find("disk0.iops_poll=") < log.rfind("guest=virtio-blk-test"),
                "the first boot's output should come before the second boot:\n{log}"
            );
            break;
        }
        assert!(
            boots < 2 && Instant::now() < deadline,
            "b's console should show two boots:\n{log}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }

    // Pause t while its guest keeps d0 busy (rate windows): once the requests in flight
    // are done its counters stand still; after resume they grow again.
    wait_console(&s, "t", "disk0.window=0 ");
    let r = s.req("PUT", "vm.resume?id=t", None);
    assert_eq!(r.status, 409, "{}", r.text());
    assert!(r.text().contains("Running"), "{}", r.text());
    s.ok("PUT", "vm.pause?id=t", None);
    assert_eq!(s.state("t"), "Paused");
    std::thread::sleep(Duration::from_millis(100));
    let paused = total_ops(&s.counters("t"));
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        total_ops(&s.counters("t")),
        paused,
        "t's I/O went on while paused"
    );
    s.ok("PUT", "vm.resume?id=t", None);
    assert_eq!(s.state("t"), "Running");
    let deadline = Instant::now() + Duration::from_secs(5);
    while total_ops(&s.counters("t")) <= paused {
        assert!(Instant::now() < deadline, "t's I/O did not resume");
        std::thread::sleep(Duration::from_millis(10));
    }

    // Hot plug on a running VM: a disk added over HTTP reaches c's guest through ACPI
    // (it verifies I/O on it), then vmctl removes it: the guest ejects it and it leaves
    // the VM, its config, its counters and its dedicated iothread.
    wait_console(&s, "c", "hotplug.ready=1");
    let hot = s.sparse_image("c-2.raw", 8);
    s.ok(
        "PUT",
        "vm.add-disk?id=c",
        Some(&json!({"id": "d2", "path": hot, "cache": "writeback"})),
    );
    let added = wait_line(&s, "c", "hotplug.added slot=");
    assert!(
        added.contains("verify=ok"),
        "c's guest could not use the hot plugged disk: {added}"
    );
    let info = s.ok("GET", "vm.info?id=c", None).json();
    assert_eq!(info["config"]["disks"].as_array().map(Vec::len), Some(3));
    let c = s.counters("c");
    assert!(ops(&c, "d2") >= 32, "d2 counters: {c}");
    assert!(c["iothreads"].get("dedicated:d2").is_some(), "{c}");
    let out = Command::new(env!("CARGO_BIN_EXE_vmctl"))
        .arg("--api-socket")
        .arg(&s.socket)
        .args(["--id", "c", "remove-device", "d2"])
        .output()
        .unwrap_or_else(|e| panic!("vmctl: {e}"));
    assert!(out.status.success(), "vmctl remove-device: {out:?}");
    let deadline = Instant::now() + RUN_TIMEOUT;
    let disk_ids = |info: &Value| -> Vec<String> {
        info["config"]["disks"]
            .as_array()
            .map(|d| {
                d.iter()
                    .filter_map(|d| d["id"].as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default()
    };
    loop {
        let info = s.ok("GET", "vm.info?id=c", None).json();
        if disk_ids(&info) == ["d0", "d1"] {
            assert!(info.get("pending_removals").is_none(), "{info}");
            break;
        }
        // c's guest powers off right after its second hot plug event: once it stopped,
        // the config it left must show the eject.
        if s.state("c") != "Running" {
            let info = s.ok("GET", "vm.info?id=c", None).json();
            assert_eq!(
                disk_ids(&info),
                ["d0", "d1"],
                "d2 was not ejected before c stopped: {info}\n{}",
                String::from_utf8_lossy(&serial(&s, "c"))
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "d2 was not ejected: {info}\n{}",
            String::from_utf8_lossy(&serial(&s, "c"))
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let c = s.counters("c");
    assert!(
        c["disks"].get("d2").is_none() && c["iothreads"].get("dedicated:d2").is_none(),
        "{c}"
    );
    // Its image is free again: another VM may use it.
    let mut reuse = vm_json(&s, &elf, "r", 300, tsc, false);
    reuse["disks"][0]["path"] = json!(hot);
    s.ok("PUT", "vm.create", Some(&reuse));
    s.ok("PUT", "vm.delete?id=r", None);

    // The other guests are short: let them end so t's rate is not held back by a host
    // with more busy vCPUs than cores.
    let deadline = Instant::now() + RUN_TIMEOUT;
    while ["a", "b", "c"].iter().any(|id| s.state(id) != "Shutdown") {
        assert!(Instant::now() < deadline, "a, b or c did not power off");
        std::thread::sleep(Duration::from_millis(20));
    }

    // Live throttle changes on t/d0, the rate measured by the guest: its own limit twice,
    // then (no limit of its own) in throttle group g800, then out of it.
    let phases = [
        (400.0, json!({"id": "d0", "throttle": {"iops_total": 400}})),
        (
            1200.0,
            json!({"id": "d0", "throttle": {"iops_total": 1200}}),
        ),
        (
            800.0,
            json!({"id": "d0", "throttle": {}, "throttle_group": "g800"}),
        ),
    ];
    let mut measured = Vec::new();
    for (limit, update) in &phases {
        measured.push((*limit, guest_rate_phase(&s, update)));
    }
    let info = s.ok("GET", "vm.info?id=t", None).json();
    assert_eq!(
        info["config"]["disks"][0]["throttle_group"], "g800",
        "{info}"
    );
    s.ok(
        "PUT",
        "vm.update-disk?id=t",
        Some(&json!({"id": "d0", "throttle_group": ""})),
    );
    let info = s.ok("GET", "vm.info?id=t", None).json();
    assert!(
        info["config"]["disks"][0].get("throttle_group").is_none(),
        "{info}"
    );
    {
        let mut out = std::io::stdout().lock();
        for (limit, w) in &measured {
            let _ = writeln!(out, "t/d0 limit {limit} iops: guest windows {w:?}");
        }
    }
    for (limit, w) in &measured {
        assert!(w.len() >= 2, "limit {limit}: too few windows {w:?}");
        // The phase's rate (every window lies after the change) within 5%; single
        // windows may dip further when a busy 2-core host does not schedule the vCPU,
        // but never exceed the limit by more than 5%.
        let mean = w.iter().map(|(_, r)| r).sum::<f64>() / w.len() as f64;
        assert!(
            (mean - limit).abs() / limit <= RATE_TOLERANCE,
            "limit {limit}: the guest measured {mean:.0} IOPS on average (windows {w:?})"
        );
        for (k, r) in w {
            assert!(
                *r <= limit * (1.0 + RATE_TOLERANCE) && *r >= limit * (1.0 - WINDOW_TOLERANCE),
                "limit {limit}: the guest measured {r} IOPS in window {k} (all: {w:?})"
            );
        }
    }
    // Unknown groups are refused.
    let r = s.req(
        "PUT",
        "vm.update-disk?id=t",
        Some(&json!({"id": "d0", "throttle_group": "nope"})),
    );
    assert_eq!(r.status, 400, "{}", r.text());
    // Live iothread settings.
    s.ok(
        "PUT",
        "vm.update-iothread?id=a",
        Some(&json!({"id": "sh", "poll_max_ns": 0})),
    );

    // Counters grow; guests power off by themselves.
    let mut last: Vec<u64> = ids.iter().map(|id| total_ops(&s.counters(id))).collect();
    let mut grew = [false; 4];
    loop {
        let states: Vec<String> = ids.iter().map(|id| s.state(id)).collect();
        for (i, id) in ids.iter().enumerate() {
            let c = s.counters(id);
            let now = total_ops(&c);
            grew[i] |= now > last[i];
            last[i] = now;
            assert!(
                c["iothreads"].get("sh").is_some(),
                "{id}: no iothread counters: {c}"
            );
        }
        if states.iter().all(|st| st == "Shutdown") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "guests still running: {states:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    for (i, id) in ids.iter().enumerate() {
        let serial =
            std::fs::read_to_string(s.dir.path().join(format!("{id}.serial"))).unwrap_or_default();
        let report = tests::test_guest::parse_report(&serial);
        assert_eq!(
            report.get("result").map(String::as_str),
            Some("ok"),
            "{id}:\n{serial}"
        );
        assert!(last[i] > 0, "{id}: no I/O counted");
        if *id == "t" {
            assert!(grew[i], "{id}: counters did not grow while it ran");
            assert_eq!(report.get("disk0.windows").map(String::as_str), Some("0"));
        }
    }

    // Delete everything; no VM process, thread or fd is left.
    let vm_pids: Vec<u32> = ids.iter().filter_map(|id| s.vm_pid(id)).collect();
    for id in ids {
        s.ok("PUT", &format!("vm.delete?id={id}"), None);
    }
    for pid in vm_pids {
        assert!(
            !support::process_alive(pid),
            "VM process {pid} left after vm.delete"
        );
    }
    let left: Vec<_> = std::fs::read_dir(s.state_dir())
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "state left after vm.delete: {left:?}");
    assert_eq!(s.ok("GET", "vms", None).json(), json!([]));
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let threads = vmm_threads(pid);
        let fds = fd_count(pid);
        if threads.is_empty() && fds <= base_fds {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "left behind: threads {threads:?}, fds {fds} (baseline {base_fds})"
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    // vmmd exits 0 on vmm.shutdown.
    let _ = s.req("PUT", "vmm.shutdown", None);
    let mut s = s;
    let mut child = s.child.take().unwrap_or_else(|| panic!("no child"));
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(st) = child.try_wait().unwrap_or_else(|e| panic!("{e}")) {
            break st;
        }
        assert!(Instant::now() < deadline, "vmmd did not exit");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "vmmd exited {status:?}");
}
