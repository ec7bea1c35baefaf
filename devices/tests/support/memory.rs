//! Guest memory for test drivers: a memfd mapped shared (so a vhost-user backend in
//! another process could map the same pages), wrapped as the data plane's [`GuestMem`],
//! with a bump allocator for rings and buffers.

#![allow(clippy::cast_possible_truncation)] // Test data and figures, not guest input.

use std::fs::File;
use std::io;
use std::os::fd::FromRawFd;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use devices::virtio_blk::{GuestMem, GuestMemMmap};
use vm_memory::{
    AtomicAccess, ByteValued, Bytes, FileOffset, GuestAddress, GuestAddressSpace,
    GuestMemoryAtomic, GuestRegionMmap,
};

/// One guest memory region: where the guest sees it and where it lies in the memfd.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RegionInfo {
    /// Guest physical address of the first byte.
    pub guest_addr: u64,
    /// Length in bytes.
    pub size: u64,
    /// Offset of the region inside the memfd.
    pub file_offset: u64,
}

impl RegionInfo {
    /// One past the last guest address of the region.
    pub fn end(&self) -> u64 {
        self.guest_addr + self.size
    }
}

/// Bump allocator state: the region being carved and the next free address in it.
#[derive(Debug)]
struct Cursor {
    region: usize,
    next: u64,
}

struct Inner {
    memfd: Arc<File>,
    mem: GuestMem,
    regions: Vec<RegionInfo>,
    cursor: Mutex<Cursor>,
}

/// Memfd-backed guest memory shared by every queue of a test. Cloning is cheap and
/// every clone allocates from the same bump allocator.
#[derive(Clone)]
pub struct TestMemory {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for TestMemory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestMemory")
            .field("regions", &self.inner.regions)
            .finish()
    }
}

/// Rounds `v` up to a multiple of `align` (a power of two).
pub fn align_up(v: u64, align: u64) -> u64 {
    debug_assert!(align.is_power_of_two());
    (v + align - 1) & !(align - 1)
}

fn memfd(size: u64) -> io::Result<File> {
    let name = c"devices-test-guest";
    // SAFETY: `name` is a valid NUL-terminated string; the flags are plain constants.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by memfd_create and is owned by nobody else.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size)?;
    Ok(file)
}

impl TestMemory {
    /// One region of `size` bytes at guest address 0.
    pub fn new(size: u64) -> io::Result<Self> {
        Self::with_regions(&[(0, size)])
    }

    /// Several regions `(guest address, size)`, sorted and not overlapping; the gaps
    /// between them are addresses outside guest memory. All regions live in one memfd,
    /// one after another.
    pub fn with_regions(ranges: &[(u64, u64)]) -> io::Result<Self> {
        let total: u64 = ranges.iter().map(|r| r.1).sum();
        let file = Arc::new(memfd(total)?);
        let mut regions = Vec::with_capacity(ranges.len());
        let mut mmaps = Vec::with_capacity(ranges.len());
        let mut offset = 0;
        for &(guest_addr, size) in ranges {
            let len = usize::try_from(size).map_err(io::Error::other)?;
            let fo = FileOffset::from_arc(file.clone(), offset);
            let region = GuestRegionMmap::<()>::from_range(GuestAddress(guest_addr), len, Some(fo))
                .map_err(io::Error::other)?;
            mmaps.push(Arc::new(region));
            regions.push(RegionInfo {
                guest_addr,
                size,
                file_offset: offset,
            });
            offset += size;
        }
        let mmap = GuestMemMmap::from_arc_regions(mmaps).map_err(io::Error::other)?;
        let first = regions.first().map_or(0, |r| r.guest_addr);
        Ok(TestMemory {
            inner: Arc::new(Inner {
                memfd: file,
                mem: GuestMemoryAtomic::new(mmap),
                regions,
                cursor: Mutex::new(Cursor {
                    region: 0,
                    next: first,
                }),
            }),
        })
    }

    /// The memory as the device sees it (a clone of the shared atomic handle).
    pub fn guest_mem(&self) -> GuestMem {
        self.inner.mem.clone()
    }

    /// The memfd behind every region (share it with a vhost-user backend).
    pub fn memfd(&self) -> &Arc<File> {
        &self.inner.memfd
    }

    /// The regions, in guest address order.
    pub fn regions(&self) -> &[RegionInfo] {
        &self.inner.regions
    }

    /// Whether `[addr, addr + len)` lies inside one region.
    pub fn contains(&self, addr: u64, len: u64) -> bool {
        let Some(end) = addr.checked_add(len) else {
            return false;
        };
        self.inner
            .regions
            .iter()
            .any(|r| addr >= r.guest_addr && end <= r.end())
    }

