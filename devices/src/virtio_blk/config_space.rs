//! virtio-blk feature bits and the device configuration space (virtio 1.2 section 5.2.3
//! and 5.2.4): the 96-byte `virtio_blk_config`, little endian.

use virtio_bindings::bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_CONFIG_WCE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH,
    VIRTIO_BLK_F_MQ, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_SIZE_MAX,
    VIRTIO_BLK_F_TOPOLOGY, VIRTIO_BLK_F_WRITE_ZEROES, virtio_blk_config,
};
use virtio_bindings::bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::bindings::virtio_ring::{
    VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};
use vm_memory::ByteValued;

use super::SECTOR_SIZE;

/// [`SECTOR_SIZE`] as the u32 of the block-size fields.
#[allow(clippy::cast_possible_truncation)] // 512 fits
const SECTOR_SIZE_U32: u32 = SECTOR_SIZE as u32;
use super::request::Limits;

#[cfg(test)]
mod tests;

/// Size of the configuration space in bytes.
pub const CONFIG_SPACE_SIZE: usize = std::mem::size_of::<virtio_blk_config>();

/// Offset of the `wce` (writeback cache enable) byte.
pub const WCE_OFFSET: u64 = std::mem::offset_of!(virtio_blk_config, wce) as u64;

/// The device feature bits: VERSION_1, RING_EVENT_IDX, RING_INDIRECT_DESC, SEG_MAX,
/// SIZE_MAX, BLK_SIZE, TOPOLOGY, FLUSH, CONFIG_WCE and MQ always; RO when `readonly`;
/// DISCARD and WRITE_ZEROES when enabled on a writable disk. MQ is offered even for one
/// queue: `num_queues` (which goes into the config space) then says 1.
pub fn device_features(readonly: bool, num_queues: u16, discard: bool, write_zeroes: bool) -> u64 {
    // Every queue count is announced through MQ and the config's num_queues.
    let _ = num_queues;
    let mut features = [
        VIRTIO_F_VERSION_1,
        VIRTIO_RING_F_EVENT_IDX,
        VIRTIO_RING_F_INDIRECT_DESC,
        VIRTIO_BLK_F_SEG_MAX,
        VIRTIO_BLK_F_SIZE_MAX,
        VIRTIO_BLK_F_BLK_SIZE,
        VIRTIO_BLK_F_TOPOLOGY,
        VIRTIO_BLK_F_FLUSH,
        VIRTIO_BLK_F_CONFIG_WCE,
        VIRTIO_BLK_F_MQ,
    ]
    .iter()
    .fold(0u64, |acc, bit| acc | 1u64 << bit);
    if readonly {
        features |= 1u64 << VIRTIO_BLK_F_RO;
    } else {
        if discard {
            features |= 1u64 << VIRTIO_BLK_F_DISCARD;
        }
        if write_zeroes {
            features |= 1u64 << VIRTIO_BLK_F_WRITE_ZEROES;
        }
    }
    features
}

/// What the configuration space is built from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConfigParams {
    /// Disk size in bytes (rounded down to 512-byte sectors).
    pub capacity_bytes: u64,
    /// Logical block size in bytes (`blk_size`; at least 512, a power of two).
    pub logical_block_size: u32,
    /// Physical block size in bytes (gives `physical_block_exp`).
    pub physical_block_size: u32,
    /// Most data segments per request.
    pub seg_max: u32,
    /// Largest data segment in bytes.
    pub size_max: u32,
    /// Number of request queues.
    pub num_queues: u16,
    /// The write cache starts enabled (`wce` = 1).
    pub writeback: bool,
    /// Largest discard in sectors (0 when discard is not offered).
    pub max_discard_sectors: u32,
    /// Largest write-zeroes in sectors (0 when write-zeroes is not offered).
    pub max_write_zeroes_sectors: u32,
    /// Write-zeroes with the UNMAP flag may deallocate (`write_zeroes_may_unmap`).
    pub write_zeroes_may_unmap: bool,
}

/// `virtio_blk_config` as plain bytes.
#[derive(Clone, Copy, Debug, Default)]
#[repr(transparent)]
struct RawConfig(virtio_blk_config);

// SAFETY: virtio_blk_config is repr(C, packed) and made only of integers and arrays of
// integers, so it has no padding and every bit pattern is a valid value.
unsafe impl ByteValued for RawConfig {}

