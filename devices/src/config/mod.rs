//! The JSON settings of disks and iothreads (schema in openapi.yaml). Field names are
//! the contract; unknown fields are rejected.

mod error_policy;
pub mod kv;

use std::path::PathBuf;

use block::throttle::ThrottleLimits;
use block::{AioKind, CacheMode, DiskOptions, ImageFormat};
use serde::{Deserialize, Serialize};

pub use error_policy::{ErrorAction, ReadErrorPolicy, WriteErrorPolicy};

/// Largest queue size a disk may ask for (virtio split rings allow 32768).
pub const MAX_QUEUE_SIZE: u16 = 1024;
/// Most queues one disk may have.
pub const MAX_QUEUES: u16 = 64;

/// One iothread: an epoll loop serving the queues assigned to it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct IoThreadConfig {
    /// Name, referenced by disks.
    pub id: String,
    /// Longest adaptive-polling window in ns before sleeping (0 disables polling).
    #[serde(default = "default_poll_max_ns")]
    pub poll_max_ns: u64,
    /// Factor the polling window grows by (0 means the default, 2).
    #[serde(default)]
    pub poll_grow: u64,
    /// Divisor the polling window shrinks by (0 means reset to 0).
    #[serde(default)]
    pub poll_shrink: u64,
    /// Most requests submitted to the kernel in one syscall.
    #[serde(default = "default_aio_max_batch")]
    pub aio_max_batch: u32,
    /// Host CPUs the thread is pinned to (empty: not pinned).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cpu_affinity: Vec<usize>,
}

/// 64 us, twice QEMU's 32 us: where the iothread sleeps, each request costs it a wake-up,
/// which on a nested host (this project's development VMs) takes about 40 us; a driver
/// that takes an interrupt before it comes back then waits about 40-60 us, just beyond
/// 32 us. Measured in a VM (`blkbench --in-vm`, null disk, interrupt-driven 4k reads at
/// QD32): about 270k IOPS at 32 us, 450k at 64 us; QD1 latency with interrupts 91 -> 51-56
/// us. The window still adapts: a driver slower than the cap is not spun for, and a disk
/// only where its completions come often (`iothread::poll::SLOW_DISK_NS`).
fn default_poll_max_ns() -> u64 {
    65_536
}

fn default_aio_max_batch() -> u32 {
    32
}

impl IoThreadConfig {
    /// An iothread named `id` with default settings.
    pub fn new(id: impl Into<String>) -> Self {
        IoThreadConfig {
            id: id.into(),
            poll_max_ns: default_poll_max_ns(),
            poll_grow: 0,
            poll_shrink: 0,
            aio_max_batch: default_aio_max_batch(),
            cpu_affinity: Vec::new(),
        }
    }

    /// Checks ranges and names.
    pub fn validate(&self) -> Result<(), String> {
        check_id("iothread", &self.id)?;
        if self.poll_max_ns > 1_000_000_000 {
            return Err(format!(
                "iothread {}: poll_max_ns must be at most 1 s (1000000000)",
                self.id
            ));
        }
        if !(1..=4096).contains(&self.aio_max_batch) {
            return Err(format!(
                "iothread {}: aio_max_batch must be 1..=4096",
                self.id
            ));
        }
        if !self.cpu_affinity.is_empty() {
            let usable = usable_cpus();
            // `usable` is sorted; the list is the client's, of any length.
            if let Some(cpu) = self
                .cpu_affinity
                .iter()
                .find(|c| usable.binary_search(c).is_err())
            {
                return Err(format!(
                    "iothread {}: cpu_affinity names CPU {cpu}, which this host does not let \
                     the service use (usable CPUs: {})",
                    self.id,
                    cpu_list(&usable)
                ));
            }
        }
        Ok(())
    }

