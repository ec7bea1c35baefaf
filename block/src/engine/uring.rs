//! The io_uring engine: one ring per engine, the disk registered as fixed file 0, an
//! eventfd registered as the completion notifier, optional SQPOLL.
//!
//! [`IoEngine::push`] only stages an op; the caller's tag is the SQE's `user_data`, so
//! no table of the engine's maps one to the other. [`IoEngine::submit`] moves staged
//! ops into the SQ, at most `max_batch` per `io_uring_enter` and never more than
//! `queue_depth` in the ring at once; the rest wait in order for a later submit.
//!
//! What io_uring cannot do goes to a lazily created one-worker [`WorkerPool`] that signals
//! the same eventfd: discard and write-zeroes on a block device (no BLKDISCARD opcode),
//! and a write-zeroes the filesystem refuses with `EOPNOTSUPP` (tmpfs has no
//! `FALLOC_FL_ZERO_RANGE`).

use std::collections::{HashMap, VecDeque};
use std::io;
use std::os::fd::AsRawFd;
use std::sync::Arc;

use io_uring::{IoUring, opcode, squeue, types};
use vmm_sys_util::eventfd::EventFd;

use crate::disk::{BackendKind, Disk};
use crate::engine::threads::WorkerPool;
use crate::engine::{EngineOp, EngineOptions, IoEngine, neg_errno};
use crate::error::Error;

#[cfg(test)]
mod tests;

const NAME: &str = "io_uring";

/// The disk is the only registered file.
const DISK: types::Fixed = types::Fixed(0);

/// Counters of what the engine handed to the kernel, for tests and diagnostics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UringStats {
    /// Submit calls on the ring, one `io_uring_enter` each (with SQPOLL the syscall is
    /// made only when the polling thread sleeps and must be woken).
    pub enters: u64,
    /// SQEs placed in the submission queue.
    pub sqes: u64,
    /// Ops handed to the fallback thread pool.
    pub fallback_ops: u64,
}

/// The io_uring engine over one disk.
pub struct UringEngine {
    ring: IoUring,
    disk: Arc<Disk>,
    notifier: EventFd,
    sqpoll: bool,
    /// Ops in the ring at most (`queue_depth`; the SQ has at least this many entries and
    /// the CQ twice that, so neither can overflow).
    capacity: usize,
    /// SQEs per `io_uring_enter` at most.
    max_batch: usize,
    /// Ops pushed but not yet in the SQ, with their tags, oldest first (the backlog).
    staged: VecDeque<(u64, EngineOp)>,
    /// Write-zeroes ops in the ring, by tag: one the filesystem refuses goes to the pool,
    /// which needs the op again.
    zeroes_in_ring: HashMap<u64, EngineOp>,
    /// Ops placed in the SQ whose CQE has not been reaped.
    in_ring: usize,
    /// Ops for the fallback pool, handed over at the next submit (or reap, for retries).
    pool_staged: Vec<(u64, EngineOp)>,
    pool: Option<WorkerPool>,
    /// Completions made without the kernel (the pool could not be created).
    ready: Vec<(u64, i64)>,
    stats: UringStats,
}

impl UringEngine {
    /// Creates the engine for `disk`, boxed as the [`IoEngine`] that
    /// [`crate::engine::create_engine`] returns.
    // The signature is what `create_engine` expects of every engine.
    #[allow(clippy::new_ret_no_self)]
    pub fn new(disk: Arc<Disk>, options: &EngineOptions) -> Result<Box<dyn IoEngine>, Error> {
        Ok(Box::new(Self::create(disk, options)?))
    }

    /// Creates the engine for `disk` as its concrete type (for [`UringEngine::stats`]).
    ///
    /// Fails with [`Error::EngineSetup`] when the kernel refuses the ring (e.g. `EPERM`
    /// for SQPOLL without privilege, or io_uring disabled) or the registrations.
    pub fn create(disk: Arc<Disk>, options: &EngineOptions) -> Result<UringEngine, Error> {
        Self::create_with(disk, options, None)
    }

