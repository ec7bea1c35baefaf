//! Synchronous execution of one [`EngineOp`] with plain syscalls.
//!
//! This is what the `threads` engine's workers run, and what the io_uring and Linux AIO
//! engines fall back to (through a [`crate::engine::threads::WorkerPool`]) for ops their
//! kernel interface lacks. Reads and writes loop over short transfers; discard and
//! write-zeroes pick `fallocate` on files and the `BLKDISCARD`/`BLKZEROOUT` ioctls on block
//! devices, degrading gracefully where the filesystem cannot.

use std::io;
use std::os::fd::RawFd;

use crate::bounce::AlignedBuf;
use crate::disk::{BackendKind, Disk};
use crate::engine::{EngineOp, IoVecs, neg_errno};

// ioctl numbers from <linux/fs.h>: _IO(0x12, 119) and _IO(0x12, 127).
const BLKDISCARD: libc::c_ulong = 0x1277;
const BLKZEROOUT: libc::c_ulong = 0x127f;

/// The most iovecs one `preadv`/`pwritev2` accepts (`IOV_MAX` on Linux).
const IOV_MAX: usize = 1024;

/// The largest zero buffer written at once when write-zeroes has to write real zeroes.
const ZERO_CHUNK: usize = 1 << 20;

/// Executes `op` synchronously on `disk`'s fd; returns bytes transferred (reads/writes)
/// or 0, or a negative errno.
///
/// A read that meets end of file returns the bytes read so far (the caller zero-fills
/// the rest). Never panics.
///
/// # Safety
/// `op`'s iovecs must be valid for the op's direction for the duration of the call.
pub unsafe fn execute(disk: &Disk, op: &EngineOp) -> i64 {
    let fd = disk.fd();
    if fd < 0 {
        return -i64::from(libc::EBADF);
    }
    let result = match *op {
        EngineOp::Read { offset, iovecs } => {
            // SAFETY: the caller guarantees the iovecs are writable memory for this call.
            unsafe { read(fd, offset, iovecs) }
        }
        EngineOp::Write {
            offset,
            iovecs,
            fua,
        } => {
            // SAFETY: the caller guarantees the iovecs are readable memory for this call.
            unsafe { write(fd, offset, iovecs, fua) }
        }
        EngineOp::Flush => flush(fd),
        EngineOp::Discard { offset, len } => discard(disk, offset, len),
        EngineOp::WriteZeroes { offset, len } => write_zeroes(disk, offset, len),
    };
    match result {
        // A count is at most the op's length, which `check_range` keeps within i64.
        Ok(n) => i64::try_from(n).unwrap_or(-i64::from(libc::EOVERFLOW)),
        Err(errno) => errno,
    }
}

/// A per-op result: a count, or a negative errno.
type OpResult = Result<u64, i64>;

/// The last OS error as a negative errno.
fn last_errno() -> i64 {
    neg_errno(&io::Error::last_os_error())
}

/// Checks that `offset..offset + len` fits in an `off_t`.
fn check_range(offset: u64, len: u64) -> Result<(), i64> {
    match offset.checked_add(len) {
        Some(end) if end <= i64::MAX as u64 => Ok(()),
        _ => Err(-i64::from(libc::EINVAL)),
    }
}

/// Reads into `iovecs` from `offset` until they are full or end of file.
///
/// # Safety
/// `iovecs` must describe writable memory valid for the duration of the call.
unsafe fn read(fd: RawFd, offset: u64, iovecs: IoVecs) -> OpResult {
    check_range(offset, iovecs.total_len())?;
    transfer(iovecs.as_slice(), offset, Direction::Read, |iov, off| {
        // SAFETY: `iov` is a sub-range of the caller's writable iovecs (or one iovec
        // pointing inside one of them); `transfer` keeps the count at most IOV_MAX.
        unsafe { libc::preadv(fd, iov.as_ptr(), iov_count(iov), off_t(off)) }
    })
}

