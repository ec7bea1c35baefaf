//! The `vhost-user-blk` binary driven by a real virtio-blk client: libblkio's
//! `virtio-blk-vhost-user` driver (the `blkio` crate). Each test starts its own backend
//! process on its own socket and image.

// Test data and figures, not guest input.
#![allow(clippy::cast_possible_truncation, clippy::cast_precision_loss)]

#[path = "vhost_user_blkio/support.rs"]
mod support;

#[path = "vhost_user_blkio/live.rs"]
mod live;

use std::process::Command;
use std::time::{Duration, Instant};

use blkio::ReqFlags;
use support::{
    BIN, Client, MIB, Server, comps, fill_random, image, read_counters, read_slot, wait_one,
    xorshift,
};
use tests::nbd_server::{Listen, NbdServer};

#[test]
fn read_write_flush_discard_write_zeroes_and_config() {
    let (dir, img, expect) = image(16 * MIB);
    let disk = format!(
        "path={},cache=none,aio=io_uring,num_queues=2,serial=abc",
        img.display()
    );
    every_request_kind(dir.path(), &img, expect, &disk);
}

/// The same requests on a disk whose image `qemu-nbd` serves: the backend's NBD engine
/// carries them, and the file behind the server ends byte-exact.
#[test]
fn every_request_kind_on_an_nbd_disk() {
    let test = "every_request_kind_on_an_nbd_disk";
    if !tests::nbd_server::have("qemu-nbd", test, "qemu-utils") {
        return;
    }
    let (dir, img, expect) = image(16 * MIB);
    let server = NbdServer::qemu_nbd(&img, "disk", Listen::Unix(dir.path().join("nbd.sock")));
    let disk = format!("path={},cache=none,num_queues=2,serial=abc", server.uri());
    every_request_kind(dir.path(), &img, expect, &disk);
}

/// Reads, writes, flush, write-zeroes, discard, a read past the end and the config space
/// through the backend serving `disk` (`--disk`), whose image `img` starts as `expect`.
fn every_request_kind(
    dir: &std::path::Path,
    img: &std::path::Path,
    mut expect: Vec<u8>,
    disk: &str,
) {
    let mut server = Server::start(dir, &["--disk", disk]);
    let mut c = Client::connect(server.path(), 1, false, 2 * MIB).unwrap();
    assert_eq!(c.b.get_u64("capacity").unwrap(), 16 * MIB as u64);
    assert_eq!(c.b.get_i32("max-queues").unwrap(), 2);
    assert!(!c.b.get_bool("read-only").unwrap());
    assert!(
        c.b.get_bool("flush-needed").unwrap(),
        "cache=none shows a write cache"
    );
    assert_eq!(c.b.get_i32("request-alignment").unwrap(), 512);

    // Read what the image holds.
    let (off, len) = (3 * MIB + 4096, 256 * 1024);
    let p = c.ptr(0);
    c.queues[0].read(off as u64, p, len, 1, ReqFlags::empty());
    assert_eq!(wait_one(&mut c.queues[0]), 0);
    assert!(
        c.buf()[..len] == expect[off..off + len],
        "read returned other bytes"
    );

    // Write (an unaligned buffer too: the backend bounces it for O_DIRECT), flush, read back.
    let woff = MIB + 512;
    fill_random(&mut c.buf()[MIB + 3..MIB + 3 + 64 * 1024], 7);
    let written = c.buf()[MIB + 3..MIB + 3 + 64 * 1024].to_vec();
    let p = c.ptr(MIB + 3);
    c.queues[0].write(woff as u64, p, 64 * 1024, 2, ReqFlags::empty());
    assert_eq!(wait_one(&mut c.queues[0]), 0);
    c.queues[0].flush(3, ReqFlags::empty());
    assert_eq!(wait_one(&mut c.queues[0]), 0);
    expect[woff..woff + written.len()].copy_from_slice(&written);
    c.buf()[..64 * 1024].fill(0);
    let p = c.ptr(0);
    c.queues[0].read(woff as u64, p, 64 * 1024, 4, ReqFlags::empty());
    assert_eq!(wait_one(&mut c.queues[0]), 0);
    assert!(c.buf()[..64 * 1024] == written[..]);

    // Write-zeroes, then read back zeroes.
    let zoff = 5 * MIB;
    c.queues[0].write_zeroes(zoff as u64, 128 * 1024, 5, ReqFlags::empty());
    assert_eq!(wait_one(&mut c.queues[0]), 0);
    expect[zoff..zoff + 128 * 1024].fill(0);
    c.buf()[..128 * 1024].fill(0xaa);
    let p = c.ptr(0);
    c.queues[0].read(zoff as u64, p, 128 * 1024, 6, ReqFlags::empty());
    assert_eq!(wait_one(&mut c.queues[0]), 0);
    assert!(
        c.buf()[..128 * 1024].iter().all(|&b| b == 0),
        "write-zeroes left data"
    );

    // Discard (punches a hole: the range reads as zeroes on ext4/xfs/tmpfs).
    let doff = 8 * MIB;
    c.queues[0].discard(doff as u64, MIB as u64, 7, ReqFlags::empty());
    assert_eq!(wait_one(&mut c.queues[0]), 0);
    expect[doff..doff + MIB].fill(0);

    // Past the end: an error status, not a hang.
    let p = c.ptr(0);
    c.queues[0].read(16 * MIB as u64 - 512, p, 4096, 8, ReqFlags::empty());
    assert_ne!(
        wait_one(&mut c.queues[0]),
        0,
        "a read past the end must fail"
    );

    drop(c);
    assert!(server.stop().success(), "{}", server.log());
    let on_disk = std::fs::read(img).unwrap();
    assert!(
        on_disk == expect,
        "image differs from what the client wrote"
    );
}

