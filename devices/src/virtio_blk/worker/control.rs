//! What a block job asks of a queue worker, on the worker's thread between two passes:
//! pause (finish what is in flight, take nothing new), attach a mirror, switch to
//! another disk (a mirror's pivot), go on.

use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

use block::jobs::MirrorLink;
use block::{Disk, IoEngine};

use super::{PassWork, QueueHost, QueueWorker};

impl<Q: QueueHost> QueueWorker<Q> {
    /// Stops taking new chains and starting throttled requests, and waits (at most
    /// `timeout`) until the disk has nothing in flight; the guest's requests wait in the
    /// ring and the throttle's pen, in order.
    pub fn pause(&mut self, timeout: Duration) -> io::Result<()> {
        self.paused = true;
        self.quiesce(timeout)
    }

    /// Whether the worker is paused.
    pub fn is_paused(&self) -> bool {
        self.paused
    }

    /// Goes on after [`QueueWorker::pause`]: starts what the throttle admits and takes
    /// the chains that came meanwhile.
    pub fn resume(&mut self) -> PassWork {
        if !std::mem::take(&mut self.paused) {
            return PassWork::default();
        }
        self.tick();
        self.start_admitted();
        if self.host.is_live() {
            self.run_pass()
        } else {
            self.process_completions()
        }
    }

    /// The completion eventfd of the worker's disk queue (engines made for the queue
    /// elsewhere signal it).
    pub fn notifier(&self) -> &vmm_sys_util::eventfd::EventFd {
        self.disk.notifier()
    }

    /// Attaches a mirror job's link to the disk, write-blocking through `engine` when
    /// given (`None` detaches; writes to the old target in flight are waited for first).
    pub fn attach_mirror(
        &mut self,
        link: Option<Arc<MirrorLink>>,
        engine: Option<Box<dyn IoEngine>>,
    ) -> Result<(), String> {
        if link.is_none() && self.disk.has_mirror() {
            self.quiesce(super::DRAIN_TIMEOUT)
                .map_err(|e| format!("queue {}: {e}", self.index))?;
        }
        if link.as_ref().is_some_and(|l| l.write_blocking()) && engine.is_none() {
            return Err(format!(
                "queue {}: no engine made for the mirror target",
                self.index
            ));
        }
        self.disk
            .attach_mirror(link, engine)
            .map_err(|e| format!("queue {}: {e}", self.index))
    }

    /// Sends every later request to `disk` through `engine` (made on this queue's
    /// notifier); the worker must be paused, its mirror detached.
    pub fn switch_disk(
        &mut self,
        disk: Arc<Disk>,
        engine: Box<dyn IoEngine>,
    ) -> Result<(), String> {
        if !self.paused {
            return Err(format!("queue {}: not paused", self.index));
        }
        self.disk
            .switch_disk(disk, engine)
            .map_err(|e| format!("queue {}: {e}", self.index))
    }

    /// Completes what the disk finishes until nothing is in flight there.
    fn quiesce(&mut self, timeout: Duration) -> io::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            self.process_completions();
            if self.disk.in_flight() == 0 {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("{} requests still in flight", self.disk.in_flight()),
                ));
            }
            let mut pfd = libc::pollfd {
                fd: self.disk.completion_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: poll reads and writes only the pollfd we pass.
            unsafe { libc::poll(&mut pfd, 1, 10) };
        }
    }
}
