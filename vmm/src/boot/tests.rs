#![allow(clippy::cast_possible_truncation)] // Test data and figures, not guest input.
use std::io::Write;

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::*;

const MIB: u64 = 1 << 20;

fn layout(size: u64) -> BootLayout {
    BootLayout {
        ram: crate::memory::ram_layout(size),
        rsdp_addr: 0xe0000,
        reserved: vec![(0xe0000, 0x20000)],
    }
}

fn mem(size: u64) -> GuestMemoryMmap<()> {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), size as usize)]).unwrap()
}

fn file_with(bytes: &[u8]) -> tempfile::NamedTempFile {
    let mut f = tempfile::NamedTempFile::new().unwrap();
    f.write_all(bytes).unwrap();
    f
}

fn payload(kernel: &Path) -> PayloadConfig {
    PayloadConfig {
        kernel: kernel.to_path_buf(),
        initramfs: None,
        cmdline: "console=ttyS0".into(),
    }
}

#[test]
fn memory_map_cuts_reserved_ranges_out_of_ram() {
    let map = memory_map(&layout(64 * MIB)).unwrap();
    let want = [
        (0, 0xe0000, E820_RAM),
        (0xe0000, 0x20000, E820_RESERVED),
        (0x10_0000, 63 * MIB, E820_RAM),
    ];
    let got: Vec<_> = map.iter().map(|e| (e.addr, e.size, e.kind)).collect();
    assert_eq!(got, want);

    // RAM above the hole, a reserved range in the hole (ECAM) and overlapping reserved.
    let mut l = layout(4 << 30);
    l.reserved.push((0xE000_0000, 0x1000_0000));
    l.reserved.push((0xf0000, 0x20000));
    let map = memory_map(&l).unwrap();
    let got: Vec<_> = map.iter().map(|e| (e.addr, e.size, e.kind)).collect();
    assert_eq!(
        got,
        [
            (0, 0xe0000, E820_RAM),
            (0xe0000, 0x30000, E820_RESERVED),
            (0x11_0000, 0xC000_0000 - 0x11_0000, E820_RAM),
            (0xE000_0000, 0x1000_0000, E820_RESERVED),
            (1 << 32, 1 << 30, E820_RAM),
        ]
    );
    l.reserved.push((u64::MAX, 2));
    assert!(matches!(memory_map(&l), Err(BootError::Layout(_))));
}

#[test]
fn unknown_and_missing_files_are_named() {
    let m = mem(64 * MIB);
    for bytes in [
        &b""[..],
        b"\x7fEL",
        b"hello world, not a kernel",
        &[0u8; 4096],
    ] {
        let f = file_with(bytes);
        let err = load_kernel(&m, &payload(f.path()), &layout(64 * MIB)).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains(&f.path().display().to_string()), "{msg}");
        assert!(msg.contains("payload.kernel"), "{msg}");
    }
    let err = load_kernel(&m, &payload(Path::new("/nonexistent/k")), &layout(64 * MIB));
    assert!(matches!(err, Err(BootError::Io { .. })), "{err:?}");
}

