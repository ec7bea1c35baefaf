//! Tests of the io_uring engine on real temp files, buffered and O_DIRECT.

// Test data and figures, not guest input.
#![allow(clippy::cast_possible_truncation, clippy::cast_possible_wrap)]

use std::collections::HashMap;
use std::io::Write as _;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::*;
use crate::bounce::AlignedBuf;
use crate::cache::CacheMode;
use crate::engine::test_util::{
    aligned, filled, iovec, open_disk, open_readonly, poll_in, random, vecs,
};

mod fallback;
mod polled;

/// Splits `buf[..]` into 1..=4 iovecs at random multiples of `unit`.
fn split(buf: &AlignedBuf, unit: usize, rng: &mut StdRng) -> Vec<libc::iovec> {
    let units = buf.len() / unit;
    let parts = rng.random_range(1..=4usize).min(units);
    let mut cuts: Vec<usize> = (0..parts - 1)
        .map(|_| rng.random_range(1..units) * unit)
        .collect();
    cuts.sort_unstable();
    cuts.dedup();
    let mut iovs = Vec::new();
    let mut start = 0;
    for cut in cuts.into_iter().chain([buf.len()]) {
        iovs.push(iovec(buf, start..cut));
        start = cut;
    }
    iovs
}

fn image_in(dir: &Path, contents: &[u8]) -> tempfile::NamedTempFile {
    let mut file = tempfile::NamedTempFile::new_in(dir).unwrap();
    file.write_all(contents).unwrap();
    file.as_file().sync_all().unwrap();
    file
}

fn engine(disk: &Arc<Disk>, queue_depth: u32, max_batch: u32) -> UringEngine {
    let options = EngineOptions {
        queue_depth,
        max_batch,
        ..EngineOptions::default()
    };
    UringEngine::create(disk.clone(), &options).unwrap()
}

/// Submits, then waits on the notifier and reaps (submitting again after each reap, for
/// the backlog) until nothing is in flight. Every wait must be ended by the notifier.
fn drain(engine: &mut UringEngine) -> HashMap<u64, i64> {
    let mut results = HashMap::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    engine.submit().unwrap();
    while engine.in_flight() > 0 {
        let rc = poll_in(engine.notifier(), 5000);
        assert_eq!(
            rc,
            1,
            "notifier not signalled: staged {}, in ring {}, for the pool {}, ready {}, in the pool {}",
            engine.staged.len(),
            engine.in_ring,
            engine.pool_staged.len(),
            engine.ready.len(),
            engine.pool.as_ref().map_or(0, WorkerPool::in_flight)
        );
        engine.reap(&mut |tag, result| {
            assert!(
                results.insert(tag, result).is_none(),
                "tag {tag:#x} completed twice"
            );
        });
        engine.submit().unwrap();
        assert!(
            Instant::now() < deadline,
            "timed out, {} in flight",
            engine.in_flight()
        );
    }
    results
}

/// Runs one op alone and returns its result.
fn run_one(engine: &mut UringEngine, op: EngineOp) -> i64 {
    const TAG: u64 = 0xfeed_f00d_dead_beef;
    // SAFETY: callers keep the op's buffers alive until `drain` returns.
    unsafe { engine.push(TAG, op) };
    let results = drain(engine);
    assert_eq!(results.len(), 1);
    results[&TAG]
}

