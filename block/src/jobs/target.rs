//! A mirror job's local target image: created with the disk's size when it does not
//! exist (raw, or qcow2 with a backing file for `sync: top`; mode 0600, never over an
//! existing file), else checked to be a regular file or block device of at least that
//! size in its format, not in use by a writer, and not the disk's own image (through a
//! symlink or a hard link either).

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::cache::CacheMode;
use crate::disk::{Disk, DiskOptions};
use crate::host_file::{self, OpenFlags};
use crate::qcow2::ImageFormat;

/// Why a path cannot be a mirror target.
#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    /// The target is the disk's own image.
    #[error("target {path} is the disk's own image")]
    SameAsSource {
        /// The target path.
        path: PathBuf,
    },
    /// An existing target is smaller than the disk.
    #[error("target {path} has {have} bytes, less than the disk's {need}")]
    TooSmall {
        /// The target path.
        path: PathBuf,
        /// Its size.
        have: u64,
        /// The disk's size.
        need: u64,
    },
    /// The target cannot be created.
    #[error("cannot create target {path}: {source}")]
    Create {
        /// The target path.
        path: PathBuf,
        /// What the kernel said.
        #[source]
        source: std::io::Error,
    },
    /// An existing target cannot be opened as a disk (not a file or block device,
    /// locked by a writer, unreadable).
    #[error("target: {0}")]
    Open(#[from] crate::Error),
}

/// What [`prepare_local_target`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Prepared {
    /// It created the file, `size` bytes, sparse.
    Created,
    /// An existing file or block device of at least `size` bytes is used.
    Existing,
}

