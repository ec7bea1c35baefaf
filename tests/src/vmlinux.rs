//! The uncompressed ELF `vmlinux` of the Debian cloud kernel, for the PVH boot tests.
//!
//! Debian's `bzImage` carries an LZ4 (legacy frame) compressed kernel. `lz4 -dc` applied to
//! the bytes from the legacy magic `02 21 4c 18` on gives the ELF `vmlinux`, which has the
//! PVH entry note (`XEN_ELFNOTE_PHYS32_ENTRY`). `lz4` stops with an error at the bytes
//! after the compressed stream; the output is checked instead of its exit status.
//!
//! ```text
//! let bz = vmlinux::find_bzimage().ok_or("no kernel")?;
//! let elf = vmlinux::extract(&bz, &target_dir.join("vmlinux"))?;   // cached
//! ```

#![allow(clippy::cast_possible_truncation)] // Offsets and sizes inside a kernel image of a few MiB.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// The legacy LZ4 frame magic (0x184C2102, little-endian).
pub const LZ4_LEGACY_MAGIC: [u8; 4] = [0x02, 0x21, 0x4c, 0x18];
/// ELF note type of the PVH 32-bit entry point.
pub const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;

/// The newest Debian cloud kernel in `/boot` (`vmlinuz-*-cloud-amd64`), if installed.
pub fn find_bzimage() -> Option<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir("/boot")
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("vmlinuz-") && n.ends_with("-cloud-amd64"))
        })
        .collect();
    found.sort_by_key(|p| version_key(&p.to_string_lossy()));
    found.pop()
}

fn version_key(s: &str) -> Vec<u64> {
    s.split(|c: char| !c.is_ascii_digit())
        .filter_map(|n| n.parse().ok())
        .collect()
}

/// The directory for cached extractions: `<target>/vmlinux`.
pub fn default_cache() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"))
        .join("vmlinux")
}

/// Extracts the ELF `vmlinux` from `bzimage` into the directory `cache` (created if
/// needed) and returns its path. A previous extraction of the same file (name, size and
/// modification time) is reused. Errors say what is missing or wrong.
pub fn extract(bzimage: &Path, cache: &Path) -> Result<PathBuf, String> {
    let meta = std::fs::metadata(bzimage).map_err(|e| format!("{}: {e}", bzimage.display()))?;
    let mtime = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_secs());
    let name = bzimage
        .file_name()
        .map_or_else(|| "kernel".into(), |n| n.to_string_lossy().into_owned());
    let out = cache.join(format!("{name}-{}-{mtime}.elf", meta.len()));
    if pvh_entry(&out).is_ok() {
        return Ok(out);
    }
    let lz4 = find_program("lz4").ok_or("lz4 missing (apt-get install lz4)")?;
    std::fs::create_dir_all(cache).map_err(|e| format!("{}: {e}", cache.display()))?;
    let data = std::fs::read(bzimage).map_err(|e| format!("{}: {e}", bzimage.display()))?;
    // Unique per process and per call: tests in one process extract concurrently, and a
    // shared temporary file would be truncated under another thread's reader.
    static CALLS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let call = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = cache.join(format!(".{name}.{}.{call}.tmp", std::process::id()));
    let mut last_err = format!(
        "{}: no LZ4 legacy stream (magic 02 21 4c 18) found",
        bzimage.display()
    );
    let starts = data
        .windows(4)
        .enumerate()
        .filter(|(_, w)| *w == LZ4_LEGACY_MAGIC)
        .map(|(i, _)| i);
    for start in starts {
        let stderr = run_lz4(&lz4, &data[start..], &tmp)?;
        match pvh_entry(&tmp) {
            Ok(_) => {
                std::fs::rename(&tmp, &out)
                    .map_err(|e| format!("renaming to {}: {e}", out.display()))?;
                return Ok(out);
            }
            Err(e) => {
                last_err = format!(
                    "{}: lz4 output from offset {start:#x} is not a PVH ELF ({e}); lz4 said: {}",
                    bzimage.display(),
                    stderr.trim()
                );
            }
        }
    }
    let _ = std::fs::remove_file(&tmp);
    Err(last_err)
}

