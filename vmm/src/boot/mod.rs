//! Kernel loading: a Linux `bzImage` (64-bit boot protocol, "zero page") or an ELF with a
//! PVH note (a `vmlinux`, the test guest), with initramfs and command line, plus the memory
//! map both protocols hand to the guest.
//!
//! Fixed low addresses used here (the boot GDT, IDT and page tables of
//! [`crate::kvm::long_mode`] sit at 0x500, 0x540 and 0x9000..0xefff):
//!
//! | address | content |
//! |---|---|
//! | [`PVH_INFO_ADDR`] 0x6000 | `hvm_start_info`, then the module list and the memory map |
//! | [`ZERO_PAGE_ADDR`] 0x7000 | Linux `boot_params` (bzImage boot) |
//! | [`BOOT_STACK_POINTER`] 0x8ff0 | initial stack (grows down into 0x8000) |
//! | [`CMDLINE_ADDR`] 0x20000 | command line, NUL-terminated, at most [`CMDLINE_MAX_SIZE`] |
//! | [`HIMEM_START`] 1 MiB | the kernel |
//! | top of RAM below 3 GiB | the initramfs, page-aligned |
//!
//! Nothing here trusts the kernel or initramfs file: every size and address read from
//! them is checked against guest memory, so a garbage or truncated file is an error.

mod linux;
mod pvh;

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use crate::config::PayloadConfig;
use crate::kvm::{EntryMode, VcpuInitRegs};
use crate::memory::RamRegion;

pub use linux::E820_MAX_ENTRIES;
pub use pvh::{PVH_MAX_MEMMAP_ENTRIES, START_INFO_MAGIC};

/// Where the PVH `hvm_start_info` is written (module list and memory map follow it).
pub const PVH_INFO_ADDR: u64 = 0x6000;
/// Where the Linux zero page (`boot_params`) is written.
pub const ZERO_PAGE_ADDR: u64 = 0x7000;
/// The initial stack pointer of the boot vCPU.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Where the command line is written.
pub const CMDLINE_ADDR: u64 = 0x2_0000;
/// The most bytes of command line (with its NUL) the loader accepts.
pub const CMDLINE_MAX_SIZE: u64 = 0x1_0000;
/// Lowest address a kernel segment may be loaded at (1 MiB).
pub const HIMEM_START: u64 = 0x10_0000;
/// Alignment of the initramfs.
pub const INITRAMFS_ALIGN: u64 = 0x1000;
/// e820 / PVH memory map type of usable RAM.
pub const E820_RAM: u32 = 1;
/// e820 / PVH memory map type of reserved memory.
pub const E820_RESERVED: u32 = 2;

/// What the VM tells the loader about guest-physical memory.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BootLayout {
    /// The RAM regions, sorted by address.
    pub ram: Vec<RamRegion>,
    /// Guest-physical address of the ACPI RSDP (0 when there are no ACPI tables).
    pub rsdp_addr: u64,
    /// `(start, len)` ranges to report as reserved in the memory map (e.g. the ACPI area
    /// 0xE0000..0x100000, the ECAM window). Reserved ranges are cut out of RAM; the PCI
    /// hole is implicit (it is not RAM).
    pub reserved: Vec<(u64, u64)>,
}

/// How to start the boot vCPU after [`load_kernel`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BootInfo {
    /// The CPU mode to enter in.
    pub entry: EntryMode,
    /// Entry point, stack and the registers the boot protocol passes.
    pub regs: VcpuInitRegs,
}

/// One entry of the memory map handed to the guest (e820 or PVH).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemmapEntry {
    /// Guest-physical start.
    pub addr: u64,
    /// Length in bytes.
    pub size: u64,
    /// [`E820_RAM`] or [`E820_RESERVED`].
    pub kind: u32,
}

/// The kernel formats the loader knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelFormat {
    /// An ELF file (booted through its PVH note).
    Elf,
    /// A Linux `bzImage` (setup header magic "HdrS" at 0x202).
    BzImage,
}

