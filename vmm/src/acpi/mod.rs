//! ACPI tables for the guest: RSDP (revision 2) -> XSDT -> { FACP, APIC, MCFG }, and
//! FACP -> DSDT.
//!
//! - **FADT**: revision 6.5, `HW_REDUCED_ACPI`, no FACS, no SCI. The sleep control, sleep
//!   status and reset registers are the same 8-bit I/O port, [`AcpiParams::sleep_port`]
//!   (default [`DEFAULT_SLEEP_PORT`] = 0x3c0). A guest powers off by writing
//!   [`POWEROFF_VALUE`] (`(SLP_TYP 5 << 2) | SLP_EN` = 0x34) there and resets by writing
//!   [`RESET_VALUE`] (0x01); Linux first writes 0x80 (clearing `WAK_STS`), which is
//!   to be ignored; reads may return 0. [`decode_sleep_write`] turns a byte written
//!   to that port into a [`SleepAction`] for the device model.
//! - **DSDT**: `\_SB.PCI0` (PNP0A08/PNP0A03, segment 0, buses 0..=255, the 0xCF8..0xCFF
//!   config ports, I/O 0..0xCF7 and 0xD00..0xFFFF, the 32-bit and 64-bit MMIO windows),
//!   `\_SB.MBRD` (PNP0C02 reserving the ECAM window), `\_SB.COM1` (PNP0501 at 0x3f8,
//!   IRQ 4), `\_SB.PWRB` (PNP0C0C), `\_S5` = {5, 0, 0, 0} and, with
//!   [`AcpiParams::hotplug`], ACPI PCI hot plug: slot objects in `PCI0` and a Generic
//!   Event Device `\_SB.GED0` (see [`HotplugAcpi`]).
//! - **MADT**: LAPIC at 0xFEE00000, one enabled local APIC per vCPU (APIC ID = index),
//!   the IOAPIC (ID 0) at 0xFEC00000 with GSI base 0, `PCAT_COMPAT`, a LINT1 NMI, and
//!   (with [`AcpiParams::irq0_to_gsi2`]) the ISA override IRQ0 -> GSI 2: the PIT must
//!   then reach IOAPIC pin 2, i.e. the GSI routing sends GSI 0 to IOAPIC pin 2, as QEMU
//!   does. (Linux on hardware-reduced ACPI installs no legacy PIC and skips PIT setup,
//!   so this matters only to other guests.)
//! - **MCFG**: one ECAM region at [`AcpiParams::ecam_base`] (default
//!   [`DEFAULT_ECAM_BASE`]), segment 0, buses 0..=255 ([`ECAM_SIZE`] bytes).
//!
//! The tables are built once ([`create_tables`]) and laid out at a guest address with
//! [`AcpiTables::layout`], which fills in the pointers and checksums. Put them at
//! [`RSDP_REGION_START`] (0xE0000) so a legacy RSDP scan finds them, mark that range
//! reserved in the e820 map, and hand the RSDP address to the kernel (PVH
//! `rsdp_paddr` / boot_params `acpi_rsdp_addr`) when the boot protocol has a field.

mod dsdt;
mod hotplug;
mod tables;
#[cfg(test)]
mod tests;

use acpi_tables::Aml;
use acpi_tables::rsdp::Rsdp;
use acpi_tables::xsdt::XSDT;
use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryError};

pub use dsdt::{COM1_IRQ, COM1_PORT};
pub use hotplug::{HotplugAcpi, SLOTS as HOTPLUG_SLOTS};

