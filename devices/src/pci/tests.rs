#![allow(clippy::cast_possible_truncation)] // Test data and figures, not guest input.
use std::sync::{Arc, Mutex};

use super::*;

/// A function with a 32-bit BAR 0, a 64-bit prefetchable BAR 2 and a vendor capability.
struct TestDev {
    config: PciConfiguration,
    moves: Arc<Mutex<Vec<(u8, u64, u64)>>>,
    last_write: Option<(u64, Vec<u8>)>,
}

impl TestDev {
    fn new(moves: Arc<Mutex<Vec<(u8, u64, u64)>>>) -> Self {
        let mut config = PciConfiguration::new(&PciHeader {
            vendor_id: 0x1234,
            device_id: 0x5678,
            class: 0x01,
            subclass: 0x80,
            ..PciHeader::default()
        });
        let bar = |size, mem64, prefetchable, addr| BarSpec {
            size,
            mem64,
            prefetchable,
            addr,
        };
        config
            .add_bar(0, bar(0x1000, false, false, 0xc000_0000))
            .unwrap();
        config
            .add_bar(2, bar(0x10_0000, true, true, 0x1_0000_0000))
            .unwrap();
        config
            .add_capability(&[CAP_ID_VENDOR, 0, 8, 1, 2, 3, 4, 5], &[])
            .unwrap();
        config
            .add_capability(&[CAP_ID_MSIX, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0], &[])
            .unwrap();
        TestDev {
            config,
            moves,
            last_write: None,
        }
    }
}

impl PciDevice for TestDev {
    fn read_config(&self, offset: u16, data: &mut [u8]) {
        self.config.read(u64::from(offset), data);
    }
    fn write_config(&mut self, offset: u16, data: &[u8]) {
        self.config.write(u64::from(offset), data);
    }
    fn bar(&self, index: u8) -> Option<BarInfo> {
        self.config.bar(usize::from(index))
    }
    fn bar_moved(&mut self, index: u8, old: u64, new: u64) {
        self.moves.lock().unwrap().push((index, old, new));
    }
    fn read_bar(&mut self, index: u8, offset: u64, data: &mut [u8]) {
        data.fill(index + 1);
        data[0] = offset as u8;
    }
    fn write_bar(&mut self, index: u8, offset: u64, data: &[u8]) {
        self.last_write = Some((u64::from(index) << 32 | offset, data.to_vec()));
    }
}

struct Setup {
    bus: Arc<PciBus>,
    io: PciConfigIo,
    ecam: PciConfigMmio,
    moves: Arc<Mutex<Vec<(u8, u64, u64)>>>,
    slot: u8,
}

fn setup() -> Setup {
    let bus = Arc::new(PciBus::new());
    let moves = Arc::default();
    let dev = Arc::new(Mutex::new(TestDev::new(Arc::clone(&moves))));
    let slot = bus.add_device(dev).unwrap();
    Setup {
        io: PciConfigIo::new(bus.clone()),
        ecam: PciConfigMmio::new(bus.clone()),
        bus,
        moves,
        slot,
    }
}

fn cf8(bus: u32, dev: u8, func: u8, reg: u32) -> [u8; 4] {
    (0x8000_0000 | bus << 16 | u32::from(dev) << 11 | u32::from(func) << 8 | (reg & 0xfc))
        .to_le_bytes()
}

fn io_read(s: &Setup, dev: u8, reg: u32, len: usize) -> u32 {
    s.io.write(0, &cf8(0, dev, 0, reg));
    let mut b = [0u8; 4];
    s.io.read(4 + u64::from(reg & 3), &mut b[..len]);
    u32::from_le_bytes(b)
}

fn io_write(s: &Setup, dev: u8, reg: u32, value: u32) {
    s.io.write(0, &cf8(0, dev, 0, reg));
    s.io.write(4, &value.to_le_bytes());
}

fn ecam_off(dev: u8, reg: u64) -> u64 {
    u64::from(dev) << 15 | reg
}

fn ecam_read32(s: &Setup, dev: u8, reg: u64) -> u32 {
    let mut b = [0u8; 4];
    s.ecam.read(ecam_off(dev, reg), &mut b);
    u32::from_le_bytes(b)
}

fn ecam_write32(s: &Setup, dev: u8, reg: u64, value: u32) {
    s.ecam.write(ecam_off(dev, reg), &value.to_le_bytes());
}

