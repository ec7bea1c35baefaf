//! A VM's block jobs (live disk mirror, docs/architecture.md), kept in a
//! [`devices::mirror::JobList`]; the job itself runs on the disk's iothread
//! ([`devices::mirror`]).

use std::sync::Arc;

use block::jobs::JobInfo;
use devices::mirror::{JobError, Mirror, MirrorConfig, open_target};
use devices::virtio_blk::device::BlkDevice;

use super::{Vm, VmState};

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
        let (blk, threads) = self.devices.disk_threads(&config.disk).ok_or_else(|| {
            JobError::NotFound(format!("VM {} has no disk {}", self.config.id, config.disk))
        })?;
        // A job that ended on its own is let go first (its id may be taken again).
        self.reap_jobs();
        self.devices.jobs().check_new(&config)?;
        if let Some(path) = devices::mirror::local_target(&config)
            && let Some(d) = self.config.disks.iter().find(|d| d.path == path)
        {
            return Err(JobError::Conflict(format!(
                "target {} is the image of disk {}",
                path.display(),
                d.id
            )));
        }
        // Opening the target may take a while (an NBD server's handshake): not under
        // the jobs' lock, which a guest's eject takes on its vCPU.
        let target = open_target(&blk, &config)?;
        let mut jobs = self.devices.jobs();
        jobs.check_new(&config)?;
        // Every queue of the disk must mark the job's bitmap: the guest cannot start
        // queues the job would not see while it attaches.
        let pci = self.devices.disk_pci(&config.disk);
        let device = pci.as_ref().map(|p| block::sync::lock(p));
        if device.is_none() {
            // Ejected meanwhile (its eject cancels jobs under this lock, after us).
            return Err(JobError::NotFound(format!(
                "VM {} has no disk {}",
                self.config.id, config.disk
            )));
        }
        let mirror = Mirror::start(&blk, threads, config, target, self.notify.clone())?;
        drop(device);
        let info = mirror.info();
        jobs.insert(mirror);
        Ok(info)
    }

    /// Every job of the VM, running and finished, oldest first.
    pub fn jobs(&self) -> Vec<JobInfo> {
        self.devices.jobs().infos()
    }

    /// Pivots the disk of job `id` onto its target (the job must be ready); the VM's
    /// config names the target from then on.
    pub fn complete_job(&mut self, id: &str) -> Result<(), JobError> {
        let (disk, result) = self.with_job(id, |job, blk| {
            // The disk's PCI function is held while its queues switch: the guest cannot
            // start (or reset) them in the middle, so every queue is one the job saw.
            let pci = self.devices.disk_pci(job.disk());
            let _device = pci.as_ref().map(|p| block::sync::lock(p));
            (job.disk().to_string(), job.complete(blk))
        })?;
        let now = self.devices.disk(&disk).map(|blk| blk.config());
        if let (Some(now), Some(d)) = (now, self.config.disks.iter_mut().find(|d| d.id == disk)) {
            d.path = now.path;
            d.format = now.format;
        }
        result
    }

    /// Cancels job `id` (see [`Mirror::cancel`]).
    pub fn cancel_job(&mut self, id: &str, force: bool) -> Result<(), JobError> {
        self.with_job(id, |job, blk| {
            let pci = self.devices.disk_pci(job.disk());
            let _device = pci.as_ref().map(|p| block::sync::lock(p));
            job.cancel(blk, force)
        })?
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
        jobs.infos()
    }

    fn with_job<R>(
        &self,
        id: &str,
        f: impl FnOnce(&mut Mirror, &Arc<BlkDevice>) -> R,
    ) -> Result<R, JobError> {
        let mut jobs = self.devices.jobs();
        let job = jobs
            .get_mut(id)
            .map_err(|_| JobError::NotFound(format!("VM {} has no job {id}", self.config.id)))?;
        let blk = self
            .devices
            .disk(job.disk())
            .ok_or_else(|| JobError::Conflict(format!("job {id}: disk {} is gone", job.disk())))?;
        Ok(f(job, &blk))
    }
}
