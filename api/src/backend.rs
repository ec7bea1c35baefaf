//! What the REST service needs from a VMM: the [`VmmBackend`] trait, the types its
//! operations take and return, and [`ApiError`], whose kind is the HTTP status class.

use std::collections::BTreeMap;

use block::jobs::JobInfo;
use block::throttle::ThrottleLimits;
use devices::config::{DiskConfig, IoThreadUpdate, ReadErrorPolicy, WriteErrorPolicy};
use devices::iothread::IoThreadCounters;
use devices::mirror::MirrorConfig;
use devices::virtio_blk::device::BlkCounters;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use vmm::config::VmConfig;

/// The HTTP class of an [`ApiError`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// 400: the input is invalid.
    BadRequest,
    /// 403: a path outside the directories the service may use (`--allowed-dir`).
    Forbidden,
    /// 404: unknown VM, device or route.
    NotFound,
    /// 405: the route exists with another method.
    MethodNotAllowed,
    /// 409: duplicate id, wrong state, image locked.
    Conflict,
    /// 413: the body is larger than the service accepts.
    PayloadTooLarge,
    /// 500: the VMM failed.
    Internal,
    /// 503: the host lacks a resource for now (file descriptors, memory, hugepages), or
    /// the service is shutting down.
    Unavailable,
}

impl ErrorKind {
    /// The HTTP status code.
    pub fn status(self) -> u16 {
        match self {
            ErrorKind::BadRequest => 400,
            ErrorKind::Forbidden => 403,
            ErrorKind::NotFound => 404,
            ErrorKind::MethodNotAllowed => 405,
            ErrorKind::Conflict => 409,
            ErrorKind::PayloadTooLarge => 413,
            ErrorKind::Internal => 500,
            ErrorKind::Unavailable => 503,
        }
    }
}

/// An error of a VMM operation, as the service reports it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ApiError {
    /// The HTTP class.
    pub kind: ErrorKind,
    /// One line saying what went wrong.
    pub message: String,
    /// Every individual problem (may be empty).
    pub details: Vec<String>,
}

impl ApiError {
    /// An error of `kind` without details.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        ApiError {
            kind,
            message: message.into(),
            details: Vec::new(),
        }
    }

    /// 400.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::BadRequest, message)
    }

    /// 404.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::NotFound, message)
    }

    /// 409.
    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Conflict, message)
    }

    /// 403.
    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Forbidden, message)
    }

    /// 503.
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Unavailable, message)
    }

    /// 500.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Internal, message)
    }

    /// The same error with `details`.
    pub fn with_details(mut self, details: Vec<String>) -> Self {
        self.details = details;
        self
    }

    /// The JSON body.
    pub fn body(&self) -> ErrorBody {
        ErrorBody {
            error: self.message.clone(),
            details: self.details.clone(),
        }
    }
}

/// The body of every error response.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    /// One line saying what went wrong.
    pub error: String,
    /// Every individual problem (may be empty).
    pub details: Vec<String>,
}

/// The state of a VM.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub enum VmState {
    /// Created, not booted yet.
    Created,
    /// vCPUs running.
    Running,
    /// vCPUs stopped, devices quiesced.
    Paused,
    /// Shut down (by the API or the guest); may be booted again or deleted.
    Shutdown,
    /// Its VM process ended without being asked (killed, crashed); `crash` says how. It
    /// may be booted again or deleted.
    Crashed,
}

impl std::fmt::Display for VmState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = match self {
            VmState::Created => "Created",
            VmState::Running => "Running",
            VmState::Paused => "Paused",
            VmState::Shutdown => "Shutdown",
            VmState::Crashed => "Crashed",
        };
        f.write_str(s)
    }
}

/// A VM's config and state (`GET vm.info`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct VmInfo {
    /// The config as created, with disks added and removed since.
    pub config: VmConfig,
    /// The state.
    pub state: VmState,
    /// Disks whose removal was asked for on the running VM and that the guest has not
    /// ejected yet (they are still in `config`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pending_removals: Vec<String>,
    /// The process running the VM (vmmd: its `vmm`; a `vmm`: itself), while one does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    /// How its process ended, when the state is `Crashed`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub crash: Option<CrashReport>,
    /// Why a paused VM is paused: `user` (`vm.pause`) or `io-error` (a disk's error
    /// policy stopped it; `vm.resume` retries the held requests).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pause_reason: Option<String>,
    /// Disks an I/O error stopped, by id: the failed operation, its errno and how many
    /// requests are held.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub io_status: BTreeMap<String, devices::virtio_blk::io_error::IoStatus>,
}