    /// As [`UringEngine::create`], signalling `notifier` (a duplicate) when given.
    pub fn create_with(
        disk: Arc<Disk>,
        options: &EngineOptions,
        notifier: Option<&EventFd>,
    ) -> Result<UringEngine, Error> {
        options.validate()?;
        if disk.backend() == BackendKind::Null || disk.fd() < 0 {
            return Err(Error::InvalidOption(
                "the io_uring engine needs a file or block device, not a null disk".into(),
            ));
        }
        let setup = |source: io::Error| Error::EngineSetup {
            engine: NAME,
            source,
        };
        let (ring, disabled) = build_ring(options).map_err(setup)?;
        let submitter = ring.submitter();
        submitter.register_files(&[disk.fd()]).map_err(setup)?;
        let notifier = crate::engine::notifier_or_new(notifier).map_err(setup)?;
        submitter
            .register_eventfd(notifier.as_raw_fd())
            .map_err(setup)?;
        if disabled {
            restrict(&ring).map_err(setup)?;
        }
        let capacity = options.queue_depth as usize;
        let sqpoll = ring.params().is_setup_sqpoll();
        tracing::debug!(
            path = %disk.path().display(), depth = capacity, sq = ring.params().sq_entries(),
            cq = ring.params().cq_entries(), sqpoll, "io_uring engine ready"
        );
        Ok(UringEngine {
            ring,
            disk,
            notifier,
            sqpoll,
            capacity,
            max_batch: (options.max_batch as usize).clamp(1, capacity),
            staged: VecDeque::with_capacity(capacity),
            zeroes_in_ring: HashMap::new(),
            in_ring: 0,
            pool_staged: Vec::new(),
            pool: None,
            ready: Vec::new(),
            stats: UringStats::default(),
        })
    }

    /// What the engine has handed to the kernel and the pool so far.
    pub fn stats(&self) -> UringStats {
        self.stats
    }

    /// Whether `op` bypasses the ring for the fallback pool.
    fn goes_to_pool(&self, op: &EngineOp) -> bool {
        self.disk.backend() == BackendKind::BlockDevice
            && matches!(op, EngineOp::Discard { .. } | EngineOp::WriteZeroes { .. })
    }

    /// Moves up to `take` staged ops into the SQ (syncing its tail once); returns how many.
    fn fill_sq(&mut self, take: usize) -> usize {
        if take == 0 {
            return 0;
        }
        let mut sq = self.ring.submission();
        let mut placed = 0;
        while placed < take {
            let Some(&(tag, op)) = self.staged.front() else {
                break;
            };
            let entry = sqe_for(&op).user_data(tag);
            // SAFETY: the buffers and iovec arrays the entry points at are the caller's,
            // valid until the op's completion is reaped by `push`'s contract; the fd is
            // our registered file, kept open by `self.disk` and the registration.
            if unsafe { sq.push(&entry) }.is_err() {
                break;
            }
            self.staged.pop_front();
            if let EngineOp::WriteZeroes { .. } = op {
                self.zeroes_in_ring.insert(tag, op);
            }
            placed += 1;
        }
        drop(sq);
        self.in_ring += placed;
        self.stats.sqes += placed as u64;
        placed
    }

    /// Moves staged ops into the ring, one `io_uring_enter` per batch of at most
    /// `max_batch`, until the backlog is empty or the ring holds `capacity` ops.
    fn submit_ring(&mut self) -> Result<(), Error> {
        // SQEs a refused submit left in the SQ go first (never with SQPOLL: the polling
        // thread takes them by itself).
        let mut pending = if self.sqpoll {
            0
        } else {
            self.ring.submission().len()
        };
        loop {
            let room = self.capacity.saturating_sub(self.in_ring);
            let take = self
                .staged
                .len()
                .min(room)
                .min(self.max_batch.saturating_sub(pending));
            pending += self.fill_sq(take);
            if pending == 0 {
                return Ok(());
            }
            let before = pending;
            match self.ring.submit() {
                Ok(_) => {
                    self.stats.enters += 1;
                    pending = if self.sqpoll {
                        0
                    } else {
                        self.ring.submission().len()
                    };
                    if pending >= before {
                        // The kernel took nothing; the SQEs stay for the next submit,
                        // which a wake-up of the caller brings.
                        let _ = self.notifier.write(1);
                        return Ok(());
                    }
                }
                Err(err) if is_transient(&err) => {
                    self.stats.enters += 1;
                    // Short of resources: the SQEs stay queued. Wake the caller so that it
                    // reaps and submits again instead of leaving them stranded.
                    tracing::debug!(%err, pending, "io_uring submit deferred");
                    let _ = self.notifier.write(1);
                    return Ok(());
                }
                Err(source) => {
                    return Err(Error::Submit {
                        engine: NAME,
                        source,
                    });
                }
            }
        }
    }

