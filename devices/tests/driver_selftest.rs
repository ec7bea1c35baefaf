//! Self-tests of the test-side virtio driver (`tests/support`): requests built by the
//! driver are popped by virtio-queue's device-side `Queue` on the same rings, checked
//! byte by byte, completed with `add_used`, and read back with `poll_used`.

#![allow(clippy::cast_possible_truncation)] // Test data and figures, not guest input.

mod support;

use std::sync::atomic::Ordering;
use std::time::Duration;

use devices::virtio_blk::GuestMem;
use support::device_side::{Popped, Seen, complete, pop, read_bytes};
use support::*;
use virtio_bindings::bindings::virtio_blk::{
    VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryBackend};

const T: Duration = Duration::from_secs(5);

fn setup(cfg: BlkDriverConfig) -> (TestMemory, BlkDriver, Queue, GuestMem) {
    let mem = TestMemory::new(cfg.footprint() + 0x10000).unwrap();
    let drv = BlkDriver::new(&mem, cfg).unwrap();
    let q = drv.device_queue();
    let gm = mem.guest_mem();
    assert!(q.is_valid(&*gm.memory()));
    (mem, drv, q, gm)
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

fn check_segments(p: &Popped, lens: &[u32], write: bool) {
    let data = p.data();
    assert_eq!(data.iter().map(|d| d.len).collect::<Vec<_>>(), lens);
    assert!(data.iter().all(|d| d.write == write), "data direction");
    for w in data.windows(2) {
        assert!(
            w[0].addr + u64::from(w[0].len) < w[1].addr,
            "segments must not touch"
        );
    }
}

#[test]
fn read_request_layout_and_completion() {
    for indirect in [false, true] {
        let (_mem, mut drv, mut q, gm) = setup(BlkDriverConfig::default());
        let opts = ReqOptions {
            segments: 3,
            indirect,
        };
        let id = drv
            .submit(
                BlkOp::Read {
                    sector: 7,
                    len: 4096,
                },
                opts,
            )
            .unwrap();
        let p = pop(&mut q, &gm).expect("one chain");
        assert!(pop(&mut q, &gm).is_none());
        assert_eq!(p.header(&gm), (VIRTIO_BLK_T_IN, 7));
        check_segments(&p, &[1024, 1024, 2048], true);
        let head_desc = drv.vq().ring().read_desc(p.head);
        assert_eq!(head_desc.flags & F_INDIRECT != 0, indirect);
        // The driver poisons read buffers and the status byte.
        assert!(
            read_bytes(&gm, &p.data()[0])
                .iter()
                .all(|&b| b == READ_POISON)
        );
        assert_eq!(read_bytes(&gm, &p.status()), [STATUS_UNSET]);
        assert_eq!(drv.in_flight(), 1);

        let m = gm.memory();
        let mut expect = Vec::new();
        for (i, d) in p.data().iter().enumerate() {
            let chunk = pattern(d.len as usize, i as u8);
            m.write_slice(&chunk, GuestAddress(d.addr)).unwrap();
            expect.extend(chunk);
        }
        m.write_slice(&[0], GuestAddress(p.status().addr)).unwrap();
        q.add_used(&*m, p.head, 4097).unwrap();

        let done = drv.poll_used();
        assert_eq!(done.len(), 1);
        let c = &done[0];
        assert_eq!((c.id, c.head, c.status, c.used_len), (id, p.head, 0, 4097));
        assert_eq!((c.req_type, c.sector), (VIRTIO_BLK_T_IN, 7));
        assert_eq!(c.data, expect);
        assert_eq!(drv.in_flight(), 0);
        assert_eq!(drv.vq().free_descriptors(), 128, "descriptors returned");
        assert!(drv.poll_used().is_empty());
    }
}

#[test]
fn write_request_carries_data_in_order() {
    for indirect in [false, true] {
        let cfg = BlkDriverConfig {
            indirect,
            ..Default::default()
        };
        let (_mem, mut drv, mut q, gm) = setup(cfg);
        let data = pattern(3000, 9);
        let id = drv.submit_write(100, &data, 4).unwrap();
        let p = pop(&mut q, &gm).unwrap();
        assert_eq!(p.header(&gm), (VIRTIO_BLK_T_OUT, 100));
        check_segments(&p, &[750, 750, 750, 750], false);
        let got: Vec<u8> = p.data().iter().flat_map(|d| read_bytes(&gm, d)).collect();
        assert_eq!(got, data);
        assert_eq!(complete(&mut q, &gm, &p, 0, 0), 1);
        let c = drv.poll_used().pop().unwrap();
        assert_eq!((c.id, c.status, c.used_len), (id, 0, 1));
        assert!(c.data.is_empty());
    }
}

#[test]
fn flush_get_id_discard_write_zeroes_layouts() {
    let (_mem, mut drv, mut q, gm) = setup(BlkDriverConfig::default());
    let flush = drv.submit_flush().unwrap();
    let get_id = drv.submit_get_id().unwrap();
    let discard = drv.submit_discard(64, 8).unwrap();
    let wz = drv.submit_write_zeroes(1 << 40, 16, true).unwrap();
    let wz_keep = drv.submit_write_zeroes(3, 1, false).unwrap();

    let p = pop(&mut q, &gm).unwrap();
    assert_eq!(p.header(&gm), (VIRTIO_BLK_T_FLUSH, 0));
    assert!(p.data().is_empty());
    complete(&mut q, &gm, &p, 0, 0);

    let p = pop(&mut q, &gm).unwrap();
    assert_eq!(p.header(&gm).0, VIRTIO_BLK_T_GET_ID);
    check_segments(&p, &[ID_LEN], true);
    complete(&mut q, &gm, &p, b'x', 0);

    let mut ranges = Vec::new();
    for t in [
        VIRTIO_BLK_T_DISCARD,
        VIRTIO_BLK_T_WRITE_ZEROES,
        VIRTIO_BLK_T_WRITE_ZEROES,
    ] {
        let p = pop(&mut q, &gm).unwrap();
        assert_eq!(p.header(&gm), (t, 0));
        check_segments(&p, &[16], false);
        let seg = read_bytes(&gm, &p.data()[0]);
        let sector = u64::from_le_bytes(seg[0..8].try_into().unwrap());
        let num = u32::from_le_bytes(seg[8..12].try_into().unwrap());
        let flags = u32::from_le_bytes(seg[12..16].try_into().unwrap());
        ranges.push((sector, num, flags));
        complete(&mut q, &gm, &p, 0, 2);
    }
    assert_eq!(ranges, [(64, 8, 0), (1 << 40, 16, 1), (3, 1, 0)]);
    assert!(pop(&mut q, &gm).is_none());

    let done = drv.poll_used();
    let ids: Vec<_> = done.iter().map(|c| c.id).collect();
    assert_eq!(ids, [flush, get_id, discard, wz, wz_keep]);
    assert_eq!(done[1].data, vec![b'x'; ID_LEN as usize]);
    assert_eq!(done[1].used_len, ID_LEN + 1);
    assert_eq!(
        done.iter().map(|c| c.status).collect::<Vec<_>>(),
        [0, 0, 2, 2, 2]
    );
}

#[test]
fn custom_request_and_unwritten_status() {
    let (_mem, mut drv, mut q, gm) = setup(BlkDriverConfig::default());
    let op = BlkOp::Custom {
        req_type: 99,
        sector: 5,
        out: pattern(10, 1),
        in_len: 8,
    };
    let id = drv
        .submit(
            op,
            ReqOptions {
                segments: 2,
                indirect: true,
            },
        )
        .unwrap();
    let p = pop(&mut q, &gm).unwrap();
    assert_eq!(p.header(&gm), (99, 5));
    let dirs: Vec<_> = p.data().iter().map(|d| (d.len, d.write)).collect();
    assert_eq!(dirs, [(5, false), (5, false), (4, true), (4, true)]);
    // The device returns the chain without touching the status byte.
    q.add_used(&*gm.memory(), p.head, 0).unwrap();
    let c = drv.poll_used().pop().unwrap();
    assert_eq!(
        (c.id, c.status, c.data.clone()),
        (id, STATUS_UNSET, vec![READ_POISON; 8])
    );
}

#[test]
fn submit_limits() {
    let cfg = BlkDriverConfig {
        queue_size: 8,
        max_in_flight: 4,
        max_data_bytes: 8192,
        max_segments: 4,
        ..Default::default()
    };
    let (_mem, mut drv, _q, _gm) = setup(cfg);
    assert_eq!(
        drv.submit_read(0, 8192 + 512, 1),
        Err(SubmitError::TooLarge)
    );
    assert_eq!(drv.submit_read(0, 4096, 5), Err(SubmitError::TooLarge));
    assert_eq!(drv.submit_read(0, 2, 3), Err(SubmitError::BadSegments));
    assert_eq!(drv.submit_read(0, 512, 0), Err(SubmitError::BadSegments));
    // 8 descriptors: two 3-descriptor reads fit, a third does not.
    drv.submit_read(0, 512, 1).unwrap();
    drv.submit_read(1, 512, 1).unwrap();
    assert!(!drv.has_room(ReqOptions::default()));
    assert_eq!(drv.submit_read(2, 512, 1), Err(SubmitError::QueueFull));
    // Indirect requests take one descriptor each, but only 4 slots exist.
    let ind = ReqOptions {
        segments: 1,
        indirect: true,
    };
    drv.submit(BlkOp::Flush, ind).unwrap();
    drv.submit(BlkOp::Flush, ind).unwrap();
    assert_eq!(drv.submit(BlkOp::Flush, ind), Err(SubmitError::QueueFull));
    assert_eq!(drv.in_flight(), 4);
}

/// Runs more than 65536 requests through a size-8 queue: both 16-bit indexes wrap,
/// heads and slots are recycled, and every completion matches its request.
#[test]
fn indexes_wrap_on_a_small_queue() {
    let cfg = BlkDriverConfig {
        queue_size: 8,
        max_in_flight: 8,
        max_data_bytes: 1024,
        max_segments: 2,
        ..Default::default()
    };
    let (_mem, mut drv, mut q, gm) = setup(cfg);
    let total = 70_000u64;
    let mut submitted = 0u64;
    let mut completed = 0u64;
    let mut popped = 0u64;
    let mut expected = std::collections::VecDeque::new();
    while completed < total {
        while submitted < total {
            let sector = submitted % 1000;
            let r = match submitted % 3 {
                0 => drv.submit_read(sector, 512, 1),
                1 => drv.submit(
                    BlkOp::Flush,
                    ReqOptions {
                        segments: 1,
                        indirect: true,
                    },
                ),
                _ => drv.submit_write(sector, &pattern(512, submitted as u8), 2),
            };
            match r {
                Ok(id) => expected.push_back((id, submitted)),
                Err(SubmitError::QueueFull) => break,
                Err(e) => panic!("{e}"),
            }
            submitted += 1;
        }
        while let Some(p) = pop(&mut q, &gm) {
            // Chains are popped in submission order.
            let k = popped;
            popped += 1;
            let types = [VIRTIO_BLK_T_IN, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_OUT];
            let sector = if k % 3 == 1 { 0 } else { k % 1000 };
            assert_eq!(p.header(&gm), (types[(k % 3) as usize], sector));
            complete(&mut q, &gm, &p, k as u8, (k % 2) as u8);
        }
        for c in drv.poll_used() {
            let (id, k) = expected.pop_front().unwrap();
            assert_eq!(c.id, id, "completions in order");
            assert_eq!(c.status, (k % 2) as u8);
            if k % 3 == 0 {
                assert_eq!(c.data, vec![k as u8; 512]);
            }
            completed += 1;
        }
    }
    assert_eq!(drv.in_flight(), 0);
    assert!(drv.take_stray().is_empty());
    assert_eq!(drv.vq().ring().used_idx(), total as u16);
    assert_eq!(drv.vq().ring().avail_idx(), total as u16);
    assert_eq!(q.next_avail(), total as u16);
}

/// The same across the wrap point quickly, with EVENT_IDX kicks and interrupts
/// evaluated on both sides of it.
#[test]
fn start_near_wrap_with_event_idx() {
    let (_mem, mut drv, mut q, gm) = setup(BlkDriverConfig::default());
    let start = 65530u16;
    drv.vq_mut().start_at(start);
    drv.vq().set_used_idx_raw(start);
    q.set_next_avail(start);
    q.set_next_used(start);
    let m = gm.memory();
    // The device asks for a kick at its next_avail (avail_event = start).
    assert!(!q.enable_notification(&*m).unwrap());
    assert_eq!(drv.vq().ring().avail_event(), start);
    for round in 0..12u16 {
        drv.submit_flush().unwrap();
        assert!(
            drv.kick().unwrap(),
            "device re-enabled notifications: kick at {round}"
        );
        let p = pop(&mut q, &gm).unwrap();
        complete(&mut q, &gm, &p, 0, 0);
        assert!(
            q.needs_notification(&*m).unwrap(),
            "driver asked for an interrupt"
        );
        assert!(!q.enable_notification(&*m).unwrap());
        assert_eq!(drv.poll_used().len(), 1);
    }
    assert_eq!(drv.vq().ring().avail_idx(), start.wrapping_add(12));
    assert_eq!(drv.vq().ring().used_idx(), start.wrapping_add(12));
}

#[test]
fn kick_suppression_with_event_idx() {
    let (_mem, mut drv, mut q, gm) = setup(BlkDriverConfig::default());
    let dev_kick = drv.vq().device_kick().unwrap();
    let m = gm.memory();
    // avail_event starts at 0: the first request is kicked.
    drv.submit_flush().unwrap();
    assert!(drv.kick().unwrap());
    assert_eq!(dev_kick.read().unwrap(), 1);
    // The device has not consumed it: avail_event still 0, so no kick for the next.
    drv.submit_flush().unwrap();
    assert!(!drv.kick().unwrap());
    assert!(dev_kick.read().is_err(), "no kick written");
    // The device pops both and re-enables notifications at next_avail = 2.
    assert!(pop(&mut q, &gm).is_some() && pop(&mut q, &gm).is_some());
    assert!(!q.enable_notification(&*m).unwrap());
    assert_eq!(drv.vq().ring().avail_event(), 2);
    drv.submit_flush().unwrap();
    drv.submit_flush().unwrap();
    assert!(drv.kick().unwrap(), "index 2 crossed since the last kick");
    // A kick with nothing new published is suppressed.
    assert!(!drv.kick().unwrap());
    let s = drv.vq().stats();
    assert_eq!((s.kicks, s.kicks_suppressed), (2, 2));
    // KickMode::Always ignores the device.
    drv.vq_mut().set_kick_mode(KickMode::Always);
    assert!(drv.kick().unwrap());
    assert_eq!(dev_kick.read().unwrap(), 2);
}

#[test]
fn kick_suppression_without_event_idx() {
    let cfg = BlkDriverConfig {
        event_idx: false,
        ..Default::default()
    };
    let (_mem, mut drv, mut q, gm) = setup(cfg);
    assert!(!q.event_idx_enabled());
    let m = gm.memory();
    q.disable_notification(&*m).unwrap();
    drv.submit_flush().unwrap();
    assert!(!drv.kick().unwrap(), "VRING_USED_F_NO_NOTIFY honoured");
    assert!(q.enable_notification(&*m).unwrap(), "one chain pending");
    drv.submit_flush().unwrap();
    assert!(drv.kick().unwrap());
}

#[test]
fn interrupt_suppression_with_event_idx() {
    let (_mem, mut drv, mut q, gm) = setup(BlkDriverConfig::default());
    let m = gm.memory();
    for _ in 0..3 {
        drv.submit_flush().unwrap();
    }
    // Interrupts off: used_event is far ahead, the device must not signal.
    drv.vq_mut().set_interrupts(false);
    let p = pop(&mut q, &gm).unwrap();
    complete(&mut q, &gm, &p, 0, 0);
    assert!(!q.needs_notification(&*m).unwrap());
    assert_eq!(drv.poll_used().len(), 1);
    // Interrupts on: used_event = last used (1), the next used entry is signalled.
    drv.vq_mut().set_interrupts(true);
    assert_eq!(drv.vq().ring().used_event(), 1);
    let p = pop(&mut q, &gm).unwrap();
    complete(&mut q, &gm, &p, 0, 0);
    assert!(q.needs_notification(&*m).unwrap());
    // The driver has not consumed that one: no second interrupt for the third.
    let p = pop(&mut q, &gm).unwrap();
    complete(&mut q, &gm, &p, 0, 0);
    assert!(!q.needs_notification(&*m).unwrap());
    // poll_used moves used_event to what it consumed.
    assert_eq!(drv.poll_used().len(), 2);
    assert_eq!(drv.vq().ring().used_event(), 3);
}

#[test]
fn interrupt_flag_without_event_idx() {
    let cfg = BlkDriverConfig {
        event_idx: false,
        ..Default::default()
    };
    let (_mem, mut drv, _q, _gm) = setup(cfg);
    drv.vq_mut().set_interrupts(false);
    assert_eq!(drv.vq().ring().avail_flags(), 1);
    drv.vq_mut().set_interrupts(true);
    assert_eq!(drv.vq().ring().avail_flags(), 0);
}

/// `wait` sleeps on the call eventfd until a device thread completes and signals;
/// `local_queue` hands the device dups of the same eventfds.
#[test]
fn wait_wakes_on_call_from_device_thread() {
    let (_mem, mut drv, _q, gm) = setup(BlkDriverConfig::default());
    let mut local = drv.local_queue().unwrap();
    let device = std::thread::spawn(move || {
        let mut served = 0;
        while served < 64 {
            let mut pfd = libc::pollfd {
                fd: std::os::fd::AsRawFd::as_raw_fd(&local.kick),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd.
            assert!(unsafe { libc::poll(&mut pfd, 1, 5000) } == 1, "no kick");
            local.kick.read().unwrap();
            let m = gm.memory();
            loop {
                q_disable(&mut local.queue, &gm);
                while let Some(p) = pop(&mut local.queue, &gm) {
                    std::thread::sleep(Duration::from_micros(200));
                    complete(&mut local.queue, &gm, &p, p.head as u8, 0);
                    served += 1;
                }
                if local.queue.needs_notification(&*m).unwrap() {
                    local.call.write(1).unwrap();
                }
                if !local.queue.enable_notification(&*m).unwrap() {
                    break;
                }
            }
        }
    });
    let mut ids = Vec::new();
    let mut done = Vec::new();
    for i in 0..64u64 {
        while !drv.has_room(ReqOptions {
            segments: 2,
            indirect: false,
        }) {
            done.extend(drv.wait(T).unwrap());
        }
        ids.push(drv.submit_read(i, 1024, 2).unwrap());
        drv.kick().unwrap();
    }
    done.extend(drv.drain(T).unwrap());
    device.join().unwrap();
    let mut got: Vec<_> = done.iter().map(|c| c.id).collect();
    got.sort();
    assert_eq!(got, ids);
    for c in &done {
        assert_eq!((c.status, c.data.clone()), (0, vec![c.head as u8; 1024]));
    }
    let s = drv.vq().stats();
    assert!(s.interrupts > 0);
    assert_eq!(s.missed_interrupts, 0);
}

fn q_disable(q: &mut Queue, gm: &GuestMem) {
    q.disable_notification(&*gm.memory()).unwrap();
}

/// `run` submits, kicks and waits; timeouts are reported, not hung on.
#[test]
fn run_times_out_without_a_device() {
    let (_mem, mut drv, _q, _gm) = setup(BlkDriverConfig::default());
    let e = drv
        .run(
            BlkOp::Flush,
            ReqOptions::default(),
            Duration::from_millis(50),
        )
        .unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::TimedOut);
    let e = drv.drain(Duration::from_millis(20)).unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::TimedOut);
    assert_eq!(drv.in_flight(), 1);
}

