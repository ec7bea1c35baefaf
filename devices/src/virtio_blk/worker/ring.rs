//! The worker's side of the rings and of the block layer: popping and parsing chains,
//! starting requests through the throttle, completing them and publishing used entries.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use virtio_queue::{Error as QueueError, Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace};

use super::{PassWork, QueueHost, QueueWorker, Slot};
use crate::config::ErrorAction;
use crate::virtio_blk::request::{self, Op, Request};
use crate::virtio_blk::{GuestMemMmap, SECTOR_SIZE, status};
use block::throttle::Direction;

/// Bytes of requests done as they were started after which the worker publishes them and
/// signals, mid-pass, instead of holding them until every available chain is started:
/// with an engine that completes inline (null reads zero-fill as they are queued), the
/// driver then works in parallel with the copying. Engines that complete later (the
/// kernel, a thread) keep one submit and one publication per pass.
const PUBLISH_EVERY_BYTES: u64 = 64 * 1024;

impl<Q: QueueHost> QueueWorker<Q> {
    /// Pops and parses every available chain under one queue lock (turning kicks off
    /// first if they were on), then starts the requests and publishes the rejected ones.
    pub(super) fn pop_avail(&mut self) -> PassWork {
        let mut work = PassWork::default();
        if self.stopping || self.is_held() || self.is_io_stopped() {
            return work;
        }
        // Whatever woke this queue after a resume, what it held goes before anything new.
        self.restart_held();
        let mem = self.mem.memory().into_inner();
        let budget = self.max_slots.saturating_sub(self.in_flight());
        let disarm = std::mem::replace(&mut self.armed, false);
        if disarm {
            self.disk.set_notify(false);
        }
        let mut parsed = std::mem::take(&mut self.parsed);
        let spare = &mut self.spare_iovecs;
        let limits = &self.shared.limits;
        let corrupt = self.host.with_queue(|q| {
            if disarm {
                suppress_kicks(q, &mem);
            }
            let iter = match q.iter(&*mem) {
                Ok(iter) => iter,
                Err(QueueError::InvalidAvailRingIndex) => return true,
                Err(_) => return false,
            };
            for chain in iter.take(budget) {
                let iovecs = spare.pop().unwrap_or_default();
                parsed.push(request::parse(chain, limits, iovecs));
            }
            false
        });
        if corrupt && !self.corrupt_logged {
            tracing::warn!(disk = %self.shared.id, queue = self.index,
                "avail index out of range; ignoring the queue until the driver fixes it");
        }
        self.corrupt_logged = corrupt;
        for outcome in parsed.drain(..) {
            work.popped += 1;
            match outcome {
                Ok(req) => self.accept(req, &mem),
                Err(rejected) => {
                    self.shared.invalid_requests.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(disk = %self.shared.id, queue = self.index,
                        reason = rejected.reason, "rejected request");
                    let written = rejected
                        .status
                        .is_some_and(|addr| request::write_status(&mem, addr, rejected.code));
                    self.used.push((rejected.head, u32::from(written)));
                    work.completed += 1;
                }
            }
        }
        self.parsed = parsed;
        if work.popped > 0 {
            self.start_admitted();
        }
        self.flush_used(&mem);
        work.add(std::mem::take(&mut self.early));
        work
    }

    /// Reaps finished block I/O (reading the completion eventfd first if `clear`),
    /// completes the requests and publishes them.
    pub(super) fn complete_ready(&mut self, clear: bool) -> PassWork {
        let mut work = self.publish_reaped(clear);
        if work.completed > 0 && !self.pen.is_empty() {
            // Throttled requests may go now that others finished (this submits).
            self.start_admitted();
        }
        work.add(std::mem::take(&mut self.early));
        // An engine the kernel refused (EAGAIN, a full ring) keeps the requests and wakes
        // us to submit them again, maybe with nothing to reap: submit on every call. With
        // nothing queued this returns at once, without a syscall.
        self.submit();
        work
    }

