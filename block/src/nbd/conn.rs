//! One connection to an NBD server, driven so that the iothread never makes a blocking
//! call: requests go out from the submitting thread when the socket takes them at once
//! (one nonblocking `sendmsg` per batch, a write's data straight from guest memory), else
//! from the `nbd-send` thread ([`super::send`]); `nbd-recv` reads replies, matches them
//! to their request by cookie and reads a read's data straight into guest memory.
//!
//! When the link breaks (the server closes, a send or receive fails, a reply is garbage),
//! `nbd-recv` waits until `nbd-send` has let go of the socket, puts every unanswered
//! request back at the head of the queue in its original order, and reconnects with
//! backoff. Requests wait up to `reconnect_delay`; after that, queued and new requests
//! fail with EIO until the link is back. A delay of zero never reconnects: the disk fails
//! every request from then on.
//!
//! Completions go to the [`Sink`] of the engine that submitted the op; its eventfd is
//! written when the sink's list turns non-empty (one write per burst).

use std::collections::{BTreeMap, VecDeque};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::parts::{self, Part, Plan};
use super::proto::{Command, ExportInfo, REQUEST_LEN, ReplyHeader, Request, SIMPLE_REPLY_LEN};
use super::stream::{self, Target};
use crate::engine::{EngineOp, IoVecs};
use crate::sync::{lock, wait, wait_timeout};
use crate::thread_class::{self, ThreadClass};

/// Where a connection's completions for one engine go.
pub type Sink = crate::engine::completions::CompletionList;

/// The state of a connection's link to its server.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Link {
    /// Requests flow.
    Connected,
    /// Broken; reconnecting.
    Down,
    /// Broken for good (reconnecting is off, or the export changed).
    Failed,
}

/// An op being served.
pub(super) struct Slot {
    pub(super) tag: u64,
    pub(super) sink: Arc<Sink>,
    pub(super) iovecs: Option<IoVecs>,
    pub(super) parts_left: usize,
    /// The first error (a positive errno), 0 while none.
    pub(super) error: i32,
    pub(super) bytes: u64,
    pub(super) flush_after: bool,
    /// Its engine went away: send nothing more of it, receive its data into scratch.
    pub(super) abandoned: bool,
}

pub(super) struct State {
    pub(super) slots: Vec<Option<Slot>>,
    pub(super) free: Vec<usize>,
    /// Parts waiting to be sent, oldest first.
    pub(super) queue: VecDeque<Part>,
    /// Sent parts by cookie (cookies grow, so this is also their order).
    pub(super) in_flight: BTreeMap<u64, Part>,
    pub(super) next_cookie: u64,
    pub(super) link: Link,
    /// Changes on every break, so a thread tells a stale socket from the current one.
    pub(super) generation: u64,
    pub(super) stream: Option<Arc<OwnedFd>>,
    /// Slots whose data the sender is sending now.
    pub(super) sending: Vec<usize>,
    /// The slot the receiver is reading data into now.
    pub(super) receiving: Option<usize>,
    /// Whether someone holds the socket's sending side: the sender thread, or an engine
    /// sending a batch itself ([`super::send::send_now`]) until it is out or handed over.
    pub(super) sender_busy: bool,
    /// A batch an engine began and the socket could not take at once: the sender thread
    /// finishes it (before anything else).
    pub(super) pending: Option<super::send::Batch>,
    pub(super) stop: bool,
    /// Requests waited `reconnect_delay` for a link: fail at once until it is back.
    pub(super) fail_fast: bool,
    pub(super) reconnects: u64,
    pub(super) last_error: Option<String>,
    /// Answers to writes whose data the current batch may still be sending: completed
    /// once it is out ([`super::send`]'s `release`), never while the sender reads the
    /// buffers.
    pub(super) deferred: Vec<(Part, i32)>,
    /// When the current outage began; cleared once a reply arrives on a new link, so a
    /// server that accepts and drops connections again and again does not restart the
    /// `reconnect_delay` clock or the backoff each time.
    pub(super) outage: Option<Instant>,
    /// The pause before the next reconnect attempt.
    pub(super) backoff: Duration,
    /// When the current link came up.
    pub(super) up_since: Instant,
}

