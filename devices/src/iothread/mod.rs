//! I/O threads: each runs one epoll loop over the kick, completion, throttle and control
//! eventfds of the queues assigned to it, with adaptive polling (docs/architecture.md). Several disks may share one; one disk's queues may be spread over several.
//! Settings change at runtime through the control eventfd.
//!
//! How a pass goes (poll, arm, finish, counters, settings) lives once, in [`loop_core`];
//! this module's epoll loop and the vhost-user backend's threads are thin adapters to it.

mod event_loop;
pub(crate) mod loop_core;
pub mod poll;
pub mod source;

use std::collections::VecDeque;
use std::io;
use std::sync::atomic::{AtomicI32, AtomicI64, AtomicU64, Ordering::Relaxed};
use std::sync::mpsc::{self, SyncSender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use vmm_sys_util::eventfd::EventFd;

pub use source::{IoSource, SourceOp};

use crate::config::IoThreadConfig;
use block::sync::lock;

/// Commands the loop takes through its control eventfd.
enum Command {
    Add(Box<dyn IoSource>, SyncSender<io::Result<()>>),
    RemoveDevice(String, Duration, SyncSender<io::Result<usize>>),
    Visit(String, SourceOp, SyncSender<Result<usize, String>>),
    Update(IoThreadConfig),
    Stop,
}

/// Counters of one iothread loop (ours, or a vhost-user worker thread), written by the
/// loop and read by anyone.
#[derive(Debug)]
pub(crate) struct LoopCounters {
    pub(crate) passes: AtomicU64,
    pub(crate) wakeups: AtomicU64,
    pub(crate) poll_hits: AtomicU64,
    pub(crate) requests: AtomicU64,
    pub(crate) completions: AtomicU64,
    pub(crate) signals: AtomicU64,
    pub(crate) poll_ns: AtomicU64,
    /// CPU time of threads that served this loop before the current one.
    pub(crate) cpu_base_ns: AtomicU64,
    /// The current thread's CPU clock id, [`NO_CLOCK`] when none.
    pub(crate) cpu_clock: AtomicI64,
    /// The current thread's kernel id (0: none).
    pub(crate) tid: AtomicI32,
}

/// No CPU clock recorded.
pub(crate) const NO_CLOCK: i64 = i64::MIN;

impl Default for LoopCounters {
    fn default() -> Self {
        LoopCounters {
            passes: AtomicU64::new(0),
            wakeups: AtomicU64::new(0),
            poll_hits: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            completions: AtomicU64::new(0),
            signals: AtomicU64::new(0),
            poll_ns: AtomicU64::new(0),
            cpu_base_ns: AtomicU64::new(0),
            cpu_clock: AtomicI64::new(NO_CLOCK),
            tid: AtomicI32::new(0),
        }
    }
}

impl LoopCounters {
    /// A copy, with the CPU time of past threads plus the current one.
    pub(crate) fn snapshot(&self) -> IoThreadCounters {
        IoThreadCounters {
            passes: self.passes.load(Relaxed),
            wakeups: self.wakeups.load(Relaxed),
            poll_hits: self.poll_hits.load(Relaxed),
            requests: self.requests.load(Relaxed),
            completions: self.completions.load(Relaxed),
            signals: self.signals.load(Relaxed),
            poll_ns: self.poll_ns.load(Relaxed),
            cpu_ns: self
                .cpu_base_ns
                .load(Relaxed)
                .saturating_add(thread_cpu_ns(self.cpu_clock.load(Relaxed))),
        }
    }

    /// Records the calling thread as the one serving this loop now.
    pub(crate) fn record_current_thread(&self) {
        self.cpu_clock.store(current_cpu_clock(), Relaxed);
        // SAFETY: gettid has no preconditions.
        self.tid.store(unsafe { libc::gettid() }, Relaxed);
    }

    /// The kernel id of the thread serving the loop now, if one does.
    pub(crate) fn thread_id(&self) -> Option<i32> {
        Some(self.tid.load(Relaxed)).filter(|&t| t != 0)
    }

    /// Moves the current thread's CPU time into the base (its session is ending).
    pub(crate) fn retire_thread(&self) {
        self.tid.store(0, Relaxed);
        let clock = self.cpu_clock.swap(NO_CLOCK, Relaxed);
        self.cpu_base_ns.fetch_add(thread_cpu_ns(clock), Relaxed);
    }
}

/// What the loop and its handle share.
struct Shared {
    id: String,
    control: EventFd,
    commands: Mutex<VecDeque<Command>>,
    config: Mutex<IoThreadConfig>,
    counters: Arc<LoopCounters>,
}

/// The counters of an iothread at one moment.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct IoThreadCounters {
    /// Loop iterations.
    pub passes: u64,
    /// Returns from epoll_wait with events.
    pub wakeups: u64,
    /// Passes where polling found work before sleeping.
    pub poll_hits: u64,
    /// Descriptor chains taken from virtqueues.
    pub requests: u64,
    /// Requests completed.
    pub completions: u64,
    /// Interrupts sent to drivers.
    pub signals: u64,
    /// Current adaptive polling window in ns.
    pub poll_ns: u64,
    /// CPU time the thread has used, in ns.
    pub cpu_ns: u64,
}

/// A running iothread. Dropping it drains its queues and joins the thread.
pub struct IoThread {
    shared: Arc<Shared>,
    handle: Option<JoinHandle<()>>,
}

