//! The device manager: iothreads, throttle groups, virtio-blk disks on the PCI bus (BARs
//! in the 32-bit window, notify ioeventfds, MSI-X irqfds), and the serial port.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use block::throttle::ThrottleGroup;
use devices::iothread::IoThread;
use devices::pci::{PciAllocator, PciBus};
use devices::virtio_blk::GuestMem;
use devices::virtio_blk::device::BlkDevice;
use devices::virtio_blk::worker::{LocalQueue, QueueWorker};
use devices::virtio_pci::{BAR_SIZE, BlkQueueSink, VirtioBlk, VirtioPciDevice};

use super::VmError;
use super::pci_host::KvmPciHost;
use crate::bus::{Bus, BusKind};
use crate::config::VmConfig;
use crate::kvm::Vm as KvmVm;
use crate::memory::{PCI_MMIO32_SIZE, PCI_MMIO32_START};
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
    /// MMIO devices other than ECAM and PCI BARs.
    pub mmio: Bus,
    /// The serial port on 0x3f8.
    pub serial: Arc<Mutex<SerialDevice>>,
    /// The disks, in config order.
    pub disks: Vec<DiskEntry>,
    /// Named iothreads, by id.
    pub iothreads: BTreeMap<String, Arc<IoThread>>,
    /// Dedicated iothreads of disks that name none, by disk id.
    pub dedicated: BTreeMap<String, Arc<IoThread>>,
}

impl std::fmt::Debug for DeviceManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceManager")
            .field("disks", &self.disks.len())
            .field("iothreads", &self.iothreads.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl DeviceManager {
    /// Builds the devices of `config` on `kvm` with guest memory `mem`.
    pub fn new(config: &VmConfig, kvm: &Arc<KvmVm>, mem: &GuestMem) -> Result<Self, VmError> {
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
        let mut alloc = PciAllocator::new(PCI_MMIO32_START, PCI_MMIO32_SIZE);
        let mut dm = DeviceManager {
            pci,
            pio,
            mmio: Bus::new(BusKind::Mmio),
            serial,
            disks: Vec::new(),
            iothreads,
            dedicated: BTreeMap::new(),
        };
        for disk in &config.disks {
            let group = match &disk.throttle_group {
                Some(name) => Some(groups.get(name).cloned().ok_or_else(|| {
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
            for name in disk.queue_iothreads() {
                let t = match name {
                    Some(n) => dm.iothreads.get(&n).cloned().ok_or_else(|| {
                        VmError::Config(format!("disk {}: unknown iothread {n}", disk.id))
                    })?,
                    None => dm.dedicated_for(&disk.id)?,
                };
                if !distinct.iter().any(|d| Arc::ptr_eq(d, &t)) {
                    distinct.push(t.clone());
                }
                per_queue.push(t);
            }
            let sink = IoThreadSink {
                disk: disk.id.clone(),
                per_queue,
                distinct: distinct.clone(),
            };
            let bar = alloc
                .allocate(BAR_SIZE)
                .map_err(|e| VmError::Config(format!("disk {}: BAR: {e}", disk.id)))?;
            let host = Arc::new(KvmPciHost::new(kvm.clone()));
            let dev = VirtioPciDevice::new(
                VirtioBlk::with_sink(blk.clone(), Box::new(sink)),
                mem.clone(),
                host,
                bar,
            )
            .map_err(|e| VmError::Device(format!("disk {}: {e}", disk.id)))?;
            let dev = Arc::new(Mutex::new(dev));
            let slot = dm
                .pci
                .add_device(dev.clone())
                .map_err(|e| VmError::Device(format!("disk {}: PCI: {e}", disk.id)))?;
            tracing::info!(disk = %disk.id, slot, bar = format_args!("{bar:#x}"), "virtio-blk on PCI");
            dm.disks.push(DiskEntry {
                blk,
                pci: dev,
                slot,
                bar,
                iothreads: distinct,
            });
        }
        Ok(dm)
    }

    fn dedicated_for(&mut self, disk: &str) -> Result<Arc<IoThread>, VmError> {
        if let Some(t) = self.dedicated.get(disk) {
            return Ok(t.clone());
        }
        let c = devices::config::IoThreadConfig::new(disk);
        let t = Arc::new(IoThread::spawn(c).map_err(|source| VmError::IoThread {
            id: disk.to_string(),
            source,
        })?);
        self.dedicated.insert(disk.to_string(), t.clone());
        Ok(t)
    }

    /// Finishes every disk's requests and takes its queues off the iothreads; returns
    /// how many queues were removed.
    pub fn drain_all(&self) -> usize {
        self.disks.iter().map(DiskEntry::drain).sum()
    }
}
