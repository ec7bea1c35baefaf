//! `vmctl import-qemu`: a QEMU command line turned into our VM config. What maps: `-name`,
//! `-m`, `-smp`, `-kernel`, `-initrd`, `-append`, `-mem-path` (huge pages), the first
//! `-serial` to a file, socket or stdio, `-object iothread` and `-object throttle-group`,
//! and every virtio-blk disk: `-drive if=virtio`, or `-device virtio-blk-pci` on a
//! `-drive if=none` or a `-blockdev` graph (file, host_device, raw, qcow2, nbd and
//! throttle nodes). Options may be `key=value,...` or JSON, as libvirt writes them.
//! Everything else (and every key nothing read) is listed as ignored; where QEMU's
//! default differs from ours in a way the guest or the data would notice, QEMU's is kept.

mod disks;
mod opts;

use std::collections::BTreeMap;

use block::throttle::ThrottleLimits;
use devices::config::{IoThreadConfig, MAX_QUEUES};
use vmm::config::{SerialMode, VmConfig};

use super::{ImportError, Imported, MAX_IOTHREADS, Said};
use disks::{DiskSource, Graph};
use opts::{Opts, size_bytes};

/// QEMU options that take no argument.
const FLAGS: &[&str] = &[
    "enable-kvm",
    "nographic",
    "nodefaults",
    "no-user-config",
    "no-reboot",
    "no-shutdown",
    "S",
    "s",
    "snapshot",
    "daemonize",
    "no-hpet",
    "no-acpi",
    "full-screen",
    "no-fd-bootchk",
    "usb",
    "win2k-hack",
    "no-quit",
    "only-migratable",
    "preconfig",
    "enable-sync-profile",
    "alt-grab",
    "ctrl-grab",
    "no-frame",
    "version",
    "help",
    "h",
    "mem-prealloc",
    "async-teardown",
    "xen-attach",
    "xen-domid-restrict",
    "perfmap",
    "jitdump",
    "singlestep",
    "sdl",
    "curses",
    "nodefconfig",
    "no-kvm",
];

/// The virtio-blk device models (PCI first: their queue count defaults to the vCPUs).
const VIRTIO_BLK_PCI: &[&str] = &[
    "virtio-blk-pci",
    "virtio-blk",
    "virtio-blk-pci-non-transitional",
    "virtio-blk-pci-transitional",
];

