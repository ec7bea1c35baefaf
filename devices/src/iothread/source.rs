//! What an iothread serves: queues of devices, behind one object-safe trait.

use std::io;
use std::os::fd::RawFd;
use std::sync::Arc;
use std::time::Duration;

use block::jobs::{JobState, MirrorLink};
use block::sync::lock;
use block::{Disk, IoEngine};
use vmm_sys_util::eventfd::EventFd;

use vmm_sys_util::epoll::EventSet;

use crate::virtio_blk::worker::{PassWork, QueueHost, QueueWorker};

/// The eventfds of one source, in the order [`IoSource::handle`] numbers them: the
/// driver's kicks.
pub const KICK: usize = 0;
/// Block I/O completions.
pub const COMPLETION: usize = 1;
/// Throttle timer.
pub const TIMER: usize = 2;
/// Throttle group turn.
pub const WAKE: usize = 3;
/// Eventfds per source.
pub const FDS: usize = 4;

/// How the eventfd `which` of a source is watched: kicks and completions
/// edge-triggered (they are never read: a pass looks at the rings without a syscall),
/// the throttle fds level-triggered (read when handled).
pub fn event_set(which: usize) -> EventSet {
    match which {
        KICK | COMPLETION => EventSet::IN | EventSet::EDGE_TRIGGERED,
        _ => EventSet::IN,
    }
}

/// I/O engines made by the control plane for a disk's queues, by queue index, each on
/// its queue's completion eventfd (see [`SourceOp::Notifiers`]): an iothread takes
/// them, it does not make them (its sandbox has no syscalls for that).
#[derive(Default)]
pub struct EngineSet(std::sync::Mutex<std::collections::BTreeMap<u16, Box<dyn IoEngine>>>);

impl EngineSet {
    /// A set of `engines` by queue index.
    pub fn new(engines: std::collections::BTreeMap<u16, Box<dyn IoEngine>>) -> Arc<EngineSet> {
        Arc::new(EngineSet(std::sync::Mutex::new(engines)))
    }

    /// The engine of queue `index`, taken out.
    pub fn take(&self, index: u16) -> Option<Box<dyn IoEngine>> {
        lock(&self.0).remove(&index)
    }
}

impl std::fmt::Debug for EngineSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_set().entries(lock(&self.0).keys()).finish()
    }
}

/// Where queues put a duplicate of their completion eventfd, by queue index.
pub type NotifierList = Arc<std::sync::Mutex<Vec<(u16, EventFd)>>>;

/// What a block job asks of the sources of one device, on their iothread between two
/// passes ([`super::IoThread::visit`]).
#[derive(Clone, Debug)]
pub enum SourceOp {
    /// A queue stops taking new requests and finishes what is in flight.
    Pause,
    /// A paused queue goes on.
    Resume,
    /// A queue whose disk was stopped by an I/O error, and resumed since, sends the
    /// requests it held again, oldest first, then goes on.
    RetryHeld,
    /// A queue adds its index and a duplicate of its completion eventfd to the list
    /// (for the engines of [`SourceOp::AttachMirror`] and [`SourceOp::SwitchDisk`]).
    Notifiers(NotifierList),
    /// A queue's disk marks (and, write-blocking, writes to, through its engine from the
    /// set) a mirror's target; `None` detaches it.
    AttachMirror(Option<Arc<MirrorLink>>, Arc<EngineSet>),
    /// A paused queue sends every later request to this disk, through its engine from
    /// the set (a pivot).
    SwitchDisk(Arc<Disk>, Arc<EngineSet>),
    /// A job starts copying.
    StartJob,
    /// A job's speed limit changes (bytes/s, 0: unlimited).
    SetSpeed(u64),
    /// A job copies what is dirty and flushes its target (the disk's queues paused).
    SyncJob,
    /// A job ends as this state, its copies in flight finished.
    StopJob(JobState),
}

