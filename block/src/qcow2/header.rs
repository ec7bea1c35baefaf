//! The checks a qcow2 header gets before imago opens it: what we cannot serve
//! (encryption, external data files, extended L2 entries, zstd), what must be repaired
//! first (the dirty and corrupt bits), what is ambiguous (a backing file without a
//! backing format: QEMU refuses to probe it, so do we), and a backing chain that loops
//! or runs deeper than [`super::MAX_CHAIN`].

use std::path::{Path, PathBuf};

use crate::bounce::AlignedBuf;
use crate::disk::Disk;
use crate::engine::{EngineOp, IoVecs, sync_ops};

/// The qcow2 magic, "QFI\xfb".
pub const MAGIC: u32 = 0x5146_49fb;
/// Header extension: the backing file's format.
const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
/// Header extension: external data file name.
const EXT_DATA_FILE: u32 = 0x4441_5441;
/// How much of the file the checks read (the header and its extensions live in the
/// first cluster; 4 KiB is enough for any sane image).
const READ: usize = 4096;

/// Incompatible feature bits.
const DIRTY: u64 = 1 << 0;
const CORRUPT: u64 = 1 << 1;
const EXTERNAL_DATA: u64 = 1 << 2;
const COMPRESSION_TYPE: u64 = 1 << 3;
const EXTENDED_L2: u64 = 1 << 4;

/// What the checks learned from a header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeaderInfo {
    /// 2 or 3.
    pub version: u32,
    /// The disk's size.
    pub size: u64,
    /// log2 of the cluster size.
    pub cluster_bits: u32,
    /// The backing file as named in the header, and its format.
    pub backing: Option<(String, String)>,
    /// Where the header cluster, the L1 table and the refcount table lie in the file
    /// (offset, length), as the header says at open.
    pub metadata: Vec<(u64, u64)>,
}

fn be32(b: &[u8], at: usize) -> u32 {
    b.get(at..at + 4)
        .and_then(|s| s.try_into().ok())
        .map_or(0, u32::from_be_bytes)
}

fn be64(b: &[u8], at: usize) -> u64 {
    b.get(at..at + 8)
        .and_then(|s| s.try_into().ok())
        .map_or(0, u64::from_be_bytes)
}

/// Reads the first bytes of `disk` (zeroes past its end).
fn first_bytes(disk: &Disk) -> Result<Vec<u8>, String> {
    let mut buf = AlignedBuf::new(READ, 4096).ok_or("out of memory")?;
    let iov = [buf.iovec()];
    // SAFETY: `iov` describes `buf`, which outlives the synchronous call.
    let iovecs = unsafe { IoVecs::new(iov.as_ptr(), 1) };
    let op = EngineOp::Read { offset: 0, iovecs };
    // SAFETY: as above.
    let n = unsafe { sync_ops::execute(disk, &op) };
    let n = usize::try_from(n)
        .map_err(|_| format!("cannot read the header: errno {}", -n))?
        .min(READ);
    let mut bytes = buf.as_slice().to_vec();
    bytes[n..].fill(0);
    Ok(bytes)
}

/// Checks the header of the qcow2 image in `disk` as the top of a chain.
pub fn read(disk: &Disk) -> Result<HeaderInfo, String> {
    check(&first_bytes(disk)?, disk.capacity(), true)
}

