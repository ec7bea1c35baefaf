//! [`MirrorJob`]: a mirror job's I/O, driven by the thread that serves it (the disk's
//! iothread): it reads the chunks the [`Copier`] picks from the source with a queue of
//! its own and writes them to the target, both queues waking one eventfd
//! ([`MirrorJob::completion_fd`]), the speed limit waking a timerfd
//! ([`MirrorJob::timer_fd`]). It never blocks, except in [`MirrorJob::sync_target`] and
//! [`MirrorJob::stop`], which the control plane asks for with the guest's queues paused.
//!
//! The job's I/O is counted apart from the guest's (its own counters) and never waits
//! for the guest's throttle.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::copier::{Copier, Step};
use super::link::MirrorLink;
use super::state::{JobState, MirrorOptions};
use super::status::JobStatus;
use crate::bounce::AlignedBuf;
use crate::counters::DiskCounters;
use crate::disk::Disk;
use crate::engine::EngineOptions;
use crate::error::Error;
use crate::queue::{Completion, DiskQueue};
use crate::throttle::ThrottleTimer;

/// Chunks a job keeps in flight at most while the guest is busy (it submitted a request
/// within [`BUSY_GUEST_WINDOW`]), and the least time between two chunk starts then: the
/// guest's I/O goes first and the copy goes on at a trickle (one 64 KiB chunk per
/// 250 us, at most 256 MiB/s at the default granularity, a few in flight so that their
/// latencies overlap); the whole budget again once the guest is idle. A sync before a
/// pivot (the guest paused) takes the whole budget.
///
/// So that a job still converges under a guest that writes steadily, each chunk the
/// guest's writes turn dirty earns the job [`CATCH_UP`] chunk starts that need not wait
/// for the gap (at most [`MAX_CATCH_UP_RATE`] a second, [`MAX_CATCH_UP`] saved up), with
/// up to twice [`BUSY_GUEST_CHUNKS`] in flight while it has some: the copy outruns a
/// moderate writer (thousands of chunks a second) twice over. A guest that dirties
/// chunks faster than that keeps most of its IOPS and does not converge in `background`
/// mode (`write-blocking` does).
pub const BUSY_GUEST_CHUNKS: u64 = 4;
/// See [`BUSY_GUEST_CHUNKS`].
pub const CATCH_UP: u64 = 2;
/// See [`BUSY_GUEST_CHUNKS`].
pub const MAX_CATCH_UP_RATE: u64 = 4000;
/// See [`BUSY_GUEST_CHUNKS`].
pub const MAX_CATCH_UP: u64 = 64;
/// See [`BUSY_GUEST_CHUNKS`].
pub const BUSY_GUEST_GAP: Duration = Duration::from_micros(250);
/// See [`BUSY_GUEST_CHUNKS`].
pub const BUSY_GUEST_WINDOW: Duration = Duration::from_millis(20);

/// How often a job with nothing in flight looks at the bitmap again: guest writes mark
/// it without waking the job, so a job that copied everything comes back for what the
/// guest dirtied since (and publishes it) within this.
pub const IDLE_LOOK: Duration = Duration::from_millis(10);

/// The token of the target's flush (copies use tokens below
/// [`super::state::MAX_COPIES`]).
const FLUSH_TOKEN: u64 = crate::queue::MAX_TOKENS - 1;

/// How long [`MirrorJob::sync_target`] and [`MirrorJob::stop`] wait at most.
pub const SYNC_TIMEOUT: Duration = Duration::from_secs(60);

/// One chunk being copied: read from the source, then written to the target.
struct ChunkCopy {
    chunk: u64,
    offset: u64,
    buf: AlignedBuf,
}

