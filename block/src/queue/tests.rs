//! DiskQueue rules checked against a memory-backed engine that records what reaches it.

// Test data and figures, not guest input.
#![allow(
    clippy::cast_possible_truncation,
    clippy::cast_possible_wrap,
    clippy::cast_sign_loss
)]

use std::os::fd::RawFd;
use std::sync::{Arc, Mutex};

use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use super::*;
use crate::cache::CacheMode;
use crate::disk::DiskOptions;

/// What the engine was asked to do.
#[derive(Clone, Debug, PartialEq)]
enum Seen {
    Read {
        offset: u64,
        segs: usize,
        aligned: bool,
    },
    Write {
        offset: u64,
        segs: usize,
        aligned: bool,
        fua: bool,
    },
    Flush,
    Discard,
    WriteZeroes,
}

/// An engine over a Vec<u8> that records every op; `short` truncates transfers.
struct MemEngine {
    data: Arc<Mutex<Vec<u8>>>,
    seen: Arc<Mutex<Vec<Seen>>>,
    short: Option<usize>,
    notifier: EventFd,
    done: Vec<(u64, i64)>,
    staged: Vec<(u64, i64)>,
}

fn aligned(v: &IoVecs) -> bool {
    v.as_slice()
        .iter()
        .all(|i| (i.iov_base as usize).is_multiple_of(512) && i.iov_len % 512 == 0)
}

impl IoEngine for MemEngine {
    fn name(&self) -> &'static str {
        "mem"
    }

    unsafe fn push(&mut self, tag: u64, op: EngineOp) {
        let mut data = self.data.lock().unwrap();
        let mut seen = self.seen.lock().unwrap();
        let res = match op {
            EngineOp::Read { offset, iovecs } => {
                seen.push(Seen::Read {
                    offset,
                    segs: iovecs.count(),
                    aligned: aligned(&iovecs),
                });
                let mut at = offset as usize;
                let limit = self.short.map_or(usize::MAX, |s| at + s);
                let mut n = 0;
                for v in iovecs.as_slice() {
                    let take = v.iov_len.min(limit.saturating_sub(at));
                    // SAFETY: test buffers are live and writable.
                    unsafe {
                        std::ptr::copy_nonoverlapping(
                            data[at..].as_ptr(),
                            v.iov_base as *mut u8,
                            take,
                        )
                    };
                    at += take;
                    n += take;
                }
                n as i64
            }
            EngineOp::Write {
                offset,
                iovecs,
                fua,
            } => {
                seen.push(Seen::Write {
                    offset,
                    segs: iovecs.count(),
                    aligned: aligned(&iovecs),
                    fua,
                });
                let mut at = offset as usize;
                let limit = self.short.map_or(usize::MAX, |s| at + s);
                let mut n = 0;
                for v in iovecs.as_slice() {
                    let take = v.iov_len.min(limit.saturating_sub(at));
                    // SAFETY: test buffers are live and readable.
                    let src = unsafe { std::slice::from_raw_parts(v.iov_base as *const u8, take) };
                    data[at..at + take].copy_from_slice(src);
                    at += take;
                    n += take;
                }
                n as i64
            }
            EngineOp::Flush => {
                seen.push(Seen::Flush);
                0
            }
            EngineOp::Discard { .. } => {
                seen.push(Seen::Discard);
                0
            }
            EngineOp::WriteZeroes { .. } => {
                seen.push(Seen::WriteZeroes);
                0
            }
        };
        self.staged.push((tag, res));
    }

    fn submit(&mut self) -> Result<(), Error> {
        if !self.staged.is_empty() {
            self.done.append(&mut self.staged);
            self.notifier.write(1).unwrap();
        }
        Ok(())
    }

    fn reap(&mut self, done: &mut dyn FnMut(u64, i64)) {
        let _ = self.notifier.read();
        self.reap_ready(done);
    }

    fn reap_ready(&mut self, done: &mut dyn FnMut(u64, i64)) {
        for (t, r) in self.done.drain(..) {
            done(t, r);
        }
    }

    fn has_completions(&mut self) -> bool {
        !self.done.is_empty()
    }

    fn notifier(&self) -> &EventFd {
        &self.notifier
    }

    fn in_flight(&self) -> usize {
        self.staged.len() + self.done.len()
    }
}

