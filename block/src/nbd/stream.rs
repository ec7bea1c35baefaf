//! The socket to an NBD server: connecting (TCP with a timeout, or a Unix socket), the
//! handshake under a deadline, and the transmission phase's vectored sends and receives
//! straight from and into the caller's buffers (guest memory), which survive partial
//! transfers and never raise SIGPIPE.

use std::io;
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use super::proto::{self, ExportInfo, NbdError};
use super::uri::NbdAddress;

/// How long connecting to a server may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the whole handshake may take once connected (a server dribbling its option
/// replies cannot stretch it).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// Where to connect, resolved once (a host name is looked up when the disk opens, so
/// that reconnecting needs no name service).
#[derive(Clone, Debug)]
pub enum Target {
    /// TCP addresses of the host, tried in order.
    Tcp(Vec<SocketAddr>),
    /// A Unix socket.
    Unix(std::path::PathBuf),
}

impl Target {
    /// Resolves `address` (a host name through the system's resolver).
    pub fn resolve(address: &NbdAddress) -> io::Result<Target> {
        match address {
            NbdAddress::Tcp { host, port } => {
                let addrs: Vec<SocketAddr> = (host.as_str(), *port).to_socket_addrs()?.collect();
                if addrs.is_empty() {
                    return Err(io::Error::new(
                        io::ErrorKind::NotFound,
                        format!("host {host} has no address"),
                    ));
                }
                Ok(Target::Tcp(addrs))
            }
            NbdAddress::Unix(path) => Ok(Target::Unix(path.clone())),
        }
    }

    /// Connects and runs the handshake for `export`; the socket is left blocking with no
    /// timeouts, in the transmission phase.
    pub fn connect(&self, export: &str) -> Result<(OwnedFd, ExportInfo), NbdError> {
        match self {
            Target::Tcp(addrs) => {
                let mut last = None;
                for addr in addrs {
                    match TcpStream::connect_timeout(addr, CONNECT_TIMEOUT) {
                        Ok(mut s) => {
                            s.set_nodelay(true)?;
                            let info = proto::handshake(&mut Deadline::new(&mut s), export)?;
                            s.set_read_timeout(None)?;
                            s.set_write_timeout(None)?;
                            return Ok((OwnedFd::from(s), info));
                        }
                        Err(e) => last = Some(e),
                    }
                }
                Err(NbdError::Io(last.unwrap_or_else(|| {
                    io::Error::new(io::ErrorKind::NotFound, "no address to connect to")
                })))
            }
            Target::Unix(path) => {
                let mut s = connect_unix(path)?;
                let info = proto::handshake(&mut Deadline::new(&mut s), export)?;
                s.set_read_timeout(None)?;
                s.set_write_timeout(None)?;
                Ok((OwnedFd::from(s), info))
            }
        }
    }
}

/// Connects to a Unix socket without blocking past [`CONNECT_TIMEOUT`] (a listener
/// whose backlog is full makes a blocking connect wait indefinitely).
fn connect_unix(path: &std::path::Path) -> io::Result<UnixStream> {
    let deadline = Instant::now() + CONNECT_TIMEOUT;
    let fd = loop {
        match crate::host_file::connect_unix_nonblocking(path) {
            Ok(fd) => break fd,
            // The backlog is full: try again shortly, up to the deadline.
            Err(e) if e.raw_os_error() == Some(libc::EAGAIN) && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "the server does not accept connections (backlog full)",
                ));
            }
            Err(e) => return Err(e),
        }
    };
    // Blocking from here on; the handshake has its own deadline.
    // SAFETY: F_GETFL/F_SETFL on our own descriptor.
    let rc = unsafe {
        let flags = libc::fcntl(fd.as_raw_fd(), libc::F_GETFL);
        if flags < 0 {
            flags
        } else {
            libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags & !libc::O_NONBLOCK)
        }
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(UnixStream::from(fd))
}

/// Sockets whose reads and writes can be given a timeout.
trait Timeouts {
    fn set_timeouts(&self, t: Duration) -> io::Result<()>;
}

impl Timeouts for TcpStream {
    fn set_timeouts(&self, t: Duration) -> io::Result<()> {
        self.set_read_timeout(Some(t))?;
        self.set_write_timeout(Some(t))
    }
}

impl Timeouts for UnixStream {
    fn set_timeouts(&self, t: Duration) -> io::Result<()> {
        self.set_read_timeout(Some(t))?;
        self.set_write_timeout(Some(t))
    }
}

