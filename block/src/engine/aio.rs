//! The `native` engine: Linux AIO (`io_setup`/`io_submit`/`io_getevents`), as QEMU's
//! `aio=native`.
//!
//! Linux AIO is only asynchronous with O_DIRECT, so the engine refuses disks opened
//! without it. Requests live in a fixed slab of `queue_depth` iocbs; at most that many are
//! in the kernel at once and the rest wait, in order, in a backlog. Every iocb carries
//! `IOCB_FLAG_RESFD` so its completion signals the engine's eventfd.
//!
//! AIO has no fallocate, so discard and write-zeroes (and flushes, on kernels or
//! filesystems that refuse `IOCB_CMD_FDSYNC`) go to a one-thread fallback
//! [`WorkerPool`] created on first need; it signals the same eventfd.

use std::collections::VecDeque;
use std::os::fd::AsRawFd;
use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

use crate::disk::Disk;
use crate::engine::threads::WorkerPool;
use crate::engine::{EngineOp, EngineOptions, IoEngine, IoVecs, neg_errno};
use crate::error::Error;

pub mod abi;

use abi::{AioContext, IoEvent, Iocb};

const ENGINE: &str = "native";

/// Counters of the engine's syscalls, to check batching.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AioStats {
    /// `io_submit` calls made (including ones that failed).
    pub submit_calls: u64,
    /// iocbs the kernel accepted.
    pub iocbs_submitted: u64,
    /// Ops handed to the fallback thread pool (discard, write-zeroes, refused flushes).
    pub pool_ops: u64,
}

/// What to do with a staged op.
enum Plan {
    /// Submit this iocb (its `aio_data` still to be set).
    Kernel(Iocb),
    /// Hand the op to the fallback pool.
    Pool,
    /// Complete at once with this negative errno.
    Fail(i64),
}

/// Linux AIO engine over one O_DIRECT disk.
pub struct AioEngine {
    disk: Arc<Disk>,
    ctx: AioContext,
    notifier: EventFd,
    max_batch: usize,
    /// One iocb per slot; `aio_data` is the slot index. Never reallocated.
    slab: Box<[Iocb]>,
    /// The caller's tag of the op in each slot.
    tags: Box<[u64]>,
    /// Free slot indexes.
    free: Vec<u32>,
    /// Ops pushed and not yet given a slot (the backlog), in order.
    staged: VecDeque<(u64, EngineOp)>,
    /// Slots filled but not yet accepted by the kernel, in order.
    prepared: VecDeque<u32>,
    /// iocb addresses for one `io_submit` call (reused).
    batch: Vec<usize>,
    /// Buffer for `io_getevents` (reused).
    events: Box<[IoEvent]>,
    /// iocbs the kernel holds.
    in_kernel: usize,
    /// Completions decided without the kernel (submission errors).
    ready: Vec<(u64, i64)>,
    /// Fallback for what AIO cannot do; created on first need.
    pool: Option<WorkerPool>,
    /// Ops were pushed to the pool since its last `submit`.
    pool_pending: bool,
    /// The kernel refused `IOCB_CMD_FDSYNC` once: flushes go to the pool.
    fdsync_unsupported: bool,
    stats: AioStats,
}

impl AioEngine {
    /// Creates the engine for `disk` as a trait object (see [`AioEngine::create`]).
    // The signature `create_engine` expects of every engine.
    #[allow(clippy::new_ret_no_self)]
    pub fn new(disk: Arc<Disk>, options: &EngineOptions) -> Result<Box<dyn IoEngine>, Error> {
        Ok(Box::new(Self::create(disk, options)?))
    }

    /// Creates the engine: checks that `disk` uses O_DIRECT, sets up an AIO context of
    /// `options.queue_depth` and the slab.
    pub fn create(disk: Arc<Disk>, options: &EngineOptions) -> Result<AioEngine, Error> {
        Self::create_with(disk, options, None)
    }

