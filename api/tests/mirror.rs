//! Live disk mirror under `vmmd`, in a sandboxed VM process: the test guest writes a
//! pattern with a per-pass generation number to random blocks of a throttled disk on an
//! iothread while the disk is mirrored (to a local file, or to `qemu-nbd`), reaches
//! ready, takes more writes, and pivots (or is cancelled). The guest then verifies every
//! block it ever wrote, and the image the disk ends on holds exactly the guest's writes
//! (its digest recomputed from the bytes). Bad requests get 400/404/409.
//!
//! Skips, saying why, when `/dev/kvm` (or, for the NBD case, `qemu-nbd`) is missing.

#![allow(clippy::cast_possible_truncation)] // Test data and offsets, not guest input.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

mod support;

use serde_json::{Value, json};
use support::{Events, Service, expect};
use tests::nbd_server::{Listen, NbdServer, have};

const SEED: u64 = 1;
const SPAN_MIB: u64 = 16;
const MIB: usize = 1 << 20;

/// A test-guest VM `id` whose disk d0 (`path`, throttled, on iothread io0) takes
/// `gens` passes of 32 random writes (at `iops` a second: enough passes that the guest
/// still writes when a job reaches ready on a busy host).
fn vm(s: &Service, id: &str, path: &Path, gens: u64, iops: u64) -> Value {
    let elf = support::guest();
    let tsc = support::tsc_khz();
    json!({
        "id": id,
        "memory": {"size_mib": 64},
        "payload": {"kernel": elf, "cmdline": format!(
            "exit=acpi pci=auto tsc_khz={tsc} ms=50 blocks=1 seed={SEED} gens={gens} gen_writes=32 gen_span_mib={SPAN_MIB}")},
        "serial": {"mode": "file", "path": s.path(&format!("{id}.serial"))},
        "iothreads": [{"id": "io0"}],
        "disks": [{"id": "d0", "path": path, "iothread": "io0", "cache": "none",
                   "throttle": {"iops_total": iops}}]
    })
}

fn seccomp_args() -> Vec<&'static str> {
    match std::env::var("MIRROR_TEST_SECCOMP").as_deref() {
        Ok("false") => vec!["--seccomp", "false"],
        _ => vec![],
    }
}

fn console(s: &Service, id: &str) -> String {
    std::fs::read_to_string(s.path(&format!("{id}.serial"))).unwrap_or_default()
}

use support::console_value as value;

/// The guest's last finished generation.
fn generation(s: &Service, id: &str) -> u64 {
    value(&console(s, id), "disk0.gen").parse().unwrap_or(0)
}