/// One queue served by an iothread.
pub trait IoSource: Send {
    /// The device this queue belongs to.
    fn device(&self) -> &str;
    /// The queue index within the device.
    fn queue(&self) -> u16;
    /// The eventfds to watch, indexed by [`KICK`], [`COMPLETION`], [`TIMER`], [`WAKE`]
    /// (None: delivered by someone else, as a vhost-user library delivers kicks).
    fn fds(&self) -> [Option<RawFd>; FDS];
    /// Handles a readable eventfd (see [`event_set`] for which are read).
    fn handle(&mut self, which: usize) -> PassWork;
    /// Whether work waits that can be found without a syscall (for adaptive polling).
    fn poll_ready(&mut self) -> bool;
    /// Does whatever work is ready (after [`IoSource::poll_ready`] said so).
    fn run_ready(&mut self) -> PassWork;
    /// Turns kicks and completion signals on before the thread sleeps (they are off while
    /// it is awake); true when work is already visible, so the thread must not sleep.
    fn arm(&mut self) -> bool;
    /// Makes the completion fd fire, so the loop comes back to this source from epoll.
    fn wake(&mut self);
    /// Whether spinning for this source may pay off: its disk's recent latency per
    /// request in flight (all of it when none is) within `cap_ns` (see [`super::poll`]).
    fn spin_worthy(&self, cap_ns: u64) -> bool;
    /// Interrupts the driver if completions were added and it wants to hear.
    fn finish_pass(&mut self) -> bool;
    /// Changes the most requests submitted per syscall.
    fn set_max_batch(&mut self, max_batch: u32);
    /// Finishes every request in flight (for removal and shutdown).
    fn drain(&mut self, timeout: Duration) -> io::Result<()>;
    /// Requests in flight.
    fn in_flight(&self) -> usize;
    /// Does what a block job asks (see [`SourceOp`]); an op that is not for this kind
    /// of source fails.
    fn control(&mut self, op: &SourceOp) -> Result<PassWork, String> {
        Err(format!("{}: cannot {op:?}", self.device()))
    }
}

impl<Q: QueueHost> IoSource for QueueWorker<Q> {
    fn device(&self) -> &str {
        &self.shared().id
    }

    fn queue(&self) -> u16 {
        self.index()
    }

    fn fds(&self) -> [Option<RawFd>; FDS] {
        [
            self.host_ref().kick_fd(),
            Some(self.completion_fd()),
            Some(self.timer_fd()),
            Some(self.wake_fd()),
        ]
    }

    fn handle(&mut self, which: usize) -> PassWork {
        match which {
            KICK | COMPLETION => self.run_ready(),
            _ => self.process_throttled(),
        }
    }

    fn poll_ready(&mut self) -> bool {
        QueueWorker::poll_ready(self)
    }

    fn run_ready(&mut self) -> PassWork {
        if self.host_ref().is_live() {
            self.run_pass()
        } else {
            // A disabled ring only finishes what it started.
            self.process_completions()
        }
    }

    fn arm(&mut self) -> bool {
        QueueWorker::arm(self)
    }

    fn wake(&mut self) {
        self.wake_self();
    }

    fn spin_worthy(&self, cap_ns: u64) -> bool {
        QueueWorker::spin_worthy(self, cap_ns)
    }

    fn finish_pass(&mut self) -> bool {
        QueueWorker::finish_pass(self)
    }

    fn set_max_batch(&mut self, max_batch: u32) {
        QueueWorker::set_max_batch(self, max_batch);
    }

    fn drain(&mut self, timeout: Duration) -> io::Result<()> {
        QueueWorker::drain(self, timeout)
    }

    fn in_flight(&self) -> usize {
        QueueWorker::in_flight(self)
    }

    fn control(&mut self, op: &SourceOp) -> Result<PassWork, String> {
        match op {
            SourceOp::Pause => self
                .pause(crate::virtio_blk::worker::DRAIN_TIMEOUT)
                .map(|()| PassWork::default())
                .map_err(|e| format!("disk {} queue {}: {e}", self.device(), self.index())),
            SourceOp::Resume => Ok(self.resume()),
            SourceOp::RetryHeld => Ok(self.retry_held()),
            SourceOp::Notifiers(list) => {
                let fd = self
                    .notifier()
                    .try_clone()
                    .map_err(|e| format!("disk {}: {e}", self.device()))?;
                lock(list).push((self.index(), fd));
                Ok(PassWork::default())
            }
            SourceOp::AttachMirror(link, engines) => {
                let engine = engines.take(self.index());
                self.attach_mirror(link.clone(), engine)
                    .map(|()| PassWork::default())
            }
            SourceOp::SwitchDisk(disk, engines) => {
                let Some(engine) = engines.take(self.index()) else {
                    // A queue made after the engines were: it opened the new disk.
                    if Arc::ptr_eq(QueueWorker::disk(self), disk) {
                        return Ok(PassWork::default());
                    }
                    return Err(format!(
                        "disk {} queue {}: no engine made for it",
                        self.device(),
                        self.index()
                    ));
                };
                self.switch_disk(disk.clone(), engine)
                    .map(|()| PassWork::default())
            }
            _ => Err(format!("disk {}: not a job", self.device())),
        }
    }
}
