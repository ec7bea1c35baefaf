//! AML for PCI hot plug on a hardware-reduced ACPI machine.
//!
//! - In `\_SB.PCI0`: the register block of the VMM's hot plug controller as an
//!   `OperationRegion` (`PCIU`, `PCID`, `B0EJ`, `PRES`; see
//!   [`devices::pci::HotplugController`]), a mutex `BLCK`, `PCEJ(slot)` that writes the
//!   slot's bit to `B0EJ`, `PCNT()` that reads `PCIU`/`PCID` once and sends `Notify(Snn, 1)`
//!   (device check: rescan the slot) or `Notify(Snn, 3)` (eject request) per set bit, and
//!   a `Device (Snn)` with `_ADR`, `_SUN` and `_EJ0` for each slot 1..=31. Linux's
//!   acpiphp driver binds to these slots: a device check makes it scan the slot and
//!   probe the new function; an eject request makes it unbind the driver (which resets
//!   the virtio device), remove the function and call `_EJ0`.
//! - `\_SB.GED0`: a Generic Event Device (`ACPI0013`, the hardware-reduced replacement
//!   for GPEs) whose edge-triggered interrupt runs `_EVT`, which calls `PCNT`.

use acpi_tables::Aml;
use acpi_tables::aml::{
    Acquire, And, Device, FieldAccessType, FieldEntry, FieldLockRule, FieldUpdateRule, If,
    Interrupt, Local, Method, MethodCall, Mutex, Name, Notify, ONE, OpRegion, OpRegionSpace, Path,
    Release, ResourceTemplate, ShiftLeft, Store, ZERO,
};

/// Where the controller's registers are and which GSI its interrupt uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HotplugAcpi {
    /// Guest-physical address of the register block (16 bytes).
    pub regs_base: u64,
    /// GSI (IOAPIC pin) of the GED's interrupt, edge-triggered, active high.
    pub gsi: u32,
}

/// Slots the AML describes (slot 0 is the host bridge).
pub const SLOTS: std::ops::RangeInclusive<u8> = 1..=31;

/// Bytes of the register block (`PCIU`, `PCID`, `B0EJ`, `PRES`).
const REGS_LEN: u32 = 16;
/// `Notify` value: device check (a device may have appeared).
const DEVICE_CHECK: u8 = 1;
/// `Notify` value: eject request.
const EJECT_REQUEST: u8 = 3;

fn slot_name(slot: u8) -> String {
    format!("S{slot:02X}_")
}

/// The hot plug objects to put inside `Device (PCI0)`, appended to `out`.
pub(super) fn pci0_objects(hp: &HotplugAcpi, out: &mut Vec<u8>) {
    let base = hp.regs_base;
    let len = REGS_LEN;
    OpRegion::new(Path::new("PCST"), OpRegionSpace::SystemMemory, &base, &len).to_aml_bytes(out);
    acpi_tables::aml::Field::new(
        Path::new("PCST"),
        FieldAccessType::DWord,
        FieldLockRule::NoLock,
        FieldUpdateRule::WriteAsZeroes,
        vec![
            FieldEntry::Named(*b"PCIU", 32),
            FieldEntry::Named(*b"PCID", 32),
            FieldEntry::Named(*b"B0EJ", 32),
            FieldEntry::Named(*b"PRES", 32),
        ],
    )
    .to_aml_bytes(out);
    Mutex::new(Path::new("BLCK"), 0).to_aml_bytes(out);

    // PCEJ(slot): B0EJ = 1 << slot, under the lock.
    let acquire = Acquire::new(Path::new("BLCK"), 0xffff);
    let release = Release::new(Path::new("BLCK"));
    let b0ej = Path::new("B0EJ");
    let arg0 = acpi_tables::aml::Arg(0);
    let shift = ShiftLeft::new(&b0ej, &ONE, &arg0);
    Method::new(
        Path::new("PCEJ"),
        1,
        false,
        vec![&acquire, &shift, &release],
    )
    .to_aml_bytes(out);

    // PCNT(): read both bitmaps once (reads clear them), then notify per slot.
    let (up, down) = (Local(0), Local(1));
    let (pciu, pcid) = (Path::new("PCIU"), Path::new("PCID"));
    let read_up = Store::new(&up, &pciu);
    let read_down = Store::new(&down, &pcid);
    let bits: Vec<u32> = SLOTS.map(|s| 1u32 << s).collect();
    let names: Vec<Path> = SLOTS.map(|s| Path::new(&slot_name(s))).collect();
    let up_tests: Vec<And> = bits.iter().map(|b| And::new(&ZERO, &up, b)).collect();
    let down_tests: Vec<And> = bits.iter().map(|b| And::new(&ZERO, &down, b)).collect();
    let up_notify: Vec<Notify> = names
        .iter()
        .map(|n| Notify::new(n, &DEVICE_CHECK))
        .collect();
    let down_notify: Vec<Notify> = names
        .iter()
        .map(|n| Notify::new(n, &EJECT_REQUEST))
        .collect();
    let mut ifs: Vec<If> = Vec::new();
    for i in 0..names.len() {
        ifs.push(If::new(&up_tests[i], vec![&up_notify[i]]));
        ifs.push(If::new(&down_tests[i], vec![&down_notify[i]]));
    }
    let mut body: Vec<&dyn Aml> = vec![&acquire, &read_up, &read_down, &release];
    body.extend(ifs.iter().map(|i| i as &dyn Aml));
    Method::new(Path::new("PCNT"), 0, true, body).to_aml_bytes(out);

    // Device (Snn) { _ADR, _SUN, _EJ0 } per slot.
    for slot in SLOTS {
        let adr = Name::new(Path::new("_ADR"), &(u32::from(slot) << 16));
        let sun = Name::new(Path::new("_SUN"), &u32::from(slot));
        let slot_arg = u32::from(slot);
        let call = MethodCall::new(Path::new("PCEJ"), vec![&slot_arg]);
        let ej0 = Method::new(Path::new("_EJ0"), 1, false, vec![&call]);
        Device::new(Path::new(&slot_name(slot)), vec![&adr, &sun, &ej0]).to_aml_bytes(out);
    }
}

/// `Device (GED0)` for `\_SB`, appended to `out`.
pub(super) fn ged(hp: &HotplugAcpi, out: &mut Vec<u8>) {
    let hid = Name::new(Path::new("_HID"), &"ACPI0013");
    let uid = Name::new(Path::new("_UID"), &ZERO);
    let irq = Interrupt::new(true, true, false, false, hp.gsi);
    let crs_rt = ResourceTemplate::new(vec![&irq]);
    let crs = Name::new(Path::new("_CRS"), &crs_rt);
    let call = MethodCall::new(Path::new("\\_SB_.PCI0.PCNT"), vec![]);
    let evt = Method::new(Path::new("_EVT"), 1, true, vec![&call]);
    Device::new(Path::new("GED0"), vec![&hid, &uid, &crs, &evt]).to_aml_bytes(out);
}

/// The register block as a motherboard resource (a `Memory32Fixed` when below 4 GiB).
pub(super) fn regs_resource(hp: &HotplugAcpi) -> Option<acpi_tables::aml::Memory32Fixed> {
    let base = u32::try_from(hp.regs_base).ok()?;
    base.checked_add(REGS_LEN - 1)?;
    Some(acpi_tables::aml::Memory32Fixed::new(true, base, REGS_LEN))
}