/// A minimal PVH ELF: one segment at `paddr` holding `code`, entry note -> `entry`.
pub(super) fn tiny_pvh_elf(paddr: u64, code: &[u8], bss: u64, entry: u32) -> Vec<u8> {
    let phoff = 64u64;
    let note_off = phoff + 2 * 56;
    let note: Vec<u8> = [
        &4u32.to_le_bytes()[..],
        &4u32.to_le_bytes(),
        &18u32.to_le_bytes(),
        b"Xen\0",
        &entry.to_le_bytes(),
    ]
    .concat();
    let code_off = note_off + note.len() as u64;
    let mut f = vec![0u8; 64];
    f[..7].copy_from_slice(b"\x7fELF\x02\x01\x01");
    f[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    f[18..20].copy_from_slice(&62u16.to_le_bytes()); // x86-64
    f[20..24].copy_from_slice(&1u32.to_le_bytes());
    f[24..32].copy_from_slice(&paddr.to_le_bytes());
    f[32..40].copy_from_slice(&phoff.to_le_bytes());
    f[52..54].copy_from_slice(&64u16.to_le_bytes());
    f[54..56].copy_from_slice(&56u16.to_le_bytes());
    f[56..58].copy_from_slice(&2u16.to_le_bytes());
    let phdr = |t: u32, off: u64, addr: u64, filesz: u64, memsz: u64| {
        let mut p = vec![0u8; 56];
        p[..4].copy_from_slice(&t.to_le_bytes());
        p[4..8].copy_from_slice(&7u32.to_le_bytes());
        p[8..16].copy_from_slice(&off.to_le_bytes());
        p[16..24].copy_from_slice(&addr.to_le_bytes());
        p[24..32].copy_from_slice(&addr.to_le_bytes());
        p[32..40].copy_from_slice(&filesz.to_le_bytes());
        p[40..48].copy_from_slice(&memsz.to_le_bytes());
        p[48..56].copy_from_slice(&4u64.to_le_bytes());
        p
    };
    let len = code.len() as u64;
    f.extend(phdr(1, code_off, paddr, len, len + bss));
    f.extend(phdr(4, note_off, 0, note.len() as u64, note.len() as u64));
    f.extend(note);
    f.extend_from_slice(code);
    f
}

#[test]
fn tiny_pvh_elf_loads_and_zeroes_bss() {
    let m = mem(64 * MIB);
    m.write_slice(&[0xaa; 64], GuestAddress(0x20_0004)).unwrap();
    let f = file_with(&tiny_pvh_elf(0x20_0000, b"\xf4\xf4\xf4\xf4", 64, 0x20_0000));
    let mut p = payload(f.path());
    let initrd = file_with(&[0x5a; 5000]);
    p.initramfs = Some(initrd.path().to_path_buf());
    let info = load_kernel(&m, &p, &layout(64 * MIB)).unwrap();
    assert_eq!(info.entry, EntryMode::Protected32);
    assert_eq!(info.regs.rip, 0x20_0000);
    assert_eq!(info.regs.rbx, PVH_INFO_ADDR);
    let mut b = [0u8; 68];
    m.read_slice(&mut b, GuestAddress(0x20_0000)).unwrap();
    assert_eq!(&b[..4], b"\xf4\xf4\xf4\xf4");
    assert!(b[4..].iter().all(|&x| x == 0), "bss not zeroed");
    let magic: u32 = m.read_obj(GuestAddress(PVH_INFO_ADDR)).unwrap();
    assert_eq!(magic, START_INFO_MAGIC);
    // The module: top of RAM, page-aligned.
    let nr: u32 = m.read_obj(GuestAddress(PVH_INFO_ADDR + 12)).unwrap();
    let modlist: u64 = m.read_obj(GuestAddress(PVH_INFO_ADDR + 16)).unwrap();
    assert_eq!(nr, 1);
    let paddr: u64 = m.read_obj(GuestAddress(modlist)).unwrap();
    let size: u64 = m.read_obj(GuestAddress(modlist + 8)).unwrap();
    assert_eq!((paddr, size), (64 * MIB - 0x2000, 5000));
    assert_eq!(m.read_obj::<u8>(GuestAddress(paddr + 4999)).unwrap(), 0x5a);
}

#[test]
fn hostile_elves_are_errors() {
    let m = mem(64 * MIB);
    let l = layout(64 * MIB);
    let good = tiny_pvh_elf(0x20_0000, &[0x90; 256], 0, 0x20_0000);
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("below 1 MiB", tiny_pvh_elf(0x1000, &[0x90; 16], 0, 0x1000)),
        (
            "past RAM",
            tiny_pvh_elf(64 * MIB - 8, &[0x90; 16], 0, 0x20_0000),
        ),
        (
            "huge bss",
            tiny_pvh_elf(0x20_0000, &[0x90; 16], u64::MAX - 0x30_0000, 0x20_0000),
        ),
        (
            "entry outside",
            tiny_pvh_elf(0x20_0000, &[0x90; 16], 0, 0xffff_0000),
        ),
        ("no note", {
            let mut g = good.clone();
            g[64 + 56..64 + 60].copy_from_slice(&0u32.to_le_bytes());
            g
        }),
        ("phnum huge", {
            let mut g = good.clone();
            g[56..58].copy_from_slice(&0xffffu16.to_le_bytes());
            g
        }),
        ("phoff huge", {
            let mut g = good.clone();
            g[32..40].copy_from_slice(&u64::MAX.to_le_bytes());
            g
        }),
    ];
    for (what, bytes) in cases {
        let f = file_with(&bytes);
        let r = load_kernel(&m, &payload(f.path()), &l);
        assert!(r.is_err(), "{what}: loaded");
    }
    // Every truncation of a good file fails cleanly.
    for n in 0..good.len() {
        let f = file_with(&good[..n]);
        assert!(
            load_kernel(&m, &payload(f.path()), &l).is_err(),
            "truncated to {n}"
        );
    }
    let f = file_with(&good);
    assert!(load_kernel(&m, &payload(f.path()), &l).is_ok());
}

