//! Live disk mirror (docs/architecture.md), as the control plane drives it: the
//! job runs on the disk's iothread ([`source::JobSource`]), the disk's queues mark its
//! dirty bitmap (or, write-blocking, write the target too), and [`Mirror`] does what
//! needs every queue of the disk at once: start, complete (pivot) and cancel, each a
//! short series of [`IoThread::visit`]s between two passes of the threads involved.
//!
//! A pivot: pause every queue of the disk (its requests in flight finish; new ones wait
//! in the ring, in order), let the job copy what is still dirty and flush the target,
//! detach the mirror, switch every queue to the target (a new engine on the same
//! completion eventfd), resume. The guest sees a pause of a few milliseconds, no error.

pub mod config;
pub mod list;
pub mod source;

use std::path::Path;
use std::sync::Arc;

use block::jobs::target::prepare_local_target;
use block::jobs::{DirtyBitmap, JobInfo, JobState, JobStatus, MirrorJob, MirrorLink};
use block::{Disk, DiskOptions};
use vmm_sys_util::eventfd::EventFd;

pub use config::{MirrorConfig, MirrorTarget, TargetFormat};
pub use list::JobList;

use crate::iothread::source::{EngineSet, NotifierList};
use crate::iothread::{IoThread, SourceOp};
use crate::virtio_blk::device::BlkDevice;

/// Why a job operation failed.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    /// The request is invalid (400).
    #[error("{0}")]
    Invalid(String),
    /// No such job or disk (404).
    #[error("{0}")]
    NotFound(String),
    /// The job or disk is not in a state that allows it (409).
    #[error("{0}")]
    Conflict(String),
    /// The operation was tried and failed (500); the job says why in its `error`.
    #[error("{0}")]
    Failed(String),
}

/// The backing file a `sync: top` target gets: the disk's own (a qcow2 disk with a
/// backing file, or the request is refused).
fn top_backing(
    blk: &BlkDevice,
    config: &MirrorConfig,
) -> Result<Option<(std::path::PathBuf, block::ImageFormat)>, JobError> {
    if config.sync != block::jobs::SyncMode::Top {
        return Ok(None);
    }
    let disk = blk.disk();
    let backing = disk
        .qcow2()
        .and_then(|image| image.backing())
        .map(|(p, f)| (p.to_path_buf(), f));
    match backing {
        Some(b) => Ok(Some(b)),
        None => Err(JobError::Invalid(format!(
            "sync \"top\" copies the top layer of a qcow2 disk with a backing file; disk {} is {}: use \"full\"",
            blk.id(),
            if disk.qcow2().is_some() {
                "qcow2 without a backing file"
            } else {
                "raw"
            }
        ))),
    }
}

/// Opens `config`'s target for `blk`: an NBD export, or a local file or block device,
/// created with the disk's size when missing. The target takes the disk's cache mode.
pub fn open_target(blk: &BlkDevice, config: &MirrorConfig) -> Result<Arc<Disk>, JobError> {
    let disk_config = blk.config();
    let source = blk.disk();
    let path = &config.target.path;
    // A target another user holds is a conflict (409); anything else about it is the
    // request's mistake (400).
    let locked = |e: &block::Error| matches!(e, block::Error::Locked { .. });
    let backing = top_backing(blk, config)?;
    if !config.target.is_nbd() {
        prepare_local_target(
            path,
            disk_config.host_path(),
            source.capacity(),
            config.target.format,
            backing.as_ref().map(|(p, f)| (p.as_path(), *f)),
        )
        .map_err(|e| match &e {
            block::jobs::target::TargetError::Open(inner) if locked(inner) => {
                JobError::Conflict(e.to_string())
            }
            _ => JobError::Invalid(e.to_string()),
        })?;
    }
    let disk = Disk::open(&DiskOptions {
        readonly: false,
        cache: disk_config.cache,
        format: config.target.format,
        reconnect_delay: disk_config.reconnect_delay(),
        connections: 1,
        ..DiskOptions::new(path.clone())
    })
    .map_err(|e| {
        let msg = format!("target {}: {e}", path.display());
        if locked(&e) {
            JobError::Conflict(msg)
        } else {
            JobError::Invalid(msg)
        }
    })?;
    if disk.readonly() {
        return Err(JobError::Invalid(format!(
            "target {} is read-only",
            path.display()
        )));
    }
    // Guest requests that suit the disk must suit the target: they go there as they are
    // (write-blocking) or after the pivot.
    let (t, src) = (&disk, &source);
    for (what, theirs, ours) in [
        (
            "logical block size",
            t.logical_block_size(),
            src.logical_block_size(),
        ),
        ("offset alignment", t.offset_align(), src.offset_align()),
        ("memory alignment", t.mem_align(), src.mem_align()),
    ] {
        if theirs > ours {
            return Err(JobError::Invalid(format!(
                "target {} needs a {what} of {theirs} bytes, more than the disk's {ours}",
                path.display()
            )));
        }
    }
    if disk.capacity() < source.capacity() {
        return Err(JobError::Invalid(format!(
            "target {} has {} bytes, less than the disk's {}",
            path.display(),
            disk.capacity(),
            source.capacity()
        )));
    }
    Ok(Arc::new(disk))
}

