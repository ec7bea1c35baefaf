use std::io::Write;

use super::*;

/// A VM config with every section, as the design first gave it.
const EXAMPLE: &str = r#"{
  "id": "vm1",
  "cpus": {"boot_vcpus": 2},
  "memory": {"size_mib": 512, "hugepages": false},
  "payload": {"kernel": "/boot/vmlinuz", "initramfs": "/boot/initrd.img",
              "cmdline": "console=ttyS0 root=/dev/vda"},
  "serial": {"mode": "file", "path": "/run/vm1.serial"},
  "iothreads": [{"id": "io0", "poll_max_ns": 32768, "poll_grow": 2, "poll_shrink": 0,
                 "aio_max_batch": 32, "cpu_affinity": [1]}],
  "throttle_groups": [{"id": "tenant-a", "limits": {"iops_total": 5000}}],
  "disks": [{
    "id": "disk0", "path": "/var/lib/vm1/root.raw", "readonly": false,
    "cache": "none", "aio": "io_uring",
    "iothread": "io0",
    "num_queues": 1, "queue_size": 256,
    "discard": "unmap",
    "throttle": {"iops_total": 1000, "iops_total_max": 2000, "iops_total_max_length": 1,
                 "bps_total": 104857600},
    "throttle_group": "tenant-a",
    "serial": "disk0"
  }]
}"#;

struct Files {
    _dir: tempfile::TempDir,
    kernel: PathBuf,
    initrd: PathBuf,
}

fn files() -> Files {
    let dir = tempfile::tempdir().unwrap();
    let kernel = dir.path().join("vmlinuz");
    let initrd = dir.path().join("initrd.img");
    std::fs::File::create(&kernel)
        .unwrap()
        .write_all(b"k")
        .unwrap();
    std::fs::File::create(&initrd).unwrap();
    Files {
        _dir: dir,
        kernel,
        initrd,
    }
}

/// The example with its host paths pointing at files that exist.
fn example(f: &Files) -> VmConfig {
    let mut c: VmConfig = serde_json::from_str(EXAMPLE).unwrap();
    c.payload.kernel = f.kernel.clone();
    c.payload.initramfs = Some(f.initrd.clone());
    c
}

/// A minimal valid config.
fn minimal(f: &Files) -> VmConfig {
    let json = format!(
        r#"{{"id": "vm0", "payload": {{"kernel": {:?}}}}}"#,
        f.kernel.to_str().unwrap()
    );
    VmConfig::from_json(&json).unwrap()
}

/// Asserts that `c` has exactly one problem, containing every needle.
#[track_caller]
fn one_problem(c: &VmConfig, needles: &[&str]) {
    let p = c.problems();
    assert_eq!(p.len(), 1, "{p:#?}");
    for n in needles {
        assert!(p[0].contains(n), "{:?} lacks {n:?}", p[0]);
    }
}

#[test]
fn architecture_example_parses() {
    let c: VmConfig = serde_json::from_str(EXAMPLE).unwrap();
    assert_eq!(c.id, "vm1");
    assert_eq!(c.cpus.boot_vcpus, 2);
    assert_eq!(c.memory, MemoryConfig::default());
    assert_eq!(c.payload.cmdline, "console=ttyS0 root=/dev/vda");
    assert_eq!(c.serial.mode, SerialMode::File);
    assert_eq!(c.iothreads[0].poll_grow, 2);
    assert_eq!(c.throttle_groups[0].limits.iops_total, 5000);
    assert_eq!(c.disks[0].iothread.as_deref(), Some("io0"));
    assert_eq!(c.disks[0].throttle.as_ref().unwrap().bps_total, 104_857_600);
    // Only the host paths of the example are missing here.
    let f = files();
    let fixed = example(&f);
    assert_eq!(fixed.problems(), Vec::<String>::new());
    // Round trip.
    let back: VmConfig = serde_json::from_str(&serde_json::to_string(&fixed).unwrap()).unwrap();
    assert_eq!(back, fixed);
    assert!(fixed.summary().contains("vm vm1: 2 vCPU(s), 512 MiB"));
}

