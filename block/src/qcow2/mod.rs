//! qcow2 images (docs/architecture.md) through the `imago` library,
//! asynchronous on the disk's iothread: [`Qcow2Image`] is the open image (its backing
//! chain of qcow2 and raw files included), [`Qcow2Engine`] the engine of each of its
//! queues, [`EngineStorage`] the files as imago sees them.
//!
//! What imago does not check the way a VMM must is checked here before it opens
//! anything ([`header`]): encryption, external data files, extended L2 entries,
//! compression other than zlib, the dirty and corrupt bits, a backing file without a
//! backing format, a backing chain that loops or runs too deep.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use imago::format::Format;
use imago::format::gate::ImplicitOpenGate;
use imago::io_buffers::{IoVector, IoVectorMut};
use imago::qcow2::Qcow2;
use imago::{FormatAccess, FormatDriverBuilder, StorageOpenOptions};
use serde::{Deserialize, Serialize};

use crate::disk::Disk;
use crate::error::Error;

mod create;
mod direct;
mod engine;
mod executor;
pub mod header;
mod storage;

pub use create::create;
pub use direct::Learned;
pub use engine::Qcow2Engine;
pub use storage::EngineStorage;

/// The largest buffer of zeroes written at once where a version 2 image has no zero
/// clusters.
const ZERO_CHUNK: u64 = 1 << 20;

/// The deepest backing chain opened (the image itself not counted).
pub const MAX_CHAIN: usize = 32;

/// An image's format, as the `format` field of a disk names it. Never probed: a raw
/// image whose guest wrote a qcow2 header stays raw.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum ImageFormat {
    /// The file is the disk, byte for byte. The default.
    #[default]
    Raw,
    /// qcow2 (version 2 or 3), with its backing chain.
    Qcow2,
}

impl ImageFormat {
    /// The name used in configs.
    pub fn as_str(self) -> &'static str {
        match self {
            ImageFormat::Raw => "raw",
            ImageFormat::Qcow2 => "qcow2",
        }
    }
}

impl std::fmt::Display for ImageFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for ImageFormat {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "raw" => Ok(ImageFormat::Raw),
            "qcow2" => Ok(ImageFormat::Qcow2),
            _ => Err(format!("unknown image format {s:?}; expected raw or qcow2")),
        }
    }
}

/// An open qcow2 image, shared by the queues of its disk.
pub struct Qcow2Image {
    access: FormatAccess<EngineStorage>,
    /// Discards and write-zeroes take it exclusively: they may free or zero clusters
    /// that a concurrent request has mapped already (imago's rule for its `_unsafe`
    /// discard; the queues' direct path, which holds it shared per request).
    discard: Arc<tokio::sync::RwLock<()>>,
    /// Bumped (under `discard`, exclusively) before clusters may be freed or zeroed:
    /// what a queue learned of the mapping before is void (see [`direct`]).
    generation: AtomicU64,
    cluster_bits: u32,
    /// The image file's size as its storage keeps it (see `EngineStorage::size_counter`):
    /// the direct path grows it for its writes.
    file_size: Arc<AtomicU64>,
    size: u64,
    /// The qcow2 version (2 or 3).
    version: u32,
    /// The header cluster, L1 and refcount tables (offset, length) at open.
    metadata: Vec<(u64, u64)>,
    chain: Vec<PathBuf>,
    /// The first backing file's format (`chain[0]`'s), from the header.
    backing_format: Option<ImageFormat>,
    /// Every file of the chain (the image first), for queues to make their engines
    /// for up front (an iothread may not be allowed to make one later).
    files: Vec<Arc<Disk>>,
}

impl std::fmt::Debug for Qcow2Image {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Qcow2Image")
            .field("size", &self.size)
            .field("chain", &self.chain)
            .finish_non_exhaustive()
    }
}

