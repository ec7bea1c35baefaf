//! A malicious driver: 10,000 rounds of random descriptor tables (huge lengths, loops,
//! out-of-range addresses and indexes, wrong directions, random headers and indirect
//! tables) on one disk, while a well-behaved driver keeps verified I/O going on another
//! disk served by the same iothread. The device must not panic, must return every chain
//! with an in-range head to the used ring, must write nothing outside the buffers the
//! chains name, and must keep serving the good queue.

#![allow(clippy::cast_possible_truncation)] // Test data and figures, not guest input.

mod common;
mod support;

use std::time::{Duration, Instant};

use devices::config::DiskConfig;
use devices::iothread::IoThread;
use devices::virtio_blk::device::BlkDevice;
use devices::virtio_blk::worker::LocalQueue;
use rand::{Rng, SeedableRng};
use support::{Desc, F_INDIRECT, F_NEXT, F_WRITE, TestMemory, VirtqDriver};
use vm_memory::GuestAddress;

const ROUNDS: usize = 10_000;
const QSIZE: u16 = 64;
const MIB: u64 = 1 << 20;

#[test]
fn random_descriptor_tables_never_hurt_the_device_or_other_queues() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = common::driver_config();
    let mem = TestMemory::new(2 * cfg.footprint() + 4 * MIB).unwrap();
    let io = IoThread::spawn(devices::config::IoThreadConfig::new("io0")).unwrap();

    // The hostile disk.
    let bad_image = dir.path().join("bad.raw");
    std::fs::File::create(&bad_image)
        .unwrap()
        .set_len(8 * MIB)
        .unwrap();
    let mut bad_cfg = DiskConfig::new("bad", &bad_image);
    bad_cfg.queue_size = QSIZE;
    let bad = BlkDevice::open(bad_cfg, None).unwrap();
    let vq = VirtqDriver::new(&mem, QSIZE, true).unwrap();
    let local = LocalQueue {
        queue: vq.device_queue(),
        kick: vq.device_kick().unwrap(),
        call: vq.device_call().unwrap(),
    };
    io.add(Box::new(
        bad.new_worker(0, local, mem.guest_mem(), 32).unwrap(),
    ))
    .unwrap();

    // The good disk, on the same iothread.
    let good_image = dir.path().join("good.raw");
    std::fs::File::create(&good_image)
        .unwrap()
        .set_len(8 * MIB)
        .unwrap();
    let mut good_cfg = DiskConfig::new("good", &good_image);
    good_cfg.queue_size = 128;
    let good = BlkDevice::open(good_cfg, None).unwrap();
    let mut drv = support::BlkDriver::new(&mem, cfg).unwrap();
    io.add(Box::new(
        good.new_worker(0, drv.local_queue().unwrap(), mem.guest_mem(), 32)
            .unwrap(),
    ))
    .unwrap();

    // A canary no chain names, then memory the hostile chains point into (buffers start
    // in the playground and may run past its end, never back into the canary).
    let canary = mem.alloc(64 * 1024, 4096);
    let playground = mem.alloc(256 * 1024, 4096);
    mem.fill(canary, 0xc3, 64 * 1024);
    let mem_end = mem.regions().iter().map(|r| r.end()).max().unwrap();

    let good_load = std::thread::spawn(move || {
        let (shadow, done) = common::mixed_load(&mut drv, 0, 8 * MIB / 512, 4000, 99);
        (shadow, done)
    });

    let mut rng = rand::rngs::StdRng::seed_from_u64(0xbad);
    let mut avail = 0u16;
    let mut expected_used = 0u16;
    let started = Instant::now();
    for round in 0..ROUNDS {
        // Random descriptors all over the table (and an indirect table in the playground).
        for _ in 0..rng.random_range(1..8) {
            let index = rng.random_range(0..QSIZE);
            vq.ring()
                .write_desc(index, random_desc(&mut rng, playground.0, mem_end));
        }
        if rng.random_bool(0.2) {
            let table = GuestAddress(playground.0 + rng.random_range(0..64u64) * 16);
            for i in 0..rng.random_range(1..6u64) {
                mem.write_obj(
                    GuestAddress(table.0 + i * 16),
                    raw_desc(random_desc(&mut rng, playground.0, mem_end)),
                );
            }
        }
        // Sometimes a plausible header at the start of a playground buffer.
        if rng.random_bool(0.5) {
            let off = rng.random_range(0..(256 * 1024 - 16) / 512) * 512;
            let kind: u32 = [0, 1, 4, 8, 11, 13, rng.random()][rng.random_range(0..7)];
            let sector: u64 = if rng.random_bool(0.7) {
                rng.random_range(0..16384)
            } else {
                rng.random()
            };
            let mut hdr = [0u8; 16];
            hdr[..4].copy_from_slice(&kind.to_le_bytes());
            hdr[8..].copy_from_slice(&sector.to_le_bytes());
            mem.write(GuestAddress(playground.0 + off), &hdr);
        }
        // A quarter of the rounds: a well-formed chain at descriptors 0..3 with one field
        // broken, so that the checks after the structural ones get exercised too.
        if rng.random_bool(0.25) {
            let base = playground.0 + rng.random_range(0..64u64) * 4096;
            let write = rng.random_bool(0.5);
            let mut hdr = [0u8; 16];
            hdr[..4].copy_from_slice(&u32::from(write).to_le_bytes());
            hdr[8..].copy_from_slice(&rng.random_range(0..16000u64).to_le_bytes());
            mem.write(GuestAddress(base), &hdr);
            let data_flags = if write { F_NEXT } else { F_NEXT | F_WRITE };
            let mut chain = [
                Desc::new(base, 16, F_NEXT, 1),
                Desc::new(base + 512, 512 * rng.random_range(1..8u32), data_flags, 2),
                Desc::new(base + 4095, 1, F_WRITE, 0),
            ];
            let d = &mut chain[rng.random_range(0..3)];
            match rng.random_range(0..5) {
                0 => d.addr = rng.random(),
                1 => d.len = rng.random_range(0..8192),
                2 => d.flags ^= 1 << rng.random_range(0..3),
                3 => d.next = rng.random_range(0..4),
                _ => {}
            }
            for (i, d) in chain.into_iter().enumerate() {
                vq.ring().write_desc(i as u16, d);
            }
            vq.ring().set_avail_entry(avail, 0);
            avail = avail.wrapping_add(1);
            expected_used = expected_used.wrapping_add(1);
        }
        // Publish 1-4 heads, some out of range (those cannot be returned to the used ring).
        for _ in 0..rng.random_range(1..=4) {
            let head = if rng.random_bool(0.9) {
                rng.random_range(0..QSIZE)
            } else {
                rng.random()
            };
            vq.ring().set_avail_entry(avail, head);
            avail = avail.wrapping_add(1);
            if head < QSIZE {
                expected_used = expected_used.wrapping_add(1);
            }
        }
        vq.ring().set_avail_idx(avail);
        vq.kick_fd().write(1).unwrap();
        // Wait until every in-range head has come back.
        let deadline = Instant::now() + Duration::from_secs(10);
        while vq.ring().used_idx() != expected_used {
            assert!(
                Instant::now() < deadline,
                "round {round}: used idx {} != expected {expected_used}",
                vq.ring().used_idx()
            );
            std::thread::yield_now();
        }
    }
    let elapsed = started.elapsed();

    let (shadow, done) = good_load.join().expect("the good queue's driver panicked");
    assert_eq!(done, 4000, "the good queue kept being served");
    assert!(
        std::fs::read(&good_image).unwrap() == shadow,
        "the good disk's data is intact"
    );
    assert!(
        mem.read(canary, 64 * 1024).iter().all(|&b| b == 0xc3),
        "memory no chain named was written"
    );
    let c = bad.counters();
    assert!(c.invalid_requests > ROUNDS as u64 / 2, "{c:?}");
    assert_eq!(c.io.in_flight, 0);
    println!(
        "{ROUNDS} hostile rounds in {elapsed:.2?}: {} rejected, {} reads, {} writes reached the disk",
        c.invalid_requests, c.io.read.ops, c.io.write.ops
    );
    // After all that, the hostile queue still serves a well-formed request.
    let buf = mem.alloc(4096, 4096);
    let hdr = mem.alloc(16, 16);
    let status = mem.alloc(1, 1);
    mem.write(hdr, &[0u8; 16]);
    mem.write(status, &[0xff]);
    let base = avail;
    vq.ring().write_desc(0, Desc::new(hdr.0, 16, F_NEXT, 1));
    vq.ring()
        .write_desc(1, Desc::new(buf.0, 4096, F_NEXT | F_WRITE, 2));
    vq.ring().write_desc(2, Desc::new(status.0, 1, F_WRITE, 0));
    vq.ring().set_avail_entry(base, 0);
    vq.ring().set_avail_idx(base.wrapping_add(1));
    vq.kick_fd().write(1).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while vq.ring().used_idx() != expected_used.wrapping_add(1) {
        assert!(
            Instant::now() < deadline,
            "the hostile queue stopped serving"
        );
        std::thread::yield_now();
    }
    assert_eq!(
        mem.read(status, 1)[0],
        0,
        "a good request after the storm succeeds"
    );
}

