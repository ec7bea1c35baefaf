//! `KvmBackend`: the [`VmmBackend`] over real VMs ([`vmm::vm::Vm`] on KVM).
//!
//! One [`Slot`] per VM: the VM behind its own lock (held for a whole operation, so a
//! slow call on one VM, a drain or a build stuck on a hung mount, holds up only calls
//! naming that VM), and a small view of it (state, config, last counters) that calls
//! over every VM read: listing, `/metrics`, calls without `?id=` and service shutdown
//! never wait for a busy VM; they use what the VM last published. The map of VMs has a
//! lock of its own, held only to look VMs up: a VM being created is published under its
//! own (held) lock, so calls naming it wait for the build and calls on others do not.
//!
//! States and statuses follow [`crate::fake::FakeVmm`]. What differs, on purpose:
//! - what the guest does is handled the moment it happens when the backend has a control
//!   loop ([`KvmBackend::with_control_loop`], as in a `vmm` process), else at the next
//!   call that looks at the VM: a guest that powers off or fails is `Shutdown`, its VM
//!   released at once (threads, memory, files; its counters stay readable); a
//!   guest-initiated reset re-creates and boots the VM (a reboot), unless the guest
//!   resets 16 times within 60 s ([`vmm::vm::ResetGuard`]); an ejected disk leaves the
//!   config. Each is an event on the backend's [`EventBus`];
//! - boot of a shut-down VM and `vm.reboot` re-create the VM from its config (fresh
//!   memory, devices and kernel), then start it;
//! - `vm.add-disk` and `vm.remove-device` on a created, running or paused VM change the
//!   VM at once: a new disk is hot plugged (ACPI: the guest is told and probes it); a
//!   removal on a running or paused VM asks the guest to eject the disk (ACPI eject
//!   request), and the disk leaves the VM and its config when the guest ejects it
//!   (`vm.info` lists it under `pending_removals` until then; a reboot drops it). On a
//!   shut-down VM only the config changes (the image is opened once to check it); the
//!   next boot builds it;
//! - `vm.update-disk` changes a disk's own throttle limits and its throttle group live,
//!   in any state: a running disk's queues make the group move on their iothreads, keeping
//!   the requests they hold, in order.

mod conflicts;
mod control;
mod entry;
mod errors;
mod jobs;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use block::jobs::JobInfo;
use block::sync::{lock, try_lock};
use devices::config::{DiskConfig, IoThreadUpdate};
use devices::mirror::MirrorConfig;
use vmm::config::VmConfig;
use vmm::vm::{Vm, VmError};
use vmm_sys_util::eventfd::EventFd;

use crate::backend::{
    ApiError, JobCancel, JobRef, JobSpeed, UpdateDisk, VmCounters, VmInfo, VmState, VmSummary,
    VmmBackend, merged_iothread,
};
use crate::events::EventBus;
use entry::Entry;
pub(crate) use errors::{host_limit, vm_error};

/// How long listing and `/metrics` wait for a busy VM before using what it last
/// published (shared by every VM of one call).
const VIEW_WAIT: Duration = Duration::from_millis(100);
/// How long a service shutdown waits for busy VMs (one being built, one draining) before
/// it goes on without them.
const SHUTDOWN_WAIT: Duration = Duration::from_secs(1);

/// What calls over every VM read without waiting for the VM's lock.
#[derive(Clone)]
struct View {
    /// `None` while the VM is being created.
    state: Option<VmState>,
    config: VmConfig,
    counters: VmCounters,
    removed: bool,
}

/// One VM: its lock and its published view.
struct Slot {
    entry: Mutex<Entry>,
    view: Mutex<View>,
}

impl Slot {
    /// Publishes `e`'s state, config and counters, and sends its pending events.
    fn settle(&self, e: &mut Entry, events: &EventBus) {
        self.publish(e);
        for event in e.outbox.drain(..) {
            events.emit(event);
        }
    }