    /// Runs the task work that holds completions back (see [`build_ring`]): one
    /// `io_uring_enter` with GETEVENTS, which also submits SQEs a refused submit left.
    fn run_task_work(&mut self) {
        match self.ring.submitter().submit_and_wait(0) {
            Ok(_) => self.stats.enters += 1,
            Err(err) if is_transient(&err) => {
                self.stats.enters += 1;
                // Come back for them: the flag stays set.
                let _ = self.notifier.write(1);
            }
            Err(err) => tracing::warn!(%err, "io_uring: cannot run completion task work"),
        }
    }

    /// Hands `pool_staged` to the fallback pool, creating it on first use. If it cannot be
    /// created, the ops complete with the setup error's errno.
    fn hand_to_pool(&mut self) {
        if self.pool_staged.is_empty() {
            return;
        }
        if self.pool.is_none() {
            let created = self
                .notifier
                .try_clone()
                .map_err(|source| Error::EngineSetup {
                    engine: NAME,
                    source,
                })
                .and_then(|notifier| WorkerPool::new(self.disk.clone(), 1, notifier));
            match created {
                Ok(pool) => self.pool = Some(pool),
                Err(err) => {
                    tracing::error!(%err, "io_uring engine: cannot start its fallback pool");
                    let result = error_errno(&err);
                    self.ready
                        .extend(self.pool_staged.drain(..).map(|(tag, _)| (tag, result)));
                    let _ = self.notifier.write(1);
                    return;
                }
            }
        }
        let Some(pool) = self.pool.as_mut() else {
            return;
        };
        for (tag, op) in self.pool_staged.drain(..) {
            // SAFETY: the op's buffers are valid until its completion is reaped (our own
            // `push`'s contract), and we hand its completion back only when reaped from the
            // pool.
            unsafe { pool.push(tag, op) };
            self.stats.fallback_ops += 1;
        }
        pool.submit();
    }
}

impl IoEngine for UringEngine {
    fn name(&self) -> &'static str {
        NAME
    }

    unsafe fn push(&mut self, tag: u64, op: EngineOp) {
        if self.goes_to_pool(&op) {
            self.pool_staged.push((tag, op));
        } else {
            self.staged.push_back((tag, op));
        }
    }

    fn submit(&mut self) -> Result<(), Error> {
        self.hand_to_pool();
        let result = self.submit_ring();
        if !self.ready.is_empty() {
            let _ = self.notifier.write(1);
        }
        result
    }

    fn reap(&mut self, done: &mut dyn FnMut(u64, i64)) {
        let _ = self.notifier.read();
        self.reap_ready(done);
    }

    fn reap_ready(&mut self, done: &mut dyn FnMut(u64, i64)) {
        if self.ring.submission().taskrun() {
            // Completions wait as task work (COOP_TASKRUN sends no IPI to a busy thread):
            // an enter with GETEVENTS runs it and posts their CQEs.
            self.run_task_work();
        }
        let mut retries = false;
        for cqe in self.ring.completion() {
            let tag = cqe.user_data();
            self.in_ring = self.in_ring.saturating_sub(1);
            let result = cqe.result();
            // Most passes have no write-zeroes in the ring: no lookup at all.
            let zeroes = if self.zeroes_in_ring.is_empty() {
                None
            } else {
                self.zeroes_in_ring.remove(&tag)
            };
            if let Some(op) = zeroes
                && result == -libc::EOPNOTSUPP
            {
                self.pool_staged.push((tag, op));
                retries = true;
                continue;
            }
            done(tag, i64::from(result));
        }
        if retries {
            self.hand_to_pool();
        }
        for (tag, result) in self.ready.drain(..) {
            done(tag, result);
        }
        if let Some(pool) = self.pool.as_mut() {
            pool.reap_completions(done);
        }
    }

    fn set_max_batch(&mut self, max_batch: u32) {
        self.max_batch = (max_batch as usize).clamp(1, self.capacity);
    }

    fn has_completions(&mut self) -> bool {
        // The task-work flag before the completion queue: task work that runs between
        // the two looks (a timer tick) clears the flag after filling the queue, so this
        // order cannot miss it, and the other can.
        !self.ready.is_empty()
            || self.ring.submission().taskrun()
            || !self.ring.completion().is_empty()
            || self.pool.as_ref().is_some_and(WorkerPool::has_completions)
    }

    fn notifier(&self) -> &EventFd {
        &self.notifier
    }

    fn in_flight(&self) -> usize {
        self.staged.len()
            + self.in_ring
            + self.pool_staged.len()
            + self.ready.len()
            + self.pool.as_ref().map_or(0, WorkerPool::in_flight)
    }
}