    /// Applies `update`: the fields it carries replace this config's, the others stay.
    pub fn merge(&mut self, update: &IoThreadUpdate) {
        if let Some(v) = update.poll_max_ns {
            self.poll_max_ns = v;
        }
        if let Some(v) = update.poll_grow {
            self.poll_grow = v;
        }
        if let Some(v) = update.poll_shrink {
            self.poll_shrink = v;
        }
        if let Some(v) = update.aio_max_batch {
            self.aio_max_batch = v;
        }
        if let Some(v) = &update.cpu_affinity {
            self.cpu_affinity = v.clone();
        }
    }
}

/// A live change of an iothread (`vm.update-iothread`, `iothread.update`): only the
/// fields sent change; the others keep their current values. `cpu_affinity: []` unpins.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct IoThreadUpdate {
    /// The iothread's id.
    pub id: String,
    /// New longest polling window in ns (0 disables polling).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub poll_max_ns: Option<u64>,
    /// New grow factor (0: the default, 2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub poll_grow: Option<u64>,
    /// New shrink divisor (0: reset to 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub poll_shrink: Option<u64>,
    /// New batch limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aio_max_batch: Option<u32>,
    /// New host CPUs (`[]`: not pinned).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_affinity: Option<Vec<usize>>,
}

/// The host CPUs this process may run threads on (its affinity mask, which a cgroup
/// cpuset or `taskset` narrows), ascending; every CPU below 1024 when it cannot be read.
pub fn usable_cpus() -> Vec<usize> {
    // SAFETY: an all-zero cpu_set_t is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: getpid has no preconditions; sched_getaffinity writes at most the size we
    // pass into `set`. The process's (main thread's) mask, not a pinned caller's.
    let rc = unsafe {
        libc::sched_getaffinity(
            libc::getpid(),
            std::mem::size_of::<libc::cpu_set_t>(),
            &mut set,
        )
    };
    if rc != 0 {
        return (0..1024).collect();
    }
    (0..libc::CPU_SETSIZE as usize)
        // SAFETY: `c` is below CPU_SETSIZE, so CPU_ISSET stays inside `set`.
        .filter(|&c| unsafe { libc::CPU_ISSET(c, &set) })
        .collect()
}

/// `0-3,6` for [0, 1, 2, 3, 6].
fn cpu_list(cpus: &[usize]) -> String {
    let mut out: Vec<String> = Vec::new();
    let mut i = 0;
    while i < cpus.len() {
        let start = cpus[i];
        let mut end = start;
        while i + 1 < cpus.len() && cpus[i + 1] == end + 1 {
            i += 1;
            end = cpus[i];
        }
        out.push(if start == end {
            start.to_string()
        } else {
            format!("{start}-{end}")
        });
        i += 1;
    }
    out.join(",")
}

/// Queues of a disk served by one iothread (`iothread_vq_mapping`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct VqMapping {
    /// The iothread.
    pub iothread: String,
    /// Queue indexes it serves.
    pub vqs: Vec<u16>,
}

/// What the guest may do with discard requests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum DiscardMode {
    /// Discards deallocate (punch holes). The default.
    #[default]
    Unmap,
    /// Discard is not offered to the guest.
    Ignore,
}

