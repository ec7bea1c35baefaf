//! `vhost-user-blk`: serves one disk to any vhost-user frontend (QEMU `vhost-user-blk-pci`,
//! Cloud Hypervisor, libblkio) with this project's virtio-blk data plane.
//!
//! ```text
//! vhost-user-blk --socket /run/disk0.sock \
//!     --disk path=/img.raw,cache=none,aio=io_uring,num_queues=2 \
//!     --iothread id=io0,poll_max_ns=32768 --counters /run/disk0.json \
//!     --api-socket /run/disk0.api
//! ```

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::Duration;

use clap::Parser;
use devices::config::kv::{DISK_HINTS, IOTHREAD_HINTS, parse_kv_with};
use devices::config::{DiskConfig, IoThreadConfig};
use devices::vhost_user_blk::{Backend, BackendConfig, bind, serve};
use serde_json::Value;
use vmm_sys_util::eventfd::EventFd;

/// Serve one disk over vhost-user-blk.
#[derive(Parser, Debug)]
#[command(name = "vhost-user-blk", version, after_help = AFTER_HELP)]
struct Args {
    /// Unix socket to listen on (a stale socket there is replaced).
    #[arg(long, value_name = "PATH")]
    socket: PathBuf,
    /// The disk as key=value,... (path=, readonly=, cache=, aio=, num_queues=, queue_size=,
    /// serial=, discard=, iothread=, throttle.LIMIT=N, null_size= with path=null, id=).
    #[arg(
        long,
        value_name = "KEY=VALUE,...",
        conflicts_with = "disk_json",
        required_unless_present = "disk_json"
    )]
    disk: Option<String>,
    /// The disk as JSON (the VM config's disk object).
    #[arg(long, value_name = "JSON")]
    disk_json: Option<String>,
    /// An iothread as key=value,... (id=, poll_max_ns=, poll_grow=, poll_shrink=,
    /// aio_max_batch=, cpu_affinity=1:3). Repeatable.
    #[arg(long, value_name = "KEY=VALUE,...")]
    iothread: Vec<String>,
    /// An iothread as JSON. Repeatable.
    #[arg(long, value_name = "JSON")]
    iothread_json: Vec<String>,
    /// Write the counters as JSON to this file every second and at exit.
    #[arg(long, value_name = "FILE")]
    counters: Option<PathBuf>,
    /// Serve the disk-level API here (a Unix socket, created 0600): `disk.info`,
    /// `disk.counters`, `disk.update`, `iothread.update`, `disk.mirror`, `jobs`,
    /// `job-complete`, `job-cancel`, `job-set-speed`, `events` under `/api/v1/`.
    #[arg(long, value_name = "PATH")]
    api_socket: Option<PathBuf>,
    /// Exit after the first frontend disconnects.
    #[arg(long)]
    once: bool,
}

const AFTER_HELP: &str = "\
A disk that names no iothread gets a dedicated one; when exactly one --iothread is given \
and the disk names none, the disk uses it. SIGTERM or SIGINT closes the connection, waits \
for in-flight requests and exits. Logging: RUST_LOG (default info).";

/// The stop eventfd, for the signal handler (-1 before it exists).
static STOP_FD: AtomicI32 = AtomicI32::new(-1);

extern "C" fn on_signal(_signal: libc::c_int) {
    let fd = STOP_FD.load(Ordering::Relaxed);
    if fd >= 0 {
        let one: u64 = 1;
        // SAFETY: write(2) is async-signal-safe; it reads 8 bytes from a live local.
        unsafe { libc::write(fd, (&raw const one).cast(), 8) };
    }
}

fn install_signal_handlers(stop: &EventFd) {
    use std::os::fd::AsRawFd;
    STOP_FD.store(stop.as_raw_fd(), Ordering::Relaxed);
    for sig in [libc::SIGTERM, libc::SIGINT] {
        // SAFETY: an all-zero sigaction is valid; we set the handler and an empty mask.
        let mut sa: libc::sigaction = unsafe { std::mem::zeroed() };
        sa.sa_sigaction = on_signal as *const () as libc::sighandler_t;
        sa.sa_flags = libc::SA_RESTART;
        // SAFETY: sigemptyset initializes the mask we own; sigaction reads `sa`.
        unsafe {
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(sig, &sa, std::ptr::null_mut());
        }
    }
}

