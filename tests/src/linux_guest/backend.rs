//! vhost-user-blk backends for the guest's disk: anything that listens on a Unix socket.
//!
//! [`BackendProcess`] runs any backend binary (qemu-storage-daemon, our `vhost-user-blk`)
//! and waits until its socket is listening; in-process backends implement
//! [`VhostUserBackend`] themselves.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use super::{Skip, find_program};

/// A vhost-user-blk backend listening on a Unix socket, ready for QEMU to connect.
pub trait VhostUserBackend {
    /// The listening socket.
    fn socket(&self) -> &Path;
    /// How many virtqueues the guest should use.
    fn num_queues(&self) -> u16;
}

/// A backend running as a child process; killed when dropped.
#[derive(Debug)]
pub struct BackendProcess {
    child: Child,
    socket: PathBuf,
    num_queues: u16,
    log: PathBuf,
}

impl BackendProcess {
    /// Starts `cmd` (stdout and stderr go to `<socket>.log`) and waits up to `timeout` for
    /// it to listen on `socket`. Fails with the log when the process exits first.
    pub fn spawn(
        mut cmd: Command,
        socket: PathBuf,
        num_queues: u16,
        timeout: Duration,
    ) -> Result<BackendProcess, String> {
        let log = socket.with_extension("log");
        let out = File::create(&log).map_err(|e| format!("create {}: {e}", log.display()))?;
        let err = out.try_clone().map_err(|e| e.to_string())?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(|e| format!("cannot start {cmd:?}: {e}"))?;
        let mut backend = BackendProcess {
            child,
            socket,
            num_queues,
            log,
        };
        let deadline = Instant::now() + timeout;
        loop {
            if is_listening(&backend.socket) {
                return Ok(backend);
            }
            if let Ok(Some(status)) = backend.child.try_wait() {
                return Err(format!(
                    "{cmd:?} exited ({status}) before listening on {}:\n{}",
                    backend.socket.display(),
                    backend.log()
                ));
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "{cmd:?} did not listen on {} within {timeout:?}:\n{}",
                    backend.socket.display(),
                    backend.log()
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// What the process printed so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether the process still runs.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Sends SIGTERM and waits up to `timeout` for the exit (then kills it). Returns the
    /// exit status, or None when it had to be killed.
    pub fn stop(&mut self, timeout: Duration) -> Option<ExitStatus> {
        if let Ok(Some(s)) = self.child.try_wait() {
            return Some(s);
        }
        let Ok(pid) = libc::pid_t::try_from(self.child.id()) else {
            let _ = self.child.kill();
            return None;
        };
        // SAFETY: kill(2) on our own child's pid, which has not been reaped yet (try_wait
        // above returned None), so the pid cannot have been reused.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(s)) = self.child.try_wait() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        None
    }
}

impl VhostUserBackend for BackendProcess {
    fn socket(&self) -> &Path {
        &self.socket
    }

    fn num_queues(&self) -> u16 {
        self.num_queues
    }
}

impl Drop for BackendProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        let _ = std::fs::remove_file(&self.socket);
    }
}

/// `qemu-storage-daemon`, or why it cannot be used.
pub fn find_qemu_storage_daemon() -> Result<PathBuf, Skip> {
    find_program("qemu-storage-daemon").ok_or_else(|| {
        Skip::missing(
            "qemu-storage-daemon",
            "qemu-system-common (pulled in by qemu-system-x86)",
        )
    })
}

/// Serves `image` with qemu-storage-daemon `qsd` (O_DIRECT, Linux AIO) as a writable
/// vhost-user-blk export on `socket`: the reference backend for the harness.
pub fn qemu_storage_daemon(
    qsd: &Path,
    image: &Path,
    socket: &Path,
    num_queues: u16,
) -> Result<BackendProcess, String> {
    let (Some(image), Some(sock)) = (image.to_str(), socket.to_str()) else {
        return Err("image and socket paths must be UTF-8".into());
    };
    let mut cmd = Command::new(qsd);
    cmd.args([
        "--blockdev",
        &format!("driver=file,node-name=f0,filename={image},cache.direct=on,aio=native"),
        "--export",
        &format!(
            "type=vhost-user-blk,id=e0,node-name=f0,addr.type=unix,addr.path={sock},\
             writable=on,num-queues={num_queues}"
        ),
    ]);
    BackendProcess::spawn(
        cmd,
        socket.to_path_buf(),
        num_queues,
        Duration::from_secs(10),
    )
}

/// Whether a Unix socket bound to `path` is listening, from `/proc/net/unix` (a probe
/// connection could use up a backend that serves one frontend).
pub fn is_listening(path: &Path) -> bool {
    const SO_ACCEPTCON: u32 = 1 << 16;
    let Some(path) = path.to_str() else {
        return false;
    };
    let Ok(table) = std::fs::read_to_string("/proc/net/unix") else {
        return path_is_socket(path);
    };
    table.lines().skip(1).any(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        fields.len() >= 8
            && fields[7] == path
            && u32::from_str_radix(fields[3], 16).is_ok_and(|f| f & SO_ACCEPTCON != 0)
    })
}

fn path_is_socket(path: &str) -> bool {
    use std::os::unix::fs::FileTypeExt;
    std::fs::metadata(path).is_ok_and(|m| m.file_type().is_socket())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::{UnixDatagram, UnixListener};

    #[test]
    fn listening_socket_detected() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        assert!(!is_listening(&path));
        let _dgram = UnixDatagram::bind(dir.path().join("d.sock")).unwrap();
        assert!(!is_listening(&dir.path().join("d.sock")));
        let _l = UnixListener::bind(&path).unwrap();
        assert!(is_listening(&path));
    }

    #[test]
    fn process_exiting_early_reports_its_log() {
        let dir = tempfile::tempdir().unwrap();
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "echo bad socket path >&2; exit 3"]);
        let err = BackendProcess::spawn(cmd, dir.path().join("x.sock"), 1, Duration::from_secs(5))
            .unwrap_err();
        assert!(err.contains("bad socket path"), "{err}");
    }
}