/// A mirror job's I/O.
pub struct MirrorJob {
    link: Arc<MirrorLink>,
    copier: Copier,
    source: DiskQueue,
    target: DiskQueue,
    timer: ThrottleTimer,
    timer_armed: bool,
    /// By token (the same in both queues).
    copies: Vec<Option<ChunkCopy>>,
    free: Vec<usize>,
    spare: Vec<AlignedBuf>,
    align: usize,
    status: Arc<JobStatus>,
    /// A flush of the target is in flight (its token is `copies.len()`).
    flushing: Option<Result<(), String>>,
    done: Vec<Completion>,
    /// Copies are being given up: reads that finish are not written.
    stopping: bool,
    /// The guest's counters, the requests it had submitted at the last look and when
    /// that count last moved: while it is busy the job yields.
    guest: Option<Arc<DiskCounters>>,
    guest_seen: (u64, Option<Instant>),
    /// When the last chunk's copy started.
    last_start: Option<Instant>,
    /// Chunk starts the guest's writes earned (see [`CATCH_UP`]), and the bitmap's
    /// [`super::dirty::DirtyBitmap::newly_dirty`] when they were last counted.
    catch_up: u64,
    newly_dirty_seen: u64,
    /// When chunk starts were last earned, and how many (in millionths) the rate
    /// limit still lets the guest's writes earn.
    earned_at: Option<Instant>,
    catch_up_bucket: u64,
    /// The disk's error policy for the job's reads (none: a failed read fails the job).
    source_errors: Option<Arc<dyn super::SourceErrors>>,
}

// SAFETY: the raw pointers the job's queues hold point into its own buffers (`copies`),
// which live until their completions are reaped; one thread uses the job at a time.
unsafe impl Send for MirrorJob {}

impl MirrorJob {
    /// A job copying `source` (the disk's open image) to `link`'s target per `options`,
    /// with engines per `engine`; `status` is where it publishes. It starts copying
    /// ([`MirrorJob::start`]) once the disk's queues mark the link's bitmap.
    pub fn new(
        source: Arc<Disk>,
        link: Arc<MirrorLink>,
        options: MirrorOptions,
        engine: &EngineOptions,
        status: Arc<JobStatus>,
    ) -> Result<MirrorJob, Error> {
        let copier = Copier::new(link.bitmap().clone(), options).map_err(Error::InvalidOption)?;
        let counters = Arc::new(DiskCounters::default());
        let align = [
            source.mem_align(),
            source.offset_align(),
            link.target().mem_align(),
            link.target().offset_align(),
            4096,
        ]
        .into_iter()
        .max()
        .map_or(4096, |a| a as usize);
        let source = DiskQueue::new(source, engine, counters.clone())?;
        let target = DiskQueue::sharing(
            link.target().clone(),
            engine,
            counters,
            Some(source.notifier()),
        )?;
        let timer = ThrottleTimer::new().map_err(|e| Error::InvalidOption(e.to_string()))?;
        Ok(MirrorJob {
            link,
            copier,
            source,
            target,
            timer,
            timer_armed: false,
            copies: Vec::new(),
            free: Vec::new(),
            spare: Vec::new(),
            align,
            status,
            flushing: None,
            done: Vec::new(),
            stopping: false,
            guest: None,
            guest_seen: (0, None),
            last_start: None,
            catch_up: 0,
            newly_dirty_seen: 0,
            earned_at: None,
            catch_up_bucket: 0,
            source_errors: None,
        })
    }

    /// Has the job's failed reads follow the disk's error policy: a read the policy
    /// holds makes its chunk dirty again, and no copy starts while the disk is stopped
    /// (the job waits, [`IDLE_LOOK`] at a time, and goes on once the disk is resumed).
    pub fn follow_source_errors(&mut self, policy: Arc<dyn super::SourceErrors>) {
        self.source_errors = Some(policy);
    }

    /// Makes the job yield to the guest whose requests `counters` counts (see
    /// [`BUSY_GUEST_CHUNKS`]).
    pub fn yield_to(&mut self, counters: Arc<DiskCounters>) {
        self.guest = Some(counters);
    }

    /// Starts copying (created -> running).
    pub fn start(&mut self) -> Result<(), String> {
        self.copier.start()?;
        self.publish();
        Ok(())
    }

    /// The eventfd both of the job's queues wake.
    pub fn completion_fd(&self) -> std::os::fd::RawFd {
        self.source.completion_fd()
    }

    /// The timerfd the speed limit wakes.
    pub fn timer_fd(&self) -> std::os::fd::RawFd {
        std::os::fd::AsRawFd::as_raw_fd(&self.timer)
    }

    /// Makes [`MirrorJob::completion_fd`] readable (to come back to the job).
    pub fn wake(&self) {
        self.source.wake();
    }

    /// The job's state.
    pub fn state(&self) -> JobState {
        self.copier.state()
    }

    /// The link the disk's queues share.
    pub fn link(&self) -> &Arc<MirrorLink> {
        &self.link
    }

    /// Where it publishes its progress.
    pub fn status(&self) -> &Arc<JobStatus> {
        &self.status
    }

