//! One virtqueue's processing: pop descriptor chains, validate them, wait for the
//! throttle, hand them to the block layer in one batch, and complete them.
//!
//! The worker does not know who delivers kicks and interrupts: a [`QueueHost`] gives it
//! the virtqueue and a way to signal the driver. Under KVM and in tests that is a
//! [`LocalQueue`] (the queue plus an irqfd/call eventfd); under vhost-user it is the
//! frontend's vring. An iothread calls [`QueueWorker::run_pass`] when the kick or
//! [`QueueWorker::completion_fd`] fires (both may be watched edge-triggered: neither is
//! read on this path) or when polling finds work ([`QueueWorker::poll_ready`]),
//! [`QueueWorker::process_throttled`] when the throttle timer or wake eventfd fires, and
//! [`QueueWorker::finish_pass`] once per pass to send at most one interrupt (with an
//! engine that completes inline, a pass also publishes and signals every 64 KiB done).
//!
//! While the thread is awake the driver's kicks and the engine's eventfd writes are
//! suppressed (the thread looks at the rings itself); [`QueueWorker::arm`] turns them
//! back on right before it sleeps and says whether work slipped in meanwhile.
//!
//! Per pass the worker reads the clock once, takes the virtqueue (a lock under
//! vhost-user) once to pop every chain and once to publish every used entry (plus once
//! per 64 KiB published early, inline engines only), and makes no allocation once its
//! buffers have grown to the queue's depth.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use block::throttle::{Throttle, ThrottleTimer, ThrottledQueue};
use block::{Completion, DiskQueue};
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestAddressSpace;
use vmm_sys_util::eventfd::EventFd;

use super::request::{Limits, Rejected, Request};
use super::{GuestMem, GuestMemMmap};

mod control;
mod ring;
#[cfg(test)]
mod tests;

use ring::avail_pending;

/// Access to one virtqueue and to the driver's notification, whoever owns them.
pub trait QueueHost: Send {
    /// Runs `f` with exclusive access to the virtqueue.
    fn with_queue<R>(&mut self, f: impl FnOnce(&mut Queue) -> R) -> R;
    /// Interrupts the driver: used entries wait.
    fn signal(&mut self) -> io::Result<()>;
    /// The eventfd the driver's kicks arrive on, when the iothread watches it itself
    /// (a vhost-user library delivers kicks on its own).
    fn kick_fd(&self) -> Option<RawFd> {
        None
    }
    /// Whether the driver has the queue enabled, so new chains may be taken (a disabled
    /// queue only finishes what it started).
    fn is_live(&self) -> bool {
        true
    }
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

    fn kick_fd(&self) -> Option<RawFd> {
        Some(self.kick.as_raw_fd())
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
    /// The disk's queues take no new request (a block job switches the disk): each
    /// finishes what it started; requests wait in the ring and the throttle's pen, in
    /// order. Queues made meanwhile start held too.
    pub held: AtomicBool,
    /// The disk's error policy, and whether a failure stopped it (its queues hold
    /// their failed requests and take no new ones until resumed).
    pub io_error: super::io_error::IoErrorState,
}

/// A request between popping and completion.
struct Slot {
    req: Request,
    /// Its place in the order the queue took requests (held ones retry in it).
    seq: u64,
    /// The memory map the request's buffers point into, kept mapped until completion.
    mem: Arc<GuestMemMmap>,
}

/// How many requests a worker holds at most per queue-size entry (guards against a
/// driver that republishes heads without waiting for completions).
const SLOTS_PER_ENTRY: usize = 2;

// A slot's index is the request's token down to the engine: every one must fit.
const _: () = assert!(
    crate::config::MAX_QUEUE_SIZE as u64 * SLOTS_PER_ENTRY as u64 <= block::queue::MAX_TOKENS
);

/// How long stopping a queue (removal, shutdown, session end) waits for its requests.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// What one worker did, for the iothread's counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PassWork {
    /// Chains popped.
    pub popped: u64,
    /// Requests completed.
    pub completed: u64,
    /// Interrupts sent while the pass went on (see `ring::PUBLISH_EVERY_BYTES`); the
    /// pass's last one is [`QueueWorker::finish_pass`]'s.
    pub signalled: u64,
}

