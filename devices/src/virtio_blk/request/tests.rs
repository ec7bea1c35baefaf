//! Request parsing against chains built with virtio-queue's `MockSplitQueue`.

#![allow(clippy::cast_possible_truncation)] // Test data and figures, not guest input.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use virtio_bindings::bindings::virtio_blk::{
    VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_SCSI_CMD, VIRTIO_BLK_T_WRITE_ZEROES,
};
use virtio_bindings::bindings::virtio_ring::{
    VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
};
use virtio_queue::desc::RawDescriptor;
use virtio_queue::desc::split::Descriptor as SplitDescriptor;
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use super::*;
use crate::virtio_blk::status::{IOERR, UNSUPP};

mod malformed;

const QSIZE: u16 = 16;
const MEM_SIZE: usize = 0x10_0000;
const HDR: u64 = 0x1_0000;
const DATA: u64 = 0x2_0000;
const STATUS: u64 = 0x3_0000;
const OUTSIDE: u64 = 0x20_0000;
const R: u16 = 0;
const W: u16 = VRING_DESC_F_WRITE as u16;

fn mem() -> GuestMemMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap()
}

fn limits() -> Limits {
    Limits {
        capacity_sectors: 2048,
        seg_max: 8,
        size_max: 0x1_0000,
        readonly: false,
        discard: true,
        write_zeroes: true,
        max_discard_sectors: 1024,
        max_write_zeroes_sectors: 1024,
    }
}

fn header(mem: &GuestMemMmap, addr: u64, request_type: u32, sector: u64) {
    let mut h = [0u8; 16];
    h[..4].copy_from_slice(&request_type.to_le_bytes());
    h[4..8].copy_from_slice(&0xdead_beefu32.to_le_bytes());
    h[8..].copy_from_slice(&sector.to_le_bytes());
    mem.write_slice(&h, GuestAddress(addr)).unwrap();
}

fn segment(mem: &GuestMemMmap, addr: u64, sector: u64, num_sectors: u32, flags: u32) {
    let mut s = [0u8; 16];
    s[..8].copy_from_slice(&sector.to_le_bytes());
    s[8..12].copy_from_slice(&num_sectors.to_le_bytes());
    s[12..].copy_from_slice(&flags.to_le_bytes());
    mem.write_slice(&s, GuestAddress(addr)).unwrap();
}

/// Parses the chain `descs` (address, length, R or W), linked in order.
fn run_with(
    mem: &GuestMemMmap,
    descs: &[(u64, u32, u16)],
    limits: &Limits,
) -> Result<Request, Rejected> {
    let raw: Vec<RawDescriptor> = descs
        .iter()
        .map(|&(addr, len, flags)| RawDescriptor::from(SplitDescriptor::new(addr, len, flags, 0)))
        .collect();
    let vq = MockSplitQueue::new(mem, QSIZE);
    let chain = vq.build_desc_chain(&raw).unwrap();
    parse(chain, limits, Vec::new())
}

fn run(mem: &GuestMemMmap, descs: &[(u64, u32, u16)]) -> Result<Request, Rejected> {
    run_with(mem, descs, &limits())
}

/// Parses a chain written verbatim (flags and next fields as given) at the table start.
fn run_raw(mem: &GuestMemMmap, descs: &[(u64, u32, u16, u16)]) -> Result<Request, Rejected> {
    let raw: Vec<RawDescriptor> = descs
        .iter()
        .map(|&(addr, len, flags, next)| {
            RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next))
        })
        .collect();
    let vq = MockSplitQueue::new(mem, QSIZE);
    vq.add_desc_chains(&raw, 0).unwrap();
    let mut q: Queue = vq.create_queue().unwrap();
    let chain = q.pop_descriptor_chain(mem).unwrap();
    parse(chain, &limits(), Vec::new())
}

#[track_caller]
fn rejected(result: Result<Request, Rejected>, code: u8, status: Option<u64>) -> &'static str {
    match result {
        Ok(req) => panic!("accepted: {req:?}"),
        Err(r) => {
            assert_eq!(r.head, 0);
            assert_eq!(
                (r.code, r.status),
                (code, status.map(GuestAddress)),
                "{}",
                r.reason
            );
            r.reason
        }
    }
}

