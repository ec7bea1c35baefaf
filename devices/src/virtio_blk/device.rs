//! A virtio-blk device assembled from its [`DiskConfig`]: the open disk, features, config
//! space, throttle groups, counters, and the workers for its queues. Transports (virtio-pci
//! under KVM, vhost-user) and tests build on this.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

use block::sync::lock;
use block::throttle::{GroupSwitch, MemberWaker, Throttle, ThrottleGroup, ThrottleLimits};
use block::{AioKind, CountersSnapshot, Disk, DiskCounters, DiskQueue, EngineOptions};
use serde::{Deserialize, Serialize};
use vmm_sys_util::eventfd::EventFd;

use super::GuestMem;
use super::config_space::{ConfigParams, ConfigSpace, device_features};
use super::io_error::{IoErrorCounts, IoErrorState};
use super::worker::{BlkShared, QueueHost, QueueWorker};
use crate::config::{DiscardMode, DiskConfig};

/// Largest data segment the guest may use (config size_max).
pub const SIZE_MAX: u32 = 1 << 20;
/// Largest discard or write-zeroes, in sectors (1 GiB).
pub const MAX_RANGE_SECTORS: u32 = (1 << 30) / 512;

/// Errors of building or changing a device.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// The settings are invalid.
    #[error("{0}")]
    Config(String),
    /// The disk could not be opened.
    #[error(transparent)]
    Disk(#[from] block::Error),
    /// A throttle setting is invalid.
    #[error("disk {disk}: {source}")]
    Throttle {
        /// Disk id.
        disk: String,
        /// What was wrong.
        #[source]
        source: block::throttle::ThrottleError,
    },
    /// An eventfd or timerfd could not be created.
    #[error("disk {disk}: {source}")]
    Io {
        /// Disk id.
        disk: String,
        /// What the kernel said.
        #[source]
        source: io::Error,
    },
}

/// The counters of one disk.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct BlkCounters {
    /// Block-layer counters.
    #[serde(flatten)]
    pub io: CountersSnapshot,
    /// Chains rejected as malformed or unsupported.
    pub invalid_requests: u64,
    /// Interrupts sent to the driver.
    pub signals: u64,
    /// Failed requests per error-policy action.
    #[serde(default)]
    pub io_errors: IoErrorCounts,
    /// An NBD disk's connections: state, count, reconnects, last error.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbd: Option<block::nbd::NbdStatus>,
}

/// One virtio-blk disk.
pub struct BlkDevice {
    config: DiskConfig,
    /// The open image and the path it stands for (changed by a mirror's pivot).
    current: Mutex<(Arc<Disk>, std::path::PathBuf)>,
    /// A running mirror job's link, attached to every queue made while it runs.
    mirror: Mutex<Option<Arc<block::jobs::MirrorLink>>>,
    /// Held while a block job attaches to or switches the disk's queues; whoever stops
    /// queues outside the VMM's device lock (a vhost-user session's end) takes it too.
    switching: Mutex<()>,
    counters: Arc<DiskCounters>,
    shared: Arc<BlkShared>,
    config_space: Mutex<ConfigSpace>,
    features: u64,
    /// The disk's own limits (a group whose members are its queues; always present so
    /// limits can be set live, free of cost while empty).
    own_group: ThrottleGroup,
    group: Mutex<SharedGroup>,
}

/// The disk's shared throttle group and the mailboxes of its live queues, which are told
/// when the group changes.
struct SharedGroup {
    group: Option<ThrottleGroup>,
    /// One per queue worker made; dead ones (worker dropped) are pruned as we go.
    switches: Vec<Weak<GroupSwitch>>,
}

impl SharedGroup {
    fn live(&mut self) -> Vec<Arc<GroupSwitch>> {
        self.switches.retain(|w| w.strong_count() > 0);
        self.switches.iter().filter_map(Weak::upgrade).collect()
    }
}