/// What both threads and the engines share.
pub(super) struct Shared {
    pub(super) state: Mutex<State>,
    /// The sender waits here for work.
    pub(super) work: Condvar,
    /// The receiver (and whoever waits for the threads) waits here for changes.
    pub(super) changed: Condvar,
    pub(super) target: Target,
    pub(super) export: String,
    pub(super) info: ExportInfo,
    pub(super) reconnect_delay: Duration,
    pub(super) writable: bool,
    /// For logs: `host:port` or `unix:path` and the export.
    pub(super) name: String,
}

/// The first pause between reconnect attempts (doubling up to [`MAX_BACKOFF`]).
const FIRST_BACKOFF: Duration = Duration::from_millis(50);
/// The longest pause between reconnect attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(1);
/// A link up this long has proven itself even without a reply (an idle disk): a later
/// break starts a new outage.
const STABLE: Duration = Duration::from_secs(10);
/// The most requests one `sendmsg` carries.
const MAX_BATCH: usize = 64;
/// How long an engine going away waits for the threads to let go of its buffers before
/// breaking the link to make them.
const ABANDON_WAIT: Duration = Duration::from_secs(1);

/// A connection and its two threads.
pub struct Connection {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

/// How a connection behaves.
#[derive(Clone, Debug)]
pub struct ConnOptions {
    /// How long requests wait for a broken link to come back (zero: never reconnect).
    pub reconnect_delay: Duration,
    /// Whether the disk writes (a read-only export is refused on reconnect).
    pub writable: bool,
    /// The server and export, for logs.
    pub name: String,
}

/// What a connection reports.
#[derive(Clone, Debug)]
pub struct ConnStatus {
    /// Its link.
    pub link: Link,
    /// Successful reconnects.
    pub reconnects: u64,
    /// Why the link last broke or a reconnect failed.
    pub last_error: Option<String>,
}

impl Connection {
    /// Starts the threads of a connection already through its handshake (`fd`, `info`).
    pub fn start(
        fd: OwnedFd,
        info: ExportInfo,
        target: Target,
        export: String,
        options: ConnOptions,
    ) -> std::io::Result<Connection> {
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                slots: Vec::with_capacity(256),
                free: Vec::with_capacity(256),
                queue: VecDeque::with_capacity(256),
                in_flight: BTreeMap::new(),
                next_cookie: 1,
                link: Link::Connected,
                generation: 0,
                stream: Some(Arc::new(fd)),
                sending: Vec::with_capacity(MAX_BATCH),
                receiving: None,
                sender_busy: false,
                pending: None,
                stop: false,
                fail_fast: false,
                reconnects: 0,
                last_error: None,
                deferred: Vec::new(),
                outage: None,
                backoff: FIRST_BACKOFF,
                up_since: Instant::now(),
            }),
            work: Condvar::new(),
            changed: Condvar::new(),
            target,
            export,
            info,
            reconnect_delay: options.reconnect_delay,
            writable: options.writable,
            name: options.name,
        });
        let mut conn = Connection {
            shared,
            threads: Vec::with_capacity(2),
        };
        for (name, body) in [
            ("nbd-send", super::send::sender as fn(&Shared)),
            ("nbd-recv", receiver as fn(&Shared)),
        ] {
            let shared = conn.shared.clone();
            let handle = std::thread::Builder::new()
                .name(name.into())
                .stack_size(256 * 1024)
                .spawn(move || {
                    thread_class::started(ThreadClass::Network);
                    body(&shared);
                })?; // On failure `conn` is dropped, stopping the thread started.
            conn.threads.push(handle);
        }
        Ok(conn)
    }

    /// Queues `ops` for `sink` (completing at once those that need no request, and every
    /// one while the link has failed).
    pub fn submit(&self, sink: &Arc<Sink>, ops: impl Iterator<Item = (u64, EngineOp)>) {
        let sh = &*self.shared;
        let mut st = lock(&sh.state);
        let refuse = st.link == Link::Failed || st.fail_fast;
        let mut queued = false;
        for (tag, op) in ops {
            if refuse {
                sink.push(tag, -i64::from(libc::EIO), "nbd");
                continue;
            }
            let reused = st.free.pop();
            let id = reused.unwrap_or(st.slots.len());
            let st = &mut *st;
            match parts::plan(&op, &sh.info, id, &mut st.queue) {
                Plan::Done(result) => {
                    st.free.extend(reused);
                    sink.push(tag, result, "nbd");
                }
                Plan::Send {
                    parts,
                    flush_after,
                    bytes,
                } => {
                    let slot = Slot {
                        tag,
                        sink: sink.clone(),
                        iovecs: data_iovecs(&op),
                        parts_left: parts,
                        error: 0,
                        bytes,
                        flush_after,
                        abandoned: false,
                    };
                    if id == st.slots.len() {
                        st.slots.push(Some(slot));
                    } else {
                        st.slots[id] = Some(slot);
                    }
                    queued = true;
                }
            }
        }
        if queued && st.link == Link::Connected {
            // Send on this thread when the socket is free: no wake-up of the sender thread
            // on the way out. Only what the socket cannot take at once goes to the sender.
            super::send::send_now(sh, st);
        }
    }

    /// Forgets the ops of `sink` (its engine is going away): queued ones are dropped,
    /// answered ones are not handed on, and this returns once neither thread uses their
    /// buffers any more.
    pub fn abandon(&self, sink: &Arc<Sink>) {
        let sh = &*self.shared;
        let mut st = lock(&sh.state);
        let mine: Vec<usize> = st
            .slots
            .iter()
            .enumerate()
            .filter(|(_, s)| s.as_ref().is_some_and(|s| Arc::ptr_eq(&s.sink, sink)))
            .map(|(i, _)| i)
            .collect();
        if mine.is_empty() {
            return;
        }
        for &i in &mine {
            if let Some(s) = st.slots[i].as_mut() {
                s.abandoned = true;
                s.iovecs = None;
            }
        }
        let queued: Vec<Part> = st.queue.iter().copied().collect();
        st.queue.retain(|p| !mine.contains(&p.slot));
        for p in queued.into_iter().filter(|p| mine.contains(&p.slot)) {
            complete_part(&mut st, sh, &p, libc::ECANCELED);
        }
        let deadline = Instant::now() + ABANDON_WAIT;
        let mut broke = false;
        while st.sending.iter().any(|i| mine.contains(i))
            || st.receiving.is_some_and(|i| mine.contains(&i))
        {
            let now = Instant::now();
            if now >= deadline && !broke {
                // The server does not take or give data: break the link so the threads
                // let go (the other requests are resent after the reconnect).
                break_link(
                    &mut st,
                    sh,
                    "an engine went away while the server stalled".into(),
                );
                broke = true;
            }
            let left = deadline
                .saturating_duration_since(now)
                .max(Duration::from_millis(10));
            st = wait_timeout(&sh.changed, st, left).0;
        }
    }

    /// The link's state, reconnects and last error.
    pub fn status(&self) -> ConnStatus {
        let st = lock(&self.shared.state);
        ConnStatus {
            link: st.link,
            reconnects: st.reconnects,
            last_error: st.last_error.clone(),
        }
    }
}