/// Imports the QEMU command line `args` (leading `VAR=value` words and the program name
/// are skipped).
pub fn import<S: AsRef<str>>(args: &[S]) -> Result<Imported, ImportError> {
    let mut args: Vec<&str> = args.iter().map(AsRef::as_ref).collect();
    // A libvirt log line starts with the environment (`LC_ALL=C PATH=... qemu-...`).
    let env_word = |a: &str| {
        a.split_once('=').is_some_and(|(k, _)| {
            k.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
                && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        })
    };
    let program = |a: &str| {
        let base = a.rsplit('/').next().unwrap_or(a);
        base.starts_with("qemu") || base.starts_with("kvm")
    };
    if let Some(p) = args.iter().position(|a| !env_word(a))
        && p > 0
        && program(args[p])
    {
        args.drain(..p);
    }
    if args
        .first()
        .is_some_and(|a| !a.starts_with('-') && program(a))
    {
        args.remove(0);
    }
    let mut ignored = Said::default();
    let mut config: VmConfig = serde_json::from_value(serde_json::json!({
        "id": "qemu-vm",
        "payload": {"kernel": ""},
    }))
    .map_err(|e| ImportError::Invalid(e.to_string()))?;
    let mut named = false;
    let mut sized = false;
    let mut virtio_drives = 0;
    let mut drive_devices = Vec::new();
    let mut json_devices = Vec::new();
    let mut serial_set = false;
    let mut graph = Graph::default();
    let mut groups: BTreeMap<String, ThrottleLimits> = BTreeMap::new();
    let mut sets = Vec::new();
    let mut i = 0;
    while i < args.len() {
        let arg = args[i];
        i += 1;
        let Some(option) = arg.strip_prefix("--").or_else(|| arg.strip_prefix('-')) else {
            ignored.push(format!("{arg} (a bare image is an IDE disk)"));
            continue;
        };
        if option == "snapshot" {
            return Err(ImportError::Invalid(
                "-snapshot (writes thrown away at exit) is not supported".into(),
            ));
        }
        if FLAGS.contains(&option) {
            if option != "enable-kvm" {
                ignored.push(arg.to_string());
            }
            continue;
        }
        let Some(&value) = args.get(i) else {
            return Err(ImportError::Invalid(format!("{arg} needs a value")));
        };
        i += 1;
        match option {
            "name" => {
                let mut o = Opts::parse(value, Some("guest"))?;
                if let Some(name) = o.take("guest") {
                    config.id = name;
                    named = true;
                }
                list_untaken(&o, &format!("-name {value}"), &mut ignored);
            }
            "m" => {
                let mut o = Opts::parse(value, Some("size"))?;
                if let Some(size) = o.take("size") {
                    config.memory.size_mib = size_bytes(&size, 1 << 20)?.div_ceil(1 << 20);
                    sized = true;
                }
                list_untaken(&o, "-m", &mut ignored);
            }
            "smp" => {
                config.cpus.boot_vcpus = smp(value, &mut ignored)?;
            }
            "kernel" => config.payload.kernel = value.into(),
            "initrd" => config.payload.initramfs = Some(value.into()),
            "append" => config.payload.cmdline = value.to_string(),
            "mem-path" if value.contains("huge") => {
                config.memory.hugepages = true;
                ignored.note(format!(
                    "-mem-path {value}: taken as huge pages (we use 2 MiB pages of our own)"
                ));
            }
            "accel" if value.split(',').next() == Some("kvm") => {
                if let Some((_, rest)) = value.split_once(',') {
                    ignored.push(format!("-accel kvm: {rest}"));
                }
            }
            "serial" if !serial_set => {
                serial_set = true;
                serial(value, &mut config, &mut ignored);
            }
            "object" => {
                let mut o = Opts::parse(value, Some("qom-type"))?;
                match o.take("qom-type").as_deref() {
                    Some("iothread") => {
                        if config.iothreads.len() >= MAX_IOTHREADS as usize {
                            return Err(ImportError::Invalid(format!(
                                "at most {MAX_IOTHREADS} iothreads"
                            )));
                        }
                        config.iothreads.push(iothread(&mut o)?);
                        list_untaken(&o, &format!("-object iothread {value}"), &mut ignored);
                    }
                    Some("throttle-group") => {
                        let id = o.take("id").ok_or_else(|| {
                            ImportError::Invalid("-object throttle-group without id=".into())
                        })?;
                        let mut limits = ThrottleLimits::default();
                        for prefix in ["x-", "limits."] {
                            for (k, v) in o.take_prefix(prefix) {
                                let name = k.replace('-', "_");
                                if !set_limit(&mut limits, &name, &v)? {
                                    ignored
                                        .push(format!("-object throttle-group {id}: {prefix}{k}"));
                                }
                            }
                        }
                        if groups.insert(id.clone(), limits).is_some() {
                            return Err(ImportError::Invalid(format!(
                                "-object throttle-group,id={id} is given twice"
                            )));
                        }
                        list_untaken(&o, "-object throttle-group", &mut ignored);
                    }
                    _ => ignored.push(format!("-object {value}")),
                }
            }
            "drive" => {
                let mut o = Opts::parse(value, None)?;
                match o.peek("if").unwrap_or("ide") {
                    "none" => graph.sources.push(DiskSource::Drive(o)),
                    "virtio" => {
                        // QEMU makes it a virtio-blk-pci device on a drive of its own.
                        let id = o
                            .peek("id")
                            .map_or_else(|| format!("virtio{virtio_drives}"), str::to_string);
                        virtio_drives += 1;
                        o.set("id", &id, true);
                        o.set("if", "none", false);
                        graph.sources.push(DiskSource::Drive(o));
                        // QEMU adds these devices after the key=value -devices.
                        let mut dev = Opts::default();
                        dev.set("driver", "virtio-blk-pci", false);
                        dev.set("drive", &id, false);
                        drive_devices.push(DiskSource::Device(dev));
                    }
                    other => {
                        ignored.push(format!("-drive {value} (if={other}: only virtio disks)"))
                    }
                }
            }
            "blockdev" => graph.add_node(Opts::parse(value, None)?)?,
            "device" => {
                let o = Opts::parse(value, Some("driver"))?;
                match o.peek("driver") {
                    // QEMU creates the key=value devices first, then those of
                    // -drive if=virtio, then the JSON ones.
                    Some(d) if VIRTIO_BLK_PCI.contains(&d) || d == "virtio-blk-device" => {
                        if o.is_json() {
                            json_devices.push(DiskSource::Device(o));
                        } else {
                            graph.sources.push(DiskSource::Device(o));
                        }
                    }
                    _ => ignored.push(format!("-device {value}")),
                }
            }
            "set" => sets.push(value.to_string()),
            "global" => graph.globals.push(global(value)?),
            _ => ignored.push(format!("{arg} {value}")),
        }
    }
    graph.sources.extend(drive_devices);
    graph.sources.extend(json_devices);
    if !sized {
        config.memory.size_mib = 128;
        ignored.note("no -m: QEMU's 128 MiB".into());
    }
    if !named {
        ignored.note("no -name: the VM is called qemu-vm".into());
    }
    if config.payload.kernel.as_os_str().is_empty() {
        ignored.push("no -kernel (we boot a kernel directly; set payload.kernel)".into());
    }
    for s in sets {
        graph.apply_set(&s, &mut ignored)?;
    }
    let vcpus = config.cpus.boot_vcpus;
    let default_queues = (vcpus.clamp(1, MAX_QUEUES), vcpus > MAX_QUEUES);
    config.disks = graph.disks(default_queues, &mut groups, &mut ignored)?;
    for d in &config.disks {
        let threads = d
            .iothread
            .iter()
            .chain(d.iothread_vq_mapping.iter().flatten().map(|m| &m.iothread));
        for t in threads {
            if !config.iothreads.iter().any(|i| &i.id == t) {
                return Err(ImportError::Invalid(format!(
                    "disk {}: iothread {t} has no -object iothread,id={t}",
                    d.id
                )));
            }
        }
    }
    Ok(Imported::new(config, groups, ignored))
}

