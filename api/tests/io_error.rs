//! The error policy under `vmmd` (ARCHITECTURE.md section 4 "Error policy"): the test
//! guest writes a pattern with a per-pass generation number to random blocks of an
//! image on a small tmpfs. The storage fills: the disk (`on_write_error` left at its
//! default, `enospc`) holds the failed writes and the VM pauses with reason `io-error`
//! (an `io-error` event, `vm.info` naming the op and errno). The test grows the tmpfs
//! and resumes: the guest finishes without a write error and verifies every block, and
//! the image holds exactly what the guest wrote. The policy is set live on the way
//! (`vm.update-disk`).
//!
//! Needs root (it mounts a tmpfs) and `/dev/kvm`; skips, saying why, otherwise.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::time::{Duration, Instant};

mod support;

use serde_json::json;
use support::{Events, Service};

const SEED: u64 = 11;
const SPAN_MIB: u64 = 8;

fn value(console: &str, key: &str) -> String {
    console
        .lines()
        .filter_map(|l| l.strip_prefix(&format!("{key}=")))
        .next_back()
        .unwrap_or("")
        .to_string()
}

/// `mount -t tmpfs -o [remount,]size=SIZE tmpfs DIR`.
fn mount_tmpfs(dir: &std::path::Path, size: &str, remount: bool) {
    let target = CString::new(dir.as_os_str().as_bytes()).unwrap();
    let options = CString::new(format!("size={size}")).unwrap();
    let flags = if remount { libc::MS_REMOUNT } else { 0 };
    // SAFETY: every pointer is a NUL-terminated string that outlives the call.
    let rc = unsafe {
        libc::mount(
            c"tmpfs".as_ptr(),
            target.as_ptr(),
            c"tmpfs".as_ptr(),
            flags,
            options.as_ptr().cast(),
        )
    };
    assert_eq!(rc, 0, "mount tmpfs: {}", std::io::Error::last_os_error());
}

/// Unmounts the tmpfs when dropped.
struct Unmount(std::path::PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        if let Ok(target) = CString::new(self.0.as_os_str().as_bytes()) {
            // SAFETY: a NUL-terminated path that outlives the call.
            unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
        }
    }
}

#[test]
fn out_of_space_pauses_the_vm_and_resume_loses_nothing() {
    let test = "out_of_space_pauses_the_vm_and_resume_loses_nothing";
    if !tests::skip::kvm_or_skip(test) {
        return;
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        tests::skip::skip(test, "mounting a tmpfs needs root");
        return;
    }
    let s = Service::start(&[]);
    let events = Events::follow(&s.socket);
    let small = s.path("small");
    std::fs::create_dir(&small).unwrap();
    mount_tmpfs(&small, "1m", false);
    let _unmount = Unmount(small.clone());
    let image = small.join("d0.raw");
    std::fs::File::create(&image)
        .unwrap()
        .set_len((SPAN_MIB + 1) << 20)
        .unwrap();
    let elf = support::guest();
    let tsc = support::tsc_khz();
    s.ok(
        "PUT",
        "vm.create",
        Some(&json!({
            "id": "e",
            "memory": {"size_mib": 64},
            "payload": {"kernel": elf, "cmdline": format!(
                "exit=acpi pci=auto tsc_khz={tsc} ms=50 blocks=1 seed={SEED} gens=20 gen_writes=64 gen_span_mib={SPAN_MIB}")},
            "serial": {"mode": "file", "path": s.path("e.serial")},
            "disks": [{"id": "d0", "path": image, "cache": "writeback",
                       "on_write_error": "report"}]
        })),
    );
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
    mount_tmpfs(&small, "64m", true);
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
