//! A host block device (a loop device over a temp file) as a disk: probing through the
//! block ioctls, and every engine doing reads, writes, BLKDISCARD and BLKZEROOUT on it.
//! Skips with a printed reason where loop devices cannot be set up.

#![allow(clippy::cast_possible_truncation)] // Test data and figures, not guest input.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use block::bounce::AlignedBuf;
use block::{
    AioKind, BackendKind, CacheMode, Completion, Disk, DiskOptions, DiskQueue, EngineOptions,
};

/// A loop device, detached on drop.
struct Loop(PathBuf);

impl Loop {
    fn attach(file: &Path) -> Result<Loop, String> {
        let out = Command::new("losetup")
            .args(["--find", "--show"])
            .arg(file)
            .output()
            .map_err(|e| format!("losetup: {e}"))?;
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).trim().to_string());
        }
        Ok(Loop(PathBuf::from(
            String::from_utf8_lossy(&out.stdout).trim(),
        )))
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.0).status();
    }
}

fn wait(q: &mut DiskQueue, n: usize) -> Vec<Completion> {
    q.submit().unwrap();
    let mut out = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while out.len() < n {
        assert!(Instant::now() < deadline, "timed out");
        let mut pfd = libc::pollfd {
            fd: q.completion_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: poll touches only this pollfd.
        unsafe { libc::poll(&mut pfd, 1, 100) };
        q.reap(|c| out.push(c)).unwrap();
    }
    out
}

#[test]
fn loop_device_probe_and_every_engine() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("backing.raw");
    std::fs::write(&file, vec![0x77u8; 4 << 20]).unwrap();
    let dev = match Loop::attach(&file) {
        Ok(d) => d,
        Err(e) => {
            tests::skip::skip(
                "loop_device_probe_and_every_engine",
                &format!("cannot attach a loop device ({e})"),
            );
            return;
        }
    };
    for kind in [AioKind::IoUring, AioKind::Native, AioKind::Threads] {
        for cache in [CacheMode::None, CacheMode::Writeback] {
            if kind == AioKind::Native && !cache.direct() {
                continue;
            }
            let disk = Disk::open(&DiskOptions {
                readonly: false,
                cache,
                ..DiskOptions::new(dev.0.clone())
            })
            .unwrap();
            assert_eq!(disk.backend(), BackendKind::BlockDevice);
            assert_eq!(disk.capacity(), 4 << 20);
            assert!(
                disk.logical_block_size() >= 512 && disk.logical_block_size().is_power_of_two()
            );
            assert!(disk.physical_block_size() >= disk.logical_block_size());
            let options = EngineOptions {
                kind,
                queue_depth: 8,
                ..Default::default()
            };
            let mut q = DiskQueue::new(Arc::new(disk), &options, Default::default()).unwrap();
            let mut buf = AlignedBuf::new(8192, 4096).unwrap();
            let mut pattern: Vec<u8> = (0..8192u32).map(|i| (i * 7 + kind as u32) as u8).collect();
            let src = [libc::iovec {
                iov_base: pattern.as_mut_ptr().cast(),
                iov_len: 8192,
            }];
            // SAFETY: `pattern` and `buf` outlive the requests (waited for below).
            unsafe { q.write(1, 1 << 20, &src, false) };
            q.discard(2, 2 << 20, 64 * 1024);
            q.write_zeroes(3, 3 << 20, 16 * 1024);
            q.flush(4);
            for c in wait(&mut q, 4) {
                assert!(c.result.is_ok(), "{kind}/{cache}: {c:?}");
            }
            // SAFETY: as above.
            unsafe { q.read(5, 1 << 20, &[buf.iovec()]) };
            assert_eq!(wait(&mut q, 1)[0].result, Ok(8192));
            // SAFETY: the read completed; buf holds 8192 initialised bytes.
            let got =
                unsafe { std::slice::from_raw_parts(buf.iovec().iov_base as *const u8, 8192) };
            assert_eq!(got, &pattern[..], "{kind}/{cache}: data");
            // SAFETY: as above.
            unsafe { q.read(6, 3 << 20, &[buf.iovec()]) };
            assert_eq!(wait(&mut q, 1)[0].result, Ok(8192));
            // SAFETY: as above.
            let got =
                unsafe { std::slice::from_raw_parts(buf.iovec().iov_base as *const u8, 8192) };
            assert!(got.iter().all(|&b| b == 0), "{kind}/{cache}: BLKZEROOUT");
            // A discard not aligned to the logical block size is refused, not passed on.
            q.discard(7, 100, 512);
            assert_eq!(
                wait(&mut q, 1)[0].result.as_ref().unwrap_err().errno(),
                libc::EINVAL
            );
        }
    }
}
