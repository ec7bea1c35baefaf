//! The dirty bitmap of a block job (docs/architecture.md): one bit per
//! `granularity` bytes of the disk, set by guest writes (from whichever iothread serves
//! the queue) and taken, chunk by chunk, by the job's copier. Marking and taking are
//! lock-free (atomic words), so a write on one iothread and the copier on another never
//! wait for each other; a bit taken by the copier and set again by a later write is
//! copied again, which is what makes the copy converge on the latest data.

use std::sync::atomic::{AtomicU64, Ordering};

/// The smallest granularity (4 KiB).
pub const MIN_GRANULARITY: u64 = 4096;
/// The largest granularity (64 MiB).
pub const MAX_GRANULARITY: u64 = 64 << 20;
/// The default granularity (64 KiB).
pub const DEFAULT_GRANULARITY: u64 = 64 << 10;

/// The most 64-bit words a bitmap takes (128 MiB: a 64 PiB disk at 64 KiB).
const MAX_WORDS: usize = 16 << 20;

/// A dirty bitmap over a disk of `size` bytes.
#[derive(Debug)]
pub struct DirtyBitmap {
    granularity: u64,
    /// log2 of `granularity`.
    shift: u32,
    size: u64,
    chunks: u64,
    words: Vec<AtomicU64>,
    /// Chunks that [`DirtyBitmap::mark`] turned from clean to dirty, ever.
    newly_dirty: AtomicU64,
}

impl DirtyBitmap {
    /// An all-clean bitmap for `size` bytes in chunks of `granularity` (a power of two
    /// from [`MIN_GRANULARITY`] to [`MAX_GRANULARITY`]).
    pub fn new(size: u64, granularity: u64) -> Result<DirtyBitmap, String> {
        if !granularity.is_power_of_two()
            || !(MIN_GRANULARITY..=MAX_GRANULARITY).contains(&granularity)
        {
            return Err(format!(
                "granularity {granularity} must be a power of two from {MIN_GRANULARITY} to {MAX_GRANULARITY}"
            ));
        }
        let chunks = size.div_ceil(granularity);
        // The size may come from a server (an NBD export): the bitmap's memory is bounded.
        let words = usize::try_from(chunks.div_ceil(64))
            .ok()
            .filter(|w| *w <= MAX_WORDS)
            .ok_or_else(|| {
                format!(
                    "a disk of {size} bytes needs a dirty bitmap over {} MiB at granularity {granularity}; use a larger granularity",
                    (MAX_WORDS * 8) >> 20
                )
            })?;
        Ok(DirtyBitmap {
            granularity,
            shift: granularity.trailing_zeros(),
            size,
            chunks,
            words: (0..words).map(|_| AtomicU64::new(0)).collect(),
            newly_dirty: AtomicU64::new(0),
        })
    }

    /// Bytes per bit.
    pub fn granularity(&self) -> u64 {
        self.granularity
    }

    /// The disk size it covers.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The chunks (bits) it has.
    pub fn chunks(&self) -> u64 {
        self.chunks
    }

    /// The byte range of chunk `chunk` (the last one may be short).
    pub fn chunk_range(&self, chunk: u64) -> (u64, u64) {
        let start = chunk << self.shift;
        let end = (start + self.granularity).min(self.size);
        (start, end.saturating_sub(start))
    }

    /// Marks every chunk that `offset..offset + len` touches (clipped to the disk).
    pub fn mark(&self, offset: u64, len: u64) {
        if len == 0 || offset >= self.size {
            return;
        }
        let end = offset.saturating_add(len).min(self.size);
        let first = offset >> self.shift;
        let last = (end - 1) >> self.shift;
        let newly = self.set_bits(first, last + 1);
        if newly > 0 {
            self.newly_dirty.fetch_add(newly, Ordering::Relaxed);
        }
    }

    /// Marks the whole disk (a full copy; not counted in
    /// [`DirtyBitmap::newly_dirty`]).
    pub fn mark_all(&self) {
        self.set_bits(0, self.chunks);
    }

    /// How many chunks [`DirtyBitmap::mark`] has turned from clean to dirty since the
    /// bitmap was made: how fast writes outrun a copy.
    pub fn newly_dirty(&self) -> u64 {
        self.newly_dirty.load(Ordering::Relaxed)
    }

    /// Sets the bits of chunks `from..to`; returns how many were clean.
    fn set_bits(&self, from: u64, to: u64) -> u64 {
        let mut newly = 0;
        let mut c = from;
        while c < to {
            let word = c / 64;
            let bit = c % 64;
            let n = (to - c).min(64 - bit);
            let mask = if n == 64 {
                u64::MAX
            } else {
                ((1u64 << n) - 1) << bit
            };
            if let Some(w) = usize::try_from(word).ok().and_then(|i| self.words.get(i)) {
                let old = w.fetch_or(mask, Ordering::AcqRel);
                newly += u64::from((mask & !old).count_ones());
            }
            c += n;
        }
        newly
    }

    /// Whether chunk `chunk` is dirty.
    pub fn is_dirty(&self, chunk: u64) -> bool {
        usize::try_from(chunk / 64)
            .ok()
            .and_then(|i| self.words.get(i))
            .is_some_and(|w| w.load(Ordering::Acquire) & (1 << (chunk % 64)) != 0)
    }

    /// Takes (clears and returns) the first dirty chunk at or after `from`, wrapping
    /// around to the start; None when every chunk is clean.
    pub fn take_next(&self, from: u64) -> Option<u64> {
        let from = if from >= self.chunks { 0 } else { from };
        self.take_in(from, self.chunks)
            .or_else(|| self.take_in(0, from))
    }