    /// Reaps finished block I/O (reading the completion eventfd first if `clear`),
    /// completes the requests and publishes them; starts nothing.
    fn publish_reaped(&mut self, clear: bool) -> PassWork {
        let mut completions = std::mem::take(&mut self.completions);
        let reaped = if clear {
            self.disk.reap(|c| completions.push(c))
        } else {
            self.disk.reap_ready(|c| completions.push(c))
        };
        if let Err(e) = reaped {
            tracing::error!(disk = %self.shared.id, queue = self.index, error = %e, "reaping failed");
        }
        let mut work = PassWork::default();
        if !completions.is_empty() {
            let mem = self.mem.memory();
            for c in completions.drain(..) {
                // Tokens are our slot indexes (see `start`), so they fit a usize.
                let idx = usize::try_from(c.token).unwrap_or(usize::MAX);
                let code = match &c.result {
                    Ok(_) => status::OK,
                    Err(e) if e.errno() == libc::EOPNOTSUPP => status::UNSUPP,
                    // A queue going away retries nothing: the error goes to the guest.
                    Err(_) if self.stopping => {
                        self.shared.io_error.count_reported(1);
                        status::IOERR
                    }
                    Err(e) => match self.shared.io_error.on_failure(c.kind, e.errno()) {
                        ErrorAction::Report => {
                            tracing::debug!(disk = %self.shared.id, queue = self.index, error = %e, "I/O error");
                            status::IOERR
                        }
                        ErrorAction::Ignore => {
                            tracing::debug!(disk = %self.shared.id, queue = self.index, error = %e, "I/O error ignored (on_*_error: ignore)");
                            status::OK
                        }
                        ErrorAction::Stop => {
                            // Bounded: the disk takes no new request until resumed.
                            tracing::warn!(disk = %self.shared.id, queue = self.index, error = %e,
                                op = ?c.kind, "I/O error: request held, disk stopped until resumed");
                            let seq = self.slots.get(idx).and_then(Option::as_ref).map(|s| s.seq);
                            if let Some(seq) = seq {
                                self.failed.push((seq, idx));
                            }
                            continue;
                        }
                    },
                };
                self.complete(idx, code);
                work.completed += 1;
            }
            self.flush_used(&mem);
        }
        self.completions = completions;
        work
    }

    fn accept(&mut self, req: Request, mem: &Arc<GuestMemMmap>) {
        let charge = match req.op {
            Op::Read => Some((Direction::Read, req.data_len)),
            Op::Write => Some((Direction::Write, req.data_len)),
            Op::Discard { num_sectors, .. } | Op::WriteZeroes { num_sectors, .. } => {
                Some((Direction::Write, u64::from(num_sectors) * SECTOR_SIZE))
            }
            Op::Flush | Op::GetId => None,
        };
        let slot = Slot {
            req,
            seq: self.next_seq,
            mem: mem.clone(),
        };
        self.next_seq += 1;
        let idx = match self.free.pop() {
            Some(idx) => {
                self.slots[idx] = Some(slot);
                idx
            }
            None => {
                self.slots.push(Some(slot));
                self.slots.len() - 1
            }
        };
        match charge {
            Some((dir, bytes)) => self.pen.push(idx, dir, bytes),
            None => self.pen.push_uncharged(idx),
        }
    }

