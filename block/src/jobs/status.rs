//! What a block job shows of itself (`vm.jobs`), published by the thread that runs it and
//! read by anyone, with a wake-up for whoever sends job events.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde::{Deserialize, Serialize};
use vmm_sys_util::eventfd::EventFd;

use super::state::{CopyMode, JobState, SyncMode};
use crate::sync::lock;

/// One block job, as `GET vm.jobs` lists it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct JobInfo {
    /// The job's id.
    pub id: String,
    /// The kind of job (`mirror`).
    #[serde(rename = "type")]
    pub kind: String,
    /// The disk it works on.
    pub disk: String,
    /// Where it copies to (a path or an NBD URI).
    pub target: String,
    /// Where it is in its life.
    pub state: JobState,
    /// Bytes copied so far (a chunk copied twice counts twice).
    pub bytes_done: u64,
    /// `bytes_done` plus what is still to copy (grows while the guest dirties more).
    pub bytes_total: u64,
    /// Bytes the guest dirtied that wait to be copied.
    pub dirty_bytes: u64,
    /// Copy rate over the last second or so, in bytes/s.
    pub rate: u64,
    /// The speed limit in bytes/s (0: unlimited).
    pub speed: u64,
    /// What it copies.
    pub sync: SyncMode,
    /// How guest writes reach the target.
    pub copy_mode: CopyMode,
    /// Why it failed (state `failed`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// A job's published [`JobInfo`], shared between the job's thread and the control plane.
#[derive(Debug)]
pub struct JobStatus {
    info: Mutex<JobInfo>,
    /// Written when the state changes (the owner's control loop sends events).
    on_change: Mutex<Option<Arc<EventFd>>>,
    rate: Mutex<RateMeter>,
}

#[derive(Debug)]
struct RateMeter {
    since: Instant,
    bytes_at: u64,
}

impl JobStatus {
    /// A status starting as `info`.
    pub fn new(info: JobInfo) -> Arc<JobStatus> {
        Arc::new(JobStatus {
            rate: Mutex::new(RateMeter {
                since: Instant::now(),
                bytes_at: info.bytes_done,
            }),
            info: Mutex::new(info),
            on_change: Mutex::new(None),
        })
    }

    /// A copy of what the job shows now.
    pub fn info(&self) -> JobInfo {
        lock(&self.info).clone()
    }

    /// The job's state now.
    pub fn state(&self) -> JobState {
        lock(&self.info).state
    }

    /// Makes every later state change write `fd`.
    pub fn set_notifier(&self, fd: Option<Arc<EventFd>>) {
        *lock(&self.on_change) = fd;
    }

    /// Publishes changes made by `f`; a state change writes the notifier. The rate is
    /// recomputed from `bytes_done` once a second has passed.
    pub fn update(&self, f: impl FnOnce(&mut JobInfo)) {
        let changed = {
            let mut info = lock(&self.info);
            let before = info.state;
            f(&mut info);
            let mut meter = lock(&self.rate);
            let elapsed = meter.since.elapsed();
            if elapsed.as_millis() >= 1000 {
                let bytes = info.bytes_done.saturating_sub(meter.bytes_at);
                let rate = u128::from(bytes) * 1000 / elapsed.as_millis().max(1);
                info.rate = u64::try_from(rate).unwrap_or(u64::MAX);
                meter.since = Instant::now();
                meter.bytes_at = info.bytes_done;
            }
            if info.state.is_final() {
                info.rate = 0;
            }
            info.state != before
        };
        if changed && let Some(fd) = lock(&self.on_change).as_ref() {
            let _ = fd.write(1);
        }
    }
}