struct Fixture {
    queue: DiskQueue,
    data: Arc<Mutex<Vec<u8>>>,
    seen: Arc<Mutex<Vec<Seen>>>,
    _file: tempfile::NamedTempFile,
}

const SIZE: usize = 1 << 20;

fn fixture(cache: CacheMode, readonly: bool, short: Option<usize>) -> Fixture {
    let file = tempfile::NamedTempFile::new().unwrap();
    file.as_file().set_len(SIZE as u64).unwrap();
    let disk = Disk::open(&DiskOptions {
        readonly,
        cache,
        ..DiskOptions::new(file.path())
    })
    .unwrap();
    let data = Arc::new(Mutex::new(vec![0u8; SIZE]));
    let seen = Arc::new(Mutex::new(Vec::new()));
    let engine = MemEngine {
        data: data.clone(),
        seen: seen.clone(),
        short,
        notifier: EventFd::new(EFD_NONBLOCK).unwrap(),
        done: Vec::new(),
        staged: Vec::new(),
    };
    let queue =
        DiskQueue::with_engine(Arc::new(disk), Box::new(engine), Default::default()).unwrap();
    Fixture {
        queue,
        data,
        seen,
        _file: file,
    }
}

fn run(q: &mut DiskQueue) -> Vec<Completion> {
    q.submit().unwrap();
    let mut out = Vec::new();
    q.reap(|c| out.push(c)).unwrap();
    assert_eq!(q.in_flight(), 0);
    out
}

fn iov(buf: &mut [u8]) -> libc::iovec {
    libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    }
}

/// A 4096-aligned heap buffer.
fn aligned_buf(len: usize) -> crate::bounce::AlignedBuf {
    crate::bounce::AlignedBuf::new(len, 4096).unwrap()
}

#[test]
fn fua_and_flush_follow_the_cache_mode() {
    for mode in CacheMode::ALL {
        let mut f = fixture(mode, false, None);
        let mut buf = aligned_buf(4096);
        // SAFETY: buf outlives the request (run() reaps it).
        unsafe { f.queue.write(1, 0, &[buf.iovec()], false) };
        f.queue.flush(2);
        let done = run(&mut f.queue);
        assert_eq!(done.len(), 2, "{mode}");
        assert!(done.iter().all(|c| c.result.is_ok()), "{mode}: {done:?}");
        let seen = f.seen.lock().unwrap().clone();
        let fua = matches!(seen[0], Seen::Write { fua: true, .. });
        assert_eq!(fua, mode.every_write_fua(), "{mode}: every write FUA");
        assert_eq!(
            seen.contains(&Seen::Flush),
            mode.flush_honoured(),
            "{mode}: flush"
        );
        assert_eq!(f.queue.write_cache(), mode.write_cache(), "{mode}: WCE");
    }
}

#[test]
fn guest_turning_the_write_cache_off_makes_writes_fua() {
    let mut f = fixture(CacheMode::Writeback, false, None);
    f.queue.set_write_cache(false);
    let mut buf = vec![1u8; 512];
    // SAFETY: buf outlives the request.
    unsafe { f.queue.write(1, 512, &[iov(&mut buf)], false) };
    run(&mut f.queue);
    assert!(matches!(
        f.seen.lock().unwrap()[0],
        Seen::Write { fua: true, .. }
    ));
}

