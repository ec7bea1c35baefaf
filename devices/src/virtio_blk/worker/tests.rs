//! The worker against rings built with virtio-queue's `MockSplitQueue`: notification
//! suppression while awake, arming before sleep, batched used entries.

#![allow(clippy::cast_possible_truncation)] // Test data and figures, not guest input.

use std::io::Write;

use virtio_bindings::bindings::virtio_blk::{VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT};
use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::RawDescriptor;
use virtio_queue::desc::split::Descriptor as SplitDescriptor;
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryAtomic, GuestMemoryMmap};

use super::*;
use crate::config::DiskConfig;
use crate::virtio_blk::device::BlkDevice;

mod io_error;

const QSIZE: u16 = 16;
/// Chains' buffers start here, above the rings.
const BUFS: u64 = 0x1_0000;

/// Guest memory, a queue laid out in it, and a worker over a disk.
struct Rig {
    mem: GuestMem,
    _device: BlkDevice,
    worker: QueueWorker<LocalQueue>,
    used: u64,
    avail: u64,
    published: u16,
}

impl Rig {
    fn new(event_idx: bool, config: DiskConfig) -> Rig {
        let mem = GuestMemoryAtomic::new(
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap(),
        );
        let guard = mem.memory();
        let vq = MockSplitQueue::new(&*guard, QSIZE);
        let mut queue: Queue = vq.create_queue().unwrap();
        queue.set_event_idx(event_idx);
        let (used, avail) = (vq.used_addr().0, vq.avail_addr().0);
        let device = BlkDevice::open(config, None).unwrap();
        let host = LocalQueue {
            queue,
            kick: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            call: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
        };
        let worker = device.new_worker(0, host, mem.clone(), 32).unwrap();
        drop(guard);
        Rig {
            mem,
            _device: device,
            worker,
            used,
            avail,
            published: 0,
        }
    }

    /// A rig over a zeroed 128 KiB file read through the thread pool (asynchronous
    /// completions); the file lives as long as the rig's test.
    fn pool_file(event_idx: bool) -> (Rig, tempfile::NamedTempFile) {
        let mut image = tempfile::NamedTempFile::new().unwrap();
        image.write_all(&[0u8; 1 << 17]).unwrap();
        let mut c = DiskConfig::new("d", image.path());
        c.cache = block::CacheMode::Writeback;
        c.aio = block::AioKind::Threads;
        (Rig::new(event_idx, c), image)
    }

    /// Waits up to `ms` for the worker's completion fd; true if it fired.
    fn wait_completion_fd(&self, ms: i32) -> bool {
        let mut pfd = libc::pollfd {
            fd: self.worker.completion_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: poll reads and writes only the pollfd we pass.
        unsafe { libc::poll(&mut pfd, 1, ms) == 1 }
    }

    /// Reaps until `want` used entries are published.
    fn complete_until_used(&mut self, want: u16) {
        while self.used_idx() < want {
            self.wait_completion_fd(1000);
            self.worker.process_completions();
        }
    }

    fn null(event_idx: bool) -> Rig {
        let mut c = DiskConfig::new("d", "null");
        c.null_size = Some(1 << 20);
        Rig::new(event_idx, c)
    }

    /// Publishes a 512-byte read of sector `n` as the next avail entry.
    fn publish_read(&mut self) {
        let base = BUFS + u64::from(self.published) * 0x1000;
        self.publish_read_into(base + 0x100, 512);
    }

    /// Publishes a read of `len` bytes of sector `n` into `data` as the next avail entry
    /// (header and status in the chain's own 4 KiB at `BUFS`).
    fn publish_read_into(&mut self, data: u64, len: u32) {
        self.publish(false, u64::from(self.published), data, len);
    }

    /// Publishes a read (or a write) of `len` bytes at `sector` from `data` as the next
    /// avail entry (header and status in the chain's own 4 KiB at `BUFS`, status at
    /// +0x400).
    fn publish(&mut self, write: bool, sector: u64, data: u64, len: u32) {
        let n = self.published;
        let base = BUFS + u64::from(n) * 0x1000;
        let m = self.mem.memory();
        let mut header = [0u8; 16];
        let kind = if write {
            VIRTIO_BLK_T_OUT
        } else {
            VIRTIO_BLK_T_IN
        };
        header[..4].copy_from_slice(&kind.to_le_bytes());
        header[8..].copy_from_slice(&sector.to_le_bytes());
        m.write_slice(&header, GuestAddress(base)).unwrap();
        let first = (n * 3) % QSIZE;
        let descs = [
            (base, 16, VRING_DESC_F_NEXT as u16, first + 1),
            (
                data,
                len,
                if write {
                    VRING_DESC_F_NEXT as u16
                } else {
                    (VRING_DESC_F_NEXT | VRING_DESC_F_WRITE) as u16
                },
                first + 2,
            ),
            (base + 0x400, 1, VRING_DESC_F_WRITE as u16, 0),
        ];
        for (i, (addr, len, flags, next)) in descs.into_iter().enumerate() {
            let raw = RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next));
            m.write_obj(raw, GuestAddress(u64::from(first + i as u16) * 16))
                .unwrap();
        }
        let slot = self.avail + 4 + 2 * u64::from(n % QSIZE);
        m.write_obj(first, GuestAddress(slot)).unwrap();
        self.published += 1;
        m.write_obj(self.published, GuestAddress(self.avail + 2))
            .unwrap();
    }

    fn read_u16(&self, addr: u64) -> u16 {
        self.mem.memory().read_obj(GuestAddress(addr)).unwrap()
    }

    fn used_idx(&self) -> u16 {
        self.read_u16(self.used + 2)
    }

    fn used_flags(&self) -> u16 {
        self.read_u16(self.used)
    }

    /// avail_event: after the used ring's elements.
    fn avail_event(&self) -> u16 {
        self.read_u16(self.used + 4 + 8 * u64::from(QSIZE))
    }

    /// Whether a driver publishing one more chain now must kick (virtio 1.2 2.7.10).
    fn driver_must_kick(&self) -> bool {
        let (new, old) = (self.published.wrapping_add(1), self.published);
        new.wrapping_sub(self.avail_event()).wrapping_sub(1) < new.wrapping_sub(old)
    }
}

