//! The kernel loader on real images (no KVM needed): the test guest ELF (PVH), the Debian
//! cloud kernel's bzImage (Linux 64-bit boot protocol) and the ELF vmlinux extracted from it
//! (PVH). Each check reads the boot structures back from guest memory. Booting these
//! images on KVM is vmm/tests/linux_boot.rs.

// Test data and figures, not guest input.
#![allow(clippy::cast_possible_truncation, clippy::cast_lossless)]

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm::boot::{
    BootLayout, CMDLINE_ADDR, E820_RAM, E820_RESERVED, MemmapEntry, PVH_INFO_ADDR,
    START_INFO_MAGIC, ZERO_PAGE_ADDR, load_kernel, memory_map,
};
use vmm::config::PayloadConfig;
use vmm::kvm::EntryMode;
use vmm::memory::GuestRam;

use tests::vmlinux;

const MIB: u64 = 1 << 20;

use tests::skip::skip;

fn layout(ram: &GuestRam) -> BootLayout {
    BootLayout {
        ram: ram.regions().to_vec(),
        rsdp_addr: 0xe0000,
        reserved: vec![
            (0xe0000, 0x20000),
            (vmm::memory::ECAM_START, vmm::memory::ECAM_SIZE),
        ],
    }
}

fn read<T: vm_memory::ByteValued>(mem: &GuestMemoryMmap<()>, addr: u64) -> T {
    mem.read_obj(GuestAddress(addr)).unwrap()
}

fn read_cstr(mem: &GuestMemoryMmap<()>, addr: u64) -> String {
    let mut s = Vec::new();
    for a in addr.. {
        let b: u8 = read(mem, a);
        if b == 0 {
            break;
        }
        s.push(b);
    }
    String::from_utf8(s).unwrap()
}

/// Every PT_LOAD segment of `elf` is in guest memory at its physical address.
fn assert_segments_loaded(mem: &GuestMemoryMmap<()>, elf: &[u8]) -> usize {
    let u64_at = |o: usize| u64::from_le_bytes(elf[o..o + 8].try_into().unwrap());
    let phoff = u64_at(32) as usize;
    let phnum = u16::from_le_bytes([elf[56], elf[57]]) as usize;
    let mut n = 0;
    for i in 0..phnum {
        let ph = phoff + i * 56;
        if u32::from_le_bytes(elf[ph..ph + 4].try_into().unwrap()) != 1 {
            continue;
        }
        let (off, paddr, filesz) = (u64_at(ph + 8), u64_at(ph + 24), u64_at(ph + 32));
        let want = &elf[off as usize..(off + filesz) as usize];
        let mut got = vec![0u8; want.len()];
        mem.read_slice(&mut got, GuestAddress(paddr)).unwrap();
        assert!(got == want, "segment {i} at {paddr:#x} differs");
        n += 1;
    }
    n
}

/// Checks `hvm_start_info` at [`PVH_INFO_ADDR`] and returns the module list.
fn check_start_info(
    mem: &GuestMemoryMmap<()>,
    cmdline: &str,
    map: &[MemmapEntry],
) -> Vec<(u64, u64)> {
    let at = |off| PVH_INFO_ADDR + off;
    assert_eq!(read::<u32>(mem, at(0)), START_INFO_MAGIC);
    assert_eq!(read::<u32>(mem, at(4)), 1, "version");
    assert_eq!(read::<u64>(mem, at(32)), 0xe0000, "rsdp_paddr");
    let cmd = read::<u64>(mem, at(24));
    assert_eq!(cmd, CMDLINE_ADDR);
    assert_eq!(read_cstr(mem, cmd), cmdline);
    let memmap = read::<u64>(mem, at(40));
    let entries = read::<u32>(mem, at(48)) as usize;
    assert_eq!(entries, map.len());
    for (i, e) in map.iter().enumerate() {
        let a = memmap + 24 * i as u64;
        assert_eq!(
            (
                read::<u64>(mem, a),
                read::<u64>(mem, a + 8),
                read::<u32>(mem, a + 16)
            ),
            (e.addr, e.size, e.kind),
            "memmap[{i}]"
        );
    }
    let nr = read::<u32>(mem, at(12)) as u64;
    let modlist = read::<u64>(mem, at(16));
    (0..nr)
        .map(|i| {
            let a = modlist + 32 * i;
            (read::<u64>(mem, a), read::<u64>(mem, a + 8))
        })
        .collect()
}