/// Makes `path` ready to take a mirror of a `size`-byte disk whose image is `source`
/// (`None`: a disk with no local image, e.g. on an NBD server), in `format`; a qcow2
/// target it creates names `backing` (path and format) as its backing file.
pub fn prepare_local_target(
    path: &Path,
    source: Option<&Path>,
    size: u64,
    format: ImageFormat,
    backing: Option<(&Path, ImageFormat)>,
) -> Result<Prepared, TargetError> {
    match std::fs::metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let file = host_file::open(
                path,
                OpenFlags {
                    flags: libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL,
                    mode: 0o600,
                },
            )
            .map_err(|source| TargetError::Create {
                path: path.to_path_buf(),
                source,
            })?;
            let made = match format {
                ImageFormat::Raw => file.set_len(size).map_err(|source| TargetError::Create {
                    path: path.to_path_buf(),
                    source,
                }),
                ImageFormat::Qcow2 => {
                    drop(file);
                    crate::qcow2::create(path, size, backing).map_err(TargetError::Open)
                }
            };
            if let Err(e) = made {
                let _ = std::fs::remove_file(path);
                return Err(e);
            }
            Ok(Prepared::Created)
        }
        Err(_) | Ok(_) => {
            if let (Some(src), Ok(t)) = (source, std::fs::metadata(path))
                && let Ok(s) = std::fs::metadata(src)
                && (s.dev(), s.ino()) == (t.dev(), t.ino())
            {
                return Err(TargetError::SameAsSource {
                    path: path.to_path_buf(),
                });
            }
            // Opening it as a disk checks what it is, its size, and that no writer has
            // it (the shared lock is dropped again at once).
            let disk = Disk::open(&DiskOptions {
                readonly: true,
                cache: CacheMode::Writeback,
                format,
                ..DiskOptions::new(path)
            })?;
            if disk.capacity() < size {
                return Err(TargetError::TooSmall {
                    path: path.to_path_buf(),
                    have: disk.capacity(),
                    need: size,
                });
            }
            Ok(Prepared::Existing)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_missing_target_is_created_with_the_disk_size() {
        let dir = tempfile::tempdir().unwrap();
        let t = dir.path().join("copy.raw");
        assert_eq!(
            prepare_local_target(&t, None, 3 << 20, ImageFormat::Raw, None).unwrap(),
            Prepared::Created
        );
        let m = std::fs::metadata(&t).unwrap();
        assert_eq!(m.len(), 3 << 20);
        assert_eq!(m.permissions().mode() & 0o777, 0o600);
        // Now it exists: used as it is.
        assert_eq!(
            prepare_local_target(&t, None, 3 << 20, ImageFormat::Raw, None).unwrap(),
            Prepared::Existing
        );
        // A missing directory is a clear error.
        let e = prepare_local_target(
            &dir.path().join("no/such.raw"),
            None,
            4096,
            ImageFormat::Raw,
            None,
        )
        .unwrap_err();
        assert!(e.to_string().contains("cannot create target"), "{e}");
    }

    #[test]
    fn the_source_small_targets_and_non_disks_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("disk.raw");
        std::fs::File::create(&src)
            .unwrap()
            .set_len(1 << 20)
            .unwrap();
        let link = dir.path().join("link.raw");
        std::fs::hard_link(&src, &link).unwrap();
        let sym = dir.path().join("sym.raw");
        std::os::unix::fs::symlink(&src, &sym).unwrap();
        for same in [&src, &link, &sym] {
            let e = prepare_local_target(same, Some(&src), 1 << 20, ImageFormat::Raw, None)
                .unwrap_err();
            assert!(matches!(e, TargetError::SameAsSource { .. }), "{e}");
        }
        let small = dir.path().join("small.raw");
        std::fs::File::create(&small)
            .unwrap()
            .set_len(4096)
            .unwrap();
        let e =
            prepare_local_target(&small, Some(&src), 1 << 20, ImageFormat::Raw, None).unwrap_err();
        assert!(
            e.to_string().contains("less than the disk's 1048576"),
            "{e}"
        );
        let big = dir.path().join("big.raw");
        std::fs::File::create(&big)
            .unwrap()
            .set_len(2 << 20)
            .unwrap();
        assert_eq!(
            prepare_local_target(&big, Some(&src), 1 << 20, ImageFormat::Raw, None).unwrap(),
            Prepared::Existing
        );
        let e = prepare_local_target(dir.path(), Some(&src), 1 << 20, ImageFormat::Raw, None)
            .unwrap_err();
        assert!(e.to_string().contains("a directory"), "{e}");
        // A target a writer holds is refused.
        let held = Disk::open(&DiskOptions::new(&big)).unwrap();
        let e =
            prepare_local_target(&big, Some(&src), 1 << 20, ImageFormat::Raw, None).unwrap_err();
        assert!(e.to_string().contains("locked"), "{e}");
        drop(held);
    }

    #[test]
    fn a_missing_qcow2_target_is_created_with_the_size_and_backing_file() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base.raw");
        std::fs::write(&base, vec![7u8; 1 << 20]).unwrap();
        let t = dir.path().join("copy.qcow2");
        let made = prepare_local_target(
            &t,
            None,
            1 << 20,
            ImageFormat::Qcow2,
            Some((&base, ImageFormat::Raw)),
        );
        assert_eq!(made.unwrap(), Prepared::Created);
        let disk = Disk::open(&DiskOptions {
            format: ImageFormat::Qcow2,
            ..DiskOptions::new(&t)
        })
        .unwrap();
        assert_eq!(disk.capacity(), 1 << 20);
        let image = disk.qcow2().unwrap();
        assert_eq!(image.backing(), Some((base.as_path(), ImageFormat::Raw)));
        // Nothing of its own yet: everything reads from the backing file.
        assert_eq!(image.top_ranges().unwrap(), []);
        drop(disk);
        // Existing now: used as it is, in its format; as raw it is too small to count.
        assert_eq!(
            prepare_local_target(&t, None, 1 << 20, ImageFormat::Qcow2, None).unwrap(),
            Prepared::Existing
        );
        let e = prepare_local_target(&t, None, 1 << 20, ImageFormat::Raw, None).unwrap_err();
        assert!(matches!(e, TargetError::TooSmall { .. }), "{e}");
    }
}