/// Whoever serves some of a disk's queues and can run a [`SourceOp`] on them between two
/// passes: our [`IoThread`], or a vhost-user backend's thread.
pub trait QueueVisitor: Send + Sync {
    /// Does `op` on every queue of `device` served here; returns how many there were.
    fn visit(&self, device: &str, op: SourceOp) -> Result<usize, String>;
}

impl QueueVisitor for IoThread {
    fn visit(&self, device: &str, op: SourceOp) -> Result<usize, String> {
        IoThread::visit(self, device, op)
    }
}

/// One mirror job of a disk, as the control plane holds it.
pub struct Mirror {
    config: MirrorConfig,
    status: Arc<JobStatus>,
    /// Dropped when the job ends, closing the target.
    link: Option<Arc<MirrorLink>>,
    /// The iothread running the job (the one of the disk's first queue).
    job_thread: Arc<IoThread>,
    /// Whoever serves the disk's queues.
    threads: Vec<Arc<dyn QueueVisitor>>,
    /// The job's source was taken off its iothread and the disk let go of the link.
    ended: bool,
}

impl Mirror {
    /// Starts mirroring `blk` to `target` (from [`open_target`]) per `config`; `threads`
    /// are the iothreads serving the disk's queues (the first one runs the job). A
    /// state change writes `notify` (the owner's control loop sends events).
    pub fn start(
        blk: &Arc<BlkDevice>,
        threads: Vec<Arc<IoThread>>,
        config: MirrorConfig,
        target: Arc<Disk>,
        notify: Option<Arc<EventFd>>,
    ) -> Result<Mirror, JobError> {
        let job_thread = threads
            .first()
            .cloned()
            .ok_or_else(|| JobError::Conflict(format!("disk {} has no iothread", blk.id())))?;
        let queues = threads
            .into_iter()
            .map(|t| t as Arc<dyn QueueVisitor>)
            .collect();
        Self::start_on(blk, queues, job_thread, config, target, notify)
    }

