//! `vmm --config vm.json`: runs one VM from a JSON config file (ARCHITECTURE.md
//! section 7). `--check` only validates it.
//!
//! Exit status: 0 when the VM ran and shut down cleanly (or, with `--check`, the config is
//! valid), 2 for an invalid config, 1 for any other failure.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use vmm::config::VmConfig;
use vmm::vm::{ResetGuard, Vm, VmExit};

/// Runs one VM from a JSON config file.
#[derive(Debug, Parser)]
#[command(name = "vmm", version, about)]
struct Args {
    /// The VM config (JSON; see ARCHITECTURE.md section 7).
    #[arg(long, value_name = "FILE")]
    config: PathBuf,
    /// Only validate the config, then exit.
    #[arg(long)]
    check: bool,
}

/// Exit status for an invalid config.
const EXIT_INVALID_CONFIG: u8 = 2;

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("VMM_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let config = match VmConfig::from_file(&args.config) {
        Ok(config) => config,
        Err(e) => {
            let mut err = std::io::stderr().lock();
            let _ = writeln!(err, "error: {}: invalid VM config:", args.config.display());
            for problem in e.details() {
                let _ = writeln!(err, "  - {problem}");
            }
            return ExitCode::from(EXIT_INVALID_CONFIG);
        }
    };
    println!("config ok: {}", config.summary());
    if args.check {
        return ExitCode::SUCCESS;
    }
    run(config)
}

/// Boots the VM and waits for it to end; a guest reset boots it again from the config
/// (its console goes on in the same serial file), unless the guest resets too often
/// ([`ResetGuard`]).
fn run(config: VmConfig) -> ExitCode {
    let mut guard = ResetGuard::default();
    let mut rebooting = false;
    loop {
        let built = if rebooting {
            Vm::create_for_reboot(config.clone())
        } else {
            Vm::create(config.clone())
        };
        let mut vm = match built {
            Ok(vm) => vm,
            Err(e) => return fail("cannot create the VM", &e),
        };
        if let Err(e) = vm.boot() {
            return fail("cannot boot the VM", &e);
        }
        let exit = vm.wait();
        vm.shutdown();
        drop(vm);
        match exit {
            VmExit::Poweroff | VmExit::Stopped => {
                tracing::info!(id = %config.id, "VM powered off");
                return ExitCode::SUCCESS;
            }
            VmExit::Reset if guard.allow(std::time::Instant::now()) => {
                tracing::info!(id = %config.id, "guest reset: rebooting");
                rebooting = true;
            }
            VmExit::Reset => {
                let _ = writeln!(
                    std::io::stderr(),
                    "error: VM {} reset {} times within {} s: left shut down",
                    config.id,
                    vmm::vm::reset_guard::MAX_RESETS,
                    vmm::vm::reset_guard::RESET_WINDOW.as_secs()
                );
                return ExitCode::FAILURE;
            }
            VmExit::Error(e) => {
                let _ = writeln!(std::io::stderr(), "error: VM {} failed: {e}", config.id);
                return ExitCode::FAILURE;
            }
        }
    }
}

/// Prints `what` and `e` (whose message carries its causes) on stderr; returns the
/// failure status.
fn fail(what: &str, e: &dyn std::error::Error) -> ExitCode {
    let _ = writeln!(std::io::stderr(), "error: {what}: {e}");
    ExitCode::FAILURE
}