/// Lists the keys of `o` that nothing took, as `what: key=value`.
fn list_untaken(o: &Opts, what: &str, ignored: &mut Said) {
    for k in o.untaken() {
        ignored.push(format!("{what}: {k}"));
    }
}

/// `-smp N` or `-smp cpus=N,sockets=,cores=,threads=`: the vCPUs booted (QEMU boots
/// `cpus`, or the topology's product when only that is given).
fn smp(value: &str, ignored: &mut Said) -> Result<u16, ImportError> {
    let mut o = Opts::parse(value, Some("cpus"))?;
    let cpus: Option<u16> = o.take_number("cpus")?;
    // Without cpus=, QEMU boots maxcpus= vCPUs.
    let cpus = match o.take_number::<u16>("maxcpus")? {
        Some(max) if cpus.is_some_and(|c| c != max) => {
            ignored.push(format!("-smp {value}: maxcpus={max} (no vCPU hot plug)"));
            cpus
        }
        max => cpus.or(max),
    };
    let mut product: Option<u32> = None;
    for k in [
        "sockets", "dies", "clusters", "cores", "threads", "books", "drawers",
    ] {
        if let Some(n) = o.take_number::<u32>(k)? {
            product = Some(product.unwrap_or(1).saturating_mul(n));
        }
    }
    list_untaken(&o, &format!("-smp {value}"), ignored);
    let n = match (cpus, product) {
        (Some(c), _) => c,
        (None, Some(p)) => u16::try_from(p)
            .map_err(|_| ImportError::Invalid(format!("-smp {value}: too many vCPUs")))?,
        (None, None) => 1,
    };
    if n == 0 {
        return Err(ImportError::Invalid(format!("-smp {value}: no vCPU")));
    }
    Ok(n)
}

