//! Landlock: a VM process confines its own file access to the files its VM's config
//! names (docs/architecture.md), before any other thread starts, so that every
//! thread is confined. Images hot plugged later are handed over as descriptors
//! ([`block::host_file::hand_over`]); nothing else is ever opened by path.

use std::path::{Path, PathBuf};

use landlock::{
    ABI, Access, AccessFs, BitFlags, PathBeneath, PathFd, Ruleset, RulesetAttr, RulesetCreatedAttr,
    RulesetStatus,
};
use vmm::config::{SerialMode, VmConfig};

/// The newest Landlock ABI whose rights are asked for (older kernels get what they know).
const ABI_WANTED: ABI = ABI::V5;

/// What a VM process may open, and how.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FileSet {
    /// Files it may read (kernel, initramfs, read-only images, a few host facts).
    pub read: Vec<PathBuf>,
    /// Files it may read and write (writable images, the serial output, `/dev/kvm`).
    pub write: Vec<PathBuf>,
    /// Directories in which it may create, replace and remove files (its state
    /// directory) and sockets (a serial socket's directory).
    pub dirs: Vec<(PathBuf, DirUse)>,
}

/// What a VM process does in a directory of its [`FileSet`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DirUse {
    /// Writes files there (its last state, a start error: new files renamed into place).
    Files,
    /// Binds a socket there (a serial socket; a stale one is removed first).
    Socket,
}

impl FileSet {
    /// The files the VM of `config` needs (a rebuild for a guest reset included), and
    /// `state_files`' directories for what the process writes when it ends.
    pub fn for_vm(config: &VmConfig, state_files: &[&Path]) -> FileSet {
        let mut set = FileSet::default();
        set.read.push(config.payload.kernel.clone());
        set.read.extend(config.payload.initramfs.clone());
        for d in config.disks.iter().filter(|d| d.host_path().is_some()) {
            if d.readonly {
                set.read.push(d.path.clone());
            } else {
                set.write.push(d.path.clone());
            }
            // A qcow2 image's backing chain is read too. (A chain that cannot be read
            // now fails the disk's open with its reason.)
            if d.format == block::ImageFormat::Qcow2 {
                set.read
                    .extend(block::qcow2::header::backing_files(&d.path).unwrap_or_default());
            }
        }
        if let Some(p) = &config.serial.path {
            match config.serial.mode {
                SerialMode::File => set.write.push(p.clone()),
                SerialMode::Socket => {
                    if let Some(dir) = p.parent() {
                        set.dirs.push((dir.to_path_buf(), DirUse::Socket));
                    }
                }
                _ => {}
            }
        }
        set.write.push(PathBuf::from("/dev/kvm"));
        // Read by glibc's malloc and by memory and CPU checks; all optional.
        for p in [
            "/proc/sys/vm/overcommit_memory",
            "/sys/kernel/mm/hugepages",
            "/sys/devices/system/cpu/online",
            // The resolver's files, for the host name of an NBD server (nbd://host/...)
            // when a disk opens or is hot-plugged.
            "/etc/hosts",
            "/etc/host.conf",
            "/etc/resolv.conf",
            "/etc/nsswitch.conf",
            "/etc/gai.conf",
        ] {
            set.read.push(PathBuf::from(p));
        }
        for f in state_files {
            if let Some(dir) = f.parent() {
                let dir = dir.to_path_buf();
                if !set.dirs.iter().any(|(d, _)| *d == dir) {
                    set.dirs.push((dir, DirUse::Files));
                }
            }
        }
        set
    }
}

/// How far the kernel confined the process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Confined {
    /// Every rule holds.
    Fully,
    /// The kernel's Landlock is older: some rights are not restricted.
    Partly,
    /// The kernel has no Landlock: nothing is restricted.
    Not,
}

