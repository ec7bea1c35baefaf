//! [`EngineStorage`]: imago's `Storage` over one of our disks (the qcow2 file, or a file
//! of its backing chain). On an iothread serving the image (inside
//! [`super::executor::with_engines`]) each access is an op of that thread's engine for
//! the file, awaited without blocking; elsewhere (opening the image on the control
//! plane) it is a plain syscall.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use imago::io_buffers::{IoVector, IoVectorMut};
use imago::storage::drivers::CommonStorageHelper;
use imago::storage::{Storage, StorageOpenOptions};

use super::executor::{self, InFlight};
use crate::cache::CacheMode;
use crate::disk::{Disk, DiskOptions};
use crate::engine::{EngineOp, IoVecs, sync_ops};

/// Tells storages apart (which engine of a thread serves which file).
static NEXT_ID: AtomicUsize = AtomicUsize::new(1);

/// One file of a qcow2 image's chain, as imago sees it.
pub struct EngineStorage {
    disk: Arc<Disk>,
    id: usize,
    /// The file's size, grown by writes past its end (cluster allocation) as they are
    /// submitted: past it, nothing was ever written (see `pure_write_zeroes`). Shared
    /// with the image's direct path, which writes the file without us.
    size: Arc<AtomicU64>,
    helper: CommonStorageHelper,
    in_flight: Arc<InFlight>,
}

impl EngineStorage {
    /// Storage over `disk` (an open file or block device).
    pub fn new(disk: Arc<Disk>) -> EngineStorage {
        EngineStorage {
            size: Arc::new(AtomicU64::new(disk.capacity())),
            disk,
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            helper: CommonStorageHelper::default(),
            in_flight: Arc::default(),
        }
    }

    /// The file.
    pub fn disk(&self) -> &Arc<Disk> {
        &self.disk
    }

    /// This storage's id (unique in the process).
    pub fn id(&self) -> usize {
        self.id
    }

    /// Where the file's size is kept: whoever writes the file other than through this
    /// storage grows it (`fetch_max`) before the write is submitted.
    pub fn size_counter(&self) -> Arc<AtomicU64> {
        self.size.clone()
    }

    /// Its ops in flight on the iothreads' engines.
    pub fn in_flight(&self) -> &Arc<InFlight> {
        &self.in_flight
    }

    /// Runs `op` on an iothread's engine, or with a syscall off the data path; returns
    /// the byte count.
    async fn run(&self, op: EngineOp) -> io::Result<u64> {
        let result = match executor::submit(self, op) {
            Some(wait) => wait.await,
            // SAFETY: the caller keeps `op`'s buffers valid until this returns.
            None => unsafe { sync_ops::execute(&self.disk, &op) },
        };
        u64::try_from(result)
            .map_err(|_| io::Error::from_raw_os_error(i32::try_from(-result).unwrap_or(libc::EIO)))
    }

    fn grew_to(&self, end: u64) {
        self.size.fetch_max(end, Ordering::Relaxed);
    }
}

impl fmt::Debug for EngineStorage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EngineStorage")
            .field("path", &self.disk.path())
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl fmt::Display for EngineStorage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.disk.path().display())
    }
}

/// Resolves `relative` against the directory of `base` (as QEMU resolves a backing
/// file's name).
pub fn resolve(base: &Path, relative: &Path) -> io::Result<PathBuf> {
    if relative.is_absolute() {
        return Ok(relative.to_path_buf());
    }
    let dir = base
        .parent()
        .ok_or_else(|| io::Error::other(format!("{}: no directory", base.display())))?;
    Ok(dir.join(relative))
}

impl Storage for EngineStorage {
    /// Opens a file of the backing chain (read-only unless imago asks otherwise), with
    /// the cache mode its `direct` flag names, locked as our disks are.
    async fn open(opts: StorageOpenOptions) -> io::Result<Self> {
        let path = opts
            .get_filename()
            .ok_or_else(|| io::Error::other("a backing file without a name"))?;
        let disk = Disk::open(&DiskOptions {
            readonly: !opts.get_writable(),
            cache: if opts.get_direct() {
                CacheMode::None
            } else {
                CacheMode::Writeback
            },
            ..DiskOptions::new(path)
        })
        .map_err(|e| io::Error::other(e.to_string()))?;
        Ok(EngineStorage::new(Arc::new(disk)))
    }

