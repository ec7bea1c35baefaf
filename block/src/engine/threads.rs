//! The `threads` engine: a small pool of worker threads running each op with plain
//! syscalls ([`sync_ops::execute`]).
//!
//! The owner stages ops without taking a lock ([`WorkerPool::push`]), hands a whole batch
//! to the workers under one lock with at most one wake-up per idle worker
//! ([`WorkerPool::submit`]), and collects results from a shared list that workers fill
//! ([`WorkerPool::reap_completions`]). A worker writes the notifier eventfd only when it
//! finds that list empty, so a burst of completions costs one eventfd write, not one each.
//!
//! The io_uring and Linux AIO engines use a [`WorkerPool`] (with a clone of their own
//! eventfd as notifier) for ops their kernel interface lacks.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use vmm_sys_util::eventfd::EventFd;

use crate::disk::Disk;
use crate::engine::completions::CompletionList;
use crate::engine::{EngineOp, EngineOptions, IoEngine, sync_ops};
use crate::error::Error;
use crate::sync::{lock, wait};

/// Stack size of a worker: `execute` needs very little.
const WORKER_STACK: usize = 256 * 1024;

/// What the owner and the workers share.
struct Shared {
    disk: Arc<Disk>,
    /// Ops handed to the workers and not yet picked up, plus the stop flag.
    jobs: Mutex<Jobs>,
    /// Signalled when jobs arrive or the pool stops.
    wake: Condvar,
    /// Finished ops waiting to be reaped, and the eventfd written when it turns
    /// non-empty.
    done: CompletionList,
}

/// The job queue proper.
struct Jobs {
    queue: VecDeque<(u64, EngineOp)>,
    /// Workers waiting on `wake`.
    idle: usize,
    stop: bool,
}

/// A pool of worker threads executing ops with [`sync_ops::execute`]; completion signals
/// the notifier.
pub struct WorkerPool {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
    /// Ops pushed and not yet submitted.
    staged: Vec<(u64, EngineOp)>,
    /// Ops submitted and not yet reaped (queued, running or finished).
    outstanding: usize,
    /// Swapped with the shared completion list on reap, so neither side allocates.
    reaped: Vec<(u64, i64)>,
}

impl WorkerPool {
    /// Starts `workers` threads named "blk-worker"; each finished op is stored and
    /// `notifier` (an EventFd the owner also watches, e.g. from `EventFd::try_clone()`) is
    /// written.
    ///
    /// The owner must read (clear) the notifier *before* calling
    /// [`WorkerPool::reap_completions`], or it may miss a wake-up.
    pub fn new(disk: Arc<Disk>, workers: usize, notifier: EventFd) -> Result<WorkerPool, Error> {
        if workers == 0 {
            return Err(Error::InvalidOption(
                "a worker pool needs at least one thread".into(),
            ));
        }
        let shared = Arc::new(Shared {
            disk,
            jobs: Mutex::new(Jobs {
                queue: VecDeque::with_capacity(64),
                idle: 0,
                stop: false,
            }),
            wake: Condvar::new(),
            done: CompletionList::new(notifier),
        });
        let mut pool = WorkerPool {
            shared,
            workers: Vec::with_capacity(workers),
            staged: Vec::with_capacity(64),
            outstanding: 0,
            reaped: Vec::with_capacity(64),
        };
        for _ in 0..workers {
            let shared = pool.shared.clone();
            let handle = std::thread::Builder::new()
                .name("blk-worker".into())
                .stack_size(WORKER_STACK)
                .spawn(move || {
                    crate::thread_class::started(crate::thread_class::ThreadClass::IoThread);
                    worker(&shared);
                })
                // On failure `pool` is dropped here, stopping the workers already started.
                .map_err(|source| Error::EngineSetup {
                    engine: "threads",
                    source,
                })?;
            pool.workers.push(handle);
        }
        Ok(pool)
    }

    /// Stages one op (no wake-up yet).
    ///
    /// # Safety
    /// As [`IoEngine::push`]: the buffers of `op` must satisfy
    /// [`crate::engine::IoVecs::new`]'s contract until the completion for `tag` has been
    /// reaped (or the pool dropped).
    pub unsafe fn push(&mut self, tag: u64, op: EngineOp) {
        self.staged.push((tag, op));
    }

    /// Hands every staged op to the workers (one lock, and one wake-up per idle worker
    /// that has work, per batch).
    pub fn submit(&mut self) {
        if self.staged.is_empty() {
            return;
        }
        let n = self.staged.len();
        let wakeups = {
            let mut jobs = lock(&self.shared.jobs);
            jobs.queue.extend(self.staged.drain(..));
            n.min(jobs.idle)
        };
        self.outstanding += n;
        if wakeups >= self.workers.len() {
            self.shared.wake.notify_all();
        } else {
            for _ in 0..wakeups {
                self.shared.wake.notify_one();
            }
        }
    }

