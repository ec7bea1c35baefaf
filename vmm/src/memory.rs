//! Guest RAM backed by one memfd (shareable with vhost-user backends), optionally on 2 MiB
//! hugepages, and the x86 guest-physical layout.
//!
//! Layout (one fixed choice, used by e820, ACPI and the PCI code):
//!
//! | range | use |
//! |---|---|
//! | `0 .. min(size, 3 GiB)` | RAM, memfd offset 0 |
//! | `0xC000_0000 .. 0xE000_0000` | 32-bit PCI BARs ([`PCI_MMIO32_START`], 512 MiB) |
//! | `0xE000_0000 .. 0xF000_0000` | PCI ECAM, buses 0..=255 ([`ECAM_START`], 256 MiB) |
//! | `0xF000_0000 .. 0xFEC0_0000` | platform MMIO ([`PLATFORM_MMIO_START`]) |
//! | `0xFEC0_0000 .. +4 KiB` | IOAPIC |
//! | `0xFEE0_0000 .. +1 MiB` | LAPIC |
//! | `4 GiB .. 4 GiB + size - 3 GiB` | the rest of RAM, memfd offset 3 GiB |
//! | [`GuestRam::mmio64_start`] .. | 64-bit PCI BARs, 1 GiB-aligned after RAM |

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::path::Path;
use std::sync::Arc;

use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap};

/// Start of the 32-bit hole; RAM below it starts at 0.
pub const MEM_32BIT_HOLE_START: u64 = 0xC000_0000;
/// Size of the 32-bit hole (3 GiB .. 4 GiB).
pub const MEM_32BIT_HOLE_SIZE: u64 = (1 << 32) - MEM_32BIT_HOLE_START;
/// Where RAM above the hole starts.
pub const HIGH_RAM_START: u64 = 1 << 32;
/// Window for 32-bit PCI BARs.
pub const PCI_MMIO32_START: u64 = MEM_32BIT_HOLE_START;
/// Size of the 32-bit PCI BAR window.
pub const PCI_MMIO32_SIZE: u64 = 0x2000_0000;
/// PCI Express enhanced configuration space (MCFG), bus 0 to 255.
pub const ECAM_START: u64 = 0xE000_0000;
/// Size of the ECAM window (1 MiB per bus).
pub const ECAM_SIZE: u64 = 0x1000_0000;
/// Window for platform MMIO devices (power/sleep registers and the like).
pub const PLATFORM_MMIO_START: u64 = 0xF000_0000;
/// Size of the platform MMIO window (up to the IOAPIC).
pub const PLATFORM_MMIO_SIZE: u64 = IOAPIC_START - PLATFORM_MMIO_START;
/// The IOAPIC's registers.
pub const IOAPIC_START: u64 = 0xFEC0_0000;
/// Size of the IOAPIC's register window.
pub const IOAPIC_SIZE: u64 = 0x1000;
/// The local APICs' registers.
pub const LAPIC_START: u64 = 0xFEE0_0000;
/// Size reserved for the local APICs (also the MSI address window).
pub const LAPIC_SIZE: u64 = 0x10_0000;
/// Alignment of the 64-bit PCI BAR window.
pub const MMIO64_ALIGN: u64 = 1 << 30;
/// Size of a 2 MiB hugepage.
pub const HUGEPAGE_SIZE: u64 = 2 << 20;

// The reserved ranges sit in the hole, in order, without overlapping.
const _: () = {
    assert!(PCI_MMIO32_START + PCI_MMIO32_SIZE <= ECAM_START);
    assert!(ECAM_START + ECAM_SIZE <= PLATFORM_MMIO_START);
    assert!(IOAPIC_START + IOAPIC_SIZE <= LAPIC_START);
    assert!(LAPIC_START + LAPIC_SIZE <= HIGH_RAM_START);
};

/// Where the kernel reports free 2 MiB hugepages.
const FREE_HUGEPAGES: &str = "/sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages";