/// One virtio-blk disk of a VM.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct DiskConfig {
    /// Name, unique in the VM.
    pub id: String,
    /// Image file or block device; an NBD URI (`nbd://host[:port]/export`,
    /// `nbd+unix:///export?socket=PATH`) for an export on an NBD server; `null` with
    /// `null_size` gives a null backend.
    #[cfg_attr(feature = "openapi", schema(value_type = String))]
    pub path: PathBuf,
    /// Size of a null backend in bytes (only with `path: "null"`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub null_size: Option<u64>,
    /// Read-only disk.
    #[serde(default)]
    pub readonly: bool,
    /// Image format: `raw` (the default; never probed) or `qcow2` (with its backing
    /// chain; the disk's size is the image's).
    #[serde(default)]
    pub format: ImageFormat,
    /// Cache mode.
    #[serde(default)]
    pub cache: CacheMode,
    /// I/O engine.
    #[serde(default)]
    pub aio: AioKind,
    /// The iothread serving every queue (a dedicated one when neither this nor
    /// `iothread_vq_mapping` is given).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iothread: Option<String>,
    /// Queues spread over iothreads (exclusive with `iothread`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iothread_vq_mapping: Option<Vec<VqMapping>>,
    /// Number of virtqueues.
    #[serde(default = "default_num_queues")]
    pub num_queues: u16,
    /// Size of each virtqueue (a power of two).
    #[serde(default = "default_queue_size")]
    pub queue_size: u16,
    /// Discard handling.
    #[serde(default)]
    pub discard: DiscardMode,
    /// This disk's throttle limits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub throttle: Option<ThrottleLimits>,
    /// A throttle group shared with other disks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub throttle_group: Option<String>,
    /// Serial number returned by GET_ID (at most 20 bytes; defaults to the id).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial: Option<String>,
    /// NBD disks only: seconds requests wait for a lost connection to come back before
    /// they fail (reconnecting goes on); 0 never reconnects. Default 5.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reconnect_delay: Option<u64>,
    /// What a failed write, flush, discard or write-zeroes becomes (QEMU's `werror`):
    /// `report`, `stop`, `enospc` (stop when out of space, else report; the default) or
    /// `ignore`. A stop holds requests only where the control plane can resume the
    /// disk; elsewhere it acts as `report`.
    #[serde(default, skip_serializing_if = "WriteErrorPolicy::is_default")]
    pub on_write_error: WriteErrorPolicy,
    /// What a failed read becomes (QEMU's `rerror`): `report` (the default), `stop` or
    /// `ignore`.
    #[serde(default, skip_serializing_if = "ReadErrorPolicy::is_default")]
    pub on_read_error: ReadErrorPolicy,
}

/// The longest `reconnect_delay` accepted (an hour).
pub const MAX_RECONNECT_DELAY: u64 = 3600;

fn default_num_queues() -> u16 {
    1
}

fn default_queue_size() -> u16 {
    256
}

impl DiskConfig {
    /// A disk with default settings.
    pub fn new(id: impl Into<String>, path: impl Into<PathBuf>) -> Self {
        DiskConfig {
            id: id.into(),
            path: path.into(),
            null_size: None,
            readonly: false,
            format: ImageFormat::default(),
            cache: CacheMode::default(),
            aio: AioKind::default(),
            iothread: None,
            iothread_vq_mapping: None,
            num_queues: default_num_queues(),
            queue_size: default_queue_size(),
            discard: DiscardMode::default(),
            throttle: None,
            throttle_group: None,
            serial: None,
            reconnect_delay: None,
            on_write_error: WriteErrorPolicy::default(),
            on_read_error: ReadErrorPolicy::default(),
        }
    }

    /// The serial reported by GET_ID.
    pub fn serial(&self) -> &str {
        self.serial.as_deref().unwrap_or(&self.id)
    }

    /// Whether the disk is a null backend.
    pub fn is_null(&self) -> bool {
        self.path.as_os_str() == "null"
    }

    /// Whether the disk is an export on an NBD server (its path is an NBD URI).
    pub fn is_nbd(&self) -> bool {
        self.path.to_str().is_some_and(block::nbd::is_nbd_uri)
    }

    /// The file or block device on this host the disk opens (none for a null or an NBD
    /// disk).
    pub fn host_path(&self) -> Option<&std::path::Path> {
        (!self.is_null() && !self.is_nbd()).then_some(self.path.as_path())
    }

    /// How long requests wait for a lost NBD connection.
    pub fn reconnect_delay(&self) -> std::time::Duration {
        std::time::Duration::from_secs(
            self.reconnect_delay
                .unwrap_or(block::nbd::client::DEFAULT_RECONNECT_DELAY),
        )
    }

    /// How to open the disk's image (not for a null disk).
    pub fn disk_options(&self) -> DiskOptions {
        DiskOptions {
            readonly: self.readonly,
            cache: self.cache,
            format: self.format,
            reconnect_delay: self.reconnect_delay(),
            connections: usize::from(self.num_queues),
            ..DiskOptions::new(self.path.clone())
        }
    }

