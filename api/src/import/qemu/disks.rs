//! QEMU's disks as ours: `-device virtio-blk-*` (and `-drive if=virtio`, which is one
//! on a drive of its own) on a `-drive if=none` or on a `-blockdev` graph, walked from
//! the device down (throttle, raw/qcow2, then file/host_device/nbd), with `-set` and
//! `-global` applied first.

use std::collections::{BTreeMap, BTreeSet};

use block::nbd::is_nbd_uri;
use block::throttle::ThrottleLimits;
use block::{AioKind, CacheMode, ImageFormat};
use devices::config::{DiscardMode, DiskConfig, ReadErrorPolicy, VqMapping, WriteErrorPolicy};

use super::super::{ImportError, Said, spread_queues};
use super::opts::Opts;
use super::{VIRTIO_BLK_PCI, list_untaken, set_limit};

/// A disk's start on the command line, in order.
#[derive(Debug)]
pub enum DiskSource {
    /// A `-drive` (a disk itself with `if=virtio`; with `if=none`, a device's back end).
    Drive(Opts),
    /// A `-device virtio-blk-*`.
    Device(Opts),
}

/// The block options of a command line.
#[derive(Debug, Default)]
pub struct Graph {
    /// Drives and devices, in order.
    pub sources: Vec<DiskSource>,
    /// `-blockdev` nodes, by position; `names` finds them.
    nodes: Vec<Opts>,
    names: BTreeMap<String, usize>,
    used: BTreeSet<usize>,
    /// Nodes of backing chains (opened from the image header, so not read here).
    backing: BTreeSet<usize>,
    /// The nodes of each disk the guest may write (disk id, nodes).
    written: Vec<(String, Vec<usize>)>,
    /// `-global` (driver, property, value).
    pub globals: Vec<(String, String, String)>,
    /// Which globals some device took.
    globals_used: BTreeSet<usize>,
}

/// The deepest nodes go this far.
const MAX_DEPTH: u32 = 16;

/// What the walk found for one disk.
#[derive(Debug, Default)]
struct Build {
    path: Option<String>,
    format: Option<ImageFormat>,
    wce: Option<bool>,
    direct: Option<bool>,
    no_flush: Option<bool>,
    aio: Option<AioKind>,
    readonly: bool,
    discard: Option<DiscardMode>,
    throttle: Option<ThrottleLimits>,
    group: Option<String>,
    reconnect_delay: Option<u64>,
    werror: Option<WriteErrorPolicy>,
    rerror: Option<ReadErrorPolicy>,
    serial: Option<String>,
    /// What the walk left out (for the ignored list).
    ignored: Vec<String>,
    /// The device already said why discard is off.
    discard_said: bool,
    /// The `-blockdev` nodes the walk went through.
    visited: Vec<usize>,
    /// A -drive or a separately given node said nothing of discard (QEMU's default
    /// there: ignore).
    discard_default: bool,
}

fn invalid(s: String) -> ImportError {
    ImportError::Invalid(s)
}

impl Graph {
    /// Adds a `-blockdev` node (it must have a `node-name`, once).
    pub fn add_node(&mut self, o: Opts) -> Result<(), ImportError> {
        let name = o
            .peek("node-name")
            .ok_or_else(|| invalid("a -blockdev without node-name".into()))?
            .to_string();
        if self.names.insert(name.clone(), self.nodes.len()).is_some() {
            return Err(invalid(format!(
                "-blockdev node-name={name} is given twice"
            )));
        }
        self.nodes.push(o);
        Ok(())
    }

    /// `-set device.ID.PROP=VALUE` (or `drive.ID...`) on the device or drive with that id.
    pub fn apply_set(&mut self, set: &str, ignored: &mut Said) -> Result<(), ImportError> {
        let bad = || invalid(format!("-set {set}: expected GROUP.ID.PROPERTY=VALUE"));
        let (lhs, value) = set.split_once('=').ok_or_else(bad)?;
        // GROUP.ID.ARG: the argument is everything after the second dot.
        let (group, rest) = lhs.split_once('.').ok_or_else(bad)?;
        let (id, prop) = rest.split_once('.').ok_or_else(bad)?;
        let target = self.sources.iter_mut().find_map(|s| match (s, group) {
            (DiskSource::Device(o), "device") | (DiskSource::Drive(o), "drive")
                if o.peek("id") == Some(id) =>
            {
                Some(o)
            }
            _ => None,
        });
        match target {
            Some(o) => o.set(prop, value, false),
            None => ignored.push(format!("-set {set} (no virtio disk has that id)")),
        }
        Ok(())
    }

