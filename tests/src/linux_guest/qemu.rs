//! Booting the guest under QEMU and capturing its serial console.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::{Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use super::Tools;
use super::initramfs::{END_MARKER_PREFIX, Initramfs, START_MARKER};

/// A `vhost-user-blk-pci` disk: QEMU connects to `socket` as the vhost-user frontend.
#[derive(Clone, Debug)]
pub struct GuestDisk {
    /// The backend's listening Unix socket.
    pub socket: PathBuf,
    /// Virtqueues QEMU asks for (`num-queues`).
    pub num_queues: u16,
}

/// What to boot.
#[derive(Clone, Debug)]
pub struct BootOptions {
    /// Shell script the guest's `/init` runs after loading the modules; its exit status is
    /// the run's [`BootResult::exit_status`].
    pub script: String,
    /// Extra files put into the guest (path, content).
    pub extra_files: Vec<(String, Vec<u8>)>,
    /// The disk, or none for a guest without one (the guest's /dev/vda).
    pub disk: Option<GuestDisk>,
    /// More disks after it (/dev/vdb, /dev/vdc, ...).
    pub extra_disks: Vec<GuestDisk>,
    /// Guest vCPUs; the guest's blk-mq makes one queue per vCPU, up to `num_queues`.
    pub cpus: u32,
    /// Guest memory in MiB (a shared memfd backend, as vhost-user needs).
    pub memory_mib: u32,
    /// Kill QEMU after this long.
    pub timeout: Duration,
    /// Appended to the kernel command line.
    pub extra_cmdline: String,
}

impl BootOptions {
    /// Options running `script` with no disk, one vCPU, 512 MiB and a two-minute timeout.
    pub fn new(script: impl Into<String>) -> Self {
        BootOptions {
            script: script.into(),
            extra_files: Vec::new(),
            disk: None,
            extra_disks: Vec::new(),
            cpus: 1,
            memory_mib: 512,
            timeout: Duration::from_secs(120),
            extra_cmdline: String::new(),
        }
    }
}

/// What came back from a boot.
#[derive(Clone, Debug)]
pub struct BootResult {
    /// Everything the serial console printed.
    pub console: String,
    /// What the script printed: the console between the start and end markers.
    pub script_output: String,
    /// The script's exit status, if the end marker was seen.
    pub exit_status: Option<i32>,
    /// QEMU's stderr.
    pub qemu_stderr: String,
    /// QEMU's exit status (None when it was killed at the timeout).
    pub qemu_status: Option<ExitStatus>,
    /// Whether the timeout expired.
    pub timed_out: bool,
    /// From QEMU's start to the start marker (kernel boot and module loading).
    pub boot_time: Option<Duration>,
    /// From QEMU's start to its exit.
    pub total_time: Duration,
}

impl BootResult {
    /// Whether the script ran to the end and exited 0.
    pub fn succeeded(&self) -> bool {
        self.exit_status == Some(0) && !self.timed_out
    }

    /// A summary for assertion messages: status, QEMU's stderr and the console's tail.
    pub fn report(&self) -> String {
        let tail: String = {
            let lines: Vec<&str> = self.console.lines().collect();
            lines[lines.len().saturating_sub(60)..].join("\n")
        };
        format!(
            "exit status {:?}, qemu {:?}, timed out {}, {:.1?} total\n--- qemu stderr:\n{}\n--- console (tail):\n{}",
            self.exit_status,
            self.qemu_status,
            self.timed_out,
            self.total_time,
            self.qemu_stderr.trim_end(),
            tail
        )
    }
}

