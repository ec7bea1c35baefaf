//! `vmctl import-libvirt`: a libvirt domain XML turned into our VM config. What maps
//! (name, memory, vCPUs, direct kernel boot, iothreads and their pinning, virtio disks
//! with their driver, source, iotune, read-only and serial, the first serial port to a
//! file or socket) becomes JSON that
//! `vm.create` takes unchanged; everything else is listed as ignored, so the caller can
//! show it (or, with `--strict`, refuse). Parsed with a real XML parser (`roxmltree`):
//! bad XML is an error naming its line and column.

use std::collections::BTreeMap;

use block::throttle::ThrottleLimits;
use block::{AioKind, CacheMode, ImageFormat};
use devices::config::{
    DiscardMode, DiskConfig, IoThreadConfig, ReadErrorPolicy, VqMapping, WriteErrorPolicy,
};
use roxmltree::{Document, Node};
use vmm::config::{SerialMode, VmConfig};

use super::{ImportError, Imported, MAX_IOTHREADS, Said, spread_queues};

/// The `iothread` id we give libvirt's iothread `n`.
fn iothread_id(n: &str) -> String {
    format!("iothread{n}")
}

/// Our id for a libvirt iothread id attribute (a number: `01` is `1`).
fn libvirt_iothread(id: Option<&str>) -> Result<String, ImportError> {
    let id = id.ok_or_else(|| ImportError::Invalid("an <iothread> without an id".into()))?;
    let n: u32 = id
        .trim()
        .parse()
        .map_err(|_| ImportError::Invalid(format!("iothread id '{id}' is not a number")))?;
    Ok(iothread_id(&n.to_string()))
}

/// The highest CPU number a cpuset may name.
const MAX_CPU: usize = 8191;

