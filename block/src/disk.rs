//! Opening a VM disk: a raw image file, a host block device, or a null backend.
//!
//! Opening probes what the guest and the engines need to know (capacity, logical and
//! physical block size, the buffer and offset alignment O_DIRECT demands) and takes an
//! advisory OFD lock so that a second writer gets a clear error instead of corrupting
//! the image.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::cache::CacheMode;
use crate::error::Error;
use crate::host_file::{self, OpenFlags};
use crate::nbd::{self, NbdClient, NbdOptions, NbdStatus};
use crate::qcow2::{ImageFormat, Qcow2Image};

/// What a disk is backed by.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackendKind {
    /// A regular file holding a raw image.
    File,
    /// A host block device.
    BlockDevice,
    /// No storage: reads return zeroes, writes are dropped (QEMU's null-co).
    Null,
    /// An export on an NBD server (the path is an NBD URI).
    Nbd,
}

/// How to open a disk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskOptions {
    /// Image file or block device.
    pub path: PathBuf,
    /// Open read-only (writes fail; a shared lock is taken).
    pub readonly: bool,
    /// Cache mode.
    pub cache: CacheMode,
    /// NBD only: how long requests wait for a lost connection to come back (zero:
    /// never reconnect).
    pub reconnect_delay: Duration,
    /// NBD only: connections to open when the server allows multi-conn (the queue count).
    pub connections: usize,
    /// The image's format (never probed).
    pub format: ImageFormat,
}

impl DiskOptions {
    /// Options for a writable disk at `path` with the default cache mode.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        DiskOptions {
            path: path.into(),
            readonly: false,
            cache: CacheMode::default(),
            reconnect_delay: Duration::from_secs(crate::nbd::client::DEFAULT_RECONNECT_DELAY),
            connections: 1,
            format: ImageFormat::Raw,
        }
    }
}

/// An open disk and its probed geometry. Shared (in an `Arc`) by the queues serving it.
#[derive(Debug)]
pub struct Disk {
    file: Option<File>,
    nbd: Option<Arc<NbdClient>>,
    path: PathBuf,
    backend: BackendKind,
    capacity: u64,
    logical_block_size: u32,
    physical_block_size: u32,
    mem_align: u32,
    offset_align: u32,
    readonly: bool,
    cache: CacheMode,
    /// A qcow2 image: the guest's view (`capacity` is its size), over the file.
    qcow2: Option<Arc<Qcow2Image>>,
}

// ioctl numbers from <linux/fs.h>.
const BLKSSZGET: libc::c_ulong = 0x1268;
const BLKPBSZGET: libc::c_ulong = 0x127b;
const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;

impl Disk {
    /// Opens the image or block device at `options.path` per its cache mode, probes it and
    /// locks it (exclusively when writable, shared when read-only).
    pub fn open(options: &DiskOptions) -> Result<Disk, Error> {
        if let Some(uri) = options.path.to_str().filter(|p| nbd::is_nbd_uri(p)) {
            if options.format != ImageFormat::Raw {
                return Err(Error::Image {
                    path: options.path.clone(),
                    msg: format!(
                        "format {} over NBD is not supported (the server serves the disk)",
                        options.format
                    ),
                });
            }
            return Disk::open_nbd(uri, options);
        }
        if options.format == ImageFormat::Qcow2 {
            return Disk::open_qcow2(options);
        }
        let path = options.path.clone();
        // Look before opening: a FIFO, socket or character device is refused without
        // being opened (opening some devices has side effects).
        if let Ok(m) = std::fs::metadata(&path) {
            let t = m.file_type();
            if !t.is_file() && !t.is_block_device() {
                let kind = host_file::kind(&t);
                return Err(Error::NotADisk { path, kind });
            }
        }
        let mut flags = if options.readonly {
            libc::O_RDONLY
        } else {
            libc::O_RDWR
        };
        if options.cache.direct() {
            flags |= libc::O_DIRECT;
        }
        let file = host_file::open(&path, OpenFlags { flags, mode: 0 }).map_err(|source| {
            if host_file::is_symlink_refusal(&source) {
                Error::SymlinkRefused { path: path.clone() }
            } else if source.raw_os_error() == Some(libc::EINVAL) && options.cache.direct() {
                Error::DirectNotSupported { path: path.clone() }
            } else {
                Error::Open {
                    path: path.clone(),
                    source,
                }
            }
        })?;
        let file_type = file
            .metadata()
            .map_err(|source| Error::Probe {
                path: path.clone(),
                source,
            })?
            .file_type();
        let backend = if file_type.is_file() {
            BackendKind::File
        } else if file_type.is_block_device() {
            BackendKind::BlockDevice
        } else {
            let kind = host_file::kind(&file_type);
            return Err(Error::NotADisk { path, kind });
        };
        lock(&file, &path, options.readonly)?;
        let geometry =
            probe(&file, backend, options.cache.direct()).map_err(|source| Error::Probe {
                path: path.clone(),
                source,
            })?;
        tracing::debug!(
            path = %path.display(), ?backend, capacity = geometry.capacity,
            logical = geometry.logical_block_size, mem_align = geometry.mem_align,
            offset_align = geometry.offset_align, cache = %options.cache, "disk opened"
        );
        Ok(Disk {
            file: Some(file),
            nbd: None,
            path,
            backend,
            capacity: geometry.capacity,
            logical_block_size: geometry.logical_block_size,
            physical_block_size: geometry.physical_block_size,
            mem_align: geometry.mem_align,
            offset_align: geometry.offset_align,
            readonly: options.readonly,
            cache: options.cache,
            qcow2: None,
        })
    }

