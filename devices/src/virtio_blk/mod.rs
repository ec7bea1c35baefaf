//! The virtio-blk device model (virtio 1.2 section 5.2).
//!
//! - [`request`]: turns a descriptor chain into a validated [`request::Request`] (or a
//!   status for the guest), never trusting anything the guest wrote.
//! - [`config_space`]: feature bits and the device configuration layout.
//! - [`device`]: a disk assembled from its settings, making the workers of its queues.
//! - [`worker`]: one virtqueue's processing: pop, validate, throttle, hand to the block
//!   layer, complete, signal. The same worker serves KVM (ioeventfd/irqfd) and
//!   vhost-user frontends (eventfds from the frontend).

pub mod config_space;
pub mod device;
pub mod io_error;
pub mod request;
pub mod worker;

use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

/// Guest memory as every part of the data plane sees it: an RCU handle (vhost-user may
/// replace the memory map at any time) over mmap'ed regions without dirty tracking.
pub type GuestMem = GuestMemoryAtomic<GuestMemoryMmap<()>>;

/// One snapshot of the guest memory map.
pub type GuestMemMmap = GuestMemoryMmap<()>;

/// virtio-blk status byte values.
pub mod status {
    /// Success.
    pub const OK: u8 = 0;
    /// Device or driver error.
    pub const IOERR: u8 = 1;
    /// Request type not supported.
    pub const UNSUPP: u8 = 2;
}

/// Bytes of the serial returned by GET_ID.
pub const ID_BYTES: usize = 20;

/// The guest-visible sector size.
pub const SECTOR_SIZE: u64 = 512;
