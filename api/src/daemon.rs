//! What `vmmd` and a `vmm --api-socket` process share to serve the API: the socket
//! (created 0600, never over a live one), the runtime, and serving until `vmm.shutdown`
//! or a signal.

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};

use tokio::sync::watch;

/// How long serving waits, once told to stop, for requests still running (one may be
/// stuck on a hung mount) before it returns without them.
pub const GRACE: std::time::Duration = std::time::Duration::from_secs(1);

/// Errors of starting to serve.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// Another process answers on the socket.
    #[error("{path}: another service is serving on this socket")]
    InUse {
        /// The socket.
        path: PathBuf,
    },
    /// Something else is at the socket's path.
    #[error("{path}: exists and is not a socket")]
    NotSocket {
        /// The path.
        path: PathBuf,
    },
    /// A system call failed.
    #[error("{path}: {source}")]
    Io {
        /// What it was about.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// A closure turning an I/O error on `path` into a [`StartError`].
pub fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> StartError + '_ {
    move |source| StartError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Binds a Unix socket at `path` with mode 0600 (umask set around the bind, so it is
/// never wider), non-blocking. A stale socket is replaced; a live one is refused.
/// Call it before any other thread starts (the umask is process-wide).
pub fn bind_socket(path: &Path) -> Result<std::os::unix::net::UnixListener, StartError> {
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
    // SAFETY: umask only changes this process's file-creation mask; the caller starts no
    // other thread before this returns.
    let old = unsafe { libc::umask(0o177) };
    let bound = std::os::unix::net::UnixListener::bind(path);
    // SAFETY: as above; restores the previous mask.
    unsafe { libc::umask(old) };
    let listener = bound.map_err(io_err(path))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(io_err(path))?;
    listener.set_nonblocking(true).map_err(io_err(path))?;
    Ok(listener)
}

/// The multi-threaded runtime the API runs on.
pub fn runtime(workers: usize) -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .thread_name("api")
        .on_thread_start(|| block::thread_class::started(block::thread_class::ThreadClass::Api))
        .enable_all()
        .build()
}

/// Why serving ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stopped {
    /// `PUT vmm.shutdown`, or the owner set the shutdown flag.
    Asked,
    /// SIGTERM or SIGINT.
    Signal,
}

/// Serves `router` on `unix` (and `tcp`) until `stop` turns true (the router's
/// `vmm.shutdown` sets it) or SIGTERM/SIGINT arrives; then waits up to [`GRACE`] for
/// requests still running. Runs inside the runtime.
pub async fn serve_until_stopped(
    router: axum::Router,
    unix: std::os::unix::net::UnixListener,
    tcp: Option<std::net::TcpListener>,
    stop: watch::Sender<bool>,
) -> std::io::Result<Stopped> {
    let unix = tokio::net::UnixListener::from_std(unix)?;
    let tcp = match tcp {
        Some(l) => {
            l.set_nonblocking(true)?;
            Some(tokio::net::TcpListener::from_std(l)?)
        }
        None => None,
    };
    let (signalled_tx, signalled) = watch::channel(false);
    let flag = stop.clone();
    tokio::spawn(async move {
        termination().await;
        tracing::info!("signal received, stopping");
        signalled_tx.send_replace(true);
        flag.send_replace(true);
    });
    let rx = stop.subscribe();
    let mut stopped = rx.clone();
    let server = crate::server::serve(router, unix, tcp, rx);
    tokio::pin!(server);
    tokio::select! {
        r = &mut server => r?,
        () = async {
            let _ = stopped.wait_for(|s| *s).await;
            tokio::time::sleep(GRACE).await;
        } => tracing::warn!("requests still running after {GRACE:?}; going on without them"),
    }
    Ok(if *signalled.borrow() {
        Stopped::Signal
    } else {
        Stopped::Asked
    })
}

/// Returns once SIGTERM or SIGINT arrives.
pub async fn termination() {
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
        () = term => {}
    }
}

/// Sets up `tracing` on stderr, at the level of environment variable `var` (or
/// `default`).
pub fn init_tracing(var: &str, default: &str) {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env(var)
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default)),
        )
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
}
