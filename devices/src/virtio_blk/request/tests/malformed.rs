//! Every malformed chain gets the exact status code, and a status address only when the
//! chain ends cleanly in a usable status byte.

#![allow(clippy::cast_possible_truncation)] // Test data and figures, not guest input.

use super::*;

#[test]
fn header_too_short_or_not_readable() {
    let mem = mem();
    header(&mem, HDR, VIRTIO_BLK_T_IN, 0);
    // 8 readable bytes, then writable ones.
    rejected(
        run(&mem, &[(HDR, 8, R), (DATA, 512, W), (STATUS, 1, W)]),
        IOERR,
        Some(STATUS),
    );
    // The header in a writable descriptor.
    rejected(
        run(&mem, &[(HDR, 16, W), (DATA, 512, W), (STATUS, 1, W)]),
        IOERR,
        Some(STATUS),
    );
    // Only a status byte.
    rejected(run(&mem, &[(STATUS, 1, W)]), IOERR, Some(STATUS));
    // The header outside guest memory, or running off its end.
    rejected(
        run(&mem, &[(OUTSIDE, 16, R), (STATUS, 1, W)]),
        IOERR,
        Some(STATUS),
    );
    rejected(
        run(&mem, &[(MEM_SIZE as u64 - 8, 16, R), (STATUS, 1, W)]),
        IOERR,
        Some(STATUS),
    );
    rejected(
        run(&mem, &[(u64::MAX - 7, 16, R), (STATUS, 1, W)]),
        IOERR,
        Some(STATUS),
    );
}

#[test]
fn status_missing_not_writable_empty_or_outside() {
    let mem = mem();
    header(&mem, HDR, VIRTIO_BLK_T_OUT, 0);
    // No writable descriptor at all.
    rejected(run(&mem, &[(HDR, 16, R), (DATA, 512, R)]), IOERR, None);
    header(&mem, HDR, VIRTIO_BLK_T_IN, 0);
    // The last descriptor is readable.
    rejected(
        run(&mem, &[(HDR, 16, R), (DATA, 512, W), (STATUS, 1, R)]),
        IOERR,
        None,
    );
    // Zero-length status.
    rejected(
        run(&mem, &[(HDR, 16, R), (DATA, 512, W), (STATUS, 0, W)]),
        IOERR,
        None,
    );
    // Outside guest memory, and wrapping around.
    rejected(
        run(&mem, &[(HDR, 16, R), (DATA, 512, W), (OUTSIDE, 1, W)]),
        IOERR,
        None,
    );
    rejected(run(&mem, &[(HDR, 16, R), (u64::MAX, 2, W)]), IOERR, None);
}

#[test]
fn data_direction() {
    let mem = mem();
    header(&mem, HDR, VIRTIO_BLK_T_IN, 0);
    rejected(
        run(&mem, &[(HDR, 16, R), (DATA, 512, R), (STATUS, 1, W)]),
        IOERR,
        Some(STATUS),
    );
    rejected(
        run(&mem, &[(HDR, 16 + 512, R), (STATUS, 1, W)]),
        IOERR,
        Some(STATUS),
    );
    header(&mem, HDR, VIRTIO_BLK_T_OUT, 0);
    rejected(
        run(&mem, &[(HDR, 16, R), (DATA, 512, W), (STATUS, 1, W)]),
        IOERR,
        Some(STATUS),
    );
    // Writable before readable.
    let descs = [
        (HDR, 16, R),
        (DATA, 512, W),
        (DATA + 0x1000, 512, R),
        (STATUS, 1, W),
    ];
    rejected(run(&mem, &descs), IOERR, Some(STATUS));
    header(&mem, HDR, VIRTIO_BLK_T_GET_ID, 0);
    rejected(
        run(&mem, &[(HDR, 16, R), (DATA, 20, R), (STATUS, 1, W)]),
        IOERR,
        Some(STATUS),
    );
    // GET_ID without a buffer.
    rejected(
        run(&mem, &[(HDR, 16, R), (STATUS, 1, W)]),
        IOERR,
        Some(STATUS),
    );
    header(&mem, HDR, VIRTIO_BLK_T_DISCARD, 0);
    segment(&mem, DATA, 0, 1, 0);
    let descs = [
        (HDR, 16, R),
        (DATA, 16, R),
        (DATA + 0x100, 512, W),
        (STATUS, 1, W),
    ];
    rejected(run(&mem, &descs), IOERR, Some(STATUS));
}

#[test]
fn data_length_not_sector_multiple() {
    let mem = mem();
    for t in [VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT] {
        header(&mem, HDR, t, 0);
        let flags = if t == VIRTIO_BLK_T_IN { W } else { R };
        rejected(
            run(&mem, &[(HDR, 16, R), (DATA, 500, flags), (STATUS, 1, W)]),
            IOERR,
            Some(STATUS),
        );
        let descs = [
            (HDR, 16, R),
            (DATA, 256, flags),
            (DATA + 0x1000, 512, flags),
            (STATUS, 1, W),
        ];
        rejected(run(&mem, &descs), IOERR, Some(STATUS));
    }
}

