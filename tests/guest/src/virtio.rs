//! A minimal virtio-pci (modern) block driver: split queues, one 3-descriptor chain per
//! request slot, MSI-X vector per queue (masked while polling).

use core::sync::atomic::{Ordering, compiler_fence};

use crate::io::{rd, rdtsc, wr};
use crate::pci::{Bdf, Config};

/// Disks driven at most.
pub const MAX_DISKS: usize = 4;
/// Queues per disk used at most.
pub const MAX_QUEUES: usize = 4;
/// Queue size used at most.
const QSIZE_MAX: u16 = 128;
/// Request slots (outstanding requests) per queue at most.
pub const SLOTS: usize = 32;
/// Bytes per request.
pub const BLOCK: usize = 4096;
/// First IDT vector of the MSI-X vectors (see boot.s).
const VECTOR_BASE: u32 = 0x40;

const VIRTIO_F_VERSION_1: u64 = 1 << 32;
const VIRTIO_BLK_F_RO: u64 = 1 << 5;
const VIRTIO_BLK_F_MQ: u64 = 1 << 12;
const T_IN: u32 = 0;
const T_OUT: u32 = 1;
/// `VIRTIO_BLK_S_IOERR`.
pub const S_IOERR: u8 = 1;

#[repr(C, align(4096))]
struct Page([u8; 4096]);

const NQ: usize = MAX_DISKS * MAX_QUEUES;
static mut RINGS: [Page; NQ] = [const { Page([0; 4096]) }; NQ];
static mut BUFS: [[Page; SLOTS]; NQ] = [const { [const { Page([0; 4096]) }; SLOTS] }; NQ];
static mut HDRS: [Page; NQ] = [const { Page([0; 4096]) }; NQ];

unsafe extern "C" {
    static mut irq_counts: [u64; 16];
}

/// Interrupts counted by the IDT handler of MSI-X vector index `v`.
pub fn irq_count(v: usize) -> u64 {
    // SAFETY: an in-bounds element of the counter array the handlers bump; read volatile.
    unsafe { core::ptr::read_volatile((&raw const irq_counts).cast::<u64>().add(v)) }
}

/// One split virtqueue with its request slots.
pub struct Queue {
    index: u16,
    size: u16,
    desc: u64,
    avail: u64,
    used: u64,
    notify: u64,
    bufs: u64,
    hdrs: u64,
    avail_idx: u16,
    last_used: u16,
    free: u32,
    slots: usize,
    /// MSI-X vector index (IDT vector `0x40 + vec`).
    pub vec: usize,
    lba: [u64; SLOTS],
}

impl Queue {
    /// Address of slot `s`'s data buffer.
    pub fn buf(&self, s: usize) -> u64 {
        self.bufs + (s * BLOCK) as u64
    }

    fn status_addr(&self, s: usize) -> u64 {
        self.hdrs + (SLOTS * 16 + s) as u64
    }

    /// Takes a free slot.
    pub(crate) fn take(&mut self) -> Option<usize> {
        if self.free == 0 {
            return None;
        }
        let s = self.free.trailing_zeros() as usize;
        self.free &= !(1 << s);
        Some(s)
    }

    /// Requests outstanding.
    pub fn in_flight(&self) -> usize {
        self.slots - self.free.count_ones() as usize
    }

    pub(crate) fn submit(&mut self, s: usize, write: bool, sector: u64) {
        let h = self.hdrs + (s * 16) as u64;
        wr::<u32>(h, if write { T_OUT } else { T_IN });
        wr::<u32>(h + 4, 0);
        wr::<u64>(h + 8, sector);
        wr::<u8>(self.status_addr(s), 0xFF);
        let d = self.desc + (3 * s as u64 + 1) * 16;
        wr::<u16>(d + 12, if write { 1 } else { 1 | 2 });
        self.lba[s] = sector;
        let slot = self.avail_idx % self.size;
        wr::<u16>(self.avail + 4 + 2 * slot as u64, (3 * s) as u16);
        compiler_fence(Ordering::Release);
        self.avail_idx = self.avail_idx.wrapping_add(1);
        wr::<u16>(self.avail + 2, self.avail_idx);
    }

    pub(crate) fn kick(&self) {
        compiler_fence(Ordering::SeqCst);
        wr::<u16>(self.notify, self.index);
    }

