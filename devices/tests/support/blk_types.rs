//! The virtio-blk request vocabulary of the test driver: settings, operations,
//! layout options, ids, completions and submission errors, plus the layout of one
//! request's buffer slot.

use std::fmt;

use virtio_bindings::bindings::virtio_blk::{
    VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
};

use super::memory::align_up;
use super::split_ring::DESC_SIZE;
use super::virtqueue::KickMode;

/// The status byte a request starts with, so a device that never writes it shows.
pub const STATUS_UNSET: u8 = 0xff;
/// The byte read buffers are filled with before submission.
pub const READ_POISON: u8 = 0xa5;
/// Bytes of the GET_ID answer.
pub const ID_LEN: u32 = 20;

pub(super) const HDR_OFF: u64 = 0;
pub(super) const STATUS_OFF: u64 = 16;
pub(super) const SEG_OFF: u64 = 32;
pub(super) const TABLE_OFF: u64 = 64;
pub(super) const SEG_ALIGN: u64 = 4096;

/// Driver settings.
#[derive(Clone, Debug)]
pub struct BlkDriverConfig {
    /// Queue size (a power of two).
    pub queue_size: u16,
    /// Whether EVENT_IDX was negotiated.
    pub event_idx: bool,
    /// When kicks are sent.
    pub kick_mode: KickMode,
    /// Requests in flight at most (buffer slots).
    pub max_in_flight: usize,
    /// Largest data transfer of one request.
    pub max_data_bytes: u32,
    /// Most data segments of one request.
    pub max_segments: usize,
    /// Whether the convenience `submit_*` methods use indirect descriptors.
    pub indirect: bool,
}

impl Default for BlkDriverConfig {
    fn default() -> Self {
        BlkDriverConfig {
            queue_size: 128,
            event_idx: true,
            kick_mode: KickMode::Honour,
            max_in_flight: 32,
            max_data_bytes: 128 * 1024,
            max_segments: 16,
            indirect: false,
        }
    }
}

impl BlkDriverConfig {
    fn table_entries(&self) -> u64 {
        // Custom requests may have `max_segments` out and in segments.
        2 * self.max_segments as u64 + 3
    }

    pub(super) fn data_off(&self) -> u64 {
        align_up(TABLE_OFF + self.table_entries() * DESC_SIZE, SEG_ALIGN)
    }

    pub(super) fn slot_stride(&self) -> u64 {
        let data = u64::from(self.max_data_bytes) + 2 * self.max_segments as u64 * SEG_ALIGN;
        align_up(self.data_off() + data, SEG_ALIGN)
    }

    /// Guest memory one driver with these settings allocates (rings and slots).
    pub fn footprint(&self) -> u64 {
        let n = u64::from(self.queue_size);
        let rings = align_up(16 * n, 4096) + align_up(6 + 2 * n, 4096) + align_up(6 + 8 * n, 4096);
        rings + 4096 + self.max_in_flight as u64 * self.slot_stride()
    }
}

/// A request to build.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BlkOp {
    /// VIRTIO_BLK_T_IN of `len` bytes.
    Read {
        /// First sector.
        sector: u64,
        /// Bytes.
        len: u32,
    },
    /// VIRTIO_BLK_T_OUT of `data`.
    Write {
        /// First sector.
        sector: u64,
        /// Bytes to write.
        data: Vec<u8>,
    },
    /// VIRTIO_BLK_T_FLUSH.
    Flush,
    /// VIRTIO_BLK_T_GET_ID (20 bytes in).
    GetId,
    /// VIRTIO_BLK_T_DISCARD of one range.
    Discard {
        /// First sector.
        sector: u64,
        /// Sectors.
        num_sectors: u32,
    },
    /// VIRTIO_BLK_T_WRITE_ZEROES of one range.
    WriteZeroes {
        /// First sector.
        sector: u64,
        /// Sectors.
        num_sectors: u32,
        /// The UNMAP flag.
        unmap: bool,
    },
    /// Any type: header, `out` in readable segments, `in_len` bytes in writable ones.
    Custom {
        /// Request type.
        req_type: u32,
        /// Header sector field.
        sector: u64,
        /// Driver-to-device payload.
        out: Vec<u8>,
        /// Device-to-driver bytes.
        in_len: u32,
    },
}

impl BlkOp {
    pub(super) fn req_type(&self) -> u32 {
        match self {
            BlkOp::Read { .. } => VIRTIO_BLK_T_IN,
            BlkOp::Write { .. } => VIRTIO_BLK_T_OUT,
            BlkOp::Flush => VIRTIO_BLK_T_FLUSH,
            BlkOp::GetId => VIRTIO_BLK_T_GET_ID,
            BlkOp::Discard { .. } => VIRTIO_BLK_T_DISCARD,
            BlkOp::WriteZeroes { .. } => VIRTIO_BLK_T_WRITE_ZEROES,
            BlkOp::Custom { req_type, .. } => *req_type,
        }
    }

    pub(super) fn sector(&self) -> u64 {
        match self {
            BlkOp::Read { sector, .. }
            | BlkOp::Write { sector, .. }
            | BlkOp::Custom { sector, .. } => *sector,
            _ => 0,
        }
    }
}

/// How to lay a request out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReqOptions {
    /// Data segments (each data direction of a request is split into this many).
    pub segments: usize,
    /// Put the chain in an indirect table.
    pub indirect: bool,
}

impl Default for ReqOptions {
    fn default() -> Self {
        ReqOptions {
            segments: 1,
            indirect: false,
        }
    }
}

/// A submitted request's id (unique per driver).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ReqId(pub u64);

/// A completed request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Completion {
    /// The request.
    pub id: ReqId,
    /// Its head descriptor index.
    pub head: u16,
    /// Its type.
    pub req_type: u32,
    /// Its header sector.
    pub sector: u64,
    /// The status byte ([`STATUS_UNSET`] if the device never wrote it).
    pub status: u8,
    /// The used length the device reported.
    pub used_len: u32,
    /// What the device wrote to the data-in segments (reads, GET_ID, custom), in order.
    pub data: Vec<u8>,
}

/// Why a request could not be submitted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SubmitError {
    /// No free buffer slot or too few free descriptors: reap completions first.
    QueueFull,
    /// The request exceeds the driver's configured limits.
    TooLarge,
    /// Zero segments, or more segments than data bytes.
    BadSegments,
}

impl fmt::Display for SubmitError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SubmitError::QueueFull => "queue full",
            SubmitError::TooLarge => "request larger than the driver's limits",
            SubmitError::BadSegments => "bad segment count",
        })
    }
}

impl std::error::Error for SubmitError {}
