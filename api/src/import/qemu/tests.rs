//! QEMU command lines shaped like what people and libvirt write for data-plane VMs,
//! imported and checked value by value; what is not supported is listed; bad input
//! says what is wrong.

use block::throttle::ThrottleLimits;
use block::{AioKind, CacheMode, ImageFormat};
use devices::config::{DiscardMode, ReadErrorPolicy, VqMapping, WriteErrorPolicy};
use vmm::config::{SerialMode, VmConfig};

use super::*;

fn words(cmdline: &str) -> Vec<String> {
    shlex::split(cmdline).expect("test command line")
}

fn import_ok(cmdline: &str) -> Imported {
    import(&words(cmdline)).unwrap_or_else(|e| panic!("{e}"))
}

/// Each command line of `cases` refused, saying its text.
fn refused(cases: &[(&str, &str)]) {
    for (cmdline, says) in cases {
        let err = import_err(cmdline);
        assert!(err.contains(says), "{cmdline}: {err}");
    }
}

fn import_err(cmdline: &str) -> String {
    match import(&words(cmdline)) {
        Ok(i) => panic!("imported: {:?}", i.config),
        Err(e) => e.to_string(),
    }
}

/// The disk `id` of `config`.
fn disk<'a>(config: &'a VmConfig, id: &str) -> &'a devices::config::DiskConfig {
    config
        .disks
        .iter()
        .find(|d| d.id == id)
        .unwrap_or_else(|| panic!("no disk {id}"))
}

/// What the service's `vm.create` parses and checks, applied to the imported JSON (but
/// for the files and huge pages, which are not on this host).
fn accepted(config: &VmConfig) {
    let json = serde_json::to_string(config).unwrap();
    let parsed: VmConfig = serde_json::from_str(&json).unwrap_or_else(|e| panic!("{e}: {json}"));
    let problems: Vec<String> = parsed
        .problems()
        .into_iter()
        .filter(|p| !p.contains("No such file or directory") && !p.contains("this host"))
        .collect();
    assert!(problems.is_empty(), "{problems:?}: {json}");
}

/// Hand-written, in the key=value style: every option the import maps.
const FULL: &str = r#"/usr/bin/qemu-system-x86_64 -name guest=db1,debug-threads=on
    -enable-kvm -m 4G -smp cpus=4 -mem-path /dev/hugepages
    -kernel /var/lib/vm/vmlinuz -initrd /var/lib/vm/initrd.img
    -append 'console=ttyS0 root=/dev/vda'
    -serial file:/var/log/vm/db1.log
    -object iothread,id=io0,poll-max-ns=32768,poll-grow=2,poll-shrink=4,aio-max-batch=16
    -object iothread,id=io1
    -object throttle-group,id=tg0,x-iops-total=1000,x-bps-read=2000000
    -drive if=none,id=d0,file=/var/lib/vm/db1.qcow2,format=qcow2,cache=none,aio=native,discard=unmap,werror=stop,rerror=stop,throttling.iops-total=5000,throttling.iops-total-max=8000,throttling.iops-total-max-length=10,throttling.bps-write=100000000,throttling.iops-size=8192
    -device virtio-blk-pci,drive=d0,id=vda,iothread=io0,num-queues=2,queue-size=512,serial=DB1-DATA
    -drive if=none,id=d1,file=/var/lib/vm/logs.raw,format=raw,cache=writethrough,aio=threads,readonly=on,bps_rd=3000000,iops_wr=100,iops_wr_max=300,throttling.iops-write-max-length=5
    -device virtio-blk-pci,drive=d1,id=vdb,x-data-plane=on
    -drive if=virtio,id=d2,file=nbd://nbd.example.com:10810/exp1,format=raw,cache=directsync,aio=io_uring,throttling.group=tg1,throttling.iops-total=700
    -drive if=virtio,id=d3,file=nbd:unix:/run/nbd.sock:exportname=e2,format=raw,cache=unsafe,throttling.group=tg1
    -blockdev driver=file,node-name=f4,filename=/dev/vg0/lv4,aio=io_uring,cache.direct=on,discard=ignore
    -blockdev driver=raw,node-name=r4,file=f4,read-only=off
    -blockdev driver=throttle,node-name=t4,throttle-group=tg0,file=r4
    -device virtio-blk-pci,drive=t4,id=vdd,write-cache=off,werror=enospc,rerror=ignore
    -blockdev '{"driver":"qcow2","node-name":"q5","file":{"driver":"file","filename":"/var/lib/vm/scratch.qcow2","aio":"native","cache":{"direct":true}}}'
    -device '{"driver":"virtio-blk-pci","id":"vde","drive":"q5","num-queues":4,"iothread-vq-mapping":[{"iothread":"io0","vqs":[0,2]},{"iothread":"io1","vqs":[1,3]}]}'
    -blockdev '{"driver":"nbd","node-name":"n6","server":{"type":"unix","path":"/run/n6.sock"},"export":"scratch","reconnect-delay":30}'
    -device '{"driver":"virtio-blk-pci","drive":"n6","id":"vdf","num-queues":3,"iothread-vq-mapping":[{"iothread":"io0"},{"iothread":"io1"}]}'
