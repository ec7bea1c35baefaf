//! The 16550 UART at 0x3f8 (vm-superio's `Serial`), with its output going to a file, a
//! Unix socket, the VMM's stdout or nowhere. Its interrupt (IRQ 4) is an eventfd that the
//! KVM code registers as an irqfd.

use std::fs::File;
use std::io::{self, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use vm_superio::serial::NoEvents;
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use crate::bus::BusDevice;
use crate::config::{SerialConfig, SerialMode};

/// I/O port base of COM1.
pub const COM1_BASE: u64 = 0x3f8;
/// Number of ports of a 16550.
pub const COM1_LEN: u64 = 8;
/// The ISA interrupt of COM1.
pub const COM1_IRQ: u32 = 4;

/// Errors of setting up the serial port.
#[derive(Debug, thiserror::Error)]
pub enum SerialError {
    /// `file` or `socket` mode without a path.
    #[error("serial.path is required for mode {0}")]
    NoPath(&'static str),
    /// The output file could not be created.
    #[error("serial.path {path}: {source}")]
    File {
        /// The file.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// The path is not a regular file (a FIFO, a device, a directory).
    #[error("serial.path {path} is {kind}; serial output goes to a regular file (or a new one)")]
    NotRegular {
        /// The path.
        path: PathBuf,
        /// What it is.
        kind: &'static str,
    },
    /// The file is locked: a disk image someone has open, or another VM's console.
    #[error(
        "serial.path {path} is in use (locked) as a disk image or another VM's console; serial output must go to a file of its own"
    )]
    InUse {
        /// The path.
        path: PathBuf,
    },
    /// A live socket is at the path: another VM's console, or some other service.
    #[error(
        "serial.path {path}: a process is listening on this socket (another VM's console or a service); it is left alone"
    )]
    SocketInUse {
        /// The socket path.
        path: PathBuf,
    },
    /// Something other than a socket is at the path.
    #[error("serial.path {path} exists and is {kind}, not a socket; it is left alone")]
    NotSocket {
        /// The path.
        path: PathBuf,
        /// What it is.
        kind: &'static str,
    },
    /// The socket could not be bound.
    #[error("serial.path {path}: cannot listen: {source}")]
    Socket {
        /// The socket path.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// The interrupt eventfd could not be created.
    #[error("serial interrupt eventfd: {0}")]
    EventFd(io::Error),
}

/// The UART's interrupt line: an eventfd (an irqfd under KVM).
#[derive(Debug)]
pub struct IrqTrigger(EventFd);

impl Trigger for IrqTrigger {
    type E = io::Error;

    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// A Unix socket serving one client at a time; output is dropped while none is connected
/// or when the client does not keep up (the guest is never blocked).
#[derive(Debug)]
pub struct SocketOutput {
    listener: UnixListener,
    path: PathBuf,
    /// Device and inode of the socket file we bound: only that file is removed at the end.
    inode: (u64, u64),
    client: Option<UnixStream>,
}

impl SocketOutput {
    /// Listens on `path`. Something already there is replaced only when it is a stale
    /// socket (nobody listens on it); a live socket (another VM's console, a service's
    /// API socket) or any other file is an error and stays untouched.
    pub fn bind(path: &Path) -> Result<Self, SerialError> {
        use std::os::unix::fs::{FileTypeExt, MetadataExt};
        let io = |source| SerialError::Socket {
            path: path.to_path_buf(),
            source,
        };
        if let Ok(m) = std::fs::symlink_metadata(path) {
            let t = m.file_type();
            if !t.is_socket() {
                return Err(SerialError::NotSocket {
                    path: path.to_path_buf(),
                    kind: block::host_file::kind(&t),
                });
            }
            if someone_listens(path) {
                return Err(SerialError::SocketInUse {
                    path: path.to_path_buf(),
                });
            }
            tracing::info!(path = %path.display(), "removing a stale serial socket");
            match std::fs::remove_file(path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io(e)),
            }
        }
        let listener = UnixListener::bind(path).map_err(io)?;
        listener.set_nonblocking(true).map_err(io)?;
        let m = std::fs::symlink_metadata(path).map_err(io)?;
        Ok(SocketOutput {
            listener,
            path: path.to_path_buf(),
            inode: (m.dev(), m.ino()),
            client: None,
        })
    }

