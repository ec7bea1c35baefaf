//! I/O engines: the kernel interfaces that carry a disk's requests.
//!
//! An engine executes [`EngineOp`]s exactly as given (buffers already aligned as the disk
//! needs; cache-mode rules already applied by [`crate::DiskQueue`]). Every engine:
//! - queues ops without a syscall ([`IoEngine::push`]), holding any that do not fit its
//!   ring in a backlog instead of blocking;
//! - submits what was queued with as few syscalls as its interface allows
//!   ([`IoEngine::submit`]), at most `max_batch` ops per syscall;
//! - signals its [`IoEngine::notifier`] eventfd when completions wait, and hands them back
//!   without blocking ([`IoEngine::reap`]). An engine that does its ops during `push`
//!   (null) says so ([`IoEngine::completes_inline`]); its ops may be reaped before the
//!   `submit`.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use vmm_sys_util::eventfd::EventFd;

use crate::disk::{BackendKind, Disk};
use crate::error::Error;

pub mod aio;
pub mod completions;
pub mod nbd;
pub mod null;
pub mod sync_ops;
#[cfg(test)]
pub(crate) mod test_util;
pub mod threads;
pub mod uring;

/// A scatter-gather list owned by the caller: a pointer to `count` `iovec`s.
///
/// The `iovec` array and the memory it points at must stay valid (and, for reads, not be
/// read or written by anyone else) until the op's completion has been reaped.
#[derive(Clone, Copy, Debug)]
pub struct IoVecs {
    ptr: *const libc::iovec,
    count: usize,
}

// SAFETY: IoVecs is a pointer to caller-owned memory that the caller promises (see
// `IoVecs::new`) stays valid until the op completes; which thread dereferences it does not
// matter.
unsafe impl Send for IoVecs {}

impl IoVecs {
    /// Wraps `count` iovecs starting at `ptr`.
    ///
    /// # Safety
    /// `ptr` must point to `count` valid `iovec`s, each describing memory that stays valid
    /// for the op's direction until its completion is reaped, and the array itself must
    /// not move or change in that time.
    pub unsafe fn new(ptr: *const libc::iovec, count: usize) -> Self {
        IoVecs { ptr, count }
    }

    /// Pointer to the first iovec.
    pub fn as_ptr(&self) -> *const libc::iovec {
        self.ptr
    }

    /// Number of iovecs.
    pub fn count(&self) -> usize {
        self.count
    }

    /// The iovecs as a slice.
    pub fn as_slice(&self) -> &[libc::iovec] {
        if self.count == 0 {
            return &[];
        }
        // SAFETY: `new`'s contract: `ptr` points to `count` valid iovecs that do not move.
        unsafe { std::slice::from_raw_parts(self.ptr, self.count) }
    }

    /// Total bytes described.
    pub fn total_len(&self) -> u64 {
        self.as_slice().iter().map(|v| v.iov_len as u64).sum()
    }
}

/// One operation as an engine executes it.
#[derive(Clone, Copy, Debug)]
pub enum EngineOp {
    /// Read into `iovecs` from byte `offset`.
    Read {
        /// Byte offset in the disk.
        offset: u64,
        /// Destination buffers.
        iovecs: IoVecs,
    },
    /// Write `iovecs` at byte `offset`; with `fua` durable before completion (RWF_DSYNC).
    Write {
        /// Byte offset in the disk.
        offset: u64,
        /// Source buffers.
        iovecs: IoVecs,
        /// Force unit access: complete only once durable.
        fua: bool,
    },
    /// Make completed writes durable (fdatasync).
    Flush,
    /// Deallocate a range (punch hole, or BLKDISCARD on a block device).
    Discard {
        /// Byte offset in the disk.
        offset: u64,
        /// Length in bytes.
        len: u64,
    },
    /// Make a range read back as zeroes (zero range, or BLKZEROOUT on a block device).
    WriteZeroes {
        /// Byte offset in the disk.
        offset: u64,
        /// Length in bytes.
        len: u64,
    },
}