/// `name` from `PATH`, if there. (This file is also compiled into `vmm`'s tests by path,
/// so it uses nothing else of this crate.)
fn find_program(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// Runs `lz4 -dc` on `input`, writing its output to `out`; returns its stderr.
fn run_lz4(lz4: &Path, input: &[u8], out: &Path) -> Result<String, String> {
    let file = File::create(out).map_err(|e| format!("{}: {e}", out.display()))?;
    let mut child = Command::new(lz4)
        .args(["-dc", "-"])
        .stdin(Stdio::piped())
        .stdout(file)
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("running {}: {e}", lz4.display()))?;
    let mut stdin = child.stdin.take().ok_or("lz4 has no stdin")?;
    let written = std::thread::scope(|s| {
        // lz4 may stop reading (trailing bytes); a broken pipe is expected then.
        let writer = s.spawn(move || {
            let _ = stdin.write_all(input);
        });
        let out = child.wait_with_output();
        let _ = writer.join();
        out
    });
    let output = written.map_err(|e| format!("waiting for lz4: {e}"))?;
    Ok(String::from_utf8_lossy(&output.stderr).into_owned())
}

/// The PVH entry point of the ELF at `path`: the descriptor of its
/// `XEN_ELFNOTE_PHYS32_ENTRY` note. Errors when it is no 64-bit ELF or has no such note.
pub fn pvh_entry(path: &Path) -> Result<u32, String> {
    let mut f = File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let len = f.metadata().map_err(|e| e.to_string())?.len();
    let mut eh = [0u8; 64];
    f.read_exact(&mut eh)
        .map_err(|_| "shorter than an ELF header")?;
    if eh[..5] != *b"\x7fELF\x02" {
        return Err("not a 64-bit ELF".into());
    }
    let phoff = u64_at(&eh, 32);
    let phnum = u64::from(u16::from_le_bytes([eh[56], eh[57]]));
    if u16::from_le_bytes([eh[54], eh[55]]) != 56 || phnum > 256 {
        return Err("bad program header table".into());
    }
    let mut table = vec![0u8; (phnum * 56) as usize];
    f.seek(SeekFrom::Start(phoff))
        .and_then(|_| f.read_exact(&mut table))
        .map_err(|_| "truncated program header table")?;
    let mut entry = None;
    for ph in table.chunks_exact(56) {
        let (ptype, offset, filesz) = (u32_at(ph, 0), u64_at(ph, 8), u64_at(ph, 32));
        let end = offset.checked_add(filesz);
        if ptype == 1 && end.is_none_or(|e| e > len) {
            return Err("a loadable segment runs past the end of the file (truncated)".into());
        }
        if entry.is_some() || ptype != 4 || filesz > 1 << 20 || end.is_none_or(|e| e > len) {
            continue;
        }
        let mut notes = vec![0u8; filesz as usize];
        f.seek(SeekFrom::Start(offset))
            .and_then(|_| f.read_exact(&mut notes))
            .map_err(|e| e.to_string())?;
        entry = find_pvh_note(&notes);
    }
    entry.ok_or_else(|| "no XEN_ELFNOTE_PHYS32_ENTRY note".into())
}

fn find_pvh_note(mut notes: &[u8]) -> Option<u32> {
    while notes.len() >= 12 {
        let namesz = u32_at(notes, 0) as usize;
        let descsz = u32_at(notes, 4) as usize;
        let ntype = u32_at(notes, 8);
        let name_end = 12 + namesz.next_multiple_of(4);
        let desc_end = name_end.checked_add(descsz.next_multiple_of(4))?;
        if desc_end > notes.len() {
            return None;
        }
        if ntype == XEN_ELFNOTE_PHYS32_ENTRY && notes[12..12 + namesz] == *b"Xen\0" && descsz >= 4 {
            return Some(u32_at(notes, name_end));
        }
        notes = &notes[desc_end..];
    }
    None
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
}

fn u64_at(b: &[u8], off: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[off..off + 8]);
    u64::from_le_bytes(a)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notes_are_parsed() {
        let mut n = Vec::new();
        for (ty, name, desc) in [
            (6u32, &b"Xen\0"[..], &b"linux\0\0\0"[..]),
            (18, b"Xen\0", &[0x50, 0x08, 0, 1]),
        ] {
            n.extend((name.len() as u32).to_le_bytes());
            n.extend((desc.len() as u32).to_le_bytes());
            n.extend(ty.to_le_bytes());
            n.extend(name);
            n.extend(desc);
        }
        assert_eq!(find_pvh_note(&n), Some(0x0100_0850));
        assert_eq!(find_pvh_note(&n[..n.len() - 1]), None);
        assert_eq!(find_pvh_note(&n[..24]), None);
    }
}
