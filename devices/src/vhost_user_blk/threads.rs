//! The iothreads of a vhost-user backend: each is one of the library's vring worker
//! threads (one epoll loop), serving the queues grouped on it. Besides the kicks (which
//! the library delivers), its epoll watches each worker's completion eventfd, throttle
//! timerfd and throttle-turn eventfd, registered as listeners with ids above the queue
//! count (the completion eventfd edge-triggered: it is never read). After every event
//! the thread signals each queue it touched at most once, polls adaptively (for drivers
//! only, see [`crate::iothread::poll`]), then turns the drivers' kicks and the engines'
//! eventfds back on and looks once more before going back to sleep.

use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vhost_user_backend::VringRwLock;
use vmm_sys_util::epoll::EventSet;

use super::ThreadPlan;
use super::backend::{Backend, DRAIN_TIMEOUT, Handler, lock};
use super::host::VringHost;
use crate::config::IoThreadConfig;
use crate::iothread::poll::PollWindow;
use crate::iothread::{IoThreadCounters, LoopCounters, pin};
use crate::virtio_blk::GuestMem;
use crate::virtio_blk::worker::{PassWork, QueueWorker};

/// Listener kinds per worker, in id order.
const COMPLETION: usize = 0;
/// Throttle timer.
const TIMER: usize = 1;
/// Throttle group turn.
const WAKE: usize = 2;
/// Listeners per worker.
const KINDS: usize = 3;

/// Most polling rounds that find work, per event, before the thread goes back to epoll
/// (so control messages waiting for the thread's lock get their turn under load).
const MAX_POLL_ROUNDS: usize = 64;

/// Spins between two readings of the clock while polling.
const CLOCK_EVERY: u32 = 4;

type Worker = QueueWorker<VringHost>;

/// The part of a session a thread needs.
struct Session {
    handler: Arc<Handler>,
    mem: GuestMem,
    /// The thread has recorded its CPU clock and applied its affinity.
    started: bool,
    /// The first listener id: num_queues + 1.
    id_base: u64,
}

struct State {
    session: Option<Session>,
    /// By index within the thread.
    workers: Vec<Option<Worker>>,
    touched: Vec<bool>,
    window: PollWindow,
    /// When the thread last went to sleep in epoll (start of its polling).
    sleep_start: Option<Instant>,
    /// The settings generation applied.
    generation: u64,
    max_batch: u32,
}

/// One iothread of a backend.
pub(super) struct Thread {
    id: String,
    queues: Vec<u16>,
    config: Mutex<IoThreadConfig>,
    generation: AtomicU64,
    counters: LoopCounters,
    state: Mutex<State>,
}

impl Thread {
    pub(super) fn new(plan: ThreadPlan) -> Thread {
        let c = &plan.config;
        let n = plan.queues.len();
        let counters = LoopCounters::default();
        Thread {
            id: c.id.clone(),
            state: Mutex::new(State {
                session: None,
                workers: (0..n).map(|_| None).collect(),
                touched: vec![false; n],
                window: PollWindow::new(c.poll_max_ns, c.poll_grow, c.poll_shrink),
                sleep_start: None,
                generation: 0,
                max_batch: c.aio_max_batch,
            }),
            queues: plan.queues,
            config: Mutex::new(plan.config),
            generation: AtomicU64::new(0),
            counters,
        }
    }

    pub(super) fn id(&self) -> &str {
        &self.id
    }

    /// The queue bitmask for `queues_per_thread`.
    pub(super) fn mask(&self) -> u64 {
        self.queues.iter().fold(0u64, |m, &q| {
            m | 1u64.checked_shl(u32::from(q)).unwrap_or(0)
        })
    }

    pub(super) fn update(&self, config: IoThreadConfig) {
        *lock(&self.config) = config;
        self.generation.fetch_add(1, Relaxed);
    }

    /// The queues it serves.
    pub(super) fn queues(&self) -> &[u16] {
        &self.queues
    }

    pub(super) fn counters(&self) -> IoThreadCounters {
        self.counters.snapshot()
    }

    pub(super) fn begin_session(&self, mem: GuestMem, handler: Arc<Handler>, num_queues: u16) {
        let mut st = lock(&self.state);
        st.session = Some(Session {
            handler,
            mem,
            started: false,
            id_base: u64::from(num_queues) + 1,
        });
        st.sleep_start = None;
    }

    pub(super) fn end_session(&self) {
        let mut st = lock(&self.state);
        for local in 0..st.workers.len() {
            self.remove_worker(&mut st, local);
        }
        st.session = None;
        st.sleep_start = None;
        // The session's thread is still alive (the daemon has not been dropped yet).
        self.counters.retire_thread();
    }

    /// Drains and drops the worker of queue `local` (GET_VRING_BASE, reset, session end).
    pub(super) fn stop_queue(&self, local: usize) {
        let mut st = lock(&self.state);
        self.remove_worker(&mut st, local);
    }