"#;

#[test]
fn every_mapped_option_lands_where_it_belongs() {
    let imported = import_ok(FULL);
    let c = &imported.config;
    accepted(c);
    assert_eq!(c.id, "db1");
    assert_eq!(c.memory.size_mib, 4096);
    assert!(c.memory.hugepages);
    assert_eq!(c.cpus.boot_vcpus, 4);
    assert_eq!(c.payload.kernel.to_str(), Some("/var/lib/vm/vmlinuz"));
    assert_eq!(
        c.payload.initramfs.as_deref().and_then(|p| p.to_str()),
        Some("/var/lib/vm/initrd.img")
    );
    assert_eq!(c.payload.cmdline, "console=ttyS0 root=/dev/vda");
    assert_eq!(c.serial.mode, SerialMode::File);
    assert_eq!(
        c.serial.path.as_deref().and_then(|p| p.to_str()),
        Some("/var/log/vm/db1.log")
    );

    let ids: Vec<&str> = c.iothreads.iter().map(|t| t.id.as_str()).collect();
    assert_eq!(ids, ["io0", "io1"]);
    let io0 = &c.iothreads[0];
    assert_eq!(
        (
            io0.poll_max_ns,
            io0.poll_grow,
            io0.poll_shrink,
            io0.aio_max_batch
        ),
        (32768, 2, 4, 16)
    );

    let groups: Vec<(&str, &ThrottleLimits)> = c
        .throttle_groups
        .iter()
        .map(|g| (g.id.as_str(), &g.limits))
        .collect();
    assert_eq!(groups.len(), 2, "{groups:?}");
    let tg0 = ThrottleLimits {
        iops_total: 1000,
        bps_read: 2_000_000,
        ..Default::default()
    };
    let tg1 = ThrottleLimits {
        iops_total: 700,
        ..Default::default()
    };
    assert_eq!(groups[0], ("tg0", &tg0));
    assert_eq!(groups[1], ("tg1", &tg1));

    let ids: Vec<&str> = c.disks.iter().map(|d| d.id.as_str()).collect();
    // QEMU creates the key=value -devices, then those of `-drive if=virtio`, then the
    // JSON -devices.
    assert_eq!(ids, ["vda", "vdb", "vdd", "d2", "d3", "vde", "vdf"]);

    let vda = disk(c, "vda");
    assert_eq!(vda.path.to_str(), Some("/var/lib/vm/db1.qcow2"));
    assert_eq!(vda.format, ImageFormat::Qcow2);
    assert_eq!(vda.cache, CacheMode::None);
    assert_eq!(vda.aio, AioKind::Native);
    assert_eq!(vda.discard, DiscardMode::Unmap);
    assert_eq!(vda.on_write_error, WriteErrorPolicy::Stop);
    assert_eq!(vda.on_read_error, ReadErrorPolicy::Stop);
    assert_eq!(vda.iothread.as_deref(), Some("io0"));
    assert_eq!((vda.num_queues, vda.queue_size), (2, 512));
    assert_eq!(vda.serial.as_deref(), Some("DB1-DATA"));
    assert!(!vda.readonly);
    assert_eq!(
        vda.throttle,
        Some(ThrottleLimits {
            iops_total: 5000,
            iops_total_max: 8000,
            iops_total_max_length: 10,
            bps_write: 100_000_000,
            iops_size: 8192,
            ..Default::default()
        })
    );

    let vdb = disk(c, "vdb");
    assert_eq!(vdb.format, ImageFormat::Raw);
    assert_eq!(vdb.cache, CacheMode::Writethrough);
    assert_eq!(vdb.aio, AioKind::Threads);
    assert!(vdb.readonly);
    assert_eq!(vdb.iothread, None, "x-data-plane: a thread of its own");
    // QEMU's PCI default: a queue per vCPU.
    assert_eq!(vdb.num_queues, 4);
    assert_eq!(
        vdb.throttle,
        Some(ThrottleLimits {
            bps_read: 3_000_000,
            iops_write: 100,
            iops_write_max: 300,
            iops_write_max_length: 5,
            ..Default::default()
        })
    );

    let d2 = disk(c, "d2");
    assert_eq!(d2.path.to_str(), Some("nbd://nbd.example.com:10810/exp1"));
    assert_eq!(d2.cache, CacheMode::Directsync);
    assert_eq!(d2.aio, AioKind::IoUring);
    assert_eq!(d2.throttle_group.as_deref(), Some("tg1"));
    assert_eq!(d2.throttle, None);
    assert_eq!(d2.num_queues, 4);

    let d3 = disk(c, "d3");
    let uri: block::nbd::NbdUri = d3.path.to_str().unwrap().parse().unwrap();
    assert_eq!(
        uri.address,
        block::nbd::NbdAddress::Unix("/run/nbd.sock".into())
    );
    assert_eq!(uri.export, "e2");
    assert_eq!(d3.cache, CacheMode::Unsafe);
    // A group without limits of its own: QEMU does not throttle the drive.
    assert_eq!(d3.throttle_group, None);
    assert_eq!(d3.throttle, None);

    let vdd = disk(c, "vdd");
    assert_eq!(vdd.path.to_str(), Some("/dev/vg0/lv4"));
    assert_eq!(vdd.format, ImageFormat::Raw);
    assert_eq!(
        vdd.cache,
        CacheMode::Directsync,
        "write-cache=off, cache.direct=on"
    );
    assert_eq!(vdd.aio, AioKind::IoUring);
    assert_eq!(vdd.discard, DiscardMode::Ignore);
    assert_eq!(vdd.throttle_group.as_deref(), Some("tg0"));
    assert_eq!(vdd.on_write_error, WriteErrorPolicy::Enospc);
    assert_eq!(vdd.on_read_error, ReadErrorPolicy::Ignore);

    let vde = disk(c, "vde");
    assert_eq!(vde.path.to_str(), Some("/var/lib/vm/scratch.qcow2"));
    assert_eq!(vde.format, ImageFormat::Qcow2);
    assert_eq!(vde.cache, CacheMode::None);
    assert_eq!(vde.aio, AioKind::Native);
    assert_eq!(vde.num_queues, 4);
    assert_eq!(
        vde.iothread_vq_mapping,
        Some(vec![
            VqMapping {
                iothread: "io0".into(),
                vqs: vec![0, 2]
            },
            VqMapping {
                iothread: "io1".into(),
                vqs: vec![1, 3]
            },
        ])
    );

    let vdf = disk(c, "vdf");
    let uri: block::nbd::NbdUri = vdf.path.to_str().unwrap().parse().unwrap();
    assert_eq!(
        uri.address,
        block::nbd::NbdAddress::Unix("/run/n6.sock".into())
    );
    assert_eq!(uri.export, "scratch");
    assert_eq!(vdf.reconnect_delay, Some(30));
    // No vqs named: the three queues go to the iothreads in turn.
    assert_eq!(
        vdf.iothread_vq_mapping,
        Some(vec![
            VqMapping {
                iothread: "io0".into(),
                vqs: vec![0, 2]
            },
            VqMapping {
                iothread: "io1".into(),
                vqs: vec![1]
            },
        ])
    );

    // What is said, exactly: one unmapped key left out; as notes the huge pages,
    // QEMU's defaults where ours differ, and a group without limits.
    assert_eq!(
        imported.ignored,
        ["-name guest=db1,debug-threads=on: debug-threads=on"]
    );
    let unmap =
        "discard= not on every node (QEMU's default: ignore, requests dropped): ours, unmap";
    let reconnect = "no reconnect-delay (QEMU's: 0, fail at once): ours, 5 s";
    assert_eq!(
        imported.notes,
        [
            "-mem-path /dev/hugepages: taken as huge pages (we use 2 MiB pages of our own)"
                .to_string(),
            format!("disk vdb: {unmap}"),
            "disk vdd: discard=ignore: we do not offer discard to the guest (QEMU offers it and drops it)"
                .to_string(),
            format!("disk d2: {reconnect}"),
            format!("disk d2: {unmap}"),
            "-drive id=d3: throttling.group=tg1 without limits (not throttled)".to_string(),
            format!("disk d3: {reconnect}"),
            format!("disk d3: {unmap}"),
            format!("disk vde: {unmap}"),
            format!("disk vdf: {unmap}"),
        ]
    );
}