/// Writes `iovecs` at `offset`, each syscall with `RWF_DSYNC` when `fua`.
///
/// # Safety
/// `iovecs` must describe readable memory valid for the duration of the call.
unsafe fn write(fd: RawFd, offset: u64, iovecs: IoVecs, fua: bool) -> OpResult {
    check_range(offset, iovecs.total_len())?;
    let flags = if fua { libc::RWF_DSYNC } else { 0 };
    transfer(iovecs.as_slice(), offset, Direction::Write, |iov, off| {
        // SAFETY: `iov` is a sub-range of the caller's readable iovecs (or one iovec
        // pointing inside one of them); `transfer` keeps the count at most IOV_MAX.
        unsafe { libc::pwritev2(fd, iov.as_ptr(), iov_count(iov), off_t(off), flags) }
    })
}

/// `iov.len()` as the count `preadv`/`pwritev2` take. `transfer` hands at most
/// [`IOV_MAX`] iovecs; the clamp keeps the count within the slice whatever the caller.
fn iov_count(iov: &[libc::iovec]) -> libc::c_int {
    libc::c_int::try_from(iov.len().min(IOV_MAX)).unwrap_or(0)
}

/// `off` as an `off_t`. `check_range` keeps every offset and end within `i64::MAX`, so
/// the value is unchanged; one past it would turn negative, which the kernel refuses
/// with EINVAL.
fn off_t(off: u64) -> libc::off_t {
    off.cast_signed()
}

/// Which way data moves; decides what a zero-byte transfer means.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Direction {
    /// A zero-byte read is end of file: stop and report what was read.
    Read,
    /// A zero-byte write makes no progress: fail with ENOSPC.
    Write,
}

/// Moves all of `iovs` starting at `offset` with `syscall(iovs, offset)`, continuing
/// after short transfers (also in the middle of an iovec) and retrying EINTR, without
/// allocating and without changing the caller's iovec array.
fn transfer(
    iovs: &[libc::iovec],
    offset: u64,
    dir: Direction,
    mut syscall: impl FnMut(&[libc::iovec], u64) -> isize,
) -> OpResult {
    let mut done: u64 = 0;
    // Position in `iovs`: index of the current iovec and bytes of it already moved.
    let mut idx = 0usize;
    let mut within = 0usize;
    loop {
        while idx < iovs.len() && within >= iovs[idx].iov_len {
            idx += 1;
            within = 0;
        }
        if idx == iovs.len() {
            return Ok(done);
        }
        let partial;
        let chunk: &[libc::iovec] = if within > 0 {
            partial = [libc::iovec {
                // SAFETY: `within < iov_len`, so the pointer stays inside the iovec's
                // memory; nothing is dereferenced here.
                iov_base: unsafe { (iovs[idx].iov_base as *mut u8).add(within) }.cast(),
                iov_len: iovs[idx].iov_len - within,
            }];
            &partial
        } else {
            &iovs[idx..iovs.len().min(idx + IOV_MAX)]
        };
        let n = syscall(chunk, offset + done);
        if n < 0 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(neg_errno(&err));
        }
        if n == 0 {
            return match dir {
                Direction::Read => Ok(done),
                Direction::Write => Err(-i64::from(libc::ENOSPC)),
            };
        }
        // `n > 0` here.
        let mut left = n.unsigned_abs();
        done += left as u64;
        // Advance the position by `left` bytes.
        while left > 0 && idx < iovs.len() {
            let room = iovs[idx].iov_len - within;
            if left < room {
                within += left;
                left = 0;
            } else {
                left -= room;
                idx += 1;
                within = 0;
            }
        }
    }
}

/// fdatasync, retrying EINTR.
fn flush(fd: RawFd) -> OpResult {
    loop {
        // SAFETY: fdatasync takes only a descriptor.
        if unsafe { libc::fdatasync(fd) } == 0 {
            return Ok(0);
        }
        let errno = last_errno();
        if errno != -i64::from(libc::EINTR) {
            return Err(errno);
        }
    }
}

/// Whether `errno` (negative) says the operation is not supported here.
fn unsupported(errno: i64) -> bool {
    [libc::EOPNOTSUPP, libc::ENOSYS, libc::ENOTTY]
        .into_iter()
        .any(|e| errno == -i64::from(e))
}

/// `fallocate(fd, mode, offset, len)`, retrying EINTR.
fn fallocate(fd: RawFd, mode: libc::c_int, offset: u64, len: u64) -> OpResult {
    loop {
        // SAFETY: fallocate takes only integers; the range was checked to fit an off_t.
        let rc = unsafe { libc::fallocate(fd, mode, off_t(offset), off_t(len)) };
        if rc == 0 {
            return Ok(0);
        }
        let errno = last_errno();
        if errno != -i64::from(libc::EINTR) {
            return Err(errno);
        }
    }
}

