//! One virtqueue's processing: pop descriptor chains, validate them, wait for the
//! throttle, hand them to the block layer in one batch, and complete them.
//!
//! The worker does not know who delivers kicks and interrupts: a [`QueueHost`] gives it
//! the virtqueue and a way to signal the driver. Under KVM and in tests that is a
//! [`LocalQueue`] (the queue plus an irqfd/call eventfd); under vhost-user it is the
//! frontend's vring. The iothread calls [`QueueWorker::process_avail`] on a kick,
//! [`QueueWorker::process_completions`] when [`QueueWorker::completion_fd`] is readable,
//! [`QueueWorker::process_throttled`] when the throttle timer or wake eventfd fires, and
//! [`QueueWorker::finish_pass`] once per pass to send at most one interrupt.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use block::throttle::{Direction, Throttle, ThrottleTimer, ThrottledQueue};
use block::{Completion, DiskQueue};
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestAddressSpace;
use vmm_sys_util::eventfd::EventFd;

use super::request::{self, Limits, Op, Request};
use super::{GuestMem, GuestMemMmap, status};

/// Access to one virtqueue and to the driver's notification, whoever owns them.
pub trait QueueHost: Send {
    /// Runs `f` with exclusive access to the virtqueue.
    fn with_queue<R>(&mut self, f: impl FnOnce(&mut Queue) -> R) -> R;
    /// Interrupts the driver: used entries wait.
    fn signal(&mut self) -> io::Result<()>;
}

/// A virtqueue owned by this process (KVM, tests) with its kick eventfd (an ioeventfd
/// under KVM) and the eventfd that interrupts the driver (an irqfd under KVM).
pub struct LocalQueue {
    /// The virtqueue.
    pub queue: Queue,
    /// Written by the driver when it publishes chains.
    pub kick: EventFd,
    /// Written to interrupt the driver.
    pub call: EventFd,
}

impl QueueHost for LocalQueue {
    fn with_queue<R>(&mut self, f: impl FnOnce(&mut Queue) -> R) -> R {
        f(&mut self.queue)
    }

    fn signal(&mut self) -> io::Result<()> {
        self.call.write(1)
    }
}

/// Per-disk state shared by the disk's queue workers (which may run on different
/// iothreads) and the control plane.
#[derive(Debug)]
pub struct BlkShared {
    /// Disk id, for logs.
    pub id: String,
    /// GET_ID answer.
    pub serial: String,
    /// What requests may ask for.
    pub limits: Limits,
    /// The guest's write cache setting (config `wce`), changed through config writes.
    pub writeback: AtomicBool,
    /// Chains rejected as malformed or unsupported.
    pub invalid_requests: AtomicU64,
    /// Interrupts sent to the driver.
    pub signals: AtomicU64,
}

/// A request between popping and completion.
struct Slot {
    req: Request,
    /// The memory map the request's buffers point into, kept mapped until completion.
    mem: Arc<GuestMemMmap>,
}

/// How many requests a worker holds at most per queue-size entry (guards against a
/// driver that republishes heads without waiting for completions).
const SLOTS_PER_ENTRY: usize = 2;

/// What one worker did, for the iothread's counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PassWork {
    /// Chains popped.
    pub popped: u64,
    /// Requests completed.
    pub completed: u64,
}

/// Processes one virtqueue of one virtio-blk disk.
pub struct QueueWorker<Q: QueueHost> {
    index: u16,
    host: Q,
    mem: GuestMem,
    disk: DiskQueue,
    shared: Arc<BlkShared>,
    throttle: Throttle,
    pen: ThrottledQueue<usize>,
    timer: ThrottleTimer,
    wake: Arc<EventFd>,
    slots: Vec<Option<Slot>>,
    free: Vec<usize>,
    spare_iovecs: Vec<Vec<libc::iovec>>,
    completions: Vec<Completion>,
    max_slots: usize,
    needs_signal: bool,
    stopping: bool,
}

// SAFETY: the raw iovec pointers held in slots point into guest memory kept alive by the
// slot's `mem` Arc; the worker is used by one thread at a time (&mut self).
unsafe impl<Q: QueueHost> Send for QueueWorker<Q> {}

