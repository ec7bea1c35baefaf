//! virtio-blk request parsing (virtio 1.2 section 5.2.6).
//!
//! A request is a byte stream laid over the descriptor chain: the device-readable part
//! starts with the 16-byte header (`type: le32, reserved: le32, sector: le64`), followed by
//! the data the device reads (OUT) or the discard/write-zeroes segment; the device-writable
//! part holds the data the device writes (IN, GET_ID) and ends with the status byte, the
//! last byte of the last descriptor. Under VIRTIO_F_ANY_LAYOUT (implied by VERSION_1)
//! descriptor boundaries carry no meaning, so the header may straddle descriptors and share
//! one with data, and the status may share a descriptor with data.
//!
//! Everything the guest wrote is hostile: the header and the segment are copied once, every
//! length is checked, every address goes through the memory map (never touching memory
//! outside it), and every failure becomes a status code. A chain that does not end cleanly
//! (a loop, a next index outside the table, a descriptor table outside guest memory, a
//! broken indirect table, more than 4 GiB) gets no status byte at all: its end cannot be
//! trusted.

use std::ops::Deref;

use virtio_bindings::bindings::virtio_blk::{
    VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};
use virtio_queue::DescriptorChain;
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use super::status::{IOERR, UNSUPP};
use super::{GuestMemMmap, ID_BYTES, SECTOR_SIZE};

#[cfg(test)]
mod tests;

/// What a valid request asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// VIRTIO_BLK_T_IN: read `data_len` bytes at `sector` into the (device-writable) iovecs.
    Read,
    /// VIRTIO_BLK_T_OUT: write the (device-readable) iovecs at `sector`.
    Write,
    /// VIRTIO_BLK_T_FLUSH.
    Flush,
    /// VIRTIO_BLK_T_GET_ID: the serial goes into the device-writable iovecs.
    GetId,
    /// VIRTIO_BLK_T_DISCARD of one segment.
    Discard {
        /// First sector.
        sector: u64,
        /// Sectors.
        num_sectors: u32,
    },
    /// VIRTIO_BLK_T_WRITE_ZEROES of one segment.
    WriteZeroes {
        /// First sector.
        sector: u64,
        /// Sectors.
        num_sectors: u32,
        /// The driver allows deallocating the range.
        unmap: bool,
    },
}

/// A validated request.
#[derive(Debug)]
pub struct Request {
    /// Head descriptor index (for the used ring).
    pub head: u16,
    /// What to do.
    pub op: Op,
    /// First sector of a read or write (the segment's sector for discard/write-zeroes,
    /// the header's, unused, for flush and GET_ID).
    pub sector: u64,
    /// Data buffers as host addresses into guest memory (empty for flush/discard/write-zeroes).
    pub iovecs: Vec<libc::iovec>,
    /// Total bytes in `iovecs`.
    pub data_len: u64,
    /// Guest address of the status byte.
    pub status: GuestAddress,
}

/// A chain that cannot be served: the status to report (if there is a status byte to
/// put it in) and why, for logs.
#[derive(Debug, PartialEq, Eq)]
pub struct Rejected {
    /// Head descriptor index (for the used ring).
    pub head: u16,
    /// Where to write `code`, when the chain has a usable status byte.
    pub status: Option<GuestAddress>,
    /// VIRTIO_BLK_S_IOERR or VIRTIO_BLK_S_UNSUPP.
    pub code: u8,
    /// Why, for logs and counters.
    pub reason: &'static str,
}

/// What the device accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Disk size in 512-byte sectors.
    pub capacity_sectors: u64,
    /// Most data segments (descriptors carrying data) per request (config seg_max; 0: no limit).
    pub seg_max: u32,
    /// Largest data segment in bytes (config size_max; 0: no limit).
    pub size_max: u32,
    /// Writes, discards and write-zeroes are refused.
    pub readonly: bool,
    /// DISCARD offered.
    pub discard: bool,
    /// WRITE_ZEROES offered.
    pub write_zeroes: bool,
    /// Largest discard in sectors.
    pub max_discard_sectors: u32,
    /// Largest write-zeroes in sectors.
    pub max_write_zeroes_sectors: u32,
}

