//! The `vmm` binary's config handling: valid configs pass `--check`, invalid ones are
//! refused with exit status 2 and a message naming every bad field.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

struct Setup {
    dir: tempfile::TempDir,
    kernel: PathBuf,
}

fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let kernel = dir.path().join("vmlinux");
    std::fs::write(&kernel, b"\x7fELF").unwrap();
    Setup { dir, kernel }
}

fn write_config(dir: &Path, name: &str, json: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, json).unwrap();
    path
}

fn vmm(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_vmm"))
        .args(args)
        .output()
        .unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn good_json(s: &Setup) -> String {
    let kernel = s.kernel.to_str().unwrap();
    let serial = s.dir.path().join("serial.log");
    let serial = serial.to_str().unwrap();
    format!(
        r#"{{
  "id": "vm1",
  "cpus": {{"boot_vcpus": 2}},
  "memory": {{"size_mib": 256}},
  "payload": {{"kernel": "{kernel}", "cmdline": "console=ttyS0"}},
  "serial": {{"mode": "file", "path": "{serial}"}},
  "iothreads": [{{"id": "io0"}}, {{"id": "io1"}}],
  "throttle_groups": [{{"id": "g", "limits": {{"iops_total": 100}}}}],
  "disks": [
    {{"id": "d0", "path": "null", "null_size": 1048576, "iothread": "io0"}},
    {{"id": "d1", "path": "null", "null_size": 1048576, "num_queues": 2,
      "iothread_vq_mapping": [{{"iothread": "io0", "vqs": [0]}}, {{"iothread": "io1", "vqs": [1]}}],
      "throttle_group": "g"}}
  ]
}}"#
    )
}

#[test]
fn check_accepts_a_valid_config() {
    let s = setup();
    let path = write_config(s.dir.path(), "vm.json", &good_json(&s));
    let out = vmm(&["--config", path.to_str().unwrap(), "--check"]);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}{}", text(&out.stderr));
    assert!(
        stdout.starts_with("config ok: vm vm1: 2 vCPU(s), 256 MiB"),
        "{stdout}"
    );
    assert!(stdout.contains("2 disk(s), 2 iothread(s)"), "{stdout}");
}

#[test]
fn a_kernel_that_cannot_be_loaded_fails_clearly() {
    // The config is valid, but its "kernel" is not a bootable image.
    let s = setup();
    let path = write_config(s.dir.path(), "vm.json", &good_json(&s));
    let out = vmm(&["--config", path.to_str().unwrap()]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(text(&out.stdout).contains("config ok"));
    assert!(stderr.contains("error: cannot start the VM"), "{stderr}");
    assert!(stderr.contains("truncated ELF header"), "{stderr}");
}

#[test]
fn every_invalid_field_is_reported() {
    let s = setup();
    let json = good_json(&s)
        .replace(r#""boot_vcpus": 2"#, r#""boot_vcpus": 0"#)
        .replace(r#""size_mib": 256"#, r#""size_mib": 8"#)
        .replace(r#""iothread": "io0"}"#, r#""iothread": "io7"}"#)
        .replace(r#""throttle_group": "g""#, r#""throttle_group": "h""#);
    let path = write_config(s.dir.path(), "bad.json", &json);
    let out = vmm(&["--config", path.to_str().unwrap(), "--check"]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("invalid VM config"), "{stderr}");
    for needle in [
        "cpus.boot_vcpus",
        "memory.size_mib",
        "disks[0] (d0).iothread names \"io7\"",
        "disks[1] (d1).throttle_group names \"h\"",
    ] {
        assert!(
            stderr.contains(needle),
            "{needle:?} missing from:\n{stderr}"
        );
    }
    assert_eq!(stderr.lines().filter(|l| l.starts_with("  - ")).count(), 4);
}

/// Issue 11 item 3: `--check` refuses what the service refuses: `aio=native` without
/// O_DIRECT and an iothread named like a disk, each naming its field.
#[test]
fn check_refuses_native_aio_without_o_direct_and_iothreads_named_like_disks() {
    let s = setup();
    for cache in ["writeback", "writethrough", "unsafe"] {
        let image = s.dir.path().join("d2.raw");
        std::fs::write(&image, vec![0u8; 4096]).unwrap();
        let disk = format!(
            r#""disks": [
    {{"id": "d2", "path": {image:?}, "aio": "native", "cache": "{cache}"}},"#
        );
        let json = good_json(&s).replace(r#""disks": ["#, &disk);
        let path = write_config(s.dir.path(), "native.json", &json);
        let out = vmm(&["--config", path.to_str().unwrap(), "--check"]);
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{cache}: {stderr}");
        assert!(
            stderr.contains(&format!(
                "disks[0]: disk d2: aio=native needs O_DIRECT: use cache=none or cache=directsync (cache={cache} was given)"
            )),
            "{stderr}"
        );
    }
    let json = good_json(&s).replace(r#"{"id": "io1"}"#, r#"{"id": "io1"}, {"id": "d0"}"#);
    let path = write_config(s.dir.path(), "clash.json", &json);
    let out = vmm(&["--config", path.to_str().unwrap(), "--check"]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains(r#"iothreads[2].id "d0""#), "{stderr}");
}

#[test]
fn json_errors_and_missing_files_are_reported() {
    let s = setup();
    let bad = good_json(&s).replace(r#""id": "vm1","#, r#""id": "vm1", "colour": "red","#);
    let path = write_config(s.dir.path(), "unknown.json", &bad);
    let out = vmm(&["--config", path.to_str().unwrap(), "--check"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("unknown field `colour`"));

    let path = write_config(s.dir.path(), "trunc.json", "{\"id\": ");
    let out = vmm(&["--config", path.to_str().unwrap(), "--check"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("invalid JSON"));

    let out = vmm(&["--config", "/nonexistent/vm.json", "--check"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("cannot read /nonexistent/vm.json"));

    let out = vmm(&["--check"]);
    assert_eq!(out.status.code(), Some(2), "clap usage error");
    assert!(text(&out.stderr).contains("--config"));
}
