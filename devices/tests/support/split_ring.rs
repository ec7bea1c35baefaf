//! The split virtqueue layout (virtio 1.2 section 2.7) in test guest memory, with raw
//! access to every field: descriptor table, available ring (with `used_event`) and used
//! ring (with `avail_event`). No policy here; [`super::virtqueue`] is the driver.

#![allow(clippy::cast_possible_truncation)] // Test data and figures, not guest input.

use std::sync::atomic::Ordering;

use virtio_bindings::bindings::virtio_ring::{
    VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
};
use virtio_queue::desc::RawDescriptor;
use virtio_queue::desc::split::Descriptor as SplitDescriptor;
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestAddress;

use super::memory::TestMemory;

/// Descriptor flag: the chain continues at `next`.
pub const F_NEXT: u16 = VRING_DESC_F_NEXT as u16;
/// Descriptor flag: the device writes this buffer.
pub const F_WRITE: u16 = VRING_DESC_F_WRITE as u16;
/// Descriptor flag: the buffer is a table of descriptors.
pub const F_INDIRECT: u16 = VRING_DESC_F_INDIRECT as u16;

/// Bytes of one descriptor.
pub const DESC_SIZE: u64 = 16;

/// One split descriptor as the driver writes it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Desc {
    /// Guest address of the buffer.
    pub addr: u64,
    /// Buffer length in bytes.
    pub len: u32,
    /// `F_NEXT`, `F_WRITE`, `F_INDIRECT` (or anything, for hostile tests).
    pub flags: u16,
    /// Next descriptor index when `F_NEXT` is set.
    pub next: u16,
}

impl Desc {
    /// A descriptor with the given fields.
    pub fn new(addr: u64, len: u32, flags: u16, next: u16) -> Self {
        Desc {
            addr,
            len,
            flags,
            next,
        }
    }

    fn raw(self) -> RawDescriptor {
        RawDescriptor::from(SplitDescriptor::new(
            self.addr, self.len, self.flags, self.next,
        ))
    }

    fn from_raw(raw: RawDescriptor) -> Self {
        let d = SplitDescriptor::from(raw);
        Desc::new(d.addr().0, d.len(), d.flags(), d.next())
    }
}

/// Writes `descs` as a descriptor table at `table` (used for indirect tables).
pub fn write_desc_table(mem: &TestMemory, table: GuestAddress, descs: &[Desc]) {
    for (i, d) in descs.iter().enumerate() {
        mem.write_obj(GuestAddress(table.0 + i as u64 * DESC_SIZE), d.raw());
    }
}

/// virtio's `vring_need_event`: whether moving an index from `old` to `new` crosses
/// the `event` index the other side asked to be notified at.
pub fn need_event(event: u16, new: u16, old: u16) -> bool {
    new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
}

/// A split ring laid out in [`TestMemory`].
#[derive(Clone, Debug)]
pub struct SplitRing {
    mem: TestMemory,
    size: u16,
    desc: GuestAddress,
    avail: GuestAddress,
    used: GuestAddress,
}

impl SplitRing {
    /// Allocates a ring of `size` entries (a power of two up to 32768), each part on its
    /// own page.
    pub fn new(mem: &TestMemory, size: u16) -> Self {
        assert!(
            size.is_power_of_two(),
            "queue size {size} not a power of two"
        );
        let n = u64::from(size);
        let desc = mem.alloc(n * DESC_SIZE, 4096);
        let avail = mem.alloc(6 + 2 * n, 4096);
        let used = mem.alloc(6 + 8 * n, 4096);
        Self::at(mem, size, desc, avail, used)
    }

    /// A ring at caller-chosen addresses (hostile tests: misaligned or unmapped parts).
    pub fn at(
        mem: &TestMemory,
        size: u16,
        desc: GuestAddress,
        avail: GuestAddress,
        used: GuestAddress,
    ) -> Self {
        SplitRing {
            mem: mem.clone(),
            size,
            desc,
            avail,
            used,
        }
    }

    /// The memory the ring lives in.
    pub fn mem(&self) -> &TestMemory {
        &self.mem
    }

    /// Number of entries.
    pub fn size(&self) -> u16 {
        self.size
    }

    /// Guest address of the descriptor table.
    pub fn desc_addr(&self) -> GuestAddress {
        self.desc
    }

    /// Guest address of the available ring.
    pub fn avail_addr(&self) -> GuestAddress {
        self.avail
    }

    /// Guest address of the used ring.
    pub fn used_addr(&self) -> GuestAddress {
        self.used
    }

