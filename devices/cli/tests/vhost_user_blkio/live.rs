//! Tests of iothread placement and of settings changed while I/O runs.

// Test data and figures, not guest input.
#![allow(clippy::cast_possible_truncation, clippy::cast_precision_loss)]

use std::time::{Duration, Instant};

use blkio::ReqFlags;

use crate::support::{Client, MIB, Server, comps, image, read_counters, read_slot, wait_one};

/// `iothread_vq_mapping` (given as JSON): queue 0 on io0, queue 1 on io1; both serve I/O
/// and each iothread counts only its own queue's requests.
#[test]
fn queues_spread_over_two_iothreads() {
    let (dir, img, expect) = image(4 * MIB);
    let disk = serde_json::json!({
        "id": "vd", "path": img, "cache": "writeback", "num_queues": 2,
        "iothread_vq_mapping": [{"iothread": "io0", "vqs": [0]}, {"iothread": "io1", "vqs": [1]}],
    })
    .to_string();
    let counters = dir.path().join("c.json");
    let c_arg = counters.to_str().unwrap();
    let args = [
        "--disk-json",
        &disk,
        "--iothread",
        "id=io0",
        "--iothread-json",
        r#"{"id":"io1","poll_max_ns":0}"#,
    ];
    let mut server = Server::start(dir.path(), &[&args[..], &["--counters", c_arg]].concat());
    let mut c = Client::connect(server.path(), 2, false, MIB).unwrap();
    for (q, n) in [(0usize, 3u64), (1, 5)] {
        for i in 0..n {
            let off = (q * 65536) + i as usize * 4096;
            let p = c.ptr(off);
            c.queues[q].read(off as u64, p, 4096, 1, ReqFlags::empty());
            assert_eq!(wait_one(&mut c.queues[q]), 0);
            assert!(c.buf()[off..off + 4096] == expect[off..off + 4096]);
        }
    }
    drop(c);
    assert!(server.stop().success(), "{}", server.log());
    let v = read_counters(&counters);
    let got: Vec<_> = v
        .iothreads
        .iter()
        .map(|(id, t)| (id.as_str(), v.iothread_queues[id].clone(), t.requests))
        .collect();
    assert_eq!(got, [("io0", vec![0], 3), ("io1", vec![1], 5)], "{v:?}");
    assert_eq!(v.disks.keys().collect::<Vec<_>>(), ["vd"], "{v:?}");
    assert_eq!(v.disks["vd"].io.read.ops, 8);
}

/// Measures IOPS of a QD8 4 KiB reader on `q` for `secs` (requests stay queued).
fn measure_iops(q: &mut blkio::Blkioq, base: usize, secs: f64) -> f64 {
    let mut cs = comps(8);
    let t0 = Instant::now();
    let mut n = 0u64;
    while t0.elapsed().as_secs_f64() < secs {
        let got = q
            .do_io(&mut cs, 1, Some(&mut Duration::from_secs(10)), None)
            .expect("do_io");
        for c in &cs[..got] {
            // SAFETY: do_io initialized the first `got` completions.
            let c = unsafe { c.assume_init_read() };
            assert_eq!(c.ret, 0);
            let slot = c.user_data;
            read_slot(q, base, slot);
        }
        n += got as u64;
    }
    n as f64 / t0.elapsed().as_secs_f64()
}

/// The backend run in this process: throttle limits and iothread settings change while
/// a client keeps 8 requests in flight, without losing any.
#[test]
fn limits_and_iothread_settings_change_while_io_runs() {
    use devices::config::{DiskConfig, IoThreadConfig};

    let (_dir, img, _) = image(4 * MIB);
    let mut disk = DiskConfig::new("d0", &img);
    disk.cache = block::CacheMode::Writeback;
    disk.iothread = Some("io0".into());
    disk.throttle = Some(block::throttle::ThrottleLimits {
        iops_total: 100,
        ..Default::default()
    });
    let backend = with_backend_in_process(disk, |backend, socket| {
        let mut c = Client::connect(socket, 1, false, MIB).unwrap();
        let base = c.region.addr;
        let q = &mut c.queues[0];
        for slot in 0..8 {
            read_slot(q, base, slot);
        }
        measure_iops(q, base, 0.3);
        let slow = measure_iops(q, base, 1.0);
        backend
            .set_throttle(block::throttle::ThrottleLimits {
                iops_total: 400,
                ..Default::default()
            })
            .unwrap();
        measure_iops(q, base, 0.3);
        let fast = measure_iops(q, base, 1.0);
        assert!(
            (85.0..=115.0).contains(&slow),
            "{slow:.0} IOPS at iops_total=100"
        );
        assert!(
            (340.0..=460.0).contains(&fast),
            "{fast:.0} IOPS at iops_total=400"
        );

        let mut t = IoThreadConfig::new("io0");
        t.poll_max_ns = 0;
        t.aio_max_batch = 1;
        backend.update_iothread(t).unwrap();
        backend.set_throttle(Default::default()).unwrap();
        let free = measure_iops(q, base, 0.5);
        assert!(free > 800.0, "{free:.0} IOPS unthrottled");
        let counters = backend.counters();
        assert_eq!(
            counters.iothreads.values().next().map(|t| t.poll_ns),
            Some(0),
            "poll_max_ns=0 applied"
        );
        let mut cs = comps(8);
        let mut left = 8;
        while left > 0 {
            left -= q
                .do_io(&mut cs, 1, Some(&mut Duration::from_secs(10)), None)
                .unwrap();
        }
        drop(c);
    });
    let c = backend.counters();
    let d = c.disks.values().next().expect("the disk's counters");
    assert_eq!(d.io.in_flight, 0);
    assert_eq!(d.io.read.errors, 0);
    assert!(d.io.throttled_ns > 0);
    assert_eq!(c.sessions, 1);
}

