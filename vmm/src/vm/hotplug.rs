//! Hot plug plumbing of the device manager: the disk set that changes at runtime, the
//! hot plug controller wired to KVM (its interrupt an irqfd on a GSI, its register block
//! on the MMIO bus), and the second half of hot unplug, run when the guest ejects a slot.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use block::sync::lock;
use devices::iothread::IoThread;
use devices::pci::{HotplugController, PciBus};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use super::VmError;
use super::device_manager::DiskEntry;
use crate::bus::BusDevice;
use crate::kvm::Vm as KvmVm;

/// The disks of a VM and their dedicated iothreads: what hot plug adds to and removes
/// from. Shared with the hot plug controller's eject callback.
pub(super) struct DiskSet {
    pci: Arc<PciBus>,
    disks: Mutex<Vec<DiskEntry>>,
    dedicated: Mutex<BTreeMap<String, Arc<IoThread>>>,
    ejected: Mutex<Vec<String>>,
    /// Block jobs, running and finished (see [`super::jobs`]).
    jobs: Mutex<devices::mirror::JobList>,
    /// Written when the guest ejects a disk (see [`super::Vm::set_notifier`]).
    notify: Mutex<Option<Arc<EventFd>>>,
}

impl DiskSet {
    /// An empty set whose disks sit on `pci`.
    pub(super) fn new(pci: Arc<PciBus>) -> Self {
        DiskSet {
            pci,
            disks: Mutex::new(Vec::new()),
            dedicated: Mutex::new(BTreeMap::new()),
            ejected: Mutex::new(Vec::new()),
            jobs: Mutex::new(devices::mirror::JobList::default()),
            notify: Mutex::new(None),
        }
    }

    pub(super) fn lock_disks(&self) -> MutexGuard<'_, Vec<DiskEntry>> {
        lock(&self.disks)
    }

    pub(super) fn lock_dedicated(&self) -> MutexGuard<'_, BTreeMap<String, Arc<IoThread>>> {
        lock(&self.dedicated)
    }

    pub(super) fn lock_jobs(&self) -> MutexGuard<'_, devices::mirror::JobList> {
        lock(&self.jobs)
    }

    /// Cancels at once the running job of disk `blk` (it is going away).
    pub(super) fn abandon_jobs(&self, blk: &Arc<devices::virtio_blk::device::BlkDevice>) {
        for job in self.lock_jobs().iter_mut().filter(|j| j.disk() == blk.id()) {
            job.abandon(blk);
        }
    }

    pub(super) fn lock_ejected(&self) -> MutexGuard<'_, Vec<String>> {
        lock(&self.ejected)
    }

    /// Makes every later eject, and every disk's stop on an I/O error, write `fd`.
    pub(super) fn set_notifier(&self, fd: Arc<EventFd>) {
        for d in self.lock_disks().iter() {
            d.blk.io_error().set_watcher(fd.clone());
        }
        *lock(&self.notify) = Some(fd);
    }

    /// The owner's wake-up, once set.
    pub(super) fn notifier(&self) -> Option<Arc<EventFd>> {
        lock(&self.notify).clone()
    }

    /// The dedicated iothread of `disk`, started on first use.
    pub(super) fn dedicated_for(&self, disk: &str) -> Result<Arc<IoThread>, VmError> {
        let mut map = self.lock_dedicated();
        if let Some(t) = map.get(disk) {
            return Ok(t.clone());
        }
        let c = devices::config::IoThreadConfig::new(disk);
        let t = Arc::new(IoThread::spawn(c).map_err(|source| VmError::IoThread {
            id: disk.to_string(),
            source,
        })?);
        map.insert(disk.to_string(), t.clone());
        Ok(t)
    }

    /// Forgets the dedicated iothread of `disk` (it stops once its last user drops it).
    pub(super) fn stop_dedicated(&self, disk: &str) {
        self.lock_dedicated().remove(disk);
    }

    /// The guest ejected `slot`: take the disk off the bus, stop it (its queues drain),
    /// unregister its ioeventfds and irqfds, close it and stop its dedicated iothread.
    fn eject(&self, slot: u8) {
        let entry = {
            let mut disks = self.lock_disks();
            let Some(i) = disks.iter().position(|d| d.slot == slot) else {
                tracing::warn!(slot, "guest ejected a slot with no disk");
                return;
            };
            disks.remove(i)
        };
        let id = entry.blk.id().to_string();
        let path = entry.blk.config().path;
        self.pci.remove_device(slot);
        lock(&entry.pci).detach();
        self.abandon_jobs(&entry.blk);
        let drained = entry.drain();
        if let Some(t) = &entry.dedicated {
            self.stop_dedicated(t);
        }
        drop(entry);
        // A file handed over for it goes too (and with it the image's lock), unless
        // another disk uses the same image.
        if !self
            .lock_disks()
            .iter()
            .any(|d| d.blk.config().path == path)
        {
            block::host_file::forget_handed(&path);
        }
        tracing::info!(disk = %id, slot, queues = drained, "disk ejected by the guest and removed");
        self.lock_ejected().push(id);
        if let Some(fd) = lock(&self.notify).as_ref()
            && let Err(e) = fd.write(1)
        {
            tracing::warn!(error = %e, "cannot signal the VM's control loop");
        }
    }
}

