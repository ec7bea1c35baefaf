//! The copier of a mirror job, without I/O: it picks the chunks to copy next (dirty
//! ones, within the in-flight budget and the speed limit), accounts for each copy that
//! ends, and moves the job through its states. Whoever drives it (the disk's iothread)
//! reads each chunk from the source and writes it to the target, and reports back.
//!
//! A chunk is taken from the dirty bitmap when its copy starts; a guest write that
//! finishes meanwhile marks it again, so it is copied again later: when nothing is dirty
//! and nothing is in flight, the target holds what the source holds, and the job is
//! `ready`.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::dirty::DirtyBitmap;
use super::speed::RateLimit;
use super::state::{JobState, MirrorOptions, SyncMode};

/// What the driver should do next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// Copy bytes `offset..offset + len` (chunk `chunk`) and report with
    /// [`Copier::copied`].
    Copy {
        /// The chunk's index (to report back).
        chunk: u64,
        /// Byte offset.
        offset: u64,
        /// Byte length.
        len: u64,
    },
    /// The speed limit asks to wait this long before the next chunk.
    Wait(Duration),
    /// Nothing to start now: everything clean, or the in-flight budget is used, or the
    /// job is not copying.
    Idle,
}

/// A job's progress, as `vm.jobs` shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Progress {
    /// Where the job is.
    pub state: JobState,
    /// Bytes copied so far (a chunk copied twice counts twice).
    pub bytes_done: u64,
    /// `bytes_done` plus what is still to copy (grows when the guest dirties more).
    pub bytes_total: u64,
    /// Bytes dirty now, not being copied.
    pub dirty_bytes: u64,
    /// Why the job failed.
    pub error: Option<String>,
}

/// The copier of one mirror job.
#[derive(Debug)]
pub struct Copier {
    bitmap: Arc<DirtyBitmap>,
    options: MirrorOptions,
    limit: RateLimit,
    state: JobState,
    /// Where the next search for a dirty chunk starts.
    cursor: u64,
    in_flight: BTreeSet<u64>,
    bytes_done: u64,
    error: Option<String>,
    /// At most this many chunks in flight for now (the guest is busy), within the budget.
    cap: Option<u64>,
}

impl Copier {
    /// A copier over `bitmap` (the one the disk's queues mark) with `options` (checked):
    /// with `sync: full` every chunk starts dirty, with `none` only later writes count.
    pub fn new(bitmap: Arc<DirtyBitmap>, options: MirrorOptions) -> Result<Copier, String> {
        options.validate()?;
        if bitmap.granularity() != options.granularity {
            return Err(format!(
                "the bitmap's granularity {} is not the job's {}",
                bitmap.granularity(),
                options.granularity
            ));
        }
        if options.sync == SyncMode::Full {
            bitmap.mark_all();
        }
        Ok(Copier {
            bitmap,
            limit: RateLimit::new(options.speed),
            options,
            state: JobState::Created,
            cursor: 0,
            in_flight: BTreeSet::new(),
            bytes_done: 0,
            error: None,
            cap: None,
        })
    }

    /// Starts copying (created -> running).
    pub fn start(&mut self) -> Result<(), String> {
        self.transition(JobState::Running)?;
        self.check_ready();
        Ok(())
    }

    /// The job's state.
    pub fn state(&self) -> JobState {
        self.state
    }

    /// Changes the speed limit (bytes/s, 0: unlimited), at once.
    pub fn set_speed(&mut self, speed: u64) {
        self.options.speed = speed;
        self.limit.set_speed(speed);
    }

    /// The next thing to do at `now`.
    pub fn next(&mut self, now: Instant) -> Step {
        if !matches!(self.state, JobState::Running | JobState::Ready)
            || u64::try_from(self.in_flight.len()).unwrap_or(u64::MAX)
                >= self.options.max_chunks().min(self.cap.unwrap_or(u64::MAX))
            || self.bitmap.dirty_chunks() == 0
        {
            return Step::Idle;
        }
        let wait = self.limit.delay(self.options.granularity, now);
        if !wait.is_zero() {
            return Step::Wait(wait);
        }
        let Some(chunk) = self.bitmap.take_next(self.cursor) else {
            return Step::Idle;
        };
        self.cursor = chunk + 1;
        self.in_flight.insert(chunk);
        let (offset, len) = self.bitmap.chunk_range(chunk);
        Step::Copy { chunk, offset, len }
    }

