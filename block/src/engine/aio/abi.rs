//! The Linux AIO ABI (`linux/aio_abi.h`) and thin wrappers over its four syscalls.
//!
//! libc exposes the syscall numbers but not the structs, so they are defined here with
//! the x86_64 (little-endian, 64-bit) field order and checked for size at compile time.

use std::io;
use std::ptr;

/// `IOCB_CMD_PREAD`: read into one buffer.
pub const IOCB_CMD_PREAD: u16 = 0;
/// `IOCB_CMD_PWRITE`: write from one buffer.
pub const IOCB_CMD_PWRITE: u16 = 1;
/// `IOCB_CMD_FSYNC`: fsync the file.
pub const IOCB_CMD_FSYNC: u16 = 2;
/// `IOCB_CMD_FDSYNC`: fdatasync the file.
pub const IOCB_CMD_FDSYNC: u16 = 3;
/// `IOCB_CMD_PREADV`: read into an iovec array.
pub const IOCB_CMD_PREADV: u16 = 7;
/// `IOCB_CMD_PWRITEV`: write from an iovec array.
pub const IOCB_CMD_PWRITEV: u16 = 8;

/// `IOCB_FLAG_RESFD`: on completion, add 1 to the eventfd in `aio_resfd`.
pub const IOCB_FLAG_RESFD: u32 = 1;

/// The kernel's AIO context handle (`aio_context_t`).
pub type AioContext = libc::c_ulong;

/// One AIO request (`struct iocb`), x86_64 layout.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct Iocb {
    /// Returned unchanged in [`IoEvent::data`].
    pub aio_data: u64,
    /// Set by the kernel (`KIOCB_KEY`); must be 0 on submission.
    pub aio_key: u32,
    /// `RWF_*` flags for reads and writes.
    pub aio_rw_flags: i32,
    /// `IOCB_CMD_*`.
    pub aio_lio_opcode: u16,
    /// I/O priority.
    pub aio_reqprio: i16,
    /// File descriptor.
    pub aio_fildes: u32,
    /// Buffer address, or iovec array address for the vectored commands.
    pub aio_buf: u64,
    /// Buffer length, or iovec count for the vectored commands.
    pub aio_nbytes: u64,
    /// File offset in bytes.
    pub aio_offset: i64,
    /// Reserved; must be 0.
    pub aio_reserved2: u64,
    /// `IOCB_FLAG_*`.
    pub aio_flags: u32,
    /// Eventfd signalled on completion when `IOCB_FLAG_RESFD` is set.
    pub aio_resfd: u32,
}

/// One completion (`struct io_event`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct IoEvent {
    /// The request's [`Iocb::aio_data`].
    pub data: u64,
    /// Address of the request's iocb (as submitted).
    pub obj: u64,
    /// Bytes transferred, or a negative errno.
    pub res: i64,
    /// Secondary result (unused by the commands issued here).
    pub res2: i64,
}

const _: () = assert!(std::mem::size_of::<Iocb>() == 64);
const _: () = assert!(std::mem::size_of::<IoEvent>() == 32);

/// `io_setup(nr_events, &ctx)`: creates a context for `nr_events` concurrent requests.
pub fn io_setup(nr_events: u32) -> io::Result<AioContext> {
    let mut ctx: AioContext = 0;
    // SAFETY: io_setup writes one aio_context_t into `ctx`, which is initialised to 0 as
    // the kernel requires and lives across the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_io_setup,
            nr_events as libc::c_uint,
            &mut ctx as *mut AioContext,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(ctx)
}

/// `io_destroy(ctx)`: tears the context down (the kernel waits for in-flight requests).
pub fn io_destroy(ctx: AioContext) -> io::Result<()> {
    // SAFETY: io_destroy takes the context by value and touches no memory of ours.
    let rc = unsafe { libc::syscall(libc::SYS_io_destroy, ctx) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `io_submit(ctx, n, iocbpp)`: queues the iocbs whose addresses are in `iocbs`.
/// Returns how many were accepted (from the front; may be fewer than given).
///
/// # Safety
/// Every address in `iocbs` must point to a valid [`Iocb`] for the duration of the call,
/// and the buffers each iocb names must stay valid until its completion is reaped.
pub unsafe fn io_submit(ctx: AioContext, iocbs: &[usize]) -> io::Result<usize> {
    let nr = c_long_len(iocbs.len())?;
    // SAFETY: `iocbs` is an array of `iocbs.len()` pointer-sized iocb addresses (usize has
    // the size of a pointer); the caller vouches for the iocbs and their buffers.
    let rc = unsafe { libc::syscall(libc::SYS_io_submit, ctx, nr, iocbs.as_ptr()) };
    syscall_count(rc)
}

/// A length as the `long` the AIO syscalls take; EINVAL past `c_long::MAX` (never on a
/// real slice).
fn c_long_len(len: usize) -> io::Result<libc::c_long> {
    libc::c_long::try_from(len).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

/// A syscall's count result: -1 is the error in errno; otherwise a count no larger than
/// the slice passed in, so it fits a usize.
fn syscall_count(rc: libc::c_long) -> io::Result<usize> {
    usize::try_from(rc).map_err(|_| io::Error::last_os_error())
}

/// `io_getevents(ctx, min_nr, events.len(), events, timeout)`: collects completions.
/// With `timeout` `None` it blocks until `min_nr` are available; with a zero timeout it
/// never blocks. Returns how many events were written to the front of `events`.
pub fn io_getevents(
    ctx: AioContext,
    min_nr: usize,
    events: &mut [IoEvent],
    timeout: Option<&libc::timespec>,
) -> io::Result<usize> {
    let timeout_ptr = timeout.map_or(ptr::null(), |t| t as *const libc::timespec);
    let min_nr = c_long_len(min_nr)?;
    let nr = c_long_len(events.len())?;
    // SAFETY: the kernel writes at most `events.len()` io_events into `events`, which we
    // borrow mutably for the call, and only reads `timeout` (or nothing when null).
    let rc = unsafe {
        libc::syscall(
            libc::SYS_io_getevents,
            ctx,
            min_nr,
            nr,
            events.as_mut_ptr(),
            timeout_ptr,
        )
    };
    syscall_count(rc)
}

/// Magic number of the completion ring the kernel maps at the context's address.
const AIO_RING_MAGIC: u32 = 0xa10a_10a1;

/// Whether the context's completion ring holds events, read from the ring the kernel
/// maps into our address space (`struct aio_ring`: id, nr, head, tail, magic, ...), as
/// QEMU peeks it, without a syscall. Says true when the ring is not one we recognise.
pub fn ring_has_events(ctx: AioContext) -> bool {
    if ctx == 0 {
        return false;
    }
    let ring = ctx as *const u32;
    // SAFETY: a live AIO context id is the address of its ring header, mapped readable
    // for the context's lifetime (until io_destroy, which only Drop calls); the header's
    // first five u32 fields are id, nr, head, tail and magic. Reads are volatile or
    // atomic because the kernel writes `tail` concurrently.
    unsafe {
        if std::ptr::read_volatile(ring.add(4)) != AIO_RING_MAGIC {
            return true;
        }
        let head = std::ptr::read_volatile(ring.add(2));
        let tail = (*(ring.add(3) as *const std::sync::atomic::AtomicU32))
            .load(std::sync::atomic::Ordering::Acquire);
        head != tail
    }
}