impl<Q: QueueHost> QueueWorker<Q> {
    /// A worker for queue `index` of a disk. `wake` is written by the throttle group when
    /// this queue's turn comes (the iothread polls it like the timer).
    pub fn new(
        index: u16,
        host: Q,
        mem: GuestMem,
        disk: DiskQueue,
        shared: Arc<BlkShared>,
        throttle: Throttle,
        wake: Arc<EventFd>,
    ) -> io::Result<Self> {
        let timer = ThrottleTimer::new().map_err(io::Error::other)?;
        let mut host = host;
        let queue_size = host.with_queue(|q| q.max_size());
        let max_slots = usize::from(queue_size.max(1)) * SLOTS_PER_ENTRY;
        Ok(QueueWorker {
            index,
            host,
            mem,
            disk,
            shared,
            throttle,
            pen: ThrottledQueue::with_capacity(usize::from(queue_size)),
            timer,
            wake,
            slots: Vec::new(),
            free: Vec::new(),
            spare_iovecs: Vec::new(),
            completions: Vec::with_capacity(usize::from(queue_size)),
            max_slots,
            needs_signal: false,
            stopping: false,
        })
    }

    /// The queue index within its disk.
    pub fn index(&self) -> u16 {
        self.index
    }

    /// The disk's shared state.
    pub fn shared(&self) -> &Arc<BlkShared> {
        &self.shared
    }

    /// The virtqueue host (e.g. to reach a [`LocalQueue`]'s fields).
    pub fn host_mut(&mut self) -> &mut Q {
        &mut self.host
    }

    /// The virtqueue host, shared.
    pub fn host_ref(&self) -> &Q {
        &self.host
    }

    /// Eventfd readable when block I/O completions wait.
    pub fn completion_fd(&self) -> RawFd {
        self.disk.completion_fd()
    }

    /// Timerfd that fires when throttled requests may go.
    pub fn timer_fd(&self) -> RawFd {
        self.timer.as_raw_fd()
    }

    /// Eventfd the throttle group writes when this queue's turn comes.
    pub fn wake_fd(&self) -> RawFd {
        self.wake.as_raw_fd()
    }

    /// Requests popped and not completed (waiting for the throttle or in the kernel).
    pub fn in_flight(&self) -> usize {
        self.slots.len() - self.free.len()
    }

    /// Changes the most requests submitted per syscall.
    pub fn set_max_batch(&mut self, max_batch: u32) {
        self.disk.set_max_batch(max_batch);
    }

    /// Replaces the throttle (live limit or group changes keep queued requests).
    pub fn set_throttle(&mut self, throttle: Throttle) {
        self.throttle.withdraw();
        self.throttle = throttle;
    }

    /// Pops every available chain, validates it and starts what the throttle allows.
    pub fn process_avail(&mut self) -> PassWork {
        let mut work = PassWork::default();
        if self.stopping {
            return work;
        }
        let guard = self.mem.memory();
        let mem = guard.into_inner();
        let event_idx = self.host.with_queue(|q| q.event_idx_enabled());
        let mut empty_rounds = 0;
        loop {
            let popped_before = work.popped;
            if event_idx {
                let m = mem.clone();
                let _ = self.host.with_queue(|q| q.disable_notification(&*m));
            }
            loop {
                if self.in_flight() >= self.max_slots {
                    break;
                }
                let m = mem.clone();
                let Some(chain) = self.host.with_queue(|q| q.pop_descriptor_chain(m)) else {
                    break;
                };
                work.popped += 1;
                let iovecs = self.spare_iovecs.pop().unwrap_or_default();
                match request::parse(chain, &self.shared.limits, iovecs) {
                    Ok(req) => self.accept(req, mem.clone()),
                    Err(rejected) => {
                        self.shared.invalid_requests.fetch_add(1, Ordering::Relaxed);
                        tracing::debug!(disk = %self.shared.id, queue = self.index,
                            reason = rejected.reason, "rejected request");
                        let written = rejected
                            .status
                            .is_some_and(|addr| request::write_status(&mem, addr, rejected.code));
                        self.add_used(&mem, rejected.head, u32::from(written));
                        work.completed += 1;
                    }
                }
            }
            if !event_idx || self.in_flight() >= self.max_slots {
                break;
            }
            let m = mem.clone();
            match self.host.with_queue(|q| q.enable_notification(&*m)) {
                // More chains are said to wait. A round that found none twice in a row
                // means the avail index is corrupt (more entries than the ring holds,
                // which virtio-queue refuses to pop): stop instead of spinning forever.
                Ok(true) if work.popped > popped_before || empty_rounds == 0 => {
                    if work.popped == popped_before {
                        empty_rounds += 1;
                    }
                    continue;
                }
                Ok(true) => {
                    tracing::warn!(disk = %self.shared.id, queue = self.index,
                        "avail index out of range; ignoring the queue until the driver fixes it");
                    break;
                }
                _ => break,
            }
        }
        self.start_admitted();
        work
    }