fn parse_disk(args: &Args) -> Result<DiskConfig, String> {
    let mut map = match (&args.disk, &args.disk_json) {
        (Some(kv), None) => parse_kv_with(kv, &DISK_HINTS).map_err(|e| format!("--disk: {e}"))?,
        (None, Some(json)) => match serde_json::from_str::<Value>(json) {
            Ok(Value::Object(m)) => m,
            Ok(_) => return Err("--disk-json: expected a JSON object".into()),
            Err(e) => return Err(format!("--disk-json: {e}")),
        },
        _ => return Err("give one of --disk or --disk-json".into()),
    };
    map.entry("id")
        .or_insert_with(|| Value::String("disk0".into()));
    serde_json::from_value(Value::Object(map)).map_err(|e| format!("--disk: {e}"))
}

fn parse_iothreads(args: &Args) -> Result<Vec<IoThreadConfig>, String> {
    let mut out = Vec::new();
    for kv in &args.iothread {
        let map = parse_kv_with(kv, &IOTHREAD_HINTS).map_err(|e| format!("--iothread: {e}"))?;
        out.push(
            serde_json::from_value(Value::Object(map))
                .map_err(|e| format!("--iothread {kv}: {e}"))?,
        );
    }
    for json in &args.iothread_json {
        out.push(serde_json::from_str(json).map_err(|e| format!("--iothread-json: {e}"))?);
    }
    Ok(out)
}

/// A file removed when this is dropped.
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Writes the counters atomically (temp file, then rename).
fn write_counters(backend: &Backend, path: &Path) {
    let tmp = path.with_extension("tmp");
    let result = serde_json::to_vec_pretty(&backend.counters())
        .map_err(std::io::Error::other)
        .and_then(|json| std::fs::write(&tmp, json))
        .and_then(|()| std::fs::rename(&tmp, path));
    if let Err(e) = result {
        tracing::warn!(path = %path.display(), error = %e, "cannot write the counters");
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .init();

    let config = match parse_disk(&args).and_then(|disk| {
        let iothreads = parse_iothreads(&args)?;
        let config = BackendConfig { disk, iothreads };
        config.validate()?;
        Ok(config)
    }) {
        Ok(c) => c,
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "vhost-user-blk: {e}");
            return ExitCode::from(2);
        }
    };
    let fail = |e: String| {
        let _ = writeln!(std::io::stderr(), "vhost-user-blk: {e}");
        ExitCode::from(1)
    };
    // The API socket first: its mode is set through the process-wide umask.
    let api_listener = match args.api_socket.as_deref().map(api::disk_api::DiskApi::bind) {
        Some(Err(e)) => return fail(format!("--api-socket: {e}")),
        Some(Ok(l)) => Some(l),
        None => None,
    };
    // The API socket goes when the process does, whichever way it ends.
    let _api_file = args.api_socket.clone().map(RemoveOnDrop);
    let backend = match Backend::new(config) {
        Ok(b) => b,
        Err(e) => return fail(e),
    };
    let api = match api_listener.map(|l| api::disk_api::DiskApi::start(l, backend.clone())) {
        Some(Err(e)) => return fail(format!("--api-socket: {e}")),
        Some(Ok(a)) => Some(a),
        None => None,
    };
    let mut listener = match bind(&args.socket) {
        Ok(l) => l,
        Err(e) => return fail(e.to_string()),
    };
    let stop = match EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) {
        Ok(e) => e,
        Err(e) => return fail(format!("eventfd: {e}")),
    };
    install_signal_handlers(&stop);
    tracing::info!(socket = %args.socket.display(), "listening");

    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = args.counters.clone().map(|path| {
        let (backend, done) = (backend.clone(), done.clone());
        std::thread::spawn(move || {
            while !done.load(Ordering::Relaxed) {
                write_counters(&backend, &path);
                for _ in 0..10 {
                    if done.load(Ordering::Relaxed) {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        })
    });
    let result = serve(&backend, &mut listener, &stop, args.once);
    // A mirror still running ends (its target closed); then the API stops.
    backend.abandon_jobs();
    drop(api);
    done.store(true, Ordering::Relaxed);
    if let Some(w) = writer {
        let _ = w.join();
    }
    if let Some(path) = &args.counters {
        write_counters(&backend, path);
    }
    match result {
        Ok(()) => {
            tracing::info!("stopped");
            ExitCode::SUCCESS
        }
        Err(e) => fail(e.to_string()),
    }
}
