#![allow(clippy::cast_possible_truncation)] // Test data and figures, not guest input.
use std::collections::BTreeMap;
use std::io::Write as _;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryAtomic, GuestMemoryMmap};

use super::*;
use crate::config::DiskConfig;
use crate::pci::{PciBus, PciConfigMmio};
use crate::virtio_blk::device::BlkDevice;

const BAR: u64 = 0xe000_0000;

#[derive(Default)]
struct MockHost {
    notify: Mutex<BTreeMap<u64, u16>>,
    vectors: Mutex<BTreeMap<u16, Option<MsiMessage>>>,
}

impl VirtioPciHost for MockHost {
    fn register_notify(&self, addr: u64, queue: u16, _fd: &EventFd) -> io::Result<()> {
        self.notify.lock().unwrap().insert(addr, queue);
        Ok(())
    }
    fn unregister_notify(&self, addr: u64, queue: u16, _fd: &EventFd) -> io::Result<()> {
        let old = self.notify.lock().unwrap().remove(&addr);
        assert_eq!(old, Some(queue), "unregistered what was never registered");
        Ok(())
    }
    fn set_msix_vector(&self, v: u16, _fd: &EventFd, msg: Option<MsiMessage>) -> io::Result<()> {
        self.vectors.lock().unwrap().insert(v, msg);
        Ok(())
    }
}

type Dev = VirtioPciDevice<VirtioBlk>;
/// (capability offset, cfg_type, bar, offset, length).
type VirtioCap = (u64, u8, u8, u32, u32);

struct Setup {
    host: Arc<MockHost>,
    dev: Arc<Mutex<Dev>>,
    bus: Arc<PciBus>,
    ecam: PciConfigMmio,
    mem: GuestMemoryMmap<()>,
    _image: tempfile::NamedTempFile,
}

fn setup(num_queues: u16) -> Setup {
    let mut image = tempfile::NamedTempFile::new().unwrap();
    image.write_all(&vec![0u8; 1 << 20]).unwrap();
    let mut disk = DiskConfig::new("d0", image.path());
    disk.cache = block::CacheMode::Writeback;
    disk.num_queues = num_queues;
    disk.queue_size = 16;
    let blk = Arc::new(BlkDevice::open(disk, None).unwrap());
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
    let host = Arc::new(MockHost::default());
    let dev = VirtioPciDevice::new(
        VirtioBlk::new(blk),
        GuestMemoryAtomic::new(mem.clone()),
        host.clone(),
        BAR,
    )
    .unwrap();
    let dev = Arc::new(Mutex::new(dev));
    let bus = Arc::new(PciBus::new());
    assert_eq!(bus.add_device(dev.clone()).unwrap(), 1);
    Setup {
        host,
        dev,
        ecam: PciConfigMmio::new(bus.clone()),
        bus,
        mem,
        _image: image,
    }
}