/// Random writes (one per region, 512-aligned offsets and lengths, split into 1..=4
/// iovecs) then reads with other random splits; the disk must match a model byte for byte.
fn random_rw(cache: CacheMode, seed: u64) {
    const SIZE: usize = 4 << 20;
    const REGIONS: usize = 32;
    let img = image_in(&std::env::temp_dir(), &vec![0u8; SIZE]);
    let disk = open_disk(img.path(), cache);
    let unit = [512, disk.offset_align(), disk.mem_align()]
        .into_iter()
        .max()
        .unwrap() as usize;
    let mut eng = engine(&disk, 16, 8);
    let mut rng = StdRng::seed_from_u64(seed);
    let mut model = vec![0u8; SIZE];
    let region = SIZE / REGIONS;
    for round in 0..3u64 {
        let mut bufs = Vec::new();
        let mut iovs = Vec::new();
        let mut expect = HashMap::new();
        for r in 0..REGIONS {
            let units = rng.random_range(1..=region / unit / 2);
            let start = rng.random_range(0..=region / unit - units);
            let offset = r * region + start * unit;
            let buf = random(units * unit, &mut rng);
            model[offset..offset + buf.len()].copy_from_slice(buf.as_slice());
            let tag = (round << 40) | (r as u64) | (1 << 63);
            iovs.push(split(&buf, unit, &mut rng));
            expect.insert(tag, buf.len() as i64);
            let op = EngineOp::Write {
                offset: offset as u64,
                iovecs: vecs(iovs.last().unwrap()),
                fua: false,
            };
            // SAFETY: `bufs` and `iovs` outlive `drain` below.
            unsafe { eng.push(tag, op) };
            bufs.push(buf);
        }
        assert_eq!(drain(&mut eng), expect, "{cache}: write results");
    }
    // Read everything back through the engine, regions split differently.
    let mut bufs = Vec::new();
    let mut iovs = Vec::new();
    for r in 0..REGIONS {
        let buf = filled(region, 0x5a);
        iovs.push(split(&buf, unit, &mut rng));
        let op = EngineOp::Read {
            offset: (r * region) as u64,
            iovecs: vecs(iovs.last().unwrap()),
        };
        // SAFETY: `bufs` and `iovs` outlive `drain` below.
        unsafe { eng.push(r as u64, op) };
        bufs.push(buf);
    }
    let results = drain(&mut eng);
    for (r, buf) in bufs.iter().enumerate() {
        assert_eq!(results[&(r as u64)], region as i64, "{cache}: read {r}");
        assert!(
            buf.as_slice() == &model[r * region..(r + 1) * region],
            "{cache}: region {r} reads back different data"
        );
    }
    drop(eng);
    drop(disk);
    assert!(
        std::fs::read(img.path()).unwrap() == model,
        "{cache}: file differs from model"
    );
}

#[test]
fn random_writes_read_back_buffered() {
    random_rw(CacheMode::Writeback, 1);
}

#[test]
fn random_writes_read_back_direct() {
    random_rw(CacheMode::None, 2);
}

/// The raw SQE fields tests look at: (opcode, fd, off, addr, len, op_flags).
fn fields(entry: squeue::Entry) -> (u8, i32, u64, u64, u32, u32) {
    // SAFETY: `squeue::Entry` is `repr(C)` around the 64-byte `io_uring_sqe`.
    let raw: [u8; 64] = unsafe { std::mem::transmute(entry) };
    let u32_at = |i: usize| u32::from_ne_bytes(raw[i..i + 4].try_into().unwrap());
    let u64_at = |i: usize| u64::from_ne_bytes(raw[i..i + 8].try_into().unwrap());
    (
        raw[0],
        u32_at(4).cast_signed(),
        u64_at(8),
        u64_at(16),
        u32_at(24),
        u32_at(28),
    )
}