impl Drop for Connection {
    /// Tells the server goodbye when nothing is outstanding, then stops both threads.
    fn drop(&mut self) {
        let sh = &*self.shared;
        {
            let mut st = lock(&sh.state);
            st.stop = true;
            sh.work.notify_all();
            sh.changed.notify_all();
            let deadline = Instant::now() + ABANDON_WAIT;
            while st.sender_busy && Instant::now() < deadline {
                st = wait_timeout(&sh.changed, st, Duration::from_millis(50)).0;
            }
            if let Some(fd) = &st.stream {
                if st.link == Link::Connected && !st.sender_busy && st.in_flight.is_empty() {
                    send_disconnect(fd);
                }
                stream::shutdown(fd);
            }
        }
        for t in self.threads.drain(..) {
            if t.join().is_err() {
                tracing::error!("an nbd thread panicked");
            }
        }
    }
}

/// The buffers of a read or write.
fn data_iovecs(op: &EngineOp) -> Option<IoVecs> {
    match *op {
        EngineOp::Read { iovecs, .. } | EngineOp::Write { iovecs, .. } => Some(iovecs),
        _ => None,
    }
}

/// Sends `NBD_CMD_DISC` (best effort: the server may be gone).
fn send_disconnect(fd: &OwnedFd) {
    let mut hdr = Vec::with_capacity(REQUEST_LEN);
    Request {
        command: Command::Disconnect,
        flags: 0,
        cookie: 0,
        offset: 0,
        length: 0,
    }
    .encode(&mut hdr);
    let mut iovs = vec![libc::iovec {
        iov_base: hdr.as_mut_ptr().cast(),
        iov_len: hdr.len(),
    }];
    // SAFETY: the iovec describes `hdr`, alive for the call.
    let _ = unsafe { stream::send_all(fd.as_raw_fd(), &mut iovs) };
}

