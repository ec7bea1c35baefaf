//! The fake backend's block jobs: the same checks and states as the real ones, without
//! copying anything (a mirror is ready as soon as it starts).

use block::jobs::{JobInfo, JobState};
use devices::mirror::MirrorConfig;
use vmm::config::VmConfig;

use crate::backend::{ApiError, VmState};

/// Starts a fake mirror of `config.disk` (ready at once).
pub(super) fn start(
    state: VmState,
    vm: &VmConfig,
    jobs: &mut Vec<JobInfo>,
    config: MirrorConfig,
) -> Result<JobInfo, ApiError> {
    let Some(disk) = vm.disks.iter().find(|d| d.id == config.disk) else {
        return Err(ApiError::not_found(format!(
            "VM {} has no disk {:?}",
            vm.id, config.disk
        )));
    };
    config
        .validate()
        .map_err(|e| ApiError::bad_request("invalid mirror").with_details(e))?;
    if state == VmState::Shutdown {
        return Err(ApiError::conflict(format!(
            "VM {} is shut down: boot it to mirror its disks",
            vm.id
        )));
    }
    let id = config.job_id();
    if let Some(j) = jobs
        .iter()
        .find(|j| !j.state.is_final() && (j.disk == config.disk || j.id == id))
    {
        return Err(ApiError::conflict(format!(
            "disk {} or job id {id} has a running job already ({})",
            config.disk, j.id
        )));
    }
    if let Some(d) = vm.disks.iter().find(|d| d.path == config.target.path) {
        return Err(ApiError::conflict(format!(
            "target {} is the image of disk {}",
            config.target.path.display(),
            d.id
        )));
    }
    let size = disk
        .host_path()
        .and_then(|p| std::fs::metadata(p).ok())
        .map_or(disk.null_size.unwrap_or(0), |m| m.len());
    let info = config.job_info(&config.disk, size, JobState::Ready);
    jobs.retain(|j| j.id != id);
    jobs.push(info.clone());
    Ok(info)
}

/// Job `id`, or 404.
pub(super) fn find<'a>(jobs: &'a mut [JobInfo], id: &str) -> Result<&'a mut JobInfo, ApiError> {
    jobs.iter_mut()
        .find(|j| j.id == id)
        .ok_or_else(|| ApiError::not_found(format!("no job {id}")))
}

/// Ends `job` as `state` (409 when it is over already).
pub(super) fn end(job: &mut JobInfo, state: JobState) -> Result<(), ApiError> {
    if !job.state.can_become(state) {
        return Err(ApiError::conflict(format!(
            "job {} is {}: it cannot become {}",
            job.id,
            job.state.as_str(),
            state.as_str()
        )));
    }
    job.state = state;
    Ok(())
}

/// Pivots job `id`'s disk onto its target in `vm`.
pub(super) fn complete(vm: &mut VmConfig, jobs: &mut [JobInfo], id: &str) -> Result<(), ApiError> {
    let job = find(jobs, id)?;
    end(job, JobState::Completed)?;
    if let Some(d) = vm.disks.iter_mut().find(|d| d.id == job.disk) {
        d.path = job.target.clone().into();
    }
    Ok(())
}