    /// Every virtio disk, in command-line order; `queues` is the PCI devices' default
    /// queue count (QEMU's: one per vCPU) and whether it was capped at our most.
    pub fn disks(
        &mut self,
        queues: (u16, bool),
        groups: &mut BTreeMap<String, ThrottleLimits>,
        ignored: &mut Said,
    ) -> Result<Vec<DiskConfig>, ImportError> {
        self.group_limits(groups, ignored);
        let mut disks = Vec::new();
        let mut used_drives = BTreeSet::new();
        for i in 0..self.sources.len() {
            if let DiskSource::Device(_) = &self.sources[i] {
                let mut dev = self.take_source(i);
                let r = self.device(&mut dev, queues, &mut used_drives, ignored);
                self.put_source(i, dev);
                disks.push(r?);
            }
        }
        // A node one qcow2 image reads as its backing file may not be written by a disk
        // (QEMU refuses it too: a backing child shares no write permission).
        for (disk, nodes) in &self.written {
            if let Some(n) = nodes.iter().find(|n| self.backing.contains(n)) {
                let name = self.nodes[*n].peek("node-name").unwrap_or("");
                return Err(invalid(format!(
                    "disk {disk}: node {name} is a backing file of another image; make the disk read-only"
                )));
            }
        }
        for (i, s) in self.sources.iter().enumerate() {
            match s {
                DiskSource::Drive(o) if !used_drives.contains(&i) => {
                    ignored.push(format!("{}: no virtio-blk device uses it", drive_label(o)))
                }
                DiskSource::Drive(o) => list_untaken(o, &drive_label(o), ignored),
                DiskSource::Device(o) => list_untaken(
                    o,
                    &format!(
                        "-device {} id={}",
                        o.peek("driver").unwrap_or(""),
                        o.peek("id").unwrap_or("")
                    ),
                    ignored,
                ),
            }
        }
        for (g, (d, p, v)) in self.globals.iter().enumerate() {
            if !self.globals_used.contains(&g) {
                ignored.push(format!("-global {d}.{p}={v} (no virtio-blk device)"));
            }
        }
        for (name, &i) in &self.names {
            if self.backing.contains(&i) && !self.used.contains(&i) {
                continue;
            }
            if self.used.contains(&i) {
                list_untaken(
                    &self.nodes[i],
                    &format!("-blockdev node-name={name}"),
                    ignored,
                );
            } else {
                ignored.push(format!(
                    "-blockdev node-name={name}: no virtio-blk device uses it"
                ));
            }
        }
        Ok(disks)
    }

    fn take_source(&mut self, i: usize) -> Opts {
        match &mut self.sources[i] {
            DiskSource::Drive(o) | DiskSource::Device(o) => std::mem::take(o),
        }
    }

    fn put_source(&mut self, i: usize, back: Opts) {
        match &mut self.sources[i] {
            DiskSource::Drive(o) | DiskSource::Device(o) => *o = back,
        }
    }

