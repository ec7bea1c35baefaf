//! A VM process as vmmd sees it: its state directory, starting it detached, learning of
//! its end at once (pidfd), and what it left behind.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;

use crate::backend::{ApiError, CrashReport};

/// The largest state file read (a config, counters and an event take a few KiB).
const MAX_STATE_FILE: u64 = 16 << 20;

/// How many lines of a VM's log a crash report carries.
const LOG_TAIL_LINES: usize = 12;
/// How much of the end of a VM's log is read for them.
const LOG_TAIL_BYTES: u64 = 8192;

/// The files of one VM under the state directory: `<state_dir>/<id>/`.
#[derive(Clone, Debug)]
pub struct VmDir {
    /// The directory.
    pub path: PathBuf,
}

impl VmDir {
    /// VM `id`'s directory under `state_dir`.
    pub fn new(state_dir: &Path, id: &str) -> Self {
        VmDir {
            path: state_dir.join(id),
        }
    }

    /// The VM's config as vmmd last knew it.
    pub fn config(&self) -> PathBuf {
        self.path.join("config.json")
    }
    /// The VM process's id.
    pub fn pid(&self) -> PathBuf {
        self.path.join("pid")
    }
    /// The VM process's API socket.
    pub fn socket(&self) -> PathBuf {
        self.path.join("api.sock")
    }
    /// Where the VM process takes hot plugged images' descriptors.
    pub fn fd_socket(&self) -> PathBuf {
        self.path.join("fd.sock")
    }
    /// The VM process's stdout and stderr.
    pub fn log(&self) -> PathBuf {
        self.path.join("vmm.log")
    }
    /// Where the VM process may write (the only part of the directory it may): its
    /// last state and a start error. vmmd's own files (config, pid) stay out of its
    /// reach.
    pub fn out(&self) -> PathBuf {
        self.path.join("out")
    }
    /// What the VM process writes when it ends in order.
    pub fn last_state(&self) -> PathBuf {
        self.out().join("last.json")
    }
    /// How the VM process crashed, as vmmd saw it.
    pub fn crash(&self) -> PathBuf {
        self.path.join("crash.json")
    }
    /// Why the VM process refused its VM at start.
    pub fn start_error(&self) -> PathBuf {
        self.out().join("start-error.json")
    }

    /// Creates the directory and its `out` (0700; the parent must exist).
    pub fn create(&self) -> std::io::Result<()> {
        for dir in [self.path.clone(), self.out()] {
            match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                r => r?,
            }
        }
        Ok(())
    }

    /// Reads JSON from `path` (`None`: missing, unreadable, or larger than
    /// [`MAX_STATE_FILE`]: a VM process writes some of these files, and vmmd does not
    /// read whatever it likes into memory).
    pub fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Option<T> {
        let file = File::open(path).ok()?;
        let mut bytes = Vec::new();
        file.take(MAX_STATE_FILE + 1).read_to_end(&mut bytes).ok()?;
        if bytes.len() as u64 > MAX_STATE_FILE {
            tracing::warn!(path = %path.display(), "state file too large: ignored");
            return None;
        }
        serde_json::from_slice(&bytes).ok()
    }

    /// The last lines of the VM's log.
    pub fn log_tail(&self) -> Vec<String> {
        let Ok(mut f) = File::open(self.log()) else {
            return Vec::new();
        };
        let len = f.metadata().map(|m| m.len()).unwrap_or(0);
        let _ = f.seek(SeekFrom::Start(len.saturating_sub(LOG_TAIL_BYTES)));
        let mut bytes = Vec::new();
        let _ = f.read_to_end(&mut bytes);
        let text = String::from_utf8_lossy(&bytes);
        let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
        lines[lines.len().saturating_sub(LOG_TAIL_LINES)..]
            .iter()
            .map(|l| l.to_string())
            .collect()
    }

    /// Removes the directory and everything in it.
    pub fn remove(&self) {
        if let Err(e) = std::fs::remove_dir_all(&self.path)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(dir = %self.path.display(), error = %e, "cannot remove a VM's state directory");
        }
    }
}

/// Writes `value` as JSON to `path` (a new file renamed over the old, so that a reader
/// never sees half of it).
pub fn write_json(path: &Path, value: &impl serde::Serialize) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    let bytes = serde_json::to_vec_pretty(value).map_err(std::io::Error::other)?;
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)
}

/// A running VM process: its pid and a pidfd (which stays valid, and names this
/// process only, even after it ends).
#[derive(Debug)]
pub struct VmProcess {
    /// Its pid.
    pub pid: u32,
    /// Its pidfd.
    pub pidfd: Arc<OwnedFd>,
}

/// How a process ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exit {
    /// It exited with this status.
    Status(i32),
    /// A signal ended it.
    Signal(i32),
    /// It was not our child: unknown.
    Unknown,
}

impl Exit {
    /// A crash report of this end, with `log` and `reason`.
    pub fn report(self, reason: String, log: Vec<String>) -> CrashReport {
        let (status, signal) = match self {
            Exit::Status(s) => (Some(s), None),
            Exit::Signal(s) => (None, Some(s)),
            Exit::Unknown => (None, None),
        };
        CrashReport {
            status,
            signal,
            reason,
            log,
        }
    }
}

