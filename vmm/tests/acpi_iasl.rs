//! The ACPI tables checked by ACPICA's disassembler (`iasl -d`, Debian package
//! `acpica-tools`): every table disassembles with no error, the FADT shows the
//! hardware-reduced flag and the sleep registers, the DSDT names the PCI host bridge and
//! `\_S5`, and the disassembled DSDT compiles back with no error and no warning.

#![allow(clippy::cast_possible_truncation)] // Test data and figures, not guest input.

use std::path::Path;
use std::process::{Command, Output};

use vmm::acpi::{AcpiParams, MmioWindow, RSDP_REGION_START, create_tables};

/// Runs `iasl` with `args` in `dir`; `None` when iasl is not installed.
fn iasl(dir: &Path, args: &[&str]) -> Option<Output> {
    match Command::new("iasl").args(args).current_dir(dir).output() {
        Ok(o) => Some(o),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => panic!("running iasl: {e}"),
    }
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Lines of iasl's report or disassembly that flag a problem (an error, a firmware
/// warning, an incorrect checksum or length), other than the "0 Errors" summary.
fn error_lines(report: &str) -> Vec<&str> {
    report
        .lines()
        .filter(|l| {
            ["Error", "Warning", "Incorrect", "Invalid"]
                .iter()
                .any(|w| l.contains(w))
                && !l.contains(" 0 Errors")
        })
        .collect()
}

/// Disassembles `bytes` as `name.dat` in `dir`; returns iasl's report and the .dsl text.
fn disassemble_one(dir: &Path, name: &str, bytes: &[u8]) -> (Output, String) {
    let dat = format!("{name}.dat");
    std::fs::write(dir.join(&dat), bytes).expect("write .dat");
    let o = iasl(dir, &["-d", &dat]).expect("iasl present");
    let dsl = std::fs::read_to_string(dir.join(format!("{name}.dsl")))
        .unwrap_or_else(|e| panic!("{name}.dsl: {e}\n{}", text(&o)));
    (o, dsl)
}

/// Whether `iasl` is missing; prints test `test`'s `SKIP` line then.
fn skip_if_no_iasl(test: &str) -> bool {
    if iasl(Path::new("."), &["-v"]).is_none() {
        tests::skip::skip(
            test,
            "iasl not found; `apt-get install acpica-tools` to check the ACPI tables",
        );
        return true;
    }
    false
}

/// Disassembles every table of a layout for `params`; returns (signature, .dsl text).
fn disassemble(params: &AcpiParams) -> Vec<(String, String)> {
    let tables = create_tables(params);
    let layout = tables.layout(RSDP_REGION_START).expect("layout at 0xE0000");
    let dir = tempfile::tempdir().expect("tempdir");
    let mut out = Vec::new();
    for t in layout.tables.iter().filter(|t| &t.signature != b"RSD ") {
        let off = (t.addr - layout.rsdp_addr) as usize;
        let sig = String::from_utf8_lossy(&t.signature).to_lowercase();
        let (o, dsl) = disassemble_one(dir.path(), &sig, &layout.bytes[off..off + t.len]);
        let report = text(&o);
        assert!(o.status.success(), "iasl -d {sig}.dat failed:\n{report}");
        let errs = error_lines(&report);
        assert!(errs.is_empty(), "iasl -d {sig}.dat: {errs:?}\n{report}");
        let errs = error_lines(&dsl);
        assert!(errs.is_empty(), "{sig}.dsl: {errs:?}\n{dsl}");
        out.push((sig, dsl));
    }
    // The DSDT compiles back from its disassembly with no error.
    let o = iasl(dir.path(), &["-p", "dsdt-rt", "dsdt.dsl"]).expect("iasl present");
    let report = text(&o);
    assert!(o.status.success(), "recompiling dsdt.dsl:\n{report}");
    assert!(error_lines(&report).is_empty(), "{report}");
    assert!(report.contains(" 0 Errors, 0 Warnings"), "{report}");
    // VMM_ACPI_DUMP=<dir> keeps the .dat/.dsl files for a look by hand.
    if let Some(keep) = std::env::var_os("VMM_ACPI_DUMP") {
        for e in std::fs::read_dir(dir.path())
            .expect("read tempdir")
            .flatten()
        {
            let _ = std::fs::copy(e.path(), Path::new(&keep).join(e.file_name()));
        }
    }
    out
}

/// The .dsl text of the table with signature `sig` (lower case).
fn dsl<'a>(all: &'a [(String, String)], sig: &str) -> &'a str {
    all.iter()
        .find(|(s, _)| s == sig)
        .map(|(_, d)| d.as_str())
        .unwrap_or_else(|| panic!("no {sig} table"))
}