impl Qcow2Image {
    /// Opens the qcow2 image in `file` (an open disk; writable unless `file` is
    /// read-only) and its backing chain, each file read-only and locked shared, with the
    /// cache mode of `file`.
    pub fn open(file: Arc<Disk>) -> Result<Qcow2Image, Error> {
        let path = file.path().to_path_buf();
        let invalid = |msg: String| Error::Image {
            path: path.clone(),
            msg,
        };
        let info = header::read(&file).map_err(&invalid)?;
        let chain = header::chain(&path, &info).map_err(&invalid)?;
        let backing_format = info
            .backing
            .as_ref()
            .and_then(|(_, f)| f.parse::<ImageFormat>().ok());
        let writable = !file.readonly();
        let direct = file.cache().direct();
        let storage = EngineStorage::new(file.clone());
        let file_size = storage.size_counter();
        let opened = Arc::new(std::sync::Mutex::new(vec![file]));
        let gate = ChainGate {
            seen: vec![canonical(&path)],
            direct,
            opened: opened.clone(),
        };
        let access = futures::executor::block_on(async {
            let q = Qcow2::<EngineStorage>::builder(storage)
                .write(writable)
                .open(gate)
                .await?;
            Ok::<_, io::Error>(FormatAccess::new(q))
        })
        .map_err(|e| invalid(e.to_string()))?;
        let files = std::mem::take(&mut *crate::sync::lock(&opened));
        Ok(Qcow2Image {
            size: access.size(),
            access,
            discard: Arc::new(tokio::sync::RwLock::new(())),
            generation: AtomicU64::new(0),
            cluster_bits: info.cluster_bits,
            file_size,
            version: info.version,
            metadata: info.metadata.clone(),
            chain,
            backing_format,
            files,
        })
    }

    /// The disk's size (from the header).
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The backing files, nearest first.
    pub fn chain(&self) -> &[PathBuf] {
        &self.chain
    }

    /// The backing file (resolved, as opened) and its format, if the image has one.
    pub fn backing(&self) -> Option<(&Path, ImageFormat)> {
        Some((self.chain.first()?.as_path(), self.backing_format?))
    }

    /// The ranges of the disk whose data this image holds itself (allocated clusters,
    /// and clusters that read as zeroes whatever the backing file holds), not its
    /// backing chain: what a `sync: top` mirror copies. Runs with plain syscalls (the
    /// control plane), alongside the queues.
    pub fn top_ranges(&self) -> io::Result<Vec<(u64, u64)>> {
        futures::executor::block_on(async {
            let mut ranges: Vec<(u64, u64)> = Vec::new();
            let mut offset = 0;
            while offset < self.size {
                let (mapping, len) = self
                    .access
                    .get_shallow_mapping(offset, self.size - offset)
                    .await?;
                if len == 0 {
                    break;
                }
                let own = match mapping {
                    imago::ShallowMapping::Raw { .. } | imago::ShallowMapping::Special { .. } => {
                        true
                    }
                    imago::ShallowMapping::Zero { explicit, .. } => explicit,
                    imago::ShallowMapping::Eof { .. } => break,
                    // From the backing chain (and whatever later imago versions add:
                    // copying too little would lose data, so those count as ours).
                    imago::ShallowMapping::Indirect { .. } => false,
                    _ => true,
                };
                if own {
                    match ranges.last_mut() {
                        Some((start, l)) if *start + *l == offset => *l += len,
                        _ => ranges.push((offset, len)),
                    }
                }
                offset += len;
            }
            Ok(ranges)
        })
    }

    /// Every open file of the image (the image's own first, then its chain's).
    pub fn files(&self) -> &[Arc<Disk>] {
        &self.files
    }

    /// Reads `bufv` from guest offset `offset`; returns what the range's mapping
    /// showed of clusters held in place (for the queue's direct path).
    pub async fn read(&self, bufv: IoVectorMut<'_>, offset: u64) -> io::Result<Option<Learned>> {
        let _shared = self.discard.read().await;
        let len = bufv.len();
        self.access.readv(bufv, offset).await?;
        Ok(self.learn(offset, len).await)
    }

