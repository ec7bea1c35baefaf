//! A minimal device side for checking what the driver built: pop a chain from a
//! `virtio_queue::Queue` on the driver's rings, look at its descriptors, complete it.
//! Not a virtio-blk device: it trusts the layout the test driver produces.

use devices::virtio_blk::GuestMem;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace};

/// One descriptor as the device saw it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Seen {
    /// Guest address.
    pub addr: u64,
    /// Length.
    pub len: u32,
    /// Device-writable.
    pub write: bool,
}

/// One chain as the device popped it.
#[derive(Debug)]
pub struct Popped {
    /// Head index.
    pub head: u16,
    /// Every descriptor, indirect tables followed.
    pub descs: Vec<Seen>,
}

impl Popped {
    /// The virtio-blk header `(type, sector)`; asserts a 16-byte readable first descriptor.
    pub fn header(&self, gm: &GuestMem) -> (u32, u64) {
        let h = self.descs[0];
        assert_eq!((h.len, h.write), (16, false), "header descriptor");
        let m = gm.memory();
        let t: u32 = m.read_obj(GuestAddress(h.addr)).unwrap();
        let s: u64 = m.read_obj(GuestAddress(h.addr + 8)).unwrap();
        (u32::from_le(t), u64::from_le(s))
    }

    /// The status descriptor; asserts a 1-byte writable last descriptor.
    pub fn status(&self) -> Seen {
        let s = *self.descs.last().unwrap();
        assert_eq!((s.len, s.write), (1, true), "status descriptor");
        s
    }

    /// The descriptors between header and status.
    pub fn data(&self) -> &[Seen] {
        &self.descs[1..self.descs.len() - 1]
    }
}

/// Pops the next chain from the device-side queue.
pub fn pop(q: &mut Queue, gm: &GuestMem) -> Option<Popped> {
    let chain = q.pop_descriptor_chain(gm.memory())?;
    let head = chain.head_index();
    let descs = chain
        .map(|d| Seen {
            addr: d.addr().0,
            len: d.len(),
            write: d.is_write_only(),
        })
        .collect();
    Some(Popped { head, descs })
}

/// Completes `p`: fills writable data with `fill`, writes `status`, adds a used entry.
/// Returns the used length (data written plus the status byte).
pub fn complete(q: &mut Queue, gm: &GuestMem, p: &Popped, fill: u8, status: u8) -> u32 {
    let m = gm.memory();
    let mut written = 0;
    for d in p.data().iter().filter(|d| d.write) {
        m.write_slice(&vec![fill; d.len as usize], GuestAddress(d.addr))
            .unwrap();
        written += d.len;
    }
    m.write_slice(&[status], GuestAddress(p.status().addr))
        .unwrap();
    q.add_used(&*m, p.head, written + 1).unwrap();
    written + 1
}

/// Reads what descriptor `d` points at.
pub fn read_bytes(gm: &GuestMem, d: &Seen) -> Vec<u8> {
    let mut v = vec![0; d.len as usize];
    gm.memory()
        .read_slice(&mut v, GuestAddress(d.addr))
        .unwrap();
    v
}
