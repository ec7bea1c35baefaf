//! A virtio-blk driver for tests over [`VirtqDriver`]: builds request chains (header,
//! data segments, status; optionally indirect), tracks them by head, and turns used
//! elements into [`Completion`]s with the status byte and the data read.
//!
//! Each in-flight request owns one fixed buffer slot of the driver, so a queue can run
//! any number of requests over its lifetime. Data segments are placed 4 KiB-aligned
//! with a gap after each, so a device that treats a multi-segment chain as one
//! contiguous buffer reads or writes the wrong bytes.

#![allow(clippy::cast_possible_truncation)] // Test data and figures, not guest input.

use std::collections::VecDeque;
use std::io;
use std::time::{Duration, Instant};

use devices::virtio_blk::worker::LocalQueue;
use virtio_bindings::bindings::virtio_blk::VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP;
use virtio_queue::Queue;
use vm_memory::GuestAddress;

use super::blk_types::{
    BlkDriverConfig, BlkOp, Completion, HDR_OFF, ID_LEN, READ_POISON, ReqId, ReqOptions, SEG_ALIGN,
    SEG_OFF, STATUS_OFF, STATUS_UNSET, SubmitError, TABLE_OFF,
};
use super::memory::{TestMemory, align_up};
use super::virtqueue::{Buf, UsedElem, VirtqDriver};

#[derive(Debug)]
struct InFlight {
    id: ReqId,
    req_type: u32,
    sector: u64,
    slot: usize,
    descs: Vec<u16>,
    data_in: Vec<(GuestAddress, u32)>,
}

/// The guest side of one virtio-blk queue.
#[derive(Debug)]
pub struct BlkDriver {
    vq: VirtqDriver,
    cfg: BlkDriverConfig,
    slots_base: GuestAddress,
    free_slots: Vec<usize>,
    inflight: Vec<Option<InFlight>>,
    in_flight: usize,
    next_id: u64,
    backlog: VecDeque<Completion>,
    stray: Vec<UsedElem>,
}

/// Splits `len` bytes into `n` non-empty pieces, whole sectors when possible.
fn split_len(len: u32, n: usize) -> Vec<u32> {
    let n32 = n as u32;
    let (unit, units) = if len.is_multiple_of(512) && len / 512 >= n32 {
        (512, len / 512)
    } else {
        (1, len)
    };
    let per = units / n32;
    let mut out = vec![per * unit; n];
    if let Some(last) = out.last_mut() {
        *last += (units % n32) * unit;
    }
    out
}

impl BlkDriver {
    /// A driver with its ring and buffer slots allocated in `mem`.
    pub fn new(mem: &TestMemory, cfg: BlkDriverConfig) -> io::Result<Self> {
        let mut vq = VirtqDriver::new(mem, cfg.queue_size, cfg.event_idx)?;
        vq.set_kick_mode(cfg.kick_mode);
        let slots_base = mem.alloc(cfg.max_in_flight as u64 * cfg.slot_stride(), SEG_ALIGN);
        Ok(BlkDriver {
            vq,
            slots_base,
            free_slots: (0..cfg.max_in_flight).rev().collect(),
            inflight: (0..cfg.queue_size).map(|_| None).collect(),
            in_flight: 0,
            next_id: 0,
            backlog: VecDeque::new(),
            stray: Vec::new(),
            cfg,
        })
    }

    /// The underlying virtqueue driver (raw access, stats, interrupts).
    pub fn vq(&self) -> &VirtqDriver {
        &self.vq
    }

    /// Mutable access to the virtqueue driver (raw chains: reserve descriptors with
    /// `alloc_descs`, write them on `ring()`, `publish`; their used elements come back
    /// through [`BlkDriver::take_stray`]).
    pub fn vq_mut(&mut self) -> &mut VirtqDriver {
        &mut self.vq
    }

    /// The settings.
    pub fn config(&self) -> &BlkDriverConfig {
        &self.cfg
    }

