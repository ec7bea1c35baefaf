//! MSI-X: the vector table and pending bits in the BAR, and the capability's enable and
//! function-mask bits. Each vector is an eventfd; the host learns each vector's
//! effective message (None while masked or disabled).

use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

use super::{MsiMessage, VirtioPciHost};

/// Bytes of one table entry.
pub(super) const ENTRY_SIZE: u64 = 16;
/// Message control: MSI-X enable.
pub(super) const CTRL_ENABLE: u16 = 1 << 15;
/// Message control: function mask.
pub(super) const CTRL_FUNCTION_MASK: u16 = 1 << 14;
/// Vector control: masked.
const VECTOR_MASKED: u32 = 1;

/// MSI-X state of one function.
pub(super) struct Msix {
    /// Entries as bytes: address low, address high, data, vector control.
    table: Vec<[u8; 16]>,
    enabled: bool,
    function_masked: bool,
    /// What the host was last told per vector.
    delivered: Vec<Option<MsiMessage>>,
    pub fds: Vec<EventFd>,
    host: Arc<dyn VirtioPciHost>,
}

impl Msix {
    /// `fds.len()` vectors, all masked, MSI-X disabled.
    pub fn new(fds: Vec<EventFd>, host: Arc<dyn VirtioPciHost>) -> Self {
        let n = fds.len();
        let mut masked = [0u8; 16];
        masked[12..16].copy_from_slice(&VECTOR_MASKED.to_le_bytes());
        Msix {
            table: vec![masked; n],
            enabled: false,
            function_masked: false,
            delivered: vec![None; n],
            fds,
            host,
        }
    }

    fn entry_u32(&self, v: usize, word: usize) -> u32 {
        let e = &self.table[v];
        u32::from_le_bytes([
            e[word * 4],
            e[word * 4 + 1],
            e[word * 4 + 2],
            e[word * 4 + 3],
        ])
    }

    fn effective(&self, v: usize) -> Option<MsiMessage> {
        let masked = self.entry_u32(v, 3) & VECTOR_MASKED != 0;
        (self.enabled && !self.function_masked && !masked).then(|| MsiMessage {
            addr: u64::from(self.entry_u32(v, 0)) | u64::from(self.entry_u32(v, 1)) << 32,
            data: self.entry_u32(v, 2),
        })
    }

    fn sync(&mut self, v: usize) {
        let now = self.effective(v);
        if now == self.delivered[v] {
            return;
        }
        // Vectors are numbered by u16 (the table size is a u16).
        let Ok(vector) = u16::try_from(v) else {
            return;
        };
        match self.host.set_msix_vector(vector, &self.fds[v], now) {
            Ok(()) => self.delivered[v] = now,
            Err(e) => tracing::error!(vector = v, error = %e, "cannot route an MSI-X vector"),
        }
    }

    /// The capability's message control changed.
    pub fn set_control(&mut self, control: u16) {
        self.enabled = control & CTRL_ENABLE != 0;
        self.function_masked = control & CTRL_FUNCTION_MASK != 0;
        for v in 0..self.table.len() {
            self.sync(v);
        }
    }

    /// Tells the host every vector is gone (hot unplug): MSI-X disabled, no route left.
    pub fn release_all(&mut self) {
        self.enabled = false;
        for v in 0..self.table.len() {
            self.sync(v);
        }
    }

    /// Reads the table (out-of-range or entry-straddling accesses read zero).
    pub fn read_table(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let v = (offset / ENTRY_SIZE) as usize;
        let at = (offset % ENTRY_SIZE) as usize;
        if let Some(e) = self.table.get(v)
            && at + data.len() <= 16
        {
            data.copy_from_slice(&e[at..at + data.len()]);
        }
    }

    /// Writes the table and updates the host when the vector's effective message changed.
    pub fn write_table(&mut self, offset: u64, data: &[u8]) {
        let v = (offset / ENTRY_SIZE) as usize;
        let at = (offset % ENTRY_SIZE) as usize;
        let Some(e) = self.table.get_mut(v) else {
            return;
        };
        if at + data.len() > 16 {
            return;
        }
        e[at..at + data.len()].copy_from_slice(data);
        // Only the mask bit of vector control is writable.
        let ctrl = u32::from_le_bytes([e[12], e[13], e[14], e[15]]) & VECTOR_MASKED;
        e[12..16].copy_from_slice(&ctrl.to_le_bytes());
        self.sync(v);
    }

    /// Whether vector `v` has an interrupt waiting while it cannot be delivered.
    fn pending(&self, v: usize) -> bool {
        if self.delivered[v].is_some() {
            return false;
        }
        // Nobody consumes the eventfd while the vector is masked: peek by reading and
        // putting the count back.
        match self.fds[v].read() {
            Ok(n) if n > 0 => {
                let _ = self.fds[v].write(n);
                true
            }
            _ => false,
        }
    }

    /// Reads the pending bit array.
    pub fn read_pba(&self, offset: u64, data: &mut [u8]) {
        for (i, byte) in data.iter_mut().enumerate() {
            let first = usize::try_from(offset)
                .unwrap_or(usize::MAX)
                .saturating_add(i)
                .saturating_mul(8);
            *byte = (0..8)
                .filter(|b| first + b < self.table.len() && self.pending(first + b))
                .fold(0u8, |acc, b| acc | 1 << b);
        }
    }
}
