//! Tests of the native engine on real O_DIRECT temp files.

// Test data and figures, not guest input.
#![allow(clippy::cast_possible_wrap)]

use std::collections::HashMap;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::*;
use crate::bounce::AlignedBuf;
use crate::cache::CacheMode;
use crate::engine::test_util::{
    aligned, iovec, open_disk, open_readonly, poll_in, random, tmp_dir, vecs,
};
use crate::engine::{AioKind, create_engine};

/// A temp image of `len` bytes and the disk opened on it with `cache`.
fn image(len: u64, cache: CacheMode) -> (tempfile::NamedTempFile, Arc<Disk>) {
    let f = tempfile::NamedTempFile::new_in(tmp_dir()).unwrap();
    f.as_file().set_len(len).unwrap();
    let disk = open_disk(f.path(), cache);
    (f, disk)
}

fn options(depth: u32, batch: u32) -> EngineOptions {
    EngineOptions {
        kind: AioKind::Native,
        queue_depth: depth,
        max_batch: batch,
        ..EngineOptions::default()
    }
}

fn engine(disk: &Arc<Disk>, depth: u32, batch: u32) -> AioEngine {
    AioEngine::create(disk.clone(), &options(depth, batch)).unwrap()
}

/// Polls the notifier, reaps and resubmits until `n` completions came back.
fn wait_for(e: &mut dyn IoEngine, n: usize) -> HashMap<u64, i64> {
    let mut got = HashMap::new();
    // Generous: flushes on a busy shared VM disk can take seconds.
    let deadline = Instant::now() + Duration::from_secs(60);
    while got.len() < n {
        assert!(
            Instant::now() < deadline,
            "only {} of {n} completions came",
            got.len()
        );
        let rc = poll_in(e.notifier(), 1000);
        assert!(rc >= 0, "poll: {}", std::io::Error::last_os_error());
        if rc == 0 {
            continue;
        }
        e.reap(&mut |tag, res| {
            assert!(got.insert(tag, res).is_none(), "tag {tag} completed twice");
        });
        e.submit().unwrap();
    }
    assert_eq!(e.in_flight(), 0);
    got
}

/// Pushes one op and waits for its result.
///
/// # Safety
/// The buffers of `op` must stay valid for the call.
unsafe fn run_one(e: &mut dyn IoEngine, op: EngineOp) -> i64 {
    // SAFETY: forwarded from the caller.
    unsafe { e.push(7, op) };
    e.submit().unwrap();
    wait_for(e, 1)[&7]
}

fn read_op(offset: u64, iovs: &[libc::iovec]) -> EngineOp {
    EngineOp::Read {
        offset,
        iovecs: vecs(iovs),
    }
}

fn write_op(offset: u64, iovs: &[libc::iovec], fua: bool) -> EngineOp {
    EngineOp::Write {
        offset,
        iovecs: vecs(iovs),
        fua,
    }
}

/// The file's bytes at `offset`, read through an independent buffered descriptor.
fn file_bytes(f: &tempfile::NamedTempFile, offset: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    std::fs::File::open(f.path())
        .unwrap()
        .read_exact_at(&mut v, offset)
        .unwrap();
    v
}

#[test]
fn writeback_is_refused_with_a_clear_message() {
    for cache in [
        CacheMode::Writeback,
        CacheMode::Writethrough,
        CacheMode::Unsafe,
    ] {
        let (_f, disk) = image(1 << 20, cache);
        let err = AioEngine::new(disk.clone(), &options(8, 8)).err().unwrap();
        assert!(
            matches!(err, Error::NativeNeedsDirect { cache: c } if c == cache),
            "{err}"
        );
        let msg = err.to_string();
        assert!(
            msg.contains("O_DIRECT") && msg.contains(&format!("cache={cache}")),
            "{msg}"
        );
        assert!(matches!(
            create_engine(&disk, &options(8, 8)),
            Err(Error::NativeNeedsDirect { .. })
        ));
    }
}

