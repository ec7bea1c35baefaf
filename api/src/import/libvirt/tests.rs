//! Domain XML shaped like what `virsh dumpxml` prints for data-plane VMs, imported and
//! checked value by value; what is not supported is listed; bad XML names its place.

use super::*;

/// A domain with every element the import maps.
const FULL: &str = r#"<domain type='kvm' id='7'>
  <name>db1</name>
  <uuid>4dea22b3-1d52-d8f3-2516-782e98ab3fa0</uuid>
  <memory unit='GiB'>4</memory>
  <currentMemory unit='GiB'>4</currentMemory>
  <memoryBacking><hugepages/></memoryBacking>
  <vcpu placement='static'>4</vcpu>
  <iothreads>2</iothreads>
  <iothreadids>
    <iothread id='1'/>
    <iothread id='2'/>
  </iothreadids>
  <cputune>
    <vcpupin vcpu='0' cpuset='0'/>
    <iothreadpin iothread='1' cpuset='2-3'/>
    <iothreadpin iothread='2' cpuset='4,6-7,^6'/>
  </cputune>
  <os>
    <type arch='x86_64' machine='q35'>hvm</type>
    <kernel>/var/lib/vm/vmlinuz</kernel>
    <initrd>/var/lib/vm/initrd.img</initrd>
    <cmdline>console=ttyS0 root=/dev/vda</cmdline>
  </os>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2' cache='none' io='native' iothread='1'
              error_policy='stop' rerror_policy='stop' discard='unmap' queues='2'
              queue_size='512'/>
      <source file='/var/lib/vm/db1.qcow2'/>
      <target dev='vda' bus='virtio'/>
      <iotune>
        <total_iops_sec>5000</total_iops_sec>
        <total_iops_sec_max>8000</total_iops_sec_max>
        <total_iops_sec_max_length>10</total_iops_sec_max_length>
        <read_bytes_sec>104857600</read_bytes_sec>
        <write_bytes_sec>52428800</write_bytes_sec>
        <size_iops_sec>16384</size_iops_sec>
      </iotune>
      <serial>DB1-ROOT</serial>
    </disk>
    <disk type='block' device='disk'>
      <driver name='qemu' type='raw' cache='directsync' io='io_uring'>
        <iothreads>
          <iothread id='1'><queue id='0'/><queue id='2'/></iothread>
          <iothread id='2'><queue id='1'/><queue id='3'/></iothread>
        </iothreads>
      </driver>
      <source dev='/dev/vg0/db1-data'/>
      <target dev='vdb' bus='virtio'/>
      <iotune>
        <read_iops_sec>1000</read_iops_sec>
        <write_iops_sec>2000</write_iops_sec>
        <group_name>tenant-a</group_name>
      </iotune>
    </disk>
    <disk type='network' device='disk'>
      <driver name='qemu' type='raw' cache='writeback' io='threads' error_policy='enospc'/>
      <source protocol='nbd' name='vol1'>
        <host name='storage1' port='10810'/>
      </source>
      <target dev='vdc' bus='virtio'/>
      <readonly/>
    </disk>
    <disk type='network' device='disk'>
      <driver name='qemu' type='raw'/>
      <source protocol='nbd' name='scratch'>
        <host transport='unix' socket='/run/nbd/scratch.sock'/>
      </source>
      <target dev='vdd' bus='virtio'/>
    </disk>
  </devices>
</domain>
"#;

