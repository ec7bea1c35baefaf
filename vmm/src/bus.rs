//! Port I/O and MMIO buses: the vCPU threads dispatch PIO and MMIO exits to the device
//! whose range holds the address. Ranges never overlap; a device may be moved (a guest
//! reprogramming a BAR) or removed at runtime.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Arc, Mutex, RwLock};

use block::sync::{lock, read, write};

/// A device on a bus. `base` is the start of the range it was registered at and `offset`
/// the distance of the access from it.
pub trait BusDevice: Send {
    /// Fills `data` with the value read at `base + offset`.
    fn read(&mut self, base: u64, offset: u64, data: &mut [u8]);
    /// Writes `data` at `base + offset`.
    fn write(&mut self, base: u64, offset: u64, data: &[u8]);
}

/// A device as the bus holds it.
pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

/// Which address space a bus decodes (for messages only).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BusKind {
    /// x86 port I/O (16-bit addresses).
    Pio,
    /// Memory-mapped I/O.
    Mmio,
}

impl fmt::Display for BusKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BusKind::Pio => "PIO",
            BusKind::Mmio => "MMIO",
        })
    }
}

/// Errors of registering devices.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    /// The range is empty or wraps around the address space.
    #[error("{kind} range {base:#x}+{len:#x} is empty or wraps")]
    BadRange {
        /// The bus.
        kind: BusKind,
        /// Start.
        base: u64,
        /// Length.
        len: u64,
    },
    /// The range overlaps one already registered.
    #[error("{kind} range {base:#x}..{end:#x} overlaps {other_base:#x}..{other_end:#x}", end = base + len, other_end = other_base + other_len)]
    Overlap {
        /// The bus.
        kind: BusKind,
        /// Start of the new range.
        base: u64,
        /// Length of the new range.
        len: u64,
        /// Start of the range in the way.
        other_base: u64,
        /// Length of the range in the way.
        other_len: u64,
    },
    /// No device is registered at that base.
    #[error("no {kind} device at {base:#x}")]
    NotFound {
        /// The bus.
        kind: BusKind,
        /// The base looked up.
        base: u64,
    },
}

#[derive(Clone)]
struct Entry {
    len: u64,
    device: SharedDevice,
}

/// A bus: non-overlapping ranges, each served by one device. Shared by the vCPU threads
/// (lookups take a read lock; registration a write lock).
pub struct Bus {
    kind: BusKind,
    ranges: RwLock<BTreeMap<u64, Entry>>,
}

impl fmt::Debug for Bus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ranges: Vec<(u64, u64)> = self
            .ranges
            .read()
            .map(|r| r.iter().map(|(b, e)| (*b, e.len)).collect())
            .unwrap_or_default();
        f.debug_struct("Bus")
            .field("kind", &self.kind)
            .field("ranges", &ranges)
            .finish()
    }
}

impl Bus {
    /// An empty bus.
    pub fn new(kind: BusKind) -> Self {
        Bus {
            kind,
            ranges: RwLock::new(BTreeMap::new()),
        }
    }

    /// Which address space the bus decodes.
    pub fn kind(&self) -> BusKind {
        self.kind
    }

    fn map(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<u64, Entry>> {
        // A panic while holding the lock cannot leave the map half-updated (every update
        // is one insert or remove), so a poisoned lock is still consistent.
        read(&self.ranges)
    }

    fn map_mut(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<u64, Entry>> {
        write(&self.ranges)
    }

    fn check_free(&self, map: &BTreeMap<u64, Entry>, base: u64, len: u64) -> Result<(), BusError> {
        let kind = self.kind;
        let end = match base.checked_add(len) {
            Some(end) if len > 0 => end,
            _ => return Err(BusError::BadRange { kind, base, len }),
        };
        // The ranges do not overlap, so only the last one starting before `end` can
        // reach into [base, end): every earlier one ends before it starts.
        match map.range(..end).next_back() {
            Some((&other_base, e)) if other_base + e.len > base => Err(BusError::Overlap {
                kind,
                base,
                len,
                other_base,
                other_len: e.len,
            }),
            _ => Ok(()),
        }
    }

    /// Registers `device` for `base..base + len`.
    pub fn insert(&self, device: SharedDevice, base: u64, len: u64) -> Result<(), BusError> {
        let mut map = self.map_mut();
        self.check_free(&map, base, len)?;
        map.insert(base, Entry { len, device });
        Ok(())
    }

    /// Unregisters the device whose range starts at `base` and returns it.
    pub fn remove(&self, base: u64) -> Result<SharedDevice, BusError> {
        self.map_mut()
            .remove(&base)
            .map(|e| e.device)
            .ok_or(BusError::NotFound {
                kind: self.kind,
                base,
            })
    }

    /// The device covering every byte of `addr..addr + size`, with its base.
    pub fn resolve(&self, addr: u64, size: usize) -> Option<(u64, SharedDevice)> {
        let map = self.map();
        let (&base, e) = map.range(..=addr).next_back()?;
        let offset = addr - base;
        let size = u64::try_from(size).ok()?;
        (offset.checked_add(size)? <= e.len).then(|| (base, e.device.clone()))
    }

    /// Dispatches a read. Returns whether a device took it; when none did, `data` is
    /// filled with all-ones, as a read of an unclaimed address on a PC.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.resolve(addr, data.len()) {
            Some((base, device)) => {
                lock(&device).read(base, addr - base, data);
                true
            }
            None => {
                data.fill(0xff);
                false
            }
        }
    }

