//! The device manager: iothreads, throttle groups, virtio-blk disks on the PCI bus (BARs
//! in the 32-bit window, notify ioeventfds, MSI-X irqfds), the serial port, and PCI hot
//! plug of disks through the ACPI hot plug controller ([`super::hotplug`]).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use block::sync::lock;
use block::throttle::ThrottleGroup;
use devices::config::DiskConfig;
use devices::iothread::{IoThread, SourceOp};
use devices::pci::{DEVICES_PER_BUS, HOTPLUG_REGS_SIZE, HotplugController, PciBus};
use devices::virtio_blk::GuestMem;
use devices::virtio_blk::device::BlkDevice;
use devices::virtio_blk::io_error::IoStatus;
use devices::virtio_blk::worker::{LocalQueue, QueueWorker};
use devices::virtio_pci::{BAR_SIZE, BlkQueueSink, VirtioBlk, VirtioPciDevice};

use super::VmError;
use super::hotplug::{self, DiskSet};
use super::pci_host::KvmPciHost;
use crate::bus::{Bus, BusKind};
use crate::config::VmConfig;
use crate::kvm::Vm as KvmVm;
use crate::memory::{PCI_MMIO32_SIZE, PCI_MMIO32_START, PLATFORM_MMIO_START};
use crate::serial::{COM1_BASE, COM1_IRQ, COM1_LEN, SerialDevice};

/// How long a disk's queues may take to finish their requests at reset or shutdown.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// A virtio-blk function on the PCI bus.
pub type BlkPciDevice = VirtioPciDevice<VirtioBlk>;

/// One disk of the VM.
pub struct DiskEntry {
    /// The device model (counters, config).
    pub blk: Arc<BlkDevice>,
    /// The PCI function carrying it.
    pub pci: Arc<Mutex<BlkPciDevice>>,
    /// Its PCI device number on bus 0.
    pub slot: u8,
    /// Where its BAR 0 was placed at creation.
    pub bar: u64,
    /// The iothreads serving its queues (distinct).
    iothreads: Vec<Arc<IoThread>>,
    /// The id of its dedicated iothread, if it has one (stopped when the disk goes).
    pub(super) dedicated: Option<String>,
}

impl DiskEntry {
    /// Waits for every request of the disk to complete and takes its queues off their
    /// iothreads; returns how many queues were removed.
    pub fn drain(&self) -> usize {
        drain_disk(self.blk.id(), &self.iothreads)
    }
}

fn drain_disk(disk: &str, threads: &[Arc<IoThread>]) -> usize {
    let mut removed = 0;
    for t in threads {
        match t.remove_device(disk, DRAIN_TIMEOUT) {
            Ok(n) => removed += n,
            Err(e) => tracing::warn!(disk, iothread = t.id(), error = %e, "drain failed"),
        }
    }
    removed
}

/// Opens `disk`'s image the way the VM will (cache mode, read-only, lock) and closes it
/// again: the checks a disk added to a VM that is not running gets, so that it fails now
/// as it would on a running VM, not at the next boot.
pub fn probe_disk(disk: &DiskConfig) -> Result<(), VmError> {
    if disk.is_null() {
        return Ok(());
    }
    block::Disk::open(&disk.disk_options())
        .map(drop)
        .map_err(|e| VmError::Disk {
            id: disk.id.clone(),
            source: devices::virtio_blk::device::DeviceError::Disk(e),
        })
}

/// Gives a disk's workers to the iothreads its config names (per queue) and takes them
/// back when the driver resets the device.
struct IoThreadSink {
    disk: String,
    per_queue: Vec<Arc<IoThread>>,
    distinct: Vec<Arc<IoThread>>,
}

impl BlkQueueSink for IoThreadSink {
    fn start(&mut self, workers: Vec<QueueWorker<LocalQueue>>) -> std::io::Result<()> {
        for w in workers {
            let q = usize::from(w.index());
            let Some(t) = self.per_queue.get(q) else {
                return Err(std::io::Error::other(format!(
                    "disk {}: no iothread for queue {q}",
                    self.disk
                )));
            };
            tracing::debug!(disk = %self.disk, queue = q, iothread = t.id(), "queue started");
            t.add(Box::new(w))?;
        }
        Ok(())
    }

    fn stop(&mut self) {
        drain_disk(&self.disk, &self.distinct);
    }
}