#[test]
fn with_event_idx_kicks_are_off_while_awake_and_on_once_armed() {
    let mut r = Rig::null(true);
    r.publish_read();
    let work = r.worker.run_pass();
    assert_eq!(
        work,
        PassWork {
            popped: 1,
            completed: 1,
            signalled: 0
        }
    );
    assert_eq!(r.used_idx(), 1, "completed at once by the null disk");
    assert!(!r.driver_must_kick(), "the thread is awake: no kick wanted");
    assert!(!r.worker.arm(), "nothing waits");
    assert!(r.driver_must_kick(), "about to sleep: the next chain kicks");
    // Woken by something else (a completion): awake again, so no kick wanted.
    assert_eq!(r.worker.run_pass(), PassWork::default());
    assert!(!r.driver_must_kick(), "awake again: kicks off");
    assert!(!r.worker.arm());
    r.publish_read();
    assert!(r.worker.arm(), "a chain published before the sleep is seen");
    assert_eq!(r.worker.run_pass().popped, 1);
    assert!(!r.driver_must_kick());
}

#[test]
fn without_event_idx_no_notify_is_set_while_awake_and_cleared_when_armed() {
    let mut r = Rig::null(false);
    r.publish_read();
    r.worker.run_pass();
    assert_eq!(r.used_flags(), 1, "VRING_USED_F_NO_NOTIFY while awake");
    assert!(!r.worker.arm());
    assert_eq!(r.used_flags(), 0, "kicks on before sleeping");
}

#[test]
fn a_pass_publishes_its_used_entries_together_and_signals_once() {
    let mut r = Rig::null(false);
    for _ in 0..3 {
        r.publish_read();
    }
    assert_eq!(
        r.worker.run_pass(),
        PassWork {
            popped: 3,
            completed: 3,
            signalled: 0
        }
    );
    assert_eq!(r.used_idx(), 3);
    assert!(r.worker.finish_pass(), "the driver asked for interrupts");
    assert_eq!(r.worker.host_ref().call.read().unwrap(), 1, "one interrupt");
    assert!(!r.worker.finish_pass(), "nothing new: no second interrupt");
    for i in 0..3u64 {
        let status: u8 = r
            .mem
            .memory()
            .read_obj(GuestAddress(BUFS + i * 0x1000 + 0x400))
            .unwrap();
        assert_eq!(status, 0, "request {i} OK");
    }
}

#[test]
fn reads_done_as_started_are_published_every_64k_not_held_for_the_pass() {
    let mut r = Rig::null(false);
    // Four 32 KiB reads (one shared buffer above the chains): two publications of two.
    for _ in 0..4 {
        r.publish_read_into(0x8_0000, 32 << 10);
    }
    assert_eq!(
        r.worker.run_pass(),
        PassWork {
            popped: 4,
            completed: 4,
            signalled: 2
        },
        "each 64 KiB went out with an interrupt while the pass went on"
    );
    assert_eq!(r.used_idx(), 4);
    assert_eq!(
        r.worker.host_ref().call.read().unwrap(),
        2,
        "two interrupts"
    );
    assert!(
        !r.worker.finish_pass(),
        "all published already: no third one"
    );
    // Small reads stay together: one publication, the pass's own interrupt.
    for _ in 0..3 {
        r.publish_read();
    }
    assert_eq!(r.worker.run_pass().signalled, 0);
    assert_eq!(r.used_idx(), 7);
    assert!(r.worker.finish_pass());
}

