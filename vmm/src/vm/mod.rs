//! One VM assembled from a [`VmConfig`]: KVM, guest memory, devices (PCI, virtio-blk on
//! iothreads, serial), ACPI tables, the kernel, vCPUs; and its lifecycle
//! (created -> running <-> paused -> shut down).
//!
//! ```text
//! let mut vm = Vm::create(config)?;   // KVM checks, memory, devices, kernel loaded
//! vm.boot()?;                         // vCPU threads start
//! let exit = vm.wait();               // guest powered off, reset, or failed
//! vm.shutdown();                      // vCPUs stopped, disk I/O drained
//! ```

pub mod device_manager;
pub mod exit;
mod hotplug;
pub mod jobs;
pub mod pci_host;
pub mod reset_guard;

use std::sync::Arc;
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender, channel};
use std::time::Duration;

use devices::virtio_blk::GuestMem;
use vm_memory::{GuestAddress, GuestMemoryAtomic};
use vmm_sys_util::eventfd::EventFd;

use crate::acpi::{self, AcpiParams, MmioWindow};
use crate::boot::{self, BootLayout};
use crate::config::VmConfig;
use crate::kvm::{self, Vcpu, VcpuEvent, VcpuExitReason, VcpuHandle};
use crate::memory::{self, GuestRam};

pub use device_manager::DeviceManager;
pub use exit::VmExitHandler;
pub use reset_guard::ResetGuard;

/// Start of the legacy VGA hole (reserved in the memory map up to [`LEGACY_HOLE_END`]).
const LEGACY_HOLE_START: u64 = 0xA_0000;
/// End of the legacy BIOS area (1 MiB).
const LEGACY_HOLE_END: u64 = 0x10_0000;

/// How long a pause waits for each vCPU to leave the guest.
pub const PAUSE_TIMEOUT: Duration = Duration::from_secs(5);
/// Size of the 64-bit PCI window announced to the guest.
pub const PCI_MMIO64_SIZE: u64 = 64 << 30;