    fn mem_align(&self) -> usize {
        usize::try_from(self.disk.mem_align()).unwrap_or(1).max(1)
    }

    fn req_align(&self) -> usize {
        usize::try_from(self.disk.offset_align())
            .unwrap_or(1)
            .max(1)
    }

    fn size(&self) -> io::Result<u64> {
        Ok(self.size.load(Ordering::Relaxed))
    }

    fn resolve_relative_path<P: AsRef<Path>>(&self, relative: P) -> io::Result<PathBuf> {
        resolve(self.disk.path(), relative.as_ref())
    }

    fn get_filename(&self) -> Option<PathBuf> {
        Some(self.disk.path().to_path_buf())
    }

    async unsafe fn pure_readv(&self, bufv: IoVectorMut<'_>, offset: u64) -> io::Result<()> {
        let len = bufv.len();
        // SAFETY: the iovecs describe `bufv`, which the caller keeps until we return.
        let iov = unsafe { bufv.as_iovec() }.to_vec();
        // SAFETY: `iov` lives in this future until the op completed.
        let iovecs = unsafe { IoVecs::new(iov.as_ptr(), iov.len()) };
        let n = self.run(EngineOp::Read { offset, iovecs }).await?;
        if n < len {
            // Past the end of the file: zeroes (as a sparse file reads).
            let (_, mut tail) = bufv.split_at(n);
            tail.fill(0);
        }
        drop(iov);
        Ok(())
    }

    async unsafe fn pure_writev(&self, bufv: IoVector<'_>, offset: u64) -> io::Result<()> {
        let len = bufv.len();
        // SAFETY: the iovecs describe `bufv`, which the caller keeps until we return.
        let iov = unsafe { bufv.as_iovec() }.to_vec();
        // SAFETY: `iov` lives in this future until the op completed.
        let iovecs = unsafe { IoVecs::new(iov.as_ptr(), iov.len()) };
        // Before the write: even one that fails or comes up short may leave data there.
        self.grew_to(offset.saturating_add(len));
        let n = self
            .run(EngineOp::Write {
                offset,
                iovecs,
                fua: false,
            })
            .await?;
        drop(iov);
        if n != len {
            // As the disk queue treats a raw disk's short write: out of space.
            tracing::warn!(file = %self, offset, written = n, len, "qcow2: short write");
            return Err(io::Error::from_raw_os_error(libc::ENOSPC));
        }
        Ok(())
    }

    /// Past the end of everything written to the file (its size at open, or the end
    /// of any write submitted since, ours or the direct path's), nothing is done: the
    /// file never held data there,
    /// and reads there return zeroes. imago zeroes a newly allocated cluster around a
    /// guest write that does not fill it; with the cluster at the end of the file, as
    /// on a fresh image, that costs a `fallocate` per allocation otherwise.
    async unsafe fn pure_write_zeroes(&self, offset: u64, length: u64) -> io::Result<()> {
        let written = self.size.load(Ordering::Relaxed);
        let len = length.min(written.saturating_sub(offset));
        if len == 0 {
            return Ok(());
        }
        self.run(EngineOp::WriteZeroes { offset, len }).await?;
        Ok(())
    }

    async unsafe fn pure_write_allocated_zeroes(&self, offset: u64, length: u64) -> io::Result<()> {
        // SAFETY: the same contract as ours.
        unsafe { self.pure_write_zeroes(offset, length) }.await
    }

    async unsafe fn pure_discard(&self, offset: u64, length: u64) -> io::Result<()> {
        // Within the file only: a discard never grows it.
        let size = self.size.load(Ordering::Relaxed);
        let len = length.min(size.saturating_sub(offset));
        if len > 0 {
            self.run(EngineOp::Discard { offset, len }).await?;
        }
        Ok(())
    }

    async fn flush(&self) -> io::Result<()> {
        self.run(EngineOp::Flush).await.map(drop)
    }

    async fn sync(&self) -> io::Result<()> {
        self.run(EngineOp::Flush).await.map(drop)
    }

    async fn settle_writes(&self) -> io::Result<()> {
        self.in_flight.settle().await;
        Ok(())
    }

    async unsafe fn invalidate_cache(&self) -> io::Result<()> {
        Ok(())
    }

    fn get_storage_helper(&self) -> &CommonStorageHelper {
        &self.helper
    }
}
