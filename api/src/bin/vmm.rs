//! `vmm`: one VM per process (docs/architecture.md).
//!
//! - `vmm --config vm.json` runs the VM until its guest powers off (a reset reboots it);
//!   `--check` only validates the config.
//! - `vmm --api-socket PATH [--config vm.json]` serves the single-VM API (the same
//!   handlers and JSON as vmmd, without `?id=`): `vm.create` over the socket, or the VM
//!   of `--config` created and booted at start. This is how vmmd runs each VM.
//!
//! Exit status: 0 when the VM ran and shut down in order (or, with `--check`, the config
//! is valid), 2 for an invalid config, 1 for any other failure (the guest failed or reset
//! too often, the VM could not be built). A panic anywhere aborts the process, so that a
//! broken VM never goes on half-alive.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use api::vm_process::{Options, RunError};
use clap::Parser;
use vmm::config::VmConfig;

/// Runs one VM.
#[derive(Debug, Parser)]
#[command(name = "vmm", version, about)]
struct Args {
    /// The VM config (JSON; the schema `VmConfig` of openapi.yaml).
    #[arg(long, value_name = "FILE", required_unless_present = "api_socket")]
    config: Option<PathBuf>,
    /// Only validate the config, then exit.
    #[arg(long, requires = "config")]
    check: bool,
    /// Serve the single-VM API on this Unix socket (created 0600).
    #[arg(long, value_name = "PATH")]
    api_socket: Option<PathBuf>,
    /// With --api-socket and --config: create the VM but do not boot it.
    #[arg(long, requires_all = ["api_socket", "config"])]
    no_boot: bool,
    /// With --config: when the VM is refused, write the API error (JSON with its HTTP
    /// status) here before exiting.
    #[arg(long, value_name = "FILE", requires = "config")]
    start_error: Option<PathBuf>,
    /// With --api-socket: receive the descriptors of images hot plugged later on this
    /// socket (SCM_RIGHTS; how vmmd hands them to a confined process).
    #[arg(long, value_name = "PATH", requires = "api_socket")]
    fd_socket: Option<PathBuf>,
    /// With --api-socket: end the process once the VM is shut down or deleted (without a
    /// socket it always does).
    #[arg(long, requires = "api_socket")]
    exit_on_shutdown: bool,
    /// Write the VM's last config and counters (JSON) here when the process ends in order.
    #[arg(long, value_name = "FILE")]
    last_state: Option<PathBuf>,
    /// Run the fake VM, a test double that runs no guest (for API tests).
    #[arg(long)]
    fake: bool,
    /// Never follow a symbolic link when opening a file the config names.
    #[arg(long)]
    forbid_symlinks: bool,
    /// With --api-socket: also serve on this TCP address, which must be a loopback
    /// address. There is no authentication: any local user can connect.
    #[arg(long, requires = "api_socket")]
    tcp: Option<std::net::SocketAddr>,
    /// With --api-socket: a directory whose files clients may name; repeatable. Given
    /// once or more, any other path is refused with 403 and no symbolic link is followed.
    #[arg(long = "allowed-dir", value_name = "DIR", requires = "api_socket")]
    allowed_dirs: Vec<PathBuf>,
    /// Seccomp filters per thread class: `true` ends the process on a syscall outside
    /// its thread's filter, `log` only logs it, `false` filters nothing.
    #[arg(long, value_enum, default_value_t = api::sandbox::SeccompMode::True)]
    seccomp: api::sandbox::SeccompMode,
    /// Do not confine file access with Landlock (by default a process given its VM with
    /// --config may open only the files that config names).
    #[arg(long)]
    no_landlock: bool,
}

/// Exit status for an invalid config.
const EXIT_INVALID_CONFIG: u8 = 2;

fn main() -> ExitCode {
    api::daemon::init_tracing("VMM_LOG", "warn");
    abort_on_panic();
    let args = Args::parse();
    if args.forbid_symlinks {
        block::host_file::forbid_symlinks();
    }
    let config = match args.config.as_deref().map(VmConfig::from_file).transpose() {
        Ok(config) => config,
        Err(e) => {
            let mut err = std::io::stderr().lock();
            let path = args
                .config
                .as_deref()
                .unwrap_or(std::path::Path::new(""))
                .display();
            let _ = writeln!(err, "error: {path}: invalid VM config:");
            for problem in e.details() {
                let _ = writeln!(err, "  - {problem}");
            }
            return ExitCode::from(EXIT_INVALID_CONFIG);
        }
    };
    if let Some(c) = &config {
        println!("config ok: {}", c.summary());
        if args.check {
            return ExitCode::SUCCESS;
        }
    }
    let opts = Options {
        api_socket: args.api_socket,
        fd_socket: args.fd_socket,
        tcp: args.tcp,
        allowed_dirs: args.allowed_dirs,
        config,
        boot: !args.no_boot,
        start_error: args.start_error,
        fake: args.fake,
        exit_on_shutdown: args.exit_on_shutdown,
        last_state: args.last_state,
        seccomp: args.seccomp,
        no_landlock: args.no_landlock,
    };
    match api::vm_process::run(opts) {
        Ok(ended) if ended.guest_failed() => {
            let why = ended
                .last_event
                .map(|e| serde_json::to_string(&e).unwrap_or_default())
                .unwrap_or_default();
            let _ = writeln!(std::io::stderr(), "error: the guest ended the VM: {why}");
            ExitCode::FAILURE
        }
        Ok(_) => ExitCode::SUCCESS,
        Err(RunError::Vm(e)) => {
            let mut err = std::io::stderr().lock();
            let _ = writeln!(err, "error: cannot start the VM: {e}");
            for d in &e.details {
                let _ = writeln!(err, "  - {d}");
            }
            ExitCode::FAILURE
        }
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Makes a panic on any thread (a vCPU, an iothread, the API) end the whole process after
/// printing it: the supervisor then reports the VM as crashed (SIGABRT).
fn abort_on_panic() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        default(info);
        std::process::abort();
    }));
}