#[test]
fn cmdline_limits() {
    let m = mem(64 * MIB);
    let f = file_with(&tiny_pvh_elf(0x20_0000, &[0x90; 16], 0, 0x20_0000));
    let mut p = payload(f.path());
    p.cmdline = "x".repeat(CMDLINE_MAX_SIZE as usize);
    let err = load_kernel(&m, &p, &layout(64 * MIB)).unwrap_err();
    assert!(matches!(err, BootError::CmdlineTooLong { .. }), "{err}");
    p.cmdline = "a\0b".into();
    assert!(matches!(
        load_kernel(&m, &p, &layout(64 * MIB)),
        Err(BootError::CmdlineNul)
    ));
    p.cmdline = "console=ttyS0 quiet".into();
    load_kernel(&m, &p, &layout(64 * MIB)).unwrap();
    let mut b = [0u8; 20];
    m.read_slice(&mut b, GuestAddress(CMDLINE_ADDR)).unwrap();
    assert_eq!(&b, b"console=ttyS0 quiet\0");
}

#[test]
fn initramfs_too_large_is_an_error() {
    let m = mem(64 * MIB);
    let f = file_with(&tiny_pvh_elf(0x20_0000, &[0x90; 16], 0, 0x20_0000));
    let big = tempfile::NamedTempFile::new().unwrap();
    big.as_file().set_len(64 * MIB).unwrap();
    let mut p = payload(f.path());
    p.initramfs = Some(big.path().to_path_buf());
    let err = load_kernel(&m, &p, &layout(64 * MIB)).unwrap_err();
    assert!(matches!(err, BootError::InitramfsTooLarge { .. }), "{err}");
    assert!(err.to_string().contains("payload.initramfs"));
}

/// Edits a copy of an image.
type Change = dyn Fn(&mut Vec<u8>);

/// A fake bzImage: setup sectors with a header, then a payload; garbage variants fail.
#[test]
fn fake_bzimage_and_hostile_headers() {
    let m = mem(64 * MIB);
    let l = layout(64 * MIB);
    let mut img = vec![0u8; 5 * 512 + 4096];
    img[0x1f1] = 4; // setup_sects
    img[0x1fe..0x200].copy_from_slice(&0xaa55u16.to_le_bytes());
    img[0x202..0x206].copy_from_slice(b"HdrS");
    img[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
    img[0x211] = 1; // loadflags: LOADED_HIGH
    img[0x214..0x218].copy_from_slice(&0x10_0000u32.to_le_bytes());
    img[0x22c..0x230].copy_from_slice(&0x37ff_ffffu32.to_le_bytes()); // initrd_addr_max
    img[0x236..0x238].copy_from_slice(&1u16.to_le_bytes()); // xloadflags: XLF_KERNEL_64
    img[0x238..0x23c].copy_from_slice(&2047u32.to_le_bytes()); // cmdline_size
    img[0x260..0x264].copy_from_slice(&(1u32 << 20).to_le_bytes()); // init_size
    let f = file_with(&img);
    let info = load_kernel(&m, &payload(f.path()), &l).unwrap();
    assert_eq!(info.entry, EntryMode::Long64);
    assert_eq!(info.regs.rip, 0x10_0200);
    assert_eq!(info.regs.rsi, ZERO_PAGE_ADDR);
    let loader: u8 = m.read_obj(GuestAddress(ZERO_PAGE_ADDR + 0x210)).unwrap();
    assert_eq!(loader, 0xff);

    let variants: Vec<(&str, Box<Change>)> = vec![
        (
            "old protocol",
            Box::new(|i| i[0x206..0x208].copy_from_slice(&0x0202u16.to_le_bytes())),
        ),
        ("32-bit only", Box::new(|i| i[0x236] = 0)),
        ("not loaded high", Box::new(|i| i[0x211] = 0)),
        ("setup past end", Box::new(|i| i[0x1f1] = 0xff)),
        ("huge payload", Box::new(|i| i.resize(80 << 20, 0))),
    ];
    for (what, change) in variants {
        let mut bad = img.clone();
        change(&mut bad);
        let f = file_with(&bad);
        assert!(
            load_kernel(&m, &payload(f.path()), &l).is_err(),
            "{what}: loaded"
        );
    }
    let mut p = payload(f.path());
    p.cmdline = "y".repeat(2048);
    assert!(matches!(
        load_kernel(&m, &p, &l),
        Err(BootError::CmdlineTooLong { max: 2048, .. })
    ));
    for n in [0, 0x1f1, 0x205, 0x300, 5 * 512 - 1] {
        let f = file_with(&img[..n]);
        assert!(
            load_kernel(&m, &payload(f.path()), &l).is_err(),
            "truncated to {n}"
        );
    }
}