#[test]
fn sector_range() {
    let mem = mem();
    for (sector, len) in [
        (2047, 1024),
        (2049, 0),
        (4096, 512),
        (u64::MAX, 512),
        (u64::MAX - 1, 1024),
    ] {
        header(&mem, HDR, VIRTIO_BLK_T_IN, sector);
        let reason = rejected(
            run(&mem, &[(HDR, 16, R), (DATA, len, W), (STATUS, 1, W)]),
            IOERR,
            Some(STATUS),
        );
        assert!(reason.contains("sector range"), "{sector}: {reason}");
    }
}

#[test]
fn segment_limits() {
    let mem = mem();
    let l = Limits {
        seg_max: 2,
        size_max: 4096,
        ..limits()
    };
    header(&mem, HDR, VIRTIO_BLK_T_IN, 0);
    let two = [
        (HDR, 16, R),
        (DATA, 512, W),
        (DATA + 0x1000, 4096, W),
        (STATUS, 1, W),
    ];
    assert_eq!(run_with(&mem, &two, &l).unwrap().data_len, 4608);
    let three = [
        (HDR, 16, R),
        (DATA, 512, W),
        (DATA + 0x1000, 512, W),
        (DATA + 0x2000, 512, W),
        (STATUS, 1, W),
    ];
    rejected(run_with(&mem, &three, &l), IOERR, Some(STATUS));
    let big = [(HDR, 16, R), (DATA, 8192, W), (STATUS, 1, W)];
    rejected(run_with(&mem, &big, &l), IOERR, Some(STATUS));
    // Status bytes do not count as data segments.
    let with_status_data = [(HDR, 16, R), (DATA, 512, W), (DATA + 0x1000, 513, W)];
    assert_eq!(
        run_with(&mem, &with_status_data, &l).unwrap().data_len,
        1024
    );
}

#[test]
fn loops_and_broken_links() {
    let mem = mem();
    header(&mem, HDR, VIRTIO_BLK_T_IN, 0);
    let next = VRING_DESC_F_NEXT as u16;
    // 0 -> 1 -> 2 -> 1 ...: the iterator's TTL runs out.
    let looped = [
        (HDR, 16, R | next, 1),
        (DATA, 512, W | next, 2),
        (STATUS, 1, W | next, 1),
    ];
    rejected(run_raw(&mem, &looped), IOERR, None);
    // A self loop on the head.
    rejected(run_raw(&mem, &[(HDR, 16, R | next, 0)]), IOERR, None);
    // A next index outside the table.
    rejected(
        run_raw(&mem, &[(HDR, 16, R | next, QSIZE + 5)]),
        IOERR,
        None,
    );
    // A chain longer than 4 GiB in total stops the iterator early.
    rejected(
        run(&mem, &[(HDR, 16, R), (DATA, u32::MAX, W), (STATUS, 1, W)]),
        IOERR,
        None,
    );
}

#[test]
fn broken_indirect_tables() {
    let mem = mem();
    header(&mem, HDR, VIRTIO_BLK_T_IN, 0);
    let indirect = VRING_DESC_F_INDIRECT as u16;
    // Table outside guest memory, empty, or not a multiple of 16 bytes.
    rejected(run_raw(&mem, &[(OUTSIDE, 48, indirect, 0)]), IOERR, None);
    rejected(run_raw(&mem, &[(0x4_0000, 0, indirect, 0)]), IOERR, None);
    rejected(run_raw(&mem, &[(0x4_0000, 40, indirect, 0)]), IOERR, None);
    // An indirect descriptor inside an indirect table.
    let table = 0x4_0000u64;
    let entries = [
        SplitDescriptor::new(HDR, 16, VRING_DESC_F_NEXT as u16, 1),
        SplitDescriptor::new(table, 32, indirect, 0),
    ];
    for (i, d) in entries.into_iter().enumerate() {
        mem.write_obj(RawDescriptor::from(d), GuestAddress(table + 16 * i as u64))
            .unwrap();
    }
    rejected(run_raw(&mem, &[(table, 32, indirect, 0)]), IOERR, None);
    // A table whose chain loops.
    let entries = [
        SplitDescriptor::new(HDR, 16, VRING_DESC_F_NEXT as u16, 1),
        SplitDescriptor::new(
            STATUS,
            1,
            (VRING_DESC_F_NEXT | VRING_DESC_F_WRITE) as u16,
            0,
        ),
    ];
    for (i, d) in entries.into_iter().enumerate() {
        mem.write_obj(RawDescriptor::from(d), GuestAddress(table + 16 * i as u64))
            .unwrap();
    }
    rejected(run_raw(&mem, &[(table, 32, indirect, 0)]), IOERR, None);
}

