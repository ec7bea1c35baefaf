//! The one iothread core, shared by our own epoll loop ([`super::event_loop`]) and the
//! vhost-user backend's threads (the library's vring worker threads): the queues served,
//! which were touched this pass, the adaptive polling window, poll / arm / finish, the
//! counters, and settings changes. An adapter only waits for events and hands them here:
//!
//! ```text
//! since = core.idle()        poll while work turns up, then arm every queue for sleeping
//! wait for events (epoll)
//! core.woke(since)           the window learns how long the thread slept
//! core.handle(token) ...     each event of a queue
//! core.finish_pass()         at most one more interrupt per touched queue
//! ```
//!
//! Every later feature on an iothread plugs in here once.

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use super::poll::PollWindow;
use super::source::{FDS, IoSource, SourceOp};
use super::{LoopCounters, pin};
use crate::config::IoThreadConfig;
use crate::virtio_blk::worker::PassWork;

/// Rounds in a row whose polling found work before the thread goes back to its events
/// (so control messages, throttle timers and other fds get their turn under load).
pub const BUSY_ROUNDS: u32 = 64;

/// Spins between two readings of the clock while polling.
const CLOCK_EVERY: u32 = 4;

/// The queues of one iothread and how it serves them. `S` is the kind of queue
/// (`dyn IoSource` for our loop, one concrete worker type for vhost-user).
pub struct Core<S: IoSource + ?Sized> {
    sources: Vec<Option<Box<S>>>,
    touched: Vec<bool>,
    window: PollWindow,
    max_batch: u32,
    counters: Arc<LoopCounters>,
    /// The settings applied last.
    config: IoThreadConfig,
}

impl<S: IoSource + ?Sized> Core<S> {
    /// A core with `config`'s polling and batch settings, counting into `counters`.
    pub fn new(config: &IoThreadConfig, counters: Arc<LoopCounters>) -> Self {
        Core {
            sources: Vec::new(),
            touched: Vec::new(),
            window: PollWindow::new(config.poll_max_ns, config.poll_grow, config.poll_shrink),
            max_batch: config.aio_max_batch,
            counters,
            config: config.clone(),
        }
    }

    /// The calling thread starts serving this core: its CPU time is counted from now and
    /// it is pinned to the CPUs of the settings applied last.
    pub fn enter(&self) {
        self.counters.record_current_thread();
        pin(&self.config.cpu_affinity);
    }

    /// Applies new settings at once (called on the serving thread, which it re-pins);
    /// the settings applied already change nothing.
    pub fn configure(&mut self, config: &IoThreadConfig) {
        if *config == self.config {
            return;
        }
        self.config = config.clone();
        self.window
            .configure(config.poll_max_ns, config.poll_grow, config.poll_shrink);
        self.counters.poll_ns.store(self.window.ns, Relaxed);
        self.max_batch = config.aio_max_batch;
        for source in self.sources.iter_mut().flatten() {
            source.set_max_batch(config.aio_max_batch);
        }
        pin(&config.cpu_affinity);
        tracing::info!(?config, "iothread settings changed");
    }

    /// The first free slot (growing the table when none is).
    pub fn free_slot(&mut self) -> usize {
        match self.sources.iter().position(Option::is_none) {
            Some(idx) => idx,
            None => {
                self.grow(self.sources.len() + 1);
                self.sources.len() - 1
            }
        }
    }

    /// Serves `source` in slot `idx` (its fds are being watched already) and does the
    /// work it has: a kick may have come before its fds were watched.
    pub fn insert(&mut self, idx: usize, mut source: Box<S>) {
        source.set_max_batch(self.max_batch);
        self.grow(idx + 1);
        tracing::debug!(
            disk = source.device(),
            queue = source.queue(),
            "queue added"
        );
        let work = source.run_ready();
        self.count(work);
        self.sources[idx] = Some(source);
        self.touched[idx] = true;
    }

