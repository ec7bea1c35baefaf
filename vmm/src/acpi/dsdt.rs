//! The DSDT: the PCI host bridge `\_SB.PCI0` (with its resource windows), the ECAM
//! reservation `\_SB.MBRD`, COM1, the power button, the `\_S5` sleep package and, with
//! hot plug, the slot objects in `PCI0` and the `GED0` event device ([`super::hotplug`]).

use acpi_tables::Aml;
use acpi_tables::aml::{
    AddressSpace, AddressSpaceCacheable, Device, EISAName, IO, Interrupt, Memory32Fixed, Name,
    Package, Path, ResourceTemplate, Scope, ZERO,
};
use acpi_tables::sdt::Sdt;

use super::hotplug;
use super::{AcpiParams, ECAM_SIZE, MmioWindow, OEM_ID, SLP_TYP_S5};

/// Already-encoded AML, placed as is among a scope's children.
struct RawAml(Vec<u8>);

impl Aml for RawAml {
    fn to_aml_bytes(&self, sink: &mut dyn acpi_tables::AmlSink) {
        sink.vec(&self.0);
    }
}

/// Legacy COM1 I/O base and IRQ (the serial port the VMM emulates).
pub const COM1_PORT: u16 = 0x3f8;
/// Legacy COM1 interrupt line.
pub const COM1_IRQ: u32 = 4;

/// One descriptor of a memory window, 32-bit when it fits below 4 GiB, 64-bit otherwise.
enum MemDesc {
    D32(AddressSpace<u32>),
    D64(AddressSpace<u64>),
}

impl MemDesc {
    /// Returns `None` for an empty window or one whose end overflows.
    fn new(w: MmioWindow) -> Option<Self> {
        if w.size == 0 {
            return None;
        }
        let end = w.base.checked_add(w.size - 1)?;
        match (u32::try_from(w.base), u32::try_from(end)) {
            // A 32-bit descriptor cannot carry a 4 GiB length (min 0, max 0xffff_ffff).
            (Ok(min), Ok(max)) if w.size < (1 << 32) => Some(Self::D32(AddressSpace::new_memory(
                AddressSpaceCacheable::NotCacheable,
                true,
                min,
                max,
                None,
            ))),
            _ => Some(Self::D64(AddressSpace::new_memory(
                AddressSpaceCacheable::NotCacheable,
                true,
                w.base,
                end,
                None,
            ))),
        }
    }

    fn as_aml(&self) -> &dyn Aml {
        match self {
            Self::D32(d) => d,
            Self::D64(d) => d,
        }
    }
}

/// Builds the DSDT (AML definition block) for `p`.
pub(super) fn build(p: &AcpiParams) -> Vec<u8> {
    let mut aml = Vec::new();
    sb_scope(p, &mut aml);
    // \_S5: SLP_TYPa, SLP_TYPb, reserved, reserved. With hardware-reduced ACPI the guest
    // writes (SLP_TYPa << 2) | SLP_EN to the FADT's sleep control register.
    let s5 = Package::new(vec![&SLP_TYP_S5, &0u8, &0u8, &0u8]);
    Name::new(Path::new("_S5_"), &s5).to_aml_bytes(&mut aml);

    let mut dsdt = Sdt::new(*b"DSDT", 36, 2, OEM_ID, *b"VMMDSDT ", 1);
    dsdt.append_slice(&aml);
    dsdt.as_slice().to_vec()
}

