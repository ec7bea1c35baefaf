//! `FakeVmm`: an in-memory [`VmmBackend`] — a TEST DOUBLE, not a VMM. It runs no guest;
//! it keeps configs and states, enforces the state machine, ids, validation and image
//! locking exactly as the real backend must, and makes counters grow while a VM runs.
//! Used by the API tests and by `vmmd --fake` to try the API without KVM.

use std::collections::BTreeMap;
use std::sync::Mutex;

use block::sync::lock;
use devices::config::{DiskConfig, IoThreadUpdate};
use devices::iothread::IoThreadCounters;
use devices::virtio_blk::device::BlkCounters;
use vmm::config::{VmConfig, same_file};

use block::jobs::JobInfo;
use devices::mirror::MirrorConfig;

use crate::backend::{
    ApiError, JobCancel, JobRef, JobSpeed, UpdateDisk, VmCounters, VmInfo, VmState, VmSummary,
    VmmBackend, merged_iothread,
};

#[path = "fake_jobs.rs"]
mod fake_jobs;

/// Requests a running fake VM "completes" per disk each time its counters are read.
const FAKE_OPS_PER_READ: u64 = 100;

struct FakeVm {
    config: VmConfig,
    state: VmState,
    counters: VmCounters,
    jobs: Vec<block::jobs::JobInfo>,
}

/// The in-memory test double. See the module documentation.
#[derive(Default)]
pub struct FakeVmm {
    vms: Mutex<BTreeMap<String, FakeVm>>,
}

impl FakeVmm {
    /// An empty fake VMM.
    pub fn new() -> Self {
        Self::default()
    }

    fn with_vm<T>(
        &self,
        id: &str,
        f: impl FnOnce(&mut FakeVm, &BTreeMap<String, FakeVm>) -> Result<T, ApiError>,
    ) -> Result<T, ApiError> {
        let mut vms = lock(&self.vms);
        let mut vm = vms
            .remove(id)
            .ok_or_else(|| ApiError::not_found(format!("no VM with id {id:?}")))?;
        let out = f(&mut vm, &vms);
        vms.insert(id.to_string(), vm);
        out
    }

    fn transition(
        &self,
        id: &str,
        action: &str,
        from: &[VmState],
        to: VmState,
    ) -> Result<(), ApiError> {
        self.with_vm(id, |vm, _| {
            if !from.contains(&vm.state) {
                return Err(ApiError::conflict(format!(
                    "cannot {action} VM {id}: it is {}",
                    vm.state
                )));
            }
            vm.state = to;
            if to == VmState::Shutdown {
                // As the real backend: a VM that is shut down has no jobs.
                vm.jobs.clear();
            }
            Ok(())
        })
    }
}

/// Disk problems the config check does not see: missing images, and images already
/// used writably (or used at all, for a writable disk) by another VM.
fn image_problems<'a>(
    disks: impl Iterator<Item = (usize, &'a DiskConfig)>,
    others: &BTreeMap<String, FakeVm>,
) -> (Vec<String>, Option<ApiError>) {
    let mut missing = Vec::new();
    let mut locked = None;
    for (i, d) in disks {
        if d.host_path().is_none() {
            continue;
        }
        if let Err(e) = std::fs::metadata(&d.path) {
            missing.push(format!("disks[{i}].path: {}: {e}", d.path.display()));
            continue;
        }
        for (vm_id, vm) in others {
            let clash = vm
                .config
                .disks
                .iter()
                .find(|o| same_file(&o.path, &d.path) && !(o.readonly && d.readonly));
            if let Some(o) = clash {
                locked = Some(ApiError::conflict(format!(
                    "image {} of disk {} is locked: VM {vm_id} uses it{} as disk {}",
                    d.path.display(),
                    d.id,
                    if o.readonly { "" } else { " writable" },
                    o.id
                )));
            }
        }
    }
    (missing, locked)
}

fn invalid(problems: Vec<String>) -> ApiError {
    ApiError::bad_request("invalid VM config").with_details(problems)
}

fn fresh_counters(config: &VmConfig) -> VmCounters {
    let mut c = VmCounters::default();
    for d in &config.disks {
        c.disks.insert(d.id.clone(), BlkCounters::default());
        if d.iothread.is_none() && d.iothread_vq_mapping.is_none() {
            c.iothreads.insert(
                devices::config::dedicated_iothread_name(&d.id),
                IoThreadCounters::default(),
            );
        }
    }
    for t in &config.iothreads {
        c.iothreads
            .insert(t.id.clone(), IoThreadCounters::default());
    }
    c
}

