//! [`MirrorLink`]: what a mirror job shares with the queues of the disk it copies.
//!
//! Every queue marks the job's dirty bitmap as its writes finish. In `write-blocking`
//! mode a queue also writes each guest write to the target before the guest hears of it
//! (see [`crate::DiskQueue::attach_mirror`]); such a write need not be copied again,
//! unless the copier copied the same chunk while the write was under way: the copier's
//! older read could then land on the target after the write. Per-chunk copy epochs tell:
//! the copier bumps a chunk's epoch when its copy starts and again when it ends (odd:
//! being copied); a mirrored write notes the epochs before it starts and marks the chunk
//! dirty when they changed or were odd when it ended. Chunks share [`EPOCH_SLOTS`]
//! epochs (chunk modulo the table): a shared epoch can only mark a chunk needlessly,
//! never miss one, and the table's memory stays bounded whatever the disk's size.

use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

use super::dirty::DirtyBitmap;
use crate::disk::Disk;
use crate::sync::lock;

/// Epochs kept at most (64 KiB).
pub const EPOCH_SLOTS: u64 = 1 << 16;

/// The link between a mirror job and its disk's queues.
#[derive(Debug)]
pub struct MirrorLink {
    bitmap: Arc<DirtyBitmap>,
    /// By chunk modulo their count, in write-blocking mode only (empty otherwise).
    epochs: Vec<AtomicU8>,
    target: Arc<Disk>,
    write_blocking: bool,
    failed: AtomicBool,
    failure: Mutex<Option<String>>,
}

impl MirrorLink {
    /// A link over `bitmap` to `target`; `write_blocking` makes queues write guest writes
    /// to the target as well.
    pub fn new(bitmap: Arc<DirtyBitmap>, target: Arc<Disk>, write_blocking: bool) -> MirrorLink {
        let chunks = if write_blocking {
            usize::try_from(bitmap.chunks().min(EPOCH_SLOTS)).unwrap_or(0)
        } else {
            0
        };
        MirrorLink {
            bitmap,
            epochs: (0..chunks).map(|_| AtomicU8::new(0)).collect(),
            target,
            write_blocking,
            failed: AtomicBool::new(false),
            failure: Mutex::new(None),
        }
    }

    /// The dirty bitmap the queues mark.
    pub fn bitmap(&self) -> &Arc<DirtyBitmap> {
        &self.bitmap
    }

    /// The target disk.
    pub fn target(&self) -> &Arc<Disk> {
        &self.target
    }

    /// Whether queues write guest writes to the target too.
    pub fn write_blocking(&self) -> bool {
        self.write_blocking
    }

    /// A write to the target failed: the job fails with `message` (the first one kept).
    pub fn fail(&self, message: String) {
        let mut f = lock(&self.failure);
        if f.is_none() {
            *f = Some(message);
        }
        self.failed.store(true, Ordering::Release);
    }

    /// Why the target failed, if it did.
    pub fn failure(&self) -> Option<String> {
        if !self.failed.load(Ordering::Acquire) {
            return None;
        }
        lock(&self.failure).clone()
    }

    /// Whether the target failed (mirrored writes then stop).
    pub fn has_failed(&self) -> bool {
        self.failed.load(Ordering::Acquire)
    }

    /// The copier starts (`true`) or ends copying `chunk`.
    pub fn bump_epoch(&self, chunk: u64) {
        if let Some(e) = self.epoch(chunk) {
            e.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// Appends the epochs of the chunks of `offset..offset + len` to `out`.
    pub fn note_epochs(&self, offset: u64, len: u64, out: &mut Vec<u8>) {
        for chunk in self.chunks_of(offset, len) {
            out.push(self.epoch(chunk).map_or(0, |e| e.load(Ordering::SeqCst)));
        }
    }

    /// A mirrored write of `offset..offset + len` that noted `before` has reached both
    /// disks: marks dirty each chunk the copier touched meanwhile.
    pub fn settle_mirrored(&self, offset: u64, len: u64, before: &[u8]) {
        for (i, chunk) in self.chunks_of(offset, len).enumerate() {
            let now = self.epoch(chunk).map_or(0, |e| e.load(Ordering::SeqCst));
            if before.get(i) != Some(&now) || now % 2 == 1 {
                let (o, l) = self.bitmap.chunk_range(chunk);
                self.bitmap.mark(o, l);
            }
        }
    }

    fn epoch(&self, chunk: u64) -> Option<&AtomicU8> {
        let slots = u64::try_from(self.epochs.len()).ok().filter(|&n| n > 0)?;
        self.epochs.get(usize::try_from(chunk % slots).ok()?)
    }

    fn chunks_of(&self, offset: u64, len: u64) -> std::ops::Range<u64> {
        let g = self.bitmap.granularity();
        if len == 0 {
            return 0..0;
        }
        let first = offset / g;
        let last = offset.saturating_add(len - 1) / g;
        first..(last + 1).min(self.bitmap.chunks())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn link() -> MirrorLink {
        let bitmap = Arc::new(DirtyBitmap::new(1 << 20, 64 << 10).unwrap());
        MirrorLink::new(bitmap, Arc::new(Disk::null(1 << 20)), true)
    }

    #[test]
    fn a_mirrored_write_clear_of_copies_leaves_its_chunks_clean() {
        let l = link();
        let mut before = Vec::new();
        l.note_epochs(60 << 10, 8 << 10, &mut before);
        assert_eq!(before.len(), 2, "the write spans chunks 0 and 1");
        l.settle_mirrored(60 << 10, 8 << 10, &before);
        assert_eq!(l.bitmap().dirty_chunks(), 0);
    }

    #[test]
    fn a_copy_overlapping_a_mirrored_write_marks_its_chunk() {
        // Copy started before and ended during the write.
        let l = link();
        l.bump_epoch(1);
        let mut before = Vec::new();
        l.note_epochs(64 << 10, 4096, &mut before);
        l.bump_epoch(1);
        l.settle_mirrored(64 << 10, 4096, &before);
        assert!(l.bitmap().is_dirty(1));
        assert!(!l.bitmap().is_dirty(0));
        // A copy under way when the write ends.
        let l = link();
        let mut before = Vec::new();
        l.note_epochs(0, 4096, &mut before);
        l.bump_epoch(0);
        l.settle_mirrored(0, 4096, &before);
        assert!(l.bitmap().is_dirty(0));
        // A copy wholly within the write.
        let l = link();
        let mut before = Vec::new();
        l.note_epochs(0, 4096, &mut before);
        l.bump_epoch(0);
        l.bump_epoch(0);
        l.settle_mirrored(0, 4096, &before);
        assert!(l.bitmap().is_dirty(0));
    }

    #[test]
    fn a_failure_keeps_its_first_message() {
        let l = link();
        assert!(!l.has_failed());
        l.fail("EIO at 0".into());
        l.fail("later".into());
        assert_eq!(l.failure().as_deref(), Some("EIO at 0"));
    }
}
