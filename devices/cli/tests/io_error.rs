//! The error policy in `vhost-user-blk --api-socket`: libblkio (a real vhost-user
//! frontend) writes to an image on a small tmpfs until it fills. The disk's default
//! policy (`enospc`) holds the failed write and stops serving the disk: the client's
//! write does not complete, `disk.info` names the stop and an `io-error` event goes out
//! (the first on the event stream).
//! The test grows the tmpfs and sends `PUT disk.resume`: the held write completes
//! without an error, the client goes on, and every byte it wrote reads back.
//!
//! Needs root (it mounts a tmpfs); skips, saying so, otherwise.

// Test data and figures, not guest input.
#![allow(clippy::cast_possible_truncation)]

#[path = "vhost_user_blkio/support.rs"]
#[allow(dead_code)]
mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use blkio::ReqFlags;
use serde_json::{Value, json};
use support::{Client, MIB, Server, api_call as call, fill_random, follow_events, wait_one};
use tests::tmpfs::Tmpfs;

/// Writes of 64 KiB, 4 MiB in all, on a tmpfs of 1 MiB.
const CHUNK: usize = 64 * 1024;
const CHUNKS: usize = 64;

#[test]
fn a_full_disk_stops_the_backend_and_disk_resume_loses_nothing() {
    full_disk_stops_and_resumes(
        "a_full_disk_stops_the_backend_and_disk_resume_loses_nothing",
        false,
    );
}

/// The same with a fresh qcow2 image: its allocating writes run out of space; after the
/// resume `qemu-img check` finds the image sound.
#[test]
fn a_full_qcow2_image_stops_the_backend_and_disk_resume_loses_nothing() {
    let test = "a_full_qcow2_image_stops_the_backend_and_disk_resume_loses_nothing";
    if !tests::nbd_server::have("qemu-img", test, "qemu-utils") {
        return;
    }
    full_disk_stops_and_resumes(test, true);
}