    /// Moves admitted requests from the throttle pen to the block layer, submits, and
    /// arms the timer for the rest.
    pub(super) fn start_admitted(&mut self) {
        if self.is_held() || self.is_io_stopped() {
            return;
        }
        self.restart_held();
        let writeback = self.shared.writeback.load(Ordering::Relaxed);
        if self.disk.write_cache() != writeback {
            self.disk.set_write_cache(writeback);
        }
        let now = self.now;
        let inline = self.disk.completes_inline();
        let mut unpublished = 0u64;
        while let Some(idx) = self.pen.pop_admitted(&mut self.throttle, now) {
            if inline {
                let slot = self.slots.get(idx).and_then(Option::as_ref);
                unpublished = unpublished.saturating_add(slot.map_or(0, |s| s.req.data_len));
            }
            self.start(idx);
            if unpublished >= PUBLISH_EVERY_BYTES && self.disk.has_completions() {
                // Done as they were started (an engine that completes inline): the driver
                // gets them now and works while we do the rest.
                unpublished = 0;
                self.early.completed += self.publish_reaped(false).completed;
                if self.finish_pass() {
                    self.early.signalled += 1;
                }
            }
        }
        let throttled = self.pen.take_throttled_ns();
        if throttled > 0 {
            self.disk.add_throttled_ns(throttled);
        }
        self.submit();
        let want = self.pen.next_wake().filter(|_| !self.pen.is_empty());
        if want == self.timer_at {
            return;
        }
        let armed = match want {
            Some(at) => self.timer.arm_at(at),
            None => self.timer.disarm(),
        };
        self.timer_at = want;
        if let Err(e) = armed {
            tracing::error!(disk = %self.shared.id, queue = self.index, error = %e, "throttle timer");
        }
    }

    pub(super) fn submit(&mut self) {
        if let Err(e) = self.disk.submit() {
            tracing::error!(disk = %self.shared.id, queue = self.index, error = %e, "submit failed");
        }
    }

    /// Hands one request to the block layer (GET_ID completes here).
    pub(super) fn start(&mut self, idx: usize) {
        let Some(Some(slot)) = self.slots.get(idx) else {
            return;
        };
        let token = idx as u64;
        let offset = slot.req.sector.saturating_mul(SECTOR_SIZE);
        let sector_bytes = |sector: u64| sector.saturating_mul(SECTOR_SIZE);
        match slot.req.op {
            // SAFETY: the iovecs point into guest memory kept mapped by `slot.mem` until
            // the completion is reaped; the guest owns the buffers until we complete.
            Op::Read => unsafe { self.disk.read(token, offset, &slot.req.iovecs) },
            // SAFETY: as above.
            Op::Write => unsafe { self.disk.write(token, offset, &slot.req.iovecs, false) },
            Op::Flush => self.disk.flush(token),
            Op::Discard {
                sector,
                num_sectors,
            } => self.disk.discard(
                token,
                sector_bytes(sector),
                sector_bytes(u64::from(num_sectors)),
            ),
            Op::WriteZeroes {
                sector,
                num_sectors,
                ..
            } => self.disk.write_zeroes(
                token,
                sector_bytes(sector),
                sector_bytes(u64::from(num_sectors)),
            ),
            Op::GetId => {
                // SAFETY: as for Read: the iovecs point into guest memory kept mapped
                // by `slot.mem`, and the guest owns the buffers until we complete.
                unsafe { request::write_id(&slot.req.iovecs, &self.shared.serial) };
                self.complete(idx, status::OK);
            }
        }
    }

    /// Whether the disk is stopped on an I/O error (see [`crate::virtio_blk::io_error`]).
    pub(super) fn is_io_stopped(&self) -> bool {
        self.shared.io_error.is_stopped()
    }

    /// Sends the requests the error policy held again, oldest first, once the disk is
    /// no longer stopped; then takes what waited behind them. Returns the pass's work.
    pub fn retry_held(&mut self) -> PassWork {
        if self.is_io_stopped() || self.is_held() {
            return PassWork::default();
        }
        self.tick();
        // The held requests first, then throttled ones behind them (this submits), then
        // new chains.
        self.start_admitted();
        let mut work = if self.host.is_live() {
            self.run_pass()
        } else {
            self.process_completions()
        };
        let mem = self.mem.memory();
        self.flush_used(&mem);
        work.add(std::mem::take(&mut self.early));
        work
    }

