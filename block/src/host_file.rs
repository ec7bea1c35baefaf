//! Opening the host files a client names (disk images, kernels, initramfs, serial
//! output): never blocking on a FIFO or a device that waits for a peer, never becoming the
//! controlling terminal, and never through a symbolic link once the process forbids them
//! (`vmmd --allowed-dir`: its paths were checked resolved, so a link found at open time was
//! put there after the check and would change the answer).

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

/// Set once by [`forbid_symlinks`]; never cleared.
static NO_SYMLINKS: AtomicBool = AtomicBool::new(false);

/// From now on every [`open`] of this process refuses a path with a symbolic link in any
/// component (`openat2` with `RESOLVE_NO_SYMLINKS`). Process-wide and one way, like a
/// sandbox rule: `vmmd --allowed-dir` calls it at start.
pub fn forbid_symlinks() {
    NO_SYMLINKS.store(true, Ordering::SeqCst);
}

/// Whether [`forbid_symlinks`] was called.
pub fn symlinks_forbidden() -> bool {
    NO_SYMLINKS.load(Ordering::SeqCst)
}

/// How to open a file: `libc::O_RDONLY`, `O_WRONLY` or `O_RDWR` plus `O_CREAT`,
/// `O_APPEND`, `O_DIRECT` as needed (`O_CLOEXEC`, `O_NOCTTY` are always added).
#[derive(Clone, Copy, Debug)]
pub struct OpenFlags {
    /// open(2) flags.
    pub flags: libc::c_int,
    /// Mode of a created file.
    pub mode: libc::mode_t,
}

impl OpenFlags {
    /// Read-only.
    pub const READ: OpenFlags = OpenFlags {
        flags: libc::O_RDONLY,
        mode: 0,
    };
}

/// Files handed over to this process for a path it may not open itself (a sandboxed VM
/// process gets hot plugged images this way, over `SCM_RIGHTS`).
static HANDED: Mutex<Vec<(PathBuf, File)>> = Mutex::new(Vec::new());

/// From now on [`open`] of `path` uses `file` (a duplicate of it each time, with the
/// status flags asked for) instead of opening the path; replaces an earlier one.
pub fn hand_over(path: PathBuf, file: File) {
    let mut handed = crate::sync::lock(&HANDED);
    handed.retain(|(p, _)| *p != path);
    handed.push((path, file));
}

/// Forgets the file handed over for `path` (the disk using it is gone; its image lock
/// goes with the last descriptor).
pub fn forget_handed(path: &Path) {
    crate::sync::lock(&HANDED).retain(|(p, _)| p != path);
}