    /// Opens the qcow2 image at `options.path`: the file as a raw disk, then the image
    /// and its backing chain over it; the disk's size is the image's.
    fn open_qcow2(options: &DiskOptions) -> Result<Disk, Error> {
        let file = Arc::new(Disk::open(&DiskOptions {
            format: ImageFormat::Raw,
            ..options.clone()
        })?);
        let image = Arc::new(Qcow2Image::open(file.clone())?);
        let dup = file
            .file
            .as_ref()
            .map(File::try_clone)
            .transpose()
            .map_err(|source| Error::Open {
                path: options.path.clone(),
                source,
            })?;
        Ok(Disk {
            file: dup,
            nbd: None,
            path: file.path.clone(),
            backend: file.backend,
            capacity: image.size(),
            logical_block_size: file.logical_block_size,
            physical_block_size: file.physical_block_size,
            mem_align: file.mem_align,
            offset_align: file.offset_align,
            readonly: file.readonly,
            cache: file.cache,
            qcow2: Some(image),
        })
    }

    /// The qcow2 image of a qcow2 disk.
    pub fn qcow2(&self) -> Option<&Arc<Qcow2Image>> {
        self.qcow2.as_ref()
    }

    /// The image's format.
    pub fn format(&self) -> ImageFormat {
        match self.qcow2 {
            Some(_) => ImageFormat::Qcow2,
            None => ImageFormat::Raw,
        }
    }

    /// Connects to the NBD export `uri` (see [`crate::nbd`]).
    fn open_nbd(uri: &str, options: &DiskOptions) -> Result<Disk, Error> {
        let client = NbdClient::open(
            uri,
            &NbdOptions {
                reconnect_delay: options.reconnect_delay,
                connections: options.connections,
                writable: !options.readonly,
            },
        )?;
        let info = *client.info();
        // The guest addresses 512-byte sectors; a server with a larger minimum block
        // gets aligned requests through the queue's bounce buffers.
        let logical = info.min_block.max(512);
        let preferred = info.preferred_block.clamp(logical, 65536);
        Ok(Disk {
            file: None,
            nbd: Some(Arc::new(client)),
            path: options.path.clone(),
            backend: BackendKind::Nbd,
            capacity: info.size,
            logical_block_size: logical,
            physical_block_size: if preferred.is_power_of_two() {
                preferred
            } else {
                logical
            },
            mem_align: 1,
            offset_align: if logical > 512 { logical } else { 1 },
            readonly: options.readonly,
            cache: options.cache,
            qcow2: None,
        })
    }

    /// The NBD client of an NBD disk.
    pub fn nbd(&self) -> Option<&Arc<NbdClient>> {
        self.nbd.as_ref()
    }

    /// The connection status of an NBD disk.
    pub fn nbd_status(&self) -> Option<NbdStatus> {
        self.nbd.as_ref().map(|c| c.status())
    }

    /// A null disk of `capacity` bytes: reads return zeroes, writes are dropped.
    pub fn null(capacity: u64) -> Disk {
        Disk {
            file: None,
            nbd: None,
            path: PathBuf::from("null"),
            backend: BackendKind::Null,
            capacity,
            logical_block_size: 512,
            physical_block_size: 512,
            mem_align: 1,
            offset_align: 1,
            readonly: false,
            cache: CacheMode::Writeback,
            qcow2: None,
        }
    }

    /// The file descriptor engines do I/O on (-1 for a null disk).
    pub fn fd(&self) -> RawFd {
        self.file.as_ref().map_or(-1, |f| f.as_raw_fd())
    }

    /// The path the disk was opened from ("null" for a null disk).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// What backs the disk.
    pub fn backend(&self) -> BackendKind {
        self.backend
    }

    /// Size in bytes.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// The smallest unit the disk can address (shown to the guest as blk_size).
    pub fn logical_block_size(&self) -> u32 {
        self.logical_block_size
    }

