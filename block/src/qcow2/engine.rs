//! [`Qcow2Engine`]: the engine of a qcow2 disk's queue. Each op the queue pushes
//! becomes a future of imago's that the engine polls on the queue's thread: already
//! allocated clusters are read and written straight from the guest's buffers by the
//! thread's engine for the file, metadata through the same engine, allocation and
//! copy-on-write from the backing chain by imago. Completions come back with the
//! queue's tags, like any engine's.
//!
//! A read or write of clusters the queue already saw allocated in place skips all of
//! that: it goes to the image file's engine as it came (see [`super::direct`]).

use std::future::Future;
use std::io::{IoSlice, IoSliceMut};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};
use std::time::{Duration, Instant};

use imago::io_buffers::{IoVector, IoVectorMut};
use vmm_sys_util::eventfd::EventFd;

use super::Qcow2Image;
use super::direct::{Learned, MapCache};
use super::executor::{Engines, with_engines};
use crate::engine::{EngineOp, EngineOptions, IoEngine, IoVecs, notifier_or_new};
use crate::error::Error;

/// How long dropping an engine waits for its files' I/O at most.
const DROP_DRAIN: Duration = Duration::from_secs(30);

/// imago's futures are not `Send` (its format layer is `async_trait(?Send)`): a task
/// lives and is polled on the thread that owns the engine.
/// Its output: the byte count and what the op learned of the mapping.
type OpFuture = Pin<Box<dyn Future<Output = std::io::Result<(u64, Option<Learned>)>>>>;

struct Task {
    tag: u64,
    fut: OpFuture,
}

/// Tasks woken since the last poll, and the notifier that brings the thread back.
struct Ready {
    ids: Mutex<Vec<usize>>,
    notifier: EventFd,
}

struct TaskWaker {
    id: usize,
    ready: Arc<Ready>,
}

impl Wake for TaskWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        crate::sync::lock(&self.ready.ids).push(self.id);
        // Woken by the engine's own reap or poll (its I/O completed, a lock it released):
        // the engine looks at the list before it returns. From elsewhere (another
        // iothread released a lock this task waits for), the eventfd brings it back.
        let here = POLLING.with(|p| std::ptr::eq(p.get(), Arc::as_ptr(&self.ready)));
        if !here {
            let _ = self.ready.notifier.write(1);
        }
    }
}

thread_local! {
    /// The tasks of the engine reaping or polling on this thread right now.
    static POLLING: std::cell::Cell<*const Ready> = const { std::cell::Cell::new(std::ptr::null()) };
}

/// Marks `ready`'s engine as the one working on this thread while `f` runs.
fn polling<R>(ready: &Arc<Ready>, f: impl FnOnce() -> R) -> R {
    let previous = POLLING.with(|p| p.replace(Arc::as_ptr(ready)));
    let result = f();
    POLLING.with(|p| p.set(previous));
    result
}

/// A qcow2 disk's engine for one queue.
pub struct Qcow2Engine {
    image: Arc<Qcow2Image>,
    engines: Engines,
    tasks: Vec<Option<Task>>,
    /// One per task slot, made with the slot.
    wakers: Vec<Waker>,
    free: Vec<usize>,
    live: usize,
    ready: Arc<Ready>,
    done: Vec<(u64, i64)>,
    /// Whether the caller may sleep on the notifier (see [`IoEngine::set_notify`]).
    notify: bool,
    /// Clusters this queue saw allocated in place, for the direct path.
    map: MapCache,
    /// Requests on the direct path, by id: the caller's tag, and the image's lock
    /// held shared until the request completed.
    direct: Vec<Option<(u64, tokio::sync::OwnedRwLockReadGuard<()>)>>,
    direct_free: Vec<usize>,
    direct_live: usize,
    /// The image file's offset alignment (O_DIRECT), for the direct path.
    file_align: u64,
}

impl Qcow2Engine {
    /// An engine for `image` whose files' I/O goes through engines per `options`,
    /// signalling `notifier` (a duplicate of it) when given.
    pub fn new(
        image: Arc<Qcow2Image>,
        options: &EngineOptions,
        notifier: Option<&EventFd>,
    ) -> Result<Qcow2Engine, Error> {
        let setup = |source| Error::EngineSetup {
            engine: "qcow2",
            source,
        };
        let notifier = notifier_or_new(notifier).map_err(setup)?;
        let engines = Engines::new(*options, &notifier, image.files())?;
        let cluster_bits = image.cluster_bits;
        let file_align = image
            .files()
            .first()
            .map_or(1, |f| u64::from(f.offset_align().max(1)));
        Ok(Qcow2Engine {
            image,
            engines,
            tasks: Vec::new(),
            wakers: Vec::new(),
            free: Vec::new(),
            live: 0,
            ready: Arc::new(Ready {
                ids: Mutex::new(Vec::new()),
                notifier,
            }),
            done: Vec::new(),
            notify: true,
            map: MapCache::new(cluster_bits),
            direct: Vec::new(),
            direct_free: Vec::new(),
            direct_live: 0,
            file_align,
        })
    }

