//! `vhost-user-blk --api-socket`: the disk-level API while libblkio (a real vhost-user
//! frontend) writes and verifies: live throttle and iothread changes, counters, and a
//! live mirror that pivots under the client's writes (every byte the client wrote ends
//! on the new image, and reads after the pivot come from it), cancel, job events, and
//! the errors of bad requests.

// Test data and figures, not guest input.
#![allow(clippy::cast_possible_truncation, clippy::cast_precision_loss)]

#[path = "vhost_user_blkio/support.rs"]
#[allow(dead_code)]
mod support;

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use api::client::Reply;
use blkio::ReqFlags;
use serde_json::{Value, json};
use support::{
    Client, MIB, Server, api_call as call, fill_random, follow_events, image, wait_one, xorshift,
};

const SIZE: usize = 32 * MIB;

#[track_caller]
fn ok(api: &Path, method: &str, path: &str, body: Option<Value>) -> Reply {
    let r = call(api, method, path, body);
    assert!(r.ok(), "{method} {path}: {} {}", r.status, r.text());
    r
}

fn job(api: &Path, id: &str) -> Value {
    let jobs = ok(api, "GET", "jobs", None).json();
    jobs.as_array()
        .and_then(|a| a.iter().find(|j| j["id"] == id).cloned())
        .unwrap_or_else(|| panic!("no job {id}: {jobs}"))
}

