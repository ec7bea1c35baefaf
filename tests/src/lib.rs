//! Shared helpers of the process-level tests and benchmarks.

pub mod bench;
pub mod blkio_load;
pub mod contender;
pub mod fio;
pub mod image;
pub mod latency;
pub mod linux_guest;
pub mod nbd_server;
pub mod procfs;
pub mod skip;
pub mod test_guest;
pub mod tmpfs;
pub mod vmlinux;