#[test]
fn ops_map_to_the_right_sqes() {
    let buf = aligned(8192);
    let base = buf.as_ptr() as u64;
    let one = [iovec(&buf, 0..8192)];
    let two = [iovec(&buf, 0..4096), iovec(&buf, 4096..8192)];
    let dsync = libc::RWF_DSYNC as u32;
    let read1 = sqe_for(&EngineOp::Read {
        offset: 512,
        iovecs: vecs(&one),
    });
    assert_eq!(fields(read1), (opcode::Read::CODE, 0, 512, base, 8192, 0));
    let read2 = sqe_for(&EngineOp::Read {
        offset: 1024,
        iovecs: vecs(&two),
    });
    let two_addr = two.as_ptr() as u64;
    assert_eq!(
        fields(read2),
        (opcode::Readv::CODE, 0, 1024, two_addr, 2, 0)
    );
    let write1 = sqe_for(&EngineOp::Write {
        offset: 0,
        iovecs: vecs(&one),
        fua: true,
    });
    assert_eq!(
        fields(write1),
        (opcode::Write::CODE, 0, 0, base, 8192, dsync)
    );
    let write1 = sqe_for(&EngineOp::Write {
        offset: 0,
        iovecs: vecs(&one),
        fua: false,
    });
    assert_eq!(fields(write1), (opcode::Write::CODE, 0, 0, base, 8192, 0));
    let write2 = sqe_for(&EngineOp::Write {
        offset: 4096,
        iovecs: vecs(&two),
        fua: true,
    });
    assert_eq!(
        fields(write2),
        (opcode::Writev::CODE, 0, 4096, two_addr, 2, dsync)
    );
    let flush = fields(sqe_for(&EngineOp::Flush));
    assert_eq!(
        (flush.0, flush.5),
        (
            opcode::Fsync::CODE,
            io_uring::types::FsyncFlags::DATASYNC.bits()
        )
    );
    // Fallocate: length in addr, mode in len.
    let keep = libc::FALLOC_FL_KEEP_SIZE as u32;
    let discard = sqe_for(&EngineOp::Discard {
        offset: 4096,
        len: 1 << 33,
    });
    let punch = libc::FALLOC_FL_PUNCH_HOLE as u32 | keep;
    assert_eq!(
        fields(discard),
        (opcode::Fallocate::CODE, 0, 4096, 1 << 33, punch, 0)
    );
    let zeroes = sqe_for(&EngineOp::WriteZeroes {
        offset: 512,
        len: 1024,
    });
    let zero = libc::FALLOC_FL_ZERO_RANGE as u32 | keep;
    assert_eq!(
        fields(zeroes),
        (opcode::Fallocate::CODE, 0, 512, 1024, zero, 0)
    );
    // Every op uses the registered file.
    // SAFETY: as `fields`.
    let raw: [u8; 64] = unsafe { std::mem::transmute(sqe_for(&EngineOp::Flush)) };
    assert_ne!(raw[1] & squeue::Flags::FIXED_FILE.bits(), 0);
}

#[test]
fn flush_and_fua_writes_complete() {
    for cache in [CacheMode::Writeback, CacheMode::None] {
        let img = image_in(&std::env::temp_dir(), &[0u8; 65536]);
        let disk = open_disk(img.path(), cache);
        let mut eng = engine(&disk, 8, 8);
        let buf = filled(4096, 0xc3);
        let iov = [iovec(&buf, 0..4096)];
        let op = EngineOp::Write {
            offset: 8192,
            iovecs: vecs(&iov),
            fua: true,
        };
        assert_eq!(run_one(&mut eng, op), 4096, "{cache}: FUA write");
        assert_eq!(run_one(&mut eng, EngineOp::Flush), 0, "{cache}: flush");
        let data = std::fs::read(img.path()).unwrap();
        assert!(data[8192..12288].iter().all(|&b| b == 0xc3), "{cache}");
        assert!(
            data[..8192].iter().chain(&data[12288..]).all(|&b| b == 0),
            "{cache}"
        );
    }
}