    /// Starts the held requests again, oldest first, and submits them (the disk is no
    /// longer stopped; the caller checked).
    fn restart_held(&mut self) {
        if self.failed.is_empty() {
            return;
        }
        let mut failed = std::mem::take(&mut self.failed);
        failed.sort_unstable();
        for &(_, idx) in &failed {
            self.start(idx);
        }
        failed.clear();
        self.failed = failed;
        self.submit();
    }

    /// Completes the held requests with an I/O error (the queue is going away).
    pub(super) fn fail_held(&mut self) {
        let mut failed = std::mem::take(&mut self.failed);
        failed.sort_unstable();
        self.shared.io_error.count_reported(failed.len() as u64);
        for (_, idx) in failed {
            self.complete(idx, status::IOERR);
        }
    }

    /// Whether requests an I/O error held wait for a retry.
    pub(super) fn holds_failed(&self) -> bool {
        !self.failed.is_empty()
    }

    /// Writes the status, queues the chain for the used ring and frees the slot.
    fn complete(&mut self, idx: usize, code: u8) {
        let Some(slot) = self.slots.get_mut(idx).and_then(Option::take) else {
            tracing::error!(disk = %self.shared.id, queue = self.index, idx, "completion for a free slot");
            return;
        };
        self.free.push(idx);
        let Slot { mut req, mem, .. } = slot;
        let written = request::write_status(&mem, req.status, code);
        let len = if !written {
            0
        } else if code == status::OK {
            request::used_len(&req)
        } else {
            1
        };
        self.used.push((req.head, len));
        req.iovecs.clear();
        self.spare_iovecs.push(std::mem::take(&mut req.iovecs));
    }

    /// Publishes the queued used entries under one queue lock and notes whether the
    /// driver wants an interrupt for them.
    pub(super) fn flush_used(&mut self, mem: &GuestMemMmap) {
        if self.used.is_empty() {
            return;
        }
        let used = &mut self.used;
        let (disk, queue) = (&self.shared.id, self.index);
        let wanted = self.host.with_queue(|q| {
            let mut added = false;
            for (head, len) in used.drain(..) {
                match q.add_used(mem, head, len) {
                    Ok(()) => added = true,
                    // A head the guest made up (past the ring) cannot be returned to
                    // the used ring. Debug level, so a guest cannot flood the log.
                    Err(e) => {
                        tracing::debug!(%disk, queue, head, error = %e, "add_used failed")
                    }
                }
            }
            added && q.needs_notification(mem).unwrap_or(true)
        });
        self.needs_signal |= wanted;
    }
}

/// Asks the driver not to kick: the NO_NOTIFY flag, or with EVENT_IDX an avail_event
/// just behind the chains already popped, which the driver's next publications never
/// cross (virtio-queue leaves avail_event where the last enable put it, which costs one
/// needless kick). A hint only: a kick that comes anyway is harmless.
pub(super) fn suppress_kicks(q: &mut Queue, mem: &GuestMemMmap) {
    if !q.ready() {
        // Its rings may not be set up: write nothing.
        return;
    }
    if !q.event_idx_enabled() {
        let _ = q.disable_notification(mem);
        return;
    }
    // avail_event follows the used ring: flags, idx, then `size` 8-byte elements.
    let offset = 4 + 8 * u64::from(q.size());
    if let Some(addr) = q.used_ring().checked_add(offset) {
        let behind = q.next_avail().wrapping_sub(1);
        let _ = mem.store(behind.to_le(), GuestAddress(addr), Ordering::Relaxed);
    }
}

/// Whether the avail ring holds chains not yet popped. A distance beyond the ring size is
/// a corrupt index, not work.
pub(super) fn avail_pending(q: &Queue, mem: &GuestMemMmap) -> bool {
    q.ready()
        && q.avail_idx(mem, Ordering::Acquire).is_ok_and(|idx| {
            let pending = idx.0.wrapping_sub(q.next_avail());
            pending != 0 && pending <= q.size()
        })
}