#[test]
fn test_guest_elf_boots_through_pvh() {
    let elf = tests::test_guest::build().unwrap_or_else(|e| panic!("{e}"));
    let ram = GuestRam::new(256 * MIB, false).unwrap();
    let layout = layout(&ram);
    let cmdline = "exit=acpi ms=100";
    let payload = PayloadConfig {
        kernel: elf.clone(),
        initramfs: None,
        cmdline: cmdline.into(),
    };
    let info = load_kernel(ram.memory(), &payload, &layout).unwrap();
    assert_eq!(info.entry, EntryMode::Protected32);
    assert_eq!(info.regs.rip, u64::from(vmlinux::pvh_entry(&elf).unwrap()));
    assert_eq!(info.regs.rbx, PVH_INFO_ADDR);
    let map = memory_map(&layout).unwrap();
    // RAM 0..0xe0000, ACPI reserved, RAM 1 MiB..256 MiB, ECAM reserved.
    let kinds: Vec<u32> = map.iter().map(|e| e.kind).collect();
    assert_eq!(kinds, [E820_RAM, E820_RESERVED, E820_RAM, E820_RESERVED]);
    assert!(check_start_info(ram.memory(), cmdline, &map).is_empty());
    let bytes = std::fs::read(&elf).unwrap();
    assert!(assert_segments_loaded(ram.memory(), &bytes) >= 1);
}

#[test]
fn debian_bzimage_boots_through_the_linux_protocol() {
    let Some(bz) = vmlinux::find_bzimage() else {
        return skip(
            "debian_bzimage_boots_through_the_linux_protocol",
            "no /boot/vmlinuz-*-cloud-amd64 (apt-get install linux-image-cloud-amd64)",
        );
    };
    let initrd = std::fs::read_dir("/boot")
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.to_string_lossy().contains("initrd.img-"));
    // Any file will do as an initramfs; the real one when there is one.
    let fake = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(fake.path(), vec![0x5a; 3 * MIB as usize + 123]).unwrap();
    let initrd = initrd.unwrap_or_else(|| fake.path().to_path_buf());
    let ram = GuestRam::new(512 * MIB, false).unwrap();
    let layout = layout(&ram);
    let cmdline = "console=ttyS0 earlyprintk=ttyS0 panic=-1 acpi=on";
    let payload = PayloadConfig {
        kernel: bz.clone(),
        initramfs: Some(initrd.clone()),
        cmdline: cmdline.into(),
    };
    let mem = ram.memory();
    let info = load_kernel(mem, &payload, &layout).unwrap();
    assert_eq!(info.entry, EntryMode::Long64);
    assert_eq!(info.regs.rip, 0x10_0200);
    assert_eq!(info.regs.rsi, ZERO_PAGE_ADDR);

    let zp = |off: u64| ZERO_PAGE_ADDR + off;
    assert_eq!(&read::<[u8; 4]>(mem, zp(0x202)), b"HdrS");
    assert_eq!(read::<u16>(mem, zp(0x1fe)), 0xaa55);
    assert_eq!(read::<u8>(mem, zp(0x210)), 0xff, "type_of_loader");
    assert_eq!(read::<u8>(mem, zp(0x211)) & 1, 1, "LOADED_HIGH");
    assert_eq!(read::<u32>(mem, zp(0x214)), 0x10_0000, "code32_start");
    assert_eq!(read::<u64>(mem, zp(0x70)), 0xe0000, "acpi_rsdp_addr");
    let cmd = read::<u32>(mem, zp(0x228));
    assert_eq!(u64::from(cmd), CMDLINE_ADDR);
    assert_eq!(read_cstr(mem, u64::from(cmd)), cmdline);

    let map = memory_map(&layout).unwrap();
    let n = read::<u8>(mem, zp(0x1e8)) as usize;
    assert_eq!(n, map.len());
    for (i, e) in map.iter().enumerate() {
        let a = zp(0x2d0 + 20 * i as u64);
        assert_eq!(
            (
                read::<u64>(mem, a),
                read::<u64>(mem, a + 8),
                read::<u32>(mem, a + 16)
            ),
            (e.addr, e.size, e.kind),
            "e820[{i}]"
        );
    }

    // The initramfs: page-aligned, at the top of RAM, below initrd_addr_max, intact.
    let (image, size) = (read::<u32>(mem, zp(0x218)), read::<u32>(mem, zp(0x21c)));
    let want = std::fs::read(&initrd).unwrap();
    assert_eq!(size as usize, want.len());
    assert_eq!(image % 4096, 0);
    let end = u64::from(image) + u64::from(size);
    assert!(
        end <= 512 * MIB && 512 * MIB - end < 4096,
        "{image:#x}+{size:#x}"
    );
    assert!(
        end - 1 <= u64::from(read::<u32>(mem, zp(0x22c))),
        "initrd_addr_max"
    );
    let mut got = vec![0u8; want.len()];
    mem.read_slice(&mut got, GuestAddress(u64::from(image)))
        .unwrap();
    assert!(got == want, "initramfs content");

    // The protected-mode kernel sits at 1 MiB.
    let file = std::fs::read(&bz).unwrap();
    let setup = (usize::from(file[0x1f1].max(4)) + 1) * 512;
    let mut got = vec![0u8; file.len() - setup];
    mem.read_slice(&mut got, GuestAddress(0x10_0000)).unwrap();
    assert!(got == file[setup..], "kernel image at 1 MiB");
}