/// Raw access: a descriptor loop, an unmapped address and a huge length, published
/// with reserved descriptors next to a well-formed request; the device's used
/// elements for them come back as strays.
#[test]
fn raw_hostile_chains() {
    let (mem, mut drv, mut q, gm) = setup(BlkDriverConfig::default());
    let ids = drv.vq_mut().alloc_descs(3).unwrap();
    let ring = drv.vq().ring().clone();
    let buf = mem.alloc(512, 512);
    // Loop: a -> b -> a.
    ring.write_desc(ids[0], Desc::new(buf.0, 16, F_NEXT, ids[1]));
    ring.write_desc(ids[1], Desc::new(buf.0, 16, F_NEXT, ids[0]));
    // Unmapped, huge.
    ring.write_desc(ids[2], Desc::new(mem.unmapped_addr(), u32::MAX, F_WRITE, 0));
    assert_eq!(ring.read_desc(ids[2]).len, u32::MAX);
    drv.vq_mut().publish(ids[0]);
    let good = drv.submit_flush().unwrap();
    drv.vq_mut().publish(ids[2]);
    // Out-of-range head index.
    drv.vq_mut().publish(1000);

    let m = gm.memory();
    let lp = pop(&mut q, &gm).unwrap();
    assert_eq!(lp.head, ids[0]);
    assert!(lp.descs.len() <= 128, "virtio-queue bounds a looping chain");
    q.add_used(&*m, lp.head, 0).unwrap();
    let p = pop(&mut q, &gm).unwrap();
    complete(&mut q, &gm, &p, 0, 0);
    let bad = pop(&mut q, &gm).unwrap();
    assert_eq!(
        bad.descs,
        [Seen {
            addr: mem.unmapped_addr(),
            len: u32::MAX,
            write: true
        }]
    );
    assert!(!mem.contains(bad.descs[0].addr, 1));
    q.add_used(&*m, bad.head, 0).unwrap();
    // virtio-queue hands out head 1000 with no descriptors and refuses to use it.
    let oob = pop(&mut q, &gm).unwrap();
    assert_eq!((oob.head, oob.descs.len()), (1000, 0));
    assert!(q.add_used(&*m, oob.head, 0).is_err());
    assert!(pop(&mut q, &gm).is_none());

    let done = drv.poll_used();
    assert_eq!(done.iter().map(|c| c.id).collect::<Vec<_>>(), [good]);
    let stray = drv.take_stray();
    assert_eq!(
        stray.iter().map(|u| u.id).collect::<Vec<_>>(),
        [u32::from(ids[0]), u32::from(ids[2])]
    );
    drv.vq_mut().free_descs(&ids);
    assert_eq!(drv.vq().free_descriptors(), 128);
}