    /// The guest memory.
    pub fn mem(&self) -> &TestMemory {
        self.vq.mem()
    }

    /// A ready device-side queue on this driver's rings.
    pub fn device_queue(&self) -> Queue {
        self.vq.device_queue()
    }

    /// The device side as the data plane takes it: the queue plus dups of the kick
    /// and call eventfds.
    pub fn local_queue(&self) -> io::Result<LocalQueue> {
        Ok(LocalQueue {
            queue: self.device_queue(),
            kick: self.vq.device_kick()?,
            call: self.vq.device_call()?,
        })
    }

    /// Requests submitted and not yet completed.
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Whether another request with `opts` would fit now.
    pub fn has_room(&self, opts: ReqOptions) -> bool {
        let descs = if opts.indirect { 1 } else { opts.segments + 2 };
        !self.free_slots.is_empty() && self.vq.free_descriptors() >= descs
    }

    /// Submits a read of `len` bytes at `sector` in `segments` data descriptors.
    pub fn submit_read(
        &mut self,
        sector: u64,
        len: u32,
        segments: usize,
    ) -> Result<ReqId, SubmitError> {
        self.submit(BlkOp::Read { sector, len }, self.opts(segments))
    }

    /// Submits a write of `data` at `sector` in `segments` data descriptors.
    pub fn submit_write(
        &mut self,
        sector: u64,
        data: &[u8],
        segments: usize,
    ) -> Result<ReqId, SubmitError> {
        let op = BlkOp::Write {
            sector,
            data: data.to_vec(),
        };
        self.submit(op, self.opts(segments))
    }

    /// Submits a flush.
    pub fn submit_flush(&mut self) -> Result<ReqId, SubmitError> {
        self.submit(BlkOp::Flush, self.opts(1))
    }

    /// Submits GET_ID.
    pub fn submit_get_id(&mut self) -> Result<ReqId, SubmitError> {
        self.submit(BlkOp::GetId, self.opts(1))
    }

    /// Submits a discard of `num_sectors` at `sector`.
    pub fn submit_discard(&mut self, sector: u64, num_sectors: u32) -> Result<ReqId, SubmitError> {
        self.submit(
            BlkOp::Discard {
                sector,
                num_sectors,
            },
            self.opts(1),
        )
    }

    /// Submits write-zeroes of `num_sectors` at `sector`.
    pub fn submit_write_zeroes(
        &mut self,
        sector: u64,
        num_sectors: u32,
        unmap: bool,
    ) -> Result<ReqId, SubmitError> {
        let op = BlkOp::WriteZeroes {
            sector,
            num_sectors,
            unmap,
        };
        self.submit(op, self.opts(1))
    }

    fn opts(&self, segments: usize) -> ReqOptions {
        ReqOptions {
            segments,
            indirect: self.cfg.indirect,
        }
    }

    fn slot_addr(&self, slot: usize, off: u64) -> GuestAddress {
        GuestAddress(self.slots_base.0 + slot as u64 * self.cfg.slot_stride() + off)
    }

    /// Lays `len` bytes out as `n` segments from `*cursor` in `slot`'s data area.
    fn place(&self, slot: usize, cursor: &mut u64, len: u32, n: usize) -> Vec<(GuestAddress, u32)> {
        split_len(len, n)
            .into_iter()
            .map(|l| {
                let at = self.slot_addr(slot, *cursor);
                // Leave a gap so that segments are never adjacent.
                *cursor = align_up(*cursor + u64::from(l) + 1, SEG_ALIGN);
                (at, l)
            })
            .collect()
    }

