//! Tests of the parent module.

// Test data and figures, not guest input.
#![allow(clippy::cast_possible_truncation, clippy::cast_possible_wrap)]

use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};

use super::*;
use crate::bounce::AlignedBuf;
use crate::cache::CacheMode;
use crate::engine::test_util::{
    aligned, disk_with, iovec, open_readonly, poll_in, temp_image, vecs,
};
use crate::engine::{AioKind, IoVecs, create_engine};

fn engine(disk: &Arc<Disk>, threads: usize) -> Box<dyn IoEngine> {
    let options = EngineOptions {
        kind: AioKind::Threads,
        threads,
        ..EngineOptions::default()
    };
    let engine = create_engine(disk, &options).unwrap();
    assert_eq!(engine.name(), "threads");
    engine
}

/// One op's buffer, aligned for O_DIRECT, with its iovecs split at `align` multiples.
struct Buf {
    data: AlignedBuf,
    iovs: Vec<libc::iovec>,
}

impl Buf {
    fn new(len: usize, align: usize, pieces: usize) -> Buf {
        let data = aligned(len);
        let blocks = len / align;
        let mut iovs = Vec::new();
        let mut at = 0;
        for i in 0..pieces {
            let end = if i + 1 == pieces {
                len
            } else {
                (at + (blocks / pieces).max(1) * align).min(len)
            };
            if end > at {
                iovs.push(iovec(&data, at..end));
            }
            at = end;
        }
        Buf { data, iovs }
    }

    fn iovecs(&self) -> IoVecs {
        // The iovecs point into `data`; every test keeps the Buf alive (and its Vec
        // unmodified) until the op is reaped or the engine dropped.
        vecs(&self.iovs)
    }

    fn bytes(&self) -> &[u8] {
        &self.data.as_slice()[..self.iovs.iter().map(|v| v.iov_len).sum::<usize>()]
    }
}

/// Waits on the notifier (failing if it stays silent for 10 s) and reaps until `n`
/// completions came back.
fn wait(engine: &mut dyn IoEngine, n: usize) -> Vec<(u64, i64)> {
    let mut out = Vec::new();
    while out.len() < n {
        let rc = poll_in(engine.notifier(), 10_000);
        assert_eq!(rc, 1, "notifier silent with {} of {n} done", out.len());
        engine.reap(&mut |tag, res| out.push((tag, res)));
    }
    assert_eq!(out.len(), n);
    out
}

fn run_one(engine: &mut dyn IoEngine, op: EngineOp) -> i64 {
    // SAFETY: the caller keeps the op's buffers alive; we wait for the completion.
    unsafe { engine.push(7, op) };
    engine.submit().unwrap();
    let done = wait(engine, 1);
    assert_eq!(done[0].0, 7);
    assert_eq!(engine.in_flight(), 0);
    done[0].1
}

#[test]
fn random_writes_read_back_buffered_and_direct() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x7472_6561_6473);
    for cache in [CacheMode::Writeback, CacheMode::None] {
        let cap = 4usize << 20;
        let mut model = vec![0u8; cap];
        rng.fill(&mut model[..]);
        let (img, disk) = disk_with(&model, cache);
        let align = disk.offset_align().max(512) as usize;
        let mut eng = engine(&disk, 3);
        let quarter = cap / 4;
        for _round in 0..12 {
            // Four writes at once, one per quarter so they cannot overlap.
            let mut bufs = Vec::new();
            for q in 0..4 {
                let len = rng.random_range(1..=64) * align;
                let off = q * quarter + rng.random_range(0..(quarter - len) / align) * align;
                let mut buf = Buf::new(len, align, rng.random_range(1..=3));
                rng.fill(buf.data.as_mut_slice());
                let op = EngineOp::Write {
                    offset: off as u64,
                    iovecs: buf.iovecs(),
                    fua: rng.random_bool(0.3),
                };
                // SAFETY: `bufs` outlives the wait below.
                unsafe { eng.push(q as u64, op) };
                bufs.push((off, buf));
            }
            assert_eq!(eng.in_flight(), 4);
            eng.submit().unwrap();
            for (tag, res) in wait(&mut *eng, 4) {
                let (off, buf) = &bufs[tag as usize];
                assert_eq!(res, buf.bytes().len() as i64, "{cache}");
                model[*off..*off + buf.bytes().len()].copy_from_slice(buf.bytes());
            }
            // Random reads, also four at once.
            let mut reads = Vec::new();
            for q in 0..4u64 {
                let len = rng.random_range(1..=128) * align;
                let off = rng.random_range(0..(cap - len) / align) * align;
                let buf = Buf::new(len, align, rng.random_range(1..=4));
                let op = EngineOp::Read {
                    offset: off as u64,
                    iovecs: buf.iovecs(),
                };
                // SAFETY: `reads` outlives the wait below.
                unsafe { eng.push(q, op) };
                reads.push((off, buf));
            }
            eng.submit().unwrap();
            for (tag, res) in wait(&mut *eng, 4) {
                let (off, buf) = &reads[tag as usize];
                let len = buf.bytes().len();
                assert_eq!(res, len as i64, "{cache}");
                assert!(
                    buf.bytes() == &model[*off..*off + len],
                    "{cache} read at {off}"
                );
            }
        }
        assert_eq!(run_one(&mut *eng, EngineOp::Flush), 0);
        assert!(
            std::fs::read(img.path()).unwrap() == model,
            "{cache}: file != model"
        );
    }
}

