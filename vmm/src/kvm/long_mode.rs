//! Boot-time CPU state: the GDT, IDT and identity-mapped page tables written into guest
//! memory at fixed low addresses, and the special registers for 64-bit long-mode entry
//! (Linux 64-bit boot protocol, test guests) or 32-bit flat protected mode (PVH entry).
//!
//! Guest physical layout used here (all below 0x10000; the loader's zero page at 0x7000,
//! PVH start info at 0x6000 and command line at 0x20000 stay free):
//!
//! | address | size | content |
//! |---|---|---|
//! | [`BOOT_GDT_ADDR`] 0x500 | 5 x 8 B | null, code64, data, TSS, code32 descriptors |
//! | [`BOOT_IDT_ADDR`] 0x540 | 8 B | empty IDT (limit 7) |
//! | [`PML4_ADDR`] 0x9000 | 4 KiB | PML4: entry 0 -> PDPT |
//! | [`PDPT_ADDR`] 0xa000 | 4 KiB | PDPT: entries 0..4 -> the 4 page directories |
//! | [`PD_ADDR`] 0xb000 | 4 x 4 KiB | 2 MiB pages identity-mapping 0..4 GiB |
//!
//! Page-table entries have the user bit set, so a test guest may drop to CPL3 on them.

use kvm_bindings::{kvm_segment, kvm_sregs};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::{KvmError, Result};

/// Guest physical address of the boot GDT.
pub const BOOT_GDT_ADDR: u64 = 0x500;
/// Guest physical address of the boot IDT (one empty entry).
pub const BOOT_IDT_ADDR: u64 = 0x540;
/// Guest physical address of the PML4.
pub const PML4_ADDR: u64 = 0x9000;
/// Guest physical address of the PDPT.
pub const PDPT_ADDR: u64 = 0xa000;
/// Guest physical address of the first of [`IDENTITY_MAP_GIB`] page directories.
pub const PD_ADDR: u64 = 0xb000;
/// GiB identity-mapped with 2 MiB pages by the boot page tables.
pub const IDENTITY_MAP_GIB: u64 = 4;

/// The boot GDT: null, 64-bit code (selector 0x08), flat data (0x10), TSS (0x18),
/// 32-bit flat code (0x20).
pub const BOOT_GDT: [u64; 5] = [
    0,
    0x00af_9b00_0000_ffff,
    0x00cf_9300_0000_ffff,
    0x008f_8b00_0000_ffff,
    0x00cf_9b00_0000_ffff,
];
/// Selector of the 64-bit code segment.
pub const CODE64_SELECTOR: u16 = 0x08;
/// Selector of the flat data segment.
pub const DATA_SELECTOR: u16 = 0x10;
/// Selector of the TSS.
pub const TSS_SELECTOR: u16 = 0x18;
/// Selector of the 32-bit flat code segment.
pub const CODE32_SELECTOR: u16 = 0x20;

const CR0_PE: u64 = 1;
const CR0_MP: u64 = 1 << 1;
const CR0_ET: u64 = 1 << 4;
const CR0_NE: u64 = 1 << 5;
const CR0_WP: u64 = 1 << 16;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const CR4_OSFXSR: u64 = 1 << 9;
const CR4_OSXMMEXCPT: u64 = 1 << 10;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;
const PTE_PRESENT_RW_USER: u64 = 0x7;
const PDE_PS: u64 = 0x80;

/// The mode a vCPU starts in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EntryMode {
    /// 64-bit long mode, paging on with the boot identity map, SSE enabled.
    #[default]
    Long64,
    /// 32-bit flat protected mode, paging off (the PVH entry point).
    Protected32,
}

/// Writes the boot GDT, IDT and (for long mode) page tables into guest memory.
pub fn write_boot_tables(mem: &GuestMemoryMmap<()>, mode: EntryMode) -> Result<()> {
    for (i, desc) in BOOT_GDT.iter().enumerate() {
        write_u64(mem, BOOT_GDT_ADDR + 8 * i as u64, *desc)?;
    }
    write_u64(mem, BOOT_IDT_ADDR, 0)?;
    if mode == EntryMode::Long64 {
        write_u64(mem, PML4_ADDR, PDPT_ADDR | PTE_PRESENT_RW_USER)?;
        for i in 0..512u64 {
            let pdpte = if i < IDENTITY_MAP_GIB {
                (PD_ADDR + i * 0x1000) | PTE_PRESENT_RW_USER
            } else {
                0
            };
            write_u64(mem, PDPT_ADDR + 8 * i, pdpte)?;
        }
        for i in 0..IDENTITY_MAP_GIB * 512 {
            write_u64(
                mem,
                PD_ADDR + 8 * i,
                (i << 21) | PDE_PS | PTE_PRESENT_RW_USER,
            )?;
        }
    }
    Ok(())
}

