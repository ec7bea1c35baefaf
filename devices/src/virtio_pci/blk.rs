//! virtio-blk as a [`VirtioDevice`]: activation turns the driver's queues into
//! [`QueueWorker`]s for iothreads; reset drains them.

use std::sync::Arc;

use super::{ActivatedQueue, VirtioDevice, VirtioPciError};
use crate::virtio_blk::GuestMem;
use crate::virtio_blk::config_space::CONFIG_SPACE_SIZE;
use crate::virtio_blk::device::BlkDevice;
use crate::virtio_blk::worker::{LocalQueue, QueueWorker};

/// virtio device type of block devices.
pub const VIRTIO_ID_BLOCK: u16 = 2;
/// Requests submitted per syscall until the iothread sets its own `aio_max_batch`.
const DEFAULT_MAX_BATCH: u32 = 32;

/// Where a disk's workers go when the driver starts the device (the VMM hands them to
/// iothreads), and how they come back when it resets.
pub trait BlkQueueSink: Send {
    /// Starts serving `workers` (one per enabled queue).
    fn start(&mut self, workers: Vec<QueueWorker<LocalQueue>>) -> std::io::Result<()>;
    /// Stops serving the disk's queues once their in-flight requests are complete.
    fn stop(&mut self);
}

/// A virtio-blk device for the PCI transport.
pub struct VirtioBlk {
    device: Arc<BlkDevice>,
    sink: Option<Box<dyn BlkQueueSink>>,
    workers: Vec<QueueWorker<LocalQueue>>,
}

impl VirtioBlk {
    /// A device that keeps its workers (see [`VirtioBlk::workers_mut`]); for tests and
    /// callers that poll the queues themselves.
    pub fn new(device: Arc<BlkDevice>) -> Self {
        VirtioBlk {
            device,
            sink: None,
            workers: Vec::new(),
        }
    }

    /// A device whose workers go to `sink` at activation.
    pub fn with_sink(device: Arc<BlkDevice>, sink: Box<dyn BlkQueueSink>) -> Self {
        VirtioBlk {
            device,
            sink: Some(sink),
            workers: Vec::new(),
        }
    }

    /// The disk.
    pub fn blk(&self) -> &Arc<BlkDevice> {
        &self.device
    }

    /// The workers kept since activation (empty with a sink).
    pub fn workers_mut(&mut self) -> &mut Vec<QueueWorker<LocalQueue>> {
        &mut self.workers
    }
}

impl VirtioDevice for VirtioBlk {
    fn device_type(&self) -> u16 {
        VIRTIO_ID_BLOCK
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        let c = self.device.config();
        vec![c.queue_size; usize::from(c.num_queues)]
    }

    fn features(&self) -> u64 {
        self.device.features()
    }

    #[allow(clippy::cast_possible_truncation)] // 96 bytes
    fn config_len(&self) -> u32 {
        CONFIG_SPACE_SIZE as u32
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        self.device.read_config(offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        self.device.write_config(offset, data);
    }

    fn activate(
        &mut self,
        mem: GuestMem,
        features: u64,
        queues: Vec<ActivatedQueue>,
    ) -> Result<(), VirtioPciError> {
        self.device.set_driver_features(features);
        let mut workers = Vec::with_capacity(queues.len());
        for q in queues {
            let host = LocalQueue {
                queue: q.queue,
                kick: q.kick,
                call: q.call,
            };
            let worker = self
                .device
                .new_worker(q.index, host, mem.clone(), DEFAULT_MAX_BATCH)
                .map_err(|e| VirtioPciError::Activate(e.to_string()))?;
            workers.push(worker);
        }
        match self.sink.as_mut() {
            Some(sink) => sink
                .start(workers)
                .map_err(|e| VirtioPciError::Activate(e.to_string())),
            None => {
                self.workers = workers;
                Ok(())
            }
        }
    }

    fn reset(&mut self) {
        if let Some(sink) = self.sink.as_mut() {
            sink.stop();
        }
        // Dropping a worker drains it.
        self.workers.clear();
    }
}