#[test]
fn read_only_disk_is_reported_and_refuses_writes() {
    let (dir, img, expect) = image(4 * MIB);
    let disk = format!("path={},readonly=on,cache=writeback", img.display());
    let mut server = Server::start(dir.path(), &["--disk", &disk]);
    // A writable client is refused: the device says RO.
    let e = Client::connect(server.path(), 1, false, MIB)
        .err()
        .expect("writable connect must fail");
    assert_eq!(e.errno(), blkio::Errno::ROFS, "{e:?}");
    let mut c = Client::connect(server.path(), 1, true, MIB).unwrap();
    assert!(c.b.get_bool("read-only").unwrap());
    assert_eq!(c.b.get_u64("capacity").unwrap(), 4 * MIB as u64);
    fill_random(&mut c.buf()[..4096], 9);
    let p = c.ptr(0);
    c.queues[0].write(0, p, 4096, 1, ReqFlags::empty());
    assert_ne!(
        wait_one(&mut c.queues[0]),
        0,
        "write to a read-only disk succeeded"
    );
    c.queues[0].discard(0, 4096, 2, ReqFlags::empty());
    assert_ne!(wait_one(&mut c.queues[0]), 0);
    let p = c.ptr(0);
    c.queues[0].read(4096, p, 4096, 3, ReqFlags::empty());
    assert_eq!(wait_one(&mut c.queues[0]), 0);
    assert!(c.buf()[..4096] == expect[4096..8192]);
    drop(c);
    assert!(server.stop().success());
    assert!(
        std::fs::read(&img).unwrap() == expect,
        "read-only image changed"
    );
}

/// Random 4 KiB..64 KiB writes at QD16 on each of two queues from two threads (disjoint
/// halves of the disk), then the image must hold exactly the last data written.
#[test]
fn two_queues_in_parallel_verified_against_the_image() {
    let (dir, img, expect) = image(32 * MIB);
    let disk = format!(
        "path={},cache=none,aio=io_uring,num_queues=2",
        img.display()
    );
    let v = two_queues_in_parallel(dir.path(), &img, expect, &disk);
    assert!(v.disks["disk0"].nbd.is_none());
}

/// The same on a qcow2 overlay (made by `qemu-img create -b base -F raw`) over the
/// image: the backend allocates clusters from two iothreads at once, copies the rest of
/// each cluster from the base, never writes the base; `qemu-img check` finds no error.
#[test]
fn two_queues_in_parallel_on_a_qcow2_overlay() {
    let test = "two_queues_in_parallel_on_a_qcow2_overlay";
    if !tests::nbd_server::have("qemu-img", test, "qemu-utils") {
        return;
    }
    let (dir, base, expect) = image(32 * MIB);
    let overlay = dir.path().join("overlay.qcow2");
    let out = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-b"])
        .arg(&base)
        .args(["-F", "raw"])
        .arg(&overlay)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let disk = format!(
        "path={},format=qcow2,cache=none,aio=io_uring,num_queues=2",
        overlay.display()
    );
    two_queues_in_parallel(dir.path(), &overlay, expect.clone(), &disk);
    assert!(
        std::fs::read(&base).unwrap() == expect,
        "the base image changed"
    );
}

