//! The VM config: the JSON of `vm.create` (openapi.yaml), shared by the `vmm` binary and
//! the API. Field names are the contract; unknown fields are rejected. `validate` reports
//! every problem at once, each naming the field it is about.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use block::throttle::ThrottleLimits;
use devices::config::{DiskConfig, IoThreadConfig};
use serde::{Deserialize, Serialize};

/// Why a disk and an iothread may not share an id.
const SHARED_ID: &str = "a disk's id also names its dedicated iothread \
    (`dedicated:<disk id>`), so disks and iothreads need different ids";

/// Most vCPUs a VM may have.
pub const MAX_VCPUS: u16 = 255;

/// Most iothreads and throttle groups one VM may have (each costs threads and file
/// descriptors on the host).
pub const MAX_DEVICES: usize = 64;
/// Most disks one VM may have: each is a function of PCI bus 0, whose 32 device slots
/// include the host bridge.
pub const MAX_DISKS: usize = devices::pci::DEVICES_PER_BUS - 1;
/// Smallest guest memory, in MiB.
pub const MIN_MEMORY_MIB: u64 = 64;
/// Largest guest memory, in MiB (1 TiB).
pub const MAX_MEMORY_MIB: u64 = 1 << 20;

/// Errors of loading or checking a VM config.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The JSON is malformed, has an unknown field, a missing one or a wrong type.
    #[error("invalid JSON: {0}")]
    Parse(#[from] serde_json::Error),
    /// The JSON parsed but some values are invalid; every problem is listed.
    #[error("invalid VM config: {}", .0.join("; "))]
    Invalid(Vec<String>),
}

impl ConfigError {
    /// Every problem as one line each (one line for read and parse errors).
    pub fn details(&self) -> Vec<String> {
        match self {
            ConfigError::Invalid(problems) => problems.clone(),
            other => vec![other.to_string()],
        }
    }
}

/// A whole VM.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    /// Name of the VM, unique among the VMs of one service.
    pub id: String,
    /// vCPUs.
    #[serde(default)]
    pub cpus: CpusConfig,
    /// Guest RAM.
    #[serde(default)]
    pub memory: MemoryConfig,
    /// What to boot.
    pub payload: PayloadConfig,
    /// Where the serial console goes.
    #[serde(default)]
    pub serial: SerialConfig,
    /// Named iothreads that disks refer to.
    #[serde(default)]
    pub iothreads: Vec<IoThreadConfig>,
    /// Throttle budgets shared by several disks.
    #[serde(default)]
    pub throttle_groups: Vec<ThrottleGroupConfig>,
    /// virtio-blk disks.
    #[serde(default)]
    pub disks: Vec<DiskConfig>,
}

/// vCPU settings.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct CpusConfig {
    /// vCPUs started at boot (1..=255).
    #[serde(default = "default_boot_vcpus")]
    pub boot_vcpus: u16,
}

fn default_boot_vcpus() -> u16 {
    1
}

impl Default for CpusConfig {
    fn default() -> Self {
        CpusConfig {
            boot_vcpus: default_boot_vcpus(),
        }
    }
}

/// Guest RAM settings.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct MemoryConfig {
    /// Size in MiB (64..=1048576).
    #[serde(default = "default_size_mib")]
    pub size_mib: u64,
    /// Back guest RAM with 2 MiB hugepages (the host must have them reserved).
    #[serde(default)]
    pub hugepages: bool,
}

fn default_size_mib() -> u64 {
    512
}

impl Default for MemoryConfig {
    fn default() -> Self {
        MemoryConfig {
            size_mib: default_size_mib(),
            hugepages: false,
        }
    }
}

impl MemoryConfig {
    /// Size in bytes.
    pub fn size_bytes(&self) -> u64 {
        self.size_mib.saturating_mul(1 << 20)
    }
}

