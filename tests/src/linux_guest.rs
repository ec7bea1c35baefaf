//! A real Linux guest for end-to-end tests of vhost-user-blk backends.
//!
//! The harness boots the Debian cloud kernel under QEMU/TCG with a busybox initramfs built
//! here from the host's Debian packages (busybox-static, fio and its libraries, the virtio
//! modules of that kernel), attaches a `vhost-user-blk-pci` disk served by any backend that
//! listens on a Unix socket, runs a shell script in the guest and returns its console output
//! and exit status.
//!
//! ```text
//! let tools = Tools::find()?;                       // or Err(Skip) when a package is missing
//! let initramfs = Initramfs::build(&tools, cache)?; // cached per kernel version
//! let backend = BackendProcess::spawn(cmd, sock)?;  // anything implementing VhostUserBackend
//! let run = fio::run_verify(&tools, &initramfs, &backend, &FioVerifyJob::default())?;
//! ```

pub mod backend;
pub mod cpio;
pub mod fio;
pub mod initramfs;
pub mod qemu;

use std::fmt;
use std::path::{Path, PathBuf};
use std::process::Command;

pub use backend::{
    BackendProcess, VhostUserBackend, find_qemu_storage_daemon, qemu_storage_daemon,
};
pub use fio::{FioVerify, FioVerifyJob};
pub use initramfs::Initramfs;
pub use qemu::{BootOptions, BootResult, GuestDisk, boot};

/// Why a guest test cannot run here: a tool or package is missing. Displays as
/// `SKIP: <what> missing (apt-get install <package>)`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Skip(pub String);

impl fmt::Display for Skip {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SKIP: {}", self.0)
    }
}

impl Skip {
    fn missing(what: &str, package: &str) -> Self {
        Skip(format!("{what} missing (apt-get install {package})"))
    }

    /// Prints test `test`'s `SKIP` line with this reason ([`crate::skip::skip`]).
    pub fn print(&self, test: &str) {
        crate::skip::skip(test, &self.0);
    }
}

/// The host programs and files a guest run needs.
#[derive(Clone, Debug)]
pub struct Tools {
    /// `qemu-system-x86_64`.
    pub qemu: PathBuf,
    /// The kernel image, `/boot/vmlinuz-<version>`.
    pub kernel: PathBuf,
    /// The kernel release, e.g. `6.1.0-56-cloud-amd64`.
    pub kernel_version: String,
    /// `/lib/modules/<version>`.
    pub modules_dir: PathBuf,
    /// A statically linked busybox.
    pub busybox: PathBuf,
    /// The fio binary copied into the guest.
    pub fio: PathBuf,
}

impl Tools {
    /// Looks for every tool; the first one missing becomes a [`Skip`] naming its package.
    ///
    /// `LINUX_GUEST_KERNEL` may name a kernel image to use instead of the newest
    /// `/boot/vmlinuz-*-cloud-amd64`; its modules must be in `/lib/modules/<version>`.
    pub fn find() -> Result<Tools, Skip> {
        let qemu = find_program("qemu-system-x86_64")
            .ok_or_else(|| Skip::missing("qemu-system-x86_64", "qemu-system-x86"))?;
        let (kernel, kernel_version) = find_kernel()
            .ok_or_else(|| Skip::missing("Debian cloud kernel", "linux-image-cloud-amd64"))?;
        let modules_dir = Path::new("/lib/modules").join(&kernel_version);
        if !modules_dir.join("modules.dep").is_file() {
            return Err(Skip::missing(
                &format!("{}/modules.dep", modules_dir.display()),
                "linux-image-cloud-amd64",
            ));
        }
        let busybox = ["/bin/busybox", "/usr/bin/busybox"]
            .into_iter()
            .map(PathBuf::from)
            .find(|p| is_static_busybox(p))
            .ok_or_else(|| Skip::missing("static busybox", "busybox-static"))?;
        let fio = find_program("fio").ok_or_else(|| Skip::missing("fio", "fio"))?;
        Ok(Tools {
            qemu,
            kernel,
            kernel_version,
            modules_dir,
            busybox,
            fio,
        })
    }
}