    /// Checks the settings that need no other object (iothread names are checked by
    /// whoever knows the iothreads).
    pub fn validate(&self) -> Result<(), String> {
        check_id("disk", &self.id)?;
        let id = &self.id;
        if !(1..=MAX_QUEUES).contains(&self.num_queues) {
            return Err(format!("disk {id}: num_queues must be 1..={MAX_QUEUES}"));
        }
        if !self.queue_size.is_power_of_two() || !(2..=MAX_QUEUE_SIZE).contains(&self.queue_size) {
            return Err(format!(
                "disk {id}: queue_size must be a power of two in 2..={MAX_QUEUE_SIZE}"
            ));
        }
        if self.format != ImageFormat::Raw && (self.is_null() || self.is_nbd()) {
            return Err(format!(
                "disk {id}: format {} needs an image file (a null disk or an NBD export is raw)",
                self.format
            ));
        }
        if self.is_nbd() {
            let uri = self.path.to_str().unwrap_or_default();
            uri.parse::<block::nbd::NbdUri>()
                .map_err(|e| format!("disk {id}: {e}"))?;
        }
        match self.reconnect_delay {
            Some(_) if !self.is_nbd() => {
                return Err(format!(
                    "disk {id}: reconnect_delay is only for NBD disks (path nbd://... or nbd+unix://...)"
                ));
            }
            Some(s) if s > MAX_RECONNECT_DELAY => {
                return Err(format!(
                    "disk {id}: reconnect_delay must be 0..={MAX_RECONNECT_DELAY} seconds"
                ));
            }
            _ => {}
        }
        // aio names the engine of a local image; an NBD disk's I/O is socket I/O.
        if self.aio == AioKind::Native && !self.cache.direct() && self.host_path().is_some() {
            return Err(format!(
                "disk {id}: aio=native needs O_DIRECT: use cache=none or cache=directsync (cache={} was given)",
                self.cache
            ));
        }
        if self.serial().len() > 20 {
            return Err(format!("disk {id}: serial is longer than 20 bytes"));
        }
        match (self.is_null(), self.null_size) {
            (true, None) => return Err(format!("disk {id}: path \"null\" needs null_size")),
            (true, Some(size)) if size == 0 || size % 512 != 0 => {
                return Err(format!(
                    "disk {id}: null_size must be a non-zero multiple of 512"
                ));
            }
            (false, Some(_)) => {
                return Err(format!("disk {id}: null_size is only for path \"null\""));
            }
            _ => {}
        }
        if let Some(limits) = &self.throttle {
            limits.validate().map_err(|e| format!("disk {id}: {e}"))?;
        }
        if let Some(mapping) = &self.iothread_vq_mapping {
            if self.iothread.is_some() {
                return Err(format!(
                    "disk {id}: iothread and iothread_vq_mapping are exclusive"
                ));
            }
            let mut seen = vec![false; usize::from(self.num_queues)];
            for m in mapping {
                for &vq in &m.vqs {
                    match seen.get_mut(usize::from(vq)) {
                        None => {
                            return Err(format!(
                                "disk {id}: iothread_vq_mapping names queue {vq}, but num_queues is {}",
                                self.num_queues
                            ));
                        }
                        Some(true) => return Err(format!("disk {id}: queue {vq} is mapped twice")),
                        Some(s) => *s = true,
                    }
                }
            }
            if let Some(vq) = seen.iter().position(|s| !s) {
                return Err(format!(
                    "disk {id}: queue {vq} is in no iothread_vq_mapping entry"
                ));
            }
        }
        Ok(())
    }

    /// Which iothread serves each queue: `Some(name)` for a named iothread, `None` for
    /// the disk's dedicated one.
    pub fn queue_iothreads(&self) -> Vec<Option<String>> {
        let mut out = vec![self.iothread.clone(); usize::from(self.num_queues)];
        for m in self.iothread_vq_mapping.iter().flatten() {
            for &vq in &m.vqs {
                if let Some(slot) = out.get_mut(usize::from(vq)) {
                    *slot = Some(m.iothread.clone());
                }
            }
        }
        out
    }
}

