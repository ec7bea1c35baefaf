//! A disk's I/O error policy at work (docs/architecture.md): what
//! a failed request becomes, and the disk's stopped state, shared by its queues (which
//! hold failed requests and take no new ones while it is stopped) and the control plane
//! (which pauses the VM, or under vhost-user stops serving the disk, and later resumes).
//!
//! ```text
//! queue: request fails -> action(kind, errno) -> Report: IOERR | Ignore: OK
//!                                            -> Stop: held; stop(); notifier written
//! control plane: notifier -> pause the VM (io-error) ... operator fixes the storage
//!                resume() -> each queue retries its held requests, oldest first
//! ```
//!
//! A disk stops only where a control plane said it can resume it
//! ([`IoErrorState::set_resumable`]); elsewhere `stop` acts as `report` (a held request
//! nobody can retry would hang the guest).

use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use block::RequestKind;
use serde::{Deserialize, Serialize};
use vmm_sys_util::eventfd::EventFd;

use crate::config::{ErrorAction, ReadErrorPolicy, WriteErrorPolicy};

/// What stopped a disk: the first failure since the last resume, and how many failed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct IoStatus {
    /// The failed operation: `read`, `write`, `flush`, `discard` or `write_zeroes`.
    pub op: String,
    /// Its errno (28 is ENOSPC, 5 EIO).
    pub errno: i32,
    /// The errno's name and text, e.g. `ENOSPC: No space left on device`.
    pub error: String,
    /// Requests held so far (since the stop).
    pub count: u64,
}

/// Failed requests per action taken, since the disk was made.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct IoErrorCounts {
    /// Completed with an I/O error.
    pub reported: u64,
    /// Held for a retry (each retry that fails again counts again).
    pub stopped: u64,
    /// Completed as successful although they failed.
    pub ignored: u64,
}

/// The error policy and stopped state of one disk.
#[derive(Debug)]
pub struct IoErrorState {
    write_policy: AtomicU8,
    read_policy: AtomicU8,
    /// A control plane will resume the disk after a stop.
    resumable: AtomicBool,
    stopped: AtomicBool,
    /// Stops so far, and what the last one was (kept after its resume).
    stops: AtomicU64,
    last: Mutex<Option<IoStatus>>,
    status: Mutex<Option<IoStatus>>,
    reported: AtomicU64,
    held: AtomicU64,
    ignored: AtomicU64,
    /// Written each time the disk stops.
    notifier: EventFd,
    /// Also written each time the disk stops: the control plane's wake-up.
    watcher: Mutex<Option<Arc<EventFd>>>,
}

fn op_name(kind: RequestKind) -> &'static str {
    match kind {
        RequestKind::Read => "read",
        RequestKind::Write => "write",
        RequestKind::Flush => "flush",
        RequestKind::Discard => "discard",
        RequestKind::WriteZeroes => "write_zeroes",
    }
}

/// `ENOSPC: No space left on device` for 28.
fn describe(errno: i32) -> String {
    let text = std::io::Error::from_raw_os_error(errno).to_string();
    let text = text.split(" (os error").next().unwrap_or(&text).to_string();
    match errno_name(errno) {
        Some(name) => format!("{name}: {text}"),
        None => text,
    }
}

fn errno_name(errno: i32) -> Option<&'static str> {
    Some(match errno {
        libc::ENOSPC => "ENOSPC",
        libc::EIO => "EIO",
        libc::EDQUOT => "EDQUOT",
        libc::EROFS => "EROFS",
        libc::EFBIG => "EFBIG",
        libc::ENOTCONN => "ENOTCONN",
        libc::ETIMEDOUT => "ETIMEDOUT",
        libc::ECONNRESET => "ECONNRESET",
        libc::EPIPE => "EPIPE",
        libc::ENOMEM => "ENOMEM",
        libc::EINVAL => "EINVAL",
        libc::EAGAIN => "EAGAIN",
        libc::EPERM => "EPERM",
        libc::EACCES => "EACCES",
        _ => return None,
    })
}