/// Imports the domain XML `xml`.
pub fn import(xml: &str) -> Result<Imported, ImportError> {
    let doc = Document::parse(xml).map_err(|e| {
        let pos = e.pos();
        ImportError::Xml {
            line: pos.row,
            column: pos.col,
            message: e.to_string(),
        }
    })?;
    let domain = doc.root_element();
    if domain.tag_name().name() != "domain" {
        return Err(ImportError::Invalid(format!(
            "the root element is <{}>, not <domain>",
            domain.tag_name().name()
        )));
    }
    let mut ignored = Said::default();
    let name = child_text(domain, "name")
        .ok_or_else(|| ImportError::Invalid("the domain has no <name>".into()))?;
    let mut config: VmConfig = serde_json::from_value(serde_json::json!({
        "id": name,
        "payload": {"kernel": ""},
    }))
    .map_err(|e| ImportError::Invalid(e.to_string()))?;
    let mut seen = std::collections::BTreeSet::new();
    for el in domain.children().filter(Node::is_element) {
        let tag = el.tag_name().name();
        if !seen.insert((el.tag_name().namespace().unwrap_or(""), tag)) {
            // Only the first of each is read.
            ignored.push(format!("{tag} (a second one)"));
            continue;
        }
        match tag {
            "name" | "devices" | "os" | "iothreadids" | "cputune" => {}
            "commandline" if el.tag_name().namespace() == Some(QEMU_NS) => {}
            "memory" => config.memory.size_mib = memory_mib(el)?,
            "vcpu" => {
                // libvirt boots `current` vCPUs (the text is the most it may hot plug).
                config.cpus.boot_vcpus = match el.attribute("current") {
                    Some(c) => c.parse().map_err(|_| {
                        ImportError::Invalid(format!("<vcpu current='{c}'> is not a number"))
                    })?,
                    None => number(el, "<vcpu>")?,
                };
                if el.attribute("cpuset").is_some() {
                    ignored.push("vcpu@cpuset".into());
                }
            }
            "iothreads" => {
                let n: u32 = number(el, "<iothreads>")?;
                if n > MAX_IOTHREADS {
                    return Err(ImportError::Invalid(format!(
                        "<iothreads>{n}</iothreads>: at most {MAX_IOTHREADS}"
                    )));
                }
                if child(domain, "iothreadids").is_none() {
                    config.iothreads = (1..=n)
                        .map(|i| IoThreadConfig::new(iothread_id(&i.to_string())))
                        .collect();
                }
            }
            "memoryBacking" => {
                for m in el.children().filter(Node::is_element) {
                    match m.tag_name().name() {
                        "hugepages" => {
                            config.memory.hugepages = true;
                            if m.children().any(|p| p.has_tag_name("page")) {
                                ignored.push(
                                    "memoryBacking/hugepages/page (we use 2 MiB pages)".into(),
                                );
                            }
                        }
                        other => ignored.push(format!("memoryBacking/{other}")),
                    }
                }
            }
            other => ignored.push(other.to_string()),
        }
    }
    if let Some(ids) = child(domain, "iothreadids") {
        for t in ids.children().filter(|n| n.has_tag_name("iothread")) {
            let id = libvirt_iothread(t.attribute("id"))?;
            if config.iothreads.len() >= MAX_IOTHREADS as usize {
                return Err(ImportError::Invalid(format!(
                    "<iothreadids>: at most {MAX_IOTHREADS} iothreads"
                )));
            }
            config.iothreads.push(IoThreadConfig::new(id));
        }
    }
    if let Some(tune) = child(domain, "cputune") {
        for el in tune.children().filter(Node::is_element) {
            if el.has_tag_name("iothreadpin") {
                let (Some(id), Some(set)) = (el.attribute("iothread"), el.attribute("cpuset"))
                else {
                    return Err(ImportError::Invalid(
                        "<iothreadpin> needs iothread= and cpuset=".into(),
                    ));
                };
                let cpus = cpu_set(set)?;
                let id = libvirt_iothread(Some(id))?;
                match config.iothreads.iter_mut().find(|t| t.id == id) {
                    Some(t) => t.cpu_affinity = cpus,
                    None => ignored.push(format!("cputune/iothreadpin: no iothread {id}")),
                }
            } else {
                ignored.push(format!("cputune/{}", el.tag_name().name()));
            }
        }
    }
    if let Some(os) = child(domain, "os") {
        for el in os.children().filter(Node::is_element) {
            let text = el.text().unwrap_or_default().trim().to_string();
            match el.tag_name().name() {
                "kernel" => config.payload.kernel = text.into(),
                "initrd" => config.payload.initramfs = Some(text.into()),
                "cmdline" => config.payload.cmdline = text,
                "type" => {}
                other => ignored.push(format!("os/{other}")),
            }
        }
    }
    if config.payload.kernel.as_os_str().is_empty() {
        ignored.push("os: no <kernel> (we boot a kernel directly; set payload.kernel)".into());
    }
    let mut groups: BTreeMap<String, ThrottleLimits> = BTreeMap::new();
    if let Some(devices) = child(domain, "devices") {
        for el in devices.children().filter(Node::is_element) {
            if el.has_tag_name("disk") {
                if let Some(disk) = import_disk(el, &mut ignored, &mut groups)? {
                    config.disks.push(disk);
                }
            } else if el.has_tag_name("serial")
                && matches!(el.attribute("type"), Some("file" | "unix"))
                && config.serial.mode == SerialMode::Null
                && child(el, "target")
                    .and_then(|t| t.attribute("port"))
                    .is_none_or(|p| p == "0")
                && child(el, "source")
                    .and_then(|s| s.attribute("mode"))
                    .is_none_or(|m| m == "bind")
            {
                // The first serial port (COM1), to a file or a Unix socket we listen on.
                let source = child(el, "source").and_then(|s| s.attribute("path"));
                let Some(path) = source else {
                    ignored.push("devices/serial: no <source path=>".into());
                    continue;
                };
                config.serial.mode = if el.attribute("type") == Some("file") {
                    SerialMode::File
                } else {
                    SerialMode::Socket
                };
                config.serial.path = Some(path.into());
            } else {
                ignored.push(format!("devices/{}", el.tag_name().name()));
            }
        }
    }
    if let Some(cmd) = domain
        .children()
        .find(|n| n.has_tag_name((QEMU_NS, "commandline")))
    {
        qemu_commandline(cmd, domain, &mut config, &mut ignored);
    }
    Ok(Imported::new(config, groups, ignored))
}

/// libvirt's namespace for `<qemu:commandline>`.
const QEMU_NS: &str = "http://libvirt.org/schemas/domain/qemu/1.0";

