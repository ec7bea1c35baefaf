//! The common configuration structure (virtio 1.2 section 4.1.4.3): feature windows,
//! device status, queue selection and queue setup.

use virtio_queue::{Queue, QueueT};

use super::{NO_VECTOR, VIRTIO_F_VERSION_1, status};

/// Fields as (offset, size).
const FIELDS: [(u64, u64); 18] = [
    (0x00, 4), // device_feature_select
    (0x04, 4), // device_feature
    (0x08, 4), // driver_feature_select
    (0x0c, 4), // driver_feature
    (0x10, 2), // config_msix_vector
    (0x12, 2), // num_queues
    (0x14, 1), // device_status
    (0x15, 1), // config_generation
    (0x16, 2), // queue_select
    (0x18, 2), // queue_size
    (0x1a, 2), // queue_msix_vector
    (0x1c, 2), // queue_enable
    (0x1e, 2), // queue_notify_off
    (0x20, 8), // queue_desc
    (0x28, 8), // queue_driver
    (0x30, 8), // queue_device
    (0x38, 2), // queue_notify_data
    (0x3a, 2), // queue_reset
];

/// Bytes of the common configuration.
pub(super) const COMMON_LEN: u64 = 0x3c;

/// What a write asks the transport to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Action {
    None,
    /// Status 0 was written.
    Reset,
    /// DRIVER_OK was set.
    Activate,
}

/// The common configuration state.
pub(super) struct CommonConfig {
    pub device_features: u64,
    pub device_feature_select: u32,
    pub driver_feature_select: u32,
    pub driver_features: u64,
    pub config_msix_vector: u16,
    pub status: u8,
    pub config_generation: u8,
    pub queue_select: u16,
    pub queues: Vec<Queue>,
    pub queue_vectors: Vec<u16>,
    pub num_vectors: u16,
}

impl CommonConfig {
    pub fn new(device_features: u64, queues: Vec<Queue>, num_vectors: u16) -> Self {
        let n = queues.len();
        CommonConfig {
            device_features,
            device_feature_select: 0,
            driver_feature_select: 0,
            driver_features: 0,
            config_msix_vector: NO_VECTOR,
            status: 0,
            config_generation: 0,
            queue_select: 0,
            queues,
            queue_vectors: vec![NO_VECTOR; n],
            num_vectors,
        }
    }

    /// Back to the state after power-on (the device reset).
    pub fn reset(&mut self) {
        self.device_feature_select = 0;
        self.driver_feature_select = 0;
        self.driver_features = 0;
        self.config_msix_vector = NO_VECTOR;
        self.status = 0;
        self.queue_select = 0;
        self.queues.iter_mut().for_each(QueueT::reset);
        self.queue_vectors.fill(NO_VECTOR);
    }

    fn field_of(offset: u64, len: u64) -> Option<(u64, u64)> {
        FIELDS
            .iter()
            .copied()
            .find(|&(start, size)| offset >= start && offset < start + size)
            .filter(|&(start, size)| offset + len <= start + size)
    }

    fn selected(&self) -> Option<usize> {
        let i = usize::from(self.queue_select);
        (i < self.queues.len()).then_some(i)
    }

    fn vector_or_none(&self, v: u16) -> u16 {
        if v < self.num_vectors { v } else { NO_VECTOR }
    }

    fn read_field(&self, start: u64) -> u64 {
        let q = self.selected();
        let queue = q.map(|i| &self.queues[i]);
        let window = |value: u64, select: u32| match select {
            0 => value & 0xffff_ffff,
            1 => value >> 32,
            _ => 0,
        };
        match start {
            0x00 => u64::from(self.device_feature_select),
            0x04 => window(self.device_features, self.device_feature_select),
            0x08 => u64::from(self.driver_feature_select),
            0x0c => window(self.driver_features, self.driver_feature_select),
            0x10 => u64::from(self.config_msix_vector),
            0x12 => self.queues.len() as u64,
            0x14 => u64::from(self.status),
            0x15 => u64::from(self.config_generation),
            0x16 => u64::from(self.queue_select),
            0x18 => queue.map_or(0, |q| u64::from(q.size())),
            0x1a => q.map_or(u64::from(NO_VECTOR), |i| u64::from(self.queue_vectors[i])),
            0x1c => queue.map_or(0, |q| u64::from(q.ready())),
            0x1e => q.map_or(0, |i| i as u64),
            0x20 => queue.map_or(0, QueueT::desc_table),
            0x28 => queue.map_or(0, QueueT::avail_ring),
            0x30 => queue.map_or(0, QueueT::used_ring),
            _ => 0,
        }
    }