    fn take_in(&self, from: u64, to: u64) -> Option<u64> {
        let mut c = from;
        while c < to {
            let word = usize::try_from(c / 64).ok()?;
            let w = self.words.get(word)?;
            let bit = c % 64;
            let mut current = w.load(Ordering::Acquire) & (u64::MAX << bit);
            while current != 0 {
                let found = u64::from(current.trailing_zeros());
                let chunk = (c - bit) + found;
                if chunk >= to {
                    return None;
                }
                let mask = 1u64 << found;
                // Clear it; another taker may have won it in between.
                if w.fetch_and(!mask, Ordering::AcqRel) & mask != 0 {
                    return Some(chunk);
                }
                current = w.load(Ordering::Acquire) & (u64::MAX << bit) & !(mask | (mask - 1));
            }
            c = c - bit + 64;
        }
        None
    }

    /// Dirty chunks now.
    pub fn dirty_chunks(&self) -> u64 {
        self.words
            .iter()
            .map(|w| u64::from(w.load(Ordering::Relaxed).count_ones()))
            .sum()
    }

    /// Dirty bytes now (the last chunk counted at its real length).
    pub fn dirty_bytes(&self) -> u64 {
        let n = self.dirty_chunks();
        if n == 0 {
            return 0;
        }
        let last = self.chunks - 1;
        let (_, last_len) = self.chunk_range(last);
        if self.is_dirty(last) {
            (n - 1) * self.granularity + last_len
        } else {
            n * self.granularity
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn granularity_must_be_a_power_of_two_in_range() {
        assert!(DirtyBitmap::new(1 << 20, 4096).is_ok());
        assert!(DirtyBitmap::new(1 << 20, 64 << 20).is_ok());
        for bad in [0, 2048, 3 * 4096, 128 << 20] {
            let e = DirtyBitmap::new(1 << 20, bad).unwrap_err();
            assert!(e.contains("power of two"), "{e}");
        }
        // A size a server might claim cannot make the bitmap take the host's memory.
        let e = DirtyBitmap::new(u64::MAX, 4096).unwrap_err();
        assert!(e.contains("larger granularity"), "{e}");
    }

    #[test]
    fn marks_cover_every_touched_chunk_and_are_taken_once() {
        // 10 chunks of 4 KiB and a short last one (2 KiB).
        let b = DirtyBitmap::new(10 * 4096 + 2048, 4096).unwrap();
        assert_eq!(b.chunks(), 11);
        assert_eq!(b.chunk_range(10), (40960, 2048));
        b.mark(4095, 2); // chunks 0 and 1
        b.mark(9 * 4096, 1 << 30); // 9 and 10, clipped
        b.mark(1 << 40, 4096); // past the end: nothing
        b.mark(5 * 4096, 0); // empty: nothing
        assert_eq!(b.dirty_chunks(), 4);
        assert_eq!(b.newly_dirty(), 4);
        b.mark(0, 4096); // dirty already: not new
        assert_eq!(b.newly_dirty(), 4);
        assert_eq!(b.dirty_bytes(), 3 * 4096 + 2048);
        let mut taken = Vec::new();
        let mut at = 0;
        while let Some(c) = b.take_next(at) {
            taken.push(c);
            at = c + 1;
        }
        assert_eq!(taken, [0, 1, 9, 10]);
        assert_eq!(b.dirty_bytes(), 0);
        // Taking wraps around: from the middle, an earlier chunk is found.
        b.mark(0, 1);
        assert_eq!(
            b.newly_dirty(),
            5,
            "a taken chunk dirtied again is new again"
        );
        assert_eq!(b.take_next(7), Some(0));
        assert_eq!(b.take_next(0), None);
    }

    #[test]
    fn mark_all_spans_word_boundaries() {
        let b = DirtyBitmap::new(200 * 4096, 4096).unwrap();
        b.mark_all();
        assert_eq!(b.dirty_chunks(), 200);
        b.mark(60 * 4096, 10 * 4096); // inside, across words 0 and 1: already set
        assert_eq!(b.dirty_chunks(), 200);
        assert_eq!(
            b.newly_dirty(),
            0,
            "neither a full copy nor marking dirty chunks"
        );
        let mut n = 0;
        let mut at = 0;
        while let Some(c) = b.take_next(at) {
            assert_eq!(c, n);
            n += 1;
            at = c + 1;
        }
        assert_eq!(n, 200);
    }

    #[test]
    fn concurrent_marks_and_takes_lose_no_write() {
        use std::sync::Arc;
        let b = Arc::new(DirtyBitmap::new(1 << 26, 4096).unwrap());
        let chunks = b.chunks();
        let writer = {
            let b = b.clone();
            std::thread::spawn(move || {
                for i in 0..200_000u64 {
                    let c = (i * 7919) % chunks;
                    b.mark(c * 4096, 4096);
                }
            })
        };
        let mut taken = 0u64;
        let mut at = 0;
        while !writer.is_finished() {
            if let Some(c) = b.take_next(at) {
                taken += 1;
                at = c + 1;
            }
        }
        writer.join().unwrap();
        while let Some(c) = b.take_next(at) {
            taken += 1;
            at = c + 1;
        }
        // Every chunk the writer touched was taken at least once, and none is left.
        assert!(taken >= chunks.min(200_000), "{taken}");
        assert_eq!(b.dirty_chunks(), 0);
    }
}
