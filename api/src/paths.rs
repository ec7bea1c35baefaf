//! Which host paths a client may name (`vmmd --allowed-dir`), and the paths that are the
//! service's own (its API sockets), which no VM may take.
//!
//! With allowed directories, every path in a VM config or disk (images, kernel,
//! initramfs, serial output) must resolve, symlinks followed, to a place inside one of
//! them; the config then carries the resolved path, and the process opens paths without
//! following any symlink ([`block::host_file::forbid_symlinks`]), so a link planted after
//! the check cannot lead elsewhere. A path with a `..` component is refused outright.

use std::path::{Component, Path, PathBuf};

use devices::config::DiskConfig;
use vmm::config::{SerialMode, VmConfig};

use crate::backend::ApiError;

/// The service's rules on client paths.
#[derive(Clone, Debug, Default)]
pub struct PathRules {
    /// Resolved allowed directories (empty: any path).
    allowed: Vec<PathBuf>,
    /// The service's own sockets.
    own: Vec<PathBuf>,
}

impl PathRules {
    /// Rules allowing paths under `allowed` (resolved now; each must be a directory), or
    /// anywhere when it is empty, and protecting the service's own `sockets`.
    pub fn new(allowed: &[PathBuf], sockets: &[PathBuf]) -> Result<Self, String> {
        let mut dirs = Vec::new();
        for d in allowed {
            let r = std::fs::canonicalize(d)
                .map_err(|e| format!("--allowed-dir {}: {e}", d.display()))?;
            if !r.is_dir() {
                return Err(format!("--allowed-dir {}: not a directory", d.display()));
            }
            dirs.push(r);
        }
        Ok(PathRules {
            allowed: dirs,
            own: sockets
                .iter()
                .map(|p| resolve_new(p).unwrap_or_else(|_| p.clone()))
                .collect(),
        })
    }

    /// Whether paths are restricted.
    pub fn restricted(&self) -> bool {
        !self.allowed.is_empty()
    }

    /// The allowed directories, resolved.
    pub fn allowed(&self) -> &[PathBuf] {
        &self.allowed
    }

    /// Checks every path of `config` and, when restricted, replaces each by its resolved
    /// form. 403 names the path and the rule; 409 a serial output on a service socket.
    pub fn check_vm(&self, config: &mut VmConfig) -> Result<(), ApiError> {
        self.check("payload.kernel", &mut config.payload.kernel)?;
        if let Some(p) = config.payload.initramfs.as_mut() {
            self.check("payload.initramfs", p)?;
        }
        if let (SerialMode::File | SerialMode::Socket, Some(p)) =
            (config.serial.mode, config.serial.path.as_mut())
        {
            self.check_own("serial.path", p)?;
            self.check("serial.path", p)?;
        }
        for (i, d) in config.disks.iter_mut().enumerate() {
            self.check_disk_at(&format!("disks[{i}].path"), d)?;
        }
        Ok(())
    }

    /// A mirror target follows the rules of a disk's image (an NBD target's Unix socket
    /// too).
    pub fn check_mirror_target(
        &self,
        target: &mut devices::mirror::MirrorTarget,
    ) -> Result<(), ApiError> {
        let mut as_disk = DiskConfig::new("target", target.path.clone());
        self.check_disk_at("target.path", &mut as_disk)?;
        target.path = as_disk.path;
        Ok(())
    }

    /// [`Self::check_vm`] for one disk.
    pub fn check_disk(&self, disk: &mut DiskConfig) -> Result<(), ApiError> {
        self.check_disk_at("path", disk)
    }

    fn check_disk_at(&self, field: &str, disk: &mut DiskConfig) -> Result<(), ApiError> {
        if disk.is_null() {
            return Ok(());
        }
        if disk.is_nbd() {
            return self.check_nbd(field, disk);
        }
        self.check_own(field, &disk.path)?;
        self.check(field, &mut disk.path)?;
        // A qcow2 image names its backing files itself: they follow the rules too, or
        // an image inside an allowed directory could read any file through its chain.
        // (A chain that cannot be read fails the disk's open, with its reason.)
        if self.restricted() && disk.format == block::ImageFormat::Qcow2 {
            let field = format!("{field} (backing file)");
            for mut backing in block::qcow2::header::backing_files(&disk.path).unwrap_or_default() {
                self.check(&field, &mut backing)?;
            }
        }
        Ok(())
    }

    /// An NBD disk: a TCP server is not a host path; a Unix socket is, and follows the
    /// rules of every path (the URI then names the resolved socket).
    fn check_nbd(&self, field: &str, disk: &mut DiskConfig) -> Result<(), ApiError> {
        let text = disk.path.to_string_lossy().into_owned();
        let uri: block::nbd::NbdUri = text
            .parse()
            .map_err(|e: String| ApiError::bad_request("invalid disk").with_details(vec![e]))?;
        let block::nbd::NbdAddress::Unix(socket) = &uri.address else {
            return Ok(());
        };
        let mut socket = socket.clone();
        let field = format!("{field} (socket)");
        self.check_own(&field, &socket)?;
        self.check(&field, &mut socket)?;
        if self.restricted() {
            disk.path = PathBuf::from(uri.with_socket(socket).to_string());
        }
        Ok(())
    }