    /// A `-device virtio-blk-*` and the drive or node it names.
    fn device(
        &mut self,
        dev: &mut Opts,
        queues: (u16, bool),
        used_drives: &mut BTreeSet<usize>,
        ignored: &mut Said,
    ) -> Result<DiskConfig, ImportError> {
        let driver = dev.take("driver").unwrap_or_default();
        // The last -global of a property wins, as in QEMU, and the device model's own
        // before those of the virtio-blk device inside it.
        for inner in [false, true] {
            for (g, (d, prop, v)) in self.globals.iter().enumerate().rev() {
                let applies = if inner {
                    d == "virtio-blk-device" && driver != "virtio-blk-device"
                } else {
                    *d == driver
                };
                if applies {
                    dev.set(prop, v, true);
                    self.globals_used.insert(g);
                }
            }
        }
        let drive = dev
            .take("drive")
            .ok_or_else(|| invalid(format!("-device {driver}: no drive= (an empty disk)")))?;
        let mut b = Build::default();
        let drive_at = self.sources.iter().position(
            |s| matches!(s, DiskSource::Drive(o) if o.peek("id") == Some(drive.as_str())),
        );
        if let Some(j) = drive_at {
            if !used_drives.insert(j) {
                return Err(invalid(format!("-drive id={drive} is used by two devices")));
            }
            let mut o = self.take_source(j);
            o.accept(&["if"]);
            let r = self.drive(&mut o, &mut b, ignored);
            self.put_source(j, o);
            r?;
        } else if let Some(&n) = self.names.get(&drive) {
            self.named_node(n, &mut b, 0)?;
        } else {
            return Err(invalid(format!(
                "-device {driver}: drive={drive} names no -drive id= or -blockdev node-name="
            )));
        }
        let id = dev.take("id").unwrap_or_else(|| drive.clone());
        if let Some(wce) = dev.take("write-cache") {
            b.wce = match wce.as_str() {
                "on" => Some(true),
                "off" => Some(false),
                "auto" => b.wce,
                _ => return Err(invalid(format!("disk {id}: write-cache={wce}"))),
            };
        }
        if dev.take_bool("config-wce")? == Some(false) {
            ignored.push(format!(
                "disk {id}: config-wce=off (the guest may not switch the write cache): we let it"
            ));
        }
        if let Some(v) = dev.take("werror").filter(|v| v != "auto") {
            b.werror = Some(policy(&id, "werror", &v)?);
        }
        if let Some(v) = dev.take("rerror").filter(|v| v != "auto") {
            b.rerror = Some(policy(&id, "rerror", &v)?);
        }
        if let Some(s) = dev.take("serial") {
            b.serial = Some(s);
        }
        if dev.take_bool("discard")? == Some(false) {
            b.discard = Some(DiscardMode::Ignore);
            b.discard_said = true;
            ignored.note(format!(
                "disk {id}: discard=off: discard not offered to the guest (discard: ignore)"
            ));
        }
        if dev.take_bool("scsi")? == Some(true) {
            ignored.push(format!("disk {id}: scsi=on (no SCSI passthrough)"));
        }
        let visited = std::mem::take(&mut b.visited);
        let mut disk = b.finish(&id, ignored)?;
        disk.num_queues = match dev.take_number("num-queues")? {
            Some(n) => n,
            None if VIRTIO_BLK_PCI.contains(&driver.as_str()) => {
                if queues.1 {
                    ignored.note(format!(
                        "disk {id}: no num-queues (QEMU's: one per vCPU): {} (our most)",
                        queues.0
                    ));
                }
                queues.0
            }
            None => 1,
        };
        if let Some(n) = dev.take_number("queue-size")? {
            disk.queue_size = n;
        }
        // The old data plane (`x-data-plane=on`) gave the disk a thread of its own, as
        // we do by default when no iothread is named.
        dev.take_bool("x-data-plane")?;
        disk.iothread = dev.take("iothread");
        let mapping = vq_mapping(dev)?;
        if !mapping.is_empty() {
            if disk.iothread.is_some() {
                return Err(invalid(format!(
                    "disk {id}: iothread= and iothread-vq-mapping are exclusive"
                )));
            }
            disk.iothread_vq_mapping = Some(spread_queues(mapping, disk.num_queues));
        }
        disk.validate().map_err(invalid)?;
        if !disk.readonly {
            self.written.push((disk.id.clone(), visited));
        }
        Ok(disk)
    }

