//! Tests of the parent module.

// Test data and figures, not guest input.
#![allow(clippy::cast_possible_truncation, clippy::cast_possible_wrap)]

use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;

use super::*;
use crate::cache::CacheMode;
use crate::disk::DiskOptions;
use crate::engine::test_util::{disk_with, open_readonly, vecs};

fn iov(buf: &mut [u8]) -> libc::iovec {
    libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    }
}

/// A fake syscall moving at most `max` bytes per call, failing once with EINTR, and
/// recording what it was asked for.
struct Fake {
    data: Vec<u8>,
    max: usize,
    calls: usize,
    most_iovs: usize,
    eintr_once: bool,
}

impl Fake {
    fn read(&mut self, iovs: &[libc::iovec], off: u64) -> isize {
        self.calls += 1;
        self.most_iovs = self.most_iovs.max(iovs.len());
        if self.eintr_once {
            self.eintr_once = false;
            // SAFETY: errno is a thread-local int.
            unsafe { *libc::__errno_location() = libc::EINTR };
            return -1;
        }
        let mut at = off as usize;
        let mut budget = self.max;
        let mut moved = 0;
        for v in iovs {
            let n = v
                .iov_len
                .min(budget)
                .min(self.data.len().saturating_sub(at));
            // SAFETY: the test's iovecs point at live buffers of iov_len bytes.
            unsafe {
                std::ptr::copy_nonoverlapping(self.data[at..].as_ptr(), v.iov_base.cast(), n)
            };
            at += n;
            budget -= n;
            moved += n;
            if n < v.iov_len {
                break;
            }
        }
        moved as isize
    }
}

#[test]
fn transfer_continues_short_reads_mid_iovec_and_retries_eintr() {
    let data: Vec<u8> = (0..10_000u32).map(|i| (i * 7 + 3) as u8).collect();
    let mut fake = Fake {
        data: data.clone(),
        max: 700,
        calls: 0,
        most_iovs: 0,
        eintr_once: true,
    };
    // Odd sizes so that 700-byte steps end inside iovecs; one empty iovec.
    let mut bufs: Vec<Vec<u8>> = [1000, 0, 333, 4096, 1, 2570]
        .iter()
        .map(|&n| vec![0u8; n])
        .collect();
    let iovs: Vec<libc::iovec> = bufs.iter_mut().map(|b| iov(b)).collect();
    let total: usize = bufs.iter().map(|b| b.len()).sum();
    let got = transfer(&iovs, 100, Direction::Read, |v, off| fake.read(v, off));
    assert_eq!(got, Ok(total as u64));
    assert!(fake.calls > total / 700, "short reads were continued");
    let flat: Vec<u8> = bufs.concat();
    assert_eq!(flat, data[100..100 + total]);
}

#[test]
fn transfer_stops_at_eof_and_fails_writes_without_progress() {
    let mut fake = Fake {
        data: vec![9u8; 1500],
        max: 512,
        calls: 0,
        most_iovs: 0,
        eintr_once: false,
    };
    let mut buf = vec![0u8; 4096];
    let iovs = [iov(&mut buf)];
    let got = transfer(&iovs, 1000, Direction::Read, |v, off| fake.read(v, off));
    assert_eq!(got, Ok(500), "bytes up to EOF");
    assert!(buf[..500].iter().all(|&b| b == 9) && buf[500..].iter().all(|&b| b == 0));

    let got = transfer(&iovs, 0, Direction::Write, |_, _| 0);
    assert_eq!(got, Err(-i64::from(libc::ENOSPC)));
    let got = transfer(&iovs, 0, Direction::Write, |_, _| {
        // SAFETY: errno is a thread-local int.
        unsafe { *libc::__errno_location() = libc::EIO };
        -1
    });
    assert_eq!(got, Err(-i64::from(libc::EIO)));
}

#[test]
fn transfer_caps_iovecs_per_call() {
    let mut fake = Fake {
        data: vec![1u8; 3000],
        max: usize::MAX,
        calls: 0,
        most_iovs: 0,
        eintr_once: false,
    };
    let mut bufs = vec![[0u8; 2]; 1500];
    let iovs: Vec<libc::iovec> = bufs.iter_mut().map(|b| iov(b)).collect();
    let got = transfer(&iovs, 0, Direction::Read, |v, off| fake.read(v, off));
    assert_eq!(got, Ok(3000));
    assert_eq!(fake.most_iovs, IOV_MAX);
    assert_eq!(fake.calls, 2);
    assert!(bufs.iter().all(|b| *b == [1, 1]));
}