    /// Builds, publishes (without kicking) and tracks one request.
    pub fn submit(&mut self, op: BlkOp, opts: ReqOptions) -> Result<ReqId, SubmitError> {
        let (out_len, in_len) = match &op {
            BlkOp::Read { len, .. } => (0, *len),
            BlkOp::Write { data, .. } => (data.len(), 0),
            BlkOp::GetId => (0, ID_LEN),
            BlkOp::Custom { out, in_len, .. } => (out.len(), *in_len),
            _ => (0, 0),
        };
        let out_len = u32::try_from(out_len).map_err(|_| SubmitError::TooLarge)?;
        let n = opts.segments;
        for len in [out_len, in_len] {
            if len > 0 && (n == 0 || n as u64 > u64::from(len)) {
                return Err(SubmitError::BadSegments);
            }
        }
        if out_len.saturating_add(in_len) > self.cfg.max_data_bytes || n > self.cfg.max_segments {
            return Err(SubmitError::TooLarge);
        }
        let seg_bufs = |len: u32| if len > 0 { n } else { 0 };
        let has_range = matches!(op, BlkOp::Discard { .. } | BlkOp::WriteZeroes { .. });
        let nbufs = 2 + seg_bufs(out_len) + seg_bufs(in_len) + usize::from(has_range);
        let need_descs = if opts.indirect { 1 } else { nbufs };
        if self.free_slots.is_empty() || self.vq.free_descriptors() < need_descs {
            return Err(SubmitError::QueueFull);
        }
        let Some(slot) = self.free_slots.pop() else {
            return Err(SubmitError::QueueFull);
        };
        let mem = self.vq.mem().clone();

        // Header: type, ioprio, sector (little endian).
        let mut hdr = [0u8; 16];
        hdr[0..4].copy_from_slice(&op.req_type().to_le_bytes());
        hdr[8..16].copy_from_slice(&op.sector().to_le_bytes());
        let hdr_addr = self.slot_addr(slot, HDR_OFF);
        mem.write(hdr_addr, &hdr);
        let mut bufs = vec![Buf::out(hdr_addr, 16)];

        match &op {
            BlkOp::Discard {
                sector,
                num_sectors,
            }
            | BlkOp::WriteZeroes {
                sector,
                num_sectors,
                ..
            } => {
                let flags = match op {
                    BlkOp::WriteZeroes { unmap: true, .. } => VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
                    _ => 0,
                };
                let mut seg = [0u8; 16];
                seg[0..8].copy_from_slice(&sector.to_le_bytes());
                seg[8..12].copy_from_slice(&num_sectors.to_le_bytes());
                seg[12..16].copy_from_slice(&flags.to_le_bytes());
                let seg_addr = self.slot_addr(slot, SEG_OFF);
                mem.write(seg_addr, &seg);
                bufs.push(Buf::out(seg_addr, 16));
            }
            _ => {}
        }

        let mut cursor = self.cfg.data_off();
        let out_data: &[u8] = match &op {
            BlkOp::Write { data, .. } => data,
            BlkOp::Custom { out, .. } => out,
            _ => &[],
        };
        if out_len > 0 {
            let mut done = 0usize;
            for (addr, l) in self.place(slot, &mut cursor, out_len, n) {
                let l = l as usize;
                mem.write(addr, &out_data[done..done + l]);
                bufs.push(Buf::out(addr, l as u32));
                done += l;
            }
        }
        let data_in = if in_len > 0 {
            self.place(slot, &mut cursor, in_len, n)
        } else {
            Vec::new()
        };
        for &(addr, l) in &data_in {
            mem.fill(addr, READ_POISON, u64::from(l));
            bufs.push(Buf::inp(addr, l));
        }

        let status_addr = self.slot_addr(slot, STATUS_OFF);
        mem.write(status_addr, &[STATUS_UNSET]);
        bufs.push(Buf::inp(status_addr, 1));

        let added = if opts.indirect {
            let table = self.slot_addr(slot, TABLE_OFF);
            self.vq.add_indirect_chain(table, &bufs)
        } else {
            self.vq.add_chain(&bufs)
        };
        let Some((head, descs)) = added else {
            self.free_slots.push(slot);
            return Err(SubmitError::QueueFull);
        };
        let id = ReqId(self.next_id);
        self.next_id += 1;
        let entry = InFlight {
            id,
            req_type: op.req_type(),
            sector: op.sector(),
            slot,
            descs,
            data_in,
        };
        let prev = self.inflight[usize::from(head)].replace(entry);
        assert!(prev.is_none(), "head {head} reused while in flight");
        self.in_flight += 1;
        Ok(id)
    }

