//! One VM of the real backend and the operations on it, run under its own lock.

use std::sync::Arc;
use std::time::{Duration, Instant};

use devices::config::DiskConfig;
use vmm::config::VmConfig;
use vmm::vm::{ResetGuard, Vm, VmExit};
use vmm_sys_util::eventfd::EventFd;

use super::errors::vm_error;
use crate::backend::{ApiError, VmCounters, VmState};
use crate::events::{Event, EventKind};

/// One VM and what the service knows of it.
pub(super) struct Entry {
    /// The config as created, with disks added and removed since.
    pub(super) config: VmConfig,
    /// The VM; `None` while it is being built, once it is shut down (its threads and
    /// files are released at once; [`Entry::last_counters`] keeps what it counted), or
    /// when a rebuild failed (seen as `Shutdown`; the next boot builds it again).
    pub(super) vm: Option<Vm>,
    /// The counters of the last VM, taken when it was released.
    pub(super) last_counters: VmCounters,
    /// Written by every VM built here when its guest ends it or ejects a disk (the
    /// backend's control loop waits on it).
    pub(super) notify: Option<Arc<EventFd>>,
    /// Events not yet sent (the backend sends them once the operation is over).
    pub(super) outbox: Vec<Event>,
    /// Guest resets turned into reboots, counted within a window.
    pub(super) resets: ResetGuard,
    /// What the control loop last told of each block job.
    pub(super) jobs_seen: crate::events::JobsSeen,
    /// Why the VM is paused (`user`, `io-error`), while it is.
    pub(super) pause_reason: Option<&'static str>,
    /// Disks whose stop on an I/O error was told (an `io-error` event each), until the
    /// VM resumes.
    pub(super) io_stops_told: std::collections::BTreeSet<String>,
    /// Built once (until then, calls over every VM leave it out).
    pub(super) built: bool,
    /// Taken out of the service (deleted, or its creation failed): calls that were
    /// waiting for it answer 404.
    pub(super) removed: bool,
}

impl Entry {
    /// A VM about to be built from `config`.
    pub(super) fn new(config: VmConfig, notify: Option<Arc<EventFd>>) -> Self {
        Entry {
            config,
            vm: None,
            last_counters: VmCounters::default(),
            notify,
            outbox: Vec::new(),
            resets: ResetGuard::default(),
            jobs_seen: Default::default(),
            pause_reason: None,
            io_stops_told: Default::default(),
            built: false,
            removed: false,
        }
    }

    /// Notices what the guest did: disks it ejected leave the config; poweroff or
    /// failure -> `Shutdown` (the VM released); reset -> re-created and booted, unless it
    /// resets too often ([`ResetGuard`]). Each is an event in the outbox.
    pub(super) fn refresh(&mut self) {
        let id = self.config.id.clone();
        self.job_events();
        let Some(vm) = self.vm.as_mut() else { return };
        let gone = vm.take_ejected();
        if !gone.is_empty() {
            tracing::info!(%id, disks = ?gone, "disks ejected by the guest");
            self.config.disks.retain(|d| !gone.contains(&d.id));
            for d in gone {
                self.outbox
                    .push(Event::now(&id, EventKind::DiskEjected).with("disk", d));
            }
        }
        let stops = vm.devices().io_error_stops();
        for (disk, status) in &stops {
            if self.io_stops_told.insert(disk.clone()) {
                tracing::warn!(%id, %disk, op = %status.op, error = %status.error,
                    "a disk stopped on an I/O error; the VM pauses until resumed");
                self.outbox.push(
                    Event::now(&id, EventKind::IoError)
                        .with("disk", disk.clone())
                        .with("op", status.op.clone())
                        .with("errno", status.errno)
                        .with("error", status.error.clone()),
                );
            }
        }
        if !stops.is_empty() && vm.state() == vmm::vm::VmState::Running {
            match vm.pause() {
                Ok(()) => {
                    self.pause_reason = Some("io-error");
                    self.outbox
                        .push(Event::now(&id, EventKind::Paused).with("reason", "io-error"));
                }
                Err(e) => tracing::error!(%id, error = %e, "cannot pause the VM on an I/O error"),
            }
        }
        if vm.state() != vmm::vm::VmState::Running {
            return;
        }
        let Some(exit) = vm.wait_timeout(Some(Duration::ZERO)) else {
            return;
        };
        match exit {
            VmExit::Reset if self.resets.allow(Instant::now()) => {
                tracing::info!(%id, "guest reset: rebooting");
                self.outbox
                    .push(Event::now(&id, EventKind::GuestReset).with("rebooting", true));
                if let Err(e) = self.recreate(None).and_then(|()| self.start()) {
                    tracing::warn!(%id, error = %e, "reboot after a guest reset failed");
                    self.release();
                    self.outbox.push(
                        Event::now(&id, EventKind::Shutdown)
                            .with("reason", format!("reboot failed: {e}")),
                    );
                }
            }
            VmExit::Reset => {
                tracing::warn!(
                    %id,
                    resets = vmm::vm::reset_guard::MAX_RESETS,
                    window_s = vmm::vm::reset_guard::RESET_WINDOW.as_secs(),
                    "guest resets too often: left shut down"
                );
                self.release();
                self.outbox
                    .push(Event::now(&id, EventKind::GuestReset).with("rebooting", false));
                self.outbox.push(Event::now(&id, EventKind::Shutdown).with(
                    "reason",
                    format!(
                        "the guest reset {} times within {} s",
                        vmm::vm::reset_guard::MAX_RESETS,
                        vmm::vm::reset_guard::RESET_WINDOW.as_secs()
                    ),
                ));
            }
            VmExit::Poweroff => {
                tracing::info!(%id, "guest powered off");
                self.release();
                self.outbox.push(Event::now(&id, EventKind::GuestPoweroff));
            }
            VmExit::Error(reason) => {
                tracing::warn!(%id, %reason, "the VM failed");
                self.release();
                self.outbox
                    .push(Event::now(&id, EventKind::GuestFailed).with("reason", reason));
            }
            VmExit::Stopped => self.release(),
        }
    }