/// Errors of loading a kernel.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// The kernel or initramfs file could not be opened or read.
    #[error("{what} {path}: {source}")]
    Io {
        /// "payload.kernel" or "payload.initramfs".
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The kernel is neither an ELF nor a bzImage.
    #[error(
        "payload.kernel {path}: unknown format (neither an ELF vmlinux with a PVH note nor a \
         Linux bzImage)"
    )]
    UnknownFormat {
        /// The file.
        path: PathBuf,
    },
    /// The file is malformed or does not fit the protocol or guest memory.
    #[error("payload.kernel {path}: {msg}")]
    BadKernel {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        msg: String,
    },
    /// linux-loader refused the image.
    #[error("payload.kernel {path}: {source}")]
    Loader {
        /// The file.
        path: PathBuf,
        /// linux-loader's error.
        #[source]
        source: linux_loader::loader::Error,
    },
    /// The initramfs does not fit in guest RAM.
    #[error(
        "payload.initramfs {path}: {size} bytes do not fit in guest RAM below {limit:#x} above the kernel (ends at {kernel_end:#x})"
    )]
    InitramfsTooLarge {
        /// The file.
        path: PathBuf,
        /// Its size.
        size: u64,
        /// Highest address it may reach.
        limit: u64,
        /// End of the kernel.
        kernel_end: u64,
    },
    /// The command line is longer than the kernel or the loader accepts.
    #[error("payload.cmdline is {len} bytes with its NUL; at most {max} fit")]
    CmdlineTooLong {
        /// Its length with the NUL.
        len: usize,
        /// The limit.
        max: u64,
    },
    /// The command line contains a NUL byte.
    #[error("payload.cmdline must not contain a NUL byte")]
    CmdlineNul,
    /// The memory map has more entries than the protocol's table holds.
    #[error("memory map has {0} entries, more than the boot protocol holds")]
    MemmapTooLarge(usize),
    /// The layout is unusable (no RAM below 1 MiB, overlapping regions, ...).
    #[error("boot layout: {0}")]
    Layout(String),
    /// Writing a boot structure to guest memory failed.
    #[error("writing {what} at guest address {addr:#x}: {msg}")]
    GuestMemory {
        /// What was written.
        what: &'static str,
        /// Guest-physical address.
        addr: u64,
        /// vm-memory's error.
        msg: String,
    },
}

/// Loads the kernel of `payload` (and its initramfs and command line) into `mem` and writes
/// the boot protocol's structures; returns how to start the boot vCPU.
///
/// An ELF with a PVH note boots through PVH (32-bit protected mode, `rbx` = start info); a
/// bzImage through the Linux 64-bit boot protocol (`rsi` = zero page).
pub fn load_kernel(
    mem: &GuestMemoryMmap<()>,
    payload: &PayloadConfig,
    layout: &BootLayout,
) -> Result<BootInfo, BootError> {
    let path = payload.kernel.as_path();
    let mut kernel = open_payload_file("payload.kernel", path)?;
    let memmap = memory_map(layout)?;
    check_low_memory(mem)?;
    let format = detect_format(&mut kernel, path)?;
    tracing::debug!(?format, kernel = %path.display(), "loading kernel");
    let info = match format {
        KernelFormat::Elf => pvh::load(mem, &mut kernel, path, payload, layout, &memmap)?,
        KernelFormat::BzImage => linux::load(mem, &mut kernel, path, payload, layout, &memmap)?,
    };
    tracing::info!(kernel = %path.display(), ?format, rip = info.regs.rip, "kernel loaded");
    Ok(info)
}