    /// A `-drive`'s options (its `file` a file name, or an inline `file.*` node).
    fn drive(
        &mut self,
        o: &mut Opts,
        b: &mut Build,
        ignored: &mut Said,
    ) -> Result<(), ImportError> {
        let id = drive_label(o);
        o.accept(&["id", "if", "index"]);
        b.discard_default |= o.peek("discard").is_none();
        if let Some(m) = o.take("media")
            && m != "disk"
        {
            return Err(invalid(format!("{id}: media={m} is not a disk")));
        }
        if o.take_bool("snapshot")? == Some(true) {
            return Err(invalid(format!(
                "{id}: snapshot=on (writes thrown away at exit) is not supported"
            )));
        }
        if let Some(f) = o.take("format") {
            b.format = Some(format(&f)?);
        }
        // `driver=` on a -drive names the format too (never probed); the protocol
        // drivers mean raw data.
        if let Some(d) = o.take("driver") {
            if b.format.is_some() {
                return Err(invalid(format!(
                    "{id}: format= and driver= both given (QEMU refuses that too)"
                )));
            }
            b.format = Some(match d.as_str() {
                "file" | "host_device" => ImageFormat::Raw,
                other => format(other)?,
            });
        }
        for k in ["offset", "size"] {
            if o.peek(k).is_some() {
                return Err(invalid(format!("{id}: raw {k}= is not supported")));
            }
        }
        if let Some(f) = o.peek("file").map(str::to_string)
            && o.has_prefix("file.")
        {
            if is_nbd_file(&f) {
                return Err(invalid(format!(
                    "{id}: file={f} with file.* options: give the export as \
                     file.driver=nbd,file.server.* instead"
                )));
            }
            // `file=/x,file.locking=off`: the name, with options of its file node.
            o.take("file");
            o.set("file.filename", &local_path(&f)?, true);
            o.set("file.driver", "file", true);
        }
        if o.has_prefix("file.") {
            self.node(o, "file.", b, 1)?;
        } else if let Some(f) = o.take("file") {
            file_name(&f, b)?;
        } else {
            return Err(invalid(format!("{id}: no file= (an empty drive)")));
        }
        if b.format.is_none() {
            let local = b.path.clone().filter(|p| !is_nbd_uri(p));
            b.format = Some(probe(local.as_deref(), &id, ignored)?);
        }
        if let Some(c) = o.take("cache") {
            let (wce, direct, no_flush) = match c.as_str() {
                "none" | "off" => (true, true, false),
                "writeback" => (true, false, false),
                "writethrough" => (false, false, false),
                "directsync" => (false, true, false),
                "unsafe" => (true, false, true),
                _ => {
                    return Err(invalid(format!(
                        "{id}: cache={c} (none, writeback, writethrough, directsync or unsafe)"
                    )));
                }
            };
            (b.wce, b.direct, b.no_flush) = (Some(wce), Some(direct), Some(no_flush));
        }
        common(o, "", b)?;
        if let Some(v) = o.take("werror") {
            b.werror = Some(policy(&id, "werror", &v)?);
        }
        if let Some(v) = o.take("rerror") {
            b.rerror = Some(policy(&id, "rerror", &v)?);
        }
        if let Some(s) = o.take("serial") {
            b.serial = Some(s);
        }
        if let Some(a) = o.take("aio") {
            b.aio = Some(a.parse().map_err(|e| invalid(format!("{id}: {e}")))?);
        }
        if let Some(r) = o.take_bool("readonly")? {
            b.readonly |= r;
        }
        let (limits, group) = drive_limits(o, &id, ignored)?;
        let group = group.or_else(|| self.own_group(o));
        if limits == ThrottleLimits::default() {
            // QEMU throttles a drive only when it sets a limit; a group alone is nothing.
            if let Some(g) = group {
                ignored.note(format!(
                    "{id}: throttling.group={g} without limits (not throttled)"
                ));
            }
        } else if group.is_some() {
            // The group's limits were set in -drive order (`group_limits`).
            b.group = group;
        } else {
            b.throttle = Some(limits);
        }
        Ok(())
    }

    /// The group of a `-drive` with limits and no group: QEMU puts it in a group named
    /// after its id, which another drive may join (`throttling.group=ID`).
    fn own_group(&self, o: &Opts) -> Option<String> {
        let id = o.peek("id")?;
        let joined = self.sources.iter().any(|s| match s {
            DiskSource::Drive(d) => {
                d.peek("id") != Some(id)
                    && (d.peek("throttling.group") == Some(id) || d.peek("group") == Some(id))
            }
            DiskSource::Device(_) => false,
        });
        joined.then(|| id.to_string())
    }

    /// Throttle groups' limits from the `-drive`s that name one, in command-line order
    /// (each drive's limits become its group's as QEMU creates it: the last one wins),
    /// over the groups `-object throttle-group` defined.
    fn group_limits(&self, groups: &mut BTreeMap<String, ThrottleLimits>, ignored: &mut Said) {
        for s in &self.sources {
            let DiskSource::Drive(o) = s else { continue };
            let mut o = o.clone();
            let id = drive_label(&o);
            let Ok((limits, group)) = drive_limits(&mut o, &id, &mut Said::default()) else {
                continue;
            };
            let Some(g) = group.or_else(|| self.own_group(&o)) else {
                continue;
            };
            if limits == ThrottleLimits::default() {
                continue;
            }
            if let Some(old) = groups.insert(g.clone(), limits.clone())
                && old != ThrottleLimits::default()
                && old != limits
            {
                ignored.note(format!(
                    "{id}: throttle group {g} had other limits; this drive's replace them"
                ));
            }
        }
    }

    /// Marks the `-blockdev` chain from `name` used (a qcow2 node's `backing=`).
    fn mark_chain(&mut self, name: &str, depth: u32) {
        let Some(&n) = self.names.get(name) else {
            return;
        };
        if depth > MAX_DEPTH || !self.backing.insert(n) {
            return;
        }
        for key in ["file", "backing"] {
            if let Some(c) = self.nodes[n].peek(key).map(str::to_string) {
                self.mark_chain(&c, depth + 1);
            }
        }
    }

    /// The `-blockdev` node at `n`, for a disk.
    fn named_node(&mut self, n: usize, b: &mut Build, depth: u32) -> Result<(), ImportError> {
        if !self.used.insert(n) {
            return Err(invalid(format!(
                "-blockdev node-name={}: used twice (by two devices, or a loop)",
                self.nodes[n].peek("node-name").unwrap_or("")
            )));
        }
        let mut o = std::mem::take(&mut self.nodes[n]);
        b.discard_default |= o.peek("discard").is_none();
        b.visited.push(n);
        let r = self.node(&mut o, "", b, depth);
        self.nodes[n] = o;
        r
    }