/// What the disk in `path` holds: the file itself, or for a qcow2 image what QEMU's
/// tools read from it (after `qemu-img check`).
fn disk_bytes(path: &std::path::Path) -> Vec<u8> {
    let head = std::fs::read(path).unwrap();
    if head.starts_with(b"QFI\xfb") {
        return tests::image::qcow2_bytes(path);
    }
    head
}

/// The same on an NBD disk whose server (nbdkit's file plugin) allows multi-conn: one
/// connection per queue, both writing the same file.
#[test]
fn two_queues_on_two_nbd_connections_verified_against_the_image() {
    let test = "two_queues_on_two_nbd_connections_verified_against_the_image";
    if !tests::nbd_server::have("nbdkit", test, "nbdkit") {
        return;
    }
    let (dir, img, expect) = image(32 * MIB);
    let file = format!("file={}", img.display());
    let server = NbdServer::nbdkit(
        &[
            "--filter=multi-conn",
            "file",
            &file,
            "multi-conn-mode=emulate",
        ],
        Listen::Unix(dir.path().join("nbd.sock")),
    );
    let disk = format!("path={},cache=none,num_queues=2", server.uri());
    let v = two_queues_in_parallel(dir.path(), &img, expect, &disk);
    let nbd = v.disks["disk0"]
        .nbd
        .clone()
        .expect("NBD status in the counters");
    assert_eq!(nbd.connections, 2, "{nbd:?}");
    assert_eq!(nbd.state, block::nbd::NbdLinkState::Connected);
}

/// Random 4 KiB..64 KiB writes at QD16 on each of two queues from two threads (disjoint
/// halves of the disk) through the backend serving `disk`; then the image `img` (which
/// started as `expect`) must hold exactly the last data written. Returns the counters.
fn two_queues_in_parallel(
    dir: &std::path::Path,
    img: &std::path::Path,
    mut expect: Vec<u8>,
    disk: &str,
) -> devices::vhost_user_blk::BackendCounters {
    const QD: usize = 16;
    const SLOT: usize = 64 * 1024;
    const ROUNDS: usize = 400;
    let size = expect.len();
    let counters = dir.join("counters.json");
    let mut server = Server::start(
        dir,
        &["--disk", disk, "--counters", counters.to_str().unwrap()],
    );
    let mut c = Client::connect(server.path(), 2, false, 2 * QD * SLOT).unwrap();
    assert_eq!(c.queues.len(), 2);
    let base = c.region.addr;
    let queues = std::mem::take(&mut c.queues);
    let handles: Vec<_> = queues
        .into_iter()
        .enumerate()
        .map(|(t, mut q)| {
            std::thread::spawn(move || {
                let half = size / 2;
                let mut rng = 0x1234_5678_u64 + t as u64;
                let mut writes: Vec<(usize, Vec<u8>)> = Vec::new();
                let mut cs = comps(QD);
                let mut inflight = 0;
                let mut issued = 0;
                let mut free: Vec<usize> = (0..QD).collect();
                // Offsets of in-flight writes must not overlap (their order is not defined).
                let mut busy: Vec<Option<(usize, usize)>> = vec![None; QD];
                while issued < ROUNDS || inflight > 0 {
                    while issued < ROUNDS
                        && let Some(slot) = free.pop()
                    {
                        let len = 4096 * (1 + (xorshift(&mut rng) % 16) as usize);
                        let off = loop {
                            let o = t * half
                                + (xorshift(&mut rng) as usize % (half / 4096 - 16)) * 4096;
                            if busy
                                .iter()
                                .flatten()
                                .all(|&(b, l)| o + len <= b || b + l <= o)
                            {
                                break o;
                            }
                        };
                        let buf = (base + (t * QD + slot) * SLOT) as *mut u8;
                        let mut data = vec![0u8; len];
                        fill_random(&mut data, xorshift(&mut rng));
                        // SAFETY: the slot is ours (no request in flight on it) and inside
                        // the mapped region.
                        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), buf, len) };
                        q.write(off as u64, buf, len, slot, ReqFlags::empty());
                        busy[slot] = Some((off, len));
                        writes.push((off, data));
                        issued += 1;
                        inflight += 1;
                    }
                    let n = q
                        .do_io(&mut cs, 1, Some(&mut Duration::from_secs(20)), None)
                        .expect("do_io");
                    for c in &cs[..n] {
                        // SAFETY: do_io initialized the first n completions.
                        let c = unsafe { c.assume_init_read() };
                        assert_eq!(c.ret, 0, "write failed on queue {t}");
                        busy[c.user_data] = None;
                        free.push(c.user_data);
                        inflight -= 1;
                    }
                }
                q.flush(99, ReqFlags::empty());
                assert_eq!(wait_one(&mut q), 0);
                writes
            })
        })
        .collect();
    for h in handles {
        for (off, data) in h.join().unwrap() {
            expect[off..off + data.len()].copy_from_slice(&data);
        }
    }
    drop(c);
    assert!(server.stop().success(), "{}", server.log());
    let on_disk = disk_bytes(img);
    let first_bad = on_disk.iter().zip(&expect).position(|(a, b)| a != b);
    assert_eq!(first_bad, None, "image differs");
    let v = read_counters(&counters);
    let d = &v.disks["disk0"];
    assert_eq!(d.io.write.ops, 2 * ROUNDS as u64, "{v:?}");
    assert_eq!(d.io.flush.ops, 2, "{v:?}");
    assert_eq!(d.invalid_requests, 0, "{v:?}");
    v
}