#[test]
fn readonly_and_out_of_range_requests_fail_without_reaching_the_engine() {
    let mut f = fixture(CacheMode::Writeback, true, None);
    let mut buf = vec![0u8; 512];
    // SAFETY: buf outlives the requests.
    unsafe {
        f.queue.write(1, 0, &[iov(&mut buf)], false);
        f.queue.read(2, SIZE as u64 - 256, &[iov(&mut buf)]);
        f.queue.read(3, u64::MAX - 100, &[iov(&mut buf)]);
    }
    f.queue.discard(4, 0, 512);
    f.queue.write_zeroes(5, 0, 512);
    f.queue.discard(6, SIZE as u64, 512);
    let done = run(&mut f.queue);
    let errno = |t: u64| {
        done.iter()
            .find(|c| c.token == t)
            .unwrap()
            .result
            .as_ref()
            .unwrap_err()
            .errno()
    };
    assert_eq!(errno(1), libc::EROFS);
    assert_eq!(errno(2), libc::EINVAL);
    assert_eq!(errno(3), libc::EINVAL);
    assert_eq!(errno(4), libc::EROFS);
    assert_eq!(errno(5), libc::EROFS);
    assert!(f.seen.lock().unwrap().is_empty());
    let counters = f.queue.counters().snapshot();
    assert_eq!(counters.errors(), 6);
    assert_eq!(counters.in_flight, 0);
}

#[test]
fn misaligned_buffers_under_o_direct_are_bounced_both_ways() {
    let mut f = fixture(CacheMode::None, false, None);
    assert!(f.queue.disk().needs_alignment());
    // Two segments at odd addresses and odd lengths adding up to 1024 bytes.
    let mut backing = vec![0u8; 2048];
    let (a, b) = backing.split_at_mut(1024);
    let seg_a = &mut a[3..3 + 700];
    seg_a.iter_mut().enumerate().for_each(|(i, x)| *x = i as u8);
    let seg_b = &mut b[5..5 + 324];
    seg_b.iter_mut().for_each(|x| *x = 0xab);
    let w = [iov(seg_a), iov(seg_b)];
    // SAFETY: backing outlives the request.
    unsafe { f.queue.write(1, 4096, &w, false) };
    let done = run(&mut f.queue);
    assert_eq!(done[0].result, Ok(1024));
    let seen = f.seen.lock().unwrap().clone();
    assert_eq!(
        seen[0],
        Seen::Write {
            offset: 4096,
            segs: 1,
            aligned: true,
            fua: false
        }
    );
    let disk = f.data.lock().unwrap()[4096..4096 + 1024].to_vec();
    assert_eq!(
        &disk[..700],
        &(0..700).map(|i| i as u8).collect::<Vec<_>>()[..]
    );
    assert!(disk[700..].iter().all(|&x| x == 0xab));

    let mut back = vec![0u8; 1030];
    let (x, y) = back.split_at_mut(501);
    let r = [iov(&mut x[1..501]), iov(&mut y[..524])];
    // SAFETY: back outlives the request.
    unsafe { f.queue.read(2, 4096, &r) };
    let done = run(&mut f.queue);
    assert_eq!(done[0].result, Ok(1024));
    let mut got = back[1..501].to_vec();
    got.extend_from_slice(&back[501..501 + 524]);
    assert_eq!(got, disk);
    assert!(matches!(
        f.seen.lock().unwrap()[1],
        Seen::Read {
            segs: 1,
            aligned: true,
            ..
        }
    ));
}

#[test]
fn aligned_buffers_go_straight_through() {
    let mut f = fixture(CacheMode::None, false, None);
    let mut a = aligned_buf(4096);
    let mut b = aligned_buf(8192);
    // SAFETY: both buffers outlive the request.
    unsafe { f.queue.read(1, 0, &[a.iovec(), b.iovec()]) };
    run(&mut f.queue);
    assert_eq!(
        f.seen.lock().unwrap()[0],
        Seen::Read {
            offset: 0,
            segs: 2,
            aligned: true
        }
    );
}

#[test]
fn misaligned_offsets_under_o_direct_fail_cleanly() {
    let mut f = fixture(CacheMode::None, false, None);
    let align = u64::from(f.queue.disk().offset_align());
    let mut buf = aligned_buf(4096);
    // SAFETY: buf outlives the request.
    unsafe { f.queue.read(1, align / 2, &[buf.iovec()]) };
    let done = run(&mut f.queue);
    assert_eq!(done[0].result.as_ref().unwrap_err().errno(), libc::EINVAL);
    assert!(f.seen.lock().unwrap().is_empty());
}

