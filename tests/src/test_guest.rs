//! The freestanding test guest (`tests/guest`, docs/architecture.md, "Tests"): building it
//! and booting it under QEMU.
//!
//! The guest is a static x86-64 ELF with a PVH note. It enumerates PCI, drives every
//! virtio-blk function (vendor 0x1af4, device 0x1042) from user mode, checks written
//! patterns, measures IOPS polled and with MSI-X interrupts, prints `key=value` lines on
//! the serial port and powers off. Its command line (see `tests/guest/src/main.rs`) selects
//! the power-off method (`exit=isa|acpi|port:0xNNNN`), the PCI config mechanism
//! (`pci=auto|port|ecam`, `ecam=0x...`) and the phase lengths (`ms=`, `blocks=`).
//!
//! ```text
//! let elf = test_guest::build()?;                        // cargo build, cached
//! let run = test_guest::run_qemu(&elf, &QemuOptions::new(vec![QemuDisk::new(img)]))?;
//! assert_eq!(run.get("result"), Some("ok"));
//! ```

use std::collections::BTreeMap;
use std::fmt;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Why the guest could not be built or run.
#[derive(Debug)]
pub enum Error {
    /// `cargo build` of the guest failed; its stderr.
    Build(String),
    /// QEMU could not be started or waited for.
    Qemu(std::io::Error),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Build(s) => write!(f, "building the test guest failed:\n{s}"),
            Error::Qemu(e) => write!(f, "running qemu-system-x86_64: {e}"),
        }
    }
}

impl std::error::Error for Error {}

/// The guest crate's directory.
pub fn guest_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("guest")
}

fn target_dir() -> PathBuf {
    let base = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    base.join("guest")
}

/// Builds the guest (release profile, into `<target>/guest`; cargo keeps it cached) once
/// per process and returns the ELF's path.
pub fn build() -> Result<PathBuf, Error> {
    static BUILT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    BUILT
        .get_or_init(|| build_uncached().map_err(|e| e.to_string()))
        .clone()
        .map_err(Error::Build)
}

fn build_uncached() -> Result<PathBuf, Error> {
    let dir = guest_dir();
    let target = target_dir();
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let out = Command::new(cargo)
        .current_dir(&dir)
        .args(["build", "--release", "--manifest-path"])
        .arg(dir.join("Cargo.toml"))
        .arg("--target-dir")
        .arg(&target)
        .env("CARGO_ENCODED_RUSTFLAGS", "-Crelocation-model=static")
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_BUILD_RUSTFLAGS")
        .env_remove("CARGO_BUILD_TARGET")
        .env_remove("CARGO_TARGET_DIR")
        .output()
        .map_err(|e| Error::Build(format!("cannot run cargo: {e}")))?;
    if !out.status.success() {
        return Err(Error::Build(
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ));
    }
    let elf = target.join("release/test-guest");
    if !elf.is_file() {
        return Err(Error::Build(format!("{} not produced", elf.display())));
    }
    Ok(elf)
}

/// `qemu-system-x86_64` from `PATH`, if installed.
pub fn find_qemu() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join("qemu-system-x86_64"))
        .find(|p| p.is_file())
}

/// One `virtio-blk-pci` disk (modern only) backed by a raw image.
#[derive(Clone, Debug)]
pub struct QemuDisk {
    /// The raw image.
    pub path: PathBuf,
    /// `readonly=on` on the drive (the device then offers `VIRTIO_BLK_F_RO`).
    pub readonly: bool,
    /// `num-queues` of the device.
    pub num_queues: u16,
}

impl QemuDisk {
    /// A writable single-queue disk.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        QemuDisk {
            path: path.into(),
            readonly: false,
            num_queues: 1,
        }
    }
}

/// How to boot the guest under QEMU.
#[derive(Clone, Debug)]
pub struct QemuOptions {
    /// The disks, in PCI slot order.
    pub disks: Vec<QemuDisk>,
    /// The guest's command line (`-append`).
    pub cmdline: String,
    /// `-accel` value: `tcg` unless `TEST_GUEST_ACCEL` says otherwise.
    pub accel: String,
    /// Kill QEMU after this long.
    pub timeout: Duration,
}