/// Marks the link broken (once per generation) and shuts the socket down so that both
/// threads notice.
pub(super) fn break_link(st: &mut State, sh: &Shared, why: String) {
    if st.link != Link::Connected {
        return;
    }
    tracing::warn!(server = %sh.name, reason = %why, "NBD connection lost");
    st.link = Link::Down;
    st.generation += 1;
    st.last_error = Some(why);
    if let Some(fd) = &st.stream {
        stream::shutdown(fd);
    }
    sh.changed.notify_all();
}

/// Records the answer `errno` (0: success) for `part`; completes its op when it was the
/// last part (or queues the op's flush when one follows).
pub(super) fn complete_part(st: &mut State, sh: &Shared, part: &Part, errno: i32) {
    let Some(slot) = st.slots.get_mut(part.slot).and_then(Option::as_mut) else {
        return;
    };
    if errno != 0 && slot.error == 0 {
        slot.error = errno;
    }
    slot.parts_left = slot.parts_left.saturating_sub(1);
    if slot.parts_left > 0 {
        return;
    }
    if slot.flush_after && slot.error == 0 && !slot.abandoned {
        slot.flush_after = false;
        slot.parts_left = 1;
        st.queue.push_back(parts::flush_part(part.slot));
        sh.work.notify_one();
        return;
    }
    if let Some(slot) = st.slots[part.slot].take() {
        st.free.push(part.slot);
        let result = if slot.error != 0 {
            -i64::from(slot.error)
        } else {
            i64::try_from(slot.bytes).unwrap_or(i64::MAX)
        };
        slot.sink.push(slot.tag, result, "nbd");
    }
}

/// Fails every queued part with `errno`.
fn fail_queued(st: &mut State, sh: &Shared, errno: i32) {
    let queued: Vec<Part> = st.queue.drain(..).collect();
    for p in &queued {
        complete_part(st, sh, p, errno);
    }
}

/// The errno a reply's error stands for (NBD's values are Linux's; others are EIO).
fn reply_errno(error: u32) -> i32 {
    match i32::try_from(error) {
        Ok(
            e @ (0
            | libc::EPERM
            | libc::EIO
            | libc::ENOMEM
            | libc::EINVAL
            | libc::ENOSPC
            | libc::EOVERFLOW
            | libc::ENOTSUP
            | libc::ESHUTDOWN),
        ) => e,
        _ => libc::EIO,
    }
}