impl VmmBackend for FakeVmm {
    fn name(&self) -> &'static str {
        "fake"
    }

    fn create(&self, config: VmConfig) -> Result<(), ApiError> {
        let mut problems = config.problems();
        let mut vms = lock(&self.vms);
        if vms.contains_key(&config.id) {
            return Err(ApiError::conflict(format!(
                "a VM with id {:?} already exists",
                config.id
            )));
        }
        let (missing, locked) = image_problems(config.disks.iter().enumerate(), &vms);
        problems.extend(missing);
        if !problems.is_empty() {
            return Err(invalid(problems));
        }
        if let Some(e) = locked {
            return Err(e);
        }
        let counters = fresh_counters(&config);
        vms.insert(
            config.id.clone(),
            FakeVm {
                config,
                state: VmState::Created,
                counters,
                jobs: Vec::new(),
            },
        );
        Ok(())
    }

    fn boot(&self, id: &str) -> Result<(), ApiError> {
        self.transition(
            id,
            "boot",
            &[VmState::Created, VmState::Shutdown],
            VmState::Running,
        )
    }

    fn pause(&self, id: &str) -> Result<(), ApiError> {
        self.transition(id, "pause", &[VmState::Running], VmState::Paused)
    }

    fn resume(&self, id: &str) -> Result<(), ApiError> {
        self.transition(id, "resume", &[VmState::Paused], VmState::Running)
    }

    fn shutdown(&self, id: &str) -> Result<(), ApiError> {
        self.transition(
            id,
            "shut down",
            &[VmState::Running, VmState::Paused],
            VmState::Shutdown,
        )
    }

    fn reboot(&self, id: &str) -> Result<(), ApiError> {
        self.transition(id, "reboot", &[VmState::Running], VmState::Running)
    }

    fn delete(&self, id: &str) -> Result<(), ApiError> {
        lock(&self.vms)
            .remove(id)
            .map(|_| ())
            .ok_or_else(|| ApiError::not_found(format!("no VM with id {id:?}")))
    }

    fn info(&self, id: &str) -> Result<VmInfo, ApiError> {
        self.with_vm(id, |vm, _| {
            Ok(VmInfo {
                config: vm.config.clone(),
                state: vm.state,
                pending_removals: Vec::new(),
                pid: Some(std::process::id()),
                crash: None,
                pause_reason: None,
                io_status: Default::default(),
            })
        })
    }

    fn list(&self) -> Vec<VmSummary> {
        lock(&self.vms)
            .values()
            .map(|vm| VmSummary {
                id: vm.config.id.clone(),
                state: vm.state,
                vcpus: vm.config.cpus.boot_vcpus,
                memory_mib: vm.config.memory.size_mib,
                disks: vm.config.disks.len(),
                pid: Some(std::process::id()),
                crash: None,
            })
            .collect()
    }

    fn counters(&self, id: &str) -> Result<VmCounters, ApiError> {
        self.with_vm(id, |vm, _| {
            if vm.state == VmState::Running {
                for d in vm.counters.disks.values_mut() {
                    d.io.read.ops += FAKE_OPS_PER_READ;
                    d.io.read.bytes += FAKE_OPS_PER_READ * 4096;
                    d.signals += FAKE_OPS_PER_READ;
                }
                for t in vm.counters.iothreads.values_mut() {
                    t.passes += FAKE_OPS_PER_READ;
                    t.requests += FAKE_OPS_PER_READ;
                    t.completions += FAKE_OPS_PER_READ;
                }
            }
            Ok(vm.counters.clone())
        })
    }

    fn add_disk(&self, id: &str, disk: DiskConfig) -> Result<(), ApiError> {
        self.with_vm(id, |vm, others| {
            if vm.state == VmState::Paused {
                return Err(ApiError::conflict(format!(
                    "cannot add a disk to VM {id}: it is Paused"
                )));
            }
            if vm.config.disks.iter().any(|d| d.id == disk.id) {
                return Err(ApiError::conflict(format!(
                    "VM {id} already has a disk with id {:?}",
                    disk.id
                )));
            }
            let mut config = vm.config.clone();
            config.disks.push(disk.clone());
            let index = config.disks.len() - 1;
            // Only the new disk: the VM's other files (its kernel) were checked at create.
            let mut problems = config.disk_problems(index);
            let (missing, locked) = image_problems(std::iter::once((index, &disk)), others);
            problems.extend(missing);
            if !problems.is_empty() {
                return Err(ApiError::bad_request("invalid disk").with_details(problems));
            }
            if let Some(e) = locked {
                return Err(e);
            }
            vm.counters = {
                let mut c = fresh_counters(&config);
                for (k, v) in std::mem::take(&mut vm.counters.disks) {
                    c.disks.insert(k, v);
                }
                c
            };
            vm.config = config;
            Ok(())
        })
    }

    fn remove_device(&self, id: &str, device_id: &str) -> Result<(), ApiError> {
        self.with_vm(id, |vm, _| {
            if vm.state == VmState::Paused {
                return Err(ApiError::conflict(format!(
                    "cannot remove a device from VM {id}: it is Paused"
                )));
            }
            let before = vm.config.disks.len();
            vm.config.disks.retain(|d| d.id != device_id);
            if vm.config.disks.len() == before {
                return Err(ApiError::not_found(format!(
                    "VM {id} has no device with id {device_id:?}"
                )));
            }
            vm.counters.disks.remove(device_id);
            vm.counters
                .iothreads
                .remove(&devices::config::dedicated_iothread_name(device_id));
            Ok(())
        })
    }

    fn update_disk(&self, id: &str, update: UpdateDisk) -> Result<(), ApiError> {
        self.with_vm(id, |vm, _| {
            vm.config = update.apply(id, &vm.config)?.0;
            Ok(())
        })
    }

    fn update_iothread(&self, id: &str, update: IoThreadUpdate) -> Result<(), ApiError> {
        self.with_vm(id, |vm, _| {
            let (index, merged) = merged_iothread(id, &vm.config, &update)?;
            vm.config.iothreads[index] = merged;
            Ok(())
        })
    }

    fn disk_mirror(&self, id: &str, config: MirrorConfig) -> Result<JobInfo, ApiError> {
        self.with_vm(id, |vm, _| {
            fake_jobs::start(vm.state, &vm.config, &mut vm.jobs, config)
        })
    }

    fn jobs(&self, id: &str) -> Result<Vec<JobInfo>, ApiError> {
        self.with_vm(id, |vm, _| Ok(vm.jobs.clone()))
    }

    fn job_complete(&self, id: &str, job: JobRef) -> Result<(), ApiError> {
        self.with_vm(id, |vm, _| {
            fake_jobs::complete(&mut vm.config, &mut vm.jobs, &job.job_id)
        })
    }

    fn job_cancel(&self, id: &str, job: JobCancel) -> Result<(), ApiError> {
        self.with_vm(id, |vm, _| {
            let j = fake_jobs::find(&mut vm.jobs, &job.job_id)?;
            fake_jobs::end(j, block::jobs::JobState::Cancelled)
        })
    }

    fn job_set_speed(&self, id: &str, job: JobSpeed) -> Result<(), ApiError> {
        self.with_vm(id, |vm, _| {
            let j = fake_jobs::find(&mut vm.jobs, &job.job_id)?;
            if j.state.is_final() {
                return Err(ApiError::conflict(format!(
                    "job {} is {}",
                    j.id,
                    j.state.as_str()
                )));
            }
            j.speed = job.speed;
            Ok(())
        })
    }

    fn shutdown_vmm(&self) -> Result<(), ApiError> {
        for vm in lock(&self.vms).values_mut() {
            vm.state = VmState::Shutdown;
            vm.jobs.clear();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    use crate::backend::ErrorKind;

    fn config(dir: &Path, id: &str) -> VmConfig {
        let kernel = dir.join("kernel");
        std::fs::write(&kernel, b"k").unwrap();
        let disk = dir.join(format!("{id}.raw"));
        std::fs::write(&disk, vec![0u8; 4096]).unwrap();
        serde_json::from_value(serde_json::json!({
            "id": id,
            "payload": {"kernel": kernel},
            "disks": [{"id": "d0", "path": disk}]
        }))
        .unwrap()
    }

    #[test]
    fn lifecycle_and_conflicts() {
        let dir = tempfile::tempdir().unwrap();
        let f = FakeVmm::new();
        f.create(config(dir.path(), "a")).unwrap();
        assert_eq!(
            f.create(config(dir.path(), "a")).unwrap_err().kind,
            ErrorKind::Conflict
        );
        assert_eq!(f.pause("a").unwrap_err().kind, ErrorKind::Conflict);
        f.boot("a").unwrap();
        f.pause("a").unwrap();
        f.resume("a").unwrap();
        f.shutdown("a").unwrap();
        assert_eq!(f.info("a").unwrap().state, VmState::Shutdown);
        assert_eq!(f.boot("nope").unwrap_err().kind, ErrorKind::NotFound);
        f.delete("a").unwrap();
        assert!(f.list().is_empty());
    }

    #[test]
    fn image_locked_by_another_vm() {
        let dir = tempfile::tempdir().unwrap();
        let f = FakeVmm::new();
        f.create(config(dir.path(), "a")).unwrap();
        let mut b = config(dir.path(), "b");
        b.disks[0].path = dir.path().join("a.raw");
        let e = f.create(b).unwrap_err();
        assert_eq!(e.kind, ErrorKind::Conflict, "{e:?}");
        assert!(e.message.contains("locked"));
    }
}