    /// The unit the disk writes atomically (shown to the guest in the topology).
    pub fn physical_block_size(&self) -> u32 {
        self.physical_block_size
    }

    /// Required alignment of buffer addresses (1 when no O_DIRECT).
    pub fn mem_align(&self) -> u32 {
        self.mem_align
    }

    /// Required alignment of offsets and lengths (1 when no O_DIRECT).
    pub fn offset_align(&self) -> u32 {
        self.offset_align
    }

    /// Whether the disk refuses writes.
    pub fn readonly(&self) -> bool {
        self.readonly
    }

    /// The cache mode it was opened with.
    pub fn cache(&self) -> CacheMode {
        self.cache
    }

    /// Whether buffers must respect [`Disk::mem_align`]/[`Disk::offset_align`].
    pub fn needs_alignment(&self) -> bool {
        self.mem_align > 1 || self.offset_align > 1
    }
}

impl Drop for Disk {
    fn drop(&mut self) {
        // Release the lock explicitly: an io_uring that registered this file closes its
        // reference asynchronously, and the lock would outlive the disk until then.
        if let Some(file) = &self.file {
            // SAFETY: an all-zero flock is valid; we set the fields that matter.
            let mut fl: libc::flock = unsafe { std::mem::zeroed() };
            // libc's flock constants are small (0..=2), so they fit a c_short.
            #[allow(clippy::cast_possible_truncation)]
            {
                fl.l_type = libc::F_UNLCK as libc::c_short;
                fl.l_whence = libc::SEEK_SET as libc::c_short;
            }
            // SAFETY: fcntl with F_OFD_SETLK reads only the flock we pass.
            unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &fl) };
        }
    }
}

/// What probing found.
struct Geometry {
    capacity: u64,
    logical_block_size: u32,
    physical_block_size: u32,
    mem_align: u32,
    offset_align: u32,
}

/// Takes an OFD lock over the whole file: write lock when writable, read lock otherwise.
/// The lock belongs to the open file description and goes away when the disk is closed.
fn lock(file: &File, path: &Path, readonly: bool) -> Result<(), Error> {
    let how = if readonly {
        "shared read lock"
    } else {
        "exclusive write lock"
    };
    match host_file::try_lock(file, !readonly) {
        Ok(true) => Ok(()),
        Ok(false) => Err(Error::Locked {
            path: path.to_path_buf(),
            how,
        }),
        Err(source) => Err(Error::Open {
            path: path.to_path_buf(),
            source,
        }),
    }
}

fn probe(file: &File, backend: BackendKind, direct: bool) -> io::Result<Geometry> {
    let fd = file.as_raw_fd();
    let stx = statx(fd)?;
    let dio = if stx.stx_mask & libc::STATX_DIOALIGN != 0 && stx.stx_dio_offset_align != 0 {
        Some((stx.stx_dio_mem_align, stx.stx_dio_offset_align))
    } else {
        None
    };
    match backend {
        BackendKind::BlockDevice => {
            let capacity = ioctl_u64(fd, BLKGETSIZE64)?;
            let logical = ioctl_u32(fd, BLKSSZGET)?;
            let physical = ioctl_u32(fd, BLKPBSZGET)?.max(logical);
            let (mem_align, offset_align) = match (direct, dio) {
                (false, _) => (1, 1),
                (true, Some((mem, off))) => (mem.max(1), off.max(logical)),
                (true, None) => (logical, logical),
            };
            Ok(Geometry {
                capacity,
                logical_block_size: logical,
                physical_block_size: physical,
                mem_align,
                offset_align,
            })
        }
        BackendKind::File | BackendKind::Null | BackendKind::Nbd => {
            let (mem_align, offset_align) = match (direct, dio) {
                (false, _) => (1, 1),
                (true, Some((mem, off))) => (mem.max(1), off),
                // Kernels before 6.1 cannot tell; the page size is safe on every filesystem.
                (true, None) => (4096, 4096),
            };
            let logical = offset_align.max(512);
            let preferred = stx.stx_blksize.clamp(512, 65536);
            let physical = if preferred.is_power_of_two() {
                preferred.max(logical)
            } else {
                logical
            };
            Ok(Geometry {
                capacity: stx.stx_size,
                logical_block_size: logical,
                physical_block_size: physical,
                mem_align,
                offset_align,
            })
        }
    }
}