/// How a VM process ended without being asked.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct CrashReport {
    /// Its exit status, when it exited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<i32>,
    /// The signal that ended it, when one did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<i32>,
    /// What is known beyond that (e.g. "the process was not a child of this vmmd: its exit
    /// status is unknown").
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reason: String,
    /// The last lines of its log.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub log: Vec<String>,
}

impl std::fmt::Display for CrashReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.signal, self.status) {
            (Some(sig), _) => write!(f, "killed by signal {sig}")?,
            (None, Some(st)) => write!(f, "exited with status {st}")?,
            (None, None) => f.write_str("ended")?,
        }
        if !self.reason.is_empty() {
            write!(f, " ({})", self.reason)?;
        }
        Ok(())
    }
}

/// One line of `GET vms`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct VmSummary {
    /// The VM id.
    pub id: String,
    /// The state.
    pub state: VmState,
    /// vCPUs.
    pub vcpus: u16,
    /// Guest RAM in MiB.
    pub memory_mib: u64,
    /// Number of disks.
    pub disks: usize,
    /// The process running the VM, while one does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    /// How its process ended, when the state is `Crashed`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub crash: Option<CrashReport>,
}

/// The counters of one VM (`GET vm.counters`). A vhost-user-blk `--counters` file has
/// the same `disks` and `iothreads`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct VmCounters {
    /// Per disk id.
    pub disks: BTreeMap<String, BlkCounters>,
    /// Per iothread id; a disk's dedicated iothread is `dedicated:<disk id>`.
    pub iothreads: BTreeMap<String, IoThreadCounters>,
}

/// `PUT vm.update-disk`: live, cache-independent settings of one disk.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateDisk {
    /// The disk id.
    pub id: String,
    /// New limits of the disk itself (replacing the old ones; `{}` removes them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub throttle: Option<ThrottleLimits>,
    /// New throttle group (one of the VM's `throttle_groups`; `""` leaves any group).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub throttle_group: Option<String>,
    /// New write error policy (the next failure follows it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_write_error: Option<WriteErrorPolicy>,
    /// New read error policy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_read_error: Option<ReadErrorPolicy>,
}

/// What a [`UpdateDisk`] changes: `Some(None)` removes the limits or leaves the group.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DiskChange {
    /// New limits of the disk itself.
    pub throttle: Option<Option<ThrottleLimits>>,
    /// New throttle group.
    pub throttle_group: Option<Option<String>>,
    /// New error policies (both, as the disk has them after the update).
    pub error_policy: Option<(WriteErrorPolicy, ReadErrorPolicy)>,
}

impl UpdateDisk {
    /// The config of VM `vm` with this update applied to its disk, and what changed. Only
    /// the disk is checked again ([`VmConfig::disk_problems`]): 404 for an unknown disk,
    /// 400 for an invalid result.
    pub fn apply(&self, vm: &str, config: &VmConfig) -> Result<(VmConfig, DiskChange), ApiError> {
        let mut config = config.clone();
        let index = config
            .disks
            .iter()
            .position(|d| d.id == self.id)
            .ok_or_else(|| {
                ApiError::not_found(format!("VM {vm} has no disk with id {:?}", self.id))
            })?;
        let disk = &mut config.disks[index];
        let mut change = DiskChange {
            throttle: self
                .throttle
                .clone()
                .map(|l| (l != ThrottleLimits::default()).then_some(l)),
            throttle_group: self
                .throttle_group
                .clone()
                .map(|g| (!g.is_empty()).then_some(g)),
            error_policy: None,
        };
        if let Some(l) = &change.throttle {
            disk.throttle = l.clone();
        }
        if let Some(g) = &change.throttle_group {
            disk.throttle_group = g.clone();
        }
        if let Some(p) = self.on_write_error {
            disk.on_write_error = p;
        }
        if let Some(p) = self.on_read_error {
            disk.on_read_error = p;
        }
        if self.on_write_error.is_some() || self.on_read_error.is_some() {
            change.error_policy = Some((disk.on_write_error, disk.on_read_error));
        }
        let problems = config.disk_problems(index);
        if !problems.is_empty() {
            return Err(ApiError::bad_request("invalid disk update").with_details(problems));
        }
        Ok((config, change))
    }
}

