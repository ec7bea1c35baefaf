//! The error type of the block crate's public API.

use std::io;
use std::path::PathBuf;

use crate::cache::CacheMode;

/// Errors raised while opening disks and setting up or driving I/O engines.
///
/// Errors of individual requests are not here: they come back as a completion's errno.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The image or device could not be opened.
    #[error("cannot open disk {path}: {source}")]
    Open {
        /// Path given for the disk.
        path: PathBuf,
        /// What the kernel said.
        #[source]
        source: io::Error,
    },
    /// The filesystem holding the image refuses O_DIRECT.
    #[error(
        "disk {path}: its filesystem does not support O_DIRECT; use cache=writeback or cache=writethrough"
    )]
    DirectNotSupported {
        /// Path given for the disk.
        path: PathBuf,
    },
    /// The path has a symbolic link, and this process forbids following them
    /// ([`crate::host_file::forbid_symlinks`]).
    #[error(
        "disk {path}: the path has a symbolic link, which this service does not follow (vmmd --allowed-dir); name the file itself"
    )]
    SymlinkRefused {
        /// Path given for the disk.
        path: PathBuf,
    },
    /// The path is neither a regular file nor a block device.
    #[error("disk {path} is {kind}, not a regular file or a block device")]
    NotADisk {
        /// Path given for the disk.
        path: PathBuf,
        /// What it is ("a character device", "a directory", ...).
        kind: &'static str,
    },
    /// Another process (or another disk of ours) holds a conflicting lock on the image.
    #[error(
        "disk {path} is locked by another user ({how}); a writable image can be open only once"
    )]
    Locked {
        /// Path given for the disk.
        path: PathBuf,
        /// Which lock we wanted.
        how: &'static str,
    },
    /// Size or alignment could not be probed.
    #[error("cannot probe disk {path}: {source}")]
    Probe {
        /// Path given for the disk.
        path: PathBuf,
        /// What the kernel said.
        #[source]
        source: io::Error,
    },
    /// `aio=native` (Linux AIO) only works asynchronously with O_DIRECT.
    #[error(
        "aio=native needs O_DIRECT: use cache=none or cache=directsync (cache={cache} was given)"
    )]
    NativeNeedsDirect {
        /// The cache mode that was asked for.
        cache: CacheMode,
    },
    /// An engine option is out of range.
    #[error("invalid engine option: {0}")]
    InvalidOption(String),
    /// The kernel refused to create the engine's resources (ring, AIO context, eventfd).
    #[error("cannot set up the {engine} engine: {source}")]
    EngineSetup {
        /// Engine name.
        engine: &'static str,
        /// What the kernel said.
        #[source]
        source: io::Error,
    },
    /// An NBD disk could not be opened: a malformed URI, an unreachable server, a refused
    /// or unusable export.
    #[error(transparent)]
    Nbd(#[from] crate::nbd::NbdOpenError),
    /// An image file that its format cannot use: a broken or unsupported qcow2 header,
    /// a backing chain that cannot be opened.
    #[error("image {path}: {msg}")]
    Image {
        /// Path of the image.
        path: PathBuf,
        /// What is wrong, and what to do about it where something can be done.
        msg: String,
    },
    /// Submitting to the kernel failed in a way that is not one request's fault.
    #[error("the {engine} engine cannot submit: {source}")]
    Submit {
        /// Engine name.
        engine: &'static str,
        /// What the kernel said.
        #[source]
        source: io::Error,
    },
}