impl BlkDevice {
    /// Opens the disk of `config` (validated), with `shared_group` when the config names a
    /// `throttle_group` (the caller resolves the name).
    pub fn open(
        config: DiskConfig,
        shared_group: Option<ThrottleGroup>,
    ) -> Result<Self, DeviceError> {
        config.validate().map_err(DeviceError::Config)?;
        if config.throttle_group.is_some() != shared_group.is_some() {
            return Err(DeviceError::Config(format!(
                "disk {}: throttle_group {:?} was not resolved",
                config.id, config.throttle_group
            )));
        }
        let disk = if config.is_null() {
            Disk::null(config.null_size.unwrap_or(0))
        } else {
            Disk::open(&config.disk_options())?
        };
        let readonly = config.readonly || disk.readonly();
        // Discard and write-zeroes are offered (features, config limits) only when writable.
        let discard = config.discard == DiscardMode::Unmap && !readonly;
        let write_zeroes = !readonly;
        let features = device_features(readonly, config.num_queues, discard, write_zeroes);
        let writeback = disk.cache().write_cache();
        let range_max = |offered: bool| if offered { MAX_RANGE_SECTORS } else { 0 };
        let space = ConfigSpace::new(&ConfigParams {
            capacity_bytes: disk.capacity(),
            logical_block_size: disk.logical_block_size(),
            physical_block_size: disk.physical_block_size(),
            seg_max: u32::from(config.queue_size).saturating_sub(2).max(1),
            size_max: SIZE_MAX,
            num_queues: config.num_queues,
            writeback,
            max_discard_sectors: range_max(discard),
            max_write_zeroes_sectors: range_max(write_zeroes),
            write_zeroes_may_unmap: discard,
        });
        let shared = Arc::new(BlkShared {
            id: config.id.clone(),
            serial: config.serial().to_string(),
            limits: space.limits(readonly, discard, write_zeroes),
            writeback: AtomicBool::new(writeback),
            invalid_requests: AtomicU64::new(0),
            signals: AtomicU64::new(0),
            held: AtomicBool::new(false),
            io_error: IoErrorState::new(config.on_write_error, config.on_read_error).map_err(
                |source| DeviceError::Io {
                    disk: config.id.clone(),
                    source,
                },
            )?,
        });
        let own_group = ThrottleGroup::new(
            config.id.clone(),
            config.throttle.clone().unwrap_or_default(),
        )
        .map_err(|source| DeviceError::Throttle {
            disk: config.id.clone(),
            source,
        })?;
        Ok(BlkDevice {
            current: Mutex::new((Arc::new(disk), config.path.clone())),
            mirror: Mutex::new(None),
            switching: Mutex::new(()),
            counters: Arc::default(),
            shared,
            config_space: Mutex::new(space),
            features,
            own_group,
            group: Mutex::new(SharedGroup {
                group: shared_group,
                switches: Vec::new(),
            }),
            config,
        })
    }

    /// The disk's id.
    pub fn id(&self) -> &str {
        &self.config.id
    }

    /// Its settings (throttle and throttle group as last set).
    pub fn config(&self) -> DiskConfig {
        let mut c = self.config.clone();
        {
            let current = lock(&self.current);
            c.path = current.1.clone();
            // A pivot may change the format (a raw disk mirrored to a qcow2 target).
            if current.0.backend() != block::BackendKind::Null && current.0.nbd().is_none() {
                c.format = current.0.format();
            }
        }
        let limits = self.own_group.limits();
        c.throttle = limits.is_enabled().then_some(limits);
        c.throttle_group = self.shared_group().map(|g| g.id().to_string());
        c
    }

    /// The open disk.
    pub fn disk(&self) -> Arc<Disk> {
        lock(&self.current).0.clone()
    }

    /// Makes `disk` (standing for `path`) the disk's image for queues made from now on
    /// and for `config()`: a mirror's pivot, after every live queue switched.
    pub fn switch_disk(&self, disk: Arc<Disk>, path: std::path::PathBuf) {
        tracing::info!(disk = %self.config.id, path = %path.display(), "disk switched to a new image");
        *lock(&self.current) = (disk, path);
    }