fn write_u64(mem: &GuestMemoryMmap<()>, addr: u64, val: u64) -> Result<()> {
    mem.write_obj(val, GuestAddress(addr))
        .map_err(|e| KvmError::GuestMemory {
            addr,
            msg: e.to_string(),
        })
}

/// Converts a GDT descriptor to the `kvm_segment` KVM expects for the selector
/// `index * 8`.
// Extracting the descriptor's bit fields: each masked value fits the field it is cast to.
#[allow(clippy::cast_possible_truncation)]
pub fn segment_from_gdt(entry: u64, index: u16) -> kvm_segment {
    let base = ((entry & 0xff00_0000_0000_0000) >> 32)
        | ((entry & 0x0000_00ff_0000_0000) >> 16)
        | ((entry & 0x0000_0000_ffff_0000) >> 16);
    let raw_limit = (((entry & 0x000f_0000_0000_0000) >> 32) | (entry & 0xffff)) as u32;
    let g = ((entry >> 55) & 1) as u8;
    let limit = if g == 1 {
        (raw_limit << 12) | 0xfff
    } else {
        raw_limit
    };
    let present = ((entry >> 47) & 1) as u8;
    kvm_segment {
        base,
        limit,
        selector: index * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g,
        avl: ((entry >> 52) & 1) as u8,
        unusable: u8::from(present == 0),
        padding: 0,
    }
}

/// Fills the segment, descriptor-table and control registers of `sregs` for `mode`
/// (other fields, e.g. the APIC base, are kept).
pub fn configure_sregs(sregs: &mut kvm_sregs, mode: EntryMode) {
    let seg = |sel: u16| segment_from_gdt(BOOT_GDT[usize::from(sel / 8)], sel / 8);
    sregs.gdt.base = BOOT_GDT_ADDR;
    #[allow(clippy::cast_possible_truncation)] // a handful of 8-byte descriptors
    let gdt_limit = (BOOT_GDT.len() * 8 - 1) as u16;
    sregs.gdt.limit = gdt_limit;
    sregs.idt.base = BOOT_IDT_ADDR;
    sregs.idt.limit = 7;
    let data = seg(DATA_SELECTOR);
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = seg(TSS_SELECTOR);
    match mode {
        EntryMode::Long64 => {
            sregs.cs = seg(CODE64_SELECTOR);
            sregs.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_PG;
            sregs.cr3 = PML4_ADDR;
            sregs.cr4 = CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT;
            sregs.efer = EFER_LME | EFER_LMA;
        }
        EntryMode::Protected32 => {
            sregs.cs = seg(CODE32_SELECTOR);
            sregs.cr0 = CR0_PE | CR0_ET;
            sregs.cr3 = 0;
            sregs.cr4 = 0;
            sregs.efer = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code64_segment_is_long_and_flat() {
        let cs = segment_from_gdt(BOOT_GDT[1], 1);
        assert_eq!(cs.selector, CODE64_SELECTOR);
        assert_eq!((cs.l, cs.db, cs.present, cs.s, cs.type_), (1, 0, 1, 1, 0xb));
        assert_eq!((cs.base, cs.limit, cs.g), (0, 0xffff_ffff, 1));
    }

    #[test]
    fn data_and_tss_segments() {
        let ds = segment_from_gdt(BOOT_GDT[2], 2);
        assert_eq!((ds.type_, ds.db, ds.l, ds.limit), (3, 1, 0, 0xffff_ffff));
        let tr = segment_from_gdt(BOOT_GDT[3], 3);
        assert_eq!((tr.type_, tr.s, tr.selector), (0xb, 0, TSS_SELECTOR));
        let null = segment_from_gdt(0, 0);
        assert_eq!(null.unusable, 1);
    }

    #[test]
    fn page_tables_identity_map_4g() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        write_boot_tables(&mem, EntryMode::Long64).unwrap();
        let r = |a: u64| mem.read_obj::<u64>(GuestAddress(a)).unwrap();
        assert_eq!(r(PML4_ADDR), PDPT_ADDR | 7);
        assert_eq!(r(PDPT_ADDR + 24), (PD_ADDR + 0x3000) | 7);
        assert_eq!(r(PDPT_ADDR + 32), 0);
        // Last 2 MiB page below 4 GiB.
        assert_eq!(r(PD_ADDR + 8 * 2047), (2047 << 21) | 0x87);
        assert_eq!(r(BOOT_GDT_ADDR + 8), BOOT_GDT[1]);
    }
}