fn random_desc(rng: &mut rand::rngs::StdRng, playground: u64, mem_end: u64) -> Desc {
    let addr = match rng.random_range(0..6) {
        0..=2 => playground + rng.random_range(0..256 * 1024u64),
        3 => mem_end.saturating_sub(rng.random_range(0..64)),
        4 => rng.random_range(mem_end..mem_end + (1 << 30)),
        _ => rng.random(),
    };
    let len = match rng.random_range(0..7) {
        0 => 0,
        1 => 1,
        2 => 16,
        3 => 512 * rng.random_range(1..16u32),
        4 => rng.random_range(0..256 * 1024),
        5 => u32::MAX - rng.random_range(0..16),
        _ => rng.random(),
    };
    let flags = rng.random::<u16>()
        & (F_NEXT | F_WRITE | if rng.random_bool(0.1) { F_INDIRECT } else { 0 });
    let next = if rng.random_bool(0.9) {
        rng.random_range(0..QSIZE)
    } else {
        rng.random()
    };
    // Keep the canary out of reach: addresses land in the playground or outside memory.
    Desc::new(addr, len, flags, next)
}

fn raw_desc(d: Desc) -> [u8; 16] {
    let mut raw = [0u8; 16];
    raw[..8].copy_from_slice(&d.addr.to_le_bytes());
    raw[8..12].copy_from_slice(&d.len.to_le_bytes());
    raw[12..14].copy_from_slice(&d.flags.to_le_bytes());
    raw[14..].copy_from_slice(&d.next.to_le_bytes());
    raw
}