/// `<qemu:commandline>`: `-set device.ALIAS.x-data-plane=on` (the old data plane: the
/// disk gets a dedicated iothread) and `-set device.ALIAS.config-wce=off` (the guest may
/// not switch the write cache; the cache mode stays, and that is said in `ignored`);
/// other arguments are listed as ignored.
fn qemu_commandline(cmd: Node, domain: Node, config: &mut VmConfig, ignored: &mut Said) {
    let mut args: Vec<&str> = Vec::new();
    for n in cmd.children().filter(Node::is_element) {
        match (n.tag_name().name(), n.attribute("value")) {
            ("arg", Some(v)) => args.push(v),
            (other, _) => ignored.push(format!("qemu:commandline/{other}")),
        }
    }
    // Disk aliases (`<alias name='virtio-disk0'/>`) by target dev.
    let aliases: Vec<(String, String)> = child(domain, "devices")
        .into_iter()
        .flat_map(|d| d.children().filter(|n| n.has_tag_name("disk")))
        .filter_map(|d| {
            let alias = child(d, "alias")?.attribute("name")?.to_string();
            let dev = child(d, "target")?.attribute("dev")?.to_string();
            Some((alias, dev))
        })
        .collect();
    let mut i = 0;
    while i < args.len() {
        let (arg, value) = (args[i], args.get(i + 1).copied().unwrap_or(""));
        let set = (arg == "-set")
            .then(|| value.strip_prefix("device."))
            .flatten()
            .and_then(|rest| rest.split_once('.'))
            .and_then(|(alias, prop)| Some((alias, prop.split_once('=')?)));
        let disk = set.and_then(|(alias, _)| {
            let dev = aliases.iter().find(|(a, _)| a == alias).map(|(_, d)| d)?;
            config.disks.iter_mut().find(|d| &d.id == dev)
        });
        match (set, disk) {
            (Some((_, ("x-data-plane", "on"))), Some(disk)) => {
                // Our default: a dedicated iothread for the disk.
                disk.iothread = None;
                disk.iothread_vq_mapping = None;
            }
            (Some((_, ("config-wce", "off"))), Some(disk)) => {
                // QEMU keeps the cache mode; the guest only may not switch it.
                ignored.push(format!(
                    "qemu:commandline config-wce=off on disk {}: the guest may not switch the write cache in QEMU; ours may",
                    disk.id
                ));
            }
            _ => {
                ignored.push(
                    format!("qemu:commandline {arg} {value}")
                        .trim_end()
                        .to_string(),
                );
            }
        }
        i += if arg == "-set" { 2 } else { 1 };
    }
}

/// One `<disk>`: `None` (listed as ignored) unless a virtio disk.
fn import_disk(
    el: Node,
    ignored: &mut Said,
    groups: &mut BTreeMap<String, ThrottleLimits>,
) -> Result<Option<DiskConfig>, ImportError> {
    let device = el.attribute("device").unwrap_or("disk");
    let target = child(el, "target");
    let dev = target.and_then(|t| t.attribute("dev")).unwrap_or("");
    let bus = target.and_then(|t| t.attribute("bus")).unwrap_or("");
    if device == "disk" && bus == "virtio" && dev.is_empty() {
        return Err(ImportError::Invalid(
            "a virtio <disk> without <target dev=>".into(),
        ));
    }
    if device != "disk" || bus != "virtio" {
        ignored.push(format!(
            "devices/disk {dev}: device='{device}' bus='{bus}' (only virtio disks)"
        ));
        return Ok(None);
    }
    let kind = el.attribute("type").unwrap_or("file");
    let source = child(el, "source");
    let path = match (kind, source) {
        ("file", Some(s)) => s.attribute("file").map(str::to_string),
        ("block", Some(s)) => s.attribute("dev").map(str::to_string),
        ("network", Some(s)) if s.attribute("protocol") == Some("nbd") => {
            if s.attribute("tls") == Some("yes") {
                return Err(ImportError::Invalid(format!(
                    "disk {dev}: NBD over TLS is not supported"
                )));
            }
            Some(nbd_uri(s)?)
        }
        ("network", Some(s)) => {
            ignored.push(format!(
                "devices/disk {dev}: network protocol {:?} (only nbd)",
                s.attribute("protocol").unwrap_or("")
            ));
            return Ok(None);
        }
        _ => None,
    };
    let Some(path) = path else {
        ignored.push(format!(
            "devices/disk {dev}: type='{kind}' without a source"
        ));
        return Ok(None);
    };
    let mut disk = DiskConfig::new(dev, path);
    if let Some(r) = source.and_then(|s| child(s, "reconnect")) {
        let v = r.attribute("delay").unwrap_or("");
        disk.reconnect_delay = Some(
            v.parse()
                .map_err(|_| ImportError::Invalid(format!("disk {dev}: reconnect delay='{v}'")))?,
        );
    }
    for c in el.children().filter(Node::is_element) {
        match c.tag_name().name() {
            "source" | "target" | "alias" => {}
            "driver" => driver(c, &mut disk, ignored)?,
            "readonly" => disk.readonly = true,
            "serial" => disk.serial = c.text().map(|t| t.trim().to_string()),
            "iotune" => iotune(c, &mut disk, groups, ignored)?,
            other => ignored.push(format!("devices/disk {dev}/{other}")),
        }
    }
    Ok(Some(disk))
}

