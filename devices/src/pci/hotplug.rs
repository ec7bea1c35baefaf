//! The PCI hot plug controller: a small register block the guest's ACPI code (the DSDT's
//! `\_SB.PCI0.PCNT` and `_EJ0` methods) reads and writes to learn which slots of bus 0
//! gained or are to lose a device, and to say that it let go of one.
//!
//! Registers (32 bits each, little-endian, at the block's base):
//!
//! | offset | name | access | meaning |
//! |---|---|---|---|
//! | 0x0 | `PCIU` | read, clears | slots whose device was plugged since the last read |
//! | 0x4 | `PCID` | read, clears | slots whose device the host asks the guest to eject |
//! | 0x8 | `B0EJ` | write | slots the guest has ejected (bit n = slot n) |
//! | 0xC | `PRES` | read | slots holding a hot-pluggable device right now |
//!
//! The controller knows PCI slot numbers, not KVM or virtio: the VMM asks it to announce
//! a change ([`HotplugController::plug`], [`HotplugController::request_eject`]), and the
//! interrupt and the eject notice go to the callbacks it was built with. Every guest
//! access is checked: odd offsets, sizes or bits for slot 0 (the host bridge) are ignored.

use std::sync::Mutex;

use block::sync::lock;

/// Bytes of the register block.
pub const HOTPLUG_REGS_SIZE: u64 = 0x10;
/// Offset of `PCIU` (slots plugged since the last read).
pub const REG_PCIU: u64 = 0x0;
/// Offset of `PCID` (slots to eject).
pub const REG_PCID: u64 = 0x4;
/// Offset of `B0EJ` (slots ejected by the guest).
pub const REG_B0EJ: u64 = 0x8;
/// Offset of `PRES` (slots present).
pub const REG_PRES: u64 = 0xC;

/// Slot 0 holds the host bridge and never changes.
const HOTPLUG_SLOTS: u32 = !1;

#[derive(Debug, Default)]
struct Bits {
    /// Announced plugs not yet read by the guest.
    up: u32,
    /// Announced eject requests not yet read by the guest.
    down: u32,
    /// Eject requests not yet answered by an eject.
    requested: u32,
    present: u32,
}

/// Called with no lock held: raise the hot plug interrupt (the ACPI GED's line).
pub type InterruptFn = Box<dyn Fn() + Send + Sync>;
/// Called with no lock held, once per slot the guest ejected that was present.
pub type EjectFn = Box<dyn Fn(u8) + Send + Sync>;

/// See the module documentation.
pub struct HotplugController {
    bits: Mutex<Bits>,
    interrupt: InterruptFn,
    on_eject: EjectFn,
}

impl std::fmt::Debug for HotplugController {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HotplugController")
            .field("bits", &*lock(&self.bits))
            .finish_non_exhaustive()
    }
}

impl HotplugController {
    /// A controller whose announcements call `interrupt` and whose ejects call `on_eject`.
    pub fn new(interrupt: InterruptFn, on_eject: EjectFn) -> Self {
        HotplugController {
            bits: Mutex::new(Bits::default()),
            interrupt,
            on_eject,
        }
    }

    fn bit(slot: u8) -> Option<u32> {
        let b = 1u32.checked_shl(u32::from(slot))?;
        (b & HOTPLUG_SLOTS != 0).then_some(b)
    }

    /// Records a device present at `slot` from the start (cold plugged): no announcement,
    /// but the guest may eject it later.
    pub fn set_present(&self, slot: u8) {
        if let Some(b) = Self::bit(slot) {
            lock(&self.bits).present |= b;
        }
    }

    /// A device was put at `slot`: tell the guest. Returns false for slot 0 or >= 32.
    pub fn plug(&self, slot: u8) -> bool {
        let Some(b) = Self::bit(slot) else {
            return false;
        };
        {
            let mut bits = lock(&self.bits);
            bits.present |= b;
            bits.up |= b;
            bits.down &= !b;
        }
        (self.interrupt)();
        true
    }

    /// Asks the guest to eject the device at `slot` (it answers through `B0EJ`).
    /// Returns false when no hot-pluggable device is present there.
    pub fn request_eject(&self, slot: u8) -> bool {
        let Some(b) = Self::bit(slot) else {
            return false;
        };
        {
            let mut bits = lock(&self.bits);
            if bits.present & b == 0 {
                return false;
            }
            bits.down |= b;
            bits.requested |= b;
            bits.up &= !b;
        }
        (self.interrupt)();
        true
    }

    /// Slots with a device, as a bitmap.
    pub fn present(&self) -> u32 {
        lock(&self.bits).present
    }

    /// Slots whose eject was requested and not yet done, as a bitmap.
    pub fn pending_ejects(&self) -> u32 {
        lock(&self.bits).requested
    }

