//! The engines a thread uses for a qcow2 image's files, and how imago's futures reach
//! them: while a [`super::Qcow2Engine`] polls its requests' futures it installs its
//! [`Engines`] for the thread ([`with_engines`]); a storage access made meanwhile
//! ([`submit`]) becomes an op of that thread's engine for the file, and its future
//! waits for the completion, which [`Engines::reap`] hands over. No runtime, no
//! blocking: the iothread polls the futures when their I/O completed.

use std::cell::Cell;
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::ptr::NonNull;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};

use futures::channel::oneshot;
use vmm_sys_util::eventfd::EventFd;

use super::storage::EngineStorage;
use crate::disk::Disk;
use crate::engine::{EngineOp, EngineOptions, IoEngine, create_engine_sharing};
use crate::error::Error;

thread_local! {
    /// The engines of the qcow2 engine polling futures on this thread right now.
    static CURRENT: Cell<Option<NonNull<Engines>>> = const { Cell::new(None) };
}

/// One thread's engines for the files of an image, all waking one notifier.
pub struct Engines {
    options: EngineOptions,
    /// By file (the address of its `Disk`).
    engines: Vec<(usize, Box<dyn IoEngine>)>,
    next_tag: u64,
    /// By tag: who waits for the result, and the file's writes in flight (writes only).
    waiting: HashMap<u64, (oneshot::Sender<i64>, Option<Arc<InFlight>>)>,
    /// Finished ops of the direct path: their ids (tags without [`DIRECT`]) and results.
    direct_done: Vec<(u64, i64)>,
}

/// The tag bit of an op of the direct path (see [`Engines::push_direct`]).
const DIRECT: u64 = 1 << 63;

/// A storage's writes in flight on every thread, for [`EngineStorage`]'s
/// `settle_writes`: imago drops a write's future on some error paths and waits there
/// before it lets go of the buffers. (Reads are not counted: a file streaming reads on
/// other queues must not hold up imago, which settles under its allocator lock.)
#[derive(Debug, Default)]
pub struct InFlight {
    count: AtomicUsize,
    settled: tokio::sync::Notify,
}

impl InFlight {
    /// Waits until no op of the storage is in flight.
    pub async fn settle(&self) {
        loop {
            let settled = self.settled.notified();
            if self.count.load(Ordering::Acquire) == 0 {
                return;
            }
            settled.await;
        }
    }

    fn done(&self) {
        if self.count.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.settled.notify_waiters();
        }
    }
}

impl Engines {
    /// Engines per `options` for `files` (made now: the thread that serves them may not
    /// be allowed to make one), signalling `notifier` (a duplicate of it).
    pub fn new(
        options: EngineOptions,
        notifier: &EventFd,
        files: &[Arc<Disk>],
    ) -> Result<Engines, Error> {
        let mut engines = Vec::with_capacity(files.len());
        for disk in files {
            engines.push((
                Arc::as_ptr(disk) as usize,
                create_engine_sharing(disk, &options, Some(notifier))?,
            ));
        }
        Ok(Engines {
            options,
            engines,
            next_tag: 0,
            waiting: HashMap::new(),
            direct_done: Vec::new(),
        })
    }

    /// Submits what the futures queued.
    pub fn submit(&mut self) {
        for (_, e) in &mut self.engines {
            if let Err(err) = e.submit() {
                tracing::warn!(error = %err, "qcow2: submitting metadata or data I/O failed");
            }
        }
    }

    /// Hands every finished op's result to the future waiting for it; returns how many.
    /// The engines share one notifier, which the caller reads once before: each engine
    /// is reaped without reading it again (a read for one could swallow another's
    /// signal).
    pub fn reap(&mut self) -> usize {
        let mut n = 0;
        let waiting = &mut self.waiting;
        let direct_done = &mut self.direct_done;
        for (_, e) in &mut self.engines {
            e.reap_ready(&mut |tag, result| {
                if tag & DIRECT != 0 {
                    direct_done.push((tag & !DIRECT, result));
                } else if let Some((tx, in_flight)) = waiting.remove(&tag) {
                    if let Some(writes) = in_flight {
                        writes.done();
                    }
                    let _ = tx.send(result);
                }
                n += 1;
            });
        }
        n
    }

    /// Queues `op` of the direct path, as id `id` (below 2^63), on the image file's
    /// engine; its result comes back through [`Engines::take_direct_done`], not to a
    /// future.
    ///
    /// # Safety
    /// As [`IoEngine::push`]: `op`'s buffers stay valid until the result was taken.
    pub unsafe fn push_direct(&mut self, id: u64, op: EngineOp) {
        match self.engines.first_mut() {
            // SAFETY: per this function's contract.
            Some((_, engine)) => unsafe { engine.push(id | DIRECT, op) },
            None => self.direct_done.push((id, -i64::from(libc::EIO))),
        }
    }

