//! Completions finished by other threads (worker threads, NBD connection threads) and
//! waiting for the engine's owner, with the eventfd that tells it: the eventfd is written
//! only when the list turns non-empty, so a burst costs one write. The owner clears the
//! eventfd *before* taking the list ([`CompletionList::take`]), or it could swallow the
//! signal of a completion stored in between.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use vmm_sys_util::eventfd::EventFd;

use crate::sync::lock;

/// Finished ops `(tag, result)` waiting to be reaped, and the eventfd that says so.
pub struct CompletionList {
    done: Mutex<Vec<(u64, i64)>>,
    /// Whether `done` holds anything, readable without the lock.
    has_done: AtomicBool,
    notifier: EventFd,
}

impl CompletionList {
    /// An empty list signalling `notifier`.
    pub fn new(notifier: EventFd) -> CompletionList {
        CompletionList {
            done: Mutex::new(Vec::with_capacity(64)),
            has_done: AtomicBool::new(false),
            notifier,
        }
    }

    /// Stores a finished op; writes the eventfd when the list was empty. `who` names the
    /// caller in the log if the write fails.
    pub fn push(&self, tag: u64, result: i64, who: &str) {
        let was_empty = {
            let mut done = lock(&self.done);
            let was_empty = done.is_empty();
            done.push((tag, result));
            self.has_done.store(true, Ordering::Release);
            was_empty
        };
        if was_empty && let Err(e) = self.notifier.write(1) {
            tracing::error!(error = %e, "{who} cannot signal a completion");
        }
    }

    /// Swaps the waiting completions into `out` (which must be empty; its allocation is
    /// given to the list, so neither side allocates).
    pub fn take(&self, out: &mut Vec<(u64, i64)>) {
        let mut done = lock(&self.done);
        std::mem::swap(&mut *done, out);
        self.has_done.store(false, Ordering::Relaxed);
    }

    /// Whether completions wait (no lock taken).
    pub fn has_completions(&self) -> bool {
        self.has_done.load(Ordering::Acquire)
    }

    /// The eventfd written when completions arrive.
    pub fn notifier(&self) -> &EventFd {
        &self.notifier
    }
}