/// Writes `fill` through the iovecs and checks that the guest sees it at `expect`
/// (guest address, length) in order.
#[track_caller]
fn check_iovecs_cover(mem: &GuestMemMmap, req: &Request, expect: &[(u64, usize)], fill: u8) {
    let mut total = 0;
    for iov in &req.iovecs {
        // SAFETY: the iovecs point into `mem`, which outlives this loop.
        unsafe { std::ptr::write_bytes(iov.iov_base.cast::<u8>(), fill, iov.iov_len) };
        total += iov.iov_len;
    }
    assert_eq!(total as u64, req.data_len);
    assert_eq!(expect.iter().map(|e| e.1).sum::<usize>(), total);
    for &(addr, len) in expect {
        let mut buf = vec![0u8; len];
        mem.read_slice(&mut buf, GuestAddress(addr)).unwrap();
        assert!(
            buf.iter().all(|&b| b == fill),
            "guest bytes at {addr:#x} not written"
        );
    }
}

#[test]
fn read_one_segment() {
    let mem = mem();
    header(&mem, HDR, VIRTIO_BLK_T_IN, 7);
    let req = run(&mem, &[(HDR, 16, R), (DATA, 512, W), (STATUS, 1, W)]).unwrap();
    assert_eq!(
        (req.head, req.op, req.sector, req.data_len),
        (0, Op::Read, 7, 512)
    );
    assert_eq!(req.status, GuestAddress(STATUS));
    assert_eq!(req.iovecs.len(), 1);
    check_iovecs_cover(&mem, &req, &[(DATA, 512)], 0xa5);
    assert_eq!(used_len(&req), 513);
}

#[test]
fn read_three_segments() {
    let mem = mem();
    header(&mem, HDR, VIRTIO_BLK_T_IN, 100);
    let descs = [
        (HDR, 16, R),
        (DATA, 512, W),
        (DATA + 0x1000, 1024, W),
        (DATA + 0x4000, 512, W),
        (STATUS, 1, W),
    ];
    let req = run(&mem, &descs).unwrap();
    assert_eq!((req.op, req.sector, req.data_len), (Op::Read, 100, 2048));
    assert_eq!(req.iovecs.len(), 3);
    check_iovecs_cover(
        &mem,
        &req,
        &[(DATA, 512), (DATA + 0x1000, 1024), (DATA + 0x4000, 512)],
        0x3c,
    );
    assert_eq!(used_len(&req), 2049);
}

#[test]
fn write_reads_the_guest_bytes() {
    let mem = mem();
    header(&mem, HDR, VIRTIO_BLK_T_OUT, 8);
    let pattern: Vec<u8> = (0..1024u32).map(|i| (i * 7) as u8).collect();
    mem.write_slice(&pattern, GuestAddress(DATA)).unwrap();
    let req = run(
        &mem,
        &[
            (HDR, 16, R),
            (DATA, 512, R),
            (DATA + 512, 512, R),
            (STATUS, 1, W),
        ],
    )
    .unwrap();
    assert_eq!((req.op, req.sector, req.data_len), (Op::Write, 8, 1024));
    let mut seen = Vec::new();
    for iov in &req.iovecs {
        // SAFETY: the iovecs point into `mem`, which outlives this loop.
        seen.extend_from_slice(unsafe {
            std::slice::from_raw_parts(iov.iov_base.cast::<u8>(), iov.iov_len)
        });
    }
    assert_eq!(seen, pattern);
    assert_eq!(used_len(&req), 1);
}

#[test]
fn flush() {
    let mem = mem();
    header(&mem, HDR, VIRTIO_BLK_T_FLUSH, 0);
    let req = run(&mem, &[(HDR, 16, R), (STATUS, 1, W)]).unwrap();
    assert_eq!((req.op, req.data_len, req.iovecs.len()), (Op::Flush, 0, 0));
    assert_eq!(used_len(&req), 1);
}