    /// The source in slot `idx`.
    pub fn get(&self, idx: usize) -> Option<&S> {
        self.sources.get(idx)?.as_deref()
    }

    /// Stops serving slot `idx` (the caller unwatches its fds, then drains it).
    pub fn take(&mut self, idx: usize) -> Option<Box<S>> {
        self.sources.get_mut(idx)?.take()
    }

    /// The slots serving a queue of `device`.
    pub fn slots_of(&self, device: &str) -> Vec<usize> {
        (0..self.sources.len())
            .filter(|&idx| self.get(idx).is_some_and(|s| s.device() == device))
            .collect()
    }

    /// Does `op` on every source of `device` (see [`super::IoThread::visit`]); returns
    /// how many there were, or the first failure.
    pub fn visit(&mut self, device: &str, op: &SourceOp) -> Result<usize, String> {
        let slots = self.slots_of(device);
        for &idx in &slots {
            if let Some(Some(source)) = self.sources.get_mut(idx) {
                let work = source.control(op)?;
                count(&self.counters, work);
                self.touched[idx] = true;
            }
        }
        Ok(slots.len())
    }

    /// The thread woke for events after sleeping since `since` (from [`Core::idle`]).
    pub fn woke(&mut self, since: Option<Instant>) {
        if let Some(since) = since {
            // As QEMU counts it, the wait includes the spin before it.
            self.window.after_block(nanos(since.elapsed()));
            self.counters.poll_ns.store(self.window.ns, Relaxed);
        }
        self.counters.wakeups.fetch_add(1, Relaxed);
        self.counters.passes.fetch_add(1, Relaxed);
    }

    /// Handles event `token` of the sources: `slot * FDS + which` (see
    /// [`super::source::KICK`] and the others).
    pub fn handle(&mut self, token: u64) {
        let Ok(token) = usize::try_from(token) else {
            return;
        };
        let (idx, which) = (token / FDS, token % FDS);
        if let Some(Some(source)) = self.sources.get_mut(idx) {
            let work = source.handle(which);
            count(&self.counters, work);
            self.touched[idx] = true;
        }
    }

    /// At most one interrupt per queue touched since the last call (a pass of an engine
    /// that completes inline may have sent some already, see `PUBLISH_EVERY_BYTES`).
    pub fn finish_pass(&mut self) {
        for (touched, slot) in self.touched.iter_mut().zip(self.sources.iter_mut()) {
            if std::mem::take(touched)
                && let Some(source) = slot
                && source.finish_pass()
            {
                self.counters.signals.fetch_add(1, Relaxed);
            }
        }
    }

    /// After the events of a pass: spins up to the polling window for new chains or
    /// finished I/O; while it finds some (at most [`BUSY_ROUNDS`] rounds), does it and
    /// polls again. It spins only where every source is worth it (a disk whose completions
    /// come often, a driver of a fast disk; see [`super::poll`]).
    /// Then it arms every source for the sleep (work found meanwhile is done first, or,
    /// without polling or when still busy, deferred to the source's completion fd, so the
    /// next wait returns at once). Returns the start of the last round when that round
    /// spun: the sleep that follows is what the window adapts to.
    pub fn idle(&mut self) -> Option<Instant> {
        for _ in 0..BUSY_ROUNDS {
            // The clock only when spinning for drivers (the wait is then measured).
            let start = self.spin_worthy().then(Instant::now);
            let budget = match start {
                Some(_) => self.window.spin_budget(),
                None => Duration::ZERO,
            };
            let found = match start {
                Some(start) if !budget.is_zero() => self.poll_round(start + budget),
                _ => false,
            };
            if let (true, Some(start)) = (found, start) {
                self.window.after_hit(nanos(start.elapsed()));
                self.counters.poll_ns.store(self.window.ns, Relaxed);
            } else if !self.arm(self.window.max_ns == 0) {
                return start;
            }
            // Work that came while the thread was awake, found by looking.
            self.counters.poll_hits.fetch_add(1, Relaxed);
            self.counters.passes.fetch_add(1, Relaxed);
            self.finish_pass();
        }
        self.arm(true);
        None
    }