    fn remove_worker(&self, st: &mut State, local: usize) {
        let Some(mut worker) = st.workers.get_mut(local).and_then(Option::take) else {
            return;
        };
        if let Some(session) = &st.session {
            for (kind, fd) in worker_fds(&worker).into_iter().enumerate() {
                let _ = session.handler.unregister_listener(
                    fd,
                    listen_set(kind),
                    event_id(session, local, kind),
                );
            }
        }
        let in_flight = worker.in_flight();
        if let Err(e) = worker.drain(DRAIN_TIMEOUT) {
            tracing::error!(disk = %worker.shared().id, queue = worker.index(), error = %e, "drain failed");
        }
        tracing::debug!(disk = %worker.shared().id, queue = worker.index(), in_flight, "queue stopped");
    }

    /// One event of the thread's epoll: a kick (or a vring just enabled), or one of a
    /// worker's eventfds.
    pub(super) fn handle_event(
        &self,
        backend: &Backend,
        device_event: u16,
        vrings: &[VringRwLock<GuestMem>],
    ) {
        let mut guard = lock(&self.state);
        let st = &mut *guard;
        if let Some(since) = st.sleep_start.take() {
            st.window.after_block(nanos(since.elapsed()));
            self.counters.poll_ns.store(st.window.ns, Relaxed);
        }
        self.counters.wakeups.fetch_add(1, Relaxed);
        self.counters.passes.fetch_add(1, Relaxed);
        self.apply_settings(st);
        let Some(session) = st.session.as_mut() else {
            return;
        };
        if !session.started {
            session.started = true;
            self.counters.record_current_thread();
            pin(&lock(&self.config).cpu_affinity);
        }
        let nq = usize::from(backend.config.disk.num_queues);
        let d = usize::from(device_event);
        if let Some(vring) = vrings.get(d) {
            if st.workers.get(d).is_some_and(Option::is_none)
                && let Err(e) = self.create_worker(backend, st, d, vring)
            {
                tracing::error!(disk = %backend.device.id(), queue = self.queue(d), error = %e,
                    "cannot start the queue");
            }
            if let Some(Some(w)) = st.workers.get_mut(d) {
                let work = w.run_pass();
                self.count(work);
                mark(&mut st.touched, d);
            }
        } else if let Some(rel) = d.checked_sub(nq + 1) {
            let (local, kind) = (rel / KINDS, rel % KINDS);
            if let Some(Some(w)) = st.workers.get_mut(local) {
                if kind == COMPLETION {
                    // A disabled ring only finishes what it started.
                    self.run(w);
                } else {
                    w.process_throttled();
                }
                mark(&mut st.touched, local);
            }
        }
        self.finish_pass(st);
        // As QEMU counts it, the time before the next event includes the polling.
        st.sleep_start = self.poll(st);
    }

    fn queue(&self, local: usize) -> u16 {
        self.queues.get(local).copied().unwrap_or(u16::MAX)
    }

    fn create_worker(
        &self,
        backend: &Backend,
        st: &mut State,
        local: usize,
        vring: &VringRwLock<GuestMem>,
    ) -> std::io::Result<()> {
        let Some(session) = &st.session else {
            return Ok(());
        };
        let worker = backend
            .device
            .new_worker(
                self.queue(local),
                VringHost::new(vring.clone()),
                session.mem.clone(),
                st.max_batch,
            )
            .map_err(std::io::Error::other)?;
        let fds = worker_fds(&worker);
        for (kind, fd) in fds.iter().enumerate() {
            if let Err(e) = session.handler.register_listener(
                *fd,
                listen_set(kind),
                event_id(session, local, kind),
            ) {
                for (k, fd) in fds.iter().enumerate().take(kind) {
                    let _ = session.handler.unregister_listener(
                        *fd,
                        listen_set(k),
                        event_id(session, local, k),
                    );
                }
                return Err(e);
            }
        }
        tracing::debug!(disk = %backend.device.id(), queue = self.queue(local), iothread = %self.id, "queue started");
        if let Some(slot) = st.workers.get_mut(local) {
            *slot = Some(worker);
        }
        Ok(())
    }

    fn apply_settings(&self, st: &mut State) {
        let generation = self.generation.load(Relaxed);
        if generation == st.generation {
            return;
        }
        st.generation = generation;
        let config = lock(&self.config).clone();
        st.window
            .configure(config.poll_max_ns, config.poll_grow, config.poll_shrink);
        self.counters.poll_ns.store(st.window.ns, Relaxed);
        st.max_batch = config.aio_max_batch;
        for w in st.workers.iter_mut().flatten() {
            w.set_max_batch(config.aio_max_batch);
        }
        if let Some(session) = st.session.as_mut() {
            // Re-pinned at the next event of the session's thread.
            session.started = false;
        }
        tracing::info!(iothread = %self.id, ?config, "iothread settings changed");
    }