impl QemuOptions {
    /// TCG, 200 ms per IOPS phase, 60 s timeout.
    pub fn new(disks: Vec<QemuDisk>) -> Self {
        QemuOptions {
            disks,
            cmdline: "ms=200".into(),
            accel: std::env::var("TEST_GUEST_ACCEL").unwrap_or_else(|_| "tcg".into()),
            timeout: Duration::from_secs(60),
        }
    }
}

/// The outcome of one guest run.
#[derive(Clone, Debug)]
pub struct GuestRun {
    /// Every `key=value` line the guest printed (the last value of a repeated key).
    pub values: BTreeMap<String, String>,
    /// The whole serial console.
    pub console: String,
    /// QEMU's exit status: 1 when the guest reported success through isa-debug-exit,
    /// 3 on failure.
    pub exit_code: Option<i32>,
    /// QEMU was killed at the timeout.
    pub timed_out: bool,
    /// Wall-clock time of the run.
    pub elapsed: Duration,
}

impl GuestRun {
    /// The value of `key`.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.values.get(key).map(String::as_str)
    }

    /// The value of `key` as a number.
    pub fn num(&self, key: &str) -> Option<u64> {
        self.get(key)?.parse().ok()
    }

    /// The guest printed `result=ok` and QEMU exited with the success code.
    pub fn succeeded(&self) -> bool {
        self.get("result") == Some("ok") && self.exit_code == Some(1) && !self.timed_out
    }
}

/// Parses the guest's `key=value` lines (keys of `[a-z0-9_.]`; anything else is ignored,
/// firmware noise before `guest=` included).
pub fn parse_report(console: &str) -> BTreeMap<String, String> {
    let mut map = BTreeMap::new();
    for line in console.lines() {
        let line = line.trim_end_matches('\r');
        let line = match line.find("guest=") {
            Some(i) => &line[i..],
            None => line,
        };
        let Some((k, v)) = line.split_once('=') else {
            continue;
        };
        let key_ok = !k.is_empty()
            && k.bytes()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'_' || c == b'.');
        if key_ok {
            map.insert(k.to_string(), v.trim().to_string());
        }
    }
    map
}