fn wait_generation(s: &Service, id: &str, at_least: u64) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while generation(s, id) < at_least {
        let out = console(s, id);
        assert!(
            Instant::now() < deadline && !out.contains("gens_verify="),
            "the guest did not reach generation {at_least} (it stops writing after its \
             last one):\n{out}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn job(s: &Service, id: &str, job: &str) -> Value {
    let jobs = s.ok("GET", &format!("vm.jobs?id={id}"), None).json();
    jobs.as_array()
        .and_then(|a| a.iter().find(|j| j["id"] == job).cloned())
        .unwrap_or_else(|| panic!("no job {job} in {jobs}"))
}

fn wait_state(s: &Service, id: &str, name: &str, state: &str, limit: Duration) -> Value {
    let started = Instant::now();
    let deadline = started + limit;
    loop {
        let j = job(s, id, name);
        if j["state"] == state {
            eprintln!(
                "job {name} {state} after {} ms (guest at generation {})",
                started.elapsed().as_millis(),
                generation(s, id)
            );
            return j;
        }
        assert!(
            Instant::now() < deadline,
            "job {name} not {state} in time: {j}"
        );
        assert!(
            j["state"] != "failed",
            "job failed: {j}\n{}",
            console(s, id)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits for the guest to power off, then checks its own verdicts and that `image`
/// holds exactly what it wrote (`source` as it was where it did not write).
fn check_guest_and_image(s: &Service, events: &Events, id: &str, image: &Path) {
    events.wait_for(id, "guest-poweroff", Duration::from_secs(120));
    let out = console(s, id);
    assert_eq!(value(&out, "disk0.gens_verify"), "ok", "{out}");
    assert_eq!(value(&out, "disk0.verify"), "ok", "{out}");
    let gens = value(&out, "disk0.gen").parse().unwrap_or(0);
    let data = std::fs::read(image).unwrap_or_else(|e| panic!("{}: {e}", image.display()));
    let untouched = |b: u64| -> Vec<u8> {
        let off = ((b + 1) * 4096) as usize;
        (off..off + 4096).map(|i| (i % 251) as u8).collect()
    };
    let (blocks, digest) =
        tests::test_guest::gens_digest(&data, SEED, SPAN_MIB * 256, gens, &untouched)
            .unwrap_or_else(|e| panic!("{}: {e}", image.display()));
    assert_eq!(
        blocks.to_string(),
        value(&out, "disk0.gens_blocks"),
        "{out}"
    );
    assert_eq!(digest, value(&out, "disk0.gens_digest"), "{out}");
    // The pattern check's block 0.
    for w in 0..512 {
        let word = u64::from_le_bytes(data[w * 8..w * 8 + 8].try_into().unwrap_or_default());
        assert_eq!(word, tests::test_guest::pattern_word(SEED, 0, w as u64));
    }
}

fn disk_path(s: &Service, id: &str) -> PathBuf {
    let info = s.ok("GET", &format!("vm.info?id={id}"), None).json();
    PathBuf::from(info["config"]["disks"][0]["path"].as_str().unwrap_or(""))
}

#[test]
fn mirror_to_a_local_file_pivots_under_guest_writes() {
    let test = "mirror_to_a_local_file_pivots_under_guest_writes";
    if !tests::skip::kvm_or_skip(test) {
        return;
    }
    let s = Service::start(&seccomp_args());
    let events = Events::follow(&s.socket);
    let source = s.image("src.raw", 32);
    let target = s.path("dst.raw");
    s.ok("PUT", "vm.create", Some(&vm(&s, "m", &source, 800, 2000)));
    s.ok("PUT", "vm.boot?id=m", None);
    let _strace = std::env::var("MIRROR_STRACE").ok().map(|out| {
        let pid = s.vm_pid("m").unwrap_or(0);
        let mut c = std::process::Command::new("strace");
        c.args(["-f", "-o", &out]);
        for t in std::fs::read_dir(format!("/proc/{pid}/task"))
            .unwrap()
            .flatten()
        {
            c.arg("-p").arg(t.file_name());
        }
        let child = c.spawn().unwrap();
        std::thread::sleep(Duration::from_millis(500));
        child
    });
    wait_generation(&s, "m", 3);
    let started = s.put(
        "vm.disk-mirror?id=m",
        &json!({"job_id": "j", "disk": "d0", "target": {"path": target}}),
    );
    expect(&started, 200, &["\"j\"", "mirror"]);
    // One job per disk.
    let again = s.put(
        "vm.disk-mirror?id=m",
        &json!({"job_id": "k", "disk": "d0", "target": {"path": s.path("other.raw")}}),
    );
    expect(&again, 409, &["running job"]);
    // Live changes during the job: throttle limits and the iothread's settings.
    s.ok(
        "PUT",
        "vm.update-disk?id=m",
        Some(&json!({"id": "d0", "throttle": {"iops_total": 2500}})),
    );
    s.ok(
        "PUT",
        "vm.update-iothread?id=m",
        Some(&json!({"id": "io0", "poll_max_ns": 0, "cpu_affinity": [0]})),
    );
    let ready = wait_state(&s, "m", "j", "ready", Duration::from_secs(60));
    assert!(ready["bytes_done"].as_u64() >= Some(32 << 20), "{ready}");
    events.wait_for("m", "job-ready", Duration::from_secs(5));
    // More guest writes, mirrored in ready.
    let at = generation(&s, "m");
    wait_generation(&s, "m", at + 5);
    s.ok("PUT", "vm.job-complete?id=m", Some(&json!({"job_id": "j"})));
    events.wait_for("m", "job-completed", Duration::from_secs(5));
    assert_eq!(job(&s, "m", "j")["state"], "completed");
    assert_eq!(disk_path(&s, "m"), target, "vm.info shows the new path");
    let c = s.counters("m");
    assert!(c["disks"]["d0"]["write"]["ops"].as_u64() > Some(0), "{c}");
    // The old image is closed and its lock released; the new one is in use.
    let pid = s.vm_pid("m").unwrap_or(0);
    assert!(
        !tests::procfs::holds(pid, &source),
        "the VM process still has the old image open"
    );
    assert!(tests::procfs::holds(pid, &target));
    let relock = block::Disk::open(&block::DiskOptions {
        cache: block::CacheMode::Writeback,
        ..block::DiskOptions::new(&source)
    });
    assert!(
        relock.is_ok(),
        "the old image is still locked: {:?}",
        relock.err()
    );
    drop(relock);
    // Completing again: the job is over.
    let r = s.put("vm.job-complete?id=m", &json!({"job_id": "j"}));
    expect(&r, 409, &["completed"]);
    check_guest_and_image(&s, &events, "m", &target);
    s.ok("PUT", "vm.delete?id=m", None);
}

#[test]
fn write_blocking_mirror_to_qemu_nbd_pivots_under_guest_writes() {
    let test = "write_blocking_mirror_to_qemu_nbd_pivots_under_guest_writes";
    if !tests::skip::kvm_or_skip(test) || !have("qemu-nbd", test, "qemu-utils") {
        return;
    }
    let s = Service::start(&[]);
    let events = Events::follow(&s.socket);
    let source = s.image("src.raw", 32);
    // The NBD target starts with the source's bytes' shape: a copy the job overwrites.
    let behind = s.path("behind.raw");
    std::fs::File::create(&behind)
        .and_then(|f| f.set_len(32 * MIB as u64))
        .unwrap_or_else(|e| panic!("{e}"));
    let server = NbdServer::qemu_nbd(&behind, "t", Listen::Unix(s.path("t.sock")));
    s.ok("PUT", "vm.create", Some(&vm(&s, "w", &source, 800, 2000)));
    s.ok("PUT", "vm.boot?id=w", None);
    wait_generation(&s, "w", 3);
    let started = s.put(
        "vm.disk-mirror?id=w",
        &json!({"job_id": "j", "disk": "d0", "target": {"path": server.uri()},
                "copy_mode": "write-blocking", "granularity": 1048576}),
    );
    expect(&started, 200, &["write-blocking"]);
    wait_state(&s, "w", "j", "ready", Duration::from_secs(60));
    let at = generation(&s, "w");
    wait_generation(&s, "w", at + 5);
    // In write-blocking mode guest writes reach the target as they complete: nothing
    // waits to be copied once the copier is idle.
    let j = job(&s, "w", "j");
    assert!(j["dirty_bytes"].as_u64() <= Some(4 << 20), "{j}");
    s.ok("PUT", "vm.job-complete?id=w", Some(&json!({"job_id": "j"})));
    assert_eq!(disk_path(&s, "w"), PathBuf::from(server.uri()));
    let c = s.counters("w");
    assert_eq!(c["disks"]["d0"]["nbd"]["state"], "connected", "{c}");
    let pid = s.vm_pid("w").unwrap_or(0);
    assert!(
        !tests::procfs::holds(pid, &source),
        "the old image is closed"
    );
    check_guest_and_image(&s, &events, "w", &behind);
    s.ok("PUT", "vm.delete?id=w", None);
}

#[test]
fn cancel_in_ready_leaves_a_point_in_time_copy_and_bad_requests_are_refused() {
    let test = "cancel_in_ready_leaves_a_point_in_time_copy_and_bad_requests_are_refused";
    if !tests::skip::kvm_or_skip(test) {
        return;
    }
    let s = Service::start(&[]);
    let events = Events::follow(&s.socket);
    let source = s.image("src.raw", 32);
    let target = s.path("dst.raw");
    s.ok("PUT", "vm.create", Some(&vm(&s, "c", &source, 400, 2000)));

    // Bad requests, before and after boot.
    let body = |extra: Value| {
        let mut b = json!({"job_id": "j", "disk": "d0", "target": {"path": target}});
        if let (Some(b), Some(e)) = (b.as_object_mut(), extra.as_object()) {
            b.extend(e.clone());
        }
        b
    };
    s.ok("PUT", "vm.boot?id=c", None);
    expect(
        &s.put("vm.disk-mirror?id=c", &body(json!({"disk": "nope"}))),
        404,
        &["nope"],
    );
    expect(
        &s.put("vm.disk-mirror?id=nope", &body(json!({}))),
        404,
        &["nope"],
    );
    expect(
        &s.put("vm.disk-mirror?id=c", &body(json!({"granularity": 1000}))),
        400,
        &["granularity"],
    );
    expect(
        &s.put("vm.disk-mirror?id=c", &body(json!({"sync": "top"}))),
        400,
        &["qcow2"],
    );
    expect(
        &s.put("vm.disk-mirror?id=c", &body(json!({"bogus": 1}))),
        400,
        &["bogus"],
    );
    expect(
        &s.put(
            "vm.disk-mirror?id=c",
            &body(json!({"target": {"path": source}})),
        ),
        409,
        &["image of disk d0"],
    );
    let small = s.path("small.raw");
    std::fs::File::create(&small)
        .and_then(|f| f.set_len(1 << 20))
        .unwrap_or_else(|e| panic!("{e}"));
    expect(
        &s.put(
            "vm.disk-mirror?id=c",
            &body(json!({"target": {"path": small}})),
        ),
        400,
        &["less than"],
    );
    expect(
        &s.put("vm.job-complete?id=c", &json!({"job_id": "nope"})),
        404,
        &["nope"],
    );

    // A slow job cannot complete before ready; its speed changes live.
    wait_generation(&s, "c", 2);
    s.ok(
        "PUT",
        "vm.disk-mirror?id=c",
        Some(&body(json!({"speed": 1048576}))),
    );
    let r = s.put("vm.job-complete?id=c", &json!({"job_id": "j"}));
    expect(&r, 409, &["ready"]);
    s.ok(
        "PUT",
        "vm.job-set-speed?id=c",
        Some(&json!({"job_id": "j", "speed": 0})),
    );
    assert_eq!(job(&s, "c", "j")["speed"], 0);
    wait_state(&s, "c", "j", "ready", Duration::from_secs(60));

    // Cancel in ready with the guest paused and its last requests done (pausing the
    // vCPUs leaves what is in the rings to the iothread): the target is the disk at that
    // moment, and the disk changes no more.
    s.ok("PUT", "vm.pause?id=c", None);
    let writes = || {
        let c = s.counters("c");
        (
            c["disks"]["d0"]["write"]["ops"].as_u64().unwrap_or(0),
            c["disks"]["d0"]["in_flight"].as_u64().unwrap_or(0),
        )
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut last = writes();
    loop {
        std::thread::sleep(Duration::from_millis(200));
        let now = writes();
        if now == last && now.1 == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the disk did not settle: {now:?}"
        );
        last = now;
    }
    s.ok("PUT", "vm.job-cancel?id=c", Some(&json!({"job_id": "j"})));
    events.wait_for("c", "job-cancelled", Duration::from_secs(5));
    let (a, b) = (
        std::fs::read(&source).unwrap_or_default(),
        std::fs::read(&target).unwrap_or_default(),
    );
    assert!(a == b, "the target differs from the disk at cancel time");
    assert_eq!(disk_path(&s, "c"), source, "the disk stays on its image");
    let pid = s.vm_pid("c").unwrap_or(0);
    assert!(!tests::procfs::holds(pid, &target), "the target is closed");
    expect(
        &s.put("vm.job-cancel?id=c", &json!({"job_id": "j"})),
        409,
        &["cancelled"],
    );
    s.ok("PUT", "vm.resume?id=c", None);
    check_guest_and_image(&s, &events, "c", &source);
    // A shut-down VM has no process to run a job.
    expect(
        &s.put("vm.disk-mirror?id=c", &body(json!({}))),
        409,
        &["mirror a disk of VM c"],
    );
    s.ok("PUT", "vm.delete?id=c", None);
}

/// With the guest writing faster than the job's speed limit, a `background` mirror does
/// not converge (it stays running, and the bytes to copy keep growing); a
/// `write-blocking` one with the same limit reaches ready.
#[test]
fn write_blocking_converges_where_background_cannot() {
    let test = "write_blocking_converges_where_background_cannot";
    if !tests::skip::kvm_or_skip(test) {
        return;
    }
    let s = Service::start(&seccomp_args());
    let elf = support::guest();
    let tsc = support::tsc_khz();
    let source = s.image("small.raw", 8);
    // Writes without end over the first 4 MiB, 3000 a second.
    let config = json!({
        "id": "v",
        "memory": {"size_mib": 64},
        "payload": {"kernel": elf, "cmdline": format!(
            "exit=acpi pci=auto tsc_khz={tsc} blocks=1 seed={SEED} gens=60000 gen_writes=32 gen_span_mib=4")},
        "serial": {"mode": "file", "path": s.path("v.serial")},
        "disks": [{"id": "d0", "path": source, "cache": "none", "throttle": {"iops_total": 3000}}]
    });
    s.ok("PUT", "vm.create", Some(&config));
    s.ok("PUT", "vm.boot?id=v", None);
    wait_generation(&s, "v", 3);
    let mirror = |id: &str, mode: &str, target: &str| {
        json!({"job_id": id, "disk": "d0", "target": {"path": s.path(target)},
               "copy_mode": mode, "speed": 2097152, "granularity": 4096})
    };
    s.ok(
        "PUT",
        "vm.disk-mirror?id=v",
        Some(&mirror("bg", "background", "bg.raw")),
    );
    std::thread::sleep(Duration::from_secs(2));
    let first = job(&s, "v", "bg");
    std::thread::sleep(Duration::from_secs(3));
    let later = job(&s, "v", "bg");
    assert_eq!(later["state"], "running", "{later}");
    assert!(
        later["dirty_bytes"].as_u64() >= Some(1 << 20),
        "far from converging: {later}"
    );
    assert!(
        later["bytes_total"].as_u64() > first["bytes_total"].as_u64(),
        "the bytes to copy keep growing: {first} then {later}"
    );
    s.ok(
        "PUT",
        "vm.job-cancel?id=v",
        Some(&json!({"job_id": "bg", "force": true})),
    );
    s.ok(
        "PUT",
        "vm.disk-mirror?id=v",
        Some(&mirror("wb", "write-blocking", "wb.raw")),
    );
    let ready = wait_state(&s, "v", "wb", "ready", Duration::from_secs(60));
    assert!(ready["bytes_done"].as_u64() >= Some(8 << 20), "{ready}");
    s.ok("PUT", "vm.delete?id=v", None);
}

/// A target that fails every write (nbdkit's error filter) fails the job; the guest's
/// I/O on its own image goes on, the job says why, a `job-failed` event goes out, and
/// the disk stays on its image.
#[test]
fn a_failing_target_fails_the_job_and_not_the_guest() {
    let test = "a_failing_target_fails_the_job_and_not_the_guest";
    if !tests::skip::kvm_or_skip(test) || !have("nbdkit", test, "nbdkit") {
        return;
    }
    let s = Service::start(&seccomp_args());
    let events = Events::follow(&s.socket);
    let source = s.image("src.raw", 32);
    let failing = NbdServer::nbdkit(
        &[
            "--filter=error",
            "memory",
            "size=32M",
            "error=EIO",
            "error-pwrite-rate=100%",
        ],
        Listen::Unix(s.path("bad.sock")),
    );
    s.ok("PUT", "vm.create", Some(&vm(&s, "f", &source, 200, 3000)));
    s.ok("PUT", "vm.boot?id=f", None);
    wait_generation(&s, "f", 2);
    s.ok(
        "PUT",
        "vm.disk-mirror?id=f",
        Some(
            &json!({"job_id": "j", "disk": "d0", "target": {"path": failing.uri()},
                     "copy_mode": "write-blocking"}),
        ),
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    let failed = loop {
        let j = job(&s, "f", "j");
        if j["state"] == "failed" {
            break j;
        }
        assert!(Instant::now() < deadline, "the job did not fail: {j}");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(
        failed["error"]
            .as_str()
            .unwrap_or("")
            .contains("mirror target"),
        "{failed}"
    );
    let (_, e) = events.wait_for("f", "job-failed", Duration::from_secs(5));
    assert_eq!(e["job"], "j", "{e}");
    expect(
        &s.put("vm.job-complete?id=f", &json!({"job_id": "j"})),
        409,
        &["failed"],
    );
    assert_eq!(disk_path(&s, "f"), source);
    check_guest_and_image(&s, &events, "f", &source);
    s.ok("PUT", "vm.delete?id=f", None);
}

/// A disk hot unplugged while its mirror runs: the guest ejects it, its job is
/// cancelled (a `job-cancelled` event) and its target closed; the VM goes on.
#[test]
fn hot_unplug_cancels_the_disks_mirror_and_closes_its_target() {
    let test = "hot_unplug_cancels_the_disks_mirror_and_closes_its_target";
    if !tests::skip::kvm_or_skip(test) {
        return;
    }
    let s = Service::start(&seccomp_args());
    let events = Events::follow(&s.socket);
    let elf = support::guest();
    let tsc = support::tsc_khz();
    let d0 = s.image("d0.raw", 8);
    let d1 = s.image("d1.raw", 16);
    let target = s.path("d1-copy.raw");
    // The guest acts as an OS's hot plug driver once its short phases are done; it
    // waits for a second event that never comes, so that the VM still runs (and lists
    // its jobs) after the eject.
    let config = json!({
        "id": "h",
        "memory": {"size_mib": 64},
        "payload": {"kernel": elf, "cmdline": format!(
            "exit=acpi pci=auto tsc_khz={tsc} ms=50 blocks=1 hotplug=2 hp_wait_s=60")},
        "serial": {"mode": "file", "path": s.path("h.serial")},
        "disks": [{"id": "d0", "path": d0}, {"id": "d1", "path": d1}]
    });
    s.ok("PUT", "vm.create", Some(&config));
    s.ok("PUT", "vm.boot?id=h", None);
    // 64 KiB/s: the job still copies when the disk goes.
    s.ok(
        "PUT",
        "vm.disk-mirror?id=h",
        Some(&json!({"job_id": "j", "disk": "d1", "target": {"path": target}, "speed": 65536})),
    );
    let pid = s.vm_pid("h").unwrap_or(0);
    assert!(tests::procfs::holds(pid, &target));
    assert_eq!(job(&s, "h", "j")["state"], "running");
    s.ok("PUT", "vm.remove-device?id=h", Some(&json!({"id": "d1"})));
    // The job is cancelled as the disk goes (its event comes first).
    let (_, e) = events.wait_for("h", "job-cancelled", Duration::from_secs(60));
    assert_eq!(e["job"], "j", "{e}");
    events.wait_for("h", "disk-ejected", Duration::from_secs(5));
    assert_eq!(job(&s, "h", "j")["state"], "cancelled");
    assert!(!tests::procfs::holds(pid, &target), "the target is closed");
    assert!(
        !tests::procfs::holds(pid, &d1),
        "the ejected image is closed"
    );
    // The guest says so, one line, once its eject returned.
    let ejected = |out: &str| {
        out.split_inclusive('\n')
            .find(|l| l.starts_with("hotplug.ejected") && l.ends_with('\n'))
            .map(str::trim_end)
            .map(str::to_string)
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while ejected(&console(&s, "h")).is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    let out = console(&s, "h");
    assert_eq!(
        ejected(&out)
            .as_deref()
            .and_then(|l| l.split(" irqs=").next()),
        Some("hotplug.ejected slot=2 gone=1"),
        "{out}"
    );
    s.ok("PUT", "vm.delete?id=h", None);
}

/// A VM shut down while a mirror runs: the job is cancelled and says so.
#[test]
fn shutdown_cancels_a_running_mirror() {
    let test = "shutdown_cancels_a_running_mirror";
    if !tests::skip::kvm_or_skip(test) {
        return;
    }
    let s = Service::start(&seccomp_args());
    let events = Events::follow(&s.socket);
    let source = s.image("src.raw", 32);
    s.ok("PUT", "vm.create", Some(&vm(&s, "s", &source, 60000, 3000)));
    s.ok("PUT", "vm.boot?id=s", None);
    wait_generation(&s, "s", 2);
    s.ok(
        "PUT",
        "vm.disk-mirror?id=s",
        Some(
            &json!({"job_id": "j", "disk": "d0", "target": {"path": s.path("dst.raw")},
                     "speed": 65536}),
        ),
    );
    s.ok("PUT", "vm.shutdown?id=s", None);
    let (_, e) = events.wait_for("s", "job-cancelled", Duration::from_secs(10));
    assert_eq!(e["job"], "j", "{e}");
    // A shut-down VM lists no jobs (they lived in its process).
    let jobs = s.ok("GET", "vm.jobs?id=s", None).json();
    assert_eq!(jobs, json!([]), "{jobs}");
    s.ok("PUT", "vm.delete?id=s", None);
}
