//! The virtio-blk device served to a vhost-user frontend (QEMU `vhost-user-blk-pci`,
//! Cloud Hypervisor, libblkio's `virtio-blk-vhost-user`), with the same data plane as
//! under KVM: every queue is a [`crate::virtio_blk::worker::QueueWorker`] over the
//! frontend's vring ([`VringHost`]).
//!
//! - [`Backend`]: implements `VhostUserBackend` over a
//!   [`BlkDevice`](crate::virtio_blk::device::BlkDevice) (disk, features, config space,
//!   throttle, counters, workers). Its iothreads are the library's vring
//!   worker threads: queues are grouped by iothread (`iothread`, `iothread_vq_mapping`,
//!   or one dedicated thread for the disk), and each thread's epoll also watches its
//!   workers' completion, throttle-timer and throttle-turn eventfds. Adaptive polling
//!   runs at the end of every event.
//! - [`serve`]: the accept loop, a new daemon per frontend connection (reconnect), stopped
//!   by an eventfd; in-flight requests are drained before a session ends.
//! - [`BackendCounters`]: per-disk and per-iothread counters, shaped as `vm.counters`.

mod backend;
mod host;
mod io_error;
mod jobs;
mod serve;
mod threads;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

pub use backend::Backend;
pub use host::VringHost;
pub use serve::{bind, serve};

use crate::config::{DiskConfig, IoThreadConfig};
use crate::iothread::IoThreadCounters;
use crate::virtio_blk::device::BlkCounters;

/// What one `vhost-user-blk` process serves: one disk and the iothreads it names.
#[derive(Clone, Debug, PartialEq)]
pub struct BackendConfig {
    /// The disk.
    pub disk: DiskConfig,
    /// Named iothreads. A disk that names none gets a dedicated one, except that a sole
    /// declared iothread is used by a disk naming none (the one-disk shorthand).
    pub iothreads: Vec<IoThreadConfig>,
}

/// One iothread of a backend: its settings and the disk queues it serves.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ThreadPlan {
    /// Settings (a dedicated thread gets defaults and the id `<disk>-iothread`).
    pub config: IoThreadConfig,
    /// Queue indexes, ascending.
    pub queues: Vec<u16>,
}

impl BackendConfig {
    /// Checks the disk, the iothreads, and that every iothread the disk names exists.
    pub fn validate(&self) -> Result<(), String> {
        self.disk.validate()?;
        for (i, t) in self.iothreads.iter().enumerate() {
            t.validate()?;
            if self.iothreads[..i].iter().any(|o| o.id == t.id) {
                return Err(format!("iothread {} is declared twice", t.id));
            }
        }
        if self.disk.throttle_group.is_some() {
            return Err(format!(
                "disk {}: throttle_group needs the VM's throttle_groups; the standalone backend takes throttle.<limit>=N",
                self.disk.id
            ));
        }
        for name in self.disk.queue_iothreads().into_iter().flatten() {
            if !self.iothreads.iter().any(|t| t.id == name) {
                return Err(format!(
                    "disk {}: iothread {name} is not declared (add --iothread id={name})",
                    self.disk.id
                ));
            }
        }
        if self.disk.iothread.is_none()
            && self.disk.iothread_vq_mapping.is_none()
            && self.iothreads.len() > 1
        {
            return Err(format!(
                "disk {}: several iothreads are declared; name one with iothread= or iothread_vq_mapping",
                self.disk.id
            ));
        }
        Ok(())
    }

    /// The iothreads that serve the disk, in the order of their first queue.
    pub fn thread_plan(&self) -> Vec<ThreadPlan> {
        let mut names = self.disk.queue_iothreads();
        if self.disk.iothread.is_none()
            && self.disk.iothread_vq_mapping.is_none()
            && let [only] = self.iothreads.as_slice()
        {
            names.iter_mut().for_each(|n| *n = Some(only.id.clone()));
        }
        let mut plan: Vec<ThreadPlan> = Vec::new();
        for (q, name) in names.into_iter().enumerate() {
            let config = match name {
                Some(name) => self
                    .iothreads
                    .iter()
                    .find(|t| t.id == name)
                    .cloned()
                    .unwrap_or_else(|| IoThreadConfig::new(name)),
                None => IoThreadConfig::new(format!("{}-iothread", self.disk.id)),
            };
            let q = u16::try_from(q).unwrap_or(u16::MAX);
            match plan.iter_mut().find(|p| p.config.id == config.id) {
                Some(p) => p.queues.push(q),
                None => plan.push(ThreadPlan {
                    config,
                    queues: vec![q],
                }),
            }
        }
        plan
    }
}

/// Everything a backend counts, as the `--counters` file shows it. `disks` and
/// `iothreads` have the shape and types of `vm.counters` (entries keyed by id, one
/// [`BlkCounters`] per disk, one [`IoThreadCounters`] per iothread), so one reader parses
/// both; the other fields exist only here.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackendCounters {
    /// The disk served, by id (one entry).
    pub disks: BTreeMap<String, BlkCounters>,
    /// Its iothreads, by id.
    pub iothreads: BTreeMap<String, IoThreadCounters>,
    /// The virtqueues each iothread serves, by iothread id.
    pub iothread_queues: BTreeMap<String, Vec<u16>>,
    /// Frontend connections served so far (including the current one).
    pub sessions: u64,
}

#[cfg(test)]
mod tests;