/// `-object iothread,id=,poll-max-ns=,poll-grow=,poll-shrink=,aio-max-batch=`.
fn iothread(o: &mut Opts) -> Result<IoThreadConfig, ImportError> {
    let id = o
        .take("id")
        .ok_or_else(|| ImportError::Invalid("-object iothread without id=".into()))?;
    let mut t = IoThreadConfig::new(id);
    if let Some(v) = o.take_number("poll-max-ns")? {
        t.poll_max_ns = v;
    }
    if let Some(v) = o.take_number("poll-grow")? {
        t.poll_grow = v;
    }
    if let Some(v) = o.take_number("poll-shrink")? {
        t.poll_shrink = v;
    }
    // 0 is QEMU's "the engine's default", which ours is anyway.
    if let Some(v) = o.take_number("aio-max-batch")?.filter(|&v| v != 0) {
        t.aio_max_batch = v;
    }
    Ok(t)
}

/// The first `-serial`: `file:PATH`, `unix:PATH,server=on,...` (we listen), `stdio`,
/// `none`/`null`; other back ends are listed as ignored.
fn serial(value: &str, config: &mut VmConfig, ignored: &mut Said) {
    if let Some(path) = value.strip_prefix("file:") {
        config.serial.mode = SerialMode::File;
        config.serial.path = Some(path.into());
    } else if let Some(rest) = value.strip_prefix("unix:") {
        let mut parts = rest.split(',');
        let path = parts.next().unwrap_or_default();
        if parts.any(|p| p == "server" || p == "server=on") {
            config.serial.mode = SerialMode::Socket;
            config.serial.path = Some(path.into());
        } else {
            ignored.push(format!("-serial {value} (we listen: add server=on)"));
        }
    } else if value == "stdio" {
        config.serial.mode = SerialMode::Stdout;
    } else if value != "none" && value != "null" {
        ignored.push(format!("-serial {value}"));
    }
}

/// `-global DRIVER.PROP=VALUE` or `-global driver=,property=,value=`.
fn global(value: &str) -> Result<(String, String, String), ImportError> {
    let bad = || ImportError::Invalid(format!("-global {value}: expected DRIVER.PROPERTY=VALUE"));
    if let Some((lhs, v)) = value.split_once('=')
        && let Some((driver, prop)) = lhs.split_once('.')
        && !lhs.contains(',')
    {
        return Ok((driver.into(), prop.into(), v.into()));
    }
    let mut o = Opts::parse(value, None)?;
    match (o.take("driver"), o.take("property"), o.take("value")) {
        (Some(d), Some(p), Some(v)) => Ok((d, p, v)),
        _ => Err(bad()),
    }
}

/// Sets our throttle field `name` (QEMU's names with `_` for `-`: `bps_total_max`) to
/// `value`; false when we have no such limit.
fn set_limit(limits: &mut ThrottleLimits, name: &str, value: &str) -> Result<bool, ImportError> {
    let n: u64 = value.parse().map_err(|_| {
        ImportError::Invalid(format!("throttle limit {name}={value}: not a number"))
    })?;
    let mut v = serde_json::to_value(&*limits).map_err(|e| ImportError::Invalid(e.to_string()))?;
    if let Some(m) = v.as_object_mut() {
        m.insert(name.to_string(), n.into());
    }
    match serde_json::from_value(v) {
        Ok(l) => {
            *limits = l;
            Ok(true)
        }
        Err(_) => Ok(false),
    }
}

#[cfg(test)]
mod tests;
