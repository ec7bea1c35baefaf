//! `vmctl import-libvirt` as a user runs it: a domain XML in a file, the JSON on
//! standard output (parsed here), what is left out on standard error, `--strict`
//! refusing it, bad XML naming its line, and `--create` creating the VM on
//! `vmmd --fake`, whose `vm.info` then shows the imported disks and iothreads.

use std::process::Output;

use serde_json::Value;

mod support;

use support::Service;

fn domain(s: &Service) -> String {
    std::fs::write(s.path("vmlinuz"), b"kernel").unwrap();
    let img = s.image("db1.raw", 1);
    format!(
        r#"<domain type='kvm'>
  <name>db1</name>
  <uuid>4dea22b3-1d52-d8f3-2516-782e98ab3fa0</uuid>
  <memory unit='MiB'>256</memory>
  <vcpu>1</vcpu>
  <iothreads>1</iothreads>
  <os><type>hvm</type><kernel>{kernel}</kernel><cmdline>console=ttyS0</cmdline></os>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='raw' cache='none' io='io_uring' iothread='1'/>
      <source file='{img}'/>
      <target dev='vda' bus='virtio'/>
      <iotune><total_iops_sec>3000</total_iops_sec></iotune>
    </disk>
    <interface type='network'><source network='default'/></interface>
  </devices>
</domain>"#,
        kernel = s.path("vmlinuz").display(),
        img = img.display()
    )
}

fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

#[test]
fn a_domain_imports_to_json_and_creates_the_vm() {
    let s = Service::start(&["--fake"]);
    let xml = s.path("db1.xml");
    std::fs::write(&xml, domain(&s)).unwrap();
    let xml = xml.to_str().unwrap();

    let o = s.vmctl(&["import-libvirt", xml]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{out}{err}");
    let config: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(config["id"], "db1");
    assert_eq!(config["memory"]["size_mib"], 256);
    assert_eq!(config["disks"][0]["iothread"], "iothread1");
    assert_eq!(config["disks"][0]["throttle"]["iops_total"], 3000);
    for ignored in ["ignored: uuid", "ignored: devices/interface"] {
        assert!(err.contains(ignored), "{err}");
    }

    let o = s.vmctl(&["import-libvirt", "--strict", xml]);
    let (out, err) = text(&o);
    assert!(!o.status.success() && out.is_empty(), "{out}{err}");
    assert!(
        err.contains("not supported (--strict)") && err.contains("uuid"),
        "{err}"
    );

    let bad = s.path("bad.xml");
    std::fs::write(
        &bad,
        "<domain>\n<name>x</name>\n<vcpu>1</memory>\n</domain>",
    )
    .unwrap();
    let o = s.vmctl(&["import-libvirt", bad.to_str().unwrap()]);
    let (_, err) = text(&o);
    assert!(!o.status.success(), "{err}");
    assert!(err.contains("line 3"), "{err}");

    let o = s.vmctl(&["import-libvirt", "--create", xml]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{out}{err}");
    let info = s.ok("GET", "vm.info?id=db1", None).json();
    assert_eq!(info["config"]["disks"][0]["id"], "vda", "{info}");
    assert_eq!(info["config"]["iothreads"][0]["id"], "iothread1", "{info}");
    assert_eq!(
        info["config"]["disks"][0]["throttle"]["iops_total"], 3000,
        "{info}"
    );
}

/// The test guest booted under the real `vmmd` from an imported domain: direct kernel
/// boot, an iothread, a throttled virtio disk, the serial port to a file; the guest
/// reads and writes its disk and powers off.
#[test]
fn the_test_guest_boots_from_an_imported_domain() {
    let test = "the_test_guest_boots_from_an_imported_domain";
    if !tests::skip::kvm_or_skip(test) {
        return;
    }
    let s = Service::start(&[]);
    let events = support::Events::follow(&s.socket);
    let img = s.sparse_image("g.raw", 16);
    let xml = format!(
        r#"<domain type='kvm'>
  <name>g</name>
  <memory unit='MiB'>64</memory>
  <vcpu>1</vcpu>
  <iothreads>1</iothreads>
  <os><type>hvm</type><kernel>{kernel}</kernel>
    <cmdline>exit=acpi pci=auto tsc_khz={tsc} ms=50</cmdline></os>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='raw' cache='writeback' io='io_uring' iothread='1'/>
      <source file='{img}'/>
      <target dev='vda' bus='virtio'/>
      <iotune><total_iops_sec>50000</total_iops_sec></iotune>
    </disk>
    <serial type='file'><source path='{serial}'/></serial>
  </devices>
</domain>"#,
        kernel = support::guest().display(),
        tsc = support::tsc_khz(),
        img = img.display(),
        serial = s.path("g.serial").display()
    );
    let file = s.path("g.xml");
    std::fs::write(&file, xml).unwrap();
    let o = s.vmctl(&[
        "import-libvirt",
        "--strict",
        "--create",
        file.to_str().unwrap(),
    ]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{out}{err}");
    support::boot_and_verify(&s, &events, "g", &s.path("g.serial"), "vda", "iothread1");
}