impl IoErrorState {
    /// The state of a running disk with these policies.
    pub fn new(write: WriteErrorPolicy, read: ReadErrorPolicy) -> std::io::Result<Self> {
        Ok(IoErrorState {
            write_policy: AtomicU8::new(write.to_u8()),
            read_policy: AtomicU8::new(read.to_u8()),
            resumable: AtomicBool::new(false),
            stopped: AtomicBool::new(false),
            stops: AtomicU64::new(0),
            last: Mutex::new(None),
            status: Mutex::new(None),
            reported: AtomicU64::new(0),
            held: AtomicU64::new(0),
            ignored: AtomicU64::new(0),
            notifier: EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)?,
            watcher: Mutex::new(None),
        })
    }

    /// The policies now.
    pub fn policies(&self) -> (WriteErrorPolicy, ReadErrorPolicy) {
        (
            WriteErrorPolicy::from_u8(self.write_policy.load(Ordering::Relaxed)),
            ReadErrorPolicy::from_u8(self.read_policy.load(Ordering::Relaxed)),
        )
    }

    /// Changes the policies (live: the next failure follows them).
    pub fn set_policies(&self, write: WriteErrorPolicy, read: ReadErrorPolicy) {
        self.write_policy.store(write.to_u8(), Ordering::Relaxed);
        self.read_policy.store(read.to_u8(), Ordering::Relaxed);
    }

    /// Has every later stop write `fd` too, and makes the disk resumable: the control
    /// plane that owns `fd` pauses the VM and resumes the disk.
    pub fn set_watcher(&self, fd: Arc<EventFd>) {
        *block::sync::lock(&self.watcher) = Some(fd);
        self.set_resumable(true);
    }

    /// Says whether a control plane watches [`IoErrorState::notifier`] and will
    /// resume the disk after a stop; until one does, `stop` acts as `report`.
    pub fn set_resumable(&self, resumable: bool) {
        self.resumable.store(resumable, Ordering::Release);
    }

    /// What a request of `kind` that failed with `errno` becomes, counted; a stop
    /// stops the disk (and writes the notifier the first time).
    pub fn on_failure(&self, kind: RequestKind, errno: i32) -> ErrorAction {
        let (write, read) = self.policies();
        let action = match kind {
            RequestKind::Read => read.action(),
            _ => write.action(errno),
        };
        let action = match action {
            ErrorAction::Stop if !self.resumable.load(Ordering::Acquire) => ErrorAction::Report,
            other => other,
        };
        match action {
            ErrorAction::Report => {
                self.reported.fetch_add(1, Ordering::Relaxed);
            }
            ErrorAction::Ignore => {
                self.ignored.fetch_add(1, Ordering::Relaxed);
            }
            ErrorAction::Stop => {
                self.held.fetch_add(1, Ordering::Relaxed);
                // The status and the flag change together (see `resume`).
                let mut status = block::sync::lock(&self.status);
                match status.as_mut() {
                    Some(s) => s.count += 1,
                    None => {
                        *status = Some(IoStatus {
                            op: op_name(kind).to_string(),
                            errno,
                            error: describe(errno),
                            count: 1,
                        });
                    }
                }
                if !self.stopped.swap(true, Ordering::AcqRel) {
                    *block::sync::lock(&self.last) = status.clone();
                    self.stops.fetch_add(1, Ordering::AcqRel);
                    let _ = self.notifier.write(1);
                    if let Some(fd) = block::sync::lock(&self.watcher).as_ref() {
                        let _ = fd.write(1);
                    }
                }
            }
        }
        action
    }

    /// Whether the disk is stopped on an error: its queues take no new requests.
    pub fn is_stopped(&self) -> bool {
        self.stopped.load(Ordering::Acquire)
    }

    /// What stopped the disk, while it is stopped.
    pub fn status(&self) -> Option<IoStatus> {
        block::sync::lock(&self.status).clone()
    }

    /// Stops so far, and what stopped the disk the last time (also once resumed): a
    /// watcher that looks now and then misses none.
    pub fn stops(&self) -> (u64, Option<IoStatus>) {
        let last = block::sync::lock(&self.last).clone();
        (self.stops.load(Ordering::Acquire), last)
    }

    /// Failed requests per action so far.
    pub fn counts(&self) -> IoErrorCounts {
        IoErrorCounts {
            reported: self.reported.load(Ordering::Relaxed),
            stopped: self.held.load(Ordering::Relaxed),
            ignored: self.ignored.load(Ordering::Relaxed),
        }
    }

    /// Clears the stop (the caller then has each queue retry what it holds: see
    /// `QueueWorker::retry_held`); returns what had stopped the disk.
    pub fn resume(&self) -> Option<IoStatus> {
        let mut status = block::sync::lock(&self.status);
        self.stopped.store(false, Ordering::Release);
        status.take()
    }

    /// Counts `n` requests completed with an I/O error outside [`IoErrorState::on_failure`]
    /// (held ones failed because their queue went away).
    pub fn count_reported(&self, n: u64) {
        self.reported.fetch_add(n, Ordering::Relaxed);
    }

    /// Readable after the disk stopped (edge: one write per stop; the reader clears it).
    pub fn notifier(&self) -> &EventFd {
        &self.notifier
    }
}