/// The field name of a data-table line: the text after the `[offset ...]` prefix.
fn key(k: &str) -> &str {
    k.rsplit(']').next().unwrap_or(k).trim()
}

/// The value iasl prints for a "Field name : value" line of a data table.
fn field<'a>(dsl: &'a str, name: &str) -> Vec<&'a str> {
    dsl.lines()
        .filter(|l| l.split(" : ").next().is_some_and(|k| key(k) == name))
        .filter_map(|l| l.split_once(" : ").map(|(_, v)| v.trim()))
        .collect()
}

#[test]
fn iasl_disassembles_all_tables_without_errors() {
    if skip_if_no_iasl("iasl_disassembles_all_tables_without_errors") {
        return;
    }
    let params = AcpiParams {
        num_vcpus: 4,
        ..AcpiParams::default()
    };
    let all = disassemble(&params);
    let sigs: Vec<&str> = all.iter().map(|(s, _)| s.as_str()).collect();
    assert_eq!(sigs, ["xsdt", "facp", "dsdt", "apic", "mcfg"]);

    let facp = dsl(&all, "facp");
    assert_eq!(
        field(facp, "Hardware Reduced (V5)"),
        ["1"],
        "HW_REDUCED flag:\n{facp}"
    );
    for reg in ["Sleep Control Register", "Sleep Status Register"] {
        let at = facp
            .find(&format!("{reg} :"))
            .unwrap_or_else(|| panic!("{reg} missing:\n{facp}"));
        let block: String = facp[at..].lines().take(6).collect::<Vec<_>>().join("\n");
        assert!(block.contains("01 [SystemIO]"), "{reg}: {block}");
        assert!(block.contains("00000000000003C0"), "{reg}: {block}");
    }
    assert!(!field(facp, "64 DSDT Address").contains(&"0000000000000000"));

    let dsdt = dsl(&all, "dsdt");
    for needle in [
        "PNP0A08",
        "PNP0A03",
        "_S5_",
        "PNP0501",
        "PNP0C0C",
        "PNP0C02",
        "0x03F8",
        "0x0CF8",
        "_BBN",
        "_SEG",
        "ACPI0013",
        "_EVT",
        "PCNT",
        "_EJ0",
        "_SUN",
        "B0EJ",
        "0xF0000000",
    ] {
        assert!(dsdt.contains(needle), "DSDT lacks {needle}:\n{dsdt}");
    }
    assert!(
        dsdt.contains("0xC0000000") && dsdt.contains("0xDFFFFFFF"),
        "{dsdt}"
    );
    assert!(
        dsdt.contains("0x0000010000000000"),
        "64-bit window:\n{dsdt}"
    );

    let apic = dsl(&all, "apic");
    assert_eq!(field(apic, "Local Apic Address"), ["FEE00000"], "{apic}");
    assert_eq!(field(apic, "Processor Enabled").len(), 4, "{apic}");
    assert_eq!(field(apic, "Address"), ["FEC00000"], "IOAPIC:\n{apic}");
    // The IOAPIC's GSI base, then the override IRQ0 -> GSI 2.
    assert_eq!(field(apic, "Interrupt"), ["00000000", "00000002"], "{apic}");

    let mcfg = dsl(&all, "mcfg");
    assert_eq!(field(mcfg, "Base Address"), ["00000000E0000000"], "{mcfg}");
    assert_eq!(field(mcfg, "End Bus Number"), ["FF"], "{mcfg}");

    let xsdt = dsl(&all, "xsdt");
    let entries = xsdt.lines().filter(|l| l.contains("ACPI Table Address"));
    assert_eq!(entries.count(), 3, "{xsdt}");
}

#[test]
fn iasl_accepts_windows_and_ecam_above_4g() {
    if skip_if_no_iasl("iasl_accepts_windows_and_ecam_above_4g") {
        return;
    }
    let params = AcpiParams {
        num_vcpus: 1,
        pci_mmio32: MmioWindow { base: 0, size: 0 },
        ecam_base: 0x80_0000_0000,
        ..AcpiParams::default()
    };
    let all = disassemble(&params);
    let dsdt = dsl(&all, "dsdt");
    assert!(
        dsdt.contains("0x0000008000000000"),
        "ECAM above 4G:\n{dsdt}"
    );
    assert!(!dsdt.contains("DWordMemory"), "{dsdt}");
}