/// Errors of creating guest RAM.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// The size is zero or not a multiple of the page size in use.
    #[error("guest memory size {size} is not a non-zero multiple of {page} bytes")]
    BadSize {
        /// Requested size.
        size: u64,
        /// The page size.
        page: u64,
    },
    /// The host does not have enough free 2 MiB hugepages.
    #[error(
        "memory.hugepages: the host has {free} free 2 MiB hugepages, {needed} needed \
         (reserve more with: echo N > /proc/sys/vm/nr_hugepages)"
    )]
    NoHugepages {
        /// Pages needed.
        needed: u64,
        /// Pages free on the host.
        free: u64,
    },
    /// `memfd_create`, `ftruncate` or `fallocate` failed.
    #[error("guest memory memfd: {op}: {source}")]
    Memfd {
        /// The call that failed.
        op: &'static str,
        /// Its error.
        source: std::io::Error,
    },
    /// Mapping a region failed.
    #[error("mapping guest memory at {addr:#x}: {source}")]
    Mmap {
        /// Guest address of the region.
        addr: u64,
        /// Why.
        source: vm_memory::mmap::MmapRegionError,
    },
    /// The regions could not be assembled.
    #[error("guest memory regions: {0}")]
    Collection(#[from] vm_memory::GuestRegionCollectionError),
}

/// One contiguous RAM region of the guest, for e820 and KVM memory slots.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RamRegion {
    /// Guest-physical start.
    pub guest_addr: u64,
    /// Length in bytes.
    pub size: u64,
    /// Offset of the region's first byte in the memfd.
    pub file_offset: u64,
}

impl RamRegion {
    /// One past the last guest-physical byte.
    pub fn end(&self) -> u64 {
        self.guest_addr + self.size
    }
}

/// The RAM regions of a guest with `size` bytes of RAM: below 3 GiB from 0, the rest from
/// 4 GiB. Pure arithmetic; nothing is allocated.
pub fn ram_layout(size: u64) -> Vec<RamRegion> {
    let low = size.min(MEM_32BIT_HOLE_START);
    let mut regions = vec![RamRegion {
        guest_addr: 0,
        size: low,
        file_offset: 0,
    }];
    if size > low {
        regions.push(RamRegion {
            guest_addr: HIGH_RAM_START,
            size: size - low,
            file_offset: low,
        });
    }
    regions
}

/// Guest RAM: the vm-memory view, the memfd behind it and its regions.
#[derive(Debug)]
pub struct GuestRam {
    memory: GuestMemoryMmap<()>,
    memfd: Arc<File>,
    regions: Vec<RamRegion>,
    hugepages: bool,
}

impl GuestRam {
    /// Creates `size` bytes of guest RAM in a memfd mapped shared, on 2 MiB hugepages when
    /// `hugepages` (which are then allocated up front so a shortage is an error here, not
    /// a SIGBUS later).
    pub fn new(size: u64, hugepages: bool) -> Result<Self, MemoryError> {
        let page = if hugepages { HUGEPAGE_SIZE } else { 4096 };
        if size == 0 || !size.is_multiple_of(page) || usize::try_from(size).is_err() {
            return Err(MemoryError::BadSize { size, page });
        }
        if hugepages {
            let needed = size / HUGEPAGE_SIZE;
            let free = read_count(Path::new(FREE_HUGEPAGES));
            if free < needed {
                return Err(MemoryError::NoHugepages { needed, free });
            }
        }
        let memfd = Arc::new(create_memfd(size, hugepages)?);
        let regions = ram_layout(size);
        let mut mapped = Vec::with_capacity(regions.len());
        for r in &regions {
            let addr = r.guest_addr;
            // The sizes come from `size`, which fits usize (checked above).
            let len = usize::try_from(r.size).map_err(|_| MemoryError::BadSize { size, page })?;
            let region = MmapRegionBuilder::new(len)
                .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
                .with_mmap_flags(libc::MAP_SHARED | libc::MAP_NORESERVE)
                .with_file_offset(FileOffset::from_arc(memfd.clone(), r.file_offset))
                .with_hugetlbfs(hugepages)
                .build()
                .map_err(|source| MemoryError::Mmap { addr, source })?;
            let region = GuestRegionMmap::new(region, GuestAddress(addr))
                .ok_or(MemoryError::BadSize { size: r.size, page })?;
            mapped.push(region);
        }
        let memory = GuestMemoryMmap::from_regions(mapped)?;
        tracing::debug!(
            size,
            hugepages,
            regions = regions.len(),
            "guest RAM created"
        );
        Ok(GuestRam {
            memory,
            memfd,
            regions,
            hugepages,
        })
    }

