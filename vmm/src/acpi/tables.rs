//! The fixed-layout tables: FADT (hardware-reduced), MADT and MCFG.

use acpi_tables::Aml;
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{EnabledStatus, IoApic, ProcessorLocalApic};
use acpi_tables::mcfg::MCFG;
use acpi_tables::sdt::Sdt;

use super::{AcpiParams, IOAPIC_ADDR, LAPIC_ADDR, MAX_VCPUS, OEM_ID, RESET_VALUE};

/// Offset of `X_DSDT` (64-bit DSDT address) in the FADT.
pub(super) const FADT_X_DSDT_OFFSET: usize = 140;
/// FADT `IAPC_BOOT_ARCH`: VGA not present. Bit 1 (8042) stays clear, so Linux does not
/// probe for a keyboard controller; bit 3 (MSI not supported) stays clear.
const IAPC_BOOT_ARCH_VGA_NOT_PRESENT: u16 = 1 << 2;
/// Hypervisor vendor identity in the FADT (ACPI 6.0+).
const HYPERVISOR_VENDOR: [u8; 8] = *b"RUSTVMM\0";

/// Builds the FADT (revision 6.5, hardware-reduced) with `X_DSDT` left zero; the layout
/// step patches it.
pub(super) fn fadt(p: &AcpiParams) -> Vec<u8> {
    let reg = GAS::new(
        AddressSpace::SystemIo,
        8,
        0,
        AccessSize::ByteAccess,
        u64::from(p.sleep_port),
    );
    let mut b = FADTBuilder::new(OEM_ID, *b"VMMFACP ", 1)
        .dsdt_64(0)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::ResetRegSup)
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton);
    b.iapc_boot_arch = IAPC_BOOT_ARCH_VGA_NOT_PRESENT.into();
    b.reset_reg = reg;
    b.reset_value = RESET_VALUE;
    b.sleep_control_reg = reg;
    b.sleep_status_reg = reg;
    b.hypervisor_vendor_identity = u64::from_le_bytes(HYPERVISOR_VENDOR).into();
    let mut out = Vec::new();
    b.finalize().to_aml_bytes(&mut out);
    out
}

/// MADT flag: the platform also has dual 8259s (KVM's in-kernel irqchip does).
const MADT_PCAT_COMPAT: u32 = 1;
/// Interrupt Source Override: polarity and trigger "conform to the bus" (ISA: edge, high).
const MPS_INTI_CONFORMS: u16 = 0;

/// Builds the MADT: one local APIC per vCPU (APIC ID = vCPU index), the IOAPIC, the
/// ISA interrupt source overrides and a LINT1 NMI for every processor.
pub(super) fn madt(p: &AcpiParams) -> Vec<u8> {
    let mut madt = Sdt::new(*b"APIC", 44, 5, OEM_ID, *b"VMMMADT ", 1);
    madt.write_u32(36, LAPIC_ADDR);
    madt.write_u32(40, MADT_PCAT_COMPAT);
    let mut body = Vec::new();
    let n = p.num_vcpus.clamp(1, MAX_VCPUS);
    for cpu in 0..n {
        ProcessorLocalApic::new(cpu, cpu, EnabledStatus::Enabled).to_aml_bytes(&mut body);
    }
    IoApic::new(0, IOAPIC_ADDR, 0).to_aml_bytes(&mut body);
    if p.irq0_to_gsi2 {
        body.extend_from_slice(&interrupt_source_override(0, 2, MPS_INTI_CONFORMS));
    }
    // Local APIC NMI (type 4): all processors (UID 0xff), flags conform, LINT1.
    body.extend_from_slice(&[4, 6, 0xff, 0, 0, 1]);
    madt.append_slice(&body);
    madt.as_slice().to_vec()
}

/// MADT Interrupt Source Override (type 2) for ISA `irq` delivered on `gsi`.
fn interrupt_source_override(irq: u8, gsi: u32, flags: u16) -> [u8; 10] {
    let mut s = [0u8; 10];
    s[0] = 2; // type
    s[1] = 10; // length
    s[2] = 0; // bus: ISA
    s[3] = irq;
    s[4..8].copy_from_slice(&gsi.to_le_bytes());
    s[8..10].copy_from_slice(&flags.to_le_bytes());
    s
}

/// Builds the MCFG with one ECAM region: segment 0, buses 0..=255.
pub(super) fn mcfg(p: &AcpiParams) -> Vec<u8> {
    let mut mcfg = MCFG::new(OEM_ID, *b"VMMMCFG ", 1);
    mcfg.add_ecam(p.ecam_base, 0, 0, 255);
    let mut out = Vec::new();
    mcfg.to_aml_bytes(&mut out);
    out
}