    /// Reaps finished block I/O and completes the requests.
    pub fn process_completions(&mut self) -> PassWork {
        let mut completions = std::mem::take(&mut self.completions);
        if let Err(e) = self.disk.reap(|c| completions.push(c)) {
            tracing::error!(disk = %self.shared.id, queue = self.index, error = %e, "reaping failed");
        }
        let mut work = PassWork::default();
        for c in completions.drain(..) {
            let code = match &c.result {
                Ok(_) => status::OK,
                Err(e) if e.errno() == libc::EOPNOTSUPP => status::UNSUPP,
                Err(e) => {
                    tracing::debug!(disk = %self.shared.id, queue = self.index, error = %e, "I/O error");
                    status::IOERR
                }
            };
            self.complete(c.token as usize, code);
            work.completed += 1;
        }
        self.completions = completions;
        // Completions may have been queued behind a full engine; resubmit if so.
        self.start_admitted();
        work
    }

    /// Starts throttled requests whose time has come (timer or group turn).
    pub fn process_throttled(&mut self) {
        let _ = self.timer.clear();
        let _ = self.wake.read();
        self.start_admitted();
    }

    /// Sends one interrupt if anything was completed since the last call and the driver
    /// wants one (EVENT_IDX). Returns whether it signalled.
    pub fn finish_pass(&mut self) -> bool {
        if !self.needs_signal {
            return false;
        }
        self.needs_signal = false;
        let guard = self.mem.memory();
        let wanted = self
            .host
            .with_queue(|q| q.needs_notification(&*guard))
            .unwrap_or(true);
        if !wanted {
            return false;
        }
        if let Err(e) = self.host.signal() {
            tracing::warn!(disk = %self.shared.id, queue = self.index, error = %e, "cannot signal the driver");
            return false;
        }
        self.shared.signals.fetch_add(1, Ordering::Relaxed);
        true
    }

    /// Whether work waits that a poll would find without a syscall: new chains in the
    /// avail ring or finished block I/O.
    pub fn poll_ready(&mut self) -> bool {
        if self.disk.has_completions() {
            return true;
        }
        if self.stopping || self.in_flight() >= self.max_slots {
            return false;
        }
        let guard = self.mem.memory();
        self.host.with_queue(|q| {
            // A distance beyond the ring size is a corrupt index, not work.
            q.ready()
                && q.avail_idx(&*guard, Ordering::Acquire).is_ok_and(|idx| {
                    let pending = idx.0.wrapping_sub(q.next_avail());
                    pending != 0 && pending <= q.size()
                })
        })
    }

