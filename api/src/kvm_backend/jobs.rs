//! Block jobs of the real backend: each operation on the VM under its lock, and the
//! job events its control loop sends (state changes at once, progress at most once a
//! second while a job copies).

use block::jobs::{JobInfo, JobState};
use devices::mirror::MirrorConfig;

use super::KvmBackend;
use super::entry::Entry;
use crate::backend::{ApiError, JobCancel, JobRef, JobSpeed, job_error};

fn running_vm<'a>(id: &str, e: &'a mut Entry) -> Result<&'a mut vmm::vm::Vm, ApiError> {
    match e.vm.as_mut() {
        Some(vm) if vm.state() != vmm::vm::VmState::Shutdown => Ok(vm),
        _ => Err(ApiError::conflict(format!(
            "VM {id} is shut down: its disks have no jobs"
        ))),
    }
}

impl KvmBackend {
    pub(super) fn start_mirror(&self, id: &str, config: MirrorConfig) -> Result<JobInfo, ApiError> {
        self.with(id, |e| {
            if !e.config.disks.iter().any(|d| d.id == config.disk) {
                return Err(ApiError::not_found(format!(
                    "VM {id} has no disk {:?}",
                    config.disk
                )));
            }
            let info = running_vm(id, e)?.start_mirror(config).map_err(job_error)?;
            e.job_events();
            Ok(info)
        })
    }

    pub(super) fn list_jobs(&self, id: &str) -> Result<Vec<JobInfo>, ApiError> {
        self.with(id, |e| {
            Ok(e.vm.as_ref().map(vmm::vm::Vm::jobs).unwrap_or_default())
        })
    }

    pub(super) fn complete_job(&self, id: &str, job: &JobRef) -> Result<(), ApiError> {
        self.with(id, |e| {
            let vm = running_vm(id, e)?;
            let before = vm.config().disks.clone();
            let result = vm.complete_job(&job.job_id).map_err(job_error);
            // The config follows the pivot (vm.info shows the new path; a reboot keeps it).
            let disks = vm.config().disks.clone();
            for d in &mut e.config.disks {
                if let Some(now) = disks.iter().find(|n| n.id == d.id) {
                    d.path.clone_from(&now.path);
                    d.format = now.format;
                }
            }
            // An old image handed over to this process goes, and with it its lock.
            for old in before
                .iter()
                .filter(|o| !disks.iter().any(|n| n.path == o.path))
            {
                block::host_file::forget_handed(&old.path);
            }
            e.job_events();
            result
        })
    }

    pub(super) fn cancel_job(&self, id: &str, job: &JobCancel) -> Result<(), ApiError> {
        self.with(id, |e| {
            let result = running_vm(id, e)?
                .cancel_job(&job.job_id, job.force)
                .map_err(job_error);
            e.job_events();
            result
        })
    }

    pub(super) fn set_job_speed(&self, id: &str, job: &JobSpeed) -> Result<(), ApiError> {
        self.with(id, |e| {
            running_vm(id, e)?
                .set_job_speed(&job.job_id, job.speed)
                .map_err(job_error)
        })
    }
}

impl Entry {
    /// Lets go of jobs that ended on their own and puts their events in the outbox: a
    /// state change at once, progress when bytes moved since the last look.
    pub(super) fn job_events(&mut self) {
        let Some(vm) = self.vm.as_ref() else { return };
        let jobs = vm.reap_jobs();
        self.note_jobs(&jobs);
    }

    /// Events for `jobs` as they are now; targets of jobs that ended without a pivot are
    /// let go (a descriptor handed over for one, and with it its lock).
    pub(super) fn note_jobs(&mut self, jobs: &[JobInfo]) {
        for job in jobs.iter().filter(|j| {
            j.state.is_final()
                && j.state != JobState::Completed
                && self.jobs_seen.get(&j.id).is_none_or(|s| s.state != j.state)
        }) {
            let target = std::path::Path::new(&job.target);
            if !self.config.disks.iter().any(|d| d.path == target) {
                block::host_file::forget_handed(target);
            }
        }
        let id = self.config.id.clone();
        let events = crate::events::job_events(&id, jobs, &mut self.jobs_seen);
        self.outbox.extend(events);
    }
}