    /// The node whose keys start with `p` in `o`, and the nodes below it.
    fn node(
        &mut self,
        o: &mut Opts,
        p: &str,
        b: &mut Build,
        depth: u32,
    ) -> Result<(), ImportError> {
        let name = o.peek(&format!("{p}node-name")).unwrap_or("").to_string();
        let here = if name.is_empty() {
            format!("node {}", p.trim_end_matches('.'))
        } else {
            format!("node {name}")
        };
        if depth > MAX_DEPTH {
            return Err(invalid(format!(
                "{here}: block nodes nested deeper than {MAX_DEPTH}"
            )));
        }
        let k = |key: &str| format!("{p}{key}");
        o.accept(&[&k("node-name"), &k("auto-read-only")]);
        common(o, p, b)?;
        let driver = o
            .take(&k("driver"))
            .ok_or_else(|| invalid(format!("{here}: no driver=")))?;
        match driver.as_str() {
            "file" | "host_device" | "host_cdrom" => {
                let f = o
                    .take(&k("filename"))
                    .ok_or_else(|| invalid(format!("{here}: no filename=")))?;
                b.path = Some(f);
                if let Some(a) = o.take(&k("aio")) {
                    b.aio = Some(a.parse().map_err(|e| invalid(format!("{here}: {e}")))?);
                }
                if let Some(l) = o.take(&k("locking"))
                    && l != "on"
                    && l != "auto"
                {
                    b.ignored
                        .push(format!("{here}: locking={l} (we always lock the image)"));
                }
                return Ok(());
            }
            "nbd" => return nbd_node(o, p, b, &here),
            "throttle" => {
                let g = o
                    .take(&k("throttle-group"))
                    .ok_or_else(|| invalid(format!("{here}: no throttle-group=")))?;
                if b.group.replace(g).is_some() {
                    return Err(invalid(format!(
                        "{here}: a second throttle node on one disk"
                    )));
                }
            }
            "raw" => {
                if o.peek(&k("offset")).is_some() || o.peek(&k("size")).is_some() {
                    return Err(invalid(format!(
                        "{here}: raw offset= and size= are not supported"
                    )));
                }
                b.format.get_or_insert(ImageFormat::Raw);
            }
            "qcow2" => {
                if b.format == Some(ImageFormat::Qcow2) {
                    return Err(invalid(format!(
                        "{here}: a qcow2 image inside a qcow2 image"
                    )));
                }
                b.format = Some(ImageFormat::Qcow2);
                match o.take(&k("backing")).as_deref() {
                    Some("null") => b.ignored.push(format!(
                        "{here}: backing=null (QEMU opens no backing file): we open the chain the image header names"
                    )),
                    // The backing chain is opened from the image's header; its nodes
                    // are the same files.
                    Some(name) => self.mark_chain(name, depth),
                    None => {}
                }
            }
            other => {
                return Err(invalid(format!(
                    "{here}: driver={other} is not supported (file, host_device, nbd, raw, qcow2, throttle)"
                )));
            }
        }
        let child = k("file");
        if o.has_prefix(&format!("{child}.")) {
            self.node(o, &format!("{child}."), b, depth + 1)
        } else if let Some(c) = o.take(&child) {
            let n = *self
                .names
                .get(&c)
                .ok_or_else(|| invalid(format!("{here}: file={c} names no -blockdev")))?;
            self.named_node(n, b, depth + 1)
        } else {
            Err(invalid(format!("{here}: driver={driver} needs file=")))
        }
    }
}

impl Opts {
    /// The pairs nothing took yet (copies).
    fn untaken_pairs(&self) -> Vec<(String, String)> {
        self.untaken()
            .into_iter()
            .filter_map(|kv| {
                kv.split_once('=')
                    .map(|(k, v)| (k.to_string(), v.to_string()))
            })
            .collect()
    }
}

