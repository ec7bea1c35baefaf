//! Block jobs of a vhost-user backend: a live mirror of its disk, driven like the VMM's
//! ([`crate::mirror::Mirror`]). The disk's queues are visited on the library's threads
//! (under their state lock, between two passes); the job runs on a thread of its own,
//! started at the first job, because the queue threads exist only while a frontend is
//! connected and a mirror goes on between sessions.

use std::sync::Arc;

use block::jobs::JobInfo;
use vmm_sys_util::eventfd::EventFd;

use super::backend::{Backend, lock};
use super::threads::Thread;
use crate::config::IoThreadConfig;
use crate::iothread::{IoThread, SourceOp};
use crate::mirror::{JobError, Mirror, MirrorConfig, QueueVisitor, open_target};

impl QueueVisitor for Thread {
    fn visit(&self, device: &str, op: SourceOp) -> Result<usize, String> {
        let n = self.visit_queues(device, &op)?;
        // The library's thread finishes the pass (interrupts) and polls again.
        self.wake();
        Ok(n)
    }
}

impl Backend {
    /// Starts mirroring the disk per `config` (`disk` must name it); a state change
    /// writes `notify`.
    pub fn start_mirror(
        &self,
        config: MirrorConfig,
        notify: Option<Arc<EventFd>>,
    ) -> Result<JobInfo, JobError> {
        config
            .validate()
            .map_err(|e| JobError::Invalid(e.join("; ")))?;
        if config.disk != self.device.id() {
            return Err(JobError::NotFound(format!(
                "no disk {} (this backend serves {})",
                config.disk,
                self.device.id()
            )));
        }
        let mut jobs = lock(&self.jobs);
        if self.stopping.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(JobError::Conflict("the backend is stopping".into()));
        }
        // A job that ended on its own is let go first (its id may be taken again).
        for job in jobs.iter_mut() {
            job.reap_if_over(&self.device);
        }
        jobs.check_new(&config)?;
        let target = open_target(&self.device, &config)?;
        let job_thread = self.job_thread().map_err(JobError::Failed)?;
        let queues = self
            .threads
            .iter()
            .map(|t| t.clone() as Arc<dyn QueueVisitor>)
            .collect();
        let mirror = Mirror::start_on(&self.device, queues, job_thread, config, target, notify)?;
        let info = mirror.info();
        jobs.insert(mirror);
        Ok(info)
    }

    /// Every job, running and finished, oldest first (jobs that ended on their own are
    /// let go first).
    pub fn jobs(&self) -> Vec<JobInfo> {
        let mut jobs = lock(&self.jobs);
        for job in jobs.iter_mut() {
            job.reap_if_over(&self.device);
        }
        jobs.infos()
    }

    /// Pivots the disk onto job `id`'s target (the job must be ready).
    pub fn complete_job(&self, id: &str) -> Result<(), JobError> {
        lock(&self.jobs).get_mut(id)?.complete(&self.device)
    }

    /// Cancels job `id`.
    pub fn cancel_job(&self, id: &str, force: bool) -> Result<(), JobError> {
        lock(&self.jobs).get_mut(id)?.cancel(&self.device, force)
    }

    /// Changes job `id`'s speed limit.
    pub fn set_job_speed(&self, id: &str, speed: u64) -> Result<(), JobError> {
        lock(&self.jobs).get_mut(id)?.set_speed(speed)
    }

    /// Cancels every running job; no job starts after this (the backend is stopping).
    pub fn abandon_jobs(&self) {
        let mut jobs = lock(&self.jobs);
        self.stopping
            .store(true, std::sync::atomic::Ordering::SeqCst);
        for job in jobs.iter_mut() {
            job.abandon(&self.device);
        }
    }

    fn job_thread(&self) -> Result<Arc<IoThread>, String> {
        let mut slot = lock(&self.job_thread);
        if let Some(t) = slot.as_ref() {
            return Ok(t.clone());
        }
        let t = Arc::new(
            IoThread::spawn(IoThreadConfig::new("mirror"))
                .map_err(|e| format!("cannot start the job thread: {e}"))?,
        );
        *slot = Some(t.clone());
        Ok(t)
    }
}
