//! `KvmBackend`: the [`VmmBackend`] over real VMs ([`vmm::vm::Vm`] on KVM).
//!
//! One [`Vm`] per id, each behind its own lock so a slow call on one VM (a shutdown that
//! drains disk I/O) does not hold up the others; the map of VMs has a lock of its own,
//! held only to look VMs up: a VM being created is published under its own (held)
//! lock, so calls naming it wait for the build and calls on other VMs do not.
//!
//! States and statuses follow [`crate::fake::FakeVmm`]. What differs, on purpose:
//! - a VM whose guest powered off is seen as `Shutdown` at the next call that looks at
//!   it; a guest-initiated reset re-creates and boots the VM (a reboot);
//! - boot of a shut-down VM and `vm.reboot` re-create the VM from its config (fresh
//!   memory, devices and kernel), then start it;
//! - `vm.add-disk` and `vm.remove-device` on a created, running or paused VM change the
//!   VM at once: a new disk is hot plugged (ACPI: the guest is told and probes it); a
//!   removal on a running or paused VM asks the guest to eject the disk (ACPI eject
//!   request), and the disk leaves the VM and its config when the guest ejects it
//!   (`vm.info` lists it under `pending_removals` until then; a reboot drops it). On a
//!   shut-down VM only the config changes; the next boot builds it;
//! - `vm.update-disk` changes a disk's own throttle limits and its throttle group live,
//!   in any state: a running disk's queues make the group move on their iothreads, keeping
//!   the requests they hold, in order.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use devices::config::{DiskConfig, IoThreadConfig};
use devices::virtio_blk::device::DeviceError;
use vmm::config::VmConfig;
use vmm::vm::{Vm, VmError, VmExit};

use crate::backend::{ApiError, UpdateDisk, VmCounters, VmInfo, VmState, VmSummary, VmmBackend};

/// How many guest-initiated resets in a row are turned into reboots before the VM is
/// left shut down (a guest that triple-faults at once would otherwise loop forever).
const MAX_RESETS: u32 = 16;

/// One VM and what the service knows of it.
struct Entry {
    /// The config as created, with disks added and removed since.
    config: VmConfig,
    /// The VM. A shut-down VM is kept for its counters; `None` only when a rebuild
    /// failed (seen as `Shutdown`; the next boot tries again).
    vm: Option<Vm>,
    /// Guest resets turned into reboots since the last boot through the API.
    resets: u32,
    /// Taken out of the service (deleted, or its creation failed): calls that were
    /// waiting for it answer 404.
    removed: bool,
}

type Shared = Arc<Mutex<Entry>>;

/// The real backend. See the module documentation.
#[derive(Default)]
pub struct KvmBackend {
    vms: Mutex<BTreeMap<String, Shared>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn no_vm(id: &str) -> ApiError {
    ApiError::not_found(format!("no VM with id {id:?}"))
}

/// The API error of a failed [`Vm::create`] or VM operation.
fn vm_error(id: &str, e: VmError) -> ApiError {
    let msg = format!("VM {id}: {e}");
    match &e {
        VmError::Config(_) | VmError::Boot(_) | VmError::Serial(_) => {
            ApiError::bad_request("invalid VM config").with_details(vec![msg])
        }
        VmError::Disk {
            source: DeviceError::Disk(block::Error::Locked { .. }),
            ..
        } => ApiError::conflict(msg),
        VmError::Disk { .. } => ApiError::bad_request("invalid disk").with_details(vec![msg]),
        VmError::Kvm(
            vmm::kvm::KvmError::Open { .. }
            | vmm::kvm::KvmError::ApiVersion(_)
            | vmm::kvm::KvmError::MissingCap(_),
        ) => ApiError::conflict(format!("KVM is not usable on this host: {e}")),
        VmError::State { .. } => ApiError::conflict(msg),
        _ => ApiError::internal(msg),
    }
}

impl Entry {
    /// Notices a guest that ended the VM: poweroff or failure -> `Shutdown`; reset ->
    /// re-created and booted (up to [`MAX_RESETS`] times in a row).
    fn refresh(&mut self) {
        let Some(vm) = self.vm.as_mut() else { return };
        let gone = vm.take_ejected();
        if !gone.is_empty() {
            tracing::info!(id = %self.config.id, disks = ?gone, "disks ejected by the guest");
            self.config.disks.retain(|d| !gone.contains(&d.id));
        }
        if vm.state() != vmm::vm::VmState::Running {
            return;
        }
        match vm.wait_timeout(Some(Duration::ZERO)) {
            Some(VmExit::Reset) if self.resets < MAX_RESETS => {
                self.resets += 1;
                tracing::info!(id = %self.config.id, "guest reset: rebooting");
                if let Err(e) = self.recreate(None).and_then(|()| self.start()) {
                    tracing::warn!(id = %self.config.id, error = %e, "reboot after a guest reset failed");
                }
            }
            Some(exit) => tracing::info!(id = %self.config.id, ?exit, "guest ended the VM"),
            None => {}
        }
    }

