//! Storage for VM disks: images and host block devices, native asynchronous I/O engines
//! (io_uring, Linux AIO, a thread pool), QEMU's cache modes, throttling and counters.
//!
//! This crate knows files and I/O, not virtio and not KVM. The device layer owns one
//! [`DiskQueue`] per virtqueue: it queues requests whose buffers point into guest memory,
//! submits them in one batch per pass, and reaps completions when the queue's
//! [`DiskQueue::completion_fd`] becomes readable.

pub mod bounce;
pub mod cache;
pub mod counters;
pub mod disk;
pub mod engine;
mod error;
pub mod host_file;
pub mod jobs;
pub mod nbd;
pub mod qcow2;
pub mod queue;
pub mod sync;
pub mod thread_class;
pub mod throttle;
pub mod utc;

pub use cache::CacheMode;
pub use counters::{CountersSnapshot, DiskCounters};
pub use disk::{BackendKind, Disk, DiskOptions};
pub use engine::{AioKind, EngineOptions, IoEngine};
pub use error::Error;
pub use qcow2::ImageFormat;
pub use queue::{Completion, DiskQueue, RequestKind};