/// Writes 100 distinct 512-byte blocks through a ring of 4, then reads them back.
#[test]
fn backlog_beyond_queue_depth_completes_in_order_of_room() {
    const OPS: usize = 100;
    for cache in [CacheMode::Writeback, CacheMode::None] {
        let img = image_in(&std::env::temp_dir(), &vec![0u8; OPS * 4096]);
        let disk = open_disk(img.path(), cache);
        let mut eng = engine(&disk, 4, 32);
        let bufs: Vec<AlignedBuf> = (0..OPS).map(|i| filled(512, i as u8 + 1)).collect();
        let iovs: Vec<[libc::iovec; 1]> = bufs.iter().map(|b| [iovec(b, 0..512)]).collect();
        for (i, iov) in iovs.iter().enumerate() {
            let op = EngineOp::Write {
                offset: (i * 4096) as u64,
                iovecs: vecs(iov),
                fua: false,
            };
            // SAFETY: `bufs`/`iovs` outlive the engine's work (drained below).
            unsafe { eng.push(u64::MAX - i as u64, op) };
        }
        eng.submit().unwrap();
        assert_eq!(
            eng.stats().sqes,
            4,
            "{cache}: only queue_depth ops enter the ring"
        );
        assert_eq!(eng.stats().enters, 1, "{cache}");
        assert_eq!(eng.in_flight(), OPS, "{cache}");
        let results = drain(&mut eng);
        assert_eq!(results.len(), OPS);
        assert!(
            results.iter().all(|(_, &r)| r == 512),
            "{cache}: {results:?}"
        );
        assert_eq!(eng.stats().sqes, OPS as u64);

        let reads: Vec<AlignedBuf> = (0..OPS).map(|_| aligned(512)).collect();
        let riovs: Vec<[libc::iovec; 1]> = reads.iter().map(|b| [iovec(b, 0..512)]).collect();
        for (i, iov) in riovs.iter().enumerate() {
            // SAFETY: as above.
            unsafe {
                eng.push(
                    i as u64,
                    EngineOp::Read {
                        offset: (i * 4096) as u64,
                        iovecs: vecs(iov),
                    },
                )
            };
        }
        let results = drain(&mut eng);
        for (i, buf) in reads.iter().enumerate() {
            assert_eq!(results[&(i as u64)], 512);
            assert!(
                buf.as_slice().iter().all(|&b| b == i as u8 + 1),
                "{cache}: block {i}"
            );
        }
    }
}

#[test]
fn batches_of_max_batch_per_enter() {
    let img = image_in(&std::env::temp_dir(), &vec![7u8; 64 * 4096]);
    let disk = open_disk(img.path(), CacheMode::Writeback);
    for (max_batch, enters) in [(32, 2), (64, 1), (5, 13)] {
        let mut eng = engine(&disk, 128, max_batch);
        let bufs: Vec<AlignedBuf> = (0..64).map(|_| aligned(4096)).collect();
        let iovs: Vec<[libc::iovec; 1]> = bufs.iter().map(|b| [iovec(b, 0..4096)]).collect();
        for (i, iov) in iovs.iter().enumerate() {
            // SAFETY: `bufs`/`iovs` outlive `drain`.
            unsafe {
                eng.push(
                    i as u64,
                    EngineOp::Read {
                        offset: (i * 4096) as u64,
                        iovecs: vecs(iov),
                    },
                )
            };
        }
        let before = eng.stats();
        eng.submit().unwrap();
        let after = eng.stats();
        assert_eq!(
            after.enters - before.enters,
            enters,
            "max_batch {max_batch}"
        );
        assert_eq!(after.sqes - before.sqes, 64, "max_batch {max_batch}");
        let results = drain(&mut eng);
        assert!((0..64).all(|i| results[&i] == 4096), "{results:?}");
        assert!(bufs.iter().all(|b| b.as_slice().iter().all(|&x| x == 7)));
        // Nothing left to submit: no further syscalls.
        let idle = eng.stats();
        eng.submit().unwrap();
        assert_eq!(eng.stats(), idle);
    }
}

