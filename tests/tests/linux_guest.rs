//! A real Linux guest (Debian cloud kernel, QEMU/TCG, busybox initramfs) against
//! vhost-user-blk backends. Skips, saying why, when QEMU, the kernel, busybox-static or fio
//! is missing.

use std::path::Path;
use std::time::{Duration, Instant};

use tests::linux_guest::{self, BootOptions, FioVerifyJob, Initramfs, Tools, VhostUserBackend};

/// The tools and the (cached) initramfs, or the reason to skip.
fn setup(test: &str) -> Option<(Tools, Initramfs)> {
    let (tools, initramfs) =
        tests::linux_guest::tools_and_initramfs(test, Path::new(env!("CARGO_TARGET_TMPDIR")))?;
    eprintln!(
        "initramfs {} ({}, {:.2?})",
        initramfs.path.display(),
        if initramfs.cached { "cached" } else { "built" },
        initramfs.build_time
    );
    Some((tools, initramfs))
}

#[test]
fn guest_boots_and_reports_script_status() {
    let Some((tools, initramfs)) = setup("guest_boots_and_reports_script_status") else {
        return;
    };
    let script = "echo hello-from-guest $(uname -r)\n\
                  echo modules: $(cut -d' ' -f1 /proc/modules)\n\
                  [ -c /dev/console ] && [ -d /proc/self ] && [ -d /sys/bus/pci ] || exit 9\n\
                  fio --version || exit 8\n\
                  exit 0\n";
    let run = linux_guest::boot(&tools, &initramfs, &BootOptions::new(script))
        .unwrap_or_else(|e| panic!("boot: {e}"));
    eprintln!(
        "smoke boot: start marker after {:.2?}, {:.2?} total",
        run.boot_time.unwrap_or_default(),
        run.total_time
    );
    assert!(run.succeeded(), "{}", run.report());
    let out = &run.script_output;
    assert!(
        out.contains(&format!("hello-from-guest {}", tools.kernel_version)),
        "{}",
        run.report()
    );
    let loaded: Vec<&str> = out
        .lines()
        .find_map(|l| l.strip_prefix("modules:"))
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    assert!(initramfs.modules.len() >= 5, "{:?}", initramfs.modules);
    for m in &initramfs.modules {
        let name = m.trim_end_matches(".ko");
        assert!(
            loaded.contains(&name),
            "module {name} not loaded: {loaded:?}"
        );
    }
    assert!(out.contains("fio-"), "{}", run.report());
    assert!(!run.console.contains("insmod"), "{}", run.report());

    // A failing script's status comes back too.
    let run = linux_guest::boot(
        &tools,
        &initramfs,
        &BootOptions::new("echo failing; exit 7"),
    )
    .unwrap_or_else(|e| panic!("boot: {e}"));
    assert_eq!(run.exit_status, Some(7), "{}", run.report());
    assert!(!run.succeeded());
    assert_eq!(run.script_output, "failing\n");
}

#[test]
fn fio_verifies_through_qemu_storage_daemon() {
    let test = "fio_verifies_through_qemu_storage_daemon";
    let Some((tools, initramfs)) = setup(test) else {
        return;
    };
    let qsd = match linux_guest::find_qemu_storage_daemon() {
        Ok(q) => q,
        Err(skip) => {
            skip.print(test);
            return;
        }
    };
    // Not tmpfs: the export uses O_DIRECT.
    let dir = tempfile::Builder::new()
        .prefix("linux-guest-qsd-")
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .unwrap();
    let image = dir.path().join("disk.img");
    let disk_size: u64 = 64 << 20;
    std::fs::File::create(&image)
        .and_then(|f| f.set_len(disk_size))
        .unwrap();
    let socket = dir.path().join("vu.sock");
    let mut backend = linux_guest::qemu_storage_daemon(&qsd, &image, &socket, 2)
        .unwrap_or_else(|e| panic!("qemu-storage-daemon: {e}"));
    assert_eq!(backend.num_queues(), 2);

    // Two jobs on two vCPUs: blk-mq gives each vCPU its own virtqueue.
    let job = FioVerifyJob {
        numjobs: 2,
        cpus: 2,
        ..FioVerifyJob::default()
    };
    let start = Instant::now();
    let (fio, run) = linux_guest::fio::run_verify(&tools, &initramfs, &backend, &job)
        .unwrap_or_else(|e| panic!("{e}\n--- backend log:\n{}", backend.log()));
    eprintln!(
        "qsd fio verify: boot {:.2?}, whole run {:.2?}, {} writes + {} verify reads",
        run.boot_time.unwrap_or_default(),
        start.elapsed(),
        fio.write_ios,
        fio.read_ios
    );
    assert!(
        fio.verified_cleanly(job.size),
        "{fio:?}\n{}\n--- backend log:\n{}",
        run.report(),
        backend.log()
    );
    assert_eq!(fio.write_ios, job.size / job.block_size);
    assert_eq!(fio.disk_sectors, Some(disk_size / 512));
    assert_eq!(fio.read_only, Some(false));
    assert_eq!(fio.guest_queues, Some(2));
    assert!(backend.is_running(), "backend died:\n{}", backend.log());
    backend.stop(Duration::from_secs(5));

    // The writes reached the image: every block fio wrote starts with its verify header
    // magic (0xacca, little endian); the untouched rest is still zero.
    let data = std::fs::read(&image).unwrap();
    let bs = usize::try_from(job.block_size).unwrap();
    let written = usize::try_from(job.size).unwrap();
    let unstamped = data[..written]
        .chunks(bs)
        .filter(|b| b[..2] != [0xca, 0xac])
        .count();
    assert_eq!(unstamped, 0, "blocks without a fio header");
    assert!(data[written..].iter().all(|&b| b == 0));
}

#[test]
fn fio_verdict_catches_a_corrupted_block() {
    let Some((tools, initramfs)) = setup("fio_verdict_catches_a_corrupted_block") else {
        return;
    };
    // On a guest tmpfs file (no disk, no O_DIRECT): write, clobber block 5, verify.
    let job = FioVerifyJob {
        filename: "/tmp/verify.dat".into(),
        direct: false,
        size: 4 << 20,
        corrupt_block: Some(5),
        ..FioVerifyJob::default()
    };
    let (fio, run) =
        linux_guest::fio::run(&tools, &initramfs, None, &job).unwrap_or_else(|e| panic!("{e}"));
    assert!(run.exit_status.is_some(), "{}", run.report());
    assert_ne!(
        run.exit_status,
        Some(91),
        "write phase failed:\n{}",
        run.report()
    );
    assert!(!fio.verified_cleanly(job.size), "{fio:?}\n{}", run.report());
    assert_ne!(fio.error, 0, "{fio:?}\n{}", run.report());
    assert_ne!(fio.exit_status, Some(0));
    assert!(
        run.script_output.contains("verify"),
        "no verify complaint:\n{}",
        run.report()
    );
}