#[test]
fn real_preadv_with_more_than_iov_max_iovecs() {
    let data: Vec<u8> = (0..3000u32 * 512).map(|i| (i % 251) as u8).collect();
    let (_img, disk) = disk_with(&data, CacheMode::Writeback);
    let mut bufs = vec![[0u8; 512]; 2000];
    let iovs: Vec<libc::iovec> = bufs.iter_mut().map(|b| iov(b)).collect();
    let op = EngineOp::Read {
        offset: 512,
        iovecs: vecs(&iovs),
    };
    // SAFETY: `iovs` describe the live `bufs` for the whole call.
    assert_eq!(unsafe { execute(&disk, &op) }, 2000 * 512);
    assert_eq!(bufs.concat(), data[512..512 + 2000 * 512]);
}

#[test]
fn zero_buffer_fallback_buffered_and_direct() {
    for cache in [CacheMode::Writeback, CacheMode::None] {
        let len = 3 << 20;
        let (img, disk) = disk_with(&vec![0xEEu8; len], cache);
        let (off, n) = (4096u64, (2 << 20) + 8192);
        assert_eq!(write_zero_buffers(&disk, off, n), Ok(0), "{cache}");
        let back = std::fs::read(img.path()).unwrap();
        assert_eq!(back.len(), len);
        let (s, e) = (off as usize, (off + n) as usize);
        assert!(back[..s].iter().all(|&b| b == 0xEE), "{cache}");
        assert!(back[s..e].iter().all(|&b| b == 0), "{cache}");
        assert!(back[e..].iter().all(|&b| b == 0xEE), "{cache}");
    }
}

#[test]
fn discard_punches_a_hole_that_reads_back_zeroes() {
    let len = 4 << 20;
    let (img, disk) = disk_with(&vec![0x5Au8; len], CacheMode::Writeback);
    assert_eq!(flush(disk.fd()), Ok(0));
    let blocks_before = std::fs::metadata(img.path()).unwrap().blocks();
    let op = EngineOp::Discard {
        offset: 1 << 20,
        len: 2 << 20,
    };
    // SAFETY: a discard carries no buffers.
    assert_eq!(unsafe { execute(&disk, &op) }, 0);
    let meta = std::fs::metadata(img.path()).unwrap();
    assert_eq!(meta.len(), len as u64, "KEEP_SIZE");
    assert!(meta.blocks() < blocks_before, "space was deallocated");
    let back = std::fs::read(img.path()).unwrap();
    assert!(back[..1 << 20].iter().all(|&b| b == 0x5A));
    assert!(back[1 << 20..3 << 20].iter().all(|&b| b == 0));
    assert!(back[3 << 20..].iter().all(|&b| b == 0x5A));
}

#[test]
fn write_zeroes_on_tmpfs_falls_back() {
    // tmpfs has no ZERO_RANGE; the punch-hole fallback must still zero the range.
    let dir = PathBuf::from("/dev/shm");
    if !dir.is_dir() {
        return;
    }
    let img = tempfile::NamedTempFile::new_in(&dir).unwrap();
    std::fs::write(img.path(), vec![0x11u8; 64 << 10]).unwrap();
    let mut opts = DiskOptions::new(img.path());
    opts.cache = CacheMode::Writeback;
    let disk = Disk::open(&opts).unwrap();
    let op = EngineOp::WriteZeroes {
        offset: 1000,
        len: 20_000,
    };
    // SAFETY: write-zeroes carries no buffers.
    assert_eq!(unsafe { execute(&disk, &op) }, 0);
    let back = std::fs::read(img.path()).unwrap();
    assert_eq!(back.len(), 64 << 10);
    assert!(back[..1000].iter().all(|&b| b == 0x11));
    assert!(back[1000..21_000].iter().all(|&b| b == 0));
    assert!(back[21_000..].iter().all(|&b| b == 0x11));
}

#[test]
fn failures_are_negative_errnos() {
    let null = Disk::null(1 << 20);
    assert_eq!(
        // SAFETY: a flush carries no buffers.
        unsafe { execute(&null, &EngineOp::Flush) },
        -i64::from(libc::EBADF)
    );

    let (img, _) = disk_with(&[7u8; 4096], CacheMode::Writeback);
    // The writable disk from disk_with was dropped, so the shared lock is free.
    let ro = open_readonly(img.path(), CacheMode::Writeback);
    let mut buf = [1u8; 512];
    let iovs = [iov(&mut buf)];
    let iovecs = vecs(&iovs);
    let write = EngineOp::Write {
        offset: 0,
        iovecs,
        fua: false,
    };
    // SAFETY: `iovs` describes the live `buf`.
    assert_eq!(unsafe { execute(&ro, &write) }, -i64::from(libc::EBADF));
    let zero = EngineOp::WriteZeroes {
        offset: 0,
        len: 512,
    };
    // SAFETY: no buffers.
    assert_eq!(unsafe { execute(&ro, &zero) }, -i64::from(libc::EBADF));
    let far = EngineOp::Read {
        offset: u64::MAX - 100,
        iovecs,
    };
    // SAFETY: as above.
    assert_eq!(unsafe { execute(&ro, &far) }, -i64::from(libc::EINVAL));
    assert_eq!(std::fs::read(img.path()).unwrap(), [7u8; 4096]);
}