/// `<source protocol='nbd' name='EXPORT'><host name= port=/>` or `<host transport='unix'
/// socket=/>` as our NBD URI (escaped as the NBD URI format wants).
fn nbd_uri(source: Node) -> Result<String, ImportError> {
    use block::nbd::{NbdAddress, NbdUri};
    let export = source.attribute("name").unwrap_or("").to_string();
    let host = child(source, "host")
        .ok_or_else(|| ImportError::Invalid("an nbd <source> without a <host>".into()))?;
    let address = if host.attribute("transport") == Some("unix") {
        let socket = host
            .attribute("socket")
            .ok_or_else(|| ImportError::Invalid("a unix nbd <host> without socket=".into()))?;
        NbdAddress::Unix(socket.into())
    } else {
        let name = host
            .attribute("name")
            .ok_or_else(|| ImportError::Invalid("an nbd <host> without name=".into()))?;
        let port = host.attribute("port").unwrap_or("10809");
        let port = port
            .parse()
            .map_err(|_| ImportError::Invalid(format!("nbd port '{port}'")))?;
        NbdAddress::Tcp {
            host: name.trim_matches(|c| c == '[' || c == ']').to_string(),
            port,
        }
    };
    Ok(NbdUri { address, export }.to_string())
}

/// `<driver>`'s attributes and `<iothreads>` child on `disk`.
fn driver(d: Node, disk: &mut DiskConfig, ignored: &mut Said) -> Result<(), ImportError> {
    let bad = |what: &str, v: &str| ImportError::Invalid(format!("disk {}: {what}='{v}'", disk.id));
    for a in d.attributes() {
        let v = a.value();
        match a.name() {
            "name" => {}
            "type" => {
                disk.format = v
                    .parse::<ImageFormat>()
                    .map_err(|_| bad("driver type", v))?;
            }
            "cache" if v == "default" => ignored.note(format!(
                "devices/disk {}: cache='default' (the hypervisor's: writeback) taken as ours, none",
                disk.id
            )),
            "cache" => {
                disk.cache = v.parse::<CacheMode>().map_err(|_| bad("cache", v))?;
            }
            "io" => {
                disk.aio = match v {
                    "native" => AioKind::Native,
                    "threads" => AioKind::Threads,
                    "io_uring" => AioKind::IoUring,
                    "default" => {
                        ignored.note(format!(
                            "devices/disk {}: io='default' (QEMU's: threads) taken as ours, io_uring",
                            disk.id
                        ));
                        disk.aio
                    }
                    _ => return Err(bad("io", v)),
                };
            }
            "iothread" => disk.iothread = Some(libvirt_iothread(Some(v))?),
            "error_policy" => {
                disk.on_write_error =
                    serde_json::from_value::<WriteErrorPolicy>(serde_json::json!(v))
                        .map_err(|_| bad("error_policy", v))?;
            }
            "rerror_policy" => {
                disk.on_read_error =
                    serde_json::from_value::<ReadErrorPolicy>(serde_json::json!(v))
                        .map_err(|_| bad("rerror_policy", v))?;
            }
            "discard" => {
                disk.discard = match v {
                    "unmap" => DiscardMode::Unmap,
                    "ignore" => DiscardMode::Ignore,
                    _ => return Err(bad("discard", v)),
                };
            }
            "queues" => disk.num_queues = v.parse().map_err(|_| bad("queues", v))?,
            "queue_size" => disk.queue_size = v.parse().map_err(|_| bad("queue_size", v))?,
            other => ignored.push(format!("devices/disk {}/driver@{other}", disk.id)),
        }
    }
    if !disk.cache.direct() && disk.aio == AioKind::Native && !disk.is_nbd() {
        // QEMU's `io=native` needs O_DIRECT too; libvirt would have refused it.
        return Err(ImportError::Invalid(format!(
            "disk {}: io='native' needs cache='none' or 'directsync'",
            disk.id
        )));
    }
    if let Some(threads) = child(d, "iothreads") {
        let mut mapping = Vec::new();
        for t in threads.children().filter(|n| n.has_tag_name("iothread")) {
            let id = libvirt_iothread(t.attribute("id"))?;
            let vqs = t
                .children()
                .filter(|n| n.has_tag_name("queue"))
                .map(|q| {
                    let v = q.attribute("id").unwrap_or("");
                    v.parse::<u16>().map_err(|_| bad("queue id", v))
                })
                .collect::<Result<Vec<_>, _>>()?;
            mapping.push(VqMapping { iothread: id, vqs });
        }
        let spread = mapping.iter().all(|m| m.vqs.is_empty());
        if spread {
            // No <queue> given: libvirt spreads the queues over the iothreads in turn.
            mapping = spread_queues(mapping, disk.num_queues);
        } else if d.attribute("queues").is_none() {
            // Every queue the mapping names exists.
            let top = mapping.iter().flat_map(|m| m.vqs.iter()).max().copied();
            disk.num_queues = top.map_or(disk.num_queues, |q| q.saturating_add(1));
        }
        disk.iothread = None;
        disk.iothread_vq_mapping = Some(mapping);
    }
    Ok(())
}