/// What libvirt 9/10 writes: JSON objects, a blockdev graph per disk with a throttle
/// node on a throttle group, `-m size=...k`, topology in `-smp`.
const LIBVIRT_ARGV: &str = r#"LC_ALL=C PATH=/usr/bin:/bin HOME=/var/lib/libvirt/qemu/domain-3-web1 /usr/bin/qemu-system-x86_64
    -name guest=web1,debug-threads=on -S
    -object '{"qom-type":"secret","id":"masterKey0","format":"raw","file":"/var/lib/libvirt/qemu/domain-3-web1/master-key.aes"}'
    -machine pc-q35-8.2,usb=off,vmport=off,dump-guest-core=off,memory-backend=pc.ram,hpet=off,acpi=on
    -accel kvm -cpu host,migratable=on -m size=2097152k
    -object '{"qom-type":"memory-backend-ram","id":"pc.ram","size":2147483648}'
    -overcommit mem-lock=off -smp 2,sockets=2,cores=1,threads=1
    -object '{"qom-type":"iothread","id":"iothread1"}'
    -uuid 0e1b7f4e-7a7c-4c8b-9d3f-3e1f1c2b9a11 -no-user-config -nodefaults
    -chardev socket,id=charmonitor,fd=31,server=on,wait=off
    -mon chardev=charmonitor,id=monitor,mode=control -rtc base=utc -no-shutdown
    -boot strict=on -kernel /var/lib/vm/vmlinuz -append console=ttyS0
    -device '{"driver":"pcie-root-port","port":16,"chassis":1,"id":"pci.1","bus":"pcie.0","multifunction":true,"addr":"0x2"}'
    -object '{"qom-type":"throttle-group","id":"throttle-libvirt-1-format","limits":{"iops-total":3000,"bps-total":20000000,"bps-total-max":50000000,"bps-total-max-length":2}}'
    -blockdev '{"driver":"file","filename":"/var/lib/libvirt/images/web1.qcow2","node-name":"libvirt-1-storage","auto-read-only":true,"discard":"unmap","cache":{"direct":true,"no-flush":false},"aio":"io_uring"}'
    -blockdev '{"node-name":"libvirt-1-format","read-only":false,"discard":"unmap","cache":{"direct":true,"no-flush":false},"driver":"qcow2","file":"libvirt-1-storage"}'
    -blockdev '{"driver":"throttle","node-name":"libvirt-1-throttle","throttle-group":"throttle-libvirt-1-format","file":"libvirt-1-format"}'
    -device '{"driver":"virtio-blk-pci","iothread":"iothread1","bus":"pci.1","addr":"0x0","drive":"libvirt-1-throttle","id":"virtio-disk0","bootindex":1,"write-cache":"on"}'
    -netdev '{"type":"tap","fd":"33","vhost":true,"vhostfd":"35","id":"hostnet0"}'
    -device '{"driver":"virtio-net-pci","netdev":"hostnet0","id":"net0","mac":"52:54:00:6b:3c:58","bus":"pci.2","addr":"0x0"}'
    -audiodev '{"id":"audio1","driver":"none"}' -vnc 127.0.0.1:0,audiodev=audio1
    -sandbox on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny
    -msg timestamp=on"#;