/// Tells an ELF from a bzImage by their magic numbers; anything else is an error naming
/// the file.
pub fn detect_format(file: &mut File, path: &Path) -> Result<KernelFormat, BootError> {
    let mut head = [0u8; 0x206];
    let n = read_up_to(file, &mut head).map_err(io_err("payload.kernel", path))?;
    if n >= 4 && head[..4] == *b"\x7fELF" {
        return Ok(KernelFormat::Elf);
    }
    if n >= 0x206 && head[0x202..0x206] == *b"HdrS" {
        return Ok(KernelFormat::BzImage);
    }
    Err(BootError::UnknownFormat {
        path: path.to_path_buf(),
    })
}

/// The memory map of `layout`: RAM with the reserved ranges cut out, plus the reserved
/// ranges, sorted by address, without overlaps.
pub fn memory_map(layout: &BootLayout) -> Result<Vec<MemmapEntry>, BootError> {
    let mut reserved: Vec<(u64, u64)> = Vec::with_capacity(layout.reserved.len());
    for &(start, len) in &layout.reserved {
        let end = start
            .checked_add(len)
            .ok_or_else(|| BootError::Layout(format!("reserved range {start:#x}+{len:#x}")))?;
        if len > 0 {
            reserved.push((start, end));
        }
    }
    reserved.sort_unstable();
    let mut map = Vec::new();
    for r in &layout.ram {
        let end = r
            .guest_addr
            .checked_add(r.size)
            .ok_or_else(|| BootError::Layout(format!("RAM region at {:#x}", r.guest_addr)))?;
        let mut cur = r.guest_addr;
        for &(rs, re) in &reserved {
            if re <= cur || rs >= end {
                continue;
            }
            if rs > cur {
                map.push(ram_entry(cur, rs));
            }
            cur = cur.max(re);
        }
        if cur < end {
            map.push(ram_entry(cur, end));
        }
    }
    // Merge overlapping reserved ranges so the map has no overlaps.
    let mut merged: Vec<(u64, u64)> = Vec::with_capacity(reserved.len());
    for (s, e) in reserved {
        match merged.last_mut() {
            Some(last) if s <= last.1 => last.1 = last.1.max(e),
            _ => merged.push((s, e)),
        }
    }
    map.extend(merged.into_iter().map(|(s, e)| MemmapEntry {
        addr: s,
        size: e - s,
        kind: E820_RESERVED,
    }));
    map.sort_unstable_by_key(|e| e.addr);
    if map.windows(2).any(|w| w[0].addr + w[0].size > w[1].addr) {
        return Err(BootError::Layout("RAM regions overlap".into()));
    }
    Ok(map)
}

fn ram_entry(start: u64, end: u64) -> MemmapEntry {
    MemmapEntry {
        addr: start,
        size: end - start,
        kind: E820_RAM,
    }
}

/// The boot structures live below 1 MiB; guest RAM must cover it.
fn check_low_memory(mem: &GuestMemoryMmap<()>) -> Result<(), BootError> {
    #[allow(clippy::cast_possible_truncation)] // 1 MiB
    let low = HIMEM_START as usize;
    if mem.check_range(GuestAddress(0), low) {
        Ok(())
    } else {
        Err(BootError::Layout(
            "guest RAM does not cover the first MiB".into(),
        ))
    }
}

/// Writes the command line (NUL-terminated) at [`CMDLINE_ADDR`]; `max` bounds its size
/// with the NUL. Returns the size written.
fn write_cmdline(mem: &GuestMemoryMmap<()>, cmdline: &str, max: u64) -> Result<u64, BootError> {
    if cmdline.contains('\0') {
        return Err(BootError::CmdlineNul);
    }
    let len = cmdline.len() + 1;
    let max = max.min(CMDLINE_MAX_SIZE);
    if len as u64 > max {
        return Err(BootError::CmdlineTooLong { len, max });
    }
    let mut bytes = Vec::with_capacity(len);
    bytes.extend_from_slice(cmdline.as_bytes());
    bytes.push(0);
    write_bytes(mem, "command line", CMDLINE_ADDR, &bytes)?;
    Ok(len as u64)
}

