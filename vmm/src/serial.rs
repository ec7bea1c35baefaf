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
    client: Option<UnixStream>,
}

impl SocketOutput {
    /// Listens on `path` (a stale socket file there is replaced).
    pub fn bind(path: &Path) -> io::Result<Self> {
        use std::os::unix::fs::FileTypeExt;
        if let Ok(m) = std::fs::symlink_metadata(path)
            && m.file_type().is_socket()
        {
            std::fs::remove_file(path)?;
        }
        let listener = UnixListener::bind(path)?;
        listener.set_nonblocking(true)?;
        Ok(SocketOutput {
            listener,
            path: path.to_path_buf(),
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
        let _ = std::fs::remove_file(&self.path);
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
    /// A file.
    File(File),
    /// A Unix socket's client.
    Socket(SocketOutput),
    /// The VMM's stdout.
    Stdout,
    /// Nowhere.
    Null,
}

impl SerialOutput {
    /// Opens the output a config names.
    pub fn open(config: &SerialConfig) -> Result<Self, SerialError> {
        Self::open_with(config, false)
    }

    /// Like [`SerialOutput::open`]; with `append`, a file output keeps what it holds
    /// (the console of a VM rebuilt for a reboot goes on after the previous boot's).
    pub fn open_with(config: &SerialConfig, append: bool) -> Result<Self, SerialError> {
        let path = |mode| config.path.as_deref().ok_or(SerialError::NoPath(mode));
        Ok(match config.mode {
            SerialMode::File => {
                let path = path("file")?;
                let file = if append {
                    std::fs::OpenOptions::new()
                        .create(true)
                        .append(true)
                        .open(path)
                } else {
                    File::create(path)
                };
                let file = file.map_err(|source| SerialError::File {
                    path: path.to_path_buf(),
                    source,
                })?;
                SerialOutput::File(file)
            }
            SerialMode::Socket => {
                let path = path("socket")?;
                let socket = SocketOutput::bind(path).map_err(|source| SerialError::Socket {
                    path: path.to_path_buf(),
                    source,
                })?;
                SerialOutput::Socket(socket)
            }
            SerialMode::Stdout => SerialOutput::Stdout,
            SerialMode::Null => SerialOutput::Null,
        })
    }
}

impl Write for SerialOutput {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            SerialOutput::File(f) => f.write(buf),
            SerialOutput::Socket(s) => s.write(buf),
            SerialOutput::Stdout => io::stdout().write(buf),
            SerialOutput::Null => Ok(buf.len()),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            SerialOutput::File(f) => f.flush(),
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

    /// A UART with the output a config names.
    pub fn from_config(config: &SerialConfig) -> Result<Self, SerialError> {
        Self::new(SerialOutput::open(config)?)
    }

    /// Like [`SerialDevice::from_config`], appending to a file output.
    pub fn from_config_appending(config: &SerialConfig) -> Result<Self, SerialError> {
        Self::new(SerialOutput::open_with(config, true)?)
    }

    /// The interrupt eventfd (IRQ 4), to be registered as an irqfd.
    pub fn irq_evt(&self) -> &EventFd {
        &self.uart.interrupt_evt().0
    }

    /// Queues input bytes for the guest to read; returns how many fit in the FIFO.
    pub fn enqueue_input(&mut self, input: &[u8]) -> usize {
        self.uart.enqueue_raw_bytes(input).unwrap_or_else(|e| {
            tracing::warn!("serial input: {e:?}");
            0
        })
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
    fn input_is_readable_by_the_guest() {
        let mut s = SerialDevice::new(SerialOutput::Null).unwrap();
        assert_eq!(s.enqueue_input(b"ok"), 2);
        let mut b = [0u8];
        s.read(COM1_BASE, THR, &mut b);
        assert_eq!(b, [b'o']);
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
}
