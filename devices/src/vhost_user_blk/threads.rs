//! The vhost-user backend's adapter to the iothread [`Core`]: each iothread is one of the
//! library's vring worker threads (one epoll loop) serving the queues grouped on it. The
//! library delivers the kicks; each worker's completion, throttle-timer and
//! throttle-turn eventfds and the thread's control eventfd are registered in the same
//! epoll as listeners with ids above the queue count (the library reserves
//! `0..=num_queues`). After every event the core finishes the pass and polls, then the
//! thread goes back to the library's epoll.

use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use vhost_user_backend::VringRwLock;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use super::ThreadPlan;
use super::backend::{Backend, Handler, lock};
use super::host::VringHost;
use crate::config::IoThreadConfig;
use crate::iothread::loop_core::{Core, drain};
use crate::iothread::source::{FDS, IoSource, KICK, event_set};
use crate::iothread::{IoThreadCounters, LoopCounters};
use crate::virtio_blk::GuestMem;
use crate::virtio_blk::worker::{DRAIN_TIMEOUT, QueueWorker};

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

impl Session {
    /// The listener id of eventfd `which` of the worker in slot `local`.
    fn event_id(&self, local: usize, which: usize) -> u64 {
        self.id_base + (local * FDS + which) as u64
    }
}

struct State {
    session: Option<Session>,
    /// The queues, by index within the thread.
    core: Core<Worker>,
    /// When the thread last went to sleep in epoll (start of its polling).
    sleep_start: Option<Instant>,
}

/// One iothread of a backend.
pub(super) struct Thread {
    id: String,
    queues: Vec<u16>,
    config: Mutex<IoThreadConfig>,
    /// Written when the settings change: the thread applies them at once, idle or not.
    control: EventFd,
    counters: Arc<LoopCounters>,
    state: Mutex<State>,
}