    /// Takes a waiting client when there is none.
    fn poll_client(&mut self) {
        if self.client.is_some() {
            return;
        }
        if let Ok((stream, _)) = self.listener.accept()
            && stream.set_nonblocking(true).is_ok()
        {
            tracing::debug!(path = %self.path.display(), "serial client connected");
            self.client = Some(stream);
        }
    }
}

impl Drop for SocketOutput {
    fn drop(&mut self) {
        // Only our own socket file: another may have taken the path since.
        use std::os::unix::fs::MetadataExt;
        if let Ok(m) = std::fs::symlink_metadata(&self.path)
            && (m.dev(), m.ino()) == self.inode
        {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Whether a process accepts connections on the Unix socket at `path`. The probe never
/// blocks (a full backlog counts as listening) and is closed at once.
fn someone_listens(path: &Path) -> bool {
    match block::host_file::connect_unix_nonblocking(path) {
        Ok(_) => true,
        // A path no socket can have is no socket of anyone's.
        Err(e) if e.kind() == io::ErrorKind::InvalidInput => false,
        // Refused: nobody listens (a stale socket). Anything else (a full backlog, no
        // permission, no descriptor to probe with) is not known to be stale.
        Err(e) => !matches!(
            e.raw_os_error(),
            Some(libc::ECONNREFUSED) | Some(libc::ENOENT)
        ),
    }
}

impl Write for SocketOutput {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.poll_client();
        if let Some(client) = &mut self.client {
            match client.write(buf) {
                Ok(0) => self.client = None,
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => self.client = None,
            }
        }
        // Dropped output still counts as written: the guest must not see errors.
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Where the UART's bytes go.
#[derive(Debug)]
pub enum SerialOutput {
    /// A file (appended to), and its path.
    File(File, PathBuf),
    /// A Unix socket's client.
    Socket(SocketOutput),
    /// The VMM's stdout.
    Stdout,
    /// Nowhere.
    Null,
}

impl SerialOutput {
    /// Opens the output a config names. A file is opened for appending and not
    /// truncated here ([`SerialOutput::start_fresh`] does that once the whole VM is
    /// built): a VM refused later must not have emptied anything. The file must be a
    /// regular file (or is created) that is not a disk image or console in use; the
    /// output holds an exclusive OFD lock on it for as long as it is open.
    pub fn open(config: &SerialConfig) -> Result<Self, SerialError> {
        let path = |mode| config.path.as_deref().ok_or(SerialError::NoPath(mode));
        Ok(match config.mode {
            SerialMode::File => {
                let path = path("file")?;
                let file_err = |source| SerialError::File {
                    path: path.to_path_buf(),
                    source,
                };
                let file = block::host_file::open(
                    path,
                    block::host_file::OpenFlags {
                        flags: libc::O_WRONLY | libc::O_CREAT | libc::O_APPEND,
                        mode: 0o640,
                    },
                )
                .map_err(file_err)?;
                let t = file.metadata().map_err(file_err)?.file_type();
                if !t.is_file() {
                    return Err(SerialError::NotRegular {
                        path: path.to_path_buf(),
                        kind: block::host_file::kind(&t),
                    });
                }
                // The console holds the file as a writable image would: no disk (of any
                // VM or program that locks images) and no other console can take it.
                if !block::host_file::try_lock(&file, true).map_err(file_err)? {
                    return Err(SerialError::InUse {
                        path: path.to_path_buf(),
                    });
                }
                SerialOutput::File(file, path.to_path_buf())
            }
            SerialMode::Socket => SerialOutput::Socket(SocketOutput::bind(path("socket")?)?),
            SerialMode::Stdout => SerialOutput::Stdout,
            SerialMode::Null => SerialOutput::Null,
        })
    }

    /// Empties a file output (a VM's first boot starts a new console log); other outputs
    /// are left as they are. The output holds the file's exclusive lock since it was
    /// opened, so no image can have taken the file meanwhile.
    pub fn start_fresh(&mut self) -> Result<(), SerialError> {
        let SerialOutput::File(file, path) = self else {
            return Ok(());
        };
        file.set_len(0).map_err(|source| SerialError::File {
            path: path.clone(),
            source,
        })
    }
}

impl Write for SerialOutput {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            SerialOutput::File(f, _) => f.write(buf),
            SerialOutput::Socket(s) => s.write(buf),
            SerialOutput::Stdout => io::stdout().write(buf),
            SerialOutput::Null => Ok(buf.len()),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            SerialOutput::File(f, _) => f.flush(),
            SerialOutput::Socket(s) => s.flush(),
            SerialOutput::Stdout => io::stdout().flush(),
            SerialOutput::Null => Ok(()),
        }
    }
}

/// COM1 as a port I/O bus device.
pub struct SerialDevice {
    uart: Serial<IrqTrigger, NoEvents, SerialOutput>,
}

impl std::fmt::Debug for SerialDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SerialDevice")
            .field("output", self.uart.writer())
            .finish()
    }
}