/// Keys every node (and a `-drive`) may carry: `read-only`, `discard`, `cache.direct`,
/// `cache.no-flush`.
fn common(o: &mut Opts, p: &str, b: &mut Build) -> Result<(), ImportError> {
    if let Some(r) = o.take_bool(&format!("{p}read-only"))? {
        b.readonly |= r;
    }
    if let Some(d) = o.take(&format!("{p}discard")) {
        // Any node that ignores discards stops them (as in QEMU).
        match d.as_str() {
            "unmap" | "on" if b.discard != Some(DiscardMode::Ignore) => {
                b.discard = Some(DiscardMode::Unmap);
            }
            "unmap" | "on" => {}
            "ignore" | "off" => b.discard = Some(DiscardMode::Ignore),
            _ => return Err(invalid(format!("discard={d}: expected unmap or ignore"))),
        }
    }
    if let Some(v) = o.take_bool(&format!("{p}cache.direct"))? {
        b.direct = Some(v);
    }
    if let Some(v) = o.take_bool(&format!("{p}cache.no-flush"))? {
        b.no_flush = Some(v);
    }
    Ok(())
}

/// An `nbd` node: `server.type=inet,server.host=,server.port=` or
/// `server.type=unix,server.path=` (or the older `host=`, `port=`, `path=`), `export=`,
/// `reconnect-delay=`.
fn nbd_node(o: &mut Opts, p: &str, b: &mut Build, here: &str) -> Result<(), ImportError> {
    use block::nbd::{NbdAddress, NbdUri};
    let mut get = |key: &str| {
        o.take(&format!("{p}server.{key}"))
            .or_else(|| o.take(&format!("{p}{key}")))
    };
    let kind = get("type");
    let (host, port, path) = (get("host"), get("port"), get("path"));
    let address = match (kind.as_deref(), path) {
        (Some("unix") | None, Some(path)) => NbdAddress::Unix(path.into()),
        (Some("inet") | None, None) => {
            let port = port.unwrap_or_else(|| "10809".into());
            NbdAddress::Tcp {
                host: host.ok_or_else(|| invalid(format!("{here}: nbd needs server.host")))?,
                port: port
                    .parse()
                    .map_err(|_| invalid(format!("{here}: bad NBD port {port:?}")))?,
            }
        }
        (Some("unix"), None) => {
            return Err(invalid(format!(
                "{here}: server.type=unix needs server.path"
            )));
        }
        (Some("inet"), Some(_)) => {
            return Err(invalid(format!(
                "{here}: server.type=inet takes host and port, not path"
            )));
        }
        (Some(t), _) => {
            return Err(invalid(format!(
                "{here}: nbd server.type={t} (inet or unix)"
            )));
        }
    };
    if o.peek(&format!("{p}tls-creds")).is_some() {
        return Err(invalid(format!("{here}: NBD over TLS is not supported")));
    }
    let export = o.take(&format!("{p}export")).unwrap_or_default();
    b.reconnect_delay = o.take_number(&format!("{p}reconnect-delay"))?;
    b.path = Some(NbdUri { address, export }.to_string());
    b.format.get_or_insert(ImageFormat::Raw);
    Ok(())
}

/// A `-drive file=`: a path, an NBD URI, or the older `nbd:HOST:PORT[:exportname=E]` /
/// `nbd:unix:PATH[:exportname=E]`.
fn file_name(f: &str, b: &mut Build) -> Result<(), ImportError> {
    use block::nbd::{NbdAddress, NbdUri};
    if f.contains("://") && is_nbd_uri(f) {
        f.parse::<NbdUri>().map_err(invalid)?;
        b.path = Some(f.to_string());
    } else if let Some(rest) = f.strip_prefix("nbd:") {
        let (addr, export) = match rest.split_once(":exportname=") {
            Some((a, e)) => (a, e.to_string()),
            None => (rest, String::new()),
        };
        let address = match addr.strip_prefix("unix:") {
            Some(path) => NbdAddress::Unix(path.into()),
            None => {
                let (host, port) = addr.rsplit_once(':').unwrap_or((addr, "10809"));
                NbdAddress::Tcp {
                    host: host.trim_matches(|c| c == '[' || c == ']').to_string(),
                    port: port
                        .parse()
                        .map_err(|_| invalid(format!("file={f}: bad NBD port {port:?}")))?,
                }
            }
        };
        b.path = Some(NbdUri { address, export }.to_string());
    } else {
        b.path = Some(local_path(f)?);
    }
    Ok(())
}

/// Whether a `-drive file=` names an NBD export (the older `nbd:` syntax or a URI).
fn is_nbd_file(f: &str) -> bool {
    f.starts_with("nbd:") || (f.contains("://") && is_nbd_uri(f))
}

/// A `-drive file=` that is a local file: `file:`/`host_device:` prefixes taken off;
/// any other protocol prefix refused (as QEMU reads it: a name before the first `:`
/// with no `/` in it).
fn local_path(f: &str) -> Result<String, ImportError> {
    if let Some(path) = f
        .strip_prefix("file:")
        .or_else(|| f.strip_prefix("host_device:"))
    {
        return Ok(path.to_string());
    }
    if f.split_once(':')
        .is_some_and(|(proto, _)| !proto.contains('/'))
    {
        return Err(invalid(format!(
            "file={f}: only local files and NBD are supported (a protocol prefix; \
             ./{f} names a local file)"
        )));
    }
    Ok(f.to_string())
}

