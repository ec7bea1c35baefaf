//! The configuration space of one PCI function: a type 0 header, up to six memory BARs
//! with sizing, and a capabilities list. Guest writes go through per-byte write masks, so
//! read-only fields stay read-only whatever the guest writes.

use super::{BarInfo, PciError};

/// Bytes of a function's configuration space as ECAM exposes it (the extended space
/// beyond the first 256 bytes reads as zero: no extended capabilities).
pub const CONFIG_SPACE_SIZE: usize = 4096;
/// Bytes of the conventional configuration space.
const STD_SIZE: usize = 256;
/// First byte of the capabilities area.
const CAP_START: usize = 0x40;
/// Offset of the first BAR register.
pub const BAR0: usize = 0x10;
/// Number of BAR registers of a type 0 header.
pub const NUM_BARS: usize = 6;
/// Command register bit: memory space decoding enabled.
pub const COMMAND_MEMORY: u16 = 1 << 1;
/// Status register bit: the capabilities list exists.
const STATUS_CAP_LIST: u16 = 1 << 4;

/// The identity of a function, written into its header.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PciHeader {
    /// Vendor ID.
    pub vendor_id: u16,
    /// Device ID.
    pub device_id: u16,
    /// Revision ID.
    pub revision: u8,
    /// Class code (base class).
    pub class: u8,
    /// Subclass.
    pub subclass: u8,
    /// Programming interface.
    pub prog_if: u8,
    /// Subsystem vendor ID.
    pub subsystem_vendor_id: u16,
    /// Subsystem ID.
    pub subsystem_id: u16,
}

/// What a BAR is made of.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BarSpec {
    /// Size in bytes: a power of two, at least 16.
    pub size: u64,
    /// A 64-bit memory BAR (takes two BAR registers).
    pub mem64: bool,
    /// Prefetchable memory.
    pub prefetchable: bool,
    /// Initial guest-physical address (aligned to `size`).
    pub addr: u64,
}

#[derive(Clone, Copy, Debug, Default)]
struct Bar {
    size: u64,
    mem64: bool,
    prefetchable: bool,
    /// The address the registers hold now.
    addr: u64,
    /// The address last made visible through [`PciConfiguration::bar`].
    committed: u64,
    /// The guest wrote all-ones to the low (0) or high (1) register: reads return the
    /// size mask until the next write.
    probing: [bool; 2],
}

/// A type 0 configuration space.
#[derive(Clone, Debug)]
pub struct PciConfiguration {
    regs: Vec<u8>,
    wmask: Vec<u8>,
    bars: [Option<Bar>; NUM_BARS],
    /// Which BAR register slots belong to the upper half of a 64-bit BAR.
    upper_of: [Option<usize>; NUM_BARS],
    last_cap: Option<usize>,
    next_cap: usize,
}

impl PciConfiguration {
    /// A configuration space with `header` and no BARs or capabilities.
    pub fn new(header: &PciHeader) -> Self {
        let mut c = PciConfiguration {
            regs: vec![0; STD_SIZE],
            wmask: vec![0; STD_SIZE],
            bars: [None; NUM_BARS],
            upper_of: [None; NUM_BARS],
            last_cap: None,
            next_cap: CAP_START,
        };
        c.put(0x00, &header.vendor_id.to_le_bytes());
        c.put(0x02, &header.device_id.to_le_bytes());
        c.regs[0x08] = header.revision;
        c.regs[0x09] = header.prog_if;
        c.regs[0x0a] = header.subclass;
        c.regs[0x0b] = header.class;
        c.put(0x2c, &header.subsystem_vendor_id.to_le_bytes());
        c.put(0x2e, &header.subsystem_id.to_le_bytes());
        // Command: I/O space, memory space, bus master, INTx disable.
        c.wmask[0x04] = 0x07;
        c.wmask[0x05] = 0x04;
        // Cache line size, latency timer, interrupt line.
        c.wmask[0x0c] = 0xff;
        c.wmask[0x0d] = 0xff;
        c.wmask[0x3c] = 0xff;
        c
    }

