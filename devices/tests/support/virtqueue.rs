//! A split-virtqueue driver, the guest side of one queue: descriptor free list,
//! publishing chains (direct or indirect) with the ordering a real driver uses, kicks
//! that honour the device's suppression (`VRING_USED_F_NO_NOTIFY` or `avail_event`),
//! used-ring polling, and interrupts on the call eventfd with `used_event`.

#![allow(clippy::cast_possible_truncation)] // Test data and figures, not guest input.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{Ordering, fence};
use std::time::{Duration, Instant};

use virtio_bindings::bindings::virtio_ring::{VRING_AVAIL_F_NO_INTERRUPT, VRING_USED_F_NO_NOTIFY};
use virtio_queue::Queue;
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::EventFd;

use super::memory::TestMemory;
use super::split_ring::{
    DESC_SIZE, Desc, F_INDIRECT, F_NEXT, F_WRITE, SplitRing, need_event, write_desc_table,
};

/// When [`VirtqDriver::kick`] writes the kick eventfd.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KickMode {
    /// Every call kicks.
    Always,
    /// As a real driver: skip the kick when the device asked for none (`avail_event`
    /// with EVENT_IDX, `VRING_USED_F_NO_NOTIFY` without).
    Honour,
}

/// One buffer of a chain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Buf {
    /// Guest address.
    pub addr: u64,
    /// Length in bytes.
    pub len: u32,
    /// Device-writable.
    pub write: bool,
}

impl Buf {
    /// A buffer the device reads.
    pub fn out(addr: GuestAddress, len: u32) -> Self {
        Buf {
            addr: addr.0,
            len,
            write: false,
        }
    }

    /// A buffer the device writes.
    pub fn inp(addr: GuestAddress, len: u32) -> Self {
        Buf {
            addr: addr.0,
            len,
            write: true,
        }
    }
}

/// One used-ring element.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UsedElem {
    /// Head descriptor index the device returned.
    pub id: u32,
    /// Bytes the device says it wrote.
    pub len: u32,
}

/// What the driver saw of notifications.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DriverStats {
    /// Kicks written to the kick eventfd.
    pub kicks: u64,
    /// [`VirtqDriver::kick`] calls that the device's suppression skipped.
    pub kicks_suppressed: u64,
    /// Interrupts counted on the call eventfd (sum of the counter values read).
    pub interrupts: u64,
    /// Waits that timed out although used elements were there (a lost interrupt).
    pub missed_interrupts: u64,
}

/// The driver side of one split virtqueue.
#[derive(Debug)]
pub struct VirtqDriver {
    ring: SplitRing,
    event_idx: bool,
    kick_mode: KickMode,
    kick: EventFd,
    call: EventFd,
    free: Vec<u16>,
    avail_idx: u16,
    kicked_idx: u16,
    last_used: u16,
    interrupts: bool,
    stats: DriverStats,
}

impl VirtqDriver {
    /// Allocates a ring of `size` entries in `mem` with fresh kick and call eventfds
    /// (`EFD_NONBLOCK`). `event_idx` is what the driver and device negotiated.
    pub fn new(mem: &TestMemory, size: u16, event_idx: bool) -> io::Result<Self> {
        Self::on_ring(SplitRing::new(mem, size), event_idx)
    }

    /// A driver over an existing ring layout.
    pub fn on_ring(ring: SplitRing, event_idx: bool) -> io::Result<Self> {
        let size = ring.size();
        Ok(VirtqDriver {
            ring,
            event_idx,
            kick_mode: KickMode::Honour,
            kick: EventFd::new(libc::EFD_NONBLOCK)?,
            call: EventFd::new(libc::EFD_NONBLOCK)?,
            free: (0..size).rev().collect(),
            avail_idx: 0,
            kicked_idx: 0,
            last_used: 0,
            interrupts: true,
            stats: DriverStats::default(),
        })
    }

    /// The raw ring.
    pub fn ring(&self) -> &SplitRing {
        &self.ring
    }

    /// The memory the ring lives in.
    pub fn mem(&self) -> &TestMemory {
        self.ring.mem()
    }

    /// Queue size.
    pub fn size(&self) -> u16 {
        self.ring.size()
    }

    /// Whether EVENT_IDX is in use.
    pub fn event_idx(&self) -> bool {
        self.event_idx
    }

    /// A device-side `virtio_queue::Queue` on the same rings, ready.
    pub fn device_queue(&self) -> Queue {
        self.ring.device_queue(self.event_idx)
    }

    /// The kick eventfd (the driver writes it; give a clone to the device).
    pub fn kick_fd(&self) -> &EventFd {
        &self.kick
    }

    /// The call eventfd (the device writes it; give a clone to the device).
    pub fn call_fd(&self) -> &EventFd {
        &self.call
    }

    /// A dup of the kick eventfd for the device side.
    pub fn device_kick(&self) -> io::Result<EventFd> {
        self.kick.try_clone()
    }