impl Drop for UringEngine {
    /// Waits for the ops in the ring, so that the kernel never writes into (or reads from)
    /// buffers freed after the engine is gone. Staged ops never reached the kernel.
    fn drop(&mut self) {
        let mut refusals = 0u32;
        while self.in_ring > 0 {
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(err) if err.raw_os_error() == Some(libc::EINTR) => {}
                Err(err)
                    if matches!(err.raw_os_error(), Some(libc::EAGAIN | libc::EBUSY))
                        && refusals < 1000 =>
                {
                    refusals += 1;
                    std::thread::sleep(std::time::Duration::from_millis(1));
                }
                Err(err) => {
                    tracing::error!(%err, in_ring = self.in_ring, "io_uring drop cannot wait for its ops");
                    break;
                }
            }
            let reaped = self.ring.completion().count();
            self.in_ring = self.in_ring.saturating_sub(reaped);
        }
    }
}

/// Builds the ring: `queue_depth` SQ entries (CQ twice that), SQPOLL if asked, and where
/// the kernel knows them SUBMIT_ALL (a bad SQE does not stop the batch) and
/// COOP_TASKRUN + TASKRUN_FLAG: a completion is not pushed into a thread busy in user space
/// with an interrupt; the ring's TASKRUN flag shows it instead, and
/// [`IoEngine::has_completions`] / [`IoEngine::reap_ready`] look at that flag. A sleeping
/// thread is still woken and its eventfd signalled as without the flags.
///
/// The ring starts disabled (`R_DISABLED`, Linux 5.10) so that [`restrict`] can limit it
/// before it runs anything; the second value says whether it did (an older kernel gets
/// an unrestricted ring).
fn build_ring(options: &EngineOptions) -> io::Result<(IoUring, bool)> {
    let build = |disabled: bool, submit_all: bool, coop: bool| {
        let mut builder = IoUring::builder();
        if disabled {
            builder.setup_r_disabled();
        }
        if let Some(idle_ms) = options.sqpoll_idle_ms {
            builder.setup_sqpoll(idle_ms);
        }
        if submit_all {
            builder.setup_submit_all();
        }
        if coop {
            builder.setup_coop_taskrun().setup_taskrun_flag();
        }
        builder.build(options.queue_depth)
    };
    let einval =
        |r: &io::Result<IoUring>| matches!(r, Err(e) if e.raw_os_error() == Some(libc::EINVAL));
    for disabled in [true, false] {
        for (submit_all, coop) in [(true, true), (true, false), (false, false)] {
            let ring = build(disabled, submit_all, coop);
            if !einval(&ring) {
                return ring.map(|r| (r, disabled));
            }
        }
    }
    build(false, false, false).map(|r| (r, false))
}