impl SerialDevice {
    /// A UART writing to `output`, raising its interrupt through a new eventfd.
    pub fn new(output: SerialOutput) -> Result<Self, SerialError> {
        let irq = EventFd::new(EFD_NONBLOCK).map_err(SerialError::EventFd)?;
        Ok(SerialDevice {
            uart: Serial::new(IrqTrigger(irq), output),
        })
    }

    /// A UART with the output a config names (a file output is appended to until
    /// [`SerialDevice::start_fresh`]).
    pub fn from_config(config: &SerialConfig) -> Result<Self, SerialError> {
        Self::new(SerialOutput::open(config)?)
    }

    /// Empties a file output: see [`SerialOutput::start_fresh`].
    pub fn start_fresh(&mut self) -> Result<(), SerialError> {
        self.uart.writer_mut().start_fresh()
    }

    /// The interrupt eventfd (IRQ 4), to be registered as an irqfd.
    pub fn irq_evt(&self) -> &EventFd {
        &self.uart.interrupt_evt().0
    }

    /// The output.
    pub fn output(&self) -> &SerialOutput {
        self.uart.writer()
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        let value = match u8::try_from(offset) {
            Ok(reg) if data.len() == 1 && offset < COM1_LEN => self.uart.read(reg),
            _ => 0xff,
        };
        data.fill(value);
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        let (Ok(reg), [value]) = (u8::try_from(offset), data) else {
            return;
        };
        if let Err(e) = self.uart.write(reg, *value) {
            tracing::debug!("serial write: {e:?}");
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Read;

    use super::*;

    const THR: u64 = 0;
    const IER: u64 = 1;
    const LSR: u64 = 5;

    fn file_serial(dir: &Path) -> (PathBuf, SerialDevice) {
        let path = dir.join("serial.log");
        let config = SerialConfig {
            mode: SerialMode::File,
            path: Some(path.clone()),
        };
        (path, SerialDevice::from_config(&config).unwrap())
    }

    #[test]
    fn thr_bytes_reach_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let (path, mut s) = file_serial(dir.path());
        for &b in b"hello, guest\n" {
            s.write(COM1_BASE, THR, &[b]);
        }
        assert_eq!(std::fs::read(&path).unwrap(), b"hello, guest\n");
        // Transmitter empty, and the line status says so.
        let mut lsr = [0u8];
        s.read(COM1_BASE, LSR, &mut lsr);
        assert_eq!(lsr[0] & 0x60, 0x60);
        // Wide or out-of-range accesses are ignored.
        s.write(COM1_BASE, THR, b"xy");
        let mut wide = [0u8; 2];
        s.read(COM1_BASE, THR, &mut wide);
        assert_eq!(wide, [0xff, 0xff]);
        assert_eq!(std::fs::read(&path).unwrap().len(), 13);
    }

    #[test]
    fn thr_empty_interrupt_signals_the_eventfd() {
        let dir = tempfile::tempdir().unwrap();
        let (_, mut s) = file_serial(dir.path());
        assert!(s.irq_evt().read().is_err(), "no interrupt yet");
        s.write(COM1_BASE, IER, &[0x02]);
        s.write(COM1_BASE, THR, b"a");
        assert!(s.irq_evt().read().unwrap() >= 1);
    }

    #[test]
    fn socket_output_drops_bytes_without_a_client() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("serial.sock");
        let config = SerialConfig {
            mode: SerialMode::Socket,
            path: Some(path.clone()),
        };
        let mut s = SerialDevice::from_config(&config).unwrap();
        s.write(COM1_BASE, THR, b"-");
        let mut client = UnixStream::connect(&path).unwrap();
        for &b in b"hi" {
            s.write(COM1_BASE, THR, &[b]);
        }
        drop(s);
        let mut got = Vec::new();
        client.read_to_end(&mut got).unwrap();
        assert_eq!(got, b"hi");
        assert!(!path.exists(), "socket file removed on drop");
    }