    fn count(&self, work: PassWork) {
        self.counters.requests.fetch_add(work.popped, Relaxed);
        self.counters.completions.fetch_add(work.completed, Relaxed);
    }

    /// At most one interrupt per touched queue.
    fn finish_pass(&self, st: &mut State) {
        for (touched, slot) in st.touched.iter_mut().zip(st.workers.iter_mut()) {
            if std::mem::take(touched)
                && let Some(w) = slot
                && w.finish_pass()
            {
                self.counters.signals.fetch_add(1, Relaxed);
            }
        }
    }

    /// Spins up to the polling window for new chains or finished I/O; while it finds
    /// some, does it and polls again (bounded by [`MAX_POLL_ROUNDS`]). It spins only for
    /// drivers, never for a disk (see [`crate::iothread::poll`]). Then turns kicks and
    /// completion signals back on for the sleep in epoll (work found meanwhile is done
    /// first). Returns when the last round, the one that found nothing, started, if that
    /// round waited for a driver (the sleep then measures what the window adapts to).
    fn poll(&self, st: &mut State) -> Option<Instant> {
        for _ in 0..MAX_POLL_ROUNDS {
            let start = Instant::now();
            let busy = !spin_worthy(st);
            let budget = if busy {
                Duration::ZERO
            } else {
                st.window.spin_budget()
            };
            let found = !budget.is_zero() && self.poll_round(st, start + budget);
            if found {
                st.window.after_hit(nanos(start.elapsed()));
                self.counters.poll_ns.store(st.window.ns, Relaxed);
            } else if !self.arm(st, st.window.max_ns == 0) {
                // Without polling, work that came while the thread was awake went through
                // epoll like any other (`arm` deferred it).
                return (!busy).then_some(start);
            }
            self.counters.poll_hits.fetch_add(1, Relaxed);
            self.counters.passes.fetch_add(1, Relaxed);
            self.finish_pass(st);
        }
        // Still busy: arm for epoll anyway (it must not sleep through a kick that is not
        // sent), and come back at once for whatever waits.
        self.arm(st, true);
        None
    }

    /// Spins until `deadline` or until a worker has work, which it does. True if found.
    fn poll_round(&self, st: &mut State, deadline: Instant) -> bool {
        let mut spin = 0u32;
        loop {
            spin = spin.wrapping_add(1);
            let mut found = false;
            for (local, slot) in st.workers.iter_mut().enumerate() {
                let Some(w) = slot else { continue };
                if w.poll_ready() && self.run(w) {
                    mark(&mut st.touched, local);
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

    /// Arms every worker for the sleep in epoll and does the work some already have
    /// (true if any). With `defer` a worker with work is not run but wakes its own
    /// completion fd, so the thread comes back to it from the library's epoll.
    fn arm(&self, st: &mut State, defer: bool) -> bool {
        let mut found = false;
        for (local, slot) in st.workers.iter_mut().enumerate() {
            let Some(w) = slot else { continue };
            if !w.arm() {
                continue;
            }
            if defer {
                w.wake_self();
            } else if self.run(w) {
                mark(&mut st.touched, local);
                found = true;
            }
        }
        found
    }

    /// One pass of a worker whose ring is live; true if it did anything.
    fn run(&self, w: &mut Worker) -> bool {
        let work = if w.host_ref().is_live() {
            w.run_pass()
        } else {
            w.process_completions()
        };
        if work == PassWork::default() {
            return false;
        }
        self.count(work);
        true
    }
}

/// Whether spinning may pay off for every worker of the thread (no block I/O in
/// flight, no slow disk: see [`crate::iothread::poll`]).
fn spin_worthy(st: &State) -> bool {
    let cap = st.window.max_ns;
    st.workers.iter().flatten().all(|w| w.spin_worthy(cap))
}

/// The listener id of a worker's eventfd: above the ids the library reserves
/// (`0..=num_queues`).
fn event_id(session: &Session, local: usize, kind: usize) -> u64 {
    session.id_base + (local * KINDS + kind) as u64
}

/// How a worker's eventfd of `kind` is watched: the completion fd edge-triggered (it is
/// never read: [`QueueWorker::run_pass`] reaps without a syscall), the throttle fds
/// level-triggered (read when handled).
fn listen_set(kind: usize) -> EventSet {
    if kind == COMPLETION {
        EventSet::IN | EventSet::EDGE_TRIGGERED
    } else {
        EventSet::IN
    }
}

/// Notes that queue `local` needs a signal check at the end of the pass.
fn mark(touched: &mut [bool], local: usize) {
    if let Some(t) = touched.get_mut(local) {
        *t = true;
    }
}

fn worker_fds(w: &Worker) -> [RawFd; KINDS] {
    let mut fds = [0; KINDS];
    fds[COMPLETION] = w.completion_fd();
    fds[TIMER] = w.timer_fd();
    fds[WAKE] = w.wake_fd();
    fds
}

fn nanos(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}