#[test]
fn every_mapped_field_arrives_with_its_value() {
    let Imported {
        config: c, ignored, ..
    } = import(FULL).unwrap();
    assert_eq!(c.id, "db1");
    assert_eq!(c.memory.size_mib, 4096);
    assert!(c.memory.hugepages);
    assert_eq!(c.cpus.boot_vcpus, 4);
    assert_eq!(
        c.payload.kernel,
        std::path::PathBuf::from("/var/lib/vm/vmlinuz")
    );
    assert_eq!(
        c.payload.initramfs.as_deref(),
        Some(std::path::Path::new("/var/lib/vm/initrd.img"))
    );
    assert_eq!(c.payload.cmdline, "console=ttyS0 root=/dev/vda");
    let threads: Vec<(&str, &[usize])> = c
        .iothreads
        .iter()
        .map(|t| (t.id.as_str(), t.cpu_affinity.as_slice()))
        .collect();
    assert_eq!(
        threads,
        [("iothread1", &[2, 3][..]), ("iothread2", &[4, 7][..])]
    );

    let vda = &c.disks[0];
    assert_eq!(
        (vda.id.as_str(), vda.path.to_str().unwrap()),
        ("vda", "/var/lib/vm/db1.qcow2")
    );
    assert_eq!(vda.format, ImageFormat::Qcow2);
    assert_eq!((vda.cache, vda.aio), (CacheMode::None, AioKind::Native));
    assert_eq!(vda.iothread.as_deref(), Some("iothread1"));
    assert_eq!(
        (vda.on_write_error, vda.on_read_error),
        (WriteErrorPolicy::Stop, ReadErrorPolicy::Stop)
    );
    assert_eq!(vda.discard, DiscardMode::Unmap);
    assert_eq!((vda.num_queues, vda.queue_size), (2, 512));
    assert_eq!(vda.serial.as_deref(), Some("DB1-ROOT"));
    let t = vda.throttle.clone().unwrap();
    assert_eq!(
        (
            t.iops_total,
            t.iops_total_max,
            t.iops_total_max_length,
            t.bps_read,
            t.bps_write,
            t.iops_size
        ),
        (5000, 8000, 10, 104_857_600, 52_428_800, 16384)
    );

    let vdb = &c.disks[1];
    assert_eq!(vdb.path.to_str(), Some("/dev/vg0/db1-data"));
    assert_eq!(
        (vdb.cache, vdb.aio),
        (CacheMode::Directsync, AioKind::IoUring)
    );
    assert_eq!(vdb.iothread, None);
    assert_eq!(vdb.num_queues, 4, "every mapped queue exists");
    assert_eq!(
        vdb.iothread_vq_mapping,
        Some(vec![
            VqMapping {
                iothread: "iothread1".into(),
                vqs: vec![0, 2]
            },
            VqMapping {
                iothread: "iothread2".into(),
                vqs: vec![1, 3]
            },
        ])
    );
    assert_eq!(vdb.throttle_group.as_deref(), Some("tenant-a"));
    assert_eq!(vdb.throttle, None);
    assert_eq!(c.throttle_groups.len(), 1);
    assert_eq!(c.throttle_groups[0].id, "tenant-a");
    assert_eq!(
        (
            c.throttle_groups[0].limits.iops_read,
            c.throttle_groups[0].limits.iops_write
        ),
        (1000, 2000)
    );

    let vdc = &c.disks[2];
    assert_eq!(vdc.path.to_str(), Some("nbd://storage1:10810/vol1"));
    assert!(vdc.readonly);
    assert_eq!(
        (vdc.cache, vdc.aio),
        (CacheMode::Writeback, AioKind::Threads)
    );
    assert_eq!(vdc.on_write_error, WriteErrorPolicy::Enospc);
    let vdd = &c.disks[3];
    assert_eq!(
        vdd.path.to_str(),
        Some("nbd+unix:///scratch?socket=/run/nbd/scratch.sock")
    );

    // What is left out is said, and nothing mapped is.
    for want in [
        "uuid",
        "currentMemory",
        "cputune/vcpupin",
        "devices/emulator",
    ] {
        assert!(ignored.iter().any(|i| i == want), "{want} in {ignored:?}");
    }
    assert_eq!(ignored.len(), 4, "{ignored:?}");
}