/// Bytes of the request header.
const HEADER_LEN: usize = 16;
/// Bytes of one discard/write-zeroes segment.
const SEGMENT_LEN: usize = 16;

/// The request type, once the header is complete.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    In,
    Out,
    Flush,
    GetId,
    Discard,
    WriteZeroes,
    Unknown,
}

/// State of one walk over a chain.
struct Walk<'l> {
    limits: &'l Limits,
    iovecs: Vec<libc::iovec>,
    header: [u8; HEADER_LEN],
    header_len: usize,
    /// Known once the header is complete.
    kind: Option<Kind>,
    sector: u64,
    segment: [u8; SEGMENT_LEN],
    /// Device-readable bytes after the header of a discard/write-zeroes.
    segment_len: u64,
    data_len: u64,
    segments: u32,
    seen_writable: bool,
    /// The last device-writable descriptor seen, not yet handled: it holds the status
    /// byte if it turns out to end the chain.
    pending: Option<(GuestAddress, u32)>,
    /// The first problem found: the status code and why.
    error: Option<(u8, &'static str)>,
}

impl<'l> Walk<'l> {
    fn new(limits: &'l Limits, iovecs: Vec<libc::iovec>) -> Self {
        Walk {
            limits,
            iovecs,
            header: [0; HEADER_LEN],
            header_len: 0,
            kind: None,
            sector: 0,
            segment: [0; SEGMENT_LEN],
            segment_len: 0,
            data_len: 0,
            segments: 0,
            seen_writable: false,
            pending: None,
            error: None,
        }
    }

    fn fail(&mut self, code: u8, reason: &'static str) {
        if self.error.is_none() {
            self.error = Some((code, reason));
        }
    }

    /// Takes the next descriptor of the chain.
    fn visit(&mut self, mem: &GuestMemMmap, desc: &Descriptor) {
        if desc.is_write_only() {
            if !self.seen_writable {
                self.seen_writable = true;
                if self.kind.is_none() {
                    self.fail(IOERR, "request header too short or not device-readable");
                }
            }
            if let Some((addr, len)) = self.pending.replace((desc.addr(), desc.len())) {
                self.writable_data(mem, addr, len);
            }
        } else if self.seen_writable {
            self.fail(
                IOERR,
                "device-readable descriptor after a device-writable one",
            );
        } else {
            self.readable(mem, desc.addr(), desc.len());
        }
    }

    /// A device-readable range: header bytes first, then data or the segment.
    fn readable(&mut self, mem: &GuestMemMmap, addr: GuestAddress, len: u32) {
        if self.error.is_some() {
            return;
        }
        let mut addr = addr;
        let mut len = len;
        if self.kind.is_none() {
            let want = HEADER_LEN.saturating_sub(self.header_len);
            let n = want.min(len as usize);
            let Some(dst) = self
                .header
                .get_mut(self.header_len..self.header_len.saturating_add(n))
            else {
                return self.fail(IOERR, "request header too short or not device-readable");
            };
            if mem.read_slice(dst, addr).is_err() {
                return self.fail(IOERR, "request header outside guest memory");
            }
            self.header_len = self.header_len.saturating_add(n);
            if self.header_len < HEADER_LEN {
                return;
            }
            self.decode_header();
            // n <= 16, so it fits u32; the address may still wrap.
            len = len.saturating_sub(u32::try_from(n).unwrap_or(u32::MAX));
            if len == 0 {
                return;
            }
            match addr.0.checked_add(n as u64) {
                Some(a) => addr = GuestAddress(a),
                None => return self.fail(IOERR, "data buffer outside guest memory"),
            }
        }
        self.readable_data(mem, addr, len);
    }