#[test]
fn an_engine_that_completes_later_keeps_one_publication_per_pass() {
    let (mut r, _image) = Rig::pool_file(false);
    // A read started and finished by the pool, not reaped yet.
    r.publish_read();
    r.worker.process_avail();
    assert!(r.wait_completion_fd(5000), "the pool finished");
    // 128 KiB of reads started while that completion waits: it is not reaped, published
    // or signalled in the middle (no mid-pass submit, syscall or interrupt).
    for _ in 0..4 {
        r.publish_read_into(0x8_0000, 32 << 10);
    }
    let work = r.worker.process_avail();
    assert_eq!((work.popped, work.completed, work.signalled), (4, 0, 0));
    assert_eq!(r.used_idx(), 0, "nothing published before the pass reaps");
    r.complete_until_used(5);
}

#[test]
fn spinning_for_a_disk_only_while_its_completions_come_often() {
    let (mut r, _image) = Rig::pool_file(true);
    assert!(r.worker.spin_worthy(0), "idle, no history");
    r.publish_read();
    // Pop and start only: a pass would also reap a read the pool finished at once.
    r.worker.process_avail();
    r.complete_until_used(1);
    let latency = r.worker.recent_latency_ns();
    assert!(latency > 0, "one read timed");
    assert!(r.worker.spin_worthy(latency), "idle, as fast as the cap");
    assert!(
        !r.worker.spin_worthy(latency - 1),
        "idle, slower than the cap"
    );
    // One read in flight: the next completion is a whole latency away.
    r.publish_read();
    r.worker.process_avail();
    let one = r.worker.in_flight();
    assert!(!r.worker.spin_worthy(latency - 1));
    r.publish_read();
    r.worker.process_avail();
    let two = r.worker.in_flight();
    // Not reaped, so in flight however fast the pool was.
    assert_eq!((one, two), (1, 2));
    assert!(latency >= 2, "a read through a thread takes more than 2 ns");
    // Two in flight: a completion every half latency.
    assert!(r.worker.spin_worthy(latency / 2));
    assert!(!r.worker.spin_worthy(latency / 2 - 1));
    r.complete_until_used(3);
}

#[test]
fn a_driver_without_flush_gets_durable_writes() {
    use virtio_bindings::bindings::virtio_blk::VIRTIO_BLK_F_FLUSH;
    let flush = 1u64 << VIRTIO_BLK_F_FLUSH;
    let mut c = DiskConfig::new("d", "null");
    c.null_size = Some(1 << 20);
    let device = BlkDevice::open(c.clone(), None).unwrap();
    assert!(device.writeback(), "cache=none shows a write cache");
    device.set_driver_features(device.features() & !flush);
    assert!(!device.writeback(), "no FLUSH: every write must be durable");
    device.set_driver_features(device.features());
    assert!(device.writeback(), "FLUSH again: the cache comes back");
    // The driver turned the cache off itself (wce = 0): FLUSH does not turn it on.
    device.write_config(
        std::mem::offset_of!(
            virtio_bindings::bindings::virtio_blk::virtio_blk_config,
            wce
        ) as u64,
        &[0],
    );
    device.set_driver_features(device.features());
    assert!(!device.writeback());
    // cache=unsafe keeps its cache whatever the driver does.
    c.cache = block::CacheMode::Unsafe;
    let unsafe_dev = BlkDevice::open(c, None).unwrap();
    unsafe_dev.set_driver_features(0);
    assert!(unsafe_dev.writeback());
}

/// A log sink for one test: what a tracing subscriber wrote.
#[derive(Clone, Default)]
struct LogSink(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for LogSink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A driver that keeps kicking with a corrupt avail index costs one warning, not one
/// per kick; once it fixes the index and breaks it again, it is said again.
#[test]
fn a_corrupt_avail_index_is_logged_once() {
    let sink = LogSink::default();
    let writer = sink.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::WARN)
        .with_writer(move || writer.clone())
        .finish();
    let warnings = || {
        String::from_utf8_lossy(&sink.0.lock().unwrap())
            .matches("avail index out of range")
            .count()
    };
    tracing::subscriber::with_default(subscriber, || {
        let mut r = Rig::null(false);
        let m = r.mem.memory();
        let corrupt = QSIZE + 5;
        m.write_obj(corrupt, GuestAddress(r.avail + 2)).unwrap();
        for _ in 0..10 {
            r.worker.run_pass();
        }
        assert_eq!(warnings(), 1, "ten kicks, one warning");
        m.write_obj(0u16, GuestAddress(r.avail + 2)).unwrap();
        r.worker.run_pass();
        m.write_obj(corrupt, GuestAddress(r.avail + 2)).unwrap();
        r.worker.run_pass();
        r.worker.run_pass();
        assert_eq!(warnings(), 2, "a new corruption is a new warning");
    });
}