#[test]
fn get_id_long_and_short_buffers() {
    let mem = mem();
    header(&mem, HDR, VIRTIO_BLK_T_GET_ID, 0);
    mem.write_slice(&[0xffu8; 64], GuestAddress(DATA)).unwrap();
    let req = run(&mem, &[(HDR, 16, R), (DATA, 64, W), (STATUS, 1, W)]).unwrap();
    assert_eq!((req.op, req.data_len), (Op::GetId, 64));
    assert_eq!(used_len(&req), 21);
    // SAFETY: `req` came from `parse` over `mem`, which outlives the call.
    assert_eq!(unsafe { write_id(&req.iovecs, "disk-0") }, 20);
    let mut id = [0u8; 21];
    mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
    assert_eq!(&id[..6], b"disk-0");
    assert!(
        id[6..20].iter().all(|&b| b == 0),
        "id not zero padded: {id:?}"
    );
    assert_eq!(id[20], 0xff, "wrote past 20 bytes");

    // An 8-byte buffer split over two descriptors gets the first 8 bytes of the serial.
    mem.write_slice(&[0xffu8; 0x200], GuestAddress(DATA))
        .unwrap();
    let req = run(
        &mem,
        &[
            (HDR, 16, R),
            (DATA, 3, W),
            (DATA + 0x100, 5, W),
            (STATUS, 1, W),
        ],
    )
    .unwrap();
    assert_eq!(used_len(&req), 9);
    // SAFETY: as above.
    let written = unsafe { write_id(&req.iovecs, "serial-longer-than-twenty") };
    assert_eq!(written, 8);
    let mut a = [0u8; 4];
    mem.read_slice(&mut a, GuestAddress(DATA)).unwrap();
    assert_eq!(&a, b"ser\xff");
    let mut b = [0u8; 6];
    mem.read_slice(&mut b, GuestAddress(DATA + 0x100)).unwrap();
    assert_eq!(&b, b"ial-l\xff");
}

#[test]
fn discard_and_write_zeroes() {
    let mem = mem();
    header(&mem, HDR, VIRTIO_BLK_T_DISCARD, 0);
    segment(&mem, DATA, 1000, 48, 0);
    let req = run(&mem, &[(HDR, 16, R), (DATA, 16, R), (STATUS, 1, W)]).unwrap();
    assert_eq!(
        req.op,
        Op::Discard {
            sector: 1000,
            num_sectors: 48
        }
    );
    assert_eq!((req.sector, req.data_len, req.iovecs.len()), (1000, 0, 0));
    assert_eq!(used_len(&req), 1);

    for (flags, unmap) in [(0, false), (1, true)] {
        header(&mem, HDR, VIRTIO_BLK_T_WRITE_ZEROES, 0);
        segment(&mem, DATA, 2000, 48, flags);
        let req = run(&mem, &[(HDR, 16, R), (DATA, 16, R), (STATUS, 1, W)]).unwrap();
        assert_eq!(
            req.op,
            Op::WriteZeroes {
                sector: 2000,
                num_sectors: 48,
                unmap
            }
        );
        assert!(req.iovecs.is_empty());
    }

    // The segment may follow the header in one descriptor, or straddle two.
    header(&mem, HDR, VIRTIO_BLK_T_DISCARD, 0);
    segment(&mem, HDR + 16, 5, 6, 0);
    let req = run(&mem, &[(HDR, 32, R), (STATUS, 1, W)]).unwrap();
    assert_eq!(
        req.op,
        Op::Discard {
            sector: 5,
            num_sectors: 6
        }
    );
    let req = run(&mem, &[(HDR, 20, R), (HDR + 20, 12, R), (STATUS, 1, W)]).unwrap();
    assert_eq!(
        req.op,
        Op::Discard {
            sector: 5,
            num_sectors: 6
        }
    );
}

#[test]
fn unknown_types_are_unsupported() {
    let mem = mem();
    for t in [VIRTIO_BLK_T_SCSI_CMD, 3, 14, 0x8000_0000, u32::MAX] {
        header(&mem, HDR, t, 0);
        rejected(
            run(&mem, &[(HDR, 16, R), (DATA, 512, W), (STATUS, 1, W)]),
            UNSUPP,
            Some(STATUS),
        );
    }
}

#[test]
fn any_layout() {
    let mem = mem();
    // Header split 5 + 11 over two descriptors.
    let mut h = [0u8; 16];
    h[..4].copy_from_slice(&VIRTIO_BLK_T_IN.to_le_bytes());
    h[8..].copy_from_slice(&0x0102u64.to_le_bytes());
    mem.write_slice(&h[..5], GuestAddress(HDR)).unwrap();
    mem.write_slice(&h[5..], GuestAddress(HDR + 0x800)).unwrap();
    let req = run(
        &mem,
        &[
            (HDR, 5, R),
            (HDR + 0x800, 11, R),
            (DATA, 512, W),
            (STATUS, 1, W),
        ],
    )
    .unwrap();
    assert_eq!((req.op, req.sector, req.data_len), (Op::Read, 0x0102, 512));

    // Header and data in one readable descriptor; data and status in one writable one.
    header(&mem, HDR, VIRTIO_BLK_T_OUT, 3);
    let req = run(&mem, &[(HDR, 16 + 1024, R), (STATUS, 1, W)]).unwrap();
    assert_eq!((req.op, req.sector, req.data_len), (Op::Write, 3, 1024));
    check_iovecs_cover(&mem, &req, &[(HDR + 16, 1024)], 0x11);
    header(&mem, HDR, VIRTIO_BLK_T_IN, 3);
    let req = run(&mem, &[(HDR, 16, R), (DATA, 513, W)]).unwrap();
    assert_eq!(
        (req.op, req.data_len, req.status),
        (Op::Read, 512, GuestAddress(DATA + 512))
    );
    check_iovecs_cover(&mem, &req, &[(DATA, 512)], 0x22);
    // A status descriptor longer than one byte: the status is its last byte.
    header(&mem, HDR, VIRTIO_BLK_T_FLUSH, 0);
    let req = run(&mem, &[(HDR, 16, R), (STATUS, 4, W)]).unwrap();
    assert_eq!((req.op, req.status), (Op::Flush, GuestAddress(STATUS + 3)));
}