/// Restricts the calling thread, and every thread it starts from now on, to `set`.
/// A file of `set` that does not exist is left out (its later open fails as without
/// Landlock). Call it before the process starts any other thread.
pub fn restrict(set: &FileSet) -> Result<Confined, String> {
    let err = |e: &dyn std::fmt::Display| format!("Landlock: {e}");
    let file = AccessFs::from_file(ABI_WANTED);
    // IoctlDev: a block device image answers BLKGETSIZE64 and BLKSSZGET.
    let read = AccessFs::from_read(ABI_WANTED) | AccessFs::IoctlDev;
    let write = file & !BitFlags::from(AccessFs::Execute);
    let wanted = set
        .read
        .iter()
        .map(|p| (p, read))
        .chain(set.write.iter().map(|p| (p, write)))
        .chain(set.dirs.iter().map(|(d, what)| {
            let access = match what {
                DirUse::Files => write | AccessFs::MakeReg | AccessFs::RemoveFile,
                DirUse::Socket => AccessFs::MakeSock | AccessFs::RemoveFile,
            };
            (d, access)
        }));
    let mut rules = Vec::new();
    for (path, access) in wanted {
        let Ok(fd) = PathFd::new(path) else { continue };
        // Rights of directories only apply to directories.
        let access = if std::fs::metadata(path).is_ok_and(|m| m.is_dir()) {
            access
        } else {
            access & file
        };
        rules.push(Ok::<_, landlock::RulesetError>(PathBeneath::new(
            fd, access,
        )));
    }
    let status = Ruleset::default()
        .handle_access(AccessFs::from_all(ABI_WANTED))
        .map_err(|e| err(&e))?
        .create()
        .map_err(|e| err(&e))?
        .add_rules(rules)
        .map_err(|e| err(&e))?
        .restrict_self()
        .map_err(|e| err(&e))?;
    Ok(match status.ruleset {
        RulesetStatus::FullyEnforced => Confined::Fully,
        RulesetStatus::PartiallyEnforced => Confined::Partly,
        RulesetStatus::NotEnforced => Confined::Not,
    })
}

/// Debug builds only: opens the path in the environment variable
/// `VMM_TEST_LANDLOCK_PROBE` (if set) and logs what came of it, so that a test sees a
/// confined process refuse a file outside its set. Release builds do nothing.
pub fn test_probe() {
    if !cfg!(debug_assertions) {
        return;
    }
    let Some(path) = std::env::var_os("VMM_TEST_LANDLOCK_PROBE") else {
        return;
    };
    let result = std::fs::File::open(&path)
        .map(|_| "opened".to_string())
        .unwrap_or_else(|e| e.to_string());
    tracing::warn!(path = %Path::new(&path).display(), %result, "landlock probe");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_vm_needs_its_files_and_nothing_else() {
        let config: VmConfig = serde_json::from_value(serde_json::json!({
            "id": "v",
            "payload": {"kernel": "/k/vmlinux", "initramfs": "/k/initrd"},
            "serial": {"mode": "socket", "path": "/run/v/console.sock"},
            "disks": [
                {"id": "a", "path": "/img/a.raw"},
                {"id": "b", "path": "/img/b.raw", "readonly": true},
                {"id": "n", "path": "null", "null_size": 4096}
            ]
        }))
        .unwrap();
        let set = FileSet::for_vm(&config, &[Path::new("/state/v/last.json")]);
        assert!(set.read.contains(&PathBuf::from("/k/vmlinux")));
        assert!(set.read.contains(&PathBuf::from("/k/initrd")));
        assert!(set.read.contains(&PathBuf::from("/img/b.raw")));
        assert!(set.write.contains(&PathBuf::from("/img/a.raw")));
        assert!(!set.write.contains(&PathBuf::from("/img/b.raw")));
        assert!(
            !set.read
                .iter()
                .chain(&set.write)
                .any(|p| p == Path::new("null"))
        );
        assert!(
            set.dirs
                .contains(&(PathBuf::from("/run/v"), DirUse::Socket))
        );
        assert!(
            set.dirs
                .contains(&(PathBuf::from("/state/v"), DirUse::Files))
        );
    }
}
