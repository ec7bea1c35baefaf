//! Hot plug mode (`hotplug=N`): after the usual phases the guest does, without AML, what
//! an OS's ACPI PCI hot plug driver does when the VMM's hot plug controller speaks:
//! it routes the controller's interrupt (IOAPIC pin `hp_gsi`, default 23) to IDT vector
//! 0x4F, waits for it, reads `PCIU`/`PCID` at `hp_base` (default 0xF0000000), and
//! - for each plugged slot: finds the virtio-blk function there, brings it up, writes a
//!   pattern and reads it back;
//! - for each eject request: resets the device, writes the slot's bit to `B0EJ`, and
//!   checks that the slot then reads as empty.
//!
//! It handles `N` events, then returns. Lines: `hotplug.ready=1`, then per event
//! `hotplug.added slot=S disk=I verify=ok|fail irqs=K` or
//! `hotplug.ejected slot=S gone=1|0 irqs=K`, and `hotplug.timeout=1` if nothing comes.

use crate::io::{rd, rdtsc, wr};
use crate::pci::{Bdf, Config};
use crate::say;
use crate::virtio::{BLOCK, Disk, MAX_DISKS, irq_count};

const REG_PCIU: u64 = 0x0;
const REG_PCID: u64 = 0x4;
const REG_B0EJ: u64 = 0x8;
const IOAPIC: u64 = 0xFEC0_0000;
/// Counter slot of IDT vector 0x4F (MSI-X index 15: disk 3's queue 3, which this mode
/// never brings up: hot plugged disks use indexes 0..=2).
const HP_COUNTER: usize = 15;
const HP_VECTOR: u32 = 0x40 + HP_COUNTER as u32;
const VIRTIO_BLK_ID: u32 = 0x1042_1AF4;

/// What the command line asked for.
pub struct Plan {
    /// Events (plugs + ejects) to handle.
    pub events: u64,
    /// Register block address.
    pub base: u64,
    /// IOAPIC pin of the interrupt.
    pub gsi: u32,
    /// TSC ticks to wait for an event before giving up.
    pub wait: u64,
    /// TSC ticks a request may take.
    pub timeout: u64,
    /// Pattern seed.
    pub seed: u64,
    /// TSC ticks per millisecond.
    pub ms: u64,
}

/// Routes IOAPIC pin `gsi` to `vector` on APIC 0: fixed, edge, active high, unmasked.
fn ioapic_route(gsi: u32, vector: u32) {
    let reg = 0x10 + 2 * gsi;
    wr::<u32>(IOAPIC, reg + 1);
    wr::<u32>(IOAPIC + 0x10, 0);
    wr::<u32>(IOAPIC, reg);
    wr::<u32>(IOAPIC + 0x10, vector);
}

/// Function 0 of device `slot` on bus 0.
fn slot_bdf(slot: u8) -> Bdf {
    Bdf {
        bus: 0,
        dev: slot,
        func: 0,
    }
}

/// Writes 16 blocks spread over the disk and reads them back.
fn verify(d: &mut Disk, seed: u64, timeout: u64) -> bool {
    let per = (BLOCK / 512) as u64;
    let count = 16u64.min(d.capacity / per);
    let stride = ((d.capacity / count.max(1)) / per).max(1) * per;
    let words = (BLOCK / 8) as u64;
    let mut errors = 0u64;
    let w = d.transfer(
        true,
        &mut (0..count).map(|k| k * stride),
        &mut |buf, sector| {
            for i in 0..words {
                wr::<u64>(buf + 8 * i, crate::pattern_word(seed, sector, i));
            }
        },
        &mut |_, _, st| errors += (st != 0) as u64,
        timeout,
    );
    let mut bad = 0u64;
    let r = d.transfer(
        false,
        &mut (0..count).map(|k| k * stride),
        &mut |_, _| {},
        &mut |buf, sector, st| {
            if st != 0
                || (0..words)
                    .any(|i| rd::<u64>(buf + 8 * i) != crate::pattern_word(seed, sector, i))
            {
                bad += 1;
            }
        },
        timeout,
    );
    count > 0 && w.is_ok() && r.is_ok() && errors == 0 && bad == 0
}

fn add(
    cfg: &Config,
    slots: &mut [Option<u8>; MAX_DISKS],
    disks: &mut [Option<Disk>; MAX_DISKS],
    slot: u8,
    p: &Plan,
) -> bool {
    let b = slot_bdf(slot);
    let id = cfg.read32(b, 0);
    let Some(n) = (0..MAX_DISKS - 1).find(|&i| disks[i].is_none()) else {
        say!("hotplug.added slot={slot} error=no free disk index");
        return false;
    };
    if id != VIRTIO_BLK_ID {
        say!("hotplug.added slot={slot} error=id {id:#x}");
        return false;
    }
    match Disk::init(cfg, b, n) {
        Ok(mut d) => {
            let ok = verify(&mut d, p.seed ^ u64::from(slot), p.timeout);
            say!(
                "hotplug.added slot={slot} disk={n} capacity_sectors={} verify={} irqs={}",
                d.capacity,
                if ok { "ok" } else { "fail" },
                irq_count(HP_COUNTER)
            );
            disks[n] = Some(d);
            slots[n] = Some(slot);
            ok
        }
        Err(e) => {
            say!("hotplug.added slot={slot} error={e}");
            false
        }
    }
}

fn eject(
    cfg: &Config,
    slots: &mut [Option<u8>; MAX_DISKS],
    disks: &mut [Option<Disk>; MAX_DISKS],
    slot: u8,
    p: &Plan,
) -> bool {
    if let Some(n) = slots.iter().position(|s| *s == Some(slot)) {
        if let Some(d) = disks[n].take() {
            d.reset();
        }
        slots[n] = None;
    }
    wr::<u32>(p.base + REG_B0EJ, 1 << slot);
    let b = slot_bdf(slot);
    let gone = cfg.read32(b, 0) == u32::MAX;
    say!(
        "hotplug.ejected slot={slot} gone={} irqs={}",
        gone as u8,
        irq_count(HP_COUNTER)
    );
    gone
}

/// Runs the hot plug mode; `slots[i]` is the PCI slot of `disks[i]` (cold plugged).
pub fn run(
    cfg: &Config,
    slots: &mut [Option<u8>; MAX_DISKS],
    disks: &mut [Option<Disk>; MAX_DISKS],
    p: &Plan,
) -> bool {
    ioapic_route(p.gsi, HP_VECTOR);
    say!("hotplug.ready=1");
    let mut ok = true;
    let mut handled = 0;
    while handled < p.events {
        let start = rdtsc();
        let mut seen = irq_count(HP_COUNTER);
        let mut last_read = 0;
        let (up, down) = loop {
            // Read the registers when the interrupt came, and every 5 ms regardless.
            let now = rdtsc();
            let irqs = irq_count(HP_COUNTER);
            if irqs != seen || now - last_read > 5 * p.ms {
                seen = irqs;
                last_read = now;
                let up = rd::<u32>(p.base + REG_PCIU);
                let down = rd::<u32>(p.base + REG_PCID);
                if up | down != 0 {
                    break (up, down);
                }
            }
            if now - start > p.wait {
                say!("hotplug.timeout=1");
                return false;
            }
            core::hint::spin_loop();
        };
        for slot in 1..32u8 {
            if up & (1 << slot) != 0 {
                ok &= add(cfg, slots, disks, slot, p);
                handled += 1;
            }
            if down & (1 << slot) != 0 {
                ok &= eject(cfg, slots, disks, slot, p);
                handled += 1;
            }
        }
    }
    ok
}