/// The virtio-blk configuration space of one disk. Multi-byte fields are stored little
/// endian, as the guest reads them.
#[derive(Clone, Copy, Debug)]
pub struct ConfigSpace {
    raw: RawConfig,
}

impl ConfigSpace {
    /// Builds the configuration space: discard and write-zeroes take one segment each,
    /// `discard_sector_alignment` and `min_io_size` are the logical block in sectors,
    /// `physical_block_exp` is log2(physical / logical), `opt_io_size` is 0.
    pub fn new(params: &ConfigParams) -> Self {
        let logical = params.logical_block_size.max(SECTOR_SIZE_U32);
        let logical_sectors = logical.checked_div(SECTOR_SIZE_U32).unwrap_or(1);
        let physical_exp = match params.physical_block_size.checked_div(logical) {
            // At most 31.
            Some(ratio) if ratio.is_power_of_two() => {
                u8::try_from(ratio.trailing_zeros()).unwrap_or(0)
            }
            _ => 0,
        };
        let cfg = virtio_blk_config {
            capacity: (params.capacity_bytes / SECTOR_SIZE).to_le(),
            size_max: params.size_max.to_le(),
            seg_max: params.seg_max.to_le(),
            blk_size: logical.to_le(),
            physical_block_exp: physical_exp,
            alignment_offset: 0,
            min_io_size: u16::try_from(logical_sectors).unwrap_or(u16::MAX).to_le(),
            opt_io_size: 0,
            wce: u8::from(params.writeback),
            num_queues: params.num_queues.to_le(),
            max_discard_sectors: params.max_discard_sectors.to_le(),
            max_discard_seg: 1u32.to_le(),
            discard_sector_alignment: logical_sectors.to_le(),
            max_write_zeroes_sectors: params.max_write_zeroes_sectors.to_le(),
            max_write_zeroes_seg: 1u32.to_le(),
            write_zeroes_may_unmap: u8::from(params.write_zeroes_may_unmap),
            ..Default::default()
        };
        ConfigSpace {
            raw: RawConfig(cfg),
        }
    }

    /// The configuration space bytes (for the layout tests).
    #[cfg(test)]
    fn as_bytes(&self) -> Vec<u8> {
        self.raw.as_slice().to_vec()
    }

    /// Reads `data.len()` bytes from `offset`; bytes past the end read as zero.
    pub fn read(&self, offset: u64, data: &mut [u8]) {
        let bytes = self.raw.as_slice();
        let start = usize::try_from(offset).map_or(bytes.len(), |o| o.min(bytes.len()));
        let src = bytes.get(start..).unwrap_or(&[]);
        let n = src.len().min(data.len());
        let (head, tail) = data.split_at_mut(n);
        head.copy_from_slice(src.get(..n).unwrap_or(&[]));
        tail.fill(0);
    }

    /// A driver write: only a 1-byte write to `wce` is accepted; it returns the new
    /// writeback setting. Everything else is ignored (None).
    pub fn write(&mut self, offset: u64, data: &[u8]) -> Option<bool> {
        match data {
            [value] if offset == WCE_OFFSET => {
                let writeback = *value != 0;
                self.raw.0.wce = u8::from(writeback);
                Some(writeback)
            }
            _ => None,
        }
    }

    /// Whether the write cache is enabled (`wce`).
    pub fn writeback(&self) -> bool {
        self.raw.0.wce != 0
    }

    /// Disk size in 512-byte sectors.
    pub fn capacity_sectors(&self) -> u64 {
        u64::from_le(self.raw.0.capacity)
    }

    /// What the request parser accepts for this configuration. DISCARD and WRITE_ZEROES
    /// count as offered only on a writable disk, as in [`device_features`].
    pub fn limits(&self, readonly: bool, discard: bool, write_zeroes: bool) -> Limits {
        let cfg = self.raw.0;
        Limits {
            capacity_sectors: u64::from_le(cfg.capacity),
            seg_max: u32::from_le(cfg.seg_max),
            size_max: u32::from_le(cfg.size_max),
            readonly,
            discard: discard && !readonly,
            write_zeroes: write_zeroes && !readonly,
            max_discard_sectors: u32::from_le(cfg.max_discard_sectors),
            max_write_zeroes_sectors: u32::from_le(cfg.max_write_zeroes_sectors),
        }
    }
}