/// `PUT vm.remove-device`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RemoveDevice {
    /// The device (disk) id.
    pub id: String,
}

/// `PUT vm.job-complete`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct JobRef {
    /// The job's id.
    pub job_id: String,
}

/// `PUT vm.job-cancel`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct JobCancel {
    /// The job's id.
    pub job_id: String,
    /// In ready: stop at once instead of making the target a consistent copy first
    /// [false].
    #[serde(default)]
    pub force: bool,
}

/// `PUT vm.job-set-speed`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct JobSpeed {
    /// The job's id.
    pub job_id: String,
    /// Copy rate limit in bytes/s (0: unlimited).
    pub speed: u64,
}

/// The API error of a failed block job operation.
pub fn job_error(e: devices::mirror::JobError) -> ApiError {
    use devices::mirror::JobError;
    match e {
        JobError::Invalid(m) => ApiError::bad_request("invalid mirror").with_details(vec![m]),
        JobError::NotFound(m) => ApiError::not_found(m),
        JobError::Conflict(m) => ApiError::conflict(m),
        JobError::Failed(m) => ApiError::internal(m),
    }
}

/// `GET vmm.ping`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct PingResponse {
    /// The service's version.
    pub version: String,
    /// The backend: `kvm` or `fake`.
    pub backend: String,
    /// Process id of the service.
    pub pid: u32,
}

/// The operations behind the endpoints. Calls may block (they do VM work); the service
/// runs them off its async runtime. Every `id` is a VM id already resolved by the
/// service.
pub trait VmmBackend: Send + Sync + 'static {
    /// Short name for `vmm.ping` (`kvm`, `fake`).
    fn name(&self) -> &'static str;
    /// Creates a VM (state `Created`).
    fn create(&self, config: VmConfig) -> Result<(), ApiError>;
    /// Boots a created or shut-down VM.
    fn boot(&self, id: &str) -> Result<(), ApiError>;
    /// Pauses a running VM.
    fn pause(&self, id: &str) -> Result<(), ApiError>;
    /// Resumes a paused VM.
    fn resume(&self, id: &str) -> Result<(), ApiError>;
    /// Shuts down a running or paused VM (disk I/O drained).
    fn shutdown(&self, id: &str) -> Result<(), ApiError>;
    /// Reboots a running VM.
    fn reboot(&self, id: &str) -> Result<(), ApiError>;
    /// Shuts down (if needed) and forgets a VM.
    fn delete(&self, id: &str) -> Result<(), ApiError>;
    /// Config and state.
    fn info(&self, id: &str) -> Result<VmInfo, ApiError>;
    /// Every VM, sorted by id.
    fn list(&self) -> Vec<VmSummary>;
    /// Disk and iothread counters.
    fn counters(&self, id: &str) -> Result<VmCounters, ApiError>;
    /// Every VM's state and counters (`/metrics`), without waiting long for a busy VM.
    fn all_counters(&self) -> Vec<(String, VmState, VmCounters)> {
        self.list()
            .into_iter()
            .filter_map(|vm| Some((vm.id.clone(), vm.state, self.counters(&vm.id).ok()?)))
            .collect()
    }
    /// Adds a disk (with its iothread) to a VM.
    fn add_disk(&self, id: &str, disk: DiskConfig) -> Result<(), ApiError>;
    /// Removes a device (a disk) after draining it.
    fn remove_device(&self, id: &str, device_id: &str) -> Result<(), ApiError>;
    /// Changes a disk's throttle limits or group.
    fn update_disk(&self, id: &str, update: UpdateDisk) -> Result<(), ApiError>;
    /// Changes a named iothread's polling, batching and affinity settings: the fields
    /// `update` carries, the others stay.
    fn update_iothread(&self, id: &str, update: IoThreadUpdate) -> Result<(), ApiError>;
    /// Starts mirroring a disk (a block job); returns the job as it starts.
    fn disk_mirror(&self, id: &str, config: MirrorConfig) -> Result<JobInfo, ApiError>;
    /// The VM's block jobs, running and finished.
    fn jobs(&self, id: &str) -> Result<Vec<JobInfo>, ApiError>;
    /// Pivots a ready mirror job's disk onto its target.
    fn job_complete(&self, id: &str, job: JobRef) -> Result<(), ApiError>;
    /// Cancels a job.
    fn job_cancel(&self, id: &str, job: JobCancel) -> Result<(), ApiError>;
    /// Changes a job's speed limit.
    fn job_set_speed(&self, id: &str, job: JobSpeed) -> Result<(), ApiError>;
    /// Shuts down every VM before the service exits.
    fn shutdown_vmm(&self) -> Result<(), ApiError>;
}