    /// Writes `bufv` at guest offset `offset` (allocating clusters as needed); returns
    /// what the range's mapping showed afterwards, as [`Qcow2Image::read`]. A write
    /// that an image's L2 entries would send into its own header cluster, L1 table or
    /// refcount table (a hostile or broken image) fails with EIO instead.
    pub async fn write(&self, bufv: IoVector<'_>, offset: u64) -> io::Result<Option<Learned>> {
        let _shared = self.discard.read().await;
        let len = bufv.len();
        self.refuse_metadata_overlap(offset, len).await?;
        self.access.writev(bufv, offset).await?;
        Ok(self.learn(offset, len).await)
    }

    /// Notes a write of the image file up to `end` that bypasses imago (the direct
    /// path), before it is submitted.
    pub(crate) fn grow_file(&self, end: u64) {
        self.file_size.fetch_max(end, Ordering::Relaxed);
    }

    /// The image's generation (see [`direct`]).
    pub(crate) fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// The lock discards take exclusively, shared, if nothing holds or waits for it
    /// exclusively.
    pub(crate) fn try_share(&self) -> Option<tokio::sync::OwnedRwLockReadGuard<()>> {
        self.discard.clone().try_read_owned().ok()
    }

    /// The first piece of `offset..offset + len`'s mapping, if the image's own file
    /// holds it in place, writable, and clear of the metadata the header named. Called
    /// with `discard` held shared, so the generation cannot change meanwhile.
    async fn learn(&self, offset: u64, len: u64) -> Option<Learned> {
        let generation = self.generation();
        let (mapping, n) = self.access.get_shallow_mapping(offset, len).await.ok()?;
        let imago::ShallowMapping::Raw {
            offset: host,
            writable: true,
            ..
        } = mapping
        else {
            return None;
        };
        let mask = (1u64 << self.cluster_bits) - 1;
        let within = offset & mask;
        if n == 0 || host & mask != within {
            return None;
        }
        let clusters = (within + n).div_ceil(mask + 1);
        let (guest, host) = (offset - within, host - within);
        let bytes = clusters << self.cluster_bits;
        let clear = !self
            .metadata
            .iter()
            .any(|(m, l)| host < m.saturating_add(*l) && *m < host.saturating_add(bytes));
        clear.then_some(Learned {
            generation,
            guest,
            host,
            clusters,
        })
    }