/// The kernel to boot, its initramfs and command line.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct PayloadConfig {
    /// A `bzImage` or an ELF `vmlinux` (PVH entry), or the test guest's ELF.
    #[cfg_attr(feature = "openapi", schema(value_type = String))]
    pub kernel: PathBuf,
    /// Optional initramfs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<String>))]
    pub initramfs: Option<PathBuf>,
    /// Kernel command line.
    #[serde(default)]
    pub cmdline: String,
}

/// Where serial output goes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum SerialMode {
    /// Appended to the file at `path` (created or truncated).
    File,
    /// Sent to the one client connected to the Unix socket at `path`.
    Socket,
    /// The VMM's standard output.
    Stdout,
    /// Dropped. The default.
    #[default]
    Null,
}

/// Serial console settings.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct SerialConfig {
    /// Where output goes.
    #[serde(default)]
    pub mode: SerialMode,
    /// File or socket path (`file` and `socket` modes only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<String>))]
    pub path: Option<PathBuf>,
}

impl SerialConfig {
    /// The host file or socket the output uses (`file` and `socket` modes), if any.
    pub fn host_path(&self) -> Option<&Path> {
        match self.mode {
            SerialMode::File | SerialMode::Socket => self.path.as_deref(),
            SerialMode::Stdout | SerialMode::Null => None,
        }
    }
}

/// A named throttle budget shared by the disks that name it in `throttle_group`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct ThrottleGroupConfig {
    /// Name, referenced by disks.
    pub id: String,
    /// The shared limits.
    pub limits: ThrottleLimits,
}

impl VmConfig {
    /// Parses and validates a JSON config.
    pub fn from_json(json: &str) -> Result<Self, ConfigError> {
        let config: VmConfig = serde_json::from_str(json)?;
        config.validate()?;
        Ok(config)
    }

