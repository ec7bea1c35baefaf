//! `vmmd`: the REST service managing VMs over a Unix socket (docs/architecture.md). Each VM runs in a `vmm` process of its own, which vmmd starts, supervises and
//! routes calls to ([`api::supervisor`]).
//!
//! `PUT vmm.shutdown` shuts every VM down and exits; SIGTERM or SIGINT make vmmd exit and
//! leave the VMs running for the next vmmd on the same `--state-dir` to re-attach.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use api::backend::VmmBackend;
use api::daemon::{self, StartError, Stopped};
use api::events::EventBus;
use api::server::{AppState, router};
use api::supervisor::{ProcessBackend, Supervision};
use clap::Parser;

/// The VMM service.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Unix socket to serve on (created 0600) [default: $XDG_RUNTIME_DIR/vmmd.sock or
    /// /run/vmmd.sock].
    #[arg(long)]
    api_socket: Option<PathBuf>,
    /// Also serve on this TCP address, which must be a loopback address
    /// (e.g. 127.0.0.1:8080). There is no authentication: any local user can connect.
    #[arg(long)]
    tcp: Option<SocketAddr>,
    /// Run fake VM processes (`vmm --fake`, a test double that runs no guest) instead of
    /// KVM ones (the default). Everything else (routing, validation, processes) is real.
    #[arg(long)]
    fake: bool,
    /// Where each VM's directory (config, pid, socket, log) lives, created 0700
    /// [default: $XDG_RUNTIME_DIR/vmmd or /run/vmmd].
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,
    /// The `vmm` binary run for each VM [default: `vmm` beside this vmmd].
    #[arg(long, value_name = "PATH")]
    vmm_binary: Option<PathBuf>,
    /// Each VM process's seccomp filters (see `vmm --help`).
    #[arg(long, value_enum, default_value_t = api::sandbox::SeccompMode::True)]
    seccomp: api::sandbox::SeccompMode,
    /// A directory whose files clients may name (images, kernels, initramfs, serial
    /// output); repeatable. Given once or more, any other path is refused with 403, paths
    /// are stored resolved, and no symbolic link is followed when opening them.
    #[arg(long = "allowed-dir", value_name = "DIR")]
    allowed_dirs: Vec<PathBuf>,
}

/// Errors of starting vmmd.
#[derive(Debug, thiserror::Error)]
enum VmmdError {
    #[error("--tcp {0}: only loopback addresses are allowed")]
    NotLoopback(SocketAddr),
    #[error(transparent)]
    Start(#[from] StartError),
    #[error("{0}")]
    Setup(String),
}

fn runtime_dir() -> PathBuf {
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => PathBuf::from("/run"),
    }
}

/// `vmm` beside the running vmmd.
fn default_vmm_binary() -> Result<PathBuf, VmmdError> {
    let exe = std::env::current_exe()
        .map_err(|e| VmmdError::Setup(format!("cannot find this executable: {e}")))?;
    let vmm = exe.with_file_name("vmm");
    if vmm.is_file() {
        Ok(vmm)
    } else {
        Err(VmmdError::Setup(format!(
            "{} not found: build it (cargo build -p api) or name it with --vmm-binary",
            vmm.display()
        )))
    }
}

fn run(args: Args) -> Result<(), VmmdError> {
    if let Some(addr) = args.tcp
        && !addr.ip().is_loopback()
    {
        return Err(VmmdError::NotLoopback(addr));
    }
    if !args.fake && !vmm::kvm_available() {
        tracing::warn!(
            "/dev/kvm cannot be opened: VMs cannot be created (vm.create answers 409); \
             run with --fake to try the API without KVM"
        );
    }
    let vmm_binary = match args.vmm_binary {
        Some(p) => p,
        None => default_vmm_binary()?,
    };
    let path = args
        .api_socket
        .unwrap_or_else(|| runtime_dir().join("vmmd.sock"));
    let state_dir = args.state_dir.unwrap_or_else(|| runtime_dir().join("vmmd"));
    let unix = daemon::bind_socket(&path)?;
    let rules = api::paths::PathRules::new(&args.allowed_dirs, std::slice::from_ref(&path))
        .map_err(VmmdError::Setup)?;
    if rules.restricted() {
        block::host_file::forbid_symlinks();
        tracing::info!(dirs = ?rules.allowed(), "client paths restricted to the allowed directories");
    } else if !args.fake && running_as_root() {
        tracing::warn!(
            "running as root without --allowed-dir: any client of the API socket can attach \
             any host file (e.g. /etc/shadow) to a VM; restrict paths with --allowed-dir DIR"
        );
    }
    let tcp = match args.tcp {
        Some(addr) => Some(
            std::net::TcpListener::bind(addr).map_err(|source| StartError::Io {
                path: PathBuf::from(addr.to_string()),
                source,
            })?,
        ),
        None => None,
    };
    let rt = daemon::runtime(2).map_err(daemon::io_err(&path))?;
    let events = EventBus::new();
    let supervision = Supervision {
        state_dir: state_dir.clone(),
        vmm_binary,
        fake: args.fake,
        forbid_symlinks: rules.restricted(),
        seccomp: args.seccomp,
    };
    let backend: Arc<dyn VmmBackend> = Arc::new(
        ProcessBackend::new(supervision, events.clone(), rt.handle().clone())
            .map_err(VmmdError::Setup)?,
    );
    let result = rt.block_on(async {
        tracing::info!(socket = %path.display(), state_dir = %state_dir.display(), tcp = ?args.tcp,
            backend = backend.name(), "serving");
        let (stop, _) = tokio::sync::watch::channel(false);
        let state = AppState::new(backend.clone(), stop.clone())
            .with_rules(rules)
            .with_events(events);
        let how = daemon::serve_until_stopped(router(state), unix, tcp, stop).await?;
        if how == Stopped::Signal {
            tracing::info!("leaving the VM processes running for the next vmmd");
        }
        Ok::<(), std::io::Error>(())
    });
    // Blocking calls stuck in the kernel (an open() on a hung mount) must not keep the
    // process alive.
    rt.shutdown_timeout(std::time::Duration::from_millis(100));
    let _ = std::fs::remove_file(&path);
    result.map_err(|e| VmmdError::Start(daemon::io_err(&path)(e)))
}

/// Whether the service runs as root.
fn running_as_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

fn main() -> ExitCode {
    daemon::init_tracing("RUST_LOG", "info");
    match run(Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vmmd: {e}");
            ExitCode::FAILURE
        }
    }
}