#[test]
fn discard_and_write_zeroes_read_back_zeroes() {
    for cache in [CacheMode::Writeback, CacheMode::None] {
        let cap = 2usize << 20;
        let (img, disk) = disk_with(&vec![0xABu8; cap], cache);
        let align = disk.offset_align().max(512) as usize;
        let mut eng = engine(&disk, 2);
        let discard = (64usize << 10, 256usize << 10);
        let zeroes = (1024 * 1024 + align, 40 * align);
        let op = EngineOp::Discard {
            offset: discard.0 as u64,
            len: discard.1 as u64,
        };
        assert_eq!(run_one(&mut *eng, op), 0, "{cache}");
        let op = EngineOp::WriteZeroes {
            offset: zeroes.0 as u64,
            len: zeroes.1 as u64,
        };
        assert_eq!(run_one(&mut *eng, op), 0, "{cache}");
        // Read the whole disk back through the engine.
        let buf = Buf::new(cap, align, 3);
        let op = EngineOp::Read {
            offset: 0,
            iovecs: buf.iovecs(),
        };
        assert_eq!(run_one(&mut *eng, op), cap as i64);
        let zero = |i: usize| {
            (discard.0..discard.0 + discard.1).contains(&i)
                || (zeroes.0..zeroes.0 + zeroes.1).contains(&i)
        };
        for (i, &b) in buf.bytes().iter().enumerate() {
            assert_eq!(b, if zero(i) { 0 } else { 0xAB }, "{cache}: byte {i}");
        }
        assert_eq!(std::fs::metadata(img.path()).unwrap().len(), cap as u64);
    }
}

#[test]
fn read_past_eof_is_short() {
    for cache in [CacheMode::Writeback, CacheMode::None] {
        let cap = 1usize << 20;
        let data: Vec<u8> = (0..cap).map(|i| (i / 512) as u8 ^ 0x3C).collect();
        let (_img, disk) = disk_with(&data, cache);
        let mut eng = engine(&disk, 1);
        let buf = Buf::new(16384, 4096, 2);
        let op = EngineOp::Read {
            offset: (cap - 4096) as u64,
            iovecs: buf.iovecs(),
        };
        assert_eq!(run_one(&mut *eng, op), 4096, "{cache}");
        assert_eq!(buf.bytes()[..4096], data[cap - 4096..]);
        let op = EngineOp::Read {
            offset: cap as u64,
            iovecs: buf.iovecs(),
        };
        assert_eq!(run_one(&mut *eng, op), 0, "{cache}");
    }
}

#[test]
fn many_ops_in_flight_all_complete() {
    const N: usize = 200;
    for cache in [CacheMode::Writeback, CacheMode::None] {
        let (_img, disk) = disk_with(&vec![0u8; N * 4096], cache);
        let mut eng = engine(&disk, 4);
        let pattern = |i: usize, j: usize| (i * 31 + j / 512 * 7 + 1) as u8;
        let mut bufs: Vec<Buf> = (0..N).map(|_| Buf::new(4096, 4096, 1)).collect();
        // Write in a scrambled order so that workers finish out of order.
        for (i, buf) in bufs.iter_mut().enumerate() {
            for (j, b) in buf.data.as_mut_slice().iter_mut().enumerate() {
                *b = pattern(i, j);
            }
            let op = EngineOp::Write {
                offset: (i * 4096) as u64,
                iovecs: buf.iovecs(),
                fua: i % 10 == 0,
            };
            // SAFETY: `bufs` outlives the wait below.
            unsafe { eng.push(i as u64, op) };
        }
        assert_eq!(eng.in_flight(), N);
        eng.submit().unwrap();
        assert_eq!(eng.in_flight(), N);
        let mut seen = [false; N];
        for (tag, res) in wait(&mut *eng, N) {
            assert_eq!(res, 4096, "{cache}: op {tag}");
            assert!(
                !std::mem::replace(&mut seen[tag as usize], true),
                "tag {tag} twice"
            );
        }
        assert_eq!(eng.in_flight(), 0);

        let reads: Vec<Buf> = (0..N).map(|_| Buf::new(4096, 4096, 2)).collect();
        for (i, buf) in reads.iter().enumerate().rev() {
            let op = EngineOp::Read {
                offset: (i * 4096) as u64,
                iovecs: buf.iovecs(),
            };
            // SAFETY: `reads` outlives the wait below.
            unsafe { eng.push(i as u64, op) };
        }
        eng.submit().unwrap();
        for (tag, res) in wait(&mut *eng, N) {
            assert_eq!(res, 4096);
            let i = tag as usize;
            let bytes = reads[i].bytes();
            assert!(
                bytes.iter().enumerate().all(|(j, &b)| b == pattern(i, j)),
                "{i}"
            );
        }
    }
}