    /// Held while a block job attaches to or switches the disk's queues (see the field).
    pub fn lock_switch(&self) -> std::sync::MutexGuard<'_, ()> {
        lock(&self.switching)
    }

    /// The mirror link queues made now attach.
    pub fn mirror(&self) -> Option<Arc<block::jobs::MirrorLink>> {
        lock(&self.mirror).clone()
    }

    /// The mirror link queues made from now on attach (`None`: none).
    pub fn set_mirror(&self, link: Option<Arc<block::jobs::MirrorLink>>) {
        *lock(&self.mirror) = link;
    }

    /// virtio feature bits offered to the driver.
    pub fn features(&self) -> u64 {
        self.features
    }

    /// State shared with the workers.
    pub fn shared(&self) -> &Arc<BlkShared> {
        &self.shared
    }

    /// Reads the config space (out-of-range bytes read as zero).
    pub fn read_config(&self, offset: u64, data: &mut [u8]) {
        lock(&self.config_space).read(offset, data);
    }

    /// Writes the config space: only the `wce` byte is writable; it switches the write
    /// cache of every queue.
    pub fn write_config(&self, offset: u64, data: &[u8]) {
        if let Some(writeback) = lock(&self.config_space).write(offset, data) {
            tracing::info!(disk = %self.config.id, writeback, "the driver changed the write cache");
            self.shared.writeback.store(writeback, Ordering::Relaxed);
        }
    }

    /// The features the driver accepted. A driver without `VIRTIO_BLK_F_FLUSH` cannot ask
    /// for a flush, so its writes must be durable when they complete: the write cache
    /// goes off (every write FUA) until a driver that accepts FLUSH comes, which gets the
    /// config's `wce` back. `cache=unsafe` keeps its cache: the user chose no durability.
    pub fn set_driver_features(&self, features: u64) {
        if self.config.cache == block::CacheMode::Unsafe {
            return;
        }
        let flush =
            features & (1u64 << virtio_bindings::bindings::virtio_blk::VIRTIO_BLK_F_FLUSH) != 0;
        let writeback = flush && lock(&self.config_space).writeback();
        if !flush {
            tracing::info!(disk = %self.config.id, "driver without FLUSH: write cache off");
        }
        self.shared.writeback.store(writeback, Ordering::Relaxed);
    }

    /// Whether the write cache is enabled (config `wce`, as the driver last set it).
    pub fn writeback(&self) -> bool {
        self.shared.writeback.load(Ordering::Relaxed)
    }

    /// Engine settings for one queue.
    pub fn engine_options(&self, max_batch: u32) -> EngineOptions {
        EngineOptions {
            kind: self.config.aio,
            queue_depth: u32::from(self.config.queue_size),
            max_batch: max_batch.max(1),
            sqpoll_idle_ms: None,
            threads: if self.config.aio == AioKind::Threads {
                4
            } else {
                1
            },
        }
    }

    /// A worker for queue `index` served through `host`, with its own engine.
    pub fn new_worker<Q: QueueHost>(
        &self,
        index: u16,
        host: Q,
        mem: GuestMem,
        max_batch: u32,
    ) -> Result<QueueWorker<Q>, DeviceError> {
        if index >= self.config.num_queues {
            return Err(DeviceError::Config(format!(
                "disk {}: queue {index} does not exist (num_queues {})",
                self.config.id, self.config.num_queues
            )));
        }
        let io_err = |source| DeviceError::Io {
            disk: self.config.id.clone(),
            source,
        };
        let mut queue = DiskQueue::new(
            self.disk(),
            &self.engine_options(max_batch),
            self.counters.clone(),
        )?;
        if let Some(link) = lock(&self.mirror).clone() {
            queue.attach_mirror(Some(link), None)?;
        }
        let wake = Arc::new(EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC).map_err(io_err)?);
        let throttle = self.throttle_for(&wake);
        QueueWorker::new(index, host, mem, queue, self.shared.clone(), throttle, wake)
            .map_err(io_err)
    }

    /// A queue's memberships: the disk's own group and the shared one, both waking `wake`;
    /// the queue follows later [`set_shared_group`](Self::set_shared_group) calls.
    pub fn throttle_for(&self, wake: &Arc<EventFd>) -> Throttle {
        let wake = wake.clone();
        let waker: MemberWaker = Arc::new(move || {
            let _ = wake.write(1);
        });
        let switch = GroupSwitch::new(waker.clone());
        let shared = {
            let mut sg = lock(&self.group);
            sg.live();
            sg.switches.push(Arc::downgrade(&switch));
            sg.group.as_ref().map(|g| switch.join(g))
        };
        Throttle::new(Some(self.own_group.join(waker)), shared).with_switch(switch)
    }

    /// Moves the disk to another shared throttle group (`None`: out of any) while it
    /// runs. Each queue is woken and makes the move on its own thread before it decides
    /// its next request; requests it holds stay queued, in order, and are decided under
    /// the new group. Queues made later start in the new group. If a queue held or waited
    /// for the old group's turn, the turn passes on to the next member.
    pub fn set_shared_group(&self, group: Option<ThrottleGroup>) {
        let mut sg = lock(&self.group);
        for switch in sg.live() {
            switch.post(group.as_ref());
        }
        tracing::info!(disk = %self.config.id, group = ?group.as_ref().map(ThrottleGroup::id),
            "throttle group changed");
        sg.group = group;
    }

    /// Changes the disk's limits while it runs (None removes them); queued requests stay.
    pub fn set_throttle(&self, limits: Option<ThrottleLimits>) -> Result<(), DeviceError> {
        self.own_group
            .set_limits(limits.unwrap_or_default())
            .map_err(|source| DeviceError::Throttle {
                disk: self.config.id.clone(),
                source,
            })
    }

    /// The shared throttle group, if any.
    pub fn shared_group(&self) -> Option<ThrottleGroup> {
        lock(&self.group).group.clone()
    }

    /// The disk's live counters (a block job watches the guest's requests in flight).
    pub fn disk_counters(&self) -> &Arc<DiskCounters> {
        &self.counters
    }

    /// The disk's error policy as its block jobs follow it.
    pub fn job_source_errors(&self) -> Arc<dyn block::jobs::SourceErrors> {
        Arc::new(super::io_error::JobSourceErrors(self.shared.clone()))
    }

    /// The disk's error policy and stopped state (see [`super::io_error`]).
    pub fn io_error(&self) -> &IoErrorState {
        &self.shared.io_error
    }

    /// A copy of the disk's counters.
    pub fn counters(&self) -> BlkCounters {
        BlkCounters {
            io: self.counters.snapshot(),
            invalid_requests: self.shared.invalid_requests.load(Ordering::Relaxed),
            signals: self.shared.signals.load(Ordering::Relaxed),
            io_errors: self.shared.io_error.counts(),
            nbd: self.disk().nbd_status(),
        }
    }
}