#[test]
fn the_imported_config_is_one_vm_create_accepts() {
    let Imported { config, .. } = import(FULL).unwrap();
    // vm.create's own checks, less those about this host (the kernel and initrd files,
    // hugepages, CPUs the service may use): nothing in the config itself is wrong.
    let host = [
        "payload.kernel:",
        "payload.initramfs:",
        "memory.hugepages:",
        "iothreads[",
    ];
    let problems: Vec<String> = config
        .problems()
        .into_iter()
        .filter(|p| {
            !(host.iter().any(|h| p.starts_with(h))
                && (p.contains("No such file")
                    || p.contains("hugepages")
                    || p.contains("does not let the service use")))
        })
        .collect();
    assert_eq!(problems, Vec::<String>::new());
    // And it survives JSON both ways unchanged.
    let json = serde_json::to_string(&config).unwrap();
    let back: VmConfig = serde_json::from_str(&json).unwrap();
    assert_eq!(
        serde_json::to_value(&back).unwrap(),
        serde_json::to_value(&config).unwrap()
    );
}

#[test]
fn unsupported_elements_and_devices_are_listed() {
    let xml = r#"<domain type='kvm'>
  <name>web</name>
  <memory>524288</memory>
  <vcpu>1</vcpu>
  <features><acpi/><apic/></features>
  <clock offset='utc'/>
  <os><type>hvm</type><boot dev='hd'/></os>
  <devices>
    <disk type='file' device='cdrom'>
      <source file='/iso/install.iso'/><target dev='sda' bus='sata'/>
    </disk>
    <disk type='file' device='disk'>
      <source file='/img/web.raw'/><target dev='hda' bus='ide'/>
    </disk>
    <disk type='network' device='disk'>
      <source protocol='rbd' name='pool/img'/><target dev='vdb' bus='virtio'/>
    </disk>
    <disk type='file' device='disk'>
      <driver name='qemu' type='raw' copy_on_read='on'/>
      <source file='/img/web-data.raw'/><target dev='vdc' bus='virtio'/>
      <boot order='1'/>
    </disk>
    <interface type='network'><source network='default'/></interface>
    <graphics type='vnc'/>
    <controller type='usb'/>
  </devices>
</domain>"#;
    let Imported {
        config, ignored, ..
    } = import(xml).unwrap();
    assert_eq!(config.memory.size_mib, 512, "KiB by default");
    assert_eq!(config.disks.len(), 1);
    assert_eq!(config.disks[0].id, "vdc");
    for want in [
        "features",
        "clock",
        "os/boot",
        "devices/interface",
        "devices/graphics",
        "devices/controller",
        "devices/disk vdc/boot",
        "devices/disk vdc/driver@copy_on_read",
    ] {
        assert!(ignored.iter().any(|i| i == want), "{want} in {ignored:?}");
    }
    assert!(
        ignored.iter().any(|i| i.starts_with("devices/disk sda:")),
        "{ignored:?}"
    );
    assert!(
        ignored.iter().any(|i| i.starts_with("devices/disk hda:")),
        "{ignored:?}"
    );
    assert!(ignored.iter().any(|i| i.contains("\"rbd\"")), "{ignored:?}");
    assert!(
        ignored.iter().any(|i| i.starts_with("os: no <kernel>")),
        "{ignored:?}"
    );
}

#[test]
fn bad_xml_names_its_line_and_column_and_bad_values_their_field() {
    let err = import("<domain>\n  <name>x</name>\n  <memory>1<memory>\n</domain>").unwrap_err();
    match err {
        ImportError::Xml { line, .. } => assert_eq!(line, 4, "{err}"),
        other => panic!("{other}"),
    }
    assert!(
        import("<vm/>")
            .unwrap_err()
            .to_string()
            .contains("not <domain>")
    );
    assert!(
        import("<domain/>")
            .unwrap_err()
            .to_string()
            .contains("no <name>")
    );
    let bad_cache = FULL.replace("cache='none' io='native'", "cache='fast'");
    assert!(
        import(&bad_cache)
            .unwrap_err()
            .to_string()
            .contains("cache='fast'")
    );
    let bad_unit = FULL.replace("unit='GiB'>4</memory>", "unit='parsec'>4</memory>");
    assert!(
        import(&bad_unit)
            .unwrap_err()
            .to_string()
            .contains("parsec")
    );
    assert!(cpu_set("3-1").is_err() && cpu_set("x").is_err());
    assert_eq!(cpu_set("0-2,^1,5").unwrap(), vec![0, 2, 5]);
}

