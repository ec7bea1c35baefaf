//! [`DiskQueue`]: what a virtqueue's iothread uses to do I/O on a disk.
//!
//! It applies the disk's rules before anything reaches an engine: range and read-only
//! checks, the cache mode (FUA on every write, flushes honoured or completed at once),
//! O_DIRECT alignment (misaligned guest buffers go through an aligned bounce buffer, never
//! to EINVAL), and short transfers. It counts every request in the disk's counters.
//!
//! Use: queue requests (`read`, `write`, `flush`, `discard`, `write_zeroes`), call
//! [`DiskQueue::submit`] once per pass, and call [`DiskQueue::reap`] when
//! [`DiskQueue::completion_fd`] is readable.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vmm_sys_util::errno::Error as Errno;
use vmm_sys_util::eventfd::EventFd;

use crate::bounce::{AlignedBuf, zero_from};
use crate::counters::{DiskCounters, QueueCounters};
use crate::disk::{BackendKind, Disk};
use crate::engine::{EngineOp, EngineOptions, IoEngine, IoVecs, create_engine_sharing};
use crate::error::Error;
use crate::jobs::DirtyBitmap;

/// Most iovecs one request may pass to the kernel; longer lists are bounced.
const IOV_MAX: usize = 1024;

/// The kind of a block request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RequestKind {
    /// Read data.
    Read = 0,
    /// Write data.
    Write = 1,
    /// Make written data durable.
    Flush = 2,
    /// Deallocate a range.
    Discard = 3,
    /// Zero a range.
    WriteZeroes = 4,
}

impl RequestKind {
    /// Whether it changes the disk's data (a write, write-zeroes or discard).
    pub fn changes_data(self) -> bool {
        matches!(
            self,
            RequestKind::Write | RequestKind::WriteZeroes | RequestKind::Discard
        )
    }
}

/// A finished request.
#[derive(Debug, PartialEq, Eq)]
pub struct Completion {
    /// The caller's token.
    pub token: u64,
    /// What it was.
    pub kind: RequestKind,
    /// Bytes read, written, discarded or zeroed (0 for a flush), or the errno.
    pub result: Result<u64, Errno>,
}

/// Most requests a queue tracks: tokens are below this (see [`DiskQueue::read`]).
pub const MAX_TOKENS: u64 = 1 << 16;

/// The state of the request named by one token, between queueing and completion.
struct Slot {
    /// A request of this token is with the engine.
    busy: bool,
    kind: RequestKind,
    offset: u64,
    len: u64,
    start: Instant,
    /// What the engine reads or writes: the guest's iovecs, or one over `bounce`.
    iovecs: Vec<libc::iovec>,
    /// The guest's iovecs when `bounce` stands in for them.
    guest: Vec<libc::iovec>,
    bounce: Option<AlignedBuf>,
    /// Being written to a write-blocking mirror's target; `primary` is the disk's result.
    mirroring: bool,
    primary: i64,
    /// The copy epochs of its chunks when it started (write-blocking mirror only).
    epochs: Vec<u8>,
}

/// One queue's I/O on one disk: an engine plus the rules of the disk and its cache mode.
pub struct DiskQueue {
    disk: Arc<Disk>,
    engine: Box<dyn IoEngine>,
    /// The completion eventfd, shared by every engine the queue uses (one stays for the
    /// queue's life, whatever engine it switches to).
    notifier: EventFd,
    /// The engine settings (for engines made later: a mirror target, a pivot).
    options: EngineOptions,
    /// A mirror job's link and, in write-blocking mode, the engine on its target.
    mirror: Option<mirror::QueueMirror>,
    counters: QueueCounters,
    /// By token: the caller's tag is the engine's too, so no table of ours maps one to
    /// the other.
    slots: Vec<Slot>,
    ready: Vec<Completion>,
    write_cache: bool,
    /// The caller sleeps on the completion fd (see [`DiskQueue::set_notify`]).
    notify: bool,
    /// The time stamped on requests queued and reaped, set once per pass by the caller
    /// ([`DiskQueue::set_clock`]); `None`: read the clock per request.
    clock: Option<Instant>,
    /// Moving average of the engine's completion latency in ns (weight 1/8 per request).
    latency_avg_ns: u64,
    /// A block job's dirty bitmap: marked by every request that changed data, once the
    /// engine finished it.
    dirty: Option<Arc<DirtyBitmap>>,
}