/// OEM ID written in every table.
pub const OEM_ID: [u8; 6] = *b"RSTVMM";
/// Default I/O port of the sleep control/status and reset register.
pub const DEFAULT_SLEEP_PORT: u16 = 0x3c0;
/// Sleep type of S5 (soft off), as in the DSDT's `\_S5` package.
pub const SLP_TYP_S5: u8 = 5;
/// `SLP_EN` bit of the hardware-reduced sleep control register.
pub const SLP_EN: u8 = 1 << 5;
/// The byte a guest writes to the sleep control register to power off.
pub const POWEROFF_VALUE: u8 = (SLP_TYP_S5 << 2) | SLP_EN;
/// The byte a guest writes to the reset register (same port) to reset.
pub const RESET_VALUE: u8 = 0x01;
/// Local APIC base address.
pub const LAPIC_ADDR: u32 = 0xfee0_0000;
/// IOAPIC base address (KVM's in-kernel IOAPIC).
pub const IOAPIC_ADDR: u32 = 0xfec0_0000;
/// Default ECAM base address.
pub const DEFAULT_ECAM_BASE: u64 = 0xe000_0000;
/// ECAM window size: 256 buses x 32 devices x 8 functions x 4 KiB.
pub const ECAM_SIZE: u64 = 256 << 20;
/// Most vCPUs the MADT describes (xAPIC IDs 0..=254; 255 is the broadcast ID).
pub const MAX_VCPUS: u8 = 254;
/// Start of the BIOS area a legacy RSDP scan searches (16-byte aligned).
pub const RSDP_REGION_START: u64 = 0xe_0000;
/// End (exclusive) of the BIOS area a legacy RSDP scan searches.
pub const RSDP_REGION_END: u64 = 0x10_0000;

/// Alignment of each table in the layout.
const TABLE_ALIGN: u64 = 16;

/// Errors of laying out or writing the tables.
#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    /// The RSDP must be 16-byte aligned.
    #[error("ACPI base address {0:#x} is not 16-byte aligned")]
    Misaligned(u64),
    /// The tables would run past the end of the address space.
    #[error("ACPI tables at {0:#x} overflow the address space")]
    Overflow(u64),
    /// Writing the tables into guest memory failed.
    #[error("writing ACPI tables at {addr:#x} into guest memory: {source}")]
    GuestMemory {
        /// Guest address of the write.
        addr: u64,
        /// What vm-memory reported.
        #[source]
        source: GuestMemoryError,
    },
}

/// A guest-physical address window.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MmioWindow {
    /// First address.
    pub base: u64,
    /// Length in bytes; 0 means "no window".
    pub size: u64,
}

/// What the tables describe.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AcpiParams {
    /// Number of vCPUs (clamped to 1..=[`MAX_VCPUS`]); APIC IDs are 0..num_vcpus.
    pub num_vcpus: u8,
    /// The PCI host bridge's MMIO window below 4 GiB (the PCI hole).
    pub pci_mmio32: MmioWindow,
    /// The PCI host bridge's MMIO window above 4 GiB (size 0: none).
    pub pci_mmio64: MmioWindow,
    /// ECAM base address (segment 0, buses 0..=255, [`ECAM_SIZE`] bytes).
    pub ecam_base: u64,
    /// I/O port of the sleep control/status and reset register.
    pub sleep_port: u16,
    /// Emit the ISA interrupt source override IRQ0 -> GSI 2 (the PIT on IOAPIC pin 2).
    pub irq0_to_gsi2: bool,
    /// PCI hot plug through the VMM's controller and a GED (`None`: no hot plug AML).
    pub hotplug: Option<HotplugAcpi>,
}

/// Default address of the hot plug controller's registers (platform MMIO).
pub const DEFAULT_HOTPLUG_BASE: u64 = 0xf000_0000;
/// Default GSI of the hot plug interrupt: IOAPIC pin 23, one of the pins (16..=23) with
/// no legacy PIC input, so only the IOAPIC sees it.
pub const DEFAULT_HOTPLUG_GSI: u32 = 23;