#[test]
fn null_backend_reads_zeroes() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(
        dir.path(),
        &["--disk", "path=null,null_size=1073741824,num_queues=1"],
    );
    let mut c = Client::connect(server.path(), 1, false, MIB).unwrap();
    assert_eq!(c.b.get_u64("capacity").unwrap(), 1 << 30);
    c.buf()[..MIB].fill(0x55);
    let p = c.ptr(0);
    c.queues[0].write(4096, p, 4096, 1, ReqFlags::empty());
    assert_eq!(wait_one(&mut c.queues[0]), 0);
    let p = c.ptr(0);
    c.queues[0].read(0, p, 8192, 2, ReqFlags::empty());
    assert_eq!(wait_one(&mut c.queues[0]), 0);
    assert!(c.buf()[..8192].iter().all(|&b| b == 0));
    drop(c);
    assert!(server.stop().success());
}

/// `iops_total=200`: after the burst allowance, a QD8 reader gets 200 IOPS within 10%.
#[test]
fn throttled_disk_respects_its_iops_limit() {
    let (dir, img, _) = image(8 * MIB);
    let disk = format!(
        "path={},cache=writeback,throttle.iops_total=200",
        img.display()
    );
    let _server = Server::start(dir.path(), &["--disk", &disk]);
    let mut c = Client::connect(_server.path(), 1, false, MIB).unwrap();
    let base = c.region.addr;
    let q = &mut c.queues[0];
    let mut cs = comps(8);
    for slot in 0..8 {
        read_slot(q, base, slot);
    }
    let warmup = Instant::now() + Duration::from_millis(500);
    let mut measured = 0u64;
    let mut start = None;
    let end_after = Duration::from_secs(2);
    loop {
        let n = q
            .do_io(&mut cs, 1, Some(&mut Duration::from_secs(10)), None)
            .expect("do_io");
        let now = Instant::now();
        if now >= warmup && start.is_none() {
            start = Some(now);
        }
        for c in &cs[..n] {
            // SAFETY: do_io initialized the first n completions.
            let c = unsafe { c.assume_init_read() };
            assert_eq!(c.ret, 0);
            if start.is_some() {
                measured += 1;
            }
            let slot = c.user_data;
            read_slot(q, base, slot);
        }
        if start.is_some_and(|s| now - s >= end_after) {
            let iops = measured as f64 / (now - start.unwrap_or(now)).as_secs_f64();
            assert!(
                (180.0..=220.0).contains(&iops),
                "{iops:.1} IOPS with iops_total=200"
            );
            break;
        }
    }
    // Drain what is still queued before tearing down.
    let mut left = 8;
    while left > 0 {
        left -= q
            .do_io(&mut cs, 1, Some(&mut Duration::from_secs(10)), None)
            .expect("do_io");
    }
}

