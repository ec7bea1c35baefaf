//! The data plane end to end without KVM: virtio-blk disks served by real iothreads
//! (io_uring/AIO underneath), driven through their kick/call eventfds by a test-side
//! driver over memfd guest memory. Data is verified against the image files.

// Test data and figures, not guest input.
#![allow(clippy::cast_possible_truncation, clippy::cast_precision_loss)]

mod common;
mod support;

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use block::throttle::{ThrottleGroup, ThrottleLimits};
use common::{Rig, mixed_load, run1};
use devices::config::{DiskConfig, IoThreadConfig, VqMapping};
use support::BlkOp;

const MIB: u64 = 1 << 20;

fn disk(id: &str, queues: u16) -> DiskConfig {
    let mut d = DiskConfig::new(id, format!("{id}.raw"));
    d.num_queues = queues;
    d.queue_size = 128;
    d
}

#[test]
fn eight_queues_at_qd32_mixed_io_is_byte_exact() {
    let mut rig = Rig::new(
        2,
        vec![DiskConfig {
            iothread_vq_mapping: Some(vec![
                VqMapping {
                    iothread: "io0".into(),
                    vqs: vec![0, 2, 4, 6],
                },
                VqMapping {
                    iothread: "io1".into(),
                    vqs: vec![1, 3, 5, 7],
                },
            ]),
            ..disk("d0", 8)
        }],
        64 * MIB,
    );
    let region = 64 * MIB / 512 / 8;
    let disk = rig.disks.remove(0);
    let image = disk.image.clone();
    let threads: Vec<_> = disk
        .drivers
        .into_iter()
        .enumerate()
        .map(|(q, mut drv)| {
            std::thread::spawn(move || {
                let (shadow, done) =
                    mixed_load(&mut drv, q as u64 * region, region, 1500, q as u64);
                (q, shadow, done)
            })
        })
        .collect();
    let mut total = 0;
    let results: Vec<_> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    let file = std::fs::read(&image).unwrap();
    for (q, shadow, done) in results {
        total += done;
        let off = (q as u64 * region * 512) as usize;
        assert!(
            file[off..off + shadow.len()] == shadow[..],
            "queue {q}'s region differs from what it wrote"
        );
    }
    let counters = disk.device.counters();
    assert_eq!(total, 8 * 1500);
    assert_eq!(counters.io.read.ops + counters.io.write.ops, total as u64);
    assert_eq!(counters.invalid_requests, 0);
    assert_eq!(counters.io.in_flight, 0);
    for t in &rig.iothreads {
        let c = t.counters();
        assert!(c.requests >= 4 * 1500, "{}: {c:?}", t.id());
        assert!(c.signals > 0 && c.cpu_ns > 0, "{}: {c:?}", t.id());
    }
}

#[test]
fn two_disks_share_one_iothread() {
    let mut a = disk("a", 1);
    a.aio = block::AioKind::Native;
    let b = DiskConfig {
        iothread: Some("io0".into()),
        ..disk("b", 1)
    };
    let mut rig = Rig::new(1, vec![a, b], 16 * MIB);
    let mut handles = Vec::new();
    for (i, mut d) in rig.disks.drain(..).enumerate() {
        let mut drv = d.drivers.remove(0);
        handles.push(std::thread::spawn(move || {
            let (shadow, _) = mixed_load(&mut drv, 0, 16 * MIB / 512, 800, 40 + i as u64);
            let file = std::fs::read(&d.image).unwrap();
            assert!(file == shadow, "disk {i} differs");
            d.device.counters()
        }));
    }
    for h in handles {
        let c = h.join().unwrap();
        assert_eq!(c.io.read.ops + c.io.write.ops, 800);
    }
    assert!(rig.iothreads[0].counters().requests >= 1600);
}

