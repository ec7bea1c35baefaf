//! The `VhostUserBackend` of one virtio-blk disk.

use std::collections::BTreeMap;
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};

use block::throttle::ThrottleLimits;
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackend, VringEpollHandler, VringRwLock};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    EventConsumer, EventFlag, EventNotifier, new_event_consumer_and_notifier,
};

use super::threads::Thread;
use super::{BackendConfig, BackendCounters};
use crate::config::IoThreadConfig;
use crate::virtio_blk::GuestMem;
use crate::virtio_blk::device::{BlkDevice, DeviceError};

/// The library's per-thread epoll handler, as this backend is run (`Arc<Backend>`).
pub(super) type Handler = VringEpollHandler<Arc<Backend>>;

/// One disk served over vhost-user. Use it as `Arc<Backend>` (the daemon clones it).
pub struct Backend {
    pub(super) config: BackendConfig,
    /// The disk, its config space, throttle group and counters; it makes the workers.
    pub(super) device: Arc<BlkDevice>,
    pub(super) threads: Vec<Arc<Thread>>,
    /// Block jobs (live mirror) and the thread they run on (made at the first job).
    pub(super) jobs: std::sync::Mutex<crate::mirror::JobList>,
    pub(super) job_thread: std::sync::Mutex<Option<Arc<crate::iothread::IoThread>>>,
    /// The backend is stopping: no new job starts.
    pub(super) stopping: AtomicBool,
    /// Where each queue lives: (thread index, index within the thread).
    pub(super) placement: Vec<(usize, usize)>,
    acked_features: AtomicU64,
    event_idx: AtomicBool,
    sessions: AtomicU64,
}

/// Re-exported for the serving threads.
pub(super) use block::sync::lock;

impl Backend {
    /// Validates `config` and opens the disk.
    pub fn new(config: BackendConfig) -> Result<Arc<Backend>, String> {
        config.validate()?;
        let d = &config.disk;
        let device = BlkDevice::open(d.clone(), None).map_err(|e| match e {
            DeviceError::Disk(_) => format!("disk {}: {e}", d.id),
            e => e.to_string(),
        })?;
        let plan = config.thread_plan();
        let mut placement = vec![(0, 0); usize::from(d.num_queues)];
        for (t, p) in plan.iter().enumerate() {
            for (local, &q) in p.queues.iter().enumerate() {
                if let Some(slot) = placement.get_mut(usize::from(q)) {
                    *slot = (t, local);
                }
            }
        }
        let threads = plan
            .into_iter()
            .map(|p| Thread::new(p).map(Arc::new))
            .collect::<io::Result<Vec<_>>>()
            .map_err(|e| format!("cannot create an iothread: {e}"))?;
        let disk = device.disk();
        tracing::info!(disk = %d.id, path = %d.path.display(), capacity = disk.capacity(),
            readonly = device.shared().limits.readonly, cache = %d.cache, aio = %d.aio,
            queues = d.num_queues, "disk ready");
        Ok(Arc::new(Backend {
            device: Arc::new(device),
            jobs: std::sync::Mutex::default(),
            job_thread: std::sync::Mutex::new(None),
            stopping: AtomicBool::new(false),
            threads,
            placement,
            acked_features: AtomicU64::new(0),
            event_idx: AtomicBool::new(false),
            sessions: AtomicU64::new(0),
            config,
        }))
    }

    /// The configuration it serves.
    pub fn config(&self) -> &BackendConfig {
        &self.config
    }

    /// The device it serves (disk, config space, throttle, counters).
    pub fn device(&self) -> &Arc<BlkDevice> {
        &self.device
    }

    /// The virtio features acked by the current (or last) frontend.
    pub fn acked_features(&self) -> u64 {
        self.acked_features.load(Relaxed)
    }

    /// Whether the current frontend negotiated VIRTIO_RING_F_EVENT_IDX.
    pub fn event_idx(&self) -> bool {
        self.event_idx.load(Relaxed)
    }

    /// Changes the disk's throttle limits while I/O runs (queued requests keep their place).
    pub fn set_throttle(&self, limits: ThrottleLimits) -> Result<(), String> {
        self.device
            .set_throttle(Some(limits))
            .map_err(|e| e.to_string())
    }

    /// Changes an iothread's settings while it runs (applied at once, even when idle).
    pub fn update_iothread(&self, config: IoThreadConfig) -> Result<(), String> {
        config.validate()?;
        let thread = self
            .threads
            .iter()
            .find(|t| t.id() == config.id)
            .ok_or_else(|| format!("no iothread {}", config.id))?;
        thread.update(config);
        Ok(())
    }

    /// The current settings of every iothread.
    pub fn iothread_configs(&self) -> Vec<IoThreadConfig> {
        self.threads.iter().map(|t| t.config()).collect()
    }