#[test]
fn qemu_commandline_data_plane_and_write_cache_settings_map() {
    let xml = r#"<domain type='kvm' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>old</name>
  <memory unit='MiB'>512</memory>
  <vcpu>2</vcpu>
  <iothreads>1</iothreads>
  <os><type>hvm</type><kernel>/k</kernel></os>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='raw' cache='none' io='native' iothread='1'/>
      <source file='/img/a.raw'/><target dev='vda' bus='virtio'/>
      <alias name='virtio-disk0'/>
      <address type='pci' domain='0x0000' bus='0x00' slot='0x04' function='0x0'/>
    </disk>
    <disk type='file' device='disk'>
      <driver name='qemu' type='raw' cache='writeback'/>
      <source file='/img/b.raw'/><target dev='vdb' bus='virtio'/>
      <alias name='virtio-disk1'/>
    </disk>
  </devices>
  <qemu:commandline>
    <qemu:arg value='-set'/>
    <qemu:arg value='device.virtio-disk0.x-data-plane=on'/>
    <qemu:arg value='-set'/>
    <qemu:arg value='device.virtio-disk1.config-wce=off'/>
    <qemu:arg value='-set'/>
    <qemu:arg value='device.virtio-disk1.scsi=off'/>
    <qemu:arg value='-no-hpet'/>
  </qemu:commandline>
</domain>"#;
    let Imported {
        config, ignored, ..
    } = import(xml).unwrap();
    let (a, b) = (&config.disks[0], &config.disks[1]);
    assert_eq!(a.iothread, None, "x-data-plane=on: a dedicated iothread");
    assert_eq!(a.cache, CacheMode::None);
    assert_eq!(
        b.cache,
        CacheMode::Writeback,
        "config-wce=off keeps the cache mode, as in QEMU"
    );
    assert!(
        ignored
            .iter()
            .any(|i| i.contains("config-wce=off on disk vdb")),
        "the difference is said: {ignored:?}"
    );
    for want in [
        "qemu:commandline -set device.virtio-disk1.scsi=off",
        "qemu:commandline -no-hpet",
        "devices/disk vda/address",
    ] {
        assert!(ignored.iter().any(|i| i == want), "{want} in {ignored:?}");
    }
    assert!(
        !ignored.iter().any(|i| i.contains("x-data-plane")),
        "{ignored:?}"
    );
}