/// A socket whose every read and write must end by one deadline ([`HANDSHAKE_TIMEOUT`]
/// from now): each call gets the time that is left.
struct Deadline<'a, S> {
    s: &'a mut S,
    until: Instant,
}

impl<'a, S: Timeouts> Deadline<'a, S> {
    fn new(s: &'a mut S) -> Self {
        Deadline {
            s,
            until: Instant::now() + HANDSHAKE_TIMEOUT,
        }
    }

    fn arm(&self) -> io::Result<()> {
        let left = self.until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(Self::late());
        }
        self.s.set_timeouts(left)
    }

    fn late() -> io::Error {
        io::Error::new(
            io::ErrorKind::TimedOut,
            format!(
                "the handshake took longer than {} s",
                HANDSHAKE_TIMEOUT.as_secs()
            ),
        )
    }

    /// A socket timeout (EAGAIN from `SO_RCVTIMEO`) is the deadline passing.
    fn timed(r: io::Result<usize>) -> io::Result<usize> {
        match r {
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                Err(Self::late())
            }
            other => other,
        }
    }
}

impl<S: Timeouts + io::Read> io::Read for Deadline<'_, S> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.arm()?;
        Self::timed(self.s.read(buf))
    }
}

impl<S: Timeouts + io::Write> io::Write for Deadline<'_, S> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.arm()?;
        Self::timed(self.s.write(buf))
    }

    fn flush(&mut self) -> io::Result<()> {
        self.s.flush()
    }
}

/// Drops the first `n` bytes of `iovs` (after a partial transfer).
pub fn advance(iovs: &mut Vec<libc::iovec>, mut n: usize) {
    let mut used = 0;
    for v in iovs.iter_mut() {
        if n == 0 {
            break;
        }
        if n >= v.iov_len {
            n -= v.iov_len;
            used += 1;
        } else {
            // SAFETY: `n < iov_len`, so the new base stays inside the same buffer.
            v.iov_base = unsafe { v.iov_base.cast::<u8>().add(n) }.cast();
            v.iov_len -= n;
            n = 0;
        }
    }
    iovs.drain(..used);
}

/// The most iovecs one `sendmsg`/`recvmsg` takes (`IOV_MAX`).
const IOV_MAX: usize = 1024;

/// Sends every byte `iovs` describes (consuming the list), however many calls it takes.
///
/// # Safety
/// Each iovec must describe readable memory that stays valid for the call.
pub unsafe fn send_all(fd: RawFd, iovs: &mut Vec<libc::iovec>) -> io::Result<()> {
    // SAFETY: our contract.
    match unsafe { send_loop(fd, iovs, 0) }? {
        true => Ok(()),
        // Only a nonblocking socket says so; ours is blocking here.
        false => Err(io::Error::from(io::ErrorKind::WouldBlock)),
    }
}

/// Sends what the socket takes without waiting (consuming that much of the list):
/// `Ok(true)` once everything is out, `Ok(false)` when the socket is full.
///
/// # Safety
/// As [`send_all`].
pub unsafe fn send_some(fd: RawFd, iovs: &mut Vec<libc::iovec>) -> io::Result<bool> {
    // SAFETY: our contract.
    unsafe { send_loop(fd, iovs, libc::MSG_DONTWAIT) }
}

/// `sendmsg` with `flags` (and MSG_NOSIGNAL: a closed peer is EPIPE, not SIGPIPE) until
/// the list is empty (`Ok(true)`) or the socket would block (`Ok(false)`).
///
/// # Safety
/// As [`send_all`].
unsafe fn send_loop(
    fd: RawFd,
    iovs: &mut Vec<libc::iovec>,
    flags: libc::c_int,
) -> io::Result<bool> {
    iovs.retain(|v| v.iov_len > 0);
    while !iovs.is_empty() {
        // SAFETY: an all-zero msghdr is valid; we set the iovec fields.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = iovs.as_mut_ptr();
        msg.msg_iovlen = iovs.len().min(IOV_MAX);
        // SAFETY: the iovecs describe readable memory (our caller's contract).
        let n = unsafe { libc::sendmsg(fd, &msg, libc::MSG_NOSIGNAL | flags) };
        if n < 0 {
            let e = io::Error::last_os_error();
            match e.kind() {
                io::ErrorKind::Interrupted => continue,
                io::ErrorKind::WouldBlock => return Ok(false),
                _ => return Err(e),
            }
        }
        advance(iovs, n.unsigned_abs());
    }
    Ok(true)
}

