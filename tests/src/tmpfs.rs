//! A tmpfs a test mounts (root only): storage that fills up and grows on cue, for the
//! error-policy tests (ENOSPC, then `mount -o remount,size=`).

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// A tmpfs mounted on a directory; unmounted (lazily) when dropped.
pub struct Tmpfs {
    dir: PathBuf,
}

impl Tmpfs {
    /// Mounts a tmpfs of `size` (as `mount -o size=` takes it: `1m`, `64k`) on `dir`
    /// (created if missing). `None`, with a SKIP line for `test`, when not root or when
    /// the kernel refuses (a container without `CAP_SYS_ADMIN`).
    pub fn mount(test: &str, dir: &Path, size: &str) -> Option<Tmpfs> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            crate::skip::skip(test, "mounting a tmpfs needs root");
            return None;
        }
        std::fs::create_dir_all(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        match try_mount(dir, size, 0) {
            Ok(()) => Some(Tmpfs {
                dir: dir.to_path_buf(),
            }),
            Err(e) if matches!(e.raw_os_error(), Some(libc::EPERM | libc::EACCES)) => {
                crate::skip::skip(test, &format!("the kernel refuses to mount a tmpfs: {e}"));
                None
            }
            Err(e) => panic!("mount tmpfs on {}: {e}", dir.display()),
        }
    }

    /// `mount -o remount,size=SIZE`.
    pub fn resize(&self, size: &str) {
        resize(&self.dir, size);
    }

    /// Where it is mounted.
    pub fn path(&self) -> &Path {
        &self.dir
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        if let Ok(target) = CString::new(self.dir.as_os_str().as_bytes()) {
            // SAFETY: a NUL-terminated path that outlives the call.
            unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
        }
    }
}

/// Resizes the tmpfs mounted on `dir` (`mount -o remount,size=SIZE`), from any thread.
pub fn resize(dir: &Path, size: &str) {
    try_mount(dir, size, libc::MS_REMOUNT)
        .unwrap_or_else(|e| panic!("remount tmpfs on {}: {e}", dir.display()));
}

fn try_mount(dir: &Path, size: &str, flags: libc::c_ulong) -> std::io::Result<()> {
    let target = CString::new(dir.as_os_str().as_bytes()).expect("a path without NUL");
    let options = CString::new(format!("size={size}")).expect("a size without NUL");
    // SAFETY: every pointer is a NUL-terminated string that outlives the call.
    let rc = unsafe {
        libc::mount(
            c"tmpfs".as_ptr(),
            target.as_ptr(),
            c"tmpfs".as_ptr(),
            flags,
            options.as_ptr().cast(),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}