    /// The kernel id of the thread serving iothread `id` now (None: no frontend, or no
    /// such iothread).
    pub fn iothread_thread_id(&self, id: &str) -> Option<i32> {
        self.threads.iter().find(|t| t.id() == id)?.thread_id()
    }

    /// A copy of every counter.
    pub fn counters(&self) -> BackendCounters {
        BackendCounters {
            disks: BTreeMap::from([(self.device.id().to_string(), self.device.counters())]),
            iothreads: self
                .threads
                .iter()
                .map(|t| (t.id().to_string(), t.counters()))
                .collect(),
            iothread_queues: self
                .threads
                .iter()
                .map(|t| (t.id().to_string(), t.queues().to_vec()))
                .collect(),
            sessions: self.sessions.load(Relaxed),
        }
    }

    /// Starts serving a new frontend connection: `mem` is the atomic given to its daemon,
    /// `handlers` the daemon's per-thread epoll handlers (one per [`Backend::queues_per_thread`]
    /// entry).
    pub(super) fn begin_session(
        &self,
        mem: &GuestMem,
        handlers: Vec<Arc<Handler>>,
    ) -> io::Result<()> {
        for (thread, handler) in self.threads.iter().zip(handlers) {
            thread.begin_session(mem.clone(), handler, self.config.disk.num_queues)?;
        }
        Ok(())
    }

    /// Counts a frontend connection accepted.
    pub(super) fn count_session(&self) -> u64 {
        self.sessions.fetch_add(1, Relaxed) + 1
    }

    /// Ends the session: drains and drops every queue worker and forgets the daemon's
    /// handlers (they hold this backend: the cycle must be broken here).
    pub(super) fn end_session(&self) {
        // Not in the middle of a block job's switch: its queues drain as they are.
        let _switching = self.device.lock_switch();
        for thread in &self.threads {
            thread.end_session();
        }
    }

    fn stop_queue(&self, queue: u32) {
        let Some(&(t, local)) = usize::try_from(queue)
            .ok()
            .and_then(|q| self.placement.get(q))
        else {
            return;
        };
        if let Some(thread) = self.threads.get(t) {
            // Not in the middle of a block job's switch (see `end_session`).
            let _switching = self.device.lock_switch();
            thread.stop_queue(local);
        }
    }
}

impl VhostUserBackend for Backend {
    type Bitmap = ();
    type Vring = VringRwLock<GuestMem>;

    fn num_queues(&self) -> usize {
        usize::from(self.config.disk.num_queues)
    }

    fn max_queue_size(&self) -> usize {
        usize::from(self.config.disk.queue_size)
    }

    fn features(&self) -> u64 {
        self.device.features() | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn acked_features(&self, features: u64) {
        self.acked_features.store(features, Relaxed);
        self.device.set_driver_features(features);
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        // REPLY_ACK: a frontend that asks waits until a memory region is mapped here,
        // so its first kick cannot find buffers outside the map (without it, a frontend
        // may kick before this side has processed ADD_MEM_REG).
        VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
            | VhostUserProtocolFeatures::RESET_DEVICE
    }

    fn reset_device(&self) {
        for q in 0..self.config.disk.num_queues {
            self.stop_queue(u32::from(q));
        }
    }

    fn set_event_idx(&self, enabled: bool) {
        self.event_idx.store(enabled, Relaxed);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        // The library checks offset + size <= 4096.
        let mut out = vec![0u8; size.min(4096) as usize];
        self.device.read_config(u64::from(offset), &mut out);
        out
    }

    fn set_config(&self, offset: u32, buf: &[u8]) -> io::Result<()> {
        self.device.write_config(u64::from(offset), buf);
        Ok(())
    }

    fn update_memory(&self, _mem: GuestMem) -> io::Result<()> {
        // The workers hold the daemon's atomic, which the library has already updated.
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        self.threads.iter().map(|t| t.mask()).collect()
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        // A fresh pair for every daemon: a signalled one would stop the next daemon's workers.
        match new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC) {
            Ok(pair) => Some(pair),
            Err(e) => {
                tracing::error!(error = %e, "cannot create an exit eventfd");
                None
            }
        }
    }

    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        self.stop_queue(queue_index);
        Ok(())
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[VringRwLock<GuestMem>],
        thread_id: usize,
    ) -> io::Result<()> {
        if !evset.contains(EventSet::IN) {
            tracing::warn!(device_event, ?evset, "unexpected event set");
        }
        if let Some(thread) = self.threads.get(thread_id) {
            thread.handle_event(self, device_event, vrings);
        }
        // An Err would end the library's worker thread and kill its queues silently.
        Ok(())
    }
}