    fn decode_header(&mut self) {
        let [t0, t1, t2, t3, _, _, _, _, s0, s1, s2, s3, s4, s5, s6, s7] = self.header;
        let request_type = u32::from_le_bytes([t0, t1, t2, t3]);
        self.sector = u64::from_le_bytes([s0, s1, s2, s3, s4, s5, s6, s7]);
        let limits = self.limits;
        let kind = match request_type {
            VIRTIO_BLK_T_IN => Kind::In,
            VIRTIO_BLK_T_OUT => Kind::Out,
            VIRTIO_BLK_T_FLUSH => Kind::Flush,
            VIRTIO_BLK_T_GET_ID => Kind::GetId,
            VIRTIO_BLK_T_DISCARD => Kind::Discard,
            VIRTIO_BLK_T_WRITE_ZEROES => Kind::WriteZeroes,
            _ => Kind::Unknown,
        };
        match kind {
            Kind::Unknown => self.fail(UNSUPP, "unsupported request type"),
            Kind::Discard if !limits.discard => self.fail(UNSUPP, "discard not offered"),
            Kind::WriteZeroes if !limits.write_zeroes => {
                self.fail(UNSUPP, "write-zeroes not offered")
            }
            Kind::Out | Kind::Discard | Kind::WriteZeroes if limits.readonly => {
                self.fail(IOERR, "write to a read-only disk")
            }
            _ => {}
        }
        self.kind = Some(kind);
    }

    /// Device-readable bytes after the header.
    fn readable_data(&mut self, mem: &GuestMemMmap, addr: GuestAddress, len: u32) {
        if self.error.is_some() || len == 0 {
            return;
        }
        match self.kind {
            Some(Kind::Out) => self.add_segment(mem, addr, len),
            Some(Kind::Discard | Kind::WriteZeroes) => {
                let have = self.segment_len;
                let total = have.saturating_add(u64::from(len));
                if total > SEGMENT_LEN as u64 {
                    return self.fail(IOERR, "more than one discard/write-zeroes segment");
                }
                // have < total <= 16.
                let range = usize::try_from(have).ok().zip(usize::try_from(total).ok());
                let Some(dst) = range.and_then(|(from, to)| self.segment.get_mut(from..to)) else {
                    return self.fail(IOERR, "more than one discard/write-zeroes segment");
                };
                if mem.read_slice(dst, addr).is_err() {
                    return self.fail(IOERR, "discard/write-zeroes segment outside guest memory");
                }
                self.segment_len = total;
            }
            Some(Kind::In | Kind::GetId) => {
                self.fail(IOERR, "device-readable data in a request the device writes")
            }
            Some(Kind::Flush | Kind::Unknown) | None => {}
        }
    }

    /// Device-writable bytes before the status byte.
    fn writable_data(&mut self, mem: &GuestMemMmap, addr: GuestAddress, len: u32) {
        if self.error.is_some() || len == 0 {
            return;
        }
        match self.kind {
            Some(Kind::In | Kind::GetId) => self.add_segment(mem, addr, len),
            Some(Kind::Out | Kind::Discard | Kind::WriteZeroes) => {
                self.fail(IOERR, "device-writable data in a request the device reads")
            }
            Some(Kind::Flush | Kind::Unknown) | None => {}
        }
    }

    /// One data segment: checked against the limits and mapped to host iovecs.
    fn add_segment(&mut self, mem: &GuestMemMmap, addr: GuestAddress, len: u32) {
        self.segments = self.segments.saturating_add(1);
        let limits = self.limits;
        if limits.seg_max != 0 && self.segments > limits.seg_max {
            return self.fail(IOERR, "more data segments than seg_max");
        }
        if limits.size_max != 0 && len > limits.size_max {
            return self.fail(IOERR, "data segment longer than size_max");
        }
        let Some(data_len) = self.data_len.checked_add(u64::from(len)) else {
            return self.fail(IOERR, "data length overflows");
        };
        self.data_len = data_len;
        for slice in GuestMemoryBackend::get_slices(mem, addr, len as usize) {
            match slice {
                Ok(slice) => {
                    let ptr = slice.ptr_guard_mut();
                    self.iovecs.push(libc::iovec {
                        iov_base: ptr.as_ptr().cast(),
                        iov_len: ptr.len(),
                    });
                }
                Err(_) => return self.fail(IOERR, "data buffer outside guest memory"),
            }
        }
    }