    /// Reads `data.len()` bytes at `offset`: an access must sit inside one field
    /// (otherwise it reads as zero).
    pub fn read(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let len = data.len() as u64;
        if let Some((start, _)) = Self::field_of(offset, len)
            && let Ok(from) = usize::try_from(offset - start)
        {
            let bytes = self.read_field(start).to_le_bytes();
            data.copy_from_slice(&bytes[from..from + data.len()]);
        }
    }

    /// Writes at `offset` (inside one field; partial writes of a field merge with its
    /// current value).
    pub fn write(&mut self, offset: u64, data: &[u8]) -> Action {
        let len = data.len() as u64;
        let Some((start, _)) = Self::field_of(offset, len) else {
            return Action::None;
        };
        // Inside one field of at most 8 bytes.
        let Ok(from) = usize::try_from(offset - start) else {
            return Action::None;
        };
        let mut bytes = self.read_field(start).to_le_bytes();
        bytes[from..from + data.len()].copy_from_slice(data);
        self.write_field(start, u64::from_le_bytes(bytes))
    }

    // `value` is the field at `start` merged with the write, and `field_of` keeps a write
    // inside one field, so each arm's cast to the field's width drops only zero bits (the
    // 64-bit addresses are split into halves on purpose).
    #[allow(clippy::cast_possible_truncation)]
    fn write_field(&mut self, start: u64, value: u64) -> Action {
        let q = self.selected();
        // Queue setup is fixed once the queue is enabled or the driver is running.
        let setup_open =
            |s: &Self, i: usize| !s.queues[i].ready() && s.status & status::DRIVER_OK == 0;
        match start {
            0x00 => self.device_feature_select = value as u32,
            0x08 => self.driver_feature_select = value as u32,
            0x0c if self.status & status::FEATURES_OK == 0 => {
                let v = value & 0xffff_ffff;
                match self.driver_feature_select {
                    0 => self.driver_features = (self.driver_features & !0xffff_ffff) | v,
                    1 => self.driver_features = (self.driver_features & 0xffff_ffff) | v << 32,
                    _ => {}
                }
            }
            0x10 => self.config_msix_vector = self.vector_or_none(value as u16),
            0x14 => return self.write_status(value as u8),
            0x16 => self.queue_select = value as u16,
            0x18 => {
                if let Some(i) = q.filter(|&i| setup_open(self, i)) {
                    // virtio-queue ignores sizes that are not a power of two up to max.
                    self.queues[i].set_size(value as u16);
                }
            }
            0x1a => {
                if let Some(i) = q {
                    self.queue_vectors[i] = self.vector_or_none(value as u16);
                }
            }
            0x1c => {
                if let Some(i) = q.filter(|&i| setup_open(self, i))
                    && value == 1
                {
                    self.queues[i].set_ready(true);
                }
            }
            0x20 | 0x28 | 0x30 => {
                if let Some(i) = q.filter(|&i| setup_open(self, i)) {
                    let (lo, hi) = (Some(value as u32), Some((value >> 32) as u32));
                    let queue = &mut self.queues[i];
                    match start {
                        0x20 => queue.set_desc_table_address(lo, hi),
                        0x28 => queue.set_avail_ring_address(lo, hi),
                        _ => queue.set_used_ring_address(lo, hi),
                    }
                }
            }
            _ => {}
        }
        Action::None
    }

    fn write_status(&mut self, value: u8) -> Action {
        if value == 0 {
            return Action::Reset;
        }
        let old = self.status;
        let mut new = old | value;
        if new & status::FEATURES_OK != 0 && old & status::FEATURES_OK == 0 {
            let unoffered = self.driver_features & !self.device_features != 0;
            let legacy = self.driver_features & VIRTIO_F_VERSION_1 == 0;
            if unoffered || legacy {
                tracing::warn!(
                    driver = self.driver_features,
                    device = self.device_features,
                    "feature negotiation failed"
                );
                new &= !status::FEATURES_OK;
            }
        }
        if new & status::DRIVER_OK != 0 && new & status::FEATURES_OK == 0 {
            new &= !status::DRIVER_OK;
        }
        self.status = new;
        if new & status::DRIVER_OK != 0 && old & status::DRIVER_OK == 0 {
            Action::Activate
        } else {
            Action::None
        }
    }
}