// SAFETY: the raw pointers a DiskQueue holds (iovecs into guest memory and bounce buffers)
// stay valid per the contracts of `read`/`write`, whichever thread uses the queue; the
// queue is used by one thread at a time (&mut self everywhere).
unsafe impl Send for DiskQueue {}

impl DiskQueue {
    /// A queue on `disk` with an engine per `options`, counting into `counters`.
    pub fn new(
        disk: Arc<Disk>,
        options: &EngineOptions,
        counters: Arc<DiskCounters>,
    ) -> Result<DiskQueue, Error> {
        Self::sharing(disk, options, counters, None)
    }

    /// As [`DiskQueue::new`], with `notifier` (duplicated) as its completion eventfd
    /// when given: queues sharing one wake one waiter (a mirror job's source and target).
    pub fn sharing(
        disk: Arc<Disk>,
        options: &EngineOptions,
        counters: Arc<DiskCounters>,
        notifier: Option<&EventFd>,
    ) -> Result<DiskQueue, Error> {
        let engine = create_engine_sharing(&disk, options, notifier)?;
        let mut queue = Self::with_engine(disk, engine, counters)?;
        queue.options = *options;
        Ok(queue)
    }

    /// A queue over an engine made elsewhere (tests, custom engines).
    pub fn with_engine(
        disk: Arc<Disk>,
        engine: Box<dyn IoEngine>,
        counters: Arc<DiskCounters>,
    ) -> Result<DiskQueue, Error> {
        let write_cache = disk.cache().write_cache();
        let notifier = engine
            .notifier()
            .try_clone()
            .map_err(|source| Error::EngineSetup {
                engine: engine.name(),
                source,
            })?;
        Ok(DiskQueue {
            disk,
            engine,
            notifier,
            options: EngineOptions::default(),
            mirror: None,
            counters: QueueCounters::new(counters),
            slots: Vec::new(),
            ready: Vec::new(),
            write_cache,
            notify: true,
            clock: None,
            latency_avg_ns: 0,
            dirty: None,
        })
    }

    /// Attaches (or with `None` detaches) a block job's dirty bitmap: from now on every
    /// write, write-zeroes and discard marks the chunks of its range when the engine has
    /// finished it, whatever the result (a failed write may have changed part of its
    /// range). Marking at completion, not at submission, is what lets a copier that read
    /// a chunk while a write was in flight see it dirty again.
    pub fn set_dirty_bitmap(&mut self, bitmap: Option<Arc<DirtyBitmap>>) {
        self.dirty = bitmap;
    }

    /// Makes every later request go to `disk` through `engine`, made for it on this
    /// queue's completion eventfd (`create_engine_sharing(&disk, queue.options(),
    /// Some(queue.notifier()))`, on whichever thread may make engines): a mirror's pivot.
    /// Needs nothing in flight and no mirror attached (`EBUSY`).
    pub fn switch_disk(
        &mut self,
        disk: Arc<Disk>,
        mut engine: Box<dyn IoEngine>,
    ) -> Result<(), Error> {
        if self.in_flight() > 0 || self.mirror.is_some() {
            return Err(Error::Submit {
                engine: self.engine.name(),
                source: std::io::Error::from_raw_os_error(libc::EBUSY),
            });
        }
        engine.set_max_batch(self.options.max_batch);
        engine.set_notify(self.notify);
        self.engine = engine;
        self.disk = disk;
        Ok(())
    }

    /// The engine settings the queue was made with (its current batch size).
    pub fn options(&self) -> &EngineOptions {
        &self.options
    }

    /// The disk this queue serves.
    pub fn disk(&self) -> &Arc<Disk> {
        &self.disk
    }

    /// The disk's counters.
    pub fn counters(&self) -> &Arc<DiskCounters> {
        self.counters.disk()
    }