    /// A dup of the call eventfd for the device side.
    pub fn device_call(&self) -> io::Result<EventFd> {
        self.call.try_clone()
    }

    /// Chooses when [`VirtqDriver::kick`] notifies.
    pub fn set_kick_mode(&mut self, mode: KickMode) {
        self.kick_mode = mode;
    }

    /// Notification counters.
    pub fn stats(&self) -> DriverStats {
        self.stats
    }

    /// Descriptors on the free list.
    pub fn free_descriptors(&self) -> usize {
        self.free.len()
    }

    /// The next avail index the driver will publish (its shadow of `avail.idx`).
    pub fn avail_idx(&self) -> u16 {
        self.avail_idx
    }

    /// The device's `avail_event` as the driver sees it now, and the avail index of the
    /// driver's last kick decision (for diagnosing a lost kick).
    pub fn kick_state(&self) -> (u16, u16) {
        (self.ring.avail_event(), self.kicked_idx)
    }

    /// The used index the driver has consumed up to.
    pub fn last_used(&self) -> u16 {
        self.last_used
    }

    /// Starts both shadows at `idx` (and writes `avail.idx`), as if `idx` requests had
    /// already gone through: reaches the 16-bit wrap quickly. Pair it with
    /// `Queue::set_next_avail(idx)` / `set_next_used(idx)` on the device side and a
    /// matching `used.idx` ([`VirtqDriver::set_used_idx_raw`]).
    pub fn start_at(&mut self, idx: u16) {
        self.avail_idx = idx;
        self.kicked_idx = idx;
        self.last_used = idx;
        self.ring.set_avail_idx(idx);
        if self.event_idx {
            self.ring.set_used_event(idx);
        }
    }

    /// Writes `used.idx` directly (only to set a starting point; the device owns it).
    pub fn set_used_idx_raw(&self, idx: u16) {
        self.ring.mem().store(
            GuestAddress(self.ring.used_addr().0 + 2),
            idx.to_le(),
            Ordering::Release,
        );
    }

    /// Takes `n` descriptors off the free list (for raw chains in hostile tests, or
    /// for [`VirtqDriver::add_chain`]); `None` if too few are free.
    pub fn alloc_descs(&mut self, n: usize) -> Option<Vec<u16>> {
        if n == 0 || n > self.free.len() {
            return None;
        }
        let at = self.free.len() - n;
        Some(self.free.split_off(at))
    }

    /// Returns descriptors to the free list.
    pub fn free_descs(&mut self, descs: &[u16]) {
        self.free.extend_from_slice(descs);
    }

    /// Builds a chain of `bufs` in the descriptor table and publishes it. Returns the
    /// head and every table index the chain holds (free them once it is used), or
    /// `None` when too few descriptors are free.
    pub fn add_chain(&mut self, bufs: &[Buf]) -> Option<(u16, Vec<u16>)> {
        let descs = self.alloc_descs(bufs.len())?;
        for (i, (b, &idx)) in bufs.iter().zip(&descs).enumerate() {
            let next = descs.get(i + 1).copied();
            self.ring.write_desc(idx, chain_desc(b, next));
        }
        let head = descs[0];
        self.publish(head);
        Some((head, descs))
    }

    /// Writes `bufs` as an indirect table at `table` (room for `bufs.len()` entries),
    /// points one descriptor at it and publishes that.
    pub fn add_indirect_chain(
        &mut self,
        table: GuestAddress,
        bufs: &[Buf],
    ) -> Option<(u16, Vec<u16>)> {
        let descs = self.alloc_descs(1)?;
        let entries: Vec<Desc> = bufs
            .iter()
            .enumerate()
            .map(|(i, b)| chain_desc(b, (i + 1 < bufs.len()).then_some((i + 1) as u16)))
            .collect();
        write_desc_table(self.ring.mem(), table, &entries);
        let len = (bufs.len() as u64 * DESC_SIZE) as u32;
        self.ring
            .write_desc(descs[0], Desc::new(table.0, len, F_INDIRECT, 0));
        self.publish(descs[0]);
        Some((descs[0], descs))
    }

    /// Puts `head` in the avail ring and publishes the new index: descriptors (already
    /// written) and the entry first, then a full fence, then `avail.idx` with release
    /// ordering. Does not kick. Any `head` is accepted (hostile tests).
    pub fn publish(&mut self, head: u16) {
        self.ring.set_avail_entry(self.avail_idx, head);
        self.avail_idx = self.avail_idx.wrapping_add(1);
        fence(Ordering::SeqCst);
        self.ring.set_avail_idx(self.avail_idx);
    }

