//! The null engine: completes every op at once without touching storage (QEMU's
//! null-co). Reads fill their buffers with zeroes; everything else succeeds. It measures
//! what the data plane costs by itself.

use vmm_sys_util::eventfd::EventFd;

use crate::engine::{EngineOp, EngineOptions, IoEngine, IoVecs};
use crate::error::Error;

/// Completes ops as they are pushed (reapable at once), signalling its eventfd once per
/// submitted batch not reaped already (unless the caller polls, see
/// [`IoEngine::set_notify`]).
pub struct NullEngine {
    notifier: EventFd,
    notify: bool,
    done: Vec<(u64, i64)>,
    /// Ops pushed since the last submit and not reaped yet.
    unsignalled: bool,
}

impl NullEngine {
    /// Creates a null engine.
    pub fn new(options: &EngineOptions) -> Result<Self, Error> {
        Self::with_notifier(options, None)
    }

    /// As [`NullEngine::new`], signalling `notifier` (a duplicate) when given.
    pub fn with_notifier(
        options: &EngineOptions,
        notifier: Option<&EventFd>,
    ) -> Result<Self, Error> {
        let notifier =
            crate::engine::notifier_or_new(notifier).map_err(|e| Error::EngineSetup {
                engine: "null",
                source: e,
            })?;
        let cap = options.queue_depth as usize;
        Ok(NullEngine {
            notifier,
            notify: true,
            done: Vec::with_capacity(cap),
            unsignalled: false,
        })
    }
}

impl IoEngine for NullEngine {
    fn name(&self) -> &'static str {
        "null"
    }

    unsafe fn push(&mut self, tag: u64, op: EngineOp) {
        // The iovecs describe real memory, so their total fits an i64; EOVERFLOW if not.
        let count = |iovecs: IoVecs| {
            i64::try_from(iovecs.total_len()).unwrap_or(-i64::from(libc::EOVERFLOW))
        };
        let result = match op {
            EngineOp::Read { iovecs, .. } => {
                for iov in iovecs.as_slice() {
                    // SAFETY: `push`'s contract: each iovec is writable memory we may fill
                    // until the op completes.
                    unsafe { std::ptr::write_bytes(iov.iov_base as *mut u8, 0, iov.iov_len) };
                }
                count(iovecs)
            }
            EngineOp::Write { iovecs, .. } => count(iovecs),
            EngineOp::Flush | EngineOp::Discard { .. } | EngineOp::WriteZeroes { .. } => 0,
        };
        // Done now: reapable at once; the eventfd is written at the submit.
        self.done.push((tag, result));
        self.unsignalled = true;
    }

    fn submit(&mut self) -> Result<(), Error> {
        if !std::mem::take(&mut self.unsignalled) {
            return Ok(());
        }
        if !self.notify {
            return Ok(());
        }
        self.notifier.write(1).map_err(|e| Error::Submit {
            engine: "null",
            source: e,
        })
    }

    fn reap(&mut self, done: &mut dyn FnMut(u64, i64)) {
        let _ = self.notifier.read();
        self.reap_ready(done);
    }

    fn reap_ready(&mut self, done: &mut dyn FnMut(u64, i64)) {
        self.unsignalled = false;
        for (tag, result) in self.done.drain(..) {
            done(tag, result);
        }
    }

    fn has_completions(&mut self) -> bool {
        !self.done.is_empty()
    }

    fn completes_inline(&self) -> bool {
        true
    }

    fn set_notify(&mut self, enabled: bool) {
        self.notify = enabled;
    }

    fn notifier(&self) -> &EventFd {
        &self.notifier
    }

    fn in_flight(&self) -> usize {
        self.done.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::test_util::{aligned, iovec, poll_in, vecs};

    #[test]
    fn reads_zero_fill_and_the_eventfd_is_written_only_when_asked() {
        let mut e = NullEngine::new(&EngineOptions::default()).unwrap();
        let mut buf = aligned(4096);
        buf.as_mut_slice().fill(0xaa);
        let iov = [iovec(&buf, 0..4096)];
        e.set_notify(false);
        // SAFETY: `buf` outlives the op, which completes during push.
        unsafe {
            e.push(
                1,
                EngineOp::Read {
                    offset: 0,
                    iovecs: vecs(&iov),
                },
            )
        };
        assert!(e.has_completions(), "done as pushed");
        e.submit().unwrap();
        assert_eq!(poll_in(e.notifier(), 0), 0, "polled: no eventfd write");
        let mut got = Vec::new();
        e.reap_ready(&mut |t, r| got.push((t, r)));
        assert_eq!(got, [(1, 4096)]);
        assert!(buf.as_slice().iter().all(|&b| b == 0));
        e.set_notify(true);
        // SAFETY: no buffers.
        unsafe { e.push(2, EngineOp::Flush) };
        e.submit().unwrap();
        assert_eq!(
            poll_in(e.notifier(), 0),
            1,
            "sleeping caller: eventfd written"
        );
        e.reap(&mut |t, r| got.push((t, r)));
        assert_eq!(got[1], (2, 0));
        assert_eq!(poll_in(e.notifier(), 0), 0, "reap clears it");
        assert_eq!(e.in_flight(), 0);
        // Reaped before the submit: nothing left to signal.
        // SAFETY: no buffers.
        unsafe { e.push(3, EngineOp::Flush) };
        e.reap_ready(&mut |t, r| got.push((t, r)));
        e.submit().unwrap();
        assert_eq!(
            poll_in(e.notifier(), 0),
            0,
            "no wake-up for work already reaped"
        );
        assert_eq!(got[2], (3, 0));
    }
}