#[test]
fn short_reads_zero_fill_and_short_writes_fail() {
    let mut f = fixture(CacheMode::Writeback, false, Some(100));
    let mut buf = vec![0x55u8; 512];
    // SAFETY: buf outlives the requests.
    unsafe { f.queue.read(1, 0, &[iov(&mut buf)]) };
    let done = run(&mut f.queue);
    assert_eq!(done[0].result, Ok(512));
    assert!(buf.iter().all(|&x| x == 0), "short read tail zeroed");
    // SAFETY: as above.
    unsafe { f.queue.write(2, 0, &[iov(&mut buf)], false) };
    let done = run(&mut f.queue);
    assert_eq!(done[0].result.as_ref().unwrap_err().errno(), libc::ENOSPC);
}

#[test]
fn zero_length_and_counters() {
    let mut f = fixture(CacheMode::Writeback, false, None);
    // SAFETY: no buffers.
    unsafe { f.queue.read(1, 0, &[]) };
    let mut buf = vec![9u8; 4096];
    // SAFETY: buf outlives the requests.
    unsafe {
        f.queue.write(2, 8192, &[iov(&mut buf)], false);
        f.queue.read(3, 8192, &[iov(&mut buf)]);
    }
    f.queue.discard(4, 0, 4096);
    f.queue.write_zeroes(5, 0, 4096);
    let done = run(&mut f.queue);
    assert_eq!(done.len(), 5);
    assert!(done.iter().all(|c| c.result.is_ok()));
    let s = f.queue.counters().snapshot();
    assert_eq!((s.read.ops, s.read.bytes), (2, 4096));
    assert_eq!((s.write.ops, s.write.bytes), (1, 4096));
    assert_eq!((s.discard.ops, s.write_zeroes.ops), (1, 1));
    assert_eq!(s.latency_log2_ns.iter().sum::<u64>(), 5);
}

#[test]
fn drain_waits_for_everything() {
    let mut f = fixture(CacheMode::Writeback, false, None);
    let mut buf = vec![0u8; 512];
    for t in 0..10 {
        // SAFETY: buf outlives the requests.
        unsafe { f.queue.read(t, 0, &[iov(&mut buf)]) };
    }
    let mut n = 0;
    f.queue.drain(Duration::from_secs(5), |_| n += 1).unwrap();
    assert_eq!(n, 10);
}

/// Whether `fd` is readable now.
fn readable(fd: RawFd) -> bool {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: poll reads and writes only the pollfd we pass.
    unsafe { libc::poll(&mut pfd, 1, 0) == 1 }
}

#[test]
fn one_clock_reading_per_pass_stamps_latency_and_reap_ready_keeps_the_fd() {
    let mut f = fixture(CacheMode::Writeback, false, None);
    let t0 = Instant::now();
    f.queue.set_clock(Some(t0));
    let mut buf = vec![0u8; 512];
    // SAFETY: buf outlives the request.
    unsafe { f.queue.read(1, 0, &[iov(&mut buf)]) };
    f.queue.submit().unwrap();
    f.queue.set_clock(Some(t0 + Duration::from_nanos(5000)));
    let mut done = Vec::new();
    assert_eq!(f.queue.reap_ready(|c| done.push(c)).unwrap(), 1);
    let s = f.queue.counters().snapshot();
    assert_eq!(s.latency_log2_ns[12], 1, "5 us from the two readings");
    assert_eq!(f.queue.recent_latency_ns(), 5000 / 8);
    assert!(
        readable(f.queue.completion_fd()),
        "reap_ready reads no eventfd"
    );
    assert_eq!(f.queue.reap(|_| panic!("nothing left")).unwrap(), 0);
    assert!(!readable(f.queue.completion_fd()), "reap clears it");
}