    /// Sends a read or a non-FUA write whose clusters the queue saw allocated in place
    /// straight to the image file's engine; false (nothing done) otherwise. A FUA
    /// write takes the full path: the mapping it writes through must be durable too.
    fn try_direct(&mut self, tag: u64, op: EngineOp) -> bool {
        let (offset, iovecs) = match op {
            EngineOp::Read { offset, iovecs }
            | EngineOp::Write {
                offset,
                iovecs,
                fua: false,
            } => (offset, iovecs),
            _ => return false,
        };
        let Some(shared) = self.image.try_share() else {
            return false;
        };
        self.map.sync_generation(self.image.generation());
        let len = iovecs.total_len();
        let Some(host) = self.map.host_range(offset, len) else {
            return false;
        };
        // O_DIRECT: clusters smaller than the file's alignment can put an aligned guest
        // range at a misaligned place in the file; imago's path handles that.
        let align = self.file_align;
        if host % align != 0 || len % align != 0 {
            return false;
        }
        if matches!(op, EngineOp::Write { .. }) {
            self.image.grow_file(host.saturating_add(len));
        }
        let id = match self.direct_free.pop() {
            Some(id) => id,
            None => {
                self.direct.push(None);
                self.direct.len() - 1
            }
        };
        self.direct[id] = Some((tag, shared));
        self.direct_live += 1;
        let op = match op {
            EngineOp::Read { .. } => EngineOp::Read {
                offset: host,
                iovecs,
            },
            _ => EngineOp::Write {
                offset: host,
                iovecs,
                fua: false,
            },
        };
        // SAFETY: our caller's contract (`IoEngine::push`): the buffers stay valid until
        // the completion, which `reap` hands back only once the file's engine finished.
        unsafe { self.engines.push_direct(id as u64, op) };
        true
    }

    /// Hands the direct path's finished requests to `done`, letting go of their locks.
    fn reap_direct(&mut self) {
        for (id, result) in self.engines.take_direct_done() {
            let Ok(id) = usize::try_from(id) else {
                continue;
            };
            if let Some((tag, _shared)) = self.direct.get_mut(id).and_then(Option::take) {
                self.done.push((tag, result));
                self.direct_free.push(id);
                self.direct_live -= 1;
            }
        }
    }

    /// The future of `op`.
    ///
    /// # Safety
    /// As [`IoEngine::push`]: `op`'s buffers stay valid until its completion is reaped.
    unsafe fn future(&self, op: EngineOp) -> OpFuture {
        let image = self.image.clone();
        match op {
            EngineOp::Read { offset, iovecs } => {
                // SAFETY: the caller keeps the buffers until the completion is reaped,
                // which is after this future finished.
                let bufs = unsafe { slices_mut(iovecs) };
                Box::pin(async move {
                    let bufv = IoVectorMut::from(bufs);
                    let len = bufv.len();
                    image.read(bufv, offset).await.map(|learned| (len, learned))
                })
            }
            EngineOp::Write {
                offset,
                iovecs,
                fua,
            } => {
                // SAFETY: as for reads.
                let bufs = unsafe { slices(iovecs) };
                Box::pin(async move {
                    let bufv = IoVector::from(bufs);
                    let len = bufv.len();
                    let learned = image.write(bufv, offset).await?;
                    if fua {
                        image.flush().await?;
                    }
                    Ok((len, learned))
                })
            }
            EngineOp::Flush => Box::pin(async move { image.flush().await.map(|()| (0, None)) }),
            EngineOp::Discard { offset, len } => {
                Box::pin(async move { image.discard(offset, len).await.map(|()| (0, None)) })
            }
            EngineOp::WriteZeroes { offset, len } => {
                Box::pin(async move { image.write_zeroes(offset, len).await.map(|()| (0, None)) })
            }
        }
    }

    /// Polls the woken tasks until none is; finished ones go to `done`. Then submits
    /// what they queued.
    fn run_ready(&mut self) {
        loop {
            let ids = std::mem::take(&mut *crate::sync::lock(&self.ready.ids));
            if ids.is_empty() {
                break;
            }
            let tasks = &mut self.tasks;
            let wakers = &self.wakers;
            let done = &mut self.done;
            let free = &mut self.free;
            let live = &mut self.live;
            let map = &mut self.map;
            let image = &self.image;
            with_engines(&mut self.engines, || {
                for id in ids {
                    let Some(Some(task)) = tasks.get_mut(id) else {
                        continue;
                    };
                    let Some(waker) = wakers.get(id) else {
                        continue;
                    };
                    let mut cx = Context::from_waker(waker);
                    if let Poll::Ready(result) = task.fut.as_mut().poll(&mut cx) {
                        let result = match result {
                            Ok((n, learned)) => {
                                if let Some(learned) = learned {
                                    map.learn(learned, image.generation());
                                }
                                i64::try_from(n).unwrap_or(i64::MAX)
                            }
                            Err(e) => {
                                tracing::warn!(tag = task.tag, error = %e, "qcow2: a request failed");
                                -i64::from(e.raw_os_error().unwrap_or(libc::EIO))
                            }
                        };
                        done.push((task.tag, result));
                        tasks[id] = None;
                        free.push(id);
                        *live -= 1;
                    }
                }
            });
        }
        self.engines.submit();
    }

