//! NBD servers from Debian packages for tests: `qemu-nbd` (package `qemu-utils`) and
//! `nbdkit` (package `nbdkit`) on a Unix socket (or a TCP port), started and waited for,
//! killed (and restartable) by the test.

use std::ffi::OsString;
use std::net::TcpListener;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Where `binary` is on PATH.
pub fn which(binary: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join(binary))
            .find(|p| p.is_file())
    })
}

/// Whether `binary` is on PATH; prints test `test`'s SKIP line with the apt line if not.
pub fn have(binary: &str, test: &str, package: &str) -> bool {
    let found = which(binary).is_some();
    if !found {
        crate::skip::skip(
            test,
            &format!("{binary} is missing (apt-get install {package})"),
        );
    }
    found
}

/// Where a server listens.
#[derive(Clone, Debug)]
pub enum Listen {
    /// A Unix socket.
    Unix(PathBuf),
    /// 127.0.0.1 at this port.
    Tcp(u16),
}

/// A running NBD server, killed when dropped.
pub struct NbdServer {
    program: String,
    args: Vec<OsString>,
    listen: Listen,
    export: String,
    child: Option<Child>,
}

/// A TCP port free at the moment of asking.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or_else(|e| panic!("no free port: {e}"))
}

impl NbdServer {
    /// `qemu-nbd` serving the raw `image` as `export` on `listen` (host page cache).
    pub fn qemu_nbd(image: &Path, export: &str, listen: Listen) -> NbdServer {
        NbdServer::qemu_nbd_with(image, export, listen, &["--cache=writeback"])
    }

    /// `qemu-nbd` as [`NbdServer::qemu_nbd`] with `extra` options (`--cache=none`,
    /// `--aio=native`, ...).
    pub fn qemu_nbd_with(image: &Path, export: &str, listen: Listen, extra: &[&str]) -> NbdServer {
        let mut args: Vec<OsString> = vec![
            "--format=raw".into(),
            "--persistent".into(),
            "--shared=8".into(),
            "--discard=unmap".into(),
            format!("--export-name={export}").into(),
        ];
        args.extend(extra.iter().map(OsString::from));
        match &listen {
            Listen::Unix(socket) => args.push(format!("--socket={}", socket.display()).into()),
            Listen::Tcp(port) => {
                args.push("--bind=127.0.0.1".into());
                args.push(format!("--port={port}").into());
            }
        }
        args.push(image.into());
        NbdServer::start("qemu-nbd", args, listen, export)
    }

    /// `nbdkit` with `plugin_and_filters` (e.g. `["--filter=error", "memory", "size=1M"]`)
    /// on `listen`; its export is the default one ("").
    pub fn nbdkit(plugin_and_filters: &[&str], listen: Listen) -> NbdServer {
        let mut args: Vec<OsString> = vec!["--foreground".into(), "--exit-with-parent".into()];
        match &listen {
            Listen::Unix(socket) => {
                args.push("--unix".into());
                args.push(socket.into());
            }
            Listen::Tcp(port) => {
                args.push("--ipaddr=127.0.0.1".into());
                args.push(format!("--port={port}").into());
            }
        }
        args.extend(plugin_and_filters.iter().map(OsString::from));
        NbdServer::start("nbdkit", args, listen, "")
    }

    fn start(program: &str, args: Vec<OsString>, listen: Listen, export: &str) -> NbdServer {
        let mut s = NbdServer {
            program: program.into(),
            args,
            listen,
            export: export.into(),
            child: None,
        };
        s.restart();
        s
    }

    /// The server's process id.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Where it listens.
    pub fn listen(&self) -> &Listen {
        &self.listen
    }

    /// The export name.
    pub fn export(&self) -> &str {
        &self.export
    }

    /// The server's URI.
    pub fn uri(&self) -> String {
        match &self.listen {
            Listen::Unix(socket) => {
                format!("nbd+unix:///{}?socket={}", self.export, socket.display())
            }
            Listen::Tcp(port) => format!("nbd://127.0.0.1:{port}/{}", self.export),
        }
    }

    fn listening(&self) -> bool {
        match &self.listen {
            Listen::Unix(socket) => UnixStream::connect(socket).is_ok(),
            Listen::Tcp(port) => std::net::TcpStream::connect(("127.0.0.1", *port)).is_ok(),
        }
    }

    /// Kills the server (SIGKILL) and waits for it.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if let Listen::Unix(socket) = &self.listen {
            let _ = std::fs::remove_file(socket);
        }
    }

    /// (Re)starts the server with its first arguments and waits until it listens.
    pub fn restart(&mut self) {
        self.kill();
        let child = Command::new(&self.program)
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("{} {:?}: {e}", self.program, self.args));
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.listening() {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                panic!("{} {:?} exited: {status}", self.program, self.args);
            }
            assert!(
                Instant::now() < deadline,
                "{} {:?} did not listen",
                self.program,
                self.args
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for NbdServer {
    fn drop(&mut self) {
        self.kill();
    }
}