    /// Creates the RAM a VM config asks for.
    pub fn from_config(config: &crate::config::MemoryConfig) -> Result<Self, MemoryError> {
        Self::new(config.size_bytes(), config.hugepages)
    }

    /// The vm-memory view (cheap to clone: regions are reference-counted).
    pub fn memory(&self) -> &GuestMemoryMmap<()> {
        &self.memory
    }

    /// The memfd holding all of guest RAM (for vhost-user memory tables).
    pub fn memfd(&self) -> &Arc<File> {
        &self.memfd
    }

    /// The RAM regions, sorted by address.
    pub fn regions(&self) -> &[RamRegion] {
        &self.regions
    }

    /// Total RAM in bytes.
    pub fn size(&self) -> u64 {
        self.regions.iter().map(|r| r.size).sum()
    }

    /// Whether RAM is on hugepages.
    pub fn hugepages(&self) -> bool {
        self.hugepages
    }

    /// One past the highest guest-physical RAM address.
    pub fn end_of_ram(&self) -> u64 {
        self.regions.last().map_or(0, RamRegion::end)
    }

    /// Start of the 64-bit PCI BAR window: above RAM and 4 GiB, 1 GiB-aligned.
    pub fn mmio64_start(&self) -> u64 {
        self.end_of_ram()
            .max(HIGH_RAM_START)
            .next_multiple_of(MMIO64_ALIGN)
    }
}

/// Where the kernel reports the 2 MiB hugepages reserved in all (free or in use).
const RESERVED_HUGEPAGES: &str = "/sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages";

/// 2 MiB hugepages the host has reserved in all, free or in use (0 when it has none or
/// cannot say): more than this no VM can ever get.
pub fn reserved_hugepages() -> u64 {
    read_count(Path::new(RESERVED_HUGEPAGES))
}

