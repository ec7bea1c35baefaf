//! PVH boot of an ELF with a `XEN_ELFNOTE_PHYS32_ENTRY` note: the segments are checked
//! against guest RAM, loaded by linux-loader, and `hvm_start_info` (with module list and
//! memory map) is written at [`PVH_INFO_ADDR`]. The vCPU starts in 32-bit flat protected
//! mode at the note's entry with `rbx` pointing at the start info.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use linux_loader::loader::{Elf, KernelLoader, PvhBootCapability};
use vm_memory::{ByteValued, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use super::{
    BootError, BootInfo, BootLayout, HIMEM_START, MemmapEntry, PVH_INFO_ADDR, boot_regs,
    load_initramfs, write_bytes, write_cmdline, write_obj,
};
use crate::config::PayloadConfig;
use crate::kvm::EntryMode;
use crate::memory::MEM_32BIT_HOLE_START;

/// `hvm_start_info.magic`.
pub const START_INFO_MAGIC: u32 = 0x336e_c578;
/// Where the module list (one entry: the initramfs) goes.
const MODLIST_ADDR: u64 = PVH_INFO_ADDR + 0x40;
/// Where the memory map goes.
const MEMMAP_ADDR: u64 = MODLIST_ADDR + 0x40;
/// The most memory-map entries that fit between [`MEMMAP_ADDR`] and the zero page.
#[allow(clippy::cast_possible_truncation)] // a few hundred entries
pub const PVH_MAX_MEMMAP_ENTRIES: usize =
    ((super::ZERO_PAGE_ADDR - MEMMAP_ADDR) / size_of::<hvm_memmap_table_entry>() as u64) as usize;

const ELF_HEADER_SIZE: usize = 64;
const PHDR_SIZE: usize = 56;
const PT_LOAD: u32 = 1;
/// More program headers than any real kernel has; bounds what a hostile file makes us read.
const MAX_PHDRS: usize = 256;

/// Loads an ELF with a PVH note; see the module documentation.
pub(super) fn load(
    mem: &GuestMemoryMmap<()>,
    kernel: &mut File,
    path: &Path,
    payload: &PayloadConfig,
    layout: &BootLayout,
    memmap: &[MemmapEntry],
) -> Result<BootInfo, BootError> {
    let bad = |msg: String| BootError::BadKernel {
        path: path.to_path_buf(),
        msg,
    };
    if memmap.len() > PVH_MAX_MEMMAP_ENTRIES {
        return Err(BootError::MemmapTooLarge(memmap.len()));
    }
    let segments = check_segments(mem, kernel, path)?;
    let result =
        Elf::load(mem, None, kernel, Some(GuestAddress(HIMEM_START))).map_err(|source| {
            BootError::Loader {
                path: path.to_path_buf(),
                source,
            }
        })?;
    let entry = match result.pvh_boot_cap {
        PvhBootCapability::PvhEntryPresent(addr) => addr.0,
        _ => {
            return Err(bad(
                "ELF without a PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY); only PVH ELF \
                 kernels can be booted"
                    .into(),
            ));
        }
    };
    if !mem.address_in_range(GuestAddress(entry)) {
        return Err(bad(format!("PVH entry {entry:#x} is outside guest RAM")));
    }
    // linux-loader copies p_filesz bytes; zero the rest of each segment (.bss), which
    // matters when memory is reused (reboot).
    let mut kernel_end = HIMEM_START;
    for (paddr, filesz, memsz) in segments {
        zero(mem, paddr + filesz, memsz - filesz)?;
        kernel_end = kernel_end.max(paddr + memsz);
    }

    let cmdline_len = write_cmdline(mem, &payload.cmdline, u64::MAX)?;
    let initramfs = load_initramfs(mem, payload, memmap, MEM_32BIT_HOLE_START, kernel_end)?;

    let mut info = hvm_start_info {
        magic: START_INFO_MAGIC,
        version: 1,
        cmdline_paddr: if cmdline_len > 1 {
            super::CMDLINE_ADDR
        } else {
            0
        },
        rsdp_paddr: layout.rsdp_addr,
        memmap_paddr: MEMMAP_ADDR,
        memmap_entries: u32::try_from(memmap.len())
            .map_err(|_| BootError::MemmapTooLarge(memmap.len()))?,
        ..Default::default()
    };
    if let Some((paddr, size)) = initramfs {
        write_obj(
            mem,
            "PVH module list",
            MODLIST_ADDR,
            hvm_modlist_entry {
                paddr,
                size,
                ..Default::default()
            },
        )?;
        info.nr_modules = 1;
        info.modlist_paddr = MODLIST_ADDR;
    }
    let mut table = Vec::with_capacity(memmap.len() * size_of::<hvm_memmap_table_entry>());
    for e in memmap {
        let entry = hvm_memmap_table_entry {
            addr: e.addr,
            size: e.size,
            type_: e.kind,
            reserved: 0,
        };
        table.extend_from_slice(entry.as_slice());
    }
    write_bytes(mem, "PVH memory map", MEMMAP_ADDR, &table)?;
    write_obj(mem, "PVH start info", PVH_INFO_ADDR, info)?;

    let mut regs = boot_regs(entry);
    regs.rbx = PVH_INFO_ADDR;
    Ok(BootInfo {
        entry: EntryMode::Protected32,
        regs,
    })
}

/// Reads the ELF and program headers and checks every loadable segment: in the file,
/// `filesz <= memsz`, at or above 1 MiB, and inside one RAM region. Returns
/// `(paddr, filesz, memsz)` of each.
fn check_segments(
    mem: &GuestMemoryMmap<()>,
    file: &mut File,
    path: &Path,
) -> Result<Vec<(u64, u64, u64)>, BootError> {
    let bad = |msg: String| BootError::BadKernel {
        path: path.to_path_buf(),
        msg,
    };
    let io = |source| BootError::Io {
        what: "payload.kernel",
        path: path.to_path_buf(),
        source,
    };
    let file_len = file.seek(SeekFrom::End(0)).map_err(io)?;
    let mut eh = [0u8; ELF_HEADER_SIZE];
    let n = super::read_up_to(file, &mut eh).map_err(io)?;
    if n < ELF_HEADER_SIZE {
        return Err(bad(format!("truncated ELF header ({n} bytes)")));
    }
    // e_ident: 64-bit, little-endian, version 1; e_machine x86-64.
    if eh[4] != 2 || eh[5] != 1 || eh[6] != 1 {
        return Err(bad("not a 64-bit little-endian ELF".into()));
    }
    if u16_at(&eh, 18) != 62 {
        return Err(bad("not an x86-64 ELF".into()));
    }
    let phoff = u64_at(&eh, 32);
    let phentsize = usize::from(u16_at(&eh, 54));
    let phnum = usize::from(u16_at(&eh, 56));
    if phentsize != PHDR_SIZE || phnum == 0 || phnum > MAX_PHDRS {
        return Err(bad(format!(
            "bad program header table ({phnum} entries of {phentsize} bytes)"
        )));
    }
    let table_len = (phnum * PHDR_SIZE) as u64;
    if phoff
        .checked_add(table_len)
        .is_none_or(|end| end > file_len)
    {
        return Err(bad(
            "program header table runs past the end of the file".into()
        ));
    }
    let mut table = vec![0u8; phnum * PHDR_SIZE];
    file.seek(SeekFrom::Start(phoff)).map_err(io)?;
    file.read_exact(&mut table).map_err(io)?;
    let mut segments = Vec::new();
    for (i, ph) in table.chunks_exact(PHDR_SIZE).enumerate() {
        let (ptype, offset, paddr) = (u32_at(ph, 0), u64_at(ph, 8), u64_at(ph, 24));
        let (filesz, memsz) = (u64_at(ph, 32), u64_at(ph, 40));
        if ptype != PT_LOAD || filesz == 0 {
            continue;
        }
        if offset.checked_add(filesz).is_none_or(|end| end > file_len) {
            return Err(bad(format!(
                "segment {i} runs past the end of the file (truncated?)"
            )));
        }
        if filesz > memsz {
            return Err(bad(format!("segment {i}: file size exceeds memory size")));
        }
        let fits = paddr >= HIMEM_START
            && paddr.checked_add(memsz).is_some()
            && usize::try_from(memsz).is_ok_and(|len| mem.check_range(GuestAddress(paddr), len));
        if !fits {
            return Err(bad(format!(
                "segment {i} ({paddr:#x}, {memsz:#x} bytes) is not inside guest RAM above 1 MiB"
            )));
        }
        segments.push((paddr, filesz, memsz));
    }
    if segments.is_empty() {
        return Err(bad("no loadable segment".into()));
    }
    Ok(segments)
}

/// Writes `len` zero bytes at `addr`.
#[allow(clippy::cast_possible_truncation)] // CHUNK and n <= CHUNK are 64 KiB at most
fn zero(mem: &GuestMemoryMmap<()>, addr: u64, len: u64) -> Result<(), BootError> {
    const CHUNK: u64 = 1 << 16;
    let zeros = [0u8; CHUNK as usize];
    let mut done = 0;
    while done < len {
        let n = (len - done).min(CHUNK);
        write_bytes(mem, "ELF .bss", addr + done, &zeros[..n as usize])?;
        done += n;
    }
    Ok(())
}

fn u16_at(b: &[u8], off: usize) -> u16 {
    u16::from_le_bytes([b[off], b[off + 1]])
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[off..off + 4]);
    u32::from_le_bytes(a)
}

fn u64_at(b: &[u8], off: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[off..off + 8]);
    u64::from_le_bytes(a)
}