    /// Pops completions: `f(queue, slot, sector, status)`; the slot is free again after.
    pub(crate) fn reap(&mut self, f: &mut dyn FnMut(&Queue, usize, u64, u8)) -> usize {
        let used_idx = rd::<u16>(self.used + 2);
        compiler_fence(Ordering::Acquire);
        let mut n = 0;
        while self.last_used != used_idx {
            let e = self.used + 4 + 8 * (self.last_used % self.size) as u64;
            let s = (rd::<u32>(e) / 3) as usize;
            if s < self.slots {
                f(self, s, self.lba[s], rd::<u8>(self.status_addr(s)));
                self.free |= 1 << s;
            }
            self.last_used = self.last_used.wrapping_add(1);
            n += 1;
        }
        n
    }

    fn set_interrupts(&self, on: bool) {
        wr::<u16>(self.avail, if on { 0 } else { 1 });
    }
}

/// One virtio-blk function, initialised and DRIVER_OK.
pub struct Disk {
    /// Capacity in 512-byte sectors.
    pub capacity: u64,
    /// The device offered `VIRTIO_BLK_F_RO`.
    pub ro: bool,
    /// Queues in use.
    pub nq: usize,
    /// Queue size in use.
    pub qsize: u16,
    /// The queues.
    pub queues: [Queue; MAX_QUEUES],
    msix_table: u64,
    common: u64,
}

fn cap_addr(cfg: &Config, b: Bdf, cap: u16) -> Result<u64, &'static str> {
    let bar = cfg.read8(b, cap + 4);
    let base = cfg.bar_addr(b, bar);
    if base == 0 || base >= 1 << 32 {
        return Err("BAR unassigned or above 4 GiB");
    }
    Ok(base + cfg.read32(b, cap + 8) as u64)
}

impl Disk {
    /// Initialises the function at `b` as disk number `n` (its rings and vectors).
    pub fn init(cfg: &Config, b: Bdf, n: usize) -> Result<Disk, &'static str> {
        let cmd = cfg.read16(b, 0x04);
        cfg.write16(b, 0x04, cmd | 0x6);
        let (mut common, mut notify, mut devcfg, mut mult, mut msix) = (0, 0, 0, 0u32, 0u16);
        let mut off = cfg.next_cap(b, 0);
        let mut guard = 0;
        while let Some(c) = off {
            match cfg.read8(b, c) {
                0x09 => match cfg.read8(b, c + 3) {
                    1 => common = cap_addr(cfg, b, c)?,
                    2 => {
                        notify = cap_addr(cfg, b, c)?;
                        mult = cfg.read32(b, c + 16);
                    }
                    4 => devcfg = cap_addr(cfg, b, c)?,
                    _ => {}
                },
                0x11 => msix = c,
                _ => {}
            }
            guard += 1;
            off = if guard > 48 { None } else { cfg.next_cap(b, c) };
        }
        if common == 0 || notify == 0 || devcfg == 0 {
            return Err("virtio capabilities missing");
        }
        if msix == 0 {
            return Err("no MSI-X capability");
        }
        let tbl = cfg.read32(b, msix + 4);
        let tbar = cfg.bar_addr(b, (tbl & 7) as u8);
        if tbar == 0 || tbar >= 1 << 32 {
            return Err("MSI-X BAR unassigned or above 4 GiB");
        }
        let msix_table = tbar + (tbl & !7) as u64;
        let table_size = (cfg.read16(b, msix + 2) & 0x7FF) as usize + 1;

        // Reset, ACKNOWLEDGE, DRIVER.
        wr::<u8>(common + 0x14, 0);
        let mut spins = 0;
        while rd::<u8>(common + 0x14) != 0 && spins < 1_000_000 {
            spins += 1;
        }
        wr::<u8>(common + 0x14, 1);
        wr::<u8>(common + 0x14, 3);
        wr::<u32>(common, 0);
        let mut offered = rd::<u32>(common + 4) as u64;
        wr::<u32>(common, 1);
        offered |= (rd::<u32>(common + 4) as u64) << 32;
        if offered & VIRTIO_F_VERSION_1 == 0 {
            return Err("VERSION_1 not offered");
        }
        let want = offered & (VIRTIO_F_VERSION_1 | VIRTIO_BLK_F_RO | VIRTIO_BLK_F_MQ);
        wr::<u32>(common + 8, 0);
        wr::<u32>(common + 0xC, want as u32);
        wr::<u32>(common + 8, 1);
        wr::<u32>(common + 0xC, (want >> 32) as u32);
        wr::<u8>(common + 0x14, 3 | 8);
        if rd::<u8>(common + 0x14) & 8 == 0 {
            return Err("FEATURES_OK not accepted");
        }

        // MSI-X on, every entry masked until the interrupt phase.
        for e in 0..table_size.min(MAX_QUEUES + 1) {
            wr::<u32>(msix_table + 16 * e as u64 + 12, 1);
        }
        let ctrl = cfg.read16(b, msix + 2);
        cfg.write16(b, msix + 2, (ctrl | 0x8000) & !0x4000);
        wr::<u16>(common + 0x10, 0xFFFF);