/// `<iotune>` as the disk's limits, or (with `<group_name>`) as a throttle group's.
fn iotune(
    t: Node,
    disk: &mut DiskConfig,
    groups: &mut BTreeMap<String, ThrottleLimits>,
    ignored: &mut Said,
) -> Result<(), ImportError> {
    let mut limits = ThrottleLimits::default();
    let mut group = None;
    for el in t.children().filter(Node::is_element) {
        let name = el.tag_name().name();
        let text = el.text().unwrap_or_default().trim();
        if name == "group_name" {
            group = Some(text.to_string());
            continue;
        }
        let Some(field) = limit_field(&mut limits, name) else {
            ignored.push(format!("devices/disk {}/iotune/{name}", disk.id));
            continue;
        };
        *field = text.parse().map_err(|_| {
            ImportError::Invalid(format!("disk {}: iotune {name}='{text}'", disk.id))
        })?;
    }
    match group {
        Some(g) => {
            // One group's limits, given on each of its disks: they must agree (a disk
            // with none only joins).
            let entry = groups.entry(g.clone()).or_default();
            if limits != ThrottleLimits::default() {
                if *entry != ThrottleLimits::default() && *entry != limits {
                    return Err(ImportError::Invalid(format!(
                        "disk {}: throttle group {g} has other limits on another disk",
                        disk.id
                    )));
                }
                *entry = limits;
            }
            disk.throttle_group = Some(g);
        }
        None => disk.throttle = Some(limits),
    }
    Ok(())
}