    fn slot(&mut self) -> usize {
        match self.free.pop() {
            Some(id) => id,
            None => {
                let id = self.tasks.len();
                self.tasks.push(None);
                self.wakers.push(Waker::from(Arc::new(TaskWaker {
                    id,
                    ready: self.ready.clone(),
                })));
                id
            }
        }
    }
}

/// The guest's buffers of a read as slices.
///
/// # Safety
/// `iovecs` describe writable memory that stays valid, and is not otherwise accessed,
/// until the op completes.
unsafe fn slices_mut(iovecs: IoVecs) -> Vec<IoSliceMut<'static>> {
    iovecs
        .as_slice()
        .iter()
        .filter(|v| v.iov_len > 0)
        .map(|v| {
            // SAFETY: per this function's contract.
            IoSliceMut::new(unsafe {
                std::slice::from_raw_parts_mut(v.iov_base.cast::<u8>(), v.iov_len)
            })
        })
        .collect()
}

/// The guest's buffers of a write as slices.
///
/// # Safety
/// `iovecs` describe readable memory that stays valid until the op completes.
unsafe fn slices(iovecs: IoVecs) -> Vec<IoSlice<'static>> {
    iovecs
        .as_slice()
        .iter()
        .filter(|v| v.iov_len > 0)
        .map(|v| {
            // SAFETY: per this function's contract.
            IoSlice::new(unsafe {
                std::slice::from_raw_parts(v.iov_base.cast::<u8>().cast_const(), v.iov_len)
            })
        })
        .collect()
}

// SAFETY: the tasks' futures are not `Send`, but they only exist while requests are in
// flight, and a queue's engine moves to another thread only when it has none: a queue is
// made on one thread and handed to its iothread before its first request, and drained
// before it is handed back (removal, reset, a mirror job's stop). Everything else in the
// engine is `Send`.
unsafe impl Send for Qcow2Engine {}

impl IoEngine for Qcow2Engine {
    fn name(&self) -> &'static str {
        "qcow2"
    }

    unsafe fn push(&mut self, tag: u64, op: EngineOp) {
        if self.try_direct(tag, op) {
            return;
        }
        // SAFETY: our caller's contract is the one `future` needs.
        let fut = unsafe { self.future(op) };
        let id = self.slot();
        self.tasks[id] = Some(Task { tag, fut });
        self.live += 1;
        crate::sync::lock(&self.ready.ids).push(id);
    }

    fn submit(&mut self) -> Result<(), Error> {
        let ready = self.ready.clone();
        polling(&ready, || self.run_ready());
        // Requests that finished without I/O (zeroes of an unallocated cluster, an
        // error) wait in `done`: a caller sleeping on the notifier must hear of them.
        if self.notify && !self.done.is_empty() {
            let _ = self.ready.notifier.write(1);
        }
        Ok(())
    }

    fn set_notify(&mut self, enabled: bool) {
        self.notify = enabled;
        self.engines.set_notify(enabled);
    }

    fn reap(&mut self, done: &mut dyn FnMut(u64, i64)) {
        let _ = self.ready.notifier.read();
        self.reap_ready(done);
    }

    fn reap_ready(&mut self, done: &mut dyn FnMut(u64, i64)) {
        let ready = self.ready.clone();
        polling(&ready, || {
            self.engines.reap();
            self.reap_direct();
            self.run_ready();
        });
        for (tag, result) in self.done.drain(..) {
            done(tag, result);
        }
    }

    fn has_completions(&mut self) -> bool {
        !self.done.is_empty()
            || !crate::sync::lock(&self.ready.ids).is_empty()
            || self.engines.has_completions()
    }

    fn notifier(&self) -> &EventFd {
        &self.ready.notifier
    }

    fn in_flight(&self) -> usize {
        self.live + self.direct_live + self.done.len()
    }

    fn set_max_batch(&mut self, max_batch: u32) {
        self.engines.set_max_batch(max_batch);
    }
}

impl Drop for Qcow2Engine {
    fn drop(&mut self) {
        // Futures own buffers the kernel may still write: let their I/O finish first
        // (what waits in an engine's backlog goes out, as the engine only takes it there
        // on a submit).
        let deadline = Instant::now() + DROP_DRAIN;
        while self.engines.in_flight() > 0 && Instant::now() < deadline {
            self.engines.submit();
            let _ = self.ready.notifier.read();
            self.engines.reap();
            std::thread::sleep(Duration::from_micros(200));
        }
    }
}