    /// 409 when `path` is one of the service's own sockets.
    fn check_own(&self, field: &str, path: &Path) -> Result<(), ApiError> {
        let resolved = resolve_new(path).unwrap_or_else(|_| path.to_path_buf());
        if self.own.contains(&resolved) {
            return Err(ApiError::conflict(format!(
                "{field} {} is this service's API socket",
                path.display()
            )));
        }
        Ok(())
    }

    fn check(&self, field: &str, path: &mut PathBuf) -> Result<(), ApiError> {
        if !self.restricted() {
            return Ok(());
        }
        let rule = || {
            format!(
                "paths must lie in {} (vmmd --allowed-dir)",
                self.allowed
                    .iter()
                    .map(|d| d.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        };
        if path.components().any(|c| c == Component::ParentDir) {
            return Err(ApiError::forbidden(format!(
                "{field} {}: a path with '..' is not accepted; {}",
                path.display(),
                rule()
            )));
        }
        let resolved = resolve_new(path).map_err(|e| {
            ApiError::forbidden(format!(
                "{field} {}: cannot be resolved ({e}); {}",
                path.display(),
                rule()
            ))
        })?;
        if !self.allowed.iter().any(|d| resolved.starts_with(d)) {
            let how = if resolved == *path {
                String::new()
            } else {
                format!(" (resolves to {})", resolved.display())
            };
            return Err(ApiError::forbidden(format!(
                "{field} {}{how} is outside the allowed directories; {}",
                path.display(),
                rule()
            )));
        }
        *path = resolved;
        Ok(())
    }
}

/// `path` resolved: the file itself when it exists, else its resolved parent joined with
/// its name (a serial output or socket not created yet).
fn resolve_new(path: &Path) -> std::io::Result<PathBuf> {
    match std::fs::canonicalize(path) {
        Ok(p) => Ok(p),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let (Some(parent), Some(name)) = (path.parent(), path.file_name()) else {
                return Err(e);
            };
            // A dangling symlink as the last component would be created elsewhere.
            if std::fs::symlink_metadata(path).is_ok() {
                return Err(std::io::Error::other("a dangling symbolic link"));
            }
            let parent = if parent.as_os_str().is_empty() {
                Path::new(".")
            } else {
                parent
            };
            Ok(std::fs::canonicalize(parent)?.join(name))
        }
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vm(dir: &Path, kernel: &Path, disk: &Path) -> VmConfig {
        serde_json::from_value(serde_json::json!({
            "id": "a",
            "payload": {"kernel": kernel},
            "serial": {"mode": "file", "path": dir.join("console.log")},
            "disks": [{"id": "d0", "path": disk}, {"id": "n", "path": "null", "null_size": 512}]
        }))
        .unwrap()
    }

    #[test]
    fn paths_must_resolve_inside_the_allowed_dirs() {
        let root = tempfile::tempdir().unwrap();
        let allowed = root.path().join("vms");
        let outside = root.path().join("secret");
        std::fs::create_dir_all(&allowed).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        let kernel = allowed.join("kernel");
        let img = allowed.join("a.raw");
        let secret = outside.join("shadow");
        for f in [&kernel, &img, &secret] {
            std::fs::write(f, b"x").unwrap();
        }
        let inner_link = allowed.join("link.raw");
        std::os::unix::fs::symlink(&img, &inner_link).unwrap();
        let escape = allowed.join("escape.raw");
        std::os::unix::fs::symlink(&secret, &escape).unwrap();
        let rules = PathRules::new(std::slice::from_ref(&allowed), &[]).unwrap();
        let real_allowed = std::fs::canonicalize(&allowed).unwrap();

        // Inside: accepted, and the link replaced by the file it names.
        let mut c = vm(&allowed, &kernel, &inner_link);
        rules.check_vm(&mut c).unwrap();
        assert_eq!(c.disks[0].path, real_allowed.join("a.raw"));
        assert_eq!(c.serial.path.unwrap(), real_allowed.join("console.log"));

        for (bad, needle) in [
            (secret.clone(), "is outside the allowed directories"),
            (escape.clone(), "resolves to"),
            (allowed.join("../secret/shadow"), "'..'"),
        ] {
            let mut c = vm(&allowed, &kernel, &bad);
            let err = rules.check_vm(&mut c).unwrap_err();
            assert_eq!(err.kind.status(), 403, "{err:?}");
            assert!(err.message.contains(needle), "{}", err.message);
            assert!(err.message.contains("disks[0].path"), "{}", err.message);
            assert!(err.message.contains("--allowed-dir"), "{}", err.message);
            let mut d = DiskConfig::new("d1", &bad);
            assert_eq!(rules.check_disk(&mut d).unwrap_err().kind.status(), 403);
        }
        // A qcow2 image inside whose backing file lies outside.
        let overlay = allowed.join("overlay.qcow2");
        std::fs::File::create(&overlay).unwrap();
        block::qcow2::create(&overlay, 512, Some((&secret, block::ImageFormat::Raw))).unwrap();
        let mut d = DiskConfig::new("q", &overlay);
        d.format = block::ImageFormat::Qcow2;
        let err = rules.check_disk(&mut d).unwrap_err();
        assert_eq!(err.kind.status(), 403, "{err:?}");
        assert!(err.message.contains("backing file"), "{}", err.message);
        let inside = allowed.join("inside.qcow2");
        std::fs::File::create(&inside).unwrap();
        block::qcow2::create(&inside, 512, Some((&img, block::ImageFormat::Raw))).unwrap();
        let mut d = DiskConfig::new("q", &inside);
        d.format = block::ImageFormat::Qcow2;
        rules.check_disk(&mut d).unwrap();
        // Kernel and serial output too.
        let mut c = vm(&outside, &kernel, &img);
        assert!(
            rules
                .check_vm(&mut c)
                .unwrap_err()
                .message
                .contains("serial.path")
        );
        let mut c = vm(&allowed, &secret, &img);
        assert!(
            rules
                .check_vm(&mut c)
                .unwrap_err()
                .message
                .contains("payload.kernel")
        );
        // A dangling link cannot be a new serial file.
        let dangling = allowed.join("dangling.log");
        std::os::unix::fs::symlink(outside.join("new.log"), &dangling).unwrap();
        let mut c = vm(&allowed, &kernel, &img);
        c.serial.path = Some(dangling);
        assert_eq!(rules.check_vm(&mut c).unwrap_err().kind.status(), 403);
    }

    #[test]
    fn nbd_unix_sockets_follow_the_path_rules_and_tcp_servers_pass() {
        let root = tempfile::tempdir().unwrap();
        let allowed = root.path().join("vms");
        std::fs::create_dir_all(&allowed).unwrap();
        let api = allowed.join("vmmd.sock");
        let rules =
            PathRules::new(std::slice::from_ref(&allowed), std::slice::from_ref(&api)).unwrap();
        let real = std::fs::canonicalize(&allowed).unwrap();
        std::os::unix::fs::symlink(&allowed, root.path().join("via")).unwrap();
        let uri = |p: &Path| format!("nbd+unix:///e%20x?socket={}", p.display());
        // Inside (through a link): accepted, the URI names the resolved socket.
        let mut d = DiskConfig::new("d", uri(&root.path().join("via/nbd.sock")));
        rules.check_disk(&mut d).unwrap();
        assert_eq!(d.path, PathBuf::from(uri(&real.join("nbd.sock"))));
        // Outside: 403 naming the socket; the service's own socket: 409.
        let mut d = DiskConfig::new("d", uri(&root.path().join("nbd.sock")));
        let e = rules.check_disk(&mut d).unwrap_err();
        assert_eq!(e.kind.status(), 403, "{e:?}");
        assert!(e.message.contains("path (socket)"), "{}", e.message);
        let mut d = DiskConfig::new("d", uri(&api));
        assert_eq!(rules.check_disk(&mut d).unwrap_err().kind.status(), 409);
        // TCP: no host path to check; a malformed URI: 400.
        let mut d = DiskConfig::new("d", "nbd://10.0.0.5/disk");
        rules.check_disk(&mut d).unwrap();
        assert_eq!(d.path, PathBuf::from("nbd://10.0.0.5/disk"));
        let mut d = DiskConfig::new("d", "nbd+unix:///x");
        assert_eq!(rules.check_disk(&mut d).unwrap_err().kind.status(), 400);
    }

    #[test]
    fn unrestricted_rules_change_nothing_but_protect_the_api_socket() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("vmmd.sock");
        let rules = PathRules::new(&[], std::slice::from_ref(&sock)).unwrap();
        let link = dir.path().join("k");
        std::os::unix::fs::symlink("/bin/sh", &link).unwrap();
        let mut c = vm(dir.path(), &link, Path::new("/etc/hostname"));
        rules.check_vm(&mut c).unwrap();
        assert_eq!(c.payload.kernel, link, "paths are kept as given");
        c.serial =
            serde_json::from_value(serde_json::json!({"mode": "socket", "path": sock})).unwrap();
        let err = rules.check_vm(&mut c).unwrap_err();
        assert_eq!(err.kind.status(), 409);
        assert!(err.message.contains("API socket"), "{}", err.message);
        assert!(PathRules::new(&[dir.path().join("missing")], &[]).is_err());
    }
}