#[test]
fn zero_length_io_is_valid() {
    let mem = mem();
    header(&mem, HDR, VIRTIO_BLK_T_IN, 2048);
    let req = run(&mem, &[(HDR, 16, R), (STATUS, 1, W)]).unwrap();
    assert_eq!(
        (req.op, req.sector, req.data_len, req.iovecs.len()),
        (Op::Read, 2048, 0, 0)
    );
    header(&mem, HDR, VIRTIO_BLK_T_OUT, 0);
    let req = run(&mem, &[(HDR, 16, R), (DATA, 0, R), (STATUS, 1, W)]).unwrap();
    assert_eq!((req.op, req.data_len), (Op::Write, 0));
}

#[test]
fn last_sectors_of_the_disk() {
    let mem = mem();
    header(&mem, HDR, VIRTIO_BLK_T_IN, 2046);
    let req = run(&mem, &[(HDR, 16, R), (DATA, 1024, W), (STATUS, 1, W)]).unwrap();
    assert_eq!((req.sector, req.data_len), (2046, 1024));
}

#[test]
fn indirect_chain() {
    let mem = mem();
    let table = 0x4_0000u64;
    header(&mem, HDR, VIRTIO_BLK_T_IN, 9);
    let entries = [
        (HDR, 16, R),
        (DATA, 512, W),
        (DATA + 0x800, 512, W),
        (STATUS, 1, W),
    ];
    for (i, &(addr, len, flags)) in entries.iter().enumerate() {
        let next = if i + 1 < entries.len() {
            VRING_DESC_F_NEXT as u16
        } else {
            0
        };
        let d = RawDescriptor::from(SplitDescriptor::new(addr, len, flags | next, i as u16 + 1));
        mem.write_obj(d, GuestAddress(table + 16 * i as u64))
            .unwrap();
    }
    let req = run_raw(
        &mem,
        &[(
            table,
            16 * entries.len() as u32,
            VRING_DESC_F_INDIRECT as u16,
            0,
        )],
    )
    .unwrap();
    assert_eq!((req.op, req.sector, req.data_len), (Op::Read, 9, 1024));
    assert_eq!(req.status, GuestAddress(STATUS));
    check_iovecs_cover(&mem, &req, &[(DATA, 512), (DATA + 0x800, 512)], 0x77);
}

#[test]
fn data_across_memory_regions() {
    let mem = GuestMemoryMmap::from_ranges(&[
        (GuestAddress(0), 0x2_0000),
        (GuestAddress(0x2_0000), 0x2_0000),
    ])
    .unwrap();
    header(&mem, HDR, VIRTIO_BLK_T_IN, 0);
    let req = run(&mem, &[(HDR, 16, R), (0x1_ff00, 1024, W), (STATUS, 1, W)]).unwrap();
    assert_eq!(req.data_len, 1024);
    assert_eq!(req.iovecs.len(), 2, "one iovec per region");
    assert_eq!(
        (req.iovecs[0].iov_len, req.iovecs[1].iov_len),
        (0x100, 0x300)
    );
    check_iovecs_cover(&mem, &req, &[(0x1_ff00, 1024)], 0x5a);
}