#[test]
fn a_libvirt_written_command_line_imports_and_lists_the_rest() {
    let imported = import_ok(LIBVIRT_ARGV);
    let c = &imported.config;
    accepted(c);
    assert_eq!(c.id, "web1");
    assert_eq!(c.memory.size_mib, 2048);
    assert_eq!(c.cpus.boot_vcpus, 2);
    assert_eq!(c.iothreads.len(), 1);
    assert_eq!(c.disks.len(), 1);
    let d = &c.disks[0];
    assert_eq!(d.id, "virtio-disk0");
    assert_eq!(d.path.to_str(), Some("/var/lib/libvirt/images/web1.qcow2"));
    assert_eq!(d.format, ImageFormat::Qcow2);
    assert_eq!(d.cache, CacheMode::None);
    assert_eq!(d.aio, AioKind::IoUring);
    assert_eq!(d.discard, DiscardMode::Unmap);
    assert_eq!(d.iothread.as_deref(), Some("iothread1"));
    assert_eq!(d.num_queues, 2);
    assert_eq!(
        d.throttle_group.as_deref(),
        Some("throttle-libvirt-1-format")
    );
    assert_eq!(
        c.throttle_groups[0].limits,
        ThrottleLimits {
            iops_total: 3000,
            bps_total: 20_000_000,
            bps_total_max: 50_000_000,
            bps_total_max_length: 2,
            ..Default::default()
        }
    );
    let said = imported.ignored.join("\n");
    for item in [
        "-S",
        "-object {\"qom-type\":\"secret\"",
        "-machine pc-q35-8.2",
        "-cpu host,migratable=on",
        "-uuid ",
        "-chardev socket,id=charmonitor",
        "-device {\"driver\":\"pcie-root-port\"",
        "-netdev ",
        "-device {\"driver\":\"virtio-net-pci\"",
        "-vnc ",
        "-sandbox ",
        "-device virtio-blk-pci id=virtio-disk0: bus=pci.1",
        "-device virtio-blk-pci id=virtio-disk0: addr=0x0",
        "-device virtio-blk-pci id=virtio-disk0: bootindex=1",
    ] {
        assert!(said.contains(item), "{item:?} not listed in:\n{said}");
    }
    // Taken, so not listed.
    for item in [
        "-accel",
        "auto-read-only",
        "write-cache",
        "node-name",
        "LC_ALL",
        "qemu-system",
    ] {
        assert!(!said.contains(item), "{item:?} listed in:\n{said}");
    }
}