    fn put(&mut self, offset: usize, bytes: &[u8]) {
        self.regs[offset..offset + bytes.len()].copy_from_slice(bytes);
    }

    /// Declares BAR `index` (a 64-bit BAR also takes register `index + 1`).
    pub fn add_bar(&mut self, index: usize, spec: BarSpec) -> Result<(), PciError> {
        let regs_needed = if spec.mem64 { 2 } else { 1 };
        let fits = index + regs_needed <= NUM_BARS;
        let free = fits
            && (index..index + regs_needed)
                .all(|i| self.bars[i].is_none() && self.upper_of[i].is_none());
        if !free {
            return Err(PciError::BarSlot(index));
        }
        let max = if spec.mem64 { u64::MAX } else { 1 << 31 };
        if !spec.size.is_power_of_two() || spec.size < 16 || spec.size > max {
            return Err(PciError::BarSize(spec.size));
        }
        if !spec.addr.is_multiple_of(spec.size) || (!spec.mem64 && spec.addr > u64::from(u32::MAX))
        {
            return Err(PciError::BarAddress(spec.addr));
        }
        self.bars[index] = Some(Bar {
            size: spec.size,
            mem64: spec.mem64,
            prefetchable: spec.prefetchable,
            addr: spec.addr,
            committed: spec.addr,
            probing: [false; 2],
        });
        if spec.mem64 {
            self.upper_of[index + 1] = Some(index);
        }
        Ok(())
    }

    /// BAR `index` as last committed (a 64-bit BAR's address changes once both halves
    /// are written, or at the next write elsewhere).
    pub fn bar(&self, index: usize) -> Option<BarInfo> {
        let bar = self.bars.get(index)?.as_ref()?;
        Some(BarInfo {
            // Found in `bars`, so below NUM_BARS (6).
            index: u8::try_from(index).ok()?,
            addr: bar.committed,
            size: bar.size,
            mem64: bar.mem64,
            prefetchable: bar.prefetchable,
        })
    }

    /// Appends a capability: `body` starts with the capability ID and a placeholder
    /// "next" byte; `wmask` (as long as `body` or shorter) says which bits the guest may
    /// write. Returns the capability's offset.
    pub fn add_capability(&mut self, body: &[u8], wmask: &[u8]) -> Result<usize, PciError> {
        let offset = self.next_cap;
        if body.len() < 2 || wmask.len() > body.len() || offset + body.len() > STD_SIZE {
            return Err(PciError::CapabilitySpace(body.len()));
        }
        self.put(offset, body);
        self.regs[offset + 1] = 0;
        self.wmask[offset..offset + wmask.len()].copy_from_slice(wmask);
        // Never let the guest rewrite the ID or the link.
        self.wmask[offset] = 0;
        self.wmask[offset + 1] = 0;
        // Checked above: the capability ends inside the 256-byte standard space.
        #[allow(clippy::cast_possible_truncation)]
        let link = offset as u8;
        match self.last_cap {
            Some(prev) => self.regs[prev + 1] = link,
            None => {
                self.regs[0x34] = link;
                let status = u16::from_le_bytes([self.regs[6], self.regs[7]]) | STATUS_CAP_LIST;
                self.put(0x06, &status.to_le_bytes());
            }
        }
        self.last_cap = Some(offset);
        self.next_cap = (offset + body.len()).next_multiple_of(4);
        Ok(offset)
    }

    /// Reads a little-endian u16 of the conventional space (0 out of range).
    pub fn read_u16(&self, offset: usize) -> u16 {
        let mut b = [0u8; 2];
        self.read(offset as u64, &mut b);
        u16::from_le_bytes(b)
    }

    /// The command register.
    pub fn command(&self) -> u16 {
        self.read_u16(0x04)
    }

