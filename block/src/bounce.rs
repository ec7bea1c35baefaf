//! Aligned bounce buffers for O_DIRECT requests whose guest buffers are misaligned.

use std::alloc::{self, Layout};

/// The largest bounce buffer one request may take; larger misaligned requests fail with
/// ENOMEM instead of letting a guest make the host allocate without bound.
pub const MAX_BOUNCE: usize = 64 << 20;

/// A heap buffer aligned for O_DIRECT.
#[derive(Debug)]
pub struct AlignedBuf {
    ptr: *mut u8,
    layout: Layout,
    len: usize,
}

// SAFETY: AlignedBuf owns its allocation exclusively; nothing about it is tied to a thread.
unsafe impl Send for AlignedBuf {}

impl AlignedBuf {
    /// Allocates `len` bytes (rounded up to `align`) aligned to `align`, zero-filled.
    /// Returns None when `len` exceeds [`MAX_BOUNCE`] or the allocation fails.
    pub fn new(len: usize, align: usize) -> Option<AlignedBuf> {
        let align = align.max(1).next_power_of_two();
        if len == 0 || len > MAX_BOUNCE {
            return None;
        }
        let size = len.checked_next_multiple_of(align)?;
        let layout = Layout::from_size_align(size, align).ok()?;
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { alloc::alloc_zeroed(layout) };
        if ptr.is_null() {
            return None;
        }
        Some(AlignedBuf { ptr, layout, len })
    }

    /// Start of the buffer.
    pub fn as_ptr(&self) -> *const u8 {
        self.ptr
    }

    /// Start of the buffer, for writing.
    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr
    }

    /// The buffer's bytes, over the requested length.
    ///
    /// No I/O op may be writing into the buffer (through an iovec) meanwhile.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: `ptr` owns at least `len` initialised (zero-filled at allocation) bytes
        // for the buffer's life; no op writes them meanwhile (see above).
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }

    /// The buffer's bytes, mutably, over the requested length.
    ///
    /// No I/O op may be using the buffer (through an iovec) meanwhile.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as `as_slice`, and `&mut self` makes the borrow unique.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }

    /// Requested length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the buffer is empty (never, by construction).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// An iovec covering the requested length.
    pub fn iovec(&mut self) -> libc::iovec {
        libc::iovec {
            iov_base: self.ptr.cast(),
            iov_len: self.len,
        }
    }

    /// Copies the bytes described by `src` (gather) into the buffer, up to its length.
    ///
    /// # Safety
    /// Every iovec in `src` must describe readable memory.
    pub unsafe fn gather_from(&mut self, src: &[libc::iovec]) {
        let mut at = 0;
        for v in src {
            let n = v.iov_len.min(self.len - at);
            // SAFETY: `src` is readable (caller); `at + n <= len` keeps us inside our buffer;
            // guest memory and our heap buffer cannot overlap.
            unsafe { std::ptr::copy_nonoverlapping(v.iov_base as *const u8, self.ptr.add(at), n) };
            at += n;
            if at == self.len {
                break;
            }
        }
    }

    /// Copies the first `len` bytes of the buffer into the memory described by `dst`
    /// (scatter).
    ///
    /// # Safety
    /// Every iovec in `dst` must describe writable memory.
    pub unsafe fn scatter_to(&self, dst: &[libc::iovec], len: usize) {
        let mut at = 0;
        let len = len.min(self.len);
        for v in dst {
            let n = v.iov_len.min(len - at);
            // SAFETY: `dst` is writable (caller); `at + n <= len` reads inside our buffer.
            unsafe { std::ptr::copy_nonoverlapping(self.ptr.add(at), v.iov_base as *mut u8, n) };
            at += n;
            if at == len {
                break;
            }
        }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: `ptr` came from `alloc_zeroed` with this very layout.
        unsafe { alloc::dealloc(self.ptr, self.layout) };
    }
}

/// Fills the memory described by `dst` with zeroes from byte `from` on.
///
/// # Safety
/// Every iovec in `dst` must describe writable memory.
pub unsafe fn zero_from(dst: &[libc::iovec], from: usize) {
    let mut skip = from;
    for v in dst {
        if skip >= v.iov_len {
            skip -= v.iov_len;
            continue;
        }
        // SAFETY: writable per the caller; `skip < iov_len` keeps the range inside the iovec.
        unsafe { std::ptr::write_bytes((v.iov_base as *mut u8).add(skip), 0, v.iov_len - skip) };
        skip = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_and_round_trips_scatter_gather() {
        let mut buf = AlignedBuf::new(1000, 4096).unwrap();
        assert_eq!(buf.as_mut_ptr() as usize % 4096, 0);
        assert_eq!(buf.as_ptr(), buf.as_mut_ptr().cast_const());
        assert_eq!(
            buf.as_slice(),
            &[0u8; 1000][..],
            "zero-filled, requested length"
        );
        let mut a = vec![1u8; 300];
        let mut b = vec![2u8; 700];
        let src = [
            libc::iovec {
                iov_base: a.as_mut_ptr().cast(),
                iov_len: a.len(),
            },
            libc::iovec {
                iov_base: b.as_mut_ptr().cast(),
                iov_len: b.len(),
            },
        ];
        // SAFETY: the iovecs describe live vectors.
        unsafe { buf.gather_from(&src) };
        let mut out = vec![0u8; 1000];
        let dst = [libc::iovec {
            iov_base: out.as_mut_ptr().cast(),
            iov_len: out.len(),
        }];
        // SAFETY: `out` is live and writable.
        unsafe { buf.scatter_to(&dst, 1000) };
        assert!(out[..300].iter().all(|&x| x == 1) && out[300..].iter().all(|&x| x == 2));
        assert_eq!(buf.as_slice(), out.as_slice());
        buf.as_mut_slice().fill(3);
        // SAFETY: as above.
        unsafe { buf.scatter_to(&dst, 1000) };
        assert!(out.iter().all(|&x| x == 3));
    }

    #[test]
    fn refuses_unbounded_sizes_and_zeroes_tails() {
        assert!(AlignedBuf::new(MAX_BOUNCE + 1, 512).is_none());
        assert!(AlignedBuf::new(0, 512).is_none());
        let mut a = vec![7u8; 10];
        let mut b = vec![7u8; 10];
        let dst = [
            libc::iovec {
                iov_base: a.as_mut_ptr().cast(),
                iov_len: 10,
            },
            libc::iovec {
                iov_base: b.as_mut_ptr().cast(),
                iov_len: 10,
            },
        ];
        // SAFETY: both vectors are live.
        unsafe { zero_from(&dst, 15) };
        assert_eq!(a, vec![7u8; 10]);
        assert_eq!(&b[..5], &[7u8; 5]);
        assert_eq!(&b[5..], &[0u8; 5]);
    }
}