/// A disk's policy as a block job sees it: the job's failed reads count as the disk's
/// own (`on_read_error`), and a stop holds the job too.
pub struct JobSourceErrors(pub Arc<super::worker::BlkShared>);

impl block::jobs::SourceErrors for JobSourceErrors {
    fn hold(&self, errno: i32) -> bool {
        self.0.io_error.on_failure(RequestKind::Read, errno) == ErrorAction::Stop
    }

    fn stopped(&self) -> bool {
        self.0.io_error.is_stopped()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stop_is_signalled_once_and_counted_until_resumed() {
        let s = IoErrorState::new(WriteErrorPolicy::Enospc, ReadErrorPolicy::Stop).unwrap();
        // Nobody to resume it yet: a stop would hang the guest, so it reports.
        assert_eq!(
            s.on_failure(RequestKind::Write, libc::ENOSPC),
            ErrorAction::Report
        );
        s.set_resumable(true);
        assert_eq!(
            s.on_failure(RequestKind::Write, libc::EIO),
            ErrorAction::Report
        );
        assert!(!s.is_stopped());
        assert_eq!(
            s.on_failure(RequestKind::Write, libc::ENOSPC),
            ErrorAction::Stop
        );
        assert_eq!(
            s.on_failure(RequestKind::Read, libc::EIO),
            ErrorAction::Stop
        );
        assert!(s.is_stopped());
        assert_eq!(s.notifier().read().unwrap(), 1, "one signal per stop");
        let status = s.status().unwrap();
        assert_eq!(
            (status.op.as_str(), status.errno, status.count),
            ("write", libc::ENOSPC, 2)
        );
        assert!(status.error.starts_with("ENOSPC: "), "{}", status.error);
        assert_eq!(
            s.counts(),
            IoErrorCounts {
                reported: 2,
                stopped: 2,
                ignored: 0
            }
        );
        assert_eq!(s.resume(), Some(status));
        assert!(!s.is_stopped() && s.status().is_none());
        s.set_policies(WriteErrorPolicy::Ignore, ReadErrorPolicy::Report);
        assert_eq!(
            s.on_failure(RequestKind::Flush, libc::EIO),
            ErrorAction::Ignore
        );
        assert_eq!(
            s.on_failure(RequestKind::Read, libc::EIO),
            ErrorAction::Report
        );
        assert!(s.notifier().read().is_err(), "no stop, no signal");
    }
}