/// The engine behind a disk, as the `aio` field of a disk config names it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum AioKind {
    /// io_uring: one `io_uring_enter` per batch. The default.
    #[default]
    IoUring,
    /// Linux AIO (`io_submit`); needs O_DIRECT.
    Native,
    /// A small pool of worker threads doing `preadv`/`pwritev`.
    Threads,
}

impl AioKind {
    /// The name used in configs.
    pub fn as_str(self) -> &'static str {
        match self {
            AioKind::IoUring => "io_uring",
            AioKind::Native => "native",
            AioKind::Threads => "threads",
        }
    }
}

impl std::fmt::Display for AioKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for AioKind {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        [AioKind::IoUring, AioKind::Native, AioKind::Threads]
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| {
                format!("unknown aio engine {s:?}; expected io_uring, native or threads")
            })
    }
}

/// Settings of one engine instance (one per virtqueue).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EngineOptions {
    /// Which engine.
    pub kind: AioKind,
    /// Ops the engine keeps in flight in the kernel; more wait in a backlog.
    pub queue_depth: u32,
    /// The most ops submitted by one syscall.
    pub max_batch: u32,
    /// io_uring only: use a kernel SQ polling thread idling after this many ms.
    pub sqpoll_idle_ms: Option<u32>,
    /// threads only: number of worker threads.
    pub threads: usize,
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions {
            kind: AioKind::IoUring,
            queue_depth: 128,
            max_batch: 32,
            sqpoll_idle_ms: None,
            threads: 4,
        }
    }
}

impl EngineOptions {
    /// Checks ranges: depth 1..=4096, batch 1..=depth, threads 1..=64.
    pub fn validate(&self) -> Result<(), Error> {
        if !(1..=4096).contains(&self.queue_depth) {
            return Err(Error::InvalidOption(format!(
                "queue_depth must be 1..=4096, got {}",
                self.queue_depth
            )));
        }
        if self.max_batch == 0 {
            return Err(Error::InvalidOption("max_batch must be at least 1".into()));
        }
        if !(1..=64).contains(&self.threads) {
            return Err(Error::InvalidOption(format!(
                "threads must be 1..=64, got {}",
                self.threads
            )));
        }
        Ok(())
    }
}

/// An asynchronous I/O engine over one disk. See the module docs for the contract.
pub trait IoEngine: Send {
    /// Short name for logs and counters ("io_uring", "native", "threads", "null").
    fn name(&self) -> &'static str;

    /// Queues `op` under `tag`; makes no syscall. The completion carries `tag` back.
    ///
    /// # Safety
    /// The buffers of `op` must satisfy [`IoVecs::new`]'s contract until the completion
    /// for `tag` has been reaped.
    unsafe fn push(&mut self, tag: u64, op: EngineOp);

    /// Submits queued ops to the kernel, at most `max_batch` per syscall. Ops that do not
    /// fit stay in the backlog and go with a later `submit` (after a `reap` frees room).
    /// Per-op failures are reported as completions, never here.
    fn submit(&mut self) -> Result<(), Error>;

    /// Clears the notifier and hands every waiting completion to `done(tag, result)`,
    /// where `result` is the byte count on success or a negative errno. Never blocks.
    fn reap(&mut self, done: &mut dyn FnMut(u64, i64));

    /// As [`IoEngine::reap`] but leaves the notifier alone where the engine allows: for
    /// callers that poll [`IoEngine::has_completions`] or watch the notifier
    /// edge-triggered, so a pass costs no `read` of the eventfd. The default clears it.
    fn reap_ready(&mut self, done: &mut dyn FnMut(u64, i64)) {
        self.reap(done);
    }