        let capacity = rd::<u64>(devcfg);
        let dev_nq = rd::<u16>(common + 0x12) as usize;
        let mut nq = if want & VIRTIO_BLK_F_MQ != 0 {
            rd::<u16>(devcfg + 34) as usize
        } else {
            1
        };
        nq = nq.min(dev_nq).min(MAX_QUEUES).min(table_size).max(1);
        let mut disk = Disk {
            capacity,
            ro: want & VIRTIO_BLK_F_RO != 0,
            nq,
            qsize: 0,
            queues: core::array::from_fn(|_| Queue {
                index: 0,
                size: 0,
                desc: 0,
                avail: 0,
                used: 0,
                notify: 0,
                bufs: 0,
                hdrs: 0,
                avail_idx: 0,
                last_used: 0,
                free: 0,
                slots: 0,
                vec: 0,
                lba: [0; SLOTS],
            }),
            msix_table,
            common,
        };
        for q in 0..nq {
            let g = n * MAX_QUEUES + q;
            wr::<u16>(common + 0x16, q as u16);
            let max = rd::<u16>(common + 0x18);
            if max == 0 {
                return Err("queue size 0");
            }
            let size = max.min(QSIZE_MAX);
            wr::<u16>(common + 0x18, size);
            let ring = (&raw mut RINGS) as u64 + (g * 4096) as u64;
            // A hot plugged disk may reuse the rings of an ejected one: start them clean.
            for off in (0..4096u64).step_by(8) {
                wr::<u64>(ring + off, 0);
            }
            let (desc, avail, used) = (ring, ring + 2048, ring + 2560);
            for (field, addr) in [(0x20u64, desc), (0x28, avail), (0x30, used)] {
                wr::<u32>(common + field, addr as u32);
                wr::<u32>(common + field + 4, (addr >> 32) as u32);
            }
            let vec = g;
            let entry = msix_table + 16 * q as u64;
            wr::<u32>(entry, 0xFEE0_0000);
            wr::<u32>(entry + 4, 0);
            wr::<u32>(entry + 8, VECTOR_BASE + vec as u32);
            wr::<u16>(common + 0x1A, q as u16);
            if rd::<u16>(common + 0x1A) != q as u16 {
                return Err("MSI-X queue vector refused");
            }
            let noff = rd::<u16>(common + 0x1E) as u64;
            let slots = SLOTS.min(size as usize / 3);
            let queue = Queue {
                index: q as u16,
                size,
                desc,
                avail,
                used,
                notify: notify + noff * mult as u64,
                bufs: (&raw mut BUFS) as u64 + (g * SLOTS * BLOCK) as u64,
                hdrs: (&raw mut HDRS) as u64 + (g * 4096) as u64,
                avail_idx: 0,
                last_used: 0,
                free: if slots == 32 {
                    u32::MAX
                } else {
                    (1 << slots) - 1
                },
                slots,
                vec,
                lba: [0; SLOTS],
            };
            for s in 0..slots {
                let d = desc + (3 * s as u64) * 16;
                let parts = [
                    (queue.hdrs + 16 * s as u64, 16u32),
                    (queue.buf(s), BLOCK as u32),
                    (queue.status_addr(s), 1),
                ];
                for (i, (addr, len)) in parts.iter().enumerate() {
                    let di = d + 16 * i as u64;
                    wr::<u64>(di, *addr);
                    wr::<u32>(di + 8, *len);
                    wr::<u16>(di + 12, if i == 2 { 2 } else { 1 });
                    wr::<u16>(di + 14, (3 * s + i + 1) as u16);
                }
            }
            queue.set_interrupts(false);
            wr::<u16>(common + 0x1C, 1);
            disk.queues[q] = queue;
            disk.qsize = size;
        }
        wr::<u8>(common + 0x14, 3 | 8 | 4);
        Ok(disk)
    }

    /// Resets the device (status 0) and waits until it reads back 0: the device has
    /// stopped using the rings.
    pub fn reset(&self) {
        wr::<u8>(self.common + 0x14, 0);
        let mut spins = 0;
        while rd::<u8>(self.common + 0x14) != 0 && spins < 1_000_000 {
            spins += 1;
        }
    }

    /// Masks or unmasks the MSI-X entries of the queues and asks for (or suppresses)
    /// used-buffer notifications.
    pub fn set_interrupts(&mut self, on: bool) {
        for q in 0..self.nq {
            wr::<u32>(self.msix_table + 16 * q as u64 + 12, if on { 0 } else { 1 });
            self.queues[q].set_interrupts(on);
        }
    }

    /// Polls every queue once; returns the completions seen.
    fn reap_all(&mut self, f: &mut dyn FnMut(&Queue, usize, u64, u8)) -> usize {
        let mut n = 0;
        for q in 0..self.nq {
            n += self.queues[q].reap(f);
        }
        n
    }

    /// Submits one request per entry of `sectors` (spread over the queues), calling
    /// `fill(buf, sector)` before each write and `done(buf, sector, status)` after each
    /// completion. Gives up after `timeout` TSC ticks without progress.
    pub fn transfer(
        &mut self,
        write: bool,
        sectors: &mut dyn Iterator<Item = u64>,
        fill: &mut dyn FnMut(u64, u64),
        done: &mut dyn FnMut(u64, u64, u8),
        timeout: u64,
    ) -> Result<(), &'static str> {
        let mut next = sectors.next();
        let mut last = rdtsc();
        let mut q = 0;
        let mut cb = |qu: &Queue, s: usize, sector: u64, st: u8| done(qu.buf(s), sector, st);
        loop {
            let mut kicked = [false; MAX_QUEUES];
            while let Some(sector) = next {
                let qu = &mut self.queues[q];
                let Some(s) = qu.take() else { break };
                if write {
                    fill(qu.buf(s), sector);
                }
                compiler_fence(Ordering::Release);
                qu.submit(s, write, sector);
                kicked[q] = true;
                q = (q + 1) % self.nq;
                next = sectors.next();
            }
            for (i, k) in kicked.iter().enumerate() {
                if *k {
                    self.queues[i].kick();
                }
            }
            if self.reap_all(&mut cb) > 0 {
                last = rdtsc();
            }
            let busy = self.queues[..self.nq].iter().any(|x| x.in_flight() > 0);
            if next.is_none() && !busy {
                return Ok(());
            }
            if rdtsc() - last > timeout {
                return Err("request timeout");
            }
        }
    }

    /// Random 4 KiB reads (or writes) with at most `depth` in flight on every queue (the
    /// queue's full depth when larger) for `ticks` TSC ticks, polled or waiting for MSI-X
    /// interrupts. Returns (completed, errors, elapsed ticks).
    pub fn iops(
        &mut self,
        ticks: u64,
        irq: bool,
        span: u64,
        rng: &mut u64,
        write: bool,
        depth: usize,
    ) -> Result<(u64, u64, u64), &'static str> {
        let span_blocks = (span / 8).max(1);
        let mut rand = move || {
            *rng ^= *rng << 13;
            *rng ^= *rng >> 7;
            *rng ^= *rng << 17;
            (*rng % span_blocks) * 8
        };
        let (mut done, mut errors) = (0u64, 0u64);
        let t0 = rdtsc();
        for q in 0..self.nq {
            while self.queues[q].in_flight() < depth {
                let Some(s) = self.queues[q].take() else {
                    break;
                };
                let sector = rand();
                self.queues[q].submit(s, write, sector);
            }
            self.queues[q].kick();
        }
        let mut stopping = false;
        let mut elapsed = 0;
        let mut counted = 0;
        loop {
            let counts: [u64; MAX_QUEUES] = core::array::from_fn(|q| {
                if q < self.nq {
                    irq_count(self.queues[q].vec)
                } else {
                    0
                }
            });
            let mut progressed = false;
            for q in 0..self.nq {
                let qu = &mut self.queues[q];
                let n = qu.reap(&mut |_, _, _, st| {
                    if st != 0 {
                        errors += 1;
                    }
                });
                if n == 0 {
                    continue;
                }
                progressed = true;
                done += n as u64;
                if !stopping {
                    while qu.in_flight() < depth {
                        let Some(s) = qu.take() else { break };
                        qu.submit(s, write, rand());
                    }
                    qu.kick();
                }
            }
            let now = rdtsc();
            if !stopping && now - t0 >= ticks {
                stopping = true;
                elapsed = now - t0;
                counted = done;
            }
            let busy = self.queues[..self.nq].iter().any(|x| x.in_flight() > 0);
            if stopping && !busy {
                return Ok((counted, errors, elapsed));
            }
            if irq && !progressed {
                let wait0 = rdtsc();
                while (0..self.nq).all(|q| irq_count(self.queues[q].vec) == counts[q]) {
                    if rdtsc() - wait0 > ticks.max(1) * 4 {
                        return Err("interrupt wait timeout");
                    }
                    core::hint::spin_loop();
                }
            }
        }
    }
}