#[test]
fn enumerates_through_ports_and_ecam() {
    let s = setup();
    assert_eq!(s.slot, 1);
    // Host bridge.
    assert_eq!(io_read(&s, 0, 0, 4), 0x0d57_8086);
    assert_eq!(io_read(&s, 0, 8, 4) >> 16, 0x0600);
    assert_eq!(io_read(&s, 1, 0, 4), 0x5678_1234);
    assert_eq!(ecam_read32(&s, 1, 0), 0x5678_1234);
    // Word and byte accesses at every lane.
    assert_eq!(io_read(&s, 1, 2, 2), 0x5678);
    assert_eq!(io_read(&s, 1, 3, 1), 0x56);
    assert_eq!(io_read(&s, 1, 0xb, 1), 0x01);
    let mut b = [0u8; 2];
    s.ecam.read(ecam_off(1, 2), &mut b);
    assert_eq!(u16::from_le_bytes(b), 0x5678);
    // Nothing else answers.
    assert_eq!(io_read(&s, 2, 0, 4), 0xffff_ffff);
    assert_eq!(ecam_read32(&s, 2, 0), 0xffff_ffff);
    assert_eq!(ecam_read32(&s, 1, 1 << 12), 0xffff_ffff, "function 1");
    assert_eq!(ecam_read32(&s, 0, 1 << 20), 0xffff_ffff, "bus 1");
    s.io.write(0, &cf8(1, 0, 0, 0));
    let mut b = [0u8; 4];
    s.io.read(4, &mut b);
    assert_eq!(u32::from_le_bytes(b), 0xffff_ffff, "bus 1 through ports");
    // Without the enable bit the data port reads all-ones; the address reads back.
    s.io.write(0, &0x0000_0800u32.to_le_bytes());
    s.io.read(4, &mut b);
    assert_eq!(u32::from_le_bytes(b), 0xffff_ffff);
    s.io.read(0, &mut b);
    assert_eq!(u32::from_le_bytes(b), 0x800);
    // Extended space exists and is empty.
    assert_eq!(ecam_read32(&s, 1, 0x100), 0);
}

#[test]
fn walks_the_capability_list() {
    let s = setup();
    let status = io_read(&s, 1, 4, 4) >> 16;
    assert_ne!(status & 0x10, 0, "capability list bit");
    let mut ptr = ecam_read32(&s, 1, 0x34) & 0xff;
    let mut ids = Vec::new();
    while ptr != 0 {
        let head = ecam_read32(&s, 1, u64::from(ptr));
        ids.push(head as u8);
        ptr = (head >> 8) & 0xff;
        assert!(ids.len() < 48, "loop in the list");
    }
    assert_eq!(ids, vec![CAP_ID_VENDOR, CAP_ID_MSIX]);
    // The ID and link are read-only.
    ecam_write32(&s, 1, 0x40, 0);
    assert_eq!(
        ecam_read32(&s, 1, 0x40) & 0xffff,
        0x4800 | u32::from(CAP_ID_VENDOR)
    );
}

#[test]
fn sizes_bars_without_moving_them() {
    let s = setup();
    // 32-bit BAR 0: 4 KiB.
    assert_eq!(io_read(&s, 1, 0x10, 4), 0xc000_0000);
    io_write(&s, 1, 0x10, 0xffff_ffff);
    assert_eq!(io_read(&s, 1, 0x10, 4), 0xffff_f000);
    io_write(&s, 1, 0x10, 0xc000_0000);
    // 64-bit prefetchable BAR 2: 1 MiB.
    assert_eq!(ecam_read32(&s, 1, 0x18), 0x0c);
    assert_eq!(ecam_read32(&s, 1, 0x1c), 1);
    ecam_write32(&s, 1, 0x18, 0xffff_ffff);
    ecam_write32(&s, 1, 0x1c, 0xffff_ffff);
    assert_eq!(ecam_read32(&s, 1, 0x18), 0xfff0_000c);
    assert_eq!(ecam_read32(&s, 1, 0x1c), 0xffff_ffff);
    ecam_write32(&s, 1, 0x18, 0x0c);
    ecam_write32(&s, 1, 0x1c, 1);
    assert_eq!(ecam_read32(&s, 1, 0x1c), 1);
    // Unused BARs and the ROM BAR size to zero.
    ecam_write32(&s, 1, 0x14, 0xffff_ffff);
    assert_eq!(ecam_read32(&s, 1, 0x14), 0, "BAR 1 is unused");
    ecam_write32(&s, 1, 0x30, 0xffff_ffff);
    assert_eq!(ecam_read32(&s, 1, 0x30), 0);
    assert!(s.moves.lock().unwrap().is_empty(), "{:?}", s.moves);
}