    /// A device-side queue on these rings: size set, addresses set, ready, with
    /// EVENT_IDX as given. Its `next_avail`/`next_used` start at 0.
    pub fn device_queue(&self, event_idx: bool) -> Queue {
        let mut q = Queue::new(self.size).unwrap_or_else(|e| panic!("Queue::new: {e:?}"));
        q.set_size(self.size);
        let split = |a: GuestAddress| (Some(a.0 as u32), Some((a.0 >> 32) as u32));
        let (lo, hi) = split(self.desc);
        q.set_desc_table_address(lo, hi);
        let (lo, hi) = split(self.avail);
        q.set_avail_ring_address(lo, hi);
        let (lo, hi) = split(self.used);
        q.set_used_ring_address(lo, hi);
        q.set_event_idx(event_idx);
        q.set_ready(true);
        q
    }

    fn slot(&self, idx: u16) -> u64 {
        u64::from(idx & (self.size - 1))
    }

    /// Writes descriptor `index` of the table (any index: out-of-range ones land past
    /// the table, as a buggy driver's would).
    pub fn write_desc(&self, index: u16, d: Desc) {
        self.mem.write_obj(self.desc_entry(index), d.raw());
    }

    /// Reads descriptor `index`.
    pub fn read_desc(&self, index: u16) -> Desc {
        Desc::from_raw(self.mem.read_obj(self.desc_entry(index)))
    }

    /// Address of descriptor `index`.
    pub fn desc_entry(&self, index: u16) -> GuestAddress {
        GuestAddress(self.desc.0 + u64::from(index) * DESC_SIZE)
    }

    fn load16(&self, addr: GuestAddress, order: Ordering) -> u16 {
        u16::from_le(self.mem.load(addr, order))
    }

    fn store16(&self, addr: GuestAddress, v: u16, order: Ordering) {
        self.mem.store(addr, v.to_le(), order)
    }

    /// `avail.flags`.
    pub fn avail_flags(&self) -> u16 {
        self.load16(self.avail, Ordering::Acquire)
    }

    /// Sets `avail.flags` (`VRING_AVAIL_F_NO_INTERRUPT`).
    pub fn set_avail_flags(&self, flags: u16) {
        self.store16(self.avail, flags, Ordering::Release)
    }

    /// `avail.idx`.
    pub fn avail_idx(&self) -> u16 {
        self.load16(GuestAddress(self.avail.0 + 2), Ordering::Acquire)
    }

    /// Publishes `avail.idx` with release ordering (entries written before are visible
    /// to a device that reads the index with acquire ordering).
    pub fn set_avail_idx(&self, idx: u16) {
        self.store16(GuestAddress(self.avail.0 + 2), idx, Ordering::Release)
    }

    /// Writes the avail ring entry for running index `idx` (taken modulo the size).
    pub fn set_avail_entry(&self, idx: u16, head: u16) {
        let addr = GuestAddress(self.avail.0 + 4 + 2 * self.slot(idx));
        self.store16(addr, head, Ordering::Relaxed)
    }

    /// The avail ring entry for running index `idx`.
    pub fn avail_entry(&self, idx: u16) -> u16 {
        let addr = GuestAddress(self.avail.0 + 4 + 2 * self.slot(idx));
        self.load16(addr, Ordering::Relaxed)
    }

    /// `used_event` (after the avail ring).
    pub fn used_event(&self) -> u16 {
        self.load16(self.used_event_addr(), Ordering::Acquire)
    }

    /// Sets `used_event`: with EVENT_IDX, interrupt me once `used.idx` passes it.
    pub fn set_used_event(&self, v: u16) {
        self.store16(self.used_event_addr(), v, Ordering::Release)
    }

    fn used_event_addr(&self) -> GuestAddress {
        GuestAddress(self.avail.0 + 4 + 2 * u64::from(self.size))
    }

    /// `used.flags` (`VRING_USED_F_NO_NOTIFY`).
    pub fn used_flags(&self) -> u16 {
        self.load16(self.used, Ordering::Acquire)
    }

    /// `used.idx`, read with acquire ordering.
    pub fn used_idx(&self) -> u16 {
        self.load16(GuestAddress(self.used.0 + 2), Ordering::Acquire)
    }

    /// The used element `(id, len)` for running index `idx`.
    pub fn used_elem(&self, idx: u16) -> (u32, u32) {
        let base = self.used.0 + 4 + 8 * self.slot(idx);
        let id: u32 = self.mem.load(GuestAddress(base), Ordering::Relaxed);
        let len: u32 = self.mem.load(GuestAddress(base + 4), Ordering::Relaxed);
        (u32::from_le(id), u32::from_le(len))
    }

    /// `avail_event` (after the used ring): with EVENT_IDX, kick me once `avail.idx`
    /// passes it.
    pub fn avail_event(&self) -> u16 {
        let addr = GuestAddress(self.used.0 + 4 + 8 * u64::from(self.size));
        self.load16(addr, Ordering::Acquire)
    }
}