    /// Takes `discard` exclusively and voids what the queues learned of the mapping.
    async fn alone(&self) -> tokio::sync::RwLockWriteGuard<'_, ()> {
        let alone = self.discard.write().await;
        self.generation.fetch_add(1, Ordering::AcqRel);
        alone
    }

    /// EIO if writing guest range `offset..offset + len` in place would overwrite the
    /// metadata the header named at open.
    async fn refuse_metadata_overlap(&self, offset: u64, len: u64) -> io::Result<()> {
        let end = offset.saturating_add(len).min(self.size);
        let mut at = offset;
        while at < end {
            let (mapping, n) = self.access.get_shallow_mapping(at, end - at).await?;
            if n == 0 {
                break;
            }
            if let imago::ShallowMapping::Raw {
                offset: host,
                writable: true,
                ..
            } = mapping
                && let Some((m, l)) = self
                    .metadata
                    .iter()
                    .find(|(m, l)| host < m.saturating_add(*l) && *m < host.saturating_add(n))
            {
                tracing::error!(
                    chain = ?self.chain, guest = at, host, metadata = m, len = l,
                    "qcow2: an L2 entry points a guest cluster at the image's own metadata; the write is refused"
                );
                return Err(io::Error::from_raw_os_error(libc::EIO));
            }
            at += n;
        }
        Ok(())
    }

    /// Makes `offset..offset + len` read as zeroes.
    /// (Version 2 images have no zero clusters: zeroes are written there.)
    pub async fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        if self.version >= 3 {
            // Zero clusters: a mapping the queues learned may no longer hold.
            let _alone = self.alone().await;
            return self.access.write_zeroes(offset, len).await;
        }
        let _shared = self.discard.read().await;
        let zeroes = vec![0u8; usize::try_from(len.min(ZERO_CHUNK)).unwrap_or(0)];
        let mut at = offset;
        let end = offset.saturating_add(len);
        while at < end {
            let n = usize::try_from((end - at).min(ZERO_CHUNK)).unwrap_or(0);
            self.access.writev(IoVector::from(&zeroes[..n]), at).await?;
            at += n as u64;
        }
        Ok(())
    }

    /// Discards `offset..offset + len` (what reads back is unspecified; whole clusters
    /// are freed).
    /// (A version 2 image cannot free clusters this way: the discard, advisory, does
    /// nothing there.)
    pub async fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        if self.version < 3 {
            return Ok(());
        }
        let _alone = self.alone().await;
        // SAFETY: no other request of this image runs while we hold the lock
        // exclusively, so none holds a mapping the discard could invalidate.
        unsafe { self.access.discard_to_any_unsafe(offset, len) }.await
    }

    /// Writes imago's cached metadata back, then makes everything durable.
    pub async fn flush(&self) -> io::Result<()> {
        self.access.flush().await?;
        self.access.sync().await
    }

    /// Flushes with plain syscalls (closing the image off the data path).
    pub fn flush_now(&self) -> io::Result<()> {
        futures::executor::block_on(self.flush())
    }
}

impl Drop for Qcow2Image {
    /// imago keeps metadata it changed in its caches: written back when the image
    /// closes (the last queue let go of it), as a guest's flush would.
    fn drop(&mut self) {
        if let Err(e) = self.flush_now() {
            tracing::error!(chain = ?self.chain, error = %e, "qcow2: writing metadata back on close failed");
        }
    }
}

fn canonical(p: &Path) -> PathBuf {
    std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf())
}

/// Opens the backing chain: qcow2 and raw only, each file once, at most [`MAX_CHAIN`]
/// deep, read-only with the top image's cache mode.
#[derive(Clone)]
struct ChainGate {
    seen: Vec<PathBuf>,
    direct: bool,
    /// The files opened so far.
    opened: Arc<std::sync::Mutex<Vec<Arc<Disk>>>>,
}

impl ImplicitOpenGate<EngineStorage> for ChainGate {
    async fn open_format<F: FormatDriverBuilder<EngineStorage>>(
        &mut self,
        builder: F,
    ) -> io::Result<FormatAccess<EngineStorage>> {
        let path = builder
            .get_image_path()
            .ok_or_else(|| io::Error::other("a backing image without a file name"))?;
        let path = canonical(&path);
        if self.seen.contains(&path) {
            return Err(io::Error::other(format!(
                "the backing chain loops back to {}",
                path.display()
            )));
        }
        if self.seen.len() > MAX_CHAIN {
            return Err(io::Error::other(format!(
                "the backing chain is deeper than {MAX_CHAIN} images"
            )));
        }
        if !matches!(F::FORMAT, Format::Qcow2 | Format::Raw) {
            return Err(io::Error::other(format!(
                "backing image {}: only qcow2 and raw backing images are supported",
                path.display()
            )));
        }
        let mut next = self.clone();
        next.seen.push(path);
        let inner = Box::pin(builder.write(false).open(next)).await?;
        Ok(FormatAccess::new(inner))
    }

    async fn open_storage(&mut self, opts: StorageOpenOptions) -> io::Result<EngineStorage> {
        let opts = opts.write(false).direct(self.direct);
        let storage = <EngineStorage as imago::Storage>::open(opts).await?;
        crate::sync::lock(&self.opened).push(storage.disk().clone());
        Ok(storage)
    }
}