#[test]
fn data_outside_guest_memory() {
    let mem = mem();
    header(&mem, HDR, VIRTIO_BLK_T_IN, 0);
    for addr in [OUTSIDE, MEM_SIZE as u64 - 256, u64::MAX - 255] {
        let reason = rejected(
            run(&mem, &[(HDR, 16, R), (addr, 512, W), (STATUS, 1, W)]),
            IOERR,
            Some(STATUS),
        );
        assert!(reason.contains("outside"), "{reason}");
    }
    header(&mem, HDR, VIRTIO_BLK_T_OUT, 0);
    rejected(
        run(&mem, &[(HDR, 16, R), (OUTSIDE, 512, R), (STATUS, 1, W)]),
        IOERR,
        Some(STATUS),
    );
    header(&mem, HDR, VIRTIO_BLK_T_DISCARD, 0);
    rejected(
        run(&mem, &[(HDR, 16, R), (OUTSIDE, 16, R), (STATUS, 1, W)]),
        IOERR,
        Some(STATUS),
    );
}

#[test]
fn read_only_disk() {
    let mem = mem();
    let ro = Limits {
        readonly: true,
        ..limits()
    };
    header(&mem, HDR, VIRTIO_BLK_T_OUT, 0);
    rejected(
        run_with(&mem, &[(HDR, 16, R), (DATA, 512, R), (STATUS, 1, W)], &ro),
        IOERR,
        Some(STATUS),
    );
    segment(&mem, DATA, 0, 1, 0);
    for t in [VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES] {
        header(&mem, HDR, t, 0);
        rejected(
            run_with(&mem, &[(HDR, 16, R), (DATA, 16, R), (STATUS, 1, W)], &ro),
            IOERR,
            Some(STATUS),
        );
    }
    // Reads, flushes and GET_ID still work.
    header(&mem, HDR, VIRTIO_BLK_T_IN, 0);
    assert_eq!(
        run_with(&mem, &[(HDR, 16, R), (DATA, 512, W), (STATUS, 1, W)], &ro)
            .unwrap()
            .op,
        Op::Read
    );
    header(&mem, HDR, VIRTIO_BLK_T_FLUSH, 0);
    assert_eq!(
        run_with(&mem, &[(HDR, 16, R), (STATUS, 1, W)], &ro)
            .unwrap()
            .op,
        Op::Flush
    );
}

#[test]
fn discard_and_write_zeroes_segments() {
    let mem = mem();
    for t in [VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES] {
        header(&mem, HDR, t, 0);
        segment(&mem, DATA, 0, 8, 0);
        segment(&mem, DATA + 16, 100, 8, 0);
        // Two segments, a short one, none.
        rejected(
            run(&mem, &[(HDR, 16, R), (DATA, 32, R), (STATUS, 1, W)]),
            IOERR,
            Some(STATUS),
        );
        rejected(
            run(
                &mem,
                &[
                    (HDR, 16, R),
                    (DATA, 16, R),
                    (DATA + 16, 16, R),
                    (STATUS, 1, W),
                ],
            ),
            IOERR,
            Some(STATUS),
        );
        rejected(
            run(&mem, &[(HDR, 16, R), (DATA, 8, R), (STATUS, 1, W)]),
            IOERR,
            Some(STATUS),
        );
        rejected(
            run(&mem, &[(HDR, 16, R), (STATUS, 1, W)]),
            IOERR,
            Some(STATUS),
        );
        // Past the end, overflowing, longer than the limit (1024).
        for (sector, num) in [(2000, 49), (u64::MAX, 1), (0, 1025)] {
            segment(&mem, DATA, sector, num, 0);
            rejected(
                run(&mem, &[(HDR, 16, R), (DATA, 16, R), (STATUS, 1, W)]),
                IOERR,
                Some(STATUS),
            );
        }
        // The exact end and the exact limit are fine.
        for (sector, num) in [(2000, 48), (0, 1024)] {
            segment(&mem, DATA, sector, num, 0);
            run(&mem, &[(HDR, 16, R), (DATA, 16, R), (STATUS, 1, W)]).unwrap();
        }
        // Reserved flag bits.
        for flags in [2, 0x8000_0000] {
            segment(&mem, DATA, 0, 8, flags);
            rejected(
                run(&mem, &[(HDR, 16, R), (DATA, 16, R), (STATUS, 1, W)]),
                UNSUPP,
                Some(STATUS),
            );
        }
    }
    // UNMAP is not a discard flag.
    header(&mem, HDR, VIRTIO_BLK_T_DISCARD, 0);
    segment(&mem, DATA, 0, 8, 1);
    rejected(
        run(&mem, &[(HDR, 16, R), (DATA, 16, R), (STATUS, 1, W)]),
        UNSUPP,
        Some(STATUS),
    );
}

#[test]
fn features_not_offered() {
    let mem = mem();
    let off = Limits {
        discard: false,
        write_zeroes: false,
        ..limits()
    };
    segment(&mem, DATA, 0, 8, 0);
    for t in [VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES] {
        header(&mem, HDR, t, 0);
        rejected(
            run_with(&mem, &[(HDR, 16, R), (DATA, 16, R), (STATUS, 1, W)], &off),
            UNSUPP,
            Some(STATUS),
        );
    }
}
