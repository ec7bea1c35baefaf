//! A real Linux guest against our vhost-user-blk backend: QEMU under TCG boots the Debian
//! cloud kernel with a busybox + fio initramfs; the guest's virtio-blk driver and fio
//! (`--verify=crc32c`, two jobs on two vCPUs, so two virtqueues) go through our data
//! plane. Skips, saying why, only when QEMU, the kernel, busybox-static or fio is missing.

#![allow(clippy::cast_possible_truncation)] // Test data and figures, not guest input.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use devices::vhost_user_blk::BackendCounters;
use tests::linux_guest::{self, BackendProcess, FioVerifyJob, Initramfs, Tools};
use tests::nbd_server::{Listen, NbdServer};

#[test]
fn fio_verifies_through_our_backend_and_our_counters_saw_it() {
    fio_verifies(
        "fio_verifies_through_our_backend_and_our_counters_saw_it",
        Backing::File,
    );
}

/// The same on a fresh qcow2 image: every block fio writes allocates a cluster, from two
/// iothreads at once; `qemu-img check` then finds no error.
#[test]
fn fio_verifies_on_a_fresh_qcow2_image() {
    let test = "fio_verifies_on_a_fresh_qcow2_image";
    if !tests::nbd_server::have("qemu-img", test, "qemu-utils") {
        return;
    }
    fio_verifies(test, Backing::Qcow2);
}

/// The same with the disk on an NBD server (`qemu-nbd` serving the image): the guest's
/// I/O goes through our NBD engine, one connection per queue where the server allows it.
#[test]
fn fio_verifies_on_an_nbd_disk_served_by_qemu_nbd() {
    let test = "fio_verifies_on_an_nbd_disk_served_by_qemu_nbd";
    if !tests::nbd_server::have("qemu-nbd", test, "qemu-utils") {
        return;
    }
    fio_verifies(test, Backing::Nbd);
}

/// The guest's tools and initramfs, and a temporary directory named `prefix...` on a
/// disk filesystem (O_DIRECT works there); `None`, with a SKIP line for `test`, when a
/// tool is missing.
fn setup(test: &str, prefix: &str) -> Option<(Tools, Initramfs, tempfile::TempDir)> {
    let (tools, initramfs) =
        tests::linux_guest::tools_and_initramfs(test, Path::new(env!("CARGO_TARGET_TMPDIR")))?;
    let dir = tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .unwrap();
    Some((tools, initramfs, dir))
}

/// `vhost-user-blk` serving one queue of `disk` (`key=value`) on `dir/vu.sock`, with
/// its API on `dir/api.sock` (returned).
fn backend_with_api(dir: &Path, disk: &str) -> (BackendProcess, std::path::PathBuf) {
    let socket = dir.join("vu.sock");
    let api = dir.join("api.sock");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_vhost-user-blk"));
    cmd.arg("--socket")
        .arg(&socket)
        .arg("--disk")
        .arg(disk)
        .arg("--api-socket")
        .arg(&api);
    let backend = BackendProcess::spawn(cmd, socket, 1, Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("vhost-user-blk: {e}"));
    (backend, api)
}

/// What the guest's disk is.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Backing {
    /// The raw image file.
    File,
    /// The raw image behind `qemu-nbd`.
    Nbd,
    /// A fresh qcow2 image.
    Qcow2,
}