#[test]
fn frontend_reconnects_and_once_exits_after_one() {
    let (dir, img, expect) = image(4 * MIB);
    let disk = format!("path={},cache=writeback", img.display());
    let counters = dir.path().join("c.json");
    let server = Server::start(
        dir.path(),
        &["--disk", &disk, "--counters", counters.to_str().unwrap()],
    );
    for round in 0..3u8 {
        let mut c = Client::connect(server.path(), 1, false, MIB).unwrap();
        c.buf()[..4096].fill(round + 1);
        let p = c.ptr(0);
        c.queues[0].write(0, p, 4096, 1, ReqFlags::empty());
        assert_eq!(wait_one(&mut c.queues[0]), 0, "round {round}");
        let p = c.ptr(8192);
        c.queues[0].read(8192, p, 4096, 2, ReqFlags::empty());
        assert_eq!(wait_one(&mut c.queues[0]), 0, "round {round}");
        assert!(c.buf()[8192..12288] == expect[8192..12288]);
    }
    let mut server = server;
    assert!(server.stop().success());
    let v = read_counters(&counters);
    assert_eq!(v.sessions, 3, "{v:?}");
    assert_eq!(v.disks["disk0"].io.write.ops, 3, "{v:?}");
    assert!(std::fs::read(&img).unwrap()[..4096].iter().all(|&b| b == 3));

    // --once: the process exits by itself when the first frontend goes away.
    let dir2 = tempfile::tempdir().unwrap();
    let mut once = Server::start(dir2.path(), &["--disk", &disk, "--once"]);
    let c = Client::connect(once.path(), 1, false, MIB).unwrap();
    drop(c);
    assert!(
        once.wait_exit(Duration::from_secs(20)).success(),
        "{}",
        once.log()
    );
    assert!(!once.socket.exists(), "socket left behind");
}

#[test]
fn counters_show_the_io_per_disk_and_iothread() {
    let (dir, img, _) = image(4 * MIB);
    let disk = format!(
        "path={},cache=writeback,num_queues=1,iothread=io0",
        img.display()
    );
    let counters = dir.path().join("c.json");
    let mut server = Server::start(
        dir.path(),
        &[
            "--disk",
            &disk,
            "--iothread",
            "id=io0,poll_max_ns=0,aio_max_batch=8",
            "--counters",
            counters.to_str().unwrap(),
        ],
    );
    let mut c = Client::connect(server.path(), 1, false, MIB).unwrap();
    for i in 0..10u64 {
        let p = c.ptr(0);
        c.queues[0].read(i * 4096, p, 4096, 1, ReqFlags::empty());
        assert_eq!(wait_one(&mut c.queues[0]), 0);
    }
    let p = c.ptr(0);
    c.queues[0].write(0, p, 8192, 2, ReqFlags::empty());
    assert_eq!(wait_one(&mut c.queues[0]), 0);
    // The file is rewritten every second while running.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if counters.exists()
            && read_counters(&counters)
                .disks
                .get("disk0")
                .is_some_and(|d| d.io.read.ops == 10)
        {
            break;
        }
        assert!(Instant::now() < deadline, "counters file not updated");
        std::thread::sleep(Duration::from_millis(100));
    }
    drop(c);
    assert!(server.stop().success());
    let v = read_counters(&counters);
    assert_eq!(v.disks.keys().collect::<Vec<_>>(), ["disk0"], "{v:?}");
    let d = &v.disks["disk0"];
    assert_eq!((d.io.read.ops, d.io.read.bytes), (10, 40960), "{v:?}");
    assert_eq!((d.io.write.ops, d.io.write.bytes), (1, 8192), "{v:?}");
    assert!(d.signals >= 1, "{v:?}");
    assert_eq!(v.iothreads.keys().collect::<Vec<_>>(), ["io0"], "{v:?}");
    assert_eq!(v.iothread_queues["io0"], [0], "{v:?}");
    let t = &v.iothreads["io0"];
    assert_eq!(t.requests, 11, "{v:?}");
    assert_eq!(t.poll_ns, 0, "poll_max_ns=0 disables polling: {v:?}");
    assert!(t.wakeups >= 11, "{v:?}");
    assert!(t.cpu_ns > 0, "{v:?}");
}