    /// Dispatches a write. Returns whether a device took it (otherwise it is dropped).
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.resolve(addr, data.len()) {
            Some((base, device)) => {
                lock(&device).write(base, addr - base, data);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::cast_possible_truncation)] // Test data, not guest input.

    use super::*;

    /// Remembers the last access and answers reads with its offset.
    #[derive(Default)]
    struct Probe {
        last: Option<(u64, u64, Vec<u8>)>,
    }

    impl BusDevice for Probe {
        fn read(&mut self, base: u64, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
            self.last = Some((base, offset, Vec::new()));
        }
        fn write(&mut self, base: u64, offset: u64, data: &[u8]) {
            self.last = Some((base, offset, data.to_vec()));
        }
    }

    fn probe() -> (Arc<Mutex<Probe>>, SharedDevice) {
        let p = Arc::new(Mutex::new(Probe::default()));
        let d: SharedDevice = p.clone();
        (p, d)
    }

    #[test]
    fn dispatch_by_address() {
        let bus = Bus::new(BusKind::Pio);
        let (a, da) = probe();
        let (b, db) = probe();
        bus.insert(da, 0x3f8, 8).unwrap();
        bus.insert(db, 0xcf8, 8).unwrap();
        let mut data = [0u8; 1];
        assert!(bus.read(0x3fd, &mut data));
        assert_eq!(data, [5]);
        assert_eq!(a.lock().unwrap().last, Some((0x3f8, 5, vec![])));
        assert!(bus.write(0xcfc, &[1, 2, 3, 4]));
        assert_eq!(b.lock().unwrap().last, Some((0xcf8, 4, vec![1, 2, 3, 4])));
        // Unknown addresses: reads are all-ones, nothing is called.
        let mut wide = [0u8; 4];
        assert!(!bus.read(0x80, &mut wide));
        assert_eq!(wide, [0xff; 4]);
        assert!(!bus.write(0x400, &[1]));
        // An access running past the end of a range is not the device's.
        assert!(!bus.read(0xcfe, &mut wide));
        assert!(bus.read(0xcfc, &mut wide));
        assert!(!bus.read(0x3f7, &mut data));
    }

    #[test]
    fn overlaps_are_refused() {
        let bus = Bus::new(BusKind::Mmio);
        bus.insert(probe().1, 0x1000, 0x1000).unwrap();
        bus.insert(probe().1, 0x3000, 0x1000).unwrap();
        for (base, len) in [
            (0x1000, 1),
            (0xfff, 2),
            (0x1fff, 1),
            (0x0, 0x10000),
            (0x2fff, 2),
        ] {
            let err = bus.insert(probe().1, base, len).unwrap_err();
            assert!(matches!(err, BusError::Overlap { .. }), "{base:#x}: {err}");
        }
        let err = bus.insert(probe().1, 0x1800, 0x10).unwrap_err();
        assert_eq!(
            err.to_string(),
            "MMIO range 0x1800..0x1810 overlaps 0x1000..0x2000"
        );
        // Touching ranges are fine.
        bus.insert(probe().1, 0x2000, 0x1000).unwrap();
        bus.insert(probe().1, 0xfff, 1).unwrap();
        assert!(matches!(
            bus.insert(probe().1, 0x10, 0),
            Err(BusError::BadRange { .. })
        ));
        assert!(matches!(
            bus.insert(probe().1, u64::MAX, 2),
            Err(BusError::BadRange { .. })
        ));
    }

    #[test]
    fn remove() {
        let bus = Bus::new(BusKind::Mmio);
        let (p, d) = probe();
        bus.insert(d, 0x1080, 0x100).unwrap();
        bus.insert(probe().1, 0x5000, 0x100).unwrap();
        assert!(bus.write(0x1090, &[9]));
        assert_eq!(p.lock().unwrap().last, Some((0x1080, 0x10, vec![9])));
        bus.remove(0x1080).unwrap();
        assert!(!bus.write(0x1090, &[9]));
        assert!(matches!(bus.remove(0x1080), Err(BusError::NotFound { .. })));
        assert!(format!("{bus:?}").contains("20480"));
    }
}