#[test]
fn defaults() {
    let f = files();
    let c = minimal(&f);
    assert_eq!(c.cpus.boot_vcpus, 1);
    assert_eq!(c.memory.size_mib, 512);
    assert!(!c.memory.hugepages);
    assert_eq!(c.serial.mode, SerialMode::Null);
    assert!(c.iothreads.is_empty() && c.disks.is_empty() && c.throttle_groups.is_empty());
    assert_eq!(c.memory.size_bytes(), 512 << 20);
}

#[test]
fn parse_errors_name_the_field() {
    let err = |json: &str| VmConfig::from_json(json).unwrap_err().to_string();
    assert!(err(r#"{"id":"a","payload":{"kernel":"k"},"bogus":1}"#).contains("bogus"));
    assert!(err(r#"{"id":"a","payload":{"kernel":"k"},"cpus":{"vcpus":1}}"#).contains("vcpus"));
    assert!(err(r#"{"id":"a"}"#).contains("missing field `payload`"));
    assert!(err(r#"{"payload":{"kernel":"k"}}"#).contains("missing field `id`"));
    assert!(
        err(r#"{"id":"a","payload":{"kernel":"k"},"serial":{"mode":"tty"}}"#)
            .contains("unknown variant `tty`")
    );
    let read = VmConfig::from_file(Path::new("/nonexistent/vm.json")).unwrap_err();
    assert!(matches!(read, ConfigError::Read { .. }), "{read}");
}

#[test]
fn vm_and_cpu_errors() {
    let f = files();
    let mut c = minimal(&f);
    c.id = "bad id".into();
    one_problem(&c, &["id:", "1-64"]);
    let mut c = minimal(&f);
    c.cpus.boot_vcpus = 0;
    one_problem(&c, &["cpus.boot_vcpus", "1..=255", "got 0"]);
    c.cpus.boot_vcpus = 256;
    one_problem(&c, &["cpus.boot_vcpus", "got 256"]);
    c.cpus.boot_vcpus = 255;
    assert!(c.problems().is_empty());
}

#[test]
fn memory_errors() {
    let f = files();
    let mut c = minimal(&f);
    c.memory.size_mib = 63;
    one_problem(&c, &["memory.size_mib", "64..=1048576"]);
    c.memory.size_mib = (1 << 20) + 1;
    one_problem(&c, &["memory.size_mib"]);
    c.memory.size_mib = 1 << 20;
    assert!(c.problems().is_empty());
    c.memory.size_mib = 513;
    c.memory.hugepages = true;
    one_problem(&c, &["memory.size_mib", "multiple of 2", "hugepages"]);
    // More hugepages than the host reserves in all can never be had.
    c.memory.size_mib = 1 << 20;
    let reserved = crate::memory::reserved_hugepages();
    assert!(
        reserved < 1 << 19,
        "a host with 1 TiB of hugepages reserved"
    );
    one_problem(
        &c,
        &[
            "memory.hugepages",
            &format!("reserves {reserved} 2 MiB hugepages in all, 524288 needed"),
        ],
    );
}

#[test]
fn payload_errors() {
    let f = files();
    let mut c = minimal(&f);
    c.payload.kernel = "/nonexistent/vmlinuz".into();
    one_problem(&c, &["payload.kernel", "/nonexistent/vmlinuz"]);
    c.payload.kernel = f._dir.path().to_path_buf();
    one_problem(&c, &["payload.kernel", "not a regular file"]);
    let mut c = minimal(&f);
    c.payload.initramfs = Some("/nonexistent/initrd".into());
    one_problem(&c, &["payload.initramfs"]);
    let mut c = minimal(&f);
    c.payload.cmdline = "a\0b".into();
    one_problem(&c, &["payload.cmdline"]);
}

#[test]
fn serial_errors() {
    let f = files();
    let mut c = minimal(&f);
    c.serial.mode = SerialMode::File;
    one_problem(&c, &["serial.path is required", "file"]);
    c.serial.mode = SerialMode::Socket;
    one_problem(&c, &["serial.path is required", "socket"]);
    c.serial.path = Some("/tmp/s".into());
    assert!(c.problems().is_empty());
    c.serial.mode = SerialMode::Stdout;
    one_problem(&c, &["serial.path is only for", "stdout"]);
}

#[test]
fn iothread_errors() {
    let f = files();
    let mut c = example(&f);
    c.iothreads.push(IoThreadConfig::new("io0"));
    one_problem(&c, &["iothreads[1].id \"io0\"", "another iothread"]);
    let mut c = example(&f);
    c.iothreads[0].aio_max_batch = 0;
    one_problem(&c, &["iothreads[0]", "aio_max_batch"]);
}

#[test]
fn throttle_group_errors() {
    let f = files();
    let mut c = example(&f);
    c.throttle_groups.push(c.throttle_groups[0].clone());
    one_problem(
        &c,
        &[
            "throttle_groups[1].id \"tenant-a\"",
            "another throttle group",
        ],
    );
    let mut c = example(&f);
    c.throttle_groups[0].limits.iops_read = 10;
    one_problem(&c, &["throttle_groups[0].limits (tenant-a)", "iops_read"]);
    let mut c = example(&f);
    c.throttle_groups[0].id = String::new();
    c.disks[0].throttle_group = None;
    one_problem(&c, &["throttle_groups[0].id"]);
}

#[test]
fn disk_errors() {
    let f = files();
    let mut c = example(&f);
    c.disks.push(DiskConfig::new("disk0", "/other.raw"));
    one_problem(&c, &["disks[1].id \"disk0\"", "another disk"]);

    let mut c = example(&f);
    c.disks[0].iothread = Some("io9".into());
    one_problem(
        &c,
        &["disks[0] (disk0).iothread", "\"io9\"", "not in iothreads"],
    );

    let mut c = example(&f);
    c.disks[0].iothread = None;
    c.disks[0].num_queues = 2;
    c.disks[0].iothread_vq_mapping = Some(vec![
        devices::config::VqMapping {
            iothread: "io0".into(),
            vqs: vec![0],
        },
        devices::config::VqMapping {
            iothread: "nope".into(),
            vqs: vec![1],
        },
    ]);
    one_problem(
        &c,
        &[
            "disks[0] (disk0).iothread_vq_mapping[1].iothread",
            "\"nope\"",
        ],
    );

    let mut c = example(&f);
    c.disks[0].throttle_group = Some("tenant-b".into());
    one_problem(&c, &["disks[0] (disk0).throttle_group", "\"tenant-b\""]);

    let mut c = example(&f);
    c.disks[0].queue_size = 100;
    one_problem(&c, &["disks[0]:", "power of two"]);

    // One image twice: refused unless both are read-only.
    let mut c = example(&f);
    let mut d = DiskConfig::new("disk1", "/var/lib/vm1/root.raw");
    c.disks.push(d.clone());
    one_problem(&c, &["disks[1] (disk1).path", "disks[0]", "read-only"]);
    c.disks[0].readonly = true;
    d.readonly = true;
    c.disks[1] = d;
    assert!(c.problems().is_empty());
}

#[test]
fn every_problem_is_reported() {
    let f = files();
    let mut c = example(&f);
    c.cpus.boot_vcpus = 0;
    c.memory.size_mib = 1;
    c.serial.path = None;
    c.disks[0].iothread = Some("x".into());
    let err = c.validate().unwrap_err();
    assert_eq!(err.details().len(), 4, "{err}");
    assert!(err.to_string().starts_with("invalid VM config: "));
}

#[test]
fn device_counts_are_bounded() {
    let mut c: VmConfig = serde_json::from_value(serde_json::json!({
        "id": "vm", "payload": {"kernel": "/bin/sh"}
    }))
    .unwrap();
    c.iothreads = (0..=MAX_DEVICES)
        .map(|i| devices::config::IoThreadConfig::new(format!("io{i}")))
        .collect();
    let problems = c.problems();
    assert!(
        problems.iter().any(|p| p.contains("iothreads: at most 64")),
        "{problems:?}"
    );
}

#[test]
fn disks_are_bounded_by_the_pci_slots() {
    let f = files();
    let mut c = minimal(&f);
    c.disks = (0..MAX_DISKS)
        .map(|i| {
            let mut d = DiskConfig::new(format!("d{i}"), "null");
            d.null_size = Some(1 << 20);
            d
        })
        .collect();
    assert!(c.problems().is_empty(), "{:?}", c.problems());
    let mut extra = DiskConfig::new("one-more", "null");
    extra.null_size = Some(1 << 20);
    c.disks.push(extra);
    one_problem(&c, &["disks: at most 31 per VM", "PCI bus 0", "got 32"]);
}

#[test]
fn one_image_through_a_symlink_or_hard_link_is_the_same_image() {
    let f = files();
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("a.raw");
    std::fs::write(&img, vec![0u8; 4096]).unwrap();
    let sym = dir.path().join("sym.raw");
    std::os::unix::fs::symlink(&img, &sym).unwrap();
    let hard = dir.path().join("hard.raw");
    std::fs::hard_link(&img, &hard).unwrap();
    for other in [&sym, &hard] {
        let mut c = minimal(&f);
        c.disks = vec![DiskConfig::new("d0", &img), DiskConfig::new("d1", other)];
        let sym_name = other.display().to_string();
        one_problem(
            &c,
            &[
                &format!("disks[1] (d1).path {sym_name} is the same image as disks[0] (d0)"),
                "of this VM",
                "reached as",
            ],
        );
        // Read-only on both sides may share.
        c.disks.iter_mut().for_each(|d| d.readonly = true);
        assert!(c.problems().is_empty(), "{:?}", c.problems());
    }
}

#[test]
fn serial_paths_must_suit_their_mode() {
    let f = files();
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("a.raw");
    std::fs::write(&img, vec![0u8; 4096]).unwrap();
    let link = dir.path().join("link");
    std::os::unix::fs::symlink(&img, &link).unwrap();
    let mut c = minimal(&f);
    c.disks = vec![DiskConfig::new("d0", &img)];
    c.serial = SerialConfig {
        mode: SerialMode::File,
        path: Some(link.clone()),
    };
    one_problem(&c, &["is the image of disks[0] (d0)", "a file of its own"]);
    c.serial.path = Some("/dev/null".into());
    one_problem(
        &c,
        &[
            "serial.path /dev/null is a character device",
            "regular file",
        ],
    );
    c.serial.path = Some(dir.path().join("new.log"));
    assert!(c.problems().is_empty(), "{:?}", c.problems());
    c.serial.mode = SerialMode::Socket;
    c.serial.path = Some(img.clone());
    one_problem(&c, &["is a regular file, not a socket"]);
}

#[test]
fn iothreads_and_disks_need_different_ids() {
    let f = files();
    let mut c = example(&f);
    c.iothreads.push(IoThreadConfig::new("disk0"));
    one_problem(
        &c,
        &[
            "iothreads[1].id \"disk0\" is also the id of disk disk0 (disks[0])",
            "names its dedicated iothread",
        ],
    );
    // A disk added under an iothread's id.
    let err = example(&f)
        .with_disk(DiskConfig::new("io0", "/other.raw"))
        .unwrap_err();
    assert_eq!(err.details().len(), 1, "{:?}", err.details());
    assert!(
        err.details()[0]
            .starts_with("disks[1].id \"io0\" is also the id of iothread io0 (iothreads[0])"),
        "{err}"
    );
}

/// Issue 11 item 3: a change of one disk checks that disk (against the other disks, the
/// iothreads, the groups and the serial file), not the files the VM needed to start.
#[test]
fn one_disk_is_checked_without_the_rest_of_the_vm() {
    let f = files();
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("a.raw");
    std::fs::write(&img, vec![0u8; 4096]).unwrap();
    let serial = dir.path().join("serial.log");
    std::fs::write(&serial, b"").unwrap();
    let mut c = example(&f);
    c.serial.path = Some(serial.clone());
    assert!(c.problems().is_empty(), "{:?}", c.problems());
    std::fs::remove_file(&f.kernel).unwrap();
    let whole = c.problems();
    assert!(
        whole.len() == 1 && whole[0].starts_with("payload.kernel: "),
        "{whole:?}"
    );
    assert_eq!(c.disk_problems(0), Vec::<String>::new());
    assert_eq!(c.disk_problems(1), Vec::<String>::new(), "out of range");
    let c = c.with_disk(DiskConfig::new("d1", &img)).unwrap();
    assert_eq!(c.disks.len(), 2);

    // The new disk's own checks still hold.
    let problems = |d: DiskConfig| match c.with_disk(d) {
        Ok(_) => panic!("accepted"),
        Err(e) => e.details(),
    };
    let mut native = DiskConfig::new("d2", "/other.raw");
    native.aio = block::AioKind::Native;
    native.cache = block::CacheMode::Writeback;
    let p = problems(native);
    assert!(
        p.len() == 1 && p[0].starts_with("disks[2]: disk d2: aio=native needs O_DIRECT"),
        "{p:?}"
    );
    let p = problems(DiskConfig::new("disk0", "/other.raw"));
    assert_eq!(p, ["disks[2].id \"disk0\" is used by another disk"]);
    let p = problems(DiskConfig::new("d3", &img));
    assert!(
        p.len() == 1 && p[0].contains("disks[2] (d3).path") && p[0].contains("disks[1] (d1)"),
        "{p:?}"
    );
    let mut orphan = DiskConfig::new("d4", "/other.raw");
    orphan.iothread = Some("io9".into());
    orphan.throttle_group = Some("tenant-b".into());
    let p = problems(orphan);
    assert!(
        p.len() == 2 && p[0].contains("\"io9\"") && p[1].contains("\"tenant-b\""),
        "{p:?}"
    );
    let p = problems(DiskConfig::new("d5", &serial));
    assert!(
        p.len() == 1 && p[0].contains("is this VM's serial output file"),
        "{p:?}"
    );
    // A disk changed in place is checked against the disks after it too.
    let mut changed = c.clone();
    changed.disks[0].path = img.clone();
    let p = changed.disk_problems(0);
    assert!(
        p.len() == 1 && p[0].contains("disks[0] (disk0).path") && p[0].contains("disks[1] (d1)"),
        "{p:?}"
    );
}

#[test]
fn an_added_disk_counts_against_the_pci_slots() {
    let f = files();
    let mut c = minimal(&f);
    let null = |id: String| {
        let mut d = DiskConfig::new(id, "null");
        d.null_size = Some(1 << 20);
        d
    };
    c.disks = (0..MAX_DISKS - 1).map(|i| null(format!("d{i}"))).collect();
    let c = c.with_disk(null("last".into())).unwrap();
    let err = c.with_disk(null("one-more".into())).unwrap_err();
    assert!(
        err.details()[0].contains("disks: at most 31 per VM"),
        "{err}"
    );
}

/// A client's list of thousands of disks stops at the count: no disk is compared with
/// every other or looked up on disk (which a 1 MiB body could make last for minutes).
#[test]
fn too_many_disks_stop_at_the_count() {
    let f = files();
    let mut c = minimal(&f);
    let disk = DiskConfig::new("same", "/nonexistent/img.raw");
    c.disks = vec![disk; 5000];
    let p = c.problems();
    assert_eq!(p.len(), 1, "{p:?}");
    assert!(p[0].contains("at most"), "{p:?}");
}