    #[test]
    fn missing_path_and_bad_file_are_errors() {
        let config = SerialConfig {
            mode: SerialMode::File,
            path: None,
        };
        assert!(matches!(
            SerialOutput::open(&config),
            Err(SerialError::NoPath("file"))
        ));
        let config = SerialConfig {
            mode: SerialMode::File,
            path: Some("/nonexistent/dir/serial.log".into()),
        };
        let err = SerialOutput::open(&config).unwrap_err().to_string();
        assert!(
            err.contains("serial.path /nonexistent/dir/serial.log"),
            "{err}"
        );
    }

    fn file_config(path: &Path) -> SerialConfig {
        SerialConfig {
            mode: SerialMode::File,
            path: Some(path.to_path_buf()),
        }
    }

    #[test]
    fn a_file_is_emptied_only_by_start_fresh() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("console.log");
        std::fs::write(&path, b"previous boot\n").unwrap();
        let mut s = SerialDevice::from_config(&file_config(&path)).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"previous boot\n");
        s.write(COM1_BASE, THR, b"a");
        assert_eq!(std::fs::read(&path).unwrap(), b"previous boot\na");
        s.start_fresh().unwrap();
        s.write(COM1_BASE, THR, b"b");
        assert_eq!(std::fs::read(&path).unwrap(), b"b");
    }

    #[test]
    fn an_image_in_use_is_never_a_serial_file() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("disk.raw");
        std::fs::write(&img, vec![7u8; 8192]).unwrap();
        let disk = block::Disk::open(&block::DiskOptions::new(&img)).unwrap();
        let err = SerialOutput::open(&file_config(&img)).unwrap_err();
        assert!(matches!(err, SerialError::InUse { .. }), "{err}");
        // Opened first, the console holds the file: no disk and no second console can
        // take it, read-only or not.
        drop(disk);
        let mut out = SerialOutput::open(&file_config(&img)).unwrap();
        for readonly in [false, true] {
            let err = block::Disk::open(&block::DiskOptions {
                readonly,
                ..block::DiskOptions::new(&img)
            })
            .unwrap_err();
            assert!(matches!(err, block::Error::Locked { .. }), "{err}");
        }
        assert!(matches!(
            SerialOutput::open(&file_config(&img)),
            Err(SerialError::InUse { .. })
        ));
        assert_eq!(std::fs::read(&img).unwrap(), vec![7u8; 8192]);
        out.start_fresh().unwrap();
        drop(out);
        assert!(block::Disk::open(&block::DiskOptions::new(&img)).is_ok());
        // Not a regular file.
        let err = SerialOutput::open(&file_config(Path::new("/dev/null"))).unwrap_err();
        assert!(err.to_string().contains("a character device"), "{err}");
    }

    #[test]
    fn only_a_stale_socket_is_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("console.sock");
        let config = SerialConfig {
            mode: SerialMode::Socket,
            path: Some(path.clone()),
        };
        // A live listener (another VM, a service's API socket) stays.
        let live = UnixListener::bind(&path).unwrap();
        let err = SerialOutput::open(&config).unwrap_err();
        assert!(matches!(err, SerialError::SocketInUse { .. }), "{err}");
        assert!(
            UnixStream::connect(&path).is_ok(),
            "the live socket survives"
        );
        // Once nobody listens, the stale socket is replaced.
        drop(live);
        let first = SerialOutput::open(&config).unwrap();
        // A second VM naming the same path is refused; the first keeps its socket.
        assert!(matches!(
            SerialOutput::open(&config),
            Err(SerialError::SocketInUse { .. })
        ));
        assert!(UnixStream::connect(&path).is_ok());
        // A path taken over by another socket is not removed when the first goes.
        std::fs::remove_file(&path).unwrap();
        let other = UnixListener::bind(&path).unwrap();
        drop(first);
        assert!(path.exists(), "another's socket is left alone");
        drop(other);
        // Not a socket: left alone.
        let file = dir.path().join("file");
        std::fs::write(&file, b"keep").unwrap();
        let err = SerialOutput::open(&SerialConfig {
            mode: SerialMode::Socket,
            path: Some(file.clone()),
        })
        .unwrap_err();
        assert!(matches!(err, SerialError::NotSocket { .. }), "{err}");
        assert_eq!(std::fs::read(&file).unwrap(), b"keep");
    }
}
