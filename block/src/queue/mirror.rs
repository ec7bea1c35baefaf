//! A queue's side of a mirror job ([`MirrorLink`]): in write-blocking mode, each guest
//! write (or write-zeroes) that the disk took is written to the target too before it
//! completes; the copy epochs decide whether its chunks must still be copied.

use std::sync::Arc;

use super::{DiskQueue, Error, RequestKind, Slot};
use crate::engine::{EngineOp, IoEngine, IoVecs, create_engine_sharing};
use crate::jobs::MirrorLink;

/// The mirror a queue is attached to.
pub(super) struct QueueMirror {
    link: Arc<MirrorLink>,
    /// The engine on the target (write-blocking mode only).
    engine: Option<Box<dyn IoEngine>>,
}

impl QueueMirror {
    /// Notes the copy epochs of a request about to start, if it will be mirrored.
    pub(super) fn note(&self, slot: &mut Slot) {
        if self.engine.is_some()
            && matches!(slot.kind, RequestKind::Write | RequestKind::WriteZeroes)
        {
            self.link
                .note_epochs(slot.offset, slot.len, &mut slot.epochs);
        }
    }

    /// The disk finished `slot` (request `tag`) with `result`: writes it to the target
    /// too when it is to be mirrored (true: it completes later, from [`Self::reap`]).
    pub(super) fn start_write(&mut self, tag: u64, slot: &mut Slot, result: i64) -> bool {
        let Some(engine) = self.engine.as_mut() else {
            return false;
        };
        let complete = u64::try_from(result).is_ok_and(|n| n >= slot.len);
        if !complete || self.link.has_failed() {
            return false;
        }
        let op = match slot.kind {
            RequestKind::Write => EngineOp::Write {
                offset: slot.offset,
                // SAFETY: the slot's iovecs (guest memory, or the slot's bounce buffer)
                // stay valid and unchanged until the slot is finished, which is after this
                // op's completion.
                iovecs: unsafe { IoVecs::new(slot.iovecs.as_ptr(), slot.iovecs.len()) },
                fua: false,
            },
            RequestKind::WriteZeroes => EngineOp::WriteZeroes {
                offset: slot.offset,
                len: slot.len,
            },
            _ => return false,
        };
        slot.mirroring = true;
        slot.primary = result;
        // SAFETY: see above; a write-zeroes carries no buffers.
        unsafe { engine.push(tag, op) };
        true
    }

    /// Finishes the mirrored writes the target completed: each goes to `finish` with
    /// its slot (whose `primary` is the disk's result). A target failure fails the job
    /// (the guest keeps the disk's result) and leaves the range dirty.
    pub(super) fn reap(&mut self, finish: &mut dyn FnMut(u64, &mut Slot), slots: &mut [Slot]) {
        let Some(engine) = self.engine.as_mut() else {
            return;
        };
        let link = &self.link;
        engine.reap_ready(&mut |tag, result| {
            let Some(slot) = usize::try_from(tag)
                .ok()
                .and_then(|t| slots.get_mut(t))
                .filter(|s| s.busy && s.mirroring)
            else {
                tracing::error!(tag, "mirror engine returned an unknown tag");
                return;
            };
            if u64::try_from(result).is_ok_and(|n| n >= slot.len) {
                link.settle_mirrored(slot.offset, slot.len, &slot.epochs);
            } else {
                let why = if result < 0 {
                    std::io::Error::from_raw_os_error(i32::try_from(-result).unwrap_or(libc::EIO))
                        .to_string()
                } else {
                    format!("short write of {result} bytes")
                };
                link.fail(format!(
                    "mirror target: write of {} bytes at {}: {why}",
                    slot.len, slot.offset
                ));
                link.bitmap().mark(slot.offset, slot.len);
            }
            slot.mirroring = false;
            finish(tag, slot);
        });
    }

    pub(super) fn submit(&mut self) -> Result<(), Error> {
        match self.engine.as_mut() {
            Some(e) => e.submit(),
            None => Ok(()),
        }
    }

    pub(super) fn has_completions(&mut self) -> bool {
        self.engine.as_mut().is_some_and(|e| e.has_completions())
    }

    pub(super) fn in_flight(&self) -> usize {
        self.engine.as_ref().map_or(0, |e| e.in_flight())
    }
}

impl DiskQueue {
    /// Attaches a mirror job's link (`None` detaches): every later write, write-zeroes
    /// and discard marks the link's dirty bitmap when it finishes; in write-blocking mode
    /// writes and write-zeroes are written to the link's target before they complete,
    /// through `engine` (made as for [`DiskQueue::switch_disk`]) or, when `None`, an
    /// engine the queue makes. Fails with `EBUSY` while writes to a previous target are
    /// in flight.
    pub fn attach_mirror(
        &mut self,
        link: Option<Arc<MirrorLink>>,
        engine: Option<Box<dyn IoEngine>>,
    ) -> Result<(), Error> {
        if self.mirror.as_ref().is_some_and(|m| m.in_flight() > 0) {
            return Err(Error::Submit {
                engine: self.engine.name(),
                source: std::io::Error::from_raw_os_error(libc::EBUSY),
            });
        }
        let Some(link) = link else {
            self.mirror = None;
            self.dirty = None;
            return Ok(());
        };
        let engine = match (link.write_blocking(), engine) {
            (false, _) => None,
            (true, Some(mut e)) => {
                e.set_max_batch(self.options.max_batch);
                Some(e)
            }
            (true, None) => Some(create_engine_sharing(
                link.target(),
                &self.options,
                Some(&self.notifier),
            )?),
        };
        self.dirty = Some(link.bitmap().clone());
        self.mirror = Some(QueueMirror { link, engine });
        Ok(())
    }

    /// Whether a mirror job's link is attached.
    pub fn has_mirror(&self) -> bool {
        self.mirror.is_some()
    }
}