#[test]
fn every_request_type_and_get_id() {
    let mut rig = Rig::new(
        1,
        vec![DiskConfig {
            serial: Some("SER-123".into()),
            ..disk("d", 1)
        }],
        4 * MIB,
    );
    let drv = &mut rig.disks[0].drivers[0];
    let data: Vec<u8> = (0..8192u32).map(|i| (i * 13) as u8).collect();
    assert_eq!(
        run1(
            drv,
            BlkOp::Write {
                sector: 16,
                data: data.clone()
            }
        )
        .status,
        0
    );
    assert_eq!(run1(drv, BlkOp::Flush).status, 0);
    let r = run1(
        drv,
        BlkOp::Read {
            sector: 16,
            len: 8192,
        },
    );
    assert_eq!((r.status, r.data == data), (0, true));
    let id = run1(drv, BlkOp::GetId);
    assert_eq!(id.status, 0);
    assert_eq!(&id.data[..7], b"SER-123");
    assert!(id.data[7..].iter().all(|&b| b == 0));
    assert_eq!(
        run1(
            drv,
            BlkOp::WriteZeroes {
                sector: 16,
                num_sectors: 8,
                unmap: false
            }
        )
        .status,
        0
    );
    assert_eq!(
        run1(
            drv,
            BlkOp::Discard {
                sector: 24,
                num_sectors: 8
            }
        )
        .status,
        0
    );
    let r = run1(
        drv,
        BlkOp::Read {
            sector: 16,
            len: 8192,
        },
    );
    assert!(
        r.data.iter().all(|&b| b == 0),
        "zeroed and discarded sectors read back zero"
    );
    // Past the end: IOERR, and the disk keeps serving.
    let r = run1(
        drv,
        BlkOp::Read {
            sector: 4 * MIB / 512 - 4,
            len: 4096,
        },
    );
    assert_eq!(r.status, 1);
    assert_eq!(
        run1(
            drv,
            BlkOp::Read {
                sector: 0,
                len: 512
            }
        )
        .status,
        0
    );
    let c = rig.disks[0].device.counters();
    assert_eq!(c.invalid_requests, 1);
}

#[test]
fn readonly_disk_refuses_writes_with_ioerr() {
    let dir = tempfile::tempdir().unwrap();
    let _ = dir;
    let mut rig = Rig::new(
        1,
        vec![DiskConfig {
            readonly: true,
            ..disk("ro", 1)
        }],
        MIB,
    );
    let drv = &mut rig.disks[0].drivers[0];
    assert_eq!(
        run1(
            drv,
            BlkOp::Write {
                sector: 0,
                data: vec![1; 512]
            }
        )
        .status,
        1
    );
    assert_eq!(
        run1(
            drv,
            BlkOp::Read {
                sector: 0,
                len: 512
            }
        )
        .status,
        0
    );
    assert!(
        std::fs::read(&rig.disks[0].image)
            .unwrap()
            .iter()
            .all(|&b| b == 0)
    );
}

/// QD32 reads for `secs` seconds; returns IOPS.
fn read_rate(drv: &mut support::BlkDriver, secs: f64) -> f64 {
    let end = Instant::now() + Duration::from_secs_f64(secs);
    let mut done = 0u64;
    let mut sector = 0;
    while Instant::now() < end {
        while drv.in_flight() < common::QD {
            sector = (sector + 8) % 2048;
            drv.submit_read(sector, 4096, 1).unwrap();
        }
        drv.kick().unwrap();
        done += drv.wait(Duration::from_secs(5)).unwrap().len() as u64;
    }
    drv.drain(Duration::from_secs(10)).unwrap();
    done as f64 / secs
}