    /// As [`Mirror::start`], with the disk's queues served by `queues` and the job run by
    /// `job_thread` (a vhost-user backend, whose queue threads live only while a frontend
    /// is connected, gives the job a thread of its own).
    pub fn start_on(
        blk: &Arc<BlkDevice>,
        queues: Vec<Arc<dyn QueueVisitor>>,
        job_thread: Arc<IoThread>,
        config: MirrorConfig,
        target: Arc<Disk>,
        notify: Option<Arc<EventFd>>,
    ) -> Result<Mirror, JobError> {
        config
            .validate()
            .map_err(|e| JobError::Invalid(e.join("; ")))?;
        let threads = queues;
        if blk.config().readonly {
            // Nothing would ever be written; still a valid copy.
            tracing::info!(disk = blk.id(), "mirroring a read-only disk");
        }
        let source = blk.disk();
        // `sync: top` copies what the disk's qcow2 image holds itself.
        let top = (config.sync == block::jobs::SyncMode::Top).then(|| source.clone());
        let bitmap = Arc::new(
            DirtyBitmap::new(source.capacity(), config.granularity).map_err(JobError::Invalid)?,
        );
        let link = Arc::new(MirrorLink::new(
            bitmap,
            target,
            config.copy_mode == block::jobs::CopyMode::WriteBlocking,
        ));
        let id = config.job_id();
        let status =
            JobStatus::new(config.job_info(blk.id(), source.capacity(), JobState::Created));
        status.set_notifier(notify);
        let job = MirrorJob::new(
            source,
            link.clone(),
            config.options(),
            &blk.engine_options(32),
            status.clone(),
        )
        .map_err(|e| JobError::Failed(e.to_string()))?;
        let mut job = job;
        job.yield_to(blk.disk_counters().clone());
        job.follow_source_errors(blk.job_source_errors());
        let mut mirror = Mirror {
            config,
            status,
            link: Some(link.clone()),
            job_thread,
            threads,
            ended: true,
        };
        // Every queue marks the bitmap before the first chunk is read.
        let switching = blk.lock_switch();
        blk.set_mirror(Some(link.clone()));
        let engines = if link.write_blocking() {
            match mirror.engines_for(blk, link.target()) {
                Ok(e) => e,
                Err(e) => {
                    mirror.detach(blk);
                    return Err(JobError::Failed(e));
                }
            }
        } else {
            Arc::default()
        };
        let bitmap = link.bitmap().clone();
        if let Err(e) = mirror.visit_queues(blk, SourceOp::AttachMirror(Some(link), engines)) {
            mirror.detach(blk);
            return Err(JobError::Failed(e));
        }
        // The queues mark what the guest writes from now on; the image's own clusters
        // before that are marked here (a cluster both ways is copied once more).
        if let Some(image) = top.as_ref().and_then(|d| d.qcow2()) {
            match image.top_ranges() {
                Ok(ranges) => {
                    for (offset, len) in ranges {
                        bitmap.mark(offset, len);
                    }
                }
                Err(e) => {
                    mirror.detach(blk);
                    return Err(JobError::Failed(format!(
                        "reading the allocation of disk {}: {e}",
                        blk.id()
                    )));
                }
            }
        }
        if let Err(e) = mirror
            .job_thread
            .add(Box::new(source::JobSource::new(&id, job)))
        {
            mirror.detach(blk);
            return Err(JobError::Failed(format!("job {id}: {e}")));
        }
        mirror.ended = false;
        drop(switching);
        if let Err(e) = mirror.visit_job(SourceOp::StartJob) {
            if mirror.is_over() {
                // Its target failed already (a write-blocking guest write reached it
                // first): the job started and failed; it is listed so, and let go at the
                // next look.
                tracing::warn!(job = %id, error = ?mirror.info().error, "mirror failed as it started");
                return Ok(mirror);
            }
            mirror.end(blk);
            return Err(JobError::Failed(e));
        }
        tracing::info!(job = %id, disk = blk.id(), target = %mirror.config.target.path.display(),
            mode = ?mirror.config.copy_mode, "mirror started");
        Ok(mirror)
    }

    /// The job's id.
    pub fn id(&self) -> String {
        self.config.job_id()
    }

    /// The disk it copies.
    pub fn disk(&self) -> &str {
        &self.config.disk
    }

    /// Its settings.
    pub fn config(&self) -> &MirrorConfig {
        &self.config
    }

    /// What `vm.jobs` shows of it.
    pub fn info(&self) -> JobInfo {
        self.status.info()
    }

    /// Whether it is over (completed, cancelled or failed).
    pub fn is_over(&self) -> bool {
        self.status.state().is_final()
    }

    /// Changes the speed limit (bytes/s, 0: unlimited) at once.
    pub fn set_speed(&mut self, speed: u64) -> Result<(), JobError> {
        if self.is_over() || self.ended {
            return Err(JobError::Conflict(format!(
                "job {} is {}",
                self.id(),
                self.status.state().as_str()
            )));
        }
        self.config.speed = speed;
        self.visit_job(SourceOp::SetSpeed(speed))
            .map_err(JobError::Failed)
    }

