//! Feature bits and the configuration space layout.

use super::*;

fn params() -> ConfigParams {
    ConfigParams {
        capacity_bytes: 0x1234_5678_9a00 + 300,
        logical_block_size: 4096,
        physical_block_size: 16384,
        seg_max: 254,
        size_max: 0x10_0000,
        num_queues: 4,
        writeback: true,
        max_discard_sectors: 0x3f_ffff,
        max_write_zeroes_sectors: 0x1f_ffff,
        write_zeroes_may_unmap: true,
    }
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}

#[test]
fn features_per_inputs() {
    let always: u64 = (1 << 32)
        | (1 << 29)
        | (1 << 28)
        | (1 << 2)
        | (1 << 1)
        | (1 << 6)
        | (1 << 10)
        | (1 << 9)
        | (1 << 11)
        | (1 << 12);
    let ro = 1 << 5;
    let discard = 1 << 13;
    let wz = 1 << 14;
    assert_eq!(device_features(false, 1, false, false), always);
    assert_eq!(device_features(false, 8, true, false), always | discard);
    assert_eq!(device_features(false, 8, false, true), always | wz);
    assert_eq!(device_features(false, 2, true, true), always | discard | wz);
    // A read-only disk offers neither discard nor write-zeroes.
    assert_eq!(device_features(true, 1, true, true), always | ro);
    assert_eq!(device_features(true, 1, false, false), always | ro);
    // Never packed rings, ACCESS_PLATFORM or ANY_LAYOUT-less legacy bits.
    assert_eq!(
        device_features(false, 1, true, true) & ((1 << 34) | (1 << 33) | (1 << 27)),
        0
    );
}

#[test]
fn fields_at_spec_offsets() {
    let cfg = ConfigSpace::new(&params());
    let b = cfg.as_bytes();
    assert_eq!(b.len(), 96);
    assert_eq!(CONFIG_SPACE_SIZE, 96);
    let sectors = (0x1234_5678_9a00u64 + 300) / 512;
    assert_eq!(u64::from_le_bytes(b[0..8].try_into().unwrap()), sectors);
    assert_eq!(le32(&b, 8), 0x10_0000, "size_max");
    assert_eq!(le32(&b, 12), 254, "seg_max");
    assert_eq!(&b[16..20], &[0, 0, 0, 0], "geometry");
    assert_eq!(le32(&b, 20), 4096, "blk_size");
    assert_eq!(b[24], 2, "physical_block_exp: 16384 / 4096 = 2^2");
    assert_eq!(b[25], 0, "alignment_offset");
    assert_eq!(
        u16::from_le_bytes([b[26], b[27]]),
        8,
        "min_io_size in sectors"
    );
    assert_eq!(le32(&b, 28), 0, "opt_io_size");
    assert_eq!(b[32], 1, "wce");
    assert_eq!(WCE_OFFSET, 32);
    assert_eq!(u16::from_le_bytes([b[34], b[35]]), 4, "num_queues");
    assert_eq!(le32(&b, 36), 0x3f_ffff, "max_discard_sectors");
    assert_eq!(le32(&b, 40), 1, "max_discard_seg");
    assert_eq!(le32(&b, 44), 8, "discard_sector_alignment");
    assert_eq!(le32(&b, 48), 0x1f_ffff, "max_write_zeroes_sectors");
    assert_eq!(le32(&b, 52), 1, "max_write_zeroes_seg");
    assert_eq!(b[56], 1, "write_zeroes_may_unmap");
    assert!(
        b[57..].iter().all(|&x| x == 0),
        "secure erase and zoned fields are zero"
    );
    assert_eq!(cfg.capacity_sectors(), sectors);
    assert!(cfg.writeback());
}

#[test]
fn small_and_odd_block_sizes() {
    let mut p = params();
    p.logical_block_size = 512;
    p.physical_block_size = 512;
    p.writeback = false;
    p.write_zeroes_may_unmap = false;
    let b = ConfigSpace::new(&p).as_bytes();
    assert_eq!(
        (le32(&b, 20), b[24], b[26], b[32], b[56]),
        (512, 0, 1, 0, 0)
    );
    assert_eq!(le32(&b, 44), 1);
    // Physical smaller than logical, not a power-of-two ratio, zero: exponent 0.
    for physical in [0, 512, 12288] {
        p.logical_block_size = 4096;
        p.physical_block_size = physical;
        assert_eq!(
            ConfigSpace::new(&p).as_bytes()[24],
            0,
            "physical {physical}"
        );
    }
    // A logical size below 512 is raised to 512.
    p.logical_block_size = 0;
    let b = ConfigSpace::new(&p).as_bytes();
    assert_eq!((le32(&b, 20), le32(&b, 44)), (512, 1));
}

#[test]
fn reads_at_any_offset_and_length() {
    let cfg = ConfigSpace::new(&params());
    let all = cfg.as_bytes();
    let mut buf = [0xffu8; 4];
    cfg.read(20, &mut buf);
    assert_eq!(buf, 4096u32.to_le_bytes());
    let mut one = [0u8; 1];
    cfg.read(33, &mut one);
    assert_eq!(one[0], all[33]);
    let mut odd = [0u8; 7];
    cfg.read(3, &mut odd);
    assert_eq!(&odd, &all[3..10]);
    // Straddling the end: the tail reads as zero.
    let mut tail = [0xffu8; 8];
    cfg.read(92, &mut tail);
    assert_eq!(&tail[..4], &all[92..96]);
    assert_eq!(&tail[4..], &[0, 0, 0, 0]);
    for offset in [96, 97, 4096, u64::from(u32::MAX), u64::MAX] {
        let mut past = [0xffu8; 16];
        cfg.read(offset, &mut past);
        assert_eq!(past, [0; 16], "offset {offset}");
    }
    let mut big = vec![0xffu8; 200];
    cfg.read(0, &mut big);
    assert_eq!(&big[..96], &all[..]);
    assert!(big[96..].iter().all(|&x| x == 0));
    cfg.read(50, &mut []);
}

#[test]
fn wce_writes() {
    let mut cfg = ConfigSpace::new(&params());
    assert_eq!(cfg.write(32, &[0]), Some(false));
    assert!(!cfg.writeback());
    let mut b = [0xffu8];
    cfg.read(32, &mut b);
    assert_eq!(b[0], 0);
    assert_eq!(cfg.write(32, &[7]), Some(true));
    assert_eq!(cfg.as_bytes()[32], 1);
    // Anything else is ignored.
    let before = cfg.as_bytes();
    assert_eq!(cfg.write(32, &[0, 0]), None);
    assert_eq!(cfg.write(31, &[0]), None);
    assert_eq!(cfg.write(0, &[0; 8]), None);
    assert_eq!(cfg.write(32, &[]), None);
    assert_eq!(cfg.write(u64::MAX, &[1]), None);
    assert_eq!(cfg.as_bytes(), before);
}

#[test]
fn limits_follow_the_config() {
    let cfg = ConfigSpace::new(&params());
    let l = cfg.limits(false, true, true);
    assert_eq!(
        l,
        Limits {
            capacity_sectors: (0x1234_5678_9a00u64 + 300) / 512,
            seg_max: 254,
            size_max: 0x10_0000,
            readonly: false,
            discard: true,
            write_zeroes: true,
            max_discard_sectors: 0x3f_ffff,
            max_write_zeroes_sectors: 0x1f_ffff,
        }
    );
    let ro = cfg.limits(true, true, true);
    assert!(ro.readonly && !ro.discard && !ro.write_zeroes);
}