impl Setup {
    fn cfg_read(&self, reg: u64, len: usize) -> u32 {
        let mut b = [0u8; 4];
        self.ecam.read(1 << 15 | reg, &mut b[..len]);
        u32::from_le_bytes(b)
    }
    fn cfg_write(&self, reg: u64, data: &[u8]) {
        self.ecam.write(1 << 15 | reg, data);
    }
    fn read(&self, off: u64, len: usize) -> u64 {
        let mut b = [0u8; 8];
        assert!(self.bus.mmio_read(BAR + off, &mut b[..len]));
        u64::from_le_bytes(b)
    }
    fn write(&self, off: u64, value: u64, len: usize) {
        assert!(self.bus.mmio_write(BAR + off, &value.to_le_bytes()[..len]));
    }
    fn status(&self) -> u8 {
        self.read(0x14, 1) as u8
    }
    fn set_status(&self, s: u8) {
        self.write(0x14, u64::from(s), 1);
    }
    fn negotiate(&self, features: u64) {
        self.set_status(0);
        self.set_status(status::ACKNOWLEDGE | status::DRIVER);
        for sel in 0..2u64 {
            self.write(0x08, sel, 4);
            self.write(0x0c, features >> (32 * sel) & 0xffff_ffff, 4);
        }
        self.set_status(status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK);
    }
    /// (capability offset, cfg_type, bar, offset, length) of each virtio capability, and
    /// the MSI-X capability's offset.
    fn caps(&self) -> (Vec<VirtioCap>, Option<u64>) {
        let mut out = Vec::new();
        let mut msix = None;
        let mut ptr = u64::from(self.cfg_read(0x34, 1));
        while ptr != 0 {
            let head = self.cfg_read(ptr, 4);
            match head as u8 {
                crate::pci::CAP_ID_VENDOR => out.push((
                    ptr,
                    (head >> 24) as u8,
                    self.cfg_read(ptr + 4, 1) as u8,
                    self.cfg_read(ptr + 8, 4),
                    self.cfg_read(ptr + 12, 4),
                )),
                crate::pci::CAP_ID_MSIX => msix = Some(ptr),
                id => panic!("unexpected capability {id:#x}"),
            }
            ptr = u64::from(head >> 8 & 0xff);
        }
        (out, msix)
    }
    fn msix_control(&self, control: u16) {
        let cap = self.caps().1.unwrap();
        self.cfg_write(cap + 2, &control.to_le_bytes());
    }
    fn msix_entry(&self, v: u64, addr: u64, data: u32, masked: bool) {
        let e = Layout::MSIX_TABLE + 16 * v;
        self.write(e, addr & 0xffff_ffff, 4);
        self.write(e + 4, addr >> 32, 4);
        self.write(e + 8, u64::from(data), 4);
        self.write(e + 12, u64::from(masked), 4);
    }
    fn vector(&self, v: u16) -> Option<Option<MsiMessage>> {
        self.host.vectors.lock().unwrap().get(&v).copied()
    }
}

#[test]
fn enumerates_as_modern_virtio_blk() {
    let s = setup(2);
    assert_eq!(s.cfg_read(0, 4), 0x1042_1af4);
    assert_eq!(s.cfg_read(8, 4), 0x0180_0001, "class 01/80, revision 1");
    assert_eq!(s.cfg_read(0x2c, 4), 0x0040_1af4);
    assert_eq!(
        s.cfg_read(0x10, 4),
        (BAR as u32) | 0b100,
        "64-bit memory BAR"
    );
    let (caps, msix) = s.caps();
    let types: Vec<u8> = caps.iter().map(|c| c.1).collect();
    assert_eq!(types, vec![1, 3, 4, 2]);
    for &(_, ty, bar, off, len) in &caps {
        assert_eq!(bar, 0);
        assert!(u64::from(off) + u64::from(len) <= BAR_SIZE, "type {ty}");
    }
    let notify = caps.iter().find(|c| c.1 == 2).unwrap();
    assert_eq!(s.cfg_read(notify.0 + 16, 4), 4, "notify_off_multiplier");
    assert_eq!(notify.4, 8, "two queues");
    let msix = msix.unwrap();
    assert_eq!(s.cfg_read(msix + 2, 2) & 0x7ff, 2, "three vectors");
    assert_eq!(s.cfg_read(msix + 4, 4), Layout::MSIX_TABLE as u32);
    assert_eq!(s.cfg_read(msix + 8, 4), Layout::MSIX_PBA as u32);
    assert_eq!(s.read(0x12, 2), 2, "num_queues");
    // Device config: capacity in sectors (1 MiB image).
    assert_eq!(s.read(Layout::DEVICE, 8), 2048);
}

#[test]
fn moving_the_bar_reregisters_notify_addresses() {
    let s = setup(2);
    let expect = |base: u64| BTreeMap::from([(base + 0x3000, 0), (base + 0x3004, 1)]);
    assert_eq!(*s.host.notify.lock().unwrap(), expect(BAR));
    // Sizing is not a move.
    s.cfg_write(0x10, &[0xff; 4]);
    s.cfg_write(0x14, &[0xff; 4]);
    assert_eq!(s.cfg_read(0x10, 4), !(BAR_SIZE as u32 - 1) | 0b100);
    assert_eq!(s.cfg_read(0x14, 4), 0xffff_ffff);
    s.cfg_write(0x10, &(BAR as u32).to_le_bytes());
    s.cfg_write(0x14, &[0; 4]);
    assert_eq!(*s.host.notify.lock().unwrap(), expect(BAR));
    let new = 0x8_0000_0000u64;
    s.cfg_write(0x10, &(new as u32).to_le_bytes());
    s.cfg_write(0x14, &((new >> 32) as u32).to_le_bytes());
    assert_eq!(*s.host.notify.lock().unwrap(), expect(new));
    let mut b = [0u8; 2];
    assert!(!s.bus.mmio_read(BAR + 0x12, &mut b));
    assert!(s.bus.mmio_read(new + 0x12, &mut b));
    assert_eq!(u16::from_le_bytes(b), 2);
    drop(s.bus);
    drop(s.ecam);
    drop(s.dev);
    assert!(
        s.host.notify.lock().unwrap().is_empty(),
        "dropped device unregisters"
    );
}

