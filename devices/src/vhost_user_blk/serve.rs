//! Serving a [`Backend`] on a Unix socket: one `VhostUserDaemon` per frontend connection
//! (the library's daemon cannot take a second `SET_OWNER`), so a frontend that goes away
//! and comes back (QEMU's `reconnect=`, a new libblkio instance) is served afresh.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::FileTypeExt;
use std::path::Path;
use std::sync::Arc;

use vhost::vhost_user::Listener;
use vhost_user_backend::VhostUserDaemon;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::Backend;
use crate::virtio_blk::GuestMem;

/// Listens on `socket`, replacing a stale socket file there. Fails with a message naming
/// the path when its directory is missing, when something that is not a socket is in the
/// way, or when the socket cannot be created (permissions, a path too long).
pub fn bind(socket: &Path) -> io::Result<Listener> {
    let shown = socket.display();
    let parent = socket
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    if !parent.is_dir() {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!(
                "cannot listen on {shown}: directory {} does not exist",
                parent.display()
            ),
        ));
    }
    if let Ok(meta) = std::fs::symlink_metadata(socket)
        && !meta.file_type().is_socket()
    {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!("cannot listen on {shown}: it exists and is not a socket"),
        ));
    }
    Listener::new(socket, true).map_err(|e| {
        let kind = match &e {
            vhost::vhost_user::Error::SocketError(io) => io.kind(),
            _ => io::ErrorKind::Other,
        };
        io::Error::new(kind, format!("cannot listen on {shown}: {e}"))
    })
}

/// Which of two fds became readable.
enum Ready {
    First,
    Second,
}

/// Waits until `a` or `b` is readable (forever).
fn wait_either(a: RawFd, b: RawFd) -> io::Result<Ready> {
    loop {
        let mut fds = [
            libc::pollfd {
                fd: a,
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: b,
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: poll reads and writes only the two pollfds we pass.
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if rc < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if fds[1].revents != 0 {
            return Ok(Ready::Second);
        }
        if fds[0].revents != 0 {
            return Ok(Ready::First);
        }
    }
}

/// Whether `fd` is readable now.
fn is_readable(fd: RawFd) -> bool {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: poll reads and writes only the pollfd we pass.
    unsafe { libc::poll(&mut pfd, 1, 0) == 1 }
}

/// Serves frontends on `listener` one connection at a time until `stop` becomes readable
/// (it is not read, so other watchers see it too) or, with `once`, until the first
/// frontend goes away. Stopping closes the connection and drains in-flight requests.
pub fn serve(
    backend: &Arc<Backend>,
    listener: &mut Listener,
    stop: &EventFd,
    once: bool,
) -> io::Result<()> {
    loop {
        if let Ready::Second = wait_either(listener.as_raw_fd(), stop.as_raw_fd())? {
            return Ok(());
        }
        let mem = GuestMem::new(GuestMemoryMmap::new());
        let mut daemon =
            VhostUserDaemon::new("vhost-user-blk".into(), backend.clone(), mem.clone()).map_err(
                |e| io::Error::other(format!("cannot create the vhost-user daemon: {e}")),
            )?;
        if let Err(e) = backend.begin_session(&mem, daemon.get_epoll_handlers()) {
            backend.end_session();
            return Err(io::Error::other(format!(
                "cannot watch the iothreads' control eventfds: {e}"
            )));
        }
        if let Err(e) = daemon.start(listener) {
            tracing::warn!(error = %e, "accepting a frontend failed");
            backend.end_session();
            drop(daemon);
            // Do not spin on a listener that stays readable but cannot accept (EMFILE).
            std::thread::sleep(std::time::Duration::from_millis(100));
            continue;
        }
        let session = backend.count_session();
        tracing::info!(session, "frontend connected");
        let handle = daemon.shutdown_handle();
        let done = EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)?;
        let result = std::thread::scope(|s| {
            let watcher = s.spawn(|| {
                if let Ok(Ready::First) = wait_either(stop.as_raw_fd(), done.as_raw_fd())
                    && let Some(h) = &handle
                {
                    tracing::info!("stopping: closing the frontend connection");
                    h.shutdown();
                }
            });
            let result = daemon.wait();
            let _ = done.write(1);
            let _ = watcher.join();
            result
        });
        match result {
            Ok(()) => tracing::info!("frontend disconnected"),
            Err(vhost_user_backend::Error::HandleRequest(
                vhost::vhost_user::Error::Disconnected,
            )) => {
                tracing::info!("frontend disconnected")
            }
            Err(e) => tracing::warn!(error = %e, "frontend session ended"),
        }
        // Drain and drop the workers while the daemon's threads and fds still exist, then
        // let the daemon stop its threads.
        backend.end_session();
        drop(daemon);
        if once || is_readable(stop.as_raw_fd()) {
            return Ok(());
        }
    }
}