    /// Reads, parses and validates a JSON config file.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let json = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_json(&json)
    }

    /// Checks every value and cross-reference; `Err(Invalid)` lists all problems.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let problems = self.problems();
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::Invalid(problems))
        }
    }

    /// Every problem of the config, one message each naming its field (empty when valid).
    pub fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        if let Err(e) = devices::config::check_id("VM", &self.id) {
            p.push(format!("id: {e}"));
        }
        let vcpus = self.cpus.boot_vcpus;
        if !(1..=MAX_VCPUS).contains(&vcpus) {
            p.push(format!(
                "cpus.boot_vcpus must be 1..={MAX_VCPUS} (got {vcpus})"
            ));
        }
        self.check_memory(&mut p);
        self.check_payload(&mut p);
        self.check_serial(&mut p);
        self.check_disk_count(&mut p);
        for (field, n) in [
            ("iothreads", self.iothreads.len()),
            ("throttle_groups", self.throttle_groups.len()),
        ] {
            if n > MAX_DEVICES {
                p.push(format!("{field}: at most {MAX_DEVICES} per VM (got {n})"));
            }
        }
        if self.disks.len() > MAX_DISKS
            || self.iothreads.len() > MAX_DEVICES
            || self.throttle_groups.len() > MAX_DEVICES
        {
            // A client's list too long to look at one by one: every disk is compared
            // with every other and its file looked up, so stop at the count.
            return p;
        }
        let iothreads = self.check_iothreads(&mut p);
        let groups = self.check_throttle_groups(&mut p);
        let keys = self.image_keys();
        for i in 0..self.disks.len() {
            // Each pair of disks once: against the disks before it.
            self.check_disk(i, 0..i, &iothreads, &groups, &keys, &mut p);
        }
        p
    }

    /// Every problem of disk `index` of this config, one message each naming its field:
    /// its own settings, the iothreads and throttle group it names, its id and image
    /// against the other disks, the iothreads' ids and the serial file, and the number of
    /// disks. The rest of the config is not looked at: a change of one disk of a VM that
    /// exists (`vm.add-disk`, `vm.update-disk`) checks that disk only, so that a file the
    /// VM needed to start (its kernel) may be gone since. Empty for an `index` out of range.
    pub fn disk_problems(&self, index: usize) -> Vec<String> {
        let mut p = Vec::new();
        if index >= self.disks.len() {
            return p;
        }
        self.check_disk_count(&mut p);
        let iothreads = self.iothreads.iter().map(|t| t.id.as_str()).collect();
        let groups = self.throttle_groups.iter().map(|g| g.id.as_str()).collect();
        let keys = self.image_keys();
        let others = (0..self.disks.len()).filter(|&j| j != index);
        self.check_disk(index, others, &iothreads, &groups, &keys, &mut p);
        if let Some((j, t)) = self
            .iothreads
            .iter()
            .enumerate()
            .find(|(_, t)| t.id == self.disks[index].id)
        {
            p.push(format!(
                "disks[{index}].id {:?} is also the id of iothread {} (iothreads[{j}]); {SHARED_ID}",
                t.id, t.id
            ));
        }
        if let Some(serial) = self.serial_file()
            && self.is_image_of(index, serial)
        {
            p.push(format!(
                "disks[{index}] ({}).path {} is this VM's serial output file (serial.path); a disk needs an image of its own",
                self.disks[index].id,
                self.disks[index].path.display()
            ));
        }
        p
    }

    /// This config with `disk` added, if [`Self::disk_problems`] finds nothing wrong with
    /// it (the rest of the config is not checked again).
    pub fn with_disk(&self, disk: DiskConfig) -> Result<VmConfig, ConfigError> {
        let mut config = self.clone();
        config.disks.push(disk);
        let problems = config.disk_problems(config.disks.len() - 1);
        if problems.is_empty() {
            Ok(config)
        } else {
            Err(ConfigError::Invalid(problems))
        }
    }

    fn check_disk_count(&self, p: &mut Vec<String>) {
        if self.disks.len() > MAX_DISKS {
            p.push(format!(
                "disks: at most {MAX_DISKS} per VM (one per slot of PCI bus 0; got {})",
                self.disks.len()
            ));
        }
    }

    fn check_memory(&self, p: &mut Vec<String>) {
        let mib = self.memory.size_mib;
        if !(MIN_MEMORY_MIB..=MAX_MEMORY_MIB).contains(&mib) {
            p.push(format!(
                "memory.size_mib must be {MIN_MEMORY_MIB}..={MAX_MEMORY_MIB} (got {mib})"
            ));
        } else if self.memory.hugepages && !mib.is_multiple_of(2) {
            p.push(format!(
                "memory.size_mib must be a multiple of 2 with hugepages (2 MiB pages; got {mib})"
            ));
        } else if self.memory.hugepages {
            // Fewer reserved in all than needed can never work (only an administrator can
            // change it): invalid here. Reserved but taken by others is a host limit of
            // the moment, found when the memory is made.
            let (needed, reserved) = (mib / 2, crate::memory::reserved_hugepages());
            if reserved < needed {
                p.push(format!(
                    "memory.hugepages: this host reserves {reserved} 2 MiB hugepages in all, \
                     {needed} needed (an administrator reserves them: echo N > \
                     /proc/sys/vm/nr_hugepages)"
                ));
            }
        }
    }

    fn check_payload(&self, p: &mut Vec<String>) {
        check_file("payload.kernel", &self.payload.kernel, p);
        if let Some(initramfs) = &self.payload.initramfs {
            check_file("payload.initramfs", initramfs, p);
        }
        if self.payload.cmdline.contains('\0') {
            p.push("payload.cmdline must not contain a NUL byte".to_string());
        }
    }

    fn check_serial(&self, p: &mut Vec<String>) {
        let needs_path = matches!(self.serial.mode, SerialMode::File | SerialMode::Socket);
        let mode = match self.serial.mode {
            SerialMode::File => "file",
            SerialMode::Socket => "socket",
            SerialMode::Stdout => "stdout",
            SerialMode::Null => "null",
        };
        match (&self.serial.path, needs_path) {
            (None, true) => p.push(format!(
                "serial.path is required when serial.mode is {mode}"
            )),
            (Some(_), false) => p.push(format!(
                "serial.path is only for modes file and socket (serial.mode is {mode})"
            )),
            (Some(path), true) if path.as_os_str().is_empty() => {
                p.push("serial.path must not be empty".to_string())
            }
            (Some(path), true) => self.check_serial_path(path, p),
            _ => {}
        }
    }

    /// What is at a serial path must suit the mode: a file output is a regular file (or
    /// is created), never one of this VM's images; a socket replaces only a socket.
    fn check_serial_path(&self, path: &Path, p: &mut Vec<String>) {
        use std::os::unix::fs::FileTypeExt;
        let Ok(m) = std::fs::metadata(path) else {
            return;
        };
        let t = m.file_type();
        let kind = block::host_file::kind(&t);
        match self.serial.mode {
            SerialMode::File if !t.is_file() => p.push(format!(
                "serial.path {} is {kind}; serial output goes to a regular file (or a new one)",
                path.display()
            )),
            SerialMode::File => {
                if let Some((i, d)) = self
                    .disks
                    .iter()
                    .enumerate()
                    .find(|&(i, _)| self.is_image_of(i, path))
                {
                    p.push(format!(
                        "serial.path {} is the image of disks[{i}] ({}); serial output must go to a file of its own",
                        path.display(),
                        d.id
                    ));
                }
            }
            SerialMode::Socket if !t.is_socket() => p.push(format!(
                "serial.path {} exists and is {kind}, not a socket; name a new path or a stale socket",
                path.display()
            )),
            _ => {}
        }
    }

    /// Whether `path` is the image of disk `i` (through symlinks or hard links).
    fn is_image_of(&self, i: usize, path: &Path) -> bool {
        self.disks
            .get(i)
            .is_some_and(|d| !d.is_null() && same_file(&d.path, path))
    }

    /// The serial output file, in file mode.
    fn serial_file(&self) -> Option<&Path> {
        match (self.serial.mode, &self.serial.path) {
            (SerialMode::File, Some(path)) => Some(path),
            _ => None,
        }
    }

    /// Checks the iothreads; returns their names.
    fn check_iothreads(&self, p: &mut Vec<String>) -> HashSet<&str> {
        let mut names = HashSet::new();
        for (i, t) in self.iothreads.iter().enumerate() {
            if let Err(e) = t.validate() {
                p.push(format!("iothreads[{i}]: {e}"));
            }
            if !names.insert(t.id.as_str()) {
                p.push(format!(
                    "iothreads[{i}].id {:?} is used by another iothread",
                    t.id
                ));
            }
            if let Some(j) = self.disks.iter().position(|d| d.id == t.id) {
                p.push(format!(
                    "iothreads[{i}].id {:?} is also the id of disk {} (disks[{j}]); {SHARED_ID}",
                    t.id, t.id
                ));
            }
        }
        names
    }

    /// Checks the throttle groups; returns their names.
    fn check_throttle_groups(&self, p: &mut Vec<String>) -> HashSet<&str> {
        let mut names = HashSet::new();
        for (i, g) in self.throttle_groups.iter().enumerate() {
            if let Err(e) = devices::config::check_id("throttle group", &g.id) {
                p.push(format!("throttle_groups[{i}].id: {e}"));
            }
            if !names.insert(g.id.as_str()) {
                p.push(format!(
                    "throttle_groups[{i}].id {:?} is used by another throttle group",
                    g.id
                ));
            }
            if let Err(e) = g.limits.validate() {
                p.push(format!("throttle_groups[{i}].limits ({}): {e}", g.id));
            }
        }
        names
    }

    /// What identifies each disk's image (`None` for a null disk).
    fn image_keys(&self) -> Vec<Option<FileKey>> {
        self.disks
            .iter()
            .map(|d| (!d.is_null()).then(|| FileKey::of(&d.path)))
            .collect()
    }

    /// Checks disk `i`: its settings, the names it refers to, and its id and image against
    /// the disks `others` (`keys` from [`Self::image_keys`]).
    fn check_disk(
        &self,
        i: usize,
        others: impl Iterator<Item = usize> + Clone,
        iothreads: &HashSet<&str>,
        groups: &HashSet<&str>,
        keys: &[Option<FileKey>],
        p: &mut Vec<String>,
    ) {
        let d = &self.disks[i];
        let at = format!("disks[{i}] ({})", d.id);
        if let Err(e) = d.validate() {
            p.push(format!("disks[{i}]: {e}"));
        }
        if others.clone().any(|j| self.disks[j].id == d.id) {
            p.push(format!("disks[{i}].id {:?} is used by another disk", d.id));
        }
        if let Some(t) = &d.iothread
            && !iothreads.contains(t.as_str())
        {
            p.push(format!(
                "{at}.iothread names {t:?}, which is not in iothreads"
            ));
        }
        for (j, m) in d.iothread_vq_mapping.iter().flatten().enumerate() {
            if !iothreads.contains(m.iothread.as_str()) {
                p.push(format!(
                    "{at}.iothread_vq_mapping[{j}].iothread names {:?}, which is not in iothreads",
                    m.iothread
                ));
            }
        }
        if let Some(g) = &d.throttle_group
            && !groups.contains(g.as_str())
        {
            p.push(format!(
                "{at}.throttle_group names {g:?}, which is not in throttle_groups"
            ));
        }
        // One image reached through a symlink or a hard link is the same image; it may be
        // shared only read-only.
        let Some(key) = &keys[i] else {
            return;
        };
        if let Some(j) = others
            .clone()
            .find(|&j| keys[j].as_ref() == Some(key) && !(d.readonly && self.disks[j].readonly))
        {
            let other = &self.disks[j];
            let through = if other.path == d.path {
                String::new()
            } else {
                format!(" (reached as {})", other.path.display())
            };
            p.push(format!(
                "{at}.path {} is the same image as disks[{j}] ({}){through} of this VM; an image may be shared only read-only",
                d.path.display(),
                other.id
            ));
        }
    }

    /// One line describing the VM, for logs and the binary's `config ok` message.
    pub fn summary(&self) -> String {
        let serial = match (&self.serial.mode, &self.serial.path) {
            (SerialMode::File, Some(path)) => format!("file {}", path.display()),
            (SerialMode::Socket, Some(path)) => format!("socket {}", path.display()),
            (SerialMode::Stdout, _) => "stdout".to_string(),
            _ => "null".to_string(),
        };
        format!(
            "vm {}: {} vCPU(s), {} MiB{}, kernel {}, {} disk(s), {} iothread(s), {} throttle group(s), serial {serial}",
            self.id,
            self.cpus.boot_vcpus,
            self.memory.size_mib,
            if self.memory.hugepages {
                " (hugepages)"
            } else {
                ""
            },
            self.payload.kernel.display(),
            self.disks.len(),
            self.iothreads.len(),
            self.throttle_groups.len(),
        )
    }
}

