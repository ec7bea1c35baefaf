//! PCI configuration space (0xCF8/0xCFC or ECAM MMIO) and the ACPI tables the guest reads
//! (MCFG for the ECAM base, FADT for poweroff).

use crate::io::{inl, outl, outw, rd, wr};

/// How configuration space is reached.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Legacy mechanism #1 (0xCF8 address, 0xCFC data).
    Port,
    /// Memory-mapped ECAM at this base (bus 0 at the base).
    Ecam(u64),
}

/// A bus/device/function.
#[derive(Clone, Copy)]
pub struct Bdf {
    /// Bus.
    pub bus: u8,
    /// Device.
    pub dev: u8,
    /// Function.
    pub func: u8,
}

impl Bdf {
    fn port_addr(self, off: u16) -> u32 {
        0x8000_0000
            | (self.bus as u32) << 16
            | (self.dev as u32) << 11
            | (self.func as u32) << 8
            | (off as u32 & 0xFC)
    }

    fn ecam_addr(self, base: u64, off: u16) -> u64 {
        base + ((self.bus as u64) << 20
            | (self.dev as u64) << 15
            | (self.func as u64) << 12
            | off as u64)
    }
}

/// Configuration-space accessor.
#[derive(Clone, Copy)]
pub struct Config {
    /// The mechanism in use.
    pub access: Access,
}

impl Config {
    /// Reads a dword (`off` 4-aligned).
    pub fn read32(&self, b: Bdf, off: u16) -> u32 {
        match self.access {
            Access::Port => {
                outl(0xCF8, b.port_addr(off));
                inl(0xCFC)
            }
            Access::Ecam(base) => rd::<u32>(b.ecam_addr(base, off & !3)),
        }
    }

    /// Reads a word (`off` 2-aligned).
    pub fn read16(&self, b: Bdf, off: u16) -> u16 {
        (self.read32(b, off & !3) >> ((off & 2) * 8)) as u16
    }

    /// Reads a byte.
    pub fn read8(&self, b: Bdf, off: u16) -> u8 {
        (self.read32(b, off & !3) >> ((off & 3) * 8)) as u8
    }

    /// Writes a word (`off` 2-aligned).
    pub fn write16(&self, b: Bdf, off: u16, val: u16) {
        match self.access {
            Access::Port => {
                outl(0xCF8, b.port_addr(off));
                outw(0xCFC + (off & 2), val);
            }
            Access::Ecam(base) => wr::<u16>(b.ecam_addr(base, off & !1), val),
        }
    }

    /// Offset of the first capability (`after` = 0) or the one following `after`.
    pub fn next_cap(&self, b: Bdf, after: u16) -> Option<u16> {
        if after == 0 {
            if self.read16(b, 0x06) & 0x10 == 0 {
                return None;
            }
            let p = self.read8(b, 0x34) as u16 & !3;
            return if p == 0 { None } else { Some(p) };
        }
        let p = self.read8(b, after + 1) as u16 & !3;
        if p == 0 { None } else { Some(p) }
    }

    /// Address of BAR `n` (memory BARs, 64-bit ones combined with the next register).
    pub fn bar_addr(&self, b: Bdf, n: u8) -> u64 {
        let off = 0x10 + 4 * n as u16;
        let lo = self.read32(b, off);
        if lo & 1 != 0 {
            return (lo & !3) as u64;
        }
        let mut addr = (lo & !0xF) as u64;
        if (lo >> 1) & 3 == 2 && n < 5 {
            addr |= (self.read32(b, off + 4) as u64) << 32;
        }
        addr
    }
}

fn sig_at(addr: u64, sig: &[u8]) -> bool {
    sig.iter()
        .enumerate()
        .all(|(i, &c)| rd::<u8>(addr + i as u64) == c)
}

/// The RSDP: the PVH start info's, else a scan of the BIOS area.
pub fn find_rsdp(from_start_info: u64) -> Option<u64> {
    if from_start_info != 0 && sig_at(from_start_info, b"RSD PTR ") {
        return Some(from_start_info);
    }
    let mut a = 0xE0000u64;
    while a < 0x100000 {
        if sig_at(a, b"RSD PTR ") {
            return Some(a);
        }
        a += 16;
    }
    None
}

/// Address of the ACPI table with signature `sig` (through the XSDT, else the RSDT).
pub fn find_table(rsdp: u64, sig: &[u8; 4]) -> Option<u64> {
    let rev = rd::<u8>(rsdp + 15);
    let (sdt, entry) = if rev >= 2 && rd::<u64>(rsdp + 24) != 0 {
        (rd::<u64>(rsdp + 24), 8u64)
    } else {
        (rd::<u32>(rsdp + 16) as u64, 4u64)
    };
    if sdt == 0 || sdt >= 1 << 32 {
        return None;
    }
    let len = rd::<u32>(sdt + 4) as u64;
    let mut p = sdt + 36;
    while p + entry <= sdt + len {
        let t = if entry == 8 {
            rd::<u64>(p)
        } else {
            rd::<u32>(p) as u64
        };
        if t != 0 && t < 1 << 32 && sig_at(t, sig) {
            return Some(t);
        }
        p += entry;
    }
    None
}

/// The ECAM base of segment 0 from the MCFG table.
pub fn mcfg_base(rsdp: u64) -> Option<u64> {
    let t = find_table(rsdp, b"MCFG")?;
    if rd::<u32>(t + 4) < 44 + 16 {
        return None;
    }
    let base = rd::<u64>(t + 44);
    if base == 0 || base >= 1 << 32 {
        None
    } else {
        Some(base)
    }
}

/// Resets through the FADT's `RESET_REG` (a generic address at offset 116) with its
/// `RESET_VALUE` (offset 128); does nothing without a FADT or a reset register.
pub fn acpi_reset(rsdp: u64) {
    let Some(fadt) = find_table(rsdp, b"FACP") else {
        return;
    };
    if rd::<u32>(fadt + 4) < 129 {
        return;
    }
    let space = rd::<u8>(fadt + 116);
    let addr = rd::<u64>(fadt + 120);
    let val = rd::<u8>(fadt + 128);
    match space {
        0 if addr != 0 => wr::<u8>(addr, val),
        1 if addr != 0 => crate::io::outb(addr as u16, val),
        _ => {}
    }
}

/// Powers off through the FADT: the hardware-reduced sleep control register when present,
/// else PM1a_CNT. `slp_typ` is the S5 sleep type (the DSDT's `\_S5`).
pub fn acpi_poweroff(rsdp: u64, slp_typ: u8) {
    let Some(fadt) = find_table(rsdp, b"FACP") else {
        return;
    };
    let len = rd::<u32>(fadt + 4);
    if len >= 256 {
        let space = rd::<u8>(fadt + 244);
        let addr = rd::<u64>(fadt + 248);
        let val = ((slp_typ & 7) << 2) | 0x20;
        if addr != 0 {
            match space {
                0 => wr::<u8>(addr, val),
                1 => crate::io::outb(addr as u16, val),
                _ => {}
            }
        }
    }
    let pm1a = rd::<u32>(fadt + 64);
    if pm1a != 0 {
        outw(pm1a as u16, ((slp_typ as u16 & 7) << 10) | 0x2000);
    }
}