impl Thread {
    pub(super) fn new(plan: ThreadPlan) -> std::io::Result<Thread> {
        let counters = Arc::new(LoopCounters::default());
        Ok(Thread {
            id: plan.config.id.clone(),
            state: Mutex::new(State {
                session: None,
                core: Core::new(&plan.config, counters.clone()),
                sleep_start: None,
            }),
            queues: plan.queues,
            config: Mutex::new(plan.config),
            control: EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)?,
            counters,
        })
    }

    pub(super) fn id(&self) -> &str {
        &self.id
    }

    /// Runs a block job's `op` on this thread's queues of `device` (under the state
    /// lock: between two of the library thread's passes).
    pub(super) fn visit_queues(
        &self,
        device: &str,
        op: &crate::iothread::SourceOp,
    ) -> Result<usize, String> {
        lock(&self.state).core.visit(device, op)
    }

    /// Makes the library's thread look at its queues again (through the control
    /// eventfd).
    pub(super) fn wake(&self) {
        if let Err(e) = self.control.write(1) {
            tracing::error!(iothread = %self.id, error = %e, "cannot wake the iothread");
        }
    }

    /// The queue bitmask for `queues_per_thread`.
    pub(super) fn mask(&self) -> u64 {
        self.queues.iter().fold(0u64, |m, &q| {
            m | 1u64.checked_shl(u32::from(q)).unwrap_or(0)
        })
    }

    /// New settings, applied by the thread as soon as it sees its control eventfd (at the
    /// next session's start when no frontend is connected).
    pub(super) fn update(&self, config: IoThreadConfig) {
        *lock(&self.config) = config;
        if let Err(e) = self.control.write(1) {
            tracing::error!(iothread = %self.id, error = %e, "cannot signal new settings");
        }
    }

    /// Its current settings.
    pub(super) fn config(&self) -> IoThreadConfig {
        lock(&self.config).clone()
    }

    /// The kernel id of the library thread serving this iothread now (in a session).
    pub(super) fn thread_id(&self) -> Option<i32> {
        self.counters.thread_id()
    }

    /// The queues it serves.
    pub(super) fn queues(&self) -> &[u16] {
        &self.queues
    }

    pub(super) fn counters(&self) -> IoThreadCounters {
        self.counters.snapshot()
    }

    /// The id of the control eventfd's listener: after every worker's.
    fn control_id(&self, session: &Session) -> u64 {
        session.event_id(self.queues.len(), 0)
    }

    pub(super) fn begin_session(
        &self,
        mem: GuestMem,
        handler: Arc<Handler>,
        num_queues: u16,
    ) -> std::io::Result<()> {
        let session = Session {
            handler,
            mem,
            started: false,
            id_base: u64::from(num_queues) + 1,
        };
        let fd = self.control.as_raw_fd();
        session
            .handler
            .register_listener(fd, EventSet::IN, self.control_id(&session))?;
        let mut st = lock(&self.state);
        st.session = Some(session);
        st.sleep_start = None;
        // The thread pins itself and starts counting its CPU time as soon as it runs.
        self.control.write(1)
    }

    pub(super) fn end_session(&self) {
        let mut st = lock(&self.state);
        for local in 0..self.queues.len() {
            self.remove_worker(&mut st, local);
        }
        if let Some(session) = st.session.take() {
            let fd = self.control.as_raw_fd();
            let _ =
                session
                    .handler
                    .unregister_listener(fd, EventSet::IN, self.control_id(&session));
        }
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
        let Some(mut worker) = st.core.take(local) else {
            return;
        };
        if let Some(session) = &st.session {
            for (which, fd) in worker.fds().into_iter().enumerate() {
                if let Some(fd) = fd {
                    let id = session.event_id(local, which);
                    let _ = session
                        .handler
                        .unregister_listener(fd, event_set(which), id);
                }
            }
        }
        let _ = drain(&mut *worker, DRAIN_TIMEOUT);
    }

    /// One event of the thread's epoll: a kick of queue `local` (or a vring just
    /// enabled), one of a worker's eventfds, or the control eventfd.
    pub(super) fn handle_event(
        &self,
        backend: &Backend,
        device_event: u16,
        vrings: &[VringRwLock<GuestMem>],
    ) {
        let mut guard = lock(&self.state);
        let st = &mut *guard;
        st.core.woke(st.sleep_start.take());
        let Some(session) = st.session.as_mut() else {
            return;
        };
        if !session.started {
            session.started = true;
            st.core.enter();
        }
        let event = u64::from(device_event);
        let local = usize::from(device_event);
        if let Some(vring) = vrings.get(local) {
            if st.core.get(local).is_none()
                && let Err(e) = self.start_worker(backend, st, local, vring)
            {
                tracing::error!(disk = %backend.device.id(), queue = self.queue(local), error = %e,
                    "cannot start the queue");
            }
            st.core.handle((local * FDS + KICK) as u64);
        } else if let Some(session) = &st.session
            && event == self.control_id(session)
        {
            let _ = self.control.read();
            st.core.configure(&lock(&self.config));
        } else if let Some(rel) = st
            .session
            .as_ref()
            .and_then(|s| event.checked_sub(s.id_base))
        {
            st.core.handle(rel);
        }
        st.core.finish_pass();
        // As QEMU counts it, the time before the next event includes the polling.
        st.sleep_start = st.core.idle();
    }

    fn queue(&self, local: usize) -> u16 {
        self.queues.get(local).copied().unwrap_or(u16::MAX)
    }

    /// Makes the worker of queue `local` and watches its eventfds.
    fn start_worker(
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
                lock(&self.config).aio_max_batch,
            )
            .map_err(std::io::Error::other)?;
        let mut watched = Vec::with_capacity(FDS);
        for (which, fd) in worker.fds().into_iter().enumerate() {
            let Some(fd) = fd else { continue };
            let (set, id) = (event_set(which), session.event_id(local, which));
            if let Err(e) = session.handler.register_listener(fd, set, id) {
                for (fd, set, id) in watched {
                    let _ = session.handler.unregister_listener(fd, set, id);
                }
                return Err(e);
            }
            watched.push((fd, set, id));
        }
        tracing::debug!(disk = %backend.device.id(), queue = self.queue(local), iothread = %self.id, "queue started");
        st.core.insert(local, Box::new(worker));
        Ok(())
    }
}