    /// Checks what can only be checked with the whole request seen.
    fn finish(self, head: u16, status: GuestAddress) -> Result<Request, Rejected> {
        let reject = |code: u8, reason: &'static str| Rejected {
            head,
            status: Some(status),
            code,
            reason,
        };
        if let Some((code, reason)) = self.error {
            return Err(reject(code, reason));
        }
        let limits = self.limits;
        let (op, sector) = match self.kind {
            Some(Kind::In | Kind::Out) => {
                if !self.data_len.is_multiple_of(SECTOR_SIZE) {
                    return Err(reject(IOERR, "data length not a multiple of 512"));
                }
                check_range(self.sector, self.data_len / SECTOR_SIZE, limits)
                    .map_err(|reason| reject(IOERR, reason))?;
                let op = if self.kind == Some(Kind::In) {
                    Op::Read
                } else {
                    Op::Write
                };
                (op, self.sector)
            }
            Some(Kind::Flush) => (Op::Flush, self.sector),
            Some(Kind::GetId) => {
                if self.data_len == 0 {
                    return Err(reject(IOERR, "GET_ID without a device-writable buffer"));
                }
                (Op::GetId, self.sector)
            }
            Some(kind @ (Kind::Discard | Kind::WriteZeroes)) => {
                if self.segment_len != SEGMENT_LEN as u64 {
                    return Err(reject(
                        IOERR,
                        "discard/write-zeroes needs one 16-byte segment",
                    ));
                }
                let [
                    s0,
                    s1,
                    s2,
                    s3,
                    s4,
                    s5,
                    s6,
                    s7,
                    n0,
                    n1,
                    n2,
                    n3,
                    f0,
                    f1,
                    f2,
                    f3,
                ] = self.segment;
                let sector = u64::from_le_bytes([s0, s1, s2, s3, s4, s5, s6, s7]);
                let num_sectors = u32::from_le_bytes([n0, n1, n2, n3]);
                let flags = u32::from_le_bytes([f0, f1, f2, f3]);
                let (allowed_flags, max) = if kind == Kind::Discard {
                    (0, limits.max_discard_sectors)
                } else {
                    (
                        VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
                        limits.max_write_zeroes_sectors,
                    )
                };
                if flags & !allowed_flags != 0 {
                    return Err(reject(UNSUPP, "unsupported discard/write-zeroes flags"));
                }
                if num_sectors > max {
                    return Err(reject(IOERR, "discard/write-zeroes longer than the limit"));
                }
                check_range(sector, u64::from(num_sectors), limits)
                    .map_err(|reason| reject(IOERR, reason))?;
                let op = if kind == Kind::Discard {
                    Op::Discard {
                        sector,
                        num_sectors,
                    }
                } else {
                    Op::WriteZeroes {
                        sector,
                        num_sectors,
                        unmap: flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0,
                    }
                };
                (op, sector)
            }
            Some(Kind::Unknown) => return Err(reject(UNSUPP, "unsupported request type")),
            None => {
                return Err(reject(
                    IOERR,
                    "request header too short or not device-readable",
                ));
            }
        };
        let mut iovecs = self.iovecs;
        let data_len = match op {
            Op::Read | Op::Write | Op::GetId => self.data_len,
            _ => {
                iovecs.clear();
                0
            }
        };
        Ok(Request {
            head,
            op,
            sector,
            iovecs,
            data_len,
            status,
        })
    }
}

/// Checks that `sectors` sectors from `sector` lie within the disk.
fn check_range(sector: u64, sectors: u64, limits: &Limits) -> Result<(), &'static str> {
    match sector.checked_add(sectors) {
        None => Err("sector range overflows"),
        Some(end) if end > limits.capacity_sectors => Err("sector range past the end of the disk"),
        Some(_) => Ok(()),
    }
}