#[test]
fn builds_iocbs_per_op_kind() {
    let (_f, disk) = image(1 << 20, CacheMode::None);
    let e = engine(&disk, 8, 8);
    let buf = aligned(8192);
    let one = [iovec(&buf, 0..4096)];
    let two = [iovec(&buf, 0..4096), iovec(&buf, 4096..8192)];
    let check = |plan: Plan, opcode: u16, rw_flags: i32| -> Iocb {
        let Plan::Kernel(iocb) = plan else {
            panic!("expected a kernel op")
        };
        assert_eq!(iocb.aio_lio_opcode, opcode);
        assert_eq!(iocb.aio_rw_flags, rw_flags);
        assert_eq!(iocb.aio_fildes, disk.fd().cast_unsigned());
        assert_eq!(iocb.aio_flags, abi::IOCB_FLAG_RESFD);
        assert_eq!(iocb.aio_resfd, e.notifier().as_raw_fd().cast_unsigned());
        iocb
    };
    let r = check(e.plan(&read_op(512, &one)), abi::IOCB_CMD_PREAD, 0);
    assert_eq!(
        (r.aio_buf, r.aio_nbytes, r.aio_offset),
        (buf.as_ptr() as u64, 4096, 512)
    );
    let w = check(
        e.plan(&write_op(4096, &two, false)),
        abi::IOCB_CMD_PWRITEV,
        0,
    );
    assert_eq!((w.aio_buf, w.aio_nbytes), (two.as_ptr() as u64, 2));
    check(
        e.plan(&write_op(0, &one, true)),
        abi::IOCB_CMD_PWRITE,
        libc::RWF_DSYNC,
    );
    check(e.plan(&read_op(0, &two)), abi::IOCB_CMD_PREADV, 0);
    check(e.plan(&EngineOp::Flush), abi::IOCB_CMD_FDSYNC, 0);
    assert!(matches!(
        e.plan(&EngineOp::Discard {
            offset: 0,
            len: 4096
        }),
        Plan::Pool
    ));
    assert!(matches!(
        e.plan(&EngineOp::WriteZeroes {
            offset: 0,
            len: 4096
        }),
        Plan::Pool
    ));
    assert!(matches!(e.plan(&read_op(u64::MAX - 4095, &one)), Plan::Fail(r) if r == -22));
}

/// Every op kind, in both O_DIRECT cache modes, with data checked byte for byte.
#[test]
fn every_op_kind_round_trips() {
    for cache in [CacheMode::None, CacheMode::Directsync] {
        let (f, disk) = image(1 << 20, cache);
        let mut e = engine(&disk, 16, 16);
        let mut rng = StdRng::seed_from_u64(1);
        let e: &mut dyn IoEngine = &mut e;
        assert_eq!(e.name(), "native");

        let data = random(64 * 1024, &mut rng);
        let iov = [iovec(&data, 0..data.len())];
        // SAFETY: `data` and `iov` live until run_one returns.
        assert_eq!(unsafe { run_one(e, write_op(0, &iov, false)) }, 65536);
        // SAFETY: a flush carries no buffers.
        assert_eq!(unsafe { run_one(e, EngineOp::Flush) }, 0);
        let back = aligned(64 * 1024);
        let biov = [iovec(&back, 0..back.len())];
        // SAFETY: `back` and `biov` live until run_one returns.
        assert_eq!(unsafe { run_one(e, read_op(0, &biov)) }, 65536);
        assert_eq!(back.as_slice(), data.as_slice());
        assert_eq!(file_bytes(&f, 0, 65536), data.as_slice());

        // FUA write.
        let fua = random(8192, &mut rng);
        let fiov = [iovec(&fua, 0..8192)];
        assert_eq!(
            // SAFETY: `fua` and `fiov` live until run_one returns.
            unsafe { run_one(e, write_op(128 * 1024, &fiov, true)) },
            8192
        );
        assert_eq!(file_bytes(&f, 128 * 1024, 8192), fua.as_slice());

        // Discard and write-zeroes read back as zeroes; neighbours untouched.
        let discard = EngineOp::Discard {
            offset: 8192,
            len: 16384,
        };
        let zeroes = EngineOp::WriteZeroes {
            offset: 32768,
            len: 8192,
        };
        // SAFETY: a discard carries no buffers.
        assert_eq!(unsafe { run_one(e, discard) }, 0);
        // SAFETY: write-zeroes carries no buffers.
        assert_eq!(unsafe { run_one(e, zeroes) }, 0);
        // SAFETY: `back` and `biov` live until run_one returns.
        assert_eq!(unsafe { run_one(e, read_op(0, &biov)) }, 65536);
        let mut expect = data.as_slice().to_vec();
        expect[8192..24576].fill(0);
        expect[32768..40960].fill(0);
        assert!(
            back.as_slice() == expect.as_slice(),
            "discard/write-zeroes mismatch"
        );
        // Reads past the end are short.
        let tail = [iovec(&back, 0..8192)];
        assert_eq!(
            // SAFETY: `back` and `tail` live until run_one returns.
            unsafe { run_one(e, read_op((1 << 20) - 4096, &tail)) },
            4096
        );
    }
}