#[test]
fn a_drive_without_format_is_probed_as_qemu_would() {
    let dir = tempfile::tempdir().unwrap();
    let q = dir.path().join("a.img");
    let mut header = b"QFI\xfb\0\0\0\x03".to_vec();
    header.resize(512, 0);
    std::fs::write(&q, header).unwrap();
    let r = dir.path().join("b.img");
    std::fs::write(&r, [0u8; 512]).unwrap();
    let imported = import_ok(&format!(
        "-drive file={},if=virtio,cache=none -drive file={},if=virtio,cache=none",
        q.display(),
        r.display()
    ));
    let formats: Vec<ImageFormat> = imported.config.disks.iter().map(|d| d.format).collect();
    assert_eq!(formats, [ImageFormat::Qcow2, ImageFormat::Raw]);
    let ids: Vec<&str> = imported
        .config
        .disks
        .iter()
        .map(|d| d.id.as_str())
        .collect();
    assert_eq!(ids, ["virtio0", "virtio1"]);
    assert!(
        imported
            .notes
            .iter()
            .any(|s| s.contains("no format= (QEMU probes; found qcow2")),
        "{:?}",
        imported.notes
    );
}

#[test]
fn set_and_global_change_devices_as_in_qemu() {
    let imported = import_ok(
        "-object iothread,id=io0 -drive if=none,id=d0,file=/a.raw,format=raw,cache=none \
         -device virtio-blk-pci,drive=d0,id=disk0 -set device.disk0.iothread=io0 \
         -set device.disk0.config-wce=off -global virtio-blk-pci.queue-size=1024 \
         -global driver=virtio-blk-pci,property=num-queues,value=2",
    );
    let d = &imported.config.disks[0];
    assert_eq!(d.iothread.as_deref(), Some("io0"));
    assert_eq!(
        d.cache,
        CacheMode::None,
        "config-wce=off keeps the cache mode"
    );
    assert_eq!((d.queue_size, d.num_queues), (1024, 2));
    assert!(
        imported
            .ignored
            .iter()
            .any(|s| s.contains("config-wce=off"))
    );
}

#[test]
fn sizes_and_vcpus_read_as_qemu_reads_them() {
    for (m, mib) in [
        ("512", 512),
        ("1.5G", 1536),
        ("2048M", 2048),
        ("size=1g", 1024),
        ("4194304k", 4096),
    ] {
        let c = import_ok(&format!("-m {m}")).config;
        assert_eq!(c.memory.size_mib, mib, "-m {m}");
    }
    for (smp, n) in [
        ("3", 3),
        ("cpus=6,maxcpus=8", 6),
        ("sockets=2,cores=4,threads=2", 16),
    ] {
        let c = import_ok(&format!("-smp {smp}")).config;
        assert_eq!(c.cpus.boot_vcpus, n, "-smp {smp}");
    }
    let i = import_ok("-smp cpus=6,maxcpus=8");
    assert!(
        i.ignored.iter().any(|s| s.contains("maxcpus=8")),
        "{:?}",
        i.ignored
    );
}

#[test]
fn unsupported_options_are_listed_once_each() {
    let imported = import_ok(
        "qemu-system-x86_64 -nographic -vga none -drive file=/a.img,if=ide,format=raw \
         -cdrom /b.iso -device e1000,netdev=n0 -usb -device usb-tablet /c.img \
         -drive if=none,id=orphan,file=/d.raw,format=raw \
         -blockdev driver=file,node-name=lonely,filename=/e.raw \
         -drive if=virtio,file=/f.raw,format=raw,copy-on-read=on,detect-zeroes=on",
    );
    let said = &imported.ignored;
    for item in [
        "-nographic",
        "-vga none",
        "-drive file=/a.img,if=ide,format=raw (if=ide: only virtio disks)",
        "-cdrom /b.iso",
        "-device e1000,netdev=n0",
        "-usb",
        "-device usb-tablet",
        "/c.img (a bare image is an IDE disk)",
        "-drive id=orphan: no virtio-blk device uses it",
        "-blockdev node-name=lonely: no virtio-blk device uses it",
        "-drive id=virtio0: copy-on-read=on",
        "-drive id=virtio0: detect-zeroes=on",
    ] {
        assert_eq!(
            said.iter().filter(|s| s.as_str() == item).count(),
            1,
            "{item:?} in {said:#?}"
        );
    }
    assert_eq!(imported.config.disks.len(), 1);
}