/// How counters and messages name the dedicated iothread of a disk (one that names no
/// iothread): `dedicated:<disk id>`. The colon cannot appear in an iothread id, so it is
/// never mistaken for a named iothread.
pub fn dedicated_iothread_name(disk: &str) -> String {
    format!("dedicated:{disk}")
}

/// The disk whose dedicated iothread `name` is ([`dedicated_iothread_name`]), if it is one.
pub fn dedicated_iothread_disk(name: &str) -> Option<&str> {
    name.strip_prefix("dedicated:")
}

/// Checks a name (of a disk, iothread, VM or throttle group): 1-64 characters of
/// `A-Z a-z 0-9 - _ .`, not starting with `.` (a VM's id names its state directory, where
/// `.` and `..` mean something else); the message starts with `what`.
pub fn check_id(what: &str, id: &str) -> Result<(), String> {
    let ok = !id.is_empty()
        && !id.starts_with('.')
        && id.len() <= 64
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{what} id {id:?} must be 1-64 characters of A-Z a-z 0-9 - _ . not starting with ."
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_round_trip() {
        let d: DiskConfig = serde_json::from_str(r#"{"id":"disk0","path":"/tmp/a.raw"}"#).unwrap();
        assert_eq!((d.num_queues, d.queue_size), (1, 256));
        assert_eq!((d.cache, d.aio), (CacheMode::None, AioKind::IoUring));
        assert_eq!(d.format, ImageFormat::Raw, "never probed");
        assert_eq!(d.serial(), "disk0");
        d.validate().unwrap();
        let back: DiskConfig = serde_json::from_str(&serde_json::to_string(&d).unwrap()).unwrap();
        assert_eq!(back, d);
        let t: IoThreadConfig = serde_json::from_str(r#"{"id":"io0"}"#).unwrap();
        assert_eq!(t, IoThreadConfig::new("io0"));
        t.validate().unwrap();
    }

    #[test]
    fn error_policies_default_to_qemus_and_parse_from_the_shorthand() {
        let d: DiskConfig = serde_json::from_str(r#"{"id":"d","path":"a"}"#).unwrap();
        assert_eq!(
            (d.on_write_error, d.on_read_error),
            (WriteErrorPolicy::Enospc, ReadErrorPolicy::Report)
        );
        // Defaults are left out of what is shown.
        assert!(!serde_json::to_string(&d).unwrap().contains("on_"));
        let map = kv::parse_kv_with(
            "id=d,path=a,on_write_error=stop,on_read_error=ignore",
            &kv::DISK_HINTS,
        )
        .unwrap();
        let d: DiskConfig = serde_json::from_value(serde_json::Value::Object(map)).unwrap();
        assert_eq!(
            (d.on_write_error, d.on_read_error),
            (WriteErrorPolicy::Stop, ReadErrorPolicy::Ignore)
        );
    }

    #[test]
    fn rejects_bad_settings_with_clear_messages() {
        let bad = |json: &str, needle: &str| {
            let err = match serde_json::from_str::<DiskConfig>(json) {
                Err(e) => e.to_string(),
                Ok(d) => d.validate().unwrap_err(),
            };
            assert!(err.contains(needle), "{json}: {err}");
        };
        bad(r#"{"id":"d","path":"a","bogus":1}"#, "unknown field");
        bad(r#"{"id":"d","path":"a","queue_size":100}"#, "power of two");
        bad(r#"{"id":"d","path":"a","num_queues":0}"#, "num_queues");
        bad(r#"{"id":"d","path":"a","cache":"fast"}"#, "unknown variant");
        // A read cannot run out of space: no `enospc` for reads.
        bad(
            r#"{"id":"d","path":"a","on_read_error":"enospc"}"#,
            "unknown variant",
        );
        bad(
            r#"{"id":"d","path":"a","format":"vmdk"}"#,
            "unknown variant",
        );
        bad(
            r#"{"id":"d","path":"null","null_size":4096,"format":"qcow2"}"#,
            "needs an image file",
        );
        bad(
            r#"{"id":"d","path":"nbd://h/e","format":"qcow2"}"#,
            "needs an image file",
        );
        bad(
            r#"{"id":"d","path":"a","serial":"123456789012345678901"}"#,
            "serial",
        );
        bad(r#"{"id":"d e","path":"a"}"#, "must be 1-64");
        bad(r#"{"id":"d","path":"null"}"#, "null_size");
        bad(
            r#"{"id":"d","path":"a","aio":"native","cache":"writeback"}"#,
            "aio=native needs O_DIRECT",
        );
        bad(
            r#"{"id":"d","path":"a","iothread":"io0","iothread_vq_mapping":[{"iothread":"io1","vqs":[0]}]}"#,
            "exclusive",
        );
        bad(
            r#"{"id":"d","path":"a","num_queues":2,"iothread_vq_mapping":[{"iothread":"io1","vqs":[0]}]}"#,
            "queue 1 is in no",
        );
        bad(
            r#"{"id":"d","path":"a","throttle":{"iops_total":10,"iops_read":5}}"#,
            "iops",
        );
        let t = IoThreadConfig {
            aio_max_batch: 0,
            ..IoThreadConfig::new("io0")
        };
        assert!(t.validate().unwrap_err().contains("aio_max_batch"));
    }

    #[test]
    fn cpu_affinity_is_checked_against_the_hosts_cpus() {
        let usable = usable_cpus();
        assert!(!usable.is_empty());
        let mut t = IoThreadConfig::new("io0");
        t.cpu_affinity = vec![usable[0]];
        t.validate().unwrap();
        // One past the highest CPU the process may use: on a 2-CPU host, CPU 2 (and 100).
        for cpu in [usable[usable.len() - 1] + 1, 100] {
            t.cpu_affinity = vec![usable[0], cpu];
            let err = t.validate().unwrap_err();
            assert!(err.contains(&format!("CPU {cpu}")), "{err}");
            assert!(err.contains("usable CPUs: "), "{err}");
        }
        assert_eq!(cpu_list(&[0, 1, 2, 3, 6, 8, 9]), "0-3,6,8-9");
    }

    #[test]
    fn an_update_changes_only_what_it_carries() {
        let mut t = IoThreadConfig::new("io0");
        t.poll_max_ns = 0;
        t.cpu_affinity = vec![0];
        t.aio_max_batch = 8;
        let u: IoThreadUpdate = serde_json::from_str(r#"{"id":"io0","poll_grow":4}"#).unwrap();
        t.merge(&u);
        assert_eq!(
            (
                t.poll_max_ns,
                t.poll_grow,
                t.aio_max_batch,
                t.cpu_affinity.clone()
            ),
            (0, 4, 8, vec![0])
        );
        let u: IoThreadUpdate = serde_json::from_str(r#"{"id":"io0","cpu_affinity":[]}"#).unwrap();
        t.merge(&u);
        assert!(t.cpu_affinity.is_empty());
        assert!(serde_json::from_str::<IoThreadUpdate>(r#"{"id":"io0","bogus":1}"#).is_err());
    }

    #[test]
    fn queue_to_iothread_mapping() {
        let mut d = DiskConfig::new("d", "a");
        d.num_queues = 3;
        assert_eq!(d.queue_iothreads(), vec![None, None, None]);
        d.iothread_vq_mapping = Some(vec![
            VqMapping {
                iothread: "a".into(),
                vqs: vec![0, 2],
            },
            VqMapping {
                iothread: "b".into(),
                vqs: vec![1],
            },
        ]);
        d.validate().unwrap();
        let names: Vec<_> = d
            .queue_iothreads()
            .into_iter()
            .map(Option::unwrap)
            .collect();
        assert_eq!(names, ["a", "b", "a"]);
    }
}