/// Every device of a VM.
pub struct DeviceManager {
    /// PCI bus 0.
    pub pci: Arc<PciBus>,
    /// Port I/O devices other than PCI config and the ACPI sleep port (serial).
    pub pio: Bus,
    /// MMIO devices other than ECAM and PCI BARs (the hot plug registers).
    pub mmio: Bus,
    /// The serial port on 0x3f8.
    pub serial: Arc<Mutex<SerialDevice>>,
    /// Named iothreads, by id.
    pub iothreads: BTreeMap<String, Arc<IoThread>>,
    /// The VM's throttle groups, by id.
    pub groups: BTreeMap<String, ThrottleGroup>,
    /// Disks and dedicated iothreads (changed by hot plug).
    set: Arc<DiskSet>,
    /// The hot plug controller the guest's ACPI code talks to.
    hotplug: Arc<HotplugController>,
    /// Serialises hot plug requests (slot choice, building, announcing).
    hotplug_lock: Mutex<()>,
    kvm: Arc<KvmVm>,
    mem: GuestMem,
}

impl std::fmt::Debug for DeviceManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceManager")
            .field("disks", &self.disk_ids())
            .field("iothreads", &self.iothreads.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

/// Guest-physical address of the hot plug controller's registers.
pub const HOTPLUG_REGS_BASE: u64 = PLATFORM_MMIO_START;
/// GSI (IOAPIC pin) of the hot plug interrupt (the ACPI GED's); see
/// [`crate::acpi::DEFAULT_HOTPLUG_GSI`].
pub const HOTPLUG_GSI: u32 = crate::acpi::DEFAULT_HOTPLUG_GSI;

/// Where BAR 0 of the function in `slot` goes: one fixed `BAR_SIZE` window per slot, so
/// a slot freed by hot unplug gives its window to the next device placed there.
fn bar_for_slot(slot: u8) -> u64 {
    PCI_MMIO32_START + u64::from(slot) * BAR_SIZE
}

impl DeviceManager {
    /// Builds the devices of `config` on `kvm` with guest memory `mem`. A serial file is
    /// appended to; the VM empties it once it is wholly built (see `Vm::create`).
    pub fn new(config: &VmConfig, kvm: &Arc<KvmVm>, mem: &GuestMem) -> Result<Self, VmError> {
        const _: () = assert!(BAR_SIZE * DEVICES_PER_BUS as u64 <= PCI_MMIO32_SIZE);
        let serial = SerialDevice::from_config(&config.serial)?;
        kvm.register_irqfd(serial.irq_evt(), COM1_IRQ)?;
        let serial = Arc::new(Mutex::new(serial));
        let pio = Bus::new(BusKind::Pio);
        pio.insert(serial.clone(), COM1_BASE, COM1_LEN)?;

        let mut iothreads = BTreeMap::new();
        for c in &config.iothreads {
            let t = IoThread::spawn(c.clone()).map_err(|source| VmError::IoThread {
                id: c.id.clone(),
                source,
            })?;
            iothreads.insert(c.id.clone(), Arc::new(t));
        }
        let mut groups = BTreeMap::new();
        for g in &config.throttle_groups {
            let group = ThrottleGroup::new(g.id.clone(), g.limits.clone())
                .map_err(|e| VmError::Config(format!("throttle group {}: {e}", g.id)))?;
            groups.insert(g.id.clone(), group);
        }

        let pci = Arc::new(PciBus::new());
        let set = Arc::new(DiskSet::new(pci.clone()));
        let hotplug = Arc::new(hotplug::controller(kvm, HOTPLUG_GSI, &set)?);
        let mmio = Bus::new(BusKind::Mmio);
        mmio.insert(
            Arc::new(Mutex::new(hotplug::Registers(hotplug.clone()))),
            HOTPLUG_REGS_BASE,
            HOTPLUG_REGS_SIZE,
        )?;
        let dm = DeviceManager {
            pci,
            pio,
            mmio,
            serial,
            iothreads,
            groups,
            set,
            hotplug,
            hotplug_lock: Mutex::new(()),
            kvm: kvm.clone(),
            mem: mem.clone(),
        };
        for disk in &config.disks {
            let slot = dm.add_disk(disk)?;
            dm.hotplug.set_present(slot);
        }
        Ok(dm)
    }

    /// Opens `disk`, puts its virtio-blk function in the lowest free slot and its queues
    /// on their iothreads; returns the slot.
    fn add_disk(&self, disk: &DiskConfig) -> Result<u8, VmError> {
        let fail = |what: &str, e: Box<dyn std::error::Error + Send + Sync>| VmError::DeviceSetup {
            what: format!("disk {}: {what}", disk.id),
            source: e,
        };
        let group = match &disk.throttle_group {
            Some(name) => Some(self.groups.get(name).cloned().ok_or_else(|| {
                VmError::Config(format!("disk {}: unknown throttle group {name}", disk.id))
            })?),
            None => None,
        };
        let blk =
            Arc::new(
                BlkDevice::open(disk.clone(), group).map_err(|source| VmError::Disk {
                    id: disk.id.clone(),
                    source,
                })?,
            );
        let mut per_queue = Vec::new();
        let mut distinct: Vec<Arc<IoThread>> = Vec::new();
        let mut dedicated = None;
        for name in disk.queue_iothreads() {
            let t = match name {
                Some(n) => self.iothreads.get(&n).cloned().ok_or_else(|| {
                    VmError::Config(format!("disk {}: unknown iothread {n}", disk.id))
                })?,
                None => {
                    dedicated = Some(disk.id.clone());
                    self.set.dedicated_for(&disk.id)?
                }
            };
            if !distinct.iter().any(|d| Arc::ptr_eq(d, &t)) {
                distinct.push(t.clone());
            }
            per_queue.push(t);
        }
        let result = (|| {
            let slot = self
                .pci
                .free_slot()
                .ok_or_else(|| fail("PCI", "every slot of bus 0 is taken".into()))?;
            let bar = bar_for_slot(slot);
            let sink = IoThreadSink {
                disk: disk.id.clone(),
                per_queue,
                distinct: distinct.clone(),
            };
            let host = Arc::new(KvmPciHost::new(self.kvm.clone()));
            let dev = VirtioPciDevice::new(
                VirtioBlk::with_sink(blk.clone(), Box::new(sink)),
                self.mem.clone(),
                host,
                bar,
            )
            .map_err(|e| fail("virtio-pci", Box::new(e)))?;
            let dev = Arc::new(Mutex::new(dev));
            self.pci
                .add_device_at(slot, dev.clone())
                .map_err(|e| fail("PCI", Box::new(e)))?;
            tracing::info!(disk = %disk.id, slot, bar = format_args!("{bar:#x}"), "virtio-blk on PCI");
            if let Some(fd) = self.set.notifier() {
                blk.io_error().set_watcher(fd);
            }
            self.set.lock_disks().push(DiskEntry {
                blk,
                pci: dev,
                slot,
                bar,
                iothreads: distinct,
                dedicated: dedicated.clone(),
            });
            Ok(slot)
        })();
        if result.is_err()
            && let Some(id) = &dedicated
        {
            self.set.stop_dedicated(id);
        }
        result
    }

    /// Hot plug: adds `disk` to the VM and, with `announce` (a guest is running), tells
    /// the guest through ACPI (the GED interrupt, then `PCIU` names the slot). Returns
    /// the slot. The caller has validated `disk` against the VM's config.
    pub fn hot_add_disk(&self, disk: &DiskConfig, announce: bool) -> Result<u8, VmError> {
        let _serial = lock(&self.hotplug_lock);
        if self.disk(&disk.id).is_some() {
            return Err(VmError::Config(format!("disk {} exists already", disk.id)));
        }
        let slot = self.add_disk(disk)?;
        if announce {
            self.hotplug.plug(slot);
            tracing::info!(disk = %disk.id, slot, "disk hot plugged; guest notified");
        } else {
            self.hotplug.set_present(slot);
        }
        Ok(slot)
    }

    /// Hot unplug, first half: asks the guest to eject disk `id` (the GED interrupt, then
    /// `PCID` names the slot). The disk goes when the guest ejects it (`_EJ0`): it is
    /// then taken off the bus, drained and closed, and listed by [`Self::take_ejected`].
    /// Asking again for a disk already asked for sends the request again.
    pub fn request_eject(&self, id: &str) -> Result<u8, VmError> {
        let _serial = lock(&self.hotplug_lock);
        let slot = self
            .set
            .lock_disks()
            .iter()
            .find(|d| d.blk.id() == id)
            .map(|d| d.slot)
            .ok_or_else(|| VmError::Config(format!("no disk {id}")))?;
        if !self.hotplug.request_eject(slot) {
            return Err(VmError::Device(format!(
                "disk {id}: slot {slot} cannot be ejected"
            )));
        }
        tracing::info!(disk = id, slot, "eject requested from the guest");
        Ok(slot)
    }

    /// Ids of disks whose eject was asked for and not yet done by the guest.
    pub fn pending_ejects(&self) -> Vec<String> {
        let pending = self.hotplug.pending_ejects();
        self.set
            .lock_disks()
            .iter()
            .filter(|d| pending & (1 << d.slot) != 0)
            .map(|d| d.blk.id().to_string())
            .collect()
    }

    /// Makes every later guest eject write `fd` (the owner's control loop wakes up and
    /// calls [`Self::take_ejected`]).
    pub fn set_notifier(&self, fd: std::sync::Arc<vmm_sys_util::eventfd::EventFd>) {
        self.set.set_notifier(fd);
    }

    /// Ids of disks the guest ejected since the last call (they are gone).
    pub fn take_ejected(&self) -> Vec<String> {
        std::mem::take(&mut *self.set.lock_ejected())
    }

    /// The disks, in the order they were added.
    pub fn disks(&self) -> Vec<Arc<BlkDevice>> {
        self.set
            .lock_disks()
            .iter()
            .map(|d| d.blk.clone())
            .collect()
    }

    /// Ids of the disks.
    pub fn disk_ids(&self) -> Vec<String> {
        self.set
            .lock_disks()
            .iter()
            .map(|d| d.blk.id().to_string())
            .collect()
    }

    /// Disk `id`.
    pub fn disk(&self, id: &str) -> Option<Arc<BlkDevice>> {
        self.set
            .lock_disks()
            .iter()
            .find(|d| d.blk.id() == id)
            .map(|d| d.blk.clone())
    }

    /// The PCI slot of disk `id`.
    pub fn disk_slot(&self, id: &str) -> Option<u8> {
        self.set
            .lock_disks()
            .iter()
            .find(|d| d.blk.id() == id)
            .map(|d| d.slot)
    }

    /// Every iothread, named and dedicated (dedicated ones as
    /// [`devices::config::dedicated_iothread_name`] of their disk).
    pub fn all_iothreads(&self) -> Vec<(String, Arc<IoThread>)> {
        let mut all: Vec<_> = self
            .iothreads
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        all.extend(
            self.set
                .lock_dedicated()
                .iter()
                .map(|(disk, v)| (devices::config::dedicated_iothread_name(disk), v.clone())),
        );
        all
    }

    /// The disks an I/O error stopped (see `devices::virtio_blk::io_error`), with what
    /// stopped each.
    pub fn io_error_stops(&self) -> Vec<(String, IoStatus)> {
        self.set
            .lock_disks()
            .iter()
            .filter_map(|d| Some((d.blk.id().to_string(), d.blk.io_error().status()?)))
            .collect()
    }

    /// Resumes every disk an I/O error stopped: each of its queues retries what it holds,
    /// oldest first, before anything newer. Returns the disks resumed.
    pub fn resume_io_errors(&self) -> Vec<String> {
        let stopped: Vec<(Arc<BlkDevice>, Vec<Arc<IoThread>>)> = self
            .set
            .lock_disks()
            .iter()
            .filter(|d| d.blk.io_error().is_stopped())
            .map(|d| (d.blk.clone(), d.iothreads.clone()))
            .collect();
        let mut resumed = Vec::new();
        for (blk, threads) in stopped {
            if let Some(status) = blk.io_error().resume() {
                tracing::info!(disk = %blk.id(), op = %status.op, error = %status.error,
                    held = status.count, "resuming a disk stopped on an I/O error");
            }
            for t in &threads {
                if let Err(e) = t.visit(blk.id(), SourceOp::RetryHeld) {
                    tracing::warn!(disk = %blk.id(), iothread = t.id(), error = %e, "retry after an I/O error");
                }
            }
            resumed.push(blk.id().to_string());
        }
        resumed
    }

    /// The hot plug controller (register block and pending bits).
    pub fn hotplug(&self) -> &Arc<HotplugController> {
        &self.hotplug
    }

    /// Finishes every disk's requests and takes its queues off the iothreads (a block
    /// job still running is cancelled first); returns how many queues were removed.
    pub fn drain_all(&self) -> usize {
        for blk in self.disks() {
            self.set.abandon_jobs(&blk);
        }
        self.set.lock_disks().iter().map(DiskEntry::drain).sum()
    }

    /// Disk `id` and the iothreads serving its queues (queue 0's first).
    pub(super) fn disk_threads(&self, id: &str) -> Option<(Arc<BlkDevice>, Vec<Arc<IoThread>>)> {
        self.set
            .lock_disks()
            .iter()
            .find(|d| d.blk.id() == id)
            .map(|d| (d.blk.clone(), d.iothreads.clone()))
    }

    /// The PCI function of disk `id` (its lock keeps the guest from starting or
    /// resetting the device meanwhile).
    pub(super) fn disk_pci(&self, id: &str) -> Option<Arc<Mutex<BlkPciDevice>>> {
        self.set
            .lock_disks()
            .iter()
            .find(|d| d.blk.id() == id)
            .map(|d| d.pci.clone())
    }

    /// The VM's block jobs.
    pub(super) fn jobs(&self) -> std::sync::MutexGuard<'_, devices::mirror::JobList> {
        self.set.lock_jobs()
    }
}