#[test]
fn without_notify_requests_failed_at_once_skip_the_eventfd() {
    let mut f = fixture(CacheMode::Writeback, true, None);
    let mut buf = vec![0u8; 512];
    f.queue.set_notify(false);
    // SAFETY: buf outlives the request (which fails: read-only disk).
    unsafe { f.queue.write(1, 0, &[iov(&mut buf)], false) };
    f.queue.submit().unwrap();
    assert!(f.queue.has_completions());
    assert!(
        !readable(f.queue.completion_fd()),
        "the caller polls instead"
    );
    f.queue.set_notify(true);
    // SAFETY: as above.
    unsafe { f.queue.write(2, 0, &[iov(&mut buf)], false) };
    f.queue.submit().unwrap();
    assert!(
        readable(f.queue.completion_fd()),
        "a sleeping caller is woken"
    );
    let mut n = 0;
    f.queue
        .reap(|c| {
            assert!(c.result.is_err());
            n += 1
        })
        .unwrap();
    assert_eq!(n, 2);
}

/// The caller's token names the request down to the engine: one out of range or still
/// in flight fails that request at once (never a panic, never a mix-up with the other).
#[test]
fn tokens_out_of_range_or_in_flight_fail_alone() {
    let mut f = fixture(CacheMode::Writeback, false, None);
    let mut a = vec![0u8; 512];
    let mut b = vec![0u8; 512];
    // SAFETY: the buffers outlive the requests.
    unsafe {
        f.queue.read(7, 0, &[iov(&mut a)]);
        f.queue.read(7, 512, &[iov(&mut b)]);
        f.queue.read(MAX_TOKENS, 0, &[iov(&mut b)]);
    }
    f.queue.flush(u64::MAX);
    let mut done = run(&mut f.queue);
    done.sort_by_key(|c| (c.token, c.result.is_ok()));
    let got: Vec<_> = done
        .iter()
        .map(|c| (c.token, c.result.as_ref().map_err(|e| e.errno()).copied()))
        .collect();
    assert_eq!(
        got,
        [
            (7, Err(libc::EBUSY)),
            (7, Ok(512)),
            (MAX_TOKENS, Err(libc::EINVAL)),
            (u64::MAX, Err(libc::EINVAL)),
        ]
    );
    // Once completed, the token is free again.
    // SAFETY: as above.
    unsafe { f.queue.read(7, 0, &[iov(&mut a)]) };
    assert_eq!(run(&mut f.queue)[0].result, Ok(512));
}

#[test]
fn a_dirty_bitmap_is_marked_by_finished_changes_only() {
    let mut f = fixture(CacheMode::Writeback, false, None);
    let bitmap = Arc::new(crate::jobs::DirtyBitmap::new(SIZE as u64, 4096).unwrap());
    f.queue.set_dirty_bitmap(Some(bitmap.clone()));
    let mut buf = vec![7u8; 4096];
    let v = [iov(&mut buf)];
    // SAFETY: `buf` outlives the request (reaped in `run`).
    unsafe { f.queue.write(1, 3 * 4096 + 512, &v, false) };
    f.queue.submit().unwrap();
    // Submitted but not reaped: not marked yet.
    assert_eq!(bitmap.dirty_chunks(), 0);
    let mut out = Vec::new();
    f.queue.reap(|c| out.push(c)).unwrap();
    assert_eq!(out.len(), 1);
    // 3*4096+512 .. +4096 touches chunks 3 and 4.
    assert!(bitmap.is_dirty(3) && bitmap.is_dirty(4));
    assert_eq!(bitmap.dirty_chunks(), 2);
    // Reads and flushes do not mark; write-zeroes and discard do.
    let mut rbuf = vec![0u8; 4096];
    let r = [iov(&mut rbuf)];
    // SAFETY: as above.
    unsafe { f.queue.read(2, 0, &r) };
    f.queue.flush(3);
    f.queue.write_zeroes(4, 10 * 4096, 4096);
    f.queue.discard(5, 20 * 4096, 8192);
    assert_eq!(run(&mut f.queue).len(), 4);
    let dirty: Vec<u64> = (0..bitmap.chunks())
        .filter(|&c| bitmap.is_dirty(c))
        .collect();
    assert_eq!(dirty, [3, 4, 10, 20, 21]);
    // Detached: nothing more is marked.
    f.queue.set_dirty_bitmap(None);
    // SAFETY: as above.
    unsafe { f.queue.write(6, 40 * 4096, &v, false) };
    assert_eq!(run(&mut f.queue).len(), 1);
    assert_eq!(bitmap.dirty_chunks(), 5);
}