/// A duplicate of the file handed over for `path`, if any, checked against `how`'s
/// access mode and given its status flags (`O_DIRECT`, `O_APPEND`).
fn handed(path: &Path, how: OpenFlags) -> Option<io::Result<File>> {
    let handed = crate::sync::lock(&HANDED);
    let (_, file) = handed.iter().find(|(p, _)| p == path)?;
    let dup = || -> io::Result<File> {
        let file = file.try_clone()?;
        // SAFETY: F_GETFL/F_SETFL only read and change the status flags of our descriptor.
        unsafe {
            let fl = libc::fcntl(file.as_raw_fd(), libc::F_GETFL);
            if fl < 0 {
                return Err(io::Error::last_os_error());
            }
            let (have, want) = (fl & libc::O_ACCMODE, how.flags & libc::O_ACCMODE);
            if have != want && have != libc::O_RDWR {
                return Err(io::Error::from_raw_os_error(libc::EACCES));
            }
            let settable = libc::O_DIRECT | libc::O_APPEND;
            let new = (fl & !settable) | (how.flags & settable);
            if libc::fcntl(file.as_raw_fd(), libc::F_SETFL, new) < 0 {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(file)
    };
    Some(dup())
}

/// Opens `path` without blocking on FIFOs or devices that wait for a peer (`O_NONBLOCK`
/// at open, cleared right after so I/O on the file blocks as usual) and, when the process
/// forbids them ([`forbid_symlinks`]), without following any symbolic link (`ELOOP`).
/// A file handed over for `path` ([`hand_over`]) is used instead of opening it.
pub fn open(path: &Path, how: OpenFlags) -> io::Result<File> {
    if let Some(file) = handed(path, how) {
        return file;
    }
    open_with(path, how, symlinks_forbidden())
}

/// [`open`] with the symlink rule given explicitly.
pub fn open_with(path: &Path, how: OpenFlags, no_symlinks: bool) -> io::Result<File> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"))?;
    let flags = how.flags | libc::O_CLOEXEC | libc::O_NOCTTY | libc::O_NONBLOCK;
    let fd = if no_symlinks {
        // SAFETY: open_how is plain integers; all-zero is valid (libc marks it
        // non-exhaustive, so it is built field by field).
        let mut open_how: libc::open_how = unsafe { std::mem::zeroed() };
        open_how.flags = u64::from(flags.cast_unsigned());
        if flags & libc::O_CREAT != 0 {
            open_how.mode = u64::from(how.mode);
        }
        open_how.resolve = libc::RESOLVE_NO_SYMLINKS | libc::RESOLVE_NO_MAGICLINKS;
        // SAFETY: openat2 reads the NUL-terminated path and the open_how of the size we
        // pass; it returns a new descriptor or -1.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_openat2,
                libc::AT_FDCWD,
                c.as_ptr(),
                &open_how as *const libc::open_how,
                std::mem::size_of::<libc::open_how>(),
            )
        };
        // A descriptor or -1: both fit an int.
        libc::c_int::try_from(rc).unwrap_or(-1)
    } else {
        // SAFETY: open reads the NUL-terminated path; it returns a new descriptor or -1.
        unsafe { libc::open(c.as_ptr(), flags, libc::c_uint::from(how.mode)) }
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by open/openat2 and is owned by nobody else.
    let file = unsafe { File::from_raw_fd(fd) };
    // SAFETY: F_GETFL/F_SETFL only read and change the status flags of our descriptor.
    unsafe {
        let fl = libc::fcntl(file.as_raw_fd(), libc::F_GETFL);
        if fl < 0 || libc::fcntl(file.as_raw_fd(), libc::F_SETFL, fl & !libc::O_NONBLOCK) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(file)
}

/// What a file is, for messages: "a regular file", "a character device", ...
pub fn kind(t: &std::fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    if t.is_file() {
        "a regular file"
    } else if t.is_dir() {
        "a directory"
    } else if t.is_block_device() {
        "a block device"
    } else if t.is_char_device() {
        "a character device"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_socket() {
        "a socket"
    } else {
        "a symbolic link"
    }
}

/// Whether an error of [`open`] was a symbolic link refused because of [`forbid_symlinks`].
pub fn is_symlink_refusal(e: &io::Error) -> bool {
    symlinks_forbidden() && e.raw_os_error() == Some(libc::ELOOP)
}

/// Takes an OFD lock on the whole of `file` without waiting, exclusive (a write lock) or
/// shared (a read lock); `false` when another open file description holds a conflicting
/// lock. The lock lasts as long as the file is open.
pub fn try_lock(file: &File, exclusive: bool) -> io::Result<bool> {
    // SAFETY: an all-zero flock is a valid value; the fields that matter are set below.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    // libc's flock constants are small (0..=2), so they fit a c_short.
    #[allow(clippy::cast_possible_truncation)]
    {
        fl.l_type = if exclusive {
            libc::F_WRLCK
        } else {
            libc::F_RDLCK
        } as libc::c_short;
        fl.l_whence = libc::SEEK_SET as libc::c_short;
    }
    // SAFETY: F_OFD_SETLK reads only the flock we pass.
    let rc = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &fl) };
    if rc == 0 {
        return Ok(true);
    }
    let e = io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EAGAIN) | Some(libc::EACCES) => Ok(false),
        _ => Err(e),
    }
}

