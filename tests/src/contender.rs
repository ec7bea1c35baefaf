//! vhost-user-blk backends started as processes for benchmarks and tests: ours
//! (`vhost-user-blk`) and qemu-storage-daemon.

// Our own child's pid and the kernel's clock tick rate.
#![allow(clippy::cast_possible_wrap, clippy::cast_sign_loss)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running backend process serving one disk on a Unix socket; killed on drop.
pub struct Backend {
    /// Short name for tables.
    pub name: String,
    /// The vhost-user socket.
    pub socket: PathBuf,
    child: Child,
}

/// What a backend serves.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// A raw image file with O_DIRECT and the given engine ("io_uring" or "native").
    File {
        /// The image.
        path: PathBuf,
        /// The engine.
        aio: &'static str,
    },
    /// A null backend of this size (reads return zeroes).
    Null {
        /// Size in bytes.
        size: u64,
    },
    /// An export on an NBD server.
    Nbd(block::nbd::NbdUri),
    /// A qcow2 image with O_DIRECT and io_uring.
    Qcow2 {
        /// The image.
        path: PathBuf,
    },
}

/// Where `scripts/qemu10.sh` unpacks QEMU 10.0's binaries (without installing
/// them): the newest qemu-storage-daemon the benchmarks can get.
pub const NEWEST_QEMU_BIN: &str = "/var/tmp/qemu10/x/usr/bin";

/// Where `qemu-storage-daemon` is in PATH, if installed.
pub fn qsd_binary() -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join("qemu-storage-daemon"))
            .find(|p| p.is_file())
    })
}

/// The qemu-storage-daemon of the unpacked QEMU 10.0 ([`NEWEST_QEMU_BIN`]), when it is
/// there and runs.
pub fn newest_qsd() -> Option<PathBuf> {
    let qsd = Path::new(NEWEST_QEMU_BIN).join("qemu-storage-daemon");
    (qsd.is_file() && qsd_version(&qsd).is_some()).then_some(qsd)
}

/// The qemu-storage-daemon benchmarks use by default: the newest QEMU's, else PATH's.
pub fn default_qsd() -> Option<PathBuf> {
    newest_qsd().or_else(qsd_binary)
}

/// The first line of `qsd --version` (`qemu-storage-daemon version 10.0.2 (Debian ...)`);
/// None when it does not run.
pub fn qsd_version(qsd: &Path) -> Option<String> {
    let out = Command::new(qsd)
        .arg("--version")
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()
        .map(|l| l.trim().to_string())
        .filter(|l| !l.is_empty())
}

/// The version number in a `--version` line (`10.0.2` of
/// `qemu-storage-daemon version 10.0.2 (Debian ...)`).
pub fn version_number(line: &str) -> Option<&str> {
    let mut words = line.split_whitespace();
    words.find(|w| *w == "version")?;
    words
        .next()
        .filter(|v| v.starts_with(|c: char| c.is_ascii_digit()))
}

/// Where our `vhost-user-blk` binary is: beside the running executable (target/*/),
/// or one level up (target/*/deps for tests).
pub fn our_binary() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let dir = exe.parent()?;
    [
        dir.join("vhost-user-blk"),
        dir.parent()?.join("vhost-user-blk"),
    ]
    .into_iter()
    .find(|p| p.is_file())
}

impl Backend {
    /// Starts our backend serving `target` with `queues` queues on `socket`.
    pub fn ours(
        binary: &Path,
        socket: &Path,
        target: &Target,
        queues: usize,
        iothread: Option<&str>,
    ) -> Result<Backend, String> {
        let disk = match target {
            Target::File { path, aio } => {
                format!(
                    "path={},cache=none,aio={aio},num_queues={queues},queue_size=1024",
                    path.display()
                )
            }
            Target::Null { size } => {
                format!("path=null,null_size={size},num_queues={queues},queue_size=1024")
            }
            Target::Nbd(uri) => {
                format!("path={uri},cache=none,num_queues={queues},queue_size=1024")
            }
            Target::Qcow2 { path } => format!(
                "path={},format=qcow2,cache=none,aio=io_uring,num_queues={queues},queue_size=1024",
                path.display()
            ),
        };
        let mut cmd = Command::new(binary);
        cmd.arg("--socket").arg(socket).arg("--disk").arg(disk);
        // Its per-connection info lines would interleave with the benchmark's output.
        if std::env::var_os("RUST_LOG").is_none() {
            cmd.env("RUST_LOG", "warn");
        }
        if let Some(settings) = iothread {
            cmd.arg("--iothread").arg(format!("id=io0,{settings}"));
        }
        Self::spawn(name_of("ours", target), socket, cmd)
    }