    /// As [`AioEngine::create`], signalling `notifier` (a duplicate) when given.
    pub fn create_with(
        disk: Arc<Disk>,
        options: &EngineOptions,
        notifier: Option<&EventFd>,
    ) -> Result<AioEngine, Error> {
        if !disk.cache().direct() {
            return Err(Error::NativeNeedsDirect {
                cache: disk.cache(),
            });
        }
        options.validate()?;
        let depth = options.queue_depth as usize;
        let notifier =
            crate::engine::notifier_or_new(notifier).map_err(|source| Error::EngineSetup {
                engine: ENGINE,
                source,
            })?;
        let ctx = abi::io_setup(options.queue_depth).map_err(|source| Error::EngineSetup {
            engine: ENGINE,
            source,
        })?;
        let max_batch = (options.max_batch as usize).clamp(1, depth);
        Ok(AioEngine {
            disk,
            ctx,
            notifier,
            max_batch,
            slab: vec![Iocb::default(); depth].into_boxed_slice(),
            tags: vec![0; depth].into_boxed_slice(),
            free: (0..options.queue_depth).rev().collect(),
            staged: VecDeque::with_capacity(depth),
            prepared: VecDeque::with_capacity(max_batch),
            batch: Vec::with_capacity(max_batch),
            events: vec![IoEvent::default(); depth].into_boxed_slice(),
            in_kernel: 0,
            ready: Vec::with_capacity(depth),
            pool: None,
            pool_pending: false,
            fdsync_unsupported: false,
            stats: AioStats::default(),
        })
    }

    /// The syscall counters so far.
    pub fn stats(&self) -> AioStats {
        self.stats
    }

    /// Decides how `op` is carried out and builds its iocb.
    fn plan(&self, op: &EngineOp) -> Plan {
        let base = Iocb {
            // The kernel ABI holds descriptors as u32; open ones are non-negative, so the
            // reinterpretation keeps the value (a closed -1 stays invalid: EBADF).
            aio_fildes: self.disk.fd().cast_unsigned(),
            aio_flags: abi::IOCB_FLAG_RESFD,
            aio_resfd: self.notifier.as_raw_fd().cast_unsigned(),
            ..Iocb::default()
        };
        match *op {
            EngineOp::Read { offset, iovecs } => rw_iocb(
                base,
                abi::IOCB_CMD_PREAD,
                abi::IOCB_CMD_PREADV,
                offset,
                iovecs,
            ),
            EngineOp::Write {
                offset,
                iovecs,
                fua,
            } => match rw_iocb(
                base,
                abi::IOCB_CMD_PWRITE,
                abi::IOCB_CMD_PWRITEV,
                offset,
                iovecs,
            ) {
                Plan::Kernel(mut iocb) => {
                    if fua {
                        iocb.aio_rw_flags = libc::RWF_DSYNC;
                    }
                    Plan::Kernel(iocb)
                }
                other => other,
            },
            EngineOp::Flush if !self.fdsync_unsupported => Plan::Kernel(Iocb {
                aio_lio_opcode: abi::IOCB_CMD_FDSYNC,
                ..base
            }),
            EngineOp::Flush | EngineOp::Discard { .. } | EngineOp::WriteZeroes { .. } => Plan::Pool,
        }
    }

    /// Moves staged ops into slots until `max_batch` are prepared, no slot is free or the
    /// backlog is empty. Ops for the pool (or failing at once) leave the backlog on the way.
    fn fill_batch(&mut self) {
        while self.prepared.len() < self.max_batch {
            let Some(&(tag, op)) = self.staged.front() else {
                break;
            };
            match self.plan(&op) {
                Plan::Kernel(iocb) => {
                    let Some(slot) = self.free.pop() else {
                        break;
                    };
                    self.staged.pop_front();
                    let i = slot as usize;
                    self.slab[i] = Iocb {
                        aio_data: u64::from(slot),
                        ..iocb
                    };
                    self.tags[i] = tag;
                    self.prepared.push_back(slot);
                }
                Plan::Pool => {
                    self.staged.pop_front();
                    self.send_to_pool(tag, op);
                }
                Plan::Fail(res) => {
                    self.staged.pop_front();
                    self.complete_now(tag, res);
                }
            }
        }
    }

    /// Completes `tag` without the kernel: queues the result and signals the notifier.
    fn complete_now(&mut self, tag: u64, res: i64) {
        self.ready.push((tag, res));
        // A failed write means the counter is saturated, i.e. already signalled.
        let _ = self.notifier.write(1);
    }