fn wait_state(api: &Path, id: &str, state: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let j = job(api, id);
        if j["state"] == state {
            return j;
        }
        assert!(j["state"] != "failed", "{j}");
        assert!(Instant::now() < deadline, "not {state}: {j}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Writes random 4 KiB blocks in the first half of the disk, one at a time, reading each
/// back at once, until `stop`; `shadow` keeps what the disk holds.
fn writer(
    socket: String,
    stop: Arc<AtomicBool>,
    shadow: Arc<Mutex<Vec<u8>>>,
) -> std::thread::JoinHandle<usize> {
    std::thread::spawn(move || {
        let mut c = Client::connect(&socket, 1, false, MIB).unwrap();
        let mut rng = 0x1234_5678u64;
        let mut n = 0;
        while !stop.load(Ordering::Relaxed) {
            let block = (xorshift(&mut rng) % (SIZE as u64 / 2 / 4096)) as usize;
            let off = block * 4096;
            fill_random(&mut c.buf()[..4096], xorshift(&mut rng));
            let data = c.buf()[..4096].to_vec();
            let p = c.ptr(0);
            c.queues[0].write(off as u64, p, 4096, 0, ReqFlags::empty());
            assert_eq!(wait_one(&mut c.queues[0]), 0, "write at {off}");
            shadow.lock().unwrap()[off..off + 4096].copy_from_slice(&data);
            let p = c.ptr(8192);
            c.queues[0].read(off as u64, p, 4096, 1, ReqFlags::empty());
            assert_eq!(wait_one(&mut c.queues[0]), 0, "read at {off}");
            assert!(c.buf()[8192..8192 + 4096] == data[..], "read back at {off}");
            n += 1;
        }
        n
    })
}

#[test]
fn mirror_pivots_under_a_frontends_writes_and_the_api_answers() {
    let (dir, img, data) = image(SIZE);
    let api = dir.path().join("api.sock");
    let target = dir.path().join("new.raw");
    let disk = format!("id=vd,path={},cache=none,aio=io_uring", img.display());
    let server = Server::start(
        dir.path(),
        &[
            "--disk",
            &disk,
            "--iothread",
            "id=io0",
            "--api-socket",
            api.to_str().unwrap(),
        ],
    );
    let mode = std::fs::metadata(&api).unwrap();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode.permissions()) & 0o777,
        0o600
    );
    let rx = follow_events(&api);

    let info = ok(&api, "GET", "disk.info", None).json();
    assert_eq!(info["disk"]["path"], img.to_str().unwrap(), "{info}");
    assert_eq!(info["iothreads"][0]["id"], "io0", "{info}");

    let stop = Arc::new(AtomicBool::new(false));
    let shadow = Arc::new(Mutex::new(data));
    let w = writer(server.path().to_string(), stop.clone(), shadow.clone());

    // Live settings and counters while the frontend writes.
    ok(
        &api,
        "PUT",
        "disk.update",
        Some(json!({"throttle": {"iops_total": 4000}})),
    );
    ok(
        &api,
        "PUT",
        "iothread.update",
        Some(json!({"id": "io0", "poll_max_ns": 0})),
    );
    assert_eq!(
        ok(&api, "GET", "disk.info", None).json()["iothreads"][0]["poll_max_ns"],
        0
    );

    // Bad requests.
    let r = call(
        &api,
        "PUT",
        "disk.update",
        Some(json!({"id": "other", "throttle": {}})),
    );
    assert_eq!(r.status, 404, "{}", r.text());
    let r = call(&api, "PUT", "iothread.update", Some(json!({"id": "nope"})));
    assert_eq!(r.status, 404, "{}", r.text());
    let r = call(
        &api,
        "PUT",
        "disk.mirror",
        Some(json!({"target": {"path": "rel"}})),
    );
    assert_eq!(r.status, 400, "{}", r.text());
    let r = call(&api, "PUT", "job-complete", Some(json!({"job_id": "nope"})));
    assert_eq!(r.status, 404, "{}", r.text());
    let r = call(&api, "GET", "nothing", None);
    assert_eq!(r.status, 404, "{}", r.text());

    // Mirror, ready, more writes, pivot.
    let started = ok(
        &api,
        "PUT",
        "disk.mirror",
        Some(json!({"job_id": "m", "target": {"path": target}})),
    )
    .json();
    assert_eq!(started["disk"], "vd", "{started}");
    let r = call(
        &api,
        "PUT",
        "disk.mirror",
        Some(json!({"job_id": "m2", "target": {"path": dir.path().join("x.raw")}})),
    );
    assert_eq!(r.status, 409, "{}", r.text());
    wait_state(&api, "m", "ready");
    std::thread::sleep(Duration::from_millis(300));
    ok(&api, "PUT", "job-complete", Some(json!({"job_id": "m"})));
    assert_eq!(job(&api, "m")["state"], "completed");
    let info = ok(&api, "GET", "disk.info", None).json();
    assert_eq!(info["disk"]["path"], target.to_str().unwrap(), "{info}");
    // The old image is closed.
    let pid = server_pid(&server);
    assert!(
        !tests::procfs::holds(pid, &img),
        "the backend still has the old image open"
    );
    // More writes and reads on the new image.
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    let writes = w.join().unwrap();
    assert!(writes > 50, "only {writes} writes");
    let now = std::fs::read(&target).unwrap();
    assert!(
        now == *shadow.lock().unwrap(),
        "the new image differs from what the client wrote"
    );
    let c = ok(&api, "GET", "disk.counters", None).json();
    assert!(
        c["disks"]["vd"]["write"]["ops"].as_u64() >= Some(writes as u64),
        "{c}"
    );

    // The events told the job's life.
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut seen = Vec::new();
    while !seen.iter().any(|e: &Value| e["event"] == "job-completed") {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = rx.recv_timeout(left).expect("job events");
        seen.push(serde_json::from_str(&line).unwrap());
    }
    for kind in ["job-started", "job-ready", "job-completed"] {
        assert!(
            seen.iter().any(|e| e["event"] == kind),
            "no {kind}: {seen:?}"
        );
    }

    // A second job, from the new image back to a fresh one, cancelled.
    let back = dir.path().join("back.raw");
    ok(
        &api,
        "PUT",
        "disk.mirror",
        Some(json!({"job_id": "m3", "target": {"path": back}, "speed": 1048576})),
    );
    ok(
        &api,
        "PUT",
        "job-set-speed",
        Some(json!({"job_id": "m3", "speed": 2097152})),
    );
    assert_eq!(job(&api, "m3")["speed"], 2097152);
    ok(&api, "PUT", "job-cancel", Some(json!({"job_id": "m3"})));
    assert_eq!(job(&api, "m3")["state"], "cancelled");
    let info = ok(&api, "GET", "disk.info", None).json();
    assert_eq!(info["disk"]["path"], target.to_str().unwrap());
    assert!(
        !tests::procfs::holds(pid, &back),
        "the cancelled target is closed"
    );
}

fn server_pid(server: &Server) -> u32 {
    // The backend is the process listening on the socket: find it by its open socket.
    let sock = std::path::PathBuf::from(server.path());
    for p in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = p.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        if String::from_utf8_lossy(&cmd).contains(&*sock.to_string_lossy())
            && String::from_utf8_lossy(&cmd).contains("vhost-user-blk")
        {
            return pid;
        }
    }
    panic!("no backend process");
}