    /// Notifies the device (see [`VirtqDriver::kick`]).
    pub fn kick(&mut self) -> io::Result<bool> {
        self.vq.kick()
    }

    /// Collects the completions available now (never blocks). Used elements whose head
    /// is not a tracked request go to [`BlkDriver::take_stray`].
    pub fn poll_used(&mut self) -> Vec<Completion> {
        let mut out: Vec<Completion> = self.backlog.drain(..).collect();
        for elem in self.vq.poll_used() {
            match self.complete(elem) {
                Some(c) => out.push(c),
                None => self.stray.push(elem),
            }
        }
        out
    }

    fn complete(&mut self, elem: UsedElem) -> Option<Completion> {
        let head = u16::try_from(elem.id).ok()?;
        let entry = self.inflight.get_mut(usize::from(head))?.take()?;
        let mem = self.vq.mem().clone();
        let status = mem.read(self.slot_addr(entry.slot, STATUS_OFF), 1)[0];
        let total: usize = entry.data_in.iter().map(|d| d.1 as usize).sum();
        let mut data = Vec::with_capacity(total);
        for &(addr, l) in &entry.data_in {
            data.extend_from_slice(&mem.read(addr, l as usize));
        }
        self.vq.free_descs(&entry.descs);
        self.free_slots.push(entry.slot);
        self.in_flight -= 1;
        Some(Completion {
            id: entry.id,
            head,
            req_type: entry.req_type,
            sector: entry.sector,
            status,
            used_len: elem.len,
            data,
        })
    }

    /// Used elements that matched no tracked request (raw chains, or a device bug).
    pub fn take_stray(&mut self) -> Vec<UsedElem> {
        std::mem::take(&mut self.stray)
    }

    /// Blocks (on the call eventfd) until at least one completion or `timeout`;
    /// returns what completed (empty on timeout).
    pub fn wait(&mut self, timeout: Duration) -> io::Result<Vec<Completion>> {
        let deadline = Instant::now() + timeout;
        loop {
            let done = self.poll_used();
            if !done.is_empty() {
                return Ok(done);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || !self.vq.wait_used(left)? {
                return Ok(self.poll_used());
            }
        }
    }

    /// Waits until nothing is in flight; returns every completion. Fails with
    /// `TimedOut` if requests are still in flight at `timeout`.
    pub fn drain(&mut self, timeout: Duration) -> io::Result<Vec<Completion>> {
        let deadline = Instant::now() + timeout;
        let mut all = self.poll_used();
        while self.in_flight > 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                self.backlog.extend(all);
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("{} requests still in flight", self.in_flight),
                ));
            }
            all.extend(self.wait(left)?);
        }
        Ok(all)
    }

    /// Submits `op`, kicks, and waits for its completion (others that complete
    /// meanwhile stay for the next [`BlkDriver::poll_used`]).
    pub fn run(
        &mut self,
        op: BlkOp,
        opts: ReqOptions,
        timeout: Duration,
    ) -> io::Result<Completion> {
        let id = self.submit(op, opts).map_err(io::Error::other)?;
        self.kick()?;
        let deadline = Instant::now() + timeout;
        let mut others = Vec::new();
        let result = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("request {id:?} did not complete"),
                ));
            }
            let mut found = None;
            for c in self.wait(left)? {
                if c.id == id {
                    found = Some(c);
                } else {
                    others.push(c);
                }
            }
            if let Some(c) = found {
                break Ok(c);
            }
        };
        self.backlog.extend(others);
        result
    }
}