/// The tools and the initramfs (built once into `cache_dir`, then cached), or `None`
/// after printing why `test` skips.
pub fn tools_and_initramfs(test: &str, cache_dir: &Path) -> Option<(Tools, Initramfs)> {
    let tools = match Tools::find() {
        Ok(t) => t,
        Err(skip) => {
            skip.print(test);
            return None;
        }
    };
    let initramfs =
        Initramfs::build(&tools, cache_dir).unwrap_or_else(|e| panic!("initramfs: {e}"));
    Some((tools, initramfs))
}

/// `name` on `$PATH`, if executable.
pub fn find_program(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| is_executable(p))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    p.metadata()
        .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// A busybox that runs without shared libraries: a 64-bit ELF with no `PT_INTERP` header.
fn is_static_busybox(p: &Path) -> bool {
    is_executable(p) && std::fs::read(p).is_ok_and(|data| elf_is_static(&data))
}

/// Whether `data` is a 64-bit little-endian ELF without a program interpreter.
fn elf_is_static(data: &[u8]) -> bool {
    const PT_INTERP: u32 = 3;
    let u16_at = |o: usize| data.get(o..o + 2).map(|b| u16::from_le_bytes([b[0], b[1]]));
    let u32_at = |o: usize| {
        data.get(o..o + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    };
    let u64_at = |o: usize| {
        data.get(o..o + 8)
            .and_then(|b| b.try_into().ok())
            .map(u64::from_le_bytes)
    };
    if !data.starts_with(b"\x7fELF\x02\x01") {
        return false;
    }
    let (Some(phoff), Some(phentsize), Some(phnum)) = (u64_at(0x20), u16_at(0x36), u16_at(0x38))
    else {
        return false;
    };
    (0..usize::from(phnum)).all(|i| {
        let off = usize::try_from(phoff).unwrap_or(usize::MAX);
        let at = off.saturating_add(i.saturating_mul(usize::from(phentsize)));
        u32_at(at).is_some_and(|t| t != PT_INTERP)
    })
}

/// The newest `/boot/vmlinuz-*-cloud-amd64`, or `$LINUX_GUEST_KERNEL`.
fn find_kernel() -> Option<(PathBuf, String)> {
    if let Some(k) = std::env::var_os("LINUX_GUEST_KERNEL") {
        let k = PathBuf::from(k);
        let version = k
            .file_name()?
            .to_str()?
            .strip_prefix("vmlinuz-")?
            .to_string();
        return k.is_file().then_some((k, version));
    }
    let mut found: Vec<(PathBuf, String)> = std::fs::read_dir("/boot")
        .ok()?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let version = name.strip_prefix("vmlinuz-")?;
            version
                .ends_with("-cloud-amd64")
                .then(|| (e.path(), version.to_string()))
        })
        .collect();
    found.sort_by_key(|a| version_key(&a.1));
    found.pop()
}

/// Orders "6.1.0-56" after "6.1.0-9": numbers compare as numbers.
fn version_key(v: &str) -> Vec<u64> {
    v.split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty())
        .map(|s| s.parse().unwrap_or(0))
        .collect()
}

/// Runs `cmd` and returns its stdout, or an error with its stderr.
pub(crate) fn output_of(cmd: &mut Command) -> Result<String, String> {
    let out = cmd
        .output()
        .map_err(|e| format!("cannot run {cmd:?}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_sort_numerically() {
        assert!(version_key("6.1.0-56-cloud-amd64") > version_key("6.1.0-9-cloud-amd64"));
        assert!(version_key("6.10.0-1-cloud-amd64") > version_key("6.9.0-30-cloud-amd64"));
    }

    #[test]
    fn static_elf_detection() {
        if let Ok(data) = std::fs::read("/bin/busybox") {
            assert!(elf_is_static(&data));
        }
        let dynamic = std::fs::read("/bin/sh").expect("read /bin/sh");
        assert!(!elf_is_static(&dynamic));
        assert!(!elf_is_static(b"#!/bin/sh"));
    }
}