/// `path` resolved (symlinks, `..`), or as given when it cannot be (it does not exist).
pub fn resolve(path: &Path) -> PathBuf {
    std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf())
}

/// What identifies a file: its inode when it exists, else its resolved path.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum FileKey {
    /// Device and inode number.
    Inode(u64, u64),
    /// The path, resolved as far as it can be.
    Path(PathBuf),
}

impl FileKey {
    /// The key of `path` (symlinks followed).
    pub fn of(path: &Path) -> FileKey {
        use std::os::unix::fs::MetadataExt;
        match std::fs::metadata(path) {
            Ok(m) => FileKey::Inode(m.dev(), m.ino()),
            Err(_) => FileKey::Path(resolve(path)),
        }
    }
}

/// Whether `a` and `b` name one file (through symlinks or hard links).
pub fn same_file(a: &Path, b: &Path) -> bool {
    FileKey::of(a) == FileKey::of(b)
}

fn check_file(field: &str, path: &Path, p: &mut Vec<String>) {
    match std::fs::metadata(path) {
        Ok(m) if m.is_file() => {}
        Ok(m) => p.push(format!(
            "{field}: {} is {}, not a regular file",
            path.display(),
            block::host_file::kind(&m.file_type())
        )),
        Err(e) => p.push(format!("{field}: {}: {e}", path.display())),
    }
}

#[cfg(test)]
mod tests;
