//! `vmmd`: the REST service managing VMs over a Unix socket (ARCHITECTURE.md section 7).

use std::net::SocketAddr;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use api::backend::VmmBackend;
use api::fake::FakeVmm;
use api::kvm_backend::KvmBackend;
use api::server::{AppState, router, serve};
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
    /// Use the in-memory fake VMM (a test double that runs no guest) instead of the KVM
    /// backend (the default).
    #[arg(long)]
    fake: bool,
    /// A directory whose files clients may name (images, kernels, initramfs, serial
    /// output); repeatable. Given once or more, any other path is refused with 403, paths
    /// are stored resolved, and no symbolic link is followed when opening them.
    #[arg(long = "allowed-dir", value_name = "DIR")]
    allowed_dirs: Vec<PathBuf>,
}

/// How long the service waits, once told to stop, for requests still running (one may be
/// stuck on a hung mount) before it exits without them.
const GRACE: std::time::Duration = std::time::Duration::from_secs(1);

/// Errors of starting the service.
#[derive(Debug, thiserror::Error)]
enum StartError {
    #[error("--tcp {0}: only loopback addresses are allowed")]
    NotLoopback(SocketAddr),
    #[error("{path}: another vmmd is serving on this socket")]
    InUse { path: PathBuf },
    #[error("{path}: exists and is not a socket")]
    NotSocket { path: PathBuf },
    #[error("{0}")]
    AllowedDir(String),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> StartError + '_ {
    move |source| StartError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn default_socket() -> PathBuf {
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir).join("vmmd.sock"),
        _ => PathBuf::from("/run/vmmd.sock"),
    }
}

/// Binds the socket with mode 0600 (umask set around the bind, so it is never wider).
fn bind_socket(path: &Path) -> Result<std::os::unix::net::UnixListener, StartError> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if !m.file_type().is_socket() => {
            return Err(StartError::NotSocket {
                path: path.to_path_buf(),
            });
        }
        Ok(_) => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(StartError::InUse {
                    path: path.to_path_buf(),
                });
            }
            std::fs::remove_file(path).map_err(io_err(path))?;
        }
        Err(_) => {}
    }
    // SAFETY: umask only changes this process's file-creation mask; no other thread is
    // running yet (the runtime starts after this).
    let old = unsafe { libc::umask(0o177) };
    let bound = std::os::unix::net::UnixListener::bind(path);
    // SAFETY: as above; restores the previous mask.
    unsafe { libc::umask(old) };
    let listener = bound.map_err(io_err(path))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(io_err(path))?;
    listener.set_nonblocking(true).map_err(io_err(path))?;
    Ok(listener)
}

fn run(args: Args) -> Result<(), StartError> {
    if let Some(addr) = args.tcp
        && !addr.ip().is_loopback()
    {
        return Err(StartError::NotLoopback(addr));
    }
    let backend: Arc<dyn VmmBackend> = if args.fake {
        Arc::new(FakeVmm::new())
    } else {
        if !vmm::kvm_available() {
            tracing::warn!(
                "/dev/kvm cannot be opened: VMs cannot be created (vm.create answers 409); \
                 run with --fake to try the API without KVM"
            );
        }
        Arc::new(KvmBackend::new())
    };
    let path = args.api_socket.unwrap_or_else(default_socket);
    let unix = bind_socket(&path)?;
    let rules = api::paths::PathRules::new(&args.allowed_dirs, std::slice::from_ref(&path))
        .map_err(StartError::AllowedDir)?;
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
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(io_err(&path))?;
    let result = rt.block_on(async {
        let unix = tokio::net::UnixListener::from_std(unix)?;
        let tcp = match tcp {
            Some(l) => {
                l.set_nonblocking(true)?;
                Some(tokio::net::TcpListener::from_std(l)?)
            }
            None => None,
        };
        let (tx, rx) = tokio::sync::watch::channel(false);
        let signals = tx.clone();
        tokio::spawn(async move {
            let term = async {
                match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                    Ok(mut s) => {
                        s.recv().await;
                    }
                    Err(_) => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term => {}
            }
            tracing::info!("signal received, shutting down");
            signals.send_replace(true);
        });
        tracing::info!(socket = %path.display(), tcp = ?args.tcp, backend = backend.name(), "serving");
        let state = AppState::new(backend.clone(), tx).with_rules(rules);
        let mut stopped = rx.clone();
        let server = serve(router(state), unix, tcp, rx);
        tokio::pin!(server);
        tokio::select! {
            r = &mut server => r?,
            () = async {
                let _ = stopped.wait_for(|s| *s).await;
                tokio::time::sleep(GRACE).await;
            } => tracing::warn!("requests still running after {GRACE:?}; exiting without them"),
        }
        // Shutting down on a signal: stop the VMs too (a VM still busy after a short wait,
        // such as one being built, is not waited for).
        let b = backend.clone();
        let _ = tokio::task::spawn_blocking(move || b.shutdown_vmm()).await;
        Ok::<(), std::io::Error>(())
    });
    // Blocking calls stuck in the kernel (an open() on a hung mount) must not keep the
    // process alive.
    rt.shutdown_timeout(std::time::Duration::from_millis(100));
    let _ = std::fs::remove_file(&path);
    result.map_err(io_err(&path))
}

/// Whether the service runs as root.
fn running_as_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    match run(Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vmmd: {e}");
            ExitCode::FAILURE
        }
    }
}