    /// Stops taking new chains, starts everything waiting for the throttle (draining
    /// ignores limits, as QEMU does) and waits until every request has completed, so
    /// nothing in flight is lost. Signals the driver at the end.
    pub fn drain(&mut self, timeout: Duration) -> io::Result<()> {
        self.stopping = true;
        self.throttle.withdraw();
        let mut unthrottled = Throttle::default();
        while let Some(idx) = self.pen.pop_admitted(&mut unthrottled, Instant::now()) {
            self.start(idx);
        }
        let deadline = Instant::now() + timeout;
        self.submit();
        while self.in_flight() > 0 {
            if Instant::now() >= deadline {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("{} requests still in flight", self.in_flight()),
                ));
            }
            let mut pfd = libc::pollfd {
                fd: self.disk.completion_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: poll reads and writes only the pollfd we pass.
            unsafe { libc::poll(&mut pfd, 1, 10) };
            self.process_completions();
        }
        self.finish_pass();
        Ok(())
    }

    /// Accepts taking new chains again after a drain.
    pub fn resume(&mut self) {
        self.stopping = false;
    }

    fn accept(&mut self, req: Request, mem: Arc<GuestMemMmap>) {
        let charge = match req.op {
            Op::Read => Some((Direction::Read, req.data_len)),
            Op::Write => Some((Direction::Write, req.data_len)),
            Op::Discard { num_sectors, .. } | Op::WriteZeroes { num_sectors, .. } => Some((
                Direction::Write,
                u64::from(num_sectors) * super::SECTOR_SIZE,
            )),
            Op::Flush | Op::GetId => None,
        };
        let idx = match self.free.pop() {
            Some(idx) => {
                self.slots[idx] = Some(Slot { req, mem });
                idx
            }
            None => {
                self.slots.push(Some(Slot { req, mem }));
                self.slots.len() - 1
            }
        };
        match charge {
            Some((dir, bytes)) => self.pen.push(idx, dir, bytes),
            None => self.pen.push_uncharged(idx),
        }
    }

    /// Moves admitted requests from the throttle pen to the block layer, submits, and
    /// arms the timer for the rest.
    fn start_admitted(&mut self) {
        let writeback = self.shared.writeback.load(Ordering::Relaxed);
        if self.disk.write_cache() != writeback {
            self.disk.set_write_cache(writeback);
        }
        let now = Instant::now();
        while let Some(idx) = self.pen.pop_admitted(&mut self.throttle, now) {
            self.start(idx);
        }
        self.disk
            .counters()
            .add_throttled_ns(self.pen.take_throttled_ns());
        self.submit();
        let armed = match self.pen.next_wake() {
            Some(at) if !self.pen.is_empty() => self.timer.arm_at(at),
            _ => self.timer.disarm(),
        };
        if let Err(e) = armed {
            tracing::error!(disk = %self.shared.id, queue = self.index, error = %e, "throttle timer");
        }
    }

    fn submit(&mut self) {
        if let Err(e) = self.disk.submit() {
            tracing::error!(disk = %self.shared.id, queue = self.index, error = %e, "submit failed");
        }
    }

    /// Hands one request to the block layer (GET_ID completes here).
    fn start(&mut self, idx: usize) {
        let Some(Some(slot)) = self.slots.get(idx) else {
            return;
        };
        let token = idx as u64;
        let offset = slot.req.sector.saturating_mul(super::SECTOR_SIZE);
        let sector_bytes = |sector: u64| sector.saturating_mul(super::SECTOR_SIZE);
        match slot.req.op {
            // SAFETY: the iovecs point into guest memory kept mapped by `slot.mem` until
            // the completion is reaped; the guest owns the buffers until we complete.
            Op::Read => unsafe { self.disk.read(token, offset, &slot.req.iovecs) },
            // SAFETY: as above.
            Op::Write => unsafe { self.disk.write(token, offset, &slot.req.iovecs, false) },
            Op::Flush => self.disk.flush(token),
            Op::Discard {
                sector,
                num_sectors,
            } => self.disk.discard(
                token,
                sector_bytes(sector),
                sector_bytes(u64::from(num_sectors)),
            ),
            Op::WriteZeroes {
                sector,
                num_sectors,
                ..
            } => self.disk.write_zeroes(
                token,
                sector_bytes(sector),
                sector_bytes(u64::from(num_sectors)),
            ),
            Op::GetId => {
                request::write_id(&slot.req.iovecs, &self.shared.serial);
                self.complete(idx, status::OK);
            }
        }
    }

    /// Writes the status, returns the chain to the used ring and frees the slot.
    fn complete(&mut self, idx: usize, code: u8) {
        let Some(slot) = self.slots.get_mut(idx).and_then(Option::take) else {
            tracing::error!(disk = %self.shared.id, queue = self.index, idx, "completion for a free slot");
            return;
        };
        self.free.push(idx);
        let Slot { mut req, mem } = slot;
        let written = request::write_status(&mem, req.status, code);
        let len = if !written {
            0
        } else if code == status::OK {
            request::used_len(&req)
        } else {
            1
        };
        self.add_used(&mem, req.head, len);
        req.iovecs.clear();
        self.spare_iovecs.push(std::mem::take(&mut req.iovecs));
    }

    fn add_used(&mut self, mem: &GuestMemMmap, head: u16, len: u32) {
        match self.host.with_queue(|q| q.add_used(mem, head, len)) {
            Ok(()) => self.needs_signal = true,
            Err(e) => {
                tracing::warn!(disk = %self.shared.id, queue = self.index, head, error = %e, "add_used failed")
            }
        }
    }
}

impl<Q: QueueHost> Drop for QueueWorker<Q> {
    fn drop(&mut self) {
        if self.in_flight() > 0
            && let Err(e) = self.drain(Duration::from_secs(30))
        {
            tracing::error!(disk = %self.shared.id, queue = self.index, error = %e, "drain on drop");
        }
        self.throttle.withdraw();
    }
}
