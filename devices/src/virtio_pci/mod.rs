//! The modern virtio-pci transport (virtio 1.2 section 4.1) for any [`VirtioDevice`].
//!
//! One 64-bit memory BAR holds the common configuration, the ISR, the device
//! configuration, one notify address per queue (multiplier 4) and the MSI-X table and
//! PBA. The transport knows no KVM: it tells a [`VirtioPciHost`] where each queue's
//! notify address lives (to register an ioeventfd on the queue's kick eventfd) and what
//! each MSI-X vector's message is (to route the vector's eventfd as an irqfd), and it
//! re-registers when the guest moves the BAR.
//!
//! - `transport`: [`VirtioPciDevice`], a [`crate::pci::PciDevice`].
//! - `blk`: [`VirtioBlk`], virtio-blk as a [`VirtioDevice`].

mod blk;
mod common;
mod msix;
mod transport;

#[cfg(test)]
mod tests;

use std::io;

pub use blk::{BlkQueueSink, VIRTIO_ID_BLOCK, VirtioBlk};
pub use transport::{BAR_SIZE, Layout, VirtioPciDevice};
use virtio_queue::Queue;
use vmm_sys_util::eventfd::EventFd;

use crate::virtio_blk::GuestMem;

/// Device status bits (virtio 1.2 section 2.1).
pub mod status {
    /// The guest found the device.
    pub const ACKNOWLEDGE: u8 = 1;
    /// The guest has a driver for it.
    pub const DRIVER: u8 = 2;
    /// The driver is ready to drive it.
    pub const DRIVER_OK: u8 = 4;
    /// Feature negotiation is complete.
    pub const FEATURES_OK: u8 = 8;
    /// The device hit an error it cannot recover from.
    pub const DEVICE_NEEDS_RESET: u8 = 64;
    /// The driver gave up.
    pub const FAILED: u8 = 128;
}

/// "No MSI-X vector" in the vector registers.
pub const NO_VECTOR: u16 = 0xffff;
/// The feature bit every modern device offers and every driver must accept.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
/// The driver and device use event index notification suppression.
pub const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << 29;
/// PCI vendor ID of virtio devices.
pub const VIRTIO_PCI_VENDOR: u16 = 0x1af4;
/// Modern device IDs are this plus the virtio device type.
pub const VIRTIO_PCI_DEVICE_BASE: u16 = 0x1040;

/// Errors of the transport.
#[derive(Debug, thiserror::Error)]
pub enum VirtioPciError {
    /// The device model is unusable (no queues, a bad queue size, too many queues).
    #[error("invalid device: {0}")]
    InvalidDevice(String),
    /// Building the PCI function failed.
    #[error(transparent)]
    Pci(#[from] crate::pci::PciError),
    /// An eventfd could not be made, or the host refused a registration.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// What the kernel or the host said.
        #[source]
        source: io::Error,
    },
    /// The device could not start its queues.
    #[error("activation failed: {0}")]
    Activate(String),
}

/// An MSI message: where and what the device writes to interrupt.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MsiMessage {
    /// Message address.
    pub addr: u64,
    /// Message data.
    pub data: u32,
}

/// What the transport needs from the VMM. Under KVM: ioeventfds, and irqfds bound to
/// MSI routes.
pub trait VirtioPciHost: Send + Sync {
    /// Writes to guest-physical `addr` (any width) must signal `fd` (queue `queue`'s kick).
    fn register_notify(&self, addr: u64, queue: u16, fd: &EventFd) -> io::Result<()>;
    /// Undoes [`VirtioPciHost::register_notify`].
    fn unregister_notify(&self, addr: u64, queue: u16, fd: &EventFd) -> io::Result<()>;
    /// MSI-X `vector`, signalled through `fd`, now delivers `msg`; `None` means masked or
    /// disabled: stop consuming `fd`, and deliver what it holds when a message is set
    /// again (KVM does when an irqfd is assigned to an already signalled eventfd).
    fn set_msix_vector(&self, vector: u16, fd: &EventFd, msg: Option<MsiMessage>)
    -> io::Result<()>;
}

/// One queue handed to the device at DRIVER_OK.
pub struct ActivatedQueue {
    /// Queue index.
    pub index: u16,
    /// The virtqueue as the driver set it up (EVENT_IDX set per the negotiated features).
    pub queue: Queue,
    /// Signalled when the driver notifies the queue (a duplicate of the transport's fd).
    pub kick: EventFd,
    /// Write to interrupt the driver (the queue's MSI-X vector, or an unrouted eventfd
    /// when the driver asked for no vector).
    pub call: EventFd,
}

/// A device model the transport can carry.
pub trait VirtioDevice: Send {
    /// virtio device type (2 = block).
    fn device_type(&self) -> u16;
    /// The most entries of each queue; the length is the queue count.
    fn queue_max_sizes(&self) -> Vec<u16>;
    /// Feature bits offered (VERSION_1 included).
    fn features(&self) -> u64;
    /// Bytes of the device configuration.
    fn config_len(&self) -> u32;
    /// Reads the device configuration (out-of-range bytes read as zero).
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes the device configuration (read-only bytes are ignored).
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// The driver set DRIVER_OK: start serving the enabled queues with the negotiated
    /// `features`.
    fn activate(
        &mut self,
        mem: GuestMem,
        features: u64,
        queues: Vec<ActivatedQueue>,
    ) -> Result<(), VirtioPciError>;
    /// The driver reset the device: stop serving queues once in-flight requests are done.
    fn reset(&mut self);
}