impl IoThread {
    /// Starts an iothread (named `iothread-<id>`) with `config`.
    pub fn spawn(config: IoThreadConfig) -> io::Result<IoThread> {
        config.validate().map_err(io::Error::other)?;
        let shared = Arc::new(Shared {
            id: config.id.clone(),
            control: EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)?,
            commands: Mutex::new(VecDeque::new()),
            config: Mutex::new(config.clone()),
            counters: Arc::new(LoopCounters::default()),
        });
        let epoll = event_loop::epoll_for(&shared)?;
        let for_loop = shared.clone();
        let handle = std::thread::Builder::new()
            .name(format!("iothread-{}", config.id))
            .spawn(move || {
                block::thread_class::started(block::thread_class::ThreadClass::IoThread);
                event_loop::run(&for_loop, config, epoll);
            })?;
        Ok(IoThread {
            shared,
            handle: Some(handle),
        })
    }

    /// The iothread's id.
    pub fn id(&self) -> &str {
        &self.shared.id
    }

    /// Its current settings.
    pub fn config(&self) -> IoThreadConfig {
        lock(&self.shared.config).clone()
    }

    /// Hands a queue to the thread; returns once it is being served.
    pub fn add(&self, source: Box<dyn IoSource>) -> io::Result<()> {
        let (tx, rx) = mpsc::sync_channel(1);
        self.send(Command::Add(source, tx))?;
        rx.recv()
            .map_err(|_| io::Error::other(format!("iothread {} has stopped", self.id())))?
    }

    /// Stops serving every queue of `device` after draining its requests; returns how
    /// many queues were removed.
    pub fn remove_device(&self, device: &str, timeout: Duration) -> io::Result<usize> {
        let (tx, rx) = mpsc::sync_channel(1);
        self.send(Command::RemoveDevice(device.to_string(), timeout, tx))?;
        rx.recv()
            .map_err(|_| io::Error::other(format!("iothread {} has stopped", self.id())))?
    }

    /// Does `op` on every source of `device` this thread serves, on the thread, between
    /// two passes; returns how many there were (the first failure stops the round).
    pub fn visit(&self, device: &str, op: SourceOp) -> Result<usize, String> {
        let (tx, rx) = mpsc::sync_channel(1);
        self.send(Command::Visit(device.to_string(), op, tx))
            .map_err(|e| e.to_string())?;
        rx.recv()
            .map_err(|_| format!("iothread {} has stopped", self.id()))?
    }

    /// Changes the settings while it runs (the id must stay the same).
    pub fn update(&self, config: IoThreadConfig) -> Result<(), String> {
        config.validate()?;
        if config.id != self.shared.id {
            return Err(format!("iothread {}: the id cannot change", self.shared.id));
        }
        *lock(&self.shared.config) = config.clone();
        self.send(Command::Update(config))
            .map_err(|e| e.to_string())
    }

    /// The kernel id of its thread (for `taskset`, `perf`, or checking its pinning).
    pub fn thread_id(&self) -> Option<i32> {
        self.shared.counters.thread_id()
    }

    /// A copy of its counters.
    pub fn counters(&self) -> IoThreadCounters {
        self.shared.counters.snapshot()
    }

    fn send(&self, command: Command) -> io::Result<()> {
        if self.handle.as_ref().is_none_or(|h| h.is_finished()) {
            return Err(io::Error::other(format!(
                "iothread {} has stopped",
                self.id()
            )));
        }
        lock(&self.shared.commands).push_back(command);
        self.shared.control.write(1)
    }
}

impl Drop for IoThread {
    fn drop(&mut self) {
        let _ = self.send(Command::Stop);
        if let Some(handle) = self.handle.take()
            && handle.join().is_err()
        {
            tracing::error!(iothread = %self.shared.id, "iothread panicked");
        }
    }
}

/// The calling thread's CPU clock id ([`NO_CLOCK`] if unknown).
pub(crate) fn current_cpu_clock() -> i64 {
    let mut clock: libc::clockid_t = 0;
    // SAFETY: pthread_getcpuclockid writes one clockid_t for the calling thread.
    let rc = unsafe { libc::pthread_getcpuclockid(libc::pthread_self(), &mut clock) };
    if rc == 0 { i64::from(clock) } else { NO_CLOCK }
}

/// Pins the calling thread to `cpus` (every CPU when empty).
pub(crate) fn pin(cpus: &[usize]) {
    // SAFETY: an all-zero cpu_set_t is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    let max = libc::CPU_SETSIZE as usize;
    let all: Vec<usize>;
    let list = if cpus.is_empty() {
        all = (0..max).collect();
        &all[..]
    } else {
        cpus
    };
    for &cpu in list.iter().filter(|&&c| c < max) {
        // SAFETY: `cpu` is below CPU_SETSIZE, so CPU_SET stays inside `set`.
        unsafe { libc::CPU_SET(cpu, &mut set) };
    }
    // SAFETY: sched_setaffinity reads the set we pass; pid 0 is the calling thread.
    let rc = unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) };
    if rc != 0 && !cpus.is_empty() {
        tracing::warn!(?cpus, error = %io::Error::last_os_error(), "cannot set CPU affinity");
    }
}

/// CPU time of the thread whose CPU clock id is `clock` ([`NO_CLOCK`]: unknown, 0).
fn thread_cpu_ns(clock: i64) -> u64 {
    let Ok(clock) = libc::clockid_t::try_from(clock) else {
        return 0;
    };
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec; the clock id came from
    // pthread_getcpuclockid of a thread that is alive while its IoThread exists.
    let rc = unsafe { libc::clock_gettime(clock, &mut ts) };
    if rc != 0 {
        return 0;
    }
    let secs = u64::try_from(ts.tv_sec).unwrap_or(0);
    let nanos = u64::try_from(ts.tv_nsec).unwrap_or(0);
    secs.saturating_mul(1_000_000_000).saturating_add(nanos)
}