/// Receives exactly as many bytes as `iovs` describes (consuming the list); the peer
/// closing first is `UnexpectedEof`.
///
/// # Safety
/// Each iovec must describe writable memory that nobody else reads or writes during the
/// call.
pub unsafe fn recv_all(fd: RawFd, iovs: &mut Vec<libc::iovec>) -> io::Result<()> {
    iovs.retain(|v| v.iov_len > 0);
    while !iovs.is_empty() {
        // SAFETY: an all-zero msghdr is valid; we set the iovec fields.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = iovs.as_mut_ptr();
        msg.msg_iovlen = iovs.len().min(IOV_MAX);
        // SAFETY: the iovecs describe writable memory only we use now (our contract).
        let n = unsafe { libc::recvmsg(fd, &mut msg, libc::MSG_WAITALL) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the server closed the connection",
            ));
        }
        advance(iovs, n.unsigned_abs());
    }
    Ok(())
}

/// Receives into one buffer.
pub fn recv_buf(fd: RawFd, buf: &mut [u8]) -> io::Result<()> {
    let mut iovs = vec![libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    }];
    // SAFETY: the iovec describes `buf`, borrowed mutably for the call.
    unsafe { recv_all(fd, &mut iovs) }
}

/// Shuts both directions of the socket down, waking any thread blocked on it.
pub fn shutdown(fd: &OwnedFd) {
    // SAFETY: shutdown on a socket we own; errors (already shut down) do not matter.
    unsafe { libc::shutdown(fd.as_raw_fd(), libc::SHUT_RDWR) };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dribbling_server_cannot_stretch_the_handshake() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("slow.sock");
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let server = std::thread::spawn(move || {
            let Ok((mut s, _)) = listener.accept() else {
                return;
            };
            // The greeting one byte at a time, each well within a read timeout, forever.
            for b in super::super::proto::NBD_MAGIC.to_be_bytes().iter().cycle() {
                if std::io::Write::write_all(&mut s, &[*b]).is_err() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(400));
            }
        });
        let start = Instant::now();
        let err = Target::Unix(path.clone()).connect("x").unwrap_err();
        let took = start.elapsed();
        assert!(
            took < HANDSHAKE_TIMEOUT + Duration::from_secs(2),
            "{took:?}"
        );
        // 16 bytes would take 6.4 s: the deadline ends it first.
        assert!(err.to_string().contains("longer than"), "{err}");
        drop(server);
        // Nobody listening: a clear error at once.
        let gone = dir.path().join("gone.sock");
        let e = Target::Unix(gone).connect("x").unwrap_err();
        assert!(e.to_string().contains("No such file"), "{e}");
    }

    #[test]
    fn advance_cuts_whole_and_partial_buffers() {
        let a = [0u8; 10];
        let b = [0u8; 20];
        let mk = || {
            vec![
                libc::iovec {
                    iov_base: a.as_ptr() as *mut _,
                    iov_len: 10,
                },
                libc::iovec {
                    iov_base: b.as_ptr() as *mut _,
                    iov_len: 20,
                },
            ]
        };
        let mut v = mk();
        advance(&mut v, 10);
        assert_eq!(v.len(), 1);
        assert_eq!(v[0].iov_len, 20);
        let mut v = mk();
        advance(&mut v, 13);
        assert_eq!(v.len(), 1);
        assert_eq!(v[0].iov_len, 17);
        assert_eq!(v[0].iov_base as usize, b.as_ptr() as usize + 3);
        let mut v = mk();
        advance(&mut v, 30);
        assert!(v.is_empty());
    }

    #[test]
    fn send_and_receive_across_partial_transfers() {
        let (x, y) = UnixStream::pair().unwrap();
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let sender = {
            let data = data.clone();
            std::thread::spawn(move || {
                let mut iovs: Vec<libc::iovec> = data
                    .chunks(7000)
                    .map(|c| libc::iovec {
                        iov_base: c.as_ptr() as *mut _,
                        iov_len: c.len(),
                    })
                    .collect();
                // SAFETY: the iovecs point into `data`, alive for the call.
                unsafe { send_all(x.as_raw_fd(), &mut iovs) }.unwrap();
            })
        };
        let mut got = vec![0u8; data.len()];
        recv_buf(y.as_raw_fd(), &mut got).unwrap();
        sender.join().unwrap();
        assert!(got == data);
        // The peer is gone: a receive says so.
        let mut one = [0u8; 1];
        let e = recv_buf(y.as_raw_fd(), &mut one).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
    }
}