fn statx(fd: RawFd) -> io::Result<libc::statx> {
    // SAFETY: all-zero is a valid statx value; the kernel fills it in.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: statx with AT_EMPTY_PATH on a valid fd writes only into `stx`.
    let rc = unsafe {
        libc::statx(
            fd,
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_BASIC_STATS | libc::STATX_DIOALIGN,
            &mut stx,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(stx)
}

fn ioctl_u64(fd: RawFd, request: libc::c_ulong) -> io::Result<u64> {
    let mut value: u64 = 0;
    // SAFETY: the block-device ioctls used here write one u64 into `value`.
    let rc = unsafe { libc::ioctl(fd, request as _, &mut value) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(value)
}

fn ioctl_u32(fd: RawFd, request: libc::c_ulong) -> io::Result<u32> {
    let mut value: libc::c_int = 0;
    // SAFETY: BLKSSZGET and BLKPBSZGET write one int into `value`.
    let rc = unsafe { libc::ioctl(fd, request as _, &mut value) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    u32::try_from(value).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(len: u64) -> tempfile::NamedTempFile {
        let f = tempfile::NamedTempFile::new_in(env_tmp()).unwrap();
        f.as_file().set_len(len).unwrap();
        f
    }

    fn env_tmp() -> PathBuf {
        std::env::var_os("BLOCK_TEST_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(std::env::temp_dir)
    }

    #[test]
    fn probes_a_file_buffered_and_direct() {
        let img = image(1 << 20);
        let mut opts = DiskOptions::new(img.path());
        opts.cache = CacheMode::Writeback;
        let disk = Disk::open(&opts).unwrap();
        assert_eq!(disk.capacity(), 1 << 20);
        assert_eq!(disk.backend(), BackendKind::File);
        assert_eq!((disk.mem_align(), disk.offset_align()), (1, 1));
        assert!(disk.logical_block_size() >= 512);
        assert!(disk.physical_block_size() >= disk.logical_block_size());
        drop(disk);

        opts.cache = CacheMode::None;
        let disk = Disk::open(&opts).unwrap();
        assert!(disk.offset_align() >= 512, "O_DIRECT needs block alignment");
        assert!(disk.offset_align().is_power_of_two() && disk.mem_align().is_power_of_two());
        assert_eq!(disk.logical_block_size(), disk.offset_align().max(512));
        // SAFETY: F_GETFL only reads the descriptor's flags.
        let flags = unsafe { libc::fcntl(disk.fd(), libc::F_GETFL) };
        assert_ne!(flags & libc::O_DIRECT, 0, "cache=none opens with O_DIRECT");
    }

    #[test]
    fn second_writer_is_refused_readers_share() {
        let img = image(4096);
        let opts = DiskOptions::new(img.path());
        let first = Disk::open(&opts).unwrap();
        let err = Disk::open(&opts).unwrap_err();
        assert!(matches!(err, Error::Locked { .. }), "{err}");
        assert!(err.to_string().contains("locked"), "{err}");
        let ro = DiskOptions {
            readonly: true,
            ..opts.clone()
        };
        assert!(matches!(Disk::open(&ro), Err(Error::Locked { .. })));
        drop(first);
        let r1 = Disk::open(&ro).unwrap();
        let r2 = Disk::open(&ro).unwrap();
        assert!(r1.readonly() && r2.readonly());
        assert!(matches!(Disk::open(&opts), Err(Error::Locked { .. })));
    }

    #[test]
    fn clear_errors_for_missing_and_non_disk_paths() {
        let err = Disk::open(&DiskOptions::new("/nonexistent/disk.raw")).unwrap_err();
        assert!(matches!(err, Error::Open { .. }));
        assert!(err.to_string().contains("/nonexistent/disk.raw"), "{err}");
        let dir = tempfile::tempdir().unwrap();
        let err = Disk::open(&DiskOptions {
            readonly: true,
            cache: CacheMode::Writeback,
            ..DiskOptions::new(dir.path())
        })
        .unwrap_err();
        assert!(matches!(err, Error::NotADisk { .. }), "{err}");
    }

    #[test]
    fn devices_and_fifos_are_not_disks_whatever_the_cache_mode() {
        // /dev/zero refuses O_DIRECT; the message must be about what it is, not about
        // O_DIRECT support of a filesystem.
        for cache in [CacheMode::None, CacheMode::Writeback] {
            let err = Disk::open(&DiskOptions {
                cache,
                ..DiskOptions::new("/dev/zero")
            })
            .unwrap_err();
            assert!(matches!(err, Error::NotADisk { .. }), "{err}");
            assert!(err.to_string().contains("a character device"), "{err}");
        }
        // A FIFO is refused at once instead of blocking the caller in open().
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: mkfifo reads the NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        for readonly in [true, false] {
            let err = Disk::open(&DiskOptions {
                readonly,
                cache: CacheMode::Writeback,
                ..DiskOptions::new(&fifo)
            })
            .unwrap_err();
            assert!(err.to_string().contains("a FIFO"), "{err}");
        }
    }

    #[test]
    fn null_disk_has_no_fd() {
        let disk = Disk::null(1 << 30);
        assert_eq!(disk.backend(), BackendKind::Null);
        assert_eq!(disk.capacity(), 1 << 30);
        assert_eq!(disk.fd(), -1);
    }
}