#[test]
fn sqpoll_reads_and_writes() {
    let img = image_in(&std::env::temp_dir(), &vec![0u8; 65536]);
    let disk = open_disk(img.path(), CacheMode::Writeback);
    let options = EngineOptions {
        queue_depth: 16,
        sqpoll_idle_ms: Some(20),
        ..EngineOptions::default()
    };
    let mut eng = match UringEngine::create(disk.clone(), &options) {
        Err(Error::EngineSetup { source, .. }) if source.raw_os_error() == Some(libc::EPERM) => {
            eprintln!("skipped: SQPOLL not permitted here ({source})");
            return;
        }
        other => other.unwrap(),
    };
    assert!(eng.ring.params().is_setup_sqpoll());
    for round in 0..2u8 {
        let bufs: Vec<AlignedBuf> = (0..8).map(|i| filled(4096, round * 16 + i + 1)).collect();
        let iovs: Vec<[libc::iovec; 1]> = bufs.iter().map(|b| [iovec(b, 0..4096)]).collect();
        for (i, iov) in iovs.iter().enumerate() {
            let op = EngineOp::Write {
                offset: (i * 8192) as u64,
                iovecs: vecs(iov),
                fua: false,
            };
            // SAFETY: `bufs`/`iovs` outlive `drain`.
            unsafe { eng.push(i as u64, op) };
        }
        assert!(drain(&mut eng).values().all(|&r| r == 4096));
        let reads: Vec<AlignedBuf> = (0..8).map(|_| aligned(4096)).collect();
        let riovs: Vec<[libc::iovec; 1]> = reads.iter().map(|b| [iovec(b, 0..4096)]).collect();
        for (i, iov) in riovs.iter().enumerate() {
            // SAFETY: as above.
            unsafe {
                eng.push(
                    i as u64,
                    EngineOp::Read {
                        offset: (i * 8192) as u64,
                        iovecs: vecs(iov),
                    },
                )
            };
        }
        assert!(drain(&mut eng).values().all(|&r| r == 4096));
        for (i, buf) in reads.iter().enumerate() {
            assert!(
                buf.as_slice()
                    .iter()
                    .all(|&b| b == round * 16 + i as u8 + 1),
                "round {round} op {i}"
            );
        }
        // Let the polling thread fall asleep, so the next round needs a wake-up.
        std::thread::sleep(Duration::from_millis(60));
    }
}

#[test]
fn reads_past_eof_are_short_not_errors() {
    const SIZE: usize = 65536;
    for cache in [CacheMode::Writeback, CacheMode::None] {
        let img = image_in(&std::env::temp_dir(), &vec![0x42u8; SIZE]);
        let disk = open_disk(img.path(), cache);
        let mut eng = engine(&disk, 8, 8);
        let buf = filled(8192, 0x99);
        let iov = [iovec(&buf, 0..8192)];
        let straddling = EngineOp::Read {
            offset: (SIZE - 4096) as u64,
            iovecs: vecs(&iov),
        };
        assert_eq!(run_one(&mut eng, straddling), 4096, "{cache}");
        assert!(buf.as_slice()[..4096].iter().all(|&b| b == 0x42), "{cache}");
        let beyond = EngineOp::Read {
            offset: (SIZE + 4096) as u64,
            iovecs: vecs(&iov),
        };
        assert_eq!(run_one(&mut eng, beyond), 0, "{cache}");
    }
}

/// The ring runs only the engine's operations on its registered file: anything else (an
/// open, a no-op, a read by plain descriptor) completes with EACCES, while the engine's
/// own reads go on.
#[test]
fn the_ring_refuses_operations_the_engine_does_not_submit() {
    let img = image_in(&std::env::temp_dir(), &[0x42u8; 8192]);
    let disk = open_disk(img.path(), CacheMode::Writeback);
    let mut eng = engine(&disk, 8, 8);
    let path = c"/etc/hostname";
    let buf = filled(4096, 0);
    let foreign = [
        opcode::OpenAt::new(types::Fd(libc::AT_FDCWD), path.as_ptr())
            .build()
            .user_data(1),
        opcode::Nop::new().build().user_data(2),
        opcode::Read::new(
            types::Fd(disk.fd()),
            buf.as_slice().as_ptr().cast_mut(),
            4096,
        )
        .build()
        .user_data(3),
    ];
    for sqe in &foreign {
        // SAFETY: the path and the buffer outlive the submission, which is reaped below.
        unsafe { eng.ring.submission().push(sqe).unwrap() };
    }
    eng.ring.submit_and_wait(foreign.len()).unwrap();
    let mut results: Vec<(u64, i32)> = eng
        .ring
        .completion()
        .map(|c| (c.user_data(), c.result()))
        .collect();
    results.sort_unstable();
    assert_eq!(
        results,
        [(1, -libc::EACCES), (2, -libc::EACCES), (3, -libc::EACCES)]
    );
    let iov = [iovec(&buf, 0..4096)];
    let read = EngineOp::Read {
        offset: 0,
        iovecs: vecs(&iov),
    };
    assert_eq!(run_one(&mut eng, read), 4096);
    assert!(buf.as_slice().iter().all(|&b| b == 0x42));
}