/// Our limit field for libvirt's `<iotune>` child `name`.
fn limit_field<'a>(l: &'a mut ThrottleLimits, name: &str) -> Option<&'a mut u64> {
    Some(match name {
        "total_bytes_sec" => &mut l.bps_total,
        "read_bytes_sec" => &mut l.bps_read,
        "write_bytes_sec" => &mut l.bps_write,
        "total_iops_sec" => &mut l.iops_total,
        "read_iops_sec" => &mut l.iops_read,
        "write_iops_sec" => &mut l.iops_write,
        "total_bytes_sec_max" => &mut l.bps_total_max,
        "read_bytes_sec_max" => &mut l.bps_read_max,
        "write_bytes_sec_max" => &mut l.bps_write_max,
        "total_iops_sec_max" => &mut l.iops_total_max,
        "read_iops_sec_max" => &mut l.iops_read_max,
        "write_iops_sec_max" => &mut l.iops_write_max,
        "total_bytes_sec_max_length" => &mut l.bps_total_max_length,
        "read_bytes_sec_max_length" => &mut l.bps_read_max_length,
        "write_bytes_sec_max_length" => &mut l.bps_write_max_length,
        "total_iops_sec_max_length" => &mut l.iops_total_max_length,
        "read_iops_sec_max_length" => &mut l.iops_read_max_length,
        "write_iops_sec_max_length" => &mut l.iops_write_max_length,
        "size_iops_sec" => &mut l.iops_size,
        _ => return None,
    })
}

fn child<'a, 'i>(n: Node<'a, 'i>, name: &str) -> Option<Node<'a, 'i>> {
    n.children().find(|c| c.has_tag_name(name))
}

fn child_text(n: Node, name: &str) -> Option<String> {
    child(n, name)
        .and_then(|c| c.text())
        .map(|t| t.trim().to_string())
}

fn number<T: std::str::FromStr>(el: Node, what: &str) -> Result<T, ImportError> {
    let text = el.text().unwrap_or_default().trim();
    text.parse()
        .map_err(|_| ImportError::Invalid(format!("{what} '{text}' is not a number")))
}

/// `<memory unit=>` in MiB (libvirt's default unit is KiB).
fn memory_mib(el: Node) -> Result<u64, ImportError> {
    let n: u64 = number(el, "<memory>")?;
    let unit = el.attribute("unit").unwrap_or("KiB");
    // libvirt's unit names, any case: a bare letter or `?iB` is a power of 1024, `?B`
    // a power of 1000.
    let bytes_per: u64 = match unit.to_ascii_lowercase().as_str() {
        "b" | "bytes" => 1,
        "kb" => 1000,
        "k" | "kib" => 1 << 10,
        "mb" => 1_000_000,
        "m" | "mib" => 1 << 20,
        "gb" => 1_000_000_000,
        "g" | "gib" => 1 << 30,
        "tb" => 1_000_000_000_000,
        "t" | "tib" => 1 << 40,
        "pb" => 1_000_000_000_000_000,
        "p" | "pib" => 1 << 50,
        "eb" => 1_000_000_000_000_000_000,
        "e" | "eib" => 1 << 60,
        _ => return Err(ImportError::Invalid(format!("<memory unit='{unit}'>"))),
    };
    n.checked_mul(bytes_per)
        .map(|b| b.div_ceil(1 << 20))
        .ok_or_else(|| ImportError::Invalid(format!("<memory> {n} {unit} is too large")))
}

/// libvirt's cpuset syntax (`0-3,6,^2`) as a CPU list.
fn cpu_set(s: &str) -> Result<Vec<usize>, ImportError> {
    let bad = || ImportError::Invalid(format!("cpuset '{s}'"));
    let mut cpus = std::collections::BTreeSet::new();
    let mut excluded = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        if let Some(x) = part.strip_prefix('^') {
            excluded.push(x.parse::<usize>().map_err(|_| bad())?);
        } else if let Some((a, b)) = part.split_once('-') {
            let (a, b): (usize, usize) =
                (a.parse().map_err(|_| bad())?, b.parse().map_err(|_| bad())?);
            if b < a || b > MAX_CPU {
                return Err(bad());
            }
            cpus.extend(a..=b);
        } else {
            let c: usize = part.parse().map_err(|_| bad())?;
            if c > MAX_CPU {
                return Err(bad());
            }
            cpus.insert(c);
        }
    }
    for x in excluded {
        cpus.remove(&x);
    }
    if cpus.is_empty() {
        return Err(ImportError::Invalid(format!("cpuset '{s}' names no CPU")));
    }
    Ok(cpus.into_iter().collect())
}

#[cfg(test)]
mod tests;