/// Limits the (disabled) ring to the operations the engine submits, on its registered
/// file only, then enables it: a thread that could forge submissions cannot make the
/// ring open files, make sockets or run anything else the process's seccomp filters
/// would refuse as syscalls (io_uring operations are not syscalls). Anything else
/// completes with `-EACCES`.
fn restrict(ring: &IoUring) -> io::Result<()> {
    use io_uring::register::Restriction;
    let mut allowed = [
        Restriction::sqe_op(opcode::Read::CODE),
        Restriction::sqe_op(opcode::Readv::CODE),
        Restriction::sqe_op(opcode::Write::CODE),
        Restriction::sqe_op(opcode::Writev::CODE),
        Restriction::sqe_op(opcode::Fsync::CODE),
        Restriction::sqe_op(opcode::Fallocate::CODE),
        Restriction::sqe_flags_allowed(squeue::Flags::FIXED_FILE.bits()),
        Restriction::sqe_flags_required(squeue::Flags::FIXED_FILE.bits()),
    ];
    let submitter = ring.submitter();
    submitter.register_restrictions(&mut allowed)?;
    submitter.register_enable_rings()
}

/// The SQE for `op` on a regular file (block-device discard/write-zeroes go to the pool).
fn sqe_for(op: &EngineOp) -> squeue::Entry {
    const PUNCH: i32 = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
    const ZERO: i32 = libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE;
    match *op {
        EngineOp::Read { offset, iovecs } => match single(iovecs.as_slice()) {
            Some((base, len)) => opcode::Read::new(DISK, base.cast(), len)
                .offset(offset)
                .build(),
            None => opcode::Readv::new(DISK, iovecs.as_ptr(), iov_count(iovecs.as_slice()))
                .offset(offset)
                .build(),
        },
        EngineOp::Write {
            offset,
            iovecs,
            fua,
        } => {
            let flags = if fua { libc::RWF_DSYNC } else { 0 };
            match single(iovecs.as_slice()) {
                Some((base, len)) => opcode::Write::new(DISK, base.cast_const().cast(), len)
                    .offset(offset)
                    .rw_flags(flags)
                    .build(),
                None => opcode::Writev::new(DISK, iovecs.as_ptr(), iov_count(iovecs.as_slice()))
                    .offset(offset)
                    .rw_flags(flags)
                    .build(),
            }
        }
        EngineOp::Flush => opcode::Fsync::new(DISK)
            .flags(types::FsyncFlags::DATASYNC)
            .build(),
        EngineOp::Discard { offset, len } => opcode::Fallocate::new(DISK, len)
            .offset(offset)
            .mode(PUNCH)
            .build(),
        EngineOp::WriteZeroes { offset, len } => opcode::Fallocate::new(DISK, len)
            .offset(offset)
            .mode(ZERO)
            .build(),
    }
}

/// The buffer of a one-iovec op whose length fits the plain opcodes' u32; `None` sends
/// the op down the vectored path.
fn single(iovs: &[libc::iovec]) -> Option<(*mut libc::c_void, u32)> {
    match iovs {
        [one] => u32::try_from(one.iov_len)
            .ok()
            .map(|len| (one.iov_base, len)),
        _ => None,
    }
}

/// The iovec count as the SQE holds it. A count past `u32::MAX` becomes `u32::MAX`, which
/// the kernel refuses (more than UIO_MAXIOV) with EINVAL before reading any iovec.
fn iov_count(iovs: &[libc::iovec]) -> u32 {
    u32::try_from(iovs.len()).unwrap_or(u32::MAX)
}

/// The negative errno an op gets when the engine cannot run it because of `err`.
fn error_errno(err: &Error) -> i64 {
    match err {
        Error::EngineSetup { source, .. } | Error::Submit { source, .. } => neg_errno(source),
        _ => -i64::from(libc::EIO),
    }
}

/// An `io_uring_enter` failure that only means "not now" (short of resources, or a
/// signal): the SQEs stay queued for the next call.
fn is_transient(err: &std::io::Error) -> bool {
    matches!(
        err.raw_os_error(),
        Some(libc::EAGAIN | libc::EBUSY | libc::EINTR)
    )
}