#[test]
fn debian_vmlinux_boots_through_pvh() {
    let Some(bz) = vmlinux::find_bzimage() else {
        return skip(
            "debian_vmlinux_boots_through_pvh",
            "no /boot/vmlinuz-*-cloud-amd64 (apt-get install linux-image-cloud-amd64)",
        );
    };
    let elf = match vmlinux::extract(&bz, &vmlinux::default_cache()) {
        Ok(p) => p,
        Err(e) if e.contains("lz4 missing") => return skip("debian_vmlinux_boots_through_pvh", &e),
        Err(e) => panic!("{e}"),
    };
    let entry = vmlinux::pvh_entry(&elf).unwrap();
    let ram = GuestRam::new(512 * MIB, false).unwrap();
    let layout = layout(&ram);
    let initrd = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(initrd.path(), vec![0xa5; 1_000_001]).unwrap();
    let cmdline = "console=ttyS0";
    let payload = PayloadConfig {
        kernel: elf.clone(),
        initramfs: Some(initrd.path().to_path_buf()),
        cmdline: cmdline.into(),
    };
    let mem = ram.memory();
    let info = load_kernel(mem, &payload, &layout).unwrap();
    assert_eq!(info.entry, EntryMode::Protected32);
    assert_eq!(info.regs.rip, u64::from(entry));
    assert_eq!(info.regs.rbx, PVH_INFO_ADDR);
    let map = memory_map(&layout).unwrap();
    let modules = check_start_info(mem, cmdline, &map);
    assert_eq!(modules.len(), 1);
    let (paddr, size) = modules[0];
    assert_eq!(size, 1_000_001);
    assert_eq!(paddr % 4096, 0);
    assert!(paddr + size <= 512 * MIB);
    assert_eq!(read::<u8>(mem, paddr + size - 1), 0xa5);
    let bytes = std::fs::read(&elf).unwrap();
    assert_eq!(assert_segments_loaded(mem, &bytes), 4);
}

#[test]
fn truncated_vmlinux_is_refused() {
    let Some(bz) = vmlinux::find_bzimage() else {
        return skip("truncated_vmlinux_is_refused", "no Debian cloud kernel");
    };
    let Ok(elf) = vmlinux::extract(&bz, &vmlinux::default_cache()) else {
        return skip(
            "truncated_vmlinux_is_refused",
            "vmlinux could not be extracted (lz4?)",
        );
    };
    let bytes = std::fs::read(&elf).unwrap();
    let ram = GuestRam::new(128 * MIB, false).unwrap();
    let layout = layout(&ram);
    for cut in [100, 4096, bytes.len() / 2, bytes.len() - 5 * MIB as usize] {
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), &bytes[..cut]).unwrap();
        let payload = PayloadConfig {
            kernel: f.path().to_path_buf(),
            initramfs: None,
            cmdline: String::new(),
        };
        let err = load_kernel(ram.memory(), &payload, &layout).unwrap_err();
        assert!(
            err.to_string().contains(&f.path().display().to_string()),
            "{err}"
        );
    }
}