/// The CPUs a thread of this process may run on, as `/proc` lists them (`0-1`).
fn cpus_allowed(tid: i32) -> String {
    let status = std::fs::read_to_string(format!("/proc/self/task/{tid}/status")).unwrap();
    let line = status
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .unwrap();
    line.trim().to_string()
}

/// Waits up to 5 s for `tid`'s CPU list to become `want`; returns the last one seen.
fn wait_cpus(tid: i32, want: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let got = cpus_allowed(tid);
        if got == want || Instant::now() >= deadline {
            return got;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A connected frontend that does no I/O: its iothread sleeps in epoll, and a new
/// `cpu_affinity` still pins it at once (and an empty one unpins it).
#[test]
fn cpu_affinity_applies_to_an_idle_iothread() {
    use devices::config::{DiskConfig, IoThreadConfig, usable_cpus};

    let cpus = usable_cpus();
    let (Some(&first), Some(&last)) = (cpus.first(), cpus.last()) else {
        unreachable!("a process runs on some CPU")
    };
    if first == last {
        eprintln!("SKIP cpu_affinity_applies_to_an_idle_iothread: one usable CPU");
        return;
    }
    let everything = if cpus.len() == last - first + 1 {
        format!("{first}-{last}")
    } else {
        String::new()
    };
    let mut disk = DiskConfig::new("d0", "null");
    disk.null_size = Some(MIB as u64);
    disk.iothread = Some("io0".into());
    with_backend_in_process(disk, |backend, socket| {
        let c = Client::connect(socket, 1, false, MIB).unwrap();
        // The thread records itself when the session starts, with no I/O.
        let deadline = Instant::now() + Duration::from_secs(5);
        let tid = loop {
            if let Some(tid) = backend.iothread_thread_id("io0") {
                break tid;
            }
            assert!(Instant::now() < deadline, "the iothread never started");
            std::thread::sleep(Duration::from_millis(10));
        };
        let mut t = IoThreadConfig::new("io0");
        t.cpu_affinity = vec![last];
        backend.update_iothread(t.clone()).unwrap();
        assert_eq!(wait_cpus(tid, &last.to_string()), last.to_string());
        if !everything.is_empty() {
            t.cpu_affinity = Vec::new();
            backend.update_iothread(t).unwrap();
            assert_eq!(wait_cpus(tid, &everything), everything, "unpinned");
        }
        let counters = backend.counters();
        assert_eq!(counters.iothreads["io0"].requests, 0, "no I/O was done");
        drop(c);
    });
}

/// Serves `disk` (on the iothread `io0`) from a backend in this process while `test` runs
/// with the backend and the socket path, then stops the server (also when `test`
/// panics, so a failed assert cannot hang the test) and returns the backend.
fn with_backend_in_process(
    disk: devices::config::DiskConfig,
    test: impl FnOnce(&devices::vhost_user_blk::Backend, &str),
) -> std::sync::Arc<devices::vhost_user_blk::Backend> {
    use devices::config::IoThreadConfig;
    use devices::vhost_user_blk::{Backend, BackendConfig, bind, serve};

    /// Stops the server however the test ends.
    struct StopOnDrop<'a>(&'a vmm_sys_util::eventfd::EventFd);
    impl Drop for StopOnDrop<'_> {
        fn drop(&mut self) {
            let _ = self.0.write(1);
        }
    }

    let dir = tempfile::tempdir().unwrap();
    let backend = Backend::new(BackendConfig {
        disk,
        iothreads: vec![IoThreadConfig::new("io0")],
    })
    .unwrap();
    let socket = dir.path().join("s.sock");
    let mut listener = bind(&socket).unwrap();
    let stop = vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK).unwrap();
    std::thread::scope(|s| {
        let server = s.spawn(|| serve(&backend, &mut listener, &stop, false));
        let guard = StopOnDrop(&stop);
        test(&backend, socket.to_str().unwrap());
        drop(guard);
        server.join().unwrap().unwrap();
    });
    backend
}