/// A hot plug controller for a VM: its interrupt writes an eventfd registered as an irqfd
/// on `gsi`; an eject by the guest runs [`DiskSet::eject`] on the vCPU thread that wrote
/// `B0EJ` (the disk is gone when the guest's `_EJ0` returns).
pub(super) fn controller(
    kvm: &KvmVm,
    gsi: u32,
    set: &Arc<DiskSet>,
) -> Result<HotplugController, VmError> {
    let irq = EventFd::new(EFD_NONBLOCK).map_err(|e| VmError::DeviceSetup {
        what: "hot plug interrupt eventfd".into(),
        source: Box::new(e),
    })?;
    kvm.register_irqfd(&irq, gsi)?;
    let weak: Weak<DiskSet> = Arc::downgrade(set);
    Ok(HotplugController::new(
        Box::new(move || {
            if let Err(e) = irq.write(1) {
                tracing::warn!(error = %e, "cannot raise the hot plug interrupt");
            }
        }),
        Box::new(move |slot| {
            if let Some(set) = weak.upgrade() {
                set.eject(slot);
            }
        }),
    ))
}

/// The controller's register block as a device of the VMM's MMIO bus.
pub(super) struct Registers(pub Arc<HotplugController>);

impl BusDevice for Registers {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        self.0.read(offset, data);
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        self.0.write(offset, data);
    }
}

impl super::Vm {
    /// Hot plug: adds `disk` to the VM. On a running or paused VM the guest is told
    /// through ACPI (a stock Linux kernel's acpiphp driver probes the new slot); on a
    /// created VM the disk is simply there at boot. Fails on a shut-down VM, on a config
    /// the disk would make invalid (duplicate id, unknown iothread or group, a writable
    /// image already used), or when the image cannot be opened.
    pub fn hot_add_disk(&mut self, disk: devices::config::DiskConfig) -> Result<u8, VmError> {
        if self.state == super::VmState::Shutdown {
            return Err(VmError::State {
                op: "add a disk to",
                state: self.state,
            });
        }
        // The disk is checked against the VM, not the VM again: its kernel may be gone.
        let config = self
            .config
            .with_disk(disk.clone())
            .map_err(|e| VmError::Config(e.details().join("; ")))?;
        let announce = self.state != super::VmState::Created;
        let slot = self.devices.hot_add_disk(&disk, announce)?;
        self.config = config;
        Ok(slot)
    }

    /// Hot unplug: asks the guest to eject disk `id` (ACPI eject request). The disk is
    /// removed when the guest ejects it; [`Self::take_ejected`] then lists it. On a
    /// created VM (no guest yet) the disk is removed at once. Fails on a shut-down VM or
    /// for an unknown disk.
    pub fn request_disk_removal(&mut self, id: &str) -> Result<(), VmError> {
        match self.state {
            super::VmState::Shutdown => Err(VmError::State {
                op: "remove a disk from",
                state: self.state,
            }),
            super::VmState::Created => {
                let slot = self
                    .devices
                    .disk_slot(id)
                    .ok_or_else(|| VmError::Config(format!("no disk {id}")))?;
                // No guest to ask: eject on its behalf.
                self.devices
                    .hotplug()
                    .write(devices::pci::REG_B0EJ, &(1u32 << slot).to_le_bytes());
                self.take_ejected();
                Ok(())
            }
            super::VmState::Running | super::VmState::Paused => {
                self.devices.request_eject(id).map(|_| ())
            }
        }
    }

    /// Disks the guest ejected since the last call; they are gone from the VM and its
    /// config.
    pub fn take_ejected(&mut self) -> Vec<String> {
        let gone = self.devices.take_ejected();
        if !gone.is_empty() {
            self.config.disks.retain(|d| !gone.contains(&d.id));
        }
        gone
    }

    /// Disks whose removal was asked for and that the guest has not ejected yet.
    pub fn pending_removals(&self) -> Vec<String> {
        self.devices.pending_ejects()
    }
}