    /// Hands `op` to the fallback pool, creating it on first use.
    fn send_to_pool(&mut self, tag: u64, op: EngineOp) {
        let pool = match self.pool.as_mut() {
            Some(pool) => pool,
            None => {
                let created = self
                    .notifier
                    .try_clone()
                    .map_err(|source| Error::EngineSetup {
                        engine: ENGINE,
                        source,
                    })
                    .and_then(|n| WorkerPool::new(self.disk.clone(), 1, n));
                match created {
                    Ok(pool) => self.pool.insert(pool),
                    Err(err) => {
                        tracing::warn!(%err, "native engine: cannot start the fallback pool");
                        self.complete_now(tag, -i64::from(libc::EIO));
                        return;
                    }
                }
            }
        };
        // SAFETY: `op` was given to our `push`, whose caller promised its buffers stay
        // valid until `tag` is reaped; the pool's completions are reaped through us.
        unsafe { pool.push(tag, op) };
        self.pool_pending = true;
        self.stats.pool_ops += 1;
    }

    /// Starts what was handed to the pool since the last call.
    fn kick_pool(&mut self) {
        if self.pool_pending {
            self.pool_pending = false;
            if let Some(pool) = self.pool.as_mut() {
                pool.submit();
            }
        }
    }

    /// The first prepared iocb was refused by `io_submit` with `err`: complete it (or, for
    /// an FDSYNC the kernel does not support, reroute it to the pool).
    fn submit_failed(&mut self, err: &std::io::Error) {
        let Some(slot) = self.prepared.pop_front() else {
            return;
        };
        let i = slot as usize;
        let tag = self.tags[i];
        let opcode = self.slab[i].aio_lio_opcode;
        self.free.push(slot);
        if opcode == abi::IOCB_CMD_FDSYNC && err.raw_os_error() == Some(libc::EINVAL) {
            self.flush_unsupported(tag);
        } else {
            self.complete_now(tag, neg_errno(err));
        }
    }

    /// Remembers that AIO cannot flush this file and sends flush `tag` to the pool.
    fn flush_unsupported(&mut self, tag: u64) {
        if !self.fdsync_unsupported {
            tracing::info!("native engine: IOCB_CMD_FDSYNC refused, flushing with fdatasync");
            self.fdsync_unsupported = true;
        }
        self.send_to_pool(tag, EngineOp::Flush);
    }

    /// The kernel cannot take more right now. If nothing of ours is in the kernel, no
    /// completion would ever wake the caller, so signal the notifier to get another pass.
    fn stalled(&mut self) {
        if self.in_kernel == 0 {
            tracing::debug!("native engine: io_submit has no room and nothing is in flight");
            let _ = self.notifier.write(1);
        }
    }

    /// Frees the slot of a kernel completion and reports it.
    fn complete_event(&mut self, ev: IoEvent, done: &mut dyn FnMut(u64, i64)) {
        // `aio_data` holds the u32 slot, so a valid one converts both ways.
        let Some((i, slot)) = usize::try_from(ev.data)
            .ok()
            .zip(u32::try_from(ev.data).ok())
            .filter(|&(i, _)| i < self.slab.len())
        else {
            tracing::error!(
                data = ev.data,
                "native engine: completion for an unknown iocb"
            );
            return;
        };
        let tag = self.tags[i];
        let opcode = self.slab[i].aio_lio_opcode;
        self.free.push(slot);
        self.in_kernel = self.in_kernel.saturating_sub(1);
        if opcode == abi::IOCB_CMD_FDSYNC && ev.res == -i64::from(libc::EINVAL) {
            self.flush_unsupported(tag);
        } else {
            done(tag, ev.res);
        }
    }
}

/// Builds a read or write iocb: the plain opcode for one buffer, the vectored one for
/// several.
fn rw_iocb(base: Iocb, single: u16, vectored: u16, offset: u64, iovecs: IoVecs) -> Plan {
    let Ok(offset) = i64::try_from(offset) else {
        return Plan::Fail(-i64::from(libc::EINVAL));
    };
    let (opcode, buf, nbytes) = match iovecs.as_slice() {
        [one] => (single, one.iov_base as u64, one.iov_len as u64),
        _ => (vectored, iovecs.as_ptr() as u64, iovecs.count() as u64),
    };
    Plan::Kernel(Iocb {
        aio_lio_opcode: opcode,
        aio_buf: buf,
        aio_nbytes: nbytes,
        aio_offset: offset,
        ..base
    })
}

