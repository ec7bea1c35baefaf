//! Block jobs of the real backend: each operation on the VM under its lock, and the
//! job events its control loop sends (state changes at once, progress at most once a
//! second while a job copies).

use std::collections::BTreeMap;

use block::jobs::{JobInfo, JobState};
use devices::mirror::MirrorConfig;

use super::KvmBackend;
use super::entry::Entry;
use crate::backend::{ApiError, JobCancel, JobRef, JobSpeed, job_error};
use crate::events::{Event, EventKind};

/// What the control loop last told of each job: its state and bytes done.
pub(super) type JobsSeen = BTreeMap<String, (JobState, u64, u64)>;

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
        let id = self.config.id.clone();
        let Some(vm) = self.vm.as_ref() else { return };
        for job in vm.reap_jobs() {
            let seen = self.jobs_seen.get(&job.id).copied();
            let now = (job.state, job.bytes_done, job.dirty_bytes);
            if seen == Some(now) {
                continue;
            }
            let kind = match job.state {
                _ if seen.is_some_and(|s| s.0 == job.state) => EventKind::JobProgress,
                JobState::Created | JobState::Running if seen.is_none() => EventKind::JobStarted,
                JobState::Created | JobState::Running => EventKind::JobProgress,
                JobState::Ready => EventKind::JobReady,
                JobState::Completed => EventKind::JobCompleted,
                JobState::Cancelled => EventKind::JobCancelled,
                JobState::Failed => EventKind::JobFailed,
            };
            self.jobs_seen.insert(job.id.clone(), now);
            let target = std::path::Path::new(&job.target);
            if job.state.is_final()
                && job.state != JobState::Completed
                && !self.config.disks.iter().any(|d| d.path == target)
            {
                // A target handed over to this process goes, and with it its lock.
                block::host_file::forget_handed(target);
            }
            self.outbox.push(job_event(&id, kind, &job));
        }
    }
}

/// The event of `kind` about `job` of VM `vm`.
fn job_event(vm: &str, kind: EventKind, job: &JobInfo) -> Event {
    let mut e = Event::now(vm, kind)
        .with("job", job.id.clone())
        .with("disk", job.disk.clone())
        .with("state", job.state.as_str())
        .with("bytes_done", job.bytes_done)
        .with("bytes_total", job.bytes_total)
        .with("dirty_bytes", job.dirty_bytes)
        .with("rate", job.rate);
    if let Some(err) = &job.error {
        e = e.with("error", err.clone());
    }
    e
}
