//! Dispatch of vCPU PIO/MMIO exits: PCI configuration (0xCF8/0xCFC and ECAM), PCI BARs,
//! the ACPI sleep/reset register and the buses (serial).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use devices::pci::{PciConfigIo, PciConfigMmio};

use super::device_manager::DeviceManager;
use crate::acpi::{SleepAction, decode_sleep_write};
use crate::kvm::{ExitAction, ExitHandler};

/// First port of the PCI configuration mechanism #1.
const PCI_CONFIG_PORT: u16 = 0xcf8;
/// Ports it covers.
const PCI_CONFIG_LEN: u16 = 8;

/// Counters of exits that reached no device.
#[derive(Debug, Default)]
pub struct ExitCounters {
    /// PIO accesses no device claimed.
    pub unclaimed_pio: AtomicU64,
    /// MMIO accesses no device claimed.
    pub unclaimed_mmio: AtomicU64,
}

/// The VM's [`ExitHandler`].
pub struct VmExitHandler {
    devices: Arc<DeviceManager>,
    config_io: PciConfigIo,
    ecam: PciConfigMmio,
    ecam_base: u64,
    ecam_size: u64,
    sleep_port: u16,
    /// Exits no device took.
    pub counters: ExitCounters,
}

impl std::fmt::Debug for VmExitHandler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmExitHandler")
            .field("ecam_base", &self.ecam_base)
            .field("sleep_port", &self.sleep_port)
            .finish_non_exhaustive()
    }
}

impl VmExitHandler {
    /// A handler over the PCI bus of `devices` (config through 0xCF8 and ECAM at
    /// `ecam_base`, `ecam_size` bytes), the sleep register at `sleep_port`, and the other
    /// devices on its PIO/MMIO buses.
    pub fn new(
        devices: Arc<DeviceManager>,
        ecam_base: u64,
        ecam_size: u64,
        sleep_port: u16,
    ) -> Self {
        VmExitHandler {
            config_io: PciConfigIo::new(devices.pci.clone()),
            ecam: PciConfigMmio::new(devices.pci.clone()),
            devices,
            ecam_base,
            ecam_size,
            sleep_port,
            counters: ExitCounters::default(),
        }
    }

    fn config_port_offset(port: u16) -> Option<u64> {
        port.checked_sub(PCI_CONFIG_PORT)
            .filter(|o| *o < PCI_CONFIG_LEN)
            .map(u64::from)
    }

    fn ecam_offset(&self, addr: u64) -> Option<u64> {
        addr.checked_sub(self.ecam_base)
            .filter(|o| *o < self.ecam_size)
    }
}

impl ExitHandler for VmExitHandler {
    fn pio_read(&self, _vcpu: u32, port: u16, data: &mut [u8]) {
        if let Some(off) = Self::config_port_offset(port) {
            self.config_io.read(off, data);
        } else if port == self.sleep_port {
            data.fill(0);
        } else if !self.devices.pio.read(u64::from(port), data) {
            self.counters.unclaimed_pio.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn pio_write(&self, vcpu: u32, port: u16, data: &[u8]) -> ExitAction {
        if let Some(off) = Self::config_port_offset(port) {
            self.config_io.write(off, data);
        } else if port == self.sleep_port {
            let value = data.first().copied().unwrap_or(0);
            match decode_sleep_write(value) {
                Some(SleepAction::PowerOff) => {
                    tracing::info!(vcpu, "guest powered off (ACPI S5)");
                    return ExitAction::Poweroff;
                }
                Some(SleepAction::Reset) => {
                    tracing::info!(vcpu, "guest reset (ACPI reset register)");
                    return ExitAction::Reset;
                }
                None => {}
            }
        } else if !self.devices.pio.write(u64::from(port), data) {
            self.counters.unclaimed_pio.fetch_add(1, Ordering::Relaxed);
        }
        ExitAction::Continue
    }

    fn mmio_read(&self, _vcpu: u32, addr: u64, data: &mut [u8]) {
        if let Some(off) = self.ecam_offset(addr) {
            self.ecam.read(off, data);
        } else if !self.devices.pci.mmio_read(addr, data) && !self.devices.mmio.read(addr, data) {
            self.counters.unclaimed_mmio.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn mmio_write(&self, _vcpu: u32, addr: u64, data: &[u8]) -> ExitAction {
        if let Some(off) = self.ecam_offset(addr) {
            self.ecam.write(off, data);
        } else if !self.devices.pci.mmio_write(addr, data) && !self.devices.mmio.write(addr, data) {
            self.counters.unclaimed_mmio.fetch_add(1, Ordering::Relaxed);
        }
        ExitAction::Continue
    }
}
