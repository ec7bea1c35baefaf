//! virtio devices and the iothreads that serve them. Knows virtio, not KVM.
//!
//! The device core lands with issue 3; this crate already pins the virtio crates of the
//! rust-vmm generation the workspace uses.

pub use block;