/// `format=`: raw or qcow2.
fn format(f: &str) -> Result<ImageFormat, ImportError> {
    f.parse()
        .map_err(|_| invalid(format!("format={f} is not supported (raw or qcow2)")))
}

/// A `-drive`'s own throttle limits (`throttling.*` and the older names) and the group
/// it names; unknown limit names are listed.
fn drive_limits(
    o: &mut Opts,
    id: &str,
    ignored: &mut Said,
) -> Result<(ThrottleLimits, Option<String>), ImportError> {
    let mut limits = ThrottleLimits::default();
    let mut group = o.take("group");
    for (k, v) in o.take_prefix("throttling.") {
        if k == "group" {
            group = Some(v);
        } else if !set_limit(&mut limits, &k.replace('-', "_"), &v)? {
            ignored.push(format!("{id}: throttling.{k}={v}"));
        }
    }
    for (k, v) in o.clone().untaken_pairs() {
        if let Some(name) = legacy_limit(&k) {
            o.take(&k);
            if !set_limit(&mut limits, &name, &v)? {
                ignored.push(format!("{id}: {k}={v}"));
            }
        }
    }
    Ok((limits, group))
}

/// What QEMU's probe would find at `path` (said in `ignored`): qcow2 by its magic, raw
/// for other data; another format's magic is refused, and a file that cannot be read
/// here (or is no regular file or block device) is taken as raw, and said so.
fn probe(path: Option<&str>, id: &str, ignored: &mut Said) -> Result<ImageFormat, ImportError> {
    use std::io::Read;
    use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
    let Some(path) = path else {
        ignored.note(format!("{id}: no format= (an NBD export): raw"));
        return Ok(ImageFormat::Raw);
    };
    let mut magic = [0u8; 8];
    // Never block on a FIFO or a terminal: only files and block devices are read.
    let read = std::fs::metadata(path)
        .ok()
        .filter(|m| m.is_file() || m.file_type().is_block_device())
        .and_then(|_| {
            std::fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_NONBLOCK)
                .open(path)
                .ok()
        })
        .is_some_and(|mut f| f.read_exact(&mut magic).is_ok());
    if !read {
        ignored.push(format!(
            "{id}: no format= and {path} cannot be read here: taken as raw (say format=)"
        ));
        return Ok(ImageFormat::Raw);
    }
    const OTHERS: [(&[u8], &str); 6] = [
        (b"KDMV", "vmdk"),
        (b"<<< ", "vdi"),
        (b"vhdxfile", "vhdx"),
        (b"QFI\0", "qed"),
        (b"LUKS\xba\xbe", "luks"),
        (b"conectix", "vpc"),
    ];
    if let Some((_, name)) = OTHERS.iter().find(|(m, _)| magic.starts_with(m)) {
        return Err(invalid(format!(
            "{id}: {path} is a {name} image (not supported: raw or qcow2)"
        )));
    }
    let format = if magic.starts_with(b"QFI\xfb") {
        let version = u32::from_be_bytes([magic[4], magic[5], magic[6], magic[7]]);
        if version < 2 {
            return Err(invalid(format!(
                "{id}: {path} is a qcow version {version} image (not supported: qcow2 is)"
            )));
        }
        ImageFormat::Qcow2
    } else {
        ImageFormat::Raw
    };
    ignored.note(format!(
        "{id}: no format= (QEMU probes; found {format}: say format= to be sure)"
    ));
    Ok(format)
}

/// A `-drive`'s name in messages: `-drive id=ID`, else `-drive file=FILE`.
fn drive_label(o: &Opts) -> String {
    match (o.peek("id"), o.peek("file")) {
        (Some(id), _) => format!("-drive id={id}"),
        (None, Some(f)) => format!("-drive file={f}"),
        (None, None) => "-drive".into(),
    }
}

/// `werror=`/`rerror=` as our policy type.
fn policy<T: serde::de::DeserializeOwned>(id: &str, what: &str, v: &str) -> Result<T, ImportError> {
    serde_json::from_value(serde_json::json!(v))
        .map_err(|_| invalid(format!("disk {id}: {what}={v}")))
}