    /// A guest read of the register block.
    pub fn read(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if data.len() != 4 {
            return;
        }
        let mut bits = lock(&self.bits);
        let value = match offset {
            REG_PCIU => std::mem::take(&mut bits.up),
            REG_PCID => std::mem::take(&mut bits.down),
            REG_PRES => bits.present,
            _ => 0,
        };
        data.copy_from_slice(&value.to_le_bytes());
    }

    /// A guest write of the register block.
    pub fn write(&self, offset: u64, data: &[u8]) {
        if offset != REG_B0EJ || data.len() != 4 {
            return;
        }
        let mut raw = [0u8; 4];
        raw.copy_from_slice(data);
        let value = u32::from_le_bytes(raw) & HOTPLUG_SLOTS;
        let ejected = {
            let mut bits = lock(&self.bits);
            let ejected = value & bits.present;
            bits.present &= !ejected;
            bits.down &= !ejected;
            bits.requested &= !ejected;
            bits.up &= !ejected;
            ejected
        };
        for slot in 0..32u8 {
            if ejected & (1 << slot) != 0 {
                (self.on_eject)(slot);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU32, Ordering};

    struct Probe {
        irqs: Arc<AtomicU32>,
        ejected: Arc<Mutex<Vec<u8>>>,
        hp: HotplugController,
    }

    fn probe() -> Probe {
        let irqs = Arc::new(AtomicU32::new(0));
        let ejected = Arc::new(Mutex::new(Vec::new()));
        let (i, e) = (irqs.clone(), ejected.clone());
        let hp = HotplugController::new(
            Box::new(move || {
                i.fetch_add(1, Ordering::SeqCst);
            }),
            Box::new(move |slot| e.lock().unwrap().push(slot)),
        );
        Probe { irqs, ejected, hp }
    }

    fn rd(hp: &HotplugController, off: u64) -> u32 {
        let mut b = [0xAAu8; 4];
        hp.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    #[test]
    fn plug_is_announced_once_and_read_clears() {
        let p = probe();
        assert!(p.hp.plug(3));
        assert_eq!(p.irqs.load(Ordering::SeqCst), 1);
        assert_eq!(rd(&p.hp, REG_PCIU), 1 << 3);
        assert_eq!(rd(&p.hp, REG_PCIU), 0, "PCIU clears on read");
        assert_eq!(rd(&p.hp, REG_PRES), 1 << 3);
    }

    #[test]
    fn eject_request_stays_pending_until_the_guest_ejects() {
        let p = probe();
        p.hp.set_present(2);
        assert_eq!(p.irqs.load(Ordering::SeqCst), 0, "cold plug is silent");
        assert!(p.hp.request_eject(2));
        assert_eq!(p.irqs.load(Ordering::SeqCst), 1);
        assert_eq!(rd(&p.hp, REG_PCID), 1 << 2);
        assert_eq!(rd(&p.hp, REG_PCID), 0, "PCID clears on read");
        assert_eq!(p.hp.pending_ejects(), 1 << 2, "still pending for the host");
        p.hp.write(REG_B0EJ, &(1u32 << 2).to_le_bytes());
        assert_eq!(*p.ejected.lock().unwrap(), vec![2]);
        assert_eq!(p.hp.pending_ejects(), 0);
        assert_eq!(rd(&p.hp, REG_PRES), 0);
        // A second eject of the same slot does nothing.
        p.hp.write(REG_B0EJ, &(1u32 << 2).to_le_bytes());
        assert_eq!(p.ejected.lock().unwrap().len(), 1);
    }

    #[test]
    fn hostile_accesses_are_ignored() {
        let p = probe();
        p.hp.set_present(1);
        assert!(!p.hp.plug(0), "host bridge");
        assert!(!p.hp.plug(32));
        assert!(!p.hp.request_eject(5), "empty slot");
        // Ejecting the host bridge and absent slots, odd sizes and offsets.
        p.hp.write(REG_B0EJ, &u32::MAX.to_le_bytes()[..2]);
        p.hp.write(REG_B0EJ + 1, &u32::MAX.to_le_bytes());
        p.hp.write(REG_PCIU, &u32::MAX.to_le_bytes());
        assert!(p.ejected.lock().unwrap().is_empty());
        p.hp.write(REG_B0EJ, &u32::MAX.to_le_bytes());
        assert_eq!(*p.ejected.lock().unwrap(), vec![1], "only the present slot");
        let mut b = [0xAAu8; 2];
        p.hp.read(REG_PRES, &mut b);
        assert_eq!(b, [0, 0]);
        assert_eq!(rd(&p.hp, 0x100), 0);
    }
}