#[test]
fn memory_regions_and_memfd() {
    let mem = TestMemory::with_regions(&[(0, 0x10000), (0x100000, 0x20000)]).unwrap();
    assert_eq!(mem.regions().len(), 2);
    assert_eq!(mem.regions()[1].file_offset, 0x10000);
    assert_eq!(mem.memfd().metadata().unwrap().len(), 0x30000);
    assert!(mem.contains(0xff00, 0x100));
    assert!(
        !mem.contains(0xff00, 0x101),
        "the gap is outside guest memory"
    );
    assert!(mem.contains(0x100000, 0x20000));
    assert!(!mem.contains(mem.unmapped_addr(), 1));
    // The allocator skips to the next region when one is full.
    let a = mem.alloc(0xf000, 4096);
    let b = mem.alloc(0x2000, 4096);
    assert_eq!((a.0, b.0), (0, 0x100000));
    assert_eq!(mem.free_bytes(), 0x1e000);
    assert!(mem.try_alloc(0x1f000, 1).is_none());
    // Writes land in the memfd at the region's file offset.
    mem.write(GuestAddress(0x100010), b"hello");
    let mut buf = [0u8; 5];
    std::os::unix::fs::FileExt::read_exact_at(&**mem.memfd(), &mut buf, 0x10010).unwrap();
    assert_eq!(&buf, b"hello");
    mem.store(GuestAddress(0x20), 0xbeefu16, Ordering::Release);
    assert_eq!(
        mem.load::<u16>(GuestAddress(0x20), Ordering::Acquire),
        0xbeef
    );
    assert_eq!(mem.guest_mem().memory().num_regions(), 2);
}

#[test]
fn need_event_matches_the_spec() {
    assert!(need_event(0, 1, 0));
    assert!(!need_event(1, 1, 0));
    assert!(need_event(5, 10, 0));
    assert!(!need_event(10, 10, 0));
    assert!(need_event(65535, 2, 65534), "across the wrap");
    assert!(!need_event(3, 3, 3));
}