    /// Whether the caller may sleep on the notifier (`true`, the default) or promises to
    /// check [`IoEngine::has_completions`] after every `submit` and before it sleeps
    /// (`false`). While `false`, engines may skip signalling the notifier for completions
    /// they make during `push`/`submit` (the null engine, ops failed at once); the kernel's
    /// asynchronous completions are always signalled.
    fn set_notify(&mut self, enabled: bool) {
        let _ = enabled;
    }

    /// Whether completions may wait to be reaped, checked without a syscall where the
    /// interface allows (the io_uring CQ, the Linux AIO ring in user memory). Adaptive
    /// polling spins on this before sleeping on the notifier. It may say true
    /// spuriously; it never says false while a completion waits.
    fn has_completions(&mut self) -> bool;

    /// Whether every op completes during its `push` (the null engine: reapable at once,
    /// before any `submit`); the caller may then hand results on while it pushes more.
    /// False (the default) for engines whose ops complete in the kernel or a thread.
    fn completes_inline(&self) -> bool {
        false
    }

    /// Eventfd that becomes readable when completions wait to be reaped.
    fn notifier(&self) -> &EventFd;

    /// Ops pushed and not yet reaped (including the backlog).
    fn in_flight(&self) -> usize;

    /// Changes the most ops submitted per syscall (an iothread's `aio_max_batch`, which
    /// can change at runtime). Engines without batched submission ignore it.
    fn set_max_batch(&mut self, max_batch: u32) {
        let _ = max_batch;
    }
}

/// Creates the engine `options.kind` for `disk` (the null engine for a null disk).
pub fn create_engine(
    disk: &Arc<Disk>,
    options: &EngineOptions,
) -> Result<Box<dyn IoEngine>, Error> {
    create_engine_sharing(disk, options, None)
}

/// As [`create_engine`], with `notifier` (a duplicate of it) as the engine's completion
/// eventfd when given: two engines sharing one notifier wake one waiter (a queue that
/// writes to a mirror target as well as to its disk).
pub fn create_engine_sharing(
    disk: &Arc<Disk>,
    options: &EngineOptions,
    notifier: Option<&EventFd>,
) -> Result<Box<dyn IoEngine>, Error> {
    options.validate()?;
    if disk.backend() == BackendKind::Null {
        return Ok(Box::new(null::NullEngine::with_notifier(
            options, notifier,
        )?));
    }
    // A qcow2 disk's requests become imago's work, its files' I/O per `options`.
    if let Some(image) = disk.qcow2() {
        return Ok(Box::new(crate::qcow2::Qcow2Engine::new(
            image.clone(),
            options,
            notifier,
        )?));
    }
    // An NBD disk's I/O is socket I/O on its connections, whatever `aio` says.
    if let Some(client) = disk.nbd() {
        return nbd::NbdEngine::with_notifier(client.connection(), notifier);
    }
    Ok(match options.kind {
        AioKind::IoUring => Box::new(uring::UringEngine::create_with(
            disk.clone(),
            options,
            notifier,
        )?),
        AioKind::Native => Box::new(aio::AioEngine::create_with(
            disk.clone(),
            options,
            notifier,
        )?),
        AioKind::Threads => threads::ThreadsEngine::with_notifier(disk.clone(), options, notifier)?,
    })
}

/// Converts an `io::Error` from a syscall into the negative errno engines report.
pub(crate) fn neg_errno(err: &std::io::Error) -> i64 {
    -i64::from(err.raw_os_error().unwrap_or(libc::EIO))
}

/// A nonblocking, close-on-exec eventfd for an engine's completion notifier.
pub(crate) fn new_notifier() -> std::io::Result<EventFd> {
    EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)
}

/// `shared` duplicated (one eventfd, two descriptors), or a new notifier.
pub(crate) fn notifier_or_new(shared: Option<&EventFd>) -> std::io::Result<EventFd> {
    match shared {
        Some(fd) => fd.try_clone(),
        None => new_notifier(),
    }
}