/// What a reviewer found libvirt to mean, each checked.
#[test]
fn libvirt_semantics_the_review_named() {
    let domain = |body: &str| {
        format!(
            "<domain type='kvm' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>\
             <name>r</name><os><kernel>/k</kernel></os>{body}</domain>"
        )
    };
    // `current` vCPUs boot; units in any case; the vCPU cpuset is said.
    let c = import(&domain(
        "<vcpu current='2' cpuset='0-3'>8</vcpu><memory unit='g'>1</memory>",
    ))
    .unwrap();
    assert_eq!(
        (c.config.cpus.boot_vcpus, c.config.memory.size_mib),
        (2, 1024)
    );
    assert!(
        c.ignored.contains(&"vcpu@cpuset".to_string()),
        "{:?}",
        c.ignored
    );
    // Absurd iothread counts and cpusets are refused, not built.
    assert!(import(&domain("<iothreads>4294967295</iothreads>")).is_err());
    assert!(cpu_set("0-99999999").is_err() && cpu_set("^1").is_err());
    // Iothreads without <queue> take the queues in turn; ids are numbers.
    let disk = |driver: &str, extra: &str| {
        domain(&format!(
            "<iothreads>2</iothreads><devices><disk type='file' device='disk'>{driver}\
             <source file='/a'/><target dev='vda' bus='virtio'/>{extra}</disk></devices>"
        ))
    };
    let c = import(&disk(
        "<driver name='qemu' queues='4'><iothreads><iothread id='01'/><iothread id='2'/>\
         </iothreads></driver>",
        "",
    ))
    .unwrap();
    let m = c.config.disks[0].iothread_vq_mapping.clone().unwrap();
    assert_eq!(
        m.iter()
            .map(|m| (m.iothread.as_str(), m.vqs.clone()))
            .collect::<Vec<_>>(),
        [("iothread1", vec![0, 2]), ("iothread2", vec![1, 3])]
    );
    // io='native' needs O_DIRECT whatever the cache mode.
    assert!(import(&disk("<driver cache='writethrough' io='native'/>", "")).is_err());
    // A virtio disk needs a target name.
    let nameless = domain(
        "<devices><disk type='file' device='disk'><source file='/a'/>\
         <target bus='virtio'/></disk></devices>",
    );
    assert!(import(&nameless).is_err());
    // NBD: the export name escaped, TLS refused, the reconnect delay kept.
    let nbd = |attrs: &str, inner: &str| {
        domain(&format!(
            "<devices><disk type='network' device='disk'>\
             <source protocol='nbd' name='a?b%c' {attrs}><host name='h'/>{inner}</source>\
             <target dev='vda' bus='virtio'/></disk></devices>"
        ))
    };
    let c = import(&nbd("", "<reconnect delay='30'/>")).unwrap();
    let d = &c.config.disks[0];
    let uri: block::nbd::NbdUri = d.path.to_str().unwrap().parse().unwrap();
    assert_eq!(uri.export, "a?b%c", "{}", d.path.display());
    assert_eq!(d.reconnect_delay, Some(30));
    assert!(import(&nbd("tls='yes'", "")).is_err());
    // One throttle group's limits on two disks must agree; a disk may just join.
    let grouped = |a: &str, b: &str| {
        domain(&format!(
            "<devices>\
             <disk type='file' device='disk'><source file='/a'/><target dev='vda' bus='virtio'/>\
             <iotune>{a}<group_name>g</group_name></iotune></disk>\
             <disk type='file' device='disk'><source file='/b'/><target dev='vdb' bus='virtio'/>\
             <iotune>{b}<group_name>g</group_name></iotune></disk></devices>"
        ))
    };
    let c = import(&grouped("<total_iops_sec>100</total_iops_sec>", "")).unwrap();
    assert_eq!(c.config.throttle_groups[0].limits.iops_total, 100);
    assert!(
        import(&grouped(
            "<total_iops_sec>100</total_iops_sec>",
            "<total_iops_sec>200</total_iops_sec>"
        ))
        .is_err()
    );
    // A serial port the VM would connect out from, or COM2, is not ours: said.
    let c = import(&domain(
        "<devices><serial type='unix'><source mode='connect' path='/s'/></serial></devices>",
    ))
    .unwrap();
    assert_eq!(c.config.serial.mode, SerialMode::Null);
    assert!(
        c.ignored.contains(&"devices/serial".to_string()),
        "{:?}",
        c.ignored
    );
    // Second elements and qemu:env are said, not dropped.
    let c = import(&domain(
        "<vcpu>1</vcpu><vcpu>2</vcpu>\
         <qemu:commandline><qemu:env name='X' value='1'/></qemu:commandline>",
    ))
    .unwrap();
    assert_eq!(c.config.cpus.boot_vcpus, 1);
    for want in ["vcpu (a second one)", "qemu:commandline/env"] {
        assert!(
            c.ignored.iter().any(|i| i == want),
            "{want} in {:?}",
            c.ignored
        );
    }
}