    /// Adds time requests of this queue spent waiting for the throttle.
    pub fn add_throttled_ns(&self, ns: u64) {
        self.counters.add_throttled_ns(ns);
    }

    /// The engine's name.
    pub fn engine_name(&self) -> &'static str {
        self.engine.name()
    }

    /// Whether the guest currently sees a volatile write cache (virtio-blk WCE).
    pub fn write_cache(&self) -> bool {
        self.write_cache
    }

    /// Turns the guest-visible write cache on or off (the guest's writeback config
    /// byte). With it off, every write is FUA.
    pub fn set_write_cache(&mut self, enabled: bool) {
        self.write_cache = enabled;
    }

    /// Changes the most requests submitted per syscall (at least 1).
    pub fn set_max_batch(&mut self, max_batch: u32) {
        self.options.max_batch = max_batch.clamp(1, self.options.queue_depth.max(1));
        self.engine.set_max_batch(max_batch.max(1));
    }

    /// Stamps requests queued and completions reaped with `now` (latency counters) until
    /// the next call, instead of reading the clock for each: an iothread reads it once per
    /// pass. `None` goes back to one reading per request.
    pub fn set_clock(&mut self, now: Option<Instant>) {
        self.clock = now;
    }

    /// `false`: the caller promises to check [`DiskQueue::has_completions`] after every
    /// [`DiskQueue::submit`] and before it sleeps, and to set `true` before sleeping on
    /// [`DiskQueue::completion_fd`]; meanwhile completions made without the kernel (the null
    /// engine, requests failed at once) skip the eventfd write.
    pub fn set_notify(&mut self, enabled: bool) {
        self.notify = enabled;
        self.engine.set_notify(enabled);
    }

    /// Moving average of how long the engine took per request lately (queueing to
    /// reaping, in ns; each completion weighs 1/8).
    pub fn recent_latency_ns(&self) -> u64 {
        self.latency_avg_ns
    }

    /// Makes [`DiskQueue::completion_fd`] readable, so that a caller sleeping on it comes
    /// back (e.g. for work it chose to leave for later).
    pub fn wake(&self) {
        let _ = self.notifier.write(1);
    }

    /// The completion eventfd itself (to share with another queue, see
    /// [`DiskQueue::sharing`]).
    pub fn notifier(&self) -> &EventFd {
        &self.notifier
    }

    /// Eventfd that is readable when completions wait for [`DiskQueue::reap`]; the same
    /// for the queue's life.
    pub fn completion_fd(&self) -> RawFd {
        self.notifier.as_raw_fd()
    }

    /// Whether the engine does every request as it is queued (see
    /// [`crate::engine::IoEngine::completes_inline`]): reapable before the submit.
    pub fn completes_inline(&self) -> bool {
        self.engine.completes_inline()
    }

    /// Whether completions may wait for [`DiskQueue::reap`], checked without a syscall
    /// where the engine allows; for adaptive polling before sleeping on
    /// [`DiskQueue::completion_fd`]. Never false while a completion waits.
    pub fn has_completions(&mut self) -> bool {
        !self.ready.is_empty()
            || self.engine.has_completions()
            || self
                .mirror
                .as_mut()
                .is_some_and(mirror::QueueMirror::has_completions)
    }

    /// Requests queued and not yet reaped.
    pub fn in_flight(&self) -> usize {
        self.engine.in_flight()
            + self.ready.len()
            + self
                .mirror
                .as_ref()
                .map_or(0, mirror::QueueMirror::in_flight)
    }

    /// Queues a read of `iovecs`' total length from byte `offset`. `token` names the
    /// request until its completion: the caller's own slot index, unique among this
    /// queue's requests in flight and below [`MAX_TOKENS`] (it passes through to the
    /// engine as its tag). A token out of range or still in flight fails the request
    /// (`EINVAL`, `EBUSY`).
    ///
    /// # Safety
    /// The iovecs must describe writable memory that nobody else touches until this
    /// request's completion has been reaped. The slice itself is copied.
    pub unsafe fn read(&mut self, token: u64, offset: u64, iovecs: &[libc::iovec]) {
        // SAFETY: forwarded contract.
        unsafe { self.queue_data(token, RequestKind::Read, offset, iovecs, false) }
    }

    /// Queues a write of `iovecs` at byte `offset`; `fua` makes it durable before it
    /// completes (it always is when the write cache is off). `token` as for
    /// [`DiskQueue::read`].
    ///
    /// # Safety
    /// The iovecs must describe readable memory that stays valid and unchanged until this
    /// request's completion has been reaped. The slice itself is copied.
    pub unsafe fn write(&mut self, token: u64, offset: u64, iovecs: &[libc::iovec], fua: bool) {
        // SAFETY: forwarded contract.
        unsafe { self.queue_data(token, RequestKind::Write, offset, iovecs, fua) }
    }

    /// Queues a flush; completes at once when the cache mode ignores flushes.
    pub fn flush(&mut self, token: u64) {
        let start = self.start();
        if !self.disk.cache().flush_honoured() {
            return self.finish_now(token, RequestKind::Flush, start, Ok(0));
        }
        if self
            .take_slot(token, RequestKind::Flush, 0, 0, start)
            .is_some()
        {
            // SAFETY: a flush carries no buffers.
            unsafe { self.engine.push(token, EngineOp::Flush) };
        }
    }

    /// Queues a discard of `len` bytes at `offset`.
    pub fn discard(&mut self, token: u64, offset: u64, len: u64) {
        self.queue_range(token, RequestKind::Discard, offset, len);
    }

    /// Queues zeroing `len` bytes at `offset`.
    pub fn write_zeroes(&mut self, token: u64, offset: u64, len: u64) {
        self.queue_range(token, RequestKind::WriteZeroes, offset, len);
    }

    /// Submits everything queued since the last call (one syscall per batch).
    pub fn submit(&mut self) -> Result<(), Error> {
        self.engine.submit()?;
        if self.notify && !self.ready.is_empty() {
            // Requests finished without the engine: make the completion fd readable.
            self.notifier.write(1).map_err(|e| Error::Submit {
                engine: self.engine.name(),
                source: e,
            })?;
        }
        Ok(())
    }

    /// Clears the completion fd, hands every finished request to `done` and returns how
    /// many there were. Never blocks. Requests that waited for room in the engine are
    /// submitted.
    pub fn reap(&mut self, done: impl FnMut(Completion)) -> Result<usize, Error> {
        let _ = self.notifier.read();
        self.reap_ready(done)
    }

    /// As [`DiskQueue::reap`] without reading the completion fd: for callers that poll
    /// [`DiskQueue::has_completions`] or watch the fd edge-triggered (one syscall less per
    /// pass).
    pub fn reap_ready(&mut self, mut done: impl FnMut(Completion)) -> Result<usize, Error> {
        let mut reaped = 0;
        let now = self.clock.unwrap_or_else(Instant::now);
        let DiskQueue {
            engine,
            slots,
            counters,
            ready,
            latency_avg_ns,
            dirty,
            mirror,
            ..
        } = self;
        let mut mirrored = 0;
        engine.reap_ready(&mut |tag, result| {
            let Some(slot) = usize::try_from(tag)
                .ok()
                .and_then(|t| slots.get_mut(t))
                .filter(|s| s.busy && !s.mirroring)
            else {
                tracing::error!(tag, "engine returned an unknown tag");
                return;
            };
            if let Some(m) = mirror.as_mut()
                && m.start_write(tag, slot, result)
            {
                // Completes when the target has it too.
                mirrored += 1;
                return;
            }
            let latency = nanos(now.saturating_duration_since(slot.start));
            *latency_avg_ns = (*latency_avg_ns * 7 + latency) / 8;
            let completion = finish_slot(tag, slot, result, counters, latency);
            if let Some(bitmap) = dirty.as_ref().filter(|_| slot.kind.changes_data()) {
                bitmap.mark(slot.offset, slot.len);
            }
            reaped += 1;
            done(completion);
        });
        if let Some(m) = mirror.as_mut() {
            m.reap(
                &mut |tag, slot| {
                    let latency = nanos(now.saturating_duration_since(slot.start));
                    *latency_avg_ns = (*latency_avg_ns * 7 + latency) / 8;
                    let result = slot.primary;
                    reaped += 1;
                    done(finish_slot(tag, slot, result, counters, latency));
                },
                slots,
            );
            if mirrored > 0 || m.in_flight() > 0 {
                m.submit()?;
            }
        }
        for completion in ready.drain(..) {
            reaped += 1;
            done(completion);
        }
        if reaped > 0 && self.engine.in_flight() > 0 {
            self.engine.submit()?;
        }
        Ok(reaped)
    }

    /// Waits until every queued request has completed, handing each to `done`; used on
    /// shutdown and removal so nothing in flight is lost. Gives up after `timeout`.
    pub fn drain(
        &mut self,
        timeout: Duration,
        mut done: impl FnMut(Completion),
    ) -> Result<(), Error> {
        let deadline = Instant::now() + timeout;
        self.submit()?;
        while self.in_flight() > 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(Error::Submit {
                    engine: self.engine.name(),
                    source: std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!("{} requests still in flight", self.in_flight()),
                    ),
                });
            }
            let mut pfd = libc::pollfd {
                fd: self.completion_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            let ms = left.as_millis().clamp(1, 100) as i32;
            // SAFETY: poll reads and writes exactly the one pollfd we pass.
            unsafe { libc::poll(&mut pfd, 1, ms) };
            self.reap(&mut done)?;
        }
        Ok(())
    }

    fn start(&self) -> Instant {
        self.counters.record_start();
        self.clock.unwrap_or_else(Instant::now)
    }

    /// # Safety
    /// As `read`/`write`.
    unsafe fn queue_data(
        &mut self,
        token: u64,
        kind: RequestKind,
        offset: u64,
        iovecs: &[libc::iovec],
        fua: bool,
    ) {
        let start = self.start();
        let len = iovecs
            .iter()
            .try_fold(0u64, |sum, v| sum.checked_add(v.iov_len as u64));
        let Some(len) = len else {
            return self.finish_now(token, kind, start, Err(Errno::new(libc::EINVAL)));
        };
        if let Err(errno) = self.check(kind, offset, len, self.disk.offset_align()) {
            return self.finish_now(token, kind, start, Err(errno));
        }
        if len == 0 {
            return self.finish_now(token, kind, start, Ok(0));
        }
        let bounce = iovecs.len() > IOV_MAX || !self.buffers_aligned(iovecs);
        let align = self.disk.mem_align().max(self.disk.offset_align()) as usize;
        let Some(slot) = self.take_slot(token, kind, offset, len, start) else {
            return;
        };
        if bounce {
            // A total past the address space cannot be bounced (32-bit hosts only).
            let buf = usize::try_from(len)
                .ok()
                .and_then(|len| AlignedBuf::new(len, align));
            let Some(mut buf) = buf else {
                slot.busy = false;
                return self.finish_now(token, kind, start, Err(Errno::new(libc::ENOMEM)));
            };
            if kind == RequestKind::Write {
                // SAFETY: the caller vouches the iovecs are readable.
                unsafe { buf.gather_from(iovecs) };
            }
            slot.iovecs.push(buf.iovec());
            slot.guest.extend_from_slice(iovecs);
            slot.bounce = Some(buf);
        } else {
            slot.iovecs.extend_from_slice(iovecs);
        }
        // SAFETY: `slot.iovecs` is not touched again until the slot is finished, and what
        // it points at is valid per the caller's contract (or is our bounce buffer).
        let vecs = unsafe { IoVecs::new(slot.iovecs.as_ptr(), slot.iovecs.len()) };
        let op = match kind {
            RequestKind::Read => EngineOp::Read {
                offset,
                iovecs: vecs,
            },
            _ => EngineOp::Write {
                offset,
                iovecs: vecs,
                fua: fua || !self.write_cache,
            },
        };
        // SAFETY: see above; the buffers outlive the op.
        unsafe { self.engine.push(token, op) };
    }

    fn queue_range(&mut self, token: u64, kind: RequestKind, offset: u64, len: u64) {
        let start = self.start();
        // Block devices take discard/zeroing in logical blocks; files take any range.
        let align = match self.disk.backend() {
            BackendKind::BlockDevice => self.disk.logical_block_size(),
            // An NBD server with a minimum block size wants ranges in it.
            BackendKind::Nbd => self.disk.offset_align(),
            _ => 1,
        };
        if let Err(errno) = self.check(kind, offset, len, align) {
            return self.finish_now(token, kind, start, Err(errno));
        }
        if len == 0 {
            return self.finish_now(token, kind, start, Ok(0));
        }
        if self.take_slot(token, kind, offset, len, start).is_none() {
            return;
        }
        let op = match kind {
            RequestKind::Discard => EngineOp::Discard { offset, len },
            _ => EngineOp::WriteZeroes { offset, len },
        };
        // SAFETY: discard and write-zeroes carry no buffers.
        unsafe { self.engine.push(token, op) };
    }

    /// Read-only, range and offset-alignment checks shared by every data request.
    fn check(&self, kind: RequestKind, offset: u64, len: u64, align: u32) -> Result<(), Errno> {
        if kind != RequestKind::Read && self.disk.readonly() {
            return Err(Errno::new(libc::EROFS));
        }
        match offset.checked_add(len) {
            Some(end) if end <= self.disk.capacity() => {}
            _ => return Err(Errno::new(libc::EINVAL)),
        }
        let align = u64::from(align.max(1));
        if !offset.is_multiple_of(align) || !len.is_multiple_of(align) {
            return Err(Errno::new(libc::EINVAL));
        }
        Ok(())
    }

    fn buffers_aligned(&self, iovecs: &[libc::iovec]) -> bool {
        if !self.disk.needs_alignment() {
            return true;
        }
        let mem = self.disk.mem_align() as usize;
        let len = self.disk.offset_align() as usize;
        iovecs
            .iter()
            .all(|v| (v.iov_base as usize).is_multiple_of(mem) && v.iov_len % len == 0)
    }

    /// The slot of `token`, made ready for a new request; `None` (the request failed at
    /// once) when the token is out of range or still in flight.
    fn take_slot(
        &mut self,
        token: u64,
        kind: RequestKind,
        offset: u64,
        len: u64,
        start: Instant,
    ) -> Option<&mut Slot> {
        let idx = usize::try_from(token).ok().filter(|_| token < MAX_TOKENS);
        let Some(idx) = idx else {
            tracing::error!(token, "request token out of range");
            self.finish_now(token, kind, start, Err(Errno::new(libc::EINVAL)));
            return None;
        };
        if self.slots.get(idx).is_some_and(|s| s.busy) {
            tracing::error!(token, "request token still in flight");
            self.finish_now(token, kind, start, Err(Errno::new(libc::EBUSY)));
            return None;
        }
        while self.slots.len() <= idx {
            self.slots.push(Slot {
                busy: false,
                kind,
                offset: 0,
                len: 0,
                start,
                iovecs: Vec::new(),
                guest: Vec::new(),
                bounce: None,
                mirroring: false,
                primary: 0,
                epochs: Vec::new(),
            });
        }
        let slot = &mut self.slots[idx];
        slot.busy = true;
        slot.kind = kind;
        slot.offset = offset;
        slot.len = len;
        slot.start = start;
        slot.iovecs.clear();
        slot.guest.clear();
        slot.bounce = None;
        slot.mirroring = false;
        slot.epochs.clear();
        if let Some(m) = &self.mirror {
            m.note(slot);
        }
        Some(slot)
    }

    fn finish_now(
        &mut self,
        token: u64,
        kind: RequestKind,
        start: Instant,
        result: Result<u64, Errno>,
    ) {
        let now = self.clock.unwrap_or_else(Instant::now);
        let latency = nanos(now.saturating_duration_since(start));
        self.counters
            .record_completion(kind, result.as_ref().map(|n| *n).map_err(|_| ()), latency);
        self.ready.push(Completion {
            token,
            kind,
            result,
        });
    }
}

mod finish;
mod mirror;

use finish::{finish_slot, nanos};

#[cfg(test)]
mod tests;