/// A pidfd for `pid` (`None`: no such process).
pub fn pidfd_open(pid: u32) -> Option<OwnedFd> {
    let pid = libc::pid_t::try_from(pid).ok()?;
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1; no memory is
    // passed.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    let fd = i32::try_from(fd).ok().filter(|fd| *fd >= 0)?;
    // SAFETY: `fd` was just returned by the kernel and is owned by nobody else.
    Some(unsafe { OwnedFd::from_raw_fd(fd) })
}

impl VmProcess {
    /// Starts `binary args` in its own session (so that vmmd's end, or a signal to
    /// vmmd's process group, does not take it), stdout and stderr appended to `log`.
    pub fn spawn(binary: &Path, args: &[String], log: &Path) -> Result<VmProcess, ApiError> {
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .map_err(|e| ApiError::internal(format!("{}: {e}", log.display())))?;
        let err = out
            .try_clone()
            .map_err(|e| ApiError::internal(format!("{}: {e}", log.display())))?;
        let mut cmd = Command::new(binary);
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .env(
                "VMM_LOG",
                std::env::var("VMM_LOG").unwrap_or_else(|_| "info".into()),
            );
        // SAFETY: the closure runs in the child between fork and exec and only calls
        // setsid, which is async-signal-safe.
        unsafe {
            cmd.pre_exec(|| {
                if libc::setsid() < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().map_err(|e| {
            e.raw_os_error()
                .and_then(|n| crate::kvm_backend::host_limit("cannot start a VM process", n))
                .unwrap_or_else(|| {
                    ApiError::internal(format!("cannot start {}: {e}", binary.display()))
                })
        })?;
        let pid = child.id();
        // Our child, not reaped yet: the pid cannot have been reused.
        let pidfd = pidfd_open(pid)
            .ok_or_else(|| ApiError::internal(format!("pidfd_open({pid}) failed")))?;
        // Dropping `child` neither waits nor kills; the exit is reaped through the pidfd.
        drop(child);
        Ok(VmProcess {
            pid,
            pidfd: Arc::new(pidfd),
        })
    }

    /// Blocks until the process has ended; reaps it when it is our child.
    pub fn wait(pidfd: &OwnedFd, child: bool) -> Exit {
        let mut pfd = libc::pollfd {
            fd: pidfd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        loop {
            // SAFETY: `pfd` is one valid pollfd for the duration of the call.
            let n = unsafe { libc::poll(&raw mut pfd, 1, -1) };
            if n > 0 {
                break;
            }
            if n < 0 && std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
                break;
            }
        }
        if !child {
            return Exit::Unknown;
        }
        // SAFETY: zeroed siginfo_t is a valid value for waitid to fill.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        let id = libc::id_t::try_from(pidfd.as_raw_fd()).unwrap_or(0);
        loop {
            // SAFETY: `info` is a valid siginfo_t for the kernel to fill; P_PIDFD names our
            // child by its pidfd.
            let r = unsafe { libc::waitid(libc::P_PIDFD, id, &raw mut info, libc::WEXITED) };
            if r == 0 {
                break;
            }
            if std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
                return Exit::Unknown;
            }
        }
        // SAFETY: waitid succeeded with WEXITED, so the child fields are set.
        let status = unsafe { info.si_status() };
        if info.si_code == libc::CLD_EXITED {
            Exit::Status(status)
        } else {
            Exit::Signal(status)
        }
    }
}

/// Whether the process behind `pidfd` still runs (its pidfd is not readable yet).
pub fn alive(pidfd: &OwnedFd) -> bool {
    let mut pfd = libc::pollfd {
        fd: pidfd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: `pfd` is one valid pollfd for the duration of the call; timeout 0.
    unsafe { libc::poll(&raw mut pfd, 1, 0) == 0 }
}

/// Sends `signal` to the process behind `pidfd` (not to whatever reused its pid).
pub fn signal(pidfd: &OwnedFd, signal: i32) {
    // SAFETY: pidfd_send_signal takes a pidfd, a signal number, a null siginfo and flags.
    let r = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            signal,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    if r != 0 {
        tracing::debug!(error = %std::io::Error::last_os_error(), "pidfd_send_signal failed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_files_are_read_only_up_to_a_size() {
        let dir = tempfile::tempdir().unwrap();
        let small = dir.path().join("small.json");
        std::fs::write(&small, b"[1, 2, 3]").unwrap();
        assert_eq!(VmDir::read_json::<Vec<u8>>(&small), Some(vec![1, 2, 3]));
        // A VM process that writes a huge "last state" does not make vmmd read it all.
        let big = dir.path().join("big.json");
        let f = File::create(&big).unwrap();
        f.set_len(MAX_STATE_FILE + 1).unwrap();
        assert_eq!(VmDir::read_json::<Vec<u8>>(&big), None);
        assert_eq!(VmDir::read_json::<Vec<u8>>(&dir.path().join("none")), None);
    }
}