#[test]
fn throttled_disk_follows_its_limit_and_live_changes() {
    let limits = ThrottleLimits {
        iops_total: 400,
        ..Default::default()
    };
    let mut rig = Rig::new(
        1,
        vec![DiskConfig {
            throttle: Some(limits),
            ..disk("t", 1)
        }],
        4 * MIB,
    );
    let device = rig.disks[0].device.clone();
    let drv = &mut rig.disks[0].drivers[0];
    let iops = read_rate(drv, 2.0);
    assert!(
        (iops - 400.0).abs() < 40.0,
        "400 IOPS limit, measured {iops:.0}"
    );
    device
        .set_throttle(Some(ThrottleLimits {
            iops_total: 1000,
            ..Default::default()
        }))
        .unwrap();
    let iops = read_rate(drv, 2.0);
    assert!(
        (iops - 1000.0).abs() < 100.0,
        "1000 IOPS limit, measured {iops:.0}"
    );
    assert!(device.counters().io.throttled_ns > 0);
    device.set_throttle(None).unwrap();
    let iops = read_rate(drv, 1.0);
    assert!(iops > 1500.0, "unthrottled, measured {iops:.0}");
}

/// QD32 4 KiB reads until `stop`; returns when each completed, after checking that every
/// request submitted completed with status OK.
fn timed_reads(mut drv: support::BlkDriver, stop: &AtomicBool) -> Vec<Instant> {
    let mut times = Vec::new();
    let (mut submitted, mut sector) = (0usize, 0);
    while !stop.load(Ordering::Relaxed) {
        while drv.in_flight() < common::QD {
            sector = (sector + 8) % 2048;
            drv.submit_read(sector, 4096, 1).unwrap();
            submitted += 1;
        }
        drv.kick().unwrap();
        for c in drv.wait(Duration::from_millis(100)).unwrap() {
            assert_eq!(c.status, 0);
            times.push(Instant::now());
        }
    }
    let rest = drv.drain(Duration::from_secs(10)).unwrap();
    assert!(rest.iter().all(|c| c.status == 0));
    times.extend(rest.iter().map(|_| Instant::now()));
    assert_eq!(times.len(), submitted, "every request completed");
    times
}

/// Completions per second in `[from, to)` seconds after `t0`.
fn rate_in(times: &[Instant], t0: Instant, from: f64, to: f64) -> f64 {
    let (a, b) = (
        t0 + Duration::from_secs_f64(from),
        t0 + Duration::from_secs_f64(to),
    );
    times.iter().filter(|&&t| t >= a && t < b).count() as f64 / (to - from)
}