/// `-drive`'s older throttle names (`bps_rd_max`) as ours (`bps_read_max`).
fn legacy_limit(key: &str) -> Option<String> {
    const BASES: [(&str, &str); 7] = [
        ("bps_rd", "bps_read"),
        ("bps_wr", "bps_write"),
        ("bps", "bps_total"),
        ("iops_size", "iops_size"),
        ("iops_rd", "iops_read"),
        ("iops_wr", "iops_write"),
        ("iops", "iops_total"),
    ];
    BASES.iter().find_map(|(old, new)| {
        let rest = key.strip_prefix(old)?;
        matches!(rest, "" | "_max").then(|| format!("{new}{rest}"))
    })
}

/// `iothread-vq-mapping.N.iothread` and `.N.vqs.M` as mapping entries.
fn vq_mapping(dev: &mut Opts) -> Result<Vec<VqMapping>, ImportError> {
    let mut entries: BTreeMap<usize, VqMapping> = BTreeMap::new();
    for (k, v) in dev.take_prefix("iothread-vq-mapping.") {
        let bad = || invalid(format!("iothread-vq-mapping.{k}={v}"));
        let (n, field) = k.split_once('.').ok_or_else(bad)?;
        let n: usize = n.parse().map_err(|_| bad())?;
        let e = entries.entry(n).or_insert_with(|| VqMapping {
            iothread: String::new(),
            vqs: Vec::new(),
        });
        match field {
            "iothread" => e.iothread = v,
            f if f.starts_with("vqs.") => e.vqs.push(v.parse().map_err(|_| bad())?),
            _ => return Err(bad()),
        }
    }
    let mapping: Vec<VqMapping> = entries.into_values().collect();
    if mapping.iter().any(|m| m.iothread.is_empty()) {
        return Err(invalid(
            "an iothread-vq-mapping entry without iothread".into(),
        ));
    }
    Ok(mapping)
}

impl Build {
    /// The disk `id` from what the walk found.
    fn finish(self, id: &str, ignored: &mut Said) -> Result<DiskConfig, ImportError> {
        let path = self
            .path
            .ok_or_else(|| invalid(format!("disk {id}: no file")))?;
        let mut disk = DiskConfig::new(id, path);
        disk.format = self.format.unwrap_or(ImageFormat::Raw);
        let (wce, direct) = (self.wce.unwrap_or(true), self.direct.unwrap_or(false));
        disk.cache = if self.no_flush.unwrap_or(false) {
            if direct {
                ignored.push(format!(
                    "disk {id}: cache.direct=on with cache.no-flush=on: taken as unsafe (buffered)"
                ));
            }
            CacheMode::Unsafe
        } else {
            match (wce, direct) {
                (true, true) => CacheMode::None,
                (true, false) => CacheMode::Writeback,
                (false, false) => CacheMode::Writethrough,
                (false, true) => CacheMode::Directsync,
            }
        };
        ignored.extend(self.ignored);
        if disk.is_nbd() {
            disk.reconnect_delay = self.reconnect_delay;
            match self.reconnect_delay {
                None => ignored.note(format!(
                    "disk {id}: no reconnect-delay (QEMU's: 0, fail at once): ours, 5 s"
                )),
                Some(0) => ignored.push(format!(
                    "disk {id}: reconnect-delay=0: QEMU reconnects in the background, we do not"
                )),
                Some(_) => {}
            }
        }
        match self.aio {
            Some(a) => disk.aio = a,
            None if !disk.is_nbd() => ignored.note(format!(
                "disk {id}: no aio= (QEMU's default: threads): ours, {}",
                disk.aio
            )),
            None => {}
        }
        if disk.aio == AioKind::Native && !disk.cache.direct() && !disk.is_nbd() {
            return Err(invalid(format!(
                "disk {id}: aio=native needs cache=none or directsync (cache.direct=on)"
            )));
        }
        disk.readonly = self.readonly;
        match self.discard {
            Some(DiscardMode::Ignore) if !self.discard_said => ignored.note(format!(
                "disk {id}: discard=ignore: we do not offer discard to the guest (QEMU offers it and drops it)"
            )),
            Some(DiscardMode::Ignore) => {}
            _ if self.discard_default => ignored.note(format!(
                "disk {id}: discard= not on every node (QEMU's default: ignore, requests dropped): ours, unmap"
            )),
            _ => {}
        }
        disk.discard = match self.discard {
            Some(DiscardMode::Ignore) => DiscardMode::Ignore,
            _ => DiscardMode::Unmap,
        };
        disk.throttle = self.throttle;
        disk.throttle_group = self.group;
        if let Some(p) = self.werror {
            disk.on_write_error = p;
        }
        if let Some(p) = self.rerror {
            disk.on_read_error = p;
        }
        disk.serial = self.serial;
        Ok(disk)
    }
}