#[test]
fn iovecs_are_reused_and_cleared() {
    let mem = mem();
    header(&mem, HDR, VIRTIO_BLK_T_IN, 0);
    let vq = MockSplitQueue::new(&mem, QSIZE);
    let raw: Vec<RawDescriptor> = [(HDR, 16, R), (DATA, 512, W), (STATUS, 1, W)]
        .iter()
        .map(|&(a, l, f)| RawDescriptor::from(SplitDescriptor::new(a, l, f, 0)))
        .collect();
    let chain = vq.build_desc_chain(&raw).unwrap();
    let stale = vec![
        libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 99
        };
        5
    ];
    let capacity = stale.capacity();
    let req = parse(chain, &limits(), stale).unwrap();
    assert_eq!(req.iovecs.len(), 1);
    assert_eq!(req.iovecs[0].iov_len, 512);
    assert!(req.iovecs.capacity() >= capacity);
}

#[test]
fn used_len_and_status_helpers() {
    let mem = mem();
    let mut req = Request {
        head: 0,
        op: Op::Read,
        sector: 0,
        iovecs: Vec::new(),
        data_len: u64::from(u32::MAX),
        status: GuestAddress(STATUS),
    };
    assert_eq!(used_len(&req), u32::MAX);
    req.data_len = 4096;
    assert_eq!(used_len(&req), 4097);
    req.op = Op::GetId;
    assert_eq!(used_len(&req), 21);
    req.data_len = 3;
    assert_eq!(used_len(&req), 4);
    req.op = Op::Write;
    assert_eq!(used_len(&req), 1);

    assert!(write_status(&mem, GuestAddress(STATUS), UNSUPP));
    assert_eq!(mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(), UNSUPP);
    assert!(!write_status(&mem, GuestAddress(OUTSIDE), IOERR));
    assert!(!write_status(&mem, GuestAddress(u64::MAX), IOERR));
    // SAFETY: no iovecs, nothing is written.
    assert_eq!(unsafe { write_id(&[], "x") }, 0);
}

/// Random descriptor tables (random addresses, lengths, flags and next indexes, some
/// indirect) never panic, and every iovec handed out lies inside guest memory.
#[test]
fn random_chains_stay_inside_guest_memory() {
    let mem = mem();
    let base = mem.get_host_address(GuestAddress(0)).unwrap() as usize;
    let mut rng = StdRng::seed_from_u64(0x5eed);
    let mut accepted = 0;
    for round in 0..3000 {
        let n = rng.random_range(1..=QSIZE);
        let mut descs = Vec::new();
        for _ in 0..n {
            let addr = match rng.random_range(0..6) {
                0 => rng.random::<u64>(),
                1 => MEM_SIZE as u64 - rng.random_range(0..0x400u64),
                _ => HDR + 0x100 * rng.random_range(0..0x100u64),
            };
            let len = match rng.random_range(0..5) {
                0 => rng.random::<u32>(),
                1 => 1,
                2 => 16,
                _ => 512 * rng.random_range(0..4u32),
            };
            let flags = rng.random::<u16>() & 0x7;
            let next = rng.random_range(0..QSIZE + 2);
            descs.push((addr, len, flags, next));
        }
        if rng.random_bool(0.5) {
            descs[0] = (HDR, 16, VRING_DESC_F_NEXT as u16, 1);
        }
        if n >= 2 && rng.random_bool(0.4) {
            descs[usize::from(n) - 1] = (STATUS, 1, W, 0);
        }
        // Sometimes a plausible header.
        let t = [
            VIRTIO_BLK_T_IN,
            VIRTIO_BLK_T_OUT,
            VIRTIO_BLK_T_DISCARD,
            VIRTIO_BLK_T_GET_ID,
        ][round % 4];
        header(&mem, HDR, t, rng.random_range(0..4096));
        // Random bytes as indirect tables and segments.
        let junk: Vec<u8> = (0..0x200).map(|_| rng.random()).collect();
        mem.write_slice(
            &junk,
            GuestAddress(HDR + 0x100 * rng.random_range(1..0x100u64)),
        )
        .unwrap();
        match run_raw(&mem, &descs) {
            Ok(req) => {
                accepted += 1;
                assert!(mem.address_in_range(req.status));
                let mut total = 0;
                for iov in &req.iovecs {
                    let start = iov.iov_base as usize;
                    assert!(
                        start >= base && start + iov.iov_len <= base + MEM_SIZE,
                        "{iov:?} outside"
                    );
                    total += iov.iov_len as u64;
                }
                assert_eq!(total, req.data_len);
            }
            Err(r) => {
                assert!(r.code == IOERR || r.code == UNSUPP);
                if let Some(s) = r.status {
                    assert!(mem.address_in_range(s));
                }
            }
        }
    }
    assert!(
        accepted > 0,
        "no random chain was valid: the generator is too hostile"
    );
}
