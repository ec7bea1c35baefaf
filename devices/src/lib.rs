//! virtio devices and the iothreads that serve them. Knows virtio, not KVM.
//!
//! - [`virtio_blk`]: the virtio-blk device model: request parsing, config space, and the
//!   per-queue worker that turns descriptor chains into block I/O.
//! - [`iothread`]: the I/O threads: one epoll loop over the kick, completion, throttle and
//!   control eventfds of the queues assigned to it, with adaptive polling.
//! - [`vhost_user_blk`]: the same device served to a vhost-user frontend.
//! - [`config`]: the JSON settings of disks and iothreads.

pub mod config;
pub mod iothread;
pub mod mirror;
pub mod pci;
pub mod vhost_user_blk;
pub mod virtio_blk;
pub mod virtio_pci;

pub use block;