    /// Passes finished ops to `done(tag, result)`; does NOT read the notifier (the owner
    /// does). The owner must clear the notifier *before* calling this: a worker signals
    /// only when it finds the finished list empty, so clearing afterwards could swallow
    /// the signal of an op finished in between.
    pub fn reap_completions(&mut self, done: &mut dyn FnMut(u64, i64)) {
        if self.outstanding == 0 {
            return;
        }
        if !self.shared.done.has_completions() {
            return;
        }
        self.shared.done.take(&mut self.reaped);
        self.outstanding -= self.reaped.len();
        for (tag, result) in self.reaped.drain(..) {
            done(tag, result);
        }
    }

    /// Whether finished ops wait for [`WorkerPool::reap_completions`] (no lock taken).
    pub fn has_completions(&self) -> bool {
        self.shared.done.has_completions()
    }

    /// Staged + running + finished-but-unreaped ops.
    pub fn in_flight(&self) -> usize {
        self.staged.len() + self.outstanding
    }
}

impl Drop for WorkerPool {
    /// Drops ops not yet started, waits for running ops to finish, then stops and joins
    /// the workers.
    fn drop(&mut self) {
        {
            let mut jobs = lock(&self.shared.jobs);
            jobs.queue.clear();
            jobs.stop = true;
        }
        self.shared.wake.notify_all();
        for handle in self.workers.drain(..) {
            if handle.join().is_err() {
                tracing::error!("a blk-worker thread panicked");
            }
        }
    }
}

/// A worker's loop: take a job, run it, publish the result, until the pool stops.
fn worker(shared: &Shared) {
    loop {
        let (tag, op) = {
            let mut jobs = lock(&shared.jobs);
            loop {
                if jobs.stop {
                    return;
                }
                if let Some(job) = jobs.queue.pop_front() {
                    break job;
                }
                jobs.idle += 1;
                jobs = wait(&shared.wake, jobs);
                jobs.idle -= 1;
            }
        };
        // SAFETY: the owner promised (WorkerPool::push) that the op's buffers stay valid
        // until its completion is reaped, which cannot happen before we publish it below;
        // and Drop joins us before the pool goes away.
        let result = unsafe { sync_ops::execute(&shared.disk, &op) };
        // Only the first completion after a reap signals: the owner clears the notifier
        // before taking the list, so later ones ride along with this signal.
        shared.done.push(tag, result, "blk-worker");
    }
}

/// The `threads` engine: an [`IoEngine`] over a [`WorkerPool`] with its own nonblocking
/// notifier eventfd.
pub struct ThreadsEngine {
    pool: WorkerPool,
    notifier: EventFd,
}

impl ThreadsEngine {
    /// Creates a threads engine with `options.threads` workers for `disk`.
    // Boxed as `create_engine` wants it, like the other engines' constructors.
    #[allow(clippy::new_ret_no_self)]
    pub fn new(disk: Arc<Disk>, options: &EngineOptions) -> Result<Box<dyn IoEngine>, Error> {
        Self::with_notifier(disk, options, None)
    }

    /// As [`ThreadsEngine::new`], signalling `notifier` (a duplicate) when given.
    pub fn with_notifier(
        disk: Arc<Disk>,
        options: &EngineOptions,
        notifier: Option<&EventFd>,
    ) -> Result<Box<dyn IoEngine>, Error> {
        let setup = |source: std::io::Error| Error::EngineSetup {
            engine: "threads",
            source,
        };
        let notifier = crate::engine::notifier_or_new(notifier).map_err(setup)?;
        let worker_fd = notifier.try_clone().map_err(setup)?;
        let pool = WorkerPool::new(disk, options.threads, worker_fd)?;
        Ok(Box::new(ThreadsEngine { pool, notifier }))
    }
}

impl IoEngine for ThreadsEngine {
    fn name(&self) -> &'static str {
        "threads"
    }

    unsafe fn push(&mut self, tag: u64, op: EngineOp) {
        // SAFETY: our caller gives the same guarantee the pool asks for.
        unsafe { self.pool.push(tag, op) };
    }

    fn submit(&mut self) -> Result<(), Error> {
        self.pool.submit();
        Ok(())
    }

    fn reap(&mut self, done: &mut dyn FnMut(u64, i64)) {
        // Clear first: a completion published after this read signals again.
        let _ = self.notifier.read();
        self.pool.reap_completions(done);
    }

    fn reap_ready(&mut self, done: &mut dyn FnMut(u64, i64)) {
        // A worker signals when it finds the finished list empty, which it is after this:
        // an edge-triggered watcher sees every later completion.
        self.pool.reap_completions(done);
    }

    fn has_completions(&mut self) -> bool {
        self.pool.has_completions()
    }

    fn notifier(&self) -> &EventFd {
        &self.notifier
    }

    fn in_flight(&self) -> usize {
        self.pool.in_flight()
    }
}

#[cfg(test)]
mod tests;
