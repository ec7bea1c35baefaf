//! Helpers shared by the engines' tests: aligned buffers, temp images and disks, iovec
//! wrapping and waiting on a notifier.

use std::ops::Range;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rand::Rng;
use vmm_sys_util::eventfd::EventFd;

use crate::bounce::AlignedBuf;
use crate::cache::CacheMode;
use crate::disk::{Disk, DiskOptions};
use crate::engine::IoVecs;

/// The alignment of test buffers: enough for O_DIRECT on any disk the tests meet.
pub(crate) const ALIGN: usize = 4096;

/// A zeroed `len`-byte buffer aligned to [`ALIGN`].
pub(crate) fn aligned(len: usize) -> AlignedBuf {
    AlignedBuf::new(len, ALIGN).expect("test buffer allocation")
}

/// As [`aligned`], every byte `byte`.
pub(crate) fn filled(len: usize, byte: u8) -> AlignedBuf {
    let mut buf = aligned(len);
    buf.as_mut_slice().fill(byte);
    buf
}

/// As [`aligned`], filled from `rng`.
pub(crate) fn random(len: usize, rng: &mut impl Rng) -> AlignedBuf {
    let mut buf = aligned(len);
    rng.fill(buf.as_mut_slice());
    buf
}

/// One iovec over `range` of `buf`. Ops may write through it: tests look at the bytes
/// only once the op has completed.
pub(crate) fn iovec(buf: &AlignedBuf, range: Range<usize>) -> libc::iovec {
    assert!(range.start <= range.end && range.end <= buf.len());
    libc::iovec {
        iov_base: buf.as_ptr().wrapping_add(range.start).cast_mut().cast(),
        iov_len: range.len(),
    }
}

/// Wraps an iovec array for an op.
pub(crate) fn vecs(iovs: &[libc::iovec]) -> IoVecs {
    // SAFETY: every test keeps `iovs` and the buffers alive and untouched until the op
    // has completed (or the engine is dropped, which waits for it).
    unsafe { IoVecs::new(iovs.as_ptr(), iovs.len()) }
}

/// Where tests put their images: `$BLOCK_TEST_DIR`, else the system temp dir.
pub(crate) fn tmp_dir() -> PathBuf {
    std::env::var_os("BLOCK_TEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir)
}

/// A temp file in [`tmp_dir`] holding `data`.
pub(crate) fn temp_image(data: &[u8]) -> tempfile::NamedTempFile {
    let img = tempfile::NamedTempFile::new_in(tmp_dir()).unwrap();
    std::fs::write(img.path(), data).unwrap();
    img
}

/// Opens `path` read-write with `cache`.
pub(crate) fn open_disk(path: &Path, cache: CacheMode) -> Arc<Disk> {
    let mut opts = DiskOptions::new(path);
    opts.cache = cache;
    Arc::new(Disk::open(&opts).unwrap())
}

/// Opens `path` read-only with `cache`.
pub(crate) fn open_readonly(path: &Path, cache: CacheMode) -> Arc<Disk> {
    let opts = DiskOptions {
        readonly: true,
        cache,
        ..DiskOptions::new(path)
    };
    Arc::new(Disk::open(&opts).unwrap())
}

/// A temp image holding `data`, opened read-write with `cache`.
pub(crate) fn disk_with(data: &[u8], cache: CacheMode) -> (tempfile::NamedTempFile, Arc<Disk>) {
    let img = temp_image(data);
    let disk = open_disk(img.path(), cache);
    (img, disk)
}

/// Polls `fd` for readability for up to `timeout_ms`; returns what `poll` returned.
pub(crate) fn poll_in(fd: &EventFd, timeout_ms: i32) -> i32 {
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: polls one valid pollfd.
    unsafe { libc::poll(&mut pfd, 1, timeout_ms) }
}