impl Default for AcpiParams {
    /// One vCPU, a 512 MiB 32-bit window at 0xC0000000 (just below the ECAM at
    /// 0xE0000000), a 64 GiB 64-bit window at 1 TiB, the sleep register on 0x3c0.
    fn default() -> Self {
        Self {
            num_vcpus: 1,
            pci_mmio32: MmioWindow {
                base: 0xc000_0000,
                size: 0x2000_0000,
            },
            pci_mmio64: MmioWindow {
                base: 1 << 40,
                size: 64 << 30,
            },
            ecam_base: DEFAULT_ECAM_BASE,
            sleep_port: DEFAULT_SLEEP_PORT,
            irq0_to_gsi2: true,
            hotplug: Some(HotplugAcpi {
                regs_base: DEFAULT_HOTPLUG_BASE,
                gsi: DEFAULT_HOTPLUG_GSI,
            }),
        }
    }
}

/// What a byte written to the sleep control / reset register asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SleepAction {
    /// Enter S5: power off.
    PowerOff,
    /// Reset (reboot) the machine.
    Reset,
}

/// Decodes a guest write to [`AcpiParams::sleep_port`]: `SLP_EN` with `SLP_TYP` 5 is a
/// power-off, [`RESET_VALUE`] a reset; anything else (other sleep states) is ignored.
pub fn decode_sleep_write(value: u8) -> Option<SleepAction> {
    if value & SLP_EN != 0 && (value >> 2) & 0x7 == SLP_TYP_S5 {
        Some(SleepAction::PowerOff)
    } else if value == RESET_VALUE {
        Some(SleepAction::Reset)
    } else {
        None
    }
}

/// The tables of one VM, before they are given addresses.
#[derive(Clone, Debug)]
pub struct AcpiTables {
    dsdt: Vec<u8>,
    fadt: Vec<u8>,
    madt: Vec<u8>,
    mcfg: Vec<u8>,
}

/// Builds the DSDT, FADT, MADT and MCFG for `params`.
pub fn create_tables(params: &AcpiParams) -> AcpiTables {
    if params.num_vcpus == 0 || params.num_vcpus > MAX_VCPUS {
        tracing::warn!(
            num_vcpus = params.num_vcpus,
            "ACPI MADT: vCPU count clamped to 1..={MAX_VCPUS}"
        );
    }
    AcpiTables {
        dsdt: dsdt::build(params),
        fadt: tables::fadt(params),
        madt: tables::madt(params),
        mcfg: tables::mcfg(params),
    }
}

/// One table placed in guest memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PlacedTable {
    /// Table signature (`RSD ` for the RSDP, whose real signature is `RSD PTR `).
    pub signature: [u8; 4],
    /// Guest-physical address.
    pub addr: u64,
    /// Length in bytes.
    pub len: usize,
}

/// The tables laid out at a base address, pointers and checksums filled in.
#[derive(Clone, Debug)]
pub struct AcpiLayout {
    /// Guest address of the RSDP (the base address).
    pub rsdp_addr: u64,
    /// Every table with its address, in layout order (RSDP, XSDT, FACP, DSDT, APIC, MCFG).
    pub tables: Vec<PlacedTable>,
    /// The bytes to copy to `rsdp_addr` (gaps between tables are zero).
    pub bytes: Vec<u8>,
}

impl AcpiLayout {
    /// Guest address just past the last table.
    pub fn end(&self) -> u64 {
        self.rsdp_addr + self.bytes.len() as u64
    }
}

impl AcpiTables {
    /// The DSDT as built (no pointers to fix).
    pub fn dsdt(&self) -> &[u8] {
        &self.dsdt
    }

    /// The FADT as built, with `X_DSDT` still zero (see [`AcpiTables::layout`]).
    pub fn fadt(&self) -> &[u8] {
        &self.fadt
    }

    /// The MADT.
    pub fn madt(&self) -> &[u8] {
        &self.madt
    }

    /// The MCFG.
    pub fn mcfg(&self) -> &[u8] {
        &self.mcfg
    }