/// `nbd-recv`: reads replies while the link is up; when it breaks, recovers it.
fn receiver(sh: &Shared) {
    loop {
        let link = {
            let mut st = lock(&sh.state);
            loop {
                if st.stop {
                    return;
                }
                if st.link == Link::Connected
                    && let Some(fd) = st.stream.clone()
                {
                    break Some((fd, st.generation));
                }
                // Broken before this thread read from it (a send failed first): nobody
                // else recovers a link, so this thread does, now.
                if st.link == Link::Down {
                    break None;
                }
                st = wait(&sh.changed, st);
            }
        };
        let Some((fd, generation)) = link else {
            if !recover(sh) {
                return;
            }
            continue;
        };
        let why = receive_replies(sh, &fd);
        {
            let mut st = lock(&sh.state);
            if st.stop {
                return;
            }
            if st.generation == generation {
                break_link(&mut st, sh, why);
            }
        }
        drop(fd);
        if !recover(sh) {
            return;
        }
    }
}

/// Reads replies until the link fails; returns why it did.
fn receive_replies(sh: &Shared, fd: &OwnedFd) -> String {
    let raw = fd.as_raw_fd();
    let mut hdr = [0u8; SIMPLE_REPLY_LEN];
    let mut scratch: Vec<u8> = Vec::new();
    let mut iovs: Vec<libc::iovec> = Vec::with_capacity(64);
    loop {
        if let Err(e) = stream::recv_buf(raw, &mut hdr) {
            return format!("receiving from the server: {e}");
        }
        let reply = match ReplyHeader::parse(&hdr) {
            Ok(r) => r,
            Err(e) => return format!("bad reply: {e}"),
        };
        let (part, dest) = {
            let mut st = lock(&sh.state);
            let Some(part) = st.in_flight.remove(&reply.cookie) else {
                return format!("bad reply: cookie {} answers no request", reply.cookie);
            };
            // A reply on this link: it works, the outage (if any) is over.
            if st.outage.take().is_some() {
                st.backoff = FIRST_BACKOFF;
            }
            let dest = if part.command == Command::Read && reply.error == 0 {
                let data = st
                    .slots
                    .get(part.slot)
                    .and_then(Option::as_ref)
                    .and_then(|s| s.iovecs);
                if data.is_some() {
                    st.receiving = Some(part.slot);
                }
                Some(data)
            } else {
                None
            };
            (part, dest)
        };
        if let Some(data) = dest {
            let result = match data {
                Some(data) => {
                    iovs.clear();
                    parts::sub_iovecs(
                        data.as_slice(),
                        part.data_start,
                        u64::from(part.length),
                        &mut iovs,
                    );
                    // SAFETY: the op's buffers stay valid and untouched by others until
                    // its completion is reaped, which waits for this part; an engine
                    // going away waits while `receiving` names its op.
                    unsafe { stream::recv_all(raw, &mut iovs) }
                }
                None => {
                    scratch.resize(part.length as usize, 0);
                    stream::recv_buf(raw, &mut scratch)
                }
            };
            if let Err(e) = result {
                let mut st = lock(&sh.state);
                st.receiving = None;
                st.in_flight.insert(reply.cookie, part);
                sh.changed.notify_all();
                return format!("receiving read data: {e}");
            }
        }
        let mut st = lock(&sh.state);
        if st.receiving.take().is_some() {
            sh.changed.notify_all();
        }
        let errno = reply_errno(reply.error);
        if parts::sends_data(&part) && st.sending.contains(&part.slot) {
            // Answered before the sender let go of its data (a server replying early, or
            // erring and hanging up): completing now would let the buffers go while they
            // may still be read.
            st.deferred.push((part, errno));
        } else {
            complete_part(&mut st, sh, &part, errno);
        }
    }
}