#[test]
fn what_cannot_be_imported_is_refused_with_the_reason() {
    refused(&[
        ("-m", "-m needs a value"),
        (
            "-drive if=virtio,format=vmdk,file=/a",
            "format=vmdk is not supported",
        ),
        ("-drive if=virtio,format=raw", "no file="),
        (
            "-drive if=virtio,file=/a,format=raw,cache=sometimes",
            "cache=sometimes",
        ),
        (
            "-drive if=virtio,file=/a,format=raw,aio=native",
            "aio=native needs",
        ),
        (
            "-drive if=virtio,file=/a,format=raw,media=cdrom",
            "media=cdrom is not a disk",
        ),
        (
            "-drive if=virtio,file=https://x/y,format=raw",
            "only local files and NBD",
        ),
        ("-device virtio-blk-pci,id=v", "no drive="),
        ("-device virtio-blk-pci,drive=nope", "drive=nope names no"),
        (
            "-drive if=virtio,id=d0,file=/a,format=raw -device virtio-blk-pci,drive=d0",
            "used by two devices",
        ),
        ("-snapshot", "-snapshot"),
        (
            "-drive if=virtio,file=/a,format=raw,snapshot=on",
            "snapshot=on",
        ),
        (
            "-drive if=virtio,file=/a,format=raw,offset=4096",
            "raw offset=",
        ),
        (
            "-object throttle-group,id=g -object throttle-group,id=g",
            "given twice",
        ),
        (
            "-blockdev driver=nbd,node-name=n,server.type=unix -device virtio-blk-pci,drive=n",
            "server.type=unix needs server.path",
        ),
        (
            "-drive if=virtio,file=nbd:h:http,format=raw",
            "bad NBD port \"http\"",
        ),
        (
            "-drive if=none,id=d0,file=/a,format=raw -device virtio-blk-pci,drive=d0 -device virtio-blk-pci,drive=d0",
            "used by two devices",
        ),
        (
            "-drive if=none,id=d0,file=/a,format=raw -device virtio-blk-pci,drive=d0,iothread=io9",
            "iothread io9 has no -object",
        ),
        (
            "-blockdev driver=vmdk,node-name=v,file=f -device virtio-blk-pci,drive=v",
            "driver=vmdk is not supported",
        ),
        (
            "-blockdev driver=raw,node-name=a,file=b -blockdev driver=raw,node-name=b,file=a -device virtio-blk-pci,drive=a",
            "used twice",
        ),
        (
            "-blockdev driver=raw,node-name=a -device virtio-blk-pci,drive=a",
            "needs file=",
        ),
        ("-blockdev driver=file,filename=/a", "without node-name"),
        (
            "-blockdev driver=file,node-name=a,filename=/a -blockdev driver=file,node-name=a,filename=/b",
            "given twice",
        ),
        ("-blockdev '{\"driver\":\"file\",' -device x", "bad JSON"),
        (
            "-blockdev driver=nbd,node-name=n,server.type=inet,server.host=h,tls-creds=t -device virtio-blk-pci,drive=n",
            "TLS",
        ),
        (
            "-blockdev driver=raw,node-name=r,offset=512,file.driver=file,file.filename=/a -device virtio-blk-pci,drive=r",
            "offset= and size=",
        ),
        (
            "-device virtio-blk-pci,drive=d,num-queues=lots -drive if=none,id=d,file=/a,format=raw",
            "num-queues=lots",
        ),
        ("-smp 0", "no vCPU"),
        ("-m 12Q", "size \"12Q\""),
        ("-set device.x", "expected GROUP.ID.PROPERTY=VALUE"),
    ]);
}