    /// The direct path's finished ops since the last call: (id, result).
    pub fn take_direct_done(&mut self) -> std::vec::Drain<'_, (u64, i64)> {
        self.direct_done.drain(..)
    }

    /// Whether an engine has completions waiting.
    pub fn has_completions(&mut self) -> bool {
        !self.direct_done.is_empty() || self.engines.iter_mut().any(|(_, e)| e.has_completions())
    }

    /// Ops in flight on every engine.
    pub fn in_flight(&self) -> usize {
        self.engines.iter().map(|(_, e)| e.in_flight()).sum()
    }

    /// Tells every engine whether its caller may sleep on the notifier.
    pub fn set_notify(&mut self, enabled: bool) {
        for (_, e) in &mut self.engines {
            e.set_notify(enabled);
        }
    }

    /// Changes the batch size of every engine.
    pub fn set_max_batch(&mut self, max_batch: u32) {
        self.options.max_batch = max_batch;
        for (_, e) in &mut self.engines {
            e.set_max_batch(max_batch);
        }
    }

    /// Queues `op` on the engine for `storage` (made on first use); returns its result's
    /// receiver, or the errno of an engine that could not be made.
    fn push(
        &mut self,
        storage: &EngineStorage,
        op: EngineOp,
    ) -> Result<oneshot::Receiver<i64>, i64> {
        let key = Arc::as_ptr(storage.disk()) as usize;
        let Some(idx) = self.engines.iter().position(|(k, _)| *k == key) else {
            tracing::warn!(file = %storage, "qcow2: a file of the chain without an engine");
            return Err(-i64::from(libc::EIO));
        };
        let tag = self.next_tag;
        self.next_tag = self.next_tag.wrapping_add(1);
        let (tx, rx) = oneshot::channel();
        let writes = match op {
            EngineOp::Read { .. } | EngineOp::Flush => None,
            _ => {
                storage.in_flight().count.fetch_add(1, Ordering::AcqRel);
                Some(storage.in_flight().clone())
            }
        };
        self.waiting.insert(tag, (tx, writes));
        // SAFETY: the future awaiting `rx` owns the op's buffers (or borrows them from
        // one that outlives it) until the result arrived; the owner of these engines
        // drains them before dropping anything (see `Qcow2Engine`'s drop).
        unsafe { self.engines[idx].1.push(tag, op) };
        Ok(rx)
    }
}

impl Drop for Engines {
    /// Ops never reaped (the owner gave up waiting for them) no longer count as the
    /// file's writes in flight: another queue's `settle_writes` must not wait for them.
    fn drop(&mut self) {
        for (_, (_, writes)) in self.waiting.drain() {
            if let Some(w) = writes {
                w.done();
            }
        }
    }
}

/// Runs `f` with `engines` as this thread's engines for storage accesses.
pub fn with_engines<R>(engines: &mut Engines, f: impl FnOnce() -> R) -> R {
    struct Restore(Option<NonNull<Engines>>);
    impl Drop for Restore {
        fn drop(&mut self) {
            CURRENT.with(|c| c.set(self.0));
        }
    }
    let previous = CURRENT.with(|c| c.replace(Some(NonNull::from(engines))));
    let _restore = Restore(previous);
    f()
}

/// The result of an op on an iothread's engine: the byte count or a negative errno.
pub struct Wait {
    rx: Result<oneshot::Receiver<i64>, i64>,
}

impl Future for Wait {
    type Output = i64;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<i64> {
        match &mut self.rx {
            Err(errno) => Poll::Ready(*errno),
            Ok(rx) => Pin::new(rx)
                .poll(cx)
                .map(|r| r.unwrap_or(-i64::from(libc::ECANCELED))),
        }
    }
}

/// `op` on this thread's engine for `storage`, when a qcow2 engine is polling here;
/// `None` off the data path (the caller does the op itself).
pub fn submit(storage: &EngineStorage, op: EngineOp) -> Option<Wait> {
    let engines = CURRENT.with(Cell::get)?;
    // SAFETY: `with_engines` installed the pointer from a `&mut Engines` that outlives
    // the call it wraps, and nothing else touches those engines during it (one thread).
    let engines = unsafe { &mut *engines.as_ptr() };
    Some(Wait {
        rx: engines.push(storage, op),
    })
}