    fn state(&mut self) -> VmState {
        self.refresh();
        match self.vm.as_ref().map(Vm::state) {
            Some(vmm::vm::VmState::Created) => VmState::Created,
            Some(vmm::vm::VmState::Running) => VmState::Running,
            Some(vmm::vm::VmState::Paused) => VmState::Paused,
            Some(vmm::vm::VmState::Shutdown) | None => VmState::Shutdown,
        }
    }

    /// Fails with 409 unless the VM is in one of `allowed`; returns the state.
    fn require(&mut self, action: &str, allowed: &[VmState]) -> Result<VmState, ApiError> {
        let state = self.state();
        if allowed.contains(&state) {
            Ok(state)
        } else {
            Err(ApiError::conflict(format!(
                "cannot {action} VM {}: it is {state}",
                self.config.id
            )))
        }
    }

    fn vm(&mut self) -> Result<&mut Vm, ApiError> {
        let id = &self.config.id;
        self.vm
            .as_mut()
            .ok_or_else(|| ApiError::conflict(format!("VM {id} has no built VM; boot it again")))
    }

    /// Replaces the VM by a new one built from `config` (or the current config). The
    /// old VM is shut down and dropped first (it holds the image locks); if the new one
    /// cannot be built, the previous config is rebuilt and the error returned.
    fn recreate(&mut self, config: Option<VmConfig>) -> Result<(), ApiError> {
        let id = self.config.id.clone();
        // Removals the guest never completed take effect at the rebuild.
        let pending = self
            .vm
            .as_ref()
            .map(Vm::pending_removals)
            .unwrap_or_default();
        if !pending.is_empty() {
            self.config.disks.retain(|d| !pending.contains(&d.id));
        }
        let new = config.unwrap_or_else(|| self.config.clone());
        drop(self.vm.take());
        match Vm::create_for_reboot(new.clone()) {
            Ok(vm) => {
                self.vm = Some(vm);
                self.config = new;
                Ok(())
            }
            Err(e) => {
                let err = vm_error(&id, e);
                match Vm::create_for_reboot(self.config.clone()) {
                    Ok(vm) => self.vm = Some(vm),
                    Err(e2) => tracing::error!(%id, error = %e2, "cannot rebuild the VM"),
                }
                Err(err)
            }
        }
    }

    fn start(&mut self) -> Result<(), ApiError> {
        let id = self.config.id.clone();
        self.vm()?.boot().map_err(|e| vm_error(&id, e))
    }

    /// Adds `disk`: hot plugged into a created, running or paused VM; into the config of
    /// a shut-down one.
    fn add_disk(&mut self, disk: DiskConfig) -> Result<(), ApiError> {
        let mut config = self.config.clone();
        config.disks.push(disk.clone());
        let problems = config.problems();
        if !problems.is_empty() {
            return Err(ApiError::bad_request("invalid disk").with_details(problems));
        }
        if self.state() != VmState::Shutdown {
            let id = self.config.id.clone();
            self.vm()?
                .hot_add_disk(disk)
                .map_err(|e| vm_error(&id, e))?;
        }
        self.config = config;
        Ok(())
    }

