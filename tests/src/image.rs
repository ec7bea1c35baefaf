//! Benchmark images: files filled with real (non-zero) data so reads hit the disk.

#![allow(clippy::cast_possible_truncation)] // Test image fill: a pattern byte and chunk sizes.

use std::fs::OpenOptions;
use std::io::{self, IsTerminal, Write};
use std::path::Path;

/// Parses sizes like `4096`, `64K`, `512M`, `1G` (powers of 1024).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m = match c.to_ascii_uppercase() {
                'K' => 1u64 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                'T' => 1 << 40,
                _ => return Err(format!("unknown size suffix in {s:?}; use K, M, G or T")),
            };
            (&s[..i], m)
        }
        _ => (s, 1),
    };
    let n: u64 = num.parse().map_err(|_| format!("not a size: {s:?}"))?;
    n.checked_mul(mult)
        .ok_or_else(|| format!("size too large: {s:?}"))
}

/// Makes sure `path` is a file of at least `size` bytes of written data, writing it with
/// a progress line on stderr when it is missing or short. Returns true when it wrote.
pub fn prepare(path: &Path, size: u64) -> io::Result<bool> {
    if std::fs::metadata(path).is_ok_and(|m| m.len() >= size) {
        return Ok(false);
    }
    let mut file = OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .open(path)?;
    let chunk: Vec<u8> = (0..1 << 20)
        .map(|i: u32| (i.wrapping_mul(2654435761) >> 13) as u8 | 1)
        .collect();
    // On a terminal the line counts up in place; in a log it is written once.
    let tty = io::stderr().is_terminal();
    if !tty {
        eprintln!("preparing {}: {} MiB", path.display(), size >> 20);
    }
    let mut done = 0;
    while done < size {
        let n = chunk.len().min((size - done) as usize);
        file.write_all(&chunk[..n])?;
        done += n as u64;
        if tty && (done.is_multiple_of(64 << 20) || done == size) {
            eprint!(
                "\rpreparing {}: {} / {} MiB",
                path.display(),
                done >> 20,
                size >> 20
            );
        }
    }
    file.sync_all()?;
    if tty {
        eprintln!();
    }
    Ok(true)
}

/// A sparse image `dir/name` of `mib` MiB (reads as zeros until written), for tests.
/// Panics with the path on failure: a test cannot go on without it.
pub fn sparse(dir: &Path, name: &str, mib: u64) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::File::create(&p)
        .and_then(|f| f.set_len(mib << 20))
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    p
}

/// What the qcow2 image at `image` holds as a disk (its backing chain included), read
/// by `qemu-img convert` into a raw file beside it, after `qemu-img check` found no
/// error in it (leaks included: an image closed cleanly has none). Panics saying why
/// otherwise: for tests, which judge our qcow2 output by QEMU's tools.
pub fn qcow2_bytes(image: &Path) -> Vec<u8> {
    let run = |args: &[&std::ffi::OsStr]| {
        let out = std::process::Command::new("qemu-img")
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("qemu-img: {e}"));
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(out.status.success(), "qemu-img {args:?}: {text}{out:?}");
        text
    };
    let check = run(&[
        "check".as_ref(),
        "-f".as_ref(),
        "qcow2".as_ref(),
        image.as_os_str(),
    ]);
    assert!(check.contains("No errors were found"), "{check}");
    let raw = image.with_extension("converted.raw");
    let _ = std::fs::remove_file(&raw);
    run(&[
        "convert".as_ref(),
        "-f".as_ref(),
        "qcow2".as_ref(),
        "-O".as_ref(),
        "raw".as_ref(),
        image.as_os_str(),
        raw.as_os_str(),
    ]);
    let data = std::fs::read(&raw).unwrap_or_else(|e| panic!("{}: {e}", raw.display()));
    let _ = std::fs::remove_file(&raw);
    data
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("64K"), Ok(65536));
        assert_eq!(parse_size("1g"), Ok(1 << 30));
        assert!(parse_size("12Q").is_err());
        assert!(parse_size("x").is_err());
    }
}