    /// Drains and drops every source (the thread is stopping).
    pub fn drain_all(&mut self, timeout: Duration) {
        for idx in 0..self.sources.len() {
            if let Some(mut source) = self.take(idx) {
                let _ = drain(&mut *source, timeout);
            }
        }
    }

    fn grow(&mut self, len: usize) {
        while self.sources.len() < len {
            self.sources.push(None);
            self.touched.push(false);
        }
    }

    fn count(&self, work: PassWork) {
        count(&self.counters, work);
    }

    /// Whether the thread has queues and spinning may pay off for every one of them.
    fn spin_worthy(&self) -> bool {
        let cap = self.window.max_ns.min(super::poll::SLOW_DISK_NS);
        let mut sources = self.sources.iter().flatten().peekable();
        sources.peek().is_some() && sources.all(|s| s.spin_worthy(cap))
    }

    /// Spins until `deadline` or until a source has work, which it does. True if found.
    fn poll_round(&mut self, deadline: Instant) -> bool {
        let mut spin = 0u32;
        loop {
            spin = spin.wrapping_add(1);
            let mut found = false;
            for (idx, slot) in self.sources.iter_mut().enumerate() {
                let Some(source) = slot else { continue };
                if source.poll_ready() && ran(&self.counters, source.run_ready()) {
                    self.touched[idx] = true;
                    found = true;
                }
            }
            // The clock costs about as much as a look at the rings: read it every few.
            if found || (spin.is_multiple_of(CLOCK_EVERY) && Instant::now() >= deadline) {
                return found;
            }
            std::hint::spin_loop();
        }
    }

    /// Arms every source for the sleep and does the work some already have (true if
    /// any). With `defer`, a source with work is not run but wakes its own completion
    /// fd, so the thread comes back to it from its wait.
    ///
    /// A source whose run did nothing visible (its `arm` saw completions that were not
    /// there yet, as an engine may say spuriously, or a request that went on waiting)
    /// may have turned its kicks off again in that pass: it is armed once more before
    /// the thread sleeps, and with work showing still, it wakes its completion fd.
    fn arm(&mut self, defer: bool) -> bool {
        let mut found = false;
        for (idx, slot) in self.sources.iter_mut().enumerate() {
            let Some(source) = slot else { continue };
            if !source.arm() {
                continue;
            }
            if defer {
                source.wake();
            } else if ran(&self.counters, source.run_ready()) {
                self.touched[idx] = true;
                found = true;
            } else if source.arm() {
                source.wake();
            }
        }
        found
    }
}

#[cfg(test)]
mod tests;

/// Finishes every request `source` has in flight, logging a failure (removal, stop).
pub fn drain<S: IoSource + ?Sized>(source: &mut S, timeout: Duration) -> std::io::Result<()> {
    let in_flight = source.in_flight();
    let result = source.drain(timeout);
    match &result {
        Ok(()) => {
            tracing::debug!(
                disk = source.device(),
                queue = source.queue(),
                in_flight,
                "queue stopped"
            );
        }
        Err(e) => {
            tracing::error!(disk = source.device(), queue = source.queue(), error = %e, "drain failed");
        }
    }
    result
}

/// Counts a pass's work; true if it did anything.
fn ran(counters: &LoopCounters, work: PassWork) -> bool {
    count(counters, work);
    work != PassWork::default()
}

/// Adds a pass's requests, completions and mid-pass interrupts to the loop's counters.
fn count(counters: &LoopCounters, work: PassWork) {
    counters.requests.fetch_add(work.popped, Relaxed);
    counters.completions.fetch_add(work.completed, Relaxed);
    counters.signals.fetch_add(work.signalled, Relaxed);
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}