    /// Pivots the disk onto the target (the job must be ready): returns once the disk's
    /// queues use the target and the source is let go.
    pub fn complete(&mut self, blk: &Arc<BlkDevice>) -> Result<(), JobError> {
        self.check_state(JobState::Ready, "complete")?;
        let Some(target) = self.link.as_ref().map(|l| l.target().clone()) else {
            return Err(JobError::Conflict(format!("job {} has ended", self.id())));
        };
        refuse_while_stopped(blk, "complete")?;
        let _switching = blk.lock_switch();
        self.pause_queues(blk)?;
        if let Err(e) = self.visit_job(SourceOp::SyncJob) {
            if blk.io_error().is_stopped() {
                // The job waits for the disk; it goes on after the resume.
                self.resume_queues(blk);
                return Err(stopped_conflict(blk, "complete"));
            }
            self.end(blk);
            self.resume_queues(blk);
            return Err(JobError::Failed(format!(
                "job {}: the last copy failed, the disk stays on its image: {e}",
                self.id()
            )));
        }
        // The target holds what the source holds, and nothing changes while the disk is
        // held: the job ends and lets go of the queues before they switch.
        let stopped = self.visit_job(SourceOp::StopJob(JobState::Completed));
        let (source, source_path) = (blk.disk(), blk.config().path);
        blk.set_mirror(None);
        if let Err(e) = self.visit_queues(blk, SourceOp::AttachMirror(None, Arc::default())) {
            self.end(blk);
            self.resume_queues(blk);
            return Err(JobError::Failed(format!(
                "job {}: pivot failed: {e}",
                self.id()
            )));
        }
        // Queues made from now on open the target; those there now switch to it.
        blk.switch_disk(target.clone(), self.config.target.path.clone());
        let switched = self
            .engines_for(blk, &target)
            .and_then(|engines| self.visit_queues(blk, SourceOp::SwitchDisk(target, engines)));
        if let Err(e) = switched {
            // Every queue goes back to the source (the disk is still held: nothing was
            // written since the sync), so no queue writes where the others do not.
            tracing::error!(job = %self.id(), error = %e, "pivot failed: switching back to the source");
            blk.switch_disk(source.clone(), source_path);
            let back = self
                .engines_for(blk, &source)
                .and_then(|engines| self.visit_queues(blk, SourceOp::SwitchDisk(source, engines)));
            self.end(blk);
            if let Err(back) = back {
                // Some queues may be on either image: the disk stays held (its guest
                // waits) rather than write to two images.
                tracing::error!(job = %self.id(), disk = blk.id(), error = %back,
                    "switching back failed: the disk stays held; its queues may be on either image");
                return Err(JobError::Failed(format!(
                    "job {}: pivot failed ({e}) and so did switching back ({back}): disk {} takes no more requests",
                    self.id(),
                    blk.id()
                )));
            }
            self.resume_queues(blk);
            return Err(JobError::Failed(format!(
                "job {}: pivot failed: {e}",
                self.id()
            )));
        }
        self.end(blk);
        self.resume_queues(blk);
        tracing::info!(job = %self.id(), disk = blk.id(), "mirror completed: the disk uses its target");
        stopped.map_err(JobError::Failed)
    }

    /// Cancels the job. In ready (and without `force`) the target is first brought to
    /// a consistent copy of the disk at this moment; before, it is left partial. The
    /// disk stays on its image.
    pub fn cancel(&mut self, blk: &Arc<BlkDevice>, force: bool) -> Result<(), JobError> {
        let state = self.status.state();
        if state.is_final() || self.ended {
            return Err(JobError::Conflict(format!(
                "job {} is {} already",
                self.id(),
                state.as_str()
            )));
        }
        let consistent = state == JobState::Ready && !force;
        if consistent {
            refuse_while_stopped(blk, "cancel (without force)")?;
        }
        let _switching = blk.lock_switch();
        let mut result = Ok(());
        if consistent {
            self.pause_queues(blk)?;
            result = self.visit_job(SourceOp::SyncJob).map_err(|e| {
                JobError::Failed(format!("job {}: the last copy failed: {e}", self.id()))
            });
            if result.is_err() && blk.io_error().is_stopped() {
                self.resume_queues(blk);
                return Err(stopped_conflict(blk, "cancel (without force)"));
            }
        }
        if result.is_ok() {
            result = self
                .visit_job(SourceOp::StopJob(JobState::Cancelled))
                .map_err(JobError::Failed);
        }
        // The job stops and lets go of the queues before the guest goes on: the target
        // is the disk at this moment, no later write reaches it.
        self.end(blk);
        if consistent {
            self.resume_queues(blk);
        }
        tracing::info!(job = %self.id(), disk = blk.id(), "mirror cancelled");
        result
    }

    /// Lets go of a job that ended on its own (a target error failed it): the disk's
    /// queues detach, the job leaves its iothread, the target is closed. Does nothing
    /// for a job still running or let go already.
    pub fn reap_if_over(&mut self, blk: &Arc<BlkDevice>) {
        if self.is_over() && !self.ended {
            self.end(blk);
        }
    }

    /// The disk is going away (hot unplug, shutdown): the job is cancelled at once.
    pub fn abandon(&mut self, blk: &Arc<BlkDevice>) {
        if !self.ended {
            if !self.is_over() {
                let _ = self.visit_job(SourceOp::StopJob(JobState::Cancelled));
            }
            self.end(blk);
        }
    }

    fn check_state(&self, want: JobState, what: &str) -> Result<(), JobError> {
        let state = self.status.state();
        if state != want || self.ended {
            return Err(JobError::Conflict(format!(
                "job {} is {}: it can {what} only when {}",
                self.id(),
                state.as_str(),
                want.as_str()
            )));
        }
        Ok(())
    }