#[test]
fn fua_write_and_flush() {
    for cache in [CacheMode::Writeback, CacheMode::None] {
        let (img, disk) = disk_with(&vec![0u8; 64 << 10], cache);
        let mut eng = engine(&disk, 2);
        let mut buf = Buf::new(8192, 4096, 2);
        buf.data.as_mut_slice().fill(0xF7);
        let op = EngineOp::Write {
            offset: 8192,
            iovecs: buf.iovecs(),
            fua: true,
        };
        assert_eq!(run_one(&mut *eng, op), 8192, "{cache}");
        assert_eq!(run_one(&mut *eng, EngineOp::Flush), 0, "{cache}");
        let back = std::fs::read(img.path()).unwrap();
        assert!(back[..8192].iter().all(|&b| b == 0));
        assert!(back[8192..16384].iter().all(|&b| b == 0xF7));
        assert!(back[16384..].iter().all(|&b| b == 0));
    }
}

#[test]
fn drop_with_ops_in_flight_neither_hangs_nor_crashes() {
    let (_img, disk) = disk_with(&vec![0u8; 8 << 20], CacheMode::None);
    let bufs: Vec<Buf> = (0..64).map(|_| Buf::new(128 << 10, 4096, 2)).collect();
    let mut eng = engine(&disk, 2);
    for (i, buf) in bufs.iter().enumerate() {
        let op = EngineOp::Write {
            offset: (i as u64) * (128 << 10),
            iovecs: buf.iovecs(),
            fua: true,
        };
        // SAFETY: `bufs` is declared before the engine, so it outlives it.
        unsafe { eng.push(i as u64, op) };
        // SAFETY: no buffers.
        unsafe { eng.push(1000 + i as u64, EngineOp::Flush) };
    }
    eng.submit().unwrap();
    // Some staged but never submitted, too.
    // SAFETY: no buffers.
    unsafe { eng.push(5000, EngineOp::Flush) };
    assert_eq!(eng.in_flight(), 129);
    let start = Instant::now();
    drop(eng);
    assert!(
        start.elapsed() < Duration::from_secs(20),
        "drop took too long"
    );
    // Every worker has exited: only our own reference to the disk is left.
    assert_eq!(Arc::strong_count(&disk), 1);
}

/// As `wait`, for a bare pool whose owner watches `fd`.
fn wait_pool(pool: &mut WorkerPool, fd: &EventFd, n: usize) -> Vec<(u64, i64)> {
    let mut out = Vec::new();
    while out.len() < n {
        assert_eq!(poll_in(fd, 10_000), 1, "notifier silent");
        // Clear first, as owners must.
        let _ = fd.read();
        pool.reap_completions(&mut |t, r| out.push((t, r)));
    }
    assert_eq!(out.len(), n);
    out
}

#[test]
fn pool_with_a_shared_notifier_reports_errors_as_completions() {
    let img = temp_image(&[3u8; 8192]);
    let disk = open_readonly(img.path(), CacheMode::Writeback);
    assert!(matches!(
        WorkerPool::new(disk.clone(), 0, crate::engine::new_notifier().unwrap()),
        Err(Error::InvalidOption(_))
    ));
    let owner_fd = crate::engine::new_notifier().unwrap();
    let mut pool = WorkerPool::new(disk.clone(), 2, owner_fd.try_clone().unwrap()).unwrap();
    let buf = Buf::new(4096, 4096, 1);
    let write = EngineOp::Write {
        offset: 0,
        iovecs: buf.iovecs(),
        fua: false,
    };
    let read = EngineOp::Read {
        offset: 4096,
        iovecs: buf.iovecs(),
    };
    // SAFETY: `buf` outlives the pool's ops (we wait below).
    unsafe {
        pool.push(1, write);
        pool.push(
            2,
            EngineOp::Discard {
                offset: 0,
                len: 4096,
            },
        );
    }
    assert_eq!(pool.in_flight(), 2);
    pool.submit();
    let mut got = wait_pool(&mut pool, &owner_fd, 2);
    got.sort_unstable();
    let ebadf = -i64::from(libc::EBADF);
    assert_eq!(got, [(1, ebadf), (2, ebadf)]);
    assert_eq!(pool.in_flight(), 0);
    // A read after the failed ones works, and the buffer gets the file's data.
    // SAFETY: as above.
    unsafe { pool.push(3, read) };
    pool.submit();
    let got = wait_pool(&mut pool, &owner_fd, 1);
    assert_eq!(got, [(3, 4096)]);
    assert!(buf.bytes().iter().all(|&b| b == 3));
}