    /// Removes disk `disk`: at once from a created VM or a shut-down VM's config; from a
    /// running or paused VM once its guest ejects it (ACPI eject request sent now).
    fn remove_disk(&mut self, disk: &str) -> Result<(), ApiError> {
        let id = self.config.id.clone();
        match self.state() {
            VmState::Shutdown => {}
            VmState::Created => {
                self.vm()?
                    .request_disk_removal(disk)
                    .map_err(|e| vm_error(&id, e))?;
            }
            VmState::Running | VmState::Paused => {
                return self
                    .vm()?
                    .request_disk_removal(disk)
                    .map_err(|e| vm_error(&id, e));
            }
        }
        self.config.disks.retain(|d| d.id != disk);
        Ok(())
    }
}

impl KvmBackend {
    /// A backend without VMs.
    pub fn new() -> Self {
        Self::default()
    }

    fn with<T>(
        &self,
        id: &str,
        f: impl FnOnce(&mut Entry) -> Result<T, ApiError>,
    ) -> Result<T, ApiError> {
        let entry = lock(&self.vms).get(id).cloned().ok_or_else(|| no_vm(id))?;
        let mut guard = lock(&entry);
        if guard.removed {
            return Err(no_vm(id));
        }
        f(&mut guard)
    }
}

impl VmmBackend for KvmBackend {
    fn name(&self) -> &'static str {
        "kvm"
    }

    fn create(&self, config: VmConfig) -> Result<(), ApiError> {
        let problems = config.problems();
        let id = config.id.clone();
        // The VM is built outside the map's lock (opening images and KVM take a while):
        // its entry is published first, locked, so calls naming it wait for the build.
        let shared: Shared = Arc::new(Mutex::new(Entry {
            config: config.clone(),
            vm: None,
            resets: 0,
            removed: false,
        }));
        let mut entry = lock(&shared);
        {
            let mut vms = lock(&self.vms);
            if vms.contains_key(&id) {
                return Err(ApiError::conflict(format!(
                    "a VM with id {id:?} already exists"
                )));
            }
            if !problems.is_empty() {
                return Err(ApiError::bad_request("invalid VM config").with_details(problems));
            }
            vms.insert(id.clone(), shared.clone());
        }
        match Vm::create(config) {
            Ok(vm) => {
                entry.vm = Some(vm);
                Ok(())
            }
            Err(e) => {
                entry.removed = true;
                drop(entry);
                let mut vms = lock(&self.vms);
                if vms.get(&id).is_some_and(|s| Arc::ptr_eq(s, &shared)) {
                    vms.remove(&id);
                }
                Err(vm_error(&id, e))
            }
        }
    }

    fn boot(&self, id: &str) -> Result<(), ApiError> {
        self.with(id, |e| {
            let state = e.require("boot", &[VmState::Created, VmState::Shutdown])?;
            e.resets = 0;
            if state == VmState::Shutdown {
                e.recreate(None)?;
            }
            e.start()
        })
    }

    fn pause(&self, id: &str) -> Result<(), ApiError> {
        self.with(id, |e| {
            e.require("pause", &[VmState::Running])?;
            e.vm()?.pause().map_err(|err| vm_error(id, err))
        })
    }

    fn resume(&self, id: &str) -> Result<(), ApiError> {
        self.with(id, |e| {
            e.require("resume", &[VmState::Paused])?;
            e.vm()?.resume().map_err(|err| vm_error(id, err))
        })
    }

