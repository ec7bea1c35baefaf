//! The loop of one iothread: a pass handles what epoll reported (kick and completion
//! eventfds edge-triggered and never read, throttle and control fds level-triggered),
//! signals each touched queue at most once, then polls adaptively (for drivers only, see
//! [`super::poll`]); before sleeping it turns kicks and completion signals back on and
//! looks once more.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use super::poll::PollWindow;
use super::source::{COMPLETION, FDS, IoSource, KICK};
use super::{Command, LoopCounters, Shared, lock};
use crate::config::IoThreadConfig;
use crate::virtio_blk::worker::PassWork;

/// Token of the control eventfd.
const CONTROL: u64 = u64::MAX;

/// How long a stopping iothread waits for each queue's requests.
const STOP_DRAIN: Duration = Duration::from_secs(30);

/// Spins between two readings of the clock while polling.
const CLOCK_EVERY: u32 = 4;

/// Passes in a row whose polling found work before the loop looks at its other fds
/// (control, throttle timers) with a zero-timeout `epoll_wait`.
const BUSY_PASSES_PER_EPOLL: u32 = 8;

struct Loop<'a> {
    shared: &'a Shared,
    epoll: Epoll,
    sources: Vec<Option<Box<dyn IoSource>>>,
    touched: Vec<bool>,
    window: PollWindow,
    max_batch: u32,
}

/// The loop's epoll, watching the control eventfd: made by the spawning thread, so that
/// a host that cannot give one (no file descriptors left) fails the spawn, not the loop.
pub(super) fn epoll_for(shared: &Shared) -> std::io::Result<Epoll> {
    let epoll = Epoll::new()?;
    epoll.ctl(
        ControlOperation::Add,
        shared.control.as_raw_fd(),
        EpollEvent::new(EventSet::IN, CONTROL),
    )?;
    Ok(epoll)
}

/// Runs on `epoll` (from [`epoll_for`]) until told to stop, then drains every queue.
pub(super) fn run(shared: &Shared, config: IoThreadConfig, epoll: Epoll) {
    let _span = tracing::info_span!("iothread", id = %shared.id).entered();
    shared.counters.record_current_thread();
    super::pin(&config.cpu_affinity);
    let mut l = Loop {
        shared,
        epoll,
        sources: Vec::new(),
        touched: Vec::new(),
        window: PollWindow::new(config.poll_max_ns, config.poll_grow, config.poll_shrink),
        max_batch: config.aio_max_batch,
    };
    let mut events = vec![EpollEvent::default(); 64];
    let mut busy = 0u32;
    loop {
        shared.counters.passes.fetch_add(1, Relaxed);
        let poll_start = Instant::now();
        let (polled, waits_for_driver) = l.poll(poll_start);
        if polled && busy < BUSY_PASSES_PER_EPOLL {
            // Polling found work: skip the look at the other fds for a few passes.
            busy += 1;
            l.finish_pass();
            continue;
        }
        busy = 0;
        // Kicks and completion signals are off while the thread is awake: turn them on
        // and look once more before sleeping.
        let sleep = !polled && !l.arm();
        let timeout = if sleep { -1 } else { 0 };
        let n = match l.epoll.wait(timeout, &mut events) {
            Ok(n) => n,
            // io_uring task work interrupts waits; that is not an error.
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => 0,
            Err(e) => {
                tracing::error!(error = %e, "epoll_wait failed");
                0
            }
        };
        if sleep && waits_for_driver {
            // As QEMU counts it, the wait includes the spin before it.
            l.window.after_block(poll_start.elapsed().as_nanos() as u64);
            shared.counters.poll_ns.store(l.window.ns, Relaxed);
        }
        if n > 0 {
            shared.counters.wakeups.fetch_add(1, Relaxed);
        }
        let mut stop = false;
        for ev in &events[..n] {
            let token = ev.data();
            if token == CONTROL {
                stop |= l.control();
                continue;
            }
            let (idx, which) = ((token / FDS as u64) as usize, (token % FDS as u64) as usize);
            if let Some(Some(source)) = l.sources.get_mut(idx) {
                let work = source.handle(which);
                l.count(work);
                l.touched[idx] = true;
            }
        }
        l.finish_pass();
        if stop {
            break;
        }
    }
    l.stop();
}