#[test]
fn disks_move_between_throttle_groups_mid_io() {
    let iops = |n| ThrottleLimits {
        iops_total: n,
        ..Default::default()
    };
    let slow = ThrottleGroup::new("slow", iops(300)).unwrap();
    let fast = ThrottleGroup::new("fast", iops(1200)).unwrap();
    let b = DiskConfig {
        iothread: Some("io1".into()),
        ..disk("b", 1)
    };
    let mut rig = Rig::new(2, vec![disk("a", 1), b], 4 * MIB);
    let devs: Vec<_> = rig.disks.iter().map(|d| d.device.clone()).collect();
    // Into a group while the queues exist (but before I/O), then while I/O runs (and
    // requests wait in the throttle): slow -> fast -> none.
    for d in &devs {
        d.set_shared_group(Some(slow.clone()));
    }
    let stop = AtomicBool::new(false);
    let t0 = Instant::now();
    let (times, moved_at) = std::thread::scope(|scope| {
        let loads: Vec<_> = rig
            .disks
            .iter_mut()
            .map(|d| {
                let drv = d.drivers.remove(0);
                let stop = &stop;
                scope.spawn(move || timed_reads(drv, stop))
            })
            .collect();
        let mut moved_at = Vec::new();
        for (at, group) in [(1.3, Some(&fast)), (2.6, None)] {
            std::thread::sleep(
                (t0 + Duration::from_secs_f64(at)).saturating_duration_since(Instant::now()),
            );
            devs[0].set_shared_group(group.cloned());
            moved_at.push(t0.elapsed().as_secs_f64());
        }
        std::thread::sleep(
            (t0 + Duration::from_secs_f64(3.6)).saturating_duration_since(Instant::now()),
        );
        stop.store(true, Ordering::Relaxed);
        let times: Vec<Vec<Instant>> = loads.into_iter().map(|h| h.join().unwrap()).collect();
        (times, moved_at)
    });
    let (a, b) = (&times[0], &times[1]);
    let phases = [
        ("both in slow", 0.3, moved_at[0], [150.0, 150.0]),
        ("a in fast", moved_at[0] + 0.3, moved_at[1], [1200.0, 300.0]),
    ];
    for (i, (what, from, to, want)) in phases.into_iter().enumerate() {
        let got = [rate_in(a, t0, from, to), rate_in(b, t0, from, to)];
        println!("{what}: a {:.0} IOPS, b {:.0} IOPS", got[0], got[1]);
        // Sharing one group, the group's limit holds to 12%; the members' turns are
        // fair to 20% (a thread the host delays past a turn's grace loses that turn,
        // and a loaded 2-core CI host delays them: once 170 : 149).
        let each = if i == 0 { 0.20 } else { 0.12 };
        for (g, w) in got.iter().zip(want) {
            assert!(
                (g - w).abs() <= w * each,
                "{what}: measured {got:?}, want {want:?}"
            );
        }
        let (sum, want_sum) = (got[0] + got[1], want[0] + want[1]);
        assert!(
            (sum - want_sum).abs() <= want_sum * 0.12,
            "{what}: measured {sum:.0} IOPS in all, want {want_sum:.0}"
        );
    }
    let from = moved_at[1] + 0.3;
    let (ra, rb) = (rate_in(a, t0, from, 3.6), rate_in(b, t0, from, 3.6));
    println!("a out of groups: a {ra:.0} IOPS, b {rb:.0} IOPS");
    assert!(ra > 1500.0, "a unthrottled, measured {ra:.0}");
    assert!(
        (rb - 300.0).abs() <= 36.0,
        "b alone in slow, measured {rb:.0}"
    );
    for (d, t) in devs.iter().zip(&times) {
        let c = d.counters();
        assert_eq!(c.io.read.ops, t.len() as u64, "{}", d.id());
        assert_eq!(c.io.in_flight, 0);
    }
    assert_eq!(devs[0].config().throttle_group, None);
    assert_eq!(devs[1].config().throttle_group.as_deref(), Some("slow"));
}

#[test]
fn iothread_settings_change_while_io_runs() {
    let mut rig = Rig::new(1, vec![disk("d", 1)], 8 * MIB);
    let mut drv = rig.disks[0].drivers.remove(0);
    let load = std::thread::spawn(move || mixed_load(&mut drv, 0, 8 * MIB / 512, 3000, 7).1);
    let io = &rig.iothreads[0];
    for (i, max) in [0u64, 100_000, 0, 50_000].into_iter().enumerate() {
        std::thread::sleep(Duration::from_millis(50));
        let cfg = IoThreadConfig {
            poll_max_ns: max,
            aio_max_batch: 1 + i as u32 * 8,
            ..io.config()
        };
        io.update(cfg.clone()).unwrap();
        assert_eq!(io.config(), cfg);
    }
    assert_eq!(load.join().unwrap(), 3000);
    assert!(
        io.update(IoThreadConfig {
            aio_max_batch: 0,
            ..io.config()
        })
        .is_err()
    );
    assert!(io.update(IoThreadConfig::new("other")).is_err());
}