/// Boots `tools.kernel` with `initramfs` plus `opts.script` under QEMU/TCG and waits for it
/// to power off (or for the timeout).
///
/// `LINUX_GUEST_ACCEL` overrides the accelerator (e.g. `kvm` when debugging; tests use TCG)
/// and `LINUX_GUEST_VERBOSE=1` copies the console to stderr as it arrives.
pub fn boot(
    tools: &Tools,
    initramfs: &Initramfs,
    opts: &BootOptions,
) -> Result<BootResult, String> {
    let dir = tempfile::Builder::new()
        .prefix("linux-guest-")
        .tempdir()
        .map_err(|e| format!("temp dir: {e}"))?;
    let extra: Vec<(&str, &[u8])> = opts
        .extra_files
        .iter()
        .map(|(p, d)| (p.as_str(), d.as_slice()))
        .collect();
    let initrd = initramfs.with_script(dir.path(), &opts.script, &extra)?;

    let accel = std::env::var("LINUX_GUEST_ACCEL").unwrap_or_else(|_| "tcg".into());
    let mem = opts.memory_mib;
    let mut cmd = Command::new(&tools.qemu);
    cmd.args(["-accel", &accel, "-machine", "pc"])
        .args(["-smp", &opts.cpus.max(1).to_string()])
        .args(["-m", &format!("{mem}M")])
        .args([
            "-object",
            &format!("memory-backend-memfd,id=mem,size={mem}M,share=on"),
        ])
        .args(["-numa", "node,memdev=mem"])
        .args(["-nographic", "-nodefaults", "-no-user-config", "-no-reboot"])
        .args(["-serial", "stdio", "-monitor", "none"])
        .arg("-kernel")
        .arg(&tools.kernel)
        .arg("-initrd")
        .arg(&initrd)
        .args([
            "-append",
            &format!(
                "console=ttyS0 quiet panic=-1 oops=panic mitigations=off {}",
                opts.extra_cmdline
            ),
        ]);
    for (i, disk) in opts.disk.iter().chain(&opts.extra_disks).enumerate() {
        cmd.arg("-chardev")
            .arg(format!(
                "socket,id=vu{i},path={}",
                disk.socket.to_str().ok_or("socket path is not UTF-8")?
            ))
            .args([
                "-device",
                &format!(
                    "vhost-user-blk-pci,chardev=vu{i},num-queues={}",
                    disk.num_queues
                ),
            ]);
    }
    run(cmd, opts.timeout)
}

fn run(mut cmd: Command, timeout: Duration) -> Result<BootResult, String> {
    let verbose = std::env::var_os("LINUX_GUEST_VERBOSE").is_some();
    let start = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start {cmd:?}: {e}"))?;
    let (tx, rx) = mpsc::channel::<Vec<u8>>();
    let mut stdout = child.stdout.take().ok_or("no stdout")?;
    let reader = std::thread::spawn(move || {
        let mut buf = [0u8; 8192];
        while let Ok(n) = stdout.read(&mut buf) {
            if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                break;
            }
        }
    });
    let mut stderr = child.stderr.take().ok_or("no stderr")?;
    let err_reader = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = stderr.read_to_end(&mut s);
        String::from_utf8_lossy(&s).into_owned()
    });

    let deadline = start + timeout;
    let mut console = Vec::new();
    let mut boot_time = None;
    let mut timed_out = false;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            timed_out = true;
            break;
        }
        match rx.recv_timeout(left.min(Duration::from_millis(200))) {
            Ok(chunk) => {
                if verbose {
                    let _ = std::io::stderr().write_all(&chunk);
                }
                console.extend_from_slice(&chunk);
                if boot_time.is_none() && contains(&console, START_MARKER.as_bytes()) {
                    boot_time = Some(start.elapsed());
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    // The console closed (QEMU exiting) or time ran out: wait for the exit, killing QEMU
    // when it overstays.
    let mut qemu_status = None;
    while qemu_status.is_none() {
        match child.try_wait() {
            Ok(Some(s)) => qemu_status = Some(s),
            Ok(None) if timed_out || Instant::now() >= deadline => {
                timed_out = true;
                let _ = child.kill();
                let _ = child.wait();
                break;
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => return Err(format!("waiting for qemu: {e}")),
        }
    }
    let total_time = start.elapsed();
    let _ = reader.join();
    console.extend(rx.try_iter().flatten());
    let qemu_stderr = err_reader.join().unwrap_or_default();
    let console = String::from_utf8_lossy(&console).replace('\r', "");
    let (script_output, exit_status) = split_console(&console);
    Ok(BootResult {
        console,
        script_output,
        exit_status,
        qemu_stderr,
        qemu_status,
        timed_out,
        boot_time,
        total_time,
    })
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// The script's output (between the markers) and its exit status.
fn split_console(console: &str) -> (String, Option<i32>) {
    let Some(start) = console.find(START_MARKER) else {
        return (String::new(), None);
    };
    let after = &console[start + START_MARKER.len()..];
    let after = after.strip_prefix('\n').unwrap_or(after);
    match after.find(END_MARKER_PREFIX) {
        None => (after.to_string(), None),
        Some(end) => {
            let rest = &after[end + END_MARKER_PREFIX.len()..];
            let status = rest.split("@@").next().and_then(|s| s.trim().parse().ok());
            (after[..end].to_string(), status)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn console_split_at_markers() {
        let c =
            format!("boot\n{START_MARKER}\nhello\nworld\n{END_MARKER_PREFIX}3@@\n[ 1.0] reboot\n");
        let (out, rc) = split_console(&c);
        assert_eq!(out, "hello\nworld\n");
        assert_eq!(rc, Some(3));
        assert_eq!(split_console("kernel panic").1, None);
        let (out, rc) = split_console(&format!("{START_MARKER}\npartial"));
        assert_eq!((out.as_str(), rc), ("partial", None));
    }
}