impl Loop<'_> {
    /// Spins up to the polling window looking for work; does it and returns true if
    /// found. It spins only for drivers, never for a disk (see [`super::poll`]); the
    /// second value says whether it waited for drivers only.
    fn poll(&mut self, start: Instant) -> (bool, bool) {
        if self.sources.is_empty() {
            return (false, false);
        }
        let cap = self.window.max_ns;
        if !self.sources.iter().flatten().all(|s| s.spin_worthy(cap)) {
            return (false, false);
        }
        let budget = self.window.spin_budget();
        if budget.is_zero() {
            return (false, true);
        }
        let deadline = start + budget;
        let mut spin = 0u32;
        loop {
            spin = spin.wrapping_add(1);
            let mut found = false;
            for (idx, slot) in self.sources.iter_mut().enumerate() {
                if let Some(source) = slot
                    && source.poll_ready()
                {
                    count(&self.shared.counters, source.run_ready());
                    self.touched[idx] = true;
                    found = true;
                }
            }
            if found {
                self.shared.counters.poll_hits.fetch_add(1, Relaxed);
                self.window.after_hit(start.elapsed().as_nanos() as u64);
                self.shared.counters.poll_ns.store(self.window.ns, Relaxed);
                return (true, true);
            }
            // The clock costs about as much as a look at the rings: read it every few.
            if spin.is_multiple_of(CLOCK_EVERY) && Instant::now() >= deadline {
                return (false, true);
            }
            std::hint::spin_loop();
        }
    }

    /// Arms every source for sleeping; runs those that already have work. True if any did.
    /// Without polling, a source with work wakes its completion fd instead, so the work is
    /// taken from epoll like any other.
    fn arm(&mut self) -> bool {
        let mut found = false;
        let polling = self.window.max_ns > 0;
        for (idx, slot) in self.sources.iter_mut().enumerate() {
            if let Some(source) = slot
                && source.arm()
            {
                if !polling {
                    source.wake();
                    continue;
                }
                count(&self.shared.counters, source.run_ready());
                self.touched[idx] = true;
                found = true;
            }
        }
        if found {
            // Work that came while the thread was awake, found by looking: a poll hit.
            self.shared.counters.poll_hits.fetch_add(1, Relaxed);
        }
        found
    }

    fn count(&self, work: PassWork) {
        count(&self.shared.counters, work);
    }

    /// One interrupt per touched queue per pass.
    fn finish_pass(&mut self) {
        for (idx, touched) in self.touched.iter_mut().enumerate() {
            if std::mem::take(touched)
                && let Some(Some(source)) = self.sources.get_mut(idx)
                && source.finish_pass()
            {
                self.shared.counters.signals.fetch_add(1, Relaxed);
            }
        }
    }

    /// Runs queued commands; returns true on Stop.
    fn control(&mut self) -> bool {
        let _ = self.shared.control.read();
        let commands: Vec<Command> = lock(&self.shared.commands).drain(..).collect();
        let mut stop = false;
        for command in commands {
            match command {
                Command::Add(source, reply) => {
                    let _ = reply.send(self.add(source));
                }
                Command::RemoveDevice(device, timeout, reply) => {
                    let _ = reply.send(self.remove_device(&device, timeout));
                }
                Command::Update(config) => self.update(&config),
                Command::Stop => stop = true,
            }
        }
        stop
    }

    fn add(&mut self, mut source: Box<dyn IoSource>) -> std::io::Result<()> {
        source.set_max_batch(self.max_batch);
        let idx = match self.sources.iter().position(Option::is_none) {
            Some(idx) => idx,
            None => {
                self.sources.push(None);
                self.touched.push(false);
                self.sources.len() - 1
            }
        };
        let fds = source.fds();
        for (which, fd) in fds.iter().enumerate() {
            let token = (idx * FDS + which) as u64;
            // Kick and completion eventfds are never read (a syscall less per pass).
            let events = match which {
                KICK | COMPLETION => EventSet::IN | EventSet::EDGE_TRIGGERED,
                _ => EventSet::IN,
            };
            if let Err(e) =
                self.epoll
                    .ctl(ControlOperation::Add, *fd, EpollEvent::new(events, token))
            {
                self.unwatch(&fds[..which]);
                return Err(e);
            }
        }
        tracing::debug!(
            disk = source.device(),
            queue = source.queue(),
            "queue added"
        );
        self.sources[idx] = Some(source);
        // A kick may have come before we watched the fd.
        self.touched[idx] = true;
        if let Some(Some(source)) = self.sources.get_mut(idx) {
            let work = source.run_ready();
            self.count(work);
        }
        Ok(())
    }

    fn unwatch(&self, fds: &[RawFd]) {
        for fd in fds {
            let _ = self
                .epoll
                .ctl(ControlOperation::Delete, *fd, EpollEvent::default());
        }
    }

    fn remove_device(&mut self, device: &str, timeout: Duration) -> std::io::Result<usize> {
        let mut removed = 0;
        let mut result = Ok(());
        for idx in 0..self.sources.len() {
            if self.sources[idx]
                .as_ref()
                .is_none_or(|s| s.device() != device)
            {
                continue;
            }
            if let Some(mut source) = self.sources[idx].take() {
                self.unwatch(&source.fds());
                if let Err(e) = source.drain(timeout) {
                    tracing::error!(disk = device, queue = source.queue(), error = %e, "drain failed");
                    result = Err(e);
                }
                removed += 1;
            }
        }
        result.map(|()| removed)
    }

    fn update(&mut self, config: &IoThreadConfig) {
        self.window
            .configure(config.poll_max_ns, config.poll_grow, config.poll_shrink);
        self.shared.counters.poll_ns.store(self.window.ns, Relaxed);
        self.max_batch = config.aio_max_batch;
        for source in self.sources.iter_mut().flatten() {
            source.set_max_batch(config.aio_max_batch);
        }
        super::pin(&config.cpu_affinity);
        tracing::info!(?config, "iothread settings changed");
    }

    fn stop(&mut self) {
        for slot in &mut self.sources {
            if let Some(mut source) = slot.take()
                && let Err(e) = source.drain(STOP_DRAIN)
            {
                tracing::error!(disk = source.device(), queue = source.queue(), error = %e, "drain on stop");
            }
        }
    }
}

/// Adds a pass's requests and completions to the loop's counters.
fn count(counters: &LoopCounters, work: PassWork) {
    counters.requests.fetch_add(work.popped, Relaxed);
    counters.completions.fetch_add(work.completed, Relaxed);
}