/// A block-device range ioctl (`BLKDISCARD`, `BLKZEROOUT`) over `offset..offset + len`.
fn range_ioctl(fd: RawFd, request: libc::c_ulong, offset: u64, len: u64) -> OpResult {
    let range: [u64; 2] = [offset, len];
    loop {
        // SAFETY: BLKDISCARD and BLKZEROOUT read a u64[2] {start, length} and nothing else.
        let rc = unsafe { libc::ioctl(fd, request as _, range.as_ptr()) };
        if rc == 0 {
            return Ok(0);
        }
        let errno = last_errno();
        if errno != -i64::from(libc::EINTR) {
            return Err(errno);
        }
    }
}

/// Deallocates a range; a backend that cannot is not an error (discard is a hint).
fn discard(disk: &Disk, offset: u64, len: u64) -> OpResult {
    check_range(offset, len)?;
    if len == 0 {
        return Ok(0);
    }
    let fd = disk.fd();
    let result = match disk.backend() {
        BackendKind::BlockDevice => range_ioctl(fd, BLKDISCARD, offset, len),
        // The sync ops never see an NBD disk (its engine is the connection); fd -1
        // answers EBADF if one ever did.
        BackendKind::File | BackendKind::Null | BackendKind::Nbd => fallocate(
            fd,
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset,
            len,
        ),
    };
    match result {
        Err(errno) if unsupported(errno) => Ok(0),
        other => other,
    }
}

/// Makes a range read back as zeroes: zero range, else punch hole, else real zeroes on a
/// file; `BLKZEROOUT`, else real zeroes on a block device.
fn write_zeroes(disk: &Disk, offset: u64, len: u64) -> OpResult {
    check_range(offset, len)?;
    if len == 0 {
        return Ok(0);
    }
    let fd = disk.fd();
    let result = match disk.backend() {
        BackendKind::BlockDevice => range_ioctl(fd, BLKZEROOUT, offset, len),
        BackendKind::File | BackendKind::Null | BackendKind::Nbd => {
            let keep = libc::FALLOC_FL_KEEP_SIZE;
            match fallocate(fd, libc::FALLOC_FL_ZERO_RANGE | keep, offset, len) {
                Err(errno) if unsupported(errno) => {
                    fallocate(fd, libc::FALLOC_FL_PUNCH_HOLE | keep, offset, len)
                }
                other => other,
            }
        }
    };
    match result {
        Err(errno) if unsupported(errno) => write_zero_buffers(disk, offset, len),
        other => other,
    }
}

/// Writes real zeroes over `offset..offset + len` from an aligned buffer of at most
/// [`ZERO_CHUNK`] bytes (O_DIRECT-safe when `offset` and `len` are aligned).
fn write_zero_buffers(disk: &Disk, offset: u64, len: u64) -> OpResult {
    check_range(offset, len)?;
    if len == 0 {
        return Ok(0);
    }
    let no_mem = -i64::from(libc::ENOMEM);
    let offset_align = usize::try_from(disk.offset_align().max(1)).map_err(|_| no_mem)?;
    let mem_align = usize::try_from(disk.mem_align().max(1)).map_err(|_| no_mem)?;
    let size = usize::try_from(len)
        .map_or(ZERO_CHUNK, |len| len.min(ZERO_CHUNK))
        .next_multiple_of(offset_align);
    let buf = AlignedBuf::new(size, mem_align).ok_or(no_mem)?;
    let fd = disk.fd();
    let mut done = 0u64;
    while done < len {
        let n = usize::try_from(len - done).map_or(size, |left| left.min(size));
        let iov = [libc::iovec {
            iov_base: buf.as_ptr().cast_mut().cast(),
            iov_len: n,
        }];
        transfer(&iov, offset + done, Direction::Write, |iov, off| {
            // SAFETY: `iov` points into `buf`, which is alive, readable and at least `n`
            // bytes long.
            unsafe { libc::pwritev2(fd, iov.as_ptr(), iov_count(iov), off_t(off), 0) }
        })?;
        done += n as u64;
    }
    Ok(0)
}

#[cfg(test)]
mod tests;