    /// Holds the disk (no queue takes a new request, queues made meanwhile included) and
    /// waits until each queue has nothing in flight.
    fn pause_queues(&self, blk: &Arc<BlkDevice>) -> Result<(), JobError> {
        blk.shared()
            .held
            .store(true, std::sync::atomic::Ordering::Release);
        if let Err(e) = self.visit_queues(blk, SourceOp::Pause) {
            self.resume_queues(blk);
            return Err(JobError::Failed(format!(
                "job {}: cannot pause disk {}: {e}",
                self.id(),
                blk.id()
            )));
        }
        Ok(())
    }

    fn resume_queues(&self, blk: &Arc<BlkDevice>) {
        blk.shared()
            .held
            .store(false, std::sync::atomic::Ordering::Release);
        if let Err(e) = self.visit_queues(blk, SourceOp::Resume) {
            tracing::error!(job = %self.id(), disk = blk.id(), error = %e, "cannot resume the disk's queues");
        }
    }

    /// Takes the job off its iothread and detaches the link from the disk.
    fn end(&mut self, blk: &Arc<BlkDevice>) {
        if !self.ended {
            let name = source::source_name(&self.id());
            if let Err(e) = self
                .job_thread
                .remove_device(&name, crate::virtio_blk::worker::DRAIN_TIMEOUT)
            {
                tracing::warn!(job = %self.id(), error = %e, "taking the job off its iothread");
            }
            self.ended = true;
        }
        if let Some(link) = &self.link {
            // Queues stop writing to the target at once, whether the detach below
            // reaches them or not.
            link.fail("the job has ended".into());
        }
        self.detach(blk);
        self.link = None;
        if !self.is_over() {
            self.status.update(|i| {
                i.state = JobState::Cancelled;
            });
        }
    }

    fn detach(&self, blk: &Arc<BlkDevice>) {
        let Some(link) = &self.link else { return };
        let mine = |l: &Arc<MirrorLink>| Arc::ptr_eq(l, link);
        if blk.mirror().as_ref().is_some_and(mine) {
            blk.set_mirror(None);
        }
        if let Err(e) = self.visit_queues(blk, SourceOp::AttachMirror(None, Arc::default())) {
            tracing::error!(job = %self.id(), error = %e, "detaching the mirror from the disk's queues");
        }
    }

    /// Engines on `disk` for every live queue of `blk`, each on its queue's completion
    /// eventfd, made on this (the control plane's) thread.
    fn engines_for(
        &self,
        blk: &Arc<BlkDevice>,
        disk: &Arc<Disk>,
    ) -> Result<Arc<EngineSet>, String> {
        let list = NotifierList::default();
        self.visit_queues(blk, SourceOp::Notifiers(list.clone()))?;
        let options = blk.engine_options(32);
        let mut engines = std::collections::BTreeMap::new();
        for (index, notifier) in block::sync::lock(&list).drain(..) {
            let engine = block::engine::create_engine_sharing(disk, &options, Some(&notifier))
                .map_err(|e| format!("disk {} queue {index}: {e}", blk.id()))?;
            engines.insert(index, engine);
        }
        Ok(EngineSet::new(engines))
    }

    fn visit_queues(&self, blk: &Arc<BlkDevice>, op: SourceOp) -> Result<(), String> {
        for t in &self.threads {
            t.visit(blk.id(), op.clone())?;
        }
        Ok(())
    }

    fn visit_job(&self, op: SourceOp) -> Result<(), String> {
        let name = source::source_name(&self.id());
        match self.job_thread.visit(&name, op)? {
            0 => Err(format!("job {} is not running", self.id())),
            _ => Ok(()),
        }
    }
}

/// 409 while `blk` is stopped on an I/O error: a job's last copy cannot run then.
fn refuse_while_stopped(blk: &BlkDevice, what: &str) -> Result<(), JobError> {
    if blk.io_error().is_stopped() {
        return Err(stopped_conflict(blk, what));
    }
    Ok(())
}

fn stopped_conflict(blk: &BlkDevice, what: &str) -> JobError {
    JobError::Conflict(format!(
        "cannot {what}: disk {} is stopped on an I/O error; resume it first",
        blk.id()
    ))
}

/// The local image a mirror target names, if it is one (not an NBD server).
pub fn local_target(config: &MirrorConfig) -> Option<&Path> {
    (!config.target.is_nbd()).then_some(config.target.path.as_path())
}

#[cfg(test)]
mod tests;