/// The first 4 KiB pattern word the guest writes at `sector` (`seed` from its command
/// line, 1 by default): lets a test check an image after the run.
pub fn pattern_word(seed: u64, sector: u64, i: u64) -> u64 {
    let mut z =
        seed ^ sector.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ i.wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The QEMU command line for `elf` and `opts` (q35, no network, isa-debug-exit on 0xf4).
pub fn qemu_command(qemu: &Path, elf: &Path, opts: &QemuOptions) -> Command {
    let mut cmd = Command::new(qemu);
    cmd.args(["-accel", &opts.accel, "-machine", "q35", "-m", "128"])
        .args(["-nographic", "-no-reboot", "-net", "none", "-kernel"])
        .arg(elf)
        .args(["-append", &opts.cmdline])
        .args(["-device", "isa-debug-exit,iobase=0xf4,iosize=0x04"]);
    for (i, d) in opts.disks.iter().enumerate() {
        let ro = if d.readonly { ",readonly=on" } else { "" };
        cmd.arg("-drive").arg(format!(
            "file={},if=none,id=d{i},format=raw{ro}",
            d.path.display()
        ));
        cmd.arg("-device").arg(format!(
            "virtio-blk-pci,drive=d{i},disable-legacy=on,num-queues={}",
            d.num_queues
        ));
    }
    cmd
}

/// How a command run by [`run_captured`] ended.
#[derive(Debug)]
pub struct Captured {
    /// Its stdout, then its stderr.
    pub output: String,
    /// Its exit status (after the kill when it timed out).
    pub status: std::process::ExitStatus,
    /// It ran past the timeout and was killed.
    pub timed_out: bool,
    /// How long it ran.
    pub elapsed: Duration,
}

/// Runs `cmd` (stdin closed) to its end or until `timeout`, when it is killed; collects
/// its stdout and stderr.
pub fn run_captured(mut cmd: Command, timeout: Duration) -> std::io::Result<Captured> {
    let start = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let mut stdout = child.stdout.take();
    let mut stderr = child.stderr.take();
    let reader = std::thread::spawn(move || {
        let mut out = Vec::new();
        if let Some(s) = stdout.as_mut() {
            let _ = s.read_to_end(&mut out);
        }
        if let Some(s) = stderr.as_mut() {
            let _ = s.read_to_end(&mut out);
        }
        out
    });
    let mut timed_out = false;
    let status = loop {
        if let Some(st) = child.try_wait()? {
            break st;
        }
        if start.elapsed() > timeout {
            timed_out = true;
            let _ = child.kill();
            break child.wait()?;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let out = reader.join().unwrap_or_default();
    Ok(Captured {
        output: String::from_utf8_lossy(&out).into_owned(),
        status,
        timed_out,
        elapsed: start.elapsed(),
    })
}

/// Boots `elf` under QEMU and collects its report.
pub fn run_qemu(elf: &Path, opts: &QemuOptions) -> Result<GuestRun, Error> {
    let qemu = find_qemu().unwrap_or_else(|| "qemu-system-x86_64".into());
    let run = run_captured(qemu_command(&qemu, elf, opts), opts.timeout).map_err(Error::Qemu)?;
    Ok(GuestRun {
        values: parse_report(&run.output),
        console: run.output,
        exit_code: run.status.code(),
        timed_out: run.timed_out,
        elapsed: run.elapsed,
    })
}

/// The seed of generation `g`'s pattern in the test guest's `gens` phase.
pub fn gen_seed(seed: u64, g: u64) -> u64 {
    seed ^ (g << 32) ^ 0x6E65_6E73
}

/// What a disk image holds of the test guest's `gens` phase (`seed`, blocks of 4 KiB
/// from sector 8 on, `span_blocks` of them, generations up to `max_gen`): the number of
/// written blocks and the FNV-1a digest the guest prints as `gens_digest`, recomputed
/// from the bytes. A block that holds neither zeroes nor `zero_block` nor a generation's
/// pattern is an error naming it.
pub fn gens_digest(
    image: &[u8],
    seed: u64,
    span_blocks: u64,
    max_gen: u64,
    untouched: &dyn Fn(u64) -> Vec<u8>,
) -> Result<(u64, String), String> {
    let mut digest: u64 = 0xCBF2_9CE4_8422_2325;
    let mut written = 0;
    for b in 0..span_blocks {
        let off = usize::try_from((b + 1) * 4096).map_err(|e| e.to_string())?;
        let Some(block) = image.get(off..off + 4096) else {
            return Err(format!("block {b} lies past the image's end"));
        };
        let sector = (b + 1) * 8;
        let word =
            |w: usize| u64::from_le_bytes(block[w * 8..w * 8 + 8].try_into().unwrap_or_default());
        let g = (1..=max_gen).find(|&g| {
            let gs = gen_seed(seed, g);
            (0..512).all(|w| word(w) == pattern_word(gs, sector, w as u64))
        });
        match g {
            Some(g) => {
                written += 1;
                for byte in b.to_le_bytes().iter().chain(g.to_le_bytes().iter()) {
                    digest = (digest ^ u64::from(*byte)).wrapping_mul(0x0100_0000_01B3);
                }
            }
            None if block == &untouched(b)[..] => {}
            None => {
                return Err(format!(
                    "block {b} holds neither its old data nor a generation"
                ));
            }
        }
    }
    Ok((written, format!("{digest:016x}")))
}

#[cfg(test)]
mod unit {
    use super::*;

    #[test]
    fn report_parsing_skips_noise() {
        let c = "\x1b[2JSeaBIOS\r\nBooting from ROM..guest=virtio-blk-test\r\n\
                 disk0.iops_poll=1234\r\nnot a key=1\nresult=ok\n";
        let m = parse_report(c);
        assert_eq!(m.get("guest").map(String::as_str), Some("virtio-blk-test"));
        assert_eq!(m.get("disk0.iops_poll").map(String::as_str), Some("1234"));
        assert_eq!(m.get("result").map(String::as_str), Some("ok"));
        assert!(!m.contains_key("not a key"));
    }
}