/// Boots the guest against a backend serving a 64 MiB image on two queues (from the file
/// itself, through `qemu-nbd`, or a qcow2 image, per `backing`), runs fio's verify jobs,
/// and checks the counters and the image.
fn fio_verifies(test: &str, backing: Backing) {
    let Some((tools, initramfs, dir)) = setup(test, "linux-guest-ours-") else {
        return;
    };
    // Not tmpfs: the disk uses O_DIRECT.
    let disk_size: u64 = 64 << 20;
    let image = if backing == Backing::Qcow2 {
        let image = dir.path().join("disk.qcow2");
        let out = Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(&image)
            .arg(disk_size.to_string())
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        image
    } else {
        let image = dir.path().join("disk.raw");
        std::fs::File::create(&image)
            .and_then(|f| f.set_len(disk_size))
            .unwrap();
        image
    };
    let server = (backing == Backing::Nbd)
        .then(|| NbdServer::qemu_nbd(&image, "vda", Listen::Unix(dir.path().join("nbd.sock"))));
    let format = if backing == Backing::Qcow2 {
        "qcow2"
    } else {
        "raw"
    };
    let path = server
        .as_ref()
        .map_or_else(|| image.display().to_string(), NbdServer::uri);
    let socket = dir.path().join("vu.sock");
    let counters = dir.path().join("counters.json");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_vhost-user-blk"));
    cmd.arg("--socket")
        .arg(&socket)
        .arg("--disk-json")
        .arg(
            serde_json::json!({
                "id": "vda", "path": path, "format": format, "cache": "none", "aio": "io_uring",
                "num_queues": 2, "queue_size": 256,
                "iothread_vq_mapping": [
                    {"iothread": "io0", "vqs": [0]}, {"iothread": "io1", "vqs": [1]}
                ]
            })
            .to_string(),
        )
        .args(["--iothread", "id=io0", "--iothread", "id=io1"])
        .arg("--counters")
        .arg(&counters);
    let mut backend = BackendProcess::spawn(cmd, socket, 2, Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("vhost-user-blk: {e}"));

    let job = FioVerifyJob {
        numjobs: 2,
        cpus: 2,
        ..FioVerifyJob::default()
    };
    let (fio, run) = linux_guest::fio::run_verify(&tools, &initramfs, &backend, &job)
        .unwrap_or_else(|e| panic!("{e}\n--- backend log:\n{}", backend.log()));
    println!(
        "guest fio through our backend: {} writes + {} verify reads, boot {:.2?}, run {:.2?}",
        fio.write_ios,
        fio.read_ios,
        run.boot_time.unwrap_or_default(),
        run.total_time
    );
    assert!(
        fio.verified_cleanly(job.size),
        "{fio:?}\n{}\n--- backend log:\n{}",
        run.report(),
        backend.log()
    );
    assert_eq!(fio.disk_sectors, Some(disk_size / 512));
    assert_eq!(fio.read_only, Some(false));
    assert_eq!(fio.guest_queues, Some(2));

    // Stop cleanly (drain), then read what our counters saw.
    let status = backend.stop(Duration::from_secs(10));
    assert!(
        status.is_some_and(|s| s.success()),
        "backend exit: {status:?}\n{}",
        backend.log()
    );
    let text = std::fs::read_to_string(&counters).expect("counters file");
    let parsed: BackendCounters =
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("counters file: {e}\n{text}"));
    let disk = &parsed.disks["vda"].io;
    assert!(
        disk.write.ops >= fio.write_ios,
        "our counters saw fewer writes than fio did:\n{text}"
    );
    assert!(
        disk.read.ops >= fio.read_ios,
        "our counters saw fewer reads than fio did:\n{text}"
    );
    assert_eq!(disk.write.bytes, disk.write.ops * 4096, "{text}");
    assert_eq!(parsed.disks["vda"].invalid_requests, 0, "{text}");
    assert_eq!(parsed.iothreads.len(), 2, "{text}");
    if server.is_some() {
        let n = parsed.disks["vda"].nbd.as_ref().expect("NBD status");
        assert_eq!(n.state, block::nbd::NbdLinkState::Connected, "{text}");
        assert_eq!(n.reconnects, 0, "{text}");
    }
    for t in parsed.iothreads.values() {
        assert!(t.requests > 0, "each iothread served its queue:\n{text}");
    }
    // The data reached the image: every block fio wrote starts with its header magic.
    let data = if backing == Backing::Qcow2 {
        tests::image::qcow2_bytes(&image)
    } else {
        std::fs::read(&image).unwrap()
    };
    let unstamped = data[..job.size as usize]
        .chunks(job.block_size as usize)
        .filter(|b| b[..2] != [0xca, 0xac])
        .count();
    assert_eq!(unstamped, 0, "blocks without a fio header");
}