impl PassWork {
    fn add(&mut self, other: PassWork) {
        self.popped += other.popped;
        self.completed += other.completed;
        self.signalled += other.signalled;
    }
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
    /// The deadline the throttle timer is armed for (None: disarmed or expired).
    timer_at: Option<Instant>,
    wake: Arc<EventFd>,
    /// Requests popped and not completed; a slot's index is the request's token in the
    /// block layer and the engine (one table, one free list for the whole stack).
    slots: Vec<Option<Slot>>,
    free: Vec<usize>,
    spare_iovecs: Vec<Vec<libc::iovec>>,
    completions: Vec<Completion>,
    /// The next request's `seq`.
    next_seq: u64,
    /// Requests the error policy held (`stop`): (seq, slot), for a retry on resume.
    failed: Vec<(u64, usize)>,
    /// Chains parsed under the queue lock, handled after it (a reused buffer).
    parsed: Vec<Result<Request, Rejected>>,
    /// Used entries (head, length) published under one queue lock (a reused buffer).
    used: Vec<(u16, u32)>,
    max_slots: usize,
    /// The driver wants to hear about used entries published in this pass.
    needs_signal: bool,
    /// Requests published and interrupts sent mid-pass (see `ring::PUBLISH_EVERY_BYTES`),
    /// not yet counted in a pass's work.
    early: PassWork,
    stopping: bool,
    /// The avail index was found out of range and said so in the log (once, until the
    /// driver fixes it: a guest must not flood the log by kicking).
    corrupt_logged: bool,
    /// Kicks and engine eventfd writes are on ([`QueueWorker::arm`]).
    armed: bool,
    /// The pass's clock reading.
    now: Instant,
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
        let queue_size = usize::from(host.with_queue(|q| q.max_size()).max(1));
        Ok(QueueWorker {
            index,
            host,
            mem,
            disk,
            shared,
            throttle,
            pen: ThrottledQueue::with_capacity(queue_size),
            timer,
            timer_at: None,
            wake,
            slots: Vec::new(),
            free: Vec::new(),
            spare_iovecs: Vec::new(),
            next_seq: 0,
            failed: Vec::new(),
            completions: Vec::with_capacity(queue_size),
            parsed: Vec::with_capacity(queue_size),
            used: Vec::with_capacity(queue_size),
            max_slots: queue_size * SLOTS_PER_ENTRY,
            needs_signal: false,
            early: PassWork::default(),
            stopping: false,
            corrupt_logged: false,
            armed: true,
            now: Instant::now(),
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

    /// The disk's recent latency per request (see `DiskQueue::recent_latency_ns`).
    #[cfg(test)]
    pub(crate) fn recent_latency_ns(&self) -> u64 {
        self.disk.recent_latency_ns()
    }

    /// Requests popped and not completed (waiting for the throttle or in the kernel).
    pub fn in_flight(&self) -> usize {
        self.slots.len() - self.free.len()
    }

    /// Whether spinning for this queue's next event may pay off (see
    /// [`crate::iothread::poll`]): its disk's recent latency per request in flight (all
    /// of it when none is) is within `cap_ns`.
    pub fn spin_worthy(&self, cap_ns: u64) -> bool {
        let in_flight = u64::try_from(self.disk.in_flight()).unwrap_or(u64::MAX);
        self.disk.recent_latency_ns() / in_flight.max(1) <= cap_ns
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

    /// One pass over the queue: completes finished I/O, pops every available chain and
    /// starts what the throttle allows, then completes what finished at once. Reads no
    /// eventfd: the caller watches the kick and completion fds edge-triggered (or reads
    /// them itself).
    pub fn run_pass(&mut self) -> PassWork {
        self.tick();
        let mut work = self.complete_ready(false);
        let popped = self.pop_avail();
        work.add(popped);
        if popped.popped > 0 && self.disk.has_completions() {
            // Finished during the submit (null engine, requests failed at once).
            work.add(self.complete_ready(false));
        }
        work
    }

    /// Pops every available chain, validates it and starts what the throttle allows,
    /// without reaping (tests that look at a request while it is in the engine).
    #[cfg(test)]
    pub(crate) fn process_avail(&mut self) -> PassWork {
        self.tick();
        self.pop_avail()
    }

    /// Clears the completion eventfd, reaps finished block I/O and completes the requests.
    pub fn process_completions(&mut self) -> PassWork {
        self.tick();
        self.complete_ready(true)
    }

    /// Starts throttled requests whose time has come (timer or group turn); returns what
    /// finished meanwhile (an engine that completes inline).
    pub fn process_throttled(&mut self) -> PassWork {
        self.tick();
        let _ = self.timer.clear();
        // The expiry is consumed: arm again even for the same deadline.
        self.timer_at = None;
        let _ = self.wake.read();
        self.start_admitted();
        let mem = self.mem.memory();
        self.flush_used(&mem);
        std::mem::take(&mut self.early)
    }

    /// Sends one interrupt if used entries were published since the last call and the
    /// driver wants one (EVENT_IDX). Returns whether it signalled.
    pub fn finish_pass(&mut self) -> bool {
        if !std::mem::take(&mut self.needs_signal) {
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
        if self.stopping
            || self.is_held()
            || self.is_io_stopped()
            || self.in_flight() >= self.max_slots
        {
            return false;
        }
        let guard = self.mem.memory();
        self.host.with_queue(|q| avail_pending(q, &guard))
    }

    /// Prepares for the thread to sleep: turns the driver's kicks and the engine's
    /// eventfd writes back on, then looks again. True when work is already visible (run a
    /// pass instead of sleeping); false when the kick or completion fd will fire for
    /// whatever comes next.
    pub fn arm(&mut self) -> bool {
        if !self.armed {
            self.armed = true;
            self.disk.set_notify(true);
            if !self.stopping {
                let guard = self.mem.memory();
                // Publishes avail_event (or clears NO_NOTIFY), then a full fence.
                let _ = self.host.with_queue(|q| {
                    // A queue that is not ready may have no rings to write into.
                    q.ready().then(|| q.enable_notification(&*guard))
                });
            }
        }
        self.poll_ready()
    }

    /// Makes [`QueueWorker::completion_fd`] fire, so the thread comes back to this queue
    /// (work it saw but leaves for after its epoll).
    pub fn wake_self(&mut self) {
        self.disk.wake();
    }

    /// Stops taking new chains, starts everything waiting for the throttle (draining
    /// ignores limits, as QEMU does) and waits until every request has completed, so
    /// nothing in flight is lost. Signals the driver at the end.
    pub fn drain(&mut self, timeout: Duration) -> io::Result<()> {
        self.stopping = true;
        self.tick();
        // Requests an I/O error holds get their error now: nothing will retry them.
        self.fail_held();
        self.disk.set_notify(true);
        self.throttle.withdraw();
        let mut unthrottled = Throttle::default();
        while let Some(idx) = self.pen.pop_admitted(&mut unthrottled, Instant::now()) {
            self.start(idx);
        }
        let deadline = Instant::now() + timeout;
        self.submit();
        let mem = self.mem.memory();
        self.flush_used(&mem);
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

    /// Reads the clock for this pass; the disk stamps requests with it.
    fn tick(&mut self) {
        self.now = Instant::now();
        self.disk.set_clock(Some(self.now));
    }
}

impl<Q: QueueHost> Drop for QueueWorker<Q> {
    fn drop(&mut self) {
        if self.in_flight() > 0
            && let Err(e) = self.drain(DRAIN_TIMEOUT)
        {
            tracing::error!(disk = %self.shared.id, queue = self.index, error = %e, "drain on drop");
        }
        self.throttle.withdraw();
    }
}