#[test]
fn negotiates_features() {
    let s = setup(1);
    let offered = s.dev.lock().unwrap().device().blk().features();
    assert_ne!(offered & VIRTIO_F_VERSION_1, 0);
    s.write(0x00, 0, 4);
    assert_eq!(s.read(0x04, 4), offered & 0xffff_ffff);
    s.write(0x00, 1, 4);
    assert_eq!(s.read(0x04, 4), offered >> 32);
    s.write(0x00, 7, 4);
    assert_eq!(s.read(0x04, 4), 0);
    // A feature not offered (bit 0, legacy BARRIER): FEATURES_OK stays clear.
    s.negotiate(VIRTIO_F_VERSION_1 | 1);
    assert_eq!(s.status(), status::ACKNOWLEDGE | status::DRIVER);
    // No VERSION_1: refused.
    s.negotiate(offered & !VIRTIO_F_VERSION_1);
    assert_eq!(s.status() & status::FEATURES_OK, 0);
    // DRIVER_OK without FEATURES_OK does nothing.
    s.set_status(status::DRIVER_OK);
    assert_eq!(s.status() & status::DRIVER_OK, 0);
    s.negotiate(offered);
    assert_ne!(s.status() & status::FEATURES_OK, 0);
    assert_eq!(s.dev.lock().unwrap().driver_features(), offered);
    // Frozen after FEATURES_OK.
    s.write(0x08, 0, 4);
    s.write(0x0c, 0, 4);
    assert_eq!(s.dev.lock().unwrap().driver_features(), offered);
}

fn put_desc(mem: &GuestMemoryMmap<()>, i: u64, addr: u64, len: u32, flags: u16, next: u16) {
    let base = GuestAddress(0x1000 + 16 * i);
    mem.write_obj(addr, base).unwrap();
    mem.write_obj(len, base.unchecked_add(8)).unwrap();
    mem.write_obj(flags, base.unchecked_add(12)).unwrap();
    mem.write_obj(next, base.unchecked_add(14)).unwrap();
}

/// Publishes a request (type, sector) with a 512-byte buffer at 0x5000 and status at
/// 0x6000 as avail entry `n`.
fn publish(mem: &GuestMemoryMmap<()>, n: u16, req_type: u32, write_data: bool) {
    mem.write_obj(req_type, GuestAddress(0x4000)).unwrap();
    mem.write_obj(0u32, GuestAddress(0x4004)).unwrap();
    mem.write_obj(1u64, GuestAddress(0x4008)).unwrap();
    mem.write_obj(0xffu8, GuestAddress(0x6000)).unwrap();
    put_desc(mem, 0, 0x4000, 16, 1, 1);
    put_desc(mem, 1, 0x5000, 512, if write_data { 1 } else { 3 }, 2);
    put_desc(mem, 2, 0x6000, 1, 2, 0);
    mem.write_obj(0u16, GuestAddress(0x2004 + 2 * u64::from(n % 8)))
        .unwrap();
    // used_event (EVENT_IDX, queue size 8): interrupt me for this request.
    mem.write_obj(n, GuestAddress(0x2004 + 2 * 8)).unwrap();
    mem.write_obj(n + 1, GuestAddress(0x2002)).unwrap();
}

fn complete_one(s: &Setup, used: u16) {
    let mut dev = s.dev.lock().unwrap();
    let w = &mut dev.device_mut().workers_mut()[0];
    w.process_avail();
    let deadline = Instant::now() + Duration::from_secs(5);
    while s.mem.read_obj::<u16>(GuestAddress(0x3002)).unwrap() != used {
        assert!(Instant::now() < deadline, "request never completed");
        std::thread::sleep(Duration::from_millis(1));
        w.process_completions();
    }
    assert!(w.finish_pass(), "interrupt expected");
    assert_eq!(
        s.mem.read_obj::<u8>(GuestAddress(0x6000)).unwrap(),
        0,
        "status OK"
    );
}