/// The settings a named iothread of `config` (VM `vm`) gets from `update`: its current
/// ones with the fields `update` carries replaced, validated, with its index in
/// `config.iothreads`. 404 for an unknown iothread (a disk's dedicated one, named by
/// [`devices::config::dedicated_iothread_name`] or by the disk's id, says why it cannot be
/// changed), 400 for invalid settings.
pub fn merged_iothread(
    vm: &str,
    config: &VmConfig,
    update: &IoThreadUpdate,
) -> Result<(usize, devices::config::IoThreadConfig), ApiError> {
    let Some(index) = config.iothreads.iter().position(|t| t.id == update.id) else {
        let disk = devices::config::dedicated_iothread_disk(&update.id).unwrap_or(&update.id);
        let dedicated = config
            .disks
            .iter()
            .any(|d| d.id == disk && d.queue_iothreads().contains(&None));
        let mut msg = format!("VM {vm} has no iothread with id {:?}", update.id);
        if dedicated {
            msg += &format!(
                ": {} is the dedicated iothread of disk {disk}, which has default settings \
                 and cannot be changed; to tune it, declare a named iothread in `iothreads` \
                 and set the disk's `iothread` to it",
                devices::config::dedicated_iothread_name(disk),
            );
        }
        return Err(ApiError::not_found(msg));
    };
    let mut merged = config.iothreads[index].clone();
    merged.merge(update);
    merged
        .validate()
        .map_err(|e| ApiError::bad_request("invalid iothread").with_details(vec![e]))?;
    Ok((index, merged))
}

#[cfg(test)]
mod tests {
    use super::*;
    use devices::vhost_user_blk::BackendCounters;

    /// A vhost-user-blk `--counters` file reads as `vm.counters` does: the same disk and
    /// iothread entries, keyed the same way.
    #[test]
    fn a_vhost_user_counters_file_parses_as_vm_counters() {
        let mut disk = BlkCounters::default();
        disk.io.read.ops = 3;
        disk.io.write_zeroes.bytes = 4096;
        disk.signals = 2;
        let thread = IoThreadCounters {
            requests: 3,
            cpu_ns: 9,
            ..Default::default()
        };
        let file = BackendCounters {
            disks: BTreeMap::from([("disk0".to_string(), disk.clone())]),
            iothreads: BTreeMap::from([("io0".to_string(), thread.clone())]),
            iothread_queues: BTreeMap::from([("io0".to_string(), vec![0])]),
            sessions: 1,
        };
        let text = serde_json::to_string_pretty(&file).unwrap();
        let parsed: VmCounters = serde_json::from_str(&text).unwrap();
        assert_eq!(
            parsed,
            VmCounters {
                disks: BTreeMap::from([("disk0".to_string(), disk)]),
                iothreads: BTreeMap::from([("io0".to_string(), thread)]),
            },
            "{text}"
        );
        // And the other way: what vm.counters returns has every field a file's entries have.
        let back: serde_json::Value = serde_json::to_value(&parsed).unwrap();
        let file: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(back["disks"], file["disks"]);
        assert_eq!(back["iothreads"], file["iothreads"]);
    }
}
