//! I/O threads: each runs one epoll loop over the kick, completion, throttle and control
//! eventfds of the queues assigned to it, with adaptive polling (ARCHITECTURE.md
//! section 3). Several disks may share one; one disk's queues may be spread over several.
//! Settings change at runtime through the control eventfd.

mod event_loop;
pub mod poll;
pub mod source;

use std::collections::VecDeque;
use std::io;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::sync::mpsc::{self, SyncSender};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use serde::Serialize;
use vmm_sys_util::eventfd::EventFd;

pub use source::IoSource;

use crate::config::IoThreadConfig;

/// Commands the loop takes through its control eventfd.
enum Command {
    Add(Box<dyn IoSource>, SyncSender<io::Result<()>>),
    RemoveDevice(String, Duration, SyncSender<io::Result<usize>>),
    Update(IoThreadConfig),
    Stop,
}

/// Counters of one iothread, written by its loop.
#[derive(Debug)]
struct Counters {
    passes: AtomicU64,
    wakeups: AtomicU64,
    poll_hits: AtomicU64,
    requests: AtomicU64,
    completions: AtomicU64,
    signals: AtomicU64,
    poll_ns: AtomicU64,
    /// The thread's CPU clock id, [`NO_CLOCK`] until the thread has started.
    cpu_clock: AtomicI64,
}

const NO_CLOCK: i64 = i64::MIN;

impl Default for Counters {
    fn default() -> Self {
        Counters {
            passes: AtomicU64::new(0),
            wakeups: AtomicU64::new(0),
            poll_hits: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            completions: AtomicU64::new(0),
            signals: AtomicU64::new(0),
            poll_ns: AtomicU64::new(0),
            cpu_clock: AtomicI64::new(NO_CLOCK),
        }
    }
}

/// What the loop and its handle share.
struct Shared {
    id: String,
    control: EventFd,
    commands: Mutex<VecDeque<Command>>,
    config: Mutex<IoThreadConfig>,
    counters: Counters,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The counters of an iothread at one moment.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
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
            counters: Counters::default(),
        });
        let for_loop = shared.clone();
        let handle = std::thread::Builder::new()
            .name(format!("iothread-{}", config.id))
            .spawn(move || event_loop::run(&for_loop, config))?;
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

    /// A copy of its counters.
    pub fn counters(&self) -> IoThreadCounters {
        let c = &self.shared.counters;
        IoThreadCounters {
            passes: c.passes.load(Relaxed),
            wakeups: c.wakeups.load(Relaxed),
            poll_hits: c.poll_hits.load(Relaxed),
            requests: c.requests.load(Relaxed),
            completions: c.completions.load(Relaxed),
            signals: c.signals.load(Relaxed),
            poll_ns: c.poll_ns.load(Relaxed),
            cpu_ns: thread_cpu_ns(c.cpu_clock.load(Relaxed)),
        }
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
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}
