//! Bus 0 of segment 0: device slots, configuration access through 0xCF8/0xCFC and
//! ECAM, and MMIO routing to BARs.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use block::sync::{lock, read, write};

use super::config::{NUM_BARS, PciConfiguration, PciHeader};
use super::{BarInfo, DEVICES_PER_BUS, PciDevice, PciError};

type SharedDevice = Arc<Mutex<dyn PciDevice>>;

struct Slot {
    dev: SharedDevice,
    /// The BARs as last seen, to notice moves and to route MMIO.
    bars: [Option<BarInfo>; NUM_BARS],
}

fn read_bars(dev: &dyn PciDevice) -> [Option<BarInfo>; NUM_BARS] {
    std::array::from_fn(|i| dev.bar(bar_index(i)))
}

/// A BAR index (below [`NUM_BARS`]) as the `u8` the device API takes.
#[allow(clippy::cast_possible_truncation)] // i < NUM_BARS (6)
fn bar_index(i: usize) -> u8 {
    i as u8
}

/// A device number (an index into the bus's slots, below [`DEVICES_PER_BUS`]) as a `u8`.
#[allow(clippy::cast_possible_truncation)] // s < DEVICES_PER_BUS (32)
fn slot_number(s: usize) -> u8 {
    s as u8
}

/// A configuration register offset already checked by [`valid_config_access`].
#[allow(clippy::cast_possible_truncation)] // reg < 4096
fn config_reg(reg: u64) -> u16 {
    reg as u16
}

/// Whether a configuration access of `len` bytes at `reg` is one the bus serves: 1, 2
/// or 4 bytes, inside one dword, inside the 4 KiB space.
fn valid_config_access(reg: u64, len: usize) -> bool {
    matches!(len, 1 | 2 | 4) && reg < 4096 && (reg % 4) as usize + len <= 4
}

/// Bus 0: up to 32 single-function devices; slot 0 holds the host bridge.
pub struct PciBus {
    slots: RwLock<Vec<Option<Slot>>>,
}

impl Default for PciBus {
    fn default() -> Self {
        Self::new()
    }
}

impl PciBus {
    /// A bus with the host bridge at 00:00.0.
    pub fn new() -> Self {
        let bus = PciBus {
            slots: RwLock::new((0..DEVICES_PER_BUS).map(|_| None).collect()),
        };
        let bridge: SharedDevice = Arc::new(Mutex::new(HostBridge::new()));
        // Slot 0 of a new bus is free.
        let _ = bus.add_device_at(0, bridge);
        bus
    }

    /// Puts `dev` in the first free slot; returns its device number.
    pub fn add_device(&self, dev: SharedDevice) -> Result<u8, PciError> {
        let mut slots = write(&self.slots);
        let free = slots
            .iter()
            .position(Option::is_none)
            .ok_or(PciError::SlotTaken(DEVICES_PER_BUS))?;
        let bars = read_bars(&*lock(&dev));
        slots[free] = Some(Slot { dev, bars });
        Ok(slot_number(free))
    }

    /// The lowest free device number, if any.
    pub fn free_slot(&self) -> Option<u8> {
        let slots = read(&self.slots);
        slots.iter().position(Option::is_none).map(slot_number)
    }

    /// Puts `dev` at device number `slot`.
    pub fn add_device_at(&self, slot: u8, dev: SharedDevice) -> Result<(), PciError> {
        let mut slots = write(&self.slots);
        let entry = slots
            .get_mut(usize::from(slot))
            .filter(|s| s.is_none())
            .ok_or(PciError::SlotTaken(usize::from(slot)))?;
        let bars = read_bars(&*lock(&dev));
        *entry = Some(Slot { dev, bars });
        Ok(())
    }

    /// Removes the device at `slot` (hot unplug); returns it.
    pub fn remove_device(&self, slot: u8) -> Option<SharedDevice> {
        if slot == 0 {
            return None;
        }
        let mut slots = write(&self.slots);
        slots.get_mut(usize::from(slot))?.take().map(|s| s.dev)
    }