    /// Reads `data.len()` bytes at `offset`; bytes past the conventional space read zero.
    pub fn read(&self, offset: u64, data: &mut [u8]) {
        for (i, byte) in data.iter_mut().enumerate() {
            let off = offset.saturating_add(i as u64);
            *byte = match usize::try_from(off) {
                Ok(off) if off < STD_SIZE => self.read_byte(off),
                _ => 0,
            };
        }
    }

    fn read_byte(&self, off: usize) -> u8 {
        if (BAR0..BAR0 + 4 * NUM_BARS).contains(&off) {
            let reg = (off - BAR0) / 4;
            return self.bar_register(reg).to_le_bytes()[off % 4];
        }
        self.regs[off]
    }

    /// The value BAR register `reg` reads as.
    fn bar_register(&self, reg: usize) -> u32 {
        if let Some(bar) = self.bars[reg] {
            let flags = (if bar.mem64 { 0b100 } else { 0 }) | (u32::from(bar.prefetchable) << 3);
            let value = if bar.probing[0] {
                !(bar.size - 1)
            } else {
                bar.addr
            };
            // The low dword of the BAR: dropping the high half is the point.
            #[allow(clippy::cast_possible_truncation)]
            let low = value as u32;
            return (low & !0xf) | flags;
        }
        if let Some(lower) = self.upper_of[reg]
            && let Some(bar) = self.bars[lower]
        {
            let value = if bar.probing[1] {
                !(bar.size - 1)
            } else {
                bar.addr
            };
            return (value >> 32) as u32;
        }
        0
    }

    /// Writes `data` at `offset` through the write masks. Accesses past the conventional
    /// space are ignored.
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        let Ok(start) = usize::try_from(offset) else {
            return;
        };
        if start >= STD_SIZE || data.is_empty() {
            return;
        }
        let end = start.saturating_add(data.len()).min(STD_SIZE);
        let bar_area = BAR0..BAR0 + 4 * NUM_BARS;
        let mut low_half_of_64 = false;
        let mut reg = start;
        while reg < end {
            let dword = reg & !3;
            if bar_area.contains(&dword) {
                let idx = (dword - BAR0) / 4;
                let mut bytes = self.bar_register(idx).to_le_bytes();
                // Probing state is not the register's value: rebuild from the address.
                if let Some(bar) = self.bars[idx] {
                    // The low dword of the address: dropping the high half is the point.
                    #[allow(clippy::cast_possible_truncation)]
                    let low = bar.addr as u32;
                    bytes = ((low & !0xf) | (u32::from(bytes[0]) & 0xf)).to_le_bytes();
                } else if let Some(lower) = self.upper_of[idx]
                    && let Some(bar) = self.bars[lower]
                {
                    bytes = ((bar.addr >> 32) as u32).to_le_bytes();
                }
                let last = (dword + 4).min(end);
                bytes[reg - dword..last - dword].copy_from_slice(&data[reg - start..last - start]);
                low_half_of_64 |= self.bars[idx].is_some_and(|b| b.mem64);
                self.write_bar_register(idx, u32::from_le_bytes(bytes));
                reg = last;
                continue;
            }
            let mask = self.wmask[reg];
            self.regs[reg] = (self.regs[reg] & !mask) | (data[reg - start] & mask);
            reg += 1;
        }
        if !low_half_of_64 {
            for bar in self.bars.iter_mut().flatten() {
                bar.committed = bar.addr;
            }
        }
    }

    fn write_bar_register(&mut self, reg: usize, value: u32) {
        let probe = value == u32::MAX;
        if let Some(bar) = self.bars[reg].as_mut() {
            bar.probing[0] = probe;
            if !probe {
                let mask = !(bar.size - 1) & 0xffff_fff0;
                bar.addr = (bar.addr & !0xffff_ffff) | (u64::from(value) & mask);
            }
        } else if let Some(lower) = self.upper_of[reg]
            && let Some(bar) = self.bars[lower].as_mut()
        {
            bar.probing[1] = probe;
            if !probe {
                let mask = !(bar.size - 1) >> 32;
                bar.addr = (bar.addr & 0xffff_ffff) | ((u64::from(value) & mask) << 32);
            }
        }
    }
}