/// Writes of random 512-aligned offsets and lengths, all in flight at once, read back.
#[test]
fn random_aligned_data_reads_back_exactly() {
    for cache in [CacheMode::None, CacheMode::Directsync] {
        const REGIONS: u64 = 32;
        const REGION: u64 = 128 * 1024;
        let (f, disk) = image(REGIONS * REGION, cache);
        let mut e = engine(&disk, 64, 32);
        let mut rng = StdRng::seed_from_u64(0xA10 + cache as u64);
        let mut ops = Vec::new();
        for r in 0..REGIONS {
            let len = rng.random_range(1..=128) * 512;
            let off = r * REGION + rng.random_range(0..=(REGION - len as u64) / 512) * 512;
            let buf = random(len, &mut rng);
            let iov = [iovec(&buf, 0..len)];
            ops.push((off, buf, iov));
        }
        for (i, (off, _, iov)) in ops.iter().enumerate() {
            // SAFETY: `ops` holds the buffers and iovecs until everything is reaped.
            unsafe { e.push(i as u64, write_op(*off, iov, false)) };
        }
        e.submit().unwrap();
        let res = wait_for(&mut e, ops.len());
        for (i, (off, buf, _)) in ops.iter().enumerate() {
            assert_eq!(res[&(i as u64)], buf.len() as i64);
            assert!(
                file_bytes(&f, *off, buf.len()) == buf.as_slice(),
                "region {i}"
            );
        }
        let backs: Vec<(AlignedBuf, [libc::iovec; 1])> = ops
            .iter()
            .map(|(_, b, _)| {
                let back = aligned(b.len());
                let iov = [iovec(&back, 0..b.len())];
                (back, iov)
            })
            .collect();
        for (i, ((off, _, _), (_, iov))) in ops.iter().zip(&backs).enumerate() {
            // SAFETY: `backs` outlives the reads.
            unsafe { e.push(i as u64, read_op(*off, iov)) };
        }
        e.submit().unwrap();
        let res = wait_for(&mut e, ops.len());
        for (i, ((_, buf, _), (back, _))) in ops.iter().zip(&backs).enumerate() {
            assert_eq!(res[&(i as u64)], buf.len() as i64);
            assert!(back.as_slice() == buf.as_slice(), "read back region {i}");
        }
    }
}

#[test]
fn multi_iovec_ops() {
    let (f, disk) = image(1 << 20, CacheMode::None);
    let mut e = engine(&disk, 8, 8);
    let mut rng = StdRng::seed_from_u64(3);
    let a = random(4096, &mut rng);
    let b = random(8192, &mut rng);
    let c = random(512, &mut rng);
    let wiov = [iovec(&a, 0..4096), iovec(&b, 0..8192), iovec(&c, 0..512)];
    assert_eq!(
        // SAFETY: `a`, `b`, `c` and `wiov` live until run_one returns.
        unsafe { run_one(&mut e, write_op(4096, &wiov, false)) },
        12800
    );
    let mut expect = a.as_slice().to_vec();
    expect.extend_from_slice(b.as_slice());
    expect.extend_from_slice(c.as_slice());
    assert_eq!(file_bytes(&f, 4096, 12800), expect);

    // Read back split differently.
    let x = aligned(1536);
    let y = aligned(12288);
    let riov = [iovec(&x, 0..1536), iovec(&y, 0..11264)];
    // SAFETY: `x`, `y` and `riov` live until run_one returns.
    assert_eq!(unsafe { run_one(&mut e, read_op(4096, &riov)) }, 12800);
    assert_eq!(x.as_slice(), &expect[..1536]);
    assert_eq!(&y.as_slice()[..11264], &expect[1536..]);
    assert!(
        y.as_slice()[11264..].iter().all(|&v| v == 0),
        "read past the iovec"
    );
}