    /// Starts qemu-storage-daemon serving `target` from one iothread with `queues` queues.
    pub fn qsd(
        binary: &Path,
        socket: &Path,
        target: &Target,
        queues: usize,
    ) -> Result<Backend, String> {
        let blockdev = match target {
            Target::File { path, aio } => format!(
                "driver=file,node-name=disk,filename={},cache.direct=on,aio={aio}",
                path.display()
            ),
            Target::Null { size } => {
                format!("driver=null-co,node-name=disk,size={size},read-zeroes=on")
            }
            Target::Nbd(uri) => {
                let server = match &uri.address {
                    block::nbd::NbdAddress::Unix(p) => {
                        format!("server.type=unix,server.path={}", p.display())
                    }
                    block::nbd::NbdAddress::Tcp { host, port } => {
                        format!("server.type=inet,server.host={host},server.port={port}")
                    }
                };
                // QEMU's option syntax doubles a comma inside a value.
                let export = uri.export.replace(',', ",,");
                format!("driver=nbd,node-name=disk,{server},export={export}")
            }
            Target::Qcow2 { path } => format!(
                "driver=qcow2,node-name=disk,file.driver=file,file.filename={},file.cache.direct=on,file.aio=io_uring",
                path.display()
            ),
        };
        let mut cmd = Command::new(binary);
        cmd.args(["--blockdev", &blockdev, "--object", "iothread,id=io0", "--export"]).arg(format!(
            "type=vhost-user-blk,id=exp0,node-name=disk,addr.type=unix,addr.path={},writable=on,iothread=io0,num-queues={queues}",
            socket.display()
        ));
        Self::spawn(name_of("qsd", target), socket, cmd)
    }

    /// Starts `cmd` (a backend serving `socket`) as `name` and waits until it listens.
    pub fn spawn(name: String, socket: &Path, mut cmd: Command) -> Result<Backend, String> {
        let _ = std::fs::remove_file(socket);
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| format!("cannot start {name}: {e}"))?;
        let mut backend = Backend {
            name,
            socket: socket.to_path_buf(),
            child,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !socket.exists() {
            if let Ok(Some(status)) = backend.child.try_wait() {
                return Err(format!("{} exited at start: {status}", backend.name));
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "{} did not create {}",
                    backend.name,
                    socket.display()
                ));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(backend)
    }

    /// The process id (for CPU accounting).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        // SAFETY: kill with SIGTERM on our own child's pid.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                let _ = std::fs::remove_file(&self.socket);
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.socket);
    }
}

fn name_of(who: &str, target: &Target) -> String {
    match target {
        Target::File { aio, .. } => format!("{who} file {aio}"),
        Target::Null { .. } => format!("{who} null"),
        Target::Nbd { .. } => format!("{who} nbd"),
        Target::Qcow2 { .. } => format!("{who} qcow2"),
    }
}

/// utime + stime of a process, from `/proc/<pid>/stat`.
pub fn cpu_time_of(pid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may contain spaces) start after the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    // SAFETY: sysconf has no memory effects.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Some(Duration::from_nanos((utime + stime) * 1_000_000_000 / hz))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_numbers() {
        let v = "qemu-storage-daemon version 10.0.2 (Debian 1:10.0.2+ds-2+deb13u1~bpo12+1)";
        assert_eq!(version_number(v), Some("10.0.2"));
        assert_eq!(
            version_number("qemu-storage-daemon version 7.2.22"),
            Some("7.2.22")
        );
        assert_eq!(version_number("qemu-storage-daemon"), None);
        assert_eq!(version_number("version unknown"), None);
    }

    #[test]
    fn a_binary_that_fails_has_no_version() {
        assert_eq!(qsd_version(Path::new("/bin/false")), None);
        assert_eq!(qsd_version(Path::new("/nonexistent/qsd")), None);
    }
}