    fn shutdown(&self, id: &str) -> Result<(), ApiError> {
        self.with(id, |e| {
            e.require("shut down", &[VmState::Running, VmState::Paused])?;
            e.vm()?.shutdown();
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
        let entry = lock(&self.vms).remove(id).ok_or_else(|| no_vm(id))?;
        // Shut down and drop outside the map's lock (draining may take a while).
        let mut e = lock(&entry);
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
            })
        })
    }

    fn list(&self) -> Vec<VmSummary> {
        let entries: Vec<Shared> = lock(&self.vms).values().cloned().collect();
        entries
            .iter()
            .filter_map(|entry| {
                let mut e = lock(entry);
                if e.removed {
                    return None;
                }
                Some(VmSummary {
                    id: e.config.id.clone(),
                    state: e.state(),
                    vcpus: e.config.cpus.boot_vcpus,
                    memory_mib: e.config.memory.size_mib,
                    disks: e.config.disks.len(),
                })
            })
            .collect()
    }

    fn counters(&self, id: &str) -> Result<VmCounters, ApiError> {
        self.with(id, |e| {
            e.refresh();
            let mut c = VmCounters::default();
            let Some(vm) = e.vm.as_ref() else {
                return Ok(c);
            };
            let dm = vm.devices();
            for d in dm.disks() {
                c.disks.insert(d.id().to_string(), d.counters());
            }
            for (name, t) in dm.all_iothreads() {
                c.iothreads.insert(name, t.counters());
            }
            Ok(c)
        })
    }

    fn add_disk(&self, id: &str, disk: DiskConfig) -> Result<(), ApiError> {
        self.with(id, |e| {
            if e.config.disks.iter().any(|d| d.id == disk.id) {
                return Err(ApiError::conflict(format!(
                    "VM {id} already has a disk with id {:?}",
                    disk.id
                )));
            }
            e.add_disk(disk)
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
            let mut config = e.config.clone();
            let disk = config
                .disks
                .iter_mut()
                .find(|d| d.id == update.id)
                .ok_or_else(|| {
                    ApiError::not_found(format!("VM {id} has no disk with id {:?}", update.id))
                })?;
            let limits = update
                .throttle
                .map(|l| (l != Default::default()).then_some(l));
            if let Some(l) = &limits {
                disk.throttle = l.clone();
            }
            // Some(None): leave any group.
            let group = update.throttle_group.map(|g| (!g.is_empty()).then_some(g));
            if let Some(g) = &group {
                disk.throttle_group = g.clone();
            }
            let problems = config.problems();
            if !problems.is_empty() {
                return Err(ApiError::bad_request("invalid disk update").with_details(problems));
            }
            // A shut-down VM is re-created from the config at its next boot; any other
            // takes the change at once.
            if e.state() != VmState::Shutdown
                && let Some(vm) = e.vm.as_mut()
            {
                let blk = vm.devices().disk(&update.id).ok_or_else(|| {
                    ApiError::internal(format!("VM {id}: disk {} is not built", update.id))
                })?;
                if let Some(l) = limits {
                    blk.set_throttle(l).map_err(|err| {
                        ApiError::bad_request("invalid disk update")
                            .with_details(vec![err.to_string()])
                    })?;
                }
                if let Some(g) = &group {
                    vm.set_disk_throttle_group(&update.id, g.as_deref())
                        .map_err(|err| vm_error(id, err))?;
                }
            }
            e.config = config;
            Ok(())
        })
    }

    fn update_iothread(&self, id: &str, iothread: IoThreadConfig) -> Result<(), ApiError> {
        self.with(id, |e| {
            let Some(slot) = e.config.iothreads.iter().position(|t| t.id == iothread.id) else {
                return Err(ApiError::not_found(format!(
                    "VM {id} has no iothread with id {:?}",
                    iothread.id
                )));
            };
            iothread
                .validate()
                .map_err(|err| ApiError::bad_request("invalid iothread").with_details(vec![err]))?;
            if let Some(t) =
                e.vm.as_ref()
                    .and_then(|vm| vm.devices().iothreads.get(&iothread.id))
            {
                t.update(iothread.clone()).map_err(|err| {
                    ApiError::bad_request("invalid iothread").with_details(vec![err])
                })?;
            }
            e.config.iothreads[slot] = iothread;
            Ok(())
        })
    }

    fn shutdown_vmm(&self) -> Result<(), ApiError> {
        let entries: Vec<Shared> = lock(&self.vms).values().cloned().collect();
        for entry in entries {
            let mut e = lock(&entry);
            if let Some(vm) = e.vm.as_mut() {
                vm.shutdown();
            }
        }
        Ok(())
    }
}