    /// Publishes `e`'s state, config and counters.
    fn publish(&self, e: &Entry) {
        let mut v = lock(&self.view);
        v.state = e.built.then(|| e.seen_state());
        v.config = e.config.clone();
        v.counters = e.counters();
        v.removed = e.removed;
    }
}

/// The real backend. See the module documentation.
#[derive(Default)]
pub struct KvmBackend {
    vms: Mutex<BTreeMap<String, Arc<Slot>>>,
    /// Set by [`VmmBackend::shutdown_vmm`]: no new VM is built.
    stopping: AtomicBool,
    /// Where guest-driven events go.
    events: EventBus,
    /// The control loop's wake-up, given to every VM (`None`: no control loop).
    notify: Option<Arc<EventFd>>,
}

/// Takes `m` if it becomes free before `deadline`.
fn lock_before<T>(m: &Mutex<T>, deadline: Instant) -> Option<MutexGuard<'_, T>> {
    loop {
        if let Some(g) = try_lock(m) {
            return Some(g);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn no_vm(id: &str) -> ApiError {
    ApiError::not_found(format!("no VM with id {id:?}"))
}

impl KvmBackend {
    /// A backend without VMs.
    pub fn new() -> Self {
        Self::default()
    }

    fn slots(&self) -> Vec<Arc<Slot>> {
        lock(&self.vms).values().cloned().collect()
    }

    /// The configs of every VM but `except` (VMs being built included).
    fn other_configs(&self, except: &str) -> Vec<VmConfig> {
        self.slots()
            .iter()
            .filter_map(|s| {
                let v = lock(&s.view);
                (!v.removed && v.config.id != except).then(|| v.config.clone())
            })
            .collect()
    }

    /// Runs `f` on VM `id` under its lock, then publishes it.
    fn with<T>(
        &self,
        id: &str,
        f: impl FnOnce(&mut Entry) -> Result<T, ApiError>,
    ) -> Result<T, ApiError> {
        let slot = lock(&self.vms).get(id).cloned().ok_or_else(|| no_vm(id))?;
        let mut guard = lock(&slot.entry);
        if guard.removed {
            return Err(no_vm(id));
        }
        let out = f(&mut guard);
        slot.settle(&mut guard, &self.events);
        out
    }

    /// The views of every VM, each refreshed first if its lock comes free in time.
    fn fresh_views(&self) -> Vec<View> {
        let deadline = Instant::now() + VIEW_WAIT;
        self.slots()
            .iter()
            .filter_map(|slot| {
                if let Some(mut e) = lock_before(&slot.entry, deadline)
                    && !e.removed
                {
                    e.refresh();
                    slot.settle(&mut e, &self.events);
                }
                let v = lock(&slot.view).clone();
                (!v.removed && v.state.is_some()).then_some(v)
            })
            .collect()
    }

    /// The API error of a failed build or hot plug on VM `id`: a file another user holds
    /// is explained by the VM of the service that holds it, when one does.
    fn explain(&self, id: &str, e: VmError) -> ApiError {
        conflicts::explain(id, &e, &self.other_configs(id)).unwrap_or_else(|| vm_error(id, e))
    }
}

impl VmmBackend for KvmBackend {
    fn name(&self) -> &'static str {
        "kvm"
    }

    fn create(&self, config: VmConfig) -> Result<(), ApiError> {
        if self.stopping.load(Ordering::SeqCst) {
            return Err(ApiError::unavailable("the service is shutting down"));
        }
        let problems = config.problems();
        let id = config.id.clone();
        if !problems.is_empty() {
            return Err(ApiError::bad_request("invalid VM config").with_details(problems));
        }
        // The VM is built outside the map's lock (opening images and KVM take a while):
        // its slot is published first, locked, so calls naming it wait for the build.
        let slot = Arc::new(Slot {
            entry: Mutex::new(Entry::new(config.clone(), self.notify.clone())),
            view: Mutex::new(View {
                state: None,
                config: config.clone(),
                counters: VmCounters::default(),
                removed: false,
            }),
        });
        let mut entry = lock(&slot.entry);
        {
            let mut vms = lock(&self.vms);
            if vms.contains_key(&id) {
                return Err(ApiError::conflict(format!(
                    "a VM with id {id:?} already exists"
                )));
            }
            vms.insert(id.clone(), slot.clone());
        }
        let built = Vm::create(config);
        let result = match built {
            Ok(vm) if !self.stopping.load(Ordering::SeqCst) => {
                entry.install(vm);
                entry.built = true;
                Ok(())
            }
            Ok(vm) => {
                drop(vm);
                Err(ApiError::unavailable("the service is shutting down"))
            }
            Err(e) => Err(self.explain(&id, e)),
        };
        if result.is_err() {
            entry.removed = true;
            slot.publish(&entry);
            drop(entry);
            let mut vms = lock(&self.vms);
            if vms.get(&id).is_some_and(|s| Arc::ptr_eq(s, &slot)) {
                vms.remove(&id);
            }
        } else {
            slot.publish(&entry);
        }
        result
    }

    fn boot(&self, id: &str) -> Result<(), ApiError> {
        self.with(id, |e| {
            let state = e.require("boot", &[VmState::Created, VmState::Shutdown])?;
            e.resets.clear();
            if state == VmState::Shutdown {
                e.recreate(None)?;
            }
            e.start()
        })
    }

    fn pause(&self, id: &str) -> Result<(), ApiError> {
        self.with(id, |e| {
            e.require("pause", &[VmState::Running])?;
            e.vm()?.pause().map_err(|err| vm_error(id, err))?;
            e.pause_reason = Some("user");
            Ok(())
        })
    }

    fn resume(&self, id: &str) -> Result<(), ApiError> {
        self.with(id, |e| {
            e.require("resume", &[VmState::Paused])?;
            // Disks an I/O error stopped retry what they hold first (`Vm::resume`).
            e.vm()?.resume().map_err(|err| vm_error(id, err))?;
            e.pause_reason = None;
            e.io_stops_told.clear();
            Ok(())
        })
    }

    fn shutdown(&self, id: &str) -> Result<(), ApiError> {
        self.with(id, |e| {
            e.require("shut down", &[VmState::Running, VmState::Paused])?;
            e.release();
            Ok(())
        })
    }

    fn reboot(&self, id: &str) -> Result<(), ApiError> {
        self.with(id, |e| {
            e.require("reboot", &[VmState::Running])?;
            e.recreate(None)?;
            e.start()
        })
    }

    fn delete(&self, id: &str) -> Result<(), ApiError> {
        let slot = lock(&self.vms).remove(id).ok_or_else(|| no_vm(id))?;
        lock(&slot.view).removed = true;
        // Shut down and drop outside the map's lock (draining may take a while).
        let mut e = lock(&slot.entry);
        e.removed = true;
        drop(e.vm.take());
        Ok(())
    }

    fn info(&self, id: &str) -> Result<VmInfo, ApiError> {
        self.with(id, |e| {
            let state = e.state();
            Ok(VmInfo {
                state,
                config: e.config.clone(),
                pending_removals: e.vm.as_ref().map(Vm::pending_removals).unwrap_or_default(),
                pid: Some(std::process::id()),
                crash: None,
                pause_reason: (state == VmState::Paused)
                    .then(|| e.pause_reason.unwrap_or("user").to_string()),
                io_status: e
                    .vm
                    .as_ref()
                    .map(|vm| vm.devices().io_error_stops().into_iter().collect())
                    .unwrap_or_default(),
            })
        })
    }

    fn list(&self) -> Vec<VmSummary> {
        self.fresh_views()
            .into_iter()
            .filter_map(|v| {
                Some(VmSummary {
                    id: v.config.id.clone(),
                    state: v.state?,
                    vcpus: v.config.cpus.boot_vcpus,
                    memory_mib: v.config.memory.size_mib,
                    disks: v.config.disks.len(),
                    pid: Some(std::process::id()),
                    crash: None,
                })
            })
            .collect()
    }

    fn counters(&self, id: &str) -> Result<VmCounters, ApiError> {
        self.with(id, |e| {
            e.refresh();
            Ok(e.counters())
        })
    }

    fn all_counters(&self) -> Vec<(String, VmState, VmCounters)> {
        self.fresh_views()
            .into_iter()
            .filter_map(|v| Some((v.config.id, v.state?, v.counters)))
            .collect()
    }

    fn add_disk(&self, id: &str, disk: DiskConfig) -> Result<(), ApiError> {
        self.with(id, |e| {
            if e.config.disks.iter().any(|d| d.id == disk.id) {
                return Err(ApiError::conflict(format!(
                    "VM {id} already has a disk with id {:?}",
                    disk.id
                )));
            }
            e.add_disk(disk).map_err(|err| self.explain(id, err))
        })
    }

    fn remove_device(&self, id: &str, device_id: &str) -> Result<(), ApiError> {
        self.with(id, |e| {
            e.refresh();
            if !e.config.disks.iter().any(|d| d.id == device_id) {
                return Err(ApiError::not_found(format!(
                    "VM {id} has no device with id {device_id:?}"
                )));
            }
            e.remove_disk(device_id)
        })
    }

    fn update_disk(&self, id: &str, update: UpdateDisk) -> Result<(), ApiError> {
        self.with(id, |e| {
            let (config, change) = update.apply(id, &e.config)?;
            // A shut-down VM is re-created from the config at its next boot; any other
            // takes the change at once.
            if e.state() != VmState::Shutdown
                && let Some(vm) = e.vm.as_mut()
            {
                let blk = vm.devices().disk(&update.id).ok_or_else(|| {
                    ApiError::internal(format!("VM {id}: disk {} is not built", update.id))
                })?;
                if let Some(l) = change.throttle {
                    blk.set_throttle(l).map_err(|err| {
                        ApiError::bad_request("invalid disk update")
                            .with_details(vec![err.to_string()])
                    })?;
                }
                if let Some(g) = &change.throttle_group {
                    vm.set_disk_throttle_group(&update.id, g.as_deref())
                        .map_err(|err| vm_error(id, err))?;
                }
                if let Some((write, read)) = change.error_policy {
                    blk.io_error().set_policies(write, read);
                }
            }
            e.config = config;
            Ok(())
        })
    }

    fn update_iothread(&self, id: &str, update: IoThreadUpdate) -> Result<(), ApiError> {
        self.with(id, |e| {
            let (index, merged) = merged_iothread(id, &e.config, &update)?;
            if let Some(t) =
                e.vm.as_ref()
                    .and_then(|vm| vm.devices().iothreads.get(&merged.id))
            {
                t.update(merged.clone()).map_err(|err| {
                    ApiError::bad_request("invalid iothread").with_details(vec![err])
                })?;
            }
            e.config.iothreads[index] = merged;
            Ok(())
        })
    }

    fn disk_mirror(&self, id: &str, config: MirrorConfig) -> Result<JobInfo, ApiError> {
        self.start_mirror(id, config)
    }

    fn jobs(&self, id: &str) -> Result<Vec<JobInfo>, ApiError> {
        self.list_jobs(id)
    }

    fn job_complete(&self, id: &str, job: JobRef) -> Result<(), ApiError> {
        self.complete_job(id, &job)
    }

    fn job_cancel(&self, id: &str, job: JobCancel) -> Result<(), ApiError> {
        self.cancel_job(id, &job)
    }

    fn job_set_speed(&self, id: &str, job: JobSpeed) -> Result<(), ApiError> {
        self.set_job_speed(id, &job)
    }

    fn shutdown_vmm(&self) -> Result<(), ApiError> {
        self.stopping.store(true, Ordering::SeqCst);
        let deadline = Instant::now() + SHUTDOWN_WAIT;
        for slot in self.slots() {
            let Some(mut e) = lock_before(&slot.entry, deadline) else {
                let id = lock(&slot.view).config.id.clone();
                tracing::warn!(
                    %id,
                    "VM is busy (being built, or in a long operation): not waiting for it"
                );
                continue;
            };
            e.release();
            slot.settle(&mut e, &self.events);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
