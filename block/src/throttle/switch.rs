//! Moving a queue to another shared group while it runs.
//!
//! A queue's [`Throttle`](super::Throttle) belongs to the thread that serves the queue,
//! so another thread (the control plane) cannot swap its membership directly. Instead it
//! posts the new membership in the queue's [`GroupSwitch`] and wakes the queue; the
//! queue's thread picks it up at its next admission (see `Throttle::refresh`), drops the
//! old membership (which passes the old group's turn on) and re-evaluates its held
//! requests, oldest first, under the new group.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use super::group::{GroupMember, MemberWaker, ThrottleGroup};
use crate::sync::lock;

/// A queue's mailbox for shared-group changes, shared by the control plane (which posts)
/// and the queue's thread (which applies). Posting again before the queue looked replaces
/// the earlier post.
pub struct GroupSwitch {
    /// The queue's waker: used for the memberships this switch creates and to make the
    /// queue look at its mailbox.
    waker: MemberWaker,
    /// `Some(new)` while a change waits; `new` is `None` to leave any shared group.
    pending: Mutex<Option<Option<GroupMember>>>,
    /// Mirrors `pending.is_some()` so the data path checks without locking.
    posted: AtomicBool,
}

impl std::fmt::Debug for GroupSwitch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GroupSwitch")
            .field("posted", &self.posted.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl GroupSwitch {
    /// A mailbox for the queue woken by `waker` (the waker its memberships use).
    pub fn new(waker: MemberWaker) -> Arc<Self> {
        Arc::new(GroupSwitch {
            waker,
            pending: Mutex::new(None),
            posted: AtomicBool::new(false),
        })
    }

    /// Joins `group` with this queue's waker, for a membership made at start-up.
    pub fn join(&self, group: &ThrottleGroup) -> GroupMember {
        group.join(self.waker.clone())
    }

    /// Asks the queue to move to `group` (`None`: leave its shared group) and wakes it.
    /// The queue's thread applies the change at its next admission.
    pub fn post(&self, group: Option<&ThrottleGroup>) {
        let member = group.map(|g| self.join(g));
        let replaced = {
            let mut p = lock(&self.pending);
            let old = p.replace(member);
            self.posted.store(true, Ordering::Release);
            old
        };
        // An earlier post never applied: its membership leaves its group here, outside
        // our lock (leaving takes the group's lock).
        drop(replaced);
        (self.waker)();
    }

    /// The posted change, if any (`Some(None)`: leave the shared group). One atomic load
    /// when nothing is posted.
    pub(crate) fn take(&self) -> Option<Option<GroupMember>> {
        if !self.posted.load(Ordering::Acquire) {
            return None;
        }
        let mut p = lock(&self.pending);
        self.posted.store(false, Ordering::Relaxed);
        p.take()
    }
}