/// Errors of building or running a VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// The config is invalid.
    #[error("invalid config: {0}")]
    Config(String),
    /// KVM is missing, lacks a capability, or an ioctl failed.
    #[error(transparent)]
    Kvm(#[from] kvm::KvmError),
    /// Guest memory could not be made.
    #[error(transparent)]
    Memory(#[from] memory::MemoryError),
    /// The serial port's output could not be opened.
    #[error(transparent)]
    Serial(#[from] crate::serial::SerialError),
    /// A device could not be placed on a bus.
    #[error(transparent)]
    Bus(#[from] crate::bus::BusError),
    /// An iothread could not be started.
    #[error("iothread {id}: {source}")]
    IoThread {
        /// The iothread's id.
        id: String,
        /// Why it failed.
        #[source]
        source: std::io::Error,
    },
    /// A disk could not be opened (missing file, locked by another VM, ...).
    #[error("disk {id}: {source}")]
    Disk {
        /// The disk's id.
        id: String,
        /// Why it failed.
        #[source]
        source: devices::virtio_blk::device::DeviceError,
    },
    /// A device could not be built.
    #[error("device: {0}")]
    Device(String),
    /// A device could not be built for a reason the host gave (`source`).
    #[error("device: {what}: {source}")]
    DeviceSetup {
        /// Which device and step.
        what: String,
        /// Why.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The ACPI tables could not be written.
    #[error(transparent)]
    Acpi(#[from] acpi::AcpiError),
    /// The kernel could not be loaded.
    #[error(transparent)]
    Boot(#[from] boot::BootError),
    /// The operation is not allowed in the VM's current state.
    #[error("cannot {op} a VM that is {state:?}")]
    State {
        /// What was asked.
        op: &'static str,
        /// The state it was in.
        state: VmState,
    },
}

/// Lifecycle state of a VM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VmState {
    /// Built, kernel loaded, vCPUs not started.
    Created,
    /// vCPUs running.
    Running,
    /// vCPUs parked.
    Paused,
    /// Ended (guest poweroff, reset, failure or [`Vm::shutdown`]).
    Shutdown,
}

/// Why a VM ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VmExit {
    /// The guest powered off.
    Poweroff,
    /// The guest asked for a reset (ACPI reset register, triple fault).
    Reset,
    /// The owner shut it down.
    Stopped,
    /// A vCPU failed (KVM error, unhandled exit, guest crash).
    Error(String),
}

impl VmExit {
    fn from_vcpu(reason: &VcpuExitReason) -> Self {
        match reason {
            VcpuExitReason::Poweroff => VmExit::Poweroff,
            VcpuExitReason::Reset | VcpuExitReason::TripleFault => VmExit::Reset,
            VcpuExitReason::Stopped => VmExit::Stopped,
            VcpuExitReason::Halted => VmExit::Error("vCPU halted".into()),
            VcpuExitReason::Error(e) => VmExit::Error(e.to_string()),
        }
    }
}

/// One VM.
pub struct Vm {
    // Field order is drop order: vCPU threads end before devices and memory go.
    vcpus: Vec<VcpuHandle>,
    pending: Vec<Vcpu>,
    handler: Arc<VmExitHandler>,
    devices: Arc<DeviceManager>,
    events_tx: Sender<VcpuEvent>,
    events_rx: Receiver<VcpuEvent>,
    state: VmState,
    exit: Option<VmExit>,
    kvm: Arc<kvm::Vm>,
    ram: GuestRam,
    config: VmConfig,
    notify: Option<Arc<EventFd>>,
}

impl std::fmt::Debug for Vm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vm")
            .field("id", &self.config.id)
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

impl Vm {
    /// Builds the VM of `config`: checks KVM, makes memory, starts iothreads, opens and
    /// places every disk, writes the ACPI tables, loads the kernel and creates the vCPUs.
    pub fn create(config: VmConfig) -> Result<Vm, VmError> {
        Self::build(config, false)
    }

    /// Like [`Vm::create`], for a VM rebuilt to reboot: a serial file output goes on
    /// after the previous boot's console instead of starting empty.
    pub fn create_for_reboot(config: VmConfig) -> Result<Vm, VmError> {
        Self::build(config, true)
    }

    fn build(config: VmConfig, rebuilt: bool) -> Result<Vm, VmError> {
        config
            .validate()
            .map_err(|e| VmError::Config(e.details().join("; ")))?;
        let kvm = Arc::new(kvm::Vm::new()?);
        let ram = GuestRam::from_config(&config.memory)?;
        kvm.register_memory(ram.memory())?;
        let mem: GuestMem = GuestMemoryAtomic::new(ram.memory().clone());
        let devices = Arc::new(DeviceManager::new(&config, &kvm, &mem)?);

        let nr_vcpus = u32::from(config.cpus.boot_vcpus);
        let params = AcpiParams {
            num_vcpus: u8::try_from(config.cpus.boot_vcpus).unwrap_or(acpi::MAX_VCPUS),
            pci_mmio32: MmioWindow {
                base: memory::PCI_MMIO32_START,
                size: memory::PCI_MMIO32_SIZE,
            },
            pci_mmio64: MmioWindow {
                base: ram.mmio64_start(),
                size: PCI_MMIO64_SIZE,
            },
            ecam_base: memory::ECAM_START,
            sleep_port: acpi::DEFAULT_SLEEP_PORT,
            // Our GSI routes send GSI 0 to IOAPIC pin 0: no IRQ0 -> GSI 2 override.
            irq0_to_gsi2: false,
            hotplug: Some(acpi::HotplugAcpi {
                regs_base: device_manager::HOTPLUG_REGS_BASE,
                gsi: device_manager::HOTPLUG_GSI,
            }),
        };
        let tables = acpi::create_tables(&params);
        let layout = tables.write_to_guest(ram.memory(), GuestAddress(acpi::RSDP_REGION_START))?;
        let boot_layout = BootLayout {
            ram: ram.regions().to_vec(),
            rsdp_addr: layout.rsdp_addr,
            reserved: vec![
                // The legacy VGA hole and BIOS area, as on a PC (Linux expects 0xA0000..1 MiB
                // not to be usable RAM); it holds the ACPI tables.
                (LEGACY_HOLE_START, LEGACY_HOLE_END - LEGACY_HOLE_START),
                (
                    acpi::RSDP_REGION_START,
                    acpi::RSDP_REGION_END - acpi::RSDP_REGION_START,
                ),
                (memory::ECAM_START, memory::ECAM_SIZE),
            ],
        };
        let info = boot::load_kernel(ram.memory(), &config.payload, &boot_layout)?;
        Vcpu::write_boot_tables(ram.memory(), info.entry)?;
        let mut pending = Vec::with_capacity(nr_vcpus as usize);
        for i in 0..nr_vcpus {
            let vcpu = Vcpu::new(&kvm, i, nr_vcpus)?;
            enable_lapic(&vcpu)?;
            pending.push(vcpu);
        }
        if let Some(bsp) = pending.first() {
            bsp.configure_boot(info.entry, &info.regs)?;
        }
        let handler = Arc::new(VmExitHandler::new(
            devices.clone(),
            memory::ECAM_START,
            memory::ECAM_SIZE,
            acpi::DEFAULT_SLEEP_PORT,
        ));
        // Only now, with everything else built, may a new console log replace the old
        // one: a VM refused on the way has emptied nothing.
        if !rebuilt {
            block::sync::lock(&devices.serial).start_fresh()?;
        }
        let (events_tx, events_rx) = channel();
        tracing::info!(id = %config.id, vcpus = nr_vcpus, disks = devices.disk_ids().len(), "VM created");
        Ok(Vm {
            vcpus: Vec::new(),
            pending,
            handler,
            devices,
            events_tx,
            events_rx,
            state: VmState::Created,
            exit: None,
            kvm,
            ram,
            config,
            notify: None,
        })
    }

    /// Makes the VM write `fd` whenever its owner has something to look at: a vCPU
    /// ended (poweroff, reset, failure: [`Vm::wait_timeout`] then returns at once) or the
    /// guest ejected a disk ([`Vm::take_ejected`]). Set it before [`Vm::boot`].
    pub fn set_notifier(&mut self, fd: Arc<EventFd>) {
        self.devices.set_notifier(fd.clone());
        self.notify = Some(fd);
    }

    /// The config it was built from.
    pub fn config(&self) -> &VmConfig {
        &self.config
    }

    /// Its lifecycle state.
    pub fn state(&self) -> VmState {
        self.state
    }

    /// Its devices (disks, iothreads, serial).
    pub fn devices(&self) -> &Arc<DeviceManager> {
        &self.devices
    }

    /// The exit handler (unclaimed-exit counters).
    pub fn exit_handler(&self) -> &Arc<VmExitHandler> {
        &self.handler
    }

    /// The KVM VM.
    pub fn kvm(&self) -> &Arc<kvm::Vm> {
        &self.kvm
    }

    /// Guest memory.
    pub fn ram(&self) -> &GuestRam {
        &self.ram
    }

    /// Starts the vCPUs.
    pub fn boot(&mut self) -> Result<(), VmError> {
        if self.state != VmState::Created {
            return Err(VmError::State {
                op: "boot",
                state: self.state,
            });
        }
        for vcpu in std::mem::take(&mut self.pending) {
            let handler: Arc<dyn kvm::ExitHandler> = self.handler.clone();
            let h = VcpuHandle::spawn_notifying(
                vcpu,
                handler,
                Some(self.events_tx.clone()),
                self.notify.clone(),
            )?;
            self.vcpus.push(h);
        }
        self.state = VmState::Running;
        tracing::info!(id = %self.config.id, "VM running");
        Ok(())
    }

    /// Parks every vCPU (I/O already submitted completes on the iothreads).
    pub fn pause(&mut self) -> Result<(), VmError> {
        if self.state != VmState::Running {
            return Err(VmError::State {
                op: "pause",
                state: self.state,
            });
        }
        for v in &self.vcpus {
            v.pause(PAUSE_TIMEOUT)?;
        }
        self.state = VmState::Paused;
        Ok(())
    }

    /// Lets paused vCPUs run again. Disks an I/O error stopped go on first: each
    /// retries the requests it held, oldest first, before anything newer.
    pub fn resume(&mut self) -> Result<(), VmError> {
        if self.state != VmState::Paused {
            return Err(VmError::State {
                op: "resume",
                state: self.state,
            });
        }
        self.devices.resume_io_errors();
        for v in &self.vcpus {
            v.resume();
        }
        self.state = VmState::Running;
        Ok(())
    }

    /// Moves disk `disk` to the VM's throttle group `group` (`None`: out of any), in any
    /// state: running queues make the move on their iothreads without losing or
    /// reordering held requests (see `BlkDevice::set_shared_group`).
    pub fn set_disk_throttle_group(
        &mut self,
        disk: &str,
        group: Option<&str>,
    ) -> Result<(), VmError> {
        let target = match group {
            Some(name) => Some(self.devices.groups.get(name).cloned().ok_or_else(|| {
                VmError::Config(format!("disk {disk}: unknown throttle group {name}"))
            })?),
            None => None,
        };
        let blk = self
            .devices
            .disk(disk)
            .ok_or_else(|| VmError::Config(format!("no disk {disk}")))?;
        blk.set_shared_group(target);
        if let Some(d) = self.config.disks.iter_mut().find(|d| d.id == disk) {
            d.throttle_group = group.map(str::to_string);
        }
        Ok(())
    }

    /// Waits until the guest ends the VM (poweroff, reset, failure); then stops the
    /// other vCPUs and drains disk I/O. Returns at once if it already ended.
    pub fn wait(&mut self) -> VmExit {
        self.wait_timeout(None).unwrap_or(VmExit::Stopped)
    }

    /// Like [`Vm::wait`], giving up after `timeout` (`None`: the VM still runs).
    pub fn wait_timeout(&mut self, timeout: Option<Duration>) -> Option<VmExit> {
        if let Some(e) = &self.exit {
            return Some(e.clone());
        }
        if self.vcpus.is_empty() {
            return None;
        }
        let event = match timeout {
            None => self.events_rx.recv().ok(),
            Some(t) => match self.events_rx.recv_timeout(t) {
                Ok(e) => Some(e),
                Err(RecvTimeoutError::Timeout) => return None,
                Err(RecvTimeoutError::Disconnected) => None,
            },
        };
        let exit = event.map_or(VmExit::Stopped, |e| VmExit::from_vcpu(&e.reason));
        tracing::info!(id = %self.config.id, ?exit, "VM ended");
        self.end(exit.clone());
        Some(exit)
    }

    /// Stops the vCPUs, drains every disk's I/O and marks the VM shut down.
    pub fn shutdown(&mut self) -> VmExit {
        if let Some(e) = &self.exit {
            return e.clone();
        }
        self.end(VmExit::Stopped);
        VmExit::Stopped
    }

    fn end(&mut self, exit: VmExit) {
        for v in &self.vcpus {
            v.stop();
        }
        for v in self.vcpus.drain(..) {
            v.join();
        }
        self.pending.clear();
        let drained = self.devices.drain_all();
        tracing::debug!(id = %self.config.id, queues = drained, "disk I/O drained");
        self.state = VmState::Shutdown;
        self.exit = Some(exit);
    }
}

/// Offset of the spurious-interrupt vector register in the LAPIC page.
const APIC_SVR: usize = 0xf0;
/// SVR: APIC software enable.
const APIC_SVR_ENABLE: u32 = 1 << 8;

/// Software-enables the vCPU's LAPIC (SVR = 0x1FF), as firmware leaves it: KVM drops
/// fixed interrupts (MSIs) to a software-disabled LAPIC, and a guest that never touches
/// the SVR (the test guest) must still get its MSI-X interrupts.
fn enable_lapic(vcpu: &Vcpu) -> Result<(), VmError> {
    let op = |op| move |source| kvm::KvmError::Ioctl { op, source };
    let mut lapic = vcpu.fd().get_lapic().map_err(op("KVM_GET_LAPIC"))?;
    let regs = &mut lapic.regs[APIC_SVR..APIC_SVR + 4];
    let mut b = [0u8; 4];
    for (d, s) in b.iter_mut().zip(regs.iter()) {
        *d = s.cast_unsigned();
    }
    let v = u32::from_le_bytes(b) | APIC_SVR_ENABLE | 0xff;
    for (d, s) in regs.iter_mut().zip(v.to_le_bytes()) {
        *d = s.cast_signed();
    }
    vcpu.fd().set_lapic(&lapic).map_err(op("KVM_SET_LAPIC"))?;
    Ok(())
}

impl Drop for Vm {
    fn drop(&mut self) {
        if self.state != VmState::Shutdown {
            self.shutdown();
        }
    }
}
