//! Unit tests: checksums, the pointer chain, table contents.

#![allow(clippy::cast_possible_truncation)] // Test data and figures, not guest input.

use super::*;
use vm_memory::GuestMemoryMmap;

fn sum(b: &[u8]) -> u8 {
    b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
}

fn u64_at(b: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
}

/// The bytes of the table at guest address `addr` in `l`, by its header length.
fn table_at(l: &AcpiLayout, addr: u64) -> &[u8] {
    let off = (addr - l.rsdp_addr) as usize;
    let len = u32_at(&l.bytes, off + 4) as usize;
    &l.bytes[off..off + len]
}

fn params(n: u8) -> AcpiParams {
    AcpiParams {
        num_vcpus: n,
        ..AcpiParams::default()
    }
}

#[test]
fn every_table_checksums_to_zero() {
    for n in [1, 3, MAX_VCPUS] {
        let t = create_tables(&params(n));
        for b in [t.dsdt(), t.fadt(), t.madt(), t.mcfg()] {
            assert_eq!(sum(b), 0, "{}", String::from_utf8_lossy(&b[..4]));
            assert_eq!(u32_at(b, 4) as usize, b.len(), "header length");
        }
        let l = t.layout(RSDP_REGION_START).unwrap();
        for p in &l.tables {
            let off = (p.addr - l.rsdp_addr) as usize;
            let bytes = &l.bytes[off..off + p.len];
            if &p.signature == b"RSD " {
                assert_eq!(&bytes[..8], b"RSD PTR ");
                assert_eq!(sum(&bytes[..20]), 0, "RSDP v1 checksum");
                assert_eq!(sum(bytes), 0, "RSDP extended checksum");
                assert_eq!(bytes[15], 2, "RSDP revision");
            } else {
                assert_eq!(&bytes[..4], &p.signature);
                assert_eq!(sum(bytes), 0, "{:?}", p.signature);
            }
            assert_eq!(p.addr % 16, 0);
        }
        assert!(l.end() <= RSDP_REGION_END, "tables fit the BIOS area");
    }
}

#[test]
fn pointer_chain_rsdp_xsdt_tables() {
    let t = create_tables(&params(2));
    let l = t.layout(RSDP_REGION_START).unwrap();
    assert_eq!(l.rsdp_addr, RSDP_REGION_START);
    let rsdp = &l.bytes[..36];
    let xsdt_addr = u64_at(rsdp, 24);
    let xsdt = table_at(&l, xsdt_addr);
    assert_eq!(&xsdt[..4], b"XSDT");
    let entries: Vec<u64> = (36..xsdt.len())
        .step_by(8)
        .map(|o| u64_at(xsdt, o))
        .collect();
    let sigs: Vec<&[u8]> = entries.iter().map(|a| &table_at(&l, *a)[..4]).collect();
    assert_eq!(sigs, [b"FACP", b"APIC", b"MCFG"]);
    let fadt = table_at(&l, entries[0]);
    assert_eq!(u32_at(fadt, 40), 0, "32-bit DSDT pointer unused");
    let dsdt = table_at(&l, u64_at(fadt, 140));
    assert_eq!(&dsdt[..4], b"DSDT");
    assert_eq!(dsdt, t.dsdt());
    // Same tables at another base: every pointer moves with it.
    let l2 = t.layout(0x10_0000).unwrap();
    assert_eq!(
        u64_at(&l2.bytes, 24),
        xsdt_addr - RSDP_REGION_START + 0x10_0000
    );
    assert!(matches!(t.layout(0xe0008), Err(AcpiError::Misaligned(_))));
    assert!(matches!(
        t.layout(u64::MAX - 15),
        Err(AcpiError::Overflow(_))
    ));
}

#[test]
fn fadt_is_hw_reduced_with_sleep_registers() {
    let p = AcpiParams {
        sleep_port: 0x600,
        ..AcpiParams::default()
    };
    let f = create_tables(&p).fadt().to_vec();
    assert_eq!(f.len(), 276);
    assert_eq!(f[8], 6, "FADT major revision");
    let flags = u32_at(&f, 112);
    assert_ne!(flags & (1 << 20), 0, "HW_REDUCED_ACPI");
    assert_ne!(flags & (1 << 10), 0, "RESET_REG_SUP");
    // Reset register (116), sleep control (244) and status (256): 8-bit I/O at 0x600.
    for off in [116, 244, 256] {
        assert_eq!(&f[off..off + 4], &[1, 8, 0, 1], "GAS at {off}");
        assert_eq!(u64_at(&f, off + 4), 0x600);
    }
    assert_eq!(f[128], RESET_VALUE);
    assert_eq!(
        u16::from_le_bytes([f[109], f[110]]) & (1 << 3),
        0,
        "MSI allowed"
    );
}