/// More ops than the queue depth: the rest wait in the backlog and all complete.
#[test]
fn backlog_beyond_queue_depth() {
    let (f, disk) = image(1 << 20, CacheMode::None);
    let mut e = engine(&disk, 4, 4);
    let mut rng = StdRng::seed_from_u64(4);
    let bufs: Vec<AlignedBuf> = (0..100).map(|_| random(4096, &mut rng)).collect();
    let iovs: Vec<[libc::iovec; 1]> = bufs.iter().map(|b| [iovec(b, 0..4096)]).collect();
    for (i, iov) in iovs.iter().enumerate() {
        // SAFETY: `bufs` and `iovs` outlive the ops.
        unsafe { e.push(i as u64, write_op(i as u64 * 8192, iov, false)) };
    }
    assert_eq!(e.in_flight(), 100);
    e.submit().unwrap();
    assert_eq!(
        e.stats().iocbs_submitted,
        4,
        "only queue_depth ops go to the kernel"
    );
    assert_eq!(e.in_flight(), 100);
    let res = wait_for(&mut e, 100);
    assert!(res.values().all(|&r| r == 4096), "{res:?}");
    assert_eq!(e.stats().iocbs_submitted, 100);
    for (i, b) in bufs.iter().enumerate() {
        assert!(
            file_bytes(&f, i as u64 * 8192, 4096) == b.as_slice(),
            "op {i}"
        );
    }

    // And 100 reads back through the same small queue.
    let backs: Vec<AlignedBuf> = (0..100).map(|_| aligned(4096)).collect();
    let biovs: Vec<[libc::iovec; 1]> = backs.iter().map(|b| [iovec(b, 0..4096)]).collect();
    for (i, iov) in biovs.iter().enumerate() {
        // SAFETY: as above.
        unsafe { e.push(1000 + i as u64, read_op(i as u64 * 8192, iov)) };
    }
    e.submit().unwrap();
    let res = wait_for(&mut e, 100);
    assert!(res.iter().all(|(t, &r)| *t >= 1000 && r == 4096));
    for (i, (b, back)) in bufs.iter().zip(&backs).enumerate() {
        assert!(back.as_slice() == b.as_slice(), "read {i}");
    }
}

#[test]
fn submits_in_batches_of_max_batch() {
    let (_f, disk) = image(1 << 20, CacheMode::None);
    let mut e = engine(&disk, 64, 16);
    let buf = aligned(64 * 4096);
    let iovs: Vec<[libc::iovec; 1]> = (0..64)
        .map(|i| [iovec(&buf, i * 4096..(i + 1) * 4096)])
        .collect();
    for (i, iov) in iovs.iter().enumerate() {
        // SAFETY: `buf` and `iovs` outlive the ops.
        unsafe { e.push(i as u64, read_op(i as u64 * 4096, iov)) };
    }
    assert_eq!(e.stats().submit_calls, 0, "push makes no syscall");
    e.submit().unwrap();
    assert_eq!(
        e.stats(),
        AioStats {
            submit_calls: 4,
            iocbs_submitted: 64,
            pool_ops: 0
        }
    );
    let res = wait_for(&mut e, 64);
    assert!(res.values().all(|&r| r == 4096));
    e.submit().unwrap();
    assert_eq!(e.stats().submit_calls, 4, "nothing queued, no syscall");
}

/// O_DIRECT with a misaligned buffer (or offset, or length) fails with -EINVAL, without
/// panicking, and does not disturb the ops around it.
#[test]
fn misaligned_buffer_completes_with_einval() {
    let (f, disk) = image(1 << 20, CacheMode::None);
    assert!(disk.mem_align() > 1 && disk.offset_align() >= 512);
    // Allocate the blocks: O_DIRECT reads of a hole just zero memory, aligned or not.
    f.as_file().write_all_at(&[0x5a; 65536], 0).unwrap();
    f.as_file().sync_all().unwrap();
    let mut e = engine(&disk, 8, 8);
    let buf = aligned(32768);
    let good = [iovec(&buf, 0..4096)];
    // Off by one byte and spanning pages: Linux 6.18 tolerates a misaligned address for
    // a segment inside one page, not across pages.
    let bad = [iovec(&buf, 1..4097)];
    let good2 = [iovec(&buf, 16384..20480)];
    let short = [iovec(&buf, 20480..20580)];
    // SAFETY: `buf` and the iovecs outlive the ops.
    unsafe {
        e.push(1, read_op(0, &good));
        e.push(2, read_op(0, &bad));
        e.push(3, write_op(4096, &bad, false));
        e.push(4, read_op(4096, &good2));
        e.push(5, read_op(1, &good2));
        e.push(6, write_op(0, &short, true));
    }
    e.submit().unwrap();
    let res = wait_for(&mut e, 6);
    let einval = -i64::from(libc::EINVAL);
    assert_eq!(res[&1], 4096);
    assert_eq!(res[&2], einval, "misaligned buffer read");
    assert_eq!(res[&3], einval, "misaligned buffer write");
    assert_eq!(res[&4], 4096);
    assert_eq!(res[&5], einval, "misaligned offset");
    assert_eq!(res[&6], einval, "misaligned length");
}

