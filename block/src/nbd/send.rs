//! The sending side of an NBD connection. Whoever holds the socket's sending side
//! (`sender_busy`) takes queued parts in order as a [`Batch`] (their cookies assigned,
//! their headers encoded, in flight from then on) and sends it whole:
//! - the submitting thread first ([`send_now`]), with nonblocking `sendmsg`s: at low
//!   depth a request leaves without waking any thread;
//! - what the socket could not take at once is handed to the `nbd-send` thread
//!   ([`sender`]), which blocks until it is out, then goes on with the queue.

use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::{Arc, MutexGuard};

use super::conn::{Link, Shared, State, break_link, complete_part};
use super::parts;
use super::proto::{REQUEST_LEN, Request};
use super::stream;
use crate::sync::{lock, wait};

/// The most requests one batch carries.
const MAX_BATCH: usize = 64;
/// The most iovecs one batch carries (`IOV_MAX`).
const MAX_IOVECS: usize = 1024;

/// Requests on their way: their headers and what is left to send of them and their data.
pub(super) struct Batch {
    /// The encoded headers: the iovecs point into this buffer (which never moves); it is
    /// only kept alive here.
    _headers: Vec<u8>,
    /// What is left to send.
    iovs: Vec<libc::iovec>,
    /// The socket and its generation when the batch was taken.
    fd: Arc<OwnedFd>,
    generation: u64,
}

// SAFETY: a batch's iovecs point into its own header buffer (whose heap memory does not
// move with the Vec), static zeroes, and op buffers that stay valid until their ops
// complete (see `send`); whichever thread sends them does not matter.
unsafe impl Send for Batch {}

/// Takes queued parts (in order, up to [`MAX_BATCH`] requests and [`MAX_IOVECS`]
/// iovecs) into a batch: their cookies, headers and iovecs; they are in flight from now
/// on and their data slots are in `sending`. None when nothing is left to send or the
/// link has no socket.
fn take_batch(st: &mut State, sh: &Shared) -> Option<Batch> {
    let fd = st.stream.clone()?;
    let mut headers = Vec::with_capacity(REQUEST_LEN * st.queue.len().min(MAX_BATCH));
    let mut taken = Vec::with_capacity(st.queue.len().min(MAX_BATCH));
    let mut iov_count = 0;
    while let Some(&part) = st.queue.front() {
        let Some(slot) = st.slots.get(part.slot).and_then(Option::as_ref) else {
            st.queue.pop_front();
            continue;
        };
        if slot.abandoned {
            st.queue.pop_front();
            complete_part(st, sh, &part, libc::ECANCELED);
            continue;
        }
        let data = slot.iovecs;
        let need = 1 + parts::data_iovec_count(&part, data.as_ref());
        if !taken.is_empty() && (taken.len() >= MAX_BATCH || iov_count + need > MAX_IOVECS) {
            break;
        }
        st.queue.pop_front();
        iov_count += need;
        let cookie = st.next_cookie;
        st.next_cookie += 1;
        st.in_flight.insert(cookie, part);
        Request {
            command: part.command,
            flags: part.flags,
            cookie,
            offset: part.offset,
            length: part.length,
        }
        .encode(&mut headers);
        if parts::sends_data(&part) && !part.zeroes {
            st.sending.push(part.slot);
        }
        taken.push((part, data));
    }
    if taken.is_empty() {
        return None;
    }
    let mut iovs = Vec::with_capacity(iov_count);
    for (i, (part, data)) in taken.iter().enumerate() {
        iovs.push(libc::iovec {
            // Every header is encoded: the buffer no longer moves.
            iov_base: headers[i * REQUEST_LEN..].as_mut_ptr().cast(),
            iov_len: REQUEST_LEN,
        });
        if parts::sends_data(part) {
            if part.zeroes {
                parts::zero_iovecs(u64::from(part.length), &mut iovs);
            } else if let Some(data) = data {
                parts::sub_iovecs(
                    data.as_slice(),
                    part.data_start,
                    u64::from(part.length),
                    &mut iovs,
                );
            }
        }
    }
    Some(Batch {
        _headers: headers,
        iovs,
        fd,
        generation: st.generation,
    })
}

/// After a batch went out (or failed): the socket's sending side is free again.
fn release(st: &mut State, sh: &Shared, batch: &Batch, result: std::io::Result<()>) {
    st.sender_busy = false;
    st.sending.clear();
    for (part, errno) in std::mem::take(&mut st.deferred) {
        complete_part(st, sh, &part, errno);
    }
    sh.changed.notify_all();
    if let Err(e) = result {
        if st.generation == batch.generation {
            break_link(st, sh, format!("sending to the server: {e}"));
        }
    } else if !st.queue.is_empty() {
        sh.work.notify_one();
    }
}

/// Called by a submitting thread with the state locked and new parts queued: sends them
/// now if nobody holds the socket, without blocking; what the socket does not take at
/// once (and anything while someone else sends) goes to the sender thread.
pub(super) fn send_now(sh: &Shared, mut st: MutexGuard<'_, State>) {
    if st.sender_busy || st.pending.is_some() || st.link != Link::Connected {
        sh.work.notify_one();
        return;
    }
    st.sender_busy = true;
    let Some(mut batch) = take_batch(&mut st, sh) else {
        st.sender_busy = false;
        return;
    };
    drop(st);
    // SAFETY: as in `sender`: the iovecs stay valid while the batch is being sent.
    let result = unsafe { stream::send_some(batch.fd.as_raw_fd(), &mut batch.iovs) };
    let mut st = lock(&sh.state);
    match result {
        Ok(true) => release(&mut st, sh, &batch, Ok(())),
        Ok(false) => {
            // The socket is full: the sender thread finishes this batch (it stays busy).
            st.pending = Some(batch);
            sh.work.notify_one();
        }
        Err(e) => release(&mut st, sh, &batch, Err(e)),
    }
}

/// `nbd-send`: finishes batches handed over, and sends queued parts while the link is
/// up and nobody else is sending.
pub(super) fn sender(sh: &Shared) {
    loop {
        let mut batch = {
            let mut st = lock(&sh.state);
            loop {
                if st.stop {
                    // A batch handed over is dropped unsent: nobody holds the socket now
                    // (and every engine is gone: nobody waits for its answers).
                    st.pending = None;
                    st.sending.clear();
                    st.deferred.clear();
                    st.sender_busy = false;
                    sh.changed.notify_all();
                    return;
                }
                if let Some(b) = st.pending.take() {
                    break b;
                }
                if !st.sender_busy && st.link == Link::Connected && !st.queue.is_empty() {
                    st.sender_busy = true;
                    if let Some(b) = take_batch(&mut st, sh) {
                        break b;
                    }
                    st.sender_busy = false;
                }
                st = wait(&sh.work, st);
            }
        };
        // SAFETY: the iovecs describe the batch's headers, static zeroes, and op buffers
        // that stay valid until their ops complete; an op in `sending` is not completed to
        // its engine's caller before the engine's drop waits for us
        // (`Connection::abandon`), and otherwise only after the server has read its data,
        // i.e. after we sent it.
        let result = unsafe { stream::send_all(batch.fd.as_raw_fd(), &mut batch.iovs) };
        let mut st = lock(&sh.state);
        release(&mut st, sh, &batch, result);
    }
}