    /// Reads configuration space: absent functions, other buses and invalid accesses
    /// read as all-ones.
    pub fn config_read(&self, bus: u8, device: u8, function: u8, reg: u64, data: &mut [u8]) {
        data.fill(0xff);
        if bus != 0 || function != 0 || !valid_config_access(reg, data.len()) {
            return;
        }
        let slots = read(&self.slots);
        if let Some(Some(slot)) = slots.get(usize::from(device)) {
            lock(&slot.dev).read_config(config_reg(reg), data);
        }
    }

    /// Writes configuration space, then tells the device about any BAR it moved.
    pub fn config_write(&self, bus: u8, device: u8, function: u8, reg: u64, data: &[u8]) {
        if bus != 0 || function != 0 || !valid_config_access(reg, data.len()) {
            return;
        }
        let mut slots = write(&self.slots);
        let Some(Some(slot)) = slots.get_mut(usize::from(device)) else {
            return;
        };
        let mut dev = lock(&slot.dev);
        dev.write_config(config_reg(reg), data);
        for (i, seen) in slot.bars.iter_mut().enumerate() {
            let now = dev.bar(bar_index(i));
            if let (Some(old), Some(new)) = (*seen, now)
                && old.addr != new.addr
            {
                tracing::debug!(device, bar = i, old = old.addr, new = new.addr, "BAR moved");
                dev.bar_moved(bar_index(i), old.addr, new.addr);
            }
            *seen = now;
        }
    }

    fn route<R>(
        &self,
        addr: u64,
        len: usize,
        f: impl FnOnce(&mut dyn PciDevice, u8, u64) -> R,
    ) -> Option<R> {
        let slots = read(&self.slots);
        for slot in slots.iter().flatten() {
            for bar in slot.bars.iter().flatten() {
                if bar.contains(addr) && (addr - bar.addr).saturating_add(len as u64) <= bar.size {
                    let mut dev = lock(&slot.dev);
                    return Some(f(&mut *dev, bar.index, addr - bar.addr));
                }
            }
        }
        None
    }

    /// Reads guest-physical `addr` if a BAR covers it; returns whether one did.
    pub fn mmio_read(&self, addr: u64, data: &mut [u8]) -> bool {
        self.route(addr, data.len(), |dev, bar, off| {
            dev.read_bar(bar, off, data)
        })
        .is_some()
    }

    /// Writes guest-physical `addr` if a BAR covers it; returns whether one did.
    pub fn mmio_write(&self, addr: u64, data: &[u8]) -> bool {
        self.route(addr, data.len(), |dev, bar, off| {
            dev.write_bar(bar, off, data)
        })
        .is_some()
    }
}

/// The host bridge at 00:00.0 (no BARs).
pub struct HostBridge {
    config: PciConfiguration,
}

impl Default for HostBridge {
    fn default() -> Self {
        Self::new()
    }
}

impl HostBridge {
    /// Intel's ID for a virtual PCIe host bridge, as other VMMs use.
    pub fn new() -> Self {
        HostBridge {
            config: PciConfiguration::new(&PciHeader {
                vendor_id: 0x8086,
                device_id: 0x0d57,
                class: 0x06,
                ..PciHeader::default()
            }),
        }
    }
}

impl PciDevice for HostBridge {
    fn read_config(&self, offset: u16, data: &mut [u8]) {
        self.config.read(u64::from(offset), data);
    }

    fn write_config(&mut self, offset: u16, data: &[u8]) {
        self.config.write(u64::from(offset), data);
    }

    fn bar(&self, _index: u8) -> Option<BarInfo> {
        None
    }

    fn bar_moved(&mut self, _index: u8, _old: u64, _new: u64) {}

