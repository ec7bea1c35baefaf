//! A PCI root complex (segment 0, bus 0) for the VMM: configuration access through the
//! legacy 0xCF8/0xCFC ports ([`PciConfigIo`]) and ECAM ([`PciConfigMmio`]), a host bridge
//! at 00:00.0, devices behind the [`PciDevice`] trait, and BAR sizing and moving. Knows
//! PCI, not KVM: the VMM routes port and MMIO exits here.

mod bus;
mod config;
mod hotplug;

#[cfg(test)]
mod tests;

pub use bus::{
    CONFIG_IO_PORT, CONFIG_IO_SIZE, ECAM_BUS_SIZE, HostBridge, PciBus, PciConfigIo, PciConfigMmio,
};
pub use config::{
    BAR0, BarSpec, COMMAND_MEMORY, CONFIG_SPACE_SIZE, NUM_BARS, PciConfiguration, PciHeader,
};
pub use hotplug::{
    EjectFn, HOTPLUG_REGS_SIZE, HotplugController, InterruptFn, REG_B0EJ, REG_PCID, REG_PCIU,
    REG_PRES,
};

/// Capability ID of MSI-X.
pub const CAP_ID_MSIX: u8 = 0x11;
/// Capability ID of a vendor-specific capability (virtio uses these).
pub const CAP_ID_VENDOR: u8 = 0x09;
/// Devices on one bus.
pub const DEVICES_PER_BUS: usize = 32;

/// Errors of building the PCI topology (never caused by a guest access: those are
/// ignored or read as all-ones).
#[derive(Debug, thiserror::Error)]
pub enum PciError {
    /// The BAR register is taken or out of range.
    #[error("BAR slot {0} is taken or does not exist")]
    BarSlot(usize),
    /// The BAR size is not a power of two of at least 16 bytes (or too large for 32 bits).
    #[error("invalid BAR size {0:#x}")]
    BarSize(u64),
    /// The BAR address is not aligned to its size or out of reach.
    #[error("invalid BAR address {0:#x}")]
    BarAddress(u64),
    /// The capability does not fit in the configuration space.
    #[error("no room for a capability of {0} bytes")]
    CapabilitySpace(usize),
    /// Every device slot of the bus is taken, or the one asked for is.
    #[error("PCI slot {0} is not free")]
    SlotTaken(usize),
}

/// One memory BAR as the bus sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BarInfo {
    /// BAR register index (0..6).
    pub index: u8,
    /// Guest-physical address.
    pub addr: u64,
    /// Size in bytes.
    pub size: u64,
    /// A 64-bit BAR.
    pub mem64: bool,
    /// Prefetchable.
    pub prefetchable: bool,
}

impl BarInfo {
    /// Whether `addr` falls inside the BAR (an unplaced BAR at 0 contains nothing).
    pub fn contains(&self, addr: u64) -> bool {
        self.addr != 0 && addr >= self.addr && addr - self.addr < self.size
    }
}

/// A PCI function on the bus. Every access comes from the guest: offsets and sizes must
/// be checked, never trusted.
pub trait PciDevice: Send {
    /// Reads configuration space bytes at `offset` (0..4096, 1, 2 or 4 bytes).
    fn read_config(&self, offset: u16, data: &mut [u8]);
    /// Writes configuration space bytes at `offset`.
    fn write_config(&mut self, offset: u16, data: &[u8]);
    /// BAR `index`, if the function has one there (a 64-bit BAR reports at its lower
    /// index only).
    fn bar(&self, index: u8) -> Option<BarInfo>;
    /// The guest moved BAR `index` from `old` to `new` (e.g. to re-register ioeventfds).
    fn bar_moved(&mut self, index: u8, old: u64, new: u64);
    /// Reads from BAR `index` at `offset` within it.
    fn read_bar(&mut self, index: u8, offset: u64, data: &mut [u8]);
    /// Writes to BAR `index` at `offset` within it.
    fn write_bar(&mut self, index: u8, offset: u64, data: &[u8]);
}