#[test]
fn removing_a_disk_drains_its_requests() {
    let limits = ThrottleLimits {
        iops_total: 200,
        ..Default::default()
    };
    let mut rig = Rig::new(
        1,
        vec![DiskConfig {
            throttle: Some(limits),
            ..disk("r", 1)
        }],
        4 * MIB,
    );
    let drv = &mut rig.disks[0].drivers[0];
    for i in 0..32 {
        drv.submit_write(i * 8, &[0x5a; 4096], 1).unwrap();
    }
    drv.kick().unwrap();
    std::thread::sleep(Duration::from_millis(20));
    // Most of the 32 wait for the throttle; removal must still complete every one.
    let removed = rig.iothreads[0]
        .remove_device("r", Duration::from_secs(10))
        .unwrap();
    assert_eq!(removed, 1);
    let done = drv.drain(Duration::from_secs(5)).unwrap();
    assert_eq!(done.len(), 32);
    assert!(done.iter().all(|c| c.status == 0));
    let file = std::fs::read(&rig.disks[0].image).unwrap();
    assert!(
        file[..32 * 4096].iter().all(|&b| b == 0x5a),
        "every write reached the disk"
    );
}

#[test]
fn event_idx_suppresses_interrupts_the_driver_does_not_want() {
    let mut rig = Rig::new(1, vec![disk("e", 1)], MIB);
    let device = rig.disks[0].device.clone();
    let drv = &mut rig.disks[0].drivers[0];
    drv.vq_mut().set_interrupts(false);
    for i in 0..16 {
        drv.submit_read(i * 8, 4096, 1).unwrap();
    }
    drv.kick().unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut done = 0;
    while done < 16 {
        assert!(Instant::now() < deadline, "completions never came");
        done += drv.poll_used().len();
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(
        device.counters().signals,
        0,
        "the driver asked for no interrupt"
    );
    drv.vq_mut().set_interrupts(true);
    assert_eq!(
        run1(
            drv,
            BlkOp::Read {
                sector: 0,
                len: 512
            }
        )
        .status,
        0
    );
    // The driver may see the used entry a moment before the device counts its signal.
    let deadline = Instant::now() + Duration::from_secs(5);
    while device.counters().signals == 0 {
        assert!(
            Instant::now() < deadline,
            "no interrupt after the driver asked for one"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn null_disk_serves_without_storage() {
    let mut d = DiskConfig::new("n", "null");
    d.null_size = Some(64 * MIB);
    d.queue_size = 128;
    let mut rig = Rig::new(1, vec![d], 0);
    let drv = &mut rig.disks[0].drivers[0];
    assert_eq!(
        run1(
            drv,
            BlkOp::Write {
                sector: 0,
                data: vec![7; 4096]
            }
        )
        .status,
        0
    );
    let r = run1(
        drv,
        BlkOp::Read {
            sector: 0,
            len: 4096,
        },
    );
    assert!(r.status == 0 && r.data.iter().all(|&b| b == 0));
}

#[test]
fn ring_indexes_wrap_at_65535() {
    use devices::iothread::IoThread;
    use devices::virtio_blk::device::BlkDevice;
    use virtio_queue::QueueT;

    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("w.raw");
    std::fs::File::create(&image)
        .unwrap()
        .set_len(4 * MIB)
        .unwrap();
    let mut cfg = DiskConfig::new("w", &image);
    cfg.queue_size = 128;
    let device = BlkDevice::open(cfg, None).unwrap();
    let mem = support::TestMemory::new(common::driver_config().footprint() + MIB).unwrap();
    let mut drv = support::BlkDriver::new(&mem, common::driver_config()).unwrap();
    // Start just below the wrap: as if 65,500 requests had already gone through.
    let start = 65_500u16;
    drv.vq_mut().start_at(start);
    drv.vq().set_used_idx_raw(start);
    let mut local = drv.local_queue().unwrap();
    local.queue.set_next_avail(start);
    local.queue.set_next_used(start);
    let io = IoThread::spawn(IoThreadConfig::new("io0")).unwrap();
    io.add(Box::new(
        device.new_worker(0, local, mem.guest_mem(), 32).unwrap(),
    ))
    .unwrap();
    let (shadow, done) = mixed_load(&mut drv, 0, 4 * MIB / 512, 300, 5);
    assert_eq!(done, 300);
    assert!(drv.vq().ring().used_idx() < start, "the used index wrapped");
    assert!(std::fs::read(&image).unwrap() == shadow);
}