    /// Whether completions wait for [`MirrorJob::run`] (for polling).
    pub fn has_completions(&mut self) -> bool {
        self.source.has_completions() || self.target.has_completions()
    }

    /// Copies in flight (each counts once).
    pub fn in_flight(&self) -> usize {
        self.source.in_flight() + self.target.in_flight()
    }

    /// Changes the speed limit at once.
    pub fn set_speed(&mut self, speed: u64) {
        self.copier.set_speed(speed);
        if self.timer_armed {
            let _ = self.timer.disarm();
            self.timer_armed = false;
        }
        self.publish();
        self.source.wake();
    }

    /// Does what is ready: hands finished reads to the target, accounts finished writes,
    /// starts the next chunks within the budget and the speed limit. Returns how many
    /// copies it finished or started.
    pub fn run(&mut self) -> usize {
        let now = Instant::now();
        let _ = self.timer.clear();
        self.timer_armed = false;
        if let Some(why) = self.link.failure() {
            self.copier.fail(why);
        }
        let mut work = self.reap();
        if !self.copier.state().is_final() {
            let busy = self.guest_busy(now);
            self.earn_catch_up(now, busy);
            let cap = match self.catch_up {
                0 => BUSY_GUEST_CHUNKS,
                _ => 2 * BUSY_GUEST_CHUNKS,
            };
            self.copier.set_in_flight_cap(busy.then_some(cap));
            let next = self.last_start.map(|t| t + BUSY_GUEST_GAP);
            let waiting = next.filter(|&at| busy && at > now);
            // Busy: one chunk once the gap is over, plus what the guest's writes earned.
            let stopped = self.source_errors.as_ref().is_some_and(|p| p.stopped());
            let allowed = match (busy, waiting) {
                _ if stopped => 0,
                (false, _) => u64::MAX,
                (true, Some(_)) => self.catch_up,
                (true, None) => self.catch_up + 1,
            };
            let started = self.start_copies(now, allowed);
            if busy {
                let free = u64::from(waiting.is_none());
                self.catch_up -= started.saturating_sub(free).min(self.catch_up);
            }
            work += usize::try_from(started).unwrap_or(usize::MAX);
            if let Some(at) = waiting.filter(|_| started == 0) {
                // Nothing earned and a chunk started lately: come back after the gap.
                if self.timer.arm_at(at).is_ok() {
                    self.timer_armed = true;
                }
            }
        }
        self.submit();
        if !self.copier.state().is_final() && !self.timer_armed && self.in_flight() == 0 {
            // Nothing of ours will wake us: look again shortly.
            if self.timer.arm_at(now + IDLE_LOOK).is_ok() {
                self.timer_armed = true;
            }
        }
        self.publish();
        if self.has_completions() {
            // Finished while we were busy: the eventfd may have been read meanwhile.
            self.wake();
        }
        work
    }

    /// Copies what is still dirty and flushes the target, ignoring the speed limit:
    /// with the guest's queues paused, the target then holds what the source holds.
    /// Blocks the calling thread for at most [`SYNC_TIMEOUT`].
    pub fn sync_target(&mut self) -> Result<(), String> {
        let speed = self.copier.speed();
        self.copier.set_speed(0);
        let guest = self.guest.take();
        let result = self.sync_inner();
        self.guest = guest;
        self.copier.set_speed(speed);
        if let Err(e) = &result {
            self.copier.fail(e.clone());
        }
        self.publish();
        result
    }

    fn sync_inner(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + SYNC_TIMEOUT;
        loop {
            self.run();
            if let Some(e) = self.status.info().error {
                return Err(e);
            }
            if self.source_errors.as_ref().is_some_and(|p| p.stopped()) && self.in_flight() == 0 {
                // Nothing copies until the disk is resumed: the job stays as it is.
                return Err("the disk is stopped on an I/O error".into());
            }
            if self.copier.in_sync() && self.in_flight() == 0 {
                break;
            }
            self.wait_until(deadline)?;
        }
        let token = self.flush_token();
        self.flushing = None;
        self.target.flush(token);
        self.submit();
        while self.flushing.is_none() {
            self.wait_until(deadline)?;
            self.reap();
            self.submit();
        }
        self.flushing.take().unwrap_or(Ok(()))
    }