/// Checks header bytes `b` of a file of `file_size` bytes (`top`: the image the guest
/// writes, which must be clean).
pub fn check(b: &[u8], file_size: u64, top: bool) -> Result<HeaderInfo, String> {
    if be32(b, 0) != MAGIC {
        return Err("not a qcow2 image (no QFI\\xfb magic); use format raw for raw images".into());
    }
    let version = be32(b, 4);
    if !(2..=3).contains(&version) {
        return Err(format!(
            "qcow2 version {version} is not supported (2 and 3 are)"
        ));
    }
    let cluster_bits = be32(b, 20);
    if !(9..=21).contains(&cluster_bits) {
        return Err(format!(
            "cluster_bits {cluster_bits} is out of range (9 to 21)"
        ));
    }
    let size = be64(b, 24);
    if size > 1 << 56 {
        return Err(format!("a size of {size} bytes is absurd"));
    }
    if be32(b, 32) != 0 {
        return Err("encrypted qcow2 images are not supported".into());
    }
    tables(b, cluster_bits, file_size)?;
    let (incompatible, header_len) = if version == 3 {
        (
            be64(b, 72),
            usize::try_from(be32(b, 100)).unwrap_or(usize::MAX),
        )
    } else {
        (0, 72)
    };
    if !(72..=READ).contains(&header_len) {
        return Err(format!("header length {header_len} is out of range"));
    }
    if top && incompatible & CORRUPT != 0 {
        return Err(
            "the image is marked corrupt; check and repair it with `qemu-img check -r all`".into(),
        );
    }
    if top && incompatible & DIRTY != 0 {
        return Err("the image was not closed cleanly (dirty bit, lazy refcounts); repair it with `qemu-img check -r all` before use".into());
    }
    if incompatible & EXTERNAL_DATA != 0 {
        return Err("qcow2 images with an external data file are not supported".into());
    }
    if incompatible & EXTENDED_L2 != 0 {
        return Err("qcow2 images with extended L2 entries (subclusters) are not supported".into());
    }
    if incompatible & COMPRESSION_TYPE != 0 && header_len > 104 && b.get(104) != Some(&0) {
        return Err("only zlib compression is supported (this image uses zstd)".into());
    }
    let unknown =
        incompatible & !(DIRTY | CORRUPT | EXTERNAL_DATA | COMPRESSION_TYPE | EXTENDED_L2);
    if unknown != 0 {
        return Err(format!("unknown incompatible features {unknown:#x}"));
    }
    let backing_at = usize::try_from(be64(b, 8)).unwrap_or(usize::MAX);
    let backing_len = usize::try_from(be32(b, 16)).unwrap_or(usize::MAX);
    let backing = if backing_at == 0 {
        None
    } else {
        if backing_len == 0 || backing_len > 1023 {
            return Err(format!(
                "backing file name length {backing_len} is out of range"
            ));
        }
        let name = backing_at
            .checked_add(backing_len)
            .and_then(|end| b.get(backing_at..end))
            .ok_or("the backing file name lies past the first 4 KiB of the image")?;
        let name = String::from_utf8(name.to_vec())
            .map_err(|_| "the backing file name is not UTF-8".to_string())?;
        let format = extensions(b, (header_len + 7) & !7)?.ok_or_else(|| {
            format!("backing file {name} has no backing format in the header; name it with `qemu-img rebase -u -F raw|qcow2 -b {name} IMAGE`")
        })?;
        if format != "raw" && format != "qcow2" {
            return Err(format!(
                "backing file {name} has format {format}; only raw and qcow2 are supported"
            ));
        }
        Some((name, format))
    };
    let cluster = 1u64 << cluster_bits;
    let metadata = vec![
        (0, cluster),
        (be64(b, 40), u64::from(be32(b, 36)) * 8),
        (be64(b, 48), u64::from(be32(b, 56)) << cluster_bits),
    ];
    Ok(HeaderInfo {
        version,
        size,
        cluster_bits,
        backing,
        metadata,
    })
}

/// The L1 and refcount tables lie in the file, cluster-aligned, clear of the header.
fn tables(b: &[u8], cluster_bits: u32, file_size: u64) -> Result<(), String> {
    let cluster = 1u64 << cluster_bits;
    let table = |name: &str, offset: u64, bytes: Option<u64>| -> Result<(), String> {
        let end = bytes.and_then(|n| offset.checked_add(n));
        match end {
            _ if bytes == Some(0) => Ok(()),
            _ if offset < cluster => Err(format!("the {name} overlaps the header")),
            _ if !offset.is_multiple_of(cluster) => {
                Err(format!("the {name} is not cluster-aligned"))
            }
            Some(end) if end <= file_size => Ok(()),
            _ => Err(format!(
                "the {name} lies past the end of the file ({file_size} bytes): the image is truncated or broken"
            )),
        }
    };
    let l1_entries = u64::from(be32(b, 36));
    table("L1 table", be64(b, 40), l1_entries.checked_mul(8))?;
    let rc_clusters = u64::from(be32(b, 56));
    if rc_clusters == 0 {
        return Err("the image has no refcount table".into());
    }
    table(
        "refcount table",
        be64(b, 48),
        rc_clusters.checked_mul(cluster),
    )
}

