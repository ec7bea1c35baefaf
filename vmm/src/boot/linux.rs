//! Linux 64-bit boot protocol for a `bzImage`: the protected-mode kernel is loaded at
//! 1 MiB by linux-loader, the zero page (`boot_params`) at [`ZERO_PAGE_ADDR`] gets the
//! image's setup header, the command line, the initramfs and the e820 map, and the vCPU
//! starts in long mode at load address + 0x200 with `rsi` pointing at the zero page.
//! See Documentation/arch/x86/boot.rst in the kernel tree.

use std::fs::File;
use std::path::Path;

use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::{BzImage, KernelLoader};
use vm_memory::{GuestAddress, GuestMemoryMmap};

use super::{
    BootError, BootInfo, BootLayout, CMDLINE_ADDR, HIMEM_START, MemmapEntry, ZERO_PAGE_ADDR,
    boot_regs, load_initramfs, write_cmdline, write_obj,
};
use crate::config::PayloadConfig;
use crate::kvm::EntryMode;
use crate::memory::MEM_32BIT_HOLE_START;

/// The most e820 entries the zero page holds.
pub const E820_MAX_ENTRIES: usize = 128;
/// Oldest boot protocol accepted: 2.12 has `xloadflags` and the 64-bit entry.
const MIN_PROTOCOL: u16 = 0x020c;
/// `xloadflags`: the kernel has the 64-bit entry at load address + 0x200.
const XLF_KERNEL_64: u16 = 1;
/// `type_of_loader`: an unregistered boot loader.
const LOADER_UNDEFINED: u8 = 0xff;
/// Offset of the 64-bit entry from the load address.
const STARTUP_64_OFFSET: u64 = 0x200;

/// Loads a bzImage; see the module documentation.
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
    if memmap.len() > E820_MAX_ENTRIES {
        return Err(BootError::MemmapTooLarge(memmap.len()));
    }
    // Load at 1 MiB whatever code32_start says: a 64-bit kernel relocates itself.
    let result =
        BzImage::load(mem, Some(GuestAddress(HIMEM_START)), kernel, None).map_err(|source| {
            BootError::Loader {
                path: path.to_path_buf(),
                source,
            }
        })?;
    let Some(mut hdr) = result.setup_header else {
        return Err(bad("no setup header".into()));
    };
    let version = hdr.version;
    if version < MIN_PROTOCOL {
        return Err(bad(format!(
            "boot protocol {}.{:02} is too old (2.12 or later needed)",
            version >> 8,
            version & 0xff
        )));
    }
    let xloadflags = hdr.xloadflags;
    if xloadflags & XLF_KERNEL_64 == 0 {
        return Err(bad("not a 64-bit kernel (no XLF_KERNEL_64)".into()));
    }
    let load = result.kernel_load.0;
    // The kernel needs init_size bytes from where it runs; keep the initramfs clear of it
    // both at the load address and at its preferred address.
    let init_size = u64::from(hdr.init_size);
    let pref = hdr.pref_address;
    let kernel_end = result
        .kernel_end
        .max(load.saturating_add(init_size))
        .max(pref.saturating_add(init_size));

    // cmdline_size excludes the NUL.
    let cmdline_max = u64::from(hdr.cmdline_size).saturating_add(1);
    write_cmdline(mem, &payload.cmdline, cmdline_max)?;
    let initrd_limit = u64::from(hdr.initrd_addr_max)
        .saturating_add(1)
        .min(MEM_32BIT_HOLE_START);
    let initramfs = load_initramfs(mem, payload, memmap, initrd_limit, kernel_end)?;

    hdr.type_of_loader = LOADER_UNDEFINED;
    // CMDLINE_ADDR is 0x20000; the initramfs lies below initrd_limit (at most 3 GiB):
    // all fit in 32 bits.
    #[allow(clippy::cast_possible_truncation)]
    {
        hdr.cmd_line_ptr = CMDLINE_ADDR as u32;
        if let Some((addr, size)) = initramfs {
            hdr.ramdisk_image = addr as u32;
            hdr.ramdisk_size = size as u32;
        }
    }
    let mut params = boot_params {
        hdr,
        acpi_rsdp_addr: layout.rsdp_addr,
        e820_entries: u8::try_from(memmap.len())
            .map_err(|_| BootError::MemmapTooLarge(memmap.len()))?,
        ..Default::default()
    };
    for (slot, e) in params.e820_table.iter_mut().zip(memmap) {
        *slot = boot_e820_entry {
            addr: e.addr,
            size: e.size,
            r#type: e.kind,
        };
    }
    write_obj(mem, "zero page", ZERO_PAGE_ADDR, params)?;

    let mut regs = boot_regs(load + STARTUP_64_OFFSET);
    regs.rsi = ZERO_PAGE_ADDR;
    Ok(BootInfo {
        entry: EntryMode::Long64,
        regs,
    })
}