    /// Reports the end of chunk `chunk`'s copy: `Err` (the target failed) fails the job.
    pub fn copied(&mut self, chunk: u64, result: Result<(), String>) {
        if !self.in_flight.remove(&chunk) {
            return;
        }
        match result {
            Ok(()) => {
                self.bytes_done += self.bitmap.chunk_range(chunk).1;
                self.check_ready();
            }
            Err(e) => {
                // Copy it again should the job be restarted; the job is over anyway.
                let (offset, len) = self.bitmap.chunk_range(chunk);
                self.bitmap.mark(offset, len);
                self.fail(e);
            }
        }
    }

    /// Keeps at most `cap` chunks in flight (`None`: the whole budget) from the next
    /// chunk on: the job yields to a busy guest.
    pub fn set_in_flight_cap(&mut self, cap: Option<u64>) {
        self.cap = cap.map(|c| c.max(1));
    }

    /// Gives up chunk `chunk`'s copy (the job is stopping): it is dirty again.
    pub fn abandon(&mut self, chunk: u64) {
        if self.in_flight.remove(&chunk) {
            let (offset, len) = self.bitmap.chunk_range(chunk);
            self.bitmap.mark(offset, len);
        }
    }

    /// Fails the job with `message` (a job already over stays as it is).
    pub fn fail(&mut self, message: String) {
        if !self.state.is_final() {
            self.error = Some(message);
            self.state = JobState::Failed;
        }
    }

    /// The speed limit (bytes/s, 0: unlimited).
    pub fn speed(&self) -> u64 {
        self.options.speed
    }

    /// The job's settings.
    pub fn options(&self) -> &MirrorOptions {
        &self.options
    }

    /// Chunks being copied now.
    pub fn chunks_in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// Whether the target holds what the source holds right now (nothing dirty, nothing
    /// in flight): the moment a pivot or a cancel in ready may happen, with the guest's
    /// requests drained.
    pub fn in_sync(&self) -> bool {
        self.in_flight.is_empty() && self.bitmap.dirty_chunks() == 0
    }

    /// Running -> ready once in sync. (Ready stays ready when the guest dirties more.)
    fn check_ready(&mut self) {
        if self.state == JobState::Running && self.in_sync() {
            self.state = JobState::Ready;
        }
    }

    /// Ends the job with `to` (completed, cancelled); a completion needs `ready` and, as
    /// the driver must have drained the guest and copied the last chunks, `in_sync`.
    pub fn finish(&mut self, to: JobState) -> Result<(), String> {
        if to == JobState::Completed && !self.in_sync() {
            return Err(format!(
                "the job is not in sync: {} bytes dirty, {} chunks in flight",
                self.bitmap.dirty_bytes(),
                self.in_flight.len()
            ));
        }
        self.transition(to)
    }

    fn transition(&mut self, to: JobState) -> Result<(), String> {
        if !self.state.can_become(to) {
            return Err(format!(
                "a {} job cannot become {}",
                self.state.as_str(),
                to.as_str()
            ));
        }
        self.state = to;
        Ok(())
    }

    /// Progress now.
    pub fn progress(&self) -> Progress {
        let in_flight: u64 = self
            .in_flight
            .iter()
            .map(|&c| self.bitmap.chunk_range(c).1)
            .sum();
        let dirty_bytes = self.bitmap.dirty_bytes();
        Progress {
            state: self.state,
            bytes_done: self.bytes_done,
            bytes_total: self.bytes_done + in_flight + dirty_bytes,
            dirty_bytes,
            error: self.error.clone(),
        }
    }
}

#[cfg(test)]
mod tests;
