//! Addresses for BARs inside an MMIO window.

use super::PciError;

/// Hands out naturally aligned ranges of an MMIO window (a bump allocator: BARs placed
/// by the VMM are never freed; the guest may move them later anyway).
#[derive(Clone, Debug)]
pub struct PciAllocator {
    base: u64,
    end: u64,
    next: u64,
}

impl PciAllocator {
    /// An allocator for `[base, base + size)`.
    pub fn new(base: u64, size: u64) -> Self {
        PciAllocator {
            base,
            end: base.saturating_add(size),
            next: base,
        }
    }

    /// The window's start.
    pub fn base(&self) -> u64 {
        self.base
    }

    /// A range of `size` bytes (rounded up to a power of two) aligned to its size.
    pub fn allocate(&mut self, size: u64) -> Result<u64, PciError> {
        let Some(size) = size.max(16).checked_next_power_of_two() else {
            return Err(PciError::OutOfSpace { size });
        };
        let start = self
            .next
            .checked_next_multiple_of(size)
            .ok_or(PciError::OutOfSpace { size })?;
        let end = start
            .checked_add(size)
            .filter(|&e| e <= self.end)
            .ok_or(PciError::OutOfSpace { size })?;
        self.next = end;
        Ok(start)
    }
}