#[test]
fn moves_bars_and_routes_mmio() {
    let s = setup();
    let mut b = [0u8; 4];
    assert!(s.bus.mmio_read(0xc000_0010, &mut b));
    assert_eq!(b, [0x10, 1, 1, 1]);
    assert!(s.bus.mmio_read(0x1_0000_0000 + 0xffffc, &mut b));
    assert_eq!(b[1], 3);
    assert!(!s.bus.mmio_read(0x1_0010_0000, &mut b), "past the BAR");
    assert!(!s.bus.mmio_read(0x1_000f_fffe, &mut b), "straddles the end");
    // 32-bit move, then a 64-bit move: reported once, after the high half.
    io_write(&s, 1, 0x10, 0xd000_0000);
    ecam_write32(&s, 1, 0x18, 0x2000_0000);
    assert_eq!(s.moves.lock().unwrap().len(), 1);
    ecam_write32(&s, 1, 0x1c, 0x2);
    assert_eq!(
        *s.moves.lock().unwrap(),
        vec![
            (0, 0xc000_0000, 0xd000_0000),
            (2, 0x1_0000_0000, 0x2_2000_0000)
        ]
    );
    assert!(!s.bus.mmio_read(0xc000_0010, &mut b));
    assert!(s.bus.mmio_read(0xd000_0010, &mut b));
    assert!(s.bus.mmio_write(0x2_2000_0008, &[1, 2]));
    // Low bits below the BAR size are not writable.
    io_write(&s, 1, 0x10, 0xd000_0abc);
    assert_eq!(io_read(&s, 1, 0x10, 4), 0xd000_0000);
}

#[test]
fn hostile_accesses_do_not_panic() {
    let s = setup();
    let mut seed = 0x1234_5678_9abc_def0u64;
    let mut next = || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for _ in 0..20_000 {
        let r = next();
        let len = [0usize, 1, 2, 3, 4, 8, 16][(r % 7) as usize];
        let off = (r >> 8) % 0x20_0000;
        let mut buf = vec![0u8; len];
        let value = next().to_le_bytes();
        match r >> 60 {
            0..=3 => s.ecam.read(off, &mut buf),
            4..=7 => s.ecam.write(off, &value[..len.min(8)]),
            8..=9 => s.io.read(off % 10, &mut buf),
            10..=11 => s.io.write(off % 10, &value[..len.min(8)]),
            12..=13 => {
                s.bus.mmio_read(next(), &mut buf);
            }
            _ => {
                s.bus.mmio_write(next(), &value[..len.min(8)]);
            }
        }
    }
    s.ecam.read(u64::MAX - 2, &mut [0u8; 4]);
    s.io.read(u64::MAX, &mut [0u8; 4]);
    // The host bridge is still there.
    assert_eq!(ecam_read32(&s, 0, 0), 0x0d57_8086);
}

#[test]
fn rejects_bad_bars_and_full_buses() {
    let mut c = PciConfiguration::new(&PciHeader::default());
    let spec = |size, mem64, addr| BarSpec {
        size,
        mem64,
        prefetchable: false,
        addr,
    };
    assert!(
        c.add_bar(0, spec(0x1000, false, 0x800)).is_err(),
        "misaligned"
    );
    assert!(
        c.add_bar(0, spec(0x1800, false, 0)).is_err(),
        "not a power of two"
    );
    assert!(
        c.add_bar(5, spec(0x1000, true, 0)).is_err(),
        "no room for the upper half"
    );
    c.add_bar(4, spec(0x1000, true, 0)).unwrap();
    assert!(
        c.add_bar(5, spec(0x1000, false, 0)).is_err(),
        "upper half taken"
    );
    let bus = PciBus::new();
    for _ in 1..DEVICES_PER_BUS {
        bus.add_device(Arc::new(Mutex::new(HostBridge::new())))
            .unwrap();
    }
    assert!(
        bus.add_device(Arc::new(Mutex::new(HostBridge::new())))
            .is_err()
    );
    assert!(bus.remove_device(0).is_none(), "the host bridge stays");
    assert!(bus.remove_device(5).is_some());
}