fn full_disk_stops_and_resumes(test: &str, qcow2: bool) {
    let dir = tempfile::tempdir().unwrap();
    let Some(small) = Tmpfs::mount(test, &dir.path().join("small"), "1m") else {
        return;
    };
    let img = small.path().join("disk.img");
    if qcow2 {
        let out = std::process::Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(&img)
            .arg((CHUNK * CHUNKS).to_string())
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
    } else {
        std::fs::File::create(&img)
            .unwrap()
            .set_len((CHUNK * CHUNKS) as u64)
            .unwrap();
    }
    let api = dir.path().join("api.sock");
    let format = if qcow2 { "qcow2" } else { "raw" };
    let disk = format!(
        "id=vd,path={},format={format},cache=writeback,aio=io_uring",
        img.display()
    );
    let server = Server::start(
        dir.path(),
        &["--disk", &disk, "--api-socket", api.to_str().unwrap()],
    );

    let events = follow_events(&api);

    // The client writes chunk after chunk, each checked.
    let done = Arc::new(AtomicUsize::new(0));
    let written = Arc::new(Mutex::new(vec![0u8; CHUNK * CHUNKS]));
    let writer = {
        let (socket, done, written) = (server.path().to_string(), done.clone(), written.clone());
        std::thread::spawn(move || {
            let mut c = Client::connect(&socket, 1, false, MIB).unwrap();
            for n in 0..CHUNKS {
                fill_random(&mut c.buf()[..CHUNK], n as u64 + 1);
                let data = c.buf()[..CHUNK].to_vec();
                let p = c.ptr(0);
                c.queues[0].write((n * CHUNK) as u64, p, CHUNK, 0, ReqFlags::empty());
                assert_eq!(
                    wait_one(&mut c.queues[0]),
                    0,
                    "write {n}: the client saw an error"
                );
                written.lock().unwrap()[n * CHUNK..(n + 1) * CHUNK].copy_from_slice(&data);
                done.fetch_add(1, Ordering::SeqCst);
            }
            c
        })
    };

    // The tmpfs fills: the disk stops, the client's write waits.
    let deadline = Instant::now() + Duration::from_secs(20);
    let info = loop {
        let info = call(&api, "GET", "disk.info", None).json();
        if info.get("io_status").is_some() {
            break info;
        }
        assert!(
            Instant::now() < deadline && !writer.is_finished(),
            "the disk did not stop: {info}\n{}",
            server.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(info["io_status"]["op"], "write", "{info}");
    assert_eq!(info["io_status"]["errno"], libc::ENOSPC, "{info}");
    let event = events
        .recv_timeout(Duration::from_secs(5))
        .expect("an io-error event");
    let event: Value = serde_json::from_str(&event).unwrap();
    assert_eq!(
        (&event["event"], &event["disk"], &event["errno"]),
        (&json!("io-error"), &json!("vd"), &json!(libc::ENOSPC)),
        "{event}"
    );
    let stalled = done.load(Ordering::SeqCst);
    assert!(stalled < CHUNKS, "{stalled}");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        done.load(Ordering::SeqCst),
        stalled,
        "stopped: nothing completes"
    );
    // Nothing to resume twice, and a wrong disk is refused.
    let r = call(&api, "PUT", "disk.resume", Some(json!({"id": "other"})));
    assert_eq!(r.status, 404, "{}", r.text());

    small.resize("16m");
    let r = call(&api, "PUT", "disk.resume", None);
    assert!(r.ok(), "{} {}", r.status, r.text());
    let r = call(&api, "PUT", "disk.resume", None);
    assert_eq!(r.status, 409, "not stopped any more: {}", r.text());
    let mut c = writer.join().expect("the client saw an error");
    assert_eq!(done.load(Ordering::SeqCst), CHUNKS);
    let counters = call(&api, "GET", "disk.counters", None).json();
    assert!(counters.to_string().contains("\"io_errors\""), "{counters}");

    // Every byte reads back, through the backend and in the file.
    let written = written.lock().unwrap().clone();
    for n in 0..CHUNKS {
        let p = c.ptr(0);
        c.queues[0].read((n * CHUNK) as u64, p, CHUNK, 0, ReqFlags::empty());
        assert_eq!(wait_one(&mut c.queues[0]), 0);
        assert!(
            c.buf()[..CHUNK] == written[n * CHUNK..(n + 1) * CHUNK],
            "chunk {n} differs"
        );
    }
    drop(c);
    let info = call(&api, "GET", "disk.info", None).json();
    assert!(info.get("io_status").is_none(), "{info}");
    let mut server = server;
    let status = server.stop();
    assert!(status.success(), "{status:?}\n{}", server.log());
    let data = if qcow2 {
        // The kernel lets go of the file's lock a moment after the exit.
        let deadline = Instant::now() + Duration::from_secs(10);
        let check = loop {
            let out = std::process::Command::new("qemu-img")
                .args(["check", "-f", "qcow2"])
                .arg(&img)
                .output()
                .unwrap();
            if !String::from_utf8_lossy(&out.stderr).contains("Failed to lock")
                || Instant::now() > deadline
            {
                break out;
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        // 0: clean; 3: leaked clusters only (allocations that failed for want of space).
        assert!(matches!(check.status.code(), Some(0 | 3)), "{check:?}");
        tests::image::qcow2_bytes(&img)
    } else {
        std::fs::read(&img).unwrap()
    };
    assert!(data == written, "the image holds every write");
}

/// A mirror whose reads of the disk fail (EIO from `nbdkit`'s error filter, switched on
/// by a file) follows the disk's policy (`on_read_error: stop`): the disk stops, the job
/// waits instead of failing; after `disk.resume` it copies on and reaches ready. A
/// client read that stops the disk in ready makes the pivot wait (409, the job stays
/// ready); after the resume the read completes and the pivot goes through; the new
/// image holds what the client wrote.
#[test]
fn a_mirror_waits_out_source_errors_that_stop_the_disk() {
    let test = "a_mirror_waits_out_source_errors_that_stop_the_disk";
    if !tests::nbd_server::have("nbdkit", test, "nbdkit") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let trigger = dir.path().join("fail-now");
    let server_nbd = tests::nbd_server::NbdServer::nbdkit(
        &[
            "--filter=error",
            "memory",
            "size=4M",
            "error=EIO",
            "error-pread-rate=100%",
            &format!("error-file={}", trigger.display()),
        ],
        tests::nbd_server::Listen::Unix(dir.path().join("nbd.sock")),
    );
    let api = dir.path().join("api.sock");
    let disk = format!(
        "id=vd,path={},cache=writeback,on_read_error=stop",
        server_nbd.uri()
    );
    let server = Server::start(
        dir.path(),
        &["--disk", &disk, "--api-socket", api.to_str().unwrap()],
    );
    let mut c = Client::connect(server.path(), 1, false, MIB).unwrap();
    let mut written = vec![0u8; 4 * MIB];
    for n in 0..8 {
        fill_random(&mut c.buf()[..CHUNK], 100 + n as u64);
        let at = n * 7 * CHUNK;
        written[at..at + CHUNK].copy_from_slice(&c.buf()[..CHUNK]);
        let p = c.ptr(0);
        c.queues[0].write(at as u64, p, CHUNK, 0, ReqFlags::empty());
        assert_eq!(wait_one(&mut c.queues[0]), 0);
    }

    std::fs::write(&trigger, b"").unwrap();
    let target = dir.path().join("new.raw");
    let r = call(
        &api,
        "PUT",
        "disk.mirror",
        Some(json!({"job_id": "m", "target": {"path": target}})),
    );
    assert!(r.ok(), "{} {}", r.status, r.text());
    let deadline = Instant::now() + Duration::from_secs(20);
    let info = loop {
        let info = call(&api, "GET", "disk.info", None).json();
        if info.get("io_status").is_some() {
            break info;
        }
        assert!(Instant::now() < deadline, "the disk did not stop: {info}");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(info["io_status"]["op"], "read", "{info}");
    assert_eq!(info["io_status"]["errno"], libc::EIO, "{info}");
    std::thread::sleep(Duration::from_millis(100));
    let jobs = call(&api, "GET", "jobs", None).json();
    assert_eq!(jobs[0]["state"], "running", "the job waits: {jobs}");

    std::fs::remove_file(&trigger).unwrap();
    let r = call(&api, "PUT", "disk.resume", None);
    assert!(r.ok(), "{} {}", r.status, r.text());
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let jobs = call(&api, "GET", "jobs", None).json();
        if jobs[0]["state"] == "ready" {
            break;
        }
        assert!(
            Instant::now() < deadline && jobs[0]["state"] == "running",
            "{jobs}\n{}",
            server.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }

    // In ready, a read of the client's fails and stops the disk: the pivot is refused
    // (its last copy could not run) and the job stays ready; after the resume the held
    // read completes and the pivot goes through.
    std::fs::write(&trigger, b"").unwrap();
    let reader = std::thread::spawn(move || {
        let p = c.ptr(0);
        c.queues[0].read(0, p, CHUNK, 0, ReqFlags::empty());
        let ret = wait_one(&mut c.queues[0]);
        (ret, c.buf()[..CHUNK].to_vec(), c)
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    while call(&api, "GET", "disk.info", None)
        .json()
        .get("io_status")
        .is_none()
    {
        assert!(Instant::now() < deadline, "the read did not stop the disk");
        std::thread::sleep(Duration::from_millis(20));
    }
    let r = call(&api, "PUT", "job-complete", Some(json!({"job_id": "m"})));
    assert_eq!(r.status, 409, "{}", r.text());
    assert!(r.text().contains("stopped on an I/O error"), "{}", r.text());
    assert_eq!(call(&api, "GET", "jobs", None).json()[0]["state"], "ready");
    std::fs::remove_file(&trigger).unwrap();
    assert!(call(&api, "PUT", "disk.resume", None).ok());
    let (ret, data, c) = reader.join().unwrap();
    assert_eq!(ret, 0, "the held read saw no error");
    assert!(data == written[..CHUNK], "the held read's data");

    let r = call(&api, "PUT", "job-complete", Some(json!({"job_id": "m"})));
    assert!(r.ok(), "{} {}", r.status, r.text());
    let info = call(&api, "GET", "disk.info", None).json();
    assert_eq!(info["disk"]["path"], target.to_str().unwrap(), "{info}");
    drop(c);
    assert!(
        std::fs::read(&target).unwrap() == written,
        "the new image holds what the client wrote"
    );
}
