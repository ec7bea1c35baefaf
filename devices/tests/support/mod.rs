//! A test-side virtio driver: what a guest does, written in Rust, over memfd-backed
//! guest memory shared with the device under test.
//!
//! - [`memory`]: [`TestMemory`], the memfd-backed guest memory (as the data plane's
//!   `GuestMem`) with a bump allocator.
//! - [`split_ring`]: the split virtqueue layout with raw access to every field
//!   (hostile tests write arbitrary descriptors and avail entries here).
//! - [`virtqueue`]: [`VirtqDriver`], one queue's driver: descriptor free list,
//!   publishing, kick suppression, used polling, interrupts with EVENT_IDX.
//! - [`blk`]: [`BlkDriver`], virtio-blk requests on top, tracked to completion;
//!   [`blk_types`]: its settings, operations and completions.
//! - [`device_side`]: a minimal device-side view (pop a chain, complete it) for
//!   checking what the driver built.
//!
//! Typical use against the device core:
//!
//! ```ignore
//! let cfg = BlkDriverConfig::default();
//! let mem = TestMemory::new(8 * cfg.footprint())?;
//! let mut drv = BlkDriver::new(&mem, cfg)?;
//! let local = drv.local_queue()?; // the queue plus dups of the kick and call eventfds
//! // ... hand `mem.guest_mem()` and `local` to the device ...
//! drv.submit_write(8, &data, 2)?;
//! drv.kick()?;
//! let done = drv.drain(Duration::from_secs(5))?;
//! ```

// Each test binary that says `mod support;` uses a different part of it.
#![allow(dead_code, unused_imports)]

pub mod blk;
pub mod blk_types;
pub mod device_side;
pub mod memory;
pub mod split_ring;
pub mod virtqueue;

pub use blk::BlkDriver;
pub use blk_types::{
    BlkDriverConfig, BlkOp, Completion, ID_LEN, READ_POISON, ReqId, ReqOptions, STATUS_UNSET,
    SubmitError,
};
pub use memory::{RegionInfo, TestMemory, align_up};
pub use split_ring::{DESC_SIZE, Desc, F_INDIRECT, F_NEXT, F_WRITE, SplitRing, need_event};
pub use virtqueue::{Buf, DriverStats, KickMode, UsedElem, VirtqDriver};
