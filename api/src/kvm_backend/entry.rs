//! One VM of the real backend and the operations on it, run under its own lock.

use std::time::{Duration, Instant};

use devices::config::DiskConfig;
use vmm::config::VmConfig;
use vmm::vm::{ResetGuard, Vm, VmExit};

use super::errors::vm_error;
use crate::backend::{ApiError, VmCounters, VmState};

/// One VM and what the service knows of it.
pub(super) struct Entry {
    /// The config as created, with disks added and removed since.
    pub(super) config: VmConfig,
    /// The VM. A shut-down VM is kept for its counters; `None` while it is being built,
    /// or when a rebuild failed (seen as `Shutdown`; the next boot tries again).
    pub(super) vm: Option<Vm>,
    /// Guest resets turned into reboots, counted within a window.
    pub(super) resets: ResetGuard,
    /// Built once (until then, calls over every VM leave it out).
    pub(super) built: bool,
    /// Taken out of the service (deleted, or its creation failed): calls that were
    /// waiting for it answer 404.
    pub(super) removed: bool,
}

impl Entry {
    /// A VM about to be built from `config`.
    pub(super) fn new(config: VmConfig) -> Self {
        Entry {
            config,
            vm: None,
            resets: ResetGuard::default(),
            built: false,
            removed: false,
        }
    }

    /// Notices a guest that ended the VM: poweroff or failure -> `Shutdown`; reset ->
    /// re-created and booted, unless it resets too often ([`ResetGuard`]).
    pub(super) fn refresh(&mut self) {
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
            Some(VmExit::Reset) if self.resets.allow(Instant::now()) => {
                tracing::info!(id = %self.config.id, "guest reset: rebooting");
                if let Err(e) = self.recreate(None).and_then(|()| self.start()) {
                    tracing::warn!(id = %self.config.id, error = %e, "reboot after a guest reset failed");
                }
            }
            Some(VmExit::Reset) => tracing::warn!(
                id = %self.config.id,
                resets = vmm::vm::reset_guard::MAX_RESETS,
                window_s = vmm::vm::reset_guard::RESET_WINDOW.as_secs(),
                "guest resets too often: left shut down"
            ),
            Some(exit) => tracing::info!(id = %self.config.id, ?exit, "guest ended the VM"),
            None => {}
        }
    }

    /// The state as last seen (no refresh).
    pub(super) fn seen_state(&self) -> VmState {
        match self.vm.as_ref().map(Vm::state) {
            Some(vmm::vm::VmState::Created) => VmState::Created,
            Some(vmm::vm::VmState::Running) => VmState::Running,
            Some(vmm::vm::VmState::Paused) => VmState::Paused,
            Some(vmm::vm::VmState::Shutdown) | None => VmState::Shutdown,
        }
    }

    /// The state, after noticing what the guest did.
    pub(super) fn state(&mut self) -> VmState {
        self.refresh();
        self.seen_state()
    }

    /// Fails with 409 unless the VM is in one of `allowed`; returns the state.
    pub(super) fn require(
        &mut self,
        action: &str,
        allowed: &[VmState],
    ) -> Result<VmState, ApiError> {
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

    pub(super) fn vm(&mut self) -> Result<&mut Vm, ApiError> {
        let id = &self.config.id;
        self.vm
            .as_mut()
            .ok_or_else(|| ApiError::conflict(format!("VM {id} has no built VM; boot it again")))
    }

    /// Disk and iothread counters of the built VM (empty without one).
    pub(super) fn counters(&self) -> VmCounters {
        let mut c = VmCounters::default();
        let Some(vm) = self.vm.as_ref() else {
            return c;
        };
        let dm = vm.devices();
        for d in dm.disks() {
            c.disks.insert(d.id().to_string(), d.counters());
        }
        for (name, t) in dm.all_iothreads() {
            c.iothreads.insert(name, t.counters());
        }
        c
    }

    /// Replaces the VM by a new one built from `config` (or the current config). The
    /// old VM is shut down and dropped first (it holds the image locks); if the new one
    /// cannot be built, the previous config is rebuilt and the error returned.
    pub(super) fn recreate(&mut self, config: Option<VmConfig>) -> Result<(), ApiError> {
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

    pub(super) fn start(&mut self) -> Result<(), ApiError> {
        let id = self.config.id.clone();
        self.vm()?.boot().map_err(|e| vm_error(&id, e))
    }

    /// Adds `disk`: hot plugged into a created, running or paused VM; into the config of
    /// a shut-down one, after opening its image once, so that it is refused now as it
    /// would be on a running VM (not at every later boot). Only the disk is checked
    /// ([`VmConfig::with_disk`]), not the files the VM needed to start.
    pub(super) fn add_disk(&mut self, disk: DiskConfig) -> Result<(), vmm::vm::VmError> {
        let config = self
            .config
            .with_disk(disk.clone())
            .map_err(|e| vmm::vm::VmError::Config(e.details().join("; ")))?;
        let state = self.state();
        match self.vm.as_mut() {
            Some(vm) if state != VmState::Shutdown => {
                vm.hot_add_disk(disk)?;
            }
            _ => vmm::vm::device_manager::probe_disk(&disk)?,
        }
        self.config = config;
        Ok(())
    }

    /// Removes disk `disk`: at once from a created VM or a shut-down VM's config; from a
    /// running or paused VM once its guest ejects it (ACPI eject request sent now).
    pub(super) fn remove_disk(&mut self, disk: &str) -> Result<(), ApiError> {
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