/// A count the kernel reports in `path` (0 when unreadable).
fn read_count(path: &Path) -> u64 {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

fn create_memfd(size: u64, hugepages: bool) -> Result<File, MemoryError> {
    let mut flags = libc::MFD_CLOEXEC;
    if hugepages {
        flags |= libc::MFD_HUGETLB | libc::MFD_HUGE_2MB;
    }
    let os_err = |op| MemoryError::Memfd {
        op,
        source: std::io::Error::last_os_error(),
    };
    // SAFETY: the name is a NUL-terminated literal; the call creates a new descriptor.
    let fd = unsafe { libc::memfd_create(c"guest-ram".as_ptr(), flags) };
    if fd < 0 {
        return Err(os_err("memfd_create"));
    }
    // SAFETY: `fd` was just created and is owned by nothing else.
    let file = unsafe { File::from_raw_fd(fd) };
    let len = libc::off_t::try_from(size).map_err(|_| MemoryError::BadSize { size, page: 1 })?;
    // SAFETY: plain syscall on a descriptor we own.
    if unsafe { libc::ftruncate(file.as_raw_fd(), len) } != 0 {
        return Err(os_err("ftruncate"));
    }
    if hugepages {
        // Take the hugepages now: a shortage must fail here, not SIGBUS the guest later.
        // SAFETY: plain syscall on a descriptor we own.
        if unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, len) } != 0 {
            let source = std::io::Error::last_os_error();
            if source.raw_os_error() == Some(libc::ENOSPC) {
                let free = read_count(Path::new(FREE_HUGEPAGES));
                return Err(MemoryError::NoHugepages {
                    needed: size / HUGEPAGE_SIZE,
                    free,
                });
            }
            return Err(MemoryError::Memfd {
                op: "fallocate",
                source,
            });
        }
    }
    Ok(file)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::FileExt;

    use vm_memory::{Bytes, GuestMemoryBackend, GuestMemoryRegion};

    use super::*;

    const GIB: u64 = 1 << 30;
    const MIB: u64 = 1 << 20;

    #[test]
    fn layout_below_and_above_the_hole() {
        assert_eq!(
            ram_layout(512 * MIB),
            vec![RamRegion {
                guest_addr: 0,
                size: 512 * MIB,
                file_offset: 0
            }]
        );
        assert_eq!(ram_layout(3 * GIB).len(), 1);
        let r = ram_layout(8 * GIB);
        assert_eq!(r.len(), 2);
        assert_eq!((r[0].guest_addr, r[0].size), (0, 3 * GIB));
        assert_eq!(
            r[1],
            RamRegion {
                guest_addr: 4 * GIB,
                size: 5 * GIB,
                file_offset: 3 * GIB
            }
        );
        assert_eq!(r[1].end(), 9 * GIB);
    }

    #[test]
    fn small_ram_reads_and_writes() {
        let ram = GuestRam::new(64 * MIB, false).unwrap();
        assert_eq!(ram.size(), 64 * MIB);
        assert_eq!(ram.mmio64_start(), 4 * GIB);
        let m = ram.memory();
        m.write_obj(0xdead_beef_u32, GuestAddress(0x1000)).unwrap();
        assert_eq!(
            m.read_obj::<u32>(GuestAddress(0x1000)).unwrap(),
            0xdead_beef
        );
        assert!(m.write_obj(1u8, GuestAddress(64 * MIB)).is_err());
        // Shared mapping: the memfd sees guest writes.
        let mut b = [0u8; 4];
        ram.memfd().read_exact_at(&mut b, 0x1000).unwrap();
        assert_eq!(u32::from_le_bytes(b), 0xdead_beef);
    }

    /// 3 GiB + 64 MiB, sparse: only the touched pages are ever allocated.
    #[test]
    fn ram_above_3g_gets_two_regions() {
        let ram = GuestRam::new(3 * GIB + 64 * MIB, false).unwrap();
        assert_eq!(ram.regions().len(), 2);
        assert_eq!(ram.end_of_ram(), 4 * GIB + 64 * MIB);
        assert_eq!(ram.mmio64_start(), 5 * GIB);
        let m = ram.memory();
        assert_eq!(m.num_regions(), 2);
        let hi = m.find_region(GuestAddress(4 * GIB)).unwrap();
        assert_eq!(hi.len(), 64 * MIB);
        // An access running into the hole fails (after writing what fits).
        assert!(
            m.write_slice(b"12345678", GuestAddress(3 * GIB - 4))
                .is_err()
        );
        // Last bytes below the hole, first bytes above it.
        m.write_slice(b"low!", GuestAddress(3 * GIB - 4)).unwrap();
        m.write_slice(b"high", GuestAddress(4 * GIB)).unwrap();
        let mut b = [0u8; 4];
        m.read_slice(&mut b, GuestAddress(3 * GIB - 4)).unwrap();
        assert_eq!(&b, b"low!");
        m.read_slice(&mut b, GuestAddress(4 * GIB)).unwrap();
        assert_eq!(&b, b"high");
        // The hole is not memory.
        assert!(m.write_obj(1u8, GuestAddress(3 * GIB)).is_err());
        // File offsets: 4 GiB in the guest is 3 GiB in the memfd, right after "low!".
        let mut b8 = [0u8; 8];
        ram.memfd().read_exact_at(&mut b8, 3 * GIB - 4).unwrap();
        assert_eq!(&b8, b"low!high");
    }

    #[test]
    fn bad_sizes() {
        assert!(matches!(
            GuestRam::new(0, false),
            Err(MemoryError::BadSize { .. })
        ));
        assert!(matches!(
            GuestRam::new(4097, false),
            Err(MemoryError::BadSize { .. })
        ));
        assert!(matches!(
            GuestRam::new(3 * MIB, true),
            Err(MemoryError::BadSize { .. })
        ));
    }

    #[test]
    fn hugepages_beyond_what_the_host_has_is_a_clear_error() {
        let free = read_count(Path::new(FREE_HUGEPAGES));
        let err = GuestRam::new((free + 1) * HUGEPAGE_SIZE, true).unwrap_err();
        assert!(matches!(err, MemoryError::NoHugepages { .. }), "{err}");
        let msg = err.to_string();
        assert!(
            msg.contains("memory.hugepages") && msg.contains("nr_hugepages"),
            "{msg}"
        );
        assert_eq!(read_count(Path::new("/nonexistent")), 0);
    }
}
