//! What a block job asks of a queue worker, on the worker's thread between two passes:
//! settle while its disk is held (finish what is in flight; [`BlkShared::held`] keeps new
//! requests out), attach a mirror, switch to another disk (a mirror's pivot), go on.
//!
//! [`BlkShared::held`]: super::BlkShared::held

use std::io;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use block::jobs::MirrorLink;
use block::{Disk, IoEngine};

use super::{PassWork, QueueHost, QueueWorker};

impl<Q: QueueHost> QueueWorker<Q> {
    /// With its disk held ([`super::BlkShared::held`]: no new chain is taken and no
    /// throttled request starts), waits at most `timeout` until the disk has nothing in
    /// flight; the guest's requests wait in the ring and the throttle's pen, in order.
    pub fn pause(&mut self, timeout: Duration) -> io::Result<()> {
        if !self.is_held() {
            return Err(io::Error::other(format!(
                "queue {}: its disk is not held",
                self.index
            )));
        }
        self.quiesce(timeout)
    }

    /// Whether the disk is held: the worker takes no new request.
    pub fn is_held(&self) -> bool {
        self.shared.held.load(Ordering::Acquire)
    }

    /// Goes on once the disk is no longer held: starts what the throttle admits and
    /// takes the chains that came meanwhile.
    pub fn resume(&mut self) -> PassWork {
        if self.is_held() {
            return PassWork::default();
        }
        if self.holds_failed() && !self.is_io_stopped() {
            // The I/O error's resume came while the job held the disk: retry now.
            return self.retry_held();
        }
        self.tick();
        self.start_admitted();
        if self.host.is_live() {
            self.run_pass()
        } else {
            self.process_completions()
        }
    }

    /// The disk the worker's requests go to.
    pub fn disk(&self) -> &Arc<Disk> {
        self.disk.disk()
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
    /// notifier); its disk must be held and settled, its mirror detached.
    pub fn switch_disk(
        &mut self,
        disk: Arc<Disk>,
        engine: Box<dyn IoEngine>,
    ) -> Result<(), String> {
        if !self.is_held() {
            return Err(format!("queue {}: its disk is not held", self.index));
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
