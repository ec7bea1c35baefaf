//! A writer of "newc" cpio archives, the format the Linux kernel unpacks as an initramfs.
//!
//! Written here rather than by calling `cpio(1)` so that device nodes (`/dev/console`) and
//! root ownership can be recorded without privileges, and so that an archive can be built
//! from files scattered over the host under the names they will have in the guest.

use std::collections::BTreeSet;
use std::fs::File;
use std::io::{self, Read, Write};
use std::path::Path;

const S_IFDIR: u32 = 0o040_000;
const S_IFREG: u32 = 0o100_000;
const S_IFLNK: u32 = 0o120_000;
const S_IFCHR: u32 = 0o020_000;

/// Streams entries of a newc archive into `W`.
///
/// Parent directories of every entry are emitted on first use, so callers only name the
/// files they want. [`CpioWriter::finish`] writes the trailer; the archive length is always a
/// multiple of four, so further archives may be appended to the same file (the kernel unpacks
/// concatenated archives in order).
pub struct CpioWriter<W: Write> {
    out: W,
    written: u64,
    next_ino: u32,
    dirs: BTreeSet<String>,
}

impl<W: Write> CpioWriter<W> {
    /// Starts an archive written to `out`.
    pub fn new(out: W) -> Self {
        CpioWriter {
            out,
            written: 0,
            next_ino: 1,
            dirs: BTreeSet::new(),
        }
    }

    /// Adds a directory (and its parents).
    pub fn dir(&mut self, path: &str) -> io::Result<()> {
        let path = clean(path)?;
        self.parents(&path)?;
        if self.dirs.insert(path.clone()) {
            self.header(&path, S_IFDIR | 0o755, 0, (0, 0))?;
        }
        Ok(())
    }

    /// Adds a regular file with `data` as its content.
    pub fn file_bytes(&mut self, path: &str, mode: u32, data: &[u8]) -> io::Result<()> {
        let path = clean(path)?;
        self.parents(&path)?;
        self.header(&path, S_IFREG | (mode & 0o7777), data.len() as u64, (0, 0))?;
        self.out.write_all(data)?;
        self.written += data.len() as u64;
        self.pad()
    }

    /// Adds a regular file whose content is read from `host` (symlinks followed).
    pub fn file_from_host(&mut self, path: &str, mode: u32, host: &Path) -> io::Result<()> {
        let path = clean(path)?;
        self.parents(&path)?;
        let file = File::open(host)?;
        let len = file.metadata()?.len();
        self.header(&path, S_IFREG | (mode & 0o7777), len, (0, 0))?;
        let copied = io::copy(&mut file.take(len), &mut self.out)?;
        if copied != len {
            return Err(io::Error::other(format!(
                "{} shrank while being archived",
                host.display()
            )));
        }
        self.written += len;
        self.pad()
    }

    /// Adds a symbolic link at `path` pointing to `target`.
    pub fn symlink(&mut self, path: &str, target: &str) -> io::Result<()> {
        let path = clean(path)?;
        self.parents(&path)?;
        self.header(&path, S_IFLNK | 0o777, target.len() as u64, (0, 0))?;
        self.out.write_all(target.as_bytes())?;
        self.written += target.len() as u64;
        self.pad()
    }

    /// Adds a character device node.
    pub fn char_dev(&mut self, path: &str, major: u32, minor: u32) -> io::Result<()> {
        let path = clean(path)?;
        self.parents(&path)?;
        self.header(&path, S_IFCHR | 0o600, 0, (major, minor))
    }

    /// Writes the trailer, pads the archive to 512 bytes and returns the writer.
    pub fn finish(mut self) -> io::Result<W> {
        self.next_ino = 0;
        self.header("TRAILER!!!", 0, 0, (0, 0))?;
        let rem = (self.written % 512) as usize;
        if rem != 0 {
            self.out.write_all(&[0u8; 512][..512 - rem])?;
        }
        self.out.flush()?;
        Ok(self.out)
    }

    fn parents(&mut self, path: &str) -> io::Result<()> {
        let mut end = 0;
        while let Some(i) = path[end..].find('/') {
            let dir = &path[..end + i];
            end += i + 1;
            if !self.dirs.contains(dir) {
                self.dirs.insert(dir.to_string());
                self.header(dir, S_IFDIR | 0o755, 0, (0, 0))?;
            }
        }
        Ok(())
    }

    /// `rdev` is the (major, minor) device number of a device node.
    fn header(&mut self, name: &str, mode: u32, size: u64, rdev: (u32, u32)) -> io::Result<()> {
        let size = u32::try_from(size)
            .map_err(|_| io::Error::other(format!("{name}: too large for a newc archive")))?;
        let ino = self.next_ino;
        self.next_ino += 1;
        let nlink = if mode & S_IFDIR == S_IFDIR { 2 } else { 1 };
        let namesize = name.len() + 1;
        let header = format!(
            "070701{ino:08x}{mode:08x}{uid:08x}{gid:08x}{nlink:08x}{mtime:08x}{size:08x}\
             {devmajor:08x}{devminor:08x}{rmaj:08x}{rmin:08x}{namesize:08x}{check:08x}",
            uid = 0,
            gid = 0,
            mtime = 0,
            devmajor = 0,
            devminor = 0,
            rmaj = rdev.0,
            rmin = rdev.1,
            check = 0,
        );
        self.out.write_all(header.as_bytes())?;
        self.out.write_all(name.as_bytes())?;
        self.out.write_all(&[0])?;
        self.written += (header.len() + namesize) as u64;
        self.pad()
    }

    fn pad(&mut self) -> io::Result<()> {
        let rem = (self.written % 4) as usize;
        if rem != 0 {
            self.out.write_all(&[0u8; 4][..4 - rem])?;
            self.written += (4 - rem) as u64;
        }
        Ok(())
    }
}

/// Archive names are relative ("bin/sh"), without "." or ".." components.
fn clean(path: &str) -> io::Result<String> {
    let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
    if parts.is_empty() || parts.iter().any(|p| *p == "." || *p == "..") {
        return Err(io::Error::other(format!("bad archive path {path:?}")));
    }
    Ok(parts.join("/"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::{Command, Stdio};

    #[test]
    fn archive_lists_with_cpio_tool() {
        let mut w = CpioWriter::new(Vec::new());
        w.file_bytes("/a/b/c.txt", 0o644, b"hello").unwrap();
        w.symlink("/bin/sh", "busybox").unwrap();
        w.char_dev("/dev/console", 5, 1).unwrap();
        w.dir("/proc").unwrap();
        let bytes = w.finish().unwrap();
        assert_eq!(bytes.len() % 512, 0);
        assert!(bytes.starts_with(b"070701"));
        let Ok(mut child) = Command::new("cpio")
            .args(["-t", "-v", "--quiet"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
        else {
            crate::skip::skip("archive_lists_with_cpio_tool", "no cpio tool");
            return;
        };
        child.stdin.take().unwrap().write_all(&bytes).unwrap();
        let out = child.wait_with_output().unwrap();
        let list = String::from_utf8_lossy(&out.stdout);
        for want in [
            "a/b/c.txt",
            "bin/sh -> busybox",
            "dev/console",
            "a/b",
            "proc",
        ] {
            assert!(list.contains(want), "{want} missing from:\n{list}");
        }
        assert!(list.contains("crw-------"), "{list}");
        assert!(out.status.success());
    }
}