/// An iocb io_submit itself refuses (here: too many iovecs) completes with the errno via
/// the ready list; the ops before and after it in the same batch still run.
#[test]
fn submit_time_error_becomes_a_completion() {
    let (f, disk) = image(1 << 20, CacheMode::None);
    let mut e = engine(&disk, 8, 8);
    let buf = aligned(8192);
    let good = [iovec(&buf, 0..4096)];
    let too_many = vec![iovec(&buf, 4096..4608); 2000]; // > UIO_MAXIOV
    let good2 = [iovec(&buf, 4096..8192)];
    // SAFETY: everything outlives the ops.
    unsafe {
        e.push(1, read_op(0, &good));
        e.push(2, read_op(0, &too_many));
        e.push(3, read_op(4096, &good2));
    }
    e.submit().unwrap();
    assert_eq!(e.stats().iocbs_submitted, 2);
    assert_eq!(e.stats().submit_calls, 3, "partial submission resumed");
    assert_eq!(e.in_flight(), 3);
    let res = wait_for(&mut e, 3);
    assert_eq!(res[&1], 4096);
    assert_eq!(res[&2], -i64::from(libc::EINVAL));
    assert_eq!(res[&3], 4096);

    // A write on a read-only disk is refused (EBADF) at submission as well.
    drop(e);
    drop(disk);
    let disk = open_readonly(f.path(), CacheMode::None);
    let mut e = engine(&disk, 8, 8);
    assert_eq!(
        // SAFETY: `buf` and `good` live until run_one returns.
        unsafe { run_one(&mut e, write_op(0, &good, false)) },
        -i64::from(libc::EBADF)
    );
}

/// Once FDSYNC is known to be refused, flushes go to the thread pool and still complete.
#[test]
fn flush_falls_back_to_the_pool() {
    let (f, disk) = image(1 << 20, CacheMode::None);
    let mut e = engine(&disk, 8, 8);
    let mut rng = StdRng::seed_from_u64(5);
    let data = random(4096, &mut rng);
    let iov = [iovec(&data, 0..4096)];
    e.fdsync_unsupported = true;
    // SAFETY: buffers outlive the ops.
    unsafe {
        e.push(1, write_op(0, &iov, false));
        e.push(2, EngineOp::Flush);
    }
    e.submit().unwrap();
    let res = wait_for(&mut e, 2);
    assert_eq!((res[&1], res[&2]), (4096, 0));
    assert_eq!(e.stats().pool_ops, 1);
    assert_eq!(e.stats().iocbs_submitted, 1);
    assert_eq!(file_bytes(&f, 0, 4096), data.as_slice());
}

/// Dropping the engine with ops in the kernel waits for them: the data is on disk when
/// drop returns and the buffers can then be freed.
#[test]
fn drop_waits_for_in_flight_ops() {
    let (f, disk) = image(1 << 20, CacheMode::None);
    let mut e = engine(&disk, 32, 32);
    let mut rng = StdRng::seed_from_u64(6);
    let bufs: Vec<AlignedBuf> = (0..32).map(|_| random(16384, &mut rng)).collect();
    let iovs: Vec<[libc::iovec; 1]> = bufs.iter().map(|b| [iovec(b, 0..16384)]).collect();
    for (i, iov) in iovs.iter().enumerate() {
        // SAFETY: `bufs` outlives the engine.
        unsafe { e.push(i as u64, write_op(i as u64 * 16384, iov, false)) };
    }
    e.submit().unwrap();
    assert_eq!(e.stats().iocbs_submitted, 32);
    drop(e);
    for (i, b) in bufs.iter().enumerate() {
        assert!(
            file_bytes(&f, i as u64 * 16384, 16384) == b.as_slice(),
            "op {i}"
        );
    }
}

#[test]
fn reap_without_completions_returns_nothing() {
    let (_f, disk) = image(1 << 20, CacheMode::Directsync);
    let mut e = engine(&disk, 4, 4);
    let mut called = false;
    e.reap(&mut |_, _| called = true);
    e.submit().unwrap();
    assert!(!called);
    assert_eq!(e.in_flight(), 0);
    assert_eq!(e.stats().submit_calls, 0);
}