#[test]
fn a_corrupt_avail_index_does_not_hang_or_spin_the_iothread() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = common::driver_config();
    let mem = TestMemory::new(2 * cfg.footprint() + MIB).unwrap();
    let io = IoThread::spawn(devices::config::IoThreadConfig::new("io0")).unwrap();
    let open = |id: &str| {
        let image = dir.path().join(format!("{id}.raw"));
        std::fs::File::create(&image).unwrap().set_len(MIB).unwrap();
        let mut c = DiskConfig::new(id, &image);
        c.queue_size = QSIZE;
        BlkDevice::open(c, None).unwrap()
    };
    let bad = open("bad");
    let vq = VirtqDriver::new(&mem, QSIZE, true).unwrap();
    // More entries "available" than the ring holds.
    vq.ring().set_avail_idx(QSIZE + 7);
    let local = LocalQueue {
        queue: vq.device_queue(),
        kick: vq.device_kick().unwrap(),
        call: vq.device_call().unwrap(),
    };
    io.add(Box::new(
        bad.new_worker(0, local, mem.guest_mem(), 32).unwrap(),
    ))
    .unwrap();
    vq.kick_fd().write(1).unwrap();
    // The same iothread still serves another disk promptly.
    let good = open("good");
    let mut drv = support::BlkDriver::new(&mem, cfg).unwrap();
    io.add(Box::new(
        good.new_worker(0, drv.local_queue().unwrap(), mem.guest_mem(), 32)
            .unwrap(),
    ))
    .unwrap();
    let c = common::run1(
        &mut drv,
        support::BlkOp::Read {
            sector: 0,
            len: 4096,
        },
    );
    assert_eq!(c.status, 0);
    // And it sleeps instead of spinning on the bogus index.
    let before = io.counters().passes;
    std::thread::sleep(Duration::from_millis(200));
    let passes = io.counters().passes - before;
    assert!(
        passes < 50,
        "the iothread spun {passes} passes in 200 ms on a corrupt index"
    );
    // Removal does not hang either.
    assert_eq!(io.remove_device("bad", Duration::from_secs(5)).unwrap(), 1);
}