#[test]
fn bad_socket_path_and_bad_fields_give_clear_errors() {
    let run = |args: &[&str]| {
        let out = Command::new(BIN).args(args).output().unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("missing-dir/s.sock");
    let (code, err) = run(&[
        "--socket",
        sock.to_str().unwrap(),
        "--disk",
        "path=null,null_size=1048576",
    ]);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("cannot listen on") && err.contains("does not exist"),
        "{err}"
    );

    let file = dir.path().join("plain-file");
    std::fs::write(&file, b"keep me").unwrap();
    let (code, err) = run(&[
        "--socket",
        file.to_str().unwrap(),
        "--disk",
        "path=null,null_size=1048576",
    ]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("not a socket"), "{err}");
    assert_eq!(std::fs::read(&file).unwrap(), b"keep me");

    let s = dir.path().join("s.sock");
    let s = s.to_str().unwrap();
    for (disk, needle) in [
        ("path=null,null_size=1048576,bogus=1", "unknown field"),
        (
            "path=null,null_size=1048576,num_queues=many",
            "invalid type",
        ),
        ("path=null,null_size=1048576,queue_size=100", "power of two"),
        ("path=null", "null_size"),
        ("path=null,null_size=1048576,cache=fast", "unknown variant"),
        (
            "path=null,null_size=1048576,iothread=io7",
            "io7 is not declared",
        ),
        ("path", "expected key=value"),
        // Checked before the image is opened (a missing one would be exit status 1).
        (
            "path=/nonexistent/img.raw,aio=native,cache=writeback",
            "aio=native needs O_DIRECT",
        ),
        (
            "path=/nonexistent/img.raw,aio=native,cache=unsafe",
            "(cache=unsafe was given)",
        ),
    ] {
        let (code, err) = run(&["--socket", s, "--disk", disk]);
        assert_eq!(code, Some(2), "{disk}: {err}");
        assert!(err.contains(needle), "{disk}: {err}");
    }
    let (code, err) = run(&[
        "--socket",
        s,
        "--disk",
        "path=null,null_size=1048576",
        "--iothread",
        "id=io0,aio_max_batch=0",
    ]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("aio_max_batch"), "{err}");
    let (code, err) = run(&["--socket", s, "--disk", "path=/nonexistent/img.raw"]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("/nonexistent/img.raw"), "{err}");
}

/// Requests held back by the throttle (2 IOPS) are not lost when the backend stops:
/// SIGTERM closes the connection, starts them regardless of the limit, completes them
/// into the still-mapped rings and exits cleanly. A client that goes away with requests
/// held does not block the next one.
#[test]
fn stopping_drains_requests_held_by_the_throttle() {
    const N: usize = 24;
    let (dir, img, expect) = image(4 * MIB);
    let disk = format!(
        "path={},cache=writeback,throttle.iops_total=2",
        img.display()
    );
    let mut server = Server::start(dir.path(), &["--disk", &disk]);

    // A client that leaves with requests waiting.
    let mut c = Client::connect(server.path(), 1, false, N * 4096).unwrap();
    for i in 0..N {
        let p = c.ptr(i * 4096);
        c.queues[0].read((i * 4096) as u64, p, 4096, i, ReqFlags::empty());
    }
    let mut cs = comps(N);
    let n = c.queues[0].do_io(&mut cs, 0, None, None).unwrap();
    assert!(n < 4, "the throttle let {n} requests through at once");
    drop(c);

    // The next client: the same, then SIGTERM.
    let mut c = Client::connect(server.path(), 1, false, N * 4096).unwrap();
    for i in 0..N {
        let p = c.ptr(i * 4096);
        c.queues[0].read((i * 4096) as u64, p, 4096, i, ReqFlags::empty());
    }
    // The first completion (the throttle lets one or two through) means the backend's
    // pass popped every request the client made available: the rest are held. (What a
    // backend has not popped when it stops stays in the ring, not taken.)
    let mut done = c.queues[0]
        .do_io(&mut cs, 1, Some(&mut Duration::from_secs(10)), None)
        .unwrap_or_else(|e| panic!("no request went through: {e}\n{}", server.log()));
    let t0 = Instant::now();
    assert!(server.stop().success(), "{}", server.log());
    while done < N {
        done += c.queues[0]
            .do_io(&mut cs[done..], 1, Some(&mut Duration::from_secs(10)), None)
            .unwrap_or_else(|e| panic!("requests lost at stop: {e}\n{}", server.log()));
    }
    assert!(
        t0.elapsed() < Duration::from_secs(5),
        "drain waited for the throttle"
    );
    for c in &cs[..N] {
        // SAFETY: do_io initialized the first N completions.
        assert_eq!(unsafe { c.assume_init_read() }.ret, 0);
    }
    assert!(c.buf()[..N * 4096] == expect[..N * 4096]);
}