/// Parses and validates `chain`, reusing `iovecs` (cleared first) for the data buffers.
///
/// Every outcome names the chain's head, so the caller can always return it to the used
/// ring. A rejection carries the status byte's address only when the chain ends cleanly
/// in a device-writable descriptor of at least one byte inside guest memory.
pub fn parse<M>(
    chain: DescriptorChain<M>,
    limits: &Limits,
    iovecs: Vec<libc::iovec>,
) -> Result<Request, Rejected>
where
    M: Deref<Target = GuestMemMmap>,
{
    let head = chain.head_index();
    let mut iovecs = iovecs;
    iovecs.clear();
    let mut walk = Walk::new(limits, iovecs);
    let mut chain = chain;
    let mut last: Option<Descriptor> = None;
    // The iterator ends after at most one table's worth of descriptors (its TTL) plus one
    // indirect table, and ends silently on any malformed link: `last` tells which.
    while let Some(desc) = chain.next() {
        walk.visit(chain.memory(), &desc);
        last = Some(desc);
    }
    let mem = chain.memory();
    let no_status = |reason: &'static str| Rejected {
        head,
        status: None,
        code: IOERR,
        reason,
    };
    let Some(last) = last else {
        return Err(no_status("empty or unreadable descriptor chain"));
    };
    if last.has_next() {
        return Err(no_status(
            "descriptor chain loops, is too long or leaves its table",
        ));
    }
    if !last.is_write_only() {
        return Err(no_status("status descriptor not device-writable"));
    }
    let Some(len) = last.len().checked_sub(1) else {
        return Err(no_status("status descriptor is empty"));
    };
    let status = match last.addr().0.checked_add(u64::from(len)) {
        Some(addr) if mem.address_in_range(GuestAddress(addr)) => GuestAddress(addr),
        _ => return Err(no_status("status byte outside guest memory")),
    };
    // The last descriptor is the pending one: its bytes before the status are data.
    walk.pending = None;
    walk.writable_data(mem, last.addr(), len);
    walk.finish(head, status)
}

/// Bytes the device writes into the chain when `req` succeeds (for the used ring): the
/// data of a read or GET_ID plus the status byte.
pub fn used_len(req: &Request) -> u32 {
    let data = match req.op {
        Op::Read => req.data_len,
        Op::GetId => req.data_len.min(ID_BYTES as u64),
        _ => 0,
    };
    u32::try_from(data.saturating_add(1)).unwrap_or(u32::MAX)
}

/// Writes the status byte; false when `addr` is not in `mem`.
pub fn write_status(mem: &GuestMemMmap, addr: GuestAddress, code: u8) -> bool {
    mem.write_obj(code, addr).is_ok()
}

/// Copies the zero-padded 20-byte GET_ID answer (the serial, cut to 20 bytes) into the
/// iovecs of a parsed GET_ID request, stopping when they are full; returns bytes written.
///
/// # Safety
///
/// Every iovec with a non-null `iov_base` must point to `iov_len` bytes that are valid
/// for writes for the whole call and that no Rust reference covers meanwhile. The iovecs
/// of a [`Request`] returned by [`parse`] qualify as long as the guest memory map that
/// `parse` walked is kept alive (the guest itself may touch the bytes concurrently; the
/// writes are volatile).
pub unsafe fn write_id(iovecs: &[libc::iovec], serial: &str) -> u32 {
    let mut id = [0u8; ID_BYTES];
    for (dst, src) in id.iter_mut().zip(serial.as_bytes()) {
        *dst = *src;
    }
    let mut written = 0usize;
    for iov in iovecs {
        let Some(rest) = id.get(written..) else { break };
        let n = rest.len().min(iov.iov_len);
        if n == 0 || iov.iov_base.is_null() {
            continue;
        }
        let dst = iov.iov_base.cast::<u8>();
        for (i, byte) in rest.iter().take(n).enumerate() {
            // SAFETY: the caller guarantees `iov_len` writable bytes at `iov_base` (this
            // function's contract) and `i < n <= iov_len`. The guest may touch the bytes
            // concurrently, hence volatile writes.
            unsafe { dst.add(i).write_volatile(*byte) };
        }
        written = written.saturating_add(n);
    }
    // written <= 20.
    u32::try_from(written).unwrap_or(u32::MAX)
}