    /// An address no region covers (past the end of the last one).
    pub fn unmapped_addr(&self) -> u64 {
        self.inner
            .regions
            .iter()
            .map(RegionInfo::end)
            .max()
            .unwrap_or(0)
            + 0x10_0000
    }

    /// Allocates `len` bytes aligned to `align` (a power of two); fresh memfd pages are
    /// zero and the allocator never hands out a byte twice. Panics
    /// when memory is exhausted: size the memory for the test.
    pub fn alloc(&self, len: u64, align: u64) -> GuestAddress {
        self.try_alloc(len, align)
            .unwrap_or_else(|| panic!("test guest memory exhausted allocating {len} bytes"))
    }

    /// Allocates like [`TestMemory::alloc`], or `None` when nothing fits.
    pub fn try_alloc(&self, len: u64, align: u64) -> Option<GuestAddress> {
        let mut cur = block::sync::lock(&self.inner.cursor);
        while let Some(region) = self.inner.regions.get(cur.region) {
            let start = align_up(cur.next.max(region.guest_addr), align);
            if start + len <= region.end() {
                cur.next = start + len;
                return Some(GuestAddress(start));
            }
            cur.region += 1;
            cur.next = 0;
        }
        None
    }

    /// Bytes still free in the bump allocator (over all remaining regions).
    pub fn free_bytes(&self) -> u64 {
        let cur = block::sync::lock(&self.inner.cursor);
        let mut free = 0;
        for (i, r) in self.inner.regions.iter().enumerate().skip(cur.region) {
            free += if i == cur.region {
                r.end().saturating_sub(cur.next.max(r.guest_addr))
            } else {
                r.size
            };
        }
        free
    }

    /// Writes `data` at `addr`; panics if the range is outside guest memory.
    pub fn write(&self, addr: GuestAddress, data: &[u8]) {
        self.inner
            .mem
            .memory()
            .write_slice(data, addr)
            .unwrap_or_else(|e| panic!("test write at {:#x}: {e}", addr.0));
    }

    /// Reads `len` bytes at `addr`; panics if the range is outside guest memory.
    pub fn read(&self, addr: GuestAddress, len: usize) -> Vec<u8> {
        let mut buf = vec![0; len];
        self.read_into(addr, &mut buf);
        buf
    }

    /// Reads into `buf` from `addr`; panics if the range is outside guest memory.
    pub fn read_into(&self, addr: GuestAddress, buf: &mut [u8]) {
        self.inner
            .mem
            .memory()
            .read_slice(buf, addr)
            .unwrap_or_else(|e| panic!("test read at {:#x}: {e}", addr.0));
    }

    /// Fills `len` bytes at `addr` with `byte`.
    pub fn fill(&self, addr: GuestAddress, byte: u8, len: u64) {
        const CHUNK: u64 = 64 * 1024;
        let buf = vec![byte; CHUNK.min(len) as usize];
        let mut done = 0;
        while done < len {
            let n = CHUNK.min(len - done);
            self.write(GuestAddress(addr.0 + done), &buf[..n as usize]);
            done += n;
        }
    }

    /// Writes a plain-data object at `addr`.
    pub fn write_obj<T: ByteValued>(&self, addr: GuestAddress, val: T) {
        self.inner
            .mem
            .memory()
            .write_obj(val, addr)
            .unwrap_or_else(|e| panic!("test write_obj at {:#x}: {e}", addr.0));
    }

    /// Reads a plain-data object at `addr`.
    pub fn read_obj<T: ByteValued>(&self, addr: GuestAddress) -> T {
        self.inner
            .mem
            .memory()
            .read_obj(addr)
            .unwrap_or_else(|e| panic!("test read_obj at {:#x}: {e}", addr.0))
    }

    /// Atomic store (the ring index fields) with the given ordering.
    pub fn store<T: AtomicAccess>(&self, addr: GuestAddress, val: T, order: Ordering) {
        self.inner
            .mem
            .memory()
            .store(val, addr, order)
            .unwrap_or_else(|e| panic!("test store at {:#x}: {e}", addr.0));
    }

    /// Atomic load with the given ordering.
    pub fn load<T: AtomicAccess>(&self, addr: GuestAddress, order: Ordering) -> T {
        self.inner
            .mem
            .memory()
            .load(addr, order)
            .unwrap_or_else(|e| panic!("test load at {:#x}: {e}", addr.0))
    }
}