/// `Scope (\_SB) { PCI0, MBRD, COM1, PWRB }` appended to `aml`.
fn sb_scope(p: &AcpiParams, aml: &mut Vec<u8>) {
    let hid_pci = Name::new(Path::new("_HID"), &EISAName::new("PNP0A08"));
    let cid_pci = Name::new(Path::new("_CID"), &EISAName::new("PNP0A03"));
    let seg = Name::new(Path::new("_SEG"), &ZERO);
    let uid = Name::new(Path::new("_UID"), &ZERO);
    let bbn = Name::new(Path::new("_BBN"), &ZERO);

    let buses = AddressSpace::<u16>::new_bus_number(0, 255);
    let cfg_io = IO::new(0xcf8, 0xcf8, 1, 8);
    let io_lo = AddressSpace::<u16>::new_io(0x0000, 0x0cf7, None);
    let io_hi = AddressSpace::<u16>::new_io(0x0d00, 0xffff, None);
    let mmio32 = MemDesc::new(p.pci_mmio32);
    let mmio64 = MemDesc::new(p.pci_mmio64);
    let mut crs_items: Vec<&dyn Aml> = vec![&buses, &cfg_io, &io_lo, &io_hi];
    crs_items.extend(mmio32.as_ref().map(MemDesc::as_aml));
    crs_items.extend(mmio64.as_ref().map(MemDesc::as_aml));
    let pci_crs_rt = ResourceTemplate::new(crs_items);
    let pci_crs = Name::new(Path::new("_CRS"), &pci_crs_rt);
    let mut hp_objects = Vec::new();
    if let Some(hp) = &p.hotplug {
        hotplug::pci0_objects(hp, &mut hp_objects);
    }
    let hp_objects = RawAml(hp_objects);
    let pci0 = Device::new(
        Path::new("PCI0"),
        vec![&hid_pci, &cid_pci, &seg, &uid, &bbn, &pci_crs, &hp_objects],
    );

    // Motherboard resources: reserving the ECAM window here is what makes Linux trust
    // the MCFG ("MMCONFIG ... reserved as ACPI motherboard resource").
    let hid_mb = Name::new(Path::new("_HID"), &EISAName::new("PNP0C02"));
    let ecam32 = match (u32::try_from(p.ecam_base), u32::try_from(ECAM_SIZE)) {
        (Ok(base), Ok(size)) if base.checked_add(size - 1).is_some() => {
            Some(Memory32Fixed::new(true, base, size))
        }
        _ => None,
    };
    let ecam64 = MemDesc::new(MmioWindow {
        base: p.ecam_base,
        size: ECAM_SIZE,
    });
    let ecam_desc: Option<&dyn Aml> = match (&ecam32, &ecam64) {
        (Some(d), _) => Some(d),
        (None, Some(d)) => Some(d.as_aml()),
        (None, None) => None,
    };
    let hp_regs = p.hotplug.as_ref().and_then(hotplug::regs_resource);
    let mut mb_items: Vec<&dyn Aml> = ecam_desc.into_iter().collect();
    mb_items.extend(hp_regs.as_ref().map(|r| r as &dyn Aml));
    let mb_crs_rt = ResourceTemplate::new(mb_items);
    let mb_crs = Name::new(Path::new("_CRS"), &mb_crs_rt);
    let mbrd = Device::new(Path::new("MBRD"), vec![&hid_mb, &uid, &mb_crs]);

    let hid_com = Name::new(Path::new("_HID"), &EISAName::new("PNP0501"));
    let ddn_com = Name::new(Path::new("_DDN"), &"COM1");
    let com_io = IO::new(COM1_PORT, COM1_PORT, 0, 8);
    let com_irq = Interrupt::new(true, true, false, false, COM1_IRQ);
    let com_crs_rt = ResourceTemplate::new(vec![&com_io, &com_irq]);
    let com_crs = Name::new(Path::new("_CRS"), &com_crs_rt);
    let com1 = Device::new(Path::new("COM1"), vec![&hid_com, &uid, &ddn_com, &com_crs]);

    let hid_pwrb = Name::new(Path::new("_HID"), &EISAName::new("PNP0C0C"));
    let pwrb = Device::new(Path::new("PWRB"), vec![&hid_pwrb, &uid]);

    let mut ged = Vec::new();
    if let Some(hp) = &p.hotplug {
        hotplug::ged(hp, &mut ged);
    }
    let ged = RawAml(ged);
    Scope::new(Path::new("\\_SB_"), vec![&pci0, &mbrd, &com1, &pwrb, &ged]).to_aml_bytes(aml);
}