/// Walks the header extensions from `at`; returns the backing format if named.
fn extensions(b: &[u8], mut at: usize) -> Result<Option<String>, String> {
    let mut format = None;
    loop {
        let (kind, len) = (
            be32(b, at),
            usize::try_from(be32(b, at + 4)).unwrap_or(usize::MAX),
        );
        if kind == 0 {
            return Ok(format);
        }
        let data = at
            .checked_add(8)
            .and_then(|s| s.checked_add(len).map(|e| (s, e)))
            .and_then(|(s, e)| b.get(s..e))
            .ok_or("a header extension runs past the first 4 KiB of the image")?;
        match kind {
            EXT_BACKING_FORMAT => {
                format = Some(String::from_utf8_lossy(data).into_owned());
            }
            EXT_DATA_FILE => {
                return Err("qcow2 images with an external data file are not supported".into());
            }
            _ => {}
        }
        at = at + 8 + ((len + 7) & !7);
    }
}

/// The backing files of the image at `path` whose header said `top`, nearest first,
/// each checked; a loop or a chain deeper than [`super::MAX_CHAIN`] is refused.
pub fn chain(path: &Path, top: &HeaderInfo) -> Result<Vec<PathBuf>, String> {
    let mut files = Vec::new();
    let mut seen = vec![super::canonical(path)];
    let mut base = path.to_path_buf();
    let mut next = top.backing.clone();
    while let Some((name, format)) = next.take() {
        let file = super::storage::resolve(&base, Path::new(&name)).map_err(|e| e.to_string())?;
        let canonical = super::canonical(&file);
        if seen.contains(&canonical) {
            return Err(format!(
                "the backing chain loops back to {}",
                file.display()
            ));
        }
        if files.len() >= super::MAX_CHAIN {
            return Err(format!(
                "the backing chain is deeper than {} images",
                super::MAX_CHAIN
            ));
        }
        seen.push(canonical);
        files.push(file.clone());
        if format == "qcow2" {
            let (bytes, size) = read_file_header(&file)?;
            let info = check(&bytes, size, false)
                .map_err(|e| format!("backing file {}: {e}", file.display()))?;
            next = info.backing;
        }
        base = file;
    }
    Ok(files)
}

/// The header of the qcow2 image at `path` (checked as a backing file would be) and its
/// backing chain, nearest first: for the service, which sees images without opening
/// them as disks.
pub fn inspect(path: &Path) -> Result<(HeaderInfo, Vec<PathBuf>), String> {
    let (bytes, size) = read_file_header(path)?;
    let info = check(&bytes, size, false)?;
    let chain = chain(path, &info)?;
    Ok((info, chain))
}

/// The backing files of the qcow2 image at `path`, nearest first (for the service to
/// let a sandboxed VM process open them, or hand them over); the checks a guest's
/// writable image needs come when it opens.
pub fn backing_files(path: &Path) -> Result<Vec<PathBuf>, String> {
    inspect(path).map(|(_, chain)| chain)
}

/// The first bytes of the file at `path` (zeroes past its end) and its size, read
/// with plain syscalls (a file handed over to a sandboxed process included).
fn read_file_header(path: &Path) -> Result<(Vec<u8>, u64), String> {
    use std::io::{Seek, SeekFrom};
    use std::os::unix::fs::FileExt;
    let how = crate::host_file::OpenFlags {
        flags: libc::O_RDONLY,
        mode: 0,
    };
    let mut file = crate::host_file::open(path, how)
        .map_err(|e| format!("backing file {}: {e}", path.display()))?;
    let size = file
        .seek(SeekFrom::End(0))
        .map_err(|e| format!("backing file {}: {e}", path.display()))?;
    let mut bytes = vec![0u8; READ];
    let mut got = 0;
    while got < READ {
        match file.read_at(&mut bytes[got..], got as u64) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(format!("backing file {}: {e}", path.display())),
        }
    }
    Ok((bytes, size))
}
