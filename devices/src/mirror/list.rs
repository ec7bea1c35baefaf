//! [`JobList`]: the block jobs of one owner (a VM, a vhost-user backend): at most one
//! running job per disk, ids unique among running jobs, and the last [`KEEP_FINISHED`]
//! finished jobs kept for listing until a new job takes their id.

use block::jobs::JobInfo;

use super::{JobError, Mirror, MirrorConfig};

/// Finished jobs kept for listing.
pub const KEEP_FINISHED: usize = 16;

/// Jobs, running and finished, oldest first.
#[derive(Default)]
pub struct JobList {
    jobs: Vec<Mirror>,
}

impl JobList {
    /// Whether a job per `config` may start: its disk has no running job and no running
    /// job has its id (409 otherwise).
    pub fn check_new(&self, config: &MirrorConfig) -> Result<(), JobError> {
        let id = config.job_id();
        if let Some(j) = self
            .jobs
            .iter()
            .find(|j| !j.is_over() && j.disk() == config.disk)
        {
            return Err(JobError::Conflict(format!(
                "disk {} has a running job already ({})",
                config.disk,
                j.id()
            )));
        }
        if self.jobs.iter().any(|j| !j.is_over() && j.id() == id) {
            return Err(JobError::Conflict(format!("job {id} exists and runs")));
        }
        Ok(())
    }

    /// Adds a started job (replacing a finished one of the same id) and forgets the
    /// oldest finished jobs beyond [`KEEP_FINISHED`].
    pub fn insert(&mut self, job: Mirror) {
        let id = job.id();
        self.jobs.retain(|j| j.id() != id);
        self.jobs.push(job);
        let finished = self.jobs.iter().filter(|j| j.is_over()).count();
        let mut extra = finished.saturating_sub(KEEP_FINISHED);
        self.jobs.retain(|j| {
            let drop = extra > 0 && j.is_over();
            extra -= usize::from(drop);
            !drop
        });
    }

    /// Job `id` (404 when there is none).
    pub fn get_mut(&mut self, id: &str) -> Result<&mut Mirror, JobError> {
        self.jobs
            .iter_mut()
            .find(|j| j.id() == id)
            .ok_or_else(|| JobError::NotFound(format!("no job {id}")))
    }

    /// Every job.
    pub fn iter_mut(&mut self) -> impl Iterator<Item = &mut Mirror> {
        self.jobs.iter_mut()
    }

    /// What every job shows now.
    pub fn infos(&self) -> Vec<JobInfo> {
        self.jobs.iter().map(Mirror::info).collect()
    }
}