/// A live mirror under a real Linux guest: the backend (`--api-socket`) mirrors its disk
/// to a new image and pivots while the guest's fio writes with `--verify=crc32c`; fio
/// verifies its pass, then, caches dropped, reads everything back once more, now from
/// the new image. The backend no longer has the old image open, and the new one holds
/// fio's blocks.
#[test]
fn fio_verifies_through_a_mirror_and_pivot_under_the_guests_writes() {
    let test = "fio_verifies_through_a_mirror_and_pivot_under_the_guests_writes";
    let Some((tools, initramfs, dir)) = setup(test, "linux-guest-mirror-") else {
        return;
    };
    let image = dir.path().join("disk.raw");
    let target = dir.path().join("new.raw");
    let disk_size: u64 = 64 << 20;
    std::fs::File::create(&image)
        .and_then(|f| f.set_len(disk_size))
        .unwrap();
    // A throttle keeps the guest writing long enough for the mirror to run and pivot.
    let (mut backend, api) = backend_with_api(
        dir.path(),
        &format!(
            "id=vda,path={},cache=none,aio=io_uring,num_queues=1,throttle.iops_total=1500",
            image.display()
        ),
    );
    let pid = backend.pid();

    // The host side: once fio writes, mirror; once ready and more writes came, pivot.
    let host = {
        let (api, target, image) = (api.clone(), target.clone(), image.clone());
        std::thread::spawn(move || -> Result<String, String> {
            let http = api::client::Client::new(&api);
            let call = |method: &str, path: &str, body: Option<serde_json::Value>| {
                http.request_blocking(
                    method,
                    &format!("/api/v1/{path}"),
                    body.map(|b| b.to_string().into_bytes()),
                )
                .map_err(|e| e.to_string())
                .and_then(|r| {
                    if r.ok() {
                        Ok(r.json())
                    } else {
                        Err(format!("{method} {path}: {} {}", r.status, r.text()))
                    }
                })
            };
            let writes = || -> u64 {
                call("GET", "disk.counters", None)
                    .ok()
                    .and_then(|c| c["disks"]["vda"]["write"]["ops"].as_u64())
                    .unwrap_or(0)
            };
            let wait = |what: &str, f: &dyn Fn() -> bool| -> Result<(), String> {
                let deadline = std::time::Instant::now() + Duration::from_secs(200);
                while !f() {
                    if std::time::Instant::now() > deadline {
                        return Err(format!("timed out waiting for {what}"));
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
                Ok(())
            };
            wait("fio's writes", &|| writes() > 300)?;
            call(
                "PUT",
                "disk.mirror",
                Some(serde_json::json!({"job_id": "m", "target": {"path": target}})),
            )?;
            let state = || {
                call("GET", "jobs", None)
                    .ok()
                    .and_then(|j| j[0]["state"].as_str().map(str::to_string))
                    .unwrap_or_default()
            };
            wait("ready", &|| state() == "ready")?;
            let at = writes();
            wait("writes in ready", &|| writes() > at + 300)?;
            call(
                "PUT",
                "job-complete",
                Some(serde_json::json!({"job_id": "m"})),
            )?;
            let info = call("GET", "disk.info", None)?;
            let _ = image;
            Ok(format!(
                "pivoted at {} writes: {}",
                writes(),
                info["disk"]["path"]
            ))
        })
    };

    let job = FioVerifyJob {
        verify_again: true,
        ..FioVerifyJob::default()
    };
    let result = linux_guest::fio::run_verify(&tools, &initramfs, &backend, &job);
    let pivot = host.join().unwrap();
    let (fio, run) = result.unwrap_or_else(|e| panic!("{e}\n--- backend log:\n{}", backend.log()));
    let pivot = pivot.unwrap_or_else(|e| panic!("{e}\n{}\n{}", run.report(), backend.log()));
    println!(
        "guest fio through a mirror: {pivot}; {} writes",
        fio.write_ios
    );
    assert!(
        fio.verified_cleanly(job.size),
        "{fio:?}\n{}\n--- backend log:\n{}",
        run.report(),
        backend.log()
    );
    let (error, read) = linux_guest::fio::parse_again(&run.script_output)
        .unwrap_or_else(|e| panic!("{e}\n{}", run.report()));
    assert_eq!((error, read), (0, job.size), "{}", run.report());
    // The old image is closed; the new one is open and holds fio's blocks.
    let open = |p: &Path| tests::procfs::holds(pid, p);
    assert!(!open(&image), "the backend still has the old image open");
    assert!(open(&target));
    let data = std::fs::read(&target).unwrap();
    let unstamped = data[..job.size as usize]
        .chunks(job.block_size as usize)
        .filter(|b| b[..2] != [0xca, 0xac])
        .count();
    assert_eq!(unstamped, 0, "blocks without a fio header on the new image");
    let status = backend.stop(Duration::from_secs(10));
    assert!(status.is_some_and(|s| s.success()), "{}", backend.log());
}

/// The error policy under a real Linux guest: the backend's image sits on a tmpfs that
/// fills while fio writes; the disk (`on_write_error` at its default, `enospc`) stops,
/// the host grows the tmpfs and sends `PUT disk.resume`, and fio, which never saw an
/// I/O error, verifies everything it wrote.
///
/// Needs root (it mounts a tmpfs); skips, saying so, otherwise.
#[test]
fn fio_sees_no_error_when_the_disk_fills_and_the_host_resumes_it() {
    let test = "fio_sees_no_error_when_the_disk_fills_and_the_host_resumes_it";
    let Some((tools, initramfs, dir)) = setup(test, "linux-guest-enospc-") else {
        return;
    };
    // fio writes 32 MiB: the tmpfs holds 8.
    let Some(small) = tests::tmpfs::Tmpfs::mount(test, &dir.path().join("small"), "8m") else {
        return;
    };
    let image = small.path().join("disk.raw");
    std::fs::File::create(&image)
        .and_then(|f| f.set_len(64 << 20))
        .unwrap();
    // tmpfs has no O_DIRECT.
    let (mut backend, api) = backend_with_api(
        dir.path(),
        &format!(
            "id=vda,path={},cache=writeback,aio=io_uring,num_queues=1",
            image.display()
        ),
    );

    // The host side: once the disk stops, grow the tmpfs and resume it.
    let host = {
        let (api, mount_point) = (api.clone(), small.path().to_path_buf());
        std::thread::spawn(move || -> Result<serde_json::Value, String> {
            let http = api::client::Client::new(&api);
            let deadline = std::time::Instant::now() + Duration::from_secs(300);
            loop {
                let info = http
                    .request_blocking("GET", "/api/v1/disk.info", None)
                    .map_err(|e| e.to_string())?
                    .json();
                if info.get("io_status").is_some() {
                    tests::tmpfs::resize(&mount_point, "128m");
                    let r = http
                        .request_blocking("PUT", "/api/v1/disk.resume", None)
                        .map_err(|e| e.to_string())?;
                    return if r.ok() {
                        Ok(info)
                    } else {
                        Err(format!("disk.resume: {} {}", r.status, r.text()))
                    };
                }
                if std::time::Instant::now() > deadline {
                    return Err(format!("the disk never stopped: {info}"));
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };
    let job = FioVerifyJob::default();
    let result = linux_guest::fio::run_verify(&tools, &initramfs, &backend, &job);
    let stopped = host.join().unwrap();
    let (fio, run) = result.unwrap_or_else(|e| panic!("{e}\n--- backend log:\n{}", backend.log()));
    let stopped = stopped.unwrap_or_else(|e| panic!("{e}\n{}\n{}", run.report(), backend.log()));
    println!(
        "guest fio on a filling disk: stopped on {}, {} writes",
        stopped["io_status"], fio.write_ios
    );
    assert_eq!(stopped["io_status"]["errno"], libc::ENOSPC, "{stopped}");
    assert!(
        fio.verified_cleanly(job.size),
        "{fio:?}\n{}\n--- backend log:\n{}",
        run.report(),
        backend.log()
    );
    let status = backend.stop(Duration::from_secs(10));
    assert!(status.is_some_and(|s| s.success()), "{}", backend.log());
}
