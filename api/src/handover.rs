//! Handing open files to a VM process (docs/architecture.md): a sandboxed VM
//! process may open only the files its config named at start, so vmmd opens an image
//! hot plugged later and sends the descriptor over the process's `fd.sock`
//! (`SCM_RIGHTS`), naming the path it stands for; the process then uses it when it
//! opens that path ([`block::host_file::hand_over`]).
//!
//! One message per connection: the path's bytes with one descriptor; the answer is one
//! line, `ok` or `error: ...`.

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use vmm_sys_util::sock_ctrl_msg::ScmSocket;

/// Longest path accepted.
const MAX_PATH: usize = 4096;
/// How long either side waits for the other.
const TIMEOUT: Duration = Duration::from_secs(5);

/// Sends `file`, standing for `path`, to the VM process listening on `socket`.
pub fn send(socket: &Path, path: &Path, file: &File) -> std::io::Result<()> {
    let bytes = path.as_os_str().as_bytes();
    if bytes.is_empty() || bytes.len() > MAX_PATH {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "path too long to hand over",
        ));
    }
    let s = UnixStream::connect(socket)?;
    s.set_read_timeout(Some(TIMEOUT))?;
    s.set_write_timeout(Some(TIMEOUT))?;
    s.send_with_fd(bytes, file.as_raw_fd())
        .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))?;
    let mut answer = String::new();
    BufReader::new(&s).read_line(&mut answer)?;
    match answer.trim_end() {
        "ok" => Ok(()),
        other => Err(std::io::Error::other(format!(
            "the VM process refused the file: {other}"
        ))),
    }
}

/// Receives one handed-over file on `stream` and makes it the file of its path.
pub fn receive(stream: &UnixStream) -> Result<PathBuf, String> {
    let _ = stream.set_read_timeout(Some(TIMEOUT));
    let _ = stream.set_write_timeout(Some(TIMEOUT));
    let mut buf = vec![0u8; MAX_PATH];
    let result = match stream.recv_with_fd(&mut buf) {
        Ok((n, Some(file))) if n > 0 => {
            let path = PathBuf::from(std::ffi::OsStr::from_bytes(&buf[..n]));
            block::host_file::hand_over(path.clone(), file);
            Ok(path)
        }
        Ok(_) => Err("a path and one descriptor were expected".to_string()),
        Err(e) => Err(e.to_string()),
    };
    let line = match &result {
        Ok(_) => "ok\n".to_string(),
        Err(e) => format!("error: {e}\n"),
    };
    let mut w = stream;
    let _ = w.write_all(line.as_bytes());
    result
}

/// Serves `listener`: every file handed over on it is kept for its path. Runs on the
/// async runtime; each message is read off it.
pub async fn serve(listener: tokio::net::UnixListener) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let Ok(stream) = stream.into_std() else {
            continue;
        };
        let _ = stream.set_nonblocking(false);
        tokio::task::spawn_blocking(move || match receive(&stream) {
            Ok(path) => tracing::info!(path = %path.display(), "file handed over"),
            Err(e) => tracing::warn!(error = %e, "a file handover failed"),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_handed_over_is_used_for_its_path() {
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().join("image.raw");
        std::fs::write(&real, b"handed over").unwrap();
        // The name the receiver will know it by does not exist there.
        let named = dir.path().join("elsewhere.raw");
        let (a, b) = UnixStream::pair().unwrap();
        let file = File::open(&real).unwrap();
        let receiver = std::thread::spawn(move || receive(&b));
        // `send` connects by path; here the pair stands in for the connection.
        a.send_with_fd(named.as_os_str().as_bytes(), file.as_raw_fd())
            .unwrap();
        let mut answer = String::new();
        BufReader::new(&a).read_line(&mut answer).unwrap();
        assert_eq!(answer, "ok\n");
        assert_eq!(receiver.join().unwrap().unwrap(), named);
        let opened = block::host_file::open(&named, block::host_file::OpenFlags::READ).unwrap();
        assert_eq!(std::io::read_to_string(opened).unwrap(), "handed over");
        // Read-write is more than was handed over.
        let rw = block::host_file::OpenFlags {
            flags: libc::O_RDWR,
            mode: 0,
        };
        let err = block::host_file::open(&named, rw).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EACCES));
        block::host_file::forget_handed(&named);
        assert!(block::host_file::open(&named, block::host_file::OpenFlags::READ).is_err());
    }
}