impl IoEngine for AioEngine {
    fn name(&self) -> &'static str {
        ENGINE
    }

    unsafe fn push(&mut self, tag: u64, op: EngineOp) {
        self.staged.push_back((tag, op));
    }

    fn submit(&mut self) -> Result<(), Error> {
        loop {
            self.fill_batch();
            if self.prepared.is_empty() {
                break;
            }
            let count = self.prepared.len().min(self.max_batch);
            self.batch.clear();
            // A mutable pointer: the kernel writes `aio_key` back into each iocb.
            let base = self.slab.as_mut_ptr();
            for &slot in self.prepared.iter().take(count) {
                self.batch.push(base.wrapping_add(slot as usize) as usize);
            }
            // SAFETY: every address in `batch` points into `slab`, which is neither moved
            // nor reallocated while the engine lives and is not touched during the call;
            // the buffers the iocbs name stay valid until reaped (`push`'s contract), and
            // drop waits for every accepted iocb before the context goes away.
            let result = unsafe { abi::io_submit(self.ctx, &self.batch) };
            self.stats.submit_calls += 1;
            match result {
                Ok(0) => {
                    self.stalled();
                    break;
                }
                Ok(n) => {
                    let n = n.min(count);
                    self.prepared.drain(..n);
                    self.in_kernel += n;
                    self.stats.iocbs_submitted += n as u64;
                }
                Err(err) => match err.raw_os_error() {
                    Some(libc::EAGAIN) | Some(libc::EINTR) => {
                        self.stalled();
                        break;
                    }
                    // Anything else is about the first iocb of the call.
                    _ => self.submit_failed(&err),
                },
            }
        }
        self.kick_pool();
        Ok(())
    }

    fn reap(&mut self, done: &mut dyn FnMut(u64, i64)) {
        let _ = self.notifier.read();
        self.reap_ready(done);
    }

    fn reap_ready(&mut self, done: &mut dyn FnMut(u64, i64)) {
        let zero = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        while self.in_kernel > 0 {
            let want = self.events.len();
            let n = match abi::io_getevents(self.ctx, 0, &mut self.events, Some(&zero)) {
                Ok(n) => n.min(want),
                Err(err) => {
                    tracing::warn!(%err, "native engine: io_getevents failed");
                    // Completions may remain: make sure the caller comes back for them.
                    let _ = self.notifier.write(1);
                    break;
                }
            };
            for i in 0..n {
                let ev = self.events[i];
                self.complete_event(ev, done);
            }
            if n < want {
                break;
            }
        }
        for (tag, res) in self.ready.drain(..) {
            done(tag, res);
        }
        self.kick_pool();
        if let Some(pool) = self.pool.as_mut() {
            pool.reap_completions(done);
        }
    }

    fn set_max_batch(&mut self, max_batch: u32) {
        self.max_batch = (max_batch as usize).clamp(1, self.slab.len());
    }

    fn has_completions(&mut self) -> bool {
        !self.ready.is_empty()
            || (self.in_kernel > 0 && abi::ring_has_events(self.ctx))
            || self.pool.as_ref().is_some_and(WorkerPool::has_completions)
    }

    fn notifier(&self) -> &EventFd {
        &self.notifier
    }

    fn in_flight(&self) -> usize {
        self.staged.len()
            + self.prepared.len()
            + self.in_kernel
            + self.ready.len()
            + self.pool.as_ref().map_or(0, |p| p.in_flight())
    }
}

impl Drop for AioEngine {
    fn drop(&mut self) {
        // The kernel writes into the callers' buffers (and reads our iocbs' iovecs) until
        // each op completes: wait for all of them before the context goes away.
        while self.in_kernel > 0 {
            match abi::io_getevents(self.ctx, 1, &mut self.events, None) {
                Ok(n) => self.in_kernel = self.in_kernel.saturating_sub(n),
                Err(err) if err.raw_os_error() == Some(libc::EINTR) => {}
                Err(err) => {
                    // io_destroy below still waits for in-flight requests.
                    tracing::warn!(%err, "native engine: io_getevents failed in drop");
                    break;
                }
            }
        }
        if let Err(err) = abi::io_destroy(self.ctx) {
            tracing::warn!(%err, "native engine: io_destroy failed");
        }
    }
}

#[cfg(test)]
mod tests;