#[test]
fn madt_lists_each_vcpu_ioapic_and_overrides() {
    let m = create_tables(&params(3)).madt().to_vec();
    assert_eq!(&m[..4], b"APIC");
    assert_eq!(u32_at(&m, 36), LAPIC_ADDR);
    let mut off = 44;
    let (mut lapics, mut ioapic, mut iso) = (Vec::new(), None, Vec::new());
    while off < m.len() {
        let (ty, len) = (m[off], m[off + 1] as usize);
        assert!(len >= 2 && off + len <= m.len());
        let s = &m[off..off + len];
        match ty {
            0 => lapics.push((s[2], s[3], u32_at(s, 4))),
            1 => ioapic = Some((u32_at(s, 4), u32_at(s, 8))),
            2 => iso.push((s[3], u32_at(s, 4))),
            _ => {}
        }
        off += len;
    }
    assert_eq!(lapics, [(0, 0, 1), (1, 1, 1), (2, 2, 1)]);
    assert_eq!(ioapic, Some((IOAPIC_ADDR, 0)));
    assert_eq!(iso, [(0, 2)]);
    let no_iso = create_tables(&AcpiParams {
        irq0_to_gsi2: false,
        ..params(1)
    });
    assert_eq!(no_iso.madt().len(), 44 + 8 + 12 + 6);
    // 0 vCPUs is clamped to one, never an empty MADT.
    assert_eq!(create_tables(&params(0)).madt().len(), 44 + 8 + 12 + 10 + 6);
}

#[test]
fn mcfg_has_one_ecam_region() {
    let p = AcpiParams {
        ecam_base: 0xb000_0000,
        ..AcpiParams::default()
    };
    let m = create_tables(&p).mcfg().to_vec();
    assert_eq!(m.len(), 44 + 16);
    assert_eq!(u64_at(&m, 44), 0xb000_0000);
    assert_eq!(&m[52..56], &[0, 0, 0, 255], "segment 0, buses 0..=255");
}

#[test]
fn dsdt_names_and_windows() {
    let p = AcpiParams {
        pci_mmio64: MmioWindow { base: 0, size: 0 },
        ..AcpiParams::default()
    };
    let d = create_tables(&p).dsdt().to_vec();
    let has = |needle: &[u8]| d.windows(needle.len()).any(|w| w == needle);
    for name in [
        &b"PCI0"[..],
        b"MBRD",
        b"COM1",
        b"PWRB",
        b"_S5_",
        b"_CRS",
        b"_BBN",
    ] {
        assert!(has(name), "{}", String::from_utf8_lossy(name));
    }
    // PNP0A08 as an EISA id: 0x080AD041.
    assert!(has(&[0x0c, 0x41, 0xd0, 0x0a, 0x08]));
    // The 32-bit window appears as min/max dwords; no QWord memory descriptor (0x8a).
    assert!(has(&0xc000_0000u32.to_le_bytes()) && has(&0xdfff_ffffu32.to_le_bytes()));
    let with64 = create_tables(&AcpiParams::default()).dsdt().to_vec();
    assert!(with64.len() > d.len());
}

#[test]
fn sleep_register_decoding() {
    assert_eq!(POWEROFF_VALUE, 0x34);
    assert_eq!(decode_sleep_write(0x34), Some(SleepAction::PowerOff));
    assert_eq!(decode_sleep_write(RESET_VALUE), Some(SleepAction::Reset));
    assert_eq!(decode_sleep_write(5 << 2), None, "no SLP_EN");
    // Linux clears WAK_STS (bit 7, same port) before the sleep write.
    assert_eq!(decode_sleep_write(0x80), None, "WAK_STS clear");
    assert_eq!(decode_sleep_write((3 << 2) | SLP_EN), None, "S3 ignored");
}

#[test]
fn writes_into_guest_memory() {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
    let t = create_tables(&params(4));
    let l = t
        .write_to_guest(&mem, GuestAddress(RSDP_REGION_START))
        .unwrap();
    let mut back = vec![0u8; l.bytes.len()];
    mem.read_slice(&mut back, GuestAddress(RSDP_REGION_START))
        .unwrap();
    assert_eq!(back, l.bytes);
    // Past the end of memory: an error, not a panic.
    assert!(matches!(
        t.write_to_guest(&mem, GuestAddress((1 << 20) - 64)),
        Err(AcpiError::GuestMemory { .. })
    ));
}
