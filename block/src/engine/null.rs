//! The null engine: completes every op at once without touching storage (QEMU's
//! null-co). Reads fill their buffers with zeroes; everything else succeeds. It measures
//! what the data plane costs by itself.

use vmm_sys_util::eventfd::EventFd;

use crate::engine::{EngineOp, EngineOptions, IoEngine};
use crate::error::Error;

/// Completes ops during `submit`, signalling its eventfd once per batch.
pub struct NullEngine {
    notifier: EventFd,
    queued: Vec<(u64, i64)>,
    done: Vec<(u64, i64)>,
}

impl NullEngine {
    /// Creates a null engine.
    pub fn new(options: &EngineOptions) -> Result<Self, Error> {
        let notifier = crate::engine::new_notifier().map_err(|e| Error::EngineSetup {
            engine: "null",
            source: e,
        })?;
        let cap = options.queue_depth as usize;
        Ok(NullEngine {
            notifier,
            queued: Vec::with_capacity(cap),
            done: Vec::with_capacity(cap),
        })
    }
}

impl IoEngine for NullEngine {
    fn name(&self) -> &'static str {
        "null"
    }

    unsafe fn push(&mut self, tag: u64, op: EngineOp) {
        let result = match op {
            EngineOp::Read { iovecs, .. } => {
                for iov in iovecs.as_slice() {
                    // SAFETY: `push`'s contract: each iovec is writable memory we may fill
                    // until the op completes.
                    unsafe { std::ptr::write_bytes(iov.iov_base as *mut u8, 0, iov.iov_len) };
                }
                iovecs.total_len() as i64
            }
            EngineOp::Write { iovecs, .. } => iovecs.total_len() as i64,
            EngineOp::Flush | EngineOp::Discard { .. } | EngineOp::WriteZeroes { .. } => 0,
        };
        self.queued.push((tag, result));
    }

    fn submit(&mut self) -> Result<(), Error> {
        if self.queued.is_empty() {
            return Ok(());
        }
        self.done.append(&mut self.queued);
        self.notifier.write(1).map_err(|e| Error::Submit {
            engine: "null",
            source: e,
        })
    }

    fn reap(&mut self, done: &mut dyn FnMut(u64, i64)) {
        let _ = self.notifier.read();
        for (tag, result) in self.done.drain(..) {
            done(tag, result);
        }
    }

    fn has_completions(&mut self) -> bool {
        !self.done.is_empty()
    }

    fn notifier(&self) -> &EventFd {
        &self.notifier
    }

    fn in_flight(&self) -> usize {
        self.queued.len() + self.done.len()
    }
}
