//! Block jobs (docs/architecture.md): what a live disk mirror is made of, below
//! virtio. [`dirty`] tracks the chunks guest writes touched while a job runs (a
//! [`crate::DiskQueue`] marks it as its writes finish); [`speed`] paces the job's
//! copying; [`state`] holds the job's states and settings; [`copier`] picks the chunks to
//! copy and keeps the job's progress and state; [`target`] prepares a local target image;
//! [`link`] is what a job shares with its disk's queues; [`mirror`] does a job's I/O;
//! [`status`] is what it shows.

pub mod copier;
pub mod dirty;
pub mod link;
pub mod mirror;
pub mod speed;
pub mod state;
pub mod status;
pub mod target;

pub use copier::{Copier, Progress, Step};
pub use dirty::DirtyBitmap;
pub use link::MirrorLink;
pub use mirror::MirrorJob;
pub use speed::RateLimit;
pub use state::{CopyMode, JobState, MirrorOptions, SyncMode};
pub use status::{JobInfo, JobStatus};

/// How a job treats failed reads of its disk: the disk's I/O error policy decides,
/// which the layer above the block layer keeps.
pub trait SourceErrors: Send + Sync {
    /// Whether a read of the disk that failed with `errno` waits for the disk to be
    /// resumed (the policy stopped the disk) rather than failing the job.
    fn hold(&self, errno: i32) -> bool;
    /// Whether the disk is stopped on an I/O error: the job starts no copy meanwhile.
    fn stopped(&self) -> bool;
}