    /// Notifies the device of what was published since the last kick, unless the
    /// device suppressed it ([`KickMode::Honour`]). Returns whether it kicked.
    pub fn kick(&mut self) -> io::Result<bool> {
        // Make avail.idx visible before reading the device's suppression fields.
        fence(Ordering::SeqCst);
        let new = self.avail_idx;
        let old = self.kicked_idx;
        self.kicked_idx = new;
        let needed = match self.kick_mode {
            KickMode::Always => true,
            KickMode::Honour if self.event_idx => need_event(self.ring.avail_event(), new, old),
            KickMode::Honour => self.ring.used_flags() & VRING_USED_F_NO_NOTIFY as u16 == 0,
        };
        if needed {
            self.kick.write(1)?;
            self.stats.kicks += 1;
        } else {
            self.stats.kicks_suppressed += 1;
        }
        Ok(needed)
    }

    /// Reads the used elements the device added since the last call. With EVENT_IDX
    /// and interrupts on, also asks for an interrupt at the next one (`used_event`).
    /// Panics if the device moved `used.idx` by more than the queue size.
    pub fn poll_used(&mut self) -> Vec<UsedElem> {
        let used = self.ring.used_idx();
        let n = used.wrapping_sub(self.last_used);
        assert!(
            n <= self.size(),
            "device moved used.idx from {} to {used}: more than the queue size {}",
            self.last_used,
            self.size()
        );
        let mut out = Vec::with_capacity(usize::from(n));
        while self.last_used != used {
            let (id, len) = self.ring.used_elem(self.last_used);
            out.push(UsedElem { id, len });
            self.last_used = self.last_used.wrapping_add(1);
        }
        if self.interrupts && self.event_idx {
            self.ring.set_used_event(self.last_used);
        }
        out
    }

    /// Whether used elements are waiting.
    pub fn has_used(&self) -> bool {
        self.ring.used_idx() != self.last_used
    }

    /// Turns interrupts on or off (`avail.flags` without EVENT_IDX; `used_event` far
    /// ahead with it).
    pub fn set_interrupts(&mut self, on: bool) {
        self.interrupts = on;
        if self.event_idx {
            let ev = if on {
                self.last_used
            } else {
                self.last_used.wrapping_add(0x7fff)
            };
            self.ring.set_used_event(ev);
        } else {
            let flags = if on {
                0
            } else {
                VRING_AVAIL_F_NO_INTERRUPT as u16
            };
            self.ring.set_avail_flags(flags);
        }
    }

    /// Whether interrupts are on.
    pub fn interrupts_enabled(&self) -> bool {
        self.interrupts
    }

    /// Asks for an interrupt at the next used element and re-checks the used ring
    /// after a full fence (so one that landed meanwhile is not slept through).
    /// Returns true when used elements are already waiting.
    pub fn arm(&mut self) -> bool {
        if self.interrupts {
            if self.event_idx {
                self.ring.set_used_event(self.last_used);
            } else {
                self.ring.set_avail_flags(0);
            }
        }
        fence(Ordering::SeqCst);
        self.has_used()
    }

    /// Reads (and clears) the call eventfd without blocking; returns the count.
    pub fn take_interrupts(&mut self) -> u64 {
        match self.call.read() {
            Ok(n) => {
                self.stats.interrupts += n;
                n
            }
            Err(_) => 0,
        }
    }

    /// Blocks until the call eventfd is signalled or `timeout` passes; returns the
    /// count read (0 on timeout).
    pub fn wait_interrupt(&mut self, timeout: Duration) -> io::Result<u64> {
        let deadline = Instant::now() + timeout;
        loop {
            let n = self.take_interrupts();
            if n > 0 {
                return Ok(n);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(0);
            }
            let mut pfd = libc::pollfd {
                fd: self.call.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            let ms = left.as_millis().clamp(1, i32::MAX as u128) as i32;
            // SAFETY: `pfd` is a valid pollfd for the duration of the call; nfds is 1.
            let r = unsafe { libc::poll(&mut pfd, 1, ms) };
            if r < 0 {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
        }
    }

    /// Blocks until used elements are waiting (sleeping on the call eventfd, or
    /// polling when interrupts are off) or `timeout` passes. Returns whether some are.
    /// A device that adds used elements without the interrupt the driver asked for
    /// is not papered over: the wait runs to `timeout` and
    /// [`DriverStats::missed_interrupts`] counts it.
    pub fn wait_used(&mut self, timeout: Duration) -> io::Result<bool> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.arm() {
                return Ok(true);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(false);
            }
            if self.interrupts {
                if self.wait_interrupt(left)? == 0 && self.has_used() {
                    // The device added used elements but never signalled.
                    self.stats.missed_interrupts += 1;
                }
            } else {
                std::thread::sleep(Duration::from_micros(50).min(left));
            }
        }
    }
}

fn chain_desc(b: &Buf, next: Option<u16>) -> Desc {
    let mut flags = if b.write { F_WRITE } else { 0 };
    if next.is_some() {
        flags |= F_NEXT;
    }
    Desc::new(b.addr, b.len, flags, next.unwrap_or(0))
}