    /// Ends the job as `state` (cancelled, completed, failed): lets the copies in flight
    /// finish (at most [`SYNC_TIMEOUT`]) and starts no more.
    pub fn stop(&mut self, state: JobState) -> Result<(), String> {
        let deadline = Instant::now() + SYNC_TIMEOUT;
        let mut result = Ok(());
        self.stopping = true;
        let _ = self.timer.disarm();
        while self.in_flight() > 0 {
            if let Err(e) = self.wait_until(deadline) {
                result = Err(e);
                break;
            }
            self.reap();
            self.submit();
        }
        if state == JobState::Failed {
            let why = result.clone().err().unwrap_or_else(|| "stopped".into());
            self.copier.fail(why);
        } else if let Err(e) = self.copier.finish(state) {
            result = result.and(Err(e));
        }
        self.publish();
        result
    }

    /// Waits for a completion (10 ms at most), or fails past `deadline`.
    fn wait_until(&mut self, deadline: Instant) -> Result<(), String> {
        if Instant::now() >= deadline {
            return Err(format!(
                "the mirror's I/O did not finish within {} s ({} requests in flight)",
                SYNC_TIMEOUT.as_secs(),
                self.in_flight()
            ));
        }
        if self.has_completions() {
            return Ok(());
        }
        let mut pfd = libc::pollfd {
            fd: self.completion_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: poll reads and writes only the one pollfd we pass.
        unsafe { libc::poll(&mut pfd, 1, 10) };
        Ok(())
    }

    fn flush_token(&self) -> u64 {
        FLUSH_TOKEN
    }

    /// Reaps both queues; returns how many copies finished a step.
    fn reap(&mut self) -> usize {
        let mut done = std::mem::take(&mut self.done);
        // One read of the shared eventfd, before either queue's completions are taken:
        // a completion signalled after it is taken now or wakes the thread again.
        let _ = self.source.reap(|c| done.push(c));
        let reads = done.len();
        for c in done.drain(..) {
            self.read_done(c);
        }
        let _ = self.target.reap_ready(|c| done.push(c));
        let writes = done.len();
        for c in done.drain(..) {
            self.write_done(c);
        }
        self.done = done;
        reads + writes
    }

    fn read_done(&mut self, c: Completion) {
        let Some(idx) = usize::try_from(c.token).ok() else {
            return;
        };
        let Some(copy) = self.copies.get_mut(idx).and_then(Option::as_mut) else {
            return;
        };
        match c.result {
            _ if self.stopping => {
                let chunk = copy.chunk;
                self.release(idx, None);
                self.copier.abandon(chunk);
            }
            Ok(_) if !self.copier.state().is_final() => {
                let iov = [copy.buf.iovec()];
                // SAFETY: the buffer is ours and stays in `copies` until this write's
                // completion has been reaped.
                unsafe { self.target.write(c.token, copy.offset, &iov, false) };
            }
            Ok(_) => self.release(idx, Some(Ok(()))),
            Err(e)
                if !self.copier.state().is_final()
                    && self
                        .source_errors
                        .as_ref()
                        .is_some_and(|p| p.hold(e.errno())) =>
            {
                // The disk stopped on it: the chunk waits for the resume, dirty again.
                tracing::warn!(offset = copy.offset, error = %e, "mirror source: read held until the disk is resumed");
                let chunk = copy.chunk;
                self.release(idx, None);
                self.copier.abandon(chunk);
            }
            Err(e) => {
                let msg = format!("mirror source: read at {}: {e}", copy.offset);
                self.release(idx, Some(Err(msg)));
            }
        }
    }

    fn write_done(&mut self, c: Completion) {
        if c.token == self.flush_token() && c.kind == crate::queue::RequestKind::Flush {
            self.flushing = Some(
                c.result
                    .map(drop)
                    .map_err(|e| format!("mirror target: flush: {e}")),
            );
            return;
        }
        let Some(idx) = usize::try_from(c.token).ok() else {
            return;
        };
        let offset = match self.copies.get(idx).and_then(Option::as_ref) {
            Some(copy) => copy.offset,
            None => return,
        };
        let result = c
            .result
            .map(drop)
            .map_err(|e| format!("mirror target: write at {offset}: {e}"));
        self.release(idx, Some(result));
    }

    /// A copy ended: its chunk's epoch moves on, the copier hears (unless `None`: the
    /// caller gives the chunk up), the buffer is kept.
    fn release(&mut self, idx: usize, result: Option<Result<(), String>>) {
        let Some(copy) = self.copies.get_mut(idx).and_then(Option::take) else {
            return;
        };
        self.link.bump_epoch(copy.chunk);
        if let Some(result) = result {
            self.copier.copied(copy.chunk, result);
        }
        self.spare.push(copy.buf);
        self.free.push(idx);
    }

    /// Whether the guest submitted a request within [`BUSY_GUEST_WINDOW`].
    fn guest_busy(&mut self, now: Instant) -> bool {
        let Some(g) = &self.guest else { return false };
        let submitted = g.submitted();
        if submitted != self.guest_seen.0 {
            self.guest_seen = (submitted, Some(now));
        }
        self.guest_seen
            .1
            .is_some_and(|t| now.saturating_duration_since(t) < BUSY_GUEST_WINDOW)
    }

    /// Counts the chunks the guest's writes turned dirty since the last look into
    /// the chunk starts it earned while the guest is `busy` (see [`CATCH_UP`]).
    fn earn_catch_up(&mut self, now: Instant, busy: bool) {
        const MICRO: u64 = 1_000_000;
        let newly = self.link.bitmap().newly_dirty();
        let earned = newly.wrapping_sub(self.newly_dirty_seen);
        self.newly_dirty_seen = newly;
        if !busy {
            self.catch_up = 0;
            self.earned_at = None;
            return;
        }
        // The rate limit as a bucket of millionths of a chunk start.
        let since = self
            .earned_at
            .map_or(Duration::ZERO, |t| now.saturating_duration_since(t));
        self.earned_at = Some(now);
        let refill = u64::try_from(since.as_micros())
            .unwrap_or(u64::MAX)
            .saturating_mul(MAX_CATCH_UP_RATE);
        self.catch_up_bucket = self
            .catch_up_bucket
            .saturating_add(refill)
            .min(MAX_CATCH_UP * MICRO);
        let granted = earned
            .saturating_mul(CATCH_UP)
            .min(self.catch_up_bucket / MICRO);
        self.catch_up_bucket -= granted * MICRO;
        self.catch_up = (self.catch_up + granted).min(MAX_CATCH_UP);
    }

    /// Starts the chunks the copier picks, `allowed` at most; returns how many.
    fn start_copies(&mut self, now: Instant, allowed: u64) -> u64 {
        let mut started = 0;
        while started < allowed {
            match self.copier.next(now) {
                Step::Copy { chunk, offset, len } => {
                    let Some(buf) = self.buffer(len) else {
                        self.copier
                            .copied(chunk, Err("out of memory for a copy buffer".into()));
                        break;
                    };
                    let idx = self.free.pop().unwrap_or_else(|| {
                        self.copies.push(None);
                        self.copies.len() - 1
                    });
                    self.link.bump_epoch(chunk);
                    let copy = self.copies[idx].insert(ChunkCopy { chunk, offset, buf });
                    let iov = [copy.buf.iovec()];
                    // SAFETY: the buffer is ours and stays in `copies` until this read's
                    // completion has been reaped.
                    unsafe { self.source.read(idx as u64, offset, &iov) };
                    started += 1;
                    self.last_start = Some(now);
                }
                Step::Wait(d) => {
                    if self.timer.arm_at(now + d).is_ok() {
                        self.timer_armed = true;
                    }
                    break;
                }
                Step::Idle => break,
            }
        }
        started
    }

    /// A buffer of exactly `len` bytes (a spare one when it fits).
    fn buffer(&mut self, len: u64) -> Option<AlignedBuf> {
        let len = usize::try_from(len).ok()?;
        if let Some(pos) = self.spare.iter().position(|b| b.len() == len) {
            return Some(self.spare.swap_remove(pos));
        }
        AlignedBuf::new(len, self.align)
    }

    fn submit(&mut self) {
        if let Err(e) = self.source.submit() {
            self.copier.fail(format!("mirror source: {e}"));
        }
        if let Err(e) = self.target.submit() {
            self.copier.fail(format!("mirror target: {e}"));
        }
    }

    /// Publishes progress and state.
    fn publish(&self) {
        let p = self.copier.progress();
        let speed = self.copier.speed();
        self.status.update(|info| {
            info.state = p.state;
            info.bytes_done = p.bytes_done;
            info.bytes_total = p.bytes_total;
            info.dirty_bytes = p.dirty_bytes;
            info.speed = speed;
            if p.error.is_some() {
                info.error = p.error;
            }
        });
    }
}

#[cfg(test)]
mod tests;
