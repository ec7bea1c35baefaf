//! Block jobs (ARCHITECTURE.md section 4b): what a live disk mirror is made of, below
//! virtio. [`dirty`] tracks the chunks guest writes touched while a job runs (a
//! [`crate::DiskQueue`] marks it as its writes finish); [`speed`] paces the job's
//! copying; [`state`] holds the job's states and settings; [`copier`] picks the chunks to
//! copy and keeps the job's progress and state; [`target`] prepares a local target image.

pub mod copier;
pub mod dirty;
pub mod speed;
pub mod state;
pub mod target;

pub use copier::{Copier, Progress, Step};
pub use dirty::DirtyBitmap;
pub use speed::RateLimit;
pub use state::{CopyMode, JobState, MirrorOptions, SyncMode};