    fn read_bar(&mut self, _index: u8, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write_bar(&mut self, _index: u8, _offset: u64, _data: &[u8]) {}
}

/// The legacy configuration mechanism: ports 0xCF8 (address, offsets 0..4) and 0xCFC
/// (data, offsets 4..8) relative to 0xCF8. The VMM may intercept a byte write to 0xCF9
/// (reset control) before calling here.
pub struct PciConfigIo {
    bus: Arc<PciBus>,
    address: AtomicU32,
}

/// Base port of [`PciConfigIo`].
pub const CONFIG_IO_PORT: u16 = 0xcf8;
/// Ports [`PciConfigIo`] covers.
pub const CONFIG_IO_SIZE: u16 = 8;

/// The bytes of the 4-byte address register that an access of `len` bytes at `offset`
/// covers, when it lies inside the register.
fn address_bytes(offset: u64, len: u64) -> Option<std::ops::Range<usize>> {
    let end = offset.checked_add(len).filter(|&e| offset < 4 && e <= 4)?;
    Some(usize::try_from(offset).ok()?..usize::try_from(end).ok()?)
}

impl PciConfigIo {
    /// Config ports over `bus`.
    pub fn new(bus: Arc<PciBus>) -> Self {
        PciConfigIo {
            bus,
            address: AtomicU32::new(0),
        }
    }

    /// (bus, device, function, register) of the data port at `offset` (4..8), if the
    /// address register has the enable bit.
    fn target(&self, offset: u64) -> Option<(u8, u8, u8, u64)> {
        let a = self.address.load(Ordering::Relaxed);
        if a & 0x8000_0000 == 0 {
            return None;
        }
        let reg = u64::from(a & 0xfc) + (offset - 4);
        let [_, _, bus, _] = a.to_le_bytes();
        Some((bus, ((a >> 11) & 0x1f) as u8, ((a >> 8) & 7) as u8, reg))
    }

    /// A port read at `offset` (0..8) from 0xCF8.
    pub fn read(&self, offset: u64, data: &mut [u8]) {
        data.fill(0xff);
        let len = data.len() as u64;
        if let Some(range) = address_bytes(offset, len) {
            let a = self.address.load(Ordering::Relaxed).to_le_bytes();
            data.copy_from_slice(&a[range]);
        } else if (4..8).contains(&offset)
            && offset + len <= 8
            && let Some((bus, dev, func, reg)) = self.target(offset)
        {
            self.bus.config_read(bus, dev, func, reg, data);
        }
    }

    /// A port write at `offset` (0..8) from 0xCF8.
    pub fn write(&self, offset: u64, data: &[u8]) {
        let len = data.len() as u64;
        if let Some(range) = address_bytes(offset, len) {
            let mut a = self.address.load(Ordering::Relaxed).to_le_bytes();
            a[range].copy_from_slice(data);
            // Reserved bits (30:24 and 1:0) read as zero.
            self.address
                .store(u32::from_le_bytes(a) & 0x80ff_fffc, Ordering::Relaxed);
        } else if (4..8).contains(&offset)
            && offset + len <= 8
            && let Some((bus, dev, func, reg)) = self.target(offset)
        {
            self.bus.config_write(bus, dev, func, reg, data);
        }
    }
}

/// ECAM: offset = bus << 20 | device << 15 | function << 12 | register.
pub struct PciConfigMmio {
    bus: Arc<PciBus>,
}

/// Bytes of an ECAM window for bus 0 only.
pub const ECAM_BUS_SIZE: u64 = 1 << 20;

impl PciConfigMmio {
    /// ECAM over `bus`.
    pub fn new(bus: Arc<PciBus>) -> Self {
        PciConfigMmio { bus }
    }

    fn decode(offset: u64) -> Option<(u8, u8, u8, u64)> {
        let bus = (offset >> 20).to_le_bytes()[0];
        (offset < 1 << 28).then_some((
            bus,
            ((offset >> 15) & 0x1f) as u8,
            ((offset >> 12) & 7) as u8,
            offset & 0xfff,
        ))
    }

    /// A read at `offset` within the ECAM window.
    pub fn read(&self, offset: u64, data: &mut [u8]) {
        match Self::decode(offset) {
            Some((bus, dev, func, reg)) => self.bus.config_read(bus, dev, func, reg, data),
            None => data.fill(0xff),
        }
    }

    /// A write at `offset` within the ECAM window.
    pub fn write(&self, offset: u64, data: &[u8]) {
        if let Some((bus, dev, func, reg)) = Self::decode(offset) {
            self.bus.config_write(bus, dev, func, reg, data);
        }
    }
}