    /// Shuts the VM down (draining its I/O) and releases it: its threads and files go
    /// now; its counters stay readable.
    pub(super) fn release(&mut self) {
        if let Some(mut vm) = self.vm.take() {
            vm.shutdown();
            self.last_counters = counters_of(&vm);
            // Its jobs were cancelled with it: they say so, and let go of their targets.
            let jobs = vm.reap_jobs();
            self.note_jobs(&jobs);
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

    /// Disk and iothread counters of the built VM (of the last one once released).
    pub(super) fn counters(&self) -> VmCounters {
        self.vm
            .as_ref()
            .map_or_else(|| self.last_counters.clone(), counters_of)
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
            let gone: Vec<_> = self
                .config
                .disks
                .iter()
                .filter(|d| pending.contains(&d.id))
                .map(|d| d.path.clone())
                .collect();
            self.config.disks.retain(|d| !pending.contains(&d.id));
            for path in gone {
                release_handed(&self.config, &path);
            }
        }
        let new = config.unwrap_or_else(|| self.config.clone());
        self.release();
        match Vm::create_for_reboot(new.clone()) {
            Ok(vm) => {
                self.install(vm);
                self.config = new;
                Ok(())
            }
            Err(e) => {
                let err = vm_error(&id, e);
                match Vm::create_for_reboot(self.config.clone()) {
                    Ok(vm) => self.install(vm),
                    Err(e2) => tracing::error!(%id, error = %e2, "cannot rebuild the VM"),
                }
                Err(err)
            }
        }
    }

    /// Makes `vm` this entry's VM, wired to the control loop's notifier.
    pub(super) fn install(&mut self, mut vm: Vm) {
        if let Some(fd) = &self.notify {
            vm.set_notifier(fd.clone());
        }
        // A new VM: nothing of the old one's pause or stops is told.
        self.pause_reason = None;
        self.io_stops_told.clear();
        self.vm = Some(vm);
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
        let added = match self.vm.as_mut() {
            Some(vm) if state != VmState::Shutdown => vm.hot_add_disk(disk).map(|_| ()),
            _ => vmm::vm::device_manager::probe_disk(&disk),
        };
        added?;
        self.config = config;
        Ok(())
    }

    /// Removes disk `disk`: at once from a created VM or a shut-down VM's config; from a
    /// running or paused VM once its guest ejects it (ACPI eject request sent now).
    pub(super) fn remove_disk(&mut self, disk: &str) -> Result<(), ApiError> {
        let id = self.config.id.clone();
        match self.state() {
            VmState::Shutdown | VmState::Crashed => {}
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
        let path = self
            .config
            .disks
            .iter()
            .find(|d| d.id == disk)
            .map(|d| d.path.clone());
        self.config.disks.retain(|d| d.id != disk);
        if let Some(path) = path {
            release_handed(&self.config, &path);
        }
        Ok(())
    }
}

/// Forgets a file handed over for `path` ([`block::host_file::hand_over`]) unless a disk
/// of `config` still uses it: its descriptor (and the image lock on it) goes.
fn release_handed(config: &VmConfig, path: &std::path::Path) {
    if !config.disks.iter().any(|d| d.path == path) {
        block::host_file::forget_handed(path);
    }
}

/// Disk and iothread counters of `vm`.
fn counters_of(vm: &Vm) -> VmCounters {
    let mut c = VmCounters::default();
    let dm = vm.devices();
    for d in dm.disks() {
        c.disks.insert(d.id().to_string(), d.counters());
    }
    for (name, t) in dm.all_iothreads() {
        c.iothreads.insert(name, t.counters());
    }
    c
}