/// Connects a new nonblocking Unix stream socket (close-on-exec) to `path`, once: a
/// listener with a full backlog answers `EAGAIN` at once instead of blocking the caller.
/// A path too long for a socket address is `InvalidInput`.
pub fn connect_unix_nonblocking(path: &Path) -> io::Result<OwnedFd> {
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: an all-zero sockaddr_un is valid; family and path are set below.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("socket path {} is too long or holds a NUL", path.display()),
        ));
    }
    addr.sun_family = libc::sa_family_t::try_from(libc::AF_UNIX).unwrap_or(1);
    for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = s.cast_signed();
    }
    // SAFETY: socket() has no memory preconditions; it returns a new fd or -1.
    let raw = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `raw` is a socket we just made; `fd` owns and closes it on every path.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let len = libc::socklen_t::try_from(std::mem::size_of::<libc::sockaddr_un>()).unwrap_or(0);
    loop {
        // SAFETY: connect reads the sockaddr_un of the size we pass.
        let rc = unsafe { libc::connect(fd.as_raw_fd(), (&raw const addr).cast(), len) };
        if rc == 0 {
            return Ok(fd);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::time::{Duration, Instant};

    use super::*;

    #[test]
    fn a_fifo_opens_at_once_for_reading_and_fails_for_writing() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        let c = CString::new(fifo.as_os_str().as_bytes()).unwrap();
        // SAFETY: mkfifo reads the NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let t = Instant::now();
        let f = open(&fifo, OpenFlags::READ).unwrap();
        assert!(!f.metadata().unwrap().is_file());
        drop(f);
        // No writer and no reader: a blocking open would wait forever.
        let err = open(
            &fifo,
            OpenFlags {
                flags: libc::O_WRONLY,
                mode: 0,
            },
        )
        .unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ENXIO), "{err}");
        assert!(t.elapsed() < Duration::from_secs(2));
    }

    #[test]
    fn nonblock_is_cleared_after_open() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        let mut f = open(
            &p,
            OpenFlags {
                flags: libc::O_WRONLY | libc::O_CREAT,
                mode: 0o600,
            },
        )
        .unwrap();
        f.write_all(b"x").unwrap();
        // SAFETY: F_GETFL only reads the flags.
        let fl = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_GETFL) };
        assert_eq!(fl & libc::O_NONBLOCK, 0);
        assert_ne!(fl & libc::O_CLOEXEC, -1);
    }

    #[test]
    fn symlinks_refused_only_when_asked() {
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().join("real");
        std::fs::write(&real, b"data").unwrap();
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        let sub = dir.path().join("sub");
        std::os::unix::fs::symlink(dir.path(), &sub).unwrap();
        assert!(open_with(&link, OpenFlags::READ, false).is_ok());
        assert!(open_with(&real, OpenFlags::READ, true).is_ok());
        for p in [link, sub.join("real")] {
            let err = open_with(&p, OpenFlags::READ, true).unwrap_err();
            assert_eq!(
                err.raw_os_error(),
                Some(libc::ELOOP),
                "{}: {err}",
                p.display()
            );
        }
    }

    #[test]
    fn an_image_lock_is_seen() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("img");
        std::fs::write(&p, vec![0u8; 4096]).unwrap();
        // Each look is a fresh open file description, as another process's would be.
        let rw = OpenFlags {
            flags: libc::O_RDWR,
            mode: 0,
        };
        let free = || try_lock(&open(&p, rw).unwrap(), true).unwrap();
        assert!(free());
        let disk = crate::Disk::open(&crate::DiskOptions {
            readonly: true,
            cache: crate::CacheMode::Writeback,
            ..crate::DiskOptions::new(p.clone())
        })
        .unwrap();
        assert!(!free(), "a read-only disk's lock");
        // Shared locks share; the exclusive one is refused.
        assert!(try_lock(&open(&p, OpenFlags::READ).unwrap(), false).unwrap());
        drop(disk);
        assert!(free());
    }
}