    /// Lays the tables out from `base` (16-byte aligned): RSDP first, then XSDT, FACP,
    /// DSDT, APIC and MCFG, each 16-byte aligned, with the RSDP -> XSDT -> tables and
    /// FACP -> DSDT pointers and every checksum filled in.
    pub fn layout(&self, base: u64) -> Result<AcpiLayout, AcpiError> {
        if !base.is_multiple_of(TABLE_ALIGN) {
            return Err(AcpiError::Misaligned(base));
        }
        // XSDT: header + one 8-byte entry per table it lists (FACP, APIC, MCFG).
        let xsdt_len = 36 + 3 * 8;
        let sizes = [
            Rsdp::len(),
            xsdt_len,
            self.fadt.len(),
            self.dsdt.len(),
            self.madt.len(),
            self.mcfg.len(),
        ];
        let mut addrs = [0u64; 6];
        let mut next = base;
        for (addr, size) in addrs.iter_mut().zip(sizes) {
            *addr = next;
            next = next
                .checked_add(size as u64)
                .and_then(|e| e.checked_next_multiple_of(TABLE_ALIGN))
                .ok_or(AcpiError::Overflow(base))?;
        }
        let [rsdp_a, xsdt_a, fadt_a, dsdt_a, madt_a, mcfg_a] = addrs;

        let mut fadt = self.fadt.clone();
        fadt[tables::FADT_X_DSDT_OFFSET..tables::FADT_X_DSDT_OFFSET + 8]
            .copy_from_slice(&dsdt_a.to_le_bytes());
        fix_checksum(&mut fadt);

        let mut xsdt = XSDT::new(OEM_ID, *b"VMMXSDT ", 1);
        for a in [fadt_a, madt_a, mcfg_a] {
            xsdt.add_entry(a);
        }
        let mut xsdt_bytes = Vec::new();
        xsdt.to_aml_bytes(&mut xsdt_bytes);
        let mut rsdp_bytes = Vec::new();
        Rsdp::new(OEM_ID, xsdt_a).to_aml_bytes(&mut rsdp_bytes);

        let parts: [(&[u8; 4], u64, &[u8]); 6] = [
            (b"RSD ", rsdp_a, &rsdp_bytes),
            (b"XSDT", xsdt_a, &xsdt_bytes),
            (b"FACP", fadt_a, &fadt),
            (b"DSDT", dsdt_a, &self.dsdt),
            (b"APIC", madt_a, &self.madt),
            (b"MCFG", mcfg_a, &self.mcfg),
        ];
        let total = usize::try_from(next - base).map_err(|_| AcpiError::Overflow(base))?;
        let mut bytes = vec![0u8; total];
        let mut placed = Vec::with_capacity(parts.len());
        for (sig, addr, data) in parts {
            // `addr - base + data.len() <= total` by construction of `addrs`.
            let off = usize::try_from(addr - base).map_err(|_| AcpiError::Overflow(addr))?;
            bytes[off..off + data.len()].copy_from_slice(data);
            placed.push(PlacedTable {
                signature: *sig,
                addr,
                len: data.len(),
            });
        }
        Ok(AcpiLayout {
            rsdp_addr: base,
            tables: placed,
            bytes,
        })
    }

    /// Lays the tables out at `base` and writes them into `mem`; returns the layout (its
    /// `rsdp_addr` is `base`).
    pub fn write_to_guest<M: GuestMemory + ?Sized>(
        &self,
        mem: &M,
        base: GuestAddress,
    ) -> Result<AcpiLayout, AcpiError> {
        let layout = self.layout(base.0)?;
        mem.write_slice(&layout.bytes, base)
            .map_err(|source| AcpiError::GuestMemory {
                addr: base.0,
                source,
            })?;
        tracing::debug!(
            rsdp = format_args!("{:#x}", layout.rsdp_addr),
            end = format_args!("{:#x}", layout.end()),
            "ACPI tables written"
        );
        Ok(layout)
    }
}

/// Recomputes the checksum byte (offset 9) of an ACPI table so its bytes sum to 0.
fn fix_checksum(table: &mut [u8]) {
    if table.len() < 10 {
        return;
    }
    table[9] = 0;
    let sum = table.iter().fold(0u8, |acc, b| acc.wrapping_add(*b));
    table[9] = sum.wrapping_neg();
}