#[test]
fn iasl_check_catches_a_corrupt_table() {
    if skip_if_no_iasl("iasl_check_catches_a_corrupt_table") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let mut fadt = create_tables(&AcpiParams::default()).fadt().to_vec();
    fadt[9] ^= 1;
    let (o, dsl) = disassemble_one(dir.path(), "facp", &fadt);
    let report = text(&o);
    assert!(
        !error_lines(&report).is_empty() || !error_lines(&dsl).is_empty(),
        "a bad checksum went unnoticed:\n{report}\n{dsl}"
    );
}

/// Test methods that set the hot plug registers the way the VMM's controller would and
/// run the DSDT's GED event handler and a slot's `_EJ0` (acpiexec simulates the
/// register block as memory).
const HOTPLUG_SSDT: &str = r#"
DefinitionBlock ("", "SSDT", 2, "TEST", "HPTEST", 1)
{
    External (\_SB.PCI0.PCIU, FieldUnitObj)
    External (\_SB.PCI0.PCID, FieldUnitObj)
    External (\_SB.PCI0.B0EJ, FieldUnitObj)
    External (\_SB.PCI0.S1F_._EJ0, MethodObj)
    External (\_SB.PCI0.S05_._EJ0, MethodObj)
    External (\_SB.GED0._EVT, MethodObj)
    Method (PLUG, 0, NotSerialized)
    {
        \_SB.PCI0.PCIU = 0x08
        \_SB.PCI0.PCID = 0x00040000
        \_SB.GED0._EVT (23)
    }
    Method (IDLE, 0, NotSerialized)
    {
        \_SB.PCI0.PCIU = Zero
        \_SB.PCI0.PCID = Zero
        \_SB.GED0._EVT (23)
    }
    Method (EJ1F, 0, NotSerialized)
    {
        \_SB.PCI0.S1F_._EJ0 (0)
        Return (\_SB.PCI0.B0EJ)
    }
    Method (EJ05, 0, NotSerialized)
    {
        \_SB.PCI0.S05_._EJ0 (0)
        Return (\_SB.PCI0.B0EJ)
    }
}
"#;

#[test]
fn acpiexec_runs_the_hot_plug_methods() {
    if skip_if_no_iasl("acpiexec_runs_the_hot_plug_methods") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let tables = create_tables(&AcpiParams::default());
    std::fs::write(dir.path().join("dsdt.aml"), tables.dsdt()).expect("write dsdt");
    std::fs::write(dir.path().join("test.asl"), HOTPLUG_SSDT).expect("write asl");
    let o = iasl(dir.path(), &["test.asl"]).expect("iasl present");
    assert!(o.status.success(), "test SSDT:\n{}", text(&o));
    let run = |cmd: &str| {
        let o = Command::new("acpiexec")
            .args(["-b", cmd, "dsdt.aml", "test.aml"])
            .current_dir(dir.path())
            .output()
            .expect("acpiexec (acpica-tools) runs");
        let out = text(&o);
        assert!(o.status.success(), "acpiexec {cmd}:\n{out}");
        out
    };
    let notifies = |out: &str| -> Vec<String> {
        out.lines()
            .filter(|l| l.contains("Notify on"))
            .map(|l| {
                let name = l.split('[').nth(1).and_then(|r| r.split(']').next());
                let value = l.split("Value ").nth(1).and_then(|r| r.split(' ').next());
                format!("{}={}", name.unwrap_or("?"), value.unwrap_or("?"))
            })
            .collect()
    };

    // Slot 3 plugged and slot 18 to eject: one device check, one eject request.
    let out = run("execute \\PLUG");
    let mut got = notifies(&out);
    got.sort();
    assert_eq!(got, ["S03_=0x01", "S12_=0x03"], "{out}");
    // Nothing pending: no notification at all.
    let out = run("execute \\IDLE");
    assert!(notifies(&out).is_empty(), "{out}");
    // _EJ0 of slot 31 and slot 5 write their bit to B0EJ.
    for (method, bit) in [("EJ1F", "0000000080000000"), ("EJ05", "0000000000000020")] {
        let out = run(&format!("execute \\{method}"));
        assert!(
            out.lines()
                .any(|l| l.contains("[Integer]") && l.contains(bit)),
            "{method} should leave B0EJ = {bit}:\n{out}"
        );
    }
}