#[test]
fn initialises_to_driver_ok_and_serves_a_request() {
    let s = setup(2);
    s.msix_control(0x8000);
    s.msix_entry(0, 0xfee0_0000, 0x41, false);
    s.msix_entry(1, 0xfee0_0000, 0x42, false);
    let live = |data| {
        Some(Some(MsiMessage {
            addr: 0xfee0_0000,
            data,
        }))
    };
    assert_eq!(s.vector(0), live(0x41));
    assert_eq!(s.vector(1), live(0x42));
    assert_eq!(s.vector(2), None, "still masked: never routed");
    s.negotiate(VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX);
    s.write(0x10, 0, 2);
    assert_eq!(s.read(0x10, 2), 0);
    s.write(0x16, 0, 2);
    assert_eq!(s.read(0x18, 2), 16, "max size");
    s.write(0x18, 8, 2);
    s.write(0x18, 7, 2);
    assert_eq!(s.read(0x18, 2), 8, "not a power of two: ignored");
    s.write(0x1a, 1, 2);
    assert_eq!(s.read(0x1a, 2), 1);
    s.write(0x1e, 5, 2);
    assert_eq!(s.read(0x1e, 2), 0, "queue_notify_off is read-only");
    s.write(0x20, 0x1000, 4);
    s.write(0x24, 0, 4);
    s.write(0x28, 0x2000, 8);
    s.write(0x30, 0x3000, 8);
    assert_eq!(s.read(0x20, 8), 0x1000);
    assert_eq!(s.read(0x2c, 4), 0);
    s.write(0x1c, 1, 2);
    s.write(0x16, 1, 2);
    s.write(0x1a, 9, 2);
    assert_eq!(s.read(0x1a, 2), u64::from(NO_VECTOR), "no such vector");
    s.set_status(s.status() | status::DRIVER_OK);
    assert_eq!(s.status() & status::DEVICE_NEEDS_RESET, 0);
    assert!(s.dev.lock().unwrap().is_active());
    assert_eq!(s.dev.lock().unwrap().device_mut().workers_mut().len(), 1);
    // The queue is fixed now.
    s.write(0x16, 0, 2);
    s.write(0x20, 0x8000, 8);
    assert_eq!(s.read(0x20, 8), 0x1000);

    s.mem
        .write_slice(&[0x5a; 512], GuestAddress(0x5000))
        .unwrap();
    publish(&s.mem, 0, 1, true);
    s.write(Layout::NOTIFY, 0, 2);
    let kick = s.dev.lock().unwrap().kick_fd(0).unwrap().read().unwrap();
    assert_eq!(kick, 1, "notify reached the kick eventfd");
    complete_one(&s, 1);
    let vector1 = s.dev.lock().unwrap().vector_fd(1).unwrap().read().unwrap();
    assert_eq!(vector1, 1, "the queue's vector eventfd was signalled");

    s.mem.write_slice(&[0; 512], GuestAddress(0x5000)).unwrap();
    publish(&s.mem, 1, 0, false);
    complete_one(&s, 2);
    let mut data = [0u8; 512];
    s.mem.read_slice(&mut data, GuestAddress(0x5000)).unwrap();
    assert_eq!(data, [0x5a; 512], "read back what was written");

    // Reset: drained, queues back to power-on values.
    s.set_status(0);
    assert_eq!(s.status(), 0);
    assert!(!s.dev.lock().unwrap().is_active());
    assert!(s.dev.lock().unwrap().device_mut().workers_mut().is_empty());
    assert_eq!(s.read(0x18, 2), 16);
    assert_eq!(s.read(0x1c, 2), 0);
    assert_eq!(s.read(0x20, 8), 0);
    assert_eq!(s.read(0x1a, 2), u64::from(NO_VECTOR));
}

