//! A VM's block jobs (live disk mirror, ARCHITECTURE.md section 4b): at most one running
//! job per disk; finished jobs stay listed (the last [`KEEP_FINISHED`]) until a new job
//! takes their id. The job itself runs on the disk's iothread ([`devices::mirror`]).

use block::jobs::JobInfo;
use devices::mirror::{JobError, Mirror, MirrorConfig, open_target};

use super::{Vm, VmState};

/// Finished jobs kept for `vm.jobs`.
pub const KEEP_FINISHED: usize = 16;

impl Vm {
    /// Starts mirroring a disk per `config`: the target is opened (a local one created
    /// with the disk's size when missing) and the copy starts on the disk's iothread.
    pub fn start_mirror(&mut self, config: MirrorConfig) -> Result<JobInfo, JobError> {
        config
            .validate()
            .map_err(|e| JobError::Invalid(e.join("; ")))?;
        if self.state == VmState::Shutdown {
            return Err(JobError::Conflict(format!(
                "VM {} is shut down: boot it to mirror its disks",
                self.config.id
            )));
        }
        let id = config.job_id();
        let (blk, threads) = self.devices.disk_threads(&config.disk).ok_or_else(|| {
            JobError::NotFound(format!("VM {} has no disk {}", self.config.id, config.disk))
        })?;
        let mut jobs = self.devices.jobs();
        if let Some(j) = jobs
            .iter()
            .find(|j| !j.is_over() && j.disk() == config.disk)
        {
            return Err(JobError::Conflict(format!(
                "disk {} has a running job already ({})",
                config.disk,
                j.id()
            )));
        }
        if jobs.iter().any(|j| !j.is_over() && j.id() == id) {
            return Err(JobError::Conflict(format!("job {id} exists and runs")));
        }
        if let Some(path) = devices::mirror::local_target(&config)
            && let Some(d) = self.config.disks.iter().find(|d| d.path == path)
        {
            return Err(JobError::Conflict(format!(
                "target {} is the image of disk {}",
                path.display(),
                d.id
            )));
        }
        let target = open_target(&blk, &config)?;
        let mirror = Mirror::start(&blk, threads, config, target, self.notify.clone())?;
        let info = mirror.info();
        jobs.retain(|j| j.id() != id);
        jobs.push(mirror);
        let finished = jobs.iter().filter(|j| j.is_over()).count();
        let mut extra = finished.saturating_sub(KEEP_FINISHED);
        jobs.retain(|j| {
            let drop = extra > 0 && j.is_over();
            extra -= usize::from(drop);
            !drop
        });
        Ok(info)
    }

    /// Every job of the VM, running and finished, oldest first.
    pub fn jobs(&self) -> Vec<JobInfo> {
        self.devices.jobs().iter().map(Mirror::info).collect()
    }

    /// Pivots the disk of job `id` onto its target (the job must be ready); the VM's
    /// config names the target from then on.
    pub fn complete_job(&mut self, id: &str) -> Result<(), JobError> {
        let (disk, result) =
            self.with_job(id, |job, blk| (job.disk().to_string(), job.complete(blk)))?;
        let path = self.devices.disk(&disk).map(|blk| blk.config().path);
        if let (Some(path), Some(d)) = (path, self.config.disks.iter_mut().find(|d| d.id == disk)) {
            d.path = path;
        }
        result
    }

    /// Cancels job `id` (see [`Mirror::cancel`]).
    pub fn cancel_job(&mut self, id: &str, force: bool) -> Result<(), JobError> {
        self.with_job(id, |job, blk| job.cancel(blk, force))?
    }

    /// Changes the speed limit of job `id`.
    pub fn set_job_speed(&mut self, id: &str, speed: u64) -> Result<(), JobError> {
        self.with_job(id, |job, _| job.set_speed(speed))?
    }

    /// Lets go of jobs that ended on their own (a target error); returns every job's
    /// info, for events.
    pub fn reap_jobs(&self) -> Vec<JobInfo> {
        let mut jobs = self.devices.jobs();
        for job in jobs.iter_mut() {
            if job.is_over()
                && let Some(blk) = self.devices.disk(job.disk())
            {
                job.reap_if_over(&blk);
            }
        }
        jobs.iter().map(Mirror::info).collect()
    }

    fn with_job<R>(
        &self,
        id: &str,
        f: impl FnOnce(&mut Mirror, &std::sync::Arc<devices::virtio_blk::device::BlkDevice>) -> R,
    ) -> Result<R, JobError> {
        let mut jobs = self.devices.jobs();
        let job = jobs
            .iter_mut()
            .find(|j| j.id() == id)
            .ok_or_else(|| JobError::NotFound(format!("VM {} has no job {id}", self.config.id)))?;
        let blk = self
            .devices
            .disk(job.disk())
            .ok_or_else(|| JobError::Conflict(format!("job {id}: disk {} is gone", job.disk())))?;
        Ok(f(job, &blk))
    }
}