#[test]
fn option_strings_parse_as_qemu_parses_them() {
    let mut o = opts::Opts::parse(
        "virtio-blk-pci,serial=a,,b,readonly,id=x,id=y",
        Some("driver"),
    )
    .unwrap();
    assert_eq!(o.take("driver").as_deref(), Some("virtio-blk-pci"));
    assert_eq!(o.take("serial").as_deref(), Some("a,b"), ",, is a comma");
    assert_eq!(
        o.take("readonly").as_deref(),
        Some("on"),
        "a bare flag is on"
    );
    assert_eq!(o.take("id").as_deref(), Some("y"), "the last one wins");
    assert!(o.untaken().is_empty());
    let mut j = opts::Opts::parse(r#"{"a":{"b":[1,{"c":true}]},"d":null}"#, None).unwrap();
    assert_eq!(j.take("a.b.0").as_deref(), Some("1"));
    assert_eq!(j.take("a.b.1.c").as_deref(), Some("on"));
    assert_eq!(j.untaken(), ["d=null"]);
}

#[test]
fn the_finer_points_follow_qemu() {
    let i = import_ok(
        "-mem-prealloc -smp maxcpus=3 \
         -object iothread,id=io0,aio-max-batch=0 \
         -drive if=virtio,file=nbd:[::1]:10811:exportname=e,format=raw,werror=stop \
         -drive if=virtio,file=nbd:example.com:10812,format=raw \
         -drive if=none,id=d2,file=/a.raw,format=raw,file.locking=off,cache=none,aio=native \
         -device virtio-blk-pci,drive=d2,id=v2,werror=auto,write-cache=auto \
         -set drive.d2.throttling.iops-total=90 \
         -global virtio-blk-pci.queue-size=128 -global virtio-blk-pci.queue-size=64 \
         -global kvm-pit.lost_tick_policy=delay \
         -blockdev driver=nbd,node-name=n3,server.type=inet,server.host=10.0.0.3,server.port=10813 \
         -blockdev driver=raw,node-name=r3,file=n3,cache.no-flush=on \
         -device virtio-blk-pci,drive=r3,id=v3 \
         -blockdev driver=file,node-name=base-file,filename=/base.qcow2 \
         -blockdev driver=qcow2,node-name=base,file=base-file,backing=null \
         -blockdev driver=file,node-name=top-file,filename=/top.qcow2 \
         -blockdev driver=qcow2,node-name=top,file=top-file,backing=base \
         -device virtio-blk-pci,drive=top,id=v4 \
         -blockdev driver=file,node-name=lone-file,filename=/lone.qcow2 \
         -blockdev driver=qcow2,node-name=lone,file=lone-file,backing=null \
         -device virtio-blk-pci,drive=lone,id=v5",
    );
    let c = &i.config;
    accepted(c);
    assert_eq!(c.memory.size_mib, 128, "QEMU's default");
    assert_eq!(c.cpus.boot_vcpus, 3, "maxcpus without cpus");
    assert_eq!(c.iothreads[0].aio_max_batch, 32, "0 is the default");
    let uri =
        |id: &str| -> block::nbd::NbdUri { disk(c, id).path.to_str().unwrap().parse().unwrap() };
    // The devices first, then those of -drive if=virtio, as QEMU makes them.
    let ids: Vec<&str> = c.disks.iter().map(|d| d.id.as_str()).collect();
    assert_eq!(ids, ["v2", "v3", "v4", "v5", "virtio0", "virtio1"]);
    assert_eq!(
        uri("virtio0").address,
        block::nbd::NbdAddress::Tcp {
            host: "::1".into(),
            port: 10811
        }
    );
    assert_eq!(uri("virtio0").export, "e");
    assert_eq!(disk(c, "virtio0").on_write_error, WriteErrorPolicy::Stop);
    assert_eq!(
        uri("virtio1").address,
        block::nbd::NbdAddress::Tcp {
            host: "example.com".into(),
            port: 10812
        }
    );
    let v2 = disk(c, "v2");
    assert_eq!(v2.path.to_str(), Some("/a.raw"));
    assert_eq!((v2.cache, v2.aio), (CacheMode::None, AioKind::Native));
    assert_eq!(
        v2.on_write_error,
        WriteErrorPolicy::Enospc,
        "werror=auto: the drive's"
    );
    assert_eq!(
        v2.throttle.as_ref().map(|t| t.iops_total),
        Some(90),
        "-set with a dotted key"
    );
    assert_eq!(v2.queue_size, 64, "the last -global wins");
    assert_eq!(
        disk(c, "virtio0").queue_size,
        64,
        "-global reaches if=virtio disks too"
    );
    let v3 = disk(c, "v3");
    assert_eq!(
        uri("v3").address,
        block::nbd::NbdAddress::Tcp {
            host: "10.0.0.3".into(),
            port: 10813
        }
    );
    assert_eq!(v3.cache, CacheMode::Unsafe, "cache.no-flush=on");
    assert_eq!(disk(c, "v4").path.to_str(), Some("/top.qcow2"));
    assert_eq!(disk(c, "v4").format, ImageFormat::Qcow2);
    let said = i.ignored.join("\n");
    for item in [
        "-mem-prealloc",
        "node file: locking=off (we always lock the image)",
        "-global kvm-pit.lost_tick_policy=delay (no virtio-blk device)",
        "node lone: backing=null",
    ] {
        assert!(said.contains(item), "{item:?} not in:\n{said}");
    }
    assert!(
        i.notes.iter().any(|n| n == "no -m: QEMU's 128 MiB"),
        "{:?}",
        i.notes
    );
    // The backing chain's nodes are the image header's: neither unused nor refused.
    assert!(!said.contains("node-name=base"), "{said}");
    assert!(!said.contains("queue-size"), "{said}");
}

#[test]
fn probing_refuses_other_formats_and_never_blocks() {
    let dir = tempfile::tempdir().unwrap();
    let vmdk = dir.path().join("a.vmdk");
    let mut header = b"KDMV".to_vec();
    header.resize(512, 0);
    std::fs::write(&vmdk, header).unwrap();
    let err = import_err(&format!("-drive if=virtio,file={}", vmdk.display()));
    assert!(err.contains("is a vmdk image"), "{err}");
    let qcow1 = dir.path().join("a.qcow");
    let mut header = b"QFI\xfb\0\0\0\x01".to_vec();
    header.resize(512, 0);
    std::fs::write(&qcow1, header).unwrap();
    let err = import_err(&format!("-drive if=virtio,file={}", qcow1.display()));
    assert!(err.contains("qcow version 1"), "{err}");

    // A FIFO with no writer: opening it for reading would block.
    let fifo = dir.path().join("fifo");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let missing = dir.path().join("missing.img");
    let i = import_ok(&format!(
        "-drive if=virtio,file={},cache=none -drive if=virtio,file={}",
        fifo.display(),
        missing.display()
    ));
    assert!(i.config.disks.iter().all(|d| d.format == ImageFormat::Raw));
    let unread = i
        .ignored
        .iter()
        .filter(|s| s.contains("cannot be read here: taken as raw"))
        .count();
    assert_eq!(unread, 2, "{:?}", i.ignored);
}

#[test]
fn groups_formats_and_protocols_read_as_qemu_creates_them() {
    // Both drives name group g: the later -drive's limits are the group's, whatever
    // order the devices come in.
    let i = import_ok(
        "-drive if=none,id=a,file=/a,format=raw,throttling.group=g,throttling.iops-total=100 \
         -drive if=none,id=b,file=/b,format=raw,throttling.group=g,throttling.iops-total=200 \
         -device virtio-blk-pci,drive=b,id=vb -device virtio-blk-pci,drive=a,id=va \
         -drive if=virtio,id=c,file=/c.img,driver=raw \
         -drive if=virtio,id=f,file=file:/var/f.img,format=raw",
    );
    let c = &i.config;
    assert_eq!(c.throttle_groups.len(), 1);
    assert_eq!(c.throttle_groups[0].limits.iops_total, 200);
    assert_eq!(disk(c, "va").throttle_group.as_deref(), Some("g"));
    assert!(
        i.notes
            .iter()
            .any(|n| n.starts_with("-drive id=b: throttle group g had other limits")),
        "{:?}",
        i.notes
    );
    // driver= names the format: no probe.
    assert_eq!(disk(c, "c").format, ImageFormat::Raw);
    assert!(
        !i.notes.iter().any(|n| n.contains("probes")),
        "{:?}",
        i.notes
    );
    assert_eq!(
        disk(c, "f").path.to_str(),
        Some("/var/f.img"),
        "file: is a protocol"
    );
    refused(&[
        (
            "-drive if=virtio,file=rbd:pool/img,format=raw",
            "only local files and NBD",
        ),
        (
            "-drive if=virtio,file=/a,driver=vmdk",
            "format=vmdk is not supported",
        ),
    ]);
}

#[test]
fn the_third_read_of_qemu_semantics() {
    // A drive with limits and no group is a group of its own id, which another joins.
    let i = import_ok(
        "-drive if=none,id=a,file=/a,format=raw,iops=100 \
         -drive if=none,id=b,file=/b,format=raw,throttling.group=a,iops=200 \
         -device virtio-blk-pci,drive=a,id=va -device virtio-blk-pci,drive=b,id=vb \
         -drive if=virtio,id=h,file=/dev/sdb,driver=host_device \
         -global virtio-blk-device.queue-size=64 -global virtio-blk-pci.queue-size=128",
    );
    let c = &i.config;
    assert_eq!(disk(c, "va").throttle_group.as_deref(), Some("a"));
    assert_eq!(disk(c, "vb").throttle_group.as_deref(), Some("a"));
    assert_eq!(c.throttle_groups[0].limits.iops_total, 200);
    assert_eq!(disk(c, "h").format, ImageFormat::Raw, "driver=host_device");
    assert_eq!(
        disk(c, "va").queue_size,
        128,
        "the model's own -global first"
    );

    // Words before the program are its environment only when a program follows.
    let i = import_ok("a=b.img -m 1G");
    assert!(
        i.ignored.iter().any(|s| s.starts_with("a=b.img")),
        "{:?}",
        i.ignored
    );

    refused(&[
        (
            "-blockdev driver=file,node-name=bf,filename=/base.qcow2 \
             -blockdev driver=qcow2,node-name=base,file=bf \
             -blockdev driver=file,node-name=tf,filename=/top.qcow2 \
             -blockdev driver=qcow2,node-name=top,file=tf,backing=base \
             -device virtio-blk-pci,drive=top,id=t -device virtio-blk-pci,drive=base,id=b",
            "is a backing file of another image",
        ),
        (
            "-drive if=virtio,file=/a,format=raw,driver=raw",
            "both given",
        ),
        (
            "-drive if=virtio,file=nbd:h:1,file.reconnect-delay=5,format=raw",
            "file.driver=nbd",
        ),
        (
            "-drive if=virtio,file=rbd:pool/x,file.locking=off,format=raw",
            "only local files and NBD",
        ),
    ]);
    // Read-only, the backing file may be a disk too.
    import_ok(
        "-blockdev driver=file,node-name=bf,filename=/base.qcow2 \
         -blockdev driver=qcow2,node-name=base,file=bf,read-only=on \
         -blockdev driver=file,node-name=tf,filename=/top.qcow2 \
         -blockdev driver=qcow2,node-name=top,file=tf,backing=base \
         -device virtio-blk-pci,drive=top,id=t -device virtio-blk-pci,drive=base,id=b",
    );
}