#[test]
fn invalid_queue_sets_needs_reset() {
    let s = setup(1);
    s.negotiate(VIRTIO_F_VERSION_1);
    s.write(0x20, 0xfff_f000, 8); // outside guest memory
    s.write(0x28, 0x2000, 8);
    s.write(0x30, 0x3000, 8);
    s.write(0x1c, 1, 2);
    s.set_status(s.status() | status::DRIVER_OK);
    assert_ne!(s.status() & status::DEVICE_NEEDS_RESET, 0);
    assert!(!s.dev.lock().unwrap().is_active());
}

#[test]
fn msix_masking_and_pending_bits() {
    let s = setup(1);
    s.msix_entry(1, 0xfee0_1000, 7, false);
    assert_eq!(s.vector(1), None, "MSI-X disabled: nothing routed");
    s.msix_control(0x8000);
    let msg = Some(MsiMessage {
        addr: 0xfee0_1000,
        data: 7,
    });
    assert_eq!(s.vector(1), Some(msg));
    // Per-vector mask.
    s.write(Layout::MSIX_TABLE + 16 + 12, 1, 4);
    assert_eq!(s.vector(1), Some(None));
    assert_eq!(s.read(Layout::MSIX_TABLE + 16 + 12, 4), 1);
    s.dev
        .lock()
        .unwrap()
        .vector_fd(1)
        .unwrap()
        .write(1)
        .unwrap();
    assert_eq!(s.read(Layout::MSIX_PBA, 1), 0b10, "pending while masked");
    assert_eq!(
        s.read(Layout::MSIX_PBA, 1),
        0b10,
        "reading does not consume"
    );
    s.write(Layout::MSIX_TABLE + 16 + 12, 0, 4);
    assert_eq!(s.vector(1), Some(msg));
    assert_eq!(s.read(Layout::MSIX_PBA, 1), 0, "delivered by the host now");
    // Function mask masks everything; clearing it restores.
    s.msix_control(0xc000);
    assert_eq!(s.vector(1), Some(None));
    s.msix_control(0x8000);
    assert_eq!(s.vector(1), Some(msg));
    s.msix_control(0);
    assert_eq!(s.vector(1), Some(None));
    // A message change while live reaches the host.
    s.msix_control(0x8000);
    s.write(Layout::MSIX_TABLE + 16 + 8, 9, 4);
    assert_eq!(s.vector(1).unwrap().unwrap().data, 9);
    // Table size field is read-only.
    let cap = s.caps().1.unwrap();
    s.cfg_write(cap + 2, &0xffffu16.to_le_bytes());
    assert_eq!(s.cfg_read(cap + 2, 2), 0xc001);
}

#[test]
fn config_change_bumps_generation_and_interrupts() {
    let s = setup(1);
    s.write(0x10, 0, 2);
    let before = s.read(0x15, 1);
    s.dev.lock().unwrap().signal_config_change();
    assert_eq!(s.read(0x15, 1), before + 1);
    assert_eq!(s.read(Layout::ISR, 1), 2);
    assert_eq!(s.read(Layout::ISR, 1), 0, "reading clears the ISR");
    assert_eq!(
        s.dev.lock().unwrap().vector_fd(0).unwrap().read().unwrap(),
        1
    );
}

#[test]
fn hostile_driver_does_not_panic() {
    let s = setup(2);
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for _ in 0..50_000 {
        let r = next();
        let len = [0usize, 1, 2, 3, 4, 8, 16][(r % 7) as usize];
        let off = (r >> 8) % (BAR_SIZE + 0x100);
        let value = next().to_le_bytes();
        let mut buf = vec![0u8; len];
        match r >> 61 {
            0..=2 => {
                s.bus.mmio_read(BAR + off, &mut buf);
            }
            3..=5 => {
                s.bus.mmio_write(BAR + off, &value[..len.min(8)]);
            }
            6 => s.ecam.read(1 << 15 | (off & 0xfff), &mut buf),
            _ => {
                // Keep the BAR in place so the driver side keeps reaching it.
                let reg = off & 0xfff;
                if !(0x10..0x18).contains(&(reg & !3)) {
                    s.ecam.write(1 << 15 | reg, &value[..len.min(8)]);
                }
            }
        }
    }
    s.write(0x16, 0xffff, 2);
    assert_eq!(s.read(0x18, 2), 0, "no such queue");
    s.set_status(0);
    assert_eq!(s.cfg_read(0, 4), 0x1042_1af4);
}
