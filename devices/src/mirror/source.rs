//! A mirror job as an iothread source: served by the disk's iothread (it moves with the
//! iothread's settings like the disk's queues do), woken by its queues' completions and
//! its speed timer.

use std::io;
use std::os::fd::RawFd;
use std::time::Duration;

use block::jobs::{JobState, MirrorJob};

use crate::iothread::source::{COMPLETION, FDS, IoSource, SourceOp, TIMER};
use crate::virtio_blk::worker::PassWork;

/// The iothread source name of job `id` (not a disk id: a disk's reset or removal of its
/// queues leaves the job alone).
pub fn source_name(id: &str) -> String {
    format!("job:{id}")
}

/// A mirror job on an iothread.
pub struct JobSource {
    name: String,
    job: MirrorJob,
}

impl JobSource {
    /// Job `id`'s source.
    pub fn new(id: &str, job: MirrorJob) -> JobSource {
        JobSource {
            name: source_name(id),
            job,
        }
    }
}

impl IoSource for JobSource {
    fn device(&self) -> &str {
        &self.name
    }

    fn queue(&self) -> u16 {
        0
    }

    fn fds(&self) -> [Option<RawFd>; FDS] {
        let mut fds = [None; FDS];
        fds[COMPLETION] = Some(self.job.completion_fd());
        fds[TIMER] = Some(self.job.timer_fd());
        fds
    }

    fn handle(&mut self, _which: usize) -> PassWork {
        self.run_ready()
    }

    fn poll_ready(&mut self) -> bool {
        self.job.has_completions()
    }

    fn run_ready(&mut self) -> PassWork {
        // The job's copies are not the guest's requests: the iothread's counters leave
        // them out.
        self.job.run();
        PassWork::default()
    }

    fn arm(&mut self) -> bool {
        self.job.has_completions()
    }

    fn wake(&mut self) {
        self.job.wake();
    }

    fn spin_worthy(&self, _cap_ns: u64) -> bool {
        true
    }

    fn finish_pass(&mut self) -> bool {
        false
    }

    fn set_max_batch(&mut self, _max_batch: u32) {}

    fn drain(&mut self, _timeout: Duration) -> io::Result<()> {
        if self.job.state().is_final() {
            return Ok(());
        }
        self.job.stop(JobState::Cancelled).map_err(io::Error::other)
    }

    fn in_flight(&self) -> usize {
        self.job.in_flight()
    }

    fn control(&mut self, op: &SourceOp) -> Result<PassWork, String> {
        match op {
            SourceOp::StartJob => self.job.start()?,
            SourceOp::SetSpeed(speed) => self.job.set_speed(*speed),
            SourceOp::SyncJob => self.job.sync_target()?,
            SourceOp::StopJob(state) => self.job.stop(*state)?,
            _ => return Err(format!("{} is a job, not a disk queue", self.name)),
        }
        self.job.run();
        Ok(PassWork::default())
    }
}