/// Loads the initramfs of `payload`, if any, page-aligned as high as possible below
/// `limit` (exclusive) in RAM that is not reserved and lies above `kernel_end`.
/// Returns `(address, size)`.
fn load_initramfs(
    mem: &GuestMemoryMmap<()>,
    payload: &PayloadConfig,
    memmap: &[MemmapEntry],
    limit: u64,
    kernel_end: u64,
) -> Result<Option<(u64, u64)>, BootError> {
    let Some(path) = payload.initramfs.as_deref() else {
        return Ok(None);
    };
    let mut file = open_payload_file("payload.initramfs", path)?;
    let size = file
        .seek(SeekFrom::End(0))
        .and_then(|s| file.rewind().map(|()| s))
        .map_err(io_err("payload.initramfs", path))?;
    let too_large = || BootError::InitramfsTooLarge {
        path: path.to_path_buf(),
        size,
        limit,
        kernel_end,
    };
    let addr = memmap
        .iter()
        .rev()
        .filter(|e| e.kind == E820_RAM)
        .find_map(|e| {
            let top = (e.addr + e.size).min(limit);
            let start = top.checked_sub(size)? / INITRAMFS_ALIGN * INITRAMFS_ALIGN;
            (start >= e.addr.max(kernel_end)).then_some(start)
        })
        .ok_or_else(too_large)?;
    let count = usize::try_from(size).map_err(|_| too_large())?;
    mem.read_exact_volatile_from(GuestAddress(addr), &mut file, count)
        .map_err(|e| match e {
            vm_memory::GuestMemoryError::IOError(source) => BootError::Io {
                what: "payload.initramfs",
                path: path.to_path_buf(),
                source,
            },
            e => BootError::GuestMemory {
                what: "initramfs",
                addr,
                msg: e.to_string(),
            },
        })?;
    tracing::debug!(addr, size, "initramfs loaded");
    Ok(Some((addr, size)))
}

fn write_bytes(
    mem: &GuestMemoryMmap<()>,
    what: &'static str,
    addr: u64,
    bytes: &[u8],
) -> Result<(), BootError> {
    mem.write_slice(bytes, GuestAddress(addr))
        .map_err(|e| BootError::GuestMemory {
            what,
            addr,
            msg: e.to_string(),
        })
}

fn write_obj<T: vm_memory::ByteValued>(
    mem: &GuestMemoryMmap<()>,
    what: &'static str,
    addr: u64,
    val: T,
) -> Result<(), BootError> {
    mem.write_obj(val, GuestAddress(addr))
        .map_err(|e| BootError::GuestMemory {
            what,
            addr,
            msg: e.to_string(),
        })
}

/// Reads as many bytes as are there, up to `buf.len()`, from the start of `file`.
fn read_up_to(file: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    file.rewind()?;
    let mut n = 0;
    while n < buf.len() {
        match file.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// Opens a kernel or initramfs: a regular file, never a FIFO or device that could block
/// or feed endless data (and through no symlink when the service forbids them).
fn open_payload_file(what: &'static str, path: &Path) -> Result<File, BootError> {
    let file = block::host_file::open(path, block::host_file::OpenFlags::READ)
        .map_err(io_err(what, path))?;
    let t = file.metadata().map_err(io_err(what, path))?.file_type();
    if !t.is_file() {
        let kind = block::host_file::kind(&t);
        return Err(io_err(what, path)(std::io::Error::other(format!(
            "it is {kind}, not a regular file"
        ))));
    }
    Ok(file)
}

fn io_err(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> BootError {
    let path = path.to_path_buf();
    move |source| BootError::Io { what, path, source }
}

/// Initial registers with the boot stack and flags set.
fn boot_regs(rip: u64) -> VcpuInitRegs {
    VcpuInitRegs {
        rip,
        rsp: BOOT_STACK_POINTER,
        rsi: 0,
        rbx: 0,
        rdi: 0,
        rflags: 0x2,
    }
}

#[cfg(test)]
mod tests;
