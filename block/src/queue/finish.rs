//! Finishing a request: turning an engine's result into the caller's completion.

use super::{Completion, Errno, QueueCounters, RequestKind, Slot, zero_from};

/// A latency in nanoseconds, saturating at `u64::MAX` (some 584 years).
pub(super) fn nanos(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// Turns an engine result into the completion of request `token`: copies bounced reads
/// back, zero-fills short reads, fails short writes, counts it and frees the slot.
pub(super) fn finish_slot(
    token: u64,
    slot: &mut Slot,
    result: i64,
    counters: &QueueCounters,
    latency: u64,
) -> Completion {
    let result = if result < 0 {
        Err(Errno::new(i32::try_from(-result).unwrap_or(libc::EIO)))
    } else {
        // `result >= 0` here.
        let done = result.unsigned_abs().min(slot.len);
        // `done` counts bytes the engine moved into memory, so it fits a usize.
        let done_bytes = usize::try_from(done).unwrap_or(usize::MAX);
        match slot.kind {
            RequestKind::Read => {
                if let Some(buf) = &slot.bounce {
                    // SAFETY: the guest iovecs are writable until this completion is
                    // handed back (the `read` contract).
                    unsafe { buf.scatter_to(&slot.guest, done_bytes) };
                }
                if done < slot.len {
                    // Past the end of a file that shrank: the rest reads as zeroes.
                    let target = if slot.bounce.is_some() {
                        &slot.guest
                    } else {
                        &slot.iovecs
                    };
                    // SAFETY: as above.
                    unsafe { zero_from(target, done_bytes) };
                }
                Ok(slot.len)
            }
            RequestKind::Write if done < slot.len => Err(Errno::new(libc::ENOSPC)),
            RequestKind::Flush => Ok(0),
            _ => Ok(slot.len),
        }
    };
    slot.bounce = None;
    slot.busy = false;
    counters.record_completion(
        slot.kind,
        result.as_ref().map(|n| *n).map_err(|_| ()),
        latency,
    );
    Completion {
        token,
        kind: slot.kind,
        result,
    }
}