/// After a break: waits for the sender to let go, queues the unanswered requests again
/// and reconnects (or fails everything when reconnecting is off). Returns false when the
/// connection is stopping.
fn recover(sh: &Shared) -> bool {
    let mut st = lock(&sh.state);
    while st.sender_busy && !st.stop {
        st = wait(&sh.changed, st);
    }
    if st.stop {
        return false;
    }
    st.stream = None;
    let unanswered: Vec<Part> = std::mem::take(&mut st.in_flight).into_values().collect();
    for p in unanswered.into_iter().rev() {
        st.queue.push_front(p);
    }
    if sh.reconnect_delay.is_zero() {
        st.link = Link::Failed;
        fail_queued(&mut st, sh, libc::EIO);
        tracing::error!(server = %sh.name, "NBD connection lost and reconnect_delay is 0: the disk fails every request");
        return true;
    }
    // A link that broke again before it carried one reply, and soon, continues the same
    // outage: same deadline, growing pauses. Otherwise a new outage starts.
    let repeated = st.outage.is_some() && st.up_since.elapsed() < STABLE;
    if !repeated {
        st.outage = Some(Instant::now());
        st.backoff = FIRST_BACKOFF;
    }
    let deadline = st.outage.unwrap_or_else(Instant::now) + sh.reconnect_delay;
    if repeated {
        st = pause(sh, st, deadline);
        if st.stop {
            return false;
        }
    }
    drop(st);
    loop {
        let attempt = sh.target.connect(&sh.export);
        let mut st = lock(&sh.state);
        if st.stop {
            return false;
        }
        match attempt {
            Ok((fd, info)) => {
                if let Err(why) = compatible(&sh.info, &info, sh.writable) {
                    tracing::error!(server = %sh.name, reason = %why, "NBD reconnect refused");
                    send_disconnect(&fd);
                    st.last_error = Some(why);
                    st.link = Link::Failed;
                    fail_queued(&mut st, sh, libc::EIO);
                    return true;
                }
                st.stream = Some(Arc::new(fd));
                st.link = Link::Connected;
                st.up_since = Instant::now();
                st.fail_fast = false;
                st.reconnects += 1;
                tracing::info!(server = %sh.name, resent = st.queue.len(), "NBD connection re-established");
                sh.work.notify_all();
                sh.changed.notify_all();
                return true;
            }
            Err(e) => st.last_error = Some(format!("reconnecting: {e}")),
        }
        st = pause(sh, st, deadline);
        if st.stop {
            return false;
        }
    }
}

/// Between reconnect attempts: past `deadline`, fails what waits (and from then on what
/// comes, until the link is back); then sleeps the backoff (woken early by a stop) and
/// doubles it.
fn pause<'a>(
    sh: &Shared,
    mut st: MutexGuard<'a, State>,
    deadline: Instant,
) -> MutexGuard<'a, State> {
    if !st.fail_fast && Instant::now() >= deadline {
        st.fail_fast = true;
        tracing::warn!(server = %sh.name, failed = st.queue.len(), "NBD server still unreachable after reconnect_delay: failing requests until it is back");
        fail_queued(&mut st, sh, libc::EIO);
    }
    let backoff = st.backoff;
    st.backoff = (backoff * 2).min(MAX_BACKOFF);
    wait_timeout(&sh.changed, st, backoff).0
}

/// Whether a connection reached the export requests were planned for (`old`): same
/// size, writable if we write, every command and flag still there, payloads no smaller
/// and blocks no larger.
pub(super) fn compatible(old: &ExportInfo, new: &ExportInfo, writable: bool) -> Result<(), String> {
    use super::proto::flags;
    if new.size != old.size {
        return Err(format!(
            "the export's size changed from {} to {} bytes",
            old.size, new.size
        ));
    }
    if writable && new.has(flags::READ_ONLY) {
        return Err("the export became read-only".into());
    }
    for (flag, what) in [
        (flags::SEND_FLUSH, "FLUSH"),
        (flags::SEND_FUA, "FUA"),
        (flags::SEND_TRIM, "TRIM"),
        (flags::SEND_WRITE_ZEROES, "WRITE_ZEROES"),
    ] {
        if old.has(flag) && !new.has(flag) {
            return Err(format!("the export no longer supports {what}"));
        }
    }
    if new.max_payload < old.max_payload || new.min_block > old.min_block {
        return Err(format!(
            "the export's block limits changed (minimum {} -> {}, largest payload {} -> {})",
            old.min_block, new.min_block, old.max_payload, new.max_payload
        ));
    }
    Ok(())
}
